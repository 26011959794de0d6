//! Fixtures for tests of this crate and of its users (feature `testing`): not a stable API.

use std::path::Path;
use std::sync::Arc;

use crate::repl::fence::Timing;
use crate::repl::state::{ReplState, Role};
use crate::repl::volume::{ReplMode, ReplVolume, ReplVolumeConfig};

/// A replicated volume `name` of 1 MiB under `root` on node `node-a`, in `role` towards
/// `peer` (epoch 1, consistent, synchronous), with no link: what marker and scheduling
/// tests need without a network.
pub fn repl_volume(root: &Path, name: &str, peer: &str, role: Role) -> Arc<ReplVolume> {
    let env: Arc<dyn keel_engine::Env> = Arc::new(keel_engine::PosixEnv::posix());
    let options = keel_engine::VolumeOptions {
        segment_bytes: 1 << 20,
        segment_count_max: 4,
        change_region_bytes: 64 << 10,
        extent_file_bytes: 1 << 20,
    };
    let dir = root.join(name);
    keel_engine::Volume::create(Arc::clone(&env), &dir, name, 1 << 20, &options).unwrap();
    let volume = keel_engine::Volume::open(env, &dir, &keel_engine::OpenOptions::default()).unwrap().0;
    let state = ReplState {
        role,
        epoch: 1,
        peer: peer.into(),
        history: Vec::new(),
        consistent: true,
        promote_sent_epoch: None,
    };
    let config = ReplVolumeConfig {
        node: "node-a".into(),
        peer: peer.into(),
        peer_addr: "127.0.0.1:9".parse().unwrap(),
        mode: ReplMode::Sync,
        timing: Timing::default(),
        queue_bytes: 1 << 20,
        resync_bytes_per_sec: 1 << 20,
        nbd_uri: String::new(),
    };
    ReplVolume::new(Arc::new(volume), state, config, crate::events::EventLog::in_memory("node-a"))
}
