//! Server-level tests over real Unix (and one TCP) sockets.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;

use super::client::*;
use super::mem_export::MemExport;
use super::TestServer;
use crate::nbd::export::Export;
use crate::nbd::server::{ListenAddr, NbdServer};
use crate::Error;

const MIB: u64 = 1024 * 1024;
const KIB: u32 = 1024;

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| seed.wrapping_add((i % 251) as u8)).collect()
}

async fn start(export: &Arc<MemExport>) -> TestServer {
    TestServer::start(vec![Arc::clone(export) as Arc<dyn Export>]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_read_round_trip_simple_and_structured() {
    let export = Arc::new(MemExport::new("disk", 16 * MIB));
    let server = start(&export).await;
    for negotiate in [Negotiate::SIMPLE, Negotiate::FULL] {
        let mut client = TestClient::connect(&server.path, "disk", negotiate).await.unwrap();
        assert_eq!(client.size, 16 * MIB);
        // HAS_FLAGS|SEND_FLUSH|SEND_FUA|SEND_TRIM|SEND_WRITE_ZEROES|CAN_MULTI_CONN|SEND_CACHE|SEND_FAST_ZERO
        assert_eq!(client.transmission_flags, 0x0d6d);
        assert_eq!(client.block_sizes, Some((512, 4096, 32 * 1024 * 1024)));

        let data = pattern(7, 64 * KIB as usize);
        let done = client.write(4096, &data, 0).await.unwrap();
        assert_eq!(done.error, 0);
        let done = client.read(4096, 64 * KIB).await.unwrap();
        assert_eq!(done.error, 0);
        assert_eq!(done.data, data);
        assert_eq!(export.snapshot(4096, data.len()), data);

        // A never-written range reads as zeros; structured replies send it as a hole.
        let done = client.read(8 * MIB, 8 * KIB).await.unwrap();
        assert_eq!(done.data, vec![0; 8 * KIB as usize]);
        assert_eq!(done.hole_chunks, usize::from(negotiate.structured));
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_requests_in_flight_are_answered_out_of_order() {
    const COUNT: u64 = 32;
    // Earlier requests sleep longer, so a server that answers in order (or
    // one at a time) fails the order or the timing assertion.
    let export = Arc::new(
        MemExport::new("disk", MIB).read_delay(|offset| Duration::from_millis((COUNT - 1 - offset / 4096) * 5)),
    );
    let server = start(&export).await;
    let mut client = TestClient::connect(&server.path, "disk", Negotiate::FULL).await.unwrap();
    for i in 0..COUNT {
        let done = client.write(i * 4096, &pattern(i as u8, 4096), 0).await.unwrap();
        assert_eq!(done.error, 0);
    }
    let started = Instant::now();
    let mut cookies = Vec::new();
    for i in 0..COUNT {
        cookies.push((client.send(CMD_READ, 0, i * 4096, 4096, &[]).await.unwrap(), i));
    }
    let mut order = Vec::new();
    for _ in 0..COUNT {
        let done = client.recv().await.unwrap();
        let &(_, i) = cookies.iter().find(|(cookie, _)| *cookie == done.cookie).expect("known cookie");
        assert_eq!(done.error, 0);
        assert_eq!(done.data, pattern(i as u8, 4096), "data of request {i}");
        order.push(i);
    }
    let elapsed = started.elapsed();
    assert_eq!(order.iter().copied().collect::<HashSet<_>>().len(), COUNT as usize);
    assert_ne!(order, (0..COUNT).collect::<Vec<_>>(), "replies came back in request order");
    // Serial execution would take the sum of the delays: 5 ms × (0 + … + 31) = 2.48 s.
    assert!(elapsed < Duration::from_millis(1500), "requests were not concurrent: {elapsed:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_requests_than_the_in_flight_limit_and_large_reads() {
    let export = Arc::new(MemExport::new("disk", 160 * MIB));
    let server = start(&export).await;
    let mut client = TestClient::connect(&server.path, "disk", Negotiate::SIMPLE).await.unwrap();
    // 300 > 128 requests sent before reading any reply: the server must
    // apply backpressure without deadlocking.
    let (mut reader_client, count) = (client, 300u64);
    let sender = async {
        let mut cookies = Vec::new();
        for i in 0..count {
            cookies.push(reader_client.send(CMD_WRITE, 0, i * 4096, 4096, &pattern(i as u8, 4096)).await.unwrap());
        }
        for _ in 0..count {
            assert_eq!(reader_client.recv().await.unwrap().error, 0);
        }
        reader_client
    };
    client =
        tokio::time::timeout(Duration::from_secs(30), sender).await.expect("deadlock with many requests in flight");
    assert_eq!(export.writes.load(Ordering::SeqCst), count);
    assert_eq!(export.snapshot(299 * 4096, 4096), pattern(299u64 as u8, 4096));

    // Four maximum-size writes then reads in flight: more than the 64 MiB byte budget at once.
    let big = 32 * MIB;
    for i in 0..4u64 {
        let payload = pattern(i as u8 + 100, big as usize);
        client.send(CMD_WRITE, 0, 8 * MIB + i * big, big as u32, &payload).await.unwrap();
    }
    for _ in 0..4 {
        assert_eq!(client.recv().await.unwrap().error, 0);
    }
    let mut cookies = Vec::new();
    for i in 0..4u64 {
        cookies.push(client.send(CMD_READ, 0, 8 * MIB + i * big, big as u32, &[]).await.unwrap());
    }
    for _ in 0..4 {
        let done = client.recv().await.unwrap();
        let i = cookies.iter().position(|c| *c == done.cookie).unwrap();
        assert_eq!(done.error, 0);
        assert!(done.data == pattern(i as u8 + 100, big as usize), "32 MiB read {i} mismatched");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fua_write_and_flush_reach_the_export() {
    let export = Arc::new(MemExport::new("disk", MIB));
    let server = start(&export).await;
    let mut client = TestClient::connect(&server.path, "disk", Negotiate::FULL).await.unwrap();
    assert_eq!(client.write(0, &pattern(1, 4096), 0).await.unwrap().error, 0);
    assert_eq!(export.fua_writes.load(Ordering::SeqCst), 0);
    assert_eq!(client.write(4096, &pattern(2, 4096), FLAG_FUA).await.unwrap().error, 0);
    assert_eq!(export.fua_writes.load(Ordering::SeqCst), 1);
    assert_eq!(export.flushes.load(Ordering::SeqCst), 0);
    assert_eq!(client.call(CMD_FLUSH, 0, 0, 0, &[]).await.unwrap().error, 0);
    assert_eq!(export.flushes.load(Ordering::SeqCst), 1);
    // FUA is accepted (and harmless) on FLUSH.
    assert_eq!(client.call(CMD_FLUSH, FLAG_FUA, 0, 0, &[]).await.unwrap().error, 0);
    assert_eq!(export.flushes.load(Ordering::SeqCst), 2);

    // Multi-conn: write on A, flush on B, read on C sees the write.
    let mut b = TestClient::connect(&server.path, "disk", Negotiate::SIMPLE).await.unwrap();
    let mut c = TestClient::connect(&server.path, "disk", Negotiate::SIMPLE).await.unwrap();
    assert_eq!(client.write(8192, &pattern(3, 512), 0).await.unwrap().error, 0);
    assert_eq!(b.call(CMD_FLUSH, 0, 0, 0, &[]).await.unwrap().error, 0);
    assert_eq!(c.read(8192, 512).await.unwrap().data, pattern(3, 512));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trim_write_zeroes_and_block_status() {
    let export = Arc::new(MemExport::new("disk", MIB));
    let server = start(&export).await;
    let mut client = TestClient::connect(&server.path, "disk", Negotiate::FULL).await.unwrap();
    assert_eq!(client.context_id, Some(1));
    let k16 = 16 * KIB;
    assert_eq!(client.write(0, &pattern(9, 64 * KIB as usize), 0).await.unwrap().error, 0);
    // 16K..32K trimmed; 32K..48K zeroed but kept allocated; 48K..64K zeroed, hole allowed.
    assert_eq!(client.call(CMD_TRIM, 0, 16 * 1024, k16, &[]).await.unwrap().error, 0);
    assert_eq!(client.call(CMD_WRITE_ZEROES, FLAG_NO_HOLE, 32 * 1024, k16, &[]).await.unwrap().error, 0);
    assert_eq!(client.call(CMD_WRITE_ZEROES, FLAG_FAST_ZERO | FLAG_FUA, 48 * 1024, k16, &[]).await.unwrap().error, 0);
    let done = client.read(0, 64 * KIB).await.unwrap();
    assert_eq!(&done.data[..16 * 1024], &pattern(9, 64 * 1024)[..16 * 1024]);
    assert!(done.data[16 * 1024..].iter().all(|&b| b == 0));

    let done = client.call(CMD_BLOCK_STATUS, 0, 0, 128 * KIB, &[]).await.unwrap();
    assert_eq!(done.error, 0);
    assert_eq!(done.context_id, Some(1));
    // Merged, clamped to the request, holes are HOLE|ZERO = 3.
    assert_eq!(done.extents, vec![(k16, 0), (k16, 3), (k16, 0), (80 * KIB, 3)]);

    let done = client.call(CMD_BLOCK_STATUS, FLAG_REQ_ONE, 0, 8 * KIB, &[]).await.unwrap();
    assert_eq!(done.extents, vec![(8 * KIB, 0)], "REQ_ONE clamps to the request");
    let done = client.call(CMD_BLOCK_STATUS, FLAG_REQ_ONE, 16 * 1024, 512 * KIB, &[]).await.unwrap();
    assert_eq!(done.extents, vec![(k16, 3)], "REQ_ONE returns exactly one extent");
    let done = client.call(CMD_BLOCK_STATUS, 0, 960 * 1024, 64 * KIB, &[]).await.unwrap();
    assert_eq!(done.extents, vec![(64 * KIB, 3)], "last extent stops at the end of the export");
    server.stop().await;
}

/// (name, command, flags, offset, length, payload, expected error)
type InvalidCase = (&'static str, u16, u16, u64, u32, Vec<u8>, u32);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_requests_get_errors_and_the_connection_stays_usable() {
    let export = Arc::new(MemExport::new("disk", MIB).fail_at(512 * 1024));
    let server = start(&export).await;
    for negotiate in [Negotiate::SIMPLE, Negotiate::FULL] {
        let mut client = TestClient::connect(&server.path, "disk", negotiate).await.unwrap();
        let calls_before = export.calls.load(Ordering::SeqCst);
        let cases: Vec<InvalidCase> = vec![
            ("read beyond EOF", CMD_READ, 0, MIB, 512, vec![], EINVAL),
            ("read crossing EOF", CMD_READ, 0, MIB - 512, 1024, vec![], EINVAL),
            ("trim beyond EOF", CMD_TRIM, 0, MIB, 512, vec![], EINVAL),
            ("write beyond EOF", CMD_WRITE, 0, MIB, 512, vec![1; 512], ENOSPC),
            ("write_zeroes beyond EOF", CMD_WRITE_ZEROES, 0, MIB - 512, 1024, vec![], ENOSPC),
            ("misaligned read offset", CMD_READ, 0, 100, 512, vec![], EINVAL),
            ("misaligned write length", CMD_WRITE, 0, 0, 100, vec![2; 100], EINVAL),
            ("read above 32 MiB", CMD_READ, 0, 0, 32 * 1024 * 1024 + 512, vec![], EINVAL),
            ("unknown command", 42, 0, 0, 512, vec![], EINVAL),
            ("NO_HOLE on READ", CMD_READ, FLAG_NO_HOLE, 0, 512, vec![], EINVAL),
            ("unknown flag", CMD_WRITE, 1 << 9, 0, 512, vec![3; 512], EINVAL),
            ("export I/O failure", CMD_READ, 0, 512 * 1024, 4096, vec![], EIO),
        ];
        for (name, command, flags, offset, length, payload, expected) in cases {
            let done = client.call(command, flags, offset, length, &payload).await.unwrap();
            assert_eq!(done.error, expected, "{name} ({})", if negotiate.structured { "structured" } else { "simple" });
            if negotiate.structured {
                assert!(!done.message.is_empty(), "{name}: structured errors carry a message");
            }
        }
        // Only the injected-failure read reached the export.
        assert_eq!(export.calls.load(Ordering::SeqCst), calls_before + 1);

        let block_status = client.call(CMD_BLOCK_STATUS, 0, 0, 4096, &[]).await.unwrap();
        if negotiate.structured {
            assert_eq!(block_status.error, 0);
        } else {
            assert_eq!(block_status.error, EINVAL, "BLOCK_STATUS without a context");
        }
        // Zero-length requests and CACHE succeed without reaching the export.
        let calls_before = export.calls.load(Ordering::SeqCst);
        for command in [CMD_READ, CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES, CMD_CACHE] {
            assert_eq!(client.call(command, 0, 4096, 0, &[]).await.unwrap().error, 0);
        }
        assert_eq!(client.call(CMD_CACHE, 0, 0, 64 * KIB, &[]).await.unwrap().error, 0);
        assert_eq!(
            client.call(CMD_BLOCK_STATUS, 0, 0, 0, &[]).await.unwrap().error,
            EINVAL,
            "zero-length BLOCK_STATUS cannot succeed"
        );
        assert_eq!(export.calls.load(Ordering::SeqCst), calls_before);

        // Rejected WRITE payloads were consumed: the stream is still in sync.
        let data = pattern(42, 4096);
        assert_eq!(client.write(0, &data, 0).await.unwrap().error, 0);
        assert_eq!(client.read(0, 4096).await.unwrap().data, data);
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_export_refuses_writes() {
    let export = Arc::new(MemExport::new("ro", MIB).read_only(true));
    let server = start(&export).await;
    let mut client = TestClient::connect(&server.path, "ro", Negotiate::FULL).await.unwrap();
    assert_eq!(client.transmission_flags & 0x2, 0x2, "READ_ONLY flag");
    assert_eq!(client.write(0, &[1; 512], 0).await.unwrap().error, EPERM);
    assert_eq!(client.call(CMD_TRIM, 0, 0, 512, &[]).await.unwrap().error, EPERM);
    assert_eq!(client.call(CMD_WRITE_ZEROES, 0, 0, 512, &[]).await.unwrap().error, EPERM);
    assert_eq!(client.read(0, 512).await.unwrap().error, 0);
    server.stop().await;
}

/// Each way a client can misbehave after (or during) the handshake. The
/// server must close that connection and nothing else.
async fn misbehave(server: &TestServer, case: &str) {
    let mut bad = TestClient::connect(&server.path, "disk", Negotiate::FULL).await.unwrap();
    match case {
        "garbage" => bad.stream.write_all(&[0xde; 100]).await.unwrap(),
        "wrong magic" => {
            let mut header = vec![0x25, 0x60, 0x95, 0x14];
            header.extend_from_slice(&[0; 24]);
            bad.stream.write_all(&header).await.unwrap();
        }
        "truncated request" => {
            bad.stream.write_all(&0x2560_9513u32.to_be_bytes()).await.unwrap();
            bad.stream.write_all(&[0; 10]).await.unwrap();
            bad.stream.shutdown().await.unwrap();
        }
        "vanish mid-payload" => {
            let mut header = 0x2560_9513u32.to_be_bytes().to_vec();
            header.extend_from_slice(&[0, 0, 0, 1]);
            header.extend_from_slice(&[0; 16]);
            header.extend_from_slice(&(64 * KIB).to_be_bytes());
            header.extend_from_slice(&[7; 100]);
            bad.stream.write_all(&header).await.unwrap();
            bad.stream.shutdown().await.unwrap();
        }
        "oversized write" => {
            let mut header = 0x2560_9513u32.to_be_bytes().to_vec();
            header.extend_from_slice(&[0, 0, 0, 1]);
            header.extend_from_slice(&[0; 16]);
            header.extend_from_slice(&(32 * 1024 * 1024 + 512u32).to_be_bytes());
            bad.stream.write_all(&header).await.unwrap();
        }
        other => panic!("unknown case {other}"),
    }
    bad.expect_closed().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misbehaving_clients_are_closed_without_affecting_others() {
    let export = Arc::new(MemExport::new("disk", MIB));
    let server = start(&export).await;
    let mut good = TestClient::connect(&server.path, "disk", Negotiate::FULL).await.unwrap();
    // A slow request in flight on the good connection while others misbehave.
    for (i, case) in
        ["garbage", "wrong magic", "truncated request", "vanish mid-payload", "oversized write"].into_iter().enumerate()
    {
        let data = pattern(i as u8, 4096);
        let cookie = good.send(CMD_WRITE, 0, 4096 * i as u64, 4096, &data).await.unwrap();
        misbehave(&server, case).await;
        let done = good.recv().await.unwrap();
        assert_eq!((done.cookie, done.error), (cookie, 0), "after {case}");
        assert_eq!(good.read(4096 * i as u64, 4096).await.unwrap().data, data, "after {case}");
    }
    // Garbage during the handshake: a bad option magic.
    let mut raw = tokio::net::UnixStream::connect(&server.path).await.unwrap();
    let mut greeting = [0u8; 18];
    tokio::io::AsyncReadExt::read_exact(&mut raw, &mut greeting).await.unwrap();
    raw.write_all(&3u32.to_be_bytes()).await.unwrap();
    raw.write_all(b"IHAVEOPX\0\0\0\x07\0\0\0\0").await.unwrap();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), tokio::io::AsyncReadExt::read_to_end(&mut raw, &mut rest))
        .await
        .expect("server did not close after a bad option magic");
    assert!(read.is_ok() && rest.is_empty(), "no reply to a bad option magic: {read:?} {rest:?}");
    // A new client still gets served.
    let mut late = TestClient::connect(&server.path, "disk", Negotiate::SIMPLE).await.unwrap();
    assert_eq!(late.read(0, 4096).await.unwrap().data, pattern(0, 4096));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disc_finishes_outstanding_requests_then_closes() {
    let export = Arc::new(MemExport::new("disk", MIB).write_delay(Duration::from_millis(200)));
    let server = start(&export).await;
    let mut client = TestClient::connect(&server.path, "disk", Negotiate::FULL).await.unwrap();
    let data = pattern(5, 4096);
    let cookie = client.send(CMD_WRITE, 0, 0, 4096, &data).await.unwrap();
    client.send(CMD_DISC, 0, 0, 0, &[]).await.unwrap();
    let done = client.recv().await.unwrap();
    assert_eq!((done.cookie, done.error), (cookie, 0));
    client.expect_closed().await;
    assert_eq!(export.snapshot(0, 4096), data);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_answers_in_flight_requests_and_removes_the_socket() {
    let export = Arc::new(MemExport::new("disk", MIB).write_delay(Duration::from_millis(300)));
    let server = start(&export).await;
    let mut client = TestClient::connect(&server.path, "disk", Negotiate::SIMPLE).await.unwrap();
    let cookie = client.send(CMD_WRITE, 0, 0, 4096, &pattern(8, 4096)).await.unwrap();
    // Shut down only once the write is inside the export (it then takes 300 ms there).
    tokio::time::timeout(Duration::from_secs(10), async {
        while export.calls.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the write never reached the export");
    let path = server.path.clone();
    server.shutdown.cancel();
    let done = client.recv().await.unwrap();
    assert_eq!((done.cookie, done.error), (cookie, 0));
    client.expect_closed().await;
    tokio::time::timeout(Duration::from_secs(10), server.task).await.unwrap().unwrap();
    assert!(!path.exists(), "socket file removed on shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_by_name_default_and_removal() {
    let a = Arc::new(MemExport::new("a", MIB));
    let b = Arc::new(MemExport::new("b", 2 * MIB));
    let server = TestServer::start(vec![a.clone() as Arc<dyn Export>, b.clone() as Arc<dyn Export>]).await;
    assert!(matches!(
        NbdServer::new(vec![a.clone() as Arc<dyn Export>, a.clone() as Arc<dyn Export>]),
        Err(Error::DuplicateExport { .. })
    ));
    let mut on_b = TestClient::connect(&server.path, "b", Negotiate::FULL).await.unwrap();
    assert_eq!(on_b.size, 2 * MIB);
    // Two exports: no default.
    assert!(TestClient::connect(&server.path, "", Negotiate::SIMPLE).await.is_err());
    assert!(TestClient::connect(&server.path, "nope", Negotiate::SIMPLE).await.is_err());
    assert!(server.server.remove_export("a").is_some());
    assert!(TestClient::connect(&server.path, "a", Negotiate::SIMPLE).await.is_err());
    // One export left: the empty name selects it; the open connection is unaffected.
    let empty_name = TestClient::connect(&server.path, "", Negotiate::SIMPLE).await.unwrap();
    assert_eq!(empty_name.size, 2 * MIB);
    assert_eq!(on_b.read(0, 512).await.unwrap().error, 0);
    server.server.add_export(a).unwrap();
    assert!(TestClient::connect(&server.path, "a", Negotiate::SIMPLE).await.is_ok());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_listener_on_port_zero() {
    let export = Arc::new(MemExport::new("disk", MIB));
    let server = NbdServer::new(vec![export as Arc<dyn Export>]).unwrap();
    let listener = server.bind_tcp("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let ListenAddr::Tcp(addr) = listener.local_addr().unwrap() else {
        panic!("not a TCP address");
    };
    assert_ne!(addr.port(), 0);
    let shutdown = crate::CancellationToken::new();
    let task = tokio::spawn(listener.serve(shutdown.clone()));
    let mut client = TestClient::connect_tcp(addr, "disk", Negotiate::FULL).await.unwrap();
    assert_eq!(client.write(0, &pattern(1, 512), 0).await.unwrap().error, 0);
    assert_eq!(client.read(0, 512).await.unwrap().data, pattern(1, 512));
    shutdown.cancel();
    client.expect_closed().await;
    tokio::time::timeout(Duration::from_secs(10), task).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bind_unix_replaces_stale_sockets_only() {
    let dir = tempfile::tempdir().unwrap();
    let server = NbdServer::new(vec![Arc::new(MemExport::new("disk", MIB)) as Arc<dyn Export>]).unwrap();
    // A regular file is not touched.
    let file = dir.path().join("file");
    std::fs::write(&file, b"keep").unwrap();
    assert!(matches!(server.bind_unix(&file).await, Err(Error::NotASocket { .. })));
    assert_eq!(std::fs::read(&file).unwrap(), b"keep");
    // A stale socket (no listener) is replaced.
    let path = dir.path().join("nbd.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let live = server.bind_unix(&path).await.unwrap();
    // A live one is not.
    assert!(matches!(server.bind_unix(&path).await, Err(Error::Io { .. })));
    drop(live);
}
