//! `volume.hdr`: the volume's identity, geometry, epoch and checkpoint.

use super::{check_fixed, FormatError, Reader, Writer};

const MAGIC: u64 = u64::from_le_bytes(*b"KEELVOL\0");
const VERSION: u16 = 1;
/// Longest volume name, in bytes of UTF-8.
pub const NAME_MAX_BYTES: usize = 128;

const FIXED_LEN: usize = 8 + 2 + 2 + 4 + 16 + 8 * 8 + 4 + 4 + 2 + 2 + NAME_MAX_BYTES;
const CRC_AT: usize = FIXED_LEN;
/// The superblock occupies one 4 KiB block; the bytes after the crc are zero.
pub const SUPERBLOCK_LEN: usize = 4096;
const _: () = assert!(CRC_AT + 4 <= SUPERBLOCK_LEN);

/// The decoded superblock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    /// Random identity, shared by every file of the volume.
    pub volume_id: [u8; 16],
    /// Block size in bytes (4096).
    pub block_size: u32,
    /// Volume size in bytes, a multiple of `block_size`.
    pub size: u64,
    /// Generation of the volume's history (raised on every promotion).
    pub epoch: u64,
    /// Every record with `seq <= checkpoint_seq` is in the block store.
    pub checkpoint_seq: u64,
    /// Segment number where replay starts.
    pub checkpoint_segment: u64,
    /// Byte offset within that segment where replay starts.
    pub checkpoint_offset: u64,
    /// Size of each journal segment file.
    pub segment_bytes: u64,
    /// Most journal segment files the volume may use at once.
    pub segment_count_max: u32,
    /// Generation of the change map file this superblock trusts.
    pub changemap_generation: u64,
    /// Region size of the change map.
    pub change_region_bytes: u32,
    /// Size of each block-store extent file.
    pub extent_file_bytes: u64,
    /// The volume's name.
    pub name: String,
}

impl Superblock {
    /// Encodes into a zeroed 4 KiB block.
    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = vec![0u8; SUPERBLOCK_LEN];
        let name = self.name.as_bytes();
        let name_len = name.len().min(NAME_MAX_BYTES);
        let mut w = Writer::new(&mut bytes);
        w.u64(MAGIC);
        w.u16(VERSION);
        w.u16(0);
        w.u32(self.block_size);
        w.put(&self.volume_id);
        w.u64(self.size);
        w.u64(self.epoch);
        w.u64(self.checkpoint_seq);
        w.u64(self.checkpoint_segment);
        w.u64(self.checkpoint_offset);
        w.u64(self.segment_bytes);
        w.u64(self.changemap_generation);
        w.u64(self.extent_file_bytes);
        w.u32(self.change_region_bytes);
        w.u32(self.segment_count_max);
        w.u16(name_len as u16);
        w.u16(0);
        let mut name_field = [0u8; NAME_MAX_BYTES];
        name_field[..name_len].copy_from_slice(&name[..name_len]);
        w.put(&name_field);
        assert_eq!(w.position(), CRC_AT);
        let crc = crc32fast::hash(&bytes[..CRC_AT]);
        bytes[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
        bytes
    }

    /// Decodes and validates a superblock.
    pub fn decode(bytes: &[u8]) -> Result<Self, FormatError> {
        check_fixed(bytes, SUPERBLOCK_LEN, MAGIC, 8, VERSION, CRC_AT)?;
        let mut r = Reader::new(bytes.get(10..).unwrap_or_default());
        let _flags = r.u16()?;
        let block_size = r.u32()?;
        let volume_id = r.take::<16>()?;
        let size = r.u64()?;
        let epoch = r.u64()?;
        let checkpoint_seq = r.u64()?;
        let checkpoint_segment = r.u64()?;
        let checkpoint_offset = r.u64()?;
        let segment_bytes = r.u64()?;
        let changemap_generation = r.u64()?;
        let extent_file_bytes = r.u64()?;
        let change_region_bytes = r.u32()?;
        let segment_count_max = r.u32()?;
        let name_len = usize::from(r.u16()?);
        let _reserved = r.u16()?;
        let name_field = r.take::<NAME_MAX_BYTES>()?;
        let name_bytes = name_field.get(..name_len).ok_or_else(|| FormatError::InvalidField {
            field: "name_len",
            detail: format!("{name_len} > {NAME_MAX_BYTES}"),
        })?;
        let name = String::from_utf8(name_bytes.to_vec())
            .map_err(|_| FormatError::InvalidField { field: "name", detail: "not UTF-8".into() })?;
        let sb = Self {
            volume_id,
            block_size,
            size,
            epoch,
            checkpoint_seq,
            checkpoint_segment,
            checkpoint_offset,
            segment_bytes,
            segment_count_max,
            changemap_generation,
            change_region_bytes,
            extent_file_bytes,
            name,
        };
        sb.validate()?;
        Ok(sb)
    }

    fn validate(&self) -> Result<(), FormatError> {
        let invalid = |field: &'static str, detail: String| Err(FormatError::InvalidField { field, detail });
        if self.block_size != 4096 {
            return invalid("block_size", format!("{} (only 4096 is supported)", self.block_size));
        }
        if self.size == 0 || self.size % u64::from(self.block_size) != 0 {
            return invalid("size", format!("{} is not a positive multiple of the block size", self.size));
        }
        if self.segment_bytes < 1 << 20 || self.segment_bytes > 1 << 30 || self.segment_bytes % 4096 != 0 {
            return invalid("segment_bytes", self.segment_bytes.to_string());
        }
        if self.checkpoint_offset < super::SEGMENT_HEADER_LEN as u64 || self.checkpoint_offset > self.segment_bytes {
            return invalid("checkpoint_offset", self.checkpoint_offset.to_string());
        }
        // Far from any value a volume reaches, and leaving room for `+ 1` everywhere.
        if self.checkpoint_seq >= u64::MAX / 2 {
            return invalid("checkpoint_seq", self.checkpoint_seq.to_string());
        }
        if self.checkpoint_segment == 0 || self.checkpoint_segment >= u64::MAX / 2 {
            return invalid("checkpoint_segment", self.checkpoint_segment.to_string());
        }
        if self.segment_count_max < 2 || self.segment_count_max > 4096 {
            return invalid("segment_count_max", self.segment_count_max.to_string());
        }
        if !self.change_region_bytes.is_power_of_two() || !(4096..=1 << 30).contains(&self.change_region_bytes) {
            return invalid("change_region_bytes", self.change_region_bytes.to_string());
        }
        if self.extent_file_bytes == 0 || self.extent_file_bytes > 1 << 44 || self.extent_file_bytes % (1 << 20) != 0 {
            return invalid("extent_file_bytes", self.extent_file_bytes.to_string());
        }
        Ok(())
    }
}
