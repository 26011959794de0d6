//! The volume against an in-memory model under random write/zero/trim/flush/checkpoint/
//! reopen sequences.

use std::sync::Arc;

use keel_engine::testing::FaultyEnv;
use keel_engine::{Env, PersistMode, PosixEnv, Volume};
use proptest::prelude::*;

use crate::support::{manual_checkpoints, small_options, SECTOR};

const SIZE: u64 = 2 << 20;

#[derive(Debug, Clone)]
enum Op {
    Write { sector: u64, sectors: u64, fill: u8, fua: bool },
    Zero { sector: u64, sectors: u64, punch: bool },
    Trim { sector: u64, sectors: u64 },
    Read { sector: u64, sectors: u64 },
    Flush,
    Checkpoint,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    let max = SIZE / SECTOR as u64;
    let range = (0..max).prop_flat_map(move |s| (Just(s), 1..=(max - s).min(300)));
    prop_oneof![
        6 => (range.clone(), any::<u8>(), any::<bool>()).prop_map(|((sector, sectors), fill, fua)| Op::Write { sector, sectors, fill, fua }),
        1 => (range.clone(), any::<bool>()).prop_map(|((sector, sectors), punch)| Op::Zero { sector, sectors, punch }),
        1 => range.clone().prop_map(|(sector, sectors)| Op::Trim { sector, sectors }),
        3 => range.prop_map(|(sector, sectors)| Op::Read { sector, sectors }),
        1 => Just(Op::Flush),
        1 => Just(Op::Checkpoint),
        1 => Just(Op::Reopen),
    ]
}

fn pattern(sector: u64, sectors: u64, fill: u8) -> Vec<u8> {
    (0..sectors * SECTOR as u64).map(|i| fill.wrapping_add(((sector * 7 + i / 13) % 251) as u8)).collect()
}

fn run(env: Arc<dyn Env>, dir: &std::path::Path, ops: &[Op]) {
    Volume::create(env.clone(), dir, "model", SIZE, &small_options()).unwrap();
    let (mut volume, _) = Volume::open(env.clone(), dir, &manual_checkpoints()).unwrap();
    let mut model = vec![0u8; SIZE as usize];
    for op in ops {
        match *op {
            Op::Write { sector, sectors, fill, fua } => {
                let data = pattern(sector, sectors, fill);
                let at = sector * SECTOR as u64;
                let mode = if fua { PersistMode::Durable } else { PersistMode::Buffered };
                volume.write(at, &data, mode).unwrap();
                model[at as usize..at as usize + data.len()].copy_from_slice(&data);
            }
            Op::Zero { sector, sectors, punch } => {
                let (at, len) = (sector * SECTOR as u64, sectors * SECTOR as u64);
                volume.write_zeroes(at, len, punch, PersistMode::Buffered).unwrap();
                model[at as usize..(at + len) as usize].fill(0);
            }
            Op::Trim { sector, sectors } => {
                let (at, len) = (sector * SECTOR as u64, sectors * SECTOR as u64);
                volume.trim(at, len, PersistMode::Buffered).unwrap();
                model[at as usize..(at + len) as usize].fill(0);
            }
            Op::Read { sector, sectors } => {
                let (at, len) = (sector * SECTOR as u64, sectors * SECTOR as u64);
                let mut buf = vec![0u8; len as usize];
                volume.read(at, &mut buf).unwrap();
                assert!(buf == model[at as usize..(at + len) as usize], "read {at}+{len} differs from the model");
            }
            Op::Flush => {
                volume.flush().unwrap();
            }
            Op::Checkpoint => volume.checkpoint().unwrap(),
            Op::Reopen => {
                volume.close().unwrap();
                volume = Volume::open(env.clone(), dir, &manual_checkpoints()).unwrap().0;
            }
        }
        let status = volume.status();
        assert!(status.checkpoint_seq <= status.durable_seq.max(status.checkpoint_seq));
        assert!(status.durable_seq <= status.last_seq);
        assert!(status.journal_segments <= 3, "journal grew past its bound");
    }
    let mut all = vec![0u8; SIZE as usize];
    volume.read(0, &mut all).unwrap();
    assert!(all == model, "final contents differ from the model");
    volume.close().unwrap();
    let (volume, report) = Volume::open(env, dir, &manual_checkpoints()).unwrap();
    assert_eq!(report.torn_tail, None);
    volume.read(0, &mut all).unwrap();
    assert!(all == model, "contents after a clean reopen differ from the model");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn volume_matches_model_in_memory(ops in proptest::collection::vec(op(), 1..120)) {
        run(Arc::new(FaultyEnv::new()), std::path::Path::new("/vol"), &ops);
    }

    #[test]
    fn volume_matches_model_on_disk(ops in proptest::collection::vec(op(), 1..80)) {
        let dir = tempfile::tempdir().unwrap();
        run(Arc::new(PosixEnv::posix()), &dir.path().join("vol"), &ops);
    }

    #[test]
    fn volume_matches_model_on_disk_through_io_uring(ops in proptest::collection::vec(op(), 1..80)) {
        // io_uring works on the machines we test on; a kernel that refuses it fails here
        // rather than silently testing the POSIX path twice.
        let env = PosixEnv::uring().expect("io_uring refused by this kernel");
        let dir = tempfile::tempdir().unwrap();
        run(Arc::new(env), &dir.path().join("vol"), &ops);
    }
}

#[test]
fn many_writes_wrap_the_journal_within_its_bound() {
    let env = FaultyEnv::new();
    let dir = std::path::Path::new("/wrap");
    let (volume, _) = crate::support::create_and_open(&env, dir, SIZE);
    let mut model = vec![0u8; SIZE as usize];
    for i in 0..400u64 {
        let at = (i * 37 % 500) * 4096;
        let data = pattern(i, 16, i as u8);
        let at = at.min(SIZE - data.len() as u64);
        volume.write(at, &data, PersistMode::Buffered).unwrap();
        model[at as usize..at as usize + data.len()].copy_from_slice(&data);
        if i % 50 == 0 {
            volume.flush().unwrap();
        }
    }
    assert!(volume.status().journal_segments <= 3);
    drop(volume);
    let (volume, _) = crate::support::reopen(&env, dir).unwrap();
    let mut all = vec![0u8; SIZE as usize];
    volume.read(0, &mut all).unwrap();
    assert!(all == model);
}

#[test]
fn volume_of_sixteen_tebibytes_spans_extent_files() {
    let dir = tempfile::tempdir().unwrap();
    let env: Arc<dyn Env> = Arc::new(PosixEnv::posix());
    let size = 16u64 << 40;
    let options = keel_engine::VolumeOptions { segment_bytes: 1 << 20, ..keel_engine::VolumeOptions::default() };
    Volume::create(env.clone(), dir.path(), "big", size, &options).unwrap();
    let (volume, _) = Volume::open(env.clone(), dir.path(), &manual_checkpoints()).unwrap();
    let last = size - 4096;
    volume.write(last, &[0x5a; 4096], PersistMode::Durable).unwrap();
    // A write across the boundary between two extent files.
    let boundary = 1u64 << 40;
    volume.write(boundary - 2048, &[0xa5; 4096], PersistMode::Durable).unwrap();
    volume.close().unwrap();
    let (volume, _) = Volume::open(env, dir.path(), &manual_checkpoints()).unwrap();
    let mut buf = [0u8; 4096];
    volume.read(last, &mut buf).unwrap();
    assert_eq!(buf, [0x5a; 4096]);
    volume.read(boundary - 2048, &mut buf).unwrap();
    assert_eq!(buf, [0xa5; 4096]);
    assert!(matches!(volume.read(size - 4095, &mut buf), Err(keel_engine::Error::OutOfRange { .. })));
}

#[test]
fn background_checkpoints_and_spare_slots_keep_the_data() {
    let env = FaultyEnv::new();
    let dir = std::path::Path::new("/spare");
    let options = keel_engine::VolumeOptions { segment_count_max: 6, ..small_options() };
    Volume::create(Arc::new(env.clone()), dir, "spare", SIZE, &options).unwrap();
    let open = keel_engine::OpenOptions {
        checkpoint_interval: std::time::Duration::from_millis(5),
        background_checkpoints: true,
    };
    let (volume, _) = Volume::open(Arc::new(env.clone()), dir, &open).unwrap();
    let mut model = vec![0u8; SIZE as usize];
    for i in 0..600u64 {
        let data = pattern(i, 32, i as u8);
        let at = ((i * 7919) % (SIZE / 512 - 32)) * 512;
        volume.write(at, &data, PersistMode::Buffered).unwrap();
        model[at as usize..at as usize + data.len()].copy_from_slice(&data);
        if i % 20 == 0 {
            volume.flush().unwrap();
        }
    }
    assert!(volume.status().journal_segments <= 6);
    volume.close().unwrap();
    let (volume, _) = Volume::open(Arc::new(env), dir, &manual_checkpoints()).unwrap();
    let mut all = vec![0u8; SIZE as usize];
    volume.read(0, &mut all).unwrap();
    assert!(all == model);
}
