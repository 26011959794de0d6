//! The daemon's control socket and the CLI commands that use it (`keel status`, `keel
//! promote`, `keel switchover`, `keel events`).
//!
//! The socket is a Unix stream socket at `DATA_DIR/control.sock` ([`socket_path`]), mode
//! 0600, and the server also checks each peer's credentials: only the daemon's own user and
//! root may use it. The protocol is line-delimited JSON: the client writes one
//! [`ControlRequest`] as one line, the server answers with one [`ControlResponse`] line. A
//! connection may carry several requests, one after the other.
//!
//! Bounds: a request line is at most [`REQUEST_BYTES_MAX`] bytes (a longer one is answered
//! with an error and the connection is closed); at most [`CONNECTIONS_MAX`] connections are
//! served at once; an idle connection is closed after [`IDLE_TIMEOUT`]. A request that is not
//! valid JSON, or not a known request, is answered with [`ControlResponse::Error`] and the
//! connection stays usable.

use std::future::Future;
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use keel_net::events::Event;
use keel_net::CancellationToken;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::config::NodeConfig;
use crate::units::{format_duration, format_size};

/// Longest request line accepted, without its newline.
pub const REQUEST_BYTES_MAX: usize = 64 * 1024;

/// Longest response line the client accepts (an `events` answer can hold thousands of
/// events, each with a hook's output tail).
pub const RESPONSE_BYTES_MAX: usize = 64 * 1024 * 1024;

/// Connections served at once; more are answered with an error and closed.
pub const CONNECTIONS_MAX: usize = 32;

/// A connection that sends nothing for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// After shutdown is requested, how long requests already being handled may take before
/// their connections are dropped.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// How long the CLI waits for `status` and `events`.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the CLI waits for `promote` and `switchover`, which wait for the standby to
/// catch up and for the role-change hooks (each bounded by its own timeout).
pub const ROLE_CHANGE_TIMEOUT: Duration = Duration::from_secs(300);

/// How long `keel snapshot create` waits for the daemon (a full read of a large volume).
pub const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(6 * 3600);

/// How often `keel events --follow` asks for new events.
pub const FOLLOW_INTERVAL: Duration = Duration::from_millis(200);

/// The control socket of the node configured by `config`: `DATA_DIR/control.sock`.
pub fn socket_path(config: &NodeConfig) -> PathBuf {
    config.data_dir.join("control.sock")
}

/// A request to the daemon, one JSON line: `{"op":"promote","volume":"demo","force":false}`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ControlRequest {
    /// The node's status (see [`render_status`] for its shape).
    Status,
    /// Make this node primary for `volume`. `force` promotes without the witness's consent
    /// (an operator's decision after making sure the old primary is down).
    Promote {
        /// The volume.
        volume: String,
        /// Skip the witness's consent.
        force: bool,
    },
    /// A planned, zero-loss role swap of `volume` with its peer.
    Switchover {
        /// The volume.
        volume: String,
    },
    /// The events still in memory with `seq > since`.
    Events {
        /// The last `seq` the caller has seen (0 for all).
        since: u64,
    },
    /// Take a snapshot of `volume` into the node's repository now, then copy it to the
    /// vaults and apply retention.
    Snapshot {
        /// The volume.
        volume: String,
        /// The journal marker's name (default: `manual`).
        #[serde(default)]
        marker: Option<String>,
    },
}

/// The daemon's answer, one JSON line: `{"result":"done","message":"…","details":{…}}`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum ControlResponse {
    /// Answer to [`ControlRequest::Status`].
    Status {
        /// The status object.
        status: Value,
    },
    /// The requested change was made.
    Done {
        /// What was done, for people.
        message: String,
        /// Details for scripts (epochs, durations, hook outcomes).
        details: Value,
    },
    /// The request was understood but refused, and nothing changed (e.g. the standby is not
    /// up to date); `message` says why and what to do.
    Refused {
        /// Why, and what to do.
        message: String,
    },
    /// Answer to [`ControlRequest::Events`].
    Events {
        /// Oldest first.
        events: Vec<Event>,
    },
    /// The request was malformed, or handling it failed.
    Error {
        /// What went wrong.
        message: String,
    },
}

/// What the daemon plugs into [`serve`].
pub trait ControlHandler: Send + Sync + 'static {
    /// Handles one request. The future runs to completion even if the client disconnects or
    /// the server shuts down (a half-done promotion is worse than a late one).
    fn handle(&self, request: ControlRequest) -> Pin<Box<dyn Future<Output = ControlResponse> + Send + '_>>;
}

/// Serves the control socket at `path` until `shutdown` is cancelled, then waits up to
/// [`SHUTDOWN_GRACE`] for requests being handled and removes the socket file.
///
/// First removes a stale socket file at `path`; fails if a server still listens there or if
/// `path` is not a socket. Errors only when binding fails: a bad request or a failed
/// connection never stops the server.
pub async fn serve(path: &Path, handler: Arc<dyn ControlHandler>, shutdown: CancellationToken) -> Result<()> {
    let listener = bind(path)?;
    tracing::info!(socket = %path.display(), "serving the control socket");
    let slots = Arc::new(tokio::sync::Semaphore::new(CONNECTIONS_MAX));
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                        connections.spawn(refuse_busy(stream));
                        continue;
                    };
                    let handler = Arc::clone(&handler);
                    let shutdown = shutdown.clone();
                    connections.spawn(async move {
                        serve_connection(stream, handler, shutdown).await;
                        drop(slot);
                    });
                }
                Err(e) => {
                    // Out of file descriptors, typically: back off rather than spin.
                    tracing::warn!("failed to accept a control connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    drop(listener);
    let _ = std::fs::remove_file(path);
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async { while connections.join_next().await.is_some() {} });
    if drained.await.is_err() {
        tracing::warn!("control requests still running after {SHUTDOWN_GRACE:?}; dropping their connections");
        connections.abort_all();
    }
    Ok(())
}

/// Sends one request to the daemon listening on `path` and waits up to `timeout` for the
/// answer. Blocking (for the CLI).
pub fn call(path: &Path, request: &ControlRequest, timeout: Duration) -> Result<ControlResponse> {
    let deadline = Instant::now() + timeout;
    let mut line = serde_json::to_vec(request).context("failed to encode the request")?;
    ensure!(line.len() <= REQUEST_BYTES_MAX, "request is {} bytes; the limit is {REQUEST_BYTES_MAX}", line.len());
    line.push(b'\n');
    let mut stream = std::os::unix::net::UnixStream::connect(path).map_err(|e| connect_error(path, e))?;
    stream.set_write_timeout(Some(timeout)).context("failed to set a write timeout")?;
    stream.write_all(&line).with_context(|| format!("failed to send the request to {}", path.display()))?;

    let mut response = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let end = loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            bail!("the daemon did not answer within {} ({})", format_duration(timeout), path.display());
        }
        stream.set_read_timeout(Some(remaining)).context("failed to set a read timeout")?;
        let n = match stream.read(&mut buf) {
            Ok(0) => bail!("the daemon closed the connection without answering ({})", path.display()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            // The read timeout, or the next turn reports it.
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => continue,
            Err(e) => return Err(e).with_context(|| format!("failed to read the answer from {}", path.display())),
        };
        let chunk = buf.get(..n).unwrap_or_default();
        let newline = chunk.iter().position(|&b| b == b'\n');
        response.extend_from_slice(chunk);
        if let Some(at) = newline {
            break response.len() - n + at;
        }
        ensure!(response.len() <= RESPONSE_BYTES_MAX, "the daemon's answer exceeds {RESPONSE_BYTES_MAX} bytes");
    };
    let response = response.get(..end).unwrap_or_default();
    serde_json::from_slice(response).with_context(|| {
        format!("the daemon sent an answer this keel does not understand: {}", String::from_utf8_lossy(response))
    })
}

fn connect_error(path: &Path, e: std::io::Error) -> anyhow::Error {
    let hint = match e.kind() {
        std::io::ErrorKind::NotFound => "is the keel daemon running? (`keel daemon --config FILE`)",
        std::io::ErrorKind::ConnectionRefused => "the daemon that made it is not running; start it again",
        std::io::ErrorKind::PermissionDenied => "run as the daemon's user or root",
        _ => "is the keel daemon running?",
    };
    anyhow!("failed to connect to the control socket {}: {e}; {hint}", path.display())
}

/// Binds the listener, replacing a stale socket file, and makes it owner-only.
fn bind(path: &Path) -> Result<UnixListener> {
    // Blocking std calls, but local and immediate (a stale socket refuses the probe at once),
    // and bind runs once.
    match std::fs::symlink_metadata(path) {
        Ok(metadata) if metadata.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                bail!("another daemon serves the control socket {}; stop it first", path.display());
            }
            std::fs::remove_file(path)
                .with_context(|| format!("failed to remove the stale control socket {}", path.display()))?;
        }
        Ok(_) => bail!("{} exists and is not a socket; remove it or fix data_dir", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("failed to inspect {}", path.display())),
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).with_context(|| format!("failed to create {}", parent.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("failed to bind the control socket {}", path.display()))?;
    // Between bind and chmod the socket has the umask's mode; the peer check in
    // `serve_connection` covers that window.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("failed to make {} owner-only", path.display()))?;
    Ok(listener)
}

/// Whether the peer runs as our user or as root.
fn peer_allowed(stream: &UnixStream) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let our_uid = unsafe { libc::geteuid() };
    match stream.peer_cred() {
        Ok(cred) => cred.uid() == our_uid || cred.uid() == 0,
        Err(e) => {
            tracing::warn!("failed to read a control client's credentials: {e}; refusing it");
            false
        }
    }
}

async fn refuse_busy(mut stream: UnixStream) {
    let response = ControlResponse::Error {
        message: format!("the daemon is serving {CONNECTIONS_MAX} control connections already; try again"),
    };
    let _ = tokio::time::timeout(IDLE_TIMEOUT, write_response(&mut stream, &response)).await;
}

/// One line read from a connection.
enum Line {
    Request(Vec<u8>),
    TooLong,
    End,
}

async fn serve_connection(mut stream: UnixStream, handler: Arc<dyn ControlHandler>, shutdown: CancellationToken) {
    if !peer_allowed(&stream) {
        let response = ControlResponse::Error { message: "permission denied: run as the daemon's user or root".into() };
        let _ = tokio::time::timeout(IDLE_TIMEOUT, write_response(&mut stream, &response)).await;
        return;
    }
    let (read, mut write) = stream.split();
    let mut reader = BufReader::new(read);
    loop {
        let line = tokio::select! {
            () = shutdown.cancelled() => return,
            line = tokio::time::timeout(IDLE_TIMEOUT, read_line(&mut reader)) => line,
        };
        let response = match line {
            Err(_) | Ok(Ok(Line::End)) => return,
            Ok(Err(e)) => {
                tracing::debug!("failed to read a control request: {e}");
                return;
            }
            Ok(Ok(Line::TooLong)) => {
                // The rest of the line is unread: the connection cannot continue.
                let response = ControlResponse::Error {
                    message: format!("request too large: the limit is {REQUEST_BYTES_MAX} bytes per line"),
                };
                let _ = tokio::time::timeout(IDLE_TIMEOUT, write_response(&mut write, &response)).await;
                return;
            }
            Ok(Ok(Line::Request(bytes))) => match serde_json::from_slice::<ControlRequest>(&bytes) {
                Ok(request) => handle(&handler, request).await,
                Err(e) => ControlResponse::Error { message: format!("malformed request: {e}") },
            },
        };
        match tokio::time::timeout(IDLE_TIMEOUT, write_response(&mut write, &response)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::debug!("failed to answer a control request: {e}");
                return;
            }
            Err(_) => return,
        }
    }
}

/// Runs the handler in its own task, so that a panic becomes an error answer and the
/// request completes even if this connection is dropped.
async fn handle(handler: &Arc<dyn ControlHandler>, request: ControlRequest) -> ControlResponse {
    // Status polls are frequent; operator actions are worth a line.
    match &request {
        ControlRequest::Status | ControlRequest::Events { .. } => {
            tracing::debug!("control request: {}", serde_json::to_string(&request).unwrap_or_default())
        }
        _ => tracing::info!("control request: {}", serde_json::to_string(&request).unwrap_or_default()),
    }
    let handler = Arc::clone(handler);
    match tokio::spawn(async move { handler.handle(request).await }).await {
        Ok(response) => response,
        Err(e) => {
            tracing::error!("control request handler failed: {e}");
            ControlResponse::Error { message: "the daemon failed while handling the request; see its log".into() }
        }
    }
}

/// Reads one line of at most [`REQUEST_BYTES_MAX`] bytes (without its newline). A last line
/// without a newline counts as a line.
async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(reader: &mut R) -> std::io::Result<Line> {
    let mut line = Vec::new();
    let limit = REQUEST_BYTES_MAX as u64 + 1;
    reader.take(limit).read_until(b'\n', &mut line).await?;
    if line.last() == Some(&b'\n') {
        line.pop();
        Ok(Line::Request(line))
    } else if line.len() as u64 == limit {
        Ok(Line::TooLong)
    } else if line.is_empty() {
        Ok(Line::End)
    } else {
        Ok(Line::Request(line))
    }
}

async fn write_response<W: tokio::io::AsyncWrite + Unpin>(
    write: &mut W,
    response: &ControlResponse,
) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(response).map_err(std::io::Error::other)?;
    line.push(b'\n');
    write.write_all(&line).await?;
    write.flush().await
}

// ---- The CLI ----

/// Which daemon a CLI command talks to.
#[derive(clap::Args, Debug, Clone)]
#[group(required = true, multiple = false)]
pub struct ControlTarget {
    /// The node's config file (the socket is DATA_DIR/control.sock).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The daemon's control socket.
    #[arg(long)]
    pub socket: Option<PathBuf>,
}

impl ControlTarget {
    /// The control socket this target names.
    pub fn socket_path(&self) -> Result<PathBuf> {
        match (&self.socket, &self.config) {
            (Some(socket), _) => Ok(socket.clone()),
            (None, Some(config)) => Ok(socket_path(&NodeConfig::load(config)?)),
            (None, None) => bail!("give --config FILE or --socket PATH"),
        }
    }
}

/// `keel status`: the daemon's status as a table, or its JSON with `json`.
pub fn cli_status(target: &ControlTarget, json: bool) -> Result<()> {
    match call(&target.socket_path()?, &ControlRequest::Status, QUERY_TIMEOUT)? {
        ControlResponse::Status { status } if json => {
            print_out(&format!("{}\n", serde_json::to_string_pretty(&status)?))
        }
        ControlResponse::Status { status } => print_out(&render_status(&status)),
        other => Err(unexpected(other)),
    }
}

/// `keel promote VOLUME [--force]`: fails (exit status 1) unless the daemon did it.
pub fn cli_promote(target: &ControlTarget, volume: &str, force: bool, json: bool) -> Result<()> {
    let request = ControlRequest::Promote { volume: volume.to_string(), force };
    role_change(target, &request, json)
}

/// `keel switchover VOLUME`: fails (exit status 1) unless the daemon did it.
pub fn cli_switchover(target: &ControlTarget, volume: &str, json: bool) -> Result<()> {
    role_change(target, &ControlRequest::Switchover { volume: volume.to_string() }, json)
}

fn role_change(target: &ControlTarget, request: &ControlRequest, json: bool) -> Result<()> {
    let response = call(&target.socket_path()?, request, ROLE_CHANGE_TIMEOUT)?;
    if json {
        print_out(&format!("{}\n", serde_json::to_string_pretty(&response)?))?;
    }
    match response {
        ControlResponse::Done { message, details } => {
            if !json {
                let mut text = format!("{message}\n");
                let empty = details.is_null()
                    || details.as_object().is_some_and(|o| o.is_empty())
                    || details.as_array().is_some_and(|a| a.is_empty());
                if !empty {
                    text.push_str(&serde_json::to_string_pretty(&details)?);
                    text.push('\n');
                }
                print_out(&text)?;
            }
            Ok(())
        }
        ControlResponse::Refused { message } => bail!("refused: {message}"),
        ControlResponse::Error { message } => bail!("{message}"),
        other => Err(unexpected(other)),
    }
}

/// `keel events [--since N] [--follow]`: the events as JSON lines (whatever `json` says: an
/// event log is for scripts and `jq`). `follow` keeps asking for new ones every
/// [`FOLLOW_INTERVAL`] until interrupted; when the daemon cannot be reached it keeps trying,
/// and reads from the start once it answers again (a restarted daemon numbers from 1).
pub fn cli_events(target: &ControlTarget, since: u64, follow: bool, json: bool) -> Result<()> {
    let _ = json;
    let path = target.socket_path()?;
    let mut since = since;
    let mut unreachable = false;
    loop {
        match call(&path, &ControlRequest::Events { since }, QUERY_TIMEOUT) {
            Ok(ControlResponse::Events { events }) => {
                if unreachable {
                    eprintln!("keel: the daemon answers again");
                    unreachable = false;
                }
                let mut text = String::new();
                for event in &events {
                    text.push_str(&serde_json::to_string(event)?);
                    text.push('\n');
                    since = since.max(event.seq);
                }
                print_out(&text)?;
            }
            Ok(ControlResponse::Error { message }) => bail!("{message}"),
            Ok(other) => return Err(unexpected(other)),
            Err(e) if follow => {
                if !unreachable {
                    eprintln!("keel: {e:#}; still trying");
                    unreachable = true;
                    since = 0;
                }
            }
            Err(e) => return Err(e),
        }
        if !follow {
            return Ok(());
        }
        std::thread::sleep(FOLLOW_INTERVAL);
    }
}

fn unexpected(response: ControlResponse) -> anyhow::Error {
    anyhow!("the daemon answered something unexpected: {}", serde_json::to_string(&response).unwrap_or_default())
}

/// Writes to stdout; a closed pipe (`keel events --follow | head`) ends the command quietly
/// instead of panicking like `print!`.
fn print_out(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        other => other.context("failed to write to stdout"),
    }
}

/// Renders the daemon's status for people: a table with a row per volume, then one line per
/// notable detail (NBD URI, resync progress, fencing). Fields it does not know are ignored
/// and missing ones are shown as `-`, so an older or newer daemon's status still renders.
///
/// The shape it reads:
/// `{ "node": "a", "volumes": [ { "name", "role", "epoch", "last_seq", "durable_seq",
/// "nbd_uri", "peer": { "name", "connected", "state", "acked_seq", "lag_seqs", "resync": {
/// "done_bytes", "total_bytes" } }, "witness": { "reachable", "lease_remaining_ms", "record" },
/// "fenced" } ] }`.
pub fn render_status(status: &Value) -> String {
    let Some(object) = status.as_object() else {
        return format!("{}\n", serde_json::to_string_pretty(status).unwrap_or_default());
    };
    let mut out = format!("node {}\n", text(object.get("node")));
    let volumes = object.get("volumes").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    if volumes.is_empty() {
        out.push_str("no volumes\n");
        return out;
    }
    let header =
        ["VOLUME", "ROLE", "EPOCH", "LAST SEQ", "DURABLE SEQ", "PEER", "PEER STATE", "ACKED SEQ", "LAG", "WITNESS"];
    let numeric = [false, false, true, true, true, false, false, true, true, false];
    let mut rows = vec![header.map(str::to_string).to_vec()];
    let mut notes = Vec::new();
    for volume in volumes {
        let name = text(volume.get("name"));
        let peer = volume.get("peer").filter(|p| p.is_object());
        let field = |parent: Option<&Value>, key: &str| text(parent.and_then(|p| p.get(key)));
        let peer_cell = match peer {
            None => "-".to_string(),
            Some(p) => match p.get("connected").and_then(Value::as_bool) {
                Some(true) => format!("{} (connected)", field(peer, "name")),
                Some(false) => format!("{} (DISCONNECTED)", field(peer, "name")),
                None => field(peer, "name"),
            },
        };
        rows.push(vec![
            name.clone(),
            text(volume.get("role")),
            text(volume.get("epoch")),
            text(volume.get("last_seq")),
            text(volume.get("durable_seq")),
            peer_cell,
            field(peer, "state"),
            field(peer, "acked_seq"),
            field(peer, "lag_seqs"),
            witness_cell(volume.get("witness")),
        ]);
        if let Some(uri) = volume.get("nbd_uri").filter(|v| !v.is_null()) {
            notes.push(format!("{name}: NBD {}", text(Some(uri))));
        }
        if let Some(resync) = peer.and_then(|p| p.get("resync")).filter(|r| r.is_object()) {
            let done = resync.get("done_bytes").and_then(Value::as_u64);
            let total = resync.get("total_bytes").and_then(Value::as_u64);
            let progress = match (done, total) {
                (Some(done), Some(total)) if total > 0 => format!(
                    "{:.1}% ({} of {})",
                    done as f64 * 100.0 / total as f64,
                    format_size(done),
                    format_size(total)
                ),
                _ => serde_json::to_string(resync).unwrap_or_default(),
            };
            notes.push(format!("{name}: resync with {}: {progress}", field(peer, "name")));
        }
        if let Some(fenced) = volume.get("fenced").filter(|v| !v.is_null() && *v != &Value::Bool(false)) {
            notes.push(format!("{name}: FENCED: {}", text(Some(fenced))));
        }
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|c| rows.iter().map(|r| r.get(c).map_or(0, |s| s.chars().count())).max().unwrap_or(0))
        .collect();
    for row in &rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            let width = widths.get(c).copied().unwrap_or(0);
            if c > 0 {
                line.push_str("  ");
            }
            if numeric.get(c).copied().unwrap_or(false) {
                line.push_str(&format!("{cell:>width$}"));
            } else {
                line.push_str(&format!("{cell:<width$}"));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    for note in notes {
        out.push_str(&note);
        out.push('\n');
    }
    out
}

fn witness_cell(witness: Option<&Value>) -> String {
    let Some(witness) = witness.filter(|w| w.is_object()) else {
        return text(witness);
    };
    let mut cell = match witness.get("reachable").and_then(Value::as_bool) {
        Some(true) => "reachable".to_string(),
        Some(false) => "UNREACHABLE".to_string(),
        None => "-".to_string(),
    };
    if let Some(ms) = witness.get("lease_remaining_ms").and_then(Value::as_u64) {
        cell.push_str(&format!(", lease {}", format_duration(Duration::from_millis(ms))));
    }
    cell
}

/// A JSON value as a table cell: `-` for missing or null, strings bare, booleans yes/no.
fn text(value: Option<&Value>) -> String {
    match value {
        None | Some(Value::Null) => "-".to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Bool(true)) => "yes".to_string(),
        Some(Value::Bool(false)) => "no".to_string(),
        Some(other) => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_net::events::EventLog;
    use serde_json::json;
    use std::io::BufRead;

    const WAIT: Duration = Duration::from_secs(20);

    /// Answers from fixed data and remembers what it was asked.
    struct FakeHandler {
        events: Arc<EventLog>,
        requests: std::sync::Mutex<Vec<ControlRequest>>,
    }

    impl ControlHandler for FakeHandler {
        fn handle(&self, request: ControlRequest) -> Pin<Box<dyn Future<Output = ControlResponse> + Send + '_>> {
            Box::pin(async move {
                self.requests.lock().unwrap().push(request.clone());
                match request {
                    ControlRequest::Status => ControlResponse::Status { status: sample_status() },
                    ControlRequest::Promote { volume, force: true } => {
                        ControlResponse::Done { message: format!("promoted {volume}"), details: json!({ "epoch": 4 }) }
                    }
                    ControlRequest::Promote { volume, force: false } => {
                        ControlResponse::Refused { message: format!("{volume}: the witness does not consent") }
                    }
                    ControlRequest::Switchover { volume } if volume == "panic" => panic!("handler bug"),
                    ControlRequest::Switchover { volume } => {
                        ControlResponse::Done { message: format!("switched {volume} over"), details: Value::Null }
                    }
                    ControlRequest::Events { since } => ControlResponse::Events { events: self.events.since(since) },
                    ControlRequest::Snapshot { volume, .. } => {
                        ControlResponse::Refused { message: format!("{volume}: snapshots are off") }
                    }
                }
            })
        }
    }

    struct Server {
        _dir: tempfile::TempDir,
        socket: PathBuf,
        handler: Arc<FakeHandler>,
        shutdown: CancellationToken,
        task: tokio::task::JoinHandle<Result<()>>,
    }

    async fn start() -> Server {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("control.sock");
        let events = EventLog::in_memory("a");
        events.emit(Some("demo"), "role", json!({ "to": "primary" }));
        events.emit(Some("demo"), "peer", json!({ "connected": true }));
        let handler = Arc::new(FakeHandler { events, requests: Default::default() });
        let shutdown = CancellationToken::new();
        let task = tokio::spawn({
            let handler: Arc<dyn ControlHandler> = handler.clone();
            let (socket, shutdown) = (socket.clone(), shutdown.clone());
            async move { serve(&socket, handler, shutdown).await }
        });
        wait_until_listening(&socket).await;
        Server { _dir: dir, socket, handler, shutdown, task }
    }

    async fn wait_until_listening(socket: &Path) {
        let deadline = Instant::now() + WAIT;
        while std::os::unix::net::UnixStream::connect(socket).is_err() {
            assert!(Instant::now() < deadline, "the control socket never came up");
            tokio::task::yield_now().await;
        }
    }

    async fn call_async(socket: &Path, request: ControlRequest) -> Result<ControlResponse> {
        let socket = socket.to_path_buf();
        tokio::task::spawn_blocking(move || call(&socket, &request, WAIT)).await.unwrap()
    }

    /// Writes raw bytes on a fresh connection and reads one answer line.
    async fn raw(socket: &Path, bytes: Vec<u8>) -> ControlResponse {
        let socket = socket.to_path_buf();
        tokio::task::spawn_blocking(move || {
            let mut stream = std::os::unix::net::UnixStream::connect(&socket).unwrap();
            stream.set_read_timeout(Some(WAIT)).unwrap();
            stream.write_all(&bytes).unwrap();
            let mut line = String::new();
            std::io::BufReader::new(stream).read_line(&mut line).unwrap();
            serde_json::from_str(&line).unwrap()
        })
        .await
        .unwrap()
    }

    fn sample_status() -> Value {
        json!({
            "node": "a",
            "volumes": [
                {
                    "name": "demo", "role": "primary", "epoch": 3, "last_seq": 10, "durable_seq": 10,
                    "nbd_uri": "nbd+unix:///demo?socket=/run/keel/nbd.sock",
                    "peer": {
                        "name": "b", "connected": true, "state": "SyncTarget", "acked_seq": 8, "lag_seqs": 2,
                        "resync": { "done_bytes": 512, "total_bytes": 2048 }
                    },
                    "witness": { "reachable": true, "lease_remaining_ms": 1500, "record": { "epoch": 3 } },
                    "fenced": null,
                    "something_new": [1, 2, 3]
                },
                {
                    "name": "files", "role": "standby", "epoch": "seven",
                    "peer": { "name": "b", "connected": false },
                    "witness": { "reachable": false },
                    "fenced": "lease expired at epoch 7"
                },
                { "name": "solo", "role": "single" }
            ]
        })
    }

    #[test]
    fn requests_and_responses_have_the_documented_wire_form() {
        let promote = ControlRequest::Promote { volume: "demo".into(), force: true };
        assert_eq!(
            serde_json::to_value(&promote).unwrap(),
            json!({ "op": "promote", "volume": "demo", "force": true })
        );
        assert_eq!(serde_json::to_value(ControlRequest::Status).unwrap(), json!({ "op": "status" }));
        assert_eq!(
            serde_json::from_str::<ControlRequest>(r#"{"op":"events","since":5}"#).unwrap(),
            ControlRequest::Events { since: 5 }
        );
        let refused = ControlResponse::Refused { message: "no".into() };
        assert_eq!(serde_json::to_value(&refused).unwrap(), json!({ "result": "refused", "message": "no" }));
    }

    #[tokio::test]
    async fn every_request_round_trips() {
        let server = start().await;
        let status = call_async(&server.socket, ControlRequest::Status).await.unwrap();
        assert_eq!(status, ControlResponse::Status { status: sample_status() });

        let forced = ControlRequest::Promote { volume: "demo".into(), force: true };
        let done = call_async(&server.socket, forced.clone()).await.unwrap();
        assert_eq!(done, ControlResponse::Done { message: "promoted demo".into(), details: json!({ "epoch": 4 }) });

        let unforced = ControlRequest::Promote { volume: "demo".into(), force: false };
        let refused = call_async(&server.socket, unforced.clone()).await.unwrap();
        assert!(matches!(&refused, ControlResponse::Refused { message } if message.contains("witness")), "{refused:?}");

        let switchover = ControlRequest::Switchover { volume: "demo".into() };
        let done = call_async(&server.socket, switchover.clone()).await.unwrap();
        assert!(matches!(&done, ControlResponse::Done { message, .. } if message == "switched demo over"), "{done:?}");

        let ControlResponse::Events { events } =
            call_async(&server.socket, ControlRequest::Events { since: 0 }).await.unwrap()
        else {
            panic!("expected events");
        };
        assert_eq!(events.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>(), ["role", "peer"]);
        let ControlResponse::Events { events } =
            call_async(&server.socket, ControlRequest::Events { since: 1 }).await.unwrap()
        else {
            panic!("expected events");
        };
        assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), [2]);

        assert_eq!(
            *server.handler.requests.lock().unwrap(),
            vec![
                ControlRequest::Status,
                forced,
                unforced,
                switchover,
                ControlRequest::Events { since: 0 },
                ControlRequest::Events { since: 1 }
            ]
        );
        stop(server).await;
    }

    #[tokio::test]
    async fn a_malformed_line_gets_an_error_and_the_connection_goes_on() {
        let server = start().await;
        let socket = server.socket.clone();
        let answers = tokio::task::spawn_blocking(move || {
            let mut stream = std::os::unix::net::UnixStream::connect(&socket).unwrap();
            stream.set_read_timeout(Some(WAIT)).unwrap();
            stream.write_all(b"this is not json\n{\"op\":\"launch_missiles\"}\n{\"op\":\"status\"}\n").unwrap();
            let mut reader = std::io::BufReader::new(stream);
            (0..3)
                .map(|_| {
                    let mut line = String::new();
                    reader.read_line(&mut line).unwrap();
                    serde_json::from_str::<ControlResponse>(&line).unwrap()
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap();
        assert!(matches!(&answers[0], ControlResponse::Error { message } if message.starts_with("malformed request")));
        assert!(matches!(&answers[1], ControlResponse::Error { message } if message.contains("launch_missiles")));
        assert!(matches!(&answers[2], ControlResponse::Status { .. }));
        stop(server).await;
    }

    #[tokio::test]
    async fn an_oversized_request_is_refused_and_the_server_goes_on() {
        let server = start().await;
        let mut huge = vec![b'x'; REQUEST_BYTES_MAX + 1000];
        huge.push(b'\n');
        let answer = raw(&server.socket, huge).await;
        assert!(matches!(&answer, ControlResponse::Error { message } if message.contains("too large")), "{answer:?}");
        // A request of exactly the limit is read (and is merely malformed).
        let mut limit = vec![b' '; REQUEST_BYTES_MAX];
        limit.push(b'\n');
        let answer = raw(&server.socket, limit).await;
        assert!(
            matches!(&answer, ControlResponse::Error { message } if message.starts_with("malformed")),
            "{answer:?}"
        );
        // The client refuses to send an oversized request at all.
        let big = ControlRequest::Switchover { volume: "v".repeat(REQUEST_BYTES_MAX) };
        let err = call_async(&server.socket, big).await.unwrap_err();
        assert!(err.to_string().contains("limit"), "{err:#}");
        assert!(matches!(call_async(&server.socket, ControlRequest::Status).await, Ok(ControlResponse::Status { .. })));
        stop(server).await;
    }

    #[tokio::test]
    async fn a_panicking_handler_gets_an_error_answer() {
        let server = start().await;
        let answer = call_async(&server.socket, ControlRequest::Switchover { volume: "panic".into() }).await.unwrap();
        assert!(matches!(&answer, ControlResponse::Error { message } if message.contains("see its log")), "{answer:?}");
        assert!(matches!(call_async(&server.socket, ControlRequest::Status).await, Ok(ControlResponse::Status { .. })));
        stop(server).await;
    }

    #[tokio::test]
    async fn the_socket_is_owner_only_replaces_a_stale_one_and_is_removed_on_shutdown() {
        let server = start().await;
        let mode = std::fs::metadata(&server.socket).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // A second server refuses to take over a live socket.
        let err = serve(&server.socket, server.handler.clone(), CancellationToken::new()).await.unwrap_err();
        assert!(err.to_string().contains("another daemon"), "{err:#}");
        let socket = server.socket.clone();
        let dir = stop(server).await;
        assert!(!socket.exists());

        // A stale socket file (its server died without removing it) is replaced.
        drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
        assert!(socket.exists());
        let shutdown = CancellationToken::new();
        let handler: Arc<dyn ControlHandler> =
            Arc::new(FakeHandler { events: EventLog::in_memory("a"), requests: Default::default() });
        let task = tokio::spawn({
            let (socket, shutdown) = (socket.clone(), shutdown.clone());
            async move { serve(&socket, handler, shutdown).await }
        });
        wait_until_listening(&socket).await;
        assert!(matches!(call_async(&socket, ControlRequest::Status).await, Ok(ControlResponse::Status { .. })));
        shutdown.cancel();
        task.await.unwrap().unwrap();

        // Something that is not a socket is left alone.
        std::fs::write(&socket, "precious").unwrap();
        let handler: Arc<dyn ControlHandler> =
            Arc::new(FakeHandler { events: EventLog::in_memory("a"), requests: Default::default() });
        let err = serve(&socket, handler, CancellationToken::new()).await.unwrap_err();
        assert!(err.to_string().contains("not a socket"), "{err:#}");
        assert_eq!(std::fs::read_to_string(&socket).unwrap(), "precious");
        drop(dir);
    }

    #[test]
    fn calling_a_missing_daemon_names_the_socket_and_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("control.sock");
        let err = call(&socket, &ControlRequest::Status, WAIT).unwrap_err().to_string();
        assert!(err.contains(&socket.display().to_string()), "{err}");
        assert!(err.contains("is the keel daemon running"), "{err}");
    }

    async fn stop(server: Server) -> tempfile::TempDir {
        server.shutdown.cancel();
        server.task.await.unwrap().unwrap();
        server._dir
    }

    #[test]
    fn status_renders_as_a_table_with_notes() {
        let text = render_status(&sample_status());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "node a");
        assert!(lines[1].starts_with("VOLUME"), "{text}");
        for word in ["ROLE", "EPOCH", "LAST SEQ", "DURABLE SEQ", "PEER STATE", "LAG", "WITNESS"] {
            assert!(lines[1].contains(word), "{text}");
        }
        let demo = lines[2];
        for cell in ["demo", "primary", "3", "10", "b (connected)", "SyncTarget", "8", "2", "reachable, lease 1.5 s"] {
            assert!(demo.contains(cell), "{cell:?} missing in {demo:?}");
        }
        let files = lines[3];
        for cell in ["files", "standby", "seven", "b (DISCONNECTED)", "UNREACHABLE"] {
            assert!(files.contains(cell), "{cell:?} missing in {files:?}");
        }
        let solo = lines[4];
        assert!(solo.starts_with("solo"), "{text}");
        assert!(solo.contains("single"), "{text}");
        assert!(text.contains("demo: NBD nbd+unix:///demo?socket=/run/keel/nbd.sock"), "{text}");
        assert!(text.contains("demo: resync with b: 25.0% (512 B of 2 KiB)"), "{text}");
        assert!(text.contains("files: FENCED: lease expired at epoch 7"), "{text}");
        assert!(!text.contains("solo: "), "{text}");
        // Columns line up: the ROLE column starts at the same offset in every row.
        let role_at = lines[1].find("ROLE").unwrap();
        assert_eq!(demo.find("primary"), Some(role_at));
        assert_eq!(files.find("standby"), Some(role_at));
    }

    #[test]
    fn status_rendering_survives_odd_input() {
        assert_eq!(render_status(&json!({ "node": "a", "volumes": [] })), "node a\nno volumes\n");
        assert_eq!(render_status(&json!({})), "node -\nno volumes\n");
        assert_eq!(render_status(&json!({ "volumes": "nope" })), "node -\nno volumes\n");
        assert_eq!(render_status(&json!("weird")), "\"weird\"\n");
        let text = render_status(&json!({ "node": "a", "volumes": [ {}, 7, { "peer": 3, "witness": "x" } ] }));
        assert_eq!(text.lines().count(), 5, "{text}");
    }
}
