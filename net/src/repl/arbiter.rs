//! The arbiter's data model and protocol messages: one record per volume (or consistency
//! group), changed only by compare-and-set on its epoch. The built-in `keel witness`
//! serves it ([`super::witness`]); a later backend (etcd, for fleets) can implement
//! [`Arbiter`] instead. The decision rules live in [`super::witness::WitnessCore`] and are
//! explained in docs/replication.md.

use serde::{Deserialize, Serialize};

/// Whether the arbiter lets the standby fall behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StandbyState {
    /// The standby has every acknowledged write: it may be promoted; the primary must
    /// wait for its acknowledgement before completing a FLUSH.
    UpToDate,
    /// The standby may lack acknowledged writes: it can never be promoted; the primary
    /// completes FLUSHes alone.
    Outdated,
}

/// The arbiter's durable record for one volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArbiterRecord {
    /// Volume (or consistency group) name.
    pub volume: String,
    /// Generation: raised by every promotion.
    pub epoch: u64,
    /// Node that is primary in `epoch`.
    pub primary: String,
    /// Node that is standby in `epoch`.
    pub standby: String,
    /// Whether the standby may be behind.
    pub standby_state: StandbyState,
}

/// A request to the arbiter. `node` is always the sender; the witness checks it against
/// the sender's certificate name.
#[allow(missing_docs)] // the fields are named for what the variant documents
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ArbiterRequest {
    /// Read the record.
    Get { volume: String },
    /// Create the record if the volume has none (first start of a pair); answers the
    /// existing record otherwise.
    Init { record: ArbiterRecord },
    /// The primary of `epoch` extends its lease.
    Renew { volume: String, epoch: u64, node: String },
    /// The primary of `epoch` records that its standby is outdated.
    MarkOutdated { volume: String, epoch: u64, node: String },
    /// The primary of `epoch` records that its standby caught up.
    MarkUpToDate { volume: String, epoch: u64, node: String },
    /// The standby of `epoch` asks to become primary of `epoch + 1`.
    Promote { volume: String, epoch: u64, node: String },
    /// Planned switchover: the primary of `epoch`, drained and no longer writing, hands
    /// the volume to its up-to-date standby (`epoch + 1`).
    Handover { volume: String, epoch: u64, node: String },
    /// Operator override: `node` becomes primary of `epoch + 1` whatever the record says.
    ForcePromote { volume: String, node: String },
}

/// The arbiter's answer.
#[allow(missing_docs)] // the fields are named for what the variant documents
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ArbiterResponse {
    /// Done; the record as it now stands (already durable). For `Renew`, `lease_ms` is
    /// the lease granted, counted from when the request was received.
    Granted { record: ArbiterRecord, lease_ms: Option<u64> },
    /// Not now: the primary's lease is still running; ask again after `wait_ms`.
    RetryAfter { record: ArbiterRecord, wait_ms: u64 },
    /// Refused, with the record as it stands (if any) and why.
    Refused { record: Option<ArbiterRecord>, reason: String },
}

impl ArbiterResponse {
    /// The record carried by the answer, if any.
    pub fn record(&self) -> Option<&ArbiterRecord> {
        match self {
            Self::Granted { record, .. } | Self::RetryAfter { record, .. } => Some(record),
            Self::Refused { record, .. } => record.as_ref(),
        }
    }
}

/// Something that answers [`ArbiterRequest`]s: the `keel witness` client, or an in-memory
/// one in tests.
pub trait Arbiter: Send + Sync + 'static {
    /// Sends one request and waits for its answer (an error when the arbiter cannot be
    /// reached within the call's own timeout).
    fn call(
        &self,
        request: ArbiterRequest,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<ArbiterResponse, String>> + Send + '_>>;
}
