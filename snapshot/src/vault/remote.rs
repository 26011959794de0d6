//! [`RemoteVault`]: a tenant's area on a `keel vault` server, reached over mutual-TLS QUIC
//! with the `keel-vault/1` protocol (docs/format-vault.md).
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

use std::fmt;
use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use keel_net::quic::{self, Identity, TransportConfig};
use tokio::sync::{Mutex, Semaphore};
use tokio::time::{timeout, timeout_at, Instant};

use super::wire::{self, Direction, ErrorCode, Request, Response, WireError};
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
            quic::endpoint(bind, &config.identity, &config.transport, &[wire::ALPN], Vec::new())
                .map_err(|e| io("create the QUIC endpoint", io::Error::other(e.to_string())))?
        };
        let hello = Request::Hello { tenant: config.tenant.clone() }
            .encode()
            .map_err(|e| io("encode Hello", io::Error::new(io::ErrorKind::InvalidInput, e.to_string())))?;
        let client = Client {
            address: config.address,
            server: config.server,
            tenant: config.tenant,
            hello,
            endpoint,
            connect_timeout: config.connect_timeout,
            request_timeout: config.request_timeout,
            slots: Semaphore::new(config.max_in_flight),
            link: Mutex::new(Link::default()),
        };
        Ok(Self { name, client: Arc::new(client), runtime: Some(runtime) })
    }

    /// The tenant this handle opens.
    pub fn tenant(&self) -> &str {
        &self.client.tenant
    }

    /// Sends `request` and returns the server's answer; an error response becomes the
    /// matching [`VaultError`], about `subject`.
    fn call(
        &self,
        op: &'static str,
        subject: Subject<'_>,
        request: Request,
        retry: Retry,
    ) -> Result<Response, VaultError> {
        let kind = request.kind();
        let frame = request.encode().map_err(|e| VaultError::Refused {
            vault: self.name.clone(),
            op: op.to_owned(),
            reason: format!("request does not fit the vault protocol: {e}"),
        })?;
        let client = Arc::clone(&self.client);
        let outcome = self
            .block_on(async move { client.call(frame, retry).await })
            .unwrap_or_else(|| Err(Failure::Unavailable("the vault client is shutting down".into())));
        match outcome {
            Ok(Response::Error { code, message }) => Err(self.server_error(op, subject, code, message)),
            Ok(response) if response.kind() == kind.answer() => Ok(response),
            Ok(response) => Err(self.failure(
                op,
                Failure::Protocol(format!("the server answered a {kind:?} request with {:?}", response.kind())),
            )),
            Err(failure) => Err(self.failure(op, failure)),
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

    fn put_chunk(&self, id: &ChunkId, frame: &[u8]) -> Result<Put, VaultError> {
        crate::check_frame(frame).map_err(|source| VaultError::BadChunk {
            vault: self.name.clone(),
            id: *id,
            source: Box::new(source),
        })?;
        let request = Request::PutChunk { id: *id, frame: Bytes::copy_from_slice(frame) };
        match self.call("put chunk", Subject::Chunk(id), request, Retry::Yes)? {
            Response::Stored(put) => Ok(put),
            other => Err(self.protocol("put chunk", format!("unexpected {:?}", other.kind()))),
        }
    }

    fn get_chunk(&self, id: &ChunkId) -> Result<Vec<u8>, VaultError> {
        match self.call("get chunk", Subject::Chunk(id), Request::GetChunk { id: *id }, Retry::Yes)? {
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
                Response::Present(flags) if flags.len() == batch.len() => present.extend(flags),
                Response::Present(flags) => {
                    return Err(
                        self.protocol("check chunks", format!("{} answers for {} chunk ids", flags.len(), batch.len()))
                    )
                }
                other => return Err(self.protocol("check chunks", format!("unexpected {:?}", other.kind()))),
            }
        }
        Ok(present)
    }

    fn delete_chunk(&self, id: &ChunkId) -> Result<bool, VaultError> {
        match self.call("delete chunk", Subject::Chunk(id), Request::DeleteChunk { id: *id }, Retry::No)? {
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
        let entries = match self.call("list chunks", Subject::None, request, Retry::Yes)? {
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
        match self.call("put object", Subject::Key(key), request, Retry::Yes)? {
            Response::ObjectStored => Ok(()),
            other => Err(self.protocol("put object", format!("unexpected {:?}", other.kind()))),
        }
    }

    fn get_object(&self, key: &str) -> Result<Vec<u8>, VaultError> {
        self.bad_key(key)?;
        match self.call("get object", Subject::Key(key), Request::GetObject { key: key.to_owned() }, Retry::Yes)? {
            Response::Object(bytes) => Ok(bytes.to_vec()),
            other => Err(self.protocol("get object", format!("unexpected {:?}", other.kind()))),
        }
    }

    fn delete_object(&self, key: &str) -> Result<bool, VaultError> {
        self.bad_key(key)?;
        match self.call("delete object", Subject::Key(key), Request::DeleteObject { key: key.to_owned() }, Retry::No)? {
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
        let entries = match self.call("list objects", Subject::None, request, Retry::Yes)? {
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
    /// The encoded `Hello { tenant }`.
    hello: Bytes,
    endpoint: quinn::Endpoint,
    connect_timeout: Duration,
    request_timeout: Duration,
    /// Bounds requests in flight (and so streams and buffers).
    slots: Semaphore,
    link: Mutex<Link>,
}

/// The shared connection, if any, and the last failure to make one.
#[derive(Default)]
struct Link {
    connection: Option<quinn::Connection>,
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
    async fn call(&self, frame: Bytes, retry: Retry) -> Result<Response, Failure> {
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
            let (connection, reused) = self.connection(deadline).await?;
            match timeout_at(deadline, exchange(&connection, &frame)).await {
                Err(_elapsed) => return Err(late()),
                Ok(Ok(response)) => return Ok(response),
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
    async fn connection(&self, deadline: Instant) -> Result<(quinn::Connection, bool), Failure> {
        let waiting_since = Instant::now();
        let late = || Failure::Unavailable(format!("no connection to {} at {} in time", self.server, self.address));
        let mut link = timeout_at(deadline, self.link.lock()).await.map_err(|_| late())?;
        if let Some(connection) = &link.connection {
            if connection.close_reason().is_none() {
                return Ok((connection.clone(), true));
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
            Ok(connection) => {
                link.connection = Some(connection.clone());
                link.last_failure = None;
                Ok((connection, false))
            }
            Err(failure) => {
                link.last_failure = Some((started, failure.clone()));
                Err(failure)
            }
        }
    }

    /// Dials the server and opens the tenant.
    async fn connect(&self) -> Result<quinn::Connection, Failure> {
        let connection = quic::connect(&self.endpoint, self.address, &self.server).await.map_err(connect_failure)?;
        let refused = |reason: String| {
            connection.close(quinn::VarInt::from_u32(0), b"tenant refused");
            Failure::Refused(reason)
        };
        match exchange(&connection, &self.hello).await {
            Ok(Response::HelloOk) => Ok(connection),
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
        if link.connection.as_ref().is_some_and(|current| current.stable_id() == connection.stable_id()) {
            link.connection = None;
        }
    }
}

/// One request on a new stream, one response back.
async fn exchange(connection: &quinn::Connection, frame: &Bytes) -> Result<Response, ExchangeError> {
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
    let header = wire::read_header(&mut recv, Direction::Response).await.map_err(|e| failed("read response", &e))?;
    let payload = wire::read_payload(&mut recv, &header).await.map_err(|e| failed("read response", &e))?;
    Response::decode(header.kind, payload).map_err(|e: WireError| ExchangeError::Protocol(e.to_string()))
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

    /// A server that opens only `tenant`, serving one request at a time per connection.
    struct TestServer {
        runtime: Option<tokio::runtime::Runtime>,
        addr: SocketAddr,
    }

    impl TestServer {
        fn start(certs: &Certs, bind: SocketAddr, root: &std::path::Path, tenant: &'static str) -> Self {
            let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
            let vault = Arc::new(LocalVault::open("test", root, tenant).unwrap());
            let identity = certs.identity(SERVER);
            let endpoint = {
                let _entered = runtime.enter();
                quic::endpoint(bind, &identity, &TransportConfig::default(), &[wire::ALPN], vec![CLIENT.into()])
                    .unwrap()
            };
            let addr = endpoint.local_addr().unwrap();
            runtime.spawn(async move {
                while let Some(incoming) = endpoint.accept().await {
                    tokio::spawn(serve_connection(incoming, Arc::clone(&vault), tenant));
                }
            });
            Self { runtime: Some(runtime), addr }
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

    async fn serve_connection(incoming: quinn::Incoming, vault: Arc<LocalVault>, tenant: &str) {
        let Ok((conn, _)) = quic::accept(incoming, &[CLIENT.to_owned()]).await else { return };
        let mut opened = false;
        while let Ok((mut send, mut recv)) = conn.accept_bi().await {
            let header = wire::read_header(&mut recv, Direction::Request).await.unwrap();
            let payload = wire::read_payload(&mut recv, &header).await.unwrap();
            let response = match Request::decode(header.kind, payload).unwrap() {
                Request::Hello { tenant: asked } if !opened && asked == tenant => {
                    opened = true;
                    Response::HelloOk
                }
                Request::Hello { tenant: asked } => {
                    Response::error(ErrorCode::Refused, format!("node {CLIENT:?} may not open tenant {asked:?}"))
                }
                request => {
                    let vault = Arc::clone(&vault);
                    tokio::task::spawn_blocking(move || wire::handle(vault.as_ref(), request)).await.unwrap()
                }
            };
            send.write_all(&response.encode().unwrap()).await.unwrap();
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
}
