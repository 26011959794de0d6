//! Reads that bypass the page cache (`O_DIRECT`), for bulk readers: a snapshot reads a
//! whole volume once, and through the page cache that would evict the customer's working
//! set and, on a virtual machine, pay for every freshly allocated cache page (measured: an
//! 8 GiB buffered read cost 2 to 15 CPU-seconds depending on how recently the guest's free
//! memory was handed back to the host; a direct one 0.3 to 0.7; docs/benchmarks.md).
//!
//! Direct reads need the buffer's address, the offset and the length aligned to the
//! device's logical block size; [`DIRECT_ALIGN`] (4 KiB) covers every Linux block device
//! and filesystem. [`AlignedBuf`] gives such buffers. A read that is not aligned, or a file
//! that refuses `O_DIRECT` (tmpfs before Linux 6.6, some FUSE filesystems), goes through the
//! page cache instead: same bytes, only slower.
//!
//! Coherence: the kernel writes back dirty cached pages of the range before a direct read,
//! so a direct read returns every write that completed before it, like a cached one.

use std::alloc::{self, Layout};
use std::fs::{File, OpenOptions};
use std::io;
use std::ops::{Deref, DerefMut};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::ptr::NonNull;

/// Alignment of address, offset and length that a direct read needs.
pub const DIRECT_ALIGN: usize = 4096;

/// A zero-initialised byte buffer whose start is aligned to [`DIRECT_ALIGN`], with a
/// length that can shrink and grow up to its capacity (like a `Vec` that never moves).
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    capacity: usize,
}

// SAFETY: the buffer owns its allocation exclusively, like a `Vec<u8>`.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only reads the bytes.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A buffer of `capacity` zero bytes (at least one byte is allocated).
    pub fn zeroed(capacity: usize) -> Self {
        let layout = Self::layout(capacity);
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(ptr) else { alloc::handle_alloc_error(layout) };
        Self { ptr, len: capacity, capacity }
    }

    fn layout(capacity: usize) -> Layout {
        Layout::from_size_align(capacity.max(1), DIRECT_ALIGN).unwrap_or_else(|_| {
            // Only a capacity near usize::MAX gets here; no allocation could satisfy it.
            alloc::handle_alloc_error(Layout::new::<[u8; DIRECT_ALIGN]>())
        })
    }

    /// How many bytes the buffer can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Sets the length to `len` (at most the capacity). Bytes that come into view keep
    /// whatever they last held (zero when never written).
    ///
    /// # Panics
    /// When `len` exceeds the capacity: a caller bug.
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.capacity, "AlignedBuf::set_len({len}) beyond the capacity {}", self.capacity);
        self.len = len;
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with this same layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.capacity)) }
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: `len <= capacity` bytes were allocated and initialised in `zeroed`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf").field("len", &self.len).field("capacity", &self.capacity).finish()
    }
}

/// A read-only file for bulk reading (an image, a block device): direct reads where
/// aligned and allowed, cached ones otherwise.
#[derive(Debug)]
pub struct UncachedReader {
    file: File,
    direct: Option<File>,
}

impl UncachedReader {
    /// Reads `file` (opened for reading).
    pub fn new(file: File) -> Self {
        let direct = reopen_direct(&file).ok();
        Self { file, direct }
    }

    /// Fills all of `buf` from `offset`; [`io::ErrorKind::UnexpectedEof`] when the file
    /// ends first (it was truncated while being read).
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let filled = read_uncached(&self.file, self.direct.as_ref(), buf, offset)?;
        if filled < buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "the file ends at {}, inside the read of {} bytes at {offset}",
                    offset + filled as u64,
                    buf.len()
                ),
            ));
        }
        Ok(())
    }
}

/// Reads `buf` from `offset`: through `direct` (an `O_DIRECT` handle on `file`) when the
/// read is [`aligned`], else, or when the kernel refuses it, through `file`. Returns how
/// many bytes there were before the end of the file; the rest of `buf` is zeroed.
pub(crate) fn read_uncached(file: &File, direct: Option<&File>, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    if let Some(direct) = direct.filter(|_| aligned(buf, offset)) {
        if let Some(filled) = read_direct(direct, file, buf, offset)? {
            return Ok(filled);
        }
    }
    read_cached(file, buf, offset)
}

/// Reads `buf` from `offset` through the page cache. Returns how many bytes there were
/// before the end of the file; the rest of `buf` is zeroed.
pub(crate) fn read_cached(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut filled = 0usize;
    while let Some(rest) = buf.get_mut(filled..).filter(|rest| !rest.is_empty()) {
        match file.read_at(rest, offset + filled as u64) {
            Ok(0) => {
                rest.fill(0);
                break;
            }
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// A second, read-only handle on an open file that bypasses the page cache. Reopens
/// through `/proc/self/fd`, so it is the same inode even if the path was renamed or
/// removed. `EINVAL` means the filesystem refuses `O_DIRECT` (tmpfs before Linux 6.6,
/// some FUSE filesystems); other errors may pass (out of file descriptors).
pub(crate) fn reopen_direct(file: &File) -> io::Result<File> {
    reopen_direct_with(file, OpenOptions::new().read(true)).inspect_err(|e| {
        tracing::debug!("O_DIRECT handle refused ({e}); bulk reads go through the page cache");
    })
}

/// [`reopen_direct`] for writing (a restore's target file or block device).
pub fn reopen_direct_for_writing(file: &File) -> io::Result<File> {
    reopen_direct_with(file, OpenOptions::new().write(true))
}

fn reopen_direct_with(file: &File, options: &mut OpenOptions) -> io::Result<File> {
    let path = format!("/proc/self/fd/{}", file.as_raw_fd());
    options.custom_flags(libc::O_DIRECT | libc::O_CLOEXEC).open(path)
}

/// Whether a read of `buf` at `offset` meets the direct-read alignment.
pub(crate) fn aligned(buf: &[u8], offset: u64) -> bool {
    let align = DIRECT_ALIGN as u64;
    (buf.as_ptr() as usize) % DIRECT_ALIGN == 0 && offset % align == 0 && (buf.len() as u64) % align == 0
}

/// Reads `buf` from `offset` through `direct` (an `O_DIRECT` handle; `buf` and `offset`
/// [`aligned`]). A short read that is not aligned (the end of the file, or a filesystem
/// that completes part of a direct read) is finished through `cached`, which alone decides
/// where the file ends. Returns how many bytes there were before the end of the file (the
/// rest of `buf` is zeroed), or `None`, having read nothing usable, when the kernel
/// refuses the direct read with `EINVAL` (an alignment the device needs beyond ours).
fn read_direct(direct: &File, cached: &File, buf: &mut [u8], offset: u64) -> io::Result<Option<usize>> {
    let mut filled = 0usize;
    while let Some(rest) = buf.get_mut(filled..).filter(|rest| !rest.is_empty()) {
        let at = offset + filled as u64;
        match direct.read_at(rest, at) {
            Ok(0) => {
                rest.fill(0);
                break;
            }
            Ok(n) if n % DIRECT_ALIGN != 0 => {
                let tail = rest.get_mut(n..).unwrap_or_default();
                return Ok(Some(filled + n + read_cached(cached, tail, at + n as u64)?));
            }
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(None),
            Err(e) => return Err(e),
        }
    }
    Ok(Some(filled))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buffers_are_aligned_and_resizable() {
        let mut buf = AlignedBuf::zeroed(3 * DIRECT_ALIGN);
        assert_eq!(buf.as_ptr() as usize % DIRECT_ALIGN, 0);
        assert!(buf.iter().all(|&b| b == 0));
        buf[5] = 7;
        buf.set_len(10);
        assert_eq!(buf.len(), 10);
        buf.set_len(3 * DIRECT_ALIGN);
        assert_eq!(buf[5], 7);
        assert_eq!(buf.capacity(), 3 * DIRECT_ALIGN);
    }

    #[test]
    fn direct_reads_match_cached_reads_and_end_in_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        // Not a multiple of the alignment: the last direct read is short.
        let data: Vec<u8> = (0..3 * DIRECT_ALIGN + 100).map(|i| (i * 31 % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let file = File::open(&path).unwrap();
        let Ok(direct) = reopen_direct(&file) else {
            eprintln!("skipped: the test directory's filesystem refuses O_DIRECT");
            return;
        };
        let mut buf = AlignedBuf::zeroed(5 * DIRECT_ALIGN);
        buf.fill(0xee);
        assert!(aligned(&buf, 0));
        assert_eq!(read_direct(&direct, &file, &mut buf, 0).unwrap(), Some(data.len()));
        assert_eq!(&buf[..data.len()], &data[..]);
        assert!(buf[data.len()..].iter().all(|&b| b == 0), "past the end reads as zeros");
        buf.set_len(DIRECT_ALIGN);
        assert_eq!(read_direct(&direct, &file, &mut buf, DIRECT_ALIGN as u64).unwrap(), Some(DIRECT_ALIGN));
        assert_eq!(&buf[..], &data[DIRECT_ALIGN..2 * DIRECT_ALIGN]);
        assert!(!aligned(&buf[1..], 0));
        assert!(!aligned(&buf, 512));
        // Unaligned reads go through the cache; an exact read past the end is an error.
        let reader = UncachedReader::new(File::open(&path).unwrap());
        let mut odd = vec![0u8; 100];
        reader.read_exact_at(&mut odd, 3).unwrap();
        assert_eq!(&odd[..], &data[3..103]);
        buf.set_len(4 * DIRECT_ALIGN);
        let err = reader.read_exact_at(&mut buf, 0).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
    }
}
