//! Group commit: concurrent flushers share one `fdatasync`.
//!
//! The tracker holds the durable watermark. A flusher whose target is not yet durable
//! either becomes the *leader* (no sync in flight: it runs one sync, which covers every
//! record written up to the moment the sync started) or waits for the sync in flight and
//! re-checks. A flusher therefore syncs at most once, and every flusher that arrives while
//! a sync runs is served by at most the next one.
//!
//! A rewind (which discards the journal's unconfirmed tail, see `Volume::rewind`) runs
//! through [`DurableTracker::exclusive`]: it waits for the sync in flight, keeps new ones
//! from starting while it moves the journal back, and then lowers the watermark. So no
//! sync that started before the rewind can raise the watermark past the rewound seq
//! afterwards, and a flusher whose target was discarded gets [`WaitError::Unreachable`]
//! instead of syncing forever.
//!
//! # Invariants
//! - `durable_seq` never decreases, except when a rewind sets it.
//! - No flusher returns `Ok` before `durable_seq >= target`.
//! - At most one sync (or rewind) runs at a time.
//! - After a failed sync the tracker is poisoned: every waiter, present and future, gets
//!   the error, and nobody syncs again (a failed fsync may have dropped dirty pages; a
//!   retry that "succeeds" would lie).
//!
//! The loom model in this file's tests checks these with real thread interleavings.

use crate::sync::{Condvar, Mutex};

/// The durable watermark and the single-leader sync protocol.
#[derive(Debug)]
pub(crate) struct DurableTracker {
    state: Mutex<State>,
    changed: Condvar,
}

/// Why a flusher's target did not become durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum WaitError {
    /// A sync failed; the cause, reported to every waiter from now on.
    Poisoned(String),
    /// A sync covering every record written so far ended below the target: a rewind
    /// discarded the records the target named, so they will never be durable.
    Unreachable {
        /// The watermark after that sync.
        durable_seq: u64,
    },
}

#[derive(Debug)]
struct State {
    durable_seq: u64,
    syncing: bool,
    poisoned: Option<String>,
}

impl DurableTracker {
    pub(crate) fn new(durable_seq: u64) -> Self {
        Self { state: Mutex::new(State { durable_seq, syncing: false, poisoned: None }), changed: Condvar::new() }
    }

    pub(crate) fn durable_seq(&self) -> u64 {
        self.lock().durable_seq
    }

    /// Returns once every record up to `target` is durable. `sync` makes durable every
    /// record written so far and returns the highest seq it covered; it must cover every
    /// record that was written before it was called.
    pub(crate) fn wait_durable(&self, target: u64, sync: impl Fn() -> Result<u64, String>) -> Result<u64, WaitError> {
        let mut state = self.lock();
        loop {
            if let Some(cause) = &state.poisoned {
                return Err(WaitError::Poisoned(cause.clone()));
            }
            if state.durable_seq >= target {
                return Ok(state.durable_seq);
            }
            if !state.syncing {
                state.syncing = true;
                drop(state);
                let outcome = sync();
                state = self.lock();
                state.syncing = false;
                let unreachable = match outcome {
                    Ok(covered) => {
                        state.durable_seq = state.durable_seq.max(covered);
                        // `sync` covered every record written before it started, which
                        // includes the target unless a rewind discarded it.
                        covered < target
                    }
                    Err(cause) => {
                        state.poisoned = Some(cause);
                        false
                    }
                };
                self.changed.notify_all();
                if unreachable && state.poisoned.is_none() && state.durable_seq < target {
                    return Err(WaitError::Unreachable { durable_seq: state.durable_seq });
                }
                continue;
            }
            state = self.changed.wait(state).unwrap_or_else(|poison| poison.into_inner());
        }
    }

    /// Runs `rewind` while no sync is in flight and none can start, then sets the
    /// watermark to the seq it returns, if any, which may be lower than the current one
    /// (the records above it were discarded). A sync in flight when this is called
    /// finishes first, so its coverage cannot be applied after the rewind.
    pub(crate) fn exclusive<T, E>(&self, rewind: impl FnOnce() -> Result<(T, Option<u64>), E>) -> Result<T, E> {
        let mut state = self.lock();
        while state.syncing {
            state = self.changed.wait(state).unwrap_or_else(|poison| poison.into_inner());
        }
        state.syncing = true;
        drop(state);
        let outcome = rewind();
        let mut state = self.lock();
        state.syncing = false;
        let result = outcome.map(|(value, durable_seq)| {
            if let Some(durable_seq) = durable_seq {
                state.durable_seq = durable_seq;
            }
            value
        });
        self.changed.notify_all();
        result
    }

    /// Poisons the tracker so every waiter fails.
    pub(crate) fn poison(&self, cause: String) {
        let mut state = self.lock();
        state.poisoned.get_or_insert(cause);
        self.changed.notify_all();
    }

    fn lock(&self) -> crate::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poison| poison.into_inner())
    }
}

#[cfg(all(test, not(keel_loom)))]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    use super::*;

    #[test]
    fn concurrent_flushers_share_syncs() {
        let tracker = Arc::new(DurableTracker::new(0));
        let written = Arc::new(AtomicU64::new(0));
        let syncs = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (tracker, written, syncs) = (tracker.clone(), written.clone(), syncs.clone());
                std::thread::spawn(move || {
                    for _ in 0..200 {
                        let target = written.fetch_add(1, Ordering::SeqCst) + 1;
                        let durable = tracker
                            .wait_durable(target, || {
                                syncs.fetch_add(1, Ordering::SeqCst);
                                std::thread::yield_now();
                                Ok(written.load(Ordering::SeqCst))
                            })
                            .unwrap();
                        assert!(durable >= target);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(tracker.durable_seq(), 1600);
        assert!(syncs.load(Ordering::SeqCst) <= 1600);
    }

    #[test]
    fn a_failed_sync_poisons_every_later_flush() {
        let tracker = DurableTracker::new(0);
        let eio = Err(WaitError::Poisoned("EIO".into()));
        assert_eq!(tracker.wait_durable(1, || Err("EIO".into())), eio);
        // The next flush must not sync again: a retried fsync could report success for
        // pages the kernel already dropped.
        assert_eq!(tracker.wait_durable(1, || panic!("synced after poison")), eio);
        assert_eq!(tracker.wait_durable(0, || Ok(0)), eio);
    }

    #[test]
    fn a_rewind_lowers_the_watermark_and_fails_discarded_targets() {
        let tracker = DurableTracker::new(10);
        let kept = tracker.exclusive(|| Ok::<_, ()>(("done", Some(4)))).unwrap();
        assert_eq!(kept, "done");
        assert_eq!(tracker.durable_seq(), 4);
        // Seq 7 was discarded: the sync covers everything written (seq 5) and stops there.
        assert_eq!(tracker.wait_durable(7, || Ok(5)), Err(WaitError::Unreachable { durable_seq: 5 }));
        assert_eq!(tracker.wait_durable(5, || panic!("already durable")), Ok(5));
        // A failed rewind leaves the watermark alone.
        assert_eq!(tracker.exclusive(|| Err::<((), Option<u64>), _>("EIO")), Err("EIO"));
        assert_eq!(tracker.durable_seq(), 5);
    }
}

#[cfg(all(test, keel_loom))]
mod loom_tests {
    //! Run with `RUSTFLAGS="--cfg keel_loom" LOOM_MAX_PREEMPTIONS=2 cargo test -p keel-engine --release --lib loom`.
    use loom::sync::atomic::{AtomicU64, Ordering};
    use loom::sync::Arc;

    use super::*;

    #[test]
    fn loom_group_commit_never_returns_early_and_never_hangs() {
        loom::model(|| {
            let tracker = Arc::new(DurableTracker::new(0));
            // `written` is the journal's write watermark; `synced` is what actually reached
            // stable storage in this model.
            let written = Arc::new(AtomicU64::new(0));
            let synced = Arc::new(AtomicU64::new(0));
            let flusher = |tracker: Arc<DurableTracker>, written: Arc<AtomicU64>, synced: Arc<AtomicU64>| {
                move || {
                    let target = written.fetch_add(1, Ordering::SeqCst) + 1;
                    let sync = || {
                        let upto = written.load(Ordering::SeqCst);
                        synced.fetch_max(upto, Ordering::SeqCst);
                        Ok(upto)
                    };
                    let durable = tracker.wait_durable(target, sync).unwrap();
                    assert!(durable >= target);
                    assert!(synced.load(Ordering::SeqCst) >= target, "returned before its record was synced");
                }
            };
            let a = loom::thread::spawn(flusher(tracker.clone(), written.clone(), synced.clone()));
            let b = loom::thread::spawn(flusher(tracker.clone(), written.clone(), synced.clone()));
            flusher(tracker.clone(), written.clone(), synced.clone())();
            a.join().unwrap();
            b.join().unwrap();
            assert_eq!(tracker.durable_seq(), 3);
        });
    }

    /// A flusher racing a rewind never hangs and never returns `Ok` for a discarded
    /// record, and the watermark never ends above what was written.
    #[test]
    fn loom_rewind_racing_a_flush() {
        loom::model(|| {
            let tracker = Arc::new(DurableTracker::new(0));
            let written = Arc::new(AtomicU64::new(2));
            let synced = Arc::new(AtomicU64::new(0));
            let (t, w, s) = (tracker.clone(), written.clone(), synced.clone());
            let flusher = loom::thread::spawn(move || {
                let sync = || {
                    let upto = w.load(Ordering::SeqCst);
                    s.fetch_max(upto, Ordering::SeqCst);
                    Ok(upto)
                };
                match t.wait_durable(2, sync) {
                    Ok(durable) => assert!(durable >= 2),
                    Err(e) => assert_eq!(e, WaitError::Unreachable { durable_seq: 1 }),
                }
            });
            tracker
                .exclusive(|| {
                    written.store(1, Ordering::SeqCst);
                    Ok::<_, ()>(((), Some(1)))
                })
                .unwrap();
            flusher.join().unwrap();
            assert_eq!(tracker.durable_seq(), 1);
        });
    }

    #[test]
    fn loom_poison_reaches_every_waiter() {
        loom::model(|| {
            let tracker = Arc::new(DurableTracker::new(0));
            let t = tracker.clone();
            let a = loom::thread::spawn(move || t.wait_durable(1, || Err("EIO".to_string())));
            let b = tracker.wait_durable(2, || Err("EIO".to_string()));
            assert!(b.is_err());
            assert!(a.join().unwrap().is_err());
        });
    }
}
