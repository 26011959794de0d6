//! The standby's driver for one volume: answers the primary's streams, appends its
//! records with their seqs, syncs and acknowledges, applies resync data, and promotes
//! itself when the primary is gone and the witness agrees.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_engine::format::RecordKind;
use keel_engine::ReplicaRecord;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::fence::StandbyFence;
use super::history::EpochStart;
use super::marker::{MarkClient, MarkRequest};
use super::node::{call_arbiter, read_json, write_json, NodeCtx};
use super::proto::{Control, Hello, HelloReply, StreamKind, Verdict};
use super::resync::{self, ResyncGuard};
use super::state::Role;
use super::volume::{ReplVolume, RoleChange};
use super::wire::{
    read_frame, AckMsg, FrameType, MarkGroupReplyMsg, MarkReplyMsg, ProbeMsg, RecordMsg, SyncRequestMsg,
    MAX_FRAME_PAYLOAD,
};

/// Records buffered between the stream reader and the applier thread.
const APPLY_QUEUE: usize = 256;
/// Record payload bytes buffered between the stream reader and the applier thread.
const APPLY_BYTES: u32 = 64 << 20;

/// The standby's live session state, replaced by each new journal stream.
#[derive(Debug, Default)]
pub(crate) struct StandbySession {
    pub(crate) cancel: CancellationToken,
    pub(crate) guard: Option<Arc<ResyncGuard>>,
    pub(crate) epoch: u64,
    /// The session's snapshot marker requests (see `marker`).
    pub(crate) marks: Option<Arc<MarkClient>>,
}

/// Why the standby loop ended.
#[derive(Debug)]
pub(crate) enum StandbyEnd {
    Shutdown,
    Promoted,
}

/// Runs the volume as standby until promotion or shutdown.
pub(crate) async fn run(rv: &Arc<ReplVolume>, ctx: &Arc<NodeCtx>) -> StandbyEnd {
    let (epoch, peer, consistent) = {
        let shared = rv.shared.lock();
        (shared.state.epoch, shared.state.peer.clone(), shared.state.consistent)
    };
    {
        let mut shared = rv.shared.lock();
        let mut fence = StandbyFence::new(rv.name(), &ctx.node, &peer, epoch, rv.config.timing.clone(), Instant::now());
        fence.handle_in_sync(consistent);
        fence.handle_automatic_failover(rv.config.mode == super::volume::ReplMode::Sync);
        // An earlier incarnation may have sent Promote in this epoch and never seen the
        // answer: hold acks back until the witness answers.
        if shared.state.promote_sent_epoch == Some(epoch) {
            fence.handle_promote_in_doubt();
        }
        shared.standby = Some(fence);
        shared.primary = None;
    }
    rv.emit("role", json!({"role": "standby", "epoch": epoch, "consistent": consistent}));
    rv.notify();
    tokio::select! {
        promoted = fence_loop(rv, ctx) => {
            if promoted {
                StandbyEnd::Promoted
            } else {
                StandbyEnd::Shutdown
            }
        }
        () = ctx.shutdown.cancelled() => StandbyEnd::Shutdown,
    }
}

/// Drives the standby's fencing machine; returns true after a promotion.
async fn fence_loop(rv: &Arc<ReplVolume>, ctx: &Arc<NodeCtx>) -> bool {
    // The kind of the last refusal of a `Promote` reported as an event (a refusal is
    // reported when its kind changes, not at every retry).
    let mut refusal_reported: Option<&'static str> = None;
    loop {
        enum Next {
            Promote(u64, String),
            Ask(Option<super::arbiter::ArbiterRequest>),
            Stop,
        }
        let next = {
            let mut shared = rv.shared.lock();
            let wanted = shared.promote_to.take();
            match (shared.standby.as_mut(), wanted) {
                (None, _) => Next::Stop,
                (Some(_), Some((epoch, reason))) => Next::Promote(epoch, reason),
                (Some(fence), None) => {
                    fence.handle_tick(Instant::now());
                    match fence.promoted() {
                        Some(record) => {
                            Next::Promote(record.epoch, "the primary was lost and the witness agreed".into())
                        }
                        None => Next::Ask(fence.poll_request(Instant::now())),
                    }
                }
            }
        };
        let request = match next {
            Next::Stop => return false,
            Next::Promote(epoch, reason) => {
                promote(rv, ctx, epoch, &reason).await;
                return true;
            }
            Next::Ask(request) => request,
        };
        if let Some(super::arbiter::ArbiterRequest::Promote { epoch, .. }) = &request {
            // Durably note the request before it leaves: after a crash we must not ack the
            // old primary while this request might have been granted.
            if let Err(e) = note_promote_sent(rv, *epoch) {
                tracing::error!(volume = %rv.name(), "failed to persist the promotion request: {e}; not sending it");
                tokio::time::sleep(rv.config.timing.retry).await;
                continue;
            }
        }
        if let Some(request) = request {
            let response = call_arbiter(ctx, &request).await;
            let mut shared = rv.shared.lock();
            shared.note_witness(&response);
            let mut promoted = false;
            if let Some(fence) = shared.standby.as_mut() {
                fence.handle_witness(Instant::now(), &request, response.as_ref().map_err(String::as_str));
                promoted = fence.promoted().is_some();
            }
            drop(shared);
            if let (super::arbiter::ArbiterRequest::Promote { epoch, .. }, false) = (&request, promoted) {
                use super::arbiter::ArbiterResponse;
                let (kind, reason) = match &response {
                    Ok(ArbiterResponse::RetryAfter { wait_ms, record }) => (
                        "lease",
                        format!("the primary {}'s lease is still running ({wait_ms} ms left)", record.primary),
                    ),
                    Ok(ArbiterResponse::Refused { reason, .. }) => ("refused", reason.clone()),
                    Ok(ArbiterResponse::Granted { .. }) => ("not_granted", "granted to another node".to_string()),
                    Err(e) => ("unreachable", format!("witness unreachable: {e}")),
                };
                if refusal_reported != Some(kind) {
                    refusal_reported = Some(kind);
                    rv.emit("promote_refused", json!({"epoch": epoch, "answer": kind, "reason": reason}));
                }
            }
            continue;
        }
        let wait = {
            let shared = rv.shared.lock();
            shared
                .standby
                .as_ref()
                .and_then(|f| f.poll_timeout())
                .map_or(Duration::from_millis(100), |at| at.saturating_duration_since(Instant::now()))
        };
        tokio::select! {
            () = tokio::time::sleep(wait.min(Duration::from_millis(100))) => {}
            () = rv.wake.notified() => {}
        }
    }
}

/// Persists "Promote sent in `epoch`" (once per epoch).
fn note_promote_sent(rv: &ReplVolume, epoch: u64) -> std::io::Result<()> {
    let mut shared = rv.shared.lock();
    if shared.state.promote_sent_epoch == Some(epoch) {
        return Ok(());
    }
    shared.state.promote_sent_epoch = Some(epoch);
    let stored = shared.state.store(rv.volume.dir());
    if stored.is_err() {
        shared.state.promote_sent_epoch = None;
    }
    stored
}

/// Becomes primary of `epoch`: stops applying, makes everything received durable, starts
/// the new epoch at the next seq, persists, and lets the primary loop take over.
async fn promote(rv: &Arc<ReplVolume>, ctx: &Arc<NodeCtx>, epoch: u64, reason: &str) {
    let started = Instant::now();
    if let Some(session) = rv.standby_session.lock().take() {
        session.cancel.cancel();
        if let Some(guard) = session.guard {
            guard.close();
        }
    }
    // Wait for the applier of the cancelled session to let go (it holds a clone of the session token).
    let volume = Arc::clone(&rv.volume);
    let flushed = tokio::task::spawn_blocking(move || volume.flush().map(|_| volume.last_seq())).await;
    let last = match flushed {
        Ok(Ok(last)) => last,
        Ok(Err(e)) => {
            tracing::error!(volume = %rv.name(), "cannot promote: failed to flush: {e:#}");
            return;
        }
        Err(e) => {
            tracing::error!(volume = %rv.name(), "cannot promote: flush task failed: {e}");
            return;
        }
    };
    {
        let mut shared = rv.shared.lock();
        shared.state.role = Role::Primary;
        shared.state.epoch = epoch;
        shared.state.history.push(EpochStart { epoch, start_seq: last + 1, primary: ctx.node.clone() });
        shared.state.promote_sent_epoch = None;
        // A promotion the witness granted carries a lease and records the old primary
        // Outdated: the primary loop starts from that fence.
        let now = Instant::now();
        let granted = shared.standby.take().and_then(|f| f.primary_fence(now));
        shared.primary = granted.filter(|f| f.epoch() == epoch).map(|mut fence| {
            fence.handle_recovered(now, last);
            fence
        });
        if let Err(e) = shared.state.store(rv.volume.dir()) {
            tracing::error!(volume = %rv.name(), "failed to persist the promotion: {e}");
        }
    }
    if let Err(e) = rv.volume.set_epoch(epoch) {
        tracing::error!(volume = %rv.name(), "failed to record epoch {epoch} in the volume: {e:#}");
    }
    rv.emit(
        "promote",
        json!({"epoch": epoch, "start_seq": last + 1, "reason": reason, "took_ms": started.elapsed().as_millis() as u64}),
    );
    tracing::warn!(volume = %rv.name(), epoch, "promoted to primary: {reason}");
    rv.notify();
    (ctx.observer)(RoleChange {
        volume: rv.name().to_string(),
        role: Role::Primary,
        epoch,
        reason: reason.to_string(),
    })
    .await;
}

/// Handles one stream the peer opened for this volume (journal or resync).
pub(crate) async fn serve_stream(
    rv: Arc<ReplVolume>,
    ctx: Arc<NodeCtx>,
    peer: String,
    hello: Hello,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> Result<(), String> {
    let (role, epoch, history, consistent) = {
        let shared = rv.shared.lock();
        (shared.state.role, shared.state.epoch, shared.state.history.clone(), shared.state.consistent)
    };
    let verdict = if peer != hello.node || peer != rv.config.peer {
        Verdict::Refuse(format!("{peer} is not this volume's peer ({})", rv.config.peer))
    } else if hello.size != rv.volume.size() {
        Verdict::Refuse(format!("size {} differs from ours ({})", hello.size, rv.volume.size()))
    } else if role == Role::Primary || hello.epoch < epoch {
        Verdict::Stale
    } else {
        Verdict::Accept
    };
    let reply = HelloReply {
        node: ctx.node.clone(),
        verdict: verdict.clone(),
        role,
        epoch,
        last_seq: rv.volume.last_seq(),
        durable_seq: rv.volume.durable_seq(),
        history,
        consistent,
        features: super::proto::features(),
    };
    write_json(&mut send, FrameType::HelloReply, &reply).await?;
    if verdict != Verdict::Accept {
        if role == Role::Primary {
            // Someone else thinks it is primary: have our fence check with the witness now.
            rv.wake.notify_one();
        }
        return Err(format!("refused {:?} stream from {peer}: {verdict:?}", hello.stream));
    }
    match hello.stream {
        StreamKind::Journal => journal(&rv, &peer, &hello.features, send, recv).await,
        StreamKind::Resync => {
            let (guard, session_epoch) = {
                let session = rv.standby_session.lock();
                match session.as_ref() {
                    Some(s) => (s.guard.clone(), s.epoch),
                    None => (None, 0),
                }
            };
            let guard = guard.ok_or("a resync stream without a journal session that asked for one")?;
            resync::receive(&rv, guard, &mut send, &mut recv, session_epoch).await
        }
    }
}

/// An item for the applier thread.
enum Inbound {
    /// A record, holding its share of the byte budget until it is applied.
    Record(RecordMsg, tokio::sync::OwnedSemaphorePermit),
    Sync(SyncRequestMsg),
}

/// The journal stream: adopt the primary's epoch, resync if told to, then apply records
/// and acknowledge durable seqs until the stream ends.
async fn journal(
    rv: &Arc<ReplVolume>,
    peer: &str,
    features: &[String],
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> Result<(), String> {
    let Control::Start { epoch, history, stream_from, resync_from } =
        read_json::<Control>(&mut recv, FrameType::Control).await?
    else {
        return Err("expected Start".into());
    };
    let my_epoch = rv.epoch();
    if epoch < my_epoch {
        return Err(format!("Start of epoch {epoch} is older than ours ({my_epoch})"));
    }
    // One journal session at a time: a new one replaces the old.
    let cancel = CancellationToken::new();
    let (marks, mark_requests) = MarkClient::new(epoch, features);
    let session = StandbySession { cancel: cancel.clone(), guard: None, epoch, marks: Some(Arc::clone(&marks)) };
    if let Some(old) = rv.standby_session.lock().replace(session) {
        old.cancel.cancel();
        if let Some(marks) = old.marks {
            marks.close();
        }
        if let Some(guard) = old.guard {
            guard.close();
        }
    }
    let guard = if let Some(from) = resync_from {
        let (records, bytes) = prepare_resync(rv, from, stream_from).await?;
        let regions = rv.volume.changed_since(from).ok();
        let region_bytes = regions.as_ref().map_or(0, |r| r.region_bytes);
        let reply = Control::Regions {
            region_bytes,
            regions: regions.map(|r| r.regions),
            discarded_records: records,
            discarded_bytes: bytes,
        };
        write_json(&mut send, FrameType::Control, &reply).await?;
        let guard = ResyncGuard::new(stream_from - 1);
        if let Some(session) = rv.standby_session.lock().as_mut() {
            session.guard = Some(Arc::clone(&guard));
        }
        Some(guard)
    } else {
        if rv.volume.last_seq() + 1 != stream_from {
            return Err(format!("stream starts at {stream_from} but we are at {}", rv.volume.last_seq()));
        }
        None
    };
    {
        let mut shared = rv.shared.lock();
        shared.state.epoch = epoch;
        shared.state.history = history;
        shared.state.store(rv.volume.dir()).map_err(|e| format!("persist the replication state: {e}"))?;
        shared.peer_connected = true;
        let consistent = shared.state.consistent;
        if let Some(fence) = shared.standby.as_mut() {
            if fence.status().epoch != epoch {
                *fence = StandbyFence::new(
                    rv.name(),
                    &rv.config.node,
                    peer,
                    epoch,
                    rv.config.timing.clone(),
                    Instant::now(),
                );
            }
            fence.handle_in_sync(consistent);
            fence.handle_primary_connected(Instant::now());
        }
    }
    if let Err(e) = rv.volume.set_epoch(epoch) {
        return Err(format!("record epoch {epoch}: {e}"));
    }
    rv.emit("peer", json!({"connected": true, "primary": peer, "epoch": epoch, "stream_from": stream_from}));
    rv.notify();
    let result = apply_stream(rv, epoch, guard.clone(), &cancel, &marks, mark_requests, &mut send, &mut recv).await;
    // Requests waiting on this session fail now, not at their timeout.
    marks.close();
    if let Some(guard) = guard {
        guard.close();
    }
    {
        let mut shared = rv.shared.lock();
        shared.peer_connected = false;
        if let Some(fence) = shared.standby.as_mut() {
            fence.handle_primary_lost(Instant::now());
        }
    }
    rv.emit("peer", json!({"connected": false, "primary": peer}));
    rv.notify();
    result
}

/// Marks the copy inconsistent (durably, first), then discards our records after `from`
/// and moves our seq to `stream_from - 1`. Returns the discarded records and bytes.
async fn prepare_resync(rv: &Arc<ReplVolume>, from: u64, stream_from: u64) -> Result<(u64, u64), String> {
    {
        let mut shared = rv.shared.lock();
        shared.state.consistent = false;
        shared.state.store(rv.volume.dir()).map_err(|e| format!("persist the replication state: {e}"))?;
        if let Some(fence) = shared.standby.as_mut() {
            fence.handle_in_sync(false);
        }
    }
    let volume = Arc::clone(&rv.volume);
    let last = volume.last_seq();
    // Discard (and count) our records after `from` first, then jump to the stream's start:
    // a single rewind to `stream_from - 1 > last` only jumps forward and counts nothing,
    // though our records after `from` are just as discarded (an old primary's tail).
    let report = tokio::task::spawn_blocking(move || {
        let tail = if last > from { Some(volume.rewind(from)?) } else { None };
        volume.rewind(stream_from - 1).map(|jump| tail.unwrap_or(jump))
    })
    .await
    .map_err(|e| format!("rewind task failed: {e}"))?
    .map_err(|e| format!("discard our records after seq {from} and move to seq {}: {e}", stream_from - 1))?;
    let discarded = last.saturating_sub(from);
    rv.emit(
        "resync",
        json!({"state": "prepared", "from_seq": from, "stream_from": stream_from, "discarded_records": discarded, "discarded_journal_bytes": report.journal_bytes_found, "fully_counted": report.fully_counted}),
    );
    if discarded > 0 {
        tracing::warn!(volume = %rv.name(), "discarded {discarded} unconfirmed records after seq {from} ({} journal bytes found)", report.journal_bytes_found);
    }
    Ok((discarded, report.journal_bytes_found))
}

/// Reads frames into the applier thread and writes its acknowledgements (and the snapshot
/// marker requests of `marks`) back.
#[expect(clippy::too_many_arguments, reason = "one session's parts, passed once from `journal`")]
async fn apply_stream(
    rv: &Arc<ReplVolume>,
    epoch: u64,
    guard: Option<Arc<ResyncGuard>>,
    cancel: &CancellationToken,
    marks: &MarkClient,
    mut mark_requests: mpsc::Receiver<MarkRequest>,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
) -> Result<(), String> {
    let (in_tx, in_rx) = mpsc::channel::<Inbound>(APPLY_QUEUE);
    // Both a count and a byte bound: records can be up to 32 MiB each.
    let budget = Arc::new(tokio::sync::Semaphore::new(APPLY_BYTES as usize));
    let (ack_tx, mut ack_rx) = mpsc::channel::<AckMsg>(16);
    let probe_acks = ack_tx.clone();
    let latest_probe = AtomicU64::new(0);
    let volume = Arc::clone(&rv.volume);
    let applier = std::thread::Builder::new()
        .name(format!("keel-apply-{}", rv.name()))
        .spawn(move || apply_loop(&volume, epoch, guard, in_rx, ack_tx))
        .map_err(|e| format!("start the applier thread: {e}"))?;
    let reader = async {
        loop {
            // Ok(epoch) only for a handover.
            let frame = read_frame(recv, MAX_FRAME_PAYLOAD)
                .await
                .map_err(|e| format!("read the journal stream: {e}"))?
                .ok_or("the primary closed the journal stream")?;
            let item = match frame.ty {
                FrameType::Record => {
                    let record = RecordMsg::decode(&frame).map_err(|e| format!("bad record: {e}"))?;
                    let bytes = u32::try_from(record.payload.len()).unwrap_or(u32::MAX).clamp(1, APPLY_BYTES);
                    let permit = Arc::clone(&budget)
                        .acquire_many_owned(bytes)
                        .await
                        .map_err(|_| "the applier stopped".to_string())?;
                    Inbound::Record(record, permit)
                }
                FrameType::SyncRequest => {
                    Inbound::Sync(SyncRequestMsg::decode(&frame).map_err(|e| format!("bad sync request: {e}"))?)
                }
                FrameType::Probe => {
                    let probe = ProbeMsg::decode(&frame).map_err(|e| format!("bad probe: {e}"))?;
                    if probe.epoch != epoch {
                        return Err(format!("probe of epoch {} in epoch {epoch}", probe.epoch));
                    }
                    latest_probe.fetch_max(probe.id, Ordering::Relaxed);
                    // Answer right away with what is durable now: the primary's allowance.
                    let ack = AckMsg {
                        epoch,
                        durable_seq: rv.volume.durable_seq(),
                        received_seq: rv.volume.last_seq(),
                        probe: probe.id,
                    };
                    let _ = probe_acks.try_send(ack);
                    continue;
                }
                FrameType::MarkReply => {
                    // Behind the marker's record, which is in the applier's queue already.
                    let reply = MarkReplyMsg::decode(&frame).map_err(|e| format!("bad marker reply: {e}"))?;
                    marks.resolve(reply)?;
                    continue;
                }
                FrameType::MarkGroupReply => {
                    // Behind the lead's marker record; the other members' records come on
                    // their own streams (the requester checks their sessions).
                    let reply =
                        MarkGroupReplyMsg::decode(&frame).map_err(|e| format!("bad group marker reply: {e}"))?;
                    marks.resolve_group(reply)?;
                    continue;
                }
                FrameType::Control => match super::wire::decode_json::<Control>(&frame) {
                    // Every record before it is in the applier's queue; it finishes them below.
                    Ok(Control::Handover { epoch: new_epoch }) if new_epoch > epoch => return Ok(new_epoch),
                    Ok(other) => return Err(format!("unexpected {other:?} on the journal stream")),
                    Err(e) => return Err(format!("bad control frame: {e}")),
                },
                other => return Err(format!("unexpected {other:?} frame on the journal stream")),
            };
            if in_tx.send(item).await.is_err() {
                return Err("the applier stopped".to_string());
            }
        }
    };
    let writer = async {
        loop {
            tokio::select! {
                ack = ack_rx.recv() => {
                    let Some(mut ack) = ack else { break };
                    ack.probe = ack.probe.max(latest_probe.load(Ordering::Relaxed));
                    // The fence holds acks back while a promotion request of ours may be granted.
                    let allowed = rv.shared.lock().standby.as_mut().is_some_and(|f| f.try_ack(Instant::now()));
                    if !allowed {
                        continue;
                    }
                    send.write_all(&ack.encode()).await.map_err(|e| format!("send ack: {e}"))?;
                }
                Some(request) = mark_requests.recv() => {
                    send.write_all(&request.encode()).await.map_err(|e| format!("send a marker request: {e}"))?;
                }
            }
        }
        Err::<(), String>("the applier stopped".into())
    };
    let result: Result<u64, String> = tokio::select! {
        r = reader => r,
        r = writer => r.map(|()| 0),
        () = cancel.cancelled() => Err("session replaced or node promoted".into()),
    };
    // The applier applies what is queued, then exits once its channel closes; join it so
    // that a promotion never races it.
    drop(in_tx);
    let joined = tokio::task::spawn_blocking(move || applier.join()).await;
    match joined {
        Ok(Ok(Err(e))) => return Err(e),
        Ok(Err(_)) => return Err("the applier thread panicked".into()),
        _ => {}
    }
    let new_epoch = result?;
    rv.shared.lock().promote_to = Some((new_epoch, "switchover: the primary handed the volume over".into()));
    rv.notify();
    Ok(())
}

/// The applier thread: appends records with the primary's seqs, syncs when asked (one
/// fdatasync for every request that arrived meanwhile) and acknowledges.
fn apply_loop(
    volume: &keel_engine::Volume,
    epoch: u64,
    guard: Option<Arc<ResyncGuard>>,
    mut inbound: mpsc::Receiver<Inbound>,
    acks: mpsc::Sender<AckMsg>,
) -> Result<(), String> {
    let mut received = volume.last_seq();
    loop {
        let mut sync_wanted = false;
        let Some(first) = inbound.blocking_recv() else { return Ok(()) };
        let first = Some(first);
        let mut batch = 0;
        let mut next = first;
        while let Some(item) = next {
            match item {
                Inbound::Record(record, permit) => {
                    apply_record(volume, &record, guard.as_deref())?;
                    received = record.seq;
                    drop(permit);
                }
                Inbound::Sync(sync) => {
                    if sync.epoch != epoch {
                        return Err(format!("sync request of epoch {} in epoch {epoch}", sync.epoch));
                    }
                    sync_wanted = true;
                }
            }
            batch += 1;
            next = if batch < 1024 { inbound.try_recv().ok() } else { None };
        }
        if sync_wanted {
            let durable_seq = volume.flush().map_err(|e| format!("sync the journal: {e}"))?;
            let ack =
                AckMsg { epoch, durable_seq: durable_seq.max(volume.durable_seq()), received_seq: received, probe: 0 };
            // The session may be gone; the records are applied either way.
            let _ = acks.blocking_send(ack);
        }
    }
}

fn apply_record(volume: &keel_engine::Volume, record: &RecordMsg, guard: Option<&ResyncGuard>) -> Result<(), String> {
    let kind = match record.kind {
        1 => RecordKind::Write,
        2 => RecordKind::Zero,
        3 => RecordKind::Trim,
        5 => RecordKind::Snapshot,
        other => return Err(format!("record seq {} has kind {other}, which is not replicated", record.seq)),
    };
    let replica = ReplicaRecord {
        seq: record.seq,
        epoch: record.epoch,
        kind,
        flags: record.flags,
        offset: record.offset,
        length: record.length,
        payload: &record.payload,
    };
    let apply = || volume.apply_replica(&replica).map_err(|e| format!("apply record seq {}: {e}", record.seq));
    match guard {
        Some(guard) => {
            let extent = (kind != RecordKind::Snapshot).then_some((record.offset, record.length));
            guard.apply(record.seq, extent, apply)
        }
        None => apply(),
    }
}
