#![allow(clippy::indexing_slicing, clippy::unwrap_used, clippy::expect_used, reason = "tests panic on failure")]

use proptest::prelude::*;
use rand::{RngCore, SeedableRng};

use super::*;

fn key(byte: u8) -> TenantKey {
    TenantKey::from_bytes([byte; 32])
}

fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut data);
    data
}

/// Text-like data that zstd compresses well.
fn compressible(len: usize) -> Vec<u8> {
    let line = b"INSERT INTO accounts VALUES (42, 'keel', 1000);\n";
    line.iter().copied().cycle().take(len).collect()
}

fn flags_of(frame: &[u8]) -> u8 {
    frame[MAGIC.len() + 1]
}

#[test]
fn round_trip_at_several_sizes() {
    let k = key(1);
    for len in [0usize, 1, 15, 16, 17, 4095, 4096, 65536, 256 << 10, 1 << 20] {
        for (kind, data) in [("random", random_bytes(len, len as u64)), ("text", compressible(len))] {
            let (id, frame) = encode_chunk(&k, &data, 3).unwrap();
            assert_eq!(id, k.chunk_id(&data), "{kind} {len}");
            assert!(frame.len() <= len + OVERHEAD, "{kind} {len}: frame {} bytes", frame.len());
            assert_eq!(decode_chunk(&k, &id, &frame).unwrap(), data, "{kind} {len}");
        }
    }
}

#[test]
fn max_size_round_trips_and_larger_is_refused() {
    let k = key(1);
    let data = compressible(MAX_CHUNK_LEN);
    let (id, frame) = encode_chunk(&k, &data, 1).unwrap();
    assert_eq!(decode_chunk(&k, &id, &frame).unwrap(), data);
    let too_big = vec![1u8; MAX_CHUNK_LEN + 1];
    assert!(matches!(
        encode_chunk(&k, &too_big, 1),
        Err(ChunkError::TooLarge { len, max: MAX_CHUNK_LEN }) if len == MAX_CHUNK_LEN + 1
    ));
}

#[test]
fn compression_is_used_only_when_it_pays() {
    let k = key(1);
    let text = compressible(64 << 10);
    let (_, frame) = encode_chunk(&k, &text, 3).unwrap();
    assert_eq!(flags_of(&frame) & FLAG_COMPRESSED, FLAG_COMPRESSED);
    assert!(frame.len() < text.len() / 10, "text compressed to {} bytes", frame.len());

    let random = random_bytes(64 << 10, 7);
    let (id, frame) = encode_chunk(&k, &random, 3).unwrap();
    assert_eq!(flags_of(&frame) & FLAG_COMPRESSED, 0);
    assert_eq!(frame.len(), random.len() + OVERHEAD);
    assert_eq!(decode_chunk(&k, &id, &frame).unwrap(), random);

    // Saves less than 1/16: half random, then a little compressible tail → stored raw.
    let mut mostly_random = random_bytes(60 << 10, 8);
    mostly_random.extend(std::iter::repeat_n(0u8, 2 << 10));
    let (_, frame) = encode_chunk(&k, &mostly_random, 3).unwrap();
    assert_eq!(flags_of(&frame) & FLAG_COMPRESSED, 0);
}

#[test]
fn same_plaintext_two_tenants_unrelated_ids_and_no_cross_decode() {
    let (a, b) = (key(1), key(2));
    let data = compressible(64 << 10);
    let (id_a, frame_a) = encode_chunk(&a, &data, 3).unwrap();
    let (id_b, frame_b) = encode_chunk(&b, &data, 3).unwrap();
    assert_ne!(id_a, id_b);
    let differing_bits: u32 = id_a.0.iter().zip(id_b.0).map(|(x, y)| (x ^ y).count_ones()).sum();
    assert!((64..=192).contains(&differing_bits), "ids look related: {differing_bits} bits differ");
    assert!(matches!(decode_chunk(&b, &id_a, &frame_a), Err(ChunkError::Unauthenticated)));
    assert!(matches!(decode_chunk(&a, &id_b, &frame_b), Err(ChunkError::Unauthenticated)));
    // Even with the other tenant's id, the key is wrong.
    assert!(matches!(decode_chunk(&b, &id_b, &frame_a), Err(ChunkError::Unauthenticated)));
}

#[test]
fn same_tenant_same_plaintext_same_id_fresh_nonce() {
    let k = key(1);
    let data = random_bytes(4096, 1);
    let (id1, frame1) = encode_chunk(&k, &data, 3).unwrap();
    let (id2, frame2) = encode_chunk(&k, &data, 3).unwrap();
    assert_eq!(id1, id2);
    assert_ne!(frame1, frame2, "nonces must be random");
}

#[test]
fn chunk_served_under_another_id_is_refused() {
    let k = key(1);
    let (_, frame) = encode_chunk(&k, b"one", 3).unwrap();
    let other = k.chunk_id(b"two");
    assert!(matches!(decode_chunk(&k, &other, &frame), Err(ChunkError::Unauthenticated)));
}

#[test]
fn every_flipped_byte_is_detected() {
    let k = key(1);
    for data in [compressible(3000), random_bytes(3000, 3)] {
        let (id, frame) = encode_chunk(&k, &data, 3).unwrap();
        for i in 0..frame.len() {
            for mask in [0x01u8, 0x80, 0xff] {
                let mut bad = frame.clone();
                bad[i] ^= mask;
                let err = decode_chunk(&k, &id, &bad).expect_err("flip must be detected");
                // Outside the magic and version, the CRC catches every flip first.
                if i > MAGIC.len() {
                    assert!(matches!(err, ChunkError::ChecksumMismatch { .. }), "byte {i}: {err}");
                }
                assert!(check_frame(&bad).is_err(), "byte {i}");
            }
        }
    }
}

#[test]
fn check_order_names_the_first_problem() {
    let k = key(1);
    let (id, frame) = encode_chunk(&k, &compressible(1000), 3).unwrap();
    assert!(matches!(decode_chunk(&k, &id, &frame[..10]), Err(ChunkError::Truncated { len: 10, min: OVERHEAD })));
    let mut bad = frame.clone();
    bad[0] = b'X';
    assert!(matches!(decode_chunk(&k, &id, &bad), Err(ChunkError::BadMagic { found }) if &found == b"XCHK"));
    let mut bad = frame.clone();
    bad[4] = 9;
    assert!(matches!(decode_chunk(&k, &id, &bad), Err(ChunkError::UnsupportedVersion { found: 9 })));
    // A truncation keeps magic and version but breaks the CRC.
    assert!(matches!(decode_chunk(&k, &id, &frame[..frame.len() - 1]), Err(ChunkError::ChecksumMismatch { .. })));
}

/// Re-seals a modified frame's CRC, to reach the checks behind it.
fn reseal(frame: &mut [u8]) {
    let (covered, crc) = frame.split_at_mut(frame.len() - CRC_LEN);
    crc.copy_from_slice(&crc32fast::hash(covered).to_le_bytes());
}

#[test]
fn header_checks_behind_the_crc() {
    let k = key(1);
    let (id, frame) = encode_chunk(&k, &compressible(1000), 3).unwrap();
    let cases: [(usize, u8, &str); 4] = [
        (6, 1, "reserved"),
        (5, 0x02, "unknown flag"),
        (5, FLAG_COMPRESSED, "uncompressed payload length"), // clears the compressed bit
        (11, 0x7f, "plaintext_len exceeds"),
    ];
    for (at, mask, what_prefix) in cases {
        let mut bad = frame.clone();
        bad[at] ^= mask;
        reseal(&mut bad);
        match decode_chunk(&k, &id, &bad) {
            Err(ChunkError::Corruption { what }) => assert!(what.starts_with(what_prefix), "{what}"),
            other => panic!("byte {at}: {other:?}"),
        }
    }
    // A resealed ciphertext flip is caught by the AEAD.
    let mut bad = frame.clone();
    bad[HEADER_LEN] ^= 1;
    reseal(&mut bad);
    assert!(matches!(decode_chunk(&k, &id, &bad), Err(ChunkError::Unauthenticated)));
}

#[test]
fn is_zero_detects_holes() {
    assert!(is_zero(&[]));
    assert!(is_zero(&vec![0u8; 1 << 20]));
    for at in [0usize, 4095, 4096, (1 << 20) - 1] {
        let mut data = vec![0u8; 1 << 20];
        data[at] = 1;
        assert!(!is_zero(&data), "{at}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn decode_never_panics_on_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let k = key(1);
        let _ = decode_chunk(&k, &k.chunk_id(&bytes), &bytes);
        let mut framed = MAGIC.to_vec();
        framed.push(1);
        framed.extend_from_slice(&bytes);
        prop_assert!(decode_chunk(&k, &k.chunk_id(&bytes), &framed).is_err());
    }

    #[test]
    fn round_trip_and_tampering(data in proptest::collection::vec(any::<u8>(), 0..4096),
                                level in -3i32..10, flip in any::<usize>(), mask in 1u8..,
                                cut in any::<usize>()) {
        let k = key(3);
        let (id, frame) = encode_chunk(&k, &data, level).unwrap();
        prop_assert_eq!(decode_chunk(&k, &id, &frame).unwrap(), data);
        let mut bad = frame.clone();
        let at = flip % bad.len();
        bad[at] ^= mask;
        prop_assert!(decode_chunk(&k, &id, &bad).is_err());
        let cut = cut % frame.len();
        prop_assert!(decode_chunk(&k, &id, &frame[..cut]).is_err());
    }

    #[test]
    fn resealed_random_headers_never_panic(header in proptest::collection::vec(any::<u8>(), HEADER_LEN),
                                           body_len in 0usize..256) {
        let k = key(1);
        let mut frame = MAGIC.to_vec();
        frame.push(1);
        frame.extend_from_slice(&header[MAGIC.len() + 1..]);
        frame.extend(std::iter::repeat_n(0xa5u8, body_len + TAG_LEN + CRC_LEN));
        reseal(&mut frame);
        let _ = decode_chunk(&k, &k.chunk_id(b""), &frame);
    }
}
