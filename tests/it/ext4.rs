//! ext4 on a Keel volume, mounted the way these machines can (nbdfuse → loop with direct
//! I/O → ext4): files written and synced survive a daemon restart, and a SIGKILL of the
//! daemon under a mounted filesystem, with `e2fsck -fn` clean every time.
//!
//! Needs root, /dev/fuse and /dev/loop-control; without them the tests print SKIPPED and
//! pass. They take a machine-wide lock, since loop devices and mounts are shared.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use keel_tests::cmd::{run_ok, sha256, sha256_file};
use keel_tests::daemon::Daemon;
use keel_tests::mount::{machine_lock, unavailable, MachineLock, Stack};
use rand::{RngCore, SeedableRng};

const VOLUME_SIZE: u64 = 256 << 20;

/// A file the test wrote, and the SHA-256 of what it wrote.
struct Written {
    path: PathBuf,
    sha256: String,
    len: usize,
}

fn prepare(test: &str) -> Option<MachineLock> {
    if let Some(reason) = unavailable() {
        println!("SKIPPED: {test}: {reason}");
        return None;
    }
    Some(machine_lock().unwrap())
}

/// Writes files of several sizes (one of 32 MiB) with random contents, each fsynced.
fn write_files(root: &Path, seed: u64) -> Vec<Written> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let sizes = [0usize, 1, 4096, 100_000 + 123, 1 << 20, 32 << 20, 5 << 20];
    std::fs::create_dir_all(root.join("dir/nested")).unwrap();
    let mut written = Vec::new();
    for (i, len) in sizes.into_iter().enumerate() {
        let relative = if i % 2 == 0 { format!("file-{i}.bin") } else { format!("dir/nested/file-{i}.bin") };
        let mut data = vec![0u8; len];
        rng.fill_bytes(&mut data);
        let path = root.join(&relative);
        let mut file = std::fs::File::create(&path).unwrap();
        file.write_all(&data).unwrap();
        file.sync_all().unwrap();
        written.push(Written { path: PathBuf::from(relative), sha256: sha256(&data).unwrap(), len });
    }
    written
}

fn check_files(root: &Path, files: &[Written]) {
    for file in files {
        let path = root.join(&file.path);
        let len = std::fs::metadata(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).len();
        assert_eq!(len, file.len as u64, "{} has the wrong size", path.display());
        assert_eq!(sha256_file(&path).unwrap(), file.sha256, "{} has the wrong contents", path.display());
    }
}

/// `sync -f` on the filesystem: its journal commits, which ends in NBD FLUSHes.
fn syncfs(root: &Path) {
    run_ok(std::process::Command::new("sync").arg("-f").arg(root), Duration::from_secs(120)).unwrap();
}

fn assert_fsck_clean(stack: &Stack, when: &str) {
    let out = stack.fsck().unwrap_or_else(|e| panic!("e2fsck -fn {when}: {e:#}"));
    assert!(out.stdout.contains("Pass 5"), "e2fsck did not run every pass {when}:\n{}", out.describe());
}

#[test]
fn ext4_files_survive_a_daemon_restart() {
    let Some(_lock) = prepare("ext4_files_survive_a_daemon_restart") else { return };
    let seed = rand::random::<u64>();
    eprintln!("ext4_files_survive_a_daemon_restart: seed {seed}");
    let mut daemon = Daemon::start(&[("vol", "256MiB")]).unwrap();
    let work = tempfile::tempdir().unwrap();

    let mut stack = Stack::attach(work.path(), &daemon.uri("vol"), VOLUME_SIZE).unwrap();
    stack.mkfs().unwrap();
    let root = stack.mount().unwrap();
    let files = write_files(&root, seed);
    syncfs(&root);
    check_files(&root, &files);
    stack.unmount().unwrap();
    assert_fsck_clean(&stack, "after the first unmount");
    stack.teardown().unwrap();

    daemon.kill9();
    daemon.restart().unwrap();

    let mut stack = Stack::attach(work.path(), &daemon.uri("vol"), VOLUME_SIZE).unwrap();
    assert_fsck_clean(&stack, "after the restart, before mounting");
    let root = stack.mount().unwrap();
    check_files(&root, &files);
    stack.unmount().unwrap();
    assert_fsck_clean(&stack, "after the restart");
    stack.teardown().unwrap();
}

#[test]
fn ext4_synced_files_survive_a_daemon_kill_under_the_mount() {
    let Some(_lock) = prepare("ext4_synced_files_survive_a_daemon_kill_under_the_mount") else { return };
    let seed = rand::random::<u64>();
    eprintln!("ext4_synced_files_survive_a_daemon_kill_under_the_mount: seed {seed}");
    let mut daemon = Daemon::start(&[("vol", "256MiB")]).unwrap();
    let work = tempfile::tempdir().unwrap();

    let mut stack = Stack::attach(work.path(), &daemon.uri("vol"), VOLUME_SIZE).unwrap();
    stack.mkfs().unwrap();
    let root = stack.mount().unwrap();
    let files = write_files(&root, seed);
    syncfs(&root);

    // The server dies under the mounted filesystem: durable I/O must now fail, never
    // report a false success.
    daemon.kill9();
    let late = root.join("written-after-the-kill.bin");
    let outcome = std::fs::File::create(&late).and_then(|mut f| {
        f.write_all(&vec![0xa5u8; 1 << 20])?;
        f.sync_all()
    });
    match outcome {
        Ok(()) => panic!("fsync succeeded on a filesystem whose server is dead"),
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "I/O after the kill failed, but not with EIO: {e}"),
    }
    // Tear down the dead stack: umount -l, losetup -d, then nbdfuse.
    stack.abandon();

    daemon.restart().unwrap();
    let mut stack = Stack::attach(work.path(), &daemon.uri("vol"), VOLUME_SIZE).unwrap();
    // Mounting replays the ext4 journal; then the filesystem must be clean.
    let root = stack.mount().unwrap();
    check_files(&root, &files);
    stack.unmount().unwrap();
    assert_fsck_clean(&stack, "after the kill and journal replay");
    let root = stack.mount().unwrap();
    check_files(&root, &files);
    stack.unmount().unwrap();
    stack.teardown().unwrap();
}
