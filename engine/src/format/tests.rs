use proptest::prelude::*;

use super::*;

fn superblock() -> Superblock {
    Superblock {
        volume_id: [7; 16],
        block_size: 4096,
        size: 1 << 30,
        epoch: 3,
        checkpoint_seq: 41,
        checkpoint_segment: 2,
        checkpoint_offset: 8192,
        segment_bytes: 64 << 20,
        segment_count_max: 16,
        changemap_generation: 5,
        change_region_bytes: 64 << 10,
        extent_file_bytes: 1 << 40,
        name: "acme-db".into(),
    }
}

#[test]
fn superblock_round_trips() {
    let sb = superblock();
    assert_eq!(Superblock::decode(&sb.encode()), Ok(sb));
}

#[test]
fn every_single_bit_flip_in_the_superblock_is_detected() {
    let bytes = superblock().encode();
    for bit in 0..(SUPERBLOCK_LEN.min(300) * 8) {
        let mut flipped = bytes.clone();
        flipped[bit / 8] ^= 1 << (bit % 8);
        // Bits in the zero padding after the crc are not covered; the covered prefix is.
        if bit / 8 < 240 {
            assert!(Superblock::decode(&flipped).is_err(), "bit {bit} flip undetected");
        }
    }
}

#[test]
fn record_round_trips_and_detects_payload_corruption() {
    let payload = vec![0xabu8; 4096];
    let mut out = Vec::new();
    RecordHeader::new(RecordKind::Write, 0, 9, 1, 8192, 4096).encode_into(&payload, 42, &mut out);
    assert_eq!(out.len(), RecordHeader::encoded_len(4096));
    let header = RecordHeader::decode(&out).unwrap();
    assert_eq!(header.seq, 9);
    assert_eq!(header.offset, 8192);
    assert_eq!(header.payload_len, 4096);
    let body = &out[RECORD_HEADER_LEN..RECORD_HEADER_LEN + 4096];
    assert_eq!(header.verify(&out, body, 42), Ok(()));
    // The same bytes in another use of the slot (another nonce) do not validate.
    assert!(header.verify(&out, body, 43).is_err());
    let mut bad = body.to_vec();
    bad[100] ^= 0x10;
    assert!(matches!(header.verify(&out, &bad, 42), Err(FormatError::ChecksumMismatch { .. })));
}

#[test]
fn record_with_inconsistent_payload_length_is_rejected() {
    let mut out = Vec::new();
    RecordHeader::new(RecordKind::Trim, 0, 1, 1, 0, 4096).encode_into(&[1, 2, 3], 0, &mut out);
    assert!(matches!(RecordHeader::decode(&out), Err(FormatError::InvalidField { field: "payload_len", .. })));
}

#[test]
fn segment_and_changemap_headers_round_trip() {
    let seg = SegmentHeader { segment_no: 4, first_seq: 100, epoch: 2, volume_id: [1; 16], nonce: 99 };
    assert_eq!(SegmentHeader::decode(&seg.encode()), Ok(seg));
    let cm = ChangeMapHeader {
        region_bytes: 65536,
        volume_id: [2; 16],
        generation: 3,
        base_seq: 77,
        region_count: 1000,
        bitmap_crc: 0xdead_beef,
    };
    assert_eq!(ChangeMapHeader::decode(&cm.encode()), Ok(cm));
}

proptest! {
    #[test]
    fn decoders_are_total(bytes in proptest::collection::vec(any::<u8>(), 0..9000)) {
        let _ = Superblock::decode(&bytes);
        let _ = SegmentHeader::decode(&bytes);
        let _ = ChangeMapHeader::decode(&bytes);
        if let Ok(header) = RecordHeader::decode(&bytes) {
            let _ = header.verify(&bytes, bytes.get(RECORD_HEADER_LEN..).unwrap_or_default(), 0);
        }
        let _ = SegmentHeader::decode_slot(&bytes, [0; 16]);
    }

    #[test]
    fn corrupted_valid_structures_never_panic(flips in proptest::collection::vec((0usize..4096, any::<u8>()), 1..8)) {
        let mut bytes = superblock().encode();
        for (at, value) in flips {
            bytes[at] ^= value;
        }
        let _ = Superblock::decode(&bytes);
    }
}

#[test]
fn slot_header_copies_survive_one_damaged_copy() {
    let id = [5; 16];
    let old = SegmentHeader { segment_no: 3, first_seq: 10, epoch: 1, volume_id: id, nonce: 1 };
    let new = SegmentHeader { segment_no: 7, first_seq: 90, epoch: 1, volume_id: id, nonce: 2 };
    let area = |a: &[u8], b: &[u8]| [a, b].concat();
    let zeros = vec![0u8; SEGMENT_HEADER_COPY_LEN];
    let mut torn = new.encode();
    torn[20] ^= 1;
    // Both valid: the newer wins (a roll wrote A, crashed before B).
    assert_eq!(SegmentHeader::decode_slot(&area(&new.encode(), &old.encode()), id), SlotState::Segment(new));
    // One torn copy: the other wins.
    assert_eq!(SegmentHeader::decode_slot(&area(&torn, &old.encode()), id), SlotState::Segment(old));
    assert_eq!(SegmentHeader::decode_slot(&area(&new.encode(), &torn), id), SlotState::Segment(new));
    // A first header write or an erase interrupted: B is zeros.
    assert_eq!(SegmentHeader::decode_slot(&area(&torn, &zeros), id), SlotState::Free);
    assert_eq!(SegmentHeader::decode_slot(&area(&zeros, &zeros), id), SlotState::Free);
    // Both damaged: no crash does that.
    assert!(matches!(SegmentHeader::decode_slot(&area(&torn, &torn), id), SlotState::Damaged(_)));
    // Another volume's header is not ours.
    let foreign = SegmentHeader { volume_id: [6; 16], ..new };
    assert_eq!(SegmentHeader::decode_slot(&area(&foreign.encode(), &zeros), id), SlotState::Free);
}

/// A superblock with a valid crc but extreme values made recovery overflow (`seq + 1`) or
/// try to allocate a 4 EiB segment buffer. Fixed: the decoder bounds every field.
#[test]
fn superblocks_with_extreme_fields_are_rejected() {
    let cases: [fn(&mut Superblock); 4] = [
        |sb| sb.checkpoint_seq = u64::MAX,
        |sb| sb.checkpoint_segment = u64::MAX,
        |sb| sb.segment_bytes = 1 << 62,
        |sb| sb.segment_count_max = u32::MAX,
    ];
    for case in cases {
        let mut sb = superblock();
        case(&mut sb);
        assert!(matches!(Superblock::decode(&sb.encode()), Err(FormatError::InvalidField { .. })));
    }
}
