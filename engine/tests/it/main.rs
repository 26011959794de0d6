//! The engine's integration tests: one binary, one module per concern.

mod crash;
mod model;
mod recovery;
mod regressions;
mod replica;
mod support;
