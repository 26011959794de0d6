//! Regression tests for recovery bugs found in review; each names the bug and the fix.

use std::path::Path;
use std::sync::Arc;

use keel_engine::format::{RecordHeader, RecordKind, SEGMENT_HEADER_COPY_LEN, SEGMENT_HEADER_LEN};
use keel_engine::testing::FaultyEnv;
use keel_engine::{Error, PersistMode, Volume, VolumeOptions};

use crate::support::{manual_checkpoints, reopen};

fn create(env: &FaultyEnv, dir: &Path, size: u64) -> Volume {
    let options = VolumeOptions {
        segment_bytes: 1 << 20,
        segment_count_max: 4,
        change_region_bytes: 64 << 10,
        extent_file_bytes: 1 << 20,
    };
    Volume::create(Arc::new(env.clone()), dir, "t", size, &options).unwrap();
    Volume::open(Arc::new(env.clone()), dir, &manual_checkpoints()).unwrap().0
}

fn block(volume: &Volume, index: u64) -> u8 {
    let mut buf = [0u8; 4096];
    volume.read(index * 4096, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == buf[0]), "block {index} is mixed");
    buf[0]
}

/// Records that recovery dropped came back. Recovery erased only the header of a slot
/// past the end; when the journal later reached the same position with the same seq, a
/// dropped record of the old history validated and replaced an acknowledged write. Fixed
/// by a random nonce per use of a slot that every record's crc includes.
#[test]
fn records_dropped_by_recovery_never_come_back() {
    let env = FaultyEnv::new();
    let dir = Path::new("/resurrect");
    let volume = create(&env, dir, 8 << 20);
    for i in 0..300u64 {
        volume.write(i * 4096, &[0xAA; 4096], PersistMode::Buffered).unwrap();
    }
    std::mem::forget(volume);
    env.kill_process();
    let record = RecordHeader::encoded_len(4096) as u64;
    env.corrupt(Path::new("/resurrect/journal/slot-0000.seg"), SEGMENT_HEADER_LEN as u64 + 249 * record + 100, 0xff);
    let (volume, report) = reopen(&env, dir).unwrap();
    assert_eq!(report.torn_tail.map(|t| t.seq), Some(250));
    volume.write(280 * 4096, &[0xBB; 8192], PersistMode::Durable).unwrap();
    for i in 0..9u64 {
        volume.write((1000 + i) * 4096, &[0xCC; 4096], PersistMode::Buffered).unwrap();
    }
    std::mem::forget(volume);
    env.kill_process();
    let (volume, _) = reopen(&env, dir).unwrap();
    assert_eq!(block(&volume, 280), 0xBB, "an acknowledged write was replaced by a dropped record");
    assert_eq!(block(&volume, 281), 0xBB);
}

/// Guest data made a healthy volume refuse to open: a barrier record inside a write's
/// payload passed the "later barrier proves durability" check. Fixed: a proving barrier
/// must validate with the segment's nonce (which guests never see) and come after the
/// missing record.
#[test]
fn a_barrier_forged_in_guest_data_does_not_fake_corruption() {
    let env = FaultyEnv::new();
    let dir = Path::new("/forge");
    let volume = create(&env, dir, 8 << 20);
    for _ in 0..200 {
        volume.write(4096, &[0xCC; 4096], PersistMode::Buffered).unwrap();
    }
    let mut forged = Vec::new();
    for nonce in [0u64, 1] {
        RecordHeader::new(RecordKind::Barrier, 0, u64::MAX - 1, 1, u64::MAX, 0).encode_into(&[], nonce, &mut forged);
        let mut guest = vec![0u8; 4096];
        guest[..forged.len()].copy_from_slice(&forged);
        volume.write(0, &guest, PersistMode::Durable).unwrap();
    }
    for _ in 0..300 {
        volume.write(4096, &[0xCC; 4096], PersistMode::Buffered).unwrap();
    }
    volume.checkpoint().unwrap();
    for _ in 0..100 {
        volume.write(4096, &[0xCC; 4096], PersistMode::Buffered).unwrap();
    }
    volume.close().unwrap();
    assert!(reopen(&env, dir).is_ok());
}

/// A snapshot name of any length was accepted, and a record larger than a segment was
/// written past the slot's end, so the next open refused the volume. Fixed: names are
/// limited to 256 bytes.
#[test]
fn oversized_snapshot_names_are_refused() {
    let env = FaultyEnv::new();
    let dir = Path::new("/snapname");
    let volume = create(&env, dir, 4 << 20);
    assert!(matches!(volume.mark_snapshot(&"x".repeat(1 << 20)), Err(Error::InvalidArgument(_))));
    assert!(volume.mark_snapshot("nightly-2026-11-30").is_ok());
    std::mem::forget(volume);
    env.kill_process();
    assert!(reopen(&env, dir).is_ok());
}

/// A damaged segment header silently dropped acknowledged records in that segment (the
/// slot looked free). Fixed: two header copies, written and erased one at a time; one
/// damaged copy is survived, two are reported as corruption.
#[test]
fn a_damaged_segment_header_neither_loses_records_nor_goes_unnoticed() {
    let env = FaultyEnv::new();
    let dir = Path::new("/hdr");
    let volume = create(&env, dir, 8 << 20);
    for i in 0..260u64 {
        volume.write(i * 4096, &[0xAA; 4096], PersistMode::Buffered).unwrap();
    }
    volume.flush().unwrap();
    assert!(volume.status().journal_segments >= 2);
    let last = volume.status().last_seq;
    std::mem::forget(volume);
    env.kill_process();
    let slot = Path::new("/hdr/journal/slot-0001.seg");
    env.corrupt(slot, 20, 0x01);
    let (volume, report) = reopen(&env, dir).unwrap();
    assert!(report.last_seq >= last, "records were dropped: {} < {last}", report.last_seq);
    assert_eq!(block(&volume, 259), 0xAA);
    std::mem::forget(volume);
    env.kill_process();
    env.corrupt(slot, 20, 0x01);
    env.corrupt(slot, SEGMENT_HEADER_COPY_LEN as u64 + 20, 0x01);
    env.corrupt(slot, 21, 0x01);
    assert!(matches!(reopen(&env, dir), Err(Error::Corruption { .. })));
}

/// Every background checkpoint of an idle volume did real work (the flush inside it
/// appended a barrier, so the position always moved). Fixed: a checkpoint with no new
/// data records since the last one is skipped.
#[test]
fn checkpoints_of_an_idle_volume_are_free() {
    let env = FaultyEnv::new();
    let volume = create(&env, Path::new("/idle"), 4 << 20);
    volume.write(0, &[1u8; 4096], PersistMode::Buffered).unwrap();
    volume.checkpoint().unwrap();
    let after_first = volume.status();
    for _ in 0..3 {
        volume.checkpoint().unwrap();
    }
    let status = volume.status();
    assert_eq!(status.last_seq, after_first.last_seq);
    assert_eq!(status.checkpoint_seq, after_first.checkpoint_seq);
}

/// Two crashes could make a slot unreadable: a crash tore header copy B during a roll,
/// nothing rewrote it, and a second crash tore copy A when the slot was reused. Fixed:
/// recovery rewrites a torn copy from the good one.
#[test]
fn a_torn_header_copy_is_repaired_before_the_slot_is_reused() {
    let env = FaultyEnv::new();
    let dir = Path::new("/twice");
    let volume = create(&env, dir, 8 << 20);
    for i in 0..260u64 {
        volume.write(i * 4096, &[0xAA; 4096], PersistMode::Buffered).unwrap();
    }
    volume.flush().unwrap();
    std::mem::forget(volume);
    env.kill_process();
    let slot = Path::new("/twice/journal/slot-0001.seg");
    // First crash: copy B torn.
    env.corrupt(slot, SEGMENT_HEADER_COPY_LEN as u64 + 20, 0x01);
    let (volume, _) = reopen(&env, dir).unwrap();
    std::mem::forget(volume);
    env.kill_process();
    // Second crash, as if during the next reuse: copy A torn.
    env.corrupt(slot, 20, 0x01);
    let (volume, _) = reopen(&env, dir).expect("the repaired copy B carries the slot");
    assert_eq!(block(&volume, 259), 0xAA);
}
