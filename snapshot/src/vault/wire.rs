//! The `keel-vault` wire format (docs/format-vault.md): how a [`super::RemoteVault`] and
//! the `keel vault` server talk over mutual-TLS QUIC.
//!
//! Two protocol versions exist, each with its own ALPN ([`Version::alpn`]): a client
//! offers both and a server accepts both, so the TLS handshake picks the newest one both
//! speak, and every frame of the connection carries that version in its header. Version 2
//! adds [`Request::Sync`]: a version-2 server may hold a chunk pending (not yet durable)
//! until a `Sync`, and names its run in [`Response::HelloOk`] so that a client notices a
//! restart that lost pending chunks. A version-1 server makes every chunk durable before
//! it answers, so a client syncs nothing there.
//!
//! One request per QUIC bidirectional stream: the client opens a stream, writes one
//! request frame and finishes its side; the server answers with one response frame and
//! finishes. The first stream of a connection carries [`Request::Hello`], which opens the
//! tenant every later stream of that connection works on.
//!
//! A frame is a 16-byte header (magic, version, kind, reserved, payload length, crc32)
//! and a payload whose layout depends on the kind (and, for `HelloOk`, the version). The
//! layouts are defined once, by the order of the `put_*`/[`Reader`] calls in
//! [`Request::encode`]/[`Request::decode`] and [`Response::encode`]/[`Response::decode`],
//! and pinned by tests that build frames by hand from the document.
//!
//! Reading checks, before allocating or parsing anything: a whole header, the magic, the
//! version (known, and the connection's), the kind (known in that version, and travelling
//! in the expected direction), the reserved field, the payload length against the kind's
//! bounds; then, after reading exactly that many bytes, the crc. Every decoder is total:
//! any input gives a value or a [`WireError`].
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

/// The QUIC ALPN of every version, newest first: what a client offers and a server
/// accepts. The handshake picks the first one both sides have.
pub const ALPNS: [&[u8]; 2] = [Version::V2.alpn(), Version::V1.alpn()];
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
/// `HelloOk` from version 2: the server's run.
const INSTANCE_LEN: usize = size_of::<u64>();
const _: () = assert!(INSTANCE_LEN == 8);
/// `Error`: code, reserved.
const ERROR_FIXED_LEN: usize = size_of::<u8>() + 3;
const _: () = assert!(ERROR_FIXED_LEN == 4);
/// The largest payload of any frame: a `PutObject` of the longest key and largest object.
pub const MAX_PAYLOAD: usize = KEY_LEN_LEN + keys::MAX_KEY_LEN + MAX_OBJECT_LEN;
const _: () = assert!(MAX_PAYLOAD <= u32::MAX as usize);
const _: () = assert!(ID_LEN + MAX_CHUNK_FRAME_LEN <= MAX_PAYLOAD);
const _: () = assert!(MAX_OBJECT_LIST_LEN <= MAX_PAYLOAD);
const _: () = assert!(COUNT_LEN + CHUNK_ENTRY_LEN * MAX_LIST_CHUNKS as usize <= MAX_PAYLOAD);

/// Versions of the protocol: of the frame header and payloads, and of what the server
/// promises. A connection speaks one, chosen by ALPN in the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum Version {
    /// The first version (ALPN `keel-vault/1`): every chunk is durable once the server
    /// answered for it.
    V1 = 1,
    /// ALPN `keel-vault/2`: [`Request::Sync`]; a chunk may be pending until a `Sync`;
    /// [`Response::HelloOk`] names the server's run ([`Instance`]).
    V2 = 2,
}

impl Version {
    /// The newest version, which this build prefers.
    pub const CURRENT: Self = Self::V2;
    /// Every version this build speaks, oldest first.
    pub const ALL: [Self; 2] = [Self::V1, Self::V2];

    /// The version with this header byte.
    pub fn from_u8(value: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|version| *version as u8 == value)
    }

    /// The QUIC ALPN that selects this version.
    pub const fn alpn(self) -> &'static [u8] {
        match self {
            Self::V1 => b"keel-vault/1",
            Self::V2 => b"keel-vault/2",
        }
    }

    /// The version an ALPN selects (`None` for a foreign protocol).
    pub fn from_alpn(alpn: &[u8]) -> Option<Self> {
        Self::ALL.into_iter().find(|version| version.alpn() == alpn)
    }
}

/// One run of a `keel vault` server process, random at start-up ([`Response::HelloOk`],
/// version 2). Chunks a server holds pending die with its process, so a client that sees
/// the run change before its `Sync` knows they may be lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Instance(pub u64);

impl Instance {
    /// A fresh random instance, for a server that starts.
    pub fn random() -> Self {
        Self(rand::random())
    }
}

impl std::fmt::Display for Instance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
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
    /// [`Request::Sync`] (version 2).
    Sync = 0x0b,
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
    /// [`Response::Synced`] (version 2).
    Synced = 0x8a,
    /// [`Response::Error`].
    Error = 0xff,
}

impl Kind {
    /// Every kind, for decoding and tests.
    pub const ALL: [Self; 22] = [
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
        Self::Sync,
        Self::HelloOk,
        Self::Stored,
        Self::Chunk,
        Self::Present,
        Self::Deleted,
        Self::ChunkList,
        Self::ObjectStored,
        Self::Object,
        Self::ObjectList,
        Self::Synced,
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

    /// The first version that has this kind.
    pub fn since(self) -> Version {
        match self {
            Self::Sync | Self::Synced => Version::V2,
            _ => Version::V1,
        }
    }

    /// Smallest and largest payload length of this kind in `version`.
    pub fn payload_bounds(self, version: Version) -> (usize, usize) {
        match self {
            Self::HelloOk => match version {
                Version::V1 => (0, 0),
                Version::V2 => (INSTANCE_LEN, INSTANCE_LEN),
            },
            Self::Hello => (1, MAX_TENANT_LEN),
            Self::PutChunk => (ID_LEN + crate::OVERHEAD, ID_LEN + MAX_CHUNK_FRAME_LEN),
            Self::GetChunk | Self::DeleteChunk => (ID_LEN, ID_LEN),
            Self::HasChunks => (ID_LEN, ID_LEN * MAX_HAS_BATCH),
            Self::ListChunks => (LIST_CHUNKS_LEN, LIST_CHUNKS_LEN),
            Self::PutObject => (KEY_LEN_LEN + 1, MAX_PAYLOAD),
            Self::GetObject | Self::DeleteObject => (1, keys::MAX_KEY_LEN),
            Self::ListObjects => (0, keys::MAX_KEY_LEN),
            Self::ObjectStored | Self::Sync | Self::Synced => (0, 0),
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
            Self::Sync => Self::Synced,
            response => response,
        }
    }

    /// The largest response payload a request of this kind can get in any version (for
    /// memory budgets).
    pub fn response_bound(self) -> usize {
        Version::ALL
            .into_iter()
            .map(|version| self.answer().payload_bounds(version).1.max(Self::Error.payload_bounds(version).1))
            .max()
            .unwrap_or(0)
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
    /// [`Vault::sync`] (version 2): make every chunk the tenant's area accepted before
    /// this request, from any connection, durable and visible before answering.
    Sync,
}

/// A response, server → client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// The tenant is open.
    HelloOk {
        /// The server's run: `None` in version 1, which has no such field; always `Some`
        /// from version 2.
        instance: Option<Instance>,
    },
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
    /// The answer to `Sync`: what the server accepted before it is durable and visible.
    Synced,
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
    #[error("unsupported frame version {got} (this build speaks versions 1 to {})", Version::CURRENT as u8)]
    UnsupportedVersion {
        /// The version received.
        got: u8,
    },
    /// A known version, but not the one the connection negotiated.
    #[error("version {got:?} frame on a connection that speaks {connection:?}")]
    WrongVersion {
        /// The version in the frame.
        got: Version,
        /// The connection's version.
        connection: Version,
    },
    /// A kind that the frame's version does not have (a `Sync` in version 1).
    #[error("{kind:?} frame in version {version:?}, which has no such kind (it came in {:?})", kind.since())]
    NotInVersion {
        /// The kind.
        kind: Kind,
        /// The frame's version.
        version: Version,
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
    /// The frame's version (the connection's).
    pub version: Version,
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
            Self::Sync => Kind::Sync,
        }
    }

    /// The whole frame in `version`, or [`WireError::TooLarge`]/[`WireError::BadField`] if
    /// a field is outside its bounds (the sender checks what the receiver will check), or
    /// [`WireError::NotInVersion`].
    pub fn encode(&self, version: Version) -> Result<Bytes, WireError> {
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
            Self::Sync => {}
        }
        frame(version, kind, p.freeze())
    }

    /// Decodes the payload of a request frame of `version` and `kind` (its header already
    /// checked).
    pub fn decode(version: Version, kind: Kind, payload: Bytes) -> Result<Self, WireError> {
        check_kind(version, kind)?;
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
            Kind::Sync => r.finish_with(|_| Ok(Self::Sync))?,
            _ => return Err(WireError::WrongDirection { kind, expected: Direction::Request }),
        };
        check_bounds(version, kind, r.len)?;
        Ok(request)
    }
}

impl Response {
    /// The response's kind.
    pub fn kind(&self) -> Kind {
        match self {
            Self::HelloOk { .. } => Kind::HelloOk,
            Self::Stored(_) => Kind::Stored,
            Self::Chunk(_) => Kind::Chunk,
            Self::Present(_) => Kind::Present,
            Self::Deleted(_) => Kind::Deleted,
            Self::ChunkList(_) => Kind::ChunkList,
            Self::ObjectStored => Kind::ObjectStored,
            Self::Object(_) => Kind::Object,
            Self::ObjectList(_) => Kind::ObjectList,
            Self::Synced => Kind::Synced,
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

    /// The whole frame in `version`, or [`WireError::TooLarge`] if it exceeds its kind's
    /// bounds (a listing too long for one frame, an object too large), or
    /// [`WireError::NotInVersion`], or [`WireError::BadField`] for a `HelloOk` whose
    /// `instance` does not match the version.
    pub fn encode(&self, version: Version) -> Result<Bytes, WireError> {
        let kind = self.kind();
        let mut p = BytesMut::new();
        match self {
            Self::HelloOk { instance } => match (version, instance) {
                (Version::V1, None) => {}
                (Version::V2, Some(instance)) => p.put_u64_le(instance.0),
                (version, instance) => {
                    return Err(bad_field(kind, "instance", format!("{instance:?} does not fit version {version:?}")))
                }
            },
            Self::ObjectStored | Self::Synced => {}
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
                    check_bounds(version, kind, p.len())?;
                }
            }
            Self::Error { code, message } => {
                p.put_u8(*code as u8);
                p.put_bytes(0, 3);
                p.put_slice(message.as_bytes());
            }
        }
        frame(version, kind, p.freeze())
    }

    /// Decodes the payload of a response frame of `version` and `kind` (its header already
    /// checked).
    pub fn decode(version: Version, kind: Kind, payload: Bytes) -> Result<Self, WireError> {
        check_kind(version, kind)?;
        let mut r = Reader::new(kind, payload);
        let flag = |value: u8, field| match value {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(bad_field(kind, field, format!("{other}, must be 0 or 1"))),
        };
        let response = match kind {
            Kind::HelloOk => match version {
                Version::V1 => r.finish_with(|_| Ok(Self::HelloOk { instance: None }))?,
                Version::V2 => Self::HelloOk { instance: Some(Instance(r.finish_with(Reader::u64)?)) },
            },
            Kind::ObjectStored => r.finish_with(|_| Ok(Self::ObjectStored))?,
            Kind::Synced => r.finish_with(|_| Ok(Self::Synced))?,
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
        check_bounds(version, kind, r.len)?;
        Ok(response)
    }
}

/// Checks a frame header (everything but the crc, which needs the payload): magic,
/// version (known, and `connection`'s), kind (known in that version), direction, reserved
/// field, payload length against the kind's bounds.
pub fn decode_header(bytes: &[u8; HEADER_LEN], expected: Direction, connection: Version) -> Result<Header, WireError> {
    let truncated = || WireError::Truncated { what: "header", needed: HEADER_LEN as u64, got: HEADER_LEN as u64 };
    let (magic, rest) = bytes.split_first_chunk::<MAGIC_LEN>().ok_or_else(truncated)?;
    if *magic != MAGIC {
        return Err(WireError::BadMagic { got: *magic });
    }
    let (&[version, kind], rest) = rest.split_first_chunk::<2>().ok_or_else(truncated)?;
    let version = Version::from_u8(version).ok_or(WireError::UnsupportedVersion { got: version })?;
    if version != connection {
        return Err(WireError::WrongVersion { got: version, connection });
    }
    let kind = Kind::from_u8(kind).ok_or(WireError::UnknownKind { got: kind })?;
    check_kind(version, kind)?;
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
    check_bounds(version, kind, payload_len)?;
    Ok(Header { version, kind, payload_len, crc: u32::from_le_bytes(*crc), bytes: *bytes })
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

/// Decodes the first frame in `bytes`, which must be of version `connection`: its checked
/// header and payload, and the number of bytes it took.
pub fn decode_frame(
    bytes: &[u8],
    expected: Direction,
    connection: Version,
) -> Result<(Header, Bytes, usize), WireError> {
    let header: &[u8; HEADER_LEN] = bytes.first_chunk().ok_or(WireError::Truncated {
        what: "header",
        needed: HEADER_LEN as u64,
        got: bytes.len() as u64,
    })?;
    let header = decode_header(header, expected, connection)?;
    let end = HEADER_LEN + header.payload_len;
    let payload = bytes.get(HEADER_LEN..end).ok_or(WireError::Truncated {
        what: "payload",
        needed: header.payload_len as u64,
        got: bytes.len().saturating_sub(HEADER_LEN) as u64,
    })?;
    check_crc(&header, payload)?;
    Ok((header, Bytes::copy_from_slice(payload), end))
}

/// Reads and checks a frame header of a connection that speaks `connection`.
/// Cancel-safety: none (a partly read header is lost).
pub async fn read_header<R: AsyncRead + Unpin>(
    r: &mut R,
    expected: Direction,
    connection: Version,
) -> Result<Header, WireError> {
    let mut bytes = [0u8; HEADER_LEN];
    let got = read_full(r, &mut bytes).await.map_err(|error| WireError::Io { context: "read frame header", error })?;
    if got < HEADER_LEN {
        return Err(WireError::Truncated { what: "header", needed: HEADER_LEN as u64, got: got as u64 });
    }
    decode_header(&bytes, expected, connection)
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

/// What the server does with a request of a connection that speaks `version`, once the
/// connection's tenant is open: calls the vault and turns the outcome into a response.
/// Blocking (it calls the [`Vault`]). `Hello` is the connection's business and is answered
/// with a `Refused` error here.
///
/// Durability, for a `vault` whose chunk puts wait for [`Vault::sync`] (the server's):
///
/// - `Sync` is [`Vault::sync`]. `vault.sync` must not return while another call's batch is
///   still being made durable (the server runs them one at a time), or a `Sync` could
///   answer before a chunk its client relied on is durable.
/// - A `PutObject` under `snapshots/` (a manifest) syncs first. A client syncs before it
///   writes a manifest anyway; this makes sure that one which forgot cannot publish a
///   manifest that names chunks a crash could lose. It costs nothing when nothing is
///   pending.
/// - Version 1 promised that a chunk is durable once answered for: a version-1 client's
///   `PutChunk`, and its `HasChunks` that finds a chunk (it may be another client's
///   pending one), sync before they answer.
pub fn handle(vault: &dyn Vault, version: Version, request: Request) -> Response {
    let durable_at_once = version == Version::V1;
    let outcome = match request {
        Request::Hello { .. } => {
            return Response::error(ErrorCode::Refused, "this connection already opened its tenant");
        }
        Request::PutChunk { id, frame } => vault.put_chunk(&id, &frame).and_then(|put| {
            if durable_at_once {
                vault.sync()?;
            }
            Ok(Response::Stored(put))
        }),
        Request::GetChunk { id } => vault.get_chunk(&id).map(|frame| Response::Chunk(frame.into())),
        Request::HasChunks { ids } => vault.has_chunks(&ids).and_then(|present| {
            if durable_at_once && present.contains(&true) {
                vault.sync()?;
            }
            Ok(Response::Present(present))
        }),
        Request::DeleteChunk { id } => vault.delete_chunk(&id).map(Response::Deleted),
        Request::ListChunks { after, limit } => {
            vault.list_chunks(after.as_ref(), limit as usize).map(Response::ChunkList)
        }
        Request::PutObject { key, bytes } => {
            let synced = if key.starts_with(keys::SNAPSHOTS) { vault.sync() } else { Ok(()) };
            synced.and_then(|()| vault.put_object(&key, &bytes)).map(|()| Response::ObjectStored)
        }
        Request::GetObject { key } => vault.get_object(&key).map(|bytes| Response::Object(bytes.into())),
        Request::DeleteObject { key } => vault.delete_object(&key).map(Response::Deleted),
        Request::ListObjects { prefix } => vault.list_objects(&prefix).map(Response::ObjectList),
        Request::Sync => vault.sync().map(|()| Response::Synced),
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
    for version in Version::ALL {
        for direction in [Direction::Request, Direction::Response] {
            if let Ok((header, payload, used)) = decode_frame(bytes, direction, version) {
                let frame = bytes.get(..used).unwrap_or_default();
                let reencoded = match direction {
                    Direction::Request => {
                        Request::decode(version, header.kind, payload).ok().map(|r| r.encode(version))
                    }
                    Direction::Response => {
                        Response::decode(version, header.kind, payload).ok().map(|r| r.encode(version))
                    }
                };
                if let Some(reencoded) = reencoded {
                    let reencoded = reencoded.ok();
                    assert_eq!(
                        reencoded.as_deref(),
                        Some(frame),
                        "{:?} frame does not re-encode to itself",
                        header.kind
                    );
                }
            }
        }
        // Also every payload decoder on bytes that skipped the header checks, including
        // kinds the version does not have (which must be refused).
        for kind in Kind::ALL {
            let payload = Bytes::copy_from_slice(bytes);
            let decoded = match kind.direction() {
                Direction::Request => Request::decode(version, kind, payload).map(|_| ()),
                Direction::Response => Response::decode(version, kind, payload).map(|_| ()),
            };
            assert!(kind.since() <= version || decoded.is_err(), "{kind:?} decoded in version {version:?}");
        }
    }
}

/// Header plus payload, checking the kind against the version and the payload against
/// the kind's bounds.
fn frame(version: Version, kind: Kind, payload: Bytes) -> Result<Bytes, WireError> {
    check_kind(version, kind)?;
    check_bounds(version, kind, payload.len())?;
    let mut out = BytesMut::with_capacity(HEADER_LEN + payload.len());
    out.put_slice(&MAGIC);
    out.put_u8(version as u8);
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

fn check_kind(version: Version, kind: Kind) -> Result<(), WireError> {
    if kind.since() > version {
        return Err(WireError::NotInVersion { kind, version });
    }
    Ok(())
}

fn check_bounds(version: Version, kind: Kind, len: usize) -> Result<(), WireError> {
    let (min, max) = kind.payload_bounds(version);
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

    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    use proptest::prelude::*;

    use super::*;
    use crate::{encode_chunk, TenantKey};

    /// A frame built by hand from docs/format-vault.md, independently of the encoder.
    fn hand_frame(version: u8, kind: u8, payload: &[u8]) -> Vec<u8> {
        let mut frame = b"KVLT".to_vec();
        frame.extend_from_slice(&[version, kind, 0, 0]);
        frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        let mut crc = crc32fast::Hasher::new();
        crc.update(&frame);
        crc.update(payload);
        frame.extend_from_slice(&crc.finalize().to_le_bytes());
        frame.extend_from_slice(payload);
        frame
    }

    fn request_round_trip(version: Version, request: &Request) {
        let bytes = request.encode(version).unwrap();
        let (header, payload, used) = decode_frame(&bytes, Direction::Request, version).unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!(header.version, version);
        assert_eq!(&Request::decode(version, header.kind, payload).unwrap(), request);
    }

    fn response_round_trip(version: Version, response: &Response) {
        let bytes = response.encode(version).unwrap();
        let (header, payload, used) = decode_frame(&bytes, Direction::Response, version).unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!(header.version, version);
        assert_eq!(&Response::decode(version, header.kind, payload).unwrap(), response);
    }

    fn id(byte: u8) -> ChunkId {
        ChunkId([byte; 32])
    }

    fn hello_ok(version: Version) -> Response {
        let instance = (version >= Version::V2).then_some(Instance(0x0123_4567_89ab_cdef));
        Response::HelloOk { instance }
    }

    #[test]
    fn frames_match_the_documented_layout() {
        for version in Version::ALL {
            let v = version as u8;
            let hello = Request::Hello { tenant: "acme".into() };
            assert_eq!(hello.encode(version).unwrap()[..], hand_frame(v, 0x01, b"acme")[..]);

            let mut list = vec![1, 0, 0, 0];
            list.extend_from_slice(&500u32.to_le_bytes());
            list.extend_from_slice(&[7; 32]);
            let request = Request::ListChunks { after: Some(id(7)), limit: 500 };
            assert_eq!(request.encode(version).unwrap()[..], hand_frame(v, 0x06, &list)[..]);

            let mut put = 3u16.to_le_bytes().to_vec();
            put.extend_from_slice(b"a/b");
            put.extend_from_slice(b"xyz");
            let request = Request::PutObject { key: "a/b".into(), bytes: Bytes::from_static(b"xyz") };
            assert_eq!(request.encode(version).unwrap()[..], hand_frame(v, 0x07, &put)[..]);

            let mut entries = 1u32.to_le_bytes().to_vec();
            entries.extend_from_slice(&2u16.to_le_bytes());
            entries.extend_from_slice(b"k1");
            entries.extend_from_slice(&9u64.to_le_bytes());
            entries.extend_from_slice(&(-1i64).to_le_bytes());
            let response = Response::ObjectList(vec![ObjectEntry { key: "k1".into(), len: 9, modified: -1 }]);
            assert_eq!(response.encode(version).unwrap()[..], hand_frame(v, 0x89, &entries)[..]);

            let mut error = vec![1, 0, 0, 0];
            error.extend_from_slice(b"chunk x");
            let response = Response::error(ErrorCode::NotFound, "chunk x");
            assert_eq!(response.encode(version).unwrap()[..], hand_frame(v, 0xff, &error)[..]);
        }
        // HelloOk: empty in version 1, the server's instance from version 2.
        assert_eq!(hello_ok(Version::V1).encode(Version::V1).unwrap()[..], hand_frame(1, 0x81, &[])[..]);
        let instance = 0x0123_4567_89ab_cdef_u64.to_le_bytes();
        assert_eq!(hello_ok(Version::V2).encode(Version::V2).unwrap()[..], hand_frame(2, 0x81, &instance)[..]);
        assert_eq!(Request::Sync.encode(Version::V2).unwrap()[..], hand_frame(2, 0x0b, &[])[..]);
        assert_eq!(Response::Synced.encode(Version::V2).unwrap()[..], hand_frame(2, 0x8a, &[])[..]);

        // The examples in docs/format-vault.md.
        let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" ");
        let bytes = Request::GetObject { key: "leases/gc".into() }.encode(Version::V1).unwrap();
        assert_eq!(hex(&bytes), "4b 56 4c 54 01 08 00 00 09 00 00 00 9d 13 16 9c 6c 65 61 73 65 73 2f 67 63");
        let bytes = Request::Sync.encode(Version::V2).unwrap();
        assert_eq!(hex(&bytes), "4b 56 4c 54 02 0b 00 00 00 00 00 00 25 66 35 41");
    }

    #[test]
    fn versions_are_chosen_by_alpn() {
        assert_eq!(ALPNS, [b"keel-vault/2".as_slice(), b"keel-vault/1".as_slice()]);
        for version in Version::ALL {
            assert_eq!(Version::from_alpn(version.alpn()), Some(version));
            assert_eq!(Version::from_u8(version as u8), Some(version));
        }
        assert_eq!(Version::from_alpn(b"keel-vault/3"), None);
        assert_eq!(Version::from_alpn(b"keel-repl/1"), None);
        assert_eq!(Version::from_u8(0), None);
        assert_eq!(Version::from_u8(3), None);
        assert_eq!(Version::CURRENT, *Version::ALL.last().unwrap());
    }

    #[test]
    fn every_message_round_trips() {
        let key = TenantKey::from_bytes([3; 32]);
        let (chunk_id, chunk) = encode_chunk(&key, b"hello", 3).unwrap();
        for version in Version::ALL {
            let mut requests = vec![
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
            ];
            let mut responses = vec![
                hello_ok(version),
                Response::Stored(Put::Written),
                Response::Stored(Put::AlreadyPresent),
                Response::Chunk(chunk.clone().into()),
                Response::Present(vec![true, false, true]),
                Response::Deleted(true),
                Response::Deleted(false),
                Response::ChunkList(vec![]),
                Response::ChunkList(vec![ChunkEntry { id: id(5), len: 77, modified: 1_700_000_000 }]),
                Response::ObjectStored,
                Response::Object(Bytes::from_static(b"manifest")),
                Response::ObjectList(vec![]),
                Response::error(ErrorCode::Refused, "node \"node-c\" may not open tenant \"acme\""),
            ];
            if version >= Version::V2 {
                requests.push(Request::Sync);
                responses.push(Response::Synced);
                responses.push(Response::HelloOk { instance: Some(Instance(0)) });
                responses.push(Response::HelloOk { instance: Some(Instance(u64::MAX)) });
            }
            for request in &requests {
                request_round_trip(version, request);
            }
            for response in &responses {
                response_round_trip(version, response);
            }
        }
    }

    /// `Sync` and the version-2 `HelloOk` exist only in version 2, and each side refuses to
    /// send or read them in version 1 (a version-1 peer would not understand them).
    #[test]
    fn version_two_kinds_are_refused_in_version_one() {
        let e = Request::Sync.encode(Version::V1).unwrap_err();
        assert!(matches!(e, WireError::NotInVersion { kind: Kind::Sync, version: Version::V1 }), "{e}");
        let e = Response::Synced.encode(Version::V1).unwrap_err();
        assert!(matches!(e, WireError::NotInVersion { kind: Kind::Synced, version: Version::V1 }), "{e}");
        let e = hello_ok(Version::V2).encode(Version::V1).unwrap_err();
        assert!(matches!(e, WireError::BadField { kind: Kind::HelloOk, field: "instance", .. }), "{e}");
        let e = hello_ok(Version::V1).encode(Version::V2).unwrap_err();
        assert!(matches!(e, WireError::BadField { kind: Kind::HelloOk, field: "instance", .. }), "{e}");

        let request = |bytes: &[u8], version| decode_frame(bytes, Direction::Request, version).map(|_| ());
        let response = |bytes: &[u8], version| decode_frame(bytes, Direction::Response, version).map(|_| ());
        let e = request(&hand_frame(1, 0x0b, &[]), Version::V1).unwrap_err();
        assert!(matches!(e, WireError::NotInVersion { kind: Kind::Sync, version: Version::V1 }), "{e}");
        let e = response(&hand_frame(1, 0x8a, &[]), Version::V1).unwrap_err();
        assert!(matches!(e, WireError::NotInVersion { kind: Kind::Synced, version: Version::V1 }), "{e}");
        // A HelloOk has the length of its version.
        let e = response(&hand_frame(1, 0x81, &[0; 8]), Version::V1).unwrap_err();
        assert!(matches!(e, WireError::TooLarge { kind: Kind::HelloOk, len: 8, max: 0 }), "{e}");
        let e = response(&hand_frame(2, 0x81, &[]), Version::V2).unwrap_err();
        assert!(matches!(e, WireError::TooShort { kind: Kind::HelloOk, len: 0, min: 8 }), "{e}");
        let e = response(&hand_frame(2, 0x81, &[0; 7]), Version::V2).unwrap_err();
        assert!(matches!(e, WireError::TooShort { kind: Kind::HelloOk, len: 7, min: 8 }), "{e}");
        // Sync and Synced carry nothing.
        let e = request(&hand_frame(2, 0x0b, &[0]), Version::V2).unwrap_err();
        assert!(matches!(e, WireError::TooLarge { kind: Kind::Sync, len: 1, max: 0 }), "{e}");
        let e = response(&hand_frame(2, 0x8a, &[0]), Version::V2).unwrap_err();
        assert!(matches!(e, WireError::TooLarge { kind: Kind::Synced, len: 1, max: 0 }), "{e}");
        // The payload decoders check the same without a header.
        let e = Request::decode(Version::V1, Kind::Sync, Bytes::new()).unwrap_err();
        assert!(matches!(e, WireError::NotInVersion { .. }), "{e}");
        let e = Request::decode(Version::V2, Kind::Sync, Bytes::from_static(&[0])).unwrap_err();
        assert!(matches!(e, WireError::TooLarge { kind: Kind::Sync, .. }), "{e}");
        let e = Response::decode(Version::V1, Kind::Synced, Bytes::new()).unwrap_err();
        assert!(matches!(e, WireError::NotInVersion { .. }), "{e}");
        let e = Response::decode(Version::V2, Kind::HelloOk, Bytes::from_static(&[0; 9])).unwrap_err();
        assert!(matches!(e, WireError::TooLarge { kind: Kind::HelloOk, .. }), "{e}");
        let e = Response::decode(Version::V2, Kind::Sync, Bytes::new()).unwrap_err();
        assert!(matches!(e, WireError::WrongDirection { kind: Kind::Sync, .. }), "{e}");
        let e = Request::decode(Version::V2, Kind::Synced, Bytes::new()).unwrap_err();
        assert!(matches!(e, WireError::WrongDirection { kind: Kind::Synced, .. }), "{e}");
    }

    /// Every frame is read in the connection's version only: a version-2 frame on a
    /// version-1 connection and the other way round are refused before the kind is looked at.
    #[test]
    fn frames_of_another_version_than_the_connection_are_refused() {
        for (frame_version, connection) in [(Version::V1, Version::V2), (Version::V2, Version::V1)] {
            let bytes = Request::GetChunk { id: id(1) }.encode(frame_version).unwrap();
            let e = decode_frame(&bytes, Direction::Request, connection).unwrap_err();
            assert!(
                matches!(e, WireError::WrongVersion { got, connection: c } if got == frame_version && c == connection)
            );
        }
        let mut bytes = Request::Sync.encode(Version::V2).unwrap().to_vec();
        bytes[4] = 1;
        let e = decode_frame(&bytes, Direction::Request, Version::V2).unwrap_err();
        assert!(matches!(e, WireError::WrongVersion { got: Version::V1, .. }), "{e}");
    }

    /// The version-2 frames: every truncation and every single-bit flip is refused (the
    /// crc covers the whole header and the payload; the length is checked against the
    /// kind's exact size).
    #[test]
    fn new_frames_refuse_every_truncation_and_bit_flip() {
        let frames = [
            (Direction::Request, Request::Sync.encode(Version::V2).unwrap()),
            (Direction::Response, Response::Synced.encode(Version::V2).unwrap()),
            (Direction::Response, hello_ok(Version::V2).encode(Version::V2).unwrap()),
            (Direction::Request, Request::GetChunk { id: id(3) }.encode(Version::V2).unwrap()),
        ];
        for (direction, good) in frames {
            assert!(decode_frame(&good, direction, Version::V2).is_ok());
            for len in 0..good.len() {
                let e = decode_frame(&good[..len], direction, Version::V2).unwrap_err();
                assert!(matches!(e, WireError::Truncated { .. }), "{len} of {} bytes: {e}", good.len());
            }
            for bit in 0..good.len() * 8 {
                let mut bad = good.to_vec();
                bad[bit / 8] ^= 1 << (bit % 8);
                let decoded = decode_frame(&bad, direction, Version::V2);
                assert!(decoded.is_err(), "bit {bit} flipped in {good:02x?} still decodes: {decoded:?}");
            }
        }
    }

    #[test]
    fn header_checks_come_in_the_documented_order() {
        let good = hand_frame(2, 0x03, &[1; 32]);
        let decode = |bytes: &[u8]| decode_frame(bytes, Direction::Request, Version::V2).map(|_| ()).unwrap_err();

        let mut bad = good.clone();
        bad[0] = b'X';
        bad[5] = 0x77; // also an unknown kind: the magic is checked first
        assert!(matches!(decode(&bad), WireError::BadMagic { .. }));
        let mut bad = good.clone();
        bad[4] = 3;
        assert!(matches!(decode(&bad), WireError::UnsupportedVersion { got: 3 }));
        let mut bad = good.clone();
        bad[4] = 1;
        bad[5] = 0x7e; // also an unknown kind: the version is checked first
        assert!(matches!(decode(&bad), WireError::WrongVersion { got: Version::V1, connection: Version::V2 }));
        let mut bad = good.clone();
        bad[5] = 0x7e;
        assert!(matches!(decode(&bad), WireError::UnknownKind { got: 0x7e }));
        let bad = hand_frame(1, 0x0b, &[0; 64]); // also too long: the kind is checked first
        let e = decode_frame(&bad, Direction::Request, Version::V1).unwrap_err();
        assert!(matches!(e, WireError::NotInVersion { kind: Kind::Sync, version: Version::V1 }), "{e}");
        let bad = hand_frame(2, 0x83, &[0; 64]);
        assert!(matches!(decode(&bad), WireError::WrongDirection { kind: Kind::Chunk, .. }));
        let mut bad = good.clone();
        bad[6] = 1;
        assert!(matches!(decode(&bad), WireError::Reserved { got: 1, .. }));
        let bad = hand_frame(2, 0x03, &[1; 33]);
        assert!(matches!(decode(&bad), WireError::TooLarge { len: 33, max: 32, .. }));
        let bad = hand_frame(2, 0x03, &[1; 31]);
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
        for version in Version::ALL {
            let decode =
                |kind, payload: &[u8]| Request::decode(version, kind, Bytes::copy_from_slice(payload)).unwrap_err();
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

            let response =
                |kind, payload: &[u8]| Response::decode(version, kind, Bytes::copy_from_slice(payload)).unwrap_err();
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
    }

    #[test]
    fn senders_check_bounds_too() {
        let v = Version::CURRENT;
        let big = Bytes::from(vec![0; MAX_OBJECT_LEN + 1]);
        let e = Request::PutObject { key: "k".into(), bytes: big }.encode(v).unwrap_err();
        assert!(matches!(e, WireError::TooLarge { kind: Kind::PutObject, .. }), "{e}");
        let e = Request::HasChunks { ids: vec![id(0); MAX_HAS_BATCH + 1] }.encode(v).unwrap_err();
        assert!(matches!(e, WireError::TooLarge { kind: Kind::HasChunks, .. }), "{e}");
        let e = Request::GetObject { key: "k".repeat(keys::MAX_KEY_LEN + 1) }.encode(v).unwrap_err();
        assert!(matches!(e, WireError::BadField { field: "key", .. }), "{e}");
        let e = Request::Hello { tenant: "t".repeat(MAX_TENANT_LEN + 1) }.encode(v).unwrap_err();
        assert!(matches!(e, WireError::TooLarge { kind: Kind::Hello, .. }), "{e}");
        // A listing too long for one frame is refused while it is built.
        let entry = ObjectEntry { key: "k".repeat(keys::MAX_KEY_LEN), len: 0, modified: 0 };
        let e = Response::ObjectList(vec![entry; MAX_OBJECT_LIST_LEN / keys::MAX_KEY_LEN + 1]).encode(v).unwrap_err();
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
        for version in Version::ALL {
            let handle = |request| handle(&vault, version, request);
            let put = Request::PutChunk { id: chunk_id, frame: chunk.clone().into() };
            assert_eq!(handle(put.clone()), Response::Stored(Put::Written));
            assert_eq!(handle(put), Response::Stored(Put::AlreadyPresent));
            assert_eq!(handle(Request::GetChunk { id: chunk_id }), Response::Chunk(chunk.clone().into()));
            assert_eq!(handle(Request::HasChunks { ids: vec![chunk_id, id(1)] }), Response::Present(vec![true, false]));
            let missing = handle(Request::GetChunk { id: id(1) });
            assert!(matches!(missing, Response::Error { code: ErrorCode::NotFound, .. }), "{missing:?}");
            let garbage = handle(Request::PutChunk { id: id(2), frame: Bytes::from(vec![0; 64]) });
            assert!(matches!(garbage, Response::Error { code: ErrorCode::BadChunk, .. }), "{garbage:?}");
            let bad_key = handle(Request::PutObject { key: "../x".into(), bytes: Bytes::new() });
            assert!(matches!(bad_key, Response::Error { code: ErrorCode::BadKey, .. }), "{bad_key:?}");
            let hello = handle(Request::Hello { tenant: "other".into() });
            assert!(matches!(hello, Response::Error { code: ErrorCode::Refused, .. }), "{hello:?}");
            assert_eq!(handle(Request::Sync), Response::Synced);
            assert_eq!(handle(Request::DeleteChunk { id: chunk_id }), Response::Deleted(true));
            assert_eq!(handle(Request::DeleteChunk { id: chunk_id }), Response::Deleted(false));
        }
    }

    /// What [`handle`] asked of a vault, in order.
    #[derive(Debug, Default)]
    struct Recorder {
        calls: Mutex<Vec<&'static str>>,
        /// Fail syncs after this many (for the error path).
        syncs_ok: AtomicUsize,
    }

    impl Recorder {
        fn new() -> Self {
            Self { calls: Mutex::default(), syncs_ok: AtomicUsize::new(usize::MAX) }
        }

        fn take(&self) -> Vec<&'static str> {
            std::mem::take(&mut *self.calls.lock().unwrap())
        }

        fn call(&self, name: &'static str) {
            self.calls.lock().unwrap().push(name);
        }
    }

    impl Vault for Recorder {
        fn name(&self) -> &str {
            "recorder"
        }
        fn put_chunk(&self, _: &ChunkId, _: &[u8]) -> Result<Put, VaultError> {
            self.call("put_chunk");
            Ok(Put::Written)
        }
        fn sync(&self) -> Result<(), VaultError> {
            self.call("sync");
            if self.syncs_ok.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_err() {
                let source = io::Error::other("syncfs failed");
                return Err(VaultError::Io { vault: "recorder".into(), op: "sync".into(), source });
            }
            Ok(())
        }
        fn get_chunk(&self, id: &ChunkId) -> Result<Vec<u8>, VaultError> {
            self.call("get_chunk");
            Err(VaultError::NotFound { vault: "recorder".into(), what: format!("chunk {id}") })
        }
        fn has_chunk(&self, id: &ChunkId) -> Result<bool, VaultError> {
            self.call("has_chunk");
            Ok(id.0[0] == 1)
        }
        fn delete_chunk(&self, _: &ChunkId) -> Result<bool, VaultError> {
            self.call("delete_chunk");
            Ok(false)
        }
        fn list_chunks(&self, _: Option<&ChunkId>, _: usize) -> Result<Vec<ChunkEntry>, VaultError> {
            self.call("list_chunks");
            Ok(Vec::new())
        }
        fn put_object(&self, _: &str, _: &[u8]) -> Result<(), VaultError> {
            self.call("put_object");
            Ok(())
        }
        fn get_object(&self, key: &str) -> Result<Vec<u8>, VaultError> {
            self.call("get_object");
            Err(VaultError::NotFound { vault: "recorder".into(), what: format!("object {key}") })
        }
        fn delete_object(&self, _: &str) -> Result<bool, VaultError> {
            self.call("delete_object");
            Ok(false)
        }
        fn list_objects(&self, _: &str) -> Result<Vec<ObjectEntry>, VaultError> {
            self.call("list_objects");
            Ok(Vec::new())
        }
    }

    /// When [`handle`] syncs a vault whose puts wait for a sync: at `Sync`, before a
    /// manifest, and after every chunk answer of a version-1 connection (whose protocol
    /// promised durability at once); never otherwise.
    #[test]
    fn handle_syncs_where_the_protocol_promises_durability() {
        let vault = Recorder::new();
        let key = TenantKey::from_bytes([3; 32]);
        let (chunk_id, chunk) = encode_chunk(&key, b"hello", 3).unwrap();
        let put = Request::PutChunk { id: chunk_id, frame: chunk.into() };
        let has_one = Request::HasChunks { ids: vec![id(1), id(2)] };
        let has_none = Request::HasChunks { ids: vec![id(2), id(3)] };
        let manifest = Request::PutObject { key: "snapshots/db/s.kman".into(), bytes: Bytes::new() };
        let other_object = Request::PutObject { key: "uploads/u".into(), bytes: Bytes::new() };

        assert_eq!(handle(&vault, Version::V2, put.clone()), Response::Stored(Put::Written));
        assert_eq!(handle(&vault, Version::V2, has_one.clone()), Response::Present(vec![true, false]));
        assert_eq!(handle(&vault, Version::V2, other_object.clone()), Response::ObjectStored);
        assert_eq!(vault.take(), ["put_chunk", "has_chunk", "has_chunk", "put_object"]);
        assert_eq!(handle(&vault, Version::V2, Request::Sync), Response::Synced);
        assert_eq!(vault.take(), ["sync"]);
        assert_eq!(handle(&vault, Version::V2, manifest.clone()), Response::ObjectStored);
        assert_eq!(vault.take(), ["sync", "put_object"]);

        assert_eq!(handle(&vault, Version::V1, put.clone()), Response::Stored(Put::Written));
        assert_eq!(vault.take(), ["put_chunk", "sync"]);
        assert_eq!(handle(&vault, Version::V1, has_one.clone()), Response::Present(vec![true, false]));
        assert_eq!(vault.take(), ["has_chunk", "has_chunk", "sync"]);
        assert_eq!(handle(&vault, Version::V1, has_none), Response::Present(vec![false, false]));
        assert_eq!(vault.take(), ["has_chunk", "has_chunk"]);
        assert_eq!(handle(&vault, Version::V1, manifest.clone()), Response::ObjectStored);
        assert_eq!(vault.take(), ["sync", "put_object"]);
        assert_eq!(handle(&vault, Version::V1, other_object), Response::ObjectStored);
        assert_eq!(vault.take(), ["put_object"]);

        // A failed sync is a storage error, and nothing that depended on it happens.
        vault.syncs_ok.store(0, Ordering::SeqCst);
        for (version, request) in
            [(Version::V2, Request::Sync), (Version::V2, manifest), (Version::V1, put), (Version::V1, has_one)]
        {
            let response = handle(&vault, version, request);
            assert!(matches!(response, Response::Error { code: ErrorCode::Storage, .. }), "{response:?}");
            assert!(!vault.take().contains(&"put_object"));
        }
    }

    proptest! {
        #[test]
        fn decoders_are_total(
            bytes in proptest::collection::vec(any::<u8>(), 0..256),
            kind in any::<u8>(),
            version in 1..=2u8,
        ) {
            let version = Version::from_u8(version).unwrap();
            let _ = decode_frame(&bytes, Direction::Request, version);
            let _ = decode_frame(&bytes, Direction::Response, version);
            if let Some(kind) = Kind::from_u8(kind) {
                let _ = Request::decode(version, kind, Bytes::copy_from_slice(&bytes));
                let _ = Response::decode(version, kind, Bytes::copy_from_slice(&bytes));
            }
            // With a valid header and crc, the payload decoders see arbitrary fields.
            if let Some(kind) = Kind::from_u8(kind) {
                let framed = hand_frame(version as u8, kind as u8, &bytes);
                let direction = kind.direction();
                if let Ok((header, payload, _)) = decode_frame(&framed, direction, version) {
                    let reencoded = match direction {
                        Direction::Request => Request::decode(version, header.kind, payload)
                            .ok()
                            .map(|r| r.encode(version).unwrap()),
                        Direction::Response => Response::decode(version, header.kind, payload)
                            .ok()
                            .map(|r| r.encode(version).unwrap()),
                    };
                    if let Some(reencoded) = reencoded {
                        prop_assert_eq!(&reencoded[..], &framed[..]);
                    }
                }
            }
        }
    }
}
