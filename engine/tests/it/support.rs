//! Shared fixtures: small volumes with small segments, so tests exercise segment rolls,
//! recycling and checkpoints within a few megabytes.

use std::path::Path;
use std::sync::Arc;

use keel_engine::testing::FaultyEnv;
use keel_engine::{Env, OpenOptions, RecoveryReport, Volume, VolumeOptions};
use rand::rngs::StdRng;
use rand::SeedableRng;

pub(crate) const SECTOR: usize = 512;

pub(crate) fn small_options() -> VolumeOptions {
    VolumeOptions {
        segment_bytes: 1 << 20,
        segment_count_max: 3,
        change_region_bytes: 64 << 10,
        extent_file_bytes: 1 << 20,
    }
}

pub(crate) fn manual_checkpoints() -> OpenOptions {
    OpenOptions { background_checkpoints: false, ..OpenOptions::default() }
}

pub(crate) fn create_and_open(env: &FaultyEnv, dir: &Path, size: u64) -> (Volume, RecoveryReport) {
    let env: Arc<dyn Env> = Arc::new(env.clone());
    Volume::create(env.clone(), dir, "test", size, &small_options()).unwrap();
    Volume::open(env, dir, &manual_checkpoints()).unwrap()
}

pub(crate) fn reopen(env: &FaultyEnv, dir: &Path) -> keel_engine::Result<(Volume, RecoveryReport)> {
    Volume::open(Arc::new(env.clone()), dir, &manual_checkpoints())
}

/// A seeded rng; the seed comes from `KEEL_TEST_SEED` when set, and is printed so a
/// failure can be replayed.
pub(crate) fn rng(test: &str) -> (StdRng, u64) {
    let seed = std::env::var("KEEL_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random::<u64>);
    eprintln!("{test}: KEEL_TEST_SEED={seed}");
    (StdRng::seed_from_u64(seed), seed)
}
