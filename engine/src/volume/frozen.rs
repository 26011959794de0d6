//! Frozen views: a volume's contents exactly as they were right after a snapshot marker,
//! readable while writes go on (copy-on-write at the first overwrite of each region).
//!
//! # Protocol
//! 1. **Freeze.** [`Volume::snapshot`] prepares a sparse copy file (`frozen-<id>.cow` in
//!    the volume directory), then appends the snapshot marker. The marker's apply, under
//!    the journal lock, cuts the change map and activates the freeze with the marker's
//!    seq; so no record after the marker is applied before the freeze is active.
//!    [`Volume::freeze_at_marker`] (a standby) registers a name instead, and the next
//!    marker of that name activates it the same way.
//! 2. **Copy before mutating.** Every store mutation after the marker (a record's apply,
//!    a resync write or zero; all run under the journal lock) first calls
//!    `FrozenSet::before_mutation`. For each region it touches that is neither copied nor
//!    released, it takes the region's stripe lock, copies the region's current bytes into
//!    the copy file at the same offset (an all-zero region is only flagged, nothing is
//!    written), and sets the region's `copied` bit; only then does the mutation run. Nothing
//!    is synced: the copy only has to outlive the process, and a crash ends every freeze
//!    (open deletes leftover copy files; the snapshot is retried with a new marker).
//! 3. **Read.** [`Frozen::read`] takes each region's stripe lock, reads the copy file if
//!    the region is copied and the block store otherwise, then checks that the freeze is
//!    still valid. A writer cannot mutate an uncopied region while the reader holds its
//!    stripe lock, because its copy needs that lock first.
//! 4. **Invalidation.** A failed copy (I/O error), a rewind below the marker, closing the
//!    volume and poisoning it set the freeze's `invalid` flag and then stop its copying. A
//!    read checks the flag after reading each region, so bytes a writer changed after
//!    the copying stopped are never returned as frozen. Writes are never failed by a freeze.
//! 5. **End.** Dropping the [`Frozen`] stops the copying and deletes the copy file;
//!    [`Frozen::release`] does so for a range the reader is done with.
//!
//! The extra cost lands on the first overwrite of each region after the marker: one
//! region-sized read of the store and one write to the copy file, under the journal lock
//! (see the measurement in `frozen_tests::first_overwrite_latency`).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::blockstore::BlockStore;
use crate::changemap::{Bitmap, ChangeMap, ChangeSet};
use crate::error::{Error, Result};
use crate::format::RecordKind;
use crate::journal::NewRecord;
use crate::storage::{Env, Extent, OpenMode, Storage};

use super::Volume;

/// Most freezes a volume holds at once: live views, snapshots being taken and markers
/// waited for. Each costs a copy of every region overwritten while it lives.
pub const FROZEN_MAX: usize = 4;
/// Stripe locks per freeze: a reader and a writer contend only when their regions share
/// a stripe.
const STRIPES: usize = 64;
const COPY_FILE_PREFIX: &str = "frozen-";
const COPY_FILE_EXTENSION: &str = "cow";
/// A mutation spanning at least this many regions asks the store for its holes first, so
/// a large trim over unwritten space copies nothing.
const HOLE_QUERY_REGIONS_MIN: u64 = 4;

impl Volume {
    /// Appends a snapshot marker named `name` and, atomically with it (under the journal
    /// lock), freezes the volume's contents at that marker; durable like
    /// [`Volume::mark_snapshot`]. Writes go on; the first overwrite of each region copies
    /// it aside while the returned [`Frozen`] lives. At most [`FROZEN_MAX`] freezes at a
    /// time ([`Error::InvalidArgument`] beyond that).
    pub fn snapshot(&self, name: &str) -> Result<Frozen> {
        let inner = &self.inner;
        inner.validate_snapshot_name(name)?;
        inner.check_writable()?;
        let core = inner.frozen.reserve(name)?;
        // From here dropping `frozen` undoes the reservation, whatever fails.
        let frozen = Frozen { core: Arc::clone(&core), set: Arc::clone(&inner.frozen) };
        let record = NewRecord::local(RecordKind::Snapshot, 0, 0, 0, name.as_bytes());
        let seq = inner.append_freezing(record, Some(&core))?;
        debug_assert_eq!(core.seq.get(), Some(&seq));
        inner.journal.flush_to(seq).map_err(|e| inner.flush_error(e))?;
        Ok(frozen)
    }

    /// Snapshots a consistency group: appends a marker named `name` to each of `volumes`
    /// and freezes each at it, holding every volume's journal lock from the first marker
    /// to the last. No write to any of them lands between the markers, so the frozen views
    /// are one instant of the group: if a write to one volume was acknowledged before a
    /// write to another was issued, a view holding the second holds the first. Returns
    /// the views in the order of `volumes`. The locks are taken in name order, so two
    /// groups sharing volumes cannot deadlock. Each volume counts a freeze against
    /// [`FROZEN_MAX`].
    ///
    /// A failure leaves no view; markers already appended stay in the journals, where an
    /// unclaimed marker is only a change-map cut point.
    pub fn snapshot_group(volumes: &[&Volume], name: &str) -> Result<Vec<Frozen>> {
        append_group(volumes, name, GroupFreeze::Freeze).map(|(_, views)| views)
    }

    /// [`Volume::snapshot_group`] without freezing here: appends a marker named `name` to
    /// each of `volumes` under all their journal locks (one instant of the group), makes
    /// them durable, and returns their seqs in the order of `volumes`. The primary calls
    /// it for a standby that takes the group snapshot from its own copies
    /// (`Volume::freeze_at_marker` on each member there). Takes no freeze, so it never
    /// fails for [`FROZEN_MAX`].
    ///
    /// The markers go in all or none: every member's journal is checked for room under
    /// the locks before the first is appended (a full one is checkpointed and the group
    /// retried), so each member holds exactly one marker of this group at its instant.
    pub fn mark_group(volumes: &[&Volume], name: &str) -> Result<Vec<u64>> {
        append_group(volumes, name, GroupFreeze::MarkOnly).map(|(seqs, _)| seqs)
    }

    /// Whether a snapshot marker named `name` was applied (appended here, or received
    /// from the primary) among the last 64 since the volume was opened, and not rewound.
    /// A standby learns so that its primary took the scheduled snapshot of that name.
    pub fn saw_marker(&self, name: &str) -> bool {
        self.inner.frozen.state.lock().recent.iter().any(|(_, seen)| seen == name.as_bytes())
    }

    /// For a standby: the next snapshot marker named `name` that is applied (by
    /// [`Volume::apply_replica`], or appended here) freezes the volume at it. The
    /// returned waiter hands out the [`Frozen`]; dropping it cancels the wait. Counts
    /// against [`FROZEN_MAX`].
    pub fn freeze_at_marker(&self, name: &str) -> Result<FreezeWaiter> {
        let inner = &self.inner;
        inner.validate_snapshot_name(name)?;
        inner.check_writable()?;
        let core = inner.frozen.reserve(name)?;
        let slot = Arc::new(WaitSlot { result: Mutex::new(Slot::Waiting), ready: Condvar::new() });
        inner.frozen.state.lock().waiting.push(Waiting { core: Arc::clone(&core), slot: Arc::clone(&slot) });
        Ok(FreezeWaiter { core, slot, set: Arc::clone(&inner.frozen) })
    }
}

/// Whether a group's markers also freeze the volumes here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GroupFreeze {
    /// [`Volume::snapshot_group`]: each marker activates a freeze taken for it.
    Freeze,
    /// [`Volume::mark_group`]: markers only.
    MarkOnly,
}

/// Appends a marker named `name` to each of `volumes` while holding all their journal
/// locks (taken in name order), freezing each at its marker when `freeze` says so, and
/// makes the markers durable. Returns the seqs and (for [`GroupFreeze::Freeze`]) the
/// views, both in the order of `volumes`.
fn append_group(volumes: &[&Volume], name: &str, freeze: GroupFreeze) -> Result<(Vec<u64>, Vec<Frozen>)> {
    let mut order: Vec<usize> = (0..volumes.len()).collect();
    order.sort_by(|&a, &b| volumes[a].name().cmp(volumes[b].name()));
    if let Some(w) = order.windows(2).find(|w| volumes[w[0]].name() == volumes[w[1]].name()) {
        return Err(Error::InvalidArgument(format!("consistency group lists volume {:?} twice", volumes[w[0]].name())));
    }
    let record = NewRecord::local(RecordKind::Snapshot, 0, 0, 0, name.as_bytes());
    loop {
        // Every check before the first append: a refused group appends nothing.
        let mut views = Vec::with_capacity(volumes.len());
        for volume in volumes {
            let inner = &volume.inner;
            inner.validate_snapshot_name(name)?;
            inner.check_writable()?;
            if freeze == GroupFreeze::Freeze {
                let core = inner.frozen.reserve(name)?;
                views.push(Frozen { core, set: Arc::clone(&inner.frozen) });
            }
        }
        let mut seqs = vec![0u64; volumes.len()];
        let full;
        {
            let mut guards: Vec<_> = order.iter().map(|&i| volumes[i].inner.journal.lock_writer()).collect();
            // Room for every marker before the first is appended: all of them or none (a
            // retry would leave members with two markers of this name, at two instants).
            full = guards
                .iter()
                .zip(&order)
                .find(|(guard, &i)| !volumes[i].inner.journal.has_room_locked(guard, record.payload.len()))
                .map(|(_, &i)| i);
            for (guard, &i) in guards.iter_mut().zip(&order).filter(|_| full.is_none()) {
                let inner = &volumes[i].inner;
                let core = views.get(i).map(|view| Arc::clone(&view.core));
                let apply = |seq: u64| inner.apply(seq, &record, core.as_ref());
                match inner.journal.append_locked(guard, record, &apply) {
                    Ok(seq) => {
                        seqs[i] = seq;
                        // Widens the window between two markers, where a write to a
                        // volume whose lock is not held would land: the group tests'
                        // checks then catch such a bug at once.
                        #[cfg(test)]
                        std::thread::yield_now();
                    }
                    // Full was ruled out above, under these locks.
                    Err(e) => return Err(inner.append_error(&record, e)),
                }
            }
        }
        for volume in volumes {
            volume.inner.after_append();
        }
        if let Some(i) = full {
            // Nothing was appended. Dropping `views` undoes the reservations; retry after
            // a checkpoint of the full journal.
            drop(views);
            volumes[i].inner.checkpoint(super::CheckpointMode::Always)?;
            continue;
        }
        for (volume, &seq) in volumes.iter().zip(&seqs) {
            let inner = &volume.inner;
            inner.journal.flush_to(seq).map_err(|e| inner.flush_error(e))?;
        }
        debug_assert!(seqs.iter().all(|&seq| seq != 0), "every member got a marker");
        return Ok((seqs, views));
    }
}

/// A volume's contents frozen at a snapshot marker. `Send + Sync`; share it with an
/// `Arc`. Dropping it ends the freeze: no more copying, and the copy file is deleted.
///
/// # Invariants
/// - A region's `copied` bit is set only after its bytes at the marker are in the copy
///   file (or it was all zeros, and its `zero` bit is set), and before the first mutation
///   of it after the marker.
/// - While the freeze is valid, an uncopied, unreleased region of the store holds its
///   bytes at the marker.
pub struct Frozen {
    core: Arc<Core>,
    set: Arc<FrozenSet>,
}

// A frozen view is handed between threads and shared behind an `Arc`.
const _: fn() = || {
    fn shareable<T: Send + Sync>() {}
    shareable::<Frozen>();
    shareable::<FreezeWaiter>();
};

/// Waits for the marker a [`Volume::freeze_at_marker`] named.
pub struct FreezeWaiter {
    core: Arc<Core>,
    slot: Arc<WaitSlot>,
    set: Arc<FrozenSet>,
}

impl Frozen {
    /// The marker's seq.
    pub fn seq(&self) -> u64 {
        self.core.seq()
    }

    /// The marker's name.
    pub fn name(&self) -> &str {
        &self.core.name
    }

    /// The volume's size in bytes.
    pub fn size(&self) -> u64 {
        self.set.size
    }

    /// Size of the regions that [`Frozen::changed_since`] reports and that are copied.
    pub fn region_bytes(&self) -> u64 {
        self.set.region_bytes
    }

    /// Regions changed by records in `(parent_seq, seq]`, from the change map's layers:
    /// exact when `parent_seq` is a retained snapshot cut point.
    /// [`Error::ChangeMapUnavailable`] means the map cannot answer: read everything.
    pub fn changed_since(&self, parent_seq: u64) -> Result<ChangeSet> {
        let seq = self.seq();
        if parent_seq > seq {
            return Err(Error::InvalidArgument(format!(
                "volume {:?}: snapshot {:?} is at seq {seq}, before the parent seq {parent_seq}",
                self.set.volume, self.core.name
            )));
        }
        self.set.changemap.changed_between(parent_seq, seq).map_err(|reason| Error::ChangeMapUnavailable {
            volume: self.set.volume.clone(),
            since: parent_seq,
            reason,
        })
    }

    /// Reads the volume's bytes at `[offset, offset + buf.len())` exactly as they were
    /// right after the marker, whatever was written since. Fails if the freeze was
    /// invalidated (the error names the cause) or a region was released.
    ///
    /// Made for bulk reads: the block store's part comes in one read that leaves no pages
    /// in the page cache ([`Storage::read_uncached`]), without holding any lock of the
    /// freeze across the I/O, and without `O_DIRECT`, whose reads hold the file's inode
    /// lock against the writers' buffered writes (on ext4 a buffered read takes none; on
    /// XFS it takes it shared too), so writers wait only for the bookkeeping.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let (set, core) = (&*self.set, &*self.core);
        set.check_range(offset, buf.len() as u64)?;
        self.check_valid()?;
        if buf.is_empty() {
            return Ok(());
        }
        let region_bytes = set.region_bytes;
        let end = offset + buf.len() as u64;
        let (first, last) = (offset / region_bytes, (end - 1) / region_bytes);
        if let Some(region) = (first..=last).find(|&r| core.released.get(r)) {
            return Err(Error::InvalidArgument(format!(
                "volume {:?}: snapshot {:?}: region {region} (byte {}) was released and cannot be read again",
                set.volume,
                core.name,
                (region * region_bytes).max(offset)
            )));
        }
        let io = |context: String, source| Error::Io { volume: set.volume.clone(), context, source };
        // The store first, for the whole range. A region whose `copied` bit is still clear
        // afterwards (checked under its stripe) held its bytes at the marker throughout
        // the read: a writer sets the bit, under the stripe, before it mutates the region.
        set.store.read_uncached(offset, buf).map_err(|source| {
            io(format!("read {} bytes at {offset} of snapshot {:?} (seq {})", buf.len(), core.name, core.seq()), source)
        })?;
        // Regions copied by now may be newer in the store: theirs come from the copy.
        for region in first..=last {
            let from = (region * region_bytes).max(offset);
            let to = ((region + 1) * region_bytes).min(end);
            let Some(piece) = buf.get_mut((from - offset) as usize..(to - offset) as usize) else { break };
            let _stripe = core.stripe(region).lock();
            // Released while we read (a caller reading what it gave up): its bytes may
            // have changed, and its copy may be gone.
            if core.released.get(region) {
                return Err(Error::InvalidArgument(format!(
                    "volume {:?}: snapshot {:?}: region {region} was released while it was read",
                    set.volume, core.name
                )));
            }
            if !core.copied.get(region) {
                continue;
            }
            if core.zero.get(region) {
                piece.fill(0);
            } else {
                core.file.read_at(piece, from).map_err(|source| {
                    io(format!("read {} bytes at {from} of the copy of snapshot {:?}", piece.len(), core.name), source)
                })?;
            }
        }
        // Copying may have stopped while we read: then the store's bytes may be newer.
        self.check_valid()
    }

    /// The allocation map of the frozen contents of `[offset, offset + len)`. Conservative:
    /// a range reported as a hole reads as zeros; data may be zeros too (released regions
    /// are always reported as data).
    pub fn allocation(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let (set, core) = (&*self.set, &*self.core);
        set.check_range(offset, len)?;
        self.check_valid()?;
        let io = |source| Error::Io {
            volume: set.volume.clone(),
            context: format!("map allocation of {offset}+{len} in snapshot {:?}", core.name),
            source,
        };
        // The store's map first, the copied bits after: a region not copied by then was
        // not mutated before it either (mutations copy first), so the store's map of it
        // is the frozen one; a region copied meanwhile is answered from its copy.
        let store_extents = set.store.extents(offset, len).map_err(io)?;
        let mut store_runs = Vec::with_capacity(store_extents.len());
        let mut at = offset;
        for extent in store_extents {
            store_runs.push((at, at + extent.len, extent.hole));
            at += extent.len;
        }
        let mut out: Vec<Extent> = Vec::new();
        let mut push = |len: u64, hole: bool| match out.last_mut() {
            Some(last) if last.hole == hole => last.len += len,
            _ if len > 0 => out.push(Extent { len, hole }),
            _ => {}
        };
        let region_bytes = set.region_bytes;
        let end = offset + len;
        let mut pos = offset;
        let mut run = 0usize;
        while pos < end {
            let region = pos / region_bytes;
            let piece_end = ((region + 1) * region_bytes).min(end);
            if core.copied.get(region) {
                push(piece_end - pos, core.zero.get(region));
            } else if core.released.get(region) {
                push(piece_end - pos, false);
            } else {
                let mut from = pos;
                while from < piece_end {
                    let Some(&(run_start, run_end, hole)) = store_runs.get(run) else {
                        push(piece_end - from, false);
                        break;
                    };
                    if run_end <= from {
                        run += 1;
                        continue;
                    }
                    let to = run_end.min(piece_end);
                    push(to - from.max(run_start), hole);
                    from = to;
                }
            }
            pos = piece_end;
        }
        self.check_valid()?;
        Ok(out)
    }

    /// Tells the freeze that `[offset, offset + len)` will not be read again: the regions
    /// it wholly covers (and the last, partial region of the volume) are no longer copied
    /// on overwrite, and their copies are freed. Reading them afterwards fails.
    pub fn release(&self, offset: u64, len: u64) {
        let (set, core) = (&*self.set, &*self.core);
        let end = offset.saturating_add(len).min(set.size);
        let region_bytes = set.region_bytes;
        let first = offset.div_ceil(region_bytes);
        let last_end = if end == set.size { set.region_count } else { end / region_bytes };
        if first >= last_end {
            return;
        }
        for region in first..last_end {
            let _stripe = core.stripe(region).lock();
            core.released.set(region);
        }
        // No writer copies these regions any more, so the punch races with nothing.
        let from = first * region_bytes;
        let to = (last_end * region_bytes).min(set.size);
        if let Err(e) = core.file.punch_hole(from, to - from) {
            tracing::warn!(volume = %set.volume, "failed to free released copies of snapshot {:?}: {e}", core.name);
        }
    }

    /// How many times the volume's store was written (writes, zeroes and trims applied,
    /// here or from the primary) since the marker: a reader can tell from it whether the
    /// volume is being written, and yield the disk to those writes.
    pub fn writes(&self) -> u64 {
        self.core.writes.load(Ordering::Relaxed)
    }

    fn check_valid(&self) -> Result<()> {
        match self.core.invalid_cause() {
            None => Ok(()),
            Some(cause) => Err(Error::Io {
                volume: self.set.volume.clone(),
                context: format!("read snapshot {:?} (seq {})", self.core.name, self.core.seq()),
                source: std::io::Error::other(format!("the frozen view ended: {cause}; take a new snapshot")),
            }),
        }
    }
}

#[cfg(test)]
impl Frozen {
    pub(crate) fn is_copied(&self, region: u64) -> bool {
        self.core.copied.get(region)
    }

    pub(crate) fn is_released(&self, region: u64) -> bool {
        self.core.released.get(region)
    }
}

impl fmt::Debug for Frozen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Frozen")
            .field("volume", &self.set.volume)
            .field("name", &self.core.name)
            .field("seq", &self.core.seq.get())
            .field("invalid", &self.core.invalid_cause())
            .finish()
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        self.set.end(&self.core, "the frozen view was dropped");
    }
}

impl FreezeWaiter {
    /// Waits up to `timeout` for the marker. Gives the [`Frozen`] once; fails when the
    /// time runs out (the wait stays registered: call again, or drop the waiter to
    /// cancel), or when the volume was rewound, closed or poisoned first.
    pub fn wait(&self, timeout: Duration) -> Result<Frozen> {
        let deadline = Instant::now() + timeout;
        let mut slot = self.slot.result.lock();
        loop {
            match std::mem::replace(&mut *slot, Slot::Claimed) {
                Slot::Ready(frozen) => return Ok(*frozen),
                Slot::Failed(cause) => {
                    let error = self.error(std::io::ErrorKind::Other, &cause);
                    *slot = Slot::Failed(cause);
                    return Err(error);
                }
                Slot::Claimed => {
                    *slot = Slot::Claimed;
                    return Err(self.error(std::io::ErrorKind::Other, "this waiter already handed out its frozen view"));
                }
                Slot::Waiting => *slot = Slot::Waiting,
            }
            if self.slot.ready.wait_until(&mut slot, deadline).timed_out() && matches!(*slot, Slot::Waiting) {
                let waited = format!("no marker named {:?} arrived within {timeout:?}", self.core.name);
                return Err(self.error(std::io::ErrorKind::TimedOut, &waited));
            }
        }
    }

    fn error(&self, kind: std::io::ErrorKind, cause: &str) -> Error {
        Error::Io {
            volume: self.set.volume.clone(),
            context: format!("freeze at snapshot marker {:?}", self.core.name),
            source: std::io::Error::new(kind, cause.to_string()),
        }
    }
}

impl fmt::Debug for FreezeWaiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FreezeWaiter").field("volume", &self.set.volume).field("name", &self.core.name).finish()
    }
}

impl Drop for FreezeWaiter {
    fn drop(&mut self) {
        let unclaimed = {
            let mut state = self.set.state.lock();
            state.waiting.retain(|w| !Arc::ptr_eq(&w.core, &self.core));
            std::mem::replace(&mut *self.slot.result.lock(), Slot::Claimed)
        };
        match unclaimed {
            // Handed out: the Frozen owns the freeze now.
            Slot::Claimed => {}
            // Activated but never collected: its own drop ends the freeze.
            Slot::Ready(frozen) => drop(frozen),
            Slot::Waiting | Slot::Failed(_) => self.set.end(&self.core, "the wait for the marker was cancelled"),
        }
    }
}

struct WaitSlot {
    result: Mutex<Slot>,
    ready: Condvar,
}

enum Slot {
    /// The marker has not arrived.
    Waiting,
    /// The marker arrived; the view waits to be collected.
    Ready(Box<Frozen>),
    /// The wait failed (rewind, close, poison).
    Failed(String),
    /// `wait` handed the view out.
    Claimed,
}

struct Waiting {
    core: Arc<Core>,
    slot: Arc<WaitSlot>,
}

/// One freeze's state, shared by its [`Frozen`] and the volume's write path.
pub(super) struct Core {
    name: String,
    /// The marker's seq, set when the freeze is activated.
    seq: OnceLock<u64>,
    path: PathBuf,
    file: Arc<dyn Storage>,
    /// Regions whose bytes at the marker are preserved (in the file, or as `zero`).
    copied: Bitmap,
    /// Copied regions that were all zeros: nothing of them is in the file.
    zero: Bitmap,
    /// Regions the reader gave up: never copied again.
    released: Bitmap,
    stripes: Box<[Mutex<()>]>,
    /// Store mutations since the freeze was activated ([`Frozen::writes`]).
    writes: AtomicU64,
    invalid: AtomicBool,
    cause: OnceLock<String>,
    /// Set once the reservation is given back, so that happens once.
    ended: AtomicBool,
}

impl Core {
    fn seq(&self) -> u64 {
        self.seq.get().copied().unwrap_or(0)
    }

    fn stripe(&self, region: u64) -> &Mutex<()> {
        let index = (region % STRIPES as u64) as usize;
        // `stripes` has STRIPES entries, so the index is always in range.
        &self.stripes[index]
    }

    fn invalidate(&self, cause: &str) {
        let _ = self.cause.set(cause.to_string());
        self.invalid.store(true, Ordering::SeqCst);
    }

    fn invalid_cause(&self) -> Option<String> {
        if self.invalid.load(Ordering::SeqCst) {
            Some(self.cause.get().cloned().unwrap_or_default())
        } else {
            None
        }
    }

    /// Copies aside every region of `[offset, offset + len)` not yet copied or released.
    /// Runs under the journal lock, before the mutation. `Err` names why the freeze must
    /// end.
    fn copy_before_write(
        &self,
        set: &FrozenSet,
        offset: u64,
        len: u64,
        scratch: &mut Vec<u8>,
    ) -> std::result::Result<(), String> {
        self.writes.fetch_add(1, Ordering::Relaxed);
        let region_bytes = set.region_bytes;
        let first = offset / region_bytes;
        let last = (offset + len - 1) / region_bytes;
        let mut holes: Option<Vec<(u64, u64)>> = None;
        for region in first..=last {
            if self.copied.get(region) || self.released.get(region) {
                continue;
            }
            let start = region * region_bytes;
            let n = region_bytes.min(set.size - start);
            if holes.is_none() && last - first + 1 >= HOLE_QUERY_REGIONS_MIN {
                let range_end = ((last + 1) * region_bytes).min(set.size);
                holes = Some(hole_runs(&set.store, start, range_end - start)?);
            }
            let _stripe = self.stripe(region).lock();
            if self.released.get(region) {
                continue;
            }
            let in_hole = holes.as_ref().is_some_and(|runs| runs.iter().any(|&(a, b)| a <= start && start + n <= b));
            if in_hole {
                self.zero.set(region);
            } else {
                scratch.resize(n as usize, 0);
                set.store
                    .read(start, scratch)
                    .map_err(|e| format!("failed to read region {region} of the block store to preserve it: {e}"))?;
                if is_zero(scratch) {
                    self.zero.set(region);
                } else {
                    self.file
                        .write_at(scratch, start)
                        .map_err(|e| format!("failed to copy region {region} to {}: {e}", self.path.display()))?;
                }
            }
            self.copied.set(region);
        }
        Ok(())
    }
}

/// True when every byte is zero. Compares 4 KiB at a time with `memcmp`, which is fast
/// whatever the optimisation level (a byte loop is not vectorised in debug builds).
fn is_zero(bytes: &[u8]) -> bool {
    const ZEROS: [u8; 4096] = [0; 4096];
    bytes.chunks(ZEROS.len()).all(|chunk| ZEROS.get(..chunk.len()) == Some(chunk))
}

/// The holes of `[offset, offset + len)` in the store, as absolute `(start, end)` runs.
fn hole_runs(store: &BlockStore, offset: u64, len: u64) -> std::result::Result<Vec<(u64, u64)>, String> {
    let extents = store.extents(offset, len).map_err(|e| format!("failed to map the block store's holes: {e}"))?;
    let mut at = offset;
    let mut runs = Vec::new();
    for extent in extents {
        if extent.hole {
            runs.push((at, at + extent.len));
        }
        at += extent.len;
    }
    Ok(runs)
}

#[derive(Default)]
struct SetState {
    /// Freezes whose marker was applied and that are still valid: the write path copies
    /// for these.
    active: Vec<Arc<Core>>,
    /// `freeze_at_marker` registrations whose marker has not arrived.
    waiting: Vec<Waiting>,
    /// Freezes not ended yet (active, waiting or being taken), against [`FROZEN_MAX`].
    reserved: usize,
    /// The copy buffer, reused (one region).
    scratch: Vec<u8>,
    /// The last [`RECENT_MARKERS`] markers applied since the volume was opened: (seq,
    /// name), oldest first ([`Volume::saw_marker`]).
    recent: std::collections::VecDeque<(u64, Vec<u8>)>,
}

/// How many applied markers [`Volume::saw_marker`] remembers (a few hours of a schedule
/// firing every few minutes; names are at most 255 bytes).
const RECENT_MARKERS: usize = 64;

/// A volume's freezes. Held by the volume and by every [`Frozen`].
pub(crate) struct FrozenSet {
    volume: String,
    env: Arc<dyn Env>,
    dir: PathBuf,
    store: Arc<BlockStore>,
    changemap: Arc<ChangeMap>,
    size: u64,
    region_bytes: u64,
    region_count: u64,
    /// `state.active.len()`, read without the lock by the write path's fast check.
    active_count: AtomicUsize,
    state: Mutex<SetState>,
}

impl fmt::Debug for FrozenSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FrozenSet")
            .field("volume", &self.volume)
            .field("active", &self.active_count.load(Ordering::SeqCst))
            .finish()
    }
}

impl FrozenSet {
    /// The set for a volume being opened. Removes copy files a crash left behind: their
    /// freezes ended with the process.
    pub(crate) fn open(
        volume: &str,
        env: Arc<dyn Env>,
        dir: &Path,
        store: Arc<BlockStore>,
        changemap: Arc<ChangeMap>,
        size: u64,
    ) -> std::io::Result<Self> {
        for path in env.read_dir(dir)? {
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else { continue };
            if name.starts_with(COPY_FILE_PREFIX) && name.ends_with(&format!(".{COPY_FILE_EXTENSION}")) {
                env.remove_file(&path)?;
            }
        }
        let region_bytes = changemap.region_bytes();
        Ok(Self {
            volume: volume.to_string(),
            env,
            dir: dir.to_path_buf(),
            store,
            changemap,
            size,
            region_bytes,
            region_count: size.div_ceil(region_bytes),
            active_count: AtomicUsize::new(0),
            state: Mutex::new(SetState::default()),
        })
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(Error::OutOfRange { volume: self.volume.clone(), offset, len, size: self.size }),
        }
    }

    /// Counts a new freeze against [`FROZEN_MAX`] and creates its (empty) copy file.
    fn reserve(&self, name: &str) -> Result<Arc<Core>> {
        {
            let mut state = self.state.lock();
            if state.reserved >= FROZEN_MAX {
                return Err(Error::InvalidArgument(format!(
                    "volume {:?}: already {FROZEN_MAX} frozen views (live, being taken or waiting for a marker); \
                     drop one before taking snapshot {name:?}",
                    self.volume
                )));
            }
            state.reserved += 1;
        }
        let path =
            self.dir.join(format!("{COPY_FILE_PREFIX}{:016x}.{COPY_FILE_EXTENSION}", crate::random::random_u64()));
        let file = self.env.open(&path, OpenMode::CreateIfMissing).and_then(|file| file.set_len(0).map(|()| file));
        let file = match file {
            Ok(file) => file,
            Err(source) => {
                self.state.lock().reserved -= 1;
                return Err(Error::Io {
                    volume: self.volume.clone(),
                    context: format!("create the copy file {} for snapshot {name:?}", path.display()),
                    source,
                });
            }
        };
        Ok(Arc::new(Core {
            name: name.to_string(),
            seq: OnceLock::new(),
            path,
            file,
            copied: Bitmap::new(self.region_count),
            zero: Bitmap::new(self.region_count),
            released: Bitmap::new(self.region_count),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            writes: AtomicU64::new(0),
            invalid: AtomicBool::new(false),
            cause: OnceLock::new(),
            ended: AtomicBool::new(false),
        }))
    }

    /// Ends a freeze: no more copying, the reservation is given back, the file deleted.
    fn end(&self, core: &Arc<Core>, cause: &str) {
        {
            let mut state = self.state.lock();
            core.invalidate(cause);
            state.active.retain(|c| !Arc::ptr_eq(c, core));
            state.waiting.retain(|w| !Arc::ptr_eq(&w.core, core));
            self.active_count.store(state.active.len(), Ordering::SeqCst);
            if !core.ended.swap(true, Ordering::SeqCst) {
                state.reserved -= 1;
            }
        }
        if let Err(e) = self.env.remove_file(&core.path) {
            tracing::warn!(volume = %self.volume, "failed to delete the copy file {}: {e}", core.path.display());
        }
    }

    /// A snapshot marker `seq` named `name` was applied (under the journal lock):
    /// activates `own` (the freeze [`Volume::snapshot`] took for this very marker) and
    /// the oldest waiter for that name.
    pub(super) fn on_marker(self: &Arc<Self>, seq: u64, name: &[u8], own: Option<&Arc<Core>>) {
        let mut state = self.state.lock();
        if state.recent.len() == RECENT_MARKERS {
            state.recent.pop_front();
        }
        state.recent.push_back((seq, name.to_vec()));
        if let Some(core) = own {
            let _ = core.seq.set(seq);
            state.active.push(Arc::clone(core));
        }
        if let Some(index) = state.waiting.iter().position(|w| w.core.name.as_bytes() == name) {
            let waiting = state.waiting.remove(index);
            let _ = waiting.core.seq.set(seq);
            state.active.push(Arc::clone(&waiting.core));
            let frozen = Frozen { core: waiting.core, set: Arc::clone(self) };
            *waiting.slot.result.lock() = Slot::Ready(Box::new(frozen));
            waiting.slot.ready.notify_all();
        }
        self.active_count.store(state.active.len(), Ordering::SeqCst);
    }

    /// Preserves the frozen bytes of `[offset, offset + len)` before the store mutates it.
    /// Called under the journal lock by every store mutation; never fails: a freeze that
    /// cannot copy is invalidated and the mutation goes on.
    pub(super) fn before_mutation(&self, offset: u64, len: u64) {
        if len == 0 || self.active_count.load(Ordering::SeqCst) == 0 {
            return;
        }
        let mut guard = self.state.lock();
        let state = &mut *guard;
        let mut failed = false;
        for core in &state.active {
            if let Err(cause) = core.copy_before_write(self, offset, len, &mut state.scratch) {
                tracing::warn!(volume = %self.volume, "snapshot {:?} (seq {}) ends: {cause}", core.name, core.seq());
                core.invalidate(&cause);
                failed = true;
            }
        }
        if failed {
            state.active.retain(|c| c.invalid_cause().is_none());
            self.active_count.store(state.active.len(), Ordering::SeqCst);
        }
    }

    /// Invalidates every freeze at a seq after `to_seq` (a rewind discards their
    /// history) and fails every waiter.
    pub(super) fn rewound(&self, to_seq: u64) {
        let cause = format!("the volume was rewound to seq {to_seq}");
        let mut state = self.state.lock();
        state.recent.retain(|(seq, _)| *seq <= to_seq);
        for core in state.active.iter().filter(|c| c.seq() > to_seq) {
            core.invalidate(&format!("{cause}, before the marker"));
        }
        state.active.retain(|c| c.invalid_cause().is_none());
        self.active_count.store(state.active.len(), Ordering::SeqCst);
        for waiting in state.waiting.drain(..) {
            *waiting.slot.result.lock() = Slot::Failed(format!("{cause} before the marker arrived"));
            waiting.slot.ready.notify_all();
        }
    }

    /// Invalidates every freeze and fails every waiter (the volume is closing or was
    /// poisoned).
    pub(super) fn invalidate_all(&self, cause: &str) {
        let mut state = self.state.lock();
        for core in state.active.drain(..) {
            core.invalidate(cause);
        }
        self.active_count.store(0, Ordering::SeqCst);
        for waiting in state.waiting.drain(..) {
            *waiting.slot.result.lock() = Slot::Failed(cause.to_string());
            waiting.slot.ready.notify_all();
        }
    }
}

#[cfg(test)]
mod group_marker_tests {
    use std::path::Path;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use crate::storage::Env;
    use crate::testing::FaultyEnv;
    use crate::{Error, OpenOptions, PersistMode, RecordSink, ReplicaRecord, Volume, VolumeOptions, FROZEN_MAX};

    const SIZE: u64 = 1 << 20;

    fn open(env: &Arc<dyn Env>, dir: &str, name: &str) -> Volume {
        let options = VolumeOptions {
            segment_bytes: 1 << 20,
            segment_count_max: 4,
            change_region_bytes: 64 << 10,
            extent_file_bytes: 1 << 20,
        };
        let dir = Path::new(dir).join(name);
        Volume::create(Arc::clone(env), &dir, name, SIZE, &options).unwrap();
        Volume::open(Arc::clone(env), &dir, &OpenOptions::default()).unwrap().0
    }

    /// Applies every record the primary's volume appends to its standby copy at once,
    /// under the primary's journal lock: a stream that never lags, so each member's copy
    /// follows its own primary's journal, as each member's journal stream does.
    #[derive(Debug)]
    struct Forward(Arc<Volume>);

    impl RecordSink for Forward {
        fn appended(&self, record: &ReplicaRecord<'_>) {
            self.0.apply_replica(record).unwrap();
        }
    }

    fn counter(frozen: &super::Frozen) -> u64 {
        let mut block = [0u8; 4096];
        frozen.read(0, &mut block).unwrap();
        u64::from_le_bytes(block[..8].try_into().unwrap())
    }

    /// A group's markers appended by `mark_group` (no freeze on the primary) are one
    /// instant of the group, as a standby sees it: each member's standby copy, fed by its
    /// own stream, freezes at its marker (`freeze_at_marker`), and every pair of views
    /// holds `files ≤ db ≤ files + 1` while a writer writes `n` to `db` and then, once
    /// that is acknowledged, `n` to `files`. The seqs returned are the markers the views
    /// froze at.
    #[test]
    fn group_markers_are_one_instant_of_every_standby_copy() {
        let env: Arc<dyn Env> = Arc::new(FaultyEnv::new());
        let (db, files) = (open(&env, "/primary", "db"), open(&env, "/primary", "files"));
        let (db_copy, files_copy) = (Arc::new(open(&env, "/standby", "db")), Arc::new(open(&env, "/standby", "files")));
        db.set_record_sink(Some(Arc::new(Forward(Arc::clone(&db_copy)))));
        files.set_record_sink(Some(Arc::new(Forward(Arc::clone(&files_copy)))));
        let stop = AtomicBool::new(false);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let mut block = [0u8; 4096];
                    block[..8].copy_from_slice(&n.to_le_bytes());
                    db.write(0, &block, PersistMode::Durable).unwrap();
                    files.write(0, &block, PersistMode::Durable).unwrap();
                }
            });
            // Stops the writer however this thread leaves the scope (a failed check too).
            struct StopOnDrop<'a>(&'a AtomicBool);
            impl Drop for StopOnDrop<'_> {
                fn drop(&mut self) {
                    self.0.store(true, Ordering::Relaxed);
                }
            }
            let _stop = StopOnDrop(&stop);
            let mut seen_ahead = 0;
            for i in 0..2000 {
                let name = format!("g{i}");
                let waiters = [&db_copy, &files_copy].map(|copy| copy.freeze_at_marker(&name).unwrap());
                // Group order differs from name order half the time; the seqs come back
                // in the caller's order.
                let seqs = if i % 2 == 0 {
                    Volume::mark_group(&[&db, &files], &name).unwrap()
                } else {
                    let mut seqs = Volume::mark_group(&[&files, &db], &name).unwrap();
                    seqs.reverse();
                    seqs
                };
                let views: Vec<super::Frozen> =
                    waiters.iter().map(|waiter| waiter.wait(Duration::from_secs(10)).unwrap()).collect();
                assert_eq!([views[0].seq(), views[1].seq()], [seqs[0], seqs[1]], "marker {name}");
                let (a, b) = (counter(&views[0]), counter(&views[1]));
                assert!(b <= a && a <= b + 1, "group marker {i}: db at {a}, files at {b}");
                seen_ahead += usize::from(a == b + 1);
            }
            assert!(seen_ahead > 0, "no group marker fell between a pair's two writes");
        });
        // Markers only: the primary holds no freeze, so FROZEN_MAX never limits them.
        for i in 0..FROZEN_MAX + 2 {
            Volume::mark_group(&[&db, &files], &format!("again{i}")).unwrap();
        }
        assert!(db.snapshot("still-room").is_ok());
        // Refusals append nothing: a volume listed twice, a bad name.
        let before = (db.last_seq(), files.last_seq());
        assert!(matches!(Volume::mark_group(&[&db, &db], "twice"), Err(Error::InvalidArgument(_))));
        assert!(matches!(Volume::mark_group(&[&db, &files], ""), Err(Error::InvalidArgument(_))));
        assert_eq!((db.last_seq(), files.last_seq()), before);
        db.set_record_sink(None);
        files.set_record_sink(None);
    }

    /// A full journal in the middle of a group appends nothing: every member's room is
    /// checked under the locks first, the full one is checkpointed, and the group goes in
    /// once, one marker per member (a retry after appending to the first members would
    /// leave them two markers of the name, at two instants).
    #[test]
    fn a_full_journal_in_a_group_appends_each_marker_once() {
        let env: Arc<dyn Env> = Arc::new(FaultyEnv::new());
        let options = OpenOptions { background_checkpoints: false, ..OpenOptions::default() };
        let open_manual = |name: &str| {
            let volume = open(&env, "/full", name);
            drop(volume);
            Volume::open(Arc::clone(&env), &Path::new("/full").join(name), &options).unwrap().0
        };
        let (db, files) = (open_manual("db"), open_manual("files"));
        // Fill `files` (second in name order) with markers of the group marker's size until
        // one more would not fit without a checkpoint.
        let room = |volume: &Volume| volume.inner.journal.has_room_locked(&volume.inner.journal.lock_writer(), 3);
        let mut filled = 0;
        while room(&files) {
            files.mark_snapshot(&format!("{:03}", filled % 1000)).unwrap();
            filled += 1;
        }
        assert!(filled > 100, "the journal filled after {filled} markers");
        assert!(room(&db));
        let before = (db.last_seq(), files.last_seq());
        let seqs = Volume::mark_group(&[&db, &files], "grp").unwrap();
        assert_eq!(seqs, vec![before.0 + 1, before.1 + 1], "one marker each, nothing before the checkpoint");
        assert_eq!((db.last_seq(), files.last_seq()), (before.0 + 1, before.1 + 1));
        assert!(room(&files), "the full journal was checkpointed");
        // The same with freezes.
        while room(&files) {
            files.mark_snapshot("xyz").unwrap();
        }
        let before = (db.last_seq(), files.last_seq());
        let views = Volume::snapshot_group(&[&files, &db], "grq").unwrap();
        assert_eq!([views[0].seq(), views[1].seq()], [before.1 + 1, before.0 + 1]);
        assert_eq!((db.last_seq(), files.last_seq()), (before.0 + 1, before.1 + 1));
    }
}
