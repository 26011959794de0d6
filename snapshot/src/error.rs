//! The crate's error types: one per public boundary (the chunk codec and the chunk store).

use std::io;
use std::path::PathBuf;

use crate::key::ChunkId;

/// Why a chunk could not be encoded or decoded.
///
/// Every variant except [`ChunkError::TooLarge`] means the bytes given to the decoder are not
/// a valid chunk for this id under this key: treat the copy as corrupt (heal it from another
/// vault) and never as data.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChunkError {
    /// Encoding: the plaintext is longer than a chunk may be.
    #[error("chunk plaintext of {len} bytes exceeds the maximum of {max} bytes")]
    TooLarge {
        /// Length of the plaintext given.
        len: usize,
        /// [`crate::MAX_CHUNK_LEN`].
        max: usize,
    },
    /// The encoded chunk is shorter than the smallest valid chunk.
    #[error("chunk truncated: {len} bytes, a chunk has at least {min}")]
    Truncated {
        /// Length of the bytes given.
        len: usize,
        /// The smallest valid encoded length.
        min: usize,
    },
    /// The bytes do not start with the chunk magic `KCHK`.
    #[error("not a chunk: magic {found:02x?}, expected \"KCHK\"")]
    BadMagic {
        /// The first four bytes found.
        found: [u8; 4],
    },
    /// A chunk format version this build does not know (written by a newer Keel?).
    #[error("unsupported chunk format version {found}")]
    UnsupportedVersion {
        /// The version byte found.
        found: u8,
    },
    /// The trailing CRC32 does not match the bytes before it (bit rot, torn or truncated write).
    #[error("chunk checksum mismatch: stored crc32 {expected:#010x}, computed {got:#010x}")]
    ChecksumMismatch {
        /// The CRC stored in the chunk.
        expected: u32,
        /// The CRC computed over the bytes read.
        got: u32,
    },
    /// The header parsed but is inconsistent (reserved bits set, lengths that disagree).
    #[error("corrupt chunk: {what}")]
    Corruption {
        /// What is wrong, in a few words.
        what: &'static str,
    },
    /// AEAD authentication failed: the wrong tenant key, the wrong chunk id, or the
    /// ciphertext or header was tampered with.
    #[error("chunk authentication failed: wrong tenant key, wrong chunk id, or tampered chunk")]
    Unauthenticated,
    /// The compressed payload does not decompress to exactly `plaintext_len` bytes.
    #[error("chunk payload does not decompress: {0}")]
    Decompress(String),
    /// The plaintext decrypted and decompressed, but its keyed hash is not the chunk id.
    #[error("chunk content hashes to {got}, not to its id {expected}")]
    IdMismatch {
        /// The id the caller asked for.
        expected: ChunkId,
        /// The keyed hash of the decoded plaintext.
        got: ChunkId,
    },
    /// Encoding failed inside a library (the AEAD refused the input).
    #[error("encode chunk: {0}")]
    Encode(&'static str),
}

/// Why a chunk store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// An I/O operation on `path` failed.
    #[error("failed to {op} {}: {source}", path.display())]
    Io {
        /// The operation, as a verb plus object ("write chunk temp file").
        op: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// `get` of a chunk that the store does not hold.
    #[error("chunk {id} not found at {}", path.display())]
    NotFound {
        /// The chunk asked for.
        id: ChunkId,
        /// Where it would be.
        path: PathBuf,
    },
    /// `put` of bytes that are not a well-formed chunk frame (checked without the key).
    #[error("refuse to store chunk {id}: {source}")]
    InvalidChunk {
        /// The chunk offered.
        id: ChunkId,
        /// What is wrong with it.
        #[source]
        source: ChunkError,
    },
    /// A pack file or index log holds bytes that are not what the store wrote there (a
    /// truncated pack, an entry that is another chunk, a bad header).
    #[error("{}: corrupt at offset {offset}: {what}; run keel snapshot verify to heal the chunks it holds", path.display())]
    Corrupt {
        /// The pack file or index log.
        path: PathBuf,
        /// Where in it.
        offset: u64,
        /// What is wrong.
        what: String,
    },
    /// The directory holds chunks in the one-file-per-chunk layout (`chunks/ab/cd/<id>`),
    /// which this version does not read.
    #[error(
        "{} holds chunks in the one-file-per-chunk layout of earlier development builds, which this \
         version does not read; copy the snapshots into a new repository with the build that wrote them",
        path.display()
    )]
    LegacyLayout {
        /// The `chunks` directory found.
        path: PathBuf,
    },
    /// An earlier write or fsync failed; the store refuses writes until reopened
    /// (fail-stop: a failed fsync is never retried).
    #[error("chunk store at {} is poisoned by an earlier I/O failure; reopen it", path.display())]
    Poisoned {
        /// The store's root directory.
        path: PathBuf,
    },
}

/// Why a manifest could not be read, checked or written.
///
/// Every variant except [`ManifestError::Encode`] means the bytes are not a valid manifest
/// for this tenant: treat the copy as corrupt (fetch it from another vault).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ManifestError {
    /// Shorter than its header, or than the length the header gives.
    #[error("manifest truncated: {len} bytes, expected {expected}")]
    Truncated {
        /// Length of the bytes given.
        len: usize,
        /// The length the manifest needs.
        expected: usize,
    },
    /// Not a manifest: wrong magic.
    #[error("not a manifest: magic {found:02x?}, expected \"KMAN\"")]
    BadMagic {
        /// The first four bytes found.
        found: [u8; 4],
    },
    /// A format version this build does not know.
    #[error("unsupported manifest format version {found}")]
    UnsupportedVersion {
        /// The version found.
        found: u16,
    },
    /// A crc does not match (bit rot, torn or truncated write).
    #[error("manifest {part} checksum mismatch: stored {expected:#010x}, computed {got:#010x}")]
    ChecksumMismatch {
        /// "header" or "body".
        part: &'static str,
        /// The crc stored.
        expected: u32,
        /// The crc computed.
        got: u32,
    },
    /// The header parsed but is inconsistent.
    #[error("corrupt manifest: {what}")]
    Corruption {
        /// What is wrong.
        what: String,
    },
    /// The manifest was written under another tenant key.
    #[error("manifest was written with tenant key {found}, not with this key ({ours}): wrong key or wrong tenant")]
    WrongKey {
        /// The key id recorded in the manifest, hex.
        found: String,
        /// This key's id, hex.
        ours: String,
    },
    /// The MAC does not match under this key: the manifest was altered.
    #[error("manifest authentication failed: it was altered after it was written")]
    Unauthenticated,
    /// The manifest could not be serialized.
    #[error("encode manifest: {0}")]
    Encode(String),
    /// Reading a manifest file failed.
    #[error("failed to read manifest {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// Why an index chunk of a version 3 manifest could not be read: no vault holds a good
/// copy, so the chunk ids of its range are unknown.
#[derive(Debug, thiserror::Error)]
#[error("snapshot {snapshot}: index chunk {piece} ({id}, chunks {first} to {last}): {errors}")]
pub struct IndexError {
    /// The snapshot.
    pub snapshot: String,
    /// Which index chunk (0 for the first range).
    pub piece: u64,
    /// Its id.
    pub id: ChunkId,
    /// The first chunk index it covers.
    pub first: u64,
    /// The last chunk index it covers.
    pub last: u64,
    /// Each vault's error, joined.
    pub errors: String,
}
