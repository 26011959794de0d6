//! A snapshot served read-only over NBD by the real `keel snapshot serve` (the real
//! `NbdServer` over `SnapshotExport`), read by real clients; and `keel-inspect repo` /
//! `keel-inspect chunk` on a real repository, healthy and damaged.
//!
//! - `nbdcopy` and `qemu-img convert` read the snapshot back bit-exact, including a chunk
//!   that is corrupt in the repo (served from the second vault, and logged); `nbdinfo
//!   --map` shows exactly the manifest's holes; `qemu-io` cannot write; SIGTERM stops the
//!   server cleanly. A chunk bad in every vault fails the client's read with an I/O error
//!   that the server's log names, and the server goes on.
//! - `keel-inspect repo` reports every snapshot, the exact dedup numbers, an orphaned
//!   chunk; after a flipped byte, a deleted chunk and a garbage manifest it exits 1 and
//!   names each of them (and the snapshots that need the chunks). `keel-inspect chunk`
//!   shows the header, the crc, the decode and the references.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keel_snapshot::create::{create_snapshot, Changed, CreateOptions, FileSource};
use keel_snapshot::keyfile::create_key_file;
use keel_snapshot::maintain::{copy_snapshot, read_manifest};
use keel_snapshot::manifest::{ChunkMap, ChunkRef, Manifest};
use keel_snapshot::vault::{LocalVault, Vault};
use keel_snapshot::{encode_chunk, ChunkId, TenantKey};
use keel_tests::cmd::{run, run_ok, strip_ansi, wait_for, Output};
use keel_tests::daemon::{workspace_bin, Daemon};
use rand::{RngCore, SeedableRng};
use serde_json::Value;

const KIB: usize = 1 << 10;
const CHUNK: usize = 64 * KIB;
const TIMEOUT: Duration = Duration::from_secs(120);
const TENANT: &str = "acme";

fn seeded(test: &str) -> rand::rngs::StdRng {
    let seed = std::env::var("KEEL_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random::<u64>);
    eprintln!("{test}: KEEL_TEST_SEED={seed}");
    rand::rngs::StdRng::seed_from_u64(seed)
}

/// A node directory (never started) whose config has a `[snapshots]` section, a second
/// directory vault `dc2`, and a tenant key.
struct Node {
    daemon: Daemon,
    key: TenantKey,
    /// The next snapshot's time: ids sort by time, so each snapshot gets its own second.
    clock: std::cell::Cell<i64>,
}

impl Node {
    fn new() -> Self {
        let extra = format!(
            "[snapshots]\ntenant = \"{TENANT}\"\nchunk_size = \"64K\"\n\n\
             [[snapshots.vault]]\nkind = \"dir\"\nname = \"dc2\"\npath = \"{{dir}}/vault-dc2\"\n"
        );
        let daemon = Daemon::configure(&[], "posix", &extra).unwrap();
        std::fs::create_dir_all(daemon.dir().join("data")).unwrap();
        let key = create_key_file(&daemon.dir().join("data/tenant.key"), None).unwrap();
        Node { daemon, key, clock: std::cell::Cell::new(1_795_000_000) }
    }

    fn repo_dir(&self) -> PathBuf {
        self.daemon.dir().join("data/repo")
    }

    fn key_file(&self) -> PathBuf {
        self.daemon.dir().join("data/tenant.key")
    }

    fn repo(&self) -> LocalVault {
        LocalVault::open("local", self.repo_dir(), TENANT).unwrap()
    }

    fn dc2(&self) -> LocalVault {
        LocalVault::open("dc2", self.daemon.dir().join("vault-dc2"), TENANT).unwrap()
    }

    /// Snapshots `image` as `volume` into the repo (incrementally from `parent` when
    /// given, with `changed` chunk indices); returns the manifest key.
    fn snapshot(&self, volume: &str, image: &[u8], parent: Option<(&str, Vec<u64>)>) -> String {
        let path = self.daemon.dir().join(format!("{volume}.img"));
        std::fs::write(&path, image).unwrap();
        let options = CreateOptions {
            volume: volume.into(),
            marker: "test".into(),
            marker_seq: 0,
            node: "test".into(),
            chunk_size: CHUNK as u32,
            zstd_level: 3,
            threads: 2,
            snapshot_id: None,
            created_unix: Some(self.clock.get()),
            group: None,
            read_limit: None,
            busy_read_limit: None,
            cpu_priority: keel_snapshot::priority::CpuPriority::Normal,
            stop: None,
        };
        self.clock.set(self.clock.get() + 3600);
        let repo = self.repo();
        let parent_manifest = parent.as_ref().map(|(key, _)| read_manifest(&repo, key, Some(&self.key)).unwrap());
        let changed = match parent {
            Some((_, list)) => Changed::Chunks(list),
            None => Changed::All("first snapshot".into()),
        };
        let source = FileSource::open(&path).unwrap();
        let report =
            create_snapshot(&self.key, &repo, &source, &options, parent_manifest.as_ref(), changed, &|_| {}).unwrap();
        report.manifest_key
    }

    fn manifest(&self, manifest_key: &str) -> Manifest {
        read_manifest(&self.repo(), manifest_key, Some(&self.key)).unwrap()
    }
}

/// The id of chunk `index` of a manifest of `node`'s repo (which must not be a hole).
fn chunk_id(node: &Node, manifest: &Manifest, index: usize) -> ChunkId {
    let repo = node.repo();
    match ChunkMap::new(&node.key, &[&repo as &dyn Vault], manifest).entry(index as u64) {
        Ok(ChunkRef::Data(id)) => id,
        other => panic!("chunk {index} is {other:?}"),
    }
}

/// Flips a bit of the byte `at` bytes into chunk `id`'s frame, in `vault`'s pack file.
fn flip_chunk_byte(vault: &LocalVault, id: &ChunkId, at: u64) {
    use std::os::unix::fs::FileExt;
    let location = vault.store().locate(id).unwrap().unwrap_or_else(|| panic!("chunk {id} is not stored"));
    assert!(at < location.len, "byte {at} of a {}-byte frame", location.len);
    let pack = std::fs::OpenOptions::new().read(true).write(true).open(&location.pack).unwrap();
    let mut byte = [0u8];
    pack.read_exact_at(&mut byte, location.offset + at).unwrap();
    pack.write_all_at(&[byte[0] ^ 0x40], location.offset + at).unwrap();
}

/// 128 chunks and a 4 KiB tail: random data, a 1 MiB hole at chunks 16-31 and one at
/// chunk 70, chunk 90 half zeros (data, not a hole), chunk 110 a copy of chunk 5.
fn served_image(rng: &mut impl RngCore) -> (Vec<u8>, Vec<(u64, u64)>) {
    let mut image = vec![0u8; 128 * CHUNK + 4 * KIB];
    rng.fill_bytes(&mut image);
    image[16 * CHUNK..32 * CHUNK].fill(0);
    image[70 * CHUNK..71 * CHUNK].fill(0);
    image[90 * CHUNK..90 * CHUNK + CHUNK / 2].fill(0);
    image.copy_within(5 * CHUNK..6 * CHUNK, 110 * CHUNK);
    let holes = vec![(16 * CHUNK as u64, 16 * CHUNK as u64), (70 * CHUNK as u64, CHUNK as u64)];
    (image, holes)
}

/// A running `keel snapshot serve`.
struct Served {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
    uri: String,
}

impl Served {
    fn start(node: &Node, snapshot: &str, export: &str, log_name: &str) -> Self {
        let socket = node.daemon.dir().join("snap.sock");
        let log = node.daemon.dir().join(log_name);
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(workspace_bin("keel"))
            .args(["snapshot", "serve", snapshot, "--socket"])
            .arg(&socket)
            .arg("--config")
            .arg(node.daemon.config())
            .env("KEEL_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        let mut served =
            Served { child, uri: format!("nbd+unix:///{export}?socket={}", socket.display()), socket, log };
        let socket = served.socket.clone();
        let ready = wait_for("keel snapshot serve to listen", Duration::from_secs(60), || {
            if let Some(status) = served.child.try_wait()? {
                anyhow::bail!("keel snapshot serve exited with {status}:\n{}", served.log());
            }
            // The socket file appears when the listener is bound (bind and listen are one
            // step), in a fresh directory: no stale file to mistake for it.
            Ok(socket.exists().then_some(()))
        });
        if let Err(e) = ready {
            let _ = served.child.kill();
            panic!("{e:#}");
        }
        served
    }

    fn log(&self) -> String {
        strip_ansi(&std::fs::read_to_string(&self.log).unwrap_or_default())
    }

    /// SIGTERM; the server must exit 0 and remove its socket.
    fn stop(mut self) {
        // SAFETY: kill(2) on our own child's pid only sends a signal.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let started = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if started.elapsed() > Duration::from_secs(30) {
                let _ = self.child.kill();
                panic!("keel snapshot serve ignored SIGTERM:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(status.success(), "keel snapshot serve exited with {status}:\n{}", self.log());
        assert!(!self.socket.exists(), "the socket was left behind");
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The `(offset, length)` runs `nbdinfo --map` reports as holes (type bit 0), merged.
fn mapped_holes(uri: &str) -> Vec<(u64, u64)> {
    let out = run_ok(Command::new("nbdinfo").args(["--map", "--json", uri]), TIMEOUT).unwrap();
    let map: Value = serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.describe()));
    let mut holes: Vec<(u64, u64)> = Vec::new();
    for extent in map.as_array().unwrap_or_else(|| panic!("not a list: {}", out.describe())) {
        let (offset, length, kind) =
            (extent["offset"].as_u64().unwrap(), extent["length"].as_u64().unwrap(), extent["type"].as_u64().unwrap());
        if kind & 1 == 0 {
            continue;
        }
        match holes.last_mut() {
            Some((start, len)) if *start + *len == offset => *len += length,
            _ => holes.push((offset, length)),
        }
    }
    holes
}

#[test]
fn a_served_snapshot_reads_back_bit_exact_shows_its_holes_and_refuses_writes() {
    let mut rng = seeded("a_served_snapshot_reads_back_bit_exact_shows_its_holes_and_refuses_writes");
    let node = Node::new();
    let (image, holes) = served_image(&mut rng);
    let manifest_key = node.snapshot("db", &image, None);
    copy_snapshot(&node.key, &node.repo(), &node.dc2(), &manifest_key, "test", &|_| {}).unwrap();
    let manifest = node.manifest(&manifest_key);
    let export = format!("db@{}", manifest.snapshot_id());
    let snapshot = format!("db/{}", manifest.snapshot_id());
    // Chunk 40 is corrupt in the repo: it must come from dc2.
    let bad = chunk_id(&node, &manifest, 40);
    flip_chunk_byte(&node.repo(), &bad, 200);

    let served = Served::start(&node, &snapshot, &export, "serve.log");
    let dir = node.daemon.dir();
    let copied = dir.join("nbdcopy.raw");
    run_ok(Command::new("nbdcopy").arg(&served.uri).arg(&copied), TIMEOUT).unwrap();
    assert!(std::fs::read(&copied).unwrap() == image, "nbdcopy read something else");
    let converted = dir.join("qemu-img.raw");
    run_ok(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "raw", &served.uri]).arg(&converted), TIMEOUT)
        .unwrap();
    assert!(std::fs::read(&converted).unwrap() == image, "qemu-img convert read something else");
    assert_eq!(mapped_holes(&served.uri), holes);

    let write =
        run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x55 0 4k", &served.uri]), TIMEOUT).unwrap();
    assert!(!write.status.success(), "the write succeeded: {}", write.describe());
    let said = write.combined().to_lowercase();
    assert!(said.contains("permission denied") || said.contains("read-only"), "{}", write.describe());
    run_ok(Command::new("nbdcopy").arg(&served.uri).arg(&copied), TIMEOUT).unwrap();
    assert!(std::fs::read(&copied).unwrap() == image, "the snapshot changed");
    let log = served.log();
    assert!(log.contains(&format!("({bad}) served from a fallback vault")), "{log}");
    served.stop();

    // Now bad in every vault: the read fails with EIO naming the chunk; the server goes on.
    assert!(node.dc2().store().remove(&bad).unwrap());
    let served = Served::start(&node, &snapshot, &export, "serve-broken.log");
    let failed = run(Command::new("nbdcopy").arg(&served.uri).arg(dir.join("broken.raw")), TIMEOUT).unwrap();
    assert!(!failed.status.success(), "nbdcopy read a chunk no vault holds: {}", failed.describe());
    assert!(failed.combined().contains("Input/output error"), "{}", failed.describe());
    let log = served.log();
    assert!(log.contains(&format!("chunk 40 ({bad}) at offset {}", 40 * CHUNK)), "{log}");
    assert!(log.contains("no good copy in any vault"), "{log}");
    // The other chunks still read.
    let head =
        run_ok(Command::new("qemu-io").args(["-r", "-f", "raw", "-c", "read -v 0 512", &served.uri]), TIMEOUT).unwrap();
    let first = format!("00000000:  {:02x} {:02x}", image[0], image[1]);
    assert!(head.stdout.contains(&first), "{}", head.describe());
    served.stop();
}

fn inspect(args: &[&str]) -> Output {
    run(Command::new(workspace_bin("keel-inspect")).args(args), TIMEOUT).unwrap()
}

fn inspect_json(args: &[&str], code: i32) -> Value {
    let out = inspect(args);
    assert_eq!(out.status.code(), Some(code), "{}", out.describe());
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.describe()))
}

/// Non-hole chunk contents of `image`, with repeats.
fn data_chunks(image: &[u8]) -> Vec<&[u8]> {
    image.chunks(CHUNK).filter(|c| c.iter().any(|&b| b != 0)).collect()
}

fn ratio<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["ratios"].as_array().unwrap().iter().find(|r| r["name"] == name).unwrap_or_else(|| panic!("{report:#}"))
}

fn ids(list: &Value) -> Vec<&str> {
    list["chunks"].as_array().unwrap().iter().map(|c| c["id"].as_str().unwrap()).collect()
}

#[test]
fn keel_inspect_repo_and_chunk_report_a_healthy_repo_then_name_each_problem() {
    let mut rng = seeded("keel_inspect_repo_and_chunk_report_a_healthy_repo_then_name_each_problem");
    let node = Node::new();
    // db: 32 chunks, 4 holes; the incremental rewrites chunks 3 and 9 and zeroes chunk 12.
    let mut db = vec![0u8; 32 * CHUNK];
    rng.fill_bytes(&mut db);
    db[20 * CHUNK..24 * CHUNK].fill(0);
    let db1 = node.snapshot("db", &db, None);
    let db_first = db.clone();
    rng.fill_bytes(&mut db[3 * CHUNK..4 * CHUNK]);
    rng.fill_bytes(&mut db[9 * CHUNK..10 * CHUNK]);
    db[12 * CHUNK..13 * CHUNK].fill(0);
    let db2 = node.snapshot("db", &db, Some((&db1, vec![3, 9, 12])));
    // fs: 8 chunks, the first four equal to db's (dedup across volumes).
    let mut fs = vec![0u8; 8 * CHUNK];
    rng.fill_bytes(&mut fs);
    fs[..4 * CHUNK].copy_from_slice(&db[..4 * CHUNK]);
    let fs1 = node.snapshot("fs", &fs, None);
    // An orphan: stored, referenced by nothing.
    let mut stray = vec![0u8; CHUNK];
    rng.fill_bytes(&mut stray);
    let (orphan, frame) = encode_chunk(&node.key, &stray, 3).unwrap();
    node.repo().put_chunk(&orphan, &frame).unwrap();

    let all: Vec<&[u8]> = [data_chunks(&db_first), data_chunks(&db), data_chunks(&fs)].concat();
    let logical = (all.len() * CHUNK) as u64;
    let distinct = all.iter().collect::<HashSet<_>>().len();
    let repo = node.repo_dir();
    let repo_arg = repo.to_str().unwrap();
    let key_arg = node.key_file();
    let key_arg = key_arg.to_str().unwrap();
    let args = ["repo", repo_arg, "--tenant", TENANT, "--key-file", key_arg];

    // --- Healthy.
    let report = inspect_json(&[&args[..], &["--json"]].concat(), 0);
    assert_eq!(report["ok"], true, "{report:#}");
    assert_eq!(report["authenticated"], true, "{report:#}");
    let volumes = report["volumes"].as_array().unwrap();
    let names: Vec<&str> = volumes.iter().map(|v| v["volume"].as_str().unwrap()).collect();
    assert_eq!(names, ["db", "fs"], "{report:#}");
    let db_rows = volumes[0]["snapshots"].as_array().unwrap();
    let manifest1 = node.manifest(&db1);
    let manifest2 = node.manifest(&db2);
    assert_eq!(db_rows.len(), 2, "{report:#}");
    assert_eq!(db_rows[0]["id"], manifest1.snapshot_id(), "{report:#}");
    assert_eq!(db_rows[0]["holes"], 4, "{report:#}");
    assert_eq!(db_rows[0]["full_read"], true, "{report:#}");
    assert_eq!(db_rows[1]["parent"], manifest1.snapshot_id(), "{report:#}");
    assert_eq!(db_rows[1]["holes"], 5, "{report:#}");
    assert_eq!(db_rows[1]["new_chunks"], 2, "{report:#}");
    assert_eq!(db_rows[1]["chunk_size"], CHUNK, "{report:#}");
    assert_eq!(db_rows[1]["logical_size"], 32 * CHUNK, "{report:#}");
    assert_eq!(report["referenced"]["distinct_chunks"], distinct, "{report:#}");
    let dedup = ratio(&report, "dedup");
    assert_eq!(dedup["numerator_bytes"], logical, "{report:#}");
    assert_eq!(dedup["denominator_bytes"], (distinct * CHUNK) as u64, "{report:#}");
    let expected = logical as f64 / (distinct * CHUNK) as f64;
    assert!((dedup["ratio"].as_f64().unwrap() - expected).abs() < 1e-9, "{report:#}");
    // Random data does not compress (the index chunks' runs of holes barely do).
    let compression = ratio(&report, "compression")["ratio"].as_f64().unwrap();
    assert!((1.0..1.01).contains(&compression), "{report:#}");
    // Each snapshot's entries are in an index chunk of its own (they all differ).
    assert_eq!(report["referenced"]["index_chunks"], 3, "{report:#}");
    assert_eq!(db_rows[1]["index_chunks"], 1, "{report:#}");
    assert_eq!(report["store"]["chunks"], distinct + 3 + 1, "{report:#}");
    // One open wrote each snapshot (and the orphan): a pack each, nothing dead or orphaned.
    assert_eq!(report["packs"]["packs"], 4, "{report:#}");
    assert_eq!(report["packs"]["orphan_packs"], 0, "{report:#}");
    assert!(report["packs"]["damaged_index_logs"].as_array().unwrap().is_empty(), "{report:#}");
    let live = report["packs"]["live_bytes"].as_u64().unwrap();
    assert!(live >= report["store"]["encoded_bytes"].as_u64().unwrap(), "{report:#}");
    assert_eq!(ids(&report["orphaned"]), [orphan.to_string().as_str()], "{report:#}");
    assert_eq!(report["missing"]["count"], 0, "{report:#}");
    assert_eq!(report["corrupt_chunks"]["count"], 0, "{report:#}");
    assert!(report["corrupt_manifests"].as_array().unwrap().is_empty(), "{report:#}");
    let text = inspect(&args);
    assert!(text.status.success(), "{}", text.describe());
    for part in [manifest1.snapshot_id(), manifest2.snapshot_id(), "volume fs: 1 snapshots", "dedup", "verdict: OK"] {
        assert!(text.stdout.contains(part), "{part:?} missing:\n{}", text.stdout);
    }
    // Without the key: structure only. The entries are in encrypted index chunks, so they
    // are unknown: no chunk is called orphaned, and the verdict is not OK (a chunk they
    // need could be gone).
    let keyless = inspect_json(&["repo", repo_arg, "--tenant", TENANT, "--json"], 1);
    assert_eq!(keyless["authenticated"], false, "{keyless:#}");
    assert_eq!(keyless["ok"], false, "{keyless:#}");
    assert_eq!(keyless["referenced"]["index_chunks"], 3, "{keyless:#}");
    assert_eq!(keyless["unresolved_manifests"].as_array().unwrap().len(), 3, "{keyless:#}");
    assert_eq!(keyless["orphaned"]["count"], 0, "{keyless:#}");
    assert_eq!(keyless["volumes"][0]["snapshots"][0]["entries_read"], false, "{keyless:#}");
    let text = inspect(&["repo", repo_arg, "--tenant", TENANT]);
    assert!(text.stdout.contains("orphaned chunks: not known"), "{}", text.stdout);
    assert!(
        text.stdout.contains("3 manifests whose chunks were not all looked for (give --key-file)"),
        "{}",
        text.stdout
    );

    // A chunk all three snapshots share: chunk 0 of db (chunk 0 of fs too).
    let shared = chunk_id(&node, &manifest1, 0);
    let shared_arg = shared.to_string();
    let chunk_args = ["chunk", &shared_arg, "--repo", repo_arg, "--tenant", TENANT, "--key-file", key_arg, "--json"];
    let chunk = inspect_json(&chunk_args, 0);
    assert_eq!(chunk["ok"], true, "{chunk:#}");
    assert_eq!(chunk["header"]["version"], 1, "{chunk:#}");
    assert_eq!(chunk["header"]["plaintext_len"], CHUNK, "{chunk:#}");
    assert_eq!(chunk["crc"]["ok"], true, "{chunk:#}");
    assert_eq!(chunk["decode"]["rehash_matches"], true, "{chunk:#}");
    assert_eq!(chunk["decode"]["is_zero"], false, "{chunk:#}");
    let first: String = db[..32].iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(chunk["decode"]["first_bytes"], first, "{chunk:#}");
    let users: HashMap<&str, &Value> = chunk["referenced_by"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["snapshot"].as_str().unwrap(), &r["at"]))
        .collect();
    assert_eq!(users.len(), 3, "{chunk:#}");
    let fs_snapshot = format!("fs/{}", node.manifest(&fs1).snapshot_id());
    assert_eq!(users[fs_snapshot.as_str()][0]["offset"], 0, "{chunk:#}");
    let keyless = inspect_json(&["chunk", &shared_arg, "--repo", repo_arg, "--tenant", TENANT, "--json"], 0);
    assert!(keyless["decode"].is_null(), "{keyless:#}");
    let text = inspect(&chunk_args[..8]);
    assert!(
        text.stdout.contains("crc         ok") && text.stdout.contains("re-hashes to its id: yes"),
        "{}",
        text.stdout
    );

    // --- Damage: flip a byte of chunk 1 (both db snapshots use it), delete chunk 5 (both
    // too), and drop a garbage manifest in.
    let flipped = chunk_id(&node, &manifest1, 1);
    let deleted = chunk_id(&node, &manifest1, 5);
    flip_chunk_byte(&node.repo(), &flipped, 300);
    assert!(node.repo().store().remove(&deleted).unwrap());
    let garbage = "snapshots/db/20990101T000000Z-deadbeef.kman";
    node.repo().put_object(garbage, b"not a manifest").unwrap();

    let report = inspect_json(&[&args[..], &["--json"]].concat(), 1);
    assert_eq!(report["ok"], false, "{report:#}");
    assert_eq!(ids(&report["missing"]), [deleted.to_string().as_str()], "{report:#}");
    let missing = &report["missing"]["chunks"][0];
    assert_eq!(missing["snapshots"], 2, "{report:#}");
    let needed_by: Vec<&str> =
        missing["referenced_by"].as_array().unwrap().iter().map(|r| r["snapshot"].as_str().unwrap()).collect();
    let db1_name = format!("db/{}", manifest1.snapshot_id());
    let db2_name = format!("db/{}", manifest2.snapshot_id());
    assert_eq!(needed_by, [db1_name.as_str(), db2_name.as_str()], "{report:#}");
    assert_eq!(missing["referenced_by"][0]["at"][0]["offset"], 5 * CHUNK, "{report:#}");
    assert_eq!(ids(&report["corrupt_chunks"]), [flipped.to_string().as_str()], "{report:#}");
    let corrupt = &report["corrupt_chunks"]["chunks"][0];
    assert_eq!(corrupt["referenced"], true, "{report:#}");
    assert!(corrupt["error"].as_str().unwrap().contains("checksum mismatch"), "{report:#}");
    let bad_manifests = report["corrupt_manifests"].as_array().unwrap();
    assert_eq!(bad_manifests.len(), 1, "{report:#}");
    assert_eq!(bad_manifests[0]["key"], garbage, "{report:#}");
    assert!(bad_manifests[0]["error"].as_str().unwrap().contains("truncated"), "{report:#}");
    let text = inspect(&args);
    assert_eq!(text.status.code(), Some(1), "{}", text.describe());
    for part in [
        deleted.to_string(),
        flipped.to_string(),
        garbage.to_string(),
        format!("used by {db1_name} at chunk 5 (offset {})", 5 * CHUNK),
        "PROBLEMS: 1 missing chunks, 1 corrupt referenced chunks, 1 corrupt manifests".into(),
    ] {
        assert!(text.stdout.contains(&part), "{part:?} missing:\n{}", text.stdout);
    }

    let flipped_arg = flipped.to_string();
    let chunk = inspect_json(
        &["chunk", &flipped_arg, "--repo", repo_arg, "--tenant", TENANT, "--key-file", key_arg, "--json"],
        1,
    );
    assert_eq!(chunk["crc"]["ok"], false, "{chunk:#}");
    assert_eq!(chunk["frame_ok"], false, "{chunk:#}");
    assert_eq!(chunk["decode"]["ok"], false, "{chunk:#}");
    assert_eq!(chunk["header"]["plaintext_len"], CHUNK, "the header is intact: {chunk:#}");
    let deleted_arg = deleted.to_string();
    let chunk = inspect_json(
        &["chunk", &deleted_arg, "--repo", repo_arg, "--tenant", TENANT, "--key-file", key_arg, "--json"],
        1,
    );
    assert_eq!(chunk["present"], false, "{chunk:#}");
    assert_eq!(chunk["referenced_by"].as_array().unwrap().len(), 2, "{chunk:#}");
    let text = inspect(&["chunk", &deleted_arg, "--repo", repo_arg, "--tenant", TENANT, "--key-file", key_arg]);
    assert!(text.stdout.contains("MISSING") && text.stdout.contains(&db2_name), "{}", text.describe());

    // A lost index chunk: missing, named with the snapshot it lists the chunks of, and
    // that snapshot's entries are unknown.
    let fs_index = node.manifest(&fs1).index_chunks()[0];
    assert!(node.repo().store().remove(&fs_index).unwrap());
    let report = inspect_json(&[&args[..], &["--json"]].concat(), 1);
    let missing = ids(&report["missing"]);
    assert!(missing.contains(&fs_index.to_string().as_str()), "{report:#}");
    let lost = report["missing"]["chunks"].as_array().unwrap().iter().find(|c| c["id"] == fs_index.to_string());
    assert_eq!(lost.unwrap()["referenced_by"][0]["snapshot"], fs_snapshot.as_str(), "{report:#}");
    let unresolved = report["unresolved_manifests"].as_array().unwrap();
    assert_eq!(unresolved.len(), 1, "{report:#}");
    assert!(unresolved[0]["error"].as_str().unwrap().contains(&fs_index.to_string()), "{report:#}");

    // A tenant that is not there, and an id that is not one: clear errors, exit 2.
    let out = inspect(&["repo", repo_arg, "--tenant", "globex"]);
    assert_eq!(out.status.code(), Some(2), "{}", out.describe());
    assert!(out.stderr.contains("no tenant \"globex\"") && out.stderr.contains(TENANT), "{}", out.describe());
    let out = inspect(&["chunk", "xyz", "--repo", repo_arg, "--tenant", TENANT]);
    assert_eq!(out.status.code(), Some(2), "{}", out.describe());
    assert!(out.stderr.contains("64 hex digits"), "{}", out.describe());
}
