//! Change tracking: which regions (64 KiB by default) were written after a sequence
//! number, kept in memory as a stack of bitmaps and persisted at every checkpoint.
//!
//! # Layers
//! The map is a chain of immutable *layers* followed by one *live* bitmap:
//!
//! ```text
//!   layer (b0, m1]   layer (m1, m2]   …   layer (mk-1, mk]   live (mk, now]
//! ```
//!
//! Every write, zero and trim sets its regions' bits in the live bitmap (under the
//! journal lock, in `Inner::apply`). Every snapshot marker `m` *cuts* the map, under the
//! same lock: the live bitmap becomes the layer `(live_base, m]` and a new, empty live
//! bitmap starts with `live_base = m`. So a marker's seq is a *cut point*, and the regions
//! changed between two cut points are exactly the OR of the layers between them.
//! `changed_since(q)` is the OR of every layer ending after `q` plus the live bitmap, and
//! needs `q >= base` (the oldest layer's start). At most [`LAYERS_MAX`] layers are kept:
//! beyond that the two oldest are merged (OR, outer bounds), which loses a cut point and
//! only ever turns answers into supersets.
//!
//! # Persistence (see docs/format-volume.md, "Change-map layers")
//! A checkpoint's `persist` first writes each layer that has no file yet as an immutable
//! `changes-<start>-<end>.layer` (temp file, fdatasync, rename, directory fsync), then the
//! live bitmap and its header, with `base_seq = live_base`, into `changemap.bin`
//! (fdatasync), and only then removes the files of layers merged away. The superblock,
//! which names the checkpoint, comes after. Open trusts `changemap.bin` as before
//! (generation, volume, geometry, crc) and then takes the layer files that are valid and
//! chain contiguously up to its `base_seq`; a gap makes everything before it unavailable,
//! never wrong.
//!
//! Loss is detectable: the superblock names the map generation it trusts; a missing,
//! corrupt or foreign `changemap.bin` is rebuilt empty with a new generation and a base
//! at the checkpoint (or at the end of a layer chain that reaches past it), and callers
//! asking about earlier seqs get
//! [`Error::ChangeMapUnavailable`](crate::Error::ChangeMapUnavailable) and scan fully.
//!
//! # Memory
//! Bitmaps are held in 4 KiB pages (512 words, 32 768 regions: 2 GiB of volume at 64 KiB
//! regions) allocated when the first bit in them is set, so a layer costs what was
//! written in it. The bound is one full bitmap per layer plus the live one and the
//! on-disk mirror: `(LAYERS_MAX + 2) * 2 MiB` per TiB of volume at 64 KiB regions
//! (68 MiB per TiB), reached only if every 2 GiB stretch of the volume is written between
//! every two snapshots.
//!
//! The map goes through the [`Storage`] trait rather than an mmap so the crash tests'
//! fault-injecting backend covers it too.

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;

use crate::format::{ChangeLayerHeader, ChangeMapHeader, CHANGEMAP_HEADER_LEN, CHANGE_LAYER_HEADER_LEN};
use crate::storage::{Env, OpenMode, Storage};

pub(crate) const CHANGEMAP_FILE: &str = "changemap.bin";
/// Most layers kept; one more cut merges the two oldest.
pub(crate) const LAYERS_MAX: usize = 32;
const LAYER_PREFIX: &str = "changes-";
const LAYER_EXTENSION: &str = "layer";
const WORDS_PER_PAGE: usize = 4096 / 8;
const ZERO_PAGE: [u8; WORDS_PER_PAGE * 8] = [0; WORDS_PER_PAGE * 8];

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

/// Regions changed in some range of sequence numbers.
#[derive(Debug, Clone)]
pub struct ChangeSet {
    /// Region size in bytes.
    pub region_bytes: u64,
    /// Indices of changed regions, ascending.
    pub regions: Vec<u64>,
}

/// A bitmap of regions in 4 KiB pages of words, each allocated on its first set bit.
/// Bits are only ever set. Safe to set and read from many threads.
#[derive(Debug)]
pub(crate) struct Bitmap {
    region_count: u64,
    pages: Box<[OnceLock<Box<[AtomicU64]>>]>,
    /// Set when a bit of the page goes from 0 to 1; `persist` clears it.
    dirty: Box<[AtomicBool]>,
}

impl Bitmap {
    pub(crate) fn new(region_count: u64) -> Self {
        let pages = Self::word_count_of(region_count).div_ceil(WORDS_PER_PAGE);
        Self {
            region_count,
            pages: (0..pages).map(|_| OnceLock::new()).collect(),
            dirty: (0..pages).map(|_| AtomicBool::new(false)).collect(),
        }
    }

    fn word_count_of(region_count: u64) -> usize {
        region_count.div_ceil(64) as usize
    }

    fn word_count(&self) -> usize {
        Self::word_count_of(self.region_count)
    }

    fn page_count(&self) -> usize {
        self.pages.len()
    }

    /// Words in page `page` (the last page may be shorter).
    fn page_len(&self, page: usize) -> usize {
        (self.word_count() - page * WORDS_PER_PAGE).min(WORDS_PER_PAGE)
    }

    fn page(&self, page: usize) -> Option<&[AtomicU64]> {
        self.pages.get(page).and_then(|p| p.get()).map(|p| &p[..])
    }

    fn page_or_insert(&self, page: usize) -> Option<&[AtomicU64]> {
        let len = self.page_len(page);
        let slot = self.pages.get(page)?;
        Some(&slot.get_or_init(|| (0..len).map(|_| AtomicU64::new(0)).collect())[..])
    }

    /// ORs `mask` into word `index`; returns the word's previous value.
    fn or_word(&self, index: usize, mask: u64) -> u64 {
        let page = index / WORDS_PER_PAGE;
        let Some(words) = self.page_or_insert(page) else { return mask };
        let Some(word) = words.get(index % WORDS_PER_PAGE) else { return mask };
        let before = word.fetch_or(mask, Ordering::SeqCst);
        if before & mask != mask {
            if let Some(dirty) = self.dirty.get(page) {
                dirty.store(true, Ordering::SeqCst);
            }
        }
        before
    }

    /// Word `index` (0 when its page was never allocated).
    pub(crate) fn word(&self, index: usize) -> u64 {
        self.page(index / WORDS_PER_PAGE)
            .and_then(|words| words.get(index % WORDS_PER_PAGE))
            .map_or(0, |w| w.load(Ordering::SeqCst))
    }

    /// Sets regions `first..=last` (clamped to the bitmap).
    pub(crate) fn set_range(&self, first: u64, last: u64) {
        let last = last.min(self.region_count.saturating_sub(1));
        if first > last {
            return;
        }
        let (first_word, last_word) = ((first / 64) as usize, (last / 64) as usize);
        for index in first_word..=last_word {
            let low = if index == first_word { first % 64 } else { 0 };
            let high = if index == last_word { last % 64 } else { 63 };
            let mask = (u64::MAX >> (63 - high)) & (u64::MAX << low);
            self.or_word(index, mask);
        }
    }

    /// Sets region `region`; true when it was not set before.
    pub(crate) fn set(&self, region: u64) -> bool {
        if region >= self.region_count {
            return false;
        }
        let bit = 1u64 << (region % 64);
        self.or_word((region / 64) as usize, bit) & bit == 0
    }

    pub(crate) fn get(&self, region: u64) -> bool {
        self.word((region / 64) as usize) & (1u64 << (region % 64)) != 0
    }

    /// A bitmap holding `words` (only the pages with a set bit are allocated, and those
    /// are marked dirty).
    fn from_words(region_count: u64, words: &[u64]) -> Self {
        let bitmap = Self::new(region_count);
        for (index, &word) in words.iter().enumerate().take(bitmap.word_count()) {
            if word != 0 {
                bitmap.or_word(index, word);
            }
        }
        bitmap
    }

    /// The OR of `parts` (all of `region_count` regions), pages allocated as needed.
    fn union(region_count: u64, parts: &[&Bitmap]) -> Self {
        let bitmap = Self::new(region_count);
        for page in 0..bitmap.page_count() {
            for part in parts {
                let Some(words) = part.page(page) else { continue };
                for (offset, word) in words.iter().enumerate() {
                    let value = word.load(Ordering::SeqCst);
                    if value != 0 {
                        bitmap.or_word(page * WORDS_PER_PAGE + offset, value);
                    }
                }
            }
        }
        bitmap
    }

    /// Page `page`'s words, or `None` when it holds no set bit.
    fn load_page(&self, page: usize) -> Option<Vec<u64>> {
        let words = self.page(page)?;
        let values: Vec<u64> = words.iter().map(|w| w.load(Ordering::SeqCst)).collect();
        values.iter().any(|&w| w != 0).then_some(values)
    }

    /// True when no page was ever allocated (no bit set).
    fn is_empty(&self) -> bool {
        self.pages.iter().all(|p| p.get().is_none())
    }

    fn count_ones(&self) -> u64 {
        (0..self.page_count())
            .filter_map(|p| self.page(p))
            .flat_map(|words| words.iter())
            .map(|w| u64::from(w.load(Ordering::SeqCst).count_ones()))
            .sum()
    }

    /// The crc32 of the bitmap serialised as little-endian words, as in the files.
    fn crc(&self) -> u32 {
        let mut hasher = crc32fast::Hasher::new();
        for page in 0..self.page_count() {
            let len = self.page_len(page);
            match self.load_page(page) {
                Some(words) => words.iter().for_each(|w| hasher.update(&w.to_le_bytes())),
                None => hasher.update(&ZERO_PAGE[..len * 8]),
            }
        }
        hasher.finalize()
    }
}

/// An immutable layer: the regions written by records with seq in `(start, end]`.
#[derive(Debug)]
struct Layer {
    start: u64,
    end: u64,
    bits: Arc<Bitmap>,
}

#[derive(Debug)]
struct MapState {
    generation: u64,
    /// Oldest first; `layers[i].end == layers[i + 1].start` and the last ends at `live_base`.
    layers: VecDeque<Arc<Layer>>,
    live: Arc<Bitmap>,
    /// Identifies `live`: a new live bitmap gets a new id, which tells `persist` that the
    /// on-disk bitmap no longer matches it page for page.
    live_id: u64,
    /// The live bitmap holds every region written by a record with seq > this.
    live_base: u64,
}

impl MapState {
    fn base(&self) -> u64 {
        self.layers.front().map_or(self.live_base, |l| l.start)
    }

    fn check(&self) {
        debug_assert!(self.layers.len() <= LAYERS_MAX);
        debug_assert!(self.layers.iter().all(|l| l.start < l.end));
        debug_assert!(self.layers.iter().zip(self.layers.iter().skip(1)).all(|(a, b)| a.end == b.start));
        debug_assert!(self.layers.back().is_none_or(|l| l.end == self.live_base));
    }

    fn install_live(&mut self, live: Bitmap, base: u64) {
        self.live = Arc::new(live);
        self.live_id += 1;
        self.live_base = base;
    }
}

#[derive(Debug)]
struct PersistState {
    /// `changemap.bin`'s bitmap as last written, for its crc.
    mirror: Vec<u64>,
    /// The live bitmap the mirror was last written from.
    mirror_live_id: u64,
    /// Write every page next time (the file was untrusted).
    rewrite_all: bool,
    /// Layer files on disk that this map wrote or chained at open, by (start, end).
    files: BTreeMap<(u64, u64), PathBuf>,
    /// Files to remove at the next persist: invalid, foreign or unchained layers, temps.
    stale: Vec<PathBuf>,
}

/// The volume's change map. See the module docs.
///
/// # Invariants
/// - The layers chain contiguously and the last ends at `live_base`; there are at most
///   [`LAYERS_MAX`].
/// - A layer's bitmap never changes; a layer file, once renamed into place, never changes.
/// - Bits are set only in the live bitmap, under the journal lock; cuts and truncations
///   happen under the journal lock too (or during recovery, single-threaded).
#[derive(Debug)]
pub(crate) struct ChangeMap {
    env: Arc<dyn Env>,
    dir: PathBuf,
    file: Arc<dyn Storage>,
    volume_id: [u8; 16],
    region_bytes: u32,
    region_count: u64,
    state: Mutex<MapState>,
    persist: Mutex<PersistState>,
}

impl ChangeMap {
    fn region_count(size: u64, region_bytes: u32) -> u64 {
        size.div_ceil(u64::from(region_bytes))
    }

    /// Opens the map, or rebuilds it when it cannot be trusted, and chains the layer
    /// files. Returns the map and its state; [`ChangeMap::generation`] is the generation
    /// the superblock must name from now on.
    pub(crate) fn open(
        env: Arc<dyn Env>,
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
        let loaded = match loaded {
            Ok(header) => {
                let mut bytes = vec![0u8; word_count * 8];
                file.read_at(&mut bytes, CHANGEMAP_HEADER_LEN as u64)?;
                let crc = crc32fast::hash(&bytes);
                if crc == header.bitmap_crc {
                    Ok((header, words_from_le(&bytes)))
                } else {
                    Err(format!(
                        "its bitmap checksum does not match (expected {:#010x}, got {crc:#010x})",
                        header.bitmap_crc
                    ))
                }
            }
            Err(reason) => Err(reason),
        };
        let mut found = LayerFiles::scan(env.as_ref(), dir, volume_id, region_bytes, region_count)?;
        let (state, generation, live_base, words) = match loaded {
            Ok((header, words)) => (ChangeMapState::Trusted, header.generation, header.base_seq, words),
            Err(reason) => {
                // A rebuilt live map may start where a layer chain ends, if that is at or
                // after the checkpoint: replay re-marks every record after the checkpoint.
                let base = found.best_end_at_or_after(checkpoint_seq).unwrap_or(checkpoint_seq);
                (ChangeMapState::Rebuilt { reason }, trusted_generation + 1, base, vec![0u64; word_count])
            }
        };
        let layers = found.take_chain(env.as_ref(), live_base, region_count)?;
        if let Some(first) = layers.front() {
            tracing::debug!(layers = layers.len(), from = first.start, to = live_base, "chained change-map layers");
        }
        let live = Bitmap::from_words(region_count, &words);
        // `from_words` marked the loaded pages dirty, but they are on disk already.
        live.dirty.iter().for_each(|d| d.store(false, Ordering::SeqCst));
        let rebuilt = matches!(state, ChangeMapState::Rebuilt { .. });
        let map = Self {
            env,
            dir: dir.to_path_buf(),
            file,
            volume_id,
            region_bytes,
            region_count,
            state: Mutex::new(MapState { generation, layers, live: Arc::new(live), live_id: 0, live_base }),
            persist: Mutex::new(PersistState {
                mirror: words,
                mirror_live_id: 0,
                rewrite_all: rebuilt,
                files: found.chained,
                stale: found.stale,
            }),
        };
        if rebuilt {
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
        let bitmap_crc = Bitmap::new(region_count).crc();
        let header = ChangeMapHeader { region_bytes, volume_id, generation: 1, base_seq: 0, region_count, bitmap_crc };
        file.write_at(&header.encode(), 0)?;
        file.sync()
    }

    pub(crate) fn generation(&self) -> u64 {
        self.state.lock().generation
    }

    /// The oldest seq the map answers for: changes after it are known.
    pub(crate) fn base_seq(&self) -> u64 {
        self.state.lock().base()
    }

    pub(crate) fn region_bytes(&self) -> u64 {
        u64::from(self.region_bytes)
    }

    /// Marks the regions touched by `[offset, offset+len)` as changed. Called under the
    /// journal lock.
    pub(crate) fn mark(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let region_bytes = self.region_bytes();
        let (first, last) = (offset / region_bytes, (offset + len - 1) / region_bytes);
        self.state.lock().live.set_range(first, last);
    }

    /// Cuts the map at the snapshot marker `seq`: the live bitmap becomes the layer
    /// `(live_base, seq]`. A marker at or below `live_base` (replayed, and already cut
    /// before the map was persisted) changes nothing. Called under the journal lock.
    pub(crate) fn cut(&self, seq: u64) {
        let mut state = self.state.lock();
        if seq <= state.live_base {
            return;
        }
        let live = std::mem::replace(&mut state.live, Arc::new(Bitmap::new(self.region_count)));
        state.live_id += 1;
        let layer = Layer { start: state.live_base, end: seq, bits: live };
        state.layers.push_back(Arc::new(layer));
        state.live_base = seq;
        while state.layers.len() > LAYERS_MAX {
            // Merging the two oldest keeps their outer bounds: answers that needed the
            // cut point between them become supersets (or unavailable), never wrong.
            let (Some(older), Some(newer)) = (state.layers.pop_front(), state.layers.pop_front()) else { break };
            state.layers.push_front(Arc::new(merge(self.region_count, &older, &newer)));
        }
        state.check();
    }

    /// Forgets every cut point after `last_seq`, because the records after it were
    /// discarded (a rewind) or lost (a journal tail recovery dropped): the layers ending
    /// after `last_seq` are merged into the live bitmap, whose base moves down to the first
    /// of them. Their bits stay set (a superset), and records that reuse those seqs are
    /// marked in the live bitmap. Returns whether anything changed; the caller persists
    /// the map before the history after `last_seq` can diverge on disk.
    pub(crate) fn truncate_after(&self, last_seq: u64) -> bool {
        let mut state = self.state.lock();
        let keep = state.layers.iter().take_while(|l| l.end <= last_seq).count();
        if keep == state.layers.len() {
            return false;
        }
        let dropped: Vec<Arc<Layer>> = state.layers.drain(keep..).collect();
        let base = dropped.first().map_or(state.live_base, |l| l.start);
        let mut parts: Vec<&Bitmap> = dropped.iter().map(|l| &*l.bits).collect();
        let live = Arc::clone(&state.live);
        parts.push(&live);
        let merged = Bitmap::union(self.region_count, &parts);
        state.install_live(merged, base);
        state.check();
        true
    }

    /// Writes the layers that have no file yet, then the live bitmap and its header,
    /// then removes files no longer in the chain. See the module docs for the order and
    /// docs/format-volume.md for the crash cases.
    ///
    /// A cut may run concurrently: the state is read once, under the lock, and the
    /// (base, live bitmap) pair written is the one read then. If that bitmap is retired
    /// by a cut meanwhile it no longer changes, so what is written is consistent, and every
    /// record at or before the caller's checkpoint position was marked in it before.
    pub(crate) fn persist(&self) -> io::Result<()> {
        let mut persisted = self.persist.lock();
        let (layers, live, live_id, live_base, generation) = {
            let state = self.state.lock();
            (state.layers.clone(), Arc::clone(&state.live), state.live_id, state.live_base, state.generation)
        };
        // 1. New layer files, each durable under its final name before the live map's
        //    header can name a base that needs them.
        let new: Vec<&Arc<Layer>> =
            layers.iter().filter(|l| !persisted.files.contains_key(&(l.start, l.end))).collect();
        let mut renamed = Vec::with_capacity(new.len());
        for layer in &new {
            let path = layer_path(&self.dir, layer.start, layer.end);
            let tmp = path.with_extension("tmp");
            self.write_layer(&tmp, layer)?;
            renamed.push((tmp, path, (layer.start, layer.end)));
        }
        for (tmp, path, _) in &renamed {
            // Each temp file was synced first, so the rename cannot expose unwritten blocks.
            self.env.rename(tmp, path)?;
        }
        if !renamed.is_empty() {
            // The renames themselves must be durable before the live map names their end.
            self.env.sync_dir(&self.dir)?;
        }
        for (_, path, key) in renamed {
            persisted.files.insert(key, path);
        }
        // 2. The live bitmap, then its header with the crc of the bitmap as written.
        let word_count = persisted.mirror.len();
        if persisted.rewrite_all {
            self.file.set_len(CHANGEMAP_HEADER_LEN as u64 + word_count as u64 * 8)?;
        }
        let switched = live_id != persisted.mirror_live_id;
        let mut page_bytes = Vec::with_capacity(WORDS_PER_PAGE * 8);
        for page in 0..live.page_count() {
            let first = page * WORDS_PER_PAGE;
            let end = (first + WORDS_PER_PAGE).min(word_count);
            let on_disk = persisted.mirror.get(first..end).unwrap_or_default();
            // Clear the flag before reading the words: a bit set from here on marks the
            // page dirty again, so it is never lost between two checkpoints.
            let dirty = live.dirty.get(page).is_some_and(|d| d.swap(false, Ordering::SeqCst));
            let stale = switched && on_disk.iter().any(|&w| w != 0);
            if !(dirty || stale || persisted.rewrite_all) {
                continue;
            }
            let words = live.load_page(page).unwrap_or_else(|| vec![0; end - first]);
            page_bytes.clear();
            words.iter().for_each(|w| page_bytes.extend_from_slice(&w.to_le_bytes()));
            if let Err(e) = self.file.write_at(&page_bytes, CHANGEMAP_HEADER_LEN as u64 + (first * 8) as u64) {
                if let Some(d) = live.dirty.get(page) {
                    d.store(true, Ordering::SeqCst);
                }
                return Err(e);
            }
            if let Some(slot) = persisted.mirror.get_mut(first..end) {
                slot.copy_from_slice(&words);
            }
        }
        let mut hasher = crc32fast::Hasher::new();
        persisted.mirror.iter().for_each(|w| hasher.update(&w.to_le_bytes()));
        let header = ChangeMapHeader {
            region_bytes: self.region_bytes,
            volume_id: self.volume_id,
            generation,
            base_seq: live_base,
            region_count: self.region_count,
            bitmap_crc: hasher.finalize(),
        };
        self.file.write_at(&header.encode(), 0)?;
        self.file.sync()?;
        persisted.mirror_live_id = live_id;
        persisted.rewrite_all = false;
        // 3. Files the chain no longer uses. Removing them durably matters after a
        //    truncation: a layer of a discarded history must never come back and chain.
        let chained: Vec<(u64, u64)> = layers.iter().map(|l| (l.start, l.end)).collect();
        let mut gone: Vec<PathBuf> = std::mem::take(&mut persisted.stale);
        persisted.files.retain(|key, path| {
            let keep = chained.contains(key);
            if !keep {
                gone.push(path.clone());
            }
            keep
        });
        // A stale file found at open may have the name of a layer written since (replay
        // cut the same marker again): that name now holds the new file.
        gone.retain(|path| !persisted.files.values().any(|kept| kept == path));
        if !gone.is_empty() {
            for path in &gone {
                match self.env.remove_file(path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
            self.env.sync_dir(&self.dir)?;
        }
        Ok(())
    }

    /// Writes `layer` to `tmp` (sparse: only pages with a set bit) and syncs it.
    fn write_layer(&self, tmp: &Path, layer: &Layer) -> io::Result<()> {
        let bits = &layer.bits;
        let file = self.env.open(tmp, OpenMode::CreateIfMissing)?;
        // A temp file left by a crash may hold anything: start from an empty file.
        file.set_len(0)?;
        file.set_len(CHANGE_LAYER_HEADER_LEN as u64 + bits.word_count() as u64 * 8)?;
        let mut hasher = crc32fast::Hasher::new();
        let mut page_bytes = Vec::with_capacity(WORDS_PER_PAGE * 8);
        for page in 0..bits.page_count() {
            match bits.load_page(page) {
                Some(words) => {
                    page_bytes.clear();
                    words.iter().for_each(|w| page_bytes.extend_from_slice(&w.to_le_bytes()));
                    hasher.update(&page_bytes);
                    let at = CHANGE_LAYER_HEADER_LEN as u64 + (page * WORDS_PER_PAGE * 8) as u64;
                    file.write_at(&page_bytes, at)?;
                }
                None => hasher.update(&ZERO_PAGE[..bits.page_len(page) * 8]),
            }
        }
        let header = ChangeLayerHeader {
            region_bytes: self.region_bytes,
            volume_id: self.volume_id,
            start_seq: layer.start,
            end_seq: layer.end,
            region_count: self.region_count,
            bitmap_crc: hasher.finalize(),
        };
        file.write_at(&header.encode(), 0)?;
        file.sync()
    }

    /// Regions changed after `since`: the OR of every layer ending after it and the live
    /// bitmap, a superset of the exact answer. `Err(reason)` when `since` is older than the
    /// map's base.
    pub(crate) fn changed_since(&self, since: u64) -> Result<ChangeSet, String> {
        let parts = {
            let state = self.state.lock();
            let base = state.base();
            if since < base {
                return Err(format!("the map only tracks changes after seq {base}"));
            }
            let mut parts: Vec<Arc<Bitmap>> =
                state.layers.iter().filter(|l| l.end > since).map(|l| Arc::clone(&l.bits)).collect();
            parts.push(Arc::clone(&state.live));
            parts
        };
        Ok(self.change_set(&parts))
    }

    /// Regions changed by records with seq in `(since, until]`: the OR of the layers
    /// between them, exact when both are cut points (a superset when `since` lies inside
    /// a layer). `Err(reason)` when `since` is older than the map's base or `until` is not
    /// a retained cut point. The caller checks `since <= until`.
    pub(crate) fn changed_between(&self, since: u64, until: u64) -> Result<ChangeSet, String> {
        debug_assert!(since <= until);
        let parts = {
            let state = self.state.lock();
            let base = state.base();
            if since < base {
                return Err(format!("the map only tracks changes after seq {base}"));
            }
            if since == until {
                Vec::new()
            } else if !state.layers.iter().any(|l| l.end == until) {
                let points: Vec<String> = state.layers.iter().map(|l| l.end.to_string()).collect();
                return Err(format!(
                    "seq {until} is not a snapshot cut point the map retains (cut points: [{}]); \
                     only changes up to a snapshot marker can be answered exactly",
                    points.join(", ")
                ));
            } else {
                state.layers.iter().filter(|l| l.end > since && l.end <= until).map(|l| Arc::clone(&l.bits)).collect()
            }
        };
        Ok(self.change_set(&parts))
    }

    fn change_set(&self, parts: &[Arc<Bitmap>]) -> ChangeSet {
        let mut regions = Vec::new();
        self.for_each_union_word(parts, |index, word| {
            let mut bits = word;
            while bits != 0 {
                regions.push(index as u64 * 64 + u64::from(bits.trailing_zeros()));
                bits &= bits - 1;
            }
        });
        ChangeSet { region_bytes: u64::from(self.region_bytes), regions }
    }

    /// Calls `f(word index, word)` for every nonzero word of the OR of `parts`, in order.
    fn for_each_union_word(&self, parts: &[Arc<Bitmap>], mut f: impl FnMut(usize, u64)) {
        let page_count = Bitmap::word_count_of(self.region_count).div_ceil(WORDS_PER_PAGE);
        let mut words = vec![0u64; WORDS_PER_PAGE];
        for page in 0..page_count {
            words.iter_mut().for_each(|w| *w = 0);
            let mut any = false;
            for part in parts {
                if let Some(page_words) = part.page(page) {
                    any = true;
                    for (out, word) in words.iter_mut().zip(page_words) {
                        *out |= word.load(Ordering::SeqCst);
                    }
                }
            }
            if any {
                words.iter().enumerate().filter(|(_, &w)| w != 0).for_each(|(i, &w)| f(page * WORDS_PER_PAGE + i, w));
            }
        }
    }

    /// Number of regions changed since the map's base.
    pub(crate) fn changed_count(&self) -> u64 {
        let parts = {
            let state = self.state.lock();
            if state.layers.is_empty() {
                return state.live.count_ones();
            }
            let mut parts: Vec<Arc<Bitmap>> = state.layers.iter().map(|l| Arc::clone(&l.bits)).collect();
            parts.push(Arc::clone(&state.live));
            parts
        };
        let mut count = 0u64;
        self.for_each_union_word(&parts, |_, word| count += u64::from(word.count_ones()));
        count
    }

    /// The retained cut points (layer ends), oldest first.
    #[cfg(test)]
    pub(crate) fn cut_points(&self) -> Vec<u64> {
        self.state.lock().layers.iter().map(|l| l.end).collect()
    }
}

/// The layer `(older.start, newer.end]`: the OR of two adjacent layers. Runs under the
/// journal lock (a cut), so it costs what the two layers hold: one pass over their
/// allocated pages, and none when one of them is empty (markers with no write between).
fn merge(region_count: u64, older: &Layer, newer: &Layer) -> Layer {
    debug_assert_eq!(older.end, newer.start);
    let bits = if newer.bits.is_empty() {
        Arc::clone(&older.bits)
    } else if older.bits.is_empty() {
        Arc::clone(&newer.bits)
    } else {
        Arc::new(Bitmap::union(region_count, &[&older.bits, &newer.bits]))
    };
    Layer { start: older.start, end: newer.end, bits }
}

fn words_from_le(bytes: &[u8]) -> Vec<u64> {
    bytes
        .chunks_exact(8)
        .map(|chunk| {
            let mut le = [0u8; 8];
            le.copy_from_slice(chunk);
            u64::from_le_bytes(le)
        })
        .collect()
}

fn layer_path(dir: &Path, start: u64, end: u64) -> PathBuf {
    dir.join(format!("{LAYER_PREFIX}{start:020}-{end:020}.{LAYER_EXTENSION}"))
}

/// The layer files found in a volume directory at open, by header, before any bitmap is
/// read.
struct LayerFiles {
    /// Valid headers of this volume and geometry, with their paths.
    candidates: Vec<(ChangeLayerHeader, PathBuf)>,
    /// Chained files (filled by `take_chain`).
    chained: BTreeMap<(u64, u64), PathBuf>,
    stale: Vec<PathBuf>,
}

impl LayerFiles {
    fn scan(env: &dyn Env, dir: &Path, volume_id: [u8; 16], region_bytes: u32, region_count: u64) -> io::Result<Self> {
        let mut files = Self { candidates: Vec::new(), chained: BTreeMap::new(), stale: Vec::new() };
        let mut entries = env.read_dir(dir)?;
        entries.sort();
        for path in entries {
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else { continue };
            if !name.starts_with(LAYER_PREFIX) {
                continue;
            }
            if !name.ends_with(&format!(".{LAYER_EXTENSION}")) {
                // A temp file a crash left before its rename: never part of the chain.
                files.stale.push(path);
                continue;
            }
            let file = env.open(&path, OpenMode::Existing)?;
            let mut block = vec![0u8; CHANGE_LAYER_HEADER_LEN];
            file.read_at(&mut block, 0)?;
            let verdict = match ChangeLayerHeader::decode(&block) {
                Ok(h) if h.volume_id != volume_id => Err("it belongs to another volume".to_string()),
                Ok(h) if h.region_bytes != region_bytes || h.region_count != region_count => {
                    Err("its geometry does not match the volume".to_string())
                }
                Ok(h) => Ok(h),
                Err(e) => Err(format!("its header is invalid ({e})")),
            };
            match verdict {
                Ok(header) => files.candidates.push((header, path)),
                Err(reason) => {
                    tracing::warn!("ignoring change-map layer {}: {reason}", path.display());
                    files.stale.push(path);
                }
            }
        }
        Ok(files)
    }

    /// For each seq a candidate ends at: the chain of candidates ending there that starts
    /// earliest (and, among those, has the most layers, so the most cut points).
    fn chains(&self) -> BTreeMap<u64, (u64, Vec<usize>)> {
        let mut order: Vec<usize> = (0..self.candidates.len()).collect();
        order.sort_by_key(|&i| self.candidates.get(i).map(|(h, _)| (h.end_seq, h.start_seq)));
        let mut best: BTreeMap<u64, (u64, Vec<usize>)> = BTreeMap::new();
        for i in order {
            let Some((header, _)) = self.candidates.get(i) else { continue };
            let (start, mut chain) = best.get(&header.start_seq).cloned().unwrap_or((header.start_seq, Vec::new()));
            chain.push(i);
            let better = match best.get(&header.end_seq) {
                None => true,
                Some((s, c)) => start < *s || (start == *s && chain.len() > c.len()),
            };
            if better {
                best.insert(header.end_seq, (start, chain));
            }
        }
        best
    }

    /// The latest seq at or after `floor` that a chain of candidates ends at.
    fn best_end_at_or_after(&self, floor: u64) -> Option<u64> {
        self.chains().range(floor..).min_by_key(|(end, (start, _))| (*start, std::cmp::Reverse(**end))).map(|(e, _)| *e)
    }

    /// Loads the best chain ending at `end`, dropping any file whose bitmap fails its crc
    /// and choosing again. Every candidate not chained becomes stale.
    fn take_chain(&mut self, env: &dyn Env, end: u64, region_count: u64) -> io::Result<VecDeque<Arc<Layer>>> {
        loop {
            let chain = self.chains().remove(&end).map(|(_, chain)| chain).unwrap_or_default();
            let mut layers = VecDeque::with_capacity(chain.len());
            let mut broken = None;
            for &i in &chain {
                let Some((header, path)) = self.candidates.get(i) else { continue };
                match load_bits(env, path, header, region_count)? {
                    Ok(bits) => {
                        let layer = Layer { start: header.start_seq, end: header.end_seq, bits: Arc::new(bits) };
                        layers.push_back(Arc::new(layer));
                    }
                    Err(reason) => {
                        tracing::warn!("ignoring change-map layer {}: {reason}", path.display());
                        broken = Some(i);
                        break;
                    }
                }
            }
            if let Some(i) = broken {
                let (_, path) = self.candidates.remove(i);
                self.stale.push(path);
                continue;
            }
            // Too many layers (files from a build with a larger bound): merge the oldest.
            while layers.len() > LAYERS_MAX {
                let (Some(older), Some(newer)) = (layers.pop_front(), layers.pop_front()) else { break };
                layers.push_front(Arc::new(merge(region_count, &older, &newer)));
            }
            // Chained files stay (a merged one is replaced at the next persist, which writes
            // the merged layer and removes the files no longer in the chain).
            for (i, (header, path)) in std::mem::take(&mut self.candidates).into_iter().enumerate() {
                if chain.contains(&i) {
                    self.chained.insert((header.start_seq, header.end_seq), path);
                } else {
                    self.stale.push(path);
                }
            }
            return Ok(layers);
        }
    }
}

/// Reads and checks a layer's bitmap. The outer error is I/O; the inner one a reason to
/// ignore the file.
fn load_bits(
    env: &dyn Env,
    path: &Path,
    header: &ChangeLayerHeader,
    region_count: u64,
) -> io::Result<Result<Bitmap, String>> {
    let file = env.open(path, OpenMode::Existing)?;
    let mut bytes = vec![0u8; Bitmap::word_count_of(region_count) * 8];
    file.read_at(&mut bytes, CHANGE_LAYER_HEADER_LEN as u64)?;
    let crc = crc32fast::hash(&bytes);
    if crc != header.bitmap_crc {
        return Ok(Err(format!(
            "its bitmap checksum does not match (expected {:#010x}, got {crc:#010x})",
            header.bitmap_crc
        )));
    }
    Ok(Ok(Bitmap::from_words(region_count, &words_from_le(&bytes))))
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use proptest::prelude::*;

    use super::*;
    use crate::testing::FaultyEnv;

    const REGION_BYTES: u32 = 4096;
    /// Three bitmap pages, the last one partial.
    const REGION_COUNT: u64 = 2 * 32768 + 1000;
    const ID: [u8; 16] = [9; 16];

    fn new_map(env: &FaultyEnv, dir: &Path) -> ChangeMap {
        let size = REGION_COUNT * u64::from(REGION_BYTES);
        ChangeMap::create(env, dir, ID, size, REGION_BYTES).unwrap();
        reopen(env, dir, 1).0
    }

    fn reopen(env: &FaultyEnv, dir: &Path, generation: u64) -> (ChangeMap, ChangeMapState) {
        let size = REGION_COUNT * u64::from(REGION_BYTES);
        ChangeMap::open(Arc::new(env.clone()), dir, ID, size, REGION_BYTES, generation, 0).unwrap()
    }

    /// The reference: every record's seq and the regions it touched (first..=last); every
    /// cut.
    #[derive(Default)]
    struct Model {
        records: BTreeMap<u64, (u64, u64)>,
        cuts: BTreeSet<u64>,
    }

    /// A dense set of regions, as words.
    type Dense = Vec<u64>;

    fn dense(regions: &[u64]) -> Dense {
        let mut words = vec![0u64; REGION_COUNT.div_ceil(64) as usize];
        for &r in regions {
            words[(r / 64) as usize] |= 1 << (r % 64);
        }
        words
    }

    fn is_superset(got: &Dense, want: &Dense) -> bool {
        got.iter().zip(want).all(|(g, w)| w & !g == 0)
    }

    impl Model {
        fn between(&self, since: u64, until: u64) -> Dense {
            let bits = Bitmap::new(REGION_COUNT);
            for &(first, last) in self.records.range(since + 1..=until).map(|(_, r)| r) {
                bits.set_range(first, last);
            }
            (0..REGION_COUNT.div_ceil(64) as usize).map(|i| bits.word(i)).collect()
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Mark { first: u64, count: u64 },
        Cut,
        Persist,
        Reopen,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0..REGION_COUNT, 1u64..40).prop_map(|(first, count)| Op::Mark { first, count }),
            1 => (0..REGION_COUNT / 2, 30_000u64..REGION_COUNT / 2)
                .prop_map(|(first, count)| Op::Mark { first, count }),
            3 => Just(Op::Cut),
            1 => Just(Op::Persist),
            1 => Just(Op::Reopen),
        ]
    }

    fn check(map: &ChangeMap, model: &Model, last_seq: u64) {
        let cut_points = map.cut_points();
        let base = map.base_seq();
        // Cut points are a subset of the cuts; merging only removes some.
        assert!(cut_points.iter().all(|c| model.cuts.contains(c)), "{cut_points:?}");
        assert!(cut_points.len() <= LAYERS_MAX);
        let exact_points: Vec<u64> = std::iter::once(base).chain(cut_points.iter().copied()).collect();
        for q in
            [0, base.saturating_sub(1), base, base + 1, last_seq / 2, last_seq].into_iter().chain(exact_points.clone())
        {
            let got = map.changed_since(q);
            if q < base {
                assert!(got.is_err(), "changed_since({q}) below base {base} answered");
                continue;
            }
            let got = dense(&got.unwrap().regions);
            let want = model.between(q, u64::MAX);
            assert!(is_superset(&got, &want), "changed_since({q}) misses regions");
            // From a cut point or the base the answer is exact.
            if exact_points.contains(&q) {
                assert_eq!(got, want, "changed_since({q}) at a cut point is not exact");
            }
        }
        // Every pair would be quadratic in the layers: the first, and the last few.
        let sampled: Vec<u64> = exact_points
            .iter()
            .enumerate()
            .filter(|&(i, _)| i == 0 || i + 6 >= exact_points.len())
            .map(|(_, &p)| p)
            .collect();
        for (i, &since) in sampled.iter().enumerate() {
            for &until in sampled.iter().skip(i + 1) {
                let got = dense(&map.changed_between(since, until).unwrap().regions);
                assert!(got == model.between(since, until), "changed_between({since}, {until}) is not exact");
            }
            // Inside a layer: a superset.
            if let Some(&until) = cut_points.last() {
                if since + 1 < until {
                    let got = dense(&map.changed_between(since + 1, until).unwrap().regions);
                    assert!(is_superset(&got, &model.between(since + 1, until)));
                }
            }
        }
        if base > 0 {
            assert!(map.changed_between(base - 1, cut_points.last().copied().unwrap_or(base)).is_err());
        }
        for until in [last_seq + 1, base + 1] {
            if !cut_points.contains(&until) && until > base {
                let err = map.changed_between(base, until).unwrap_err();
                assert!(err.contains("not a snapshot cut point"), "{err}");
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

        /// Layers against a BTreeMap of seq -> regions: answers from retained cut points are
        /// exact, everything else a superset, through persists and reopens.
        #[test]
        fn layers_match_a_reference_model(ops in proptest::collection::vec(op(), 1..200)) {
            let env = FaultyEnv::new();
            let dir = Path::new("/model");
            let mut map = new_map(&env, dir);
            let mut model = Model::default();
            let mut seq = 0u64;
            for op in ops {
                match op {
                    Op::Mark { first, count } => {
                        seq += 1;
                        let last = (first + count - 1).min(REGION_COUNT - 1);
                        map.mark(first * u64::from(REGION_BYTES), (last - first + 1) * u64::from(REGION_BYTES));
                        model.records.insert(seq, (first, last));
                    }
                    Op::Cut => {
                        seq += 1;
                        map.cut(seq);
                        model.cuts.insert(seq);
                    }
                    Op::Persist => map.persist().unwrap(),
                    Op::Reopen => {
                        map.persist().unwrap();
                        let before = map.cut_points();
                        drop(map);
                        let (reopened, state) = reopen(&env, dir, 1);
                        prop_assert_eq!(state, ChangeMapState::Trusted);
                        prop_assert_eq!(reopened.cut_points(), before);
                        map = reopened;
                    }
                }
                check(&map, &model, seq);
            }
            // Only the chained layer files are left on disk.
            map.persist().unwrap();
            let files = env.files().into_iter().filter(|p| p.to_string_lossy().contains(LAYER_PREFIX)).count();
            prop_assert_eq!(files, map.cut_points().len());
        }

        #[test]
        fn set_range_matches_setting_bits_one_by_one(first in 0..REGION_COUNT, count in 1u64..5000) {
            let bits = Bitmap::new(REGION_COUNT);
            let last = (first + count - 1).min(REGION_COUNT - 1);
            bits.set_range(first, last);
            for region in first.saturating_sub(70)..(last + 70).min(REGION_COUNT) {
                prop_assert_eq!(bits.get(region), (first..=last).contains(&region), "region {}", region);
            }
            prop_assert_eq!(bits.count_ones(), last - first + 1);
        }
    }

    /// Cutting more than LAYERS_MAX times merges the oldest layers: the count stays
    /// bounded, the outer bounds stay, and an answer across the lost cut point is a superset.
    #[test]
    fn merging_keeps_the_bound_and_the_outer_bounds() {
        let env = FaultyEnv::new();
        let map = new_map(&env, Path::new("/merge"));
        for seq in 1..=(2 * LAYERS_MAX as u64 + 3) {
            if seq % 2 == 1 {
                map.mark((seq / 2) * u64::from(REGION_BYTES), 1);
            } else {
                map.cut(seq);
            }
        }
        let points = map.cut_points();
        assert_eq!(points.len(), LAYERS_MAX);
        assert_eq!(map.base_seq(), 0);
        assert_eq!(*points.last().unwrap(), 2 * LAYERS_MAX as u64 + 2);
        // 33 cuts: cut point 2 was merged away, (0, 4] is one layer now.
        assert_eq!(points.first(), Some(&4));
        assert!(map.changed_between(0, 2).unwrap_err().contains("not a snapshot cut point"));
        assert_eq!(map.changed_between(0, 4).unwrap().regions, vec![0, 1]);
        assert_eq!(map.changed_since(2).unwrap().regions.first(), Some(&0), "superset from inside a merged layer");
    }

    /// A truncation (rewind, or a journal tail lost in a crash) merges the layers after
    /// the point into the live bitmap: their bits stay, and their cut points are gone.
    #[test]
    fn truncation_forgets_later_cut_points_but_keeps_their_bits() {
        let env = FaultyEnv::new();
        let dir = Path::new("/truncate");
        let map = new_map(&env, dir);
        map.mark(0, 1);
        map.cut(2);
        map.mark(u64::from(REGION_BYTES), 1);
        map.cut(4);
        map.mark(2 * u64::from(REGION_BYTES), 1);
        map.cut(6);
        map.persist().unwrap();
        assert!(map.truncate_after(3));
        assert_eq!(map.cut_points(), vec![2]);
        assert_eq!(map.changed_since(2).unwrap().regions, vec![1, 2]);
        assert!(!map.truncate_after(3), "nothing after 3 any more");
        map.persist().unwrap();
        let layer_files: Vec<_> =
            env.files().into_iter().filter(|p| p.to_string_lossy().contains(LAYER_PREFIX)).collect();
        assert_eq!(layer_files, vec![layer_path(dir, 0, 2)], "the truncated layers' files are removed");
        drop(map);
        let (map, state) = reopen(&env, dir, 1);
        assert_eq!(state, ChangeMapState::Trusted);
        assert_eq!(map.cut_points(), vec![2]);
        assert_eq!(map.changed_since(0).unwrap().regions, vec![0, 1, 2]);
    }

    /// The layer chain at open: a missing or corrupt file breaks it, and everything before
    /// the break becomes unavailable, never wrong; leftovers are removed.
    #[test]
    fn a_broken_chain_moves_the_base_up() {
        let env = FaultyEnv::new();
        let dir = Path::new("/chain");
        let map = new_map(&env, dir);
        for (seq, region) in [(2u64, 0u64), (4, 1), (6, 2), (8, 3)] {
            map.mark(region * u64::from(REGION_BYTES), 1);
            map.cut(seq);
        }
        map.mark(4 * u64::from(REGION_BYTES), 1);
        map.persist().unwrap();
        drop(map);
        // A temp file from an interrupted persist and a foreign layer are ignored.
        env.open(&dir.join("changes-x.tmp"), OpenMode::CreateIfMissing).unwrap().write_at(b"junk", 0).unwrap();
        // Flip a bit in layer (2, 4]'s bitmap.
        env.corrupt(&layer_path(dir, 2, 4), CHANGE_LAYER_HEADER_LEN as u64, 0x40);
        let (map, state) = reopen(&env, dir, 1);
        assert_eq!(state, ChangeMapState::Trusted);
        assert_eq!(map.cut_points(), vec![6, 8]);
        assert_eq!(map.base_seq(), 4);
        assert!(map.changed_since(3).is_err());
        assert_eq!(map.changed_since(4).unwrap().regions, vec![2, 3, 4]);
        assert_eq!(map.changed_between(4, 8).unwrap().regions, vec![2, 3]);
        map.persist().unwrap();
        let mut left: Vec<_> = env
            .files()
            .into_iter()
            .filter(|p| p.to_string_lossy().contains(LAYER_PREFIX))
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            vec![
                "changes-00000000000000000004-00000000000000000006.layer",
                "changes-00000000000000000006-00000000000000000008.layer"
            ]
        );
    }

    /// A stale layer file found at open (written before a crash cut the persist short,
    /// so not chained) has the name of the layer that replay cuts again. The persist that
    /// wrote the new layer used to delete it right after, as stale, so the next open found
    /// the chain broken and lost every change before that cut point. Fixed: a name written
    /// since the open is never removed as stale.
    #[test]
    fn a_stale_layer_file_replaced_by_a_new_cut_is_kept() {
        let env = FaultyEnv::new();
        let dir = Path::new("/stale");
        let map = new_map(&env, dir);
        map.mark(0, 1);
        map.cut(2);
        map.persist().unwrap();
        let live = env.open(&dir.join(CHANGEMAP_FILE), OpenMode::Existing).unwrap();
        let mut old_live = vec![0u8; live.len().unwrap() as usize];
        live.read_at(&mut old_live, 0).unwrap();
        map.mark(u64::from(REGION_BYTES), 1);
        map.cut(4);
        map.persist().unwrap();
        drop(map);
        // As if the second persist had stopped after writing layer (2, 4]'s file.
        live.write_at(&old_live, 0).unwrap();
        live.sync().unwrap();
        let (map, state) = reopen(&env, dir, 1);
        assert_eq!((state, map.cut_points()), (ChangeMapState::Trusted, vec![2]));
        // Replay re-marks and cuts again.
        map.mark(u64::from(REGION_BYTES), 1);
        map.cut(4);
        map.persist().unwrap();
        assert!(env.exists(&layer_path(dir, 2, 4)));
        drop(map);
        let (map, _) = reopen(&env, dir, 1);
        assert_eq!((map.base_seq(), map.cut_points()), (0, vec![2, 4]));
    }

    /// A rebuilt live map may start at the end of a layer chain that reaches the
    /// checkpoint, so losing `changemap.bin` alone does not lose the layers.
    #[test]
    fn a_rebuilt_live_map_keeps_a_chain_that_reaches_the_checkpoint() {
        let env = FaultyEnv::new();
        let dir = Path::new("/rebuilt");
        let map = new_map(&env, dir);
        map.mark(0, 1);
        map.cut(2);
        map.mark(u64::from(REGION_BYTES), 1);
        map.cut(4);
        map.persist().unwrap();
        drop(map);
        env.corrupt(&dir.join(CHANGEMAP_FILE), 0, 0xff);
        let size = REGION_COUNT * u64::from(REGION_BYTES);
        // Checkpoint at 3: the chain ends at 4 >= 3, and replay re-marks everything after 3.
        let (map, state) = ChangeMap::open(Arc::new(env.clone()), dir, ID, size, REGION_BYTES, 1, 3).unwrap();
        assert!(matches!(state, ChangeMapState::Rebuilt { .. }));
        assert_eq!((map.base_seq(), map.cut_points()), (0, vec![2, 4]));
        assert_eq!(map.generation(), 2);
        drop(map);
        // Checkpoint at 5: no chain reaches it; the base is the checkpoint.
        env.corrupt(&dir.join(CHANGEMAP_FILE), 0, 0xff);
        let (map, _) = ChangeMap::open(Arc::new(env.clone()), dir, ID, size, REGION_BYTES, 2, 5).unwrap();
        assert_eq!((map.base_seq(), map.cut_points()), (5, vec![]));
        assert!(map.changed_since(4).is_err());
    }
}
