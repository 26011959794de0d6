//! The NBD handshake: client flags and option haggling (`keel_net::fuzzing::handshake`
//! documents the input layout), then the request stream of the session it negotiates.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| keel_net::fuzzing::handshake(data));
