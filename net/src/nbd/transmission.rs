//! The transmission phase without I/O: validating request headers against
//! the export, and encoding simple replies and structured chunks.
//!
//! The driver reads a [`RequestHeader`], asks [`write_payload_len`] how many
//! payload bytes follow it (closing the connection on `Err`), then calls
//! [`Transmission::validate`]. A [`Rejection`] is answered with
//! [`Transmission::encode_error`] after the payload, if any, has been read
//! and discarded; a [`Command`] is executed against the export and answered
//! with the matching `encode_*` method.

#![deny(clippy::indexing_slicing, clippy::unwrap_used)]

use bytes::BufMut;

use crate::error::Error;
use crate::nbd::handshake::{truncate_utf8, Session};
use crate::nbd::proto::{
    self, chunk, command, command_flag, errno, state, ChunkHeader, RequestHeader, SimpleReplyHeader,
};
use crate::nbd::{BLOCK_SIZE_MIN, PAYLOAD_MAX};

/// Extents in one BLOCK_STATUS chunk; a longer map is cut short (the client
/// re-queries from the first offset not covered). The spec suggests ≤ 2^20.
const EXTENTS_MAX: usize = 1 << 16;

/// A validated request, ready to run against the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Command {
    Read {
        offset: u64,
        length: u32,
    },
    Write {
        offset: u64,
        length: u32,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        length: u32,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        length: u32,
        may_punch_hole: bool,
        fua: bool,
    },
    BlockStatus {
        offset: u64,
        length: u32,
        req_one: bool,
        context_id: u32,
    },
    /// CACHE, and any zero-length request: answer success without touching
    /// the export.
    Nothing,
    /// DISC: finish outstanding requests, then close; never answered.
    Disconnect,
}

/// A request refused before reaching the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rejection {
    pub(crate) errno: u32,
    pub(crate) message: &'static str,
}

impl Rejection {
    const fn new(errno: u32, message: &'static str) -> Self {
        Self { errno, message }
    }
}

/// An encoded reply: `header` then `data`, written back to back with no
/// other reply in between. `data` is kept apart so read payloads are not copied.
#[derive(Debug, Default)]
pub(crate) struct ReplyBytes {
    pub(crate) header: Vec<u8>,
    pub(crate) data: Vec<u8>,
}

/// How many payload bytes follow `header` on the wire. A WRITE longer than
/// the maximum payload is a protocol violation: the stream cannot be
/// resynchronised without reading it, and reading it is what the limit forbids.
pub(crate) fn write_payload_len(header: &RequestHeader) -> Result<u32, Error> {
    if header.command != command::WRITE {
        return Ok(0);
    }
    if header.length > PAYLOAD_MAX {
        return Err(Error::TooLarge {
            what: "WRITE payload",
            len: u64::from(header.length),
            max: u64::from(PAYLOAD_MAX),
        });
    }
    Ok(header.length)
}

/// Per-connection transmission state (fixed once the handshake ends).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Transmission {
    export_size: u64,
    read_only: bool,
    structured_replies: bool,
    base_allocation_id: Option<u32>,
}

impl Transmission {
    pub(crate) fn new(session: &Session) -> Self {
        Self {
            export_size: session.export.size(),
            read_only: session.export.read_only(),
            structured_replies: session.structured_replies,
            base_allocation_id: session.base_allocation_id,
        }
    }

    /// Checks `header` against the export and the negotiated features.
    pub(crate) fn validate(&self, header: &RequestHeader) -> Result<Command, Rejection> {
        use command_flag::{FAST_ZERO, FUA, NO_HOLE, REQ_ONE};
        const EINVAL: u32 = errno::EINVAL;

        // FUA is accepted on every command (the spec allows ignoring it on
        // commands that write nothing); the rest are per command.
        let flags_allowed = FUA
            | match header.command {
                command::WRITE_ZEROES => NO_HOLE | FAST_ZERO,
                command::BLOCK_STATUS => REQ_ONE,
                _ => 0,
            };
        let is_write_type = match header.command {
            command::DISC => return Ok(Command::Disconnect),
            command::READ | command::CACHE | command::BLOCK_STATUS => false,
            command::WRITE | command::TRIM | command::WRITE_ZEROES => true,
            command::FLUSH => false,
            _ => return Err(Rejection::new(EINVAL, "unknown command")),
        };
        if header.flags & !flags_allowed != 0 {
            return Err(Rejection::new(EINVAL, "flag not valid for this command"));
        }
        if header.command == command::FLUSH {
            return Ok(Command::Flush);
        }
        let context_id = if header.command == command::BLOCK_STATUS {
            match self.base_allocation_id {
                Some(id) if self.structured_replies => Some(id),
                _ => {
                    return Err(Rejection::new(
                        EINVAL,
                        "BLOCK_STATUS needs structured replies and a selected meta context",
                    ))
                }
            }
        } else {
            None
        };
        if is_write_type && self.read_only {
            return Err(Rejection::new(errno::EPERM, "export is read-only"));
        }
        let (offset, length) = (header.offset, header.length);
        if length == 0 {
            // A successful BLOCK_STATUS reply needs at least one extent of
            // non-zero length, so "success" is impossible here (nbdkit also
            // answers EINVAL). Everything else succeeds without the export.
            if header.command == command::BLOCK_STATUS {
                return Err(Rejection::new(EINVAL, "BLOCK_STATUS length must not be 0"));
            }
            return Ok(Command::Nothing);
        }
        if matches!(header.command, command::READ | command::WRITE) && length > PAYLOAD_MAX {
            return Err(Rejection::new(EINVAL, "length exceeds the maximum payload"));
        }
        let Some(end) = offset.checked_add(u64::from(length)) else {
            return Err(Rejection::new(EINVAL, "offset + length overflows"));
        };
        let block = u64::from(BLOCK_SIZE_MIN);
        // A request may end at an export size that is not block-aligned.
        if offset % block != 0 || (u64::from(length) % block != 0 && end != self.export_size) {
            return Err(Rejection::new(EINVAL, "offset and length must be multiples of 512"));
        }
        if end > self.export_size {
            return Err(if is_write_type && header.command != command::TRIM {
                Rejection::new(errno::ENOSPC, "write beyond the end of the export")
            } else {
                Rejection::new(EINVAL, "request beyond the end of the export")
            });
        }
        let fua = header.flags & FUA != 0;
        Ok(match header.command {
            command::READ => Command::Read { offset, length },
            command::WRITE => Command::Write { offset, length, fua },
            command::TRIM => Command::Trim { offset, length, fua },
            // FAST_ZERO needs no special path: Keel's zeroing is never slower
            // than writing zeros, so "fail fast if slow" never triggers.
            command::WRITE_ZEROES => {
                Command::WriteZeroes { offset, length, may_punch_hole: header.flags & NO_HOLE == 0, fua }
            }
            command::BLOCK_STATUS => Command::BlockStatus {
                offset,
                length,
                req_one: header.flags & REQ_ONE != 0,
                context_id: context_id.unwrap_or_default(),
            },
            _ => Command::Nothing, // CACHE: a prefetch hint; a no-op is valid.
        })
    }

    /// Success without data. READ under structured replies must still get a
    /// chunk, so it gets a NONE chunk with DONE; everything else a simple reply
    /// (as nbdkit does; every client accepts it).
    pub(crate) fn encode_done(&self, cookie: u64, request_command: u16) -> ReplyBytes {
        let mut header = Vec::with_capacity(ChunkHeader::LEN);
        if self.structured_replies && request_command == command::READ {
            ChunkHeader { flags: chunk::FLAG_DONE, chunk_type: chunk::NONE, cookie, length: 0 }.encode(&mut header);
        } else {
            SimpleReplyHeader { error: 0, cookie }.encode(&mut header);
        }
        ReplyBytes { header, data: Vec::new() }
    }

    /// An error reply: an ERROR chunk with the message under structured
    /// replies, else a simple reply with no data.
    pub(crate) fn encode_error(&self, cookie: u64, error: u32, message: &str) -> ReplyBytes {
        debug_assert_ne!(error, 0, "error replies need a non-zero error");
        let mut header = Vec::new();
        if self.structured_replies {
            let message = truncate_utf8(message, proto::STRING_LEN_MAX);
            ChunkHeader {
                flags: chunk::FLAG_DONE,
                chunk_type: chunk::ERROR,
                cookie,
                length: (4 + 2 + message.len()) as u32,
            }
            .encode(&mut header);
            header.put_u32(error);
            header.put_u16(message.len() as u16);
            header.put_slice(message.as_bytes());
        } else {
            SimpleReplyHeader { error, cookie }.encode(&mut header);
        }
        ReplyBytes { header, data: Vec::new() }
    }

    /// A successful READ of `data` at `offset`. Under structured replies an
    /// all-zero buffer becomes one OFFSET_HOLE chunk instead of the data.
    pub(crate) fn encode_read(&self, cookie: u64, offset: u64, data: Vec<u8>) -> ReplyBytes {
        debug_assert!(!data.is_empty() && data.len() <= PAYLOAD_MAX as usize);
        let mut header = Vec::with_capacity(ChunkHeader::LEN + 12);
        if !self.structured_replies {
            SimpleReplyHeader { error: 0, cookie }.encode(&mut header);
            return ReplyBytes { header, data };
        }
        if data.iter().all(|&byte| byte == 0) {
            ChunkHeader { flags: chunk::FLAG_DONE, chunk_type: chunk::OFFSET_HOLE, cookie, length: 8 + 4 }
                .encode(&mut header);
            header.put_u64(offset);
            header.put_u32(data.len() as u32);
            return ReplyBytes { header, data: Vec::new() };
        }
        // The whole buffer was read before this chunk is sent, so no error
        // can strike mid-chunk and DONE may go on the data chunk itself.
        ChunkHeader {
            flags: chunk::FLAG_DONE,
            chunk_type: chunk::OFFSET_DATA,
            cookie,
            length: (8 + data.len()) as u32,
        }
        .encode(&mut header);
        header.put_u64(offset);
        ReplyBytes { header, data }
    }

    /// One BLOCK_STATUS chunk (with DONE) for `extents` from [`build_extents`].
    pub(crate) fn encode_block_status(&self, cookie: u64, context_id: u32, extents: &[Extent]) -> ReplyBytes {
        debug_assert!(self.structured_replies);
        debug_assert!(!extents.is_empty() && extents.len() <= EXTENTS_MAX);
        let length = 4 + 8 * extents.len();
        let mut header = Vec::with_capacity(ChunkHeader::LEN + length);
        ChunkHeader { flags: chunk::FLAG_DONE, chunk_type: chunk::BLOCK_STATUS, cookie, length: length as u32 }
            .encode(&mut header);
        header.put_u32(context_id);
        for extent in extents {
            header.put_u32(extent.length);
            header.put_u32(extent.flags);
        }
        ReplyBytes { header, data: Vec::new() }
    }
}

/// One `base:allocation` extent as sent on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Extent {
    pub(crate) length: u32,
    pub(crate) flags: u32,
}

/// Turns an export's allocation runs (`(length, is_hole)` from the request
/// offset) into wire extents for a request of `length` bytes.
///
/// # Invariants
/// The result is non-empty, every extent is longer than zero, neighbours
/// differ in flags, the lengths sum to at most `length` (clamped; never past
/// the request, which old and new spec versions both accept), and with
/// `req_one` there is exactly one extent. If the runs are unusable (empty or
/// all zero-length) the whole request is reported as data (flags 0), which
/// the spec calls always safe.
pub(crate) fn build_extents(runs: &[(u64, bool)], length: u32, req_one: bool) -> Vec<Extent> {
    debug_assert!(length > 0);
    let mut extents: Vec<Extent> = Vec::new();
    let mut remaining = u64::from(length);
    for &(run_length, is_hole) in runs {
        if remaining == 0 {
            break;
        }
        if run_length == 0 {
            continue;
        }
        let flags = if is_hole { state::HOLE | state::ZERO } else { 0 };
        let take = run_length.min(remaining);
        remaining -= take;
        // `take` ≤ `length`, a u32, so the conversion cannot fail.
        let take = u32::try_from(take).unwrap_or(u32::MAX);
        let extent_count = extents.len();
        match extents.last_mut() {
            Some(last) if last.flags == flags => last.length += take,
            _ if extent_count == EXTENTS_MAX => break,
            _ => extents.push(Extent { length: take, flags }),
        }
    }
    if extents.is_empty() {
        extents.push(Extent { length, flags: 0 });
    }
    if req_one {
        extents.truncate(1);
    }
    debug_assert!(extents.iter().all(|extent| extent.length > 0));
    debug_assert!(extents.iter().map(|e| u64::from(e.length)).sum::<u64>() <= u64::from(length));
    extents
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, reason = "tests")]
mod tests {
    use std::sync::Arc;

    use proptest::prelude::*;

    use super::*;
    use crate::nbd::handshake::BASE_ALLOCATION_CONTEXT_ID;
    use crate::nbd::tests::mem_export::MemExport;

    const SIZE: u64 = 1 << 20;

    fn transmission(structured: bool, read_only: bool, context: bool) -> Transmission {
        let export = Arc::new(MemExport::new("disk", SIZE).read_only(read_only));
        Transmission::new(&Session {
            transmission_flags: 0,
            structured_replies: structured,
            base_allocation_id: context.then_some(BASE_ALLOCATION_CONTEXT_ID),
            export,
        })
    }

    fn header(command: u16, flags: u16, offset: u64, length: u32) -> RequestHeader {
        RequestHeader { flags, command, cookie: 7, offset, length }
    }

    fn rejected(result: Result<Command, Rejection>) -> u32 {
        result.unwrap_err().errno
    }

    #[test]
    fn validates_ranges_and_alignment() {
        let t = transmission(false, false, false);
        assert_eq!(t.validate(&header(command::READ, 0, 4096, 512)), Ok(Command::Read { offset: 4096, length: 512 }));
        assert_eq!(rejected(t.validate(&header(command::READ, 0, 100, 512))), errno::EINVAL);
        assert_eq!(rejected(t.validate(&header(command::READ, 0, 0, 100))), errno::EINVAL);
        assert_eq!(rejected(t.validate(&header(command::READ, 0, SIZE, 512))), errno::EINVAL);
        assert_eq!(rejected(t.validate(&header(command::TRIM, 0, SIZE, 512))), errno::EINVAL);
        assert_eq!(rejected(t.validate(&header(command::WRITE, 0, SIZE, 512))), errno::ENOSPC);
        assert_eq!(rejected(t.validate(&header(command::WRITE_ZEROES, 0, SIZE - 512, 1024))), errno::ENOSPC);
        assert_eq!(rejected(t.validate(&header(command::READ, 0, u64::MAX - 511, 512))), errno::EINVAL);
        assert_eq!(rejected(t.validate(&header(command::READ, 0, 0, PAYLOAD_MAX + 512))), errno::EINVAL);
        assert_eq!(t.validate(&header(command::READ, 0, SIZE * 4, 0)), Ok(Command::Nothing));
    }

    #[test]
    fn validates_commands_and_flags() {
        let t = transmission(false, false, false);
        assert_eq!(rejected(t.validate(&header(9, 0, 0, 512))), errno::EINVAL, "unknown command");
        assert_eq!(
            rejected(t.validate(&header(command::WRITE, command_flag::NO_HOLE, 0, 512))),
            errno::EINVAL,
            "NO_HOLE on WRITE"
        );
        assert_eq!(
            rejected(t.validate(&header(command::READ, 1 << 2, 0, 512))),
            errno::EINVAL,
            "DF was not advertised"
        );
        assert_eq!(rejected(t.validate(&header(command::READ, 1 << 15, 0, 512))), errno::EINVAL);
        assert_eq!(
            t.validate(&header(
                command::WRITE_ZEROES,
                command_flag::NO_HOLE | command_flag::FAST_ZERO | command_flag::FUA,
                0,
                512
            )),
            Ok(Command::WriteZeroes { offset: 0, length: 512, may_punch_hole: false, fua: true })
        );
        assert_eq!(t.validate(&header(command::FLUSH, 0, 0, 0)), Ok(Command::Flush));
        assert_eq!(t.validate(&header(command::CACHE, 0, 0, 4096)), Ok(Command::Nothing));
        assert_eq!(t.validate(&header(command::DISC, 0, 0, 0)), Ok(Command::Disconnect));
        assert_eq!(
            rejected(t.validate(&header(command::BLOCK_STATUS, 0, 0, 512))),
            errno::EINVAL,
            "no context negotiated"
        );
        let t = transmission(true, false, true);
        assert_eq!(
            t.validate(&header(command::BLOCK_STATUS, command_flag::REQ_ONE, 0, 512)),
            Ok(Command::BlockStatus { offset: 0, length: 512, req_one: true, context_id: BASE_ALLOCATION_CONTEXT_ID })
        );
    }

    #[test]
    fn read_only_refuses_writes() {
        let t = transmission(false, true, false);
        for command in [command::WRITE, command::TRIM, command::WRITE_ZEROES] {
            assert_eq!(rejected(t.validate(&header(command, 0, 0, 512))), errno::EPERM);
        }
        assert!(t.validate(&header(command::READ, 0, 0, 512)).is_ok());
    }

    #[test]
    fn oversized_write_payload_is_a_protocol_violation() {
        assert_eq!(write_payload_len(&header(command::WRITE, 0, 0, PAYLOAD_MAX)).unwrap(), PAYLOAD_MAX);
        assert!(matches!(
            write_payload_len(&header(command::WRITE, 0, 0, PAYLOAD_MAX + 1)),
            Err(Error::TooLarge { .. })
        ));
        assert_eq!(write_payload_len(&header(command::READ, 0, 0, u32::MAX)).unwrap(), 0);
    }

    #[test]
    fn encodes_replies() {
        let simple = transmission(false, false, false);
        let reply = simple.encode_read(5, 0, vec![1; 512]);
        assert_eq!(SimpleReplyHeader::decode(&reply.header).unwrap(), SimpleReplyHeader { error: 0, cookie: 5 });
        assert_eq!(reply.data.len(), 512);
        let reply = simple.encode_error(5, errno::EIO, "boom");
        assert_eq!(reply.header.len(), SimpleReplyHeader::LEN);

        let structured = transmission(true, false, true);
        let reply = structured.encode_read(5, 4096, vec![0; 1024]);
        let chunk_header = ChunkHeader::decode(&reply.header).unwrap();
        assert_eq!(chunk_header.chunk_type, chunk::OFFSET_HOLE);
        assert_eq!(chunk_header.flags, chunk::FLAG_DONE);
        assert_eq!(&reply.header[20..], &[0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 4, 0]);
        assert!(reply.data.is_empty());

        let reply = structured.encode_error(5, errno::EINVAL, "bad");
        let chunk_header = ChunkHeader::decode(&reply.header).unwrap();
        assert_eq!(chunk_header.chunk_type, chunk::ERROR);
        assert_eq!(chunk_header.length, 9);
        assert_eq!(&reply.header[20..], &[0, 0, 0, 22, 0, 3, b'b', b'a', b'd']);
    }

    #[test]
    fn extents_merge_clamp_and_never_empty() {
        let e = |length, flags| Extent { length, flags };
        assert_eq!(
            build_extents(&[(512, false), (0, true), (512, false), (4096, true)], 2048, false),
            vec![e(1024, 0), e(1024, 3)]
        );
        assert_eq!(build_extents(&[(1 << 30, true)], 4096, true), vec![e(4096, 3)]);
        assert_eq!(build_extents(&[(512, false), (512, true)], 4096, true), vec![e(512, 0)]);
        assert_eq!(build_extents(&[], 4096, false), vec![e(4096, 0)]);
        assert_eq!(build_extents(&[(0, true)], 512, true), vec![e(512, 0)]);
    }

    proptest! {
        #[test]
        fn extents_invariants(runs in proptest::collection::vec((0u64..10_000, any::<bool>()), 0..50), length in 1u32.., req_one: bool) {
            let extents = build_extents(&runs, length, req_one);
            prop_assert!(!extents.is_empty());
            prop_assert!(extents.iter().all(|e| e.length > 0));
            prop_assert!(extents.windows(2).all(|w| w[0].flags != w[1].flags));
            prop_assert!(extents.iter().map(|e| u64::from(e.length)).sum::<u64>() <= u64::from(length));
            if req_one {
                prop_assert_eq!(extents.len(), 1);
            }
        }

        #[test]
        fn validate_never_panics(flags: u16, command in 0u16..12, offset: u64, length: u32, structured: bool, read_only: bool, context: bool) {
            let t = transmission(structured, read_only, context);
            let _ = t.validate(&header(command, flags, offset, length));
        }
    }
}
