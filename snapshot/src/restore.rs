//! Getting data back: restore a snapshot into a file, block device or volume (chunks
//! fetched in parallel, written in place), or export it as an ordered image stream (raw
//! or zstd-compressed raw) — the customer's download.
//!
//! Every chunk is authenticated and re-hashed as it is decoded ([`crate::decode_chunk`]),
//! so what is written is bit-exact or the restore fails naming the chunk. A chunk that is
//! missing or corrupt in the first vault is fetched from the next one that holds it
//! (and reported, so `verify` can heal the bad copy).
//!
//! A restore thread takes a batch of consecutive chunks (1 MiB, or one larger chunk),
//! copies the decoded data chunks into an aligned buffer and hands each run of adjacent
//! data chunks to the target as one write; a run of holes is one [`Target::zero`] (or
//! nothing, when the target reads as zeros already). [`FileTarget`] writes those runs past
//! the page cache (`O_DIRECT`), so a restore neither pays for nor evicts cache pages.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};

use keel_engine::{reopen_direct_for_writing, AlignedBuf, DIRECT_ALIGN};

use crate::chunk::MAX_CHUNK_LEN;
use crate::create::Progress;
use crate::error::IndexError;
use crate::key::{ChunkId, TenantKey};
use crate::manifest::{ChunkMap, ChunkRef, Manifest};
use crate::vault::{fetch_chunk, Vault};

/// Where a restore writes.
pub trait Target: Sync {
    /// Writes `data` at `offset`. [`restore`] passes a run of adjacent chunks (up to 1 MiB,
    /// or one larger chunk) in a buffer aligned to [`DIRECT_ALIGN`].
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), String>;
    /// Makes `[offset, offset+len)` read as zeros. Not called when the target was created
    /// empty ([`RestoreOptions::target_is_zeroed`]).
    fn zero(&self, offset: u64, len: u64) -> Result<(), String>;
    /// Makes everything written durable.
    fn sync(&self) -> Result<(), String>;
}

/// How to restore.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// Parallel chunk fetches (≥ 1).
    pub threads: usize,
    /// The target already reads as zeros everywhere (a new sparse file or volume): holes
    /// are skipped instead of written, so the result stays sparse.
    pub target_is_zeroed: bool,
}

/// What a restore did.
#[derive(Debug, Clone, Default)]
pub struct RestoreReport {
    /// Chunks written.
    pub chunks_written: u64,
    /// Holes (zeroed or skipped).
    pub holes: u64,
    /// Bytes of plaintext written.
    pub bytes_written: u64,
    /// Chunks that had to come from a vault other than the first, with the first
    /// vault's error: copies to heal.
    pub fallbacks: Vec<(ChunkId, String)>,
}

/// Why a restore failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RestoreError {
    /// No vault holds a good copy of a chunk.
    #[error("chunk {index} ({id}) of snapshot {snapshot}: no good copy in any vault: {errors}")]
    Chunk {
        /// The snapshot.
        snapshot: String,
        /// Index in the manifest.
        index: u64,
        /// The chunk.
        id: ChunkId,
        /// Each vault's error, joined.
        errors: String,
    },
    /// The target failed.
    #[error("restore of snapshot {snapshot}: write at {offset}: {reason}")]
    Write {
        /// The snapshot.
        snapshot: String,
        /// The offset written.
        offset: u64,
        /// The target's error.
        reason: String,
    },
    /// No vault holds a good copy of an index chunk: the ids of its range are unknown.
    #[error(transparent)]
    Index(#[from] IndexError),
    /// Writing the export stream failed.
    #[error("export of snapshot {snapshot}: {source}")]
    Stream {
        /// The snapshot.
        snapshot: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// [`fetch_chunk`] for entry `index` of `snapshot`, whose plaintext must be `len` bytes:
/// the chunk and the errors of the vaults tried before the one that had it.
fn fetch_checked(
    key: &TenantKey,
    vaults: &[&dyn Vault],
    id: &ChunkId,
    snapshot: &str,
    index: usize,
    len: u64,
) -> Result<(Vec<u8>, Option<String>), RestoreError> {
    let error =
        |errors: String| RestoreError::Chunk { snapshot: snapshot.to_owned(), index: index as u64, id: *id, errors };
    match fetch_chunk(key, vaults, id) {
        Ok((plain, fallback)) if plain.len() as u64 == len => Ok((plain, fallback)),
        Ok((plain, _)) => Err(error(format!("decodes to {} bytes, the manifest expects {len}", plain.len()))),
        Err(errors) => Err(error(errors.join("; "))),
    }
}

/// A restore thread's batch: this many bytes of consecutive chunks (at least one chunk).
/// Adjacent data chunks in it reach the target as one write. Direct writes wait for the
/// disk one at a time (ext4 takes the inode lock exclusively for a direct write that
/// allocates blocks, as every write into a new sparse file does: `fio` with two jobs of
/// 64 KiB writes got 858 MB/s, the same as one), so the request size sets the speed: `dd
/// oflag=direct` into a sparse file on this VM wrote 858 MB/s in 64 KiB requests, 1.1 GB/s
/// in 256 KiB ones and 1.5 to 2.2 GB/s in 1 MiB ones; 4 MiB were no faster.
const BATCH_BYTES: u64 = 1 << 20;

/// Restores `manifest` into `target` (random-access), fetching chunks in parallel.
pub fn restore(
    key: &TenantKey,
    vaults: &[&dyn Vault],
    manifest: &Manifest,
    target: &dyn Target,
    options: &RestoreOptions,
    progress: &(dyn Fn(Progress) + Sync),
) -> Result<RestoreReport, RestoreError> {
    let snapshot = manifest.snapshot_id().to_owned();
    let count = manifest.chunk_count();
    let chunk_size = u64::from(manifest.chunk_size()).max(1);
    let per_batch = (BATCH_BYTES / chunk_size).max(1) as usize;
    let batches = count.div_ceil(per_batch);
    // A chunk decodes to at most MAX_CHUNK_LEN bytes (a bigger `chunk_size` in a manifest
    // only makes every data chunk fail its length check), so this holds any batch's run.
    let capacity = (per_batch as u64 * chunk_size).min(MAX_CHUNK_LEN.max(BATCH_BYTES as usize) as u64) as usize;
    let next = AtomicUsize::new(0);
    let done = AtomicU64::new(0);
    let cancel = AtomicBool::new(false);
    let report = Mutex::new(RestoreReport::default());
    let first_error: Mutex<Option<RestoreError>> = Mutex::new(None);
    let total = manifest.volume_size();
    let map = ChunkMap::new(key, vaults, manifest);
    std::thread::scope(|scope| {
        for _ in 0..options.threads.max(1) {
            scope.spawn(|| {
                let mut run = Run::new(target, &snapshot, !options.target_is_zeroed, capacity);
                let mut mine = RestoreReport::default();
                while !cancel.load(Ordering::Acquire) {
                    let batch = next.fetch_add(1, Ordering::Relaxed);
                    if batch >= batches {
                        break;
                    }
                    let indices = batch * per_batch..((batch + 1) * per_batch).min(count);
                    match restore_batch(key, vaults, &map, indices, &mut run, &mut mine) {
                        Ok(bytes) => {
                            let d = done.fetch_add(bytes, Ordering::Relaxed) + bytes;
                            progress(Progress { done: d, total });
                        }
                        Err(e) => {
                            cancel.store(true, Ordering::Release);
                            first_error.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
                            return;
                        }
                    }
                }
                let mut r = report.lock().unwrap_or_else(|p| p.into_inner());
                r.chunks_written += mine.chunks_written;
                r.holes += mine.holes;
                r.bytes_written += mine.bytes_written;
                r.fallbacks.append(&mut mine.fallbacks);
            });
        }
    });
    if let Some(e) = first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    target.sync().map_err(|reason| RestoreError::Write { snapshot: snapshot.clone(), offset: 0, reason })?;
    let mut report = report.into_inner().unwrap_or_else(|p| p.into_inner());
    report.fallbacks.extend(map.take_fallbacks());
    Ok(report)
}

/// Restores the chunks `indices` (consecutive) through `run`, counting them in `report`.
/// Returns their bytes in the volume.
fn restore_batch(
    key: &TenantKey,
    vaults: &[&dyn Vault],
    map: &ChunkMap<'_>,
    indices: Range<usize>,
    run: &mut Run<'_>,
    report: &mut RestoreReport,
) -> Result<u64, RestoreError> {
    let mut bytes = 0;
    for index in indices {
        let (offset, len) = map.manifest().chunk_range(index);
        match map.entry(index as u64)? {
            ChunkRef::Data(id) => {
                let (plain, fallback) = fetch_checked(key, vaults, &id, run.snapshot, index, len)?;
                run.push_data(offset, &plain)?;
                report.chunks_written += 1;
                report.bytes_written += len;
                if let Some(errors) = fallback {
                    report.fallbacks.push((id, errors));
                }
            }
            ChunkRef::Hole => {
                report.holes += 1;
                run.push_hole(offset, len)?;
            }
        }
        bytes += len;
    }
    run.flush()?;
    Ok(bytes)
}

/// A restore thread's pending run of adjacent chunks, written as one request when the next
/// chunk does not continue it or the batch ends: data chunks gathered in an aligned buffer
/// (so that [`FileTarget`] can write it past the page cache), or holes to zero.
///
/// # Invariants
/// At most one kind is pending: `buf` is empty or `hole_bytes` is 0.
struct Run<'a> {
    target: &'a dyn Target,
    /// For errors.
    snapshot: &'a str,
    /// Holes are written ([`Target::zero`]); otherwise skipped.
    zero_holes: bool,
    /// Where the pending run starts in the volume.
    offset: u64,
    /// The pending data run, `DIRECT_ALIGN`-aligned; its capacity is a batch's bytes.
    buf: AlignedBuf,
    /// The pending run of holes' length.
    hole_bytes: u64,
}

impl<'a> Run<'a> {
    fn new(target: &'a dyn Target, snapshot: &'a str, zero_holes: bool, capacity: usize) -> Self {
        let mut buf = AlignedBuf::zeroed(capacity);
        buf.set_len(0);
        Self { target, snapshot, zero_holes, offset: 0, buf, hole_bytes: 0 }
    }

    /// Where the pending run ends.
    fn end(&self) -> u64 {
        self.offset + self.buf.len() as u64 + self.hole_bytes
    }

    /// Adds the data chunk `plain` at `offset`.
    fn push_data(&mut self, offset: u64, plain: &[u8]) -> Result<(), RestoreError> {
        if self.hole_bytes > 0 || offset != self.end() || self.buf.len() + plain.len() > self.buf.capacity() {
            self.flush()?;
        }
        if self.buf.is_empty() {
            self.offset = offset;
        }
        let filled = self.buf.len();
        if filled + plain.len() > self.buf.capacity() {
            // Only a chunk longer than a batch's bytes, which decoding never returns; written
            // as it is (through the page cache) rather than trusted to fit.
            return self.write_error(offset, self.target.write_at(offset, plain));
        }
        self.buf.set_len(filled + plain.len());
        self.buf[filled..].copy_from_slice(plain);
        debug_assert_eq!(self.hole_bytes, 0);
        Ok(())
    }

    /// Adds a hole of `len` bytes at `offset`.
    fn push_hole(&mut self, offset: u64, len: u64) -> Result<(), RestoreError> {
        if !self.zero_holes {
            // The target reads as zeros already. The gap ends the data run: the next data
            // chunk does not continue it.
            return Ok(());
        }
        if !self.buf.is_empty() || offset != self.end() {
            self.flush()?;
        }
        if self.hole_bytes == 0 {
            self.offset = offset;
        }
        self.hole_bytes += len;
        debug_assert!(self.buf.is_empty());
        Ok(())
    }

    /// Writes the pending run, if any.
    fn flush(&mut self) -> Result<(), RestoreError> {
        let result = if self.hole_bytes > 0 {
            self.target.zero(self.offset, self.hole_bytes)
        } else if !self.buf.is_empty() {
            self.target.write_at(self.offset, &self.buf)
        } else {
            Ok(())
        };
        self.buf.set_len(0);
        self.hole_bytes = 0;
        self.write_error(self.offset, result)
    }

    fn write_error(&self, offset: u64, result: Result<(), String>) -> Result<(), RestoreError> {
        result.map_err(|reason| RestoreError::Write { snapshot: self.snapshot.to_owned(), offset, reason })
    }
}

/// The export stream's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    /// The raw image, byte for byte.
    Raw,
    /// The raw image compressed as one zstd stream (`.raw.zst`).
    RawZst {
        /// zstd level.
        level: i32,
    },
}

/// Decoded chunks an export may hold ahead of its writer, in bytes (a soft bound: at
/// least one chunk per fetch thread).
const EXPORT_WINDOW_BYTES: u64 = 256 << 20;

/// Writes `manifest`'s image to `out` in order, with `threads` fetches in flight and at most
/// `4 × threads` decoded chunks (about [`EXPORT_WINDOW_BYTES`]) ahead of the writer.
/// Holes are written as zeros (a stream cannot skip); zstd squeezes them to nothing.
pub fn export(
    key: &TenantKey,
    vaults: &[&dyn Vault],
    manifest: &Manifest,
    out: &mut dyn Write,
    format: ExportFormat,
    threads: usize,
    progress: &(dyn Fn(Progress) + Sync),
) -> Result<RestoreReport, RestoreError> {
    let snapshot = manifest.snapshot_id().to_owned();
    let stream = |source| RestoreError::Stream { snapshot: snapshot.clone(), source };
    match format {
        ExportFormat::Raw => export_ordered(key, vaults, manifest, out, threads, progress),
        ExportFormat::RawZst { level } => {
            let mut encoder = zstd::stream::write::Encoder::new(out, level).map_err(stream)?;
            // Multithreaded compression when available would compete with the fetchers.
            let report = export_ordered(key, vaults, manifest, &mut encoder, threads, progress)?;
            encoder.finish().map_err(stream)?.flush().map_err(stream)?;
            Ok(report)
        }
    }
}

/// A window of decoded chunks waiting for their turn to be written.
struct Window {
    slots: std::collections::BTreeMap<usize, Result<Option<Vec<u8>>, RestoreError>>,
}

fn export_ordered(
    key: &TenantKey,
    vaults: &[&dyn Vault],
    manifest: &Manifest,
    out: &mut dyn Write,
    threads: usize,
    progress: &(dyn Fn(Progress) + Sync),
) -> Result<RestoreReport, RestoreError> {
    let snapshot = manifest.snapshot_id().to_owned();
    let count = manifest.chunk_count();
    let threads = threads.max(1);
    // Four chunks per thread keep the fetches busy while the writer waits on one, as long
    // as that is under EXPORT_WINDOW_BYTES; never less than one per thread.
    let per_window = (EXPORT_WINDOW_BYTES / u64::from(manifest.chunk_size().max(1))) as usize;
    let ahead = (threads * 4).min(per_window).max(threads);
    let next = AtomicUsize::new(0);
    let written = AtomicUsize::new(0);
    let cancel = AtomicBool::new(false);
    let window = Mutex::new(Window { slots: Default::default() });
    let ready = Condvar::new();
    let room = Condvar::new();
    let mut report = RestoreReport::default();
    let fallbacks = Mutex::new(Vec::new());
    let map = ChunkMap::new(key, vaults, manifest);
    let result = std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= count || cancel.load(Ordering::Acquire) {
                    return;
                }
                // Stay at most `ahead` chunks in front of the writer (bounded memory).
                {
                    let mut w = window.lock().unwrap_or_else(|p| p.into_inner());
                    while index >= written.load(Ordering::Acquire) + ahead && !cancel.load(Ordering::Acquire) {
                        w = room.wait(w).unwrap_or_else(|p| p.into_inner());
                    }
                }
                let (_, len) = manifest.chunk_range(index);
                let entry = match map.entry(index as u64) {
                    Ok(entry) => entry,
                    Err(e) => {
                        window.lock().unwrap_or_else(|p| p.into_inner()).slots.insert(index, Err(e.into()));
                        ready.notify_all();
                        return;
                    }
                };
                let item = match entry {
                    ChunkRef::Data(id) => {
                        fetch_checked(key, vaults, &id, &snapshot, index, len).map(|(plain, fallback)| {
                            if let Some(e) = fallback {
                                fallbacks.lock().unwrap_or_else(|p| p.into_inner()).push((id, e));
                            }
                            Some(plain)
                        })
                    }
                    ChunkRef::Hole => Ok(None),
                };
                window.lock().unwrap_or_else(|p| p.into_inner()).slots.insert(index, item);
                ready.notify_all();
            });
        }
        // The writer (this thread): emits chunks in order.
        let zeros = vec![0u8; manifest.chunk_size() as usize];
        let total = manifest.volume_size();
        let mut done = 0u64;
        for index in 0..count {
            let item = {
                let mut w = window.lock().unwrap_or_else(|p| p.into_inner());
                loop {
                    if let Some(item) = w.slots.remove(&index) {
                        break item;
                    }
                    w = ready.wait(w).unwrap_or_else(|p| p.into_inner());
                }
            };
            let (_, len) = manifest.chunk_range(index);
            let outcome = match item {
                Ok(Some(plain)) => {
                    report.chunks_written += 1;
                    report.bytes_written += len;
                    out.write_all(&plain)
                }
                Ok(None) => {
                    report.holes += 1;
                    out.write_all(&zeros[..len as usize])
                }
                Err(e) => {
                    cancel.store(true, Ordering::Release);
                    room.notify_all();
                    return Err(e);
                }
            };
            if let Err(source) = outcome {
                cancel.store(true, Ordering::Release);
                room.notify_all();
                return Err(RestoreError::Stream { snapshot: snapshot.clone(), source });
            }
            written.store(index + 1, Ordering::Release);
            // Take the lock so a fetcher between its check and its wait cannot miss this.
            drop(window.lock().unwrap_or_else(|p| p.into_inner()));
            room.notify_all();
            done += len;
            progress(Progress { done, total });
        }
        Ok(())
    });
    result?;
    out.flush().map_err(|source| RestoreError::Stream { snapshot: snapshot.clone(), source })?;
    report.fallbacks = fallbacks.into_inner().unwrap_or_else(|p| p.into_inner());
    report.fallbacks.extend(map.take_fallbacks());
    Ok(report)
}

/// A [`Target`] over a file or block device written with positional writes: past the page
/// cache (`O_DIRECT`, through a second handle on the same inode) where the write allows,
/// through the cache otherwise.
///
/// On this VM a fresh page-cache page is expensive and its price varies from run to run:
/// one restore of an 8 GiB image through the cache took 3.7 CPU-seconds, the next 6.9 and
/// half again as long (docs/benchmarks.md). A direct write needs its buffer's address, its
/// offset and its length aligned to [`DIRECT_ALIGN`]; [`restore`] hands over runs that
/// start aligned in an aligned buffer. Whole pages go direct; what is left goes through
/// the cache: the partial last page of a volume whose size is not a multiple of
/// [`DIRECT_ALIGN`], or every byte of an unaligned write (a chunk size that is not a
/// multiple of it). A filesystem that refuses `O_DIRECT` (`EINVAL` when the handle is
/// opened, or on a direct write: tmpfs before Linux 6.6, some FUSE filesystems) gets every
/// write through the cache from then on. Any other error is the restore's error.
///
/// # Coherence of the two handles
/// A cached page is never written back over direct data, for these reasons:
/// - Within a restore each byte is written once, and a direct write covers whole pages, so
///   a page that a direct write touches holds no byte of any cached write of the same
///   restore: no page ever gets both. The cached write of a partial last page reads the
///   rest of the page first (beyond the volume: the device's own bytes, left as they were,
///   which is why that page is not rounded up and written direct).
/// - Pages cached before a direct write (an earlier buffered writer or reader of the
///   device): the kernel writes back the dirty pages of the range and drops the range's
///   pages from the cache before the direct write, and drops them again after it
///   (`kiocb_invalidate_pages`, `kiocb_invalidate_post_direct_write`), so nothing older
///   can be written back or read over it later.
/// - A cached write after a direct write to the same page (the rest of the restore, once
///   the filesystem refused a direct write) reads the page from the disk, where the direct
///   write has landed (it completed before returning), and its writeback writes the newer
///   bytes.
///
/// [`Target::sync`] is one fsync of the inode, which covers both handles: the cached
/// pages, the metadata that direct writes changed (allocated blocks, ext4's conversion of
/// unwritten extents) and the device's write cache.
#[derive(Debug)]
pub struct FileTarget {
    /// The cached handle: unaligned writes, every write once `O_DIRECT` was refused, fsync.
    file: File,
    /// A second handle on the same inode, opened with `O_DIRECT`; `None` when the
    /// filesystem refused it.
    direct: Option<File>,
    /// The filesystem refused a direct write (`EINVAL`): the rest goes through the cache.
    direct_refused: AtomicBool,
    /// Bytes written through `direct`.
    direct_bytes: AtomicU64,
    /// Aligned zeros for [`Target::zero`], allocated on first use.
    zeros: OnceLock<AlignedBuf>,
    path: PathBuf,
    /// Test-only failure injection: the next direct write fails with this errno (0: none).
    #[cfg(test)]
    fail_next_direct_write: std::sync::atomic::AtomicI32,
}

impl FileTarget {
    /// Creates (or truncates) a regular file of `size` bytes that reads as zeros (sparse);
    /// restore with `target_is_zeroed`.
    pub fn create_sparse(path: &Path, size: u64) -> io::Result<Self> {
        let file = OpenOptions::new().write(true).create(true).truncate(true).open(path)?;
        file.set_len(size)?;
        Self::new(file, path)
    }

    /// Opens an existing file or block device for writing, which must hold at least `size`
    /// bytes; holes are written as zeros.
    pub fn open_existing(path: &Path, size: u64) -> io::Result<Self> {
        use std::io::{Seek, SeekFrom};
        let mut file = OpenOptions::new().write(true).open(path)?;
        let have = file.seek(SeekFrom::End(0))?;
        if have < size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} holds {have} bytes, the snapshot needs {size}", path.display()),
            ));
        }
        Self::new(file, path)
    }

    /// Bytes written past the page cache so far (the rest went through it).
    pub fn bytes_written_direct(&self) -> u64 {
        self.direct_bytes.load(Ordering::Relaxed)
    }

    fn new(file: File, path: &Path) -> io::Result<Self> {
        let direct = direct_unless_refused(reopen_direct_for_writing(&file)).map_err(|e| {
            io::Error::new(e.kind(), format!("reopen {} with O_DIRECT through /proc/self/fd: {e}", path.display()))
        })?;
        Ok(FileTarget {
            file,
            direct,
            direct_refused: AtomicBool::new(false),
            direct_bytes: AtomicU64::new(0),
            zeros: OnceLock::new(),
            path: path.to_owned(),
            #[cfg(test)]
            fail_next_direct_write: std::sync::atomic::AtomicI32::new(0),
        })
    }

    /// Writes all of `data` at `offset`: its whole pages through the direct handle when
    /// `data` and `offset` start aligned and direct writes are allowed, the rest through
    /// the cache.
    fn write_uncached(&self, data: &[u8], offset: u64) -> io::Result<()> {
        let direct = self.direct.as_ref().filter(|_| !self.direct_refused.load(Ordering::Relaxed));
        let written = match direct {
            Some(direct) if starts_aligned(data, offset) => {
                let pages = data.len() - data.len() % DIRECT_ALIGN;
                self.write_direct(direct, data.get(..pages).unwrap_or_default(), offset)?
            }
            _ => 0,
        };
        self.file.write_all_at(data.get(written..).unwrap_or_default(), offset + written as u64)
    }

    /// Writes `pages` (a multiple of [`DIRECT_ALIGN`], aligned, at an aligned `offset`)
    /// through `direct`. Returns how many bytes it wrote, for the caller to write the rest
    /// through the cache: all of them; or fewer when the kernel completed a part that ends
    /// inside a page, or refused the write with `EINVAL` (latched: every later write goes
    /// through the cache).
    fn write_direct(&self, direct: &File, pages: &[u8], offset: u64) -> io::Result<usize> {
        let mut written = 0usize;
        while let Some(rest) = pages.get(written..).filter(|rest| !rest.is_empty()) {
            match self.pwrite_direct(direct, rest, offset + written as u64) {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "a direct write wrote nothing")),
                Ok(n) if n % DIRECT_ALIGN != 0 => {
                    written += n;
                    break;
                }
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    self.direct_refused.store(true, Ordering::Relaxed);
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        self.direct_bytes.fetch_add(written as u64, Ordering::Relaxed);
        Ok(written)
    }

    fn pwrite_direct(&self, direct: &File, buf: &[u8], offset: u64) -> io::Result<usize> {
        #[cfg(test)]
        if let errno @ 1.. = self.fail_next_direct_write.swap(0, Ordering::Relaxed) {
            return Err(io::Error::from_raw_os_error(errno));
        }
        direct.write_at(buf, offset)
    }
}

impl Target for FileTarget {
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), String> {
        self.write_uncached(data, offset).map_err(|e| format!("{}: {e}", self.path.display()))
    }

    fn zero(&self, offset: u64, len: u64) -> Result<(), String> {
        let zeros = self.zeros.get_or_init(|| AlignedBuf::zeroed(ZEROS_BYTES));
        let end = offset + len;
        let mut at = offset;
        while at < end {
            let n = (end - at).min(ZEROS_BYTES as u64) as usize;
            self.write_at(at, zeros.get(..n).unwrap_or_default())?;
            at += n as u64;
        }
        Ok(())
    }

    fn sync(&self) -> Result<(), String> {
        // fsync is per inode: this covers the direct handle's writes too.
        self.file.sync_all().map_err(|e| format!("fsync {}: {e}", self.path.display()))
    }
}

/// The largest write [`FileTarget::zero`] makes (a batch's bytes).
const ZEROS_BYTES: usize = BATCH_BYTES as usize;

/// The direct handle, or `None` when the filesystem refuses `O_DIRECT` (`EINVAL` at open:
/// no direct I/O in tmpfs before Linux 6.6, some FUSE filesystems). Any other failure (out
/// of file descriptors, no `/proc`) is an error, not a reason to go through the cache.
fn direct_unless_refused(opened: io::Result<File>) -> io::Result<Option<File>> {
    match opened {
        Ok(direct) => Ok(Some(direct)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Whether a write of `data` at `offset` starts where a direct write can: address and
/// offset aligned to [`DIRECT_ALIGN`] (the length is cut to whole pages by the caller).
fn starts_aligned(data: &[u8], offset: u64) -> bool {
    (data.as_ptr() as usize) % DIRECT_ALIGN == 0 && offset % DIRECT_ALIGN as u64 == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::create::{create_snapshot, Changed, CreateOptions, FileSource};
    use crate::vault::LocalVault;

    fn image(dir: &std::path::Path) -> (std::path::PathBuf, Vec<u8>) {
        let mut data = vec![0u8; 300 * 1024 + 17];
        for (i, b) in data.iter_mut().enumerate().skip(70_000).take(90_000) {
            *b = (i * 31 % 251) as u8;
        }
        data[290 * 1024] = 1;
        let path = dir.join("image.raw");
        std::fs::write(&path, &data).unwrap();
        (path, data)
    }

    fn snapshot(vault: &LocalVault, key: &TenantKey, path: &std::path::Path) -> Manifest {
        let options = CreateOptions {
            volume: "img".into(),
            marker: "m".into(),
            marker_seq: 0,
            node: "n".into(),
            chunk_size: 16 * 1024,
            zstd_level: 1,
            threads: 2,
            snapshot_id: None,
            created_unix: None,
            group: None,
            read_limit: None,
            busy_read_limit: None,
            cpu_priority: crate::priority::CpuPriority::Normal,
            stop: None,
        };
        let source = FileSource::open(path).unwrap();
        let report =
            create_snapshot(key, vault, &source, &options, None, Changed::All("test".into()), &|_| {}).unwrap();
        Manifest::load(&vault.get_object(&report.manifest_key).unwrap(), key).unwrap()
    }

    #[test]
    fn restore_and_export_are_bit_exact() {
        let dir = tempfile::tempdir().unwrap();
        let (path, data) = image(dir.path());
        let vault = LocalVault::open("local", dir.path().join("vault"), "t").unwrap();
        let key = TenantKey::from_bytes([4; 32]);
        let manifest = snapshot(&vault, &key, &path);
        let out = dir.path().join("restored.raw");
        let target = FileTarget::create_sparse(&out, manifest.volume_size()).unwrap();
        let options = RestoreOptions { threads: 3, target_is_zeroed: true };
        let report = restore(&key, &[&vault], &manifest, &target, &options, &|_| {}).unwrap();
        assert!(report.holes > 0 && report.fallbacks.is_empty());
        assert!(std::fs::read(&out).unwrap() == data);
        // Over an existing file full of junk: holes must be written.
        std::fs::write(&out, vec![0xEE; data.len()]).unwrap();
        let target = FileTarget::open_existing(&out, manifest.volume_size()).unwrap();
        let options = RestoreOptions { threads: 2, target_is_zeroed: false };
        restore(&key, &[&vault], &manifest, &target, &options, &|_| {}).unwrap();
        assert!(std::fs::read(&out).unwrap() == data);

        let mut raw = Vec::new();
        export(&key, &[&vault], &manifest, &mut raw, ExportFormat::Raw, 3, &|_| {}).unwrap();
        assert!(raw == data);
        let mut zst = Vec::new();
        export(&key, &[&vault], &manifest, &mut zst, ExportFormat::RawZst { level: 3 }, 2, &|_| {}).unwrap();
        assert!(zst.len() < data.len() / 2);
        assert!(zstd::stream::decode_all(&zst[..]).unwrap() == data);
    }

    /// Chunk size of [`snapshot`].
    const CHUNK: u64 = 16 * 1024;
    /// Neither a multiple of the chunk size nor of `DIRECT_ALIGN`: the last chunk is one
    /// whole page and 2258 bytes.
    const ODD_SIZE: u64 = 193 * CHUNK + DIRECT_ALIGN as u64 + 2258;

    /// An image of [`ODD_SIZE`] bytes: data (no zero byte) except for the chunks 92 to 145,
    /// which are holes; the data runs into the last byte. With 64 chunks to a batch, the
    /// runs a restore writes are chunks 0-63, 64-91, 146-191 and 192-193, and the holes
    /// 92-127 and 128-145.
    fn odd_image(dir: &std::path::Path) -> (std::path::PathBuf, Vec<u8>) {
        assert_eq!(BATCH_BYTES / CHUNK, 64);
        assert_ne!(ODD_SIZE % DIRECT_ALIGN as u64, 0);
        let holes = 92 * CHUNK as usize..146 * CHUNK as usize;
        let data: Vec<u8> =
            (0..ODD_SIZE as usize).map(|i| if holes.contains(&i) { 0 } else { (i * 31 % 251) as u8 | 1 }).collect();
        let path = dir.join("odd.raw");
        std::fs::write(&path, &data).unwrap();
        (path, data)
    }

    /// Whether the directory's filesystem takes `O_DIRECT` (tmpfs before Linux 6.6 does not).
    fn takes_direct_io(dir: &std::path::Path) -> bool {
        let probe = FileTarget::create_sparse(&dir.join("probe"), 0).unwrap();
        probe.direct.is_some()
    }

    /// Whole pages go direct and the partial last page through the cache, in a new sparse
    /// file and over an existing, longer one whose bytes past the volume must survive.
    #[test]
    fn restore_writes_whole_pages_direct_and_the_tail_through_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let direct_io = takes_direct_io(dir.path());
        if !direct_io {
            eprintln!("the test directory's filesystem refuses O_DIRECT: only the bytes are checked");
        }
        let (path, data) = odd_image(dir.path());
        let vault = LocalVault::open("local", dir.path().join("vault"), "t").unwrap();
        let key = TenantKey::from_bytes([4; 32]);
        let manifest = snapshot(&vault, &key, &path);
        assert_eq!(manifest.volume_size(), ODD_SIZE);
        let tail = ODD_SIZE % DIRECT_ALIGN as u64;

        // A new sparse file: holes skipped, every data page direct but the partial last one.
        let out = dir.path().join("restored.raw");
        let target = FileTarget::create_sparse(&out, ODD_SIZE).unwrap();
        let options = RestoreOptions { threads: 2, target_is_zeroed: true };
        let report = restore(&key, &[&vault], &manifest, &target, &options, &|_| {}).unwrap();
        assert_eq!(report.holes, 54);
        assert_eq!(report.bytes_written, ODD_SIZE - 54 * CHUNK);
        assert!(std::fs::read(&out).unwrap() == data);
        if direct_io {
            assert_eq!(target.bytes_written_direct(), report.bytes_written - tail);
        }
        drop(target);

        // Over a longer file of junk: holes are zeroed (direct too), and the bytes past the
        // volume, in its last page and beyond, stay as they were.
        let junk = ODD_SIZE as usize + 5000;
        std::fs::write(&out, vec![0xEE; junk]).unwrap();
        let target = FileTarget::open_existing(&out, ODD_SIZE).unwrap();
        let options = RestoreOptions { threads: 2, target_is_zeroed: false };
        restore(&key, &[&vault], &manifest, &target, &options, &|_| {}).unwrap();
        let back = std::fs::read(&out).unwrap();
        assert_eq!(back.len(), junk);
        assert!(back[..data.len()] == data[..]);
        assert!(back[data.len()..].iter().all(|&b| b == 0xEE));
        if direct_io {
            assert_eq!(target.bytes_written_direct(), ODD_SIZE - tail);
        }
    }

    /// Records what a restore asks of its target.
    #[derive(Default)]
    struct Recorder {
        writes: Mutex<Vec<(u64, u64)>>,
        zeros: Mutex<Vec<(u64, u64)>>,
        unaligned: AtomicUsize,
    }

    impl Target for Recorder {
        fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), String> {
            if data.as_ptr() as usize % DIRECT_ALIGN != 0 {
                self.unaligned.fetch_add(1, Ordering::Relaxed);
            }
            self.writes.lock().unwrap().push((offset, data.len() as u64));
            Ok(())
        }

        fn zero(&self, offset: u64, len: u64) -> Result<(), String> {
            self.zeros.lock().unwrap().push((offset, len));
            Ok(())
        }

        fn sync(&self) -> Result<(), String> {
            Ok(())
        }
    }

    /// One write per 64 KiB chunk made direct writes into a sparse file wait for the disk
    /// 64 KiB at a time (858 MB/s here, against 1.5 to 2.2 GB/s in 1 MiB requests).
    #[test]
    fn restore_writes_each_run_of_adjacent_chunks_in_a_batch_as_one_aligned_write() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = odd_image(dir.path());
        let vault = LocalVault::open("local", dir.path().join("vault"), "t").unwrap();
        let key = TenantKey::from_bytes([4; 32]);
        let manifest = snapshot(&vault, &key, &path);
        let runs = |list: &Mutex<Vec<(u64, u64)>>| {
            let mut list = list.lock().unwrap().clone();
            list.sort_unstable();
            list
        };
        let data_runs = vec![
            (0, 64 * CHUNK),
            (64 * CHUNK, 28 * CHUNK),
            (146 * CHUNK, 46 * CHUNK),
            (192 * CHUNK, ODD_SIZE - 192 * CHUNK),
        ];
        for target_is_zeroed in [true, false] {
            let target = Recorder::default();
            let options = RestoreOptions { threads: 2, target_is_zeroed };
            restore(&key, &[&vault], &manifest, &target, &options, &|_| {}).unwrap();
            assert_eq!(runs(&target.writes), data_runs);
            let hole_runs =
                if target_is_zeroed { vec![] } else { vec![(92 * CHUNK, 36 * CHUNK), (128 * CHUNK, 18 * CHUNK)] };
            assert_eq!(runs(&target.zeros), hole_runs);
            assert_eq!(target.unaligned.load(Ordering::Relaxed), 0);
        }
    }

    /// How [`restore_refused`] makes the direct handle fail.
    enum Refusal {
        /// As when opening it failed with `EINVAL`: there is none.
        AtOpen,
        /// Its next write fails with this errno.
        NextWrite(i32),
    }

    /// Restores the odd image on one thread (so the first write is the run at offset 0)
    /// into a new sparse file whose direct handle fails as `refusal` says. Checks the bytes
    /// when the restore succeeds.
    fn restore_refused(refusal: Refusal) -> (FileTarget, Result<RestoreReport, RestoreError>) {
        let dir = tempfile::tempdir().unwrap();
        let (path, data) = odd_image(dir.path());
        let vault = LocalVault::open("local", dir.path().join("vault"), "t").unwrap();
        let key = TenantKey::from_bytes([4; 32]);
        let manifest = snapshot(&vault, &key, &path);
        let out = dir.path().join("restored.raw");
        let mut target = FileTarget::create_sparse(&out, ODD_SIZE).unwrap();
        match refusal {
            Refusal::AtOpen => target.direct = None,
            Refusal::NextWrite(errno) => target.fail_next_direct_write.store(errno, Ordering::Relaxed),
        }
        let options = RestoreOptions { threads: 1, target_is_zeroed: true };
        let result = restore(&key, &[&vault], &manifest, &target, &options, &|_| {});
        if result.is_ok() {
            assert!(std::fs::read(&out).unwrap() == data, "a restore that succeeds is bit-exact");
        }
        (target, result)
    }

    /// Without a direct handle (the filesystem refused `O_DIRECT` at open) every byte goes
    /// through the cache, the partial last page included.
    #[test]
    fn a_filesystem_that_refuses_o_direct_at_open_gets_every_write_through_the_cache() {
        let (target, result) = restore_refused(Refusal::AtOpen);
        assert_eq!(result.unwrap().bytes_written, ODD_SIZE - 54 * CHUNK);
        assert_eq!(target.bytes_written_direct(), 0);
    }

    /// `EINVAL` on a direct write is the filesystem or device refusing it (one that accepts
    /// the open, or needs an alignment beyond 4 KiB): the refused run and the rest of the
    /// restore go through the cache, neither a failed restore nor a lost run.
    #[test]
    fn a_refused_direct_write_sends_it_and_the_rest_of_the_restore_through_the_cache() {
        if !takes_direct_io(tempfile::tempdir().unwrap().path()) {
            eprintln!("skipped: the test directory's filesystem refuses O_DIRECT");
            return;
        }
        let (target, result) = restore_refused(Refusal::NextWrite(libc::EINVAL));
        assert_eq!(result.unwrap().bytes_written, ODD_SIZE - 54 * CHUNK);
        assert!(target.direct_refused.load(Ordering::Relaxed));
        assert_eq!(target.bytes_written_direct(), 0);
    }

    /// Any other error of a direct write (here `EIO`) fails the restore, naming the run.
    #[test]
    fn a_failed_direct_write_is_the_restore_error_not_a_fallback() {
        if !takes_direct_io(tempfile::tempdir().unwrap().path()) {
            eprintln!("skipped: the test directory's filesystem refuses O_DIRECT");
            return;
        }
        let (target, result) = restore_refused(Refusal::NextWrite(libc::EIO));
        let err = result.unwrap_err();
        assert!(
            matches!(&err, RestoreError::Write { offset: 0, reason, .. } if reason.contains("Input/output error")),
            "{err}"
        );
        assert!(!target.direct_refused.load(Ordering::Relaxed));
    }

    /// Running out of file descriptors is not a filesystem without `O_DIRECT`.
    #[test]
    fn only_einval_when_opening_the_direct_handle_means_no_direct_writes() {
        let refused = direct_unless_refused(Err(io::Error::from_raw_os_error(libc::EINVAL)));
        assert!(matches!(refused, Ok(None)));
        let transient = direct_unless_refused(Err(io::Error::from_raw_os_error(libc::EMFILE)));
        assert_eq!(transient.unwrap_err().raw_os_error(), Some(libc::EMFILE));
    }

    #[test]
    fn a_corrupt_chunk_is_fetched_from_the_next_vault() {
        let dir = tempfile::tempdir().unwrap();
        let (path, data) = image(dir.path());
        let key = TenantKey::from_bytes([4; 32]);
        let a = LocalVault::open("a", dir.path().join("a"), "t").unwrap();
        let b = LocalVault::open("b", dir.path().join("b"), "t").unwrap();
        let manifest = snapshot(&a, &key, &path);
        snapshot(&b, &key, &path); // same chunks in b
        let victim = ChunkMap::new(&key, &[&a], &manifest).distinct_data().unwrap()[0];
        // Damage one byte of its frame in a's pack.
        let at = a.store().locate(&victim).unwrap().unwrap();
        let pack = std::fs::OpenOptions::new().read(true).write(true).open(&at.pack).unwrap();
        let mut byte = [0u8];
        std::os::unix::fs::FileExt::read_exact_at(&pack, &mut byte, at.offset + 60).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&pack, &[byte[0] ^ 0xff], at.offset + 60).unwrap();

        let mut raw = Vec::new();
        let err = export(&key, &[&a], &manifest, &mut raw, ExportFormat::Raw, 2, &|_| {}).unwrap_err();
        assert!(err.to_string().contains(&victim.to_string()), "{err}");
        let mut raw = Vec::new();
        let report = export(&key, &[&a, &b], &manifest, &mut raw, ExportFormat::Raw, 2, &|_| {}).unwrap();
        assert!(raw == data);
        assert_eq!(report.fallbacks.len(), 1);
        assert_eq!(report.fallbacks[0].0, victim);
        assert!(report.fallbacks[0].1.contains("checksum"), "{}", report.fallbacks[0].1);

        // An index chunk missing from a: read from b, reported as a copy to heal; missing
        // from both, the restore fails naming it and the chunks it covers.
        let index = manifest.index_chunks()[0];
        assert!(a.delete_chunk(&index).unwrap());
        let target = dir.path().join("restored");
        let options = RestoreOptions { threads: 3, target_is_zeroed: true };
        let file = FileTarget::create_sparse(&target, manifest.volume_size()).unwrap();
        let report = restore(&key, &[&a, &b], &manifest, &file, &options, &|_| {}).unwrap();
        assert!(std::fs::read(&target).unwrap() == data);
        assert!(report.fallbacks.iter().any(|(id, _)| *id == index), "{:?}", report.fallbacks);
        assert!(b.delete_chunk(&index).unwrap());
        let err = restore(&key, &[&a, &b], &manifest, &file, &options, &|_| {}).unwrap_err();
        assert!(matches!(&err, RestoreError::Index(e) if e.id == index), "{err}");
        let err = export(&key, &[&a, &b], &manifest, &mut Vec::new(), ExportFormat::Raw, 2, &|_| {}).unwrap_err();
        assert!(err.to_string().contains(&index.to_string()), "{err}");
    }
}
