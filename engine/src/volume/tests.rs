//! Barrier forms in recovery. These need the journal's test-only knob that writes
//! barriers the old way (taking a seq of their own), so they live inside the crate.

use std::path::Path;
use std::sync::Arc;

use crate::format::{RecordHeader, SEGMENT_HEADER_LEN};
use crate::testing::FaultyEnv;
use crate::{Error, OpenOptions, PersistMode, RecoveryReport, Volume, VolumeOptions};

const SIZE: u64 = 4 << 20;

fn options() -> VolumeOptions {
    VolumeOptions {
        segment_bytes: 1 << 20,
        segment_count_max: 4,
        change_region_bytes: 64 << 10,
        extent_file_bytes: 1 << 20,
    }
}

fn open(env: &FaultyEnv, dir: &Path) -> crate::Result<(Volume, RecoveryReport)> {
    let options = OpenOptions { background_checkpoints: false, ..OpenOptions::default() };
    Volume::open(Arc::new(env.clone()), dir, &options)
}

fn create(env: &FaultyEnv, dir: &Path, legacy_barriers: bool) -> Volume {
    Volume::create(Arc::new(env.clone()), dir, "t", SIZE, &options()).unwrap();
    let (volume, _) = open(env, dir).unwrap();
    volume.inner.journal.write_legacy_barriers(legacy_barriers);
    volume
}

fn read_all(volume: &Volume) -> Vec<u8> {
    let mut buf = vec![0u8; SIZE as usize];
    volume.read(0, &mut buf).unwrap();
    buf
}

/// Simulates a power cut that keeps the page cache (so every appended record survives).
fn kill(volume: Volume, env: &FaultyEnv) {
    std::mem::forget(volume);
    env.kill_process();
}

fn first_slot(dir: &str) -> std::path::PathBuf {
    Path::new(dir).join("journal/slot-0000.seg")
}

/// Writes `count` 4 KiB blocks starting at block `first`, each filled with its index.
fn write_blocks(volume: &Volume, model: &mut [u8], first: u64, count: u64, flush_every: u64) {
    for i in first..first + count {
        let at = (i % (SIZE / 4096)) * 4096;
        volume.write(at, &[i as u8; 4096], PersistMode::Buffered).unwrap();
        model[at as usize..at as usize + 4096].fill(i as u8);
        if i % flush_every == 0 {
            volume.flush().unwrap();
        }
    }
}

#[test]
fn journals_with_old_barriers_are_still_recovered() {
    let env = FaultyEnv::new();
    let dir = Path::new("/legacy");
    let volume = create(&env, dir, true);
    let mut model = vec![0u8; SIZE as usize];
    write_blocks(&volume, &mut model, 0, 40, 7);
    volume.mark_snapshot("old").unwrap();
    // Old barriers took seqs: 40 writes, 1 snapshot and 6 + 1 barriers.
    let old_last = volume.last_seq();
    assert_eq!(old_last, 48);
    kill(volume, &env);
    let (volume, report) = open(&env, dir).unwrap();
    assert_eq!(report.last_seq, old_last);
    assert_eq!(report.torn_tail, None);
    assert!(read_all(&volume) == model);
    // New barriers after old ones, in the same segment and across segment rolls.
    write_blocks(&volume, &mut model, 40, 300, 11);
    let last = volume.last_seq();
    assert_eq!(last, old_last + 300);
    assert!(volume.status().journal_segments >= 2);
    kill(volume, &env);
    let (volume, report) = open(&env, dir).unwrap();
    assert_eq!(report.last_seq, last);
    assert_eq!(report.torn_tail, None);
    assert!(read_all(&volume) == model);
}

#[test]
fn journals_mixing_both_barrier_forms_within_one_replay_are_recovered() {
    let env = FaultyEnv::new();
    let dir = Path::new("/mixed");
    let volume = create(&env, dir, true);
    let mut model = vec![0u8; SIZE as usize];
    write_blocks(&volume, &mut model, 0, 30, 4);
    volume.inner.journal.write_legacy_barriers(false);
    write_blocks(&volume, &mut model, 30, 30, 4);
    volume.inner.journal.write_legacy_barriers(true);
    write_blocks(&volume, &mut model, 60, 30, 4);
    let last = volume.last_seq();
    kill(volume, &env);
    let (volume, report) = open(&env, dir).unwrap();
    assert_eq!(report.checkpoint_seq, 0, "the whole mixed journal was replayed");
    assert_eq!(report.last_seq, last);
    assert_eq!(report.torn_tail, None);
    assert!(read_all(&volume) == model);
}

/// An old barrier (seq of its own) still proves that the record before it was acknowledged.
#[test]
fn an_old_barrier_still_proves_corruption() {
    let env = FaultyEnv::new();
    let volume = create(&env, Path::new("/old-proof"), true);
    volume.write(0, &[1; 4096], PersistMode::Buffered).unwrap();
    volume.flush().unwrap();
    assert_eq!(volume.last_seq(), 2, "the old barrier took seq 2");
    kill(volume, &env);
    env.corrupt(&first_slot("/old-proof"), SEGMENT_HEADER_LEN as u64 + 100, 0x01);
    let err = open(&env, Path::new("/old-proof")).unwrap_err();
    assert!(matches!(&err, Error::Corruption { detail, .. } if detail.contains("seq 1")), "{err}");
}

/// A barrier right after the record it proves carries that record's seq; the proof used
/// to require a higher seq, so this corruption would have been taken for a torn tail.
#[test]
fn a_barrier_carrying_the_seq_of_the_record_before_it_proves_corruption() {
    let env = FaultyEnv::new();
    let volume = create(&env, Path::new("/new-proof"), false);
    volume.write(0, &[1; 4096], PersistMode::Buffered).unwrap();
    volume.flush().unwrap();
    assert_eq!(volume.last_seq(), 1, "the barrier took no seq");
    kill(volume, &env);
    env.corrupt(&first_slot("/new-proof"), SEGMENT_HEADER_LEN as u64 + 100, 0x01);
    let err = open(&env, Path::new("/new-proof")).unwrap_err();
    assert!(matches!(&err, Error::Corruption { detail, .. } if detail.contains("seq 1")), "{err}");
}

/// A segment whose first record is a barrier (it did not fit in the previous one) carries
/// its first seq minus one; recovery must follow the chain into it and past it.
#[test]
fn a_segment_starting_with_a_barrier_is_followed() {
    for legacy in [false, true] {
        let env = FaultyEnv::new();
        let dir = Path::new("/roll");
        let volume = create(&env, dir, legacy);
        let mut model = vec![0u8; SIZE as usize];
        let record = RecordHeader::encoded_len(4096) as u64;
        let room = (1 << 20) - SEGMENT_HEADER_LEN as u64;
        let whole = room / record;
        for i in 0..whole {
            volume.write(i * 4096, &[i as u8; 4096], PersistMode::Buffered).unwrap();
            model[(i * 4096) as usize..((i + 1) * 4096) as usize].fill(i as u8);
        }
        // Leave less room than a barrier (48 bytes) in segment 1.
        let rest = room - whole * record;
        let filler = rest - 40 - RecordHeader::encoded_len(0) as u64;
        volume.write(SIZE - 4096, &vec![0xAB; filler as usize], PersistMode::Buffered).unwrap();
        model[(SIZE - 4096) as usize..(SIZE - 4096 + filler) as usize].fill(0xAB);
        assert_eq!(volume.status().journal_segments, 1);
        volume.flush().unwrap();
        assert_eq!(volume.status().journal_segments, 2, "the barrier rolled into segment 2");
        write_blocks(&volume, &mut model, 500, 5, 2);
        let last = volume.last_seq();
        kill(volume, &env);
        let (volume, report) = open(&env, dir).unwrap();
        assert_eq!(report.last_seq, last, "legacy {legacy}");
        assert_eq!(report.torn_tail, None);
        assert!(read_all(&volume) == model);
    }
}

/// Layered change tracking and frozen views, through the volume: crash points of a
/// checkpoint with layers, cuts racing checkpoints, and frozen reads against a model while
/// writers hammer the volume.
mod frozen_tests {
    use std::collections::BTreeMap;
    use std::io;
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
    use std::sync::{Arc, Barrier};
    use std::time::{Duration, Instant};

    use parking_lot::Mutex;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use crate::format::RecordKind;
    use crate::storage::{Env, Extent, OpenMode, Storage};
    use crate::testing::{FaultKind, FaultyEnv};
    use crate::{
        Error, Frozen, OpenOptions, PersistMode, RecordSink, ReplicaRecord, Volume, VolumeOptions, FROZEN_MAX,
    };

    const SIZE: u64 = 4 << 20;
    const REGION: u64 = 64 << 10;
    const REGIONS: u64 = SIZE / REGION;

    fn options() -> VolumeOptions {
        VolumeOptions {
            segment_bytes: 1 << 20,
            segment_count_max: 4,
            change_region_bytes: REGION as u32,
            extent_file_bytes: 1 << 20,
        }
    }

    fn manual() -> OpenOptions {
        OpenOptions { background_checkpoints: false, ..OpenOptions::default() }
    }

    fn create_open(env: Arc<dyn Env>, dir: &Path) -> Volume {
        Volume::create(Arc::clone(&env), dir, "t", SIZE, &options()).unwrap();
        Volume::open(env, dir, &manual()).unwrap().0
    }

    fn seeded(test: &str) -> (StdRng, u64) {
        let seed = std::env::var("KEEL_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
        eprintln!("{test}: KEEL_TEST_SEED={seed}");
        (StdRng::seed_from_u64(seed), seed)
    }

    fn fill(len: usize, seed: u64) -> Vec<u8> {
        (0..len as u64).map(|i| (seed.wrapping_mul(31).wrapping_add(i / 7) % 251) as u8 + 1).collect()
    }

    fn read_all(volume: &Volume) -> Vec<u8> {
        let mut buf = vec![0u8; SIZE as usize];
        volume.read(0, &mut buf).unwrap();
        buf
    }

    fn layer_files(env: &FaultyEnv, dir: &Path) -> Vec<PathBuf> {
        env.files()
            .into_iter()
            .filter(|p| p.parent() == Some(dir) && p.to_string_lossy().contains("changes-"))
            .collect()
    }

    fn copy_files(env: &FaultyEnv, dir: &Path) -> Vec<PathBuf> {
        env.files().into_iter().filter(|p| p.parent() == Some(dir) && p.to_string_lossy().ends_with(".cow")).collect()
    }

    /// Every record's seq and the regions it touched; the markers.
    #[derive(Debug, Default, Clone)]
    struct History {
        records: BTreeMap<u64, (u64, u64)>,
        markers: Vec<u64>,
    }

    impl History {
        fn data(&mut self, seq: u64, offset: u64, len: u64) {
            self.records.insert(seq, (offset / REGION, (offset + len - 1) / REGION));
        }

        fn between(&self, since: u64, until: u64) -> Vec<u64> {
            if since >= until {
                return Vec::new();
            }
            let mut regions: Vec<u64> = self.records.range(since + 1..=until).flat_map(|(_, &(a, b))| a..=b).collect();
            regions.sort_unstable();
            regions.dedup();
            regions
        }

        fn last_seq(&self) -> u64 {
            let data = self.records.keys().next_back().copied().unwrap_or(0);
            data.max(self.markers.last().copied().unwrap_or(0))
        }
    }

    fn contains_all(got: &[u64], want: &[u64]) -> bool {
        want.iter().all(|r| got.binary_search(r).is_ok())
    }

    /// Every answer the volume gives is a superset of the truth; returns the map's base.
    fn check_superset(volume: &Volume, history: &History, context: &str) -> u64 {
        let last = history.last_seq();
        let base = volume.status().change_map_base_seq;
        for q in 0..=last {
            match volume.changed_since(q) {
                Ok(set) => {
                    assert!(q >= base, "{context}: changed_since({q}) answered below the base {base}");
                    assert!(contains_all(&set.regions, &history.between(q, last)), "{context}: changed_since({q})");
                }
                Err(Error::ChangeMapUnavailable { .. }) => {
                    assert!(q < base, "{context}: changed_since({q}) unavailable above the base {base}")
                }
                Err(e) => panic!("{context}: {e}"),
            }
        }
        let points: Vec<u64> =
            std::iter::once(base).chain(history.markers.iter().copied().filter(|&m| m > base)).collect();
        for (i, &since) in points.iter().enumerate() {
            for &until in points.iter().skip(i + 1) {
                match volume.changed_between(since, until) {
                    Ok(set) => assert!(
                        contains_all(&set.regions, &history.between(since, until)),
                        "{context}: changed_between({since}, {until})"
                    ),
                    Err(Error::ChangeMapUnavailable { .. }) => {}
                    Err(e) => panic!("{context}: {e}"),
                }
            }
        }
        base
    }

    /// An [`Env`] that fails every mutating call after a budget of them, like a power cut
    /// at that step (the volume poisons itself; the test then crashes the FaultyEnv).
    #[derive(Debug, Clone)]
    struct CutEnv {
        inner: FaultyEnv,
        budget: Arc<AtomicI64>,
    }

    impl CutEnv {
        fn new(inner: &FaultyEnv) -> Self {
            Self { inner: inner.clone(), budget: Arc::new(AtomicI64::new(i64::MAX)) }
        }

        fn spend(&self) -> io::Result<()> {
            if self.budget.fetch_sub(1, Ordering::SeqCst) <= 0 {
                return Err(io::Error::other("simulated power cut"));
            }
            Ok(())
        }

        fn exhausted(&self) -> bool {
            self.budget.load(Ordering::SeqCst) < 0
        }
    }

    #[derive(Debug)]
    struct CutFile {
        inner: Arc<dyn Storage>,
        env: CutEnv,
    }

    impl Storage for CutFile {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            self.inner.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
            self.env.spend()?;
            self.inner.write_at(buf, offset)
        }
        fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
            self.env.spend()?;
            self.inner.write_vectored_at(bufs, offset)
        }
        fn sync(&self) -> io::Result<()> {
            self.env.spend()?;
            self.inner.sync()
        }
        fn len(&self) -> io::Result<u64> {
            self.inner.len()
        }
        fn set_len(&self, len: u64) -> io::Result<()> {
            self.env.spend()?;
            self.inner.set_len(len)
        }
        fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
            self.env.spend()?;
            self.inner.punch_hole(offset, len)
        }
        fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
            self.env.spend()?;
            self.inner.zero_range(offset, len)
        }
        fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
            self.env.spend()?;
            self.inner.allocate(offset, len)
        }
        fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
            self.inner.extents(offset, len)
        }
    }

    impl Env for CutEnv {
        fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn Storage>> {
            if mode == OpenMode::CreateIfMissing && !self.inner.exists(path) {
                self.spend()?;
            }
            let inner = self.inner.open(path, mode)?;
            Ok(Arc::new(CutFile { inner, env: self.clone() }))
        }
        fn exists(&self, path: &Path) -> bool {
            self.inner.exists(path)
        }
        fn create_dir_all(&self, path: &Path) -> io::Result<()> {
            self.inner.create_dir_all(path)
        }
        fn read_dir(&self, path: &Path) -> io::Result<Vec<PathBuf>> {
            self.inner.read_dir(path)
        }
        fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
            self.spend()?;
            self.inner.rename(from, to)
        }
        fn sync_dir(&self, path: &Path) -> io::Result<()> {
            self.spend()?;
            self.inner.sync_dir(path)
        }
        fn remove_file(&self, path: &Path) -> io::Result<()> {
            self.spend()?;
            self.inner.remove_file(path)
        }
        fn lock(&self, path: &Path) -> io::Result<Box<dyn std::any::Any + Send + Sync>> {
            self.inner.lock(path)
        }
        fn backend_name(&self) -> &'static str {
            "cut"
        }
    }

    /// Builds a history with more snapshot markers than the map keeps layers (so merges
    /// happen), checkpoints in between, and markers and data after the last checkpoint.
    /// Everything is flushed.
    fn layered_history(volume: &Volume, seed: u64) -> History {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut history = History::default();
        for step in 0..140u64 {
            let at = rng.gen_range(0..SIZE / 4096) * 4096;
            let len = rng.gen_range(1..=((SIZE - at) / 4096).min(40)) * 4096;
            // Every fourth step a marker: 35 of them, more than the map keeps layers.
            let choice = if step % 4 == 3 { 6 } else { rng.gen_range(0..10) };
            match choice {
                0..=4 => {
                    let seq = volume.write(at, &fill(len as usize, step), PersistMode::Buffered).unwrap();
                    history.data(seq, at, len);
                }
                5 => {
                    let seq = volume.trim(at, len, PersistMode::Buffered).unwrap();
                    history.data(seq, at, len);
                }
                6..=8 => history.markers.push(volume.mark_snapshot(&format!("s{step}")).unwrap()),
                _ => volume.checkpoint().unwrap(),
            }
        }
        let seq = volume.write(0, &[7; 4096], PersistMode::Buffered).unwrap();
        history.data(seq, 0, 4096);
        history.markers.push(volume.mark_snapshot("last").unwrap());
        let seq = volume.write(SIZE - 4096, &[8; 4096], PersistMode::Buffered).unwrap();
        history.data(seq, SIZE - 4096, 4096);
        volume.flush().unwrap();
        history
    }

    /// A power cut at every file operation of a checkpoint that writes layer files,
    /// merges and removes some, persists the live map and the superblock: after reopening,
    /// every answer is a superset of the truth (nothing missing), whatever the cut kept.
    #[test]
    fn a_power_cut_at_every_step_of_a_checkpoint_with_layers_loses_no_change() {
        let (mut rng, seed) = seeded("a_power_cut_at_every_step_of_a_checkpoint_with_layers_loses_no_change");
        let dir = Path::new("/layers");
        for scenario in (0..3).map(|i| seed.wrapping_add(i)) {
            let mut full_history_kept = 0;
            for budget in 0.. {
                let context = format!("scenario {scenario}, budget {budget} (seed {seed})");
                let env = FaultyEnv::new();
                let cut = CutEnv::new(&env);
                let volume = create_open(Arc::new(cut.clone()), dir);
                let mut history = layered_history(&volume, scenario);
                assert!(history.markers.len() > crate::changemap::LAYERS_MAX, "the scenario must merge layers");
                cut.budget.store(budget, Ordering::SeqCst);
                let outcome = volume.checkpoint();
                let finished = !cut.exhausted();
                assert_eq!(outcome.is_ok(), finished, "{context}: {outcome:?}");
                std::mem::forget(volume);
                env.crash(&mut rng);
                let (volume, report) =
                    Volume::open(Arc::new(env.clone()), dir, &manual()).unwrap_or_else(|e| panic!("{context}: {e}"));
                assert_eq!(report.last_seq, history.last_seq(), "{context}");
                let base = check_superset(&volume, &history, &context);
                full_history_kept += usize::from(base == 0);
                // The map keeps working after the crash, and loses nothing more without one.
                let seq = volume.write(REGION, &[1; 100], PersistMode::Buffered).unwrap();
                history.data(seq, REGION, 100);
                history.markers.push(volume.mark_snapshot("after").unwrap());
                volume.checkpoint().unwrap();
                drop(volume);
                let (volume, _) = Volume::open(Arc::new(env.clone()), dir, &manual()).unwrap();
                let reopened_base = check_superset(&volume, &history, &format!("{context}, reopened"));
                assert_eq!(reopened_base, base, "{context}: a clean checkpoint and reopen lost history");
                if finished {
                    assert_eq!(base, 0, "{context}: a completed checkpoint keeps the whole history");
                    eprintln!(
                        "scenario {scenario}: {budget} crash points, the whole history survived {full_history_kept}"
                    );
                    break;
                }
            }
        }
    }

    /// A power cut at every file operation of the recovery that replays markers (some cut
    /// again, some already cut) and persists the map, then a clean reopen.
    #[test]
    fn a_power_cut_at_every_step_of_recovery_loses_no_change() {
        let (mut rng, seed) = seeded("a_power_cut_at_every_step_of_recovery_loses_no_change");
        let dir = Path::new("/recover");
        for budget in 0.. {
            let env = FaultyEnv::new();
            let volume = create_open(Arc::new(env.clone()), dir);
            let history = layered_history(&volume, seed);
            std::mem::forget(volume);
            env.crash(&mut rng);
            let cut = CutEnv::new(&env);
            cut.budget.store(budget, Ordering::SeqCst);
            let opened = Volume::open(Arc::new(cut.clone()), dir, &manual());
            let finished = !cut.exhausted();
            match opened {
                Ok((volume, _)) => {
                    assert!(finished, "budget {budget}: opened although a step failed");
                    std::mem::forget(volume);
                }
                Err(e) => assert!(!finished, "budget {budget}: {e}"),
            }
            env.crash(&mut rng);
            let (volume, report) = Volume::open(Arc::new(env.clone()), dir, &manual())
                .unwrap_or_else(|e| panic!("budget {budget} (seed {seed}): {e}"));
            assert_eq!(report.last_seq, history.last_seq());
            check_superset(&volume, &history, &format!("recovery budget {budget} (seed {seed})"));
            if finished {
                break;
            }
        }
    }

    /// Markers are cut while checkpoints persist the map concurrently; whatever a persist
    /// saved, a crash afterwards loses no change (the saved base and bits are consistent).
    #[test]
    fn cuts_racing_checkpoints_lose_no_change() {
        let (mut rng, seed) = seeded("cuts_racing_checkpoints_lose_no_change");
        for round in 0..4u64 {
            let env = FaultyEnv::new();
            let dir = PathBuf::from(format!("/race{round}"));
            let volume = Arc::new(create_open(Arc::new(env.clone()), &dir));
            let history = Arc::new(Mutex::new(History::default()));
            let done = Arc::new(AtomicBool::new(false));
            let start = Arc::new(Barrier::new(3));
            let writers: Vec<_> = (0..2u64)
                .map(|w| {
                    let (volume, history, start) = (Arc::clone(&volume), Arc::clone(&history), Arc::clone(&start));
                    let mut rng = StdRng::seed_from_u64(seed ^ (round << 8) ^ w);
                    std::thread::spawn(move || {
                        start.wait();
                        for step in 0..300u64 {
                            let at = rng.gen_range(0..SIZE / 4096) * 4096;
                            if rng.gen_bool(0.2) {
                                let seq = volume.mark_snapshot(&format!("w{w}-{step}")).unwrap();
                                history.lock().markers.push(seq);
                            } else {
                                let seq = volume.write(at, &[w as u8 + 1; 4096], PersistMode::Buffered).unwrap();
                                history.lock().data(seq, at, 4096);
                            }
                        }
                    })
                })
                .collect();
            let checkpointer = {
                let (volume, done, start) = (Arc::clone(&volume), Arc::clone(&done), Arc::clone(&start));
                std::thread::spawn(move || {
                    start.wait();
                    while !done.load(Ordering::SeqCst) {
                        volume.checkpoint().unwrap();
                    }
                })
            };
            writers.into_iter().for_each(|w| w.join().unwrap());
            done.store(true, Ordering::SeqCst);
            checkpointer.join().unwrap();
            volume.flush().unwrap();
            let mut history = history.lock().clone();
            history.markers.sort_unstable();
            let volume = Arc::into_inner(volume).unwrap();
            std::mem::forget(volume);
            env.crash(&mut rng);
            let (volume, _) = Volume::open(Arc::new(env.clone()), &dir, &manual()).unwrap();
            let base = check_superset(&volume, &history, &format!("round {round} (seed {seed})"));
            assert_eq!(base, 0, "round {round}: every persist completed, so nothing was lost");
        }
    }

    /// A marker replayed at or below the persisted live base is not cut again; a later one
    /// is, and answers between markers are exact after the reopen.
    #[test]
    fn replayed_markers_cut_only_past_the_persisted_base() {
        let env = FaultyEnv::new();
        let dir = Path::new("/replay");
        let volume = create_open(Arc::new(env.clone()), dir);
        volume.write(0, &[1; 4096], PersistMode::Buffered).unwrap();
        let first = volume.mark_snapshot("a").unwrap();
        volume.write(REGION, &[1; 4096], PersistMode::Buffered).unwrap();
        volume.checkpoint().unwrap();
        volume.write(2 * REGION, &[1; 4096], PersistMode::Buffered).unwrap();
        let second = volume.mark_snapshot("b").unwrap();
        volume.write(3 * REGION, &[1; 4096], PersistMode::Buffered).unwrap();
        volume.flush().unwrap();
        std::mem::forget(volume);
        env.crash(&mut rand::thread_rng());
        let (volume, report) = Volume::open(Arc::new(env.clone()), dir, &manual()).unwrap();
        assert!(report.checkpoint_seq >= first && report.checkpoint_seq < second);
        assert_eq!(volume.inner.changemap.cut_points(), vec![first, second]);
        assert_eq!(volume.changed_between(0, first).unwrap().regions, vec![0]);
        assert_eq!(volume.changed_between(first, second).unwrap().regions, vec![1, 2]);
        assert_eq!(volume.changed_since(second).unwrap().regions, vec![3]);
        let err = volume.changed_between(first, second + 1).unwrap_err();
        assert!(matches!(&err, Error::ChangeMapUnavailable { reason, .. } if reason.contains("cut point")), "{err}");
        assert!(matches!(volume.changed_between(second, first), Err(Error::InvalidArgument(_))));
        assert_eq!(layer_files(&env, dir).len(), 2, "recovery persisted the re-cut layer");
    }

    /// A volume without layer files (every volume before this change) opens as before and
    /// answers as before; its first marker starts the layers.
    #[test]
    fn a_volume_without_layer_files_opens_unchanged() {
        let env = FaultyEnv::new();
        let dir = Path::new("/old");
        let volume = create_open(Arc::new(env.clone()), dir);
        volume.write(0, &[1; 4096], PersistMode::Buffered).unwrap();
        volume.checkpoint().unwrap();
        volume.write(5 * REGION + 10, &[1; 100], PersistMode::Durable).unwrap();
        volume.close().unwrap();
        assert!(layer_files(&env, dir).is_empty());
        let (volume, report) = Volume::open(Arc::new(env.clone()), dir, &manual()).unwrap();
        assert_eq!(report.change_map, crate::ChangeMapState::Trusted);
        assert_eq!(volume.changed_since(0).unwrap().regions, vec![0, 5]);
        assert_eq!(volume.status().change_map_base_seq, 0);
        assert_eq!(volume.status().changed_regions, 2);
        let marker = volume.mark_snapshot("first").unwrap();
        volume.write(7 * REGION, &[1; 100], PersistMode::Durable).unwrap();
        assert_eq!(volume.changed_between(0, marker).unwrap().regions, vec![0, 5]);
        assert_eq!(volume.changed_since(0).unwrap().regions, vec![0, 5, 7]);
        assert_eq!(volume.status().changed_regions, 3);
    }

    /// The layers answer what snapshots need: the regions changed between two of them.
    #[test]
    fn frozen_views_report_the_changes_since_their_parent() {
        let env = FaultyEnv::new();
        let volume = create_open(Arc::new(env.clone()), Path::new("/parent"));
        volume.write(0, &[1; 4096], PersistMode::Buffered).unwrap();
        let parent = volume.snapshot("parent").unwrap();
        volume.write(3 * REGION, &[1; 4096], PersistMode::Buffered).unwrap();
        let child = volume.snapshot("child").unwrap();
        volume.write(9 * REGION, &[1; 4096], PersistMode::Buffered).unwrap();
        assert_eq!(child.changed_since(parent.seq()).unwrap().regions, vec![3]);
        assert_eq!(child.changed_since(0).unwrap().regions, vec![0, 3]);
        assert_eq!(parent.changed_since(0).unwrap().regions, vec![0]);
        assert!(matches!(parent.changed_since(child.seq()), Err(Error::InvalidArgument(_))));
        assert_eq!((child.name(), child.size(), child.region_bytes()), ("child", SIZE, REGION));
    }

    /// One writer's operation, logged with its seq so the contents at any marker can be
    /// rebuilt.
    #[derive(Debug, Clone)]
    enum Logged {
        Write(u64, Vec<u8>),
        Zero(u64, u64),
    }

    fn apply_logged(model: &mut [u8], ops: &BTreeMap<u64, Logged>, until: u64) {
        for op in ops.range(..=until).map(|(_, op)| op) {
            match op {
                Logged::Write(at, data) => model[*at as usize..*at as usize + data.len()].copy_from_slice(data),
                Logged::Zero(at, len) => model[*at as usize..(*at + *len) as usize].fill(0),
            }
        }
    }

    fn random_op(volume: &Volume, rng: &mut StdRng, tag: u64) -> (u64, Logged) {
        let at = rng.gen_range(0..SIZE / 512) * 512;
        let max = (SIZE - at).min(if rng.gen_bool(0.1) { 3 * REGION } else { 16 << 10 });
        let len = rng.gen_range(1..=max / 512) * 512;
        match rng.gen_range(0..10) {
            0..=6 => {
                let data = fill(len as usize, tag);
                let seq = volume.write(at, &data, PersistMode::Buffered).unwrap();
                (seq, Logged::Write(at, data))
            }
            7 | 8 => (volume.write_zeroes(at, len, rng.gen(), PersistMode::Buffered).unwrap(), Logged::Zero(at, len)),
            _ => (volume.trim(at, len, PersistMode::Buffered).unwrap(), Logged::Zero(at, len)),
        }
    }

    /// Reads the whole view in random, unaligned pieces and compares it with `model`.
    fn read_view_matches(frozen: &Frozen, model: &[u8], rng: &mut StdRng) -> bool {
        let mut at = 0u64;
        let mut buf = Vec::new();
        while at < SIZE {
            let len = rng.gen_range(1..=(SIZE - at).min(200 << 10));
            buf.resize(len as usize, 0);
            frozen.read(at, &mut buf).unwrap();
            if buf[..] != model[at as usize..(at + len) as usize] {
                return false;
            }
            at += len;
        }
        true
    }

    /// Writers hammer random writes, zeros and trims while a snapshot is taken in the
    /// middle and then read whole, again and again: the frozen bytes equal the contents at
    /// the marker, rebuilt from the writers' logs, exactly. A checkpointer runs too.
    #[test]
    fn frozen_reads_equal_the_contents_at_the_marker_while_writers_hammer() {
        let (_, seed) = seeded("frozen_reads_equal_the_contents_at_the_marker_while_writers_hammer");
        for round in 0..3u64 {
            let env = FaultyEnv::new();
            let dir = PathBuf::from(format!("/hammer{round}"));
            let volume = Arc::new(create_open(Arc::new(env.clone()), &dir));
            let mut rng = StdRng::seed_from_u64(seed ^ round);
            let mut initial = vec![0u8; SIZE as usize];
            for i in 0..60u64 {
                let (seq, op) = random_op(&volume, &mut rng, 1_000 + i);
                apply_logged(&mut initial, &BTreeMap::from([(seq, op)]), seq);
            }
            // Per writer: its ops by seq, and whether it logged its last one.
            let logs: Arc<[Mutex<BTreeMap<u64, Logged>>; 2]> = Arc::new(Default::default());
            let finished: Arc<[AtomicBool; 2]> = Arc::new(Default::default());
            let done = Arc::new(AtomicBool::new(false));
            let start = Arc::new(Barrier::new(4));
            let (marker_tx, marker_rx) = std::sync::mpsc::channel::<()>();
            let mut threads = Vec::new();
            for w in 0..2usize {
                let (volume, logs, start) = (Arc::clone(&volume), Arc::clone(&logs), Arc::clone(&start));
                let finished = Arc::clone(&finished);
                let marker_tx = marker_tx.clone();
                let mut rng = StdRng::seed_from_u64(seed ^ (round << 16) ^ (w as u64 + 1));
                threads.push(std::thread::spawn(move || {
                    start.wait();
                    for i in 0..400u64 {
                        let (seq, op) = random_op(&volume, &mut rng, ((w as u64) << 32) | i);
                        logs[w].lock().insert(seq, op);
                        if i == 50 {
                            // Early on: the snapshot is taken while the writers go on.
                            let _ = marker_tx.send(());
                        }
                    }
                    finished[w].store(true, Ordering::SeqCst);
                }));
            }
            {
                let (volume, done, start) = (Arc::clone(&volume), Arc::clone(&done), Arc::clone(&start));
                threads.push(std::thread::spawn(move || {
                    start.wait();
                    while !done.load(Ordering::SeqCst) {
                        volume.checkpoint().unwrap();
                    }
                }));
            }
            start.wait();
            marker_rx.recv().unwrap();
            let frozen = volume.snapshot("hammer").unwrap();
            let marker = frozen.seq();
            // Read the whole view while the writers go on, then once more after them.
            let mut reads = 0;
            let mut model: Option<Vec<u8>> = None;
            loop {
                let writers_done = threads.iter().take(2).all(|t| t.is_finished());
                // A writer has logged every one of its records at or below the marker once
                // it logged one past it, or its last one.
                let model = model.get_or_insert_with(|| {
                    let past_marker = |w: usize| {
                        finished[w].load(Ordering::SeqCst) || logs[w].lock().range(marker + 1..).next().is_some()
                    };
                    while !(past_marker(0) && past_marker(1)) {
                        std::thread::yield_now();
                    }
                    let mut ops = logs[0].lock().clone();
                    ops.extend(logs[1].lock().clone());
                    let mut contents = initial.clone();
                    apply_logged(&mut contents, &ops, marker);
                    contents
                });
                assert!(read_view_matches(&frozen, model, &mut rng), "round {round}, read {reads} (seed {seed})");
                reads += 1;
                if writers_done {
                    break;
                }
            }
            done.store(true, Ordering::SeqCst);
            threads.into_iter().for_each(|t| t.join().unwrap());
            let model = model.unwrap();
            assert!(read_view_matches(&frozen, &model, &mut rng));
            // The allocation map is conservative: every hole reads as zeros.
            let mut at = 0usize;
            for extent in frozen.allocation(0, SIZE).unwrap() {
                if extent.hole {
                    assert!(model[at..at + extent.len as usize].iter().all(|&b| b == 0), "hole at {at}");
                }
                at += extent.len as usize;
            }
            assert_eq!(at as u64, SIZE);
            // And the live volume moved on: it holds every logged op.
            let mut live = initial.clone();
            let mut ops = logs[0].lock().clone();
            ops.extend(logs[1].lock().clone());
            apply_logged(&mut live, &ops, u64::MAX);
            assert!(read_all(&volume) == live);
            eprintln!("round {round}: {reads} full reads of the frozen view at seq {marker}");
            assert_eq!(copy_files(&env, &dir).len(), 1);
            drop(frozen);
            assert!(copy_files(&env, &dir).is_empty(), "the copy file is deleted with the view");
        }
    }

    /// A record the primary appended, owned.
    #[derive(Debug)]
    struct Shipped {
        seq: u64,
        kind: RecordKind,
        flags: u8,
        offset: u64,
        length: u64,
        payload: Vec<u8>,
    }

    /// Copies each record the primary appends, to feed a standby.
    #[derive(Debug, Default)]
    struct Collect(Mutex<Vec<Shipped>>);

    impl RecordSink for Collect {
        fn appended(&self, r: &ReplicaRecord<'_>) {
            let (seq, kind, flags, offset, length) = (r.seq, r.kind, r.flags, r.offset, r.length);
            self.0.lock().push(Shipped { seq, kind, flags, offset, length, payload: r.payload.to_vec() });
        }
    }

    /// A standby fed by apply_replica freezes at the primary's marker: the view holds the
    /// primary's contents at the marker while the standby keeps applying records.
    #[test]
    fn a_standby_freezes_at_the_primarys_marker() {
        let (mut rng, seed) = seeded("a_standby_freezes_at_the_primarys_marker");
        let env = FaultyEnv::new();
        let primary = create_open(Arc::new(env.clone()), Path::new("/primary"));
        let standby = Arc::new(create_open(Arc::new(env.clone()), Path::new("/standby")));
        let sink = Arc::new(Collect::default());
        primary.set_record_sink(Some(sink.clone()));
        let mut at_marker = None;
        for i in 0..300u64 {
            random_op(&primary, &mut rng, i);
            if i == 150 {
                primary.mark_snapshot("decoy").unwrap();
                at_marker = Some((primary.mark_snapshot("nightly").unwrap(), read_all(&primary)));
            }
        }
        let (marker, model) = at_marker.unwrap();
        let waiter = standby.freeze_at_marker("nightly").unwrap();
        let records = std::mem::take(&mut *sink.0.lock());
        let (applied_tx, applied_rx) = std::sync::mpsc::channel();
        let feeder = {
            let standby = Arc::clone(&standby);
            std::thread::spawn(move || {
                for shipped in &records {
                    let Shipped { seq, kind, flags, offset, length, ref payload } = *shipped;
                    let record = ReplicaRecord { seq, epoch: 1, kind, flags, offset, length, payload };
                    standby.apply_replica(&record).unwrap();
                    if seq == marker + 20 {
                        let _ = applied_tx.send(());
                    }
                }
            })
        };
        let frozen = waiter.wait(Duration::from_secs(60)).unwrap();
        assert_eq!((frozen.seq(), frozen.name()), (marker, "nightly"));
        assert!(standby.saw_marker("nightly") && standby.saw_marker("decoy"), "the standby saw the primary's markers");
        assert!(!standby.saw_marker("never") && !standby.saw_marker("nightl"));
        assert!(read_view_matches(&frozen, &model, &mut rng), "seed {seed}");
        applied_rx.recv().unwrap();
        assert!(read_view_matches(&frozen, &model, &mut rng), "seed {seed}");
        feeder.join().unwrap();
        assert!(read_view_matches(&frozen, &model, &mut rng), "seed {seed}");
        assert!(read_all(&standby) == read_all(&primary));
        // The waiter handed its view out once.
        assert!(waiter.wait(Duration::ZERO).is_err());
        drop(waiter);
        assert!(read_view_matches(&frozen, &model, &mut rng), "dropping the waiter keeps the view");
        // A marker that never comes times out; the wait can be retried.
        let never = standby.freeze_at_marker("never").unwrap();
        let err = never.wait(Duration::from_millis(1)).unwrap_err();
        assert!(matches!(&err, Error::Io { source, .. } if source.kind() == io::ErrorKind::TimedOut), "{err}");
    }

    /// A released range is no longer copied when overwritten, its copy is freed, and it
    /// cannot be read back; the rest of the view is unaffected.
    #[test]
    fn released_regions_are_not_copied() {
        let env = FaultyEnv::new();
        let dir = Path::new("/release");
        let volume = create_open(Arc::new(env.clone()), dir);
        for r in 0..REGIONS {
            volume.write(r * REGION, &fill(REGION as usize, r), PersistMode::Buffered).unwrap();
        }
        let model = read_all(&volume);
        let frozen = volume.snapshot("s").unwrap();
        // Region 4 is copied, then released: its copy is freed.
        volume.write(4 * REGION, &[9; 512], PersistMode::Buffered).unwrap();
        assert!(frozen.is_copied(4));
        // Release regions 0-1 and 4 (and the partial regions around them are kept).
        frozen.release(0, 2 * REGION + 100);
        frozen.release(4 * REGION - 1, REGION + 2);
        frozen.release(3 * REGION + 1, REGION);
        volume.write(0, &[9; 512], PersistMode::Buffered).unwrap();
        volume.write(REGION + 100, &[9; 512], PersistMode::Buffered).unwrap();
        volume.write(2 * REGION, &[9; 512], PersistMode::Buffered).unwrap();
        assert!(!frozen.is_copied(0) && !frozen.is_copied(1), "released regions are not copied");
        assert!(frozen.is_copied(2), "a partly released region is still copied");
        assert!(frozen.is_released(4) && !frozen.is_released(3) && !frozen.is_released(5));
        let cow = copy_files(&env, dir).pop().unwrap();
        let file = env.open(&cow, OpenMode::Existing).unwrap();
        assert!(file.extents(4 * REGION, REGION).unwrap().iter().all(|e| e.hole), "region 4's copy is freed");
        assert!(file.extents(2 * REGION, REGION).unwrap().iter().all(|e| !e.hole));
        let mut buf = vec![0u8; 4096];
        assert!(matches!(frozen.read(REGION, &mut buf), Err(Error::InvalidArgument(_))));
        let mut rest = vec![0u8; (SIZE - 5 * REGION) as usize];
        frozen.read(5 * REGION, &mut rest).unwrap();
        assert!(rest[..] == model[5 * REGION as usize..]);
        frozen.read(2 * REGION, &mut buf).unwrap();
        assert!(buf[..] == model[2 * REGION as usize..2 * REGION as usize + 4096]);
        // A range that ends inside a region keeps it; one reaching its end releases it.
        frozen.release(SIZE - 10, 10);
        assert!(!frozen.is_released(REGIONS - 1));
        frozen.release(SIZE - REGION, REGION);
        assert!(frozen.is_released(REGIONS - 1));
    }

    fn frozen_error(frozen: &Frozen) -> String {
        let mut buf = [0u8; 512];
        frozen.read(0, &mut buf).unwrap_err().to_string()
    }

    /// A rewind below the marker, closing and poisoning end a view (reads fail and say
    /// why); a rewind that keeps the marker does not, and the view stays exact.
    #[test]
    fn rewind_close_and_poison_end_frozen_views() {
        let env = FaultyEnv::new();
        let dir = Path::new("/ends");
        let volume = create_open(Arc::new(env.clone()), dir);
        volume.write(0, &[1; 4096], PersistMode::Buffered).unwrap();
        let kept = volume.snapshot("kept").unwrap();
        let model = read_all(&volume);
        let before = volume.write(0, &[2; 4096], PersistMode::Buffered).unwrap();
        let discarded = volume.snapshot("discarded").unwrap();
        let waiter = volume.freeze_at_marker("pending").unwrap();
        volume.write(0, &[3; 8192], PersistMode::Buffered).unwrap();
        assert!(volume.saw_marker("kept") && volume.saw_marker("discarded"));
        volume.rewind(before).unwrap();
        assert!(volume.saw_marker("kept") && !volume.saw_marker("discarded"), "a rewound marker was never seen");
        assert!(frozen_error(&discarded).contains("rewound"), "{}", frozen_error(&discarded));
        let err = waiter.wait(Duration::from_secs(10)).unwrap_err().to_string();
        assert!(err.contains("rewound"), "{err}");
        let mut all = vec![0u8; SIZE as usize];
        kept.read(0, &mut all).unwrap();
        assert!(all == model, "a rewind that keeps the marker keeps the view exact");
        // The rewind forgot the discarded cut point, durably.
        assert_eq!(volume.inner.changemap.cut_points(), vec![kept.seq()]);
        drop((discarded, waiter));
        volume.close().unwrap();
        assert!(frozen_error(&kept).contains("closed"), "{}", frozen_error(&kept));
        drop(kept);
        let (volume, _) = Volume::open(Arc::new(env.clone()), dir, &manual()).unwrap();
        let frozen = volume.snapshot("poisoned").unwrap();
        env.inject(FaultKind::Write, "data/extent");
        assert!(volume.write(0, &[4; 4096], PersistMode::Buffered).is_err());
        assert!(frozen_error(&frozen).contains("poisoned"), "{}", frozen_error(&frozen));
    }

    /// A failing copy-file write ends the view (its reads name the cause) but not the
    /// volume: the write goes on and later writes work.
    #[test]
    fn a_copy_failure_ends_the_view_not_the_volume() {
        let env = FaultyEnv::new();
        let dir = Path::new("/copyfail");
        let volume = create_open(Arc::new(env.clone()), dir);
        volume.write(0, &[1; 4096], PersistMode::Buffered).unwrap();
        let frozen = volume.snapshot("s").unwrap();
        env.inject(FaultKind::Write, "frozen-");
        volume.write(0, &[2; 4096], PersistMode::Durable).unwrap();
        assert!(frozen_error(&frozen).contains("injected"), "{}", frozen_error(&frozen));
        assert_eq!(volume.poisoned(), None);
        volume.write(4096, &[3; 4096], PersistMode::Durable).unwrap();
        let mut buf = [0u8; 4096];
        volume.read(0, &mut buf).unwrap();
        assert_eq!(buf, [2; 4096]);
        // Leftover copy files (a crash) are removed at open.
        std::mem::forget((frozen, volume));
        env.kill_process();
        assert_eq!(copy_files(&env, dir).len(), 1);
        let (_volume, _) = Volume::open(Arc::new(env.clone()), dir, &manual()).unwrap();
        assert!(copy_files(&env, dir).is_empty());
    }

    /// At most FROZEN_MAX views, waiters included; ending one makes room.
    #[test]
    fn frozen_views_are_bounded() {
        let env = FaultyEnv::new();
        let volume = create_open(Arc::new(env.clone()), Path::new("/bounded"));
        let mut views: Vec<Frozen> = (0..FROZEN_MAX - 1).map(|i| volume.snapshot(&format!("s{i}")).unwrap()).collect();
        let waiter = volume.freeze_at_marker("w").unwrap();
        assert!(matches!(volume.snapshot("over"), Err(Error::InvalidArgument(_))));
        assert!(matches!(volume.freeze_at_marker("over"), Err(Error::InvalidArgument(_))));
        drop(waiter);
        views.push(volume.snapshot("again").unwrap());
        views.pop();
        let marker_count = volume.inner.changemap.cut_points().len();
        assert_eq!(marker_count, FROZEN_MAX, "refused snapshots append no marker");
        assert!(matches!(volume.snapshot(""), Err(Error::InvalidArgument(_))));
    }

    /// A consistency group's views are one instant of the group. A writer writes `n` to
    /// `db` and, once that is acknowledged, `n` to `files`, then `n + 1` to `db`…: every
    /// group snapshot must see `files ≤ db ≤ files + 1`. Markers appended one volume after
    /// the other (without holding both journals) let `files` run ahead.
    #[test]
    fn group_snapshots_are_one_instant_of_every_volume() {
        let env: Arc<dyn Env> = Arc::new(FaultyEnv::new());
        let open = |name: &str| {
            let dir = Path::new("/group").join(name);
            Volume::create(Arc::clone(&env), &dir, name, SIZE, &options()).unwrap();
            Volume::open(Arc::clone(&env), &dir, &OpenOptions::default()).unwrap().0
        };
        let (db, files) = (open("db"), open("files"));
        let counter = |volume: &Volume, frozen: Option<&Frozen>| {
            let mut block = [0u8; 4096];
            match frozen {
                Some(f) => f.read(0, &mut block).unwrap(),
                None => volume.read(0, &mut block).unwrap(),
            }
            u64::from_le_bytes(block[..8].try_into().unwrap())
        };
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    n += 1;
                    let mut block = [0u8; 4096];
                    block[..8].copy_from_slice(&n.to_le_bytes());
                    db.write(0, &block, PersistMode::Durable).unwrap();
                    files.write(0, &block, PersistMode::Durable).unwrap();
                }
            });
            // Stops the writer however this thread leaves the scope (a failed check too).
            struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);
            impl Drop for StopOnDrop<'_> {
                fn drop(&mut self) {
                    self.0.store(true, std::sync::atomic::Ordering::Relaxed);
                }
            }
            let _stop = StopOnDrop(&stop);
            let mut seen_ahead = 0;
            for i in 0..10000 {
                // Group order differs from name order half the time; the views come back
                // in the caller's order.
                let views = if i % 2 == 0 {
                    Volume::snapshot_group(&[&db, &files], &format!("g{i}")).unwrap()
                } else {
                    let mut v = Volume::snapshot_group(&[&files, &db], &format!("g{i}")).unwrap();
                    v.reverse();
                    v
                };
                let (a, b) = (counter(&db, Some(&views[0])), counter(&files, Some(&views[1])));
                assert!(b <= a && a <= b + 1, "snapshot {i}: db at {a}, files at {b}");
                seen_ahead += usize::from(a == b + 1);
            }
            // Both states occur, so the check above looked at cuts inside the pair too.
            assert!(seen_ahead > 0, "no snapshot fell between a pair's two writes");
        });
        // Refusals: a volume listed twice; a bad name appends nothing.
        let before = db.inner.journal.last_seq();
        assert!(matches!(Volume::snapshot_group(&[&db, &db], "twice"), Err(Error::InvalidArgument(_))));
        assert!(matches!(Volume::snapshot_group(&[&db, &files], ""), Err(Error::InvalidArgument(_))));
        assert_eq!(db.inner.journal.last_seq(), before);
    }

    /// Not a check: measures what a freeze adds to the first overwrite of a region, on
    /// the POSIX backend. Run with `--nocapture` to see the numbers.
    #[test]
    fn first_overwrite_latency() {
        let dir = tempfile::tempdir().unwrap();
        let env: Arc<dyn Env> = Arc::new(crate::PosixEnv::posix());
        let regions = 512u64;
        let options = VolumeOptions {
            segment_bytes: 16 << 20,
            segment_count_max: 8,
            change_region_bytes: REGION as u32,
            extent_file_bytes: 1 << 30,
        };
        Volume::create(Arc::clone(&env), dir.path(), "bench", regions * REGION, &options).unwrap();
        let (volume, _) = Volume::open(env, dir.path(), &manual()).unwrap();
        let data = fill(REGION as usize, 3);
        for r in 0..regions {
            volume.write(r * REGION, &data, PersistMode::Buffered).unwrap();
        }
        volume.checkpoint().unwrap();
        let block = [5u8; 4096];
        let measure = |label: &str, pass: u64| {
            let mut micros: Vec<f64> = (0..regions)
                .map(|r| {
                    let started = Instant::now();
                    volume.write(r * REGION + pass * 4096, &block, PersistMode::Buffered).unwrap();
                    started.elapsed().as_secs_f64() * 1e6
                })
                .collect();
            micros.sort_by(f64::total_cmp);
            let mean = micros.iter().sum::<f64>() / micros.len() as f64;
            let at = |q: f64| micros[((micros.len() - 1) as f64 * q) as usize];
            eprintln!(
                "{label:<34} 4 KiB writes, one per 64 KiB region: mean {mean:6.1} µs  p50 {:6.1} µs  p99 {:6.1} µs",
                at(0.5),
                at(0.99)
            );
        };
        measure("not frozen", 0);
        let frozen = volume.snapshot("bench").unwrap();
        measure("frozen, first overwrite (copies)", 1);
        measure("frozen, second overwrite", 2);
        drop(frozen);
        measure("after the view was dropped", 3);
    }
}
