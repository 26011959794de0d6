//! Snapshots of a replicated volume taken on the standby (docs/replication.md, "Snapshots
//! on the standby"): a replicated pair with a witness, each node with a `[snapshots]`
//! section and the same tenant key.
//!
//! - `keel snapshot create` on the standby, while a client writes and flushes on the
//!   primary, takes the snapshot there (the manifest names the standby), and the restored
//!   image is the volume after some prefix of the writes, holding every write acknowledged
//!   before the request. The primary only appended the marker.
//! - A standby cut off from its primary refuses, saying why; the primary takes it instead.
//! - Scheduled snapshots (`take_on = "standby"`): the standby takes each firing, the
//!   primary skips it.
//! - A measurement (no timed assertion): the primary's 4 KiB write+flush latency with no
//!   snapshot, during a standby snapshot and during a primary snapshot.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_tests::cluster::{Cluster, ClusterOptions, Network};
use keel_tests::cmd::{run, run_ok, Output};
use keel_tests::daemon::workspace_bin;
use keel_tests::nbd_client::NbdClient;
use keel_tests::prefix::{consistent_prefix, payload, BLOCK};
use keel_tests::workload::seeded;
use rand::{Rng, RngCore};
use serde_json::Value;

use crate::failover::CLUSTER_LOCK;

const TIMEOUT: Duration = Duration::from_secs(300);
const MIB: u64 = 1 << 20;

/// A tenant key made once with `keel snapshot key-init` and copied for each node (a pair
/// must share it), and the `[snapshots]` sections that use the copies.
pub(crate) struct Keys {
    dir: tempfile::TempDir,
}

impl Keys {
    pub(crate) fn new() -> Self {
        let dir = tempfile::Builder::new().prefix("keel-keys-").tempdir().unwrap();
        let config = dir.path().join("keygen.toml");
        let key = dir.path().join("tenant.key");
        std::fs::write(
            &config,
            format!(
                "data_dir = \"{}\"\nnbd_socket = \"{}\"\n\n[snapshots]\nkey_file = \"{}\"\n",
                dir.path().join("keygen").display(),
                dir.path().join("keygen.sock").display(),
                key.display()
            ),
        )
        .unwrap();
        let mut cmd = Command::new(workspace_bin("keel"));
        cmd.args(["snapshot", "key-init", "--config"]).arg(&config);
        run_ok(&mut cmd, TIMEOUT).unwrap();
        for node in 0..2 {
            std::fs::copy(&key, dir.path().join(format!("node-{node}.key"))).unwrap();
        }
        Self { dir }
    }

    /// The tenant key itself (to read index chunks in checks).
    pub(crate) fn key(&self) -> keel_snapshot::TenantKey {
        keel_snapshot::keyfile::load_key_file(&self.dir.path().join("tenant.key"), None).unwrap()
    }

    /// `[snapshots]` for node `node`: the tenant and its key, 64 KiB chunks, then
    /// `settings` and `extra` lines. `{node}` in `extra` is replaced by the node's index.
    fn section(&self, node: usize, settings: &str, extra: &str) -> String {
        let key = self.dir.path().join(format!("node-{node}.key"));
        format!(
            "[snapshots]\ntenant = \"acme\"\nkey_file = \"{}\"\nchunk_size = \"64K\"\n{settings}\n{}\n",
            key.display(),
            extra.replace("{node}", &node.to_string())
        )
    }

    /// A pair with `volumes` whose nodes keep snapshots in their repos only (no vault
    /// copies required) on one sealing thread, with `extra` `[snapshots]` lines.
    pub(crate) fn options(&self, volumes: &[(&str, &str)], network: Network, extra: &str) -> ClusterOptions {
        self.options_with(volumes, network, "min_copies = 0\nthreads = 1", extra)
    }

    /// [`Keys::options`] with other `[snapshots]` settings than its `min_copies` and
    /// `threads`.
    pub(crate) fn options_with(
        &self,
        volumes: &[(&str, &str)],
        network: Network,
        settings: &str,
        extra: &str,
    ) -> ClusterOptions {
        ClusterOptions {
            volumes: volumes.iter().map(|(name, size)| (name.to_string(), size.to_string())).collect(),
            node_extra: [self.section(0, settings, extra), self.section(1, settings, extra)],
            network,
            ..ClusterOptions::default()
        }
    }
}

/// Runs `keel ARGS --config CONFIG-of-node`, whatever it returns.
pub(crate) fn keel(cluster: &Cluster, node: usize, args: &[&str]) -> Output {
    let mut cmd = Command::new(workspace_bin("keel"));
    cmd.args(args).arg("--config").arg(&cluster.nodes[node].config);
    run(&mut cmd, TIMEOUT).unwrap()
}

pub(crate) fn json(out: &Output) -> Value {
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", out.describe()))
}

/// `keel snapshot create VOLUME` on `node`; its answer's details.
fn create(cluster: &Cluster, node: usize, volume: &str) -> Value {
    let out = keel(cluster, node, &["snapshot", "create", volume, "--json"]);
    let answer = json(&out);
    assert_eq!(answer["result"], "done", "{}\n{}", out.describe(), cluster.describe());
    answer["details"].clone()
}

/// `keel snapshot show ID --json` on `node`.
fn show(cluster: &Cluster, node: usize, id: &str) -> Value {
    let out = keel(cluster, node, &["snapshot", "show", id, "--json"]);
    assert!(out.status.success(), "{}", out.describe());
    json(&out)
}

fn restore(cluster: &Cluster, node: usize, id: &str, path: &Path) -> Vec<u8> {
    let out =
        keel(cluster, node, &["snapshot", "restore", id, "--vault", "local", "--to-file", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", out.describe());
    std::fs::read(path).unwrap()
}

#[test]
fn snapshot_on_the_standby_under_primary_writes_is_a_consistent_prefix() {
    let _serial = CLUSTER_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let keys = Keys::new();
    let size = 16 * MIB;
    let cluster = Cluster::start(&keys.options(&[("vol", "16MiB")], Network::Loopback, "")).unwrap();
    let primary = cluster.wait_in_sync("vol", Duration::from_secs(60)).unwrap();
    let standby = 1 - primary;
    // Write k goes to a pseudo-random block, carries k, and is flushed before the next.
    let plan: Vec<u64> = {
        let (mut rng, _) = seeded("snapshot_on_the_standby_under_primary_writes_is_a_consistent_prefix");
        (0..200_000).map(|_| rng.gen_range(0..size / BLOCK)).collect()
    };
    let acked = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (socket, plan, acked, stop) =
            (cluster.socket(primary), plan.clone(), Arc::clone(&acked), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut client = NbdClient::connect(&socket, "vol").unwrap();
            for (k, block) in plan.iter().enumerate() {
                if stop.load(Ordering::Acquire) {
                    break;
                }
                client.write(block * BLOCK, &payload(k), false).unwrap();
                client.flush().unwrap();
                acked.store(k + 1, Ordering::Release);
            }
            client.disconnect().unwrap();
        })
    };
    keel_tests::cmd::wait_for("the writer to start", TIMEOUT, || {
        Ok((acked.load(Ordering::Acquire) > 500).then_some(()))
    })
    .unwrap();
    let lo = acked.load(Ordering::Acquire);
    let details = create(&cluster, standby, "vol");
    let hi = acked.load(Ordering::Acquire) + 1; // the write in flight may be in it
    stop.store(true, Ordering::Release);
    writer.join().unwrap();

    let id = details["snapshot"].as_str().unwrap();
    let shown = show(&cluster, standby, id);
    assert_eq!(shown["node"], cluster.nodes[standby].name.as_str(), "taken on the standby: {shown}");
    let marker = shown["marker"].as_str().unwrap().to_owned();
    // The primary appended that marker for its standby, and took no snapshot itself.
    let appended = cluster
        .wait_event(primary, "snapshot_marker", |e| e["fields"]["name"] == marker.as_str(), Duration::from_secs(10))
        .unwrap();
    assert_eq!(appended["fields"]["seq"], shown["marker_seq"], "{appended} vs {shown}");
    assert!(cluster.events(primary).iter().all(|e| e["kind"] != "snapshot"), "the primary took a snapshot");

    let image = restore(&cluster, standby, id, &cluster.dir().join("standby.raw"));
    let k = consistent_prefix(&image, &plan, lo, hi).unwrap_or_else(|e| panic!("{e}\n{}", cluster.describe()));
    eprintln!("standby snapshot = the volume after write {k} (acked before create: {lo}, after: {hi}); {details}");
}

/// A standby that cannot take a snapshot (here: cut off from its primary, so not known to
/// hold every acknowledged write) refuses `keel snapshot create` and says to use the
/// primary; the primary's snapshot works; once the pair is in sync again the standby
/// takes them again.
#[test]
fn a_standby_cut_off_from_its_primary_refuses_and_the_primary_takes_it() {
    let _serial = CLUSTER_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let keys = Keys::new();
    let cluster = Cluster::start(&keys.options(&[("vol", "16MiB")], Network::Proxied, "")).unwrap();
    let primary = cluster.wait_in_sync("vol", Duration::from_secs(60)).unwrap();
    let standby = 1 - primary;
    let mut client = NbdClient::connect(&cluster.socket(primary), "vol").unwrap();
    client.write(0, &payload(0), false).unwrap();
    client.flush().unwrap();

    cluster.cut_link(0, 1, true).unwrap();
    // The primary completes a FLUSH alone once the witness recorded the standby Outdated.
    client.write(BLOCK, &payload(1), false).unwrap();
    client.flush().unwrap();
    keel_tests::cluster::until("the standby disconnected and Outdated", Duration::from_secs(30), || {
        let disconnected = cluster.volume_status(standby, "vol").is_ok_and(|s| s["peer"]["connected"] == false);
        let outdated = cluster.volume_status(primary, "vol").is_ok_and(|s| s["peer"]["state"] == "Outdated");
        disconnected && outdated
    })
    .unwrap();
    let refused = keel(&cluster, standby, &["snapshot", "create", "vol"]);
    assert!(!refused.status.success(), "{}", refused.describe());
    let message = refused.combined();
    assert!(
        message.contains("refused") && message.contains("not connected to the primary") && message.contains("primary"),
        "{}",
        refused.describe()
    );
    eprintln!("the standby refused: {}", message.trim());
    let details = create(&cluster, primary, "vol");
    let shown = show(&cluster, primary, details["snapshot"].as_str().unwrap());
    assert_eq!(shown["node"], cluster.nodes[primary].name.as_str(), "{shown}");

    cluster.cut_link(0, 1, false).unwrap();
    cluster.wait_in_sync("vol", Duration::from_secs(60)).unwrap();
    keel_tests::cluster::until("the standby connected again", Duration::from_secs(30), || {
        cluster.volume_status(standby, "vol").is_ok_and(|s| s["peer"]["connected"] == true && s["consistent"] == true)
    })
    .unwrap();
    let details = create(&cluster, standby, "vol");
    let shown = show(&cluster, standby, details["snapshot"].as_str().unwrap());
    assert_eq!(shown["node"], cluster.nodes[standby].name.as_str(), "{shown}");
    let image = restore(&cluster, standby, details["snapshot"].as_str().unwrap(), &cluster.dir().join("healed.raw"));
    assert!(image[..2 * BLOCK as usize] == [payload(0), payload(1)].concat(), "the standby's snapshot lacks a write");
    client.disconnect().unwrap();
}

/// With a schedule and `take_on = "standby"`, the first firing is taken on the standby
/// and the primary, after its grace, skips it: one snapshot per firing. (Takes up to two
/// minutes: one for the firing, one for the grace.)
#[test]
fn a_scheduled_snapshot_is_taken_once_on_the_standby() {
    let _serial = CLUSTER_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let keys = Keys::new();
    let options =
        keys.options(&[("vol", "16MiB")], Network::Loopback, "schedule = \"every 1m\"\ntake_on = \"standby\"");
    let cluster = Cluster::start(&options).unwrap();
    let primary = cluster.wait_in_sync("vol", Duration::from_secs(60)).unwrap();
    let standby = 1 - primary;
    let skipped =
        cluster.wait_event(primary, "snapshot_skipped", |e| e["volume"] == "vol", Duration::from_secs(200)).unwrap();
    let marker = skipped["fields"]["marker"].as_str().unwrap().to_owned();
    assert!(marker.starts_with("scheduled-"), "{skipped}");
    let listed = |node: usize| -> Vec<Value> {
        let out = keel(&cluster, node, &["snapshot", "list", "vol", "--json"]);
        assert!(out.status.success(), "{}", out.describe());
        json(&out)["snapshots"].as_array().cloned().unwrap_or_default()
    };
    let on_standby: Vec<Value> = listed(standby).into_iter().filter(|s| s["marker"] == marker.as_str()).collect();
    assert_eq!(on_standby.len(), 1, "the standby took {marker} once: {on_standby:?}");
    let on_primary: Vec<Value> = listed(primary).into_iter().filter(|s| s["marker"] == marker.as_str()).collect();
    assert!(on_primary.is_empty(), "the primary took {marker} too: {on_primary:?}");
}

/// Latency percentiles of `samples` (sorted here).
fn percentiles(samples: &mut [Duration]) -> String {
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize];
    format!(
        "n={} p50={:?} p99={:?} p99.9={:?} max={:?}",
        samples.len(),
        at(0.5),
        at(0.99),
        at(0.999),
        samples[samples.len() - 1]
    )
}

/// Write+flush latencies of 4 KiB writes on the primary while `during` runs (or for
/// `duration` when it is `None`).
fn measure(
    client: &mut NbdClient,
    rng: &mut impl Rng,
    blocks: u64,
    during: Option<std::thread::JoinHandle<Value>>,
    duration: Duration,
) -> (Vec<Duration>, Option<Value>) {
    let mut samples = Vec::new();
    let mut data = vec![0u8; BLOCK as usize];
    let started = Instant::now();
    loop {
        let done = match &during {
            Some(handle) => handle.is_finished(),
            None => started.elapsed() >= duration,
        };
        if done {
            break;
        }
        rng.fill_bytes(&mut data);
        let t = Instant::now();
        client.write(rng.gen_range(0..blocks) * BLOCK, &data, false).unwrap();
        client.flush().unwrap();
        samples.push(t.elapsed());
    }
    (samples, during.map(|h| h.join().unwrap()))
}

/// Pins every thread of process `pid` (and the threads it starts later) to `cpu`.
fn pin_process(pid: u32, cpu: usize) {
    let mut cmd = Command::new("taskset");
    cmd.args(["-a", "-cp", &cpu.to_string(), &pid.to_string()]);
    run_ok(&mut cmd, TIMEOUT).unwrap();
}

/// Pins the calling thread (and the processes it starts) to `cpu`.
fn pin_this_thread(cpu: usize) {
    // SAFETY: `set` is a plain bitmask owned by this frame; sched_setaffinity(0, ...) only
    // reads it and applies to the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set), 0, "sched_setaffinity");
    }
}

/// Not a timed assertion: prints the primary's 4 KiB write+flush latency undisturbed,
/// during a full snapshot on the standby, and during one on the primary. Three rounds, one
/// fresh volume of random data each (so every snapshot reads all of it), the three
/// conditions in a rotated order each round (so drifting machine load biases none).
///
/// On one machine the two nodes share its disk, so the snapshot's writes (chunks, copies
/// of overwritten regions) slow every fdatasync of both. `TMPDIR=/dev/shm` puts the whole
/// deployment in memory, leaving the CPU and the replication path;
/// `KEEL_MEASURE_REPO=DIR` puts only the repos under `DIR` (`repo-0`, `repo-1`);
/// `KEEL_MEASURE_READ_LIMIT=64MiB` sets `[snapshots] read_limit` on both nodes,
/// `KEEL_MEASURE_BUSY_READ_LIMIT=unlimited` their `busy_read_limit`, and
/// `KEEL_MEASURE_CPU_PRIORITY=normal` their `cpu_priority`.
#[test]
#[ignore = "a measurement, not a check: run it on a quiet machine with --ignored --nocapture"]
fn measure_primary_write_latency_during_a_standby_snapshot() {
    let _serial = CLUSTER_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    const ROUNDS: usize = 3;
    const BASELINE: Duration = Duration::from_secs(4);
    let keys = Keys::new();
    let size = 128 * MIB;
    let names: Vec<String> = (0..ROUNDS).map(|r| format!("m{r}")).collect();
    let volumes: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "128MiB")).collect();
    let mut extra =
        std::env::var("KEEL_MEASURE_REPO").map(|d| format!("repo = \"{d}/repo-{{node}}\"\n")).unwrap_or_default();
    if let Ok(limit) = std::env::var("KEEL_MEASURE_READ_LIMIT") {
        extra.push_str(&format!("read_limit = \"{limit}\"\n"));
    }
    if let Ok(limit) = std::env::var("KEEL_MEASURE_BUSY_READ_LIMIT") {
        extra.push_str(&format!("busy_read_limit = \"{limit}\"\n"));
    }
    if let Ok(priority) = std::env::var("KEEL_MEASURE_CPU_PRIORITY") {
        extra.push_str(&format!("cpu_priority = \"{priority}\"\n"));
    }
    let cluster = Arc::new(Cluster::start(&keys.options(&volumes, Network::Loopback, &extra)).unwrap());
    let primary = cluster.wait_in_sync(&names[0], Duration::from_secs(60)).unwrap();
    let standby = 1 - primary;
    // Two machines on one: the primary and this client on one core, the standby and the
    // witness on the other (other processes still float over both).
    let pinned = std::thread::available_parallelism().is_ok_and(|n| n.get() >= 2);
    if pinned {
        pin_process(cluster.nodes[primary].pid().unwrap(), 0);
        pin_process(cluster.nodes[standby].pid().unwrap(), 1);
        pin_process(cluster.witness.pid().unwrap(), 1);
        pin_this_thread(0);
    }
    let (mut rng, _) = seeded("measure_primary_write_latency_during_a_standby_snapshot");
    let blocks = size / BLOCK;
    let snapshot = |node: usize, volume: &str| {
        let (cluster, volume) = (Arc::clone(&cluster), volume.to_owned());
        std::thread::spawn(move || {
            let started = Instant::now();
            let mut details = create(&cluster, node, &volume);
            details["wall_seconds"] = started.elapsed().as_secs_f64().into();
            details
        })
    };
    // [no snapshot, standby snapshot, primary snapshot]
    let mut pooled: [Vec<Duration>; 3] = Default::default();
    let labels = ["no snapshot", "during a standby snapshot", "during a primary snapshot"];
    for (round, volume) in names.iter().enumerate() {
        let mut client = NbdClient::connect(&cluster.socket(primary), volume).unwrap();
        let mut block = vec![0u8; MIB as usize];
        for i in 0..size / MIB {
            rng.fill_bytes(&mut block);
            client.write(i * MIB, &block, false).unwrap();
        }
        client.flush().unwrap();
        measure(&mut client, &mut rng, blocks, None, Duration::from_secs(1));
        for condition in (0..3).map(|c| (c + round) % 3) {
            let (mut samples, details) = match condition {
                0 => measure(&mut client, &mut rng, blocks, None, BASELINE),
                1 => measure(&mut client, &mut rng, blocks, Some(snapshot(standby, volume)), TIMEOUT),
                _ => measure(&mut client, &mut rng, blocks, Some(snapshot(primary, volume)), TIMEOUT),
            };
            let about = details.map_or(String::new(), |d| {
                assert!(d["full_read"].is_string(), "a full read: {d}");
                format!(
                    " ({:.1} s, {} MiB read)",
                    d["wall_seconds"].as_f64().unwrap_or_default(),
                    d["bytes_read"].as_u64().unwrap_or_default() / MIB
                )
            });
            pooled[condition].extend_from_slice(&samples);
            eprintln!("round {round}, {:<26} {}{about}", labels[condition], percentiles(&mut samples));
        }
        client.disconnect().unwrap();
    }
    eprintln!(
        "primary 4 KiB write+flush latency, {ROUNDS} rounds of a {} MiB volume of random data{}:",
        size / MIB,
        if pinned { " (primary + client on CPU 0, standby + witness on CPU 1)" } else { "" }
    );
    for (label, samples) in labels.iter().zip(pooled.iter_mut()) {
        eprintln!("  {label:<26} {}", percentiles(samples));
    }
}

/// The primary dies just before a firing of `take_on = "standby"`, while the witness is
/// down, so the standby cannot take it (its marker request finds no answer, or it already
/// lost the link) and is promoted only after the firing, when the witness is back. Once
/// promoted it takes that firing, under the firing's name, once (the schedule ledger keeps
/// a firing owed while the primary is not connected; without it the firing was missed).
/// Takes up to four minutes: up to one for the firing, 30 s for the request to time out,
/// one tick.
#[test]
fn a_firing_the_dead_primary_missed_is_taken_by_the_promoted_standby() {
    let _serial = CLUSTER_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let keys = Keys::new();
    let options =
        keys.options(&[("vol", "16MiB")], Network::Loopback, "schedule = \"every 1m\"\ntake_on = \"standby\"");
    let mut cluster = Cluster::start(&options).unwrap();
    let primary = cluster.wait_in_sync("vol", Duration::from_secs(60)).unwrap();
    let standby = 1 - primary;
    let now = keel_snapshot::lease::now_unix;
    let firing = (now() + 5) / 60 * 60 + 60;
    keel_tests::cluster::until("two seconds before the firing", Duration::from_secs(90), || now() >= firing - 2)
        .unwrap();
    cluster.witness_down();
    cluster.nodes[primary].kill9();
    keel_tests::cluster::until("the firing", Duration::from_secs(10), || now() > firing).unwrap();
    cluster.witness_up().unwrap();
    cluster.wait_primary(standby, "vol", Duration::from_secs(90)).unwrap();
    let marker = format!("scheduled-{}", keel_snapshot::create::utc_compact(firing));
    let taken = || -> Vec<Value> {
        let out = keel(&cluster, standby, &["snapshot", "list", "vol", "--json"]);
        assert!(out.status.success(), "{}", out.describe());
        let rows = json(&out)["snapshots"].as_array().cloned().unwrap_or_default();
        rows.into_iter().filter(|s| s["marker"] == marker.as_str()).collect()
    };
    keel_tests::cluster::until(&format!("the promoted standby takes {marker}"), Duration::from_secs(240), || {
        !taken().is_empty()
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", cluster.describe()));
    let rows = taken();
    assert_eq!(rows.len(), 1, "{marker} taken once: {rows:?}");
}

/// With `take_on = "primary"` the primary takes each firing; its standby settles the
/// firing in its schedule ledger once the primary's marker of it arrives (so a later
/// promotion does not take it again), and takes nothing itself. Takes up to two minutes.
#[test]
fn a_standby_settles_a_firing_when_the_primarys_marker_arrives() {
    let _serial = CLUSTER_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let keys = Keys::new();
    let options =
        keys.options(&[("vol", "16MiB")], Network::Loopback, "schedule = \"every 1m\"\ntake_on = \"primary\"");
    let cluster = Cluster::start(&options).unwrap();
    let primary = cluster.wait_in_sync("vol", Duration::from_secs(60)).unwrap();
    let standby = 1 - primary;
    let scheduled = |node: usize| -> Vec<Value> {
        let out = keel(&cluster, node, &["snapshot", "list", "vol", "--json"]);
        assert!(out.status.success(), "{}", out.describe());
        let rows = json(&out)["snapshots"].as_array().cloned().unwrap_or_default();
        rows.into_iter().filter(|s| s["marker"].as_str().is_some_and(|m| m.starts_with("scheduled-"))).collect()
    };
    keel_tests::cluster::until("the primary's scheduled snapshot", Duration::from_secs(150), || {
        !scheduled(primary).is_empty()
    })
    .unwrap();
    let taken = scheduled(primary);
    // `every 1m` in UTC: the firing is the minute the snapshot's marker was appended in.
    let firing = taken[0]["time"].as_i64().unwrap() / 60 * 60;
    let ledger = cluster.nodes[standby].dir.join("data").join("schedule.ledger");
    // The latest firing settled for the volume (a later one may already have replaced it).
    let settled = || -> Option<i64> {
        let text = std::fs::read_to_string(&ledger).ok()?;
        text.lines().find_map(|line| line.strip_prefix("volume ")?.strip_suffix(" vol")?.parse().ok())
    };
    keel_tests::cluster::until("the standby's ledger settles the firing", Duration::from_secs(90), || {
        settled().is_some_and(|fired| fired >= firing)
    })
    .unwrap_or_else(|e| panic!("{e}: {:?}", std::fs::read_to_string(&ledger)));
    assert!(scheduled(standby).is_empty(), "the standby took a scheduled snapshot: {:?}", scheduled(standby));
}
