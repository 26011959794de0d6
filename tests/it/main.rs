//! Cross-crate integration tests: real processes, real clients. One binary, one module
//! per concern.

mod blackbox;
mod ext4;
mod failover;
mod inspect;
mod malformed;
mod partition;
mod postgres;
mod sigkill;
mod up;
