//! Reading the journal back: recovery replay, `keel-inspect journal`, and the proof that
//! tells a torn tail (expected after a crash) from corruption (never skipped).
//!
//! The scan starts at the checkpoint and walks records while each one decodes, passes its
//! crc and carries exactly the next sequence number. A barrier takes no sequence number
//! of its own: it carries the seq of the record before it (the expected seq minus one).
//! Journals written before that change have barriers that took the next seq like any
//! other record; both forms are accepted, and only the old one consumes a seq. When a segment has no further valid
//! record and the next segment (by number) starts with the expected seq, the scan moves
//! on. Otherwise the journal ends there, and the bytes at that point are classified:
//!
//! - zeros, bytes that are no record header (stale data of a reused slot, or a header
//!   that never reached the disk), a stale record (valid, lower seq), or no room for a
//!   header: the end of the journal;
//! - a record header carrying the expected seq whose crc fails (or that runs past the
//!   segment), or a valid record with a higher seq: a torn tail, dropped and reported;
//! - in every case, if a barrier record further on (in this segment or a later one)
//!   proves that the missing record had been durable when the barrier was written, it is
//!   corruption in the acknowledged journal, and the scan fails with the segment, offset
//!   and sequence number.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::format::{
    RecordHeader, RecordKind, SegmentHeader, SlotState, RECORD_ALIGN, RECORD_HEADER_LEN, RECORD_MAGIC,
    SEGMENT_HEADER_LEN,
};
use crate::storage::{Env, OpenMode, Storage};

use super::{slot_path, JOURNAL_DIR};

/// One segment slot file and what its header says.
#[derive(Debug, Clone)]
pub struct SegmentInfo {
    /// Slot index (the number in the file name).
    pub index: usize,
    /// Path of the slot file.
    pub path: PathBuf,
    /// The decoded header, or `None` for a free or unreadable slot.
    pub header: Option<SegmentHeader>,
    /// Why the slot holds no segment ("free" or the damage), for inspection output.
    pub header_error: Option<String>,
    /// Both header copies are unreadable: media damage, never a crash outcome.
    pub damaged: bool,
}

/// Lists the volume's segment slots in slot order.
pub fn list_segments(env: &dyn Env, volume_dir: &Path, volume_id: [u8; 16]) -> std::io::Result<Vec<SegmentInfo>> {
    let dir = volume_dir.join(JOURNAL_DIR);
    let mut count = 0;
    for path in env.read_dir(&dir)? {
        let index = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("slot-"))
            .and_then(|n| n.strip_suffix(".seg"))
            .and_then(|n| n.parse::<usize>().ok());
        if let Some(index) = index {
            count = count.max(index + 1);
        }
    }
    let mut segments = Vec::with_capacity(count);
    for index in 0..count {
        let path = slot_path(&dir, index);
        let file = env.open(&path, OpenMode::Existing)?;
        let mut area = vec![0u8; SEGMENT_HEADER_LEN];
        file.read_at(&mut area, 0)?;
        let (header, header_error, damaged) = match SegmentHeader::decode_slot(&area, volume_id) {
            SlotState::Segment(h) => (Some(h), None, false),
            SlotState::Free => (None, Some("free".to_string()), false),
            SlotState::Damaged(why) => (None, Some(why), true),
        };
        segments.push(SegmentInfo { index, path, header, header_error, damaged });
    }
    Ok(segments)
}

/// A record the scan accepted.
#[derive(Debug)]
pub struct ScannedRecord<'a> {
    /// Segment holding the record.
    pub segment_no: u64,
    /// Byte offset of the record in its segment file.
    pub file_offset: u64,
    /// The decoded header.
    pub header: RecordHeader,
    /// The payload (empty for zero, trim and barrier records).
    pub payload: &'a [u8],
}

/// A torn record at the end of the journal, dropped by recovery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornTail {
    /// Segment holding the torn record.
    pub segment_no: u64,
    /// Its offset in the segment file.
    pub offset: u64,
    /// Sequence number it would have had.
    pub seq: u64,
    /// Bytes discarded (the torn record as far as its header could be read).
    pub bytes_dropped: u64,
    /// What was wrong with it.
    pub reason: String,
}

/// Where the scan stopped.
#[derive(Debug, Clone)]
pub struct ScanEnd {
    /// Segment where the next record goes.
    pub segment_no: u64,
    /// Offset in that segment where the next record goes.
    pub offset: u64,
    /// Sequence number of the next record.
    pub next_seq: u64,
    /// Highest seq of a data-changing record seen (or the start seq minus one).
    pub last_data_seq: u64,
    /// Epoch of the last record (or of the start segment).
    pub epoch: u64,
    /// Records accepted.
    pub records: u64,
    /// Payload bytes accepted.
    pub payload_bytes: u64,
    /// The torn record that ended the journal, if any.
    pub torn: Option<TornTail>,
}

enum Parsed<'a> {
    Valid(RecordHeader, &'a [u8]),
    Stop(Stop),
}

/// Why the records of a segment ended.
enum Stop {
    /// A clean end: zeros, a stale record, or no room for a header.
    End(&'static str),
    /// A record that is not valid, and how many bytes it claimed.
    Bad(String, u64),
}

/// True when a valid record with this header takes the expected seq (and the next one
/// must carry `expected_seq + 1`). Call only for records `parse_at` accepted.
fn consumes_seq(header: &RecordHeader, expected_seq: u64) -> bool {
    header.seq == expected_seq
}

fn parse_at(bytes: &[u8], pos: usize, expected_seq: u64, nonce: u64) -> Parsed<'_> {
    let Some(head) = bytes.get(pos..pos + RECORD_HEADER_LEN) else {
        return Parsed::Stop(Stop::End("no room for another record"));
    };
    if head.iter().all(|&b| b == 0) {
        return Parsed::Stop(Stop::End("zeros"));
    }
    let header = match RecordHeader::decode(head) {
        Ok(h) => h,
        // Not a record header: the stale middle of an older record in a reused slot, or a
        // header that never reached the disk. Either way nothing after it was written
        // in order, so this is the end (the barrier check still catches corruption).
        Err(_) => return Parsed::Stop(Stop::End("no record header")),
    };
    let total = header.total_len();
    let Some(payload) = bytes.get(pos + RECORD_HEADER_LEN..pos + RECORD_HEADER_LEN + header.payload_len as usize)
    else {
        return Parsed::Stop(Stop::Bad(
            format!("record of {total} bytes runs past the end of the segment"),
            (bytes.len() - pos) as u64,
        ));
    };
    if let Err(e) = header.verify(head, payload, nonce) {
        if header.seq == expected_seq {
            return Parsed::Stop(Stop::Bad(format!("seq {}: {e}", header.seq), total as u64));
        }
        // A record from an earlier use of the slot (its crc started with another nonce).
        return Parsed::Stop(Stop::End("stale record from an earlier use of the slot"));
    }
    // A barrier carries the seq of the record before it. The crc (with this use's nonce)
    // already rules out stale records; the seq checks are a second line.
    if header.kind == RecordKind::Barrier && header.seq.checked_add(1) == Some(expected_seq) {
        return Parsed::Valid(header, payload);
    }
    if header.seq < expected_seq {
        return Parsed::Stop(Stop::End("stale record"));
    }
    if header.seq > expected_seq {
        return Parsed::Stop(Stop::Bad(format!("sequence gap: found seq {}", header.seq), total as u64));
    }
    Parsed::Valid(header, payload)
}

/// True when a valid barrier of this use of the segment (crc with `nonce`), written after
/// `seq`, in `bytes` from `from` proves that every record up to and including `seq` was
/// durable. A barrier written right after record `seq` carries seq `seq` itself (one of
/// the old form, which took a seq of its own, carries more); either way its `offset`, the
/// durable seq, is at least `seq`.
fn barrier_proves(bytes: &[u8], from: usize, seq: u64, nonce: u64) -> bool {
    let mut pos = from.next_multiple_of(RECORD_ALIGN);
    while pos + RECORD_HEADER_LEN <= bytes.len() {
        if bytes.get(pos..pos + 4) == Some(&RECORD_MAGIC[..]) {
            if let Some(head) = bytes.get(pos..pos + RECORD_HEADER_LEN) {
                if let Ok(h) = RecordHeader::decode(head) {
                    if h.kind == RecordKind::Barrier
                        && h.seq >= seq
                        && h.offset >= seq
                        && h.verify(head, &[], nonce).is_ok()
                    {
                        return true;
                    }
                }
            }
        }
        pos += RECORD_ALIGN;
    }
    false
}

/// Reads a whole segment slot file.
pub(crate) fn read_segment(file: &Arc<dyn Storage>, segment_bytes: u64) -> std::io::Result<Vec<u8>> {
    let mut bytes = vec![0u8; segment_bytes as usize];
    file.read_at(&mut bytes, 0)?;
    Ok(bytes)
}

/// Where a scan starts and what it checks against.
#[derive(Debug, Clone, Copy)]
pub struct ScanParams {
    /// Size of each segment file.
    pub segment_bytes: u64,
    /// Volume size: data records must lie inside it.
    pub volume_size: u64,
    /// Segment to start in.
    pub start_segment: u64,
    /// Offset in that segment of the first record.
    pub start_offset: u64,
    /// Sequence number the first record must carry.
    pub start_seq: u64,
}

/// Walks the journal from `params`' start, calling `visit` for every valid record in
/// order. See the module docs for how the end is classified. A record that validates but
/// addresses bytes outside the volume, or a slot whose header copies are both damaged, is
/// corruption.
pub fn scan(
    env: &dyn Env,
    volume: &str,
    segments: &[SegmentInfo],
    params: ScanParams,
    mut visit: impl FnMut(&ScannedRecord<'_>) -> Result<()>,
) -> Result<ScanEnd> {
    let ScanParams { segment_bytes, volume_size, start_segment, start_offset, start_seq } = params;
    if let Some(damaged) = segments.iter().find(|s| s.damaged) {
        return Err(Error::Corruption {
            volume: volume.to_string(),
            file: damaged.path.clone(),
            detail: format!(
                "journal slot {}: {}; it may hold acknowledged records",
                damaged.index,
                damaged.header_error.as_deref().unwrap_or("damaged")
            ),
        });
    }
    let by_no: BTreeMap<u64, &SegmentInfo> =
        segments.iter().filter_map(|s| s.header.map(|h| (h.segment_no, s))).collect();
    let io = |context: String| move |source| Error::Io { volume: volume.to_string(), context, source };
    let start = by_no.get(&start_segment).ok_or_else(|| Error::Corruption {
        volume: volume.to_string(),
        file: PathBuf::from(JOURNAL_DIR),
        detail: format!("checkpoint segment {start_segment} is missing from every slot"),
    })?;
    let mut info = *start;
    let mut nonce = info.header.map_or(0, |h| h.nonce);
    let mut segment_no = start_segment;
    let mut pos = start_offset as usize;
    let mut expected = start_seq;
    let mut end = ScanEnd {
        segment_no,
        offset: start_offset,
        next_seq: start_seq,
        last_data_seq: start_seq.saturating_sub(1),
        epoch: info.header.map_or(0, |h| h.epoch),
        records: 0,
        payload_bytes: 0,
        torn: None,
    };
    loop {
        let file = env.open(&info.path, OpenMode::Existing).map_err(io(format!("open {}", info.path.display())))?;
        let bytes = read_segment(&file, segment_bytes).map_err(io(format!("read {}", info.path.display())))?;
        let stop = loop {
            match parse_at(&bytes, pos, expected, nonce) {
                Parsed::Valid(header, payload) => {
                    let data = matches!(header.kind, RecordKind::Write | RecordKind::Zero | RecordKind::Trim);
                    if data && header.offset.checked_add(header.length).is_none_or(|end| end > volume_size) {
                        return Err(Error::Corruption {
                            volume: volume.to_string(),
                            file: info.path.clone(),
                            detail: format!(
                                "journal segment {segment_no} record at offset {pos}, seq {}: range {}+{} is \
                                 outside the volume ({volume_size} bytes)",
                                header.seq, header.offset, header.length
                            ),
                        });
                    }
                    visit(&ScannedRecord { segment_no, file_offset: pos as u64, header, payload })?;
                    pos += header.total_len();
                    if consumes_seq(&header, expected) {
                        expected += 1;
                    }
                    end.records += 1;
                    end.payload_bytes += payload.len() as u64;
                    end.epoch = header.epoch;
                    if matches!(header.kind, RecordKind::Write | RecordKind::Zero | RecordKind::Trim) {
                        end.last_data_seq = header.seq;
                    }
                }
                Parsed::Stop(stop) => break stop,
            }
        };
        if let Some(next) = by_no.get(&(segment_no + 1)) {
            if let Some(h) = next.header.filter(|h| h.first_seq == expected) {
                info = next;
                nonce = h.nonce;
                segment_no += 1;
                pos = SEGMENT_HEADER_LEN;
                continue;
            }
        }
        end.segment_no = segment_no;
        end.offset = pos as u64;
        end.next_seq = expected;
        // Is there proof that the bad (or missing) record at `pos` had been durable?
        let mut proven = barrier_proves(&bytes, pos + RECORD_ALIGN, expected, nonce);
        for (_, later) in by_no.range(segment_no + 1..) {
            if proven {
                break;
            }
            let file =
                env.open(&later.path, OpenMode::Existing).map_err(io(format!("open {}", later.path.display())))?;
            let later_bytes =
                read_segment(&file, segment_bytes).map_err(io(format!("read {}", later.path.display())))?;
            proven = barrier_proves(&later_bytes, SEGMENT_HEADER_LEN, expected, later.header.map_or(0, |h| h.nonce));
        }
        let reason = match &stop {
            Stop::Bad(reason, _) => reason.clone(),
            Stop::End(what) => format!("record missing ({what})"),
        };
        if proven {
            return Err(Error::Corruption {
                volume: volume.to_string(),
                file: info.path.clone(),
                detail: format!(
                    "journal segment {segment_no} record at offset {pos}, seq {expected}: {reason}, \
                     but a later barrier shows this record had been acknowledged as durable"
                ),
            });
        }
        if let Stop::Bad(reason, claimed) = stop {
            end.torn = Some(TornTail {
                segment_no,
                offset: pos as u64,
                seq: expected,
                bytes_dropped: claimed.min(segment_bytes - pos as u64),
                reason,
            });
        }
        return Ok(end);
    }
}

/// Walks the records of one segment, read whole into `bytes`, from its first record,
/// expecting `first_seq` and checking crcs with `nonce`, until a record is not valid or
/// `end` (a file offset) is reached; calls `visit` for each. Returns the seq the next
/// record would carry. Used to count what a rewind discards; recovery uses [`scan`].
pub(crate) fn walk_segment(
    bytes: &[u8],
    first_seq: u64,
    nonce: u64,
    end: Option<usize>,
    mut visit: impl FnMut(&RecordHeader, &[u8]),
) -> u64 {
    let end = end.unwrap_or(bytes.len()).min(bytes.len());
    let bytes = bytes.get(..end).unwrap_or_default();
    let mut pos = SEGMENT_HEADER_LEN;
    let mut expected = first_seq;
    while let Parsed::Valid(header, payload) = parse_at(bytes, pos, expected, nonce) {
        visit(&header, payload);
        pos += header.total_len();
        if consumes_seq(&header, expected) {
            expected += 1;
        }
    }
    expected
}
