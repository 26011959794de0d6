//! The replication frame format (docs/format-replication.md): every message on a
//! replication or witness stream is one frame, a 16-byte header followed by a payload.
//!
//! Journal records, sync requests, acknowledgements and resync data have fixed binary
//! layouts, little-endian, defined once below by the order of the `put_*`/`Reader` calls
//! in each `encode`/`decode` pair and pinned by the golden-bytes tests. The rare control
//! frames carry JSON of a type the caller chooses ([`encode_json`], [`decode_json`]).
//!
//! Reading a frame checks, before parsing anything: that a whole header arrived, the
//! magic, the version, the frame type, the reserved field, the payload length against
//! the caller's limit and the type's bounds, and then (after reading exactly that many
//! bytes) the crc. Every decoder returns an error for any input; none panics.

#![deny(clippy::indexing_slicing, clippy::unwrap_used, clippy::expect_used)]

use std::io;
use std::mem::size_of;

use bytes::{BufMut as _, Bytes, BytesMut};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

/// First bytes of every frame.
pub const MAGIC: [u8; 4] = *b"KRPL";
/// Largest payload of any frame: a 32 MiB write plus its record fields, with room to spare.
pub const MAX_FRAME_PAYLOAD: usize = 33 << 20;
/// Largest payload of a JSON control frame.
pub const MAX_JSON_PAYLOAD: usize = 1 << 20;

const MAGIC_LEN: usize = MAGIC.len();
const VERSION_OFFSET: usize = MAGIC_LEN;
const TYPE_OFFSET: usize = VERSION_OFFSET + size_of::<u8>();
const RESERVED_OFFSET: usize = TYPE_OFFSET + size_of::<u8>();
const LENGTH_OFFSET: usize = RESERVED_OFFSET + size_of::<u16>();
/// The crc covers the header up to here, then the payload.
const CRC_OFFSET: usize = LENGTH_OFFSET + size_of::<u32>();
/// Length of the frame header.
pub const HEADER_LEN: usize = CRC_OFFSET + size_of::<u32>();
const _: () = assert!(HEADER_LEN == 16);
const _: () = assert!(MAX_FRAME_PAYLOAD <= u32::MAX as usize);
const _: () = assert!(MAX_JSON_PAYLOAD <= MAX_FRAME_PAYLOAD);

/// Fixed part of a [`RecordMsg`] payload: epoch, seq, kind, flags, pad, payload_len,
/// offset, length.
const RECORD_FIXED_LEN: usize =
    2 * size_of::<u64>() + 2 * size_of::<u8>() + size_of::<u16>() + size_of::<u32>() + 2 * size_of::<u64>();
const _: () = assert!(RECORD_FIXED_LEN == 40);
/// Fixed part of a [`ResyncDataMsg`] payload: epoch, read_seq, offset, length, zero, pad.
const RESYNC_DATA_FIXED_LEN: usize = 4 * size_of::<u64>() + size_of::<u8>() + RESYNC_DATA_PAD_LEN;
const RESYNC_DATA_PAD_LEN: usize = 7;
const _: () = assert!(RESYNC_DATA_FIXED_LEN == 40);
const SYNC_REQUEST_LEN: usize = 2 * size_of::<u64>();
const ACK_LEN: usize = 4 * size_of::<u64>();
const PROBE_LEN: usize = 2 * size_of::<u64>();
const RESYNC_END_LEN: usize = 2 * size_of::<u64>();
/// Fixed part of a [`MarkRequestMsg`] payload: epoch, id; the marker's name follows.
const MARK_REQUEST_FIXED_LEN: usize = 2 * size_of::<u64>();
/// Fixed part of a [`MarkReplyMsg`] payload: epoch, id, seq, status, pad; the refusal's
/// reason follows.
const MARK_REPLY_FIXED_LEN: usize = 3 * size_of::<u64>() + size_of::<u8>() + MARK_REPLY_PAD_LEN;
const MARK_REPLY_PAD_LEN: usize = 7;
const _: () = assert!(MARK_REQUEST_FIXED_LEN == 16);
const _: () = assert!(MARK_REPLY_FIXED_LEN == 32);
/// Longest snapshot marker name a [`MarkRequestMsg`] carries: the engine's limit.
pub const MARKER_NAME_MAX_BYTES: usize = keel_engine::SNAPSHOT_NAME_MAX_BYTES;
/// Longest refusal reason a [`MarkReplyMsg`] carries; longer ones are cut by the sender.
pub const MARK_REASON_MAX_BYTES: usize = 1024;
/// Fixed part of a [`MarkGroupRequestMsg`] payload: epoch, id, name_len, member_count,
/// pad; the marker's name and the members (each a length byte and a volume name) follow.
const MARK_GROUP_REQUEST_FIXED_LEN: usize = 2 * size_of::<u64>() + 2 * size_of::<u16>() + MARK_GROUP_REQUEST_PAD_LEN;
const MARK_GROUP_REQUEST_PAD_LEN: usize = 4;
/// Fixed part of a [`MarkGroupReplyMsg`] payload: epoch, id, status, pad, seq_count, pad;
/// the members' seqs (appended) or the refusal's reason follow.
const MARK_GROUP_REPLY_FIXED_LEN: usize =
    2 * size_of::<u64>() + 2 * size_of::<u8>() + size_of::<u16>() + MARK_GROUP_REPLY_PAD_LEN;
const MARK_GROUP_REPLY_PAD_LEN: usize = 4;
const _: () = assert!(MARK_GROUP_REQUEST_FIXED_LEN == 24);
const _: () = assert!(MARK_GROUP_REPLY_FIXED_LEN == 24);
/// Fewest members a [`MarkGroupRequestMsg`] names (a group has at least two).
pub const GROUP_MEMBERS_MIN: usize = 2;
/// Most members a [`MarkGroupRequestMsg`] names: bounds the frame and the locks the
/// primary takes at once.
pub const GROUP_MEMBERS_MAX: usize = 16;
/// Longest member volume name a [`MarkGroupRequestMsg`] carries: the engine's limit (and
/// it fits the one-byte length prefix).
pub const GROUP_MEMBER_NAME_MAX_BYTES: usize = keel_engine::format::NAME_MAX_BYTES;
const _: () = assert!(GROUP_MEMBER_NAME_MAX_BYTES <= u8::MAX as usize);
const _: () = assert!(MARKER_NAME_MAX_BYTES <= u16::MAX as usize);
const _: () = assert!(GROUP_MEMBERS_MAX <= u16::MAX as usize);
/// Largest [`MarkGroupRequestMsg`] payload: the longest name and the most, longest members.
const MARK_GROUP_REQUEST_MAX_LEN: usize = MARK_GROUP_REQUEST_FIXED_LEN
    + MARKER_NAME_MAX_BYTES
    + GROUP_MEMBERS_MAX * (size_of::<u8>() + GROUP_MEMBER_NAME_MAX_BYTES);
/// Smallest [`MarkGroupRequestMsg`] payload: a one-byte name and the fewest one-byte members.
const MARK_GROUP_REQUEST_MIN_LEN: usize = MARK_GROUP_REQUEST_FIXED_LEN + 1 + GROUP_MEMBERS_MIN * 2;
/// Largest [`MarkGroupReplyMsg`] payload: the most seqs, or the longest reason.
const MARK_GROUP_REPLY_MAX_LEN: usize = MARK_GROUP_REPLY_FIXED_LEN
    + if GROUP_MEMBERS_MAX * size_of::<u64>() > MARK_REASON_MAX_BYTES {
        GROUP_MEMBERS_MAX * size_of::<u64>()
    } else {
        MARK_REASON_MAX_BYTES
    };
/// Largest data payload of a record or a resync block.
pub const MAX_DATA_LEN: usize = MAX_FRAME_PAYLOAD - RECORD_FIXED_LEN;
const _: () = assert!(RECORD_FIXED_LEN == RESYNC_DATA_FIXED_LEN);

/// Journal record kinds that cross the wire (the engine's `RecordKind` values; barriers
/// are node-local and never do).
pub mod record_kind {
    /// `length` bytes of payload written at `offset`.
    pub const WRITE: u8 = 1;
    /// `[offset, offset + length)` reads as zeros.
    pub const ZERO: u8 = 2;
    /// `[offset, offset + length)` is discarded.
    pub const TRIM: u8 = 3;
    /// A snapshot point; the payload is its name.
    pub const SNAPSHOT: u8 = 5;
}

/// Format versions of the frame header and the binary messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Version {
    /// The first version (this document's layouts).
    V1 = 1,
}

impl Version {
    /// The version this build writes.
    pub const CURRENT: Self = Self::V1;

    fn from_u8(value: u8) -> Option<Self> {
        match value {
            1 => Some(Self::V1),
            _ => None,
        }
    }
}

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameType {
    /// A journal record ([`RecordMsg`]).
    Record = 0x01,
    /// Make everything up to a seq durable and acknowledge ([`SyncRequestMsg`]).
    SyncRequest = 0x02,
    /// The standby's durable and received positions ([`AckMsg`]).
    Ack = 0x03,
    /// One block of a resync ([`ResyncDataMsg`]).
    ResyncData = 0x04,
    /// The end of a resync pass ([`ResyncEndMsg`]).
    ResyncEnd = 0x05,
    /// A heartbeat the standby echoes in its acks ([`ProbeMsg`]).
    Probe = 0x06,
    /// Standby → primary: append a snapshot marker ([`MarkRequestMsg`]).
    MarkRequest = 0x07,
    /// Primary → standby: the marker's seq, or why not ([`MarkReplyMsg`]).
    MarkReply = 0x08,
    /// Standby → primary: append one marker to each volume of a consistency group, at
    /// one instant ([`MarkGroupRequestMsg`]).
    MarkGroupRequest = 0x09,
    /// Primary → standby: each member's marker seq, or why not ([`MarkGroupReplyMsg`]).
    MarkGroupReply = 0x0a,
    /// JSON: first frame on a stream.
    Hello = 0x10,
    /// JSON: the answer to a `Hello`.
    HelloReply = 0x11,
    /// JSON: session control messages.
    Control = 0x12,
    /// JSON: a request to the witness.
    ArbiterRequest = 0x13,
    /// JSON: the witness's answer.
    ArbiterResponse = 0x14,
    /// JSON: the sender gives up on the stream and says why.
    Error = 0x15,
}

impl FrameType {
    /// Every frame type, for tests and tools.
    pub const ALL: [Self; 16] = [
        Self::Record,
        Self::SyncRequest,
        Self::Ack,
        Self::ResyncData,
        Self::ResyncEnd,
        Self::Probe,
        Self::MarkRequest,
        Self::MarkReply,
        Self::MarkGroupRequest,
        Self::MarkGroupReply,
        Self::Hello,
        Self::HelloReply,
        Self::Control,
        Self::ArbiterRequest,
        Self::ArbiterResponse,
        Self::Error,
    ];

    /// The type with this wire value.
    pub fn from_u8(value: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|ty| *ty as u8 == value)
    }

    /// Whether the payload is JSON.
    pub fn is_json(self) -> bool {
        (self as u8) >= 0x10
    }

    /// Smallest and largest payload length this type allows.
    pub fn payload_bounds(self) -> (usize, usize) {
        match self {
            Self::Record => (RECORD_FIXED_LEN, MAX_FRAME_PAYLOAD),
            Self::ResyncData => (RESYNC_DATA_FIXED_LEN, MAX_FRAME_PAYLOAD),
            Self::SyncRequest => (SYNC_REQUEST_LEN, SYNC_REQUEST_LEN),
            Self::Ack => (ACK_LEN, ACK_LEN),
            Self::ResyncEnd => (RESYNC_END_LEN, RESYNC_END_LEN),
            Self::Probe => (PROBE_LEN, PROBE_LEN),
            Self::MarkRequest => (MARK_REQUEST_FIXED_LEN + 1, MARK_REQUEST_FIXED_LEN + MARKER_NAME_MAX_BYTES),
            Self::MarkReply => (MARK_REPLY_FIXED_LEN, MARK_REPLY_FIXED_LEN + MARK_REASON_MAX_BYTES),
            Self::MarkGroupRequest => (MARK_GROUP_REQUEST_MIN_LEN, MARK_GROUP_REQUEST_MAX_LEN),
            Self::MarkGroupReply => (MARK_GROUP_REPLY_FIXED_LEN, MARK_GROUP_REPLY_MAX_LEN),
            Self::Hello
            | Self::HelloReply
            | Self::Control
            | Self::ArbiterRequest
            | Self::ArbiterResponse
            | Self::Error => (0, MAX_JSON_PAYLOAD),
        }
    }
}

/// A frame read off a stream: its type and its payload, checked against the crc.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// What the payload is.
    pub ty: FrameType,
    /// The payload (the header is not kept).
    pub payload: Bytes,
}

impl Frame {
    /// The whole frame, header included.
    pub fn encode(&self) -> Bytes {
        let header = encode_header(self.ty, &[&self.payload]);
        let mut out = BytesMut::with_capacity(HEADER_LEN + self.payload.len());
        out.put_slice(&header);
        out.put_slice(&self.payload);
        out.freeze()
    }
}

/// Everything wrong a frame can be.
///
/// Messages include the underlying error where there is one (so `source()` is `None`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The first four bytes are not `KRPL`: not a Keel replication stream, or it lost sync.
    #[error("bad frame magic {got:02x?} (expected \"KRPL\"): not a Keel replication stream, or out of sync")]
    BadMagic {
        /// The bytes received.
        got: [u8; 4],
    },
    /// A frame version this build does not speak.
    #[error("unsupported frame version {got} (this build speaks version {})", Version::CURRENT as u8)]
    UnsupportedVersion {
        /// The version received.
        got: u8,
    },
    /// A frame type this build does not know.
    #[error("unknown frame type {got:#04x}")]
    UnknownType {
        /// The type byte received.
        got: u8,
    },
    /// The reserved header field is not zero.
    #[error("{ty:?} frame: reserved header field is {got:#06x}, must be 0")]
    Reserved {
        /// The frame type.
        ty: FrameType,
        /// The value received.
        got: u16,
    },
    /// The payload length is over the reader's limit or the type's maximum.
    #[error("{ty:?} frame: payload of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// The frame type.
        ty: FrameType,
        /// The length in the header (or of the encoded value).
        len: u64,
        /// The largest accepted length.
        max: u64,
    },
    /// The payload is shorter than the type's fixed layout.
    #[error("{ty:?} frame: payload of {len} bytes is shorter than the {min} its layout needs")]
    TooShort {
        /// The frame type.
        ty: FrameType,
        /// The payload length.
        len: u64,
        /// The smallest valid length.
        min: u64,
    },
    /// The crc over the header and payload does not match the header's.
    #[error("{ty:?} frame: crc mismatch (expected {expected:#010x} from the header, got {got:#010x})")]
    CrcMismatch {
        /// The frame type.
        ty: FrameType,
        /// The crc in the header.
        expected: u32,
        /// The crc computed over what arrived.
        got: u32,
    },
    /// The input ended inside a frame.
    #[error("truncated frame: {what} needs {needed} bytes, got {got}")]
    Truncated {
        /// The part that was cut ("header", "Record payload").
        what: &'static str,
        /// Bytes needed.
        needed: u64,
        /// Bytes available.
        got: u64,
    },
    /// A well-framed message with an invalid field.
    #[error("{ty:?} frame: bad {field}: {reason}")]
    BadField {
        /// The frame type.
        ty: FrameType,
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A typed decoder or JSON helper was given a frame of another type.
    #[error("expected a {expected:?} frame, got {got:?}")]
    UnexpectedType {
        /// The type the decoder handles.
        expected: &'static str,
        /// The frame's type.
        got: FrameType,
    },
    /// The JSON payload could not be encoded or decoded as the requested type.
    #[error("{ty:?} frame: JSON: {error}")]
    Json {
        /// The frame type.
        ty: FrameType,
        /// The underlying error.
        error: serde_json::Error,
    },
    /// Reading or writing the stream failed.
    #[error("failed to {context}: {error}")]
    Io {
        /// What was being done ("read frame header").
        context: &'static str,
        /// The underlying error.
        error: io::Error,
    },
}

/// A journal record as shipped to the standby.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordMsg {
    /// Epoch of the primary that wrote it.
    pub epoch: u64,
    /// Position in the volume's write order.
    pub seq: u64,
    /// One of [`record_kind`].
    pub kind: u8,
    /// Kind-specific flags (the engine's).
    pub flags: u8,
    /// Byte offset on the volume (0 for a snapshot).
    pub offset: u64,
    /// Bytes affected (0 for a snapshot; the payload length for a write).
    pub length: u64,
    /// A write's data or a snapshot's name; empty for zero and trim.
    pub payload: Bytes,
}

/// "Make everything up to `upto_seq` durable and acknowledge."
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncRequestMsg {
    /// The primary's epoch.
    pub epoch: u64,
    /// The last seq to make durable.
    pub upto_seq: u64,
}

/// The standby's positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckMsg {
    /// The epoch of the session.
    pub epoch: u64,
    /// Every record up to this seq is durable on the standby.
    pub durable_seq: u64,
    /// Every record up to this seq has been received and applied (not necessarily durable).
    pub received_seq: u64,
    /// The id of the newest [`ProbeMsg`] received before this ack was sent (0: none yet):
    /// the primary turns it back into the probe's send time (the standby allowance).
    pub probe: u64,
}

/// A heartbeat from the primary on the journal stream; the standby echoes its id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeMsg {
    /// The primary's epoch.
    pub epoch: u64,
    /// Increases with every probe of a session.
    pub id: u64,
}

impl ProbeMsg {
    /// The whole frame.
    pub fn encode(&self) -> Bytes {
        let mut fields = BytesMut::with_capacity(PROBE_LEN);
        fields.put_u64_le(self.epoch);
        fields.put_u64_le(self.id);
        with_header(FrameType::Probe, &fields, &[])
    }

    /// Decodes a [`FrameType::Probe`] frame.
    pub fn decode(frame: &Frame) -> Result<Self, WireError> {
        let mut r = Reader::new(frame, FrameType::Probe, "Probe")?;
        let msg = Self { epoch: r.u64()?, id: r.u64()? };
        r.finish()?;
        Ok(msg)
    }
}

/// One block of a resync: the contents of `[offset, offset + length)` as of `read_seq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResyncDataMsg {
    /// The primary's epoch.
    pub epoch: u64,
    /// The primary's journal position the block was read at.
    pub read_seq: u64,
    /// Byte offset on the volume.
    pub offset: u64,
    /// Bytes in the block.
    pub length: u64,
    /// The range reads as zeros; no payload is sent.
    pub zero: bool,
    /// The data (`length` bytes) unless `zero`.
    pub payload: Bytes,
}

/// The end of a resync pass: everything up to `upto_seq` has been sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResyncEndMsg {
    /// The primary's epoch.
    pub epoch: u64,
    /// The seq the pass brought the standby up to.
    pub upto_seq: u64,
}

/// Standby → primary on the journal stream's return half: "append a snapshot marker
/// named `name`" (the standby takes the snapshot at it; docs/replication.md, "Snapshots
/// on the standby"). Sent only to a primary whose `Hello` lists
/// [`super::proto::FEATURE_SNAPSHOT_MARKER`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MarkRequestMsg {
    /// The session's epoch.
    pub epoch: u64,
    /// Chosen by the standby, echoed in the reply.
    pub id: u64,
    /// The marker's name: UTF-8, 1 to [`MARKER_NAME_MAX_BYTES`] bytes.
    pub name: String,
}

/// What became of a [`MarkRequestMsg`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MarkOutcome {
    /// The primary appended the marker (and made it durable) at this seq; the record
    /// precedes this reply on the journal stream.
    Appended {
        /// The marker's seq (never 0).
        seq: u64,
    },
    /// The primary did not append it (not primary, fenced, name already taken, ...).
    Refused {
        /// Why, for the operator (at most [`MARK_REASON_MAX_BYTES`] bytes).
        reason: String,
    },
}

/// Primary → standby on the journal stream, in order with the records: the answer to a
/// [`MarkRequestMsg`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MarkReplyMsg {
    /// The session's epoch.
    pub epoch: u64,
    /// The request's id.
    pub id: u64,
    /// Appended or refused.
    pub outcome: MarkOutcome,
}

impl MarkRequestMsg {
    /// The whole frame.
    ///
    /// # Panics
    /// If the name is empty or longer than [`MARKER_NAME_MAX_BYTES`] (callers check it).
    pub fn encode(&self) -> Bytes {
        assert!((1..=MARKER_NAME_MAX_BYTES).contains(&self.name.len()), "marker name of {} bytes", self.name.len());
        let mut fields = BytesMut::with_capacity(MARK_REQUEST_FIXED_LEN);
        fields.put_u64_le(self.epoch);
        fields.put_u64_le(self.id);
        debug_assert_eq!(fields.len(), MARK_REQUEST_FIXED_LEN);
        concat([with_header(FrameType::MarkRequest, &fields, self.name.as_bytes()), Bytes::from(self.name.clone())])
    }

    /// Decodes and checks a [`FrameType::MarkRequest`] frame.
    pub fn decode(frame: &Frame) -> Result<Self, WireError> {
        let mut r = Reader::new(frame, FrameType::MarkRequest, "MarkRequest")?;
        let epoch = r.u64()?;
        let id = r.u64()?;
        let name = r.rest();
        if name.is_empty() || name.len() > MARKER_NAME_MAX_BYTES {
            let reason = format!("{} bytes, must be 1 to {MARKER_NAME_MAX_BYTES}", name.len());
            return Err(bad_field(FrameType::MarkRequest, "name", reason));
        }
        let name = String::from_utf8(name.to_vec())
            .map_err(|e| bad_field(FrameType::MarkRequest, "name", format!("not UTF-8: {e}")))?;
        Ok(Self { epoch, id, name })
    }
}

impl MarkReplyMsg {
    const APPENDED: u8 = 0;
    const REFUSED: u8 = 1;

    /// The whole frame. A reason longer than [`MARK_REASON_MAX_BYTES`] is cut at a
    /// character boundary.
    ///
    /// # Panics
    /// If an appended marker has seq 0 (no record has).
    pub fn encode(&self) -> Bytes {
        let (seq, status, reason) = match &self.outcome {
            MarkOutcome::Appended { seq } => {
                assert_ne!(*seq, 0, "an appended marker has a seq");
                (*seq, Self::APPENDED, "")
            }
            MarkOutcome::Refused { reason } => (0, Self::REFUSED, truncate_utf8(reason, MARK_REASON_MAX_BYTES)),
        };
        let mut fields = BytesMut::with_capacity(MARK_REPLY_FIXED_LEN);
        fields.put_u64_le(self.epoch);
        fields.put_u64_le(self.id);
        fields.put_u64_le(seq);
        fields.put_u8(status);
        fields.put_bytes(0, MARK_REPLY_PAD_LEN);
        debug_assert_eq!(fields.len(), MARK_REPLY_FIXED_LEN);
        let reason = Bytes::copy_from_slice(reason.as_bytes());
        concat([with_header(FrameType::MarkReply, &fields, &reason), reason])
    }

    /// Decodes and checks a [`FrameType::MarkReply`] frame.
    pub fn decode(frame: &Frame) -> Result<Self, WireError> {
        let mut r = Reader::new(frame, FrameType::MarkReply, "MarkReply")?;
        let epoch = r.u64()?;
        let id = r.u64()?;
        let seq = r.u64()?;
        let status = r.u8()?;
        let pad: [u8; MARK_REPLY_PAD_LEN] = r.array()?;
        let reason = r.rest();
        let bad = |field, reason: String| Err(bad_field(FrameType::MarkReply, field, reason));
        if pad != [0; MARK_REPLY_PAD_LEN] {
            return bad("pad", format!("{pad:02x?}, must be zeros"));
        }
        // The header check bounds it too; the decoder does not rely on that.
        if reason.len() > MARK_REASON_MAX_BYTES {
            return bad("reason", format!("{} bytes, at most {MARK_REASON_MAX_BYTES}", reason.len()));
        }
        let outcome = match status {
            Self::APPENDED if seq == 0 => return bad("seq", "0 for an appended marker".into()),
            Self::APPENDED if !reason.is_empty() => {
                return bad("reason", format!("{} bytes for an appended marker, must be empty", reason.len()))
            }
            Self::APPENDED => MarkOutcome::Appended { seq },
            Self::REFUSED if seq != 0 => return bad("seq", format!("{seq} for a refusal, must be 0")),
            Self::REFUSED => match String::from_utf8(reason.to_vec()) {
                Ok(reason) => MarkOutcome::Refused { reason },
                Err(e) => return bad("reason", format!("not UTF-8: {e}")),
            },
            other => return bad("status", format!("{other}, must be 0 (appended) or 1 (refused)")),
        };
        Ok(Self { epoch, id, outcome })
    }
}

/// Standby → primary on the journal stream's return half of one member (the lead): "append
/// a marker named `name` to every volume of `members`, at one instant" (the standby takes
/// the group snapshot at them; docs/replication.md, "Group snapshots on the standby"). Sent
/// only to a primary whose `Hello` lists [`super::proto::FEATURE_SNAPSHOT_GROUP_MARKER`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MarkGroupRequestMsg {
    /// The session's epoch.
    pub epoch: u64,
    /// Chosen by the standby, echoed in the reply (one id space with [`MarkRequestMsg`]).
    pub id: u64,
    /// The marker's name: UTF-8, 1 to [`MARKER_NAME_MAX_BYTES`] bytes.
    pub name: String,
    /// The member volumes, in strictly ascending byte order (so each once):
    /// [`GROUP_MEMBERS_MIN`] to [`GROUP_MEMBERS_MAX`] names of 1 to
    /// [`GROUP_MEMBER_NAME_MAX_BYTES`] bytes of UTF-8. The lead volume is one of them.
    pub members: Vec<String>,
}

/// What became of a [`MarkGroupRequestMsg`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MarkGroupOutcome {
    /// The primary appended the markers (and made them durable) under every member's
    /// journal lock. `seqs[i]` is the marker's seq on `members[i]` of the request (never
    /// 0). The lead's record precedes this reply on its journal stream; every other
    /// member's record was queued on that member's own stream before the reply.
    Appended {
        /// One seq per member, in the request's order.
        seqs: Vec<u64>,
    },
    /// The primary appended nothing (not primary, fenced, a member unknown, a name
    /// already taken, ...).
    Refused {
        /// Why, naming the member at fault (at most [`MARK_REASON_MAX_BYTES`] bytes).
        reason: String,
    },
}

/// Primary → standby on the lead's journal stream, in order with its records: the answer
/// to a [`MarkGroupRequestMsg`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MarkGroupReplyMsg {
    /// The session's epoch.
    pub epoch: u64,
    /// The request's id.
    pub id: u64,
    /// Appended or refused.
    pub outcome: MarkGroupOutcome,
}

impl MarkGroupRequestMsg {
    /// Checks the fields the decoder checks; `Err` names the field and what is wrong.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if self.name.is_empty() || self.name.len() > MARKER_NAME_MAX_BYTES {
            return Err(("name", format!("{} bytes, must be 1 to {MARKER_NAME_MAX_BYTES}", self.name.len())));
        }
        if !(GROUP_MEMBERS_MIN..=GROUP_MEMBERS_MAX).contains(&self.members.len()) {
            let reason = format!("{} members, must be {GROUP_MEMBERS_MIN} to {GROUP_MEMBERS_MAX}", self.members.len());
            return Err(("members", reason));
        }
        for member in &self.members {
            if member.is_empty() || member.len() > GROUP_MEMBER_NAME_MAX_BYTES {
                let reason = format!("member of {} bytes, must be 1 to {GROUP_MEMBER_NAME_MAX_BYTES}", member.len());
                return Err(("members", reason));
            }
        }
        if let Some(pair) = self.members.windows(2).find(|pair| pair.first() >= pair.get(1)) {
            return Err(("members", format!("{pair:?} are not in strictly ascending order (sorted, each once)")));
        }
        Ok(())
    }

    /// The whole frame.
    ///
    /// # Panics
    /// If [`MarkGroupRequestMsg::check`] fails (callers build requests that pass it).
    pub fn encode(&self) -> Bytes {
        if let Err((field, reason)) = self.check() {
            panic!("MarkGroupRequest with a bad {field}: {reason}");
        }
        let mut fields = BytesMut::with_capacity(MARK_GROUP_REQUEST_FIXED_LEN);
        fields.put_u64_le(self.epoch);
        fields.put_u64_le(self.id);
        fields.put_u16_le(self.name.len() as u16);
        fields.put_u16_le(self.members.len() as u16);
        fields.put_bytes(0, MARK_GROUP_REQUEST_PAD_LEN);
        debug_assert_eq!(fields.len(), MARK_GROUP_REQUEST_FIXED_LEN);
        let mut rest = BytesMut::new();
        rest.put_slice(self.name.as_bytes());
        for member in &self.members {
            rest.put_u8(member.len() as u8);
            rest.put_slice(member.as_bytes());
        }
        let rest = rest.freeze();
        concat([with_header(FrameType::MarkGroupRequest, &fields, &rest), rest])
    }

    /// Decodes and checks a [`FrameType::MarkGroupRequest`] frame.
    pub fn decode(frame: &Frame) -> Result<Self, WireError> {
        let ty = FrameType::MarkGroupRequest;
        let mut r = Reader::new(frame, ty, "MarkGroupRequest")?;
        let epoch = r.u64()?;
        let id = r.u64()?;
        let name_len = usize::from(r.u16()?);
        let member_count = usize::from(r.u16()?);
        let pad: [u8; MARK_GROUP_REQUEST_PAD_LEN] = r.array()?;
        if pad != [0; MARK_GROUP_REQUEST_PAD_LEN] {
            return Err(bad_field(ty, "pad", format!("{pad:02x?}, must be zeros")));
        }
        // The counts are checked before they size anything.
        if name_len == 0 || name_len > MARKER_NAME_MAX_BYTES {
            return Err(bad_field(ty, "name_len", format!("{name_len}, must be 1 to {MARKER_NAME_MAX_BYTES}")));
        }
        if !(GROUP_MEMBERS_MIN..=GROUP_MEMBERS_MAX).contains(&member_count) {
            let reason = format!("{member_count}, must be {GROUP_MEMBERS_MIN} to {GROUP_MEMBERS_MAX}");
            return Err(bad_field(ty, "member_count", reason));
        }
        let utf8 = |field, bytes: &[u8]| {
            String::from_utf8(bytes.to_vec()).map_err(|e| bad_field(ty, field, format!("not UTF-8: {e}")))
        };
        let name = utf8("name", &r.bytes(name_len)?)?;
        let mut members = Vec::with_capacity(member_count);
        for _ in 0..member_count {
            let len = usize::from(r.u8()?);
            members.push(utf8("members", &r.bytes(len)?)?);
        }
        r.finish()?;
        let msg = Self { epoch, id, name, members };
        msg.check().map_err(|(field, reason)| bad_field(ty, field, reason))?;
        Ok(msg)
    }
}

impl MarkGroupReplyMsg {
    const APPENDED: u8 = 0;
    const REFUSED: u8 = 1;

    /// The whole frame. A reason longer than [`MARK_REASON_MAX_BYTES`] is cut at a
    /// character boundary.
    ///
    /// # Panics
    /// If an appended reply has fewer than [`GROUP_MEMBERS_MIN`] or more than
    /// [`GROUP_MEMBERS_MAX`] seqs, or a seq of 0 (no record has).
    pub fn encode(&self) -> Bytes {
        let mut fields = BytesMut::with_capacity(MARK_GROUP_REPLY_FIXED_LEN);
        fields.put_u64_le(self.epoch);
        fields.put_u64_le(self.id);
        let mut rest = BytesMut::new();
        match &self.outcome {
            MarkGroupOutcome::Appended { seqs } => {
                assert!((GROUP_MEMBERS_MIN..=GROUP_MEMBERS_MAX).contains(&seqs.len()), "{} seqs", seqs.len());
                assert!(seqs.iter().all(|&seq| seq != 0), "an appended marker has a seq");
                fields.put_u8(Self::APPENDED);
                fields.put_u8(0);
                fields.put_u16_le(seqs.len() as u16);
                for &seq in seqs {
                    rest.put_u64_le(seq);
                }
            }
            MarkGroupOutcome::Refused { reason } => {
                fields.put_u8(Self::REFUSED);
                fields.put_u8(0);
                fields.put_u16_le(0);
                rest.put_slice(truncate_utf8(reason, MARK_REASON_MAX_BYTES).as_bytes());
            }
        }
        fields.put_bytes(0, MARK_GROUP_REPLY_PAD_LEN);
        debug_assert_eq!(fields.len(), MARK_GROUP_REPLY_FIXED_LEN);
        let rest = rest.freeze();
        concat([with_header(FrameType::MarkGroupReply, &fields, &rest), rest])
    }

    /// Decodes and checks a [`FrameType::MarkGroupReply`] frame.
    pub fn decode(frame: &Frame) -> Result<Self, WireError> {
        let ty = FrameType::MarkGroupReply;
        let mut r = Reader::new(frame, ty, "MarkGroupReply")?;
        let epoch = r.u64()?;
        let id = r.u64()?;
        let status = r.u8()?;
        let pad_byte = r.u8()?;
        let seq_count = usize::from(r.u16()?);
        let pad: [u8; MARK_GROUP_REPLY_PAD_LEN] = r.array()?;
        let bad = |field, reason: String| Err(bad_field(ty, field, reason));
        if pad_byte != 0 || pad != [0; MARK_GROUP_REPLY_PAD_LEN] {
            return bad("pad", format!("{pad_byte:02x} {pad:02x?}, must be zeros"));
        }
        let outcome = match status {
            Self::APPENDED => {
                if !(GROUP_MEMBERS_MIN..=GROUP_MEMBERS_MAX).contains(&seq_count) {
                    return bad(
                        "seq_count",
                        format!("{seq_count}, must be {GROUP_MEMBERS_MIN} to {GROUP_MEMBERS_MAX}"),
                    );
                }
                let seqs = (0..seq_count).map(|_| r.u64()).collect::<Result<Vec<u64>, WireError>>()?;
                r.finish()?;
                if seqs.contains(&0) {
                    return bad("seqs", "a seq of 0 for an appended marker".into());
                }
                MarkGroupOutcome::Appended { seqs }
            }
            Self::REFUSED => {
                if seq_count != 0 {
                    return bad("seq_count", format!("{seq_count} for a refusal, must be 0"));
                }
                let reason = r.rest();
                // The header check bounds it too; the decoder does not rely on that.
                if reason.len() > MARK_REASON_MAX_BYTES {
                    return bad("reason", format!("{} bytes, at most {MARK_REASON_MAX_BYTES}", reason.len()));
                }
                match String::from_utf8(reason.to_vec()) {
                    Ok(reason) => MarkGroupOutcome::Refused { reason },
                    Err(e) => return bad("reason", format!("not UTF-8: {e}")),
                }
            }
            other => return bad("status", format!("{other}, must be 0 (appended) or 1 (refused)")),
        };
        Ok(Self { epoch, id, outcome })
    }
}

/// The longest prefix of `text` of at most `max` bytes that ends on a character boundary.
fn truncate_utf8(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.get(..end).unwrap_or_default()
}

impl RecordMsg {
    /// The whole frame as two buffers, header and record fields, then the payload
    /// (shared, not copied): for `SendStream::write_chunks`.
    ///
    /// # Panics
    /// If the payload is longer than [`MAX_DATA_LEN`], which no engine record is.
    pub fn encode_chunks(&self) -> [Bytes; 2] {
        assert!(self.payload.len() <= MAX_DATA_LEN, "record payload of {} bytes", self.payload.len());
        let mut fields = BytesMut::with_capacity(RECORD_FIXED_LEN);
        fields.put_u64_le(self.epoch);
        fields.put_u64_le(self.seq);
        fields.put_u8(self.kind);
        fields.put_u8(self.flags);
        fields.put_u16_le(0);
        fields.put_u32_le(self.payload.len() as u32);
        fields.put_u64_le(self.offset);
        fields.put_u64_le(self.length);
        debug_assert_eq!(fields.len(), RECORD_FIXED_LEN);
        [with_header(FrameType::Record, &fields, &self.payload), self.payload.clone()]
    }

    /// The whole frame in one buffer (copies the payload once).
    pub fn encode(&self) -> Bytes {
        concat(self.encode_chunks())
    }

    /// Decodes and checks a [`FrameType::Record`] frame.
    pub fn decode(frame: &Frame) -> Result<Self, WireError> {
        let mut r = Reader::new(frame, FrameType::Record, "Record")?;
        let epoch = r.u64()?;
        let seq = r.u64()?;
        let kind = r.u8()?;
        let flags = r.u8()?;
        let pad = r.u16()?;
        let payload_len = r.u32()?;
        let offset = r.u64()?;
        let length = r.u64()?;
        let payload = r.rest();
        let bad = |field, reason: String| Err(bad_field(FrameType::Record, field, reason));
        if pad != 0 {
            return bad("pad", format!("{pad:#06x}, must be 0"));
        }
        if payload_len as usize != payload.len() {
            return bad("payload_len", format!("{payload_len}, but {} payload bytes follow", payload.len()));
        }
        check_range(FrameType::Record, offset, length)?;
        match kind {
            record_kind::WRITE if length != u64::from(payload_len) => {
                bad("length", format!("a write of {length} bytes carries {payload_len} bytes of data"))
            }
            record_kind::ZERO | record_kind::TRIM if payload_len != 0 => {
                bad("payload_len", format!("{payload_len}, but a zero or trim record has no payload"))
            }
            record_kind::SNAPSHOT if offset != 0 || length != 0 => {
                bad("length", format!("a snapshot record has offset {offset} and length {length}, both must be 0"))
            }
            record_kind::WRITE | record_kind::ZERO | record_kind::TRIM | record_kind::SNAPSHOT => {
                Ok(Self { epoch, seq, kind, flags, offset, length, payload })
            }
            other => bad("kind", format!("{other} is not a replicated record kind (1, 2, 3 or 5)")),
        }
    }
}

impl SyncRequestMsg {
    /// The whole frame.
    pub fn encode(&self) -> Bytes {
        let mut fields = BytesMut::with_capacity(SYNC_REQUEST_LEN);
        fields.put_u64_le(self.epoch);
        fields.put_u64_le(self.upto_seq);
        with_header(FrameType::SyncRequest, &fields, &[])
    }

    /// Decodes a [`FrameType::SyncRequest`] frame.
    pub fn decode(frame: &Frame) -> Result<Self, WireError> {
        let mut r = Reader::new(frame, FrameType::SyncRequest, "SyncRequest")?;
        let msg = Self { epoch: r.u64()?, upto_seq: r.u64()? };
        r.finish()?;
        Ok(msg)
    }
}

impl AckMsg {
    /// The whole frame.
    pub fn encode(&self) -> Bytes {
        let mut fields = BytesMut::with_capacity(ACK_LEN);
        fields.put_u64_le(self.epoch);
        fields.put_u64_le(self.durable_seq);
        fields.put_u64_le(self.received_seq);
        fields.put_u64_le(self.probe);
        with_header(FrameType::Ack, &fields, &[])
    }

    /// Decodes a [`FrameType::Ack`] frame.
    pub fn decode(frame: &Frame) -> Result<Self, WireError> {
        let mut r = Reader::new(frame, FrameType::Ack, "Ack")?;
        let msg = Self { epoch: r.u64()?, durable_seq: r.u64()?, received_seq: r.u64()?, probe: r.u64()? };
        r.finish()?;
        Ok(msg)
    }
}

impl ResyncDataMsg {
    /// The whole frame as two buffers, header and block fields, then the data (shared,
    /// not copied; empty for a zero block).
    ///
    /// # Panics
    /// If a data block's payload is not `length` bytes or longer than [`MAX_DATA_LEN`],
    /// or a zero block carries a payload.
    pub fn encode_chunks(&self) -> [Bytes; 2] {
        let payload = if self.zero {
            assert!(self.payload.is_empty(), "zero resync block with {} payload bytes", self.payload.len());
            Bytes::new()
        } else {
            assert!(self.payload.len() <= MAX_DATA_LEN, "resync block of {} bytes", self.payload.len());
            assert_eq!(self.payload.len() as u64, self.length, "resync block payload and length differ");
            self.payload.clone()
        };
        let mut fields = BytesMut::with_capacity(RESYNC_DATA_FIXED_LEN);
        fields.put_u64_le(self.epoch);
        fields.put_u64_le(self.read_seq);
        fields.put_u64_le(self.offset);
        fields.put_u64_le(self.length);
        fields.put_u8(u8::from(self.zero));
        fields.put_bytes(0, RESYNC_DATA_PAD_LEN);
        debug_assert_eq!(fields.len(), RESYNC_DATA_FIXED_LEN);
        [with_header(FrameType::ResyncData, &fields, &payload), payload]
    }

    /// The whole frame in one buffer (copies the data once).
    pub fn encode(&self) -> Bytes {
        concat(self.encode_chunks())
    }

    /// Decodes and checks a [`FrameType::ResyncData`] frame.
    pub fn decode(frame: &Frame) -> Result<Self, WireError> {
        let mut r = Reader::new(frame, FrameType::ResyncData, "ResyncData")?;
        let epoch = r.u64()?;
        let read_seq = r.u64()?;
        let offset = r.u64()?;
        let length = r.u64()?;
        let zero = r.u8()?;
        let pad: [u8; RESYNC_DATA_PAD_LEN] = r.array()?;
        let payload = r.rest();
        let bad = |field, reason: String| Err(bad_field(FrameType::ResyncData, field, reason));
        if pad != [0; RESYNC_DATA_PAD_LEN] {
            return bad("pad", format!("{pad:02x?}, must be zeros"));
        }
        check_range(FrameType::ResyncData, offset, length)?;
        let zero = match zero {
            0 => false,
            1 => true,
            other => return bad("zero", format!("{other}, must be 0 or 1")),
        };
        if zero && !payload.is_empty() {
            return bad("payload", format!("a zero block carries {} bytes", payload.len()));
        }
        if !zero && payload.len() as u64 != length {
            return bad("payload", format!("{} bytes for a block of length {length}", payload.len()));
        }
        Ok(Self { epoch, read_seq, offset, length, zero, payload })
    }
}

impl ResyncEndMsg {
    /// The whole frame.
    pub fn encode(&self) -> Bytes {
        let mut fields = BytesMut::with_capacity(RESYNC_END_LEN);
        fields.put_u64_le(self.epoch);
        fields.put_u64_le(self.upto_seq);
        with_header(FrameType::ResyncEnd, &fields, &[])
    }

    /// Decodes a [`FrameType::ResyncEnd`] frame.
    pub fn decode(frame: &Frame) -> Result<Self, WireError> {
        let mut r = Reader::new(frame, FrameType::ResyncEnd, "ResyncEnd")?;
        let msg = Self { epoch: r.u64()?, upto_seq: r.u64()? };
        r.finish()?;
        Ok(msg)
    }
}

/// A whole JSON control frame of type `ty` carrying `value`.
pub fn encode_json<T: Serialize>(ty: FrameType, value: &T) -> Result<Bytes, WireError> {
    if !ty.is_json() {
        return Err(WireError::UnexpectedType { expected: "JSON", got: ty });
    }
    let payload = serde_json::to_vec(value).map_err(|error| WireError::Json { ty, error })?;
    if payload.len() > MAX_JSON_PAYLOAD {
        return Err(WireError::TooLarge { ty, len: payload.len() as u64, max: MAX_JSON_PAYLOAD as u64 });
    }
    Ok(with_header(ty, &payload, &[]))
}

/// Decodes the JSON payload of a control frame as `T`.
pub fn decode_json<T: DeserializeOwned>(frame: &Frame) -> Result<T, WireError> {
    if !frame.ty.is_json() {
        return Err(WireError::UnexpectedType { expected: "JSON", got: frame.ty });
    }
    serde_json::from_slice(&frame.payload).map_err(|error| WireError::Json { ty: frame.ty, error })
}

/// Checks a frame header (everything but the crc, which needs the payload) and returns
/// the frame type and the payload length.
pub fn decode_header(header: &[u8; HEADER_LEN], max_payload: usize) -> Result<(FrameType, usize), WireError> {
    let (magic, rest) = header.split_first_chunk::<MAGIC_LEN>().ok_or(TRUNCATED_HEADER)?;
    if *magic != MAGIC {
        return Err(WireError::BadMagic { got: *magic });
    }
    let (&[version, ty], rest) = rest.split_first_chunk::<2>().ok_or(TRUNCATED_HEADER)?;
    if Version::from_u8(version).is_none() {
        return Err(WireError::UnsupportedVersion { got: version });
    }
    let ty = FrameType::from_u8(ty).ok_or(WireError::UnknownType { got: ty })?;
    let (reserved, rest) = rest.split_first_chunk::<2>().ok_or(TRUNCATED_HEADER)?;
    let reserved = u16::from_le_bytes(*reserved);
    if reserved != 0 {
        return Err(WireError::Reserved { ty, got: reserved });
    }
    let (len, _crc) = rest.split_first_chunk::<4>().ok_or(TRUNCATED_HEADER)?;
    let len = u32::from_le_bytes(*len) as usize;
    let (min, type_max) = ty.payload_bounds();
    let max = type_max.min(max_payload).min(MAX_FRAME_PAYLOAD);
    if len > max {
        return Err(WireError::TooLarge { ty, len: len as u64, max: max as u64 });
    }
    if len < min {
        return Err(WireError::TooShort { ty, len: len as u64, min: min as u64 });
    }
    Ok((ty, len))
}

/// Decodes the first frame in `bytes`, returning it and the number of bytes it took.
/// Errors with [`WireError::Truncated`] if `bytes` ends inside the frame.
pub fn decode_frame(bytes: &[u8], max_payload: usize) -> Result<(Frame, usize), WireError> {
    let header: &[u8; HEADER_LEN] = bytes.first_chunk().ok_or(WireError::Truncated {
        what: "header",
        needed: HEADER_LEN as u64,
        got: bytes.len() as u64,
    })?;
    let (ty, len) = decode_header(header, max_payload)?;
    let payload = bytes.get(HEADER_LEN..HEADER_LEN + len).ok_or(WireError::Truncated {
        what: "payload",
        needed: len as u64,
        got: bytes.len().saturating_sub(HEADER_LEN) as u64,
    })?;
    check_crc(header, ty, payload)?;
    Ok((Frame { ty, payload: Bytes::copy_from_slice(payload) }, HEADER_LEN + len))
}

/// Reads one frame, or `None` if the stream ended cleanly before a header. The payload
/// may be at most `max_payload` bytes (and the type's own limit).
///
/// Not cancel-safe: a frame partly read when the future is dropped is lost, and the
/// stream is then out of sync.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R, max_payload: usize) -> Result<Option<Frame>, WireError> {
    let mut header = [0u8; HEADER_LEN];
    let filled =
        read_full(r, &mut header).await.map_err(|error| WireError::Io { context: "read frame header", error })?;
    if filled == 0 {
        return Ok(None);
    }
    if filled < HEADER_LEN {
        return Err(WireError::Truncated { what: "header", needed: HEADER_LEN as u64, got: filled as u64 });
    }
    let (ty, len) = decode_header(&header, max_payload)?;
    let mut payload = BytesMut::zeroed(len);
    let filled =
        read_full(r, &mut payload).await.map_err(|error| WireError::Io { context: "read frame payload", error })?;
    if filled < len {
        return Err(WireError::Truncated { what: "payload", needed: len as u64, got: filled as u64 });
    }
    check_crc(&header, ty, &payload)?;
    Ok(Some(Frame { ty, payload: payload.freeze() }))
}

/// Reads until `buf` is full or the stream ends; returns the bytes read.
async fn read_full<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while let Some(unfilled) = buf.get_mut(filled..).filter(|rest| !rest.is_empty()) {
        match r.read(unfilled).await? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// Writes one frame (header and payload).
///
/// Not cancel-safe: a frame partly written when the future is dropped leaves the stream
/// out of sync.
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, frame: &Frame) -> Result<(), WireError> {
    let header = encode_header(frame.ty, &[&frame.payload]);
    let io = |error| WireError::Io { context: "write frame", error };
    w.write_all(&header).await.map_err(io)?;
    w.write_all(&frame.payload).await.map_err(io)
}

/// Feeds arbitrary bytes to every decoder (feature `fuzzing`, for a cargo-fuzz target):
/// a panic is a bug. Frames that decode must re-encode to the same bytes.
#[cfg(feature = "fuzzing")]
pub fn fuzz_decode(bytes: &[u8]) {
    let mut rest = bytes;
    while let Ok((frame, used)) = decode_frame(rest, MAX_FRAME_PAYLOAD) {
        rest = rest.get(used..).unwrap_or_default();
        let encoded = frame.encode();
        assert_eq!(decode_frame(&encoded, MAX_FRAME_PAYLOAD).ok().map(|(f, _)| f).as_ref(), Some(&frame));
        decode_any(&frame);
    }
    // Also every typed decoder on a payload that skipped the header checks.
    for ty in FrameType::ALL {
        decode_any(&Frame { ty, payload: Bytes::copy_from_slice(bytes) });
    }
}

#[cfg(any(test, feature = "fuzzing"))]
fn decode_any(frame: &Frame) {
    let reencoded = match frame.ty {
        FrameType::Record => RecordMsg::decode(frame).ok().map(|m| m.encode()),
        FrameType::SyncRequest => SyncRequestMsg::decode(frame).ok().map(|m| m.encode()),
        FrameType::Ack => AckMsg::decode(frame).ok().map(|m| m.encode()),
        FrameType::ResyncData => ResyncDataMsg::decode(frame).ok().map(|m| m.encode()),
        FrameType::ResyncEnd => ResyncEndMsg::decode(frame).ok().map(|m| m.encode()),
        FrameType::Probe => ProbeMsg::decode(frame).ok().map(|m| m.encode()),
        FrameType::MarkRequest => MarkRequestMsg::decode(frame).ok().map(|m| m.encode()),
        FrameType::MarkReply => MarkReplyMsg::decode(frame).ok().map(|m| m.encode()),
        FrameType::MarkGroupRequest => MarkGroupRequestMsg::decode(frame).ok().map(|m| m.encode()),
        FrameType::MarkGroupReply => MarkGroupReplyMsg::decode(frame).ok().map(|m| m.encode()),
        _ => decode_json::<serde_json::Value>(frame).ok().map(|_| frame.encode()),
    };
    if let Some(bytes) = reencoded {
        assert_eq!(bytes, frame.encode(), "{:?} frame does not re-encode to itself", frame.ty);
    }
}

const TRUNCATED_HEADER: WireError =
    WireError::Truncated { what: "header", needed: HEADER_LEN as u64, got: HEADER_LEN as u64 };

/// The header of a frame of type `ty` whose payload is the concatenation of `payload`.
fn encode_header(ty: FrameType, payload: &[&[u8]]) -> [u8; HEADER_LEN] {
    let len: usize = payload.iter().map(|part| part.len()).sum();
    assert!(len <= MAX_FRAME_PAYLOAD, "{ty:?} frame payload of {len} bytes");
    let mut header = BytesMut::with_capacity(HEADER_LEN);
    header.put_slice(&MAGIC);
    header.put_u8(Version::CURRENT as u8);
    header.put_u8(ty as u8);
    header.put_u16_le(0);
    header.put_u32_le(len as u32);
    debug_assert_eq!(header.len(), CRC_OFFSET);
    let mut crc = crc32fast::Hasher::new();
    crc.update(&header);
    for part in payload {
        crc.update(part);
    }
    header.put_u32_le(crc.finalize());
    let mut out = [0u8; HEADER_LEN];
    out.copy_from_slice(&header);
    out
}

/// Header followed by `fields`; the crc also covers `rest`, which the caller sends next.
fn with_header(ty: FrameType, fields: &[u8], rest: &[u8]) -> Bytes {
    let header = encode_header(ty, &[fields, rest]);
    let mut out = BytesMut::with_capacity(HEADER_LEN + fields.len());
    out.put_slice(&header);
    out.put_slice(fields);
    out.freeze()
}

fn concat([head, tail]: [Bytes; 2]) -> Bytes {
    if tail.is_empty() {
        return head;
    }
    let mut out = BytesMut::with_capacity(head.len() + tail.len());
    out.put_slice(&head);
    out.put_slice(&tail);
    out.freeze()
}

fn check_crc(header: &[u8; HEADER_LEN], ty: FrameType, payload: &[u8]) -> Result<(), WireError> {
    let (covered, stored) = header.split_at(CRC_OFFSET);
    let expected = u32::from_le_bytes(stored.try_into().map_err(|_| TRUNCATED_HEADER)?);
    let mut crc = crc32fast::Hasher::new();
    crc.update(covered);
    crc.update(payload);
    let got = crc.finalize();
    if got != expected {
        return Err(WireError::CrcMismatch { ty, expected, got });
    }
    Ok(())
}

fn check_range(ty: FrameType, offset: u64, length: u64) -> Result<(), WireError> {
    match offset.checked_add(length) {
        Some(_) => Ok(()),
        None => Err(bad_field(ty, "length", format!("offset {offset} + length {length} overflows"))),
    }
}

fn bad_field(ty: FrameType, field: &'static str, reason: String) -> WireError {
    WireError::BadField { ty, field, reason }
}

/// Little-endian fields off a frame's payload, in layout order; total.
struct Reader {
    ty: FrameType,
    payload: Bytes,
    pos: usize,
}

impl Reader {
    fn new(frame: &Frame, ty: FrameType, name: &'static str) -> Result<Self, WireError> {
        if frame.ty != ty {
            return Err(WireError::UnexpectedType { expected: name, got: frame.ty });
        }
        Ok(Self { ty, payload: frame.payload.clone(), pos: 0 })
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let remaining = self.payload.get(self.pos..).unwrap_or_default();
        let value = remaining.first_chunk::<N>().ok_or(WireError::TooShort {
            ty: self.ty,
            len: self.payload.len() as u64,
            min: (self.pos + N) as u64,
        })?;
        self.pos += N;
        Ok(*value)
    }

    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(u8::from_le_bytes(self.array()?))
    }

    fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// The next `len` bytes, shared with the frame.
    fn bytes(&mut self, len: usize) -> Result<Bytes, WireError> {
        let end = self.pos.checked_add(len).filter(|&end| end <= self.payload.len()).ok_or(WireError::TooShort {
            ty: self.ty,
            len: self.payload.len() as u64,
            min: self.pos.saturating_add(len) as u64,
        })?;
        let bytes = self.payload.slice(self.pos..end);
        self.pos = end;
        Ok(bytes)
    }

    /// The bytes after the fixed fields, shared with the frame.
    fn rest(self) -> Bytes {
        self.payload.slice(self.pos.min(self.payload.len())..)
    }

    /// Errors if bytes follow the fixed fields.
    fn finish(self) -> Result<(), WireError> {
        let extra = self.payload.len().saturating_sub(self.pos);
        if extra != 0 {
            return Err(WireError::TooLarge { ty: self.ty, len: self.payload.len() as u64, max: self.pos as u64 });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::indexing_slicing, clippy::unwrap_used, clippy::expect_used)]

    use proptest::prelude::*;

    use super::*;

    /// A frame built by hand from the documented layout, independently of the encoder.
    fn hand_frame(ty: u8, payload: &[u8]) -> Vec<u8> {
        let mut frame = b"KRPL".to_vec();
        frame.extend_from_slice(&[1, ty, 0, 0]);
        frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        let mut crc = crc32fast::Hasher::new();
        crc.update(&frame);
        crc.update(payload);
        frame.extend_from_slice(&crc.finalize().to_le_bytes());
        frame.extend_from_slice(payload);
        frame
    }

    fn decode_one(bytes: &[u8]) -> Result<Frame, WireError> {
        let (frame, used) = decode_frame(bytes, MAX_FRAME_PAYLOAD)?;
        assert_eq!(used, bytes.len());
        Ok(frame)
    }

    fn record_fields(kind: u8, pad: u16, payload_len: u32, offset: u64, length: u64) -> Vec<u8> {
        let mut fields = Vec::new();
        fields.extend_from_slice(&7u64.to_le_bytes()); // epoch
        fields.extend_from_slice(&42u64.to_le_bytes()); // seq
        fields.push(kind);
        fields.push(0x80); // flags
        fields.extend_from_slice(&pad.to_le_bytes());
        fields.extend_from_slice(&payload_len.to_le_bytes());
        fields.extend_from_slice(&offset.to_le_bytes());
        fields.extend_from_slice(&length.to_le_bytes());
        fields
    }

    #[test]
    fn record_frame_matches_the_documented_layout() {
        let msg = RecordMsg {
            epoch: 7,
            seq: 42,
            kind: record_kind::WRITE,
            flags: 0x80,
            offset: 4096,
            length: 3,
            payload: Bytes::from_static(b"abc"),
        };
        let mut payload = record_fields(record_kind::WRITE, 0, 3, 4096, 3);
        payload.extend_from_slice(b"abc");
        let expected = hand_frame(0x01, &payload);
        assert_eq!(&msg.encode()[..], &expected[..]);
        assert_eq!(msg.encode_chunks().concat(), expected);
        assert_eq!(RecordMsg::decode(&decode_one(&expected).unwrap()).unwrap(), msg);
    }

    #[test]
    fn fixed_frames_match_the_documented_layout() {
        let le = |values: &[u64]| values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>();
        let ack = AckMsg { epoch: 3, durable_seq: 10, received_seq: 12, probe: 0 };
        assert_eq!(&ack.encode()[..], &hand_frame(0x03, &le(&[3, 10, 12, 0]))[..]);
        let sync = SyncRequestMsg { epoch: 3, upto_seq: 11 };
        assert_eq!(&sync.encode()[..], &hand_frame(0x02, &le(&[3, 11]))[..]);
        let end = ResyncEndMsg { epoch: 4, upto_seq: 99 };
        assert_eq!(&end.encode()[..], &hand_frame(0x05, &le(&[4, 99]))[..]);
        let zero_block =
            ResyncDataMsg { epoch: 4, read_seq: 98, offset: 1 << 20, length: 65536, zero: true, payload: Bytes::new() };
        let mut payload = le(&[4, 98, 1 << 20, 65536]);
        payload.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&zero_block.encode()[..], &hand_frame(0x04, &payload)[..]);
    }

    /// The example in docs/format-replication.md, byte for byte.
    #[test]
    fn ack_example_in_the_format_doc() {
        let doc = "4b 52 50 4c 01 03 00 00 20 00 00 00 59 37 78 c2 \
                   03 00 00 00 00 00 00 00 0a 00 00 00 00 00 00 00 \
                   0c 00 00 00 00 00 00 00 07 00 00 00 00 00 00 00";
        let bytes: Vec<u8> = doc.split_whitespace().map(|b| u8::from_str_radix(b, 16).unwrap()).collect();
        let ack = AckMsg { epoch: 3, durable_seq: 10, received_seq: 12, probe: 7 };
        assert_eq!(&ack.encode()[..], &bytes[..]);
        assert_eq!(AckMsg::decode(&decode_one(&bytes).unwrap()).unwrap(), ack);
    }

    #[test]
    fn header_checks_come_in_order_and_name_the_problem() {
        let good = AckMsg { epoch: 1, durable_seq: 2, received_seq: 3, probe: 0 }.encode().to_vec();
        let with = |at: usize, byte: u8| {
            let mut bytes = good.clone();
            bytes[at] = byte;
            decode_one(&bytes).unwrap_err()
        };
        assert!(matches!(with(0, b'X'), WireError::BadMagic { got } if &got == b"XRPL"));
        assert!(matches!(with(4, 2), WireError::UnsupportedVersion { got: 2 }));
        assert!(matches!(with(5, 0x99), WireError::UnknownType { got: 0x99 }));
        assert!(matches!(with(6, 1), WireError::Reserved { ty: FrameType::Ack, got: 1 }));
        assert!(matches!(with(8, 33), WireError::TooLarge { ty: FrameType::Ack, len: 33, max: 32 }));
        assert!(matches!(with(8, 31), WireError::TooShort { ty: FrameType::Ack, len: 31, min: 32 }));
        let stored = u32::from_le_bytes(good[12..16].try_into().unwrap());
        let e = with(12, good[12] ^ 1);
        assert!(
            matches!(e, WireError::CrcMismatch { ty: FrameType::Ack, expected, got } if expected == stored ^ 1 && got == stored),
            "{e}"
        );
        // Bad magic wins over an absurd length: the stream is out of sync, say so.
        let mut bytes = good.clone();
        bytes[0] = 0;
        bytes[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(decode_one(&bytes), Err(WireError::BadMagic { .. })));
        // The reader's limit applies before any payload is read.
        let big = RecordMsg {
            epoch: 1,
            seq: 1,
            kind: record_kind::WRITE,
            flags: 0,
            offset: 0,
            length: 4096,
            payload: Bytes::from(vec![1; 4096]),
        };
        let e = decode_frame(&big.encode()[..HEADER_LEN], 1024).unwrap_err();
        assert!(matches!(e, WireError::TooLarge { ty: FrameType::Record, len: 4136, max: 1024 }), "{e}");
        assert!(matches!(decode_frame(&good[..15], MAX_FRAME_PAYLOAD), Err(WireError::Truncated { got: 15, .. })));
        assert!(matches!(decode_frame(&good[..20], MAX_FRAME_PAYLOAD), Err(WireError::Truncated { got: 4, .. })));
    }

    #[test]
    fn record_fields_are_checked() {
        let record = |fields: Vec<u8>, data: &[u8]| {
            let payload = [fields, data.to_vec()].concat();
            RecordMsg::decode(&Frame { ty: FrameType::Record, payload: payload.into() })
        };
        let bad_field = |r: Result<RecordMsg, WireError>| match r {
            Err(WireError::BadField { field, .. }) => field,
            other => panic!("expected a bad field, got {other:?}"),
        };
        assert!(record(record_fields(record_kind::WRITE, 0, 2, 0, 2), b"ab").is_ok());
        assert_eq!(bad_field(record(record_fields(record_kind::WRITE, 1, 2, 0, 2), b"ab")), "pad");
        assert_eq!(bad_field(record(record_fields(record_kind::WRITE, 0, 3, 0, 2), b"ab")), "payload_len");
        assert_eq!(bad_field(record(record_fields(record_kind::WRITE, 0, 2, 0, 5), b"ab")), "length");
        assert_eq!(bad_field(record(record_fields(record_kind::ZERO, 0, 2, 0, 2), b"ab")), "payload_len");
        assert_eq!(bad_field(record(record_fields(record_kind::SNAPSHOT, 0, 2, 8, 0), b"s1")), "length");
        assert_eq!(bad_field(record(record_fields(4, 0, 0, 0, 0), b"")), "kind");
        assert_eq!(bad_field(record(record_fields(record_kind::TRIM, 0, 0, u64::MAX, 1), b"")), "length");
        assert!(record(record_fields(record_kind::SNAPSHOT, 0, 2, 0, 0), b"s1").is_ok());
        assert!(matches!(record(record_fields(1, 0, 0, 0, 0)[..39].to_vec(), b""), Err(WireError::TooShort { .. })));
        let ack = AckMsg { epoch: 1, durable_seq: 1, received_seq: 1, probe: 0 }.encode();
        let frame = decode_one(&ack).unwrap();
        assert!(matches!(RecordMsg::decode(&frame), Err(WireError::UnexpectedType { got: FrameType::Ack, .. })));
    }

    #[test]
    fn resync_fields_are_checked() {
        let block = |zero: u8, pad: u8, length: u64, data: &[u8]| {
            let mut payload: Vec<u8> = [1u64, 2, 0, length].iter().flat_map(|v| v.to_le_bytes()).collect();
            payload.push(zero);
            payload.extend_from_slice(&[pad; 7]);
            payload.extend_from_slice(data);
            ResyncDataMsg::decode(&Frame { ty: FrameType::ResyncData, payload: payload.into() })
        };
        assert!(block(0, 0, 3, b"abc").is_ok());
        assert!(block(1, 0, 3, b"").is_ok());
        assert!(matches!(block(2, 0, 3, b""), Err(WireError::BadField { field: "zero", .. })));
        assert!(matches!(block(0, 1, 3, b"abc"), Err(WireError::BadField { field: "pad", .. })));
        assert!(matches!(block(1, 0, 3, b"abc"), Err(WireError::BadField { field: "payload", .. })));
        assert!(matches!(block(0, 0, 4, b"abc"), Err(WireError::BadField { field: "payload", .. })));
    }

    #[test]
    fn mark_frames_match_the_documented_layout() {
        let request = MarkRequestMsg { epoch: 3, id: 1, name: "nightly".into() };
        let mut payload = [3u64, 1].iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>();
        payload.extend_from_slice(b"nightly");
        assert_eq!(&request.encode()[..], &hand_frame(0x07, &payload)[..]);
        assert_eq!(MarkRequestMsg::decode(&decode_one(&request.encode()).unwrap()).unwrap(), request);

        let appended = MarkReplyMsg { epoch: 3, id: 1, outcome: MarkOutcome::Appended { seq: 4242 } };
        let mut payload = [3u64, 1, 4242].iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>();
        payload.extend_from_slice(&[0; 8]);
        assert_eq!(&appended.encode()[..], &hand_frame(0x08, &payload)[..]);
        let refused = MarkReplyMsg { epoch: 3, id: 2, outcome: MarkOutcome::Refused { reason: "fenced".into() } };
        let mut payload = [3u64, 2, 0].iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>();
        payload.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0]);
        payload.extend_from_slice(b"fenced");
        assert_eq!(&refused.encode()[..], &hand_frame(0x08, &payload)[..]);
        for reply in [appended, refused] {
            assert_eq!(MarkReplyMsg::decode(&decode_one(&reply.encode()).unwrap()).unwrap(), reply);
        }
    }

    /// The example in docs/format-replication.md, byte for byte.
    #[test]
    fn mark_request_example_in_the_format_doc() {
        let doc = "4b 52 50 4c 01 07 00 00 17 00 00 00 ec e8 83 d3 \
                   03 00 00 00 00 00 00 00 01 00 00 00 00 00 00 00 \
                   6e 69 67 68 74 6c 79";
        let bytes: Vec<u8> = doc.split_whitespace().map(|b| u8::from_str_radix(b, 16).unwrap()).collect();
        let request = MarkRequestMsg { epoch: 3, id: 1, name: "nightly".into() };
        assert_eq!(&request.encode()[..], &bytes[..]);
    }

    #[test]
    fn mark_fields_are_checked() {
        let request = |name: &[u8]| {
            let payload = [[3u64, 1].iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>(), name.to_vec()].concat();
            MarkRequestMsg::decode(&Frame { ty: FrameType::MarkRequest, payload: payload.into() })
        };
        assert!(request(b"s").is_ok());
        assert!(request(&[b'x'; MARKER_NAME_MAX_BYTES]).is_ok());
        assert!(matches!(request(b""), Err(WireError::BadField { field: "name", .. })));
        assert!(matches!(request(&[b'x'; MARKER_NAME_MAX_BYTES + 1]), Err(WireError::BadField { field: "name", .. })));
        assert!(matches!(request(&[0xff, 0xfe]), Err(WireError::BadField { field: "name", .. })));
        // The header bounds refuse a name that is too long before anything is read.
        let mut header = hand_frame(0x07, &[b'x'; MARK_REQUEST_FIXED_LEN + MARKER_NAME_MAX_BYTES + 1]);
        header.truncate(HEADER_LEN);
        let e = decode_frame(&header, MAX_FRAME_PAYLOAD).unwrap_err();
        assert!(matches!(e, WireError::TooLarge { ty: FrameType::MarkRequest, len: 273, max: 272 }), "{e}");
        let e = decode_frame(&hand_frame(0x07, &[0; MARK_REQUEST_FIXED_LEN]), MAX_FRAME_PAYLOAD).unwrap_err();
        assert!(matches!(e, WireError::TooShort { ty: FrameType::MarkRequest, len: 16, min: 17 }), "{e}");

        let reply = |seq: u64, status: u8, pad: u8, reason: &[u8]| {
            let mut payload = [3u64, 1, seq].iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>();
            payload.push(status);
            payload.extend_from_slice(&[pad; 7]);
            payload.extend_from_slice(reason);
            MarkReplyMsg::decode(&Frame { ty: FrameType::MarkReply, payload: payload.into() })
        };
        let field = |r: Result<MarkReplyMsg, WireError>| match r {
            Err(WireError::BadField { field, .. }) => field,
            other => panic!("expected a bad field, got {other:?}"),
        };
        assert!(reply(9, 0, 0, b"").is_ok());
        assert!(reply(0, 1, 0, b"not primary").is_ok());
        assert_eq!(field(reply(0, 0, 0, b"")), "seq");
        assert_eq!(field(reply(9, 0, 0, b"why")), "reason");
        assert_eq!(field(reply(9, 1, 0, b"why")), "seq");
        assert_eq!(field(reply(0, 1, 0, &[0xc3])), "reason");
        assert_eq!(field(reply(9, 2, 0, b"")), "status");
        assert_eq!(field(reply(9, 0, 1, b"")), "pad");
        // A long reason is cut at a character boundary, and the result decodes.
        let long = "é".repeat(MARK_REASON_MAX_BYTES);
        let cut = MarkReplyMsg { epoch: 1, id: 1, outcome: MarkOutcome::Refused { reason: long } };
        let decoded = MarkReplyMsg::decode(&decode_one(&cut.encode()).unwrap()).unwrap();
        let MarkOutcome::Refused { reason } = decoded.outcome else { panic!("refused expected") };
        assert_eq!(reason.len(), MARK_REASON_MAX_BYTES);
    }

    /// Found by the `repl_frame` fuzz target (which also feeds payloads that skipped the
    /// header checks to each decoder): a `MarkReply` whose reason was over the limit
    /// decoded, because only the header check bounded it, and re-encoded cut short. The
    /// decoder now checks the length itself.
    #[test]
    fn a_mark_reply_reason_over_the_limit_is_refused_by_the_decoder() {
        let mut payload = [0u64, 1, 0].iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>();
        payload.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0]);
        payload.extend_from_slice(&[b'x'; MARK_REASON_MAX_BYTES + 1]);
        let decoded = MarkReplyMsg::decode(&Frame { ty: FrameType::MarkReply, payload: payload.into() });
        assert!(matches!(decoded, Err(WireError::BadField { ty: FrameType::MarkReply, field: "reason", .. })));
    }

    fn group_request_payload(name: &[u8], members: &[&[u8]], counts: Option<(u16, u16)>, pad: u8) -> Vec<u8> {
        let (name_len, member_count) = counts.unwrap_or((name.len() as u16, members.len() as u16));
        let mut payload = [3u64, 9].iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>();
        payload.extend_from_slice(&name_len.to_le_bytes());
        payload.extend_from_slice(&member_count.to_le_bytes());
        payload.extend_from_slice(&[pad; 4]);
        payload.extend_from_slice(name);
        for member in members {
            payload.push(member.len() as u8);
            payload.extend_from_slice(member);
        }
        payload
    }

    #[test]
    fn mark_group_frames_match_the_documented_layout() {
        let request =
            MarkGroupRequestMsg { epoch: 3, id: 9, name: "nightly".into(), members: vec!["db".into(), "files".into()] };
        let payload = group_request_payload(b"nightly", &[b"db", b"files"], None, 0);
        assert_eq!(&request.encode()[..], &hand_frame(0x09, &payload)[..]);
        assert_eq!(MarkGroupRequestMsg::decode(&decode_one(&request.encode()).unwrap()).unwrap(), request);

        let appended =
            MarkGroupReplyMsg { epoch: 3, id: 9, outcome: MarkGroupOutcome::Appended { seqs: vec![4242, 17] } };
        let mut payload = [3u64, 9].iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>();
        payload.extend_from_slice(&[0, 0, 2, 0, 0, 0, 0, 0]);
        payload.extend(4242u64.to_le_bytes().into_iter().chain(17u64.to_le_bytes()));
        assert_eq!(&appended.encode()[..], &hand_frame(0x0a, &payload)[..]);
        let refused = MarkGroupReplyMsg {
            epoch: 3,
            id: 9,
            outcome: MarkGroupOutcome::Refused { reason: "volume files: fenced".into() },
        };
        let mut payload = [3u64, 9].iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>();
        payload.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0]);
        payload.extend_from_slice(b"volume files: fenced");
        assert_eq!(&refused.encode()[..], &hand_frame(0x0a, &payload)[..]);
        for reply in [appended, refused] {
            assert_eq!(MarkGroupReplyMsg::decode(&decode_one(&reply.encode()).unwrap()).unwrap(), reply);
        }
    }

    /// The example in docs/format-replication.md, byte for byte.
    #[test]
    fn mark_group_request_example_in_the_format_doc() {
        let doc = "4b 52 50 4c 01 09 00 00 28 00 00 00 02 58 73 12 \
                   03 00 00 00 00 00 00 00 09 00 00 00 00 00 00 00 \
                   07 00 02 00 00 00 00 00 6e 69 67 68 74 6c 79 02 \
                   64 62 05 66 69 6c 65 73";
        let bytes: Vec<u8> = doc.split_whitespace().map(|b| u8::from_str_radix(b, 16).unwrap()).collect();
        let request =
            MarkGroupRequestMsg { epoch: 3, id: 9, name: "nightly".into(), members: vec!["db".into(), "files".into()] };
        assert_eq!(&request.encode()[..], &bytes[..], "{:02x?}", &request.encode()[..]);
    }

    #[test]
    fn mark_group_fields_are_checked() {
        let request = |name: &[u8], members: &[&[u8]], counts: Option<(u16, u16)>, pad: u8| {
            let payload = group_request_payload(name, members, counts, pad);
            MarkGroupRequestMsg::decode(&Frame { ty: FrameType::MarkGroupRequest, payload: payload.into() })
        };
        let field = |r: Result<MarkGroupRequestMsg, WireError>| match r {
            Err(WireError::BadField { field, .. }) => field,
            other => panic!("expected a bad field, got {other:?}"),
        };
        let long_member = [b'v'; GROUP_MEMBER_NAME_MAX_BYTES];
        let many: Vec<Vec<u8>> = (0..GROUP_MEMBERS_MAX).map(|i| format!("v{i:02}").into_bytes()).collect();
        let many: Vec<&[u8]> = many.iter().map(Vec::as_slice).collect();
        assert!(request(b"s", &[b"a", b"b"], None, 0).is_ok());
        assert!(request(&[b'x'; MARKER_NAME_MAX_BYTES], &[b"a", &long_member], None, 0).is_ok());
        assert!(request(b"s", &many, None, 0).is_ok());
        assert_eq!(field(request(b"s", &[b"a", b"b"], None, 1)), "pad");
        assert_eq!(field(request(b"", &[b"a", b"b"], None, 0)), "name_len");
        assert_eq!(field(request(&[b'x'; MARKER_NAME_MAX_BYTES + 1], &[b"a", b"b"], None, 0)), "name_len");
        assert_eq!(field(request(b"s", &[b"a"], None, 0)), "member_count");
        let too_many: Vec<&[u8]> = many.iter().copied().chain([b"zz".as_slice()]).collect();
        assert_eq!(field(request(b"s", &too_many, None, 0)), "member_count");
        assert_eq!(field(request(&[0xff], &[b"a", b"b"], None, 0)), "name");
        assert_eq!(field(request(b"s", &[b"a", &[0xc3]], None, 0)), "members");
        assert_eq!(field(request(b"s", &[b"a", b""], None, 0)), "members");
        // Each once, sorted: a duplicate or a descending pair is refused.
        assert_eq!(field(request(b"s", &[b"db", b"db"], None, 0)), "members");
        assert_eq!(field(request(b"s", &[b"files", b"db"], None, 0)), "members");
        // Counts that disagree with the bytes: too few bytes, or bytes left over.
        let short = request(b"s", &[b"a", b"b"], Some((1, 3)), 0).unwrap_err();
        assert!(matches!(short, WireError::TooShort { ty: FrameType::MarkGroupRequest, .. }), "{short}");
        let long = request(b"s", &[b"a", b"b", b"c"], Some((1, 2)), 0).unwrap_err();
        assert!(matches!(long, WireError::TooLarge { ty: FrameType::MarkGroupRequest, .. }), "{long}");
        let cut = request(b"nightly", &[b"a", b"b"], Some((200, 2)), 0).unwrap_err();
        assert!(matches!(cut, WireError::TooShort { .. }), "{cut}");
        // The header bounds refuse sizes no valid request has, before anything is read.
        let (min, max) = FrameType::MarkGroupRequest.payload_bounds();
        assert_eq!((min, max), (29, 24 + 256 + 16 * 129));
        let mut header = hand_frame(0x09, &vec![b'x'; max + 1]);
        header.truncate(HEADER_LEN);
        assert!(matches!(decode_frame(&header, MAX_FRAME_PAYLOAD), Err(WireError::TooLarge { .. })));
        let e = decode_frame(&hand_frame(0x09, &[0; 28]), MAX_FRAME_PAYLOAD).unwrap_err();
        assert!(matches!(e, WireError::TooShort { ty: FrameType::MarkGroupRequest, len: 28, min: 29 }), "{e}");

        let reply = |status: u8, pad: u8, count: u16, rest: &[u8]| {
            let mut payload = [3u64, 9].iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>();
            payload.extend_from_slice(&[status, pad]);
            payload.extend_from_slice(&count.to_le_bytes());
            payload.extend_from_slice(&[0; 4]);
            payload.extend_from_slice(rest);
            MarkGroupReplyMsg::decode(&Frame { ty: FrameType::MarkGroupReply, payload: payload.into() })
        };
        let reply_field = |r: Result<MarkGroupReplyMsg, WireError>| match r {
            Err(WireError::BadField { field, .. }) => field,
            other => panic!("expected a bad field, got {other:?}"),
        };
        let seqs = |values: &[u64]| values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>();
        assert!(reply(0, 0, 2, &seqs(&[5, 6])).is_ok());
        assert!(reply(1, 0, 0, b"volume x: unknown").is_ok());
        assert_eq!(reply_field(reply(0, 1, 2, &seqs(&[5, 6]))), "pad");
        assert_eq!(reply_field(reply(0, 0, 1, &seqs(&[5]))), "seq_count");
        assert_eq!(reply_field(reply(0, 0, 17, &seqs(&[5; 17]))), "seq_count");
        assert_eq!(reply_field(reply(0, 0, 2, &seqs(&[5, 0]))), "seqs");
        assert_eq!(reply_field(reply(1, 0, 2, b"why")), "seq_count");
        assert_eq!(reply_field(reply(1, 0, 0, &[0xc3])), "reason");
        assert_eq!(reply_field(reply(1, 0, 0, &[b'x'; MARK_REASON_MAX_BYTES + 1])), "reason");
        assert_eq!(reply_field(reply(2, 0, 0, b"")), "status");
        assert!(matches!(reply(0, 0, 3, &seqs(&[5, 6])), Err(WireError::TooShort { .. })));
        assert!(matches!(reply(0, 0, 2, &seqs(&[5, 6, 7])), Err(WireError::TooLarge { .. })));
        // A long reason is cut at a character boundary, and the result decodes.
        let long = "é".repeat(MARK_REASON_MAX_BYTES);
        let cut = MarkGroupReplyMsg { epoch: 1, id: 1, outcome: MarkGroupOutcome::Refused { reason: long } };
        let decoded = MarkGroupReplyMsg::decode(&decode_one(&cut.encode()).unwrap()).unwrap();
        let MarkGroupOutcome::Refused { reason } = decoded.outcome else { panic!("refused expected") };
        assert_eq!(reason.len(), MARK_REASON_MAX_BYTES);
    }

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Greeting {
        volume: String,
        epoch: u64,
    }

    #[test]
    fn json_frames_round_trip_and_are_limited() {
        let hello = Greeting { volume: "db".into(), epoch: 3 };
        let bytes = encode_json(FrameType::Hello, &hello).unwrap();
        let frame = decode_one(&bytes).unwrap();
        assert_eq!(frame.ty, FrameType::Hello);
        assert_eq!(decode_json::<Greeting>(&frame).unwrap(), hello);
        assert!(matches!(decode_json::<u64>(&frame), Err(WireError::Json { ty: FrameType::Hello, .. })));
        assert!(matches!(encode_json(FrameType::Ack, &hello), Err(WireError::UnexpectedType { .. })));
        let huge = "x".repeat(MAX_JSON_PAYLOAD);
        assert!(matches!(encode_json(FrameType::Control, &huge), Err(WireError::TooLarge { .. })));
        let ack = decode_one(&AckMsg { epoch: 1, durable_seq: 1, received_seq: 1, probe: 0 }.encode()).unwrap();
        assert!(matches!(decode_json::<Greeting>(&ack), Err(WireError::UnexpectedType { got: FrameType::Ack, .. })));
    }

    #[tokio::test]
    async fn read_frame_reads_a_stream_of_frames_in_small_pieces() {
        let record = RecordMsg {
            epoch: 1,
            seq: 5,
            kind: record_kind::WRITE,
            flags: 0,
            offset: 8192,
            length: 100_000,
            payload: (0..100_000u32).map(|i| i as u8).collect::<Vec<u8>>().into(),
        };
        let sync = SyncRequestMsg { epoch: 1, upto_seq: 5 };
        let control = encode_json(FrameType::Control, &Greeting { volume: "v".into(), epoch: 1 }).unwrap();
        let (mut writer, mut reader) = tokio::io::duplex(64);
        let frames = vec![record.encode(), sync.encode(), control.clone()];
        let write = tokio::spawn(async move {
            for bytes in frames {
                let frame = decode_one(&bytes).unwrap();
                write_frame(&mut writer, &frame).await.unwrap();
            }
        });
        let first = read_frame(&mut reader, MAX_FRAME_PAYLOAD).await.unwrap().unwrap();
        assert_eq!(RecordMsg::decode(&first).unwrap(), record);
        let second = read_frame(&mut reader, MAX_FRAME_PAYLOAD).await.unwrap().unwrap();
        assert_eq!(SyncRequestMsg::decode(&second).unwrap(), sync);
        let third = read_frame(&mut reader, MAX_JSON_PAYLOAD).await.unwrap().unwrap();
        assert_eq!(third.encode(), control);
        write.await.unwrap();
        assert!(read_frame(&mut reader, MAX_FRAME_PAYLOAD).await.unwrap().is_none(), "clean EOF");
    }

    #[tokio::test]
    async fn read_frame_reports_truncation() {
        let bytes = AckMsg { epoch: 1, durable_seq: 2, received_seq: 3, probe: 0 }.encode();
        let e = read_frame(&mut &bytes[..10], MAX_FRAME_PAYLOAD).await.unwrap_err();
        assert!(matches!(e, WireError::Truncated { what: "header", needed: 16, got: 10 }), "{e}");
        let e = read_frame(&mut &bytes[..30], MAX_FRAME_PAYLOAD).await.unwrap_err();
        assert!(matches!(e, WireError::Truncated { what: "payload", needed: 32, got: 14 }), "{e}");
        assert!(read_frame(&mut &b""[..], MAX_FRAME_PAYLOAD).await.unwrap().is_none());
    }

    fn arb_record() -> impl Strategy<Value = RecordMsg> {
        let data = proptest::collection::vec(any::<u8>(), 0..2048);
        (any::<u64>(), any::<u64>(), prop_oneof![Just(1u8), Just(2), Just(3), Just(5)], any::<u8>(), any::<u64>(), data)
            .prop_map(|(epoch, seq, kind, flags, offset, data)| {
                let (offset, length, payload) = match kind {
                    record_kind::WRITE => (offset / 2, data.len() as u64, data),
                    record_kind::SNAPSHOT => (0, 0, data),
                    _ => (offset / 2, offset / 2, Vec::new()),
                };
                RecordMsg { epoch, seq, kind, flags, offset, length, payload: payload.into() }
            })
    }

    fn arb_resync() -> impl Strategy<Value = ResyncDataMsg> {
        let data = proptest::collection::vec(any::<u8>(), 0..2048);
        (any::<u64>(), any::<u64>(), any::<u64>(), any::<bool>(), data).prop_map(
            |(epoch, read_seq, offset, zero, data)| {
                let length = if zero { offset / 4 } else { data.len() as u64 };
                let payload = if zero { Bytes::new() } else { data.into() };
                ResyncDataMsg { epoch, read_seq, offset: offset / 2, length, zero, payload }
            },
        )
    }

    fn arb_mark_request() -> impl Strategy<Value = MarkRequestMsg> {
        (any::<u64>(), any::<u64>(), "[a-z0-9:.é-]{1,64}").prop_map(|(epoch, id, name)| MarkRequestMsg {
            epoch,
            id,
            name,
        })
    }

    fn arb_mark_reply() -> impl Strategy<Value = MarkReplyMsg> {
        let outcome = prop_oneof![
            (1..u64::MAX).prop_map(|seq| MarkOutcome::Appended { seq }),
            ".{0,200}".prop_map(|reason| MarkOutcome::Refused { reason }),
        ];
        (any::<u64>(), any::<u64>(), outcome).prop_map(|(epoch, id, outcome)| MarkReplyMsg { epoch, id, outcome })
    }

    fn arb_mark_group_request() -> impl Strategy<Value = MarkGroupRequestMsg> {
        let members = proptest::collection::btree_set("[a-z0-9._-]{1,40}", GROUP_MEMBERS_MIN..=GROUP_MEMBERS_MAX);
        (any::<u64>(), any::<u64>(), "[a-z0-9:.é-]{1,64}", members).prop_map(|(epoch, id, name, members)| {
            MarkGroupRequestMsg { epoch, id, name, members: members.into_iter().collect() }
        })
    }

    fn arb_mark_group_reply() -> impl Strategy<Value = MarkGroupReplyMsg> {
        let outcome = prop_oneof![
            proptest::collection::vec(1..u64::MAX, GROUP_MEMBERS_MIN..=GROUP_MEMBERS_MAX)
                .prop_map(|seqs| MarkGroupOutcome::Appended { seqs }),
            ".{0,200}".prop_map(|reason| MarkGroupOutcome::Refused { reason }),
        ];
        (any::<u64>(), any::<u64>(), outcome).prop_map(|(epoch, id, outcome)| MarkGroupReplyMsg { epoch, id, outcome })
    }

    /// Valid frames of every binary type and one JSON frame.
    fn arb_frame_bytes() -> impl Strategy<Value = Bytes> {
        prop_oneof![
            arb_record().prop_map(|m| m.encode()),
            arb_resync().prop_map(|m| m.encode()),
            (any::<u64>(), any::<u64>()).prop_map(|(epoch, upto_seq)| SyncRequestMsg { epoch, upto_seq }.encode()),
            (any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>()).prop_map(
                |(epoch, durable_seq, received_seq, probe)| AckMsg { epoch, durable_seq, received_seq, probe }.encode()
            ),
            (any::<u64>(), any::<u64>()).prop_map(|(epoch, id)| ProbeMsg { epoch, id }.encode()),
            (any::<u64>(), any::<u64>()).prop_map(|(epoch, upto_seq)| ResyncEndMsg { epoch, upto_seq }.encode()),
            arb_mark_request().prop_map(|m| m.encode()),
            arb_mark_reply().prop_map(|m| m.encode()),
            arb_mark_group_request().prop_map(|m| m.encode()),
            arb_mark_group_reply().prop_map(|m| m.encode()),
            ".{0,64}".prop_map(|volume| encode_json(FrameType::Error, &Greeting { volume, epoch: 1 }).unwrap()),
        ]
    }

    proptest! {
        #[test]
        fn records_round_trip(msg in arb_record()) {
            let bytes = msg.encode();
            prop_assert_eq!(&msg.encode_chunks().concat()[..], &bytes[..]);
            let frame = decode_one(&bytes).unwrap();
            prop_assert_eq!(RecordMsg::decode(&frame).unwrap(), msg);
        }

        #[test]
        fn resync_blocks_round_trip(msg in arb_resync()) {
            let frame = decode_one(&msg.encode()).unwrap();
            prop_assert_eq!(ResyncDataMsg::decode(&frame).unwrap(), msg);
        }

        #[test]
        fn fixed_messages_round_trip(a in any::<u64>(), b in any::<u64>(), c in any::<u64>()) {
            let ack = AckMsg { epoch: a, durable_seq: b, received_seq: c, probe: 0 };
            prop_assert_eq!(AckMsg::decode(&decode_one(&ack.encode()).unwrap()).unwrap(), ack);
            let sync = SyncRequestMsg { epoch: a, upto_seq: b };
            prop_assert_eq!(SyncRequestMsg::decode(&decode_one(&sync.encode()).unwrap()).unwrap(), sync);
            let end = ResyncEndMsg { epoch: a, upto_seq: c };
            prop_assert_eq!(ResyncEndMsg::decode(&decode_one(&end.encode()).unwrap()).unwrap(), end);
        }

        #[test]
        fn mark_messages_round_trip(request in arb_mark_request(), reply in arb_mark_reply()) {
            prop_assert_eq!(MarkRequestMsg::decode(&decode_one(&request.encode()).unwrap()).unwrap(), request);
            prop_assert_eq!(MarkReplyMsg::decode(&decode_one(&reply.encode()).unwrap()).unwrap(), reply);
        }

        #[test]
        fn mark_group_messages_round_trip(request in arb_mark_group_request(), reply in arb_mark_group_reply()) {
            let frame = decode_one(&request.encode()).unwrap();
            prop_assert_eq!(MarkGroupRequestMsg::decode(&frame).unwrap(), request);
            prop_assert_eq!(MarkGroupReplyMsg::decode(&decode_one(&reply.encode()).unwrap()).unwrap(), reply);
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512), ty in 0..FrameType::ALL.len()) {
            let _ = decode_frame(&bytes, MAX_FRAME_PAYLOAD);
            decode_any(&Frame { ty: FrameType::ALL[ty], payload: bytes.clone().into() });
            // Random bytes behind a valid header reach the typed decoders too.
            let framed = Frame { ty: FrameType::ALL[ty], payload: bytes.into() }.encode();
            if let Ok(frame) = decode_one(&framed) {
                decode_any(&frame);
            }
        }

        #[test]
        fn any_corrupted_byte_is_detected(bytes in arb_frame_bytes(), at in any::<prop::sample::Index>(), flip in 1u8..) {
            let mut corrupt = bytes.to_vec();
            let at = at.index(corrupt.len());
            corrupt[at] ^= flip;
            match decode_frame(&corrupt, MAX_FRAME_PAYLOAD) {
                Err(_) => {}
                Ok((frame, _)) => prop_assert!(false, "corruption at byte {} not detected: {:?}", at, frame.ty),
            }
        }

        #[test]
        fn truncated_frames_are_detected(bytes in arb_frame_bytes(), at in any::<prop::sample::Index>()) {
            let cut = at.index(bytes.len());
            let is_truncated = matches!(decode_frame(&bytes[..cut], MAX_FRAME_PAYLOAD), Err(WireError::Truncated { .. }));
            prop_assert!(is_truncated);
        }
    }
}
