//! PostgreSQL end to end across a failover (the SLA's promise: an automatic switch on
//! hardware failure, no data loss, and the service back within seconds).
//!
//! A replicated pair serves the volume `pg`. On the primary the test mounts it (nbdfuse →
//! loop with direct I/O → ext4), runs `initdb --data-checksums` on it, writes a filestore of
//! files with known SHA-256, starts PostgreSQL 15, loads pgbench and runs it, while a side
//! client commits one row per transaction and logs each id — outside the volume — only
//! after its COMMIT returned. Then the power goes: the primary's `keel daemon`, the
//! postmaster and every backend get SIGKILL together. The standby must promote by itself,
//! and its `on_promote` hook (a shell script this test writes) must mount the volume through
//! the standby's own NBD socket and start PostgreSQL, returning once it accepts
//! connections. On the new primary: every logged commit is in the table, pgbench's
//! balances agree, `pg_amcheck --heapallindexed` finds nothing, `pg_checksums --check`
//! passes after a clean stop, `e2fsck -fn` is clean after unmounting, and the filestore
//! hashes match. The measured RTO (to a writable volume, and to PostgreSQL accepting
//! connections) is printed.
//!
//! Needs root, /dev/fuse, /dev/loop-control (else SKIPPED) and PostgreSQL 15 from Debian
//! (tests/run installs it). Takes the cluster lock and the machine-wide mount lock.
//! `KEEL_PG_COMMITS` sets how many side-client commits to wait for before the cut
//! (default 1000).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use keel_tests::cluster::{Cluster, ClusterOptions};
use keel_tests::cmd::{run, run_ok, sha256, sha256_file, wait_for, Output};
use keel_tests::mount::{machine_lock, unavailable, Stack};
use rand::{RngCore, SeedableRng};
use serde_json::Value;

const VOLUME: &str = "pg";
const VOLUME_SIZE: u64 = 1 << 30;
pub(crate) const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
pub(crate) const DATABASE: &str = "keel";
/// pgbench's scale factor: 100,000 accounts per unit.
const PGBENCH_SCALE: u32 = 4;
/// The standby's hook runs ext4 journal replay and PostgreSQL crash recovery; generous,
/// since a two-core machine also runs the test's own processes.
const HOOK_TIMEOUT_SECS: u64 = 180;
pub(crate) const STEP_TIMEOUT: Duration = Duration::from_secs(300);
/// The two storage nodes' indexes in the cluster.
const PRIMARY: usize = 0;
const STANDBY: usize = 1;

/// The hook: mounts the volume through nbdfuse + loop on the node's own NBD socket and
/// starts PostgreSQL on it, as a production `on_promote` would. Every process it starts is
/// detached (`setsid`, output to files) so that it outlives the hook; it writes their pids
/// and the loop device into its directory for the test's cleanup. Arguments: the node's
/// service directory and PostgreSQL's port.
const HOOK_SCRIPT: &str = r#"#!/bin/sh
set -eu
export PATH=/usr/lib/postgresql/15/bin:/usr/sbin:/usr/bin:/sbin:/bin
dir=$1
port=$2
echo $$ >"$dir/hook.pid"
env | grep '^KEEL_' | sort >"$dir/hook.env"
echo "on_promote: $KEEL_VOLUME epoch $KEEL_EPOCH on $KEEL_NODE ($KEEL_REASON) via $KEEL_NBD_URI"
mkdir -p "$dir/fuse" "$dir/fs" "$dir/sock"
chown postgres:postgres "$dir/sock"
setsid nbdfuse "$dir/fuse/vol" "$KEEL_NBD_URI" </dev/null >"$dir/nbdfuse.log" 2>&1 &
echo $! >"$dir/nbdfuse.pid"
tries=0
until [ -s "$dir/fuse/vol" ]; do
  tries=$((tries + 1))
  if [ "$tries" -gt 3000 ] || ! kill -0 "$(cat "$dir/nbdfuse.pid")" 2>/dev/null; then
    echo "nbdfuse did not expose the volume"; cat "$dir/nbdfuse.log"; exit 1
  fi
  sleep 0.01
done
dev=$(losetup --direct-io=on -f --show "$dir/fuse/vol")
echo "$dev" >"$dir/loop.dev"
mount -t ext4 "$dev" "$dir/fs"
echo "$dir/fs" >"$dir/mounted"
echo "mounted $dev on $dir/fs"
setsid setpriv --reuid=postgres --regid=postgres --clear-groups \
  postgres -D "$dir/fs/pgdata" -p "$port" -k "$dir/sock" </dev/null >"$dir/postgres.log" 2>&1 &
echo $! >"$dir/postgres.pid"
until pg_isready -q -h "$dir/sock" -p "$port"; do
  if ! kill -0 "$(cat "$dir/postgres.pid")" 2>/dev/null; then
    echo "postgres exited"; tail -n 30 "$dir/postgres.log"; exit 1
  fi
  sleep 0.02
done
echo "PostgreSQL accepts connections on $dir/sock port $port"
touch "$dir/hook.done"
"#;

#[test]
fn postgres_survives_a_power_cut_of_the_primary_and_moves_to_the_standby() {
    let _serial = crate::failover::CLUSTER_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(reason) = unavailable() {
        println!("SKIPPED: postgres failover: {reason}");
        return;
    }
    assert!(
        Path::new(PG_BIN).join("postgres").exists(),
        "PostgreSQL 15 is missing ({PG_BIN}); tests/run installs postgresql-15"
    );
    let _mounts = machine_lock().unwrap();
    let started = Instant::now();
    let pg = PgUser::lookup().unwrap();
    let commits_wanted: u64 = std::env::var("KEEL_PG_COMMITS").ok().and_then(|s| s.parse().ok()).unwrap_or(1000);

    // Layout: WORK/hook.sh, WORK/<node>/{fuse,fs,sock,...}, WORK/commits.log.
    let work = tempfile::Builder::new().prefix("keel-pg-").tempdir().unwrap();
    let node_dirs = [work.path().join("node-a"), work.path().join("node-b")];
    for dir in [work.path(), node_dirs[0].as_path(), node_dirs[1].as_path()] {
        std::fs::create_dir_all(dir).unwrap();
        // PostgreSQL (as `postgres`) must reach its data directory and socket below here.
        chmod(dir, 0o755);
    }
    let hook = work.path().join("on_promote.sh");
    std::fs::write(&hook, HOOK_SCRIPT).unwrap();
    let port = free_port();
    let extra = |node: usize| {
        format!(
            "on_promote = \"sh {} {} {port}\"\nhook_timeout_secs = {HOOK_TIMEOUT_SECS}",
            hook.display(),
            node_dirs[node].display()
        )
    };
    let options = ClusterOptions {
        volumes: vec![(VOLUME.into(), "1GiB".into())],
        volume_extra: [extra(PRIMARY), extra(STANDBY)],
        ..ClusterOptions::default()
    };
    let mut cluster = Cluster::start(&options).unwrap();
    // Whatever the standby's hook starts is torn down before the cluster goes.
    let standby_service = HookService { dir: node_dirs[STANDBY].clone() };

    // --- the service on the primary -------------------------------------------------------
    let uri = format!("nbd+unix:///{VOLUME}?socket={}", cluster.socket(PRIMARY).display());
    let mut stack = Stack::attach(&node_dirs[PRIMARY], &uri, VOLUME_SIZE).unwrap();
    stack.mkfs().unwrap();
    let root = stack.mount().unwrap();
    chmod(&root, 0o755);
    let files = write_filestore(&root.join("filestore"), rand::random());
    let pgdata = initdb(&pg, work.path(), &root);
    // Small WAL bounds and frequent checkpoints: the 1 GiB volume holds it, and the crash
    // lands between checkpoints with WAL to replay.
    let mut conf = std::fs::OpenOptions::new().append(true).open(pgdata.join("postgresql.conf")).unwrap();
    conf.write_all(
        b"\n# keel test\nlisten_addresses = ''\nmin_wal_size = 32MB\nmax_wal_size = 128MB\n\
          checkpoint_timeout = 30s\nlog_checkpoints = on\n",
    )
    .unwrap();
    drop(conf);
    let sock = node_dirs[PRIMARY].join("sock");
    std::fs::create_dir(&sock).unwrap();
    pg.chown(&sock);
    run_ok(Command::new("sync").arg("-f").arg(&root), STEP_TIMEOUT).unwrap();

    let mut postmaster = Postmaster::start(&pg, work.path(), &pgdata, &sock, port, &node_dirs[PRIMARY]).unwrap();
    let primary_db = Db { pg: pg.clone(), sock: sock.clone(), port, cwd: work.path().to_path_buf() };
    primary_db.psql("postgres", &format!("CREATE DATABASE {DATABASE}")).unwrap();
    primary_db
        .psql(DATABASE, "CREATE TABLE commits (id bigint PRIMARY KEY, at timestamptz NOT NULL DEFAULT now(), pad text)")
        .unwrap();
    pg.run_ok(
        work.path(),
        Command::new(pg_bin("pgbench")).args(["-i", "-q", "-s", &PGBENCH_SCALE.to_string(), "-h"]).arg(&sock).args([
            "-p",
            &port.to_string(),
            DATABASE,
        ]),
    )
    .unwrap();

    // --- the workload ----------------------------------------------------------------------
    let mut clients = Children::default();
    let pgbench_log = work.path().join("pgbench.log");
    clients.0.push(
        pg.command(work.path(), &pg_bin("pgbench"))
            .args(["-n", "-c", "4", "-j", "2", "-T", "3600", "-P", "5", "-h"])
            .arg(&sock)
            .args(["-p", &port.to_string(), DATABASE])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&pgbench_log).unwrap())
            .stderr(std::fs::File::create(work.path().join("pgbench.err")).unwrap())
            .spawn()
            .unwrap(),
    );
    let commit_log = work.path().join("commits.log");
    let committed = Arc::new(AtomicU64::new(0));
    let side = SideClient::start(&primary_db, &work.path().join("psql.err")).unwrap();
    let side_thread = {
        let (log, committed) = (commit_log.clone(), committed.clone());
        let (stdin, stdout) = (side.stdin, side.stdout);
        std::thread::spawn(move || side_client_loop(stdin, stdout, &log, &committed))
    };
    clients.0.push(side.child);
    // A checkpoint half way, so the crash lands after one, with WAL (and full-page images)
    // to replay on the standby.
    wait_for("the side client's first commits", STEP_TIMEOUT, || {
        Ok((committed.load(Ordering::SeqCst) >= commits_wanted / 2).then_some(()))
    })
    .unwrap();
    primary_db.psql(DATABASE, "CHECKPOINT").unwrap();
    wait_for(&format!("{commits_wanted} side-client commits"), STEP_TIMEOUT, || {
        if side_thread.is_finished() {
            bail!("the side client stopped early: {}", read(&work.path().join("psql.err")));
        }
        Ok((committed.load(Ordering::SeqCst) >= commits_wanted).then_some(()))
    })
    .unwrap();

    // Automatic failover needs a standby the witness records UpToDate (an Outdated one is
    // never promoted, by design); under this load the primary may have marked it Outdated
    // (no durable ack within ack_timeout), so cut the power only once it is UpToDate again.
    let in_sync = wait_for("the standby to be UpToDate before the cut", Duration::from_secs(60), || {
        let s = cluster.volume_status(PRIMARY, VOLUME)?;
        Ok((s["peer"]["connected"] == true && s["peer"]["state"] == "UpToDate").then_some(()))
    });
    let outdated_marks = standby_state_changes(&cluster.events(PRIMARY), "Outdated");
    if let Err(e) = in_sync {
        panic!(
            "{e:#}: the primary marked its connected standby Outdated {outdated_marks} time(s) under the \
             PostgreSQL load and never UpToDate again\n{}",
            cluster.describe()
        );
    }

    // --- the power cut -----------------------------------------------------------------------
    // Freeze the postmaster so that it forks no backend between the listing and the kill,
    // then SIGKILL the daemon, the postmaster and every child of it back to back.
    let postmaster_pid = postmaster.pid();
    signal(postmaster_pid, libc::SIGSTOP);
    let backends = children_of(postmaster_pid);
    let daemon_pid = cluster.nodes[PRIMARY].pid().expect("the primary runs") as i32;
    let killed_wall_ms = now_ms();
    let killed_at = Instant::now();
    signal(daemon_pid, libc::SIGKILL);
    signal(postmaster_pid, libc::SIGKILL);
    for &pid in &backends {
        signal(pid, libc::SIGKILL);
    }
    cluster.nodes[PRIMARY].kill9();
    postmaster.reap();
    eprintln!(
        "power cut after {:?}: keel daemon {daemon_pid}, postmaster {postmaster_pid} and {} children killed",
        started.elapsed(),
        backends.len()
    );
    let side_ids = side_thread.join().expect("side client thread").unwrap();
    drop(clients);
    // The primary's mount now fails with EIO; tear it down (umount -l, losetup -d, nbdfuse).
    let dead_write =
        std::fs::write(root.join("after-the-cut"), b"x").and_then(|()| std::fs::File::open(&root)?.sync_all());
    assert!(dead_write.is_err(), "a synced write succeeded on the primary's mount after its server died");
    stack.abandon();

    // --- the standby takes over, and its hook starts PostgreSQL ------------------------------
    cluster.wait_primary(STANDBY, VOLUME, Duration::from_secs(60)).unwrap_or_else(|e| {
        let refused: Vec<Value> =
            cluster.events(STANDBY).into_iter().filter(|e| e["kind"] == "promote_refused").collect();
        panic!("{e:#}\npromotions refused: {refused:?}\n{}", cluster.describe())
    });
    let writable_seen = killed_at.elapsed();
    let standby_sock = node_dirs[STANDBY].join("sock");
    let standby_db = Db { pg: pg.clone(), sock: standby_sock.clone(), port, cwd: work.path().to_path_buf() };
    let mut ready_seen = None;
    let hook_event = wait_for("the standby's on_promote hook", Duration::from_secs(HOOK_TIMEOUT_SECS + 60), || {
        if ready_seen.is_none() && standby_sock.join(format!(".s.PGSQL.{port}")).exists() && standby_db.is_ready() {
            ready_seen = Some(killed_at.elapsed());
        }
        Ok(cluster.events(STANDBY).into_iter().find(|e| e["kind"] == "hook" && e["fields"]["hook"] == "on_promote"))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", standby_service.describe()));
    let outcome = &hook_event["fields"];
    assert!(
        outcome["success"] == true,
        "the standby's on_promote hook failed: {outcome:#}\n{}\n{}",
        standby_service.describe(),
        cluster.describe()
    );
    assert!(standby_db.is_ready(), "PostgreSQL does not accept connections after its hook succeeded");
    let ready_seen = ready_seen.unwrap_or_else(|| killed_at.elapsed());
    let promote_event = cluster
        .events(STANDBY)
        .into_iter()
        .find(|e| e["kind"] == "promote")
        .unwrap_or_else(|| panic!("no promote event on the standby\n{}", cluster.describe()));
    let epoch = promote_event["fields"]["epoch"].as_u64().unwrap();
    let hook_env = std::fs::read_to_string(node_dirs[STANDBY].join("hook.env")).unwrap();
    for expected in [
        format!("KEEL_VOLUME={VOLUME}"),
        format!("KEEL_EPOCH={epoch}"),
        "KEEL_ROLE=primary".to_string(),
        format!("KEEL_NODE={}", cluster.nodes[STANDBY].name),
        format!("KEEL_NBD_URI=nbd+unix:///{VOLUME}?socket={}", cluster.socket(STANDBY).display()),
    ] {
        assert!(hook_env.lines().any(|l| l == expected), "the hook's environment lacks {expected}:\n{hook_env}");
    }

    // --- nothing acknowledged is lost, nothing is corrupt ------------------------------------
    let logged: Vec<u64> =
        std::fs::read_to_string(&commit_log).unwrap().lines().map(|l| l.parse().expect("commit log line")).collect();
    assert_eq!(logged, side_ids, "the commit log differs from what the side client saw");
    let in_table: std::collections::BTreeSet<u64> = standby_db
        .psql(DATABASE, "SELECT id FROM commits")
        .unwrap()
        .lines()
        .map(|l| l.trim().parse().expect("id"))
        .collect();
    let lost: Vec<u64> = logged.iter().copied().filter(|id| !in_table.contains(id)).collect();
    assert!(
        lost.is_empty(),
        "{} of {} logged commits are missing after the failover (first: {:?})",
        lost.len(),
        logged.len(),
        &lost[..lost.len().min(10)]
    );
    // At most the one transaction in flight at the cut committed without its client hearing.
    let unlogged = in_table.len() - logged.len();
    assert!(unlogged <= 1, "{unlogged} rows in the table were never committed by the client");
    let sums = standby_db
        .psql(
            DATABASE,
            "SELECT (SELECT sum(abalance) FROM pgbench_accounts), (SELECT sum(tbalance) FROM pgbench_tellers), \
             (SELECT sum(bbalance) FROM pgbench_branches), (SELECT coalesce(sum(delta), 0) FROM pgbench_history), \
             (SELECT count(*) FROM pgbench_history)",
        )
        .unwrap();
    let sums: Vec<&str> = sums.trim().split('|').collect();
    assert!(
        sums.len() == 5 && sums[0] == sums[1] && sums[1] == sums[2] && sums[2] == sums[3],
        "pgbench's balances disagree (accounts|tellers|branches|history|transactions): {sums:?}"
    );
    let pgbench_transactions: u64 = sums[4].parse().unwrap();
    let amcheck = standby_db.amcheck().unwrap();
    assert!(amcheck.stdout.trim().is_empty(), "pg_amcheck reported corruption:\n{}", amcheck.describe());

    // A clean stop, then the page checksums of the whole cluster.
    let standby_pgdata = node_dirs[STANDBY].join("fs/pgdata");
    pg.run_ok(
        work.path(),
        Command::new(pg_bin("pg_ctl")).args(["stop", "-m", "fast", "-w", "-t", "120", "-D"]).arg(&standby_pgdata),
    )
    .unwrap();
    let checksums =
        pg.run_ok(work.path(), Command::new(pg_bin("pg_checksums")).arg("--check").arg("-D").arg(&standby_pgdata));
    let checksums = checksums.unwrap_or_else(|e| panic!("pg_checksums --check failed: {e:#}"));
    check_filestore(&node_dirs[STANDBY].join("fs/filestore"), &files);
    let fsck = standby_service.unmount_and_fsck().unwrap();
    assert!(fsck.stdout.contains("Pass 5"), "e2fsck did not run every pass:\n{}", fsck.describe());
    standby_service.teardown().unwrap();

    let hook_ms = outcome["duration_ms"].as_u64().unwrap_or(0);
    let promote_ms = promote_event["time_ms"].as_u64().unwrap_or(0).saturating_sub(killed_wall_ms);
    let hook_done_ms = hook_event["time_ms"].as_u64().unwrap_or(0).saturating_sub(killed_wall_ms);
    eprintln!(
        "postgres failover: standby marked Outdated {outdated_marks} time(s) under load before the cut; \
         {} logged commits all present ({unlogged} committed unheard), \
         {pgbench_transactions} pgbench transactions consistent, pg_amcheck and pg_checksums ({}) clean, \
         {} filestore files intact, e2fsck clean",
        logged.len(),
        checksums.stdout.lines().find(|l| l.contains("Blocks scanned")).unwrap_or("?").trim(),
        files.len(),
    );
    eprintln!(
        "postgres failover RTO: kill -> promote event {promote_ms} ms, -> writable seen {} ms; \
         kill -> PostgreSQL accepting connections {} ms (seen by the test), hook done {hook_done_ms} ms \
         (hook ran {hook_ms} ms); test took {:?}",
        writable_seen.as_millis(),
        ready_seen.as_millis(),
        started.elapsed()
    );
}

// --- PostgreSQL as the `postgres` user ------------------------------------------------------

/// Creates `root/pgdata` owned by `postgres` and runs `initdb --data-checksums` in it
/// (trust auth, UTF8, C locale); returns the data directory.
pub(crate) fn initdb(pg: &PgUser, cwd: &Path, root: &Path) -> PathBuf {
    let pgdata = root.join("pgdata");
    std::fs::create_dir(&pgdata).unwrap();
    pg.chown(&pgdata);
    chmod(&pgdata, 0o700);
    let args = ["--data-checksums", "-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C"];
    pg.run_ok(cwd, Command::new(pg_bin("initdb")).arg("-D").arg(&pgdata).args(args)).unwrap();
    pgdata
}

pub(crate) fn pg_bin(name: &str) -> PathBuf {
    Path::new(PG_BIN).join(name)
}

/// The `postgres` user's ids (PostgreSQL refuses to run as root).
#[derive(Debug, Clone)]
pub(crate) struct PgUser {
    uid: u32,
    gid: u32,
}

impl PgUser {
    pub(crate) fn lookup() -> Result<Self> {
        let id = |flag: &str| -> Result<u32> {
            let out = run_ok(Command::new("id").args([flag, "postgres"]), Duration::from_secs(10))?;
            out.stdout.trim().parse().with_context(|| format!("id {flag} postgres printed {:?}", out.stdout))
        };
        Ok(Self { uid: id("-u")?, gid: id("-g")? })
    }

    /// `program` as `postgres` (no supplementary groups: std drops them when root sets a
    /// uid), in `cwd`.
    pub(crate) fn command(&self, cwd: &Path, program: &Path) -> Command {
        let mut cmd = Command::new(program);
        cmd.uid(self.uid).gid(self.gid).current_dir(cwd).env("HOME", cwd);
        cmd
    }

    pub(crate) fn run_ok(&self, cwd: &Path, cmd: &mut Command) -> Result<Output> {
        cmd.uid(self.uid).gid(self.gid).current_dir(cwd).env("HOME", cwd);
        run_ok(cmd, STEP_TIMEOUT)
    }

    pub(crate) fn chown(&self, path: &Path) {
        std::os::unix::fs::chown(path, Some(self.uid), Some(self.gid))
            .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
    }
}

/// Where a PostgreSQL server listens.
#[derive(Debug, Clone)]
pub(crate) struct Db {
    pub(crate) pg: PgUser,
    pub(crate) sock: PathBuf,
    pub(crate) port: u16,
    pub(crate) cwd: PathBuf,
}

impl Db {
    pub(crate) fn psql(&self, database: &str, sql: &str) -> Result<String> {
        let out = self.pg.run_ok(
            &self.cwd,
            Command::new(pg_bin("psql"))
                .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h"])
                .arg(&self.sock)
                .args(["-p", &self.port.to_string(), "-d", database, "-c", sql]),
        )?;
        Ok(out.stdout)
    }

    fn is_ready(&self) -> bool {
        let mut cmd = self.pg.command(&self.cwd, &pg_bin("pg_isready"));
        cmd.args(["-q", "-t", "5", "-h"]).arg(&self.sock).args(["-p", &self.port.to_string()]);
        run(&mut cmd, Duration::from_secs(30)).is_ok_and(|o| o.status.success())
    }

    /// `pg_amcheck --heapallindexed` over every database (installing amcheck where needed).
    pub(crate) fn amcheck(&self) -> Result<Output> {
        self.pg.run_ok(
            &self.cwd,
            Command::new(pg_bin("pg_amcheck"))
                .args(["--all", "--heapallindexed", "--install-missing", "-h"])
                .arg(&self.sock)
                .args(["-p", &self.port.to_string(), "-d", DATABASE]),
        )
    }
}

/// The primary's postmaster, a child of the test; SIGKILLed with its children on drop.
#[derive(Debug)]
pub(crate) struct Postmaster {
    child: Option<Child>,
}

impl Postmaster {
    pub(crate) fn start(
        pg: &PgUser,
        cwd: &Path,
        pgdata: &Path,
        sock: &Path,
        port: u16,
        log_dir: &Path,
    ) -> Result<Self> {
        let log = std::fs::File::create(log_dir.join("postgres.log"))?;
        let child = pg
            .command(cwd, &pg_bin("postgres"))
            .arg("-D")
            .arg(pgdata)
            .args(["-p", &port.to_string(), "-k"])
            .arg(sock)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start postgres")?;
        let mut postmaster = Self { child: Some(child) };
        let db = Db { pg: pg.clone(), sock: sock.to_path_buf(), port, cwd: cwd.to_path_buf() };
        wait_for("PostgreSQL on the primary to accept connections", STEP_TIMEOUT, || {
            if let Some(status) = postmaster.child.as_mut().context("no child")?.try_wait()? {
                postmaster.child = None;
                bail!("postgres exited with {status}: {}", read(&log_dir.join("postgres.log")));
            }
            Ok(db.is_ready().then_some(()))
        })?;
        Ok(postmaster)
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    /// A fast, clean shutdown (SIGINT: abort sessions, checkpoint, exit); true when the
    /// postmaster exited successfully.
    pub(crate) fn stop_fast(&mut self) -> bool {
        let Some(mut child) = self.child.take() else { return false };
        signal(child.id() as i32, libc::SIGINT);
        child.wait().is_ok_and(|s| s.success())
    }

    /// Waits for the (killed) postmaster.
    fn reap(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
    }
}

impl Drop for Postmaster {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = child.id() as i32;
            signal(pid, libc::SIGSTOP);
            let children = children_of(pid);
            signal(pid, libc::SIGKILL);
            for child_pid in children {
                signal(child_pid, libc::SIGKILL);
            }
            let _ = child.wait();
        }
    }
}

/// Client processes, killed on drop.
#[derive(Debug, Default)]
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A persistent `psql` fed one transaction at a time; after each COMMIT it echoes a marker,
/// which psql prints only once COMMIT returned successfully (`ON_ERROR_STOP` ends it on
/// the first error instead).
struct SideClient {
    child: Child,
    stdin: ChildStdin,
    stdout: ChildStdout,
}

impl SideClient {
    fn start(db: &Db, stderr: &Path) -> Result<Self> {
        let mut child = db
            .pg
            .command(&db.cwd, &pg_bin("psql"))
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(&db.sock)
            .args(["-p", &db.port.to_string(), "-d", DATABASE])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(stderr)?)
            .spawn()
            .context("start psql")?;
        let stdin = child.stdin.take().context("stdin")?;
        let stdout = child.stdout.take().context("stdout")?;
        Ok(Self { child, stdin, stdout })
    }
}

/// Commits ids 1, 2, ... one transaction each, appending each id to `log` (outside the
/// volume) only after its COMMIT returned; ends when psql fails or exits (the power cut).
/// Returns the ids logged.
fn side_client_loop(mut stdin: ChildStdin, stdout: ChildStdout, log: &Path, committed: &AtomicU64) -> Result<Vec<u64>> {
    let mut log = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
    let mut stdout = BufReader::new(stdout);
    let mut ids = Vec::new();
    for id in 1u64.. {
        let statements = format!(
            "BEGIN;\nINSERT INTO commits (id, pad) VALUES ({id}, repeat(md5('{id}'), 8));\nCOMMIT;\n\\echo committed {id}\n"
        );
        if stdin.write_all(statements.as_bytes()).and_then(|()| stdin.flush()).is_err() {
            break;
        }
        let mut line = String::new();
        if stdout.read_line(&mut line).unwrap_or(0) == 0 || line.trim_end() != format!("committed {id}") {
            break;
        }
        writeln!(log, "{id}")?;
        log.flush()?;
        ids.push(id);
        committed.store(id, Ordering::SeqCst);
    }
    Ok(ids)
}

// --- the standby's service, started by its hook ----------------------------------------------

/// What the standby's `on_promote` hook started, found through the files it writes; torn
/// down on drop (hook, PostgreSQL, mount, loop device, nbdfuse), even after a failure.
struct HookService {
    dir: PathBuf,
}

impl HookService {
    fn pid_file(&self, name: &str) -> Option<i32> {
        std::fs::read_to_string(self.dir.join(name)).ok()?.trim().parse().ok()
    }

    fn loop_device(&self) -> Option<String> {
        std::fs::read_to_string(self.dir.join("loop.dev")).ok().map(|s| s.trim().to_string())
    }

    fn describe(&self) -> String {
        let mut out = String::new();
        for name in ["nbdfuse.log", "postgres.log"] {
            let text = read(&self.dir.join(name));
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            out.push_str(&format!("\n--- standby {name}:\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n")));
        }
        out
    }

    /// A clean unmount (PostgreSQL stopped), then `e2fsck -fn` on the loop device.
    fn unmount_and_fsck(&self) -> Result<Output> {
        let mounted = std::fs::read_to_string(self.dir.join("mounted")).context("the hook mounted nothing")?;
        run_ok(Command::new("umount").arg(mounted.trim()), STEP_TIMEOUT)?;
        std::fs::remove_file(self.dir.join("mounted"))?;
        let device = self.loop_device().context("no loop device")?;
        run_ok(Command::new("e2fsck").arg("-fn").arg(&device), STEP_TIMEOUT)
    }

    /// Clean teardown of the unmounted stack: detach the loop device, unmount nbdfuse and
    /// wait for it to exit.
    fn teardown(&self) -> Result<()> {
        if let Some(device) = self.loop_device() {
            run_ok(Command::new("losetup").arg("-d").arg(&device), STEP_TIMEOUT)?;
            std::fs::remove_file(self.dir.join("loop.dev"))?;
        }
        run_ok(Command::new("fusermount3").arg("-u").arg(self.dir.join("fuse")), STEP_TIMEOUT)?;
        if let Some(pid) = self.pid_file("nbdfuse.pid") {
            wait_for("the standby's nbdfuse to exit", Duration::from_secs(30), || Ok((!alive(pid)).then_some(())))?;
        }
        Ok(())
    }
}

impl Drop for HookService {
    fn drop(&mut self) {
        // A hook still running: kill its process group (it leads one) before it starts more.
        if let Some(hook) = self.pid_file("hook.pid") {
            if !self.dir.join("hook.done").exists() && alive(hook) {
                signal(-hook, libc::SIGKILL);
            }
        }
        if let Some(postmaster) = self.pid_file("postgres.pid") {
            if alive(postmaster) {
                signal(postmaster, libc::SIGSTOP);
                let children = children_of(postmaster);
                signal(postmaster, libc::SIGKILL);
                for pid in children.iter().copied().chain([postmaster]) {
                    signal(pid, libc::SIGKILL);
                }
                for pid in children.into_iter().chain([postmaster]) {
                    let _ = wait_for("a PostgreSQL process to end", Duration::from_secs(30), || {
                        Ok((!alive(pid)).then_some(()))
                    });
                }
            }
        }
        if let Ok(mounted) = std::fs::read_to_string(self.dir.join("mounted")) {
            let target = mounted.trim();
            if !run(Command::new("umount").arg(target), STEP_TIMEOUT).is_ok_and(|o| o.status.success()) {
                let _ = run(Command::new("umount").arg("-l").arg(target), STEP_TIMEOUT);
            }
        }
        if let Some(device) = self.loop_device() {
            let _ = run(Command::new("losetup").arg("-d").arg(&device), STEP_TIMEOUT);
        }
        let fuse = self.dir.join("fuse");
        if is_mountpoint(&fuse) {
            let out = run(Command::new("fusermount3").arg("-u").arg(&fuse), STEP_TIMEOUT);
            if !out.is_ok_and(|o| o.status.success()) {
                let _ = run(Command::new("fusermount3").arg("-u").arg("-z").arg(&fuse), STEP_TIMEOUT);
            }
        }
        if let Some(nbdfuse) = self.pid_file("nbdfuse.pid") {
            if wait_for("nbdfuse to exit", Duration::from_secs(10), || Ok((!alive(nbdfuse)).then_some(()))).is_err() {
                signal(nbdfuse, libc::SIGKILL);
            }
        }
    }
}

// --- the filestore ------------------------------------------------------------------------------

/// A file the test wrote, and the SHA-256 of what it wrote.
struct Written {
    path: PathBuf,
    sha256: String,
    len: usize,
}

/// Files of several sizes with random contents, each fsynced.
fn write_filestore(dir: &Path, seed: u64) -> Vec<Written> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    std::fs::create_dir_all(dir.join("tenant/uploads")).unwrap();
    let mut written = Vec::new();
    for (i, len) in [0usize, 1, 4096, 100_003, 1 << 20, 8 << 20].into_iter().enumerate() {
        let relative = if i % 2 == 0 { format!("doc-{i}.bin") } else { format!("tenant/uploads/doc-{i}.bin") };
        let mut data = vec![0u8; len];
        rng.fill_bytes(&mut data);
        let mut file = std::fs::File::create(dir.join(&relative)).unwrap();
        file.write_all(&data).unwrap();
        file.sync_all().unwrap();
        written.push(Written { path: PathBuf::from(relative), sha256: sha256(&data).unwrap(), len });
    }
    written
}

fn check_filestore(dir: &Path, files: &[Written]) {
    for file in files {
        let path = dir.join(&file.path);
        let len = std::fs::metadata(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).len();
        assert_eq!(len, file.len as u64, "{} has the wrong size", path.display());
        assert_eq!(sha256_file(&path).unwrap(), file.sha256, "{} has the wrong contents", path.display());
    }
}

// --- processes -----------------------------------------------------------------------------------

/// How many times the primary's events say the standby's state became `state`.
fn standby_state_changes(events: &[Value], state: &str) -> usize {
    events.iter().filter(|e| e["kind"] == "peer" && e["fields"]["standby_state"] == state).count()
}

fn signal(pid: i32, signal: i32) {
    if pid == 0 || pid == -1 {
        return;
    }
    // SAFETY: kill(2) only reads its arguments; 0 and -1 (this group, every process) are
    // excluded above, and a negative pid names a process group the test saw started.
    unsafe { libc::kill(pid, signal) };
}

/// Whether `pid` runs (a zombie does not count: nothing may reap reparented processes here).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z')),
        Err(_) => false,
    }
}

/// The children of `pid` (`pgrep -P`).
fn children_of(pid: i32) -> Vec<i32> {
    run(Command::new("pgrep").arg("-P").arg(pid.to_string()), Duration::from_secs(10))
        .map(|o| o.stdout.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

fn is_mountpoint(path: &Path) -> bool {
    let path = path.display().to_string();
    std::fs::read_to_string("/proc/self/mounts").is_ok_and(|m| m.lines().any(|l| l.split(' ').nth(1) == Some(&path)))
}

pub(crate) fn chmod(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

/// A port number nobody listens on (PostgreSQL only uses it to name its socket here).
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map_or(55432, |a| a.port())
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}
