//! The on-disk layout of pack files and their index logs. The byte layout is defined here
//! and only here (field order in `encode`/`decode` *is* the format, with `const` asserts on
//! the sizes); docs/format-chunk.md, "Local chunk store", explains it.
//!
//! Every decoder here is total: it checks the length, then the magic, then the version (file
//! headers), then the crc, then the fields, and never panics on any input.

#![deny(clippy::indexing_slicing, clippy::unwrap_used, clippy::expect_used)]

use std::mem::size_of;

use crate::chunk::{MAX_CHUNK_LEN, OVERHEAD};
use crate::key::ChunkId;
use crate::layout::{self, Writer};

/// First four bytes of a pack file.
pub(super) const PACK_MAGIC: [u8; 4] = *b"KPAK";
/// First four bytes of an index log.
pub(super) const INDEX_MAGIC: [u8; 4] = *b"KPIX";
/// First four bytes of every index record: with the crc, what lets a reader find the next
/// record after damaged bytes.
pub(super) const RECORD_MAGIC: [u8; 4] = *b"KREC";

const CRC_LEN: usize = size_of::<u32>();
const HEADER_RESERVED_LEN: usize = 44;
const ID_LEN: usize = size_of::<ChunkId>();

/// File header of packs and index logs: magic, version, 3 reserved bytes, the pack's name,
/// reserved bytes, crc. One record long, so that records sit at multiples of
/// [`RECORD_LEN`] and never straddle a 512-byte sector.
pub(super) const HEADER_LEN: usize =
    size_of::<[u8; 4]>() + size_of::<u8>() + 3 + size_of::<u64>() + HEADER_RESERVED_LEN + CRC_LEN;
/// Index record: magic, kind, 3 reserved bytes, chunk id, frame offset, frame length,
/// written-at, crc.
pub(super) const RECORD_LEN: usize = size_of::<[u8; 4]>()
    + size_of::<u8>()
    + 3
    + ID_LEN
    + size_of::<u64>()
    + size_of::<u32>()
    + size_of::<i64>()
    + CRC_LEN;
/// Each frame in a pack is preceded by its chunk id, so a pack describes itself (a lost
/// index log can be rebuilt from it) and a read can check that an index record points at
/// the chunk it names.
pub(super) const ENTRY_ID_LEN: usize = ID_LEN;
/// The longest frame a record may describe.
pub(super) const MAX_FRAME_LEN: usize = MAX_CHUNK_LEN + OVERHEAD;

const _: () = assert!(HEADER_LEN == 64);
const _: () = assert!(RECORD_LEN == 64);
const _: () = assert!(HEADER_LEN % RECORD_LEN == 0);
const _: () = assert!(512 % RECORD_LEN == 0);
const _: () = assert!(MAX_FRAME_LEN <= u32::MAX as usize);

/// Versions of the pack and index formats (they change together). Old versions stay
/// readable forever.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(super) enum PackVersion {
    /// 2026: the first pack format.
    V1 = 1,
}

impl PackVersion {
    /// The version new files are written in.
    pub(super) const CURRENT: PackVersion = PackVersion::V1;

    fn from_u8(byte: u8) -> Option<Self> {
        match byte {
            1 => Some(PackVersion::V1),
            _ => None,
        }
    }
}

/// Which of the two files of a pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum FileKind {
    /// `<name>.pack`: the header, then (id, frame) entries back to back.
    Pack,
    /// `<name>.idx`: the header, then fixed-size records.
    Index,
}

impl FileKind {
    fn magic(self) -> [u8; 4] {
        match self {
            FileKind::Pack => PACK_MAGIC,
            FileKind::Index => INDEX_MAGIC,
        }
    }

    fn suffix(self) -> &'static str {
        match self {
            FileKind::Pack => ".pack",
            FileKind::Index => ".idx",
        }
    }
}

/// `<16 lowercase hex digits>.pack` or `.idx`.
pub(super) fn file_name(name: u64, kind: FileKind) -> String {
    format!("{name:016x}{}", kind.suffix())
}

/// The pack name and kind of a file name, or `None` for any other name.
pub(super) fn parse_file_name(file_name: &str) -> Option<(u64, FileKind)> {
    for kind in [FileKind::Pack, FileKind::Index] {
        if let Some(hex) = file_name.strip_suffix(kind.suffix()) {
            if hex.len() == 16 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
                return u64::from_str_radix(hex, 16).ok().map(|name| (name, kind));
            }
        }
    }
    None
}

/// Encodes the header of pack `name`'s file of `kind`.
pub(super) fn encode_header(kind: FileKind, name: u64) -> [u8; HEADER_LEN] {
    let mut out = [0u8; HEADER_LEN];
    let mut w = Writer(&mut out);
    w.put(&kind.magic());
    w.put(&[PackVersion::CURRENT as u8]);
    w.put(&[0; 3]);
    w.put(&name.to_le_bytes());
    w.put(&[0; HEADER_RESERVED_LEN]);
    debug_assert!(w.0.len() == CRC_LEN, "header fields must fill HEADER_LEN exactly");
    seal_crc(&mut out);
    out
}

/// Checks the header of a file of `kind` that should belong to pack `name`: length, magic,
/// version, crc, reserved bytes, then the name. The error says what is wrong.
pub(super) fn check_header(kind: FileKind, name: u64, bytes: &[u8]) -> Result<PackVersion, String> {
    let Some((header, _)) = bytes.split_first_chunk::<HEADER_LEN>() else {
        return Err(format!("{} bytes, shorter than the {HEADER_LEN}-byte header", bytes.len()));
    };
    let mut r: &[u8] = header;
    let magic: [u8; 4] = take(&mut r)?;
    if magic != kind.magic() {
        return Err(format!("magic {magic:02x?}, expected {:?}", String::from_utf8_lossy(&kind.magic())));
    }
    let [version] = take(&mut r)?;
    let version = PackVersion::from_u8(version).ok_or_else(|| format!("unsupported format version {version}"))?;
    let (covered, crc) = header.split_last_chunk::<CRC_LEN>().ok_or("header too short")?;
    let (expected, got) = (u32::from_le_bytes(*crc), crc32fast::hash(covered));
    if expected != got {
        return Err(format!("header checksum mismatch: stored crc32 {expected:#010x}, computed {got:#010x}"));
    }
    let reserved: [u8; 3] = take(&mut r)?;
    let found = u64::from_le_bytes(take(&mut r)?);
    let reserved_tail: [u8; HEADER_RESERVED_LEN] = take(&mut r)?;
    if reserved != [0; 3] || reserved_tail.iter().any(|&b| b != 0) {
        return Err("reserved header bytes are not zero".into());
    }
    if found != name {
        return Err(format!("header names pack {found:016x}, not {name:016x}"));
    }
    Ok(version)
}

/// What an index record says about a copy of a chunk in its pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(super) enum RecordKind {
    /// The frame at `offset` (preceded by its id) is chunk `id`, durable.
    Stored = 1,
    /// The copy of `id` at `offset` is removed (garbage collection, or healing).
    Removed = 2,
}

/// One index record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Record {
    pub(super) kind: RecordKind,
    pub(super) id: ChunkId,
    /// Offset of the frame in the pack (after its id).
    pub(super) offset: u64,
    /// Length of the frame.
    pub(super) len: u32,
    /// When the chunk was written, unix seconds (garbage collection keeps chunks written
    /// after it started).
    pub(super) written: i64,
}

impl Record {
    pub(super) fn encode(&self) -> [u8; RECORD_LEN] {
        let mut out = [0u8; RECORD_LEN];
        let mut w = Writer(&mut out);
        w.put(&RECORD_MAGIC);
        w.put(&[self.kind as u8]);
        w.put(&[0; 3]);
        w.put(&self.id.0);
        w.put(&self.offset.to_le_bytes());
        w.put(&self.len.to_le_bytes());
        w.put(&self.written.to_le_bytes());
        debug_assert!(w.0.len() == CRC_LEN, "record fields must fill RECORD_LEN exactly");
        seal_crc(&mut out);
        out
    }

    /// Decodes a record: magic, crc, then the fields' own invariants (kind known, reserved
    /// zero, a frame offset past the pack header, a frame length a chunk can have).
    pub(super) fn decode(bytes: &[u8; RECORD_LEN]) -> Result<Record, &'static str> {
        let mut r: &[u8] = bytes;
        let magic: [u8; 4] = take(&mut r).map_err(|_| "short")?;
        if magic != RECORD_MAGIC {
            return Err("bad record magic");
        }
        let (covered, crc) = bytes.split_last_chunk::<CRC_LEN>().ok_or("short")?;
        if u32::from_le_bytes(*crc) != crc32fast::hash(covered) {
            return Err("record checksum mismatch");
        }
        let short = |_| "short";
        let [kind] = take(&mut r).map_err(short)?;
        let reserved: [u8; 3] = take(&mut r).map_err(short)?;
        let id = ChunkId(take(&mut r).map_err(short)?);
        let offset = u64::from_le_bytes(take(&mut r).map_err(short)?);
        let len = u32::from_le_bytes(take(&mut r).map_err(short)?);
        let written = i64::from_le_bytes(take(&mut r).map_err(short)?);
        let kind = match kind {
            1 => RecordKind::Stored,
            2 => RecordKind::Removed,
            _ => return Err("unknown record kind"),
        };
        if reserved != [0; 3] {
            return Err("reserved record bytes are not zero");
        }
        let record = Record { kind, id, offset, len, written };
        if record.offset < (HEADER_LEN + ENTRY_ID_LEN) as u64 {
            return Err("frame offset inside the pack header");
        }
        if (record.len as usize) < OVERHEAD || record.len as usize > MAX_FRAME_LEN {
            return Err("frame length impossible for a chunk");
        }
        Ok(record)
    }

    /// The end of the frame in the pack; `None` when it overflows (never for a decoded
    /// record, whose offset is a u64 and length a u32, unless the offset is near u64::MAX).
    pub(super) fn end(&self) -> Option<u64> {
        self.offset.checked_add(u64::from(self.len))
    }
}

/// The valid records found in a stretch of an index log.
#[derive(Debug, Default)]
pub(super) struct Scan {
    /// The records, in log order, with the log offset each was found at.
    pub(super) records: Vec<(u64, Record)>,
    /// Log offset just past the last valid record (or where the scan started): where the
    /// next scan resumes. Bytes after it are a torn or in-flight tail.
    pub(super) resume: u64,
    /// Bytes skipped between valid records (damage, or a torn write that other records
    /// were appended after).
    pub(super) skipped_bytes: u64,
}

/// Scans `bytes`, which start at log offset `start`, for records.
///
/// Records normally sit back to back. After bytes that are not a valid record (a flipped
/// bit, or a torn write that another process appended after), the scan moves on byte by
/// byte to the next valid record instead of stopping: a record is accepted only with its
/// magic and crc, and every record ever written points at bytes that were durable before it
/// was written, so a valid record after damage is as good as one before it. Stopping would
/// hide every later record (removals appended by other processes after a crash-torn tail).
pub(super) fn scan(bytes: &[u8], start: u64) -> Scan {
    let mut out = Scan { resume: start, ..Scan::default() };
    let mut at = 0usize;
    let mut bad_since: Option<usize> = None;
    while let Some(window) = bytes.get(at..).and_then(|rest| rest.first_chunk::<RECORD_LEN>()) {
        match Record::decode(window) {
            Ok(record) => {
                if let Some(bad) = bad_since.take() {
                    out.skipped_bytes += (at - bad) as u64;
                }
                out.records.push((start + at as u64, record));
                at += RECORD_LEN;
                out.resume = start + at as u64;
            }
            Err(_) => {
                bad_since.get_or_insert(at);
                at += 1;
            }
        }
    }
    out
}

/// Fills the last four bytes of `buf` with the crc32 of the bytes before them.
fn seal_crc(buf: &mut [u8]) {
    if let Some((covered, crc)) = buf.split_last_chunk_mut::<CRC_LEN>() {
        *crc = crc32fast::hash(covered).to_le_bytes();
    }
}

/// Takes `N` bytes off the front of `r`; total (never panics).
fn take<const N: usize>(r: &mut &[u8]) -> Result<[u8; N], String> {
    layout::take(r).ok_or_else(|| "too short".to_owned())
}
