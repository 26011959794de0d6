//! Test helper for the SIGKILL crash trials: opens a volume and runs the deterministic
//! workload from `keel_tests::workload` until it is killed, printing `ack N` to stdout
//! each time the reply to a flush (or FUA write) arrives — from then on ops `0..N` must
//! survive anything.
//!
//! Usage: keel-crash-writer VOLUME_DIR SEED OPS

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use keel_engine::{IoBackend, OpenOptions, PersistMode, PosixEnv, Volume};
use keel_tests::workload::{generate, write_payload, Op, SECTOR};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, dir, seed, count] = &args[..] else {
        anyhow::bail!("usage: keel-crash-writer VOLUME_DIR SEED OPS");
    };
    let seed: u64 = seed.parse()?;
    let count: usize = count.parse()?;
    // The io_uring backend here (the daemon trials use the default, POSIX), so both backends
    // are killed at random moments.
    let env = Arc::new(PosixEnv::new(IoBackend::Uring));
    // Checkpoint often so kills also land inside checkpoints and segment reuse.
    let options = OpenOptions { checkpoint_interval: Duration::from_millis(50), background_checkpoints: true };
    let (volume, _) = Volume::open(env, dir.as_ref(), &options).context("open volume")?;
    let ops = generate(seed, volume.size(), count);
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready")?;
    out.flush()?;
    for (index, op) in ops.iter().enumerate() {
        match *op {
            Op::Write { sector, sectors, fua } => {
                let data = write_payload(seed, index as u64, sector, sectors);
                let mode = if fua { PersistMode::Durable } else { PersistMode::Buffered };
                volume.write(sector * SECTOR, &data, mode)?;
            }
            Op::Zero { sector, sectors, trim } => {
                let (at, len) = (sector * SECTOR, sectors * SECTOR);
                if trim {
                    volume.trim(at, len, PersistMode::Buffered)?;
                } else {
                    volume.write_zeroes(at, len, true, PersistMode::Buffered)?;
                }
            }
            Op::Flush => {
                volume.flush()?;
            }
        }
        if op.is_barrier() {
            writeln!(out, "ack {}", index + 1)?;
            out.flush()?;
        }
    }
    writeln!(out, "done")?;
    Ok(())
}
