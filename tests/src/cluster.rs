//! A replicated deployment under a test's control: a witness and two storage nodes, each
//! its own process on loopback with certificates from a fresh cluster CA, in a temporary
//! directory that is removed (and every process killed) when the handle drops.
//!
//! Tests read state through each node's control socket (`keel status` JSON) and its event
//! log, and wait on them; they never sleep for a fixed time.
//!
//! # Networks
//! [`Network::Loopback`] connects the processes directly. [`Network::Proxied`] routes every
//! link through a [`UdpProxy`]: node→peer and node→witness each get one, and a node's config
//! names the proxy's address instead of the real one, so a test can cut, delay or degrade
//! any link ([`Cluster::cut_link`], [`Cluster::isolate`], [`Cluster::proxy`]).
//! [`Network::Namespaces`] puts each process in a network namespace of its own, joined by
//! veth pairs to a bridge in a fourth one; cuts are iptables DROP rules inside the
//! namespaces ([`crate::netns`]).
//!
//! # Observing
//! [`Cluster::wait_event`] waits on a node's `events.jsonl`; [`PrimaryWatch`] samples both
//! nodes' status during a scenario and reports any moment two nodes were writable
//! primaries; [`Load`] runs the crash workload against a node and verifies every
//! acknowledged write afterwards.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::cmd::{run_ok, wait_for};
use crate::daemon::workspace_bin;
use crate::nbd_client::NbdClient;
use crate::netns::Netns;
use crate::proxy::UdpProxy;
use crate::workload::{generate, verify, write_payload, Op, SECTOR};

/// Node names of the pair.
pub const NODES: [&str; 2] = ["node-a", "node-b"];
/// The witness's name.
pub const WITNESS: &str = "witness";
/// The witness's index in [`Cluster::cut_link`] (the nodes are 0 and 1).
pub const W: usize = 2;

/// A free UDP port on loopback (bound, read, released).
pub fn free_udp_addr() -> SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind an ephemeral UDP port");
    socket.local_addr().expect("local address")
}

/// One process of the deployment.
#[derive(Debug)]
pub struct Proc {
    /// Its name.
    pub name: String,
    /// Its directory.
    pub dir: PathBuf,
    /// Its config file.
    pub config: PathBuf,
    /// `daemon` or `witness`.
    kind: &'static str,
    /// A command the process runs under (`ip netns exec NS`), if any.
    wrapper: Vec<String>,
    child: Option<Child>,
}

impl Proc {
    /// The log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("keel.log")
    }

    /// The log so far.
    pub fn log(&self) -> String {
        crate::cmd::strip_ansi(&std::fs::read_to_string(self.log_path()).unwrap_or_default())
    }

    /// Whether the process is running (as far as this handle knows).
    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// Process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts the process.
    pub fn start(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("{} already running", self.name);
        }
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path())?;
        let mut command = match self.wrapper.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(workspace_bin("keel"));
                command
            }
            None => Command::new(workspace_bin("keel")),
        };
        // `ip netns exec` execs the program, so the child's pid is keel's.
        let child = command
            .arg(self.kind)
            .arg("--config")
            .arg(&self.config)
            .env("KEEL_LOG", std::env::var("KEEL_LOG").unwrap_or_else(|_| "info,keel_net=debug".into()))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawn keel {} for {}", self.kind, self.name))?;
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILL (a crash of the process; the page cache survives).
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP: the process freezes (a hung server); [`Proc::resume`] undoes it.
    pub fn freeze(&self) {
        if let Some(pid) = self.pid() {
            // SAFETY: kill(2) only reads its arguments; the child is ours and not yet reaped.
            unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
        }
    }

    /// SIGCONT after [`Proc::freeze`].
    pub fn resume(&self) {
        if let Some(pid) = self.pid() {
            // SAFETY: as in `freeze`.
            unsafe { libc::kill(pid as i32, libc::SIGCONT) };
        }
    }

    /// SIGTERM and wait.
    pub fn stop(&mut self) -> Result<bool> {
        let Some(mut child) = self.child.take() else { return Ok(true) };
        // SAFETY: as in `freeze`.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        Ok(child.wait()?.success())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.resume();
        self.kill9();
    }
}

/// How the processes reach each other.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Network {
    /// Directly, on loopback.
    #[default]
    Loopback,
    /// On loopback, every link through a [`UdpProxy`] the test controls.
    Proxied,
    /// Each process in a network namespace of its own (needs root and `ip`; cuts need
    /// `iptables`). See [`crate::netns`].
    Namespaces,
}

/// The proxies of a [`Network::Proxied`] cluster: `to_peer[i]` carries node i's traffic to
/// the other node, `to_witness[i]` node i's traffic to the witness (both ways each).
#[derive(Debug)]
pub struct Links {
    /// Node i → the other node.
    pub to_peer: [UdpProxy; 2],
    /// Node i → the witness.
    pub to_witness: [UdpProxy; 2],
}

/// The witness and two storage nodes.
#[derive(Debug)]
pub struct Cluster {
    /// The witness process.
    pub witness: Proc,
    /// The storage nodes, `NODES[0]` first.
    pub nodes: Vec<Proc>,
    /// Real listen addresses: witness, node-a, node-b.
    pub addrs: [SocketAddr; 3],
    /// The proxies, for [`Network::Proxied`] (dropped after the processes).
    pub links: Option<Links>,
    /// The namespaces, for [`Network::Namespaces`] (removed after the processes are killed).
    pub netns: Option<Netns>,
    dir: tempfile::TempDir,
}

/// Settings for [`Cluster::start`].
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Volumes `(name, size)`, primary on node-a.
    pub volumes: Vec<(String, String)>,
    /// Extra TOML for each `[[volume]]` (hooks), keyed by node index.
    pub volume_extra: [String; 2],
    /// Extra `[replication.timing]` TOML lines.
    pub timing: String,
    /// Extra top-level TOML for each node's config (a `[snapshots]` section), keyed by
    /// node index; appended after the replication sections.
    pub node_extra: [String; 2],
    /// How the processes reach each other.
    pub network: Network,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            volumes: vec![("vol".into(), "16MiB".into())],
            volume_extra: Default::default(),
            timing: String::new(),
            node_extra: Default::default(),
            network: Network::Loopback,
        }
    }
}

impl Cluster {
    /// Generates certificates and configs, starts the witness and both nodes, and waits
    /// until every volume's standby is connected and up to date.
    pub fn start(options: &ClusterOptions) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("keel-cluster-").tempdir()?;
        let ca = dir.path().join("ca");
        let keel = workspace_bin("keel");
        run_ok(Command::new(&keel).args(["cert", "init", "--dir"]).arg(&ca), Duration::from_secs(60))?;
        for name in [WITNESS, NODES[0], NODES[1]] {
            run_ok(Command::new(&keel).args(["cert", "issue", name, "--dir"]).arg(&ca), Duration::from_secs(60))?;
        }
        let netns = match options.network {
            Network::Namespaces => Some(Netns::create(&["w", "a", "b"])?),
            _ => None,
        };
        let addrs = match &netns {
            // Each namespace has its own ports: a fixed one cannot collide.
            Some(netns) => [0, 1, 2].map(|i| SocketAddr::new(netns.ip(i), 7000)),
            None => [free_udp_addr(), free_udp_addr(), free_udp_addr()],
        };
        let wrappers: [Vec<String>; 3] = match &netns {
            Some(netns) => [0, 1, 2].map(|i| netns.exec_prefix(i)),
            None => Default::default(),
        };
        let links = match options.network {
            Network::Proxied => Some(Links {
                to_peer: [UdpProxy::start_named("a-b", addrs[2])?, UdpProxy::start_named("b-a", addrs[1])?],
                to_witness: [UdpProxy::start_named("a-w", addrs[0])?, UdpProxy::start_named("b-w", addrs[0])?],
            }),
            _ => None,
        };
        // What each node dials: the proxy in front of the peer or witness, or the real address.
        let peer_addr = |i: usize| links.as_ref().map_or(addrs[1 + (1 - i)], |l| l.to_peer[i].addr());
        let witness_addr = |i: usize| links.as_ref().map_or(addrs[0], |l| l.to_witness[i].addr());
        let cert = |name: &str, ext: &str| ca.join(format!("{name}.{ext}")).display().to_string();
        let wdir = dir.path().join(WITNESS);
        std::fs::create_dir_all(&wdir)?;
        let witness_config = wdir.join("witness.toml");
        std::fs::write(
            &witness_config,
            format!(
                "name = \"{WITNESS}\"\nlisten = \"{}\"\ndata_dir = \"{}\"\nca_cert = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\nnodes = [\"{}\", \"{}\"]\n",
                addrs[0],
                wdir.join("data").display(),
                ca.join("ca.pem").display(),
                cert(WITNESS, "pem"),
                cert(WITNESS, "key"),
                NODES[0],
                NODES[1],
            ),
        )?;
        let mut nodes = Vec::new();
        for (i, name) in NODES.iter().enumerate() {
            let other = 1 - i;
            let ndir = dir.path().join(name);
            std::fs::create_dir_all(&ndir)?;
            let mut config = format!(
                "node_name = \"{name}\"\ndata_dir = \"{}\"\nnbd_socket = \"{}\"\ncheckpoint_interval_secs = 1\n",
                ndir.join("data").display(),
                ndir.join("nbd.sock").display(),
            );
            for (volume, size) in &options.volumes {
                config.push_str(&format!(
                    "\n[[volume]]\nname = \"{volume}\"\nsize = \"{size}\"\npeer = \"{}\"\nrole = \"{}\"\n{}\n",
                    NODES[other],
                    if i == 0 { "primary" } else { "standby" },
                    options.volume_extra[i],
                ));
            }
            config.push_str(&format!(
                "\n[replication]\nlisten = \"{}\"\nca_cert = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\nwitness = {{ name = \"{WITNESS}\", address = \"{}\" }}\n\n[[replication.peer]]\nname = \"{}\"\naddress = \"{}\"\n",
                addrs[1 + i],
                ca.join("ca.pem").display(),
                cert(name, "pem"),
                cert(name, "key"),
                witness_addr(i),
                NODES[other],
                peer_addr(i),
            ));
            if !options.timing.is_empty() {
                config.push_str(&format!("\n[replication.timing]\n{}\n", options.timing));
            }
            if !options.node_extra[i].is_empty() {
                config.push_str(&format!("\n{}\n", options.node_extra[i]));
            }
            let path = ndir.join("keel.toml");
            std::fs::write(&path, config)?;
            nodes.push(Proc {
                name: name.to_string(),
                dir: ndir,
                config: path,
                kind: "daemon",
                wrapper: wrappers[1 + i].clone(),
                child: None,
            });
        }
        let witness = Proc {
            name: WITNESS.into(),
            dir: wdir,
            config: witness_config,
            kind: "witness",
            wrapper: wrappers[0].clone(),
            child: None,
        };
        let mut cluster = Self { witness, nodes, addrs, links, netns, dir };
        cluster.witness.start()?;
        for i in 0..2 {
            cluster.nodes[i].start()?;
        }
        for (volume, _) in &options.volumes {
            cluster.wait_in_sync(volume, Duration::from_secs(60))?;
        }
        Ok(cluster)
    }

    /// The deployment's directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A node's NBD socket.
    pub fn socket(&self, node: usize) -> PathBuf {
        self.nodes[node].dir.join("nbd.sock")
    }

    /// A node's control socket.
    pub fn control_socket(&self, node: usize) -> PathBuf {
        self.nodes[node].dir.join("data/control.sock")
    }

    /// A volume's directory on a node.
    pub fn volume_dir(&self, node: usize, volume: &str) -> PathBuf {
        self.nodes[node].dir.join("data/volumes").join(volume)
    }

    /// The node's status JSON (via its control socket), or an error when it does not answer.
    pub fn status(&self, node: usize) -> Result<Value> {
        let response = control_call(&self.control_socket(node), &serde_json::json!({"op": "status"}))?;
        response.get("status").cloned().with_context(|| format!("unexpected status answer {response}"))
    }

    /// One volume's status on a node.
    pub fn volume_status(&self, node: usize, volume: &str) -> Result<Value> {
        let status = self.status(node)?;
        status["volumes"]
            .as_array()
            .and_then(|v| v.iter().find(|v| v["name"] == volume))
            .cloned()
            .with_context(|| format!("{volume} missing from {status}"))
    }

    /// Sends a control request (`promote`, `switchover`, ...) and returns the answer.
    pub fn control(&self, node: usize, request: &Value) -> Result<Value> {
        control_call(&self.control_socket(node), request)
    }

    /// The node that is primary of `volume` and can write (as its status says), if any.
    pub fn primary(&self, volume: &str) -> Option<usize> {
        (0..2).find(|&i| {
            self.nodes[i].running()
                && self.volume_status(i, volume).is_ok_and(|s| s["role"] == "primary" && s["writable"] == true)
        })
    }

    /// Waits until `volume` has a writable primary whose standby is connected and up to
    /// date; returns the primary's index.
    pub fn wait_in_sync(&self, volume: &str, timeout: Duration) -> Result<usize> {
        wait_for(&format!("{volume} in sync"), timeout, || {
            for i in 0..2 {
                if !self.nodes[i].running() {
                    continue;
                }
                let Ok(s) = self.volume_status(i, volume) else { continue };
                if s["role"] == "primary"
                    && s["peer"]["connected"] == true
                    && s["peer"]["state"] == "UpToDate"
                    && s["writable"] == true
                {
                    return Ok(Some(i));
                }
            }
            Ok(None)
        })
        .with_context(|| self.describe())
    }

    /// Waits until `node` is the writable primary of `volume`.
    pub fn wait_primary(&self, node: usize, volume: &str, timeout: Duration) -> Result<()> {
        wait_for(&format!("{} primary of {volume}", self.nodes[node].name), timeout, || {
            Ok(self
                .volume_status(node, volume)
                .ok()
                .filter(|s| s["role"] == "primary" && s["writable"] == true)
                .map(|_| ()))
        })
        .with_context(|| self.describe())
    }

    /// Every event a node logged (its `events.jsonl`).
    pub fn events(&self, node: usize) -> Vec<Value> {
        let path = self.nodes[node].dir.join("data/events.jsonl");
        std::fs::read_to_string(path).unwrap_or_default().lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
    }

    /// The number of events a node has logged so far: a mark for [`Cluster::wait_event_since`].
    pub fn event_mark(&self, node: usize) -> usize {
        self.events(node).len()
    }

    /// The events a node logged after `mark`.
    pub fn events_since(&self, node: usize, mark: usize) -> Vec<Value> {
        self.events(node).into_iter().skip(mark).collect()
    }

    /// Waits until the node logs an event of `kind` for which `pred` holds (it gets the
    /// whole event: `kind`, `volume`, `fields`, `time_ms`, ...), anywhere in its log.
    pub fn wait_event(
        &self,
        node: usize,
        kind: &str,
        pred: impl FnMut(&Value) -> bool,
        timeout: Duration,
    ) -> Result<Value> {
        self.wait_event_since(node, 0, kind, pred, timeout)
    }

    /// Like [`Cluster::wait_event`], among the events logged after `mark`.
    pub fn wait_event_since(
        &self,
        node: usize,
        mark: usize,
        kind: &str,
        mut pred: impl FnMut(&Value) -> bool,
        timeout: Duration,
    ) -> Result<Value> {
        let what = format!("a {kind:?} event on {}", self.nodes[node].name);
        wait_for(&what, timeout, || {
            Ok(self.events_since(node, mark).into_iter().find(|e| e["kind"] == kind && pred(e)))
        })
        .with_context(|| self.describe())
    }

    /// The proxies (panics unless the cluster runs with [`Network::Proxied`]).
    pub fn links(&self) -> &Links {
        self.links.as_ref().expect("this cluster's links are not proxied")
    }

    /// The proxy carrying `from`'s traffic to `to` (node indices, or [`W`] for the
    /// witness as `to`).
    pub fn proxy(&self, from: usize, to: usize) -> &UdpProxy {
        let links = self.links();
        match (from, to) {
            (0 | 1, W) => &links.to_witness[from],
            (0, 1) | (1, 0) => &links.to_peer[from],
            _ => panic!("no proxy from {from} to {to}"),
        }
    }

    /// Cuts (or restores) the link between `a` and `b` both ways: two nodes (0, 1), or a
    /// node and the witness ([`W`]). With proxies, the proxy (or both proxies) of the link;
    /// with namespaces, DROP rules in `a`'s namespace.
    pub fn cut_link(&self, a: usize, b: usize, cut: bool) -> Result<()> {
        assert_ne!(a, b, "a link joins two different members");
        if let Some(netns) = &self.netns {
            // Namespace order in `Netns`: witness, node-a, node-b; members here: a, b, W.
            let ns = |member: usize| if member == W { 0 } else { member + 1 };
            return netns.cut(ns(a), ns(b), cut);
        }
        let links = self.links.as_ref().context("cutting links needs Network::Proxied or Network::Namespaces")?;
        match (a.min(b), a.max(b)) {
            (0, 1) => {
                links.to_peer[0].cut(cut);
                links.to_peer[1].cut(cut);
            }
            (node @ (0 | 1), W) => links.to_witness[node].cut(cut),
            other => bail!("no link {other:?}"),
        }
        Ok(())
    }

    /// Cuts (or restores) every link of `node`: a node cut from everyone.
    pub fn isolate(&self, node: usize, cut: bool) -> Result<()> {
        self.cut_link(node, 1 - node, cut)?;
        self.cut_link(node, W, cut)
    }

    /// The witness crashes (SIGKILL). Its records are durable; its leases restart fresh.
    pub fn witness_down(&mut self) {
        self.witness.kill9();
    }

    /// The witness starts again.
    pub fn witness_up(&mut self) -> Result<()> {
        self.witness.start()
    }

    /// Whether a plain NBD write on `node` is refused: `Ok(true)` when it fails or is not
    /// answered within `within`; `Ok(false)` when it succeeded. It writes one zero sector at
    /// `offset`; use an offset the test's verification tolerates or that must not change.
    pub fn write_refused(&self, node: usize, volume: &str, offset: u64, within: Duration) -> Result<bool> {
        let mut client = NbdClient::connect(&self.socket(node), volume)?;
        client.stream().set_read_timeout(Some(within))?;
        Ok(client.write_zeroes(offset, SECTOR as u32).is_err())
    }

    /// Statuses and log tails, for failure messages.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        for (i, node) in self.nodes.iter().enumerate() {
            out.push_str(&format!(
                "\n=== {} (running: {}) status: {:?}\n",
                node.name,
                node.running(),
                self.status(i).ok()
            ));
            let log = node.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            out.push_str(&tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
        }
        let log = self.witness.log();
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        out.push_str(&format!("\n=== witness\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n")));
        out
    }
}

/// One request/response on a control socket.
pub fn control_call(socket: &Path, request: &Value) -> Result<Value> {
    control_call_within(socket, request, Duration::from_secs(20))
}

/// [`control_call`] with a deadline for the answer.
pub fn control_call_within(socket: &Path, request: &Value, timeout: Duration) -> Result<Value> {
    let mut stream =
        std::os::unix::net::UnixStream::connect(socket).with_context(|| format!("connect to {}", socket.display()))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.write_all(format!("{request}\n").as_bytes())?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    serde_json::from_str(&line).with_context(|| format!("bad control answer {line:?}"))
}

/// Waits until `f` holds, polling every 10 ms.
pub fn until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Result<Duration> {
    let started = Instant::now();
    wait_for(what, timeout, || Ok(f().then_some(())))?;
    Ok(started.elapsed())
}

/// Wall-clock milliseconds since the Unix epoch (the unit of events' `time_ms`).
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// What a [`PrimaryWatch`] saw.
#[derive(Debug, Clone, Default)]
pub struct WatchReport {
    /// Status samples taken (both nodes together).
    pub samples: u64,
    /// Each moment a node was a writable primary after the other had been one in the same
    /// or a newer epoch.
    pub violations: Vec<String>,
    /// Every change of a node's `(role, writable, epoch)`, with the time since the start.
    pub timeline: Vec<String>,
}

/// Samples both nodes' `status` of one volume, alternately and as fast as they answer,
/// and checks that no two nodes are writable primaries at once.
///
/// Two samples are never taken at the same instant, so the check is on their order: a
/// sample of node Y writable at epoch `e` taken after a sample of node X writable at epoch
/// `e' ≥ e` is a violation (X's tenure began before Y's sample, and Y still answered writes
/// in an epoch no newer than X's). A normal failover (X writable at `e`, then Y writable at
/// `e + 1`) is not. Polling can miss a short overlap; tests also try a write on the old
/// primary once the new one serves ([`Cluster::write_refused`]).
#[derive(Debug)]
pub struct PrimaryWatch {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<WatchReport>>,
}

impl PrimaryWatch {
    /// Starts sampling `volume` on both nodes of `cluster`.
    pub fn start(cluster: &Cluster, volume: &str) -> Self {
        let sockets = [cluster.control_socket(0), cluster.control_socket(1)];
        let names = [cluster.nodes[0].name.clone(), cluster.nodes[1].name.clone()];
        let volume = volume.to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("primary-watch".into())
            .spawn(move || watch(&sockets, &names, &volume, &flag))
            .expect("spawn the primary watch thread");
        Self { stop, thread: Some(thread) }
    }

    /// Stops sampling and returns what was seen.
    pub fn finish(mut self) -> WatchReport {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().map(|t| t.join().unwrap_or_default()).unwrap_or_default()
    }
}

impl Drop for PrimaryWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Pause between two rounds of [`PrimaryWatch`] samples.
const WATCH_INTERVAL: Duration = Duration::from_millis(5);

fn watch(sockets: &[PathBuf; 2], names: &[String; 2], volume: &str, stop: &AtomicBool) -> WatchReport {
    let started = Instant::now();
    let mut report = WatchReport::default();
    let mut max_writable_epoch: [Option<u64>; 2] = [None, None];
    let mut last: [Option<(String, bool, u64)>; 2] = [None, None];
    let request = serde_json::json!({"op": "status"});
    while !stop.load(Ordering::SeqCst) {
        // A sampling interval, so that the watch does not take a core from the daemons
        // (their leases are timed) on a two-core machine.
        std::thread::sleep(WATCH_INTERVAL);
        for node in 0..2 {
            // A dead or frozen node has no say; keep the other's samples flowing.
            let Ok(answer) = control_call_within(&sockets[node], &request, Duration::from_secs(2)) else { continue };
            let Some(status) = answer["status"]["volumes"]
                .as_array()
                .and_then(|volumes| volumes.iter().find(|v| v["name"] == volume))
                .cloned()
            else {
                continue;
            };
            report.samples += 1;
            let role = status["role"].as_str().unwrap_or("?").to_string();
            let writable = status["writable"] == true && role == "primary";
            let epoch = status["epoch"].as_u64().unwrap_or(0);
            let at = started.elapsed().as_millis();
            let now = (role.clone(), writable, epoch);
            if last[node].as_ref() != Some(&now) {
                report.timeline.push(format!("{at:>6} ms {}: {role} writable={writable} epoch={epoch}", names[node]));
                last[node] = Some(now);
            }
            if !writable {
                continue;
            }
            let other = 1 - node;
            if let Some(other_epoch) = max_writable_epoch[other].filter(|&e| e >= epoch) {
                report.violations.push(format!(
                    "at {at} ms {} is a writable primary of epoch {epoch}, after {} was one of epoch {other_epoch}",
                    names[node], names[other]
                ));
            }
            max_writable_epoch[node] = max_writable_epoch[node].max(Some(epoch));
        }
    }
    report
}

/// One client of a [`Load`].
#[derive(Debug)]
struct LoadClient {
    seed: u64,
    base: u64,
    ops: Arc<Vec<Op>>,
    /// Ops covered by an acknowledged FLUSH or FUA write.
    acked: Arc<AtomicUsize>,
    /// Ops sent (the op being sent counts).
    issued: Arc<AtomicUsize>,
    /// The first error, and when it came (ms since the Unix epoch); errors after `stop`
    /// are not recorded.
    error: Arc<Mutex<Option<(String, u64)>>>,
    /// A handle on the client's socket, to interrupt a request that blocks.
    stream: std::os::unix::net::UnixStream,
    thread: Option<JoinHandle<()>>,
}

/// The crash workload ([`crate::workload`]) on `clients` NBD connections to one node, each
/// client on its own part of the volume, until it runs out of ops, fails, or is stopped.
/// Records, per client, how many ops an acknowledged FLUSH or FUA covers, and verifies the
/// volume's contents against that afterwards.
#[derive(Debug)]
pub struct Load {
    clients: Vec<LoadClient>,
    part: u64,
    stop: Arc<AtomicBool>,
}

impl Load {
    /// Starts `clients` clients on `volume` through the NBD socket `socket`; client i works
    /// on `[base + i × part, base + (i + 1) × part)` with `ops` ops generated from `seed + i`.
    /// The region must read as zeros when the load starts (a new volume does).
    pub fn start(
        socket: &Path,
        volume: &str,
        seed: u64,
        base: u64,
        part: u64,
        clients: u64,
        ops: usize,
    ) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut started = Vec::new();
        for index in 0..clients {
            let seed = seed.wrapping_add(index);
            let base = base + index * part;
            let ops = Arc::new(generate(seed, part, ops));
            let mut client = NbdClient::connect(socket, volume)?;
            let stream = client.stream().try_clone()?;
            let (acked, issued) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
            let error = Arc::new(Mutex::new(None));
            let thread = {
                let (ops, acked, issued, error, stop) =
                    (Arc::clone(&ops), Arc::clone(&acked), Arc::clone(&issued), Arc::clone(&error), Arc::clone(&stop));
                std::thread::Builder::new().name(format!("load-{index}")).spawn(move || {
                    for (i, op) in ops.iter().enumerate() {
                        if stop.load(Ordering::SeqCst) {
                            return;
                        }
                        issued.store(i + 1, Ordering::SeqCst);
                        let result = match *op {
                            Op::Write { sector, sectors, fua } => client.write(
                                base + sector * SECTOR,
                                &write_payload(seed, i as u64, sector, sectors),
                                fua,
                            ),
                            Op::Zero { sector, sectors, trim: true } => {
                                client.trim(base + sector * SECTOR, (sectors * SECTOR) as u32)
                            }
                            Op::Zero { sector, sectors, trim: false } => {
                                client.write_zeroes(base + sector * SECTOR, (sectors * SECTOR) as u32)
                            }
                            Op::Flush => client.flush(),
                        };
                        if let Err(e) = result {
                            if !stop.load(Ordering::SeqCst) {
                                *error.lock().unwrap_or_else(|e| e.into_inner()) =
                                    Some((format!("op {i} {op:?}: {e:#}"), now_ms()));
                            }
                            return;
                        }
                        if op.is_barrier() {
                            acked.store(i + 1, Ordering::SeqCst);
                        }
                    }
                })?
            };
            started.push(LoadClient { seed, base, ops, acked, issued, error, stream, thread: Some(thread) });
        }
        Ok(Self { clients: started, part, stop })
    }

    /// Acknowledged ops, summed over the clients.
    pub fn acked(&self) -> usize {
        self.clients.iter().map(|c| c.acked.load(Ordering::SeqCst)).sum()
    }

    /// Whether every client has stopped (ran out of ops, failed or was stopped).
    pub fn finished(&self) -> bool {
        self.clients.iter().all(|c| c.thread.as_ref().is_none_or(JoinHandle::is_finished))
    }

    /// Each client's first error and its time (ms since the Unix epoch).
    pub fn errors(&self) -> Vec<(String, u64)> {
        self.clients.iter().filter_map(|c| c.error.lock().unwrap_or_else(|e| e.into_inner()).clone()).collect()
    }

    /// Waits until `n` more ops than now are acknowledged (summed over the clients).
    pub fn wait_progress(&self, n: usize, timeout: Duration) -> Result<Duration> {
        let target = self.acked() + n;
        let started = Instant::now();
        wait_for(&format!("{n} more acknowledged ops"), timeout, || {
            if self.acked() >= target {
                return Ok(Some(()));
            }
            if self.finished() {
                bail!("the load ended at {} acknowledged ops (target {target}): {:?}", self.acked(), self.errors());
            }
            Ok(None)
        })?;
        Ok(started.elapsed())
    }

    /// Waits until every client stopped by itself (typically: failed).
    pub fn wait_finished(&self, timeout: Duration) -> Result<()> {
        wait_for("the load to end", timeout, || Ok(self.finished().then_some(())))
    }

    /// Stops the clients (interrupting a request that blocks) and joins them.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for client in &mut self.clients {
            let _ = client.stream.shutdown(std::net::Shutdown::Both);
            if let Some(thread) = client.thread.take() {
                let _ = thread.join();
            }
        }
    }

    /// Checks every client's part of `contents` (the whole volume, read from one node)
    /// against its acknowledged ops: each sector holds what the last acknowledged op wrote
    /// there, or what a later issued op wrote. Call after [`Load::stop`] or once finished.
    pub fn verify_contents(&self, contents: &[u8]) -> Result<()> {
        for (index, client) in self.clients.iter().enumerate() {
            let (acked, issued) = (client.acked.load(Ordering::SeqCst), client.issued.load(Ordering::SeqCst));
            let part = contents
                .get(client.base as usize..(client.base + self.part) as usize)
                .context("the volume is smaller than the load's region")?;
            if let Err(violation) = verify(client.seed, &client.ops, acked, issued, part) {
                bail!("client {index} (seed {}), {acked} ops acknowledged, {issued} issued: {violation}", client.seed);
            }
        }
        Ok(())
    }

    /// Reads the whole volume through `node`'s NBD socket and [`Load::verify_contents`].
    pub fn verify_on(&self, cluster: &Cluster, node: usize, volume: &str) -> Result<()> {
        let contents = read_volume(cluster, node, volume)?;
        self.verify_contents(&contents)
    }

    /// `(acknowledged, issued)` per client, for messages.
    pub fn counts(&self) -> Vec<(usize, usize)> {
        self.clients.iter().map(|c| (c.acked.load(Ordering::SeqCst), c.issued.load(Ordering::SeqCst))).collect()
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The whole volume, read through `node`'s NBD socket.
pub fn read_volume(cluster: &Cluster, node: usize, volume: &str) -> Result<Vec<u8>> {
    let mut reader = NbdClient::connect(&cluster.socket(node), volume)?;
    let mut contents = vec![0u8; reader.size() as usize];
    for (i, chunk) in contents.chunks_mut(1 << 20).enumerate() {
        reader.read((i as u64) << 20, chunk)?;
    }
    Ok(contents)
}
