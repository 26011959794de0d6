//! Recovery's three outcomes: a clean journal, a torn tail (dropped and reported), and
//! corruption inside the acknowledged journal (refused, with its position named).

use std::path::Path;

use keel_engine::testing::{FaultKind, FaultyEnv};
use keel_engine::{ChangeMapState, Error, PersistMode};

use crate::support::{create_and_open, reopen};

const SIZE: u64 = 1 << 20;

fn read_all(volume: &keel_engine::Volume) -> Vec<u8> {
    let mut buf = vec![0u8; SIZE as usize];
    volume.read(0, &mut buf).unwrap();
    buf
}

/// Journal file offset of the first record after the segment header.
const FIRST_RECORD: u64 = keel_engine::format::SEGMENT_HEADER_LEN as u64;

#[test]
fn torn_tail_is_dropped_and_reported() {
    let env = FaultyEnv::new();
    let dir = Path::new("/torn");
    let (volume, _) = create_and_open(&env, dir, SIZE);
    volume.write(0, &[1u8; 4096], PersistMode::Buffered).unwrap();
    volume.flush().unwrap();
    let position = volume.status();
    volume.write(8192, &[2u8; 4096], PersistMode::Buffered).unwrap();
    std::mem::forget(volume);
    env.kill_process();
    // Tear the unacknowledged record: flip a byte in its payload.
    let record_len = keel_engine::format::RecordHeader::encoded_len(4096) as u64;
    let barrier_len = keel_engine::format::RecordHeader::encoded_len(0) as u64;
    let torn_at = FIRST_RECORD + record_len + barrier_len;
    env.corrupt(Path::new("/torn/journal/slot-0000.seg"), torn_at + 100, 0xff);
    let (volume, report) = reopen(&env, dir).unwrap();
    let torn = report.torn_tail.expect("the torn record is reported");
    assert_eq!(torn.offset, torn_at);
    assert_eq!(torn.seq, position.last_seq + 1);
    assert_eq!(torn.bytes_dropped, record_len);
    let contents = read_all(&volume);
    assert!(contents[..4096].iter().all(|&b| b == 1));
    // The torn write is gone from the store too, even though the store had it cached.
    assert!(contents[8192..12288].iter().all(|&b| b == 0) || contents[8192..12288].iter().all(|&b| b == 2));
    // The journal continues cleanly after the truncation point.
    volume.write(8192, &[3u8; 4096], PersistMode::Durable).unwrap();
    drop(volume);
    let (volume, report) = reopen(&env, dir).unwrap();
    assert_eq!(report.torn_tail, None);
    assert!(read_all(&volume)[8192..12288].iter().all(|&b| b == 3));
}

#[test]
fn corruption_in_the_acknowledged_journal_refuses_to_open() {
    let env = FaultyEnv::new();
    let dir = Path::new("/rot");
    let (volume, _) = create_and_open(&env, dir, SIZE);
    volume.write(0, &[1u8; 4096], PersistMode::Buffered).unwrap();
    volume.write(4096, &[2u8; 4096], PersistMode::Buffered).unwrap();
    volume.flush().unwrap();
    volume.write(8192, &[3u8; 4096], PersistMode::Durable).unwrap();
    std::mem::forget(volume);
    env.kill_process();
    // A bit flip in the first record, which a later barrier proves was durable.
    env.corrupt(Path::new("/rot/journal/slot-0000.seg"), FIRST_RECORD + 1000, 0x01);
    let err = reopen(&env, dir).unwrap_err();
    let Error::Corruption { file, detail, .. } = &err else { panic!("expected corruption, got {err}") };
    assert!(file.ends_with("slot-0000.seg"), "{file:?}");
    assert!(detail.contains(&format!("offset {FIRST_RECORD}")), "{detail}");
    assert!(detail.contains("seq 1"), "{detail}");
    let message = err.to_string();
    assert!(message.contains("keel-inspect"), "the error tells the operator what to run: {message}");
    // Refusing is sticky: a second attempt fails the same way instead of serving data.
    assert!(matches!(reopen(&env, dir), Err(Error::Corruption { .. })));
}

#[test]
fn failed_fsync_poisons_the_volume_and_keeps_what_was_acknowledged() {
    let env = FaultyEnv::new();
    let dir = Path::new("/eio");
    let (volume, _) = create_and_open(&env, dir, SIZE);
    volume.write(0, &[7u8; 4096], PersistMode::Durable).unwrap();
    volume.write(4096, &[8u8; 4096], PersistMode::Buffered).unwrap();
    env.inject(FaultKind::Sync, "journal");
    let err = volume.flush().unwrap_err();
    assert!(matches!(err, Error::Poisoned { .. }), "{err}");
    // Never retried: the next flush and write fail without touching the disk.
    assert!(matches!(volume.flush(), Err(Error::Poisoned { .. })));
    assert!(matches!(volume.write(0, &[9u8; 512], PersistMode::Buffered), Err(Error::Poisoned { .. })));
    // Reads still work.
    assert_eq!(read_all(&volume)[..4096], [7u8; 4096]);
    std::mem::forget(volume);
    env.crash(&mut rand::thread_rng());
    let (volume, _) = reopen(&env, dir).unwrap();
    assert_eq!(read_all(&volume)[..4096], [7u8; 4096]);
}

#[test]
fn failed_block_store_write_poisons_the_volume() {
    let env = FaultyEnv::new();
    let dir = Path::new("/eio-data");
    let (volume, _) = create_and_open(&env, dir, SIZE);
    env.inject(FaultKind::Write, "data/extent");
    assert!(matches!(volume.write(0, &[1u8; 4096], PersistMode::Buffered), Err(Error::Poisoned { .. })));
    assert!(volume.status().poisoned.is_some());
    assert!(matches!(volume.trim(0, 4096, PersistMode::Buffered), Err(Error::Poisoned { .. })));
}

#[test]
fn change_map_survives_crashes_and_reports_its_own_loss() {
    let env = FaultyEnv::new();
    let dir = Path::new("/cmap");
    let (volume, _) = create_and_open(&env, dir, SIZE);
    volume.write(0, &[1u8; 4096], PersistMode::Buffered).unwrap();
    volume.checkpoint().unwrap();
    volume.write(5 * 65536 + 10, &[1u8; 100], PersistMode::Durable).unwrap();
    let set = volume.changed_since(0).unwrap();
    assert_eq!(set.regions, vec![0, 5]);
    std::mem::forget(volume);
    env.crash(&mut rand::thread_rng());
    let (volume, report) = reopen(&env, dir).unwrap();
    assert_eq!(report.change_map, ChangeMapState::Trusted);
    assert_eq!(volume.changed_since(0).unwrap().regions, vec![0, 5]);
    let last = volume.status().last_seq;
    drop(volume);
    // Losing the map is detected, and callers are told to scan fully.
    env.corrupt(Path::new("/cmap/changemap.bin"), 0, 0xff);
    let (volume, report) = reopen(&env, dir).unwrap();
    assert!(matches!(report.change_map, ChangeMapState::Rebuilt { .. }));
    assert!(matches!(volume.changed_since(0), Err(Error::ChangeMapUnavailable { .. })));
    volume.write(3 * 65536, &[1u8; 512], PersistMode::Buffered).unwrap();
    assert_eq!(volume.changed_since(last).unwrap().regions, vec![3]);
    drop(volume);
    // A flipped bit in the bitmap itself is caught by its checksum.
    env.corrupt(Path::new("/cmap/changemap.bin"), 4096, 0x80);
    let (_volume, report) = reopen(&env, dir).unwrap();
    let ChangeMapState::Rebuilt { reason } = report.change_map else { panic!("a corrupt bitmap was trusted") };
    assert!(reason.contains("checksum"), "{reason}");
}

#[test]
fn a_volume_cannot_be_opened_twice() {
    let env = FaultyEnv::new();
    let dir = Path::new("/locked");
    let (_volume, _) = create_and_open(&env, dir, SIZE);
    assert!(matches!(reopen(&env, dir), Err(Error::Locked { .. })));
}

#[test]
fn requests_outside_the_volume_are_refused() {
    let env = FaultyEnv::new();
    let (volume, _) = create_and_open(&env, Path::new("/range"), SIZE);
    assert!(matches!(volume.write(SIZE - 100, &[0; 200], PersistMode::Buffered), Err(Error::OutOfRange { .. })));
    assert!(matches!(volume.trim(u64::MAX - 10, 100, PersistMode::Buffered), Err(Error::OutOfRange { .. })));
    let mut buf = [0u8; 8];
    assert!(matches!(volume.read(SIZE, &mut buf), Err(Error::OutOfRange { .. })));
}
