//! `keel`: the daemon and the admin CLI.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use keel_engine::{PosixEnv, Volume};
use keel_tools::config::NodeConfig;
use keel_tools::units::{format_size, parse_size};
use keel_tools::{daemon, up};

#[derive(Parser)]
#[command(name = "keel", version, about = "Keel: replicated, durable block volumes served over NBD")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a storage node: open its volumes and serve them over NBD.
    Daemon {
        /// The node's TOML config file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Run the witness: the arbiter that fences automatic failover (a third failure domain).
    Witness {
        /// The witness's TOML config file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Run a vault server: tenants' snapshot chunks and manifests, served to nodes over QUIC.
    Vault {
        /// The vault's TOML config file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Start a complete local deployment on embedded defaults, in the foreground.
    Up {
        /// Directory for the deployment's state (configs, data, sockets, up.json).
        #[arg(long, default_value = "keel-up")]
        dir: PathBuf,
    },
    /// Manage volumes (offline: run with the daemon stopped, or restart it to serve new ones).
    Volume {
        #[command(subcommand)]
        command: VolumeCommand,
    },
    /// Snapshots: create, list, show, diff, restore, export, import, serve, verify, forget, gc.
    Snapshot {
        #[command(subcommand)]
        command: keel_tools::snapshot_cli::SnapshotCommand,
    },
    /// Manage the cluster's TLS certificates: a private CA, one certificate per node.
    Cert {
        #[command(subcommand)]
        command: keel_tools::cert::CertCommand,
    },
    /// Show the running daemon's volumes: roles, epochs, peer, lag, resync, witness.
    Status {
        #[command(flatten)]
        target: keel_tools::control::ControlTarget,
        /// Print the daemon's status JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Make this node the primary of VOLUME (exit status 1 if refused).
    Promote {
        /// The volume.
        volume: String,
        /// Override the witness's checks (it still records the promotion): only once the old
        /// primary is surely down; the answer says what could be lost.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        target: keel_tools::control::ControlTarget,
        /// Print the daemon's answer as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Swap the roles of VOLUME's primary and standby without losing a write (exit status 1 if refused).
    Switchover {
        /// The volume.
        volume: String,
        #[command(flatten)]
        target: keel_tools::control::ControlTarget,
        /// Print the daemon's answer as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the daemon's events as JSON lines.
    Events {
        /// Only events with a sequence number above N.
        #[arg(long, default_value_t = 0)]
        since: u64,
        /// Keep printing new events until interrupted.
        #[arg(long)]
        follow: bool,
        #[command(flatten)]
        target: keel_tools::control::ControlTarget,
        /// Accepted for symmetry; events are always JSON lines.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum VolumeCommand {
    /// Create a volume in the node's data directory.
    Create {
        /// Volume name (also its NBD export name).
        name: String,
        /// Size, e.g. 20GiB.
        #[arg(long)]
        size: String,
        /// The node's config file.
        #[arg(long)]
        config: PathBuf,
    },
    /// List the node's volumes.
    List {
        /// The node's config file.
        #[arg(long)]
        config: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn main() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KEEL_LOG").unwrap_or_else(|_| "info".into());
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("keel: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Daemon { config } => daemon::run(&NodeConfig::load(&config)?),
        Command::Snapshot { command } => keel_tools::snapshot_cli::run(command),
        Command::Up { dir } => up::run(&dir),
        Command::Cert { command } => keel_tools::cert::run(command),
        Command::Witness { config } => keel_tools::witness::run(&keel_tools::config::WitnessConfig::load(&config)?),
        Command::Vault { config } => keel_tools::vault::run(&keel_tools::vault::VaultConfig::load(&config)?),
        Command::Status { target, json } => keel_tools::control::cli_status(&target, json),
        Command::Promote { volume, force, target, json } => {
            keel_tools::control::cli_promote(&target, &volume, force, json)
        }
        Command::Switchover { volume, target, json } => keel_tools::control::cli_switchover(&target, &volume, json),
        Command::Events { since, follow, target, json } => {
            keel_tools::control::cli_events(&target, since, follow, json)
        }
        Command::Volume { command: VolumeCommand::Create { name, size, config } } => {
            let config = NodeConfig::load(&config)?;
            let size = parse_size(&size)?;
            let dir = daemon::create_volume(&config, Arc::new(PosixEnv::posix()), &name, size)?;
            println!("created volume {name} ({}) in {}", format_size(size), dir.display());
            Ok(())
        }
        Command::Volume { command: VolumeCommand::List { config, json } } => {
            let config = NodeConfig::load(&config)?;
            let env = PosixEnv::posix();
            let mut rows = Vec::new();
            for dir in daemon::volume_dirs(&config)? {
                let sb =
                    Volume::read_superblock(&env, &dir).with_context(|| format!("failed to read {}", dir.display()))?;
                rows.push(serde_json::json!({
                    "name": sb.name,
                    "size": sb.size,
                    "epoch": sb.epoch,
                    "checkpoint_seq": sb.checkpoint_seq,
                    "nbd_uri": keel_tools::config::nbd_unix_uri(&sb.name, &daemon::absolute(&config.nbd_socket)),
                    "dir": dir,
                }));
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!("{:<24} {:>10} {:>6} {:>12}  NBD URI", "NAME", "SIZE", "EPOCH", "CHECKPOINT");
                for row in &rows {
                    println!(
                        "{:<24} {:>10} {:>6} {:>12}  {}",
                        row["name"].as_str().unwrap_or_default(),
                        format_size(row["size"].as_u64().unwrap_or_default()),
                        row["epoch"],
                        row["checkpoint_seq"],
                        row["nbd_uri"].as_str().unwrap_or_default()
                    );
                }
            }
            Ok(())
        }
    }
}
