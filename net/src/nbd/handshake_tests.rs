//! Handshake state machine tests: bytes in, bytes and steps out, no sockets.

#![allow(clippy::unwrap_used, clippy::indexing_slicing, reason = "tests")]

use std::sync::Arc;

use super::*;
use crate::nbd::proto::{OptionReplyHeader, CLIENT_FLAG_FIXED_NEWSTYLE, CLIENT_FLAG_NO_ZEROES};
use crate::nbd::tests::mem_export::MemExport;

const SIZE: u64 = 4 << 20;
const FLAGS_RW: u16 = 0x0d6d;
const EXTENDED_HEADERS: u32 = 11;

fn registry(names: &[&str]) -> Arc<ExportRegistry> {
    let registry = Arc::new(ExportRegistry::default());
    for name in names {
        let read_only = name.starts_with("ro");
        registry.insert(Arc::new(MemExport::new(name, SIZE).read_only(read_only))).unwrap();
    }
    registry
}

fn started(names: &[&str], client_flags: u32) -> Handshake {
    let mut handshake = Handshake::new(registry(names));
    handshake.handle_client_flags(client_flags.to_be_bytes()).unwrap();
    handshake
}

fn fixed(names: &[&str]) -> Handshake {
    started(names, CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES)
}

fn send(handshake: &mut Handshake, request: &OptionRequest) -> Step {
    let (code, data) = request.encode();
    handshake.handle_option(code, &data)
}

/// Splits concatenated option replies into (option, reply type, data).
fn parse(mut bytes: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
    let mut replies = Vec::new();
    while !bytes.is_empty() {
        let header = OptionReplyHeader::decode(bytes).unwrap();
        let end = OptionReplyHeader::LEN + header.data_len as usize;
        replies.push((header.option, header.reply_type, bytes[OptionReplyHeader::LEN..end].to_vec()));
        bytes = &bytes[end..];
    }
    replies
}

fn replies_of(step: Step) -> Vec<(u32, u32, Vec<u8>)> {
    match step {
        Step::Reply(bytes) => parse(&bytes),
        other => panic!("expected a reply, got {other:?}"),
    }
}

fn reply_types(step: Step) -> Vec<u32> {
    replies_of(step).into_iter().map(|(_, reply_type, _)| reply_type).collect()
}

fn info_request(name: &str, info_types: &[u16]) -> InfoRequest {
    InfoRequest { name: name.to_owned(), info_types: info_types.to_vec() }
}

fn meta(export: &str, queries: &[&str]) -> MetaContextRequest {
    MetaContextRequest { export_name: export.to_owned(), queries: queries.iter().map(|q| (*q).to_owned()).collect() }
}

/// Returns the session of a successful GO and checks its replies.
fn go(handshake: &mut Handshake, request: InfoRequest) -> (Vec<(u32, u32, Vec<u8>)>, Session) {
    match send(handshake, &OptionRequest::Go(request)) {
        Step::Transmission { reply, session } => (parse(&reply), session),
        other => panic!("GO did not enter transmission: {other:?}"),
    }
}

#[test]
fn greeting_is_nbdmagic_ihaveopt_and_flags() {
    let greeting = Handshake::greeting();
    assert_eq!(&greeting[..16], b"NBDMAGICIHAVEOPT");
    assert_eq!(&greeting[16..], &[0, 3]);
}

#[test]
fn unknown_client_flags_are_fatal() {
    let mut handshake = Handshake::new(registry(&["a"]));
    assert!(matches!(handshake.handle_client_flags(4u32.to_be_bytes()), Err(Error::UnknownFlags { bits: 4, .. })));
}

#[test]
fn option_header_checks_magic_and_bounds_length() {
    let handshake = fixed(&["a"]);
    let mut bytes = Vec::new();
    OptionHeader { option: 7, data_len: 64 * 1024 }.encode(&mut bytes);
    assert_eq!(handshake.handle_option_header(&bytes).unwrap().data_len, 64 * 1024);
    bytes.clear();
    OptionHeader { option: 7, data_len: 64 * 1024 + 1 }.encode(&mut bytes);
    assert!(matches!(handshake.handle_option_header(&bytes), Err(Error::TooLarge { .. })));
    bytes[0] ^= 1;
    assert!(matches!(handshake.handle_option_header(&bytes), Err(Error::BadMagic { .. })));
}

#[test]
fn list_names_every_export_then_acks() {
    let mut handshake = fixed(&["beta", "alpha"]);
    let replies = replies_of(send(&mut handshake, &OptionRequest::List));
    assert_eq!(replies.len(), 3);
    for (reply, name) in replies.iter().zip(["alpha", "beta"]) {
        assert_eq!((reply.0, reply.1), (option::LIST, reply::SERVER));
        assert_eq!(&reply.2[..4], &(name.len() as u32).to_be_bytes());
        assert_eq!(&reply.2[4..4 + name.len()], name.as_bytes());
        assert!(String::from_utf8_lossy(&reply.2[4 + name.len()..]).contains(name), "description follows");
    }
    assert_eq!((replies[2].0, replies[2].1), (option::LIST, reply::ACK));
    // LIST with data is invalid, and the handshake goes on.
    assert_eq!(reply_types(handshake.handle_option(option::LIST, b"x")), vec![reply::ERR_INVALID]);
    go(&mut handshake, info_request("alpha", &[]));
}

#[test]
fn info_on_unknown_export_is_err_unknown() {
    let mut handshake = fixed(&["a"]);
    let replies = replies_of(send(&mut handshake, &OptionRequest::Info(info_request("missing", &[]))));
    assert_eq!(replies.len(), 1);
    assert_eq!((replies[0].0, replies[0].1), (option::INFO, reply::ERR_UNKNOWN));
    assert!(String::from_utf8_lossy(&replies[0].2).contains("missing"));
    let replies = replies_of(send(&mut handshake, &OptionRequest::Go(info_request("missing", &[]))));
    assert_eq!(replies[0].1, reply::ERR_UNKNOWN);
}

#[test]
fn unknown_options_are_unsupported_and_go_still_works() {
    let mut handshake = fixed(&["a"]);
    for code in [EXTENDED_HEADERS, 4, 12, 0xdead_beef] {
        let step = handshake.handle_option(code, b"some data");
        let replies = replies_of(step);
        assert_eq!(replies.len(), 1);
        assert_eq!((replies[0].0, replies[0].1), (code, reply::ERR_UNSUP));
    }
    assert_eq!(reply_types(send(&mut handshake, &OptionRequest::StartTls)), vec![reply::ERR_UNSUP]);
    let (_, session) = go(&mut handshake, info_request("a", &[]));
    assert_eq!(session.export.name(), "a");
}

#[test]
fn abort_acks_and_closes() {
    let mut handshake = fixed(&["a"]);
    match send(&mut handshake, &OptionRequest::Abort) {
        Step::Close { reply, .. } => {
            assert_eq!(parse(&reply), vec![(option::ABORT, reply::ACK, vec![])])
        }
        other => panic!("ABORT did not close: {other:?}"),
    }
}

#[test]
fn go_without_block_size_request_still_reports_export_and_block_size() {
    let mut handshake = fixed(&["a"]);
    let (replies, session) = go(&mut handshake, info_request("a", &[]));
    let mut export_info = SIZE.to_be_bytes().to_vec();
    export_info.extend_from_slice(&FLAGS_RW.to_be_bytes());
    let mut expected_export = info::EXPORT.to_be_bytes().to_vec();
    expected_export.extend_from_slice(&export_info);
    let mut expected_block_size = info::BLOCK_SIZE.to_be_bytes().to_vec();
    for value in [512u32, 4096, 32 << 20] {
        expected_block_size.extend_from_slice(&value.to_be_bytes());
    }
    assert_eq!(
        replies,
        vec![
            (option::GO, reply::INFO, expected_export),
            (option::GO, reply::INFO, expected_block_size),
            (option::GO, reply::ACK, vec![]),
        ]
    );
    assert_eq!(session.transmission_flags, FLAGS_RW);
    assert!(!session.structured_replies);
    assert_eq!(session.base_allocation_id, None);
}

#[test]
fn go_with_block_size_name_and_description() {
    let mut handshake = fixed(&["a"]);
    // INFO first must report the same as the GO after it.
    let info_replies = replies_of(send(
        &mut handshake,
        &OptionRequest::Info(info_request("a", &[info::BLOCK_SIZE, info::NAME, info::DESCRIPTION, 999])),
    ));
    let (go_replies, _) =
        go(&mut handshake, info_request("a", &[info::BLOCK_SIZE, info::NAME, info::DESCRIPTION, 999]));
    let info_types: Vec<u16> =
        go_replies.iter().filter(|r| r.1 == reply::INFO).map(|r| u16::from_be_bytes([r.2[0], r.2[1]])).collect();
    assert_eq!(info_types, vec![info::EXPORT, info::BLOCK_SIZE, info::NAME, info::DESCRIPTION]);
    assert_eq!(&go_replies[2].2[2..], b"a");
    assert_eq!(&go_replies[3].2[2..], b"in-memory test export a");
    let strip = |replies: &[(u32, u32, Vec<u8>)]| replies.iter().map(|r| (r.1, r.2.clone())).collect::<Vec<_>>();
    assert_eq!(strip(&info_replies), strip(&go_replies));
}

#[test]
fn export_name_with_and_without_no_zeroes() {
    for (client_flags, reply_len) in [
        (CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES, 10),
        (CLIENT_FLAG_FIXED_NEWSTYLE, 134),
        (0, 134), // plain newstyle client
    ] {
        let mut handshake = started(&["a"], client_flags);
        match send(&mut handshake, &OptionRequest::ExportName("a".into())) {
            Step::Transmission { reply, session } => {
                assert_eq!(reply.len(), reply_len);
                assert_eq!(&reply[..8], &SIZE.to_be_bytes());
                assert_eq!(&reply[8..10], &FLAGS_RW.to_be_bytes());
                assert!(reply[10..].iter().all(|&b| b == 0));
                assert_eq!(session.export.name(), "a");
            }
            other => panic!("EXPORT_NAME failed: {other:?}"),
        }
    }
    let mut handshake = fixed(&["a"]);
    assert!(matches!(
        send(&mut handshake, &OptionRequest::ExportName("b".into())),
        Step::Close { reply, .. } if reply.is_empty()
    ));
}

#[test]
fn plain_newstyle_client_gets_closed_on_other_options() {
    let mut handshake = started(&["a"], 0);
    assert!(matches!(send(&mut handshake, &OptionRequest::List), Step::Close { .. }));
}

#[test]
fn empty_name_is_the_default_export_only_when_there_is_one() {
    let mut handshake = fixed(&["only"]);
    let (_, session) = go(&mut handshake, info_request("", &[info::NAME]));
    assert_eq!(session.export.name(), "only");

    let mut handshake = fixed(&["a", "b"]);
    assert_eq!(reply_types(send(&mut handshake, &OptionRequest::Go(info_request("", &[])))), vec![reply::ERR_UNKNOWN]);
}

#[test]
fn read_only_export_advertises_read_only() {
    let mut handshake = fixed(&["ro-disk"]);
    let (_, session) = go(&mut handshake, info_request("ro-disk", &[]));
    assert_eq!(session.transmission_flags, FLAGS_RW | 0x2);
}

#[test]
fn set_meta_context_needs_structured_replies() {
    let mut handshake = fixed(&["a"]);
    let request = OptionRequest::SetMetaContext(meta("a", &["base:allocation"]));
    assert_eq!(reply_types(send(&mut handshake, &request)), vec![reply::ERR_INVALID]);
    let (_, session) = go(&mut handshake, info_request("a", &[]));
    assert_eq!(session.base_allocation_id, None);
}

#[test]
fn set_meta_context_selects_base_allocation_for_that_export() {
    let mut handshake = fixed(&["a", "b"]);
    assert_eq!(reply_types(send(&mut handshake, &OptionRequest::StructuredReply)), vec![reply::ACK]);
    let request = OptionRequest::SetMetaContext(meta("a", &["qemu:dirty-bitmap:x", "base:allocation", "base:"]));
    let replies = replies_of(send(&mut handshake, &request));
    let mut context = BASE_ALLOCATION_CONTEXT_ID.to_be_bytes().to_vec();
    context.extend_from_slice(b"base:allocation");
    assert_eq!(
        replies,
        vec![(option::SET_META_CONTEXT, reply::META_CONTEXT, context), (option::SET_META_CONTEXT, reply::ACK, vec![]),]
    );
    // Unknown export in SET.
    let request = OptionRequest::SetMetaContext(meta("zzz", &["base:allocation"]));
    assert_eq!(reply_types(send(&mut handshake, &request)), vec![reply::ERR_UNKNOWN]);

    let mut for_b = fixed(&["a", "b"]);
    send(&mut for_b, &OptionRequest::StructuredReply);
    send(&mut for_b, &OptionRequest::SetMetaContext(meta("a", &["base:allocation"])));
    let (_, session) = go(&mut for_b, info_request("b", &[]));
    assert_eq!(session.base_allocation_id, None, "selection was for another export");

    let (_, session) = go(&mut handshake, info_request("a", &[]));
    assert!(session.structured_replies);
    assert_eq!(session.base_allocation_id, Some(BASE_ALLOCATION_CONTEXT_ID));
}

#[test]
fn set_meta_context_replaces_and_ignores_the_wildcard() {
    let mut handshake = fixed(&["a"]);
    send(&mut handshake, &OptionRequest::StructuredReply);
    send(&mut handshake, &OptionRequest::SetMetaContext(meta("a", &["base:allocation"])));
    // `base:` is a LIST-only wildcard, so this selects nothing, replacing the above.
    let replies = reply_types(send(&mut handshake, &OptionRequest::SetMetaContext(meta("a", &["base:"]))));
    assert_eq!(replies, vec![reply::ACK]);
    let (_, session) = go(&mut handshake, info_request("a", &[]));
    assert_eq!(session.base_allocation_id, None);
}

#[test]
fn list_meta_context_wildcards() {
    let mut handshake = fixed(&["a"]);
    let mut context = 0u32.to_be_bytes().to_vec();
    context.extend_from_slice(b"base:allocation");
    for queries in [&[][..], &["base:"][..], &["base:allocation", "x:y"][..]] {
        let replies = replies_of(send(&mut handshake, &OptionRequest::ListMetaContext(meta("a", queries))));
        assert_eq!(
            replies,
            vec![
                (option::LIST_META_CONTEXT, reply::META_CONTEXT, context.clone()),
                (option::LIST_META_CONTEXT, reply::ACK, vec![]),
            ],
            "queries {queries:?}"
        );
    }
    let replies = reply_types(send(&mut handshake, &OptionRequest::ListMetaContext(meta("a", &["qemu:x"]))));
    assert_eq!(replies, vec![reply::ACK]);
    // Malformed meta-context data is ERR_INVALID, and the handshake goes on.
    assert_eq!(reply_types(handshake.handle_option(option::LIST_META_CONTEXT, &[0, 0])), vec![reply::ERR_INVALID]);
    go(&mut handshake, info_request("a", &[]));
}

#[test]
fn structured_reply_then_export_name_keeps_structured_replies() {
    let mut handshake = fixed(&["a"]);
    send(&mut handshake, &OptionRequest::StructuredReply);
    assert_eq!(reply_types(handshake.handle_option(option::STRUCTURED_REPLY, b"x")), vec![reply::ERR_INVALID]);
    match send(&mut handshake, &OptionRequest::ExportName("a".into())) {
        Step::Transmission { session, .. } => assert!(session.structured_replies),
        other => panic!("{other:?}"),
    }
}

proptest::proptest! {
    /// Arbitrary option sequences never panic the state machine, and every
    /// non-final step leaves it able to answer a GO.
    #[test]
    fn random_options_never_panic(
        options in proptest::collection::vec(
            (0u32..14, proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)),
            0..16,
        )
    ) {
        let mut handshake = fixed(&["a"]);
        for (code, data) in options {
            match handshake.handle_option(code, &data) {
                Step::Reply(bytes) => {
                    let replies = parse(&bytes);
                    proptest::prop_assert!(!replies.is_empty());
                    proptest::prop_assert!(replies.iter().all(|reply| reply.0 == code));
                }
                Step::Close { .. } | Step::Transmission { .. } => return Ok(()),
            }
        }
        go(&mut handshake, info_request("a", &[]));
    }
}
