//! `changemap.bin` (which regions of the volume changed since a base sequence number) and
//! the change-map layer files (which changed between two snapshot markers).

use super::{check_fixed, FormatError, Reader, Writer};

const MAGIC: u64 = u64::from_le_bytes(*b"KEELCMAP");
const VERSION: u16 = 1;
const CRC_AT: usize = 8 + 2 + 2 + 4 + 16 + 8 + 8 + 8 + 4 + 4;
/// The header occupies one 4 KiB block; the bitmap follows.
pub const CHANGEMAP_HEADER_LEN: usize = 4096;
const _: () = assert!(CRC_AT + 4 <= CHANGEMAP_HEADER_LEN);

/// The change map's header. The bitmap after it has one bit per region, in little-endian
/// u64 words: bit `i % 64` of word `i / 64` is region `i`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChangeMapHeader {
    /// Region size in bytes (a power of two, at least 4 KiB).
    pub region_bytes: u32,
    /// The volume the map belongs to.
    pub volume_id: [u8; 16],
    /// Raised whenever the map is rebuilt; the superblock names the generation it trusts.
    pub generation: u64,
    /// A set bit means the region was written by a record with `seq > base_seq`.
    pub base_seq: u64,
    /// Number of regions (bits).
    pub region_count: u64,
    /// crc32 of the bitmap as last persisted with this header.
    pub bitmap_crc: u32,
}

impl ChangeMapHeader {
    /// Length of the header block.
    pub const LEN: usize = CHANGEMAP_HEADER_LEN;

    /// Encodes into a zeroed 4 KiB block.
    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = vec![0u8; CHANGEMAP_HEADER_LEN];
        let mut w = Writer::new(&mut bytes);
        w.u64(MAGIC);
        w.u16(VERSION);
        w.u16(0);
        w.u32(self.region_bytes);
        w.put(&self.volume_id);
        w.u64(self.generation);
        w.u64(self.base_seq);
        w.u64(self.region_count);
        w.u32(self.bitmap_crc);
        w.u32(0);
        assert_eq!(w.position(), CRC_AT);
        let crc = crc32fast::hash(&bytes[..CRC_AT]);
        bytes[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
        bytes
    }

    /// Decodes and validates the header.
    pub fn decode(bytes: &[u8]) -> Result<Self, FormatError> {
        check_fixed(bytes, CRC_AT + 4, MAGIC, 8, VERSION, CRC_AT)?;
        let mut r = Reader::new(bytes.get(12..).unwrap_or_default());
        let header = Self {
            region_bytes: r.u32()?,
            volume_id: r.take()?,
            generation: r.u64()?,
            base_seq: r.u64()?,
            region_count: r.u64()?,
            bitmap_crc: r.u32()?,
        };
        if !header.region_bytes.is_power_of_two() || header.region_bytes < 4096 {
            return Err(FormatError::InvalidField { field: "region_bytes", detail: header.region_bytes.to_string() });
        }
        Ok(header)
    }
}

const LAYER_MAGIC: u64 = u64::from_le_bytes(*b"KEELCLYR");
const LAYER_VERSION: u16 = 1;
const LAYER_CRC_AT: usize = 8 + 2 + 2 + 4 + 16 + 8 + 8 + 8 + 4 + 4;
/// A layer file's header occupies one 4 KiB block; the bitmap follows, laid out like
/// `changemap.bin`'s.
pub const CHANGE_LAYER_HEADER_LEN: usize = 4096;
const _: () = assert!(LAYER_CRC_AT + 4 <= CHANGE_LAYER_HEADER_LEN);
const _: () = assert!(CHANGE_LAYER_HEADER_LEN == CHANGEMAP_HEADER_LEN);

/// The header of an immutable change-map layer file (`changes-<start>-<end>.layer`): the
/// regions written by records with seq in `(start_seq, end_seq]`, cut at snapshot markers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChangeLayerHeader {
    /// Region size in bytes (a power of two, at least 4 KiB).
    pub region_bytes: u32,
    /// The volume the layer belongs to.
    pub volume_id: [u8; 16],
    /// The layer covers records with seq greater than this.
    pub start_seq: u64,
    /// ... and at most this (the seq of the snapshot marker that cut it); > `start_seq`.
    pub end_seq: u64,
    /// Number of regions (bits).
    pub region_count: u64,
    /// crc32 of the whole bitmap (`8 * ceil(region_count / 64)` bytes).
    pub bitmap_crc: u32,
}

impl ChangeLayerHeader {
    /// Length of the header block.
    pub const LEN: usize = CHANGE_LAYER_HEADER_LEN;

    /// Encodes into a zeroed 4 KiB block.
    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = vec![0u8; CHANGE_LAYER_HEADER_LEN];
        let mut w = Writer::new(&mut bytes);
        w.u64(LAYER_MAGIC);
        w.u16(LAYER_VERSION);
        w.u16(0);
        w.u32(self.region_bytes);
        w.put(&self.volume_id);
        w.u64(self.start_seq);
        w.u64(self.end_seq);
        w.u64(self.region_count);
        w.u32(self.bitmap_crc);
        w.u32(0);
        assert_eq!(w.position(), LAYER_CRC_AT);
        let crc = crc32fast::hash(&bytes[..LAYER_CRC_AT]);
        bytes[LAYER_CRC_AT..LAYER_CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
        bytes
    }

    /// Decodes and validates the header.
    pub fn decode(bytes: &[u8]) -> Result<Self, FormatError> {
        check_fixed(bytes, LAYER_CRC_AT + 4, LAYER_MAGIC, 8, LAYER_VERSION, LAYER_CRC_AT)?;
        let mut r = Reader::new(bytes.get(12..).unwrap_or_default());
        let header = Self {
            region_bytes: r.u32()?,
            volume_id: r.take()?,
            start_seq: r.u64()?,
            end_seq: r.u64()?,
            region_count: r.u64()?,
            bitmap_crc: r.u32()?,
        };
        if !header.region_bytes.is_power_of_two() || header.region_bytes < 4096 {
            return Err(FormatError::InvalidField { field: "region_bytes", detail: header.region_bytes.to_string() });
        }
        if header.end_seq <= header.start_seq {
            return Err(FormatError::InvalidField {
                field: "end_seq",
                detail: format!("{} is not after start_seq {}", header.end_seq, header.start_seq),
            });
        }
        Ok(header)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn layer() -> ChangeLayerHeader {
        ChangeLayerHeader {
            region_bytes: 65536,
            volume_id: [3; 16],
            start_seq: 10,
            end_seq: 42,
            region_count: 1000,
            bitmap_crc: 0x1234_5678,
        }
    }

    #[test]
    fn layer_header_round_trips_with_its_documented_offsets() {
        let bytes = layer().encode();
        assert_eq!(ChangeLayerHeader::decode(&bytes), Ok(layer()));
        // docs/format-volume.md: start_seq at 32, end_seq at 40, bitmap_crc at 56, crc at 64.
        assert_eq!(bytes[32..40], 10u64.to_le_bytes());
        assert_eq!(bytes[40..48], 42u64.to_le_bytes());
        assert_eq!(bytes[56..60], 0x1234_5678u32.to_le_bytes());
        assert_eq!(LAYER_CRC_AT, 64);
    }

    #[test]
    fn every_covered_bit_flip_in_a_layer_header_is_detected() {
        let bytes = layer().encode();
        for bit in 0..((LAYER_CRC_AT + 4) * 8) {
            let mut flipped = bytes.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            assert!(ChangeLayerHeader::decode(&flipped).is_err(), "bit {bit} flip undetected");
        }
    }

    #[test]
    fn empty_or_backwards_layer_ranges_are_rejected() {
        let backwards = ChangeLayerHeader { start_seq: 42, end_seq: 42, ..layer() };
        assert!(matches!(
            ChangeLayerHeader::decode(&backwards.encode()),
            Err(FormatError::InvalidField { field: "end_seq", .. })
        ));
        // A change-map header is not a layer header, and the other way round.
        let map = ChangeMapHeader {
            region_bytes: 65536,
            volume_id: [3; 16],
            generation: 1,
            base_seq: 0,
            region_count: 1000,
            bitmap_crc: 0,
        };
        assert!(matches!(ChangeLayerHeader::decode(&map.encode()), Err(FormatError::BadMagic { .. })));
        assert!(matches!(ChangeMapHeader::decode(&layer().encode()), Err(FormatError::BadMagic { .. })));
    }

    proptest! {
        #[test]
        fn layer_decoder_is_total(bytes in proptest::collection::vec(any::<u8>(), 0..4200)) {
            let _ = ChangeLayerHeader::decode(&bytes);
        }
    }
}
