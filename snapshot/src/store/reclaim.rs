//! Giving back the space of removed chunks: packs whose every chunk was removed are
//! deleted; packs that are mostly dead (or small) are rewritten — their live chunks copied
//! into the current pack and synced — and then deleted.
//!
//! Crash order: a rewrite's copies are durable and in the new pack's log before the old
//! pack's log is unlinked, and the log before the pack, so a crash at any point leaves
//! either both copies (the next reclaim deletes the old pack without copying again: its
//! chunks have a copy elsewhere) or a pack without a log (an orphan, deleted once old).
//! Nothing ever points at missing bytes.
//!
//! A pack is only touched under its exclusive `flock`, which no writer (shared lock while it
//! may append) or remover (shared lock while it appends a removal) holds at the same time.
//! A pack whose log shows damage is left alone: records may be lost, and the frames they
//! named can still be found by reading the pack (each frame is preceded by its id).

use std::collections::HashSet;
use std::fs;
use std::io;
use std::os::unix::fs::FileExt;
use std::time::{Duration, SystemTime};

use super::index::Location;
use super::pack::{FileKind, ENTRY_ID_LEN, HEADER_LEN};
use super::{lock, read, write, LocalChunkStore};
use crate::chunk::check_frame;
use crate::durable::fsync_dir;
use crate::error::StoreError;
use crate::key::ChunkId;
use crate::lease::{CLOCK_MARGIN_SECS, LEASE_SECS};

/// A pack with no stored record (its writer crashed before its first sync, or is writing
/// it right now) is deleted only when neither file changed for this long: a writer's lock
/// already protects it, this covers filesystems where `flock` is not shared (NFS without
/// lock support).
const ORPHAN_AGE_SECS: u64 = (LEASE_SECS + CLOCK_MARGIN_SECS) as u64;

/// What [`LocalChunkStore::reclaim`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReclaimReport {
    /// Packs deleted because every chunk in them was removed.
    pub packs_deleted: u64,
    /// Orphaned files deleted (packs without a stored record or without a log, logs
    /// without a pack).
    pub orphans_deleted: u64,
    /// Packs rewritten: their live chunks copied to the current pack, then deleted.
    pub packs_rewritten: u64,
    /// Chunks those rewrites copied.
    pub chunks_moved: u64,
    /// Bytes those rewrites copied.
    pub bytes_moved: u64,
    /// Bytes of the files deleted.
    pub bytes_deleted: u64,
    /// Packs left alone: being written, or their log shows damage.
    pub packs_skipped: u64,
}

impl ReclaimReport {
    /// Disk space given back: bytes deleted less bytes copied.
    pub fn bytes_freed(&self) -> u64 {
        self.bytes_deleted.saturating_sub(self.bytes_moved)
    }
}

/// What to do with one pack name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plan {
    /// Every chunk removed: delete.
    Delete,
    /// No stored record, or one file of the two missing, and old: delete.
    Orphan,
    /// Mostly dead, or small: copy the live chunks, then delete.
    Rewrite,
}

impl LocalChunkStore {
    /// Deletes packs whose chunks were all removed and rewrites packs at least half dead
    /// (and small packs, when there are several, into one). Garbage collection calls this
    /// after a complete sweep. Packs another process is writing are skipped. A write or
    /// fsync failure poisons the store.
    pub fn reclaim(&self) -> Result<ReclaimReport, StoreError> {
        self.check_not_poisoned()?;
        let _one = lock(&self.reclaim_lock);
        let mut report = ReclaimReport::default();
        self.refresh()?;
        let plans = self.plan(&mut report)?;
        // The copies in the packs to rewrite, in one pass over the index for all of them.
        let victims: HashSet<u32> = {
            let state = read(&self.state);
            plans.iter().filter_map(|(name, _)| state.slot(*name)).collect()
        };
        let mut copies = read(&self.state).copies_in(&victims);
        let mut deleted_any = false;
        for (name, plan) in plans {
            let _sync = lock(&self.sync_lock);
            // Exclusive and non-blocking: a pack someone writes or removes from is skipped.
            let exclusive = self.lock_pack(name, libc::LOCK_EX | libc::LOCK_NB)?;
            let pack_exists = self.file_path(name, FileKind::Pack).exists();
            if exclusive.is_none() && pack_exists {
                report.packs_skipped += 1;
                continue;
            }
            // Re-read its log under the lock: a last removal may have landed since the plan.
            self.refresh_pack(name)?;
            let slot = read(&self.state).slot(name);
            let info = slot.and_then(|slot| read(&self.state).pack(slot).cloned());
            let victim_copies = slot.and_then(|slot| copies.remove(&slot)).unwrap_or_default();
            match plan {
                Plan::Orphan => {
                    if info.is_some_and(|i| i.stored_records > 0 || i.damaged()) {
                        continue;
                    }
                    report.orphans_deleted += 1;
                }
                Plan::Delete => {
                    if info.as_ref().is_none_or(|i| i.live_copies > 0 || i.damaged()) {
                        continue;
                    }
                    report.packs_deleted += 1;
                }
                Plan::Rewrite => {
                    let (Some(slot), Some(file)) = (slot, exclusive.as_ref()) else { continue };
                    if info.as_ref().is_none_or(|i| i.damaged()) {
                        continue;
                    }
                    if !self.copy_live(name, slot, file, &victim_copies, &mut report)? {
                        report.packs_skipped += 1;
                        continue;
                    }
                    report.packs_rewritten += 1;
                }
            }
            // The log first: from here on nothing points into the pack.
            let _no_refresh = lock(&self.refreshed);
            for kind in [FileKind::Index, FileKind::Pack] {
                let path = self.file_path(name, kind);
                let len = fs::metadata(&path).map_or(0, |m| m.len());
                match fs::remove_file(&path) {
                    Ok(()) => report.bytes_deleted += len,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(source) => {
                        self.poisoned.store(true, std::sync::atomic::Ordering::Release);
                        return Err(StoreError::Io { op: "delete pack file", path, source });
                    }
                }
            }
            deleted_any = true;
            if let Some(slot) = slot {
                write(&self.state).drop_pack(slot, &victim_copies);
                lock(&self.readers).remove(&slot);
            }
        }
        if deleted_any {
            let _sync = lock(&self.sync_lock);
            // The deletions, once for all of them (a crash before it may bring some files
            // back, each case of which is safe: see the module docs).
            self.poison_on_error(|| fsync_dir(&self.packs_dir))?;
            self.bump_generation()?;
        }
        Ok(report)
    }

    /// Decides what to do with each pack name, from the listing and what the logs say.
    fn plan(&self, report: &mut ReclaimReport) -> Result<Vec<(u64, Plan)>, StoreError> {
        let own: HashSet<u64> = {
            let writer = lock(&self.writer);
            writer.current.iter().chain(&writer.sealed).map(|p| p.name).collect()
        };
        let listing = self.list_packs_dir()?;
        let old_before = SystemTime::now().checked_sub(Duration::from_secs(ORPHAN_AGE_SECS));
        let old = |meta: &Option<fs::Metadata>| {
            meta.as_ref().is_none_or(|m| m.modified().ok().zip(old_before).is_some_and(|(t, before)| t < before))
        };
        let state = read(&self.state);
        let mut plans = Vec::new();
        let mut small = Vec::new();
        let mut names: Vec<&u64> = listing.keys().collect();
        names.sort_unstable();
        for name in names {
            let Some(files) = listing.get(name) else { continue };
            if own.contains(name) {
                continue;
            }
            let info = state.slot(*name).and_then(|slot| state.pack(slot));
            let (Some(pack), Some(_), Some(info)) = (&files.pack, &files.log, info) else {
                // One of the two files missing, or a log not readable yet (no header).
                if old(&files.pack) && old(&files.log) {
                    plans.push((*name, Plan::Orphan));
                }
                continue;
            };
            if info.damaged() {
                report.packs_skipped += 1;
                continue;
            }
            if info.stored_records == 0 {
                if old(&files.pack) && old(&files.log) {
                    plans.push((*name, Plan::Orphan));
                }
                continue;
            }
            if info.live_copies == 0 {
                plans.push((*name, Plan::Delete));
                continue;
            }
            let payload = pack.len().saturating_sub(HEADER_LEN as u64);
            let dead = payload.saturating_sub(info.live_bytes);
            if dead.saturating_mul(2) >= payload {
                plans.push((*name, Plan::Rewrite));
            } else if payload < self.pack_target / 8 {
                small.push(*name);
            }
        }
        // Several small packs (short-lived processes each start one) become one.
        if small.len() >= 2 {
            plans.extend(small.into_iter().map(|name| (name, Plan::Rewrite)));
        }
        Ok(plans)
    }

    /// Copies the live chunks of pack `slot` (`copies`, as listed before its lock was
    /// taken) that are still there and have no copy elsewhere into the current pack, and
    /// syncs. False (nothing deleted then) when a frame fails its checks: the pack is kept,
    /// so verify can see and heal the chunk.
    fn copy_live(
        &self,
        name: u64,
        slot: u32,
        file: &fs::File,
        copies: &[(ChunkId, Location)],
        report: &mut ReclaimReport,
    ) -> Result<bool, StoreError> {
        let path = self.file_path(name, FileKind::Pack);
        let mut intact = true;
        for (id, location) in copies {
            let (present, elsewhere) = {
                let state = read(&self.state);
                (state.has_copy(id, slot, location.offset), state.copies(id).len() > 1)
            };
            // Removed since the list was made, or also stored in another pack.
            if !present || elsewhere {
                continue;
            }
            let entry_at = u64::from(location.offset).saturating_sub(ENTRY_ID_LEN as u64);
            let mut entry = vec![0u8; ENTRY_ID_LEN + location.len as usize];
            match file.read_exact_at(&mut entry, entry_at) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    intact = false;
                    break;
                }
                Err(source) => return Err(StoreError::Io { op: "read pack", path, source }),
            }
            let (prefix, frame) = entry.split_at(ENTRY_ID_LEN);
            if prefix != id.as_bytes() || check_frame(frame).is_err() {
                intact = false;
                break;
            }
            let writeback = {
                let mut writer = lock(&self.writer);
                self.poison_on_error(|| {
                    self.append(&mut writer, id, frame, i64::from(location.written), Some(*location))
                })?
            };
            if let Some(writeback) = writeback {
                writeback.start();
            }
            report.chunks_moved += 1;
            report.bytes_moved += entry.len() as u64;
        }
        // The copies are durable and indexed before the old pack can go.
        self.sync_locked()?;
        Ok(intact)
    }
}
