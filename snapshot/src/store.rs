//! A chunk store in a local directory: one file per chunk at `chunks/ab/cd/<hex id>`.
//!
//! Writes are atomic (temp file, fsync, hard link to the final name, unlink the temp,
//! fsync directory) and idempotent: a chunk
//! already present is not written again, which is where deduplication happens. The store
//! checks each frame's length, magic, version and CRC before writing it, but holds no keys:
//! decryption and the id check happen in [`crate::decode_chunk`].

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

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
    /// `Some` in deferred mode: chunks written to temp files, not yet synced and linked.
    pending: Option<Mutex<HashMap<ChunkId, (PathBuf, PathBuf)>>>,
}

impl LocalChunkStore {
    /// Opens (creating if needed) a chunk store rooted at `dir`. Every `put` is durable
    /// when it returns (two fsyncs per new chunk).
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_with(dir.as_ref(), false)
    }

    /// Opens a store whose `put`s are made durable in batches by [`LocalChunkStore::sync`]:
    /// a new chunk is written to a temp file without an fsync, and `sync` makes every such
    /// file durable with one `syncfs`, then links them to their names and syncs again. A
    /// chunk's name therefore still only ever points at durable bytes. Until `sync`, a new
    /// chunk counts as present for [`LocalChunkStore::contains`] and `put` (so concurrent
    /// writers of one chunk store it once) but `get` does not find it.
    ///
    /// One `syncfs` per batch instead of two fsyncs per chunk: the snapshot benchmark spent
    /// 1.7 ms per 64 KiB chunk in fsyncs (docs/benchmarks.md).
    pub fn open_deferred(dir: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_with(dir.as_ref(), true)
    }

    fn open_with(root: &Path, deferred: bool) -> Result<Self, StoreError> {
        let root = root.to_owned();
        let chunks = root.join(CHUNKS_DIR);
        let created = create_dir(&chunks)?;
        if created {
            fsync_dir(&root)?;
        }
        let pending = deferred.then(|| Mutex::new(HashMap::new()));
        Ok(LocalChunkStore { root, chunks, poisoned: AtomicBool::new(false), pending })
    }

    /// Makes every chunk put so far durable and visible (deferred mode; otherwise a no-op).
    /// On failure the store is poisoned (fail-stop: an fsync is never retried).
    pub fn sync(&self) -> Result<(), StoreError> {
        let Some(pending) = &self.pending else { return Ok(()) };
        self.check_not_poisoned()?;
        // Take the batch first: puts that land while syncfs runs wait for the next batch.
        let batch = std::mem::take(&mut *pending.lock().unwrap_or_else(|p| p.into_inner()));
        if batch.is_empty() {
            return Ok(());
        }
        self.poison_on_error(|| {
            syncfs(&self.root)?;
            for (temp, path) in batch.values() {
                match fs::hard_link(temp, path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(source) => {
                        return Err(StoreError::Io { op: "link chunk into place", path: path.clone(), source })
                    }
                }
                fs::remove_file(temp).map_err(|source| StoreError::Io {
                    op: "remove chunk temp file",
                    path: temp.clone(),
                    source,
                })?;
            }
            // The names (and the removals) are durable after a second pass.
            syncfs(&self.root)
        })
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

    /// True when the store holds chunk `id` (or, in deferred mode, will after `sync`).
    pub fn contains(&self, id: &ChunkId) -> Result<bool, StoreError> {
        if let Some(pending) = &self.pending {
            if pending.lock().unwrap_or_else(|p| p.into_inner()).contains_key(id) {
                return Ok(true);
            }
        }
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
        match &self.pending {
            None => self.poison_on_error(|| self.write_new(&path, bytes)),
            Some(pending) => self.poison_on_error(|| self.write_deferred(pending, id, &path, bytes)),
        }
    }

    /// Deferred mode: the frame goes to a temp file, unsynced; `sync` publishes it.
    fn write_deferred(
        &self,
        pending: &Mutex<HashMap<ChunkId, (PathBuf, PathBuf)>>,
        id: &ChunkId,
        path: &Path,
        bytes: &[u8],
    ) -> Result<PutOutcome, StoreError> {
        let dir = path.parent().unwrap_or(&self.chunks);
        let fanout = dir.parent().unwrap_or(&self.chunks);
        // New directories become durable with the batch's syncfs.
        create_dir(fanout)?;
        create_dir(dir)?;
        let temp = self.temp_path(path);
        let result = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp)
            .and_then(|mut file| file.write_all(bytes))
            .map_err(|source| StoreError::Io { op: "write chunk temp file", path: temp.clone(), source });
        if let Err(e) = result {
            let _ = fs::remove_file(&temp);
            return Err(e);
        }
        let mut map = pending.lock().unwrap_or_else(|p| p.into_inner());
        if map.contains_key(id) {
            // Another writer got there first.
            drop(map);
            let _ = fs::remove_file(&temp);
            return Ok(PutOutcome::AlreadyPresent);
        }
        map.insert(*id, (temp, path.to_owned()));
        Ok(PutOutcome::Written)
    }

    /// A unique temp name beside `path`, never read as a chunk.
    fn temp_path(&self, path: &Path) -> PathBuf {
        let mut temp_name = path.file_name().unwrap_or_default().to_owned();
        temp_name.push(format!(".{:016x}{TEMP_SUFFIX}", rand::random::<u64>()));
        path.with_file_name(temp_name)
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
        let temp = self.temp_path(path);
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

/// `syncfs(2)` on the filesystem holding `root`: every dirty page and inode on it is
/// written back and waited for (the batch commit of deferred puts).
fn syncfs(root: &Path) -> Result<(), StoreError> {
    use std::os::fd::AsRawFd;
    let dir =
        File::open(root).map_err(|source| StoreError::Io { op: "open store root", path: root.to_owned(), source })?;
    // SAFETY: syncfs only reads the descriptor, which `dir` keeps open for the call.
    let rc = unsafe { libc::syncfs(dir.as_raw_fd()) };
    if rc != 0 {
        return Err(StoreError::Io { op: "syncfs", path: root.to_owned(), source: io::Error::last_os_error() });
    }
    Ok(())
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
    fn deferred_puts_become_visible_and_durable_at_sync() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalChunkStore::open_deferred(dir.path()).unwrap();
        let (key, id, frame) = chunk(&[5u8; 9000]);
        assert_eq!(store.put(&id, &frame).unwrap(), PutOutcome::Written);
        // Counted as present (so it is written once), but not readable before the sync.
        assert!(store.contains(&id).unwrap());
        assert_eq!(store.put(&id, &frame).unwrap(), PutOutcome::AlreadyPresent);
        assert!(matches!(store.get(&id), Err(StoreError::NotFound { .. })));
        assert!(!store.chunk_path(&id).exists());
        store.sync().unwrap();
        assert_eq!(crate::decode_chunk(&key, &id, &store.get(&id).unwrap()).unwrap(), vec![5u8; 9000]);
        // No temp files remain; a second sync has nothing to do.
        let parent = store.chunk_path(&id).parent().unwrap().to_owned();
        assert_eq!(fs::read_dir(&parent).unwrap().count(), 1);
        store.sync().unwrap();
        // A chunk already stored is not written again.
        assert_eq!(store.put(&id, &frame).unwrap(), PutOutcome::AlreadyPresent);
    }

    #[test]
    fn concurrent_deferred_puts_of_one_chunk_write_it_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalChunkStore::open_deferred(dir.path()).unwrap();
        let (_, id, frame) = chunk(&[6u8; 5000]);
        let written = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    if store.put(&id, &frame).unwrap() == PutOutcome::Written {
                        written.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
        });
        assert_eq!(written.into_inner(), 1);
        store.sync().unwrap();
        assert_eq!(store.get(&id).unwrap(), frame);
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
