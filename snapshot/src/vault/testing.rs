//! Test support (feature `testing`): a local vault with a hook on every chunk read, to
//! count reads, slow them down, or change the vault under a reader the way another process
//! would.

use std::fmt;

use super::{ChunkEntry, LocalVault, ObjectEntry, Put, Vault, VaultError};
use crate::key::ChunkId;

/// What runs before each chunk read, with the vault and the id asked for.
pub type BeforeGet = Box<dyn Fn(&LocalVault, &ChunkId) + Send + Sync>;

/// A [`LocalVault`] that runs a hook before every [`Vault::get_chunk`]; everything else is
/// the inner vault's.
pub struct HookedVault {
    /// The vault that answers.
    pub inner: LocalVault,
    before_get: BeforeGet,
}

impl HookedVault {
    /// `inner`, running `before_get` before each chunk read.
    pub fn new(inner: LocalVault, before_get: BeforeGet) -> Self {
        HookedVault { inner, before_get }
    }
}

impl fmt::Debug for HookedVault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HookedVault").field("inner", &self.inner).finish_non_exhaustive()
    }
}

impl Vault for HookedVault {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn put_chunk(&self, id: &ChunkId, frame: &[u8]) -> Result<Put, VaultError> {
        self.inner.put_chunk(id, frame)
    }
    fn sync(&self) -> Result<(), VaultError> {
        self.inner.sync()
    }
    fn get_chunk(&self, id: &ChunkId) -> Result<Vec<u8>, VaultError> {
        (self.before_get)(&self.inner, id);
        self.inner.get_chunk(id)
    }
    fn has_chunk(&self, id: &ChunkId) -> Result<bool, VaultError> {
        self.inner.has_chunk(id)
    }
    fn has_chunks(&self, ids: &[ChunkId]) -> Result<Vec<bool>, VaultError> {
        self.inner.has_chunks(ids)
    }
    fn delete_chunk(&self, id: &ChunkId) -> Result<bool, VaultError> {
        self.inner.delete_chunk(id)
    }
    fn reads_in_flight(&self) -> usize {
        self.inner.reads_in_flight()
    }
    fn reclaim(&self) -> Result<u64, VaultError> {
        self.inner.reclaim()
    }
    fn list_chunks(&self, after: Option<&ChunkId>, limit: usize) -> Result<Vec<ChunkEntry>, VaultError> {
        self.inner.list_chunks(after, limit)
    }
    fn put_object(&self, key: &str, bytes: &[u8]) -> Result<(), VaultError> {
        self.inner.put_object(key, bytes)
    }
    fn get_object(&self, key: &str) -> Result<Vec<u8>, VaultError> {
        self.inner.get_object(key)
    }
    fn delete_object(&self, key: &str) -> Result<bool, VaultError> {
        self.inner.delete_object(key)
    }
    fn list_objects(&self, prefix: &str) -> Result<Vec<ObjectEntry>, VaultError> {
        self.inner.list_objects(prefix)
    }
}
