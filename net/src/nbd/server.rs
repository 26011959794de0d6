//! The tokio driver: listeners, connections, and the I/O around the
//! `handshake` and `transmission` state machines.
//!
//! Per connection:
//! 1. the connection task runs the handshake (bounded by [`HANDSHAKE_TIMEOUT`]);
//! 2. it then becomes the *reader*: it reserves a request slot (at most
//!    [`REQUESTS_IN_FLIGHT_MAX`]) and, for READ/WRITE, payload bytes from a
//!    budget of [`BYTES_IN_FLIGHT_MAX`] *before* reading more from the socket,
//!    so an eager client is slowed by TCP backpressure instead of growing memory;
//! 3. each accepted request runs in its own task, which calls the export on
//!    the blocking pool and queues its reply;
//! 4. a single *writer* task drains the reply queue, writing each reply's
//!    header and payload back to back, so replies never interleave. The slot
//!    and byte reservations travel with the reply and are released only after
//!    it is written.
//!
//! On DISC, a protocol violation, client EOF or server shutdown the reader
//! stops, waits for the requests already in flight, lets the writer drain
//! (bounded by [`DRAIN_TIMEOUT`]) and closes.

use std::fmt;
use std::net::SocketAddr;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, info_span, warn, Instrument};

use crate::error::Error;
use crate::nbd::export::{Export, ExportError, ExportRegistry};
use crate::nbd::handshake::{Handshake, Session, Step};
use crate::nbd::proto::{errno, OptionHeader, RequestHeader};
use crate::nbd::transmission::{self, Command, ReplyBytes, Transmission};

/// Requests read but not yet answered, per connection (Linux uses up to 128
/// per connection, qemu 16, nbdcopy 64).
const REQUESTS_IN_FLIGHT_MAX: usize = 128;
/// READ/WRITE payload bytes held in memory per connection: two maximum-size
/// requests, or 256 of nbdcopy's 256 KiB ones.
const BYTES_IN_FLIGHT_MAX: usize = 64 * 1024 * 1024;
/// Open connections per listener; more are accepted and closed at once.
const CONNECTIONS_MAX: usize = 1024;
/// Payload bytes in flight across all connections of a listener: the per-connection budget
/// alone would let many clients that never read their replies pin 64 MiB each.
const SERVER_BYTES_IN_FLIGHT_MAX: usize = 1024 * 1024 * 1024;
/// Time a client gets from connecting to entering transmission.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);
/// Time the writer gets to send queued replies once the connection is ending.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause after a failed `accept` (e.g. EMFILE) so the loop does not spin.
const ACCEPT_RETRY_DELAY: Duration = Duration::from_millis(100);
/// Socket buffers for the reader and the writer.
const SOCKET_BUFFER_BYTES: usize = 64 * 1024;
/// WRITE payload buffers kept per connection for reuse once their export
/// call is done, and the largest buffer kept. An idle connection thus holds
/// at most 16 MiB; larger payloads (up to `PAYLOAD_MAX`) are freed as before.
const POOLED_BUFFERS_MAX: usize = 8;
const POOLED_BUFFER_BYTES_MAX: usize = 2 * 1024 * 1024;

const _: () = assert!(BYTES_IN_FLIGHT_MAX >= crate::nbd::PAYLOAD_MAX as usize);
const _: () = assert!(BYTES_IN_FLIGHT_MAX <= u32::MAX as usize);
const _: () = assert!(SERVER_BYTES_IN_FLIGHT_MAX >= BYTES_IN_FLIGHT_MAX);
const _: () = assert!(SERVER_BYTES_IN_FLIGHT_MAX <= u32::MAX as usize);

/// An NBD server: a registry of exports plus the listeners serving them.
///
/// Cloning is cheap and clones share the registry, so exports added after
/// `bind_*` are visible to every listener.
#[derive(Clone, Default)]
pub struct NbdServer {
    exports: Arc<ExportRegistry>,
    connection_ids: Arc<AtomicU64>,
}

impl NbdServer {
    /// Creates a server offering `exports`. Fails as [`NbdServer::add_export`] does.
    pub fn new(exports: Vec<Arc<dyn Export>>) -> Result<Self, Error> {
        let server = Self::default();
        for export in exports {
            server.add_export(export)?;
        }
        Ok(server)
    }

    /// Offers `export` to new connections. Fails if the name is taken or
    /// longer than 4096 bytes.
    pub fn add_export(&self, export: Arc<dyn Export>) -> Result<(), Error> {
        self.exports.insert(export)
    }

    /// Stops offering the export called `name` to new connections;
    /// connections already using it keep it. Returns the export if it existed.
    pub fn remove_export(&self, name: &str) -> Option<Arc<dyn Export>> {
        self.exports.remove(name)
    }

    /// Binds a TCP listener (port 0 picks a free port; see
    /// [`NbdListener::local_addr`]).
    pub async fn bind_tcp(&self, addr: SocketAddr) -> Result<NbdListener, Error> {
        let listener = TcpListener::bind(addr).await.map_err(|e| Error::io("bind TCP listener", e))?;
        Ok(self.listener(Listener::Tcp(listener)))
    }

    /// Binds a Unix socket at `path`, first removing a stale socket file
    /// there. Fails if a server is still listening on it, or if `path` is
    /// something other than a socket.
    pub async fn bind_unix(&self, path: &Path) -> Result<NbdListener, Error> {
        // Blocking std calls, but local and immediate (a stale socket
        // refuses the probe connection at once), and bind runs once.
        match std::fs::symlink_metadata(path) {
            Ok(metadata) if metadata.file_type().is_socket() => {
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    return Err(Error::io(
                        "bind unix socket (a server is already listening there)",
                        std::io::ErrorKind::AddrInUse.into(),
                    ));
                }
                std::fs::remove_file(path).map_err(|e| Error::io("remove stale unix socket", e))?;
            }
            Ok(_) => return Err(Error::NotASocket { path: path.to_owned() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("inspect unix socket path", e)),
        }
        let listener = UnixListener::bind(path).map_err(|e| Error::io("bind unix socket", e))?;
        Ok(self.listener(Listener::Unix(listener, path.to_owned())))
    }

    /// Serves TCP connections on `addr` until `shutdown` is cancelled.
    pub async fn serve_tcp(&self, addr: SocketAddr, shutdown: CancellationToken) -> Result<(), Error> {
        self.bind_tcp(addr).await?.serve(shutdown).await;
        Ok(())
    }

    /// Serves Unix-socket connections on `path` until `shutdown` is cancelled.
    pub async fn serve_unix(&self, path: &Path, shutdown: CancellationToken) -> Result<(), Error> {
        self.bind_unix(path).await?.serve(shutdown).await;
        Ok(())
    }

    fn listener(&self, listener: Listener) -> NbdListener {
        NbdListener { listener, exports: Arc::clone(&self.exports), connection_ids: Arc::clone(&self.connection_ids) }
    }
}

/// Where a listener is bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// A TCP address (with the real port when bound to port 0).
    Tcp(SocketAddr),
    /// A Unix socket path.
    Unix(PathBuf),
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(addr) => write!(f, "tcp:{addr}"),
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

/// A bound listener, not yet accepting. Call [`NbdListener::serve`].
pub struct NbdListener {
    listener: Listener,
    exports: Arc<ExportRegistry>,
    connection_ids: Arc<AtomicU64>,
}

impl NbdListener {
    /// The bound address.
    pub fn local_addr(&self) -> Result<ListenAddr, Error> {
        match &self.listener {
            Listener::Tcp(listener) => {
                listener.local_addr().map(ListenAddr::Tcp).map_err(|e| Error::io("get TCP listener address", e))
            }
            Listener::Unix(_, path) => Ok(ListenAddr::Unix(path.clone())),
        }
    }

    /// Accepts and serves connections until `shutdown` is cancelled, then
    /// stops accepting, lets each connection finish its in-flight requests,
    /// closes them, removes the Unix socket file, and returns.
    pub async fn serve(self, shutdown: CancellationToken) {
        let address = self.local_addr().map_or_else(|_| "unknown address".to_owned(), |addr| addr.to_string());
        info!(%address, "NBD server listening");
        let connections = TaskTracker::new();
        let connection_slots = Arc::new(Semaphore::new(CONNECTIONS_MAX));
        let server_budget = Arc::new(Semaphore::new(SERVER_BYTES_IN_FLIGHT_MAX));
        loop {
            let accepted = tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                accepted = accept(&self.listener) => accepted,
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    warn!(%address, "failed to {e:#}");
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(ACCEPT_RETRY_DELAY) => continue,
                    }
                }
            };
            let id = self.connection_ids.fetch_add(1, Ordering::Relaxed);
            let span = info_span!("nbd_connection", id, peer = %peer);
            let Ok(slot) = Arc::clone(&connection_slots).try_acquire_owned() else {
                span.in_scope(|| warn!("refusing connection: {CONNECTIONS_MAX} connections already open"));
                continue;
            };
            let exports = Arc::clone(&self.exports);
            let shutdown = shutdown.clone();
            let server_budget = Arc::clone(&server_budget);
            connections.spawn(
                async move {
                    match stream {
                        Stream::Tcp(stream) => run_connection(stream, exports, server_budget, shutdown).await,
                        Stream::Unix(stream) => run_connection(stream, exports, server_budget, shutdown).await,
                    }
                    drop(slot);
                }
                .instrument(span),
            );
        }
        info!(%address, "NBD server stopping: waiting for connections to finish");
        let socket_path = match self.listener {
            Listener::Unix(listener, path) => {
                drop(listener);
                Some(path)
            }
            Listener::Tcp(listener) => {
                drop(listener);
                None
            }
        };
        if let Some(path) = socket_path {
            if let Err(e) = std::fs::remove_file(&path) {
                warn!(path = %path.display(), "failed to remove unix socket: {e}");
            }
        }
        connections.close();
        connections.wait().await;
        info!(%address, "NBD server stopped");
    }
}

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// Who is on the other end, for log lines.
enum Peer {
    Tcp(SocketAddr),
    Unix { pid: Option<i32>, uid: Option<u32> },
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(addr) => write!(f, "{addr}"),
            Self::Unix { pid, uid } => {
                write!(f, "unix")?;
                if let Some(pid) = pid {
                    write!(f, " pid={pid}")?;
                }
                if let Some(uid) = uid {
                    write!(f, " uid={uid}")?;
                }
                Ok(())
            }
        }
    }
}

/// Accepts one connection. Cancel-safe (tokio's `accept` is).
async fn accept(listener: &Listener) -> Result<(Stream, Peer), Error> {
    match listener {
        Listener::Tcp(listener) => {
            let (stream, addr) = listener.accept().await.map_err(|e| Error::io("accept TCP connection", e))?;
            // NBD requests are small and latency-bound; the spec says both
            // ends SHOULD set TCP_NODELAY.
            if let Err(e) = stream.set_nodelay(true) {
                warn!(peer = %addr, "failed to set TCP_NODELAY: {e}");
            }
            Ok((Stream::Tcp(stream), Peer::Tcp(addr)))
        }
        Listener::Unix(listener, _) => {
            let (stream, _) = listener.accept().await.map_err(|e| Error::io("accept unix connection", e))?;
            let peer = match stream.peer_cred() {
                Ok(cred) => Peer::Unix { pid: cred.pid(), uid: Some(cred.uid()) },
                Err(_) => Peer::Unix { pid: None, uid: None },
            };
            Ok((Stream::Unix(stream), peer))
        }
    }
}

/// Runs one connection to completion. Never panics on peer input; every way
/// out is logged once, here, in the connection's span.
async fn run_connection<S>(
    mut stream: S,
    exports: Arc<ExportRegistry>,
    server_budget: Arc<Semaphore>,
    shutdown: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    debug!("connection accepted");
    let negotiated = tokio::select! {
        () = shutdown.cancelled() => {
            info!("closing connection during handshake: server shutting down");
            return;
        }
        result = tokio::time::timeout(HANDSHAKE_TIMEOUT, negotiate(&mut stream, exports)) => result,
    };
    let session = match negotiated {
        Ok(Ok(Some(session))) => session,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            warn!("closing connection during handshake: {e:#}");
            return;
        }
        Err(_) => {
            warn!("closing connection: handshake not finished within {HANDSHAKE_TIMEOUT:?}");
            return;
        }
    };
    info!(
        export = session.export.name(),
        structured_replies = session.structured_replies,
        base_allocation = session.base_allocation_id.is_some(),
        "entered transmission"
    );
    transmit(stream, session, server_budget, shutdown).await;
}

/// Drives the handshake. `Ok(None)` means it ended without transmission
/// (ABORT, or a refusal that can only be a close); the reason is logged here.
async fn negotiate<S>(stream: &mut S, exports: Arc<ExportRegistry>) -> Result<Option<Session>, Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut handshake = Handshake::new(exports);
    stream.write_all(&Handshake::greeting()).await.map_err(|e| Error::io("send greeting", e))?;
    let mut client_flags = [0u8; 4];
    stream.read_exact(&mut client_flags).await.map_err(|e| Error::io("read client flags", e))?;
    handshake.handle_client_flags(client_flags)?;
    let mut header = [0u8; OptionHeader::LEN];
    let mut data = Vec::new();
    loop {
        stream.read_exact(&mut header).await.map_err(|e| Error::io("read option header", e))?;
        let option_header = handshake.handle_option_header(&header)?;
        // Bounded by OPTION_DATA_LEN_MAX in handle_option_header.
        data.resize(option_header.data_len as usize, 0);
        stream.read_exact(&mut data).await.map_err(|e| Error::io("read option data", e))?;
        match handshake.handle_option(option_header.option, &data) {
            Step::Reply(reply) => stream.write_all(&reply).await.map_err(|e| Error::io("send option reply", e))?,
            Step::Close { reply, reason } => {
                // After ABORT the client may close without reading the ACK.
                if let Err(e) = stream.write_all(&reply).await {
                    debug!("failed to send final option reply: {e}");
                }
                info!("closing connection during handshake: {reason}");
                return Ok(None);
            }
            Step::Transmission { reply, session } => {
                stream.write_all(&reply).await.map_err(|e| Error::io("send final option reply", e))?;
                return Ok(Some(session));
            }
        }
    }
}

/// A reply waiting for the writer, with the reservations it releases once written.
struct QueuedReply {
    bytes: ReplyBytes,
    _slot: OwnedSemaphorePermit,
    _budget: Option<Budget>,
}

/// Why the reader stopped.
enum ReaderEnd {
    ClientClosed,
    Disconnect,
    Shutdown,
    WriterFailed,
    /// Protocol violation or read error.
    Failed(Error),
}

/// Shared by the reader and the request tasks of one connection.
struct Connection {
    export: Arc<dyn Export>,
    transmission: Transmission,
    replies: mpsc::Sender<QueuedReply>,
    request_slots: Arc<Semaphore>,
    byte_budget: Arc<Semaphore>,
    /// Shared by every connection of the listener (see [`SERVER_BYTES_IN_FLIGHT_MAX`]).
    server_budget: Arc<Semaphore>,
    payload_buffers: Arc<BufferPool>,
    requests: TaskTracker,
}

/// Reusable WRITE payload buffers (see [`POOLED_BUFFERS_MAX`]), so a stream
/// of WRITEs does not allocate and fault in a fresh buffer per request.
/// Pooled buffers are empty; their contents are never read before being
/// overwritten from the socket.
#[derive(Default)]
struct BufferPool(Mutex<Vec<BytesMut>>);

impl BufferPool {
    /// An empty buffer with capacity for at least `len` bytes: the smallest
    /// pooled one that fits, else a new one.
    fn take(&self, len: usize) -> BytesMut {
        let pooled = {
            let mut buffers = self.0.lock();
            let fitting = buffers
                .iter()
                .enumerate()
                .filter(|(_, buffer)| buffer.capacity() >= len)
                .min_by_key(|(_, buffer)| buffer.capacity())
                .map(|(index, _)| index);
            fitting.map(|index| buffers.swap_remove(index))
        };
        pooled.unwrap_or_else(|| BytesMut::with_capacity(len))
    }

    /// Returns `buffer` for reuse if it is small enough, evicting the
    /// smallest pooled buffer when full so the pool keeps the larger ones.
    fn give(&self, mut buffer: BytesMut) {
        let capacity = buffer.capacity();
        if capacity == 0 || capacity > POOLED_BUFFER_BYTES_MAX {
            return;
        }
        buffer.clear();
        let mut buffers = self.0.lock();
        if buffers.len() < POOLED_BUFFERS_MAX {
            buffers.push(buffer);
            return;
        }
        let evicted = buffers
            .iter_mut()
            .filter(|pooled| pooled.capacity() < capacity)
            .min_by_key(|pooled| pooled.capacity())
            .map(|smallest| std::mem::replace(smallest, buffer));
        drop(buffers);
        drop(evicted); // freed outside the lock
    }
}

async fn transmit<S>(stream: S, session: Session, server_budget: Arc<Semaphore>, shutdown: CancellationToken)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (reader, writer) = tokio::io::split(stream);
    let mut reader = BufReader::with_capacity(SOCKET_BUFFER_BYTES, reader);
    // Every queued reply holds a request slot, so at most
    // REQUESTS_IN_FLIGHT_MAX replies exist and `send` never waits.
    let (replies, replies_rx) = mpsc::channel(REQUESTS_IN_FLIGHT_MAX);
    let writer_failed = CancellationToken::new();
    let mut writer =
        tokio::spawn(write_replies(writer, replies_rx, writer_failed.clone()).instrument(tracing::Span::current()));
    let connection = Connection {
        transmission: Transmission::new(&session),
        export: session.export,
        replies,
        request_slots: Arc::new(Semaphore::new(REQUESTS_IN_FLIGHT_MAX)),
        byte_budget: Arc::new(Semaphore::new(BYTES_IN_FLIGHT_MAX)),
        server_budget,
        payload_buffers: Arc::default(),
        requests: TaskTracker::new(),
    };

    let end = read_requests(&connection, &mut reader, &shutdown, &writer_failed).await;
    match &end {
        ReaderEnd::ClientClosed => info!("client closed the connection"),
        ReaderEnd::Disconnect => info!("client sent DISC; finishing in-flight requests"),
        ReaderEnd::Shutdown => info!("server shutting down; finishing in-flight requests"),
        ReaderEnd::WriterFailed => warn!("closing connection: cannot send replies"),
        ReaderEnd::Failed(e) => warn!("closing connection: {e:#}"),
    }
    let Connection { replies, requests, .. } = connection;
    requests.close();
    requests.wait().await;
    drop(replies);
    drop(reader);
    match tokio::time::timeout(DRAIN_TIMEOUT, &mut writer).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => error!("reply writer task failed: {e}"),
        Err(_) => {
            warn!("client did not read its replies within {DRAIN_TIMEOUT:?}; dropping them");
            writer.abort();
        }
    }
    debug!("connection closed");
}

/// The reader loop. Returns when the connection must stop reading.
async fn read_requests<R>(
    connection: &Connection,
    reader: &mut R,
    shutdown: &CancellationToken,
    writer_failed: &CancellationToken,
) -> ReaderEnd
where
    R: AsyncRead + Unpin,
{
    let mut header_bytes = [0u8; RequestHeader::LEN];
    loop {
        // Reserve before reading: a client at the limit is not read from.
        let slot = tokio::select! {
            biased;
            () = shutdown.cancelled() => return ReaderEnd::Shutdown,
            () = writer_failed.cancelled() => return ReaderEnd::WriterFailed,
            slot = Arc::clone(&connection.request_slots).acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => return ReaderEnd::Shutdown, // never closed; treat as shutdown
            },
        };
        // Not cancel-safe, but on shutdown the partial header is abandoned anyway.
        let read = tokio::select! {
            biased;
            () = shutdown.cancelled() => return ReaderEnd::Shutdown,
            () = writer_failed.cancelled() => return ReaderEnd::WriterFailed,
            read = read_header(reader, &mut header_bytes) => read,
        };
        match read {
            Ok(true) => {}
            Ok(false) => return ReaderEnd::ClientClosed,
            Err(e) => return ReaderEnd::Failed(e),
        }
        let header = match RequestHeader::decode(&header_bytes) {
            Ok(header) => header,
            Err(e) => return ReaderEnd::Failed(e),
        };
        let payload_len = match transmission::write_payload_len(&header) {
            Ok(len) => len,
            Err(e) => return ReaderEnd::Failed(e),
        };
        let command = match connection.transmission.validate(&header) {
            Ok(Command::Disconnect) => return ReaderEnd::Disconnect,
            Ok(command) => command,
            Err(rejection) => {
                debug!(
                    cookie = header.cookie,
                    command = header.command,
                    errno = rejection.errno,
                    "rejecting request: {}",
                    rejection.message
                );
                // A rejected WRITE still has its payload on the wire.
                let discarded = tokio::select! {
                    biased;
                    () = shutdown.cancelled() => return ReaderEnd::Shutdown,
                    discarded = discard(reader, payload_len) => discarded,
                };
                if let Err(e) = discarded {
                    return ReaderEnd::Failed(e);
                }
                let bytes = connection.transmission.encode_error(header.cookie, rejection.errno, rejection.message);
                if queue(connection, bytes, slot, None).await.is_err() {
                    return ReaderEnd::WriterFailed;
                }
                continue;
            }
        };
        let buffer_len = match command {
            Command::Read { length, .. } | Command::Write { length, .. } => length,
            _ => 0,
        };
        let budget = if buffer_len > 0 {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return ReaderEnd::Shutdown,
                () = writer_failed.cancelled() => return ReaderEnd::WriterFailed,
                // buffer_len ≤ PAYLOAD_MAX ≤ BYTES_IN_FLIGHT_MAX, so this can succeed.
                permits = acquire_budget(connection, buffer_len) => match permits {
                    Ok(permits) => Some(permits),
                    Err(_) => return ReaderEnd::Shutdown,
                },
            }
        } else {
            None
        };
        let mut payload = BytesMut::new();
        if let Command::Write { length, .. } = command {
            let length = length as usize;
            payload = connection.payload_buffers.take(length);
            let read = tokio::select! {
                biased;
                () = shutdown.cancelled() => return ReaderEnd::Shutdown,
                read = read_payload(reader, &mut payload, length) => read,
            };
            if let Err(e) = read {
                return ReaderEnd::Failed(Error::io("read WRITE payload", e));
            }
        }
        if command == Command::Nothing {
            let bytes = connection.transmission.encode_done(header.cookie, header.command);
            if queue(connection, bytes, slot, budget).await.is_err() {
                return ReaderEnd::WriterFailed;
            }
            continue;
        }
        let export = Arc::clone(&connection.export);
        let transmission = connection.transmission;
        let replies = connection.replies.clone();
        let buffers = Arc::clone(&connection.payload_buffers);
        connection.requests.spawn(
            async move {
                let bytes = execute(export, transmission, &header, command, payload, buffers).await;
                // Fails only if the writer is gone, which the reader notices.
                let _ = replies.send(QueuedReply { bytes, _slot: slot, _budget: budget }).await;
            }
            .instrument(tracing::Span::current()),
        );
    }
}

/// Reads one request header. `Ok(false)` is a clean EOF between requests; an
/// EOF inside the header is an error.
async fn read_header<R>(reader: &mut R, buf: &mut [u8; RequestHeader::LEN]) -> Result<bool, Error>
where
    R: AsyncRead + Unpin,
{
    let mut filled = 0;
    while let Some(unfilled) = buf.get_mut(filled..).filter(|rest| !rest.is_empty()) {
        let read = reader.read(unfilled).await.map_err(|e| Error::io("read request header", e))?;
        if read == 0 {
            if filled == 0 {
                return Ok(false);
            }
            return Err(Error::Truncated { what: "request header", needed: RequestHeader::LEN, got: filled });
        }
        filled += read;
    }
    Ok(true)
}

/// Reads a WRITE payload into `buf` until it holds `len` bytes, straight into
/// its spare capacity (no zero-filling first). Reads no further than `len`, so
/// the next request stays in the stream. An EOF first is an error, as with
/// `read_exact`.
async fn read_payload<R>(reader: &mut R, buf: &mut BytesMut, len: usize) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
{
    while buf.len() < len {
        let remaining = len - buf.len();
        let mut unfilled = (&mut *buf).limit(remaining);
        if reader.read_buf(&mut unfilled).await? == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "early eof"));
        }
    }
    Ok(())
}

/// Reads and drops `len` payload bytes.
async fn discard<R>(reader: &mut R, len: u32) -> Result<(), Error>
where
    R: AsyncRead + Unpin,
{
    if len == 0 {
        return Ok(());
    }
    let copied = tokio::io::copy(&mut reader.take(u64::from(len)), &mut tokio::io::sink())
        .await
        .map_err(|e| Error::io("read rejected WRITE payload", e))?;
    if copied < u64::from(len) {
        return Err(Error::Truncated { what: "WRITE payload", needed: len as usize, got: copied as usize });
    }
    Ok(())
}

/// A request's share of its connection's and its server's byte budgets.
type Budget = (OwnedSemaphorePermit, OwnedSemaphorePermit);

/// Takes `bytes` from the connection's budget, then from the server's. The order is the
/// same everywhere, and a connection's own permits never exceed the server's budget, so
/// waiting here is backpressure, never a deadlock.
async fn acquire_budget(connection: &Connection, bytes: u32) -> Result<Budget, tokio::sync::AcquireError> {
    let own = Arc::clone(&connection.byte_budget).acquire_many_owned(bytes).await?;
    let server = Arc::clone(&connection.server_budget).acquire_many_owned(bytes).await?;
    Ok((own, server))
}

async fn queue(
    connection: &Connection,
    bytes: ReplyBytes,
    slot: OwnedSemaphorePermit,
    budget: Option<Budget>,
) -> Result<(), ()> {
    connection.replies.send(QueuedReply { bytes, _slot: slot, _budget: budget }).await.map_err(|_| ())
}

/// What a successful export call produced.
enum Outcome {
    Done,
    Read(Vec<u8>),
    Extents(Vec<(u64, bool)>),
}

/// Runs `command` on the blocking pool and encodes the reply.
async fn execute(
    export: Arc<dyn Export>,
    transmission: Transmission,
    header: &RequestHeader,
    command: Command,
    payload: BytesMut,
    buffers: Arc<BufferPool>,
) -> ReplyBytes {
    let cookie = header.cookie;
    let result = tokio::task::spawn_blocking(move || call_export(export.as_ref(), command, payload, &buffers)).await;
    match result {
        Ok(Ok(Outcome::Done)) => transmission.encode_done(cookie, header.command),
        Ok(Ok(Outcome::Read(data))) => {
            let offset = match command {
                Command::Read { offset, .. } => offset,
                _ => 0,
            };
            transmission.encode_read(cookie, offset, data)
        }
        Ok(Ok(Outcome::Extents(runs))) => match command {
            Command::BlockStatus { length, req_one, context_id, .. } => {
                let extents = transmission::build_extents(&runs, length, req_one);
                transmission.encode_block_status(cookie, context_id, &extents)
            }
            _ => transmission.encode_error(cookie, errno::EIO, "internal error"),
        },
        Ok(Err(e)) => {
            warn!(cookie, ?command, "export failed to serve request: {e}");
            transmission.encode_error(cookie, e.kind().nbd_errno(), e.message())
        }
        Err(e) => {
            error!(cookie, ?command, "export call panicked or was cancelled: {e}");
            transmission.encode_error(cookie, errno::EIO, "internal error")
        }
    }
}

/// The blocking half of [`execute`]. A WRITE's `payload` goes back to
/// `buffers` once the export is done with it.
fn call_export(
    export: &dyn Export,
    command: Command,
    payload: BytesMut,
    buffers: &BufferPool,
) -> Result<Outcome, ExportError> {
    match command {
        Command::Read { offset, length } => {
            // Zeroed (calloc, so large buffers come zeroed from the kernel):
            // `Export::read` takes an initialised slice.
            let mut buf = vec![0u8; length as usize];
            export.read(offset, &mut buf)?;
            Ok(Outcome::Read(buf))
        }
        Command::Write { offset, fua, .. } => {
            let written = export.write(offset, &payload, fua);
            buffers.give(payload);
            written.map(|()| Outcome::Done)
        }
        Command::Flush => export.flush().map(|()| Outcome::Done),
        Command::Trim { offset, length, fua } => export.trim(offset, u64::from(length), fua).map(|()| Outcome::Done),
        Command::WriteZeroes { offset, length, may_punch_hole, fua } => {
            export.write_zeroes(offset, u64::from(length), may_punch_hole, fua).map(|()| Outcome::Done)
        }
        Command::BlockStatus { offset, length, .. } => {
            export.block_status(offset, u64::from(length)).map(Outcome::Extents)
        }
        Command::Nothing | Command::Disconnect => Ok(Outcome::Done),
    }
}

/// The writer task: writes queued replies in order, each contiguously.
/// Flushes whenever the queue runs empty, so replies are batched under load
/// and sent at once when idle.
async fn write_replies<W>(writer: W, mut replies: mpsc::Receiver<QueuedReply>, failed: CancellationToken)
where
    W: AsyncWrite + Unpin,
{
    let mut writer = BufWriter::with_capacity(SOCKET_BUFFER_BYTES, writer);
    while let Some(mut reply) = replies.recv().await {
        loop {
            let written = async {
                writer.write_all(&reply.bytes.header).await?;
                writer.write_all(&reply.bytes.data).await
            }
            .await;
            // Release this reply's slot and budget now that it is out.
            drop(reply);
            if let Err(e) = written {
                info!("failed to send reply: {e}");
                failed.cancel();
                return;
            }
            match replies.try_recv() {
                Ok(next) => reply = next,
                Err(_) => break,
            }
        }
        if let Err(e) = writer.flush().await {
            info!("failed to send reply: {e}");
            failed.cancel();
            return;
        }
    }
    if let Err(e) = writer.shutdown().await {
        debug!("failed to shut down the socket: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn read_payload_reads_exactly_len_across_short_reads() {
        // A 7-byte pipe forces many short reads; the bytes after the payload
        // (the next request) must stay in the stream.
        let (mut client, mut server) = tokio::io::duplex(7);
        let sent: Vec<u8> = (0..100u8).collect();
        let writer = tokio::spawn(async move { client.write_all(&sent).await });
        let mut buf = BytesMut::with_capacity(4096);
        read_payload(&mut server, &mut buf, 60).await.unwrap();
        assert_eq!(&buf[..], &(0..60u8).collect::<Vec<_>>()[..]);
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.unwrap();
        writer.await.unwrap().unwrap();
        assert_eq!(rest, (60..100u8).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn read_payload_fails_on_eof_mid_payload() {
        let mut buf = BytesMut::with_capacity(16);
        let e = read_payload(&mut &[1u8, 2, 3][..], &mut buf, 16).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
        assert_eq!(e.to_string(), "early eof"); // as read_exact says
    }

    #[test]
    fn buffer_pool_reuses_the_smallest_fitting_buffer_and_stays_bounded() {
        let pool = BufferPool::default();
        assert!(pool.take(4096).capacity() >= 4096);
        let mut big = BytesMut::with_capacity(1 << 20);
        big.extend_from_slice(&[7; 100]);
        pool.give(big);
        pool.give(BytesMut::with_capacity(8192));
        pool.give(BytesMut::with_capacity(POOLED_BUFFER_BYTES_MAX + 1)); // too large to keep
        let small = pool.take(4096);
        assert_eq!((small.capacity(), small.len()), (8192, 0));
        let reused = pool.take(8193);
        assert_eq!((reused.capacity(), reused.len()), (1 << 20, 0));
        assert!(pool.0.lock().is_empty());

        for _ in 0..POOLED_BUFFERS_MAX {
            pool.give(BytesMut::with_capacity(4096));
        }
        pool.give(BytesMut::with_capacity(1 << 20)); // evicts a 4 KiB one
        pool.give(BytesMut::with_capacity(1024)); // smaller than all: dropped
        let capacities: Vec<_> = pool.0.lock().iter().map(BytesMut::capacity).collect();
        assert_eq!(capacities.len(), POOLED_BUFFERS_MAX);
        assert_eq!(capacities.iter().filter(|&&c| c == 1 << 20).count(), 1);
        assert!(capacities.iter().all(|&c| c >= 4096));
    }
}
