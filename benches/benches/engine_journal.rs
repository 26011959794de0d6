//! The engine's journal, driven through the public `Volume` API on a real directory
//! (`$KEEL_BENCH_DIR` or the temp dir; see `keel_benches::scratch_dir`).
//!
//! - `append`: `Volume::write` with `PersistMode::Buffered` (journal append + apply to the
//!   block store's page cache, no sync) for 4 KiB, 64 KiB and 1 MiB writes, with the
//!   background checkpointer on, so long runs include checkpoint pressure as the daemon
//!   sees it.
//! - `flush`: N threads each write 4 KiB then call `Volume::flush`; the time reported is
//!   the mean time one `flush` call takes (measured inside each thread, averaged over the
//!   threads), and the throughput is N flushes per iteration. With group commit, 16
//!   flushers should cost about as much per call as 1.
//!
//! Both run for each I/O backend the kernel allows (`posix`, and `io_uring` when the kernel
//! allows it). Run: `cargo bench -p keel-benches --bench engine_journal`.

use std::hint::black_box;
use std::os::unix::fs::FileExt;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput};
use keel_benches::{env, open_volume, pattern, scratch_dir};
use keel_engine::{IoBackend, PersistMode};

/// Sparse, so its size costs nothing; big enough that writes never wrap onto pages a
/// checkpoint is still syncing within one measurement.
const VOLUME_BYTES: u64 = 4 << 30;
/// Writes cycle over this much of the volume.
const WRITE_SPAN_BYTES: u64 = 1 << 30;
/// Named in benchmark ids as the engine names them (`Env::backend_name`).
const BACKENDS: [IoBackend; 2] = [IoBackend::Posix, IoBackend::Uring];

fn append(c: &mut Criterion) {
    let mut group = c.benchmark_group("engine_journal");
    for backend in BACKENDS {
        let Some(env) = env(backend) else {
            eprintln!("engine_journal/append: skipping backend {backend:?}: the kernel refuses it");
            continue;
        };
        let backend_name = env.backend_name();
        let dir = scratch_dir();
        let volume = open_volume(env, dir.path(), VOLUME_BYTES);
        for size in [4usize << 10, 64 << 10, 1 << 20] {
            let data = pattern(size);
            let mut offset = 0u64;
            group.throughput(Throughput::Bytes(size as u64));
            let id = BenchmarkId::new("append", format!("backend={backend_name}/persist=buffered/size={size}"));
            group.bench_function(id, |b| {
                b.iter(|| {
                    let seq = volume.write(offset, &data, PersistMode::Buffered).expect("buffered write");
                    offset = (offset + size as u64) % WRITE_SPAN_BYTES;
                    black_box(seq)
                })
            });
        }
        volume.close().expect("close the volume");
    }
    group.finish();
}

/// Runs `flushers` threads that each call `step(thread, i)` for `i` in `0..iters`,
/// starting together, and returns the mean over threads of the time their steps reported.
fn per_thread_mean(flushers: usize, iters: u64, step: impl Fn(u64, u64) -> Duration + Sync) -> Duration {
    let start_together = Barrier::new(flushers);
    let spent: Duration = std::thread::scope(|s| {
        let threads: Vec<_> = (0..flushers as u64)
            .map(|thread| {
                let (step, start_together) = (&step, &start_together);
                s.spawn(move || {
                    start_together.wait();
                    (0..iters).map(|i| step(thread, i)).sum::<Duration>()
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().expect("flusher thread")).sum()
    });
    spent / flushers as u32
}

/// Each flusher thread owns a 4 MiB window and walks it 4 KiB at a time.
fn flusher_offset(thread: u64, i: u64) -> u64 {
    thread * (4 << 20) + (i % 1024) * 4096
}

const FLUSHERS: [usize; 3] = [1, 4, 16];

fn flush(c: &mut Criterion) {
    let mut group = c.benchmark_group("engine_journal");
    // Each iteration is a sync of a millisecond or so: flat sampling keeps the iteration
    // count per sample constant instead of ramping it up.
    group.sampling_mode(SamplingMode::Flat);
    let data = pattern(4096);

    // Baseline on the same disk, measured minutes apart at most: what the bare syscalls cost
    // (pwrite 4 KiB, then fdatasync) on a file whose blocks are already written, with no
    // group commit: every thread syncs for itself.
    {
        let dir = scratch_dir();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(dir.path().join("baseline.img"))
            .expect("create the baseline file");
        let window = pattern(4 << 20);
        for thread in 0..FLUSHERS[FLUSHERS.len() - 1] as u64 {
            file.write_all_at(&window, thread * (4 << 20)).expect("lay out the baseline file");
        }
        file.sync_all().expect("sync the baseline file");
        for flushers in FLUSHERS {
            group.throughput(Throughput::Elements(flushers as u64));
            let id = BenchmarkId::new("flush", format!("baseline=pwrite+fdatasync/flushers={flushers}/write=4096"));
            group.bench_function(id, |b| {
                b.iter_custom(|iters| {
                    per_thread_mean(flushers, iters, |thread, i| {
                        file.write_all_at(&data, flusher_offset(thread, i)).expect("pwrite");
                        let started = Instant::now();
                        file.sync_data().expect("fdatasync");
                        started.elapsed()
                    })
                })
            });
        }
    }

    for backend in BACKENDS {
        let Some(env) = env(backend) else {
            eprintln!("engine_journal/flush: skipping backend {backend:?}: the kernel refuses it");
            continue;
        };
        let backend_name = env.backend_name();
        let dir = scratch_dir();
        let volume = open_volume(env, dir.path(), VOLUME_BYTES);
        for flushers in FLUSHERS {
            group.throughput(Throughput::Elements(flushers as u64));
            let id = BenchmarkId::new("flush", format!("backend={backend_name}/flushers={flushers}/write=4096"));
            group.bench_function(id, |b| {
                b.iter_custom(|iters| {
                    per_thread_mean(flushers, iters, |thread, i| {
                        volume.write(flusher_offset(thread, i), &data, PersistMode::Buffered).expect("write");
                        let started = Instant::now();
                        black_box(volume.flush().expect("flush"));
                        started.elapsed()
                    })
                })
            });
        }
        volume.close().expect("close the volume");
    }
    group.finish();
}

criterion_group! {
    name = benches;
    // Short runs for a 2-vCPU box (docs/benchmarks.md); raise for a quiet machine.
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2))
        .nresamples(10_000);
    targets = append, flush
}
criterion_main!(benches);
