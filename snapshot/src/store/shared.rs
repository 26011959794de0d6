//! Seeing other processes' work: re-reading index logs that grew or appeared, the
//! generation file that announces removals, pack locks, and the statistics built from the
//! directory listing. See the parent module's docs, "Several processes".

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::pack::{self, FileKind, HEADER_LEN, RECORD_LEN};
use super::state::LogRead;
use super::{lock, read, read_at_most, write, LocalChunkStore, StoreStats, GENERATION_FILE};
use crate::error::StoreError;

impl LocalChunkStore {
    /// Counts packs, live and dead bytes, orphans and damage (`keel-inspect repo`).
    pub fn stats(&self) -> Result<StoreStats, StoreError> {
        self.refresh()?;
        let listing = self.list_packs_dir()?;
        let state = read(&self.state);
        let mut stats = StoreStats {
            chunks: state.index.len() as u64,
            extra_copies: state.extra_copies() as u64,
            index_memory_bytes: state.index.heap_bytes() as u64,
            ..StoreStats::default()
        };
        for (name, files) in &listing {
            let info = state.slot(*name).and_then(|slot| state.pack(slot));
            let pack_len = files.pack.as_ref().map_or(0, fs::Metadata::len);
            stats.index_log_bytes += files.log.as_ref().map_or(0, fs::Metadata::len);
            match (info, &files.pack) {
                (Some(info), Some(_)) if info.stored_records > 0 || info.damaged() => {
                    stats.packs += 1;
                    stats.pack_bytes += pack_len;
                    stats.live_bytes += info.live_bytes;
                    stats.dead_bytes += pack_len.saturating_sub(info.live_bytes);
                }
                (_, Some(_)) => {
                    stats.orphan_packs += 1;
                    stats.orphan_bytes += pack_len;
                }
                (_, None) => {
                    stats.damaged_logs.push(format!(
                        "{}: index log without its pack file",
                        self.file_path(*name, FileKind::Index).display()
                    ));
                }
            }
            if let Some(info) = info.filter(|i| i.damaged()) {
                let mut what = Vec::new();
                if let Some(e) = &info.header_error {
                    what.push(format!("unreadable header ({e})"));
                }
                if info.skipped_log_bytes > 0 {
                    what.push(format!("{} bytes that are not valid records skipped", info.skipped_log_bytes));
                }
                if info.records_outside_pack > 0 {
                    what.push(format!("{} records point past the end of the pack", info.records_outside_pack));
                }
                stats.damaged_logs.push(format!(
                    "{}: {}",
                    self.file_path(*name, FileKind::Index).display(),
                    what.join(", ")
                ));
            }
        }
        Ok(stats)
    }

    /// The files of each pack name in `packs/`.
    pub(super) fn list_packs_dir(&self) -> Result<HashMap<u64, PackFiles>, StoreError> {
        let io = |source| StoreError::Io { op: "list packs", path: self.packs_dir.clone(), source };
        let mut out: HashMap<u64, PackFiles> = HashMap::new();
        for entry in fs::read_dir(&self.packs_dir).map_err(io)? {
            let entry = entry.map_err(io)?;
            let Some((name, kind)) = entry.file_name().to_str().and_then(pack::parse_file_name) else { continue };
            let meta = match entry.metadata() {
                Ok(meta) => meta,
                // Deleted by a reclaim between the listing and the stat.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(source) => return Err(io(source)),
            };
            let files = out.entry(name).or_default();
            match kind {
                FileKind::Pack => files.pack = Some(meta),
                FileKind::Index => files.log = Some(meta),
            }
        }
        Ok(out)
    }

    /// Re-reads the index logs that grew or appeared since they were last read, and
    /// forgets packs whose files are gone. Concurrent callers share one re-read: a caller
    /// returns at once if a re-read started after it asked.
    pub(super) fn refresh(&self) -> Result<(), StoreError> {
        let asked = Instant::now();
        let mut refreshed = lock(&self.refreshed);
        if refreshed.is_some_and(|started| started > asked) {
            return Ok(());
        }
        let started = Instant::now();
        // Known packs before the listing: a pack this store creates meanwhile is listed
        // (its files exist before it is registered) or not known, never taken for gone.
        let known: HashMap<u64, (u32, u64)> =
            read(&self.state).packs().map(|(slot, p)| (p.name, (slot, p.log_read_to))).collect();
        let listing = self.list_packs_dir()?;
        let vanished: HashSet<u32> = known
            .iter()
            .filter(|(name, _)| listing.get(name).is_none_or(|f| f.pack.is_none() || f.log.is_none()))
            .map(|(_, (slot, _))| *slot)
            .collect();
        if !vanished.is_empty() {
            write(&self.state).forget_packs(&vanished);
            lock(&self.readers).retain(|slot, _| !vanished.contains(slot));
        }
        let mut grown: Vec<(u64, u64, u64)> = Vec::new();
        for (name, files) in &listing {
            let (Some(log), Some(_)) = (&files.log, &files.pack) else { continue };
            let from = known.get(name).map_or(0, |(_, read_to)| *read_to);
            if from == 0 || log.len() > from {
                grown.push((*name, from, log.len()));
            }
        }
        // Sized for every record (an upper bound: removals too), so opening a large store
        // holds the new entries once, at 48 bytes each, and adopts them as the index.
        let records: u64 = grown
            .iter()
            .map(|(_, from, len)| len.saturating_sub((*from).max(HEADER_LEN as u64)) / RECORD_LEN as u64)
            .sum();
        let mut fresh = Vec::with_capacity(usize::try_from(records).unwrap_or(0));
        for (name, from, _) in grown {
            if let Some(log) = self.read_log(name, from)? {
                write(&self.state).apply_log(log, &mut fresh);
            }
        }
        write(&self.state).insert_fresh(fresh);
        *refreshed = Some(started);
        Ok(())
    }

    /// Re-reads one pack's log from where it was last read (a reclaim, after taking the
    /// pack's lock: removals may have landed since it planned).
    pub(super) fn refresh_pack(&self, name: u64) -> Result<(), StoreError> {
        let _refreshing = lock(&self.refreshed);
        let Some(from) = ({
            let state = read(&self.state);
            state.slot(name).and_then(|slot| state.pack(slot)).map(|p| p.log_read_to)
        }) else {
            return Ok(());
        };
        if let Some(log) = self.read_log(name, from)? {
            let mut fresh = Vec::new();
            let mut state = write(&self.state);
            state.apply_log(log, &mut fresh);
            state.insert_fresh(fresh);
        }
        Ok(())
    }

    /// Reads pack `name`'s log from offset `from` (0: check the header first); `None` when
    /// the log is gone.
    pub(super) fn read_log(&self, name: u64, from: u64) -> Result<Option<LogRead>, StoreError> {
        let path = self.file_path(name, FileKind::Index);
        let io = |source| StoreError::Io { op: "read index log", path: path.clone(), source };
        let mut file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(io(source)),
        };
        let mut start = from;
        let mut header_error = None;
        if from == 0 {
            let mut header = [0u8; HEADER_LEN];
            let got = read_at_most(&file, &mut header, 0).map_err(io)?;
            if got < HEADER_LEN {
                // Being created right now, or a crash right after creation: no records.
                let scan = pack::Scan { resume: 0, ..pack::Scan::default() };
                return Ok(Some(LogRead { name, pack_len: None, header_error: None, scan }));
            }
            if let Err(what) = pack::check_header(FileKind::Index, name, &header) {
                header_error = Some(what);
            }
            start = HEADER_LEN as u64;
        }
        let mut tail = Vec::new();
        if header_error.is_none() {
            file.seek(SeekFrom::Start(start)).map_err(io)?;
            file.read_to_end(&mut tail).map_err(io)?;
        }
        let scan = pack::scan(&tail, start);
        // After the log: any record read points at bytes this length covers.
        let pack_len = match fs::metadata(self.file_path(name, FileKind::Pack)) {
            Ok(meta) => Some(meta.len()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(source) => {
                return Err(StoreError::Io { op: "stat pack", path: self.file_path(name, FileKind::Pack), source })
            }
        };
        let scan = if header_error.is_some() { pack::Scan { resume: 0, ..scan } } else { scan };
        Ok(Some(LogRead { name, pack_len, header_error, scan }))
    }

    /// Re-reads the logs when another process removed chunks since we last looked.
    pub(super) fn check_generation(&self) -> Result<(), StoreError> {
        let now = self.read_generation()?;
        if now != self.generation_seen.load(Ordering::Acquire) {
            self.refresh()?;
            self.generation_seen.store(now, Ordering::Release);
        }
        Ok(())
    }

    pub(super) fn read_generation(&self) -> Result<u64, StoreError> {
        let mut bytes = [0u8; 8];
        let got = read_at_most(&self.generation, &mut bytes, 0).map_err(|source| StoreError::Io {
            op: "read generation file",
            path: self.packs_dir.join(GENERATION_FILE),
            source,
        })?;
        Ok(if got == bytes.len() { u64::from_le_bytes(bytes) } else { 0 })
    }

    /// Tells other processes that chunks were removed. Called with `sync_lock` held; the
    /// file's exclusive lock makes the read-and-replace atomic between processes, so this
    /// store skips its own change but never another's. Not fsynced: only live processes
    /// read it, and every store reads all logs when it opens.
    pub(super) fn bump_generation(&self) -> Result<(), StoreError> {
        let path = self.packs_dir.join(GENERATION_FILE);
        self.poison_on_error(|| {
            let io = |op: &'static str| {
                let path = path.clone();
                move |source| StoreError::Io { op, path, source }
            };
            flock(&self.generation, libc::LOCK_EX).map_err(io("lock generation file"))?;
            let result = (|| {
                let before = self.read_generation()?;
                let next: u64 = rand::random();
                self.generation.write_all_at(&next.to_le_bytes(), 0).map_err(io("write generation file"))?;
                if before == self.generation_seen.load(Ordering::Acquire) {
                    self.generation_seen.store(next, Ordering::Release);
                }
                Ok(())
            })();
            flock(&self.generation, libc::LOCK_UN).map_err(io("unlock generation file"))?;
            result
        })
    }

    /// Opens pack `name` and takes its `flock` (`operation`: `LOCK_SH`, or `LOCK_EX |
    /// LOCK_NB`). `None` when the pack is gone, or (non-blocking) locked by someone else.
    /// The lock lives as long as the returned file.
    pub(super) fn lock_pack(&self, name: u64, operation: libc::c_int) -> Result<Option<File>, StoreError> {
        let path = self.file_path(name, FileKind::Pack);
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StoreError::Io { op: "open pack", path, source }),
        };
        match flock(&file, operation) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => return Ok(None),
            Err(source) => return Err(StoreError::Io { op: "lock pack", path, source }),
        }
        // A reclaim may have deleted the pack between our open and our lock (it deletes
        // under its exclusive lock): the name must still be this file.
        let same = match (file.metadata(), fs::metadata(&path)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            (_, Err(e)) if e.kind() == io::ErrorKind::NotFound => false,
            (Err(source), _) | (_, Err(source)) => return Err(StoreError::Io { op: "stat pack", path, source }),
        };
        Ok(same.then_some(file))
    }
}

/// The two files of one pack name, as listed.
#[derive(Debug, Default)]
pub(super) struct PackFiles {
    pub(super) pack: Option<fs::Metadata>,
    pub(super) log: Option<fs::Metadata>,
}

/// `flock(2)`. Advisory, per open file description, released when the file is closed (or
/// the process dies): what tells a reclaim that a pack still has a writer.
pub(super) fn flock(file: &File, operation: libc::c_int) -> io::Result<()> {
    loop {
        // SAFETY: flock only takes the descriptor, which `file` keeps open for the call.
        let rc = unsafe { libc::flock(file.as_raw_fd(), operation) };
        if rc == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Opens (creating if needed) the generation file; read-only where the directory is.
pub(super) fn open_generation(path: &Path) -> Result<File, StoreError> {
    match OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path) {
        Ok(file) => Ok(file),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EROFS | libc::EACCES | libc::EPERM)) => {
            File::open(path).map_err(|source| StoreError::Io { op: "open generation file", path: path.into(), source })
        }
        Err(source) => Err(StoreError::Io { op: "open generation file", path: path.to_owned(), source }),
    }
}
