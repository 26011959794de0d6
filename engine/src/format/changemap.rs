//! `changemap.bin`: which regions of the volume changed since a base sequence number.

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
