//! CPU priority of background work. A snapshot's sealing threads, its readers between
//! their reads, and a node's copies to its vaults run below every normal thread, so the
//! volume's writers (the journal, replication, FLUSH acknowledgements) never wait for a CPU
//! one of them holds.
//!
//! Only work that shares no lock with the write path may be lowered: a thread in
//! `SCHED_IDLE` can wait long for a CPU, and a writer waiting for a lock it holds would
//! wait as long (a priority inversion). A snapshot's reads and releases take the frozen
//! view's stripe locks and the kernel's locks of the block store's and the copy's files,
//! so a reader is [`Lowered`]: idle while it waits and hands over, back at its own
//! priority for each read and release. That needs the right to leave `SCHED_IDLE`
//! (`CAP_SYS_NICE`, or an `RLIMIT_NICE` allowing the thread's nice value); without it the
//! readers keep their priority throughout.
//!
//! Linux's `SCHED_IDLE` does this: a normal thread that wakes up preempts an idle-policy
//! one at once, and idle-policy threads share what normal threads leave (a machine whose
//! CPUs are saturated by normal threads still gives them a small share, about 0.3 %, so
//! a snapshot slows down there but does not stop). Measured in docs/benchmarks.md
//! ("Primary write p99 during a snapshot").

use std::fmt;
use std::str::FromStr;

/// The CPU priority of a snapshot's threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CpuPriority {
    /// `SCHED_IDLE`: run only when no normal thread wants the CPU (the default).
    #[default]
    Idle,
    /// The priority of the calling thread.
    Normal,
}

impl FromStr for CpuPriority {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "idle" => Ok(CpuPriority::Idle),
            "normal" => Ok(CpuPriority::Normal),
            other => Err(format!("{other:?}: expected \"idle\" or \"normal\"")),
        }
    }
}

impl fmt::Display for CpuPriority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CpuPriority::Idle => "idle",
            CpuPriority::Normal => "normal",
        })
    }
}

/// Puts the calling thread at `priority` for the rest of its life: only for a thread that
/// ends with the work (a scoped worker), never a pooled one. Not lowered (not Linux, or
/// refused), it keeps its priority.
pub(crate) fn lower(priority: CpuPriority) {
    if priority == CpuPriority::Idle {
        // Not lowered: the work runs at the caller's priority, as it would with Normal.
        let _ = lower_to_idle();
    }
}

/// A thread that runs at `priority` except inside [`Lowered::normal`] sections, which run
/// at the thread's own priority again. For a thread that takes locks the write path also
/// takes: it takes them only inside such sections, so a writer never waits for a lock held
/// by a thread that waits for a CPU.
pub(crate) struct Lowered {
    /// The thread's own scheduling policy, to go back to for a section; `None` when the
    /// thread was not lowered.
    own: Option<i32>,
}

impl Lowered {
    /// Lowers the calling thread, for the rest of its life (a scoped worker, never a pooled
    /// thread), if `priority` is `Idle` and this process may raise a thread back out of
    /// `SCHED_IDLE` (`CAP_SYS_NICE`, or an `RLIMIT_NICE` that allows the thread's nice
    /// value), and the thread runs in `SCHED_OTHER` or `SCHED_BATCH` (never a real-time
    /// thread). Otherwise the thread keeps its priority throughout.
    pub(crate) fn new(priority: CpuPriority) -> Lowered {
        let own = own_policy().filter(|_| priority == CpuPriority::Idle && may_raise());
        Lowered { own: own.filter(|_| lower_to_idle().is_ok()) }
    }

    /// Runs `work` at the thread's own priority.
    pub(crate) fn normal<T>(&self, work: impl FnOnce() -> T) -> T {
        let Some(own) = self.own else { return work() };
        // Does not fail once the probe in `may_raise` passed. Should it, the section runs
        // idle, as the sealing threads do: correct, only exposed to the inversion above.
        let _ = set_policy(own);
        let out = work();
        let _ = lower_to_idle();
        out
    }
}

/// Whether a thread in `SCHED_IDLE` may go back to `SCHED_OTHER` (tried once, on a
/// thread of its own).
pub(crate) fn may_raise() -> bool {
    static MAY_RAISE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *MAY_RAISE.get_or_init(|| {
        std::thread::Builder::new()
            .name("keel-probe".into())
            .spawn(|| own_policy().is_some_and(|own| lower_to_idle().is_ok() && set_policy(own).is_ok()))
            .ok()
            .and_then(|probe| probe.join().ok())
            .unwrap_or(false)
    })
}

/// Runs `work` at `priority` and returns what it returns; the threads `work` starts
/// inherit the priority. `Idle` runs it on a thread of its own, which lowers itself first
/// (a thread cannot always raise itself back, so a caller's thread, perhaps a pooled one,
/// is never lowered). Should that thread not start, or not lower itself, `work` still runs,
/// at the caller's priority. A panic in `work` resumes in the caller.
pub fn run_at<T: Send>(priority: CpuPriority, work: impl FnOnce() -> T + Send) -> T {
    if priority == CpuPriority::Normal {
        return work();
    }
    let slot = std::sync::Mutex::new(Some(work));
    let slot = &slot;
    let take = || slot.lock().unwrap_or_else(|p| p.into_inner()).take();
    std::thread::scope(|scope| {
        let spawned = std::thread::Builder::new().name("keel-idle".into()).spawn_scoped(scope, move || {
            lower(priority);
            take().map(|work| work())
        });
        let done = match spawned {
            Ok(thread) => thread.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
            Err(_) => None,
        };
        // `None`: the thread did not start, so the work is still in its slot.
        done.or_else(|| take().map(|work| work())).expect("the work runs on the spawned thread or here, once")
    })
}

/// Puts the calling thread in `SCHED_IDLE` (its nice value is kept for its way back).
fn lower_to_idle() -> std::io::Result<()> {
    set_policy(SCHED_IDLE)
}

#[cfg(target_os = "linux")]
const SCHED_IDLE: i32 = libc::SCHED_IDLE;
#[cfg(not(target_os = "linux"))]
const SCHED_IDLE: i32 = -1;

/// The calling thread's scheduling policy, if it is one a thread may be lowered from and
/// raised back to: `SCHED_OTHER` or `SCHED_BATCH`.
#[cfg(target_os = "linux")]
fn own_policy() -> Option<i32> {
    // SAFETY: no arguments but this thread's id.
    let policy = unsafe { libc::sched_getscheduler(0) };
    [libc::SCHED_OTHER, libc::SCHED_BATCH].contains(&policy).then_some(policy)
}

#[cfg(not(target_os = "linux"))]
fn own_policy() -> Option<i32> {
    None
}

/// Puts the calling thread in the (non-real-time) scheduling `policy`.
#[cfg(target_os = "linux")]
fn set_policy(policy: i32) -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler only reads `param`, a valid local; pid 0 is this thread.
    let rc = unsafe { libc::sched_setscheduler(0, policy, &param) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn set_policy(_policy: i32) -> std::io::Result<()> {
    Err(std::io::Error::new(std::io::ErrorKind::Unsupported, "SCHED_IDLE is Linux's"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    fn policy() -> i32 {
        // SAFETY: no arguments but this thread's id.
        unsafe { libc::sched_getscheduler(0) }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn idle_work_and_its_threads_run_in_sched_idle_and_the_caller_is_untouched() {
        let refused = std::thread::spawn(lower_to_idle).join().unwrap().err();
        if let Some(e) = refused {
            eprintln!("skipped: this sandbox refuses SCHED_IDLE ({e}); the work runs at normal priority");
            return;
        }
        let before = policy();
        let (inside, child) = run_at(CpuPriority::Idle, || (policy(), std::thread::spawn(policy).join().unwrap()));
        assert_eq!(inside, libc::SCHED_IDLE);
        assert_eq!(child, libc::SCHED_IDLE, "threads the work starts inherit it");
        assert_eq!(policy(), before, "the caller's thread keeps its policy");
        assert_eq!(run_at(CpuPriority::Normal, policy), before);
        let lowered = std::thread::spawn(|| {
            lower(CpuPriority::Normal);
            let normal = policy();
            lower(CpuPriority::Idle);
            (normal, policy())
        });
        assert_eq!(lowered.join().unwrap(), (before, libc::SCHED_IDLE));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_lowered_thread_runs_its_normal_sections_at_its_own_priority() {
        let before = policy();
        let seen = std::thread::spawn(|| {
            let lowered = Lowered::new(CpuPriority::Idle);
            let (outside, inside) = (policy(), lowered.normal(policy));
            (outside, inside, policy())
        });
        let (outside, inside, after) = seen.join().unwrap();
        let kept = std::thread::spawn(|| {
            let kept = Lowered::new(CpuPriority::Normal);
            (policy(), kept.normal(policy))
        });
        let (normal, normal_inside) = kept.join().unwrap();
        if may_raise() {
            assert_eq!((outside, inside, after), (libc::SCHED_IDLE, before, libc::SCHED_IDLE));
        } else {
            eprintln!("this process may not leave SCHED_IDLE: lowered threads keep their priority");
            assert_eq!((outside, inside, after), (before, before, before));
        }
        assert_eq!((normal, normal_inside), (before, before));
    }

    #[test]
    fn a_panic_in_idle_work_reaches_the_caller() {
        let caught = std::panic::catch_unwind(|| run_at(CpuPriority::Idle, || panic!("boom")));
        let payload = caught.expect_err("the panic comes back");
        assert_eq!(payload.downcast_ref::<&str>(), Some(&"boom"));
    }

    #[test]
    fn priorities_parse_and_print() {
        for p in [CpuPriority::Idle, CpuPriority::Normal] {
            assert_eq!(p.to_string().parse::<CpuPriority>(), Ok(p));
        }
        assert!("low".parse::<CpuPriority>().unwrap_err().contains("\"idle\" or \"normal\""));
        assert_eq!(CpuPriority::default(), CpuPriority::Idle);
    }
}
