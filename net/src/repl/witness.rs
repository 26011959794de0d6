//! The witness's decision core and its durable record format.
//!
//! The witness (W in design-fencing.md) is the only place where "who is primary" and "may
//! the standby be behind" are decided. [`WitnessCore`] makes those decisions for every
//! volume it serves, one request at a time, with no I/O: the `keel witness` server calls
//! [`WitnessCore::handle`] for each request, makes the changed record durable with
//! [`encode_record`] (write, fsync, rename) *before* it sends the answer, and loads the
//! records with [`decode_record`] at start.
//!
//! Leases are not durable. After a restart every record's lease counts as fresh for a full
//! lease from the restart ([`WitnessCore::new`]): a primary that renewed just before the
//! witness died is still protected, at the price of one lease of delay before a promotion.
//!
//! The rules, each with its reason, are on [`WitnessCore::handle`] and in
//! docs/replication.md ("The witness").

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::arbiter::{ArbiterRecord, ArbiterRequest, ArbiterResponse, StandbyState};

/// The decision core of `keel witness`: one [`ArbiterRecord`] per volume plus the primary's
/// lease expiry by the witness's own clock.
///
/// # Invariants
///
/// - A record's epoch only grows, and only through `Promote`, `Handover` and
///   `ForcePromote`, each raising it by exactly one.
/// - `Promote` is granted only to the record's standby, only while it is `UpToDate`, and
///   only once the primary's lease has expired (design-fencing.md, rule 2).
/// - A record with `standby_state = Outdated` becomes `UpToDate` only through
///   `MarkUpToDate` from the primary of the same epoch, or through `Handover`.
#[derive(Debug)]
pub struct WitnessCore {
    lease: Duration,
    volumes: BTreeMap<String, Entry>,
}

#[derive(Debug)]
struct Entry {
    record: ArbiterRecord,
    /// The primary's lease runs until here, by this witness's clock.
    lease_expiry: Instant,
}

impl WitnessCore {
    /// A witness granting leases of `lease`, serving `records` (loaded from disk). Every
    /// loaded record's lease counts as fresh until `now + lease`, since the lease the
    /// primary last received is unknown.
    pub fn new(lease: Duration, records: Vec<ArbiterRecord>, now: Instant) -> Self {
        let volumes = records
            .into_iter()
            .map(|record| (record.volume.clone(), Entry { record, lease_expiry: now + lease }))
            .collect();
        Self { lease, volumes }
    }

    /// The records, by volume name.
    pub fn records(&self) -> impl Iterator<Item = &ArbiterRecord> {
        self.volumes.values().map(|entry| &entry.record)
    }

    /// The record of `volume`, if any.
    pub fn record(&self, volume: &str) -> Option<&ArbiterRecord> {
        self.volumes.get(volume).map(|entry| &entry.record)
    }

    /// Decides one request from `peer`, the name in the sender's verified certificate.
    ///
    /// When the answer changes a record, the changed record is returned too: the caller
    /// MUST make it durable before sending the answer (design-fencing.md: "W fsyncs the
    /// record before it answers"); if that fails, the caller must not answer and must stop
    /// serving (the in-memory record is ahead of the disk).
    ///
    /// Rules (a request whose `node` is not `peer` is refused first):
    /// - `Get`: the record, to the volume's primary or standby.
    /// - `Init`: creates the record when absent (its primary's lease starts now), otherwise
    ///   answers the existing one unchanged.
    /// - `Renew`, `MarkOutdated`, `MarkUpToDate`: only from the record's primary at the
    ///   record's epoch; each extends the primary's lease to `now + lease` (so the primary
    ///   can count any granted request as a renewal).
    /// - `Promote`: only from the record's standby at the record's epoch, only when the
    ///   standby is `UpToDate` (rule 2), and only after the primary's lease has expired
    ///   (else `RetryAfter` with the remaining lease). Writes `{ epoch + 1, primary: node,
    ///   standby: old primary, Outdated }`; the new primary's lease starts now. A repeated
    ///   `Promote` from the node that already won is refused with the record naming it
    ///   primary, which the standby treats as the grant it may have missed.
    /// - `Handover`: planned switchover, only from the primary at the record's epoch while
    ///   the standby is `UpToDate`. Writes `{ epoch + 1, primary: old standby, standby: old
    ///   primary, UpToDate }` (the old primary drained, so it has everything) and gives the
    ///   new primary a fresh lease, so the old one cannot promote itself back at once.
    /// - `ForcePromote`: operator override, for the record's primary or standby whatever
    ///   the record says: `{ epoch + 1, primary: node, standby: the other, Outdated }`.
    ///   The caller shows the operator what was overridden with [`force_promote_warning`].
    /// - Stale or future epochs are refused with the current record.
    pub fn handle(
        &mut self,
        now: Instant,
        peer: &str,
        request: ArbiterRequest,
    ) -> (ArbiterResponse, Option<ArbiterRecord>) {
        let lease = self.lease;
        let lease_ms = Some(duration_ms_ceil(lease));
        let (volume, node) = match &request {
            ArbiterRequest::Get { volume } => (volume, None),
            ArbiterRequest::Init { record } => (&record.volume, None),
            ArbiterRequest::Renew { volume, node, .. }
            | ArbiterRequest::MarkOutdated { volume, node, .. }
            | ArbiterRequest::MarkUpToDate { volume, node, .. }
            | ArbiterRequest::Promote { volume, node, .. }
            | ArbiterRequest::Handover { volume, node, .. }
            | ArbiterRequest::ForcePromote { volume, node } => (volume, Some(node)),
        };
        let outdating = matches!(request, ArbiterRequest::MarkOutdated { .. });
        let entry = self.volumes.get_mut(volume.as_str());
        if let Some(node) = node {
            if node != peer {
                return (
                    refused(
                        entry.map(|entry| &entry.record),
                        format!("request names node {node:?} but comes from {peer:?}"),
                    ),
                    None,
                );
            }
        }
        let Some(entry) = entry else {
            return match request {
                ArbiterRequest::Init { record } => {
                    if let Err(reason) = check_new_record(&record, peer) {
                        return (refused(None, reason), None);
                    }
                    let lease_ms = (record.primary == peer).then(|| duration_ms_ceil(lease));
                    self.volumes
                        .insert(record.volume.clone(), Entry { record: record.clone(), lease_expiry: now + lease });
                    (ArbiterResponse::Granted { record: record.clone(), lease_ms }, Some(record))
                }
                _ => (refused(None, format!("volume {volume:?} has no record; initialise it first")), None),
            };
        };
        let record = &mut entry.record;
        if record.primary != peer && record.standby != peer {
            let reason = format!("{peer:?} is neither the primary nor the standby of volume {:?}", record.volume);
            return (refused(None, reason), None);
        }
        match request {
            ArbiterRequest::Get { .. } | ArbiterRequest::Init { .. } => {
                (ArbiterResponse::Granted { record: record.clone(), lease_ms: None }, None)
            }
            ArbiterRequest::Renew { epoch, node, .. } => {
                if let Err(reason) = check_primary(record, epoch, &node) {
                    return (refused(Some(record), reason), None);
                }
                entry.lease_expiry = entry.lease_expiry.max(now + lease);
                (ArbiterResponse::Granted { record: record.clone(), lease_ms }, None)
            }
            ArbiterRequest::MarkOutdated { epoch, node, .. } | ArbiterRequest::MarkUpToDate { epoch, node, .. } => {
                if let Err(reason) = check_primary(record, epoch, &node) {
                    return (refused(Some(record), reason), None);
                }
                let state = if outdating { StandbyState::Outdated } else { StandbyState::UpToDate };
                entry.lease_expiry = entry.lease_expiry.max(now + lease);
                let changed = (record.standby_state != state).then(|| {
                    record.standby_state = state;
                    record.clone()
                });
                (ArbiterResponse::Granted { record: record.clone(), lease_ms }, changed)
            }
            ArbiterRequest::Promote { epoch, node, .. } => {
                if epoch != record.epoch {
                    let reason = if epoch < record.epoch && record.primary == node {
                        format!("{node:?} already is primary of epoch {}", record.epoch)
                    } else {
                        format!("stale epoch {epoch}: the record is at epoch {}", record.epoch)
                    };
                    return (refused(Some(record), reason), None);
                }
                if record.standby != node {
                    let reason = format!("{node:?} is not the standby of epoch {}", record.epoch);
                    return (refused(Some(record), reason), None);
                }
                if record.standby_state != StandbyState::UpToDate {
                    let reason = format!(
                        "{node:?} is outdated in epoch {}: it may lack acknowledged writes, so it is never promoted \
                         automatically",
                        record.epoch
                    );
                    return (refused(Some(record), reason), None);
                }
                if let Some(remaining) = entry.lease_expiry.checked_duration_since(now).filter(|left| !left.is_zero()) {
                    let wait_ms = duration_ms_ceil(remaining);
                    return (ArbiterResponse::RetryAfter { record: record.clone(), wait_ms }, None);
                }
                *record = ArbiterRecord {
                    volume: record.volume.clone(),
                    epoch: record.epoch + 1,
                    primary: node,
                    standby: record.primary.clone(),
                    standby_state: StandbyState::Outdated,
                };
                entry.lease_expiry = now + lease;
                (ArbiterResponse::Granted { record: record.clone(), lease_ms }, Some(record.clone()))
            }
            ArbiterRequest::Handover { epoch, node, .. } => {
                if let Err(reason) = check_primary(record, epoch, &node) {
                    return (refused(Some(record), reason), None);
                }
                if record.standby_state != StandbyState::UpToDate {
                    let reason = format!(
                        "standby {:?} is outdated in epoch {}: let it resync before handing over",
                        record.standby, record.epoch
                    );
                    return (refused(Some(record), reason), None);
                }
                *record = ArbiterRecord {
                    volume: record.volume.clone(),
                    epoch: record.epoch + 1,
                    primary: record.standby.clone(),
                    standby: node,
                    standby_state: StandbyState::UpToDate,
                };
                entry.lease_expiry = now + lease;
                // The lease belongs to the new primary, which learns it with its first Renew.
                (ArbiterResponse::Granted { record: record.clone(), lease_ms: None }, Some(record.clone()))
            }
            ArbiterRequest::ForcePromote { node, .. } => {
                let other = if record.primary == node { record.standby.clone() } else { record.primary.clone() };
                *record = ArbiterRecord {
                    volume: record.volume.clone(),
                    epoch: record.epoch + 1,
                    primary: node,
                    standby: other,
                    standby_state: StandbyState::Outdated,
                };
                entry.lease_expiry = now + lease;
                (ArbiterResponse::Granted { record: record.clone(), lease_ms }, Some(record.clone()))
            }
        }
    }
}

/// What a forced promotion of `node` overrides, for the operator (design-fencing.md, "W
/// down, then P dies"): `last_known` is the witness's record as last seen (`None` when the
/// witness could not be reached and no copy is known).
pub fn force_promote_warning(last_known: Option<&ArbiterRecord>, node: &str) -> String {
    let Some(record) = last_known else {
        return format!(
            "forcing {node:?} to primary without the witness's record: writes acknowledged while {node:?} was \
             outdated could exist and would be lost; the record cannot tell"
        );
    };
    if record.primary == node {
        return format!(
            "{node:?} already is primary of epoch {} in the witness's record; forcing raises the epoch to {}",
            record.epoch,
            record.epoch + 1
        );
    }
    match record.standby_state {
        StandbyState::Outdated => format!(
            "the witness's record says {node:?} is OUTDATED in epoch {} (primary {:?}): writes acknowledged by \
             {:?} after that are missing on {node:?} and will be lost by forcing it to primary",
            record.epoch, record.primary, record.primary
        ),
        StandbyState::UpToDate => format!(
            "the witness's record says {node:?} is up to date in epoch {} (primary {:?}): no acknowledged write \
             should be missing, but {:?} must not be running as primary; it will be fenced by the new epoch {}",
            record.epoch,
            record.primary,
            record.primary,
            record.epoch + 1
        ),
    }
}

fn refused(record: Option<&ArbiterRecord>, reason: String) -> ArbiterResponse {
    ArbiterResponse::Refused { record: record.cloned(), reason }
}

fn check_primary(record: &ArbiterRecord, epoch: u64, node: &str) -> Result<(), String> {
    if epoch != record.epoch {
        return Err(format!("stale epoch {epoch}: the record is at epoch {}", record.epoch));
    }
    if record.primary != node {
        return Err(format!("{node:?} is not the primary of epoch {} ({:?} is)", record.epoch, record.primary));
    }
    Ok(())
}

fn check_new_record(record: &ArbiterRecord, peer: &str) -> Result<(), String> {
    if record.volume.is_empty() || record.primary.is_empty() || record.standby.is_empty() {
        return Err("a record needs a volume, a primary and a standby".to_owned());
    }
    if record.primary == record.standby {
        return Err(format!("primary and standby are both {:?}", record.primary));
    }
    if record.primary != peer && record.standby != peer {
        return Err(format!("{peer:?} may only initialise a volume it is primary or standby of"));
    }
    Ok(())
}

fn duration_ms_ceil(duration: Duration) -> u64 {
    let ms = duration.as_nanos().div_ceil(1_000_000);
    u64::try_from(ms).unwrap_or(u64::MAX)
}

// ---------------------------------------------------------------------------------------
// The durable record file.
//
// One file per volume: a 14-byte header, then the record as JSON (human-inspectable, tiny,
// written rarely). Little-endian. docs/replication.md ("The witness's record file") has the
// byte diagram; the offsets below are the single source of truth.

/// The file magic.
pub const RECORD_MAGIC: [u8; 4] = *b"KWIT";
const MAGIC_OFFSET: usize = 0;
const VERSION_OFFSET: usize = MAGIC_OFFSET + RECORD_MAGIC.len();
const LEN_OFFSET: usize = VERSION_OFFSET + size_of::<u16>();
const CRC_OFFSET: usize = LEN_OFFSET + size_of::<u32>();
/// Bytes before the body.
pub const RECORD_HEADER_LEN: usize = CRC_OFFSET + size_of::<u32>();
/// The largest body accepted: a record is a few hundred bytes; anything bigger is corrupt.
pub const RECORD_BODY_MAX: usize = 64 * 1024;
const _: () = assert!(RECORD_HEADER_LEN == 14);

/// Versions of the record file. Version 1 is the only one so far; a new version gets a
/// variant, a frozen decoder and an upgrade step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum RecordVersion {
    /// JSON body of [`ArbiterRecord`].
    V1 = 1,
}

impl RecordVersion {
    /// The version new files are written with.
    pub const CURRENT: Self = Self::V1;

    fn from_u16(value: u16) -> Option<Self> {
        match value {
            1 => Some(Self::V1),
            _ => None,
        }
    }
}

/// Why a record file could not be read. Every variant means the file is corrupt or from a
/// newer Keel; the witness refuses to start rather than guess.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    /// Shorter than its header or than its length field says.
    #[error("witness record: truncated (need {needed} bytes, got {got})")]
    Truncated {
        /// Bytes required.
        needed: usize,
        /// Bytes present.
        got: usize,
    },
    /// Does not start with `KWIT`.
    #[error("witness record: bad magic {got:02x?} (expected \"KWIT\")")]
    BadMagic {
        /// The first four bytes.
        got: [u8; 4],
    },
    /// A version this build does not know.
    #[error("witness record: unsupported version {0} (this build reads version 1); upgrade keel")]
    UnsupportedVersion(u16),
    /// The length field is larger than any record or disagrees with the file size.
    #[error("witness record: body length {declared} does not match the {actual} bytes present (limit {max})")]
    BadLength {
        /// The length field.
        declared: usize,
        /// Bytes after the header.
        actual: usize,
        /// [`RECORD_BODY_MAX`].
        max: usize,
    },
    /// The checksum does not match.
    #[error("witness record: checksum mismatch (expected {expected:#010x}, got {got:#010x})")]
    ChecksumMismatch {
        /// The checksum stored in the header.
        expected: u32,
        /// The checksum of the bytes present.
        got: u32,
    },
    /// The checksum matched but the body is not a valid record.
    #[error("witness record: malformed body: {0}")]
    Malformed(String),
}

/// Encodes `record` as a record file: `KWIT`, version (u16), body length (u32), crc32 of
/// every other byte of the file (u32), JSON body.
pub fn encode_record(record: &ArbiterRecord) -> Vec<u8> {
    // Serialising a struct of strings and integers cannot fail.
    let body = serde_json::to_vec(record).unwrap_or_default();
    let body_len = u32::try_from(body.len()).unwrap_or(u32::MAX);
    let mut bytes = Vec::with_capacity(RECORD_HEADER_LEN + body.len());
    bytes.extend_from_slice(&RECORD_MAGIC);
    bytes.extend_from_slice(&(RecordVersion::CURRENT as u16).to_le_bytes());
    bytes.extend_from_slice(&body_len.to_le_bytes());
    let crc = record_crc(&bytes, &body);
    bytes.extend_from_slice(&crc.to_le_bytes());
    bytes.extend_from_slice(&body);
    debug_assert_eq!(decode_record(&bytes).as_ref(), Ok(record));
    bytes
}

/// Decodes a record file, checking length, magic, version, length field and checksum, in
/// that order, before parsing the body. Never panics.
pub fn decode_record(bytes: &[u8]) -> Result<ArbiterRecord, RecordError> {
    let header: &[u8; RECORD_HEADER_LEN] = bytes
        .get(..RECORD_HEADER_LEN)
        .and_then(|header| header.try_into().ok())
        .ok_or(RecordError::Truncated { needed: RECORD_HEADER_LEN, got: bytes.len() })?;
    let field = |offset: usize, len: usize| header.get(offset..offset + len).unwrap_or_default();
    let magic: [u8; 4] = field(MAGIC_OFFSET, 4).try_into().unwrap_or_default();
    if magic != RECORD_MAGIC {
        return Err(RecordError::BadMagic { got: magic });
    }
    let version = u16::from_le_bytes(field(VERSION_OFFSET, 2).try_into().unwrap_or_default());
    let Some(RecordVersion::V1) = RecordVersion::from_u16(version) else {
        return Err(RecordError::UnsupportedVersion(version));
    };
    let declared = u32::from_le_bytes(field(LEN_OFFSET, 4).try_into().unwrap_or_default()) as usize;
    let body = bytes.get(RECORD_HEADER_LEN..).unwrap_or_default();
    if declared > RECORD_BODY_MAX || declared != body.len() {
        if declared < body.len() || declared > RECORD_BODY_MAX {
            return Err(RecordError::BadLength { declared, actual: body.len(), max: RECORD_BODY_MAX });
        }
        return Err(RecordError::Truncated { needed: RECORD_HEADER_LEN + declared, got: bytes.len() });
    }
    let expected = u32::from_le_bytes(field(CRC_OFFSET, 4).try_into().unwrap_or_default());
    let got = record_crc(field(0, CRC_OFFSET), body);
    if expected != got {
        return Err(RecordError::ChecksumMismatch { expected, got });
    }
    serde_json::from_slice(body).map_err(|error| RecordError::Malformed(error.to_string()))
}

/// crc32 of the header before the crc field, then the body.
fn record_crc(header_before_crc: &[u8], body: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(header_before_crc);
    hasher.update(body);
    hasher.finalize()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_secs(2);

    fn record(epoch: u64, standby_state: StandbyState) -> ArbiterRecord {
        ArbiterRecord {
            volume: "acme-db".to_owned(),
            epoch,
            primary: "a".to_owned(),
            standby: "b".to_owned(),
            standby_state,
        }
    }

    fn renew(epoch: u64, node: &str) -> ArbiterRequest {
        ArbiterRequest::Renew { volume: "acme-db".to_owned(), epoch, node: node.to_owned() }
    }

    fn promote(epoch: u64, node: &str) -> ArbiterRequest {
        ArbiterRequest::Promote { volume: "acme-db".to_owned(), epoch, node: node.to_owned() }
    }

    fn witness(now: Instant, standby_state: StandbyState) -> WitnessCore {
        WitnessCore::new(LEASE, vec![record(5, standby_state)], now)
    }

    #[test]
    fn init_creates_once_and_answers_the_existing_record_after() {
        let now = Instant::now();
        let mut core = WitnessCore::new(LEASE, Vec::new(), now);
        let (response, changed) =
            core.handle(now, "a", ArbiterRequest::Init { record: record(1, StandbyState::UpToDate) });
        assert!(matches!(response, ArbiterResponse::Granted { lease_ms: Some(2000), .. }));
        assert_eq!(changed, Some(record(1, StandbyState::UpToDate)));
        let mut other = record(7, StandbyState::Outdated);
        other.primary = "b".to_owned();
        other.standby = "a".to_owned();
        let (response, changed) = core.handle(now, "b", ArbiterRequest::Init { record: other });
        assert_eq!(response, ArbiterResponse::Granted { record: record(1, StandbyState::UpToDate), lease_ms: None });
        assert_eq!(changed, None);
        // The primary's lease started at Init: the standby cannot promote at once.
        let (response, _) = core.handle(now, "b", promote(1, "b"));
        assert!(matches!(response, ArbiterResponse::RetryAfter { wait_ms: 2000, .. }));
        // A stranger cannot create or read.
        let mut stranger = record(1, StandbyState::UpToDate);
        stranger.volume = "other".to_owned();
        let (response, _) = core.handle(now, "c", ArbiterRequest::Init { record: stranger });
        assert!(matches!(response, ArbiterResponse::Refused { record: None, .. }));
        let (response, _) = core.handle(now, "c", ArbiterRequest::Get { volume: "acme-db".to_owned() });
        assert!(matches!(response, ArbiterResponse::Refused { record: None, .. }));
    }

    #[test]
    fn renew_only_for_the_primary_at_its_epoch() {
        let now = Instant::now();
        let mut core = witness(now, StandbyState::UpToDate);
        assert!(matches!(
            core.handle(now, "a", renew(5, "a")),
            (ArbiterResponse::Granted { lease_ms: Some(2000), .. }, None)
        ));
        assert!(matches!(core.handle(now, "a", renew(4, "a")).0, ArbiterResponse::Refused { record: Some(_), .. }));
        assert!(matches!(core.handle(now, "b", renew(5, "b")).0, ArbiterResponse::Refused { record: Some(_), .. }));
        // The certificate name must match the request's node.
        assert!(matches!(core.handle(now, "b", renew(5, "a")).0, ArbiterResponse::Refused { .. }));
        assert!(matches!(
            core.handle(now, "a", ArbiterRequest::Renew { volume: "nope".to_owned(), epoch: 5, node: "a".to_owned() })
                .0,
            ArbiterResponse::Refused { record: None, .. }
        ));
    }

    #[test]
    fn promote_waits_for_the_lease_then_writes_the_new_epoch() {
        let start = Instant::now();
        let mut core = witness(start, StandbyState::UpToDate);
        // Fresh after a restart: a full lease from `start`.
        let (response, changed) = core.handle(start + Duration::from_millis(500), "b", promote(5, "b"));
        assert_eq!(response, ArbiterResponse::RetryAfter { record: record(5, StandbyState::UpToDate), wait_ms: 1500 });
        assert_eq!(changed, None);
        // A renewal pushes the expiry out.
        let renewed_at = start + Duration::from_millis(1000);
        assert!(matches!(core.handle(renewed_at, "a", renew(5, "a")).0, ArbiterResponse::Granted { .. }));
        let (response, _) = core.handle(start + Duration::from_millis(2500), "b", promote(5, "b"));
        assert!(matches!(response, ArbiterResponse::RetryAfter { wait_ms: 500, .. }));
        // Only the standby at the current epoch.
        assert!(matches!(core.handle(start + LEASE * 2, "a", promote(5, "a")).0, ArbiterResponse::Refused { .. }));
        assert!(matches!(core.handle(start + LEASE * 2, "b", promote(4, "b")).0, ArbiterResponse::Refused { .. }));
        let expected = ArbiterRecord {
            volume: "acme-db".to_owned(),
            epoch: 6,
            primary: "b".to_owned(),
            standby: "a".to_owned(),
            standby_state: StandbyState::Outdated,
        };
        let (response, changed) = core.handle(renewed_at + LEASE, "b", promote(5, "b"));
        assert_eq!(response, ArbiterResponse::Granted { record: expected.clone(), lease_ms: Some(2000) });
        assert_eq!(changed, Some(expected.clone()));
        // A repeated Promote (the grant was lost) is refused with the record naming it primary.
        let (response, changed) = core.handle(renewed_at + LEASE, "b", promote(5, "b"));
        assert!(matches!(&response, ArbiterResponse::Refused { record: Some(record), .. } if *record == expected));
        assert_eq!(changed, None);
        // The old primary is fenced off at the witness.
        assert!(matches!(core.handle(renewed_at + LEASE, "a", renew(5, "a")).0, ArbiterResponse::Refused { .. }));
        // The new primary got a lease with the grant: the old one cannot promote back at once.
        let (response, _) = core.handle(renewed_at + LEASE, "a", promote(6, "a"));
        assert!(matches!(response, ArbiterResponse::Refused { .. }), "outdated: {response:?}");
    }

    #[test]
    fn an_outdated_standby_is_never_promoted() {
        let now = Instant::now();
        let mut core = witness(now, StandbyState::UpToDate);
        let mark = ArbiterRequest::MarkOutdated { volume: "acme-db".to_owned(), epoch: 5, node: "a".to_owned() };
        let (response, changed) = core.handle(now, "a", mark.clone());
        assert!(matches!(response, ArbiterResponse::Granted { lease_ms: Some(2000), .. }));
        assert_eq!(changed, Some(record(5, StandbyState::Outdated)));
        // Idempotent: no change, nothing to persist.
        assert_eq!(core.handle(now, "a", mark).1, None);
        // Only the primary may mark.
        let by_standby = ArbiterRequest::MarkUpToDate { volume: "acme-db".to_owned(), epoch: 5, node: "b".to_owned() };
        assert!(matches!(core.handle(now, "b", by_standby).0, ArbiterResponse::Refused { .. }));
        let (response, _) = core.handle(now + LEASE * 10, "b", promote(5, "b"));
        assert!(matches!(response, ArbiterResponse::Refused { .. }));
        let up = ArbiterRequest::MarkUpToDate { volume: "acme-db".to_owned(), epoch: 5, node: "a".to_owned() };
        let (_, changed) = core.handle(now + LEASE * 10, "a", up);
        assert_eq!(changed, Some(record(5, StandbyState::UpToDate)));
    }

    #[test]
    fn handover_swaps_roles_with_an_up_to_date_old_primary() {
        let now = Instant::now();
        let mut core = witness(now, StandbyState::Outdated);
        let handover = ArbiterRequest::Handover { volume: "acme-db".to_owned(), epoch: 5, node: "a".to_owned() };
        assert!(matches!(core.handle(now, "a", handover.clone()).0, ArbiterResponse::Refused { .. }));
        let up = ArbiterRequest::MarkUpToDate { volume: "acme-db".to_owned(), epoch: 5, node: "a".to_owned() };
        core.handle(now, "a", up);
        let by_standby = ArbiterRequest::Handover { volume: "acme-db".to_owned(), epoch: 5, node: "b".to_owned() };
        assert!(matches!(core.handle(now, "b", by_standby).0, ArbiterResponse::Refused { .. }));
        let (response, changed) = core.handle(now, "a", handover);
        let expected = ArbiterRecord {
            volume: "acme-db".to_owned(),
            epoch: 6,
            primary: "b".to_owned(),
            standby: "a".to_owned(),
            standby_state: StandbyState::UpToDate,
        };
        assert_eq!(response, ArbiterResponse::Granted { record: expected.clone(), lease_ms: None });
        assert_eq!(changed, Some(expected));
        // The new primary has a fresh lease: the old one cannot promote itself back.
        assert!(matches!(core.handle(now + LEASE / 2, "a", promote(6, "a")).0, ArbiterResponse::RetryAfter { .. }));
        assert!(matches!(core.handle(now, "b", renew(6, "b")).0, ArbiterResponse::Granted { .. }));
    }

    #[test]
    fn force_promote_overrides_and_says_what_it_overrode() {
        let now = Instant::now();
        let mut core = witness(now, StandbyState::Outdated);
        let before = core.record("acme-db").cloned();
        let warning = force_promote_warning(before.as_ref(), "b");
        assert!(warning.contains("OUTDATED"), "{warning}");
        assert!(force_promote_warning(None, "b").contains("could exist"));
        let force = ArbiterRequest::ForcePromote { volume: "acme-db".to_owned(), node: "b".to_owned() };
        let (response, changed) = core.handle(now, "b", force);
        let expected = ArbiterRecord {
            volume: "acme-db".to_owned(),
            epoch: 6,
            primary: "b".to_owned(),
            standby: "a".to_owned(),
            standby_state: StandbyState::Outdated,
        };
        assert_eq!(response, ArbiterResponse::Granted { record: expected.clone(), lease_ms: Some(2000) });
        assert_eq!(changed, Some(expected));
        let stranger = ArbiterRequest::ForcePromote { volume: "acme-db".to_owned(), node: "c".to_owned() };
        assert!(matches!(core.handle(now, "c", stranger).0, ArbiterResponse::Refused { .. }));
    }

    #[test]
    fn record_file_round_trips_and_rejects_damage() {
        let record = record(42, StandbyState::Outdated);
        let bytes = encode_record(&record);
        assert_eq!(&bytes[..4], b"KWIT");
        assert_eq!(decode_record(&bytes), Ok(record));
        assert!(matches!(decode_record(&bytes[..3]), Err(RecordError::Truncated { needed: 14, got: 3 })));
        assert!(matches!(decode_record(&bytes[..bytes.len() - 1]), Err(RecordError::Truncated { .. })));
        let mut longer = bytes.clone();
        longer.push(b' ');
        assert!(matches!(decode_record(&longer), Err(RecordError::BadLength { .. })));
        let mut magic = bytes.clone();
        magic[0] = b'X';
        assert!(matches!(decode_record(&magic), Err(RecordError::BadMagic { .. })));
        let mut version = bytes.clone();
        version[4] = 2;
        assert_eq!(decode_record(&version), Err(RecordError::UnsupportedVersion(2)));
        // Every single-bit flip in the body or the length is caught before parsing.
        for index in LEN_OFFSET..bytes.len() {
            if (CRC_OFFSET..RECORD_HEADER_LEN).contains(&index) {
                continue;
            }
            let mut flipped = bytes.clone();
            flipped[index] ^= 0x10;
            assert!(decode_record(&flipped).is_err(), "flip at {index} accepted");
        }
        let mut huge = bytes.clone();
        huge[LEN_OFFSET..CRC_OFFSET].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(decode_record(&huge), Err(RecordError::BadLength { .. })));
    }

    #[test]
    fn decode_never_panics_on_arbitrary_bytes() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let valid = encode_record(&record(3, StandbyState::UpToDate));
        for _ in 0..2000 {
            let mut bytes = valid.clone();
            let cut = rng.gen_range(0..=bytes.len());
            bytes.truncate(cut);
            for _ in 0..rng.gen_range(0..4) {
                if !bytes.is_empty() {
                    let index = rng.gen_range(0..bytes.len());
                    bytes[index] = rng.gen();
                }
            }
            let _ = decode_record(&bytes);
        }
    }
}
