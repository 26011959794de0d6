//! The remote vault end to end: the real `keel vault` binary (tools/src/vault.rs) and
//! `RemoteVault` clients with certificates from a test CA. The shared vault conformance
//! suite ([`keel_tests::vault_conformance`]); tenant isolation by certificate name
//! (allowed node, node of another tenant, certificate of another CA); a vault that is
//! stopped or killed is `Unavailable` within seconds and used again after its restart;
//! durability: synced chunks survive a crash, a crash before the sync fails the sync, a
//! manifest put or a clean shutdown makes pending chunks durable, a version-1 client gets
//! durable puts; and garbage on raw QUIC streams neither crashes the server nor disturbs a
//! good client.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use keel_net::quic::{self, create_ca, issue_cert, Identity, TlsFiles, TransportConfig, CA_VALIDITY, NODE_VALIDITY};
use keel_snapshot::vault::wire::{self, Direction, ErrorCode, Request, Response, Version};
use keel_snapshot::vault::{RemoteVault, RemoteVaultConfig, Vault, VaultError};
use keel_tests::cmd::wait_for;
use keel_tests::vault_conformance::{self, sample_chunks};
use keel_tests::vault_server::{VaultProcess, VaultTls};

/// The vault server's node name (its certificate's DNS name).
const SERVER: &str = "vault-1";
/// A vault that is down must fail at least this fast: the client's QUIC idle timeout (1 s)
/// on the dead connection, then one connect attempt (at most 3 s).
const DOWN_FAILS_WITHIN: Duration = Duration::from_secs(6);

/// Tenants of the test vault and the nodes that may open them.
const TENANTS: &[(&str, &[&str])] = &[
    ("acme", &["node-a", "node-b"]),
    ("globex", &["node-c"]),
    ("conformance-chunks", &["node-a"]),
    ("conformance-listing", &["node-a"]),
    ("conformance-objects", &["node-a"]),
    ("conformance-bad-input", &["node-a"]),
    ("conformance-tenant-a", &["node-a"]),
    ("conformance-tenant-b", &["node-a"]),
    ("conformance-durable", &["node-a"]),
];

/// A cluster CA with certificates for the vault and nodes a, b and c, and a second CA
/// that issued another "node-a".
struct Certs {
    dir: PathBuf,
}

impl Certs {
    fn create(dir: &Path) -> Result<Self> {
        let ca = dir.join("ca");
        create_ca(&ca, "test", CA_VALIDITY)?;
        for node in [SERVER, "node-a", "node-b", "node-c"] {
            issue_cert(&ca, node, &dir.join(node), NODE_VALIDITY)?;
        }
        let other_ca = dir.join("other-ca");
        create_ca(&other_ca, "impostors", CA_VALIDITY)?;
        issue_cert(&other_ca, "node-a", &dir.join("impostor"), NODE_VALIDITY)?;
        // The impostor trusts the real CA (so it gets as far as presenting its own
        // certificate) and its own (so that its identity loads).
        let both = [
            std::fs::read_to_string(ca.join(quic::CA_CERT_FILE))?,
            std::fs::read_to_string(other_ca.join(quic::CA_CERT_FILE))?,
        ]
        .concat();
        std::fs::write(dir.join("impostor/both-cas.pem"), both)?;
        Ok(Self { dir: dir.to_path_buf() })
    }

    fn files(&self, node: &str) -> TlsFiles {
        TlsFiles::in_dir(&self.dir.join(node), node)
    }

    fn identity(&self, node: &str) -> Identity {
        Identity::load(&self.files(node)).expect("load a test identity")
    }

    fn impostor(&self) -> Identity {
        let dir = self.dir.join("impostor");
        let files = TlsFiles { ca_cert: dir.join("both-cas.pem"), ..TlsFiles::in_dir(&dir, "node-a") };
        Identity::load(&files).expect("load the impostor's identity")
    }
}

/// A `keel vault` process in a temporary directory with [`TENANTS`] and certificates from
/// a test CA, killed when dropped.
struct VaultServer {
    process: VaultProcess,
    certs: Certs,
    _dir: tempfile::TempDir,
}

impl VaultServer {
    /// Writes certificates and a config with [`TENANTS`], starts the server on a free
    /// port and waits until it listens.
    fn start() -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("keel-vault-test-").tempdir()?;
        let certs = Certs::create(dir.path())?;
        let files = certs.files(SERVER);
        let tls = VaultTls { ca_cert: files.ca_cert, cert: files.cert, key: files.key };
        let process = VaultProcess::start(dir.path(), None, tls, TENANTS)?;
        Ok(Self { process, certs, _dir: dir })
    }

    fn client(&self, node: &str, tenant: &str) -> RemoteVault {
        self.client_as(self.certs.identity(node), tenant)
    }

    fn client_as(&self, identity: Identity, tenant: &str) -> RemoteVault {
        RemoteVault::open(RemoteVaultConfig::new("vault-1", self.addr(), SERVER, tenant, identity))
            .expect("open a remote vault client")
    }
}

impl std::ops::Deref for VaultServer {
    type Target = VaultProcess;

    fn deref(&self) -> &VaultProcess {
        &self.process
    }
}

impl std::ops::DerefMut for VaultServer {
    fn deref_mut(&mut self) -> &mut VaultProcess {
        &mut self.process
    }
}

#[test]
fn remote_vault_passes_the_conformance_suite() {
    let server = VaultServer::start().unwrap();
    vault_conformance::check_all(&|tenant| Box::new(server.client("node-a", tenant)));
}

/// A node opens only the tenants that list it; the refusal names the node and the tenant
/// on both sides. A certificate from another CA does not get past the handshake.
#[test]
fn tenants_are_isolated_by_certificate_name() {
    let mut server = VaultServer::start().unwrap();
    let (id, frame) = sample_chunks(7, 1).remove(0);

    let a = server.client("node-a", "acme");
    a.put_chunk(&id, &frame).unwrap();
    a.put_object("snapshots/db/s1.kman", b"acme's manifest").unwrap();
    // Another node of the same tenant sees the same area.
    let b = server.client("node-b", "acme");
    assert_eq!(b.get_object("snapshots/db/s1.kman").unwrap(), b"acme's manifest");
    assert!(b.has_chunk(&id).unwrap());

    // node-c has a valid certificate (it may open globex) but is not one of acme's nodes.
    let c_on_acme = server.client("node-c", "acme");
    for attempt in [c_on_acme.has_chunk(&id).map(|_| ()), c_on_acme.get_object("snapshots/db/s1.kman").map(|_| ())] {
        let e = attempt.unwrap_err();
        assert!(
            matches!(&e, VaultError::Refused { reason, .. } if reason.contains("\"node-c\"") && reason.contains("\"acme\"")),
            "{e}"
        );
        assert!(!e.is_transient());
    }
    let log = server.log();
    assert!(log.contains("refused: node \"node-c\" may not open tenant \"acme\""), "the refusal is not logged:\n{log}");
    // A tenant that does not exist is refused the same way.
    let e = server.client("node-a", "initech").list_objects("").unwrap_err();
    assert!(matches!(&e, VaultError::Refused { reason, .. } if reason.contains("\"initech\"")), "{e}");

    // node-c's own tenant works and holds nothing of acme's.
    let c = server.client("node-c", "globex");
    assert!(!c.has_chunk(&id).unwrap());
    assert!(c.list_objects("").unwrap().is_empty());
    c.put_object("snapshots/db/s1.kman", b"globex's").unwrap();
    assert_eq!(a.get_object("snapshots/db/s1.kman").unwrap(), b"acme's manifest");

    // Same node name, another CA: refused in the TLS handshake.
    let impostor = server.client_as(server.certs.impostor(), "acme");
    let e = impostor.get_object("snapshots/db/s1.kman").unwrap_err();
    assert!(matches!(&e, VaultError::Refused { .. }), "{e}");
    wait_for("the server to log the impostor's refusal", Duration::from_secs(10), || {
        Ok(server.log().contains("UnknownIssuer").then_some(()))
    })
    .unwrap();
    assert!(server.alive(), "the server died:\n{}", server.log());
    assert!(server.stop().unwrap(), "SIGTERM exit status:\n{}", server.log());
}

/// Stopped (SIGTERM) or crashed (SIGKILL), the vault is `Unavailable` within seconds;
/// restarted on the same address, the same client handles use it again and find what was
/// stored before.
#[test]
fn a_vault_that_is_down_is_unavailable_quickly_and_used_again_after_restart() {
    let mut server = VaultServer::start().unwrap();
    let vault = server.client("node-a", "acme");
    let (id, frame) = sample_chunks(8, 1).remove(0);
    vault.put_chunk(&id, &frame).unwrap();
    vault.sync().unwrap();
    vault.put_object("leases/gc-node-a", b"1").unwrap();

    for crash in [false, true] {
        if crash {
            server.kill9();
        } else {
            assert!(server.stop().unwrap(), "SIGTERM exit status:\n{}", server.log());
        }
        for _ in 0..2 {
            let started = Instant::now();
            let e = vault.get_chunk(&id).unwrap_err();
            assert!(matches!(&e, VaultError::Unavailable { .. }), "crash={crash}: {e}");
            assert!(started.elapsed() < DOWN_FAILS_WITHIN, "crash={crash}: took {:?}: {e}", started.elapsed());
        }
        server.restart().unwrap();
        let chunk =
            wait_for("the client to use the restarted vault", Duration::from_secs(20), || match vault.get_chunk(&id) {
                Ok(chunk) => Ok(Some(chunk)),
                Err(e) if e.is_transient() => Ok(None),
                Err(e) => bail!("crash={crash}: {e}"),
            })
            .unwrap();
        assert_eq!(chunk, frame);
        assert_eq!(vault.get_object("leases/gc-node-a").unwrap(), b"1");
    }
    assert!(server.log().contains("vault stopped"), "no clean shutdown logged:\n{}", server.log());
}

/// What a raw client got back on one stream.
#[derive(Debug)]
enum Answer {
    /// A response frame.
    Response(Response),
    /// The stream ended without one (reset, stopped or cut), and why.
    Nothing(#[expect(dead_code, reason = "read through Debug, in assertion messages")] String),
}

/// Raw QUIC, as node-a on a connection of `version`: sends `bytes` on a new stream,
/// optionally finishing it, and reads what comes back.
async fn raw_exchange(conn: &quinn::Connection, version: Version, bytes: &[u8], finish: bool) -> Answer {
    let (mut send, mut recv) = match conn.open_bi().await {
        Ok(stream) => stream,
        Err(e) => return Answer::Nothing(format!("open: {e}")),
    };
    if let Err(e) = send.write_all(bytes).await {
        return Answer::Nothing(format!("write: {e}"));
    }
    if finish {
        let _ = send.finish();
    } else {
        let _ = send.reset(quinn::VarInt::from_u32(7));
    }
    let read = async {
        let header = wire::read_header(&mut recv, Direction::Response, version).await?;
        let payload = wire::read_payload(&mut recv, &header).await?;
        Response::decode(version, header.kind, payload)
    };
    match tokio::time::timeout(Duration::from_secs(10), read).await {
        Ok(Ok(response)) => Answer::Response(response),
        Ok(Err(e)) => Answer::Nothing(e.to_string()),
        Err(_) => Answer::Nothing("no answer within 10 s".into()),
    }
}

fn raw_frame(version: Version, kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = b"KVLT".to_vec();
    frame.extend_from_slice(&[version as u8, kind, 0, 0]);
    frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&frame);
    crc.update(payload);
    frame.extend_from_slice(&crc.finalize().to_le_bytes());
    frame.extend_from_slice(payload);
    frame
}

fn is_bad_request(answer: &Answer) -> bool {
    matches!(answer, Answer::Response(Response::Error { code: ErrorCode::BadRequest, .. }))
}

/// Garbage on raw QUIC streams: each bad stream gets a `BadRequest` answer (or just
/// ends), the connection it came on still serves good requests, and a `RemoteVault`
/// working at the same time never sees an error.
#[test]
fn garbage_frames_do_not_hurt_the_server_or_other_clients() {
    let mut server = VaultServer::start().unwrap();
    let good = Arc::new(server.client("node-a", "acme"));
    let chunks = sample_chunks(11, 40);

    // A well-behaved client works through the whole attack.
    let worker = {
        let good = Arc::clone(&good);
        let chunks = chunks.clone();
        std::thread::spawn(move || -> Result<(), VaultError> {
            for (i, (id, frame)) in chunks.iter().enumerate() {
                good.put_chunk(id, frame)?;
                good.sync()?;
                assert_eq!(&good.get_chunk(id)?, frame);
                good.put_object(&format!("uploads/u{i}"), frame)?;
            }
            Ok(())
        })
    };

    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let identity = server.certs.identity("node-a");
    let addr = server.addr();
    runtime.block_on(async {
        let v2 = Version::V2;
        let endpoint = quic::endpoint(
            "127.0.0.1:0".parse().unwrap(),
            &identity,
            &TransportConfig::default(),
            &[v2.alpn()],
            Vec::new(),
        )
        .unwrap();

        // Garbage instead of Hello: that connection is refused and closed.
        let conn = quic::connect(&endpoint, addr, SERVER).await.unwrap();
        let answer = raw_exchange(&conn, v2, b"GET / HTTP/1.1\r\n\r\n", true).await;
        assert!(is_bad_request(&answer), "{answer:?}");
        let closed = tokio::time::timeout(Duration::from_secs(15), conn.closed()).await;
        assert!(closed.is_ok(), "the server kept a connection that never said Hello");

        // A proper Hello, then garbage stream after stream on the same connection.
        let conn = quic::connect(&endpoint, addr, SERVER).await.unwrap();
        let hello = Request::Hello { tenant: "acme".into() }.encode(v2).unwrap();
        let answer = raw_exchange(&conn, v2, &hello, true).await;
        assert!(matches!(answer, Answer::Response(Response::HelloOk { instance: Some(_) })), "{answer:?}");

        let get = raw_frame(v2, 0x03, &[0x11; 32]);
        let mut bad_crc = get.clone();
        *bad_crc.last_mut().unwrap() ^= 1;
        let mut huge = get[..16].to_vec();
        huge[5] = 0x07; // PutObject
        huge[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        let mut bad_version = get.clone();
        bad_version[4] = 9;
        let mut bad_list = vec![7, 0, 0, 0];
        bad_list.extend_from_slice(&10u32.to_le_bytes());
        bad_list.extend_from_slice(&[0; 32]);
        let mut lying_key = 300u16.to_le_bytes().to_vec();
        lying_key.extend_from_slice(b"short");
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("random bytes", (0..200u32).map(|i| (i * 37 % 251) as u8).collect()),
            ("empty stream", Vec::new()),
            ("half a header", get[..7].to_vec()),
            ("bad magic", [b"XXXX".as_slice(), &get[4..]].concat()),
            ("bad version", bad_version),
            ("a version-1 frame", raw_frame(Version::V1, 0x03, &[0x11; 32])),
            ("a version-1 Sync", raw_frame(Version::V1, 0x0b, &[])),
            ("unknown kind", raw_frame(v2, 0x55, &[])),
            ("a response kind", raw_frame(v2, 0x83, &[0; 64])),
            ("a Synced", raw_frame(v2, 0x8a, &[])),
            ("length near 4 GiB", huge),
            ("too long for its kind", raw_frame(v2, 0x03, &[0; 33])),
            ("a Sync with a payload", raw_frame(v2, 0x0b, &[0])),
            ("truncated payload", get[..get.len() - 5].to_vec()),
            ("bad crc", bad_crc),
            ("bad ListChunks flags", raw_frame(v2, 0x06, &bad_list)),
            ("key_len past the end", raw_frame(v2, 0x07, &lying_key)),
            ("invalid UTF-8 key", raw_frame(v2, 0x08, &[0xff, 0xfe])),
            ("a second Hello", raw_frame(v2, 0x01, b"globex")),
        ];
        for (what, bytes) in &cases {
            let answer = raw_exchange(&conn, v2, bytes, true).await;
            let refused = matches!(answer, Answer::Response(Response::Error { code: ErrorCode::Refused, .. }));
            assert!(is_bad_request(&answer) || (*what == "a second Hello" && refused), "{what}: {answer:?}");
        }
        // A stream reset half way through its frame.
        let answer = raw_exchange(&conn, v2, &get[..20], false).await;
        assert!(!matches!(answer, Answer::Response(ref r) if !matches!(r, Response::Error { .. })), "{answer:?}");

        // The same connection still answers a good request.
        let answer =
            raw_exchange(&conn, v2, &Request::GetObject { key: "nothing/here".into() }.encode(v2).unwrap(), true).await;
        assert!(matches!(answer, Answer::Response(Response::Error { code: ErrorCode::NotFound, .. })), "{answer:?}");
        let answer =
            raw_exchange(&conn, v2, &Request::ListObjects { prefix: String::new() }.encode(v2).unwrap(), true).await;
        assert!(matches!(answer, Answer::Response(Response::ObjectList(_))), "{answer:?}");
        let answer = raw_exchange(&conn, v2, &raw_frame(v2, 0x0b, &[]), true).await;
        assert!(matches!(answer, Answer::Response(Response::Synced)), "{answer:?}");
        endpoint.close(quinn::VarInt::from_u32(0), b"done");
    });

    worker.join().expect("the good client's thread").expect("the good client saw an error");
    assert!(server.alive(), "the server died:\n{}", server.log());
    for (id, frame) in &chunks {
        assert_eq!(&good.get_chunk(id).unwrap(), frame);
    }
    assert_eq!(good.list_objects("uploads/").unwrap().len(), chunks.len());
    let log = server.log();
    assert!(log.contains("bad request, abandoning its stream"), "bad streams are not logged:\n{log}");
    assert!(!log.contains("panicked"), "{log}");
    assert!(server.stop().unwrap(), "SIGTERM exit status:\n{}", server.log());
}

/// Waits until a sync through `vault` reports that the server restarted and may have lost
/// chunks (the first attempts may only find the server still starting).
fn sync_reports_a_restart(vault: &RemoteVault) -> String {
    wait_for("the sync to report the restart", Duration::from_secs(20), || match vault.sync() {
        Err(VaultError::Unavailable { reason, .. }) if reason.contains("restarted") => Ok(Some(reason)),
        Err(e) if e.is_transient() => Ok(None),
        other => bail!("the sync after the restart: {other:?}"),
    })
    .unwrap()
}

/// Chunks synced before `kill -9` are there after it; for a chunk put but not synced before
/// it, which the crash may have lost, the handle that put it learns so from its next sync
/// (`Unavailable`, so the upload is retried) instead of going on to write a manifest that
/// names it.
#[test]
fn synced_chunks_survive_a_crash_and_a_crash_before_sync_fails_the_sync() {
    let mut server = VaultServer::start().unwrap();
    let vault = server.client("node-a", "acme");
    let chunks = sample_chunks(21, 3);
    for (id, frame) in &chunks[..2] {
        vault.put_chunk(id, frame).unwrap();
    }
    vault.sync().unwrap();
    let (lost_id, lost_frame) = &chunks[2];
    vault.put_chunk(lost_id, lost_frame).unwrap();

    server.kill9();
    server.restart().unwrap();
    let reason = sync_reports_a_restart(&vault);
    assert!(reason.contains("may be lost"), "{reason}");

    let fresh = server.client("node-b", "acme");
    for (id, frame) in &chunks[..2] {
        assert_eq!(&fresh.get_chunk(id).unwrap(), frame, "a synced chunk after kill -9");
    }
    // The unsynced chunk may be gone (the cost of batching; whether a process crash loses
    // it is the store's business): the failed sync above kept it out of any manifest, and
    // the retry sends it again and syncs.
    vault.put_chunk(lost_id, lost_frame).unwrap();
    vault.sync().unwrap();
    assert_eq!(&fresh.get_chunk(lost_id).unwrap(), lost_frame);
}

/// Pending chunks become durable without the client's `Sync` at two points: when a
/// manifest (an object under `snapshots/`) is stored, and at a clean shutdown.
#[test]
fn a_manifest_put_and_a_clean_shutdown_make_pending_chunks_durable() {
    let mut server = VaultServer::start().unwrap();
    let vault = server.client("node-a", "acme");
    let chunks = sample_chunks(22, 2);
    let (before_manifest, frame) = &chunks[0];
    vault.put_chunk(before_manifest, frame).unwrap();
    vault.put_object("snapshots/db/forgot-to-sync.kman", b"names the chunk").unwrap();
    server.kill9();
    server.restart().unwrap();
    let fresh = server.client("node-b", "acme");
    assert_eq!(&fresh.get_chunk(before_manifest).unwrap(), frame, "a chunk put before a manifest, after kill -9");

    let (before_shutdown, frame) = &chunks[1];
    fresh.put_chunk(before_shutdown, frame).unwrap();
    assert!(server.stop().unwrap(), "SIGTERM exit status:\n{}", server.log());
    server.restart().unwrap();
    let after = server.client("node-c", "globex");
    assert!(!after.has_chunk(before_shutdown).unwrap(), "tenants are separate");
    let after = server.client("node-a", "acme");
    assert_eq!(&after.get_chunk(before_shutdown).unwrap(), frame, "a pending chunk after a clean shutdown");
    // The handle that put it cannot know the shutdown kept it: its sync still reports the
    // restart, and its retry finds the chunk there.
    sync_reports_a_restart(&fresh);
    assert!(fresh.has_chunk(before_shutdown).unwrap());
    fresh.sync().unwrap();
}

/// A node of before version 2 offers only `keel-vault/1`: the server speaks version 1 to
/// it (`HelloOk` without an instance, no `Sync`) and keeps that version's promise, a chunk
/// durable once answered for, although it defers for version-2 clients.
#[test]
fn a_version_one_client_gets_chunks_durable_at_once() {
    let mut server = VaultServer::start().unwrap();
    let chunks = sample_chunks(23, 2);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let identity = server.certs.identity("node-a");
    let addr = server.addr();
    let v1 = Version::V1;
    runtime.block_on(async {
        let endpoint = quic::endpoint(
            "127.0.0.1:0".parse().unwrap(),
            &identity,
            &TransportConfig::default(),
            &[v1.alpn()],
            vec![],
        )
        .unwrap();
        let conn = quic::connect(&endpoint, addr, SERVER).await.unwrap();
        assert_eq!(quic::alpn(&conn).as_deref(), Some(v1.alpn()));
        let hello = Request::Hello { tenant: "acme".into() }.encode(v1).unwrap();
        let answer = raw_exchange(&conn, v1, &hello, true).await;
        assert!(matches!(answer, Answer::Response(Response::HelloOk { instance: None })), "{answer:?}");
        for (id, frame) in &chunks {
            let put = Request::PutChunk { id: *id, frame: frame.clone().into() }.encode(v1).unwrap();
            let answer = raw_exchange(&conn, v1, &put, true).await;
            assert!(matches!(answer, Answer::Response(Response::Stored(_))), "{answer:?}");
        }
        // Readable at once, as version 1 promised.
        let get = Request::GetChunk { id: chunks[0].0 }.encode(v1).unwrap();
        let answer = raw_exchange(&conn, v1, &get, true).await;
        assert!(
            matches!(&answer, Answer::Response(Response::Chunk(bytes)) if bytes[..] == chunks[0].1[..]),
            "{answer:?}"
        );
        // Version 1 has no Sync.
        let answer = raw_exchange(&conn, v1, &raw_frame(v1, 0x0b, &[]), true).await;
        assert!(is_bad_request(&answer), "{answer:?}");
        endpoint.close(quinn::VarInt::from_u32(0), b"done");
    });
    server.kill9();
    server.restart().unwrap();
    let fresh = server.client("node-a", "acme");
    for (id, frame) in &chunks {
        assert_eq!(&fresh.get_chunk(id).unwrap(), frame, "a version-1 put after kill -9");
    }
}
