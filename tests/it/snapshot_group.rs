//! Consistency groups end to end: `keel snapshot create GROUP` through the daemon freezes
//! every member at one instant, while a client keeps writing dependent pairs of writes
//! (`n` to `db`, and after its acknowledgement `n` to `files`). Restored, every group
//! snapshot holds `files ≤ db ≤ files + 1`; the members share one id and name the group;
//! retention keeps or removes group snapshots whole.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use keel_tests::nbd_client::NbdClient;

use crate::snapshot::{create, json, keel, node};

const BLOCK: usize = 4096;

fn counter_block(n: u64) -> Vec<u8> {
    let mut block = vec![0u8; BLOCK];
    block[..8].copy_from_slice(&n.to_le_bytes());
    block[BLOCK - 8..].copy_from_slice(&n.to_le_bytes());
    block
}

/// The counter a restored member's first block holds (checked not torn).
pub(crate) fn counter_of(bytes: &[u8]) -> u64 {
    let head = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    let tail = u64::from_le_bytes(bytes[BLOCK - 8..BLOCK].try_into().unwrap());
    assert_eq!(head, tail, "a torn counter block");
    head
}

/// A client writing dependent pairs through the NBD socket: `n` to `db` with FUA, and
/// once that is acknowledged, `n` to `files`. Stops when dropped, however the test leaves.
pub(crate) struct PairWriter {
    stop: Arc<AtomicBool>,
    written: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl PairWriter {
    pub(crate) fn start(socket: PathBuf) -> Self {
        let (stop, written) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
        let thread = {
            let (stop, written) = (Arc::clone(&stop), Arc::clone(&written));
            std::thread::spawn(move || {
                let mut db = NbdClient::connect(&socket, "db").unwrap();
                let mut files = NbdClient::connect(&socket, "files").unwrap();
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    // FUA: acknowledged means durable (on both nodes of a pair), and only
                    // then is the next write issued.
                    db.write(0, &counter_block(n), true).unwrap();
                    files.write(0, &counter_block(n), true).unwrap();
                    written.store(n, Ordering::Relaxed);
                }
                db.disconnect().unwrap();
                files.disconnect().unwrap();
            })
        };
        Self { stop, written, thread: Some(thread) }
    }

    /// Waits (on the writer's progress, not a clock) until it has written `more` pairs.
    pub(crate) fn wait_for_more(&self, more: u64) {
        let target = self.written.load(Ordering::Relaxed) + more;
        keel_tests::cmd::wait_for("the writer to write more pairs", Duration::from_secs(60), || {
            Ok((self.written.load(Ordering::Relaxed) >= target).then_some(()))
        })
        .unwrap();
    }

    /// Stops the writer and waits for it; fails if it failed.
    pub(crate) fn finish(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
    }
}

impl Drop for PairWriter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[test]
fn group_snapshots_are_one_instant_of_all_members() {
    let group = "[[snapshots.group]]\nname = \"shop\"\nvolumes = [\"files\", \"db\"]\n\n\
                 [snapshots.retention]\nkeep_last = 2\n";
    let daemon = node(&[("db", "8MiB"), ("files", "8MiB")], group);
    let writer = PairWriter::start(daemon.socket());

    let mut taken = Vec::new();
    for round in 0..3 {
        writer.wait_for_more(20);
        let details = create(&daemon, "shop");
        assert_eq!(details["group"], "shop", "round {round}: {details}");
        let members = details["members"].as_array().unwrap();
        let volumes: Vec<&str> = members.iter().map(|m| m["volume"].as_str().unwrap()).collect();
        assert_eq!(volumes.len(), 2, "{details}");
        assert!(members.iter().all(|m| m["snapshot"] == details["snapshot"]), "one id for all: {details}");
        taken.push(details["snapshot"].as_str().unwrap().to_owned());
    }
    writer.finish();

    // Every member of the last two (retention keeps 2, whole) restores to a consistent pair.
    let list = json(&keel(&daemon, &["snapshot", "list", "--json"]));
    let rows = list["snapshots"].as_array().unwrap();
    let mut listed: Vec<(String, String)> = rows
        .iter()
        .map(|r| {
            assert_eq!(r["group"], "shop", "{r}");
            (r["volume"].as_str().unwrap().to_owned(), r["id"].as_str().unwrap().to_owned())
        })
        .collect();
    listed.sort();
    let mut expected: Vec<(String, String)> =
        ["db", "files"].iter().flat_map(|v| taken[1..].iter().map(move |id| ((*v).to_owned(), id.clone()))).collect();
    expected.sort();
    assert_eq!(listed, expected, "retention keeps the two newest group snapshots, both members: {list}");
    for id in &taken[1..] {
        let mut counters = Vec::new();
        for volume in ["db", "files"] {
            let path = daemon.dir().join(format!("{volume}-{id}.raw"));
            let spec = format!("{volume}/{id}");
            keel(&daemon, &["snapshot", "restore", &spec, "--to-file", path.to_str().unwrap()]);
            let bytes = std::fs::read(&path).unwrap();
            counters.push(counter_of(&bytes));
            std::fs::remove_file(&path).unwrap();
        }
        let (db, files) = (counters[0], counters[1]);
        eprintln!("group snapshot {id}: db at {db}, files at {files}");
        assert!(db >= 20 && files <= db && db <= files + 1, "snapshot {id}: db at {db}, files at {files}");
    }
    let shown = json(&keel(&daemon, &["snapshot", "show", &format!("db/{}", taken[2]), "--json"]));
    assert_eq!(shown["group"]["members"], serde_json::json!(["db", "files"]), "{shown}");
}
