//! Index chunks: the chunk ids of one range of a version 3 manifest.
//!
//! An index chunk's plaintext is a 16-byte header and the ids (docs/format-manifest.md,
//! "Index chunks"):
//!
//! ```text
//! offset size field
//!      0    4 magic "KIDX"
//!      4    2 version, u16 LE (1)
//!      6    2 reserved, zero
//!      8    4 entry count, u32 LE
//!     12    4 reserved, zero
//!     16    … entry count × 32-byte chunk ids, all zeros for a hole
//! ```
//!
//! It is stored like a data chunk ([`crate::seal_chunk`]): its id is the keyed hash of this
//! plaintext, it is compressed when that pays and encrypted, so it is authenticated by
//! the same checks as data and deduplicated: a range that did not change since the parent
//! snapshot has the same index chunk. It carries no position, so the manifest says which
//! range it covers and how many entries it must hold.

/// The four magic bytes of an index chunk's plaintext.
pub const PIECE_MAGIC: [u8; 4] = *b"KIDX";
/// The index chunk format version this build writes and reads.
pub const PIECE_VERSION: u16 = 1;
/// Bytes before the entries.
pub const PIECE_HEADER_LEN: usize = 16;

/// The plaintext of an index chunk holding `entries`.
pub fn encode_piece(entries: &[[u8; 32]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(PIECE_HEADER_LEN + 32 * entries.len());
    out.extend_from_slice(&PIECE_MAGIC);
    out.extend_from_slice(&PIECE_VERSION.to_le_bytes());
    out.extend_from_slice(&[0; 2]);
    // Entry counts are bounded by the fanout (at most 16384), far below u32::MAX.
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    for entry in entries {
        out.extend_from_slice(entry);
    }
    out
}

/// The entries of index chunk plaintext `plain`, which must hold exactly `expected`.
pub fn decode_piece(plain: &[u8], expected: usize) -> Result<Vec<[u8; 32]>, String> {
    Ok(check_piece(plain, expected)?
        .chunks_exact(32)
        .map(|entry| {
            let mut raw = [0u8; 32];
            raw.copy_from_slice(entry);
            raw
        })
        .collect())
}

/// Entry `at` of index chunk plaintext `plain`, which must hold exactly `expected` entries:
/// one lookup without decoding the rest.
pub fn piece_entry(plain: &[u8], expected: usize, at: usize) -> Result<[u8; 32], String> {
    let entries = check_piece(plain, expected)?;
    let entry = entries.get(32 * at..32 * at + 32).ok_or_else(|| format!("no entry {at} of {expected}"))?;
    let mut raw = [0u8; 32];
    raw.copy_from_slice(entry);
    Ok(raw)
}

/// Checks the header and length of `plain` for `expected` entries; returns the entries'
/// bytes.
fn check_piece(plain: &[u8], expected: usize) -> Result<&[u8], String> {
    let Some((header, entries)) = plain.split_first_chunk::<PIECE_HEADER_LEN>() else {
        return Err(format!("index chunk of {} bytes is shorter than its header", plain.len()));
    };
    if header[..4] != PIECE_MAGIC {
        return Err(format!("not an index chunk: magic {:02x?}", &header[..4]));
    }
    let version = u16::from_le_bytes([header[4], header[5]]);
    if version != PIECE_VERSION {
        return Err(format!("unsupported index chunk version {version}"));
    }
    if header[6..8] != [0; 2] || header[12..16] != [0; 4] {
        return Err("index chunk reserved bytes are not zero".into());
    }
    let count = u32::from_le_bytes([header[8], header[9], header[10], header[11]]) as usize;
    if count != expected || entries.len() != 32 * count {
        return Err(format!(
            "index chunk holds {count} entries in {} bytes; the manifest expects {expected}",
            entries.len()
        ));
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_every_damage_is_refused() {
        let entries: Vec<[u8; 32]> = (0..5u8).map(|i| [i; 32]).collect();
        let plain = encode_piece(&entries);
        assert_eq!(plain.len(), PIECE_HEADER_LEN + 5 * 32);
        assert_eq!(decode_piece(&plain, 5).unwrap(), entries);
        assert_eq!(piece_entry(&plain, 5, 3).unwrap(), [3; 32]);
        assert!(piece_entry(&plain, 5, 5).is_err());
        assert!(decode_piece(&plain, 4).is_err(), "a count the manifest does not expect");
        for at in 0..PIECE_HEADER_LEN {
            let mut bad = plain.clone();
            bad[at] ^= 0x01;
            assert!(decode_piece(&bad, 5).is_err(), "header byte {at}");
        }
        for len in 0..plain.len() {
            assert!(decode_piece(&plain[..len], 5).is_err(), "truncated to {len}");
        }
        let mut longer = plain.clone();
        longer.push(0);
        assert!(decode_piece(&longer, 5).is_err());
    }

    proptest::proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200), expected in 0usize..8) {
            let _ = decode_piece(&bytes, expected);
            let _ = piece_entry(&bytes, expected, expected / 2);
        }
    }
}
