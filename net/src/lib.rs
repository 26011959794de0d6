//! Keel's network frontends. Today: an NBD (Network Block Device) server
//! that serves any [`Export`] to qemu, libnbd tools (nbdinfo, nbdcopy,
//! nbdfuse, fio) and the Linux kernel client.
//!
//! The server speaks fixed-newstyle NBD with structured replies,
//! `base:allocation` block status, FLUSH/FUA, TRIM, WRITE_ZEROES and
//! multi-connection consistency; TLS and extended headers are not
//! implemented. The protocol logic does no I/O; a thin tokio driver runs it
//! and calls the blocking [`Export`] methods on the blocking pool.
//!
//! This crate does not depend on `keel-engine`; an adapter elsewhere
//! implements [`Export`] for a volume.
//!
//! # Example
//!
//! ```no_run
//! use std::sync::Arc;
//! use keel_net::{CancellationToken, Export, ExportError, NbdServer};
//!
//! /// A read-only export of zeros.
//! struct Zeros;
//!
//! impl Export for Zeros {
//!     fn name(&self) -> &str { "zeros" }
//!     fn description(&self) -> String { "1 GiB of zeros".into() }
//!     fn size(&self) -> u64 { 1 << 30 }
//!     fn read_only(&self) -> bool { true }
//!     fn read(&self, _offset: u64, buf: &mut [u8]) -> Result<(), ExportError> {
//!         buf.fill(0);
//!         Ok(())
//!     }
//!     fn write(&self, _: u64, _: &[u8], _: bool) -> Result<(), ExportError> { unreachable!() }
//!     fn write_zeroes(&self, _: u64, _: u64, _: bool, _: bool) -> Result<(), ExportError> { unreachable!() }
//!     fn trim(&self, _: u64, _: u64, _: bool) -> Result<(), ExportError> { unreachable!() }
//!     fn flush(&self) -> Result<(), ExportError> { Ok(()) }
//!     fn block_status(&self, _offset: u64, len: u64) -> Result<Vec<(u64, bool)>, ExportError> {
//!         Ok(vec![(len, true)])
//!     }
//! }
//!
//! # async fn run() -> Result<(), keel_net::Error> {
//! let server = NbdServer::new(vec![Arc::new(Zeros)])?;
//! let shutdown = CancellationToken::new();
//! // Serve until `shutdown.cancel()`; then `qemu-io 'nbd+unix:///zeros?socket=/run/keel/nbd.sock'`.
//! server.serve_unix("/run/keel/nbd.sock".as_ref(), shutdown).await?;
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

mod error;
pub mod events;
mod nbd;
pub mod quic;
pub mod repl;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use error::Error;
/// Fuzzing entry points (feature `fuzzing`, for tests/fuzz only): not a stable API.
#[cfg(feature = "fuzzing")]
pub use nbd::fuzzing;
pub use nbd::{
    Export, ExportError, ExportErrorKind, ListenAddr, NbdListener, NbdServer, BLOCK_SIZE_MIN, BLOCK_SIZE_PREFERRED,
    PAYLOAD_MAX,
};
/// Re-exported so callers need not depend on `tokio-util` to stop a server.
pub use tokio_util::sync::CancellationToken;
