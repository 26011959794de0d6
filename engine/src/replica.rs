//! What synchronous replication sees of the journal: the record as shipped to a standby,
//! the hook through which a primary receives every record it appends, and the outcome of
//! discarding an unconfirmed tail.
//!
//! The replication protocol itself lives in `keel-net`; the engine only guarantees that a
//! standby fed every record through [`Volume::apply_replica`](crate::Volume::apply_replica)
//! in the order the primary's [`RecordSink`] saw them ends up with the same sequence
//! numbers and the same contents. Barriers never cross the wire: they are node-local, and
//! they carry the seq of the record before them instead of taking one of their own.

use crate::format::RecordKind;

/// A journal record as shipped to a standby.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaRecord<'a> {
    /// Position in the volume's total write order; identical on every node.
    pub seq: u64,
    /// Epoch of the primary that wrote it.
    pub epoch: u64,
    /// Write, zero, trim or snapshot (never a barrier).
    pub kind: RecordKind,
    /// Kind-specific flags ([`FLAG_MAY_PUNCH`](crate::format::FLAG_MAY_PUNCH) on a zero).
    pub flags: u8,
    /// Byte offset on the volume (0 for a snapshot).
    pub offset: u64,
    /// Bytes of the volume affected (0 for a snapshot).
    pub length: u64,
    /// A write's data (exactly `length` bytes) or a snapshot's name; empty otherwise.
    pub payload: &'a [u8],
}

/// Receives every Write/Zero/Trim/Snapshot record right after it is appended, in seq
/// order, while the journal lock is held (never barriers).
///
/// # Contract
/// - `appended` runs after the record was written to the journal and applied to the block
///   store and the change map, under the journal lock, so records reach the sink in
///   exactly journal order and with no gaps. Records a standby appends through
///   [`Volume::apply_replica`](crate::Volume::apply_replica) reach its own sink too.
/// - It may block briefly (a bounded queue applying backpressure): every writer of the
///   volume waits meanwhile, which is the point of synchronous replication.
/// - It must not call back into the volume: the journal lock is not reentrant, so any
///   call that appends, reads at a seq, flushes or checkpoints deadlocks.
/// - It cannot fail the write: the record is already in the journal. A sink that cannot
///   keep up must record that itself (for example by marking the standby as behind).
pub trait RecordSink: Send + Sync + std::fmt::Debug {
    /// Called once per appended record, in seq order.
    fn appended(&self, record: &ReplicaRecord<'_>);
}

/// What [`Volume::rewind`](crate::Volume::rewind) discarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RewindReport {
    /// The volume's last seq before the rewind.
    pub from_last_seq: u64,
    /// The seq the volume was rewound to; the next record appended gets `to_seq + 1`.
    pub to_seq: u64,
    /// Discarded data and snapshot records found in the journal (barriers not counted).
    pub records: u64,
    /// Payload bytes of those records.
    pub journal_bytes_found: u64,
    /// False when some discarded records had already been checkpointed out of the
    /// journal, so `records` and `journal_bytes_found` are lower bounds.
    pub fully_counted: bool,
}
