//! A real `keel vault` process under test control (tools/src/vault.rs): written config,
//! log, start on a chosen or an ephemeral address, restart on the same address, clean stop
//! and crash. Used by the remote-vault tests and by deployments that keep a tenant's copies
//! in a Keel vault.

use std::io::Read as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};

use crate::cmd::{strip_ansi, wait_for};
use crate::daemon::workspace_bin;

const START: Duration = Duration::from_secs(30);

/// The vault's certificate files: the CA that signed its clients' certificates, and its own.
#[derive(Debug, Clone)]
pub struct VaultTls {
    pub ca_cert: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A `keel vault` process whose config, data and log live in `dir`.
pub struct VaultProcess {
    dir: PathBuf,
    tls: VaultTls,
    /// `(tenant, nodes allowed to open it)`.
    tenants: Vec<(String, Vec<String>)>,
    child: Option<Child>,
    /// Where it listens: chosen by the caller, or the ephemeral port of the first start.
    addr: Option<SocketAddr>,
    starts: u32,
}

impl VaultProcess {
    /// Starts a vault listening on `listen` (an ephemeral loopback port when `None`) that
    /// serves `tenants`, each to the nodes listed with it.
    pub fn start(dir: &Path, listen: Option<SocketAddr>, tls: VaultTls, tenants: &[(&str, &[&str])]) -> Result<Self> {
        let tenants = tenants
            .iter()
            .map(|(name, nodes)| (name.to_string(), nodes.iter().map(|n| n.to_string()).collect()))
            .collect();
        let mut vault = Self { dir: dir.to_path_buf(), tls, tenants, child: None, addr: listen, starts: 0 };
        vault.restart()?;
        Ok(vault)
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr.expect("started once")
    }

    /// Its data directory (one pack store per tenant below it).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Its log so far, without colours.
    pub fn log(&self) -> String {
        strip_ansi(&std::fs::read_to_string(self.dir.join("vault.log")).unwrap_or_default())
    }

    /// Starts it again (on the same address after the first start) and waits until it
    /// listens.
    pub fn restart(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("the vault is already running");
        }
        let listen = self.addr.unwrap_or_else(|| "127.0.0.1:0".parse().expect("address"));
        let mut config = format!(
            "listen = \"{listen}\"\ndata_dir = \"{}\"\nca_cert = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            self.data_dir().display(),
            self.tls.ca_cert.display(),
            self.tls.cert.display(),
            self.tls.key.display(),
        );
        for (name, nodes) in &self.tenants {
            config.push_str(&format!("\n[[tenant]]\nname = \"{name}\"\nnodes = {nodes:?}\n"));
        }
        let config_path = self.dir.join("vault.toml");
        std::fs::write(&config_path, config)?;

        self.starts += 1;
        let stdout_path = self.dir.join(format!("stdout-{}", self.starts));
        let stdout = std::fs::File::create(&stdout_path)?;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("vault.log"))?;
        let child = Command::new(workspace_bin("keel"))
            .arg("vault")
            .arg("--config")
            .arg(&config_path)
            .env("KEEL_LOG", "info")
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(log)
            .spawn()
            .context("spawn keel vault")?;
        self.child = Some(child);
        let addr = wait_for("keel vault to listen", START, || {
            if let Some(status) = self.child.as_mut().context("not running")?.try_wait()? {
                self.child = None;
                bail!("keel vault exited with {status} before listening:\n{}", self.log());
            }
            let mut line = String::new();
            std::fs::File::open(&stdout_path)?.read_to_string(&mut line)?;
            Ok(line.split_once(" listening on ").and_then(|(_, addr)| addr.trim().parse::<SocketAddr>().ok()))
        })?;
        self.addr = Some(addr);
        Ok(())
    }

    /// SIGTERM and wait: returns whether it exited successfully.
    pub fn stop(&mut self) -> Result<bool> {
        let Some(mut child) = self.child.take() else { return Ok(true) };
        // SAFETY: kill(2) only reads its arguments; the child is ours and not yet reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        Ok(child.wait()?.success())
    }

    /// SIGKILL: a crash.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.child.as_mut().is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }
}

impl Drop for VaultProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}
