//! NBD transmission-phase request headers and their validation against an export
//! (`keel_net::fuzzing::request` documents the input layout).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| keel_net::fuzzing::request(data));
