//! `keel-inspect repo` and `keel-inspect chunk`: read a snapshot repository (a local vault
//! directory, `<dir>/<tenant>/{packs,objects}`) offline and say what is in it and what is
//! wrong with it.
//!
//! `repo` works in three passes, with memory bounded by the number of distinct chunks:
//!
//! 1. Every manifest is mapped (not read into memory) and checked — structure and
//!    checksums always, authenticity when a key is given. Its index chunks and its entries
//!    go into one array of referenced ids (32 bytes per entry, deduplicated whenever it
//!    doubles, as GC does); nothing is kept per snapshot but its row of the table. The
//!    entries of a version 3 manifest are in its index chunks, which only the tenant key
//!    can read: without `--key-file`, or with an index chunk damaged, those entries are
//!    unknown, the report says which manifests are *unresolved*, and no stored chunk is
//!    called orphaned (it may be one of theirs).
//! 2. The chunk store is listed in id order and merged with the sorted array: a stored id
//!    that no manifest names is *orphaned*, a referenced id that is not stored is
//!    *missing*. Every chunk is read from its pack and its frame checked without the key
//!    ([`check_frame`]: length, magic, version, crc, header); the header's lengths give the
//!    plaintext and stored sizes behind the ratios. The packs themselves are counted too:
//!    live and dead bytes (what `keel snapshot gc` would give back), orphaned packs, and
//!    index logs that show damage.
//! 3. Only when chunks are missing or corrupt: the manifests are scanned again for those
//!    ids (at most [`LIST_MAX`] of each kind), to name the snapshots and offsets that need
//!    them.
//!
//! `chunk` shows one chunk: the pack and offset it is stored at, its frame header, whether
//! its crc holds, with a key whether it decodes and re-hashes to its id, and which
//! snapshots reference it at which offsets.
//!
//! Like `keel-inspect volume`, nothing is locked: on a live repo a concurrent upload's
//! chunks show as orphaned until its manifest lands (the report lists uploads in progress).

use std::collections::HashMap;
use std::io::ErrorKind;
use std::path::Path;

use anyhow::{bail, Context, Result};
use keel_snapshot::create::{utc_display, Progress};
use keel_snapshot::keyfile::load_key_file;
use keel_snapshot::maintain::{manifest_keys, snapshot_id_of, volume_of};
use keel_snapshot::manifest::{ChunkMap, ChunkRef, Layout, Manifest};
use keel_snapshot::vault::{keys, LocalVault, ObjectEntry, Vault};
use keel_snapshot::{
    check_frame, decode_chunk, is_zero, ChunkId, ManifestError, TenantKey, HEADER_LEN, MAGIC, OVERHEAD,
};
use serde::Serialize;

use crate::units::format_size;

/// Problem chunks (orphaned, missing, corrupt) named in a report, per kind; the counts
/// and byte totals always cover all of them.
pub const LIST_MAX: usize = 100;
/// Snapshots named per problem chunk in `repo` (`chunk` names every one).
pub const SNAPSHOTS_MAX: usize = 8;
/// Places named per snapshot that references a chunk.
pub const LOCATIONS_MAX: usize = 8;
/// Chunks listed per page while walking the store.
const PAGE: usize = 1000;

/// Opens tenant `tenant`'s area of the repository at `dir`, refusing (rather than
/// creating) one that does not exist.
pub fn open_repo(dir: &Path, tenant: &str) -> Result<LocalVault> {
    let area = dir.join(tenant);
    if !area.is_dir() {
        let mut tenants: Vec<String> = std::fs::read_dir(dir)
            .with_context(|| format!("cannot read the repository {}", dir.display()))?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().join("packs").is_dir() || e.path().join("objects").is_dir())
            .filter_map(|e| e.file_name().to_str().map(str::to_owned))
            .collect();
        tenants.sort();
        let found = if tenants.is_empty() { "none".to_owned() } else { tenants.join(", ") };
        bail!("{} has no tenant {tenant:?} (no directory {}); tenants found: {found}", dir.display(), area.display());
    }
    LocalVault::open("repo", dir, tenant).with_context(|| format!("failed to open the repository {}", dir.display()))
}

/// Loads `--key-file` (a sealed file's passphrase comes from `KEEL_KEY_PASSPHRASE`).
pub fn load_key(path: Option<&Path>) -> Result<Option<TenantKey>> {
    let Some(path) = path else { return Ok(None) };
    let passphrase = std::env::var_os("KEEL_KEY_PASSPHRASE").map(|p| p.into_encoded_bytes());
    let key = load_key_file(path, passphrase.as_deref()).context("failed to load the tenant key")?;
    Ok(Some(key))
}

/// The report of `keel-inspect repo`.
#[derive(Debug, Clone, Serialize)]
pub struct RepoReport {
    /// The repository directory.
    pub dir: String,
    /// The tenant inspected.
    pub tenant: String,
    /// Whether manifests were authenticated (a key was given) or only checked.
    pub authenticated: bool,
    /// Snapshots by volume, oldest first.
    pub volumes: Vec<VolumeRows>,
    /// The chunk store.
    pub store: StoreTotals,
    /// The pack files the chunks are stored in.
    pub packs: PackTotals,
    /// What the snapshots reference.
    pub referenced: ReferencedTotals,
    /// Deduplication, compression and overall ratios, each with its definition.
    pub ratios: Vec<Ratio>,
    /// Stored chunks no manifest references (GC removes them).
    pub orphaned: ChunkList,
    /// Referenced chunks that are not stored.
    pub missing: ChunkList,
    /// Chunks whose frame fails its checks or cannot be read (referenced or not).
    pub corrupt_chunks: ChunkList,
    /// Manifests that fail to load, with the error.
    pub corrupt_manifests: Vec<BadManifest>,
    /// Manifests that load but whose entries could not all be read (index chunks need
    /// the key, or one is missing or corrupt), with why. While any are, `orphaned` is
    /// empty: an unreferenced stored chunk may be one of theirs.
    pub unresolved_manifests: Vec<BadManifest>,
    /// Upload intents present (their chunks show as orphaned until the manifest lands).
    pub uploads_in_progress: Vec<String>,
    /// True when no chunk is missing, no referenced chunk is corrupt, every manifest
    /// loads and every manifest's entries were read (so every chunk a snapshot needs was
    /// looked for).
    pub ok: bool,
}

/// One volume's snapshots.
#[derive(Debug, Clone, Serialize)]
pub struct VolumeRows {
    /// The volume.
    pub volume: String,
    /// Its snapshots, oldest first.
    pub snapshots: Vec<SnapshotRow>,
}

/// One snapshot's row.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotRow {
    /// Snapshot id.
    pub id: String,
    /// Manifest key.
    pub key: String,
    /// Marker time, unix seconds UTC.
    pub time: i64,
    /// Marker name.
    pub marker: String,
    /// Marker journal seq.
    pub marker_seq: u64,
    /// Parent snapshot id (incrementals).
    pub parent: Option<String>,
    /// Whether every chunk was read.
    pub full_read: bool,
    /// Chunk size, bytes.
    pub chunk_size: u32,
    /// Volume size, bytes.
    pub logical_size: u64,
    /// Manifest entries.
    pub chunks: u64,
    /// Index chunks holding the entries (0 for a version 1 or 2 manifest, which lists
    /// them inline).
    pub index_chunks: u64,
    /// Whether every entry was read (see [`RepoReport::unresolved_manifests`]); when not,
    /// `holes` and `data_bytes` count only the entries read.
    pub entries_read: bool,
    /// Entries that are holes.
    pub holes: u64,
    /// Bytes of the volume that are not holes.
    pub data_bytes: u64,
    /// Chunks this snapshot uploaded.
    pub new_chunks: u64,
    /// Encoded bytes of those.
    pub new_stored_bytes: u64,
    /// Plaintext bytes of those.
    pub new_plain_bytes: u64,
}

/// The chunk store's totals.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StoreTotals {
    /// Chunks stored (and read).
    pub chunks: u64,
    /// Their encoded frames' size.
    pub encoded_bytes: u64,
    /// Chunks whose frame passes [`check_frame`].
    pub valid_frames: u64,
    /// Valid frames whose payload is zstd-compressed.
    pub compressed_frames: u64,
    /// Sum of `plaintext_len` over valid frames.
    pub plaintext_bytes: u64,
    /// Sum of `stored_len` (the payload, before frame overhead) over valid frames.
    pub stored_bytes: u64,
}

/// The packs (docs/format-chunk.md, "Local chunk store").
#[derive(Debug, Clone, Default, Serialize)]
pub struct PackTotals {
    /// Pack files with an index log.
    pub packs: u64,
    /// Their size on disk.
    pub pack_bytes: u64,
    /// Bytes of chunks the store serves (frames and their ids).
    pub live_bytes: u64,
    /// Bytes of removed chunks, unsynced writes and headers: what reclaiming (at the end
    /// of a complete `keel snapshot gc`) gives back, once the packs are not being written.
    pub dead_bytes: u64,
    /// Size of the index logs.
    pub index_log_bytes: u64,
    /// Chunks stored twice (two processes stored one at once); harmless.
    pub extra_copies: u64,
    /// Pack files no index record names (a writer that crashed before its first sync, or
    /// one writing right now); deleted by GC once old.
    pub orphan_packs: u64,
    /// Their size.
    pub orphan_bytes: u64,
    /// Index logs that show damage (records may be lost), with what is wrong.
    pub damaged_index_logs: Vec<String>,
}

/// What the manifests reference.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReferencedTotals {
    /// Manifests that loaded.
    pub snapshots: u64,
    /// Distinct data chunk ids referenced.
    pub distinct_chunks: u64,
    /// Distinct index chunks referenced (version 3 manifests keep their entries in them).
    pub index_chunks: u64,
    /// Their frame sizes, where present and valid (not counted in the `distinct_` sums).
    pub index_encoded_bytes: u64,
    /// Sum over snapshots of their non-hole bytes (each snapshot counted in full).
    pub logical_data_bytes: u64,
    /// Distinct referenced chunks present with a valid frame.
    pub distinct_present: u64,
    /// Sum of `plaintext_len` over those.
    pub distinct_plaintext_bytes: u64,
    /// Sum of their frame sizes.
    pub distinct_encoded_bytes: u64,
}

/// A ratio, what it divides and what it means.
#[derive(Debug, Clone, Serialize)]
pub struct Ratio {
    /// `dedup`, `compression` or `overall`.
    pub name: &'static str,
    /// numerator / denominator; `None` when the denominator is 0.
    pub ratio: Option<f64>,
    /// Bytes above the line.
    pub numerator_bytes: u64,
    /// Bytes below the line.
    pub denominator_bytes: u64,
    /// The definition, in words.
    pub meaning: String,
}

/// A list of problem chunks: all counted, the first [`LIST_MAX`] named.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChunkList {
    /// How many.
    pub count: u64,
    /// How many of them a manifest references.
    pub referenced: u64,
    /// Their frame sizes (0 for missing chunks).
    pub bytes: u64,
    /// The first [`LIST_MAX`], in id order.
    pub chunks: Vec<ChunkProblem>,
}

impl ChunkList {
    fn push(&mut self, problem: ChunkProblem) {
        self.count += 1;
        self.referenced += u64::from(problem.referenced);
        self.bytes += problem.frame_bytes;
        if self.chunks.len() < LIST_MAX {
            self.chunks.push(problem);
        }
    }
}

/// One problem chunk.
#[derive(Debug, Clone, Serialize)]
pub struct ChunkProblem {
    /// The chunk id.
    pub id: String,
    /// Frame size (0 when missing).
    pub frame_bytes: u64,
    /// Whether a manifest references it.
    pub referenced: bool,
    /// What is wrong with the frame (corrupt chunks).
    pub error: Option<String>,
    /// Snapshots referencing it (the first [`SNAPSHOTS_MAX`]).
    pub referenced_by: Vec<Reference>,
    /// Snapshots referencing it, all counted.
    pub snapshots: u64,
}

/// A snapshot that references a chunk, and where.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Reference {
    /// `volume/snapshot id`.
    pub snapshot: String,
    /// How many of its entries are the chunk.
    pub entries: u64,
    /// The first [`LOCATIONS_MAX`] of them.
    pub at: Vec<Location>,
}

/// A manifest entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Location {
    /// Index in the manifest.
    pub index: u64,
    /// Byte offset in the volume.
    pub offset: u64,
}

/// A manifest that does not load.
#[derive(Debug, Clone, Serialize)]
pub struct BadManifest {
    /// Its key.
    pub key: String,
    /// Why.
    pub error: String,
}

/// `keel-inspect repo DIR --tenant T [--key-file F] [--json]`: prints the report; false
/// when the repository has problems.
pub fn repo(dir: &Path, tenant: &str, key_file: Option<&Path>, as_json: bool) -> Result<bool> {
    let vault = open_repo(dir, tenant)?;
    let key = load_key(key_file)?;
    let bar = crate::snapshot_cli::ProgressBar::new("reading chunks", "chunks");
    let report = repo_report(&vault, dir, tenant, key.as_ref(), &|p| bar.update(p))?;
    bar.finish();
    if as_json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render_repo(&report));
    }
    Ok(report.ok)
}

/// Builds the report on tenant `tenant`'s repository `vault` (see the module docs).
pub fn repo_report(
    vault: &LocalVault,
    dir: &Path,
    tenant: &str,
    key: Option<&TenantKey>,
    progress: &dyn Fn(Progress),
) -> Result<RepoReport> {
    // Pass 1: the manifests.
    let mut rows: Vec<SnapshotRow> = Vec::new();
    let mut corrupt_manifests = Vec::new();
    let mut unresolved_manifests = Vec::new();
    let mut referenced: Vec<[u8; 32]> = Vec::new();
    let mut index_ids: Vec<[u8; 32]> = Vec::new();
    let mut distinct_after_last_dedup = 0usize;
    let mut totals = ReferencedTotals::default();
    let manifests = manifest_keys(vault, None).context("failed to list the manifests")?;
    for entry in &manifests {
        let manifest = match open_manifest(vault, &entry.key, key) {
            Ok(Some(manifest)) => manifest,
            Ok(None) => continue, // forgotten meanwhile
            Err(error) => {
                corrupt_manifests.push(BadManifest { key: entry.key.clone(), error });
                continue;
            }
        };
        let mut row = snapshot_row(&entry.key, &manifest);
        index_ids.extend(manifest.index_chunks().iter().map(|id| id.0));
        let read = for_each_entry(vault, key, &manifest, |index, chunk| match chunk {
            ChunkRef::Hole => row.holes += 1,
            ChunkRef::Data(id) => {
                row.data_bytes += manifest.chunk_range(index as usize).1;
                referenced.push(id.0);
            }
        });
        if let Err(error) = read {
            row.entries_read = false;
            unresolved_manifests.push(BadManifest { key: entry.key.clone(), error });
        }
        // Snapshots share most chunks: dedup whenever the array doubles, so it stays
        // within twice the distinct count (plus one manifest) however long the history.
        if referenced.len() > 2 * distinct_after_last_dedup + (1 << 20) {
            referenced.sort_unstable();
            referenced.dedup();
            distinct_after_last_dedup = referenced.len();
        }
        totals.snapshots += 1;
        totals.logical_data_bytes += row.data_bytes;
        rows.push(row);
    }
    index_ids.sort_unstable();
    index_ids.dedup();
    totals.index_chunks = index_ids.len() as u64;
    referenced.sort_unstable();
    referenced.dedup();
    totals.distinct_chunks = referenced.len() as u64;
    // Index chunks are referenced too (a stored one is not an orphan, a lost one is missing),
    // but counted apart from the data behind the ratios.
    referenced.extend_from_slice(&index_ids);
    referenced.sort_unstable();
    referenced.dedup();

    // Pass 2: the store, merged with the referenced ids (both ascending).
    let references_complete = unresolved_manifests.is_empty();
    let mut store = StoreTotals::default();
    let mut orphaned = ChunkList::default();
    let mut missing = ChunkList::default();
    let mut corrupt_chunks = ChunkList::default();
    let mut next_referenced = 0usize;
    let mut after: Option<ChunkId> = None;
    loop {
        let page = vault.list_chunks(after.as_ref(), PAGE).context("failed to list the chunks")?;
        let Some(last) = page.last() else { break };
        after = Some(last.id);
        for entry in &page {
            while let Some(id) = referenced.get(next_referenced).filter(|id| **id < entry.id.0) {
                missing.push(problem(ChunkId(*id), 0, true, None));
                next_referenced += 1;
            }
            let is_referenced = referenced.get(next_referenced) == Some(&entry.id.0);
            if is_referenced {
                next_referenced += 1;
            }
            let frame = match vault.get_chunk(&entry.id) {
                Ok(frame) => frame,
                // Removed by a concurrent GC between the listing and the read.
                Err(e) if e.is_not_found() => {
                    if is_referenced {
                        missing.push(problem(entry.id, 0, true, None));
                    }
                    continue;
                }
                // One unreadable chunk is a finding, not the end of the report.
                Err(e) => {
                    corrupt_chunks.push(problem(entry.id, entry.len, is_referenced, Some(format!("cannot read: {e}"))));
                    continue;
                }
            };
            store.chunks += 1;
            store.encoded_bytes += frame.len() as u64;
            let header = match check_frame(&frame) {
                Ok(()) => frame_header(&frame),
                Err(e) => Err(e.to_string()),
            };
            match header {
                Ok(header) => {
                    store.valid_frames += 1;
                    store.compressed_frames += u64::from(header.compressed);
                    store.plaintext_bytes += u64::from(header.plaintext_len);
                    store.stored_bytes += u64::from(header.stored_len);
                    if is_referenced && index_ids.binary_search(&entry.id.0).is_ok() {
                        totals.index_encoded_bytes += frame.len() as u64;
                    } else if is_referenced {
                        totals.distinct_present += 1;
                        totals.distinct_plaintext_bytes += u64::from(header.plaintext_len);
                        totals.distinct_encoded_bytes += frame.len() as u64;
                    } else if references_complete {
                        orphaned.push(problem(entry.id, frame.len() as u64, false, None));
                    }
                }
                Err(error) => {
                    corrupt_chunks.push(problem(entry.id, frame.len() as u64, is_referenced, Some(error)));
                    if !is_referenced && references_complete {
                        orphaned.push(problem(entry.id, frame.len() as u64, false, None));
                    }
                }
            }
        }
        progress(Progress { done: store.chunks, total: 0 });
    }
    for id in referenced.get(next_referenced..).unwrap_or_default() {
        missing.push(problem(ChunkId(*id), 0, true, None));
    }
    drop(referenced);

    // Pass 3: who needs the missing and corrupt referenced chunks.
    let mut needed: Vec<&mut ChunkProblem> =
        missing.chunks.iter_mut().chain(corrupt_chunks.chunks.iter_mut().filter(|c| c.referenced)).collect();
    if !needed.is_empty() {
        let ids: Vec<ChunkId> = needed.iter().filter_map(|c| c.id.parse().ok()).collect();
        let mut found = find_references(vault, key, &manifests, &ids, SNAPSHOTS_MAX);
        for entry in &mut needed {
            if let Some((refs, snapshots)) = entry.id.parse().ok().and_then(|id: ChunkId| found.remove(&id)) {
                entry.referenced_by = refs;
                entry.snapshots = snapshots;
            }
        }
    }

    let stats = vault.store().stats().context("failed to count the packs")?;
    let packs = PackTotals {
        packs: stats.packs,
        pack_bytes: stats.pack_bytes,
        live_bytes: stats.live_bytes,
        dead_bytes: stats.dead_bytes,
        index_log_bytes: stats.index_log_bytes,
        extra_copies: stats.extra_copies,
        orphan_packs: stats.orphan_packs,
        orphan_bytes: stats.orphan_bytes,
        damaged_index_logs: stats.damaged_logs,
    };

    // A manifest whose entries were not read may need chunks that are gone: not OK.
    let ok = missing.count == 0
        && corrupt_chunks.referenced == 0
        && corrupt_manifests.is_empty()
        && unresolved_manifests.is_empty();
    let uploads = vault.list_objects(keys::UPLOADS).context("failed to list uploads in progress")?;
    let ratios = ratios(&store, &totals, missing.count + corrupt_chunks.referenced);
    let mut volumes: Vec<VolumeRows> = Vec::new();
    for row in rows {
        let volume = volume_of(&row.key).to_owned();
        match volumes.iter_mut().find(|v| v.volume == volume) {
            Some(v) => v.snapshots.push(row),
            None => volumes.push(VolumeRows { volume, snapshots: vec![row] }),
        }
    }
    volumes.sort_by(|a, b| a.volume.cmp(&b.volume));
    Ok(RepoReport {
        dir: dir.display().to_string(),
        tenant: tenant.to_owned(),
        authenticated: key.is_some(),
        volumes,
        store,
        packs,
        referenced: totals,
        ratios,
        orphaned,
        missing,
        corrupt_chunks,
        corrupt_manifests,
        unresolved_manifests,
        uploads_in_progress: uploads.into_iter().map(|u| u.key).collect(),
        ok,
    })
}

/// Calls `f` with every entry of `manifest` in volume order: inline, or read from its
/// index chunks in `vault` with `key`. An error says why (some of) the entries are unknown.
fn for_each_entry(
    vault: &LocalVault,
    key: Option<&TenantKey>,
    manifest: &Manifest,
    mut f: impl FnMut(u64, ChunkRef),
) -> Result<(), String> {
    match (manifest.layout(), key) {
        (Layout::Inline(chunks), _) => {
            for (index, raw) in chunks.iter().enumerate() {
                f(index as u64, ChunkRef::from_raw(raw));
            }
            Ok(())
        }
        (Layout::Indexed { .. }, Some(key)) => {
            ChunkMap::new(key, &[vault as &dyn Vault], manifest).for_each(f).map_err(|e| e.to_string())
        }
        (Layout::Indexed { .. }, None) => {
            Err("its entries are in index chunks, which only the tenant key can read (give --key-file)".into())
        }
    }
}

fn problem(id: ChunkId, frame_bytes: u64, referenced: bool, error: Option<String>) -> ChunkProblem {
    ChunkProblem { id: id.to_string(), frame_bytes, referenced, error, referenced_by: Vec::new(), snapshots: 0 }
}

fn snapshot_row(key: &str, m: &Manifest) -> SnapshotRow {
    let stats = m.stats();
    SnapshotRow {
        id: m.snapshot_id().to_owned(),
        key: key.to_owned(),
        time: m.created_unix(),
        marker: m.marker().to_owned(),
        marker_seq: m.marker_seq(),
        parent: m.parent().map(str::to_owned),
        full_read: m.full_read(),
        chunk_size: m.chunk_size(),
        logical_size: m.volume_size(),
        chunks: m.chunk_count() as u64,
        index_chunks: m.index_chunks().len() as u64,
        entries_read: true,
        holes: 0,
        data_bytes: 0,
        new_chunks: stats.new_chunks,
        new_stored_bytes: stats.new_stored_bytes,
        new_plain_bytes: stats.new_plain_bytes,
    }
}

fn ratios(store: &StoreTotals, totals: &ReferencedTotals, unreadable: u64) -> Vec<Ratio> {
    let ratio = |num: u64, den: u64| (den > 0).then(|| num as f64 / den as f64);
    let caveat = if unreadable > 0 {
        format!(" ({unreadable} referenced chunks are missing or corrupt and count above the line only)")
    } else {
        String::new()
    };
    vec![
        Ratio {
            name: "dedup",
            ratio: ratio(totals.logical_data_bytes, totals.distinct_plaintext_bytes),
            numerator_bytes: totals.logical_data_bytes,
            denominator_bytes: totals.distinct_plaintext_bytes,
            meaning: format!(
                "non-hole bytes of all snapshots, each counted in full as if stored alone, / plaintext \
                 bytes of the distinct chunks they reference (from the chunk headers){caveat}"
            ),
        },
        Ratio {
            name: "compression",
            ratio: ratio(store.plaintext_bytes, store.stored_bytes),
            numerator_bytes: store.plaintext_bytes,
            denominator_bytes: store.stored_bytes,
            meaning: format!(
                "plaintext bytes / stored payload bytes (zstd output, or the raw bytes when zstd did not \
                 pay) over all {} valid chunk frames, orphans included; the {OVERHEAD}-byte frame overhead is excluded",
                store.valid_frames
            ),
        },
        Ratio {
            name: "overall",
            ratio: ratio(totals.logical_data_bytes, store.encoded_bytes),
            numerator_bytes: totals.logical_data_bytes,
            denominator_bytes: store.encoded_bytes,
            meaning: "non-hole bytes of all snapshots / bytes of every stored chunk frame (with \
                      overhead, orphans included; pack dead bytes excluded): what the repository saves against \
                      full raw copies"
                .into(),
        },
    ]
}

/// Maps manifest `key` and checks it (and authenticates it with `tenant_key`); `None` when
/// it was removed meanwhile.
fn open_manifest(vault: &LocalVault, key: &str, tenant_key: Option<&TenantKey>) -> Result<Option<Manifest>, String> {
    let path = vault.object_path(key).map_err(|e| e.to_string())?;
    let manifest = match Manifest::open(&path) {
        Ok(manifest) => manifest,
        Err(ManifestError::Io { source, .. }) if source.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    if let Some(tenant_key) = tenant_key {
        manifest.authenticate(tenant_key).map_err(|e| e.to_string())?;
    }
    if manifest.volume() != volume_of(key) || manifest.snapshot_id() != snapshot_id_of(key) {
        return Err(format!(
            "it is snapshot {}/{} but is stored under another name",
            manifest.volume(),
            manifest.snapshot_id()
        ));
    }
    Ok(Some(manifest))
}

/// For each of `ids`: the first `snapshots_max` snapshots that reference it (with the
/// first [`LOCATIONS_MAX`] places in each) and the count of all, over the manifests that
/// load.
fn find_references(
    vault: &LocalVault,
    key: Option<&TenantKey>,
    manifests: &[ObjectEntry],
    ids: &[ChunkId],
    snapshots_max: usize,
) -> HashMap<ChunkId, (Vec<Reference>, u64)> {
    #[derive(Default)]
    struct Found {
        refs: Vec<Reference>,
        snapshots: u64,
        /// The manifest (its position in `manifests`) last counted.
        last_manifest: Option<usize>,
    }
    let mut sorted = ids.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut found: HashMap<ChunkId, Found> = HashMap::new();
    for (position, entry) in manifests.iter().enumerate() {
        let Ok(Some(manifest)) = open_manifest(vault, &entry.key, key) else { continue };
        let snapshot = format!("{}/{}", manifest.volume(), manifest.snapshot_id());
        let mut note = |id: ChunkId, index: u64| {
            if sorted.binary_search(&id).is_err() {
                return;
            }
            let f = found.entry(id).or_default();
            if f.last_manifest != Some(position) {
                f.last_manifest = Some(position);
                f.snapshots += 1;
                if f.refs.len() < snapshots_max {
                    f.refs.push(Reference { snapshot: snapshot.clone(), entries: 0, at: Vec::new() });
                }
            }
            // Only the newest reference can be this manifest's (it was not kept when full).
            if let Some(reference) = f.refs.last_mut().filter(|r| r.snapshot == snapshot) {
                reference.entries += 1;
                if reference.at.len() < LOCATIONS_MAX {
                    let offset = manifest.chunk_range(index as usize).0;
                    reference.at.push(Location { index, offset });
                }
            }
        };
        // An index chunk is named at the first chunk of the range it lists.
        if let Layout::Indexed { fanout, index } = manifest.layout() {
            for (piece, raw) in index.iter().enumerate() {
                if let ChunkRef::Data(id) = ChunkRef::from_raw(raw) {
                    note(id, piece as u64 * u64::from(fanout));
                }
            }
        }
        // Entries that cannot be read were reported in pass 1.
        let _ = for_each_entry(vault, key, &manifest, |index, chunk| {
            if let ChunkRef::Data(id) = chunk {
                note(id, index);
            }
        });
    }
    found.into_iter().map(|(id, f)| (id, (f.refs, f.snapshots))).collect()
}

/// The human rendering of a [`RepoReport`].
pub fn render_repo(r: &RepoReport) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let auth = if r.authenticated {
        "manifests authenticated with the key"
    } else {
        "manifests checked for structure and checksums only (give --key-file to authenticate them)"
    };
    let _ = writeln!(out, "repository {}, tenant {}: {auth}", r.dir, r.tenant);
    for v in &r.volumes {
        let _ = writeln!(out, "\nvolume {}: {} snapshots", v.volume, v.snapshots.len());
        let _ = writeln!(
            out,
            "  {:<25}  {:<19}  {:>8}  {:<25}  {:<4}  {:>7}  {:>9}  {:>8}  {:>7}  {:>8}  {:>9}",
            "id", "time (UTC)", "seq", "parent", "full", "chunk", "size", "chunks", "holes", "new", "new bytes"
        );
        for s in &v.snapshots {
            let _ = writeln!(
                out,
                "  {:<25}  {:<19}  {:>8}  {:<25}  {:<4}  {:>7}  {:>9}  {:>8}  {:>7}  {:>8}  {:>9}",
                s.id,
                utc_display(s.time),
                s.marker_seq,
                s.parent.as_deref().unwrap_or("-"),
                if s.full_read { "yes" } else { "no" },
                format_size(u64::from(s.chunk_size)),
                format_size(s.logical_size),
                s.chunks,
                if s.entries_read { s.holes.to_string() } else { "?".to_owned() },
                s.new_chunks,
                format_size(s.new_stored_bytes),
            );
        }
    }
    if r.volumes.is_empty() {
        let _ = writeln!(out, "\nno snapshots");
    }
    let s = &r.store;
    let _ = writeln!(
        out,
        "\nchunk store: {} chunks, {} encoded; {} valid frames ({} compressed), {} corrupt",
        s.chunks,
        format_size(s.encoded_bytes),
        s.valid_frames,
        s.compressed_frames,
        s.chunks - s.valid_frames
    );
    let p = &r.packs;
    let _ = writeln!(
        out,
        "packs:       {} packs, {} ({} live, {} dead: given back by a complete gc); {} index logs; \
         {} orphaned packs ({})",
        p.packs,
        format_size(p.pack_bytes),
        format_size(p.live_bytes),
        format_size(p.dead_bytes),
        format_size(p.index_log_bytes),
        p.orphan_packs,
        format_size(p.orphan_bytes),
    );
    if p.extra_copies > 0 {
        let _ = writeln!(out, "             {} chunks stored twice (harmless)", p.extra_copies);
    }
    for damage in &p.damaged_index_logs {
        let _ = writeln!(out, "             DAMAGED index log {damage}");
    }
    let t = &r.referenced;
    let _ = writeln!(
        out,
        "referenced:  {} snapshots reference {} distinct chunks ({} present and valid: {} plaintext, {} encoded)",
        t.snapshots,
        t.distinct_chunks,
        t.distinct_present,
        format_size(t.distinct_plaintext_bytes),
        format_size(t.distinct_encoded_bytes)
    );
    if t.index_chunks > 0 {
        let _ = writeln!(
            out,
            "             and {} index chunks listing them ({} encoded)",
            t.index_chunks,
            format_size(t.index_encoded_bytes)
        );
    }
    let _ = writeln!(out);
    for ratio in &r.ratios {
        let value = ratio.ratio.map_or("n/a".to_owned(), |x| format!("{x:.2}x"));
        let _ = writeln!(
            out,
            "{:<12} {value:>8} = {} / {}",
            ratio.name,
            format_size(ratio.numerator_bytes),
            format_size(ratio.denominator_bytes)
        );
        let _ = writeln!(out, "{:<21} {}", "", ratio.meaning);
    }
    if r.unresolved_manifests.is_empty() {
        render_list(
            &mut out,
            &r.orphaned,
            "orphaned chunks",
            "stored but referenced by no manifest; `keel snapshot gc` removes them",
        );
    } else {
        let _ = writeln!(
            out,
            "\norphaned chunks: not known: the entries of {} manifests could not be read",
            r.unresolved_manifests.len()
        );
        for m in &r.unresolved_manifests {
            let _ = writeln!(out, "  {}: {}", m.key, m.error);
        }
    }
    render_list(
        &mut out,
        &r.missing,
        "missing chunks",
        "referenced but not stored: the snapshots below cannot be restored from this repository alone",
    );
    render_list(
        &mut out,
        &r.corrupt_chunks,
        "corrupt chunks",
        "the frame fails its checks; `keel snapshot verify` heals referenced ones from another vault",
    );
    let _ = writeln!(out, "\ncorrupt manifests: {}", r.corrupt_manifests.len());
    for m in &r.corrupt_manifests {
        let _ = writeln!(out, "  {}: {}", m.key, m.error);
    }
    if !r.corrupt_manifests.is_empty() {
        let _ = writeln!(out, "  (chunks only these manifests reference show as orphaned)");
    }
    if !r.uploads_in_progress.is_empty() {
        let _ = writeln!(
            out,
            "\nuploads in progress: {} ({}); their chunks show as orphaned until their manifests land",
            r.uploads_in_progress.len(),
            r.uploads_in_progress.join(", ")
        );
    }
    let verdict = if r.ok {
        "OK".to_owned()
    } else {
        let referenced_corrupt = r.corrupt_chunks.chunks.iter().filter(|c| c.referenced).count();
        let mut verdict = format!(
            "PROBLEMS: {} missing chunks, {referenced_corrupt} corrupt referenced chunks, {} corrupt manifests",
            r.missing.count,
            r.corrupt_manifests.len()
        );
        if !r.unresolved_manifests.is_empty() {
            let _ = write!(
                verdict,
                ", {} manifests whose chunks were not all looked for{}",
                r.unresolved_manifests.len(),
                if r.authenticated { "" } else { " (give --key-file)" }
            );
        }
        verdict
    };
    let _ = writeln!(out, "\nverdict: {verdict}");
    out
}

fn render_list(out: &mut String, list: &ChunkList, title: &str, meaning: &str) {
    use std::fmt::Write;
    let _ = writeln!(out, "\n{title}: {} ({}) — {meaning}", list.count, format_size(list.bytes));
    for c in &list.chunks {
        let mut line = format!("  {}", c.id);
        if c.frame_bytes > 0 {
            let _ = write!(line, "  {}", format_size(c.frame_bytes));
        }
        if let Some(error) = &c.error {
            let _ = write!(line, "  {}: {error}", if c.referenced { "referenced" } else { "orphaned" });
        }
        let _ = writeln!(out, "{line}");
        for r in &c.referenced_by {
            let _ = writeln!(out, "      used by {}", describe_reference(r));
        }
        if c.snapshots > c.referenced_by.len() as u64 {
            let _ = writeln!(out, "      … and {} more snapshots", c.snapshots - c.referenced_by.len() as u64);
        }
    }
    if list.count > list.chunks.len() as u64 {
        let _ = writeln!(out, "  … {} more", list.count - list.chunks.len() as u64);
    }
}

/// `db/20261130T070000Z-1a2b3c4d at chunk 5 (offset 327680), chunk 9 (offset 589824)`.
fn describe_reference(r: &Reference) -> String {
    let mut places: Vec<String> = r.at.iter().map(|l| format!("chunk {} (offset {})", l.index, l.offset)).collect();
    if r.entries > r.at.len() as u64 {
        places.push(format!("… {} more", r.entries - r.at.len() as u64));
    }
    format!("{} at {}", r.snapshot, places.join(", "))
}

/// A chunk frame's header fields (docs/format-chunk.md, "Frame").
///
/// keel-snapshot keeps its `Header` type private, so the fields are read here in the
/// table's order; `frame_header_reads_what_the_encoder_wrote` pins them to the encoder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FrameHeader {
    /// Format version.
    pub version: u8,
    /// Flag bits.
    pub flags: u8,
    /// Flag bit 0: the payload is zstd.
    pub compressed: bool,
    /// Plaintext length.
    pub plaintext_len: u32,
    /// Stored payload length.
    pub stored_len: u32,
    /// The XChaCha20 nonce, hex.
    pub nonce: String,
}

/// The header fields of `frame` (any bytes: nothing is checked beyond the length).
pub fn frame_header(frame: &[u8]) -> Result<FrameHeader, String> {
    fn take<const N: usize>(r: &mut &[u8]) -> Result<[u8; N], String> {
        let (head, tail) = r.split_first_chunk::<N>().ok_or("shorter than a chunk header")?;
        *r = tail;
        Ok(*head)
    }
    let mut r: &[u8] =
        frame.get(..HEADER_LEN).ok_or_else(|| format!("{} bytes, shorter than a chunk header", frame.len()))?;
    let magic: [u8; 4] = take(&mut r)?;
    if magic != MAGIC {
        return Err(format!("magic {magic:02x?}, expected \"KCHK\""));
    }
    let [version] = take(&mut r)?;
    let [flags] = take(&mut r)?;
    let _reserved: [u8; 2] = take(&mut r)?;
    let plaintext_len = u32::from_le_bytes(take(&mut r)?);
    let stored_len = u32::from_le_bytes(take(&mut r)?);
    let nonce: [u8; 24] = take(&mut r)?;
    Ok(FrameHeader {
        version,
        flags,
        compressed: flags & 1 != 0,
        plaintext_len,
        stored_len,
        nonce: nonce.iter().map(|b| format!("{b:02x}")).collect(),
    })
}

/// The report of `keel-inspect chunk`.
#[derive(Debug, Clone, Serialize)]
pub struct ChunkReport {
    /// The chunk id.
    pub id: String,
    /// The pack it is stored in.
    pub pack: Option<String>,
    /// Offset of its frame in the pack.
    pub offset: Option<u64>,
    /// Whether the store holds it.
    pub present: bool,
    /// Frame size.
    pub frame_bytes: Option<u64>,
    /// Why its frame could not be read from the pack, when it could not.
    pub read_error: Option<String>,
    /// Header fields, when there is a header to read.
    pub header: Option<FrameHeader>,
    /// The crc trailer: stored and computed.
    pub crc: Option<CrcCheck>,
    /// Whether the frame passes every keyless check ([`check_frame`]).
    pub frame_ok: bool,
    /// Why it does not.
    pub frame_error: Option<String>,
    /// Decoding with the key (when given).
    pub decode: Option<DecodeCheck>,
    /// Every snapshot that references the chunk, with the first [`LOCATIONS_MAX`] places.
    pub referenced_by: Vec<Reference>,
    /// Manifests skipped because they do not load.
    pub unreadable_manifests: Vec<BadManifest>,
    /// True when present, readable, well-formed and (with a key) decoding to its id.
    pub ok: bool,
}

/// A frame's crc trailer.
#[derive(Debug, Clone, Serialize)]
pub struct CrcCheck {
    /// The trailer.
    pub stored: u32,
    /// crc32 of the bytes before it.
    pub computed: u32,
    /// Whether they agree.
    pub ok: bool,
}

/// What decoding with the key found.
#[derive(Debug, Clone, Serialize)]
pub struct DecodeCheck {
    /// Authenticated, decompressed and re-hashed to the id.
    pub ok: bool,
    /// Why not.
    pub error: Option<String>,
    /// Plaintext size.
    pub plaintext_bytes: Option<u64>,
    /// Whether the plaintext hashes to the id (checked again here, explicitly).
    pub rehash_matches: Option<bool>,
    /// Whether the plaintext is all zeros (a writer stores such chunks as holes).
    pub is_zero: Option<bool>,
    /// Its first 32 bytes, hex.
    pub first_bytes: Option<String>,
}

/// `keel-inspect chunk ID --repo DIR --tenant T [--key-file F] [--json]`: prints the
/// report; false when the chunk is missing or bad.
pub fn chunk(id: &str, dir: &Path, tenant: &str, key_file: Option<&Path>, as_json: bool) -> Result<bool> {
    let id: ChunkId = id.trim().parse()?;
    let vault = open_repo(dir, tenant)?;
    let key = load_key(key_file)?;
    let report = chunk_report(&vault, &id, key.as_ref())?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render_chunk(&report));
    }
    Ok(report.ok)
}

/// Builds the report on chunk `id` of `vault`.
pub fn chunk_report(vault: &LocalVault, id: &ChunkId, key: Option<&TenantKey>) -> Result<ChunkReport> {
    let location = vault.store().locate(id).context("failed to look the chunk up")?;
    let (frame, read_error) = match &location {
        None => (None, None),
        Some(_) => match vault.get_chunk(id) {
            Ok(frame) => (Some(frame), None),
            Err(e) if e.is_not_found() => (None, None), // removed meanwhile
            Err(e) => (None, Some(e.to_string())),
        },
    };
    let manifests = manifest_keys(vault, None).context("failed to list the manifests")?;
    let mut unreadable_manifests = Vec::new();
    for entry in &manifests {
        if let Err(error) = open_manifest(vault, &entry.key, key) {
            unreadable_manifests.push(BadManifest { key: entry.key.clone(), error });
        }
    }
    let (referenced_by, _) = find_references(vault, key, &manifests, &[*id], usize::MAX).remove(id).unwrap_or_default();
    let mut report = ChunkReport {
        id: id.to_string(),
        pack: location.as_ref().map(|l| l.pack.display().to_string()),
        offset: location.as_ref().map(|l| l.offset),
        present: frame.is_some() || read_error.is_some(),
        frame_bytes: location.as_ref().map(|l| l.len),
        read_error,
        header: None,
        crc: None,
        frame_ok: false,
        frame_error: None,
        decode: None,
        referenced_by,
        unreadable_manifests,
        ok: false,
    };
    let Some(frame) = frame else { return Ok(report) };
    report.header = frame_header(&frame).ok();
    if let Some((body, trailer)) = frame.split_last_chunk::<4>() {
        let stored = u32::from_le_bytes(*trailer);
        let computed = crc32fast::hash(body);
        report.crc = Some(CrcCheck { stored, computed, ok: stored == computed });
    }
    match check_frame(&frame) {
        Ok(()) => report.frame_ok = true,
        Err(e) => report.frame_error = Some(e.to_string()),
    }
    report.decode = key.map(|key| match decode_chunk(key, id, &frame) {
        Ok(plain) => DecodeCheck {
            ok: true,
            error: None,
            plaintext_bytes: Some(plain.len() as u64),
            rehash_matches: Some(key.chunk_id(&plain) == *id),
            is_zero: Some(is_zero(&plain)),
            first_bytes: Some(plain.iter().take(32).map(|b| format!("{b:02x}")).collect()),
        },
        Err(e) => DecodeCheck {
            ok: false,
            error: Some(e.to_string()),
            plaintext_bytes: None,
            rehash_matches: None,
            is_zero: None,
            first_bytes: None,
        },
    });
    report.ok = report.frame_ok && report.decode.as_ref().is_none_or(|d| d.ok && d.rehash_matches == Some(true));
    Ok(report)
}

/// The human rendering of a [`ChunkReport`].
pub fn render_chunk(r: &ChunkReport) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "chunk       {}", r.id);
    match (&r.pack, r.offset, r.frame_bytes) {
        (Some(pack), Some(offset), Some(len)) if r.present => {
            let _ = writeln!(out, "stored      in {pack} at offset {offset} ({len} bytes)");
        }
        _ => {
            let _ = writeln!(out, "stored      MISSING (not in the store)");
        }
    }
    if let Some(e) = &r.read_error {
        let _ = writeln!(out, "read        FAILED: {e}");
    }
    if let Some(h) = &r.header {
        let _ = writeln!(
            out,
            "header      version {}, flags {:#04x} ({}), plaintext {} B, stored {} B",
            h.version,
            h.flags,
            if h.compressed { "zstd" } else { "raw" },
            h.plaintext_len,
            h.stored_len
        );
        let _ = writeln!(out, "nonce       {}", h.nonce);
    } else if r.present && r.read_error.is_none() {
        let _ = writeln!(out, "header      unreadable (not a chunk frame)");
    }
    if let Some(crc) = &r.crc {
        let verdict = if crc.ok { "ok" } else { "MISMATCH" };
        let _ = writeln!(out, "crc         {verdict} (stored {:#010x}, computed {:#010x})", crc.stored, crc.computed);
    }
    if r.present && r.read_error.is_none() {
        match &r.frame_error {
            None => {
                let _ = writeln!(out, "frame       ok (length, magic, version, crc, header)");
            }
            Some(e) => {
                let _ = writeln!(out, "frame       CORRUPT: {e}");
            }
        }
    }
    match &r.decode {
        Some(d) if d.ok => {
            let _ = writeln!(
                out,
                "decode      ok: authenticated, re-hashes to its id: {}; plaintext {} B, all zeros: {}",
                if d.rehash_matches == Some(true) { "yes" } else { "NO" },
                d.plaintext_bytes.unwrap_or(0),
                if d.is_zero == Some(true) { "yes" } else { "no" },
            );
            let _ = writeln!(out, "first bytes {}", d.first_bytes.as_deref().unwrap_or(""));
        }
        Some(d) => {
            let _ = writeln!(out, "decode      FAILED: {}", d.error.as_deref().unwrap_or("unknown"));
        }
        None if r.present => {
            let _ = writeln!(out, "decode      not tried (give --key-file to decrypt and re-hash)");
        }
        None => {}
    }
    let _ = writeln!(out, "referenced  by {} snapshots", r.referenced_by.len());
    for reference in &r.referenced_by {
        let _ = writeln!(out, "  {}", describe_reference(reference));
    }
    for m in &r.unreadable_manifests {
        let _ = writeln!(out, "  (skipped manifest {}: {})", m.key, m.error);
    }
    let _ = writeln!(out, "verdict     {}", if r.ok { "OK" } else { "BAD" });
    out
}

#[cfg(test)]
mod tests {
    use keel_snapshot::encode_chunk;

    use super::*;

    /// The header fields are read here, not by keel-snapshot: pin them to its encoder.
    #[test]
    fn frame_header_reads_what_the_encoder_wrote() {
        let key = TenantKey::from_bytes([4; 32]);
        for (plaintext, compressed) in [(vec![7u8; 10_000], true), ((0..=255u8).collect::<Vec<u8>>(), false)] {
            let (_, frame) = encode_chunk(&key, &plaintext, 3).unwrap();
            let header = frame_header(&frame).unwrap();
            assert_eq!(header.version, 1);
            assert_eq!(header.compressed, compressed);
            assert_eq!(header.flags, u8::from(compressed));
            assert_eq!(header.plaintext_len as usize, plaintext.len());
            assert_eq!(header.stored_len as usize + OVERHEAD, frame.len());
            assert_eq!(header.nonce.len(), 48);
            assert!(header.nonce.chars().all(|c| c.is_ascii_hexdigit()));
        }
        assert!(frame_header(b"KCHK").is_err());
        assert!(frame_header(&[0u8; 64]).unwrap_err().contains("magic"));
    }

    #[test]
    fn a_missing_tenant_is_named_with_the_tenants_there() {
        let dir = tempfile::tempdir().unwrap();
        LocalVault::open("repo", dir.path(), "acme").unwrap();
        let err = open_repo(dir.path(), "globex").unwrap_err().to_string();
        assert!(err.contains("no tenant \"globex\"") && err.contains("tenants found: acme"), "{err}");
        assert!(!dir.path().join("globex").exists(), "inspecting created the tenant");
    }
}
