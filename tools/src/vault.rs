//! `keel vault --config FILE`: a vault server. It keeps each tenant's chunks and objects in
//! a [`LocalVault`] under its data directory and serves them to storage nodes over
//! mutual-TLS QUIC (`keel-vault/2`, and `keel-vault/1` for older nodes;
//! docs/format-vault.md); nodes reach it with `keel_snapshot::vault::RemoteVault`.
//!
//! # Durability
//!
//! Tenant areas are opened deferred ([`LocalVault::open_deferred`]): a chunk put is written
//! but not made durable, and a `Sync` from any connection makes every chunk the area
//! accepted so far durable with one batch ([`Vault::sync`]) instead of fsyncs per chunk.
//! Syncs of one area run one at a time (`TenantVault`). What `keel_snapshot::vault::wire::handle`
//! adds: a manifest is stored only after a sync, and a `keel-vault/1` connection gets a
//! sync after each chunk answer, as its protocol promised. A chunk that was put but never
//! synced stays pending until some later sync, or until a clean shutdown, which syncs every
//! area; a crash loses it. No manifest names such a chunk: every client syncs, and sees the
//! server's run (`HelloOk`) change, before it writes one.
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
//! down" (clients see `Unavailable` and reconnect later), sync every tenant's area, and
//! exit 0.

use std::collections::{BTreeSet, HashMap};
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use keel_net::quic::{self, Identity, TlsFiles, TransportConfig};
use keel_net::CancellationToken;
use keel_snapshot::vault::wire::{self, Direction, ErrorCode, Instance, Request, Response, Version, WireError};
use keel_snapshot::vault::{keys, ChunkEntry, LocalVault, ObjectEntry, Put, Vault, VaultError};
use keel_snapshot::ChunkId;
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
        let name = format!("{}/{}", identity.name(), tenant.name);
        let vault = LocalVault::open_deferred(name, &config.data_dir, &tenant.name)
            .with_context(|| format!("failed to open tenant {:?} under {}", tenant.name, config.data_dir.display()))?;
        tenants.insert(
            tenant.name.clone(),
            Tenant { nodes: tenant.nodes.clone(), vault: Arc::new(TenantVault::new(vault)) },
        );
    }
    let server = Arc::new(Server {
        name: identity.name().to_owned(),
        instance: Instance::random(),
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
            quic::endpoint(config.listen, &identity, &TransportConfig::default(), &wire::ALPNS, allowed.clone())
                .with_context(|| format!("failed to listen on {}", config.listen))?;
        let addr = endpoint.local_addr().context("failed to read the listening address")?;
        // Scripts and tests read the port from this line when `listen` has port 0.
        println!("keel vault {} listening on {addr}", server.name);
        let _ = std::io::stdout().flush();
        tracing::info!(
            name = %server.name,
            listen = %addr,
            tenants = server.tenants.len(),
            instance = %server.instance,
            "ready: vault serving"
        );
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(serve(Arc::clone(&server), endpoint, allowed, shutdown.clone()));
        let reclaim = tokio::spawn(reclaim_loop(Arc::clone(&server), shutdown.clone()));
        crate::daemon::wait_for_signal().await?;
        tracing::info!("vault shutting down");
        shutdown.cancel();
        task.await.context("the vault's accept loop panicked")?;
        reclaim.await.context("the vault's reclaim loop panicked")?;
        anyhow::Ok(())
    })?;
    // Chunks accepted but never synced would die with the process: keep them, so that
    // clients that retry after the restart need not send them again.
    let mut failed = 0;
    for (name, tenant) in &server.tenants {
        if let Err(e) = tenant.vault.sync() {
            tracing::error!(tenant = %name, "failed to sync pending chunks at shutdown: {e:#}");
            failed += 1;
        }
    }
    if failed > 0 {
        bail!("{failed} tenant areas could not be synced at shutdown (see the log)");
    }
    tracing::info!("vault stopped");
    Ok(())
}

/// A tenant's area and who may open it.
struct Tenant {
    nodes: Vec<String>,
    vault: Arc<TenantVault>,
}

/// A tenant's deferred [`LocalVault`], whose syncs run one at a time.
///
/// `Synced` promises that every chunk the area accepted before the `Sync` is durable,
/// including chunks that a sync already in progress took into its batch. A store whose
/// sync takes the batch and then makes it durable outside its lock (the file-per-chunk
/// store did) lets a second sync find no batch and return at once, before those chunks
/// are durable. Holding syncs one at a time here keeps the promise whatever the store
/// does, at no cost: a sync waits for the disk anyway.
#[derive(Debug)]
struct TenantVault {
    vault: LocalVault,
    /// Held for a whole sync (a syncfs or two: milliseconds to seconds), on a blocking
    /// thread, never across an await.
    sync: std::sync::Mutex<()>,
    /// Chunks removed (by clients' GC) since the last reclaim.
    removed: std::sync::atomic::AtomicU64,
}

impl TenantVault {
    fn new(vault: LocalVault) -> Self {
        Self { vault, sync: std::sync::Mutex::new(()), removed: std::sync::atomic::AtomicU64::new(0) }
    }

    /// Gives back the space of removed chunks ([`Vault::reclaim`]) if any were removed
    /// since the last call. Blocking.
    fn reclaim_if_removed(&self) {
        if self.removed.swap(0, std::sync::atomic::Ordering::AcqRel) == 0 {
            return;
        }
        match self.vault.reclaim() {
            Ok(bytes) => tracing::info!(tenant = %self.vault.name(), bytes, "reclaimed the space of removed chunks"),
            Err(e) => {
                tracing::warn!(tenant = %self.vault.name(), "reclaim failed (retried after the next removal): {e}")
            }
        }
    }
}

/// How often the server gives back the space of chunks its clients' GC removed. Clients'
/// `reclaim` is not part of keel-vault/2; the server does it itself, shortly after a GC.
const RECLAIM_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// Reclaims every tenant's removed chunks every [`RECLAIM_EVERY`] until `shutdown`.
async fn reclaim_loop(server: Arc<Server>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(RECLAIM_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let server = Arc::clone(&server);
        let _ = tokio::task::spawn_blocking(move || {
            for tenant in server.tenants.values() {
                tenant.vault.reclaim_if_removed();
            }
        })
        .await;
    }
}

impl Vault for TenantVault {
    fn name(&self) -> &str {
        self.vault.name()
    }

    fn put_chunk(&self, id: &ChunkId, frame: &[u8]) -> Result<Put, VaultError> {
        self.vault.put_chunk(id, frame)
    }

    fn sync(&self) -> Result<(), VaultError> {
        let _one_at_a_time = self.sync.lock().unwrap_or_else(|p| p.into_inner());
        self.vault.sync()
    }

    fn get_chunk(&self, id: &ChunkId) -> Result<Vec<u8>, VaultError> {
        self.vault.get_chunk(id)
    }

    fn has_chunk(&self, id: &ChunkId) -> Result<bool, VaultError> {
        self.vault.has_chunk(id)
    }

    fn has_chunks(&self, ids: &[ChunkId]) -> Result<Vec<bool>, VaultError> {
        self.vault.has_chunks(ids)
    }

    fn delete_chunk(&self, id: &ChunkId) -> Result<bool, VaultError> {
        let removed = self.vault.delete_chunk(id)?;
        if removed {
            self.removed.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        }
        Ok(removed)
    }

    fn list_chunks(&self, after: Option<&ChunkId>, limit: usize) -> Result<Vec<ChunkEntry>, VaultError> {
        self.vault.list_chunks(after, limit)
    }

    fn put_object(&self, key: &str, bytes: &[u8]) -> Result<(), VaultError> {
        self.vault.put_object(key, bytes)
    }

    fn get_object(&self, key: &str) -> Result<Vec<u8>, VaultError> {
        self.vault.get_object(key)
    }

    fn delete_object(&self, key: &str) -> Result<bool, VaultError> {
        self.vault.delete_object(key)
    }

    fn list_objects(&self, prefix: &str) -> Result<Vec<ObjectEntry>, VaultError> {
        self.vault.list_objects(prefix)
    }
}

/// What every connection task shares.
struct Server {
    /// The vault's node name (its certificate's).
    name: String,
    /// This run of the process, told to version-2 clients in `HelloOk`.
    instance: Instance,
    tenants: HashMap<String, Tenant>,
    /// [`MEMORY_BUDGET`] in [`BUDGET_UNIT`]s.
    budget: Semaphore,
}

impl Server {
    /// The vault `peer` may open as `tenant`, or the reason it may not.
    fn open(&self, peer: &str, tenant: &str) -> Result<Arc<TenantVault>, String> {
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
    let Some(Opened { conn, peer, tenant, vault, version }) = opened else { return };
    tracing::debug!(%peer, %addr, %tenant, ?version, "tenant opened");
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
                        version,
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

/// A connection whose tenant is open.
struct Opened {
    conn: quinn::Connection,
    peer: String,
    tenant: String,
    vault: Arc<TenantVault>,
    /// The protocol version the handshake chose.
    version: Version,
}

/// Admits the peer and reads its `Hello`; `None` (logged) if either fails.
async fn open(server: &Server, incoming: quinn::Incoming, allowed: &[String]) -> Option<Opened> {
    let addr = incoming.remote_address();
    let (conn, peer) = quic::accept(incoming, allowed).await.ok()?;
    // The endpoint accepts only `wire::ALPNS`, so the handshake chose one of them.
    let Some(version) = quic::alpn(&conn).and_then(|alpn| Version::from_alpn(&alpn)) else {
        tracing::warn!(%peer, %addr, "no keel-vault protocol version negotiated; closing the connection");
        conn.close(quinn::VarInt::from_u32(quic::CLOSE_REFUSED), b"no protocol version");
        return None;
    };
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
        let header = wire::read_header(&mut recv, Direction::Request, version).await?;
        if header.kind != wire::Kind::Hello {
            return Ok(None);
        }
        let payload = wire::read_payload(&mut recv, &header).await?;
        Request::decode(version, header.kind, payload).map(Some)
    })
    .await;
    let refusal = match hello {
        Ok(Ok(Some(Request::Hello { tenant }))) => match server.open(&peer, &tenant) {
            Ok(vault) => {
                let instance = (version >= Version::V2).then_some(server.instance);
                answer(&mut send, &Response::HelloOk { instance }, version).await;
                return Some(Opened { conn, peer, tenant, vault, version });
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
    answer(&mut send, &refusal, version).await;
    // Leave the closing to the client, which has read the reason by then; if it does not
    // close, close after a while.
    let _ = timeout(REFUSED_LINGER, conn.closed()).await;
    conn.close(quinn::VarInt::from_u32(quic::CLOSE_REFUSED), b"tenant refused");
    None
}

/// Who a request stream belongs to.
struct RequestContext {
    server: Arc<Server>,
    vault: Arc<TenantVault>,
    peer: String,
    addr: SocketAddr,
    tenant: String,
    /// The connection's protocol version.
    version: Version,
}

/// Serves one request stream: read and check the frame, run it, answer.
async fn request(context: RequestContext, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
    let RequestContext { server, vault, peer, addr, tenant, version } = context;
    let started = tokio::time::Instant::now();
    let read = async {
        let header = wire::read_header(&mut recv, Direction::Request, version).await.map_err(Refusal::Bad)?;
        // The budget is reserved before the payload is read: the header's length is bounded
        // by its kind, so the reservation is too.
        let bytes = header.payload_len + header.kind.response_bound();
        let permits = u32::try_from(bytes.div_ceil(BUDGET_UNIT)).unwrap_or(u32::MAX);
        let reservation =
            timeout(BUSY_TIMEOUT, server.budget.acquire_many(permits)).await.map_err(|_| Refusal::Busy)?;
        let payload = wire::read_payload(&mut recv, &header).await.map_err(Refusal::Bad)?;
        let request = Request::decode(version, header.kind, payload).map_err(Refusal::Bad)?;
        Ok::<_, Refusal>((request, reservation))
    };
    let read = async { timeout(REQUEST_READ_TIMEOUT, read).await.unwrap_or(Err(Refusal::Slow)) };
    // The reservation lives until the answer is written: it covers the response buffer too.
    let (frame, _reservation) = match read.await {
        Ok((request, reservation)) => {
            let op = request.kind();
            let vault = Arc::clone(&vault);
            let response = tokio::task::spawn_blocking(move || wire::handle(vault.as_ref(), version, request))
                .await
                .unwrap_or_else(|e| Response::error(ErrorCode::Storage, format!("request handler failed: {e}")));
            if let Response::Error { code, message } = &response {
                match code {
                    ErrorCode::Storage => tracing::warn!(%peer, %addr, %tenant, "failed to {op:?}: {message}"),
                    _ => tracing::debug!(%peer, %addr, %tenant, "{op:?}: {code:?}: {message}"),
                }
            }
            (encode(&response, version), Some(reservation))
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
            (encode(&response, version), None)
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

/// The frame of `response` in `version`, or of a `Refused` error when it does not fit the
/// protocol (a listing too long for one frame).
fn encode(response: &Response, version: Version) -> bytes::Bytes {
    response.encode(version).unwrap_or_else(|e| {
        let fallback = Response::error(ErrorCode::Refused, format!("the answer does not fit in a frame: {e}"));
        // An error response of at most MAX_ERROR_MESSAGE_LEN encodes in every version.
        fallback.encode(version).unwrap_or_default()
    })
}

async fn answer(send: &mut quinn::SendStream, response: &Response, version: Version) {
    write_answer(send, &encode(response, version)).await;
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

    /// Chunks a client's GC removed are given back by the server's next reclaim pass, and
    /// only then; a pass with nothing removed does nothing.
    #[test]
    fn removed_chunks_are_reclaimed_by_the_server() {
        let dir = tempfile::tempdir().unwrap();
        let tenant = TenantVault::new(LocalVault::open_deferred("v/acme", dir.path(), "acme").unwrap());
        let key = keel_snapshot::TenantKey::from_bytes([3; 32]);
        // 40 MiB of incompressible chunks: more than one pack (the pack being written is
        // reclaimed only once it is full).
        let ids: Vec<ChunkId> = (0..640u32)
            .map(|i| {
                // A cheap incompressible stream (xorshift), different for every chunk.
                let mut x = 0x9e37_79b9_7f4a_7c15_u64 ^ u64::from(i + 1);
                let data: Vec<u8> = (0..65536)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x as u8
                    })
                    .collect();
                let (id, frame) = keel_snapshot::encode_chunk(&key, &data, 3).unwrap();
                tenant.put_chunk(&id, &frame).unwrap();
                id
            })
            .collect();
        tenant.sync().unwrap();
        let before = tenant.vault.store().stats().unwrap();
        tenant.reclaim_if_removed();
        assert_eq!(tenant.vault.store().stats().unwrap().pack_bytes, before.pack_bytes, "nothing removed yet");
        for id in &ids {
            assert!(tenant.delete_chunk(id).unwrap());
        }
        assert!(tenant.vault.store().stats().unwrap().dead_bytes > 0);
        tenant.reclaim_if_removed();
        let after = tenant.vault.store().stats().unwrap();
        assert_eq!(after.chunks, 0, "{after:?}");
        assert!(after.pack_bytes < before.pack_bytes / 2, "{after:?} vs {before:?}");
    }

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
