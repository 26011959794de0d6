//! The snapshot issue's acceptance, end to end in one deployment: a replicated pair with a
//! witness holds a customer's PostgreSQL database (ext4 on a Keel volume) under pgbench;
//! the schedule takes its snapshots on the standby; each lands in two vaults in "other data
//! centers", a `keel vault` over QUIC with mutual TLS and a real Garage over S3; retention
//! (keep the last one) and GC keep the repo and both vaults in shape; verify finds a chunk
//! damaged in the Keel vault and heals it from Garage; and the customer's download (an
//! export from Garage, taken on the other node) restores, without Keel, to a working
//! database: PostgreSQL recovers and starts on it, the data is all there, `pg_amcheck`
//! and `pg_checksums --check` pass, and `e2fsck -fn` finds the filesystem clean.
//!
//! Takes about three minutes: it waits, on the clock, for two firings of `every 1m`.

use std::os::unix::fs::FileExt as _;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use keel_snapshot::maintain;
use keel_snapshot::vault::{keys, LocalVault};
use keel_tests::cluster::{free_udp_addr, Cluster, Network, NODES};
use keel_tests::cmd::{run_ok, wait_for};
use keel_tests::garage::Garage;
use keel_tests::mount::{machine_lock, unavailable, LoopDevice, Mount};
use keel_tests::vault_server::{VaultProcess, VaultTls};
use serde_json::Value;

use crate::failover::CLUSTER_LOCK;
use crate::postgres::{chmod, PgUser, PG_BIN, STEP_TIMEOUT};
use crate::snapshot_postgres::{check_restored, history, LiveDatabase, SCALE};
use crate::snapshot_standby::{json, keel, Keys};

/// The Keel vault's certificate name.
const VAULT: &str = "vault-dc2";
const SIZE: u64 = 512 << 20;
/// Two firings of `every 1m`, the standby's snapshot and its copies.
const FIRINGS: Duration = Duration::from_secs(300);

#[test]
fn scheduled_snapshots_of_a_replicated_database_live_in_two_vaults_and_restore_to_a_working_database() {
    const TEST: &str =
        "scheduled_snapshots_of_a_replicated_database_live_in_two_vaults_and_restore_to_a_working_database";
    let _serial = CLUSTER_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(reason) = unavailable() {
        println!("SKIPPED: {TEST}: {reason}");
        return;
    }
    let Some(garage_binary) = keel_tests::garage::binary_or_skip(TEST) else { return };
    assert!(Path::new(PG_BIN).join("postgres").exists(), "PostgreSQL 15 is missing; tests/run installs it");
    let _mounts = machine_lock().unwrap();
    let pg = PgUser::lookup().unwrap();
    let work = tempfile::Builder::new().prefix("keel-acceptance-").tempdir().unwrap();
    chmod(work.path(), 0o755);
    let dir = |name: &str| {
        let dir = work.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        chmod(&dir, 0o755);
        dir
    };

    // --- the deployment ------------------------------------------------------------------
    let garage = Garage::start_with(&garage_binary, &dir("garage")).unwrap();
    let vault_addr = free_udp_addr();
    let extra = format!(
        r#"schedule = "every 1m"
take_on = "standby"

[snapshots.retention]
keep_last = 1

[[snapshots.vault]]
kind = "keel"
name = "dc2"
address = "{vault_addr}"
server = "{VAULT}"

{}"#,
        garage.vault_section("dc3")
    );
    let keys = Keys::new();
    let options = keys.options_with(&[("db", "512MiB")], Network::Loopback, "min_copies = 2\nthreads = 2", &extra);
    let cluster = Cluster::start(&options).unwrap();
    let primary = cluster.wait_in_sync("db", Duration::from_secs(60)).unwrap();
    let standby = 1 - primary;
    // The Keel vault serves tenant acme to both nodes, with a certificate from their CA.
    let ca = cluster.dir().join("ca");
    let mut issue = Command::new(keel_tests::daemon::workspace_bin("keel"));
    run_ok(issue.args(["cert", "issue", VAULT, "--dir"]).arg(&ca), STEP_TIMEOUT).unwrap();
    let tls = VaultTls {
        ca_cert: ca.join("ca.pem"),
        cert: ca.join(format!("{VAULT}.pem")),
        key: ca.join(format!("{VAULT}.key")),
    };
    let vault = VaultProcess::start(&dir("vault"), Some(vault_addr), tls, &[("acme", &NODES)]).unwrap();

    // --- the customer's database on the primary, under load --------------------------------
    let uri = format!("nbd+unix:///db?socket={}", cluster.socket(primary).display());
    let mut live = LiveDatabase::start(&pg, work.path(), &dir("live"), &uri, SIZE, SCALE);
    live.pgbench(&["-c", "2", "-j", "2", "-T", "900", "-n"]);
    wait_for("pgbench to commit", STEP_TIMEOUT, || Ok((history(&live.db) > 100).then_some(()))).unwrap();
    let committed_before = history(&live.db);
    let mark = cluster.event_mark(standby);

    // --- two scheduled snapshots on the standby, copied, the older one retired -------------
    let mut taken: Vec<Value> = Vec::new();
    while taken.len() < 2 {
        let event = cluster
            .wait_event_since(
                standby,
                mark,
                "snapshot",
                |e| e["volume"] == "db" && !taken.iter().any(|t| t["fields"]["snapshot"] == e["fields"]["snapshot"]),
                FIRINGS,
            )
            .unwrap();
        assert_eq!(event["fields"]["ok"], true, "a scheduled snapshot failed: {event}\n{}", cluster.describe());
        taken.push(event);
    }
    let second_seq = taken[1]["seq"].as_u64().unwrap();
    let taken: Vec<Value> = taken.into_iter().map(|e| e["fields"].clone()).collect();
    let newest = taken[1]["snapshot"].as_str().unwrap().to_owned();
    // The second snapshot's retention events come once GC has run in every vault.
    let gc_deleted = |vault: &str| -> Option<u64> {
        let prefix = format!("vault {vault}: gc deleted ");
        let events = cluster.events_since(standby, mark);
        let after_second = events.iter().filter(|e| e["seq"].as_u64() > Some(second_seq));
        after_second.filter(|e| e["kind"] == "snapshot_retention").find_map(|e| {
            e["fields"]["message"].as_str()?.strip_prefix(&prefix)?.split(' ').next()?.parse::<u64>().ok()
        })
    };
    let deleted = wait_for("GC in both vaults", FIRINGS, || Ok(gc_deleted("dc2").zip(gc_deleted("dc3")))).unwrap();
    assert!(deleted.0 > 0 && deleted.1 > 0, "GC freed the chunks only the retired snapshot used: {deleted:?}");

    // The rest works on the vaults alone, as after losing the data center: the database
    // and both nodes stop, well before the next firing could retire the newest snapshot.
    let committed_after = history(&live.db);
    live.kill_pgbench();
    live.stop();
    let mut cluster = cluster;
    for node in [standby, primary] {
        assert!(cluster.nodes[node].stop().unwrap(), "node {node} stopped cleanly:\n{}", cluster.describe());
    }
    let later =
        cluster.events(standby).into_iter().find(|e| e["kind"] == "snapshot" && e["seq"].as_u64() > Some(second_seq));
    assert!(later.is_none(), "a third firing was taken before the nodes stopped: {later:?}");

    // Retention ran in the repo and in both vaults: each holds the newest only.
    let listed = |vault: &str| -> Value {
        let out = keel(&cluster, standby, &["snapshot", "list", "--vault", vault, "--json"]);
        assert!(out.status.success(), "{}", out.describe());
        json(&out)
    };
    for vault in ["local", "dc2", "dc3"] {
        let list = listed(vault);
        let ids: Vec<&str> = list["snapshots"].as_array().unwrap().iter().map(|r| r["id"].as_str().unwrap()).collect();
        assert_eq!(ids, [newest.as_str()], "{vault} keeps the newest snapshot only: {list}");
    }
    let row = listed("local")["snapshots"][0].clone();
    assert_eq!(row["safe"], true, "two vaults hold it complete: {row}");
    assert_eq!(row["parent"], taken[0]["snapshot"], "the newest is an incremental of the first: {row}");
    for vault in ["dc2", "dc3"] {
        let copy = row["copies"].as_array().unwrap().iter().find(|c| c["vault"] == vault).cloned();
        assert_eq!(copy.map(|c| c["complete"].clone()), Some(Value::Bool(true)), "{vault}: {row}");
    }
    let on_primary = listed_on(&cluster, primary);
    assert!(on_primary.is_empty(), "the primary left the firings to its standby: {on_primary:?}");

    // --- verify heals a chunk damaged in the Keel vault from Garage -------------------------
    {
        let store = LocalVault::open("dc2", vault.data_dir(), "acme").unwrap();
        let manifest = maintain::read_manifest(&store, &keys::manifest("db", &newest), None).unwrap();
        let key = keys.key();
        let vaults: [&dyn keel_snapshot::vault::Vault; 1] = [&store];
        let chunks = keel_snapshot::manifest::ChunkMap::new(&key, &vaults, &manifest).distinct_data().unwrap();
        assert!(chunks.len() > 10, "{} chunks", chunks.len());
        let at = store.store().locate(&chunks[chunks.len() / 2]).unwrap().unwrap();
        let pack = std::fs::OpenOptions::new().read(true).write(true).open(&at.pack).unwrap();
        let mut byte = [0u8];
        pack.read_exact_at(&mut byte, at.offset + 50).unwrap();
        pack.write_all_at(&[byte[0] ^ 0x40], at.offset + 50).unwrap();
    }
    // With the primary's config, whose repo holds none of these chunks: the good copy is
    // Garage's.
    let verify = |vault: &str| -> Value {
        let out = keel(&cluster, primary, &["snapshot", "verify", "--vault", vault, "--json"]);
        assert!(out.status.success(), "{}", out.describe());
        json(&out)
    };
    let report = verify("dc2");
    assert_eq!(report["ok"], true, "{report}");
    let findings = report["findings"].as_array().unwrap();
    assert_eq!(findings.len(), 1, "{report}");
    assert_eq!(findings[0]["healed_from"], "dc3", "{report}");
    for vault in ["dc2", "dc3"] {
        let again = verify(vault);
        let clean = again["ok"] == true && again["findings"].as_array().is_some_and(Vec::is_empty);
        assert!(clean, "{vault} after the heal: {again}");
    }

    // --- the customer's download, restored without Keel -----------------------------------
    let download = work.path().join("db.raw.zst");
    let out = keel(
        &cluster,
        primary,
        &["snapshot", "export", &newest, "--vault", "dc3", "-o", download.to_str().unwrap(), "--format", "raw.zst"],
    );
    assert!(out.status.success(), "{}", out.describe());
    let image = work.path().join("db.raw");
    run_ok(Command::new("zstd").args(["-d", "-q"]).arg(&download).arg("-o").arg(&image), STEP_TIMEOUT).unwrap();
    assert_eq!(std::fs::metadata(&image).unwrap().len(), SIZE);
    let device = LoopDevice::attach(&image).unwrap();
    let restored_dir = dir("restored");
    let mount = Mount::new(device.path(), &restored_dir.join("root")).unwrap();
    let restored = check_restored(&pg, work.path(), &mount.path().join("pgdata"), &restored_dir);
    assert!(
        restored >= committed_before && restored <= committed_after,
        "history rows {restored}: at least the {committed_before} committed before the first firing, \
         at most the {committed_after} committed by the second"
    );
    mount.unmount().unwrap();
    run_ok(Command::new("e2fsck").arg("-fn").arg(device.path()), STEP_TIMEOUT).unwrap();
    device.detach().unwrap();
}

/// The snapshots in `node`'s own repo.
fn listed_on(cluster: &Cluster, node: usize) -> Vec<Value> {
    let out = keel(cluster, node, &["snapshot", "list", "--json"]);
    assert!(out.status.success(), "{}", out.describe());
    json(&out)["snapshots"].as_array().cloned().unwrap_or_default()
}
