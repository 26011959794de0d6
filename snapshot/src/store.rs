//! A chunk store in a local directory: one file per chunk at `chunks/ab/cd/<hex id>`.
//!
//! Writes are atomic (temp file, fsync, hard link to the final name, unlink the temp,
//! fsync directory) and idempotent: a chunk
//! already present is not written again, which is where deduplication happens. The store
//! checks each frame's length, magic, version and CRC before writing it, but holds no keys:
//! decryption and the id check happen in [`crate::decode_chunk`].

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::chunk::check_frame;
use crate::durable::{fsync_dir, fsync_file};
use crate::error::StoreError;
use crate::key::ChunkId;

/// Name of the directory under the store root that holds the chunk fan-out.
const CHUNKS_DIR: &str = "chunks";
/// Suffix of in-progress writes; such files are never read as chunks.
const TEMP_SUFFIX: &str = ".tmp";

/// What [`LocalChunkStore::put`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// The chunk was written.
    Written,
    /// The store already held the chunk; nothing was written (deduplicated).
    AlreadyPresent,
}

/// A chunk store in a local directory.
///
/// # Invariants
///
/// - A file named `chunks/ab/cd/<id>` is complete and durable: it only appears by a hard link
///   after its contents were fsynced.
/// - After a failed write or fsync the store is poisoned and refuses further `put`s and
///   `remove`s (fail-stop; an fsync is never retried).
#[derive(Debug)]
pub struct LocalChunkStore {
    root: PathBuf,
    chunks: PathBuf,
    poisoned: AtomicBool,
}

impl LocalChunkStore {
    /// Opens (creating if needed) a chunk store rooted at `dir`.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, StoreError> {
        let root = dir.as_ref().to_owned();
        let chunks = root.join(CHUNKS_DIR);
        let created = create_dir(&chunks)?;
        if created {
            fsync_dir(&root)?;
        }
        Ok(LocalChunkStore { root, chunks, poisoned: AtomicBool::new(false) })
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where chunk `id` lives: `chunks/ab/cd/<hex id>` (first two bytes as fan-out).
    pub fn chunk_path(&self, id: &ChunkId) -> PathBuf {
        let hex = id.to_string();
        let (ab, rest) = hex.split_at(2);
        let (cd, _) = rest.split_at(2);
        self.chunks.join(ab).join(cd).join(&hex)
    }

    /// True when the store holds chunk `id`.
    pub fn contains(&self, id: &ChunkId) -> Result<bool, StoreError> {
        let path = self.chunk_path(id);
        path.try_exists().map_err(|source| StoreError::Io { op: "stat chunk", path, source })
    }

    /// Stores the encoded chunk `bytes` as `id`, atomically and durably; does nothing when
    /// the chunk is already present. `bytes` must be a well-formed frame ([`check_frame`]).
    pub fn put(&self, id: &ChunkId, bytes: &[u8]) -> Result<PutOutcome, StoreError> {
        self.check_not_poisoned()?;
        check_frame(bytes).map_err(|source| StoreError::InvalidChunk { id: *id, source })?;
        if self.contains(id)? {
            return Ok(PutOutcome::AlreadyPresent);
        }
        let path = self.chunk_path(id);
        self.poison_on_error(|| self.write_new(&path, bytes))
    }

    fn write_new(&self, path: &Path, bytes: &[u8]) -> Result<PutOutcome, StoreError> {
        let dir = path.parent().unwrap_or(&self.chunks);
        let fanout = dir.parent().unwrap_or(&self.chunks);
        // Create the two fan-out levels; a new directory's name needs its parent fsynced.
        if create_dir(fanout)? {
            fsync_dir(&self.chunks)?;
        }
        if create_dir(dir)? {
            fsync_dir(fanout)?;
        }
        // A unique temp name per writer, so concurrent puts of one chunk cannot interleave.
        let mut temp_name = path.file_name().unwrap_or_default().to_owned();
        temp_name.push(format!(".{:016x}{TEMP_SUFFIX}", rand::random::<u64>()));
        let temp = dir.join(temp_name);
        let result = (|| {
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&temp)
                .map_err(|source| StoreError::Io { op: "create chunk temp file", path: temp.clone(), source })?;
            file.write_all(bytes).map_err(|source| StoreError::Io {
                op: "write chunk temp file",
                path: temp.clone(),
                source,
            })?;
            fsync_file(&file, &temp)?;
            // A hard link publishes the name atomically and, unlike rename, never replaces:
            // of two concurrent writers of one chunk exactly one reports Written.
            let outcome = match fs::hard_link(&temp, path) {
                Ok(()) => PutOutcome::Written,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => PutOutcome::AlreadyPresent,
                Err(source) => {
                    return Err(StoreError::Io { op: "link chunk into place", path: path.to_owned(), source })
                }
            };
            fs::remove_file(&temp).map_err(|source| StoreError::Io {
                op: "remove chunk temp file",
                path: temp.clone(),
                source,
            })?;
            fsync_dir(dir)?;
            Ok(outcome)
        })();
        if result.is_err() {
            // Best effort: the temp name is never read as a chunk either way.
            let _ = fs::remove_file(&temp);
        }
        result
    }

    /// Reads the encoded chunk `id` (decode it with [`crate::decode_chunk`]).
    pub fn get(&self, id: &ChunkId) -> Result<Vec<u8>, StoreError> {
        let path = self.chunk_path(id);
        match fs::read(&path) {
            Ok(bytes) => Ok(bytes),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(StoreError::NotFound { id: *id, path }),
            Err(source) => Err(StoreError::Io { op: "read chunk", path, source }),
        }
    }

    /// Removes chunk `id`; returns false when it was not there. The removal is made durable.
    pub fn remove(&self, id: &ChunkId) -> Result<bool, StoreError> {
        self.check_not_poisoned()?;
        let path = self.chunk_path(id);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(source) => return Err(StoreError::Io { op: "remove chunk", path, source }),
        }
        let dir = path.parent().unwrap_or(&self.chunks).to_owned();
        self.poison_on_error(|| fsync_dir(&dir))?;
        Ok(true)
    }

    fn check_not_poisoned(&self) -> Result<(), StoreError> {
        if self.poisoned.load(Ordering::Acquire) {
            return Err(StoreError::Poisoned { path: self.root.clone() });
        }
        Ok(())
    }

    fn poison_on_error<T>(&self, op: impl FnOnce() -> Result<T, StoreError>) -> Result<T, StoreError> {
        let result = op();
        if result.is_err() {
            self.poisoned.store(true, Ordering::Release);
        }
        result
    }
}

/// Creates one directory level; true if this call created it.
fn create_dir(dir: &Path) -> Result<bool, StoreError> {
    match fs::create_dir(dir) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(source) => Err(StoreError::Io { op: "create directory", path: dir.to_owned(), source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{encode_chunk, TenantKey};

    fn chunk(data: &[u8]) -> (TenantKey, ChunkId, Vec<u8>) {
        let key = TenantKey::from_bytes([9; 32]);
        let (id, frame) = encode_chunk(&key, data, 3).unwrap();
        (key, id, frame)
    }

    #[test]
    fn put_get_contains_remove() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalChunkStore::open(dir.path()).unwrap();
        let (key, id, frame) = chunk(b"hello chunk");
        assert!(!store.contains(&id).unwrap());
        assert_eq!(store.put(&id, &frame).unwrap(), PutOutcome::Written);
        assert!(store.contains(&id).unwrap());
        let hex = id.to_string();
        assert_eq!(store.chunk_path(&id), dir.path().join("chunks").join(&hex[..2]).join(&hex[2..4]).join(&hex));
        let read = store.get(&id).unwrap();
        assert_eq!(read, frame);
        assert_eq!(crate::decode_chunk(&key, &id, &read).unwrap(), b"hello chunk");
        assert!(store.remove(&id).unwrap());
        assert!(!store.remove(&id).unwrap());
        assert!(matches!(store.get(&id), Err(StoreError::NotFound { id: got, .. }) if got == id));
    }

    #[test]
    fn dedup_skips_present_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalChunkStore::open(dir.path()).unwrap();
        let (_, id, frame) = chunk(&[7u8; 5000]);
        assert_eq!(store.put(&id, &frame).unwrap(), PutOutcome::Written);
        let modified = fs::metadata(store.chunk_path(&id)).unwrap().modified().unwrap();
        // Same plaintext, new nonce: a different frame, the same id — stored once.
        let (_, id2, frame2) = chunk(&[7u8; 5000]);
        assert_eq!(id2, id);
        assert_ne!(frame2, frame);
        assert_eq!(store.put(&id, &frame2).unwrap(), PutOutcome::AlreadyPresent);
        assert_eq!(store.get(&id).unwrap(), frame);
        assert_eq!(fs::metadata(store.chunk_path(&id)).unwrap().modified().unwrap(), modified);
        // Reopening sees the same chunk.
        let reopened = LocalChunkStore::open(dir.path()).unwrap();
        assert!(reopened.contains(&id).unwrap());
    }

    #[test]
    fn put_is_atomic_and_leaves_no_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalChunkStore::open(dir.path()).unwrap();
        let (_, id, frame) = chunk(&vec![3u8; 100_000]);
        store.put(&id, &frame).unwrap();
        let parent = store.chunk_path(&id).parent().unwrap().to_owned();
        let names: Vec<_> = fs::read_dir(&parent).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from(id.to_string())]);
        // A leftover temp file (a crash mid-put) is not a chunk and does not block the put.
        let (_, id2, frame2) = chunk(b"other");
        let path2 = store.chunk_path(&id2);
        fs::create_dir_all(path2.parent().unwrap()).unwrap();
        fs::write(format!("{}.dead{TEMP_SUFFIX}", path2.display()), &frame2[..10]).unwrap();
        assert!(!store.contains(&id2).unwrap());
        assert_eq!(store.put(&id2, &frame2).unwrap(), PutOutcome::Written);
        assert_eq!(store.get(&id2).unwrap(), frame2);
    }

    #[test]
    fn put_refuses_malformed_frames() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalChunkStore::open(dir.path()).unwrap();
        let (_, id, mut frame) = chunk(b"payload");
        frame[HEADER_BYTE] ^= 1;
        assert!(matches!(
            store.put(&id, &frame),
            Err(StoreError::InvalidChunk { source: crate::ChunkError::ChecksumMismatch { .. }, .. })
        ));
        assert!(!store.contains(&id).unwrap());
    }
    const HEADER_BYTE: usize = 20;

    #[test]
    fn errors_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        fs::write(&file, b"x").unwrap();
        let err = LocalChunkStore::open(&file).unwrap_err();
        assert!(err.to_string().contains("not-a-dir"), "{err}");
    }
}
