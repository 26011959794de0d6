//! The crate's one error type.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong in `keel-net`.
///
/// The protocol variants (`BadMagic`, `Truncated`, `TooLarge`, `Malformed`,
/// `UnknownFlags`) mean the peer broke the NBD protocol; the server answers
/// them by closing that one connection. The other variants come from the
/// local side (binding, configuring exports).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An I/O call failed; `context` says what was being done ("bind unix socket").
    #[error("failed to {context}: {source}")]
    Io {
        /// Verb plus object describing the failed operation.
        context: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// A Unix socket path exists and is not a socket, so it was not removed.
    #[error("{}: exists and is not a socket; remove it or choose another path", path.display())]
    NotASocket {
        /// The path the server was asked to bind.
        path: PathBuf,
    },

    /// An export with this name is already registered.
    #[error("export {name:?} is already registered; remove it first")]
    DuplicateExport {
        /// The export name.
        name: String,
    },

    /// A magic number on the wire did not match.
    #[error("{what}: bad magic (expected {expected:#x}, got {got:#x})")]
    BadMagic {
        /// Which structure carried the magic.
        what: &'static str,
        /// The magic the protocol requires.
        expected: u64,
        /// The value received.
        got: u64,
    },

    /// A structure was shorter than its fixed layout or its own length fields say.
    #[error("{what}: truncated (need {needed} bytes, got {got})")]
    Truncated {
        /// Which structure was truncated.
        what: &'static str,
        /// Bytes required.
        needed: usize,
        /// Bytes available.
        got: usize,
    },

    /// A length field exceeds what the server accepts.
    #[error("{what}: length {len} exceeds the limit of {max}")]
    TooLarge {
        /// Which length field.
        what: &'static str,
        /// The length received.
        len: u64,
        /// The largest accepted value.
        max: u64,
    },

    /// A structure is well-framed but its content is invalid.
    #[error("{what}: {reason}")]
    Malformed {
        /// Which structure.
        what: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },

    /// The peer set flag bits that are unknown or were not offered.
    #[error("{what}: unknown or unoffered flag bits {bits:#x}")]
    UnknownFlags {
        /// Which flags field.
        what: &'static str,
        /// The offending bits.
        bits: u64,
    },
}

impl Error {
    pub(crate) fn io(context: &'static str, source: io::Error) -> Self {
        Self::Io { context, source }
    }
}
