//! The NBD path end to end on one machine: a blocking client
//! (`keel_benches::nbd_client`) talks over a Unix socket to `keel_net::NbdServer` serving
//! a real volume (through `keel_tools::export::VolumeExport`, as the daemon does) in the
//! same process.
//!
//! - `write` / `read`: 4 KiB and 1 MiB requests, at queue depth 1 (the latency of one
//!   request) and with a window in flight (the throughput a pipelining client such as
//!   fio's nbd engine or nbdcopy sees). Writes are plain WRITEs (no FUA), reads hit data
//!   written beforehand (page cache).
//! - `write_flush`: 4 KiB WRITE then FLUSH at depth 1, the cost a database `fsync` pays.
//!
//! Each runs against the `posix` and the `io_uring` backend (the daemon's `auto` picks
//! io_uring when the kernel allows it).
//!
//! The time of one iteration is one request (or one write+flush pair); with a window,
//! that is the inverse of the request rate, not the latency of a single request. Run:
//! `cargo bench -p keel-benches --bench nbd_unix`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use keel_benches::nbd_client::{Command, NbdClient, TFLAG_SEND_FLUSH};
use keel_benches::{env, open_volume, pattern, scratch_dir, InProcessServer};
use keel_engine::{Env, IoBackend};

const VOLUME_BYTES: u64 = 4 << 30;
/// Writes cycle over this much of the volume.
const WRITE_SPAN_BYTES: u64 = 1 << 30;
/// Reads cycle over this much, written once before the read benchmarks.
const READ_SPAN_BYTES: u64 = 64 << 20;
/// (request size, requests in flight).
const SHAPES: [(usize, usize); 4] = [(4 << 10, 1), (4 << 10, 16), (1 << 20, 1), (1 << 20, 4)];

fn nbd_unix(c: &mut Criterion) {
    for backend in [IoBackend::Posix, IoBackend::Uring] {
        let Some(env) = env(backend) else {
            eprintln!("nbd_unix: skipping backend {backend:?}: the kernel refuses it");
            continue;
        };
        serve_and_bench(c, env);
    }
}

fn serve_and_bench(c: &mut Criterion, env: Arc<dyn Env>) {
    let dir = scratch_dir();
    let backend = env.backend_name();
    let volume = open_volume(env, dir.path(), VOLUME_BYTES);
    let socket = dir.path().join("nbd.sock");
    let server = InProcessServer::start(volume, &socket);
    let mut client = NbdClient::connect(&socket, "bench").expect("connect to the in-process NBD server");
    assert!(client.flags() & TFLAG_SEND_FLUSH != 0, "server must advertise FLUSH");
    assert_eq!(client.size(), VOLUME_BYTES);

    let mut group = c.benchmark_group("nbd_unix");
    for (size, depth) in SHAPES {
        let mut data = pattern(size);
        let per_span = WRITE_SPAN_BYTES / size as u64;
        let mut next = 0u64;
        group.throughput(Throughput::Bytes(size as u64));
        let id = BenchmarkId::new("write", format!("backend={backend}/size={size}/qd={depth}"));
        group.bench_function(id, |b| {
            b.iter_custom(|iters| {
                let first = next;
                next += iters;
                let started = Instant::now();
                client
                    .pipeline(Command::Write, iters, depth, &mut data, |i| ((first + i) % per_span) * size as u64)
                    .expect("NBD writes");
                started.elapsed()
            })
        });
    }

    // Fill the read span once so reads return data rather than holes.
    let fill = pattern(1 << 20);
    for offset in (0..READ_SPAN_BYTES).step_by(fill.len()) {
        client.write(offset, &fill).expect("fill the read span");
    }
    for (size, depth) in SHAPES {
        let mut buf = vec![0u8; size];
        let per_span = READ_SPAN_BYTES / size as u64;
        let mut next = 0u64;
        group.throughput(Throughput::Bytes(size as u64));
        let id = BenchmarkId::new("read", format!("backend={backend}/size={size}/qd={depth}"));
        group.bench_function(id, |b| {
            b.iter_custom(|iters| {
                let first = next;
                next += iters;
                let started = Instant::now();
                client
                    .pipeline(Command::Read, iters, depth, &mut buf, |i| ((first + i) % per_span) * size as u64)
                    .expect("NBD reads");
                started.elapsed()
            })
        });
    }

    let data = pattern(4096);
    let mut offset = 0u64;
    group.throughput(Throughput::Elements(1));
    group.bench_function(BenchmarkId::new("write_flush", format!("backend={backend}/size=4096/qd=1")), |b| {
        b.iter(|| {
            client.write(offset, &data).expect("NBD write");
            client.flush().expect("NBD flush");
            offset = (offset + 4096) % WRITE_SPAN_BYTES;
        })
    });
    group.finish();

    client.disconnect().expect("disconnect");
    server.stop();
}

criterion_group! {
    name = benches;
    // Short runs for a 2-vCPU box (docs/benchmarks.md); raise for a quiet machine.
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .nresamples(10_000);
    targets = nbd_unix
}
criterion_main!(benches);
