//! The code behind Keel's binaries: `keel` (daemon and admin CLI) and `keel-inspect`
//! (offline inspection). The binaries in `src/bin/` only parse arguments and call in here.

pub mod config;
pub mod daemon;
pub mod export;
pub mod inspect;
pub mod units;
pub mod up;
