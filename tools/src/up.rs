//! `keel up`: a complete local deployment on embedded defaults, in the foreground.
//!
//! Today that is one storage node (its own `keel daemon` process) serving a 1 GiB demo
//! volume on a Unix socket. `DIR/up.json` lists nodes and volumes with their NBD URIs for
//! scripts and tests.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::config::{nbd_unix_uri, NodeConfig, VolumeConfig};
use crate::daemon::absolute;

/// What `up.json` holds.
#[derive(Debug, Serialize)]
pub struct UpState {
    /// The deployment directory.
    pub dir: PathBuf,
    /// The processes.
    pub nodes: Vec<NodeState>,
    /// The volumes and where to reach them.
    pub volumes: Vec<VolumeState>,
}

/// One node process.
#[derive(Debug, Serialize)]
pub struct NodeState {
    /// Node name.
    pub name: String,
    /// Its role in the deployment.
    pub role: String,
    /// Process id.
    pub pid: u32,
    /// Config file.
    pub config: PathBuf,
    /// NBD socket.
    pub nbd_socket: PathBuf,
    /// Log file.
    pub log: PathBuf,
}

/// One volume.
#[derive(Debug, Serialize)]
pub struct VolumeState {
    /// Volume name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Node serving it.
    pub node: String,
    /// `nbd+unix:///NAME?socket=PATH`.
    pub nbd_uri: String,
}

/// Runs the deployment until Ctrl-C or SIGTERM.
pub fn run(dir: &Path) -> Result<()> {
    let dir = absolute(dir);
    let node_dir = dir.join("node1");
    std::fs::create_dir_all(&node_dir).with_context(|| format!("failed to create {}", node_dir.display()))?;
    let config_path = node_dir.join("keel.toml");
    let config = NodeConfig {
        node_name: "node1".into(),
        data_dir: node_dir.join("data"),
        nbd_socket: node_dir.join("nbd.sock"),
        nbd_tcp: None,
        io_backend: "posix".into(),
        checkpoint_interval_secs: 10,
        volumes: vec![VolumeConfig { name: "demo".into(), size: "1GiB".into() }],
    };
    config.save(&config_path)?;
    let log = node_dir.join("keel.log");
    let mut child = spawn_node(&config_path, &log)?;
    let ready = wait_ready(&config.nbd_socket, &mut child, Duration::from_secs(60));
    if let Err(e) = ready {
        let _ = child.kill();
        let _ = child.wait();
        return Err(e.context(format!("node1 did not start; see {}", log.display())));
    }
    let uri = nbd_unix_uri("demo", &config.nbd_socket);
    let state = UpState {
        dir: dir.clone(),
        nodes: vec![NodeState {
            name: "node1".into(),
            role: "primary".into(),
            pid: child.id(),
            config: config_path,
            nbd_socket: config.nbd_socket.clone(),
            log: log.clone(),
        }],
        volumes: vec![VolumeState { name: "demo".into(), size: 1 << 30, node: "node1".into(), nbd_uri: uri.clone() }],
    };
    let up_json = dir.join("up.json");
    std::fs::write(&up_json, serde_json::to_string_pretty(&state)? + "\n")?;
    println!("Keel is up: node1 (pid {}) serves volume \"demo\" (1 GiB).", child.id());
    println!();
    println!("  NBD URI   {uri}");
    println!("  state     {}", up_json.display());
    println!("  log       {}", log.display());
    println!();
    println!("Try it:");
    println!("  qemu-io -f raw '{uri}' -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M'");
    println!("  nbdinfo --map '{uri}'");
    println!("Mount it (this kernel has no nbd module: FUSE + loop):");
    println!("  mkdir -p /tmp/demo && nbdfuse /tmp/demo/vol '{uri}' &");
    println!("  dev=$(losetup --direct-io=on -f --show /tmp/demo/vol) && mkfs.ext4 -q $dev && mount $dev /mnt");
    println!();
    println!("Press Ctrl-C to stop.");
    let outcome = wait_for_stop(&mut child);
    let _ = std::fs::remove_file(&up_json);
    outcome
}

fn spawn_node(config: &Path, log: &Path) -> Result<Child> {
    let exe = std::env::current_exe().context("failed to find the keel binary")?;
    let log_file = std::fs::File::create(log).with_context(|| format!("failed to create {}", log.display()))?;
    Command::new(exe)
        .arg("daemon")
        .arg("--config")
        .arg(config)
        .stdin(std::process::Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .spawn()
        .context("failed to start keel daemon")
}

/// Waits until the node accepts connections on its socket, or its process exits.
fn wait_ready(socket: &Path, child: &mut Child, timeout: Duration) -> Result<()> {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("keel daemon exited with {status}");
        }
        if answers_nbd(socket) {
            return Ok(());
        }
        if started.elapsed() > timeout {
            bail!("keel daemon did not listen on {} within {timeout:?}", socket.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for Ctrl-C or SIGTERM (then stops the node gracefully) or for the node to die.
fn wait_for_stop(child: &mut Child) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let pid = child.id();
    let stopped_by_user = runtime.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut poll = tokio::time::interval(Duration::from_millis(200));
        loop {
            tokio::select! {
                _ = term.recv() => return anyhow::Ok(true),
                _ = int.recv() => return anyhow::Ok(true),
                _ = poll.tick() => {
                    if child.try_wait()?.is_some() {
                        return anyhow::Ok(false);
                    }
                }
            }
        }
    })?;
    if !stopped_by_user {
        let status = child.wait()?;
        bail!("node1 exited unexpectedly with {status}");
    }
    println!("Stopping node1…");
    // SAFETY: kill(2) only reads its integer arguments; `pid` is our own child, not yet
    // reaped, so it cannot name another process.
    unsafe {
        libc::kill(pid as i32, libc::SIGTERM);
    }
    let status = child.wait()?;
    println!("node1 stopped ({status}).");
    Ok(())
}

/// True when an NBD server on `socket` completes the start of a handshake. The probe then
/// leaves politely with `NBD_OPT_ABORT`, so the server logs nothing alarming.
fn answers_nbd(socket: &Path) -> bool {
    use std::io::{Read, Write};
    let probe = || -> std::io::Result<bool> {
        let mut stream = std::os::unix::net::UnixStream::connect(socket)?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut greeting = [0u8; 18];
        stream.read_exact(&mut greeting)?;
        let ok = greeting[..8] == *b"NBDMAGIC" && greeting[8..16] == *b"IHAVEOPT";
        stream.write_all(&3u32.to_be_bytes())?; // fixed newstyle, no zeroes
        let mut abort = Vec::with_capacity(16);
        abort.extend_from_slice(b"IHAVEOPT");
        abort.extend_from_slice(&2u32.to_be_bytes()); // NBD_OPT_ABORT
        abort.extend_from_slice(&0u32.to_be_bytes());
        stream.write_all(&abort)?;
        let mut ack = [0u8; 20];
        let _ = stream.read_exact(&mut ack);
        Ok(ok)
    };
    probe().unwrap_or(false)
}
