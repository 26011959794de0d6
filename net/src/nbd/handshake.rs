//! Fixed-newstyle option haggling as a state machine with no I/O.
//!
//! The driver:
//! 1. sends [`Handshake::greeting`];
//! 2. reads 4 bytes and passes them to [`Handshake::handle_client_flags`];
//! 3. loops: reads an [`OptionHeader::LEN`]-byte header, checks it with
//!    [`Handshake::handle_option_header`], reads that many data bytes, and
//!    passes both to [`Handshake::handle_option`], then writes the returned
//!    bytes and does what the [`Step`] says (continue, close, or enter
//!    transmission with a [`Session`]).
//!
//! Any `Err` from the first two calls means the client broke a MUST and the
//! connection is closed.

#![deny(clippy::indexing_slicing, clippy::unwrap_used)]

use std::sync::Arc;

use bytes::BufMut;

use crate::error::Error;
use crate::nbd::export::{Export, ExportRegistry};
use crate::nbd::proto::{
    self, info, option, reply, transmission_flag, InfoRequest, MetaContextRequest, OptionHeader, OptionRequest,
};
use crate::nbd::{BLOCK_SIZE_MIN, BLOCK_SIZE_PREFERRED, PAYLOAD_MAX};

/// The id of `base:allocation` once selected by SET_META_CONTEXT.
/// (LIST_META_CONTEXT replies use id 0, as the spec asks.)
pub(crate) const BASE_ALLOCATION_CONTEXT_ID: u32 = 1;

/// Zero padding after an EXPORT_NAME reply unless both sides agreed on NO_ZEROES.
const EXPORT_NAME_PADDING_LEN: usize = 124;

/// What the driver does after sending the bytes a step carries.
#[derive(Debug)]
pub(crate) enum Step {
    /// Send the reply, then read the next option.
    Reply(Vec<u8>),
    /// Send the reply (possibly empty), then close the connection.
    Close { reply: Vec<u8>, reason: &'static str },
    /// Send the reply, then switch to the transmission phase.
    Transmission { reply: Vec<u8>, session: Session },
}

/// Everything the transmission phase needs from the handshake.
pub(crate) struct Session {
    pub(crate) export: Arc<dyn Export>,
    /// The flags advertised for this export (`transmission_flag::*`).
    pub(crate) transmission_flags: u16,
    pub(crate) structured_replies: bool,
    /// `Some(id)` when `base:allocation` was selected for this export.
    pub(crate) base_allocation_id: Option<u32>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("export", &self.export.name())
            .field("transmission_flags", &self.transmission_flags)
            .field("structured_replies", &self.structured_replies)
            .field("base_allocation_id", &self.base_allocation_id)
            .finish()
    }
}

/// The result of the last SET_META_CONTEXT.
#[derive(Debug)]
struct MetaSelection {
    /// Canonical name of the export the selection was made for; it applies
    /// only if the client then enters transmission with that same export.
    export_name: String,
    base_allocation: bool,
}

/// One connection's handshake state.
pub(crate) struct Handshake {
    exports: Arc<ExportRegistry>,
    client_flags_seen: bool,
    fixed_newstyle: bool,
    no_zeroes: bool,
    structured_replies: bool,
    meta_selection: Option<MetaSelection>,
}

impl Handshake {
    pub(crate) fn new(exports: Arc<ExportRegistry>) -> Self {
        Self {
            exports,
            client_flags_seen: false,
            fixed_newstyle: false,
            no_zeroes: false,
            structured_replies: false,
            meta_selection: None,
        }
    }

    /// The server's opening bytes: NBDMAGIC · IHAVEOPT · handshake flags.
    pub(crate) fn greeting() -> [u8; 18] {
        let mut bytes = [0u8; 18];
        let mut buf = &mut bytes[..];
        buf.put_u64(proto::NBDMAGIC);
        buf.put_u64(proto::IHAVEOPT);
        buf.put_u16(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES);
        bytes
    }

    /// Handles the client's 4-byte flags. Unknown bits are a MUST violation.
    pub(crate) fn handle_client_flags(&mut self, bytes: [u8; 4]) -> Result<(), Error> {
        let flags = u32::from_be_bytes(bytes);
        let known = proto::CLIENT_FLAG_FIXED_NEWSTYLE | proto::CLIENT_FLAG_NO_ZEROES;
        if flags & !known != 0 {
            return Err(Error::UnknownFlags { what: "client handshake flags", bits: u64::from(flags & !known) });
        }
        self.client_flags_seen = true;
        self.fixed_newstyle = flags & proto::CLIENT_FLAG_FIXED_NEWSTYLE != 0;
        self.no_zeroes = flags & proto::CLIENT_FLAG_NO_ZEROES != 0;
        Ok(())
    }

    /// Decodes an option header and bounds its data length.
    pub(crate) fn handle_option_header(&self, bytes: &[u8]) -> Result<OptionHeader, Error> {
        let header = OptionHeader::decode(bytes)?;
        if header.data_len > proto::OPTION_DATA_LEN_MAX {
            return Err(Error::TooLarge {
                what: "option data",
                len: u64::from(header.data_len),
                max: u64::from(proto::OPTION_DATA_LEN_MAX),
            });
        }
        Ok(header)
    }

    /// Handles one complete option (header already checked, data read).
    pub(crate) fn handle_option(&mut self, code: u32, data: &[u8]) -> Step {
        debug_assert!(self.client_flags_seen, "option before client flags");
        let request = match OptionRequest::decode(code, data) {
            Ok(request) => request,
            Err(error) if self.fixed_newstyle => {
                return Step::Reply(error_reply(code, reply::ERR_INVALID, &error.to_string()));
            }
            Err(_) => {
                return Step::Close {
                    reply: Vec::new(),
                    reason: "malformed option from a client without fixed newstyle",
                }
            }
        };
        // A plain (non-fixed) newstyle client may only send EXPORT_NAME: it
        // cannot parse option replies, so anything else ends the connection.
        if !self.fixed_newstyle && !matches!(request, OptionRequest::ExportName(_)) {
            return Step::Close {
                reply: Vec::new(),
                reason: "option other than EXPORT_NAME from a client without fixed newstyle",
            };
        }
        match request {
            OptionRequest::ExportName(name) => self.handle_export_name(&name),
            OptionRequest::Abort => Step::Close { reply: ack(code), reason: "client sent ABORT" },
            OptionRequest::List => Step::Reply(self.handle_list()),
            OptionRequest::StartTls => {
                Step::Reply(error_reply(code, reply::ERR_UNSUP, "TLS is not supported by this server"))
            }
            OptionRequest::Info(request) => self.handle_info(code, &request).0,
            OptionRequest::Go(request) => match self.handle_info(code, &request) {
                (Step::Reply(reply), Some(export)) => Step::Transmission { reply, session: self.session(export) },
                (step, _) => step,
            },
            OptionRequest::StructuredReply => {
                self.structured_replies = true;
                Step::Reply(ack(code))
            }
            OptionRequest::ListMetaContext(request) => {
                Step::Reply(self.handle_meta_context(code, &request, MetaMode::List))
            }
            OptionRequest::SetMetaContext(request) => {
                Step::Reply(self.handle_meta_context(code, &request, MetaMode::Set))
            }
            OptionRequest::Unsupported(_) => {
                Step::Reply(error_reply(code, reply::ERR_UNSUP, "option not supported by this server"))
            }
        }
    }

    fn handle_export_name(&self, name: &str) -> Step {
        let Some(export) = self.exports.resolve(name) else {
            // EXPORT_NAME has no error reply: closing is the only refusal.
            return Step::Close { reply: Vec::new(), reason: "EXPORT_NAME for an unknown export" };
        };
        let session = self.session(export);
        let mut reply = Vec::with_capacity(8 + 2 + EXPORT_NAME_PADDING_LEN);
        reply.put_u64(session.export.size());
        reply.put_u16(session.transmission_flags);
        if !self.no_zeroes {
            reply.put_bytes(0, EXPORT_NAME_PADDING_LEN);
        }
        Step::Transmission { reply, session }
    }

    fn handle_list(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for export in self.exports.list() {
            let name = export.name();
            let description = export.description();
            let mut data = Vec::with_capacity(4 + name.len() + description.len());
            data.put_u32(name.len() as u32);
            data.put_slice(name.as_bytes());
            data.put_slice(truncate_utf8(&description, proto::STRING_LEN_MAX).as_bytes());
            proto::put_option_reply(&mut out, option::LIST, reply::SERVER, &data);
        }
        out.extend_from_slice(&ack(option::LIST));
        out
    }

    /// INFO and GO share everything but the ending; returns the export on
    /// success so GO can enter transmission.
    fn handle_info(&self, code: u32, request: &InfoRequest) -> (Step, Option<Arc<dyn Export>>) {
        let Some(export) = self.exports.resolve(&request.name) else {
            let message = format!("no export named {:?}", request.name);
            return (Step::Reply(error_reply(code, reply::ERR_UNKNOWN, &message)), None);
        };
        let mut out = Vec::new();
        // INFO_EXPORT is mandatory; BLOCK_SIZE is always sent because Keel's
        // constraints (512-byte granularity) differ from the defaults (1 byte).
        let mut data = Vec::with_capacity(12);
        data.put_u16(info::EXPORT);
        data.put_u64(export.size());
        data.put_u16(transmission_flags(export.as_ref()));
        proto::put_option_reply(&mut out, code, reply::INFO, &data);

        let mut data = Vec::with_capacity(14);
        data.put_u16(info::BLOCK_SIZE);
        data.put_u32(BLOCK_SIZE_MIN);
        data.put_u32(BLOCK_SIZE_PREFERRED);
        data.put_u32(PAYLOAD_MAX);
        proto::put_option_reply(&mut out, code, reply::INFO, &data);

        if request.info_types.contains(&info::NAME) {
            let name = export.name();
            let mut data = Vec::with_capacity(2 + name.len());
            data.put_u16(info::NAME);
            data.put_slice(name.as_bytes());
            proto::put_option_reply(&mut out, code, reply::INFO, &data);
        }
        if request.info_types.contains(&info::DESCRIPTION) {
            let description = export.description();
            let description = truncate_utf8(&description, proto::STRING_LEN_MAX);
            let mut data = Vec::with_capacity(2 + description.len());
            data.put_u16(info::DESCRIPTION);
            data.put_slice(description.as_bytes());
            proto::put_option_reply(&mut out, code, reply::INFO, &data);
        }
        // Unknown info types are ignored, as the spec requires.
        out.extend_from_slice(&ack(code));
        (Step::Reply(out), Some(export))
    }

    fn handle_meta_context(&mut self, code: u32, request: &MetaContextRequest, mode: MetaMode) -> Vec<u8> {
        if mode == MetaMode::Set && !self.structured_replies {
            return error_reply(code, reply::ERR_INVALID, "SET_META_CONTEXT requires STRUCTURED_REPLY first");
        }
        let Some(export) = self.exports.resolve(&request.export_name) else {
            let message = format!("no export named {:?}", request.export_name);
            return error_reply(code, reply::ERR_UNKNOWN, &message);
        };
        let base_allocation = match mode {
            // No queries lists every context the server has.
            MetaMode::List => {
                request.queries.is_empty()
                    || request.queries.iter().any(|query| query == "base:" || query == proto::BASE_ALLOCATION)
            }
            // The `base:` wildcard is for LIST only; SET ignores it. Unknown
            // namespaces and leaves are ignored, not errors.
            MetaMode::Set => request.queries.iter().any(|query| query == proto::BASE_ALLOCATION),
        };
        let context_id = match mode {
            MetaMode::List => 0,
            MetaMode::Set => {
                self.meta_selection = Some(MetaSelection { export_name: export.name().to_owned(), base_allocation });
                BASE_ALLOCATION_CONTEXT_ID
            }
        };
        let mut out = Vec::new();
        if base_allocation {
            let mut data = Vec::with_capacity(4 + proto::BASE_ALLOCATION.len());
            data.put_u32(context_id);
            data.put_slice(proto::BASE_ALLOCATION.as_bytes());
            proto::put_option_reply(&mut out, code, reply::META_CONTEXT, &data);
        }
        out.extend_from_slice(&ack(code));
        out
    }

    fn session(&self, export: Arc<dyn Export>) -> Session {
        let base_allocation = self.structured_replies
            && self
                .meta_selection
                .as_ref()
                .is_some_and(|selection| selection.base_allocation && selection.export_name == export.name());
        Session {
            transmission_flags: transmission_flags(export.as_ref()),
            structured_replies: self.structured_replies,
            base_allocation_id: base_allocation.then_some(BASE_ALLOCATION_CONTEXT_ID),
            export,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MetaMode {
    List,
    Set,
}

/// The transmission flags advertised for `export`. CAN_MULTI_CONN is honest
/// because `Export::flush` is global across connections (see its docs).
pub(crate) fn transmission_flags(export: &dyn Export) -> u16 {
    use transmission_flag::*;
    let mut flags = HAS_FLAGS
        | SEND_FLUSH
        | SEND_FUA
        | SEND_TRIM
        | SEND_WRITE_ZEROES
        | SEND_CACHE
        | SEND_FAST_ZERO
        | CAN_MULTI_CONN;
    if export.read_only() {
        flags |= READ_ONLY;
    }
    flags
}

fn ack(code: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(proto::OptionReplyHeader::LEN);
    proto::put_option_reply(&mut out, code, reply::ACK, &[]);
    out
}

fn error_reply(code: u32, reply_type: u32, message: &str) -> Vec<u8> {
    debug_assert!(reply_type & 0x8000_0000 != 0, "not an error reply type");
    let mut out = Vec::new();
    let message = truncate_utf8(message, proto::STRING_LEN_MAX);
    proto::put_option_reply(&mut out, code, reply_type, message.as_bytes());
    out
}

/// The longest prefix of `text` that is at most `len_max` bytes and ends on a
/// character boundary.
pub(crate) fn truncate_utf8(text: &str, len_max: usize) -> &str {
    let mut end = text.len().min(len_max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.get(..end).unwrap_or_default()
}

#[cfg(test)]
#[path = "handshake_tests.rs"]
mod tests;
