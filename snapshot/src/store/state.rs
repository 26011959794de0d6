//! What a store knows about its packs: the index of chunk copies, the copies beyond the
//! first, and per-pack accounting (live bytes, how far each index log was read).
//!
//! Applying records is idempotent: a store re-reads the records it wrote itself (it does
//! not track which log bytes are its own), and a copy already known is not added twice.
//!
//! # Invariants
//!
//! - Every [`Location`] in the index or in `extra` names a slot whose `packs` entry is
//!   `Some`.
//! - A pack's `live_bytes` and `live_copies` count exactly the copies in the index and in
//!   `extra` that are in that pack.
//! - An id has an entry in `extra` only while the index holds it too.

use std::collections::{HashMap, HashSet};

use super::index::{Entry, Index, Location, MIN_OVERLAY};
use super::pack::{RecordKind, Scan, ENTRY_ID_LEN};
use crate::key::ChunkId;

/// One pack the store knows (it has an index log).
#[derive(Debug, Clone, Default)]
pub(super) struct PackInfo {
    /// The pack's name (its file name in hex).
    pub(super) name: u64,
    /// Offset in the index log up to which it was read: just past the last valid record.
    pub(super) log_read_to: u64,
    /// `Stored` records read from the log (a pack with none is an orphan).
    pub(super) stored_records: u64,
    /// Bytes of indexed copies in the pack (frames with their id prefix).
    pub(super) live_bytes: u64,
    /// Indexed copies in the pack.
    pub(super) live_copies: u64,
    /// Log bytes skipped because they are not valid records.
    pub(super) skipped_log_bytes: u64,
    /// Records ignored because their frame does not lie inside the pack file.
    pub(super) records_outside_pack: u64,
    /// Why the log's header is unreadable, when it is (its records are then not read).
    pub(super) header_error: Option<String>,
}

impl PackInfo {
    /// True when the pack's log shows damage: records may have been lost, so frames the
    /// index does not name may still be chunks (a rebuild from the pack could find them).
    pub(super) fn damaged(&self) -> bool {
        self.header_error.is_some() || self.skipped_log_bytes > 0 || self.records_outside_pack > 0
    }
}

/// The records read from one index log, to apply.
#[derive(Debug)]
pub(super) struct LogRead {
    /// The pack.
    pub(super) name: u64,
    /// The pack file's length, read after the log (so every record read points at bytes
    /// this length covers, if the protocol was followed); `None` when the pack file is gone.
    pub(super) pack_len: Option<u64>,
    /// Why the header is unreadable; no records then.
    pub(super) header_error: Option<String>,
    /// The records found.
    pub(super) scan: Scan,
}

/// The store's view. See the module docs.
#[derive(Debug, Default)]
pub(super) struct State {
    /// One location per chunk: the copy reads use.
    pub(super) index: Index,
    /// Further copies of indexed chunks (two processes stored the same chunk, or a
    /// compaction copied it and has not deleted the old pack yet). Rare.
    extra: HashMap<ChunkId, Vec<Location>>,
    packs: Vec<Option<PackInfo>>,
    slots: HashMap<u64, u32>,
}

impl State {
    /// The slot of pack `name`, if known.
    pub(super) fn slot(&self, name: u64) -> Option<u32> {
        self.slots.get(&name).copied()
    }

    /// The pack in `slot`.
    pub(super) fn pack(&self, slot: u32) -> Option<&PackInfo> {
        self.packs.get(slot as usize).and_then(Option::as_ref)
    }

    fn pack_mut(&mut self, slot: u32) -> Option<&mut PackInfo> {
        self.packs.get_mut(slot as usize).and_then(Option::as_mut)
    }

    /// Every known pack with its slot.
    pub(super) fn packs(&self) -> impl Iterator<Item = (u32, &PackInfo)> {
        self.packs.iter().enumerate().filter_map(|(slot, p)| p.as_ref().map(|p| (slot as u32, p)))
    }

    /// The slot of pack `name`, registering it (with its log unread) when new.
    pub(super) fn register(&mut self, name: u64, log_read_to: u64) -> u32 {
        if let Some(slot) = self.slot(name) {
            return slot;
        }
        // Slots are never reused: a slot number outlives its pack only in locations that
        // `forget_packs` removes, but keeping them unique makes a stale one harmless.
        let slot = self.packs.len() as u32;
        self.packs.push(Some(PackInfo { name, log_read_to, ..PackInfo::default() }));
        self.slots.insert(name, slot);
        slot
    }

    /// Every copy of chunk `id`: the indexed one first.
    pub(super) fn copies(&self, id: &ChunkId) -> Vec<Location> {
        let mut out: Vec<Location> = self.index.get(id).into_iter().collect();
        out.extend(self.extra.get(id).into_iter().flatten().copied());
        out
    }

    /// Extra copies held (beyond one per chunk).
    pub(super) fn extra_copies(&self) -> usize {
        self.extra.values().map(Vec::len).sum()
    }

    /// Records a copy of `id`; false when it was already known.
    pub(super) fn add_copy(&mut self, id: ChunkId, location: Location) -> bool {
        match self.index.get(&id) {
            Some(first) if first.same_copy(&location) => return false,
            Some(_) => {
                let extra = self.extra.entry(id).or_default();
                if extra.iter().any(|l| l.same_copy(&location)) {
                    return false;
                }
                extra.push(location);
            }
            None => self.index.insert(id, location),
        }
        self.account(&location, true);
        true
    }

    /// Forgets the copy of `id` at `offset` in pack `slot`; another copy, if any, becomes
    /// the indexed one. Returns the copy forgotten.
    pub(super) fn remove_copy(&mut self, id: &ChunkId, slot: u32, offset: u64) -> Option<Location> {
        let matches = |l: &Location| l.pack == slot && u64::from(l.offset) == offset;
        let removed = if let Some(first) = self.index.get(id).filter(matches) {
            match self.take_extra(id) {
                Some(next) => self.index.insert(*id, next),
                None => {
                    self.index.remove(id);
                }
            }
            first
        } else {
            let extra = self.extra.get_mut(id)?;
            let at = extra.iter().position(matches)?;
            let location = extra.swap_remove(at);
            if extra.is_empty() {
                self.extra.remove(id);
            }
            location
        };
        self.account(&removed, false);
        Some(removed)
    }

    fn take_extra(&mut self, id: &ChunkId) -> Option<Location> {
        let extra = self.extra.get_mut(id)?;
        let next = extra.pop();
        if extra.is_empty() {
            self.extra.remove(id);
        }
        next
    }

    fn account(&mut self, location: &Location, added: bool) {
        account(&mut self.packs, location, added);
    }

    /// True when the copy of `id` at `offset` in pack `slot` is known.
    pub(super) fn has_copy(&self, id: &ChunkId, slot: u32, offset: u32) -> bool {
        self.copies(id).iter().any(|l| l.pack == slot && l.offset == offset)
    }

    /// The copies in each of the packs `slots`, by offset: one pass over the index for all
    /// of them (a reclaim's victims).
    pub(super) fn copies_in(&self, slots: &HashSet<u32>) -> HashMap<u32, Vec<(ChunkId, Location)>> {
        let mut out: HashMap<u32, Vec<(ChunkId, Location)>> = HashMap::new();
        if slots.is_empty() {
            return out;
        }
        self.index.for_each(|id, location| {
            if slots.contains(&location.pack) {
                out.entry(location.pack).or_default().push((*id, *location));
            }
        });
        for (id, extra) in &self.extra {
            for location in extra.iter().filter(|l| slots.contains(&l.pack)) {
                out.entry(location.pack).or_default().push((*id, *location));
            }
        }
        for copies in out.values_mut() {
            copies.sort_by_key(|(_, location)| location.offset);
        }
        out
    }

    /// Forgets pack `slot`, deleted by this store, whose copies are `copies` (any other
    /// copy of those chunks becomes the indexed one). Falls back to a pass over the whole
    /// index if the pack's accounting says copies remain that the list missed.
    pub(super) fn drop_pack(&mut self, slot: u32, copies: &[(ChunkId, Location)]) {
        for (id, location) in copies {
            self.remove_copy(id, slot, u64::from(location.offset));
        }
        if self.pack(slot).is_some_and(|p| p.live_copies > 0) {
            self.forget_packs(&HashSet::from([slot]));
        } else if let Some(pack) = self.packs.get_mut(slot as usize).and_then(Option::take) {
            self.slots.remove(&pack.name);
        }
    }

    /// Forgets packs whose files are gone (deleted by a reclaim, here or in another
    /// process): their copies leave the index, replaced by a copy elsewhere if there is
    /// one.
    pub(super) fn forget_packs(&mut self, slots: &HashSet<u32>) {
        if slots.is_empty() {
            return;
        }
        self.extra.retain(|_, extra| {
            extra.retain(|l| !slots.contains(&l.pack));
            !extra.is_empty()
        });
        let dropped = self.index.retain(|_, location| !slots.contains(&location.pack));
        for entry in dropped {
            if let Some(next) = self.take_extra(&entry.id) {
                self.index.insert(entry.id, next);
            }
        }
        for &slot in slots {
            if let Some(pack) = self.packs.get_mut(slot as usize).and_then(Option::take) {
                self.slots.remove(&pack.name);
            }
        }
    }

    /// Applies what was read from one index log. Within the read, a copy stored and
    /// removed cancels out; a removal of a copy read earlier applies to the index at once.
    /// New copies go to `fresh`, for [`State::insert_fresh`] once every log was read (one
    /// sort and merge for all: opening a large store).
    pub(super) fn apply_log(&mut self, read: LogRead, fresh: &mut Vec<Entry>) {
        // The pack went between the listing and the read: the next re-read forgets it.
        let Some(pack_len) = read.pack_len else { return };
        let slot = self.register(read.name, 0);
        let Some(info) = self.pack_mut(slot) else { return };
        info.header_error = read.header_error;
        info.log_read_to = read.scan.resume;
        info.skipped_log_bytes += read.scan.skipped_bytes;
        let mut batch: HashMap<(ChunkId, u64), Location> = HashMap::new();
        let mut order: Vec<(ChunkId, u64)> = Vec::new();
        for (_, record) in read.scan.records {
            let key = (record.id, record.offset);
            match record.kind {
                RecordKind::Stored => {
                    let inside = record.end().is_some_and(|end| end <= pack_len);
                    let location = u32::try_from(record.offset).ok().filter(|_| inside).map(|offset| Location {
                        pack: slot,
                        offset,
                        len: record.len,
                        written: u32::try_from(record.written.max(0)).unwrap_or(u32::MAX),
                    });
                    let Some(info) = self.pack_mut(slot) else { continue };
                    info.stored_records += 1;
                    match location {
                        Some(location) => {
                            if batch.insert(key, location).is_none() {
                                order.push(key);
                            }
                        }
                        None => info.records_outside_pack += 1,
                    }
                }
                RecordKind::Removed => {
                    batch.remove(&key);
                    self.remove_copy(&record.id, slot, record.offset);
                }
            }
        }
        fresh.extend(
            order.into_iter().filter_map(|key| batch.remove(&key).map(|location| Entry { id: key.0, location })),
        );
    }

    /// Adds the copies [`State::apply_log`] collected: few one by one, many in bulk.
    pub(super) fn insert_fresh(&mut self, fresh: Vec<Entry>) {
        if fresh.len() <= MIN_OVERLAY {
            for entry in fresh {
                self.add_copy(entry.id, entry.location);
            }
            return;
        }
        let packs = &mut self.packs;
        let rejected = self.index.insert_bulk(fresh, |entry| account(packs, &entry.location, true));
        // The copies not taken are known already, or extra copies.
        for entry in rejected {
            self.add_copy(entry.id, entry.location);
        }
    }
}

/// Counts a copy in (or out of) its pack's live totals.
fn account(packs: &mut [Option<PackInfo>], location: &Location, added: bool) {
    let bytes = u64::from(location.len) + ENTRY_ID_LEN as u64;
    if let Some(pack) = packs.get_mut(location.pack as usize).and_then(Option::as_mut) {
        if added {
            pack.live_bytes += bytes;
            pack.live_copies += 1;
        } else {
            pack.live_bytes = pack.live_bytes.saturating_sub(bytes);
            pack.live_copies = pack.live_copies.saturating_sub(1);
        }
    }
}
