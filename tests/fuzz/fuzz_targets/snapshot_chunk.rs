//! Snapshot chunk frames (docs/format-chunk.md): arbitrary bytes through the key-less frame
//! checks and through a full decode under a fixed tenant key, with the id taken from the
//! input's first 32 bytes. Neither may panic; a frame that decodes must re-hash to its id.
#![no_main]

use keel_snapshot::{check_frame, decode_chunk, ChunkId, TenantKey};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = check_frame(data);
    let key = TenantKey::from_bytes([7; 32]);
    let (id, frame) = match data.split_first_chunk::<32>() {
        Some((id, frame)) => (ChunkId(*id), frame),
        None => return,
    };
    if let Ok(plaintext) = decode_chunk(&key, &id, frame) {
        assert_eq!(key.chunk_id(&plaintext), id);
    }
});
