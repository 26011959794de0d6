//! Vaults: where a tenant's chunks and manifests live — the node's own repository, a
//! directory, a remote `keel vault` over QUIC, or S3-compatible object storage.
//!
//! A [`Vault`] handle is scoped to ONE tenant: every key it takes is relative to that
//! tenant's area, and a backend never lets one tenant's handle reach another tenant's
//! objects. Two kinds of things are stored:
//!
//! - **Chunks** ([`Vault::put_chunk`] …): encoded chunk frames (docs/format-chunk.md), named
//!   by their [`ChunkId`]. Immutable once written; a put of an existing id is a no-op
//!   (deduplication). Backends check the frame ([`crate::check_frame`]) before storing it.
//! - **Objects** ([`Vault::put_object`] …): small named blobs — manifests, upload intents,
//!   leases — under `/`-separated keys built by [`keys`]. A put replaces atomically: a
//!   reader sees the old or the new bytes, never a mix, and a key appears only complete.
//!
//! The trait is blocking: callers run it on their own threads (the snapshot pipeline uses a
//! small pool). Backends that are async inside (S3, QUIC) own their runtime.
//!
//! Consistency: after a put returns, a get, a `has_chunk` and a listing started afterwards
//! see it (read-after-write, as S3 and Garage give). Listings are sorted by key/id, so long
//! walks (GC) can resume after the last item seen.

use std::fmt;
use std::io;

use crate::error::{ChunkError, StoreError};
use crate::key::ChunkId;

mod local;
mod remote;
mod s3;

pub use local::LocalVault;
pub use remote::{RemoteVault, RemoteVaultConfig};
pub use s3::{S3Addressing, S3Config, S3Credentials, S3Vault};

/// Test support: a vault with a hook on chunk reads.
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod wire;

/// A chunk as listed by [`Vault::list_chunks`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkEntry {
    /// The chunk's id.
    pub id: ChunkId,
    /// Encoded length in bytes.
    pub len: u64,
    /// Last modification (write) time, unix seconds, as the backend reports it.
    pub modified: i64,
}

/// An object as listed by [`Vault::list_objects`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectEntry {
    /// The full key (including the prefix asked for).
    pub key: String,
    /// Length in bytes.
    pub len: u64,
    /// Last modification time, unix seconds.
    pub modified: i64,
}

/// What a put did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Put {
    /// The chunk was stored.
    Written,
    /// The vault already held it; nothing was sent or written.
    AlreadyPresent,
}

/// Why a vault operation failed. Every variant names the vault (its [`Vault::name`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VaultError {
    /// The chunk or object does not exist.
    #[error("vault {vault}: {what} not found")]
    NotFound {
        /// The vault's name.
        vault: String,
        /// "chunk <id>" or "object <key>".
        what: String,
    },
    /// The vault cannot be reached or answered with an error that may pass (network,
    /// server busy). Retrying later is reasonable; nothing was lost.
    #[error("vault {vault} unavailable: {reason}")]
    Unavailable {
        /// The vault's name.
        vault: String,
        /// What failed.
        reason: String,
    },
    /// The vault refused the request (authentication, authorization, tenant mismatch,
    /// quota). Retrying will not help.
    #[error("vault {vault} refused {op}: {reason}")]
    Refused {
        /// The vault's name.
        vault: String,
        /// The operation refused.
        op: String,
        /// The vault's reason.
        reason: String,
    },
    /// Bytes offered or returned are not a valid chunk frame.
    #[error("vault {vault}: chunk {id}: {source}")]
    BadChunk {
        /// The vault's name.
        vault: String,
        /// The chunk.
        id: ChunkId,
        /// What is wrong with it.
        #[source]
        source: Box<ChunkError>,
    },
    /// A key that is not valid for [`Vault::put_object`] (see [`keys::check`]).
    #[error("vault {vault}: invalid object key {key:?}: {reason}")]
    BadKey {
        /// The vault's name.
        vault: String,
        /// The key offered.
        key: String,
        /// Why it is invalid.
        reason: &'static str,
    },
    /// A local chunk store error (local backends).
    #[error("vault {vault}: {source}")]
    Store {
        /// The vault's name.
        vault: String,
        /// The store's error.
        #[source]
        source: Box<StoreError>,
    },
    /// Another I/O error.
    #[error("vault {vault}: failed to {op}: {source}")]
    Io {
        /// The vault's name.
        vault: String,
        /// The operation.
        op: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

impl VaultError {
    /// True for [`VaultError::NotFound`].
    pub fn is_not_found(&self) -> bool {
        matches!(self, VaultError::NotFound { .. })
    }

    /// True when the error may pass by itself (the vault is down or busy): the operation
    /// should be retried later, and the work it was part of is delayed, not failed.
    pub fn is_transient(&self) -> bool {
        matches!(self, VaultError::Unavailable { .. })
    }
}

/// Reads in flight against a local vault: enough to keep a disk's queue busy.
pub const LOCAL_READS_IN_FLIGHT: usize = 8;
/// Reads in flight against a network vault, so that round trips overlap: restoring
/// 1000 × 64 KiB chunks from Garage on loopback ran at 35 / 61 / 115 / 118 MiB/s with
/// 8 / 16 / 32 / 64 (docs/benchmarks.md, "Reads in flight").
pub const NETWORK_READS_IN_FLIGHT: usize = 32;

/// One tenant's area in a vault. See the module docs for the contract.
pub trait Vault: Send + Sync + fmt::Debug {
    /// A short human name for messages ("local", "dc2-garage", "vault-b.example").
    fn name(&self) -> &str;

    /// Stores an encoded chunk frame under `id` unless it is already there. The frame is
    /// checked ([`crate::check_frame`]) before it is stored. Durable, and visible to
    /// `get_chunk` and listings, once [`Vault::sync`] returned (some backends make it so
    /// at once); `has_chunk` sees it at once.
    fn put_chunk(&self, id: &ChunkId, frame: &[u8]) -> Result<Put, VaultError>;

    /// Makes every chunk put so far durable and visible. Writers call it before they write
    /// a manifest that references the chunks. A no-op where puts are durable at once.
    fn sync(&self) -> Result<(), VaultError> {
        Ok(())
    }

    /// The encoded frame of chunk `id` ([`VaultError::NotFound`] when absent). The caller
    /// decodes it with the tenant key, which also authenticates it.
    fn get_chunk(&self, id: &ChunkId) -> Result<Vec<u8>, VaultError>;

    /// Whether the vault holds chunk `id`.
    fn has_chunk(&self, id: &ChunkId) -> Result<bool, VaultError>;

    /// [`Vault::has_chunk`] for many ids at once (one round trip where the backend can).
    fn has_chunks(&self, ids: &[ChunkId]) -> Result<Vec<bool>, VaultError> {
        ids.iter().map(|id| self.has_chunk(id)).collect()
    }

    /// Removes chunk `id`; false when it was not there. Only garbage collection calls this.
    fn delete_chunk(&self, id: &ChunkId) -> Result<bool, VaultError>;

    /// Chunk reads worth keeping in flight against this vault (restore, export, verify):
    /// [`LOCAL_READS_IN_FLIGHT`] for a local disk, more where every read is a round trip
    /// ([`NETWORK_READS_IN_FLIGHT`] for S3; a `keel vault` client's `max_in_flight`).
    fn reads_in_flight(&self) -> usize {
        LOCAL_READS_IN_FLIGHT
    }

    /// Gives back the space of deleted chunks where deleting does not (a local vault's
    /// packs: docs/format-chunk.md); returns the bytes freed. Garbage collection calls it
    /// after a complete sweep, under its lease. A no-op (0) elsewhere.
    fn reclaim(&self) -> Result<u64, VaultError> {
        Ok(0)
    }

    /// Up to `limit` chunks with ids strictly greater than `after` (from the start when
    /// `None`), in ascending id order. An empty result means the walk is complete.
    fn list_chunks(&self, after: Option<&ChunkId>, limit: usize) -> Result<Vec<ChunkEntry>, VaultError>;

    /// Stores `bytes` under `key`, replacing atomically; durable when this returns.
    fn put_object(&self, key: &str, bytes: &[u8]) -> Result<(), VaultError>;

    /// The bytes under `key` ([`VaultError::NotFound`] when absent).
    fn get_object(&self, key: &str) -> Result<Vec<u8>, VaultError>;

    /// Removes `key`; false when it was not there.
    fn delete_object(&self, key: &str) -> Result<bool, VaultError>;

    /// Every object whose key starts with `prefix`, in ascending key order.
    fn list_objects(&self, prefix: &str) -> Result<Vec<ObjectEntry>, VaultError>;
}

/// Fetches and decodes chunk `id`, trying each vault in turn. Returns the plaintext and,
/// when a later vault had to answer, the errors of the ones before.
pub fn fetch_chunk(
    key: &crate::key::TenantKey,
    vaults: &[&dyn Vault],
    id: &ChunkId,
) -> Result<(Vec<u8>, Option<String>), Vec<String>> {
    let mut errors = Vec::new();
    for vault in vaults {
        let result = vault.get_chunk(id).map_err(|e: VaultError| e.to_string()).and_then(|frame| {
            crate::chunk::decode_chunk(key, id, &frame).map_err(|e: ChunkError| format!("vault {}: {e}", vault.name()))
        });
        match result {
            Ok(plain) => return Ok((plain, (!errors.is_empty()).then(|| errors.join("; ")))),
            Err(e) => errors.push(e),
        }
    }
    if vaults.is_empty() {
        errors.push("no vault given".into());
    }
    Err(errors)
}

/// Object keys: the layout every backend shares, so a vault's contents can be copied
/// between backends as they are.
///
/// ```text
/// snapshots/<volume>/<snapshot id>.kman   manifests (docs/format-manifest.md); written last
/// uploads/<upload id>                      intents of uploads in progress (GC roots)
/// leases/<kind>-<holder>                   GC / upload mutual exclusion
/// ```
pub mod keys {
    /// Longest key accepted.
    pub const MAX_KEY_LEN: usize = 512;

    /// Checks that `key` is a relative, normalized `/`-separated path of safe characters
    /// (`A-Z a-z 0-9 . _ - @ :` and `/`), with no empty, `.` or `..` component, so no
    /// backend can be tricked into leaving the tenant's area.
    pub fn check(key: &str) -> Result<(), &'static str> {
        if key.is_empty() {
            return Err("empty");
        }
        if key.len() > MAX_KEY_LEN {
            return Err("longer than 512 bytes");
        }
        for part in key.split('/') {
            if part.is_empty() || part == "." || part == ".." {
                return Err("empty, '.' or '..' component");
            }
            if part.starts_with('.') {
                return Err("component starts with '.'");
            }
        }
        if !key.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-@:/".contains(&b)) {
            return Err("characters outside A-Z a-z 0-9 . _ - @ : /");
        }
        Ok(())
    }

    /// The prefix under which a volume's manifests live.
    pub fn snapshots_of(volume: &str) -> String {
        format!("snapshots/{volume}/")
    }

    /// The key of a snapshot's manifest.
    pub fn manifest(volume: &str, snapshot_id: &str) -> String {
        format!("snapshots/{volume}/{snapshot_id}.kman")
    }

    /// Prefix of every manifest.
    pub const SNAPSHOTS: &str = "snapshots/";
    /// Prefix of upload intents.
    pub const UPLOADS: &str = "uploads/";
    /// Prefix of leases.
    pub const LEASES: &str = "leases/";

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn checks_keys() {
            assert!(check("snapshots/db/db-20261130-0700-ab12.kman").is_ok());
            assert!(check("uploads/x@y:1").is_ok());
            for bad in ["", "/abs", "a//b", "a/../b", "..", "a/./b", "a/.hidden", "sp ace", "a\\b", "é"] {
                assert!(check(bad).is_err(), "{bad:?} accepted");
            }
            assert!(check(&"a".repeat(MAX_KEY_LEN + 1)).is_err());
        }
    }
}
