//! Helpers shared by the fuzz targets and the seed generator (`examples/gen_corpus.rs`).

use std::sync::OnceLock;

use keel_engine::format::{ChangeMapHeader, RecordHeader, SegmentHeader, Superblock, RECORD_HEADER_LEN};

/// The segment nonce the journal targets and their seeds use: every record's crc starts
/// with its segment's nonce, so seeds only validate against segments carrying this one.
pub const NONCE: u64 = u64::from_le_bytes(*b"keelfuzz");

/// Re-encodes, with [`NONCE`], each record of the chain that starts at the beginning of
/// `records`, giving each a valid crc; stops at the first bytes that are no record header
/// or whose payload runs past the end.
pub fn reencode_record_chain(records: &mut [u8]) {
    let mut pos = 0;
    let mut encoded = Vec::new();
    while let Some(head) = records.get(pos..pos + RECORD_HEADER_LEN) {
        let Ok(header) = RecordHeader::decode(head) else {
            return;
        };
        let payload_at = pos + RECORD_HEADER_LEN;
        let Some(payload) = records.get(payload_at..payload_at + header.payload_len as usize) else {
            return;
        };
        header.encode_into(payload, NONCE, &mut encoded);
        // `encoded` is padded to the record alignment; the padding may run past the end.
        let len = encoded.len().min(records.len() - pos);
        records[pos..pos + len].copy_from_slice(&encoded[..len]);
        pos += header.total_len();
    }
}

/// `data` with the crc32 of its first `crc_at` bytes stored at `crc_at` (little-endian),
/// when it is long enough to hold one.
pub fn with_crc(data: &[u8], crc_at: usize) -> Vec<u8> {
    let mut bytes = data.to_vec();
    if let Some(covered) = data.get(..crc_at) {
        let crc = crc32fast::hash(covered).to_le_bytes();
        if let Some(slot) = bytes.get_mut(crc_at..crc_at + 4) {
            slot.copy_from_slice(&crc);
        }
    }
    bytes
}

/// Where each fixed-size structure keeps its crc.
pub struct CrcOffsets {
    /// In the superblock.
    pub superblock: usize,
    /// In one segment header copy.
    pub segment: usize,
    /// In the change-map header.
    pub changemap: usize,
}

/// The crc offsets, found from the engine's own encoders: the layout is defined once, in
/// `keel_engine::format`, and not repeated here.
pub fn crc_offsets() -> &'static CrcOffsets {
    static OFFSETS: OnceLock<CrcOffsets> = OnceLock::new();
    OFFSETS.get_or_init(|| {
        let superblock = Superblock {
            volume_id: [7; 16],
            block_size: 4096,
            size: 1 << 20,
            epoch: 1,
            checkpoint_seq: 0,
            checkpoint_segment: 1,
            checkpoint_offset: 8192,
            segment_bytes: 1 << 20,
            segment_count_max: 3,
            changemap_generation: 1,
            change_region_bytes: 64 << 10,
            extent_file_bytes: 1 << 20,
            name: "fuzz".into(),
        };
        let segment = SegmentHeader { segment_no: 1, first_seq: 1, epoch: 1, volume_id: [7; 16], nonce: NONCE };
        let changemap = ChangeMapHeader {
            region_bytes: 64 << 10,
            volume_id: [7; 16],
            generation: 1,
            base_seq: 0,
            region_count: 16,
            bitmap_crc: 0x1234_5678,
        };
        CrcOffsets {
            superblock: find_crc(&superblock.encode()),
            segment: find_crc(&segment.encode()),
            changemap: find_crc(&changemap.encode()),
        }
    })
}

/// The first position holding the crc32 of every byte before it.
fn find_crc(encoded: &[u8]) -> usize {
    (1..encoded.len().saturating_sub(3))
        .find(|&at| {
            let stored = u32::from_le_bytes(encoded[at..at + 4].try_into().expect("4 bytes"));
            stored == crc32fast::hash(&encoded[..at])
        })
        .expect("every fixed structure ends its fixed part with a crc32 of what precedes it")
}
