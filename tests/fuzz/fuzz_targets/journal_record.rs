//! Every on-disk decoder in `keel_engine::format` on the same bytes: the journal record
//! header (and its crc check), the superblock, a segment header copy, a slot's header
//! area (two copies) and the change-map header. Each must return a value for any input.
//!
//! Random bytes almost never carry a valid crc, which would leave the field checks after
//! the crc unexplored. So each fixed-size structure is also decoded from a copy whose
//! crc has been recomputed, and whatever decodes must survive `encode` → `decode`
//! unchanged. Records are re-encoded from their decoded header the same way.
#![no_main]

use keel_engine::format::{
    ChangeMapHeader, RecordHeader, SegmentHeader, SlotState, Superblock, RECORD_HEADER_LEN, SEGMENT_HEADER_COPY_LEN,
    SEGMENT_HEADER_LEN,
};
use keel_fuzz::{crc_offsets, with_crc, NONCE};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    record(data);

    let _ = Superblock::decode(data);
    let _ = SegmentHeader::decode(data);
    let _ = ChangeMapHeader::decode(data);

    if let Ok(superblock) = Superblock::decode(&with_crc(data, crc_offsets().superblock)) {
        assert_eq!(Superblock::decode(&superblock.encode()), Ok(superblock));
    }
    if let Ok(segment) = SegmentHeader::decode(&with_crc(data, crc_offsets().segment)) {
        assert_eq!(SegmentHeader::decode(&segment.encode()), Ok(segment));
    }
    if let Ok(changemap) = ChangeMapHeader::decode(&with_crc(data, crc_offsets().changemap)) {
        assert_eq!(ChangeMapHeader::decode(&changemap.encode()), Ok(changemap));
    }

    slot(data);
});

/// A record at the start of `data`: decode the header, check the crc over whatever
/// payload is there, and check that re-encoding the decoded header gives a record that
/// decodes to the same fields and passes its crc.
fn record(data: &[u8]) {
    let Ok(header) = RecordHeader::decode(data) else {
        return;
    };
    let payload_end = RECORD_HEADER_LEN.saturating_add(header.payload_len as usize);
    let payload = data.get(RECORD_HEADER_LEN..payload_end).unwrap_or_default();
    let _ = header.verify(data, payload, NONCE);
    if payload.len() != header.payload_len as usize {
        return;
    }
    let mut encoded = Vec::new();
    header.encode_into(payload, NONCE, &mut encoded);
    assert_eq!(encoded.len(), header.total_len());
    let decoded = RecordHeader::decode(&encoded).expect("a re-encoded record decodes");
    assert_eq!(decoded, RecordHeader { crc: decoded.crc, ..header });
    decoded.verify(&encoded, payload, NONCE).expect("a re-encoded record passes its crc");
}

/// `data` as a slot's header area (zero-extended), decoded as is and with both copies'
/// crcs recomputed; the documented rule must pick the copy.
fn slot(data: &[u8]) {
    let mut area = data.get(..SEGMENT_HEADER_LEN).unwrap_or(data).to_vec();
    area.resize(SEGMENT_HEADER_LEN, 0);
    let (copy_a, copy_b) = area.split_at(SEGMENT_HEADER_COPY_LEN);
    let _ = SegmentHeader::decode_slot(&area, [0; 16]);

    let copy_a = with_crc(copy_a, crc_offsets().segment);
    let copy_b = with_crc(copy_b, crc_offsets().segment);
    let a = SegmentHeader::decode(&copy_a).ok();
    let b = SegmentHeader::decode(&copy_b).ok();
    let volume_id = a.or(b).map_or([0; 16], |h| h.volume_id);
    let a = a.filter(|h| h.volume_id == volume_id);
    let b = b.filter(|h| h.volume_id == volume_id);
    let fixed = [copy_a, copy_b].concat();
    let state = SegmentHeader::decode_slot(&fixed, volume_id);
    match (a, b) {
        (Some(a), Some(b)) => {
            let newer = if b.segment_no > a.segment_no { b } else { a };
            assert_eq!(state, SlotState::Segment(newer), "both copies are valid: the newer one wins");
        }
        (Some(h), None) | (None, Some(h)) => assert_eq!(state, SlotState::Segment(h), "the one valid copy wins"),
        (None, None) => assert!(matches!(state, SlotState::Free | SlotState::Damaged(_)), "{state:?}"),
    }
}
