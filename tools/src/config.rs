//! The node configuration file (TOML). See docs/operations.md for every key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::units::parse_size;

/// One node's configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// A name for logs and `up.json` (default: the host name).
    #[serde(default = "default_node_name")]
    pub node_name: String,
    /// Where the node keeps its volumes (`DATA_DIR/volumes/NAME`).
    pub data_dir: PathBuf,
    /// The Unix socket NBD clients connect to (exports are named after volumes).
    pub nbd_socket: PathBuf,
    /// Optional TCP listener for NBD, e.g. `127.0.0.1:10809`. Loopback unless you mean it.
    #[serde(default)]
    pub nbd_tcp: Option<SocketAddr>,
    /// `posix` (default) or `uring` (io_uring, falling back to posix when refused).
    #[serde(default = "default_io_backend")]
    pub io_backend: String,
    /// Seconds between background checkpoints while a volume is written.
    #[serde(default = "default_checkpoint_interval_secs")]
    pub checkpoint_interval_secs: u64,
    /// Volumes this node creates on start when they do not exist yet.
    #[serde(default, rename = "volume")]
    pub volumes: Vec<VolumeConfig>,
    /// Synchronous replication to a standby (volumes with a `peer` are replicated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication: Option<ReplicationConfig>,
    /// Snapshots: repository, key, schedule, retention and vaults (docs/snapshots.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshots: Option<crate::snapshot::SnapshotsConfig>,
}

/// A node's replication settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicationConfig {
    /// UDP address of this node's QUIC endpoint (the peer connects here).
    pub listen: SocketAddr,
    /// The cluster CA certificate (PEM).
    pub ca_cert: PathBuf,
    /// This node's certificate (PEM); its DNS name must equal `node_name`.
    pub cert: PathBuf,
    /// This node's private key (PEM).
    pub key: PathBuf,
    /// The witness.
    pub witness: PeerAddress,
    /// The other storage nodes.
    #[serde(default, rename = "peer")]
    pub peers: Vec<PeerAddress>,
    /// Leases and timeouts (see docs/replication.md for the inequality they must satisfy).
    #[serde(default)]
    pub timing: TimingConfig,
}

/// A named node and its QUIC address.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerAddress {
    /// Node name (its certificate's DNS name).
    pub name: String,
    /// UDP address.
    pub address: SocketAddr,
}

/// Replication timing, in milliseconds.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TimingConfig {
    /// The primary's lease at the witness.
    pub lease_ms: u64,
    /// How often the primary renews it.
    pub renew_ms: u64,
    /// Bound on the relative clock-rate difference between nodes and witness.
    pub clock_rate_error: f64,
    /// A standby silent this long counts as lost.
    pub ack_timeout_ms: u64,
    /// QUIC idle timeout (failure detection).
    pub detect_ms: u64,
    /// A FLUSH that neither the standby nor the witness can confirm fails after this.
    pub flush_timeout_ms: u64,
}

impl Default for TimingConfig {
    fn default() -> Self {
        let t = keel_net::repl::fence::Timing::default();
        Self {
            lease_ms: t.lease.as_millis() as u64,
            renew_ms: t.renew_interval.as_millis() as u64,
            clock_rate_error: t.clock_rate_error,
            ack_timeout_ms: t.ack_timeout.as_millis() as u64,
            detect_ms: t.detect_timeout.as_millis() as u64,
            flush_timeout_ms: t.flush_timeout.as_millis() as u64,
        }
    }
}

impl TimingConfig {
    /// The timing as the fencing machines take it, checked against the inequality.
    pub fn timing(&self) -> Result<keel_net::repl::fence::Timing> {
        let timing = keel_net::repl::fence::Timing {
            lease: Duration::from_millis(self.lease_ms),
            renew_interval: Duration::from_millis(self.renew_ms),
            clock_rate_error: self.clock_rate_error,
            ack_timeout: Duration::from_millis(self.ack_timeout_ms),
            detect_timeout: Duration::from_millis(self.detect_ms),
            ..keel_net::repl::fence::Timing::default()
        };
        timing.validate().map_err(anyhow::Error::msg)?;
        let timing =
            keel_net::repl::fence::Timing { flush_timeout: Duration::from_millis(self.flush_timeout_ms), ..timing };
        Ok(timing)
    }
}

/// The `keel witness` config file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WitnessConfig {
    /// The witness's name (its certificate's DNS name).
    pub name: String,
    /// UDP address to listen on.
    pub listen: SocketAddr,
    /// Where the per-volume records live.
    pub data_dir: PathBuf,
    /// The cluster CA certificate (PEM).
    pub ca_cert: PathBuf,
    /// The witness's certificate (PEM).
    pub cert: PathBuf,
    /// The witness's private key (PEM).
    pub key: PathBuf,
    /// Storage nodes allowed to talk to it.
    pub nodes: Vec<String>,
    /// Lease granted to primaries, in milliseconds (must equal the nodes' `lease_ms`).
    #[serde(default = "default_lease_ms")]
    pub lease_ms: u64,
}

fn default_lease_ms() -> u64 {
    TimingConfig::default().lease_ms
}

impl WitnessConfig {
    /// Reads a witness config file.
    pub fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("failed to read config {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("invalid config {}", path.display()))
    }

    /// Writes the config as TOML.
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = toml::to_string_pretty(self)?;
        std::fs::write(path, text).with_context(|| format!("failed to write {}", path.display()))
    }
}

/// A volume declared in the config.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeConfig {
    /// Volume name, also its NBD export name.
    pub name: String,
    /// Size, e.g. `20GiB`.
    pub size: String,
    /// The standby (or primary) node this volume is replicated with; none: not replicated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// This node's role on the pair's first start (`primary` or `standby`); afterwards the
    /// persisted state decides.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// `sync` (default) or `async`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// Command run after this node became primary (mount, start PostgreSQL, take the address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_promote: Option<String>,
    /// Command run after this node stopped being primary (the reverse).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_demote: Option<String>,
    /// Seconds a hook may run before it is killed (default 60).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hook_timeout_secs: Option<u64>,
}

fn default_node_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_else(|_| "keel".into())
}

fn default_io_backend() -> String {
    "posix".into()
}

fn default_checkpoint_interval_secs() -> u64 {
    10
}

impl NodeConfig {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("failed to read config {}", path.display()))?;
        let config: Self = toml::from_str(&text).with_context(|| format!("invalid config {}", path.display()))?;
        config.validate().with_context(|| format!("invalid config {}", path.display()))?;
        Ok(config)
    }

    fn validate(&self) -> Result<()> {
        self.io_backend().map_err(anyhow::Error::msg)?;
        for volume in &self.volumes {
            parse_size(&volume.size).with_context(|| format!("volume {:?}", volume.name))?;
        }
        if self.checkpoint_interval_secs == 0 {
            bail!("checkpoint_interval_secs must be at least 1");
        }
        for volume in &self.volumes {
            let Some(peer) = &volume.peer else { continue };
            let Some(replication) = &self.replication else {
                bail!("volume {:?} names peer {peer:?} but there is no [replication] section", volume.name);
            };
            if !replication.peers.iter().any(|p| &p.name == peer) {
                bail!("volume {:?}: peer {peer:?} is not listed under [[replication.peer]]", volume.name);
            }
            match volume.role.as_deref() {
                Some("primary" | "standby") => {}
                other => bail!("volume {:?}: role must be \"primary\" or \"standby\", not {other:?}", volume.name),
            }
            match volume.mode.as_deref() {
                None | Some("sync" | "async") => {}
                Some(other) => bail!("volume {:?}: mode must be \"sync\" or \"async\", not {other:?}", volume.name),
            }
        }
        if let Some(replication) = &self.replication {
            replication.timing.timing().context("[replication.timing]")?;
        }
        Ok(())
    }

    /// The configured I/O backend.
    pub fn io_backend(&self) -> Result<keel_engine::IoBackend, String> {
        self.io_backend.parse()
    }

    /// Directory holding the node's volume directories.
    pub fn volumes_dir(&self) -> PathBuf {
        self.data_dir.join("volumes")
    }

    /// Runtime options for opening volumes.
    pub fn open_options(&self) -> keel_engine::OpenOptions {
        keel_engine::OpenOptions {
            checkpoint_interval: Duration::from_secs(self.checkpoint_interval_secs),
            background_checkpoints: true,
        }
    }

    /// Writes the config as TOML.
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = toml::to_string_pretty(self)?;
        std::fs::write(path, text).with_context(|| format!("failed to write {}", path.display()))
    }
}

/// The NBD URI of an export on a Unix socket.
pub fn nbd_unix_uri(export: &str, socket: &Path) -> String {
    format!("nbd+unix:///{export}?socket={}", socket.display())
}
