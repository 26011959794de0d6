//! Snapshots on a node: the `[snapshots]` configuration, the node's repository and its
//! vaults, and the operations the daemon and `keel snapshot` run on them.
//!
//! ```text
//!  volume ──mark + freeze──▶ Frozen view ──changed chunks──▶ local repo (a LocalVault)
//!                                                               │ copy (missing chunks only)
//!                                                               ▼
//!                                                   vaults: dir │ keel (QUIC) │ s3
//! ```
//!
//! A snapshot is *safe* when at least `min_copies` vaults hold it complete (their manifest
//! present). Retention applies to the repo and to each vault; GC follows retention.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use keel_engine::{Frozen, Volume};
use keel_snapshot::create::{self, Changed, CreateOptions, CreateReport, Progress, Source};
use keel_snapshot::keyfile;
use keel_snapshot::maintain::{self, Listed};
use keel_snapshot::priority::CpuPriority;
use keel_snapshot::vault::{LocalVault, RemoteVault, RemoteVaultConfig, S3Config, S3Credentials, S3Vault, Vault};
use keel_snapshot::{RetentionPolicy, Schedule, SnapshotInfo, TenantKey, TimeZone};
use serde::{Deserialize, Serialize};

use crate::config::NodeConfig;
use crate::units::parse_size;

mod catchup;
mod group;
mod standby;
pub use catchup::{Backoff, Catchup, JobKey, Ledger, Outcome};
pub use group::{GroupConfig, GroupMember};
pub use standby::{GroupJob, GroupPlace, ScheduledJob, StandbyGroupJob, TakeOn, STANDBY_CLAIM_GRACE};

/// The default chunk size. 64 KiB matches the change map's regions, so an incremental
/// reads exactly the regions written; docs/snapshots.md has the measurement behind it.
pub const DEFAULT_CHUNK_SIZE: &str = "64K";
/// `[snapshots] busy_read_limit` when the section does not set it: at 16 MiB/s, 64 KiB at a
/// time, a snapshot kept the primary's write p99 within 1.1× of undisturbed on one shared
/// disk (docs/benchmarks.md).
pub const DEFAULT_BUSY_READ_LIMIT: u64 = 16 << 20;

/// `[snapshots]` in the node configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotsConfig {
    /// The node's own repository (a local vault). Default `DATA_DIR/repo`.
    #[serde(default)]
    pub repo: Option<PathBuf>,
    /// The tenant the volumes belong to: names its area in every vault.
    #[serde(default = "default_tenant")]
    pub tenant: String,
    /// The tenant key file (`keel snapshot key-init` makes one). Default `DATA_DIR/tenant.key`.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// A file holding the key file's passphrase (else `KEEL_KEY_PASSPHRASE`, if sealed).
    #[serde(default)]
    pub passphrase_file: Option<PathBuf>,
    /// Chunk size (power of two, 4K–16M). Default 64K.
    #[serde(default = "default_chunk_size")]
    pub chunk_size: String,
    /// zstd level for chunks.
    #[serde(default = "default_zstd_level")]
    pub zstd_level: i32,
    /// Sealing threads. Default: the machine's cores.
    #[serde(default)]
    pub threads: Option<usize>,
    /// Most bytes per second a snapshot reads from a volume (`16MiB`), 64 KiB per
    /// request; default: as fast as the disk allows. A limit leaves the disk and the CPU
    /// to the volume's writers while a snapshot runs, at the price of a longer snapshot.
    #[serde(default)]
    pub read_limit: Option<String>,
    /// Most bytes per second a snapshot reads from a volume that is being written (a
    /// write within the last second), 64 KiB per request, one at a time; `unlimited` to
    /// read such a volume as fast as a quiet one. Default: 16MiB. The volume's FLUSHes
    /// then never queue behind more than one small snapshot read, and a quiet volume is
    /// still read at full speed.
    #[serde(default)]
    pub busy_read_limit: Option<String>,
    /// CPU priority of a snapshot's sealing threads and of the copies to the vaults:
    /// `idle` (default: they run only when no normal thread wants the CPU, so the
    /// volume's writers never wait for them) or `normal`.
    #[serde(default)]
    pub cpu_priority: Option<String>,
    /// When to take snapshots of every volume: `07:00,15:00`, `every 15m`, … (none: only
    /// on request).
    #[serde(default)]
    pub schedule: Option<String>,
    /// Time zone for the schedule and retention buckets (`Europe/Berlin`, `UTC`, `+02:00`).
    #[serde(default)]
    pub timezone: Option<String>,
    /// Retention, applied to the repo and every vault after each snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<RetentionTable>,
    /// Vaults that must hold a snapshot before it counts as safe.
    #[serde(default = "default_min_copies")]
    pub min_copies: usize,
    /// Which node of a replicated pair takes scheduled snapshots: `standby` (default: the
    /// standby when it is up to date, else the primary) or `primary`.
    #[serde(default)]
    pub take_on: TakeOn,
    /// The vaults (`[[snapshots.vault]]`).
    #[serde(default, rename = "vault")]
    pub vaults: Vec<VaultConfig>,
    /// Consistency groups (`[[snapshots.group]]`): volumes always snapshotted together.
    #[serde(default, rename = "group", skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<GroupConfig>,
}

fn default_tenant() -> String {
    "default".into()
}
fn default_chunk_size() -> String {
    DEFAULT_CHUNK_SIZE.into()
}
fn default_zstd_level() -> i32 {
    3
}
fn default_min_copies() -> usize {
    2
}

/// `[snapshots.retention]`: the keep rules (docs/retention.md). Counts default to 0.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionTable {
    /// Keep the N newest.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub keep_last: u32,
    /// Keep the newest of each of the last N hours.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub keep_hourly: u32,
    /// … days.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub keep_daily: u32,
    /// … ISO weeks.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub keep_weekly: u32,
    /// … months.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub keep_monthly: u32,
    /// … years.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub keep_yearly: u32,
    /// Keep everything newer than this (`92d`, `12h`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_within: Option<String>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl RetentionTable {
    /// The policy, validated (a policy that keeps nothing is refused).
    pub fn policy(&self) -> Result<RetentionPolicy> {
        let mut parts = Vec::new();
        for (name, n) in [
            ("keep-last", self.keep_last),
            ("keep-hourly", self.keep_hourly),
            ("keep-daily", self.keep_daily),
            ("keep-weekly", self.keep_weekly),
            ("keep-monthly", self.keep_monthly),
            ("keep-yearly", self.keep_yearly),
        ] {
            if n > 0 {
                parts.push(format!("{name}={n}"));
            }
        }
        if let Some(within) = &self.keep_within {
            parts.push(format!("keep-within={within}"));
        }
        parts.join(",").parse::<RetentionPolicy>().map_err(|e| anyhow!("[snapshots.retention]: {e}"))
    }
}

/// One `[[snapshots.vault]]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum VaultConfig {
    /// A directory (a mount of another data center's storage).
    Dir {
        /// Name in messages and listings.
        name: String,
        /// The directory.
        path: PathBuf,
    },
    /// A `keel vault` server over QUIC with mutual TLS (the node's replication identity,
    /// or the `ca_cert`/`cert`/`key` given here).
    Keel {
        /// Name in messages and listings.
        name: String,
        /// The server's UDP address.
        address: std::net::SocketAddr,
        /// The server's node name (its certificate's DNS name).
        server: String,
        /// Cluster CA certificate (default: the replication section's).
        #[serde(default)]
        ca_cert: Option<PathBuf>,
        /// This node's certificate.
        #[serde(default)]
        cert: Option<PathBuf>,
        /// This node's key.
        #[serde(default)]
        key: Option<PathBuf>,
    },
    /// S3-compatible object storage (Garage, MinIO, Ceph RGW, AWS).
    S3 {
        /// Name in messages and listings.
        name: String,
        /// `http(s)://host:port`.
        endpoint: String,
        /// Region (`garage` for Garage).
        region: String,
        /// Bucket.
        bucket: String,
        /// Key prefix inside the bucket.
        #[serde(default)]
        prefix: Option<String>,
        /// Access key id (else `AWS_ACCESS_KEY_ID`).
        #[serde(default)]
        access_key_id: Option<String>,
        /// Secret key (else `AWS_SECRET_ACCESS_KEY`).
        #[serde(default)]
        secret_access_key: Option<String>,
    },
}

impl VaultConfig {
    /// The vault's name.
    pub fn name(&self) -> &str {
        match self {
            VaultConfig::Dir { name, .. } | VaultConfig::Keel { name, .. } | VaultConfig::S3 { name, .. } => name,
        }
    }
}

/// The node's snapshot machinery, opened from its configuration.
pub struct Repo {
    /// The node's name.
    pub node: String,
    /// The tenant.
    pub tenant: String,
    /// The tenant key.
    pub key: TenantKey,
    /// The node's own repository.
    pub local: Arc<LocalVault>,
    /// The vaults, in configuration order.
    pub vaults: Vec<Arc<dyn Vault>>,
    /// Chunk size in bytes.
    pub chunk_size: u32,
    /// zstd level.
    pub zstd_level: i32,
    /// Sealing threads.
    pub threads: usize,
    /// Bytes per second a snapshot may read (none: unlimited).
    pub read_limit: Option<u64>,
    /// Bytes per second a snapshot may read from a volume being written (none: unlimited).
    pub busy_read_limit: Option<u64>,
    /// CPU priority of a snapshot's sealing threads and of the copies to the vaults.
    pub cpu_priority: CpuPriority,
    /// Set when the node shuts down: a snapshot being taken stops (publishing nothing)
    /// instead of holding the shutdown until it ends.
    pub stop: Arc<std::sync::atomic::AtomicBool>,
    /// Vaults needed for a snapshot to be safe.
    pub min_copies: usize,
    /// Retention.
    pub retention: Option<RetentionPolicy>,
    /// Schedule.
    pub schedule: Option<Schedule>,
    /// Time zone.
    pub timezone: TimeZone,
    /// Which node of a replicated pair takes scheduled snapshots.
    pub take_on: TakeOn,
    /// Consistency groups, validated ([`group::validate`]).
    pub groups: Vec<GroupConfig>,
}

impl std::fmt::Debug for Repo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Repo").field("tenant", &self.tenant).field("local", &self.local.name()).finish()
    }
}

/// The `[snapshots]` section, or the defaults when it is absent.
pub fn section(config: &NodeConfig) -> SnapshotsConfig {
    config.snapshots.clone().unwrap_or_else(|| SnapshotsConfig {
        repo: None,
        tenant: default_tenant(),
        key_file: None,
        passphrase_file: None,
        chunk_size: default_chunk_size(),
        zstd_level: default_zstd_level(),
        threads: None,
        read_limit: None,
        busy_read_limit: None,
        cpu_priority: None,
        schedule: None,
        timezone: None,
        retention: None,
        min_copies: default_min_copies(),
        take_on: TakeOn::default(),
        vaults: Vec::new(),
        groups: Vec::new(),
    })
}

/// Where the tenant key file is.
pub fn key_path(config: &NodeConfig) -> PathBuf {
    section(config).key_file.unwrap_or_else(|| config.data_dir.join("tenant.key"))
}

fn passphrase(section: &SnapshotsConfig) -> Result<Option<Vec<u8>>> {
    if let Some(path) = &section.passphrase_file {
        let text = std::fs::read(path).with_context(|| format!("failed to read {}", path.display()))?;
        let trimmed = text.strip_suffix(b"\n").unwrap_or(&text).to_vec();
        return Ok(Some(trimmed));
    }
    Ok(std::env::var_os("KEEL_KEY_PASSPHRASE").map(|p| p.into_encoded_bytes()))
}

/// Creates the tenant key file (refusing to overwrite one).
pub fn init_key(config: &NodeConfig, sealed: bool) -> Result<PathBuf> {
    let section = section(config);
    let path = key_path(config);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("failed to create {}", parent.display()))?;
    }
    let pass = if sealed {
        Some(
            passphrase(&section)?
                .ok_or_else(|| anyhow!("set KEEL_KEY_PASSPHRASE or passphrase_file to seal the key"))?,
        )
    } else {
        None
    };
    keyfile::create_key_file(&path, pass.as_deref())?;
    Ok(path)
}

/// A `[snapshots]` rate (`16MiB` per second): more than 0.
fn rate(key: &str, text: &str) -> Result<u64> {
    match parse_size(text)? {
        0 => bail!("[snapshots] {key} {text:?}: must be more than 0 bytes per second"),
        rate => Ok(rate),
    }
}

/// `[snapshots] busy_read_limit`: [`DEFAULT_BUSY_READ_LIMIT`] when absent, none when
/// `unlimited`.
fn busy_read_limit(text: Option<&str>) -> Result<Option<u64>> {
    match text.map(str::trim) {
        None => Ok(Some(DEFAULT_BUSY_READ_LIMIT)),
        Some("unlimited") => Ok(None),
        Some(text) => match parse_size(text)? {
            0 => bail!("[snapshots] busy_read_limit {text:?}: must be more than 0 bytes per second, or \"unlimited\""),
            rate => Ok(Some(rate)),
        },
    }
}

impl Repo {
    /// Opens the repository, the key and the vaults. Vaults are opened lazily by their
    /// backends (a vault that is down fails its operations, not this).
    pub fn open(config: &NodeConfig) -> Result<Repo> {
        let section = section(config);
        let key_file = key_path(config);
        let pass = passphrase(&section)?;
        let key = keyfile::load_key_file(&key_file, pass.as_deref())
            .with_context(|| "no usable tenant key; `keel snapshot key-init` creates one".to_string())?;
        let chunk_size = u32::try_from(parse_size(&section.chunk_size)?)
            .map_err(|_| anyhow!("chunk_size {} is too large", section.chunk_size))?;
        create::check_chunk_size(chunk_size).map_err(|e| anyhow!("[snapshots] {e}"))?;
        let repo_dir = section.repo.clone().unwrap_or_else(|| config.data_dir.join("repo"));
        let local = Arc::new(LocalVault::open_deferred("local", &repo_dir, &section.tenant)?);
        let mut vaults: Vec<Arc<dyn Vault>> = Vec::new();
        for v in &section.vaults {
            if v.name() == "local" || vaults.iter().any(|o| o.name() == v.name()) {
                bail!("[[snapshots.vault]] name {:?} is used twice (or is \"local\", the node's own repo)", v.name());
            }
            vaults.push(open_vault(config, &section.tenant, v)?);
        }
        let schedule = section
            .schedule
            .as_deref()
            .map(|s| s.parse::<Schedule>().map_err(|e| anyhow!("[snapshots] schedule: {e}")))
            .transpose()?;
        let timezone = match section.timezone.as_deref() {
            Some(tz) => tz.parse::<TimeZone>().map_err(|e| anyhow!("[snapshots] timezone: {e}"))?,
            None => TimeZone::utc(),
        };
        Ok(Repo {
            node: config.node_name.clone(),
            tenant: section.tenant.clone(),
            key,
            local,
            vaults,
            chunk_size,
            zstd_level: section.zstd_level,
            threads: section.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get())),
            read_limit: section.read_limit.as_deref().map(|text| rate("read_limit", text)).transpose()?,
            busy_read_limit: busy_read_limit(section.busy_read_limit.as_deref())?,
            cpu_priority: match section.cpu_priority.as_deref() {
                None => CpuPriority::default(),
                Some(text) => text.parse().map_err(|e| anyhow!("[snapshots] cpu_priority {e}"))?,
            },
            stop: Arc::default(),
            min_copies: section.min_copies,
            retention: section.retention.as_ref().map(RetentionTable::policy).transpose()?,
            schedule,
            timezone,
            take_on: section.take_on,
            groups: group::validate(&section.groups)?,
        })
    }

    /// The repo, then every vault: where restores look for chunks, in order.
    pub fn all_vaults(&self) -> Vec<Arc<dyn Vault>> {
        let mut all: Vec<Arc<dyn Vault>> = vec![self.local.clone()];
        all.extend(self.vaults.iter().cloned());
        all
    }

    /// The vault named `name` ("local" is the repo).
    pub fn vault(&self, name: &str) -> Result<Arc<dyn Vault>> {
        self.all_vaults()
            .into_iter()
            .find(|v| v.name() == name)
            .ok_or_else(|| anyhow!("no vault named {name:?} (configured: {})", self.vault_names().join(", ")))
    }

    fn vault_names(&self) -> Vec<String> {
        self.all_vaults().iter().map(|v| v.name().to_owned()).collect()
    }

    /// The newest snapshot of `volume` in the repo that may be the parent of an
    /// incremental: authenticated, and not recorded as failed by verify.
    pub fn parent_for(&self, volume: &str) -> Result<Option<Listed>> {
        let (listed, _) = maintain::list_snapshots(&*self.local, Some(volume), Some(&self.key))?;
        for l in listed.into_iter().rev() {
            let record = maintain::verify_record(&*self.local, volume, l.manifest.snapshot_id())?;
            if record.is_some_and(|r| !r.ok) {
                tracing::warn!(volume, snapshot = l.manifest.snapshot_id(), "not a parent: it failed verify");
                continue;
            }
            return Ok(Some(l));
        }
        Ok(None)
    }

    /// Takes a snapshot of `volume` (marker named `marker`), incremental from the newest
    /// good snapshot in the repo when the change map can say what changed.
    pub fn take(&self, volume: &Volume, marker: &str, progress: &(dyn Fn(Progress) + Sync)) -> Result<CreateReport> {
        let frozen = volume.snapshot(marker)?;
        self.take_frozen(volume.name(), &frozen, progress)
    }

    /// Reads a frozen view into the repo.
    pub fn take_frozen(
        &self,
        volume: &str,
        frozen: &Frozen,
        progress: &(dyn Fn(Progress) + Sync),
    ) -> Result<CreateReport> {
        self.take_frozen_as(volume, frozen, None, progress)
    }

    /// [`Repo::take_frozen`], as a member of a consistency group's snapshot when `member`.
    pub fn take_frozen_as(
        &self,
        volume: &str,
        frozen: &Frozen,
        member: Option<&GroupMember>,
        progress: &(dyn Fn(Progress) + Sync),
    ) -> Result<CreateReport> {
        let parent = self.parent_for(volume)?;
        let changed = match &parent {
            None => Changed::All("there is no earlier snapshot of this volume in the repo".into()),
            Some(p) if u64::from(p.manifest.chunk_size()) != u64::from(self.chunk_size) => {
                Changed::All(format!("the chunk size changed from {} to {}", p.manifest.chunk_size(), self.chunk_size))
            }
            Some(p) if p.manifest.marker_seq() >= frozen.seq() => Changed::All(format!(
                "the parent's marker (seq {}) is not older than this one (seq {}): the journal was rewound",
                p.manifest.marker_seq(),
                frozen.seq()
            )),
            Some(p) => match frozen.changed_since(p.manifest.marker_seq()) {
                Ok(set) => Changed::Chunks(regions_to_chunks(&set.regions, set.region_bytes, self.chunk_size)),
                Err(e) => Changed::All(format!("the change map cannot answer: {e}")),
            },
        };
        let options = CreateOptions {
            volume: volume.to_owned(),
            marker: frozen.name().to_owned(),
            marker_seq: frozen.seq(),
            node: self.node.clone(),
            chunk_size: self.chunk_size,
            zstd_level: self.zstd_level,
            threads: self.threads,
            snapshot_id: member.map(|m| m.snapshot_id.clone()),
            created_unix: member.map(|m| m.created_unix),
            group: member.map(|m| m.group.clone()),
            read_limit: self.read_limit,
            busy_read_limit: self.busy_read_limit,
            cpu_priority: self.cpu_priority,
            stop: Some(Arc::clone(&self.stop)),
        };
        let source = FrozenSource(frozen);
        let report = create::create_snapshot(
            &self.key,
            &*self.local,
            &source,
            &options,
            parent.as_ref().map(|p| &p.manifest),
            changed,
            progress,
        )?;
        Ok(report)
    }

    /// Which vaults hold snapshot `manifest_key` complete (its manifest is there).
    /// Vaults that cannot be asked are reported with their error.
    pub fn copies(&self, manifest_key: &str) -> Vec<(String, Result<bool, String>)> {
        self.vaults
            .iter()
            .map(|v| {
                let held = match v.get_object(manifest_key) {
                    Ok(_) => Ok(true),
                    Err(e) if e.is_not_found() => Ok(false),
                    Err(e) => Err(e.to_string()),
                };
                (v.name().to_owned(), held)
            })
            .collect()
    }

    /// Copies every repo snapshot (of `volume`, or all) to every vault lacking it. A vault
    /// that is down is skipped (reported) and caught up on the next call.
    pub fn replicate(&self, volume: Option<&str>) -> Result<Vec<CopyOutcome>> {
        let keys = maintain::manifest_keys(&*self.local, volume)?;
        let mut outcomes = Vec::new();
        for vault in &self.vaults {
            let present: std::collections::HashSet<String> = match maintain::manifest_keys(&**vault, volume) {
                Ok(entries) => entries.into_iter().map(|e| e.key).collect(),
                Err(e) => {
                    outcomes.push(CopyOutcome {
                        vault: vault.name().to_owned(),
                        key: String::new(),
                        result: Err(e.to_string()),
                    });
                    continue;
                }
            };
            for entry in &keys {
                if present.contains(&entry.key) {
                    continue;
                }
                let result =
                    maintain::copy_snapshot(&self.key, &*self.local, &**vault, &entry.key, &self.holder(), &|_| {})
                        .map_err(|e| e.to_string());
                let stop = result.is_err();
                outcomes.push(CopyOutcome { vault: vault.name().to_owned(), key: entry.key.clone(), result });
                if stop {
                    break; // this vault is failing: try it again next time
                }
            }
        }
        Ok(outcomes)
    }

    /// Who this process is, for leases.
    pub fn holder(&self) -> String {
        format!("{}-{}", self.node, std::process::id())
    }

    /// Applies the retention policy to `volume` in `vault`: returns the decisions (and
    /// removes the snapshots it does not keep unless `dry_run`). Snapshots that are not
    /// yet safe (fewer than `min_copies` vault copies) are protected in the repo.
    ///
    /// A volume in a consistency group is decided with its whole group: the policy runs
    /// over the group's snapshots (one per snapshot id, whichever members have it), and a
    /// decision applies to every member's manifest of that id, so a group snapshot is
    /// kept or removed whole. It is protected while any member is not yet safe.
    pub fn apply_retention(&self, vault: &dyn Vault, volume: &str, dry_run: bool) -> Result<Vec<RetentionLine>> {
        let Some(policy) = &self.retention else {
            bail!("no [snapshots.retention] policy is configured");
        };
        let is_repo = vault.name() == self.local.name();
        // Snapshot id → (time, protected, manifest keys), for every volume of the scope.
        let mut units: std::collections::BTreeMap<String, (i64, bool, Vec<String>)> = Default::default();
        for member in self.retention_scope(volume) {
            let (listed, bad) = maintain::list_snapshots(vault, Some(&member), Some(&self.key))?;
            if let Some(e) = bad.first() {
                bail!("refusing to apply retention while a manifest is unreadable ({e}); run `keel snapshot verify`");
            }
            for l in &listed {
                let unsafe_yet = is_repo
                    && self.copies(&l.key).iter().filter(|(_, held)| matches!(held, Ok(true))).count()
                        < self.min_copies.min(self.vaults.len());
                let unit = units.entry(l.manifest.snapshot_id().to_owned()).or_insert((
                    l.manifest.created_unix(),
                    false,
                    Vec::new(),
                ));
                unit.1 |= unsafe_yet;
                unit.2.push(l.key.clone());
            }
        }
        let infos: Vec<SnapshotInfo<'_>> = units
            .iter()
            .map(|(id, (time, protected, _))| SnapshotInfo { id, time: *time, protected: *protected, complete: true })
            .collect();
        let decisions = policy.apply(&infos, keel_snapshot::lease::now_unix(), &self.timezone);
        let mut lines = Vec::new();
        for d in decisions {
            for key in units.get(d.id).map(|u| u.2.as_slice()).unwrap_or_default() {
                if !d.keep && !dry_run {
                    maintain::forget(vault, key)?;
                }
                lines.push(RetentionLine {
                    vault: vault.name().to_owned(),
                    line: d.to_string(),
                    keep: d.keep,
                    key: key.clone(),
                });
            }
        }
        Ok(lines)
    }

    /// The volumes whose snapshots retention decides together with `volume`'s: its
    /// consistency group's members, or itself.
    pub fn retention_scope(&self, volume: &str) -> Vec<String> {
        match self.group_of(volume) {
            Some(group) => group.volumes.clone(),
            None => vec![volume.to_owned()],
        }
    }

    /// Retention on the repo and every reachable vault, then GC where something was removed.
    pub fn maintain(&self, volume: &str) -> Vec<String> {
        let mut messages = Vec::new();
        if self.retention.is_none() {
            return messages;
        }
        for vault in self.all_vaults() {
            match self.apply_retention(&*vault, volume, false) {
                Ok(lines) => {
                    let removed = lines.iter().filter(|l| !l.keep).count();
                    if removed > 0 {
                        messages.push(format!(
                            "vault {}: retention removed {removed} snapshot(s) of {volume}",
                            vault.name()
                        ));
                        let options = maintain::GcOptions { holder: self.holder(), dry_run: false, max_deletes: None };
                        match maintain::gc(&*vault, &self.key, &options, &|_| {}) {
                            Ok(r) => messages.push(format!(
                                "vault {}: gc deleted {} chunk(s), {} bytes",
                                vault.name(),
                                r.deleted,
                                r.bytes_freed
                            )),
                            Err(e) => messages.push(format!("vault {}: gc: {e}", vault.name())),
                        }
                    }
                }
                Err(e) => messages.push(format!("vault {}: retention: {e:#}", vault.name())),
            }
        }
        messages
    }

    /// Finds a snapshot by `VOLUME/ID`, an id, or a unique prefix of an id, in `vault`.
    pub fn find(&self, vault: &dyn Vault, spec: &str) -> Result<Listed> {
        let (volume, id) = match spec.split_once('/') {
            Some((v, i)) => (Some(v), i),
            None => (None, spec),
        };
        let matches: Vec<_> = maintain::manifest_keys(vault, volume)?
            .into_iter()
            .filter(|e| maintain::snapshot_id_of(&e.key).starts_with(id))
            .collect();
        match matches.as_slice() {
            [one] => Ok(Listed {
                key: one.key.clone(),
                manifest: maintain::read_manifest(vault, &one.key, Some(&self.key))?,
            }),
            [] => bail!("no snapshot {spec:?} in vault {}", vault.name()),
            many => bail!(
                "{spec:?} matches {} snapshots in vault {} ({}…); give more of the id or VOLUME/ID",
                many.len(),
                vault.name(),
                many.iter().take(3).map(|e| e.key.as_str()).collect::<Vec<_>>().join(", ")
            ),
        }
    }
}

/// The daemon's snapshot runner: one snapshot at a time per node (they share the repo's
/// sealing threads), each followed by copies to the vaults and retention. Every step is an
/// event (`snapshot`, `snapshot_copy`, `snapshot_retention`).
pub struct Runner {
    /// The repository.
    pub repo: Arc<Repo>,
    /// The node's events.
    pub events: Arc<keel_net::events::EventLog>,
    busy: std::sync::Mutex<()>,
}

impl Runner {
    /// A runner over `repo`.
    pub fn new(repo: Arc<Repo>, events: Arc<keel_net::events::EventLog>) -> Self {
        Runner { repo, events, busy: std::sync::Mutex::new(()) }
    }

    /// Takes a snapshot of `volume` now (blocking), then copies it and applies retention.
    /// Returns a summary for the operator.
    pub fn snapshot_now(&self, volume: &Volume, marker: &str) -> Result<serde_json::Value> {
        let _one_at_a_time = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        let started = std::time::Instant::now();
        let taken = self.repo.take(volume, marker, &|_| {});
        self.after_take(volume.name(), taken, started)
    }

    /// Reports a snapshot taken since `started` (or its failure) as an event, then copies
    /// it to the vaults and applies retention. Returns the summary for the operator.
    fn after_take(
        &self,
        name: &str,
        taken: Result<CreateReport>,
        started: std::time::Instant,
    ) -> Result<serde_json::Value> {
        let report = self.taken_or_reported(name, taken)?;
        let mut summary = self.report_taken(name, &report, started.elapsed(), None);
        let (copies, retention) = self.copy_and_retain(&[name]);
        summary["copies"] = serde_json::json!(copies);
        summary["retention"] = serde_json::json!(retention);
        Ok(summary)
    }

    /// The report, or the failure reported as a `snapshot` event of `name`.
    fn taken_or_reported(&self, name: &str, taken: Result<CreateReport>) -> Result<CreateReport> {
        taken.inspect_err(|e| {
            self.events.emit(Some(name), "snapshot", serde_json::json!({ "ok": false, "error": format!("{e:#}") }));
        })
    }

    /// The `snapshot` event of a snapshot of `name` (taken in `took`, as a member of
    /// `group`), emitted and returned as the operator's summary.
    fn report_taken(
        &self,
        name: &str,
        report: &CreateReport,
        took: std::time::Duration,
        group: Option<&str>,
    ) -> serde_json::Value {
        let mut summary = serde_json::json!({
            "ok": true,
            "snapshot": report.snapshot_id,
            "full_read": report.full_read,
            "chunks": report.chunks_total,
            "chunks_read": report.stats.chunks_read,
            "bytes_read": report.bytes_read,
            "new_chunks": report.stats.new_chunks,
            "new_bytes": report.stats.new_stored_bytes,
            "seconds": took.as_secs_f64(),
        });
        if let Some(group) = group {
            summary["group"] = serde_json::json!(group);
        }
        self.events.emit(Some(name), "snapshot", summary.clone());
        summary
    }

    /// Copies the new snapshots of `volumes` to the vaults, then applies retention once
    /// per retention scope (a consistency group is decided whole). Every line is also an
    /// event. Returns (copy lines, retention lines).
    fn copy_and_retain(&self, volumes: &[&str]) -> (Vec<String>, Vec<String>) {
        let copies: Vec<String> = volumes.iter().flat_map(|v| self.copy_pending(Some(v))).collect();
        let mut retention = Vec::new();
        let mut decided: Vec<String> = Vec::new();
        for volume in volumes {
            if decided.iter().any(|d| d == volume) {
                continue;
            }
            decided.extend(self.repo.retention_scope(volume));
            let lines = self.repo.maintain(volume);
            for line in &lines {
                self.events.emit(Some(volume), "snapshot_retention", serde_json::json!({ "message": line }));
            }
            retention.extend(lines);
        }
        (copies, retention)
    }

    /// Copies snapshots the vaults lack (a vault that was down catches up here), at the
    /// configured CPU priority.
    pub fn copy_pending(&self, volume: Option<&str>) -> Vec<String> {
        let mut lines = Vec::new();
        match keel_snapshot::priority::run_at(self.repo.cpu_priority, || self.repo.replicate(volume)) {
            Ok(outcomes) => {
                for o in outcomes {
                    let (ok, text) = match &o.result {
                        Ok(r) => (true, format!("{} → {}: {} of {} chunks sent", o.key, o.vault, r.sent, r.chunks)),
                        Err(e) => (false, format!("{} → {}: delayed: {e}", o.key, o.vault)),
                    };
                    self.events.emit(
                        Some(maintain::volume_of(&o.key)).filter(|v| !v.is_empty()),
                        "snapshot_copy",
                        serde_json::json!({ "vault": o.vault, "key": o.key, "ok": ok, "message": text }),
                    );
                    lines.push(text);
                }
            }
            Err(e) => lines.push(format!("listing the repo failed: {e:#}")),
        }
        lines
    }

    /// Runs the schedule until `shutdown`: at each firing, and at every tick (a minute
    /// at most) while a firing is owed, runs the jobs `volumes()` gives (what this node
    /// does for each volume now: [`ScheduledJob`]) that the ledger at `ledger_path` says
    /// still owe the latest firing (`catchup`: after downtime, a failover, or a failure);
    /// every minute, retries copies.
    pub async fn run_schedule(
        self: Arc<Self>,
        volumes: Arc<dyn Fn() -> Vec<ScheduledJob> + Send + Sync>,
        ledger_path: PathBuf,
        shutdown: keel_net::CancellationToken,
    ) {
        let Some(schedule) = self.repo.schedule.clone() else { return };
        let tz = self.repo.timezone.clone();
        let now = keel_snapshot::lease::now_unix();
        let latest = schedule.last_at_or_before(now, &tz).unwrap_or(now);
        // The ledger's file I/O and fsyncs run on blocking threads, as the firings do.
        let Ok(ledger) = tokio::task::spawn_blocking(move || catchup::Ledger::open(&ledger_path, latest)).await else {
            tracing::error!("opening the schedule ledger failed; scheduled snapshots are off");
            return;
        };
        let state = Arc::new(std::sync::Mutex::new(catchup::Catchup { ledger, backoff: catchup::Backoff::default() }));
        let mut next_copy = now + 60;
        // The latest firing every job had settled at the last look: nothing to ask
        // `volumes()` until the next firing.
        let mut all_settled = None;
        loop {
            let now = keel_snapshot::lease::now_unix();
            if let Some(latest) = schedule.last_at_or_before(now, &tz).filter(|&l| all_settled != Some(l)) {
                // Named after the firing, not the wake-up: both nodes of a pair name it
                // alike, which is how the primary knows its standby took it.
                let (runner, shutdown, volumes, state) =
                    (Arc::clone(&self), shutdown.clone(), Arc::clone(&volumes), Arc::clone(&state));
                let tick = tokio::task::spawn_blocking(move || {
                    let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
                    let (due, owing) = state.due(volumes(), ScheduledJob::key, latest, now);
                    if !due.is_empty() {
                        let outcomes = runner.run_firing(due, latest, &shutdown);
                        state.record(outcomes, latest, keel_snapshot::lease::now_unix());
                    }
                    state.owes_any(&owing, latest)
                })
                .await;
                match tick {
                    Ok(false) => all_settled = Some(latest),
                    Ok(true) => {}
                    // Still owed: the next tick tries again (after its backoff).
                    Err(e) => tracing::error!("a scheduled firing failed: {e}"),
                }
            }
            if now >= next_copy {
                next_copy = now + 60;
                let runner = Arc::clone(&self);
                let _ = tokio::task::spawn_blocking(move || runner.copy_pending(None)).await;
            }
            let now = keel_snapshot::lease::now_unix();
            let next = schedule.next_after(now, &tz);
            // A tick at least every minute: an owed firing is looked at again (a standby
            // promoted, a backoff over) without waiting for the next one.
            let wait = (next.min(next_copy) - now).clamp(0, 60) as u64;
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(std::time::Duration::from_secs(wait)) => {}
            }
        }
    }
}

/// One line of a retention run.
#[derive(Debug, Clone)]
pub struct RetentionLine {
    /// The vault.
    pub vault: String,
    /// The manifest key.
    pub key: String,
    /// Kept?
    pub keep: bool,
    /// The decision, for people.
    pub line: String,
}

/// The outcome of copying one snapshot to one vault.
#[derive(Debug)]
pub struct CopyOutcome {
    /// The vault.
    pub vault: String,
    /// The manifest key (empty when the vault could not even be listed).
    pub key: String,
    /// What happened.
    pub result: Result<maintain::CopyReport, String>,
}

fn open_vault(config: &NodeConfig, tenant: &str, v: &VaultConfig) -> Result<Arc<dyn Vault>> {
    Ok(match v {
        VaultConfig::Dir { name, path } => Arc::new(LocalVault::open_deferred(name.clone(), path, tenant)?),
        VaultConfig::S3 { name, endpoint, region, bucket, prefix, access_key_id, secret_access_key } => {
            let credentials = match (access_key_id, secret_access_key) {
                (Some(id), Some(secret)) => {
                    S3Credentials::Static { access_key_id: id.clone(), secret_access_key: secret.clone() }
                }
                (None, None) => S3Credentials::Environment,
                _ => bail!("vault {name}: give both access_key_id and secret_access_key, or neither"),
            };
            let mut s3 = S3Config::new(endpoint.clone(), region.clone(), bucket.clone(), credentials);
            s3.prefix = prefix.clone();
            Arc::new(S3Vault::open(name.clone(), s3, tenant)?)
        }
        VaultConfig::Keel { name, address, server, ca_cert, cert, key } => {
            let replication = config.replication.as_ref();
            let pick = |given: &Option<PathBuf>, from: Option<&PathBuf>, what: &str| -> Result<PathBuf> {
                given
                    .clone()
                    .or_else(|| from.cloned())
                    .ok_or_else(|| anyhow!("vault {name}: no {what} (set it, or configure [replication])"))
            };
            let files = keel_net::quic::TlsFiles {
                ca_cert: pick(ca_cert, replication.map(|r| &r.ca_cert), "ca_cert")?,
                cert: pick(cert, replication.map(|r| &r.cert), "cert")?,
                key: pick(key, replication.map(|r| &r.key), "key")?,
            };
            let identity = keel_net::quic::Identity::load(&files)?;
            let remote = RemoteVaultConfig::new(name.clone(), *address, server.clone(), tenant.to_owned(), identity);
            Arc::new(RemoteVault::open(remote)?)
        }
    })
}

/// Maps changed regions to the chunks that cover them.
pub fn regions_to_chunks(regions: &[u64], region_bytes: u64, chunk_size: u32) -> Vec<u64> {
    let chunk = u64::from(chunk_size);
    let mut out: Vec<u64> = Vec::new();
    for &r in regions {
        let start = r * region_bytes / chunk;
        let end = ((r + 1) * region_bytes).div_ceil(chunk);
        for c in start..end {
            if out.last() != Some(&c) {
                out.push(c);
            }
        }
    }
    out.dedup();
    out
}

/// A frozen volume view as a snapshot source: releases what it has read.
struct FrozenSource<'a>(&'a Frozen);

impl Source for FrozenSource<'_> {
    fn size(&self) -> u64 {
        self.0.size()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        self.0.read(offset, buf).map_err(|e| e.to_string())
    }

    fn release(&self, offset: u64, len: u64) {
        self.0.release(offset, len);
    }

    fn writes(&self) -> Option<u64> {
        Some(self.0.writes())
    }
}

/// Reads the whole image at `path` (raw, or zstd-compressed raw detected by its magic).
pub fn open_image(path: &Path) -> Result<Box<dyn Source>> {
    let mut magic = [0u8; 4];
    {
        use std::io::Read;
        let mut f = std::fs::File::open(path).with_context(|| format!("failed to open {}", path.display()))?;
        let _ = f.read(&mut magic);
    }
    if magic == [0x28, 0xb5, 0x2f, 0xfd] {
        Ok(Box::new(ZstdSource::open(path)?))
    } else {
        Ok(Box::new(create::FileSource::open(path).with_context(|| format!("failed to open {}", path.display()))?))
    }
}

/// A zstd-compressed raw image read front to back (the snapshot reader reads in order).
/// The size comes from the frame header when the exporter recorded it, else from a first
/// decompression pass.
struct ZstdSource {
    path: PathBuf,
    size: u64,
    state: std::sync::Mutex<(Box<dyn std::io::Read + Send>, u64)>,
}

impl ZstdSource {
    fn open(path: &Path) -> Result<Self> {
        let reader = || -> Result<Box<dyn std::io::Read + Send>> {
            let file = std::fs::File::open(path).with_context(|| format!("failed to open {}", path.display()))?;
            Ok(Box::new(zstd::stream::read::Decoder::new(file)?))
        };
        let size = std::io::copy(&mut reader()?, &mut std::io::sink())
            .with_context(|| format!("{} is not a valid zstd stream", path.display()))?;
        Ok(ZstdSource { path: path.to_owned(), size, state: std::sync::Mutex::new((reader()?, 0)) })
    }
}

impl Source for ZstdSource {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        use std::io::Read;
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (reader, pos) = &mut *state;
        if offset < *pos {
            return Err(format!("{}: a compressed image can only be read forward", self.path.display()));
        }
        std::io::copy(&mut reader.by_ref().take(offset - *pos), &mut std::io::sink()).map_err(|e| e.to_string())?;
        reader.read_exact(buf).map_err(|e| format!("{}: {e}", self.path.display()))?;
        *pos = offset + buf.len() as u64;
        Ok(())
    }

    fn sequential(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_limits_parse_with_their_defaults() {
        assert_eq!(busy_read_limit(None).unwrap(), Some(16 << 20));
        assert_eq!(busy_read_limit(Some(" unlimited ")).unwrap(), None);
        assert_eq!(busy_read_limit(Some("32MiB")).unwrap(), Some(32 << 20));
        let zero = format!("{:#}", busy_read_limit(Some("0")).unwrap_err());
        assert!(zero.contains("busy_read_limit \"0\": must be more than 0") && zero.contains("unlimited"), "{zero}");
        assert!(format!("{:#}", rate("read_limit", "fast").unwrap_err()).contains("invalid size \"fast\""));
        assert_eq!(rate("read_limit", "1k").unwrap(), 1024);
    }

    #[test]
    fn regions_map_to_covering_chunks() {
        // 64 KiB regions, 64 KiB chunks: one to one.
        assert_eq!(regions_to_chunks(&[0, 3, 4], 65536, 65536), vec![0, 3, 4]);
        // 64 KiB regions, 1 MiB chunks: 16 regions per chunk.
        assert_eq!(regions_to_chunks(&[0, 15, 16, 40], 65536, 1 << 20), vec![0, 1, 2]);
        // 64 KiB regions, 16 KiB chunks: 4 chunks per region.
        assert_eq!(regions_to_chunks(&[1], 65536, 16384), vec![4, 5, 6, 7]);
    }
}
