//! Snapshots end to end through the real binaries: `keel daemon` with a `[snapshots]`
//! section and two directory vaults, `keel snapshot create|list|show|diff|restore|export|
//! import|verify|forget|gc`, written and read with our NBD client.
//!
//! - A chain of incrementals with random writes, zeroes and trims in between restores
//!   bit-exact, from the repo and from each vault; each incremental reads only the chunks
//!   that changed.
//! - A snapshot taken while a writer keeps writing is exactly the volume after some prefix
//!   of the writes (the frozen view is consistent), and includes every write acknowledged
//!   before `create` was called.
//! - Export → import round trip; corruption healed by verify from a vault; retention and GC.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use keel_tests::cmd::{run, run_ok, sha256, sha256_file, Output};
use keel_tests::daemon::{workspace_bin, Daemon};
use keel_tests::nbd_client::NbdClient;
use keel_tests::prefix::{consistent_prefix, payload, BLOCK};
use rand::{Rng, RngCore, SeedableRng};
use serde_json::Value;

const MIB: u64 = 1 << 20;
const TIMEOUT: Duration = Duration::from_secs(300);
const CHUNK: u64 = 64 << 10;

fn seeded(test: &str) -> rand::rngs::StdRng {
    let seed = std::env::var("KEEL_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random::<u64>);
    eprintln!("{test}: KEEL_TEST_SEED={seed}");
    rand::rngs::StdRng::seed_from_u64(seed)
}

/// A node with a `[snapshots]` section, two directory vaults and a tenant key.
pub(crate) fn node(volumes: &[(&str, &str)], retention: &str) -> Daemon {
    let extra = format!(
        r#"[snapshots]
tenant = "acme"
chunk_size = "64K"
min_copies = 2
threads = 2
{retention}
[[snapshots.vault]]
kind = "dir"
name = "dc2"
path = "{{dir}}/vault-dc2"

[[snapshots.vault]]
kind = "dir"
name = "dc3"
path = "{{dir}}/vault-dc3"
"#
    );
    let mut daemon = Daemon::configure(volumes, "posix", &extra).unwrap();
    keel(&daemon, &["snapshot", "key-init"]);
    daemon.restart().unwrap();
    daemon
}

/// Runs `keel ARGS --config CONFIG`, which must succeed.
pub(crate) fn keel(daemon: &Daemon, args: &[&str]) -> Output {
    let mut cmd = Command::new(workspace_bin("keel"));
    cmd.args(args).arg("--config").arg(daemon.config());
    run_ok(&mut cmd, TIMEOUT).unwrap()
}

/// Runs `keel ARGS --config CONFIG`, whatever it returns.
fn keel_any(daemon: &Daemon, args: &[&str]) -> Output {
    let mut cmd = Command::new(workspace_bin("keel"));
    cmd.args(args).arg("--config").arg(daemon.config());
    run(&mut cmd, TIMEOUT).unwrap()
}

pub(crate) fn json(out: &Output) -> Value {
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", out.describe()))
}

/// Takes a snapshot through the daemon; returns its details.
pub(crate) fn create(daemon: &Daemon, volume: &str) -> Value {
    let out = keel(daemon, &["snapshot", "create", volume, "--json"]);
    let answer = json(&out);
    assert_eq!(answer["result"], "done", "{}", out.describe());
    answer["details"].clone()
}

fn read_all(daemon: &Daemon, volume: &str) -> Vec<u8> {
    let mut client = NbdClient::connect(&daemon.socket(), volume).unwrap();
    let mut data = vec![0u8; client.size() as usize];
    for (i, piece) in data.chunks_mut(4 * MIB as usize).enumerate() {
        client.read(i as u64 * 4 * MIB, piece).unwrap();
    }
    client.disconnect().unwrap();
    data
}

fn restore_to_file(daemon: &Daemon, snapshot: &str, vault: &str, name: &str) -> PathBuf {
    let path = daemon.dir().join(name);
    keel(daemon, &["snapshot", "restore", snapshot, "--vault", vault, "--to-file", path.to_str().unwrap()]);
    path
}

/// Random 8 KiB page writes, zeroes and trims, like a database between two snapshots.
/// Returns the 64 KiB regions touched.
fn churn(client: &mut NbdClient, rng: &mut impl Rng, size: u64, ops: usize) -> std::collections::BTreeSet<u64> {
    let mut touched = std::collections::BTreeSet::new();
    for _ in 0..ops {
        let page = rng.gen_range(0..size / 8192) * 8192;
        match rng.gen_range(0..10) {
            0 => {
                let len = 8192 * rng.gen_range(1..16u64).min((size - page) / 8192);
                client.write_zeroes(page, len as u32).unwrap();
                touched.extend(page / CHUNK..=(page + len - 1) / CHUNK);
            }
            1 => {
                client.trim(page, 8192).unwrap();
                touched.insert(page / CHUNK);
            }
            _ => {
                let mut data = vec![0u8; 8192];
                rng.fill_bytes(&mut data);
                client.write(page, &data, false).unwrap();
                touched.insert(page / CHUNK);
            }
        }
    }
    client.flush().unwrap();
    touched
}

#[test]
fn incremental_chain_restores_bit_exact_from_every_vault() {
    let mut rng = seeded("incremental_chain_restores_bit_exact_from_every_vault");
    let size = 48 * MIB;
    let daemon = node(&[("db", "48MiB")], "");
    let mut client = NbdClient::connect(&daemon.socket(), "db").unwrap();
    // A first image: random data in the first half, zeros elsewhere.
    let mut block = vec![0u8; MIB as usize];
    for i in 0..24 {
        rng.fill_bytes(&mut block);
        client.write(i * MIB, &block, false).unwrap();
    }
    client.flush().unwrap();
    let first = create(&daemon, "db");
    assert!(first["full_read"].is_string(), "the first snapshot reads everything: {first}");
    assert_eq!(first["chunks"], size / CHUNK);
    let mut images = vec![(first["snapshot"].as_str().unwrap().to_owned(), sha256(&read_all(&daemon, "db")).unwrap())];

    for round in 0..4 {
        let touched = churn(&mut client, &mut rng, size, 150);
        let details = create(&daemon, "db");
        assert!(details["full_read"].is_null(), "round {round}: incremental expected: {details}");
        let read = details["chunks_read"].as_u64().unwrap();
        assert!(
            read >= touched.len() as u64 && read <= touched.len() as u64 + 2,
            "round {round}: read {read} chunks for {} touched: {details}",
            touched.len()
        );
        images.push((details["snapshot"].as_str().unwrap().to_owned(), sha256(&read_all(&daemon, "db")).unwrap()));
    }
    client.disconnect().unwrap();

    // Every snapshot is in the repo and in both vaults, and counts as safe.
    let list = json(&keel(&daemon, &["snapshot", "list", "db", "--json"]));
    let rows = list["snapshots"].as_array().unwrap();
    assert_eq!(rows.len(), images.len(), "{list}");
    for row in rows {
        assert_eq!(row["safe"], true, "{row}");
        for copy in row["copies"].as_array().unwrap() {
            assert_eq!(copy["complete"], true, "{row}");
        }
    }
    // Each restores bit-exact from the repo; the newest and the oldest from each vault.
    for (i, (id, expected)) in images.iter().enumerate() {
        let path = restore_to_file(&daemon, &format!("db/{id}"), "local", &format!("r{i}.raw"));
        assert_eq!(&sha256_file(&path).unwrap(), expected, "snapshot {id} from local");
        std::fs::remove_file(path).unwrap();
    }
    for vault in ["dc2", "dc3"] {
        for (id, expected) in [images.first().unwrap(), images.last().unwrap()] {
            let path = restore_to_file(&daemon, id, vault, &format!("{vault}.raw"));
            assert_eq!(&sha256_file(&path).unwrap(), expected, "snapshot {id} from {vault}");
            std::fs::remove_file(path).unwrap();
        }
    }
    // diff between the first two names the changed ranges.
    let diff = json(&keel(&daemon, &["snapshot", "diff", &images[0].0, &images[1].0, "--json"]));
    assert!(diff["changed_bytes"].as_u64().unwrap() > 0, "{diff}");
    let show = json(&keel(&daemon, &["snapshot", "show", &images[1].0, "--json"]));
    assert_eq!(show["parent"], images[0].0.as_str(), "{show}");
}

#[test]
fn snapshot_under_concurrent_writes_is_a_consistent_prefix() {
    let size = 16 * MIB;
    let daemon = node(&[("vol", "16MiB")], "");
    let blocks = size / BLOCK;
    // The writer: write k goes to a pseudo-random block and carries k in every word, each
    // acknowledged before the next.
    let plan: Vec<u64> = {
        let mut rng = seeded("snapshot_under_concurrent_writes_is_a_consistent_prefix");
        (0..200_000).map(|_| rng.gen_range(0..blocks)).collect()
    };
    let acked = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (socket, plan, acked, stop) = (daemon.socket(), plan.clone(), Arc::clone(&acked), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut client = NbdClient::connect(&socket, "vol").unwrap();
            for (k, block) in plan.iter().enumerate() {
                if stop.load(Ordering::Acquire) {
                    break;
                }
                client.write(block * BLOCK, &payload(k), false).unwrap();
                acked.store(k + 1, Ordering::Release);
            }
            client.disconnect().unwrap();
        })
    };
    keel_tests::cmd::wait_for("the writer to start", TIMEOUT, || {
        Ok((acked.load(Ordering::Acquire) > 1000).then_some(()))
    })
    .unwrap();
    let lo = acked.load(Ordering::Acquire);
    let details = create(&daemon, "vol");
    let hi = acked.load(Ordering::Acquire) + 1; // the write in flight may be in it
    stop.store(true, Ordering::Release);
    writer.join().unwrap();
    let restored =
        std::fs::read(restore_to_file(&daemon, details["snapshot"].as_str().unwrap(), "local", "s.raw")).unwrap();
    let k = consistent_prefix(&restored, &plan, lo, hi).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("snapshot = the volume after write {k} (acked before create: {lo}, after: {hi}); {details}");
}

#[test]
fn export_import_verify_heal_retention_and_gc() {
    let mut rng = seeded("export_import_verify_heal_retention_and_gc");
    let daemon = node(&[("fs", "32MiB")], "[snapshots.retention]\nkeep_last = 2\n");
    let mut client = NbdClient::connect(&daemon.socket(), "fs").unwrap();
    let mut ids = Vec::new();
    for _ in 0..3 {
        churn(&mut client, &mut rng, 32 * MIB, 200);
        ids.push(create(&daemon, "fs")["snapshot"].as_str().unwrap().to_owned());
    }
    client.disconnect().unwrap();
    let expected = read_all(&daemon, "fs");
    // Retention (keep_last = 2) ran after each snapshot, in the repo and both vaults.
    for vault in ["local", "dc2", "dc3"] {
        let list = json(&keel(&daemon, &["snapshot", "list", "--vault", vault, "--json"]));
        let listed: Vec<&str> =
            list["snapshots"].as_array().unwrap().iter().map(|r| r["id"].as_str().unwrap()).collect();
        assert_eq!(listed, [ids[1].as_str(), ids[2].as_str()], "{vault}: {list}");
    }
    let dry = keel(&daemon, &["snapshot", "forget", "--policy", "fs", "--dry-run"]).combined();
    assert!(dry.contains("keep") && dry.contains("would remove 0 of 2"), "{dry}");

    // Export as raw.zst, import as a new volume, serve it: same bytes.
    let export = daemon.dir().join("fs.raw.zst");
    keel(&daemon, &["snapshot", "export", &ids[2], "-o", export.to_str().unwrap(), "--format", "raw.zst"]);
    assert!(std::fs::metadata(&export).unwrap().len() < 32 * MIB);
    keel(&daemon, &["snapshot", "import", export.to_str().unwrap(), "--volume", "fs-copy"]);
    let mut daemon = daemon;
    daemon.stop().unwrap();
    daemon.restart().unwrap();
    assert!(read_all(&daemon, "fs-copy") == expected, "imported volume differs");
    let raw = daemon.dir().join("fs.raw");
    keel(&daemon, &["snapshot", "export", &ids[2], "-o", raw.to_str().unwrap(), "--format", "raw"]);
    assert!(std::fs::read(&raw).unwrap() == expected, "raw export differs");

    // Damage the repo: flip a byte in one chunk, delete another, both used by the newest
    // snapshot (verify checks the chunks snapshots reference; the forgotten snapshot's own
    // chunks wait for GC). Verify names and heals them.
    {
        use keel_snapshot::maintain;
        use std::os::unix::fs::FileExt;
        let repo = keel_snapshot::vault::LocalVault::open("local", daemon.dir().join("data/repo"), "acme").unwrap();
        let newest =
            maintain::read_manifest(&repo, &keel_snapshot::vault::keys::manifest("fs", &ids[2]), None).unwrap();
        let key = keel_snapshot::keyfile::load_key_file(&daemon.dir().join("data/tenant.key"), None).unwrap();
        let vaults: [&dyn keel_snapshot::vault::Vault; 1] = [&repo];
        let chunks = keel_snapshot::manifest::ChunkMap::new(&key, &vaults, &newest).distinct_data().unwrap();
        assert!(chunks.len() > 10);
        let at = repo.store().locate(&chunks[3]).unwrap().unwrap();
        let pack = std::fs::OpenOptions::new().read(true).write(true).open(&at.pack).unwrap();
        let mut byte = [0u8];
        pack.read_exact_at(&mut byte, at.offset + 50).unwrap();
        pack.write_all_at(&[byte[0] ^ 0x40], at.offset + 50).unwrap();
        assert!(repo.store().remove(&chunks[7]).unwrap());
    }
    let bad = keel_any(&daemon, &["snapshot", "verify", "--vault", "dc2"]);
    assert!(bad.status.success(), "dc2 is intact: {}", bad.describe());
    let healed = keel(&daemon, &["snapshot", "verify", "--json"]);
    let report = json(&healed);
    assert_eq!(report["ok"], true, "{report}");
    let findings = report["findings"].as_array().unwrap();
    assert_eq!(findings.len(), 2, "{report}");
    assert!(findings.iter().any(|f| f["problem"] == "missing"), "{report}");
    assert!(findings.iter().all(|f| f["healed_from"].is_string()), "{report}");
    let again = json(&keel(&daemon, &["snapshot", "verify", "--json"]));
    assert!(again["findings"].as_array().unwrap().is_empty(), "{again}");

    // Forget one snapshot; GC frees its chunks and the other still restores. GC keeps
    // chunks written in or after the second it starts (an upload may still need them), so
    // it starts once the clock has left the second of the last write above.
    let written = keel_snapshot::lease::now_unix();
    keel(&daemon, &["snapshot", "forget", &ids[1]]);
    keel_tests::cluster::until("the clock to pass the last write's second", Duration::from_secs(5), || {
        keel_snapshot::lease::now_unix() > written
    })
    .unwrap();
    let gc = json(&keel(&daemon, &["snapshot", "gc", "--json"]));
    assert!(gc["deleted"].as_u64().unwrap() > 0, "{gc}");
    let path = restore_to_file(&daemon, &ids[2], "local", "after-gc.raw");
    assert!(std::fs::read(path).unwrap() == expected, "restore after gc differs");
}

#[test]
fn wrong_key_and_missing_key_are_clear_errors() {
    let daemon = node(&[("v", "8MiB")], "");
    create(&daemon, "v");
    // Replace the key: every manifest is refused as written with another key.
    let key = daemon.dir().join("data/tenant.key");
    std::fs::remove_file(&key).unwrap();
    keel(&daemon, &["snapshot", "key-init"]);
    let out = keel(&daemon, &["snapshot", "list", "--json"]);
    let corrupt = json(&out)["corrupt"].to_string();
    assert!(corrupt.contains("another key") || corrupt.contains("not with this key"), "{}", out.describe());
    std::fs::remove_file(&key).unwrap();
    let out = keel_any(&daemon, &["snapshot", "list"]);
    assert!(!out.status.success() && out.combined().contains("key-init"), "{}", out.describe());
}

/// A node whose vaults are a real Garage (S3) and a directory: snapshots land in both; with
/// Garage down a snapshot is taken anyway, its Garage copy is delayed (not safe yet, and
/// retention keeps it in the repo), and it catches up once Garage is back.
#[test]
fn garage_vault_down_during_a_copy_delays_it_and_catches_up() {
    let Some(binary) = keel_tests::garage::binary_or_skip("garage_vault_down_during_a_copy_delays_it_and_catches_up")
    else {
        return;
    };
    let garage_dir = tempfile::tempdir().unwrap();
    let mut garage = keel_tests::garage::Garage::start_with(&binary, garage_dir.path()).unwrap();
    let extra = format!(
        r#"[snapshots]
tenant = "acme"
chunk_size = "64K"
min_copies = 2
threads = 2

[snapshots.retention]
keep_last = 1

{}
[[snapshots.vault]]
kind = "dir"
name = "dc3"
path = "{{dir}}/vault-dc3"
"#,
        garage.vault_section("garage")
    );
    let mut daemon = Daemon::configure(&[("db", "16MiB")], "posix", &extra).unwrap();
    keel(&daemon, &["snapshot", "key-init"]);
    daemon.restart().unwrap();
    let mut rng = seeded("garage_vault_down_during_a_copy_delays_it_and_catches_up");
    let mut client = NbdClient::connect(&daemon.socket(), "db").unwrap();
    churn(&mut client, &mut rng, 16 * MIB, 300);
    let first = create(&daemon, "db")["snapshot"].as_str().unwrap().to_owned();
    let list = json(&keel(&daemon, &["snapshot", "list", "--json"]));
    assert_eq!(list["snapshots"][0]["safe"], true, "{list}");

    // Garage goes down; the next snapshot is taken and copied to dc3 only.
    garage.stop().unwrap();
    churn(&mut client, &mut rng, 16 * MIB, 300);
    let details = create(&daemon, "db");
    let second = details["snapshot"].as_str().unwrap().to_owned();
    let copies = details["copies"].to_string();
    assert!(copies.contains("garage: delayed"), "{details}");
    let list = json(&keel(&daemon, &["snapshot", "list", "--json"]));
    // Not safe yet: one vault of the two holds it. Retention keeps it in the repo.
    let row = list["snapshots"].as_array().unwrap().iter().find(|r| r["id"] == second.as_str()).cloned();
    let row = row.unwrap_or_else(|| panic!("the unsafe snapshot was removed from the repo: {list}"));
    assert_eq!(row["safe"], false, "{list}");
    let out = keel_any(&daemon, &["snapshot", "copy"]);
    assert!(!out.status.success() && out.combined().contains("delayed"), "{}", out.describe());

    // Back up: the copy completes, the snapshot is safe, and it restores from Garage.
    garage.restart().unwrap();
    keel(&daemon, &["snapshot", "copy"]);
    let list = json(&keel(&daemon, &["snapshot", "list", "--json"]));
    let row = list["snapshots"].as_array().unwrap().iter().find(|r| r["id"] == second.as_str()).unwrap().clone();
    assert_eq!(row["safe"], true, "{list}");
    client.flush().unwrap();
    client.disconnect().unwrap();
    let expected = sha256(&read_all(&daemon, "db")).unwrap();
    let path = restore_to_file(&daemon, &second, "garage", "from-garage.raw");
    assert_eq!(sha256_file(&path).unwrap(), expected);
    let garage_list = json(&keel(&daemon, &["snapshot", "list", "--vault", "garage", "--json"]));
    assert!(garage_list.to_string().contains(&first), "{garage_list}");
}

/// A firing that passes while the daemon is down is taken when it starts again: one
/// catch-up named after that firing, rather than nothing until the next one (the schedule
/// ledger, tools `snapshot/catchup.rs`). Takes a minute or two: it waits, on the clock, for
/// a firing of `every 1m` to pass while the daemon is stopped.
#[test]
fn a_firing_missed_while_the_daemon_was_down_is_taken_at_start() {
    let mut daemon = node(&[("db", "16MiB")], "schedule = \"every 1m\"\n");
    // The scheduler writes its ledger once it runs, after the daemon serves NBD.
    let ledger = daemon.dir().join("data").join("schedule.ledger");
    keel_tests::cluster::until("the schedule ledger", Duration::from_secs(30), || ledger.exists()).unwrap();
    assert!(daemon.stop().unwrap(), "a clean shutdown:\n{}", daemon.log());
    let now = keel_snapshot::lease::now_unix;
    let missed = (now() / 60 + 1) * 60;
    keel_tests::cluster::until("a firing to pass while the daemon is down", Duration::from_secs(120), || {
        now() >= missed
    })
    .unwrap();
    let before = now();
    daemon.restart().unwrap();
    let after = now();
    let scheduled = || -> Vec<Value> {
        let list = json(&keel(&daemon, &["snapshot", "list", "--json"]));
        let rows = list["snapshots"].as_array().cloned().unwrap_or_default();
        rows.into_iter().filter(|s| s["marker"].as_str().is_some_and(|m| m.starts_with("scheduled-"))).collect()
    };
    keel_tests::cluster::until("the catch-up snapshot", Duration::from_secs(180), || !scheduled().is_empty()).unwrap();
    // The firing owed at the restart (the latest at or before it), not the next one.
    let owed: Vec<String> = [before, after]
        .iter()
        .map(|t| format!("scheduled-{}", keel_snapshot::create::utc_compact(t / 60 * 60)))
        .collect();
    let first = scheduled().into_iter().min_by_key(|s| s["time"].as_i64()).unwrap();
    assert!(
        owed.iter().any(|m| first["marker"] == m.as_str()),
        "the first scheduled snapshot after the restart is {first}, not the missed firing {owed:?}:\n{}",
        daemon.log()
    );
}
