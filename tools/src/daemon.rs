//! `keel daemon`: open the node's volumes and serve them over NBD until SIGTERM/SIGINT.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use keel_engine::{Env, PosixEnv, Volume, VolumeOptions};
use keel_net::{CancellationToken, Export, NbdServer};

use crate::config::NodeConfig;
use crate::export::VolumeExport;
use crate::units::{format_duration, format_size, parse_size};

/// Creates a volume in the node's data directory.
pub fn create_volume(config: &NodeConfig, env: Arc<dyn Env>, name: &str, size: u64) -> Result<PathBuf> {
    let dir = config.volumes_dir().join(name);
    Volume::create(env, &dir, name, size, &VolumeOptions::default())?;
    Ok(dir)
}

/// The volume directories under the node's data directory, sorted by name.
pub fn volume_dirs(config: &NodeConfig) -> Result<Vec<PathBuf>> {
    let dir = config.volumes_dir();
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("failed to list {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join(keel_engine::SUPERBLOCK_FILE).exists())
        .collect();
    dirs.sort();
    Ok(dirs)
}

/// Most threads blocked in volume calls at once (reads, writes, flushes).
const BLOCKING_THREADS_MAX: usize = 128;

/// Marks this process as one that writes back other processes' dirty pages (it serves the
/// block device their filesystem sits on), so memory reclaim does not wait on it while it
/// waits on reclaim: the same-host deadlock FUSE and NBD daemons are prone to.
fn mark_io_flusher() {
    /// From linux/prctl.h (Linux 5.6); the libc crate does not name it.
    const PR_SET_IO_FLUSHER: libc::c_int = 57;
    // SAFETY: prctl(PR_SET_IO_FLUSHER, ...) only reads its integer arguments, passed as the
    // unsigned longs the kernel reads (varargs do not widen ints).
    let rc = unsafe {
        libc::prctl(PR_SET_IO_FLUSHER, 1 as libc::c_ulong, 0 as libc::c_ulong, 0 as libc::c_ulong, 0 as libc::c_ulong)
    };
    if rc != 0 {
        tracing::info!(
            "PR_SET_IO_FLUSHER not set ({}); same-host mounts may deadlock under memory pressure",
            std::io::Error::last_os_error()
        );
    }
}

/// Opens every volume and serves them until a signal arrives, then closes them cleanly.
pub fn run(config: &NodeConfig) -> Result<()> {
    mark_io_flusher();
    let backend = config.io_backend().map_err(anyhow::Error::msg)?;
    let env: Arc<dyn Env> = Arc::new(PosixEnv::new(backend));
    tracing::info!(node = %config.node_name, backend = env.backend_name(), "starting");
    std::fs::create_dir_all(config.volumes_dir())
        .with_context(|| format!("failed to create {}", config.volumes_dir().display()))?;
    for declared in &config.volumes {
        let dir = config.volumes_dir().join(&declared.name);
        if !dir.join(keel_engine::SUPERBLOCK_FILE).exists() {
            let size = parse_size(&declared.size)?;
            create_volume(config, env.clone(), &declared.name, size)?;
            tracing::info!(volume = %declared.name, size = %format_size(size), "created volume");
        }
    }
    let mut volumes = Vec::new();
    for dir in volume_dirs(config)? {
        match Volume::open(env.clone(), &dir, &config.open_options()) {
            Ok((volume, report)) => {
                tracing::info!(
                    volume = %volume.name(),
                    replayed_records = report.replayed_records,
                    replayed = %format_size(report.replayed_bytes),
                    last_seq = report.last_seq,
                    took = %format_duration(report.duration),
                    "opened volume"
                );
                if let Some(torn) = &report.torn_tail {
                    tracing::warn!(volume = %volume.name(), "dropped a torn journal tail: {} bytes at segment {} offset {} (seq {}): {}", torn.bytes_dropped, torn.segment_no, torn.offset, torn.seq, torn.reason);
                }
                volumes.push(Arc::new(volume));
            }
            // A volume that fails recovery is not served, but the node serves the others.
            Err(e) => tracing::error!(
                "failed to open volume {}: {e:#}; it is not served until an operator acts",
                dir.display()
            ),
        }
    }
    let events = keel_net::events::EventLog::open(&config.data_dir.join("events.jsonl"), &config.node_name)
        .with_context(|| format!("failed to open the event log in {}", config.data_dir.display()))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("keel-io")
        // Volume calls run on the blocking pool; each NBD connection already bounds its own
        // requests in flight, and this bounds the threads they can occupy in total.
        .max_blocking_threads(BLOCKING_THREADS_MAX)
        .build()
        .context("failed to start the async runtime")?;
    let served = runtime.block_on(async {
        // The QUIC endpoint needs the runtime, so replication is built inside it.
        let replication = crate::replication::build(config, &volumes, &events)?;
        let refused = replication.as_ref().map(|r| r.refused.clone()).unwrap_or_default();
        let exports: Vec<Arc<dyn Export>> = volumes
            .iter()
            .filter(|v| !refused.iter().any(|name| name == v.name()))
            .map(|v| match replication.as_ref().and_then(|r| r.ctx.volumes.get(v.name())) {
                Some(rv) => Arc::new(VolumeExport::replicated(Arc::clone(rv))) as Arc<dyn Export>,
                None => Arc::new(VolumeExport::new(Arc::clone(v))) as Arc<dyn Export>,
            })
            .collect();
        let control = Arc::new(crate::replication::Control {
            ctx: replication.as_ref().map(|r| Arc::clone(&r.ctx)),
            single: volumes
                .iter()
                .filter(|v| replication.as_ref().is_none_or(|r| !r.ctx.volumes.contains_key(v.name())))
                .filter(|v| !refused.iter().any(|name| name == v.name()))
                .cloned()
                .collect(),
            events: Arc::clone(&events),
            node: config.node_name.clone(),
            nbd_socket: config.nbd_socket.clone(),
            snapshots: snapshot_runner(config, &events),
        });
        serve(config, exports, replication, control).await
    });
    // Every connection is gone: close the volumes (flush and checkpoint).
    drop(runtime);
    for volume in volumes {
        let name = volume.name().to_string();
        match Arc::try_unwrap(volume) {
            Ok(volume) => match volume.close() {
                Ok(()) => tracing::info!(volume = %name, "closed"),
                Err(e) => tracing::error!(volume = %name, "failed to close: {e:#}"),
            },
            Err(_) => tracing::warn!(volume = %name, "still referenced at shutdown; closing when released"),
        }
    }
    served
}

/// The snapshot runner, when the node has a tenant key (`keel snapshot key-init`).
fn snapshot_runner(
    config: &NodeConfig,
    events: &Arc<keel_net::events::EventLog>,
) -> Option<Arc<crate::snapshot::Runner>> {
    if !crate::snapshot::key_path(config).exists() {
        tracing::info!("snapshots are off: no tenant key at {}", crate::snapshot::key_path(config).display());
        return None;
    }
    match crate::snapshot::Repo::open(config) {
        Ok(repo) => Some(Arc::new(crate::snapshot::Runner::new(Arc::new(repo), Arc::clone(events)))),
        Err(e) => {
            tracing::error!("snapshots are off: {e:#}");
            None
        }
    }
}

async fn serve(
    config: &NodeConfig,
    exports: Vec<Arc<dyn Export>>,
    replication: Option<crate::replication::Replication>,
    control: Arc<crate::replication::Control>,
) -> Result<()> {
    let server = NbdServer::new(exports)?;
    let shutdown = CancellationToken::new();
    let snapshots_stop = control.snapshots.as_ref().map(|runner| Arc::clone(&runner.repo.stop));
    let control_socket = config.data_dir.join("control.sock");
    let schedule_task = control.snapshots.clone().map(|runner| {
        let control = Arc::clone(&control);
        let volumes: Arc<dyn Fn() -> Vec<crate::snapshot::ScheduledJob> + Send + Sync> =
            Arc::new(move || control.snapshot_volumes());
        tokio::spawn(runner.run_schedule(volumes, config.data_dir.join("schedule.ledger"), shutdown.clone()))
    });
    let control_task = {
        let (path, shutdown) = (control_socket.clone(), shutdown.clone());
        tokio::spawn(async move {
            if let Err(e) = crate::control::serve(&path, control, shutdown).await {
                tracing::error!("control socket failed: {e:#}");
            }
        })
    };
    let replication_task = replication.as_ref().map(|r| {
        let (ctx, allowed) = (Arc::clone(&r.ctx), r.allowed.clone());
        tokio::spawn(keel_net::repl::node::run(ctx, allowed))
    });
    if let Some(parent) = config.nbd_socket.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("failed to create {}", parent.display()))?;
    }
    let unix = server.bind_unix(&config.nbd_socket).await?;
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(unix.serve(shutdown.clone()));
    if let Some(addr) = config.nbd_tcp {
        let tcp = server.bind_tcp(addr).await?;
        tracing::info!("serving NBD on tcp {:?}", tcp.local_addr()?);
        tasks.spawn(tcp.serve(shutdown.clone()));
    }
    tracing::info!(socket = %config.nbd_socket.display(), "ready: serving NBD");
    wait_for_signal().await?;
    tracing::info!("shutting down: finishing in-flight requests");
    shutdown.cancel();
    // A snapshot being taken would hold the shutdown until it ends (hours, paced).
    if let Some(stop) = &snapshots_stop {
        stop.store(true, std::sync::atomic::Ordering::Release);
    }
    while tasks.join_next().await.is_some() {}
    if let (Some(r), Some(task)) = (&replication, replication_task) {
        r.ctx.shutdown.cancel();
        let _ = task.await;
    }
    let _ = control_task.await;
    if let Some(task) = schedule_task {
        let _ = task.await;
    }
    let _ = std::fs::remove_file(&config.nbd_socket);
    let _ = std::fs::remove_file(&control_socket);
    Ok(())
}

pub(crate) async fn wait_for_signal() -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

/// A path made absolute against the current directory (for URIs printed to users).
pub fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}
