//! The [`Vault`] contract (snapshot/src/vault/mod.rs) as checks that every backend runs: the
//! local directory vault and the S3 vault against a real Garage (tests/it/s3_vault.rs) pass
//! the same suite.
//!
//! Each check takes handles on tenant areas that are empty when it starts, and panics with
//! the vault's name and what differed. Checks call [`Vault::sync`] after chunk puts before
//! they read, list or delete those chunks, as the contract asks (a deferring backend, such
//! as the `keel vault` server, shows a chunk only after it).

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use keel_snapshot::vault::{keys, ChunkEntry, Put, Vault, VaultError};
use keel_snapshot::{encode_chunk, ChunkId, TenantKey};

/// Opens a handle on `tenant`'s area of the backend under test.
pub type OpenTenant<'a> = &'a dyn Fn(&str) -> Box<dyn Vault>;

/// Every check, each on its own tenant(s) of the backend `open` reaches.
pub fn check_all(open: OpenTenant<'_>) {
    chunks(&*open("conformance-chunks"));
    chunk_listing(&*open("conformance-listing"));
    objects(&*open("conformance-objects"));
    bad_input(&*open("conformance-bad-input"));
    tenants_are_separate(&*open("conformance-tenant-a"), &*open("conformance-tenant-b"));
    synced_chunks_reach_a_fresh_handle(open, "conformance-durable");
}

/// `count` distinct encoded chunks, sorted by id.
pub fn sample_chunks(seed: u8, count: usize) -> Vec<(ChunkId, Vec<u8>)> {
    let key = TenantKey::from_bytes([seed; 32]);
    let mut chunks: Vec<_> = (0..count)
        .map(|i| {
            let data = format!("chunk {i} of seed {seed} ").repeat(1 + i % 5);
            encode_chunk(&key, data.as_bytes(), 3).expect("encode a chunk")
        })
        .collect();
    chunks.sort_by_key(|(id, _)| *id);
    chunks
}

fn now_secs() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// Put, deduplicated put, get, has, has_chunks, delete, and not-found answers.
pub fn chunks(vault: &dyn Vault) {
    let name = vault.name().to_owned();
    let chunks = sample_chunks(1, 5);
    let absent = ChunkId([0xee; 32]);
    for (id, frame) in &chunks {
        assert_eq!(vault.put_chunk(id, frame).unwrap(), Put::Written, "{name}: first put of {id}");
        assert_eq!(vault.put_chunk(id, frame).unwrap(), Put::AlreadyPresent, "{name}: second put of {id}");
    }
    vault.sync().unwrap();
    vault.sync().unwrap();
    for (id, frame) in &chunks {
        assert_eq!(&vault.get_chunk(id).unwrap(), frame, "{name}: get {id}");
        assert!(vault.has_chunk(id).unwrap(), "{name}: has {id}");
    }
    assert!(!vault.has_chunk(&absent).unwrap(), "{name}: has an absent chunk");
    let error = vault.get_chunk(&absent).unwrap_err();
    assert!(matches!(&error, VaultError::NotFound { .. }), "{name}: get of an absent chunk: {error:?}");
    assert!(!error.is_transient());

    let ids = [chunks[2].0, absent, chunks[0].0, chunks[2].0, ChunkId([0; 32]), chunks[4].0];
    assert_eq!(vault.has_chunks(&ids).unwrap(), [true, false, true, true, false, true], "{name}: has_chunks");
    assert!(vault.has_chunks(&[]).unwrap().is_empty(), "{name}: has_chunks of nothing");

    assert!(vault.delete_chunk(&chunks[1].0).unwrap(), "{name}: delete a present chunk");
    assert!(!vault.delete_chunk(&chunks[1].0).unwrap(), "{name}: delete it again");
    assert!(!vault.delete_chunk(&absent).unwrap(), "{name}: delete an absent chunk");
    assert!(vault.get_chunk(&chunks[1].0).unwrap_err().is_not_found(), "{name}: get a deleted chunk");
    assert!(!vault.has_chunk(&chunks[1].0).unwrap(), "{name}: has a deleted chunk");
    // A deleted chunk can be stored again.
    assert_eq!(vault.put_chunk(&chunks[1].0, &chunks[1].1).unwrap(), Put::Written, "{name}: put after delete");
    vault.sync().unwrap();
    assert_eq!(vault.get_chunk(&chunks[1].0).unwrap(), chunks[1].1, "{name}: get after put after delete");
}

/// `list_chunks`: ascending ids, strictly after `after`, at most `limit`, resumable, with
/// lengths and plausible times; an empty page ends the walk.
pub fn chunk_listing(vault: &dyn Vault) {
    let name = vault.name().to_owned();
    assert!(vault.list_chunks(None, 10).unwrap().is_empty(), "{name}: listing of an empty vault");
    let chunks = sample_chunks(2, 23);
    for (id, frame) in &chunks {
        vault.put_chunk(id, frame).unwrap();
    }
    vault.sync().unwrap();
    let ids: Vec<ChunkId> = chunks.iter().map(|(id, _)| *id).collect();
    let started = now_secs();

    let all = vault.list_chunks(None, 1000).unwrap();
    assert_eq!(all.iter().map(|e| e.id).collect::<Vec<_>>(), ids, "{name}: full listing");
    for (entry, (_, frame)) in all.iter().zip(&chunks) {
        assert_eq!(entry.len, frame.len() as u64, "{name}: listed length of {}", entry.id);
        assert!(
            (started - 24 * 3600..=started + 3600).contains(&entry.modified),
            "{name}: modified time {} of {} is not close to now ({started})",
            entry.modified,
            entry.id
        );
    }
    for limit in [1, 2, 7, 22, 23, 24] {
        let mut walked: Vec<ChunkEntry> = Vec::new();
        let mut pages = 0;
        loop {
            let page = vault.list_chunks(walked.last().map(|e| &e.id), limit).unwrap();
            assert!(page.len() <= limit, "{name}: page of {} with limit {limit}", page.len());
            if page.is_empty() {
                break;
            }
            walked.extend(page);
            pages += 1;
            assert!(pages <= ids.len() + 1, "{name}: listing with limit {limit} does not end");
        }
        assert_eq!(walked, all, "{name}: walk with limit {limit}");
    }
    assert!(vault.list_chunks(None, 0).unwrap().is_empty(), "{name}: limit 0");
    // After the middle id, after the last, and after ids that are not stored.
    let middle = vault.list_chunks(Some(&ids[10]), 1000).unwrap();
    assert_eq!(middle.iter().map(|e| e.id).collect::<Vec<_>>(), ids[11..], "{name}: after the 11th id");
    assert!(vault.list_chunks(Some(&ids[22]), 10).unwrap().is_empty(), "{name}: after the last id");
    let mut between = ids[4];
    between.0[31] = between.0[31].wrapping_add(1);
    if between < ids[5] && !ids.contains(&between) {
        let page = vault.list_chunks(Some(&between), 1).unwrap();
        assert_eq!(page.first().map(|e| e.id), Some(ids[5]), "{name}: after an id between two stored ones");
    }
    assert_eq!(
        vault.list_chunks(Some(&ChunkId([0; 32])), 3).unwrap().iter().map(|e| e.id).collect::<Vec<_>>(),
        ids[..3],
        "{name}: after the smallest id"
    );
    assert!(vault.list_chunks(Some(&ChunkId([0xff; 32])), 3).unwrap().is_empty(), "{name}: after the largest id");
    // Deleted chunks leave the listing.
    vault.delete_chunk(&ids[0]).unwrap();
    vault.delete_chunk(&ids[22]).unwrap();
    let remaining = vault.list_chunks(None, 1000).unwrap();
    assert_eq!(remaining.iter().map(|e| e.id).collect::<Vec<_>>(), ids[1..22], "{name}: listing after deletes");
}

/// Objects: put, atomic replace, get, prefix listing in key order, delete, not found.
pub fn objects(vault: &dyn Vault) {
    let name = vault.name().to_owned();
    assert!(vault.list_objects("").unwrap().is_empty(), "{name}: objects of an empty vault");
    let manifest = keys::manifest("db", "db-20261130-0700-ab12");
    let mut expected: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let puts: [(&str, &[u8]); 7] = [
        (&manifest, b"one"),
        ("snapshots/db/db-20261130-0800-cd34.kman", b"two"),
        ("snapshots/dbx/x.kman", b"three"),
        ("snapshots/fs/s1.kman", b""),
        ("uploads/u1@node-a:7", b"upload intent"),
        ("leases/gc-node-a", b"lease"),
        (&manifest, b"uno, replaced"),
    ];
    for (key, bytes) in puts {
        vault.put_object(key, bytes).unwrap();
        expected.insert(key.to_owned(), bytes.to_vec());
        assert_eq!(vault.get_object(key).unwrap(), bytes, "{name}: get {key} right after its put");
    }
    let big = vec![0x5a; 3 << 20];
    vault.put_object("uploads/big", &big).unwrap();
    assert_eq!(vault.get_object("uploads/big").unwrap(), big, "{name}: a 3 MiB object");
    expected.insert("uploads/big".into(), big);

    let listed = |prefix: &str| -> Vec<(String, u64)> {
        vault.list_objects(prefix).unwrap().into_iter().map(|e| (e.key, e.len)).collect()
    };
    let wanted = |expected: &BTreeMap<String, Vec<u8>>, prefix: &str| -> Vec<(String, u64)> {
        expected.iter().filter(|(k, _)| k.starts_with(prefix)).map(|(k, v)| (k.clone(), v.len() as u64)).collect()
    };
    for prefix in ["", keys::SNAPSHOTS, &keys::snapshots_of("db"), "snapshots/db", keys::UPLOADS, keys::LEASES, "x/"] {
        assert_eq!(listed(prefix), wanted(&expected, prefix), "{name}: list_objects({prefix:?})");
    }
    assert_eq!(listed(&keys::snapshots_of("db")).len(), 2, "{name}: db's manifests");
    assert_eq!(listed("snapshots/db").len(), 3, "{name}: a prefix that is not a directory");

    assert!(vault.delete_object("uploads/u1@node-a:7").unwrap(), "{name}: delete a present object");
    assert!(!vault.delete_object("uploads/u1@node-a:7").unwrap(), "{name}: delete it again");
    assert!(!vault.delete_object("uploads/never").unwrap(), "{name}: delete an absent object");
    let error = vault.get_object("uploads/u1@node-a:7").unwrap_err();
    assert!(matches!(&error, VaultError::NotFound { .. }), "{name}: get a deleted object: {error:?}");
    assert!(vault.get_object("snapshots/none.kman").unwrap_err().is_not_found(), "{name}: get an absent object");
    expected.remove("uploads/u1@node-a:7");
    assert_eq!(listed(""), wanted(&expected, ""), "{name}: listing after a delete");
}

/// Frames that are not valid chunks and keys that are not valid object keys are refused,
/// and nothing is stored for them.
pub fn bad_input(vault: &dyn Vault) {
    let name = vault.name().to_owned();
    let (id, frame) = sample_chunks(3, 1).remove(0);
    let mut flipped = frame.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x40;
    let truncated = &frame[..frame.len() - 1];
    let mut bad_magic = frame.clone();
    bad_magic[0] = b'X';
    for (what, bad) in
        [("flipped bit", &flipped[..]), ("truncated", truncated), ("bad magic", &bad_magic), ("empty", &[])]
    {
        let error = vault.put_chunk(&id, bad).unwrap_err();
        assert!(
            matches!(&error, VaultError::BadChunk { id: bad_id, .. } if *bad_id == id),
            "{name}: put of a {what} frame: {error:?}"
        );
        assert!(!error.is_transient(), "{name}: a bad frame is not transient");
    }
    assert!(!vault.has_chunk(&id).unwrap(), "{name}: a refused frame was stored");
    assert!(vault.list_chunks(None, 10).unwrap().is_empty(), "{name}: a refused frame is listed");

    for bad_key in ["", "/abs", "a//b", "a/../b", "..", "snapshots/./x", "a/.hidden", "sp ace", "a\\b", "é", "a/"] {
        let bad = |result: Result<(), VaultError>, op: &str| {
            assert!(matches!(result, Err(VaultError::BadKey { .. })), "{name}: {op} of key {bad_key:?}: {result:?}");
        };
        bad(vault.put_object(bad_key, b"x"), "put");
        bad(vault.get_object(bad_key).map(|_| ()), "get");
        bad(vault.delete_object(bad_key).map(|_| ()), "delete");
    }
    let too_long = "a".repeat(keys::MAX_KEY_LEN + 1);
    assert!(matches!(vault.put_object(&too_long, b"x"), Err(VaultError::BadKey { .. })), "{name}: a too long key");
    assert!(vault.list_objects("").unwrap().is_empty(), "{name}: a refused key was stored");
}

/// Two tenants of one backend see nothing of each other's chunks or objects, even under
/// the same ids and keys.
pub fn tenants_are_separate(a: &dyn Vault, b: &dyn Vault) {
    let name = a.name().to_owned();
    let chunks = sample_chunks(4, 3);
    for (id, frame) in &chunks {
        a.put_chunk(id, frame).unwrap();
    }
    a.sync().unwrap();
    a.put_object("uploads/x", b"tenant a").unwrap();
    for (id, _) in &chunks {
        assert!(!b.has_chunk(id).unwrap(), "{name}: tenant b has a's chunk {id}");
        assert!(b.get_chunk(id).unwrap_err().is_not_found(), "{name}: tenant b reads a's chunk {id}");
        assert!(!b.delete_chunk(id).unwrap(), "{name}: tenant b deletes a's chunk {id}");
    }
    assert_eq!(b.has_chunks(&[chunks[0].0, chunks[2].0]).unwrap(), [false, false], "{name}: b's has_chunks");
    assert!(b.list_chunks(None, 100).unwrap().is_empty(), "{name}: tenant b lists a's chunks");
    assert!(b.list_objects("").unwrap().is_empty(), "{name}: tenant b lists a's objects");
    assert!(b.get_object("uploads/x").unwrap_err().is_not_found(), "{name}: tenant b reads a's object");
    assert!(!b.delete_object("uploads/x").unwrap(), "{name}: tenant b deletes a's object");

    // The same id and key in b are b's own; a's copies are untouched.
    assert_eq!(b.put_chunk(&chunks[0].0, &chunks[0].1).unwrap(), Put::Written, "{name}: b stores its own copy");
    b.sync().unwrap();
    b.put_object("uploads/x", b"tenant b").unwrap();
    assert_eq!(a.get_object("uploads/x").unwrap(), b"tenant a", "{name}: a's object after b's put");
    assert_eq!(b.get_object("uploads/x").unwrap(), b"tenant b", "{name}: b's object");
    assert!(b.delete_chunk(&chunks[0].0).unwrap());
    assert!(a.has_chunk(&chunks[0].0).unwrap(), "{name}: b's delete removed a's chunk");
    assert_eq!(a.list_chunks(None, 100).unwrap().len(), 3, "{name}: a's chunks after b's delete");
}

/// Chunks put and synced through one handle are there for a handle opened afterwards
/// (for a remote vault: another connection), in full and in the listing; and a manifest
/// written after the sync names only chunks the fresh handle reads.
pub fn synced_chunks_reach_a_fresh_handle(open: OpenTenant<'_>, tenant: &str) {
    let chunks = sample_chunks(5, 12);
    let manifest = keys::manifest("db", "db-20261201-0700-ef56");
    let name = {
        let writer = open(tenant);
        for (id, frame) in &chunks {
            assert_eq!(writer.put_chunk(id, frame).unwrap(), Put::Written, "{}: put {id}", writer.name());
        }
        writer.sync().unwrap();
        writer.put_object(&manifest, b"names every chunk").unwrap();
        writer.name().to_owned()
    };
    let reader = open(tenant);
    for (id, frame) in &chunks {
        assert_eq!(&reader.get_chunk(id).unwrap(), frame, "{name}: a fresh handle reads {id}");
    }
    let ids: Vec<ChunkId> = chunks.iter().map(|(id, _)| *id).collect();
    assert_eq!(reader.has_chunks(&ids).unwrap(), vec![true; ids.len()], "{name}: a fresh handle's has_chunks");
    let listed: Vec<ChunkId> = reader.list_chunks(None, 100).unwrap().into_iter().map(|e| e.id).collect();
    assert_eq!(listed, ids, "{name}: a fresh handle's listing");
    assert_eq!(reader.get_object(&manifest).unwrap(), b"names every chunk", "{name}: the manifest");
    // Syncing with nothing put is fine.
    reader.sync().unwrap();
}
