//! Synchronous replication: the arbiter (witness) model, the fencing state machines,
//! the wire format and the drivers that move journal records to a standby over QUIC.
//! See docs/replication.md.

pub mod arbiter;
