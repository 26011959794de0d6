//! What the NBD server serves: the [`Export`] trait, its error type, and the
//! registry of exports a server knows by name.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use parking_lot::RwLock;

use crate::error::Error;

/// A block device the NBD server exposes under a name.
///
/// All methods block; the server calls them from `tokio::task::spawn_blocking`,
/// never on an async worker thread, and calls them concurrently from many
/// requests and connections.
///
/// The server validates every request before calling in: offsets and lengths
/// are multiples of [`BLOCK_SIZE_MIN`](crate::BLOCK_SIZE_MIN) (or end exactly
/// at `size()`), ranges lie inside `0..size()`, lengths are non-zero, and
/// `read`/`write` buffers are at most [`PAYLOAD_MAX`](crate::PAYLOAD_MAX)
/// bytes. Write-type calls never reach a `read_only()` export.
pub trait Export: Send + Sync + 'static {
    /// The name clients use to select this export. Must be unique in a server
    /// and at most 4096 bytes of UTF-8.
    fn name(&self) -> &str;
    /// Free text shown by `nbdinfo` and `qemu-nbd --list`.
    fn description(&self) -> String;
    /// Size in bytes. Should be a multiple of 512.
    fn size(&self) -> u64;
    /// Whether every write-type command must be refused with `EPERM`.
    fn read_only(&self) -> bool;
    /// Fills `buf` with the bytes at `offset..offset + buf.len()`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), ExportError>;
    /// Writes `data` at `offset`. When `fua` is set the data must be durable
    /// before this returns; otherwise it must be visible to later reads.
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), ExportError>;
    /// Makes `offset..offset + len` read as zeros. When `may_punch_hole` is
    /// false the range must stay allocated.
    fn write_zeroes(&self, offset: u64, len: u64, may_punch_hole: bool, fua: bool) -> Result<(), ExportError>;
    /// Discards `offset..offset + len`; afterwards its contents are unspecified.
    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), ExportError>;
    /// Makes every write answered before this call durable (global across
    /// connections, which is what lets the server advertise `CAN_MULTI_CONN`).
    fn flush(&self) -> Result<(), ExportError>;
    /// Allocation map for `base:allocation`: contiguous runs starting at
    /// `offset`, each `(length > 0, is_hole)`. May cover less or more than asked;
    /// the server clamps, merges and drops zero-length runs.
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<(u64, bool)>, ExportError>;
}

/// What kind of failure an [`Export`] reports; decides the NBD error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ExportErrorKind {
    /// The storage failed (`EIO`).
    Io,
    /// No space left, quota exceeded or file too big (`ENOSPC`).
    NoSpace,
    /// Writing to something read-only or otherwise forbidden (`EPERM`).
    PermissionDenied,
    /// The request makes no sense for this export (`EINVAL`).
    InvalidArgument,
    /// The export is shutting down; the client should disconnect (`ESHUTDOWN`).
    Shutdown,
}

impl ExportErrorKind {
    /// The NBD error value sent to the client for this kind.
    pub fn nbd_errno(self) -> u32 {
        use crate::nbd::proto::errno;
        match self {
            Self::Io => errno::EIO,
            Self::NoSpace => errno::ENOSPC,
            Self::PermissionDenied => errno::EPERM,
            Self::InvalidArgument => errno::EINVAL,
            Self::Shutdown => errno::ESHUTDOWN,
        }
    }
}

/// An error returned by an [`Export`] method: a kind plus a message for the
/// server log and the client (structured replies carry the message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportError {
    kind: ExportErrorKind,
    message: String,
}

impl ExportError {
    /// Creates an error of `kind` with a human-readable `message`.
    pub fn new(kind: ExportErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into() }
    }

    /// The kind, which decides the NBD error code.
    pub fn kind(&self) -> ExportErrorKind {
        self.kind
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for ExportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.message)
    }
}

impl std::error::Error for ExportError {}

/// The exports a server offers, by name. Connections look exports up during
/// the handshake and keep their own `Arc` afterwards, so removing an export
/// affects only later handshakes.
#[derive(Default)]
pub(crate) struct ExportRegistry {
    exports: RwLock<BTreeMap<String, Arc<dyn Export>>>,
}

impl ExportRegistry {
    pub(crate) fn insert(&self, export: Arc<dyn Export>) -> Result<(), Error> {
        let mut exports = self.exports.write();
        let name = export.name().to_owned();
        if name.len() > crate::nbd::proto::STRING_LEN_MAX {
            return Err(Error::TooLarge {
                what: "export name",
                len: name.len() as u64,
                max: crate::nbd::proto::STRING_LEN_MAX as u64,
            });
        }
        if exports.contains_key(&name) {
            return Err(Error::DuplicateExport { name });
        }
        exports.insert(name, export);
        Ok(())
    }

    pub(crate) fn remove(&self, name: &str) -> Option<Arc<dyn Export>> {
        self.exports.write().remove(name)
    }

    /// Finds an export by name. The empty name selects the default export,
    /// which exists only while exactly one export is registered.
    pub(crate) fn resolve(&self, name: &str) -> Option<Arc<dyn Export>> {
        let exports = self.exports.read();
        if name.is_empty() && exports.len() == 1 {
            return exports.values().next().cloned();
        }
        exports.get(name).cloned()
    }

    /// All exports, ordered by name.
    pub(crate) fn list(&self) -> Vec<Arc<dyn Export>> {
        self.exports.read().values().cloned().collect()
    }
}
