use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, SystemTime};

use rand::{Rng, SeedableRng};

use super::pack::{RECORD_LEN, RECORD_MAGIC};
use super::reclaim::ReclaimReport;
use super::*;
use crate::{decode_chunk, encode_chunk, ChunkError, TenantKey};

fn key() -> TenantKey {
    TenantKey::from_bytes([9; 32])
}

fn chunk(data: &[u8]) -> (ChunkId, Vec<u8>) {
    encode_chunk(&key(), data, 3).unwrap()
}

/// `n` distinct small chunks (incompressible-ish, ~`size` bytes each).
fn chunks(seed: u64, n: usize, size: usize) -> Vec<(ChunkId, Vec<u8>)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let data: Vec<u8> = (0..size).map(|_| rng.gen()).collect();
            chunk(&data)
        })
        .collect()
}

fn open_small(dir: &Path, mode: PersistMode, pack_target: u64) -> LocalChunkStore {
    LocalChunkStore::open_with(dir, mode, pack_target).unwrap()
}

fn files(dir: &Path, suffix: &str) -> Vec<std::path::PathBuf> {
    let mut out: Vec<_> = fs::read_dir(dir.join(PACKS_DIR))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(suffix))
        .collect();
    out.sort();
    out
}

fn flip(path: &Path, offset: u64, mask: u8) {
    let file = OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, offset).unwrap();
    file.write_all_at(&[byte[0] ^ mask], offset).unwrap();
}

/// Sets both files of every pack to look `secs` old.
fn age_all(dir: &Path, secs: u64) {
    let then = SystemTime::now() - Duration::from_secs(secs);
    for path in files(dir, ".pack").into_iter().chain(files(dir, ".idx")) {
        OpenOptions::new().write(true).open(&path).unwrap().set_modified(then).unwrap();
    }
}

#[test]
fn put_get_contains_remove() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalChunkStore::open(dir.path()).unwrap();
    let (id, frame) = chunk(b"hello chunk");
    assert!(!store.contains(&id).unwrap());
    assert_eq!(store.locate(&id).unwrap(), None);
    assert_eq!(store.put(&id, &frame).unwrap(), PutOutcome::Written);
    assert!(store.contains(&id).unwrap());
    let at = store.locate(&id).unwrap().unwrap();
    assert_eq!(at.pack.parent(), Some(dir.path().join("packs").as_path()));
    assert_eq!((at.offset, at.len), ((HEADER_LEN + ENTRY_ID_LEN) as u64, frame.len() as u64));
    assert!((now_unix() - at.written_unix).abs() < 60);
    let read = store.get(&id).unwrap();
    assert_eq!(read, frame);
    assert_eq!(decode_chunk(&key(), &id, &read).unwrap(), b"hello chunk");
    assert!(store.remove(&id).unwrap());
    assert!(!store.remove(&id).unwrap());
    assert!(!store.contains(&id).unwrap());
    assert!(matches!(store.get(&id), Err(StoreError::NotFound { id: got, .. }) if got == id));
    // The removal is durable: a new open agrees.
    let reopened = LocalChunkStore::open(dir.path()).unwrap();
    assert!(!reopened.contains(&id).unwrap());
    assert_eq!(reopened.put(&id, &frame).unwrap(), PutOutcome::Written);
    assert_eq!(reopened.get(&id).unwrap(), frame);
}

#[test]
fn dedup_skips_present_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalChunkStore::open(dir.path()).unwrap();
    let (id, frame) = chunk(&[7u8; 5000]);
    assert_eq!(store.put(&id, &frame).unwrap(), PutOutcome::Written);
    let at = store.locate(&id).unwrap();
    // Same plaintext, new nonce: a different frame, the same id — stored once.
    let (id2, frame2) = chunk(&[7u8; 5000]);
    assert_eq!(id2, id);
    assert_ne!(frame2, frame);
    assert_eq!(store.put(&id, &frame2).unwrap(), PutOutcome::AlreadyPresent);
    assert_eq!(store.get(&id).unwrap(), frame);
    assert_eq!(store.locate(&id).unwrap(), at);
    // Reopening sees the same chunk, and does not store it again either.
    let reopened = LocalChunkStore::open(dir.path()).unwrap();
    assert!(reopened.contains(&id).unwrap());
    assert_eq!(reopened.put(&id, &frame2).unwrap(), PutOutcome::AlreadyPresent);
    assert_eq!(files(dir.path(), ".pack").len(), 1, "the second open wrote nothing");
}

#[test]
fn deferred_puts_become_visible_and_durable_at_sync() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalChunkStore::open_deferred(dir.path()).unwrap();
    let (id, frame) = chunk(&[5u8; 9000]);
    assert_eq!(store.put(&id, &frame).unwrap(), PutOutcome::Written);
    // Counted as present (so it is written once), but not readable before the sync.
    assert!(store.contains(&id).unwrap());
    assert_eq!(store.put(&id, &frame).unwrap(), PutOutcome::AlreadyPresent);
    assert!(matches!(store.get(&id), Err(StoreError::NotFound { .. })));
    assert!(store.list(None, 10).unwrap().is_empty());
    // Another open does not see it either: nothing points at the unsynced bytes.
    assert!(!LocalChunkStore::open(dir.path()).unwrap().contains(&id).unwrap());
    store.sync().unwrap();
    assert_eq!(decode_chunk(&key(), &id, &store.get(&id).unwrap()).unwrap(), vec![5u8; 9000]);
    assert_eq!(store.list(None, 10).unwrap().len(), 1);
    store.sync().unwrap();
    assert_eq!(store.put(&id, &frame).unwrap(), PutOutcome::AlreadyPresent);
    assert!(LocalChunkStore::open(dir.path()).unwrap().contains(&id).unwrap());

    // A store dropped before its sync (a crash) leaves bytes no record points at.
    let (lost, lost_frame) = chunk(&[6u8; 9000]);
    {
        let crashed = LocalChunkStore::open_deferred(dir.path()).unwrap();
        assert_eq!(crashed.put(&lost, &lost_frame).unwrap(), PutOutcome::Written);
    }
    let reopened = LocalChunkStore::open(dir.path()).unwrap();
    assert!(!reopened.contains(&lost).unwrap());
    assert!(matches!(reopened.get(&lost), Err(StoreError::NotFound { .. })));
    let stats = reopened.stats().unwrap();
    assert_eq!((stats.packs, stats.orphan_packs, stats.chunks), (1, 1, 1), "{stats:?}");
}

#[test]
fn concurrent_puts_of_one_chunk_write_it_once() {
    for mode in [PersistMode::Deferred, PersistMode::Immediate] {
        let dir = tempfile::tempdir().unwrap();
        let store = open_small(dir.path(), mode, PACK_TARGET);
        let (id, frame) = chunk(&[6u8; 5000]);
        let written = AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    if store.put(&id, &frame).unwrap() == PutOutcome::Written {
                        written.fetch_add(1, Ordering::Relaxed);
                    }
                    // Immediate mode: whoever returns, the chunk is durable and readable.
                    if mode == PersistMode::Immediate {
                        assert_eq!(store.get(&id).unwrap(), frame);
                    }
                });
            }
        });
        assert_eq!(written.into_inner(), 1, "{mode:?}");
        store.sync().unwrap();
        assert_eq!(store.get(&id).unwrap(), frame);
        let pack_len = fs::metadata(&files(dir.path(), ".pack")[0]).unwrap().len();
        assert_eq!(pack_len, (HEADER_LEN + ENTRY_ID_LEN + frame.len()) as u64, "{mode:?}: written once");
    }
}

#[test]
fn many_threads_of_puts_and_syncs_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_small(dir.path(), PersistMode::Immediate, 16 << 10);
    let all = chunks(7, 200, 700);
    std::thread::scope(|scope| {
        for part in all.chunks(50) {
            let store = &store;
            scope.spawn(move || {
                for (id, frame) in part {
                    assert_eq!(store.put(id, frame).unwrap(), PutOutcome::Written);
                }
            });
        }
    });
    let reopened = LocalChunkStore::open(dir.path()).unwrap();
    for (id, frame) in &all {
        assert_eq!(&reopened.get(id).unwrap(), frame);
    }
    assert!(files(dir.path(), ".pack").len() > 5, "small packs roll over");
}

#[test]
fn put_refuses_malformed_frames() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalChunkStore::open(dir.path()).unwrap();
    let (id, mut frame) = chunk(b"payload");
    frame[20] ^= 1;
    assert!(matches!(
        store.put(&id, &frame),
        Err(StoreError::InvalidChunk { source: ChunkError::ChecksumMismatch { .. }, .. })
    ));
    assert!(!store.contains(&id).unwrap());
}

#[test]
fn errors_name_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    fs::write(&file, b"x").unwrap();
    let err = LocalChunkStore::open(&file).unwrap_err();
    assert!(err.to_string().contains("not-a-dir"), "{err}");
}

/// A repository in the one-file-per-chunk layout of earlier builds is refused, with the
/// reason, rather than opened as an empty store whose chunks all look missing.
#[test]
fn the_one_file_per_chunk_layout_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir_all(dir.path().join("chunks/ab/cd")).unwrap();
    let err = LocalChunkStore::open(dir.path()).unwrap_err();
    assert!(matches!(err, StoreError::LegacyLayout { .. }), "{err}");
    assert!(err.to_string().contains("one-file-per-chunk"), "{err}");
}

/// Two opens of one directory (two processes: the daemon and a `keel snapshot` command)
/// read each other's synced chunks, and a removal by one is never answered as present by
/// the other (it would be deduplicated against, and a snapshot would reference it).
#[test]
fn two_stores_on_one_directory_see_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let a = LocalChunkStore::open_deferred(dir.path()).unwrap();
    let b = LocalChunkStore::open(dir.path()).unwrap();
    let all = chunks(1, 4, 3000);
    let [(x, fx), (y, fy), (z, fz), (w, fw)] = &all[..] else { unreachable!() };
    a.put(x, fx).unwrap();
    a.sync().unwrap();
    assert_eq!(&b.get(x).unwrap(), fx, "b learns of a's chunk on a miss");
    b.put(y, fy).unwrap();
    assert_eq!(&a.get(y).unwrap(), fy);
    // Both list both, in order.
    let mut expected = vec![*x, *y];
    expected.sort();
    for store in [&a, &b] {
        assert_eq!(store.list(None, 10).unwrap().iter().map(|c| c.id).collect::<Vec<_>>(), expected);
    }
    // A removal in b: a must not answer from memory.
    assert!(a.contains(x).unwrap());
    assert!(b.remove(x).unwrap());
    assert!(!a.contains(x).unwrap());
    assert_eq!(a.put(x, fx).unwrap(), PutOutcome::Written, "stored anew, not deduplicated");
    a.sync().unwrap();
    assert_eq!(&b.get(x).unwrap(), fx);
    // A removal in a of a chunk in b's pack: b sees it too.
    assert!(a.remove(y).unwrap());
    assert!(!b.contains(y).unwrap());
    assert!(matches!(b.get(y), Err(StoreError::NotFound { .. })));
    // Both store one chunk before knowing of the other's copy: two copies, both valid.
    a.put(z, fz).unwrap();
    a.sync().unwrap();
    b.put(z, fz).unwrap(); // b has not looked: writes its own copy
    b.put(w, fw).unwrap();
    let fresh = LocalChunkStore::open(dir.path()).unwrap();
    assert_eq!(fresh.stats().unwrap().extra_copies, 1);
    assert_eq!(fresh.get(z).unwrap(), *fz);
    // Removing it removes every copy, for every open.
    assert!(fresh.remove(z).unwrap());
    for store in [&a, &b, &fresh, &LocalChunkStore::open(dir.path()).unwrap()] {
        assert!(!store.contains(z).unwrap());
        assert!(store.contains(w).unwrap() || store.get(w).is_ok());
    }
}

/// Power loss after a sync, modelled by cutting the files: the index log at every byte of
/// its last records, the pack at every byte of its last entries, and random pairs of cuts.
/// Every record wholly before the log's cut whose frame is wholly before the pack's cut
/// survives and reads back exactly; nothing else is indexed; nothing panics.
#[test]
fn cut_files_keep_every_whole_record_and_point_at_nothing_missing() {
    let dir = tempfile::tempdir().unwrap();
    let all = chunks(2, 12, 40);
    let mut synced = Vec::new();
    {
        let store = LocalChunkStore::open_deferred(dir.path()).unwrap();
        for batch in all.chunks(4) {
            for (id, frame) in batch {
                store.put(id, frame).unwrap();
            }
            store.sync().unwrap();
            synced.extend(batch.iter().cloned());
        }
    }
    let pack_path = files(dir.path(), ".pack").remove(0);
    let log_path = files(dir.path(), ".idx").remove(0);
    let pack_bytes = fs::read(&pack_path).unwrap();
    let log_bytes = fs::read(&log_path).unwrap();
    let entry_end =
        |i: usize| -> usize { HEADER_LEN + synced[..=i].iter().map(|(_, f)| ENTRY_ID_LEN + f.len()).sum::<usize>() };
    let check = |log_cut: usize, pack_cut: usize| {
        fs::write(&log_path, &log_bytes[..log_cut]).unwrap();
        fs::write(&pack_path, &pack_bytes[..pack_cut]).unwrap();
        let store = LocalChunkStore::open(dir.path()).unwrap();
        let listed: Vec<ChunkId> = store.list(None, usize::MAX).unwrap().iter().map(|c| c.id).collect();
        for (i, (id, frame)) in synced.iter().enumerate() {
            let record_whole = HEADER_LEN + (i + 1) * RECORD_LEN <= log_cut;
            let frame_whole = entry_end(i) <= pack_cut;
            if record_whole && frame_whole {
                assert_eq!(&store.get(id).unwrap(), frame, "log cut {log_cut}, pack cut {pack_cut}, chunk {i}");
                assert!(listed.contains(id));
            } else {
                assert!(matches!(store.get(id), Err(StoreError::NotFound { .. })), "cut {log_cut}/{pack_cut}: {i}");
                assert!(!listed.contains(id));
            }
        }
    };
    let last_records = log_bytes.len() - 3 * RECORD_LEN - 5;
    for log_cut in last_records..=log_bytes.len() {
        check(log_cut, pack_bytes.len());
    }
    let last_entries = entry_end(synced.len() - 3);
    for pack_cut in last_entries..=pack_bytes.len() {
        check(log_bytes.len(), pack_cut);
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    for _ in 0..200 {
        check(rng.gen_range(0..=log_bytes.len()), rng.gen_range(0..=pack_bytes.len()));
    }
}

/// A damaged record is dropped alone: the records after it still count (found again by
/// their magic and crc), including records appended after a torn one.
#[test]
fn damaged_log_bytes_drop_only_the_records_they_hit() {
    let dir = tempfile::tempdir().unwrap();
    let all = chunks(4, 5, 100);
    {
        let store = LocalChunkStore::open(dir.path()).unwrap();
        for (id, frame) in &all {
            store.put(id, frame).unwrap();
        }
    }
    let log_path = files(dir.path(), ".idx").remove(0);
    let original = fs::read(&log_path).unwrap();
    for byte in 0..RECORD_LEN {
        let offset = (HEADER_LEN + 2 * RECORD_LEN + byte) as u64;
        flip(&log_path, offset, 0x10);
        let store = LocalChunkStore::open(dir.path()).unwrap();
        for (i, (id, frame)) in all.iter().enumerate() {
            if i == 2 {
                assert!(!store.contains(id).unwrap(), "byte {byte}");
            } else {
                assert_eq!(&store.get(id).unwrap(), frame, "byte {byte}: record {i}");
            }
        }
        let stats = store.stats().unwrap();
        assert_eq!(stats.damaged_logs.len(), 1, "{stats:?}");
        fs::write(&log_path, &original).unwrap();
    }
    // A torn record (30 of its 64 bytes) with another process's record appended after it.
    let mut torn = original[..HEADER_LEN + 3 * RECORD_LEN + 30].to_vec();
    torn.extend_from_slice(&original[HEADER_LEN + 4 * RECORD_LEN..]);
    fs::write(&log_path, &torn).unwrap();
    let store = LocalChunkStore::open(dir.path()).unwrap();
    for (i, (id, _)) in all.iter().enumerate() {
        assert_eq!(store.contains(id).unwrap(), i != 3, "record {i}");
    }
    // Header damage: the log is unreadable (named), its pack is left alone by reclaim.
    fs::write(&log_path, &original).unwrap();
    flip(&log_path, 9, 1);
    let store = LocalChunkStore::open(dir.path()).unwrap();
    assert!(all.iter().all(|(id, _)| !store.contains(id).unwrap()));
    let stats = store.stats().unwrap();
    assert!(stats.damaged_logs[0].contains("unreadable header"), "{stats:?}");
    age_all(dir.path(), 86_400);
    let report = store.reclaim().unwrap();
    assert_eq!((report.packs_deleted, report.orphans_deleted, report.packs_skipped), (0, 0, 1));
    assert_eq!(files(dir.path(), ".pack").len(), 1);
}

/// Flipped bytes in a frame reach the caller, whose decode names them; damage the store
/// can see itself (an entry naming another chunk, a pack cut short under an open store)
/// is an error naming the pack and the offset, never a panic.
#[test]
fn damaged_frames_are_reported_not_panicked_on() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalChunkStore::open(dir.path()).unwrap();
    let all = chunks(5, 3, 2000);
    for (id, frame) in &all {
        store.put(id, frame).unwrap();
    }
    let (id, frame) = &all[0];
    let at = store.locate(id).unwrap().unwrap();
    flip(&at.pack, at.offset + 50, 0x01);
    let read = store.get(id).unwrap();
    assert_eq!(read.len(), frame.len());
    assert!(matches!(decode_chunk(&key(), id, &read), Err(ChunkError::ChecksumMismatch { .. })));
    flip(&at.pack, at.offset + 50, 0x01);
    // The id before the frame.
    flip(&at.pack, at.offset - 3, 0x01);
    let err = store.get(id).unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { offset, .. } if offset == at.offset - 32), "{err}");
    assert!(err.to_string().contains(&at.pack.display().to_string()), "{err}");
    flip(&at.pack, at.offset - 3, 0x01);
    assert_eq!(&store.get(id).unwrap(), frame);
    // The pack cut inside the last entry while this store has it indexed.
    let (last, _) = &all[2];
    let last_at = store.locate(last).unwrap().unwrap();
    OpenOptions::new().write(true).open(&last_at.pack).unwrap().set_len(last_at.offset + 10).unwrap();
    let err = store.get(last).unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("ends inside"), "{err}");
    // A bad pack header is named too (a fresh open reads it first).
    flip(&at.pack, 1, 0x01);
    let fresh = LocalChunkStore::open(dir.path()).unwrap();
    let err = fresh.get(id).unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { offset: 0, .. }), "{err}");
}

/// GC's sweep pages through the listing: ascending, resumable after any id, across
/// chunks in the merged base, in the overlay, and removed from either.
#[test]
fn listing_pages_in_id_order_across_merges_and_removals() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalChunkStore::open_deferred(dir.path()).unwrap();
    let all = chunks(6, 6000, 8);
    let mut model = BTreeMap::new();
    for (i, (id, frame)) in all.iter().enumerate() {
        store.put(id, frame).unwrap();
        model.insert(*id, frame.len() as u64);
        if i % 1000 == 999 {
            store.sync().unwrap();
        }
    }
    store.sync().unwrap();
    for (i, (id, _)) in all.iter().enumerate() {
        if i % 20 == 0 {
            assert!(store.remove(id).unwrap());
            model.remove(id);
        }
    }
    for page in [1, 333, 4096] {
        let mut after = None;
        let mut seen = Vec::new();
        loop {
            let got = store.list(after.as_ref(), page).unwrap();
            let Some(last) = got.last() else { break };
            after = Some(last.id);
            seen.extend(got.iter().map(|c| (c.id, c.len)));
        }
        assert!(seen.into_iter().eq(model.clone()), "page {page}");
    }
    let reopened = LocalChunkStore::open(dir.path()).unwrap();
    let listed: Vec<(ChunkId, u64)> = reopened.list(None, usize::MAX).unwrap().iter().map(|c| (c.id, c.len)).collect();
    assert!(listed.into_iter().eq(model));
}

/// Removing every chunk of a pack and reclaiming deletes the pack; the other chunks stay
/// readable, also for another open that had the deleted pack in its index.
#[test]
fn reclaim_deletes_packs_whose_chunks_are_all_removed() {
    let dir = tempfile::tempdir().unwrap();
    let all = chunks(8, 40, 900);
    {
        let writer = open_small(dir.path(), PersistMode::Immediate, 8 << 10);
        for (id, frame) in &all {
            writer.put(id, frame).unwrap();
        }
    }
    let packs_before = files(dir.path(), ".pack");
    assert!(packs_before.len() >= 4);
    let store = open_small(dir.path(), PersistMode::Immediate, 8 << 10);
    let other = LocalChunkStore::open(dir.path()).unwrap();
    let first_pack = store.locate(&all[0].0).unwrap().unwrap().pack;
    let (dead, live): (Vec<_>, Vec<_>) =
        all.iter().partition(|(id, _)| store.locate(id).unwrap().unwrap().pack == first_pack);
    for (id, _) in &dead {
        assert!(store.remove(id).unwrap());
    }
    let pack_len = fs::metadata(&first_pack).unwrap().len();
    let report = store.reclaim().unwrap();
    assert_eq!((report.packs_deleted, report.packs_rewritten, report.chunks_moved), (1, 0, 0), "{report:?}");
    assert!(report.bytes_freed() > pack_len, "{report:?}");
    assert!(!first_pack.exists());
    assert!(!first_pack.with_extension("idx").exists());
    for store in [&store, &other, &LocalChunkStore::open(dir.path()).unwrap()] {
        for (id, frame) in &live {
            assert_eq!(&store.get(id).unwrap(), frame);
        }
        for (id, _) in &dead {
            assert!(!store.contains(id).unwrap());
        }
    }
    // Nothing left to do.
    assert_eq!(store.reclaim().unwrap(), ReclaimReport::default());
}

/// A pack at least half dead is rewritten: its live chunks move to a new pack (keeping
/// their write time), the old files go, and every open finds the chunks at their new
/// place.
#[test]
fn reclaim_rewrites_a_half_dead_pack() {
    let dir = tempfile::tempdir().unwrap();
    let all = chunks(9, 10, 900);
    {
        let writer = LocalChunkStore::open(dir.path()).unwrap();
        writer.backdate_writes(3600);
        for (id, frame) in &all {
            writer.put(id, frame).unwrap();
        }
    }
    let store = LocalChunkStore::open(dir.path()).unwrap();
    let reader = LocalChunkStore::open(dir.path()).unwrap();
    let old_pack = files(dir.path(), ".pack").remove(0);
    let before: Vec<ChunkLocation> = all.iter().map(|(id, _)| store.locate(id).unwrap().unwrap()).collect();
    for (id, _) in &all[..6] {
        assert!(store.remove(id).unwrap());
    }
    let old_files = [old_pack.clone(), old_pack.with_extension("idx")].map(|p| (fs::read(&p).unwrap(), p));
    let report = store.reclaim().unwrap();
    assert_eq!((report.packs_rewritten, report.chunks_moved, report.packs_deleted), (1, 4, 0), "{report:?}");
    assert!(!old_pack.exists());
    for (i, (id, frame)) in all.iter().enumerate().skip(6) {
        let now = store.locate(id).unwrap().unwrap();
        assert_ne!(now.pack, before[i].pack);
        assert_eq!(now.written_unix, before[i].written_unix, "the write time survives the move");
        assert_eq!(&store.get(id).unwrap(), frame);
        assert_eq!(&reader.get(id).unwrap(), frame, "another open follows the move");
    }
    let reopened = LocalChunkStore::open(dir.path()).unwrap();
    assert_eq!(reopened.list(None, 100).unwrap().len(), 4);
    let stats = reopened.stats().unwrap();
    assert_eq!((stats.packs, stats.extra_copies, stats.orphan_packs), (1, 0, 0), "{stats:?}");
    // A crash before the deletions reached the disk brings the old files back: every live
    // chunk is then stored twice, and the next reclaim deletes the old pack, copying
    // nothing again.
    drop(reopened);
    for (bytes, path) in &old_files {
        fs::write(path, bytes).unwrap();
    }
    let after_crash = LocalChunkStore::open(dir.path()).unwrap();
    assert_eq!(after_crash.stats().unwrap().extra_copies, 4);
    for (id, frame) in &all[6..] {
        assert_eq!(&after_crash.get(id).unwrap(), frame);
    }
    let report = after_crash.reclaim().unwrap();
    assert_eq!((report.packs_rewritten, report.chunks_moved), (1, 0), "{report:?}");
    assert!(!old_pack.exists());
    assert_eq!(after_crash.stats().unwrap().extra_copies, 0);
    for (id, frame) in &all[6..] {
        assert_eq!(&after_crash.get(id).unwrap(), frame);
    }
    // The reclaiming store's own pack is still its current one: a reader's removal there
    // works as anywhere.
    assert!(reader.remove(&all[9].0).unwrap());
    assert!(!store.contains(&all[9].0).unwrap());
}

/// A pack some open still writes (it holds the pack's shared lock) is never deleted or
/// rewritten, however dead; once that open is gone it is.
#[test]
fn reclaim_skips_packs_being_written() {
    let dir = tempfile::tempdir().unwrap();
    let writer = LocalChunkStore::open(dir.path()).unwrap();
    let all = chunks(10, 4, 500);
    for (id, frame) in &all {
        writer.put(id, frame).unwrap();
    }
    let gc = LocalChunkStore::open(dir.path()).unwrap();
    for (id, _) in &all[..3] {
        assert!(gc.remove(id).unwrap());
    }
    let report = gc.reclaim().unwrap();
    assert_eq!((report.packs_rewritten, report.packs_skipped), (0, 1), "{report:?}");
    // The writer goes on appending to its pack, and the chunk it adds is kept.
    let (late, late_frame) = chunk(b"late");
    writer.put(&late, &late_frame).unwrap();
    drop(writer);
    let report = gc.reclaim().unwrap();
    assert_eq!((report.packs_rewritten, report.chunks_moved), (1, 2), "{report:?}");
    assert_eq!(gc.get(&late).unwrap(), late_frame);
    assert_eq!(gc.get(&all[3].0).unwrap(), all[3].1);
}

/// Packs with no record (a writer that crashed before its first sync) are counted, kept
/// while young (their writer may be alive), and deleted once old.
#[test]
fn orphan_packs_are_counted_and_deleted_when_old() {
    let dir = tempfile::tempdir().unwrap();
    let (id, frame) = chunk(b"never synced");
    {
        let crashed = LocalChunkStore::open_deferred(dir.path()).unwrap();
        crashed.put(&id, &frame).unwrap();
    }
    // A pack file without its log (a crash between creating the two).
    fs::write(dir.path().join("packs/00000000000000aa.pack"), b"KPAK").unwrap();
    let store = LocalChunkStore::open(dir.path()).unwrap();
    let stats = store.stats().unwrap();
    assert_eq!((stats.packs, stats.orphan_packs), (0, 2), "{stats:?}");
    assert_eq!(store.reclaim().unwrap().orphans_deleted, 0, "young: maybe still being written");
    age_all(dir.path(), 3600);
    let report = store.reclaim().unwrap();
    assert_eq!(report.orphans_deleted, 2, "{report:?}");
    assert!(files(dir.path(), ".pack").is_empty());
    assert!(files(dir.path(), ".idx").is_empty());
}

/// Healing replaces a bad copy: remove, then put; the new copy is read, by this open and
/// by others, and the old one is garbage for reclaim.
#[test]
fn a_removed_then_reput_chunk_is_read_from_its_new_copy() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalChunkStore::open_deferred(dir.path()).unwrap();
    let other = LocalChunkStore::open(dir.path()).unwrap();
    let (id, frame) = chunk(&[1u8; 3000]);
    store.put(&id, &frame).unwrap();
    store.sync().unwrap();
    let bad = store.locate(&id).unwrap().unwrap();
    assert_eq!(other.get(&id).unwrap(), frame);
    flip(&bad.pack, bad.offset + 20, 0x04);
    assert!(store.remove(&id).unwrap());
    let (_, good) = chunk(&[1u8; 3000]);
    assert_eq!(store.put(&id, &good).unwrap(), PutOutcome::Written);
    store.sync().unwrap();
    assert_ne!(store.locate(&id).unwrap().unwrap().offset, bad.offset);
    assert_eq!(store.get(&id).unwrap(), good);
    assert_eq!(other.get(&id).unwrap(), good, "the other open follows the removal");
    assert_eq!(LocalChunkStore::open(dir.path()).unwrap().get(&id).unwrap(), good);
}

/// Write errors poison the store: no later write is attempted.
#[test]
fn a_failed_write_poisons_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalChunkStore::open(dir.path()).unwrap();
    let (id, frame) = chunk(b"first");
    store.put(&id, &frame).unwrap();
    // The log disappears under the store; its next sync cannot succeed... but appending
    // to an unlinked file does. Make the pack read-only instead: the next write fails.
    let pack = files(dir.path(), ".pack").remove(0);
    {
        let mut writer = lock(&store.writer);
        let current = writer.current.as_mut().unwrap();
        current.pack = Arc::new(File::open(&pack).unwrap());
    }
    let (id2, frame2) = chunk(b"second");
    assert!(matches!(store.put(&id2, &frame2), Err(StoreError::Io { .. })));
    assert!(matches!(store.put(&id2, &frame2), Err(StoreError::Poisoned { .. })));
    assert!(matches!(store.remove(&id), Err(StoreError::Poisoned { .. })));
    assert!(matches!(store.sync(), Err(StoreError::Poisoned { .. })));
    assert_eq!(store.get(&id).unwrap(), frame, "reads go on");
}

#[test]
fn file_headers_and_records_round_trip_and_reject_damage() {
    let header = pack::encode_header(FileKind::Index, 0x1234);
    assert!(pack::check_header(FileKind::Index, 0x1234, &header).is_ok());
    assert!(pack::check_header(FileKind::Pack, 0x1234, &header).unwrap_err().contains("magic"));
    assert!(pack::check_header(FileKind::Index, 0x1235, &header).unwrap_err().contains("names pack"));
    assert!(pack::check_header(FileKind::Index, 0x1234, &header[..63]).unwrap_err().contains("shorter"));
    for byte in 0..HEADER_LEN {
        let mut bad = header;
        bad[byte] ^= 0x20;
        assert!(pack::check_header(FileKind::Index, 0x1234, &bad).is_err(), "byte {byte}");
    }
    let (id, _) = chunk(b"r");
    let record = Record { kind: RecordKind::Removed, id, offset: 4096, len: 77, written: -5 };
    let bytes = record.encode();
    assert_eq!(bytes[..4], RECORD_MAGIC);
    assert_eq!(Record::decode(&bytes), Ok(record));
    for byte in 0..RECORD_LEN {
        let mut bad = bytes;
        bad[byte] ^= 0x01;
        assert!(Record::decode(&bad).is_err(), "byte {byte}");
    }
    assert_eq!(pack::parse_file_name("00000000000012ab.pack"), Some((0x12ab, FileKind::Pack)));
    assert_eq!(pack::parse_file_name("00000000000012ab.idx"), Some((0x12ab, FileKind::Index)));
    for bad in ["00000000000012AB.pack", "12ab.pack", "00000000000012ab.tmp", "generation"] {
        assert_eq!(pack::parse_file_name(bad), None, "{bad}");
    }
    // Random bytes never panic the scanner, and never yield a record whose fields break
    // the decoder's rules.
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    for _ in 0..200 {
        let mut noise: Vec<u8> = (0..rng.gen_range(0..2000)).map(|_| rng.gen()).collect();
        if rng.gen_bool(0.5) {
            let at = rng.gen_range(0..=noise.len());
            noise.splice(at..at, bytes);
        }
        let scan = pack::scan(&noise, 64);
        assert!(scan.records.iter().all(|(_, r)| *r == record));
        assert!(scan.resume >= 64 && scan.resume <= 64 + noise.len() as u64);
    }
}
