//! Writes the committed seed corpora in tests/fuzz/corpus/<target>/: a few small, valid
//! inputs per target, so the short smoke run starts past the magic numbers and crcs.
//!
//! From the repository root:
//!     cargo +nightly run --manifest-path tests/fuzz/Cargo.toml --example gen_corpus
//!
//! The engine seeds come from the engine's own encoders and from a journal the engine
//! wrote; the NBD seeds are encoded here, independently of `keel-net`, the way a client
//! (qemu, nbdinfo) would send them.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use keel_engine::format::{
    ChangeMapHeader, RecordHeader, RecordKind, SegmentHeader, Superblock, FLAG_MAY_PUNCH, SEGMENT_HEADER_COPY_LEN,
    SEGMENT_HEADER_LEN,
};
use keel_engine::testing::FaultyEnv;
use keel_engine::{list_segments, Env, OpenMode, OpenOptions, PersistMode, Volume, VolumeOptions};
use keel_fuzz::{reencode_record_chain, NONCE};

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    journal_record(&root.join("journal_record"));
    journal_recovery(&root.join("journal_recovery"));
    nbd_handshake(&root.join("nbd_handshake"));
    nbd_request(&root.join("nbd_request"));
    snapshot_manifest(&root.join("snapshot_manifest"));
}

/// A version 3 manifest (whole, and its body for the target to frame) and an index chunk's
/// plaintext, from the snapshot crate's own encoders.
fn snapshot_manifest(dir: &Path) {
    use keel_snapshot::manifest::piece::encode_piece;
    use keel_snapshot::manifest::{encode_manifest, GroupV2, ManifestV1, ManifestV3, StatsV1, HOLE};
    let key = keel_snapshot::TenantKey::from_bytes([7; 32]);
    let entries: Vec<[u8; 32]> = (0..20u8).map(|i| if i % 4 == 0 { HOLE } else { [i; 32] }).collect();
    let piece = encode_piece(&entries);
    let manifest = ManifestV3 {
        base: ManifestV1 {
            snapshot_id: "20261201T070000.000000Z-00c0ffee".into(),
            volume: "db".into(),
            marker: "daily".into(),
            node: "node-a".into(),
            key_id: key.key_id(),
            created_unix: 1_796_000_000,
            marker_seq: 9,
            parent: Some("20261130T070000.000000Z-12345678".into()),
            full_read: false,
            volume_size: 36 * 4096 - 100,
            chunk_size: 4096,
            stats: StatsV1::default(),
            chunks: Vec::new(),
        },
        group: Some(GroupV2 { name: "shop".into(), members: vec!["db".into(), "files".into()] }),
        fanout: 16,
        index: vec![key.chunk_id(&piece).0, HOLE, [3; 32]],
    };
    let bytes = encode_manifest(&key, &manifest).expect("a valid manifest");
    let with = |selector: u8, flags: u8, rest: &[u8]| [&[selector, flags][..], rest].concat();
    write_seed(dir, "v3-whole", &with(2, 0, &bytes));
    write_seed(dir, "v3-body", &with(2, 1, &bytes[96..]));
    write_seed(dir, "index-chunk", &with(0, 0, &[&[20u8][..], &piece].concat()));
}

fn write_seed(dir: &Path, name: &str, bytes: &[u8]) {
    assert!(bytes.len() < 8 << 10, "seed {name} is {} bytes; keep committed seeds under 8 KiB", bytes.len());
    fs::create_dir_all(dir).expect("create the corpus directory");
    let path: PathBuf = dir.join(name);
    fs::write(&path, bytes).expect("write a seed");
    println!("{} ({} bytes)", path.display(), bytes.len());
}

/// The shortest prefix of `bytes` that `decodes`.
fn shortest_decoding(bytes: &[u8], decodes: impl Fn(&[u8]) -> bool) -> &[u8] {
    let len = (0..=bytes.len()).find(|&len| decodes(&bytes[..len])).expect("the full encoding decodes");
    &bytes[..len]
}

fn journal_record(dir: &Path) {
    let mut record = Vec::new();
    RecordHeader::new(RecordKind::Write, 0, 7, 1, 4096, 16).encode_into(b"sixteen bytes!!!", NONCE, &mut record);
    write_seed(dir, "record-write", &record);
    RecordHeader::new(RecordKind::Zero, FLAG_MAY_PUNCH, 8, 1, 0, 1 << 16).encode_into(&[], NONCE, &mut record);
    write_seed(dir, "record-zero", &record);
    RecordHeader::new(RecordKind::Barrier, 0, 9, 1, 8, 0).encode_into(&[], NONCE, &mut record);
    write_seed(dir, "record-barrier", &record);
    RecordHeader::new(RecordKind::Snapshot, 0, 10, 1, 0, 0).encode_into(b"nightly", NONCE, &mut record);
    write_seed(dir, "record-snapshot", &record);

    let superblock = Superblock {
        volume_id: *b"fuzz-volume-id!!",
        block_size: 4096,
        size: 1 << 30,
        epoch: 3,
        checkpoint_seq: 41,
        checkpoint_segment: 2,
        checkpoint_offset: 8192,
        segment_bytes: 64 << 20,
        segment_count_max: 16,
        changemap_generation: 5,
        change_region_bytes: 64 << 10,
        extent_file_bytes: 1 << 40,
        name: "acme-db".into(),
    };
    let encoded = superblock.encode();
    write_seed(dir, "superblock", shortest_decoding(&encoded, |b| Superblock::decode(b).is_ok()));
    let segment =
        SegmentHeader { segment_no: 2, first_seq: 42, epoch: 3, volume_id: *b"fuzz-volume-id!!", nonce: NONCE };
    let encoded = segment.encode();
    let copy_b = shortest_decoding(&encoded, |b| SegmentHeader::decode(b).is_ok());
    write_seed(dir, "segment-header", copy_b);
    // A whole copy A of an older segment, then (the start of) copy B of a newer one.
    let older = SegmentHeader { segment_no: 1, first_seq: 1, ..segment };
    let mut area = older.encode();
    assert_eq!(area.len(), SEGMENT_HEADER_COPY_LEN);
    area.extend_from_slice(copy_b);
    write_seed(dir, "segment-slot", &area);
    let changemap = ChangeMapHeader {
        region_bytes: 64 << 10,
        volume_id: *b"fuzz-volume-id!!",
        generation: 5,
        base_seq: 41,
        region_count: 16384,
        bitmap_crc: 0x0bad_cafe,
    };
    let encoded = changemap.encode();
    write_seed(dir, "changemap-header", shortest_decoding(&encoded, |b| ChangeMapHeader::decode(b).is_ok()));
}

/// A journal written by the engine: every record kind, barriers from flushes, and a
/// write that spans sectors; its records re-encoded with [`NONCE`], which the target
/// gives its segment.
fn journal_recovery(dir: &Path) {
    let shared: Arc<dyn Env> = Arc::new(FaultyEnv::new());
    let volume_dir = Path::new("/v");
    let options = VolumeOptions {
        segment_bytes: 1 << 20,
        segment_count_max: 3,
        change_region_bytes: 64 << 10,
        extent_file_bytes: 1 << 20,
    };
    Volume::create(Arc::clone(&shared), volume_dir, "fuzz", 1 << 20, &options).expect("create the volume");
    let open_options = OpenOptions { background_checkpoints: false, ..OpenOptions::default() };
    let (volume, _) = Volume::open(Arc::clone(&shared), volume_dir, &open_options).expect("open the volume");
    volume.write(0, &[0xaa; 512], PersistMode::Buffered).expect("write");
    volume.write(8192, &[0x55; 1024], PersistMode::Durable).expect("write");
    volume.write_zeroes(4096, 4096, true, PersistMode::Buffered).expect("write zeroes");
    volume.trim(65536, 65536, PersistMode::Buffered).expect("trim");
    volume.mark_snapshot("before-upgrade").expect("mark a snapshot");
    volume.write(512, b"tail", PersistMode::Buffered).expect("write");

    let volume_id = Volume::read_superblock(shared.as_ref(), volume_dir).expect("read the superblock").volume_id;
    let segments = list_segments(shared.as_ref(), volume_dir, volume_id).expect("list segments");
    let file = shared.open(&segments[0].path, OpenMode::Existing).expect("open the segment");
    let mut records = vec![0u8; 4 << 10];
    file.read_at(&mut records, SEGMENT_HEADER_LEN as u64).expect("read the segment");
    let used = records.iter().rposition(|&b| b != 0).map_or(0, |last| (last + 1).next_multiple_of(8));
    records.truncate(used);
    reencode_record_chain(&mut records);
    // Copy B as the target writes it (the target gives it its own volume's id: bit 2).
    let header = segments[0].header.expect("the first segment has a header");
    let copy_b = SegmentHeader { volume_id: *b"fuzz-volume-id!!", nonce: NONCE, ..header }.encode();
    drop(volume);

    // Option bit 0: re-encode the record chain; bit 1: the input starts at copy B; bit 2:
    // adopt copy B.
    write_seed(dir, "engine-journal", &[&[0b000][..], &records].concat());
    write_seed(dir, "engine-journal-fix-crcs", &[&[0b001][..], &records].concat());
    write_seed(dir, "engine-journal-with-copy-b", &[&[0b111][..], &copy_b, &records].concat());
}

// NBD constants, from the protocol specification (big-endian on the wire).
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const OPT_EXPORT_NAME: u32 = 1;
const OPT_LIST: u32 = 3;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_LIST_META_CONTEXT: u32 = 9;
const OPT_SET_META_CONTEXT: u32 = 10;
const INFO_NAME: u16 = 1;
const INFO_DESCRIPTION: u16 = 2;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;
const CMD_BLOCK_STATUS: u16 = 7;
const FLAG_FUA: u16 = 1 << 0;
const FLAG_NO_HOLE: u16 = 1 << 1;
const FLAG_REQ_ONE: u16 = 1 << 3;

fn option(out: &mut Vec<u8>, code: u32, data: &[u8]) {
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

fn string32(out: &mut Vec<u8>, text: &str) {
    out.extend_from_slice(&(text.len() as u32).to_be_bytes());
    out.extend_from_slice(text.as_bytes());
}

fn info_request(name: &str, info_types: &[u16]) -> Vec<u8> {
    let mut data = Vec::new();
    string32(&mut data, name);
    data.extend_from_slice(&(info_types.len() as u16).to_be_bytes());
    for info_type in info_types {
        data.extend_from_slice(&info_type.to_be_bytes());
    }
    data
}

fn meta_request(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut data = Vec::new();
    string32(&mut data, export);
    data.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for query in queries {
        string32(&mut data, query);
    }
    data
}

fn request(out: &mut Vec<u8>, flags: u16, command: u16, cookie: u64, offset: u64, length: u32) {
    out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&command.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&length.to_be_bytes());
}

/// A mix of every command, valid and not, as a client in transmission would send.
fn requests(out: &mut Vec<u8>) {
    request(out, 0, CMD_READ, 1, 0, 4096);
    request(out, FLAG_FUA, CMD_WRITE, 2, 4096, 512);
    out.extend_from_slice(&[0x5a; 512]);
    request(out, 0, CMD_FLUSH, 3, 0, 0);
    request(out, FLAG_REQ_ONE, CMD_BLOCK_STATUS, 0x0040_0010_0020_0008, 0, 1 << 16);
    request(out, FLAG_NO_HOLE, CMD_WRITE_ZEROES, 5, 8192, 4096);
    request(out, 0, CMD_TRIM, 6, 1 << 16, 1 << 16);
    request(out, 0, CMD_READ, 7, 100, 512);
    request(out, 0, CMD_DISC, 8, 0, 0);
}

fn nbd_handshake(dir: &Path) {
    // Fixed newstyle with structured replies and base:allocation, then transmission.
    let mut seed = vec![0b0000_1100, 0, 0, 0, 3];
    option(&mut seed, OPT_STRUCTURED_REPLY, &[]);
    option(&mut seed, OPT_LIST_META_CONTEXT, &meta_request("disk", &["base:"]));
    option(&mut seed, OPT_SET_META_CONTEXT, &meta_request("disk", &["base:allocation", "qemu:dirty-bitmap:x"]));
    option(&mut seed, OPT_GO, &info_request("disk", &[INFO_NAME, INFO_DESCRIPTION]));
    requests(&mut seed);
    write_seed(dir, "go-structured", &seed);

    // Two exports (one read-only, one with a long description): list, ask, then the
    // old-style EXPORT_NAME.
    let mut seed = vec![0b0000_1111, 0, 0, 0, 1];
    option(&mut seed, OPT_LIST, &[]);
    option(&mut seed, OPT_INFO, &info_request("disk", &[INFO_DESCRIPTION]));
    option(&mut seed, OPT_INFO, &info_request("nope", &[]));
    option(&mut seed, 42, b"unknown option");
    option(&mut seed, OPT_EXPORT_NAME, b"ro");
    requests(&mut seed);
    write_seed(dir, "export-name-read-only", &seed);

    // A plain newstyle client (no fixed-newstyle flag) using the default export.
    let mut seed = vec![0b0000_1100, 0, 0, 0, 0];
    option(&mut seed, OPT_EXPORT_NAME, b"");
    requests(&mut seed);
    write_seed(dir, "newstyle-default-export", &seed);
}

fn nbd_request(dir: &Path) {
    // Structured replies, base:allocation selected, a 1 MiB export.
    let mut seed = vec![0b0001_1101];
    requests(&mut seed);
    write_seed(dir, "structured", &seed);
    // Simple replies, read-only, an export size that is not a multiple of 512.
    let mut seed = vec![0b0010_0010];
    requests(&mut seed);
    write_seed(dir, "simple-read-only-unaligned", &seed);
}
