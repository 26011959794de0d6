//! The POSIX backend: `pread`/`pwrite`/`fdatasync`/`fallocate`/`lseek(SEEK_DATA)`, and the
//! [`PosixEnv`] that hands out files of either backend.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::direct;
use super::uring::{Ring, UringFile};
use super::{Env, Extent, IoBackend, OpenMode, Storage};

/// A real directory tree on the local filesystem.
#[derive(Debug, Clone)]
pub struct PosixEnv {
    ring: Option<Arc<Ring>>,
}

impl PosixEnv {
    /// Opens the environment with the requested backend. [`IoBackend::Uring`] probes
    /// io_uring and, when the kernel refuses it (ENOSYS, or EPERM from seccomp or
    /// `kernel.io_uring_disabled`), falls back to POSIX with one log line.
    pub fn new(backend: IoBackend) -> Self {
        match backend {
            IoBackend::Posix => Self::posix(),
            IoBackend::Uring => Self::uring().unwrap_or_else(|e| {
                tracing::warn!("io_uring unavailable ({e}); using the pread/pwrite backend");
                Self::posix()
            }),
        }
    }

    /// The io_uring backend, or the kernel's refusal.
    pub fn uring() -> io::Result<Self> {
        Ok(Self { ring: Some(Arc::new(Ring::start()?)) })
    }

    /// The POSIX backend, which cannot fail to start.
    pub fn posix() -> Self {
        Self { ring: None }
    }
}

impl Env for PosixEnv {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn Storage>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(mode == OpenMode::CreateIfMissing)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)?;
        let file = PosixFile::new(file);
        Ok(match &self.ring {
            Some(ring) => Arc::new(UringFile::new(file, Arc::clone(ring))),
            None => Arc::new(file),
        })
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir_all(path)
    }

    fn read_dir(&self, path: &Path) -> io::Result<Vec<PathBuf>> {
        std::fs::read_dir(path)?.map(|entry| entry.map(|e| e.path())).collect()
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        File::open(path)?.sync_all()
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn lock(&self, path: &Path) -> io::Result<Box<dyn std::any::Any + Send + Sync>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)?;
        // SAFETY: flock only reads its integer arguments; the fd stays open for as long as
        // the returned guard (which owns the File) lives, and the lock with it.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Box::new(file))
    }

    fn backend_name(&self) -> &'static str {
        if self.ring.is_some() {
            "io_uring"
        } else {
            "posix"
        }
    }
}

/// A file accessed with positioned syscalls.
#[derive(Debug)]
pub(crate) struct PosixFile {
    file: File,
    /// Whether [`Storage::read_uncached`] may still ask for `RWF_DONTCACHE` (cleared when
    /// the kernel or the filesystem refuses it).
    dontcache: AtomicBool,
}

/// `RWF_DONTCACHE` (Linux 6.14): a buffered read that drops the page-cache pages it
/// brought in once it has copied them (pages already cached stay).
const RWF_DONTCACHE: libc::c_int = 0x80;

impl PosixFile {
    pub(crate) fn new(file: File) -> Self {
        Self { file, dontcache: AtomicBool::new(true) }
    }

    /// [`Storage::read_uncached`]: through the page cache with `RWF_DONTCACHE`, or plainly
    /// cached where the kernel or the filesystem refuses that flag (remembered).
    ///
    /// Never `O_DIRECT`, although it costs the least CPU: this file is the block store the
    /// volume's writers write with buffered `pwrite`s under the journal lock. On ext4 and
    /// XFS a direct read holds the inode's lock (shared) for its whole disk read, first
    /// writing back and waiting for the dirty cached pages of its range, and a buffered
    /// write needs that lock exclusively: every write to the file waited behind the
    /// snapshot's reads (a 4 KiB `pwrite`'s p99.9 went from 8 µs alone to 310 µs beside a
    /// loop of 64 KiB direct reads, and to 39 µs beside `RWF_DONTCACHE` ones reading five
    /// times the bytes; `benches/compare/store_reads.sh`, docs/benchmarks.md). A buffered read returns dirty pages as they are, writing
    /// nothing, and on ext4 takes no inode lock at all (XFS takes its lock shared for
    /// buffered reads too, so there only the write-back goes away).
    pub(crate) fn read_uncached(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if self.dontcache.load(Ordering::Relaxed) {
            match read_dontcache(&self.file, buf, offset) {
                Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::ENOSYS)) => {
                    tracing::debug!("RWF_DONTCACHE refused ({e}); bulk reads of the store stay in the page cache");
                    self.dontcache.store(false, Ordering::Relaxed);
                }
                done => return done,
            }
        }
        direct::read_cached(&self.file, buf, offset).map(|_| ())
    }

    pub(crate) fn raw_fd(&self) -> i32 {
        self.file.as_raw_fd()
    }

    fn fallocate(&self, mode: i32, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let offset = to_off(offset)?;
        let len = to_off(len)?;
        loop {
            // SAFETY: fallocate only reads its integer arguments; the fd is owned by `self`.
            let rc = unsafe { libc::fallocate(self.raw_fd(), mode, offset, len) };
            if rc == 0 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }

    /// One `preadv2(RWF_NOWAIT)`: reads what the page cache holds without blocking.
    /// `Ok(Some(0))` is end of file; `Ok(None)` when the read would block.
    pub(crate) fn read_nowait(&self, buf: &mut [u8], offset: u64) -> io::Result<Option<usize>> {
        let iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
        // SAFETY: the iovec points at `buf`, exclusively borrowed for the whole call; the
        // kernel writes at most `buf.len()` bytes into it.
        let n = unsafe { libc::preadv2(self.raw_fd(), &iov, 1, to_off(offset)?, libc::RWF_NOWAIT) };
        nowait_result(n)
    }

    fn seek(&self, offset: u64, whence: i32) -> io::Result<Option<u64>> {
        let offset = to_off(offset)?;
        // SAFETY: lseek only reads its integer arguments; the fd is owned by `self`. The
        // file position it moves is never used: every read and write is positioned.
        let rc = unsafe { libc::lseek(self.raw_fd(), offset, whence) };
        if rc >= 0 {
            return Ok(Some(rc as u64));
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(err)
        }
    }
}

fn nowait_result(n: isize) -> io::Result<Option<usize>> {
    if n >= 0 {
        return Ok(Some(n as usize));
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EAGAIN | libc::EOPNOTSUPP | libc::EINTR) => Ok(None),
        _ => Err(err),
    }
}

fn to_off(value: u64) -> io::Result<i64> {
    i64::try_from(value).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))
}

impl Storage for PosixFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        direct::read_cached(&self.file, buf, offset).map(|_| ())
    }

    fn read_uncached(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        PosixFile::read_uncached(self, buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        let mut iovs: Vec<libc::iovec> =
            bufs.iter().map(|b| libc::iovec { iov_base: b.as_ptr() as *mut libc::c_void, iov_len: b.len() }).collect();
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let mut done = 0usize;
        while done < total {
            // Drop the iovecs already written, and trim the one written in part.
            let mut skip = done;
            let mut first = 0;
            while first < iovs.len() && skip >= bufs[first].len() {
                skip -= bufs[first].len();
                first += 1;
            }
            if let (Some(iov), Some(buf)) = (iovs.get_mut(first), bufs.get(first)) {
                iov.iov_base = buf[skip..].as_ptr() as *mut libc::c_void;
                iov.iov_len = buf.len() - skip;
            }
            let pending = &iovs[first..];
            // SAFETY: every iovec points into a buffer of `bufs`, valid and unmodified for the
            // whole call; the kernel only reads from them.
            let n = unsafe {
                libc::pwritev(
                    self.raw_fd(),
                    pending.as_ptr(),
                    pending.len() as libc::c_int,
                    to_off(offset + done as u64)?,
                )
            };
            if n < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::WriteZero, "pwritev wrote nothing"));
            }
            done += n as usize;
        }
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.fallocate(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset, len)
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        match self.fallocate(libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE, offset, len) {
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => write_zeros(self, offset, len),
            other => other,
        }
    }

    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        match self.fallocate(libc::FALLOC_FL_KEEP_SIZE, offset, len) {
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
            other => other,
        }
    }

    fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        let end = offset.saturating_add(len);
        let mut extents: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let data = self.seek(pos, libc::SEEK_DATA)?.unwrap_or(u64::MAX);
            let (run_end, hole) = if data > pos {
                (data.min(end), true)
            } else {
                let hole_at = self.seek(pos, libc::SEEK_HOLE)?.unwrap_or(u64::MAX);
                (hole_at.min(end), false)
            };
            if run_end <= pos {
                // The file changed under us; report the rest as data, which is always safe.
                extents.push(Extent { len: end - pos, hole: false });
                break;
            }
            extents.push(Extent { len: run_end - pos, hole });
            pos = run_end;
        }
        Ok(extents)
    }
}

/// Writes `len` zero bytes at `offset` in 1 MiB pieces; the fallback when a filesystem
/// cannot zero a range in place.
pub(crate) fn write_zeros(storage: &dyn Storage, offset: u64, len: u64) -> io::Result<()> {
    const PIECE: u64 = 1 << 20;
    let zeros = vec![0u8; PIECE.min(len) as usize];
    let mut done = 0;
    while done < len {
        let n = PIECE.min(len - done) as usize;
        storage.write_at(&zeros[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

/// Fills `buf` from `offset` with `preadv2(RWF_DONTCACHE)`; bytes past the end of the file
/// read as zeros. `EOPNOTSUPP` (or `ENOSYS`) from the first call means the flag is refused.
fn read_dontcache(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut filled = 0usize;
    while let Some(rest) = buf.get_mut(filled..).filter(|rest| !rest.is_empty()) {
        let iov = libc::iovec { iov_base: rest.as_mut_ptr().cast(), iov_len: rest.len() };
        let at = to_off(offset + filled as u64)?;
        // SAFETY: `iov` describes `rest`, writable and alive for the call; the kernel
        // writes at most `rest.len()` bytes into it.
        let n = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, at, RWF_DONTCACHE) };
        match n {
            0 => {
                rest.fill(0);
                break;
            }
            n if n > 0 => filled += n as usize,
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How many of the pages of `file`'s first `len` bytes are in the page cache.
    fn resident_pages(file: &File, len: usize) -> usize {
        // SAFETY: a shared read-only mapping of `len` bytes of an open file, unmapped below;
        // `mincore` writes one byte per page into `pages`, which has that many.
        unsafe {
            let map = libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, file.as_raw_fd(), 0);
            assert_ne!(map, libc::MAP_FAILED, "mmap: {}", io::Error::last_os_error());
            let mut pages = vec![0u8; len.div_ceil(4096)];
            let rc = libc::mincore(map, len, pages.as_mut_ptr());
            libc::munmap(map, len);
            assert_eq!(rc, 0, "mincore: {}", io::Error::last_os_error());
            pages.iter().filter(|&&p| p & 1 != 0).count()
        }
    }

    /// A bulk read of the block store returns what was written, written back or still
    /// dirty, zeros past the end, and (where the kernel takes `RWF_DONTCACHE`) leaves none
    /// of the pages it read into the page cache.
    #[test]
    fn uncached_reads_see_every_write_and_leave_the_page_cache_as_they_found_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        let len = 1 << 20;
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let file = File::options().read(true).write(true).open(&path).unwrap();
        file.sync_all().unwrap();
        // SAFETY: plain advice on an open descriptor.
        let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(rc, 0);
        let cached_before = resident_pages(&file, len);
        let store = PosixFile::new(file.try_clone().unwrap());

        let mut buf = vec![0u8; len];
        store.read_uncached(&mut buf, 0).unwrap();
        assert!(buf == data, "the written bytes");
        if store.dontcache.load(Ordering::Relaxed) {
            assert_eq!(cached_before, 0, "the file's pages were dropped before the read");
            assert_eq!(resident_pages(&file, len), 0, "pages the read brought in stayed cached");
        } else {
            eprintln!("RWF_DONTCACHE refused here: the reads went through the page cache");
        }

        // A dirty page (written, not synced) reads as written; past the end reads zeros.
        store.write_at(&[7u8; 4096], 8192).unwrap();
        let mut page = vec![0u8; 8192];
        store.read_uncached(&mut page, 4096).unwrap();
        assert!(page[..4096] == data[4096..8192] && page[4096..].iter().all(|&b| b == 7));
        let mut tail = vec![1u8; 8192];
        store.read_uncached(&mut tail, len as u64 - 4096).unwrap();
        assert!(tail[..4096] == data[len - 4096..] && tail[4096..].iter().all(|&b| b == 0));
    }
}
