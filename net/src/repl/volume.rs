//! One replicated volume on one node: its role, its fencing state machine, the queue of
//! records on their way to the standby, and the gate every NBD write and FLUSH passes.
//!
//! # The write path on the primary
//! A write is appended to the local journal; the engine hands the record to the
//! [`ShipQueue`] under the journal lock (so the queue holds records in seq order) and the
//! sender task writes it to the journal stream. A FLUSH takes the last seq `n`, queues a
//! sync request for `n` (so the standby starts its fdatasync while we run ours), syncs
//! locally, then waits until the fencing machine says `n` may complete: the standby
//! acknowledged `durable_seq >= n`, or the witness recorded the standby Outdated.
//!
//! # Invariants
//! - The queue only ever holds records with consecutive seqs starting at the session's
//!   `stream_from`; records before it reach the standby through resync.
//! - A FLUSH never completes while the fencing machine answers `Wait`; a timeout turns
//!   into an I/O error, never into success.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use keel_engine::{RecordSink, ReplicaRecord, Volume};
use parking_lot::{Condvar, Mutex};
use serde_json::json;

use super::arbiter::{ArbiterRecord, StandbyState};
use super::fence::{FlushDecision, PrimaryFence, StandbyFence, Timing};
use super::state::{ReplState, Role};
use super::wire::{MarkGroupReplyMsg, MarkReplyMsg, RecordMsg, SyncRequestMsg};
use crate::events::EventLog;

pub use super::marker::StandbySessionId;

/// How writes reach the standby.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplMode {
    /// FLUSH/FUA complete only when durable on both nodes (or the witness recorded the
    /// standby Outdated).
    Sync,
    /// FLUSH/FUA complete when durable locally; the standby trails by at most the ship
    /// queue. The standby stays Outdated at the witness, so it is never promoted
    /// automatically.
    Async,
}

/// What a role change hands to the observer (the daemon runs the hooks).
#[derive(Debug, Clone)]
pub struct RoleChange {
    /// Volume name.
    pub volume: String,
    /// The new role.
    pub role: Role,
    /// The new epoch.
    pub epoch: u64,
    /// Why (promotion, deposition, switchover, ...).
    pub reason: String,
}

/// Callback the driver awaits after every role change (runs `on_promote`/`on_demote`).
pub type RoleObserver =
    Arc<dyn Fn(RoleChange) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> + Send + Sync>;

/// What the standby looks like from the primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum PeerState {
    /// Has every acknowledged write (the witness agrees).
    UpToDate,
    /// Receiving resync data.
    SyncTarget,
    /// May lack acknowledged writes (the witness recorded it).
    Outdated,
    /// Its copy is not usable until a resync completes.
    Inconsistent,
    /// Not known yet (no session since start).
    Unknown,
}

/// Mutable state shared by the driver tasks and the NBD threads.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) state: ReplState,
    pub(crate) primary: Option<PrimaryFence>,
    pub(crate) standby: Option<StandbyFence>,
    pub(crate) peer_connected: bool,
    pub(crate) acked_seq: u64,
    pub(crate) resync: Option<(u64, u64)>,
    pub(crate) witness_reachable: Option<bool>,
    pub(crate) record: Option<ArbiterRecord>,
    /// Highest seq a FLUSH completed for in this epoch.
    pub(crate) completed_seq: u64,
    /// Primary: writes wait while a switchover drains.
    pub(crate) paused: bool,
    /// Primary: a planned switchover asked the fence to hand the volume over.
    pub(crate) handover_requested: bool,
    /// Standby: promote to this epoch, for this reason (a handover from the primary, or
    /// an operator's `keel promote`).
    pub(crate) promote_to: Option<(u64, String)>,
    /// Primary: the optional features the standby listed in its `HelloReply` (current or
    /// last session).
    pub(crate) peer_features: Vec<String>,
}

impl Shared {
    /// Records what a witness call showed: whether it answered, and the record it carried.
    pub(crate) fn note_witness(&mut self, response: &Result<super::arbiter::ArbiterResponse, String>) {
        self.witness_reachable = Some(response.is_ok());
        if let Ok(answer) = response {
            self.record = answer.record().cloned();
        }
    }

    /// The standby as the primary sees it: resyncing, or what the witness last confirmed.
    pub(crate) fn peer_state(&self) -> PeerState {
        if self.resync.is_some() {
            return PeerState::SyncTarget;
        }
        let Some(fence) = &self.primary else { return PeerState::Unknown };
        let status = fence.status();
        match (status.standby_resyncing, status.standby_state) {
            (true, _) => PeerState::Inconsistent,
            (false, Some(StandbyState::UpToDate)) => PeerState::UpToDate,
            (false, Some(StandbyState::Outdated)) => PeerState::Outdated,
            (false, None) => PeerState::Unknown,
        }
    }
}

/// Static settings of a replicated volume.
#[derive(Clone)]
pub struct ReplVolumeConfig {
    /// This node's name.
    pub node: String,
    /// The other node's name.
    pub peer: String,
    /// The other node's replication address.
    pub peer_addr: std::net::SocketAddr,
    /// Sync or async shipping.
    pub mode: ReplMode,
    /// Leases and timeouts.
    pub timing: Timing,
    /// Most record bytes queued for the standby before writers wait.
    pub queue_bytes: usize,
    /// Most resync bytes per second (the rate also backs off while live records queue).
    pub resync_bytes_per_sec: u64,
    /// The NBD URI clients use on this node (for hooks and status).
    pub nbd_uri: String,
}

/// One replicated volume.
pub struct ReplVolume {
    pub(crate) volume: Arc<Volume>,
    pub(crate) config: ReplVolumeConfig,
    pub(crate) events: Arc<EventLog>,
    pub(crate) shared: Mutex<Shared>,
    /// Notified on every ack, witness answer and role change.
    pub(crate) changed: Condvar,
    /// Wakes the driver tasks (role change, new request to send).
    pub(crate) wake: tokio::sync::Notify,
    pub(crate) queue: Mutex<Option<Arc<ShipQueue>>>,
    /// Regions written since the standby last confirmed them (primary only).
    pub(crate) dirty: Arc<PeerDirty>,
    /// The standby's current journal session.
    pub(crate) standby_session: Mutex<Option<super::standby::StandbySession>>,
    /// Primary: snapshot marker names taken in this term, and by whom.
    pub(crate) marker_claims: super::marker::MarkerClaims,
}

impl std::fmt::Debug for ReplVolume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplVolume").field("volume", &self.volume.name()).finish_non_exhaustive()
    }
}

impl ReplVolume {
    /// Wraps an open volume with its persisted replication state.
    pub fn new(volume: Arc<Volume>, state: ReplState, config: ReplVolumeConfig, events: Arc<EventLog>) -> Arc<Self> {
        Arc::new(Self {
            volume,
            config,
            events,
            shared: Mutex::new(Shared {
                state,
                primary: None,
                standby: None,
                peer_connected: false,
                acked_seq: 0,
                resync: None,
                witness_reachable: None,
                record: None,
                completed_seq: 0,
                paused: false,
                handover_requested: false,
                promote_to: None,
                peer_features: Vec::new(),
            }),
            changed: Condvar::new(),
            wake: tokio::sync::Notify::new(),
            queue: Mutex::new(None),
            dirty: Arc::new(PeerDirty::default()),
            standby_session: Mutex::new(None),
            marker_claims: super::marker::MarkerClaims::default(),
        })
    }

    /// The engine volume.
    pub fn volume(&self) -> &Arc<Volume> {
        &self.volume
    }

    /// Volume name.
    pub fn name(&self) -> &str {
        self.volume.name()
    }

    /// The other node of the pair (this volume's standby while this node is primary).
    pub fn peer(&self) -> &str {
        &self.config.peer
    }

    /// Current role.
    pub fn role(&self) -> Role {
        self.shared.lock().state.role
    }

    /// Current epoch.
    pub fn epoch(&self) -> u64 {
        self.shared.lock().state.epoch
    }

    pub(crate) fn emit(&self, kind: &str, fields: serde_json::Value) {
        self.events.emit(Some(self.name()), kind, fields);
    }

    /// Wakes blocked flushes and the driver tasks after a state change.
    pub(crate) fn notify(&self) {
        self.changed.notify_all();
        self.wake.notify_waiters();
        self.wake.notify_one();
    }

    /// Refuses a write unless this node is primary and its fencing machine allows writes.
    pub fn check_writable(&self) -> Result<(), String> {
        let mut shared = self.shared.lock();
        // A switchover drains: writes wait (bounded) instead of failing.
        let deadline = Instant::now() + Duration::from_secs(10);
        while shared.paused && Instant::now() < deadline {
            self.changed.wait_until(&mut shared, deadline);
        }
        match (&shared.state.role, &shared.primary) {
            (Role::Primary, Some(fence)) if fence.writes_allowed(Instant::now()) => Ok(()),
            (Role::Primary, Some(_)) => {
                Err(format!("volume {}: fenced: no lease from the witness and no standby", self.name()))
            }
            (Role::Primary, None) => Err(format!("volume {}: primary not started yet", self.name())),
            (Role::Standby, _) => Err(format!("volume {}: this node is the standby", self.name())),
        }
    }

    /// Queues a sync request for `seq` to the standby (a FLUSH or FUA wants it durable
    /// there), so the standby's fdatasync runs alongside ours.
    pub fn request_sync(&self, seq: u64) {
        if let Some(fence) = self.shared.lock().primary.as_mut() {
            fence.handle_sync_wanted(Instant::now(), seq);
        }
        if let Some(queue) = self.queue.lock().clone() {
            queue.push_sync(seq);
        }
        self.wake.notify_one();
    }

    /// Blocks until a FLUSH for `seq` may complete (see the module docs), failing after the
    /// flush timeout or when the node loses the primary role.
    pub fn wait_replicated(&self, seq: u64) -> Result<(), String> {
        if self.config.mode == ReplMode::Async {
            return self.check_writable();
        }
        let deadline = Instant::now() + self.config.timing.flush_timeout;
        let mut shared = self.shared.lock();
        loop {
            let now = Instant::now();
            let decision = match shared.primary.as_ref() {
                Some(fence) if shared.state.role == Role::Primary => fence.flush_decision(now, seq),
                _ => FlushDecision::Fail(format!("volume {}: no longer primary", self.name())),
            };
            match decision {
                FlushDecision::Complete => {
                    shared.completed_seq = shared.completed_seq.max(seq);
                    return Ok(());
                }
                FlushDecision::Fail(reason) => return Err(reason),
                FlushDecision::Wait => {}
            }
            if now >= deadline {
                return Err(format!(
                    "volume {}: seq {seq} not confirmed by the standby or the witness within {:?}",
                    self.name(),
                    self.config.timing.flush_timeout
                ));
            }
            // Time alone can change the answer (a lease running out), so wake regularly.
            let wake_at = deadline.min(now + Duration::from_millis(20));
            self.changed.wait_until(&mut shared, wake_at);
        }
    }

    /// Whether the replication link to the peer is up now (what `keel status` shows as
    /// `peer.connected`).
    pub fn peer_connected(&self) -> bool {
        self.shared.lock().peer_connected
    }

    /// Status for `keel status` (see docs/operations.md for the fields).
    ///
    /// Reads only lock-free counters from the engine: a writer may hold the journal lock
    /// while it waits for room in the ship queue, and the queue drains on the very tokio
    /// workers that answer status requests.
    pub fn status_json(&self) -> serde_json::Value {
        let (last_seq, durable_seq, poisoned) =
            (self.volume.last_seq(), self.volume.durable_seq(), self.volume.poisoned());
        let shared = self.shared.lock();
        let fence = shared.primary.as_ref().map(|f| serde_json::to_value(f.status()).unwrap_or_default());
        let standby = shared.standby.as_ref().map(|f| serde_json::to_value(f.status()).unwrap_or_default());
        let lag = last_seq.saturating_sub(shared.acked_seq);
        let writable = shared.state.role == Role::Primary
            && !shared.paused
            && shared.primary.as_ref().is_some_and(|f| f.writes_allowed(Instant::now()));
        json!({
            "writable": writable,
            "name": self.name(),
            "role": shared.state.role.name(),
            "epoch": shared.state.epoch,
            "mode": self.config.mode,
            "consistent": shared.state.consistent,
            "last_seq": last_seq,
            "durable_seq": durable_seq,
            "nbd_uri": self.config.nbd_uri,
            "history": shared.state.history,
            "peer": {
                "name": self.config.peer,
                "connected": shared.peer_connected,
                "state": shared.peer_state(),
                "acked_seq": shared.acked_seq,
                "lag_seqs": if shared.state.role == Role::Primary { lag } else { 0 },
                "resync": shared.resync.map(|(done, total)| json!({"done_bytes": done, "total_bytes": total})),
            },
            "witness": {
                "reachable": shared.witness_reachable,
                "record": shared.record,
            },
            "fence": fence,
            "standby_fence": standby,
            "poisoned": poisoned,
        })
    }
}

/// Granularity of [`PeerDirty`].
pub(crate) const DIRTY_REGION_BYTES: u64 = 64 << 10;

/// The primary's record of what the standby may lack: each region written while this
/// node is primary, with the seq that last wrote it. Entries the standby acknowledged are
/// pruned. A resync from seq `X` then copies only the regions written after `X` — what a
/// standby that restarted or lost the link for a moment actually misses — instead of
/// everything the volume's change map has marked since it began. Memory: one entry per
/// region written during an outage (bounded by the volume size / 64 KiB).
#[derive(Debug, Default)]
pub(crate) struct PeerDirty {
    inner: Mutex<DirtyInner>,
}

#[derive(Debug, Default)]
struct DirtyInner {
    /// The first seq tracked (0: not tracking yet).
    since: u64,
    regions: std::collections::HashMap<u64, u64>,
    pruned_at: Option<Instant>,
}

impl PeerDirty {
    /// Forgets everything (a new term as primary starts tracking afresh).
    pub(crate) fn reset(&self) {
        *self.inner.lock() = DirtyInner::default();
    }

    /// Starts tracking at `seq` (the first record the sink will see), once.
    pub(crate) fn start(&self, seq: u64) {
        let mut inner = self.inner.lock();
        if inner.since == 0 {
            inner.since = seq;
        }
    }

    fn mark(&self, record: &ReplicaRecord<'_>) {
        if record.length == 0 {
            return;
        }
        let first = record.offset / DIRTY_REGION_BYTES;
        let last = (record.offset + record.length - 1) / DIRTY_REGION_BYTES;
        let mut inner = self.inner.lock();
        for region in first..=last {
            inner.regions.insert(region, record.seq);
        }
    }

    /// Forgets regions whose last write the standby has durably (at most once a second).
    pub(crate) fn prune(&self, durable_seq: u64) {
        let mut inner = self.inner.lock();
        if inner.pruned_at.is_some_and(|at| at.elapsed() < Duration::from_secs(1)) {
            return;
        }
        inner.pruned_at = Some(Instant::now());
        inner.regions.retain(|_, seq| *seq > durable_seq);
    }

    /// The byte ranges written after `seq`, if tracking covers every record after it.
    pub(crate) fn written_after(&self, seq: u64) -> Option<Vec<(u64, u64)>> {
        let inner = self.inner.lock();
        if inner.since == 0 || seq + 1 < inner.since {
            return None;
        }
        let mut regions: Vec<u64> = inner.regions.iter().filter(|(_, s)| **s > seq).map(|(r, _)| *r).collect();
        regions.sort_unstable();
        Some(regions.into_iter().map(|r| (r * DIRTY_REGION_BYTES, DIRTY_REGION_BYTES)).collect())
    }
}

/// What the engine calls for every record on the primary: marks the dirty map, and hands
/// the record to the current session's ship queue, if any.
#[derive(Debug)]
pub(crate) struct PrimarySink {
    pub(crate) dirty: Arc<PeerDirty>,
    pub(crate) queue: Option<Arc<ShipQueue>>,
}

impl RecordSink for PrimarySink {
    fn appended(&self, record: &ReplicaRecord<'_>) {
        self.dirty.mark(record);
        if let Some(queue) = &self.queue {
            queue.appended(record);
        }
    }
}

/// An item on its way to the standby, in journal order.
#[derive(Debug)]
pub(crate) enum Shipment {
    Record(RecordMsg),
    Sync(SyncRequestMsg),
    Control(super::proto::Control),
    MarkReply(MarkReplyMsg),
    MarkGroupReply(MarkGroupReplyMsg),
}

#[derive(Debug)]
struct QueueInner {
    items: VecDeque<Shipment>,
    bytes: usize,
    closed: bool,
}

/// The bounded queue between the engine's journal (producer, under the journal lock) and
/// one replication session's sender task. Writers wait while it is full: backpressure,
/// not memory growth. Closing it wakes them; their records then reach the standby by
/// resync.
#[derive(Debug)]
pub(crate) struct ShipQueue {
    epoch: u64,
    max_bytes: usize,
    inner: Mutex<QueueInner>,
    space: Condvar,
    ready: tokio::sync::Notify,
}

impl ShipQueue {
    pub(crate) fn new(epoch: u64, max_bytes: usize) -> Arc<Self> {
        Arc::new(Self {
            epoch,
            max_bytes,
            inner: Mutex::new(QueueInner { items: VecDeque::new(), bytes: 0, closed: false }),
            space: Condvar::new(),
            ready: tokio::sync::Notify::new(),
        })
    }

    /// Queues an item that is not a record (no room is waited for: these are few and
    /// small), behind everything queued so far; dropped once the queue is closed.
    fn push_unbounded(&self, item: Shipment) {
        let mut inner = self.inner.lock();
        if inner.closed {
            return;
        }
        inner.items.push_back(item);
        drop(inner);
        self.ready.notify_one();
    }

    pub(crate) fn push_sync(&self, upto_seq: u64) {
        self.push_unbounded(Shipment::Sync(SyncRequestMsg { epoch: self.epoch, upto_seq }));
    }

    pub(crate) fn push_control(&self, control: super::proto::Control) {
        self.push_unbounded(Shipment::Control(control));
    }

    /// Queues the answer to a standby's marker request, behind every record appended so
    /// far (the marker's among them).
    pub(crate) fn push_mark_reply(&self, reply: MarkReplyMsg) {
        self.push_unbounded(Shipment::MarkReply(reply));
    }

    /// Queues the answer to a standby's group marker request, behind every record
    /// appended so far (the lead member's marker among them).
    pub(crate) fn push_group_mark_reply(&self, reply: MarkGroupReplyMsg) {
        self.push_unbounded(Shipment::MarkGroupReply(reply));
    }

    /// Takes up to `max_items` queued items; waits while the queue is empty. `None` once
    /// closed.
    pub(crate) async fn pop_batch(&self, max_items: usize) -> Option<Vec<Shipment>> {
        loop {
            let notified = self.ready.notified();
            {
                let mut inner = self.inner.lock();
                if inner.closed {
                    return None;
                }
                if !inner.items.is_empty() {
                    let n = inner.items.len().min(max_items);
                    let batch: Vec<Shipment> = inner.items.drain(..n).collect();
                    let freed: usize = batch.iter().map(shipment_bytes).sum();
                    inner.bytes -= freed;
                    drop(inner);
                    self.space.notify_all();
                    return Some(batch);
                }
            }
            notified.await;
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.inner.lock().items.is_empty()
    }

    /// Whether live records are waiting (resync yields to them).
    pub(crate) fn backlog(&self) -> usize {
        self.inner.lock().bytes
    }

    pub(crate) fn close(&self) {
        self.inner.lock().closed = true;
        self.space.notify_all();
        self.ready.notify_one();
    }
}

fn shipment_bytes(item: &Shipment) -> usize {
    match item {
        Shipment::Record(r) => r.payload.len() + 64,
        Shipment::Sync(_) | Shipment::Control(_) | Shipment::MarkReply(_) | Shipment::MarkGroupReply(_) => 0,
    }
}

impl ShipQueue {
    fn appended(&self, record: &ReplicaRecord<'_>) {
        let msg = RecordMsg {
            epoch: record.epoch,
            seq: record.seq,
            kind: record.kind as u8,
            flags: record.flags,
            offset: record.offset,
            length: record.length,
            payload: Bytes::copy_from_slice(record.payload),
        };
        let size = msg.payload.len() + 64;
        let mut inner = self.inner.lock();
        // Bounded wait for room; a session that cannot drain is closed by its driver,
        // which wakes us (the record then reaches the standby by resync).
        while !inner.closed && inner.bytes + size > self.max_bytes && !inner.items.is_empty() {
            self.space.wait_for(&mut inner, Duration::from_millis(100));
        }
        if inner.closed {
            return;
        }
        inner.bytes += size;
        inner.items.push_back(Shipment::Record(msg));
        drop(inner);
        self.ready.notify_one();
    }
}
