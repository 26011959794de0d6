//! Helpers shared by the integration tests in `tests/it/`: a `keel daemon` under test
//! control, a small blocking NBD client, a deterministic, self-verifying workload for
//! crash trials, external commands with deadlines, and the nbdfuse + loop + ext4 stack.

pub mod cluster;
pub mod cmd;
pub mod daemon;
pub mod garage;
pub mod mount;
pub mod nbd_client;
pub mod netns;
pub mod prefix;
pub mod proxy;
pub mod vault_conformance;
pub mod vault_server;
pub mod workload;
