//! Entry points for coverage-guided fuzzing (feature `fuzzing`, used by the cargo-fuzz
//! targets in `tests/fuzz`).
//!
//! Each function feeds arbitrary bytes to the real protocol core the way the tokio
//! driver in `server.rs` does, with the socket replaced by a byte slice (running out
//! of bytes is the client hanging up), and asserts the contracts the rest of the
//! server relies on. Any panic is a bug: either a decoder that is not total, or a
//! request that reached [`Export`] in a shape its documentation rules out.

#![deny(clippy::indexing_slicing, clippy::unwrap_used)]

use std::sync::Arc;

use crate::nbd::export::{Export, ExportError, ExportErrorKind, ExportRegistry};
use crate::nbd::handshake::{Handshake, Session, Step, BASE_ALLOCATION_CONTEXT_ID};
use crate::nbd::proto::{transmission_flag, OptionHeader, OptionReplyHeader, RequestHeader};
use crate::nbd::transmission::{self, Command, Transmission};
use crate::nbd::{BLOCK_SIZE_MIN, PAYLOAD_MAX};

/// Runs a whole connection's handshake on `bytes`, then, if the client entered
/// transmission, the request stream that follows.
///
/// Layout: one configuration byte (which exports the server offers: bit 0 adds a
/// second, read-only export; bit 1 gives the first a description longer than the
/// NBD string limit, in multi-byte characters; bits 2–4 pick its size), then exactly
/// what a client would send after the greeting: 4 bytes of client flags, option
/// requests, and request headers (each WRITE followed by its payload).
pub fn handshake(bytes: &[u8]) {
    let Some((&config, rest)) = bytes.split_first() else {
        return;
    };
    let exports = Arc::new(ExportRegistry::default());
    let long_description = config & 0b10 != 0;
    let first = FuzzExport::new("disk", export_size(config >> 2), false, long_description);
    exports.insert(Arc::new(first)).expect("distinct short names");
    if config & 0b1 != 0 {
        exports.insert(Arc::new(FuzzExport::new("ro", 1 << 20, true, false))).expect("distinct short names");
    }

    let mut handshake = Handshake::new(exports);
    let _greeting = Handshake::greeting();
    let Some((client_flags, mut input)) = rest.split_first_chunk::<4>() else {
        return;
    };
    if handshake.handle_client_flags(*client_flags).is_err() {
        return;
    }
    // Every iteration consumes at least an option header, so this ends.
    loop {
        let Some((header, rest)) = input.split_first_chunk::<{ OptionHeader::LEN }>() else {
            return;
        };
        let Ok(header) = handshake.handle_option_header(header) else {
            return;
        };
        let Some((data, rest)) = rest.split_at_checked(header.data_len as usize) else {
            return;
        };
        input = rest;
        match handshake.handle_option(header.option, data) {
            Step::Reply(reply) => {
                // A fixed-newstyle client waits for an answer to every option, so an
                // empty reply would hang it.
                assert!(reply.len() >= OptionReplyHeader::LEN, "option {:#x} got no reply", header.option);
            }
            Step::Close { .. } => return,
            Step::Transmission { reply, session } => {
                assert!(!reply.is_empty(), "entering transmission without a reply");
                check_session(&session);
                run_requests(&session, input);
                return;
            }
        }
    }
}

/// Runs a transmission-phase request stream on `bytes` against a session chosen by
/// the first byte (bit 0: structured replies; bit 1: read-only export; bit 2:
/// `base:allocation` selected, which the handshake allows only with structured
/// replies; bits 3–5: export size). The rest is request headers, each WRITE
/// followed by its payload.
pub fn request(bytes: &[u8]) {
    let Some((&config, input)) = bytes.split_first() else {
        return;
    };
    let structured_replies = config & 0b1 != 0;
    let read_only = config & 0b10 != 0;
    let base_allocation = structured_replies && config & 0b100 != 0;
    let export: Arc<dyn Export> = Arc::new(FuzzExport::new("disk", export_size(config >> 3), read_only, false));
    let session = Session {
        transmission_flags: crate::nbd::handshake::transmission_flags(export.as_ref()),
        structured_replies,
        base_allocation_id: base_allocation.then_some(BASE_ALLOCATION_CONTEXT_ID),
        export,
    };
    run_requests(&session, input);
}

/// Export sizes worth trying: empty, tiny, unaligned, and so large that
/// `offset + length` arithmetic near `u64::MAX` matters.
fn export_size(selector: u8) -> u64 {
    match selector & 0b111 {
        0 => 0,
        1 => u64::from(BLOCK_SIZE_MIN),
        2 => 4096,
        3 => 1 << 20,
        4 => (1 << 20) + 100,
        5 => 1 << 40,
        6 => u64::MAX - u64::from(BLOCK_SIZE_MIN) + 1,
        _ => u64::MAX,
    }
}

fn check_session(session: &Session) {
    let read_only_flag = session.transmission_flags & transmission_flag::READ_ONLY != 0;
    assert_eq!(read_only_flag, session.export.read_only(), "READ_ONLY flag disagrees with the export");
    assert!(session.transmission_flags & transmission_flag::HAS_FLAGS != 0);
    if session.base_allocation_id.is_some() {
        assert!(session.structured_replies, "a meta context without structured replies");
    }
}

/// The reader loop of `server.rs::read_requests`, without the sockets and tasks.
fn run_requests(session: &Session, mut input: &[u8]) {
    let transmission = Transmission::new(session);
    // Every iteration consumes a request header, so this ends.
    while let Some((header_bytes, rest)) = input.split_first_chunk::<{ RequestHeader::LEN }>() {
        let Ok(header) = RequestHeader::decode(header_bytes) else {
            return;
        };
        let Ok(payload_len) = transmission::write_payload_len(&header) else {
            return;
        };
        assert!(payload_len <= PAYLOAD_MAX);
        let Some((payload, rest)) = rest.split_at_checked(payload_len as usize) else {
            return;
        };
        input = rest;
        match transmission.validate(&header) {
            Ok(Command::Disconnect) => return,
            Ok(command) => {
                check_command(session, command, payload);
                encode_success(&transmission, &header, command);
            }
            Err(rejection) => {
                assert_ne!(rejection.errno, 0, "a rejection must carry an error");
                let reply = transmission.encode_error(header.cookie, rejection.errno, rejection.message);
                assert!(!reply.header.is_empty());
            }
        }
    }
}

/// Asserts what [`Export`]'s documentation promises implementers about every call.
fn check_command(session: &Session, command: Command, payload: &[u8]) {
    let size = session.export.size();
    let read_only = session.export.read_only();
    let in_export = |offset: u64, length: u32| {
        assert!(length > 0, "{command:?}: zero-length request reached the export");
        let end = offset.checked_add(u64::from(length)).expect("validated ranges do not overflow");
        assert!(end <= size, "{command:?} ends past the export size {size}");
        let block = u64::from(BLOCK_SIZE_MIN);
        assert!(offset % block == 0, "{command:?}: unaligned offset");
        assert!(u64::from(length) % block == 0 || end == size, "{command:?}: unaligned length");
    };
    match command {
        Command::Read { offset, length } => {
            in_export(offset, length);
            assert!(length <= PAYLOAD_MAX);
        }
        Command::Write { offset, length, .. } => {
            in_export(offset, length);
            assert!(!read_only, "a write reached a read-only export");
            assert!(length <= PAYLOAD_MAX);
            assert_eq!(payload.len(), length as usize, "WRITE payload length differs from the request");
        }
        Command::Trim { offset, length, .. } | Command::WriteZeroes { offset, length, .. } => {
            in_export(offset, length);
            assert!(!read_only, "a write-type command reached a read-only export");
        }
        Command::BlockStatus { offset, length, context_id, .. } => {
            in_export(offset, length);
            assert!(session.structured_replies, "BLOCK_STATUS without structured replies");
            assert_eq!(Some(context_id), session.base_allocation_id, "BLOCK_STATUS for an unselected context");
        }
        Command::Flush | Command::Nothing => {}
        Command::Disconnect => unreachable!("handled by the caller"),
    }
}

/// Encodes the reply a successful call would get. The export's answer is made up
/// from the request's cookie, so the fuzzer steers it too.
fn encode_success(transmission: &Transmission, header: &RequestHeader, command: Command) {
    let cookie = header.cookie;
    let reply = match command {
        Command::Read { offset, length } => {
            // Reads larger than this add nothing but allocation time.
            let length = length.min(64 * 1024) as usize;
            let fill = if cookie & 1 == 0 { 0 } else { 0xa5 };
            transmission.encode_read(cookie, offset, vec![fill; length])
        }
        Command::BlockStatus { length, req_one, context_id, .. } => {
            // Four runs of up to 4 MiB, alternating hole and data.
            let runs: Vec<(u64, bool)> =
                (0..4).map(|index| (((cookie >> (16 * index)) & 0xffff) * 64, index % 2 == 0)).collect();
            let extents = transmission::build_extents(&runs, length, req_one);
            assert!(!extents.is_empty());
            assert!(extents.iter().all(|extent| extent.length > 0));
            assert!(extents.iter().map(|extent| u64::from(extent.length)).sum::<u64>() <= u64::from(length));
            assert!(!req_one || extents.len() == 1);
            transmission.encode_block_status(cookie, context_id, &extents)
        }
        _ => transmission.encode_done(cookie, header.command),
    };
    assert!(!reply.header.is_empty());
}

/// An export that only answers questions the handshake and validation ask; the
/// fuzz entry points never call its I/O methods.
struct FuzzExport {
    name: &'static str,
    description: String,
    size: u64,
    read_only: bool,
}

impl FuzzExport {
    fn new(name: &'static str, size: u64, read_only: bool, long_description: bool) -> Self {
        let description = if long_description {
            // 2 bytes per character, ending one byte past the 4096-byte limit, so
            // truncation must back up to a character boundary.
            "é".repeat(crate::nbd::proto::STRING_LEN_MAX / 2 + 1)
        } else {
            format!("fuzzing export {name}")
        };
        Self { name, description, size, read_only }
    }

    fn unused(&self) -> ExportError {
        ExportError::new(ExportErrorKind::Io, "the fuzzing export holds no data")
    }
}

impl Export for FuzzExport {
    fn name(&self) -> &str {
        self.name
    }
    fn description(&self) -> String {
        self.description.clone()
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read(&self, _offset: u64, _buf: &mut [u8]) -> Result<(), ExportError> {
        Err(self.unused())
    }
    fn write(&self, _offset: u64, _data: &[u8], _fua: bool) -> Result<(), ExportError> {
        Err(self.unused())
    }
    fn write_zeroes(&self, _offset: u64, _len: u64, _may_punch_hole: bool, _fua: bool) -> Result<(), ExportError> {
        Err(self.unused())
    }
    fn trim(&self, _offset: u64, _len: u64, _fua: bool) -> Result<(), ExportError> {
        Err(self.unused())
    }
    fn flush(&self) -> Result<(), ExportError> {
        Err(self.unused())
    }
    fn block_status(&self, _offset: u64, _len: u64) -> Result<Vec<(u64, bool)>, ExportError> {
        Err(self.unused())
    }
}
