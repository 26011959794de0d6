//! The engine's one error type.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong in the engine. Each variant says what the caller can do;
/// messages name the volume and, for on-disk problems, the file and position.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An I/O call failed. After a failed write or sync the volume is also poisoned.
    #[error("volume {volume:?}: failed to {context}: {source}")]
    Io {
        /// The volume's name (or directory when the name is not known yet).
        volume: String,
        /// What the engine was doing, as "verb object".
        context: String,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// On-disk state failed validation. Nothing is served until an operator acts.
    #[error("volume {volume:?}: {file}: {detail}; run `keel-inspect journal --verify` and see docs/format-journal.md")]
    Corruption {
        /// The volume's name.
        volume: String,
        /// The file holding the bad bytes.
        file: PathBuf,
        /// Where and what: offset, sequence number, expected and found values.
        detail: String,
    },
    /// A previous write or fsync failed; the volume refuses writes until it is reopened.
    #[error("volume {volume:?} is poisoned after an I/O error ({cause}); writes are refused, restart the daemon after fixing the disk")]
    Poisoned {
        /// The volume's name.
        volume: String,
        /// The first error that poisoned it.
        cause: String,
    },
    /// A request addressed bytes outside the volume.
    #[error("volume {volume:?}: range {offset}+{len} is outside the volume ({size} bytes)")]
    OutOfRange {
        /// The volume's name.
        volume: String,
        /// Start of the request.
        offset: u64,
        /// Length of the request.
        len: u64,
        /// The volume's size.
        size: u64,
    },
    /// A caller passed something the engine cannot accept (a bad size, name, option).
    #[error("{0}")]
    InvalidArgument(String),
    /// The change map cannot answer for this sequence number; scan the whole volume.
    #[error("volume {volume:?}: change map cannot answer for changes since seq {since} ({reason}); fall back to a full scan")]
    ChangeMapUnavailable {
        /// The volume's name.
        volume: String,
        /// The sequence number asked about.
        since: u64,
        /// Why the map cannot answer.
        reason: String,
    },
    /// A replicated record does not carry the next sequence number: the standby is not
    /// where the primary thinks it is. Nothing was appended; resynchronise from `expected`.
    #[error("volume {volume:?}: replicated record has seq {got}, but the next seq here is {expected}; resync from seq {expected}")]
    SeqMismatch {
        /// The volume's name.
        volume: String,
        /// The seq the next record must carry (last seq + 1).
        expected: u64,
        /// The seq the record carried.
        got: u64,
    },
    /// Another process holds the volume open.
    #[error("volume directory {dir:?} is locked by another process")]
    Locked {
        /// The volume's directory.
        dir: PathBuf,
    },
}

/// The engine's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
