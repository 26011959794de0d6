//! `quic-probe`: the QUIC transport's latency and throughput on this machine, with the
//! settings replication uses (`keel_net::quic::endpoint` with `TransportConfig::default()`:
//! mutual TLS 1.3 with rustls/ring, 16 MiB stream / 64 MiB connection windows, 4 MiB UDP
//! socket buffers, 1 ms initial RTT), between two processes on 127.0.0.1 — the shape of a
//! primary and its standby under `keel up`.
//!
//! The yardsticks for `benches/compare/replication.sh`:
//!
//! - `rtt`: on one bidirectional stream, the client writes N bytes, the server reads them
//!   and answers 8 bytes, the client waits for those. That is a replicated FLUSH minus the
//!   standby's fdatasync: a record plus a sync request out, an acknowledgement back.
//!   N = 64 B and 4 KiB; p50/p90/p99/mean over `--iterations` round trips after a warm-up.
//! - `bulk`: `--bulk-mib` MiB written as 1 MiB `write_chunk`s on one stream (the send half
//!   of a bidirectional stream, as the journal stream is), the server reads to the end and
//!   answers with the byte count and its CPU time. Time = first write to that answer.
//!   This is the ceiling for replicated sequential writes: the journal crosses the same
//!   transport, plus the engine's work on both ends.
//!
//! Output: one JSON object per line on stdout (`{"probe": "rtt", ...}`,
//! `{"probe": "bulk", ...}`); progress on stderr.
//!
//! Usage: `quic-probe [--iterations N] [--bulk-mib M] [--bulk-runs R]`. The server side is
//! this binary again (`quic-probe serve DIR`), started and stopped by the client.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use keel_net::quic::{self, Identity, TlsFiles, TransportConfig};
use serde_json::json;

const ALPN: &[u8] = b"keel-probe/1";
const SERVER: &str = "probe-server";
const CLIENT: &str = "probe-client";
/// Round trips discarded before measuring (connection warm-up, congestion window).
const WARMUP_ITERATIONS: usize = 1000;
/// First byte of each stream: what the client wants from it.
const STREAM_RTT: u8 = 1;
const STREAM_BULK: u8 = 2;
const ACK_LEN: usize = 8;
const CHUNK_BYTES: usize = 1 << 20;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let outcome = if args.first().map(String::as_str) == Some("serve") {
        match args.get(1) {
            Some(dir) => serve(Path::new(dir)),
            None => Err("usage: quic-probe serve DIR".into()),
        }
    } else {
        Options::parse(&args).and_then(|options| probe(&options))
    };
    if let Err(e) = outcome {
        eprintln!("quic-probe: {e}");
        std::process::exit(1);
    }
}

struct Options {
    iterations: usize,
    bulk_mib: usize,
    bulk_runs: usize,
}

impl Options {
    fn parse(args: &[String]) -> Result<Self> {
        let mut options = Self { iterations: 20_000, bulk_mib: 1024, bulk_runs: 3 };
        let mut args = args.iter();
        while let Some(flag) = args.next() {
            let mut value = || -> Result<usize> {
                let text = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
                text.parse().map_err(|e| format!("{flag} {text:?}: {e}").into())
            };
            match flag.as_str() {
                "--iterations" => options.iterations = value()?,
                "--bulk-mib" => options.bulk_mib = value()?,
                "--bulk-runs" => options.bulk_runs = value()?,
                other => return Err(format!("unknown argument {other:?}").into()),
            }
        }
        Ok(options)
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    // As `keel daemon`: a multi-thread runtime with one worker per CPU.
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("probe-io").build()?)
}

/// The client side: makes the certificates, starts the server process, runs the probes.
fn probe(options: &Options) -> Result<()> {
    let dir = tempfile::Builder::new().prefix("keel-quic-probe-").tempdir()?;
    let validity = Duration::from_secs(24 * 3600);
    quic::create_ca(dir.path(), "probe", validity)?;
    quic::issue_cert(dir.path(), SERVER, dir.path(), validity)?;
    quic::issue_cert(dir.path(), CLIENT, dir.path(), validity)?;
    let mut server = ServerProcess::start(dir.path())?;
    let identity = Identity::load(&TlsFiles::in_dir(dir.path(), CLIENT))?;
    let addr = server.addr;
    let result = runtime()?.block_on(async move {
        let bind: SocketAddr = "127.0.0.1:0".parse()?;
        let endpoint = quic::endpoint(bind, &identity, &TransportConfig::default(), &[ALPN], vec![SERVER.into()])?;
        let conn = quic::connect(&endpoint, addr, SERVER).await?;
        for payload in [64usize, 4096] {
            rtt(&conn, payload, options.iterations).await?;
        }
        for run in 1..=options.bulk_runs {
            bulk(&conn, options.bulk_mib, run).await?;
        }
        conn.close(0u32.into(), b"done");
        endpoint.wait_idle().await;
        Result::Ok(())
    });
    server.stop();
    result
}

/// Ping-pong of `payload` bytes out, [`ACK_LEN`] bytes back, on one stream.
async fn rtt(conn: &quinn::Connection, payload: usize, iterations: usize) -> Result<()> {
    eprintln!("quic-probe: rtt, {payload} B, {iterations} round trips");
    let (mut send, mut recv) = conn.open_bi().await?;
    let mut hello = vec![STREAM_RTT];
    hello.extend_from_slice(&(payload as u32).to_le_bytes());
    send.write_all(&hello).await?;
    let message = vec![0x5a_u8; payload];
    let mut ack = [0u8; ACK_LEN];
    let mut samples_ns = Vec::with_capacity(iterations);
    let lost_before = conn.stats().path.lost_packets;
    for i in 0..WARMUP_ITERATIONS + iterations {
        let started = Instant::now();
        send.write_all(&message).await?;
        recv.read_exact(&mut ack).await?;
        if i >= WARMUP_ITERATIONS {
            samples_ns.push(started.elapsed().as_nanos() as u64);
        }
    }
    send.finish()?;
    samples_ns.sort_unstable();
    let us = |ns: u64| ns as f64 / 1000.0;
    let pct = |p: f64| us(samples_ns[((samples_ns.len() - 1) as f64 * p / 100.0).round() as usize]);
    let mean = samples_ns.iter().sum::<u64>() as f64 / samples_ns.len() as f64 / 1000.0;
    let line = json!({
        "probe": "rtt", "payload_bytes": payload, "iterations": iterations,
        "p50_us": pct(50.0), "p90_us": pct(90.0), "p99_us": pct(99.0), "mean_us": mean,
        "max_us": us(*samples_ns.last().unwrap_or(&0)),
        "lost_packets": conn.stats().path.lost_packets - lost_before,
    });
    println!("{line}");
    Ok(())
}

/// `mib` MiB in 1 MiB chunks on one stream; the server answers with what it received.
async fn bulk(conn: &quinn::Connection, mib: usize, run: usize) -> Result<()> {
    eprintln!("quic-probe: bulk, {mib} MiB in 1 MiB writes, run {run}");
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(&[STREAM_BULK]).await?;
    // A non-repeating pattern; the bytes themselves cost nothing here, AEAD does not care.
    let chunk = Bytes::from((0..CHUNK_BYTES).map(|i| (i * 7 + i / 4096) as u8).collect::<Vec<u8>>());
    let lost_before = conn.stats().path.lost_packets;
    let cpu_before = cpu_seconds();
    let started = Instant::now();
    for _ in 0..mib {
        send.write_chunk(chunk.clone()).await?;
    }
    send.finish()?;
    let mut answer = [0u8; 16];
    recv.read_exact(&mut answer).await?;
    let seconds = started.elapsed().as_secs_f64();
    let client_cpu = cpu_seconds() - cpu_before;
    let received = u64::from_le_bytes(answer[..8].try_into()?);
    let server_cpu = f64::from_bits(u64::from_le_bytes(answer[8..].try_into()?));
    let sent = (mib * CHUNK_BYTES) as u64;
    if received != sent {
        return Err(format!("the server received {received} bytes of {sent}").into());
    }
    let gib = sent as f64 / f64::from(1u32 << 30);
    let line = json!({
        "probe": "bulk", "run": run, "bytes": sent, "write_bytes": CHUNK_BYTES, "seconds": seconds,
        "mib_per_s": sent as f64 / f64::from(1u32 << 20) / seconds,
        "client_cpu_s_per_gib": client_cpu / gib, "server_cpu_s_per_gib": server_cpu / gib,
        "lost_packets": conn.stats().path.lost_packets - lost_before,
    });
    println!("{line}");
    Ok(())
}

/// The server process: one endpoint, answers every stream of every connection until the
/// client closes the connection.
fn serve(dir: &Path) -> Result<()> {
    let identity = Identity::load(&TlsFiles::in_dir(dir, SERVER))?;
    runtime()?.block_on(async move {
        let bind: SocketAddr = "127.0.0.1:0".parse()?;
        let endpoint = quic::endpoint(bind, &identity, &TransportConfig::default(), &[ALPN], vec![CLIENT.into()])?;
        println!("listening {}", endpoint.local_addr()?);
        std::io::stdout().flush()?;
        let incoming = endpoint.accept().await.ok_or("endpoint closed")?;
        let (conn, _peer) = quic::accept(incoming, &[CLIENT.to_string()]).await?;
        loop {
            let (send, recv) = match conn.accept_bi().await {
                Ok(streams) => streams,
                Err(quinn::ConnectionError::ApplicationClosed(_)) => return Ok(()),
                Err(e) => return Err(e.into()),
            };
            tokio::spawn(async move {
                if let Err(e) = answer(send, recv).await {
                    eprintln!("quic-probe serve: stream failed: {e}");
                }
            });
        }
    })
}

async fn answer(mut send: quinn::SendStream, mut recv: quinn::RecvStream) -> Result<()> {
    let mut kind = [0u8; 1];
    recv.read_exact(&mut kind).await?;
    match kind[0] {
        STREAM_RTT => {
            let mut len = [0u8; 4];
            recv.read_exact(&mut len).await?;
            let mut message = vec![0u8; u32::from_le_bytes(len) as usize];
            let ack = [0u8; ACK_LEN];
            loop {
                match recv.read_exact(&mut message).await {
                    Ok(()) => send.write_all(&ack).await?,
                    Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(()),
                    Err(e) => return Err(e.into()),
                }
            }
        }
        STREAM_BULK => {
            let cpu_before = cpu_seconds();
            let mut received = 0u64;
            while let Some(chunk) = recv.read_chunk(usize::MAX, true).await? {
                received += chunk.bytes.len() as u64;
            }
            let cpu = cpu_seconds() - cpu_before;
            let mut answer = received.to_le_bytes().to_vec();
            answer.extend_from_slice(&cpu.to_bits().to_le_bytes());
            send.write_all(&answer).await?;
            send.finish()?;
            Ok(())
        }
        other => Err(format!("unknown stream kind {other}").into()),
    }
}

/// CPU time (user + system, all threads) this process has used.
fn cpu_seconds() -> f64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes one `rusage` into the pointer, which points at one.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) };
    if rc != 0 {
        return f64::NAN;
    }
    // SAFETY: getrusage succeeded, so it initialised the struct (zeroed before anyway).
    let usage = unsafe { usage.assume_init() };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// The server side, run as a child process of this binary; killed when dropped.
struct ServerProcess {
    child: Child,
    addr: SocketAddr,
}

impl ServerProcess {
    fn start(dir: &Path) -> Result<Self> {
        let exe: PathBuf = std::env::current_exe()?;
        let mut child = Command::new(exe)
            .arg("serve")
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let Some(addr) = line.trim().strip_prefix("listening ") else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("the server process printed {line:?}").into());
        };
        let addr = addr.parse()?;
        Ok(Self { child, addr })
    }

    /// Waits briefly for the server to exit after the connection closed, then kills it.
    fn stop(&mut self) {
        for _ in 0..50 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
