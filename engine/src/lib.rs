//! Keel's storage engine: a durable, crash-safe block volume.
//!
//! A [`Volume`] lives in its own directory: a superblock (`volume.hdr`), a write journal of
//! preallocated segment files (`journal/`), a sparse block store (`data/`) and a change
//! map (`changemap.bin`, plus one `changes-*.layer` file per interval between snapshot
//! markers). Every write is a journal record with a sequence number in one total order;
//! [`Volume::flush`] makes everything written before it durable with one shared
//! `fdatasync`; recovery replays the journal from the last checkpoint. [`Volume::snapshot`]
//! freezes the contents at a marker ([`Frozen`]) while writes go on. The engine does no
//! networking and never awaits.
//!
//! ```
//! use std::sync::Arc;
//! use keel_engine::{OpenOptions, PersistMode, PosixEnv, Volume, VolumeOptions};
//!
//! let dir = tempfile::tempdir()?;
//! let env = Arc::new(PosixEnv::posix());
//! let options = VolumeOptions { segment_bytes: 1 << 20, ..VolumeOptions::default() };
//! Volume::create(env.clone(), dir.path(), "demo", 1 << 20, &options)?;
//! let (volume, _report) = Volume::open(env, dir.path(), &OpenOptions::default())?;
//! volume.write(4096, b"hello", PersistMode::Durable)?;
//! let mut buf = [0u8; 5];
//! volume.read(4096, &mut buf)?;
//! assert_eq!(&buf, b"hello");
//! volume.close()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![warn(missing_docs)]

mod blockstore;
mod changemap;
mod durable;
mod error;
pub mod format;
mod journal;
mod random;
mod replica;
mod storage;
mod sync;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
mod volume;

pub use changemap::{ChangeMapState, ChangeSet};
pub use durable::PersistMode;
pub use error::{Error, Result};
pub use journal::{list_segments, scan, JournalPosition, ScanEnd, ScanParams, ScannedRecord, SegmentInfo, TornTail};
pub use replica::{RecordSink, ReplicaRecord, RewindReport};
pub use storage::{
    reopen_direct_for_writing, AlignedBuf, Env, Extent, IoBackend, OpenMode, PosixEnv, Storage, UncachedReader,
    DIRECT_ALIGN,
};
pub use volume::{
    FreezeWaiter, Frozen, OpenOptions, RecoveryReport, Volume, VolumeOptions, VolumeStatus, FROZEN_MAX,
    MAX_VOLUME_BYTES, SNAPSHOT_NAME_MAX_BYTES, SUPERBLOCK_FILE,
};
