//! Every synchronisation primitive the engine's concurrent core uses, switched to loom's
//! model-checked twins under `--cfg keel_loom` (see `tests/loom_group_commit.rs` and
//! docs/ARCHITECTURE.md for the command).

#[cfg(keel_loom)]
pub(crate) use loom::sync::{Condvar, Mutex, MutexGuard};
#[cfg(not(keel_loom))]
pub(crate) use std::sync::{Condvar, Mutex, MutexGuard};
