//! Every on-disk layout of a volume, each defined once, here, and described with byte
//! diagrams in docs/format-volume.md and docs/format-journal.md.
//!
//! All integers are little-endian. Every structure starts with a magic number and a format
//! version and ends its fixed part with a crc32 (crc32fast, IEEE polynomial). Decoders are
//! total: they check length, then magic, then version, then checksum, before they look at
//! anything else, and return [`FormatError`] for any input, never panic.

mod changemap;
mod record;
mod segment;
mod superblock;

pub use changemap::{ChangeLayerHeader, ChangeMapHeader, CHANGEMAP_HEADER_LEN, CHANGE_LAYER_HEADER_LEN};
pub use record::{RecordHeader, RecordKind, FLAG_MAY_PUNCH, RECORD_ALIGN, RECORD_HEADER_LEN, RECORD_MAGIC};
pub use segment::{SegmentHeader, SlotState, SEGMENT_HEADER_COPY_LEN, SEGMENT_HEADER_LEN};
pub use superblock::{Superblock, NAME_MAX_BYTES, SUPERBLOCK_LEN};

/// Why bytes failed to decode. Callers add the file and position.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// Fewer bytes than the structure needs.
    #[error("truncated: need {need} bytes, have {have}")]
    Truncated {
        /// Bytes required.
        need: usize,
        /// Bytes available.
        have: usize,
    },
    /// The magic number is wrong: not this kind of structure at all.
    #[error("bad magic {found:#x} (expected {expected:#x})")]
    BadMagic {
        /// Expected magic.
        expected: u64,
        /// Magic found.
        found: u64,
    },
    /// A version this binary cannot read.
    #[error("unsupported format version {found} (this build reads {supported})")]
    UnsupportedVersion {
        /// Version found.
        found: u16,
        /// Highest version this build reads.
        supported: u16,
    },
    /// The checksum does not match the contents.
    #[error("checksum mismatch (expected {expected:#010x}, got {got:#010x})")]
    ChecksumMismatch {
        /// Checksum stored in the structure.
        expected: u32,
        /// Checksum computed over the bytes.
        got: u32,
    },
    /// The checksum matched but a field holds an impossible value.
    #[error("invalid field {field}: {detail}")]
    InvalidField {
        /// The field's name.
        field: &'static str,
        /// What is wrong with it.
        detail: String,
    },
}

/// A bounds-checked little-endian cursor over untrusted bytes.
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Self { bytes }
    }

    pub(crate) fn take<const N: usize>(&mut self) -> Result<[u8; N], FormatError> {
        let (head, rest) =
            self.bytes.split_first_chunk::<N>().ok_or(FormatError::Truncated { need: N, have: self.bytes.len() })?;
        self.bytes = rest;
        Ok(*head)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, FormatError> {
        Ok(u8::from_le_bytes(self.take()?))
    }
    pub(crate) fn u16(&mut self) -> Result<u16, FormatError> {
        Ok(u16::from_le_bytes(self.take()?))
    }
    pub(crate) fn u32(&mut self) -> Result<u32, FormatError> {
        Ok(u32::from_le_bytes(self.take()?))
    }
    pub(crate) fn u64(&mut self) -> Result<u64, FormatError> {
        Ok(u64::from_le_bytes(self.take()?))
    }
}

/// A little-endian writer into a fixed, zero-initialised buffer (no uninitialised padding
/// can leak to disk).
pub(crate) struct Writer<'a> {
    bytes: &'a mut [u8],
    pos: usize,
}

impl<'a> Writer<'a> {
    pub(crate) fn new(bytes: &'a mut [u8]) -> Self {
        Self { bytes, pos: 0 }
    }
    pub(crate) fn put(&mut self, value: &[u8]) {
        // Writers encode fixed layouts into buffers sized by the same constants; running
        // past the end is a bug in this module, not bad input.
        self.bytes[self.pos..self.pos + value.len()].copy_from_slice(value);
        self.pos += value.len();
    }
    pub(crate) fn u8(&mut self, v: u8) {
        self.put(&v.to_le_bytes());
    }
    pub(crate) fn u16(&mut self, v: u16) {
        self.put(&v.to_le_bytes());
    }
    pub(crate) fn u32(&mut self, v: u32) {
        self.put(&v.to_le_bytes());
    }
    pub(crate) fn u64(&mut self, v: u64) {
        self.put(&v.to_le_bytes());
    }
    pub(crate) fn position(&self) -> usize {
        self.pos
    }
}

/// Checks the magic, version and crc of a fixed-size structure whose crc covers
/// `bytes[..crc_at]` and is stored at `bytes[crc_at..crc_at + 4]`.
pub(crate) fn check_fixed(
    bytes: &[u8],
    len: usize,
    magic: u64,
    magic_len: usize,
    version: u16,
    crc_at: usize,
) -> Result<(), FormatError> {
    if bytes.len() < len {
        return Err(FormatError::Truncated { need: len, have: bytes.len() });
    }
    let mut reader = Reader::new(bytes);
    let found = if magic_len == 8 { reader.u64()? } else { u64::from(reader.u32()?) };
    if found != magic {
        return Err(FormatError::BadMagic { expected: magic, found });
    }
    let found_version = reader.u16()?;
    if found_version == 0 || found_version > version {
        return Err(FormatError::UnsupportedVersion { found: found_version, supported: version });
    }
    let covered = bytes.get(..crc_at).ok_or(FormatError::Truncated { need: crc_at, have: bytes.len() })?;
    let stored = Reader::new(bytes.get(crc_at..).unwrap_or_default()).u32()?;
    let computed = crc32fast::hash(covered);
    if stored != computed {
        return Err(FormatError::ChecksumMismatch { expected: stored, got: computed });
    }
    Ok(())
}

#[cfg(test)]
mod tests;
