//! A fault-injecting, crash-simulating [`Env`] for tests (feature `testing`).
//!
//! Files live in memory as two images: what reads see (the page cache) and what would
//! survive a power cut. `sync` moves a file's pending writes to its durable image.
//! [`FaultyEnv::crash`] throws the page cache away after letting a random subset of the
//! pending writes reach "disk" — some whole, some torn at a 512-byte sector boundary,
//! in any order — which is what a kernel writing back dirty pages may do. Faults can
//! also be armed: the next write or sync of a file whose path contains a pattern fails.
//!
//! Directory operations (create, rename, remove) are durable at once; the engine syncs
//! file contents before it renames, which is the property this model checks.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use rand::{Rng, RngCore};

use crate::storage::{Env, Extent, OpenMode, Storage};

const PAGE: u64 = 4096;
const SECTOR: usize = 512;

/// Which operation an armed fault breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// `write_at` (and zeroing/punching) fails with EIO.
    Write,
    /// `sync` fails with EIO (and, as on Linux, the pending writes are lost from the
    /// durable image).
    Sync,
}

#[derive(Debug, Default, Clone)]
struct Image {
    len: u64,
    pages: BTreeMap<u64, Box<[u8]>>,
}

impl Image {
    fn read(&self, buf: &mut [u8], offset: u64) {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let page = pos / PAGE;
            let within = (pos % PAGE) as usize;
            let n = (PAGE as usize - within).min(buf.len() - done);
            match self.pages.get(&page) {
                Some(p) if pos < self.len => buf[done..done + n].copy_from_slice(&p[within..within + n]),
                _ => buf[done..done + n].fill(0),
            }
            done += n;
        }
    }

    fn write(&mut self, data: &[u8], offset: u64) {
        let mut done = 0usize;
        while done < data.len() {
            let pos = offset + done as u64;
            let page = pos / PAGE;
            let within = (pos % PAGE) as usize;
            let n = (PAGE as usize - within).min(data.len() - done);
            let p = self.pages.entry(page).or_insert_with(|| vec![0u8; PAGE as usize].into_boxed_slice());
            p[within..within + n].copy_from_slice(&data[done..done + n]);
            done += n;
        }
        self.len = self.len.max(offset + data.len() as u64);
    }

    fn zero(&mut self, offset: u64, len: u64) {
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let page = pos / PAGE;
            let within = (pos % PAGE) as usize;
            let n = (PAGE - within as u64).min(end - pos) as usize;
            if within == 0 && n == PAGE as usize {
                self.pages.remove(&page);
            } else if let Some(p) = self.pages.get_mut(&page) {
                p[within..within + n].fill(0);
            }
            pos += n as u64;
        }
    }

    fn set_len(&mut self, len: u64) {
        if len < self.len {
            let first_gone = len.div_ceil(PAGE);
            self.pages.retain(|&p, _| p < first_gone);
            if len % PAGE != 0 {
                if let Some(p) = self.pages.get_mut(&(len / PAGE)) {
                    p[(len % PAGE) as usize..].fill(0);
                }
            }
        }
        self.len = len;
    }

    fn apply(&mut self, op: &Op) {
        match op {
            Op::Write { offset, data } => self.write(data, *offset),
            Op::Zero { offset, len } => self.zero(*offset, *len),
            Op::SetLen(len) => self.set_len(*len),
        }
    }
}

#[derive(Debug, Clone)]
enum Op {
    Write { offset: u64, data: Vec<u8> },
    Zero { offset: u64, len: u64 },
    SetLen(u64),
}

#[derive(Debug, Default)]
struct FileState {
    current: Image,
    durable: Image,
    pending: Vec<Op>,
}

#[derive(Debug)]
struct MemFile {
    path: PathBuf,
    state: Mutex<FileState>,
    /// Weak: the shared table owns the files, not the other way round.
    env: Weak<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    files: Mutex<HashMap<PathBuf, Arc<MemFile>>>,
    dirs: Mutex<HashSet<PathBuf>>,
    locks: Mutex<HashSet<PathBuf>>,
    faults: Mutex<Vec<(FaultKind, String)>>,
}

impl Shared {
    fn take_fault(&self, kind: FaultKind, path: &Path) -> io::Result<()> {
        let mut faults = self.faults.lock();
        let path = path.to_string_lossy();
        if let Some(i) = faults.iter().position(|(k, pattern)| *k == kind && path.contains(pattern.as_str())) {
            faults.remove(i);
            return Err(io::Error::other(format!("injected {kind:?} fault on {path}")));
        }
        Ok(())
    }
}

/// The in-memory, crash-simulating environment. Clones share the same files.
#[derive(Debug, Clone, Default)]
pub struct FaultyEnv {
    shared: Arc<Shared>,
}

impl FaultyEnv {
    /// An empty filesystem.
    pub fn new() -> Self {
        Self::default()
    }

    /// Arms a one-shot fault: the next `kind` operation on a file whose path contains
    /// `path_pattern` fails.
    pub fn inject(&self, kind: FaultKind, path_pattern: &str) {
        self.shared.faults.lock().push((kind, path_pattern.to_string()));
    }

    /// Simulates a power cut: each pending (unsynced) operation reaches the durable image
    /// whole, torn at a sector boundary, or not at all, chosen by `rng`; then every
    /// file's page cache is replaced by its durable image and every lock is released.
    pub fn crash(&self, rng: &mut dyn RngCore) {
        for file in self.shared.files.lock().values() {
            let mut state = file.state.lock();
            let pending = std::mem::take(&mut state.pending);
            for op in &pending {
                match rng.gen_range(0..4) {
                    0 => {}
                    1 => {
                        if let Op::Write { offset, data } = op {
                            let sectors = data.len().div_ceil(SECTOR);
                            let kept = rng.gen_range(0..=sectors) * SECTOR;
                            let torn = Op::Write { offset: *offset, data: data[..kept.min(data.len())].to_vec() };
                            state.durable.apply(&torn);
                        }
                    }
                    _ => state.durable.apply(op),
                }
            }
            state.current = state.durable.clone();
        }
        self.shared.locks.lock().clear();
    }

    /// Simulates the process being killed (SIGKILL) without a power cut: the page cache
    /// survives, locks are released.
    pub fn kill_process(&self) {
        self.shared.locks.lock().clear();
    }

    /// Flips bits in the durable and current image of a file (media corruption).
    pub fn corrupt(&self, path: &Path, offset: u64, xor: u8) {
        if let Some(file) = self.shared.files.lock().get(path) {
            let mut guard = file.state.lock();
            let state = &mut *guard;
            for image in [&mut state.current, &mut state.durable] {
                let mut byte = [0u8];
                image.read(&mut byte, offset);
                byte[0] ^= xor;
                image.write(&byte, offset);
            }
        }
    }

    /// Paths of every file, sorted.
    pub fn files(&self) -> Vec<PathBuf> {
        let mut paths: Vec<_> = self.shared.files.lock().keys().cloned().collect();
        paths.sort();
        paths
    }
}

impl Env for FaultyEnv {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn Storage>> {
        let mut files = self.shared.files.lock();
        if let Some(file) = files.get(path) {
            return Ok(Arc::clone(file) as Arc<dyn Storage>);
        }
        if mode == OpenMode::Existing {
            return Err(io::Error::new(io::ErrorKind::NotFound, format!("{} not found", path.display())));
        }
        let file = Arc::new(MemFile {
            path: path.to_path_buf(),
            state: Mutex::new(FileState::default()),
            env: Arc::downgrade(&self.shared),
        });
        files.insert(path.to_path_buf(), Arc::clone(&file));
        Ok(file)
    }

    fn exists(&self, path: &Path) -> bool {
        self.shared.files.lock().contains_key(path) || self.shared.dirs.lock().contains(path)
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        let mut dirs = self.shared.dirs.lock();
        for ancestor in path.ancestors() {
            dirs.insert(ancestor.to_path_buf());
        }
        Ok(())
    }

    fn read_dir(&self, path: &Path) -> io::Result<Vec<PathBuf>> {
        Ok(self.shared.files.lock().keys().filter(|p| p.parent() == Some(path)).cloned().collect())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut files = self.shared.files.lock();
        let file = files
            .remove(from)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{} not found", from.display())))?;
        let renamed = Arc::new(MemFile {
            path: to.to_path_buf(),
            state: Mutex::new(std::mem::take(&mut *file.state.lock())),
            env: Arc::downgrade(&self.shared),
        });
        files.insert(to.to_path_buf(), renamed);
        Ok(())
    }

    fn sync_dir(&self, _path: &Path) -> io::Result<()> {
        Ok(())
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.shared.files.lock().remove(path);
        Ok(())
    }

    fn lock(&self, path: &Path) -> io::Result<Box<dyn std::any::Any + Send + Sync>> {
        if !self.shared.locks.lock().insert(path.to_path_buf()) {
            return Err(io::Error::new(io::ErrorKind::WouldBlock, "locked"));
        }
        Ok(Box::new(LockGuard { shared: Arc::clone(&self.shared), path: path.to_path_buf() }))
    }

    fn backend_name(&self) -> &'static str {
        "faulty-memory"
    }
}

struct LockGuard {
    shared: Arc<Shared>,
    path: PathBuf,
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        self.shared.locks.lock().remove(&self.path);
    }
}

impl MemFile {
    fn mutate(&self, op: Op) -> io::Result<()> {
        if matches!(op, Op::Write { .. } | Op::Zero { .. }) {
            if let Some(env) = self.env.upgrade() {
                env.take_fault(FaultKind::Write, &self.path)?;
            }
        }
        let mut state = self.state.lock();
        state.current.apply(&op);
        state.pending.push(op);
        Ok(())
    }
}

impl Storage for MemFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.state.lock().current.read(buf, offset);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.mutate(Op::Write { offset, data: buf.to_vec() })
    }

    fn sync(&self) -> io::Result<()> {
        if let Err(e) = self.env.upgrade().map_or(Ok(()), |env| env.take_fault(FaultKind::Sync, &self.path)) {
            // Like Linux after a writeback error: the dirty data is gone from the durable
            // image, and the page cache no longer promises anything.
            self.state.lock().pending.clear();
            return Err(e);
        }
        let mut state = self.state.lock();
        let pending = std::mem::take(&mut state.pending);
        for op in &pending {
            state.durable.apply(op);
        }
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.state.lock().current.len)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.mutate(Op::SetLen(len))
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.mutate(Op::Zero { offset, len })
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        self.mutate(Op::Zero { offset, len })
    }

    fn allocate(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }

    fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        let state = self.state.lock();
        let mut out: Vec<Extent> = Vec::new();
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let page = pos / PAGE;
            let n = (PAGE - pos % PAGE).min(end - pos);
            let hole = !state.current.pages.contains_key(&page);
            match out.last_mut() {
                Some(last) if last.hole == hole => last.len += n,
                _ => out.push(Extent { len: n, hole }),
            }
            pos += n;
        }
        Ok(out)
    }
}
