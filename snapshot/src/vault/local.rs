//! A vault in a local directory: the node's own repository, or a directory on a mounted
//! remote filesystem. One subdirectory per tenant:
//!
//! ```text
//! <root>/<tenant>/packs/<16 hex>.pack       chunk frames, appended (LocalChunkStore)
//! <root>/<tenant>/packs/<16 hex>.idx        each pack's index log
//! <root>/<tenant>/objects/<key>             manifests, upload intents, leases
//! ```
//!
//! Chunk listings come from the store's in-memory index (sorted, paged), not from the
//! directory.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use super::{keys, ChunkEntry, ObjectEntry, Put, Vault, VaultError};
use crate::durable::{fsync_dir, fsync_file};
use crate::key::ChunkId;
use crate::store::{LocalChunkStore, PutOutcome};

const OBJECTS_DIR: &str = "objects";
const TEMP_SUFFIX: &str = ".tmp";

/// A tenant's area in a local directory vault.
#[derive(Debug)]
pub struct LocalVault {
    name: String,
    store: LocalChunkStore,
    objects: PathBuf,
}

impl LocalVault {
    /// Opens (creating if needed) tenant `tenant`'s area under `root`. `tenant` must be a
    /// single safe path component (see [`keys::check`]). Chunk puts are durable when they
    /// return.
    pub fn open(name: impl Into<String>, root: impl AsRef<Path>, tenant: &str) -> Result<Self, VaultError> {
        Self::open_with(name.into(), root.as_ref(), tenant, false)
    }

    /// Like [`LocalVault::open`], with chunk puts made durable in batches by
    /// [`Vault::sync`] ([`LocalChunkStore::open_deferred`]): for the node's repository and
    /// directory vaults, written by one snapshot or copy at a time.
    pub fn open_deferred(name: impl Into<String>, root: impl AsRef<Path>, tenant: &str) -> Result<Self, VaultError> {
        Self::open_with(name.into(), root.as_ref(), tenant, true)
    }

    fn open_with(name: String, root: &Path, tenant: &str, deferred: bool) -> Result<Self, VaultError> {
        if tenant.contains('/') || keys::check(tenant).is_err() {
            return Err(VaultError::BadKey { vault: name, key: tenant.to_owned(), reason: "not a valid tenant name" });
        }
        let area = root.join(tenant);
        fs::create_dir_all(&area).map_err(|source| VaultError::Io {
            vault: name.clone(),
            op: format!("create {}", area.display()),
            source,
        })?;
        let store = if deferred { LocalChunkStore::open_deferred(&area) } else { LocalChunkStore::open(&area) };
        let store = store.map_err(|source| VaultError::Store { vault: name.clone(), source: Box::new(source) })?;
        let objects = area.join(OBJECTS_DIR);
        fs::create_dir_all(&objects).map_err(|source| VaultError::Io {
            vault: name.clone(),
            op: format!("create {}", objects.display()),
            source,
        })?;
        Ok(LocalVault { name, store, objects })
    }

    /// The chunk store underneath (for `keel-inspect` and tests).
    pub fn store(&self) -> &LocalChunkStore {
        &self.store
    }

    /// The file that holds object `key`.
    pub fn object_path(&self, key: &str) -> Result<PathBuf, VaultError> {
        keys::check(key).map_err(|reason| VaultError::BadKey {
            vault: self.name.clone(),
            key: key.to_owned(),
            reason,
        })?;
        Ok(self.objects.join(key))
    }

    fn store_err(&self, source: crate::StoreError) -> VaultError {
        match source {
            crate::StoreError::NotFound { id, .. } => {
                VaultError::NotFound { vault: self.name.clone(), what: format!("chunk {id}") }
            }
            crate::StoreError::InvalidChunk { id, source } => {
                VaultError::BadChunk { vault: self.name.clone(), id, source: Box::new(source) }
            }
            source => VaultError::Store { vault: self.name.clone(), source: Box::new(source) },
        }
    }

    fn io_err(&self, op: String, source: io::Error) -> VaultError {
        VaultError::Io { vault: self.name.clone(), op, source }
    }
}

/// Unix seconds of a file's mtime (0 when the filesystem cannot say).
fn modified_secs(meta: &fs::Metadata) -> i64 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

impl Vault for LocalVault {
    fn name(&self) -> &str {
        &self.name
    }

    fn put_chunk(&self, id: &ChunkId, frame: &[u8]) -> Result<Put, VaultError> {
        match self.store.put(id, frame).map_err(|e| self.store_err(e))? {
            PutOutcome::Written => Ok(Put::Written),
            PutOutcome::AlreadyPresent => Ok(Put::AlreadyPresent),
        }
    }

    fn sync(&self) -> Result<(), VaultError> {
        self.store.sync().map_err(|e| self.store_err(e))
    }

    fn get_chunk(&self, id: &ChunkId) -> Result<Vec<u8>, VaultError> {
        self.store.get(id).map_err(|e| self.store_err(e))
    }

    fn has_chunk(&self, id: &ChunkId) -> Result<bool, VaultError> {
        self.store.contains(id).map_err(|e| self.store_err(e))
    }

    fn delete_chunk(&self, id: &ChunkId) -> Result<bool, VaultError> {
        self.store.remove(id).map_err(|e| self.store_err(e))
    }

    fn list_chunks(&self, after: Option<&ChunkId>, limit: usize) -> Result<Vec<ChunkEntry>, VaultError> {
        let chunks = self.store.list(after, limit).map_err(|e| self.store_err(e))?;
        Ok(chunks.into_iter().map(|c| ChunkEntry { id: c.id, len: c.len, modified: c.written_unix }).collect())
    }

    fn reclaim(&self) -> Result<u64, VaultError> {
        Ok(self.store.reclaim().map_err(|e| self.store_err(e))?.bytes_freed())
    }

    fn put_object(&self, key: &str, bytes: &[u8]) -> Result<(), VaultError> {
        let path = self.object_path(key)?;
        let dir = path.parent().unwrap_or(&self.objects).to_owned();
        let mut created = Vec::new();
        let mut missing = dir.clone();
        while !missing.exists() && missing.starts_with(&self.objects) && missing != self.objects {
            created.push(missing.clone());
            if !missing.pop() {
                break;
            }
        }
        fs::create_dir_all(&dir).map_err(|e| self.io_err(format!("create {}", dir.display()), e))?;
        // New directories' names must be durable in their parents.
        for made in created.iter().rev() {
            if let Some(parent) = made.parent() {
                fsync_dir(parent)
                    .map_err(|source| VaultError::Store { vault: self.name.clone(), source: Box::new(source) })?;
            }
        }
        let mut temp_name = path.file_name().unwrap_or_default().to_owned();
        temp_name.push(format!(".{:016x}{TEMP_SUFFIX}", rand::random::<u64>()));
        let temp = dir.join(temp_name);
        let result = (|| {
            let mut file: File = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&temp)
                .map_err(|e| self.io_err(format!("create {}", temp.display()), e))?;
            file.write_all(bytes).map_err(|e| self.io_err(format!("write {}", temp.display()), e))?;
            fsync_file(&file, &temp)
                .map_err(|source| VaultError::Store { vault: self.name.clone(), source: Box::new(source) })?;
            fs::rename(&temp, &path).map_err(|e| self.io_err(format!("rename into {}", path.display()), e))?;
            fsync_dir(&dir).map_err(|source| VaultError::Store { vault: self.name.clone(), source: Box::new(source) })
        })();
        if result.is_err() {
            let _ = fs::remove_file(&temp);
        }
        result
    }

    fn get_object(&self, key: &str) -> Result<Vec<u8>, VaultError> {
        let path = self.object_path(key)?;
        match fs::read(&path) {
            Ok(bytes) => Ok(bytes),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Err(VaultError::NotFound { vault: self.name.clone(), what: format!("object {key}") })
            }
            Err(e) => Err(self.io_err(format!("read {}", path.display()), e)),
        }
    }

    fn delete_object(&self, key: &str) -> Result<bool, VaultError> {
        let path = self.object_path(key)?;
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(self.io_err(format!("remove {}", path.display()), e)),
        }
        let dir = path.parent().unwrap_or(&self.objects).to_owned();
        fsync_dir(&dir).map_err(|source| VaultError::Store { vault: self.name.clone(), source: Box::new(source) })?;
        Ok(true)
    }

    fn list_objects(&self, prefix: &str) -> Result<Vec<ObjectEntry>, VaultError> {
        let mut out = Vec::new();
        let mut stack = vec![self.objects.clone()];
        while let Some(dir) = stack.pop() {
            let entries = match fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(self.io_err(format!("list {}", dir.display()), e)),
            };
            for entry in entries {
                let entry = entry.map_err(|e| self.io_err(format!("list {}", dir.display()), e))?;
                let path = entry.path();
                let Ok(rel) = path.strip_prefix(&self.objects) else { continue };
                let Some(key) = rel.to_str() else { continue };
                if key.ends_with(TEMP_SUFFIX) || keys::check(key).is_err() {
                    continue;
                }
                let meta = match entry.metadata() {
                    Ok(meta) => meta,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(self.io_err(format!("stat {}", path.display()), e)),
                };
                if meta.is_dir() {
                    // Only descend where the prefix can still match.
                    let as_dir = format!("{key}/");
                    if as_dir.starts_with(prefix) || prefix.starts_with(&as_dir) {
                        stack.push(path);
                    }
                } else if key.starts_with(prefix) {
                    out.push(ObjectEntry { key: key.to_owned(), len: meta.len(), modified: modified_secs(&meta) });
                }
            }
        }
        out.sort_unstable_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{encode_chunk, TenantKey};

    #[test]
    fn chunks_and_objects_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let vault = LocalVault::open("local", dir.path(), "acme").unwrap();
        let key = TenantKey::from_bytes([1; 32]);
        let mut ids = Vec::new();
        for i in 0..40u32 {
            let (id, frame) = encode_chunk(&key, &i.to_le_bytes().repeat(100), 3).unwrap();
            assert_eq!(vault.put_chunk(&id, &frame).unwrap(), Put::Written);
            assert_eq!(vault.put_chunk(&id, &frame).unwrap(), Put::AlreadyPresent);
            ids.push(id);
        }
        ids.sort();
        // Paged listing in id order, resumable after any id.
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let page = vault.list_chunks(after.as_ref(), 7).unwrap();
            if page.is_empty() {
                break;
            }
            after = Some(page.last().unwrap().id);
            seen.extend(page.iter().map(|e| e.id));
        }
        assert_eq!(seen, ids);
        assert!(vault.has_chunks(&ids[..3]).unwrap().iter().all(|&b| b));
        assert!(vault.delete_chunk(&ids[0]).unwrap());
        assert!(vault.get_chunk(&ids[0]).unwrap_err().is_not_found());

        vault.put_object("snapshots/db/s1.kman", b"one").unwrap();
        vault.put_object("snapshots/db/s2.kman", b"two").unwrap();
        vault.put_object("snapshots/fs/s1.kman", b"three").unwrap();
        vault.put_object("uploads/u1", b"u").unwrap();
        vault.put_object("snapshots/db/s1.kman", b"uno").unwrap();
        assert_eq!(vault.get_object("snapshots/db/s1.kman").unwrap(), b"uno");
        let keys: Vec<_> = vault.list_objects("snapshots/db/").unwrap().into_iter().map(|e| e.key).collect();
        assert_eq!(keys, ["snapshots/db/s1.kman", "snapshots/db/s2.kman"]);
        assert_eq!(vault.list_objects("").unwrap().len(), 4);
        assert!(vault.delete_object("uploads/u1").unwrap());
        assert!(!vault.delete_object("uploads/u1").unwrap());
        assert!(vault.get_object("uploads/u1").unwrap_err().is_not_found());
        assert!(matches!(vault.put_object("../escape", b"x"), Err(VaultError::BadKey { .. })));
    }

    #[test]
    fn tenants_are_separate() {
        let dir = tempfile::tempdir().unwrap();
        let a = LocalVault::open("v", dir.path(), "a").unwrap();
        let b = LocalVault::open("v", dir.path(), "b").unwrap();
        let key = TenantKey::from_bytes([1; 32]);
        let (id, frame) = encode_chunk(&key, b"data", 3).unwrap();
        a.put_chunk(&id, &frame).unwrap();
        a.put_object("uploads/x", b"x").unwrap();
        assert!(!b.has_chunk(&id).unwrap());
        assert!(b.list_objects("").unwrap().is_empty());
        assert!(LocalVault::open("v", dir.path(), "../a").is_err());
    }
}
