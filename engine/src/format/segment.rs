//! The header area at the start of every journal segment file: two copies of the segment
//! header, one per 4 KiB block, so that a crash while one copy is written never leaves the
//! slot without a readable header (see [`SlotState`] and docs/format-journal.md).

use super::{check_fixed, FormatError, Reader, Writer};

const MAGIC: u64 = u64::from_le_bytes(*b"KEELSEG\0");
const VERSION: u16 = 1;
const CRC_AT: usize = 8 + 2 + 2 + 4 + 8 + 8 + 8 + 16 + 8;
/// Size of one header copy.
pub const SEGMENT_HEADER_COPY_LEN: usize = 4096;
/// The header area: copy A at 0, copy B at 4096. Records start after it, block-aligned.
pub const SEGMENT_HEADER_LEN: usize = 2 * SEGMENT_HEADER_COPY_LEN;
const _: () = assert!(CRC_AT + 4 <= SEGMENT_HEADER_COPY_LEN);

/// A segment file's identity. Segment files are slots that get reused; the header, not
/// the file name, says which part of the journal a slot holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    /// Position of this segment in the journal; consecutive segments differ by one.
    pub segment_no: u64,
    /// Sequence number of the first record in the segment.
    pub first_seq: u64,
    /// Epoch when the segment was started.
    pub epoch: u64,
    /// The volume the segment belongs to.
    pub volume_id: [u8; 16],
    /// Random, new on every use of the slot. Every record's crc starts with it, so records
    /// left over from an earlier use of the slot never validate.
    pub nonce: u64,
}

/// What a slot's header area says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotState {
    /// The slot holds this segment.
    Segment(SegmentHeader),
    /// The slot holds no segment (never used, or erased).
    Free,
    /// Neither copy is readable, which no crash can cause (copies are written and erased
    /// one at a time, each synced, and recovery rewrites a torn copy before the slot is
    /// reused): the media is damaged.
    Damaged(String),
}

impl SegmentHeader {
    /// Encodes one copy into a zeroed 4 KiB block.
    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = vec![0u8; SEGMENT_HEADER_COPY_LEN];
        let mut w = Writer::new(&mut bytes);
        w.u64(MAGIC);
        w.u16(VERSION);
        w.u16(0);
        w.u32(0);
        w.u64(self.segment_no);
        w.u64(self.first_seq);
        w.u64(self.epoch);
        w.put(&self.volume_id);
        w.u64(self.nonce);
        assert_eq!(w.position(), CRC_AT);
        let crc = crc32fast::hash(&bytes[..CRC_AT]);
        bytes[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
        bytes
    }

    /// Decodes and validates one copy.
    pub fn decode(bytes: &[u8]) -> Result<Self, FormatError> {
        check_fixed(bytes, CRC_AT + 4, MAGIC, 8, VERSION, CRC_AT)?;
        let mut r = Reader::new(bytes.get(16..).unwrap_or_default());
        Ok(Self { segment_no: r.u64()?, first_seq: r.u64()?, epoch: r.u64()?, volume_id: r.take()?, nonce: r.u64()? })
    }

    /// Reads the header area (both copies) of a slot belonging to `volume_id`.
    ///
    /// Copies are written A then B and erased B then A, each step synced, so a crash
    /// damages at most the copy being written: with both valid the newer (higher segment
    /// number) wins; with one valid it wins; with neither, the slot is free when copy B is
    /// all zeros (a first header write or an erase was interrupted) and damaged otherwise.
    pub fn decode_slot(area: &[u8], volume_id: [u8; 16]) -> SlotState {
        let copy = |at: usize| {
            let bytes = area.get(at..at + SEGMENT_HEADER_COPY_LEN).unwrap_or_default();
            let decoded = Self::decode(bytes).and_then(|h| {
                if h.volume_id == volume_id {
                    Ok(h)
                } else {
                    Err(FormatError::InvalidField { field: "volume_id", detail: "belongs to another volume".into() })
                }
            });
            (decoded, !bytes.is_empty() && bytes.iter().all(|&b| b == 0))
        };
        let ((a, _), (b, b_zero)) = (copy(0), copy(SEGMENT_HEADER_COPY_LEN));
        match (a, b) {
            (Ok(a), Ok(b)) => SlotState::Segment(if b.segment_no > a.segment_no { b } else { a }),
            (Ok(h), Err(_)) | (Err(_), Ok(h)) => SlotState::Segment(h),
            (Err(_), Err(_)) if b_zero => SlotState::Free,
            (Err(a), Err(b)) => SlotState::Damaged(format!("both header copies are unreadable: A: {a}; B: {b}")),
        }
    }
}
