//! A `keel daemon` process under a test's control, in its own temporary directory, killed
//! (and its directory removed) when the handle drops, even if the test panics.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Path of a binary built by this workspace (`keel`, `keel-inspect`).
pub fn workspace_bin(name: &str) -> PathBuf {
    // Test binaries live in target/<profile>/deps; the workspace's binaries one level up.
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe.parent().and_then(Path::parent).expect("target/<profile>");
    let bin = dir.join(name);
    assert!(bin.exists(), "{} is missing: run `cargo build --workspace --bins` first (tests/run does)", bin.display());
    // `cargo test -p keel-tests` does not rebuild the binaries: a test would run (and a
    // measurement measure) the daemon of an older build without a word.
    if let (Ok(built), Some(newer)) = (bin.metadata().and_then(|m| m.modified()), newest_source()) {
        assert!(
            built >= newer.1,
            "{} is older than {}: run `cargo build --workspace --bins` first (tests/run does)",
            bin.display(),
            newer.0.display()
        );
    }
    bin
}

/// The most recently modified Rust source of the crates the binaries are built from, and
/// when (looked up once per test process).
fn newest_source() -> Option<(PathBuf, std::time::SystemTime)> {
    static NEWEST: std::sync::OnceLock<Option<(PathBuf, std::time::SystemTime)>> = std::sync::OnceLock::new();
    NEWEST
        .get_or_init(|| {
            let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent()?;
            let mut newest: Option<(PathBuf, std::time::SystemTime)> = None;
            let mut dirs: Vec<PathBuf> =
                ["engine", "net", "snapshot", "tools"].iter().map(|c| root.join(c).join("src")).collect();
            while let Some(dir) = dirs.pop() {
                for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                    let path = entry.path();
                    if path.is_dir() {
                        dirs.push(path);
                    } else if path.extension().is_some_and(|e| e == "rs") {
                        let Ok(modified) = entry.metadata().and_then(|m| m.modified()) else { continue };
                        if newest.as_ref().is_none_or(|(_, t)| modified > *t) {
                            newest = Some((path, modified));
                        }
                    }
                }
            }
            newest
        })
        .clone()
}

/// A running (or stopped) node.
#[derive(Debug)]
pub struct Daemon {
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Daemon {
    /// Writes a config with `volumes` (name, size such as "64MiB") and starts the node.
    pub fn start(volumes: &[(&str, &str)]) -> Result<Self> {
        Self::start_with(volumes, "posix")
    }

    /// Like [`Daemon::start`] with an explicit I/O backend (`posix`, `uring`).
    pub fn start_with(volumes: &[(&str, &str)], io_backend: &str) -> Result<Self> {
        let mut daemon = Self::configure(volumes, io_backend, "")?;
        daemon.restart()?;
        Ok(daemon)
    }

    /// Writes a config with `volumes` and the TOML text `extra` appended (e.g. a
    /// `[snapshots]` section; `{dir}` in it is replaced by the node's directory), without
    /// starting the node: call [`Daemon::restart`].
    pub fn configure(volumes: &[(&str, &str)], io_backend: &str, extra: &str) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("keel-test-").tempdir()?;
        let mut config = format!(
            "node_name = \"test\"\ndata_dir = \"{}\"\nnbd_socket = \"{}\"\nio_backend = \"{io_backend}\"\n",
            dir.path().join("data").display(),
            dir.path().join("nbd.sock").display(),
        );
        for (name, size) in volumes {
            config.push_str(&format!("\n[[volume]]\nname = \"{name}\"\nsize = \"{size}\"\n"));
        }
        config.push('\n');
        config.push_str(&extra.replace("{dir}", &dir.path().display().to_string()));
        std::fs::write(dir.path().join("keel.toml"), config)?;
        Ok(Self { dir, child: None })
    }

    /// The node's directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The NBD socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("nbd.sock")
    }

    /// The config file.
    pub fn config(&self) -> PathBuf {
        self.dir.path().join("keel.toml")
    }

    /// A volume's directory.
    pub fn volume_dir(&self, volume: &str) -> PathBuf {
        self.dir.path().join("data/volumes").join(volume)
    }

    /// `nbd+unix:///VOLUME?socket=...`.
    pub fn uri(&self, volume: &str) -> String {
        format!("nbd+unix:///{volume}?socket={}", self.socket().display())
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("keel.log")).unwrap_or_default()
    }

    /// Process id of the running daemon.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts the daemon (again) on the same directory and waits until it accepts NBD
    /// connections.
    pub fn restart(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("daemon already running");
        }
        let _ = std::fs::remove_file(self.socket());
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("keel.log"))?;
        let child = Command::new(workspace_bin("keel"))
            .arg("daemon")
            .arg("--config")
            .arg(self.config())
            .env("KEEL_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawn keel daemon")?;
        self.child = Some(child);
        self.wait_ready(Duration::from_secs(60))
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.as_mut().context("not running")?.try_wait()? {
                self.child = None;
                bail!("keel daemon exited with {status} before it was ready:\n{}", self.log());
            }
            if std::os::unix::net::UnixStream::connect(self.socket()).is_ok() {
                return Ok(());
            }
            if started.elapsed() > timeout {
                bail!("keel daemon not ready after {timeout:?}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL, like a crash of the process (the page cache survives).
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait: a clean shutdown. Returns whether it exited successfully.
    pub fn stop(&mut self) -> Result<bool> {
        let Some(mut child) = self.child.take() else { return Ok(true) };
        // SAFETY: kill(2) only reads its arguments; the child is ours and not yet reaped.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        Ok(child.wait()?.success())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}
