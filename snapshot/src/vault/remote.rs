//! [`RemoteVault`]: a tenant's area on a `keel vault` server, reached over mutual-TLS QUIC
//! with the `keel-vault` protocol (docs/format-vault.md), version 2 or, with an older
//! server, version 1.
//!
//! # How a call runs
//!
//! 1. The calling thread checks what it can locally (the chunk frame, the object key, the
//!    sizes), encodes the request frame, hands it to the client's own tokio runtime (two
//!    worker threads) and blocks on a channel for the outcome. Nothing blocks inside the
//!    runtime, so calls work from plain threads and from another runtime's
//!    `spawn_blocking`.
//! 2. The request takes one of `max_in_flight` slots, then the shared connection. With no
//!    live connection, the one caller that holds the connection lock dials the server
//!    (at most `connect_timeout`: handshake, admission, then `Hello { tenant }` on the
//!    first stream); callers that queued behind a failed attempt get its error instead
//!    of dialling again, so N waiting callers never wait N timeouts.
//! 3. The request goes out on a fresh bidirectional stream; the response is the one frame
//!    the server sends back on it. The whole call has `request_timeout`.
//! 4. If the connection turns out dead (the server restarted or went away) and it was not
//!    new, the call is retried once on a new connection — except deletes, whose answer
//!    ("was it there?") a blind retry could get wrong.
//!
//! A server that is down gives [`VaultError::Unavailable`] after the QUIC idle timeout or
//! `connect_timeout`, whichever is first; a server that refuses (certificate, tenant)
//! gives [`VaultError::Refused`].
//!
//! # Durability
//!
//! A version-2 server may answer a `PutChunk` before the chunk is durable, and answers
//! `HasChunks` "present" for such pending chunks too; they become durable at the next
//! `Sync` of the tenant's area (from any client), and die with the server's process if it
//! crashes first. [`Vault::sync`] sends `Sync`. Because a connection lost to a restart is
//! replaced silently (step 4), the client also checks that the server's run
//! ([`wire::Instance`], in `HelloOk`) that answers the `Sync` is the one that gave every
//! chunk answer since the last sync; if not, the sync fails with
//! [`VaultError::Unavailable`], and the caller's retry uploads again what the new run
//! lacks. A handle reports such a restart to the first sync that sees it, then forgets it:
//! two uploads that share one handle across a server crash rely on checking their chunks
//! after their sync (as `maintain::copy_snapshot` does) for the second one to notice.
//!
//! A version-1 server makes every chunk durable before it answers, so a sync there is a
//! no-op and sends nothing (version 1 has no `Sync`).

use std::fmt;
use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::mpsc;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use bytes::Bytes;
use keel_net::quic::{self, Identity, TransportConfig};
use tokio::sync::{Mutex, Semaphore};
use tokio::time::{timeout, timeout_at, Instant};

use super::wire::{self, Direction, ErrorCode, Instance, Request, Response, Version, WireError};
use super::{keys, ChunkEntry, ObjectEntry, Put, Vault, VaultError};
use crate::error::ChunkError;
use crate::key::ChunkId;

/// Where a [`RemoteVault`] connects and as whom.
#[derive(Debug, Clone)]
pub struct RemoteVaultConfig {
    /// A short name for messages ("vault-b").
    pub name: String,
    /// The server's UDP address.
    pub address: SocketAddr,
    /// The server's node name: the DNS name its certificate must carry.
    pub server: String,
    /// The tenant whose area this handle opens.
    pub tenant: String,
    /// This node's TLS identity (cluster CA, certificate, key).
    pub identity: Identity,
    /// QUIC transport settings (idle timeout, keep-alive, windows).
    pub transport: TransportConfig,
    /// Longest wait for a connection (handshake, admission and `Hello`).
    pub connect_timeout: Duration,
    /// Longest wait for one call, connecting included.
    pub request_timeout: Duration,
    /// Most requests in flight at once; more callers wait for a slot.
    pub max_in_flight: usize,
}

impl RemoteVaultConfig {
    /// Default [`RemoteVaultConfig::connect_timeout`].
    pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
    /// Default [`RemoteVaultConfig::request_timeout`]: room for a 64 MiB object on a slow link.
    pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
    /// Default [`RemoteVaultConfig::max_in_flight`].
    pub const MAX_IN_FLIGHT: usize = 16;

    /// A config with the default transport, timeouts and concurrency.
    pub fn new(
        name: impl Into<String>,
        address: SocketAddr,
        server: impl Into<String>,
        tenant: impl Into<String>,
        identity: Identity,
    ) -> Self {
        Self {
            name: name.into(),
            address,
            server: server.into(),
            tenant: tenant.into(),
            identity,
            transport: TransportConfig::default(),
            connect_timeout: Self::CONNECT_TIMEOUT,
            request_timeout: Self::REQUEST_TIMEOUT,
            max_in_flight: Self::MAX_IN_FLIGHT,
        }
    }
}

/// One tenant's area on a `keel vault` server. Blocking, like every [`Vault`]; it owns a
/// small tokio runtime for the QUIC connection. See the module docs.
pub struct RemoteVault {
    name: String,
    client: Arc<Client>,
    /// The chunk answers not yet covered by a sync (see the module docs, "Durability").
    unsynced: StdMutex<Unsynced>,
    /// `Some` until dropped.
    runtime: Option<tokio::runtime::Runtime>,
}

impl RemoteVault {
    /// Creates the client: checks the config, starts the runtime and binds a UDP socket.
    /// It does not connect yet; the first call does.
    pub fn open(config: RemoteVaultConfig) -> Result<Self, VaultError> {
        let name = config.name.clone();
        let io = |op: &str, source| VaultError::Io { vault: name.clone(), op: op.to_owned(), source };
        if config.tenant.contains('/')
            || config.tenant.len() > wire::MAX_TENANT_LEN
            || keys::check(&config.tenant).is_err()
        {
            return Err(VaultError::BadKey { vault: name, key: config.tenant, reason: "not a valid tenant name" });
        }
        if config.max_in_flight == 0 || config.connect_timeout.is_zero() || config.request_timeout.is_zero() {
            let reason = "max_in_flight, connect_timeout and request_timeout must be non-zero";
            return Err(io("configure the vault client", io::Error::new(io::ErrorKind::InvalidInput, reason)));
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("keel-vault-client")
            .enable_all()
            .build()
            .map_err(|e| io("start the vault client runtime", e))?;
        let bind = match config.address {
            SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
            SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
        };
        let endpoint = {
            // The endpoint's driver is spawned on the runtime entered here.
            let _entered = runtime.enter();
            // No peer may connect to this endpoint: it only dials.
            quic::endpoint(bind, &config.identity, &config.transport, &wire::ALPNS, Vec::new())
                .map_err(|e| io("create the QUIC endpoint", io::Error::other(e.to_string())))?
        };
        let client = Client {
            address: config.address,
            server: config.server,
            tenant: config.tenant,
            endpoint,
            connect_timeout: config.connect_timeout,
            request_timeout: config.request_timeout,
            slots: Semaphore::new(config.max_in_flight),
            max_in_flight: config.max_in_flight,
            link: Mutex::new(Link::default()),
        };
        Ok(Self { name, client: Arc::new(client), unsynced: StdMutex::default(), runtime: Some(runtime) })
    }

    /// The tenant this handle opens.
    pub fn tenant(&self) -> &str {
        &self.client.tenant
    }

    /// Sends `request` and returns the server's answer and who gave it; an error response
    /// becomes the matching [`VaultError`], about `subject`.
    fn call(
        &self,
        op: &'static str,
        subject: Subject<'_>,
        request: Request,
        retry: Retry,
    ) -> Result<(Response, Peer), VaultError> {
        let kind = request.kind();
        // Encoded here, in the newest version, so that a request too large for the protocol
        // fails before any connection is made; `Client::call` re-encodes for an old server.
        let frame = request.encode(Version::CURRENT).map_err(|e| VaultError::Refused {
            vault: self.name.clone(),
            op: op.to_owned(),
            reason: format!("request does not fit the vault protocol: {e}"),
        })?;
        let client = Arc::clone(&self.client);
        let outcome = self
            .block_on(async move { client.call(request, frame, retry).await })
            .unwrap_or_else(|| Err(Failure::Unavailable("the vault client is shutting down".into())));
        match outcome {
            Ok((Response::Error { code, message }, _)) => Err(self.server_error(op, subject, code, message)),
            Ok((response, peer)) if response.kind() == kind.answer() => Ok((response, peer)),
            Ok((response, _)) => Err(self.failure(
                op,
                Failure::Protocol(format!("the server answered a {kind:?} request with {:?}", response.kind())),
            )),
            Err(failure) => Err(self.failure(op, failure)),
        }
    }

    /// Notes a chunk answer that `peer` may have given for a chunk it holds pending.
    fn relied_on(&self, peer: Peer) {
        if let Some(instance) = peer.instance {
            self.unsynced.lock().unwrap_or_else(|p| p.into_inner()).record(instance);
        }
    }

    /// The error of a sync that found the server restarted since it answered for chunks.
    fn restarted(&self, before: Option<Instance>, now: Option<Instance>) -> VaultError {
        let run =
            |instance: Option<Instance>| instance.map_or_else(|| "a version-1 server".into(), |i| format!("run {i}"));
        VaultError::Unavailable {
            vault: self.name.clone(),
            reason: format!(
                "{} at {} restarted ({} → {}) before the chunks it accepted since the last sync were made durable; \
                 they may be lost, so the upload must be done again",
                self.client.server,
                self.client.address,
                run(before),
                run(now)
            ),
        }
    }

    /// Runs `future` on the client's runtime and waits for it from this (non-runtime)
    /// thread; `None` if the runtime is gone.
    fn block_on<T: Send + 'static>(&self, future: impl Future<Output = T> + Send + 'static) -> Option<T> {
        let (sender, receiver) = mpsc::sync_channel(1);
        self.runtime.as_ref()?.spawn(async move {
            let _ = sender.send(future.await);
        });
        receiver.recv().ok()
    }

    fn server_error(&self, op: &'static str, subject: Subject<'_>, code: ErrorCode, message: String) -> VaultError {
        let vault = self.name.clone();
        match (code, subject) {
            (ErrorCode::NotFound, Subject::Chunk(id)) => VaultError::NotFound { vault, what: format!("chunk {id}") },
            (ErrorCode::NotFound, Subject::Key(key)) => VaultError::NotFound { vault, what: format!("object {key}") },
            (ErrorCode::BadChunk, Subject::Chunk(id)) => VaultError::BadChunk {
                vault,
                id: *id,
                source: Box::new(ChunkError::Corruption { what: "frame refused by the vault server" }),
            },
            (ErrorCode::BadKey, Subject::Key(key)) => {
                VaultError::BadKey { vault, key: key.to_owned(), reason: "refused by the vault server" }
            }
            (ErrorCode::Unavailable, _) => VaultError::Unavailable { vault, reason: message },
            (ErrorCode::Storage, _) => {
                VaultError::Io { vault, op: format!("{op} on the vault server"), source: io::Error::other(message) }
            }
            (ErrorCode::BadRequest, _) => VaultError::Refused {
                vault,
                op: op.to_owned(),
                reason: format!("the server could not parse the request: {message}"),
            },
            (_, _) => VaultError::Refused { vault, op: op.to_owned(), reason: message },
        }
    }

    fn failure(&self, op: &'static str, failure: Failure) -> VaultError {
        let vault = self.name.clone();
        match failure {
            Failure::Unavailable(reason) => VaultError::Unavailable { vault, reason },
            Failure::Refused(reason) => VaultError::Refused { vault, op: op.to_owned(), reason },
            Failure::Protocol(reason) => VaultError::Io {
                vault,
                op: op.to_owned(),
                source: io::Error::new(io::ErrorKind::InvalidData, format!("vault protocol error: {reason}")),
            },
        }
    }

    fn bad_key(&self, key: &str) -> Result<(), VaultError> {
        keys::check(key).map_err(|reason| VaultError::BadKey { vault: self.name.clone(), key: key.to_owned(), reason })
    }

    fn protocol(&self, op: &'static str, reason: String) -> VaultError {
        self.failure(op, Failure::Protocol(reason))
    }
}

impl fmt::Debug for RemoteVault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteVault")
            .field("name", &self.name)
            .field("server", &self.client.server)
            .field("address", &self.client.address)
            .field("tenant", &self.client.tenant)
            .finish_non_exhaustive()
    }
}

impl Drop for RemoteVault {
    fn drop(&mut self) {
        // Tell the server now rather than leave it to its idle timeout; bounded, because
        // drop must not hang on an unreachable server.
        let endpoint = self.client.endpoint.clone();
        let _ = self.block_on(async move {
            endpoint.close(quinn::VarInt::from_u32(0), b"vault client closed");
            let _ = timeout(Duration::from_millis(200), endpoint.wait_idle()).await;
        });
        if let Some(runtime) = self.runtime.take() {
            // Not `drop`: that panics when the last handle goes away inside an async context.
            runtime.shutdown_background();
        }
    }
}

impl Vault for RemoteVault {
    fn name(&self) -> &str {
        &self.name
    }

    /// As many as it may have in flight: more would queue for a slot, and the wait would
    /// count against the request timeout.
    fn reads_in_flight(&self) -> usize {
        self.client.max_in_flight
    }

    fn put_chunk(&self, id: &ChunkId, frame: &[u8]) -> Result<Put, VaultError> {
        crate::check_frame(frame).map_err(|source| VaultError::BadChunk {
            vault: self.name.clone(),
            id: *id,
            source: Box::new(source),
        })?;
        let request = Request::PutChunk { id: *id, frame: Bytes::copy_from_slice(frame) };
        match self.call("put chunk", Subject::Chunk(id), request, Retry::Yes)? {
            (Response::Stored(put), peer) => {
                // Written or already there: either way the chunk may be pending.
                self.relied_on(peer);
                Ok(put)
            }
            (other, _) => Err(self.protocol("put chunk", format!("unexpected {:?}", other.kind()))),
        }
    }

    /// Sends `Sync` (version 2) unless no chunk answer since the last sync needs it, and
    /// checks that the server's run that synced is the one that answered (module docs,
    /// "Durability"). A network failure, or a restart that may have lost chunks, is
    /// [`VaultError::Unavailable`]: the upload is to be retried.
    fn sync(&self) -> Result<(), VaultError> {
        let (upto, expected) = {
            let mut unsynced = self.unsynced.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((before, now)) = unsynced.restart.take() {
                return Err(self.restarted(Some(before), Some(now)));
            }
            if unsynced.answers == unsynced.settled {
                return Ok(());
            }
            (unsynced.answers, unsynced.instance)
        };
        let peer = match self.call("sync", Subject::None, Request::Sync, Retry::Yes)? {
            (Response::Synced, peer) => peer,
            (other, _) => return Err(self.protocol("sync", format!("unexpected {:?}", other.kind()))),
        };
        let mut unsynced = self.unsynced.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((before, now)) = unsynced.restart.take() {
            return Err(self.restarted(Some(before), Some(now)));
        }
        if peer.instance != expected {
            // Report it once: the next sync goes to the run that answered this one.
            unsynced.instance = peer.instance;
            return Err(self.restarted(expected, peer.instance));
        }
        unsynced.settled = unsynced.settled.max(upto);
        Ok(())
    }

    fn get_chunk(&self, id: &ChunkId) -> Result<Vec<u8>, VaultError> {
        match self.call("get chunk", Subject::Chunk(id), Request::GetChunk { id: *id }, Retry::Yes)?.0 {
            Response::Chunk(frame) => {
                // Key-less check: catches a server handing back garbage; the caller's
                // decode authenticates the rest.
                crate::check_frame(&frame).map_err(|source| VaultError::BadChunk {
                    vault: self.name.clone(),
                    id: *id,
                    source: Box::new(source),
                })?;
                Ok(frame.to_vec())
            }
            other => Err(self.protocol("get chunk", format!("unexpected {:?}", other.kind()))),
        }
    }

    fn has_chunk(&self, id: &ChunkId) -> Result<bool, VaultError> {
        Ok(self.has_chunks(std::slice::from_ref(id))?.first().copied().unwrap_or(false))
    }

    fn has_chunks(&self, ids: &[ChunkId]) -> Result<Vec<bool>, VaultError> {
        let mut present = Vec::with_capacity(ids.len());
        for batch in ids.chunks(wire::MAX_HAS_BATCH) {
            let request = Request::HasChunks { ids: batch.to_vec() };
            match self.call("check chunks", Subject::None, request, Retry::Yes)? {
                (Response::Present(flags), peer) if flags.len() == batch.len() => {
                    // "Present" may mean pending.
                    if flags.contains(&true) {
                        self.relied_on(peer);
                    }
                    present.extend(flags);
                }
                (Response::Present(flags), _) => {
                    return Err(
                        self.protocol("check chunks", format!("{} answers for {} chunk ids", flags.len(), batch.len()))
                    )
                }
                (other, _) => return Err(self.protocol("check chunks", format!("unexpected {:?}", other.kind()))),
            }
        }
        Ok(present)
    }

    fn delete_chunk(&self, id: &ChunkId) -> Result<bool, VaultError> {
        match self.call("delete chunk", Subject::Chunk(id), Request::DeleteChunk { id: *id }, Retry::No)?.0 {
            Response::Deleted(deleted) => Ok(deleted),
            other => Err(self.protocol("delete chunk", format!("unexpected {:?}", other.kind()))),
        }
    }

    fn list_chunks(&self, after: Option<&ChunkId>, limit: usize) -> Result<Vec<ChunkEntry>, VaultError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        // "Up to `limit`": a larger limit gets a shorter page, and the walk goes on from its
        // last id.
        let limit = u32::try_from(limit).unwrap_or(u32::MAX).min(wire::MAX_LIST_CHUNKS);
        let request = Request::ListChunks { after: after.copied(), limit };
        let entries = match self.call("list chunks", Subject::None, request, Retry::Yes)?.0 {
            Response::ChunkList(entries) => entries,
            other => return Err(self.protocol("list chunks", format!("unexpected {:?}", other.kind()))),
        };
        let ascending = entries.windows(2).all(|pair| matches!(pair, [a, b] if a.id < b.id));
        let after_ok = entries.first().is_none_or(|first| after.is_none_or(|after| first.id > *after));
        if entries.len() > limit as usize || !ascending || !after_ok {
            return Err(self.protocol(
                "list chunks",
                format!("the server's page of {} entries is not an ascending page after {after:?}", entries.len()),
            ));
        }
        Ok(entries)
    }

    fn put_object(&self, key: &str, bytes: &[u8]) -> Result<(), VaultError> {
        self.bad_key(key)?;
        if bytes.len() > wire::MAX_OBJECT_LEN {
            return Err(VaultError::Refused {
                vault: self.name.clone(),
                op: "put object".into(),
                reason: format!(
                    "object {key} of {} bytes exceeds the vault protocol's limit of {} bytes",
                    bytes.len(),
                    wire::MAX_OBJECT_LEN
                ),
            });
        }
        let request = Request::PutObject { key: key.to_owned(), bytes: Bytes::copy_from_slice(bytes) };
        match self.call("put object", Subject::Key(key), request, Retry::Yes)?.0 {
            Response::ObjectStored => Ok(()),
            other => Err(self.protocol("put object", format!("unexpected {:?}", other.kind()))),
        }
    }

    fn get_object(&self, key: &str) -> Result<Vec<u8>, VaultError> {
        self.bad_key(key)?;
        match self.call("get object", Subject::Key(key), Request::GetObject { key: key.to_owned() }, Retry::Yes)?.0 {
            Response::Object(bytes) => Ok(bytes.to_vec()),
            other => Err(self.protocol("get object", format!("unexpected {:?}", other.kind()))),
        }
    }

    fn delete_object(&self, key: &str) -> Result<bool, VaultError> {
        self.bad_key(key)?;
        match self.call("delete object", Subject::Key(key), Request::DeleteObject { key: key.to_owned() }, Retry::No)?.0
        {
            Response::Deleted(deleted) => Ok(deleted),
            other => Err(self.protocol("delete object", format!("unexpected {:?}", other.kind()))),
        }
    }

    fn list_objects(&self, prefix: &str) -> Result<Vec<ObjectEntry>, VaultError> {
        if prefix.len() > keys::MAX_KEY_LEN {
            // No key is that long.
            return Ok(Vec::new());
        }
        let request = Request::ListObjects { prefix: prefix.to_owned() };
        let entries = match self.call("list objects", Subject::None, request, Retry::Yes)?.0 {
            Response::ObjectList(entries) => entries,
            other => return Err(self.protocol("list objects", format!("unexpected {:?}", other.kind()))),
        };
        let ascending = entries.windows(2).all(|pair| matches!(pair, [a, b] if a.key < b.key));
        if !ascending || !entries.iter().all(|entry| entry.key.starts_with(prefix)) {
            return Err(self.protocol(
                "list objects",
                format!("the server's listing for prefix {prefix:?} is not sorted or has foreign keys"),
            ));
        }
        Ok(entries)
    }
}

/// What a request is about, to turn the server's error codes into precise errors.
#[derive(Debug, Clone, Copy)]
enum Subject<'a> {
    Chunk(&'a ChunkId),
    Key(&'a str),
    None,
}

/// The server at the other end of a connection: its version and (from version 2) its run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Peer {
    version: Version,
    instance: Option<Instance>,
}

/// Chunk answers of version-2 servers that a sync has not covered yet.
///
/// # Invariants
///
/// - `settled <= answers`; the answers numbered `settled + 1 ..= answers` are the window
///   the next `Sync` has to cover, and `instance` gave the latest of them.
/// - `restart` is `Some` only while the window holds answers from two runs.
#[derive(Debug, Default)]
struct Unsynced {
    /// Chunk answers recorded, ever.
    answers: u64,
    /// Answers up to this number are covered by a successful sync.
    settled: u64,
    /// The run that gave the latest answer.
    instance: Option<Instance>,
    /// The window's answers came from two runs `(before, now)`: those of `before` may be lost.
    restart: Option<(Instance, Instance)>,
}

impl Unsynced {
    fn record(&mut self, instance: Instance) {
        debug_assert!(self.settled <= self.answers);
        if self.answers > self.settled && self.restart.is_none() {
            if let Some(before) = self.instance.filter(|before| *before != instance) {
                self.restart = Some((before, instance));
            }
        }
        self.answers += 1;
        self.instance = Some(instance);
    }
}

/// Whether a call may be repeated on a new connection after its connection died.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retry {
    Yes,
    No,
}

/// Why a call got no answer from the server.
#[derive(Debug, Clone)]
enum Failure {
    /// Not reachable, connection lost, timed out: may pass.
    Unavailable(String),
    /// The server (or its certificate) refused this client.
    Refused(String),
    /// The server's bytes made no sense.
    Protocol(String),
}

/// The async half: the connection and the request slots, on the client's runtime.
struct Client {
    address: SocketAddr,
    server: String,
    tenant: String,
    endpoint: quinn::Endpoint,
    connect_timeout: Duration,
    request_timeout: Duration,
    /// Bounds requests in flight (and so streams and buffers).
    slots: Semaphore,
    /// The number of slots.
    max_in_flight: usize,
    link: Mutex<Link>,
}

/// The shared connection, if any, and the last failure to make one.
#[derive(Default)]
struct Link {
    connection: Option<(quinn::Connection, Peer)>,
    /// When the last failed connection attempt started, and why it failed.
    last_failure: Option<(Instant, Failure)>,
}

/// How one request/response exchange on a stream failed.
enum ExchangeError {
    /// The connection is gone: another connection may work.
    Connection(String),
    /// The stream or the response was bad.
    Protocol(String),
}

impl Client {
    /// Sends `request`, whose frame in [`Version::CURRENT`] is `frame`, and returns the
    /// answer and who gave it.
    async fn call(&self, request: Request, frame: Bytes, retry: Retry) -> Result<(Response, Peer), Failure> {
        let deadline = Instant::now() + self.request_timeout;
        let late = || {
            Failure::Unavailable(format!(
                "{} at {} did not answer within {:?}",
                self.server, self.address, self.request_timeout
            ))
        };
        let _slot = timeout_at(deadline, self.slots.acquire())
            .await
            .map_err(|_| late())?
            .map_err(|_| Failure::Unavailable("the vault client is shutting down".into()))?;
        let mut retried = false;
        loop {
            let ((connection, peer), reused) = self.connection(deadline).await?;
            let frame = if peer.version == Version::CURRENT {
                frame.clone()
            } else if matches!(request, Request::Sync) {
                // Version 1 has no Sync, and needs none: its chunks are durable once answered.
                return Ok((Response::Synced, peer));
            } else {
                request.encode(peer.version).map_err(|e| {
                    Failure::Refused(format!("request does not fit version {:?} of the protocol: {e}", peer.version))
                })?
            };
            match timeout_at(deadline, exchange(&connection, &frame, peer.version)).await {
                Err(_elapsed) => return Err(late()),
                Ok(Ok(response)) => return Ok((response, peer)),
                Ok(Err(ExchangeError::Protocol(reason))) => return Err(Failure::Protocol(reason)),
                Ok(Err(ExchangeError::Connection(reason))) => {
                    self.forget(&connection).await;
                    if reused && retry == Retry::Yes && !retried {
                        retried = true;
                        continue;
                    }
                    return Err(Failure::Unavailable(format!(
                        "connection to {} at {} lost: {reason}",
                        self.server, self.address
                    )));
                }
            }
        }
    }

    /// The live connection (and `true`), or a new one (and `false`).
    async fn connection(&self, deadline: Instant) -> Result<((quinn::Connection, Peer), bool), Failure> {
        let waiting_since = Instant::now();
        let late = || Failure::Unavailable(format!("no connection to {} at {} in time", self.server, self.address));
        let mut link = timeout_at(deadline, self.link.lock()).await.map_err(|_| late())?;
        if let Some((connection, peer)) = &link.connection {
            if connection.close_reason().is_none() {
                return Ok(((connection.clone(), *peer), true));
            }
            link.connection = None;
        }
        if let Some((started, failure)) = &link.last_failure {
            if *started >= waiting_since {
                return Err(failure.clone());
            }
        }
        let started = Instant::now();
        let connect_deadline = deadline.min(started + self.connect_timeout);
        let outcome = timeout_at(connect_deadline, self.connect()).await.unwrap_or_else(|_| {
            Err(Failure::Unavailable(format!(
                "could not connect to {} at {} within {:?}",
                self.server,
                self.address,
                connect_deadline - started
            )))
        });
        match outcome {
            Ok(connected) => {
                link.connection = Some(connected.clone());
                link.last_failure = None;
                Ok((connected, false))
            }
            Err(failure) => {
                link.last_failure = Some((started, failure.clone()));
                Err(failure)
            }
        }
    }

    /// Dials the server, settles the version (the ALPN the handshake chose) and opens the
    /// tenant.
    async fn connect(&self) -> Result<(quinn::Connection, Peer), Failure> {
        let connection = quic::connect(&self.endpoint, self.address, &self.server).await.map_err(connect_failure)?;
        let refused = |reason: String| {
            connection.close(quinn::VarInt::from_u32(0), b"tenant refused");
            Failure::Refused(reason)
        };
        let Some(version) = quic::alpn(&connection).and_then(|alpn| Version::from_alpn(&alpn)) else {
            return Err(refused("the handshake chose no keel-vault protocol version".into()));
        };
        let hello = Request::Hello { tenant: self.tenant.clone() }
            .encode(version)
            .map_err(|e| Failure::Refused(format!("cannot encode Hello: {e}")))?;
        match exchange(&connection, &hello, version).await {
            // The decoder gives an instance exactly from version 2 on.
            Ok(Response::HelloOk { instance }) => Ok((connection, Peer { version, instance })),
            Ok(Response::Error { code: ErrorCode::Unavailable, message }) => Err(Failure::Unavailable(message)),
            Ok(Response::Error { message, .. }) => Err(refused(message)),
            Ok(other) => Err(refused(format!("the server answered Hello with {:?}", other.kind()))),
            Err(ExchangeError::Connection(reason)) => Err(Failure::Unavailable(format!(
                "{} at {} closed the connection: {reason}",
                self.server, self.address
            ))),
            Err(ExchangeError::Protocol(reason)) => Err(refused(format!("Hello failed: {reason}"))),
        }
    }

    /// Drops `connection` if it is still the shared one.
    async fn forget(&self, connection: &quinn::Connection) {
        let mut link = self.link.lock().await;
        if link.connection.as_ref().is_some_and(|(current, _)| current.stable_id() == connection.stable_id()) {
            link.connection = None;
        }
    }
}

/// One request on a new stream, one response back, in the connection's `version`.
async fn exchange(connection: &quinn::Connection, frame: &Bytes, version: Version) -> Result<Response, ExchangeError> {
    let failed = |what: &str, error: &dyn fmt::Display| match connection.close_reason() {
        Some(reason) => ExchangeError::Connection(reason.to_string()),
        None => ExchangeError::Protocol(format!("{what}: {error}")),
    };
    let (mut send, mut recv) = connection.open_bi().await.map_err(|e| ExchangeError::Connection(e.to_string()))?;
    match send.write_all(frame).await {
        Ok(()) => {
            // Only fails if the stream was already reset, which the read below reports.
            let _ = send.finish();
        }
        Err(quinn::WriteError::ConnectionLost(e)) => return Err(ExchangeError::Connection(e.to_string())),
        // The server stopped reading (it refused the request); its answer says why.
        Err(_) => {}
    }
    let header =
        wire::read_header(&mut recv, Direction::Response, version).await.map_err(|e| failed("read response", &e))?;
    let payload = wire::read_payload(&mut recv, &header).await.map_err(|e| failed("read response", &e))?;
    Response::decode(version, header.kind, payload).map_err(|e: WireError| ExchangeError::Protocol(e.to_string()))
}

/// Sorts a failure to connect into "may pass" and "will not".
fn connect_failure(error: quic::Error) -> Failure {
    let reason = error.to_string();
    match error {
        quic::Error::Refused { .. } | quic::Error::StartConnect { .. } => Failure::Refused(reason),
        // A TLS failure in the handshake: the server's certificate is not what we trust,
        // or it rejected ours.
        quic::Error::Connect {
            error: quinn::ConnectionError::TransportError(_) | quinn::ConnectionError::ConnectionClosed(_),
            ..
        } => Failure::Refused(reason),
        _ => Failure::Unavailable(reason),
    }
}

#[cfg(test)]
mod tests {
    //! The client against a minimal in-process server (the real one, `keel vault`, is
    //! tested end to end in tests/it/remote_vault.rs).
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::time::Instant as StdInstant;

    use keel_net::quic::{create_ca, issue_cert, CA_VALIDITY, NODE_VALIDITY};

    use super::*;
    use crate::vault::LocalVault;
    use crate::{encode_chunk, TenantKey};

    const SERVER: &str = "vault-1";
    const CLIENT: &str = "node-a";

    struct Certs {
        dir: tempfile::TempDir,
    }

    impl Certs {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            create_ca(&dir.path().join("ca"), "test", CA_VALIDITY).unwrap();
            for node in [SERVER, CLIENT] {
                issue_cert(&dir.path().join("ca"), node, &dir.path().join(node), NODE_VALIDITY).unwrap();
            }
            Self { dir }
        }

        fn identity(&self, node: &str) -> Identity {
            Identity::load(&quic::TlsFiles::in_dir(&self.dir.path().join(node), node)).unwrap()
        }
    }

    /// A server that opens only `tenant`, serving one request at a time per connection:
    /// like `keel vault` (deferred chunk puts, both versions) with [`TestServer::start`], or
    /// like a server of before version 2 (immediate puts, version 1 only) with
    /// [`TestServer::start_v1`].
    struct TestServer {
        runtime: Option<tokio::runtime::Runtime>,
        addr: SocketAddr,
        /// Requests served, by kind.
        served: Arc<std::sync::Mutex<Vec<wire::Kind>>>,
    }

    impl TestServer {
        fn start(certs: &Certs, bind: SocketAddr, root: &std::path::Path, tenant: &'static str) -> Self {
            let vault = LocalVault::open_deferred("test", root, tenant).unwrap();
            Self::start_with(certs, bind, vault, tenant, &wire::ALPNS)
        }

        fn start_v1(certs: &Certs, bind: SocketAddr, root: &std::path::Path, tenant: &'static str) -> Self {
            let vault = LocalVault::open("test", root, tenant).unwrap();
            Self::start_with(certs, bind, vault, tenant, &[Version::V1.alpn()])
        }

        fn start_with(
            certs: &Certs,
            bind: SocketAddr,
            vault: LocalVault,
            tenant: &'static str,
            alpns: &[&[u8]],
        ) -> Self {
            let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
            let vault = Arc::new(vault);
            let identity = certs.identity(SERVER);
            // A killed server's socket is released in the background (`kill`): a restart on
            // its address may have to wait for it.
            let bound_by = StdInstant::now() + Duration::from_secs(10);
            let endpoint = loop {
                let _entered = runtime.enter();
                match quic::endpoint(bind, &identity, &TransportConfig::default(), alpns, vec![CLIENT.into()]) {
                    Ok(endpoint) => break endpoint,
                    Err(quic::Error::Bind { error, .. })
                        if error.kind() == io::ErrorKind::AddrInUse && StdInstant::now() < bound_by =>
                    {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => panic!("bind the test server on {bind}: {e}"),
                }
            };
            let addr = endpoint.local_addr().unwrap();
            let served = Arc::new(std::sync::Mutex::new(Vec::new()));
            let run = Run { vault, tenant, instance: Instance::random(), served: Arc::clone(&served) };
            runtime.spawn(async move {
                while let Some(incoming) = endpoint.accept().await {
                    tokio::spawn(serve_connection(incoming, run.clone()));
                }
            });
            Self { runtime: Some(runtime), addr, served }
        }

        fn served(&self) -> Vec<wire::Kind> {
            self.served.lock().unwrap().clone()
        }

        /// Stops the server as a crash would: no CONNECTION_CLOSE is sent.
        fn kill(&mut self) {
            if let Some(runtime) = self.runtime.take() {
                runtime.shutdown_background();
            }
        }
    }

    impl Drop for TestServer {
        fn drop(&mut self) {
            self.kill();
        }
    }

    /// What a test server's connections share.
    #[derive(Clone)]
    struct Run {
        vault: Arc<LocalVault>,
        tenant: &'static str,
        instance: Instance,
        served: Arc<std::sync::Mutex<Vec<wire::Kind>>>,
    }

    async fn serve_connection(incoming: quinn::Incoming, run: Run) {
        let Ok((conn, _)) = quic::accept(incoming, &[CLIENT.to_owned()]).await else { return };
        let version = Version::from_alpn(&quic::alpn(&conn).unwrap()).unwrap();
        let mut opened = false;
        while let Ok((mut send, mut recv)) = conn.accept_bi().await {
            let read = async {
                let header = wire::read_header(&mut recv, Direction::Request, version).await?;
                let payload = wire::read_payload(&mut recv, &header).await?;
                Request::decode(version, header.kind, payload)
            };
            let response = match read.await {
                Err(e) => Response::error(ErrorCode::BadRequest, e.to_string()),
                Ok(Request::Hello { tenant: asked }) if !opened && asked == run.tenant => {
                    opened = true;
                    Response::HelloOk { instance: (version >= Version::V2).then_some(run.instance) }
                }
                Ok(Request::Hello { tenant: asked }) => {
                    Response::error(ErrorCode::Refused, format!("node {CLIENT:?} may not open tenant {asked:?}"))
                }
                Ok(request) => {
                    run.served.lock().unwrap().push(request.kind());
                    let vault = Arc::clone(&run.vault);
                    tokio::task::spawn_blocking(move || wire::handle(vault.as_ref(), version, request)).await.unwrap()
                }
            };
            send.write_all(&response.encode(version).unwrap()).await.unwrap();
            send.finish().unwrap();
            let _ = send.stopped().await;
        }
    }

    fn client(certs: &Certs, addr: SocketAddr, tenant: &str) -> RemoteVault {
        RemoteVault::open(RemoteVaultConfig::new("remote", addr, SERVER, tenant, certs.identity(CLIENT))).unwrap()
    }

    fn loopback() -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
    }

    #[test]
    fn remote_round_trips_and_maps_errors() {
        let certs = Certs::new();
        let data = tempfile::tempdir().unwrap();
        let server = TestServer::start(&certs, loopback(), data.path(), "acme");
        let vault = client(&certs, server.addr, "acme");

        let key = TenantKey::from_bytes([5; 32]);
        let (id, frame) = encode_chunk(&key, b"remote chunk", 3).unwrap();
        assert_eq!(vault.put_chunk(&id, &frame).unwrap(), Put::Written);
        assert_eq!(vault.put_chunk(&id, &frame).unwrap(), Put::AlreadyPresent);
        vault.sync().unwrap();
        assert_eq!(vault.get_chunk(&id).unwrap(), frame);
        let other = ChunkId([9; 32]);
        assert_eq!(vault.has_chunks(&[id, other]).unwrap(), [true, false]);
        assert!(vault.has_chunk(&id).unwrap());
        assert!(
            matches!(vault.get_chunk(&other), Err(VaultError::NotFound { ref what, .. }) if what.contains("chunk"))
        );
        let listed = vault.list_chunks(None, 10).unwrap();
        assert_eq!(listed.iter().map(|e| e.id).collect::<Vec<_>>(), [id]);
        assert!(vault.list_chunks(Some(&id), 10).unwrap().is_empty());
        assert!(matches!(vault.put_chunk(&other, b"not a frame"), Err(VaultError::BadChunk { .. })));

        vault.put_object("snapshots/db/a.kman", b"a").unwrap();
        assert_eq!(vault.get_object("snapshots/db/a.kman").unwrap(), b"a");
        assert_eq!(vault.list_objects("snapshots/").unwrap().len(), 1);
        assert!(vault.delete_object("snapshots/db/a.kman").unwrap());
        assert!(vault.get_object("snapshots/db/a.kman").unwrap_err().is_not_found());
        assert!(matches!(vault.get_object("../x"), Err(VaultError::BadKey { .. })));
        assert!(vault.delete_chunk(&id).unwrap());

        let refused = client(&certs, server.addr, "globex");
        let e = refused.has_chunk(&id).unwrap_err();
        assert!(matches!(e, VaultError::Refused { ref reason, .. } if reason.contains("\"globex\"")), "{e}");
    }

    #[test]
    fn calls_run_in_parallel_from_threads_and_runtimes() {
        let certs = Certs::new();
        let data = tempfile::tempdir().unwrap();
        let server = TestServer::start(&certs, loopback(), data.path(), "acme");
        let vault = Arc::new(client(&certs, server.addr, "acme"));
        let key = TenantKey::from_bytes([6; 32]);
        std::thread::scope(|scope| {
            for thread in 0..4u8 {
                let vault = Arc::clone(&vault);
                let key = &key;
                scope.spawn(move || {
                    for i in 0..8u8 {
                        let (id, frame) = encode_chunk(key, &[thread, i], 3).unwrap();
                        vault.put_chunk(&id, &frame).unwrap();
                        vault.sync().unwrap();
                        assert_eq!(vault.get_chunk(&id).unwrap(), frame);
                    }
                });
            }
        });
        // From another runtime's blocking pool, and dropped there.
        let other = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let count = other.block_on(async move {
            tokio::task::spawn_blocking(move || {
                let vault = Arc::into_inner(vault).expect("the only handle");
                let count = vault.list_chunks(None, 100).unwrap().len();
                drop(vault);
                count
            })
            .await
            .unwrap()
        });
        assert_eq!(count, 32);
    }

    #[test]
    fn a_dead_server_is_unavailable_quickly_and_a_restarted_one_is_used_again() {
        let certs = Certs::new();
        let data = tempfile::tempdir().unwrap();
        let mut server = TestServer::start(&certs, loopback(), data.path(), "acme");
        let addr = server.addr;
        let vault = client(&certs, addr, "acme");
        vault.put_object("leases/gc", b"1").unwrap();

        server.kill();
        for _ in 0..2 {
            let started = StdInstant::now();
            let e = vault.get_object("leases/gc").unwrap_err();
            assert!(e.is_transient(), "{e}");
            assert!(started.elapsed() < Duration::from_secs(5), "took {:?}: {e}", started.elapsed());
        }

        let _server = TestServer::start(&certs, addr, data.path(), "acme");
        let deadline = StdInstant::now() + Duration::from_secs(20);
        loop {
            match vault.get_object("leases/gc") {
                Ok(bytes) => break assert_eq!(bytes, b"1"),
                Err(e) if e.is_transient() && StdInstant::now() < deadline => {}
                Err(e) => panic!("the restarted server is not used: {e}"),
            }
        }
    }

    #[test]
    fn nobody_listening_is_unavailable_within_the_connect_timeout() {
        let certs = Certs::new();
        let socket = std::net::UdpSocket::bind(loopback()).unwrap();
        let addr = socket.local_addr().unwrap();
        drop(socket);
        let vault = client(&certs, addr, "acme");
        let started = StdInstant::now();
        let e = vault.list_objects("").unwrap_err();
        assert!(e.is_transient(), "{e}");
        assert!(started.elapsed() <= RemoteVaultConfig::CONNECT_TIMEOUT + Duration::from_secs(1), "{e}");
    }

    /// A chunk put to a version-2 server is durable once `sync` returned: a server that
    /// crashes afterwards still has it. `sync` sends one `Sync`, and none when no chunk
    /// answer since the last one needs it.
    #[test]
    fn sync_makes_chunks_durable_on_a_deferring_server() {
        let certs = Certs::new();
        let data = tempfile::tempdir().unwrap();
        let mut server = TestServer::start(&certs, loopback(), data.path(), "acme");
        let addr = server.addr;
        let vault = client(&certs, addr, "acme");
        let key = TenantKey::from_bytes([7; 32]);
        let (id, frame) = encode_chunk(&key, b"durable after sync", 3).unwrap();
        vault.sync().unwrap();
        assert_eq!(vault.put_chunk(&id, &frame).unwrap(), Put::Written);
        assert!(vault.has_chunk(&id).unwrap());
        vault.sync().unwrap();
        vault.sync().unwrap();
        assert_eq!(server.served().iter().filter(|kind| **kind == wire::Kind::Sync).count(), 1);

        server.kill();
        let server = TestServer::start(&certs, addr, data.path(), "acme");
        let fresh = client(&certs, server.addr, "acme");
        assert_eq!(fresh.get_chunk(&id).unwrap(), frame);
    }

    /// Regression: a version-2 server that crashed between a put and the client's `Sync`
    /// lost the pending chunk, and the `Sync` — sent over a new connection to the restarted
    /// server, which had nothing pending — succeeded, so the caller would have written a
    /// manifest naming a chunk that was gone. The client now compares the server's run
    /// (`HelloOk`) that synced with the one that answered the put, and fails the sync
    /// (transient: the retried upload sends the chunk again).
    #[test]
    fn a_server_restart_before_sync_fails_the_sync() {
        let certs = Certs::new();
        let data = tempfile::tempdir().unwrap();
        let mut server = TestServer::start(&certs, loopback(), data.path(), "acme");
        let addr = server.addr;
        let vault = client(&certs, addr, "acme");
        let key = TenantKey::from_bytes([8; 32]);
        let (id, frame) = encode_chunk(&key, b"pending when the server died", 3).unwrap();
        assert_eq!(vault.put_chunk(&id, &frame).unwrap(), Put::Written);

        server.kill();
        let _server = TestServer::start(&certs, addr, data.path(), "acme");
        let deadline = StdInstant::now() + Duration::from_secs(20);
        let e = loop {
            match vault.sync() {
                Err(VaultError::Unavailable { reason, .. }) if reason.contains("restarted") => break reason,
                Err(e) if e.is_transient() && StdInstant::now() < deadline => {}
                other => panic!("the sync after the restart: {other:?}"),
            }
        };
        assert!(e.contains("may be lost"), "{e}");
        // The restart is reported once; the retry sends the chunk again (whether the crash
        // lost it is the store's business) and syncs.
        vault.put_chunk(&id, &frame).unwrap();
        vault.sync().unwrap();
        assert_eq!(vault.get_chunk(&id).unwrap(), frame);

        // A chunk answered "present" while pending counts too.
        let (other, other_frame) = encode_chunk(&key, b"another client's pending chunk", 3).unwrap();
        let second = client(&certs, addr, "acme");
        second.put_chunk(&other, &other_frame).unwrap();
        assert_eq!(vault.has_chunks(&[other]).unwrap(), [true]);
        drop(_server);
        let _server = TestServer::start(&certs, addr, data.path(), "acme");
        let deadline = StdInstant::now() + Duration::from_secs(20);
        loop {
            match vault.sync() {
                Err(VaultError::Unavailable { reason, .. }) if reason.contains("restarted") => break,
                Err(e) if e.is_transient() && StdInstant::now() < deadline => {}
                other => panic!("the sync after the second restart: {other:?}"),
            }
        }
    }

    /// A client of this version and a server of before version 2: the handshake settles
    /// on version 1, whose server makes every chunk durable before it answers, so `sync`
    /// sends nothing (that server would not understand `Sync`) and the chunk survives a
    /// crash all the same.
    #[test]
    fn an_old_server_is_spoken_to_in_version_one_without_sync() {
        let certs = Certs::new();
        let data = tempfile::tempdir().unwrap();
        let mut server = TestServer::start_v1(&certs, loopback(), data.path(), "acme");
        let addr = server.addr;
        let vault = client(&certs, addr, "acme");
        let key = TenantKey::from_bytes([9; 32]);
        let (id, frame) = encode_chunk(&key, b"version one", 3).unwrap();
        assert_eq!(vault.put_chunk(&id, &frame).unwrap(), Put::Written);
        assert_eq!(vault.get_chunk(&id).unwrap(), frame);
        vault.sync().unwrap();
        assert!(!server.served().contains(&wire::Kind::Sync), "{:?}", server.served());

        server.kill();
        let _server = TestServer::start_v1(&certs, addr, data.path(), "acme");
        let fresh = client(&certs, addr, "acme");
        assert_eq!(fresh.get_chunk(&id).unwrap(), frame);
    }
}
