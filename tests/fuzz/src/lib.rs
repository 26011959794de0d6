//! Helpers shared by the fuzz targets and the seed generator (`examples/gen_corpus.rs`).

use keel_engine::format::{RecordHeader, RECORD_HEADER_LEN};

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
