//! A customer's database, snapshotted live and restored: PostgreSQL 15 with data
//! checksums on ext4 on a Keel volume (nbdfuse + loop), pgbench writing, `keel snapshot
//! create` in the middle of it; the snapshot restored into a new volume, mounted, and
//! PostgreSQL starts on it (crash recovery from a crash-consistent image), answers, stops
//! cleanly, and `pg_checksums --check` and `e2fsck -fn` pass.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use keel_tests::cmd::{run_ok, wait_for};
use keel_tests::mount::{machine_lock, unavailable, Stack};

use crate::postgres::{chmod, free_port, initdb, pg_bin, Db, PgUser, Postmaster, DATABASE, PG_BIN, STEP_TIMEOUT};
use crate::snapshot::{create, keel, node};

const SIZE: u64 = 1 << 30;

#[test]
fn postgres_snapshot_under_pgbench_restores_to_a_working_database() {
    let _serial = crate::failover::CLUSTER_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(reason) = unavailable() {
        println!("SKIPPED: postgres snapshot: {reason}");
        return;
    }
    assert!(Path::new(PG_BIN).join("postgres").exists(), "PostgreSQL 15 is missing; tests/run installs it");
    let _mounts = machine_lock().unwrap();
    let pg = PgUser::lookup().unwrap();
    let mut daemon = node(&[("pg", "1GiB")], "");
    let work = tempfile::Builder::new().prefix("keel-pgsnap-").tempdir().unwrap();
    chmod(work.path(), 0o755);
    let (live_dir, restored_dir) = (work.path().join("live"), work.path().join("restored"));
    for dir in [&live_dir, &restored_dir] {
        std::fs::create_dir(dir).unwrap();
        chmod(dir, 0o755);
    }

    // --- the live database ---------------------------------------------------------------
    let mut stack = Stack::attach(&live_dir, &daemon.uri("pg"), SIZE).unwrap();
    stack.mkfs().unwrap();
    let root = stack.mount().unwrap();
    chmod(&root, 0o755);
    let pgdata = initdb(&pg, work.path(), &root);
    let mut conf = std::fs::OpenOptions::new().append(true).open(pgdata.join("postgresql.conf")).unwrap();
    conf.write_all(b"\nlisten_addresses = ''\nmin_wal_size = 32MB\nmax_wal_size = 128MB\n").unwrap();
    drop(conf);
    // A snapshot is crash-consistent: it holds what was made durable, and an unsynced
    // append may read back as zeros (ext4 commits the new size before the data). So, like
    // any administrator editing a config before a crash could hit, sync it.
    run_ok(Command::new("sync").arg("-f").arg(&root), STEP_TIMEOUT).unwrap();
    let sock = live_dir.join("sock");
    std::fs::create_dir(&sock).unwrap();
    pg.chown(&sock);
    let port = free_port();
    let mut postmaster = Postmaster::start(&pg, work.path(), &pgdata, &sock, port, &live_dir).unwrap();
    let db = Db { pg: pg.clone(), sock: sock.clone(), port, cwd: work.path().to_path_buf() };
    db.psql("postgres", &format!("CREATE DATABASE {DATABASE}")).unwrap();
    let pgbench = |args: &[&str]| {
        let mut cmd = pg.command(work.path(), &pg_bin("pgbench"));
        cmd.arg("-h").arg(&sock).args(["-p", &port.to_string()]).args(args).arg(DATABASE);
        cmd
    };
    run_ok(&mut pgbench(&["-i", "-q", "-s", "4"]), STEP_TIMEOUT).unwrap();
    let log = std::fs::File::create(work.path().join("pgbench.log")).unwrap();
    let mut load = pgbench(&["-c", "4", "-j", "2", "-T", "20", "-n"])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    // Snapshot in the middle of the load, once it has committed something.
    let history =
        |db: &Db| -> u64 { db.psql(DATABASE, "SELECT count(*) FROM pgbench_history").unwrap().trim().parse().unwrap() };
    wait_for("pgbench to commit", STEP_TIMEOUT, || Ok((history(&db) > 100).then_some(()))).unwrap();
    let details = create(&daemon, "pg");
    let committed_before = history(&db);
    let id = details["snapshot"].as_str().unwrap().to_owned();
    eprintln!("snapshot of the live database: {details}");
    assert!(
        load.wait().unwrap().success(),
        "pgbench failed: {}",
        std::fs::read_to_string(work.path().join("pgbench.log")).unwrap()
    );
    assert!(postmaster.stop_fast(), "postgres did not stop cleanly");
    stack.teardown().unwrap();

    // --- restore into a new volume and start PostgreSQL on it ------------------------------
    keel(&daemon, &["snapshot", "restore", &id, "--to-volume", "pg-restored"]);
    daemon.stop().unwrap();
    daemon.restart().unwrap();
    let mut stack = Stack::attach(&restored_dir, &daemon.uri("pg-restored"), SIZE).unwrap();
    let root = stack.mount().unwrap();
    let pgdata = root.join("pgdata");
    let sock = restored_dir.join("sock");
    std::fs::create_dir(&sock).unwrap();
    pg.chown(&sock);
    let port = free_port();
    let mut postmaster = Postmaster::start(&pg, work.path(), &pgdata, &sock, port, &restored_dir).unwrap();
    let db = Db { pg: pg.clone(), sock, port, cwd: work.path().to_path_buf() };
    let restored = history(&db);
    let accounts: u64 = db.psql(DATABASE, "SELECT count(*) FROM pgbench_accounts").unwrap().trim().parse().unwrap();
    assert_eq!(accounts, 400_000);
    assert!(
        restored > 100 && restored <= committed_before,
        "history rows {restored}, committed by the snapshot's end {committed_before}"
    );
    db.amcheck().unwrap();
    assert!(postmaster.stop_fast(), "restored postgres did not stop cleanly");
    let checksums =
        pg.run_ok(work.path(), Command::new(pg_bin("pg_checksums")).arg("--check").arg("-D").arg(&pgdata)).unwrap();
    eprintln!("{}", checksums.stdout);
    stack.unmount().unwrap();
    stack.fsck().unwrap();
    stack.teardown().unwrap();
}
