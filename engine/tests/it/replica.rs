//! The engine's side of synchronous replication: the record sink on a primary, a standby
//! appending the primary's records with the primary's seqs, resync writes, consistent
//! reads, rewind (with its crash points) and epochs.

use std::path::Path;
use std::sync::Arc;

use keel_engine::format::{RecordKind, FLAG_MAY_PUNCH};
use keel_engine::testing::{FaultKind, FaultyEnv};
use keel_engine::{Error, PersistMode, RecordSink, ReplicaRecord, Volume};
use parking_lot::Mutex;
use proptest::prelude::*;
use rand::Rng;

use crate::support::{create_and_open, reopen, rng};

const SIZE: u64 = 2 << 20;
/// Largest record payload with the 1 MiB segments of `small_options`.
const MAX_PAYLOAD: u64 = 508 << 10;

/// A record as a sink saw it, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Shipped {
    seq: u64,
    epoch: u64,
    kind: RecordKind,
    flags: u8,
    offset: u64,
    length: u64,
    payload: Vec<u8>,
}

impl Shipped {
    fn as_record(&self) -> ReplicaRecord<'_> {
        ReplicaRecord {
            seq: self.seq,
            epoch: self.epoch,
            kind: self.kind,
            flags: self.flags,
            offset: self.offset,
            length: self.length,
            payload: &self.payload,
        }
    }
}

/// Collects every record it is given; the replication layer's bounded queue, unbounded.
#[derive(Debug, Default)]
struct CollectingSink {
    records: Mutex<Vec<Shipped>>,
}

impl CollectingSink {
    fn take(&self) -> Vec<Shipped> {
        std::mem::take(&mut *self.records.lock())
    }
}

impl RecordSink for CollectingSink {
    fn appended(&self, r: &ReplicaRecord<'_>) {
        self.records.lock().push(Shipped {
            seq: r.seq,
            epoch: r.epoch,
            kind: r.kind,
            flags: r.flags,
            offset: r.offset,
            length: r.length,
            payload: r.payload.to_vec(),
        });
    }
}

fn with_sink(volume: &Volume) -> Arc<CollectingSink> {
    let sink = Arc::new(CollectingSink::default());
    let last_seq = volume.set_record_sink(Some(sink.clone()));
    assert_eq!(last_seq, volume.last_seq());
    sink
}

fn read_all(volume: &Volume) -> Vec<u8> {
    let mut buf = vec![0u8; volume.size() as usize];
    volume.read(0, &mut buf).unwrap();
    buf
}

fn fill(len: usize, seed: u64) -> Vec<u8> {
    (0..len as u64).map(|i| (seed.wrapping_mul(31).wrapping_add(i / 7) % 251) as u8 + 1).collect()
}

/// Ships every record the primary's sink collected to the standby, in order.
fn ship(sink: &CollectingSink, standby: &Volume) -> Vec<Shipped> {
    let records = sink.take();
    for record in &records {
        standby.apply_replica(&record.as_record()).unwrap();
    }
    records
}

#[test]
fn a_standby_fed_every_record_matches_the_primary() {
    let (mut rng, seed) = rng("a_standby_fed_every_record_matches_the_primary");
    let env = FaultyEnv::new();
    let (primary, _) = create_and_open(&env, Path::new("/primary"), SIZE);
    let (mut standby, _) = create_and_open(&env, Path::new("/standby"), SIZE);
    let from_primary = with_sink(&primary);
    let mut from_standby = with_sink(&standby);
    let mut shipped = Vec::new();
    let mut reshipped = Vec::new();
    for step in 0..400u64 {
        let at = rng.gen_range(0..SIZE / 512) * 512;
        let room = SIZE - at;
        match rng.gen_range(0..20) {
            0..=8 => {
                // Now and then longer than one record's payload, so the write is split.
                let max = if rng.gen_bool(0.05) { room.min(MAX_PAYLOAD + (64 << 10)) } else { room.min(64 << 10) };
                let len = rng.gen_range(1..=max / 512) * 512;
                let mode = if rng.gen_bool(0.1) { PersistMode::Durable } else { PersistMode::Buffered };
                primary.write(at, &fill(len as usize, step), mode).unwrap();
            }
            9 | 10 => {
                let len = rng.gen_range(0..=room.min(256 << 10) / 512) * 512;
                primary.write_zeroes(at, len, rng.gen(), PersistMode::Buffered).unwrap();
            }
            11 => {
                let len = rng.gen_range(1..=room.min(256 << 10) / 512) * 512;
                primary.trim(at, len, PersistMode::Buffered).unwrap();
            }
            12 | 13 => {
                primary.flush().unwrap();
            }
            14 => primary.checkpoint().unwrap(),
            15 => {
                primary.mark_snapshot(&format!("snap-{step}")).unwrap();
            }
            16 => {
                standby.flush().unwrap();
            }
            17 => standby.checkpoint().unwrap(),
            18 => {
                let epoch = primary.epoch() + 1;
                primary.set_epoch(epoch).unwrap();
            }
            _ => {
                // The standby restarts (cleanly) and carries on from the same seq.
                standby.close().unwrap();
                standby = reopen(&env, Path::new("/standby")).unwrap().0;
                from_standby = with_sink(&standby);
            }
        }
        shipped.extend(ship(&from_primary, &standby));
        reshipped.extend(from_standby.take());
        assert_eq!(standby.last_seq(), primary.last_seq(), "seq spaces diverged at step {step} (seed {seed})");
        if step % 25 == 0 {
            assert!(read_all(&standby) == read_all(&primary), "contents diverged at step {step} (seed {seed})");
        }
    }
    assert!(shipped.iter().all(|r| r.kind != RecordKind::Barrier), "a barrier reached the sink");
    assert_eq!(shipped.len() as u64, primary.last_seq(), "every seq is a shipped record: barriers take none");
    assert!(shipped.windows(2).all(|w| w[1].seq == w[0].seq + 1), "records reached the sink out of order");
    // The standby's own sink saw exactly what it was given (a standby can feed a third node).
    let tail = &shipped[shipped.len() - reshipped.len()..];
    assert_eq!(reshipped, tail);
    let (last_seq, contents) = (primary.last_seq(), read_all(&primary));
    primary.close().unwrap();
    standby.flush().unwrap();
    assert_eq!(standby.durable_seq(), last_seq);
    std::mem::forget(standby);
    env.crash(&mut rng);
    let (standby, report) = reopen(&env, Path::new("/standby")).unwrap();
    assert_eq!(report.last_seq, last_seq);
    assert_eq!(standby.last_seq(), last_seq);
    assert!(read_all(&standby) == contents, "flushed replicated records were lost in a crash (seed {seed})");
}

#[test]
fn a_record_out_of_sequence_is_refused_and_nothing_is_appended() {
    let env = FaultyEnv::new();
    let (standby, _) = create_and_open(&env, Path::new("/seq"), SIZE);
    let payload = [7u8; 4096];
    let mut record = ReplicaRecord {
        seq: 1,
        epoch: 1,
        kind: RecordKind::Write,
        flags: 0,
        offset: 0,
        length: 4096,
        payload: &payload,
    };
    standby.apply_replica(&record).unwrap();
    for got in [0, 1, 3, u64::MAX] {
        record.seq = got;
        let err = standby.apply_replica(&record).unwrap_err();
        assert!(matches!(err, Error::SeqMismatch { expected: 2, got: g, .. } if g == got), "{err}");
    }
    assert_eq!(standby.last_seq(), 1);
    record.seq = 2;
    record.offset = 4096;
    standby.apply_replica(&record).unwrap();
    assert_eq!(standby.last_seq(), 2);
}

#[test]
fn invalid_replicated_records_are_refused() {
    let env = FaultyEnv::new();
    let (standby, _) = create_and_open(&env, Path::new("/invalid"), SIZE);
    let big = vec![1u8; (MAX_PAYLOAD + 4096) as usize];
    let base =
        ReplicaRecord { seq: 1, epoch: 1, kind: RecordKind::Write, flags: 0, offset: 0, length: 0, payload: &[] };
    let cases = [
        ReplicaRecord { kind: RecordKind::Barrier, ..base },
        ReplicaRecord { length: 4096, payload: &[0; 100], ..base },
        ReplicaRecord { length: big.len() as u64, payload: &big, ..base },
        ReplicaRecord { flags: FLAG_MAY_PUNCH, length: 1, payload: &[0], ..base },
        ReplicaRecord { kind: RecordKind::Zero, flags: 0x80, length: 4096, ..base },
        ReplicaRecord { kind: RecordKind::Trim, length: 4096, payload: &[0; 4096], ..base },
        ReplicaRecord { kind: RecordKind::Snapshot, payload: &[], ..base },
        ReplicaRecord { kind: RecordKind::Snapshot, payload: &[0xff, 0xfe], ..base },
        ReplicaRecord { kind: RecordKind::Snapshot, offset: 4096, payload: b"x", ..base },
        ReplicaRecord { kind: RecordKind::Snapshot, payload: &big[..257], ..base },
    ];
    for (i, record) in cases.iter().enumerate() {
        let err = standby.apply_replica(record).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "case {i}: {err}");
    }
    let outside = ReplicaRecord { kind: RecordKind::Trim, offset: SIZE - 4096, length: 8192, ..base };
    assert!(matches!(standby.apply_replica(&outside), Err(Error::OutOfRange { .. })));
    assert_eq!(standby.last_seq(), 0);
    let largest = ReplicaRecord { length: MAX_PAYLOAD, payload: &big[..MAX_PAYLOAD as usize], ..base };
    standby.apply_replica(&largest).unwrap();
    let snapshot = ReplicaRecord { seq: 2, kind: RecordKind::Snapshot, payload: &big[..256], ..base };
    standby.apply_replica(&snapshot).unwrap();
    // flush() covers a replicated snapshot record too (it flushes to the last seq).
    assert_eq!(standby.flush().unwrap(), 2);
    assert_eq!(standby.durable_seq(), 2);
}

fn kind_strategy() -> impl Strategy<Value = RecordKind> {
    prop_oneof![
        Just(RecordKind::Write),
        Just(RecordKind::Zero),
        Just(RecordKind::Trim),
        Just(RecordKind::Barrier),
        Just(RecordKind::Snapshot),
    ]
}

fn garbage() -> impl Strategy<Value = (u64, u64, RecordKind, u8, u64, u64, usize)> {
    (
        prop_oneof![0u64..4, any::<u64>()],
        any::<u64>(),
        kind_strategy(),
        any::<u8>(),
        prop_oneof![0..SIZE + 8192, any::<u64>()],
        prop_oneof![0..20_000u64, any::<u64>()],
        0usize..20_000,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    /// Whatever a (buggy or hostile) primary sends, the standby never panics, never
    /// appends a record it could not replay, and stays openable.
    #[test]
    fn garbage_replicated_records_never_panic(records in proptest::collection::vec(garbage(), 1..60)) {
        let env = FaultyEnv::new();
        let dir = Path::new("/garbage");
        let (standby, _) = create_and_open(&env, dir, SIZE);
        for (seq_delta, epoch, kind, flags, offset, length, payload_len) in records {
            let payload = vec![0x5a; payload_len];
            let seq = if seq_delta < 4 { standby.last_seq() + seq_delta } else { seq_delta };
            let record = ReplicaRecord { seq, epoch, kind, flags, offset, length, payload: &payload };
            let before = standby.last_seq();
            match standby.apply_replica(&record) {
                Ok(()) => prop_assert_eq!(standby.last_seq(), before + 1),
                Err(_) => prop_assert_eq!(standby.last_seq(), before),
            }
        }
        let last = standby.last_seq();
        standby.flush().unwrap();
        std::mem::forget(standby);
        env.kill_process();
        let (standby, report) = reopen(&env, dir).unwrap();
        prop_assert_eq!(report.last_seq, last);
        prop_assert_eq!(report.torn_tail, None);
        prop_assert_eq!(standby.last_seq(), last);
    }
}

/// A primary's writes as a model: block index → fill byte, per seq.
fn write_block(volume: &Volume, model: &mut [u8], block: u64, value: u8) -> u64 {
    volume.write(block * 4096, &[value; 4096], PersistMode::Buffered).unwrap();
    model[(block * 4096) as usize..((block + 1) * 4096) as usize].fill(value);
    volume.last_seq()
}

/// An old primary returns after a failover: it rewinds to the last seq both nodes share,
/// resyncs the regions its discarded records touched, then follows the new primary. Its
/// seqs and contents end up the new primary's, across a crash and reopen.
#[test]
fn rewind_then_replica_records_follow_the_new_primary() {
    let env = FaultyEnv::new();
    let (old, _) = create_and_open(&env, Path::new("/old"), SIZE);
    let (new, _) = create_and_open(&env, Path::new("/new"), SIZE);
    let from_old = with_sink(&old);
    let mut model = vec![0u8; SIZE as usize];
    // Shared history: seqs 1..=20, replicated.
    for i in 0..20u64 {
        write_block(&old, &mut model, i % 12, i as u8 + 1);
    }
    old.flush().unwrap();
    ship(&from_old, &new);
    let shared = old.last_seq();
    assert_eq!(shared, 20);
    let shared_model = model.clone();
    // The old primary's unconfirmed tail: 5 writes nobody acknowledged, to blocks 100-104,
    // some checkpointed (still in the journal: their segment was not reused).
    for i in 0..5u64 {
        write_block(&old, &mut model, 100 + i, 0xEE);
        if i == 2 {
            old.checkpoint().unwrap();
            old.flush().unwrap();
        }
    }
    from_old.take();
    let report = old.rewind(shared).unwrap();
    assert_eq!(report.from_last_seq, 25);
    assert_eq!(report.to_seq, shared);
    assert_eq!((report.records, report.journal_bytes_found, report.fully_counted), (5, 5 * 4096, true));
    assert_eq!(old.last_seq(), shared);
    assert_eq!(old.durable_seq(), shared);
    assert_eq!(old.status().checkpoint_seq, shared);
    // The regions of the discarded records are still marked, so they can be resynced.
    let changed = old.changed_since(shared).unwrap();
    assert!(changed.regions.contains(&((100 * 4096) / changed.region_bytes)));
    // The new primary moved on meanwhile; the old one resyncs the discarded regions from
    // it at a consistent seq, then follows its records.
    let mut new_model = shared_model.clone();
    let from_new = with_sink(&new);
    for i in 0..6u64 {
        write_block(&new, &mut new_model, 200 + i, 0x33);
    }
    let mut block = vec![0u8; 4096];
    for b in 100..105u64 {
        let seq = new.read_at_seq(b * 4096, &mut block).unwrap();
        assert_eq!(seq, new.last_seq());
        old.write_resync(b * 4096, &block).unwrap();
    }
    old.sync_all().unwrap();
    let records = from_new.take();
    assert_eq!(records.first().map(|r| r.seq), Some(shared + 1));
    for record in &records {
        old.apply_replica(&record.as_record()).unwrap();
    }
    assert_eq!(old.last_seq(), new.last_seq());
    assert!(read_all(&old) == new_model);
    old.flush().unwrap();
    std::mem::forget(old);
    env.crash(&mut rand::thread_rng());
    let (old, report) = reopen(&env, Path::new("/old")).unwrap();
    assert_eq!(report.checkpoint_seq, shared);
    assert_eq!(report.last_seq, shared + 6);
    assert!(read_all(&old) == new_model, "a discarded record came back, or a followed one was lost");
    // Appending continues at the new primary's next seq.
    let next = ReplicaRecord {
        seq: shared + 7,
        epoch: 1,
        kind: RecordKind::Zero,
        flags: 0,
        offset: 0,
        length: 4096,
        payload: &[],
    };
    old.apply_replica(&next).unwrap();
}

#[test]
fn rewinding_to_the_last_seq_changes_nothing_and_counts_nothing() {
    let env = FaultyEnv::new();
    let (volume, _) = create_and_open(&env, Path::new("/noop"), SIZE);
    let mut model = vec![0u8; SIZE as usize];
    for i in 0..3 {
        write_block(&volume, &mut model, i, 9);
    }
    let report = volume.rewind(3).unwrap();
    assert_eq!((report.from_last_seq, report.records, report.fully_counted), (3, 0, true));
    assert_eq!(volume.last_seq(), 3);
    let report = volume.rewind(1).unwrap();
    assert_eq!((report.records, report.journal_bytes_found, report.fully_counted), (2, 8192, true));
    assert_eq!(volume.write(0, &[1; 512], PersistMode::Durable).unwrap(), 2);
}

/// A standby that missed records (they come by resync) jumps forward: nothing is
/// discarded, the next record takes the seq after the jump, and a crash keeps the jump.
#[test]
fn a_rewind_forward_jumps_over_seqs_never_held() {
    let env = FaultyEnv::new();
    let (volume, _) = create_and_open(&env, Path::new("/jump"), SIZE);
    let mut model = vec![0u8; SIZE as usize];
    for i in 0..3 {
        write_block(&volume, &mut model, i, 7);
    }
    let report = volume.rewind(40).unwrap();
    assert_eq!((report.from_last_seq, report.to_seq, report.records, report.fully_counted), (3, 40, 0, true));
    assert_eq!((volume.last_seq(), volume.durable_seq()), (40, 40));
    let next =
        ReplicaRecord { seq: 41, epoch: 1, kind: RecordKind::Zero, flags: 0, offset: 0, length: 4096, payload: &[] };
    volume.apply_replica(&next).unwrap();
    volume.flush().unwrap();
    std::mem::forget(volume);
    env.crash(&mut rand::thread_rng());
    let (volume, report) = reopen(&env, Path::new("/jump")).unwrap();
    assert_eq!((report.checkpoint_seq, report.last_seq), (40, 41));
    model[..4096].fill(0);
    assert!(read_all(&volume) == model);
}

/// The old state when the rewind fails before its superblock write, at each step
/// before it (a crash there looks the same: the writes that failed never happened).
#[test]
fn a_rewind_interrupted_before_its_commit_leaves_the_old_state() {
    for (fault, pattern) in
        [(FaultKind::Write, "slot-0001"), (FaultKind::Write, "volume.tmp"), (FaultKind::Sync, "volume.tmp")]
    {
        let env = FaultyEnv::new();
        let dir = Path::new("/interrupted");
        let (volume, _) = create_and_open(&env, dir, SIZE);
        let mut model = vec![0u8; SIZE as usize];
        for i in 0..10u64 {
            write_block(&volume, &mut model, i, i as u8 + 1);
        }
        env.inject(fault, pattern);
        let err = volume.rewind(4).unwrap_err();
        assert!(matches!(err, Error::Poisoned { .. }), "{fault:?} {pattern}: {err}");
        std::mem::forget(volume);
        env.crash(&mut rand::thread_rng());
        let (volume, report) = reopen(&env, dir).unwrap();
        // Flushed and checkpointed before the fault: nothing lost, and recovery did not
        // walk into the fresh segment (its first seq, 5, does not follow seq 10).
        assert_eq!(report.last_seq, 10, "{fault:?} {pattern}");
        assert_eq!(report.torn_tail, None);
        assert!(read_all(&volume) == model, "{fault:?} {pattern}");
        assert_eq!(write_block(&volume, &mut model, 50, 0x77), 11);
        volume.flush().unwrap();
        std::mem::forget(volume);
        env.crash(&mut rand::thread_rng());
        let (volume, report) = reopen(&env, dir).unwrap();
        assert_eq!(report.last_seq, 11);
        assert!(read_all(&volume) == model);
        // And the rewind works now.
        assert_eq!(volume.rewind(4).unwrap().records, 7);
    }
}

/// The rewound state when a crash comes right after the superblock write, whatever
/// unsynced writes the crash keeps.
#[test]
fn a_rewind_is_kept_by_a_crash_right_after_its_commit() {
    let (mut rng, seed) = rng("a_rewind_is_kept_by_a_crash_right_after_its_commit");
    for round in 0..8 {
        let env = FaultyEnv::new();
        let dir = Path::new("/committed");
        let (volume, _) = create_and_open(&env, dir, SIZE);
        let mut model = vec![0u8; SIZE as usize];
        for i in 0..6u64 {
            write_block(&volume, &mut model, i, 1);
        }
        let kept = model.clone();
        for i in 6..9u64 {
            write_block(&volume, &mut model, i, 2);
        }
        assert_eq!(volume.rewind(6).unwrap().records, 3);
        std::mem::forget(volume);
        env.crash(&mut rng);
        let (volume, report) = reopen(&env, dir).unwrap_or_else(|e| panic!("round {round} (seed {seed}): {e}"));
        assert_eq!(report.checkpoint_seq, 6);
        assert_eq!(report.last_seq, 6, "round {round} (seed {seed})");
        // Blocks of kept records hold them; blocks 6-8 may hold the discarded effects
        // (the caller resyncs them) and stay marked in the change map.
        let contents = read_all(&volume);
        assert!(contents[..6 * 4096] == kept[..6 * 4096]);
        assert!(contents[9 * 4096..] == kept[9 * 4096..]);
        assert!(!volume.changed_since(6).unwrap().regions.is_empty());
        let record = ReplicaRecord {
            seq: 7,
            epoch: 1,
            kind: RecordKind::Write,
            flags: 0,
            offset: 6 * 4096,
            length: 4096,
            payload: &[3; 4096],
        };
        volume.apply_replica(&record).unwrap();
        volume.flush().unwrap();
        std::mem::forget(volume);
        env.crash(&mut rng);
        let (volume, report) = reopen(&env, dir).unwrap();
        assert_eq!(report.last_seq, 7);
        let mut block = [0u8; 4096];
        volume.read(6 * 4096, &mut block).unwrap();
        assert_eq!(block, [3; 4096]);
    }
}

/// Far past the checkpoint, the discarded records are partly gone from the journal.
#[test]
fn a_rewind_past_reused_segments_reports_a_partial_count() {
    let env = FaultyEnv::new();
    let (volume, _) = create_and_open(&env, Path::new("/far"), 8 << 20);
    for i in 0..1200u64 {
        volume.write((i % 2000) * 4096, &[i as u8; 4096], PersistMode::Buffered).unwrap();
    }
    let report = volume.rewind(10).unwrap();
    assert!(!report.fully_counted);
    assert!(report.records > 0 && report.records < 1190, "{report:?}");
    assert_eq!(report.journal_bytes_found, report.records * 4096);
    assert_eq!(volume.last_seq(), 10);
}

/// A reader racing a writer: every `read_at_seq` shows exactly the state after the seq it
/// returns. Each write stores its own seq in the block, and flushes (whose barriers take
/// no seq) are mixed in.
#[test]
fn read_at_seq_returns_the_seq_its_bytes_reflect() {
    let env = FaultyEnv::new();
    let (volume, _) = create_and_open(&env, Path::new("/consistent"), SIZE);
    let volume = Arc::new(volume);
    let writer = {
        let volume = volume.clone();
        std::thread::spawn(move || {
            for seq in 1..=2000u64 {
                let block: Vec<u8> = std::iter::repeat_n(seq.to_le_bytes(), 512).flatten().collect();
                assert_eq!(volume.write(8192, &block, PersistMode::Buffered).unwrap(), seq);
                if seq % 50 == 0 {
                    volume.flush().unwrap();
                }
            }
        })
    };
    let mut buf = vec![0u8; 4096];
    let mut seen = 0;
    while seen < 2000 {
        let seq = volume.read_at_seq(8192, &mut buf).unwrap();
        assert!(seq >= seen, "seqs went backwards");
        let held = u64::from_le_bytes(buf[..8].try_into().unwrap());
        assert!(buf.chunks(8).all(|c| c == &held.to_le_bytes()[..]), "a torn block at seq {seq}");
        assert_eq!(held, seq, "read_at_seq said seq {seq} but the bytes are those of seq {held}");
        seen = seq;
    }
    writer.join().unwrap();
}

#[test]
fn resync_writes_are_durable_after_sync_all_and_never_overwritten_by_replay() {
    let (mut rng, _seed) = rng("resync_writes_are_durable_after_sync_all_and_never_overwritten_by_replay");
    let env = FaultyEnv::new();
    let dir = Path::new("/resync");
    let (volume, _) = create_and_open(&env, dir, SIZE);
    volume.write(0, &[1; 8192], PersistMode::Buffered).unwrap();
    volume.write(65536, &[1; 4096], PersistMode::Buffered).unwrap();
    volume.flush().unwrap();
    volume.write(4096, &[2; 4096], PersistMode::Buffered).unwrap();
    // Resync over blocks that journal records (durable and not) also wrote.
    volume.write_resync(0, &[9; 8192]).unwrap();
    volume.zero_resync(65536, 4096).unwrap();
    volume.write_resync(1 << 20, &[8; 4096]).unwrap();
    let last = volume.last_seq();
    assert_eq!(volume.sync_all().unwrap(), last);
    assert_eq!(volume.status().checkpoint_seq, last);
    assert!(volume.changed_since(last).unwrap().regions.contains(&((1 << 20) / 65536)));
    // A record after the resync is replayed on top of it.
    volume.write(4096, &[3; 4096], PersistMode::Durable).unwrap();
    // sync_all with no new record still syncs the resync writes made since.
    volume.write_resync(8192, &[7; 4096]).unwrap();
    assert_eq!(volume.sync_all().unwrap(), last + 1);
    std::mem::forget(volume);
    env.crash(&mut rng);
    let (volume, report) = reopen(&env, dir).unwrap();
    assert_eq!(report.last_seq, last + 1);
    let mut expected = vec![0u8; SIZE as usize];
    expected[..4096].fill(9);
    expected[4096..8192].fill(3);
    expected[8192..12288].fill(7);
    expected[(1 << 20)..(1 << 20) + 4096].fill(8);
    assert!(read_all(&volume) == expected);
}

#[test]
fn the_epoch_is_persisted_and_carried_by_new_records() {
    let env = FaultyEnv::new();
    let dir = Path::new("/epoch");
    let (volume, _) = create_and_open(&env, dir, SIZE);
    let sink = with_sink(&volume);
    assert_eq!(volume.epoch(), 1);
    volume.write(0, &[1; 512], PersistMode::Buffered).unwrap();
    volume.set_epoch(3).unwrap();
    volume.set_epoch(3).unwrap();
    assert!(matches!(volume.set_epoch(2), Err(Error::InvalidArgument(_))));
    volume.write(0, &[2; 512], PersistMode::Buffered).unwrap();
    volume.mark_snapshot("after-promotion").unwrap();
    let epochs: Vec<_> = sink.take().iter().map(|r| (r.seq, r.epoch, r.kind)).collect();
    assert_eq!(epochs, [(1, 1, RecordKind::Write), (2, 3, RecordKind::Write), (3, 3, RecordKind::Snapshot)]);
    assert_eq!(volume.status().epoch, 3);
    // Durable at once: a crash right after keeps it.
    std::mem::forget(volume);
    env.crash(&mut rand::thread_rng());
    let (volume, _) = reopen(&env, dir).unwrap();
    assert_eq!(volume.epoch(), 3);
    assert_eq!(volume.status().epoch, 3);
}

/// Barriers took a seq of their own, so a standby (which group-commits on its own
/// schedule) could not match its primary's seqs. Fixed: a barrier carries the seq of the
/// record before it, and a flush no longer moves `last_seq`.
#[test]
fn flushes_do_not_consume_sequence_numbers() {
    let env = FaultyEnv::new();
    let (volume, _) = create_and_open(&env, Path::new("/barriers"), SIZE);
    volume.write(0, &[1; 4096], PersistMode::Buffered).unwrap();
    assert_eq!(volume.flush().unwrap(), 1);
    assert_eq!(volume.flush().unwrap(), 1);
    assert_eq!(volume.write(0, &[1; 4096], PersistMode::Durable).unwrap(), 2);
    volume.checkpoint().unwrap();
    let status = volume.status();
    assert_eq!((status.last_seq, status.durable_seq, status.checkpoint_seq), (2, 2, 2));
}

#[test]
fn a_removed_sink_sees_nothing_more() {
    let env = FaultyEnv::new();
    let (volume, _) = create_and_open(&env, Path::new("/unsink"), SIZE);
    let sink = with_sink(&volume);
    volume.write(0, &[1; 512], PersistMode::Buffered).unwrap();
    assert_eq!(volume.set_record_sink(None), 1);
    volume.write(0, &[2; 512], PersistMode::Buffered).unwrap();
    assert_eq!(sink.take().iter().map(|r| r.seq).collect::<Vec<_>>(), [1]);
}
