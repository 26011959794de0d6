//! `keel-inspect` on a real daemon's volume: sane values after a clean stop; then one
//! flipped payload byte in an acknowledged (flushed) journal record is reported as
//! corruption by `keel-inspect journal --verify`, and the restarted daemon refuses to
//! serve that volume (and says why) while it keeps serving the others.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use keel_tests::cmd::{run, strip_ansi, Output};
use keel_tests::daemon::{workspace_bin, Daemon};
use keel_tests::nbd_client::NbdClient;
use serde_json::Value;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
/// `RECORD_HEADER_LEN` (docs/format-journal.md): the payload follows the 48-byte header.
const RECORD_HEADER_LEN: u64 = 48;

fn inspect(args: &[&str], dir: &Path) -> Output {
    run(Command::new(workspace_bin("keel-inspect")).args(args).arg(dir), Duration::from_secs(60)).unwrap()
}

fn inspect_json(args: &[&str], dir: &Path) -> Value {
    let out = inspect(args, dir);
    assert!(out.status.success(), "{}", out.describe());
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.describe()))
}

/// A payload nobody else writes: the byte at i is a function of i and `salt`.
fn payload(len: u64, salt: u8) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8 ^ salt).collect()
}

fn records(journal: &Value) -> &Vec<Value> {
    journal["shown"].as_array().expect("shown records")
}

fn find<'a>(journal: &'a Value, kind: &str, offset: u64, length: u64) -> &'a Value {
    records(journal)
        .iter()
        .find(|r| r["kind"] == kind && r["offset"] == offset && r["length"] == length)
        .unwrap_or_else(|| panic!("no {kind} record at {offset}+{length} in {journal:#}"))
}

#[test]
fn inspect_reports_the_volume_and_a_corrupt_acknowledged_record_stops_serving_it() {
    let mut daemon = Daemon::start(&[("vol", "64MiB"), ("other", "16MiB")]).unwrap();
    let dir = daemon.volume_dir("vol");

    // --- A clean run: writes, a flush, a clean stop.
    let mut client = NbdClient::connect(&daemon.socket(), "vol").unwrap();
    client.write(0, &payload(64 * KIB, 0x11), false).unwrap();
    client.write(MIB, &payload(4 * KIB, 0x22), true).unwrap();
    client.write_zeroes(2 * MIB, 128 * KIB as u32).unwrap();
    client.trim(3 * MIB, 64 * KIB as u32).unwrap();
    client.flush().unwrap();
    client.disconnect().unwrap();
    assert!(daemon.stop().unwrap(), "the daemon did not exit cleanly:\n{}", daemon.log());

    let volume = inspect_json(&["volume", "--json"], &dir);
    assert_eq!(volume["name"], "vol", "{volume:#}");
    assert_eq!(volume["size"], 64 * MIB, "{volume:#}");
    assert_eq!(volume["epoch"], 1, "{volume:#}");
    let block_size = volume["block_size"].as_u64().unwrap_or(0);
    assert!(block_size.is_power_of_two() && (512..=65536).contains(&block_size), "{volume:#}");
    let checkpoint_seq = volume["checkpoint"]["seq"].as_u64().unwrap();
    // Four data records (write, FUA write, zeroes, trim); barriers take no seq of their own.
    assert!(checkpoint_seq >= 4, "a clean stop checkpoints every record: {volume:#}");
    let slots = volume["journal"]["slots"].as_array().unwrap();
    assert!(slots.iter().any(|s| s["state"] == "in use" && s["segment"] == 1), "{volume:#}");
    assert_eq!(volume["change_map"]["trusted"], true, "{volume:#}");

    // From the checkpoint: no data left to replay after a clean stop (the checkpoint's own
    // flush leaves a barrier behind it).
    let journal = inspect_json(&["journal", "--verify", "--json"], &dir);
    assert_eq!(journal["corrupt"], false, "{journal:#}");
    assert_eq!(journal["verify"], "ok", "{journal:#}");
    assert_eq!(journal["from_seq"], checkpoint_seq + 1, "{journal:#}");
    assert!(records(&journal).iter().all(|r| r["kind"] == "barrier"), "data after a clean stop: {journal:#}");
    let next_seq = journal["next_seq"].as_u64().unwrap();
    // Only barriers follow the checkpoint, and barriers take no seq of their own.
    assert_eq!(next_seq, checkpoint_seq + 1, "{journal:#}");
    // From the oldest segment: every record, in order, with what was written.
    let all = inspect_json(&["journal", "--all", "--verify", "--json"], &dir);
    assert_eq!(all["corrupt"], false, "{all:#}");
    assert_eq!(all["next_seq"].as_u64(), Some(next_seq), "{all:#}");
    let seqs: Vec<u64> =
        records(&all).iter().filter(|r| r["kind"] != "barrier").map(|r| r["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..next_seq).collect::<Vec<_>>(), "{all:#}");
    // A barrier carries the seq of the record before it.
    let all_seqs: Vec<u64> = records(&all).iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert!(all_seqs.windows(2).all(|w| w[0] <= w[1]), "{all:#}");
    assert!(records(&all).iter().all(|r| r["epoch"] == 1), "{all:#}");
    find(&all, "write", 0, 64 * KIB);
    find(&all, "write", MIB, 4 * KIB);
    find(&all, "zero", 2 * MIB, 128 * KIB);
    find(&all, "trim", 3 * MIB, 64 * KIB);
    assert!(records(&all).iter().any(|r| r["kind"] == "barrier"), "no barrier after flushes: {all:#}");

    // --- A second run whose records stay in the journal: no background checkpoint (long
    // interval), and the process is killed, so no checkpoint at shutdown either.
    let config = std::fs::read_to_string(daemon.config()).unwrap();
    std::fs::write(daemon.config(), format!("checkpoint_interval_secs = 3600\n{config}")).unwrap();
    daemon.restart().unwrap();
    let target = payload(64 * KIB, 0x5c);
    let mut client = NbdClient::connect(&daemon.socket(), "vol").unwrap();
    client.write(4 * MIB, &target, false).unwrap();
    client.write(5 * MIB, &payload(4 * KIB, 0x33), false).unwrap();
    // The flush's barrier proves the write above was acknowledged as durable.
    client.flush().unwrap();
    daemon.kill9();

    let journal = inspect_json(&["journal", "--verify", "--json"], &dir);
    assert_eq!(journal["corrupt"], false, "{journal:#}");
    assert_eq!(journal["verify"], "ok", "{journal:#}");
    let record = find(&journal, "write", 4 * MIB, 64 * KIB);
    let (seq, segment, at) =
        (record["seq"].as_u64().unwrap(), record["segment"].as_u64().unwrap(), record["file_offset"].as_u64().unwrap());
    let barrier = records(&journal)
        .iter()
        .find(|r| r["kind"] == "barrier" && r["seq"].as_u64() >= Some(seq))
        .unwrap_or_else(|| panic!("no barrier after seq {seq}: {journal:#}"));
    assert!(barrier["offset"].as_u64() >= Some(seq), "the barrier does not cover seq {seq}: {journal:#}");

    // Flip one byte in the middle of that record's payload.
    let volume = inspect_json(&["volume", "--json"], &dir);
    let slot = volume["journal"]["slots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["segment"] == segment)
        .unwrap_or_else(|| panic!("segment {segment} is in no slot: {volume:#}"))["slot"]
        .as_u64()
        .unwrap();
    let slot_path = dir.join(format!("journal/slot-{slot:04}.seg"));
    let file = std::fs::OpenOptions::new().read(true).write(true).open(&slot_path).unwrap();
    let mut on_disk = vec![0u8; RECORD_HEADER_LEN as usize + target.len()];
    file.read_exact_at(&mut on_disk, at).unwrap();
    assert_eq!(&on_disk[..4], b"KJRN", "no record header at {}:{at}", slot_path.display());
    assert!(
        on_disk[RECORD_HEADER_LEN as usize..] == target[..],
        "the payload is not where docs/format-journal.md says"
    );
    let victim = at + RECORD_HEADER_LEN + target.len() as u64 / 2;
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, victim).unwrap();
    file.write_all_at(&[byte[0] ^ 0x01], victim).unwrap();
    file.sync_all().unwrap();
    drop(file);

    let out = inspect(&["journal", "--verify"], &dir);
    assert_eq!(out.status.code(), Some(1), "corruption must exit 1:\n{}", out.describe());
    let verdict = out.stdout.lines().find(|l| l.starts_with("verify:")).unwrap_or_default().to_string();
    for needle in ["CORRUPT", &format!("segment {segment} "), &format!("offset {at},"), &format!("seq {seq}:")] {
        assert!(verdict.contains(needle), "the verdict does not name {needle:?}:\n{}", out.describe());
    }
    let out = inspect(&["journal", "--verify", "--json"], &dir);
    assert_eq!(out.status.code(), Some(1), "corruption must exit 1:\n{}", out.describe());
    let journal: Value = serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.describe()));
    assert_eq!(journal["corrupt"], true, "{journal:#}");
    assert!(journal["verify"].as_str().is_some_and(|v| v.starts_with("CORRUPT")), "{journal:#}");

    // The node starts, serves the healthy volume, and refuses the corrupt one.
    daemon.restart().unwrap();
    let refused = NbdClient::connect(&daemon.socket(), "vol").expect_err("a corrupt volume was served");
    assert!(
        refused.to_string().contains("reply 0x80000006"),
        "expected NBD_REP_ERR_UNKNOWN for the corrupt volume, got: {refused:#}"
    );
    let mut other = NbdClient::connect(&daemon.socket(), "other").unwrap();
    other.write(0, &payload(4 * KIB, 0x44), true).unwrap();
    let mut back = vec![0u8; 4096];
    other.read(0, &mut back).unwrap();
    assert_eq!(back, payload(4 * KIB, 0x44));
    other.disconnect().unwrap();

    let log = strip_ansi(&daemon.log());
    let line = log
        .lines()
        .find(|l| l.contains("failed to open volume") && l.contains(&dir.display().to_string()))
        .unwrap_or_else(|| panic!("the log does not say why vol is not served:\n{log}"));
    for needle in [&format!("journal segment {segment} record at offset {at}, seq {seq}"), "acknowledged as durable"] {
        assert!(line.contains(needle), "the log line does not say {needle:?}: {line}");
    }
    assert!(line.contains(&slot_path.display().to_string()), "the log line does not name the segment file: {line}");

    // The failed open left the evidence alone: the record is still there, still corrupt.
    daemon.kill9();
    let out = inspect(&["journal", "--verify"], &dir);
    assert_eq!(out.status.code(), Some(1), "the failed open changed the journal:\n{}", out.describe());
}
