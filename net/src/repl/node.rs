//! One node's replication runtime: the QUIC endpoint, the accept loop that hands the
//! peer's streams to volumes, the per-volume role loops, the witness client, and the
//! operator actions (promote, switchover).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::arbiter::{Arbiter, ArbiterRequest, ArbiterResponse};
use super::proto::{Hello, ALPN_WITNESS};
use super::state::Role;
use super::volume::{ReplVolume, RoleObserver};
use super::wire::{decode_json, encode_json, read_frame, FrameType};
use super::{primary, standby};
use crate::quic::{self, Identity, TransportConfig};

/// Largest JSON control frame accepted.
const JSON_MAX: usize = 1 << 20;
/// How long one witness call may take before it counts as unreachable.
/// Within the fence's request timeout (400 ms), so a late answer is never mistaken for a
/// current one.
const WITNESS_CALL_TIMEOUT: Duration = Duration::from_millis(350);

/// What the drivers of every volume on a node share.
pub struct NodeCtx {
    /// This node's name (its certificate's).
    pub node: String,
    /// The replication endpoint (accepts the peer's streams, connects to the peer).
    pub endpoint: quinn::Endpoint,
    /// The arbiter (the witness client).
    pub arbiter: Arc<dyn Arbiter>,
    /// Runs the role-change hooks.
    pub observer: RoleObserver,
    /// Cancelled when the node shuts down.
    pub shutdown: CancellationToken,
    /// The replicated volumes, by name.
    pub volumes: HashMap<String, Arc<ReplVolume>>,
}

impl std::fmt::Debug for NodeCtx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeCtx").field("node", &self.node).finish_non_exhaustive()
    }
}

pub(crate) async fn call_arbiter(ctx: &NodeCtx, request: &ArbiterRequest) -> Result<ArbiterResponse, String> {
    ctx.arbiter.call(request.clone()).await
}

pub(crate) async fn write_json<T: Serialize>(
    send: &mut quinn::SendStream,
    ty: FrameType,
    value: &T,
) -> Result<(), String> {
    let frame = encode_json(ty, value).map_err(|e| format!("encode {ty:?}: {e}"))?;
    send.write_all(&frame).await.map_err(|e| format!("send {ty:?}: {e}"))
}

pub(crate) async fn read_json<T: DeserializeOwned>(recv: &mut quinn::RecvStream, ty: FrameType) -> Result<T, String> {
    let frame = tokio::time::timeout(Duration::from_secs(10), read_frame(recv, JSON_MAX))
        .await
        .map_err(|_| format!("no {ty:?} within 10 s"))?
        .map_err(|e| format!("read {ty:?}: {e}"))?
        .ok_or_else(|| format!("stream closed before {ty:?}"))?;
    if frame.ty != ty {
        return Err(format!("expected {ty:?}, got {:?}", frame.ty));
    }
    decode_json(&frame).map_err(|e| format!("decode {ty:?}: {e}"))
}

/// Starts every volume's role loop and the accept loop; returns when `ctx.shutdown` fires
/// and every loop has stopped.
pub async fn run(ctx: Arc<NodeCtx>, allowed_peers: Vec<String>) {
    let mut tasks = tokio::task::JoinSet::new();
    for rv in ctx.volumes.values() {
        let (rv, ctx) = (Arc::clone(rv), Arc::clone(&ctx));
        tasks.spawn(async move { role_loop(rv, ctx).await });
    }
    let accept_ctx = Arc::clone(&ctx);
    tasks.spawn(async move { accept_loop(accept_ctx, allowed_peers).await });
    ctx.shutdown.cancelled().await;
    ctx.endpoint.close(0u32.into(), b"shutting down");
    while tasks.join_next().await.is_some() {}
}

async fn role_loop(rv: Arc<ReplVolume>, ctx: Arc<NodeCtx>) {
    // Each run returns on a role change (or shutdown, which ends the loop).
    while !ctx.shutdown.is_cancelled() {
        match rv.role() {
            Role::Primary => {
                let end = primary::run(&rv, &ctx).await;
                tracing::debug!(volume = %rv.name(), "primary loop ended: {end:?}");
            }
            Role::Standby => {
                let end = standby::run(&rv, &ctx).await;
                tracing::debug!(volume = %rv.name(), "standby loop ended: {end:?}");
            }
        }
    }
}

async fn accept_loop(ctx: Arc<NodeCtx>, allowed_peers: Vec<String>) {
    while let Some(incoming) = ctx.endpoint.accept().await {
        let (ctx, allowed) = (Arc::clone(&ctx), allowed_peers.clone());
        tokio::spawn(async move {
            let (conn, peer) = match quic::accept(incoming, &allowed).await {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!("refused a replication connection: {e}");
                    return;
                }
            };
            while let Ok((send, mut recv)) = conn.accept_bi().await {
                let (ctx, peer) = (Arc::clone(&ctx), peer.clone());
                tokio::spawn(async move {
                    let hello: Hello = match read_json(&mut recv, FrameType::Hello).await {
                        Ok(hello) => hello,
                        Err(e) => {
                            tracing::warn!(%peer, "bad stream opening: {e}");
                            return;
                        }
                    };
                    let Some(rv) = ctx.volumes.get(&hello.volume).cloned() else {
                        tracing::warn!(%peer, volume = %hello.volume, "stream for a volume this node does not replicate");
                        return;
                    };
                    let volume = hello.volume.clone();
                    if let Err(e) = standby::serve_stream(rv, Arc::clone(&ctx), peer.clone(), hello, send, recv).await {
                        tracing::info!(%peer, %volume, "replication stream ended: {e}");
                    }
                });
            }
        });
    }
}

/// `keel promote VOLUME`: on the standby, asks the witness to promote this node. Refused
/// when unsafe (the copy is not consistent, or the witness says the standby is Outdated or
/// the primary's lease is still running) unless `force`, which promotes through the
/// witness's override and says what may be lost. Never without the witness: a node it
/// does not name primary gets no lease and must not serve.
pub async fn promote(ctx: &Arc<NodeCtx>, volume: &str, force: bool) -> Result<String, String> {
    let rv = ctx.volumes.get(volume).ok_or_else(|| format!("no replicated volume {volume:?} on this node"))?;
    let (role, epoch, consistent) = {
        let shared = rv.shared.lock();
        (shared.state.role, shared.state.epoch, shared.state.consistent)
    };
    if role == Role::Primary {
        return Err(format!("{volume} is already primary here (epoch {epoch})"));
    }
    if rv.config.mode == super::volume::ReplMode::Async && !force {
        return Err(format!(
            "refused: {volume} replicates asynchronously, so writes the primary acknowledged may be missing here \
             (up to its ship queue); --force accepts that"
        ));
    }
    if !consistent && !force {
        return Err(format!(
            "refused: this copy of {volume} is not consistent (a resync is pending or under way); \
             --force would serve a copy that lacks acknowledged writes"
        ));
    }
    let request = if force {
        ArbiterRequest::ForcePromote { volume: volume.to_string(), node: ctx.node.clone() }
    } else {
        ArbiterRequest::Promote { volume: volume.to_string(), epoch, node: ctx.node.clone() }
    };
    let answer = call_arbiter(ctx, &request).await;
    let (new_epoch, warning) = match answer {
        Ok(ArbiterResponse::Granted { record, .. }) if force => {
            (record.epoch, Some(super::witness::force_promote_warning(rv.shared.lock().record.as_ref(), &ctx.node)))
        }
        Ok(ArbiterResponse::Granted { record, .. }) => (record.epoch, None),
        Ok(ArbiterResponse::RetryAfter { wait_ms, record }) => {
            return Err(format!(
                "refused: the primary {}'s lease is still running ({wait_ms} ms left); it may be alive. \
                 Use `keel switchover` on the primary for a planned move, or --force",
                record.primary
            ))
        }
        Ok(ArbiterResponse::Refused { record, reason }) => {
            return Err(format!("refused by the witness: {reason} (record: {record:?})"));
        }
        Err(e) => {
            return Err(format!(
                "the witness is unreachable ({e}); refusing to promote without it: a node the witness does not name \
                 primary gets no lease and could not serve anyway. Bring the witness back (or replace it with a copy \
                 of its records) and retry"
            ))
        }
    };
    standby_promote(rv, new_epoch, if force { "operator forced promotion" } else { "operator promotion" }).await?;
    Ok(match warning {
        Some(w) => format!("{volume}: promoted to primary of epoch {new_epoch}. WARNING: {w}"),
        None => format!("{volume}: promoted to primary of epoch {new_epoch}"),
    })
}

/// Hands an operator's promotion to the standby loop and waits until it took effect.
async fn standby_promote(rv: &Arc<ReplVolume>, epoch: u64, reason: &str) -> Result<(), String> {
    rv.shared.lock().promote_to = Some((epoch, reason.to_string()));
    rv.notify();
    let deadline = Instant::now() + Duration::from_secs(30);
    while rv.role() != Role::Primary {
        if Instant::now() > deadline {
            return Err("the promotion did not take effect within 30 s; see the log".into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// `keel switchover VOLUME`: on the primary, a planned move with zero loss: writes pause,
/// everything is made durable here and on the standby, the witness hands the volume over
/// (the fence sends `Handover` once the standby acknowledged the last seq), the standby is
/// told to take over, and this node steps down. Returns a report with the write pause.
pub async fn switchover(ctx: &Arc<NodeCtx>, volume: &str) -> Result<(String, serde_json::Value), String> {
    let rv = ctx.volumes.get(volume).ok_or_else(|| format!("no replicated volume {volume:?} on this node"))?;
    {
        let shared = rv.shared.lock();
        if shared.state.role != Role::Primary {
            return Err(format!("{volume} is not primary on this node; run switchover on the primary"));
        }
        if !shared.peer_connected || shared.peer_state() != super::volume::PeerState::UpToDate {
            return Err(format!(
                "{volume}: the standby is not connected and up to date ({:?}); a switchover now would lose the service",
                shared.peer_state()
            ));
        }
    }
    let started = Instant::now();
    let epoch = rv.epoch();
    rv.events.emit(Some(volume), "switchover", json!({"state": "started", "epoch": epoch}));
    rv.shared.lock().paused = true;
    let drained = {
        let rv = Arc::clone(rv);
        tokio::task::spawn_blocking(move || {
            let seq = rv.volume.last_seq();
            rv.request_sync(seq);
            rv.volume.flush().map_err(|e| e.to_string())?;
            Ok::<u64, String>(seq)
        })
        .await
        .map_err(|e| format!("drain task failed: {e}"))?
    };
    let last_seq = match drained {
        Ok(seq) => seq,
        Err(e) => {
            rv.shared.lock().paused = false;
            rv.notify();
            return Err(format!("failed to flush before the handover: {e}"));
        }
    };
    {
        let mut shared = rv.shared.lock();
        shared.handover_requested = true;
        if let Some(fence) = shared.primary.as_mut() {
            fence.handle_handover_wanted(Instant::now(), last_seq);
        }
    }
    rv.notify();
    // The primary loop sees the grant, ships the handover and steps down.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (role, refused, new_epoch) = {
            let shared = rv.shared.lock();
            let refused = shared.primary.as_ref().and_then(|f| {
                let status = f.status();
                status.handover_seq.is_none().then_some(status.last_refusal).flatten()
            });
            (shared.state.role, refused, shared.record.as_ref().map(|r| r.epoch))
        };
        if role == Role::Standby {
            let pause = started.elapsed();
            let new_epoch = new_epoch.unwrap_or(epoch + 1);
            let details = json!({"new_primary": rv.config.peer, "epoch": new_epoch, "last_seq": last_seq, "write_pause_ms": pause.as_millis() as u64});
            rv.events.emit(Some(volume), "switchover", json!({"state": "done", "to": rv.config.peer, "epoch": new_epoch, "pause_ms": pause.as_millis() as u64}));
            return Ok((
                format!(
                    "{volume}: handed over to {} (epoch {new_epoch}) at seq {last_seq}; writes paused for {} ms here",
                    rv.config.peer,
                    pause.as_millis()
                ),
                details,
            ));
        }
        if let Some(reason) = refused {
            let mut shared = rv.shared.lock();
            shared.paused = false;
            shared.handover_requested = false;
            drop(shared);
            rv.notify();
            return Err(format!("the witness refused the handover: {reason}"));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{volume}: the handover did not complete within 30 s; writes stay paused until the witness answers (see keel status)"
            ));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The `keel witness` client: one QUIC connection, re-established on demand.
pub struct WitnessClient {
    endpoint: quinn::Endpoint,
    addr: SocketAddr,
    name: String,
    conn: tokio::sync::Mutex<Option<quinn::Connection>>,
}

impl WitnessClient {
    /// A client for the witness `name` at `addr`.
    pub fn new(identity: &Identity, addr: SocketAddr, name: &str) -> Result<Self, String> {
        let bind: SocketAddr = if addr.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().expect("valid address");
        let endpoint =
            quic::endpoint(bind, identity, &TransportConfig::default(), &[ALPN_WITNESS], vec![name.to_string()])
                .map_err(|e| format!("witness client endpoint: {e}"))?;
        Ok(Self { endpoint, addr, name: name.to_string(), conn: tokio::sync::Mutex::new(None) })
    }

    async fn call_once(&self, request: &ArbiterRequest) -> Result<ArbiterResponse, String> {
        let conn = {
            let mut slot = self.conn.lock().await;
            match slot.as_ref() {
                Some(conn) if conn.close_reason().is_none() => conn.clone(),
                _ => {
                    let conn = quic::connect(&self.endpoint, self.addr, &self.name)
                        .await
                        .map_err(|e| format!("connect to the witness {}: {e}", self.name))?;
                    *slot = Some(conn.clone());
                    conn
                }
            }
        };
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| format!("open a witness stream: {e}"))?;
        write_json(&mut send, FrameType::ArbiterRequest, request).await?;
        let _ = send.finish();
        read_json(&mut recv, FrameType::ArbiterResponse).await
    }
}

impl Arbiter for WitnessClient {
    fn call(
        &self,
        request: ArbiterRequest,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<ArbiterResponse, String>> + Send + '_>> {
        Box::pin(async move {
            let result = match tokio::time::timeout(WITNESS_CALL_TIMEOUT, self.call_once(&request)).await {
                Ok(result) => result,
                Err(_) => Err(format!("the witness did not answer within {WITNESS_CALL_TIMEOUT:?}")),
            };
            if result.is_err() {
                // The fence counts this request as failed: close its connection so the
                // witness can never act on it late (fence.rs, "Transport contract"); the
                // next call dials again.
                if let Some(conn) = self.conn.lock().await.take() {
                    conn.close(1u32.into(), b"request failed");
                }
            }
            result
        })
    }
}

/// Status of every replicated volume on the node.
pub fn status(ctx: &NodeCtx) -> serde_json::Value {
    let mut names: Vec<&String> = ctx.volumes.keys().collect();
    names.sort();
    json!({
        "node": ctx.node,
        "volumes": names.into_iter().map(|n| ctx.volumes[n].status_json()).collect::<Vec<_>>(),
    })
}

/// A registry slot so that the control socket can reach the node context.
pub type NodeHandle = Arc<Mutex<Option<Arc<NodeCtx>>>>;
