//! Zero loss under SIGKILL: a process that acknowledges writes is killed at a random
//! moment; afterwards every write covered by an acknowledged FLUSH or FUA is present,
//! byte for byte, and nothing holds data that was never written there.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use keel_engine::{OpenOptions, PosixEnv, Volume, VolumeOptions};
use keel_tests::daemon::{workspace_bin, Daemon};
use keel_tests::nbd_client::NbdClient;
use keel_tests::workload::{generate, seeded, verify, Load};
use rand::Rng;

/// A random pause that decides *where* between two acknowledgements the kill lands. It
/// waits for nothing; the test's progress is driven by the acks it reads.
fn random_moment(rng: &mut impl Rng) {
    std::thread::sleep(Duration::from_micros(rng.gen_range(0..3000)));
}

#[test]
fn engine_process_killed_at_random_loses_no_acknowledged_write() {
    let (mut rng, seed) = seeded("engine_process_killed_at_random_loses_no_acknowledged_write");
    const SIZE: u64 = 8 << 20;
    const OPS: usize = 200_000;
    for trial in 0..8 {
        let trial_seed = seed.wrapping_add(trial);
        let dir = tempfile::tempdir().unwrap();
        let env = Arc::new(PosixEnv::posix());
        // Small segments so trials cross segment rolls, slot reuse and checkpoints.
        let options = VolumeOptions { segment_bytes: 1 << 20, segment_count_max: 4, ..VolumeOptions::default() };
        Volume::create(env.clone(), dir.path(), "crash", SIZE, &options).unwrap();
        let mut child = Command::new(workspace_bin("keel-crash-writer"))
            .arg(dir.path())
            .arg(trial_seed.to_string())
            .arg(OPS.to_string())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        assert_eq!(lines.next().unwrap().unwrap(), "ready");
        let kill_after = rng.gen_range(1..200);
        let mut acked = 0;
        for line in lines.by_ref() {
            let line = line.unwrap();
            if let Some(n) = line.strip_prefix("ack ") {
                acked = n.parse().unwrap();
                if acked >= kill_after {
                    break;
                }
            }
        }
        random_moment(&mut rng);
        child.kill().unwrap();
        child.wait().unwrap();
        // Acks the child printed before it died count too: the client saw them.
        for line in lines.map_while(Result::ok) {
            if let Some(n) = line.strip_prefix("ack ") {
                acked = n.parse().unwrap();
            }
        }
        eprintln!("trial {trial}: killed after {acked} acknowledged ops");
        let (volume, report) = Volume::open(env, dir.path(), &OpenOptions::default())
            .unwrap_or_else(|e| panic!("trial {trial} (seed {trial_seed}): reopen failed: {e}"));
        let mut contents = vec![0u8; SIZE as usize];
        volume.read(0, &mut contents).unwrap();
        let ops = generate(trial_seed, SIZE, OPS);
        if let Err(violation) = verify(trial_seed, &ops, acked, OPS, &contents) {
            panic!("trial {trial} (seed {trial_seed}), {acked} ops acknowledged, recovery {report:?}: {violation}");
        }
    }
}

/// Several connections write disjoint parts of one volume concurrently (so their flushes
/// share group commits) while the daemon is killed with SIGKILL at a random moment; each
/// connection's acknowledged writes must survive.
#[test]
fn daemon_killed_under_nbd_load_loses_no_acknowledged_write() {
    let (mut rng, seed) = seeded("daemon_killed_under_nbd_load_loses_no_acknowledged_write");
    const SIZE: u64 = 24 << 20;
    const CLIENTS: u64 = 3;
    const PART: u64 = SIZE / CLIENTS;
    const OPS: usize = 100_000;
    let mut daemon = Daemon::start(&[("crash", "24MiB")]).unwrap();
    for trial in 0..8u64 {
        let mut setup = NbdClient::connect(&daemon.socket(), "crash").unwrap();
        // Start from a known state: zero the volume and make it durable.
        setup.write_zeroes(0, SIZE as u32).unwrap();
        setup.flush().unwrap();
        let seeds: Vec<u64> = (0..CLIENTS).map(|i| seed.wrapping_add(trial * CLIENTS + i)).collect();
        let load = Load::start(&daemon.socket(), "crash", &seeds, PART, OPS).unwrap();
        load.wait_acked(rng.gen_range(1..120));
        random_moment(&mut rng);
        daemon.kill9();
        daemon.restart().unwrap();
        let mut reader = NbdClient::connect(&daemon.socket(), "crash").unwrap();
        match load.verify(&mut reader) {
            Ok(acked) => eprintln!("trial {trial}: daemon killed after {acked:?} acknowledged ops"),
            Err(violations) => panic!("trial {trial}: {violations}\n{}", daemon.log()),
        }
    }
}
