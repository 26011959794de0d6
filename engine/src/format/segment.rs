//! The header at the start of every journal segment file.

use super::{check_fixed, FormatError, Reader, Writer};

const MAGIC: u64 = u64::from_le_bytes(*b"KEELSEG\0");
const VERSION: u16 = 1;
const CRC_AT: usize = 8 + 2 + 2 + 4 + 8 + 8 + 8 + 16;
/// Records start after one 4 KiB block, so they stay block-aligned within the file.
pub const SEGMENT_HEADER_LEN: usize = 4096;
const _: () = assert!(CRC_AT + 4 <= SEGMENT_HEADER_LEN);

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
}

impl SegmentHeader {
    /// Encodes into a zeroed 4 KiB block.
    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = vec![0u8; SEGMENT_HEADER_LEN];
        let mut w = Writer::new(&mut bytes);
        w.u64(MAGIC);
        w.u16(VERSION);
        w.u16(0);
        w.u32(0);
        w.u64(self.segment_no);
        w.u64(self.first_seq);
        w.u64(self.epoch);
        w.put(&self.volume_id);
        assert_eq!(w.position(), CRC_AT);
        let crc = crc32fast::hash(&bytes[..CRC_AT]);
        bytes[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
        bytes
    }

    /// Decodes and validates a segment header.
    pub fn decode(bytes: &[u8]) -> Result<Self, FormatError> {
        check_fixed(bytes, CRC_AT + 4, MAGIC, 8, VERSION, CRC_AT)?;
        let mut r = Reader::new(bytes.get(16..).unwrap_or_default());
        Ok(Self { segment_no: r.u64()?, first_seq: r.u64()?, epoch: r.u64()?, volume_id: r.take()? })
    }
}
