//! The `keel-vault/1` wire format (docs/format-vault.md): how a [`super::RemoteVault`]
//! and the `keel vault` server talk over mutual-TLS QUIC.
//!
//! One request per QUIC bidirectional stream: the client opens a stream, writes one
//! request frame and finishes its side; the server answers with one response frame and
//! finishes. The first stream of a connection carries [`Request::Hello`], which opens the
//! tenant every later stream of that connection works on.
//!
//! A frame is a 16-byte header (magic, version, kind, reserved, payload length, crc32)
//! and a payload whose layout depends on the kind. The layouts are defined once, by the
//! order of the `put_*`/[`Reader`] calls in [`Request::encode`]/[`Request::decode`] and
//! [`Response::encode`]/[`Response::decode`], and pinned by tests that build frames by
//! hand from the document.
//!
//! Reading checks, before allocating or parsing anything: a whole header, the magic, the
//! version, the kind (and that it travels in the expected direction), the reserved field,
//! the payload length against the kind's bounds; then, after reading exactly that many
//! bytes, the crc. Every decoder is total: any input gives a value or a [`WireError`].
//!
//! [`handle`] is the server's protocol logic for every request but `Hello`: it maps a
//! request onto a [`Vault`] and the outcome onto a response, and does no I/O of its own.

#![deny(clippy::indexing_slicing, clippy::unwrap_used, clippy::expect_used)]

use std::io;
use std::mem::size_of;

use bytes::{BufMut as _, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt as _};

use super::{keys, ChunkEntry, ObjectEntry, Put, Vault, VaultError};
use crate::key::ChunkId;

/// The QUIC ALPN of this protocol. An incompatible change gets a new one (`keel-vault/2`).
pub const ALPN: &[u8] = b"keel-vault/1";
/// First bytes of every frame.
pub const MAGIC: [u8; 4] = *b"KVLT";
/// The largest object [`Request::PutObject`] may carry.
pub const MAX_OBJECT_LEN: usize = 64 << 20;
/// The largest chunk frame: the largest plaintext, stored raw, plus the frame's overhead.
pub const MAX_CHUNK_FRAME_LEN: usize = crate::MAX_CHUNK_LEN + crate::OVERHEAD;
/// Most ids in one [`Request::HasChunks`].
pub const MAX_HAS_BATCH: usize = 1024;
/// Most entries one [`Request::ListChunks`] may ask for.
pub const MAX_LIST_CHUNKS: u32 = 10_000;
/// Largest payload of a [`Response::ObjectList`]: a listing that does not fit is refused
/// (ask for a narrower prefix).
pub const MAX_OBJECT_LIST_LEN: usize = 32 << 20;
/// Longest tenant name in a [`Request::Hello`].
pub const MAX_TENANT_LEN: usize = 64;
/// Longest message in a [`Response::Error`]; longer ones are cut.
pub const MAX_ERROR_MESSAGE_LEN: usize = 4096;

const MAGIC_LEN: usize = MAGIC.len();
const VERSION_OFFSET: usize = MAGIC_LEN;
const KIND_OFFSET: usize = VERSION_OFFSET + size_of::<u8>();
const RESERVED_OFFSET: usize = KIND_OFFSET + size_of::<u8>();
const LENGTH_OFFSET: usize = RESERVED_OFFSET + size_of::<u16>();
/// The crc covers the header up to here, then the payload.
const CRC_OFFSET: usize = LENGTH_OFFSET + size_of::<u32>();
/// Length of the frame header.
pub const HEADER_LEN: usize = CRC_OFFSET + size_of::<u32>();
const _: () = assert!(HEADER_LEN == 16);

const ID_LEN: usize = size_of::<ChunkId>();
const _: () = assert!(ID_LEN == 32);
/// `ListChunks`: flags, reserved, limit, after.
const LIST_CHUNKS_LEN: usize = size_of::<u8>() + 3 + size_of::<u32>() + ID_LEN;
const _: () = assert!(LIST_CHUNKS_LEN == 40);
/// `PutObject`: key_len before the key.
const KEY_LEN_LEN: usize = size_of::<u16>();
const _: () = assert!(keys::MAX_KEY_LEN <= u16::MAX as usize);
/// Entry counts of the list responses.
const COUNT_LEN: usize = size_of::<u32>();
/// One `ChunkList` entry: id, len, modified.
const CHUNK_ENTRY_LEN: usize = ID_LEN + size_of::<u64>() + size_of::<i64>();
const _: () = assert!(CHUNK_ENTRY_LEN == 48);
/// The fixed part of an `ObjectList` entry: key_len, len, modified (the key follows key_len).
const OBJECT_ENTRY_FIXED_LEN: usize = KEY_LEN_LEN + size_of::<u64>() + size_of::<i64>();
/// `Error`: code, reserved.
const ERROR_FIXED_LEN: usize = size_of::<u8>() + 3;
const _: () = assert!(ERROR_FIXED_LEN == 4);
/// The largest payload of any frame: a `PutObject` of the longest key and largest object.
pub const MAX_PAYLOAD: usize = KEY_LEN_LEN + keys::MAX_KEY_LEN + MAX_OBJECT_LEN;
const _: () = assert!(MAX_PAYLOAD <= u32::MAX as usize);
const _: () = assert!(ID_LEN + MAX_CHUNK_FRAME_LEN <= MAX_PAYLOAD);
const _: () = assert!(MAX_OBJECT_LIST_LEN <= MAX_PAYLOAD);
const _: () = assert!(COUNT_LEN + CHUNK_ENTRY_LEN * MAX_LIST_CHUNKS as usize <= MAX_PAYLOAD);

/// Format versions of the frame header and payloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Version {
    /// The first version.
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

/// Which way a frame travels: requests go client → server, responses come back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Client → server (kinds `0x01`–`0x7f`).
    Request,
    /// Server → client (kinds `0x80`–`0xff`).
    Response,
}

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// [`Request::Hello`].
    Hello = 0x01,
    /// [`Request::PutChunk`].
    PutChunk = 0x02,
    /// [`Request::GetChunk`].
    GetChunk = 0x03,
    /// [`Request::HasChunks`].
    HasChunks = 0x04,
    /// [`Request::DeleteChunk`].
    DeleteChunk = 0x05,
    /// [`Request::ListChunks`].
    ListChunks = 0x06,
    /// [`Request::PutObject`].
    PutObject = 0x07,
    /// [`Request::GetObject`].
    GetObject = 0x08,
    /// [`Request::DeleteObject`].
    DeleteObject = 0x09,
    /// [`Request::ListObjects`].
    ListObjects = 0x0a,
    /// [`Response::HelloOk`].
    HelloOk = 0x81,
    /// [`Response::Stored`].
    Stored = 0x82,
    /// [`Response::Chunk`].
    Chunk = 0x83,
    /// [`Response::Present`].
    Present = 0x84,
    /// [`Response::Deleted`].
    Deleted = 0x85,
    /// [`Response::ChunkList`].
    ChunkList = 0x86,
    /// [`Response::ObjectStored`].
    ObjectStored = 0x87,
    /// [`Response::Object`].
    Object = 0x88,
    /// [`Response::ObjectList`].
    ObjectList = 0x89,
    /// [`Response::Error`].
    Error = 0xff,
}

impl Kind {
    /// Every kind, for decoding and tests.
    pub const ALL: [Self; 20] = [
        Self::Hello,
        Self::PutChunk,
        Self::GetChunk,
        Self::HasChunks,
        Self::DeleteChunk,
        Self::ListChunks,
        Self::PutObject,
        Self::GetObject,
        Self::DeleteObject,
        Self::ListObjects,
        Self::HelloOk,
        Self::Stored,
        Self::Chunk,
        Self::Present,
        Self::Deleted,
        Self::ChunkList,
        Self::ObjectStored,
        Self::Object,
        Self::ObjectList,
        Self::Error,
    ];

    /// The kind with this wire value.
    pub fn from_u8(value: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| *kind as u8 == value)
    }

    /// Which way frames of this kind travel.
    pub fn direction(self) -> Direction {
        if (self as u8) < 0x80 {
            Direction::Request
        } else {
            Direction::Response
        }
    }

    /// Smallest and largest payload length of this kind.
    pub fn payload_bounds(self) -> (usize, usize) {
        match self {
            Self::Hello => (1, MAX_TENANT_LEN),
            Self::PutChunk => (ID_LEN + crate::OVERHEAD, ID_LEN + MAX_CHUNK_FRAME_LEN),
            Self::GetChunk | Self::DeleteChunk => (ID_LEN, ID_LEN),
            Self::HasChunks => (ID_LEN, ID_LEN * MAX_HAS_BATCH),
            Self::ListChunks => (LIST_CHUNKS_LEN, LIST_CHUNKS_LEN),
            Self::PutObject => (KEY_LEN_LEN + 1, MAX_PAYLOAD),
            Self::GetObject | Self::DeleteObject => (1, keys::MAX_KEY_LEN),
            Self::ListObjects => (0, keys::MAX_KEY_LEN),
            Self::HelloOk | Self::ObjectStored => (0, 0),
            Self::Stored | Self::Deleted => (1, 1),
            Self::Chunk => (crate::OVERHEAD, MAX_CHUNK_FRAME_LEN),
            Self::Present => (1, MAX_HAS_BATCH),
            Self::ChunkList => (COUNT_LEN, COUNT_LEN + CHUNK_ENTRY_LEN * MAX_LIST_CHUNKS as usize),
            Self::Object => (0, MAX_OBJECT_LEN),
            Self::ObjectList => (COUNT_LEN, MAX_OBJECT_LIST_LEN),
            Self::Error => (ERROR_FIXED_LEN, ERROR_FIXED_LEN + MAX_ERROR_MESSAGE_LEN),
        }
    }

    /// The response kind that answers a request of this kind (a response kind answers
    /// itself). Any request may also be answered with [`Kind::Error`].
    pub fn answer(self) -> Kind {
        match self {
            Self::Hello => Self::HelloOk,
            Self::PutChunk => Self::Stored,
            Self::GetChunk => Self::Chunk,
            Self::HasChunks => Self::Present,
            Self::DeleteChunk | Self::DeleteObject => Self::Deleted,
            Self::ListChunks => Self::ChunkList,
            Self::PutObject => Self::ObjectStored,
            Self::GetObject => Self::Object,
            Self::ListObjects => Self::ObjectList,
            response => response,
        }
    }

    /// The largest response payload a request of this kind can get (for memory budgets).
    pub fn response_bound(self) -> usize {
        self.answer().payload_bounds().1.max(Self::Error.payload_bounds().1)
    }
}

/// Why the server answered with an error ([`Response::Error`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ErrorCode {
    /// The chunk or object does not exist.
    NotFound = 1,
    /// Not allowed: wrong tenant, no `Hello` yet, a listing too large. Retrying will not help.
    Refused = 2,
    /// The chunk frame offered is not valid.
    BadChunk = 3,
    /// The object key is not valid.
    BadKey = 4,
    /// The server cannot serve now (shutting down, overloaded); retry later.
    Unavailable = 5,
    /// The server's storage failed (I/O error, poisoned store).
    Storage = 6,
    /// The request frame was malformed; the stream is abandoned.
    BadRequest = 7,
}

impl ErrorCode {
    const ALL: [Self; 7] = [
        Self::NotFound,
        Self::Refused,
        Self::BadChunk,
        Self::BadKey,
        Self::Unavailable,
        Self::Storage,
        Self::BadRequest,
    ];

    fn from_u8(value: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|code| *code as u8 == value)
    }
}

/// A request, client → server. Each mirrors one [`Vault`] method.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Open `tenant` for this connection (the first stream of every connection).
    Hello {
        /// The tenant's name.
        tenant: String,
    },
    /// [`Vault::put_chunk`].
    PutChunk {
        /// The chunk's id.
        id: ChunkId,
        /// Its encoded frame.
        frame: Bytes,
    },
    /// [`Vault::get_chunk`].
    GetChunk {
        /// The chunk's id.
        id: ChunkId,
    },
    /// [`Vault::has_chunks`] for up to [`MAX_HAS_BATCH`] ids.
    HasChunks {
        /// The ids, at least one.
        ids: Vec<ChunkId>,
    },
    /// [`Vault::delete_chunk`].
    DeleteChunk {
        /// The chunk's id.
        id: ChunkId,
    },
    /// [`Vault::list_chunks`].
    ListChunks {
        /// List ids strictly after this one.
        after: Option<ChunkId>,
        /// At most this many entries (≤ [`MAX_LIST_CHUNKS`]).
        limit: u32,
    },
    /// [`Vault::put_object`].
    PutObject {
        /// The key.
        key: String,
        /// The bytes (≤ [`MAX_OBJECT_LEN`]).
        bytes: Bytes,
    },
    /// [`Vault::get_object`].
    GetObject {
        /// The key.
        key: String,
    },
    /// [`Vault::delete_object`].
    DeleteObject {
        /// The key.
        key: String,
    },
    /// [`Vault::list_objects`].
    ListObjects {
        /// The prefix (may be empty).
        prefix: String,
    },
}

/// A response, server → client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// The tenant is open.
    HelloOk,
    /// The answer to `PutChunk`.
    Stored(Put),
    /// The answer to `GetChunk`: the frame.
    Chunk(Bytes),
    /// The answer to `HasChunks`: one flag per id, in order.
    Present(Vec<bool>),
    /// The answer to `DeleteChunk` and `DeleteObject`: whether it was there.
    Deleted(bool),
    /// The answer to `ListChunks`.
    ChunkList(Vec<ChunkEntry>),
    /// The answer to `PutObject`.
    ObjectStored,
    /// The answer to `GetObject`: the bytes.
    Object(Bytes),
    /// The answer to `ListObjects`.
    ObjectList(Vec<ObjectEntry>),
    /// The request failed.
    Error {
        /// Why.
        code: ErrorCode,
        /// A message for people (UTF-8, ≤ [`MAX_ERROR_MESSAGE_LEN`] bytes).
        message: String,
    },
}

/// Everything wrong a frame can be.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The first four bytes are not `KVLT`.
    #[error("bad frame magic {got:02x?} (expected \"KVLT\"): not a Keel vault stream")]
    BadMagic {
        /// The bytes received.
        got: [u8; 4],
    },
    /// A version this build does not speak.
    #[error("unsupported frame version {got} (this build speaks version {})", Version::CURRENT as u8)]
    UnsupportedVersion {
        /// The version received.
        got: u8,
    },
    /// An unknown kind byte.
    #[error("unknown frame kind {got:#04x}")]
    UnknownKind {
        /// The kind byte received.
        got: u8,
    },
    /// A response where a request was expected, or the other way round.
    #[error("{kind:?} frame travelling the wrong way (expected a {expected:?})")]
    WrongDirection {
        /// The kind received.
        kind: Kind,
        /// What the reader expected.
        expected: Direction,
    },
    /// The reserved header field is not zero.
    #[error("{kind:?} frame: reserved header field is {got:#06x}, must be 0")]
    Reserved {
        /// The kind.
        kind: Kind,
        /// The value received.
        got: u16,
    },
    /// The payload length is above the kind's maximum.
    #[error("{kind:?} frame: payload of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// The kind.
        kind: Kind,
        /// The length in the header.
        len: u64,
        /// The largest accepted length.
        max: u64,
    },
    /// The payload length is below the kind's minimum, or a field runs past the end.
    #[error("{kind:?} frame: payload of {len} bytes is shorter than the {min} its layout needs")]
    TooShort {
        /// The kind.
        kind: Kind,
        /// The payload length.
        len: u64,
        /// The smallest valid length.
        min: u64,
    },
    /// The crc over the header and payload does not match the header's.
    #[error("{kind:?} frame: crc mismatch (expected {expected:#010x} from the header, got {got:#010x})")]
    CrcMismatch {
        /// The kind.
        kind: Kind,
        /// The crc in the header.
        expected: u32,
        /// The crc computed over what arrived.
        got: u32,
    },
    /// The input ended inside a frame.
    #[error("truncated frame: {what} needs {needed} bytes, got {got}")]
    Truncated {
        /// "header" or "payload".
        what: &'static str,
        /// Bytes needed.
        needed: u64,
        /// Bytes available.
        got: u64,
    },
    /// A well-framed payload with an invalid field.
    #[error("{kind:?} frame: bad {field}: {reason}")]
    BadField {
        /// The kind.
        kind: Kind,
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// Reading the stream failed.
    #[error("failed to {context}: {error}")]
    Io {
        /// What was being done ("read frame header").
        context: &'static str,
        /// The underlying error.
        error: io::Error,
    },
}

/// A checked frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// What the payload is.
    pub kind: Kind,
    /// Bytes of payload after the header, within the kind's bounds.
    pub payload_len: usize,
    crc: u32,
    bytes: [u8; HEADER_LEN],
}

impl Request {
    /// The request's kind.
    pub fn kind(&self) -> Kind {
        match self {
            Self::Hello { .. } => Kind::Hello,
            Self::PutChunk { .. } => Kind::PutChunk,
            Self::GetChunk { .. } => Kind::GetChunk,
            Self::HasChunks { .. } => Kind::HasChunks,
            Self::DeleteChunk { .. } => Kind::DeleteChunk,
            Self::ListChunks { .. } => Kind::ListChunks,
            Self::PutObject { .. } => Kind::PutObject,
            Self::GetObject { .. } => Kind::GetObject,
            Self::DeleteObject { .. } => Kind::DeleteObject,
            Self::ListObjects { .. } => Kind::ListObjects,
        }
    }

    /// The whole frame, or [`WireError::TooLarge`]/[`WireError::BadField`] if a field is
    /// outside its bounds (the sender checks what the receiver will check).
    pub fn encode(&self) -> Result<Bytes, WireError> {
        let kind = self.kind();
        let mut p = BytesMut::new();
        match self {
            Self::Hello { tenant } => p.put_slice(tenant.as_bytes()),
            Self::PutChunk { id, frame } => {
                p.reserve(ID_LEN + frame.len());
                p.put_slice(id.as_bytes());
                p.put_slice(frame);
            }
            Self::GetChunk { id } | Self::DeleteChunk { id } => p.put_slice(id.as_bytes()),
            Self::HasChunks { ids } => {
                for id in ids {
                    p.put_slice(id.as_bytes());
                }
            }
            Self::ListChunks { after, limit } => {
                if *limit > MAX_LIST_CHUNKS {
                    return Err(bad_field(kind, "limit", format!("{limit}, at most {MAX_LIST_CHUNKS}")));
                }
                p.put_u8(u8::from(after.is_some()));
                p.put_bytes(0, 3);
                p.put_u32_le(*limit);
                p.put_slice(after.map_or([0; ID_LEN], |id| id.0).as_slice());
            }
            Self::PutObject { key, bytes } => {
                if bytes.len() > MAX_OBJECT_LEN {
                    return Err(WireError::TooLarge { kind, len: bytes.len() as u64, max: MAX_OBJECT_LEN as u64 });
                }
                let key_len = check_key_len(kind, key, 1)?;
                p.reserve(KEY_LEN_LEN + key.len() + bytes.len());
                p.put_u16_le(key_len);
                p.put_slice(key.as_bytes());
                p.put_slice(bytes);
            }
            Self::GetObject { key } | Self::DeleteObject { key } => {
                check_key_len(kind, key, 1)?;
                p.put_slice(key.as_bytes());
            }
            Self::ListObjects { prefix } => {
                check_key_len(kind, prefix, 0)?;
                p.put_slice(prefix.as_bytes());
            }
        }
        frame(kind, p.freeze())
    }

    /// Decodes the payload of a request frame of kind `kind` (its header already checked).
    pub fn decode(kind: Kind, payload: Bytes) -> Result<Self, WireError> {
        let mut r = Reader::new(kind, payload);
        let request = match kind {
            Kind::Hello => Self::Hello { tenant: r.rest_utf8("tenant")? },
            Kind::PutChunk => Self::PutChunk { id: r.id()?, frame: r.rest() },
            Kind::GetChunk => Self::GetChunk { id: r.finish_with(Reader::id)? },
            Kind::DeleteChunk => Self::DeleteChunk { id: r.finish_with(Reader::id)? },
            Kind::HasChunks => {
                let count = r.remaining() / ID_LEN;
                if r.remaining() % ID_LEN != 0 {
                    return Err(bad_field(
                        kind,
                        "ids",
                        format!("{} bytes is not a whole number of ids", r.remaining()),
                    ));
                }
                let ids = (0..count).map(|_| r.id()).collect::<Result<_, _>>()?;
                r.finish()?;
                Self::HasChunks { ids }
            }
            Kind::ListChunks => {
                let flags = r.u8()?;
                let reserved: [u8; 3] = r.array()?;
                let limit = r.u32()?;
                let after = r.id()?;
                r.finish()?;
                if reserved != [0; 3] {
                    return Err(bad_field(kind, "reserved", format!("{reserved:02x?}, must be zeros")));
                }
                if limit > MAX_LIST_CHUNKS {
                    return Err(bad_field(kind, "limit", format!("{limit}, at most {MAX_LIST_CHUNKS}")));
                }
                let after = match flags {
                    0 if after.0 == [0; ID_LEN] => None,
                    0 => return Err(bad_field(kind, "after", "not zeros while flag 0 says absent".into())),
                    1 => Some(after),
                    other => return Err(bad_field(kind, "flags", format!("{other:#04x}, must be 0 or 1"))),
                };
                Self::ListChunks { after, limit }
            }
            Kind::PutObject => {
                let key_len = usize::from(r.u16()?);
                if key_len == 0 || key_len > keys::MAX_KEY_LEN {
                    return Err(bad_field(kind, "key_len", format!("{key_len}, must be 1..={}", keys::MAX_KEY_LEN)));
                }
                let key = r.utf8(key_len, "key")?;
                let bytes = r.rest();
                if bytes.len() > MAX_OBJECT_LEN {
                    return Err(WireError::TooLarge { kind, len: bytes.len() as u64, max: MAX_OBJECT_LEN as u64 });
                }
                Self::PutObject { key, bytes }
            }
            Kind::GetObject => Self::GetObject { key: r.rest_utf8("key")? },
            Kind::DeleteObject => Self::DeleteObject { key: r.rest_utf8("key")? },
            Kind::ListObjects => Self::ListObjects { prefix: r.rest_utf8("prefix")? },
            _ => return Err(WireError::WrongDirection { kind, expected: Direction::Request }),
        };
        check_bounds(kind, r.len)?;
        Ok(request)
    }
}

impl Response {
    /// The response's kind.
    pub fn kind(&self) -> Kind {
        match self {
            Self::HelloOk => Kind::HelloOk,
            Self::Stored(_) => Kind::Stored,
            Self::Chunk(_) => Kind::Chunk,
            Self::Present(_) => Kind::Present,
            Self::Deleted(_) => Kind::Deleted,
            Self::ChunkList(_) => Kind::ChunkList,
            Self::ObjectStored => Kind::ObjectStored,
            Self::Object(_) => Kind::Object,
            Self::ObjectList(_) => Kind::ObjectList,
            Self::Error { .. } => Kind::Error,
        }
    }

    /// An error response; `message` is cut to [`MAX_ERROR_MESSAGE_LEN`] bytes.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        let mut message = message.into();
        if message.len() > MAX_ERROR_MESSAGE_LEN {
            let mut end = MAX_ERROR_MESSAGE_LEN;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
        }
        Self::Error { code, message }
    }

    /// The whole frame, or [`WireError::TooLarge`] if it exceeds its kind's bounds (a
    /// listing too long for one frame, an object too large).
    pub fn encode(&self) -> Result<Bytes, WireError> {
        let kind = self.kind();
        let mut p = BytesMut::new();
        match self {
            Self::HelloOk | Self::ObjectStored => {}
            Self::Stored(put) => p.put_u8(match put {
                Put::Written => 0,
                Put::AlreadyPresent => 1,
            }),
            Self::Chunk(bytes) | Self::Object(bytes) => p.put_slice(bytes),
            Self::Present(flags) => p.extend(flags.iter().map(|&present| u8::from(present))),
            Self::Deleted(deleted) => p.put_u8(u8::from(*deleted)),
            Self::ChunkList(entries) => {
                p.put_u32_le(count(kind, entries.len())?);
                for entry in entries {
                    p.put_slice(entry.id.as_bytes());
                    p.put_u64_le(entry.len);
                    p.put_i64_le(entry.modified);
                }
            }
            Self::ObjectList(entries) => {
                p.put_u32_le(count(kind, entries.len())?);
                for entry in entries {
                    p.put_u16_le(check_key_len(kind, &entry.key, 1)?);
                    p.put_slice(entry.key.as_bytes());
                    p.put_u64_le(entry.len);
                    p.put_i64_le(entry.modified);
                    // Stop early rather than build a huge buffer only to refuse it.
                    check_bounds(kind, p.len())?;
                }
            }
            Self::Error { code, message } => {
                p.put_u8(*code as u8);
                p.put_bytes(0, 3);
                p.put_slice(message.as_bytes());
            }
        }
        frame(kind, p.freeze())
    }

    /// Decodes the payload of a response frame of kind `kind` (its header already checked).
    pub fn decode(kind: Kind, payload: Bytes) -> Result<Self, WireError> {
        let mut r = Reader::new(kind, payload);
        let flag = |value: u8, field| match value {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(bad_field(kind, field, format!("{other}, must be 0 or 1"))),
        };
        let response = match kind {
            Kind::HelloOk => r.finish_with(|_| Ok(Self::HelloOk))?,
            Kind::ObjectStored => r.finish_with(|_| Ok(Self::ObjectStored))?,
            Kind::Stored => {
                let put = if flag(r.finish_with(Reader::u8)?, "outcome")? { Put::AlreadyPresent } else { Put::Written };
                Self::Stored(put)
            }
            Kind::Chunk => Self::Chunk(r.rest()),
            Kind::Object => Self::Object(r.rest()),
            Kind::Present => Self::Present(r.rest().iter().map(|&b| flag(b, "present")).collect::<Result<_, _>>()?),
            Kind::Deleted => Self::Deleted(flag(r.finish_with(Reader::u8)?, "deleted")?),
            Kind::ChunkList => {
                let count = r.u32()? as usize;
                let needed = count.checked_mul(CHUNK_ENTRY_LEN).and_then(|n| n.checked_add(COUNT_LEN));
                if needed != Some(r.len) {
                    return Err(bad_field(kind, "count", format!("{count} entries do not fill {} bytes", r.len)));
                }
                let mut entries = Vec::with_capacity(count);
                for _ in 0..count {
                    entries.push(ChunkEntry { id: r.id()?, len: r.u64()?, modified: r.i64()? });
                }
                r.finish()?;
                Self::ChunkList(entries)
            }
            Kind::ObjectList => {
                let count = r.u32()? as usize;
                // Each entry takes at least its fixed part and one key byte: bound the
                // allocation by what the payload can hold, not by the count it claims.
                if count > r.remaining() / (OBJECT_ENTRY_FIXED_LEN + 1) {
                    return Err(bad_field(kind, "count", format!("{count} entries cannot fit in {} bytes", r.len)));
                }
                let mut entries = Vec::with_capacity(count);
                for _ in 0..count {
                    let key_len = usize::from(r.u16()?);
                    if key_len == 0 || key_len > keys::MAX_KEY_LEN {
                        return Err(bad_field(
                            kind,
                            "key_len",
                            format!("{key_len}, must be 1..={}", keys::MAX_KEY_LEN),
                        ));
                    }
                    let key = r.utf8(key_len, "key")?;
                    entries.push(ObjectEntry { key, len: r.u64()?, modified: r.i64()? });
                }
                r.finish()?;
                Self::ObjectList(entries)
            }
            Kind::Error => {
                let code = r.u8()?;
                let reserved: [u8; 3] = r.array()?;
                if reserved != [0; 3] {
                    return Err(bad_field(kind, "reserved", format!("{reserved:02x?}, must be zeros")));
                }
                let code =
                    ErrorCode::from_u8(code).ok_or_else(|| bad_field(kind, "code", format!("unknown code {code}")))?;
                Self::Error { code, message: r.rest_utf8("message")? }
            }
            _ => return Err(WireError::WrongDirection { kind, expected: Direction::Response }),
        };
        check_bounds(kind, r.len)?;
        Ok(response)
    }
}

/// Checks a frame header (everything but the crc, which needs the payload): magic,
/// version, kind, direction, reserved field, payload length against the kind's bounds.
pub fn decode_header(bytes: &[u8; HEADER_LEN], expected: Direction) -> Result<Header, WireError> {
    let truncated = || WireError::Truncated { what: "header", needed: HEADER_LEN as u64, got: HEADER_LEN as u64 };
    let (magic, rest) = bytes.split_first_chunk::<MAGIC_LEN>().ok_or_else(truncated)?;
    if *magic != MAGIC {
        return Err(WireError::BadMagic { got: *magic });
    }
    let (&[version, kind], rest) = rest.split_first_chunk::<2>().ok_or_else(truncated)?;
    if Version::from_u8(version).is_none() {
        return Err(WireError::UnsupportedVersion { got: version });
    }
    let kind = Kind::from_u8(kind).ok_or(WireError::UnknownKind { got: kind })?;
    if kind.direction() != expected {
        return Err(WireError::WrongDirection { kind, expected });
    }
    let (reserved, rest) = rest.split_first_chunk::<2>().ok_or_else(truncated)?;
    let reserved = u16::from_le_bytes(*reserved);
    if reserved != 0 {
        return Err(WireError::Reserved { kind, got: reserved });
    }
    let (len, rest) = rest.split_first_chunk::<4>().ok_or_else(truncated)?;
    let (crc, _) = rest.split_first_chunk::<4>().ok_or_else(truncated)?;
    let payload_len = u32::from_le_bytes(*len) as usize;
    check_bounds(kind, payload_len)?;
    Ok(Header { kind, payload_len, crc: u32::from_le_bytes(*crc), bytes: *bytes })
}

/// Checks `payload` against the crc in `header`.
pub fn check_crc(header: &Header, payload: &[u8]) -> Result<(), WireError> {
    let (covered, _) = header.bytes.split_at(CRC_OFFSET);
    let mut crc = crc32fast::Hasher::new();
    crc.update(covered);
    crc.update(payload);
    let got = crc.finalize();
    if got != header.crc {
        return Err(WireError::CrcMismatch { kind: header.kind, expected: header.crc, got });
    }
    Ok(())
}

/// Decodes the first frame in `bytes`: its checked header and payload, and the number of
/// bytes it took.
pub fn decode_frame(bytes: &[u8], expected: Direction) -> Result<(Header, Bytes, usize), WireError> {
    let header: &[u8; HEADER_LEN] = bytes.first_chunk().ok_or(WireError::Truncated {
        what: "header",
        needed: HEADER_LEN as u64,
        got: bytes.len() as u64,
    })?;
    let header = decode_header(header, expected)?;
    let end = HEADER_LEN + header.payload_len;
    let payload = bytes.get(HEADER_LEN..end).ok_or(WireError::Truncated {
        what: "payload",
        needed: header.payload_len as u64,
        got: bytes.len().saturating_sub(HEADER_LEN) as u64,
    })?;
    check_crc(&header, payload)?;
    Ok((header, Bytes::copy_from_slice(payload), end))
}

/// Reads and checks a frame header. Cancel-safety: none (a partly read header is lost).
pub async fn read_header<R: AsyncRead + Unpin>(r: &mut R, expected: Direction) -> Result<Header, WireError> {
    let mut bytes = [0u8; HEADER_LEN];
    let got = read_full(r, &mut bytes).await.map_err(|error| WireError::Io { context: "read frame header", error })?;
    if got < HEADER_LEN {
        return Err(WireError::Truncated { what: "header", needed: HEADER_LEN as u64, got: got as u64 });
    }
    decode_header(&bytes, expected)
}

/// Reads exactly the payload `header` announces and checks its crc. Allocates
/// `header.payload_len` bytes, which [`decode_header`] bounded. Not cancel-safe.
pub async fn read_payload<R: AsyncRead + Unpin>(r: &mut R, header: &Header) -> Result<Bytes, WireError> {
    let mut payload = BytesMut::zeroed(header.payload_len);
    let got =
        read_full(r, &mut payload).await.map_err(|error| WireError::Io { context: "read frame payload", error })?;
    if got < header.payload_len {
        return Err(WireError::Truncated { what: "payload", needed: header.payload_len as u64, got: got as u64 });
    }
    check_crc(header, &payload)?;
    Ok(payload.freeze())
}

/// What the server does with a request once the connection's tenant is open: calls the
/// vault and turns the outcome into a response. Blocking (it calls the [`Vault`]).
/// `Hello` is the connection's business and is answered with a `Refused` error here.
pub fn handle(vault: &dyn Vault, request: Request) -> Response {
    let outcome = match request {
        Request::Hello { .. } => {
            return Response::error(ErrorCode::Refused, "this connection already opened its tenant");
        }
        Request::PutChunk { id, frame } => vault.put_chunk(&id, &frame).map(Response::Stored),
        Request::GetChunk { id } => vault.get_chunk(&id).map(|frame| Response::Chunk(frame.into())),
        Request::HasChunks { ids } => vault.has_chunks(&ids).map(Response::Present),
        Request::DeleteChunk { id } => vault.delete_chunk(&id).map(Response::Deleted),
        Request::ListChunks { after, limit } => {
            vault.list_chunks(after.as_ref(), limit as usize).map(Response::ChunkList)
        }
        Request::PutObject { key, bytes } => vault.put_object(&key, &bytes).map(|()| Response::ObjectStored),
        Request::GetObject { key } => vault.get_object(&key).map(|bytes| Response::Object(bytes.into())),
        Request::DeleteObject { key } => vault.delete_object(&key).map(Response::Deleted),
        Request::ListObjects { prefix } => vault.list_objects(&prefix).map(Response::ObjectList),
    };
    outcome.unwrap_or_else(|e| error_response(&e))
}

/// The response that reports `error` to a client.
pub fn error_response(error: &VaultError) -> Response {
    let code = match error {
        VaultError::NotFound { .. } => ErrorCode::NotFound,
        VaultError::Refused { .. } => ErrorCode::Refused,
        VaultError::Unavailable { .. } => ErrorCode::Unavailable,
        VaultError::BadChunk { .. } => ErrorCode::BadChunk,
        VaultError::BadKey { .. } => ErrorCode::BadKey,
        _ => ErrorCode::Storage,
    };
    Response::error(code, error.to_string())
}

/// Feeds arbitrary bytes to every decoder (feature `fuzzing`, for the `vault_frame`
/// cargo-fuzz target): a panic is a bug. Frames that decode must re-encode to the same
/// bytes.
#[cfg(feature = "fuzzing")]
pub fn fuzz_decode(bytes: &[u8]) {
    for direction in [Direction::Request, Direction::Response] {
        if let Ok((header, payload, used)) = decode_frame(bytes, direction) {
            let frame = bytes.get(..used).unwrap_or_default();
            let reencoded = match direction {
                Direction::Request => Request::decode(header.kind, payload).ok().map(|r| r.encode()),
                Direction::Response => Response::decode(header.kind, payload).ok().map(|r| r.encode()),
            };
            if let Some(reencoded) = reencoded {
                let reencoded = reencoded.ok();
                assert_eq!(reencoded.as_deref(), Some(frame), "{:?} frame does not re-encode to itself", header.kind);
            }
        }
    }
    // Also every payload decoder on bytes that skipped the header checks.
    for kind in Kind::ALL {
        let payload = Bytes::copy_from_slice(bytes);
        let _ = match kind.direction() {
            Direction::Request => Request::decode(kind, payload).map(|_| ()),
            Direction::Response => Response::decode(kind, payload).map(|_| ()),
        };
    }
}

/// Header plus payload, checking the payload against the kind's bounds.
fn frame(kind: Kind, payload: Bytes) -> Result<Bytes, WireError> {
    check_bounds(kind, payload.len())?;
    let mut out = BytesMut::with_capacity(HEADER_LEN + payload.len());
    out.put_slice(&MAGIC);
    out.put_u8(Version::CURRENT as u8);
    out.put_u8(kind as u8);
    out.put_u16_le(0);
    // Fits: check_bounds keeps it under MAX_PAYLOAD, asserted below u32::MAX.
    out.put_u32_le(payload.len() as u32);
    debug_assert_eq!(out.len(), CRC_OFFSET);
    let mut crc = crc32fast::Hasher::new();
    crc.update(&out);
    crc.update(&payload);
    out.put_u32_le(crc.finalize());
    out.put_slice(&payload);
    Ok(out.freeze())
}

fn check_bounds(kind: Kind, len: usize) -> Result<(), WireError> {
    let (min, max) = kind.payload_bounds();
    if len > max {
        return Err(WireError::TooLarge { kind, len: len as u64, max: max as u64 });
    }
    if len < min {
        return Err(WireError::TooShort { kind, len: len as u64, min: min as u64 });
    }
    Ok(())
}

fn check_key_len(kind: Kind, key: &str, min: usize) -> Result<u16, WireError> {
    if key.len() < min || key.len() > keys::MAX_KEY_LEN {
        return Err(bad_field(kind, "key", format!("{} bytes, must be {min}..={}", key.len(), keys::MAX_KEY_LEN)));
    }
    // Fits: MAX_KEY_LEN <= u16::MAX, asserted above.
    Ok(key.len() as u16)
}

fn count(kind: Kind, len: usize) -> Result<u32, WireError> {
    u32::try_from(len).map_err(|_| WireError::TooLarge { kind, len: len as u64, max: u64::from(u32::MAX) })
}

fn bad_field(kind: Kind, field: &'static str, reason: String) -> WireError {
    WireError::BadField { kind, field, reason }
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

/// Little-endian fields off a payload, in layout order; total.
struct Reader {
    kind: Kind,
    payload: Bytes,
    len: usize,
    pos: usize,
}

impl Reader {
    fn new(kind: Kind, payload: Bytes) -> Self {
        Self { kind, len: payload.len(), payload, pos: 0 }
    }

    fn remaining(&self) -> usize {
        self.len.saturating_sub(self.pos)
    }

    fn take(&mut self, n: usize) -> Result<Bytes, WireError> {
        if self.remaining() < n {
            return Err(WireError::TooShort { kind: self.kind, len: self.len as u64, min: (self.pos + n) as u64 });
        }
        let bytes = self.payload.slice(self.pos..self.pos + n);
        self.pos += n;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let bytes = self.take(N)?;
        let array: &[u8; N] = bytes.as_ref().try_into().map_err(|_| WireError::TooShort {
            kind: self.kind,
            len: self.len as u64,
            min: (self.pos + N) as u64,
        })?;
        Ok(*array)
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

    fn i64(&mut self) -> Result<i64, WireError> {
        Ok(i64::from_le_bytes(self.array()?))
    }

    fn id(&mut self) -> Result<ChunkId, WireError> {
        Ok(ChunkId(self.array()?))
    }

    fn utf8(&mut self, n: usize, field: &'static str) -> Result<String, WireError> {
        let bytes = self.take(n)?;
        String::from_utf8(bytes.to_vec()).map_err(|e| bad_field(self.kind, field, format!("not UTF-8: {e}")))
    }

    /// The bytes after the fields read so far, shared with the payload.
    fn rest(&mut self) -> Bytes {
        let rest = self.payload.slice(self.pos.min(self.len)..);
        self.pos = self.len;
        rest
    }

    fn rest_utf8(&mut self, field: &'static str) -> Result<String, WireError> {
        let n = self.remaining();
        self.utf8(n, field)
    }

    /// Errors if bytes follow the fields read.
    fn finish(&self) -> Result<(), WireError> {
        if self.remaining() != 0 {
            return Err(WireError::TooLarge { kind: self.kind, len: self.len as u64, max: self.pos as u64 });
        }
        Ok(())
    }

    /// Reads one field with `read`, then [`Reader::finish`].
    fn finish_with<T>(&mut self, read: impl FnOnce(&mut Self) -> Result<T, WireError>) -> Result<T, WireError> {
        let value = read(self)?;
        self.finish()?;
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::indexing_slicing, clippy::unwrap_used, clippy::expect_used)]

    use proptest::prelude::*;

    use super::*;
    use crate::{encode_chunk, TenantKey};

    /// A frame built by hand from docs/format-vault.md, independently of the encoder.
    fn hand_frame(kind: u8, payload: &[u8]) -> Vec<u8> {
        let mut frame = b"KVLT".to_vec();
        frame.extend_from_slice(&[1, kind, 0, 0]);
        frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        let mut crc = crc32fast::Hasher::new();
        crc.update(&frame);
        crc.update(payload);
        frame.extend_from_slice(&crc.finalize().to_le_bytes());
        frame.extend_from_slice(payload);
        frame
    }

    fn request_round_trip(request: &Request) {
        let bytes = request.encode().unwrap();
        let (header, payload, used) = decode_frame(&bytes, Direction::Request).unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!(&Request::decode(header.kind, payload).unwrap(), request);
    }

    fn response_round_trip(response: &Response) {
        let bytes = response.encode().unwrap();
        let (header, payload, used) = decode_frame(&bytes, Direction::Response).unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!(&Response::decode(header.kind, payload).unwrap(), response);
    }

    fn id(byte: u8) -> ChunkId {
        ChunkId([byte; 32])
    }

    #[test]
    fn frames_match_the_documented_layout() {
        let hello = Request::Hello { tenant: "acme".into() };
        assert_eq!(hello.encode().unwrap()[..], hand_frame(0x01, b"acme")[..]);

        let mut list = vec![1, 0, 0, 0];
        list.extend_from_slice(&500u32.to_le_bytes());
        list.extend_from_slice(&[7; 32]);
        let request = Request::ListChunks { after: Some(id(7)), limit: 500 };
        assert_eq!(request.encode().unwrap()[..], hand_frame(0x06, &list)[..]);

        let mut put = 3u16.to_le_bytes().to_vec();
        put.extend_from_slice(b"a/b");
        put.extend_from_slice(b"xyz");
        let request = Request::PutObject { key: "a/b".into(), bytes: Bytes::from_static(b"xyz") };
        assert_eq!(request.encode().unwrap()[..], hand_frame(0x07, &put)[..]);

        let mut entries = 1u32.to_le_bytes().to_vec();
        entries.extend_from_slice(&2u16.to_le_bytes());
        entries.extend_from_slice(b"k1");
        entries.extend_from_slice(&9u64.to_le_bytes());
        entries.extend_from_slice(&(-1i64).to_le_bytes());
        let response = Response::ObjectList(vec![ObjectEntry { key: "k1".into(), len: 9, modified: -1 }]);
        assert_eq!(response.encode().unwrap()[..], hand_frame(0x89, &entries)[..]);

        let mut error = vec![1, 0, 0, 0];
        error.extend_from_slice(b"chunk x");
        let response = Response::error(ErrorCode::NotFound, "chunk x");
        assert_eq!(response.encode().unwrap()[..], hand_frame(0xff, &error)[..]);

        // The example in docs/format-vault.md.
        let bytes = Request::GetObject { key: "leases/gc".into() }.encode().unwrap();
        let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex.join(" "), "4b 56 4c 54 01 08 00 00 09 00 00 00 9d 13 16 9c 6c 65 61 73 65 73 2f 67 63");
    }

    #[test]
    fn every_message_round_trips() {
        let key = TenantKey::from_bytes([3; 32]);
        let (chunk_id, chunk) = encode_chunk(&key, b"hello", 3).unwrap();
        for request in [
            Request::Hello { tenant: "acme".into() },
            Request::PutChunk { id: chunk_id, frame: chunk.clone().into() },
            Request::GetChunk { id: id(1) },
            Request::HasChunks { ids: vec![id(1), id(2), id(3)] },
            Request::DeleteChunk { id: id(4) },
            Request::ListChunks { after: None, limit: 0 },
            Request::ListChunks { after: Some(id(9)), limit: MAX_LIST_CHUNKS },
            Request::PutObject { key: "snapshots/db/x.kman".into(), bytes: Bytes::new() },
            Request::GetObject { key: "k".into() },
            Request::DeleteObject { key: "k".into() },
            Request::ListObjects { prefix: String::new() },
            Request::ListObjects { prefix: "snapshots/".into() },
        ] {
            request_round_trip(&request);
        }
        for response in [
            Response::HelloOk,
            Response::Stored(Put::Written),
            Response::Stored(Put::AlreadyPresent),
            Response::Chunk(chunk.into()),
            Response::Present(vec![true, false, true]),
            Response::Deleted(true),
            Response::Deleted(false),
            Response::ChunkList(vec![]),
            Response::ChunkList(vec![ChunkEntry { id: id(5), len: 77, modified: 1_700_000_000 }]),
            Response::ObjectStored,
            Response::Object(Bytes::from_static(b"manifest")),
            Response::ObjectList(vec![]),
            Response::error(ErrorCode::Refused, "node \"node-c\" may not open tenant \"acme\""),
        ] {
            response_round_trip(&response);
        }
    }

    #[test]
    fn header_checks_come_in_the_documented_order() {
        let good = hand_frame(0x03, &[1; 32]);
        let decode = |bytes: &[u8]| decode_frame(bytes, Direction::Request).map(|_| ()).unwrap_err();

        let mut bad = good.clone();
        bad[0] = b'X';
        bad[5] = 0x77; // also an unknown kind: the magic is checked first
        assert!(matches!(decode(&bad), WireError::BadMagic { .. }));
        let mut bad = good.clone();
        bad[4] = 2;
        assert!(matches!(decode(&bad), WireError::UnsupportedVersion { got: 2 }));
        let mut bad = good.clone();
        bad[5] = 0x7e;
        assert!(matches!(decode(&bad), WireError::UnknownKind { got: 0x7e }));
        let bad = hand_frame(0x83, &[0; 64]);
        assert!(matches!(decode(&bad), WireError::WrongDirection { kind: Kind::Chunk, .. }));
        let mut bad = good.clone();
        bad[6] = 1;
        assert!(matches!(decode(&bad), WireError::Reserved { got: 1, .. }));
        let bad = hand_frame(0x03, &[1; 33]);
        assert!(matches!(decode(&bad), WireError::TooLarge { len: 33, max: 32, .. }));
        let bad = hand_frame(0x03, &[1; 31]);
        assert!(matches!(decode(&bad), WireError::TooShort { len: 31, min: 32, .. }));
        let mut bad = good.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(matches!(decode(&bad), WireError::CrcMismatch { kind: Kind::GetChunk, .. }));
        assert!(matches!(decode(&good[..HEADER_LEN - 1]), WireError::Truncated { what: "header", .. }));
        assert!(matches!(decode(&good[..HEADER_LEN + 3]), WireError::Truncated { what: "payload", .. }));

        // A length near u32::MAX is refused from the header alone, before any allocation.
        let mut huge = good[..HEADER_LEN].to_vec();
        huge[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(decode(&huge), WireError::TooLarge { .. }));
    }

    #[test]
    fn payload_fields_are_checked() {
        let decode = |kind, payload: &[u8]| Request::decode(kind, Bytes::copy_from_slice(payload)).unwrap_err();
        // ListChunks: the flag is 0 or 1, an absent `after` is zeros, the limit is bounded.
        let list = |flags: u8, limit: u32, after: u8| {
            let mut p = vec![flags, 0, 0, 0];
            p.extend_from_slice(&limit.to_le_bytes());
            p.extend_from_slice(&[after; 32]);
            p
        };
        assert!(matches!(decode(Kind::ListChunks, &list(2, 1, 0)), WireError::BadField { field: "flags", .. }));
        assert!(matches!(decode(Kind::ListChunks, &list(0, 1, 5)), WireError::BadField { field: "after", .. }));
        let over = MAX_LIST_CHUNKS + 1;
        assert!(matches!(decode(Kind::ListChunks, &list(1, over, 5)), WireError::BadField { field: "limit", .. }));
        let mut reserved = list(1, 1, 1);
        reserved[2] = 1;
        assert!(matches!(decode(Kind::ListChunks, &reserved), WireError::BadField { field: "reserved", .. }));
        // HasChunks: whole ids only.
        assert!(matches!(decode(Kind::HasChunks, &[0; 33]), WireError::BadField { field: "ids", .. }));
        // PutObject: key_len in bounds and inside the payload; UTF-8 keys.
        assert!(matches!(decode(Kind::PutObject, &[0, 0, b'x']), WireError::BadField { field: "key_len", .. }));
        assert!(matches!(decode(Kind::PutObject, &[9, 0, b'x']), WireError::TooShort { .. }));
        assert!(matches!(decode(Kind::PutObject, &[1, 0, 0xff]), WireError::BadField { field: "key", .. }));
        assert!(matches!(decode(Kind::Hello, &[0xc3]), WireError::BadField { field: "tenant", .. }));
        // A response kind is not a request.
        assert!(matches!(decode(Kind::Deleted, &[1]), WireError::WrongDirection { .. }));

        let response = |kind, payload: &[u8]| Response::decode(kind, Bytes::copy_from_slice(payload)).unwrap_err();
        assert!(matches!(response(Kind::Deleted, &[2]), WireError::BadField { field: "deleted", .. }));
        assert!(matches!(response(Kind::Present, &[1, 0, 7]), WireError::BadField { field: "present", .. }));
        assert!(matches!(response(Kind::Error, &[99, 0, 0, 0]), WireError::BadField { field: "code", .. }));
        // A count that claims more entries than the payload can hold is refused before
        // anything is allocated for them.
        let mut lying = u32::MAX.to_le_bytes().to_vec();
        lying.extend_from_slice(&[0; 48]);
        assert!(matches!(response(Kind::ChunkList, &lying), WireError::BadField { field: "count", .. }));
        assert!(matches!(response(Kind::ObjectList, &lying), WireError::BadField { field: "count", .. }));
    }

    #[test]
    fn senders_check_bounds_too() {
        let big = Bytes::from(vec![0; MAX_OBJECT_LEN + 1]);
        let e = Request::PutObject { key: "k".into(), bytes: big }.encode().unwrap_err();
        assert!(matches!(e, WireError::TooLarge { kind: Kind::PutObject, .. }), "{e}");
        let e = Request::HasChunks { ids: vec![id(0); MAX_HAS_BATCH + 1] }.encode().unwrap_err();
        assert!(matches!(e, WireError::TooLarge { kind: Kind::HasChunks, .. }), "{e}");
        let e = Request::GetObject { key: "k".repeat(keys::MAX_KEY_LEN + 1) }.encode().unwrap_err();
        assert!(matches!(e, WireError::BadField { field: "key", .. }), "{e}");
        let e = Request::Hello { tenant: "t".repeat(MAX_TENANT_LEN + 1) }.encode().unwrap_err();
        assert!(matches!(e, WireError::TooLarge { kind: Kind::Hello, .. }), "{e}");
        // A listing too long for one frame is refused while it is built.
        let entry = ObjectEntry { key: "k".repeat(keys::MAX_KEY_LEN), len: 0, modified: 0 };
        let e = Response::ObjectList(vec![entry; MAX_OBJECT_LIST_LEN / keys::MAX_KEY_LEN + 1]).encode().unwrap_err();
        assert!(matches!(e, WireError::TooLarge { kind: Kind::ObjectList, .. }), "{e}");
        // Error messages are cut at a character boundary.
        let Response::Error { message, .. } = Response::error(ErrorCode::Storage, "é".repeat(MAX_ERROR_MESSAGE_LEN))
        else {
            unreachable!()
        };
        assert!(message.len() <= MAX_ERROR_MESSAGE_LEN && message.len() > MAX_ERROR_MESSAGE_LEN - 2);
    }

    #[test]
    fn handle_maps_the_vault_onto_responses() {
        let dir = tempfile::tempdir().unwrap();
        let vault = crate::vault::LocalVault::open("local", dir.path(), "acme").unwrap();
        let key = TenantKey::from_bytes([3; 32]);
        let (chunk_id, chunk) = encode_chunk(&key, b"hello", 3).unwrap();
        let put = Request::PutChunk { id: chunk_id, frame: chunk.clone().into() };
        assert_eq!(handle(&vault, put.clone()), Response::Stored(Put::Written));
        assert_eq!(handle(&vault, put), Response::Stored(Put::AlreadyPresent));
        assert_eq!(handle(&vault, Request::GetChunk { id: chunk_id }), Response::Chunk(chunk.into()));
        assert_eq!(
            handle(&vault, Request::HasChunks { ids: vec![chunk_id, id(1)] }),
            Response::Present(vec![true, false])
        );
        let missing = handle(&vault, Request::GetChunk { id: id(1) });
        assert!(matches!(missing, Response::Error { code: ErrorCode::NotFound, .. }), "{missing:?}");
        let garbage = handle(&vault, Request::PutChunk { id: id(2), frame: Bytes::from(vec![0; 64]) });
        assert!(matches!(garbage, Response::Error { code: ErrorCode::BadChunk, .. }), "{garbage:?}");
        let bad_key = handle(&vault, Request::PutObject { key: "../x".into(), bytes: Bytes::new() });
        assert!(matches!(bad_key, Response::Error { code: ErrorCode::BadKey, .. }), "{bad_key:?}");
        let hello = handle(&vault, Request::Hello { tenant: "other".into() });
        assert!(matches!(hello, Response::Error { code: ErrorCode::Refused, .. }), "{hello:?}");
        assert_eq!(handle(&vault, Request::DeleteChunk { id: chunk_id }), Response::Deleted(true));
        assert_eq!(handle(&vault, Request::DeleteChunk { id: chunk_id }), Response::Deleted(false));
    }

    proptest! {
        #[test]
        fn decoders_are_total(bytes in proptest::collection::vec(any::<u8>(), 0..256), kind in any::<u8>()) {
            let _ = decode_frame(&bytes, Direction::Request);
            let _ = decode_frame(&bytes, Direction::Response);
            if let Some(kind) = Kind::from_u8(kind) {
                let _ = Request::decode(kind, Bytes::copy_from_slice(&bytes));
                let _ = Response::decode(kind, Bytes::copy_from_slice(&bytes));
            }
            // With a valid header and crc, the payload decoders see arbitrary fields.
            if let Some(kind) = Kind::from_u8(kind) {
                let framed = hand_frame(kind as u8, &bytes);
                let direction = kind.direction();
                if let Ok((header, payload, _)) = decode_frame(&framed, direction) {
                    let reencoded = match direction {
                        Direction::Request => Request::decode(header.kind, payload).ok().map(|r| r.encode().unwrap()),
                        Direction::Response => Response::decode(header.kind, payload).ok().map(|r| r.encode().unwrap()),
                    };
                    if let Some(reencoded) = reencoded {
                        prop_assert_eq!(&reencoded[..], &framed[..]);
                    }
                }
            }
        }
    }
}
