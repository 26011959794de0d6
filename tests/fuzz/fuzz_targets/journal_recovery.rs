//! Recovery of a journal segment with arbitrary contents.
//!
//! Each input creates a fresh 1 MiB volume in the in-memory `FaultyEnv`, replaces the
//! records of its first journal segment (everything after the valid segment header
//! that `Volume::create` wrote) with the input, and opens the volume. Opening must
//! return `Ok` or `Err`, never panic or hang; if it succeeds the whole volume must be
//! readable, closing must succeed, and reopening must find the same contents.
//!
//! Input layout: byte 0 holds options (bit 0: recompute the crc of each record in the
//! chain that starts at the segment's first record, so the fuzzer can make records the
//! scan accepts), the rest is the segment body from offset `SEGMENT_HEADER_LEN`.
#![no_main]

use std::path::Path;
use std::sync::Arc;

use keel_engine::format::{RecordHeader, RECORD_HEADER_LEN, SEGMENT_HEADER_LEN};
use keel_engine::testing::FaultyEnv;
use keel_engine::{list_segments, Env, OpenMode, OpenOptions, Volume, VolumeOptions};

const VOLUME_BYTES: u64 = 1 << 20;
const SEGMENT_BYTES: u64 = 1 << 20;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&options, body)) = data.split_first() else {
        return;
    };
    let body_len_max = (SEGMENT_BYTES as usize) - SEGMENT_HEADER_LEN;
    let mut body = body[..body.len().min(body_len_max)].to_vec();
    if options & 1 != 0 {
        fix_record_crcs(&mut body);
    }

    let env = FaultyEnv::new();
    let shared: Arc<dyn Env> = Arc::new(env.clone());
    let dir = Path::new("/v");
    let volume_options = VolumeOptions {
        segment_bytes: SEGMENT_BYTES,
        segment_count_max: 3,
        change_region_bytes: 64 << 10,
        extent_file_bytes: 1 << 20,
    };
    Volume::create(Arc::clone(&shared), dir, "fuzz", VOLUME_BYTES, &volume_options).expect("create the volume");
    let volume_id = Volume::read_superblock(shared.as_ref(), dir).expect("read the superblock").volume_id;
    let segments = list_segments(shared.as_ref(), dir, volume_id).expect("list the journal segments");
    let [segment] = segments.as_slice() else {
        panic!("a new volume has one journal segment, found {segments:?}");
    };
    let file = shared.open(&segment.path, OpenMode::Existing).expect("open the journal segment");
    file.write_at(&body, SEGMENT_HEADER_LEN as u64).expect("write the journal segment");
    file.sync().expect("sync the journal segment");

    let open_options = OpenOptions { background_checkpoints: false, ..OpenOptions::default() };
    let Ok((volume, _report)) = Volume::open(Arc::clone(&shared), dir, &open_options) else {
        return;
    };
    let mut contents = vec![0u8; VOLUME_BYTES as usize];
    volume.read(0, &mut contents).expect("read the whole recovered volume");
    volume.close().expect("close the recovered volume");

    let (volume, _report) = Volume::open(shared, dir, &open_options).expect("reopen a cleanly closed volume");
    let mut reread = vec![0u8; VOLUME_BYTES as usize];
    volume.read(0, &mut reread).expect("read the reopened volume");
    assert!(contents == reread, "contents changed across a clean close and reopen");
    volume.close().expect("close the reopened volume");
});

/// Re-encodes each record of the chain starting at the beginning of `body` (the
/// segment's first record) from its decoded header, which gives it a valid crc.
fn fix_record_crcs(body: &mut [u8]) {
    let mut pos = 0;
    let mut encoded = Vec::new();
    while let Some(head) = body.get(pos..pos + RECORD_HEADER_LEN) {
        let Ok(header) = RecordHeader::decode(head) else {
            return;
        };
        let payload_at = pos + RECORD_HEADER_LEN;
        let Some(payload) = body.get(payload_at..payload_at + header.payload_len as usize) else {
            return;
        };
        header.encode_into(payload, &mut encoded);
        // `encoded` is padded to the record alignment; the padding may run past the body.
        let len = encoded.len().min(body.len() - pos);
        body[pos..pos + len].copy_from_slice(&encoded[..len]);
        pos += header.total_len();
    }
}
