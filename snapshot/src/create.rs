//! Taking a snapshot: read the chunks that changed, seal the new ones into a vault, write
//! the manifest last.
//!
//! ```text
//!  16 readers ──(batch, buffer)──▶ N sealing workers ──▶ vault.put_chunk
//!  (1 at a time if paced)            (SCHED_IDLE by default)
//!       ▲  read only changed chunks, │ hole? id known? seal, put
//!       │  leaving no page cached    │
//!       └──── buffers come back ◀────┘──(batch of entries)──▶ collector → index chunks → manifest
//! ```
//!
//! - Incremental: with a parent manifest and the set of chunks changed since its marker,
//!   only those chunks are read. The manifest's ids live in index chunks of `fanout`
//!   entries (docs/format-manifest.md): a range with no change keeps its parent's index
//!   chunk as it is, and the collector writes a new index chunk for a range as soon as the
//!   last of its changed chunks is sealed (the parent's ids with the changes applied). So
//!   the work and the bytes written follow the change, not the volume's size, and memory
//!   holds only the ranges in progress. Without a trustworthy change set
//!   ([`Changed::All`]) every chunk is read, and the manifest says so (`full_read`); so it
//!   is when an index chunk of the parent cannot be read.
//! - Memory is bounded: `readers + 2 × threads + 1` batch buffers of 1 MiB (one chunk,
//!   when chunks are larger) in flight.
//! - Paced, a batch is 64 KiB, read in one request, one batch at a time and in order:
//!   always with `read_limit` (and one reader), and while the source is being written with
//!   `busy_read_limit` (a quiet source is read at full speed). The sealing threads run at
//!   `cpu_priority` (`crate::priority`), the readers too between their reads.
//! - Dedup costs one keyed hash: a chunk whose id the vault already holds is not sealed.
//! - The upload holds a lease ([`UploadLease`]) so GC cannot sweep chunks it is about to
//!   reference; the manifest is written only while the lease is valid, and last.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use keel_engine::{AlignedBuf, UncachedReader};

use crate::chunk::{is_zero, seal_chunk};
use crate::error::{ChunkError, IndexError, ManifestError};
use crate::key::{ChunkId, TenantKey};
use crate::lease::{now_unix, LeaseError, UploadLease};
use crate::manifest::piece::encode_piece;
use crate::manifest::{
    encode_manifest, ChunkMap, GroupV2, Manifest, ManifestV1, ManifestV3, StatsV1, HOLE, INDEX_FANOUT,
};
use crate::priority::{CpuPriority, Lowered};
use crate::vault::{keys, Put, Vault, VaultError};

/// Where a snapshot's bytes come from: a frozen volume view, an image file, a stream.
pub trait Source: Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` with the bytes at `offset` (never past [`Source::size`]).
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), String>;
    /// The reader is done with `[offset, offset+len)` (a frozen view stops preserving it).
    fn release(&self, _offset: u64, _len: u64) {}
    /// True when reads must come in ascending order (a stream): then one thread reads.
    fn sequential(&self) -> bool {
        false
    }
    /// How many writes the source has taken since the snapshot's point (a frozen view:
    /// since its marker), for yielding the disk to them (`busy_read_limit`); `None` for a
    /// source nobody writes (an image).
    fn writes(&self) -> Option<u64> {
        None
    }
}

/// Which chunks may differ from the parent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Changed {
    /// Read everything; the reason is recorded in the report.
    All(String),
    /// Only these chunk indices (ascending) may differ from the parent.
    Chunks(Vec<u64>),
}

/// What to record about the snapshot being taken.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Volume name (the manifest key's directory).
    pub volume: String,
    /// The marker's name.
    pub marker: String,
    /// The marker's journal seq (0 for images, which have no journal).
    pub marker_seq: u64,
    /// This node's name.
    pub node: String,
    /// Chunk size in bytes (a power of two, 4 KiB … 16 MiB).
    pub chunk_size: u32,
    /// zstd level.
    pub zstd_level: i32,
    /// Sealing threads (≥ 1).
    pub threads: usize,
    /// The snapshot id; [`new_snapshot_id`] when `None`.
    pub snapshot_id: Option<String>,
    /// When the marker was taken, unix seconds; now when `None`.
    pub created_unix: Option<i64>,
    /// The consistency group, for a member of one.
    pub group: Option<GroupV2>,
    /// Bytes per second the snapshot may read from the source, 64 KiB per request from
    /// one reader; `None` reads as fast as the source allows (many readers, 1 MiB
    /// requests). Leaves the disk (and, as sealing follows reading, the CPU) to the
    /// volume's writers while a snapshot runs.
    pub read_limit: Option<u64>,
    /// Bytes per second the snapshot may read while the source is being written (a write
    /// within the last [`BUSY_WINDOW`], from [`Source::writes`]), 64 KiB per request, one
    /// request at a time; a quiet source is read as `read_limit` says. `None`: no such
    /// limit. A volume's writes (FLUSHes above all) then never queue behind more than one
    /// small snapshot read, and a quiet volume is read at full speed.
    pub busy_read_limit: Option<u64>,
    /// The CPU priority of the snapshot's sealing threads, and of its readers between
    /// their reads ([`CpuPriority::Idle`] by default: the volume's writers first).
    pub cpu_priority: CpuPriority,
    /// Set by the caller to stop the snapshot (a node shutting down): it ends with
    /// [`CreateError::Stopped`] at the next batch read, having published nothing.
    pub stop: Option<Arc<AtomicBool>>,
}

/// Progress of a running snapshot, restore or copy.
#[derive(Debug, Clone, Copy, Default)]
pub struct Progress {
    /// Units done (bytes read, or chunks).
    pub done: u64,
    /// Units in all.
    pub total: u64,
}

/// What a finished snapshot did.
#[derive(Debug, Clone)]
pub struct CreateReport {
    /// The snapshot's id.
    pub snapshot_id: String,
    /// The manifest key in the vault.
    pub manifest_key: String,
    /// Why every chunk was read, when it was.
    pub full_read: Option<String>,
    /// Counts (also in the manifest).
    pub stats: StatsV1,
    /// Chunks in the volume.
    pub chunks_total: u64,
    /// Index chunks this snapshot wrote (the ranges it changed; the others are its
    /// parent's).
    pub index_written: u64,
    /// Bytes read from the source.
    pub bytes_read: u64,
}

/// Why a snapshot could not be taken.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CreateError {
    /// Bad options or a parent that does not fit.
    #[error("snapshot of {volume}: {reason}")]
    Invalid {
        /// The volume.
        volume: String,
        /// What is wrong.
        reason: String,
    },
    /// Reading the source failed.
    #[error("snapshot of {volume}: read at {offset}: {reason}")]
    Read {
        /// The volume.
        volume: String,
        /// The offset read.
        offset: u64,
        /// The source's error.
        reason: String,
    },
    /// Sealing a chunk failed.
    #[error("snapshot of {volume}: {0}", volume = .1)]
    Chunk(#[source] ChunkError, String),
    /// The vault failed.
    #[error(transparent)]
    Vault(#[from] VaultError),
    /// The upload lease could not be taken or ran out.
    #[error(transparent)]
    Lease(#[from] LeaseError),
    /// The manifest could not be built.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// An index chunk of the parent became unreadable while the snapshot was taken.
    #[error(transparent)]
    Index(#[from] IndexError),
    /// The caller asked it to stop (the node is shutting down); nothing was published.
    #[error("snapshot of {volume}: stopped, the node is shutting down (it is taken again later)")]
    Stopped {
        /// The volume.
        volume: String,
    },
}

impl CreateError {
    /// True when the snapshot should simply be retried later (vault down, GC running).
    pub fn is_transient(&self) -> bool {
        match self {
            CreateError::Vault(e) => e.is_transient(),
            CreateError::Lease(e) => e.is_transient(),
            CreateError::Stopped { .. } => true,
            _ => false,
        }
    }
}

/// Chunks read between two [`Vault::sync`] calls while a snapshot is taken.
const SYNC_EVERY: usize = 4096;
/// Reader threads of a snapshot (a quarter as many for chunks over 1 MiB): reads of
/// scattered chunks wait for the disk, and several in flight keep it busy. The sealing
/// threads are the CPU-bound part.
const READERS: usize = 16;
/// A reader's batch: this many bytes of chunks (at least one chunk), consecutive ones read
/// in one request, so a full read goes to the disk in large requests.
const BATCH_BYTES: u64 = 1 << 20;
/// A paced reader's batch, and its largest request (a larger chunk is read in pieces): one
/// change-map region. A FLUSH of the volume's writers that reaches the disk behind a
/// snapshot read waits for this much, and a batch of smaller chunks still covers a whole
/// region, so a frozen view stops preserving it as soon as it is read.
const PACED_BYTES: u64 = 64 << 10;
/// A source written within this long is busy (`busy_read_limit`). Long enough that a
/// database writing every few hundred milliseconds stays busy between its writes (the first
/// write after a quiet spell still meets full-speed reads), short enough that a volume
/// gone quiet is soon read at full speed.
pub const BUSY_WINDOW: std::time::Duration = std::time::Duration::from_secs(1);

/// A new snapshot id: the UTC time to the microsecond and 32 random bits, so the ids of
/// one volume's snapshots sort in the order they were taken (`20261130T070000.123456Z-…`).
pub fn new_snapshot_id(unix: i64) -> String {
    let micros = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_micros());
    let compact = utc_compact(unix);
    let (seconds, _) = compact.split_at(compact.len() - 1);
    format!("{seconds}.{micros:06}Z-{:08x}", rand::random::<u32>())
}

/// `YYYYMMDDTHHMMSSZ` for unix seconds.
pub fn utc_compact(unix: i64) -> String {
    let (y, m, d, hh, mm, ss) = civil(unix);
    format!("{y:04}{m:02}{d:02}T{hh:02}{mm:02}{ss:02}Z")
}

/// `YYYY-MM-DD HH:MM:SS` UTC for unix seconds.
pub fn utc_display(unix: i64) -> String {
    let (y, m, d, hh, mm, ss) = civil(unix);
    format!("{y:04}-{m:02}-{d:02} {hh:02}:{mm:02}:{ss:02}")
}

/// Calendar fields of unix seconds (UTC): (year, month, day, hour, minute, second).
fn civil(unix: i64) -> (i64, u32, u32, u32, u32, u32) {
    let (y, m, d) = crate::tz::civil_from_days(unix.div_euclid(86_400));
    let secs = unix.rem_euclid(86_400);
    (y, m, d, (secs / 3600) as u32, (secs % 3600 / 60) as u32, (secs % 60) as u32)
}

/// Checks a chunk size: a power of two from 4 KiB to 16 MiB.
pub fn check_chunk_size(chunk_size: u32) -> Result<(), String> {
    if !chunk_size.is_power_of_two() || !(4096..=16 << 20).contains(&chunk_size) {
        return Err(format!("chunk size {chunk_size} is not a power of two from 4 KiB to 16 MiB"));
    }
    Ok(())
}

/// Takes a snapshot of `source` into `vault`, its sealing threads at
/// `options.cpu_priority`. See the module docs.
///
/// `parent` must be the authenticated manifest `changed` is relative to; it is ignored
/// (with the reason recorded) when its size or chunk size differ.
pub fn create_snapshot(
    key: &TenantKey,
    vault: &dyn Vault,
    source: &dyn Source,
    options: &CreateOptions,
    parent: Option<&Manifest>,
    changed: Changed,
    progress: &(dyn Fn(Progress) + Sync),
) -> Result<CreateReport, CreateError> {
    let volume = options.volume.clone();
    let invalid = |reason: String| CreateError::Invalid { volume: volume.clone(), reason };
    check_chunk_size(options.chunk_size).map_err(invalid)?;
    keys::check(&volume).map_err(|r| invalid(format!("volume name {volume:?} cannot name a vault key: {r}")))?;
    let size = source.size();
    let chunk_size = u64::from(options.chunk_size);
    let chunk_count = ManifestV1::chunk_count(size, options.chunk_size);
    let created_unix = options.created_unix.unwrap_or_else(now_unix);
    let snapshot_id = options.snapshot_id.clone().unwrap_or_else(|| new_snapshot_id(created_unix));
    keys::check(&snapshot_id).map_err(|r| invalid(format!("snapshot id {snapshot_id:?}: {r}")))?;

    // Decide what to read, and which parent ranges the new index chunks start from.
    let repo = [vault];
    let parent_map = parent.map(|p| ChunkMap::new(key, &repo, p));
    let (base, mut to_read, mut full_read) = match (&parent_map, changed) {
        (Some(p), _) if p.manifest().volume_size() != size || u64::from(p.manifest().chunk_size()) != chunk_size => (
            None,
            (0..chunk_count).collect::<Vec<_>>(),
            Some(format!(
                "the parent {} has size {} and chunk size {}, the volume {size} and {chunk_size}",
                p.manifest().snapshot_id(),
                p.manifest().volume_size(),
                p.manifest().chunk_size()
            )),
        ),
        (Some(p), Changed::Chunks(mut list)) => {
            // Ascending and unique, as batching and releasing need (a short last chunk
            // must come last in its batch).
            list.sort_unstable();
            list.dedup();
            list.retain(|&i| i < chunk_count);
            (Some(p), list, None)
        }
        (_, Changed::All(reason)) => (None, (0..chunk_count).collect(), Some(reason)),
        (None, Changed::Chunks(_)) => {
            (None, (0..chunk_count).collect(), Some("there is no parent snapshot".to_owned()))
        }
    };
    let fanout = base.map_or(u64::from(INDEX_FANOUT), |p| p.fanout());
    // Every parent range a change lands in must be readable before anything is read: an
    // unreadable one (damaged in every vault given) makes this a full read instead of a
    // snapshot that cannot finish.
    let mut base = base;
    if let Some(p) = base {
        let mut last = None;
        for &index in &to_read {
            let piece = (index / fanout) as usize;
            if last == Some(piece) {
                continue;
            }
            last = Some(piece);
            if let Err(e) = p.piece(piece) {
                full_read = Some(format!("the parent's index is unreadable: {e}"));
                to_read = (0..chunk_count).collect();
                base = None;
                break;
            }
        }
    }
    let parent_id = base.map(|p| p.manifest().snapshot_id().to_owned());
    let mut index = IndexBuilder::new(key, vault, base, chunk_count, fanout, &to_read, options);

    // The source need not preserve what will not be read (a frozen view stops copying it).
    release_unread(source, &to_read, chunk_count, chunk_size, size);

    let holder = format!("{}:{}", options.node, std::process::id());
    let mut lease = UploadLease::begin(
        vault,
        &holder,
        &format!("{volume}@{snapshot_id}"),
        &format!("snapshot {volume}/{snapshot_id}"),
    )?;

    let threads = options.threads.max(1);
    let stats = Mutex::new(StatsV1 { chunks_read: to_read.len() as u64, ..StatsV1::default() });
    let bytes_read = AtomicU64::new(0);
    let total_bytes: u64 = to_read.iter().map(|&i| chunk_size.min(size - i * chunk_size)).sum();
    let cancel = AtomicBool::new(false);
    let first_error: Mutex<Option<CreateError>> = Mutex::new(None);
    let fail = |e: CreateError| {
        cancel.store(true, Ordering::Release);
        let mut slot = first_error.lock().unwrap_or_else(|p| p.into_inner());
        slot.get_or_insert(e);
    };

    // A batch travels whole, reader → worker → free list, with one wake-up per hand-over
    // (per chunk, switching threads cost a fifth of a full snapshot's CPU).
    let (work_tx, work_rx) = mpsc::sync_channel::<(Range<usize>, AlignedBuf)>(threads);
    // Shared by the workers only: when the last one stops (done, or after a failure), a
    // reader blocked handing over a run gets an error instead of waiting forever.
    let work_rx = Arc::new(Mutex::new(work_rx));
    let reads = Reads {
        source,
        always: options.read_limit.filter(|&rate| rate > 0).map(Pacer::new),
        busy: options.busy_read_limit.filter(|&rate| rate > 0).map(Pacer::new),
        seen: Mutex::new((0, None)),
        one_at_a_time: Mutex::new(()),
    };
    // A reader takes its next batch from the front of `to_read`: 1 MiB of chunks read in
    // one request per run, or, paced, 64 KiB (a FLUSH of the volume's writers that reaches
    // the disk behind a snapshot read then waits for 64 KiB, not a megabyte; and a paced
    // 1 MiB batch, read in 64 KiB pieces, still made the write p99 worse than 64 KiB
    // batches: docs/benchmarks.md). Large requests from many readers read fastest.
    let (big_batch, paced_batch) =
        ((BATCH_BYTES / chunk_size).max(1) as usize, (PACED_BYTES / chunk_size).max(1) as usize);
    let capacity = BATCH_BYTES.max(chunk_size) as usize;
    let readers = if source.sequential() || reads.always.is_some() {
        1
    } else if chunk_size <= BATCH_BYTES {
        READERS
    } else {
        READERS / 4
    };
    // Buffers for the runs being read, queued and sealed: bounded memory.
    let buffers = readers + 2 * threads + 1;
    let (free_tx, free_rx) = mpsc::sync_channel::<AlignedBuf>(buffers);
    for _ in 0..buffers {
        let _ = free_tx.send(AlignedBuf::zeroed(capacity));
    }
    let free_rx: Mutex<Receiver<AlignedBuf>> = Mutex::new(free_rx);
    // Position in `to_read` of the next chunk no reader has taken.
    let next_chunk = AtomicUsize::new(0);
    let (done_tx, done_rx) = mpsc::channel::<Vec<(u64, [u8; 32])>>();

    let sealed = std::thread::scope(|scope| {
        // Readers: each takes the next batch of chunks and a buffer from the free list,
        // reads consecutive chunks in one request each (aligned, so an image is read past
        // the page cache; a frozen volume leaves no pages there either), and hands the
        // batch to a worker. Several readers keep an incremental's scattered reads in
        // flight (one waited for the disk on every chunk: 1.2 s for 10 104 chunks).
        let (to_read, cancel, fail, volume, bytes_read) = (&to_read, &cancel, &fail, &volume, &bytes_read);
        let (free_rx, next_chunk, reads) = (&free_rx, &next_chunk, &reads);
        let mut reader_threads = Vec::with_capacity(readers);
        for _ in 0..readers {
            let reader_tx = work_tx.clone();
            reader_threads.push(scope.spawn(move || {
                // The reads run at the caller's priority: they take the frozen view's stripe
                // locks and the kernel's locks of the block store's file, which a writer may
                // wait for under the journal lock. Everything else (waiting for a buffer and
                // for the pacer, handing over) yields to the volume's writers.
                let lowered = Lowered::new(options.cpu_priority);
                loop {
                    if cancel.load(Ordering::Acquire) {
                        return;
                    }
                    if options.stop.as_ref().is_some_and(|stop| stop.load(Ordering::Acquire)) {
                        fail(CreateError::Stopped { volume: volume.clone() });
                        return;
                    }
                    let Ok(mut buf) = free_rx.lock().unwrap_or_else(|p| p.into_inner()).recv() else { return };
                    // A paced batch is taken and read in turn: paced batches reach the
                    // disk one at a time and in order, one sequential stream as from a
                    // single reader. (Readers pacing the batches they held in whatever
                    // order they got the turn made the reads jump about, and the volume's
                    // write p99 worse: docs/benchmarks.md.)
                    let pacer = reads.pacer(Instant::now());
                    let turn = pacer.map(|_| reads.one_at_a_time.lock().unwrap_or_else(|p| p.into_inner()));
                    let take = if pacer.is_some() { paced_batch } else { big_batch };
                    let first = next_chunk.fetch_add(take, Ordering::Relaxed);
                    if first >= to_read.len() {
                        return;
                    }
                    let batch = first..(first + take).min(to_read.len());
                    let Some(indices) = to_read.get(batch.clone()) else { return };
                    let len = match read_batch(reads, pacer, &lowered, indices, chunk_size, size, &mut buf) {
                        Ok(len) => len,
                        Err((offset, reason)) => {
                            fail(CreateError::Read { volume: volume.clone(), offset, reason });
                            return;
                        }
                    };
                    drop(turn);
                    let read = bytes_read.fetch_add(len, Ordering::Relaxed) + len;
                    progress(Progress { done: read, total: total_bytes });
                    if reader_tx.send((batch, buf)).is_err() {
                        return;
                    }
                }
            }));
        }
        drop(work_tx);
        // Workers: per chunk of a run, hole check, keyed hash, dedup check, seal, put.
        for _ in 0..threads {
            let done_tx = done_tx.clone();
            let free_tx = free_tx.clone();
            let work_rx = Arc::clone(&work_rx);
            let stats = &stats;
            scope.spawn(move || {
                // The CPU-bound part yields to the volume's writers, for good: it takes no
                // lock the write path takes. (The readers go back to their own priority for
                // each read and release, which take the frozen view's stripe locks; the
                // collector, releasing what is not read, stays at the caller's.)
                crate::priority::lower(options.cpu_priority);
                loop {
                    let next = work_rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                    let Ok((batch, buf)) = next else { return };
                    let mut sealed = Vec::with_capacity(batch.len());
                    for (&index, plain) in to_read[batch].iter().zip(buf.chunks(chunk_size as usize)) {
                        if cancel.load(Ordering::Acquire) {
                            return;
                        }
                        let entry = match seal_one(key, vault, plain, options.zstd_level) {
                            Ok(Sealed::Hole) => {
                                stats.lock().unwrap_or_else(|p| p.into_inner()).zero_chunks += 1;
                                HOLE
                            }
                            Ok(Sealed::Present(id)) => id.0,
                            Ok(Sealed::Written(id, stored)) => {
                                let mut s = stats.lock().unwrap_or_else(|p| p.into_inner());
                                s.new_chunks += 1;
                                s.new_stored_bytes += stored;
                                s.new_plain_bytes += plain.len() as u64;
                                id.0
                            }
                            Err(e) => {
                                fail(match e {
                                    SealError::Chunk(e) => CreateError::Chunk(e, volume.to_string()),
                                    SealError::Vault(e) => CreateError::Vault(e),
                                });
                                return;
                            }
                        };
                        sealed.push((index, entry));
                    }
                    let _ = free_tx.send(buf);
                    if done_tx.send(sealed).is_err() {
                        return;
                    }
                }
            });
        }
        drop((done_tx, free_tx, work_rx));
        // Collector (this thread): gathers the entries into index chunks, renews the
        // lease, and makes the chunks durable in batches (bounding what a deferred store
        // holds pending).
        let mut done = 0usize;
        for sealed in done_rx.iter() {
            let before = done;
            done += sealed.len();
            let step = index.add(sealed).and_then(|()| lease.renew().map_err(CreateError::from)).and_then(|()| {
                if done / SYNC_EVERY > before / SYNC_EVERY {
                    vault.sync()?;
                }
                Ok(())
            });
            if let Err(e) = step {
                fail(e);
                break;
            }
        }
        for reader in reader_threads {
            if reader.join().is_err() {
                fail(CreateError::Read {
                    volume: volume.clone(),
                    offset: 0,
                    reason: "a reader thread panicked".into(),
                });
            }
        }
        done
    });
    let mut first_error = first_error.into_inner().unwrap_or_else(|p| p.into_inner());
    if first_error.is_none() && sealed != to_read.len() {
        // Defensive: every chunk to read has its entry before a manifest names them (a
        // reader's panic is reported above; a worker's re-panics out of the scope).
        first_error = Some(CreateError::Read {
            volume: volume.clone(),
            offset: 0,
            reason: format!("{sealed} of {} chunks were sealed; a pipeline thread stopped", to_read.len()),
        });
    }
    if let Some(e) = first_error {
        lease.abandon();
        return Err(e);
    }
    // The ranges without a change (their parent's index chunks), then the manifest.
    let (index, index_written) = match index.finish() {
        Ok(done) => done,
        Err(e) => {
            lease.abandon();
            return Err(e);
        }
    };
    let stats = stats.into_inner().unwrap_or_else(|p| p.into_inner());
    let manifest = ManifestV3 {
        base: ManifestV1 {
            snapshot_id: snapshot_id.clone(),
            volume: volume.clone(),
            marker: options.marker.clone(),
            node: options.node.clone(),
            key_id: key.key_id(),
            created_unix,
            marker_seq: options.marker_seq,
            parent: parent_id,
            full_read: full_read.is_some(),
            volume_size: size,
            chunk_size: options.chunk_size,
            stats: stats.clone(),
            chunks: Vec::new(),
        },
        group: options.group.clone(),
        // A fanout comes from INDEX_FANOUT or a validated parent manifest.
        fanout: fanout as u32,
        index,
    };
    let bytes = encode_manifest(key, &manifest)?;
    let manifest_key = keys::manifest(&volume, &snapshot_id);
    // Every chunk the manifest names is durable before the manifest is written.
    vault.sync()?;
    lease.check()?;
    vault.put_object(&manifest_key, &bytes)?;
    lease.finish()?;
    Ok(CreateReport {
        snapshot_id,
        manifest_key,
        full_read,
        stats,
        chunks_total: chunk_count,
        index_written,
        bytes_read: bytes_read.into_inner(),
    })
}

/// Builds a snapshot's index: one index chunk per `fanout` entries, written as soon as the
/// last chunk read in its range is sealed, from the parent's range with the new entries
/// applied. Holds only the ranges in progress.
struct IndexBuilder<'a> {
    key: &'a TenantKey,
    vault: &'a dyn Vault,
    /// The parent's entries, for an incremental.
    base: Option<&'a ChunkMap<'a>>,
    chunk_count: u64,
    fanout: u64,
    zstd_level: i32,
    /// For errors.
    volume: String,
    /// Per range: chunks still to be sealed.
    remaining: Vec<u32>,
    /// Ranges in progress: (position in the range, id) of the chunks sealed so far.
    pending: std::collections::HashMap<usize, Vec<(u32, [u8; 32])>>,
    /// The index being built: one id per range, once written.
    index: Vec<Option<[u8; 32]>>,
    /// Index chunks written (not already in the vault).
    written: u64,
}

impl<'a> IndexBuilder<'a> {
    fn new(
        key: &'a TenantKey,
        vault: &'a dyn Vault,
        base: Option<&'a ChunkMap<'a>>,
        chunk_count: u64,
        fanout: u64,
        to_read: &[u64],
        options: &CreateOptions,
    ) -> Self {
        let pieces = chunk_count.div_ceil(fanout) as usize;
        let mut remaining = vec![0u32; pieces];
        for &index in to_read {
            remaining[(index / fanout) as usize] += 1;
        }
        IndexBuilder {
            key,
            vault,
            base,
            chunk_count,
            fanout,
            zstd_level: options.zstd_level,
            volume: options.volume.clone(),
            remaining,
            pending: Default::default(),
            index: vec![None; pieces],
            written: 0,
        }
    }

    /// Records sealed entries; writes the index chunk of every range they complete.
    fn add(&mut self, sealed: Vec<(u64, [u8; 32])>) -> Result<(), CreateError> {
        for (index, entry) in sealed {
            let piece = (index / self.fanout) as usize;
            self.pending.entry(piece).or_default().push(((index % self.fanout) as u32, entry));
            self.remaining[piece] -= 1;
            if self.remaining[piece] == 0 {
                let changes = self.pending.remove(&piece).unwrap_or_default();
                self.index[piece] = Some(self.write_piece(piece, &changes)?);
            }
        }
        Ok(())
    }

    /// Fills in the ranges nothing was read in, and returns the index and the number of
    /// index chunks written.
    fn finish(mut self) -> Result<(Vec<[u8; 32]>, u64), CreateError> {
        let mut index = Vec::with_capacity(self.index.len());
        for piece in 0..self.index.len() {
            let id = match self.index[piece] {
                Some(id) => id,
                // Every chunk read was sealed, so only ranges nothing was read in are left.
                None if self.remaining[piece] != 0 => {
                    return Err(CreateError::Invalid {
                        volume: self.volume.clone(),
                        reason: format!("index range {piece} still waits for {} chunks", self.remaining[piece]),
                    })
                }
                // A range with no change keeps its parent's index chunk as it is, unread.
                None => match self.base.and_then(|b| b.index_entry(piece)) {
                    Some(parent) => parent.raw(),
                    None => self.write_piece(piece, &[])?,
                },
            };
            index.push(id);
        }
        Ok((index, self.written))
    }

    /// Writes range `piece`'s index chunk: the parent's entries (holes without a parent)
    /// with `changes` applied. Returns its id, or [`HOLE`] when every entry is a hole.
    fn write_piece(&mut self, piece: usize, changes: &[(u32, [u8; 32])]) -> Result<[u8; 32], CreateError> {
        let start = piece as u64 * self.fanout;
        let len = (self.chunk_count - start).min(self.fanout) as usize;
        let mut ids = match self.base {
            Some(base) => base.piece(piece)?.to_vec(),
            None => vec![HOLE; len],
        };
        for &(at, entry) in changes {
            ids[at as usize] = entry;
        }
        if ids.iter().all(|id| *id == HOLE) {
            return Ok(HOLE);
        }
        let plain = encode_piece(&ids);
        match seal_one(self.key, self.vault, &plain, self.zstd_level) {
            Ok(Sealed::Written(id, _)) => {
                self.written += 1;
                Ok(id.0)
            }
            Ok(Sealed::Present(id)) => Ok(id.0),
            // An index chunk starts with its magic, never all zeros.
            Ok(Sealed::Hole) => Ok(HOLE),
            Err(SealError::Chunk(e)) => Err(CreateError::Chunk(e, format!("{}, index chunk {piece}", self.volume))),
            Err(SealError::Vault(e)) => Err(CreateError::Vault(e)),
        }
    }
}

/// Paces readers to a byte rate: each read reserves its bytes on one shared timeline and
/// starts when its slot comes, so reads together never run ahead of the rate (the first
/// one starts at once; a reader that waited longer than its slot does not earn a burst).
#[derive(Debug)]
struct Pacer {
    /// Bytes per second.
    rate: u64,
    /// When the next read may start.
    next: Mutex<Option<std::time::Instant>>,
}

impl Pacer {
    fn new(rate: u64) -> Self {
        Pacer { rate: rate.max(1), next: Mutex::new(None) }
    }

    /// Reserves `bytes` at `now`: how long the reader waits before reading them.
    fn reserve(&self, now: std::time::Instant, bytes: u64) -> std::time::Duration {
        let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
        let start = next.map_or(now, |at| at.max(now));
        let takes = std::time::Duration::from_secs_f64(bytes as f64 / self.rate as f64);
        *next = Some(start + takes);
        start - now
    }
}

/// How a snapshot's readers read a batch: in one request per run at full speed, or paced to
/// a rate in pieces of [`PACED_BYTES`], one batch at a time, in order; always
/// (`read_limit`), or while the source is being written (`busy_read_limit`).
struct Reads<'a> {
    source: &'a dyn Source,
    /// `read_limit`: paces every request.
    always: Option<Pacer>,
    /// `busy_read_limit`: paces the requests made while the source is being written.
    busy: Option<Pacer>,
    /// The source's write count last seen, and when it last changed.
    seen: Mutex<(u64, Option<Instant>)>,
    /// Held by a reader while it takes a batch to pace and reads it.
    one_at_a_time: Mutex<()>,
}

impl Reads<'_> {
    /// Whether the source took a write within [`BUSY_WINDOW`] of `now`.
    fn busy(&self, now: Instant) -> bool {
        let Some(writes) = self.source.writes() else { return false };
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if writes != seen.0 {
            *seen = (writes, Some(now));
        }
        seen.1.is_some_and(|at| now.saturating_duration_since(at) < BUSY_WINDOW)
    }

    /// The pacer for a batch started at `now`, if it is to be paced: while the source is
    /// busy the slower of the two.
    fn pacer(&self, now: Instant) -> Option<&Pacer> {
        let busy = self.busy.as_ref().filter(|_| self.busy(now));
        match (self.always.as_ref(), busy) {
            (Some(always), Some(busy)) => Some(if busy.rate < always.rate { busy } else { always }),
            (always, busy) => always.or(busy),
        }
    }

    /// Fills `buf` from `offset`: in one request, or with `pacer` in pieces of
    /// [`PACED_BYTES`], each when the pacer allows it. The requests run at the thread's
    /// own priority (`lowered`), the waits at its lowered one.
    fn read(&self, lowered: &Lowered, pacer: Option<&Pacer>, offset: u64, buf: &mut [u8]) -> Result<(), (u64, String)> {
        let Some(pacer) = pacer else {
            return lowered.normal(|| self.source.read_at(offset, buf)).map_err(|reason| (offset, reason));
        };
        for (n, piece) in buf.chunks_mut(PACED_BYTES as usize).enumerate() {
            let at = offset + n as u64 * PACED_BYTES;
            let wait = pacer.reserve(Instant::now(), piece.len() as u64);
            if !wait.is_zero() {
                // Pacing to a rate, not waiting for a state: the time is the point.
                std::thread::sleep(wait);
            }
            lowered.normal(|| self.source.read_at(at, piece)).map_err(|reason| (at, reason))?;
        }
        Ok(())
    }
}

/// Releases the ranges of the chunks not in `to_read` (ascending), coalesced.
fn release_unread(source: &dyn Source, to_read: &[u64], chunk_count: u64, chunk_size: u64, size: u64) {
    let mut next = 0u64;
    let release = |from: u64, to: u64| {
        if from < to {
            let offset = from * chunk_size;
            source.release(offset, (to * chunk_size).min(size) - offset);
        }
    };
    for &index in to_read {
        release(next, index);
        next = index + 1;
    }
    release(next, chunk_count);
}

/// Reads the chunks `indices` (ascending) into `buf`, one after the other; consecutive
/// chunks in one read each (cut into pieces when paced, [`Reads::read`]), and releases
/// each run once read. Only the volume's last chunk may be short, and it comes last.
fn read_batch(
    reads: &Reads<'_>,
    pacer: Option<&Pacer>,
    lowered: &Lowered,
    indices: &[u64],
    chunk_size: u64,
    size: u64,
    buf: &mut AlignedBuf,
) -> Result<u64, (u64, String)> {
    let len = |index: u64| chunk_size.min(size - index * chunk_size);
    let total: u64 = indices.iter().map(|&i| len(i)).sum();
    buf.set_len(total as usize);
    let mut at = 0usize;
    let mut rest = indices;
    while let Some(&first) = rest.first() {
        // The run of consecutive indices starting here.
        let run = rest.iter().zip(first..).take_while(|(&index, expected)| index == *expected).count();
        let (run_indices, after) = rest.split_at(run);
        let bytes: u64 = run_indices.iter().map(|&i| len(i)).sum();
        let offset = first * chunk_size;
        // A batch fits its buffer by construction; never seal stale bytes if it did not.
        let piece = buf
            .get_mut(at..at + bytes as usize)
            .ok_or_else(|| (offset, format!("a batch of {total} bytes does not fit its buffer")))?;
        reads.read(lowered, pacer, offset, piece)?;
        // Takes the stripe locks and punches the copy file: at the thread's own priority.
        lowered.normal(|| reads.source.release(offset, bytes));
        at += bytes as usize;
        rest = after;
    }
    Ok(total)
}

enum Sealed {
    Hole,
    Present(ChunkId),
    Written(ChunkId, u64),
}

enum SealError {
    Chunk(ChunkError),
    Vault(VaultError),
}

fn seal_one(key: &TenantKey, vault: &dyn Vault, plain: &[u8], zstd_level: i32) -> Result<Sealed, SealError> {
    if is_zero(plain) {
        return Ok(Sealed::Hole);
    }
    let id = key.chunk_id(plain);
    if vault.has_chunk(&id).map_err(SealError::Vault)? {
        return Ok(Sealed::Present(id));
    }
    let frame = seal_chunk(key, &id, plain, zstd_level).map_err(SealError::Chunk)?;
    match vault.put_chunk(&id, &frame).map_err(SealError::Vault)? {
        Put::Written => Ok(Sealed::Written(id, frame.len() as u64)),
        Put::AlreadyPresent => Ok(Sealed::Present(id)),
    }
}

/// A [`Source`] over a file or block device read with positional reads, past the page
/// cache where the filesystem allows (the pipeline's reads are aligned).
#[derive(Debug)]
pub struct FileSource {
    file: UncachedReader,
    size: u64,
}

impl FileSource {
    /// Opens `path` (a regular file or a block device) for reading.
    pub fn open(path: &std::path::Path) -> std::io::Result<Self> {
        use std::io::{Seek, SeekFrom};
        let mut file = std::fs::File::open(path)?;
        // Block devices report length 0 in metadata; seeking to the end gives their size.
        let size = file.seek(SeekFrom::End(0))?;
        Ok(FileSource { file: UncachedReader::new(file), size })
    }
}

impl Source for FileSource {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        self.file.read_exact_at(buf, offset).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vault::LocalVault;
    use std::sync::Mutex;

    struct MemSource(Vec<u8>);

    impl Source for MemSource {
        fn size(&self) -> u64 {
            self.0.len() as u64
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
            let start = offset as usize;
            buf.copy_from_slice(&self.0[start..start + buf.len()]);
            Ok(())
        }
    }

    fn options(id: &str) -> CreateOptions {
        CreateOptions {
            volume: "db".into(),
            marker: "m".into(),
            marker_seq: 1,
            node: "node-a".into(),
            chunk_size: 4096,
            zstd_level: 3,
            threads: 3,
            snapshot_id: Some(id.into()),
            created_unix: Some(1_795_000_000),
            group: None,
            read_limit: None,
            busy_read_limit: None,
            cpu_priority: CpuPriority::Normal,
            stop: None,
        }
    }

    /// Every entry of `manifest`, index chunks read from `vault`.
    fn entries(key: &TenantKey, vault: &dyn Vault, manifest: &Manifest) -> Vec<[u8; 32]> {
        let mut out = Vec::new();
        ChunkMap::new(key, &[vault], manifest).for_each(|_, e| out.push(e.raw())).unwrap();
        out
    }

    fn index_of(manifest: &Manifest) -> Vec<[u8; 32]> {
        match manifest.layout() {
            crate::manifest::Layout::Indexed { index, .. } => index.to_vec(),
            crate::manifest::Layout::Inline(_) => panic!("an inline manifest"),
        }
    }

    /// A snapshot writes the index chunks of the ranges it changed, and keeps the others
    /// of its parent unread; from a version 1 parent, and from a parent whose index chunk
    /// is lost (a full read, said so), it still records the volume exactly.
    #[test]
    fn an_incremental_writes_only_the_index_chunks_it_changed() {
        let dir = tempfile::tempdir().unwrap();
        let vault = LocalVault::open("local", dir.path(), "t").unwrap();
        let key = TenantKey::from_bytes([3; 32]);
        let fanout = INDEX_FANOUT as usize;
        // Four ranges of 4 KiB chunks, the last short; range 2 all zeros.
        let chunks = 3 * fanout + 5;
        let mut data = vec![0u8; chunks * 4096 - 10];
        for (i, block) in data.chunks_mut(4096).enumerate() {
            if !(2 * fanout..3 * fanout).contains(&i) {
                block[..8].copy_from_slice(&(i as u64).to_le_bytes());
            }
        }
        let take = |id: &str, parent: Option<&Manifest>, changed: Changed, data: &[u8]| {
            create_snapshot(&key, &vault, &MemSource(data.to_vec()), &options(id), parent, changed, &|_| {}).unwrap()
        };
        let load =
            |report: &CreateReport| Manifest::load(&vault.get_object(&report.manifest_key).unwrap(), &key).unwrap();
        let r1 = take("s1", None, Changed::All("first".into()), &data);
        assert_eq!(r1.index_written, 3, "range 2 is all holes: no index chunk");
        let m1 = load(&r1);
        let i1 = index_of(&m1);
        assert_eq!((i1.len(), i1[2]), (4, HOLE));
        // One chunk changes in range 1.
        data[fanout * 4096 + 100] ^= 0xff;
        let r2 = take("s2", Some(&m1), Changed::Chunks(vec![fanout as u64]), &data);
        assert_eq!(r2.index_written, 1);
        let m2 = load(&r2);
        let i2 = index_of(&m2);
        assert_eq!((i2[0], i2[2], i2[3]), (i1[0], i1[2], i1[3]));
        assert_ne!(i2[1], i1[1]);
        let full = load(&take("full", None, Changed::All("check".into()), &data));
        assert_eq!(entries(&key, &vault, &m2), entries(&key, &vault, &full));
        // A version 1 parent (written before index chunks): the child is version 3 and exact.
        let v1 = ManifestV1 {
            snapshot_id: "old".into(),
            volume: "db".into(),
            marker: "m".into(),
            node: "n".into(),
            key_id: key.key_id(),
            created_unix: 0,
            marker_seq: 0,
            parent: None,
            full_read: true,
            volume_size: data.len() as u64,
            chunk_size: 4096,
            stats: StatsV1::default(),
            chunks: entries(&key, &vault, &m2),
        };
        let old = Manifest::load(&crate::manifest::encode_manifest_v1(&key, &v1).unwrap(), &key).unwrap();
        data[5] ^= 1;
        let m3 = load(&take("s3", Some(&old), Changed::Chunks(vec![0]), &data));
        assert_eq!(m3.version(), 3);
        let full = load(&take("full2", None, Changed::All("check".into()), &data));
        assert_eq!(entries(&key, &vault, &m3), entries(&key, &vault, &full));
        // The parent's index chunk over a change is lost: a full read, and the reason.
        let lost = ChunkId(index_of(&m3)[0]);
        assert!(vault.delete_chunk(&lost).unwrap());
        data[7] ^= 1;
        let r4 = take("s4", Some(&m3), Changed::Chunks(vec![0]), &data);
        let reason = r4.full_read.clone().expect("a full read");
        assert!(reason.contains("index") && reason.contains(&lost.to_string()), "{reason}");
        assert_eq!(r4.stats.chunks_read, chunks as u64);
        let m4 = load(&r4);
        assert_eq!(m4.parent(), None);
        let full = load(&take("full3", None, Changed::All("check".into()), &data));
        assert_eq!(entries(&key, &vault, &m4), entries(&key, &vault, &full));
    }

    #[test]
    fn the_pacer_spaces_reads_to_the_rate_and_gives_no_burst_after_a_pause() {
        use std::time::{Duration, Instant};
        let pacer = Pacer::new(1 << 20); // 1 MiB/s
        let t0 = Instant::now();
        assert_eq!(pacer.reserve(t0, 1 << 20), Duration::ZERO, "the first read starts at once");
        assert_eq!(pacer.reserve(t0, 512 << 10), Duration::from_secs(1), "the next waits for its slot");
        assert_eq!(pacer.reserve(t0, 512 << 10), Duration::from_millis(1500));
        // Ten idle seconds later: at once, but the pause earns nothing.
        let later = t0 + Duration::from_secs(12);
        assert_eq!(pacer.reserve(later, 1 << 20), Duration::ZERO);
        assert_eq!(pacer.reserve(later, 1 << 20), Duration::from_secs(1));
    }

    /// A source that counts reads, the longest one, the most in flight at once, and the
    /// releases; and whether a read ran in `SCHED_IDLE`. `written`: `None`, nobody writes
    /// it; `Some(true)`, it takes a write at every read; `Some(false)`, it takes none.
    #[derive(Default)]
    struct Watched {
        data: Vec<u8>,
        written: Option<bool>,
        reads: AtomicUsize,
        longest: AtomicUsize,
        in_flight: AtomicUsize,
        most_in_flight: AtomicUsize,
        idle_reads: AtomicUsize,
        idle_releases: AtomicUsize,
        released: Mutex<Vec<(u64, u64)>>,
    }

    impl Source for Watched {
        fn size(&self) -> u64 {
            self.data.len() as u64
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
            let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.most_in_flight.fetch_max(now, Ordering::SeqCst);
            self.reads.fetch_add(1, Ordering::SeqCst);
            self.longest.fetch_max(buf.len(), Ordering::SeqCst);
            // SAFETY: no arguments but this thread's id.
            #[cfg(target_os = "linux")]
            if unsafe { libc::sched_getscheduler(0) } == libc::SCHED_IDLE {
                self.idle_reads.fetch_add(1, Ordering::SeqCst);
            }
            // Gives a second reader, if there were one, the time to overlap.
            for _ in 0..100 {
                std::thread::yield_now();
            }
            let start = offset as usize;
            buf.copy_from_slice(&self.data[start..start + buf.len()]);
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            Ok(())
        }
        fn release(&self, offset: u64, len: u64) {
            // SAFETY: no arguments but this thread's id.
            #[cfg(target_os = "linux")]
            if unsafe { libc::sched_getscheduler(0) } == libc::SCHED_IDLE {
                self.idle_releases.fetch_add(1, Ordering::SeqCst);
            }
            self.released.lock().unwrap().push((offset, len));
        }
        fn writes(&self) -> Option<u64> {
            self.written.map(|written| if written { self.reads.load(Ordering::SeqCst) as u64 + 1 } else { 0 })
        }
    }

    /// A read limit slows the readers, and changes nothing in what is stored.
    #[test]
    fn a_read_limit_reads_64_kib_at_a_time_releases_whole_regions_and_keeps_the_snapshot_exact() {
        let dir = tempfile::tempdir().unwrap();
        let vault = LocalVault::open("local", dir.path(), "t").unwrap();
        let key = TenantKey::from_bytes([3; 32]);
        let load = |r: &CreateReport| Manifest::load(&vault.get_object(&r.manifest_key).unwrap(), &key).unwrap();
        // 4 KiB chunks (16 per 64 KiB region), and 128 KiB ones (two requests each).
        for (chunk_size, id) in [(4096u32, "small"), (128 << 10, "large")] {
            let data: Vec<u8> = (0..256 << 10).map(|i: u32| (i / 4096) as u8 ^ 0x5a).collect();
            let mut paced = options(&format!("{id}-paced"));
            paced.chunk_size = chunk_size;
            paced.read_limit = Some(64 << 20);
            paced.cpu_priority = CpuPriority::Idle;
            let mut free = options(&format!("{id}-free"));
            free.chunk_size = chunk_size;
            let (w1, w2) =
                (Watched { data: data.clone(), ..Watched::default() }, Watched { data, ..Watched::default() });
            // Progress is reported by the reader between reads, where it waits in SCHED_IDLE.
            let idle_between_reads = AtomicUsize::new(0);
            let between_reads = |_: Progress| {
                // SAFETY: no arguments but this thread's id.
                #[cfg(target_os = "linux")]
                if unsafe { libc::sched_getscheduler(0) } == libc::SCHED_IDLE {
                    idle_between_reads.fetch_add(1, Ordering::SeqCst);
                }
            };
            let r1 =
                create_snapshot(&key, &vault, &w1, &paced, None, Changed::All("t".into()), &between_reads).unwrap();
            let r2 = create_snapshot(&key, &vault, &w2, &free, None, Changed::All("t".into()), &|_| {}).unwrap();
            assert_eq!(entries(&key, &vault, &load(&r1)), entries(&key, &vault, &load(&r2)));
            assert_eq!(r1.bytes_read, r2.bytes_read);
            // Paced: four requests of 64 KiB, one at a time, by a reader not in SCHED_IDLE
            // (it takes locks a writer may need), each run released as soon as it is read:
            // a whole region per release at 4 KiB chunks, a whole chunk at 128 KiB.
            assert_eq!(w1.reads.load(Ordering::SeqCst), 4, "{id}");
            assert_eq!(w1.longest.load(Ordering::SeqCst), 64 << 10, "{id}");
            assert_eq!(w1.most_in_flight.load(Ordering::SeqCst), 1, "{id}");
            assert_eq!(w1.idle_reads.load(Ordering::SeqCst), 0, "{id}");
            assert_eq!(w1.idle_releases.load(Ordering::SeqCst), 0, "{id}: releases take the stripe locks");
            let step = u64::from(chunk_size).max(64 << 10);
            #[cfg(target_os = "linux")]
            if crate::priority::may_raise() {
                // Once per batch: four of 64 KiB, or two of one 128 KiB chunk.
                assert_eq!(idle_between_reads.load(Ordering::SeqCst) as u64, (256 << 10) / step, "{id}");
            }
            let expected: Vec<(u64, u64)> = (0..(256 << 10) / step).map(|i| (i * step, step)).collect();
            let mut released = w1.released.lock().unwrap().clone();
            released.sort_unstable();
            assert_eq!(released, expected, "{id}");
            // Unpaced: the whole volume in one request.
            assert_eq!(w2.reads.load(Ordering::SeqCst), 1, "{id}");
            assert_eq!(w2.longest.load(Ordering::SeqCst), 256 << 10, "{id}");
        }
    }

    /// While the source is being written, the readers yield the disk: requests of 64 KiB,
    /// one at a time, at `busy_read_limit`. A source that takes no writes, or that nobody
    /// writes, is read in 1 MiB requests. What is stored is the same either way.
    #[test]
    fn a_source_being_written_is_read_64_kib_at_a_time_and_a_quiet_one_at_full_speed() {
        let dir = tempfile::tempdir().unwrap();
        let vault = LocalVault::open("local", dir.path(), "t").unwrap();
        let key = TenantKey::from_bytes([3; 32]);
        let data: Vec<u8> = (0..4u32 << 20).map(|i| (i / 4096) as u8 ^ 0x5a).collect();
        let mut stored = Vec::new();
        for (written, id) in [(Some(true), "written"), (Some(false), "quiet"), (None, "image")] {
            let mut busy = options(id);
            busy.chunk_size = 64 << 10;
            busy.busy_read_limit = Some(1 << 30);
            let source = Watched { data: data.clone(), written, ..Watched::default() };
            // Progress comes once per batch handed to the sealing threads.
            let batches = AtomicUsize::new(0);
            let count = |_: Progress| {
                batches.fetch_add(1, Ordering::SeqCst);
            };
            let report = create_snapshot(&key, &vault, &source, &busy, None, Changed::All("t".into()), &count).unwrap();
            let manifest = Manifest::load(&vault.get_object(&report.manifest_key).unwrap(), &key).unwrap();
            stored.push(entries(&key, &vault, &manifest));
            let (reads, longest) = (source.reads.load(Ordering::SeqCst), source.longest.load(Ordering::SeqCst));
            let batches = batches.load(Ordering::SeqCst);
            if written == Some(true) {
                // Batches of 64 KiB too, not 1 MiB ones read in pieces (which measured worse).
                assert_eq!((reads, longest, batches), (64, 64 << 10, 64), "{id}");
                assert_eq!(source.most_in_flight.load(Ordering::SeqCst), 1, "{id}");
            } else {
                assert_eq!((reads, longest, batches), (4, 1 << 20, 4), "{id}");
            }
        }
        assert!(stored.iter().all(|entries| *entries == stored[0]));
    }

    /// A source is busy for [`BUSY_WINDOW`] after each write seen, and not before the first.
    #[test]
    fn a_source_is_busy_for_a_second_after_each_write_it_takes() {
        struct Counted(AtomicU64);
        impl Source for Counted {
            fn size(&self) -> u64 {
                0
            }
            fn read_at(&self, _: u64, _: &mut [u8]) -> Result<(), String> {
                Ok(())
            }
            fn writes(&self) -> Option<u64> {
                Some(self.0.load(Ordering::SeqCst))
            }
        }
        let source = Counted(AtomicU64::new(0));
        let reads = Reads {
            source: &source,
            always: None,
            busy: Some(Pacer::new(1 << 20)),
            seen: Mutex::new((0, None)),
            one_at_a_time: Mutex::new(()),
        };
        let t0 = Instant::now();
        let at = |ms: u64| t0 + std::time::Duration::from_millis(ms);
        assert!(!reads.busy(at(0)), "no write yet");
        assert!(reads.pacer(at(0)).is_none());
        source.0.store(3, Ordering::SeqCst);
        assert!(reads.busy(at(10)), "writes seen");
        assert!(reads.pacer(at(10)).is_some());
        assert!(reads.busy(at(1009)), "within the window of the write seen at 10 ms");
        assert!(!reads.busy(at(1010)), "a second without a write");
        source.0.store(4, Ordering::SeqCst);
        assert!(reads.busy(at(1500)));
        assert!(!reads.busy(at(2500)));

        // With `read_limit` too: the slower of the two while busy, `read_limit` while quiet.
        for (always, busy, when_busy) in [(64u64 << 20, 16u64 << 20, 16u64 << 20), (1 << 20, 16 << 20, 1 << 20)] {
            let both = Reads {
                source: &source,
                always: Some(Pacer::new(always)),
                busy: Some(Pacer::new(busy)),
                seen: Mutex::new((0, None)),
                one_at_a_time: Mutex::new(()),
            };
            source.0.fetch_add(1, Ordering::SeqCst);
            assert_eq!(both.pacer(at(3000)).map(|p| p.rate), Some(when_busy));
            assert_eq!(both.pacer(at(4000)).map(|p| p.rate), Some(always));
        }
    }

    /// A snapshot told to stop (the node shutting down) ends at its next read with
    /// `Stopped`, a transient error, and publishes nothing.
    #[test]
    fn a_stopped_snapshot_ends_at_its_next_read_and_publishes_nothing() {
        /// Raises the stop flag at its first read.
        struct Stopping(Vec<u8>, Arc<AtomicBool>);
        impl Source for Stopping {
            fn size(&self) -> u64 {
                self.0.len() as u64
            }
            fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
                self.1.store(true, Ordering::Release);
                buf.copy_from_slice(&self.0[offset as usize..offset as usize + buf.len()]);
                Ok(())
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let vault = LocalVault::open("local", dir.path(), "t").unwrap();
        let key = TenantKey::from_bytes([3; 32]);
        let stop = Arc::new(AtomicBool::new(false));
        let mut stopping = options("stopped");
        stopping.stop = Some(Arc::clone(&stop));
        stopping.read_limit = Some(1 << 30); // one 64 KiB batch at a time
        let data: Vec<u8> = (0..1 << 20).map(|i: u32| (i / 4096) as u8 | 1).collect();
        let err =
            create_snapshot(&key, &vault, &Stopping(data, stop), &stopping, None, Changed::All("t".into()), &|_| {})
                .unwrap_err();
        assert!(matches!(err, CreateError::Stopped { .. }) && err.is_transient(), "{err}");
        assert!(err.to_string().contains("shutting down"), "{err}");
        assert!(vault.list_objects("").unwrap().is_empty(), "no manifest, no lease");
    }

    #[test]
    fn utc_formats() {
        assert_eq!(utc_compact(0), "19700101T000000Z");
        assert_eq!(utc_display(1_795_000_000), "2026-11-18 11:06:40");
        assert_eq!(utc_compact(951_782_400), "20000229T000000Z");
        assert_eq!(utc_compact(-1), "19691231T235959Z");
    }

    #[test]
    fn full_then_incremental() {
        let dir = tempfile::tempdir().unwrap();
        let vault = LocalVault::open("local", dir.path(), "t").unwrap();
        let key = TenantKey::from_bytes([3; 32]);
        let mut data = vec![0u8; 10 * 4096 + 100];
        data[5000..9000].fill(7);
        data[4 * 4096..5 * 4096].fill(7);
        data[8 * 4096..9 * 4096].fill(7);
        let report = create_snapshot(
            &key,
            &vault,
            &MemSource(data.clone()),
            &options("s1"),
            None,
            Changed::All("first".into()),
            &|_| {},
        )
        .unwrap();
        assert_eq!(report.chunks_total, 11);
        assert_eq!(report.stats.chunks_read, 11);
        // Chunks 1, 2, 4, 8 hold data; 4 and 8 are identical: stored once.
        assert_eq!(report.stats.new_chunks, 3);
        assert_eq!(report.stats.zero_chunks, 7);
        let m1 = Manifest::load(&vault.get_object(&report.manifest_key).unwrap(), &key).unwrap();
        assert!(m1.full_read());
        let m1_entries = entries(&key, &vault, &m1);
        assert_eq!(m1_entries[4], m1_entries[8]);
        assert_eq!(m1_entries[0], HOLE);

        data[10 * 4096 + 5] = 1; // the short last chunk
        data[0] = 9;
        let r2 = create_snapshot(
            &key,
            &vault,
            &MemSource(data.clone()),
            &options("s2"),
            Some(&m1),
            Changed::Chunks(vec![0, 10]),
            &|_| {},
        )
        .unwrap();
        assert_eq!(r2.stats.chunks_read, 2);
        assert_eq!(r2.bytes_read, 4096 + 100);
        assert_eq!(r2.full_read, None);
        let m2 = Manifest::load(&vault.get_object(&r2.manifest_key).unwrap(), &key).unwrap();
        assert_eq!(m2.parent(), Some("s1"));
        let m2_entries = entries(&key, &vault, &m2);
        assert_eq!(m2_entries[4], m1_entries[4]);
        assert_ne!(m2_entries[0], m1_entries[0]);
        // A change list out of order, with repeats, reads each chunk once and seals the
        // same chunks as a full read (the short last chunk is not paired with other bytes).
        data[3 * 4096] = 5;
        let r3 = create_snapshot(
            &key,
            &vault,
            &MemSource(data.clone()),
            &options("s3"),
            Some(&m2),
            Changed::Chunks(vec![10, 3, 10, 0]),
            &|_| {},
        )
        .unwrap();
        assert_eq!(r3.stats.chunks_read, 3);
        let full = create_snapshot(
            &key,
            &vault,
            &MemSource(data.clone()),
            &options("s4"),
            None,
            Changed::All("check".into()),
            &|_| {},
        )
        .unwrap();
        let m3 = Manifest::load(&vault.get_object(&r3.manifest_key).unwrap(), &key).unwrap();
        let m4 = Manifest::load(&vault.get_object(&full.manifest_key).unwrap(), &key).unwrap();
        assert_eq!(entries(&key, &vault, &m3), entries(&key, &vault, &m4));
        // No upload leases left behind.
        assert!(vault.list_objects(keys::UPLOADS).unwrap().is_empty());
    }

    #[test]
    fn unread_ranges_are_released() {
        struct Recorder(Mutex<Vec<(u64, u64)>>);
        impl Source for Recorder {
            fn size(&self) -> u64 {
                10 * 4096 - 7
            }
            fn read_at(&self, _: u64, buf: &mut [u8]) -> Result<(), String> {
                buf.fill(1);
                Ok(())
            }
            fn release(&self, offset: u64, len: u64) {
                self.0.lock().unwrap().push((offset, len));
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let vault = LocalVault::open("local", dir.path(), "t").unwrap();
        let key = TenantKey::from_bytes([3; 32]);
        let source = Recorder(Mutex::new(Vec::new()));
        let r1 =
            create_snapshot(&key, &vault, &source, &options("s1"), None, Changed::All("x".into()), &|_| {}).unwrap();
        let m1 = Manifest::load(&vault.get_object(&r1.manifest_key).unwrap(), &key).unwrap();
        let mut released = std::mem::take(&mut *source.0.lock().unwrap());
        released.sort_unstable();
        // A full read releases what it read as it goes (consecutive chunks together),
        // nothing beforehand: every byte once.
        let mut next = 0;
        for &(offset, len) in &released {
            assert_eq!(offset, next, "{released:?}");
            next = offset + len;
        }
        assert_eq!(next, 10 * 4096 - 7);
        create_snapshot(&key, &vault, &source, &options("s2"), Some(&m1), Changed::Chunks(vec![2, 3, 9]), &|_| {})
            .unwrap();
        let mut released = std::mem::take(&mut *source.0.lock().unwrap());
        released.sort_unstable();
        let size = 10 * 4096 - 7;
        assert_eq!(
            released,
            vec![(0, 2 * 4096), (2 * 4096, 2 * 4096), (4 * 4096, 5 * 4096), (9 * 4096, size - 9 * 4096)]
        );
    }

    /// A reader that dies (a panic in the source) fails the snapshot: no manifest, no lease.
    #[test]
    fn a_panicking_reader_leaves_no_manifest() {
        struct Panicking;
        impl Source for Panicking {
            fn size(&self) -> u64 {
                4 << 20
            }
            fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
                assert!(offset < 2 << 20, "test source: a bug past 2 MiB");
                buf.fill(1);
                Ok(())
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let vault = LocalVault::open("local", dir.path(), "t").unwrap();
        let key = TenantKey::from_bytes([3; 32]);
        let err = create_snapshot(&key, &vault, &Panicking, &options("s1"), None, Changed::All("x".into()), &|_| {})
            .unwrap_err();
        assert!(err.to_string().contains("panicked"), "{err}");
        assert!(vault.list_objects("").unwrap().is_empty(), "no manifest, no lease");
    }

    #[test]
    fn read_error_leaves_no_manifest() {
        struct Failing;
        impl Source for Failing {
            fn size(&self) -> u64 {
                1 << 20
            }
            fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
                if offset + buf.len() as u64 > 512 << 10 {
                    return Err("EIO".into());
                }
                buf.fill(1);
                Ok(())
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let vault = LocalVault::open("local", dir.path(), "t").unwrap();
        let key = TenantKey::from_bytes([3; 32]);
        let err = create_snapshot(&key, &vault, &Failing, &options("s1"), None, Changed::All("x".into()), &|_| {})
            .unwrap_err();
        assert!(err.to_string().contains("EIO"), "{err}");
        assert!(vault.list_objects("").unwrap().is_empty(), "no manifest, no lease");
    }
}
