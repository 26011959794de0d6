//! Synchronous replication: the arbiter (witness) model, the fencing state machines,
//! the wire format and the drivers that move journal records to a standby over QUIC.
//! See docs/replication.md.
//!
//! Layers, from pure to I/O:
//! - `arbiter`, `fence`, `witness`, `history`: decisions, no I/O, time injected;
//! - `wire`, `proto`, `state`: formats (frames, control messages, the persisted state);
//! - `volume`, `primary`, `standby`, `resync`, `marker`, `node`, `witness_net`: the tokio
//!   drivers (`marker`: snapshot markers the standby asks the primary for).

pub mod arbiter;
pub mod fence;
pub mod history;
mod marker;
pub mod node;
mod primary;
pub mod proto;
mod resync;
#[cfg(test)]
mod sim;
mod standby;
pub mod state;
pub mod volume;
pub mod wire;
pub mod witness;
pub mod witness_net;
