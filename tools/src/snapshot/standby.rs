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
    /// The job for `group` on this node: `Ok(None)` when a member is a standby here (its
    /// primary takes the group), an error when a member is not on this node at all.
    pub fn find(
        group: &GroupConfig,
        single: &[Arc<Volume>],
        replicated: Option<&std::collections::HashMap<String, Arc<ReplVolume>>>,
    ) -> Result<Option<Self>, String> {
        let mut job = GroupJob { group: group.clone(), volumes: Vec::new(), replicated: Vec::new() };
        for name in &group.volumes {
            if let Some(volume) = single.iter().find(|v| v.name() == name) {
                job.volumes.push(Arc::clone(volume));
            } else if let Some(rv) = replicated.and_then(|r| r.get(name)) {
                if rv.role() != Role::Primary {
                    return Ok(None);
                }
                job.volumes.push(Arc::clone(rv.volume()));
                job.replicated.push(Arc::clone(rv));
            } else {
                return Err(format!("group {}: volume {name} is not on this node", group.name));
            }
        }
        Ok(Some(job))
    }
}

impl ScheduledJob {
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
        let (mut standby, mut here, mut deferred) = (Vec::new(), Vec::new(), Vec::new());
        for job in jobs {
            match job {
                ScheduledJob::Standby(rv) => standby.push(rv),
                ScheduledJob::PrimaryDeferred(rv) => deferred.push(rv),
                job @ (ScheduledJob::Local(_) | ScheduledJob::Primary(_) | ScheduledJob::Group(_)) => here.push(job),
            }
        }
        let frozen: Vec<(Arc<ReplVolume>, Result<Frozen>)> =
            standby.into_iter().map(|rv| (Arc::clone(&rv), self.freeze_on_standby(&rv, &marker))).collect();
        for (rv, frozen) in frozen {
            let taken = frozen.and_then(|frozen| self.take_frozen_now(rv.name(), &frozen));
            if let Err(e) = taken {
                tracing::warn!(volume = %rv.name(), "scheduled snapshot on the standby failed: {e:#}");
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
                ScheduledJob::PrimaryDeferred(_) | ScheduledJob::Standby(_) => continue,
            };
            if let Err(e) = taken {
                tracing::warn!(volume = %name, "scheduled snapshot failed: {e:#}");
            }
        }
        if deferred.is_empty() {
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
    }

    /// A group's scheduled snapshot: every replicated member's marker is claimed first
    /// (a standby never takes a group member, so the claims only guard against a second
    /// firing of the same name), then the group is taken.
    fn scheduled_group(&self, job: &GroupJob, marker: &str) -> Result<serde_json::Value> {
        for rv in &job.replicated {
            if let Err(reason) = rv.claim_snapshot_marker(marker) {
                self.skipped(rv, marker, &reason);
                bail!("group {}: member {} was not claimed: {reason}", job.group.name, rv.name());
            }
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
