//! The node's event log: every state change (a role change, a peer connecting, resync
//! progress, fencing, a hook's result) is one [`Event`] that operators and tests observe.
//!
//! An event goes to three places, in this order, under one short lock so that all three see
//! events in `seq` order:
//!
//! 1. a ring of the last [`MEMORY_EVENTS_MAX`] events in memory, which [`EventLog::since`]
//!    reads (the control socket's `events` request, `keel events --follow`);
//! 2. a broadcast channel ([`EventLog::subscribe`], [`EventLog::wait_for`]), so tests wait
//!    for the event that proves a state change instead of sleeping;
//! 3. for a log made with [`EventLog::open`], a bounded queue to a writer thread that appends
//!    the event as one JSON line to the log file.
//!
//! The file is for operators after the fact, not for correctness, so the writer thread never
//! fsyncs, and a slow or failing disk never stalls the state change that emitted the event:
//! when the queue is full the line is dropped (and counted), and a write error is logged once
//! and does not stop the event from reaching memory and subscribers.
//!
//! `seq` starts at 1 in every process; lines in the file from earlier runs of the daemon
//! repeat sequence numbers, and `time_ms` tells them apart.

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

/// Events kept in memory for [`EventLog::since`] and [`EventLog::wait_for`].
pub const MEMORY_EVENTS_MAX: usize = 4096;

/// Events a subscriber may fall behind by before it sees `RecvError::Lagged` (it can then
/// catch up with [`EventLog::since`]).
const BROADCAST_CAPACITY: usize = 1024;

/// Lines queued for the writer thread; beyond this, lines are dropped rather than making
/// the emitter wait on the disk.
const FILE_QUEUE_MAX: usize = 4096;

/// One observable state change.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Event {
    /// Position in this process's event order, from 1.
    pub seq: u64,
    /// Wall-clock time of the event, in milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// The node that emitted it.
    pub node: String,
    /// The volume it concerns, if any.
    pub volume: Option<String>,
    /// What happened: `role`, `peer`, `resync`, `fenced`, `promote`, `hook`, …
    pub kind: String,
    /// The details, always a JSON object.
    pub fields: serde_json::Value,
}

/// The node's event log. See the module docs.
///
/// # Invariants
///
/// - `seq` values are assigned consecutively from 1 under the lock, and every consumer
///   (memory ring, subscribers, file) receives events in `seq` order.
/// - The memory ring holds at most [`MEMORY_EVENTS_MAX`] events, the file queue at most
///   `FILE_QUEUE_MAX` lines.
pub struct EventLog {
    node: String,
    state: Mutex<State>,
    sender: broadcast::Sender<Event>,
    file: Option<FileSink>,
}

struct State {
    last_seq: u64,
    recent: VecDeque<Event>,
}

/// The emitting side of the writer thread.
struct FileSink {
    path: PathBuf,
    queue: mpsc::SyncSender<WriterMessage>,
    /// Lines dropped because the queue was full (a stalled disk).
    dropped_lines: AtomicU64,
}

enum WriterMessage {
    Line(Vec<u8>),
    /// Answered once every line queued before it has been written (or has failed).
    Flush(mpsc::SyncSender<()>),
}

impl EventLog {
    /// An event log that appends events as JSON lines to `path` (created if missing, opened
    /// `O_APPEND`, one `write` per event), keeps the last [`MEMORY_EVENTS_MAX`] in memory
    /// and broadcasts them.
    ///
    /// Starts a writer thread named `keel-events`; it ends when the log is dropped, after
    /// writing what was queued. Call [`EventLog::flush`] before exiting to wait for that.
    pub fn open(path: &Path, node: &str) -> std::io::Result<Arc<Self>> {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        let (queue, receiver) = mpsc::sync_channel(FILE_QUEUE_MAX);
        let thread_path = path.to_path_buf();
        std::thread::Builder::new()
            .name("keel-events".into())
            .spawn(move || write_lines(file, &thread_path, receiver))?;
        let sink = FileSink { path: path.to_path_buf(), queue, dropped_lines: AtomicU64::new(0) };
        Ok(Arc::new(Self::new(node, Some(sink))))
    }

    /// An event log that only keeps memory (tests, tools).
    pub fn in_memory(node: &str) -> Arc<Self> {
        Arc::new(Self::new(node, None))
    }

    fn new(node: &str, file: Option<FileSink>) -> Self {
        let (sender, _) = broadcast::channel(BROADCAST_CAPACITY);
        let state = State { last_seq: 0, recent: VecDeque::with_capacity(MEMORY_EVENTS_MAX) };
        Self { node: node.to_string(), state: Mutex::new(state), sender, file }
    }

    /// The node name stamped on every event.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Records an event and returns it. `fields` should be a JSON object; any other value is
    /// wrapped as `{"value": fields}` so that consumers can rely on an object.
    ///
    /// Never blocks on I/O and never fails; also logs one `tracing` info line.
    pub fn emit(&self, volume: Option<&str>, kind: &str, fields: serde_json::Value) -> Event {
        let fields = match fields {
            serde_json::Value::Object(_) => fields,
            other => serde_json::json!({ "value": other }),
        };
        let time_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let mut state = self.state.lock();
        state.last_seq += 1;
        let event = Event {
            seq: state.last_seq,
            time_ms,
            node: self.node.clone(),
            volume: volume.map(str::to_string),
            kind: kind.to_string(),
            fields,
        };
        if state.recent.len() == MEMORY_EVENTS_MAX {
            state.recent.pop_front();
        }
        state.recent.push_back(event.clone());
        // An error only means that nobody subscribes right now.
        let _ = self.sender.send(event.clone());
        if let Some(file) = &self.file {
            file.queue_line(&event);
        }
        drop(state);
        tracing::info!("event {} {} {}", event.kind, event.volume.as_deref().unwrap_or("-"), event.fields);
        event
    }

    /// The `seq` of the newest event (0 before the first). Take it before causing a state
    /// change, then [`EventLog::wait_for`] events after it.
    pub fn last_seq(&self) -> u64 {
        self.state.lock().last_seq
    }

    /// The events still in memory with a `seq` greater than `seq`, oldest first.
    pub fn since(&self, seq: u64) -> Vec<Event> {
        let state = self.state.lock();
        // `recent` is sorted by seq: skip the older part without scanning it.
        let start = state.recent.partition_point(|e| e.seq <= seq);
        state.recent.range(start..).cloned().collect()
    }

    /// A receiver of every event emitted from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.sender.subscribe()
    }

    /// Waits until an event with `seq > after_seq` matches `pred` and returns it, or returns
    /// `None` once `timeout` has passed. Events already emitted (and still in memory) are
    /// checked first, so there is no race with an event emitted just before the call.
    ///
    /// Cancel-safe: dropping the future loses nothing.
    pub async fn wait_for(&self, after_seq: u64, timeout: Duration, pred: impl Fn(&Event) -> bool) -> Option<Event> {
        // Subscribe before reading the backlog: an event emitted in between is then in both,
        // never in neither.
        let mut receiver = self.subscribe();
        let mut checked_seq = after_seq;
        let search = async {
            loop {
                for event in self.since(checked_seq) {
                    checked_seq = event.seq;
                    if pred(&event) {
                        return Some(event);
                    }
                }
                loop {
                    match receiver.recv().await {
                        Ok(event) if event.seq <= checked_seq => {}
                        Ok(event) => {
                            checked_seq = event.seq;
                            if pred(&event) {
                                return Some(event);
                            }
                        }
                        // Fell behind: the missed events are in memory; rescan from there.
                        Err(broadcast::error::RecvError::Lagged(_)) => break,
                        // Unreachable while `self` (which owns the sender) is borrowed.
                        Err(broadcast::error::RecvError::Closed) => return None,
                    }
                }
            }
        };
        tokio::time::timeout(timeout, search).await.ok().flatten()
    }

    /// Waits until every event emitted before the call is written to the log file (or its
    /// write failed), or `timeout` passes; returns whether it got there. Blocking: call it
    /// from a blocking context (shutdown, tests). Returns `true` at once for an in-memory log.
    pub fn flush(&self, timeout: Duration) -> bool {
        let Some(file) = &self.file else { return true };
        let (done, done_receiver) = mpsc::sync_channel(1);
        // Wait for room in the queue too: this is the one caller that chose to block.
        if file.queue.send(WriterMessage::Flush(done)).is_err() {
            return false;
        }
        done_receiver.recv_timeout(timeout).is_ok()
    }

    /// Lines not written to the log file because its queue was full.
    pub fn dropped_file_lines(&self) -> u64 {
        self.file.as_ref().map_or(0, |f| f.dropped_lines.load(Ordering::Relaxed))
    }
}

impl std::fmt::Debug for EventLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLog")
            .field("node", &self.node)
            .field("last_seq", &self.last_seq())
            .field("file", &self.file.as_ref().map(|sink| &sink.path))
            .finish()
    }
}

impl FileSink {
    fn queue_line(&self, event: &Event) {
        let mut line = match serde_json::to_vec(event) {
            Ok(line) => line,
            // Serializing a struct of strings, integers and a `Value` cannot fail.
            Err(e) => {
                tracing::error!("failed to encode event {}: {e}", event.seq);
                return;
            }
        };
        line.push(b'\n');
        match self.queue.try_send(WriterMessage::Line(line)) {
            Ok(()) => {}
            Err(mpsc::TrySendError::Full(_)) => {
                if self.dropped_lines.fetch_add(1, Ordering::Relaxed) == 0 {
                    tracing::warn!(
                        "event log {}: the disk is not keeping up; dropping lines from the file (events stay in memory and `keel events`)",
                        self.path.display()
                    );
                }
            }
            // The writer thread is gone only if it panicked; its panic was reported.
            Err(mpsc::TrySendError::Disconnected(_)) => {}
        }
    }
}

/// The writer thread: one `write` per line, in order, until the log is dropped.
fn write_lines(mut file: File, path: &Path, receiver: mpsc::Receiver<WriterMessage>) {
    let mut failed_writes: u64 = 0;
    for message in receiver {
        match message {
            WriterMessage::Line(line) => match file.write_all(&line) {
                Ok(()) if failed_writes > 0 => {
                    tracing::info!("event log {}: writing again after {failed_writes} failed writes", path.display());
                    failed_writes = 0;
                }
                Ok(()) => {}
                Err(e) => {
                    if failed_writes == 0 {
                        tracing::error!(
                            "failed to append to event log {}: {e}; events stay in memory and `keel events`",
                            path.display()
                        );
                    }
                    failed_writes += 1;
                }
            },
            WriterMessage::Flush(done) => {
                let _ = done.send(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const WAIT: Duration = Duration::from_secs(10);

    #[test]
    fn events_are_numbered_from_one_and_read_back_since_a_seq() {
        let log = EventLog::in_memory("a");
        assert_eq!(log.last_seq(), 0);
        let first = log.emit(Some("demo"), "role", json!({ "from": "standby", "to": "primary" }));
        let second = log.emit(None, "peer", json!({ "connected": true }));
        assert_eq!(first.seq, 1);
        assert_eq!(second.seq, 2);
        assert_eq!(first.node, "a");
        assert_eq!(first.volume.as_deref(), Some("demo"));
        assert_eq!(second.volume, None);
        assert!(first.time_ms > 0);
        assert_eq!(log.since(0), vec![first.clone(), second.clone()]);
        assert_eq!(log.since(1), vec![second]);
        assert!(log.since(2).is_empty());
        assert!(log.since(99).is_empty());
    }

    #[test]
    fn non_object_fields_are_wrapped_in_an_object() {
        let log = EventLog::in_memory("a");
        assert_eq!(log.emit(None, "x", json!(7)).fields, json!({ "value": 7 }));
        assert_eq!(log.emit(None, "x", serde_json::Value::Null).fields, json!({ "value": null }));
    }

    #[test]
    fn memory_keeps_only_the_newest_events() {
        let log = EventLog::in_memory("a");
        let total = MEMORY_EVENTS_MAX as u64 + 10;
        for i in 0..total {
            log.emit(None, "tick", json!({ "i": i }));
        }
        let all = log.since(0);
        assert_eq!(all.len(), MEMORY_EVENTS_MAX);
        assert_eq!(all.first().map(|e| e.seq), Some(11));
        assert_eq!(all.last().map(|e| e.seq), Some(total));
        assert_eq!(log.since(total - 1).len(), 1);
    }

    #[tokio::test]
    async fn subscribers_receive_events_in_order() {
        let log = EventLog::in_memory("a");
        let mut receiver = log.subscribe();
        log.emit(Some("v"), "one", json!({}));
        log.emit(Some("v"), "two", json!({}));
        assert_eq!(receiver.recv().await.map(|e| e.kind).ok().as_deref(), Some("one"));
        assert_eq!(receiver.recv().await.map(|e| e.kind).ok().as_deref(), Some("two"));
    }

    #[tokio::test]
    async fn wait_for_finds_an_event_already_emitted() {
        let log = EventLog::in_memory("a");
        log.emit(Some("v"), "role", json!({ "to": "primary" }));
        let found = log.wait_for(0, WAIT, |e| e.kind == "role").await;
        assert_eq!(found.map(|e| e.seq), Some(1));
        // Events at or before `after_seq` are not considered.
        let found = log.wait_for(1, Duration::from_millis(50), |e| e.kind == "role").await;
        assert_eq!(found, None);
    }

    #[tokio::test]
    async fn wait_for_waits_for_an_event_emitted_later() {
        let log = EventLog::in_memory("a");
        log.emit(None, "noise", json!({}));
        let mark = log.last_seq();
        let emitter = Arc::clone(&log);
        let task = tokio::spawn(async move {
            for i in 0..5 {
                emitter.emit(Some("v"), "resync", json!({ "done_bytes": i }));
                tokio::task::yield_now().await;
            }
        });
        let found = log.wait_for(mark, WAIT, |e| e.kind == "resync" && e.fields["done_bytes"] == 3).await;
        assert_eq!(found.map(|e| e.fields["done_bytes"].clone()), Some(json!(3)));
        task.await.unwrap();
    }

    #[tokio::test]
    async fn wait_for_catches_up_after_lagging() {
        let log = EventLog::in_memory("a");
        let waiter = log.wait_for(0, WAIT, |e| e.fields["i"] == 1500);
        tokio::pin!(waiter);
        // Poll the waiter once so that it subscribes and finds nothing yet (a timeout polls
        // its future before looking at the clock).
        assert!(tokio::time::timeout(Duration::ZERO, &mut waiter).await.is_err());
        // Emit more than the broadcast channel holds, so the waiter lags and must rescan
        // memory.
        for i in 0..2000 {
            log.emit(None, "tick", json!({ "i": i }));
        }
        assert_eq!(waiter.await.map(|e| e.seq), Some(1501));
    }

    #[tokio::test]
    async fn wait_for_times_out() {
        let log = EventLog::in_memory("a");
        log.emit(None, "other", json!({}));
        assert_eq!(log.wait_for(0, Duration::from_millis(20), |e| e.kind == "never").await, None);
    }

    #[test]
    fn file_gets_one_json_line_per_event_appended() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        std::fs::write(&path, "{\"earlier\":\"run\"}\n").unwrap();
        let log = EventLog::open(&path, "b").unwrap();
        let first = log.emit(Some("demo"), "promote", json!({ "epoch": 4 }));
        let second = log.emit(None, "peer", json!({ "connected": false }));
        assert!(log.flush(WAIT));
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert_eq!(lines[0], "{\"earlier\":\"run\"}");
        assert_eq!(serde_json::from_str::<Event>(lines[1]).unwrap(), first);
        assert_eq!(serde_json::from_str::<Event>(lines[2]).unwrap(), second);
        assert_eq!(log.dropped_file_lines(), 0);
    }

    #[test]
    fn dropping_the_log_writes_what_was_queued() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let log = EventLog::open(&path, "b").unwrap();
        for i in 0..100 {
            log.emit(None, "tick", json!({ "i": i }));
        }
        // A flush request queued behind the lines, answered after the log is gone.
        let (done, done_receiver) = mpsc::sync_channel(1);
        let sink = log.file.as_ref().unwrap();
        sink.queue.send(WriterMessage::Flush(done)).unwrap();
        drop(log);
        done_receiver.recv_timeout(WAIT).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 100);
    }

    /// A write error (here: the log file is on a full device) must not fail or block
    /// `emit`; events still reach memory and subscribers.
    #[test]
    fn write_errors_do_not_lose_events_from_memory() {
        let Ok(log) = EventLog::open(Path::new("/dev/full"), "a") else {
            return; // no /dev/full on this machine
        };
        let mut receiver = log.subscribe();
        let event = log.emit(Some("v"), "fenced", json!({ "reason": "lease expired" }));
        log.emit(Some("v"), "fenced", json!({ "reason": "again" }));
        assert!(log.flush(WAIT));
        assert_eq!(log.since(0).len(), 2);
        assert_eq!(receiver.try_recv().ok(), Some(event));
    }

    #[test]
    fn open_fails_for_a_missing_directory() {
        let dir = tempfile::tempdir().unwrap();
        assert!(EventLog::open(&dir.path().join("no/such/dir/events.jsonl"), "a").is_err());
    }
}
