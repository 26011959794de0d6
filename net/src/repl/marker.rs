//! Snapshot markers requested by the standby: the standby takes a snapshot of a replicated
//! volume by asking the primary to append one marker record, so the primary never reads
//! the volume for it (docs/replication.md, "Snapshots on the standby").
//!
//! # Protocol
//! 1. The standby's snapshot runner registers a freeze for a unique name
//!    (`Volume::freeze_at_marker`), then calls [`ReplVolume::request_snapshot_marker`]. That
//!    checks the standby may take snapshots now (its copy is consistent and its journal
//!    session with the primary is up, and the primary listed
//!    [`FEATURE_SNAPSHOT_MARKER`](super::proto::FEATURE_SNAPSHOT_MARKER) in its `Hello`),
//!    and sends a `MarkRequest` frame on the journal stream's return half, beside the acks.
//! 2. The primary (in its ack reader) hands the request to a blocking task, bounded per
//!    session by [`MARK_REQUESTS_MAX`]. The task refuses unless this node is primary, its
//!    fence allows writes and no one claimed the name yet, then appends the marker
//!    (`Volume::mark_snapshot`, which makes it durable here). The record reaches the ship
//!    queue inside the append, so the `MarkReply` the task queues next follows it on the
//!    journal stream.
//! 3. The standby's reader hands the reply to the waiting requester. The marker's apply
//!    (by `apply_replica`, before the reply in stream order) has activated the freeze;
//!    the runner collects it and reads the snapshot from the standby's own copy.
//!
//! # Group markers (a consistency group's snapshot on the standby)
//! 4. The standby registers a freeze on every member, notes each member's session
//!    ([`ReplVolume::standby_snapshot_session`]: consistent, connected, the primary speaks
//!    markers), and sends one `MarkGroupRequest` (marker name, members in name order) on
//!    the lead member's journal stream (the first in name order), only if the primary
//!    listed [`FEATURE_SNAPSHOT_GROUP_MARKER`](super::proto::FEATURE_SNAPSHOT_GROUP_MARKER)
//!    there.
//! 5. The primary resolves the members among its replicated volumes and refuses, naming
//!    the member, unless every one exists, is primary here, replicates to the same standby
//!    node as the lead, has a session up with an UpToDate standby, allows writes, and has
//!    the name unclaimed. It claims the name on every member at once (all their claim
//!    locks held, in name order: all or none), then appends the markers with
//!    `Volume::mark_group` (every member's journal lock held: one instant of the group,
//!    durable). Each member's record reaches its own ship queue inside the append; the
//!    `MarkGroupReply` with every member's seq is queued on the lead's stream after that.
//! 6. The standby waits for every member's freeze, checks each froze at the seq the
//!    primary returned for it, and checks each member's session is still the one it noted
//!    before the request and still consistent.
//!
//! # Invariants
//! - A marker is requested only over a session whose copy was consistent when the request
//!   was sent, and an `Appended` reply arrives on that same session after the record: the
//!   standby applied the marker as a consistent prefix of the primary's journal. A session
//!   that ends fails every request waiting on it.
//! - A group's non-lead member gets its marker on its own stream, not the lead's, so the
//!   reply proves nothing about it. Its freeze counts only if the member's session is the
//!   same before the request and after the freeze and consistent at both ends: a session
//!   starts with any resync it needs and is consistent from the end of that resync to its
//!   own end, so the marker was applied inside a consistent stretch of one session, as a
//!   prefix of the primary's journal. The seq check ties the view to the marker appended
//!   for this request (not an older marker of the name).
//! - Each name is appended at most once per primary term and volume: the primary's claims
//!   ([`ReplVolume::claim_snapshot_marker`] for its own scheduled snapshots,
//!   [`ReplVolume::claim_group_snapshot_marker`] for its own group snapshots, every
//!   granted request for the standby's) are checked and recorded under the volume's claim
//!   lock, a group's under all its members' locks at once.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use serde_json::json;
use tokio::sync::{mpsc, Semaphore};

use super::proto::{FEATURE_SNAPSHOT_GROUP_MARKER, FEATURE_SNAPSHOT_MARKER};
use super::state::Role;
use super::volume::{PeerState, ReplVolume, ShipQueue};
use super::wire::{
    MarkGroupOutcome, MarkGroupReplyMsg, MarkGroupRequestMsg, MarkOutcome, MarkReplyMsg, MarkRequestMsg,
    MARKER_NAME_MAX_BYTES,
};

/// Marker requests in flight per session, on either side: the standby refuses to send
/// more, the primary refuses (answers) the excess without appending. Matches the engine's
/// limit on freezes per volume (`FROZEN_MAX`).
pub(crate) const MARK_REQUESTS_MAX: usize = 4;
/// Names the primary remembers as claimed (newest kept): enough for every marker of one
/// schedule firing across many volumes' retries.
const CLAIMS_KEPT: usize = 64;

/// Which node a marker name was claimed for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Claimant {
    /// The primary takes the snapshot itself.
    Primary,
    /// The standby asked for the marker and takes the snapshot.
    Standby,
}

/// The primary's record of marker names already taken in this term (in memory: a
/// restart forgets them, and with them any schedule firing in progress).
#[derive(Debug, Default)]
pub(crate) struct MarkerClaims {
    claims: Mutex<VecDeque<(String, Claimant)>>,
}

impl MarkerClaims {
    /// Claims `name` for `claimant`; `Err(earlier claimant)` if someone else has it.
    /// Claiming one's own name again succeeds.
    fn try_claim(&self, name: &str, claimant: Claimant) -> Result<(), Claimant> {
        let mut claims = self.claims.lock();
        check_claim(&claims, name, claimant)?;
        record_claim(&mut claims, name, claimant);
        Ok(())
    }

    /// Claims `name` for `claimant` on every one of `members` (`(volume name, claims)`,
    /// each volume once), or on none: `Err((volume, earlier claimant))` names the first
    /// member someone else holds it on. Holds every member's claim lock at once, taken in
    /// volume name order (the only place more than one is held), so a concurrent claim of
    /// the same name sees all of the group's claims or none.
    fn try_claim_all(
        members: &[(&str, &MarkerClaims)],
        name: &str,
        claimant: Claimant,
    ) -> Result<(), (String, Claimant)> {
        let mut order: Vec<&(&str, &MarkerClaims)> = members.iter().collect();
        order.sort_by_key(|(volume, _)| *volume);
        if let Some(pair) = order.windows(2).find(|pair| pair.first().map(|m| m.0) == pair.get(1).map(|m| m.0)) {
            let volume = pair.first().map_or("", |m| m.0);
            // A volume listed twice would lock its claims twice (a deadlock): refuse it.
            return Err((format!("{volume} (listed twice)"), claimant));
        }
        let mut guards: Vec<_> = order.iter().map(|(volume, claims)| (*volume, claims.claims.lock())).collect();
        for (volume, claims) in &guards {
            check_claim(claims, name, claimant).map_err(|holder| ((*volume).to_owned(), holder))?;
        }
        for (_, claims) in &mut guards {
            record_claim(claims, name, claimant);
        }
        Ok(())
    }

    /// Forgets a claim whose marker could not be appended.
    fn release(&self, name: &str, claimant: Claimant) {
        self.claims.lock().retain(|(n, c)| !(n == name && *c == claimant));
    }

    /// Forgets everything (a new term as primary).
    pub(crate) fn reset(&self) {
        self.claims.lock().clear();
    }
}

/// `Err(holder)` if someone other than `claimant` holds `name`.
fn check_claim(claims: &VecDeque<(String, Claimant)>, name: &str, claimant: Claimant) -> Result<(), Claimant> {
    match claims.iter().find(|(n, _)| n == name) {
        Some((_, holder)) if *holder != claimant => Err(*holder),
        _ => Ok(()),
    }
}

/// Records `name` for `claimant` (once), forgetting the oldest claim beyond [`CLAIMS_KEPT`].
fn record_claim(claims: &mut VecDeque<(String, Claimant)>, name: &str, claimant: Claimant) {
    if claims.iter().any(|(n, _)| n == name) {
        return;
    }
    if claims.len() == CLAIMS_KEPT {
        claims.pop_front();
    }
    claims.push_back((name.to_owned(), claimant));
}

/// Identifies one journal session of a standby volume: equal only for the same session
/// (see [`ReplVolume::standby_snapshot_session`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StandbySessionId(u64);

/// Numbers the standby's journal sessions, node-wide.
static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);

/// A marker request on its way to the session's writer.
#[derive(Debug)]
pub(crate) enum MarkRequest {
    One(MarkRequestMsg),
    Group(MarkGroupRequestMsg),
}

impl MarkRequest {
    /// The whole frame.
    pub(crate) fn encode(&self) -> Bytes {
        match self {
            Self::One(request) => request.encode(),
            Self::Group(request) => request.encode(),
        }
    }
}

/// A reply handed to the requester waiting for it.
#[derive(Debug)]
enum Answer {
    One(MarkOutcome),
    Group(MarkGroupOutcome),
}

/// The standby's side of one journal session's marker requests: the requests on their
/// way to the session's writer, and the requesters waiting for replies.
#[derive(Debug)]
pub(crate) struct MarkClient {
    epoch: u64,
    /// This session, among all of the node's.
    session: StandbySessionId,
    /// Whether the primary of this session listed [`FEATURE_SNAPSHOT_MARKER`].
    supported: bool,
    /// Whether it listed [`FEATURE_SNAPSHOT_GROUP_MARKER`].
    group_supported: bool,
    requests: mpsc::Sender<MarkRequest>,
    /// Waiting requesters by request id, and whether each asked for a group.
    pending: Mutex<HashMap<u64, (bool, std::sync::mpsc::SyncSender<Answer>)>>,
    next_id: AtomicU64,
}

impl MarkClient {
    /// A client for a session of `epoch` with a primary that listed `features` in its
    /// `Hello`, and the receiver its writer sends from.
    pub(crate) fn new(epoch: u64, features: &[String]) -> (Arc<Self>, mpsc::Receiver<MarkRequest>) {
        let (requests, receiver) = mpsc::channel(MARK_REQUESTS_MAX);
        let client = Self {
            epoch,
            session: StandbySessionId(NEXT_SESSION.fetch_add(1, Ordering::Relaxed)),
            supported: features.iter().any(|f| f == FEATURE_SNAPSHOT_MARKER),
            group_supported: features.iter().any(|f| f == FEATURE_SNAPSHOT_GROUP_MARKER),
            requests,
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
        };
        (Arc::new(client), receiver)
    }

    /// Hands a reply to its requester. A reply nobody waits for (the requester timed out)
    /// is dropped.
    pub(crate) fn resolve(&self, reply: MarkReplyMsg) -> Result<(), String> {
        self.hand_over(reply.epoch, reply.id, Answer::One(reply.outcome))
    }

    /// [`MarkClient::resolve`] for a group's reply.
    pub(crate) fn resolve_group(&self, reply: MarkGroupReplyMsg) -> Result<(), String> {
        self.hand_over(reply.epoch, reply.id, Answer::Group(reply.outcome))
    }

    /// A reply of another epoch, or of the other kind than its request, is a protocol
    /// error (the session ends).
    fn hand_over(&self, epoch: u64, id: u64, answer: Answer) -> Result<(), String> {
        if epoch != self.epoch {
            return Err(format!("marker reply of epoch {epoch} in a session of epoch {}", self.epoch));
        }
        let mut pending = self.pending.lock();
        match pending.get(&id) {
            Some((group, _)) if *group != matches!(answer, Answer::Group(_)) => {
                let (asked, got) = if *group { ("group", "single") } else { ("single", "group") };
                Err(format!("{got} marker reply to the {asked} marker request {id}"))
            }
            Some(_) => {
                if let Some((_, requester)) = pending.remove(&id) {
                    let _ = requester.try_send(answer);
                }
                Ok(())
            }
            None => {
                tracing::debug!(id, "marker reply for a request no one waits for");
                Ok(())
            }
        }
    }

    /// Fails every waiting request: the session ended.
    pub(crate) fn close(&self) {
        self.pending.lock().clear();
    }

    /// Sends a request and waits (blocking) up to `timeout` for the reply.
    fn request(&self, name: &str, timeout: Duration) -> Result<u64, String> {
        let request = |id| MarkRequest::One(MarkRequestMsg { epoch: self.epoch, id, name: name.to_owned() });
        match self.exchange(false, request, timeout)? {
            Answer::One(MarkOutcome::Appended { seq }) => Ok(seq),
            Answer::One(MarkOutcome::Refused { reason }) => Err(format!("the primary refused: {reason}")),
            Answer::Group(_) => Err("a group reply to a single marker request".to_string()),
        }
    }

    /// Sends a group request for `members` (sorted, each once) and waits (blocking) up to
    /// `timeout` for the reply: each member's seq, in the order of `members`.
    fn request_group(&self, name: &str, members: &[String], timeout: Duration) -> Result<Vec<u64>, String> {
        let request = |id| {
            MarkRequest::Group(MarkGroupRequestMsg {
                epoch: self.epoch,
                id,
                name: name.to_owned(),
                members: members.to_vec(),
            })
        };
        match self.exchange(true, request, timeout)? {
            Answer::Group(MarkGroupOutcome::Appended { seqs }) if seqs.len() == members.len() => Ok(seqs),
            Answer::Group(MarkGroupOutcome::Appended { seqs }) => Err(format!(
                "the primary answered {} seqs for {} members; not taking the snapshot",
                seqs.len(),
                members.len()
            )),
            Answer::Group(MarkGroupOutcome::Refused { reason }) => Err(format!("the primary refused: {reason}")),
            Answer::One(_) => Err("a single marker reply to a group request".to_string()),
        }
    }

    /// Registers a request with a fresh id, sends it, and waits for its answer.
    fn exchange(
        &self,
        group: bool,
        request: impl FnOnce(u64) -> MarkRequest,
        timeout: Duration,
    ) -> Result<Answer, String> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (answer, reply) = std::sync::mpsc::sync_channel(1);
        {
            let mut pending = self.pending.lock();
            if pending.len() >= MARK_REQUESTS_MAX {
                return Err(format!("{MARK_REQUESTS_MAX} snapshot marker requests are already waiting"));
            }
            pending.insert(id, (group, answer));
        }
        // Removes the entry however this returns (the reply may never come).
        struct Forget<'a>(&'a MarkClient, u64);
        impl Drop for Forget<'_> {
            fn drop(&mut self) {
                self.0.pending.lock().remove(&self.1);
            }
        }
        let _forget = Forget(self, id);
        self.requests.try_send(request(id)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => "too many snapshot marker requests queued".to_string(),
            mpsc::error::TrySendError::Closed(_) => "the session with the primary ended".to_string(),
        })?;
        match reply.recv_timeout(timeout) {
            Ok(answer) => Ok(answer),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                Err(format!("the primary did not answer within {timeout:?}"))
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                Err("the session with the primary ended before it answered".to_string())
            }
        }
    }
}

impl ReplVolume {
    /// On the standby: whether it may take a snapshot now. `Err` says why not, for the
    /// operator: this node is primary, its copy is not consistent (resync pending or under
    /// way), it is not connected to the primary, or the primary is too old to append a
    /// marker for it.
    pub fn standby_snapshot_ready(&self) -> Result<(), String> {
        self.standby_mark_client().map(|_| ())
    }

    fn standby_mark_client(&self) -> Result<Arc<MarkClient>, String> {
        let (role, consistent, connected, peer) = {
            let shared = self.shared.lock();
            (shared.state.role, shared.state.consistent, shared.peer_connected, shared.state.peer.clone())
        };
        let name = self.name();
        if role == Role::Primary {
            return Err(format!("volume {name}: this node is the primary"));
        }
        if !consistent {
            return Err(format!(
                "volume {name}: this standby's copy is not up to date (a resync is pending or under way); \
                 take the snapshot on the primary {peer}"
            ));
        }
        let session = self.standby_session.lock();
        let client = session.as_ref().and_then(|s| s.marks.clone());
        match client {
            Some(client) if connected && !session.as_ref().is_some_and(|s| s.cancel.is_cancelled()) => {
                if client.supported {
                    Ok(client)
                } else {
                    Err(format!(
                        "volume {name}: the primary {peer} runs a version that cannot append snapshot markers \
                         for its standby; take the snapshot on the primary"
                    ))
                }
            }
            _ => Err(format!(
                "volume {name}: this standby is not connected to the primary {peer}; take the snapshot on the primary"
            )),
        }
    }

    /// On the standby: asks the primary to append a snapshot marker named `name`, and
    /// waits (blocking; call it from a blocking thread) up to `timeout` for its answer.
    /// Returns the marker's seq. Register the freeze (`Volume::freeze_at_marker`) first:
    /// the marker may be applied here before this returns.
    pub fn request_snapshot_marker(&self, name: &str, timeout: Duration) -> Result<u64, String> {
        if name.is_empty() || name.len() > MARKER_NAME_MAX_BYTES {
            return Err(format!("snapshot marker name must be 1-{MARKER_NAME_MAX_BYTES} bytes, not {}", name.len()));
        }
        let client = self.standby_mark_client()?;
        client.request(name, timeout).map_err(|e| format!("volume {}: snapshot marker {name:?}: {e}", self.name()))
    }

    /// On the standby: the journal session a snapshot would be taken over, if it may take
    /// one now (as [`ReplVolume::standby_snapshot_ready`]). The same id before a group
    /// request and after a member's freeze proves the member's marker was applied within
    /// that one session (see the module's invariants).
    pub fn standby_snapshot_session(&self) -> Result<StandbySessionId, String> {
        self.standby_mark_client().map(|client| client.session)
    }

    /// On the standby, for a consistency group's lead member (the first in name order):
    /// whether it may request the group's markers now: as
    /// [`ReplVolume::standby_snapshot_ready`], and the primary speaks group requests.
    pub fn standby_group_snapshot_ready(&self) -> Result<(), String> {
        self.standby_group_mark_client().map(|_| ())
    }

    fn standby_group_mark_client(&self) -> Result<Arc<MarkClient>, String> {
        let client = self.standby_mark_client()?;
        if !client.group_supported {
            return Err(format!(
                "volume {}: the primary {} runs a version that cannot append a consistency group's markers for its \
                 standby; take the group snapshot on the primary",
                self.name(),
                self.config.peer
            ));
        }
        Ok(client)
    }

    /// On the standby, called on the group's lead member: asks the primary to append a
    /// marker named `name` to every volume of `members` (sorted, each once, this volume
    /// among them) at one instant, and waits (blocking) up to `timeout` for its answer.
    /// Returns each member's marker seq, in the order of `members`. Register every
    /// member's freeze first; the members other than this one get their markers on their
    /// own streams, so check their sessions (see the module's invariants).
    pub fn request_group_snapshot_marker(
        &self,
        name: &str,
        members: &[String],
        timeout: Duration,
    ) -> Result<Vec<u64>, String> {
        let check = MarkGroupRequestMsg { epoch: 0, id: 0, name: name.to_owned(), members: members.to_vec() };
        check.check().map_err(|(field, reason)| format!("group snapshot marker {name:?}: bad {field}: {reason}"))?;
        if !members.iter().any(|m| m == self.name()) {
            return Err(format!("volume {} is not one of the group's members {members:?}", self.name()));
        }
        let client = self.standby_group_mark_client()?;
        client.request_group(name, members, timeout).map_err(|e| {
            format!("group of {members:?} (request sent over volume {}): snapshot marker {name:?}: {e}", self.name())
        })
    }

    /// On the primary: whether a scheduled snapshot can be left to the standby: it is
    /// connected, UpToDate, and speaks the marker requests.
    pub fn standby_takes_snapshots(&self) -> bool {
        let shared = self.shared.lock();
        shared.state.role == Role::Primary
            && shared.peer_connected
            && shared.peer_state() == PeerState::UpToDate
            && shared.peer_features.iter().any(|f| f == FEATURE_SNAPSHOT_MARKER)
    }

    /// On the primary: whether a scheduled group snapshot can be left to the standby, as
    /// far as this member goes: as [`ReplVolume::standby_takes_snapshots`], and the
    /// standby speaks group requests.
    pub fn standby_takes_group_snapshots(&self) -> bool {
        self.standby_takes_snapshots()
            && self.shared.lock().peer_features.iter().any(|f| f == FEATURE_SNAPSHOT_GROUP_MARKER)
    }

    /// On the primary: claims the marker `name` on every member of a group this node
    /// snapshots itself, or on none. `Err` names a member whose standby already asked for
    /// a marker of that name.
    pub fn claim_group_snapshot_marker(members: &[&ReplVolume], name: &str) -> Result<(), String> {
        let claims: Vec<(&str, &MarkerClaims)> = members.iter().map(|rv| (rv.name(), &rv.marker_claims)).collect();
        MarkerClaims::try_claim_all(&claims, name, Claimant::Primary).map_err(|(volume, _)| {
            let peer = members.first().map_or("", |rv| rv.config.peer.as_str());
            format!("volume {volume}: the standby {peer} took the group snapshot at marker {name:?}")
        })
    }

    /// On the primary: claims the marker `name` for a snapshot this node takes itself.
    /// `Err` if the standby already asked for a marker of that name (it takes that
    /// snapshot); from now on the standby's requests for it are refused.
    pub fn claim_snapshot_marker(&self, name: &str) -> Result<(), String> {
        self.marker_claims.try_claim(name, Claimant::Primary).map_err(|_| {
            format!("volume {}: the standby {} took the snapshot at marker {name:?}", self.name(), self.config.peer)
        })
    }

    /// On the primary, on a blocking thread: appends the marker a standby asked for over
    /// the session whose ship queue is `queue`.
    fn append_requested_marker(&self, name: &str, queue: &Arc<ShipQueue>) -> Result<u64, String> {
        let volume = self.name();
        if self.role() != Role::Primary {
            return Err(format!("volume {volume}: {} is no longer the primary", self.config.node));
        }
        if !self.queue.lock().as_ref().is_some_and(|current| Arc::ptr_eq(current, queue)) {
            return Err(format!("volume {volume}: the session the request came on has ended"));
        }
        self.check_writable()?;
        self.marker_claims.try_claim(name, Claimant::Standby).map_err(|_| {
            format!("volume {volume}: the primary {} took the snapshot at marker {name:?} itself", self.config.node)
        })?;
        match self.volume.mark_snapshot(name) {
            Ok(seq) => {
                self.emit("snapshot_marker", json!({"name": name, "seq": seq, "for": self.config.peer}));
                Ok(seq)
            }
            Err(e) => {
                self.marker_claims.release(name, Claimant::Standby);
                Err(format!("volume {volume}: failed to append snapshot marker {name:?}: {e}"))
            }
        }
    }
}

/// On the primary, on a blocking thread: appends the group markers a standby asked for
/// over the journal session of `lead` whose ship queue is `queue`, resolving the members
/// among `volumes` (this node's replicated volumes). Refuses, naming the member, unless
/// every check of the module docs' step 5 passes; claims all or none.
fn append_requested_group_marker(
    lead: &ReplVolume,
    volumes: &HashMap<String, Arc<ReplVolume>>,
    request: &MarkGroupRequestMsg,
    queue: &Arc<ShipQueue>,
) -> Result<Vec<u64>, String> {
    let (name, node, peer) = (&request.name, &lead.config.node, &lead.config.peer);
    if lead.role() != Role::Primary {
        return Err(format!("volume {}: {node} is no longer the primary", lead.name()));
    }
    if !lead.queue.lock().as_ref().is_some_and(|current| Arc::ptr_eq(current, queue)) {
        return Err(format!("volume {}: the session the request came on has ended", lead.name()));
    }
    if !request.members.iter().any(|m| m == lead.name()) {
        return Err(format!(
            "volume {}: the request came on its stream but it is not one of the members {:?}",
            lead.name(),
            request.members
        ));
    }
    let mut members: Vec<&Arc<ReplVolume>> = Vec::with_capacity(request.members.len());
    for member in &request.members {
        let rv = volumes.get(member).ok_or_else(|| format!("volume {member}: not replicated on the primary {node}"))?;
        if rv.config.peer != *peer {
            return Err(format!(
                "volume {member}: replicates to {}, not to {peer}, the standby that asked",
                rv.config.peer
            ));
        }
        if rv.role() != Role::Primary {
            return Err(format!("volume {member}: {node} is not its primary"));
        }
        members.push(rv);
    }
    // Then the state of each (after every member is known: a forged member is named
    // before a transient condition of another).
    for rv in &members {
        let member = rv.name();
        // Its marker must reach the standby on its own stream, not by a resync that
        // carries no markers.
        let streaming = {
            let shared = rv.shared.lock();
            shared.peer_connected && shared.peer_state() == PeerState::UpToDate
        };
        if !streaming || rv.queue.lock().is_none() {
            return Err(format!("volume {member}: its standby {peer} is not connected and up to date"));
        }
        rv.check_writable()?;
    }
    let claims: Vec<(&str, &MarkerClaims)> = members.iter().map(|rv| (rv.name(), &rv.marker_claims)).collect();
    MarkerClaims::try_claim_all(&claims, name, Claimant::Standby).map_err(|(volume, _)| {
        format!("volume {volume}: the primary {node} took the snapshot at marker {name:?} itself")
    })?;
    let engine: Vec<&keel_engine::Volume> = members.iter().map(|rv| &**rv.volume()).collect();
    match keel_engine::Volume::mark_group(&engine, name) {
        Ok(seqs) => {
            for (rv, seq) in members.iter().zip(&seqs) {
                rv.emit("snapshot_marker", json!({"name": name, "seq": seq, "for": peer, "group_lead": lead.name()}));
            }
            Ok(seqs)
        }
        Err(e) => {
            for rv in &members {
                rv.marker_claims.release(name, Claimant::Standby);
            }
            Err(format!("group of {:?}: failed to append snapshot markers {name:?}: {e}", request.members))
        }
    }
}

/// The primary's handling of the marker requests of one session.
#[derive(Debug)]
pub(crate) struct MarkServer {
    in_flight: Arc<Semaphore>,
}

impl MarkServer {
    pub(crate) fn new() -> Self {
        Self { in_flight: Arc::new(Semaphore::new(MARK_REQUESTS_MAX)) }
    }

    /// Answers `request` (from the session of `epoch` whose ship queue is `queue`) without
    /// blocking the caller, the ack reader: the append runs on the blocking pool and its
    /// reply is queued behind the marker record. Beyond [`MARK_REQUESTS_MAX`] in flight,
    /// the request is refused at once.
    pub(crate) fn handle(&self, rv: &Arc<ReplVolume>, queue: &Arc<ShipQueue>, epoch: u64, request: MarkRequestMsg) {
        let MarkRequestMsg { id, name, .. } = request;
        let Ok(permit) = Arc::clone(&self.in_flight).try_acquire_owned() else {
            let reason = format!("{MARK_REQUESTS_MAX} snapshot marker requests are already in flight");
            queue.push_mark_reply(MarkReplyMsg { epoch, id, outcome: MarkOutcome::Refused { reason } });
            return;
        };
        let (rv, queue) = (Arc::clone(rv), Arc::clone(queue));
        tokio::spawn(async move {
            let task = {
                let (rv, queue) = (Arc::clone(&rv), Arc::clone(&queue));
                tokio::task::spawn_blocking(move || rv.append_requested_marker(&name, &queue))
            };
            let outcome = match task.await {
                Ok(Ok(seq)) => MarkOutcome::Appended { seq },
                Ok(Err(reason)) => MarkOutcome::Refused { reason },
                Err(e) => MarkOutcome::Refused { reason: format!("the marker task failed: {e}") },
            };
            if let MarkOutcome::Refused { reason } = &outcome {
                tracing::info!(volume = %rv.name(), "refused the standby's snapshot marker: {reason}");
            }
            queue.push_mark_reply(MarkReplyMsg { epoch, id, outcome });
            drop(permit);
        });
    }

    /// [`MarkServer::handle`] for a group request that came on the journal stream of
    /// `lead`; `volumes` are this node's replicated volumes. The reply is queued on the
    /// lead's stream behind its marker record (every other member's record went to its
    /// own stream's queue during the same append).
    pub(crate) fn handle_group(
        &self,
        lead: &Arc<ReplVolume>,
        volumes: &Arc<super::node::NodeCtx>,
        queue: &Arc<ShipQueue>,
        epoch: u64,
        request: MarkGroupRequestMsg,
    ) {
        let id = request.id;
        let Ok(permit) = Arc::clone(&self.in_flight).try_acquire_owned() else {
            let reason = format!("{MARK_REQUESTS_MAX} snapshot marker requests are already in flight");
            queue.push_group_mark_reply(MarkGroupReplyMsg { epoch, id, outcome: MarkGroupOutcome::Refused { reason } });
            return;
        };
        let (lead, ctx, queue) = (Arc::clone(lead), Arc::clone(volumes), Arc::clone(queue));
        tokio::spawn(async move {
            let task = {
                let (lead, queue) = (Arc::clone(&lead), Arc::clone(&queue));
                tokio::task::spawn_blocking(move || {
                    append_requested_group_marker(&lead, &ctx.volumes, &request, &queue)
                })
            };
            let outcome = match task.await {
                Ok(Ok(seqs)) => MarkGroupOutcome::Appended { seqs },
                Ok(Err(reason)) => MarkGroupOutcome::Refused { reason },
                Err(e) => MarkGroupOutcome::Refused { reason: format!("the group marker task failed: {e}") },
            };
            if let MarkGroupOutcome::Refused { reason } = &outcome {
                tracing::info!(volume = %lead.name(), "refused the standby's group snapshot markers: {reason}");
            }
            queue.push_group_mark_reply(MarkGroupReplyMsg { epoch, id, outcome });
            drop(permit);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_is_claimed_once_and_by_one_side() {
        let claims = MarkerClaims::default();
        assert_eq!(claims.try_claim("scheduled-1", Claimant::Standby), Ok(()));
        assert_eq!(claims.try_claim("scheduled-1", Claimant::Primary), Err(Claimant::Standby));
        assert_eq!(claims.try_claim("scheduled-2", Claimant::Primary), Ok(()));
        assert_eq!(claims.try_claim("scheduled-2", Claimant::Primary), Ok(()));
        assert_eq!(claims.try_claim("scheduled-2", Claimant::Standby), Err(Claimant::Primary));
        // A failed append gives the name back.
        claims.release("scheduled-1", Claimant::Standby);
        assert_eq!(claims.try_claim("scheduled-1", Claimant::Primary), Ok(()));
        claims.reset();
        assert_eq!(claims.try_claim("scheduled-1", Claimant::Standby), Ok(()));
    }

    #[test]
    fn claims_are_bounded_and_keep_the_newest() {
        let claims = MarkerClaims::default();
        for i in 0..CLAIMS_KEPT + 10 {
            assert_eq!(claims.try_claim(&format!("m{i}"), Claimant::Standby), Ok(()));
        }
        assert_eq!(claims.claims.lock().len(), CLAIMS_KEPT);
        assert_eq!(claims.try_claim("m0", Claimant::Primary), Ok(()), "the oldest was forgotten");
        assert_eq!(claims.try_claim(&format!("m{}", CLAIMS_KEPT + 9), Claimant::Primary), Err(Claimant::Standby));
    }

    #[test]
    fn requests_fail_when_refused_unanswered_or_the_session_ends() {
        let (client, mut requests) = MarkClient::new(7, &[FEATURE_SNAPSHOT_MARKER.to_string()]);
        // Answered: the reply reaches the requester.
        let answerer = {
            let client = Arc::clone(&client);
            std::thread::spawn(move || {
                let Some(MarkRequest::One(request)) = requests.blocking_recv() else { panic!("a single request") };
                assert_eq!((request.epoch, request.name.as_str()), (7, "a"));
                let outcome = MarkOutcome::Appended { seq: 42 };
                client.resolve(MarkReplyMsg { epoch: 7, id: request.id, outcome }).unwrap();
                let Some(MarkRequest::One(request)) = requests.blocking_recv() else { panic!("a single request") };
                let outcome = MarkOutcome::Refused { reason: "fenced".into() };
                client.resolve(MarkReplyMsg { epoch: 7, id: request.id, outcome }).unwrap();
                // The third goes unanswered; the session then ends. The request is
                // registered before it is sent, so closing now fails it whether or not the
                // requester has started waiting.
                let _ = requests.blocking_recv().unwrap();
                client.close();
                requests
            })
        };
        assert_eq!(client.request("a", Duration::from_secs(10)), Ok(42));
        let refused = client.request("b", Duration::from_secs(10)).unwrap_err();
        assert!(refused.contains("refused: fenced"), "{refused}");
        let ended = client.request("c", Duration::from_secs(10)).unwrap_err();
        assert!(ended.contains("session with the primary ended"), "{ended}");
        let requests = answerer.join().unwrap();
        assert!(client.pending.lock().is_empty());
        // Unanswered: times out, and forgets the request.
        let timed_out = client.request("d", Duration::from_millis(20)).unwrap_err();
        assert!(timed_out.contains("did not answer"), "{timed_out}");
        assert!(client.pending.lock().is_empty());
        // A reply of another epoch is a protocol error; one for an unknown id is dropped.
        assert!(client.resolve(MarkReplyMsg { epoch: 8, id: 1, outcome: MarkOutcome::Appended { seq: 1 } }).is_err());
        assert!(client.resolve(MarkReplyMsg { epoch: 7, id: 999, outcome: MarkOutcome::Appended { seq: 1 } }).is_ok());
        drop(requests);
        let closed = client.request("e", Duration::from_secs(10)).unwrap_err();
        assert!(closed.contains("session with the primary ended"), "{closed}");
    }

    /// A group's claims are all or none: a name someone else holds on one member leaves
    /// every member unclaimed, and a claimed group blocks the other side on each member.
    #[test]
    fn a_group_is_claimed_on_every_member_or_none() {
        let (db, files, logs) = (MarkerClaims::default(), MarkerClaims::default(), MarkerClaims::default());
        assert_eq!(files.try_claim("nightly", Claimant::Primary), Ok(()));
        let group = [("db", &db), ("files", &files), ("logs", &logs)];
        assert_eq!(
            MarkerClaims::try_claim_all(&group, "nightly", Claimant::Standby),
            Err(("files".to_owned(), Claimant::Primary))
        );
        assert_eq!(db.try_claim("nightly", Claimant::Primary), Ok(()), "nothing was claimed on db");
        assert_eq!(logs.try_claim("nightly", Claimant::Primary), Ok(()), "nothing was claimed on logs");
        // Given in any order, claimed on all; the other side is refused on each member.
        let reversed = [("logs", &logs), ("files", &files), ("db", &db)];
        assert_eq!(MarkerClaims::try_claim_all(&reversed, "hourly", Claimant::Standby), Ok(()));
        for claims in [&db, &files, &logs] {
            assert_eq!(claims.try_claim("hourly", Claimant::Primary), Err(Claimant::Standby));
        }
        assert_eq!(MarkerClaims::try_claim_all(&group, "hourly", Claimant::Standby), Ok(()), "claimed again");
        // A volume listed twice is refused (its lock would be taken twice).
        let twice = [("db", &db), ("db", &db)];
        assert!(MarkerClaims::try_claim_all(&twice, "other", Claimant::Primary).is_err());
        assert_eq!(db.try_claim("other", Claimant::Standby), Ok(()));
    }

    /// A group request gets its seqs; a refusal, a reply of the wrong kind, or a wrong
    /// number of seqs fails it; a primary without the feature is never asked.
    #[test]
    fn group_requests_get_one_seq_per_member() {
        let features = [FEATURE_SNAPSHOT_MARKER.to_string(), FEATURE_SNAPSHOT_GROUP_MARKER.to_string()];
        let (client, mut requests) = MarkClient::new(3, &features);
        assert!(client.group_supported && client.supported);
        let members = vec!["db".to_string(), "files".to_string()];
        let answerer = {
            let client = Arc::clone(&client);
            std::thread::spawn(move || {
                let Some(MarkRequest::Group(request)) = requests.blocking_recv() else { panic!("a group request") };
                assert_eq!((request.name.as_str(), request.members.len()), ("g", 2));
                let outcome = MarkGroupOutcome::Appended { seqs: vec![10, 20] };
                client.resolve_group(MarkGroupReplyMsg { epoch: 3, id: request.id, outcome }).unwrap();
                let Some(MarkRequest::Group(request)) = requests.blocking_recv() else { panic!("a group request") };
                let outcome = MarkGroupOutcome::Refused { reason: "volume files: fenced".into() };
                client.resolve_group(MarkGroupReplyMsg { epoch: 3, id: request.id, outcome }).unwrap();
                let Some(MarkRequest::Group(request)) = requests.blocking_recv() else { panic!("a group request") };
                let outcome = MarkGroupOutcome::Appended { seqs: vec![10, 20, 30] };
                client.resolve_group(MarkGroupReplyMsg { epoch: 3, id: request.id, outcome }).unwrap();
                let Some(MarkRequest::Group(request)) = requests.blocking_recv() else { panic!("a group request") };
                // A single reply to a group request is a protocol error; the request stays.
                let single = MarkReplyMsg { epoch: 3, id: request.id, outcome: MarkOutcome::Appended { seq: 1 } };
                assert!(client.resolve(single).is_err());
                client.close();
                requests
            })
        };
        assert_eq!(client.request_group("g", &members, Duration::from_secs(10)), Ok(vec![10, 20]));
        let refused = client.request_group("g2", &members, Duration::from_secs(10)).unwrap_err();
        assert!(refused.contains("refused: volume files: fenced"), "{refused}");
        let miscounted = client.request_group("g3", &members, Duration::from_secs(10)).unwrap_err();
        assert!(miscounted.contains("3 seqs for 2 members"), "{miscounted}");
        let ended = client.request_group("g4", &members, Duration::from_secs(10)).unwrap_err();
        assert!(ended.contains("session with the primary ended"), "{ended}");
        drop(answerer.join().unwrap());
        assert!(client.pending.lock().is_empty());
        // Sessions are told apart; an old primary has no group feature.
        let (old, _requests) = MarkClient::new(3, &[FEATURE_SNAPSHOT_MARKER.to_string()]);
        assert!(old.supported && !old.group_supported);
        assert_ne!(old.session, client.session);
    }

    use crate::testing::repl_volume;

    /// The primary refuses a group request, appending nothing and claiming nothing, and
    /// names the member at fault: a member it does not replicate (a forged or stale
    /// request), one replicated to another standby, one it is not primary of, one whose
    /// standby is not streaming, a lead that is not a member, a session that ended.
    #[test]
    fn the_primary_refuses_a_group_naming_the_member() {
        let root = tempfile::tempdir().unwrap();
        let env = root.path();
        let db = repl_volume(env, "db", "node-b", Role::Primary);
        let queue = ShipQueue::new(1, 1 << 20);
        *db.queue.lock() = Some(Arc::clone(&queue));
        let mut volumes: HashMap<String, Arc<ReplVolume>> = HashMap::new();
        volumes.insert("db".into(), Arc::clone(&db));
        volumes.insert("elsewhere".into(), repl_volume(env, "elsewhere", "node-c", Role::Primary));
        volumes.insert("mirror".into(), repl_volume(env, "mirror", "node-b", Role::Standby));
        volumes.insert("quiet".into(), repl_volume(env, "quiet", "node-b", Role::Primary));
        let request = |members: &[&str]| MarkGroupRequestMsg {
            epoch: 1,
            id: 1,
            name: "g".into(),
            members: members.iter().map(|m| (*m).to_owned()).collect(),
        };
        let refused = |members: &[&str]| append_requested_group_marker(&db, &volumes, &request(members), &queue);
        let reason = refused(&["db", "ghost"]).unwrap_err();
        assert!(reason.contains("volume ghost: not replicated on the primary node-a"), "{reason}");
        let reason = refused(&["db", "elsewhere"]).unwrap_err();
        assert!(reason.contains("volume elsewhere: replicates to node-c, not to node-b"), "{reason}");
        let reason = refused(&["db", "mirror"]).unwrap_err();
        assert!(reason.contains("volume mirror: node-a is not its primary"), "{reason}");
        // Known members, but no session streams to the standby (none was started here).
        let reason = refused(&["db", "quiet"]).unwrap_err();
        assert!(reason.contains("volume db: its standby node-b is not connected and up to date"), "{reason}");
        let reason = refused(&["elsewhere", "quiet"]).unwrap_err();
        assert!(reason.contains("volume db: the request came on its stream but it is not one of"), "{reason}");
        let other_session = ShipQueue::new(1, 1 << 20);
        let reason = append_requested_group_marker(&db, &volumes, &request(&["db", "quiet"]), &other_session);
        assert!(reason.unwrap_err().contains("volume db: the session the request came on has ended"));
        // Nothing was appended or claimed: the primary may still claim the name itself.
        assert!(volumes.values().all(|rv| rv.volume().last_seq() == 0));
        let members: Vec<&ReplVolume> = volumes.values().map(|rv| &**rv).collect();
        assert_eq!(ReplVolume::claim_group_snapshot_marker(&members, "g"), Ok(()));
        // Now claimed by the primary: the standby's request for it would be refused.
        let claims: Vec<(&str, &MarkerClaims)> = members.iter().map(|rv| (rv.name(), &rv.marker_claims)).collect();
        assert!(matches!(MarkerClaims::try_claim_all(&claims, "g", Claimant::Standby), Err((_, Claimant::Primary))));
    }
}
