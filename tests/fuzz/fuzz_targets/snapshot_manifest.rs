//! Snapshot manifests and index chunks (docs/format-manifest.md).
//!
//! Input: byte 0 picks the format version (`1 + byte % 3`), byte 1 bit 0 says whether the
//! rest is a whole manifest (0) or only a body to frame (1: the header is built around it
//! with valid crcs, since random bytes almost never carry one, so the rkyv validation of
//! arbitrary bodies is what gets fuzzed). The same rest, after one more byte giving the
//! expected entry count, also goes to the index chunk decoder.
//!
//! Must hold: no panic; a manifest that loads has a layout consistent with its size
//! (inline: one entry per chunk; indexed: one index entry per `fanout` chunks), and every
//! accessor answers.
#![no_main]

use keel_snapshot::manifest::piece::{decode_piece, piece_entry};
use keel_snapshot::manifest::{Layout, Manifest, MANIFEST_HEADER_LEN, MANIFEST_MAGIC};
use keel_snapshot::TenantKey;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let [selector, flags, rest @ ..] = data else { return };
    if let Some((&expected, plain)) = rest.split_first() {
        let _ = decode_piece(plain, usize::from(expected));
        let _ = piece_entry(plain, usize::from(expected), usize::from(expected) / 2);
    }
    let bytes = if flags & 1 == 1 { frame(1 + u16::from(*selector % 3), rest) } else { rest.to_vec() };
    let Ok(manifest) = Manifest::from_bytes(&bytes) else { return };
    let _ = manifest.authenticate(&TenantKey::from_bytes([7; 32]));
    let count = manifest.chunk_count() as u64;
    match manifest.layout() {
        Layout::Inline(chunks) => assert_eq!(chunks.len() as u64, count),
        Layout::Indexed { fanout, index } => assert_eq!(index.len() as u64, count.div_ceil(u64::from(fanout))),
    }
    let _ = (manifest.snapshot_id(), manifest.volume(), manifest.marker(), manifest.node(), manifest.parent());
    let _ = (manifest.group(), manifest.stats(), manifest.index_chunks(), manifest.version());
    let _ = manifest.chunk_range(manifest.chunk_count().saturating_sub(1));
});

/// A manifest header with valid crcs (and a MAC of zeros) around `body`.
fn frame(version: u16, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(MANIFEST_HEADER_LEN + body.len());
    out.extend_from_slice(&MANIFEST_MAGIC);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&(MANIFEST_HEADER_LEN as u16).to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
    out.resize(92, 0);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(body);
    out
}
