//! NBD wire format: magics, codes, fixed-size headers and option payloads,
//! with total decoders (any byte string gives `Ok` or `Err`, never a panic).
//!
//! NBD is big-endian on the wire, unlike Keel's own formats; `bytes`'
//! `get_u32`/`put_u32` family is big-endian, so the layouts below read like
//! the spec. Each structure's layout lives only in its `encode`/`decode` pair
//! and its `LEN` constant.

#![deny(clippy::indexing_slicing, clippy::unwrap_used)]

use bytes::{Buf, BufMut};

use crate::error::Error;

/// "NBDMAGIC", first word of the server greeting.
pub(crate) const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT", second word of the greeting and first word of every option request.
pub(crate) const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub(crate) const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub(crate) const REQUEST_MAGIC: u32 = 0x2560_9513;
pub(crate) const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub(crate) const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags the server sends (u16).
pub(crate) const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub(crate) const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags (u32); only these two bits are defined.
pub(crate) const CLIENT_FLAG_FIXED_NEWSTYLE: u32 = 1 << 0;
pub(crate) const CLIENT_FLAG_NO_ZEROES: u32 = 1 << 1;

/// Strings (names, messages, context names) MUST be at most 4096 bytes.
pub(crate) const STRING_LEN_MAX: usize = 4096;
/// Option payloads above this close the connection. The largest legitimate
/// one is a meta-context request with a few names of at most 4 KiB each.
pub(crate) const OPTION_DATA_LEN_MAX: u32 = 64 * 1024;
/// Queries in one LIST/SET_META_CONTEXT; more is treated as malformed.
const META_QUERIES_MAX: usize = 64;

/// The only metadata context Keel implements.
pub(crate) const BASE_ALLOCATION: &str = "base:allocation";

/// Option codes (u32).
pub(crate) mod option {
    pub(crate) const EXPORT_NAME: u32 = 1;
    pub(crate) const ABORT: u32 = 2;
    pub(crate) const LIST: u32 = 3;
    pub(crate) const STARTTLS: u32 = 5;
    pub(crate) const INFO: u32 = 6;
    pub(crate) const GO: u32 = 7;
    pub(crate) const STRUCTURED_REPLY: u32 = 8;
    pub(crate) const LIST_META_CONTEXT: u32 = 9;
    pub(crate) const SET_META_CONTEXT: u32 = 10;
}

/// Option reply types (u32); errors have bit 31 set.
pub(crate) mod reply {
    pub(crate) const ACK: u32 = 1;
    pub(crate) const SERVER: u32 = 2;
    pub(crate) const INFO: u32 = 3;
    pub(crate) const META_CONTEXT: u32 = 4;
    pub(crate) const ERR_UNSUP: u32 = 0x8000_0001;
    pub(crate) const ERR_INVALID: u32 = 0x8000_0003;
    pub(crate) const ERR_UNKNOWN: u32 = 0x8000_0006;
}

/// `NBD_INFO_*` types (u16).
pub(crate) mod info {
    pub(crate) const EXPORT: u16 = 0;
    pub(crate) const NAME: u16 = 1;
    pub(crate) const DESCRIPTION: u16 = 2;
    pub(crate) const BLOCK_SIZE: u16 = 3;
}

/// Transmission flags (u16).
pub(crate) mod transmission_flag {
    pub(crate) const HAS_FLAGS: u16 = 1 << 0;
    pub(crate) const READ_ONLY: u16 = 1 << 1;
    pub(crate) const SEND_FLUSH: u16 = 1 << 2;
    pub(crate) const SEND_FUA: u16 = 1 << 3;
    pub(crate) const SEND_TRIM: u16 = 1 << 5;
    pub(crate) const SEND_WRITE_ZEROES: u16 = 1 << 6;
    pub(crate) const CAN_MULTI_CONN: u16 = 1 << 8;
    pub(crate) const SEND_CACHE: u16 = 1 << 10;
    pub(crate) const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Command types (u16).
pub(crate) mod command {
    pub(crate) const READ: u16 = 0;
    pub(crate) const WRITE: u16 = 1;
    pub(crate) const DISC: u16 = 2;
    pub(crate) const FLUSH: u16 = 3;
    pub(crate) const TRIM: u16 = 4;
    pub(crate) const CACHE: u16 = 5;
    pub(crate) const WRITE_ZEROES: u16 = 6;
    pub(crate) const BLOCK_STATUS: u16 = 7;
}

/// Command flags (u16).
pub(crate) mod command_flag {
    pub(crate) const FUA: u16 = 1 << 0;
    pub(crate) const NO_HOLE: u16 = 1 << 1;
    pub(crate) const REQ_ONE: u16 = 1 << 3;
    pub(crate) const FAST_ZERO: u16 = 1 << 4;
}

/// Structured reply chunk types (u16) and flags.
pub(crate) mod chunk {
    pub(crate) const FLAG_DONE: u16 = 1 << 0;
    pub(crate) const NONE: u16 = 0;
    pub(crate) const OFFSET_DATA: u16 = 1;
    pub(crate) const OFFSET_HOLE: u16 = 2;
    pub(crate) const BLOCK_STATUS: u16 = 5;
    pub(crate) const ERROR: u16 = 0x8001;
}

/// NBD error values (u32).
pub(crate) mod errno {
    pub(crate) const EPERM: u32 = 1;
    pub(crate) const EIO: u32 = 5;
    pub(crate) const EINVAL: u32 = 22;
    pub(crate) const ENOSPC: u32 = 28;
    pub(crate) const ESHUTDOWN: u32 = 108;
}

/// `base:allocation` extent flags.
pub(crate) mod state {
    pub(crate) const HOLE: u32 = 1 << 0;
    pub(crate) const ZERO: u32 = 1 << 1;
}

/// Fails unless `bytes` holds at least `needed` bytes.
fn need(what: &'static str, bytes: &[u8], needed: usize) -> Result<(), Error> {
    if bytes.len() < needed {
        return Err(Error::Truncated { what, needed, got: bytes.len() });
    }
    Ok(())
}

/// Reads a UTF-8 string of `len` bytes from `buf`, enforcing the 4096-byte cap.
fn get_string(what: &'static str, buf: &mut &[u8], len: usize) -> Result<String, Error> {
    if len > STRING_LEN_MAX {
        return Err(Error::TooLarge { what, len: len as u64, max: STRING_LEN_MAX as u64 });
    }
    let Some((head, tail)) = buf.split_at_checked(len) else {
        return Err(Error::Truncated { what, needed: len, got: buf.len() });
    };
    let text = std::str::from_utf8(head).map_err(|_| Error::Malformed { what, reason: "not UTF-8" })?;
    if text.contains('\0') {
        return Err(Error::Malformed { what, reason: "contains NUL" });
    }
    *buf = tail;
    Ok(text.to_owned())
}

/// Reads a `u32` length followed by that many bytes of string.
fn get_u32_string(what: &'static str, buf: &mut &[u8]) -> Result<String, Error> {
    need(what, buf, 4)?;
    let len = buf.get_u32() as usize;
    get_string(what, buf, len)
}

#[cfg(test)]
fn put_u32_string(buf: &mut impl BufMut, text: &str) {
    debug_assert!(text.len() <= STRING_LEN_MAX, "string too long for NBD");
    buf.put_u32(text.len() as u32);
    buf.put_slice(text.as_bytes());
}

/// Header of every option request, client to server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OptionHeader {
    pub(crate) option: u32,
    pub(crate) data_len: u32,
}

impl OptionHeader {
    /// magic u64 · option u32 · data length u32
    pub(crate) const LEN: usize = 8 + 4 + 4;

    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, Error> {
        need("option header", bytes, Self::LEN)?;
        let mut buf = bytes;
        let magic = buf.get_u64();
        if magic != IHAVEOPT {
            return Err(Error::BadMagic { what: "option header", expected: IHAVEOPT, got: magic });
        }
        Ok(Self { option: buf.get_u32(), data_len: buf.get_u32() })
    }

    #[cfg(test)]
    pub(crate) fn encode(&self, buf: &mut impl BufMut) {
        buf.put_u64(IHAVEOPT);
        buf.put_u32(self.option);
        buf.put_u32(self.data_len);
    }
}

/// The request data of `NBD_OPT_INFO` and `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct InfoRequest {
    pub(crate) name: String,
    pub(crate) info_types: Vec<u16>,
}

/// The request data of `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MetaContextRequest {
    pub(crate) export_name: String,
    pub(crate) queries: Vec<String>,
}

/// A parsed option request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum OptionRequest {
    ExportName(String),
    /// Any data sent with ABORT is ignored, as the spec asks.
    Abort,
    List,
    StartTls,
    Info(InfoRequest),
    Go(InfoRequest),
    StructuredReply,
    ListMetaContext(MetaContextRequest),
    SetMetaContext(MetaContextRequest),
    /// Any option this server does not implement (its data is skipped).
    Unsupported(u32),
}

impl OptionRequest {
    /// Parses the data of option `code`. An `Err` means the option is known
    /// but its data is malformed, which the handshake answers with `ERR_INVALID`.
    pub(crate) fn decode(code: u32, data: &[u8]) -> Result<Self, Error> {
        match code {
            option::EXPORT_NAME => {
                let mut buf = data;
                get_string("export name", &mut buf, data.len()).map(Self::ExportName)
            }
            option::ABORT => Ok(Self::Abort),
            option::LIST => expect_empty("LIST option", data).map(|()| Self::List),
            option::STARTTLS => expect_empty("STARTTLS option", data).map(|()| Self::StartTls),
            option::INFO => InfoRequest::decode(data).map(Self::Info),
            option::GO => InfoRequest::decode(data).map(Self::Go),
            option::STRUCTURED_REPLY => expect_empty("STRUCTURED_REPLY option", data).map(|()| Self::StructuredReply),
            option::LIST_META_CONTEXT => MetaContextRequest::decode(data).map(Self::ListMetaContext),
            option::SET_META_CONTEXT => MetaContextRequest::decode(data).map(Self::SetMetaContext),
            other => Ok(Self::Unsupported(other)),
        }
    }

    /// The option code and data a client would send for this request.
    #[cfg(test)]
    pub(crate) fn encode(&self) -> (u32, Vec<u8>) {
        let mut data = Vec::new();
        let code = match self {
            Self::ExportName(name) => {
                data.put_slice(name.as_bytes());
                option::EXPORT_NAME
            }
            Self::Abort => option::ABORT,
            Self::List => option::LIST,
            Self::StartTls => option::STARTTLS,
            Self::Info(request) => {
                request.encode(&mut data);
                option::INFO
            }
            Self::Go(request) => {
                request.encode(&mut data);
                option::GO
            }
            Self::StructuredReply => option::STRUCTURED_REPLY,
            Self::ListMetaContext(request) => {
                request.encode(&mut data);
                option::LIST_META_CONTEXT
            }
            Self::SetMetaContext(request) => {
                request.encode(&mut data);
                option::SET_META_CONTEXT
            }
            Self::Unsupported(code) => *code,
        };
        (code, data)
    }
}

fn expect_empty(what: &'static str, data: &[u8]) -> Result<(), Error> {
    if data.is_empty() {
        Ok(())
    } else {
        Err(Error::Malformed { what, reason: "must carry no data" })
    }
}

fn expect_consumed(what: &'static str, buf: &[u8]) -> Result<(), Error> {
    if buf.is_empty() {
        Ok(())
    } else {
        Err(Error::Malformed { what, reason: "trailing bytes after the last field" })
    }
}

impl InfoRequest {
    /// name length u32 · name · count u16 · count × info type u16
    fn decode(data: &[u8]) -> Result<Self, Error> {
        const WHAT: &str = "INFO/GO request";
        let mut buf = data;
        let name = get_u32_string(WHAT, &mut buf)?;
        need(WHAT, buf, 2)?;
        let count = usize::from(buf.get_u16());
        need(WHAT, buf, count * 2)?;
        let info_types = (0..count).map(|_| buf.get_u16()).collect();
        expect_consumed(WHAT, buf)?;
        Ok(Self { name, info_types })
    }

    #[cfg(test)]
    pub(crate) fn encode(&self, buf: &mut impl BufMut) {
        put_u32_string(buf, &self.name);
        buf.put_u16(self.info_types.len() as u16);
        for info_type in &self.info_types {
            buf.put_u16(*info_type);
        }
    }
}

impl MetaContextRequest {
    /// export name length u32 · export name · count u32 · count × (length u32 · query)
    fn decode(data: &[u8]) -> Result<Self, Error> {
        const WHAT: &str = "meta context request";
        let mut buf = data;
        let export_name = get_u32_string(WHAT, &mut buf)?;
        need(WHAT, buf, 4)?;
        let count = buf.get_u32() as usize;
        if count > META_QUERIES_MAX {
            return Err(Error::TooLarge {
                what: "meta context query count",
                len: count as u64,
                max: META_QUERIES_MAX as u64,
            });
        }
        let queries = (0..count).map(|_| get_u32_string(WHAT, &mut buf)).collect::<Result<Vec<_>, _>>()?;
        expect_consumed(WHAT, buf)?;
        Ok(Self { export_name, queries })
    }

    #[cfg(test)]
    pub(crate) fn encode(&self, buf: &mut impl BufMut) {
        put_u32_string(buf, &self.export_name);
        buf.put_u32(self.queries.len() as u32);
        for query in &self.queries {
            put_u32_string(buf, query);
        }
    }
}

/// Header of an option reply, server to client. Every option except
/// EXPORT_NAME is answered with one or more of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OptionReplyHeader {
    pub(crate) option: u32,
    pub(crate) reply_type: u32,
    pub(crate) data_len: u32,
}

impl OptionReplyHeader {
    /// magic u64 · option u32 · reply type u32 · data length u32
    pub(crate) const LEN: usize = 8 + 4 + 4 + 4;

    pub(crate) fn encode(&self, buf: &mut impl BufMut) {
        buf.put_u64(OPTION_REPLY_MAGIC);
        buf.put_u32(self.option);
        buf.put_u32(self.reply_type);
        buf.put_u32(self.data_len);
    }

    #[cfg(test)]
    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, Error> {
        need("option reply header", bytes, Self::LEN)?;
        let mut buf = bytes;
        let magic = buf.get_u64();
        if magic != OPTION_REPLY_MAGIC {
            return Err(Error::BadMagic { what: "option reply header", expected: OPTION_REPLY_MAGIC, got: magic });
        }
        Ok(Self { option: buf.get_u32(), reply_type: buf.get_u32(), data_len: buf.get_u32() })
    }
}

/// Appends one option reply (header plus `data`) to `out`.
pub(crate) fn put_option_reply(out: &mut Vec<u8>, option: u32, reply_type: u32, data: &[u8]) {
    OptionReplyHeader { option, reply_type, data_len: data.len() as u32 }.encode(out);
    out.put_slice(data);
}

/// A transmission-phase request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RequestHeader {
    pub(crate) flags: u16,
    pub(crate) command: u16,
    pub(crate) cookie: u64,
    pub(crate) offset: u64,
    pub(crate) length: u32,
}

impl RequestHeader {
    /// magic u32 · flags u16 · type u16 · cookie u64 · offset u64 · length u32
    pub(crate) const LEN: usize = 4 + 2 + 2 + 8 + 8 + 4;

    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, Error> {
        need("request header", bytes, Self::LEN)?;
        let mut buf = bytes;
        let magic = buf.get_u32();
        if magic != REQUEST_MAGIC {
            return Err(Error::BadMagic {
                what: "request header",
                expected: u64::from(REQUEST_MAGIC),
                got: u64::from(magic),
            });
        }
        Ok(Self {
            flags: buf.get_u16(),
            command: buf.get_u16(),
            cookie: buf.get_u64(),
            offset: buf.get_u64(),
            length: buf.get_u32(),
        })
    }

    #[cfg(test)]
    pub(crate) fn encode(&self, buf: &mut impl BufMut) {
        buf.put_u32(REQUEST_MAGIC);
        buf.put_u16(self.flags);
        buf.put_u16(self.command);
        buf.put_u64(self.cookie);
        buf.put_u64(self.offset);
        buf.put_u32(self.length);
    }
}

/// A simple reply header; for a successful READ the data follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SimpleReplyHeader {
    pub(crate) error: u32,
    pub(crate) cookie: u64,
}

impl SimpleReplyHeader {
    /// magic u32 · error u32 · cookie u64
    pub(crate) const LEN: usize = 4 + 4 + 8;

    pub(crate) fn encode(&self, buf: &mut impl BufMut) {
        buf.put_u32(SIMPLE_REPLY_MAGIC);
        buf.put_u32(self.error);
        buf.put_u64(self.cookie);
    }

    #[cfg(test)]
    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, Error> {
        need("simple reply header", bytes, Self::LEN)?;
        let mut buf = bytes;
        let magic = buf.get_u32();
        if magic != SIMPLE_REPLY_MAGIC {
            return Err(Error::BadMagic {
                what: "simple reply header",
                expected: u64::from(SIMPLE_REPLY_MAGIC),
                got: u64::from(magic),
            });
        }
        Ok(Self { error: buf.get_u32(), cookie: buf.get_u64() })
    }
}

/// A structured reply chunk header; `length` payload bytes follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ChunkHeader {
    pub(crate) flags: u16,
    pub(crate) chunk_type: u16,
    pub(crate) cookie: u64,
    pub(crate) length: u32,
}

impl ChunkHeader {
    /// magic u32 · flags u16 · type u16 · cookie u64 · payload length u32
    pub(crate) const LEN: usize = 4 + 2 + 2 + 8 + 4;

    pub(crate) fn encode(&self, buf: &mut impl BufMut) {
        buf.put_u32(STRUCTURED_REPLY_MAGIC);
        buf.put_u16(self.flags);
        buf.put_u16(self.chunk_type);
        buf.put_u64(self.cookie);
        buf.put_u32(self.length);
    }

    #[cfg(test)]
    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, Error> {
        need("chunk header", bytes, Self::LEN)?;
        let mut buf = bytes;
        let magic = buf.get_u32();
        if magic != STRUCTURED_REPLY_MAGIC {
            return Err(Error::BadMagic {
                what: "chunk header",
                expected: u64::from(STRUCTURED_REPLY_MAGIC),
                got: u64::from(magic),
            });
        }
        Ok(Self { flags: buf.get_u16(), chunk_type: buf.get_u16(), cookie: buf.get_u64(), length: buf.get_u32() })
    }
}

const _: () = assert!(OptionHeader::LEN == 16);
const _: () = assert!(OptionReplyHeader::LEN == 20);
const _: () = assert!(RequestHeader::LEN == 28);
const _: () = assert!(SimpleReplyHeader::LEN == 16);
const _: () = assert!(ChunkHeader::LEN == 20);

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, reason = "tests")]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn name() -> impl Strategy<Value = String> + Clone {
        "[a-z0-9:/._-]{0,40}"
    }

    fn option_request() -> impl Strategy<Value = OptionRequest> {
        let info = (name(), proptest::collection::vec(any::<u16>(), 0..8))
            .prop_map(|(name, info_types)| InfoRequest { name, info_types });
        let meta = (name(), proptest::collection::vec(name(), 0..6))
            .prop_map(|(export_name, queries)| MetaContextRequest { export_name, queries });
        prop_oneof![
            name().prop_map(OptionRequest::ExportName),
            Just(OptionRequest::Abort),
            Just(OptionRequest::List),
            Just(OptionRequest::StartTls),
            info.clone().prop_map(OptionRequest::Info),
            info.prop_map(OptionRequest::Go),
            Just(OptionRequest::StructuredReply),
            meta.clone().prop_map(OptionRequest::ListMetaContext),
            meta.prop_map(OptionRequest::SetMetaContext),
            (11u32..).prop_map(OptionRequest::Unsupported),
        ]
    }

    proptest! {
        #[test]
        fn option_decode_never_panics(code in 0u32..16, data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = OptionRequest::decode(code, &data);
        }

        #[test]
        fn headers_decode_never_panic(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = OptionHeader::decode(&data);
            let _ = RequestHeader::decode(&data);
            let _ = OptionReplyHeader::decode(&data);
            let _ = SimpleReplyHeader::decode(&data);
            let _ = ChunkHeader::decode(&data);
        }

        /// Random bytes behind a valid magic exercise the field parsing, not
        /// just the magic check.
        #[test]
        fn request_decode_with_valid_magic_never_panics(tail in proptest::collection::vec(any::<u8>(), 0..40)) {
            let mut data = REQUEST_MAGIC.to_be_bytes().to_vec();
            data.extend_from_slice(&tail);
            let decoded = RequestHeader::decode(&data);
            prop_assert_eq!(decoded.is_ok(), data.len() >= RequestHeader::LEN);
        }

        #[test]
        fn option_request_round_trips(request in option_request()) {
            let (code, data) = request.encode();
            prop_assert_eq!(OptionRequest::decode(code, &data).unwrap(), request);
        }

        #[test]
        fn option_request_truncated_is_error_or_other_value(request in option_request(), cut in 1usize..64) {
            let (code, data) = request.encode();
            if cut <= data.len() {
                let truncated = &data[..data.len() - cut];
                if let Ok(decoded) = OptionRequest::decode(code, truncated) {
                    prop_assert_ne!(decoded, request);
                }
            }
        }

        #[test]
        fn request_header_round_trips(flags: u16, command: u16, cookie: u64, offset: u64, length: u32) {
            let header = RequestHeader { flags, command, cookie, offset, length };
            let mut bytes = Vec::new();
            header.encode(&mut bytes);
            prop_assert_eq!(bytes.len(), RequestHeader::LEN);
            prop_assert_eq!(RequestHeader::decode(&bytes).unwrap(), header);
        }

        #[test]
        fn option_header_round_trips(option: u32, data_len: u32) {
            let header = OptionHeader { option, data_len };
            let mut bytes = Vec::new();
            header.encode(&mut bytes);
            prop_assert_eq!(OptionHeader::decode(&bytes).unwrap(), header);
        }

        #[test]
        fn reply_headers_round_trip(error: u32, cookie: u64, flags: u16, chunk_type: u16, length: u32, option: u32, reply_type: u32) {
            let simple = SimpleReplyHeader { error, cookie };
            let mut bytes = Vec::new();
            simple.encode(&mut bytes);
            prop_assert_eq!(SimpleReplyHeader::decode(&bytes).unwrap(), simple);

            let chunk = ChunkHeader { flags, chunk_type, cookie, length };
            let mut bytes = Vec::new();
            chunk.encode(&mut bytes);
            prop_assert_eq!(ChunkHeader::decode(&bytes).unwrap(), chunk);

            let option_reply = OptionReplyHeader { option, reply_type, data_len: length };
            let mut bytes = Vec::new();
            option_reply.encode(&mut bytes);
            prop_assert_eq!(OptionReplyHeader::decode(&bytes).unwrap(), option_reply);
        }
    }

    #[test]
    fn wire_bytes_match_spec() {
        let header = RequestHeader {
            flags: 0x0001,
            command: command::WRITE,
            cookie: 0x0102_0304_0506_0708,
            offset: 0x1000,
            length: 0x200,
        };
        let mut bytes = Vec::new();
        header.encode(&mut bytes);
        assert_eq!(
            bytes,
            [0x25, 0x60, 0x95, 0x13, 0, 1, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 2, 0]
        );
        assert_eq!(&NBDMAGIC.to_be_bytes(), b"NBDMAGIC");
        assert_eq!(&IHAVEOPT.to_be_bytes(), b"IHAVEOPT");
    }

    #[test]
    fn malformed_options_are_errors() {
        assert!(matches!(OptionRequest::decode(option::LIST, b"x"), Err(Error::Malformed { .. })));
        assert!(matches!(
            OptionRequest::decode(option::EXPORT_NAME, &[0xff, 0xfe]),
            Err(Error::Malformed { reason: "not UTF-8", .. })
        ));
        // INFO whose name length points past the end of the data.
        assert!(matches!(OptionRequest::decode(option::INFO, &[0, 0, 0, 9, b'a']), Err(Error::Truncated { .. })));
        // INFO with trailing garbage after the info list.
        assert!(matches!(OptionRequest::decode(option::INFO, &[0, 0, 0, 0, 0, 0, 7]), Err(Error::Malformed { .. })));
        let long_name = vec![b'a'; STRING_LEN_MAX + 1];
        assert!(matches!(OptionRequest::decode(option::EXPORT_NAME, &long_name), Err(Error::TooLarge { .. })));
        assert_eq!(OptionRequest::decode(option::ABORT, b"ignored").unwrap(), OptionRequest::Abort);
        assert_eq!(OptionRequest::decode(11, b"extended headers").unwrap(), OptionRequest::Unsupported(11));
    }
}
