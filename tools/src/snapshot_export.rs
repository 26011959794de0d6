//! Serving one snapshot read-only over NBD (`keel snapshot serve`): the adapter from a
//! [`Manifest`] and its vaults to [`keel_net::Export`], so `nbdcopy`, `qemu-img`,
//! `nbdfuse` or the kernel client can read a snapshot in place, without restoring it.
//!
//! A read maps its byte range onto chunks: a hole (all zeros, nothing stored) is filled
//! with zeros, a data chunk is fetched with [`fetch_chunk`] (and, for a version 3
//! manifest, the index chunk naming it, kept in the same cache) — the first vault that holds a
//! good copy answers, so a copy that is missing or corrupt in the repo is read from the
//! next vault (and logged, so `keel snapshot verify` can heal it). Every chunk is
//! authenticated and re-hashed as it is decoded, so what a client reads is bit-exact or
//! an `EIO` that names the chunk.
//!
//! Decoded chunks are kept in a least-recently-used cache bounded in bytes
//! ([`CACHE_BYTES_DEFAULT`]): NBD clients read in pieces smaller than a chunk (nbdcopy
//! 256 KiB, qemu 64 KiB, the kernel 128 KiB against chunks of up to 16 MiB), so without it
//! every piece would fetch and decrypt its whole chunk again. Concurrent reads of a chunk
//! that is not cached wait for a single fetch instead of each fetching it.
//!
//! Write-type commands are refused with `EPERM` (the export is read-only, so the server
//! refuses them before they reach us); `block_status` reports the manifest's holes, so
//! `nbdinfo --map` and `qemu-img map` see the snapshot's sparseness.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use anyhow::{Context, Result};
use keel_net::{CancellationToken, Export, ExportError, ExportErrorKind, NbdServer};
use keel_snapshot::create::utc_display;
use keel_snapshot::manifest::piece::{piece_entry, PIECE_HEADER_LEN};
use keel_snapshot::manifest::{ChunkRef, Layout, Manifest, HOLE};
use keel_snapshot::vault::fetch_chunk;
use keel_snapshot::vault::Vault;
use keel_snapshot::{ChunkId, TenantKey};

/// Decoded chunk bytes the cache holds by default: 1 024 chunks of 64 KiB, or 4 of the
/// largest (16 MiB).
pub const CACHE_BYTES_DEFAULT: u64 = 64 << 20;

/// Most runs one `block_status` answer carries; the trait lets an answer cover less than
/// asked, and the client asks again from where it ends.
const EXTENTS_MAX: usize = 8192;

/// Threads blocked in export calls at once. Each runs at most one chunk fetch; more would
/// only queue at the vault.
const BLOCKING_THREADS_MAX: usize = 64;

/// One snapshot as a read-only NBD export.
///
/// # Invariants
///
/// - The cache holds at most `cache_bytes_max` bytes of decoded chunks; a chunk larger
///   than that is served but not kept. Beyond it, memory is bounded by the reads in
///   flight (each holds at most one decoded chunk), which the NBD server bounds.
/// - Every byte served comes from a chunk that decoded (authenticated, re-hashed) to the
///   id the manifest names and to the length of its range, or from a hole.
pub struct SnapshotExport {
    name: String,
    description: String,
    key: TenantKey,
    vaults: Vec<Arc<dyn Vault>>,
    manifest: Manifest,
    cache: ChunkCache,
}

impl std::fmt::Debug for SnapshotExport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotExport")
            .field("name", &self.name)
            .field("manifest", &self.manifest)
            .field("vaults", &self.vaults.iter().map(|v| v.name()).collect::<Vec<_>>())
            .finish()
    }
}

impl SnapshotExport {
    /// Serves `manifest` (authenticated by the caller under `key`) as export `name`,
    /// fetching chunks from `vaults` in order, with a cache of [`CACHE_BYTES_DEFAULT`].
    pub fn new(name: String, key: TenantKey, vaults: Vec<Arc<dyn Vault>>, manifest: Manifest) -> Self {
        let description = format!(
            "Keel snapshot {} of volume {} (marker {:?}, taken {} UTC), read-only",
            manifest.snapshot_id(),
            manifest.volume(),
            manifest.marker(),
            utc_display(manifest.created_unix())
        );
        SnapshotExport { name, description, key, vaults, manifest, cache: ChunkCache::new(CACHE_BYTES_DEFAULT) }
    }

    /// The same export with a cache of `bytes` decoded bytes (0 disables it).
    pub fn with_cache_bytes(mut self, bytes: u64) -> Self {
        self.cache = ChunkCache::new(bytes);
        self
    }

    /// The manifest served.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Decoded bytes and chunks in the cache now.
    pub fn cached(&self) -> (u64, usize) {
        let state = self.cache.lock();
        (state.bytes, state.lru.len())
    }

    fn chunk_index(&self, position: u64) -> Result<usize, ExportError> {
        let index = position / u64::from(self.manifest.chunk_size());
        usize::try_from(index).map_err(|_| self.invalid(format!("offset {position} is past any chunk")))
    }

    fn invalid(&self, what: String) -> ExportError {
        ExportError::new(ExportErrorKind::InvalidArgument, format!("snapshot {}: {what}", self.name))
    }

    /// The decoded bytes of chunk `index` (`id`, `len` bytes long), from the cache or the
    /// vaults.
    fn chunk(&self, index: usize, id: &ChunkId, len: u64) -> Result<Arc<Vec<u8>>, ExportError> {
        let data = self.cache.get_or_fetch(id, || self.fetch(index, id, len))?;
        // Equal ids mean equal plaintexts, so a cached chunk has the length of every range
        // that names it; checked anyway, as the read slices by it.
        if data.len() as u64 != len {
            return Err(self.chunk_error(index, id, format!("is {} bytes, its range {len}", data.len())));
        }
        Ok(data)
    }

    fn fetch(&self, index: usize, id: &ChunkId, len: u64) -> Result<Vec<u8>, ExportError> {
        let plain =
            self.fetch_from_vaults(&format!("chunk {index}"), id).map_err(|e| self.chunk_error(index, id, e))?;
        if plain.len() as u64 != len {
            return Err(self.chunk_error(
                index,
                id,
                format!("decodes to {} bytes, the manifest expects {len}", plain.len()),
            ));
        }
        Ok(plain)
    }

    /// Chunk `id` (`what`: "chunk 5", "index chunk 0") from the first vault with a good
    /// copy; a copy that had to come from a later vault is logged (handled here, so logged
    /// here).
    fn fetch_from_vaults(&self, what: &str, id: &ChunkId) -> Result<Vec<u8>, String> {
        let vaults: Vec<&dyn Vault> = self.vaults.iter().map(|v| v.as_ref()).collect();
        match fetch_chunk(&self.key, &vaults, id) {
            Ok((plain, fallback)) => {
                if let Some(errors) = fallback {
                    tracing::warn!(
                        export = %self.name,
                        "{what} ({id}) served from a fallback vault after: {errors}; \
                         run `keel snapshot verify` to heal the bad copy"
                    );
                }
                Ok(plain)
            }
            Err(errors) => Err(format!("no good copy in any vault: {}", errors.join("; "))),
        }
    }

    /// The manifest's entry for chunk `index`: inline, or read from its index chunk
    /// (cached like data chunks).
    fn entry(&self, index: usize) -> Result<ChunkRef, ExportError> {
        let missing = || self.invalid(format!("chunk {index} has no manifest entry"));
        match self.manifest.layout() {
            Layout::Inline(chunks) => chunks.get(index).map(ChunkRef::from_raw).ok_or_else(missing),
            Layout::Indexed { fanout, index: pieces } => {
                let fanout = fanout as usize;
                let piece = index / fanout;
                let raw = *pieces.get(piece).ok_or_else(missing)?;
                if raw == HOLE {
                    return Ok(ChunkRef::Hole);
                }
                let id = ChunkId(raw);
                let count = (self.manifest.chunk_count().saturating_sub(piece * fanout)).min(fanout);
                let index_error = |what: String| {
                    ExportError::new(
                        ExportErrorKind::Io,
                        format!("snapshot {}: index chunk {piece} ({id}) over chunk {index}: {what}", self.name),
                    )
                };
                let plain = self.cache.get_or_fetch(&id, || {
                    let plain = self.fetch_from_vaults(&format!("index chunk {piece}"), &id).map_err(index_error)?;
                    if plain.len() != PIECE_HEADER_LEN + 32 * count {
                        return Err(index_error(format!("decodes to {} bytes for {count} entries", plain.len())));
                    }
                    Ok(plain)
                })?;
                piece_entry(&plain, count, index % fanout).map(|raw| ChunkRef::from_raw(&raw)).map_err(index_error)
            }
        }
    }

    fn chunk_error(&self, index: usize, id: &ChunkId, what: String) -> ExportError {
        let (offset, _) = self.manifest.chunk_range(index);
        ExportError::new(
            ExportErrorKind::Io,
            format!("snapshot {}: chunk {index} ({id}) at offset {offset}: {what}", self.name),
        )
    }

    fn refuse(&self, op: &str) -> ExportError {
        ExportError::new(
            ExportErrorKind::PermissionDenied,
            format!("snapshot {} is read-only: {op} refused", self.name),
        )
    }
}

impl Export for SnapshotExport {
    fn name(&self) -> &str {
        &self.name
    }

    fn description(&self) -> String {
        self.description.clone()
    }

    fn size(&self) -> u64 {
        self.manifest.volume_size()
    }

    fn read_only(&self) -> bool {
        true
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), ExportError> {
        let end = offset.checked_add(buf.len() as u64).filter(|&end| end <= self.size()).ok_or_else(|| {
            self.invalid(format!("read of {} bytes at {offset} ends past the size {}", buf.len(), self.size()))
        })?;
        let mut position = offset;
        let mut rest = buf;
        while position < end {
            let index = self.chunk_index(position)?;
            let (chunk_offset, chunk_len) = self.manifest.chunk_range(index);
            let within = position - chunk_offset;
            let take = (chunk_len - within).min(end - position);
            let (dest, tail) = std::mem::take(&mut rest).split_at_mut(take as usize);
            match self.entry(index)? {
                ChunkRef::Hole => dest.fill(0),
                ChunkRef::Data(id) => {
                    let data = self.chunk(index, &id, chunk_len)?;
                    let source = data.get(within as usize..(within + take) as usize).ok_or_else(|| {
                        self.chunk_error(index, &id, format!("has no bytes {within}..{}", within + take))
                    })?;
                    dest.copy_from_slice(source);
                }
            }
            rest = tail;
            position += take;
        }
        Ok(())
    }

    fn write(&self, _offset: u64, _data: &[u8], _fua: bool) -> Result<(), ExportError> {
        Err(self.refuse("write"))
    }

    fn write_zeroes(&self, _offset: u64, _len: u64, _may_punch_hole: bool, _fua: bool) -> Result<(), ExportError> {
        Err(self.refuse("write zeroes"))
    }

    fn trim(&self, _offset: u64, _len: u64, _fua: bool) -> Result<(), ExportError> {
        Err(self.refuse("trim"))
    }

    fn flush(&self) -> Result<(), ExportError> {
        // Nothing is ever written.
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<(u64, bool)>, ExportError> {
        let end = offset.saturating_add(len).min(self.size());
        let mut runs: Vec<(u64, bool)> = Vec::new();
        let mut position = offset;
        while position < end {
            let index = self.chunk_index(position)?;
            let (chunk_offset, chunk_len) = self.manifest.chunk_range(index);
            let hole = self.entry(index)? == ChunkRef::Hole;
            let run_end = (chunk_offset + chunk_len).min(end);
            let length = run_end - position;
            match runs.last_mut() {
                Some((last_len, last_hole)) if *last_hole == hole => *last_len += length,
                _ => {
                    if runs.len() == EXTENTS_MAX {
                        break;
                    }
                    runs.push((length, hole));
                }
            }
            position = run_end;
        }
        Ok(runs)
    }
}

/// Serves `export` on the Unix socket `socket` until SIGTERM or SIGINT (Ctrl-C), then
/// lets the requests in flight finish, removes the socket and returns. Blocking: it runs
/// its own tokio runtime.
pub fn serve_snapshot(socket: &Path, export: SnapshotExport) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("keel-serve")
        .max_blocking_threads(BLOCKING_THREADS_MAX)
        .build()
        .context("failed to start the async runtime")?;
    runtime.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        // Registered before the socket exists, so a signal sent once clients can connect
        // always stops the server cleanly.
        let mut term = signal(SignalKind::terminate()).context("failed to listen for SIGTERM")?;
        let mut int = signal(SignalKind::interrupt()).context("failed to listen for SIGINT")?;
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let signals = tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            tracing::info!("shutting down: finishing in-flight requests");
            stop.cancel();
        });
        let served = serve_snapshot_until(socket, Arc::new(export), shutdown.clone()).await;
        signals.abort();
        served
    })
}

/// Serves `export` on the Unix socket `socket` until `shutdown` is cancelled, then lets
/// the requests in flight finish and removes the socket.
pub async fn serve_snapshot_until(
    socket: &Path,
    export: Arc<SnapshotExport>,
    shutdown: CancellationToken,
) -> Result<()> {
    let name = export.name.clone();
    let server = NbdServer::new(vec![export as Arc<dyn Export>])?;
    let listener =
        server.bind_unix(socket).await.with_context(|| format!("failed to listen on {}", socket.display()))?;
    tracing::info!(export = %name, socket = %socket.display(), "ready: serving the snapshot read-only");
    listener.serve(shutdown).await;
    Ok(())
}

/// A least-recently-used cache of decoded chunks, bounded in bytes, with one fetch per
/// chunk at a time (see [`SnapshotExport`]'s invariants).
struct ChunkCache {
    bytes_max: u64,
    state: Mutex<CacheState>,
}

#[derive(Default)]
struct CacheState {
    /// Ready chunks and chunks being fetched. Loading entries number at most the reads in
    /// flight.
    entries: HashMap<ChunkId, Slot>,
    /// Ready chunks by last use, oldest first.
    lru: BTreeMap<u64, ChunkId>,
    /// Use counter: the next `lru` key.
    tick: u64,
    /// Decoded bytes of the ready chunks.
    bytes: u64,
}

enum Slot {
    Ready { data: Arc<Vec<u8>>, tick: u64 },
    Loading(Arc<Flight>),
}

/// A fetch in progress that other readers of the same chunk wait for.
#[derive(Default)]
struct Flight {
    result: Mutex<Option<Result<Arc<Vec<u8>>, ExportError>>>,
    done: Condvar,
}

impl Flight {
    fn finish(&self, result: Result<Arc<Vec<u8>>, ExportError>) {
        *self.result.lock().unwrap_or_else(PoisonError::into_inner) = Some(result);
        self.done.notify_all();
    }

    fn wait(&self) -> Result<Arc<Vec<u8>>, ExportError> {
        let mut result = self.result.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(result) = result.as_ref() {
                return result.clone();
            }
            result = self.done.wait(result).unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// What a reader does for a chunk.
enum Role {
    Hit(Arc<Vec<u8>>),
    Wait(Arc<Flight>),
    Fetch(Arc<Flight>),
}

impl ChunkCache {
    fn new(bytes_max: u64) -> Self {
        ChunkCache { bytes_max, state: Mutex::new(CacheState::default()) }
    }

    fn lock(&self) -> MutexGuard<'_, CacheState> {
        // The state is consistent after every statement that can panic (none inside).
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn get_or_fetch(
        &self,
        id: &ChunkId,
        fetch: impl FnOnce() -> Result<Vec<u8>, ExportError>,
    ) -> Result<Arc<Vec<u8>>, ExportError> {
        let role = {
            let mut state = self.lock();
            let state = &mut *state;
            match state.entries.get_mut(id) {
                Some(Slot::Ready { data, tick }) => {
                    state.lru.remove(tick);
                    state.tick += 1;
                    *tick = state.tick;
                    state.lru.insert(*tick, *id);
                    Role::Hit(Arc::clone(data))
                }
                Some(Slot::Loading(flight)) => Role::Wait(Arc::clone(flight)),
                None => {
                    let flight = Arc::new(Flight::default());
                    state.entries.insert(*id, Slot::Loading(Arc::clone(&flight)));
                    Role::Fetch(flight)
                }
            }
        };
        match role {
            Role::Hit(data) => Ok(data),
            Role::Wait(flight) => flight.wait(),
            Role::Fetch(flight) => {
                // Should `fetch` panic, the guard still ends the flight, so no reader waits forever.
                let mut guard = FetchGuard { cache: self, id: *id, flight, done: false };
                let result = fetch().map(Arc::new);
                guard.complete(result.clone());
                result
            }
        }
    }

    /// Replaces the loading slot of `id` by the fetched chunk (when it fits) and evicts
    /// the least recently used chunks down to the bound.
    fn insert(&self, id: ChunkId, result: &Result<Arc<Vec<u8>>, ExportError>) {
        let mut state = self.lock();
        let state = &mut *state;
        state.entries.remove(&id);
        let Ok(data) = result else { return };
        let len = data.len() as u64;
        if len > self.bytes_max {
            return;
        }
        while state.bytes + len > self.bytes_max {
            let Some((_, oldest)) = state.lru.pop_first() else { break };
            if let Some(Slot::Ready { data, .. }) = state.entries.remove(&oldest) {
                state.bytes -= data.len() as u64;
            }
        }
        state.tick += 1;
        state.lru.insert(state.tick, id);
        state.entries.insert(id, Slot::Ready { data: Arc::clone(data), tick: state.tick });
        state.bytes += len;
        debug_assert!(state.bytes <= self.bytes_max, "cache over its bound");
    }
}

struct FetchGuard<'a> {
    cache: &'a ChunkCache,
    id: ChunkId,
    flight: Arc<Flight>,
    done: bool,
}

impl FetchGuard<'_> {
    fn complete(&mut self, result: Result<Arc<Vec<u8>>, ExportError>) {
        self.cache.insert(self.id, &result);
        self.flight.finish(result);
        self.done = true;
    }
}

impl Drop for FetchGuard<'_> {
    fn drop(&mut self) {
        if !self.done {
            let error = ExportError::new(ExportErrorKind::Io, format!("fetch of chunk {} panicked", self.id));
            self.complete(Err(error));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use keel_snapshot::create::{create_snapshot, Changed, CreateOptions, Source};
    use keel_snapshot::maintain::{copy_snapshot, read_manifest};
    use keel_snapshot::manifest::ChunkMap;
    use keel_snapshot::vault::testing::HookedVault;
    use keel_snapshot::vault::LocalVault;

    use super::*;

    const CHUNK: usize = 4096;

    struct Mem(Vec<u8>);

    impl Source for Mem {
        fn size(&self) -> u64 {
            self.0.len() as u64
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
            let start = offset as usize;
            buf.copy_from_slice(&self.0[start..start + buf.len()]);
            Ok(())
        }
    }

    /// 24 full chunks and a 1 KiB tail: pseudo-random data, holes at chunks 3-5 and 20, and
    /// chunk 10 equal to chunk 2 (one stored chunk, two entries).
    fn image() -> Vec<u8> {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut data: Vec<u8> = (0..24 * CHUNK + 1024)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        for hole in [3, 4, 5, 20] {
            data[hole * CHUNK..(hole + 1) * CHUNK].fill(0);
        }
        data.copy_within(2 * CHUNK..3 * CHUNK, 10 * CHUNK);
        data
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        key: TenantKey,
        data: Vec<u8>,
        first: Arc<HookedVault>,
        /// Chunk reads from `first`.
        gets: Arc<AtomicUsize>,
        second: Arc<LocalVault>,
        manifest_key: String,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let key = TenantKey::from_bytes([3; 32]);
        let gets = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&gets);
        let first = Arc::new(HookedVault::new(
            LocalVault::open("repo", dir.path().join("repo"), "acme").unwrap(),
            Box::new(move |_, _| {
                counter.fetch_add(1, Ordering::Relaxed);
                // Slow enough that concurrent readers of one chunk overlap.
                std::thread::sleep(std::time::Duration::from_millis(20));
            }),
        ));
        let second = Arc::new(LocalVault::open("dc2", dir.path().join("dc2"), "acme").unwrap());
        let data = image();
        let options = CreateOptions {
            volume: "db".into(),
            marker: "daily".into(),
            marker_seq: 7,
            node: "node-a".into(),
            chunk_size: CHUNK as u32,
            zstd_level: 1,
            threads: 2,
            snapshot_id: None,
            created_unix: None,
            group: None,
            read_limit: None,
            busy_read_limit: None,
            cpu_priority: keel_snapshot::priority::CpuPriority::Normal,
            stop: None,
        };
        let report = create_snapshot(
            &key,
            &first.inner,
            &Mem(data.clone()),
            &options,
            None,
            Changed::All("test".into()),
            &|_| {},
        )
        .unwrap();
        copy_snapshot(&key, &first.inner, second.as_ref(), &report.manifest_key, "test", &|_| {}).unwrap();
        gets.store(0, Ordering::Relaxed);
        Fixture { _dir: dir, key, data, first, gets, second, manifest_key: report.manifest_key }
    }

    impl Fixture {
        fn export(&self, vaults: Vec<Arc<dyn Vault>>) -> SnapshotExport {
            let manifest = read_manifest(&self.first.inner, &self.manifest_key, Some(&self.key)).unwrap();
            SnapshotExport::new("db@snap".into(), self.key.clone(), vaults, manifest)
        }

        fn both(&self) -> Vec<Arc<dyn Vault>> {
            vec![self.first.clone() as Arc<dyn Vault>, self.second.clone() as Arc<dyn Vault>]
        }

        fn chunk_id(&self, vault: &LocalVault, index: usize) -> ChunkId {
            let manifest = read_manifest(vault, &self.manifest_key, None).unwrap();
            let entry = ChunkMap::new(&self.key, &[vault as &dyn Vault], &manifest).entry(index as u64).unwrap();
            let ChunkRef::Data(id) = entry else { panic!("chunk {index} is a hole") };
            id
        }

        /// Flips a byte `at` bytes into chunk `index`'s frame, in `vault`'s pack.
        fn damage_chunk(&self, vault: &LocalVault, index: usize, at: u64) {
            let location = vault.store().locate(&self.chunk_id(vault, index)).unwrap().unwrap();
            flip_byte(&location.pack, (location.offset + at) as usize);
        }

        /// Deletes chunk `index` from `vault`.
        fn delete_chunk(&self, vault: &LocalVault, index: usize) {
            assert!(vault.store().remove(&self.chunk_id(vault, index)).unwrap());
        }
    }

    fn flip_byte(path: &Path, at: usize) {
        let mut bytes = std::fs::read(path).unwrap();
        bytes[at] ^= 0x40;
        std::fs::write(path, bytes).unwrap();
    }

    fn read(export: &SnapshotExport, offset: u64, len: usize) -> Result<Vec<u8>, ExportError> {
        let mut buf = vec![0xa5; len];
        export.read(offset, &mut buf).map(|()| buf)
    }

    #[test]
    fn reads_across_chunk_boundaries_holes_and_the_short_tail_are_exact() {
        let f = fixture();
        let export = f.export(f.both());
        assert_eq!(export.size(), f.data.len() as u64);
        assert!(export.read_only());
        let c = CHUNK as u64;
        let cases = [
            (0, CHUNK),                // one whole chunk
            (c - 512, 1024),           // straddles chunks 0 and 1
            (2 * c + 512, 3 * CHUNK),  // data into holes 3-5
            (3 * c, 3 * CHUNK),        // only holes
            (9 * c, 3 * CHUNK),        // the deduplicated chunk 10 in the middle
            (19 * c + 512, 2 * CHUNK), // data, hole 20, data
            (24 * c - 512, 1536),      // into the 1 KiB tail
            (0, f.data.len()),         // everything in one read
        ];
        for (offset, len) in cases {
            let got = read(&export, offset, len).unwrap();
            assert!(got == f.data[offset as usize..offset as usize + len], "read {len} at {offset} differs");
        }
        // Past the end: refused, not truncated or a panic.
        let err = read(&export, f.data.len() as u64 - 512, 1024).unwrap_err();
        assert_eq!(err.kind(), ExportErrorKind::InvalidArgument, "{err}");
        // Holes are never fetched; the duplicate chunk is fetched once, and the index
        // chunk listing them once.
        let vault: &dyn Vault = &f.first.inner;
        let data_chunks = ChunkMap::new(&f.key, &[vault], export.manifest()).distinct_data().unwrap().len();
        assert_eq!(f.gets.load(Ordering::Relaxed), data_chunks + 1);
    }

    #[test]
    fn block_status_reports_the_manifests_holes_merged() {
        let f = fixture();
        let export = f.export(f.both());
        let c = CHUNK as u64;
        let size = export.size();
        assert_eq!(
            export.block_status(0, size).unwrap(),
            vec![(3 * c, false), (3 * c, true), (14 * c, false), (c, true), (size - 21 * c, false)]
        );
        // From the middle of a chunk, clamped to the size.
        assert_eq!(export.block_status(3 * c + 512, 2 * c).unwrap(), vec![(2 * c, true)]);
        assert_eq!(export.block_status(24 * c, u64::MAX).unwrap(), vec![(1024, false)]);
    }

    #[test]
    fn writes_are_refused_with_eperm_and_flush_is_a_no_op() {
        let f = fixture();
        let export = f.export(f.both());
        for err in [
            export.write(0, &[1; 512], false).unwrap_err(),
            export.write(0, &[1; 512], true).unwrap_err(),
            export.write_zeroes(0, 4096, true, false).unwrap_err(),
            export.trim(0, 4096, false).unwrap_err(),
        ] {
            assert_eq!(err.kind(), ExportErrorKind::PermissionDenied, "{err}");
            assert!(err.message().contains("read-only"), "{err}");
        }
        export.flush().unwrap();
        assert!(read(&export, 0, CHUNK).unwrap() == f.data[..CHUNK]);
    }

    #[test]
    fn the_cache_stays_within_its_bound_and_serves_repeated_reads() {
        let f = fixture();
        // Room for three data chunks and the index chunk listing all 25 (used at every
        // read, so never the least recently used).
        let bound = 3 * CHUNK as u64 + (PIECE_HEADER_LEN + 32 * 25) as u64;
        let export = f.export(f.both()).with_cache_bytes(bound);
        // Chunk-sized pieces of chunk 0, as a client with small requests reads: one fetch,
        // and one of the index chunk.
        for piece in 0..8 {
            read(&export, piece * 512, 512).unwrap();
        }
        assert_eq!(f.gets.load(Ordering::Relaxed), 2);
        // A full pass evicts down to the bound at every step.
        for index in 0..25u64 {
            read(&export, index * CHUNK as u64, 512).unwrap();
            let (bytes, chunks) = export.cached();
            assert!(bytes <= bound && chunks <= 4, "{bytes} bytes in {chunks} chunks");
        }
        // The three most recently used data chunks (22, 23 and the tail, 24) stay.
        let before = f.gets.load(Ordering::Relaxed);
        read(&export, 23 * CHUNK as u64, 512).unwrap();
        assert_eq!(f.gets.load(Ordering::Relaxed), before, "chunk 23 was evicted");
        read(&export, 0, 512).unwrap();
        assert_eq!(f.gets.load(Ordering::Relaxed), before + 1, "chunk 0 was not evicted");
        // A disabled cache keeps nothing and still reads right.
        let uncached = f.export(f.both()).with_cache_bytes(0);
        assert!(read(&uncached, 0, 2 * CHUNK).unwrap() == f.data[..2 * CHUNK]);
        assert_eq!(uncached.cached(), (0, 0));
    }

    #[test]
    fn concurrent_reads_of_one_chunk_fetch_it_once() {
        let f = fixture();
        let export = f.export(f.both());
        std::thread::scope(|scope| {
            for piece in 0..8u64 {
                let export = &export;
                let data = &f.data;
                scope.spawn(move || {
                    let got = read(export, 6 * CHUNK as u64 + piece * 512, 512).unwrap();
                    assert!(got == data[6 * CHUNK + piece as usize * 512..][..512]);
                });
            }
        });
        assert_eq!(f.gets.load(Ordering::Relaxed), 2, "the chunk and its index chunk, once each");
    }

    #[test]
    fn a_corrupt_chunk_in_the_first_vault_is_served_from_the_second() {
        let f = fixture();
        f.damage_chunk(&f.first.inner, 7, 100);
        f.delete_chunk(&f.first.inner, 8);
        let export = f.export(f.both());
        let got = read(&export, 6 * CHUNK as u64, 4 * CHUNK).unwrap();
        assert!(got == f.data[6 * CHUNK..10 * CHUNK]);
    }

    /// Both copies of a chunk bad: the read fails with EIO naming the chunk, the export
    /// goes on serving the other chunks, and a later read of the chunk tries again.
    #[test]
    fn a_chunk_bad_in_every_vault_is_an_io_error_naming_it() {
        let f = fixture();
        let id = f.chunk_id(&f.first.inner, 7);
        f.damage_chunk(&f.first.inner, 7, 100);
        f.delete_chunk(&f.second, 7);
        let export = f.export(f.both());
        let err = read(&export, 6 * CHUNK as u64, 2 * CHUNK).unwrap_err();
        assert_eq!(err.kind(), ExportErrorKind::Io, "{err}");
        for part in [format!("chunk 7 ({id})"), format!("offset {}", 7 * CHUNK), "checksum".into(), "not found".into()]
        {
            assert!(err.message().contains(&part), "{part:?} not in {err}");
        }
        assert!(read(&export, 6 * CHUNK as u64, CHUNK).unwrap() == f.data[6 * CHUNK..7 * CHUNK]);
        let gets = f.gets.load(Ordering::Relaxed);
        assert!(read(&export, 7 * CHUNK as u64, 512).is_err());
        assert_eq!(f.gets.load(Ordering::Relaxed), gets + 1, "a failed fetch is not cached");
        // No vault at all: an error too.
        let none = f.export(Vec::new());
        assert_eq!(read(&none, 0, 512).unwrap_err().kind(), ExportErrorKind::Io);
    }

    #[test]
    fn serves_over_a_unix_socket_until_cancelled() {
        let f = fixture();
        let export = Arc::new(f.export(f.both()));
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("snap.sock");
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        runtime.block_on(async {
            let shutdown = CancellationToken::new();
            let task = tokio::spawn({
                let (socket, shutdown) = (socket.clone(), shutdown.clone());
                async move { serve_snapshot_until(&socket, export, shutdown).await }
            });
            for _ in 0..500 {
                if tokio::net::UnixStream::connect(&socket).await.is_ok() {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            assert!(tokio::net::UnixStream::connect(&socket).await.is_ok(), "the server never listened");
            shutdown.cancel();
            task.await.unwrap().unwrap();
        });
        assert!(!socket.exists(), "the socket is removed at shutdown");
    }
}
