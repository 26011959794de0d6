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

mod group_commit;
mod scan;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::format::{RecordHeader, RecordKind, SegmentHeader, SEGMENT_HEADER_COPY_LEN, SEGMENT_HEADER_LEN};
use crate::random::random_u64;
use crate::storage::{Env, OpenMode, Storage};

pub(crate) use group_commit::DurableTracker;
pub use scan::{list_segments, scan, ScanEnd, ScanParams, ScannedRecord, SegmentInfo, TornTail};

/// Directory of the segment files inside a volume directory.
pub(crate) const JOURNAL_DIR: &str = "journal";
/// A zero-filled slot file prepared in the background, renamed into place by a roll.
const SPARE_FILE: &str = "spare.tmp";

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
            }),
            tracker: DurableTracker::new(resume.next_seq - 1),
            spare_wanted: std::sync::atomic::AtomicBool::new(true),
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
    /// records in journal order. Returns the record's seq.
    pub(crate) fn append(
        &self,
        kind: RecordKind,
        flags: u8,
        offset: u64,
        length: u64,
        payload: &[u8],
        apply: &dyn Fn(u64) -> std::io::Result<()>,
    ) -> Result<u64, AppendError> {
        let mut w = self.writer.lock();
        let record_len = RecordHeader::encoded_len(payload.len()) as u64;
        if w.offset + record_len > self.segment_bytes {
            self.roll(&mut w)?;
        }
        let seq = w.next_seq;
        let header = RecordHeader::new(kind, flags, seq, w.epoch, offset, length).encode_header(payload, w.nonce);
        let padding = [0u8; crate::format::RECORD_ALIGN];
        let padding = &padding[..RecordHeader::padding_len(payload.len())];
        let file = Arc::clone(&w.slots[w.active].file);
        file.write_vectored_at(&[&header, payload, padding], w.offset)
            .map_err(|e| AppendError::Io(format!("append record seq {seq} to journal segment {}", w.segment_no), e))?;
        w.offset += record_len;
        w.next_seq += 1;
        w.bytes_since_checkpoint += record_len;
        if matches!(kind, RecordKind::Write | RecordKind::Zero | RecordKind::Trim) {
            w.last_data_seq = seq;
        }
        apply(seq).map_err(|e| AppendError::Io(format!("apply record seq {seq} to the block store"), e))?;
        Ok(seq)
    }

    fn roll(&self, w: &mut Writer) -> Result<(), AppendError> {
        let io = |what: &str, e| AppendError::Io(format!("{what} for journal segment {}", w.segment_no + 1), e);
        let free = w
            .slots
            .iter()
            .enumerate()
            .position(|(i, s)| i != w.active && s.segment_no.is_none_or(|no| no < w.checkpoint_segment_no));
        let index = match free {
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
        let header =
            SegmentHeader { segment_no, first_seq: w.next_seq, epoch: w.epoch, volume_id: self.volume_id, nonce };
        let file = Arc::clone(&w.slots[index].file);
        write_slot_header(file.as_ref(), &header).map_err(|e| io("write the header", e))?;
        let old = Arc::clone(&w.slots[w.active].file);
        w.unsynced.push(old);
        w.slots[index].segment_no = Some(segment_no);
        w.active = index;
        w.segment_no = segment_no;
        w.nonce = nonce;
        w.offset = SEGMENT_HEADER_LEN as u64;
        if !w.spare_ready && w.slots.len() < self.segment_count_max && !w.has_free_slot() {
            self.spare_wanted.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
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

    /// Makes every data record appended so far durable (group commit), then notes the
    /// new watermark in a barrier record.
    pub(crate) fn flush(&self) -> Result<u64, String> {
        let target = self.writer.lock().last_data_seq;
        self.flush_to(target)
    }

    /// Makes every record up to `target` durable.
    pub(crate) fn flush_to(&self, target: u64) -> Result<u64, String> {
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
            match self.append(RecordKind::Barrier, 0, covered, 0, &[], &|_| Ok(())) {
                Ok(_) | Err(AppendError::Full) => {}
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

    pub(crate) fn position(&self) -> JournalPosition {
        self.checkpoint_snapshot().0
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
        self.writer.lock().epoch
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
