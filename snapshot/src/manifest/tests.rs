//! Manifest format tests: round trips of every version, index chunks, every flipped byte,
//! forgery, garbage.

use super::piece::encode_piece;
use super::*;
use crate::chunk::seal_chunk;
use crate::vault::{LocalVault, Vault};

fn sample(key: &TenantKey, chunks: usize) -> ManifestV1 {
    ManifestV1 {
        snapshot_id: "20261130T070000Z-00c0ffee".into(),
        volume: "db".into(),
        marker: "daily".into(),
        node: "node-b".into(),
        key_id: key.key_id(),
        created_unix: 1_795_000_000,
        marker_seq: 42,
        parent: Some("20261129T150000Z-12345678".into()),
        full_read: false,
        volume_size: chunks as u64 * 65536 - 100,
        chunk_size: 65536,
        stats: StatsV1 { chunks_read: 3, zero_chunks: 1, new_chunks: 2, new_stored_bytes: 9, new_plain_bytes: 10 },
        // Holes every third chunk, and a run of holes 32..48 (a whole range at fanout 16).
        chunks: (0..chunks).map(|i| if i % 3 == 0 || (32..48).contains(&i) { HOLE } else { [i as u8; 32] }).collect(),
    }
}

/// `base` as a version 3 manifest at `fanout`, its index chunks stored in `vaults`.
fn indexed(key: &TenantKey, vaults: &[&dyn Vault], mut base: ManifestV1, fanout: u32) -> ManifestV3 {
    let chunks = std::mem::take(&mut base.chunks);
    let index = chunks
        .chunks(fanout as usize)
        .map(|range| {
            if range.iter().all(|c| *c == HOLE) {
                return HOLE;
            }
            let plain = encode_piece(range);
            let id = key.chunk_id(&plain);
            let frame = seal_chunk(key, &id, &plain, 3).unwrap();
            for vault in vaults {
                vault.put_chunk(&id, &frame).unwrap();
            }
            id.0
        })
        .collect();
    ManifestV3 { base, group: None, fanout, index }
}

fn entries(key: &TenantKey, vaults: &[&dyn Vault], manifest: &Manifest) -> Vec<[u8; 32]> {
    let mut out = Vec::new();
    ChunkMap::new(key, vaults, manifest).for_each(|_, entry| out.push(entry.raw())).unwrap();
    out
}

#[test]
fn inline_versions_1_and_2_are_still_read() {
    let key = TenantKey::from_bytes([5; 32]);
    let m = sample(&key, 10);
    let v1 = Manifest::load(&encode_manifest_v1(&key, &m).unwrap(), &key).unwrap();
    assert_eq!((v1.version(), v1.group(), v1.chunk_count()), (1, None, 10));
    assert_eq!(entries(&key, &[], &v1), m.chunks, "inline entries need no vault");
    assert_eq!(v1.chunk_range(9), (9 * 65536, 65536 - 100));
    assert!(v1.index_chunks().is_empty());
    let group = GroupV2 { name: "shop".into(), members: vec!["db".into(), "files".into()] };
    let v2 = ManifestV2 { base: m.clone(), group };
    let bytes = encode_manifest_v2(&key, &v2).unwrap();
    let loaded = Manifest::load(&bytes, &key).unwrap();
    assert_eq!(loaded.version(), 2);
    assert_eq!(loaded.group(), Some(("shop", vec!["db", "files"])));
    assert_eq!(entries(&key, &[], &loaded), m.chunks);
    // The version is under the MAC: relabelled as version 1 (crcs fixed up), the body
    // either fails validation or authentication.
    let mut relabelled = bytes.clone();
    relabelled[4] = 1;
    let crc = crc32fast::hash(&relabelled[..92]);
    relabelled[92..96].copy_from_slice(&crc.to_le_bytes());
    assert!(Manifest::load(&relabelled, &key).is_err());
}

#[test]
fn version_3_round_trip_in_memory_and_mapped() {
    let dir = tempfile::tempdir().unwrap();
    let vault = LocalVault::open("a", dir.path().join("a"), "t").unwrap();
    let key = TenantKey::from_bytes([5; 32]);
    let base = sample(&key, 40);
    let mut m = indexed(&key, &[&vault], base.clone(), 16);
    m.group = Some(GroupV2 { name: "shop".into(), members: vec!["db".into(), "files".into()] });
    assert_eq!(m.index.len(), 3);
    assert_eq!(m.index[2], HOLE, "chunks 32..40 are holes: no index chunk");
    let bytes = encode_manifest(&key, &m).unwrap();
    let loaded = Manifest::load(&bytes, &key).unwrap();
    assert_eq!((loaded.version(), loaded.chunk_count(), loaded.index_chunks().len()), (3, 40, 2));
    assert_eq!(loaded.group(), Some(("shop", vec!["db", "files"])));
    assert_eq!(loaded.parent(), Some("20261129T150000Z-12345678"));
    assert_eq!(entries(&key, &[&vault], &loaded), base.chunks);
    let map = ChunkMap::new(&key, &[&vault], &loaded);
    assert_eq!((map.pieces(), map.piece_range(2)), (3, 32..40));
    assert_eq!(map.entry(1).unwrap(), ChunkRef::Data(ChunkId([1; 32])));
    assert_eq!(map.entry(0).unwrap(), ChunkRef::Hole);
    assert_eq!(map.index_entry(2), Some(ChunkRef::Hole));
    let path = dir.path().join("m.kman");
    std::fs::write(&path, &bytes).unwrap();
    let mapped = Manifest::open(&path).unwrap();
    mapped.authenticate(&key).unwrap();
    assert_eq!(entries(&key, &[&vault], &mapped), base.chunks);
}

#[test]
fn a_damaged_index_chunk_is_read_from_the_next_vault_or_named() {
    let dir = tempfile::tempdir().unwrap();
    let a = LocalVault::open("a", dir.path().join("a"), "t").unwrap();
    let b = LocalVault::open("b", dir.path().join("b"), "t").unwrap();
    let key = TenantKey::from_bytes([5; 32]);
    let base = sample(&key, 40);
    let m = indexed(&key, &[&a, &b], base.clone(), 16);
    let loaded = Manifest::load(&encode_manifest(&key, &m).unwrap(), &key).unwrap();
    let victim = ChunkId(m.index[1]);
    assert!(a.delete_chunk(&victim).unwrap());
    let map = ChunkMap::new(&key, &[&a, &b], &loaded);
    let mut seen = Vec::new();
    map.for_each(|_, e| seen.push(e.raw())).unwrap();
    assert_eq!(seen, base.chunks);
    let fallbacks = map.take_fallbacks();
    assert_eq!(fallbacks.len(), 1);
    assert_eq!(fallbacks[0].0, victim);
    // In no vault: the error names the snapshot, the index chunk and its range.
    let map = ChunkMap::new(&key, &[&a], &loaded);
    assert!(map.entry(3).is_ok(), "other ranges still read");
    let err = map.entry(20).unwrap_err();
    assert_eq!((err.piece, err.id, err.first, err.last), (1, victim, 16, 31));
    assert!(err.to_string().contains("20261130T070000Z-00c0ffee"), "{err}");
    // Another tenant's key cannot read it.
    let other = TenantKey::from_bytes([6; 32]);
    assert!(ChunkMap::new(&other, &[&b], &loaded).entry(0).is_err());
}

/// A range whose index chunk is slow to arrive holds up only the threads that want that
/// range: another range loads meanwhile, and the waiters of the slow one get its load.
#[test]
fn a_slow_index_chunk_holds_up_only_its_own_range() {
    use crate::vault::testing::HookedVault;
    use std::sync::mpsc;
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let inner = LocalVault::open("a", dir.path().join("a"), "t").unwrap();
    let key = TenantKey::from_bytes([5; 32]);
    let base = sample(&key, 40);
    let m = indexed(&key, &[&inner], base.clone(), 16);
    let loaded = Manifest::load(&encode_manifest(&key, &m).unwrap(), &key).unwrap();
    // The read of range 0's index chunk announces itself, then waits to be let go.
    let (slow, entered, release) = (ChunkId(m.index[0]), mpsc::channel(), mpsc::channel::<()>());
    let (entered_tx, release_rx) = (std::sync::Mutex::new(entered.0), std::sync::Mutex::new(release.1));
    let reads = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = std::sync::Arc::clone(&reads);
    let vault = HookedVault::new(
        inner,
        Box::new(move |_, id| {
            if *id == slow {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                entered_tx.lock().unwrap().send(()).unwrap();
                let _ = release_rx.lock().unwrap().recv();
            }
        }),
    );
    let map = ChunkMap::new(&key, &[&vault], &loaded);
    let map = &map;
    std::thread::scope(|scope| {
        let first = scope.spawn(move || map.piece(0).unwrap());
        entered.1.recv_timeout(Duration::from_secs(60)).expect("the first load reaches the vault");
        let second = scope.spawn(move || map.piece(0).unwrap());
        // Range 1 while range 0 is stuck in the vault.
        let (done_tx, done_rx) = mpsc::channel();
        scope.spawn(move || done_tx.send(map.piece(1).unwrap()).unwrap());
        let other = done_rx.recv_timeout(Duration::from_secs(60));
        release.0.send(()).unwrap();
        assert_eq!(&other.expect("range 1 loads while range 0 waits")[..], &base.chunks[16..32]);
        assert_eq!(&first.join().unwrap()[..], &base.chunks[..16]);
        assert_eq!(&second.join().unwrap()[..], &base.chunks[..16]);
    });
    assert_eq!(reads.load(std::sync::atomic::Ordering::SeqCst), 1, "the waiter got the first load's result");
}

#[test]
fn every_flipped_byte_is_caught() {
    let dir = tempfile::tempdir().unwrap();
    let vault = LocalVault::open("a", dir.path().join("a"), "t").unwrap();
    let key = TenantKey::from_bytes([5; 32]);
    let v1 = encode_manifest_v1(&key, &sample(&key, 4)).unwrap();
    let v3 = encode_manifest(&key, &indexed(&key, &[&vault], sample(&key, 40), 16)).unwrap();
    for bytes in [v1, v3] {
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x10;
            assert!(Manifest::load(&bad, &key).is_err(), "flip at {i} not caught");
        }
        for len in 0..bytes.len() {
            assert!(Manifest::from_bytes(&bytes[..len]).is_err(), "truncation to {len} not caught");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(Manifest::from_bytes(&longer).is_err());
    }
}

#[test]
fn wrong_key_and_forgery_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let vault = LocalVault::open("a", dir.path().join("a"), "t").unwrap();
    let key = TenantKey::from_bytes([5; 32]);
    let other = TenantKey::from_bytes([6; 32]);
    let m = indexed(&key, &[&vault], sample(&key, 40), 16);
    let bytes = encode_manifest(&key, &m).unwrap();
    assert!(matches!(Manifest::load(&bytes, &other), Err(ManifestError::WrongKey { .. })));
    // A forger without the key points a range at another index chunk and fixes both crcs.
    let mut forged = m.clone();
    forged.index.swap(0, 1);
    let mut forged_bytes = encode_manifest(&key, &forged).unwrap();
    forged_bytes[24..56].copy_from_slice(&bytes[24..56]);
    let crc = crc32fast::hash(&forged_bytes[..92]);
    forged_bytes[92..96].copy_from_slice(&crc.to_le_bytes());
    let structurally_fine = Manifest::from_bytes(&forged_bytes).unwrap();
    assert!(matches!(structurally_fine.authenticate(&key), Err(ManifestError::Unauthenticated)));
}

#[test]
fn inconsistent_manifests_are_refused_at_encode() {
    let dir = tempfile::tempdir().unwrap();
    let vault = LocalVault::open("a", dir.path().join("a"), "t").unwrap();
    let key = TenantKey::from_bytes([5; 32]);
    let other = TenantKey::from_bytes([6; 32]);
    let mut m = sample(&key, 4);
    m.chunks.pop();
    assert!(encode_manifest_v1(&key, &m).is_err());
    assert!(encode_manifest_v1(&other, &sample(&key, 4)).is_err());
    let good = indexed(&key, &[&vault], sample(&key, 40), 16);
    encode_manifest(&key, &good).unwrap();
    let mut short = good.clone();
    short.index.pop();
    let mut odd_fanout = good.clone();
    odd_fanout.fanout = 15;
    let tiny_fanout = indexed(&key, &[&vault], sample(&key, 40), 8);
    let mut inline_too = good.clone();
    inline_too.base.chunks.push([1; 32]);
    let mut bad_group = good.clone();
    bad_group.group = Some(GroupV2 { name: "shop".into(), members: vec!["files".into(), "db".into()] });
    for (what, bad) in
        [("short", short), ("odd", odd_fanout), ("tiny", tiny_fanout), ("inline", inline_too), ("group", bad_group)]
    {
        assert!(matches!(encode_manifest(&key, &bad), Err(ManifestError::Encode(_))), "{what}");
    }
    assert!(encode_manifest(&other, &good).is_err());
    for members in [vec!["files", "db"], vec!["db", "db"], vec!["files", "logs"]] {
        let group = GroupV2 { name: "shop".into(), members: members.iter().map(|s| (*s).to_owned()).collect() };
        let bad = ManifestV2 { base: sample(&key, 10), group };
        assert!(matches!(encode_manifest_v2(&key, &bad), Err(ManifestError::Encode(_))), "{members:?}");
    }
}

proptest::proptest! {
    #[test]
    fn garbage_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..400)) {
        let _ = Manifest::from_bytes(&bytes);
        let mut framed = bytes.clone();
        if framed.len() >= 4 {
            framed[..4].copy_from_slice(&MANIFEST_MAGIC);
        }
        let _ = Manifest::from_bytes(&framed);
    }
}
