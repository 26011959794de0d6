//! A chunk store in a local directory: chunk frames appended to pack files, found through
//! each pack's append-only index log and an in-memory index.
//!
//! ```text
//! <root>/packs/<16 hex>.pack    header, then (chunk id, frame) entries back to back
//! <root>/packs/<16 hex>.idx     header, then 64-byte records: stored / removed
//! <root>/packs/generation       8 bytes that change whenever chunks are removed
//! ```
//!
//! The layout is in [`pack`]; docs/format-chunk.md, "Local chunk store", has the byte
//! diagrams and the case analysis. Deduplication happens here (a chunk already present is
//! not written again); the store checks each frame's length, magic, version and crc before
//! writing it but holds no keys: decryption and the id check happen in
//! [`crate::decode_chunk`].
//!
//! # Writing, step by step
//!
//! 1. `put` appends the chunk's id and frame to this store's current pack (a pack it
//!    created in this open, with `O_EXCL` under a random name, and holds a shared `flock`
//!    on while it may still write it), and keeps the record *pending*. Pending chunks count
//!    for `contains` and deduplication; `get` does not find them (as before packs).
//! 2. `sync` (deferred mode: the caller's batch commit; immediate mode: inside each `put`)
//!    fdatasyncs every pack the pending records are in, then appends the records to those
//!    packs' index logs in one `write` each and fdatasyncs the logs, fsyncs `packs/` once if
//!    a pack was created since the last sync, and only then adds the records to the index.
//!    So a record only ever points at durable bytes, and the caller's manifest, written
//!    after `sync`, is the commit point.
//! 3. `remove` (garbage collection, healing) appends a `removed` record for every copy of
//!    the chunk to the log of the copy's pack and fdatasyncs it, then changes the
//!    generation file, so that other processes re-read the logs before they next answer
//!    `contains`.
//! 4. `reclaim` deletes packs whose every chunk was removed, and rewrites packs that are
//!    mostly dead: their live entries are appended to the current pack and synced, then the
//!    old log and the old pack are unlinked (log first). It only touches a pack it can
//!    lock exclusively, i.e. one that no process is writing.
//!
//! # Several processes
//!
//! The daemon and `keel snapshot` commands open one repository at once. Each writes only
//! packs it created; index logs are appended with `O_APPEND` by their pack's writer and by
//! removers, in whole records. A store learns of other processes' work by re-reading the
//! logs that grew or appeared (it remembers how far it read each): before answering
//! `contains` or `put` when the generation file changed (a removal elsewhere must never be
//! answered from memory: a snapshot would reference a chunk that is gone), when `get`
//! misses, when a pack file vanished (compacted elsewhere), and at the first page of a
//! listing. A chunk another process stored that this one does not know yet is at worst
//! written twice; both copies are valid and the index keeps one.
//!
//! # Invariants
//!
//! - An index record with a valid crc points at bytes made durable before it was written.
//! - A store appends frames only to packs it created in this open, and only while it holds
//!   their shared lock; nothing deletes a pack without its exclusive lock.
//! - After a failed write or fsync the store is poisoned and refuses further `put`s,
//!   `sync`s, `remove`s and `reclaim`s (fail-stop; an fsync is never retried).

mod index;
mod pack;
mod reclaim;
mod shared;
mod state;
#[cfg(test)]
mod tests;

pub use reclaim::ReclaimReport;

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Instant;

use self::index::Location;
use self::pack::{FileKind, Record, RecordKind, ENTRY_ID_LEN, HEADER_LEN, MAX_FRAME_LEN};
use self::shared::{flock, open_generation};
use self::state::State;
use crate::chunk::check_frame;
use crate::durable::{fdatasync, fsync_dir};
use crate::error::StoreError;
use crate::key::ChunkId;
use crate::lease::now_unix;

/// The directory under the store root that holds the packs.
const PACKS_DIR: &str = "packs";
/// Where the one-file-per-chunk layout kept chunks; a store refuses a root that has them.
const LEGACY_CHUNKS_DIR: &str = "chunks";
/// The file whose contents change whenever a store removes chunks or deletes packs.
const GENERATION_FILE: &str = "generation";

/// A new pack is started when the current one would pass this size.
///
/// 32 MiB: about 1000 compressed 64 KiB chunks per pack, so a 1 TiB repository has ~32 000
/// packs (a directory listing and a `stat` each when another process's writes are looked
/// for) and a 16 KiB-64 KiB index log per pack; rewriting a half-dead pack copies at most
/// 16 MiB; and a chunk's space comes back only when its pack is deleted or rewritten, so
/// packs much larger would hold garbage longer. restic's packs default to 16 MiB, kopia's
/// to 20-40 MB.
pub(crate) const PACK_TARGET: u64 = 32 << 20;
/// Open pack files kept for reads.
const OPEN_PACKS_MAX: usize = 64;

// Offsets and lengths fit the in-memory index's 32 bits.
const _: () = assert!(PACK_TARGET + (ENTRY_ID_LEN + MAX_FRAME_LEN) as u64 <= u32::MAX as u64);

/// What [`LocalChunkStore::put`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// The chunk was written.
    Written,
    /// The store already held the chunk; nothing was written (deduplicated).
    AlreadyPresent,
}

/// When a put is durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PersistMode {
    /// When `put` returns (two fdatasyncs per new chunk, shared by concurrent puts).
    Immediate,
    /// When [`LocalChunkStore::sync`] returns.
    Deferred,
}

/// Where a chunk's frame is stored (for `keel-inspect` and tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkLocation {
    /// The pack file.
    pub pack: PathBuf,
    /// Offset of the frame in the pack file (its 32-byte chunk id comes just before).
    pub offset: u64,
    /// Length of the frame.
    pub len: u64,
    /// When it was written, unix seconds.
    pub written_unix: i64,
}

/// A chunk as listed by [`LocalChunkStore::list`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredChunk {
    /// The chunk.
    pub id: ChunkId,
    /// Its frame's length.
    pub len: u64,
    /// When it was written, unix seconds.
    pub written_unix: i64,
}

/// What [`LocalChunkStore::stats`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Pack files with an index log.
    pub packs: u64,
    /// Their total size.
    pub pack_bytes: u64,
    /// Total size of the index logs.
    pub index_log_bytes: u64,
    /// Chunks the store serves.
    pub chunks: u64,
    /// Bytes of packs holding chunk copies the index names (frames and their ids).
    pub live_bytes: u64,
    /// Bytes of packs holding nothing the index names: removed chunks, writes never
    /// synced, headers. `reclaim` frees them.
    pub dead_bytes: u64,
    /// Copies beyond the first of a chunk (two processes stored it); counted as live.
    pub extra_copies: u64,
    /// Pack files with no stored record or no index log (a writer that crashed before its
    /// first sync, or one writing right now).
    pub orphan_packs: u64,
    /// Their size.
    pub orphan_bytes: u64,
    /// Index logs that show damage, with what is wrong.
    pub damaged_logs: Vec<String>,
    /// Heap bytes of the in-memory index.
    pub index_memory_bytes: u64,
}

/// A chunk store in a local directory. See the module docs.
#[derive(Debug)]
pub struct LocalChunkStore {
    root: PathBuf,
    packs_dir: PathBuf,
    mode: PersistMode,
    pack_target: u64,
    poisoned: AtomicBool,
    state: RwLock<State>,
    writer: Mutex<Writer>,
    /// Held for a whole `sync`, `remove`, and a reclaim's rewrite of one pack: this
    /// process's index log appends are serialized, and a sync's batch is complete before
    /// the next sync starts (immediate-mode puts rely on it).
    sync_lock: Mutex<()>,
    /// When the last re-read of the logs started.
    refreshed: Mutex<Option<Instant>>,
    reclaim_lock: Mutex<()>,
    readers: Mutex<HashMap<u32, Arc<File>>>,
    generation: File,
    generation_seen: AtomicU64,
    /// Seconds subtracted from the time recorded for new chunks (tests: chunks older than
    /// a garbage collection's start without waiting).
    backdate_secs: AtomicU64,
}

/// The packs this store writes and the records not yet in their logs.
#[derive(Debug, Default)]
struct Writer {
    /// The pack new frames go to.
    current: Option<OpenPack>,
    /// Earlier packs of this open that still have pending records (their shared locks
    /// are held until those records are in their logs).
    sealed: Vec<OpenPack>,
    /// Records written to packs but not yet to logs, in write order.
    pending: Vec<Pending>,
    /// How many pending records each id has.
    pending_ids: HashMap<ChunkId, u32>,
}

/// A pack this store created and may append to.
#[derive(Debug)]
struct OpenPack {
    slot: u32,
    name: u64,
    /// Read-write; holds the shared `flock` for as long as this store may write it.
    pack: Arc<File>,
    /// The index log, opened for appending.
    log: Arc<File>,
    /// Bytes written so far.
    len: u64,
    /// Whether the two files' names were made durable (a `packs/` fsync after creation).
    names_durable: bool,
    /// Bytes up to which writeback was started ([`WRITEBACK_STEP`]).
    written_back: u64,
}

/// A pack a sync makes durable, and its log.
struct SyncTarget {
    slot: u32,
    name: u64,
    pack: Arc<File>,
    log: Arc<File>,
    names_durable: bool,
}

/// A frame written to a pack whose record is not in the log yet.
#[derive(Debug, Clone, Copy)]
struct Pending {
    id: ChunkId,
    slot: u32,
    /// Offset of the frame (after its id).
    offset: u64,
    len: u32,
    written: i64,
    /// A reclaim's copy: the copy it replaces.
    replaces: Option<Location>,
}

impl Pending {
    fn record(&self) -> Record {
        Record { kind: RecordKind::Stored, id: self.id, offset: self.offset, len: self.len, written: self.written }
    }

    fn location(&self) -> Location {
        Location {
            pack: self.slot,
            // Fits: pack offsets are bounded by PACK_TARGET plus one entry (const assert).
            offset: u32::try_from(self.offset).unwrap_or(u32::MAX),
            len: self.len,
            written: u32::try_from(self.written.max(0)).unwrap_or(u32::MAX),
        }
    }
}

/// Why a chunk could not be read from the pack the index names.
enum ReadFailure {
    /// The pack file is gone (another process compacted or deleted it).
    Vanished,
    Store(StoreError),
}

impl From<StoreError> for ReadFailure {
    fn from(e: StoreError) -> Self {
        ReadFailure::Store(e)
    }
}

/// How many bytes a pack grows by before their writeback is started.
const WRITEBACK_STEP: u64 = 1 << 20;

/// Bytes `[from, to)` of a pack, whose writeback to the disk is to be started.
struct Writeback {
    pack: Arc<File>,
    from: u64,
    to: u64,
}

impl Writeback {
    /// Starts writing the range back to the disk, without waiting for it
    /// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`, as PostgreSQL's `checkpoint_flush_after`).
    /// Not for durability (the batch's fdatasync gives that, and reports any write error):
    /// so the disk writes a snapshot's packs as they grow instead of in one burst at the
    /// batch's fdatasync, which a primary's journal fdatasync on the same disk would queue
    /// behind. Best effort: an error here is reported by that fdatasync.
    fn start(self) {
        use std::os::fd::AsRawFd;
        let (Ok(offset), Ok(len)) = (i64::try_from(self.from), i64::try_from(self.to - self.from)) else { return };
        // SAFETY: sync_file_range only reads its integer arguments; the fd stays open while
        // `self.pack` is held.
        let _ = unsafe { libc::sync_file_range(self.pack.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE) };
    }
}

impl LocalChunkStore {
    /// Opens (creating if needed) a chunk store rooted at `dir`. Every `put` is durable
    /// when it returns (two fdatasyncs per new chunk: its pack, then its log; concurrent
    /// puts share them).
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_with(dir.as_ref(), PersistMode::Immediate, PACK_TARGET)
    }

    /// Opens a store whose `put`s are made durable in batches by [`LocalChunkStore::sync`]:
    /// a new chunk is appended to the current pack without an fsync, and `sync` makes every
    /// such chunk durable (one fdatasync per pack written and per log). Until `sync`, a new
    /// chunk counts as present for [`LocalChunkStore::contains`] and `put` (so concurrent
    /// writers of one chunk store it once) but `get` does not find it.
    ///
    /// Batches instead of two fsyncs per chunk: the snapshot benchmark spent 1.7 ms per
    /// 64 KiB chunk in fsyncs (docs/benchmarks.md).
    pub fn open_deferred(dir: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_with(dir.as_ref(), PersistMode::Deferred, PACK_TARGET)
    }

    fn open_with(root: &Path, mode: PersistMode, pack_target: u64) -> Result<Self, StoreError> {
        let root = root.to_owned();
        let legacy = root.join(LEGACY_CHUNKS_DIR);
        if fs::read_dir(&legacy).is_ok_and(|mut entries| entries.next().is_some()) {
            return Err(StoreError::LegacyLayout { path: legacy });
        }
        let packs_dir = root.join(PACKS_DIR);
        if create_dir(&packs_dir)? {
            fsync_dir(&root)?;
        }
        let generation = open_generation(&packs_dir.join(GENERATION_FILE))?;
        let store = LocalChunkStore {
            root,
            packs_dir,
            mode,
            pack_target,
            poisoned: AtomicBool::new(false),
            state: RwLock::new(State::default()),
            writer: Mutex::new(Writer::default()),
            sync_lock: Mutex::new(()),
            refreshed: Mutex::new(None),
            reclaim_lock: Mutex::new(()),
            readers: Mutex::new(HashMap::new()),
            generation,
            generation_seen: AtomicU64::new(0),
            backdate_secs: AtomicU64::new(0),
        };
        store.generation_seen.store(store.read_generation()?, Ordering::Release);
        store.refresh()?;
        Ok(store)
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Records chunks put from now on as written `secs` earlier (tests of garbage
    /// collection's "written after it started" rule, without waiting).
    #[cfg(test)]
    pub(crate) fn backdate_writes(&self, secs: u64) {
        self.backdate_secs.store(secs, Ordering::Relaxed);
    }

    /// Makes every chunk put so far durable and visible (a no-op when nothing is pending).
    /// On failure the store is poisoned (fail-stop: an fsync is never retried).
    pub fn sync(&self) -> Result<(), StoreError> {
        self.check_not_poisoned()?;
        let _sync = lock(&self.sync_lock);
        self.sync_locked()
    }

    /// [`LocalChunkStore::sync`] with `sync_lock` held.
    fn sync_locked(&self) -> Result<(), StoreError> {
        self.check_not_poisoned()?;
        // The batch: every pending record now. Puts that land meanwhile wait for the next
        // sync; nothing else removes pending records while `sync_lock` is held.
        let (batch, packs) = {
            let writer = lock(&self.writer);
            if writer.pending.is_empty() {
                return Ok(());
            }
            let slots: HashSet<u32> = writer.pending.iter().map(|p| p.slot).collect();
            let packs: Vec<SyncTarget> = writer
                .current
                .iter()
                .chain(&writer.sealed)
                .filter(|p| slots.contains(&p.slot))
                .map(|p| SyncTarget {
                    slot: p.slot,
                    name: p.name,
                    pack: Arc::clone(&p.pack),
                    log: Arc::clone(&p.log),
                    names_durable: p.names_durable,
                })
                .collect();
            (writer.pending.clone(), packs)
        };
        self.poison_on_error(|| {
            for target in &packs {
                // The frames must be durable before a record points at them.
                fdatasync(&target.pack, &self.file_path(target.name, FileKind::Pack), "fdatasync pack")?;
            }
            for target in &packs {
                let records: Vec<u8> =
                    batch.iter().filter(|p| p.slot == target.slot).flat_map(|p| p.record().encode()).collect();
                append_records(&target.log, &self.file_path(target.name, FileKind::Index), &records)?;
            }
            for target in &packs {
                // The records are the chunks' existence: durable before `sync` returns.
                fdatasync(&target.log, &self.file_path(target.name, FileKind::Index), "fdatasync index log")?;
            }
            if packs.iter().any(|target| !target.names_durable) {
                // The new packs' and logs' names, once for all of them.
                fsync_dir(&self.packs_dir)?;
            }
            Ok(())
        })?;
        // Publish: into the index, then out of the pending set (never in neither).
        let mut writer = lock(&self.writer);
        {
            let mut state = write(&self.state);
            for p in &batch {
                if let Some(old) = p.replaces {
                    state.remove_copy(&p.id, old.pack, u64::from(old.offset));
                }
                state.add_copy(p.id, p.location());
            }
        }
        // `sync_lock` is held: nothing removed pending records since the batch was taken.
        let done = batch.len().min(writer.pending.len());
        writer.pending.drain(..done);
        for p in &batch {
            if let Some(count) = writer.pending_ids.get_mut(&p.id) {
                *count -= 1;
                if *count == 0 {
                    writer.pending_ids.remove(&p.id);
                }
            }
        }
        let synced: HashSet<u32> = packs.iter().map(|target| target.slot).collect();
        let writer = &mut *writer;
        for pack in writer.current.iter_mut().chain(writer.sealed.iter_mut()) {
            if synced.contains(&pack.slot) {
                pack.names_durable = true;
            }
        }
        // A sealed pack with nothing pending is done: dropping it releases its lock.
        let pending = &writer.pending;
        writer.sealed.retain(|p| pending.iter().any(|q| q.slot == p.slot));
        Ok(())
    }

    /// True when the store holds chunk `id` (or, in deferred mode, will after `sync`).
    pub fn contains(&self, id: &ChunkId) -> Result<bool, StoreError> {
        self.check_generation()?;
        if lock(&self.writer).pending_ids.contains_key(id) {
            return Ok(true);
        }
        Ok(read(&self.state).index.get(id).is_some())
    }

    /// Stores the encoded chunk `bytes` as `id`; does nothing when the chunk is already
    /// present. `bytes` must be a well-formed frame ([`check_frame`]). Durable when this
    /// returns in immediate mode, after [`LocalChunkStore::sync`] in deferred mode.
    pub fn put(&self, id: &ChunkId, bytes: &[u8]) -> Result<PutOutcome, StoreError> {
        self.check_not_poisoned()?;
        check_frame(bytes).map_err(|source| StoreError::InvalidChunk { id: *id, source })?;
        self.check_generation()?;
        let (outcome, durable, writeback) = {
            let mut writer = lock(&self.writer);
            if writer.pending_ids.contains_key(id) {
                (PutOutcome::AlreadyPresent, false, None)
            } else if read(&self.state).index.get(id).is_some() {
                (PutOutcome::AlreadyPresent, true, None)
            } else {
                let written = now_unix().saturating_sub_unsigned(self.backdate_secs.load(Ordering::Relaxed));
                let writeback = self.poison_on_error(|| self.append(&mut writer, id, bytes, written, None))?;
                (PutOutcome::Written, false, writeback)
            }
        };
        // Outside the writer lock: it can wait for room in the disk's queue.
        if let Some(writeback) = writeback {
            writeback.start();
        }
        if self.mode == PersistMode::Immediate && !durable {
            // Also when another put's record of this chunk is pending: "present" must mean
            // durable here.
            self.sync()?;
        }
        Ok(outcome)
    }

    /// Appends `frame` (with its id before it) to the current pack, starting a new pack
    /// when the current one would pass the target size, and keeps its record pending.
    /// Returns the writeback to start once the writer lock is released, every
    /// [`WRITEBACK_STEP`] bytes.
    fn append(
        &self,
        writer: &mut Writer,
        id: &ChunkId,
        frame: &[u8],
        written: i64,
        replaces: Option<Location>,
    ) -> Result<Option<Writeback>, StoreError> {
        let len = u32::try_from(frame.len())
            .ok()
            .filter(|&len| len as usize <= MAX_FRAME_LEN)
            .ok_or(StoreError::Corrupt { path: self.packs_dir.clone(), offset: 0, what: "frame too long".into() })?;
        let entry_len = (ENTRY_ID_LEN + frame.len()) as u64;
        let full = |p: &OpenPack| p.len > HEADER_LEN as u64 && p.len + entry_len > self.pack_target;
        if writer.current.as_ref().is_none_or(full) {
            if let Some(old) = writer.current.take() {
                if writer.pending.iter().any(|p| p.slot == old.slot) {
                    writer.sealed.push(old);
                }
            }
            writer.current = Some(self.create_pack()?);
        }
        let Some(pack) = writer.current.as_mut() else {
            return Err(StoreError::Corrupt {
                path: self.packs_dir.clone(),
                offset: 0,
                what: "no current pack".into(),
            });
        };
        let path = self.file_path(pack.name, FileKind::Pack);
        let at = pack.len;
        let io = |source| StoreError::Io { op: "write to pack", path: path.clone(), source };
        pack.pack.write_all_at(&id.0, at).map_err(io)?;
        pack.pack.write_all_at(frame, at + ENTRY_ID_LEN as u64).map_err(io)?;
        pack.len += entry_len;
        let writeback = (pack.len - pack.written_back >= WRITEBACK_STEP).then(|| {
            let writeback = Writeback { pack: Arc::clone(&pack.pack), from: pack.written_back, to: pack.len };
            pack.written_back = pack.len;
            writeback
        });
        let record = Pending { id: *id, slot: pack.slot, offset: at + ENTRY_ID_LEN as u64, len, written, replaces };
        writer.pending.push(record);
        *writer.pending_ids.entry(*id).or_default() += 1;
        Ok(writeback)
    }

    /// Creates a pack and its log under a fresh random name, takes the pack's shared lock
    /// and writes both headers (durable with the first sync that has records in them).
    fn create_pack(&self) -> Result<OpenPack, StoreError> {
        for _ in 0..16 {
            let name: u64 = rand::random();
            let pack_path = self.file_path(name, FileKind::Pack);
            let pack = match OpenOptions::new().read(true).write(true).create_new(true).open(&pack_path) {
                Ok(file) => file,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(source) => return Err(StoreError::Io { op: "create pack", path: pack_path, source }),
            };
            flock(&pack, libc::LOCK_SH).map_err(|source| StoreError::Io {
                op: "lock pack",
                path: pack_path.clone(),
                source,
            })?;
            pack.write_all_at(&pack::encode_header(FileKind::Pack, name), 0).map_err(|source| StoreError::Io {
                op: "write pack header",
                path: pack_path.clone(),
                source,
            })?;
            let log_path = self.file_path(name, FileKind::Index);
            let log = match OpenOptions::new().append(true).create_new(true).open(&log_path) {
                Ok(file) => file,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    // A stray log without its pack (never left by this code): pick another name.
                    let _ = fs::remove_file(&pack_path);
                    continue;
                }
                Err(source) => return Err(StoreError::Io { op: "create index log", path: log_path, source }),
            };
            append_records(&log, &log_path, &pack::encode_header(FileKind::Index, name))?;
            let slot = write(&self.state).register(name, HEADER_LEN as u64);
            return Ok(OpenPack {
                slot,
                name,
                pack: Arc::new(pack),
                log: Arc::new(log),
                len: HEADER_LEN as u64,
                names_durable: false,
                written_back: 0,
            });
        }
        Err(StoreError::Io {
            op: "create pack",
            path: self.packs_dir.clone(),
            source: io::Error::new(io::ErrorKind::AlreadyExists, "16 random pack names were all taken"),
        })
    }

    /// Reads the encoded chunk `id` (decode it with [`crate::decode_chunk`]).
    ///
    /// A chunk this store does not know, or whose pack vanished (rewritten by another
    /// process's reclaim), is looked for again after re-reading the logs; so is every
    /// chunk after another process removed chunks.
    pub fn get(&self, id: &ChunkId) -> Result<Vec<u8>, StoreError> {
        // A copy removed elsewhere (healing replaced it) must not be read from memory.
        self.check_generation()?;
        let not_found = || StoreError::NotFound { id: *id, path: self.packs_dir.clone() };
        for attempt in 0..2 {
            let found = {
                let state = read(&self.state);
                state.index.get(id).and_then(|l| state.pack(l.pack).map(|p| (l, p.name)))
            };
            match found {
                None => {
                    // A pending chunk is not readable before `sync` (see `open_deferred`).
                    if attempt > 0 || lock(&self.writer).pending_ids.contains_key(id) {
                        return Err(not_found());
                    }
                }
                Some((location, name)) => match self.read_frame(id, &location, name) {
                    Ok(frame) => return Ok(frame),
                    Err(ReadFailure::Store(e)) => return Err(e),
                    Err(ReadFailure::Vanished) if attempt > 0 => return Err(not_found()),
                    Err(ReadFailure::Vanished) => {}
                },
            }
            self.refresh()?;
        }
        Err(not_found())
    }

    /// Where chunk `id` is stored, if the store holds it.
    pub fn locate(&self, id: &ChunkId) -> Result<Option<ChunkLocation>, StoreError> {
        let find = || {
            let state = read(&self.state);
            state.index.get(id).and_then(|l| {
                state.pack(l.pack).map(|p| ChunkLocation {
                    pack: self.file_path(p.name, FileKind::Pack),
                    offset: u64::from(l.offset),
                    len: u64::from(l.len),
                    written_unix: i64::from(l.written),
                })
            })
        };
        if let Some(found) = find() {
            return Ok(Some(found));
        }
        self.refresh()?;
        Ok(find())
    }

    /// Reads a frame and checks that its entry names `id`.
    fn read_frame(&self, id: &ChunkId, location: &Location, name: u64) -> Result<Vec<u8>, ReadFailure> {
        let file = self.open_pack(location.pack, name)?;
        let path = self.file_path(name, FileKind::Pack);
        let offset = u64::from(location.offset);
        let entry_at = offset.checked_sub(ENTRY_ID_LEN as u64).ok_or_else(|| StoreError::Corrupt {
            path: path.clone(),
            offset,
            what: format!("chunk {id}'s frame offset is inside the pack header"),
        })?;
        let mut entry = vec![0u8; ENTRY_ID_LEN + location.len as usize];
        match file.read_exact_at(&mut entry, entry_at) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(ReadFailure::Store(StoreError::Corrupt {
                    path,
                    offset: entry_at,
                    what: format!("the pack ends inside chunk {id}'s {}-byte entry", entry.len()),
                }))
            }
            Err(source) => return Err(ReadFailure::Store(StoreError::Io { op: "read pack", path, source })),
        }
        match entry.first_chunk::<ENTRY_ID_LEN>() {
            Some(found) if found == id.as_bytes() => {}
            found => {
                let found = found.map_or_else(String::new, |f| ChunkId(*f).to_string());
                return Err(ReadFailure::Store(StoreError::Corrupt {
                    path,
                    offset: entry_at,
                    what: format!("the entry there is chunk {found}, the index log says {id}"),
                }));
            }
        }
        entry.drain(..ENTRY_ID_LEN);
        Ok(entry)
    }

    /// The open pack file in `slot`, its header checked when first opened.
    fn open_pack(&self, slot: u32, name: u64) -> Result<Arc<File>, ReadFailure> {
        if let Some(file) = lock(&self.readers).get(&slot) {
            return Ok(Arc::clone(file));
        }
        let path = self.file_path(name, FileKind::Pack);
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(ReadFailure::Vanished),
            Err(source) => return Err(StoreError::Io { op: "open pack", path, source }.into()),
        };
        let mut header = [0u8; HEADER_LEN];
        let read = read_at_most(&file, &mut header, 0).map_err(|source| StoreError::Io {
            op: "read pack header",
            path: path.clone(),
            source,
        })?;
        if let Err(what) = pack::check_header(FileKind::Pack, name, header.get(..read).unwrap_or_default()) {
            return Err(StoreError::Corrupt { path, offset: 0, what }.into());
        }
        let file = Arc::new(file);
        let mut readers = lock(&self.readers);
        if readers.len() >= OPEN_PACKS_MAX {
            if let Some(victim) = readers.keys().next().copied() {
                readers.remove(&victim);
            }
        }
        readers.insert(slot, Arc::clone(&file));
        Ok(file)
    }

    /// Removes chunk `id` (every copy); returns false when it was not there. The removal
    /// is durable when this returns. Only garbage collection and healing call this.
    pub fn remove(&self, id: &ChunkId) -> Result<bool, StoreError> {
        self.check_not_poisoned()?;
        let _sync = lock(&self.sync_lock);
        self.check_generation()?;
        // A pending copy (never in a log) is simply dropped; its bytes become dead.
        let mut removed = {
            let mut writer = lock(&self.writer);
            let before = writer.pending.len();
            writer.pending.retain(|p| p.id != *id);
            writer.pending_ids.remove(id);
            writer.pending.len() != before
        };
        for attempt in 0..2 {
            let copies: Vec<(Location, u64)> = {
                let state = read(&self.state);
                state.copies(id).into_iter().filter_map(|l| state.pack(l.pack).map(|p| (l, p.name))).collect()
            };
            if copies.is_empty() {
                break;
            }
            let mut vanished = false;
            for (location, name) in copies {
                // Shared lock: a reclaim (exclusive) is not rewriting this pack meanwhile.
                let Some(_lock) = self.lock_pack(name, libc::LOCK_SH)? else {
                    vanished = true;
                    continue;
                };
                let record = Record {
                    kind: RecordKind::Removed,
                    id: *id,
                    offset: u64::from(location.offset),
                    len: location.len,
                    written: now_unix(),
                };
                let path = self.file_path(name, FileKind::Index);
                let log = match OpenOptions::new().append(true).open(&path) {
                    Ok(log) => log,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        vanished = true;
                        continue;
                    }
                    Err(source) => return Err(StoreError::Io { op: "open index log", path, source }),
                };
                self.poison_on_error(|| {
                    append_records(&log, &path, &record.encode())?;
                    // The removal must not come undone: GC reports the chunk deleted.
                    fdatasync(&log, &path, "fdatasync index log")
                })?;
                write(&self.state).remove_copy(id, location.pack, u64::from(location.offset));
                removed = true;
            }
            if !vanished || attempt > 0 {
                break;
            }
            // A pack was rewritten elsewhere: find the chunk's new copy.
            self.refresh()?;
        }
        if removed {
            self.bump_generation()?;
        }
        Ok(removed)
    }

    /// Up to `limit` chunks with ids greater than `after`, in ascending id order. The first
    /// page (`after` = `None`) re-reads the logs first, so a walk sees what every process
    /// had stored when it began.
    pub fn list(&self, after: Option<&ChunkId>, limit: usize) -> Result<Vec<StoredChunk>, StoreError> {
        match after {
            None => self.refresh()?,
            Some(_) => self.check_generation()?,
        }
        let state = read(&self.state);
        Ok(state
            .index
            .range(after, limit)
            .into_iter()
            .map(|e| StoredChunk {
                id: e.id,
                len: u64::from(e.location.len),
                written_unix: i64::from(e.location.written),
            })
            .collect())
    }

    fn file_path(&self, name: u64, kind: FileKind) -> PathBuf {
        self.packs_dir.join(pack::file_name(name, kind))
    }

    fn check_not_poisoned(&self) -> Result<(), StoreError> {
        if self.poisoned.load(Ordering::Acquire) {
            return Err(StoreError::Poisoned { path: self.root.clone() });
        }
        Ok(())
    }

    fn poison_on_error<T>(&self, op: impl FnOnce() -> Result<T, StoreError>) -> Result<T, StoreError> {
        let result = op();
        if result.is_err() {
            self.poisoned.store(true, Ordering::Release);
        }
        result
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|p| p.into_inner())
}

/// Appends `bytes` (whole records, or a header) to a log opened with `O_APPEND`, in one
/// `write`: concurrent appenders (another process removing a chunk) then never interleave
/// inside a record. A short write is an error, never continued (the rest would land after
/// someone else's record).
fn append_records(log: &File, path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let mut writer: &File = log;
    match writer.write(bytes) {
        Ok(n) if n == bytes.len() => Ok(()),
        Ok(n) => Err(StoreError::Io {
            op: "append to index log",
            path: path.to_owned(),
            source: io::Error::new(io::ErrorKind::WriteZero, format!("short write: {n} of {} bytes", bytes.len())),
        }),
        Err(source) => Err(StoreError::Io { op: "append to index log", path: path.to_owned(), source }),
    }
}

/// Reads up to `buf.len()` bytes at `offset`; returns how many (fewer only at the end of
/// the file).
fn read_at_most(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while let Some(rest) = buf.get_mut(done..).filter(|r| !r.is_empty()) {
        match file.read_at(rest, offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Creates one directory level; true if this call created it.
fn create_dir(dir: &Path) -> Result<bool, StoreError> {
    match fs::create_dir(dir) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(source) => Err(StoreError::Io { op: "create directory", path: dir.to_owned(), source }),
    }
}
