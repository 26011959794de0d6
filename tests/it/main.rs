//! Cross-crate integration tests: real processes, real clients. One binary, one module
//! per concern.

mod blackbox;
mod ext4;
mod failover;
mod inspect;
mod malformed;
mod partition;
mod postgres;
mod remote_vault;
mod s3_vault;
mod sigkill;
mod snapshot;
mod snapshot_acceptance;
mod snapshot_group;
mod snapshot_group_standby;
mod snapshot_postgres;
mod snapshot_serve;
mod snapshot_standby;
mod up;
