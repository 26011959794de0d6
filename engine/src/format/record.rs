//! Journal records: a fixed header, then the payload, padded to [`RECORD_ALIGN`].

use super::{FormatError, Reader, Writer};

/// The first four bytes of every record.
pub const RECORD_MAGIC: [u8; 4] = *b"KJRN";
const MAGIC: u32 = u32::from_le_bytes(RECORD_MAGIC);
const VERSION: u16 = 1;
/// Bytes of the fixed record header (the crc is its last field).
pub const RECORD_HEADER_LEN: usize = 4 + 2 + 1 + 1 + 8 + 8 + 8 + 8 + 4 + 4;
const CRC_AT: usize = RECORD_HEADER_LEN - 4;
/// Records start on multiples of this many bytes within a segment.
pub const RECORD_ALIGN: usize = 8;
const _: () = assert!(RECORD_HEADER_LEN % RECORD_ALIGN == 0);

/// What a record does to the volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordKind {
    /// `length` bytes of payload written at `offset`.
    Write = 1,
    /// `[offset, offset+length)` reads as zeros afterwards. Flag bit 0: may deallocate.
    Zero = 2,
    /// `[offset, offset+length)` is discarded (reads as zeros in Keel).
    Trim = 3,
    /// Written after a group commit: every record with `seq <= offset` was durable before
    /// this record was written. Lets recovery tell a torn tail from corruption.
    Barrier = 4,
    /// A snapshot point; the payload is the snapshot's name (UTF-8).
    Snapshot = 5,
}

impl RecordKind {
    fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            1 => Self::Write,
            2 => Self::Zero,
            3 => Self::Trim,
            4 => Self::Barrier,
            5 => Self::Snapshot,
            _ => return None,
        })
    }

    /// Name used in inspection output.
    pub fn name(self) -> &'static str {
        match self {
            Self::Write => "write",
            Self::Zero => "zero",
            Self::Trim => "trim",
            Self::Barrier => "barrier",
            Self::Snapshot => "snapshot",
        }
    }
}

/// Flag on [`RecordKind::Zero`]: the range may be deallocated (punched).
pub const FLAG_MAY_PUNCH: u8 = 1;

/// The decoded fixed part of a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    /// What the record does.
    pub kind: RecordKind,
    /// Kind-specific flags.
    pub flags: u8,
    /// Position in the volume's total write order.
    pub seq: u64,
    /// Epoch the record was written in.
    pub epoch: u64,
    /// Byte offset on the volume (for barriers: the durable seq).
    pub offset: u64,
    /// Bytes of the volume affected.
    pub length: u64,
    /// Bytes of payload after the header.
    pub payload_len: u32,
    /// crc32 over the segment nonce, the header (without this field) and the payload.
    pub crc: u32,
}

impl RecordHeader {
    /// Size of the whole record on disk, header plus payload plus padding.
    pub fn encoded_len(payload_len: usize) -> usize {
        (RECORD_HEADER_LEN + payload_len).next_multiple_of(RECORD_ALIGN)
    }

    /// Encodes this header (its `payload_len` and `crc` are ignored and recomputed) and
    /// `payload` into `out`, which is cleared first and zero-padded to [`RECORD_ALIGN`].
    /// `nonce` is the segment's (see [`SegmentHeader`](super::SegmentHeader)): the crc
    /// covers it, so the record only validates in this use of its slot.
    pub fn encode_into(&self, payload: &[u8], nonce: u64, out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(&self.encode_header(payload, nonce));
        out.extend_from_slice(payload);
        out.resize(Self::encoded_len(payload.len()), 0);
    }

    /// The record's header bytes for `payload` (crc included); the record on disk is these,
    /// then the payload, then [`RecordHeader::padding_len`] zero bytes. Lets a writer send
    /// the payload from where it is instead of copying it next to the header.
    pub fn encode_header(&self, payload: &[u8], nonce: u64) -> [u8; RECORD_HEADER_LEN] {
        let mut out = [0u8; RECORD_HEADER_LEN];
        let payload_len = u32::try_from(payload.len()).expect("payload bounded by segment size");
        let mut w = Writer::new(&mut out);
        w.u32(MAGIC);
        w.u16(VERSION);
        w.u8(self.kind as u8);
        w.u8(self.flags);
        w.u64(self.seq);
        w.u64(self.epoch);
        w.u64(self.offset);
        w.u64(self.length);
        w.u32(payload_len);
        assert_eq!(w.position(), CRC_AT);
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&nonce.to_le_bytes());
        hasher.update(&out[..CRC_AT]);
        hasher.update(payload);
        let crc = hasher.finalize();
        out[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Zero bytes after a payload of `payload_len` bytes, up to [`RECORD_ALIGN`].
    pub fn padding_len(payload_len: usize) -> usize {
        Self::encoded_len(payload_len) - RECORD_HEADER_LEN - payload_len
    }

    /// A header for a new record; `payload_len` and `crc` are filled in by
    /// [`RecordHeader::encode_into`].
    pub fn new(kind: RecordKind, flags: u8, seq: u64, epoch: u64, offset: u64, length: u64) -> Self {
        Self { kind, flags, seq, epoch, offset, length, payload_len: 0, crc: 0 }
    }

    /// Decodes the header, checking magic, version and field sanity, but not the crc
    /// (which needs the payload: see [`RecordHeader::verify`]).
    pub fn decode(bytes: &[u8]) -> Result<Self, FormatError> {
        let mut r = Reader::new(bytes);
        if bytes.len() < RECORD_HEADER_LEN {
            return Err(FormatError::Truncated { need: RECORD_HEADER_LEN, have: bytes.len() });
        }
        let magic = r.u32()?;
        if magic != MAGIC {
            return Err(FormatError::BadMagic { expected: u64::from(MAGIC), found: u64::from(magic) });
        }
        let version = r.u16()?;
        if version == 0 || version > VERSION {
            return Err(FormatError::UnsupportedVersion { found: version, supported: VERSION });
        }
        let kind_byte = r.u8()?;
        let kind = RecordKind::from_u8(kind_byte)
            .ok_or_else(|| FormatError::InvalidField { field: "kind", detail: kind_byte.to_string() })?;
        let header = Self {
            kind,
            flags: r.u8()?,
            seq: r.u64()?,
            epoch: r.u64()?,
            offset: r.u64()?,
            length: r.u64()?,
            payload_len: r.u32()?,
            crc: r.u32()?,
        };
        let payload_ok = match kind {
            RecordKind::Write => u64::from(header.payload_len) == header.length,
            RecordKind::Zero | RecordKind::Trim | RecordKind::Barrier => header.payload_len == 0,
            RecordKind::Snapshot => true,
        };
        if !payload_ok {
            return Err(FormatError::InvalidField {
                field: "payload_len",
                detail: format!("{} for a {} of length {}", header.payload_len, kind.name(), header.length),
            });
        }
        Ok(header)
    }

    /// Checks the crc against the segment's nonce, the header bytes and the payload.
    pub fn verify(&self, header_bytes: &[u8], payload: &[u8], nonce: u64) -> Result<(), FormatError> {
        let covered =
            header_bytes.get(..CRC_AT).ok_or(FormatError::Truncated { need: CRC_AT, have: header_bytes.len() })?;
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&nonce.to_le_bytes());
        hasher.update(covered);
        hasher.update(payload);
        let got = hasher.finalize();
        if got != self.crc {
            return Err(FormatError::ChecksumMismatch { expected: self.crc, got });
        }
        Ok(())
    }

    /// Total on-disk size of this record.
    pub fn total_len(&self) -> usize {
        Self::encoded_len(self.payload_len as usize)
    }
}
