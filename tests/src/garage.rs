//! A real single-node Garage (an S3-compatible object store) for tests of the S3 vault,
//! started the way shared/prior-art/garage.md describes: a config on free loopback ports, the
//! server, then `status` → `layout assign` → `layout apply` → `key create` → `bucket create` →
//! `bucket allow`. The server is killed, and its directory removed, when the handle drops,
//! even if the test panics.
//!
//! Which `garage` runs: `$KEEL_GARAGE` if set, else `garage` on `PATH`, else
//! [`INSTALL_PATH`], where tests/run installs it (`cargo install --root /usr/local/garage`).
//! Tests call [`binary_or_skip`]: without Garage they are skipped with a printed reason,
//! unless `KEEL_REQUIRE_GARAGE=1` (tests/run sets it) makes that a failure.

use std::fs::{self, File};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::cmd::{run, run_ok, wait_for};

/// Environment variable naming the `garage` binary.
pub const BINARY_ENV: &str = "KEEL_GARAGE";
/// Environment variable that turns "Garage is not installed" from a skip into a failure.
pub const REQUIRE_ENV: &str = "KEEL_REQUIRE_GARAGE";
/// Where tests/run installs Garage.
pub const INSTALL_PATH: &str = "/usr/local/garage/bin/garage";
/// The S3 region the cluster answers to.
pub const REGION: &str = "garage";
/// The bucket [`Garage::start`] creates.
pub const BUCKET: &str = "keel-vault";

/// Bound on one `garage` CLI command.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on a server becoming ready (it takes a second or two).
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Attempts at starting on fresh ports when another process took one first.
const PORT_ATTEMPTS: usize = 5;

/// The `garage` binary that answers `--version`, or why there is none.
pub fn binary() -> Result<PathBuf, String> {
    let candidates: Vec<PathBuf> = match std::env::var_os(BINARY_ENV) {
        Some(path) => vec![PathBuf::from(path)],
        None => vec![PathBuf::from("garage"), PathBuf::from(INSTALL_PATH)],
    };
    let mut reasons = Vec::new();
    for candidate in candidates {
        match run(Command::new(&candidate).arg("--version"), COMMAND_TIMEOUT) {
            Ok(output) if output.status.success() && output.stdout.starts_with("garage") => return Ok(candidate),
            Ok(output) => reasons.push(format!("`{} --version` answered {}", candidate.display(), output.describe())),
            Err(e) => reasons.push(format!("{e:#}")),
        }
    }
    Err(format!("Garage is not installed ({}); tests/run installs it", reasons.join("; ")))
}

/// [`binary`] for a test: `None` (after printing why) skips the test; a missing Garage
/// panics when [`REQUIRE_ENV`] is `1`.
pub fn binary_or_skip(test: &str) -> Option<PathBuf> {
    match binary() {
        Ok(binary) => Some(binary),
        Err(why) => {
            if std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1") {
                panic!("{test}: Garage is required ({REQUIRE_ENV}=1) but unavailable: {why}");
            }
            eprintln!("SKIPPED {test}: {why}");
            None
        }
    }
}

/// A single-node Garage cluster with one bucket and one key that may read and write it.
#[derive(Debug)]
pub struct Garage {
    binary: PathBuf,
    dir: PathBuf,
    s3_port: u16,
    child: Option<Child>,
    /// The access key id allowed on [`BUCKET`].
    pub key_id: String,
    /// Its secret key.
    pub secret: String,
    /// The bucket ([`BUCKET`]).
    pub bucket: String,
}

impl Garage {
    /// Starts a cluster with its state in `dir` (created; removed on drop), with the
    /// `garage` that [`binary`] finds.
    pub fn start(dir: &Path) -> Result<Self> {
        let binary = binary().map_err(anyhow::Error::msg)?;
        Self::start_with(&binary, dir)
    }

    /// [`Garage::start`] with an explicit `garage` binary.
    pub fn start_with(binary: &Path, dir: &Path) -> Result<Self> {
        fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let mut garage = Garage {
            binary: binary.to_owned(),
            dir: dir.to_owned(),
            s3_port: 0,
            child: None,
            key_id: String::new(),
            secret: String::new(),
            bucket: BUCKET.to_owned(),
        };
        let mut attempt = 1;
        loop {
            let ports = free_ports()?;
            garage.write_config(ports)?;
            garage.s3_port = ports[0];
            match garage.spawn_and_wait() {
                Ok(()) => break,
                Err(e) if attempt < PORT_ATTEMPTS && garage.log().contains("Address already in use") => {
                    eprintln!("garage: a port was taken before the server bound it, retrying on new ports: {e:#}");
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
        let status = garage.cli(&["status"])?;
        let node_id = node_id(&status.stdout).with_context(|| format!("no node id in `status`:\n{}", status.stdout))?;
        garage.cli(&["layout", "assign", "-z", "dc1", "-c", "1G", &node_id])?;
        garage.cli(&["layout", "apply", "--version", "1"])?;
        (garage.key_id, garage.secret) = garage.create_key("keel-test")?;
        garage.cli(&["bucket", "create", BUCKET])?;
        garage.cli(&["bucket", "allow", "--read", "--write", "--owner", BUCKET, "--key", "keel-test"])?;
        Ok(garage)
    }

    /// The S3 endpoint (path-style addressing, region [`REGION`]).
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port)
    }

    /// A node config's `[[snapshots.vault]]` table for this cluster's bucket, named `name`.
    pub fn vault_section(&self, name: &str) -> String {
        format!(
            "[[snapshots.vault]]\nkind = \"s3\"\nname = \"{name}\"\nendpoint = \"{}\"\nregion = \"{REGION}\"\nbucket = \"{}\"\naccess_key_id = \"{}\"\nsecret_access_key = \"{}\"\n",
            self.endpoint(),
            self.bucket,
            self.key_id,
            self.secret
        )
    }

    /// The cluster's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("garage.log")).unwrap_or_default()
    }

    /// Creates another access key, allowed on no bucket; returns its id and secret.
    pub fn create_key(&self, name: &str) -> Result<(String, String)> {
        let output = self.cli(&["key", "create", name])?;
        let field = |label: &str| {
            output
                .stdout
                .lines()
                .find_map(|line| line.strip_prefix(label).map(|v| v.trim().to_owned()))
                .filter(|v| !v.is_empty())
                .with_context(|| format!("no {label:?} in `key create`:\n{}", output.stdout))
        };
        Ok((field("Key ID:")?, field("Secret key:")?))
    }

    /// Stops the server the hard way (SIGKILL, as a crash or a power cut would): the vault is
    /// down until [`Garage::restart`]. Its data stays. (A SIGTERM makes Garage wait for
    /// clients' idle keep-alive connections, which holds a test up for no gain.)
    pub fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else { return Ok(()) };
        child.kill().context("kill the garage server")?;
        child.wait().context("reap the garage server")?;
        Ok(())
    }

    /// Starts the server again on the same ports and data, and waits until it answers.
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.spawn_and_wait()
    }

    fn config_path(&self) -> PathBuf {
        self.dir.join("garage.toml")
    }

    /// Runs `garage -c <config> <args>`, failing on a non-zero exit.
    fn cli(&self, args: &[&str]) -> Result<crate::cmd::Output> {
        run_ok(Command::new(&self.binary).arg("-c").arg(self.config_path()).args(args), COMMAND_TIMEOUT)
            .with_context(|| format!("garage {}\n--- server log (tail):\n{}", args.join(" "), self.log_tail()))
    }

    fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn write_config(&self, [s3, rpc, admin]: [u16; 3]) -> Result<()> {
        let secret: [u8; 32] = rand::random();
        let secret: String = secret.iter().map(|b| format!("{b:02x}")).collect();
        let dir = self.dir.display();
        let config = format!(
            r#"metadata_dir = "{dir}/meta"
data_dir = "{dir}/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:{rpc}"
rpc_public_addr = "127.0.0.1:{rpc}"
rpc_secret = "{secret}"
[s3_api]
s3_region = "{REGION}"
api_bind_addr = "127.0.0.1:{s3}"
root_domain = ".s3.garage.localhost"
[admin]
api_bind_addr = "127.0.0.1:{admin}"
"#
        );
        fs::write(self.config_path(), config).context("write garage.toml")
    }

    /// Starts the server and waits until `status` answers and the S3 port accepts
    /// connections; a server that exits meanwhile is an error carrying its log.
    fn spawn_and_wait(&mut self) -> Result<()> {
        let log = File::options().create(true).append(true).open(self.dir.join("garage.log"))?;
        let child = Command::new(&self.binary)
            .arg("-c")
            .arg(self.config_path())
            .arg("server")
            .env("RUST_LOG", "garage=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {}", self.binary.display()))?;
        self.child = Some(child);
        let s3_port = self.s3_port;
        let ready = wait_for("garage to answer `status` and accept S3 connections", READY_TIMEOUT, || {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    self.child = None;
                    bail!("garage server exited with {status}:\n{}", self.log_tail());
                }
            }
            let status =
                run(Command::new(&self.binary).arg("-c").arg(self.config_path()).arg("status"), COMMAND_TIMEOUT)?;
            let ready = status.status.success() && TcpStream::connect(("127.0.0.1", s3_port)).is_ok();
            if !ready {
                // Each probe starts a process: poll at a modest rate.
                std::thread::sleep(Duration::from_millis(40));
            }
            Ok(ready.then_some(()))
        });
        if ready.is_err() {
            let _ = self.stop();
        }
        ready
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Three distinct free loopback ports (S3, RPC, admin), probed by binding them at once.
/// Another process may take one before the server binds it; [`Garage::start`] retries then.
fn free_ports() -> Result<[u16; 3]> {
    let listeners = [(); 3].map(|()| TcpListener::bind("127.0.0.1:0"));
    let mut ports = [0u16; 3];
    for (port, listener) in ports.iter_mut().zip(listeners) {
        *port = listener.context("bind an ephemeral port")?.local_addr()?.port();
    }
    Ok(ports)
}

/// The node id in `garage status`: the first column of the first row under HEALTHY NODES.
fn node_id(status: &str) -> Option<String> {
    let mut lines = status.lines().skip_while(|line| !line.contains("HEALTHY NODES"));
    lines.next()?; // the title
    lines.next()?; // the column headers
    let id = lines.next()?.split_whitespace().next()?;
    id.bytes().all(|b| b.is_ascii_hexdigit()).then(|| id.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_node_id_from_status() {
        let status = "==== HEALTHY NODES ====\n\
            ID                Hostname  Address          Tags  Zone  Capacity          DataAvail  Version\n\
            10ad1d10e760213c  vm        127.0.0.1:39101              NO ROLE ASSIGNED             cargo:2.5.0\n";
        assert_eq!(node_id(status).as_deref(), Some("10ad1d10e760213c"));
        assert_eq!(node_id("==== HEALTHY NODES ====\nID\n"), None);
        assert_eq!(node_id(""), None);
    }

    #[test]
    fn free_ports_are_distinct() {
        let [a, b, c] = free_ports().unwrap();
        assert!(a != b && b != c && a != c);
    }
}
