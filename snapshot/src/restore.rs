//! Getting data back: restore a snapshot into a file, block device or volume (chunks
//! fetched in parallel, written in place), or export it as an ordered image stream (raw
//! or zstd-compressed raw) — the customer's download.
//!
//! Every chunk is authenticated and re-hashed as it is decoded ([`crate::decode_chunk`]),
//! so what is written is bit-exact or the restore fails naming the chunk. A chunk that is
//! missing or corrupt in the first vault is fetched from the next one that holds it
//! (and reported, so `verify` can heal the bad copy).

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};

use crate::chunk::decode_chunk;
use crate::create::Progress;
use crate::error::ChunkError;
use crate::key::{ChunkId, TenantKey};
use crate::manifest::{ChunkRef, Manifest};
use crate::vault::{Vault, VaultError};

/// Where a restore writes.
pub trait Target: Sync {
    /// Writes `data` at `offset`.
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), String>;
    /// Makes `[offset, offset+len)` read as zeros. Not called when the target was created
    /// empty ([`RestoreOptions::target_is_zeroed`]).
    fn zero(&self, offset: u64, len: u64) -> Result<(), String>;
    /// Makes everything written durable.
    fn sync(&self) -> Result<(), String>;
}

/// How to restore.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// Parallel chunk fetches (≥ 1).
    pub threads: usize,
    /// The target already reads as zeros everywhere (a new sparse file or volume): holes
    /// are skipped instead of written, so the result stays sparse.
    pub target_is_zeroed: bool,
}

/// What a restore did.
#[derive(Debug, Clone, Default)]
pub struct RestoreReport {
    /// Chunks written.
    pub chunks_written: u64,
    /// Holes (zeroed or skipped).
    pub holes: u64,
    /// Bytes of plaintext written.
    pub bytes_written: u64,
    /// Chunks that had to come from a vault other than the first, with the first
    /// vault's error: copies to heal.
    pub fallbacks: Vec<(ChunkId, String)>,
}

/// Why a restore failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RestoreError {
    /// No vault holds a good copy of a chunk.
    #[error("chunk {index} ({id}) of snapshot {snapshot}: no good copy in any vault: {errors}")]
    Chunk {
        /// The snapshot.
        snapshot: String,
        /// Index in the manifest.
        index: u64,
        /// The chunk.
        id: ChunkId,
        /// Each vault's error, joined.
        errors: String,
    },
    /// The target failed.
    #[error("restore of snapshot {snapshot}: write at {offset}: {reason}")]
    Write {
        /// The snapshot.
        snapshot: String,
        /// The offset written.
        offset: u64,
        /// The target's error.
        reason: String,
    },
    /// Writing the export stream failed.
    #[error("export of snapshot {snapshot}: {source}")]
    Stream {
        /// The snapshot.
        snapshot: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// [`fetch_chunk`] for entry `index` of `snapshot`, whose plaintext must be `len` bytes:
/// the chunk and the errors of the vaults tried before the one that had it.
fn fetch_checked(
    key: &TenantKey,
    vaults: &[&dyn Vault],
    id: &ChunkId,
    snapshot: &str,
    index: usize,
    len: u64,
) -> Result<(Vec<u8>, Option<String>), RestoreError> {
    let error =
        |errors: String| RestoreError::Chunk { snapshot: snapshot.to_owned(), index: index as u64, id: *id, errors };
    match fetch_chunk(key, vaults, id) {
        Ok((plain, fallback)) if plain.len() as u64 == len => Ok((plain, fallback)),
        Ok((plain, _)) => Err(error(format!("decodes to {} bytes, the manifest expects {len}", plain.len()))),
        Err(errors) => Err(error(errors.join("; "))),
    }
}

/// Fetches and decodes chunk `id`, trying each vault in turn. Returns the plaintext and,
/// when a later vault had to answer, the errors of the ones before.
pub fn fetch_chunk(
    key: &TenantKey,
    vaults: &[&dyn Vault],
    id: &ChunkId,
) -> Result<(Vec<u8>, Option<String>), Vec<String>> {
    let mut errors = Vec::new();
    for vault in vaults {
        let result = vault.get_chunk(id).map_err(|e: VaultError| e.to_string()).and_then(|frame| {
            decode_chunk(key, id, &frame).map_err(|e: ChunkError| format!("vault {}: {e}", vault.name()))
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

/// Restores `manifest` into `target` (random-access), fetching chunks in parallel.
pub fn restore(
    key: &TenantKey,
    vaults: &[&dyn Vault],
    manifest: &Manifest,
    target: &dyn Target,
    options: &RestoreOptions,
    progress: &(dyn Fn(Progress) + Sync),
) -> Result<RestoreReport, RestoreError> {
    let snapshot = manifest.snapshot_id().to_owned();
    let count = manifest.chunk_count();
    let next = AtomicUsize::new(0);
    let done = AtomicU64::new(0);
    let cancel = AtomicBool::new(false);
    let report = Mutex::new(RestoreReport::default());
    let first_error: Mutex<Option<RestoreError>> = Mutex::new(None);
    let total = manifest.volume_size();
    std::thread::scope(|scope| {
        for _ in 0..options.threads.max(1) {
            scope.spawn(|| {
                while !cancel.load(Ordering::Acquire) {
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    if index >= count {
                        return;
                    }
                    let (offset, len) = manifest.chunk_range(index);
                    let result = match manifest.chunk(index) {
                        Some(ChunkRef::Data(id)) => {
                            fetch_checked(key, vaults, &id, &snapshot, index, len).and_then(|(plain, fallback)| {
                                target
                                    .write_at(offset, &plain)
                                    .map(|()| {
                                        let mut r = report.lock().unwrap_or_else(|p| p.into_inner());
                                        r.chunks_written += 1;
                                        r.bytes_written += len;
                                        if let Some(errors) = fallback {
                                            r.fallbacks.push((id, errors));
                                        }
                                    })
                                    .map_err(|reason| RestoreError::Write {
                                        snapshot: snapshot.clone(),
                                        offset,
                                        reason,
                                    })
                            })
                        }
                        _ => {
                            report.lock().unwrap_or_else(|p| p.into_inner()).holes += 1;
                            if options.target_is_zeroed {
                                Ok(())
                            } else {
                                target.zero(offset, len).map_err(|reason| RestoreError::Write {
                                    snapshot: snapshot.clone(),
                                    offset,
                                    reason,
                                })
                            }
                        }
                    };
                    if let Err(e) = result {
                        cancel.store(true, Ordering::Release);
                        first_error.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
                        return;
                    }
                    let d = done.fetch_add(len, Ordering::Relaxed) + len;
                    progress(Progress { done: d, total });
                }
            });
        }
    });
    if let Some(e) = first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    target.sync().map_err(|reason| RestoreError::Write { snapshot: snapshot.clone(), offset: 0, reason })?;
    Ok(report.into_inner().unwrap_or_else(|p| p.into_inner()))
}

/// The export stream's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    /// The raw image, byte for byte.
    Raw,
    /// The raw image compressed as one zstd stream (`.raw.zst`).
    RawZst {
        /// zstd level.
        level: i32,
    },
}

/// Writes `manifest`'s image to `out` in order, fetching up to `threads` chunks ahead.
/// Holes are written as zeros (a stream cannot skip); zstd squeezes them to nothing.
pub fn export(
    key: &TenantKey,
    vaults: &[&dyn Vault],
    manifest: &Manifest,
    out: &mut dyn Write,
    format: ExportFormat,
    threads: usize,
    progress: &(dyn Fn(Progress) + Sync),
) -> Result<RestoreReport, RestoreError> {
    let snapshot = manifest.snapshot_id().to_owned();
    let stream = |source| RestoreError::Stream { snapshot: snapshot.clone(), source };
    match format {
        ExportFormat::Raw => export_ordered(key, vaults, manifest, out, threads, progress),
        ExportFormat::RawZst { level } => {
            let mut encoder = zstd::stream::write::Encoder::new(out, level).map_err(stream)?;
            // Multithreaded compression when available would compete with the fetchers.
            let report = export_ordered(key, vaults, manifest, &mut encoder, threads, progress)?;
            encoder.finish().map_err(stream)?.flush().map_err(stream)?;
            Ok(report)
        }
    }
}

/// A window of decoded chunks waiting for their turn to be written.
struct Window {
    slots: std::collections::BTreeMap<usize, Result<Option<Vec<u8>>, RestoreError>>,
}

fn export_ordered(
    key: &TenantKey,
    vaults: &[&dyn Vault],
    manifest: &Manifest,
    out: &mut dyn Write,
    threads: usize,
    progress: &(dyn Fn(Progress) + Sync),
) -> Result<RestoreReport, RestoreError> {
    let snapshot = manifest.snapshot_id().to_owned();
    let count = manifest.chunk_count();
    let threads = threads.max(1);
    let ahead = threads * 4;
    let next = AtomicUsize::new(0);
    let written = AtomicUsize::new(0);
    let cancel = AtomicBool::new(false);
    let window = Mutex::new(Window { slots: Default::default() });
    let ready = Condvar::new();
    let room = Condvar::new();
    let mut report = RestoreReport::default();
    let fallbacks = Mutex::new(Vec::new());
    let result = std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= count || cancel.load(Ordering::Acquire) {
                    return;
                }
                // Stay at most `ahead` chunks in front of the writer (bounded memory).
                {
                    let mut w = window.lock().unwrap_or_else(|p| p.into_inner());
                    while index >= written.load(Ordering::Acquire) + ahead && !cancel.load(Ordering::Acquire) {
                        w = room.wait(w).unwrap_or_else(|p| p.into_inner());
                    }
                }
                let (_, len) = manifest.chunk_range(index);
                let item = match manifest.chunk(index) {
                    Some(ChunkRef::Data(id)) => {
                        fetch_checked(key, vaults, &id, &snapshot, index, len).map(|(plain, fallback)| {
                            if let Some(e) = fallback {
                                fallbacks.lock().unwrap_or_else(|p| p.into_inner()).push((id, e));
                            }
                            Some(plain)
                        })
                    }
                    _ => Ok(None),
                };
                window.lock().unwrap_or_else(|p| p.into_inner()).slots.insert(index, item);
                ready.notify_all();
            });
        }
        // The writer (this thread): emits chunks in order.
        let zeros = vec![0u8; manifest.chunk_size() as usize];
        let total = manifest.volume_size();
        let mut done = 0u64;
        for index in 0..count {
            let item = {
                let mut w = window.lock().unwrap_or_else(|p| p.into_inner());
                loop {
                    if let Some(item) = w.slots.remove(&index) {
                        break item;
                    }
                    w = ready.wait(w).unwrap_or_else(|p| p.into_inner());
                }
            };
            let (_, len) = manifest.chunk_range(index);
            let outcome = match item {
                Ok(Some(plain)) => {
                    report.chunks_written += 1;
                    report.bytes_written += len;
                    out.write_all(&plain)
                }
                Ok(None) => {
                    report.holes += 1;
                    out.write_all(&zeros[..len as usize])
                }
                Err(e) => {
                    cancel.store(true, Ordering::Release);
                    room.notify_all();
                    return Err(e);
                }
            };
            if let Err(source) = outcome {
                cancel.store(true, Ordering::Release);
                room.notify_all();
                return Err(RestoreError::Stream { snapshot: snapshot.clone(), source });
            }
            written.store(index + 1, Ordering::Release);
            // Take the lock so a fetcher between its check and its wait cannot miss this.
            drop(window.lock().unwrap_or_else(|p| p.into_inner()));
            room.notify_all();
            done += len;
            progress(Progress { done, total });
        }
        Ok(())
    });
    result?;
    out.flush().map_err(|source| RestoreError::Stream { snapshot: snapshot.clone(), source })?;
    report.fallbacks = fallbacks.into_inner().unwrap_or_else(|p| p.into_inner());
    Ok(report)
}

/// A [`Target`] over a file or block device written with positional writes.
#[derive(Debug)]
pub struct FileTarget {
    file: std::fs::File,
    path: std::path::PathBuf,
}

impl FileTarget {
    /// Creates (or truncates) a regular file of `size` bytes that reads as zeros (sparse);
    /// restore with `target_is_zeroed`.
    pub fn create_sparse(path: &std::path::Path, size: u64) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).open(path)?;
        file.set_len(size)?;
        Ok(FileTarget { file, path: path.to_owned() })
    }

    /// Opens an existing file or block device for writing, which must hold at least `size`
    /// bytes; holes are written as zeros (punched where the target supports it).
    pub fn open_existing(path: &std::path::Path, size: u64) -> std::io::Result<Self> {
        use std::io::{Seek, SeekFrom};
        let mut file = std::fs::OpenOptions::new().write(true).open(path)?;
        let have = file.seek(SeekFrom::End(0))?;
        if have < size {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{} holds {have} bytes, the snapshot needs {size}", path.display()),
            ));
        }
        Ok(FileTarget { file, path: path.to_owned() })
    }
}

impl Target for FileTarget {
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), String> {
        use std::os::unix::fs::FileExt;
        self.file.write_all_at(data, offset).map_err(|e| format!("{}: {e}", self.path.display()))
    }

    fn zero(&self, offset: u64, len: u64) -> Result<(), String> {
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(zeros.len() as u64) as usize;
            self.write_at(at, &zeros[..n])?;
            at += n as u64;
        }
        Ok(())
    }

    fn sync(&self) -> Result<(), String> {
        self.file.sync_all().map_err(|e| format!("fsync {}: {e}", self.path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::create::{create_snapshot, Changed, CreateOptions, FileSource};
    use crate::vault::LocalVault;

    fn image(dir: &std::path::Path) -> (std::path::PathBuf, Vec<u8>) {
        let mut data = vec![0u8; 300 * 1024 + 17];
        for (i, b) in data.iter_mut().enumerate().skip(70_000).take(90_000) {
            *b = (i * 31 % 251) as u8;
        }
        data[290 * 1024] = 1;
        let path = dir.join("image.raw");
        std::fs::write(&path, &data).unwrap();
        (path, data)
    }

    fn snapshot(vault: &LocalVault, key: &TenantKey, path: &std::path::Path) -> Manifest {
        let options = CreateOptions {
            volume: "img".into(),
            marker: "m".into(),
            marker_seq: 0,
            node: "n".into(),
            chunk_size: 16 * 1024,
            zstd_level: 1,
            threads: 2,
            snapshot_id: None,
            created_unix: None,
            group: None,
        };
        let source = FileSource::open(path).unwrap();
        let report =
            create_snapshot(key, vault, &source, &options, None, Changed::All("test".into()), &|_| {}).unwrap();
        Manifest::load(&vault.get_object(&report.manifest_key).unwrap(), key).unwrap()
    }

    #[test]
    fn restore_and_export_are_bit_exact() {
        let dir = tempfile::tempdir().unwrap();
        let (path, data) = image(dir.path());
        let vault = LocalVault::open("local", dir.path().join("vault"), "t").unwrap();
        let key = TenantKey::from_bytes([4; 32]);
        let manifest = snapshot(&vault, &key, &path);
        let out = dir.path().join("restored.raw");
        let target = FileTarget::create_sparse(&out, manifest.volume_size()).unwrap();
        let options = RestoreOptions { threads: 3, target_is_zeroed: true };
        let report = restore(&key, &[&vault], &manifest, &target, &options, &|_| {}).unwrap();
        assert!(report.holes > 0 && report.fallbacks.is_empty());
        assert!(std::fs::read(&out).unwrap() == data);
        // Over an existing file full of junk: holes must be written.
        std::fs::write(&out, vec![0xEE; data.len()]).unwrap();
        let target = FileTarget::open_existing(&out, manifest.volume_size()).unwrap();
        let options = RestoreOptions { threads: 2, target_is_zeroed: false };
        restore(&key, &[&vault], &manifest, &target, &options, &|_| {}).unwrap();
        assert!(std::fs::read(&out).unwrap() == data);

        let mut raw = Vec::new();
        export(&key, &[&vault], &manifest, &mut raw, ExportFormat::Raw, 3, &|_| {}).unwrap();
        assert!(raw == data);
        let mut zst = Vec::new();
        export(&key, &[&vault], &manifest, &mut zst, ExportFormat::RawZst { level: 3 }, 2, &|_| {}).unwrap();
        assert!(zst.len() < data.len() / 2);
        assert!(zstd::stream::decode_all(&zst[..]).unwrap() == data);
    }

    #[test]
    fn a_corrupt_chunk_is_fetched_from_the_next_vault() {
        let dir = tempfile::tempdir().unwrap();
        let (path, data) = image(dir.path());
        let key = TenantKey::from_bytes([4; 32]);
        let a = LocalVault::open("a", dir.path().join("a"), "t").unwrap();
        let b = LocalVault::open("b", dir.path().join("b"), "t").unwrap();
        let manifest = snapshot(&a, &key, &path);
        snapshot(&b, &key, &path); // same chunks in b
        let victim = manifest.chunks().find_map(|c| if let ChunkRef::Data(id) = c { Some(id) } else { None }).unwrap();
        // Damage one byte of its frame in a's pack.
        let at = a.store().locate(&victim).unwrap().unwrap();
        let pack = std::fs::OpenOptions::new().read(true).write(true).open(&at.pack).unwrap();
        let mut byte = [0u8];
        std::os::unix::fs::FileExt::read_exact_at(&pack, &mut byte, at.offset + 60).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&pack, &[byte[0] ^ 0xff], at.offset + 60).unwrap();

        let mut raw = Vec::new();
        let err = export(&key, &[&a], &manifest, &mut raw, ExportFormat::Raw, 2, &|_| {}).unwrap_err();
        assert!(err.to_string().contains(&victim.to_string()), "{err}");
        let mut raw = Vec::new();
        let report = export(&key, &[&a, &b], &manifest, &mut raw, ExportFormat::Raw, 2, &|_| {}).unwrap();
        assert!(raw == data);
        assert_eq!(report.fallbacks.len(), 1);
        assert_eq!(report.fallbacks[0].0, victim);
        assert!(report.fallbacks[0].1.contains("checksum"), "{}", report.fallbacks[0].1);
    }
}
