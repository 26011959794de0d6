//! Running external programs (qemu-io, nbdcopy, fio, mkfs, ...) from tests: every run has
//! a deadline, its output is captured, and a failure message carries the command line and
//! everything it printed. Also small helpers to wait for a condition without fixed sleeps.

use std::io::Read;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// What a finished command printed.
#[derive(Debug)]
pub struct Output {
    /// The command line, for messages.
    pub command: String,
    /// Exit status.
    pub status: ExitStatus,
    /// Standard output (lossy UTF-8).
    pub stdout: String,
    /// Standard error (lossy UTF-8).
    pub stderr: String,
}

impl Output {
    /// Standard output followed by standard error.
    pub fn combined(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }

    /// A description for assertion messages.
    pub fn describe(&self) -> String {
        format!(
            "`{}` exited with {}\n--- stdout:\n{}\n--- stderr:\n{}",
            self.command, self.status, self.stdout, self.stderr
        )
    }
}

fn command_line(cmd: &Command) -> String {
    let mut line = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        line.push(' ');
        let arg = arg.to_string_lossy();
        if arg.contains(' ') || arg.is_empty() {
            line.push_str(&format!("'{arg}'"));
        } else {
            line.push_str(&arg);
        }
    }
    line
}

/// Runs `cmd` to completion (stdin closed, output captured), killing it after `timeout`.
/// Returns its output whatever its exit status; see [`run_ok`].
pub fn run(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let command = command_line(cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("failed to start `{command}`"))?;
    let mut out_pipe = child.stdout.take().context("stdout")?;
    let mut err_pipe = child.stderr.take().context("stderr")?;
    let out_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = out_pipe.read_to_end(&mut buf);
        buf
    });
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = err_pipe.read_to_end(&mut buf);
        buf
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let stdout = String::from_utf8_lossy(&out_reader.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&err_reader.join().unwrap_or_default()).into_owned();
    match status {
        Some(status) => Ok(Output { command, status, stdout, stderr }),
        None => {
            bail!("`{command}` did not finish within {timeout:?}; killed\n--- stdout:\n{stdout}\n--- stderr:\n{stderr}")
        }
    }
}

/// Like [`run`], but a non-zero exit status is an error carrying the whole output.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let output = run(cmd, timeout)?;
    if !output.status.success() {
        bail!("{}", output.describe());
    }
    Ok(output)
}

/// Polls `condition` until it returns `Some`, failing after `timeout` with `what`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut condition: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    let started = Instant::now();
    loop {
        if let Some(value) = condition()? {
            return Ok(value);
        }
        if started.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `text` without ANSI escape sequences (the daemon's log may be coloured).
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            // Parameters and intermediates, then one final byte in '@'..='~'.
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The SHA-256 of `data`, in hex (by `sha256sum`, which every Debian machine has).
pub fn sha256(data: &[u8]) -> Result<String> {
    use std::io::Write;
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("failed to start sha256sum")?;
    let mut stdin = child.stdin.take().context("stdin")?;
    let data = data.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&data));
    let output = child.wait_with_output()?;
    writer.join().map_err(|_| anyhow::anyhow!("writer thread panicked"))??;
    if !output.status.success() {
        bail!("sha256sum failed: {}", output.status);
    }
    first_word(&output.stdout)
}

/// The SHA-256 of a file, in hex.
pub fn sha256_file(path: &std::path::Path) -> Result<String> {
    let output = run_ok(Command::new("sha256sum").arg(path), Duration::from_secs(120))?;
    first_word(output.stdout.as_bytes())
}

fn first_word(bytes: &[u8]) -> Result<String> {
    let text = String::from_utf8_lossy(bytes);
    let hash = text.split_whitespace().next().context("sha256sum printed nothing")?;
    if hash.len() != 64 {
        bail!("unexpected sha256sum output {text:?}");
    }
    Ok(hash.to_string())
}
