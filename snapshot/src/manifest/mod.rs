//! Snapshot manifests: which chunk holds each chunk-sized piece of a volume at one marker.
//!
//! A manifest is a 96-byte header followed by an rkyv archive (docs/format-manifest.md has
//! the byte diagrams):
//!
//! - the header carries magic `KMAN`, the format version, the body length, a crc32 of the
//!   body, a keyed BLAKE3 MAC (the tenant's manifest subkey) over the header's first 24
//!   bytes and the body, and a crc32 of the header itself;
//! - the body is validated with rkyv's bytecheck on every load (never trusted), then read
//!   in place (memory-mapped when local), never deserialized.
//!
//! Since version 3 the body does not list the chunks itself. It lists *index chunks*
//! ([`piece`]): each holds the ids of [`INDEX_FANOUT`] consecutive chunks and is stored,
//! sealed and deduplicated like a data chunk. A snapshot that changed a few chunks of a
//! large volume writes only the index chunks over them (plus 32 bytes per 128 MiB of
//! volume in the manifest), and shares the rest with its parent: the cost of a snapshot
//! follows the change, not the volume. Versions 1 and 2 list every chunk inline and are
//! still read. [`ChunkMap`] reads the entries of any version, loading index chunks from
//! the vaults as they are needed.
//!
//! Structure can be checked without the key ([`Manifest::from_bytes`]: crcs and rkyv
//! validation). Restores and copies also call [`Manifest::authenticate`]; reading the
//! entries of a version 3 manifest needs the key (the index chunks are encrypted).
//!
//! Manifests are written last: a snapshot whose manifest is absent does not exist, so an
//! interrupted upload is invisible and the next attempt resumes by skipping the chunks
//! already there.

use std::fs::File;
use std::ops::Deref;
use std::path::Path;

use memmap2::Mmap;
use rkyv::rancor;
use rkyv::util::AlignedVec;

use crate::error::ManifestError;
use crate::key::{ChunkId, TenantKey};

mod map;
pub mod piece;

pub use map::{ChunkMap, Piece};

/// The four magic bytes at the start of every manifest.
pub const MANIFEST_MAGIC: [u8; 4] = *b"KMAN";
/// Length of the fixed header; a multiple of 16 so the rkyv body stays aligned.
pub const MANIFEST_HEADER_LEN: usize = 96;
/// The newest format version: 3, the chunk ids in index chunks. This build writes version
/// 3 and reads 1, 2 and 3.
pub const MANIFEST_VERSION: u16 = 3;
/// Largest body accepted (rkyv's 32-bit relative pointers). Inline (versions 1 and 2):
/// 32 Mi chunks, 2 TiB of volume at 64 KiB chunks. Indexed (version 3): 32 Mi index
/// chunks, far beyond any volume (16 TiB at 4 KiB chunks needs 2 Mi).
pub const MAX_MANIFEST_BODY: u64 = 1 << 30;
/// Chunk ids per index chunk written by this build: an index chunk of 64 KiB of ids
/// covers 128 MiB of volume at 64 KiB chunks.
pub const INDEX_FANOUT: u32 = 2048;
/// Smallest and largest fanout a manifest may declare (powers of two).
pub const FANOUT_RANGE: std::ops::RangeInclusive<u32> = 16..=16384;
/// The id stored for a chunk that is all zeros (a hole: nothing stored, reads as zeros).
pub const HOLE: [u8; 32] = [0; 32];

/// Counts recorded when the snapshot was taken.
#[derive(Debug, Clone, Default, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug))]
pub struct StatsV1 {
    /// Chunks read from the volume (the changed ones, or all on a full read).
    pub chunks_read: u64,
    /// Chunks that are holes (all zeros).
    pub zero_chunks: u64,
    /// Data chunks this snapshot uploaded because the store did not have them (its index
    /// chunks are not counted: `CreateReport::index_written`).
    pub new_chunks: u64,
    /// Encoded bytes of those new chunks.
    pub new_stored_bytes: u64,
    /// Plaintext bytes of those new chunks.
    pub new_plain_bytes: u64,
}

/// The body of a version 1 manifest. Never change a released layout: add `ManifestV2`.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug))]
pub struct ManifestV1 {
    /// The snapshot's id, unique within the volume (`20261130T070000Z-1a2b3c4d`).
    pub snapshot_id: String,
    /// The volume it is a snapshot of.
    pub volume: String,
    /// The journal marker's name.
    pub marker: String,
    /// The node that read the volume.
    pub node: String,
    /// [`TenantKey::key_id`] of the key it was written with.
    pub key_id: [u8; 8],
    /// When the marker was appended, unix seconds UTC.
    pub created_unix: i64,
    /// The marker's journal seq: the snapshot is the volume exactly after this record.
    pub marker_seq: u64,
    /// The parent snapshot's id when the snapshot was taken incrementally.
    pub parent: Option<String>,
    /// True when every chunk was read because the change map could not answer.
    pub full_read: bool,
    /// Volume size in bytes.
    pub volume_size: u64,
    /// Chunk size in bytes; the last chunk may be shorter.
    pub chunk_size: u32,
    /// Counts recorded while taking the snapshot.
    pub stats: StatsV1,
    /// One id per chunk, in volume order; [`HOLE`] for all-zero chunks.
    pub chunks: Vec<[u8; 32]>,
}

impl ManifestV1 {
    /// Number of chunks a volume of `size` bytes has at `chunk_size`.
    pub fn chunk_count(size: u64, chunk_size: u32) -> u64 {
        size.div_ceil(u64::from(chunk_size.max(1)))
    }
}

/// The consistency group a snapshot belongs to: the volumes frozen at the same instant
/// (one marker appended under all their journal locks), each with its own manifest under
/// the same snapshot id.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug))]
pub struct GroupV2 {
    /// The group's name (`[[snapshots.group]] name`).
    pub name: String,
    /// Every member volume, sorted, this one included.
    pub members: Vec<String>,
}

/// The body of a version 2 manifest: a version 1 body and the group.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug))]
pub struct ManifestV2 {
    /// Everything a version 1 manifest holds.
    pub base: ManifestV1,
    /// The consistency group.
    pub group: GroupV2,
}

/// The body of a version 3 manifest: the chunk ids live in index chunks.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug))]
pub struct ManifestV3 {
    /// Everything a version 1 manifest holds, except that `base.chunks` is empty.
    pub base: ManifestV1,
    /// The consistency group, for a member of one.
    pub group: Option<GroupV2>,
    /// Chunk ids per index chunk (a power of two in [`FANOUT_RANGE`]); the last index
    /// chunk holds the rest.
    pub fanout: u32,
    /// One id per index chunk, in volume order; [`HOLE`] for a range that is all holes
    /// (nothing stored).
    pub index: Vec<[u8; 32]>,
}

impl ManifestV3 {
    /// Number of index chunks for `chunk_count` chunks at `fanout`.
    pub fn index_count(chunk_count: u64, fanout: u32) -> u64 {
        chunk_count.div_ceil(u64::from(fanout.max(1)))
    }
}

/// How a manifest holds its chunk ids.
#[derive(Debug, Clone, Copy)]
pub enum Layout<'a> {
    /// Versions 1 and 2: every chunk id, in volume order.
    Inline(&'a [[u8; 32]]),
    /// Version 3: index chunk ids, each covering `fanout` chunks.
    Indexed {
        /// Chunk ids per index chunk.
        fanout: u32,
        /// One id per index chunk; [`HOLE`] for an all-hole range.
        index: &'a [[u8; 32]],
    },
}

/// One entry of a manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkRef {
    /// All zeros; nothing is stored.
    Hole,
    /// The chunk with this id.
    Data(ChunkId),
}

impl ChunkRef {
    /// The raw id ([`HOLE`] for a hole).
    pub fn raw(&self) -> [u8; 32] {
        match self {
            ChunkRef::Hole => HOLE,
            ChunkRef::Data(id) => id.0,
        }
    }

    /// The entry for a raw id ([`HOLE`] is a hole).
    pub fn from_raw(raw: &[u8; 32]) -> Self {
        if *raw == HOLE {
            ChunkRef::Hole
        } else {
            ChunkRef::Data(ChunkId(*raw))
        }
    }
}

/// Serializes `manifest` and seals it with `key` as a version 3 manifest: the bytes to
/// store. Its index chunks must be stored before it ([`crate::create`] does both).
pub fn encode_manifest(key: &TenantKey, manifest: &ManifestV3) -> Result<Vec<u8>, ManifestError> {
    let base = &manifest.base;
    if base.key_id != key.key_id() {
        return Err(ManifestError::Encode("the manifest's key_id is not this key's".into()));
    }
    if let Some(group) = &manifest.group {
        check_group(group, &base.volume).map_err(ManifestError::Encode)?;
    }
    check_index(base, manifest.fanout, manifest.index.len()).map_err(ManifestError::Encode)?;
    let body = rkyv::to_bytes::<rancor::Error>(manifest).map_err(|e| ManifestError::Encode(e.to_string()))?;
    seal(key, 3, &body)
}

/// Writes a version 1 manifest (every chunk inline), as builds before version 3 did:
/// kept so the reader of old manifests stays tested.
#[cfg(any(test, feature = "testing"))]
pub fn encode_manifest_v1(key: &TenantKey, manifest: &ManifestV1) -> Result<Vec<u8>, ManifestError> {
    check_inline(key, manifest)?;
    let body = rkyv::to_bytes::<rancor::Error>(manifest).map_err(|e| ManifestError::Encode(e.to_string()))?;
    seal(key, 1, &body)
}

/// Writes a version 2 manifest (a group member, every chunk inline), as builds before
/// version 3 did: kept so the reader of old manifests stays tested.
#[cfg(any(test, feature = "testing"))]
pub fn encode_manifest_v2(key: &TenantKey, manifest: &ManifestV2) -> Result<Vec<u8>, ManifestError> {
    check_inline(key, &manifest.base)?;
    check_group(&manifest.group, &manifest.base.volume).map_err(ManifestError::Encode)?;
    let body = rkyv::to_bytes::<rancor::Error>(manifest).map_err(|e| ManifestError::Encode(e.to_string()))?;
    seal(key, 2, &body)
}

#[cfg(any(test, feature = "testing"))]
fn check_inline(key: &TenantKey, manifest: &ManifestV1) -> Result<(), ManifestError> {
    if manifest.key_id != key.key_id() {
        return Err(ManifestError::Encode("the manifest's key_id is not this key's".into()));
    }
    let expected = ManifestV1::chunk_count(manifest.volume_size, manifest.chunk_size);
    if manifest.chunk_size == 0 || manifest.chunks.len() as u64 != expected {
        return Err(ManifestError::Encode(format!(
            "{} chunk entries for a {}-byte volume at {}-byte chunks (expected {expected})",
            manifest.chunks.len(),
            manifest.volume_size,
            manifest.chunk_size
        )));
    }
    Ok(())
}

/// A group's members must be sorted, unique, and include `volume`.
fn check_group(group: &GroupV2, volume: &str) -> Result<(), String> {
    check_members(&group.name, group.members.iter().map(String::as_str), volume)
}

fn check_members<'a>(name: &str, members: impl Iterator<Item = &'a str> + Clone, volume: &str) -> Result<(), String> {
    let sorted = members.clone().zip(members.clone().skip(1)).all(|(a, b)| a < b);
    if !sorted || !members.clone().any(|m| m == volume) {
        return Err(format!(
            "group {name:?}: members {:?} are not sorted and unique, or lack volume {volume:?}",
            members.collect::<Vec<_>>()
        ));
    }
    Ok(())
}

/// A version 3 body's shape: no inline chunks, a fanout in range, one index entry per
/// `fanout` chunks.
fn check_index(base: &ManifestV1, fanout: u32, index_len: usize) -> Result<(), String> {
    check_index_shape(base.volume_size, base.chunk_size, base.chunks.len(), fanout, index_len)
}

fn check_index_shape(size: u64, chunk_size: u32, inline: usize, fanout: u32, index_len: usize) -> Result<(), String> {
    if chunk_size == 0 {
        return Err("chunk size 0".into());
    }
    if inline != 0 {
        return Err(format!("{inline} inline chunk entries in an indexed manifest"));
    }
    if !fanout.is_power_of_two() || !FANOUT_RANGE.contains(&fanout) {
        return Err(format!("index fanout {fanout} is not a power of two in {FANOUT_RANGE:?}"));
    }
    let expected = ManifestV3::index_count(ManifestV1::chunk_count(size, chunk_size), fanout);
    if index_len as u64 != expected {
        return Err(format!(
            "{index_len} index entries for a {size}-byte volume at {chunk_size}-byte chunks and fanout {fanout} \
             (expected {expected})"
        ));
    }
    Ok(())
}

/// The header for `body` of format `version`, then the body.
fn seal(key: &TenantKey, version: u16, body: &[u8]) -> Result<Vec<u8>, ManifestError> {
    if body.len() as u64 > MAX_MANIFEST_BODY {
        return Err(ManifestError::Encode(format!("body of {} bytes exceeds {MAX_MANIFEST_BODY}", body.len())));
    }
    let mut out = Vec::with_capacity(MANIFEST_HEADER_LEN + body.len());
    out.extend_from_slice(&MANIFEST_MAGIC);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&(MANIFEST_HEADER_LEN as u16).to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes()); // flags
    let mac = key.manifest_mac(&[&out[..24], body]);
    out.extend_from_slice(&mac);
    out.resize(92, 0); // reserved
    let header_crc = crc32fast::hash(&out[..92]);
    out.extend_from_slice(&header_crc.to_le_bytes());
    debug_assert_eq!(out.len(), MANIFEST_HEADER_LEN);
    out.extend_from_slice(body);
    Ok(out)
}

/// Where a manifest's bytes live: mapped from a file, or copied into an aligned buffer.
enum Bytes {
    Mapped(Mmap),
    Owned(AlignedVec),
}

impl Deref for Bytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(map) => map,
            Bytes::Owned(vec) => vec,
        }
    }
}

/// A manifest whose structure was validated; read in place.
pub struct Manifest {
    bytes: Bytes,
    body_len: usize,
    /// 1, 2 or 3 (validated).
    version: u16,
}

impl std::fmt::Debug for Manifest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manifest")
            .field("snapshot_id", &self.snapshot_id())
            .field("volume", &self.volume())
            .field("chunks", &self.chunk_count())
            .finish()
    }
}

impl Manifest {
    /// Checks the structure of manifest `bytes` (header, crcs, rkyv validation) without a
    /// key, copying them into an aligned buffer.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ManifestError> {
        let mut owned = AlignedVec::<16>::with_capacity(bytes.len());
        owned.extend_from_slice(bytes);
        Self::validate(Bytes::Owned(owned))
    }

    /// Maps the manifest file at `path` and checks its structure. Manifests are immutable
    /// once renamed into place (replaced only by rename, removed only by unlink), so the
    /// mapping cannot change under the reader.
    pub fn open(path: &Path) -> Result<Self, ManifestError> {
        let io = |source| ManifestError::Io { path: path.to_owned(), source };
        let file = File::open(path).map_err(io)?;
        // SAFETY: the file is never modified in place (see above); a concurrent unlink keeps
        // the mapping valid. The contents are validated before any use.
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        Self::validate(Bytes::Mapped(map))
    }

    /// Checks structure, then authenticity under `key`.
    pub fn load(bytes: &[u8], key: &TenantKey) -> Result<Self, ManifestError> {
        let manifest = Self::from_bytes(bytes)?;
        manifest.authenticate(key)?;
        Ok(manifest)
    }

    fn validate(bytes: Bytes) -> Result<Self, ManifestError> {
        let len = bytes.len();
        if len < MANIFEST_HEADER_LEN {
            return Err(ManifestError::Truncated { len, expected: MANIFEST_HEADER_LEN });
        }
        let header = &bytes[..MANIFEST_HEADER_LEN];
        let magic: [u8; 4] = header[..4].try_into().unwrap_or_default();
        if magic != MANIFEST_MAGIC {
            return Err(ManifestError::BadMagic { found: magic });
        }
        let stored_header_crc = le_u32(&header[92..96]);
        let header_crc = crc32fast::hash(&header[..92]);
        if stored_header_crc != header_crc {
            return Err(ManifestError::ChecksumMismatch {
                part: "header",
                expected: stored_header_crc,
                got: header_crc,
            });
        }
        let version = u16::from_le_bytes([header[4], header[5]]);
        if !(1..=MANIFEST_VERSION).contains(&version) {
            return Err(ManifestError::UnsupportedVersion { found: version });
        }
        let header_len = u16::from_le_bytes([header[6], header[7]]);
        if usize::from(header_len) != MANIFEST_HEADER_LEN {
            return Err(ManifestError::Corruption { what: format!("header length {header_len}, expected 96") });
        }
        let body_len = le_u64(&header[8..16]);
        if body_len > MAX_MANIFEST_BODY {
            return Err(ManifestError::Corruption {
                what: format!("body length {body_len} exceeds {MAX_MANIFEST_BODY}"),
            });
        }
        let body_len = body_len as usize;
        if le_u32(&header[20..24]) != 0 || header[56..92].iter().any(|&b| b != 0) {
            return Err(ManifestError::Corruption { what: "reserved header bytes are not zero".into() });
        }
        let expected = MANIFEST_HEADER_LEN + body_len;
        if len != expected {
            if len < expected {
                return Err(ManifestError::Truncated { len, expected });
            }
            return Err(ManifestError::Corruption { what: format!("{} bytes after the body", len - expected) });
        }
        let body = &bytes[MANIFEST_HEADER_LEN..];
        let stored_body_crc = le_u32(&header[16..20]);
        let body_crc = crc32fast::hash(body);
        if stored_body_crc != body_crc {
            return Err(ManifestError::ChecksumMismatch { part: "body", expected: stored_body_crc, got: body_crc });
        }
        let invalid = |e: rancor::Error| ManifestError::Corruption { what: format!("body fails validation: {e}") };
        let corrupt = |what: String| ManifestError::Corruption { what };
        match version {
            1 => {
                let v1 = rkyv::access::<ArchivedManifestV1, rancor::Error>(body).map_err(invalid)?;
                check_inline_archived(v1).map_err(corrupt)?;
            }
            2 => {
                let v2 = rkyv::access::<ArchivedManifestV2, rancor::Error>(body).map_err(invalid)?;
                check_archived_group(&v2.group, &v2.base.volume).map_err(corrupt)?;
                check_inline_archived(&v2.base).map_err(corrupt)?;
            }
            _ => {
                let v3 = rkyv::access::<ArchivedManifestV3, rancor::Error>(body).map_err(invalid)?;
                if let Some(group) = v3.group.as_ref() {
                    check_archived_group(group, &v3.base.volume).map_err(corrupt)?;
                }
                let base = &v3.base;
                check_index_shape(
                    base.volume_size.to_native(),
                    base.chunk_size.to_native(),
                    base.chunks.len(),
                    v3.fanout.to_native(),
                    v3.index.len(),
                )
                .map_err(corrupt)?;
            }
        }
        Ok(Manifest { bytes, body_len, version })
    }

    fn body(&self) -> &[u8] {
        &self.bytes[MANIFEST_HEADER_LEN..MANIFEST_HEADER_LEN + self.body_len]
    }

    /// The validated archive of the version 1 part: all of a version 1 manifest; in a
    /// version 3 manifest, everything but the chunk ids (`chunks` is empty: see
    /// [`Manifest::layout`]).
    pub fn archived(&self) -> &ArchivedManifestV1 {
        // Why the unchecked accesses are sound: `validate` ran `rkyv::access` (full
        // bytecheck validation) on exactly these bytes as the body type of
        // `self.version`; they are immutable for the life of `self` (an owned buffer, or a
        // mapping of a file that is never modified in place) and 16-byte aligned (an
        // AlignedVec<16> or a page-aligned mapping, plus a 96-byte header).
        match self.version {
            // SAFETY: see above; version 1 was validated as a version 1 body.
            1 => unsafe { rkyv::access_unchecked::<ArchivedManifestV1>(self.body()) },
            // SAFETY: see above; version 2 was validated as a version 2 body.
            2 => &unsafe { rkyv::access_unchecked::<ArchivedManifestV2>(self.body()) }.base,
            _ => &self.archived_v3().base,
        }
    }

    fn archived_v3(&self) -> &ArchivedManifestV3 {
        debug_assert_eq!(self.version, 3);
        // SAFETY: as in `archived`; called only for version 3.
        unsafe { rkyv::access_unchecked::<ArchivedManifestV3>(self.body()) }
    }

    /// The format version (1, 2 or 3).
    pub fn version(&self) -> u16 {
        self.version
    }

    /// The consistency group this snapshot belongs to: its name and every member volume.
    pub fn group(&self) -> Option<(&str, Vec<&str>)> {
        let group = match self.version {
            1 => None,
            // SAFETY: as in `archived`.
            2 => Some(&unsafe { rkyv::access_unchecked::<ArchivedManifestV2>(self.body()) }.group),
            _ => self.archived_v3().group.as_ref(),
        }?;
        Some((group.name.as_str(), group.members.iter().map(|m| m.as_str()).collect()))
    }

    /// Where the chunk ids are: inline, or in index chunks.
    pub fn layout(&self) -> Layout<'_> {
        if self.version < 3 {
            Layout::Inline(self.archived().chunks.as_slice())
        } else {
            let v3 = self.archived_v3();
            Layout::Indexed { fanout: v3.fanout.to_native(), index: v3.index.as_slice() }
        }
    }

    /// The distinct index chunks (none for versions 1 and 2), sorted.
    pub fn index_chunks(&self) -> Vec<ChunkId> {
        let Layout::Indexed { index, .. } = self.layout() else { return Vec::new() };
        let mut ids: Vec<ChunkId> = index.iter().filter(|raw| **raw != HOLE).map(|raw| ChunkId(*raw)).collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Checks that the manifest was written under `key` and not altered since.
    pub fn authenticate(&self, key: &TenantKey) -> Result<(), ManifestError> {
        let found = self.archived().key_id;
        if found != key.key_id() {
            return Err(ManifestError::WrongKey { found: hex(&found), ours: hex(&key.key_id()) });
        }
        let mac = key.manifest_mac(&[&self.bytes[..24], self.body()]);
        let stored: &[u8] = &self.bytes[24..56];
        // Not secret-dependent timing that matters here (the MAC is not a password check),
        // but compare in constant time anyway.
        let diff = mac.iter().zip(stored).fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if diff != 0 {
            return Err(ManifestError::Unauthenticated);
        }
        Ok(())
    }

    /// The snapshot's id.
    pub fn snapshot_id(&self) -> &str {
        self.archived().snapshot_id.as_str()
    }

    /// The volume's name.
    pub fn volume(&self) -> &str {
        self.archived().volume.as_str()
    }

    /// The marker's name.
    pub fn marker(&self) -> &str {
        self.archived().marker.as_str()
    }

    /// The node that took it.
    pub fn node(&self) -> &str {
        self.archived().node.as_str()
    }

    /// Unix seconds UTC of the marker.
    pub fn created_unix(&self) -> i64 {
        self.archived().created_unix.to_native()
    }

    /// The marker's journal seq.
    pub fn marker_seq(&self) -> u64 {
        self.archived().marker_seq.to_native()
    }

    /// The parent snapshot's id (incremental snapshots).
    pub fn parent(&self) -> Option<&str> {
        self.archived().parent.as_ref().map(|p| p.as_str())
    }

    /// True when the whole volume was read.
    pub fn full_read(&self) -> bool {
        self.archived().full_read
    }

    /// Volume size in bytes.
    pub fn volume_size(&self) -> u64 {
        self.archived().volume_size.to_native()
    }

    /// Chunk size in bytes.
    pub fn chunk_size(&self) -> u32 {
        self.archived().chunk_size.to_native()
    }

    /// Counts recorded when the snapshot was taken.
    pub fn stats(&self) -> StatsV1 {
        let s = &self.archived().stats;
        StatsV1 {
            chunks_read: s.chunks_read.to_native(),
            zero_chunks: s.zero_chunks.to_native(),
            new_chunks: s.new_chunks.to_native(),
            new_stored_bytes: s.new_stored_bytes.to_native(),
            new_plain_bytes: s.new_plain_bytes.to_native(),
        }
    }

    /// Number of chunks.
    pub fn chunk_count(&self) -> usize {
        // Validated against the inline list or the index on load.
        ManifestV1::chunk_count(self.volume_size(), self.chunk_size()) as usize
    }

    /// The byte range of chunk `index` in the volume: (offset, length).
    pub fn chunk_range(&self, index: usize) -> (u64, u64) {
        let size = self.volume_size();
        let offset = index as u64 * u64::from(self.chunk_size());
        (offset, u64::from(self.chunk_size()).min(size.saturating_sub(offset)))
    }

    /// The raw bytes (header and body), e.g. to copy the manifest to another vault.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }
}

fn check_inline_archived(base: &ArchivedManifestV1) -> Result<(), String> {
    let chunk_size = base.chunk_size.to_native();
    let size = base.volume_size.to_native();
    if chunk_size == 0 || base.chunks.len() as u64 != ManifestV1::chunk_count(size, chunk_size) {
        return Err(format!(
            "{} chunk entries for a {size}-byte volume at {chunk_size}-byte chunks",
            base.chunks.len()
        ));
    }
    Ok(())
}

fn check_archived_group(group: &ArchivedGroupV2, volume: &rkyv::string::ArchivedString) -> Result<(), String> {
    check_members(group.name.as_str(), group.members.iter().map(|m| m.as_str()), volume.as_str())
}

fn le_u32(bytes: &[u8]) -> u32 {
    u32::from_le_bytes(bytes.try_into().unwrap_or_default())
}

fn le_u64(bytes: &[u8]) -> u64 {
    u64::from_le_bytes(bytes.try_into().unwrap_or_default())
}

/// Lowercase hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests;
