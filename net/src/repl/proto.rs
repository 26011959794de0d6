//! The replication protocol's control messages (JSON frames; see docs/format-replication.md).
//! Journal records, sync requests, acknowledgements and resync data are binary frames,
//! defined in [`super::wire`].

use serde::{Deserialize, Serialize};

use super::history::EpochStart;
use super::state::Role;

/// ALPN of node-to-node replication connections.
pub const ALPN_REPL: &[u8] = b"keel-repl/1";
/// ALPN of node-to-witness connections.
pub const ALPN_WITNESS: &[u8] = b"keel-witness/1";

/// Feature a node lists in its `Hello` / `HelloReply` when it speaks the snapshot-marker
/// frames (`MarkRequest`, `MarkReply`): a standby sends a `MarkRequest` only to a primary
/// that listed it, and a primary defers scheduled snapshots only to a standby that did.
pub const FEATURE_SNAPSHOT_MARKER: &str = "snapshot-marker";

/// Feature a node lists in its `Hello` / `HelloReply` when it speaks the group marker
/// frames (`MarkGroupRequest`, `MarkGroupReply`): a standby sends a `MarkGroupRequest` only
/// to a primary that listed it on the lead member's stream, and a primary defers
/// scheduled group snapshots only to a standby that listed it on every member's.
pub const FEATURE_SNAPSHOT_GROUP_MARKER: &str = "snapshot-group-marker";

/// The features this build speaks (see [`FEATURE_SNAPSHOT_MARKER`],
/// [`FEATURE_SNAPSHOT_GROUP_MARKER`]).
pub fn features() -> Vec<String> {
    vec![FEATURE_SNAPSHOT_MARKER.to_string(), FEATURE_SNAPSHOT_GROUP_MARKER.to_string()]
}

/// What a stream opened by the primary carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamKind {
    /// The ordered journal (records and sync requests; acknowledgements come back).
    Journal,
    /// Bulk resync data, so that it never sits in front of live records.
    Resync,
}

/// First frame on every stream the primary opens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Volume (or consistency group) the stream is about.
    pub volume: String,
    /// The sender's node name (checked against its certificate).
    pub node: String,
    /// What the stream carries.
    pub stream: StreamKind,
    /// The sender's epoch; the receiver refuses anything older than its own.
    pub epoch: u64,
    /// The sender's last seq.
    pub last_seq: u64,
    /// The sender's epoch history.
    pub history: Vec<EpochStart>,
    /// Volume size in bytes (both copies must match).
    pub size: u64,
    /// Optional protocol features the sender speaks (absent from older senders).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub features: Vec<String>,
}

/// The receiver's verdict on a [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Go on.
    Accept,
    /// The receiver holds a newer epoch (or is itself primary): the sender is stale.
    Stale,
    /// Refused, for the reason given (wrong peer, size mismatch, unknown volume, ...).
    Refuse(String),
}

/// Answer to a [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloReply {
    /// The receiver's node name.
    pub node: String,
    /// Whether the stream may proceed.
    pub verdict: Verdict,
    /// The receiver's role for the volume.
    pub role: Role,
    /// The receiver's epoch.
    pub epoch: u64,
    /// The receiver's last seq.
    pub last_seq: u64,
    /// The receiver's durable seq.
    pub durable_seq: u64,
    /// The receiver's epoch history.
    pub history: Vec<EpochStart>,
    /// Whether the receiver's copy is consistent (no resync pending).
    pub consistent: bool,
    /// Optional protocol features the receiver speaks (absent from older receivers).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub features: Vec<String>,
}

/// Control messages after the handshake.
#[allow(missing_docs)] // the fields are described on each variant
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Control {
    /// Primary → standby on the journal stream, after the handshake: adopt this epoch and
    /// history; records follow from `stream_from`. With `resync_from`, the standby's copy
    /// differs after that seq: it discards its records after it, jumps to `stream_from - 1`,
    /// reports the regions it changed since then, and takes resync data.
    Start { epoch: u64, history: Vec<EpochStart>, stream_from: u64, resync_from: Option<u64> },
    /// Standby → primary: the regions the standby changed since `resync_from` (`None`:
    /// unknown, copy everything), and what it discarded.
    Regions { region_bytes: u64, regions: Option<Vec<u64>>, discarded_records: u64, discarded_bytes: u64 },
    /// Standby → primary on the resync stream: every resync block is applied and durable.
    ResyncDone { durable_seq: u64 },
    /// Primary → standby on the journal stream, after every record (planned switchover):
    /// the witness made the standby primary of `epoch`; take over.
    Handover { epoch: u64 },
}
