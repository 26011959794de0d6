//! [`ChunkMap`]: the chunk ids of a manifest of any version, range by range.
//!
//! A version 3 manifest keeps its ids in index chunks; a version 1 or 2 manifest inline.
//! Readers see both the same way: the volume's chunks in ranges of `fanout` ([`Piece`]s),
//! loaded on demand from the first vault that holds a good copy and kept in a small cache,
//! so a reader going through the volume in order loads each index chunk once and holds a
//! few of them, whatever the volume's size.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::{Arc, Condvar, Mutex};

use super::piece::decode_piece;
use super::{ChunkRef, Layout, Manifest, HOLE, INDEX_FANOUT};
use crate::error::IndexError;
use crate::key::{ChunkId, TenantKey};
use crate::vault::{fetch_chunk, Vault};

/// The chunk ids of one range of a manifest, in volume order ([`HOLE`] for holes).
pub type Piece = Arc<[[u8; 32]]>;

/// Ranges kept decoded: enough for restore threads working on neighbouring batches.
const CACHED_PIECES: usize = 8;

/// The ranges decoded lately (most recent first) and those being loaded.
struct Cache {
    recent: VecDeque<(usize, Piece)>,
    loading: Vec<usize>,
}

/// A load of range `piece` in progress: dropped, it ends it and wakes the threads waiting.
struct Loading<'m, 'a> {
    map: &'m ChunkMap<'a>,
    piece: usize,
}

impl Drop for Loading<'_, '_> {
    fn drop(&mut self) {
        let mut cache = self.map.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.loading.retain(|&p| p != self.piece);
        drop(cache);
        self.map.loaded.notify_all();
    }
}

/// The entries of `manifest`, loading its index chunks from `vaults` (the first good copy)
/// with `key`. Shared by threads: a range is loaded once while it stays among the last few
/// used (a thread wanting a range being loaded waits for that load), and loads of different
/// ranges run side by side.
pub struct ChunkMap<'a> {
    key: &'a TenantKey,
    vaults: Vec<&'a dyn Vault>,
    manifest: &'a Manifest,
    fanout: u64,
    cache: Mutex<Cache>,
    /// Signalled when a load ends.
    loaded: Condvar,
    fallbacks: Mutex<Vec<(ChunkId, String)>>,
}

impl std::fmt::Debug for ChunkMap<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkMap").field("manifest", self.manifest).field("fanout", &self.fanout).finish()
    }
}

impl<'a> ChunkMap<'a> {
    /// The entries of `manifest`, whose index chunks are read from `vaults` in turn.
    pub fn new(key: &'a TenantKey, vaults: &[&'a dyn Vault], manifest: &'a Manifest) -> Self {
        let fanout = match manifest.layout() {
            Layout::Inline(_) => INDEX_FANOUT,
            Layout::Indexed { fanout, .. } => fanout,
        };
        ChunkMap {
            key,
            vaults: vaults.to_vec(),
            manifest,
            fanout: u64::from(fanout),
            cache: Mutex::new(Cache { recent: VecDeque::with_capacity(CACHED_PIECES), loading: Vec::new() }),
            loaded: Condvar::new(),
            fallbacks: Mutex::new(Vec::new()),
        }
    }

    /// The manifest.
    pub fn manifest(&self) -> &'a Manifest {
        self.manifest
    }

    /// Chunks per range (the last may hold fewer).
    pub fn fanout(&self) -> u64 {
        self.fanout
    }

    /// Number of ranges.
    pub fn pieces(&self) -> usize {
        (self.manifest.chunk_count() as u64).div_ceil(self.fanout) as usize
    }

    /// The chunk indices of range `piece`.
    pub fn piece_range(&self, piece: usize) -> Range<u64> {
        let count = self.manifest.chunk_count() as u64;
        let start = (piece as u64 * self.fanout).min(count);
        start..(start + self.fanout).min(count)
    }

    /// The index chunk of range `piece` (a version 3 manifest), `None` for an inline one.
    pub fn index_entry(&self, piece: usize) -> Option<ChunkRef> {
        match self.manifest.layout() {
            Layout::Inline(_) => None,
            Layout::Indexed { index, .. } => index.get(piece).map(ChunkRef::from_raw),
        }
    }

    /// The ids of range `piece`.
    pub fn piece(&self, piece: usize) -> Result<Piece, IndexError> {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(at) = cache.recent.iter().position(|(p, _)| *p == piece) {
                if let Some((_, ids)) = cache.recent.remove(at) {
                    cache.recent.push_front((piece, Arc::clone(&ids)));
                    return Ok(ids);
                }
            }
            if !cache.loading.contains(&piece) {
                break;
            }
            // Another thread loads this range: its result (or, if it failed, our own try).
            cache = self.loaded.wait(cache).unwrap_or_else(|p| p.into_inner());
        }
        cache.loading.push(piece);
        drop(cache);
        // Outside the lock: a thread wanting another range does not wait for this one.
        // The guard ends the load (and wakes the waiters) however `load` returns.
        let _loading = Loading { map: self, piece };
        let result = self.load(piece);
        if let Ok(ids) = &result {
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if cache.recent.len() == CACHED_PIECES {
                cache.recent.pop_back();
            }
            cache.recent.push_front((piece, Arc::clone(ids)));
        }
        result
    }

    fn load(&self, piece: usize) -> Result<Piece, IndexError> {
        let range = self.piece_range(piece);
        let len = (range.end - range.start) as usize;
        match self.manifest.layout() {
            Layout::Inline(chunks) => Ok(chunks.get(range.start as usize..range.end as usize).unwrap_or(&[]).into()),
            Layout::Indexed { index, .. } => {
                let raw = index.get(piece).copied().unwrap_or(HOLE);
                if raw == HOLE {
                    return Ok(vec![HOLE; len].into());
                }
                let id = ChunkId(raw);
                let error = |errors: String| IndexError {
                    snapshot: self.manifest.snapshot_id().to_owned(),
                    piece: piece as u64,
                    id,
                    first: range.start,
                    last: range.end.saturating_sub(1),
                    errors,
                };
                let (plain, fallback) = fetch_chunk(self.key, &self.vaults, &id).map_err(|e| error(e.join("; ")))?;
                let ids = decode_piece(&plain, len).map_err(error)?;
                if let Some(errors) = fallback {
                    self.fallbacks.lock().unwrap_or_else(|p| p.into_inner()).push((id, errors));
                }
                Ok(ids.into())
            }
        }
    }

    /// Entry `index`; an error past the end (never zeros for a chunk that is not there).
    pub fn entry(&self, index: u64) -> Result<ChunkRef, IndexError> {
        let piece = (index / self.fanout) as usize;
        let ids = self.piece(piece)?;
        match ids.get((index % self.fanout) as usize) {
            Some(raw) if index < self.manifest.chunk_count() as u64 => Ok(ChunkRef::from_raw(raw)),
            _ => Err(IndexError {
                snapshot: self.manifest.snapshot_id().to_owned(),
                piece: piece as u64,
                id: self.index_entry(piece).map_or(ChunkId(HOLE), |e| ChunkId(e.raw())),
                first: index,
                last: index,
                errors: format!("chunk {index} is past the end ({} chunks)", self.manifest.chunk_count()),
            }),
        }
    }

    /// Calls `f` with every entry in volume order.
    pub fn for_each(&self, mut f: impl FnMut(u64, ChunkRef)) -> Result<(), IndexError> {
        for piece in 0..self.pieces() {
            let start = self.piece_range(piece).start;
            for (at, raw) in self.piece(piece)?.iter().enumerate() {
                f(start + at as u64, ChunkRef::from_raw(raw));
            }
        }
        Ok(())
    }

    /// The distinct data chunks the manifest references, sorted.
    pub fn distinct_data(&self) -> Result<Vec<ChunkId>, IndexError> {
        let mut ids = Vec::new();
        self.for_each(|_, entry| {
            if let ChunkRef::Data(id) = entry {
                ids.push(id);
            }
        })?;
        ids.sort_unstable();
        ids.dedup();
        Ok(ids)
    }

    /// Index chunks that had to come from a vault other than the first, with the first
    /// vault's error: copies to heal. Taken, so each is reported once.
    pub fn take_fallbacks(&self) -> Vec<(ChunkId, String)> {
        std::mem::take(&mut *self.fallbacks.lock().unwrap_or_else(|p| p.into_inner()))
    }
}
