//! `keel cert`: the cluster's private certificate authority and the node certificates that
//! replication and witness connections authenticate with (see docs/format-replication.md,
//! "TLS"). Keep `ca.key` off the storage nodes: a node needs only `ca.pem` and its own pair.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use keel_net::quic::{self, TlsFiles};

const DAY: Duration = Duration::from_secs(24 * 3600);

/// `keel cert` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum CertCommand {
    /// Create the cluster CA: DIR/ca.pem (give it to every node) and DIR/ca.key (keep it safe).
    Init {
        /// Directory for the CA (created, mode 0700, if missing).
        #[arg(long)]
        dir: PathBuf,
        /// Cluster name, recorded in the CA certificate's subject.
        #[arg(long, default_value = "keel")]
        cluster: String,
        /// Validity in days (default 10 years).
        #[arg(long, default_value_t = quic::CA_VALIDITY.as_secs() / DAY.as_secs())]
        days: u64,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Issue a certificate for NODE (or the witness) from the CA in DIR: NODE.pem, NODE.key, ca.pem.
    Issue {
        /// Node name: the name in the node's config and its certificate's DNS name.
        node: String,
        /// The CA directory (`keel cert init --dir`).
        #[arg(long)]
        dir: PathBuf,
        /// Where to write the node's files (default: the CA directory).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Validity in days (default 2 years).
        #[arg(long, default_value_t = quic::NODE_VALIDITY.as_secs() / DAY.as_secs())]
        days: u64,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// Runs a `keel cert` subcommand.
pub fn run(command: CertCommand) -> Result<()> {
    match command {
        CertCommand::Init { dir, cluster, days, json } => init(&dir, &cluster, days, json),
        CertCommand::Issue { node, dir, out, days, json } => issue(&node, &dir, out.as_deref(), days, json),
    }
}

fn init(dir: &Path, cluster: &str, days: u64, json: bool) -> Result<()> {
    quic::create_ca(dir, cluster, validity(days)?)
        .with_context(|| format!("failed to create the CA of cluster {cluster:?}"))?;
    let ca_cert = dir.join(quic::CA_CERT_FILE);
    let ca_key = dir.join(quic::CA_KEY_FILE);
    if json {
        let value = serde_json::json!({ "cluster": cluster, "ca_cert": ca_cert, "ca_key": ca_key, "days": days });
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        println!("created the CA of cluster {cluster:?}, valid for {days} days:");
        println!("  {}  (give to every node and the witness)", ca_cert.display());
        println!("  {}  (keep off the nodes; needed only to issue certificates)", ca_key.display());
        println!("next: keel cert issue NODE --dir {}", dir.display());
    }
    Ok(())
}

fn issue(node: &str, dir: &Path, out: Option<&Path>, days: u64, json: bool) -> Result<()> {
    let out = out.unwrap_or(dir);
    let TlsFiles { ca_cert, cert, key } = quic::issue_cert(dir, node, out, validity(days)?)
        .with_context(|| format!("failed to issue a certificate for node {node:?}"))?;
    if json {
        let value = serde_json::json!({ "node": node, "ca_cert": ca_cert, "cert": cert, "key": key, "days": days });
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        println!("issued a certificate for node {node:?}, valid for {days} days; in its config:");
        println!("  ca_cert = {:?}", ca_cert.display().to_string());
        println!("  cert = {:?}", cert.display().to_string());
        println!("  key = {:?}", key.display().to_string());
    }
    Ok(())
}

fn validity(days: u64) -> Result<Duration> {
    let max_days = quic::VALIDITY_MAX.as_secs() / DAY.as_secs();
    anyhow::ensure!((1..=max_days).contains(&days), "--days must be between 1 and {max_days}, not {days}");
    Ok(Duration::from_secs(days * DAY.as_secs()))
}
