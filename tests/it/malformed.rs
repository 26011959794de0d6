//! Misbehaving NBD clients on raw sockets: garbage instead of a handshake, bad magics,
//! oversized lengths, truncated requests, out-of-range and unknown requests. Each bad
//! client gets an error reply (and keeps a usable connection) or loses its own connection;
//! meanwhile a well-behaved client on the same daemon keeps writing, reading back and
//! flushing without a single error, and the daemon's log names every connection it closed.

use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use keel_tests::cmd::{strip_ansi, wait_for};
use keel_tests::daemon::Daemon;
use keel_tests::nbd_client::{NbdClient, NbdError};
use rand::{RngCore, SeedableRng};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 32 * MIB;
const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_TRIM: u16 = 4;
const WAIT: Duration = Duration::from_secs(30);

fn request(flags: u16, command: u16, cookie: u64, offset: u64, length: u32) -> Vec<u8> {
    let mut header = Vec::with_capacity(28);
    header.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    header.extend_from_slice(&flags.to_be_bytes());
    header.extend_from_slice(&command.to_be_bytes());
    header.extend_from_slice(&cookie.to_be_bytes());
    header.extend_from_slice(&offset.to_be_bytes());
    header.extend_from_slice(&length.to_be_bytes());
    header
}

/// Sends one raw request (with `payload`) and returns the errno of its simple reply.
fn raw_request(client: &mut NbdClient, command: u16, flags: u16, offset: u64, length: u32, payload: &[u8]) -> u32 {
    const COOKIE: u64 = 0x6b65_656c_0000_0001;
    let stream = client.stream();
    stream.write_all(&request(flags, command, COOKIE, offset, length)).unwrap();
    stream.write_all(payload).unwrap();
    let mut reply = [0u8; 16];
    stream.read_exact(&mut reply).unwrap();
    assert_eq!(u32::from_be_bytes(reply[0..4].try_into().unwrap()), SIMPLE_REPLY_MAGIC, "bad reply magic");
    assert_eq!(u64::from_be_bytes(reply[8..16].try_into().unwrap()), COOKIE, "reply for another cookie");
    u32::from_be_bytes(reply[4..8].try_into().unwrap())
}

fn errno_of(result: anyhow::Result<()>) -> u32 {
    match result {
        Ok(()) => 0,
        Err(e) => e.downcast_ref::<NbdError>().unwrap_or_else(|| panic!("not an NBD error reply: {e:#}")).0,
    }
}

/// Reads until the server closes the connection; fails if it stays open for `WAIT`.
/// Returns what arrived before the close.
fn expect_closed(stream: &mut UnixStream, what: &str) -> Vec<u8> {
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return received,
            Ok(n) => received.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return received,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("{what}: the server kept the connection open for {WAIT:?}")
            }
            Err(e) => panic!("{what}: {e}"),
        }
    }
}

/// A fresh connection that has read the server's greeting.
fn greeted(socket: &Path) -> UnixStream {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let mut greeting = [0u8; 18];
    stream.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[0..8], b"NBDMAGIC");
    stream
}

/// A well-behaved client: writes a fresh random block, reads it back, flushes, over and
/// over on its own region, until told to stop. Any error or mismatch is recorded.
fn good_client(
    socket: &Path,
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicU64>,
) -> std::thread::JoinHandle<Result<(), String>> {
    let socket = socket.to_path_buf();
    std::thread::spawn(move || {
        let mut client = NbdClient::connect(&socket, "vol").map_err(|e| format!("connect: {e:#}"))?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut data = vec![0u8; 64 * 1024];
        let mut back = vec![0u8; data.len()];
        let mut round = 0u64;
        while !stop.load(Ordering::SeqCst) {
            rng.fill_bytes(&mut data);
            let offset = (round % 128) * data.len() as u64; // the first 8 MiB
            client.write(offset, &data, round % 7 == 0).map_err(|e| format!("round {round}: write: {e:#}"))?;
            client.read(offset, &mut back).map_err(|e| format!("round {round}: read: {e:#}"))?;
            if back != data {
                return Err(format!("round {round}: read back different data at {offset}"));
            }
            client.flush().map_err(|e| format!("round {round}: flush: {e:#}"))?;
            round += 1;
            rounds.store(round, Ordering::SeqCst);
        }
        client.disconnect().map_err(|e| format!("disconnect: {e:#}"))
    })
}

/// The connection still works after a rejected request: write, read back, compare.
fn check_usable(client: &mut NbdClient, step: &str) {
    let data = vec![0x5au8; 4096];
    client.write(16 * MIB, &data, false).unwrap_or_else(|e| panic!("after {step}: write: {e:#}"));
    let mut back = vec![0u8; 4096];
    client.read(16 * MIB, &mut back).unwrap_or_else(|e| panic!("after {step}: read: {e:#}"));
    assert_eq!(back, data, "after {step}");
}

fn daemon_alive(daemon: &Daemon) -> bool {
    // A dead child stays a zombie until reaped, so look at its state, not just its pid.
    let Some(pid) = daemon.pid() else { return false };
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
        .unwrap_or(false)
}

#[test]
fn misbehaving_clients_lose_only_their_own_connection() {
    let daemon = Daemon::start(&[("vol", "32MiB")]).unwrap();
    let socket = daemon.socket();
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    let good = good_client(&socket, stop.clone(), rounds.clone());
    let progressed = |at_least: u64| {
        wait_for("the good client to make progress", WAIT, || {
            if good.is_finished() {
                anyhow::bail!("the good client stopped early");
            }
            Ok((rounds.load(Ordering::SeqCst) >= at_least).then_some(()))
        })
        .unwrap()
    };
    progressed(10);

    // 1. Garbage instead of the client flags (an HTTP client on the wrong port).
    {
        let mut stream = UnixStream::connect(&socket).unwrap();
        stream.write_all(b"GET / HTTP/1.1\r\nHost: keel\r\n\r\n").unwrap();
        let received = expect_closed(&mut stream, "garbage before the handshake");
        assert!(received.len() <= 18, "the server answered garbage with {} bytes", received.len());
    }
    // 2. An option with the wrong magic.
    {
        let mut stream = greeted(&socket);
        stream.write_all(&3u32.to_be_bytes()).unwrap();
        let mut option = Vec::new();
        option.extend_from_slice(&0x1122_3344_5566_7788u64.to_be_bytes());
        option.extend_from_slice(&7u32.to_be_bytes());
        option.extend_from_slice(&0u32.to_be_bytes());
        stream.write_all(&option).unwrap();
        expect_closed(&mut stream, "wrong option magic");
    }
    // 3. An option announcing 2 GiB of data.
    {
        let mut stream = greeted(&socket);
        stream.write_all(&3u32.to_be_bytes()).unwrap();
        let mut option = Vec::new();
        option.extend_from_slice(&IHAVEOPT.to_be_bytes());
        option.extend_from_slice(&7u32.to_be_bytes());
        option.extend_from_slice(&0x7fff_ffffu32.to_be_bytes());
        stream.write_all(&option).unwrap();
        expect_closed(&mut stream, "oversized option");
    }
    // 4. A client that hangs up in the middle of the handshake.
    {
        let mut stream = greeted(&socket);
        stream.write_all(&3u32.to_be_bytes()).unwrap();
        stream.write_all(&IHAVEOPT.to_be_bytes()[..5]).unwrap();
        stream.shutdown(Shutdown::Write).unwrap();
        expect_closed(&mut stream, "hang-up during the handshake");
    }
    progressed(rounds.load(Ordering::SeqCst) + 5);

    // 5. Bad requests that get an error reply, on a connection that stays usable.
    {
        let mut client = NbdClient::connect(&socket, "vol").unwrap();
        assert_eq!(client.size(), SIZE);
        let mut buf = vec![0u8; 4096];
        assert_eq!(errno_of(client.read(SIZE, &mut buf)), EINVAL, "read past the end");
        check_usable(&mut client, "read past the end");
        assert_eq!(errno_of(client.read(SIZE - 512, &mut buf)), EINVAL, "read across the end");
        assert_eq!(errno_of(client.write(SIZE - 512, &buf, false)), ENOSPC, "write across the end");
        check_usable(&mut client, "write across the end");
        assert_eq!(errno_of(client.write(SIZE, &buf, true)), ENOSPC, "FUA write past the end");
        assert_eq!(errno_of(client.write_zeroes(SIZE - 4096, 8192)), ENOSPC, "zeroes across the end");
        assert_eq!(errno_of(client.trim(SIZE, 4096)), EINVAL, "trim past the end");
        assert_eq!(errno_of(client.write(16 * MIB + 100, &buf, false)), EINVAL, "misaligned write");
        check_usable(&mut client, "misaligned write");
        assert_eq!(raw_request(&mut client, CMD_READ, 0, u64::MAX - 511, 4096, &[]), EINVAL, "offset overflow");
        assert_eq!(raw_request(&mut client, CMD_READ, 0, 0, 32 * MIB as u32 + 4096, &[]), EINVAL, "read > 32 MiB");
        check_usable(&mut client, "oversized read");
        assert_eq!(raw_request(&mut client, 0x42, 0, 0, 4096, &[]), EINVAL, "unknown command");
        check_usable(&mut client, "unknown command");
        assert_eq!(raw_request(&mut client, CMD_READ, 0x4000, 0, 4096, &[]), EINVAL, "unknown flag");
        assert_eq!(raw_request(&mut client, CMD_TRIM, 0x0002, 0, 4096, &[]), EINVAL, "NO_HOLE on TRIM");
        check_usable(&mut client, "unknown flag");
        // A rejected WRITE's payload is read and dropped, so the stream stays in step.
        let payload = vec![0xeeu8; 8192];
        assert_eq!(raw_request(&mut client, CMD_WRITE, 0, SIZE - 4096, 8192, &payload), ENOSPC, "raw write");
        check_usable(&mut client, "rejected write with payload");
        let mut zero = [0u8; 4096];
        client.read(SIZE - 4096, &mut zero).unwrap();
        assert!(zero.iter().all(|&b| b == 0), "a rejected write changed the volume");
        client.disconnect().unwrap();
    }

    // 6. A request header cut short, then the client closes.
    {
        let mut client = NbdClient::connect(&socket, "vol").unwrap();
        let stream = client.stream();
        stream.write_all(&request(0, CMD_READ, 1, 0, 4096)[..13]).unwrap();
        stream.shutdown(Shutdown::Write).unwrap();
        expect_closed(stream, "truncated request header");
    }
    // 7. A WRITE whose payload never fully arrives.
    {
        let mut client = NbdClient::connect(&socket, "vol").unwrap();
        let stream = client.stream();
        stream.write_all(&request(0, CMD_WRITE, 1, 20 * MIB, 65536)).unwrap();
        stream.write_all(&[0xaa; 1000]).unwrap();
        stream.shutdown(Shutdown::Write).unwrap();
        expect_closed(stream, "truncated WRITE payload");
    }
    // 8. A WRITE longer than the 32 MiB maximum payload: the stream cannot be resynchronised.
    {
        let mut client = NbdClient::connect(&socket, "vol").unwrap();
        let stream = client.stream();
        stream.write_all(&request(0, CMD_WRITE, 1, 0, 32 * MIB as u32 + 4096)).unwrap();
        let _ = stream.write_all(&[0xaa; 65536]);
        let received = expect_closed(stream, "oversized WRITE");
        assert!(received.is_empty(), "oversized WRITE got a reply: {received:?}");
    }
    // 9. A request with the wrong magic.
    {
        let mut client = NbdClient::connect(&socket, "vol").unwrap();
        let stream = client.stream();
        let mut header = request(0, CMD_READ, 1, 0, 4096);
        header[0] ^= 0xff;
        stream.write_all(&header).unwrap();
        expect_closed(stream, "bad request magic");
    }

    // The good client kept going through all of it, and the daemon is alive and serving.
    progressed(rounds.load(Ordering::SeqCst) + 10);
    stop.store(true, Ordering::SeqCst);
    good.join().unwrap().unwrap_or_else(|e| panic!("the well-behaved client failed: {e}\n{}", daemon.log()));
    assert!(daemon_alive(&daemon), "the daemon died:\n{}", daemon.log());
    let mut fresh = NbdClient::connect(&socket, "vol").unwrap();
    let mut buf = vec![0u8; 4096];
    fresh.read(16 * MIB, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0x5a));
    fresh.flush().unwrap();
    fresh.disconnect().unwrap();

    // Every connection closed for misbehaving is in the log, with its connection id and
    // the peer (this process) and the reason.
    let peer = format!("peer=unix pid={}", std::process::id());
    let reasons = [
        "closing connection during handshake: client handshake flags: unknown or unoffered flag bits",
        "closing connection during handshake: option header: bad magic",
        "closing connection during handshake: option data: length 2147483647 exceeds",
        "closing connection during handshake: failed to read option header",
        "closing connection: request header: truncated",
        "closing connection: failed to read WRITE payload",
        "closing connection: WRITE payload: length 33558528 exceeds the limit of 33554432",
        "closing connection: request header: bad magic",
    ];
    let log = wait_for("the daemon to log every closed connection", WAIT, || {
        let log = strip_ansi(&daemon.log());
        let all = reasons.iter().all(|reason| {
            log.lines().any(|line| line.contains(reason) && line.contains("nbd_connection{id=") && line.contains(&peer))
        });
        Ok(all.then_some(log))
    });
    if let Err(e) = log {
        let log = strip_ansi(&daemon.log());
        let missing: Vec<_> = reasons.iter().filter(|r| !log.contains(*r)).collect();
        panic!("{e}: missing {missing:?} (peer {peer}) in:\n{log}");
    }
    let log = strip_ansi(&daemon.log());
    for line in log.lines() {
        assert!(!line.contains("panicked"), "the daemon panicked: {line}");
    }
}
