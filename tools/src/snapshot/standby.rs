//! Snapshots of replicated volumes: which node of the pair takes each one, and taking one
//! on the standby, so that the primary's writes never wait behind the snapshot's reads.
//! The primary only appends a marker (docs/replication.md, "Snapshots on the standby").
//!
//! # Who takes a scheduled snapshot
//! Both nodes run the schedule and name a firing's marker after its nominal time
//! (`scheduled-<UTC>`), so they name it alike. The primary decides, by claiming the name
//! (`ReplVolume::claim_snapshot_marker`; the standby's marker request claims it too, and
//! the primary checks and records both under one lock), so each firing is taken at most
//! once:
//! - `take_on = "standby"`, standby UpToDate: the standby freezes and requests the marker
//!   as soon as the schedule fires. The primary waits [`STANDBY_CLAIM_GRACE`] after the
//!   firing, then claims the name: if the standby claimed it first, it skips; otherwise
//!   (the standby is down, behind, or its clock is far off) it takes the snapshot itself,
//!   and a late request from the standby is refused.
//! - The standby is not UpToDate (or `take_on = "primary"`): the primary claims and takes
//!   the snapshot at once; the standby does not try.
//!
//! A consistency group is decided the same way, whole: the standby of every member takes
//! it when each member may take snapshots there and the primary speaks group requests
//! (one request claims the name on every member, all or none); the primary defers it when
//! every member's standby is UpToDate and speaks them, then claims the name on every
//! member at once, or skips it. A group with members of both kinds here (unreplicated, or
//! primary here, beside a standby member) is taken by no standby.
//!
//! A firing can be missed, never doubled, when the roles change inside the grace: the
//! standby's request fails because the primary died before it answered (the standby
//! promotes after the firing), or the primary stepped down before its grace ended. The
//! next firing takes the volume again; `keel snapshot create` takes one at any time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use keel_engine::{Frozen, Volume};
use keel_net::repl::state::Role;
use keel_net::repl::volume::ReplVolume;
use keel_net::CancellationToken;
use keel_snapshot::create;
use serde::{Deserialize, Serialize};

use super::{GroupConfig, Runner};

/// `[snapshots] take_on`: which node of a replicated pair takes scheduled snapshots.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TakeOn {
    /// The standby when it is UpToDate (and speaks marker requests), else the primary.
    #[default]
    Standby,
    /// Always the primary.
    Primary,
}

/// How long after a firing the primary leaves a scheduled snapshot to its UpToDate
/// standby before it claims the marker and takes the snapshot itself. Covers the clock
/// difference between the nodes and the standby's requests (sent for every volume before
/// any is read).
pub const STANDBY_CLAIM_GRACE: Duration = Duration::from_secs(60);
/// How long the standby waits for the primary's answer to a marker request, and then for
/// the marker to be applied here.
const MARKER_TIMEOUT: Duration = Duration::from_secs(30);

/// What the scheduler does with one volume at a firing.
#[derive(Debug)]
pub enum ScheduledJob {
    /// An unreplicated volume: take it here.
    Local(Arc<Volume>),
    /// This node is the primary and takes it: claim the marker, then take it here.
    Primary(Arc<ReplVolume>),
    /// This node is the primary and leaves it to the standby: after
    /// [`STANDBY_CLAIM_GRACE`], take it here only if the standby did not claim the marker.
    PrimaryDeferred(Arc<ReplVolume>),
    /// This node is the UpToDate standby: take it here.
    Standby(Arc<ReplVolume>),
    /// A consistency group whose members are all writable here (unreplicated, or this
    /// node is their primary): claim the replicated members' markers, then take the group.
    Group(GroupJob),
    /// A consistency group whose members are all replicated, this node their primary,
    /// left to their standby: after [`STANDBY_CLAIM_GRACE`], take it here only if the
    /// standby claimed the marker on none of them.
    PrimaryDeferredGroup(GroupJob),
    /// A consistency group whose members are all replicated, this node the standby of
    /// each: take it here.
    StandbyGroup(StandbyGroupJob),
}

/// A consistency group's snapshot on the standby of every member.
#[derive(Debug)]
pub struct StandbyGroupJob {
    /// The group.
    pub group: GroupConfig,
    /// Every member, in the group's (name) order; the first is the lead, whose journal
    /// stream carries the request.
    pub members: Vec<Arc<ReplVolume>>,
}

impl StandbyGroupJob {
    /// Whether this standby may take the group now: every member may take a snapshot
    /// here, and the primary speaks group requests on the lead's stream. `Err` says why
    /// not, naming the member.
    pub fn ready(&self) -> Result<(), String> {
        for rv in &self.members {
            rv.standby_snapshot_ready().map_err(|e| format!("group {}: {e}", self.group.name))?;
        }
        let lead = self.members.first().ok_or_else(|| format!("group {} has no members", self.group.name))?;
        lead.standby_group_snapshot_ready().map_err(|e| format!("group {}: {e}", self.group.name))
    }
}

/// Where a consistency group's snapshot is taken, seen from this node.
#[derive(Debug)]
pub enum GroupPlace {
    /// Every member is writable here (unreplicated, or this node is its primary).
    Here(GroupJob),
    /// Every member is replicated and this node is the standby of each.
    Standby(StandbyGroupJob),
    /// Not here: why (a mixed group, with a standby member beside others).
    Elsewhere(String),
}

/// A consistency group's scheduled snapshot on this node.
#[derive(Debug)]
pub struct GroupJob {
    /// The group.
    pub group: GroupConfig,
    /// Every member's volume.
    pub volumes: Vec<Arc<Volume>>,
    /// The members that are replicated (this node is their primary).
    pub replicated: Vec<Arc<ReplVolume>>,
}

impl GroupJob {
    /// Where `group` is snapshotted, seen from this node; an error when a member is not
    /// on this node at all.
    pub fn locate(
        group: &GroupConfig,
        single: &[Arc<Volume>],
        replicated: Option<&std::collections::HashMap<String, Arc<ReplVolume>>>,
    ) -> Result<GroupPlace, String> {
        let mut job = GroupJob { group: group.clone(), volumes: Vec::new(), replicated: Vec::new() };
        let (mut standby, mut writable) = (Vec::new(), Vec::new());
        for name in &group.volumes {
            if let Some(volume) = single.iter().find(|v| v.name() == name) {
                job.volumes.push(Arc::clone(volume));
                writable.push(format!("{name} is not replicated"));
            } else if let Some(rv) = replicated.and_then(|r| r.get(name)) {
                if rv.role() == Role::Primary {
                    job.volumes.push(Arc::clone(rv.volume()));
                    job.replicated.push(Arc::clone(rv));
                    writable.push(format!("{name} is primary here"));
                } else {
                    standby.push(Arc::clone(rv));
                }
            } else {
                return Err(format!("group {}: volume {name} is not on this node", group.name));
            }
        }
        Ok(match (standby.is_empty(), writable.first()) {
            (true, _) => GroupPlace::Here(job),
            (false, None) => GroupPlace::Standby(StandbyGroupJob { group: group.clone(), members: standby }),
            (false, Some(other)) => GroupPlace::Elsewhere(format!(
                "group {}: member {} is a standby here but {other}; a group is snapshotted on one node, where \
                 every member is writable (its primary) or, when every member is replicated, on their standby",
                group.name,
                standby.first().map_or("", |rv| rv.name())
            )),
        })
    }

    /// Whether the group may be left to the standby: every member is replicated, to one
    /// standby node, which is UpToDate and speaks group requests on each.
    fn standby_takes_it(&self) -> bool {
        let peer = self.replicated.first().map(|rv| rv.peer());
        self.replicated.len() == self.volumes.len()
            && self.replicated.iter().all(|rv| Some(rv.peer()) == peer && rv.standby_takes_group_snapshots())
    }
}

impl ScheduledJob {
    /// The job for consistency group `group` at a firing under `take_on`; `None`: nothing
    /// to do on this node.
    pub fn for_group(
        group: &GroupConfig,
        single: &[Arc<Volume>],
        replicated: Option<&std::collections::HashMap<String, Arc<ReplVolume>>>,
        take_on: TakeOn,
    ) -> Option<Self> {
        match GroupJob::locate(group, single, replicated) {
            Ok(GroupPlace::Here(job)) if take_on == TakeOn::Standby && job.standby_takes_it() => {
                Some(Self::PrimaryDeferredGroup(job))
            }
            Ok(GroupPlace::Here(job)) => Some(Self::Group(job)),
            Ok(GroupPlace::Standby(job)) if take_on == TakeOn::Standby => match job.ready() {
                Ok(()) => Some(Self::StandbyGroup(job)),
                Err(reason) => {
                    tracing::info!(group = %group.name, "scheduled group snapshot left to the primary: {reason}");
                    None
                }
            },
            Ok(GroupPlace::Standby(_)) => None,
            Ok(GroupPlace::Elsewhere(reason)) => {
                tracing::info!(group = %group.name, "scheduled group snapshot not taken here: {reason}");
                None
            }
            Err(reason) => {
                tracing::warn!("scheduled snapshot not taken: {reason}");
                None
            }
        }
    }

    /// The job for a replicated volume at a firing under `take_on`; `None`: nothing to do
    /// on this node (a standby that cannot take it leaves it to the primary).
    pub fn for_replicated(rv: &Arc<ReplVolume>, take_on: TakeOn) -> Option<Self> {
        let rv = Arc::clone(rv);
        match (rv.role(), take_on) {
            (Role::Primary, TakeOn::Standby) if rv.standby_takes_snapshots() => Some(Self::PrimaryDeferred(rv)),
            (Role::Primary, _) => Some(Self::Primary(rv)),
            (Role::Standby, TakeOn::Standby) => match rv.standby_snapshot_ready() {
                Ok(()) => Some(Self::Standby(rv)),
                Err(reason) => {
                    tracing::info!(volume = %rv.name(), "scheduled snapshot left to the primary: {reason}");
                    None
                }
            },
            (Role::Standby, TakeOn::Primary) => None,
        }
    }
}

impl Runner {
    /// Takes a snapshot of the replicated volume `rv` on this node, its standby
    /// (blocking): freezes at a marker named `marker` that the primary appends on
    /// request, reads the frozen view into the repo, then copies and applies retention
    /// like [`Runner::snapshot_now`]. Fails, reading nothing, when this standby is not
    /// consistent and connected or the primary refuses.
    pub fn snapshot_standby(&self, rv: &ReplVolume, marker: &str) -> Result<serde_json::Value> {
        let frozen = self.freeze_on_standby(rv, marker)?;
        self.take_frozen_now(rv.name(), &frozen)
    }

    /// Takes a snapshot of the replicated volume `rv` on this node, its primary
    /// (blocking), like [`Runner::snapshot_now`], after checking that it may still write.
    pub fn snapshot_primary(&self, rv: &ReplVolume, marker: &str) -> Result<serde_json::Value> {
        rv.check_writable().map_err(|e| anyhow!("{e}; not taking the snapshot here"))?;
        self.snapshot_now(rv.volume(), marker)
    }

    /// Registers a freeze at `marker`, has the primary append it, and waits until it is
    /// applied here: the frozen view of this standby's copy at the marker.
    fn freeze_on_standby(&self, rv: &ReplVolume, marker: &str) -> Result<Frozen> {
        rv.standby_snapshot_ready().map_err(|e| anyhow!(e))?;
        // Before the request: the marker may be applied before the answer is read.
        let waiter = rv.volume().freeze_at_marker(marker)?;
        let seq = rv.request_snapshot_marker(marker, MARKER_TIMEOUT).map_err(|e| anyhow!(e))?;
        let frozen = waiter.wait(MARKER_TIMEOUT)?;
        // Another marker of the same name (not ours) may have come first, over a session
        // whose copy was not consistent: only ours is known good.
        if frozen.seq() != seq {
            bail!(
                "volume {}: froze at a marker {marker:?} with seq {}, not the one appended for this snapshot \
                 (seq {seq}); another marker has the same name: retry with another name",
                rv.name(),
                frozen.seq()
            );
        }
        Ok(frozen)
    }

    /// Registers a freeze at `marker` on every member of a standby group, has the primary
    /// append the group's markers in one request over the lead's stream, and waits until
    /// each is applied here: the frozen views of this standby's copies, one instant of the
    /// group, in the members' order. Checks, for each member, that it froze at the seq the
    /// primary appended for it, and that its journal session is the one noted before the
    /// request and still consistent: a non-lead member's marker came on its own stream,
    /// which the lead's reply says nothing about (net's `marker` module, "Invariants").
    pub(super) fn freeze_group_on_standby(&self, job: &StandbyGroupJob, marker: &str) -> Result<Vec<Frozen>> {
        let group = &job.group.name;
        let lead = job.members.first().ok_or_else(|| anyhow!("group {group} has no members"))?;
        let sessions = job
            .members
            .iter()
            .map(|rv| rv.standby_snapshot_session().map_err(|e| anyhow!("group {group}: {e}")))
            .collect::<Result<Vec<_>>>()?;
        lead.standby_group_snapshot_ready().map_err(|e| anyhow!("group {group}: {e}"))?;
        // Before the request: a marker may be applied before the answer is read.
        let waiters =
            job.members.iter().map(|rv| rv.volume().freeze_at_marker(marker)).collect::<Result<Vec<_>, _>>()?;
        let names: Vec<String> = job.members.iter().map(|rv| rv.name().to_owned()).collect();
        let seqs = lead.request_group_snapshot_marker(marker, &names, MARKER_TIMEOUT).map_err(|e| anyhow!(e))?;
        let mut frozen = Vec::with_capacity(waiters.len());
        for ((rv, waiter), &seq) in job.members.iter().zip(waiters).zip(&seqs) {
            let view = waiter.wait(MARKER_TIMEOUT)?;
            // Another marker of the same name (not ours: the primary appends a group's
            // markers once, all or none) may have come first: only ours is known good.
            if view.seq() != seq {
                bail!(
                    "group {group}: volume {} froze at a marker {marker:?} with seq {}, not the one appended for this \
                     snapshot (seq {seq}); another marker has the same name: retry with another name",
                    rv.name(),
                    view.seq()
                );
            }
            frozen.push(view);
        }
        for (rv, before) in job.members.iter().zip(&sessions) {
            match rv.standby_snapshot_session() {
                Ok(now) if now == *before => {}
                Ok(_) => bail!(
                    "group {group}: volume {}: its session with the primary was replaced while the group's markers \
                     were applied, so its copy is not known to be consistent at its marker; not taking the snapshot",
                    rv.name()
                ),
                Err(e) => bail!("group {group}: after the markers were applied: {e}; not taking the snapshot"),
            }
        }
        Ok(frozen)
    }

    /// Reads `frozen` into the repo (one snapshot at a time), then copies and retention.
    ///
    /// At the default CPU priority. Tried and dropped: nice 19 for the snapshot's threads
    /// kept the primary's median write+flush at its undisturbed value with both nodes'
    /// storage in memory (201 µs vs 280 µs at the default priority), but on ext4 raised
    /// its p99 from about 1–2 ms to 5–6 ms, probably because a starved reader holds locks
    /// the standby's applier needs (a region's stripe lock across its read; the extent
    /// file's inode lock in the allocation queries). `SCHED_BATCH` measured within noise
    /// of the default (tests/it/snapshot_standby.rs, `measure_…`).
    fn take_frozen_now(&self, volume: &str, frozen: &Frozen) -> Result<serde_json::Value> {
        let _one_at_a_time = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        let started = Instant::now();
        let taken = self.repo.take_frozen(volume, frozen, &|_| {});
        self.after_take(volume, taken, started)
    }

    /// One schedule firing (blocking): the standby's volumes first (every marker requested
    /// before any volume is read, so the primary sees each claim within its grace), then
    /// this node's own, then, after the grace, the primary's deferred ones the standby did
    /// not take. Returns early when `shutdown` fires during the grace.
    pub(super) fn run_firing(&self, jobs: Vec<ScheduledJob>, fired_unix: i64, shutdown: &CancellationToken) {
        let marker = format!("scheduled-{}", create::utc_compact(fired_unix));
        let (mut standby, mut standby_groups, mut here) = (Vec::new(), Vec::new(), Vec::new());
        let (mut deferred, mut deferred_groups) = (Vec::new(), Vec::new());
        for job in jobs {
            match job {
                ScheduledJob::Standby(rv) => standby.push(rv),
                ScheduledJob::StandbyGroup(job) => standby_groups.push(job),
                ScheduledJob::PrimaryDeferred(rv) => deferred.push(rv),
                ScheduledJob::PrimaryDeferredGroup(job) => deferred_groups.push(job),
                job @ (ScheduledJob::Local(_) | ScheduledJob::Primary(_) | ScheduledJob::Group(_)) => here.push(job),
            }
        }
        let frozen: Vec<(Arc<ReplVolume>, Result<Frozen>)> =
            standby.into_iter().map(|rv| (Arc::clone(&rv), self.freeze_on_standby(&rv, &marker))).collect();
        let frozen_groups: Vec<(StandbyGroupJob, Result<Vec<Frozen>>)> = standby_groups
            .into_iter()
            .map(|job| {
                let frozen = self.freeze_group_on_standby(&job, &marker);
                (job, frozen)
            })
            .collect();
        for (rv, frozen) in frozen {
            let taken = frozen.and_then(|frozen| self.take_frozen_now(rv.name(), &frozen));
            if let Err(e) = taken {
                tracing::warn!(volume = %rv.name(), "scheduled snapshot on the standby failed: {e:#}");
            }
        }
        for (job, frozen) in frozen_groups {
            let taken = frozen.and_then(|frozen| self.take_group_frozen_now(&job, frozen));
            if let Err(e) = taken {
                tracing::warn!(group = %job.group.name, "scheduled group snapshot on the standby failed: {e:#}");
            }
        }
        for job in here {
            let (name, taken) = match &job {
                ScheduledJob::Local(volume) => (volume.name().to_owned(), self.snapshot_now(volume, &marker)),
                ScheduledJob::Primary(rv) => match rv.claim_snapshot_marker(&marker) {
                    Ok(()) => (rv.name().to_owned(), self.snapshot_primary(rv, &marker)),
                    Err(reason) => {
                        self.skipped(rv, &marker, &reason);
                        continue;
                    }
                },
                ScheduledJob::Group(job) => (job.group.name.clone(), self.scheduled_group(job, &marker)),
                ScheduledJob::PrimaryDeferred(_)
                | ScheduledJob::Standby(_)
                | ScheduledJob::PrimaryDeferredGroup(_)
                | ScheduledJob::StandbyGroup(_) => continue,
            };
            if let Err(e) = taken {
                tracing::warn!(volume = %name, "scheduled snapshot failed: {e:#}");
            }
        }
        if deferred.is_empty() && deferred_groups.is_empty() {
            return;
        }
        let grace_ends = fired_unix.saturating_add(STANDBY_CLAIM_GRACE.as_secs() as i64);
        let remaining = Duration::from_secs(grace_ends.saturating_sub(keel_snapshot::lease::now_unix()).max(0) as u64);
        // On a blocking-pool thread: blocking on the runtime here is allowed.
        let waited = tokio::runtime::Handle::current().block_on(async {
            tokio::select! {
                () = shutdown.cancelled() => false,
                () = tokio::time::sleep(remaining) => true,
            }
        });
        if !waited {
            return;
        }
        for rv in deferred {
            let taken = match rv.claim_snapshot_marker(&marker) {
                Ok(()) => self.snapshot_primary(&rv, &marker),
                Err(reason) => {
                    self.skipped(&rv, &marker, &reason);
                    continue;
                }
            };
            if let Err(e) = taken {
                tracing::warn!(volume = %rv.name(), "scheduled snapshot (the standby did not take it) failed: {e:#}");
            }
        }
        for job in deferred_groups {
            // Claimed on every member or none: a standby that claimed any member took it.
            if let Err(e) = self.scheduled_group(&job, &marker) {
                tracing::info!(group = %job.group.name, "scheduled group snapshot (deferred to the standby): {e:#}");
            }
        }
    }

    /// A group's scheduled snapshot on its primary: the marker is claimed on every
    /// replicated member at once (`Err`, and nothing claimed, if the standby claimed it on
    /// any: it takes the group), then the group is taken.
    fn scheduled_group(&self, job: &GroupJob, marker: &str) -> Result<serde_json::Value> {
        if !job.replicated.is_empty() {
            let members: Vec<&ReplVolume> = job.replicated.iter().map(|rv| &**rv).collect();
            if let Err(reason) = ReplVolume::claim_group_snapshot_marker(&members, marker) {
                for rv in &job.replicated {
                    self.skipped(rv, marker, &reason);
                }
                bail!("group {}: not claimed: {reason}", job.group.name);
            }
        }
        for rv in &job.replicated {
            rv.check_writable().map_err(|e| anyhow!("{e}; not taking group {} here", job.group.name))?;
        }
        self.snapshot_group(&job.group, &job.volumes, marker)
    }

    fn skipped(&self, rv: &ReplVolume, marker: &str, reason: &str) {
        tracing::info!(volume = %rv.name(), "scheduled snapshot {marker} not taken here: {reason}");
        self.events.emit(
            Some(rv.name()),
            "snapshot_skipped",
            serde_json::json!({ "marker": marker, "reason": reason }),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_on_parses_and_defaults_to_the_standby() {
        #[derive(Deserialize)]
        struct Section {
            #[serde(default)]
            take_on: TakeOn,
        }
        let parse = |text: &str| toml::from_str::<Section>(text).map(|s| s.take_on);
        assert_eq!(parse("").unwrap(), TakeOn::Standby);
        assert_eq!(parse("take_on = \"standby\"").unwrap(), TakeOn::Standby);
        assert_eq!(parse("take_on = \"primary\"").unwrap(), TakeOn::Primary);
        assert!(parse("take_on = \"witness\"").is_err());
    }
}
