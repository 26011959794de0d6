//! Change tracking: one bit per region (64 KiB by default) meaning "written since
//! `base_seq`", kept in memory and persisted to `changemap.bin` at every checkpoint.
//!
//! Crash safety without syncing the map on the write path: a checkpoint persists the map
//! (and syncs it) before the superblock records the checkpoint, so bits for records at or
//! below the checkpoint are durable; recovery replays every record above it and sets
//! their bits again. Loss is detectable: the superblock names the map generation it
//! trusts; a missing, corrupt or foreign map is rebuilt empty with `base_seq` = the
//! checkpoint and a new generation, and callers asking about earlier seqs get
//! [`Error::ChangeMapUnavailable`](crate::Error::ChangeMapUnavailable) and scan fully.
//!
//! The map goes through the [`Storage`] trait rather than an mmap so the crash tests'
//! fault-injecting backend covers it too; at 16 TiB it is 32 MiB of memory.

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::format::{ChangeMapHeader, CHANGEMAP_HEADER_LEN};
use crate::storage::{Env, OpenMode, Storage};

pub(crate) const CHANGEMAP_FILE: &str = "changemap.bin";
const WORDS_PER_PAGE: usize = 4096 / 8;

/// How the change map was loaded at open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangeMapState {
    /// The persisted map was valid and matched the superblock.
    Trusted,
    /// The map had to be rebuilt; it only answers for changes after `base_seq`.
    Rebuilt {
        /// Why the old map was not usable.
        reason: String,
    },
}

/// Regions changed since some sequence number.
#[derive(Debug, Clone)]
pub struct ChangeSet {
    /// Region size in bytes.
    pub region_bytes: u64,
    /// Indices of changed regions, ascending.
    pub regions: Vec<u64>,
}

#[derive(Debug)]
pub(crate) struct ChangeMap {
    file: Arc<dyn Storage>,
    header: Mutex<ChangeMapHeader>,
    words: Vec<AtomicU64>,
    dirty_pages: Vec<AtomicBool>,
    /// The bitmap as it is on disk (for the header's crc); only `persist` touches it.
    persisted: Mutex<Vec<u64>>,
}

impl ChangeMap {
    fn region_count(size: u64, region_bytes: u32) -> u64 {
        size.div_ceil(u64::from(region_bytes))
    }

    /// Opens the map, or rebuilds it when it cannot be trusted. Returns the map, its
    /// state, and the generation the superblock must name from now on.
    pub(crate) fn open(
        env: &dyn Env,
        dir: &Path,
        volume_id: [u8; 16],
        size: u64,
        region_bytes: u32,
        trusted_generation: u64,
        checkpoint_seq: u64,
    ) -> io::Result<(Self, ChangeMapState)> {
        let path = dir.join(CHANGEMAP_FILE);
        let region_count = Self::region_count(size, region_bytes);
        let word_count = region_count.div_ceil(64) as usize;
        let file = env.open(&path, OpenMode::CreateIfMissing)?;
        let mut block = vec![0u8; CHANGEMAP_HEADER_LEN];
        file.read_at(&mut block, 0)?;
        let loaded = match ChangeMapHeader::decode(&block) {
            Ok(h) if h.volume_id != volume_id => Err("it belongs to another volume".to_string()),
            Ok(h) if h.generation != trusted_generation => {
                Err(format!("its generation {} is not the trusted generation {trusted_generation}", h.generation))
            }
            Ok(h) if h.region_bytes != region_bytes || h.region_count != region_count => {
                Err("its geometry does not match the volume".to_string())
            }
            Ok(h) => Ok(h),
            Err(e) => Err(format!("its header is invalid ({e})")),
        };
        let words: Vec<AtomicU64> = (0..word_count).map(|_| AtomicU64::new(0)).collect();
        let pages = word_count.div_ceil(WORDS_PER_PAGE);
        let dirty_pages = (0..pages).map(|_| AtomicBool::new(false)).collect();
        let loaded = match loaded {
            Ok(header) => {
                let mut bytes = vec![0u8; word_count * 8];
                file.read_at(&mut bytes, CHANGEMAP_HEADER_LEN as u64)?;
                let crc = crc32fast::hash(&bytes);
                if crc == header.bitmap_crc {
                    for (word, chunk) in words.iter().zip(bytes.chunks_exact(8)) {
                        let mut le = [0u8; 8];
                        le.copy_from_slice(chunk);
                        word.store(u64::from_le_bytes(le), Ordering::Relaxed);
                    }
                    Ok(header)
                } else {
                    Err(format!(
                        "its bitmap checksum does not match (expected {:#010x}, got {crc:#010x})",
                        header.bitmap_crc
                    ))
                }
            }
            Err(reason) => Err(reason),
        };
        let (header, state) = match loaded {
            Ok(header) => (header, ChangeMapState::Trusted),
            Err(reason) => {
                let header = ChangeMapHeader {
                    region_bytes,
                    volume_id,
                    generation: trusted_generation + 1,
                    base_seq: checkpoint_seq,
                    region_count,
                    bitmap_crc: 0,
                };
                (header, ChangeMapState::Rebuilt { reason })
            }
        };
        let persisted = Mutex::new(words.iter().map(|w| w.load(Ordering::Relaxed)).collect());
        let map = Self { file, header: Mutex::new(header), words, dirty_pages, persisted };
        if matches!(state, ChangeMapState::Rebuilt { .. }) {
            map.file.set_len(CHANGEMAP_HEADER_LEN as u64 + word_count as u64 * 8)?;
            map.dirty_pages.iter().for_each(|d| d.store(true, Ordering::Relaxed));
            map.persist()?;
        }
        Ok((map, state))
    }

    /// Creates an empty, trusted map for a new volume.
    pub(crate) fn create(
        env: &dyn Env,
        dir: &Path,
        volume_id: [u8; 16],
        size: u64,
        region_bytes: u32,
    ) -> io::Result<()> {
        let region_count = Self::region_count(size, region_bytes);
        let file = env.open(&dir.join(CHANGEMAP_FILE), OpenMode::CreateIfMissing)?;
        file.set_len(CHANGEMAP_HEADER_LEN as u64 + region_count.div_ceil(64) * 8)?;
        let bitmap_bytes = region_count.div_ceil(64) * 8;
        let bitmap_crc = crc32fast::hash(&vec![0u8; bitmap_bytes as usize]);
        let header = ChangeMapHeader { region_bytes, volume_id, generation: 1, base_seq: 0, region_count, bitmap_crc };
        file.write_at(&header.encode(), 0)?;
        file.sync()
    }

    pub(crate) fn generation(&self) -> u64 {
        self.header.lock().generation
    }

    pub(crate) fn base_seq(&self) -> u64 {
        self.header.lock().base_seq
    }

    pub(crate) fn region_bytes(&self) -> u64 {
        u64::from(self.header.lock().region_bytes)
    }

    /// Marks the regions touched by `[offset, offset+len)` as changed.
    pub(crate) fn mark(&self, offset: u64, len: u64, region_bytes: u64) {
        if len == 0 {
            return;
        }
        let first = offset / region_bytes;
        let last = (offset + len - 1) / region_bytes;
        for region in first..=last {
            let word = (region / 64) as usize;
            let bit = 1u64 << (region % 64);
            if let Some(w) = self.words.get(word) {
                if w.fetch_or(bit, Ordering::Relaxed) & bit == 0 {
                    if let Some(page) = self.dirty_pages.get(word / WORDS_PER_PAGE) {
                        page.store(true, Ordering::Release);
                    }
                }
            }
        }
    }

    /// Writes the dirty bitmap pages and then the header with the crc of the bitmap as
    /// written, then syncs. A crash before the header lands leaves a crc mismatch, and the
    /// map is rebuilt (conservatively) on the next open.
    pub(crate) fn persist(&self) -> io::Result<()> {
        let mut persisted = self.persisted.lock();
        let mut page_bytes = Vec::with_capacity(4096);
        for (page, dirty) in self.dirty_pages.iter().enumerate() {
            // Clear the flag before reading the words: a bit set from here on marks the
            // page dirty again, so it is never lost between two checkpoints.
            if !dirty.swap(false, Ordering::AcqRel) {
                continue;
            }
            let first = page * WORDS_PER_PAGE;
            let end = (first + WORDS_PER_PAGE).min(self.words.len());
            page_bytes.clear();
            for (index, word) in self.words.iter().enumerate().take(end).skip(first) {
                let value = word.load(Ordering::Acquire);
                if let Some(slot) = persisted.get_mut(index) {
                    *slot = value;
                }
                page_bytes.extend_from_slice(&value.to_le_bytes());
            }
            let at = CHANGEMAP_HEADER_LEN as u64 + (first * 8) as u64;
            if let Err(e) = self.file.write_at(&page_bytes, at) {
                dirty.store(true, Ordering::Release);
                return Err(e);
            }
        }
        let mut hasher = crc32fast::Hasher::new();
        for word in persisted.iter() {
            hasher.update(&word.to_le_bytes());
        }
        let header = {
            let mut header = self.header.lock();
            header.bitmap_crc = hasher.finalize();
            *header
        };
        self.file.write_at(&header.encode(), 0)?;
        self.file.sync()
    }

    /// Regions changed since `since`, or `None` when the map's base is later than that.
    pub(crate) fn changed_since(&self, since: u64) -> Option<ChangeSet> {
        let header = *self.header.lock();
        if since < header.base_seq {
            return None;
        }
        let mut regions = Vec::new();
        for (index, word) in self.words.iter().enumerate() {
            let mut bits = word.load(Ordering::Relaxed);
            while bits != 0 {
                let bit = bits.trailing_zeros() as u64;
                regions.push(index as u64 * 64 + bit);
                bits &= bits - 1;
            }
        }
        Some(ChangeSet { region_bytes: u64::from(header.region_bytes), regions })
    }

    /// Number of regions marked changed.
    pub(crate) fn changed_count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.load(Ordering::Relaxed).count_ones())).sum()
    }
}
