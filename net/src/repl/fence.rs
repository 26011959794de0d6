//! The fencing state machines: [`PrimaryFence`] on the primary and [`StandbyFence`] on the
//! standby of one volume (or consistency group). They decide, with no I/O and with the
//! time injected, when a FLUSH may complete, when the primary must stop answering writes,
//! and which request to send to the witness next. A tokio driver feeds them events
//! (`handle_*`), sends what `poll_request` returns, and calls `handle_tick` at
//! `poll_timeout`.
//!
//! The rules come from design-fencing.md; each is cited where it is enforced as
//! "(rule 1)" (acknowledge only what a promotable node has), "(rule 2)" (promote only a
//! node that has everything acknowledged) or "(leases)". docs/replication.md explains
//! them step by step, with the timing arithmetic.
//!
//! # The two allowances that let a primary answer writes
//!
//! A primary answers writes (and completes FLUSHes) only while it holds one of:
//!
//! - **the witness lease**: granted by any successful `Renew`, `MarkOutdated` or
//!   `MarkUpToDate`, valid until `sent_at + lease × (1 − clock_rate_error)` by the
//!   primary's clock, where `sent_at` is when the primary *sent* the request. The witness
//!   counts the same lease from when it *received* it, by its own clock, and refuses
//!   `Promote` until then; with clock rates within the bound, the primary's allowance ends
//!   first (leases).
//! - **the standby allowance**: an acknowledgement from the standby in this epoch, valid
//!   until `probe_sent_at + ack_timeout × (1 − clock_rate_error)`, where `probe_sent_at` is
//!   when the primary sent the heartbeat or record the ack answers (echoed back by the
//!   standby). The standby, in turn, never *sends* `Promote` until `ack_timeout` after its
//!   last ack by its own clock, and never acks while a `Promote` it sent might still be
//!   granted. So when the witness grants a promotion, every standby allowance the old
//!   primary holds has run out. This is what lets replication continue while the witness
//!   is down ("W down, P and S fine") without ever overlapping with a promoted standby.
//!
//! # Transport contract with the driver
//!
//! One arbiter request is outstanding at a time. The driver gives up on a request at
//! `sent_at + Timing::request_timeout` (the fence also expires it then, in
//! `handle_tick`) and must make sure the witness never acts on a request after the driver
//! reported it failed: it closes the QUIC connection the request went out on and opens a
//! new one for the next. This keeps requests ordered at the witness (a late `MarkUpToDate`
//! must never overtake a later `MarkOutdated`, and a late `Promote` must never be granted
//! after the standby went back to acknowledging).

use std::time::{Duration, Instant};

use serde::Serialize;

use super::arbiter::{ArbiterRecord, ArbiterRequest, ArbiterResponse, StandbyState};

/// Timing of the fencing protocol. [`Timing::validate`] checks the inequalities that make it
/// safe and keep failover within budget; docs/replication.md ("Leases and timing") shows
/// the arithmetic for the defaults.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Timing {
    /// Lease the witness grants the primary (2 s).
    pub lease: Duration,
    /// How often the primary renews (lease / 3).
    pub renew_interval: Duration,
    /// Largest relative rate difference between any two nodes' clocks, as a fraction
    /// (0.05): over any interval, one clock measures at least `1 − clock_rate_error` times
    /// what another measures.
    pub clock_rate_error: f64,
    /// A standby silent this long (no ack at all, or no progress while a sync is
    /// outstanding) is lost; also the validity of one standby ack (1 s).
    pub ack_timeout: Duration,
    /// Transport idle timeout: how long without traffic before a peer is lost (1 s).
    pub detect_timeout: Duration,
    /// Pause before re-sending a witness request that failed (100 ms).
    pub retry: Duration,
    /// An arbiter request unanswered this long has failed (400 ms).
    pub request_timeout: Duration,
    /// How often the primary sends a heartbeat (probe) when it has no records to send
    /// (200 ms); every ack echoes the newest probe's send time.
    pub heartbeat_interval: Duration,
    /// A FLUSH that cannot complete for this long fails with EIO (30 s).
    pub flush_timeout: Duration,
}

/// The failover budget of design-fencing.md ("automatic failover completes in ≤ 5 s").
pub const FAILOVER_BUDGET: Duration = Duration::from_secs(5);

impl Default for Timing {
    fn default() -> Self {
        let lease = Duration::from_secs(2);
        Self {
            lease,
            renew_interval: lease / 3,
            clock_rate_error: 0.05,
            ack_timeout: Duration::from_secs(1),
            detect_timeout: Duration::from_secs(1),
            retry: Duration::from_millis(100),
            request_timeout: Duration::from_millis(400),
            heartbeat_interval: Duration::from_millis(200),
            flush_timeout: Duration::from_secs(30),
        }
    }
}

impl Timing {
    /// Checks the timing inequalities (docs/replication.md, "Leases and timing"):
    ///
    /// 1. `2 × renew_interval < lease × (1 − ε)`: a renewal can be late by a whole interval.
    /// 2. `renew_interval + 2 × request_timeout + retry < lease × (1 − ε)`: one renewal can
    ///    be lost and retried before the primary fences itself.
    /// 3. `2 × heartbeat_interval < ack_timeout × (1 − ε)`: one heartbeat can be lost
    ///    without the standby allowance lapsing.
    /// 4. `detect_timeout ≥ 2 × heartbeat_interval`: the transport does not declare a
    ///    peer lost between two heartbeats.
    /// 5. [`Timing::failover_bound`] `≤ 5 s`.
    pub fn validate(&self) -> Result<(), String> {
        let error = self.clock_rate_error;
        if !(0.0..0.5).contains(&error) {
            return Err(format!("clock_rate_error {error} must be in [0, 0.5)"));
        }
        for (name, value) in [
            ("lease", self.lease),
            ("renew_interval", self.renew_interval),
            ("ack_timeout", self.ack_timeout),
            ("detect_timeout", self.detect_timeout),
            ("retry", self.retry),
            ("request_timeout", self.request_timeout),
            ("heartbeat_interval", self.heartbeat_interval),
            ("flush_timeout", self.flush_timeout),
        ] {
            if value.is_zero() {
                return Err(format!("{name} must be positive"));
            }
        }
        let safe_lease = self.lease.mul_f64(1.0 - error);
        if self.renew_interval * 2 >= safe_lease {
            return Err(format!(
                "2 × renew_interval ({:?}) must be below lease × (1 − clock_rate_error) ({safe_lease:?})",
                self.renew_interval * 2
            ));
        }
        let one_lost = self.renew_interval + self.request_timeout * 2 + self.retry;
        if one_lost >= safe_lease {
            return Err(format!(
                "renew_interval + 2 × request_timeout + retry ({one_lost:?}) must be below lease × (1 − \
                 clock_rate_error) ({safe_lease:?}), so that one lost renewal does not fence the primary"
            ));
        }
        let safe_ack = self.ack_timeout.mul_f64(1.0 - error);
        if self.heartbeat_interval * 2 >= safe_ack {
            return Err(format!(
                "2 × heartbeat_interval ({:?}) must be below ack_timeout × (1 − clock_rate_error) ({safe_ack:?})",
                self.heartbeat_interval * 2
            ));
        }
        if self.detect_timeout < self.heartbeat_interval * 2 {
            return Err(format!(
                "detect_timeout ({:?}) must be at least 2 × heartbeat_interval ({:?})",
                self.detect_timeout,
                self.heartbeat_interval * 2
            ));
        }
        let bound = self.failover_bound();
        if bound > FAILOVER_BUDGET {
            return Err(format!(
                "failover bound (max(detect_timeout, ack_timeout) + lease) / (1 − clock_rate_error) + \
                 request_timeout + retry = {bound:?} exceeds the {FAILOVER_BUDGET:?} budget"
            ));
        }
        Ok(())
    }

    /// The longest time from the primary's death to a promoted standby, when the witness
    /// and the standby are up and the network delivers: the standby notices within
    /// `max(detect_timeout, ack_timeout)`, the witness's lease runs out within `lease` of
    /// the last renewal (both stretched by the clock error), then one request may fail
    /// (`request_timeout`) and be retried (`retry`). Default: (1 + 2) / 0.95 + 0.4 + 0.1
    /// ≈ 3.66 s.
    pub fn failover_bound(&self) -> Duration {
        (self.detect_timeout.max(self.ack_timeout) + self.lease).div_f64(1.0 - self.clock_rate_error)
            + self.request_timeout
            + self.retry
    }

    fn shrink(&self, duration: Duration) -> Duration {
        duration.mul_f64(1.0 - self.clock_rate_error)
    }
}

/// What to do with a FLUSH (or FUA write) waiting for `seq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FlushDecision {
    /// Answer it: a promotable node has it, or the witness recorded the standby Outdated.
    Complete,
    /// Keep it waiting.
    Wait,
    /// Answer it with EIO, for this reason.
    Fail(String),
}

/// One request sent to the witness and not yet answered.
#[derive(Debug, Clone)]
struct Outstanding {
    request: ArbiterRequest,
    sent_at: Instant,
}

/// The primary's fencing state for one volume (or consistency group) in one epoch.
///
/// # Invariants
///
/// - At most one arbiter request is outstanding.
/// - `outdated_confirmed` is true only after the witness granted `MarkOutdated` in this
///   epoch (or the record this fence was built from says so), and becomes false for good,
///   until the next grant, the moment `MarkUpToDate` is wanted.
/// - Once `deposed` is set it never clears; the driver demotes.
#[derive(Debug)]
pub struct PrimaryFence {
    volume: String,
    node: String,
    standby: String,
    epoch: u64,
    timing: Timing,
    created_at: Instant,
    /// The latest `now` seen, so `poll_timeout` can skip deadlines already acted on.
    now: Instant,

    /// The witness lease, by this node's clock (already shrunk by the clock error).
    lease_until: Option<Instant>,
    /// When the next renewal is due.
    renew_at: Instant,
    /// The standby allowance, by this node's clock (already shrunk).
    ack_allowance_until: Option<Instant>,

    /// Transport: `None` while connected, else when the standby counts as lost.
    disconnected_lost_at: Option<Instant>,
    /// The standby is being resynced: its copy is Inconsistent, its acks prove nothing.
    resyncing: bool,
    /// The standby finished resyncing; `MarkUpToDate` is wanted once it has acked every
    /// seq a FLUSH asked for.
    catching_up: bool,
    /// While catching up: the seq the standby must acknowledge before `MarkUpToDate`;
    /// FLUSHes stop completing alone while it is set, so the target does not move.
    catchup_target: Option<u64>,
    /// Highest `durable_seq` the standby acknowledged in this epoch.
    standby_acked: u64,
    /// When the latest ack of this epoch arrived.
    last_ack_at: Option<Instant>,
    /// Highest seq any FLUSH has asked for, or that the journal held when this fence
    /// started (a previous incarnation may have acknowledged all of it).
    sync_wanted_max: u64,
    /// Whether the driver reported the journal's last seq ([`PrimaryFence::handle_recovered`]);
    /// until then `MarkUpToDate` is never sent.
    recovered: bool,
    /// Since when a sync has waited for the standby without progress (`None`: nothing
    /// waits). Restarted whenever `standby_acked` grows.
    sync_waiting_since: Option<Instant>,

    outdated_confirmed: bool,
    /// The standby caught up; `MarkUpToDate` is to be sent (or was sent and is in doubt).
    up_to_date_wanted: bool,
    up_to_date_sent: bool,
    /// The standby state the witness last confirmed in this epoch.
    witness_standby_state: Option<StandbyState>,

    /// Planned switchover: writes stopped; hand over once the standby acked this seq.
    handover_seq: Option<u64>,
    handover_refused: Option<String>,

    outstanding: Option<Outstanding>,
    retry_at: Option<Instant>,
    last_refusal: Option<String>,
    /// A peer showed a higher epoch: stop at once and ask the witness.
    higher_epoch_seen: Option<u64>,
    deposed: Option<ArbiterRecord>,
}

/// A serializable snapshot of a [`PrimaryFence`], for `keel status` and events, as of the
/// latest `now` the fence was given.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PrimaryStatus {
    /// Volume (or consistency group).
    pub volume: String,
    /// This node.
    pub node: String,
    /// The standby.
    pub standby: String,
    /// The epoch this node is primary of.
    pub epoch: u64,
    /// Whether the transport to the standby is up.
    pub standby_connected: bool,
    /// Whether the standby is being resynced (its acks do not count).
    pub standby_resyncing: bool,
    /// The standby state as the witness last confirmed it in this epoch (`None`: not yet).
    pub standby_state: Option<StandbyState>,
    /// Whether FLUSHes complete without the standby (the witness recorded it Outdated).
    pub completing_alone: bool,
    /// Highest durable seq the standby acknowledged in this epoch.
    pub standby_acked: u64,
    /// Highest seq a FLUSH has waited for.
    pub sync_wanted_max: u64,
    /// Witness lease left, in milliseconds (0 when none).
    pub lease_remaining_ms: u64,
    /// Standby allowance left, in milliseconds (0 when none).
    pub ack_allowance_remaining_ms: u64,
    /// Whether writes are answered now.
    pub writes_allowed: bool,
    /// Neither allowance holds: writes and FLUSHes wait (leases).
    pub fenced: bool,
    /// The witness's record naming another primary or a newer epoch.
    pub deposed: Option<ArbiterRecord>,
    /// A planned handover is draining up to this seq.
    pub handover_seq: Option<u64>,
    /// The request waiting for the witness's answer, if any.
    pub outstanding: Option<ArbiterRequest>,
    /// The witness's latest refusal, for the operator.
    pub last_refusal: Option<String>,
}

impl PrimaryFence {
    /// A fence for `node`, primary of `volume` in `epoch`, with `standby` as its standby.
    ///
    /// It starts with no allowance: writes wait until the first renewal is granted or the
    /// standby acks in this epoch. The standby's state is unknown, so it is treated as
    /// UpToDate: FLUSHes wait for its acks until the witness records it Outdated (rule 1).
    /// The driver then reports the journal's end with [`PrimaryFence::handle_recovered`].
    pub fn new(volume: &str, node: &str, standby: &str, epoch: u64, timing: Timing, now: Instant) -> Self {
        let detect_timeout = timing.detect_timeout;
        Self {
            volume: volume.to_owned(),
            node: node.to_owned(),
            standby: standby.to_owned(),
            epoch,
            timing,
            created_at: now,
            now,
            lease_until: None,
            renew_at: now,
            ack_allowance_until: None,
            // Give the standby one detection period to connect before calling it lost.
            disconnected_lost_at: Some(now + detect_timeout),
            resyncing: false,
            catching_up: false,
            catchup_target: None,
            standby_acked: 0,
            last_ack_at: None,
            sync_wanted_max: 0,
            recovered: false,
            sync_waiting_since: None,
            outdated_confirmed: false,
            up_to_date_wanted: false,
            up_to_date_sent: false,
            witness_standby_state: None,
            handover_seq: None,
            handover_refused: None,
            outstanding: None,
            retry_at: None,
            last_refusal: None,
            higher_epoch_seen: None,
            deposed: None,
        }
    }

    /// A fence built from the witness's record naming `node` primary: a freshly promoted
    /// standby ([`StandbyFence::primary_fence`]) or a primary that just read the record
    /// (`Init`/`Get`). If the record says the standby is Outdated in this epoch, FLUSHes
    /// complete without it (rule 1: the witness durably recorded it). `lease_from` is when
    /// the request whose grant carried a lease was sent; without one, writes wait for the
    /// first renewal.
    pub fn from_record(
        record: &ArbiterRecord,
        node: &str,
        timing: Timing,
        lease_from: Option<(Instant, u64)>,
        now: Instant,
    ) -> Self {
        debug_assert_eq!(record.primary, node);
        let mut fence = Self::new(&record.volume, node, &record.standby, record.epoch, timing.clone(), now);
        fence.witness_standby_state = Some(record.standby_state);
        fence.outdated_confirmed = record.standby_state == StandbyState::Outdated;
        if let Some((sent_at, lease_ms)) = lease_from {
            fence.extend_lease(sent_at, lease_ms);
        }
        fence
    }

    /// The epoch this fence serves.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Highest durable seq the standby acknowledged in this epoch.
    pub fn standby_acked(&self) -> u64 {
        self.standby_acked
    }

    /// The local journal ends at `last_seq` as this fence starts. A previous incarnation
    /// of this node, or the primary this node took over from, may have acknowledged any of
    /// it, so the standby must hold all of it before the witness may mark it UpToDate
    /// (rule 1). The driver calls this once, right after building the fence; until then
    /// `MarkUpToDate` is never sent (safe by default). Found by the seeded simulation: a
    /// restarted primary that knew only its own FLUSHes marked a standby UpToDate that
    /// lacked writes its previous incarnation had acknowledged alone, and the standby was
    /// then promoted without them.
    pub fn handle_recovered(&mut self, now: Instant, last_seq: u64) {
        self.observe(now);
        self.sync_wanted_max = self.sync_wanted_max.max(last_seq);
        self.recovered = true;
        self.check_caught_up();
    }

    /// The transport to the standby is up.
    pub fn handle_standby_connected(&mut self, now: Instant) {
        self.observe(now);
        self.disconnected_lost_at = None;
    }

    /// The transport to the standby went down (after its idle timeout): the standby is
    /// lost now.
    pub fn handle_standby_lost(&mut self, now: Instant) {
        self.observe(now);
        self.disconnected_lost_at = Some(now);
    }

    /// The standby acknowledged `durable_seq` (durable after its fdatasync) in `epoch`.
    /// Acks of other epochs, and acks while the standby is resyncing (its copy is
    /// Inconsistent until [`PrimaryFence::handle_standby_in_sync`]), do not count towards
    /// FLUSHes (rule 1); any ack of this epoch shows the standby is alive.
    pub fn handle_standby_ack(&mut self, now: Instant, epoch: u64, durable_seq: u64) {
        self.observe(now);
        if epoch != self.epoch {
            return;
        }
        self.last_ack_at = Some(now);
        if !self.resyncing && durable_seq > self.standby_acked {
            self.standby_acked = durable_seq;
            self.sync_waiting_since = (self.sync_wanted_max > durable_seq).then_some(now);
        }
        // A standby marked Outdated while its stream stayed up (a stall longer than the ack
        // timeout) holds every record in order: once it has acknowledged every seq a FLUSH
        // asked for, it can be marked UpToDate again without a reconnect.
        if self.outdated_confirmed
            && !self.resyncing
            && !self.catching_up
            && !self.up_to_date_wanted
            && !self.up_to_date_sent
            && self.disconnected_lost_at.is_none()
            && self.standby_acked >= self.sync_wanted_max
        {
            self.catching_up = true;
        }
        self.check_caught_up();
    }

    /// The standby, in `epoch`, echoed the send time `probe_sent_at` (by this node's
    /// clock) of the newest heartbeat or record it had received when it acked: the standby
    /// allowance runs until `probe_sent_at + ack_timeout × (1 − clock_rate_error)`. The
    /// standby driver must have called [`StandbyFence::try_ack`] before sending that ack.
    /// Echoes of other epochs, from before this fence existed, or from the future are
    /// ignored. Without echoes, the primary answers writes only under the witness lease.
    pub fn handle_standby_echo(&mut self, now: Instant, epoch: u64, probe_sent_at: Instant) {
        self.observe(now);
        if epoch != self.epoch || probe_sent_at < self.created_at || probe_sent_at > now {
            return;
        }
        let until = probe_sent_at + self.timing.shrink(self.timing.ack_timeout);
        self.ack_allowance_until = self.ack_allowance_until.max(Some(until));
    }

    /// The standby connected but needs a resync (it diverged, or was behind the retained
    /// journal): until [`PrimaryFence::handle_standby_in_sync`], it is not a valid copy, so
    /// FLUSHes no longer count its acks, and it is lost for the witness (`MarkOutdated`).
    pub fn handle_standby_resyncing(&mut self, now: Instant) {
        self.observe(now);
        self.resyncing = true;
        self.catching_up = false;
        self.catchup_target = None;
        if self.up_to_date_wanted && !self.up_to_date_sent {
            self.up_to_date_wanted = false;
        }
    }

    /// A FLUSH or FUA write wants `seq` durable on the standby (before it may complete).
    pub fn handle_sync_wanted(&mut self, now: Instant, seq: u64) {
        self.observe(now);
        self.sync_wanted_max = self.sync_wanted_max.max(seq);
        if seq > self.standby_acked && self.sync_waiting_since.is_none() {
            self.sync_waiting_since = Some(now);
        }
    }

    /// The standby finished resyncing: its copy is complete up to `durable_seq`, and the
    /// stream keeps it so. Its acks count again; once it has acknowledged every seq a
    /// FLUSH has asked for, `MarkUpToDate` is sent, and from that moment FLUSHes wait for
    /// its acks again (rule 1: the witness may consider it promotable only when it has
    /// everything acknowledged). Harmless when it was never outdated.
    pub fn handle_standby_in_sync(&mut self, now: Instant, durable_seq: u64) {
        self.observe(now);
        self.resyncing = false;
        self.catching_up = true;
        if durable_seq > self.standby_acked {
            self.standby_acked = durable_seq;
            self.sync_waiting_since = (self.sync_wanted_max > durable_seq).then_some(now);
        }
        self.check_caught_up();
    }

    /// A peer (the standby's handshake, a replication message) showed `epoch`. A higher
    /// epoch means another node was promoted: stop answering writes at once and ask the
    /// witness, whose answer deposes this node.
    pub fn handle_peer_epoch(&mut self, now: Instant, epoch: u64) {
        self.observe(now);
        if epoch > self.epoch && self.higher_epoch_seen.is_none_or(|seen| seen < epoch) {
            self.higher_epoch_seen = Some(epoch);
            self.renew_at = now;
            self.retry_at = None;
        }
    }

    /// Planned switchover: the driver stopped accepting writes after `last_seq`. Writes stop
    /// now; once the standby has acknowledged `last_seq`, `Handover` is sent, and its grant
    /// shows up as [`PrimaryFence::deposed`] (the driver demotes this node).
    pub fn handle_handover_wanted(&mut self, now: Instant, last_seq: u64) {
        self.observe(now);
        self.handover_seq = Some(last_seq);
        self.handover_refused = None;
    }

    /// The witness answered `request`, sent at `sent_at` (by this node's clock), or the
    /// request failed (`Err`). Answers to anything but the outstanding request only count
    /// for deposition and for the lease they carry.
    pub fn handle_witness(
        &mut self,
        now: Instant,
        sent_at: Instant,
        request: &ArbiterRequest,
        response: Result<&ArbiterResponse, &str>,
    ) {
        self.observe(now);
        let current = self.outstanding.as_ref().is_some_and(|out| out.sent_at == sent_at && out.request == *request);
        if current {
            self.outstanding = None;
        }
        let response = match response {
            Ok(response) => response,
            Err(error) => {
                if current {
                    self.last_refusal = Some(format!("witness unreachable: {error}"));
                    self.retry_at = Some(now + self.timing.retry);
                }
                return;
            }
        };
        if let Some(record) = response.record() {
            if record.volume == self.volume
                && (record.epoch > self.epoch || (record.epoch == self.epoch && record.primary != self.node))
            {
                // Another node is primary of a newer epoch (or, for a handover, is about to
                // be): never answer a write again (leases).
                self.deposed = Some(record.clone());
                return;
            }
        }
        match response {
            ArbiterResponse::Granted { record, lease_ms } => {
                if let Some(lease_ms) = lease_ms {
                    if record.epoch == self.epoch && record.primary == self.node {
                        self.extend_lease(sent_at, *lease_ms);
                    }
                }
                if !current {
                    return;
                }
                self.last_refusal = None;
                match request {
                    ArbiterRequest::MarkOutdated { .. } => {
                        // Rule 1, second half: from now on FLUSHes complete alone. This
                        // grant supersedes any earlier MarkUpToDate (requests reach the
                        // witness in order); if the standby is in sync again,
                        // MarkUpToDate is simply sent next, and completing alone stops
                        // the moment it is wanted.
                        self.witness_standby_state = Some(StandbyState::Outdated);
                        self.outdated_confirmed = true;
                        self.up_to_date_sent = false;
                        if self.standby_lost(now) {
                            self.up_to_date_wanted = false;
                        }
                    }
                    ArbiterRequest::MarkUpToDate { .. } => {
                        self.witness_standby_state = Some(StandbyState::UpToDate);
                        self.up_to_date_wanted = false;
                        self.up_to_date_sent = false;
                    }
                    _ => {}
                }
            }
            ArbiterResponse::RetryAfter { wait_ms, .. } => {
                if current {
                    self.retry_at = Some(now + Duration::from_millis(*wait_ms).max(self.timing.retry));
                }
            }
            ArbiterResponse::Refused { reason, .. } => {
                if current {
                    if matches!(request, ArbiterRequest::Handover { .. }) {
                        self.handover_seq = None;
                        self.handover_refused = Some(reason.clone());
                    }
                    self.last_refusal = Some(reason.clone());
                    self.retry_at = Some(now + self.timing.retry);
                }
            }
        }
    }

    /// The next request to send to the witness, if any; it becomes the outstanding one,
    /// sent at `now`. Priorities: `Handover` (when drained), `MarkOutdated` (the standby is
    /// lost and FLUSHes stall until it is recorded), `MarkUpToDate`, then `Renew` when due.
    pub fn poll_request(&mut self, now: Instant) -> Option<ArbiterRequest> {
        self.observe(now);
        self.expire_outstanding(now);
        if self.deposed.is_some() || self.outstanding.is_some() {
            return None;
        }
        if self.retry_at.is_some_and(|at| at > now) {
            return None;
        }
        self.retry_at = None;
        let volume = self.volume.clone();
        let (epoch, node) = (self.epoch, self.node.clone());
        let lost = self.standby_lost(now);
        if lost && self.catchup_target.is_some() {
            // Lost while catching up: FLUSHes complete alone again (the witness still says
            // Outdated); the next acks start over.
            self.catching_up = false;
            self.catchup_target = None;
        }
        if lost && self.up_to_date_wanted && !self.up_to_date_sent {
            // Lost again before we asked: the witness still says Outdated, keep relying on it.
            self.up_to_date_wanted = false;
        }
        let request = if self.higher_epoch_seen.is_some() {
            ArbiterRequest::Renew { volume, epoch, node }
        } else if self.handover_seq.is_some_and(|seq| self.standby_acked >= seq) && !lost {
            ArbiterRequest::Handover { volume, epoch, node }
        } else if lost && !self.outdated_confirmed {
            ArbiterRequest::MarkOutdated { volume, epoch, node }
        } else if self.up_to_date_wanted {
            self.up_to_date_sent = true;
            self.outdated_confirmed = false;
            ArbiterRequest::MarkUpToDate { volume, epoch, node }
        } else if now >= self.renew_at {
            ArbiterRequest::Renew { volume, epoch, node }
        } else {
            return None;
        };
        if matches!(request, ArbiterRequest::Renew { .. }) {
            self.renew_at = now + self.timing.renew_interval;
        }
        self.outstanding = Some(Outstanding { request: request.clone(), sent_at: now });
        Some(request)
    }

    /// When the driver must call [`PrimaryFence::handle_tick`] (then `poll_request`) at the
    /// latest, assuming it called `poll_request` until `None` after its last event. The
    /// driver times FLUSHes out itself (`flush_timeout`).
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.deposed.is_some() {
            return None;
        }
        if let Some(out) = &self.outstanding {
            return Some(out.sent_at + self.timing.request_timeout);
        }
        if let Some(retry_at) = self.retry_at {
            return Some(retry_at);
        }
        let mut next = self.renew_at;
        if !self.outdated_confirmed {
            // Deadlines already passed were acted on by the poll that passed them.
            next = next.min(Some(self.lost_at()).filter(|&at| at > self.now).unwrap_or(next));
        }
        // Not needed to send anything, but the driver reports the fence as an event.
        for until in [self.lease_until, self.ack_allowance_until].into_iter().flatten() {
            if until > self.now {
                next = next.min(until);
            }
        }
        Some(next)
    }

    /// Time passed: expires the outstanding request at its deadline.
    pub fn handle_tick(&mut self, now: Instant) {
        self.observe(now);
        self.expire_outstanding(now);
    }

    /// What to do with a FLUSH waiting for `seq` (rule 1): `Complete` iff this node is not
    /// deposed, holds an allowance, and the standby acknowledged `seq` in this epoch or the
    /// witness recorded it Outdated in this epoch; `Fail` when deposed or a newer epoch
    /// was seen; `Wait` otherwise. A fenced primary does not fail FLUSHes: it stops
    /// answering, so applications block on I/O (leases) until it can answer again or the
    /// driver's `flush_timeout` turns the wait into EIO.
    pub fn flush_decision(&self, now: Instant, seq: u64) -> FlushDecision {
        if let Some(record) = &self.deposed {
            return FlushDecision::Fail(format!(
                "volume {:?}: no longer primary (epoch {} has primary {:?})",
                self.volume, record.epoch, record.primary
            ));
        }
        if let Some(epoch) = self.higher_epoch_seen {
            return FlushDecision::Fail(format!(
                "volume {:?}: a peer is at epoch {epoch}, newer than this primary's {}",
                self.volume, self.epoch
            ));
        }
        if self.holds_allowance(now) && (seq <= self.standby_acked || self.completing_alone()) {
            return FlushDecision::Complete;
        }
        FlushDecision::Wait
    }

    /// Whether this node may answer writes now: not deposed, no newer epoch seen, not
    /// draining for a handover, and the witness lease or the standby allowance holds
    /// (leases).
    pub fn writes_allowed(&self, now: Instant) -> bool {
        self.deposed.is_none()
            && self.higher_epoch_seen.is_none()
            && self.handover_seq.is_none()
            && self.holds_allowance(now)
    }

    /// The witness's record naming another primary (or a newer epoch): the driver demotes
    /// this node to standby of that record's primary.
    pub fn deposed(&self) -> Option<&ArbiterRecord> {
        self.deposed.as_ref()
    }

    /// A snapshot for status and events.
    pub fn status(&self) -> PrimaryStatus {
        let now = self.now;
        let remaining = |until: Option<Instant>| {
            until.and_then(|until| until.checked_duration_since(now)).map_or(0, |left| left.as_millis() as u64)
        };
        PrimaryStatus {
            volume: self.volume.clone(),
            node: self.node.clone(),
            standby: self.standby.clone(),
            epoch: self.epoch,
            standby_connected: self.disconnected_lost_at.is_none(),
            standby_resyncing: self.resyncing,
            standby_state: self.witness_standby_state,
            completing_alone: self.completing_alone(),
            standby_acked: self.standby_acked,
            sync_wanted_max: self.sync_wanted_max,
            lease_remaining_ms: remaining(self.lease_until),
            ack_allowance_remaining_ms: remaining(self.ack_allowance_until),
            writes_allowed: self.writes_allowed(now),
            fenced: !self.holds_allowance(now),
            deposed: self.deposed.clone(),
            handover_seq: self.handover_seq,
            outstanding: self.outstanding.as_ref().map(|out| out.request.clone()),
            last_refusal: self.handover_refused.clone().or_else(|| self.last_refusal.clone()),
        }
    }

    fn observe(&mut self, now: Instant) {
        self.now = self.now.max(now);
    }

    fn extend_lease(&mut self, sent_at: Instant, lease_ms: u64) {
        // Counted from when we *sent* the request, shrunk by the clock error (leases).
        let until = sent_at + self.timing.shrink(Duration::from_millis(lease_ms));
        self.lease_until = self.lease_until.max(Some(until));
        self.renew_at = self.renew_at.max(sent_at + self.timing.renew_interval);
    }

    fn holds_allowance(&self, now: Instant) -> bool {
        self.lease_until.is_some_and(|until| now < until) || self.ack_allowance_until.is_some_and(|until| now < until)
    }

    /// Rule 1 for `MarkUpToDate`: the standby has every seq a FLUSH asked for (so every
    /// FLUSH completed alone is on it), and from now on FLUSHes wait for its acks.
    fn check_caught_up(&mut self) {
        if !self.catching_up || !self.recovered || self.resyncing {
            return;
        }
        // Freeze the target: FLUSHes stop completing alone from here (completing_alone), so
        // every seq one completed alone is at or below it. A moving target (the highest seq
        // wanted so far) is never reached under a steady load.
        let target = *self.catchup_target.get_or_insert(self.sync_wanted_max);
        if self.standby_acked < target {
            return;
        }
        self.catching_up = false;
        self.catchup_target = None;
        let maybe_outdated = self.outdated_confirmed
            || self.witness_standby_state != Some(StandbyState::UpToDate)
            || self.outstanding.as_ref().is_some_and(|out| matches!(out.request, ArbiterRequest::MarkOutdated { .. }));
        if maybe_outdated {
            self.up_to_date_wanted = true;
        }
    }

    fn completing_alone(&self) -> bool {
        self.outdated_confirmed && !self.up_to_date_wanted && self.catchup_target.is_none()
    }

    fn expire_outstanding(&mut self, now: Instant) {
        if let Some(out) = &self.outstanding {
            if now >= out.sent_at + self.timing.request_timeout {
                let (sent_at, request) = (out.sent_at, out.request.clone());
                self.handle_witness(now, sent_at, &request, Err("no answer within the request timeout"));
            }
        }
    }

    /// When the standby counts as lost: disconnected, silent for `ack_timeout`, or no
    /// progress for `ack_timeout` while a sync waits.
    fn lost_at(&self) -> Instant {
        let mut at = self.last_ack_at.unwrap_or(self.created_at) + self.timing.ack_timeout;
        if let Some(disconnected) = self.disconnected_lost_at {
            at = at.min(disconnected);
        }
        if let Some(waiting) = self.sync_waiting_since {
            at = at.min(waiting + self.timing.ack_timeout);
        }
        at
    }

    fn standby_lost(&self, now: Instant) -> bool {
        self.resyncing || now >= self.lost_at()
    }
}

/// The standby's fencing state for one volume (or consistency group) in one epoch.
///
/// # Invariants
///
/// - At most one arbiter request is outstanding.
/// - While a `Promote` this node sent might still be granted (`promote_in_doubt`), it
///   sends no acks; it leaves that state only on an answer from the witness to a request
///   sent after it (transport contract above).
/// - It never sends `Promote` before `ack_timeout` after its last ack, by its clock.
#[derive(Debug)]
pub struct StandbyFence {
    volume: String,
    node: String,
    primary: String,
    epoch: u64,
    timing: Timing,
    now: Instant,

    primary_connected: bool,
    /// When the primary counts as lost while disconnected.
    primary_lost_at: Instant,
    in_sync: bool,
    automatic_failover: bool,
    /// When this node last sent (or may have sent) an ack.
    last_ack_sent: Instant,
    promote_in_doubt: bool,

    outstanding: Option<Outstanding>,
    retry_at: Option<Instant>,
    last_refusal: Option<String>,
    /// The grant, with when its request was sent and the lease it carried.
    promoted: Option<(ArbiterRecord, Instant, Option<u64>)>,
    superseded: Option<ArbiterRecord>,
}

/// A serializable snapshot of a [`StandbyFence`], for `keel status` and events.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StandbyStatus {
    /// Volume (or consistency group).
    pub volume: String,
    /// This node.
    pub node: String,
    /// The primary of this epoch.
    pub primary: String,
    /// The epoch this node is standby in.
    pub epoch: u64,
    /// Whether the primary's replication traffic arrives.
    pub primary_connected: bool,
    /// Whether this node's copy is consistent and complete enough to be promoted.
    pub in_sync: bool,
    /// Whether it asks to be promoted when the primary is lost.
    pub automatic_failover: bool,
    /// A `Promote` might have been granted; acks are held back until the witness answers.
    pub promote_in_doubt: bool,
    /// The request waiting for the witness's answer, if any.
    pub outstanding: Option<ArbiterRequest>,
    /// The grant: this node is primary of this record's epoch.
    pub promoted: Option<ArbiterRecord>,
    /// The witness knows a newer epoch in which another node is primary.
    pub superseded: Option<ArbiterRecord>,
    /// The witness's latest refusal (e.g. "outdated"), for the operator.
    pub last_refusal: Option<String>,
}

impl StandbyFence {
    /// A fence for `node`, standby of `primary` for `volume` in `epoch`.
    ///
    /// It starts not in sync (the driver says when its copy is complete: never promote an
    /// Inconsistent node), with automatic failover on, and as if it had just acked: a
    /// previous incarnation of this node may have acked a moment ago, and the primary may
    /// still be relying on that ack.
    pub fn new(volume: &str, node: &str, primary: &str, epoch: u64, timing: Timing, now: Instant) -> Self {
        let detect_timeout = timing.detect_timeout;
        Self {
            volume: volume.to_owned(),
            node: node.to_owned(),
            primary: primary.to_owned(),
            epoch,
            timing,
            now,
            primary_connected: false,
            primary_lost_at: now + detect_timeout,
            in_sync: false,
            automatic_failover: true,
            last_ack_sent: now,
            promote_in_doubt: false,
            outstanding: None,
            retry_at: None,
            last_refusal: None,
            promoted: None,
            superseded: None,
        }
    }

    /// The epoch this fence serves.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Replication traffic from the primary of this epoch arrives again.
    pub fn handle_primary_connected(&mut self, now: Instant) {
        self.observe(now);
        self.primary_connected = true;
    }

    /// No replication traffic from the primary of this epoch for `detect_timeout` (the
    /// connection idled out, or the peer is not that primary any more): it is lost now.
    pub fn handle_primary_lost(&mut self, now: Instant) {
        self.observe(now);
        if self.primary_connected {
            self.primary_connected = false;
            self.primary_lost_at = now;
        }
    }

    /// Whether this node's copy is complete and consistent (false while Inconsistent or
    /// resyncing: it never asks to be promoted then).
    pub fn handle_in_sync(&mut self, in_sync: bool) {
        self.in_sync = in_sync;
    }

    /// A previous incarnation of this node sent `Promote` in this epoch and may not have
    /// learned the answer. The driver persists "Promote sent in epoch e" before it sends
    /// the first one (see [`StandbyFence::poll_request`]) and calls this after a restart in
    /// the same epoch: acks are held back until the witness answers, because the lost
    /// grant may have made this node primary already (found by the seeded simulation:
    /// without it, a restarted standby acked the old primary after the witness had
    /// promoted it, and the old primary completed FLUSHes in a superseded epoch).
    pub fn handle_promote_in_doubt(&mut self) {
        if self.promoted.is_none() && self.superseded.is_none() {
            self.promote_in_doubt = true;
        }
    }

    /// Whether to ask for promotion when the primary is lost (operator setting).
    pub fn handle_automatic_failover(&mut self, enabled: bool) {
        self.automatic_failover = enabled;
    }

    /// The driver wants to send an ack (answering a heartbeat or record). `true`: send it,
    /// and this counts as sent now. `false`: do not; a `Promote` might be granted, or this
    /// node already was promoted, and the primary must not get an allowance from it.
    pub fn try_ack(&mut self, now: Instant) -> bool {
        self.observe(now);
        if self.promote_in_doubt || self.promoted.is_some() || self.superseded.is_some() {
            return false;
        }
        self.last_ack_sent = self.last_ack_sent.max(now);
        true
    }

    /// The witness answered `request` (or it failed: `Err`).
    pub fn handle_witness(&mut self, now: Instant, request: &ArbiterRequest, response: Result<&ArbiterResponse, &str>) {
        self.observe(now);
        let outstanding = self.outstanding.as_ref().filter(|out| out.request == *request).map(|out| out.sent_at);
        let current = outstanding.is_some();
        if current {
            self.outstanding = None;
        }
        let response = match response {
            Ok(response) => response,
            Err(error) => {
                if current {
                    // A failed Promote may still have been granted: stay in doubt.
                    self.last_refusal = Some(format!("witness unreachable: {error}"));
                    self.retry_at = Some(now + self.timing.retry);
                }
                return;
            }
        };
        if let Some(record) = response.record() {
            if record.volume == self.volume && record.epoch > self.epoch {
                if record.primary == self.node {
                    // Granted, or a repeat of a grant whose answer was lost.
                    let lease_ms = match response {
                        ArbiterResponse::Granted { lease_ms, .. } => *lease_ms,
                        _ => None,
                    };
                    let sent_at = outstanding.unwrap_or(now);
                    let lease = if record.epoch == self.epoch + 1 { lease_ms } else { None };
                    self.promoted = Some((record.clone(), sent_at, lease));
                } else {
                    self.superseded = Some(record.clone());
                }
                self.promote_in_doubt = false;
                return;
            }
        }
        if !current {
            return;
        }
        // An answer to a request sent after any earlier Promote: that one was decided (or
        // will never be), and the record shows it was not granted.
        self.promote_in_doubt = false;
        match response {
            ArbiterResponse::Granted { .. } => {
                self.last_refusal = None;
            }
            ArbiterResponse::RetryAfter { wait_ms, .. } => {
                self.last_refusal = None;
                self.retry_at = Some(now + Duration::from_millis(*wait_ms).max(Duration::from_millis(1)));
            }
            ArbiterResponse::Refused { reason, .. } => {
                // Outdated, or not the standby: it will not change before the primary
                // acts; ask again after a renewal interval rather than every `retry`
                // (this keeps the failover bound after the primary marks it UpToDate).
                self.last_refusal = Some(reason.clone());
                self.retry_at = Some(now + self.timing.renew_interval);
            }
        }
    }

    /// The next request to send to the witness, if any: `Promote` once the primary has been
    /// lost, this node is in sync, automatic failover is on and `ack_timeout` has passed
    /// since its last ack (rule 2 and leases); `Get` to settle a `Promote` in doubt after
    /// the primary came back. Before sending the first `Promote` of an epoch the driver
    /// persists that it did ([`StandbyFence::handle_promote_in_doubt`]).
    pub fn poll_request(&mut self, now: Instant) -> Option<ArbiterRequest> {
        self.observe(now);
        self.expire_outstanding(now);
        if self.promoted.is_some() || self.superseded.is_some() || self.outstanding.is_some() {
            return None;
        }
        if self.retry_at.is_some_and(|at| at > now) {
            return None;
        }
        self.retry_at = None;
        let request = if self.promote_wanted() && now >= self.promote_at() {
            self.promote_in_doubt = true;
            ArbiterRequest::Promote { volume: self.volume.clone(), epoch: self.epoch, node: self.node.clone() }
        } else if self.promote_in_doubt {
            ArbiterRequest::Get { volume: self.volume.clone() }
        } else {
            return None;
        };
        self.outstanding = Some(Outstanding { request: request.clone(), sent_at: now });
        Some(request)
    }

    /// When the driver must call [`StandbyFence::handle_tick`] (then `poll_request`).
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.promoted.is_some() || self.superseded.is_some() {
            return None;
        }
        if let Some(out) = &self.outstanding {
            return Some(out.sent_at + self.timing.request_timeout);
        }
        if let Some(at) = self.retry_at {
            return Some(at);
        }
        if self.promote_wanted() {
            return Some(self.promote_at());
        }
        None
    }

    /// Time passed: expires the outstanding request at its deadline.
    pub fn handle_tick(&mut self, now: Instant) {
        self.observe(now);
        self.expire_outstanding(now);
    }

    /// The witness's grant: the driver promotes this node to the record's epoch
    /// ([`StandbyFence::primary_fence`]).
    pub fn promoted(&self) -> Option<&ArbiterRecord> {
        self.promoted.as_ref().map(|(record, _, _)| record)
    }

    /// The witness knows a newer epoch in which another node is primary: the driver makes
    /// this node a standby of that epoch (new fence, handshake, resync).
    pub fn superseded(&self) -> Option<&ArbiterRecord> {
        self.superseded.as_ref()
    }

    /// The primary fence of a promoted node (`None` when not promoted): the lease granted
    /// with the promotion counts from when `Promote` was sent, and the old primary is
    /// Outdated (the witness recorded it), so FLUSHes complete alone until it resyncs. The
    /// driver still calls [`PrimaryFence::handle_recovered`] on it.
    pub fn primary_fence(&self, now: Instant) -> Option<PrimaryFence> {
        let (record, sent_at, lease_ms) = self.promoted.as_ref()?;
        let lease_from = lease_ms.map(|lease_ms| (*sent_at, lease_ms));
        Some(PrimaryFence::from_record(record, &self.node, self.timing.clone(), lease_from, now))
    }

    /// A snapshot for status and events.
    pub fn status(&self) -> StandbyStatus {
        StandbyStatus {
            volume: self.volume.clone(),
            node: self.node.clone(),
            primary: self.primary.clone(),
            epoch: self.epoch,
            primary_connected: self.primary_connected,
            in_sync: self.in_sync,
            automatic_failover: self.automatic_failover,
            promote_in_doubt: self.promote_in_doubt,
            outstanding: self.outstanding.as_ref().map(|out| out.request.clone()),
            promoted: self.promoted().cloned(),
            superseded: self.superseded.clone(),
            last_refusal: self.last_refusal.clone(),
        }
    }

    fn observe(&mut self, now: Instant) {
        self.now = self.now.max(now);
    }

    fn promote_wanted(&self) -> bool {
        !self.primary_connected && self.in_sync && self.automatic_failover
    }

    /// The earliest moment to send `Promote`: the primary lost, and `ack_timeout` after the
    /// last ack (so every standby allowance of the primary has run out; leases).
    fn promote_at(&self) -> Instant {
        self.primary_lost_at.max(self.last_ack_sent + self.timing.ack_timeout)
    }

    fn expire_outstanding(&mut self, now: Instant) {
        if let Some(out) = &self.outstanding {
            if now >= out.sent_at + self.timing.request_timeout {
                let request = out.request.clone();
                self.handle_witness(now, &request, Err("no answer within the request timeout"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn record(epoch: u64, primary: &str, standby: &str, standby_state: StandbyState) -> ArbiterRecord {
        ArbiterRecord {
            volume: "vol".to_owned(),
            epoch,
            primary: primary.to_owned(),
            standby: standby.to_owned(),
            standby_state,
        }
    }

    fn granted(record: ArbiterRecord) -> ArbiterResponse {
        ArbiterResponse::Granted { record, lease_ms: Some(2000) }
    }

    /// Sends the next request and has the witness grant it, `rtt` later.
    fn grant_next(
        fence: &mut PrimaryFence,
        now: Instant,
        rtt: Duration,
        standby_state: StandbyState,
    ) -> ArbiterRequest {
        let request = fence.poll_request(now).expect("a request is due");
        let answer = granted(record(fence.epoch(), "a", "b", standby_state));
        fence.handle_witness(now + rtt, now, &request, Ok(&answer));
        request
    }

    #[test]
    fn default_timing_is_valid_and_within_budget() {
        let timing = Timing::default();
        timing.validate().unwrap();
        let bound = timing.failover_bound();
        assert!(bound > Duration::from_millis(3600) && bound < Duration::from_millis(3700), "{bound:?}");
        let bad = Timing { renew_interval: Duration::from_secs(1), ..Timing::default() };
        assert!(bad.validate().unwrap_err().contains("renew_interval"));
        let bad =
            Timing { lease: Duration::from_secs(5), renew_interval: Duration::from_millis(500), ..Timing::default() };
        assert!(bad.validate().unwrap_err().contains("budget"));
        let bad = Timing { heartbeat_interval: Duration::from_millis(600), ..Timing::default() };
        assert!(bad.validate().is_err());
        let bad = Timing { clock_rate_error: 0.6, ..Timing::default() };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn primary_starts_fenced_and_counts_the_lease_from_sending() {
        let start = Instant::now();
        let timing = Timing::default();
        let mut fence = PrimaryFence::new("vol", "a", "b", 1, timing.clone(), start);
        fence.handle_recovered(start, 0);
        assert!(!fence.writes_allowed(start));
        assert_eq!(fence.flush_decision(start, 1), FlushDecision::Wait);
        let sent = start + 10 * MS;
        let request = grant_next(&mut fence, sent, 300 * MS, StandbyState::UpToDate);
        assert!(matches!(request, ArbiterRequest::Renew { epoch: 1, .. }));
        // 2 s × 0.95 from the send time, not from the answer.
        let end = sent + Duration::from_millis(1900);
        assert!(fence.writes_allowed(end - MS));
        assert!(!fence.writes_allowed(end));
        // The next renewal is due one interval after the send.
        assert_eq!(fence.poll_request(sent + timing.renew_interval - MS), None);
        assert!(fence.poll_request(sent + timing.renew_interval).is_some());
    }

    #[test]
    fn flushes_need_acks_until_the_witness_records_the_standby_outdated() {
        let start = Instant::now();
        let mut fence = PrimaryFence::new("vol", "a", "b", 1, Timing::default(), start);
        fence.handle_recovered(start, 0);
        fence.handle_standby_connected(start);
        grant_next(&mut fence, start, MS, StandbyState::UpToDate);
        fence.handle_sync_wanted(start, 5);
        fence.handle_standby_ack(start + MS, 1, 4);
        assert_eq!(fence.flush_decision(start + MS, 5), FlushDecision::Wait);
        assert_eq!(fence.flush_decision(start + MS, 4), FlushDecision::Complete);
        // Acks of another epoch do not count.
        fence.handle_standby_ack(start + MS, 2, 9);
        assert_eq!(fence.flush_decision(start + MS, 5), FlushDecision::Wait);
        // No progress for ack_timeout while a sync waits: MarkOutdated.
        let stalled = start + MS + Duration::from_secs(1);
        let request = grant_next(&mut fence, stalled, MS, StandbyState::Outdated);
        assert!(matches!(request, ArbiterRequest::MarkOutdated { .. }), "{request:?}");
        assert_eq!(fence.flush_decision(stalled + MS, 5), FlushDecision::Complete);
        assert!(fence.status().completing_alone);
        // Catching up: the target (every seq a FLUSH asked for) is frozen and FLUSHes need
        // acks again from that moment, so no FLUSH completed alone can lie beyond it.
        fence.handle_sync_wanted(stalled + MS, 8);
        fence.handle_standby_in_sync(stalled + 2 * MS, 7);
        assert!(!fence.status().completing_alone, "catching up: FLUSHes wait for the standby");
        assert_eq!(fence.flush_decision(stalled + 2 * MS, 8), FlushDecision::Wait);
        assert!(fence.poll_request(stalled + 2 * MS).is_none_or(|r| !matches!(r, ArbiterRequest::MarkUpToDate { .. })));
        fence.handle_standby_ack(stalled + 3 * MS, 1, 8);
        assert!(!fence.status().completing_alone);
        assert_eq!(fence.flush_decision(stalled + 3 * MS, 9), FlushDecision::Wait);
        let request = grant_next(&mut fence, stalled + 4 * MS, MS, StandbyState::UpToDate);
        assert!(matches!(request, ArbiterRequest::MarkUpToDate { .. }), "{request:?}");
    }

    /// Regression (found by the seeded simulation, seed 4173 at the time): a MarkUpToDate
    /// that failed left `up_to_date_wanted` set; the standby was then lost, and every
    /// granted MarkOutdated was ignored because of that flag, so the primary asked again
    /// forever and its FLUSHes never completed. Fix: a granted MarkOutdated always
    /// confirms Outdated (it supersedes any earlier MarkUpToDate at the witness).
    #[test]
    fn a_granted_mark_outdated_supersedes_a_failed_mark_up_to_date() {
        let start = Instant::now();
        let outdated = record(1, "a", "b", StandbyState::Outdated);
        let mut fence = PrimaryFence::from_record(&outdated, "a", Timing::default(), Some((start, 2000)), start);
        fence.handle_recovered(start, 10);
        fence.handle_standby_connected(start);
        fence.handle_standby_ack(start, 1, 10);
        fence.handle_standby_in_sync(start, 10);
        let request = fence.poll_request(start).unwrap();
        assert!(matches!(request, ArbiterRequest::MarkUpToDate { .. }), "{request:?}");
        fence.handle_witness(start + MS, start, &request, Err("connection reset"));
        fence.handle_standby_lost(start + MS);
        let retry = start + MS + Timing::default().retry;
        let request = grant_next(&mut fence, retry, MS, StandbyState::Outdated);
        assert!(matches!(request, ArbiterRequest::MarkOutdated { .. }), "{request:?}");
        assert!(fence.status().completing_alone);
        assert_eq!(fence.flush_decision(retry + MS, 20), FlushDecision::Complete);
        let later = retry + 2 * MS;
        assert!(!matches!(fence.poll_request(later), Some(ArbiterRequest::MarkOutdated { .. })));
    }

    #[test]
    fn mark_up_to_date_waits_for_the_recovered_journal_end() {
        let start = Instant::now();
        let state = record(3, "a", "b", StandbyState::Outdated);
        let mut fence = PrimaryFence::from_record(&state, "a", Timing::default(), Some((start, 2000)), start);
        assert!(fence.writes_allowed(start));
        assert_eq!(fence.flush_decision(start, 100), FlushDecision::Complete, "outdated per the record");
        fence.handle_standby_connected(start);
        fence.handle_standby_in_sync(start, 50);
        assert!(fence.status().completing_alone, "not recovered yet: never MarkUpToDate");
        fence.handle_recovered(start, 80);
        // The standby lacks 51..=80: no MarkUpToDate yet, and FLUSHes wait for it from now on.
        assert!(!fence.status().completing_alone);
        assert_eq!(fence.flush_decision(start, 81), FlushDecision::Wait);
        fence.handle_standby_ack(start + MS, 3, 80);
        let request = fence.poll_request(start + MS).unwrap();
        assert!(matches!(request, ArbiterRequest::MarkUpToDate { .. }), "{request:?}");
    }

    /// Regression (found by the PostgreSQL end-to-end test): a standby marked Outdated
    /// during a stall while its stream stayed up was never marked UpToDate again under a
    /// steady load, so there was no automatic failover. Fix: once its acks reach every seq
    /// a FLUSH asked for, catching up starts by itself, without a reconnect.
    #[test]
    fn a_standby_outdated_by_a_stall_becomes_up_to_date_again_while_connected() {
        let start = Instant::now();
        let mut fence = PrimaryFence::new("vol", "a", "b", 1, Timing::default(), start);
        fence.handle_recovered(start, 0);
        fence.handle_standby_connected(start);
        grant_next(&mut fence, start, MS, StandbyState::UpToDate);
        fence.handle_sync_wanted(start, 5);
        let stalled = start + Duration::from_secs(1) + MS;
        let request = grant_next(&mut fence, stalled, MS, StandbyState::Outdated);
        assert!(matches!(request, ArbiterRequest::MarkOutdated { .. }), "{request:?}");
        assert!(fence.status().completing_alone);
        // The load goes on; the standby's acks lag, then reach what FLUSHes asked for.
        fence.handle_sync_wanted(stalled + MS, 9);
        fence.handle_standby_ack(stalled + 2 * MS, 1, 7);
        assert!(fence.status().completing_alone);
        fence.handle_standby_ack(stalled + 3 * MS, 1, 9);
        assert!(!fence.status().completing_alone);
        let request = grant_next(&mut fence, stalled + 4 * MS, MS, StandbyState::UpToDate);
        assert!(matches!(request, ArbiterRequest::MarkUpToDate { .. }), "{request:?}");
    }

    #[test]
    fn a_newer_epoch_or_another_primary_deposes() {
        let start = Instant::now();
        let mut fence = PrimaryFence::new("vol", "a", "b", 1, Timing::default(), start);
        grant_next(&mut fence, start, MS, StandbyState::UpToDate);
        fence.handle_standby_ack(start, 1, 3);
        fence.handle_standby_echo(start, 1, start);
        fence.handle_peer_epoch(start + MS, 2);
        assert!(!fence.writes_allowed(start + MS));
        assert!(matches!(fence.flush_decision(start + MS, 1), FlushDecision::Fail(_)));
        let request = fence.poll_request(start + MS).unwrap();
        assert!(matches!(request, ArbiterRequest::Renew { .. }));
        let answer = ArbiterResponse::Refused {
            record: Some(record(2, "b", "a", StandbyState::Outdated)),
            reason: "stale".into(),
        };
        fence.handle_witness(start + 2 * MS, start + MS, &request, Ok(&answer));
        assert_eq!(fence.deposed().map(|record| record.epoch), Some(2));
        assert_eq!(fence.poll_request(start + Duration::from_secs(5)), None);
    }

    #[test]
    fn the_standby_allowance_runs_from_the_echoed_probe() {
        let start = Instant::now();
        let mut fence = PrimaryFence::new("vol", "a", "b", 1, Timing::default(), start);
        let probe = start + 100 * MS;
        // An ack that took 500 ms to arrive is worth 950 ms from the probe, not from now.
        fence.handle_standby_echo(probe + 500 * MS, 1, probe);
        assert!(fence.writes_allowed(probe + 949 * MS));
        assert!(!fence.writes_allowed(probe + 950 * MS));
        // Echoes from before this fence existed are ignored.
        let mut later = PrimaryFence::new("vol", "a", "b", 1, Timing::default(), probe);
        later.handle_standby_echo(probe, 1, start);
        assert!(!later.writes_allowed(probe));
    }

    #[test]
    fn standby_holds_promote_back_after_an_ack_and_acks_not_while_in_doubt() {
        let start = Instant::now();
        let timing = Timing::default();
        let mut fence = StandbyFence::new("vol", "b", "a", 1, timing.clone(), start);
        fence.handle_in_sync(true);
        fence.handle_primary_connected(start);
        let acked = start + 100 * MS;
        assert!(fence.try_ack(acked));
        fence.handle_primary_lost(acked + 10 * MS);
        assert_eq!(fence.poll_request(acked + 10 * MS), None, "hold-off after the last ack");
        assert_eq!(fence.poll_timeout(), Some(acked + timing.ack_timeout));
        let request = fence.poll_request(acked + timing.ack_timeout).unwrap();
        assert!(matches!(request, ArbiterRequest::Promote { epoch: 1, .. }));
        assert!(!fence.try_ack(acked + timing.ack_timeout), "no ack while the Promote may be granted");
        // The answer is lost; the primary comes back: settle with Get before acking.
        fence.handle_witness(acked + 2 * timing.ack_timeout, &request, Err("timeout"));
        fence.handle_primary_connected(acked + 2 * timing.ack_timeout);
        let settle_at = acked + 2 * timing.ack_timeout + timing.retry;
        let get = fence.poll_request(settle_at).unwrap();
        assert!(matches!(get, ArbiterRequest::Get { .. }));
        let answer = ArbiterResponse::Granted { record: record(1, "a", "b", StandbyState::UpToDate), lease_ms: None };
        fence.handle_witness(settle_at, &get, Ok(&answer));
        assert!(fence.try_ack(settle_at));
    }

    #[test]
    fn standby_takes_a_refusal_naming_it_primary_as_its_lost_grant() {
        let start = Instant::now();
        let mut fence = StandbyFence::new("vol", "b", "a", 1, Timing::default(), start);
        fence.handle_in_sync(true);
        fence.handle_promote_in_doubt();
        assert!(!fence.try_ack(start));
        let late = start + Duration::from_secs(2);
        let request = fence.poll_request(late).unwrap();
        assert!(matches!(request, ArbiterRequest::Promote { .. }));
        let answer = ArbiterResponse::Refused {
            record: Some(record(2, "b", "a", StandbyState::Outdated)),
            reason: "already primary".into(),
        };
        fence.handle_witness(late + MS, &request, Ok(&answer));
        assert_eq!(fence.promoted().map(|record| record.epoch), Some(2));
        let primary = fence.primary_fence(late + MS).unwrap();
        assert_eq!(primary.epoch(), 2);
        assert!(!primary.writes_allowed(late + MS), "no lease came with a refusal: renew first");
    }

    #[test]
    fn an_outdated_or_inconsistent_standby_does_not_ask() {
        let start = Instant::now();
        let timing = Timing::default();
        let mut fence = StandbyFence::new("vol", "b", "a", 1, timing.clone(), start);
        let late = start + Duration::from_secs(5);
        assert_eq!(fence.poll_request(late), None, "not in sync");
        fence.handle_in_sync(true);
        fence.handle_automatic_failover(false);
        assert_eq!(fence.poll_request(late), None, "automatic failover off");
        fence.handle_automatic_failover(true);
        let request = fence.poll_request(late).unwrap();
        let refused = ArbiterResponse::Refused {
            record: Some(record(1, "a", "b", StandbyState::Outdated)),
            reason: "outdated".into(),
        };
        fence.handle_witness(late + MS, &request, Ok(&refused));
        assert_eq!(fence.poll_request(late + MS), None);
        assert_eq!(fence.poll_timeout(), Some(late + MS + timing.renew_interval));
        assert!(fence.status().last_refusal.unwrap().contains("outdated"));
    }
}
