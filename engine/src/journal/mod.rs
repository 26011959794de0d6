//! The write journal: numbered records in preallocated, reusable segment files.
//!
//! Records are appended to the active segment under one lock, so their order in the
//! journal is the volume's total write order. When the active segment is full the writer
//! rolls into a free slot (one whose records are all below the checkpoint) or creates a
//! new one, up to `segment_count_max`; beyond that the caller must checkpoint first, so
//! the journal never grows without bound. Durability comes from [`DurableTracker`]: one
//! `fdatasync` of the segments written since the last sync serves every flusher waiting
//! at that moment, after which a barrier record notes the new durable watermark (recovery
//! uses it to tell a torn tail from corruption; see docs/format-journal.md).
//!
//! Only write, zero, trim and snapshot records take a sequence number. A barrier carries
//! the seq of the record before it: barriers are node-local (each node group-commits on
//! its own schedule), and a standby must give every replicated record the same seq as its
//! primary did. Journals written before this change have barriers that took a seq of
//! their own; the scan reads both forms.

mod group_commit;
mod scan;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::format::{RecordHeader, RecordKind, SegmentHeader, SEGMENT_HEADER_COPY_LEN, SEGMENT_HEADER_LEN};
use crate::random::random_u64;
use crate::replica::{RecordSink, ReplicaRecord};
use crate::storage::{Env, OpenMode, Storage};

pub(crate) use group_commit::{DurableTracker, WaitError};
pub use scan::{list_segments, scan, ScanEnd, ScanParams, ScannedRecord, SegmentInfo, TornTail};
pub(crate) use scan::{read_segment, walk_segment};

/// Directory of the segment files inside a volume directory.
pub(crate) const JOURNAL_DIR: &str = "journal";
/// A zero-filled slot file prepared in the background, renamed into place by a roll.
const SPARE_FILE: &str = "spare.tmp";

/// A slot the next segment may reuse: not the active one, and holding no segment or only
/// one the last checkpoint made obsolete.
fn free_slot(w: &Writer) -> Option<usize> {
    w.slots
        .iter()
        .enumerate()
        .position(|(i, s)| i != w.active && s.segment_no.is_none_or(|no| no < w.checkpoint_segment_no))
}

/// File name of segment slot `index`.
pub(crate) fn slot_path(journal_dir: &Path, index: usize) -> PathBuf {
    journal_dir.join(format!("slot-{index:04}.seg"))
}

/// Where the writer stands: everything before this point has been appended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JournalPosition {
    /// Segment being written.
    pub segment_no: u64,
    /// Byte offset of the next record in that segment.
    pub offset: u64,
    /// Sequence number of the last appended record (0 when none).
    pub last_seq: u64,
    /// Sequence number of the last record that changed data (not a barrier or marker).
    pub last_data_seq: u64,
}

/// Why an append could not proceed.
#[derive(Debug)]
pub(crate) enum AppendError {
    /// Every segment slot holds records above the checkpoint: checkpoint, then retry.
    Full,
    /// An I/O call failed: the volume must poison itself.
    Io(String, std::io::Error),
    /// A replicated record's seq is not the next one; nothing was appended.
    SeqMismatch {
        /// The seq the next record must carry.
        expected: u64,
    },
}

/// A record to append (the journal assigns or checks its seq).
#[derive(Debug, Clone, Copy)]
pub(crate) struct NewRecord<'a> {
    pub(crate) kind: RecordKind,
    pub(crate) flags: u8,
    pub(crate) offset: u64,
    pub(crate) length: u64,
    pub(crate) payload: &'a [u8],
    pub(crate) origin: Origin,
}

impl<'a> NewRecord<'a> {
    /// A record written by this node: it gets the next seq and the writer's epoch.
    pub(crate) fn local(kind: RecordKind, flags: u8, offset: u64, length: u64, payload: &'a [u8]) -> Self {
        Self { kind, flags, offset, length, payload, origin: Origin::Local }
    }
}

/// Where a record's seq and epoch come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    /// Written here: the next seq (none for a barrier) and the writer's epoch.
    Local,
    /// Shipped by a primary: exactly this seq, which must be the next one, and its epoch.
    Replica { seq: u64, epoch: u64 },
}

/// What a rewind found and where it left the writer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RewoundTo {
    /// The fresh segment the journal continues in (replay starts at its first record).
    pub(crate) segment_no: u64,
}

#[derive(Debug)]
struct Slot {
    file: Arc<dyn Storage>,
    /// The segment the slot holds, or `None` when it is free.
    segment_no: Option<u64>,
}

impl Writer {
    fn has_free_slot(&self) -> bool {
        self.slots
            .iter()
            .enumerate()
            .any(|(i, s)| i != self.active && s.segment_no.is_none_or(|no| no < self.checkpoint_segment_no))
    }
}

/// The journal lock, held (see [`Journal::lock_writer`]).
pub(crate) struct WriterGuard<'a>(parking_lot::MutexGuard<'a, Writer>);

#[derive(Debug)]
struct Writer {
    slots: Vec<Slot>,
    active: usize,
    segment_no: u64,
    offset: u64,
    next_seq: u64,
    /// Highest seq of a record that changes data (not a barrier or snapshot marker).
    last_data_seq: u64,
    epoch: u64,
    /// The active segment's nonce, which every record's crc starts with.
    nonce: u64,
    /// Segments written since the last sync other than the active one.
    unsynced: Vec<Arc<dyn Storage>>,
    /// Slots whose segment number is below this hold only checkpointed records.
    checkpoint_segment_no: u64,
    bytes_since_checkpoint: u64,
    /// `journal/spare.tmp` is complete and synced.
    spare_ready: bool,
    /// Called with every non-barrier record right after it is appended.
    sink: Option<Arc<dyn RecordSink>>,
    /// Write barriers the old way, each taking a seq of its own, so tests can check that
    /// recovery still reads journals written before barriers stopped taking seqs.
    #[cfg(test)]
    legacy_barriers: bool,
}

/// The journal of one volume.
#[derive(Debug)]
pub(crate) struct Journal {
    env: Arc<dyn Env>,
    dir: PathBuf,
    volume_id: [u8; 16],
    segment_bytes: u64,
    segment_count_max: usize,
    writer: Mutex<Writer>,
    tracker: DurableTracker,
    /// Set by a roll that left no free slot and no spare: the owner should call
    /// [`Journal::prepare_spare`] from a background thread.
    spare_wanted: std::sync::atomic::AtomicBool,
    /// Mirrors of the writer's last seq and epoch, stored under the writer lock, so
    /// accessors need not wait for an append (which may be rolling a segment).
    last_seq: AtomicU64,
    epoch: AtomicU64,
}

/// Where the writer resumes after recovery.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ResumePoint {
    pub(crate) segment_no: u64,
    pub(crate) nonce: u64,
    pub(crate) offset: u64,
    pub(crate) next_seq: u64,
    pub(crate) last_data_seq: u64,
    pub(crate) epoch: u64,
    pub(crate) checkpoint_segment_no: u64,
}

impl Journal {
    /// Creates slot 0 holding segment 1, empty, starting at seq 1.
    pub(crate) fn create(
        env: &Arc<dyn Env>,
        volume_dir: &Path,
        volume_id: [u8; 16],
        segment_bytes: u64,
        epoch: u64,
    ) -> std::io::Result<()> {
        let dir = volume_dir.join(JOURNAL_DIR);
        env.create_dir_all(&dir)?;
        let file = new_slot_file(env.as_ref(), &slot_path(&dir, 0), segment_bytes)?;
        let header = SegmentHeader { segment_no: 1, first_seq: 1, epoch, volume_id, nonce: random_u64() };
        write_slot_header(file.as_ref(), &header)?;
        env.sync_dir(&dir)
    }

    /// Opens the journal's slots and positions the writer at `resume` (found by recovery).
    /// Slots holding segments past the resume point are freed: their records were
    /// discarded by recovery and must never be replayed later.
    pub(crate) fn open(
        env: Arc<dyn Env>,
        volume_dir: &Path,
        volume_id: [u8; 16],
        segment_bytes: u64,
        segment_count_max: usize,
        segments: &[SegmentInfo],
        resume: ResumePoint,
    ) -> std::io::Result<Self> {
        let dir = volume_dir.join(JOURNAL_DIR);
        // A spare left by a previous run may be incomplete: prepare a new one later.
        if env.exists(&dir.join(SPARE_FILE)) {
            env.remove_file(&dir.join(SPARE_FILE))?;
        }
        let mut slots = Vec::new();
        let mut active = None;
        for (index, info) in segments.iter().enumerate() {
            debug_assert_eq!(info.path, slot_path(&dir, index));
            let file = env.open(&info.path, OpenMode::Existing)?;
            let segment_no = info.header.map(|h| h.segment_no).filter(|&no| no <= resume.segment_no);
            if segment_no == Some(resume.segment_no) {
                active = Some(index);
            }
            match info.header {
                // A segment beyond the end of the recovered journal: erase its header so
                // no later recovery can mistake its records for a continuation.
                Some(_) if segment_no.is_none() => erase_slot_header(file.as_ref())?,
                // One copy torn by a crash: rewrite it from the good one now, before a
                // crash during the slot's next reuse could tear the other.
                Some(header) => repair_slot_header(file.as_ref(), &header)?,
                None => {}
            }
            slots.push(Slot { file, segment_no });
        }
        let active = active.ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("journal segment {} not found in {}", resume.segment_no, dir.display()),
            )
        })?;
        Ok(Self {
            env,
            dir,
            volume_id,
            segment_bytes,
            segment_count_max,
            writer: Mutex::new(Writer {
                slots,
                active,
                segment_no: resume.segment_no,
                offset: resume.offset,
                next_seq: resume.next_seq,
                last_data_seq: resume.last_data_seq,
                epoch: resume.epoch,
                nonce: resume.nonce,
                unsynced: Vec::new(),
                checkpoint_segment_no: resume.checkpoint_segment_no,
                bytes_since_checkpoint: 0,
                spare_ready: false,
                sink: None,
                #[cfg(test)]
                legacy_barriers: false,
            }),
            tracker: DurableTracker::new(resume.next_seq - 1),
            spare_wanted: std::sync::atomic::AtomicBool::new(true),
            last_seq: AtomicU64::new(resume.next_seq - 1),
            epoch: AtomicU64::new(resume.epoch),
        })
    }

    /// Largest payload one record may carry: half a segment, so a record always fits in
    /// an empty one, and at most 32 MiB.
    pub(crate) fn max_payload(segment_bytes: u64) -> usize {
        let half = (segment_bytes - SEGMENT_HEADER_LEN as u64) / 2;
        (half.min(32 << 20) as usize) & !4095
    }

    /// Appends one record and, still holding the journal lock, runs `apply` (which
    /// applies the record to the block store and the change map), so the store sees
    /// records in journal order, then hands the record to the sink, if one is set.
    /// Returns the record's seq (for a barrier: the seq of the record before it).
    pub(crate) fn append(
        &self,
        record: NewRecord<'_>,
        apply: &dyn Fn(u64) -> std::io::Result<()>,
    ) -> Result<u64, AppendError> {
        self.append_locked(&mut self.lock_writer(), record, apply)
    }

    /// Takes the journal lock: no record is appended to this journal until the guard is
    /// dropped, except through [`Journal::append_locked`] with it. A consistency group's
    /// snapshot holds its volumes' locks together (always in one order: by volume name).
    pub(crate) fn lock_writer(&self) -> WriterGuard<'_> {
        WriterGuard(self.writer.lock())
    }

    /// Whether a local record with `payload_len` payload bytes can be appended now without
    /// [`AppendError::Full`]. Exact while the caller holds `guard`: only the writer moves
    /// the segments, and a checkpoint only frees them. A consistency group checks every
    /// member before it appends any marker, so its markers go in all or none.
    pub(crate) fn has_room_locked(&self, guard: &WriterGuard<'_>, payload_len: usize) -> bool {
        let w = &*guard.0;
        let record_len = RecordHeader::encoded_len(payload_len) as u64;
        w.offset + record_len <= self.segment_bytes || free_slot(w).is_some() || w.slots.len() < self.segment_count_max
    }

    /// [`Journal::append`] with the journal lock already held.
    pub(crate) fn append_locked(
        &self,
        guard: &mut WriterGuard<'_>,
        record: NewRecord<'_>,
        apply: &dyn Fn(u64) -> std::io::Result<()>,
    ) -> Result<u64, AppendError> {
        let w = &mut *guard.0;
        let NewRecord { kind, flags, offset, length, payload, origin } = record;
        let barrier = kind == RecordKind::Barrier;
        #[cfg(test)]
        let barrier_takes_seq = barrier && w.legacy_barriers;
        #[cfg(not(test))]
        let barrier_takes_seq = false;
        let takes_seq = !barrier || barrier_takes_seq;
        let (seq, epoch) = match origin {
            Origin::Local if takes_seq => (w.next_seq, w.epoch),
            Origin::Local => (w.next_seq - 1, w.epoch),
            Origin::Replica { seq, epoch } => {
                // Checked before anything is written: a mismatch leaves the journal as it was.
                if barrier || seq != w.next_seq {
                    return Err(AppendError::SeqMismatch { expected: w.next_seq });
                }
                (seq, epoch)
            }
        };
        let record_len = RecordHeader::encoded_len(payload.len()) as u64;
        if w.offset + record_len > self.segment_bytes {
            self.roll(w)?;
        }
        let header = RecordHeader::new(kind, flags, seq, epoch, offset, length).encode_header(payload, w.nonce);
        let padding = [0u8; crate::format::RECORD_ALIGN];
        let padding = &padding[..RecordHeader::padding_len(payload.len())];
        let file = Arc::clone(&w.slots[w.active].file);
        file.write_vectored_at(&[&header, payload, padding], w.offset)
            .map_err(|e| AppendError::Io(format!("append record seq {seq} to journal segment {}", w.segment_no), e))?;
        w.offset += record_len;
        if takes_seq {
            w.next_seq += 1;
            self.last_seq.store(seq, Ordering::Release);
        }
        w.bytes_since_checkpoint += record_len;
        if matches!(kind, RecordKind::Write | RecordKind::Zero | RecordKind::Trim) {
            w.last_data_seq = seq;
        }
        apply(seq).map_err(|e| AppendError::Io(format!("apply record seq {seq} to the block store"), e))?;
        if !barrier {
            if let Some(sink) = &w.sink {
                sink.appended(&ReplicaRecord { seq, epoch, kind, flags, offset, length, payload });
            }
        }
        Ok(seq)
    }

    fn roll(&self, w: &mut Writer) -> Result<(), AppendError> {
        let (index, nonce) = self.start_segment(w, w.next_seq)?;
        let old = Arc::clone(&w.slots[w.active].file);
        w.unsynced.push(old);
        w.active = index;
        w.segment_no += 1;
        w.nonce = nonce;
        w.offset = SEGMENT_HEADER_LEN as u64;
        if !w.spare_ready && w.slots.len() < self.segment_count_max && !w.has_free_slot() {
            self.spare_wanted.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    }

    /// Writes the header of segment `w.segment_no + 1`, starting at `first_seq`, into a
    /// free slot (or a new one) and returns the slot's index and the segment's nonce. The
    /// writer still points at the old segment: the caller moves it.
    fn start_segment(&self, w: &mut Writer, first_seq: u64) -> Result<(usize, u64), AppendError> {
        let io = |what: &str, e| AppendError::Io(format!("{what} for journal segment {}", w.segment_no + 1), e);
        let index = match free_slot(w) {
            Some(index) => index,
            None if w.slots.len() < self.segment_count_max => {
                let path = slot_path(&self.dir, w.slots.len());
                let file = if w.spare_ready {
                    // The background thread zero-filled it already: a rename, not a stall.
                    w.spare_ready = false;
                    self.env.rename(&self.dir.join(SPARE_FILE), &path).map_err(|e| io("install the spare slot", e))?;
                    self.env.open(&path, OpenMode::Existing).map_err(|e| io("open the spare slot", e))?
                } else {
                    new_slot_file(self.env.as_ref(), &path, self.segment_bytes)
                        .map_err(|e| io("create a slot file", e))?
                };
                self.env.sync_dir(&self.dir).map_err(|e| io("sync the journal directory", e))?;
                w.slots.push(Slot { file, segment_no: None });
                w.slots.len() - 1
            }
            None => return Err(AppendError::Full),
        };
        let segment_no = w.segment_no + 1;
        let nonce = random_u64();
        let header = SegmentHeader { segment_no, first_seq, epoch: w.epoch, volume_id: self.volume_id, nonce };
        let file = Arc::clone(&w.slots[index].file);
        // From here the slot no longer holds its old segment, whatever happens next.
        w.slots[index].segment_no = None;
        write_slot_header(file.as_ref(), &header).map_err(|e| io("write the header", e))?;
        w.slots[index].segment_no = Some(segment_no);
        Ok((index, nonce))
    }

    /// True once after a roll (or the open) that left the journal wanting a spare slot.
    pub(crate) fn take_spare_wanted(&self) -> bool {
        self.spare_wanted.swap(false, std::sync::atomic::Ordering::Relaxed)
    }

    /// True when the next roll would have to create a slot file and no spare is ready.
    pub(crate) fn wants_spare(&self) -> bool {
        let w = self.writer.lock();
        !w.spare_ready && w.slots.len() < self.segment_count_max && !w.has_free_slot()
    }

    /// Zero-fills and syncs `journal/spare.tmp` outside the journal lock, so that the roll
    /// that needs a new slot only renames it. Called from the checkpointer thread only.
    pub(crate) fn prepare_spare(&self) -> std::io::Result<()> {
        if !self.wants_spare() {
            return Ok(());
        }
        new_slot_file(self.env.as_ref(), &self.dir.join(SPARE_FILE), self.segment_bytes)?;
        self.writer.lock().spare_ready = true;
        Ok(())
    }

    /// Makes every record appended so far durable (group commit), then notes the new
    /// watermark in a barrier record. Costs nothing when only barriers arrived since the
    /// last sync: they take no seq.
    pub(crate) fn flush(&self) -> Result<u64, WaitError> {
        self.flush_to(self.last_seq())
    }

    /// Makes every record up to `target` durable.
    pub(crate) fn flush_to(&self, target: u64) -> Result<u64, WaitError> {
        self.tracker.wait_durable(target, || {
            let (covered, files) = {
                let mut w = self.writer.lock();
                let mut files = std::mem::take(&mut w.unsynced);
                files.push(Arc::clone(&w.slots[w.active].file));
                (w.next_seq - 1, files)
            };
            for file in files {
                file.sync().map_err(|e| format!("sync journal segment: {e}"))?;
            }
            // Best effort: a barrier that cannot be appended (journal full) only narrows
            // what recovery can prove, never what is durable.
            let barrier = NewRecord {
                kind: RecordKind::Barrier,
                flags: 0,
                offset: covered,
                length: 0,
                payload: &[],
                origin: Origin::Local,
            };
            match self.append(barrier, &|_| Ok(())) {
                Ok(_) | Err(AppendError::Full) | Err(AppendError::SeqMismatch { .. }) => {}
                Err(AppendError::Io(context, e)) => return Err(format!("{context}: {e}")),
            }
            Ok(covered)
        })
    }

    pub(crate) fn durable_seq(&self) -> u64 {
        self.tracker.durable_seq()
    }

    pub(crate) fn poison(&self, cause: String) {
        self.tracker.poison(cause);
    }

    /// The writer's position and the journal bytes written since the last checkpoint,
    /// read together.
    pub(crate) fn checkpoint_snapshot(&self) -> (JournalPosition, u64) {
        let w = self.writer.lock();
        let position = JournalPosition {
            segment_no: w.segment_no,
            offset: w.offset,
            last_seq: w.next_seq - 1,
            last_data_seq: w.last_data_seq,
        };
        (position, w.bytes_since_checkpoint)
    }

    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Seq of the last record appended (barriers take none).
    pub(crate) fn last_seq(&self) -> u64 {
        self.last_seq.load(Ordering::Acquire)
    }

    /// Makes records appended from now on carry `epoch`.
    pub(crate) fn set_epoch(&self, epoch: u64) {
        let mut w = self.writer.lock();
        w.epoch = epoch;
        self.epoch.store(epoch, Ordering::Release);
    }

    /// Makes barriers take a seq of their own, as journals written before barriers
    /// carried the seq of the record before them did.
    #[cfg(test)]
    pub(crate) fn write_legacy_barriers(&self, on: bool) {
        self.writer.lock().legacy_barriers = on;
    }

    /// Installs (or removes) the sink that sees every non-barrier record appended from
    /// now on; returns the seq of the last record appended before it was installed.
    pub(crate) fn set_sink(&self, sink: Option<Arc<dyn RecordSink>>) -> u64 {
        let mut w = self.writer.lock();
        w.sink = sink;
        w.next_seq - 1
    }

    /// Runs `f` with the journal lock held, so no record is appended (or applied)
    /// meanwhile; `f` gets the seq of the last record appended.
    pub(crate) fn with_appends_paused<T>(&self, f: impl FnOnce(u64) -> T) -> T {
        let w = self.writer.lock();
        f(w.next_seq - 1)
    }

    /// The rewind's commit, with no sync in flight and the journal lock held: if no
    /// record was appended since `expected` (the position the caller checkpointed;
    /// barriers may have been, by the checkpoint's own flush, as long as they did not
    /// roll into a new segment), writes the header of a
    /// fresh segment whose first seq is `to_seq + 1`, then runs `commit` (which makes the
    /// superblock name that segment as the checkpoint, at seq `to_seq`), and only then
    /// moves the writer there. Returns `Ok(None)` when records arrived since the
    /// checkpoint (nothing was changed); the caller checkpoints and counts again.
    pub(crate) fn rewind<E>(
        &self,
        expected: JournalPosition,
        to_seq: u64,
        commit: impl FnOnce(RewoundTo) -> Result<(), E>,
        io_error: impl Fn(AppendError) -> E,
    ) -> Result<Option<JournalPosition>, E> {
        self.tracker.exclusive(|| {
            let mut w = self.writer.lock();
            // A barrier that rolled into a new segment would leave no slot free for sure.
            if w.next_seq - 1 != expected.last_seq || w.segment_no != expected.segment_no {
                return Ok((None, None));
            }
            let (index, nonce) = self.start_segment(&mut w, to_seq + 1).map_err(io_error)?;
            let segment_no = w.segment_no + 1;
            if let Err(e) = commit(RewoundTo { segment_no }) {
                // Not committed: the old superblock still rules and the fresh segment is
                // abandoned (recovery erases its header; a roll may reuse the slot).
                w.slots[index].segment_no = None;
                return Err(e);
            }
            // Committed: the superblock names the fresh segment. Everything before it,
            // including the discarded records, is below the checkpoint.
            w.active = index;
            w.segment_no = segment_no;
            w.nonce = nonce;
            w.offset = SEGMENT_HEADER_LEN as u64;
            w.next_seq = to_seq + 1;
            w.last_data_seq = to_seq;
            w.checkpoint_segment_no = segment_no;
            w.bytes_since_checkpoint = 0;
            self.last_seq.store(to_seq, Ordering::Release);
            let rewound = JournalPosition { segment_no, offset: w.offset, last_seq: to_seq, last_data_seq: to_seq };
            Ok((Some(rewound), Some(to_seq)))
        })
    }

    pub(crate) fn bytes_since_checkpoint(&self) -> u64 {
        self.writer.lock().bytes_since_checkpoint
    }

    pub(crate) fn segment_count(&self) -> usize {
        self.writer.lock().slots.len()
    }

    /// Frees every slot whose segment lies wholly before `position`, which is now in the
    /// block store and durable there.
    pub(crate) fn checkpointed(&self, position: JournalPosition, bytes_covered: u64) {
        let mut w = self.writer.lock();
        w.checkpoint_segment_no = w.checkpoint_segment_no.max(position.segment_no);
        w.bytes_since_checkpoint = w.bytes_since_checkpoint.saturating_sub(bytes_covered);
    }
}

/// A new slot file, written with zeros end to end and synced. Written blocks (unlike
/// merely fallocated, "unwritten" ones) let every later fdatasync of the segment skip the
/// extent conversion in the filesystem journal: measured 104-136 µs vs 84-90 µs per
/// fdatasync on this kind of machine (docs/benchmarks.md).
fn new_slot_file(env: &dyn Env, path: &Path, segment_bytes: u64) -> std::io::Result<Arc<dyn Storage>> {
    let file = env.open(path, OpenMode::CreateIfMissing)?;
    file.set_len(0)?;
    crate::storage::write_zeros(file.as_ref(), 0, segment_bytes)?;
    file.sync()?;
    Ok(file)
}

/// Writes both header copies of a slot, A then B, each synced before the next step, so a
/// crash leaves at least one readable copy (see `SegmentHeader::decode_slot`). Syncing here
/// also means a header is durable before any record in its segment can be acknowledged.
fn write_slot_header(file: &dyn Storage, header: &SegmentHeader) -> std::io::Result<()> {
    let copy = header.encode();
    file.write_at(&copy, 0)?;
    file.sync()?;
    file.write_at(&copy, SEGMENT_HEADER_COPY_LEN as u64)?;
    file.sync()
}

/// Rewrites, one at a time and synced, each header copy that does not hold `header`.
fn repair_slot_header(file: &dyn Storage, header: &SegmentHeader) -> std::io::Result<()> {
    let copy = header.encode();
    let mut found = vec![0u8; SEGMENT_HEADER_COPY_LEN];
    for at in [0, SEGMENT_HEADER_COPY_LEN as u64] {
        file.read_at(&mut found, at)?;
        if found != copy {
            file.write_at(&copy, at)?;
            file.sync()?;
        }
    }
    Ok(())
}

/// Erases both header copies, B then A, each synced: a crash in between leaves either the
/// old header (erased again by the next recovery) or a free slot.
fn erase_slot_header(file: &dyn Storage) -> std::io::Result<()> {
    let zeros = [0u8; SEGMENT_HEADER_COPY_LEN];
    file.write_at(&zeros, SEGMENT_HEADER_COPY_LEN as u64)?;
    file.sync()?;
    file.write_at(&zeros, 0)?;
    file.sync()
}
