//! The S3 vault against a real Garage ([`keel_tests::garage`]): the shared vault conformance
//! suite ([`keel_tests::vault_conformance`], which the local vault passes too), the layout
//! in the bucket, a vault that goes down and comes back, and credentials that are refused.
//!
//! Without Garage these tests are skipped with a printed reason, unless
//! `KEEL_REQUIRE_GARAGE=1` (tests/run sets it) makes that a failure.

use std::time::{Duration, Instant};

use keel_snapshot::vault::{LocalVault, S3Config, S3Credentials, S3Vault, Vault, VaultError};
use keel_tests::garage::{self, Garage};
use keel_tests::vault_conformance::{self, sample_chunks};

/// A vault that is down must fail this fast (the S3 vault's connect timeout is 2 s and a
/// refused connection is retried twice within 5 s).
const DOWN_FAILS_WITHIN: Duration = Duration::from_secs(8);

/// A Garage in a fresh temporary directory, or `None` when the test is skipped.
fn garage(test: &str) -> Option<(Garage, tempfile::TempDir)> {
    let binary = garage::binary_or_skip(test)?;
    let dir = tempfile::Builder::new().prefix("keel-garage-").tempdir().expect("temporary directory");
    let garage = Garage::start_with(&binary, &dir.path().join("garage")).expect("start Garage");
    Some((garage, dir))
}

fn config(garage: &Garage, key_id: &str, secret: &str) -> S3Config {
    let credentials = S3Credentials::Static { access_key_id: key_id.into(), secret_access_key: secret.into() };
    S3Config::new(garage.endpoint(), garage::REGION, &garage.bucket, credentials)
}

fn open(garage: &Garage, tenant: &str) -> S3Vault {
    S3Vault::open("garage", config(garage, &garage.key_id, &garage.secret), tenant).expect("open the S3 vault")
}

#[test]
fn local_vault_passes_the_conformance_suite() {
    let dir = tempfile::tempdir().unwrap();
    vault_conformance::check_all(&|tenant| Box::new(LocalVault::open("local", dir.path(), tenant).unwrap()));
}

#[test]
fn s3_vault_on_garage_passes_the_conformance_suite() {
    let Some((garage, _dir)) = garage("s3_vault_on_garage_passes_the_conformance_suite") else { return };
    vault_conformance::check_all(&|tenant| Box::new(open(&garage, tenant)));
}

/// Two tenants, and the same tenant under two prefixes, share a bucket without seeing each
/// other; keys land where the layout says (`<prefix>/<tenant>/chunks/<hex id>`,
/// `<prefix>/<tenant>/objects/<key>`).
#[test]
fn s3_tenants_and_prefixes_are_separate_areas_of_one_bucket() {
    let Some((garage, _dir)) = garage("s3_tenants_and_prefixes_are_separate_areas_of_one_bucket") else { return };
    vault_conformance::tenants_are_separate(&open(&garage, "acme"), &open(&garage, "globex"));

    let mut prefixed = config(&garage, &garage.key_id, &garage.secret);
    prefixed.prefix = Some("keel/dc2".into());
    let prefixed = S3Vault::open("garage-prefixed", prefixed, "acme").unwrap();
    assert!(prefixed.list_chunks(None, 10).unwrap().is_empty(), "another prefix sees the root's chunks");
    assert!(prefixed.list_objects("").unwrap().is_empty(), "another prefix sees the root's objects");
    let (id, frame) = sample_chunks(9, 1).remove(0);
    prefixed.put_chunk(&id, &frame).unwrap();
    prefixed.put_object("uploads/p", b"p").unwrap();
    assert!(!open(&garage, "acme").has_chunk(&id).unwrap(), "the root area sees the prefixed chunk");
    assert_eq!(prefixed.chunk_key(&id), format!("keel/dc2/acme/chunks/{id}"));
    assert_eq!(prefixed.object_key("uploads/p").unwrap(), "keel/dc2/acme/objects/uploads/p");
    // The same bytes through a vault whose tenant area is the prefix's parent: a listing
    // there does not reach into the tenant below it (keys are matched as strings).
    let mut parent = config(&garage, &garage.key_id, &garage.secret);
    parent.prefix = Some("keel".into());
    let parent = S3Vault::open("garage-parent", parent, "dc2").unwrap();
    assert!(parent.list_objects("").unwrap().is_empty(), "a tenant named like a prefix sees other tenants");
}

/// A Garage that is stopped gives `Unavailable` (transient) within seconds for every
/// operation; after a restart the vault works again with its data intact.
#[test]
fn s3_stopped_garage_is_unavailable_quickly_and_recovers_after_restart() {
    let test = "s3_stopped_garage_is_unavailable_quickly_and_recovers_after_restart";
    let Some((mut garage, _dir)) = garage(test) else { return };
    let vault = open(&garage, "acme");
    let chunks = sample_chunks(5, 2);
    vault.put_chunk(&chunks[0].0, &chunks[0].1).unwrap();
    vault.put_object("uploads/u", b"before").unwrap();

    garage.stop().unwrap();
    let down = |op: &str, call: &dyn Fn() -> Result<(), VaultError>| {
        let started = Instant::now();
        let error = call().expect_err(op);
        let took = started.elapsed();
        assert!(matches!(&error, VaultError::Unavailable { .. }), "{op} on a stopped Garage: {error:?}");
        assert!(error.is_transient(), "{op}: {error}");
        assert!(took < DOWN_FAILS_WITHIN, "{op} on a stopped Garage took {took:?}");
    };
    down("put_chunk", &|| vault.put_chunk(&chunks[1].0, &chunks[1].1).map(drop));
    down("get_chunk", &|| vault.get_chunk(&chunks[0].0).map(drop));
    down("has_chunk", &|| vault.has_chunk(&chunks[0].0).map(drop));
    down("has_chunks", &|| vault.has_chunks(&[chunks[0].0, chunks[1].0]).map(drop));
    down("delete_chunk", &|| vault.delete_chunk(&chunks[0].0).map(drop));
    down("list_chunks", &|| vault.list_chunks(None, 10).map(drop));
    down("put_object", &|| vault.put_object("uploads/v", b"during"));
    down("get_object", &|| vault.get_object("uploads/u").map(drop));
    down("delete_object", &|| vault.delete_object("uploads/u").map(drop));
    down("list_objects", &|| vault.list_objects("").map(drop));

    garage.restart().unwrap();
    assert_eq!(vault.get_chunk(&chunks[0].0).unwrap(), chunks[0].1, "chunk after restart");
    assert_eq!(vault.get_object("uploads/u").unwrap(), b"before", "object after restart");
    assert_eq!(vault.put_chunk(&chunks[1].0, &chunks[1].1).unwrap(), keel_snapshot::vault::Put::Written);
    assert_eq!(vault.list_chunks(None, 10).unwrap().len(), 2);
}

/// A wrong secret, an unknown key id, and a real key without rights on the bucket are all
/// `Refused` (not transient), for reads, writes and listings alike.
#[test]
fn s3_wrong_credentials_are_refused() {
    let Some((garage, _dir)) = garage("s3_wrong_credentials_are_refused") else { return };
    let (stranger_id, stranger_secret) = garage.create_key("stranger").unwrap();
    let mut wrong_secret = garage.secret.clone();
    let last = if wrong_secret.pop() == Some('0') { '1' } else { '0' };
    wrong_secret.push(last);
    assert_ne!(wrong_secret, garage.secret);
    let (id, frame) = sample_chunks(6, 1).remove(0);
    for (what, key_id, secret) in [
        ("wrong secret", garage.key_id.as_str(), wrong_secret.as_str()),
        ("unknown key id", "GK0123456789abcdef01234567", garage.secret.as_str()),
        ("key without rights on the bucket", stranger_id.as_str(), stranger_secret.as_str()),
    ] {
        let vault = S3Vault::open("garage", config(&garage, key_id, secret), "acme").unwrap();
        let results = [
            ("put_chunk", vault.put_chunk(&id, &frame).map(drop)),
            ("get_chunk", vault.get_chunk(&id).map(drop)),
            ("list_chunks", vault.list_chunks(None, 10).map(drop)),
            ("put_object", vault.put_object("uploads/x", b"x")),
            ("list_objects", vault.list_objects("").map(drop)),
        ];
        for (op, result) in results {
            assert!(matches!(&result, Err(VaultError::Refused { .. })), "{what}: {op}: {result:?}");
            assert!(!result.unwrap_err().is_transient());
        }
    }
    // A bucket that does not exist refuses too (only a HEAD, which has no body to say why,
    // reads as a missing key).
    let mut no_bucket = config(&garage, &garage.key_id, &garage.secret);
    no_bucket.bucket = "no-such-bucket".into();
    let vault = S3Vault::open("garage", no_bucket, "acme").unwrap();
    let results = [
        ("put_chunk", vault.put_chunk(&id, &frame).map(drop)),
        ("get_chunk", vault.get_chunk(&id).map(drop)),
        ("list_chunks", vault.list_chunks(None, 10).map(drop)),
        ("put_object", vault.put_object("uploads/x", b"x")),
        ("get_object", vault.get_object("uploads/x").map(drop)),
        ("list_objects", vault.list_objects("").map(drop)),
    ];
    for (op, result) in results {
        assert!(matches!(&result, Err(VaultError::Refused { .. })), "missing bucket: {op}: {result:?}");
    }
    // Nothing got in.
    assert!(open(&garage, "acme").list_objects("").unwrap().is_empty());
    assert!(!open(&garage, "acme").has_chunk(&id).unwrap());
}

/// The vault is called from `spawn_blocking` threads of another runtime (as an async
/// caller would) and from plain threads at once.
#[test]
fn s3_vault_works_from_plain_and_spawn_blocking_threads() {
    let Some((garage, _dir)) = garage("s3_vault_works_from_plain_and_spawn_blocking_threads") else { return };
    let vault = std::sync::Arc::new(open(&garage, "acme"));
    let chunks = sample_chunks(7, 16);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        let mut tasks = Vec::new();
        for (id, frame) in &chunks[..8] {
            let (vault, id, frame) = (vault.clone(), *id, frame.clone());
            tasks.push(tokio::task::spawn_blocking(move || vault.put_chunk(&id, &frame)));
        }
        for task in tasks {
            task.await.unwrap().unwrap();
        }
    });
    std::thread::scope(|scope| {
        for (id, frame) in &chunks[8..] {
            let vault = &vault;
            scope.spawn(move || vault.put_chunk(id, frame).unwrap());
        }
    });
    let listed: Vec<_> = vault.list_chunks(None, 100).unwrap().into_iter().map(|e| e.id).collect();
    assert_eq!(listed, chunks.iter().map(|(id, _)| *id).collect::<Vec<_>>());
}
