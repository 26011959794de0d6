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
//! # Invariants
//! - A marker is requested only over a session whose copy was consistent when the request
//!   was sent, and an `Appended` reply arrives on that same session after the record: the
//!   standby applied the marker as a consistent prefix of the primary's journal. A session
//!   that ends fails every request waiting on it.
//! - Each name is appended at most once per primary term: the primary's claims
//!   ([`ReplVolume::claim_snapshot_marker`] for its own scheduled snapshots, every granted
//!   request for the standby's) are checked and recorded under one lock.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde_json::json;
use tokio::sync::{mpsc, Semaphore};

use super::proto::FEATURE_SNAPSHOT_MARKER;
use super::state::Role;
use super::volume::{PeerState, ReplVolume, ShipQueue};
use super::wire::{MarkOutcome, MarkReplyMsg, MarkRequestMsg, MARKER_NAME_MAX_BYTES};

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
        if let Some((_, holder)) = claims.iter().find(|(n, _)| n == name) {
            return if *holder == claimant { Ok(()) } else { Err(*holder) };
        }
        if claims.len() == CLAIMS_KEPT {
            claims.pop_front();
        }
        claims.push_back((name.to_owned(), claimant));
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

/// The standby's side of one journal session's marker requests: the requests on their
/// way to the session's writer, and the requesters waiting for replies.
#[derive(Debug)]
pub(crate) struct MarkClient {
    epoch: u64,
    /// Whether the primary of this session listed the feature.
    supported: bool,
    requests: mpsc::Sender<MarkRequestMsg>,
    pending: Mutex<HashMap<u64, std::sync::mpsc::SyncSender<MarkOutcome>>>,
    next_id: AtomicU64,
}

impl MarkClient {
    /// A client for a session of `epoch`, and the receiver its writer sends from.
    pub(crate) fn new(epoch: u64, supported: bool) -> (Arc<Self>, mpsc::Receiver<MarkRequestMsg>) {
        let (requests, receiver) = mpsc::channel(MARK_REQUESTS_MAX);
        let client =
            Self { epoch, supported, requests, pending: Mutex::new(HashMap::new()), next_id: AtomicU64::new(1) };
        (Arc::new(client), receiver)
    }

    /// Hands a reply to its requester. A reply nobody waits for (the requester timed out)
    /// is dropped.
    pub(crate) fn resolve(&self, reply: MarkReplyMsg) -> Result<(), String> {
        if reply.epoch != self.epoch {
            return Err(format!("marker reply of epoch {} in a session of epoch {}", reply.epoch, self.epoch));
        }
        match self.pending.lock().remove(&reply.id) {
            Some(requester) => {
                let _ = requester.try_send(reply.outcome);
            }
            None => tracing::debug!(id = reply.id, "marker reply for a request no one waits for"),
        }
        Ok(())
    }

    /// Fails every waiting request: the session ended.
    pub(crate) fn close(&self) {
        self.pending.lock().clear();
    }

    /// Sends a request and waits (blocking) up to `timeout` for the reply.
    fn request(&self, name: &str, timeout: Duration) -> Result<u64, String> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (answer, reply) = std::sync::mpsc::sync_channel(1);
        {
            let mut pending = self.pending.lock();
            if pending.len() >= MARK_REQUESTS_MAX {
                return Err(format!("{MARK_REQUESTS_MAX} snapshot marker requests are already waiting"));
            }
            pending.insert(id, answer);
        }
        // Removes the entry however this returns (the reply may never come).
        struct Forget<'a>(&'a MarkClient, u64);
        impl Drop for Forget<'_> {
            fn drop(&mut self) {
                self.0.pending.lock().remove(&self.1);
            }
        }
        let _forget = Forget(self, id);
        let request = MarkRequestMsg { epoch: self.epoch, id, name: name.to_owned() };
        self.requests.try_send(request).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => "too many snapshot marker requests queued".to_string(),
            mpsc::error::TrySendError::Closed(_) => "the session with the primary ended".to_string(),
        })?;
        match reply.recv_timeout(timeout) {
            Ok(MarkOutcome::Appended { seq }) => Ok(seq),
            Ok(MarkOutcome::Refused { reason }) => Err(format!("the primary refused: {reason}")),
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

    /// On the primary: whether a scheduled snapshot can be left to the standby: it is
    /// connected, UpToDate, and speaks the marker requests.
    pub fn standby_takes_snapshots(&self) -> bool {
        let shared = self.shared.lock();
        shared.state.role == Role::Primary
            && shared.peer_connected
            && shared.peer_state() == PeerState::UpToDate
            && shared.peer_features.iter().any(|f| f == FEATURE_SNAPSHOT_MARKER)
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
        let (client, mut requests) = MarkClient::new(7, true);
        // Answered: the reply reaches the requester.
        let answerer = {
            let client = Arc::clone(&client);
            std::thread::spawn(move || {
                let request = requests.blocking_recv().unwrap();
                assert_eq!((request.epoch, request.name.as_str()), (7, "a"));
                let outcome = MarkOutcome::Appended { seq: 42 };
                client.resolve(MarkReplyMsg { epoch: 7, id: request.id, outcome }).unwrap();
                let request = requests.blocking_recv().unwrap();
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
}
