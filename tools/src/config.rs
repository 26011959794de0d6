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
}

/// A volume declared in the config.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeConfig {
    /// Volume name, also its NBD export name.
    pub name: String,
    /// Size, e.g. `20GiB`.
    pub size: String,
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
