//! The io_uring backend: one dedicated thread owns one ring and serves the blocking
//! `read_at`/`write_at`/`sync` calls of every [`UringFile`]; metadata operations stay plain
//! syscalls on the wrapped [`PosixFile`].
//!
//! # Protocol
//!
//! 1. A caller packs its operation (raw fd, buffer pointer and length, offset) and a
//!    one-shot reply channel into a `Request` and sends it over a bounded channel of
//!    [`REQUEST_QUEUE_DEPTH`] entries. A full queue blocks the caller: that is the
//!    backpressure.
//! 2. If the ring thread is parked in the kernel, the caller wakes it through an eventfd
//!    (see "Waking the thread"), then blocks on its reply channel.
//! 3. The ring thread moves every queued request into a submission queue entry, keeping at
//!    most [`MAX_IN_FLIGHT`] operations in the kernel, and calls `submit_and_wait(1)`.
//! 4. It reaps every completion. A short read or write resubmits the remainder, EINTR and
//!    EAGAIN resubmit the same range (at most [`MAX_RETRIES`] times in a row), and a read
//!    returning 0 is end of file: the reply carries the bytes read so far and the caller
//!    zero-fills the rest, as [`PosixFile`] does. Anything else is the final result.
//! 5. Dropping the last `Arc<Ring>` closes the channel and wakes the thread; the thread
//!    serves what is still queued or in flight, exits, and the drop joins it.
//!
//! # Waking the thread
//!
//! The thread only ever blocks inside `io_uring_enter`, never on the channel: otherwise a
//! request arriving during a slow fsync would wait for that fsync to finish. One `Read` of
//! an eventfd stays armed in the ring, so a write to the eventfd ends the wait. Writing it
//! for every request would cost a syscall each, so the thread sets `Shared::parked` before
//! it waits, and only a caller that finds the flag set (and clears it) writes the eventfd.
//! The thread checks the channel and sets the flag under the same lock a caller takes
//! after sending: either the thread's check sees the request, or the caller sees the flag.
//!
//! # Invariants
//!
//! - The kernel touches a caller's buffer only while that caller is blocked in
//!   `Ring::call`. The reply is sent, or its sender dropped, only after the completion of
//!   the operation's last submission, or when the operation never reached the kernel.
//! - An operation has at most one submission in the kernel at a time.
//! - Data operations in flight never exceed [`MAX_IN_FLIGHT`], one less than
//!   [`RING_ENTRIES`] (the other entry is the eventfd read), so a push to the submission
//!   queue cannot fail and the completion queue (twice the entries) cannot overflow.
//! - The driver, which owns the ring and the eventfd read buffer, is never dropped while
//!   the kernel holds one of its submissions: on a panic or a fatal ring error it first
//!   waits for every outstanding completion, and aborts the process if it cannot. A
//!   kernel writing into freed memory would be worse than a crash.

use std::fmt;
use std::fs::File;
use std::io::{self, Write as _};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use io_uring::{opcode, squeue, types, IoUring, Probe};
// Not `crate::sync`: loom cannot model a thread that the kernel drives, and a loom mutex
// used outside a model panics. The lock only guards a flag test-and-set.
use parking_lot::Mutex;

use super::posix::PosixFile;
use super::{Extent, Storage};

/// Submission queue size. 128 keeps a 2-core machine's disk busy without pinning much
/// kernel memory; the completion queue gets the kernel default of twice this.
const RING_ENTRIES: u32 = 128;
/// Data operations in the kernel at once; the remaining entry is the eventfd read.
const MAX_IN_FLIGHT: usize = RING_ENTRIES as usize - 1;
/// Requests that may wait in the channel before callers block.
const REQUEST_QUEUE_DEPTH: usize = 256;
/// Largest single read or write the kernel performs (`MAX_RW_COUNT`); longer buffers are
/// split into several submissions through the short-transfer path.
const MAX_IO_BYTES: usize = 0x7fff_f000;
/// Consecutive EINTR/EAGAIN completions an operation may get before the error is final.
const MAX_RETRIES: u32 = 64;
/// Consecutive EAGAIN/EBUSY results from `io_uring_enter` tolerated before the ring is
/// declared broken, with [`BUSY_BACKOFF`] between them: about one second in total.
const MAX_BUSY_RETRIES: u32 = 1000;
const BUSY_BACKOFF: Duration = Duration::from_millis(1);
/// `user_data` of the eventfd read; data operations use their slot index.
const WAKE_TOKEN: u64 = u64::MAX;
/// eventfd adds the host-order u64 it is given, and any nonzero value wakes the reader, so
/// the byte order here is irrelevant.
const WAKE_INCREMENT: [u8; 8] = 1u64.to_le_bytes();
const THREAD_NAME: &str = "keel-uring";

const _: () = assert!(MAX_IN_FLIGHT >= 1);
const _: () = assert!(MAX_IN_FLIGHT < RING_ENTRIES as usize);
const _: () = assert!(MAX_IO_BYTES <= u32::MAX as usize);
const _: () = assert!((MAX_IN_FLIGHT as u64) < WAKE_TOKEN);

/// Handle to the io_uring thread. Cheap to share behind an `Arc`; dropping the last one
/// stops and joins the thread.
pub(crate) struct Ring {
    /// `None` only while dropping: closing the channel is the thread's stop signal.
    requests: Option<SyncSender<Request>>,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Ring {
    /// Sets up the ring on a new thread named `keel-uring` and checks that the kernel
    /// supports every opcode used here. Errors from `io_uring_setup` (ENOSYS without
    /// io_uring, EPERM from seccomp or `kernel.io_uring_disabled`, EACCES, ENOMEM) come
    /// back unchanged, so the caller can fall back to POSIX.
    pub(crate) fn start() -> io::Result<Ring> {
        let shared =
            Arc::new(Shared { parked: Mutex::new(false), wake: create_eventfd()?, accepted: Default::default() });
        let (requests, queue) = mpsc::sync_channel(REQUEST_QUEUE_DEPTH);
        let (setup_done, setup_result) = mpsc::sync_channel(1);
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name(THREAD_NAME.to_owned())
            .spawn(move || run_thread(thread_shared, queue, setup_done))?;
        let failure = match setup_result.recv() {
            Ok(Ok(())) => return Ok(Ring { requests: Some(requests), shared, thread: Some(thread) }),
            Ok(Err(e)) => e,
            Err(_) => io::Error::other("io_uring thread exited during setup"),
        };
        // The thread has returned or is about to; a panic there is already in `failure`.
        let _ = thread.join();
        Err(failure)
    }

    /// Reads into `buf` from `offset` and returns how many bytes were read: all of `buf`,
    /// or fewer when the file ends first. The caller zero-fills the rest.
    pub(crate) fn read_at(&self, fd: RawFd, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        check_range(offset, buf.len())?;
        self.call(fd, Op::Read { buf: buf.as_mut_ptr(), len: buf.len(), offset })
    }

    /// Writes all of `buf` at `offset`.
    pub(crate) fn write_at(&self, fd: RawFd, buf: &[u8], offset: u64) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        check_range(offset, buf.len())?;
        self.call(fd, Op::Write { buf: buf.as_ptr(), len: buf.len(), offset }).map(|_| ())
    }

    /// `fdatasync` through `IORING_FSYNC_DATASYNC`. It covers every write that completed
    /// before this call; the caller owns the fail-stop policy for its error.
    pub(crate) fn sync_data(&self, fd: RawFd) -> io::Result<()> {
        self.call(fd, Op::SyncData).map(|_| ())
    }

    /// Hands one operation to the ring thread and blocks until it has finished.
    ///
    /// This function is what keeps the buffer loan in `op` sound: it does not return
    /// until the reply arrives or its sender is dropped, and the ring thread does either
    /// only once the kernel is done with the buffer (see the module's invariants).
    fn call(&self, fd: RawFd, op: Op) -> io::Result<usize> {
        let requests = self.requests.as_ref().ok_or_else(stopped)?;
        let (reply, completion) = mpsc::sync_channel(1);
        requests.send(Request { fd, op, reply }).map_err(|_| stopped())?;
        self.shared.wake_if_parked();
        completion.recv().unwrap_or_else(|_| Err(stopped()))
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // No caller can be inside `call` (each holds this `Ring` through an `Arc`), so
        // closing the channel loses nothing: the thread still receives what is buffered
        // before it sees the disconnection, finishes everything, and returns.
        drop(self.requests.take());
        self.shared.wake();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("io_uring thread {THREAD_NAME} panicked");
            }
        }
    }
}

impl fmt::Debug for Ring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let running = self.thread.as_ref().is_some_and(|t| !t.is_finished());
        f.debug_struct("Ring")
            .field("thread", &THREAD_NAME)
            .field("ring_entries", &RING_ENTRIES)
            .field("running", &running)
            .finish_non_exhaustive()
    }
}

/// A file whose reads, writes and syncs go through the [`Ring`]; everything else is a
/// plain syscall on `inner`.
#[derive(Debug)]
pub(crate) struct UringFile {
    /// Owns the fd. The ring only borrows it for the duration of a blocking call on
    /// `&self`, so the fd stays open while the kernel uses it.
    inner: PosixFile,
    ring: Arc<Ring>,
    /// Try `RWF_NOWAIT` inline before the ring (always, except in tests of the ring).
    inline_first: bool,
}

impl UringFile {
    pub(crate) fn new(inner: PosixFile, ring: Arc<Ring>) -> Self {
        Self { inner, ring, inline_first: true }
    }

    /// A file whose every read and write goes through the ring, to test the ring itself.
    #[cfg(test)]
    fn ring_only(inner: PosixFile, ring: Arc<Ring>) -> Self {
        Self { inner, ring, inline_first: false }
    }
}

/// What goes through the ring, and why. The engine's callers are synchronous, so the ring
/// pays only for operations that would block for a long time anyway:
/// - syncs always go through the ring;
/// - reads first try `RWF_NOWAIT` inline (a page-cache hit) and use the ring on a miss;
/// - buffered writes are page-cache copies and run inline (`pwrite`/`pwritev`): ext4 does
///   not support `RWF_NOWAIT` for buffered writes (EOPNOTSUPP, checked on Linux 6.18), and
///   handing each copy to the ring thread measured 10x the CPU per 4 KiB write
///   (docs/benchmarks.md). They can still block in dirty-page throttling, which is the
///   backpressure a slow disk should exert.
impl Storage for UringFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let rest = &mut buf[done..];
            let inline = if self.inline_first { self.inner.read_nowait(rest, offset + done as u64)? } else { None };
            match inline {
                Some(0) => break, // end of file
                Some(n) => done += n,
                None => {
                    done += self.ring.read_at(self.inner.raw_fd(), rest, offset + done as u64)?;
                    break;
                }
            }
        }
        // Bytes past end of file read as zeros, as in `PosixFile::read_at`.
        if let Some(rest) = buf.get_mut(done..) {
            rest.fill(0);
        }
        Ok(())
    }

    /// Direct reads are plain syscalls: they block on the disk like the ring's reads,
    /// and a bulk reader runs on its own threads.
    fn read_uncached(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_uncached(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.inline_first {
            self.inner.write_at(buf, offset)
        } else {
            self.ring.write_at(self.inner.raw_fd(), buf, offset)
        }
    }

    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        if self.inline_first {
            self.inner.write_vectored_at(bufs, offset)
        } else {
            let mut at = offset;
            for buf in bufs {
                self.write_at(buf, at)?;
                at += buf.len() as u64;
            }
            Ok(())
        }
    }

    fn sync(&self) -> io::Result<()> {
        self.ring.sync_data(self.inner.raw_fd())
    }

    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.punch_hole(offset, len)
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.zero_range(offset, len)
    }

    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.allocate(offset, len)
    }

    fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        self.inner.extents(offset, len)
    }
}

/// State shared by the callers and the ring thread.
struct Shared {
    /// True while the ring thread waits in the kernel and wants an eventfd write for the
    /// next request. Held only to test-and-set the flag (and, on the thread, to check the
    /// channel once), never across a syscall.
    parked: Mutex<bool>,
    /// The eventfd whose armed read ends the thread's wait.
    wake: File,
    /// Operations handed to the kernel so far (first submissions), for status and for
    /// tests that wait until an operation is in the kernel.
    accepted: std::sync::atomic::AtomicU64,
}

impl Shared {
    fn wake_if_parked(&self) {
        let was_parked = std::mem::take(&mut *self.parked.lock());
        if was_parked {
            self.wake();
        }
    }

    fn wake(&self) {
        if let Err(e) = (&self.wake).write_all(&WAKE_INCREMENT) {
            // An eventfd write fails only if the counter would overflow, which the armed
            // read prevents; if it happens anyway the thread still wakes on its next
            // completion.
            tracing::error!("failed to wake the io_uring thread: {e}");
        }
    }
}

/// One operation as sent to the ring thread.
struct Request {
    fd: RawFd,
    op: Op,
    reply: SyncSender<io::Result<usize>>,
}

// SAFETY: the raw pointers in `op` are a loan of a buffer from a caller that stays blocked
// in `Ring::call` until the ring thread is done with them (module invariants). The ring
// thread never dereferences them; it only passes them to the kernel, so moving them to
// that thread creates no aliasing the caller's borrow does not already allow.
unsafe impl Send for Request {}

enum Op {
    /// The kernel writes `len` bytes at `buf`, borrowed mutably by the caller.
    Read {
        buf: *mut u8,
        len: usize,
        offset: u64,
    },
    /// The kernel reads `len` bytes at `buf`, borrowed shared by the caller.
    Write {
        buf: *const u8,
        len: usize,
        offset: u64,
    },
    SyncData,
    /// Makes the ring thread panic, to test that callers never hang or see freed buffers.
    #[cfg(test)]
    InjectPanic,
}

/// A request plus its progress while the kernel works on it.
struct InFlight {
    request: Request,
    /// Bytes transferred so far; the next submission starts here.
    done: usize,
    /// Consecutive EINTR/EAGAIN completions.
    retries: u32,
}

impl InFlight {
    fn len(&self) -> usize {
        match self.request.op {
            Op::Read { len, .. } | Op::Write { len, .. } => len,
            Op::SyncData => 0,
            #[cfg(test)]
            Op::InjectPanic => 0,
        }
    }

    /// The submission for the part not yet transferred. Building it is safe; pushing it
    /// is where the buffer loan is asserted.
    fn entry(&self, slot: usize) -> squeue::Entry {
        let fd = types::Fd(self.request.fd);
        let chunk = (self.len() - self.done).min(MAX_IO_BYTES) as u32;
        let entry = match self.request.op {
            Op::Read { buf, offset, .. } => {
                opcode::Read::new(fd, buf.wrapping_add(self.done), chunk).offset(offset + self.done as u64).build()
            }
            Op::Write { buf, offset, .. } => {
                opcode::Write::new(fd, buf.wrapping_add(self.done), chunk).offset(offset + self.done as u64).build()
            }
            Op::SyncData => opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build(),
            #[cfg(test)]
            Op::InjectPanic => opcode::Nop::new().build(),
        };
        entry.user_data(slot as u64)
    }

    /// Applies one completion. Returns the final result, or `None` when the remainder
    /// (or the same range, after EINTR/EAGAIN) must be submitted again.
    fn advance(&mut self, result: i32) -> Option<io::Result<usize>> {
        if result < 0 {
            let errno = -result;
            // Also for fsync: like std's `sync_data`, which retries EINTR, these mean the
            // operation did not run, so a retry is not the forbidden retry after failure.
            if is_transient(errno) && self.retries < MAX_RETRIES {
                self.retries += 1;
                return None;
            }
            return Some(Err(io::Error::from_raw_os_error(errno)));
        }
        self.retries = 0;
        let transferred = result as usize;
        let len = self.len();
        match self.request.op {
            Op::SyncData => Some(Ok(0)),
            #[cfg(test)]
            Op::InjectPanic => Some(Ok(0)),
            Op::Read { .. } if transferred == 0 => Some(Ok(self.done)),
            Op::Write { .. } if transferred == 0 => {
                Some(Err(io::Error::new(io::ErrorKind::WriteZero, "io_uring write transferred 0 bytes")))
            }
            Op::Read { .. } | Op::Write { .. } => {
                self.done = self.done.saturating_add(transferred).min(len);
                (self.done == len).then_some(Ok(len))
            }
        }
    }
}

/// Whether the completion may be resubmitted when it asks for it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Resubmit {
    Allowed,
    /// While quiescing: finish what the kernel returns, start nothing new.
    Refused,
}

/// The ring thread's state. Lives on that thread only.
struct Driver {
    ring: IoUring,
    shared: Arc<Shared>,
    /// Indexed by `user_data`; `Some` while the operation is in the kernel.
    slots: Vec<Option<InFlight>>,
    free_slots: Vec<usize>,
    in_flight: usize,
    /// Target of the armed eventfd read. Boxed so its address is stable.
    wake_buffer: Box<[u8; 8]>,
    wake_armed: bool,
    wake_retries: u32,
    busy_retries: u32,
    /// The channel is closed: finish what is in flight, then return.
    disconnected: bool,
    /// Reused buffer of `(user_data, result)` pairs, at most the completion queue's size.
    completions: Vec<(u64, i32)>,
}

fn run_thread(shared: Arc<Shared>, queue: Receiver<Request>, setup_done: SyncSender<io::Result<()>>) {
    let mut driver = match Driver::new(shared) {
        Ok(driver) => driver,
        Err(e) => {
            let _ = setup_done.send(Err(e));
            return;
        }
    };
    let _ = setup_done.send(Ok(()));
    if let Err(e) = driver.run(&queue) {
        tracing::error!(
            "io_uring thread stopping, every later read, write and sync on this \
             environment will fail: failed to submit to the ring: {e}"
        );
    }
    // `driver` drops (and quiesces) before `queue`, whose drop then fails every request
    // still waiting in the channel: those never reached the kernel.
}

impl Driver {
    fn new(shared: Arc<Shared>) -> io::Result<Self> {
        let ring = build_ring()?;
        check_opcodes(&ring)?;
        Ok(Self {
            ring,
            shared,
            slots: (0..MAX_IN_FLIGHT).map(|_| None).collect(),
            free_slots: (0..MAX_IN_FLIGHT).rev().collect(),
            in_flight: 0,
            wake_buffer: Box::new([0; 8]),
            wake_armed: false,
            wake_retries: 0,
            busy_retries: 0,
            disconnected: false,
            completions: Vec::with_capacity(2 * RING_ENTRIES as usize),
        })
    }

    /// Serves requests until the channel is closed and nothing is in flight. An error
    /// means the ring itself failed; the caller then drops the driver, which quiesces.
    fn run(&mut self, queue: &Receiver<Request>) -> io::Result<()> {
        loop {
            self.accept(queue);
            if self.disconnected && self.in_flight == 0 {
                return Ok(());
            }
            if !self.disconnected && !self.wake_armed {
                self.arm_wake()?;
            }
            let parked = if self.disconnected || self.in_flight >= MAX_IN_FLIGHT {
                // Closing the channel wakes us, and a full ring waits for completions.
                false
            } else {
                let mut parked = self.shared.parked.lock();
                match queue.try_recv() {
                    Ok(request) => {
                        drop(parked);
                        self.start(request);
                        continue;
                    }
                    Err(TryRecvError::Empty) => {
                        *parked = true;
                        true
                    }
                    Err(TryRecvError::Disconnected) => {
                        self.disconnected = true;
                        continue;
                    }
                }
            };
            self.submit_and_wait()?;
            if parked {
                *self.shared.parked.lock() = false;
            }
            self.reap(Resubmit::Allowed)?;
        }
    }

    /// Moves queued requests into the ring; at most [`MAX_IN_FLIGHT`] per call.
    fn accept(&mut self, queue: &Receiver<Request>) {
        while !self.disconnected && self.in_flight < MAX_IN_FLIGHT {
            match queue.try_recv() {
                Ok(request) => self.start(request),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => self.disconnected = true,
            }
        }
    }

    fn start(&mut self, request: Request) {
        #[cfg(test)]
        if matches!(request.op, Op::InjectPanic) {
            panic!("injected io_uring thread panic");
        }
        let Some(slot) = self.free_slots.pop() else {
            // Unreachable while `accept` respects MAX_IN_FLIGHT; fail, do not panic.
            let _ = request.reply.send(Err(io::Error::other("io_uring has no free slot")));
            return;
        };
        self.in_flight += 1;
        let operation = InFlight { request, done: 0, retries: 0 };
        self.submit(slot, operation);
        self.shared.accepted.fetch_add(1, std::sync::atomic::Ordering::Release);
    }

    /// Pushes the operation's next submission, or fails it if the queue refuses.
    fn submit(&mut self, slot: usize, operation: InFlight) {
        let entry = operation.entry(slot);
        // SAFETY: the entry points at a caller's buffer (or none, for fsync) and names
        // the caller's fd. That caller is blocked in `Ring::call`, holding the buffer
        // borrow and the file, until the reply for this operation is sent or dropped.
        // Both happen only after this submission's completion is reaped (`complete`) or,
        // if the ring thread stops, after `quiesce` has waited for that completion. So
        // the buffer and fd stay valid for as long as the kernel can use them.
        let pushed = unsafe { self.ring.submission().push(&entry) };
        match (pushed, self.slots.get_mut(slot)) {
            (Ok(()), Some(cell)) => *cell = Some(operation),
            (Ok(()), None) => {
                // Slot indices come from `free_slots`, all below `slots.len()`. Failing
                // the caller here would release a buffer the kernel now holds.
                tracing::error!("io_uring slot {slot} out of range; aborting");
                std::process::abort();
            }
            (Err(_), _) => {
                // Unreachable: in-flight operations never exceed the queue's size.
                self.finish(slot, operation, Err(io::Error::other("io_uring submission queue full")));
            }
        }
    }

    fn finish(&mut self, slot: usize, operation: InFlight, result: io::Result<usize>) {
        // The caller is blocked in `recv`, so this cannot fail or block (capacity 1).
        let _ = operation.request.reply.send(result);
        self.free_slots.push(slot);
        self.in_flight -= 1;
    }

    fn arm_wake(&mut self) -> io::Result<()> {
        let entry = opcode::Read::new(types::Fd(self.shared.wake.as_raw_fd()), self.wake_buffer.as_mut_ptr(), 8)
            .build()
            .user_data(WAKE_TOKEN);
        // SAFETY: the read targets `wake_buffer`, a heap allocation owned by this driver,
        // and the eventfd in `shared`, which this driver keeps alive through its `Arc`.
        // The driver is not dropped while `wake_armed` is set: `quiesce` completes the
        // read first.
        unsafe { self.ring.submission().push(&entry) }
            .map_err(|_| io::Error::other("io_uring submission queue full"))?;
        self.wake_armed = true;
        Ok(())
    }

    /// Submits pending entries and waits for at least one completion. Transient
    /// failures return `Ok` so the caller can reap and come back.
    fn submit_and_wait(&mut self) -> io::Result<()> {
        match self.ring.submit_and_wait(1) {
            Ok(_) => {
                self.busy_retries = 0;
                Ok(())
            }
            Err(e) => match e.raw_os_error() {
                Some(libc::EINTR) => Ok(()),
                Some(libc::EAGAIN | libc::EBUSY) if self.busy_retries < MAX_BUSY_RETRIES => {
                    self.busy_retries += 1;
                    std::thread::sleep(BUSY_BACKOFF);
                    Ok(())
                }
                _ => Err(e),
            },
        }
    }

    /// Handles every completion now in the queue. Keeps going after an error so that no
    /// reply is lost, and returns the last error.
    fn reap(&mut self, resubmit: Resubmit) -> io::Result<()> {
        let mut batch = std::mem::take(&mut self.completions);
        batch.clear();
        batch.extend(self.ring.completion().map(|cqe| (cqe.user_data(), cqe.result())));
        let mut outcome = Ok(());
        for &(user_data, result) in &batch {
            if let Err(e) = self.complete(user_data, result, resubmit) {
                outcome = Err(e);
            }
        }
        self.completions = batch;
        outcome
    }

    fn complete(&mut self, user_data: u64, result: i32, resubmit: Resubmit) -> io::Result<()> {
        if user_data == WAKE_TOKEN {
            return self.complete_wake(result);
        }
        let slot = usize::try_from(user_data).unwrap_or(usize::MAX);
        let Some(mut operation) = self.slots.get_mut(slot).and_then(Option::take) else {
            tracing::error!("io_uring completion for unknown operation {user_data}");
            return Ok(());
        };
        match operation.advance(result) {
            Some(result) => self.finish(slot, operation, result),
            None if resubmit == Resubmit::Allowed => self.submit(slot, operation),
            None => self.finish(slot, operation, Err(stopped())),
        }
        Ok(())
    }

    fn complete_wake(&mut self, result: i32) -> io::Result<()> {
        self.wake_armed = false;
        if result >= 0 {
            self.wake_retries = 0;
            return Ok(());
        }
        let errno = -result;
        if is_transient(errno) && self.wake_retries < MAX_RETRIES {
            self.wake_retries += 1;
            return Ok(());
        }
        // Without the wake read the thread could sleep through a request.
        Err(io::Error::from_raw_os_error(errno))
    }

    /// Waits until the kernel holds no submission of this driver, failing every operation
    /// that would need another submission. Bounded by the completion of at most
    /// [`MAX_IN_FLIGHT`] regular-file operations plus the eventfd read, which this
    /// function completes itself.
    fn quiesce(&mut self) {
        if self.wake_armed {
            self.shared.wake();
        }
        while self.in_flight > 0 || self.wake_armed {
            if let Err(e) = self.submit_and_wait() {
                tracing::error!(
                    "failed to wait for {} in-flight io_uring operations: {e}; aborting, \
                     because the kernel may still write into their buffers",
                    self.in_flight
                );
                std::process::abort();
            }
            // Errors here are about the wake read, which is not re-armed anyway.
            let _ = self.reap(Resubmit::Refused);
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // A panic while quiescing would drop the slots (and so release callers) while the
        // kernel may still use their buffers.
        let guard = AbortOnUnwind;
        self.quiesce();
        std::mem::forget(guard);
    }
}

struct AbortOnUnwind;

impl Drop for AbortOnUnwind {
    fn drop(&mut self) {
        tracing::error!("panic while draining io_uring operations; aborting");
        std::process::abort();
    }
}

/// Single issuer lets the kernel skip submission-side locking, and cooperative task running
/// saves an inter-processor interrupt per completion; they need Linux 6.0 and 5.19, so
/// older kernels (EINVAL) get a plain ring rather than a POSIX fallback. The ring is
/// created on the thread that uses it, as single issuer requires.
fn build_ring() -> io::Result<IoUring> {
    match IoUring::builder().setup_single_issuer().setup_coop_taskrun().build(RING_ENTRIES) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => IoUring::new(RING_ENTRIES),
        other => other,
    }
}

fn check_opcodes(ring: &IoUring) -> io::Result<()> {
    let mut probe = Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    for (code, name) in [
        (opcode::Read::CODE, "IORING_OP_READ"),
        (opcode::Write::CODE, "IORING_OP_WRITE"),
        (opcode::Fsync::CODE, "IORING_OP_FSYNC"),
    ] {
        if !probe.is_supported(code) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("io_uring does not support {name} on this kernel"),
            ));
        }
    }
    Ok(())
}

fn create_eventfd() -> io::Result<File> {
    // SAFETY: eventfd takes no pointers; a negative result is handled below.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by eventfd, so it is open and nothing else owns it.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// Offsets past `i64::MAX` are invalid for the kernel, and `u64::MAX` would even mean
/// "use the file position".
fn check_range(offset: u64, len: usize) -> io::Result<()> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= i64::MAX as u64 => Ok(()),
        _ => Err(io::Error::new(io::ErrorKind::InvalidInput, "offset too large")),
    }
}

fn is_transient(errno: i32) -> bool {
    errno == libc::EINTR || errno == libc::EAGAIN
}

fn stopped() -> io::Error {
    io::Error::other(format!("io_uring thread {THREAD_NAME} has stopped"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read as _, Seek as _, SeekFrom};
    use std::sync::Barrier;
    use std::thread;

    /// A ring, or `None` (with the reason printed) where the kernel refuses io_uring.
    /// Waits until `count` operations were handed to the kernel and the thread sits in
    /// the kernel again (parked), i.e. the operation is there, not queued.
    fn wait_until_in_kernel(ring: &Ring, count: u64) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while ring.shared.accepted.load(std::sync::atomic::Ordering::Acquire) < count || !*ring.shared.parked.lock() {
            assert!(std::time::Instant::now() < deadline, "the operation never reached the kernel");
            thread::yield_now();
        }
    }

    fn ring_or_skip() -> Option<Arc<Ring>> {
        match Ring::start() {
            Ok(ring) => Some(Arc::new(ring)),
            Err(e) => {
                eprintln!("skipping: io_uring unavailable here: {e}");
                None
            }
        }
    }

    /// An anonymous temporary file behind the ring, plus a second handle for checks.
    fn temp_file(ring: &Arc<Ring>) -> (UringFile, File) {
        let file = tempfile::tempfile().expect("create temp file");
        let check = file.try_clone().expect("clone temp file");
        (UringFile::ring_only(PosixFile::new(file), Arc::clone(ring)), check)
    }

    fn pattern(seed: u64, len: usize) -> Vec<u8> {
        let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 32) as u8
            })
            .collect()
    }

    fn pipe() -> (File, File) {
        let mut fds = [0; 2];
        // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
        assert_eq!(rc, 0, "pipe2: {}", io::Error::last_os_error());
        // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
        unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
    }

    #[test]
    fn round_trip_at_various_offsets_and_sizes() {
        let Some(ring) = ring_or_skip() else { return };
        let (file, mut check) = temp_file(&ring);
        let mut model = Vec::new();
        let cases: [(u64, usize); 8] = [
            (0, 1),
            (1, 4095),
            (4096, 4096),
            (5000, 1),
            (12_345, (1 << 20) + 17),
            ((3 << 20) + 3, (3 << 20) - 5),
            (100, 0),
            (7, 65_536),
        ];
        for (index, &(offset, len)) in cases.iter().enumerate() {
            let data = pattern(index as u64, len);
            file.write_at(&data, offset).unwrap();
            let start = offset as usize;
            if model.len() < start + len {
                model.resize(start + len, 0);
            }
            model[start..start + len].copy_from_slice(&data);

            let mut back = vec![0xAA; len];
            file.read_at(&mut back, offset).unwrap();
            assert!(back == data, "read back at {offset}+{len}");
        }
        assert_eq!(file.len().unwrap(), model.len() as u64);

        let mut whole = vec![0xAA; model.len()];
        file.read_at(&mut whole, 0).unwrap();
        assert!(whole == model, "whole file through the ring");

        let mut posix = Vec::new();
        check.seek(SeekFrom::Start(0)).unwrap();
        check.read_to_end(&mut posix).unwrap();
        assert!(posix == model, "whole file through read(2)");
    }

    #[test]
    fn read_past_eof_zero_fills() {
        let Some(ring) = ring_or_skip() else { return };
        let (file, _check) = temp_file(&ring);
        let data = pattern(1, 100);
        file.write_at(&data, 0).unwrap();

        let mut straddling = vec![0xAA; 4096];
        file.read_at(&mut straddling, 0).unwrap();
        assert_eq!(&straddling[..100], &data[..]);
        assert!(straddling[100..].iter().all(|&b| b == 0));

        let mut beyond = vec![0xAA; 3 << 20];
        file.read_at(&mut beyond, 1 << 20).unwrap();
        assert!(beyond.iter().all(|&b| b == 0));

        assert_eq!(file.len().unwrap(), 100, "reads do not extend the file");
    }

    #[test]
    fn sync_succeeds() {
        let Some(ring) = ring_or_skip() else { return };
        let (file, _check) = temp_file(&ring);
        file.sync().unwrap();
        file.write_at(&pattern(2, 8192), 4096).unwrap();
        file.sync().unwrap();
    }

    #[test]
    fn metadata_operations_delegate_to_posix() {
        let Some(ring) = ring_or_skip() else { return };
        let (file, _check) = temp_file(&ring);
        file.set_len(1 << 20).unwrap();
        assert_eq!(file.len().unwrap(), 1 << 20);
        file.write_at(&[7; 4096], 0).unwrap();
        file.punch_hole(0, 4096).unwrap();
        let mut back = [0xAA; 4096];
        file.read_at(&mut back, 0).unwrap();
        assert_eq!(back, [0; 4096]);
        let extents = file.extents(0, 1 << 20).unwrap();
        assert_eq!(extents.iter().map(|e| e.len).sum::<u64>(), 1 << 20);
    }

    #[test]
    fn errors_come_back_and_the_ring_keeps_working() {
        let Some(ring) = ring_or_skip() else { return };
        let error = ring.read_at(-1, &mut [0; 16], 0).unwrap_err();
        assert_eq!(error.raw_os_error(), Some(libc::EBADF));

        let read_only = File::open("/proc/self/exe").unwrap();
        let error = ring.write_at(read_only.as_raw_fd(), &[1; 16], 0).unwrap_err();
        assert_eq!(error.raw_os_error(), Some(libc::EBADF));

        let error = ring.read_at(-1, &mut [0; 16], u64::MAX - 4).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput);

        let (file, _check) = temp_file(&ring);
        file.write_at(b"still works", 0).unwrap();
        let mut back = [0; 11];
        file.read_at(&mut back, 0).unwrap();
        assert_eq!(&back, b"still works");
    }

    #[test]
    fn eight_threads_of_concurrent_requests_keep_their_data() {
        const THREADS: u64 = 8;
        const ITERATIONS: u64 = 300;
        const REGION: u64 = 1 << 20;
        let Some(ring) = ring_or_skip() else { return };
        let (file, _check) = temp_file(&ring);
        let file = Arc::new(file);
        let workers: Vec<_> = (0..THREADS)
            .map(|t| {
                let file = Arc::clone(&file);
                thread::spawn(move || {
                    let base = t * REGION;
                    let mut model = vec![0u8; REGION as usize];
                    for i in 0..ITERATIONS {
                        let seed = t * 1_000_000 + i;
                        let len = 1 + (seed * 7919 % 65_536) as usize;
                        let start = (seed * 104_729) % (REGION - len as u64);
                        let data = pattern(seed, len);
                        file.write_at(&data, base + start).unwrap();
                        let range = start as usize..start as usize + len;
                        model[range.clone()].copy_from_slice(&data);
                        let mut back = vec![0xAA; len];
                        file.read_at(&mut back, base + start).unwrap();
                        assert!(back == data, "thread {t} iteration {i}");
                        if i % 32 == 0 {
                            file.sync().unwrap();
                        }
                    }
                    model
                })
            })
            .collect();
        let models: Vec<Vec<u8>> = workers.into_iter().map(|w| w.join().unwrap()).collect();
        for (t, model) in models.iter().enumerate() {
            let mut back = vec![0xAA; REGION as usize];
            file.read_at(&mut back, t as u64 * REGION).unwrap();
            assert!(&back == model, "region of thread {t}");
        }
    }

    #[test]
    fn more_callers_than_ring_slots() {
        const THREADS: usize = MAX_IN_FLIGHT + 73;
        let Some(ring) = ring_or_skip() else { return };
        let (file, _check) = temp_file(&ring);
        let file = Arc::new(file);
        let barrier = Arc::new(Barrier::new(THREADS));
        let workers: Vec<_> = (0..THREADS)
            .map(|t| {
                let file = Arc::clone(&file);
                let barrier = Arc::clone(&barrier);
                thread::spawn(move || {
                    let data = pattern(t as u64, 4096);
                    barrier.wait();
                    for round in 0..4u64 {
                        let offset = (round * THREADS as u64 + t as u64) * 4096;
                        file.write_at(&data, offset).unwrap();
                    }
                })
            })
            .collect();
        for worker in workers {
            worker.join().unwrap();
        }
        for t in 0..THREADS {
            let mut back = vec![0; 4096];
            file.read_at(&mut back, (3 * THREADS + t) as u64 * 4096).unwrap();
            assert!(back == pattern(t as u64, 4096), "thread {t}");
        }
    }

    /// The thread must not sit in the kernel waiting for a slow operation while new
    /// requests queue up. A read of an empty pipe stands in for a slow fsync.
    #[test]
    fn new_requests_are_served_while_another_waits_in_the_kernel() {
        let Some(ring) = ring_or_skip() else { return };
        let (reader, mut writer) = pipe();
        let slow = {
            let ring = Arc::clone(&ring);
            thread::spawn(move || {
                let mut buf = [0u8; 8];
                let filled = ring.read_at(reader.as_raw_fd(), &mut buf, 0);
                (filled.map_err(|e| e.to_string()), buf)
            })
        };
        wait_until_in_kernel(&ring, 1);

        let (file, _check) = temp_file(&ring);
        let (done, finished) = mpsc::channel();
        let fast = thread::spawn(move || {
            file.write_at(b"fast", 0).unwrap();
            done.send(()).unwrap();
        });
        let served = finished.recv_timeout(Duration::from_secs(10));

        writer.write_all(b"pipedata").unwrap();
        let (filled, buf) = slow.join().unwrap();
        fast.join().unwrap();
        assert!(served.is_ok(), "write waited behind the pipe read");
        assert_eq!(filled, Ok(8));
        assert_eq!(&buf, b"pipedata");
    }

    #[test]
    fn dropping_the_ring_joins_its_thread() {
        let Some(ring) = ring_or_skip() else { return };
        let name = ring.thread.as_ref().and_then(|t| t.thread().name());
        assert_eq!(name, Some(THREAD_NAME));
        let (file, _check) = temp_file(&ring);
        let file = Arc::new(file);
        let workers: Vec<_> = (0..4u64)
            .map(|t| {
                let file = Arc::clone(&file);
                thread::spawn(move || {
                    for i in 0..50 {
                        file.write_at(&pattern(t, 512), t * 512 + i).unwrap();
                    }
                })
            })
            .collect();
        for worker in workers {
            worker.join().unwrap();
        }
        // The thread holds the only other reference to `shared`; once the drop returns it
        // must be gone, so the thread has run to completion.
        let shared = Arc::downgrade(&ring.shared);
        drop(ring);
        assert!(shared.upgrade().is_some(), "the file still holds the ring");
        drop(file);
        assert!(shared.upgrade().is_none(), "ring thread still alive after drop");
    }

    /// If the ring thread dies, callers get errors instead of hanging, and a caller whose
    /// buffer the kernel holds is released only once the kernel is done with it.
    #[test]
    fn a_dead_ring_thread_fails_callers_after_the_kernel_is_done() {
        let Some(ring) = ring_or_skip() else { return };
        let (reader, mut writer) = pipe();
        let in_kernel = {
            let ring = Arc::clone(&ring);
            thread::spawn(move || {
                let mut buf = [0u8; 8];
                let result = ring.read_at(reader.as_raw_fd(), &mut buf, 0);
                (result.map_err(|e| e.to_string()), buf)
            })
        };
        wait_until_in_kernel(&ring, 1);

        let injected = ring.call(-1, Op::InjectPanic);
        assert!(injected.is_err());
        // A negative check (the caller must stay blocked) needs a window to fail in; the
        // positive waits in these tests wait on state instead.
        thread::sleep(Duration::from_millis(100));
        assert!(!in_kernel.is_finished(), "caller released while its read was still in the kernel");

        writer.write_all(b"pipedata").unwrap();
        let (result, buf) = in_kernel.join().unwrap();
        assert_eq!(result, Ok(8), "completed reads still deliver their result");
        assert_eq!(&buf, b"pipedata");

        let (file, _check) = temp_file(&ring);
        let error = file.write_at(b"late", 0).unwrap_err();
        assert!(error.to_string().contains("has stopped"), "{error}");
        drop(file);
        drop(ring);
    }
}
