//! Consistency groups: several volumes of a tenant (a database and its filestore) that are
//! always snapshotted at one instant.
//!
//! ```toml
//! [[snapshots.group]]
//! name = "shop"
//! volumes = ["db", "files"]
//! ```
//!
//! A group snapshot appends one marker to each member while holding every member's
//! journal lock (`Volume::snapshot_group`), so no write to any member lands between the
//! markers: a write acknowledged on one volume before a write was issued to another is in
//! the snapshot whenever the second is. Each member then gets its own manifest, all under
//! one snapshot id and naming the group and its members (manifest format version 2), so
//! restores, copies, verify and GC work per volume as for any snapshot. Retention decides
//! a group's snapshots whole ([`Repo::apply_retention`]).
//!
//! Where it is taken: on the node where every member is writable (unreplicated, or this
//! node is the primary), or on the standby of a group whose members are all replicated
//! to it: the standby freezes every member, asks the primary for the group's markers in
//! one request (the primary appends them under all the members' journal locks with
//! `Volume::mark_group`), checks each member froze at its marker over a session that
//! stayed consistent, and reads its own copies ([`Runner::snapshot_group_standby`];
//! docs/snapshots.md, "Consistency groups").

use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use keel_engine::{Frozen, Volume};
use keel_snapshot::create::{self, CreateReport, Progress};
use keel_snapshot::maintain;
use keel_snapshot::manifest::GroupV2;
use keel_snapshot::vault::keys;
use serde::{Deserialize, Serialize};

use super::{Repo, Runner, StandbyGroupJob};

/// `[[snapshots.group]]`: volumes snapshotted together, at one instant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupConfig {
    /// The group's name: `keel snapshot create NAME` takes the whole group.
    pub name: String,
    /// The member volumes (at least two).
    pub volumes: Vec<String>,
}

/// What a member's manifest records about its group snapshot.
#[derive(Debug, Clone)]
pub struct GroupMember {
    /// The group and its members.
    pub group: GroupV2,
    /// The snapshot id all members share.
    pub snapshot_id: String,
    /// When the markers were appended, unix seconds.
    pub created_unix: i64,
}

/// Checks `[[snapshots.group]]` entries: valid, unique names, at least two distinct
/// volumes each, and no volume in two groups (its snapshots would have two instants to
/// follow). Returns the groups with their volumes sorted.
pub(super) fn validate(groups: &[GroupConfig]) -> Result<Vec<GroupConfig>> {
    let mut out: Vec<GroupConfig> = Vec::with_capacity(groups.len());
    for group in groups {
        let name = &group.name;
        if name.contains('/') || keys::check(name).is_err() {
            bail!("[[snapshots.group]] name {name:?} is not a valid name (A-Z a-z 0-9 . _ - @ :)");
        }
        if out.iter().any(|g| &g.name == name) {
            bail!("[[snapshots.group]] name {name:?} is used twice");
        }
        let mut volumes = group.volumes.clone();
        volumes.sort();
        volumes.dedup();
        if volumes.len() != group.volumes.len() {
            bail!("[[snapshots.group]] {name:?} lists a volume twice");
        }
        if volumes.len() < 2 {
            bail!("[[snapshots.group]] {name:?} needs at least two volumes (a single volume is always consistent)");
        }
        if let Some(v) = volumes.iter().find(|v| *v == name) {
            bail!("[[snapshots.group]] {name:?} has the name of its member volume {v:?}: `keel snapshot create` could not tell them apart");
        }
        for other in &out {
            if let Some(v) = volumes.iter().find(|v| other.volumes.contains(v)) {
                bail!("volume {v:?} is in two consistency groups, {:?} and {name:?}", other.name);
            }
            if other.volumes.contains(name) || volumes.contains(&other.name) {
                bail!("group names and volume names must differ ({:?}, {name:?})", other.name);
            }
        }
        out.push(GroupConfig { name: name.clone(), volumes });
    }
    Ok(out)
}

impl Repo {
    /// The group named `name`.
    pub fn group(&self, name: &str) -> Option<&GroupConfig> {
        self.groups.iter().find(|g| g.name == name)
    }

    /// The group `volume` belongs to.
    pub fn group_of(&self, volume: &str) -> Option<&GroupConfig> {
        self.groups.iter().find(|g| g.volumes.iter().any(|v| v == volume))
    }

    /// Takes a snapshot of consistency group `group` whose members are `volumes` (each
    /// member once, any order): freezes them at one instant, then reads each into the repo
    /// under one snapshot id. If a member fails, the members already written are removed
    /// again, so a group snapshot exists whole or not at all (their chunks stay for GC).
    pub fn take_group(
        &self,
        group: &GroupConfig,
        volumes: &[&Volume],
        marker: &str,
        progress: &(dyn Fn(Progress) + Sync),
    ) -> Result<Vec<CreateReport>> {
        let mut names: Vec<&str> = volumes.iter().map(|v| v.name()).collect();
        names.sort_unstable();
        if names != group.volumes.iter().map(String::as_str).collect::<Vec<_>>() {
            bail!("group {}: given volumes {names:?}, but its members are {:?}", group.name, group.volumes);
        }
        let frozen = Volume::snapshot_group(volumes, marker)
            .with_context(|| format!("group {}: freezing its volumes failed", group.name))?;
        let names: Vec<&str> = volumes.iter().map(|v| v.name()).collect();
        self.take_group_frozen(group, &names, frozen, progress)
    }

    /// Reads a group's frozen views (one per member, `names[i]` frozen as `frozen[i]`, all
    /// at one instant of the group) into the repo under one snapshot id; a group snapshot
    /// exists whole or not at all, as for [`Repo::take_group`].
    pub fn take_group_frozen(
        &self,
        group: &GroupConfig,
        names: &[&str],
        frozen: Vec<Frozen>,
        progress: &(dyn Fn(Progress) + Sync),
    ) -> Result<Vec<CreateReport>> {
        let mut sorted: Vec<&str> = names.to_vec();
        sorted.sort_unstable();
        if sorted != group.volumes.iter().map(String::as_str).collect::<Vec<_>>() || frozen.len() != names.len() {
            bail!("group {}: given views of {names:?}, but its members are {:?}", group.name, group.volumes);
        }
        let created_unix = keel_snapshot::lease::now_unix();
        let member = GroupMember {
            group: GroupV2 { name: group.name.clone(), members: group.volumes.clone() },
            snapshot_id: create::new_snapshot_id(created_unix),
            created_unix,
        };
        let mut reports: Vec<CreateReport> = Vec::with_capacity(names.len());
        // Each view is dropped once read: it stops copying regions aside.
        for (volume, view) in names.iter().zip(frozen) {
            match self.take_frozen_as(volume, &view, Some(&member), progress) {
                Ok(report) => reports.push(report),
                Err(e) => {
                    let undone: Vec<String> = reports
                        .iter()
                        .filter_map(|r| maintain::forget(&*self.local, &r.manifest_key).err().map(|e| e.to_string()))
                        .collect();
                    let undo = if undone.is_empty() {
                        "the members already taken were removed".to_owned()
                    } else {
                        format!("removing the members already taken failed too: {}", undone.join("; "))
                    };
                    return Err(e.context(format!(
                        "group {} snapshot {}: member {} failed; {undo}",
                        group.name, member.snapshot_id, volume
                    )));
                }
            }
        }
        Ok(reports)
    }
}

impl Runner {
    /// Takes a snapshot of consistency group `group` now (blocking), then copies it and
    /// applies the group's retention. `volumes` are the members' volumes on this node,
    /// writable here. Returns a summary for the operator.
    pub fn snapshot_group(
        &self,
        group: &GroupConfig,
        volumes: &[Arc<Volume>],
        marker: &str,
    ) -> Result<serde_json::Value> {
        let _one_at_a_time = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        let started = std::time::Instant::now();
        let refs: Vec<&Volume> = volumes.iter().map(|v| &**v).collect();
        let names: Vec<&str> = refs.iter().map(|v| v.name()).collect();
        let taken = self.repo.take_group(group, &refs, marker, &|_| {});
        self.after_group_take(group, &names, taken, started)
    }

    /// Takes a snapshot of consistency group `group` on this node, the standby of every
    /// member (blocking): freezes each member at the markers the primary appends for the
    /// group in one request, reads the views into the repo under one snapshot id, then
    /// copies and applies the group's retention like [`Runner::snapshot_group`]. Fails,
    /// reading nothing, unless every member may take a snapshot here and the primary
    /// appended the markers (see `freeze_group_on_standby`).
    pub fn snapshot_group_standby(&self, job: &StandbyGroupJob, marker: &str) -> Result<serde_json::Value> {
        let frozen = match self.freeze_group_on_standby(job, marker) {
            Ok(frozen) => frozen,
            Err(e) => {
                for volume in &job.group.volumes {
                    let _ = self.taken_or_reported(volume, Err(anyhow!("{e:#}")));
                }
                return Err(e);
            }
        };
        self.take_group_frozen_now(job, frozen)
    }

    /// Reads a standby group's views into the repo (one snapshot at a time), then copies
    /// and retention.
    pub(super) fn take_group_frozen_now(
        &self,
        job: &StandbyGroupJob,
        frozen: Vec<Frozen>,
    ) -> Result<serde_json::Value> {
        let _one_at_a_time = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        let started = std::time::Instant::now();
        let names: Vec<&str> = job.members.iter().map(|rv| rv.name()).collect();
        let taken = self.repo.take_group_frozen(&job.group, &names, frozen, &|_| {});
        self.after_group_take(&job.group, &names, taken, started)
    }

    /// Reports a group snapshot of `names` taken since `started` (or its failure, for
    /// every member) as events, then copies it and applies the group's retention.
    fn after_group_take(
        &self,
        group: &GroupConfig,
        names: &[&str],
        taken: Result<Vec<CreateReport>>,
        started: std::time::Instant,
    ) -> Result<serde_json::Value> {
        let reports = match taken {
            Ok(reports) => reports,
            Err(e) => {
                for volume in &group.volumes {
                    let _ = self.taken_or_reported(volume, Err(anyhow!("{e:#}")));
                }
                return Err(e);
            }
        };
        let took = started.elapsed();
        let members: Vec<serde_json::Value> = names
            .iter()
            .zip(&reports)
            .map(|(volume, report)| {
                let mut summary = self.report_taken(volume, report, took, Some(&group.name));
                summary["volume"] = serde_json::json!(volume);
                summary
            })
            .collect();
        let (copies, retention) = self.copy_and_retain(names);
        Ok(serde_json::json!({
            "ok": true,
            "group": group.name,
            "snapshot": reports.first().map(|r| r.snapshot_id.clone()),
            "members": members,
            "seconds": took.as_secs_f64(),
            "copies": copies,
            "retention": retention,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(name: &str, volumes: &[&str]) -> GroupConfig {
        GroupConfig { name: name.into(), volumes: volumes.iter().map(|v| (*v).to_owned()).collect() }
    }

    #[test]
    fn groups_are_validated_and_sorted() {
        let ok = validate(&[group("shop", &["files", "db"]), group("crm", &["crm-db", "crm-files"])]).unwrap();
        assert_eq!(ok[0].volumes, ["db", "files"]);
        for (bad, why) in [
            (vec![group("shop", &["db"])], "at least two"),
            (vec![group("shop", &["db", "db"])], "twice"),
            (vec![group("a/b", &["db", "files"])], "not a valid name"),
            (vec![group("db", &["db", "files"])], "name of its member"),
            (vec![group("shop", &["db", "files"]), group("shop", &["x", "y"])], "used twice"),
            (vec![group("shop", &["db", "files"]), group("crm", &["db", "crm-files"])], "two consistency groups"),
            (vec![group("shop", &["db", "files"]), group("crm", &["shop", "x"])], "must differ"),
        ] {
            let err = validate(&bad).unwrap_err().to_string();
            assert!(err.contains(why), "{bad:?}: {err}");
        }
    }

    #[test]
    fn config_parses() {
        #[derive(Deserialize)]
        struct Section {
            #[serde(rename = "group")]
            groups: Vec<GroupConfig>,
        }
        let text = "[[group]]\nname = \"shop\"\nvolumes = [\"db\", \"files\"]\n";
        let section: Section = toml::from_str(text).unwrap();
        assert_eq!(section.groups, [group("shop", &["db", "files"])]);
        assert!(toml::from_str::<Section>("[[group]]\nname = \"x\"\nvolumes = []\nschedule = \"1h\"\n").is_err());
    }
}
