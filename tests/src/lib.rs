//! Helpers shared by the integration tests in `tests/it/`: a `keel daemon` under test
//! control, a small blocking NBD client, and a deterministic, self-verifying workload for
//! crash trials.

pub mod daemon;
pub mod nbd_client;
pub mod workload;
