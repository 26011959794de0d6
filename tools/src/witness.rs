//! `keel witness`: the arbiter in a third failure domain. It holds one record per volume,
//! changed only by compare-and-set on the epoch, and makes each change durable before it
//! answers (docs/replication.md).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use keel_net::quic::{self, Identity, TlsFiles, TransportConfig};
use keel_net::repl::proto::ALPN_WITNESS;
use keel_net::repl::witness_net::{self, Witness};
use keel_net::CancellationToken;

use crate::config::WitnessConfig;

/// Runs the witness until SIGTERM/SIGINT.
pub fn run(config: &WitnessConfig) -> Result<()> {
    let identity = Identity::load(&TlsFiles {
        ca_cert: config.ca_cert.clone(),
        cert: config.cert.clone(),
        key: config.key.clone(),
    })
    .context("failed to load the witness's TLS identity")?;
    let witness = Witness::open(&config.data_dir.join("records"), Duration::from_millis(config.lease_ms))
        .map_err(anyhow::Error::msg)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("keel-witness")
        .build()
        .context("failed to start the async runtime")?;
    runtime.block_on(async {
        let endpoint = quic::endpoint(
            config.listen,
            &identity,
            &TransportConfig::default(),
            &[ALPN_WITNESS],
            config.nodes.clone(),
        )
        .with_context(|| format!("failed to listen on {}", config.listen))?;
        tracing::info!(name = %config.name, listen = %config.listen, "ready: witness serving");
        let shutdown = CancellationToken::new();
        let task =
            tokio::spawn(witness_net::serve(Arc::clone(&witness), endpoint, config.nodes.clone(), shutdown.clone()));
        crate::daemon::wait_for_signal().await?;
        tracing::info!("witness shutting down");
        shutdown.cancel();
        let _ = task.await;
        anyhow::Ok(())
    })
}
