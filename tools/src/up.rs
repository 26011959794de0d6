//! `keel up`: a complete local deployment on embedded defaults, in the foreground.
//!
//! A witness and two storage nodes, each its own process on loopback with certificates
//! from a cluster CA made on the first run, and a 1 GiB demo volume replicated
//! synchronously from `node-a` to `node-b`. `DIR/up.json` lists the processes, their roles
//! and the volume's NBD URI on its current primary (rewritten after a failover), for
//! scripts and tests.

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use keel_net::quic::{self, TlsFiles};

use crate::config::{
    nbd_unix_uri, NodeConfig, PeerAddress, ReplicationConfig, TimingConfig, VolumeConfig, WitnessConfig,
};
use crate::control::{self, ControlRequest, ControlResponse};
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

/// Node names of the local deployment.
const NODES: [&str; 2] = ["node-a", "node-b"];
/// The witness's name.
const WITNESS: &str = "witness";
/// The vault server's name (the snapshots' off-site copy, on loopback here).
const VAULT: &str = "vault";
/// The tenant the demo volume belongs to.
const TENANT: &str = "demo";
/// The demo volume.
const DEMO: &str = "demo";
const DEMO_SIZE: u64 = 1 << 30;

/// A free UDP port on loopback.
fn free_udp_addr() -> Result<SocketAddr> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").context("failed to find a free UDP port")?;
    Ok(socket.local_addr()?)
}

/// Certificates for the witness and both nodes, from a CA made on the first run.
fn ensure_certs(ca: &Path) -> Result<()> {
    let year = Duration::from_secs(365 * 24 * 3600);
    if !ca.join("ca.pem").exists() {
        quic::create_ca(ca, "keel-up", 10 * year)?;
    }
    for name in [WITNESS, VAULT, NODES[0], NODES[1]] {
        if !ca.join(format!("{name}.pem")).exists() {
            quic::issue_cert(ca, name, ca, 2 * year)?;
        }
    }
    Ok(())
}

/// Runs the deployment until Ctrl-C or SIGTERM.
pub fn run(dir: &Path) -> Result<()> {
    let dir = absolute(dir);
    let ca = dir.join("ca");
    std::fs::create_dir_all(&dir).with_context(|| format!("failed to create {}", dir.display()))?;
    ensure_certs(&ca)?;
    let addrs = [free_udp_addr()?, free_udp_addr()?, free_udp_addr()?, free_udp_addr()?];
    let tls = |name: &str| TlsFiles::in_dir(&ca, name);
    let witness_dir = dir.join(WITNESS);
    std::fs::create_dir_all(&witness_dir)?;
    let witness_config_path = witness_dir.join("witness.toml");
    let witness_config = WitnessConfig {
        name: WITNESS.into(),
        listen: addrs[0],
        data_dir: witness_dir.join("data"),
        ca_cert: tls(WITNESS).ca_cert,
        cert: tls(WITNESS).cert,
        key: tls(WITNESS).key,
        nodes: NODES.iter().map(|n| n.to_string()).collect(),
        lease_ms: TimingConfig::default().lease_ms,
    };
    witness_config.save(&witness_config_path)?;
    let mut procs: Vec<Proc> = Vec::new();
    let witness_log = witness_dir.join("keel.log");
    procs.push(Proc::spawn(WITNESS, "witness", &witness_config_path, &witness_log, None)?);
    // Snapshots: one tenant key shared by both nodes, a `keel vault` server and a
    // directory vault, so that every snapshot has its two copies.
    let key_file = dir.join("tenant.key");
    if !key_file.exists() {
        keel_snapshot::keyfile::create_key_file(&key_file, None)?;
    }
    let vault_dir = dir.join(VAULT);
    std::fs::create_dir_all(&vault_dir)?;
    let vault_config_path = vault_dir.join("vault.toml");
    let vault_config = crate::vault::VaultConfig {
        listen: addrs[3],
        data_dir: vault_dir.join("data"),
        ca_cert: tls(VAULT).ca_cert,
        cert: tls(VAULT).cert,
        key: tls(VAULT).key,
        tenants: vec![crate::vault::TenantConfig {
            name: TENANT.into(),
            nodes: NODES.iter().map(|n| n.to_string()).collect(),
        }],
    };
    std::fs::write(&vault_config_path, toml::to_string_pretty(&vault_config)?)?;
    procs.push(Proc::spawn(VAULT, "vault", &vault_config_path, &vault_dir.join("keel.log"), None)?);
    let snapshots = crate::snapshot::SnapshotsConfig {
        repo: None,
        tenant: TENANT.into(),
        key_file: Some(key_file.clone()),
        passphrase_file: None,
        chunk_size: crate::snapshot::DEFAULT_CHUNK_SIZE.into(),
        zstd_level: 3,
        threads: None,
        read_limit: None,
        busy_read_limit: None,
        cpu_priority: None,
        schedule: Some("every 15m".into()),
        timezone: None,
        retention: Some(crate::snapshot::RetentionTable { keep_within: Some("2d".into()), ..Default::default() }),
        min_copies: 2,
        take_on: Default::default(),
        groups: Vec::new(),
        vaults: vec![
            crate::snapshot::VaultConfig::Keel {
                name: VAULT.into(),
                address: addrs[3],
                server: VAULT.into(),
                ca_cert: None,
                cert: None,
                key: None,
            },
            crate::snapshot::VaultConfig::Dir { name: "dc3".into(), path: dir.join("vault-dc3") },
        ],
    };
    for (i, name) in NODES.iter().enumerate() {
        let other = 1 - i;
        let node_dir = dir.join(name);
        std::fs::create_dir_all(&node_dir).with_context(|| format!("failed to create {}", node_dir.display()))?;
        let config_path = node_dir.join("keel.toml");
        let config = NodeConfig {
            node_name: name.to_string(),
            data_dir: node_dir.join("data"),
            nbd_socket: node_dir.join("nbd.sock"),
            nbd_tcp: None,
            io_backend: "posix".into(),
            checkpoint_interval_secs: 10,
            volumes: vec![VolumeConfig {
                name: DEMO.into(),
                size: "1GiB".into(),
                peer: Some(NODES[other].to_string()),
                role: Some(if i == 0 { "primary" } else { "standby" }.into()),
                ..VolumeConfig::default()
            }],
            replication: Some(ReplicationConfig {
                listen: addrs[1 + i],
                ca_cert: tls(name).ca_cert,
                cert: tls(name).cert,
                key: tls(name).key,
                witness: PeerAddress { name: WITNESS.into(), address: addrs[0] },
                peers: vec![PeerAddress { name: NODES[other].into(), address: addrs[1 + other] }],
                timing: TimingConfig::default(),
            }),
            snapshots: Some(snapshots.clone()),
        };
        config.save(&config_path)?;
        let log = node_dir.join("keel.log");
        procs.push(Proc::spawn(name, "daemon", &config_path, &log, Some(config))?);
    }
    let ready = wait_ready(&mut procs, Duration::from_secs(120));
    let primary = match ready {
        Ok(primary) => primary,
        Err(e) => {
            stop_all(&mut procs);
            return Err(e);
        }
    };
    let up_json = dir.join("up.json");
    write_state(&dir, &up_json, &procs, primary)?;
    let uri = procs[primary].nbd_uri();
    println!("Keel is up: a replicated pair, a witness and a snapshot vault, each its own process on loopback.");
    println!();
    for p in &procs {
        println!(
            "  {:<8} pid {:<7} {:<8} log {}",
            p.name,
            p.child.id(),
            p.role_label(primary, &procs),
            p.log.display()
        );
    }
    println!();
    println!("  volume \"{DEMO}\" (1 GiB) on {}: {uri}", procs[primary].name);
    println!("  state   {}", up_json.display());
    println!();
    println!("Try it:");
    println!("  qemu-io -f raw '{uri}' -c 'write -P 0xab 0 1M' -c 'flush' -c 'read -P 0xab 0 1M'");
    println!("  keel status --config {}", procs[primary].config.display());
    println!(
        "  keel switchover {DEMO} --config {}   # planned move to the standby, zero loss",
        procs[primary].config.display()
    );
    println!("  kill -9 {}   # the standby takes over by itself within seconds", procs[primary].child.id());
    println!("Snapshots (every 15 minutes, copied to the vault and to {}):", dir.join("vault-dc3").display());
    println!("  keel snapshot create {DEMO} --config {}", procs[primary].config.display());
    println!("  keel snapshot list --config {}", procs[primary].config.display());
    println!("  keel snapshot export ID -o demo.raw.zst --config {}", procs[primary].config.display());
    println!("Mount it (this kernel has no nbd module: FUSE + loop):");
    println!("  mkdir -p /tmp/demo && nbdfuse /tmp/demo/vol '{uri}' &");
    println!("  dev=$(losetup --direct-io=on -f --show /tmp/demo/vol) && mkfs.ext4 -q $dev && mount $dev /mnt");
    println!();
    println!("Press Ctrl-C to stop.");
    let outcome = wait_for_stop(&dir, &up_json, &mut procs, primary);
    let _ = std::fs::remove_file(&up_json);
    outcome
}

/// One child process of the deployment.
struct Proc {
    name: String,
    kind: &'static str,
    child: Child,
    config: PathBuf,
    log: PathBuf,
    node: Option<NodeConfig>,
}

impl Proc {
    fn spawn(name: &str, kind: &'static str, config: &Path, log: &Path, node: Option<NodeConfig>) -> Result<Self> {
        let child = spawn_process(kind, config, log)?;
        Ok(Self { name: name.into(), kind, child, config: config.to_path_buf(), log: log.to_path_buf(), node })
    }

    fn nbd_uri(&self) -> String {
        self.node.as_ref().map(|n| nbd_unix_uri(DEMO, &n.nbd_socket)).unwrap_or_default()
    }

    fn role_label(&self, primary: usize, procs: &[Proc]) -> &'static str {
        if self.kind == "witness" {
            "witness"
        } else if self.kind == "vault" {
            "vault"
        } else if std::ptr::eq(self, &procs[primary]) {
            "primary"
        } else {
            "standby"
        }
    }

    /// The demo volume's status on this node, if it answers.
    fn demo_status(&self) -> Option<serde_json::Value> {
        let node = self.node.as_ref()?;
        let socket = node.data_dir.join("control.sock");
        match control::call(&socket, &ControlRequest::Status, Duration::from_secs(2)).ok()? {
            ControlResponse::Status { status } => {
                status["volumes"].as_array()?.iter().find(|v| v["name"] == DEMO).cloned()
            }
            _ => None,
        }
    }
}

fn stop_all(procs: &mut [Proc]) {
    // Storage nodes first (they flush and close), the witness last.
    for p in procs.iter_mut().rev() {
        if !matches!(p.child.try_wait(), Ok(None)) {
            continue; // already gone (and reaped): its pid may belong to someone else now
        }
        // SAFETY: kill(2) only reads its integer arguments; the pid is our own child, not
        // yet reaped (checked just above), so it cannot name another process.
        unsafe {
            libc::kill(p.child.id() as i32, libc::SIGTERM);
        }
        let _ = p.child.wait();
    }
}

/// Waits until one node is the writable primary of the demo volume with its standby in
/// sync; returns its index in `procs`.
fn wait_ready(procs: &mut [Proc], timeout: Duration) -> Result<usize> {
    let started = Instant::now();
    loop {
        for p in procs.iter_mut() {
            if let Some(status) = p.child.try_wait()? {
                bail!("{} exited with {status}; see {}", p.name, p.log.display());
            }
        }
        for (i, p) in procs.iter().enumerate() {
            if let Some(s) = p.demo_status() {
                if s["role"] == "primary" && s["writable"] == true && s["peer"]["state"] == "UpToDate" {
                    return Ok(i);
                }
            }
        }
        if started.elapsed() > timeout {
            bail!("the pair did not become ready within {timeout:?}; see the logs under the deployment directory");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn write_state(dir: &Path, up_json: &Path, procs: &[Proc], primary: usize) -> Result<()> {
    let state = UpState {
        dir: dir.to_path_buf(),
        nodes: procs
            .iter()
            .map(|p| NodeState {
                name: p.name.clone(),
                role: p.role_label(primary, procs).into(),
                pid: p.child.id(),
                config: p.config.clone(),
                nbd_socket: p.node.as_ref().map(|n| n.nbd_socket.clone()).unwrap_or_default(),
                log: p.log.clone(),
            })
            .collect(),
        volumes: vec![VolumeState {
            name: DEMO.into(),
            size: DEMO_SIZE,
            node: procs[primary].name.clone(),
            nbd_uri: procs[primary].nbd_uri(),
        }],
    };
    let tmp = up_json.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(&state)? + "\n")?;
    std::fs::rename(&tmp, up_json)?;
    Ok(())
}

fn spawn_process(kind: &str, config: &Path, log: &Path) -> Result<Child> {
    let exe = std::env::current_exe().context("failed to find the keel binary")?;
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("failed to open {}", log.display()))?;
    let mut command = Command::new(exe);
    // SAFETY: the closure runs in the forked child before exec and only calls prctl(2),
    // which is async-signal-safe and reads nothing but its integer arguments.
    unsafe {
        command.pre_exec(|| {
            // The deployment dies with `keel up`, whatever kills it (even before its signal
            // handlers are installed): no orphaned witness or nodes.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command
        .arg(kind)
        .arg("--config")
        .arg(config)
        .stdin(std::process::Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .spawn()
        .with_context(|| format!("failed to start keel {kind}"))
}

/// Waits for Ctrl-C or SIGTERM (then stops every process gracefully) or for a process to
/// die; keeps `up.json` pointing at the current primary meanwhile.
fn wait_for_stop(dir: &Path, up_json: &Path, procs: &mut [Proc], mut primary: usize) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let mut exited = vec![false; procs.len()];
    let died = runtime.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut poll = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = term.recv() => return anyhow::Ok(None),
                _ = int.recv() => return anyhow::Ok(None),
                _ = poll.tick() => {
                    // A node that dies is what failover is for: report it and carry on.
                    for (i, p) in procs.iter_mut().enumerate() {
                        if !exited[i] {
                            if let Some(status) = p.child.try_wait()? {
                                exited[i] = true;
                                println!("{} exited ({status}); the deployment carries on without it", p.name);
                            }
                        }
                    }
                    if exited.iter().skip(1).all(|&e| e) {
                        return anyhow::Ok(Some("both storage nodes exited".to_string()));
                    }
                    let now = procs.iter().enumerate().position(|(i, p)| {
                        !exited[i] && p.demo_status().is_some_and(|s| s["role"] == "primary" && s["writable"] == true)
                    });
                    if let Some(now) = now.filter(|&n| n != primary) {
                        primary = now;
                        println!("{} is now the primary of {DEMO}: {}", procs[primary].name, procs[primary].nbd_uri());
                        write_state(dir, up_json, procs, primary)?;
                    }
                }
            }
        }
    })?;
    println!("Stopping…");
    stop_all(procs);
    match died {
        Some(what) => bail!("{what}"),
        None => {
            println!("Stopped.");
            Ok(())
        }
    }
}
