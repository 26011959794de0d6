//! Vault frames (docs/format-vault.md): arbitrary bytes through the frame decoder in both
//! directions and through every request and response payload decoder
//! (`keel_snapshot::vault::wire::fuzz_decode`). Nothing may panic, and a frame that
//! decodes must re-encode to the same bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| keel_snapshot::vault::wire::fuzz_decode(data));
