//! What synchronous replication (in `keel-net`) needs from a volume.
//!
//! - **Primary.** [`Volume::set_record_sink`] hands every data and snapshot record to the
//!   replication layer right after it is appended, in seq order.
//! - **Standby.** [`Volume::apply_replica`] appends a primary's record with the primary's
//!   seq and epoch, so both nodes' seq spaces are identical (barriers, which are
//!   node-local, take no seq; see docs/format-journal.md).
//! - **Resync.** [`Volume::read_at_seq`] reads a range together with the seq it reflects;
//!   [`Volume::write_resync`] and [`Volume::zero_resync`] write a standby's block store
//!   directly, and [`Volume::sync_all`] makes them durable and moves the checkpoint past
//!   every older record.
//! - **Failover.** [`Volume::rewind`] discards an old primary's unconfirmed tail, and
//!   [`Volume::set_epoch`] persists the new epoch.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::durable::durable_replace;
use crate::error::{Error, Result};
use crate::format::{RecordKind, FLAG_MAY_PUNCH, SEGMENT_HEADER_LEN};
use crate::journal::{list_segments, read_segment, walk_segment, AppendError, JournalPosition, NewRecord, Origin};
use crate::replica::{RecordSink, ReplicaRecord, RewindReport};
use crate::storage::OpenMode;

use super::{CheckpointMode, Inner, Volume, SNAPSHOT_NAME_MAX_BYTES, SUPERBLOCK_FILE};

/// How often a rewind checkpoints again when records keep arriving while it runs.
const REWIND_ATTEMPTS_MAX: usize = 8;

impl Volume {
    /// Installs the sink that receives every write, zero, trim and snapshot record right
    /// after it is appended (see [`RecordSink`] for the contract), or removes it with
    /// `None`. Returns the seq of the last record appended before the sink was installed,
    /// read under the same lock: the sink's first record is exactly that seq + 1. Records
    /// appended before this call are not replayed to the new sink.
    pub fn set_record_sink(&self, sink: Option<Arc<dyn RecordSink>>) -> u64 {
        self.inner.journal.set_sink(sink)
    }

    /// Appends a record shipped by the primary with exactly its seq and epoch, and applies
    /// it to the block store and the change map like a local write. Not durable until
    /// [`Volume::flush`].
    ///
    /// The record must be a write (flags 0, `payload.len() == length`, at most the
    /// volume's largest record payload), a zero (flags at most
    /// [`FLAG_MAY_PUNCH`]) or a trim (flags 0) without payload, all inside the volume, or
    /// a snapshot (flags, offset and length 0, a UTF-8 name of 1 to
    /// [`SNAPSHOT_NAME_MAX_BYTES`] bytes); anything else is [`Error::InvalidArgument`]
    /// (or [`Error::OutOfRange`]). Its seq must be [`Volume::last_seq`] + 1, else
    /// [`Error::SeqMismatch`]; in every error case nothing is appended.
    pub fn apply_replica(&self, record: &ReplicaRecord<'_>) -> Result<()> {
        let inner = &self.inner;
        inner.validate_replica(record)?;
        inner.check_writable()?;
        let ReplicaRecord { seq, epoch, kind, flags, offset, length, payload } = *record;
        inner.append(NewRecord { kind, flags, offset, length, payload, origin: Origin::Replica { seq, epoch } })?;
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset` while no record can be appended, and returns
    /// the seq of the last record appended before the read: the bytes are exactly the
    /// volume's contents after that record. Every writer waits for the read, so keep
    /// `buf` small (resync reads at most 1 MiB at a time).
    pub fn read_at_seq(&self, offset: u64, buf: &mut [u8]) -> Result<u64> {
        let inner = &self.inner;
        inner.check_range(offset, buf.len() as u64)?;
        inner.journal.with_appends_paused(|last_seq| inner.store.read(offset, buf).map(|()| last_seq)).map_err(
            |source| Error::Io {
                volume: inner.name.clone(),
                context: format!("read {} bytes at {offset}", buf.len()),
                source,
            },
        )
    }

    /// Writes `data` at `offset` straight into the block store (no journal record, no
    /// seq) and marks the change map. Used by a standby catching up from a primary.
    ///
    /// Runs under the journal lock, so it never interleaves with a record's apply. It is
    /// not durable, and not safe against a crash, until [`Volume::sync_all`] returns: a
    /// crash before that leaves the block store in an intermediate state (some resync
    /// writes lost, and journal replay may apply records older than a resync write over
    /// it). The caller must treat the volume as inconsistent from its first resync write
    /// until `sync_all` returned, and persist that fact itself.
    pub fn write_resync(&self, offset: u64, data: &[u8]) -> Result<()> {
        let inner = &self.inner;
        inner.check_range(offset, data.len() as u64)?;
        inner.check_writable()?;
        inner.resync(&format!("write {} resync bytes at {offset}", data.len()), || {
            inner.frozen.before_mutation(offset, data.len() as u64);
            inner.store.write(offset, data)?;
            inner.changemap.mark(offset, data.len() as u64);
            Ok(())
        })
    }

    /// Makes `[offset, offset+len)` read as zeros in the block store (it may be
    /// deallocated), like [`Volume::write_resync`]: not journaled, and inconsistent after
    /// a crash until [`Volume::sync_all`] returned.
    pub fn zero_resync(&self, offset: u64, len: u64) -> Result<()> {
        let inner = &self.inner;
        inner.check_range(offset, len)?;
        inner.check_writable()?;
        inner.resync(&format!("zero {len} resync bytes at {offset}"), || {
            inner.frozen.before_mutation(offset, len);
            inner.store.zero(offset, len, true)?;
            inner.changemap.mark(offset, len);
            Ok(())
        })
    }

    /// Flushes the journal, then checkpoints even when no record arrived: syncs the block
    /// store, persists the change map and moves the superblock's checkpoint to the
    /// journal's current position. Returns the seq now checkpointed.
    ///
    /// Afterwards every resync write made before the call is durable, and replay after a
    /// crash starts past every record appended before those writes, so it can never
    /// overwrite one of them with older data.
    pub fn sync_all(&self) -> Result<u64> {
        self.inner.checkpoint(CheckpointMode::Force)
    }

    /// Discards every record after `to_seq`: they are never replayed, and the next record
    /// appended (normally through [`Volume::apply_replica`]) gets seq `to_seq + 1`. Used
    /// when an old primary returns after a failover with records its successor never
    /// confirmed. `to_seq` may also lie past [`Volume::last_seq`]: the volume then jumps
    /// forward (a standby that missed records it receives by resync instead) and nothing is
    /// discarded; the seqs in between were never held here, so `durable_seq` covers them
    /// vacuously, and the caller must treat the copy as inconsistent until the resync.
    ///
    /// The block store may still hold effects of the discarded records, and the change
    /// map keeps their regions marked: the caller resyncs `changed_since(to_seq)` from
    /// the new primary (and treats the volume as inconsistent until that resync's
    /// [`Volume::sync_all`]). Stop writers first: a flush waiting for a discarded record
    /// fails with [`Error::InvalidArgument`], and records appended while this runs are
    /// discarded too.
    ///
    /// Crash safety: the journal is flushed and checkpointed first; then a fresh segment
    /// whose first seq is `to_seq + 1` is started, and the superblock is written with the
    /// checkpoint at that segment's start and seq `to_seq`. That superblock write is the
    /// single commit point: before it the volume reopens as it was (recovery never walks
    /// into the fresh segment, whose first seq does not follow the old journal's last);
    /// after it, rewound.
    ///
    /// Frozen views of markers after `to_seq` end (their reads fail), and pending
    /// [`Volume::freeze_at_marker`] waits fail. The change map forgets its cut points after
    /// `to_seq` (their layers merge into the live bitmap, durably, before the commit), so
    /// no layer claims to be complete for seqs the new history reuses.
    pub fn rewind(&self, to_seq: u64) -> Result<RewindReport> {
        let inner = &self.inner;
        inner.check_writable()?;
        // Before anything changes: a rewind never mutates the block store, and a view of
        // a marker it keeps stays exact.
        inner.frozen.rewound(to_seq);
        let mut checkpointed_data_seq = inner.checkpoint_lock.lock();
        for _ in 0..REWIND_ATTEMPTS_MAX {
            let forward = to_seq > inner.journal.last_seq();
            let position = inner.checkpoint_locked(&mut checkpointed_data_seq, CheckpointMode::Force)?;
            if !forward && position.last_seq < to_seq {
                continue;
            }
            let (records, journal_bytes_found, fully_counted) =
                if forward { (0, 0, true) } else { inner.count_discarded(position, to_seq) };
            let report =
                RewindReport { from_last_seq: position.last_seq, to_seq, records, journal_bytes_found, fully_counted };
            if position.last_seq == to_seq {
                return Ok(report);
            }
            let rewound = inner.journal.rewind(
                position,
                to_seq,
                |at| {
                    // Under the journal lock, so no marker cuts meanwhile; durable before
                    // the commit (removed layer files included), so a crash never pairs
                    // the new history with layers of the discarded one.
                    if inner.changemap.truncate_after(to_seq) {
                        inner
                            .changemap
                            .persist()
                            .map_err(|e| inner.poison_with(format!("failed to persist the change map: {e}")))?;
                    }
                    inner.write_superblock(|sb| {
                        sb.checkpoint_seq = to_seq;
                        sb.checkpoint_segment = at.segment_no;
                        sb.checkpoint_offset = SEGMENT_HEADER_LEN as u64;
                    })
                },
                |e| match e {
                    AppendError::Io(context, e) => inner.poison_with(format!("failed to {context}: {e}")),
                    AppendError::Full | AppendError::SeqMismatch { .. } => Error::InvalidArgument(format!(
                        "volume {:?}: no journal slot is free for the rewind",
                        inner.name
                    )),
                },
            )?;
            if rewound.is_some() {
                *checkpointed_data_seq = to_seq;
                tracing::info!(
                    volume = %inner.name,
                    "rewound from seq {} to seq {to_seq}: discarded {records} records ({journal_bytes_found} payload bytes{})",
                    position.last_seq,
                    if fully_counted { "" } else { ", more were already checkpointed" }
                );
                return Ok(report);
            }
        }
        Err(Error::InvalidArgument(format!(
            "volume {:?}: records kept arriving during the rewind to seq {to_seq}; stop writers first",
            inner.name
        )))
    }

    /// Raises the epoch: persists it in the superblock (durably, before returning) and
    /// makes records appended from now on carry it. `epoch` must be at least the current
    /// one ([`Error::InvalidArgument`] otherwise); the same epoch again does nothing.
    pub fn set_epoch(&self, epoch: u64) -> Result<()> {
        let inner = &self.inner;
        inner.check_writable()?;
        let _superblock_writer = inner.checkpoint_lock.lock();
        let current = inner.superblock.lock().epoch;
        if epoch < current {
            return Err(Error::InvalidArgument(format!(
                "volume {:?}: epoch {epoch} is below the current epoch {current}",
                inner.name
            )));
        }
        if epoch == current {
            return Ok(());
        }
        inner.write_superblock(|sb| sb.epoch = epoch)?;
        inner.journal.set_epoch(epoch);
        Ok(())
    }

    /// The current epoch (that of records appended from now on).
    pub fn epoch(&self) -> u64 {
        self.inner.journal.epoch()
    }

    /// Seq of the last record appended (0 when none); barriers take no seq.
    pub fn last_seq(&self) -> u64 {
        self.inner.journal.last_seq()
    }

    /// Every record up to this seq is durable.
    pub fn durable_seq(&self) -> u64 {
        self.inner.journal.durable_seq()
    }

    /// Why the volume refuses writes, once poisoned. Takes no lock, unlike
    /// [`Volume::status`], so it never waits behind a writer that holds the journal.
    pub fn poisoned(&self) -> Option<String> {
        self.inner.poison.get().cloned()
    }
}

impl Inner {
    fn validate_replica(&self, record: &ReplicaRecord<'_>) -> Result<()> {
        let invalid = |why: String| {
            Err(Error::InvalidArgument(format!("volume {:?}: replicated record seq {}: {why}", self.name, record.seq)))
        };
        let ReplicaRecord { kind, flags, offset, length, payload, .. } = *record;
        match kind {
            RecordKind::Write | RecordKind::Zero | RecordKind::Trim => {
                let flags_allowed = if kind == RecordKind::Zero { FLAG_MAY_PUNCH } else { 0 };
                if flags & !flags_allowed != 0 {
                    return invalid(format!("flags {flags:#x} are not valid for a {}", kind.name()));
                }
                let payload_expected = if kind == RecordKind::Write { length } else { 0 };
                if payload.len() as u64 != payload_expected {
                    return invalid(format!("{} payload bytes for a {} of {length} bytes", payload.len(), kind.name()));
                }
                if payload.len() > self.max_payload {
                    return invalid(format!(
                        "a payload of {} bytes is larger than this volume's records allow ({} bytes)",
                        payload.len(),
                        self.max_payload
                    ));
                }
                self.check_range(offset, length)
            }
            RecordKind::Snapshot => {
                if flags != 0 || offset != 0 || length != 0 {
                    return invalid("a snapshot must have flags, offset and length 0".to_string());
                }
                if payload.is_empty() || payload.len() > SNAPSHOT_NAME_MAX_BYTES {
                    return invalid(format!("snapshot name must be 1-{SNAPSHOT_NAME_MAX_BYTES} bytes"));
                }
                if std::str::from_utf8(payload).is_err() {
                    return invalid("snapshot name is not UTF-8".to_string());
                }
                Ok(())
            }
            RecordKind::Barrier => invalid("barriers are node-local and never replicated".to_string()),
        }
    }

    /// Runs a resync write under the journal lock; a failure poisons the volume.
    fn resync(&self, what: &str, write: impl FnOnce() -> std::io::Result<()>) -> Result<()> {
        self.journal.with_appends_paused(|_| write()).map_err(|e| self.poison_with(format!("failed to {what}: {e}")))
    }

    /// Writes the superblock with `change` applied. The caller holds `checkpoint_lock`,
    /// which serialises every superblock write. A failure poisons the volume, and the
    /// in-memory copy keeps the old values.
    fn write_superblock(&self, change: impl FnOnce(&mut crate::format::Superblock)) -> Result<()> {
        let mut next = self.superblock.lock().clone();
        change(&mut next);
        durable_replace(self.env.as_ref(), &self.dir.join(SUPERBLOCK_FILE), &next.encode())
            .map_err(|e| self.poison_with(format!("failed to write the superblock: {e}")))?;
        *self.superblock.lock() = next;
        Ok(())
    }

    /// Counts the records with seq in `(to_seq, position.last_seq]` still in the journal,
    /// and their payload bytes, walking back from the writer's segment. Returns whether
    /// every one of them was found. Reads only; a failure just makes the count partial.
    fn count_discarded(&self, position: JournalPosition, to_seq: u64) -> (u64, u64, bool) {
        let (volume_id, segment_bytes) = {
            let sb = self.superblock.lock();
            (sb.volume_id, sb.segment_bytes)
        };
        let mut records = 0u64;
        let mut bytes = 0u64;
        let segments = match list_segments(self.env.as_ref(), &self.dir, volume_id) {
            Ok(segments) => segments,
            Err(e) => {
                tracing::warn!(volume = %self.name, "failed to list the journal segments to count a rewind: {e}");
                return (0, 0, false);
            }
        };
        let by_no: BTreeMap<u64, _> =
            segments.iter().filter_map(|s| s.header.map(|h| (h.segment_no, (s, h)))).collect();
        // Records of this history in segment `no` have seqs below `upper`; a segment
        // before a previous rewind's boundary also holds records of the discarded history
        // above that, which `upper` leaves out.
        let mut upper = position.last_seq + 1;
        let mut no = position.segment_no;
        let mut end = Some(position.offset as usize);
        while let Some((info, header)) = by_no.get(&no) {
            let data = match self.env.open(&info.path, OpenMode::Existing).and_then(|f| read_segment(&f, segment_bytes))
            {
                Ok(data) => data,
                Err(e) => {
                    tracing::warn!(volume = %self.name, "failed to read {} to count a rewind: {e}", info.path.display());
                    return (records, bytes, false);
                }
            };
            let next_seq = walk_segment(&data, header.first_seq, header.nonce, end, |record, payload| {
                if record.kind != RecordKind::Barrier && record.seq > to_seq && record.seq < upper {
                    records += 1;
                    bytes += payload.len() as u64;
                }
            });
            if next_seq < upper {
                // The segment ends before the records the next one starts with: a gap.
                return (records, bytes, false);
            }
            if header.first_seq <= to_seq + 1 {
                return (records, bytes, true);
            }
            upper = header.first_seq;
            end = None;
            let Some(previous) = no.checked_sub(1) else { break };
            no = previous;
        }
        (records, bytes, false)
    }
}
