//! Real NBD clients against a real `keel daemon`: qemu-io pattern I/O (synchronous and
//! out-of-order aio), qemu-img and nbdinfo extent maps, nbdinfo's view of the export,
//! nbdcopy round trips (also across a SIGKILL), fio with crc32c verification on several
//! connections, and multi-connection FLUSH semantics with our own client.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use keel_tests::cmd::{run, run_ok, Output};
use keel_tests::daemon::Daemon;
use keel_tests::nbd_client::NbdClient;
use rand::{Rng, RngCore, SeedableRng};
use serde_json::Value;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const TIMEOUT: Duration = Duration::from_secs(120);

fn seeded(test: &str) -> rand::rngs::StdRng {
    let seed = std::env::var("KEEL_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random::<u64>);
    eprintln!("{test}: KEEL_TEST_SEED={seed}");
    rand::rngs::StdRng::seed_from_u64(seed)
}

/// Runs `qemu-io -f raw URI -c ... -c ...`.
fn qemu_io(uri: &str, commands: &[String]) -> Output {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw", uri]);
    for command in commands {
        cmd.arg("-c").arg(command);
    }
    run(&mut cmd, TIMEOUT).unwrap()
}

/// qemu-io exits 0 even when an aio read fails its pattern check, so the output is
/// checked too: no verification failure, no failed request, and one completion line per
/// data command (so none was skipped).
fn assert_qemu_io_clean(out: &Output, commands: &[String]) {
    assert!(out.status.success(), "{}", out.describe());
    let text = out.combined();
    assert!(!text.contains("Pattern verification failed"), "pattern mismatch:\n{}", out.describe());
    assert!(!text.to_lowercase().contains("failed"), "a request failed:\n{}", out.describe());
    let data_commands = commands.iter().filter(|c| !c.contains("flush")).count();
    let completions =
        text.lines().filter(|l| l.starts_with("wrote ") || l.starts_with("read ") || l.starts_with("discard ")).count();
    assert_eq!(completions, data_commands, "not every command completed:\n{}", out.describe());
}

fn strings(commands: &[&str]) -> Vec<String> {
    commands.iter().map(|c| c.to_string()).collect()
}

#[test]
fn qemu_io_pattern_io_and_out_of_order_aio() {
    let daemon = Daemon::start(&[("vol", "64MiB")]).unwrap();
    let uri = daemon.uri("vol");

    // The sequence from docs (prior-art 2.3), with the zeroed and discarded ranges holding
    // data first so that reading zeros back proves something.
    let commands = strings(&[
        "write -P 0xee 4M 1M",
        "write -P 0xee 8M 1M",
        "write -P 0xab 0 1M",
        "read -P 0xab 0 1M",
        "write -z 4M 1M",
        "read -P 0 4M 1M",
        "discard 8M 1M",
        "read -P 0 8M 1M",
        "flush",
        "write -f -P 0xcd 1M 64k",
        "read -P 0xcd 1M 64k",
        "read -P 0xab 0 1M",
    ]);
    assert_qemu_io_clean(&qemu_io(&uri, &commands), &commands);

    // Many requests in flight at once, completing out of order: writes of several sizes
    // (some FUA) to disjoint ranges, interleaved with reads of older data, then reads of
    // everything written.
    let regions: Vec<(u64, u64, u8)> = (0..24u64)
        .map(|i| (16 * MIB + i * 512 * KIB, [4 * KIB, 64 * KIB, 512 * KIB, 12 * KIB][i as usize % 4], 0x10 + i as u8))
        .collect();
    let mut commands = Vec::new();
    for (i, &(offset, len, pattern)) in regions.iter().enumerate() {
        let fua = if i % 5 == 0 { "-f " } else { "" };
        commands.push(format!("aio_write {fua}-P {pattern:#x} {offset} {len}"));
        if i % 4 == 0 {
            commands.push("aio_read -P 0xab 0 1M".into());
            commands.push("aio_read -P 0xcd 1M 64k".into());
        }
    }
    commands.push("aio_flush".into());
    for &(offset, len, pattern) in regions.iter().rev() {
        commands.push(format!("aio_read -P {pattern:#x} {offset} {len}"));
    }
    commands.push("aio_flush".into());
    assert_qemu_io_clean(&qemu_io(&uri, &commands), &commands);

    // And again on a new connection, one request at a time.
    let mut commands: Vec<String> =
        regions.iter().map(|&(offset, len, pattern)| format!("read -P {pattern:#x} {offset} {len}")).collect();
    commands.push("read -P 0 4M 1M".into());
    commands.push("read -P 0xcd 1M 64k".into());
    assert_qemu_io_clean(&qemu_io(&uri, &commands), &commands);
}

/// What a range must look like in an allocation map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Written with non-zero data: `data`, not `zero`.
    Data,
    /// Never written, trimmed, or zeroed with holes allowed: a hole that reads as zeros.
    Hole,
    /// Zeroed without permission to punch: either, as long as a hole is reported zero.
    Either,
}

/// One map entry as (offset, length, data, zero).
type Extent = (u64, u64, bool, bool);

/// Checks a map sector by sector against `expect` (ranges not listed must be holes).
fn check_map(tool: &str, size: u64, extents: &[Extent], expect: &[(u64, u64, Expect)], raw: &str) {
    const SECTOR: u64 = 512;
    let mut at = 0;
    for &(offset, len, _, _) in extents {
        assert_eq!(offset, at, "{tool}: extents are not contiguous at {at}:\n{raw}");
        assert!(len > 0, "{tool}: empty extent at {offset}:\n{raw}");
        at += len;
    }
    assert_eq!(at, size, "{tool}: the map does not cover the export:\n{raw}");
    let mut wanted = vec![Expect::Hole; (size / SECTOR) as usize];
    for &(offset, len, what) in expect {
        wanted[(offset / SECTOR) as usize..((offset + len) / SECTOR) as usize].fill(what);
    }
    for &(offset, len, data, zero) in extents {
        for sector in offset / SECTOR..(offset + len).div_ceil(SECTOR) {
            let ok = match wanted[sector as usize] {
                Expect::Data => data && !zero,
                Expect::Hole => !data && zero,
                Expect::Either => data || zero,
            };
            assert!(
                ok,
                "{tool}: byte {} should be {:?} but the extent {offset}+{len} says data={data} zero={zero}:\n{raw}",
                sector * SECTOR,
                wanted[sector as usize]
            );
        }
    }
}

#[test]
fn qemu_img_map_and_nbdinfo_map_match_what_was_written() {
    const SIZE: u64 = 64 * MIB;
    let daemon = Daemon::start(&[("vol", "64MiB")]).unwrap();
    let uri = daemon.uri("vol");
    let commands = strings(&[
        "write -P 0x5a 0 1M",
        "write -P 0x5a 8M 2M",
        "write -z -u 16M 1M",
        "write -P 0x01 24M 1M",
        "discard 24M 1M",
        "write -P 0x02 32M 1M",
        "write -z -u 32M 512k",
        "write -P 0x03 40M 1M",
        "write -z 40M 1M",
        "write -P 0x04 48M 4k",
        "write -P 0x04 48M 4k",
        "flush",
        "read -P 0 16M 1M",
        "read -P 0 24M 1M",
        "read -P 0 32M 512k",
        "read -P 0x02 33280k 512k",
        "read -P 0 40M 1M",
    ]);
    assert_qemu_io_clean(&qemu_io(&uri, &commands), &commands);
    let expect = [
        (0, MIB, Expect::Data),
        (8 * MIB, 2 * MIB, Expect::Data),
        (32 * MIB + 512 * KIB, 512 * KIB, Expect::Data),
        (40 * MIB, MIB, Expect::Either),
        (48 * MIB, 4 * KIB, Expect::Data),
    ];

    let out = run_ok(Command::new("qemu-img").args(["map", "--output=json", "-f", "raw", &uri]), TIMEOUT).unwrap();
    let map: Value = serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.describe()));
    let extents: Vec<Extent> = map
        .as_array()
        .expect("qemu-img map prints an array")
        .iter()
        .map(|e| {
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["data"].as_bool().unwrap(),
                e["zero"].as_bool().unwrap(),
            )
        })
        .collect();
    check_map("qemu-img map", SIZE, &extents, &expect, &out.stdout);

    // nbdinfo --map prints "offset length type description"; type bit 0 = hole, bit 1 = zero.
    let out = run_ok(Command::new("nbdinfo").args(["--map", &uri]), TIMEOUT).unwrap();
    let extents: Vec<Extent> = out
        .stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            let parse = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or_else(|| panic!("{l:?}"));
            let kind = parse(2);
            (parse(0), parse(1), kind & 1 == 0, kind & 2 != 0)
        })
        .collect();
    check_map("nbdinfo --map", SIZE, &extents, &expect, &out.stdout);
}

#[test]
fn nbdinfo_shows_the_export_and_its_capabilities() {
    let daemon = Daemon::start(&[("vol", "96MiB"), ("other", "8MiB")]).unwrap();
    let uri = daemon.uri("vol");
    let out = run_ok(Command::new("nbdinfo").args(["--json", &uri]), TIMEOUT).unwrap();
    let info: Value = serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.describe()));
    let exports = info["exports"].as_array().expect("exports");
    assert_eq!(exports.len(), 1, "{}", out.stdout);
    let export = &exports[0];
    assert_eq!(export["export-name"], "vol");
    assert_eq!(export["export-size"], 96 * MIB, "{}", out.stdout);
    for flag in ["can_multi_conn", "can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero", "can_cache"] {
        assert_eq!(export[flag], true, "{flag} is not advertised:\n{}", out.stdout);
    }
    assert_eq!(export["is_read_only"], false, "{}", out.stdout);
    assert!(
        export["contexts"].as_array().is_some_and(|c| c.iter().any(|c| c == "base:allocation")),
        "base:allocation missing:\n{}",
        out.stdout
    );
    let minimum = export["block_size_minimum"].as_u64().unwrap_or(0);
    let maximum = export["block_size_maximum"].as_u64().unwrap_or(0);
    assert!((1..=4096).contains(&minimum) && maximum >= MIB, "block sizes {minimum}..{maximum}:\n{}", out.stdout);

    // The capability check nbdcopy and nbdfuse rely on to open several connections.
    let can = run(Command::new("nbdinfo").args(["--can", "multi-conn", &uri]), TIMEOUT).unwrap();
    assert!(can.status.success(), "{}", can.describe());

    // Every volume is listed; an unknown export is refused, and the daemon says so.
    let list = run_ok(
        Command::new("nbdinfo").args([
            "--list",
            "--json",
            &format!("nbd+unix://?socket={}", daemon.socket().display()),
        ]),
        TIMEOUT,
    )
    .unwrap();
    let listed: Value = serde_json::from_str(&list.stdout).unwrap();
    let mut names: Vec<&str> =
        listed["exports"].as_array().unwrap().iter().filter_map(|e| e["export-name"].as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["other", "vol"], "{}", list.stdout);
    let unknown = run(Command::new("nbdinfo").arg(daemon.uri("nope")), TIMEOUT).unwrap();
    assert!(!unknown.status.success(), "nbdinfo accepted an unknown export:\n{}", unknown.describe());
}

/// A 64 MiB image mixing random data, holes, explicit zeros and partly written chunks.
fn make_image(path: &Path, size: u64, rng: &mut impl Rng) {
    let mut file = std::fs::File::create(path).unwrap();
    file.set_len(size).unwrap();
    let chunk = MIB;
    let mut buf = vec![0u8; chunk as usize];
    for index in 0..size / chunk {
        let offset = index * chunk;
        // Make sure every kind appears at least once, whatever the seed.
        let kind = if index < 4 { index } else { rng.gen_range(0..4) };
        match kind {
            0 => {} // hole
            1 => {
                rng.fill_bytes(&mut buf);
                file.seek(SeekFrom::Start(offset)).unwrap();
                file.write_all(&buf).unwrap();
            }
            2 => {
                file.seek(SeekFrom::Start(offset)).unwrap();
                file.write_all(&vec![0u8; chunk as usize]).unwrap();
            }
            _ => {
                let start = rng.gen_range(0..chunk / 4096) * 4096 + rng.gen_range(0..8) * 512;
                let len = rng.gen_range(1..=(chunk - start) / 512) * 512;
                rng.fill_bytes(&mut buf[..len as usize]);
                file.seek(SeekFrom::Start(offset + start)).unwrap();
                file.write_all(&buf[..len as usize]).unwrap();
            }
        }
    }
    file.sync_all().unwrap();
}

/// Compares two files byte for byte, naming the first difference.
fn assert_same_contents(expected: &Path, actual: &Path) {
    let (mut a, mut b) = (std::fs::File::open(expected).unwrap(), std::fs::File::open(actual).unwrap());
    assert_eq!(a.metadata().unwrap().len(), b.metadata().unwrap().len(), "{} has the wrong size", actual.display());
    let (mut x, mut y) = (vec![0u8; MIB as usize], vec![0u8; MIB as usize]);
    let mut offset = 0u64;
    loop {
        let n = a.read(&mut x).unwrap();
        if n == 0 {
            break;
        }
        b.read_exact(&mut y[..n]).unwrap();
        if x[..n] != y[..n] {
            let at = x[..n].iter().zip(&y[..n]).position(|(p, q)| p != q).unwrap();
            panic!(
                "{} differs from {} at byte {}: expected {:#04x}, found {:#04x}",
                actual.display(),
                expected.display(),
                offset + at as u64,
                x[at],
                y[at]
            );
        }
        offset += n as u64;
    }
}

#[test]
fn nbdcopy_round_trip_survives_sigkill() {
    const SIZE: u64 = 64 * MIB;
    let mut rng = seeded("nbdcopy_round_trip_survives_sigkill");
    let mut daemon = Daemon::start(&[("vol", "64MiB")]).unwrap();
    let uri = daemon.uri("vol");
    let work = tempfile::tempdir().unwrap();
    // Fill the volume first, so the image's holes must really be zeroed by the copy.
    let fill = strings(&["write -P 0xff 0 32M", "write -P 0xff 32M 32M", "flush"]);
    assert_qemu_io_clean(&qemu_io(&uri, &fill), &fill);

    let image = work.path().join("image.raw");
    make_image(&image, SIZE, &mut rng);
    run_ok(Command::new("nbdcopy").arg("--flush").arg(&image).arg(&uri), TIMEOUT).unwrap();
    let copy = work.path().join("copy.raw");
    run_ok(Command::new("nbdcopy").arg(&uri).arg(&copy), TIMEOUT).unwrap();
    assert_same_contents(&image, &copy);

    // The copy was flushed: it survives a crash of the daemon.
    daemon.kill9();
    daemon.restart().unwrap();
    let after = work.path().join("after-restart.raw");
    run_ok(Command::new("nbdcopy").arg(&uri).arg(&after), TIMEOUT).unwrap();
    assert_same_contents(&image, &after);
}

/// Runs fio with crc32c verification: `jobs` jobs, each on its own connection and its
/// own `per_job` bytes starting at `base`, then checks fio's JSON report.
fn fio_verify(uri: &str, dir: &Path, name: &str, bs: &str, base: u64, per_job: u64, jobs: u32) {
    let report = dir.join(format!("{name}.json"));
    let out = run(
        Command::new("fio")
            .current_dir(dir)
            .arg(format!("--name={name}"))
            .arg("--ioengine=nbd")
            .arg(format!("--uri={uri}"))
            .arg("--rw=randwrite")
            .arg(format!("--bs={bs}"))
            .arg("--iodepth=16")
            .arg(format!("--numjobs={jobs}"))
            .arg(format!("--offset={base}"))
            .arg(format!("--size={per_job}"))
            .arg(format!("--offset_increment={per_job}"))
            .arg("--verify=crc32c")
            .arg("--verify_fatal=1")
            .arg("--do_verify=1")
            .arg("--verify_state_save=0")
            .arg("--output-format=json")
            .arg(format!("--output={}", report.display())),
        TIMEOUT,
    )
    .unwrap();
    let text = std::fs::read_to_string(&report).unwrap_or_default();
    assert!(out.status.success(), "{}\n--- report:\n{text}", out.describe());
    assert!(!out.combined().contains("verify:"), "fio reported a verification problem:\n{}", out.describe());
    let json: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}\n{}", out.describe()));
    let reported = json["jobs"].as_array().expect("jobs");
    assert_eq!(reported.len(), jobs as usize, "{text}");
    for job in reported {
        assert_eq!(job["error"], 0, "fio job failed:\n{text}");
        // Every byte written once, then read back and verified.
        assert_eq!(job["write"]["io_bytes"], per_job, "fio wrote less than asked:\n{text}");
        assert_eq!(job["read"]["io_bytes"], per_job, "fio verified less than it wrote:\n{text}");
    }
}

#[test]
fn fio_verified_random_writes_on_parallel_connections() {
    let daemon = Daemon::start(&[("vol", "192MiB")]).unwrap();
    let uri = daemon.uri("vol");
    let work = tempfile::tempdir().unwrap();
    fio_verify(&uri, work.path(), "rand4k", "4k", 0, 8 * MIB, 4);
    fio_verify(&uri, work.path(), "rand64k", "64k", 64 * MIB, 32 * MIB, 4);
}

#[test]
fn flush_on_one_connection_covers_writes_on_others() {
    const BLOCK: usize = 64 * 1024;
    let mut rng = seeded("flush_on_one_connection_covers_writes_on_others");
    let mut daemon = Daemon::start(&[("vol", "32MiB")]).unwrap();
    let socket = daemon.socket();
    let mut a = NbdClient::connect(&socket, "vol").unwrap();
    let mut b = NbdClient::connect(&socket, "vol").unwrap();
    let mut c = NbdClient::connect(&socket, "vol").unwrap();
    const SEND_FLUSH: u16 = 1 << 2;
    const CAN_MULTI_CONN: u16 = 1 << 8;
    assert_eq!(a.flags() & (SEND_FLUSH | CAN_MULTI_CONN), SEND_FLUSH | CAN_MULTI_CONN, "flags {:#x}", a.flags());

    let mut written = Vec::new();
    for i in 0..64u64 {
        let mut data = vec![0u8; BLOCK];
        rng.fill_bytes(&mut data);
        let offset = i * 3 * BLOCK as u64; // every third block: the gaps stay zero
        if i % 2 == 0 { &mut a } else { &mut c }.write(offset, &data, false).unwrap();
        written.push((offset, data));
    }
    // Answered writes are visible on every connection, before any flush.
    let mut buf = vec![0u8; BLOCK];
    for (offset, data) in &written {
        b.read(*offset, &mut buf).unwrap();
        assert!(buf == *data, "connection B does not see the write at {offset}");
    }
    b.flush().unwrap();
    daemon.kill9();
    for client in [a, b, c] {
        let _ = client.disconnect();
    }
    daemon.restart().unwrap();

    let mut d = NbdClient::connect(&daemon.socket(), "vol").unwrap();
    for (offset, data) in &written {
        d.read(*offset, &mut buf).unwrap();
        assert!(buf == *data, "the write at {offset} (acknowledged before B's flush) was lost");
        d.read(offset + BLOCK as u64, &mut buf).unwrap();
        assert!(buf.iter().all(|&x| x == 0), "unwritten block at {} is not zero", offset + BLOCK as u64);
    }
}
