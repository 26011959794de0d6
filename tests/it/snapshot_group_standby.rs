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

use std::time::Duration;

use keel_tests::cluster::{Cluster, ClusterOptions, Network};

use crate::failover::CLUSTER_LOCK;
use crate::snapshot_group::{counter_of, PairWriter};
use crate::snapshot_standby::{json, keel, Keys};

const GROUP: &str = "[[snapshots.group]]\nname = \"shop\"\nvolumes = [\"files\", \"db\"]\n";

/// The pair `db` + `files` of 8 MiB each, both nodes with the group.
fn options(keys: &Keys, network: Network) -> ClusterOptions {
    keys.options(&[("db", "8MiB"), ("files", "8MiB")], network, GROUP)
}

#[test]
fn group_snapshots_on_the_standby_are_one_instant_of_all_members() {
    let _serial = CLUSTER_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let keys = Keys::new();
    let cluster = Cluster::start(&options(&keys, Network::Loopback)).unwrap();
    let primary = cluster.wait_in_sync("db", Duration::from_secs(60)).unwrap();
    assert_eq!(cluster.wait_in_sync("files", Duration::from_secs(60)).unwrap(), primary, "{}", cluster.describe());
    let standby = 1 - primary;

    let writer = PairWriter::start(cluster.socket(primary));

    let mut taken = Vec::new();
    for round in 0..3 {
        writer.wait_for_more(20);
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
    writer.finish();

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
    let cluster = Cluster::start(&options(&keys, Network::Proxied)).unwrap();
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

/// With a schedule and `take_on = "standby"`, a group's firing is taken on the standby,
/// whole (both members, one id, the group named), and the primary, after its grace, finds
/// the name claimed on its members and skips it: one group snapshot per firing. (Takes up
/// to two minutes: one for the firing, one for the grace.)
#[test]
fn a_scheduled_group_is_taken_once_on_the_standby() {
    let _serial = CLUSTER_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let keys = Keys::new();
    let extra = format!("schedule = \"every 1m\"\ntake_on = \"standby\"\n\n{GROUP}");
    let cluster =
        Cluster::start(&keys.options(&[("db", "8MiB"), ("files", "8MiB")], Network::Loopback, &extra)).unwrap();
    let primary = cluster.wait_in_sync("db", Duration::from_secs(60)).unwrap();
    assert_eq!(cluster.wait_in_sync("files", Duration::from_secs(60)).unwrap(), primary, "{}", cluster.describe());
    let standby = 1 - primary;
    let skipped =
        cluster.wait_event(primary, "snapshot_skipped", |e| e["volume"] == "db", Duration::from_secs(200)).unwrap();
    let marker = skipped["fields"]["marker"].as_str().unwrap().to_owned();
    assert!(marker.starts_with("scheduled-"), "{skipped}");
    let listed = |node: usize| -> Vec<serde_json::Value> {
        let out = keel(&cluster, node, &["snapshot", "list", "--json"]);
        assert!(out.status.success(), "{}", out.describe());
        json(&out)["snapshots"].as_array().cloned().unwrap_or_default()
    };
    let on_standby: Vec<serde_json::Value> =
        listed(standby).into_iter().filter(|s| s["marker"] == marker.as_str()).collect();
    let mut members: Vec<&str> = on_standby.iter().map(|s| s["volume"].as_str().unwrap()).collect();
    members.sort_unstable();
    assert_eq!(members, ["db", "files"], "the standby took {marker} once, both members: {on_standby:?}");
    assert!(on_standby.iter().all(|s| s["group"] == "shop" && s["id"] == on_standby[0]["id"]), "{on_standby:?}");
    let on_primary: Vec<serde_json::Value> =
        listed(primary).into_iter().filter(|s| s["marker"] == marker.as_str()).collect();
    assert!(on_primary.is_empty(), "the primary took {marker} too: {on_primary:?}");
}
