//! Shared helpers for the criterion benches in `benches/`: a volume in a scratch
//! directory on a real disk, an in-process NBD server on a Unix socket, and a minimal
//! blocking NBD client ([`nbd_client::NbdClient`]).
//!
//! Scratch directories go under `$KEEL_BENCH_DIR` when it is set, else under the system
//! temporary directory. Point it at the disk you want to measure: a tmpfs `/tmp` would
//! turn every `fdatasync` into a no-op.

#![warn(missing_docs)]

pub mod nbd_client;

use std::path::Path;
use std::sync::Arc;

use keel_engine::{Env, IoBackend, OpenOptions, PosixEnv, Volume, VolumeOptions};
use keel_net::{CancellationToken, NbdServer};
use keel_tools::export::VolumeExport;

/// A fresh scratch directory, removed when dropped.
pub fn scratch_dir() -> tempfile::TempDir {
    let mut builder = tempfile::Builder::new();
    builder.prefix("keel-bench-");
    match std::env::var_os("KEEL_BENCH_DIR") {
        Some(dir) => builder.tempdir_in(dir),
        None => builder.tempdir(),
    }
    .expect("create a scratch directory (set KEEL_BENCH_DIR to a writable directory)")
}

/// The storage environment for `backend`, or `None` when the kernel refuses it (io_uring
/// disabled by seccomp or sysctl), so a bench can skip that variant.
pub fn env(backend: IoBackend) -> Option<Arc<dyn Env>> {
    match backend {
        IoBackend::Posix => Some(Arc::new(PosixEnv::posix())),
        IoBackend::Uring => PosixEnv::uring().ok().map(|env| Arc::new(env) as Arc<dyn Env>),
    }
}

/// Creates and opens a volume of `size` bytes in `dir/name` with the daemon's defaults
/// (64 MiB journal segments, background checkpoints every 10 s or under pressure).
pub fn open_volume(env: Arc<dyn Env>, dir: &Path, size: u64) -> Volume {
    let dir = dir.join("bench");
    Volume::create(Arc::clone(&env), &dir, "bench", size, &VolumeOptions::default()).expect("create the bench volume");
    let (volume, _report) = Volume::open(env, &dir, &OpenOptions::default()).expect("open the bench volume");
    volume
}

/// `len` bytes of a non-repeating, non-zero pattern (so nothing on the path can take a
/// shortcut for zero pages).
pub fn pattern(len: usize) -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    (0..len)
        .map(|_| {
            // xorshift64: cheap and good enough to defeat any zero detection.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state as u8) | 1
        })
        .collect()
}

/// A `keel_net::NbdServer` serving one volume on a Unix socket from its own tokio runtime,
/// as the daemon does (`tools/src/daemon.rs`), minus config and signals.
pub struct InProcessServer {
    runtime: tokio::runtime::Runtime,
    shutdown: CancellationToken,
    serving: tokio::task::JoinHandle<()>,
    volume: Arc<Volume>,
}

impl InProcessServer {
    /// Binds `socket` and starts serving `volume` under its own name.
    pub fn start(volume: Volume, socket: &Path) -> Self {
        let volume = Arc::new(volume);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name("keel-bench-io")
            .build()
            .expect("start the tokio runtime");
        let export = Arc::new(VolumeExport::new(Arc::clone(&volume)));
        let server = NbdServer::new(vec![export]).expect("create the NBD server");
        let listener = runtime.block_on(server.bind_unix(socket)).expect("bind the NBD socket");
        let shutdown = CancellationToken::new();
        let serving = runtime.spawn(listener.serve(shutdown.clone()));
        Self { runtime, shutdown, serving, volume }
    }

    /// Stops the server (after its connections end) and closes the volume cleanly.
    pub fn stop(self) {
        self.shutdown.cancel();
        self.runtime.block_on(self.serving).expect("NBD server task");
        drop(self.runtime);
        match Arc::try_unwrap(self.volume) {
            Ok(volume) => volume.close().expect("close the bench volume"),
            Err(_) => panic!("the bench volume is still referenced after the server stopped"),
        }
    }
}
