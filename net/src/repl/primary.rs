//! The primary's driver for one volume: keeps the lease with the witness, connects to the
//! standby, streams the journal, resyncs what the standby lacks, and steps down when the
//! witness says another node took over.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::AsyncWriteExt;

use std::collections::VecDeque;

use parking_lot::Mutex;

use super::arbiter::{ArbiterRecord, ArbiterRequest, ArbiterResponse, StandbyState};
use super::fence::PrimaryFence;
use super::history::{compare, Divergence, History};
use super::marker::MarkServer;
use super::node::{call_arbiter, read_json, write_json, NodeCtx};
use super::proto::{Control, Hello, HelloReply, StreamKind, Verdict};
use super::resync;
use super::state::Role;
use super::volume::{PrimarySink, ReplVolume, RoleChange, ShipQueue, Shipment};
use super::wire::{
    encode_json, read_frame, AckMsg, FrameType, MarkGroupRequestMsg, MarkRequestMsg, ProbeMsg, MAX_FRAME_PAYLOAD,
};

/// Why the primary loop ended.
#[derive(Debug)]
pub(crate) enum PrimaryEnd {
    Shutdown,
    Deposed(String),
    HandedOver(u64),
}

/// Runs the volume as primary until the node shuts down or the witness deposes it.
pub(crate) async fn run(rv: &Arc<ReplVolume>, ctx: &Arc<NodeCtx>) -> PrimaryEnd {
    let now = Instant::now();
    let (epoch, peer) = {
        let shared = rv.shared.lock();
        (shared.state.epoch, shared.state.peer.clone())
    };
    {
        let mut shared = rv.shared.lock();
        // A promotion leaves the fence it built from the witness's grant (lease, standby
        // Outdated); otherwise start without any allowance.
        if shared.primary.as_ref().is_none_or(|f| f.epoch() != epoch) {
            let mut fence = PrimaryFence::new(rv.name(), &ctx.node, &peer, epoch, rv.config.timing.clone(), now);
            fence.handle_recovered(now, rv.volume.last_seq());
            shared.primary = Some(fence);
        }
        shared.standby = None;
        shared.handover_requested = false;
    }
    rv.emit("role", json!({"role": "primary", "epoch": epoch}));
    rv.dirty.reset();
    rv.marker_claims.reset();
    stop_shipping(rv);
    // Learn the witness's record before any session: the fence built from it knows the
    // lease and whether the standby is Outdated.
    init_record(rv, ctx).await;
    rv.notify();
    let end = tokio::select! {
        end = fence_loop(rv, ctx) => end,
        () = session_loop(rv, ctx) => PrimaryEnd::Shutdown,
        () = fence_events(rv) => PrimaryEnd::Shutdown,
        () = ctx.shutdown.cancelled() => PrimaryEnd::Shutdown,
    };
    match &end {
        PrimaryEnd::Deposed(reason) => {
            stop_shipping(rv);
            demote(rv, ctx, reason, false).await;
        }
        PrimaryEnd::HandedOver(epoch) => {
            stop_shipping(rv);
            demote(rv, ctx, &format!("switchover: the standby is primary of epoch {epoch}"), true).await;
        }
        PrimaryEnd::Shutdown => stop_shipping(rv),
    }
    end
}

/// Drives the fencing machine: sends its witness requests, applies the answers, and
/// notices deposition (or the grant of a planned handover).
async fn fence_loop(rv: &Arc<ReplVolume>, ctx: &Arc<NodeCtx>) -> PrimaryEnd {
    loop {
        // The fence remembers the request by the instant it was polled: use that one.
        let sent_at = Instant::now();
        let step = {
            let mut shared = rv.shared.lock();
            let handover = shared.handover_requested;
            let fence = shared.primary.as_mut().expect("primary fence exists while primary");
            fence.handle_tick(Instant::now());
            match fence.deposed().cloned() {
                Some(record) => Err((record, handover)),
                None => Ok(fence.poll_request(sent_at)),
            }
        };
        let request = match step {
            Ok(request) => request,
            Err((record, true)) if record.primary == rv.config.peer && record.standby == ctx.node => {
                hand_over(rv, record.epoch).await;
                return PrimaryEnd::HandedOver(record.epoch);
            }
            Err((record, _)) => {
                return PrimaryEnd::Deposed(format!(
                    "the witness names {} primary of epoch {}",
                    record.primary, record.epoch
                ))
            }
        };
        rv.changed.notify_all();
        if let Some(request) = request {
            let response = call_arbiter(ctx, &request).await;
            let mut shared = rv.shared.lock();
            shared.note_witness(&response);
            let fence = shared.primary.as_mut().expect("primary fence exists while primary");
            let before = fence.status().standby_state;
            fence.handle_witness(Instant::now(), sent_at, &request, response.as_ref().map_err(String::as_str));
            let after = fence.status().standby_state;
            if before != after {
                drop(shared);
                rv.emit("peer", json!({"standby_state": after}));
            } else {
                drop(shared);
            }
            rv.changed.notify_all();
            continue;
        }
        let wait = {
            let shared = rv.shared.lock();
            let fence = shared.primary.as_ref().expect("primary fence exists while primary");
            fence.poll_timeout().map_or(Duration::from_millis(100), |at| at.saturating_duration_since(Instant::now()))
        };
        tokio::select! {
            () = tokio::time::sleep(wait.clamp(Duration::from_millis(1), Duration::from_millis(100))) => {}
            () = rv.wake.notified() => {}
        }
    }
}

/// How often [`fence_events`] looks at the fence.
const FENCE_EVENT_POLL: Duration = Duration::from_millis(10);

/// Emits a `fence` event each time this node starts or stops being allowed to answer
/// writes. Not part of `fence_loop`: a witness call there can block past the moment an
/// allowance runs out, and the event must show when writes stopped (tests compare it with
/// the standby's promotion). Polled, since an allowance ends by time alone. Never returns.
async fn fence_events(rv: &ReplVolume) {
    let mut writes_allowed: Option<bool> = None;
    // When writes were last seen allowed (wall clock, ms since the Unix epoch, like event
    // times): a fence event carries it, so that a late poll cannot make it look later.
    let mut last_allowed_ms: Option<u64> = None;
    loop {
        let change = {
            let shared = rv.shared.lock();
            shared.primary.as_ref().and_then(|fence| {
                let allowed = fence.writes_allowed(Instant::now());
                let change = (writes_allowed != Some(allowed)).then(|| {
                    let status = fence.status();
                    json!({
                        "writes_allowed": allowed,
                        "epoch": status.epoch,
                        "standby_state": status.standby_state,
                        "standby_connected": status.standby_connected,
                        "last_allowed_ms": last_allowed_ms,
                    })
                });
                writes_allowed = Some(allowed);
                if allowed {
                    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
                    last_allowed_ms = Some(now.as_millis() as u64);
                }
                change
            })
        };
        if let Some(fields) = change {
            rv.emit("fence", fields);
        }
        tokio::time::sleep(FENCE_EVENT_POLL).await;
    }
}

/// Makes sure the witness has a record for the volume (the first start of a pair creates
/// it with this node primary and the standby Outdated, since it has not synced yet), and
/// takes the lease and the standby's state from the answer. Gives up quietly when the
/// witness cannot be reached: the fence then runs on renewals and the standby's acks.
async fn init_record(rv: &Arc<ReplVolume>, ctx: &Arc<NodeCtx>) {
    let (epoch, peer) = {
        let shared = rv.shared.lock();
        (shared.state.epoch, shared.state.peer.clone())
    };
    let request = ArbiterRequest::Init {
        record: ArbiterRecord {
            volume: rv.name().to_string(),
            epoch,
            primary: ctx.node.clone(),
            standby: peer,
            standby_state: StandbyState::Outdated,
        },
    };
    let sent_at = Instant::now();
    let Ok(answer) = call_arbiter(ctx, &request).await else {
        rv.shared.lock().witness_reachable = Some(false);
        return;
    };
    let mut shared = rv.shared.lock();
    shared.witness_reachable = Some(true);
    shared.record = answer.record().cloned();
    let Some(record) = answer.record().cloned() else { return };
    if record.epoch == epoch && record.primary == ctx.node {
        let lease = match &answer {
            ArbiterResponse::Granted { lease_ms: Some(ms), .. } => Some((sent_at, *ms)),
            _ => None,
        };
        let now = Instant::now();
        // No session has started yet, so the fence has learned nothing to keep.
        let mut fence = PrimaryFence::from_record(&record, &ctx.node, rv.config.timing.clone(), lease, now);
        // Any of the journal may have been acknowledged by an earlier incarnation.
        fence.handle_recovered(now, rv.volume.last_seq());
        shared.primary = Some(fence);
    } else if let Some(fence) = shared.primary.as_mut() {
        // Another primary or a newer epoch: the answer deposes this node.
        fence.handle_witness(Instant::now(), sent_at, &request, Ok(&answer));
    }
    drop(shared);
    rv.notify();
}

/// Connects to the standby again and again, running one replication session at a time.
async fn session_loop(rv: &Arc<ReplVolume>, ctx: &Arc<NodeCtx>) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let started = Instant::now();
        match session(rv, ctx).await {
            Ok(()) => {}
            Err(e) => tracing::debug!(volume = %rv.name(), "replication session ended: {e}"),
        }
        stop_shipping(rv);
        {
            let mut shared = rv.shared.lock();
            let was_connected = shared.peer_connected;
            shared.peer_connected = false;
            shared.resync = None;
            if let Some(fence) = shared.primary.as_mut() {
                fence.handle_standby_lost(Instant::now());
            }
            drop(shared);
            if was_connected {
                rv.emit("peer", json!({"connected": false}));
            }
        }
        rv.notify();
        if started.elapsed() > Duration::from_secs(2) {
            backoff = Duration::from_millis(50);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_millis(500));
    }
}

/// Detaches the ship queue from the engine and closes it (waking blocked writers); the
/// dirty map keeps tracking while this node is primary.
fn stop_shipping(rv: &ReplVolume) {
    if let Some(queue) = rv.queue.lock().take() {
        queue.close();
    }
    let tracking = rv.role() == Role::Primary;
    let sink = tracking.then(|| Arc::new(PrimarySink { dirty: Arc::clone(&rv.dirty), queue: None }) as _);
    let last = rv.volume.set_record_sink(sink);
    if tracking {
        rv.dirty.start(last + 1);
    }
}

async fn session(rv: &Arc<ReplVolume>, ctx: &Arc<NodeCtx>) -> Result<(), String> {
    let conn = crate::quic::connect(&ctx.endpoint, rv.config.peer_addr, &rv.config.peer)
        .await
        .map_err(|e| format!("connect to {}: {e}", rv.config.peer))?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| format!("open the journal stream: {e}"))?;
    let (epoch, history) = {
        let shared = rv.shared.lock();
        (shared.state.epoch, shared.state.history.clone())
    };
    let my_last = rv.volume.last_seq();
    let hello = Hello {
        volume: rv.name().to_string(),
        node: ctx.node.clone(),
        stream: StreamKind::Journal,
        epoch,
        last_seq: my_last,
        history: history.clone(),
        size: rv.volume.size(),
        features: super::proto::features(),
    };
    write_json(&mut send, FrameType::Hello, &hello).await?;
    let reply: HelloReply = read_json(&mut recv, FrameType::HelloReply).await?;
    match &reply.verdict {
        Verdict::Accept => {}
        Verdict::Stale => {
            // The peer holds a newer epoch: stop writing and ask the witness at once.
            if let Some(fence) = rv.shared.lock().primary.as_mut() {
                fence.handle_peer_epoch(Instant::now(), reply.epoch);
            }
            rv.notify();
            return Err(format!("{} holds epoch {} (ours is {epoch})", reply.node, reply.epoch));
        }
        Verdict::Refuse(reason) => return Err(format!("{} refused the session: {reason}", reply.node)),
    }
    let divergence =
        compare(&History::from(history.clone()), my_last, &History::from(reply.history.clone()), reply.last_seq);
    let resync_from = match divergence {
        Divergence::SplitBrain { epoch, detail } => {
            rv.emit("split_brain", json!({"peer": reply.node, "epoch": epoch, "detail": detail}));
            tracing::error!(volume = %rv.name(), "split brain with {} at epoch {epoch}: {detail}; replication refused until an operator decides", reply.node);
            tokio::time::sleep(Duration::from_secs(5)).await;
            return Err("split brain".into());
        }
        Divergence::Same => reply.last_seq.min(my_last),
        Divergence::Behind { resync_from } => resync_from,
    };
    let queue = ShipQueue::new(epoch, rv.config.queue_bytes);
    let sink = PrimarySink { dirty: Arc::clone(&rv.dirty), queue: Some(Arc::clone(&queue)) };
    let stream_from = rv.volume.set_record_sink(Some(Arc::new(sink))) + 1;
    rv.dirty.start(stream_from);
    *rv.queue.lock() = Some(queue.clone());
    let needs_resync = !(reply.consistent && resync_from == reply.last_seq && reply.last_seq + 1 == stream_from);
    let start = Control::Start {
        epoch,
        history: history.clone(),
        stream_from,
        resync_from: needs_resync.then_some(resync_from),
    };
    write_json(&mut send, FrameType::Control, &start).await?;
    let regions = if needs_resync {
        match read_json::<Control>(&mut recv, FrameType::Control).await? {
            Control::Regions { region_bytes, regions, discarded_records, discarded_bytes } => {
                if discarded_records > 0 {
                    rv.emit(
                        "peer_discarded_tail",
                        json!({"peer": reply.node, "records": discarded_records, "bytes": discarded_bytes, "after_seq": resync_from}),
                    );
                }
                Some((region_bytes, regions))
            }
            other => return Err(format!("expected the standby's regions, got {other:?}")),
        }
    } else {
        None
    };
    {
        let mut shared = rv.shared.lock();
        shared.peer_connected = true;
        shared.peer_features = reply.features.clone();
        shared.acked_seq = reply.durable_seq.min(stream_from - 1);
        let fence = shared.primary.as_mut().ok_or("no longer primary")?;
        fence.handle_standby_connected(Instant::now());
        if needs_resync {
            fence.handle_standby_resyncing(Instant::now());
        } else {
            // Its copy is complete up to where the stream starts, and the stream keeps it so.
            fence.handle_standby_in_sync(Instant::now(), reply.durable_seq);
        }
    }
    rv.emit(
        "peer",
        json!({"connected": true, "peer": reply.node, "stream_from": stream_from, "resync_from": needs_resync.then_some(resync_from)}),
    );
    rv.notify();
    let resync = async {
        match regions {
            Some((region_bytes, regions)) => {
                resync::send(rv, &conn, epoch, resync_from, region_bytes, regions, &queue).await?;
                std::future::pending::<Result<(), String>>().await
            }
            None => std::future::pending().await,
        }
    };
    let probes = Mutex::new(VecDeque::new());
    tokio::select! {
        r = send_loop(&queue, &mut send, epoch, &probes, rv.config.timing.heartbeat_interval) => r,
        r = ack_loop(rv, ctx, &queue, &mut recv, epoch, &probes) => r,
        r = resync => r,
    }
}

/// Probes sent and not yet echoed: `(id, sent_at)`, newest last.
type Probes = Mutex<VecDeque<(u64, Instant)>>;
/// Probes remembered for echoes.
const PROBES_KEPT: usize = 64;

/// Writes queued records and sync requests to the journal stream, in order, and a probe
/// every `heartbeat` (the standby echoes it; see the fence's standby allowance).
async fn send_loop(
    queue: &ShipQueue,
    send: &mut quinn::SendStream,
    epoch: u64,
    probes: &Probes,
    heartbeat: Duration,
) -> Result<(), String> {
    let _ = send.set_priority(10);
    let mut tick = tokio::time::interval(heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next_probe = 1u64;
    loop {
        tokio::select! {
            batch = queue.pop_batch(256) => {
                let Some(batch) = batch else { return Err("ship queue closed".into()) };
                // Header and payload go out as two buffers: the payload is not copied again.
                let mut chunks = Vec::with_capacity(batch.len() * 2);
                for item in batch {
                    match item {
                        Shipment::Record(record) => chunks.extend(record.encode_chunks()),
                        Shipment::Sync(sync) => chunks.push(sync.encode()),
                        Shipment::Control(control) => chunks.push(
                            encode_json(FrameType::Control, &control).map_err(|e| format!("encode {control:?}: {e}"))?,
                        ),
                        Shipment::MarkReply(reply) => chunks.push(reply.encode()),
                        Shipment::MarkGroupReply(reply) => chunks.push(reply.encode()),
                    }
                }
                send.write_all_chunks(&mut chunks).await.map_err(|e| format!("send to the standby: {e}"))?;
            }
            _ = tick.tick() => {
                let id = next_probe;
                next_probe += 1;
                {
                    let mut probes = probes.lock();
                    if probes.len() == PROBES_KEPT {
                        probes.pop_front();
                    }
                    probes.push_back((id, Instant::now()));
                }
                send.write_all(&ProbeMsg { epoch, id }.encode()).await.map_err(|e| format!("send a probe: {e}"))?;
            }
        }
    }
}

/// Reads the standby's acknowledgements and feeds them (and the probe echoes) to the
/// fencing machine; hands its snapshot marker requests (single and group) to the marker
/// server. Any other
/// frame, or a malformed one, ends the session.
async fn ack_loop(
    rv: &Arc<ReplVolume>,
    ctx: &Arc<NodeCtx>,
    queue: &Arc<ShipQueue>,
    recv: &mut quinn::RecvStream,
    epoch: u64,
    probes: &Probes,
) -> Result<(), String> {
    let marks = MarkServer::new();
    loop {
        let frame = read_frame(recv, MAX_FRAME_PAYLOAD)
            .await
            .map_err(|e| format!("read from the standby: {e}"))?
            .ok_or("the standby closed the journal stream")?;
        if frame.ty == FrameType::MarkRequest {
            let request = MarkRequestMsg::decode(&frame).map_err(|e| format!("bad frame from the standby: {e}"))?;
            if request.epoch != epoch {
                return Err(format!("marker request for epoch {} in a session of epoch {epoch}", request.epoch));
            }
            marks.handle(rv, queue, epoch, request);
            continue;
        }
        if frame.ty == FrameType::MarkGroupRequest {
            let request =
                MarkGroupRequestMsg::decode(&frame).map_err(|e| format!("bad frame from the standby: {e}"))?;
            if request.epoch != epoch {
                return Err(format!("group marker request for epoch {} in a session of epoch {epoch}", request.epoch));
            }
            marks.handle_group(rv, ctx, queue, epoch, request);
            continue;
        }
        let ack = AckMsg::decode(&frame).map_err(|e| format!("bad frame from the standby: {e}"))?;
        if ack.epoch != epoch {
            return Err(format!("ack for epoch {} in a session of epoch {epoch}", ack.epoch));
        }
        let probe_sent_at = probes.lock().iter().find(|(id, _)| *id == ack.probe).map(|(_, at)| *at);
        let counted = {
            let mut shared = rv.shared.lock();
            shared.acked_seq = shared.acked_seq.max(ack.durable_seq);
            if let Some(fence) = shared.primary.as_mut() {
                let now = Instant::now();
                fence.handle_standby_ack(now, epoch, ack.durable_seq);
                if let Some(sent_at) = probe_sent_at {
                    fence.handle_standby_echo(now, epoch, sent_at);
                }
                // A standby recorded Outdated while this session kept streaming to it holds
                // every record up to its acks: the fence starts catching up by itself once
                // they reach every seq a FLUSH asked for (and then sends MarkUpToDate).
            }
            shared.primary.as_ref().map(|fence| fence.standby_acked())
        };
        // Only what the fence counts proves the standby holds the data: a resyncing
        // standby's durable_seq jumped past records it never received (its forward rewind),
        // and pruning by it would drop regions the resync still has to copy.
        if let Some(acked) = counted {
            rv.dirty.prune(acked);
        }
        rv.changed.notify_all();
        rv.wake.notify_one();
    }
}

/// Steps down after the witness named another primary: no more writes, role standby (the
/// copy is not consistent until the new primary resynced it), `on_demote` runs.
async fn demote(rv: &Arc<ReplVolume>, ctx: &Arc<NodeCtx>, reason: &str, consistent: bool) {
    rv.volume.set_record_sink(None);
    rv.dirty.reset();
    let epoch = {
        let mut shared = rv.shared.lock();
        shared.primary = None;
        shared.peer_connected = false;
        shared.paused = false;
        shared.handover_requested = false;
        shared.state.role = Role::Standby;
        // After a deposition our tail may hold unacknowledged records; after a handover we
        // hold exactly what the new primary started from.
        shared.state.consistent = consistent;
        if let Err(e) = shared.state.store(rv.volume.dir()) {
            tracing::error!(volume = %rv.name(), "failed to persist the demotion: {e}");
        }
        shared.state.epoch
    };
    rv.notify();
    rv.emit("role", json!({"role": "standby", "epoch": epoch, "reason": reason}));
    tracing::warn!(volume = %rv.name(), "stepped down: {reason}");
    (ctx.observer)(RoleChange {
        volume: rv.name().to_string(),
        role: Role::Standby,
        epoch,
        reason: reason.to_string(),
    })
    .await;
}

/// After the witness granted a planned handover: tells the standby, behind every record
/// it was sent, and waits (bounded) until it took over and closed the session. The
/// session keeps running meanwhile (this runs inside the fence loop). Should the message
/// be lost, the standby learns the same from the witness when it asks to be promoted.
async fn hand_over(rv: &ReplVolume, epoch: u64) {
    let Some(queue) = rv.queue.lock().clone() else { return };
    queue.push_control(Control::Handover { epoch });
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && (!queue.is_empty() || rv.shared.lock().peer_connected) {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Shuts the send half cleanly (best effort).
pub(crate) async fn finish(send: &mut quinn::SendStream) {
    let _ = send.flush().await;
    let _ = send.finish();
}
