//! Cross-crate integration tests: real processes, real clients. One binary, one module
//! per concern.

mod blackbox;
mod ext4;
mod inspect;
mod malformed;
mod sigkill;
mod up;
