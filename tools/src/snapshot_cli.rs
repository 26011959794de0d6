//! `keel snapshot …`: the operator's and the customer's commands.
//!
//! `create` asks the running daemon (it holds the volumes); every other command works on
//! the repository and the vaults directly, with the node's configuration, so restores and
//! exports work while the daemon is down or on another machine that has the key.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Subcommand;
use keel_snapshot::create::{utc_display, Progress};
use keel_snapshot::maintain::{self, GcOptions, Subset};
use keel_snapshot::manifest::{ChunkMap, ChunkRef, Piece};
use keel_snapshot::restore::{self, ExportFormat, FileTarget, RestoreOptions, Target};
use keel_snapshot::vault::Vault;
use serde_json::json;

use crate::config::NodeConfig;
use crate::control::{self, ControlRequest, ControlResponse};
use crate::snapshot::Repo;
use crate::units::format_size;

/// `keel snapshot` subcommands.
#[derive(Subcommand, Debug)]
pub enum SnapshotCommand {
    /// Create the tenant key file (print where; back it up: without it nothing restores).
    KeyInit {
        /// The node's config file.
        #[arg(long)]
        config: PathBuf,
        /// Seal the key under a passphrase (KEEL_KEY_PASSPHRASE or passphrase_file).
        #[arg(long)]
        sealed: bool,
    },
    /// Take a snapshot of VOLUME, or of every volume of consistency group GROUP at one
    /// instant, now (through the running daemon), copy it, apply retention.
    Create {
        /// The volume or group (`[[snapshots.group]]`).
        volume: String,
        /// The journal marker's name.
        #[arg(long)]
        name: Option<String>,
        /// The node's config file.
        #[arg(long)]
        config: PathBuf,
        /// Print the daemon's answer as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List snapshots (with their vault copies).
    List {
        /// Only this volume.
        volume: Option<String>,
        /// The vault to list (default: the node's repo, "local").
        #[arg(long, default_value = "local")]
        vault: String,
        /// The node's config file.
        #[arg(long)]
        config: PathBuf,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one snapshot: VOLUME/ID, an id, or a unique id prefix.
    Show {
        /// The snapshot.
        snapshot: String,
        /// The vault (default "local").
        #[arg(long, default_value = "local")]
        vault: String,
        /// The node's config file.
        #[arg(long)]
        config: PathBuf,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// The chunk ranges that differ between two snapshots of a volume.
    Diff {
        /// The older snapshot.
        from: String,
        /// The newer snapshot.
        to: String,
        /// The vault (default "local").
        #[arg(long, default_value = "local")]
        vault: String,
        /// The node's config file.
        #[arg(long)]
        config: PathBuf,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Restore a snapshot into a new file, a block device, or a new volume (bit-exact).
    Restore {
        /// The snapshot.
        snapshot: String,
        /// Write a new sparse image file (refuses to overwrite).
        #[arg(long, conflicts_with_all = ["to_device", "to_volume"])]
        to_file: Option<PathBuf>,
        /// Write over a block device (or an existing file) of at least the volume's size.
        #[arg(long, conflicts_with = "to_volume")]
        to_device: Option<PathBuf>,
        /// Create a new volume of this name on this node (daemon stopped, or restart it).
        #[arg(long)]
        to_volume: Option<String>,
        /// Read from this vault first (default "local"; the others are fallbacks).
        #[arg(long, default_value = "local")]
        vault: String,
        /// Parallel chunk fetches (default: 8 from a local vault, 32 over the network).
        #[arg(long)]
        threads: Option<usize>,
        /// The node's config file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Write a snapshot as an image stream: raw, or raw.zst (the customer's download).
    Export {
        /// The snapshot.
        snapshot: String,
        /// Output file, or - for stdout.
        #[arg(short, long)]
        output: PathBuf,
        /// raw or raw.zst.
        #[arg(long, default_value = "raw.zst")]
        format: String,
        /// Read from this vault first.
        #[arg(long, default_value = "local")]
        vault: String,
        /// The node's config file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Create a new volume from an image (raw or raw.zst), e.g. a customer's upload.
    Import {
        /// The image file.
        image: PathBuf,
        /// The new volume's name.
        #[arg(long)]
        volume: String,
        /// The node's config file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Serve a snapshot read-only over NBD on a Unix socket, until interrupted.
    Serve {
        /// The snapshot.
        snapshot: String,
        /// The socket to listen on.
        #[arg(long)]
        socket: PathBuf,
        /// Read from this vault first.
        #[arg(long, default_value = "local")]
        vault: String,
        /// The node's config file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Re-read, authenticate and re-hash chunks; heal bad ones from the other vaults.
    Verify {
        /// Only this volume.
        volume: Option<String>,
        /// The vault to verify (default "local").
        #[arg(long, default_value = "local")]
        vault: String,
        /// Read only slice N of M (N/M), e.g. the day of the month / 30.
        #[arg(long)]
        subset: Option<String>,
        /// The node's config file.
        #[arg(long)]
        config: PathBuf,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Remove snapshots: the ones named, or those the retention policy does not keep.
    Forget {
        /// Snapshots to remove.
        snapshots: Vec<String>,
        /// Apply the configured retention policy to VOLUME instead.
        #[arg(long)]
        policy: Option<String>,
        /// Print what would be kept and removed, and why; remove nothing.
        #[arg(long)]
        dry_run: bool,
        /// The vault (default "local").
        #[arg(long, default_value = "local")]
        vault: String,
        /// The node's config file.
        #[arg(long)]
        config: PathBuf,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Delete chunks no snapshot references (never while an upload runs).
    Gc {
        /// The vault (default "local").
        #[arg(long, default_value = "local")]
        vault: String,
        /// Count, delete nothing.
        #[arg(long)]
        dry_run: bool,
        /// Stop after this many deletions; the next run resumes.
        #[arg(long)]
        max_deletes: Option<u64>,
        /// The node's config file.
        #[arg(long)]
        config: PathBuf,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Copy snapshots the vaults lack (normally the daemon does this).
    Copy {
        /// Only this volume.
        volume: Option<String>,
        /// The node's config file.
        #[arg(long)]
        config: PathBuf,
    },
}

/// Runs a `keel snapshot` command.
pub fn run(command: SnapshotCommand) -> Result<()> {
    match command {
        SnapshotCommand::KeyInit { config, sealed } => {
            let config = NodeConfig::load(&config)?;
            let path = crate::snapshot::init_key(&config, sealed)?;
            println!("created tenant key {}; back it up: snapshots cannot be read without it", path.display());
            Ok(())
        }
        SnapshotCommand::Create { volume, name, config, json } => {
            let config = NodeConfig::load(&config)?;
            let request = ControlRequest::Snapshot { volume, marker: name };
            let response = control::call(&control::socket_path(&config), &request, control::SNAPSHOT_TIMEOUT)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&response)?);
            }
            match response {
                ControlResponse::Done { message, details } => {
                    if !json {
                        println!("{message}");
                        println!("{}", serde_json::to_string_pretty(&details)?);
                    }
                    Ok(())
                }
                ControlResponse::Refused { message } => bail!("refused: {message}"),
                ControlResponse::Error { message } => bail!("{message}"),
                other => bail!("unexpected answer from the daemon: {other:?}"),
            }
        }
        SnapshotCommand::List { volume, vault, config, json } => {
            let repo = Repo::open(&NodeConfig::load(&config)?)?;
            list(&repo, &*repo.vault(&vault)?, volume.as_deref(), json)
        }
        SnapshotCommand::Show { snapshot, vault, config, json } => {
            let repo = Repo::open(&NodeConfig::load(&config)?)?;
            show(&repo, &*repo.vault(&vault)?, &snapshot, json)
        }
        SnapshotCommand::Diff { from, to, vault, config, json } => {
            let repo = Repo::open(&NodeConfig::load(&config)?)?;
            diff(&repo, &*repo.vault(&vault)?, &from, &to, json)
        }
        SnapshotCommand::Restore { snapshot, to_file, to_device, to_volume, vault, threads, config } => {
            let config = NodeConfig::load(&config)?;
            let repo = Repo::open(&config)?;
            restore_cmd(&config, &repo, &vault, &snapshot, to_file, to_device, to_volume, threads)
        }
        SnapshotCommand::Export { snapshot, output, format, vault, config } => {
            let repo = Repo::open(&NodeConfig::load(&config)?)?;
            export_cmd(&repo, &vault, &snapshot, &output, &format)
        }
        SnapshotCommand::Import { image, volume, config } => import_cmd(&NodeConfig::load(&config)?, &image, &volume),
        SnapshotCommand::Serve { snapshot, socket, vault, config } => {
            let repo = Repo::open(&NodeConfig::load(&config)?)?;
            let first = repo.vault(&vault)?;
            let found = repo.find(&*first, &snapshot)?;
            let vaults = ordered_vaults(&repo, &vault)?;
            let name = format!("{}@{}", found.manifest.volume(), found.manifest.snapshot_id());
            let export =
                crate::snapshot_export::SnapshotExport::new(name.clone(), repo.key.clone(), vaults, found.manifest);
            eprintln!(
                "serving {name} read-only on {} (nbd+unix:///{name}?socket={})",
                socket.display(),
                socket.display()
            );
            crate::snapshot_export::serve_snapshot(&socket, export)
        }
        SnapshotCommand::Verify { volume, vault, subset, config, json } => {
            let repo = Repo::open(&NodeConfig::load(&config)?)?;
            verify_cmd(&repo, &vault, volume.as_deref(), subset.as_deref(), json)
        }
        SnapshotCommand::Forget { snapshots, policy, dry_run, vault, config, json } => {
            let repo = Repo::open(&NodeConfig::load(&config)?)?;
            forget_cmd(&repo, &vault, &snapshots, policy.as_deref(), dry_run, json)
        }
        SnapshotCommand::Gc { vault, dry_run, max_deletes, config, json } => {
            let repo = Repo::open(&NodeConfig::load(&config)?)?;
            let v = repo.vault(&vault)?;
            let options = GcOptions { holder: repo.holder(), dry_run, max_deletes };
            let bar = ProgressBar::new("gc", "chunks");
            let report = maintain::gc(&*v, &repo.key, &options, &|p| bar.update(p))?;
            bar.finish();
            if json {
                println!(
                    "{}",
                    json!({ "vault": vault, "dry_run": dry_run, "manifests": report.manifests, "referenced": report.referenced,
                        "examined": report.examined, "deleted": report.deleted, "bytes_freed": report.bytes_freed,
                        "bytes_reclaimed": report.bytes_reclaimed, "kept_young": report.kept_young, "resumed": report.resumed, "incomplete": report.incomplete })
                );
            } else {
                let verb = if dry_run { "would delete" } else { "deleted" };
                println!(
                    "vault {vault}: {} manifests reference {} chunks; examined {}, {verb} {} ({}); {} of disk given back{}{}",
                    report.manifests,
                    report.referenced,
                    report.examined,
                    report.deleted,
                    format_size(report.bytes_freed),
                    format_size(report.bytes_reclaimed),
                    if report.resumed { "; resumed an interrupted run" } else { "" },
                    if report.incomplete { "; stopped at --max-deletes, run again to continue" } else { "" },
                );
            }
            Ok(())
        }
        SnapshotCommand::Copy { volume, config } => {
            let repo = Repo::open(&NodeConfig::load(&config)?)?;
            // As the daemon copies: at the configured CPU priority.
            let outcomes = keel_snapshot::priority::run_at(repo.cpu_priority, || repo.replicate(volume.as_deref()))?;
            let mut failed = 0;
            for o in &outcomes {
                match &o.result {
                    Ok(r) => println!(
                        "{} → {}: sent {} of {} chunks ({})",
                        o.key,
                        o.vault,
                        r.sent,
                        r.chunks,
                        format_size(r.bytes_sent)
                    ),
                    Err(e) => {
                        failed += 1;
                        println!("{} → {}: delayed: {e}", o.key, o.vault);
                    }
                }
            }
            if outcomes.is_empty() {
                println!("every vault holds every snapshot");
            }
            if failed > 0 {
                bail!("{failed} copies delayed");
            }
            Ok(())
        }
    }
}

/// `vault` first, then the other vaults (fallbacks for bad or missing chunks).
fn ordered_vaults(repo: &Repo, first: &str) -> Result<Vec<Arc<dyn Vault>>> {
    let head = repo.vault(first)?;
    let mut out = vec![head];
    out.extend(repo.all_vaults().into_iter().filter(|v| v.name() != first));
    Ok(out)
}

fn list(repo: &Repo, vault: &dyn Vault, volume: Option<&str>, json: bool) -> Result<()> {
    let (listed, bad) = maintain::list_snapshots(vault, volume, Some(&repo.key))?;
    let mut rows = Vec::new();
    for l in &listed {
        let m = &l.manifest;
        let copies: Vec<serde_json::Value> = repo
            .copies(&l.key)
            .into_iter()
            .map(|(name, held)| match held {
                Ok(h) => json!({ "vault": name, "complete": h }),
                Err(e) => json!({ "vault": name, "error": e }),
            })
            .collect();
        let complete = copies.iter().filter(|c| c["complete"] == json!(true)).count();
        let verify = maintain::verify_record(vault, m.volume(), m.snapshot_id())?;
        rows.push(json!({
            "volume": m.volume(), "id": m.snapshot_id(), "time": m.created_unix(), "marker": m.marker(),
            "marker_seq": m.marker_seq(), "parent": m.parent(), "full_read": m.full_read(),
            "size": m.volume_size(), "chunk_size": m.chunk_size(), "new_bytes": m.stats().new_stored_bytes,
            "copies": copies, "safe": complete >= repo.min_copies,
            "verified": verify.map(|v| v.ok), "group": m.group().map(|(name, _)| name),
        }));
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({ "vault": vault.name(), "snapshots": rows,
            "corrupt": bad.iter().map(ToString::to_string).collect::<Vec<_>>() }))?
        );
    } else {
        println!(
            "{:<10} {:<33} {:<19} {:>9} {:>10}  {:<6} COPIES",
            "VOLUME", "ID", "TIME (UTC)", "SIZE", "NEW", "SAFE"
        );
        for r in &rows {
            let copies: Vec<String> = r["copies"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| {
                    let mark = match (&c["complete"], &c["error"]) {
                        (serde_json::Value::Bool(true), _) => "✓",
                        (_, serde_json::Value::String(_)) => "?",
                        _ => "·",
                    };
                    format!("{}{mark}", c["vault"].as_str().unwrap_or(""))
                })
                .collect();
            println!(
                "{:<10} {:<33} {:<19} {:>9} {:>10}  {:<6} {}{}",
                r["volume"].as_str().unwrap_or(""),
                r["id"].as_str().unwrap_or(""),
                utc_display(r["time"].as_i64().unwrap_or(0)),
                format_size(r["size"].as_u64().unwrap_or(0)),
                format_size(r["new_bytes"].as_u64().unwrap_or(0)),
                if r["safe"] == json!(true) { "yes" } else { "no" },
                copies.join(" "),
                r["group"].as_str().map(|g| format!("  group {g}")).unwrap_or_default(),
            );
        }
        for e in &bad {
            println!("CORRUPT  {e}");
        }
    }
    Ok(())
}

fn show(repo: &Repo, vault: &dyn Vault, spec: &str, json: bool) -> Result<()> {
    let found = repo.find(vault, spec)?;
    let m = &found.manifest;
    let map = ChunkMap::new(&repo.key, &[vault], m);
    let mut holes = 0u64;
    let mut data = Vec::new();
    map.for_each(|_, entry| match entry {
        ChunkRef::Hole => holes += 1,
        ChunkRef::Data(id) => data.push(id),
    })?;
    data.sort_unstable();
    data.dedup();
    let distinct = data.len();
    let index_chunks = m.index_chunks().len();
    let stats = m.stats();
    let value = json!({
        "key": found.key, "volume": m.volume(), "id": m.snapshot_id(), "marker": m.marker(), "node": m.node(),
        "time": m.created_unix(), "marker_seq": m.marker_seq(), "parent": m.parent(), "full_read": m.full_read(),
        "size": m.volume_size(), "chunk_size": m.chunk_size(), "chunks": m.chunk_count(), "holes": holes,
        "distinct_chunks": distinct, "format_version": m.version(), "index_chunks": index_chunks,
        "chunks_read": stats.chunks_read, "new_chunks": stats.new_chunks,
        "new_stored_bytes": stats.new_stored_bytes, "new_plain_bytes": stats.new_plain_bytes,
        "copies": repo.copies(&found.key).into_iter().map(|(n, h)| json!({ "vault": n, "complete": h.ok() })).collect::<Vec<_>>(),
        "group": m.group().map(|(name, members)| json!({ "name": name, "members": members })),
    });
    if json {
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        println!("snapshot {} of volume {}", m.snapshot_id(), m.volume());
        println!(
            "  taken     {} UTC on {} (marker {:?} at seq {})",
            utc_display(m.created_unix()),
            m.node(),
            m.marker(),
            m.marker_seq()
        );
        println!("  parent    {}{}", m.parent().unwrap_or("none"), if m.full_read() { " (full read)" } else { "" });
        if let Some((group, members)) = m.group() {
            println!("  group     {group}: {} at the same instant, each under this id", members.join(", "));
        }
        println!(
            "  size      {} in {} chunks of {} ({holes} holes, {distinct} distinct)",
            format_size(m.volume_size()),
            m.chunk_count(),
            format_size(u64::from(m.chunk_size()))
        );
        if m.version() >= 3 {
            println!("  index     {index_chunks} index chunks of {} ids", map.fanout());
        }
        println!(
            "  read      {} chunks; stored {} new ({} before compression)",
            stats.chunks_read,
            format_size(stats.new_stored_bytes),
            format_size(stats.new_plain_bytes)
        );
        for (name, held) in repo.copies(&found.key) {
            let state = match held {
                Ok(true) => "complete".to_owned(),
                Ok(false) => "missing".to_owned(),
                Err(e) => format!("unknown ({e})"),
            };
            println!("  copy      {name}: {state}");
        }
    }
    Ok(())
}

/// The ids of range `piece`, or none past the end of a shorter snapshot.
fn piece_or_empty(map: &ChunkMap<'_>, piece: usize) -> Result<Piece> {
    if piece >= map.pieces() {
        return Ok(Vec::new().into());
    }
    Ok(map.piece(piece)?)
}

fn diff(repo: &Repo, vault: &dyn Vault, from: &str, to: &str, json: bool) -> Result<()> {
    let a = repo.find(vault, from)?;
    let b = repo.find(vault, to)?;
    let (ma, mb) = (&a.manifest, &b.manifest);
    if ma.volume() != mb.volume() || ma.chunk_size() != mb.chunk_size() {
        bail!("{} and {} are not snapshots of one volume at one chunk size", a.key, b.key);
    }
    let (map_a, map_b) = (ChunkMap::new(&repo.key, &[vault], ma), ChunkMap::new(&repo.key, &[vault], mb));
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    let chunk = u64::from(ma.chunk_size());
    let mut changed = |i: u64| {
        let offset = i * chunk;
        match ranges.last_mut() {
            Some((start, len)) if *start + *len == offset => *len += chunk,
            _ => ranges.push((offset, chunk)),
        }
    };
    if map_a.fanout() == map_b.fanout() {
        // Range by range: ranges start at the same chunk in both.
        for piece in 0..map_a.pieces().max(map_b.pieces()) {
            // The same index chunk over a range: nothing in it changed, nothing is read.
            let index_a = map_a.index_entry(piece);
            if index_a.is_some() && index_a == map_b.index_entry(piece) && ma.chunk_count() == mb.chunk_count() {
                continue;
            }
            let (ids_a, ids_b) = (piece_or_empty(&map_a, piece)?, piece_or_empty(&map_b, piece)?);
            let start = piece as u64 * map_a.fanout();
            for at in 0..ids_a.len().max(ids_b.len()) {
                if ids_a.get(at) != ids_b.get(at) {
                    changed(start + at as u64);
                }
            }
        }
    } else {
        let count = ma.chunk_count().max(mb.chunk_count()) as u64;
        let entry = |map: &ChunkMap<'_>, i: u64| -> Result<Option<ChunkRef>> {
            Ok(if i < map.manifest().chunk_count() as u64 { Some(map.entry(i)?) } else { None })
        };
        for i in 0..count {
            if entry(&map_a, i)? != entry(&map_b, i)? {
                changed(i);
            }
        }
    }
    let bytes: u64 = ranges.iter().map(|r| r.1).sum();
    if json {
        let list: Vec<_> = ranges.iter().map(|(o, l)| json!({ "offset": o, "length": l })).collect();
        println!(
            "{}",
            serde_json::to_string_pretty(
                &json!({ "from": a.key, "to": b.key, "changed_bytes": bytes, "ranges": list })
            )?
        );
    } else {
        for (offset, len) in &ranges {
            println!("{offset:>16} +{}", format_size(*len));
        }
        println!(
            "{} ranges, {} changed between {} and {}",
            ranges.len(),
            format_size(bytes),
            ma.snapshot_id(),
            mb.snapshot_id()
        );
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn restore_cmd(
    config: &NodeConfig,
    repo: &Repo,
    vault: &str,
    spec: &str,
    to_file: Option<PathBuf>,
    to_device: Option<PathBuf>,
    to_volume: Option<String>,
    threads: Option<usize>,
) -> Result<()> {
    let found = repo.find(&*repo.vault(vault)?, spec)?;
    let m = &found.manifest;
    let vaults = ordered_vaults(repo, vault)?;
    let refs: Vec<&dyn Vault> = vaults.iter().map(|v| &**v).collect();
    let threads = threads.unwrap_or_else(|| vaults[0].reads_in_flight()).max(1);
    let bar = ProgressBar::new("restore", "bytes");
    let started = Instant::now();
    let report = if let Some(path) = to_file {
        if path.exists() {
            bail!("{} exists; restore writes a new file (or use --to-device)", path.display());
        }
        let target =
            FileTarget::create_sparse(&path, m.volume_size()).with_context(|| format!("create {}", path.display()))?;
        restore::restore(&repo.key, &refs, m, &target, &RestoreOptions { threads, target_is_zeroed: true }, &|p| {
            bar.update(p)
        })?
    } else if let Some(path) = to_device {
        let target =
            FileTarget::open_existing(&path, m.volume_size()).with_context(|| format!("open {}", path.display()))?;
        restore::restore(&repo.key, &refs, m, &target, &RestoreOptions { threads, target_is_zeroed: false }, &|p| {
            bar.update(p)
        })?
    } else if let Some(name) = to_volume {
        let env: Arc<dyn keel_engine::Env> =
            Arc::new(keel_engine::PosixEnv::new(config.io_backend().map_err(anyhow::Error::msg)?));
        let dir = crate::daemon::create_volume(config, env.clone(), &name, m.volume_size())?;
        let (volume, _) = keel_engine::Volume::open(env, &dir, &config.open_options())?;
        let target = VolumeTarget(volume);
        let report = restore::restore(
            &repo.key,
            &refs,
            m,
            &target,
            &RestoreOptions { threads, target_is_zeroed: true },
            &|p| bar.update(p),
        )?;
        target.0.close()?;
        report
    } else {
        bail!("give --to-file, --to-device or --to-volume");
    };
    bar.finish();
    let secs = started.elapsed().as_secs_f64();
    println!(
        "restored {} ({}) in {secs:.1} s: {} chunks written, {} holes{}",
        found.key,
        format_size(m.volume_size()),
        report.chunks_written,
        report.holes,
        if report.fallbacks.is_empty() {
            String::new()
        } else {
            format!("; {} chunks came from other vaults (run verify)", report.fallbacks.len())
        }
    );
    for (id, error) in &report.fallbacks {
        eprintln!("chunk {id}: {error}");
    }
    Ok(())
}

/// A new volume as a restore target (writes are journaled; the final sync flushes them).
struct VolumeTarget(keel_engine::Volume);

impl Target for VolumeTarget {
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), String> {
        // The journal takes records up to its largest payload; split big chunks.
        for (i, piece) in data.chunks(1 << 20).enumerate() {
            self.0
                .write(offset + (i as u64) * (1 << 20), piece, keel_engine::PersistMode::Buffered)
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    fn zero(&self, offset: u64, len: u64) -> Result<(), String> {
        self.0.write_zeroes(offset, len, true, keel_engine::PersistMode::Buffered).map(drop).map_err(|e| e.to_string())
    }

    fn sync(&self) -> Result<(), String> {
        self.0.flush().map(drop).map_err(|e| e.to_string())
    }
}

fn export_cmd(repo: &Repo, vault: &str, spec: &str, output: &std::path::Path, format: &str) -> Result<()> {
    let format = match format {
        "raw" => ExportFormat::Raw,
        "raw.zst" | "zst" => ExportFormat::RawZst { level: 3 },
        other => bail!("unknown format {other:?}: raw or raw.zst"),
    };
    let found = repo.find(&*repo.vault(vault)?, spec)?;
    let vaults = ordered_vaults(repo, vault)?;
    let refs: Vec<&dyn Vault> = vaults.iter().map(|v| &**v).collect();
    let threads = vaults[0].reads_in_flight();
    let bar = ProgressBar::new("export", "bytes");
    let report = if output.as_os_str() == "-" {
        let stdout = std::io::stdout();
        let mut out = std::io::BufWriter::with_capacity(1 << 20, stdout);
        restore::export(&repo.key, &refs, &found.manifest, &mut out, format, threads, &|p| bar.update(p))?
    } else {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(output)
            .with_context(|| format!("create {} (it must not exist)", output.display()))?;
        let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
        let report = restore::export(&repo.key, &refs, &found.manifest, &mut out, format, threads, &|p| bar.update(p))?;
        let file = out.into_inner().map_err(|e| anyhow!("flush {}: {}", output.display(), e.error()))?;
        file.sync_all().with_context(|| format!("fsync {}", output.display()))?;
        report
    };
    bar.finish();
    eprintln!(
        "exported {} ({}, {} chunks, {} holes)",
        found.key,
        format_size(found.manifest.volume_size()),
        report.chunks_written,
        report.holes
    );
    Ok(())
}

fn import_cmd(config: &NodeConfig, image: &std::path::Path, name: &str) -> Result<()> {
    let source = crate::snapshot::open_image(image)?;
    let size = source.size();
    if size == 0 || size % 512 != 0 {
        bail!("{} holds {size} bytes; a volume image is a non-empty multiple of 512 bytes", image.display());
    }
    let env: Arc<dyn keel_engine::Env> =
        Arc::new(keel_engine::PosixEnv::new(config.io_backend().map_err(anyhow::Error::msg)?));
    let dir = crate::daemon::create_volume(config, env.clone(), name, size)?;
    let (volume, _) = keel_engine::Volume::open(env, &dir, &config.open_options())?;
    let bar = ProgressBar::new("import", "bytes");
    let mut buf = vec![0u8; 1 << 20];
    let mut offset = 0;
    while offset < size {
        let len = (size - offset).min(buf.len() as u64) as usize;
        source.read_at(offset, &mut buf[..len]).map_err(|e| anyhow!("read {}: {e}", image.display()))?;
        if !keel_snapshot::is_zero(&buf[..len]) {
            volume.write(offset, &buf[..len], keel_engine::PersistMode::Buffered)?;
        }
        offset += len as u64;
        bar.update(Progress { done: offset, total: size });
    }
    volume.flush()?;
    volume.close()?;
    bar.finish();
    println!("imported {} into new volume {name} ({})", image.display(), format_size(size));
    Ok(())
}

fn verify_cmd(repo: &Repo, vault: &str, volume: Option<&str>, subset: Option<&str>, json: bool) -> Result<()> {
    let subset = match subset {
        None => Subset::All,
        Some(text) => {
            let (n, of) = text.split_once('/').ok_or_else(|| anyhow!("--subset is N/M, e.g. 3/30"))?;
            let (n, of): (u32, u32) = (n.parse()?, of.parse()?);
            if of == 0 || n >= of {
                bail!("--subset N/M needs 0 <= N < M");
            }
            Subset::Slice { n, of }
        }
    };
    let target = repo.vault(vault)?;
    let others: Vec<Arc<dyn Vault>> = repo.all_vaults().into_iter().filter(|v| v.name() != vault).collect();
    let refs: Vec<&dyn Vault> = others.iter().map(|v| &**v).collect();
    let bar = ProgressBar::new("verify", "chunks");
    let report = maintain::verify(&repo.key, &*target, &refs, volume, subset, &|p| bar.update(p))?;
    bar.finish();
    if json {
        let findings: Vec<_> = report
            .findings
            .iter()
            .map(|f| json!({ "chunk": f.id.to_string(), "problem": f.problem, "healed_from": f.healed_from }))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({ "vault": vault, "snapshots": report.snapshots,
            "checked": report.checked, "ok": report.ok(), "findings": findings, "bad_manifests": report.bad_manifests,
            "forgotten": report.forgotten }))?
        );
    } else {
        println!("vault {vault}: {} snapshots, {} distinct chunks checked", report.snapshots, report.checked);
        for f in &report.findings {
            match &f.healed_from {
                Some(from) => println!("HEALED  chunk {}: {} (good copy from {from})", f.id, f.problem),
                None => println!("BAD     chunk {}: {} (no good copy anywhere)", f.id, f.problem),
            }
        }
        for m in &report.bad_manifests {
            println!("BAD     {m}");
        }
        for key in &report.forgotten {
            println!("GONE    {key}: forgotten while it was verified (its chunks may be gone too)");
        }
        println!("{}", if report.ok() { "ok" } else { "FAILED: data is damaged, see above" });
    }
    if !report.ok() {
        bail!("verify found damage it could not heal");
    }
    Ok(())
}

fn forget_cmd(
    repo: &Repo,
    vault: &str,
    snapshots: &[String],
    policy: Option<&str>,
    dry_run: bool,
    json: bool,
) -> Result<()> {
    let target = repo.vault(vault)?;
    if let Some(volume) = policy {
        if !snapshots.is_empty() {
            bail!("give snapshots or --policy VOLUME, not both");
        }
        let lines = repo.apply_retention(&*target, volume, dry_run)?;
        if json {
            let list: Vec<_> =
                lines.iter().map(|l| json!({ "key": l.key, "keep": l.keep, "decision": l.line })).collect();
            println!(
                "{}",
                serde_json::to_string_pretty(&json!({ "vault": vault, "dry_run": dry_run, "decisions": list }))?
            );
        } else {
            for l in &lines {
                println!("{}", l.line);
            }
            let removed = lines.iter().filter(|l| !l.keep).count();
            let verb = if dry_run { "would remove" } else { "removed" };
            println!(
                "vault {vault}: {verb} {removed} of {} snapshots of {volume}; `keel snapshot gc` frees their chunks",
                lines.len()
            );
        }
        return Ok(());
    }
    if snapshots.is_empty() {
        bail!("name the snapshots to forget, or give --policy VOLUME");
    }
    for spec in snapshots {
        let found = repo.find(&*target, spec)?;
        if dry_run {
            println!("would remove {}", found.key);
        } else {
            maintain::forget(&*target, &found.key)?;
            println!("removed {}", found.key);
        }
    }
    Ok(())
}

/// A progress line on stderr, redrawn at most every 200 ms; with rate and ETA.
pub struct ProgressBar {
    what: &'static str,
    unit: &'static str,
    started: Instant,
    last: std::sync::Mutex<Instant>,
    tty: bool,
}

impl ProgressBar {
    /// A bar for `what`, counting `unit` ("bytes" is shown as sizes).
    pub fn new(what: &'static str, unit: &'static str) -> Self {
        let now = Instant::now();
        ProgressBar {
            what,
            unit,
            started: now,
            last: std::sync::Mutex::new(now - Duration::from_secs(1)),
            tty: std::io::IsTerminal::is_terminal(&std::io::stderr()),
        }
    }

    /// Shows `p` if the last redraw is old enough (every 5 s when stderr is not a terminal).
    pub fn update(&self, p: Progress) {
        let every = if self.tty { Duration::from_millis(200) } else { Duration::from_secs(5) };
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.elapsed() < every {
            return;
        }
        *last = Instant::now();
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        let fmt = |n: u64| if self.unit == "bytes" { format_size(n) } else { format!("{n} {}", self.unit) };
        let line = if p.total > 0 {
            let pct = p.done as f64 * 100.0 / p.total as f64;
            let rate = p.done as f64 / secs;
            let eta = if rate > 0.0 { (p.total - p.done.min(p.total)) as f64 / rate } else { 0.0 };
            let width = 30;
            let filled = ((pct / 100.0) * width as f64) as usize;
            format!(
                "{} [{}{}] {pct:5.1}% {} of {} {}/s eta {eta:.0}s",
                self.what,
                "#".repeat(filled.min(width)),
                " ".repeat(width - filled.min(width)),
                fmt(p.done),
                fmt(p.total),
                fmt(rate as u64),
            )
        } else {
            format!("{} {} ({}/s)", self.what, fmt(p.done), fmt((p.done as f64 / secs) as u64))
        };
        let mut err = std::io::stderr().lock();
        let _ = if self.tty { write!(err, "\r{line}\x1b[K") } else { writeln!(err, "{line}") };
    }

    /// Ends the line.
    pub fn finish(&self) {
        if self.tty {
            eprintln!();
        }
    }
}
