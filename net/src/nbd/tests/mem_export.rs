//! An in-memory [`Export`] for tests: bytes plus a per-512-byte-sector hole
//! map, with counters and optional injected delays and failures.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

use crate::nbd::export::{Export, ExportError, ExportErrorKind};

const SECTOR: u64 = 512;

type Delay = Box<dyn Fn(u64) -> Duration + Send + Sync>;

pub(crate) struct MemExport {
    name: String,
    description: String,
    size: u64,
    read_only: bool,
    state: Mutex<State>,
    read_delay: Option<Delay>,
    write_delay: Duration,
    fail_offset: Option<u64>,
    pub(crate) flushes: AtomicU64,
    pub(crate) fua_writes: AtomicU64,
    pub(crate) writes: AtomicU64,
    pub(crate) calls: AtomicU64,
}

struct State {
    data: Vec<u8>,
    /// `true` = the sector is a hole (unallocated, reads as zeros).
    holes: Vec<bool>,
}

impl MemExport {
    pub(crate) fn new(name: &str, size: u64) -> Self {
        let sectors = size.div_ceil(SECTOR) as usize;
        Self {
            name: name.to_owned(),
            description: format!("in-memory test export {name}"),
            size,
            read_only: false,
            state: Mutex::new(State { data: vec![0; size as usize], holes: vec![true; sectors] }),
            read_delay: None,
            write_delay: Duration::ZERO,
            fail_offset: None,
            flushes: AtomicU64::new(0),
            fua_writes: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            calls: AtomicU64::new(0),
        }
    }

    pub(crate) fn read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    /// Each read sleeps for `delay(offset)` before copying.
    pub(crate) fn read_delay(mut self, delay: impl Fn(u64) -> Duration + Send + Sync + 'static) -> Self {
        self.read_delay = Some(Box::new(delay));
        self
    }

    pub(crate) fn write_delay(mut self, delay: Duration) -> Self {
        self.write_delay = delay;
        self
    }

    /// Any call touching `offset` fails with `Io`.
    pub(crate) fn fail_at(mut self, offset: u64) -> Self {
        self.fail_offset = Some(offset);
        self
    }

    /// A copy of `offset..offset + len` of the contents.
    pub(crate) fn snapshot(&self, offset: u64, len: usize) -> Vec<u8> {
        let state = self.state.lock();
        state.data[offset as usize..offset as usize + len].to_vec()
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), ExportError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        // The server must validate before calling in; this catches it if not.
        assert!(offset % SECTOR == 0, "misaligned offset {offset} reached the export");
        assert!(len > 0, "zero-length request reached the export");
        assert!(offset + len <= self.size, "out-of-range request reached the export");
        if let Some(bad) = self.fail_offset {
            if (offset..offset + len).contains(&bad) {
                return Err(ExportError::new(ExportErrorKind::Io, "injected failure"));
            }
        }
        Ok(())
    }

    fn set_holes(state: &mut State, offset: u64, len: u64, hole: bool) {
        let first = (offset / SECTOR) as usize;
        let last = (offset + len).div_ceil(SECTOR) as usize;
        for sector in &mut state.holes[first..last] {
            *sector = hole;
        }
    }

    fn zero(state: &mut State, offset: u64, len: u64) {
        state.data[offset as usize..(offset + len) as usize].fill(0);
    }
}

impl Export for MemExport {
    fn name(&self) -> &str {
        &self.name
    }

    fn description(&self) -> String {
        self.description.clone()
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), ExportError> {
        self.check(offset, buf.len() as u64)?;
        if let Some(delay) = &self.read_delay {
            std::thread::sleep(delay(offset));
        }
        let state = self.state.lock();
        buf.copy_from_slice(&state.data[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), ExportError> {
        assert!(!self.read_only, "write reached a read-only export");
        self.check(offset, data.len() as u64)?;
        std::thread::sleep(self.write_delay);
        let mut state = self.state.lock();
        state.data[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        Self::set_holes(&mut state, offset, data.len() as u64, false);
        self.writes.fetch_add(1, Ordering::SeqCst);
        if fua {
            self.fua_writes.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_punch_hole: bool, _fua: bool) -> Result<(), ExportError> {
        assert!(!self.read_only, "write_zeroes reached a read-only export");
        self.check(offset, len)?;
        let mut state = self.state.lock();
        Self::zero(&mut state, offset, len);
        Self::set_holes(&mut state, offset, len, may_punch_hole);
        Ok(())
    }

    fn trim(&self, offset: u64, len: u64, _fua: bool) -> Result<(), ExportError> {
        assert!(!self.read_only, "trim reached a read-only export");
        self.check(offset, len)?;
        let mut state = self.state.lock();
        Self::zero(&mut state, offset, len);
        Self::set_holes(&mut state, offset, len, true);
        Ok(())
    }

    fn flush(&self) -> Result<(), ExportError> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// Reports one run per sector from `offset` up to twice the asked
    /// length (more than asked, and unmerged, so the server's clamping and
    /// merging are exercised), after a zero-length run the server must drop.
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<(u64, bool)>, ExportError> {
        self.check(offset, len)?;
        let state = self.state.lock();
        let first = (offset / SECTOR) as usize;
        let last = (offset + 2 * len).div_ceil(SECTOR).min(state.holes.len() as u64) as usize;
        let mut runs = vec![(0, false)];
        runs.extend(state.holes[first..last].iter().map(|&hole| (SECTOR, hole)));
        Ok(runs)
    }
}
