//! Cross-crate integration tests: real processes, real clients. One binary, one module
//! per concern.

mod sigkill;
