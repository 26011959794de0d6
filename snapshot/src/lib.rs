//! Keel's snapshots and vaults: deduplicated, compressed, encrypted copies of volumes.
//!
//! Snapshots are taken from the engine's frozen views ([`keel_engine::Volume::snapshot`])
//! and its change map; docs/snapshots.md has the whole picture. The pieces:
//!
//! - [`TenantKey`], [`ChunkId`] — a tenant's key, its derived id and encryption subkeys,
//!   and the keyed-BLAKE3 chunk id (dedup never crosses tenants).
//! - [`encode_chunk`], [`decode_chunk`], [`check_frame`], [`is_zero`] — the chunk frame
//!   (docs/format-chunk.md): zstd when it pays, XChaCha20-Poly1305, CRC32.
//! - [`LocalChunkStore`] — chunks in append-only pack files with per-pack index logs
//!   (docs/format-chunk.md), deduplicated, made durable in batches.
//! - [`manifest`], [`create`], [`restore`], [`maintain`], [`vault`] — manifests, taking,
//!   restoring, copying/verifying/GC, and the vault backends.
//!
//! ```
//! use keel_snapshot::{decode_chunk, encode_chunk, is_zero, LocalChunkStore, TenantKey};
//!
//! let key = TenantKey::from_bytes([7; 32]);
//! let block = vec![b'k'; 64 << 10];
//! assert!(!is_zero(&block)); // all-zero chunks are holes, not stored
//! let (id, frame) = encode_chunk(&key, &block, 3)?;
//!
//! let dir = tempfile::tempdir()?;
//! let store = LocalChunkStore::open(dir.path())?;
//! store.put(&id, &frame)?;
//! assert_eq!(decode_chunk(&key, &id, &store.get(&id)?)?, block);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![warn(missing_docs)]

mod chunk;
pub mod create;
mod durable;
mod error;
mod key;
pub mod keyfile;
mod layout;
pub mod lease;
pub mod maintain;
pub mod manifest;
pub mod priority;
pub mod restore;
mod retention;
mod schedule;
mod store;
mod tz;
pub mod vault;

pub use chunk::{
    check_frame, decode_chunk, encode_chunk, is_zero, seal_chunk, FormatVersion, HEADER_LEN, MAGIC, MAX_CHUNK_LEN,
    OVERHEAD,
};
pub use error::{ChunkError, IndexError, ManifestError, StoreError};
pub use key::{ChunkId, ParseChunkIdError, TenantKey, KEY_LEN};
pub use retention::{Decision, Keep, Period, RetentionConfig, RetentionError, RetentionPolicy, SnapshotInfo};
pub use schedule::{Schedule, ScheduleError};
pub use store::{ChunkLocation, LocalChunkStore, PutOutcome, ReclaimReport, StoreStats, StoredChunk};
pub use tz::{Date, IsoWeek, LocalDateTime, TimeZone, TimeZoneError, MAX_TZIF_BYTES, ZONEINFO_DIR};
