//! Mutual exclusion between uploads and garbage collection in one vault.
//!
//! GC may only delete a chunk that no manifest references and that no upload in progress
//! is about to reference. An upload references chunks it did not send (deduplication:
//! the vault already had them), so GC must not sweep while any upload runs. Both sides
//! announce themselves with an object, then look for the other:
//!
//! - an upload writes `uploads/<id>`, then reads `leases/gc-*`;
//! - GC writes `leases/gc-<holder>`, then lists `uploads/`.
//!
//! With read-after-write consistency (local directories, Garage, S3), at least one of two
//! racing parties sees the other, so they never both proceed; the one that sees the other
//! withdraws ([`LeaseError::Busy`]) and retries later. Both announcements are leases
//! with an expiry, renewed while the work runs, so a crashed node blocks nobody for long.
//! An upload checks before it writes its manifest that its lease has not run out (with a
//! margin for clock error); GC treats a lease as live until its expiry plus that margin.
//!
//! Objects are small JSON documents with a `version` field (docs/format-vault.md).

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::vault::{keys, Vault, VaultError};

/// How long a lease lasts without renewal.
pub const LEASE_SECS: i64 = 600;
/// Allowance for clock differences between the nodes sharing a vault.
pub const CLOCK_MARGIN_SECS: i64 = 60;

/// Why a lease could not be taken or kept.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LeaseError {
    /// The other party is active; try again later. Nothing was changed.
    #[error("vault {vault}: {what}; try again later")]
    Busy {
        /// The vault.
        vault: String,
        /// Who holds it ("garbage collection by node-a since …").
        what: String,
    },
    /// The lease ran out while the work was running (the process stalled); the work must
    /// not be committed.
    #[error("vault {vault}: lease {key} expired at {expired}, now {now}: not committing")]
    Expired {
        /// The vault.
        vault: String,
        /// The lease object.
        key: String,
        /// Its expiry, unix seconds.
        expired: i64,
        /// Now, unix seconds.
        now: i64,
    },
    /// The vault failed.
    #[error(transparent)]
    Vault(#[from] VaultError),
}

impl LeaseError {
    /// True when retrying later is the right response.
    pub fn is_transient(&self) -> bool {
        match self {
            LeaseError::Busy { .. } => true,
            LeaseError::Vault(e) => e.is_transient(),
            LeaseError::Expired { .. } => false,
        }
    }
}

/// The contents of a lease object.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LeaseRecord {
    /// Format version (1).
    pub version: u32,
    /// Who holds it (node name and process).
    pub holder: String,
    /// What for ("upload of db/20261130T070000Z-…", "gc").
    pub purpose: String,
    /// When it was first taken, unix seconds.
    pub started: i64,
    /// When it runs out unless renewed, unix seconds.
    pub expires: i64,
    /// GC only: the sweep's resume point (last chunk id handled, hex).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
}

/// Unix seconds now (in this crate's unit tests, plus the calling thread's
/// [`test_clock`] skew).
pub fn now_unix() -> i64 {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    #[cfg(test)]
    let now = now + test_clock::SKEW.with(std::cell::Cell::get);
    now
}

/// A clock a unit test moves forward, per thread, so a lease's ten minutes pass without
/// waiting for them.
#[cfg(test)]
pub(crate) mod test_clock {
    thread_local! {
        pub(super) static SKEW: std::cell::Cell<i64> = const { std::cell::Cell::new(0) };
    }

    /// Moves the calling thread's [`now_unix`](super::now_unix) forward by `secs`.
    pub(crate) fn advance(secs: i64) {
        SKEW.with(|skew| skew.set(skew.get() + secs));
    }
}

fn encode(record: &LeaseRecord) -> Vec<u8> {
    serde_json::to_vec(record).unwrap_or_default()
}

/// A lease found in the vault: live unless it expired more than the clock margin ago.
/// An unreadable lease object counts as live (fail safe) until its mtime is a lease old.
fn live_leases(vault: &dyn Vault, prefix: &str, now: i64) -> Result<Vec<(String, LeaseRecord)>, VaultError> {
    let mut live = Vec::new();
    for entry in vault.list_objects(prefix)? {
        let record = match vault.get_object(&entry.key) {
            Ok(bytes) => serde_json::from_slice::<LeaseRecord>(&bytes).ok(),
            Err(e) if e.is_not_found() => continue,
            Err(e) => return Err(e),
        };
        let record = record.unwrap_or_else(|| LeaseRecord {
            version: 0,
            holder: "(unreadable lease object)".into(),
            purpose: entry.key.clone(),
            started: entry.modified,
            expires: entry.modified + LEASE_SECS,
            cursor: None,
        });
        if record.expires + CLOCK_MARGIN_SECS > now {
            live.push((entry.key, record));
        }
    }
    Ok(live)
}

/// Fails when `record` has run out or will within the clock margin: the other side may
/// already treat its holder as dead.
/// Extends lease `record` (stored at `key`) when a third of it has passed, after checking
/// it is still live.
fn renew(vault: &dyn Vault, key: &str, record: &mut LeaseRecord) -> Result<(), LeaseError> {
    let now = now_unix();
    if record.expires - now > LEASE_SECS * 2 / 3 {
        return Ok(());
    }
    check_live(vault, key, record)?;
    record.expires = now + LEASE_SECS;
    vault.put_object(key, &encode(record))?;
    Ok(())
}

fn check_live(vault: &dyn Vault, key: &str, record: &LeaseRecord) -> Result<(), LeaseError> {
    let now = now_unix();
    if now + CLOCK_MARGIN_SECS >= record.expires {
        return Err(LeaseError::Expired {
            vault: vault.name().to_owned(),
            key: key.to_owned(),
            expired: record.expires,
            now,
        });
    }
    Ok(())
}

/// A running upload's lease (`uploads/<id>`). Renew it while the upload runs; check it
/// before writing the manifest; finish or abandon it after.
#[derive(Debug)]
pub struct UploadLease<'v> {
    vault: &'v dyn Vault,
    key: String,
    record: LeaseRecord,
    done: bool,
}

impl<'v> UploadLease<'v> {
    /// Announces an upload and checks that no garbage collection is sweeping.
    pub fn begin(vault: &'v dyn Vault, holder: &str, upload_id: &str, purpose: &str) -> Result<Self, LeaseError> {
        let now = now_unix();
        let key = format!("{}{upload_id}", keys::UPLOADS);
        let record = LeaseRecord {
            version: 1,
            holder: holder.to_owned(),
            purpose: purpose.to_owned(),
            started: now,
            expires: now + LEASE_SECS,
            cursor: None,
        };
        vault.put_object(&key, &encode(&record))?;
        let lease = UploadLease { vault, key, record, done: false };
        let gc = live_leases(vault, &format!("{}gc-", keys::LEASES), now)?;
        if let Some((_, other)) = gc.first() {
            let what = format!("garbage collection by {} since {} is sweeping", other.holder, other.started);
            lease.abandon();
            return Err(LeaseError::Busy { vault: vault.name().to_owned(), what });
        }
        Ok(lease)
    }

    /// Extends the lease when a third of it has passed.
    pub fn renew(&mut self) -> Result<(), LeaseError> {
        renew(self.vault, &self.key, &mut self.record)
    }

    /// Fails when the lease has run out or is about to (within the clock margin): GC may
    /// consider the upload dead, so its manifest must not be written.
    pub fn check(&self) -> Result<(), LeaseError> {
        check_live(self.vault, &self.key, &self.record)
    }

    /// Removes the lease after the manifest was written.
    pub fn finish(mut self) -> Result<(), VaultError> {
        self.done = true;
        self.vault.delete_object(&self.key).map(drop)
    }

    /// Removes the lease after a failure (best effort: an expired lease blocks nothing).
    pub fn abandon(mut self) {
        self.done = true;
        let _ = self.vault.delete_object(&self.key);
    }
}

impl Drop for UploadLease<'_> {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.vault.delete_object(&self.key);
        }
    }
}

/// Garbage collection's lease (`leases/gc-<holder>`), held while it sweeps.
#[derive(Debug)]
pub struct GcLease<'v> {
    vault: &'v dyn Vault,
    key: String,
    record: LeaseRecord,
    done: bool,
}

impl<'v> GcLease<'v> {
    /// Takes the GC lease: fails with [`LeaseError::Busy`] when another GC or any upload
    /// is live. Returns the resume cursor a previous, interrupted GC by this holder left.
    pub fn begin(vault: &'v dyn Vault, holder: &str) -> Result<(Self, Option<String>), LeaseError> {
        let now = now_unix();
        let key = format!("{}gc-{holder}", keys::LEASES);
        let previous = match vault.get_object(&key) {
            Ok(bytes) => serde_json::from_slice::<LeaseRecord>(&bytes).ok().and_then(|r| r.cursor),
            Err(e) if e.is_not_found() => None,
            Err(e) => return Err(e.into()),
        };
        let record = LeaseRecord {
            version: 1,
            holder: holder.to_owned(),
            purpose: "gc".into(),
            started: now,
            expires: now + LEASE_SECS,
            cursor: previous.clone(),
        };
        vault.put_object(&key, &encode(&record))?;
        let lease = GcLease { vault, key, record, done: false };
        let busy = |what: String| LeaseError::Busy { vault: vault.name().to_owned(), what };
        let others: Vec<_> = live_leases(vault, &format!("{}gc-", keys::LEASES), now)?
            .into_iter()
            .filter(|(k, _)| *k != lease.key)
            .collect();
        if let Some((_, other)) = others.first() {
            let what = format!("garbage collection by {} since {} is running", other.holder, other.started);
            lease.release_keep_cursor();
            return Err(busy(what));
        }
        let uploads = live_leases(vault, keys::UPLOADS, now)?;
        if !uploads.is_empty() {
            let names: Vec<String> =
                uploads.iter().take(3).map(|(_, r)| format!("{} by {}", r.purpose, r.holder)).collect();
            let what = format!("{} upload(s) in progress ({})", uploads.len(), names.join(", "));
            lease.release_keep_cursor();
            return Err(busy(what));
        }
        Ok((lease, previous))
    }

    /// Records the sweep's progress (so an interrupted GC resumes) and renews the lease.
    pub fn save_cursor(&mut self, cursor: &str) -> Result<(), LeaseError> {
        self.check()?;
        self.record.cursor = Some(cursor.to_owned());
        self.record.expires = now_unix() + LEASE_SECS;
        self.vault.put_object(&self.key, &encode(&self.record))?;
        Ok(())
    }

    /// Extends the lease when a third of it has passed, after checking it is still live
    /// (a long mark phase must not outlive it: uploads may start once it runs out).
    pub fn renew(&mut self) -> Result<(), LeaseError> {
        renew(self.vault, &self.key, &mut self.record)
    }

    /// Fails when the lease has run out (uploads may have started): stop sweeping.
    pub fn check(&self) -> Result<(), LeaseError> {
        check_live(self.vault, &self.key, &self.record)
    }

    /// The sweep is complete: removes the lease (and its cursor).
    pub fn finish(mut self) -> Result<(), VaultError> {
        self.done = true;
        self.vault.delete_object(&self.key).map(drop)
    }

    /// Withdraws without losing a saved cursor: the lease stays as an expired record.
    fn release_keep_cursor(mut self) {
        self.done = true;
        let mut record = self.record.clone();
        record.expires = 0;
        let _ = self.vault.put_object(&self.key, &encode(&record));
    }
}

impl Drop for GcLease<'_> {
    fn drop(&mut self) {
        if !self.done {
            // Interrupted (error): keep the cursor for the next run, end the lease.
            let mut record = self.record.clone();
            record.expires = 0;
            let _ = self.vault.put_object(&self.key, &encode(&record));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vault::LocalVault;

    #[test]
    fn uploads_and_gc_exclude_each_other() {
        let dir = tempfile::tempdir().unwrap();
        let vault = LocalVault::open("v", dir.path(), "t").unwrap();
        let upload = UploadLease::begin(&vault, "node-a", "u1", "upload").unwrap();
        let err = GcLease::begin(&vault, "node-b").unwrap_err();
        assert!(matches!(err, LeaseError::Busy { .. }), "{err}");
        assert!(err.to_string().contains("upload"), "{err}");
        upload.finish().unwrap();
        let (gc, cursor) = GcLease::begin(&vault, "node-b").unwrap();
        assert_eq!(cursor, None);
        let err = UploadLease::begin(&vault, "node-a", "u2", "upload").unwrap_err();
        assert!(err.to_string().contains("garbage collection"), "{err}");
        // The refused upload left no intent behind.
        assert!(vault.list_objects(keys::UPLOADS).unwrap().is_empty());
        assert!(matches!(GcLease::begin(&vault, "node-c"), Err(LeaseError::Busy { .. })));
        gc.finish().unwrap();
        UploadLease::begin(&vault, "node-a", "u3", "upload").unwrap().finish().unwrap();
    }

    #[test]
    fn interrupted_gc_keeps_its_cursor_and_expired_leases_block_nobody() {
        let dir = tempfile::tempdir().unwrap();
        let vault = LocalVault::open("v", dir.path(), "t").unwrap();
        {
            let (mut gc, _) = GcLease::begin(&vault, "node-b").unwrap();
            gc.save_cursor("ab").unwrap();
            // dropped without finish: an interrupted sweep
        }
        UploadLease::begin(&vault, "node-a", "u1", "upload").unwrap().finish().unwrap();
        let (gc, cursor) = GcLease::begin(&vault, "node-b").unwrap();
        assert_eq!(cursor.as_deref(), Some("ab"));
        gc.finish().unwrap();
        // A dead node's upload lease that ran out long ago does not block GC.
        let stale = LeaseRecord {
            version: 1,
            holder: "dead".into(),
            purpose: "upload".into(),
            started: 0,
            expires: now_unix() - CLOCK_MARGIN_SECS - 1,
            cursor: None,
        };
        vault.put_object("uploads/stale", &encode(&stale)).unwrap();
        GcLease::begin(&vault, "node-b").unwrap().0.finish().unwrap();
        // An unreadable one does (fail safe).
        vault.put_object("uploads/garbled", b"{not json").unwrap();
        assert!(GcLease::begin(&vault, "node-b").is_err());
    }
}
