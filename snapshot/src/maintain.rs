//! Keeping vaults in shape: copy a snapshot to another vault, verify (and heal) chunks,
//! forget snapshots, collect garbage.
//!
//! - **Copy** sends only the chunks the destination lacks (batched existence checks),
//!   checks afterwards that the destination holds them all, and writes the manifest last,
//!   so an interrupted copy is invisible, and rerunning it resumes (the chunks already
//!   sent are skipped). The ranges of an incremental whose index chunk is its parent's,
//!   when the parent is in the destination already, are not even looked at (`copy_ids`).
//! - **Verify** reads, authenticates, decompresses and re-hashes every chunk of the chosen
//!   snapshots (or a rotating subset). A bad copy (missing, unreadable, or failing to
//!   decode) is healed from the first other vault that holds a good one (the bad copy is
//!   deleted, then the good frame stored anew) and reported. A
//!   snapshot with a chunk that cannot be healed is recorded as failed
//!   (`verify/<volume>/<snapshot id>`), and is never used as the parent of an incremental.
//!   Index chunks are verified (and healed) first, as the ids of their ranges come from
//!   them, and always, whatever the subset.
//! - **GC** marks every chunk a manifest references, its index chunks and the chunks they
//!   list (a sorted array of ids: 32 bytes per referenced chunk, nothing per snapshot; an
//!   index chunk shared by several snapshots is read once; reading them needs the tenant
//!   key), then sweeps the chunk listing in id order and
//!   deletes the unreferenced ones, under the GC lease (no upload runs meanwhile; see
//!   [`crate::lease`]). The sweep saves its position, so an interrupted GC resumes. A
//!   complete sweep ends with [`Vault::reclaim`], which gives back the space of what was
//!   deleted where deleting alone does not (a local vault's packs).

use serde::{Deserialize, Serialize};

use crate::chunk::decode_chunk;
use crate::create::Progress;
use crate::error::{IndexError, ManifestError};
use crate::key::{ChunkId, TenantKey};
use crate::lease::{now_unix, GcLease, LeaseError, UploadLease};
use crate::manifest::{ChunkMap, ChunkRef, Layout, Manifest, HOLE};
use crate::vault::{keys, ObjectEntry, Vault, VaultError};

/// Ids checked per existence query.
const BATCH: usize = 256;

/// Why a maintenance operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MaintainError {
    /// A vault failed.
    #[error(transparent)]
    Vault(#[from] VaultError),
    /// A lease could not be taken or ran out.
    #[error(transparent)]
    Lease(#[from] LeaseError),
    /// A manifest is corrupt or not this tenant's.
    #[error("manifest {key} in vault {vault}: {source}")]
    Manifest {
        /// The vault.
        vault: String,
        /// The manifest's key.
        key: String,
        /// What is wrong.
        #[source]
        source: ManifestError,
    },
    /// An index chunk has no good copy in the vaults read: the ids of its range are unknown.
    #[error(transparent)]
    Index(#[from] IndexError),
    /// A chunk has no good copy anywhere.
    #[error("chunk {id} of snapshot {snapshot}: no good copy: {errors}")]
    Chunk {
        /// The snapshot.
        snapshot: String,
        /// The chunk.
        id: ChunkId,
        /// What each vault said.
        errors: String,
    },
}

impl MaintainError {
    /// True when retrying later is the right response (vault down, GC or upload running).
    pub fn is_transient(&self) -> bool {
        match self {
            MaintainError::Vault(e) => e.is_transient(),
            MaintainError::Lease(e) => e.is_transient(),
            _ => false,
        }
    }
}

/// A snapshot as listed in a vault.
#[derive(Debug)]
pub struct Listed {
    /// The manifest's key.
    pub key: String,
    /// The manifest (structure checked; authenticated when a key was given).
    pub manifest: Manifest,
}

/// Reads and checks manifest `key` from `vault`; authenticates it when `tenant` is given.
pub fn read_manifest(vault: &dyn Vault, key: &str, tenant: Option<&TenantKey>) -> Result<Manifest, MaintainError> {
    let bytes = vault.get_object(key)?;
    let bad = |source| MaintainError::Manifest { vault: vault.name().to_owned(), key: key.to_owned(), source };
    let manifest = Manifest::from_bytes(&bytes).map_err(bad)?;
    if let Some(tenant) = tenant {
        manifest.authenticate(tenant).map_err(bad)?;
    }
    Ok(manifest)
}

/// Manifest keys of `volume` (every volume when `None`), oldest first (ids sort by time).
pub fn manifest_keys(vault: &dyn Vault, volume: Option<&str>) -> Result<Vec<ObjectEntry>, VaultError> {
    let prefix = match volume {
        Some(v) => keys::snapshots_of(v),
        None => keys::SNAPSHOTS.to_owned(),
    };
    let mut entries: Vec<ObjectEntry> =
        vault.list_objects(&prefix)?.into_iter().filter(|e| e.key.ends_with(".kman")).collect();
    entries.sort_by(|a, b| snapshot_id_of(&a.key).cmp(snapshot_id_of(&b.key)).then(a.key.cmp(&b.key)));
    Ok(entries)
}

/// The snapshot id in a manifest key (`snapshots/<volume>/<id>.kman`).
pub fn snapshot_id_of(key: &str) -> &str {
    key.rsplit('/').next().unwrap_or(key).trim_end_matches(".kman")
}

/// The volume in a manifest key.
pub fn volume_of(key: &str) -> &str {
    key.strip_prefix(keys::SNAPSHOTS).and_then(|rest| rest.split('/').next()).unwrap_or("")
}

/// Lists the snapshots in `vault`, checking every manifest. Corrupt ones are returned as
/// errors beside the good ones, never silently skipped.
pub fn list_snapshots(
    vault: &dyn Vault,
    volume: Option<&str>,
    tenant: Option<&TenantKey>,
) -> Result<(Vec<Listed>, Vec<MaintainError>), VaultError> {
    let mut good = Vec::new();
    let mut bad = Vec::new();
    for entry in manifest_keys(vault, volume)? {
        match read_manifest(vault, &entry.key, tenant) {
            Ok(manifest) => good.push(Listed { key: entry.key, manifest }),
            Err(MaintainError::Vault(e)) if e.is_not_found() => {} // forgotten meanwhile
            Err(MaintainError::Vault(e)) => return Err(e),
            Err(e) => bad.push(e),
        }
    }
    Ok((good, bad))
}

/// What a copy did.
#[derive(Debug, Clone, Default)]
pub struct CopyReport {
    /// Distinct chunks looked for in the destination: all the snapshot references, less
    /// the ranges it shares with its parent when the destination holds that parent.
    pub chunks: u64,
    /// Chunks sent (the destination lacked them).
    pub sent: u64,
    /// Encoded bytes sent.
    pub bytes_sent: u64,
    /// True when the destination already had the manifest (nothing to do).
    pub already_complete: bool,
}

/// Copies snapshot `manifest_key` from `from` to `to`. See the module docs.
pub fn copy_snapshot(
    tenant: &TenantKey,
    from: &dyn Vault,
    to: &dyn Vault,
    manifest_key: &str,
    holder: &str,
    progress: &dyn Fn(Progress),
) -> Result<CopyReport, MaintainError> {
    let manifest = read_manifest(from, manifest_key, Some(tenant))?;
    let mut report = CopyReport::default();
    if let Ok(existing) = to.get_object(manifest_key) {
        if existing == manifest.as_bytes() {
            report.already_complete = true;
            return Ok(report);
        }
    }
    let upload_id = format!("copy-{}@{}", manifest.volume(), manifest.snapshot_id());
    let mut lease = UploadLease::begin(to, holder, &upload_id, &format!("copy of {manifest_key}"))?;
    // Under the lease, so no GC runs in `to` until this copy's manifest is written.
    let ids = copy_ids(tenant, from, to, &manifest, &mut lease)?;
    report.chunks = ids.len() as u64;
    let mut done = 0u64;
    for batch in ids.chunks(BATCH) {
        let present = to.has_chunks(batch)?;
        for (id, have) in batch.iter().zip(present) {
            if !have {
                let frame = from.get_chunk(id)?;
                // Check before sending: never spread a corrupt copy.
                decode_chunk(tenant, id, &frame).map_err(|e| MaintainError::Chunk {
                    snapshot: manifest.snapshot_id().to_owned(),
                    id: *id,
                    errors: format!("vault {}: {e}", from.name()),
                })?;
                to.put_chunk(id, &frame)?;
                report.sent += 1;
                report.bytes_sent += frame.len() as u64;
            }
        }
        done += batch.len() as u64;
        progress(Progress { done, total: report.chunks });
        lease.renew()?;
    }
    // Verify after upload: the destination must hold every chunk, durably, before the
    // manifest.
    to.sync()?;
    for batch in ids.chunks(BATCH) {
        if let Some((id, _)) = batch.iter().zip(to.has_chunks(batch)?).find(|(_, have)| !have) {
            return Err(MaintainError::Chunk {
                snapshot: manifest.snapshot_id().to_owned(),
                id: *id,
                errors: format!("vault {} does not hold it after the upload", to.name()),
            });
        }
    }
    lease.check()?;
    to.put_object(manifest_key, manifest.as_bytes())?;
    lease.finish()?;
    Ok(report)
}

/// The chunks a copy of `manifest` to `to` must make sure `to` holds, sorted: its index
/// chunks and the data they list (read from `from`), except the ranges whose index chunk
/// is the same in the parent snapshot and that parent's manifest is in `to`. A manifest
/// in a vault means every chunk it references was there when it was written, and GC keeps
/// whatever a manifest references; the caller holds an upload lease, so no GC runs until
/// this copy's manifest is written either. So a copy of an incremental looks only at the
/// ranges that changed since a parent already copied: its cost follows the change. A
/// parent that verify found damaged there proves nothing: then every range is looked at
/// (and what is missing sent again), so damage does not spread down the chain.
fn copy_ids(
    tenant: &TenantKey,
    from: &dyn Vault,
    to: &dyn Vault,
    manifest: &Manifest,
    lease: &mut UploadLease<'_>,
) -> Result<Vec<ChunkId>, MaintainError> {
    let parent_there = manifest.parent().and_then(|parent| {
        let key = keys::manifest(manifest.volume(), parent);
        let sound = match verify_record(to, manifest.volume(), parent) {
            Ok(record) => record.is_none_or(|r| r.ok),
            Err(_) => false,
        };
        sound.then(|| read_manifest(to, &key, Some(tenant)).ok()).flatten()
    });
    let shared = |piece: usize, raw: &[u8; 32]| match (&parent_there, manifest.layout()) {
        (Some(parent), Layout::Indexed { fanout, .. }) if parent.chunk_count() == manifest.chunk_count() => {
            matches!(parent.layout(), Layout::Indexed { fanout: f, index } if f == fanout && index.get(piece) == Some(raw))
        }
        _ => false,
    };
    let map = ChunkMap::new(tenant, &[from], manifest);
    let mut ids = Vec::new();
    for piece in 0..map.pieces() {
        // Reading a large snapshot's index can outlast the lease.
        lease.renew()?;
        match manifest.layout() {
            Layout::Indexed { index, .. } => {
                let Some(raw) = index.get(piece).filter(|raw| **raw != HOLE) else { continue };
                if shared(piece, raw) {
                    continue;
                }
                ids.push(ChunkId(*raw));
            }
            Layout::Inline(_) => {}
        }
        ids.extend(map.piece(piece)?.iter().filter(|raw| **raw != HOLE).map(|raw| ChunkId(*raw)));
    }
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

/// Every chunk `manifest` needs, sorted: its index chunks and the data chunks they list
/// (read from the first of `vaults` that holds a good copy).
pub fn referenced_chunks(
    tenant: &TenantKey,
    vaults: &[&dyn Vault],
    manifest: &Manifest,
) -> Result<Vec<ChunkId>, IndexError> {
    let mut ids = ChunkMap::new(tenant, vaults, manifest).distinct_data()?;
    ids.extend(manifest.index_chunks());
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

/// Which chunks a verify reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subset {
    /// Every chunk.
    All,
    /// The chunks whose id's first two bytes fall in slice `n` of `of` equal slices (a
    /// rotating subset: verify slice `day % of` each day and all are read every `of` days).
    Slice {
        /// Which slice.
        n: u32,
        /// How many slices.
        of: u32,
    },
}

impl Subset {
    fn contains(&self, id: &ChunkId) -> bool {
        match *self {
            Subset::All => true,
            Subset::Slice { n, of } => {
                let of = of.max(1);
                let prefix = u32::from(u16::from_be_bytes([id.0[0], id.0[1]]));
                prefix * of / 65536 == n % of
            }
        }
    }
}

/// The recorded result of verifying a snapshot (`verify/<volume>/<id>`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VerifyRecord {
    /// Format version (1).
    pub version: u32,
    /// When, unix seconds.
    pub time: i64,
    /// True when every chunk checked was good (after healing).
    pub ok: bool,
    /// Chunks checked.
    pub checked: u64,
    /// Chunks healed.
    pub healed: u64,
    /// Chunks bad with no good copy (hex ids).
    pub lost: Vec<String>,
}

/// The key of a snapshot's verify record.
pub fn verify_key(volume: &str, snapshot_id: &str) -> String {
    format!("verify/{volume}/{snapshot_id}")
}

/// The last verify record of a snapshot, if any.
pub fn verify_record(vault: &dyn Vault, volume: &str, snapshot_id: &str) -> Result<Option<VerifyRecord>, VaultError> {
    match vault.get_object(&verify_key(volume, snapshot_id)) {
        Ok(bytes) => Ok(serde_json::from_slice(&bytes).ok()),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e),
    }
}

/// One problem found by verify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// The chunk.
    pub id: ChunkId,
    /// What was wrong with the copy in the verified vault.
    pub problem: String,
    /// The vault a good copy came from, when healed.
    pub healed_from: Option<String>,
}

/// What a verify did.
#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    /// Snapshots verified.
    pub snapshots: u64,
    /// Distinct chunks read.
    pub checked: u64,
    /// Bad copies, healed or not.
    pub findings: Vec<Finding>,
    /// Manifests that are corrupt (named by key, with the error).
    pub bad_manifests: Vec<String>,
    /// Snapshots forgotten while they were verified (retention or `forget` elsewhere, GC
    /// then taking their chunks): not damage, so their unhealed findings are dropped.
    pub forgotten: Vec<String>,
}

impl VerifyReport {
    /// True when nothing is left broken.
    pub fn ok(&self) -> bool {
        self.bad_manifests.is_empty() && self.findings.iter().all(|f| f.healed_from.is_some())
    }
}

/// Verifies the snapshots of `volume` (all when `None`) in `vault`, healing bad chunks
/// from `others`. Each distinct chunk is read once however many snapshots share it.
pub fn verify(
    tenant: &TenantKey,
    vault: &dyn Vault,
    others: &[&dyn Vault],
    volume: Option<&str>,
    subset: Subset,
    progress: &dyn Fn(Progress),
) -> Result<VerifyReport, MaintainError> {
    let (listed, bad) = list_snapshots(vault, volume, Some(tenant))?;
    let mut report = VerifyReport {
        snapshots: listed.len() as u64,
        bad_manifests: bad.iter().map(ToString::to_string).collect(),
        ..VerifyReport::default()
    };
    // Heal a bad manifest by copying the snapshot again from another vault that holds a
    // good one: under an upload lease, sending whatever chunks it lacks, manifest last (its
    // chunks may have gone with the bad manifest: GC could not see it reference them).
    for error in &bad {
        if let MaintainError::Manifest { key, .. } = error {
            for other in others {
                if read_manifest(*other, key, Some(tenant)).is_ok() {
                    copy_snapshot(tenant, *other, vault, key, "verify", &|_| {})?;
                    report.bad_manifests.retain(|m| !m.contains(key.as_str()));
                    break;
                }
            }
        }
    }
    let mut verdicts: std::collections::HashMap<ChunkId, bool> = Default::default();
    let mut expanded: std::collections::HashMap<ChunkId, RangeSummary> = Default::default();
    let total: u64 = listed.iter().map(|l| l.manifest.chunk_count() as u64).sum();
    let mut done = 0u64;
    // Index chunks are read from the vault verified, or (when they could not be healed
    // there) from the others, so that a lost index chunk still lets the rest be checked.
    let mut sources = vec![vault];
    sources.extend_from_slice(others);
    for l in &listed {
        done += l.manifest.chunk_count() as u64;
        // The index chunks first, whatever the subset: the ids of the data come from them.
        let index_ids = l.manifest.index_chunks();
        let Some(mut healed) = check_chunks(tenant, vault, others, &l.key, &index_ids, &mut verdicts, &mut report)?
        else {
            progress(Progress { done, total });
            continue;
        };
        let map = ChunkMap::new(tenant, &sources, &l.manifest);
        let in_subset = |entries: &[[u8; 32]]| -> Vec<ChunkId> {
            entries
                .iter()
                .filter(|raw| **raw != HOLE)
                .map(|raw| ChunkId(*raw))
                .filter(|id| subset.contains(id))
                .collect()
        };
        let mut ids = Vec::new();
        // Ranges an earlier snapshot expanded and checked: counted from their summary, not
        // read again (a chain of snapshots shares most index chunks).
        let mut known = RangeSummary::default();
        let mut fresh = Vec::new();
        for piece in 0..map.pieces() {
            let index_id = match map.index_entry(piece) {
                Some(ChunkRef::Data(id)) => Some(id),
                _ => None,
            };
            // The same index chunk must be expected to hold as many entries here (it carries
            // no position; a manifest that expects another count cannot read it).
            let entries = (map.piece_range(piece).end - map.piece_range(piece).start) as usize;
            if let Some(summary) = index_id.and_then(|id| expanded.get(&id)).filter(|s| s.entries == entries) {
                known.chunks += summary.chunks;
                known.lost.extend_from_slice(&summary.lost);
                continue;
            }
            match map.piece(piece) {
                Ok(entries) => {
                    ids.extend(in_subset(&entries));
                    fresh.extend(index_id.map(|id| (piece, id)));
                }
                // The range's ids are unknown, so its data cannot be checked: the index
                // chunk is lost for this verify, whether it had no good copy (already a
                // finding) or decoded to something that is not its range's index.
                Err(e) => {
                    if verdicts.insert(e.id, false) != Some(false) {
                        report.findings.push(Finding { id: e.id, problem: e.errors, healed_from: None });
                    }
                }
            }
        }
        ids.sort_unstable();
        ids.dedup();
        let Some(healed_data) = check_chunks(tenant, vault, others, &l.key, &ids, &mut verdicts, &mut report)? else {
            progress(Progress { done, total });
            continue;
        };
        healed += healed_data;
        // Summaries of the ranges expanded here, for the snapshots after (read once more
        // rather than holding every range's ids meanwhile).
        for (piece, id) in fresh {
            if let Ok(entries) = map.piece(piece) {
                let mut listed = in_subset(&entries);
                listed.sort_unstable();
                listed.dedup();
                let lost = listed.iter().filter(|id| verdicts.get(*id) == Some(&false)).copied().collect();
                expanded.insert(id, RangeSummary { entries: entries.len(), chunks: listed.len() as u64, lost });
            }
        }
        // A chunk listed in two ranges, one of them known, counts twice.
        let checked = (ids.len() + index_ids.len()) as u64 + known.chunks;
        ids.extend_from_slice(&index_ids);
        ids.extend_from_slice(&known.lost);
        ids.sort_unstable();
        ids.dedup();
        let lost: Vec<String> =
            ids.iter().filter(|id| verdicts.get(*id) == Some(&false)).map(ToString::to_string).collect();
        // Forgotten after its chunks were read: no record to leave behind.
        if forgotten_meanwhile(vault, &l.key) {
            report.forgotten.push(l.key.clone());
            progress(Progress { done, total });
            continue;
        }
        let record = VerifyRecord { version: 1, time: now_unix(), ok: lost.is_empty(), checked, healed, lost };
        let bytes = serde_json::to_vec(&record).unwrap_or_default();
        vault.put_object(&verify_key(l.manifest.volume(), l.manifest.snapshot_id()), &bytes)?;
        progress(Progress { done, total });
    }
    Ok(report)
}

/// What verify learned about the range an index chunk lists, for the next snapshot that
/// shares the index chunk.
#[derive(Debug, Default)]
struct RangeSummary {
    /// Entries the index chunk holds.
    entries: usize,
    /// Distinct data chunks of the range in the subset checked.
    chunks: u64,
    /// Those found bad and not healed.
    lost: Vec<ChunkId>,
}

/// Reads the chunks `ids` of snapshot `key` that no earlier snapshot settled, heals the bad
/// copies from `others`, and records each verdict. Returns how many were healed, or `None`
/// when the snapshot turned out forgotten under the verify.
#[allow(clippy::too_many_arguments)]
fn check_chunks(
    tenant: &TenantKey,
    vault: &dyn Vault,
    others: &[&dyn Vault],
    key: &str,
    ids: &[ChunkId],
    verdicts: &mut std::collections::HashMap<ChunkId, bool>,
    report: &mut VerifyReport,
) -> Result<Option<u64>, MaintainError> {
    // Each chunk is read once per verify: the ones an earlier snapshot settled are not.
    let unread: Vec<ChunkId> = ids.iter().filter(|id| !verdicts.contains_key(*id)).copied().collect();
    let problems = read_chunks(tenant, vault, &unread)?;
    // Retention may have forgotten the snapshot under the verify, and GC taken its chunks:
    // garbage, not damage, and not to be healed back. Its chunks get no verdict, so a
    // snapshot still listed that shares one reads it itself.
    if !problems.is_empty() && forgotten_meanwhile(vault, key) {
        report.forgotten.push(key.to_owned());
        return Ok(None);
    }
    report.checked += unread.len() as u64;
    let mut healed = 0;
    let mut problems = problems.into_iter().peekable();
    for (index, id) in unread.iter().enumerate() {
        let problem = problems.next_if(|(at, _)| *at == index).map(|(_, problem)| problem);
        let good = match problem {
            None => true,
            Some(problem) => {
                let healed_from = heal(tenant, vault, others, id)?;
                healed += u64::from(healed_from.is_some());
                let ok = healed_from.is_some();
                report.findings.push(Finding { id: *id, problem, healed_from });
                ok
            }
        };
        verdicts.insert(*id, good);
    }
    Ok(Some(healed))
}

/// Reads and decodes `ids` from `vault`, [`Vault::reads_in_flight`] at a time (one at a
/// time, a verify of a network vault waited a round trip per chunk: 49-80 chunks/s from
/// Garage on loopback, 1655 with 32 in flight); returns the problems found, as (index in
/// `ids`, problem), in index order. A copy that is missing or cannot be read is a problem to
/// heal; any other vault error ends the verify.
fn read_chunks(tenant: &TenantKey, vault: &dyn Vault, ids: &[ChunkId]) -> Result<Vec<(usize, String)>, MaintainError> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let failed = std::sync::atomic::AtomicBool::new(false);
    let found = std::sync::Mutex::new((Vec::new(), None));
    std::thread::scope(|scope| {
        for _ in 0..vault.reads_in_flight().min(ids.len()) {
            scope.spawn(|| loop {
                let index = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(id) = ids.get(index) else { break };
                if failed.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let problem = match vault.get_chunk(id) {
                    Ok(frame) => decode_chunk(tenant, id, &frame).err().map(|e| e.to_string()),
                    Err(e) if e.is_not_found() => Some("missing".to_owned()),
                    // This copy cannot be read (a truncated pack, an entry that is another
                    // chunk, a read error): a finding to heal, not the end of the verify.
                    Err(e @ (VaultError::BadChunk { .. } | VaultError::Store { .. })) => Some(e.to_string()),
                    Err(e) => {
                        failed.store(true, std::sync::atomic::Ordering::Relaxed);
                        found.lock().unwrap_or_else(|p| p.into_inner()).1.get_or_insert(e);
                        break;
                    }
                };
                if let Some(problem) = problem {
                    found.lock().unwrap_or_else(|p| p.into_inner()).0.push((index, problem));
                }
            });
        }
    });
    let (mut problems, error) = found.into_inner().unwrap_or_else(|p| p.into_inner());
    if let Some(error) = error {
        return Err(error.into());
    }
    problems.sort_unstable_by_key(|(index, _)| *index);
    Ok(problems)
}

/// Whether the snapshot at manifest `key` was forgotten since it was listed: its manifest
/// is gone while the vault still lists a later snapshot of its volume (retention keeps the
/// newest). A vault that lost everything, or cannot be listed, has forgotten nothing: its
/// missing chunks are damage.
fn forgotten_meanwhile(vault: &dyn Vault, key: &str) -> bool {
    let Ok(listed) = manifest_keys(vault, Some(volume_of(key))) else { return false };
    let id = snapshot_id_of(key);
    !listed.iter().any(|e| e.key == key) && listed.iter().any(|e| snapshot_id_of(&e.key) > id)
}

/// Replaces a bad or missing copy of `id` in `vault` with a good one from `others`;
/// returns the name of the vault it came from.
fn heal(
    tenant: &TenantKey,
    vault: &dyn Vault,
    others: &[&dyn Vault],
    id: &ChunkId,
) -> Result<Option<String>, VaultError> {
    for other in others {
        let Ok(frame) = other.get_chunk(id) else { continue };
        if decode_chunk(tenant, id, &frame).is_err() {
            continue;
        }
        // The bad copy must go first: a put of an id that exists is a no-op.
        vault.delete_chunk(id)?;
        vault.put_chunk(id, &frame)?;
        vault.sync()?;
        return Ok(Some(other.name().to_owned()));
    }
    Ok(None)
}

/// Removes a snapshot's manifest (and its verify record). Its chunks go at the next GC.
pub fn forget(vault: &dyn Vault, manifest_key: &str) -> Result<bool, VaultError> {
    let existed = vault.delete_object(manifest_key)?;
    let _ = vault.delete_object(&verify_key(volume_of(manifest_key), snapshot_id_of(manifest_key)));
    Ok(existed)
}

/// What a GC did.
#[derive(Debug, Clone, Default)]
pub struct GcReport {
    /// Manifests read.
    pub manifests: u64,
    /// Distinct chunks referenced.
    pub referenced: u64,
    /// Chunks examined in the sweep.
    pub examined: u64,
    /// Chunks deleted (or, in a dry run, that would be).
    pub deleted: u64,
    /// Encoded bytes freed.
    pub bytes_freed: u64,
    /// Unreferenced chunks kept because they were written after the GC started.
    pub kept_young: u64,
    /// Disk space [`Vault::reclaim`] gave back after a complete sweep (packs of deleted
    /// chunks deleted or rewritten; 0 where deleting a chunk frees its space at once).
    pub bytes_reclaimed: u64,
    /// The sweep resumed from a previous, interrupted run.
    pub resumed: bool,
    /// The sweep stopped at `max_deletes` and will resume next time.
    pub incomplete: bool,
}

/// Options for [`gc`].
#[derive(Debug, Clone)]
pub struct GcOptions {
    /// Who runs it (for the lease).
    pub holder: String,
    /// Count what would be deleted, delete nothing.
    pub dry_run: bool,
    /// Stop after this many deletions (incremental GC); the next run resumes.
    pub max_deletes: Option<u64>,
}

/// Collects garbage in `vault`, reading index chunks with `tenant`. See the module docs.
/// A corrupt manifest or an unreadable index chunk stops GC (the chunks it references
/// cannot be marked, so nothing may be swept).
pub fn gc(
    vault: &dyn Vault,
    tenant: &TenantKey,
    options: &GcOptions,
    progress: &dyn Fn(Progress),
) -> Result<GcReport, MaintainError> {
    let started = now_unix();
    let (mut lease, cursor) = if options.dry_run {
        (None, None)
    } else {
        let (lease, cursor) = GcLease::begin(vault, &options.holder)?;
        (Some(lease), cursor)
    };
    let mut report = GcReport { resumed: cursor.is_some(), ..GcReport::default() };
    // Mark. Uploads are excluded from here on, so this set covers every referenced chunk.
    let mut referenced: Vec<[u8; 32]> = Vec::new();
    let mut distinct_after_last_dedup = 0usize;
    // Index chunks already marked with everything they list (snapshots share most).
    let mut marked_index = std::collections::HashSet::new();
    let here = [vault];
    for entry in manifest_keys(vault, None)? {
        let manifest = match read_manifest(vault, &entry.key, None) {
            Ok(m) => m,
            Err(MaintainError::Vault(e)) if e.is_not_found() => continue,
            Err(e) => return Err(e),
        };
        report.manifests += 1;
        // A long mark must not outlive the lease: once it ran out, uploads may have reused
        // chunks this GC would then sweep.
        if let Some(lease) = lease.as_mut() {
            lease.renew()?;
        }
        match manifest.layout() {
            Layout::Inline(chunks) => referenced.extend(chunks.iter().filter(|c| **c != HOLE).copied()),
            Layout::Indexed { index, .. } => {
                // Its entries can be read only under the key it was written with: say so
                // (and stop) rather than fail on its first index chunk.
                manifest.authenticate(tenant).map_err(|source| MaintainError::Manifest {
                    vault: vault.name().to_owned(),
                    key: entry.key.clone(),
                    source,
                })?;
                let map = ChunkMap::new(tenant, &here, &manifest);
                for (piece, raw) in index.iter().enumerate() {
                    if *raw == HOLE || !marked_index.insert(*raw) {
                        continue;
                    }
                    if let Some(lease) = lease.as_mut() {
                        lease.renew()?;
                    }
                    referenced.push(*raw);
                    referenced.extend(map.piece(piece)?.iter().filter(|c| **c != HOLE).copied());
                }
            }
        }
        // Snapshots share most chunks: dedup whenever the array doubles, so it stays
        // within twice the distinct count (plus one manifest) however long the history.
        if referenced.len() > 2 * distinct_after_last_dedup + (1 << 20) {
            referenced.sort_unstable();
            referenced.dedup();
            distinct_after_last_dedup = referenced.len();
        }
    }
    referenced.sort_unstable();
    referenced.dedup();
    report.referenced = referenced.len() as u64;
    // Sweep in id order from the saved cursor.
    let mut after: Option<ChunkId> = cursor.as_deref().and_then(|c| c.parse().ok());
    let page = 1000;
    loop {
        let chunks = vault.list_chunks(after.as_ref(), page)?;
        let Some(last) = chunks.last() else { break };
        let last = last.id;
        // Never delete once the lease ran out (uploads may be reusing these chunks).
        if let Some(lease) = lease.as_mut() {
            lease.renew()?;
        }
        for entry in &chunks {
            report.examined += 1;
            if referenced.binary_search(&entry.id.0).is_ok() {
                continue;
            }
            if entry.modified >= started {
                report.kept_young += 1;
                continue;
            }
            if options.dry_run {
                report.deleted += 1;
                report.bytes_freed += entry.len;
                continue;
            }
            if vault.delete_chunk(&entry.id)? {
                report.deleted += 1;
                report.bytes_freed += entry.len;
            }
            if options.max_deletes.is_some_and(|max| report.deleted >= max) {
                if let Some(lease) = lease.as_mut() {
                    lease.save_cursor(&entry.id.to_string())?;
                }
                report.incomplete = true;
                return Ok(report);
            }
        }
        after = Some(last);
        if let Some(lease) = lease.as_mut() {
            lease.save_cursor(&last.to_string())?;
        }
        progress(Progress { done: report.examined, total: 0 });
    }
    if let Some(lease) = lease {
        // Reclaiming changes where chunks live, never which are present, so it is safe
        // even if uploads start meanwhile; it runs here so a finished GC has given the
        // space back.
        report.bytes_reclaimed = vault.reclaim()?;
        lease.finish()?;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::create::{create_snapshot, Changed, CreateOptions, Source};
    use crate::restore::{export, ExportFormat};
    use crate::vault::testing::HookedVault;
    use crate::vault::LocalVault;
    use rand::{Rng, SeedableRng};
    use std::collections::HashSet;

    struct Mem(Vec<u8>);

    impl Source for Mem {
        fn size(&self) -> u64 {
            self.0.len() as u64
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
            buf.copy_from_slice(&self.0[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
    }

    const CHUNK: usize = 4096;

    /// An image of three index ranges of distinct chunks and a short fourth: (chunks per
    /// range, chunks, bytes).
    fn four_ranges() -> (usize, usize, Vec<u8>) {
        let fanout = crate::manifest::INDEX_FANOUT as usize;
        let chunks = 3 * fanout + 7;
        let mut data: Vec<u8> = vec![0; chunks * CHUNK];
        for (i, block) in data.chunks_mut(CHUNK).enumerate() {
            block[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
        }
        (fanout, chunks, data)
    }

    /// The data chunks `manifest` lists (index chunks read from `vault`).
    fn data_chunks(key: &TenantKey, vault: &dyn Vault, manifest: &Manifest) -> Vec<ChunkId> {
        ChunkMap::new(key, &[vault], manifest).distinct_data().unwrap()
    }

    /// Flips bits `mask` of the byte at `offset` in `path` (damage on disk).
    fn flip_byte(path: &std::path::Path, offset: u64, mask: u8) {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
        let mut byte = [0u8];
        file.read_exact_at(&mut byte, offset).unwrap();
        byte[0] ^= mask;
        file.write_all_at(&byte, offset).unwrap();
    }

    fn take(
        key: &TenantKey,
        vault: &dyn Vault,
        volume: &str,
        data: &[u8],
        parent: Option<(&Manifest, Vec<u64>)>,
    ) -> String {
        let options = CreateOptions {
            volume: volume.into(),
            marker: "m".into(),
            marker_seq: 0,
            node: "n".into(),
            chunk_size: CHUNK as u32,
            zstd_level: 1,
            threads: 2,
            snapshot_id: None,
            created_unix: None,
            group: None,
            read_limit: None,
            busy_read_limit: None,
            cpu_priority: crate::priority::CpuPriority::Normal,
            stop: None,
        };
        let (parent, changed) = match parent {
            Some((m, list)) => (Some(m), Changed::Chunks(list)),
            None => (None, Changed::All("test".into())),
        };
        create_snapshot(key, vault, &Mem(data.to_vec()), &options, parent, changed, &|_| {}).unwrap().manifest_key
    }

    fn image(vault: &dyn Vault, key: &TenantKey, manifest_key: &str) -> Vec<u8> {
        let m = read_manifest(vault, manifest_key, Some(key)).unwrap();
        let mut out = Vec::new();
        export(key, &[vault], &m, &mut out, ExportFormat::Raw, 2, &|_| {}).unwrap();
        out
    }

    #[test]
    fn copy_sends_only_missing_chunks_and_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let key = TenantKey::from_bytes([8; 32]);
        let a = LocalVault::open_deferred("a", dir.path().join("a"), "t").unwrap();
        let b = LocalVault::open_deferred("b", dir.path().join("b"), "t").unwrap();
        let mut data: Vec<u8> = (0..64 * CHUNK).map(|i| (i / CHUNK) as u8 ^ 0x5a).collect();
        let k1 = take(&key, &a, "db", &data, None);
        // An interrupted copy: a few chunks arrived, no manifest.
        let m1 = read_manifest(&a, &k1, Some(&key)).unwrap();
        for id in data_chunks(&key, &a, &m1).iter().take(10) {
            b.put_chunk(id, &a.get_chunk(id).unwrap()).unwrap();
        }
        assert!(list_snapshots(&b, None, Some(&key)).unwrap().0.is_empty(), "no manifest: invisible");
        let r = copy_snapshot(&key, &a, &b, &k1, "n", &|_| {}).unwrap();
        // 64 data chunks and the index chunk listing them.
        assert_eq!((r.chunks, r.sent), (65, 55));
        assert!(image(&b, &key, &k1) == data);
        assert!(copy_snapshot(&key, &a, &b, &k1, "n", &|_| {}).unwrap().already_complete);
        // An incremental changes two chunks: two are sent, and its index chunk.
        data[5 * CHUNK] ^= 1;
        data[40 * CHUNK + 9] ^= 1;
        let k2 = take(&key, &a, "db", &data, Some((&m1, vec![5, 40])));
        assert_eq!(copy_snapshot(&key, &a, &b, &k2, "n", &|_| {}).unwrap().sent, 3);
        assert!(image(&b, &key, &k2) == data);
    }

    /// A copy of an incremental whose parent is in the destination already looks only at
    /// the ranges that changed; without the parent there, at everything.
    #[test]
    fn a_copy_after_its_parent_looks_only_at_the_changed_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let key = TenantKey::from_bytes([8; 32]);
        let a = LocalVault::open_deferred("a", dir.path().join("a"), "t").unwrap();
        let b = LocalVault::open_deferred("b", dir.path().join("b"), "t").unwrap();
        let c = LocalVault::open_deferred("c", dir.path().join("c"), "t").unwrap();
        let (fanout, chunks, mut data) = four_ranges();
        let k1 = take(&key, &a, "db", &data, None);
        let r1 = copy_snapshot(&key, &a, &b, &k1, "n", &|_| {}).unwrap();
        assert_eq!((r1.chunks, r1.sent), (chunks as u64 + 4, chunks as u64 + 4));
        let m1 = read_manifest(&a, &k1, Some(&key)).unwrap();
        data[fanout * CHUNK + 100] ^= 0xff;
        let k2 = take(&key, &a, "db", &data, Some((&m1, vec![fanout as u64])));
        // Range 1 changed: its index chunk and its 2048 ids are looked at, one of each sent.
        let r2 = copy_snapshot(&key, &a, &b, &k2, "n", &|_| {}).unwrap();
        assert_eq!((r2.chunks, r2.sent), (fanout as u64 + 1, 2));
        assert!(image(&b, &key, &k2) == data);
        // Where the parent is not, the whole snapshot is looked at.
        let r3 = copy_snapshot(&key, &a, &c, &k2, "n", &|_| {}).unwrap();
        assert_eq!((r3.chunks, r3.sent), (chunks as u64 + 4, chunks as u64 + 4));
        assert!(image(&c, &key, &k2) == data);
        // A parent that verify found damaged in the destination proves nothing: the next
        // copy looks at everything and sends the lost chunk again.
        let m2 = read_manifest(&a, &k2, Some(&key)).unwrap();
        let ChunkRef::Data(lost) = ChunkMap::new(&key, &[&a], &m2).entry(5).unwrap() else { panic!("a hole") };
        assert!(b.store().remove(&lost).unwrap());
        assert!(!verify(&key, &b, &[], None, Subset::All, &|_| {}).unwrap().ok());
        data[2 * fanout * CHUNK + 100] ^= 0xff;
        let k3 = take(&key, &a, "db", &data, Some((&m2, vec![2 * fanout as u64])));
        let r4 = copy_snapshot(&key, &a, &b, &k3, "n", &|_| {}).unwrap();
        assert_eq!((r4.chunks, r4.sent), (chunks as u64 + 4, 3), "everything looked at; lost, new data, new index");
        assert!(image(&b, &key, &k3) == data);
    }

    #[test]
    fn copy_refuses_to_spread_a_corrupt_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let key = TenantKey::from_bytes([8; 32]);
        let a = LocalVault::open("a", dir.path().join("a"), "t").unwrap();
        let b = LocalVault::open("b", dir.path().join("b"), "t").unwrap();
        let data: Vec<u8> = (0..8 * CHUNK).map(|i| (i % 7) as u8).collect();
        let k1 = take(&key, &a, "db", &data, None);
        let id = data_chunks(&key, &a, &read_manifest(&a, &k1, Some(&key)).unwrap())[0];
        let at = a.store().locate(&id).unwrap().unwrap();
        flip_byte(&at.pack, at.offset + at.len - 10, 1);
        let err = copy_snapshot(&key, &a, &b, &k1, "n", &|_| {}).unwrap_err();
        assert!(err.to_string().contains(&id.to_string()), "{err}");
        assert!(b.get_object(&k1).is_err());
    }

    #[test]
    fn verify_heals_from_another_vault_and_records_failures() {
        let dir = tempfile::tempdir().unwrap();
        let key = TenantKey::from_bytes([8; 32]);
        let a = LocalVault::open("a", dir.path().join("a"), "t").unwrap();
        let b = LocalVault::open("b", dir.path().join("b"), "t").unwrap();
        let data: Vec<u8> = (0..16 * CHUNK).map(|i| (i * 13 % 256) as u8 ^ (i / CHUNK) as u8).collect();
        let k1 = take(&key, &a, "db", &data, None);
        copy_snapshot(&key, &a, &b, &k1, "n", &|_| {}).unwrap();
        let ids = data_chunks(&key, &a, &read_manifest(&a, &k1, Some(&key)).unwrap());
        let flip = |vault: &LocalVault, id: &ChunkId| {
            let at = vault.store().locate(id).unwrap().unwrap();
            flip_byte(&at.pack, at.offset + 45, 0x80);
        };
        flip(&a, &ids[3]);
        let bad_copy = a.store().locate(&ids[3]).unwrap().unwrap();
        assert!(a.store().remove(&ids[7]).unwrap());
        let report = verify(&key, &a, &[&b], None, Subset::All, &|_| {}).unwrap();
        assert!(report.ok(), "{report:?}");
        assert_eq!(report.findings.len(), 2);
        assert!(report.findings.iter().any(|f| f.id == ids[7] && f.problem == "missing"));
        assert!(report.findings.iter().any(|f| f.id == ids[3] && f.problem.contains("checksum")), "{report:?}");
        assert!(report.findings.iter().all(|f| f.healed_from.as_deref() == Some("b")));
        // The healed chunk is read from its new copy, also by a later open of the vault.
        let healed = a.store().locate(&ids[3]).unwrap().unwrap();
        assert_ne!((healed.pack.clone(), healed.offset), (bad_copy.pack, bad_copy.offset));
        assert!(image(&a, &key, &k1) == data);
        let reopened = LocalVault::open("a", dir.path().join("a"), "t").unwrap();
        assert_eq!(reopened.store().locate(&ids[3]).unwrap(), Some(healed));
        assert!(image(&reopened, &key, &k1) == data);
        drop(reopened);
        assert!(verify(&key, &a, &[], None, Subset::All, &|_| {}).unwrap().findings.is_empty());
        // Both copies bad: reported, recorded as failed.
        flip(&a, &ids[1]);
        flip(&b, &ids[1]);
        let report = verify(&key, &a, &[&b], None, Subset::All, &|_| {}).unwrap();
        assert!(!report.ok());
        let record = verify_record(&a, "db", snapshot_id_of(&k1)).unwrap().unwrap();
        assert!(!record.ok);
        assert_eq!(record.lost, vec![ids[1].to_string()]);
        // A rotating subset reads each chunk in exactly one slice.
        let mut seen = 0;
        for n in 0..4 {
            seen += verify(&key, &b, &[], None, Subset::Slice { n, of: 4 }, &|_| {}).unwrap().checked;
        }
        // Index chunks are read in every slice (the data ids come from them).
        assert_eq!(seen, ids.len() as u64 + 4);
        // The index chunk lost in every vault: named and recorded; the data of its range
        // cannot be checked, so the snapshot fails.
        let index = read_manifest(&a, &k1, Some(&key)).unwrap().index_chunks()[0];
        assert!(a.store().remove(&index).unwrap() && b.store().remove(&index).unwrap());
        let report = verify(&key, &a, &[&b], None, Subset::All, &|_| {}).unwrap();
        assert!(!report.ok());
        assert!(report.findings.iter().any(|f| f.id == index && f.healed_from.is_none()), "{report:?}");
        let record = verify_record(&a, "db", snapshot_id_of(&k1)).unwrap().unwrap();
        assert!(!record.ok && record.lost.contains(&index.to_string()), "{record:?}");
    }

    /// A snapshot that retention forgets (and GC strips) while verify reads it is reported
    /// as forgotten, not as lost chunks: nothing of it is healed back from the other vault
    /// (that would upload garbage), no record is written for it, and a chunk it shared with
    /// the snapshot still listed is checked, and healed, for that one.
    #[test]
    fn a_snapshot_forgotten_during_verify_is_not_damage() {
        let dir = tempfile::tempdir().unwrap();
        let key = TenantKey::from_bytes([8; 32]);
        let a = LocalVault::open("a", dir.path().join("a"), "t").unwrap();
        let b = LocalVault::open("b", dir.path().join("b"), "t").unwrap();
        let mut data: Vec<u8> = (0..16 * CHUNK).map(|i| (i * 7 % 251) as u8 ^ (i / CHUNK) as u8).collect();
        let k1 = take(&key, &a, "db", &data, None);
        let m1 = read_manifest(&a, &k1, Some(&key)).unwrap();
        for chunk in 0..8 {
            data[chunk * CHUNK] ^= 0xff;
        }
        let k2 = take(&key, &a, "db", &data, Some((&m1, (0..8).collect())));
        for k in [&k1, &k2] {
            copy_snapshot(&key, &a, &b, k, "n", &|_| {}).unwrap();
        }
        // Listed in id order: the first is forgotten under the verify, the later one kept.
        let (listed, _) = list_snapshots(&a, None, Some(&key)).unwrap();
        let (victim, survivor) = (listed[0].key.clone(), listed[1].key.clone());
        let kept: HashSet<ChunkId> = data_chunks(&key, &a, &listed[1].manifest).into_iter().collect();
        let (shared, only_victims): (Vec<ChunkId>, Vec<ChunkId>) =
            data_chunks(&key, &a, &listed[0].manifest).into_iter().partition(|id| kept.contains(id));
        assert_eq!(only_victims.len(), 8);
        drop(listed);
        // A chunk both use is really damaged.
        let at = a.store().locate(&shared[2]).unwrap().unwrap();
        flip_byte(&at.pack, at.offset + 45, 0x80);
        // At the first chunk read, retention forgets the victim and GC takes its own chunks.
        let first_read = std::sync::Once::new();
        let (doomed, gone) = (victim.clone(), only_victims.clone());
        let racing = HookedVault::new(
            a,
            Box::new(move |vault, _| {
                first_read.call_once(|| {
                    assert!(forget(vault, &doomed).unwrap());
                    for id in &gone {
                        assert!(vault.store().remove(id).unwrap());
                    }
                })
            }),
        );
        let report = verify(&key, &racing, &[&b], None, Subset::All, &|_| {}).unwrap();
        assert!(report.ok(), "{report:?}");
        assert_eq!(report.forgotten, std::slice::from_ref(&victim));
        let named: Vec<(ChunkId, Option<&str>)> =
            report.findings.iter().map(|f| (f.id, f.healed_from.as_deref())).collect();
        assert_eq!(named, [(shared[2], Some("b"))], "only the shared damage, healed for the survivor");
        for id in &only_victims {
            assert!(!racing.inner.has_chunk(id).unwrap(), "garbage {id} was healed back");
        }
        let record = |k: &str| verify_record(&racing.inner, "db", snapshot_id_of(k)).unwrap();
        assert!(record(&victim).is_none(), "no record for a forgotten snapshot");
        let record = record(&survivor).unwrap();
        assert!(record.ok && record.checked == 16 + 1 && record.healed == 1, "{record:?}");

        // A vault that lost every manifest forgot nothing: its missing chunks are damage.
        let wiped = dir.path().join("wiped");
        let c = LocalVault::open("c", &wiped, "t").unwrap();
        copy_snapshot(&key, &b, &c, &survivor, "n", &|_| {}).unwrap();
        let first_read = std::sync::Once::new();
        let key_of = survivor.clone();
        let losing = HookedVault::new(
            c,
            Box::new(move |vault, id| {
                first_read.call_once(|| assert!(forget(vault, &key_of).unwrap()));
                let _ = vault.store().remove(id);
            }),
        );
        let report = verify(&key, &losing, &[], None, Subset::All, &|_| {}).unwrap();
        assert!(!report.ok() && report.forgotten.is_empty(), "{report:?}");
    }

    /// Snapshots of a chain share most index chunks: verify reads each once, and a bad
    /// chunk in a shared range is lost for every snapshot that lists it.
    #[test]
    fn verify_reads_a_shared_index_chunk_once_and_charges_its_damage_to_every_snapshot() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        let dir = tempfile::tempdir().unwrap();
        let key = TenantKey::from_bytes([8; 32]);
        let a = LocalVault::open_deferred("a", dir.path().join("a"), "t").unwrap();
        let (fanout, chunks, mut data) = four_ranges();
        let k1 = take(&key, &a, "db", &data, None);
        let m1 = read_manifest(&a, &k1, Some(&key)).unwrap();
        data[fanout * CHUNK + 100] ^= 0xff;
        let k2 = take(&key, &a, "db", &data, Some((&m1, vec![fanout as u64])));
        let shared_index = m1.index_chunks().into_iter().find(|id| {
            let m2 = read_manifest(&a, &k2, Some(&key)).unwrap();
            m2.index_chunks().contains(id)
        });
        let shared_index = shared_index.unwrap();
        // Damage in range 0, which both snapshots list through the same index chunk.
        let victim = ChunkMap::new(&key, &[&a], &m1).entry(3).unwrap();
        let ChunkRef::Data(victim) = victim else { panic!("chunk 3 is a hole") };
        drop(m1);
        assert!(a.store().remove(&victim).unwrap());
        let reads = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&reads);
        let counting = HookedVault::new(
            a,
            Box::new(move |_, id| {
                if *id == shared_index {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            }),
        );
        let report = verify(&key, &counting, &[], None, Subset::All, &|_| {}).unwrap();
        // Once checked, once expanded, for the first snapshot; not again for the second.
        assert_eq!(reads.load(Ordering::Relaxed), 2);
        assert_eq!(report.findings.iter().filter(|f| f.id == victim).count(), 1, "{report:?}");
        for k in [&k1, &k2] {
            let record = verify_record(&counting.inner, "db", snapshot_id_of(k)).unwrap().unwrap();
            assert!(!record.ok && record.lost == [victim.to_string()], "{k}: {record:?}");
            assert_eq!(record.checked, chunks as u64 + 4, "{k}: {record:?}");
        }
    }

    /// Verify keeps several reads in flight (a remote vault's round trips overlap) and still
    /// names each bad chunk once, in order.
    #[test]
    fn verify_reads_in_parallel() {
        use std::sync::{Arc, Condvar, Mutex};
        let dir = tempfile::tempdir().unwrap();
        let key = TenantKey::from_bytes([8; 32]);
        let a = LocalVault::open("a", dir.path().join("a"), "t").unwrap();
        let data: Vec<u8> = (0..64 * CHUNK).map(|i| (i * 11 % 253) as u8 ^ (i / CHUNK) as u8).collect();
        let k1 = take(&key, &a, "db", &data, None);
        let manifest = read_manifest(&a, &k1, Some(&key)).unwrap();
        let ids = data_chunks(&key, &a, &manifest);
        // The index chunk is read alone, before the data it lists.
        let index = manifest.index_chunks();
        drop(manifest);
        for id in [&ids[5], &ids[40]] {
            assert!(a.store().remove(id).unwrap());
        }
        // (reads in flight, most seen at once, gave up): a read waits until a second one
        // starts beside it, or, once, a generous bound if none ever does.
        let state = Arc::new((Mutex::new((0usize, 0usize, false)), Condvar::new()));
        let seen = Arc::clone(&state);
        let slow = HookedVault::new(
            a,
            Box::new(move |_, id| {
                if index.contains(id) {
                    return;
                }
                let (lock, overlap) = &*seen;
                let mut now = lock.lock().unwrap();
                now.0 += 1;
                now.1 = now.1.max(now.0);
                overlap.notify_all();
                let bound = std::time::Duration::from_secs(5);
                let (mut now, waited) =
                    overlap.wait_timeout_while(now, bound, |(_, most, gave_up)| *most < 2 && !*gave_up).unwrap();
                now.2 |= waited.timed_out();
                now.0 -= 1;
            }),
        );
        let report = verify(&key, &slow, &[], None, Subset::All, &|_| {}).unwrap();
        assert!(state.0.lock().unwrap().1 > 1, "one read at a time");
        assert_eq!(report.checked, 64 + 1, "the data and the index chunk");
        let named: Vec<ChunkId> = report.findings.iter().map(|f| f.id).collect();
        assert_eq!(named, [ids[5], ids[40]], "{report:?}");
        assert!(!report.ok());
    }

    #[test]
    fn a_corrupt_manifest_is_named_and_healed() {
        let dir = tempfile::tempdir().unwrap();
        let key = TenantKey::from_bytes([8; 32]);
        let a = LocalVault::open("a", dir.path().join("a"), "t").unwrap();
        let b = LocalVault::open("b", dir.path().join("b"), "t").unwrap();
        let data: Vec<u8> = (0..4 * CHUNK).map(|i| (i / CHUNK) as u8 + 3).collect();
        let k1 = take(&key, &a, "db", &data, None);
        copy_snapshot(&key, &a, &b, &k1, "n", &|_| {}).unwrap();
        // One of its chunks went too (GC could not see the bad manifest reference it).
        let gone = data_chunks(&key, &a, &read_manifest(&a, &k1, Some(&key)).unwrap())[1];
        assert!(a.store().remove(&gone).unwrap());
        let mut bytes = a.get_object(&k1).unwrap();
        bytes[120] ^= 4;
        a.put_object(&k1, &bytes).unwrap();
        let (good, bad) = list_snapshots(&a, None, Some(&key)).unwrap();
        assert!(good.is_empty());
        assert!(bad[0].to_string().contains(&k1), "{}", bad[0]);
        // GC must not sweep when it cannot mark.
        assert!(gc(&a, &key, &GcOptions { holder: "n".into(), dry_run: false, max_deletes: None }, &|_| {}).is_err());
        let report = verify(&key, &a, &[&b], None, Subset::All, &|_| {}).unwrap();
        assert!(report.bad_manifests.is_empty(), "{report:?}");
        assert_eq!(list_snapshots(&a, None, Some(&key)).unwrap().0.len(), 1);
        // Healed as a copy: the chunk came back with the manifest.
        assert!(a.has_chunk(&gone).unwrap());
        assert!(image(&a, &key, &k1) == data);
    }

    /// A GC whose mark outlasts its lease renews the lease as it goes, so it never marks
    /// or sweeps on a lapsed one (when uploads may have started reusing chunks). This
    /// thread's clock moves 4 minutes per index chunk GC reads: 8 of them make a
    /// 32-minute mark, three 10-minute leases.
    #[test]
    fn a_gc_longer_than_its_lease_renews_it_as_it_marks() {
        use crate::lease::{test_clock, LeaseRecord, CLOCK_MARGIN_SECS};
        use std::sync::{Arc, Mutex};
        let dir = tempfile::tempdir().unwrap();
        let key = TenantKey::from_bytes([8; 32]);
        let inner = LocalVault::open("a", dir.path().join("a"), "t").unwrap();
        inner.store().backdate_writes(10);
        let (_, _, data) = four_ranges();
        let mut other = data.clone();
        for block in other.chunks_mut(CHUNK) {
            block[8] = 1;
        }
        let k1 = take(&key, &inner, "db", &data, None);
        let k2 = take(&key, &inner, "files", &other, None);
        let garbage = take(&key, &inner, "tmp", &vec![5u8; 8 * CHUNK], None);
        let garbage_chunks = data_chunks(&key, &inner, &read_manifest(&inner, &garbage, Some(&key)).unwrap());
        assert!(forget(&inner, &garbage).unwrap());
        // At each index chunk read: the clock moves, and (now, the lease's expiry) is noted.
        let seen: Arc<Mutex<Vec<(i64, i64)>>> = Arc::default();
        let noted = Arc::clone(&seen);
        let slow = HookedVault::new(
            inner,
            Box::new(move |vault, _| {
                test_clock::advance(240);
                let lease: LeaseRecord = serde_json::from_slice(&vault.get_object("leases/gc-n").unwrap()).unwrap();
                noted.lock().unwrap().push((now_unix(), lease.expires));
            }),
        );
        let options = GcOptions { holder: "n".into(), dry_run: false, max_deletes: None };
        let report = gc(&slow, &key, &options, &|_| {}).unwrap();
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 8, "four index chunks per snapshot, none shared");
        for &(now, expires) in &seen {
            assert!(expires - now > CLOCK_MARGIN_SECS, "the lease lapsed while marking: {seen:?}");
        }
        let renewals = seen.windows(2).filter(|w| w[1].1 > w[0].1).count();
        assert!(renewals >= 2, "{seen:?}");
        // The sweep ran, on a live lease: the forgotten snapshot's chunks (its one data
        // chunk and its index chunk) went, no other.
        assert_eq!(report.deleted as usize, garbage_chunks.len() + 1, "{report:?}");
        for manifest in [&k1, &k2] {
            let manifest = read_manifest(&slow, manifest, Some(&key)).unwrap();
            for id in data_chunks(&key, &slow.inner, &manifest) {
                assert!(slow.has_chunk(&id).unwrap());
            }
        }
    }

    /// GC under another tenant key cannot read the index chunks, so it names the manifest
    /// and deletes nothing.
    #[test]
    fn gc_under_another_key_stops_and_deletes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let key = TenantKey::from_bytes([8; 32]);
        let a = LocalVault::open("a", dir.path().join("a"), "t").unwrap();
        a.store().backdate_writes(10);
        let k1 = take(&key, &a, "db", &vec![3u8; 4 * CHUNK], None);
        let stored = a.list_chunks(None, usize::MAX).unwrap().len();
        let other = TenantKey::from_bytes([9; 32]);
        let all = GcOptions { holder: "n".into(), dry_run: false, max_deletes: None };
        let err = gc(&a, &other, &all, &|_| {}).unwrap_err();
        assert!(err.to_string().contains(&k1) && err.to_string().contains("not with this key"), "{err}");
        assert_eq!(a.list_chunks(None, usize::MAX).unwrap().len(), stored);
        assert_eq!(gc(&a, &key, &all, &|_| {}).unwrap().deleted, 0);
    }

    /// Random interleavings of snapshots, forgets, interrupted and dry-run GCs: every
    /// snapshot still listed restores to exactly the data it was taken from, and a
    /// complete GC leaves no unreferenced chunk.
    #[test]
    fn gc_never_loses_a_referenced_chunk() {
        for seed in 0..12u64 {
            gc_interleaving(seed, 1);
        }
    }

    /// The same with two stores open on one repo, as the daemon and a `keel snapshot gc`
    /// (or `create`) process have it: each step runs in a store picked at random, so a
    /// store's memory of which chunks exist goes stale under the other's removals and
    /// reclaims (the generation file and the re-read index logs must catch that).
    #[test]
    fn gc_never_loses_a_referenced_chunk_across_two_stores() {
        for seed in 100..112u64 {
            gc_interleaving(seed, 2);
        }
    }

    fn gc_interleaving(seed: u64, stores: usize) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let dir = tempfile::tempdir().unwrap();
        let key = TenantKey::from_bytes([seed as u8; 32]);
        let vaults: Vec<LocalVault> =
            (0..stores).map(|_| LocalVault::open_deferred("v", dir.path(), "t").unwrap()).collect();
        // Written "a while ago", so the final GC may sweep what the last steps left
        // unreferenced (a forgotten snapshot's own index chunks) instead of keeping it as
        // young, as it keeps chunks written while it runs.
        for vault in &vaults {
            vault.store().backdate_writes(10);
        }
        let pick = |rng: &mut rand::rngs::StdRng| &vaults[rng.gen_range(0..vaults.len())];
        let mut data = vec![0u8; 32 * CHUNK];
        let mut live: Vec<(String, Vec<u8>)> = Vec::new();
        let mut last_taken: Option<String> = None;
        for step in 0..25 {
            let vault = pick(&mut rng);
            match rng.gen_range(0..10) {
                0..=4 => {
                    let mut changed = Vec::new();
                    for _ in 0..rng.gen_range(1..6) {
                        let c = rng.gen_range(0..32);
                        let v = if rng.gen_bool(0.2) { 0 } else { rng.gen_range(1..6u8) };
                        data[c * CHUNK..(c + 1) * CHUNK].fill(v);
                        changed.push(c as u64);
                    }
                    changed.sort_unstable();
                    changed.dedup();
                    // Incremental from the last snapshot taken, if it was not forgotten.
                    let parent = last_taken
                        .as_ref()
                        .filter(|k| live.iter().any(|(l, _)| l == *k))
                        .map(|k| read_manifest(vault, k, Some(&key)).unwrap());
                    let k = take(&key, vault, "db", &data, parent.as_ref().map(|p| (p, changed)));
                    last_taken = Some(k.clone());
                    live.push((k, data.clone()));
                }
                5..=6 if !live.is_empty() => {
                    let (k, _) = live.remove(rng.gen_range(0..live.len()));
                    assert!(forget(vault, &k).unwrap());
                }
                _ => {
                    let options = GcOptions {
                        holder: "n".into(),
                        dry_run: rng.gen_bool(0.2),
                        max_deletes: rng.gen_bool(0.5).then(|| rng.gen_range(1..4)),
                    };
                    gc(vault, &key, &options, &|_| {}).unwrap();
                }
            }
            for (k, expected) in &live {
                let reader = pick(&mut rng);
                assert!(image(reader, &key, k) == *expected, "seed {seed}, step {step}: {k} damaged");
            }
        }
        // A complete GC (finishing any interrupted one, then a fresh pass) leaves only
        // referenced chunks, as every store sees it: a third pass finds nothing.
        let all = GcOptions { holder: "n".into(), dry_run: false, max_deletes: None };
        gc(pick(&mut rng), &key, &all, &|_| {}).unwrap();
        gc(pick(&mut rng), &key, &all, &|_| {}).unwrap();
        let report = gc(pick(&mut rng), &key, &all, &|_| {}).unwrap();
        assert_eq!(report.deleted, 0);
        let mut referenced = HashSet::new();
        for (k, _) in &live {
            let manifest = read_manifest(&vaults[0], k, Some(&key)).unwrap();
            referenced.extend(referenced_chunks(&key, &[&vaults[0]], &manifest).unwrap());
        }
        for vault in &vaults {
            let stored = vault.list_chunks(None, usize::MAX).unwrap();
            assert_eq!(stored.len(), referenced.len(), "seed {seed}: {report:?}");
        }
    }

    /// A complete GC gives the space of the chunks it deleted back: packs whose chunks
    /// are all gone are deleted; a dry run or an interrupted GC reclaims nothing.
    #[test]
    fn a_complete_gc_reclaims_the_packs_of_deleted_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let key = TenantKey::from_bytes([8; 32]);
        let data: Vec<u8> = (0..16 * CHUNK).map(|i| (i * 7 % 251) as u8 ^ (i / CHUNK) as u8).collect();
        let k1 = {
            let writer = LocalVault::open_deferred("v", dir.path(), "t").unwrap();
            writer.store().backdate_writes(10);
            take(&key, &writer, "db", &data, None)
            // Dropped: the pack it wrote is no longer being written.
        };
        let vault = LocalVault::open("v", dir.path(), "t").unwrap();
        let pack_bytes = || -> u64 {
            std::fs::read_dir(dir.path().join("t/packs"))
                .unwrap()
                .map(|e| e.unwrap())
                .filter(|e| e.file_name().to_string_lossy().ends_with(".pack"))
                .map(|e| e.metadata().unwrap().len())
                .sum()
        };
        let before = pack_bytes();
        assert!(before > 16 * 60, "16 frames: {before}");
        assert!(forget(&vault, &k1).unwrap());
        let dry =
            gc(&vault, &key, &GcOptions { holder: "n".into(), dry_run: true, max_deletes: None }, &|_| {}).unwrap();
        // 16 data chunks and an index chunk.
        assert_eq!((dry.deleted, dry.bytes_reclaimed), (17, 0));
        let partial = GcOptions { holder: "n".into(), dry_run: false, max_deletes: Some(3) };
        let report = gc(&vault, &key, &partial, &|_| {}).unwrap();
        assert!(report.incomplete);
        assert_eq!(report.bytes_reclaimed, 0);
        assert_eq!(pack_bytes(), before);
        let all = GcOptions { holder: "n".into(), dry_run: false, max_deletes: None };
        let report = gc(&vault, &key, &all, &|_| {}).unwrap();
        assert_eq!(report.deleted, 14);
        assert!(report.bytes_reclaimed > before, "{} of {before}", report.bytes_reclaimed);
        assert_eq!(pack_bytes(), 0);
        assert!(vault.list_chunks(None, 10).unwrap().is_empty());
    }

    /// The daemon keeps its repository open while `keel snapshot` commands open it too:
    /// a snapshot written through one open restores through another opened before it,
    /// and chunks the other deletes are not deduplicated against afterwards.
    #[test]
    fn two_opens_of_one_vault_see_each_others_snapshots_and_deletions() {
        let dir = tempfile::tempdir().unwrap();
        let key = TenantKey::from_bytes([8; 32]);
        let daemon = LocalVault::open_deferred("v", dir.path(), "t").unwrap();
        let cli = LocalVault::open_deferred("v", dir.path(), "t").unwrap();
        cli.store().backdate_writes(10);
        let data: Vec<u8> = (0..12 * CHUNK).map(|i| (i * 31 % 253) as u8 ^ (i / CHUNK) as u8).collect();
        let k1 = take(&key, &cli, "db", &data, None);
        assert!(image(&daemon, &key, &k1) == data);
        // The CLI forgets it and collects; the daemon then snapshots the same data again:
        // every chunk must be stored anew, not deduplicated against deleted ones.
        assert!(forget(&cli, &k1).unwrap());
        let all = GcOptions { holder: "cli".into(), dry_run: false, max_deletes: None };
        assert_eq!(gc(&cli, &key, &all, &|_| {}).unwrap().deleted, 12 + 1);
        let k2 = take(&key, &daemon, "db", &data, None);
        assert!(image(&cli, &key, &k2) == data);
        let m2 = read_manifest(&daemon, &k2, Some(&key)).unwrap();
        assert_eq!(m2.stats().new_chunks, 12);
    }
}
