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
//! When the roles change inside the grace (the standby's request finds no answer because
//! the primary died; the primary steps down before its grace ends) or a node is down at the
//! firing, the schedule ledger (`catchup`) keeps the firing owed: the standby settles a
//! firing it left to its primary only once the primary's marker of that firing arrived,
//! so once promoted it takes the firings its dead primary did not start. (What still
//! misses one: `catchup`.)

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use keel_engine::{Frozen, Volume};
use keel_net::repl::state::Role;
use keel_net::repl::volume::ReplVolume;
use keel_net::CancellationToken;
use keel_snapshot::create;
use serde::{Deserialize, Serialize};

use super::catchup::{JobKey, Outcome};
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
    /// This node is the standby of a volume (or of every member of a group) and leaves
    /// the firing to the primary: nothing to take here, but the firing is settled only
    /// once the primary's marker of it arrived (the schedule ledger, `catchup`).
    LeftToPrimary {
        /// The volume or group.
        key: JobKey,
        /// The replicated volumes whose primary takes it.
        members: Vec<Arc<ReplVolume>>,
    },
    /// A consistency group no node can take now: its members are split between the two
    /// nodes (a standby member beside a primary or unreplicated one, after a partial
    /// failover). Nothing to take; the firing stays owed (retried after a backoff), so
    /// the node where the members come together again takes it.
    Split(JobKey),
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
    /// What the schedule ledger knows this job by.
    pub fn key(&self) -> JobKey {
        match self {
            Self::Local(volume) => JobKey::Volume(volume.name().to_owned()),
            Self::Primary(rv) | Self::PrimaryDeferred(rv) | Self::Standby(rv) => JobKey::Volume(rv.name().to_owned()),
            Self::Group(job) | Self::PrimaryDeferredGroup(job) => JobKey::Group(job.group.name.clone()),
            Self::StandbyGroup(job) => JobKey::Group(job.group.name.clone()),
            Self::LeftToPrimary { key, .. } | Self::Split(key) => key.clone(),
        }
    }

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
                    // Debug: asked every tick while a firing is owed (the schedule ledger).
                    tracing::debug!(group = %group.name, "scheduled group snapshot left to the primary: {reason}");
                    Some(Self::LeftToPrimary { key: JobKey::Group(group.name.clone()), members: job.members })
                }
            },
            Ok(GroupPlace::Standby(job)) => {
                Some(Self::LeftToPrimary { key: JobKey::Group(group.name.clone()), members: job.members })
            }
            Ok(GroupPlace::Elsewhere(reason)) => {
                tracing::debug!(group = %group.name, "scheduled group snapshot not taken here: {reason}");
                Some(Self::Split(JobKey::Group(group.name.clone())))
            }
            Err(reason) => {
                tracing::warn!("scheduled snapshot not taken: {reason}");
                None
            }
        }
    }

    /// The job for a replicated volume at a firing under `take_on` (a standby that cannot
    /// take it leaves it to the primary).
    pub fn for_replicated(rv: &Arc<ReplVolume>, take_on: TakeOn) -> Self {
        let rv = Arc::clone(rv);
        let left =
            |rv: Arc<ReplVolume>| Self::LeftToPrimary { key: JobKey::Volume(rv.name().to_owned()), members: vec![rv] };
        match (rv.role(), take_on) {
            (Role::Primary, TakeOn::Standby) if rv.standby_takes_snapshots() => Self::PrimaryDeferred(rv),
            (Role::Primary, _) => Self::Primary(rv),
            (Role::Standby, TakeOn::Standby) => match rv.standby_snapshot_ready() {
                Ok(()) => Self::Standby(rv),
                Err(reason) => {
                    tracing::debug!(volume = %rv.name(), "scheduled snapshot left to the primary: {reason}");
                    left(rv)
                }
            },
            (Role::Standby, TakeOn::Primary) => left(rv),
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
    /// The sealing threads run at `cpu_priority` (`SCHED_IDLE` by default), the readers too
    /// but for their reads, which take locks the applier needs (a region's stripe lock; the
    /// kernel's locks of the store's file). Tried and dropped earlier: nice 19 for all the
    /// snapshot's threads, reads included, raised the primary's write p99 on ext4 from
    /// about 1–2 ms to 5–6 ms (docs/benchmarks.md, "idle CPU priority"). While the volume
    /// is written the reads are paced (`busy_read_limit`).
    fn take_frozen_now(&self, volume: &str, frozen: &Frozen) -> Result<serde_json::Value> {
        let _one_at_a_time = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        let started = Instant::now();
        let taken = self.repo.take_frozen(volume, frozen, &|_| {});
        self.after_take(volume, taken, started)
    }

    /// One schedule firing (blocking): the standby's volumes first (every marker requested
    /// before any volume is read, so the primary sees each claim within its grace), then
    /// this node's own, then, after the grace, the primary's deferred ones the standby did
    /// not take. Returns how each job fared ([`Outcome`]: what the ledger settles); when
    /// `shutdown` fires during the grace, the deferred jobs stay owed.
    pub(super) fn run_firing(
        &self,
        jobs: Vec<ScheduledJob>,
        fired_unix: i64,
        shutdown: &CancellationToken,
    ) -> Vec<(JobKey, Outcome)> {
        let marker = format!("scheduled-{}", create::utc_compact(fired_unix));
        let mut outcomes = Vec::with_capacity(jobs.len());
        let (mut standby, mut standby_groups, mut here) = (Vec::new(), Vec::new(), Vec::new());
        let (mut deferred, mut deferred_groups) = (Vec::new(), Vec::new());
        for job in jobs {
            match job {
                ScheduledJob::Standby(rv) => standby.push(rv),
                ScheduledJob::StandbyGroup(job) => standby_groups.push(job),
                ScheduledJob::PrimaryDeferred(rv) => deferred.push(rv),
                ScheduledJob::PrimaryDeferredGroup(job) => deferred_groups.push(job),
                ScheduledJob::LeftToPrimary { key, members } => {
                    outcomes.push((key, primary_took_it(&members, &marker)));
                }
                ScheduledJob::Split(key) => {
                    tracing::warn!(
                        "scheduled snapshot {marker} of {key}: its members are split between the nodes; \
                                    taken when they are together again"
                    );
                    // Looked at again after a backoff, which also spaces these warnings.
                    outcomes.push((key, Outcome::Failed));
                }
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
            if let Err(e) = &taken {
                tracing::warn!(volume = %rv.name(), "scheduled snapshot on the standby failed: {e:#}");
            }
            outcomes.push((JobKey::Volume(rv.name().to_owned()), standby_outcome(&taken, &[rv])));
        }
        for (job, frozen) in frozen_groups {
            let taken = frozen.and_then(|frozen| self.take_group_frozen_now(&job, frozen));
            if let Err(e) = &taken {
                tracing::warn!(group = %job.group.name, "scheduled group snapshot on the standby failed: {e:#}");
            }
            outcomes.push((JobKey::Group(job.group.name.clone()), standby_outcome(&taken, &job.members)));
        }
        for job in here {
            let key = job.key();
            let taken = match &job {
                ScheduledJob::Local(volume) => self.snapshot_now(volume, &marker).map(Some),
                ScheduledJob::Primary(rv) => match rv.claim_snapshot_marker(&marker) {
                    Ok(()) => self.snapshot_primary(rv, &marker).map(Some),
                    Err(reason) => {
                        self.skipped(rv, &marker, &reason);
                        Ok(None)
                    }
                },
                ScheduledJob::Group(job) => self.scheduled_group(job, &marker),
                _ => continue,
            };
            let outcome = primary_outcome(&key, taken, "");
            outcomes.push((key, outcome));
        }
        if deferred.is_empty() && deferred_groups.is_empty() {
            return outcomes;
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
            let owed = deferred.iter().map(|rv| JobKey::Volume(rv.name().to_owned()));
            let owed = owed.chain(deferred_groups.iter().map(|job| JobKey::Group(job.group.name.clone())));
            outcomes.extend(owed.map(|key| (key, Outcome::Waiting)));
            return outcomes;
        }
        for rv in deferred {
            let taken = match rv.claim_snapshot_marker(&marker) {
                Ok(()) => self.snapshot_primary(&rv, &marker).map(Some),
                Err(reason) => {
                    self.skipped(&rv, &marker, &reason);
                    Ok(None)
                }
            };
            let key = JobKey::Volume(rv.name().to_owned());
            outcomes.push((key.clone(), primary_outcome(&key, taken, " (the standby did not take it)")));
        }
        for job in deferred_groups {
            let key = JobKey::Group(job.group.name.clone());
            let taken = self.scheduled_group(&job, &marker);
            outcomes.push((key.clone(), primary_outcome(&key, taken, " (deferred to the standby)")));
        }
        outcomes
    }

    /// A group's scheduled snapshot on its primary: the marker is claimed on every
    /// replicated member at once (`Ok(None)`, and nothing claimed, if the standby claimed
    /// it on any: it takes the group), then the group is taken.
    fn scheduled_group(&self, job: &GroupJob, marker: &str) -> Result<Option<serde_json::Value>> {
        if !job.replicated.is_empty() {
            let members: Vec<&ReplVolume> = job.replicated.iter().map(|rv| &**rv).collect();
            if let Err(reason) = ReplVolume::claim_group_snapshot_marker(&members, marker) {
                tracing::info!(group = %job.group.name, "scheduled group snapshot {marker} not taken here: {reason}");
                for rv in &job.replicated {
                    self.skipped(rv, marker, &reason);
                }
                return Ok(None);
            }
        }
        for rv in &job.replicated {
            rv.check_writable().map_err(|e| anyhow!("{e}; not taking group {} here", job.group.name))?;
        }
        self.snapshot_group(&job.group, &job.volumes, marker).map(Some)
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

/// How a job this node took as primary (or unreplicated) fared: taken, or skipped because
/// the standby claimed it (`Ok(None)`), settles it; a failure is logged and retried.
fn primary_outcome(key: &JobKey, taken: Result<Option<serde_json::Value>>, context: &str) -> Outcome {
    match taken {
        Ok(_) => Outcome::Settled,
        Err(e) => {
            tracing::warn!("scheduled snapshot of {key}{context} failed: {e:#}");
            Outcome::Failed
        }
    }
}

/// How a job this node tried as the standby fared. Taken: settled. Not taken: retried
/// while its primary is connected (a refusal because the primary took it is answered again
/// at no cost; a snapshot that failed after the primary granted the marker must be retried
/// here, as the primary skips a name its standby claimed), and waited on while it is not
/// (the primary may be gone: once promoted, this node takes it).
fn standby_outcome<T>(taken: &Result<T>, members: &[Arc<ReplVolume>]) -> Outcome {
    match taken {
        Ok(_) => Outcome::Settled,
        Err(_) if members.iter().all(|rv| rv.peer_connected()) => Outcome::Failed,
        Err(_) => Outcome::Waiting,
    }
}

/// A job left to the primary settles once the primary's marker of this firing reached
/// every member here: the primary took the snapshot (it appends the marker as it freezes
/// its volumes). Until then the firing stays owed, in case the primary is gone and this
/// node is promoted.
fn primary_took_it(members: &[Arc<ReplVolume>], marker: &str) -> Outcome {
    if members.iter().all(|rv| rv.volume().saw_marker(marker)) {
        Outcome::Settled
    } else {
        Outcome::Waiting
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

    fn repl_volume(root: &std::path::Path, name: &str, role: Role) -> Arc<ReplVolume> {
        keel_net::testing::repl_volume(root, name, "node-b", role)
    }

    /// A standby leaves a firing to its primary and settles it only once the primary's
    /// marker of that firing arrived; a group split between the nodes stays owed.
    #[test]
    fn left_to_the_primary_settles_on_its_marker_and_a_split_group_stays_owed() {
        let root = tempfile::tempdir().unwrap();
        let (db, files) =
            (repl_volume(root.path(), "db", Role::Standby), repl_volume(root.path(), "files", Role::Standby));
        let marker = "scheduled-20261201T070000Z";
        let job = ScheduledJob::for_replicated(&db, TakeOn::Primary);
        assert!(matches!(&job, ScheduledJob::LeftToPrimary { key: JobKey::Volume(n), .. } if n == "db"), "{job:?}");
        let ScheduledJob::LeftToPrimary { members, .. } = job else { unreachable!() };
        assert_eq!(primary_took_it(&members, marker), Outcome::Waiting, "no marker yet: owed");
        db.volume().mark_snapshot("scheduled-20261201T065900Z").unwrap();
        assert_eq!(primary_took_it(&members, marker), Outcome::Waiting, "another firing's marker");
        db.volume().mark_snapshot(marker).unwrap();
        assert_eq!(primary_took_it(&members, marker), Outcome::Settled);

        let group = GroupConfig { name: "shop".into(), volumes: vec!["db".into(), "files".into()] };
        let mut replicated = std::collections::HashMap::new();
        replicated.insert("db".to_string(), Arc::clone(&db));
        replicated.insert("files".to_string(), Arc::clone(&files));
        let job = ScheduledJob::for_group(&group, &[], Some(&replicated), TakeOn::Primary).unwrap();
        let ScheduledJob::LeftToPrimary { members, .. } = job else { panic!("{job:?}") };
        assert_eq!(primary_took_it(&members, marker), Outcome::Waiting, "only one member has the marker");
        files.volume().mark_snapshot(marker).unwrap();
        assert_eq!(primary_took_it(&members, marker), Outcome::Settled);

        let primary = repl_volume(root.path(), "orders", Role::Primary);
        replicated.insert("orders".to_string(), primary);
        let split = GroupConfig { name: "mixed".into(), volumes: vec!["db".into(), "orders".into()] };
        let job = ScheduledJob::for_group(&split, &[], Some(&replicated), TakeOn::Standby).unwrap();
        assert!(matches!(&job, ScheduledJob::Split(JobKey::Group(n)) if n == "mixed"), "{job:?}");
    }
}
