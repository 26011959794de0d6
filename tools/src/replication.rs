//! The daemon's replication glue: builds each replicated volume's driver from the config,
//! starts the node's QUIC endpoint and the witness client, runs the role-change hooks and
//! answers the control socket.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use keel_engine::Volume;
use keel_net::events::EventLog;
use keel_net::quic::{self, Identity, TlsFiles, TransportConfig};
use keel_net::repl::history::EpochStart;
use keel_net::repl::node::{self, NodeCtx, WitnessClient};
use keel_net::repl::proto::ALPN_REPL;
use keel_net::repl::state::{ReplState, Role};
use keel_net::repl::volume::{ReplMode, ReplVolume, ReplVolumeConfig, RoleChange, RoleObserver};
use keel_net::CancellationToken;

use crate::config::{nbd_unix_uri, NodeConfig, VolumeConfig};
use crate::control::{ControlHandler, ControlRequest, ControlResponse};
use crate::daemon::absolute;
use crate::snapshot::{GroupJob, GroupPlace, ScheduledJob, StandbyGroupJob, TakeOn};

/// Default hook timeout.
const HOOK_TIMEOUT: Duration = Duration::from_secs(60);

/// The replication side of a running node.
pub struct Replication {
    /// The node context (volumes, endpoint, witness client).
    pub ctx: Arc<NodeCtx>,
    /// Peers allowed to connect.
    pub allowed: Vec<String>,
    /// Replicated volumes that are not served at all (their replication state could not be
    /// read): serving them alone could serve a stale copy.
    pub refused: Vec<String>,
}

/// The replicated volumes' persisted state, created on the pair's first start from the
/// config's `role`.
fn initial_state(config: &NodeConfig, declared: &VolumeConfig, dir: &Path) -> Result<ReplState> {
    if let Some(state) = ReplState::load(dir).map_err(anyhow::Error::msg)? {
        return Ok(state);
    }
    let peer = declared.peer.clone().expect("only replicated volumes get here");
    let role = match declared.role.as_deref() {
        Some("primary") => Role::Primary,
        _ => Role::Standby,
    };
    let primary = if role == Role::Primary { config.node_name.clone() } else { peer.clone() };
    let state = ReplState {
        role,
        epoch: 1,
        peer,
        history: vec![EpochStart { epoch: 1, start_seq: 1, primary }],
        // A new primary's copy is the truth; a new standby has nothing until its first sync.
        consistent: role == Role::Primary,
        promote_sent_epoch: None,
    };
    state.store(dir).with_context(|| format!("failed to write the replication state in {}", dir.display()))?;
    Ok(state)
}

/// Builds the replication runtime for the configured volumes (those with a `peer`).
pub fn build(config: &NodeConfig, volumes: &[Arc<Volume>], events: &Arc<EventLog>) -> Result<Option<Replication>> {
    let Some(repl) = &config.replication else { return Ok(None) };
    let timing = repl.timing.timing()?;
    let identity =
        Identity::load(&TlsFiles { ca_cert: repl.ca_cert.clone(), cert: repl.cert.clone(), key: repl.key.clone() })
            .context("failed to load the node's TLS identity")?;
    if identity.name() != config.node_name {
        bail!(
            "the certificate {} names {:?} but node_name is {:?}",
            repl.cert.display(),
            identity.name(),
            config.node_name
        );
    }
    let allowed: Vec<String> = repl.peers.iter().map(|p| p.name.clone()).collect();
    let transport = TransportConfig { idle_timeout: timing.detect_timeout, ..TransportConfig::default() };
    let endpoint = quic::endpoint(repl.listen, &identity, &transport, &[ALPN_REPL], allowed.clone())
        .with_context(|| format!("failed to listen on {}", repl.listen))?;
    let arbiter =
        Arc::new(WitnessClient::new(&identity, repl.witness.address, &repl.witness.name).map_err(anyhow::Error::msg)?);
    let mut by_name = HashMap::new();
    let mut refused = Vec::new();
    let mut hooks = HashMap::new();
    for declared in config.volumes.iter().filter(|v| v.peer.is_some()) {
        let Some(volume) = volumes.iter().find(|v| v.name() == declared.name) else {
            tracing::error!(volume = %declared.name, "replicated volume is not open; not replicating it");
            continue;
        };
        let peer = declared.peer.clone().unwrap_or_default();
        let peer_addr = repl.peers.iter().find(|p| p.name == peer).map(|p| p.address).context("peer address")?;
        let state = match initial_state(config, declared, volume.dir()) {
            Ok(state) => state,
            Err(e) => {
                tracing::error!(volume = %declared.name, "not served: {e:#}; an operator must act (docs/operations.md)");
                refused.push(declared.name.clone());
                continue;
            }
        };
        let nbd_uri = nbd_unix_uri(&declared.name, &absolute(&config.nbd_socket));
        let rv_config = ReplVolumeConfig {
            node: config.node_name.clone(),
            peer,
            peer_addr,
            mode: if declared.mode.as_deref() == Some("async") { ReplMode::Async } else { ReplMode::Sync },
            timing: timing.clone(),
            queue_bytes: 64 << 20,
            resync_bytes_per_sec: 400 << 20,
            nbd_uri: nbd_uri.clone(),
        };
        let rv = ReplVolume::new(Arc::clone(volume), state, rv_config, Arc::clone(events));
        hooks.insert(declared.name.clone(), (declared.clone(), nbd_uri));
        by_name.insert(declared.name.clone(), rv);
    }
    let observer = hook_runner(config.node_name.clone(), hooks, Arc::clone(events));
    let ctx = Arc::new(NodeCtx {
        node: config.node_name.clone(),
        endpoint,
        arbiter,
        observer,
        shutdown: CancellationToken::new(),
        volumes: by_name,
    });
    Ok(Some(Replication { ctx, allowed, refused }))
}

/// Role changes queued for one volume's hooks before the replication driver waits.
const HOOK_QUEUE: usize = 16;

/// Runs `on_promote` / `on_demote` after each role change, with the volume, epoch and NBD
/// URI in the environment.
///
/// The driver only queues the change: each volume's hooks run on their own task, one at a
/// time in the order of the role changes. Running a hook inside the driver (as this did at
/// first) held up the role it announced: a new primary's loop, which renews its lease with
/// the witness, started only after `on_promote` returned, so a hook slower than one lease
/// (ext4 journal replay, PostgreSQL crash recovery) found the volume fenced ("no lease from
/// the witness and no standby") and its mount failed (tests/it/postgres.rs showed it).
fn hook_runner(node: String, hooks: HashMap<String, (VolumeConfig, String)>, events: Arc<EventLog>) -> RoleObserver {
    let mut queues = HashMap::new();
    for (volume, (declared, uri)) in hooks {
        let (sender, mut receiver) = tokio::sync::mpsc::channel::<RoleChange>(HOOK_QUEUE);
        let (node, events) = (node.clone(), Arc::clone(&events));
        tokio::spawn(async move {
            while let Some(change) = receiver.recv().await {
                run_role_hook(&node, &declared, &uri, &events, &change).await;
            }
        });
        queues.insert(volume, sender);
    }
    let queues = Arc::new(queues);
    Arc::new(move |change: RoleChange| {
        let queues = Arc::clone(&queues);
        Box::pin(async move {
            let Some(queue) = queues.get(&change.volume) else { return };
            let volume = change.volume.clone();
            if queue.send(change).await.is_err() {
                tracing::error!(volume = %volume, "the hook runner has stopped; role change hook not run");
            }
        })
    })
}

/// Runs the hook configured for `change`, if any, and waits for it (bounded by its timeout).
async fn run_role_hook(node: &str, declared: &VolumeConfig, uri: &str, events: &EventLog, change: &RoleChange) {
    let (name, command) = match change.role {
        Role::Primary => ("on_promote", declared.on_promote.as_deref()),
        Role::Standby => ("on_demote", declared.on_demote.as_deref()),
    };
    let Some(command) = command else { return };
    let env = vec![
        ("KEEL_VOLUME".to_string(), change.volume.clone()),
        ("KEEL_EPOCH".to_string(), change.epoch.to_string()),
        ("KEEL_NBD_URI".to_string(), uri.to_string()),
        ("KEEL_ROLE".to_string(), change.role.name().to_string()),
        ("KEEL_NODE".to_string(), node.to_string()),
        ("KEEL_REASON".to_string(), change.reason.clone()),
    ];
    let timeout = declared.hook_timeout_secs.map_or(HOOK_TIMEOUT, Duration::from_secs);
    let outcome = crate::hooks::run_hook(name, command, &env, timeout, events, &change.volume).await;
    if !outcome.success {
        tracing::error!(volume = %change.volume, hook = name, "hook failed: {}", outcome.output_tail);
    }
}

/// Answers the control socket.
pub struct Control {
    /// The replication runtime, if the node replicates anything.
    pub ctx: Option<Arc<NodeCtx>>,
    /// Status of volumes that are not replicated.
    pub single: Vec<Arc<Volume>>,
    /// The node's events.
    pub events: Arc<EventLog>,
    /// Node name.
    pub node: String,
    /// NBD socket (for URIs).
    pub nbd_socket: std::path::PathBuf,
    /// The snapshot runner, when a tenant key is configured.
    pub snapshots: Option<Arc<crate::snapshot::Runner>>,
}

impl Control {
    /// What the snapshot scheduler does with each volume now: unreplicated ones are taken
    /// here; replicated ones as `[snapshots] take_on` and the pair's state say
    /// ([`ScheduledJob::for_replicated`]).
    ///
    /// The members of a consistency group are taken as one job, where all of them are
    /// writable or on their common standby ([`ScheduledJob::for_group`]); never one by one.
    pub fn snapshot_volumes(&self) -> Vec<ScheduledJob> {
        let take_on = self.snapshots.as_ref().map_or_else(TakeOn::default, |runner| runner.repo.take_on);
        let groups = self.snapshots.as_ref().map(|runner| runner.repo.groups.as_slice()).unwrap_or_default();
        let grouped = |name: &str| groups.iter().any(|g| g.volumes.iter().any(|v| v == name));
        let mut out: Vec<ScheduledJob> =
            self.single.iter().filter(|v| !grouped(v.name())).cloned().map(ScheduledJob::Local).collect();
        if let Some(ctx) = &self.ctx {
            out.extend(
                ctx.volumes
                    .values()
                    .filter(|rv| !grouped(rv.name()))
                    .map(|rv| ScheduledJob::for_replicated(rv, take_on)),
            );
        }
        let replicated = self.ctx.as_ref().map(|c| &c.volumes);
        out.extend(groups.iter().filter_map(|group| ScheduledJob::for_group(group, &self.single, replicated, take_on)));
        out
    }

    /// `keel snapshot create`: on this node, whatever its role. A replicated volume's
    /// standby takes it from its own copy when it is consistent and connected (else it
    /// refuses and says to use the primary).
    async fn snapshot(&self, volume: String, marker: Option<String>) -> ControlResponse {
        let Some(runner) = self.snapshots.clone() else {
            return ControlResponse::Refused {
                message: "snapshots are not set up on this node: no tenant key (`keel snapshot key-init`)".into(),
            };
        };
        if let Some(group) = runner.repo.group(&volume).cloned() {
            return self.snapshot_group(runner, &group, marker).await;
        }
        let replicated = self.ctx.as_ref().and_then(|c| c.volumes.get(&volume)).cloned();
        let taken = match replicated {
            Some(rv) if rv.role() == Role::Standby => {
                if let Err(message) = rv.standby_snapshot_ready() {
                    return ControlResponse::Refused { message };
                }
                // Unique, so that no other marker can be mistaken for this one.
                let marker = marker.unwrap_or_else(|| {
                    let ms =
                        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
                    format!("manual-{}-{ms}", self.node)
                });
                tokio::task::spawn_blocking(move || runner.snapshot_standby(&rv, &marker)).await
            }
            Some(rv) => {
                let marker = marker.unwrap_or_else(|| "manual".into());
                tokio::task::spawn_blocking(move || runner.snapshot_primary(&rv, &marker)).await
            }
            None => {
                let Some(target) = self.single.iter().find(|v| v.name() == volume).cloned() else {
                    return ControlResponse::Refused { message: format!("no volume {volume} on this node") };
                };
                let marker = marker.unwrap_or_else(|| "manual".into());
                tokio::task::spawn_blocking(move || runner.snapshot_now(&target, &marker)).await
            }
        };
        snapshot_response(&volume, taken)
    }
}

/// The control answer for a snapshot of `what` ("db", "group shop") taken on a blocking
/// task.
fn snapshot_response(
    what: &str,
    taken: Result<anyhow::Result<serde_json::Value>, tokio::task::JoinError>,
) -> ControlResponse {
    match taken {
        Ok(Ok(details)) => ControlResponse::Done {
            message: format!("snapshot {} of {what} taken", details["snapshot"].as_str().unwrap_or("?")),
            details,
        },
        Ok(Err(e)) => ControlResponse::Error { message: format!("snapshot of {what} failed: {e:#}") },
        Err(e) => ControlResponse::Error { message: format!("snapshot of {what} failed: {e}") },
    }
}

impl Control {
    /// `keel snapshot create GROUP`: every member must be writable on this node, or every
    /// member replicated with this node their standby (which then takes the group from
    /// its own copies when each is consistent and connected, else refuses saying why).
    async fn snapshot_group(
        &self,
        runner: Arc<crate::snapshot::Runner>,
        group: &crate::snapshot::GroupConfig,
        marker: Option<String>,
    ) -> ControlResponse {
        let job = match GroupJob::locate(group, &self.single, self.ctx.as_ref().map(|c| &c.volumes)) {
            Ok(GroupPlace::Here(job)) => job,
            Ok(GroupPlace::Standby(job)) => return self.snapshot_group_standby(runner, job, marker).await,
            Ok(GroupPlace::Elsewhere(message)) | Err(message) => return ControlResponse::Refused { message },
        };
        for rv in &job.replicated {
            if let Err(e) = rv.check_writable() {
                return ControlResponse::Refused { message: format!("group {}: {e}", group.name) };
            }
        }
        let marker = marker.unwrap_or_else(|| "manual".into());
        let name = group.name.clone();
        let taken = tokio::task::spawn_blocking(move || runner.snapshot_group(&job.group, &job.volumes, &marker)).await;
        snapshot_response(&format!("group {name}"), taken)
    }

    /// `keel snapshot create GROUP` on the standby of every member.
    async fn snapshot_group_standby(
        &self,
        runner: Arc<crate::snapshot::Runner>,
        job: StandbyGroupJob,
        marker: Option<String>,
    ) -> ControlResponse {
        if let Err(message) = job.ready() {
            return ControlResponse::Refused { message };
        }
        // Unique, so that no other marker can be mistaken for this one.
        let marker = marker.unwrap_or_else(|| {
            let ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
            format!("manual-{}-{ms}", self.node)
        });
        let name = job.group.name.clone();
        let taken = tokio::task::spawn_blocking(move || runner.snapshot_group_standby(&job, &marker)).await;
        snapshot_response(&format!("group {name}"), taken)
    }

    fn status(&self) -> serde_json::Value {
        let mut volumes: Vec<serde_json::Value> = match &self.ctx {
            Some(ctx) => node::status(ctx)["volumes"].as_array().cloned().unwrap_or_default(),
            None => Vec::new(),
        };
        for volume in &self.single {
            let status = volume.status();
            volumes.push(serde_json::json!({
                "name": status.name,
                "role": "single",
                "epoch": status.epoch,
                "last_seq": status.last_seq,
                "durable_seq": status.durable_seq,
                "nbd_uri": nbd_unix_uri(&status.name, &absolute(&self.nbd_socket)),
                "poisoned": status.poisoned,
            }));
        }
        serde_json::json!({ "node": self.node, "volumes": volumes })
    }
}

impl ControlHandler for Control {
    fn handle(
        &self,
        request: ControlRequest,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ControlResponse> + Send + '_>> {
        Box::pin(async move {
            match request {
                ControlRequest::Status => ControlResponse::Status { status: self.status() },
                ControlRequest::Events { since } => ControlResponse::Events { events: self.events.since(since) },
                ControlRequest::Promote { volume, force } => match &self.ctx {
                    None => ControlResponse::Refused { message: "this node replicates nothing".into() },
                    Some(ctx) => match node::promote(ctx, &volume, force).await {
                        Ok(message) => ControlResponse::Done { message, details: serde_json::Value::Null },
                        Err(message) => ControlResponse::Refused { message },
                    },
                },
                ControlRequest::Snapshot { volume, marker } => self.snapshot(volume, marker).await,
                ControlRequest::Switchover { volume } => match &self.ctx {
                    None => ControlResponse::Refused { message: "this node replicates nothing".into() },
                    Some(ctx) => match node::switchover(ctx, &volume).await {
                        Ok((message, details)) => ControlResponse::Done { message, details },
                        Err(message) => ControlResponse::Refused { message },
                    },
                },
            }
        })
    }
}
