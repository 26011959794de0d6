//! `keel-inspect`: offline inspection of a node's volumes and snapshot repositories.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use keel_tools::{inspect, inspect_repo};

#[derive(Parser)]
#[command(name = "keel-inspect", version, about = "Inspect Keel's on-disk state offline")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show a volume's superblock, journal segments and change map.
    Volume {
        /// The volume directory (DATA_DIR/volumes/NAME).
        dir: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List journal records; with --verify, check every one (exit 1 on corruption).
    Journal {
        /// The volume directory (DATA_DIR/volumes/NAME).
        dir: PathBuf,
        /// Check every record's checksum and sequence and report the journal's end.
        #[arg(long)]
        verify: bool,
        /// Start at the oldest segment still on disk instead of the checkpoint.
        #[arg(long)]
        all: bool,
        /// Show at most this many records.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Report on a snapshot repository: snapshots, dedup and compression, orphaned,
    /// missing and corrupt chunks, corrupt manifests (exit 1 on problems).
    Repo {
        /// The repository directory (a local vault: DIR/TENANT/{chunks,objects}).
        dir: PathBuf,
        /// The tenant whose area to read.
        #[arg(long, default_value = "default")]
        tenant: String,
        /// The tenant key file: authenticate the manifests (sealed: KEEL_KEY_PASSPHRASE).
        #[arg(long)]
        key_file: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one chunk of a repository: frame header, crc, whether it decodes (with a key),
    /// which snapshots reference it (exit 1 when missing or bad).
    Chunk {
        /// The chunk id (64 hex digits).
        id: String,
        /// The repository directory.
        #[arg(long)]
        repo: PathBuf,
        /// The tenant whose area to read.
        #[arg(long, default_value = "default")]
        tenant: String,
        /// The tenant key file: decrypt and re-hash the chunk (sealed: KEEL_KEY_PASSPHRASE).
        #[arg(long)]
        key_file: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() {
    match run(Cli::parse()) {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("keel-inspect: {e:#}");
            std::process::exit(2);
        }
    }
}

fn run(cli: Cli) -> Result<bool> {
    match cli.command {
        Command::Volume { dir, json } => {
            inspect::require_volume_dir(&dir)?;
            inspect::volume(&dir, json)?;
            Ok(true)
        }
        Command::Journal { dir, verify, all, limit, json } => {
            inspect::require_volume_dir(&dir)?;
            inspect::journal(&dir, all, verify, limit, json)
        }
        Command::Repo { dir, tenant, key_file, json } => inspect_repo::repo(&dir, &tenant, key_file.as_deref(), json),
        Command::Chunk { id, repo, tenant, key_file, json } => {
            inspect_repo::chunk(&id, &repo, &tenant, key_file.as_deref(), json)
        }
    }
}
