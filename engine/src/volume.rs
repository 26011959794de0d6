//! The volume: the engine's public face.
//!
//! # Write path
//! A write takes the journal lock, appends its record (seq-numbered), applies it to the
//! block store's page cache and marks the change map, then releases the lock: the store
//! always reflects a prefix of the journal, in journal order, and reads go straight to the
//! store (after a crash the store may also still hold effects of unacknowledged records
//! that recovery dropped, which NBD allows). Nothing is synced on this path except when a write rolls into a
//! new journal segment (its header copies are synced, once per segment); [`Volume::flush`] (and a durable write) syncs
//! the journal segments with group commit. Checkpoints sync the store and the change map,
//! then move the superblock's checkpoint forward so older segments can be reused.
//!
//! # Replication
//! The methods a replication layer needs (a record sink on the primary, appending a
//! primary's records with their seqs on a standby, resync, rewind, epochs) are in
//! `volume/replication.rs`.
//!
//! # Invariants
//! - Every record with `seq <= checkpoint_seq` is durable in the block store and the
//!   persisted change map; every record above it is in the journal.
//! - `checkpoint_seq <= durable_seq <= last_seq`.
//! - After the first failed write or sync the volume is poisoned: writes and flushes fail,
//!   reads still work.
//! - Every superblock write holds `checkpoint_lock`, so writes of `volume.hdr` never race.

use std::any::Any;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::blockstore::BlockStore;
use crate::changemap::{ChangeMap, ChangeMapState, ChangeSet};
use crate::durable::{durable_replace, PersistMode};
use crate::error::{Error, Result};
use crate::format::{RecordKind, Superblock, FLAG_MAY_PUNCH, NAME_MAX_BYTES, SUPERBLOCK_LEN};
use crate::journal::{
    list_segments, scan, AppendError, Journal, JournalPosition, NewRecord, Origin, ResumePoint, ScanParams, TornTail,
    WaitError,
};
use crate::storage::{Env, Extent, OpenMode};

mod frozen;
mod replication;
#[cfg(test)]
mod tests;

pub use frozen::{FreezeWaiter, Frozen, FROZEN_MAX};

/// File name of the superblock inside a volume directory.
pub const SUPERBLOCK_FILE: &str = "volume.hdr";
const LOCK_FILE: &str = "lock";
/// Longest snapshot name, in bytes.
pub const SNAPSHOT_NAME_MAX_BYTES: usize = 256;
/// Largest volume this build creates (the format itself allows more).
pub const MAX_VOLUME_BYTES: u64 = 256 << 40;

/// Geometry chosen when a volume is created (persisted in its superblock).
#[derive(Debug, Clone)]
pub struct VolumeOptions {
    /// Size of each journal segment file (default 64 MiB).
    pub segment_bytes: u64,
    /// Most journal segments in use at once (default 16, so at most 1 GiB of journal).
    pub segment_count_max: u32,
    /// Change-map region size (default 64 KiB).
    pub change_region_bytes: u32,
    /// Size of each block-store extent file (default 1 TiB).
    pub extent_file_bytes: u64,
}

impl Default for VolumeOptions {
    fn default() -> Self {
        Self {
            segment_bytes: 64 << 20,
            segment_count_max: 16,
            change_region_bytes: 64 << 10,
            extent_file_bytes: 1 << 40,
        }
    }
}

/// Runtime behaviour chosen when a volume is opened.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// Checkpoint at least this often while there are new records (default 10 s).
    pub checkpoint_interval: Duration,
    /// Run the background checkpointer thread (default true). Without it, checkpoints
    /// happen only when the journal is full, on [`Volume::checkpoint`] and on close.
    pub background_checkpoints: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        Self { checkpoint_interval: Duration::from_secs(10), background_checkpoints: true }
    }
}

/// What recovery found and did when the volume was opened.
#[derive(Debug, Clone)]
pub struct RecoveryReport {
    /// Seq of the checkpoint replay started from.
    pub checkpoint_seq: u64,
    /// Records replayed onto the block store.
    pub replayed_records: u64,
    /// Payload bytes replayed.
    pub replayed_bytes: u64,
    /// Seq of the last record kept.
    pub last_seq: u64,
    /// The torn record dropped at the end of the journal, if there was one.
    pub torn_tail: Option<TornTail>,
    /// Whether the change map survived.
    pub change_map: ChangeMapState,
    /// Time recovery took.
    pub duration: Duration,
}

/// A snapshot of a volume's counters, for `keel status` and tests.
#[derive(Debug, Clone)]
pub struct VolumeStatus {
    /// Volume name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Current epoch.
    pub epoch: u64,
    /// Seq of the last record appended.
    pub last_seq: u64,
    /// Every record up to this seq is durable.
    pub durable_seq: u64,
    /// Every record up to this seq is in the block store and durable there.
    pub checkpoint_seq: u64,
    /// Journal segment files in use.
    pub journal_segments: usize,
    /// Journal bytes written since the last checkpoint.
    pub journal_bytes_since_checkpoint: u64,
    /// The change map answers for changes after this seq.
    pub change_map_base_seq: u64,
    /// Regions currently marked changed.
    pub changed_regions: u64,
    /// The cause, when the volume is poisoned.
    pub poisoned: Option<String>,
    /// The storage backend in use.
    pub io_backend: &'static str,
}

/// An open volume. Cheap to share: wrap it in an `Arc`; every method takes `&self` and is
/// safe to call from many threads.
#[derive(Debug)]
pub struct Volume {
    inner: Arc<Inner>,
    checkpointer: Option<JoinHandle<()>>,
}

#[derive(Debug)]
struct Inner {
    name: String,
    dir: PathBuf,
    env: Arc<dyn Env>,
    size: u64,
    superblock: Mutex<Superblock>,
    journal: Journal,
    store: Arc<BlockStore>,
    changemap: Arc<ChangeMap>,
    /// Frozen views (snapshots being read while writes go on); see `volume/frozen.rs`.
    frozen: Arc<frozen::FrozenSet>,
    max_payload: usize,
    poison: OnceLock<String>,
    /// Held for a whole checkpoint; holds the last data seq a checkpoint covered.
    checkpoint_lock: Mutex<u64>,
    checkpoint_pressure_bytes: u64,
    wake: Mutex<Wake>,
    wake_cond: Condvar,
    _lock: Box<dyn Any + Send + Sync>,
}

/// Whether a checkpoint with no new data records is skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CheckpointMode {
    /// Skip when no data record arrived since the last checkpoint (the background timer).
    IfChanged,
    /// Always move the checkpoint to the writer's position (a full journal needs the room).
    Always,
    /// Sync the store and the change map and write the superblock even when the position
    /// has not moved: resync writes reached the store without a record.
    Force,
}

#[derive(Debug, Default)]
struct Wake {
    /// The journal passed the checkpoint pressure mark.
    pressure: bool,
    /// The journal wants a spare slot prepared.
    spare: bool,
    stop: bool,
}

fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= NAME_MAX_BYTES
        && !name.starts_with(['.', '-'])
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "invalid volume name {name:?}: use 1-{NAME_MAX_BYTES} characters from A-Z a-z 0-9 . _ -, not starting with . or -"
        )))
    }
}

impl Volume {
    /// Creates a new, zero-filled volume in `dir` (which must not hold a volume yet).
    pub fn create(env: Arc<dyn Env>, dir: &Path, name: &str, size: u64, options: &VolumeOptions) -> Result<()> {
        validate_name(name)?;
        if size == 0 || size % 4096 != 0 || size > MAX_VOLUME_BYTES {
            return Err(Error::InvalidArgument(format!(
                "volume {name:?}: size {size} must be a positive multiple of 4096 bytes, at most {MAX_VOLUME_BYTES}"
            )));
        }
        if options.segment_bytes < (1 << 20) || options.segment_bytes % 4096 != 0 || options.segment_count_max < 2 {
            return Err(Error::InvalidArgument(format!(
                "volume {name:?}: journal segments must be at least 1 MiB (a multiple of 4 KiB), and at least 2 of them"
            )));
        }
        let io = |context: &str| {
            let context = context.to_string();
            move |source| Error::Io { volume: name.to_string(), context, source }
        };
        if env.exists(&dir.join(SUPERBLOCK_FILE)) {
            return Err(Error::InvalidArgument(format!("volume {name:?} already exists in {}", dir.display())));
        }
        env.create_dir_all(dir).map_err(io("create the volume directory"))?;
        let volume_id = crate::random::random_bytes::<16>();
        let superblock = Superblock {
            volume_id,
            block_size: 4096,
            size,
            epoch: 1,
            checkpoint_seq: 0,
            checkpoint_segment: 1,
            checkpoint_offset: crate::format::SEGMENT_HEADER_LEN as u64,
            segment_bytes: options.segment_bytes,
            segment_count_max: options.segment_count_max,
            changemap_generation: 1,
            change_region_bytes: options.change_region_bytes,
            extent_file_bytes: options.extent_file_bytes,
            name: name.to_string(),
        };
        // Validate the geometry through the decoder's own checks before writing anything.
        Superblock::decode(&superblock.encode())
            .map_err(|e| Error::InvalidArgument(format!("volume {name:?}: {e}")))?;
        BlockStore::create(env.as_ref(), dir, size, options.extent_file_bytes).map_err(io("create the block store"))?;
        ChangeMap::create(env.as_ref(), dir, volume_id, size, options.change_region_bytes)
            .map_err(io("create the change map"))?;
        Journal::create(&env, dir, volume_id, options.segment_bytes, 1).map_err(io("create the journal"))?;
        // The superblock is written last: a crash before this leaves no volume, not half of one.
        durable_replace(env.as_ref(), &dir.join(SUPERBLOCK_FILE), &superblock.encode())
            .map_err(io("write the superblock"))?;
        // The volume directory's own entry must survive a power cut too.
        let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        env.sync_dir(parent).map_err(io("sync the parent directory"))?;
        Ok(())
    }

    /// Reads and validates a volume's superblock without opening the volume.
    pub fn read_superblock(env: &dyn Env, dir: &Path) -> Result<Superblock> {
        let path = dir.join(SUPERBLOCK_FILE);
        let volume = dir.display().to_string();
        if !env.exists(&path) {
            return Err(Error::InvalidArgument(format!(
                "{} is not a Keel volume (no {SUPERBLOCK_FILE})",
                dir.display()
            )));
        }
        let file = env.open(&path, OpenMode::Existing).map_err(|source| Error::Io {
            volume: volume.clone(),
            context: "open the superblock".into(),
            source,
        })?;
        let mut bytes = vec![0u8; SUPERBLOCK_LEN];
        file.read_at(&mut bytes, 0).map_err(|source| Error::Io {
            volume: volume.clone(),
            context: "read the superblock".into(),
            source,
        })?;
        Superblock::decode(&bytes).map_err(|e| Error::Corruption { volume, file: path, detail: e.to_string() })
    }

    /// Opens a volume, replaying its journal from the last checkpoint. A torn record at
    /// the end of the journal is dropped and reported; corruption in the acknowledged
    /// journal is an error and the volume is not opened.
    pub fn open(env: Arc<dyn Env>, dir: &Path, options: &OpenOptions) -> Result<(Volume, RecoveryReport)> {
        let started = Instant::now();
        let dir_name = dir.display().to_string();
        let lock = env.lock(&dir.join(LOCK_FILE)).map_err(|source| {
            if source.kind() == std::io::ErrorKind::WouldBlock {
                Error::Locked { dir: dir.to_path_buf() }
            } else {
                Error::Io { volume: dir_name.clone(), context: "lock the volume directory".into(), source }
            }
        })?;
        let mut sb = Self::read_superblock(env.as_ref(), dir)?;
        let name = sb.name.clone();
        let io = |context: &str| {
            let (volume, context) = (name.clone(), context.to_string());
            move |source| Error::Io { volume, context, source }
        };
        let store =
            BlockStore::open(env.as_ref(), dir, sb.size, sb.extent_file_bytes).map_err(io("open the block store"))?;
        let (changemap, change_map_state) = ChangeMap::open(
            Arc::clone(&env),
            dir,
            sb.volume_id,
            sb.size,
            sb.change_region_bytes,
            sb.changemap_generation,
            sb.checkpoint_seq,
        )
        .map_err(io("open the change map"))?;
        if let ChangeMapState::Rebuilt { reason } = &change_map_state {
            tracing::warn!(volume = %name, "change map rebuilt because {reason}; changes before seq {} need a full scan", changemap.base_seq());
        }
        let segments = list_segments(env.as_ref(), dir, sb.volume_id).map_err(io("list the journal segments"))?;
        let params = ScanParams {
            segment_bytes: sb.segment_bytes,
            volume_size: sb.size,
            start_segment: sb.checkpoint_segment,
            start_offset: sb.checkpoint_offset,
            start_seq: sb.checkpoint_seq + 1,
        };
        let end = scan(env.as_ref(), &name, &segments, params, |record| {
            let h = &record.header;
            // The same effects as `Inner::apply`, which needs the volume this replay builds.
            let applied = match h.kind {
                RecordKind::Write => store.write(h.offset, record.payload),
                RecordKind::Zero => store.zero(h.offset, h.length, h.flags & FLAG_MAY_PUNCH != 0),
                RecordKind::Trim => store.zero(h.offset, h.length, true),
                RecordKind::Barrier | RecordKind::Snapshot => Ok(()),
            };
            applied.map_err(io(&format!("replay record seq {}", h.seq)))?;
            match h.kind {
                RecordKind::Write | RecordKind::Zero | RecordKind::Trim => changemap.mark(h.offset, h.length),
                // A marker the persisted map already cut (seq <= its base) is skipped.
                RecordKind::Snapshot => changemap.cut(h.seq),
                RecordKind::Barrier => {}
            }
            Ok(())
        })?;
        if let Some(torn) = &end.torn {
            tracing::warn!(
                volume = %name,
                "journal ends with a torn record at segment {} offset {} (seq {}): {}; dropped {} bytes",
                torn.segment_no, torn.offset, torn.seq, torn.reason, torn.bytes_dropped
            );
        }
        // Erase whatever follows the end (a torn record, stale records of a reused slot)
        // so that records written from here on can never be followed by old ones that
        // happen to carry the next seq.
        let end_info = segments
            .iter()
            .find(|s| s.header.is_some_and(|h| h.segment_no == end.segment_no))
            .ok_or_else(|| Error::InvalidArgument(format!("volume {name:?}: journal end segment vanished")))?;
        let end_file = env.open(&end_info.path, OpenMode::Existing).map_err(io("open the last journal segment"))?;
        // Written zeros, not a deallocated range: later fdatasyncs stay cheap (see new_slot_file).
        crate::storage::write_zeros(end_file.as_ref(), end.offset, sb.segment_bytes - end.offset)
            .map_err(io("erase the journal tail"))?;
        end_file.sync().map_err(io("sync the journal tail"))?;
        let resume = ResumePoint {
            segment_no: end.segment_no,
            nonce: end_info.header.map_or(0, |h| h.nonce),
            offset: end.offset,
            next_seq: end.next_seq,
            last_data_seq: end.last_data_seq,
            epoch: sb.epoch,
            checkpoint_segment_no: end.segment_no,
        };
        let journal = Journal::open(
            Arc::clone(&env),
            dir,
            sb.volume_id,
            sb.segment_bytes,
            sb.segment_count_max as usize,
            &segments,
            resume,
        )
        .map_err(io("open the journal"))?;
        // Cut points after the journal's end belong to records recovery dropped (an
        // unsynced tail): forget them before new records reuse those seqs.
        changemap.truncate_after(end.next_seq - 1);
        // Checkpoint at the end of the replay, so the next open starts here.
        store.sync().map_err(io("sync the block store"))?;
        changemap.persist().map_err(io("persist the change map"))?;
        let report = RecoveryReport {
            checkpoint_seq: sb.checkpoint_seq,
            replayed_records: end.records,
            replayed_bytes: end.payload_bytes,
            last_seq: end.next_seq - 1,
            torn_tail: end.torn.clone(),
            change_map: change_map_state,
            duration: Duration::ZERO,
        };
        sb.checkpoint_seq = end.next_seq - 1;
        sb.checkpoint_segment = end.segment_no;
        sb.checkpoint_offset = end.offset;
        sb.changemap_generation = changemap.generation();
        durable_replace(env.as_ref(), &dir.join(SUPERBLOCK_FILE), &sb.encode()).map_err(io("write the superblock"))?;
        let max_payload = Journal::max_payload(sb.segment_bytes);
        let checkpoint_pressure_bytes = sb.segment_bytes * u64::from(sb.segment_count_max / 2).max(1);
        let (store, changemap) = (Arc::new(store), Arc::new(changemap));
        let frozen =
            frozen::FrozenSet::open(&name, Arc::clone(&env), dir, Arc::clone(&store), Arc::clone(&changemap), sb.size)
                .map_err(io("remove leftover snapshot copy files"))?;
        let inner = Arc::new(Inner {
            name: name.clone(),
            dir: dir.to_path_buf(),
            env,
            size: sb.size,
            superblock: Mutex::new(sb),
            journal,
            store,
            changemap,
            frozen: Arc::new(frozen),
            max_payload,
            poison: OnceLock::new(),
            checkpoint_lock: Mutex::new(end.last_data_seq),
            checkpoint_pressure_bytes,
            wake: Mutex::new(Wake::default()),
            wake_cond: Condvar::new(),
            _lock: lock,
        });
        let checkpointer = if options.background_checkpoints {
            let worker = Arc::clone(&inner);
            let interval = options.checkpoint_interval;
            let thread = std::thread::Builder::new()
                .name(format!("keel-ckpt-{}", inner.name))
                .spawn(move || worker.run_checkpointer(interval))
                .map_err(io("start the checkpointer thread"))?;
            Some(thread)
        } else {
            None
        };
        let report = RecoveryReport { duration: started.elapsed(), ..report };
        Ok((Volume { inner, checkpointer }, report))
    }

    /// The volume's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The volume's directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.inner.size
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let inner = &self.inner;
        inner.check_range(offset, buf.len() as u64)?;
        inner.store.read(offset, buf).map_err(|source| Error::Io {
            volume: inner.name.clone(),
            context: format!("read {} bytes at {offset}", buf.len()),
            source,
        })
    }

    /// Writes `data` at `offset`; returns the seq of its (last) record.
    pub fn write(&self, offset: u64, data: &[u8], persist: PersistMode) -> Result<u64> {
        let inner = &self.inner;
        inner.check_range(offset, data.len() as u64)?;
        inner.check_writable()?;
        let mut seq = inner.journal.last_seq();
        for (index, piece) in data.chunks(inner.max_payload).enumerate() {
            let at = offset + (index * inner.max_payload) as u64;
            let len = piece.len() as u64;
            seq = inner.append(NewRecord::local(RecordKind::Write, 0, at, len, piece))?;
        }
        inner.finish(seq, persist)
    }

    /// Makes `[offset, offset+len)` read as zeros; `may_punch` allows deallocating it.
    pub fn write_zeroes(&self, offset: u64, len: u64, may_punch: bool, persist: PersistMode) -> Result<u64> {
        let inner = &self.inner;
        inner.check_range(offset, len)?;
        inner.check_writable()?;
        let flags = if may_punch { FLAG_MAY_PUNCH } else { 0 };
        let seq = inner.append(NewRecord::local(RecordKind::Zero, flags, offset, len, &[]))?;
        inner.finish(seq, persist)
    }

    /// Discards `[offset, offset+len)`; it reads as zeros afterwards.
    pub fn trim(&self, offset: u64, len: u64, persist: PersistMode) -> Result<u64> {
        let inner = &self.inner;
        inner.check_range(offset, len)?;
        inner.check_writable()?;
        let seq = inner.append(NewRecord::local(RecordKind::Trim, 0, offset, len, &[]))?;
        inner.finish(seq, persist)
    }

    /// Makes every record appended before this call durable (writes, and records appended
    /// by [`Volume::apply_replica`], snapshots included). Concurrent flushes share one
    /// `fdatasync`. Returns the durable seq.
    pub fn flush(&self) -> Result<u64> {
        self.inner.check_writable()?;
        self.inner.journal.flush().map_err(|e| self.inner.flush_error(e))
    }

    /// Records a snapshot point in the journal and makes it durable; returns its seq.
    /// The marker also cuts the change map: its seq becomes a point
    /// [`Volume::changed_between`] answers exactly for.
    pub fn mark_snapshot(&self, name: &str) -> Result<u64> {
        let inner = &self.inner;
        inner.validate_snapshot_name(name)?;
        inner.check_writable()?;
        let seq = inner.append(NewRecord::local(RecordKind::Snapshot, 0, 0, 0, name.as_bytes()))?;
        inner.journal.flush_to(seq).map_err(|e| inner.flush_error(e))?;
        Ok(seq)
    }

    /// Allocation map of a range: holes read as zeros.
    pub fn allocation(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let inner = &self.inner;
        inner.check_range(offset, len)?;
        inner.store.extents(offset, len).map_err(|source| Error::Io {
            volume: inner.name.clone(),
            context: format!("map allocation of {offset}+{len}"),
            source,
        })
    }

    /// A superset of the regions changed since `seq` (every region changed since the last
    /// snapshot cut at or before `seq`), or [`Error::ChangeMapUnavailable`] when the map
    /// cannot answer (it was rebuilt after `seq`, or its oldest layers are gone): scan
    /// everything then.
    pub fn changed_since(&self, seq: u64) -> Result<ChangeSet> {
        let inner = &self.inner;
        inner.changemap.changed_since(seq).map_err(|reason| Error::ChangeMapUnavailable {
            volume: inner.name.clone(),
            since: seq,
            reason,
        })
    }

    /// The regions changed by records with seq in `(since, until]`, where `until` is a
    /// snapshot marker's seq the map still holds as a cut point: exact when `since` is one
    /// too, a superset otherwise. [`Error::ChangeMapUnavailable`] when `since` is older than
    /// the map's base or `until` is not a retained cut point (the reason says which).
    pub fn changed_between(&self, since: u64, until: u64) -> Result<ChangeSet> {
        let inner = &self.inner;
        if since > until {
            return Err(Error::InvalidArgument(format!(
                "volume {:?}: changes between seq {since} and seq {until}: the range is backwards",
                inner.name
            )));
        }
        inner.changemap.changed_between(since, until).map_err(|reason| Error::ChangeMapUnavailable {
            volume: inner.name.clone(),
            since,
            reason,
        })
    }

    /// Applies the journal to the block store durably and lets old segments be reused.
    pub fn checkpoint(&self) -> Result<()> {
        self.inner.checkpoint(CheckpointMode::IfChanged).map(drop)
    }

    /// Current counters.
    pub fn status(&self) -> VolumeStatus {
        let inner = &self.inner;
        let (position, bytes) = inner.journal.checkpoint_snapshot();
        VolumeStatus {
            name: inner.name.clone(),
            size: inner.size,
            epoch: inner.journal.epoch(),
            last_seq: position.last_seq,
            durable_seq: inner.journal.durable_seq(),
            checkpoint_seq: inner.superblock.lock().checkpoint_seq,
            journal_segments: inner.journal.segment_count(),
            journal_bytes_since_checkpoint: bytes,
            change_map_base_seq: inner.changemap.base_seq(),
            changed_regions: inner.changemap.changed_count(),
            poisoned: inner.poison.get().cloned(),
            io_backend: inner.env.backend_name(),
        }
    }

    /// Flushes, checkpoints and closes the volume, reporting any error (dropping the
    /// volume does the same but can only log errors).
    pub fn close(mut self) -> Result<()> {
        self.inner.frozen.invalidate_all("the volume was closed");
        self.stop_checkpointer();
        self.inner.close()
    }

    fn stop_checkpointer(&mut self) {
        if let Some(thread) = self.checkpointer.take() {
            self.inner.wake.lock().stop = true;
            self.inner.wake_cond.notify_all();
            if thread.join().is_err() {
                tracing::error!(volume = %self.inner.name, "checkpointer thread panicked");
            }
        }
    }
}

impl Drop for Volume {
    fn drop(&mut self) {
        self.inner.frozen.invalidate_all("the volume was closed");
        if self.checkpointer.is_none() && Arc::strong_count(&self.inner) > 1 {
            return;
        }
        self.stop_checkpointer();
        if self.inner.poison.get().is_none() {
            if let Err(e) = self.inner.close() {
                tracing::error!(volume = %self.inner.name, "failed to close cleanly: {e:#}");
            }
        }
    }
}

impl Inner {
    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(Error::OutOfRange { volume: self.name.clone(), offset, len, size: self.size }),
        }
    }

    fn check_writable(&self) -> Result<()> {
        match self.poison.get() {
            Some(cause) => Err(Error::Poisoned { volume: self.name.clone(), cause: cause.clone() }),
            None => Ok(()),
        }
    }

    fn poison_with(&self, cause: String) -> Error {
        let first = self.poison.get_or_init(|| {
            tracing::error!(volume = %self.name, "poisoned, refusing writes: {cause}");
            cause.clone()
        });
        self.journal.poison(first.clone());
        self.frozen.invalidate_all(&format!("the volume was poisoned ({first})"));
        Error::Poisoned { volume: self.name.clone(), cause: first.clone() }
    }

    /// The error a failed flush returns: a failed sync poisons the volume; a target that
    /// a concurrent rewind discarded does not.
    fn flush_error(&self, error: WaitError) -> Error {
        match error {
            WaitError::Poisoned(cause) => self.poison_with(cause),
            WaitError::Unreachable { durable_seq } => Error::InvalidArgument(format!(
                "volume {:?}: the records to flush were discarded by a rewind to seq {durable_seq}",
                self.name
            )),
        }
    }

    fn validate_snapshot_name(&self, name: &str) -> Result<()> {
        if name.is_empty() || name.len() > SNAPSHOT_NAME_MAX_BYTES {
            return Err(Error::InvalidArgument(format!(
                "volume {:?}: snapshot name must be 1-{SNAPSHOT_NAME_MAX_BYTES} bytes",
                self.name
            )));
        }
        Ok(())
    }

    /// Applies record `seq` to the block store and the change map, under the journal lock,
    /// right after it was appended (replay does the same in `open`). A data record first
    /// lets live frozen views copy what it overwrites; a snapshot marker cuts the change
    /// map and activates the freezes waiting for it (`freeze`: the one
    /// [`Volume::snapshot`] took for this marker).
    fn apply(&self, seq: u64, record: &NewRecord<'_>, freeze: Option<&Arc<frozen::Core>>) -> std::io::Result<()> {
        let NewRecord { kind, flags, offset, length, payload, .. } = *record;
        match kind {
            RecordKind::Write | RecordKind::Zero | RecordKind::Trim => self.frozen.before_mutation(offset, length),
            RecordKind::Snapshot => {
                self.changemap.cut(seq);
                self.frozen.on_marker(seq, payload, freeze);
                return Ok(());
            }
            RecordKind::Barrier => return Ok(()),
        }
        match kind {
            RecordKind::Write => self.store.write(offset, payload)?,
            RecordKind::Zero => self.store.zero(offset, length, flags & FLAG_MAY_PUNCH != 0)?,
            RecordKind::Trim => self.store.zero(offset, length, true)?,
            RecordKind::Barrier | RecordKind::Snapshot => return Ok(()),
        }
        self.changemap.mark(offset, length);
        Ok(())
    }

    /// Appends `record` and applies it, checkpointing first when the journal is full.
    fn append(&self, record: NewRecord<'_>) -> Result<u64> {
        self.append_freezing(record, None)
    }

    /// [`Inner::append`], activating `freeze` when the record (a snapshot marker) is applied.
    fn append_freezing(&self, record: NewRecord<'_>, freeze: Option<&Arc<frozen::Core>>) -> Result<u64> {
        let apply = |seq: u64| self.apply(seq, &record, freeze);
        loop {
            match self.journal.append(record, &apply) {
                Ok(seq) => {
                    self.after_append();
                    return Ok(seq);
                }
                // Backpressure: the writer waits for a checkpoint to free segments.
                Err(AppendError::Full) => {
                    self.checkpoint(CheckpointMode::Always)?;
                }
                Err(e) => return Err(self.append_error(&record, e)),
            }
        }
    }

    /// Wakes the checkpointer when the last append left the journal wanting a checkpoint
    /// or a spare segment slot.
    fn after_append(&self) {
        let pressure = self.journal.bytes_since_checkpoint() >= self.checkpoint_pressure_bytes;
        let spare = self.journal.take_spare_wanted();
        if pressure || spare {
            let mut wake = self.wake.lock();
            wake.pressure |= pressure;
            wake.spare |= spare;
            self.wake_cond.notify_all();
        }
    }

    /// The error for a failed append other than [`AppendError::Full`]: an I/O failure
    /// poisons the volume.
    fn append_error(&self, record: &NewRecord<'_>, e: AppendError) -> Error {
        match e {
            AppendError::Io(context, e) => self.poison_with(format!("failed to {context}: {e}")),
            AppendError::SeqMismatch { expected } => {
                let got = match record.origin {
                    Origin::Replica { seq, .. } => seq,
                    Origin::Local => expected,
                };
                Error::SeqMismatch { volume: self.name.clone(), expected, got }
            }
            AppendError::Full => Error::InvalidArgument(format!("volume {:?}: the journal is full", self.name)),
        }
    }

    fn finish(&self, seq: u64, persist: PersistMode) -> Result<u64> {
        if persist == PersistMode::Durable {
            self.journal.flush_to(seq).map_err(|e| self.flush_error(e))?;
        }
        Ok(seq)
    }

    /// Runs a checkpoint; returns the checkpoint seq it leaves in the superblock.
    fn checkpoint(&self, mode: CheckpointMode) -> Result<u64> {
        self.check_writable()?;
        let mut checkpointed_data_seq = self.checkpoint_lock.lock();
        self.checkpoint_locked(&mut checkpointed_data_seq, mode).map(|position| position.last_seq)
    }

    /// A checkpoint, with `checkpoint_lock` (which holds `checkpointed_data_seq`) held by
    /// the caller. Returns the position the superblock now names.
    fn checkpoint_locked(&self, checkpointed_data_seq: &mut u64, mode: CheckpointMode) -> Result<JournalPosition> {
        self.check_writable()?;
        let (position, bytes) = self.journal.checkpoint_snapshot();
        let unchanged = {
            let sb = self.superblock.lock();
            JournalPosition {
                segment_no: sb.checkpoint_segment,
                offset: sb.checkpoint_offset,
                last_seq: sb.checkpoint_seq,
                last_data_seq: *checkpointed_data_seq,
            }
        };
        // Only barriers since the last checkpoint (flushes append them): nothing to apply.
        if mode == CheckpointMode::IfChanged && position.last_data_seq == *checkpointed_data_seq {
            return Ok(unchanged);
        }
        if mode != CheckpointMode::Force && position.last_seq == unchanged.last_seq {
            return Ok(unchanged);
        }
        self.journal.flush_to(position.last_seq).map_err(|e| self.flush_error(e))?;
        let fail = |what: &str, e: std::io::Error| self.poison_with(format!("failed to {what}: {e}"));
        self.store.sync().map_err(|e| fail("sync the block store", e))?;
        self.changemap.persist().map_err(|e| fail("persist the change map", e))?;
        let encoded = {
            let mut sb = self.superblock.lock();
            sb.checkpoint_seq = position.last_seq;
            sb.checkpoint_segment = position.segment_no;
            sb.checkpoint_offset = position.offset;
            sb.encode()
        };
        durable_replace(self.env.as_ref(), &self.dir.join(SUPERBLOCK_FILE), &encoded)
            .map_err(|e| fail("write the superblock", e))?;
        self.journal.checkpointed(position, bytes);
        *checkpointed_data_seq = position.last_data_seq;
        tracing::debug!(volume = %self.name, seq = position.last_seq, "checkpoint");
        Ok(position)
    }

    /// The background thread: checkpoints every `interval` while data arrives (or at once
    /// under journal pressure), and prepares spare journal slots off the write path.
    fn run_checkpointer(&self, interval: Duration) {
        let mut last = Instant::now();
        let mut spare = self.journal.take_spare_wanted();
        loop {
            let pressure = {
                let mut wake = self.wake.lock();
                if !wake.stop && !wake.pressure && !wake.spare && !spare {
                    let timeout = interval.saturating_sub(last.elapsed()).max(Duration::from_millis(10));
                    self.wake_cond.wait_for(&mut wake, timeout);
                }
                if wake.stop {
                    return;
                }
                spare |= std::mem::take(&mut wake.spare);
                std::mem::take(&mut wake.pressure)
            };
            if self.poison.get().is_some() {
                spare = false;
                continue;
            }
            if std::mem::take(&mut spare) {
                if let Err(e) = self.journal.prepare_spare() {
                    self.poison_with(format!("failed to prepare a spare journal slot: {e}"));
                    continue;
                }
            }
            if pressure || last.elapsed() >= interval {
                last = Instant::now();
                if let Err(e) = self.checkpoint(CheckpointMode::IfChanged) {
                    tracing::error!(volume = %self.name, "failed to checkpoint: {e:#}");
                }
            }
        }
    }

    fn close(&self) -> Result<()> {
        self.check_writable()?;
        self.journal.flush().map_err(|e| self.flush_error(e))?;
        self.checkpoint(CheckpointMode::IfChanged).map(drop)
    }
}
