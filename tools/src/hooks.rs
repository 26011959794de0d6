//! Role-change hooks: the commands that move the service with the volume (`on_promote`
//! mounts the filesystem, starts PostgreSQL and takes the service address; `on_demote` stops
//! them). See design-fencing.md, "Moving the service, not just the volume".
//!
//! A hook runs as `sh -c COMMAND` in its own process group, with the caller's `KEEL_*`
//! variables added to the daemon's environment, stdin from `/dev/null`, and stdout and stderr
//! sharing one pipe so that its output keeps its order. [`run_hook`] waits for `sh` to exit
//! or for the timeout; on timeout it kills the whole process group, so a hook that started a
//! child which hangs does not leave it behind. Its result is recorded as a `hook` event.
//!
//! A hook that exits in time may leave background processes running (that is how a service
//! gets started); they are not killed. If they still hold the output pipe, the output written
//! after `sh` exited is not waited for beyond [`OUTPUT_DRAIN_GRACE`], and a task keeps
//! reading (and discarding) it, so those processes never get `EPIPE` from the closed pipe.

use std::collections::VecDeque;
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keel_net::events::EventLog;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;

/// Bytes of a hook's output kept for its outcome (the last ones).
pub const OUTPUT_TAIL_BYTES: usize = 4096;

/// How long to keep collecting output after `sh` exited, when its background children keep
/// the pipe open. Output written before `sh` exited is already in the pipe and is read at
/// once; this only bounds the wait for the end of the pipe.
pub const OUTPUT_DRAIN_GRACE: Duration = Duration::from_millis(100);

/// What happened when a hook ran.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HookOutcome {
    /// Which hook (`on_promote`, `on_demote`).
    pub hook: String,
    /// The shell command.
    pub command: String,
    /// It exited with status 0 before the timeout.
    pub success: bool,
    /// Its exit code, if it exited (not when killed by a signal or not started).
    pub exit_code: Option<i32>,
    /// It ran past its timeout and its process group was killed.
    pub timed_out: bool,
    /// From spawning to exit (or to the kill after the timeout).
    pub duration_ms: u64,
    /// The last [`OUTPUT_TAIL_BYTES`] of its combined stdout and stderr (invalid UTF-8
    /// replaced), or why it could not be started.
    pub output_tail: String,
}

/// Runs `sh -c command` with `env` added (the caller sets `KEEL_VOLUME`, `KEEL_EPOCH`,
/// `KEEL_NBD_URI`, `KEEL_ROLE`, `KEEL_NODE`), in its own process group; on timeout kills the
/// whole group with SIGKILL and reports `timed_out`. Emits a `hook` event (its fields are the
/// outcome) for `volume` and returns the outcome. Never panics; a failure to start is an
/// unsuccessful outcome with the error in `output_tail`.
///
/// Not cancel-safe in the sense that matters: dropping the future kills the hook's process
/// group (the hook did not complete) and emits no event.
pub async fn run_hook(
    hook: &str,
    command: &str,
    env: &[(String, String)],
    timeout: Duration,
    events: &EventLog,
    volume: &str,
) -> HookOutcome {
    let started = Instant::now();
    let (exit_code, timed_out, output_tail) = match run(command, env, timeout).await {
        Ok(ran) => ran,
        Err(e) => (None, false, format!("failed to run hook {hook} (sh -c {command:?}): {e}")),
    };
    let outcome = HookOutcome {
        hook: hook.to_string(),
        command: command.to_string(),
        success: exit_code == Some(0) && !timed_out,
        exit_code,
        timed_out,
        duration_ms: started.elapsed().as_millis() as u64,
        output_tail,
    };
    if !outcome.success {
        let how = if outcome.timed_out {
            format!("timed out after {timeout:?} and was killed")
        } else {
            match outcome.exit_code {
                Some(code) => format!("exited with status {code}"),
                None => "was killed by a signal or did not start".to_string(),
            }
        };
        tracing::warn!(volume, "hook {hook} ({command:?}) {how}; output: {}", outcome.output_tail.trim_end());
    }
    let fields =
        serde_json::to_value(&outcome).unwrap_or_else(|e| serde_json::json!({ "encode_error": e.to_string() }));
    events.emit(Some(volume), "hook", fields);
    outcome
}

/// Runs the hook: (exit code, timed out, output tail).
async fn run(
    command: &str,
    env: &[(String, String)],
    timeout: Duration,
) -> std::io::Result<(Option<i32>, bool, String)> {
    let (output_read, output_write) = pipe()?;
    let mut child = {
        // Scoped so that the parent's copies of the pipe's write end (held by `Command`)
        // close right after spawning; otherwise the reader never sees the end of the pipe.
        let mut sh = tokio::process::Command::new("sh");
        sh.arg("-c")
            .arg(command)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::from(output_write.try_clone()?))
            .stderr(Stdio::from(output_write))
            .process_group(0);
        sh.spawn()?
    };
    // The group id is the child's pid (process_group(0)); `id()` is `Some` until it is reaped.
    let group = GroupKiller { pgid: child.id().and_then(|pid| libc::pid_t::try_from(pid).ok()) };
    let tail = Arc::new(Mutex::new(Tail::default()));
    let reader = tokio::spawn(read_output(output_read, Arc::clone(&tail)));

    let (status, timed_out) = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(status) => (status?, false),
        Err(_elapsed) => {
            // Kill before reaping: until `sh` is reaped its pid, and so the group id, cannot
            // be reused by an unrelated process.
            group.kill();
            (child.wait().await?, true)
        }
    };
    group.disarm();

    let mut reader = reader;
    if tokio::time::timeout(OUTPUT_DRAIN_GRACE, &mut reader).await.is_err() {
        // Background processes still hold the pipe: leave the task reading so they never
        // write to a closed pipe; it ends when they close it.
        drop(reader);
    }
    let output_tail = tail.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).to_string();
    Ok((status.code(), timed_out, output_tail))
}

/// Kills a process group when dropped, unless disarmed: a hook whose caller gave up on it
/// (the future was dropped) does not keep running.
struct GroupKiller {
    pgid: Option<libc::pid_t>,
}

impl GroupKiller {
    fn kill(&self) {
        if let Some(pgid) = self.pgid {
            // SAFETY: kill(2) takes plain integers; a negative pid names the process group.
            // `pgid` is a positive pid of our unreaped child, so this never means "every
            // process" (-1) or our own group (0).
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
        }
    }

    fn disarm(mut self) {
        self.pgid = None;
    }
}

impl Drop for GroupKiller {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The last [`OUTPUT_TAIL_BYTES`] read.
#[derive(Default)]
struct Tail {
    bytes: VecDeque<u8>,
    dropped_bytes: u64,
}

impl Tail {
    fn push(&mut self, data: &[u8]) {
        self.bytes.extend(data);
        let excess = self.bytes.len().saturating_sub(OUTPUT_TAIL_BYTES);
        self.bytes.drain(..excess);
        self.dropped_bytes += excess as u64;
    }
}

impl std::fmt::Display for Tail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.dropped_bytes > 0 {
            writeln!(f, "[… {} earlier bytes not kept]", self.dropped_bytes)?;
        }
        let (front, back) = self.bytes.as_slices();
        f.write_str(&String::from_utf8_lossy(&[front, back].concat()))
    }
}

async fn read_output(pipe: OwnedFd, tail: Arc<Mutex<Tail>>) {
    let mut pipe = match tokio::net::unix::pipe::Receiver::from_owned_fd(pipe) {
        Ok(pipe) => pipe,
        Err(e) => {
            tail.lock().unwrap_or_else(|p| p.into_inner()).push(format!("[failed to read output: {e}]").as_bytes());
            return;
        }
    };
    let mut buf = [0u8; 4096];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) => return,
            Ok(n) => tail.lock().unwrap_or_else(|p| p.into_inner()).push(buf.get(..n).unwrap_or_default()),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                tail.lock().unwrap_or_else(|p| p.into_inner()).push(format!("[failed to read output: {e}]").as_bytes());
                return;
            }
        }
    }
}

/// A pipe (read end, write end), both close-on-exec (`Command` dups the write end onto the
/// child's stdout and stderr).
fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 writes two file descriptors into the two-element array it is given.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both are open descriptors that nothing else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

#[cfg(test)]
mod tests {
    use super::*;

    const WAIT: Duration = Duration::from_secs(20);

    fn env(volume: &str) -> Vec<(String, String)> {
        vec![
            ("KEEL_VOLUME".into(), volume.into()),
            ("KEEL_EPOCH".into(), "7".into()),
            ("KEEL_NBD_URI".into(), "nbd+unix:///demo?socket=/tmp/x.sock".into()),
            ("KEEL_ROLE".into(), "primary".into()),
            ("KEEL_NODE".into(), "a".into()),
        ]
    }

    #[tokio::test]
    async fn a_successful_hook_sees_its_environment_and_emits_an_event() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let command =
            format!("echo \"$KEEL_VOLUME $KEEL_EPOCH $KEEL_ROLE $KEEL_NODE $KEEL_NBD_URI\" > '{}'", out.display());
        let events = EventLog::in_memory("a");
        let outcome = run_hook("on_promote", &command, &env("demo"), WAIT, &events, "demo").await;
        assert!(outcome.success, "{outcome:?}");
        assert_eq!(outcome.exit_code, Some(0));
        assert!(!outcome.timed_out);
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "demo 7 primary a nbd+unix:///demo?socket=/tmp/x.sock\n");
        let recorded = events.since(0);
        assert_eq!(recorded.len(), 1);
        let event = &recorded[0];
        assert_eq!(event.kind, "hook");
        assert_eq!(event.volume.as_deref(), Some("demo"));
        assert_eq!(event.fields["hook"], "on_promote");
        assert_eq!(event.fields["success"], true);
        assert_eq!(event.fields["exit_code"], 0);
        assert_eq!(event.fields["command"], command.as_str());
    }

    #[tokio::test]
    async fn a_failing_hook_reports_its_exit_code_and_output_in_order() {
        let events = EventLog::in_memory("a");
        let command = "echo to-stdout; echo to-stderr >&2; echo again; exit 3";
        let outcome = run_hook("on_demote", command, &[], WAIT, &events, "demo").await;
        assert!(!outcome.success);
        assert_eq!(outcome.exit_code, Some(3));
        assert!(!outcome.timed_out);
        assert_eq!(outcome.output_tail, "to-stdout\nto-stderr\nagain\n");
        assert_eq!(events.since(0)[0].fields["exit_code"], 3);
        assert_eq!(events.since(0)[0].fields["success"], false);
    }

    #[tokio::test]
    async fn only_the_tail_of_long_output_is_kept() {
        let events = EventLog::in_memory("a");
        // 2000 lines of 10 bytes, then a marker.
        let command = "i=0; while [ $i -lt 2000 ]; do echo 'xxxxxxxxx'; i=$((i+1)); done; echo THE-END";
        let outcome = run_hook("on_promote", command, &[], WAIT, &events, "demo").await;
        assert!(outcome.success, "{outcome:?}");
        assert!(outcome.output_tail.ends_with("xxxxxxxxx\nTHE-END\n"), "{}", outcome.output_tail);
        let expected_dropped = 2000 * 10 + 8 - OUTPUT_TAIL_BYTES;
        assert!(outcome.output_tail.starts_with(&format!("[… {expected_dropped} earlier bytes not kept]\n")));
    }

    #[tokio::test]
    async fn a_missing_shell_command_is_an_unsuccessful_outcome() {
        let events = EventLog::in_memory("a");
        let outcome = run_hook("on_promote", "/no/such/program", &[], WAIT, &events, "demo").await;
        assert!(!outcome.success);
        assert_eq!(outcome.exit_code, Some(127));
        assert!(outcome.output_tail.contains("/no/such/program"), "{}", outcome.output_tail);
    }

    /// The hook started a grandchild that keeps running; the timeout must kill the whole
    /// process group, not only `sh`, or the grandchild would hold the service half-started.
    #[tokio::test]
    async fn a_timeout_kills_the_hooks_whole_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("grandchild.pid");
        let ready_file = dir.path().join("ready");
        // The grandchild writes its pid, then the hook signals it is ready and waits forever.
        let command = format!(
            "sh -c 'echo $$ > \"{pid}.tmp\"; mv \"{pid}.tmp\" \"{pid}\"; exec sleep 1000' & \
             while [ ! -s '{pid}' ]; do :; done; echo started; touch '{ready}'; wait",
            pid = pid_file.display(),
            ready = ready_file.display()
        );
        let events = EventLog::in_memory("a");
        let outcome = run_hook("on_promote", &command, &[], Duration::from_secs(3), &events, "demo").await;
        assert!(outcome.timed_out, "{outcome:?}");
        assert!(!outcome.success);
        assert_eq!(outcome.exit_code, None);
        // The hook got as far as starting the grandchild before the timeout.
        assert!(ready_file.exists(), "the hook did not start its grandchild within the timeout: {outcome:?}");
        assert_eq!(outcome.output_tail, "started\n");
        let grandchild: libc::pid_t = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
        wait_until_gone(grandchild, WAIT);
        assert_eq!(events.since(0)[0].fields["timed_out"], true);
    }

    /// Starting a service is what `on_promote` is for: a hook that exits in time may leave a
    /// background process running (holding the output pipe); it must not be killed, and the
    /// hook must not wait for it.
    #[tokio::test]
    async fn a_hook_may_leave_a_service_running() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("service.pid");
        let command = format!(
            "sh -c 'echo $$ > \"{0}.tmp\"; mv \"{0}.tmp\" \"{0}\"; echo service-output; exec sleep 1000' & \
             while [ ! -s '{0}' ]; do :; done; echo hook-done",
            pid_file.display()
        );
        let events = EventLog::in_memory("a");
        let outcome = run_hook("on_promote", &command, &[], WAIT, &events, "demo").await;
        assert!(outcome.success, "{outcome:?}");
        assert!(outcome.output_tail.contains("hook-done"), "{outcome:?}");
        let service: libc::pid_t = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
        // SAFETY: signal 0 only checks that the process exists.
        assert_eq!(unsafe { libc::kill(service, 0) }, 0, "the hook's service was killed");
        // SAFETY: `service` is the sleep this test started.
        unsafe { libc::kill(service, libc::SIGKILL) };
        wait_until_gone(service, WAIT);
    }

    /// Waits until `pid` no longer runs (it may stay a zombie if no init reaps it here).
    fn wait_until_gone(pid: libc::pid_t, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            // SAFETY: signal 0 only checks that the process exists.
            let exists = unsafe { libc::kill(pid, 0) } == 0;
            let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|stat| stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z')))
                .unwrap_or(false);
            if !exists || zombie {
                return;
            }
            assert!(Instant::now() < deadline, "process {pid} still runs after the hook was killed");
            std::thread::yield_now();
        }
    }

    #[tokio::test]
    async fn dropping_a_running_hook_kills_it() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        let command = format!("echo $$ > '{0}.tmp'; mv '{0}.tmp' '{0}'; exec sleep 1000", pid_file.display());
        let events = EventLog::in_memory("a");
        // Boxed, so that `drop` below really drops the future (a stack-pinned one would live
        // to the end of the scope).
        let mut hook = Box::pin(run_hook("on_promote", &command, &[], WAIT, &events, "demo"));
        let deadline = Instant::now() + WAIT;
        while !pid_file.exists() {
            assert!(Instant::now() < deadline, "the hook never started");
            // Drive the hook a little without finishing it (it sleeps for 1000 s).
            assert!(tokio::time::timeout(Duration::from_millis(10), &mut hook).await.is_err());
        }
        drop(hook);
        let pid: libc::pid_t = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
        wait_until_gone(pid, WAIT);
        assert!(events.since(0).is_empty());
    }
}
