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
