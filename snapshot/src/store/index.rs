//! The in-memory chunk index: where the one copy of each chunk the store serves lives.
//!
//! A sorted `Vec` of fixed 48-byte entries (binary-searched) is the base; a `BTreeMap`
//! overlay takes the changes since the last merge (new locations, and tombstones for base
//! entries removed), and is merged into a new, exactly sized base once it holds more than
//! 1/16 of the base (at least [`MIN_OVERLAY`] entries). An ordered overlay, not a hash map,
//! because [`Index::range`] pages through ids in order (garbage collection's sweep) and
//! must merge the overlay's ids with the base's without sorting on every page.
//!
//! # Memory
//!
//! 48 bytes per chunk in the base (`size_of::<Entry>()`, capacity = length after every
//! merge), plus the overlay: at most 1/16 of the chunks at about 120 bytes each (a B-tree
//! leaf of 11 entries of 52 bytes, at least half full) — about 56 bytes per chunk in all,
//! plus [`MIN_OVERLAY`] × 120 bytes (~0.5 MiB) for small stores. A merge holds the old and
//! the new base for its duration. [`Index::heap_bytes`] computes the figure.
//!
//! # Invariants
//!
//! - `base` is sorted by id with no repeated id.
//! - A tombstone (`None`) in the overlay only shadows an id that is in the base.
//! - `len` is the number of ids [`Index::get`] finds.

use std::collections::BTreeMap;
use std::mem::size_of;
use std::ops::Bound;

use crate::key::ChunkId;

/// Overlay entries allowed before a merge, whatever the base's size.
pub(super) const MIN_OVERLAY: usize = 4096;
/// The overlay is merged when it holds more than 1/`OVERLAY_FRACTION` of the base.
const OVERLAY_FRACTION: usize = 16;
/// Estimated heap bytes per overlay entry (see the module docs).
const OVERLAY_ENTRY_BYTES: usize = 120;

/// Where a copy of a chunk lives. Offsets and lengths fit 32 bits because packs are
/// bounded (`PACK_TARGET` plus one frame; a const assert in the store checks it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Location {
    /// The pack's slot in the store's pack table.
    pub(super) pack: u32,
    /// Offset of the frame in the pack file.
    pub(super) offset: u32,
    /// Length of the frame.
    pub(super) len: u32,
    /// When it was written, unix seconds (saturated to `0..=u32::MAX`: until 2106).
    pub(super) written: u32,
}

impl Location {
    /// True when `self` and `other` are the same copy (same pack, same offset).
    pub(super) fn same_copy(&self, other: &Location) -> bool {
        self.pack == other.pack && self.offset == other.offset
    }
}

/// One chunk in the base.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Entry {
    pub(super) id: ChunkId,
    pub(super) location: Location,
}

const _: () = assert!(size_of::<Location>() == 16);
const _: () = assert!(size_of::<Entry>() == 48);

/// The index. See the module docs.
#[derive(Debug, Default)]
pub(super) struct Index {
    base: Vec<Entry>,
    overlay: BTreeMap<ChunkId, Option<Location>>,
    len: usize,
}

impl Index {
    /// Chunks indexed.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    fn base_find(&self, id: &ChunkId) -> Option<&Entry> {
        self.base.binary_search_by(|e| e.id.cmp(id)).ok().and_then(|i| self.base.get(i))
    }

    /// The location of chunk `id`.
    pub(super) fn get(&self, id: &ChunkId) -> Option<Location> {
        match self.overlay.get(id) {
            Some(slot) => *slot,
            None => self.base_find(id).map(|e| e.location),
        }
    }

    /// Sets chunk `id`'s location (adding the chunk, or moving it).
    pub(super) fn insert(&mut self, id: ChunkId, location: Location) {
        if self.get(&id).is_none() {
            self.len += 1;
        }
        self.overlay.insert(id, Some(location));
        self.maybe_merge();
    }

    /// Forgets chunk `id`; returns its location.
    pub(super) fn remove(&mut self, id: &ChunkId) -> Option<Location> {
        let location = self.get(id)?;
        if self.base_find(id).is_some() {
            self.overlay.insert(*id, None);
        } else {
            self.overlay.remove(id);
        }
        self.len -= 1;
        self.maybe_merge();
        Some(location)
    }

    /// Adds many entries at once (opening the store, or a large batch from another
    /// process's logs): one sort and one merge instead of an overlay insert each. An id
    /// already indexed keeps its location, an id repeated in `entries` gets one of them;
    /// the entries not taken are returned.
    pub(super) fn insert_bulk(&mut self, mut entries: Vec<Entry>, mut on_taken: impl FnMut(&Entry)) -> Vec<Entry> {
        // In place (a stable sort would allocate half the entries again while opening a
        // large store); of equal ids any one is taken, every copy being valid.
        entries.sort_unstable_by_key(|e| e.id);
        let mut rejected = Vec::new();
        let mut previous: Option<ChunkId> = None;
        entries.retain(|entry| {
            let take = previous != Some(entry.id) && self.get(&entry.id).is_none();
            previous = Some(entry.id);
            if take {
                on_taken(entry);
            } else {
                rejected.push(*entry);
            }
            take
        });
        let mut fresh = entries;
        if self.base.is_empty() && self.overlay.is_empty() {
            // Opening a store: the sorted entries are the base (no second copy in memory).
            fresh.shrink_to_fit();
            self.len = fresh.len();
            self.base = fresh;
        } else if !fresh.is_empty() {
            self.merge_with(fresh);
        }
        rejected
    }

    /// Up to `limit` entries with ids greater than `after`, in ascending id order.
    pub(super) fn range(&self, after: Option<&ChunkId>, limit: usize) -> Vec<Entry> {
        let start = after.map_or(0, |a| self.base.partition_point(|e| e.id <= *a));
        let mut base = self.base.get(start..).unwrap_or_default().iter().peekable();
        let lower = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut overlay = self.overlay.range((lower, Bound::Unbounded)).peekable();
        let mut out = Vec::with_capacity(limit.min(self.len).min(1 << 16));
        while out.len() < limit {
            let next = match (base.peek(), overlay.peek()) {
                (None, None) => break,
                (Some(b), Some((o, _))) if b.id < **o => base.next().copied(),
                (Some(_), None) => base.next().copied(),
                (b, Some(_)) => {
                    let Some((id, slot)) = overlay.next() else { break };
                    if b.is_some_and(|b| b.id == *id) {
                        base.next(); // shadowed by the overlay
                    }
                    slot.map(|location| Entry { id: *id, location })
                }
            };
            out.extend(next);
        }
        out
    }

    /// Calls `f` on every entry, in no particular order.
    pub(super) fn for_each(&self, mut f: impl FnMut(&ChunkId, &Location)) {
        for entry in &self.base {
            if !self.overlay.contains_key(&entry.id) {
                f(&entry.id, &entry.location);
            }
        }
        for (id, slot) in &self.overlay {
            if let Some(location) = slot {
                f(id, location);
            }
        }
    }

    /// Keeps only the entries for which `keep` is true; returns the others.
    pub(super) fn retain(&mut self, mut keep: impl FnMut(&ChunkId, &Location) -> bool) -> Vec<Entry> {
        self.merge();
        let mut dropped = Vec::new();
        self.base.retain(|e| {
            let kept = keep(&e.id, &e.location);
            if !kept {
                dropped.push(*e);
            }
            kept
        });
        self.len = self.base.len();
        if self.base.capacity() > self.base.len() + self.base.len() / OVERLAY_FRACTION + MIN_OVERLAY {
            self.base.shrink_to_fit();
        }
        dropped
    }

    /// Heap bytes in use (the base's capacity, the overlay estimated; see the module docs).
    pub(super) fn heap_bytes(&self) -> usize {
        self.base.capacity() * size_of::<Entry>() + self.overlay.len() * OVERLAY_ENTRY_BYTES
    }

    fn maybe_merge(&mut self) {
        if self.overlay.len() > MIN_OVERLAY.max(self.base.len() / OVERLAY_FRACTION) {
            self.merge();
        }
    }

    /// Folds the overlay into a new, exactly sized base.
    pub(super) fn merge(&mut self) {
        if !self.overlay.is_empty() {
            self.merge_with(Vec::new());
        }
    }

    /// Builds the new base from the base, the overlay and `fresh` (sorted, ids in neither).
    fn merge_with(&mut self, fresh: Vec<Entry>) {
        let overlay = std::mem::take(&mut self.overlay);
        let base = std::mem::take(&mut self.base);
        // Base and overlay (the overlay wins on equal ids), merged with `fresh`.
        let mut next = Vec::with_capacity(self.len + fresh.len());
        {
            let mut base = base.into_iter().peekable();
            let mut overlay = overlay.into_iter().peekable();
            let mut old = std::iter::from_fn(|| loop {
                match (base.peek(), overlay.peek()) {
                    (None, None) => return None,
                    (Some(b), Some((o, _))) if b.id < *o => return base.next(),
                    (Some(_), None) => return base.next(),
                    (b, Some((o, _))) => {
                        if b.is_some_and(|b| b.id == *o) {
                            base.next();
                        }
                        let (id, slot) = overlay.next()?;
                        if let Some(location) = slot {
                            return Some(Entry { id, location });
                        }
                    }
                }
            })
            .peekable();
            let mut fresh = fresh.into_iter().peekable();
            loop {
                let entry = match (old.peek(), fresh.peek()) {
                    (None, None) => break,
                    (Some(o), Some(f)) if o.id <= f.id => old.next(),
                    (Some(_), None) => old.next(),
                    _ => fresh.next(),
                };
                next.extend(entry);
            }
        }
        debug_assert!(next.windows(2).all(|w| w.first().map(|e| e.id) < w.get(1).map(|e| e.id)));
        self.len = next.len();
        next.shrink_to_fit();
        self.base = next;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use rand::{Rng, SeedableRng};

    use super::*;

    fn id(n: u32) -> ChunkId {
        let mut bytes = [0u8; 32];
        bytes[..4].copy_from_slice(&n.to_be_bytes());
        bytes[31] = n as u8;
        ChunkId(bytes)
    }

    fn location(n: u32) -> Location {
        Location { pack: n % 7, offset: n, len: 100 + n, written: n / 3 }
    }

    /// The index against a BTreeMap model, with random inserts, moves, removals and bulk
    /// loads, crossing many merges; every read (get, len, paged range) must agree.
    #[test]
    fn matches_a_btreemap_model() {
        for seed in 0..4u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut index = Index::default();
            let mut model: BTreeMap<ChunkId, Location> = BTreeMap::new();
            for step in 0..30_000u32 {
                let n = rng.gen_range(0..12_000u32);
                match rng.gen_range(0..100) {
                    0..=49 => {
                        let loc = location(step);
                        index.insert(id(n), loc);
                        model.insert(id(n), loc);
                    }
                    50..=89 => assert_eq!(index.remove(&id(n)), model.remove(&id(n)), "seed {seed} step {step}"),
                    90..=98 => assert_eq!(index.get(&id(n)), model.get(&id(n)).copied()),
                    _ => {
                        let entries: Vec<Entry> = (0..rng.gen_range(0..3000))
                            .map(|k| Entry { id: id(rng.gen_range(0..12_000)), location: location(step + k) })
                            .collect();
                        let rejected = index.insert_bulk(entries.clone(), |_| {});
                        let rejected_offsets: std::collections::HashSet<u32> =
                            rejected.iter().map(|e| e.location.offset).collect();
                        for entry in entries.iter().filter(|e| !rejected_offsets.contains(&e.location.offset)) {
                            assert!(model.insert(entry.id, entry.location).is_none());
                        }
                        for entry in &rejected {
                            assert!(model.contains_key(&entry.id));
                        }
                    }
                }
                assert_eq!(index.len(), model.len());
            }
            // Paged listing: every page size, resumed after the last id of each page.
            for page in [1, 7, 1000, usize::MAX] {
                let mut after = None;
                let mut seen = Vec::new();
                loop {
                    let got = index.range(after.as_ref(), page);
                    let Some(last) = got.last() else { break };
                    after = Some(last.id);
                    seen.extend(got.iter().map(|e| (e.id, e.location)));
                }
                assert!(seen.iter().copied().eq(model.iter().map(|(k, v)| (*k, *v))), "seed {seed} page {page}");
            }
            let mut all = Vec::new();
            index.for_each(|id, loc| all.push((*id, *loc)));
            all.sort_by_key(|a| a.0);
            assert!(all.iter().copied().eq(model.iter().map(|(k, v)| (*k, *v))));
            let dropped = index.retain(|_, loc| loc.pack != 3);
            assert!(dropped.iter().all(|e| e.location.pack == 3));
            model.retain(|_, loc| loc.pack != 3);
            assert_eq!(index.len(), model.len());
            assert!(index.range(None, usize::MAX).iter().map(|e| (e.id, e.location)).eq(model.into_iter()));
        }
    }

    /// The budget: at most 64 bytes of RAM per indexed chunk, once the index is
    /// larger than its fixed overlay allowance.
    #[test]
    fn memory_per_chunk_stays_under_64_bytes() {
        let mut index = Index::default();
        let n = 400_000u32;
        let mut worst = 0.0f64;
        // Bulk (as at open), then one by one (as puts arrive), then removals.
        index.insert_bulk((0..n / 2).map(|k| Entry { id: id(k * 2), location: location(k) }).collect(), |_| {});
        for k in 0..n / 2 {
            index.insert(id(k * 2 + 1), location(k));
            if k % 1000 == 0 {
                worst = worst.max(index.heap_bytes() as f64 / index.len() as f64);
            }
        }
        for k in 0..n / 4 {
            index.remove(&id(k * 4));
        }
        worst = worst.max(index.heap_bytes() as f64 / index.len() as f64);
        assert!(worst <= 64.0, "{worst:.1} bytes per chunk");
        assert_eq!(index.len(), (n - n / 4) as usize);
    }
}
