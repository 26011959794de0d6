//! Recovery of a journal segment with arbitrary contents.
//!
//! Each input creates a fresh 1 MiB volume in the in-memory `FaultyEnv`, rewrites the
//! header copies of its first journal segment with a known nonce (so seeds can carry
//! records with valid crcs), overwrites the segment after header copy A with the input,
//! and opens the volume. Opening must return `Ok` or `Err`, never panic or hang; if it
//! succeeds the whole volume must be readable, closing must succeed, and reopening must
//! find the same contents.
//!
//! Input layout: byte 0 holds options, the rest is segment bytes.
//! - bit 1 clear: the bytes replace the records, from `SEGMENT_HEADER_LEN`; set: they
//!   start at `SEGMENT_HEADER_COPY_LEN`, so header copy B is fuzzed too.
//! - bit 2 (with bit 1): if copy B decodes once its crc is recomputed, re-encode it with
//!   this volume's (random) id, so a fuzzed copy B can be valid and win over copy A.
//! - bit 0: recompute the crc (with [`NONCE`]) of each record in the chain that starts
//!   at the first record, so mutated records still pass their crc and reach the scan's
//!   later checks.
#![no_main]

use std::path::Path;
use std::sync::Arc;

use keel_engine::format::{SegmentHeader, SEGMENT_HEADER_COPY_LEN, SEGMENT_HEADER_LEN};
use keel_engine::testing::FaultyEnv;
use keel_engine::{list_segments, Env, OpenMode, OpenOptions, Volume, VolumeOptions};
use keel_fuzz::{crc_offsets, reencode_record_chain, with_crc, NONCE};

const VOLUME_BYTES: u64 = 1 << 20;
const SEGMENT_BYTES: u64 = 1 << 20;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&options, bytes)) = data.split_first() else {
        return;
    };
    let fix_crcs = options & 0b01 != 0;
    let write_at = if options & 0b10 != 0 { SEGMENT_HEADER_COPY_LEN } else { SEGMENT_HEADER_LEN };
    let mut bytes = bytes[..bytes.len().min(SEGMENT_BYTES as usize - write_at)].to_vec();

    let faulty = FaultyEnv::new();
    let _cleanup = RemoveFilesOnDrop(faulty.clone());
    let env: Arc<dyn Env> = Arc::new(faulty);
    let dir = Path::new("/v");
    let volume_options = VolumeOptions {
        segment_bytes: SEGMENT_BYTES,
        segment_count_max: 3,
        change_region_bytes: 64 << 10,
        extent_file_bytes: 1 << 20,
    };
    Volume::create(Arc::clone(&env), dir, "fuzz", VOLUME_BYTES, &volume_options).expect("create the volume");
    let volume_id = Volume::read_superblock(env.as_ref(), dir).expect("read the superblock").volume_id;
    let segments = list_segments(env.as_ref(), dir, volume_id).expect("list the journal segments");
    let [segment] = segments.as_slice() else {
        panic!("a new volume has one journal segment, found {segments:?}");
    };
    let header = segment.header.expect("a new volume's first segment has a header");
    let header = SegmentHeader { nonce: NONCE, ..header }.encode();
    let file = env.open(&segment.path, OpenMode::Existing).expect("open the journal segment");
    file.write_at(&header, 0).expect("write header copy A");
    file.write_at(&header, SEGMENT_HEADER_COPY_LEN as u64).expect("write header copy B");
    if options & 0b110 == 0b110 {
        let copy_b_len = bytes.len().min(SEGMENT_HEADER_COPY_LEN);
        if let Ok(copy_b) = SegmentHeader::decode(&with_crc(&bytes[..copy_b_len], crc_offsets().segment)) {
            let encoded = SegmentHeader { volume_id, ..copy_b }.encode();
            bytes[..copy_b_len].copy_from_slice(&encoded[..copy_b_len]);
        }
    }
    if fix_crcs {
        if let Some(records) = bytes.get_mut(SEGMENT_HEADER_LEN - write_at..) {
            reencode_record_chain(records);
        }
    }
    file.write_at(&bytes, write_at as u64).expect("write the journal segment");
    file.sync().expect("sync the journal segment");

    let open_options = OpenOptions { background_checkpoints: false, ..OpenOptions::default() };
    let Ok((volume, _report)) = Volume::open(Arc::clone(&env), dir, &open_options) else {
        return;
    };
    let mut contents = vec![0u8; VOLUME_BYTES as usize];
    volume.read(0, &mut contents).expect("read the whole recovered volume");
    volume.close().expect("close the recovered volume");

    let (volume, _report) = Volume::open(env, dir, &open_options).expect("reopen a cleanly closed volume");
    let mut reread = vec![0u8; VOLUME_BYTES as usize];
    volume.read(0, &mut reread).expect("read the reopened volume");
    assert!(contents == reread, "contents changed across a clean close and reopen");
    volume.close().expect("close the reopened volume");
});

/// Removes every file of the environment at the end of an iteration. `FaultyEnv` files
/// point back at the environment that holds them (an `Arc` cycle), so without this each
/// iteration's files would stay allocated until the RSS limit ends the run.
struct RemoveFilesOnDrop(FaultyEnv);

impl Drop for RemoveFilesOnDrop {
    fn drop(&mut self) {
        for path in self.0.files() {
            let _ = self.0.remove_file(&path);
        }
    }
}
