//! A customer's database, snapshotted live and restored: PostgreSQL 15 with data
//! checksums on ext4 on a Keel volume (nbdfuse + loop), pgbench writing, `keel snapshot
//! create` in the middle of it; the snapshot restored into a new volume, mounted, and
//! PostgreSQL starts on it (crash recovery from a crash-consistent image), answers, stops
//! cleanly, and `pg_checksums --check` and `e2fsck -fn` pass.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

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
    let mut live = LiveDatabase::start(&pg, work.path(), &live_dir, &daemon.uri("pg"), SIZE, SCALE);
    live.pgbench(&["-c", "4", "-j", "2", "-T", "20", "-n"]);
    // Snapshot in the middle of the load, once it has committed something.
    wait_for("pgbench to commit", STEP_TIMEOUT, || Ok((history(&live.db) > 100).then_some(()))).unwrap();
    let details = create(&daemon, "pg");
    let committed_before = history(&live.db);
    let id = details["snapshot"].as_str().unwrap().to_owned();
    eprintln!("snapshot of the live database: {details}");
    live.wait_pgbench();
    live.stop();

    // --- restore into a new volume and start PostgreSQL on it ------------------------------
    keel(&daemon, &["snapshot", "restore", &id, "--to-volume", "pg-restored"]);
    daemon.stop().unwrap();
    daemon.restart().unwrap();
    let mut stack = Stack::attach(&restored_dir, &daemon.uri("pg-restored"), SIZE).unwrap();
    let root = stack.mount().unwrap();
    let restored = check_restored(&pg, work.path(), &root.join("pgdata"), &restored_dir);
    assert!(
        restored > 100 && restored <= committed_before,
        "history rows {restored}, committed by the snapshot's end {committed_before}"
    );
    stack.unmount().unwrap();
    stack.fsck().unwrap();
    stack.teardown().unwrap();
}

/// pgbench's scale: 100 000 accounts each.
pub(crate) const SCALE: u64 = 4;

/// Rows in `pgbench_history`: transactions committed.
pub(crate) fn history(db: &Db) -> u64 {
    db.psql(DATABASE, "SELECT count(*) FROM pgbench_history").unwrap().trim().parse().unwrap()
}

/// A customer's database: PostgreSQL 15 with data checksums on a fresh ext4 on a Keel
/// volume (nbdfuse + loop, files in `dir`), its `pgbench` tables initialized.
pub(crate) struct LiveDatabase {
    /// The pgbench run in the background, killed first on a failure.
    load: Option<Child>,
    // Dropped in this order on a failure: PostgreSQL killed before the unmount.
    postmaster: Postmaster,
    stack: Option<Stack>,
    pub(crate) db: Db,
    pg: PgUser,
    work: PathBuf,
}

impl LiveDatabase {
    /// Makes the filesystem on the volume at `uri`, runs initdb on it, starts PostgreSQL
    /// and creates the pgbench tables at `scale`.
    pub(crate) fn start(pg: &PgUser, work: &Path, dir: &Path, uri: &str, size: u64, scale: u64) -> Self {
        let mut stack = Stack::attach(dir, uri, size).unwrap();
        stack.mkfs().unwrap();
        let root = stack.mount().unwrap();
        chmod(&root, 0o755);
        let pgdata = initdb(pg, work, &root);
        let mut conf = std::fs::OpenOptions::new().append(true).open(pgdata.join("postgresql.conf")).unwrap();
        conf.write_all(b"\nlisten_addresses = ''\nmin_wal_size = 32MB\nmax_wal_size = 128MB\n").unwrap();
        drop(conf);
        // A snapshot is crash-consistent: it holds what was made durable, and an unsynced
        // append may read back as zeros (ext4 commits the new size before the data). So,
        // like any administrator editing a config before a crash could hit, sync it.
        run_ok(Command::new("sync").arg("-f").arg(&root), STEP_TIMEOUT).unwrap();
        let sock = dir.join("sock");
        std::fs::create_dir(&sock).unwrap();
        pg.chown(&sock);
        let port = free_port();
        let postmaster = Postmaster::start(pg, work, &pgdata, &sock, port, dir).unwrap();
        let db = Db { pg: pg.clone(), sock, port, cwd: work.to_path_buf() };
        db.psql("postgres", &format!("CREATE DATABASE {DATABASE}")).unwrap();
        let live = Self { load: None, postmaster, stack: Some(stack), db, pg: pg.clone(), work: work.to_path_buf() };
        let scale = scale.to_string();
        run_ok(&mut live.pgbench_command(&["-i", "-q", "-s", &scale]), STEP_TIMEOUT).unwrap();
        live
    }

    fn pgbench_command(&self, args: &[&str]) -> Command {
        let mut cmd = self.pg.command(&self.work, &pg_bin("pgbench"));
        cmd.arg("-h").arg(&self.db.sock).args(["-p", &self.db.port.to_string()]).args(args).arg(DATABASE);
        cmd
    }

    /// Starts `pgbench ARGS` in the background, its output in `pgbench.log`.
    pub(crate) fn pgbench(&mut self, args: &[&str]) {
        let log = std::fs::File::create(self.work.join("pgbench.log")).unwrap();
        let mut cmd = self.pgbench_command(args);
        self.load = Some(cmd.stdout(log.try_clone().unwrap()).stderr(log).stdin(Stdio::null()).spawn().unwrap());
    }

    /// Waits for the background pgbench; panics with its log unless it succeeded.
    pub(crate) fn wait_pgbench(&mut self) {
        let status = self.load.take().expect("pgbench started").wait().unwrap();
        let log = std::fs::read_to_string(self.work.join("pgbench.log")).unwrap_or_default();
        assert!(status.success(), "pgbench failed: {log}");
    }

    /// Ends the background pgbench.
    pub(crate) fn kill_pgbench(&mut self) {
        if let Some(mut load) = self.load.take() {
            let _ = load.kill();
            let _ = load.wait();
        }
    }

    /// Stops PostgreSQL cleanly and unmounts the volume.
    pub(crate) fn stop(&mut self) {
        assert!(self.postmaster.stop_fast(), "postgres did not stop cleanly");
        self.stack.take().expect("running").teardown().unwrap();
    }
}

impl Drop for LiveDatabase {
    fn drop(&mut self) {
        self.kill_pgbench();
    }
}

/// Starts PostgreSQL on a restored data directory (crash recovery from a crash-consistent
/// image, its log in `dir`) and checks the database: every pgbench account is there,
/// `pg_amcheck` passes, it stops cleanly and `pg_checksums --check` passes. Returns the
/// `pgbench_history` rows it holds.
pub(crate) fn check_restored(pg: &PgUser, work: &Path, pgdata: &Path, dir: &Path) -> u64 {
    let sock = dir.join("sock");
    std::fs::create_dir(&sock).unwrap();
    pg.chown(&sock);
    let port = free_port();
    let mut postmaster = Postmaster::start(pg, work, pgdata, &sock, port, dir).unwrap();
    let db = Db { pg: pg.clone(), sock, port, cwd: work.to_path_buf() };
    let restored = history(&db);
    let accounts: u64 = db.psql(DATABASE, "SELECT count(*) FROM pgbench_accounts").unwrap().trim().parse().unwrap();
    assert_eq!(accounts, 100_000 * SCALE);
    db.amcheck().unwrap();
    assert!(postmaster.stop_fast(), "restored postgres did not stop cleanly");
    let checksums = pg.run_ok(work, Command::new(pg_bin("pg_checksums")).arg("--check").arg("-D").arg(pgdata)).unwrap();
    eprintln!("{}", checksums.stdout);
    restored
}
