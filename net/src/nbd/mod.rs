//! The NBD (Network Block Device) server.
//!
//! Layers, outermost first:
//! - `server`: the tokio driver (listeners, one task per connection, a
//!   writer task per connection, export calls on the blocking pool);
//! - `handshake` and `transmission`: the protocol as state machines with no I/O;
//! - `proto`: wire constants and total encoders/decoders;
//! - `export`: the [`Export`](crate::Export) trait the server serves.

mod export;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
mod handshake;
mod proto;
mod server;
mod transmission;

#[cfg(test)]
mod tests;

pub use export::{Export, ExportError, ExportErrorKind};
pub use server::{ListenAddr, NbdListener, NbdServer};

/// Smallest request granularity: every offset and length must be a multiple
/// of this (advertised as `NBD_INFO_BLOCK_SIZE` minimum).
pub const BLOCK_SIZE_MIN: u32 = 512;
/// The block size Keel volumes work best with (advertised as preferred).
pub const BLOCK_SIZE_PREFERRED: u32 = 4096;
/// Largest READ or WRITE payload (advertised as maximum payload): 32 MiB, the
/// most that Linux and qemu send and the spec's default.
pub const PAYLOAD_MAX: u32 = 32 * 1024 * 1024;

const _: () = assert!(BLOCK_SIZE_MIN.is_power_of_two() && BLOCK_SIZE_MIN <= 64 * 1024);
const _: () = assert!(BLOCK_SIZE_PREFERRED.is_power_of_two());
const _: () = assert!(BLOCK_SIZE_PREFERRED >= BLOCK_SIZE_MIN && BLOCK_SIZE_PREFERRED >= 512);
const _: () = assert!(PAYLOAD_MAX >= BLOCK_SIZE_PREFERRED && PAYLOAD_MAX % BLOCK_SIZE_MIN == 0);
