//! The block store: the volume's current contents in sparse extent files.
//!
//! A volume of up to 16 TiB and beyond cannot be one file on ext4 (its limit is 16 TiB
//! minus 4 KiB), so the store is split into extent files of `extent_file_bytes` (1 TiB by
//! default): `data/extent-0000.blk`, `data/extent-0001.blk`, … Unwritten and trimmed
//! ranges are holes, which is also what `base:allocation` reports.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::storage::{Env, Extent, OpenMode, Storage};

pub(crate) const DATA_DIR: &str = "data";

#[derive(Debug)]
pub(crate) struct BlockStore {
    files: Vec<Arc<dyn Storage>>,
    extent_file_bytes: u64,
    size: u64,
}

fn extent_path(dir: &Path, index: usize) -> PathBuf {
    dir.join(DATA_DIR).join(format!("extent-{index:04}.blk"))
}

impl BlockStore {
    pub(crate) fn create(env: &dyn Env, dir: &Path, size: u64, extent_file_bytes: u64) -> io::Result<()> {
        env.create_dir_all(&dir.join(DATA_DIR))?;
        let count = size.div_ceil(extent_file_bytes) as usize;
        for index in 0..count {
            let file = env.open(&extent_path(dir, index), OpenMode::CreateIfMissing)?;
            let len = (size - index as u64 * extent_file_bytes).min(extent_file_bytes);
            file.set_len(len)?;
            file.sync()?;
        }
        env.sync_dir(&dir.join(DATA_DIR))
    }

    pub(crate) fn open(env: &dyn Env, dir: &Path, size: u64, extent_file_bytes: u64) -> io::Result<Self> {
        let count = size.div_ceil(extent_file_bytes) as usize;
        let files = (0..count)
            .map(|index| env.open(&extent_path(dir, index), OpenMode::Existing))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Self { files, extent_file_bytes, size })
    }

    /// Splits `[offset, offset+len)` at extent-file boundaries: (file, offset in file,
    /// offset in the request, length).
    fn pieces(&self, offset: u64, len: u64) -> impl Iterator<Item = (&Arc<dyn Storage>, u64, u64, u64)> + '_ {
        let end = (offset + len).min(self.size);
        let mut pos = offset;
        std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            let index = (pos / self.extent_file_bytes) as usize;
            let file_offset = pos % self.extent_file_bytes;
            let n = (self.extent_file_bytes - file_offset).min(end - pos);
            let piece = (self.files.get(index)?, file_offset, pos - offset, n);
            pos += n;
            Some(piece)
        })
    }

    pub(crate) fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        for (file, at, from, n) in self.pieces(offset, buf.len() as u64) {
            file.read_at(&mut buf[from as usize..(from + n) as usize], at)?;
        }
        Ok(())
    }

    /// [`BlockStore::read`] for a bulk reader: bypasses the page cache where it can
    /// ([`Storage::read_uncached`]).
    pub(crate) fn read_uncached(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        for (file, at, from, n) in self.pieces(offset, buf.len() as u64) {
            file.read_uncached(&mut buf[from as usize..(from + n) as usize], at)?;
        }
        Ok(())
    }

    pub(crate) fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        for (file, at, from, n) in self.pieces(offset, data.len() as u64) {
            file.write_at(&data[from as usize..(from + n) as usize], at)?;
        }
        Ok(())
    }

    /// Makes the range read as zeros: deallocated when `punch`, else zeroed in place.
    pub(crate) fn zero(&self, offset: u64, len: u64, punch: bool) -> io::Result<()> {
        for (file, at, _, n) in self.pieces(offset, len) {
            if punch {
                file.punch_hole(at, n)?;
            } else {
                file.zero_range(at, n)?;
            }
        }
        Ok(())
    }

    pub(crate) fn sync(&self) -> io::Result<()> {
        self.files.iter().try_for_each(|f| f.sync())
    }

    pub(crate) fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        let mut out: Vec<Extent> = Vec::new();
        for (file, at, _, n) in self.pieces(offset, len) {
            for extent in file.extents(at, n)? {
                match out.last_mut() {
                    Some(last) if last.hole == extent.hole => last.len += extent.len,
                    _ => out.push(extent),
                }
            }
        }
        Ok(out)
    }
}
