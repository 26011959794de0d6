//! What a snapshot's bulk reads of a block store file do to the volume's writes of that
//! same file (benches/compare/store_reads.sh).
//!
//! One thread writes 4 KiB pages at random offsets of FILE with buffered `pwrite`s, as the
//! volume's applier writes its block store, and records each write's latency; another reads
//! the file from start to end, over and over, in requests of READ bytes:
//! - `none`: no reader (the baseline);
//! - `direct`: `O_DIRECT` reads (`UncachedReader`, what an image source uses);
//! - `store`: the block store's bulk read (`Storage::read_uncached`: `RWF_DONTCACHE`, or
//!   plain cached reads where the kernel refuses that flag), what a frozen view uses.
//!
//! Prints one JSON line: the write latency percentiles, the writes done and the bytes read.
//! Usage: `store-read-lock FILE none|direct|store READ_BYTES SECONDS`

use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use keel_engine::{AlignedBuf, Env, IoBackend, OpenMode, PosixEnv, UncachedReader};

fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().collect();
    let [_, path, mode, read_bytes, seconds] = args.as_slice() else {
        return Err("usage: store-read-lock FILE none|direct|store READ_BYTES SECONDS".into());
    };
    let read_bytes: usize = read_bytes.parse().map_err(|e| format!("READ_BYTES {read_bytes:?}: {e}"))?;
    let seconds: u64 = seconds.parse().map_err(|e| format!("SECONDS {seconds:?}: {e}"))?;
    if read_bytes == 0 || read_bytes % 4096 != 0 {
        return Err(format!("READ_BYTES {read_bytes}: a positive multiple of 4096"));
    }
    let store = PosixEnv::new(IoBackend::Posix)
        .open(Path::new(path), OpenMode::Existing)
        .map_err(|e| format!("open {path}: {e}"))?;
    let size = store.len().map_err(|e| format!("{path}: {e}"))?;
    let pages = size / 4096;
    if size < read_bytes as u64 || pages == 0 {
        return Err(format!("{path}: {size} bytes, smaller than one read"));
    }
    let direct = match mode.as_str() {
        "direct" => Some(UncachedReader::new(std::fs::File::open(path).map_err(|e| format!("open {path}: {e}"))?)),
        "none" | "store" => None,
        other => return Err(format!("mode {other:?}: none, direct or store")),
    };

    let stop = AtomicBool::new(false);
    let read = AtomicU64::new(0);
    let mut latencies = Vec::new();
    std::thread::scope(|scope| -> Result<(), String> {
        let reader = (mode != "none").then(|| {
            scope.spawn(|| -> Result<(), String> {
                let mut buf = AlignedBuf::zeroed(read_bytes);
                let mut offset = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let done = match &direct {
                        Some(direct) => direct.read_exact_at(&mut buf, offset),
                        None => store.read_uncached(&mut buf, offset),
                    };
                    done.map_err(|e| format!("read at {offset}: {e}"))?;
                    read.fetch_add(read_bytes as u64, Ordering::Relaxed);
                    offset += read_bytes as u64;
                    if offset + read_bytes as u64 > size {
                        offset = 0;
                    }
                }
                Ok(())
            })
        });
        // A fixed-seed xorshift: the same offsets in every mode.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let page = [0x5au8; 4096];
        let end = Instant::now() + Duration::from_secs(seconds);
        let mut failed = None;
        while Instant::now() < end {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let at = (x % pages) * 4096;
            let started = Instant::now();
            if let Err(e) = store.write_at(&page, at) {
                failed = Some(format!("write at {at}: {e}"));
                break;
            }
            latencies.push(started.elapsed());
        }
        stop.store(true, Ordering::Relaxed);
        if let Some(reader) = reader {
            reader.join().map_err(|_| "the reader panicked".to_string())??;
        }
        failed.map_or(Ok(()), Err)
    })?;

    latencies.sort_unstable();
    let at = |q: f64| latencies.get(((latencies.len().saturating_sub(1)) as f64 * q) as usize).copied();
    let us = |d: Option<Duration>| d.map_or(0.0, |d| d.as_secs_f64() * 1e6);
    println!(
        "{}",
        serde_json::json!({
            "mode": mode,
            "read_bytes": read_bytes,
            "seconds": seconds,
            "writes": latencies.len(),
            "write_p50_us": us(at(0.5)),
            "write_p99_us": us(at(0.99)),
            "write_p999_us": us(at(0.999)),
            "write_max_us": us(latencies.last().copied()),
            "read_mib_s": read.load(Ordering::Relaxed) as f64 / (1 << 20) as f64 / seconds as f64,
            "dontcache": dontcache_taken(Path::new(path)),
        })
    );
    Ok(())
}

/// Whether this kernel and the file's filesystem take `RWF_DONTCACHE` (else `store` reads
/// were plain cached reads).
fn dontcache_taken(path: &Path) -> bool {
    let Ok(file) = std::fs::File::open(path) else { return false };
    let mut byte = [0u8; 1];
    let iov = libc::iovec { iov_base: byte.as_mut_ptr().cast(), iov_len: 1 };
    // SAFETY: `iov` describes `byte`, writable for the call. 0x80 is RWF_DONTCACHE.
    unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, 0, 0x80) >= 0 }
}
