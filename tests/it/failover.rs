//! Zero loss across failover: a replicated pair (two `keel daemon` processes and a
//! `keel witness`, on loopback with mutual TLS) under a write+flush load; the primary is
//! killed with SIGKILL at a random moment; the standby must promote by itself and hold
//! every write covered by an acknowledged FLUSH or FUA, byte for byte. The killed node then
//! returns, rejoins as standby and resyncs; the next trial kills the other node.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keel_engine::{OpenOptions, PosixEnv, Volume};
use keel_tests::cluster::{Cluster, ClusterOptions};
use keel_tests::nbd_client::NbdClient;
use keel_tests::workload::{generate, run_client, seeded, verify, Load};
use rand::Rng;

/// One cluster test at a time: each runs three processes and a steady write load, and
/// their timing (leases, failure detection) must not starve on a two-core machine.
pub(crate) static CLUSTER_LOCK: Mutex<()> = Mutex::new(());

const SIZE: u64 = 16 << 20;
const CLIENTS: u64 = 2;
const PART: u64 = SIZE / CLIENTS;
const OPS: usize = 100_000;

fn trials() -> u64 {
    std::env::var("KEEL_FAILOVER_TRIALS").ok().and_then(|s| s.parse().ok()).unwrap_or(20)
}

#[test]
fn primary_killed_at_random_the_standby_takes_over_with_every_acknowledged_write() {
    let _serial = CLUSTER_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let (mut rng, seed) = seeded("primary_killed_at_random_the_standby_takes_over_with_every_acknowledged_write");
    let options = ClusterOptions { volumes: vec![("crash".into(), "16MiB".into())], ..ClusterOptions::default() };
    let mut cluster = Cluster::start(&options).unwrap();
    let mut rtos = Vec::new();
    for trial in 0..trials() {
        let primary = cluster.wait_in_sync("crash", Duration::from_secs(120)).unwrap();
        let standby = 1 - primary;
        let mut setup = NbdClient::connect(&cluster.socket(primary), "crash").unwrap();
        setup.write_zeroes(0, SIZE as u32).unwrap();
        setup.flush().unwrap();
        drop(setup);
        let seeds: Vec<u64> = (0..CLIENTS).map(|i| seed.wrapping_add(trial * CLIENTS + i)).collect();
        let load = Load::start(&cluster.socket(primary), "crash", &seeds, PART, OPS).unwrap();
        load.wait_acked(rng.gen_range(1..150));
        // A random moment between two acknowledgements; progress is driven by the acks.
        std::thread::sleep(Duration::from_micros(rng.gen_range(0..3000)));
        let killed_at = Instant::now();
        cluster.nodes[primary].kill9();
        cluster.wait_primary(standby, "crash", Duration::from_secs(30)).unwrap();
        let rto = killed_at.elapsed();
        rtos.push(rto);
        let mut reader = NbdClient::connect(&cluster.socket(standby), "crash").unwrap();
        match load.verify(&mut reader) {
            Ok(acked) => eprintln!(
                "trial {trial}: killed {}, {} took over in {rto:?}; acknowledged ops per client {acked:?}",
                cluster.nodes[primary].name, cluster.nodes[standby].name
            ),
            Err(violations) => panic!("trial {trial}: {violations}\n{}", cluster.describe()),
        }
        drop(reader);
        // The old primary returns: it must step down and resync from the new primary.
        cluster.nodes[primary].start().unwrap();
    }
    let back = cluster.wait_in_sync("crash", Duration::from_secs(120)).unwrap();
    rtos.sort();
    eprintln!(
        "failover RTO over {} trials: median {:?}, max {:?} (kill -9 to writable on the standby)",
        rtos.len(),
        rtos[rtos.len() / 2],
        rtos[rtos.len() - 1]
    );
    // Both copies are identical once the returning node caught up.
    let expected_last = cluster.volume_status(back, "crash").unwrap()["last_seq"].as_u64().unwrap();
    keel_tests::cluster::until("standby caught up", Duration::from_secs(60), || {
        cluster.volume_status(back, "crash").is_ok_and(|s| s["peer"]["acked_seq"].as_u64() >= Some(expected_last))
    })
    .unwrap();
    for node in &mut cluster.nodes {
        node.stop().unwrap();
    }
    let env = Arc::new(PosixEnv::posix());
    let read_all = |node: usize| {
        let (volume, _) =
            Volume::open(env.clone(), &cluster.volume_dir(node, "crash"), &OpenOptions::default()).unwrap();
        let mut contents = vec![0u8; SIZE as usize];
        volume.read(0, &mut contents).unwrap();
        contents
    };
    let (a, b) = (read_all(0), read_all(1));
    let differing = a.chunks(4096).zip(b.chunks(4096)).filter(|(x, y)| x != y).count();
    assert_eq!(differing, 0, "the two copies differ in {differing} 4 KiB blocks\n{}", cluster.describe());
}

/// `keel switchover` under a write load: the standby becomes primary with every write the
/// old primary acknowledged, the old primary becomes its standby and catches up, and the
/// answer reports the write pause.
#[test]
fn a_planned_switchover_moves_the_primary_without_losing_a_write() {
    let _serial = CLUSTER_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let (_, seed) = seeded("a_planned_switchover_moves_the_primary_without_losing_a_write");
    let options = ClusterOptions { volumes: vec![("vol".into(), "16MiB".into())], ..ClusterOptions::default() };
    let cluster = Cluster::start(&options).unwrap();
    let primary = cluster.wait_in_sync("vol", Duration::from_secs(60)).unwrap();
    let ops = Arc::new(generate(seed, SIZE, OPS));
    let acked = Arc::new(AtomicUsize::new(0));
    let client = NbdClient::connect(&cluster.socket(primary), "vol").unwrap();
    let worker = {
        let (ops, acked) = (ops.clone(), acked.clone());
        std::thread::spawn(move || run_client(client, seed, 0, &ops, &acked))
    };
    keel_tests::cluster::until("some acknowledged writes", Duration::from_secs(60), || {
        acked.load(Ordering::SeqCst) >= 50 || worker.is_finished()
    })
    .unwrap();
    let answer = cluster.control(primary, &serde_json::json!({"op": "switchover", "volume": "vol"})).unwrap();
    assert_eq!(answer["result"], "done", "{answer}\n{}", cluster.describe());
    let pause = answer["details"]["write_pause_ms"].as_u64().unwrap();
    // The old primary stops answering writes; the client sees an error and stops.
    worker.join().unwrap();
    let new = 1 - primary;
    cluster.wait_primary(new, "vol", Duration::from_secs(30)).unwrap();
    let acked = acked.load(Ordering::SeqCst);
    let mut reader = NbdClient::connect(&cluster.socket(new), "vol").unwrap();
    let mut contents = vec![0u8; SIZE as usize];
    for (i, chunk) in contents.chunks_mut(1 << 20).enumerate() {
        reader.read((i as u64) << 20, chunk).unwrap();
    }
    if let Err(violation) = verify(seed, &ops, acked, OPS, &contents) {
        panic!("seed {seed}, {acked} ops acknowledged before the switchover: {violation}\n{}", cluster.describe());
    }
    assert_eq!(cluster.wait_in_sync("vol", Duration::from_secs(60)).unwrap(), new);
    let old = cluster.volume_status(primary, "vol").unwrap();
    assert_eq!(old["role"], "standby", "{old}");
    eprintln!("switchover after {acked} acknowledged ops: write pause {pause} ms");
}

/// A standby whose primary is alive (its lease running) is not promoted on request; the
/// answer says why.
#[test]
fn promote_is_refused_while_the_primary_holds_its_lease() {
    let _serial = CLUSTER_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let cluster = Cluster::start(&ClusterOptions::default()).unwrap();
    let primary = cluster.wait_in_sync("vol", Duration::from_secs(60)).unwrap();
    let answer =
        cluster.control(1 - primary, &serde_json::json!({"op": "promote", "volume": "vol", "force": false})).unwrap();
    assert_eq!(answer["result"], "refused", "{answer}");
    assert!(answer["message"].as_str().unwrap().contains("lease"), "{answer}");
    // Nothing changed.
    assert_eq!(cluster.wait_in_sync("vol", Duration::from_secs(10)).unwrap(), primary);
}

/// `mode = "async"`: FLUSHes complete on the primary alone while the standby is frozen,
/// the lag is reported in `keel status` and bounded by the ship queue, and the standby
/// catches up once it runs again.
#[test]
fn an_async_volume_flushes_without_its_standby_and_reports_the_lag() {
    let _serial = CLUSTER_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let extra = "mode = \"async\"".to_string();
    let options = ClusterOptions { volume_extra: [extra.clone(), extra], ..ClusterOptions::default() };
    let cluster = Cluster::start(&options).unwrap();
    let primary = cluster.wait_in_sync("vol", Duration::from_secs(60)).unwrap();
    let standby = 1 - primary;
    cluster.nodes[standby].freeze();
    let mut client = NbdClient::connect(&cluster.socket(primary), "vol").unwrap();
    for i in 0..32u64 {
        client.write(i * 65536, &vec![i as u8 + 1; 65536], false).unwrap();
        client.flush().unwrap();
    }
    let status = cluster.volume_status(primary, "vol").unwrap();
    assert_eq!(status["mode"], "async", "{status}");
    assert!(status["peer"]["lag_seqs"].as_u64() >= Some(32), "the lag is not reported: {status}");
    cluster.nodes[standby].resume();
    keel_tests::cluster::until("the standby caught up", Duration::from_secs(60), || {
        cluster.volume_status(primary, "vol").is_ok_and(|s| s["peer"]["lag_seqs"] == 0)
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", cluster.describe()));
    // An async standby may lack acknowledged writes: promoting it needs --force.
    let answer =
        cluster.control(standby, &serde_json::json!({"op": "promote", "volume": "vol", "force": false})).unwrap();
    assert_eq!(answer["result"], "refused", "{answer}");
    assert!(answer["message"].as_str().unwrap().contains("asynchronously"), "{answer}");
}

/// Regression (found by the replication benchmark): `keel status` while a sequential
/// write had filled the ship queue deadlocked the primary for good. A writer held the
/// journal lock waiting for queue room, the status request held the volume's replication
/// state waiting for the journal lock on one tokio worker, the fence loop waited for that
/// state on the other, so nothing drained the queue. Status now reads only lock-free
/// counters from the engine.
#[test]
fn status_answers_while_writers_wait_for_the_ship_queue() {
    let _serial = CLUSTER_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let options = ClusterOptions { volumes: vec![("big".into(), "256MiB".into())], ..ClusterOptions::default() };
    let cluster = Cluster::start(&options).unwrap();
    let primary = cluster.wait_in_sync("big", Duration::from_secs(60)).unwrap();
    let standby = 1 - primary;
    // A frozen standby stops draining: the QUIC window and then the ship queue fill up.
    cluster.nodes[standby].freeze();
    let written = Arc::new(AtomicUsize::new(0));
    let mut client = NbdClient::connect(&cluster.socket(primary), "big").unwrap();
    let writer = {
        let written = written.clone();
        std::thread::spawn(move || {
            let block = vec![0x5a; 1 << 20];
            for i in 0..200u64 {
                if client.write(i << 20, &block, false).is_err() {
                    return;
                }
                written.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        let asked = Instant::now();
        cluster.status(primary).unwrap_or_else(|e| panic!("status did not answer: {e:#}\n{}", cluster.describe()));
        assert!(asked.elapsed() < Duration::from_secs(5), "status took {:?}", asked.elapsed());
    }
    cluster.nodes[standby].resume();
    writer.join().unwrap();
    assert_eq!(written.load(Ordering::SeqCst), 200, "writes stopped\n{}", cluster.describe());
    cluster.wait_in_sync("big", Duration::from_secs(60)).unwrap();
}
