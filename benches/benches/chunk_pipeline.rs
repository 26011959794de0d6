//! The snapshot chunk pipeline on one core, in bytes of plaintext per second.
//!
//! - `id`: the keyed BLAKE3 chunk id alone (`TenantKey::chunk_id`).
//! - `encode`: `encode_chunk` = id + zstd (kept only when it saves ≥ 1/16) + XChaCha20-Poly1305
//!   + CRC32, at zstd levels 1 and 3.
//! - `decode`: `decode_chunk` = CRC + AEAD open + zstd decompress + id re-hash.
//!
//! For 64 KiB, 256 KiB and 1 MiB chunks of (a) random data (compression tried and
//! rejected) and (b) a compressible text-like pattern. No I/O.
//! Run: `cargo bench -p keel-benches --bench chunk_pipeline`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use keel_snapshot::{decode_chunk, encode_chunk, TenantKey};

const SIZES: [usize; 3] = [64 << 10, 256 << 10, 1 << 20];
const LEVELS: [i32; 2] = [1, 3];

/// Incompressible bytes (xorshift64, all 8 bytes of each state). Not `keel_benches::pattern`:
/// that sets the low bit of every byte, so zstd shrinks it by 1/8 and it is not "random".
fn random(len: usize) -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Text-like rows with a counter: compresses well, but not to nothing.
fn compressible(len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 64);
    let mut row = 0u64;
    while out.len() < len {
        out.extend_from_slice(format!("{row:08}|customer-{:05}|balance={:>10}|ok\n", row % 977, row * 37).as_bytes());
        row += 1;
    }
    out.truncate(len);
    out
}

fn inputs() -> Vec<(&'static str, usize, Vec<u8>)> {
    let mut inputs = Vec::new();
    for size in SIZES {
        inputs.push(("random", size, random(size)));
        inputs.push(("text", size, compressible(size)));
    }
    inputs
}

fn chunk_pipeline(c: &mut Criterion) {
    let key = TenantKey::from_bytes([0x42; 32]);
    let mut group = c.benchmark_group("chunk_pipeline");
    for (kind, size, data) in inputs() {
        group.throughput(Throughput::Bytes(size as u64));
        let name = format!("data={kind}/size={size}");
        group.bench_function(BenchmarkId::new("id", &name), |b| b.iter(|| black_box(key.chunk_id(black_box(&data)))));
        for level in LEVELS {
            let (_, frame) = encode_chunk(&key, &data, level).expect("encode");
            eprintln!(
                "chunk_pipeline: {name} level={level}: frame {} bytes ({:.3} of plaintext)",
                frame.len(),
                frame.len() as f64 / size as f64
            );
            group.bench_function(BenchmarkId::new("encode", format!("{name}/level={level}")), |b| {
                b.iter(|| black_box(encode_chunk(&key, black_box(&data), level).expect("encode")))
            });
        }
        let (id, frame) = encode_chunk(&key, &data, 3).expect("encode");
        group.bench_function(BenchmarkId::new("decode", format!("{name}/level=3")), |b| {
            b.iter(|| black_box(decode_chunk(&key, &id, black_box(&frame)).expect("decode")))
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    // Short runs for a 2-vCPU box (docs/benchmarks.md); raise for a quiet machine.
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .nresamples(10_000);
    targets = chunk_pipeline
}
criterion_main!(benches);
