//! Snapshot manifests: which chunk holds each chunk-sized piece of a volume at one marker.
//!
//! A manifest is a 96-byte header followed by an rkyv archive of [`ManifestV1`]
//! (docs/format-manifest.md has the byte diagram):
//!
//! - the header carries magic `KMAN`, the format version, the body length, a crc32 of the
//!   body, a keyed BLAKE3 MAC (the tenant's manifest subkey) over the header's first 24
//!   bytes and the body, and a crc32 of the header itself;
//! - the body is validated with rkyv's bytecheck on every load (never trusted), then read
//!   in place: a large manifest is memory-mapped, not deserialized, so a 16 TiB volume's
//!   list of 64 KiB chunks (256 Mi entries of 32 bytes) costs page cache, not heap.
//!
//! Structure can be checked without the key ([`Manifest::from_bytes`]: crcs and rkyv
//! validation) — enough for garbage collection in a vault that holds no keys. Restores
//! and copies also call [`Manifest::authenticate`], which needs the tenant key.
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

/// The four magic bytes at the start of every manifest.
pub const MANIFEST_MAGIC: [u8; 4] = *b"KMAN";
/// Length of the fixed header; a multiple of 16 so the rkyv body stays aligned.
pub const MANIFEST_HEADER_LEN: usize = 96;
/// The newest format version: 2, a version 1 body plus the consistency group. This build
/// writes version 1 for a snapshot of one volume (so builds that only read version 1 can
/// read it) and version 2 for a member of a group; it reads both.
pub const MANIFEST_VERSION: u16 = 2;
/// Largest body accepted (rkyv's 32-bit relative pointers; 1 GiB is 32 Mi chunks, 2 TiB
/// of volume at 64 KiB chunks or 32 TiB at 1 MiB).
pub const MAX_MANIFEST_BODY: u64 = 1 << 30;
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
    /// Chunks this snapshot uploaded because the store did not have them.
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

/// One entry of a manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkRef {
    /// All zeros; nothing is stored.
    Hole,
    /// The chunk with this id.
    Data(ChunkId),
}

impl ChunkRef {
    fn from_raw(raw: &[u8; 32]) -> Self {
        if *raw == HOLE {
            ChunkRef::Hole
        } else {
            ChunkRef::Data(ChunkId(*raw))
        }
    }
}

/// Serializes `manifest` and seals it with `key` as a version 1 manifest: the bytes to store.
pub fn encode_manifest(key: &TenantKey, manifest: &ManifestV1) -> Result<Vec<u8>, ManifestError> {
    check_encodable(key, manifest)?;
    let body = rkyv::to_bytes::<rancor::Error>(manifest).map_err(|e| ManifestError::Encode(e.to_string()))?;
    seal(key, 1, &body)
}

/// Serializes a group member's `manifest` and seals it with `key` as a version 2 manifest.
pub fn encode_group_manifest(key: &TenantKey, manifest: &ManifestV2) -> Result<Vec<u8>, ManifestError> {
    check_encodable(key, &manifest.base)?;
    let group = &manifest.group;
    if !group.members.windows(2).all(|w| w[0] < w[1]) || !group.members.contains(&manifest.base.volume) {
        return Err(ManifestError::Encode(format!(
            "group {:?}: members {:?} are not sorted and unique, or lack volume {:?}",
            group.name, group.members, manifest.base.volume
        )));
    }
    let body = rkyv::to_bytes::<rancor::Error>(manifest).map_err(|e| ManifestError::Encode(e.to_string()))?;
    seal(key, 2, &body)
}

fn check_encodable(key: &TenantKey, manifest: &ManifestV1) -> Result<(), ManifestError> {
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
    /// 1 or 2 (validated).
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
        let archived = match version {
            1 => rkyv::access::<ArchivedManifestV1, rancor::Error>(body).map_err(invalid)?,
            _ => {
                let v2 = rkyv::access::<ArchivedManifestV2, rancor::Error>(body).map_err(invalid)?;
                let members = &v2.group.members;
                if !members.windows(2).all(|w| w[0].as_str() < w[1].as_str())
                    || !members.iter().any(|m| m.as_str() == v2.base.volume.as_str())
                {
                    return Err(ManifestError::Corruption {
                        what: "group members are not sorted and unique, or lack the volume".into(),
                    });
                }
                &v2.base
            }
        };
        let chunk_size = archived.chunk_size.to_native();
        let size = archived.volume_size.to_native();
        let expected = ManifestV1::chunk_count(size, chunk_size);
        if chunk_size == 0 || archived.chunks.len() as u64 != expected {
            return Err(ManifestError::Corruption {
                what: format!(
                    "{} chunk entries for a {size}-byte volume at {chunk_size}-byte chunks",
                    archived.chunks.len()
                ),
            });
        }
        Ok(Manifest { bytes, body_len, version })
    }

    fn body(&self) -> &[u8] {
        &self.bytes[MANIFEST_HEADER_LEN..MANIFEST_HEADER_LEN + self.body_len]
    }

    /// The validated archive.
    /// The validated archive of the version 1 part (all of a version 1 manifest).
    pub fn archived(&self) -> &ArchivedManifestV1 {
        match self.archived_v2() {
            Some(v2) => &v2.base,
            // SAFETY: `validate` ran `rkyv::access` (full bytecheck validation) as a version
            // 1 body over exactly these bytes, which are immutable for the life of `self`
            // (an owned buffer, or a mapping of a file that is never modified in place), and
            // 16-byte aligned (an AlignedVec<16> or a page-aligned mapping, plus a 96-byte
            // header).
            None => unsafe { rkyv::access_unchecked::<ArchivedManifestV1>(self.body()) },
        }
    }

    /// The validated version 2 archive, for a version 2 manifest.
    fn archived_v2(&self) -> Option<&ArchivedManifestV2> {
        // SAFETY: as in `archived`: `validate` checked these bytes as a version 2 body.
        (self.version == 2).then(|| unsafe { rkyv::access_unchecked::<ArchivedManifestV2>(self.body()) })
    }

    /// The format version (1 or 2).
    pub fn version(&self) -> u16 {
        self.version
    }

    /// The consistency group this snapshot belongs to: its name and every member volume.
    pub fn group(&self) -> Option<(&str, Vec<&str>)> {
        self.archived_v2().map(|v2| (v2.group.name.as_str(), v2.group.members.iter().map(|m| m.as_str()).collect()))
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
        self.archived().chunks.len()
    }

    /// Entry `index`, or `None` past the end.
    pub fn chunk(&self, index: usize) -> Option<ChunkRef> {
        self.archived().chunks.get(index).map(ChunkRef::from_raw)
    }

    /// Every entry in volume order.
    pub fn chunks(&self) -> impl Iterator<Item = ChunkRef> + '_ {
        self.archived().chunks.iter().map(ChunkRef::from_raw)
    }

    /// The byte range of chunk `index` in the volume: (offset, length).
    pub fn chunk_range(&self, index: usize) -> (u64, u64) {
        let size = self.volume_size();
        let offset = index as u64 * u64::from(self.chunk_size());
        (offset, u64::from(self.chunk_size()).min(size.saturating_sub(offset)))
    }

    /// A deserialized copy (for building a child manifest).
    pub fn to_owned_manifest(&self) -> Result<ManifestV1, ManifestError> {
        rkyv::deserialize::<ManifestV1, rancor::Error>(self.archived())
            .map_err(|e| ManifestError::Corruption { what: format!("deserialize: {e}") })
    }

    /// The raw bytes (header and body), e.g. to copy the manifest to another vault.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }
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
mod tests {
    use super::*;

    fn sample(key: &TenantKey, chunks: usize) -> ManifestV1 {
        ManifestV1 {
            snapshot_id: "20261130T070000Z-00c0ffee".into(),
            volume: "db".into(),
            marker: "daily".into(),
            node: "node-b".into(),
            key_id: key.key_id(),
            created_unix: 1_795_000_000,
            marker_seq: 42,
            parent: Some("20261129T150000Z-12345678".into()),
            full_read: false,
            volume_size: chunks as u64 * 65536 - 100,
            chunk_size: 65536,
            stats: StatsV1 { chunks_read: 3, zero_chunks: 1, new_chunks: 2, new_stored_bytes: 9, new_plain_bytes: 10 },
            chunks: (0..chunks).map(|i| if i % 3 == 0 { HOLE } else { [i as u8; 32] }).collect(),
        }
    }

    #[test]
    fn group_members_are_version_2_and_carry_the_group() {
        let key = TenantKey::from_bytes([5; 32]);
        let group = GroupV2 { name: "shop".into(), members: vec!["db".into(), "files".into()] };
        let m = ManifestV2 { base: sample(&key, 10), group: group.clone() };
        let bytes = encode_group_manifest(&key, &m).unwrap();
        let loaded = Manifest::load(&bytes, &key).unwrap();
        assert_eq!(loaded.version(), 2);
        assert_eq!(loaded.group(), Some(("shop", vec!["db", "files"])));
        assert_eq!(loaded.to_owned_manifest().unwrap(), m.base);
        assert_eq!(loaded.chunk(1), Some(ChunkRef::Data(ChunkId([1; 32]))));
        // A single volume's snapshot stays version 1, without a group.
        let v1 = Manifest::load(&encode_manifest(&key, &m.base).unwrap(), &key).unwrap();
        assert_eq!((v1.version(), v1.group()), (1, None));
        // Members must be sorted, unique and include the volume.
        for members in [vec!["files", "db"], vec!["db", "db"], vec!["files", "logs"]] {
            let group = GroupV2 { name: "shop".into(), members: members.iter().map(|s| (*s).to_owned()).collect() };
            let bad = ManifestV2 { base: sample(&key, 10), group };
            assert!(matches!(encode_group_manifest(&key, &bad), Err(ManifestError::Encode(_))), "{members:?}");
        }
        // The version is under the MAC: relabelled as version 1 (crcs fixed up), the body
        // either fails validation or authentication.
        let mut relabelled = bytes.clone();
        relabelled[4] = 1;
        let crc = crc32fast::hash(&relabelled[..92]);
        relabelled[92..96].copy_from_slice(&crc.to_le_bytes());
        assert!(Manifest::load(&relabelled, &key).is_err());
    }

    #[test]
    fn round_trip_in_memory_and_mapped() {
        let key = TenantKey::from_bytes([5; 32]);
        let m = sample(&key, 10);
        let bytes = encode_manifest(&key, &m).unwrap();
        let loaded = Manifest::load(&bytes, &key).unwrap();
        assert_eq!(loaded.to_owned_manifest().unwrap(), m);
        assert_eq!(loaded.chunk(0), Some(ChunkRef::Hole));
        assert_eq!(loaded.chunk(1), Some(ChunkRef::Data(ChunkId([1; 32]))));
        assert_eq!(loaded.chunk(10), None);
        assert_eq!(loaded.chunk_range(9), (9 * 65536, 65536 - 100));
        assert_eq!(loaded.parent(), Some("20261129T150000Z-12345678"));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.kman");
        std::fs::write(&path, &bytes).unwrap();
        let mapped = Manifest::open(&path).unwrap();
        mapped.authenticate(&key).unwrap();
        assert_eq!(mapped.chunks().collect::<Vec<_>>(), loaded.chunks().collect::<Vec<_>>());
    }

    #[test]
    fn every_flipped_byte_is_caught() {
        let key = TenantKey::from_bytes([5; 32]);
        let bytes = encode_manifest(&key, &sample(&key, 4)).unwrap();
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x10;
            assert!(Manifest::load(&bad, &key).is_err(), "flip at {i} not caught");
        }
        for len in 0..bytes.len() {
            assert!(Manifest::from_bytes(&bytes[..len]).is_err(), "truncation to {len} not caught");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(Manifest::from_bytes(&longer).is_err());
    }

    #[test]
    fn wrong_key_and_forgery_are_named() {
        let key = TenantKey::from_bytes([5; 32]);
        let other = TenantKey::from_bytes([6; 32]);
        let bytes = encode_manifest(&key, &sample(&key, 4)).unwrap();
        assert!(matches!(Manifest::load(&bytes, &other), Err(ManifestError::WrongKey { .. })));
        // A forger without the key rewrites the chunk list and fixes both crcs.
        let mut forged = sample(&key, 4);
        forged.chunks[1] = [9; 32];
        let mut forged_bytes = encode_manifest(&key, &forged).unwrap();
        forged_bytes[24..56].copy_from_slice(&bytes[24..56]);
        let crc = crc32fast::hash(&forged_bytes[..92]);
        forged_bytes[92..96].copy_from_slice(&crc.to_le_bytes());
        let structurally_fine = Manifest::from_bytes(&forged_bytes).unwrap();
        assert!(matches!(structurally_fine.authenticate(&key), Err(ManifestError::Unauthenticated)));
    }

    #[test]
    fn inconsistent_manifests_are_refused_at_encode() {
        let key = TenantKey::from_bytes([5; 32]);
        let mut m = sample(&key, 4);
        m.chunks.pop();
        assert!(encode_manifest(&key, &m).is_err());
        let other = TenantKey::from_bytes([6; 32]);
        assert!(encode_manifest(&other, &sample(&key, 4)).is_err());
    }

    proptest::proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..400)) {
            let _ = Manifest::from_bytes(&bytes);
            let mut framed = bytes.clone();
            if framed.len() >= 4 {
                framed[..4].copy_from_slice(&MANIFEST_MAGIC);
            }
            let _ = Manifest::from_bytes(&framed);
        }
    }
}
