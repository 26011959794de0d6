//! Consistency-group snapshots taken on the standby (docs/snapshots.md, "Consistency
//! groups"; docs/replication.md, "Group snapshots on the standby"): a replicated pair with
//! a witness, both volumes of the group `shop` (`db`, `files`) primary on one node, each
//! node with the same tenant key and the group in its `[snapshots]` section.
//!
//! A client on the primary writes dependent pairs (`n` to `db` with FUA, and only after
//! its acknowledgement `n` to `files`) while `keel snapshot create shop` runs on the
//! standby: the primary only appends the group's markers (one request, under both
//! journals' locks), the standby reads its own copies. Restored, every group snapshot
//! holds `files ≤ db ≤ files + 1`, both members share one id and name the standby, and
//! the primary took no snapshot.

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use keel_tests::cluster::{Cluster, ClusterOptions, Network};
use keel_tests::cmd::{run, run_ok, Output};
use keel_tests::daemon::workspace_bin;
use keel_tests::nbd_client::NbdClient;
use serde_json::Value;

use crate::failover::CLUSTER_LOCK;

const TIMEOUT: Duration = Duration::from_secs(300);
const BLOCK: usize = 4096;
const GROUP: &str = "[[snapshots.group]]\nname = \"shop\"\nvolumes = [\"files\", \"db\"]\n";

/// A tenant key made once with `keel snapshot key-init` and copied for each node (a pair
/// must share it), and the `[snapshots]` sections that use the copies (as in
/// `snapshot_standby`).
struct Keys {
    dir: tempfile::TempDir,
}

impl Keys {
    fn new() -> Self {
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

    fn options(&self, network: Network) -> ClusterOptions {
        let section = |node: usize| {
            let key = self.dir.path().join(format!("node-{node}.key"));
            format!(
                "[snapshots]\ntenant = \"acme\"\nkey_file = \"{}\"\nchunk_size = \"64K\"\nmin_copies = 0\nthreads = 1\n\n{GROUP}",
                key.display()
            )
        };
        ClusterOptions {
            volumes: vec![("db".into(), "8MiB".into()), ("files".into(), "8MiB".into())],
            node_extra: [section(0), section(1)],
            network,
            ..ClusterOptions::default()
        }
    }
}

/// Runs `keel ARGS --config CONFIG-of-node`, whatever it returns.
fn keel(cluster: &Cluster, node: usize, args: &[&str]) -> Output {
    let mut cmd = Command::new(workspace_bin("keel"));
    cmd.args(args).arg("--config").arg(&cluster.nodes[node].config);
    run(&mut cmd, TIMEOUT).unwrap()
}

fn json(out: &Output) -> Value {
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", out.describe()))
}

fn counter_block(n: u64) -> Vec<u8> {
    let mut block = vec![0u8; BLOCK];
    block[..8].copy_from_slice(&n.to_le_bytes());
    block[BLOCK - 8..].copy_from_slice(&n.to_le_bytes());
    block
}

fn counter_of(bytes: &[u8]) -> u64 {
    let head = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    let tail = u64::from_le_bytes(bytes[BLOCK - 8..BLOCK].try_into().unwrap());
    assert_eq!(head, tail, "a torn counter block");
    head
}

/// Stops the writer however the test thread leaves (a failed check too).
struct Stop(Arc<AtomicBool>);

impl Drop for Stop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

#[test]
fn group_snapshots_on_the_standby_are_one_instant_of_all_members() {
    let _serial = CLUSTER_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let keys = Keys::new();
    let cluster = Cluster::start(&keys.options(Network::Loopback)).unwrap();
    let primary = cluster.wait_in_sync("db", Duration::from_secs(60)).unwrap();
    assert_eq!(cluster.wait_in_sync("files", Duration::from_secs(60)).unwrap(), primary, "{}", cluster.describe());
    let standby = 1 - primary;

    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let writer = {
        let (socket, stop, written) = (cluster.socket(primary), Arc::clone(&stop), Arc::clone(&written));
        std::thread::spawn(move || {
            let mut db = NbdClient::connect(&socket, "db").unwrap();
            let mut files = NbdClient::connect(&socket, "files").unwrap();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                // FUA: acknowledged means durable on both nodes, and only then is the
                // next write issued.
                db.write(0, &counter_block(n), true).unwrap();
                files.write(0, &counter_block(n), true).unwrap();
                written.store(n, Ordering::Relaxed);
            }
            db.disconnect().unwrap();
            files.disconnect().unwrap();
        })
    };
    let stopper = Stop(Arc::clone(&stop));

    let mut taken = Vec::new();
    for round in 0..3 {
        // Wait on the writer's progress, not on a clock.
        let target = written.load(Ordering::Relaxed) + 20;
        keel_tests::cmd::wait_for("the writer to write more pairs", TIMEOUT, || {
            Ok((written.load(Ordering::Relaxed) >= target).then_some(()))
        })
        .unwrap();
        let out = keel(&cluster, standby, &["snapshot", "create", "shop", "--json"]);
        let answer = json(&out);
        assert_eq!(answer["result"], "done", "round {round}: {}\n{}", out.describe(), cluster.describe());
        let details = answer["details"].clone();
        assert_eq!(details["group"], "shop", "round {round}: {details}");
        let members = details["members"].as_array().unwrap();
        let volumes: Vec<&str> = members.iter().map(|m| m["volume"].as_str().unwrap()).collect();
        assert_eq!(volumes, ["db", "files"], "{details}");
        assert!(members.iter().all(|m| m["snapshot"] == details["snapshot"]), "one id for all: {details}");
        taken.push(details["snapshot"].as_str().unwrap().to_owned());
    }
    drop(stopper);
    writer.join().unwrap();

    for id in &taken {
        let mut counters = Vec::new();
        let mut marker = None;
        for volume in ["db", "files"] {
            let spec = format!("{volume}/{id}");
            let shown = json(&keel(&cluster, standby, &["snapshot", "show", &spec, "--json"]));
            assert_eq!(shown["node"], cluster.nodes[standby].name.as_str(), "taken on the standby: {shown}");
            assert_eq!(shown["group"]["members"], serde_json::json!(["db", "files"]), "{shown}");
            let name = shown["marker"].as_str().unwrap().to_owned();
            assert!(marker.as_ref().is_none_or(|m| *m == name), "one marker name for the group: {shown}");
            // The primary appended this member's marker for its standby, at this seq.
            let appended = cluster
                .wait_event(
                    primary,
                    "snapshot_marker",
                    |e| e["volume"] == volume && e["fields"]["name"] == name.as_str(),
                    Duration::from_secs(10),
                )
                .unwrap();
            assert_eq!(appended["fields"]["seq"], shown["marker_seq"], "{appended} vs {shown}");
            assert_eq!(appended["fields"]["group_lead"], "db", "{appended}");
            marker = Some(name);
            let path = cluster.dir().join(format!("{volume}-{id}.raw"));
            let out = keel(
                &cluster,
                standby,
                &["snapshot", "restore", &spec, "--vault", "local", "--to-file", path.to_str().unwrap()],
            );
            assert!(out.status.success(), "{}", out.describe());
            counters.push(counter_of(&std::fs::read(&path).unwrap()));
            std::fs::remove_file(&path).unwrap();
        }
        let (db, files) = (counters[0], counters[1]);
        eprintln!("standby group snapshot {id}: db at {db}, files at {files}");
        assert!(db >= 20 && files <= db && db <= files + 1, "snapshot {id}: db at {db}, files at {files}");
    }
    assert!(cluster.events(primary).iter().all(|e| e["kind"] != "snapshot"), "the primary took a snapshot");
}

/// A standby cut off from its primary refuses the group, naming the member and saying to
/// use the primary; the primary takes the group instead.
#[test]
fn a_standby_cut_off_refuses_the_group_and_the_primary_takes_it() {
    let _serial = CLUSTER_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let keys = Keys::new();
    let cluster = Cluster::start(&keys.options(Network::Proxied)).unwrap();
    let primary = cluster.wait_in_sync("db", Duration::from_secs(60)).unwrap();
    let standby = 1 - primary;
    cluster.cut_link(0, 1, true).unwrap();
    keel_tests::cluster::until("the standby disconnected", Duration::from_secs(30), || {
        ["db", "files"].iter().all(|v| cluster.volume_status(standby, v).is_ok_and(|s| s["peer"]["connected"] == false))
    })
    .unwrap();
    let refused = keel(&cluster, standby, &["snapshot", "create", "shop"]);
    assert!(!refused.status.success(), "{}", refused.describe());
    let message = refused.combined();
    assert!(
        message.contains("group shop") && message.contains("not connected to the primary"),
        "{}",
        refused.describe()
    );
    eprintln!("the standby refused: {}", message.trim());
    // The primary completes FUA writes alone once the witness recorded the standby
    // Outdated; it takes the group itself.
    let out = keel(&cluster, primary, &["snapshot", "create", "shop", "--json"]);
    let answer = json(&out);
    assert_eq!(answer["result"], "done", "{}\n{}", out.describe(), cluster.describe());
    assert_eq!(answer["details"]["group"], "shop", "{answer}");
}
