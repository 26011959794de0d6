//! Vault frames (docs/format-vault.md): arbitrary bytes through the frame decoder in both
//! directions and both protocol versions, and through every request and response payload
//! decoder of each version, `Sync`/`Synced` and the version-2 `HelloOk` included
//! (`keel_snapshot::vault::wire::fuzz_decode`). Nothing may panic, a frame that decodes
//! must re-encode to the same bytes, and a kind its version lacks must not decode. Seeds
//! of both versions are in `corpus/vault_frame/` (`*-v2` for version 2).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| keel_snapshot::vault::wire::fuzz_decode(data));
