//! `keel-inspect`: offline inspection of a node's volumes.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use keel_tools::inspect;

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
    }
}
