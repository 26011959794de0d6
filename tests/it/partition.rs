//! Network partitions and the fencing cases of design-fencing.md, with real processes: a
//! `keel witness` and two `keel daemon` nodes (mutual-TLS QUIC), every link through a
//! userspace UDP fault proxy ([`keel_tests::proxy`]) or, in one test, through network
//! namespaces with iptables DROP rules ([`keel_tests::netns`]).
//!
//! Every scenario runs the crash workload (write, zero, trim, FLUSH, FUA) against the
//! primary, records which ops an acknowledged FLUSH or FUA covers, and verifies every one
//! of them, byte for byte, on whichever node is primary at the end; a [`PrimaryWatch`]
//! samples both nodes throughout and fails the test if two were ever writable primaries at
//! once; and at the end both nodes are stopped and their volume files compared.

use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_engine::{OpenOptions, PosixEnv, Volume};
use keel_tests::cluster::{until, Cluster, ClusterOptions, Load, Network, PrimaryWatch, W};
use keel_tests::workload::seeded;
use serde_json::{json, Value};

use crate::failover::CLUSTER_LOCK;

const VOLUME: &str = "vol";
const SIZE: u64 = 16 << 20;
/// Each load uses two clients of a quarter of the volume each: the first load (on the
/// original primary) the first half, a second load (on a promoted standby) the second.
const PART: u64 = SIZE / 4;
const CLIENTS: u64 = 2;
/// More ops than any scenario gets through; loads are stopped, not run dry.
const OPS: usize = 1_000_000;
/// Generous bound for anything that should take a few seconds.
const STATE_TIMEOUT: Duration = Duration::from_secs(30);

fn start(network: Network) -> Cluster {
    let options =
        ClusterOptions { volumes: vec![(VOLUME.into(), "16MiB".into())], network, ..ClusterOptions::default() };
    Cluster::start(&options).expect("start the cluster")
}

fn fields(event: &Value) -> &Value {
    &event["fields"]
}

/// `node`'s status of the volume (panics with the cluster's state when it does not answer).
fn status(cluster: &Cluster, node: usize) -> Value {
    cluster
        .volume_status(node, VOLUME)
        .unwrap_or_else(|e| panic!("status of node {node}: {e:#}\n{}", cluster.describe()))
}

/// Waits until `primary`'s standby is connected, UpToDate at the witness, and has
/// acknowledged everything the primary holds.
fn wait_converged(cluster: &Cluster, primary: usize) {
    let in_sync = cluster.wait_in_sync(VOLUME, Duration::from_secs(60)).expect("pair in sync");
    assert_eq!(
        in_sync, primary,
        "{} is primary, expected {}",
        cluster.nodes[in_sync].name, cluster.nodes[primary].name
    );
    let last = status(cluster, primary)["last_seq"].as_u64().expect("last_seq");
    until("the standby acknowledged everything", Duration::from_secs(60), || {
        cluster.volume_status(primary, VOLUME).is_ok_and(|s| s["peer"]["acked_seq"].as_u64() >= Some(last))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", cluster.describe()));
}

/// Stops both nodes and checks that their volume files hold the same bytes (a standby
/// does not serve reads, so the copies are compared offline).
fn assert_copies_identical(cluster: &mut Cluster) {
    for node in &mut cluster.nodes {
        node.stop().expect("stop a node");
    }
    let env = Arc::new(PosixEnv::posix());
    let read_all = |node: usize| {
        let (volume, _) = Volume::open(env.clone(), &cluster.volume_dir(node, VOLUME), &OpenOptions::default())
            .expect("open the volume offline");
        let mut contents = vec![0u8; SIZE as usize];
        volume.read(0, &mut contents).expect("read the volume offline");
        contents
    };
    let (a, b) = (read_all(0), read_all(1));
    let differing: Vec<usize> =
        a.chunks(4096).zip(b.chunks(4096)).enumerate().filter(|(_, (x, y))| x != y).map(|(i, _)| i).collect();
    if !differing.is_empty() {
        let first: Vec<String> = differing.iter().take(20).map(|i| format!("{:#x}", i * 4096)).collect();
        let events: Vec<String> = (0..2)
            .flat_map(|node| cluster.events(node).into_iter().map(move |e| format!("{node}: {e}")))
            .filter(|e| e.contains("resync") || e.contains("\"peer\"") || e.contains("role"))
            .collect();
        panic!(
            "the two copies differ in {} 4 KiB blocks, first at {}\nevents:\n{}\n{}",
            differing.len(),
            first.join(" "),
            events.join("\n"),
            cluster.describe()
        );
    }
}

fn assert_one_primary(watch: PrimaryWatch, cluster: &Cluster) {
    let report = watch.finish();
    eprintln!("primary watch: {} samples; timeline:\n  {}", report.samples, report.timeline.join("\n  "));
    assert!(report.samples > 20, "the watch took only {} samples", report.samples);
    assert!(
        report.violations.is_empty(),
        "two writable primaries:\n{}\n{}",
        report.violations.join("\n"),
        cluster.describe()
    );
}

fn verify(load: &Load, cluster: &Cluster, node: usize, what: &str) {
    if let Err(e) = load.verify_on(cluster, node, VOLUME) {
        panic!(
            "{what}: an acknowledged write is missing on {}: {e:#}\n{}",
            cluster.nodes[node].name,
            cluster.describe()
        );
    }
}

/// Waits until `deadline` while `check` keeps holding (it is polled every 10 ms): the
/// partition lasts its full length, and the invariant is watched throughout.
fn hold_until(deadline: Instant, what: &str, mut check: impl FnMut() -> Result<(), String>) {
    while Instant::now() < deadline {
        if let Err(e) = check() {
            panic!("{what}: {e}");
        }
        std::thread::sleep(Duration::from_millis(10).min(deadline.saturating_duration_since(Instant::now())));
    }
}

/// P–S link cut, both reach W (design-fencing.md: "as S dies"): P marks S Outdated at the
/// witness and keeps completing FLUSHes; S asks to be promoted and is refused; after the
/// cut heals, S resyncs and becomes UpToDate again. No write acknowledged by P is lost.
fn primary_standby_cut(test: &str, network: Network, length: Duration) {
    let _serial = CLUSTER_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let (_, seed) = seeded(test);
    let mut cluster = start(network);
    let watch = PrimaryWatch::start(&cluster, VOLUME);
    let mut load = Load::start(&cluster.socket(0), VOLUME, seed, 0, PART, CLIENTS, OPS).expect("start the load");
    load.wait_progress(200, STATE_TIMEOUT).expect("load before the cut");
    let marks = [cluster.event_mark(0), cluster.event_mark(1)];

    let cut_at = Instant::now();
    cluster.cut_link(0, 1, true).expect("cut P-S");
    let outdated = cluster
        .wait_event_since(0, marks[0], "peer", |e| fields(e)["standby_state"] == "Outdated", STATE_TIMEOUT)
        .expect("P marks S Outdated");
    eprintln!("{test}: P recorded S Outdated at the witness {:?} after the cut", cut_at.elapsed());
    let stalled = load.wait_progress(100, STATE_TIMEOUT).expect("flushes complete after the mark");
    eprintln!("{test}: 100 more ops acknowledged by P alone within {stalled:?}");
    let refused = cluster
        .wait_event_since(1, marks[1], "promote_refused", |_| true, STATE_TIMEOUT)
        .expect("S asks for promotion and is refused");
    eprintln!("{test}: S's promotion refused: {}", fields(&refused));
    assert!(fields(&outdated).is_object());
    hold_until(cut_at + length, "during the cut", || {
        let s = cluster.volume_status(1, VOLUME).map_err(|e| e.to_string())?;
        if s["role"] != "standby" {
            return Err(format!("S left the standby role while P serves: {s}"));
        }
        match load.errors().first() {
            Some(error) => Err(format!("the load on P failed: {error:?}")),
            None => Ok(()),
        }
    });
    let acked_during_cut = load.acked();

    cluster.cut_link(0, 1, false).expect("heal P-S");
    let healed_at = Instant::now();
    cluster
        .wait_event_since(1, marks[1], "resync", |e| fields(e)["state"] == "done", Duration::from_secs(60))
        .expect("S resyncs after the cut");
    wait_converged(&cluster, 0);
    eprintln!("{test}: S resynced and UpToDate {:?} after healing", healed_at.elapsed());
    load.wait_progress(100, STATE_TIMEOUT).expect("flushes complete with S back");
    load.stop();
    assert!(load.errors().is_empty(), "the load on P failed: {:?}", load.errors());
    eprintln!(
        "{test}: {} ops acknowledged ({acked_during_cut} by the end of the cut), per client {:?}",
        load.acked(),
        load.counts()
    );
    verify(&load, &cluster, 0, test);
    wait_converged(&cluster, 0);
    assert!(
        cluster.events_since(1, marks[1]).iter().all(|e| e["kind"] != "promote"),
        "S was promoted while P was serving\n{}",
        cluster.describe()
    );
    assert_one_primary(watch, &cluster);
    assert_copies_identical(&mut cluster);
}

/// P cut from everyone: its FLUSHes stall, it stops answering writes when its lease ends,
/// W promotes S (epoch + 1) with every acknowledged write; S serves a load of its own.
/// After the partition heals, the old P sees the higher epoch, steps down, discards its
/// unconfirmed tail, resyncs, and ends identical to the new primary.
fn primary_isolated(test: &str, length: Duration) {
    let _serial = CLUSTER_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let (_, seed) = seeded(test);
    let mut cluster = start(Network::Proxied);
    let epoch = status(&cluster, 0)["epoch"].as_u64().expect("epoch");
    let watch = PrimaryWatch::start(&cluster, VOLUME);
    let mut first = Load::start(&cluster.socket(0), VOLUME, seed, 0, PART, CLIENTS, OPS).expect("start the load");
    first.wait_progress(200, STATE_TIMEOUT).expect("load before the cut");
    let marks = [cluster.event_mark(0), cluster.event_mark(1)];

    let cut_at = Instant::now();
    cluster.isolate(0, true).expect("isolate P");
    let fenced = cluster
        .wait_event_since(0, marks[0], "fence", |e| fields(e)["writes_allowed"] == false, STATE_TIMEOUT)
        .expect("P fences itself");
    eprintln!("{test}: P stopped answering writes {:?} after the cut: {}", cut_at.elapsed(), fields(&fenced));
    let promoted = cluster
        .wait_event_since(1, marks[1], "promote", |e| fields(e)["epoch"] == epoch + 1, STATE_TIMEOUT)
        .expect("S promoted");
    cluster.wait_primary(1, VOLUME, STATE_TIMEOUT).expect("S serves");
    eprintln!("{test}: S promoted to epoch {} {:?} after the cut", epoch + 1, cut_at.elapsed());
    // The fence event says when P last saw itself allowed to write (a poll every 10 ms);
    // that must come before S's promotion (both wall clocks of this machine).
    let (allowed_ms, promoted_ms) = (fields(&fenced)["last_allowed_ms"].as_u64(), promoted["time_ms"].as_u64());
    assert!(allowed_ms.is_some(), "the fence event does not say when writes were last allowed: {fenced}");
    assert!(
        allowed_ms < promoted_ms,
        "P was still allowed to answer writes at {allowed_ms:?} ms, when S was promoted at {promoted_ms:?} ms"
    );
    eprintln!(
        "{test}: P last allowed writes {} ms before S's promotion",
        promoted_ms.unwrap_or(0) - allowed_ms.unwrap_or(0)
    );
    assert!(
        cluster.write_refused(0, VOLUME, SIZE - 512, Duration::from_secs(2)).expect("try a write on P"),
        "the isolated old primary answered a write after S was promoted\n{}",
        cluster.describe()
    );
    // Whatever P's clients were doing has failed or blocks; what they saw acknowledged is on S.
    first.stop();
    eprintln!("{test}: load on P ended with {:?}; acknowledged per client {:?}", first.errors(), first.counts());
    verify(&first, &cluster, 1, "after the failover");

    let mut second =
        Load::start(&cluster.socket(1), VOLUME, seed + 100, 2 * PART, PART, CLIENTS, OPS).expect("load on S");
    second.wait_progress(200, STATE_TIMEOUT).expect("S completes flushes alone");
    hold_until(cut_at + length, "during the partition", || {
        let s = cluster.volume_status(0, VOLUME).map_err(|e| e.to_string())?;
        if s["writable"] == true {
            return Err(format!("the isolated old primary is writable: {s}"));
        }
        match second.errors().first() {
            Some(error) => Err(format!("the load on S failed: {error:?}")),
            None => Ok(()),
        }
    });

    cluster.isolate(0, false).expect("heal");
    let healed_at = Instant::now();
    let demoted = cluster
        .wait_event_since(0, marks[0], "role", |e| fields(e)["role"] == "standby", STATE_TIMEOUT)
        .expect("the old primary steps down");
    eprintln!("{test}: old P stepped down {:?} after healing: {}", healed_at.elapsed(), fields(&demoted));
    let prepared = cluster
        .wait_event_since(0, marks[0], "resync", |e| fields(e)["state"] == "prepared", STATE_TIMEOUT)
        .expect("the old primary discards its tail");
    eprintln!("{test}: old P's tail: {}", fields(&prepared));
    assert!(fields(&prepared)["discarded_records"].is_u64(), "no count of discarded records: {prepared}");
    cluster
        .wait_event_since(0, marks[0], "resync", |e| fields(e)["state"] == "done", Duration::from_secs(60))
        .expect("the old primary resyncs");
    wait_converged(&cluster, 1);
    eprintln!("{test}: old P in sync {:?} after healing", healed_at.elapsed());
    second.wait_progress(100, STATE_TIMEOUT).expect("S completes flushes with its standby back");
    second.stop();
    assert!(second.errors().is_empty(), "the load on S failed: {:?}", second.errors());
    verify(&first, &cluster, 1, "at the end");
    verify(&second, &cluster, 1, "at the end");
    wait_converged(&cluster, 1);
    assert_one_primary(watch, &cluster);
    assert_copies_identical(&mut cluster);
}

#[test]
fn primary_standby_link_cut_5s_primary_continues_alone_standby_not_promoted() {
    primary_standby_cut(
        "primary_standby_link_cut_5s_primary_continues_alone_standby_not_promoted",
        Network::Proxied,
        Duration::from_secs(5),
    );
}

#[test]
fn primary_standby_link_cut_30s_primary_continues_alone_standby_not_promoted() {
    primary_standby_cut(
        "primary_standby_link_cut_30s_primary_continues_alone_standby_not_promoted",
        Network::Proxied,
        Duration::from_secs(30),
    );
}

#[test]
fn primary_cut_from_everyone_5s_fences_itself_and_the_standby_takes_over() {
    primary_isolated("primary_cut_from_everyone_5s_fences_itself_and_the_standby_takes_over", Duration::from_secs(5));
}

#[test]
fn primary_cut_from_everyone_30s_fences_itself_and_the_standby_takes_over() {
    primary_isolated("primary_cut_from_everyone_30s_fences_itself_and_the_standby_takes_over", Duration::from_secs(30));
}

/// W down, P and S fine: replication continues on the standby's acks alone (past P's
/// witness lease). Then P dies while W is down: S must not promote itself, and the
/// operator's `keel promote --force` is refused (it needs the witness). W returns: S
/// promotes (P's lease has expired), with every acknowledged write. The old P returns
/// after the failover, becomes the standby and converges.
#[test]
fn witness_down_replication_continues_then_primary_dies_and_nobody_promotes_until_the_witness_returns() {
    let test = "witness_down_replication_continues_then_primary_dies_and_nobody_promotes_until_the_witness_returns";
    let _serial = CLUSTER_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let (_, seed) = seeded(test);
    let mut cluster = start(Network::Loopback);
    let epoch = status(&cluster, 0)["epoch"].as_u64().expect("epoch");
    let watch = PrimaryWatch::start(&cluster, VOLUME);
    let mut load = Load::start(&cluster.socket(0), VOLUME, seed, 0, PART, CLIENTS, OPS).expect("start the load");
    load.wait_progress(200, STATE_TIMEOUT).expect("load before the witness goes");

    cluster.witness_down();
    let down_at = Instant::now();
    until("P's witness lease ran out", STATE_TIMEOUT, || {
        cluster.volume_status(0, VOLUME).is_ok_and(|s| s["fence"]["lease_remaining_ms"] == 0)
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", cluster.describe()));
    let took = load.wait_progress(300, STATE_TIMEOUT).expect("writes and flushes continue without the witness");
    let s = status(&cluster, 0);
    assert_eq!(s["writable"], true, "P stopped answering writes without the witness: {s}");
    assert_eq!(s["peer"]["state"], "UpToDate", "{s}");
    eprintln!("{test}: 300 ops acknowledged in {took:?} with the witness down for {:?}", down_at.elapsed());

    let marks = [cluster.event_mark(0), cluster.event_mark(1)];
    let killed_at = Instant::now();
    cluster.nodes[0].kill9();
    load.wait_finished(STATE_TIMEOUT).expect("the load ends with P");
    load.stop();
    // S notices and asks the (unreachable) witness.
    until("S tried to promote", STATE_TIMEOUT, || {
        cluster.volume_status(1, VOLUME).is_ok_and(|s| {
            s["standby_fence"]["last_refusal"].as_str().is_some_and(|r| r.contains("witness unreachable"))
        })
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", cluster.describe()));
    // Twice the failover bound (≈ 3.7 s by default), then some: no automatic promotion.
    hold_until(killed_at + Duration::from_secs(8), "with the witness down", || {
        let s = cluster.volume_status(1, VOLUME).map_err(|e| e.to_string())?;
        if s["role"] != "standby" {
            return Err(format!("S promoted itself without the witness: {s}"));
        }
        Ok(())
    });
    let forced =
        cluster.control(1, &json!({"op": "promote", "volume": VOLUME, "force": true})).expect("control socket answers");
    eprintln!("{test}: forced promotion with the witness down: {forced}");
    assert_eq!(forced["result"], "refused", "{forced}");
    assert!(forced["message"].as_str().is_some_and(|m| m.contains("unreachable")), "{forced}");
    assert_eq!(status(&cluster, 1)["role"], "standby");

    cluster.witness_up().expect("restart the witness");
    let back_at = Instant::now();
    cluster
        .wait_event_since(1, marks[1], "promote", |e| fields(e)["epoch"] == epoch + 1, STATE_TIMEOUT)
        .expect("S promoted once the witness is back");
    cluster.wait_primary(1, VOLUME, STATE_TIMEOUT).expect("S serves");
    eprintln!("{test}: S promoted {:?} after the witness returned", back_at.elapsed());
    verify(&load, &cluster, 1, "after the promotion");

    // The old primary returns after the failover: it becomes the standby and converges.
    cluster.nodes[0].start().expect("restart the old primary");
    cluster
        .wait_event_since(0, marks[0], "role", |e| fields(e)["role"] == "standby", STATE_TIMEOUT)
        .expect("the old primary comes back as standby");
    wait_converged(&cluster, 1);
    verify(&load, &cluster, 1, "at the end");
    assert_one_primary(watch, &cluster);
    assert_copies_identical(&mut cluster);
}

/// S dies: P stops getting acks, asks W to mark S Outdated and continues; S returns,
/// resyncs and becomes UpToDate.
#[test]
fn standby_dies_primary_marks_it_outdated_and_continues() {
    let test = "standby_dies_primary_marks_it_outdated_and_continues";
    let _serial = CLUSTER_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let (_, seed) = seeded(test);
    let mut cluster = start(Network::Loopback);
    let watch = PrimaryWatch::start(&cluster, VOLUME);
    let mut load = Load::start(&cluster.socket(0), VOLUME, seed, 0, PART, CLIENTS, OPS).expect("start the load");
    load.wait_progress(200, STATE_TIMEOUT).expect("load before the kill");
    let marks = [cluster.event_mark(0), cluster.event_mark(1)];
    let killed_at = Instant::now();
    cluster.nodes[1].kill9();
    cluster
        .wait_event_since(0, marks[0], "peer", |e| fields(e)["standby_state"] == "Outdated", STATE_TIMEOUT)
        .expect("P marks S Outdated");
    eprintln!("{test}: S recorded Outdated {:?} after it died", killed_at.elapsed());
    load.wait_progress(300, STATE_TIMEOUT).expect("P continues alone");
    cluster.nodes[1].start().expect("restart S");
    cluster
        .wait_event_since(1, marks[1], "resync", |e| fields(e)["state"] == "done", Duration::from_secs(60))
        .expect("S resyncs");
    wait_converged(&cluster, 0);
    load.wait_progress(100, STATE_TIMEOUT).expect("flushes complete with S back");
    load.stop();
    assert!(load.errors().is_empty(), "the load on P failed: {:?}", load.errors());
    verify(&load, &cluster, 0, test);
    wait_converged(&cluster, 0);
    assert_one_primary(watch, &cluster);
    assert_copies_identical(&mut cluster);
}

/// Random loss, delay, jitter (which reorders) and duplication on the P–S link during a
/// load: nothing fails, nothing changes role, and every acknowledged write is on both.
#[test]
fn lossy_reordering_duplicating_link_between_primary_and_standby_costs_only_latency() {
    let test = "lossy_reordering_duplicating_link_between_primary_and_standby_costs_only_latency";
    let _serial = CLUSTER_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let (_, seed) = seeded(test);
    let mut cluster = start(Network::Proxied);
    let watch = PrimaryWatch::start(&cluster, VOLUME);
    let mut load = Load::start(&cluster.socket(0), VOLUME, seed, 0, PART, CLIENTS, OPS).expect("start the load");
    let clean = load.wait_progress(300, STATE_TIMEOUT).expect("load on a clean link");
    let marks = [cluster.event_mark(0), cluster.event_mark(1)];
    for (from, to) in [(0, 1), (1, 0)] {
        let proxy = cluster.proxy(from, to);
        proxy.drop_probability(0.10);
        proxy.delay(Duration::from_millis(1));
        proxy.jitter(Duration::from_millis(4));
        proxy.duplicate_probability(0.05);
    }
    let started = Instant::now();
    let lossy = load.wait_progress(300, Duration::from_secs(60)).expect("load on a lossy link");
    hold_until(started + Duration::from_secs(8), "on the lossy link", || match load.errors().first() {
        Some(error) => Err(format!("the load failed: {error:?}")),
        None => Ok(()),
    });
    for (from, to) in [(0, 1), (1, 0)] {
        let proxy = cluster.proxy(from, to);
        eprintln!("{test}: proxy {}: {:?}", proxy.name(), proxy.stats());
        proxy.heal();
    }
    let stats = cluster.proxy(0, 1).stats();
    assert!(stats.dropped_total() > 0 && stats.duplicated.iter().sum::<u64>() > 0, "no faults injected: {stats:?}");
    eprintln!("{test}: 300 ops took {clean:?} on a clean link, {lossy:?} on the lossy one");
    let s = status(&cluster, 0);
    assert_eq!(s["role"], "primary", "{s}");
    wait_converged(&cluster, 0);
    load.stop();
    assert!(load.errors().is_empty(), "the load failed: {:?}", load.errors());
    verify(&load, &cluster, 0, test);
    for (node, &mark) in marks.iter().enumerate() {
        let roles: Vec<Value> = cluster
            .events_since(node, mark)
            .into_iter()
            .filter(|e| e["kind"] == "role" || e["kind"] == "promote")
            .collect();
        assert!(roles.is_empty(), "{} changed role on a lossy link: {roles:?}", cluster.nodes[node].name);
    }
    wait_converged(&cluster, 0);
    assert_one_primary(watch, &cluster);
    assert_copies_identical(&mut cluster);
}

/// The P–S cut again, between network namespaces (one per process, joined by a bridge),
/// with iptables DROP rules inside P's namespace. Skipped, saying why, where namespaces
/// cannot be made (not root, no iptables), unless `KEEL_REQUIRE_NETNS` is set (tests/run
/// sets it, so CI always runs it).
#[test]
fn namespaces_primary_standby_cut_5s_with_iptables() {
    let test = "namespaces_primary_standby_cut_5s_with_iptables";
    if let Some(why) = keel_tests::netns::unavailable() {
        if std::env::var_os("KEEL_REQUIRE_NETNS").is_some() {
            panic!("{test}: network namespaces are required (KEEL_REQUIRE_NETNS) but unavailable: {why}");
        }
        eprintln!("SKIPPED {test}: network namespaces unavailable: {why}");
        return;
    }
    primary_standby_cut(test, Network::Namespaces, Duration::from_secs(5));
}

/// The witness link alone: cutting P from W (S still reaches both) changes nothing while
/// S acknowledges; it exercises `cut_link` with [`W`].
#[test]
fn primary_cut_from_the_witness_only_keeps_serving_on_the_standby_acks() {
    let test = "primary_cut_from_the_witness_only_keeps_serving_on_the_standby_acks";
    let _serial = CLUSTER_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let (_, seed) = seeded(test);
    let mut cluster = start(Network::Proxied);
    let watch = PrimaryWatch::start(&cluster, VOLUME);
    let mut load = Load::start(&cluster.socket(0), VOLUME, seed, 0, PART, CLIENTS, OPS).expect("start the load");
    load.wait_progress(200, STATE_TIMEOUT).expect("load before the cut");
    let marks = [cluster.event_mark(0), cluster.event_mark(1)];
    cluster.cut_link(0, W, true).expect("cut P-W");
    until("P's witness lease ran out", STATE_TIMEOUT, || {
        cluster.volume_status(0, VOLUME).is_ok_and(|s| s["fence"]["lease_remaining_ms"] == 0)
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", cluster.describe()));
    load.wait_progress(300, STATE_TIMEOUT).expect("P serves on the standby's acks");
    cluster.cut_link(0, W, false).expect("heal P-W");
    until("P renewed its lease", STATE_TIMEOUT, || {
        cluster.volume_status(0, VOLUME).is_ok_and(|s| s["fence"]["lease_remaining_ms"].as_u64() > Some(0))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", cluster.describe()));
    load.stop();
    assert!(load.errors().is_empty(), "the load failed: {:?}", load.errors());
    verify(&load, &cluster, 0, test);
    assert!(cluster.events_since(1, marks[1]).iter().all(|e| e["kind"] != "promote"), "S was promoted");
    wait_converged(&cluster, 0);
    assert_one_primary(watch, &cluster);
    assert_copies_identical(&mut cluster);
}

/// A latency spike longer than the ack timeout but shorter than the transport's idle
/// timeout: P stops hearing acks in time, records S Outdated and continues alone; once the
/// link is fast again, S must become UpToDate again (promotable), not stay Outdated.
#[test]
fn latency_spike_on_the_standby_link_outdates_it_and_it_recovers() {
    let test = "latency_spike_on_the_standby_link_outdates_it_and_it_recovers";
    let _serial = CLUSTER_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let (_, seed) = seeded(test);
    let mut cluster = start(Network::Proxied);
    let watch = PrimaryWatch::start(&cluster, VOLUME);
    let mut load = Load::start(&cluster.socket(0), VOLUME, seed, 0, PART, CLIENTS, OPS).expect("start the load");
    load.wait_progress(200, STATE_TIMEOUT).expect("load before the spike");
    let marks = [cluster.event_mark(0), cluster.event_mark(1)];
    for (from, to) in [(0, 1), (1, 0)] {
        cluster.proxy(from, to).delay(Duration::from_millis(700));
    }
    cluster
        .wait_event_since(0, marks[0], "peer", |e| fields(e)["standby_state"] == "Outdated", STATE_TIMEOUT)
        .expect("P marks the slow standby Outdated");
    load.wait_progress(100, STATE_TIMEOUT).expect("P continues alone");
    for (from, to) in [(0, 1), (1, 0)] {
        cluster.proxy(from, to).heal();
    }
    let healed_at = Instant::now();
    wait_converged(&cluster, 0);
    eprintln!("{test}: S UpToDate again {:?} after the spike", healed_at.elapsed());
    load.stop();
    assert!(load.errors().is_empty(), "the load failed: {:?}", load.errors());
    verify(&load, &cluster, 0, test);
    assert_one_primary(watch, &cluster);
    assert_copies_identical(&mut cluster);
}
