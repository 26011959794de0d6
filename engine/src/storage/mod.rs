//! The narrow storage interface every byte of Keel's on-disk state goes through.
//!
//! The volume never touches `std::fs` directly: it asks an [`Env`] for files and reads and
//! writes them through [`Storage`]. That is what lets the crash tests swap in
//! [`FaultyEnv`](crate::testing::FaultyEnv) (torn writes, lost unsynced writes, failing
//! fsync) and run the exact code the daemon runs.
//!
//! Backends:
//! - [`PosixEnv`] with [`IoBackend::Posix`] (the default): `pread`/`pwrite`/`fdatasync`/
//!   `fallocate`.
//! - [`PosixEnv`] with [`IoBackend::Uring`]: syncs and page-cache-missing reads are
//!   submitted to a dedicated thread that owns one io_uring; page-cache copies and
//!   metadata operations stay plain syscalls (see `uring.rs` for why). It is probed at
//!   start-up and falls back to POSIX with one log line when the kernel refuses it
//!   (ENOSYS, EPERM from seccomp or `io_uring_disabled`).
//!
//! POSIX is the default because it measured faster on every path of this synchronous
//! engine: the ring thread's round trip added ~40 µs to each flush (docs/benchmarks.md).

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

mod direct;
mod posix;
mod uring;

pub use direct::{reopen_direct_for_writing, AlignedBuf, UncachedReader, DIRECT_ALIGN};

pub(crate) use posix::write_zeros;
pub use posix::PosixEnv;

/// One open file. All offsets are absolute; implementations are safe to share between
/// threads and never keep a file position.
#[expect(clippy::len_without_is_empty, reason = "a file's length is a size, not a collection's")]
pub trait Storage: Send + Sync + fmt::Debug {
    /// Fills `buf` from `offset`. Bytes past the end of the file read as zeros.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// [`Storage::read_at`] for a bulk reader that will not read the range again soon, of a
    /// file others keep writing: leaves no pages of its own in the page cache where the
    /// backend can (`RWF_DONTCACHE`), and on ext4 does not hold up those writers for its
    /// disk reads, as a direct read would (see `PosixFile::read_uncached`). Same bytes
    /// either way.
    fn read_uncached(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_at(buf, offset)
    }
    /// Writes all of `buf` at `offset`, extending the file if needed.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Writes the buffers back to back starting at `offset` (`pwritev`). The default
    /// writes them one by one.
    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        let mut at = offset;
        for buf in bufs {
            self.write_at(buf, at)?;
            at += buf.len() as u64;
        }
        Ok(())
    }
    /// Makes every completed write durable (`fdatasync`). An error here is final: callers
    /// must poison whatever depends on this file and never retry (see `durable.rs`).
    fn sync(&self) -> io::Result<()>;
    /// The file's length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Truncates or extends (sparsely) the file.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Deallocates `[offset, offset+len)`; the range then reads as zeros.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Makes `[offset, offset+len)` read as zeros while keeping it allocated, so a later
    /// write there needs no allocation.
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Allocates `[offset, offset+len)` without changing contents (preallocation).
    fn allocate(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Allocation map of `[offset, offset+len)`: contiguous extents in order, each either
    /// allocated data or a hole (reads as zeros). Backends without the information report
    /// everything as data, which is always correct.
    fn extents(&self, _offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        Ok(vec![Extent { len, hole: false }])
    }
}

/// One run of the allocation map returned by [`Storage::extents`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes, never zero.
    pub len: u64,
    /// True when the range is unallocated and reads as zeros.
    pub hole: bool,
}

/// Whether [`Env::open`] may create the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// Open an existing file; fail with `NotFound` otherwise.
    Existing,
    /// Open the file, creating it empty when missing.
    CreateIfMissing,
}

/// The filesystem a volume lives in: files plus the few directory operations that crash
/// safety needs.
pub trait Env: Send + Sync + fmt::Debug {
    /// Opens (or creates) a file for reading and writing.
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn Storage>>;
    /// True when the path exists.
    fn exists(&self, path: &Path) -> bool;
    /// Creates a directory and its parents.
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    /// The entries of a directory, full paths, in no particular order.
    fn read_dir(&self, path: &Path) -> io::Result<Vec<PathBuf>>;
    /// Atomically replaces `to` with `from`. Durable only after [`Env::sync_dir`].
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Makes the directory's entries (creates, renames, removals) durable.
    fn sync_dir(&self, path: &Path) -> io::Result<()>;
    /// Removes a file.
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Takes an exclusive advisory lock on `path` (created if missing), held until the
    /// returned guard is dropped. Fails with `WouldBlock` when another holder has it.
    fn lock(&self, path: &Path) -> io::Result<Box<dyn std::any::Any + Send + Sync>>;
    /// Which I/O backend serves this environment's files, for status output.
    fn backend_name(&self) -> &'static str;
}

/// Which implementation [`PosixEnv`] uses for data I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IoBackend {
    /// Plain `pread`/`pwrite`/`fdatasync` (the default: fastest for this engine).
    #[default]
    Posix,
    /// io_uring for syncs and cache-missing reads; POSIX (logged once) when refused.
    Uring,
}

impl std::str::FromStr for IoBackend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "posix" => Ok(Self::Posix),
            "uring" | "io_uring" => Ok(Self::Uring),
            other => Err(format!("unknown io backend {other:?}; expected posix or uring")),
        }
    }
}
