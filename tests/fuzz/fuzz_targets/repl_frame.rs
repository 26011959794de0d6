//! Replication frames (docs/format-replication.md): any byte stream through the frame
//! decoder and every typed decoder (`keel_net::repl::wire::fuzz_decode`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| keel_net::repl::wire::fuzz_decode(data));
