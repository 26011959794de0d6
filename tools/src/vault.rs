//! `keel vault --config FILE`: a vault server. It keeps each tenant's chunks and objects in
//! a [`LocalVault`] under its data directory and serves them to storage nodes over
//! mutual-TLS QUIC (`keel-vault/1`, docs/format-vault.md); nodes reach it with
//! `keel_snapshot::vault::RemoteVault`.
//!
//! # Who may open what
//!
//! A node is identified by the DNS name in its certificate (the cluster CA's). Only nodes
//! listed by some tenant pass the TLS handshake; a connection then opens one tenant with
//! `Hello`, and only a tenant that lists the node may be opened. Any other `Hello` is
//! answered with a `Refused` error naming the node and the tenant, logged, and the
//! connection is closed.
//!
//! # Tasks and bounds
//!
//! - One accept loop; one task per connection (at most [`MAX_CONNECTIONS`]); one task per
//!   request stream (at most QUIC's concurrent-stream limit per connection, 100).
//! - A request reserves its payload plus the largest answer its kind can get from a
//!   memory budget of [`MEMORY_BUDGET`] before its payload is read, so buffered requests
//!   and responses never exceed it; the storage work runs on the blocking pool.
//! - A request must arrive whole within [`REQUEST_READ_TIMEOUT`], a `Hello` within
//!   [`HELLO_TIMEOUT`] of the handshake. A request that finds no room in the budget for
//!   [`BUSY_TIMEOUT`] is answered `Unavailable` (the client retries later).
//! - A malformed frame gets a `BadRequest` error on its own stream; the connection and
//!   the other streams go on. Nothing read from the network is trusted before the frame
//!   checks of `keel_snapshot::vault::wire` pass.
//!
//! # Shutdown
//!
//! On SIGTERM or SIGINT: stop accepting connections and streams, let requests in flight
//! finish (at most [`DRAIN_TIMEOUT`]), close every connection with code 0 "vault shutting
//! down" (clients see `Unavailable` and reconnect later), and exit 0.

use std::collections::{BTreeSet, HashMap};
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use keel_net::quic::{self, Identity, TlsFiles, TransportConfig};
use keel_net::CancellationToken;
use keel_snapshot::vault::wire::{self, Direction, ErrorCode, Request, Response, WireError};
use keel_snapshot::vault::{keys, LocalVault};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::timeout;

/// Most connections served at once; more are refused until some close.
pub const MAX_CONNECTIONS: usize = 1024;
/// Bytes of requests and responses buffered at once, all connections together.
pub const MEMORY_BUDGET: usize = 1 << 30;
/// How long a request stream may take to deliver its whole frame.
pub const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(60);
/// How long after the handshake a connection has to send its `Hello`.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a request waits for room in the memory budget before it is answered
/// `Unavailable` ("busy; retry later").
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long shutdown waits for requests in flight.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a handler waits for the client to acknowledge its response before it lets the
/// stream go (so that shutdown does not cut answers off).
const ACK_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a refused connection stays open after its answer was acknowledged, for the
/// client to read the reason and close first (the answer may be lost if the server closes
/// before the client application has read it).
const REFUSED_LINGER: Duration = Duration::from_secs(2);
/// The memory budget's unit: permits are KiB, so the largest request fits a `u32` count.
const BUDGET_UNIT: usize = 1024;
const _: () = assert!(wire::MAX_PAYLOAD + wire::MAX_OBJECT_LEN < MEMORY_BUDGET);
const _: () = assert!(MEMORY_BUDGET / BUDGET_UNIT <= u32::MAX as usize);

/// The vault server's config file (TOML).
///
/// ```toml
/// listen = "0.0.0.0:7446"
/// data_dir = "/var/lib/keel-vault"
/// ca_cert = "/etc/keel/ca.pem"
/// cert = "/etc/keel/vault-1.pem"
/// key = "/etc/keel/vault-1.key"
///
/// [[tenant]]
/// name = "acme"
/// nodes = ["node-a", "node-b"]
/// ```
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaultConfig {
    /// UDP address to listen on (port 0: any free port, printed at start-up).
    pub listen: SocketAddr,
    /// Where the tenants' areas live (`DATA_DIR/<tenant>/`).
    pub data_dir: PathBuf,
    /// The cluster CA certificate (PEM).
    pub ca_cert: PathBuf,
    /// The vault's certificate (PEM); its DNS name is the name nodes connect to.
    pub cert: PathBuf,
    /// The vault's private key (PEM).
    pub key: PathBuf,
    /// The tenants and the nodes allowed to open each (at least one; checked by
    /// [`VaultConfig::validate`] for a clearer message than a missing-field error).
    #[serde(default, rename = "tenant")]
    pub tenants: Vec<TenantConfig>,
}

/// One `[[tenant]]` table.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// The tenant's name (a safe path component, at most 64 bytes).
    pub name: String,
    /// Node names (certificate DNS names) that may open this tenant.
    pub nodes: Vec<String>,
}

impl VaultConfig {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("failed to read config {}", path.display()))?;
        let config: Self = toml::from_str(&text).with_context(|| format!("invalid config {}", path.display()))?;
        config.validate().with_context(|| format!("invalid config {}", path.display()))?;
        Ok(config)
    }

    /// Writes the config as TOML.
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = toml::to_string_pretty(self)?;
        std::fs::write(path, text).with_context(|| format!("failed to write {}", path.display()))
    }

    /// Checks tenant and node names.
    pub fn validate(&self) -> Result<()> {
        if self.tenants.is_empty() {
            bail!("no [[tenant]]: add one with a name and the nodes that may open it");
        }
        let mut seen = BTreeSet::new();
        for tenant in &self.tenants {
            let name = &tenant.name;
            if name.contains('/') || name.len() > wire::MAX_TENANT_LEN || keys::check(name).is_err() {
                bail!(
                    "tenant {name:?}: invalid name (use up to {} of A-Z a-z 0-9 . _ - @ :, not starting with '.')",
                    wire::MAX_TENANT_LEN
                );
            }
            if !seen.insert(name) {
                bail!("tenant {name:?} is listed twice");
            }
            if tenant.nodes.is_empty() {
                bail!("tenant {name:?}: no nodes; list the node names that may open it");
            }
            for node in &tenant.nodes {
                quic::validate_node_name(node).with_context(|| format!("tenant {name:?}"))?;
            }
        }
        Ok(())
    }

    /// Every node some tenant lists: the peers the TLS handshake lets in.
    pub fn nodes(&self) -> Vec<String> {
        let nodes: BTreeSet<&String> = self.tenants.iter().flat_map(|t| &t.nodes).collect();
        nodes.into_iter().cloned().collect()
    }
}

/// Runs the vault server until SIGTERM/SIGINT.
pub fn run(config: &VaultConfig) -> Result<()> {
    config.validate()?;
    let identity = Identity::load(&TlsFiles {
        ca_cert: config.ca_cert.clone(),
        cert: config.cert.clone(),
        key: config.key.clone(),
    })
    .context("failed to load the vault's TLS identity")?;
    let mut tenants = HashMap::new();
    for tenant in &config.tenants {
        let vault = LocalVault::open(format!("{}/{}", identity.name(), tenant.name), &config.data_dir, &tenant.name)
            .with_context(|| format!("failed to open tenant {:?} under {}", tenant.name, config.data_dir.display()))?;
        tenants.insert(tenant.name.clone(), Tenant { nodes: tenant.nodes.clone(), vault: Arc::new(vault) });
    }
    let server = Arc::new(Server {
        name: identity.name().to_owned(),
        tenants,
        budget: Semaphore::new(MEMORY_BUDGET / BUDGET_UNIT),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("keel-vault")
        .build()
        .context("failed to start the async runtime")?;
    runtime.block_on(async {
        let allowed = config.nodes();
        let endpoint =
            quic::endpoint(config.listen, &identity, &TransportConfig::default(), &[wire::ALPN], allowed.clone())
                .with_context(|| format!("failed to listen on {}", config.listen))?;
        let addr = endpoint.local_addr().context("failed to read the listening address")?;
        // Scripts and tests read the port from this line when `listen` has port 0.
        println!("keel vault {} listening on {addr}", server.name);
        let _ = std::io::stdout().flush();
        tracing::info!(name = %server.name, listen = %addr, tenants = server.tenants.len(), "ready: vault serving");
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(serve(Arc::clone(&server), endpoint, allowed, shutdown.clone()));
        crate::daemon::wait_for_signal().await?;
        tracing::info!("vault shutting down");
        shutdown.cancel();
        task.await.context("the vault's accept loop panicked")?;
        tracing::info!("vault stopped");
        anyhow::Ok(())
    })
}

/// A tenant's area and who may open it.
struct Tenant {
    nodes: Vec<String>,
    vault: Arc<LocalVault>,
}

/// What every connection task shares.
struct Server {
    /// The vault's node name (its certificate's).
    name: String,
    tenants: HashMap<String, Tenant>,
    /// [`MEMORY_BUDGET`] in [`BUDGET_UNIT`]s.
    budget: Semaphore,
}

impl Server {
    /// The vault `peer` may open as `tenant`, or the reason it may not.
    fn open(&self, peer: &str, tenant: &str) -> Result<Arc<LocalVault>, String> {
        match self.tenants.get(tenant) {
            Some(t) if t.nodes.iter().any(|node| node == peer) => Ok(Arc::clone(&t.vault)),
            Some(t) => Err(format!(
                "node {peer:?} may not open tenant {tenant:?} on vault {} (it allows {})",
                self.name,
                t.nodes.join(", ")
            )),
            None => {
                Err(format!("node {peer:?} may not open tenant {tenant:?}: vault {} holds no such tenant", self.name))
            }
        }
    }
}

/// Accepts connections until `shutdown`, then drains them and closes the endpoint.
async fn serve(server: Arc<Server>, endpoint: quinn::Endpoint, allowed: Vec<String>, shutdown: CancellationToken) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                if connections.len() >= MAX_CONNECTIONS {
                    tracing::warn!(
                        "refused a connection from {}: already serving {MAX_CONNECTIONS} connections",
                        incoming.remote_address()
                    );
                    incoming.refuse();
                    continue;
                }
                connections.spawn(connection(Arc::clone(&server), incoming, allowed.clone(), shutdown.clone()));
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    let drained = timeout(DRAIN_TIMEOUT, async { while connections.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(
            "{} connections still busy after {DRAIN_TIMEOUT:?}; closing them with requests in flight",
            connections.len()
        );
        connections.abort_all();
    }
    endpoint.close(quinn::VarInt::from_u32(0), b"vault shutting down");
    let _ = timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
}

/// Serves one connection: admission, `Hello`, then one task per request stream.
async fn connection(server: Arc<Server>, incoming: quinn::Incoming, allowed: Vec<String>, shutdown: CancellationToken) {
    let addr = incoming.remote_address();
    let opened = tokio::select! {
        () = shutdown.cancelled() => return,
        opened = open(&server, incoming, &allowed) => opened,
    };
    // `quic::accept` and `open` logged any refusal.
    let Some((conn, peer, tenant, vault)) = opened else { return };
    tracing::debug!(%peer, %addr, %tenant, "tenant opened");
    let mut requests = JoinSet::new();
    let closed = loop {
        tokio::select! {
            () = shutdown.cancelled() => break false,
            stream = conn.accept_bi() => match stream {
                Ok((send, recv)) => {
                    let context = RequestContext {
                        server: Arc::clone(&server),
                        vault: Arc::clone(&vault),
                        peer: peer.clone(),
                        addr,
                        tenant: tenant.clone(),
                    };
                    requests.spawn(request(context, send, recv));
                }
                Err(e) => {
                    tracing::debug!(%peer, %addr, "connection ended: {e}");
                    break true;
                }
            },
            Some(_) = requests.join_next(), if !requests.is_empty() => {}
        }
    };
    // Bounded by the request timeouts and the accept loop's DRAIN_TIMEOUT.
    while requests.join_next().await.is_some() {}
    if !closed {
        conn.close(quinn::VarInt::from_u32(0), b"vault shutting down");
    }
}

/// Admits the peer and reads its `Hello`; `None` (logged) if either fails.
async fn open(
    server: &Server,
    incoming: quinn::Incoming,
    allowed: &[String],
) -> Option<(quinn::Connection, String, String, Arc<LocalVault>)> {
    let addr = incoming.remote_address();
    let (conn, peer) = quic::accept(incoming, allowed).await.ok()?;
    let (mut send, mut recv) = match timeout(HELLO_TIMEOUT, conn.accept_bi()).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            tracing::debug!(%peer, %addr, "connection ended before Hello: {e}");
            return None;
        }
        Err(_) => {
            tracing::warn!(%peer, %addr, "no Hello within {HELLO_TIMEOUT:?}; closing the connection");
            conn.close(quinn::VarInt::from_u32(quic::CLOSE_REFUSED), b"no Hello in time");
            return None;
        }
    };
    let hello = timeout(HELLO_TIMEOUT, async {
        let header = wire::read_header(&mut recv, Direction::Request).await?;
        if header.kind != wire::Kind::Hello {
            return Ok(None);
        }
        let payload = wire::read_payload(&mut recv, &header).await?;
        Request::decode(header.kind, payload).map(Some)
    })
    .await;
    let refusal = match hello {
        Ok(Ok(Some(Request::Hello { tenant }))) => match server.open(&peer, &tenant) {
            Ok(vault) => {
                answer(&mut send, &Response::HelloOk).await;
                return Some((conn, peer, tenant, vault));
            }
            Err(reason) => Response::error(ErrorCode::Refused, reason),
        },
        Ok(Ok(_)) => Response::error(ErrorCode::Refused, "the first request of a connection must be Hello"),
        Ok(Err(e)) => Response::error(ErrorCode::BadRequest, format!("bad Hello: {e}")),
        Err(_) => Response::error(ErrorCode::BadRequest, format!("no complete Hello within {HELLO_TIMEOUT:?}")),
    };
    if let Response::Error { message, .. } = &refusal {
        tracing::warn!(%peer, %addr, "refused: {message}");
    }
    let _ = recv.stop(quinn::VarInt::from_u32(0));
    answer(&mut send, &refusal).await;
    // Leave the closing to the client, which has read the reason by then; if it does not
    // close, close after a while.
    let _ = timeout(REFUSED_LINGER, conn.closed()).await;
    conn.close(quinn::VarInt::from_u32(quic::CLOSE_REFUSED), b"tenant refused");
    None
}

/// Who a request stream belongs to.
struct RequestContext {
    server: Arc<Server>,
    vault: Arc<LocalVault>,
    peer: String,
    addr: SocketAddr,
    tenant: String,
}

/// Serves one request stream: read and check the frame, run it, answer.
async fn request(context: RequestContext, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
    let RequestContext { server, vault, peer, addr, tenant } = context;
    let started = tokio::time::Instant::now();
    let read = async {
        let header = wire::read_header(&mut recv, Direction::Request).await.map_err(Refusal::Bad)?;
        // The budget is reserved before the payload is read: the header's length is bounded
        // by its kind, so the reservation is too.
        let bytes = header.payload_len + header.kind.response_bound();
        let permits = u32::try_from(bytes.div_ceil(BUDGET_UNIT)).unwrap_or(u32::MAX);
        let reservation =
            timeout(BUSY_TIMEOUT, server.budget.acquire_many(permits)).await.map_err(|_| Refusal::Busy)?;
        let payload = wire::read_payload(&mut recv, &header).await.map_err(Refusal::Bad)?;
        let request = Request::decode(header.kind, payload).map_err(Refusal::Bad)?;
        Ok::<_, Refusal>((request, reservation))
    };
    let read = async { timeout(REQUEST_READ_TIMEOUT, read).await.unwrap_or(Err(Refusal::Slow)) };
    // The reservation lives until the answer is written: it covers the response buffer too.
    let (frame, _reservation) = match read.await {
        Ok((request, reservation)) => {
            let op = request.kind();
            let vault = Arc::clone(&vault);
            let response = tokio::task::spawn_blocking(move || wire::handle(vault.as_ref(), request))
                .await
                .unwrap_or_else(|e| Response::error(ErrorCode::Storage, format!("request handler failed: {e}")));
            if let Response::Error { code, message } = &response {
                match code {
                    ErrorCode::Storage => tracing::warn!(%peer, %addr, %tenant, "failed to {op:?}: {message}"),
                    _ => tracing::debug!(%peer, %addr, %tenant, "{op:?}: {code:?}: {message}"),
                }
            }
            (encode(&response), Some(reservation))
        }
        Err(refusal) => {
            let response = match refusal {
                Refusal::Bad(e) => {
                    tracing::warn!(%peer, %addr, %tenant, "bad request, abandoning its stream: {e}");
                    Response::error(ErrorCode::BadRequest, e.to_string())
                }
                Refusal::Busy => {
                    tracing::warn!(%peer, %addr, %tenant, "busy: no memory for a request within {BUSY_TIMEOUT:?}");
                    Response::error(ErrorCode::Unavailable, format!("vault {} is busy; retry later", server.name))
                }
                Refusal::Slow => {
                    tracing::warn!(%peer, %addr, %tenant, "request not received within {:?}", started.elapsed());
                    Response::error(
                        ErrorCode::BadRequest,
                        format!("request not complete within {REQUEST_READ_TIMEOUT:?}"),
                    )
                }
            };
            let _ = recv.stop(quinn::VarInt::from_u32(0));
            (encode(&response), None)
        }
    };
    write_answer(&mut send, &frame).await;
}

/// Why a request stream is answered without running it.
enum Refusal {
    /// The frame is malformed.
    Bad(WireError),
    /// The memory budget stayed exhausted for [`BUSY_TIMEOUT`].
    Busy,
    /// The frame did not arrive whole within [`REQUEST_READ_TIMEOUT`].
    Slow,
}

/// The frame of `response`, or of a `Refused` error when it does not fit the protocol (a
/// listing too long for one frame).
fn encode(response: &Response) -> bytes::Bytes {
    response.encode().unwrap_or_else(|e| {
        let fallback = Response::error(ErrorCode::Refused, format!("the answer does not fit in a frame: {e}"));
        // An error response of at most MAX_ERROR_MESSAGE_LEN always encodes.
        fallback.encode().unwrap_or_default()
    })
}

async fn answer(send: &mut quinn::SendStream, response: &Response) {
    write_answer(send, &encode(response)).await;
}

/// Writes one response frame and finishes the stream, then waits (bounded) until the
/// client has it, so that closing the connection afterwards does not cut it off.
async fn write_answer(send: &mut quinn::SendStream, frame: &[u8]) {
    if send.write_all(frame).await.is_err() {
        // The client reset the stream or went away: nobody to answer.
        return;
    }
    let _ = send.finish();
    let _ = timeout(ACK_TIMEOUT, send.stopped()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(tenants: &str) -> Result<VaultConfig> {
        let text = format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"/tmp/v\"\nca_cert = \"ca.pem\"\ncert = \"v.pem\"\nkey = \"v.key\"\n{tenants}"
        );
        let config: VaultConfig = toml::from_str(&text)?;
        config.validate()?;
        Ok(config)
    }

    #[test]
    fn config_is_validated() {
        let ok = config("[[tenant]]\nname = \"acme\"\nnodes = [\"node-a\", \"node-b\"]\n[[tenant]]\nname = \"globex\"\nnodes = [\"node-c\", \"node-a\"]\n")
            .unwrap();
        assert_eq!(ok.nodes(), ["node-a", "node-b", "node-c"]);
        for (bad, expect) in [
            ("", "no [[tenant]]"),
            ("[[tenant]]\nname = \"../x\"\nnodes = [\"a\"]\n", "invalid name"),
            ("[[tenant]]\nname = \"a\"\nnodes = []\n", "no nodes"),
            ("[[tenant]]\nname = \"a\"\nnodes = [\"Node_A\"]\n", "invalid node name"),
            ("[[tenant]]\nname = \"a\"\nnodes = [\"n\"]\n[[tenant]]\nname = \"a\"\nnodes = [\"n\"]\n", "twice"),
            ("[[tenant]]\nname = \"a\"\nnodes = [\"n\"]\nquota = 1\n", "unknown field"),
        ] {
            let e = format!("{:#}", config(bad).unwrap_err());
            assert!(e.contains(expect), "{bad:?}: {e}");
        }
    }
}
