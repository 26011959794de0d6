//! The code behind Keel's binaries: `keel` (daemon and admin CLI) and `keel-inspect`
//! (offline inspection). The binaries in `src/bin/` only parse arguments and call in here.

pub mod cert;
pub mod config;
pub mod control;
pub mod daemon;
pub mod export;
pub mod hooks;
pub mod inspect;
pub mod inspect_repo;
pub mod replication;
pub mod snapshot;
pub mod snapshot_cli;
pub mod snapshot_export;
pub mod units;
pub mod up;
pub mod vault;
pub mod witness;
