//! The scheduled firings this node still owes, across restarts and failovers.
//!
//! A firing is *settled* for a job (a volume, or a consistency group) once this node took
//! its snapshot, or knows the other node of the pair handles it: the primary skipped it
//! because its standby claimed the name, or this node is the standby and the primary's
//! marker of that firing arrived (the primary appends it as it takes the snapshot:
//! docs/replication.md, "Which node takes a scheduled snapshot"). Until then the job is
//! *owed*, and the scheduler takes it again at its next tick, named after the same firing,
//! so that the pair's claims still see one name:
//!
//! - the daemon was down at the firing: at start, the latest firing is owed (one catch-up,
//!   however many were missed: `Schedule::last_at_or_before`);
//! - the standby could not take it and lost its primary (the request found no answer, or
//!   the primary died just before the firing): once it is promoted, it takes it as primary;
//! - a snapshot failed: retried after a backoff ([`Backoff`]), until it is taken or a newer
//!   firing supersedes it.
//!
//! The price of never missing a firing is that one can, rarely, be taken twice: a primary
//! that restarts inside its grace forgets its standby's claim (claims live in memory); a
//! standby promoted while its old primary was alive but cut off takes what the old primary
//! may have taken too; a standby that was resynced by regions (not records) around the
//! firing never sees the marker, and takes the firing again if it is promoted. Two
//! snapshots of one firing cost an incremental's chunks and are pruned by retention like
//! any other; a missed one is a hole in the backups.
//!
//! The ledger survives restarts in one small file, `<data_dir>/schedule.ledger` (format:
//! docs/retention.md, "Catch-up"); a missing or damaged file starts a fresh ledger at the
//! latest firing (nothing owed), with a warning.
//!
//! What still misses a firing: the marker proves the primary *started* the snapshot, so a
//! primary that dies after appending it but before its snapshot is done loses the firing;
//! so does a standby that claimed the name and then dies for good before its snapshot is
//! done (its primary skipped it).

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

const MAGIC: &str = "keel-schedule-ledger";
const VERSION: u32 = 1;
/// Larger files are refused: a ledger holds one short line per job.
const MAX_LEDGER_BYTES: u64 = 1 << 20;

/// What a job is keyed by in the ledger.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum JobKey {
    /// A volume scheduled alone.
    Volume(String),
    /// A consistency group, scheduled whole.
    Group(String),
}

impl std::fmt::Display for JobKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JobKey::Volume(name) => write!(f, "volume {name}"),
            JobKey::Group(name) => write!(f, "group {name}"),
        }
    }
}

/// How a job fared at one firing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Taken here, or known to be handled by the other node: settled.
    Settled,
    /// Tried here and failed (the error is logged): owed, retried after a backoff.
    Failed,
    /// Left to the primary, whose marker has not arrived: owed, looked at again every tick.
    Waiting,
}

/// The latest firing settled per job, kept in a file.
#[derive(Debug)]
pub struct Ledger {
    path: PathBuf,
    since: i64,
    settled: BTreeMap<JobKey, i64>,
    /// Changed since the file was last written.
    dirty: bool,
}

impl Ledger {
    /// The ledger at `path`; a fresh one settled up to `latest` (the latest firing, so
    /// nothing is owed) when there is none or it cannot be read (logged). A fresh ledger
    /// is written at once, so a restart after this start knows what was owed.
    pub fn open(path: &Path, latest: i64) -> Ledger {
        let fresh = || Ledger { path: path.to_owned(), since: latest, settled: BTreeMap::new(), dirty: true };
        let loaded = match std::fs::metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                tracing::warn!("{}: {e}; starting a fresh schedule ledger", path.display());
                None
            }
            Ok(meta) if meta.len() > MAX_LEDGER_BYTES => {
                tracing::warn!(
                    "{}: {} bytes, more than {MAX_LEDGER_BYTES}; starting a fresh schedule ledger",
                    path.display(),
                    meta.len()
                );
                None
            }
            Ok(_) => match std::fs::read(path).map_err(|e| e.to_string()).and_then(|bytes| Ledger::decode(&bytes)) {
                Ok((since, settled)) => Some(Ledger { path: path.to_owned(), since, settled, dirty: false }),
                Err(e) => {
                    tracing::warn!("{}: {e}; starting a fresh schedule ledger (no firing owed)", path.display());
                    None
                }
            },
        };
        loaded.unwrap_or_else(|| {
            let mut ledger = fresh();
            ledger.store_if_changed();
            ledger
        })
    }

    /// The latest firing settled for `key`.
    pub fn settled(&self, key: &JobKey) -> i64 {
        self.settled.get(key).copied().unwrap_or(self.since)
    }

    /// Whether `key` still owes the firing at `latest`.
    pub fn owes(&self, key: &JobKey, latest: i64) -> bool {
        self.settled(key) < latest
    }

    /// Records that `key` settled the firing at `fired` (an older one is ignored); the
    /// file is replaced by [`Ledger::store_if_changed`].
    pub fn settle(&mut self, key: &JobKey, fired: i64) {
        if fired > self.settled(key) {
            self.settled.insert(key.clone(), fired);
            self.dirty = true;
        }
    }

    /// Brings every firing settled after `latest` (the latest firing now) back to it: they
    /// were settled while the clock ran ahead (a bad RTC, an NTP step back). Left alone, a
    /// clock that jumped a year ahead and back would stop every scheduled snapshot for a
    /// year, across restarts.
    pub fn forget_the_future(&mut self, latest: i64) {
        let ahead = self.since > latest || self.settled.values().any(|&fired| fired > latest);
        if ahead {
            tracing::warn!(
                "schedule ledger {}: firings settled after the latest firing now ({latest}); the clock went back: \
                 counting them as settled at {latest}",
                self.path.display()
            );
            self.since = self.since.min(latest);
            self.settled.values_mut().for_each(|fired| *fired = (*fired).min(latest));
            self.dirty = true;
        }
    }

    /// Replaces the file durably when the ledger changed; a failure is logged and the
    /// file is written again at the next change (the ledger in memory is still right; a
    /// crash before then takes the firing again after the restart).
    pub fn store_if_changed(&mut self) {
        if !self.dirty {
            return;
        }
        match self.store() {
            Ok(()) => self.dirty = false,
            Err(e) => tracing::warn!("failed to write the schedule ledger {}: {e}", self.path.display()),
        }
    }

    fn store(&self) -> std::io::Result<()> {
        let tmp = self.path.with_extension("tmp");
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&self.encode())?;
        // The contents must be on disk before the rename can expose them.
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, &self.path)?;
        // The rename itself must survive a power cut.
        std::fs::File::open(self.path.parent().unwrap_or(Path::new(".")))?.sync_all()
    }

    fn encode(&self) -> Vec<u8> {
        let mut text = format!("{MAGIC} {VERSION}\nsince {}\n", self.since);
        for (key, fired) in &self.settled {
            let (kind, name) = match key {
                JobKey::Volume(name) => ("volume", name),
                JobKey::Group(name) => ("group", name),
            };
            text.push_str(&format!("{kind} {fired} {name}\n"));
        }
        let crc = crc32fast::hash(text.as_bytes());
        text.push_str(&format!("crc32 {crc:08x}\n"));
        text.into_bytes()
    }

    fn decode(bytes: &[u8]) -> Result<(i64, BTreeMap<JobKey, i64>), String> {
        let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8".to_string())?;
        let body_len = text
            .strip_suffix('\n')
            .and_then(|t| t.rfind('\n'))
            .map(|i| i + 1)
            .ok_or_else(|| "truncated: no checksum line".to_string())?;
        let (body, trailer) = text.split_at(body_len);
        let stored = trailer
            .strip_prefix("crc32 ")
            .and_then(|t| t.strip_suffix('\n'))
            .filter(|hex| hex.len() == 8)
            .and_then(|hex| u32::from_str_radix(hex, 16).ok())
            .ok_or_else(|| format!("bad checksum line {:?}", trailer.trim_end()))?;
        let actual = crc32fast::hash(body.as_bytes());
        if stored != actual {
            return Err(format!("checksum mismatch: stored {stored:08x}, computed {actual:08x}"));
        }
        let mut lines = body.lines();
        match lines.next().and_then(|l| l.split_once(' ')) {
            Some((MAGIC, version)) if version == VERSION.to_string() => {}
            Some((MAGIC, version)) => return Err(format!("version {version}; this build reads version {VERSION}")),
            _ => return Err("not a schedule ledger".to_string()),
        }
        let since = lines
            .next()
            .and_then(|l| l.strip_prefix("since "))
            .and_then(|t| t.parse::<i64>().ok())
            .ok_or_else(|| "bad or missing `since` line".to_string())?;
        let mut settled = BTreeMap::new();
        for line in lines {
            let mut fields = line.splitn(3, ' ');
            let (kind, fired, name) = (fields.next(), fields.next(), fields.next());
            let fired = fired.and_then(|f| f.parse::<i64>().ok()).ok_or_else(|| format!("bad line {line:?}"))?;
            let key = match (kind, name) {
                (Some("volume"), Some(name)) if !name.is_empty() => JobKey::Volume(name.to_owned()),
                (Some("group"), Some(name)) if !name.is_empty() => JobKey::Group(name.to_owned()),
                _ => return Err(format!("bad line {line:?}")),
            };
            if settled.insert(key, fired).is_some() {
                return Err(format!("a job is named twice: {line:?}"));
            }
        }
        Ok((since, settled))
    }
}

/// The scheduler's memory between ticks: the ledger and the retry backoff.
#[derive(Debug)]
pub struct Catchup {
    /// Settled firings.
    pub ledger: Ledger,
    /// Retries of failed ones.
    pub backoff: Backoff,
}

impl Catchup {
    /// Of `jobs` (this node's jobs now, [`JobKey`] by `key`), those to run now for the
    /// firing at `latest`: the ones that owe it and are not waiting out a backoff; and the
    /// keys of every job that owes it (run now or later: [`Catchup::owes_any`]).
    pub fn due<J>(&mut self, jobs: Vec<J>, key: impl Fn(&J) -> JobKey, latest: i64, now: i64) -> (Vec<J>, Vec<JobKey>) {
        self.ledger.forget_the_future(latest);
        let owing: Vec<J> = jobs.into_iter().filter(|job| self.ledger.owes(&key(job), latest)).collect();
        let keys = owing.iter().map(&key).collect();
        let due = owing.into_iter().filter(|job| self.backoff.ready(&key(job), latest, now)).collect();
        (due, keys)
    }

    /// Whether any of `keys` still owes the firing at `latest`.
    pub fn owes_any(&self, keys: &[JobKey], latest: i64) -> bool {
        keys.iter().any(|key| self.ledger.owes(key, latest))
    }

    /// Records how the jobs run for the firing at `latest` fared, and writes the ledger
    /// if it changed.
    pub fn record(&mut self, outcomes: Vec<(JobKey, Outcome)>, latest: i64, now: i64) {
        for (key, outcome) in outcomes {
            match outcome {
                Outcome::Settled => {
                    self.ledger.settle(&key, latest);
                    self.backoff.settled(&key);
                }
                Outcome::Failed => self.backoff.failed(&key, latest, now),
                Outcome::Waiting => {}
            }
        }
        self.ledger.store_if_changed();
    }
}

/// When a job whose snapshot failed may be tried again: 1, 2, 4, … minutes after each
/// failure, at most [`Backoff::MAX_DELAY_S`] apart, so a persistent failure (a full disk) is
/// retried a few times an hour rather than every tick. Forgotten when the job settles or a
/// newer firing comes (which is tried at once).
#[derive(Debug, Default)]
pub struct Backoff {
    /// Per job: (the firing, failures so far, not before).
    failed: HashMap<JobKey, (i64, u32, i64)>,
}

impl Backoff {
    /// The longest wait between two tries, in seconds.
    pub const MAX_DELAY_S: i64 = 30 * 60;

    /// Whether `key`'s firing `fired` may be tried at `now`.
    pub fn ready(&self, key: &JobKey, fired: i64, now: i64) -> bool {
        match self.failed.get(key) {
            Some(&(at, _, not_before)) if at == fired => now >= not_before,
            _ => true,
        }
    }

    /// Records a failure of `key`'s firing `fired` at `now`.
    pub fn failed(&mut self, key: &JobKey, fired: i64, now: i64) {
        let failures = match self.failed.get(key) {
            Some(&(at, failures, _)) if at == fired => failures.saturating_add(1),
            _ => 1,
        };
        let delay = (60i64 << (failures - 1).min(10)).min(Self::MAX_DELAY_S);
        self.failed.insert(key.clone(), (fired, failures, now.saturating_add(delay)));
    }

    /// Forgets `key` (it settled).
    pub fn settled(&mut self, key: &JobKey) {
        self.failed.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> JobKey {
        JobKey::Volume(name.to_owned())
    }

    #[test]
    fn a_fresh_ledger_owes_nothing_until_the_next_firing_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("schedule.ledger");
        let mut ledger = Ledger::open(&path, 1000);
        assert!(path.exists(), "a fresh ledger is written at once");
        assert!(!ledger.owes(&key("db"), 1000));
        assert!(ledger.owes(&key("db"), 1060), "the next firing is owed until settled");
        ledger.settle(&key("db"), 1060);
        ledger.settle(&JobKey::Group("tenant a".into()), 1060);
        ledger.settle(&key("db"), 1000); // older: ignored
        ledger.store_if_changed();
        let reopened = Ledger::open(&path, 5000);
        assert_eq!(reopened.settled(&key("db")), 1060);
        assert_eq!(reopened.settled(&JobKey::Group("tenant a".into())), 1060);
        assert!(!reopened.owes(&key("db"), 1060));
        assert!(reopened.owes(&key("db"), 1120), "a firing missed while down is owed after the restart");
        assert_eq!(reopened.settled(&key("files")), 1000, "a job it never settled owes from `since`");
        assert_ne!(reopened.settled(&JobKey::Group("db".into())), 1060, "groups and volumes are apart");
    }

    #[test]
    fn a_damaged_ledger_is_refused_and_replaced_by_a_fresh_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("schedule.ledger");
        let mut ledger = Ledger::open(&path, 1000);
        ledger.settle(&key("db"), 1060);
        ledger.store_if_changed();
        let good = std::fs::read(&path).unwrap();
        assert!(Ledger::decode(&good).is_ok());
        // Every single-byte change and every truncation is detected.
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x01;
            assert!(Ledger::decode(&bad).is_err(), "flip at {i} accepted");
            assert!(Ledger::decode(&good[..i]).is_err(), "truncation to {i} accepted");
        }
        // A newer version is refused by name.
        let newer = String::from_utf8(good.clone()).unwrap().replace("ledger 1\n", "ledger 2\n");
        let body_len = newer.trim_end().rfind('\n').unwrap() + 1;
        let resealed = format!("{}crc32 {:08x}\n", &newer[..body_len], crc32fast::hash(&newer.as_bytes()[..body_len]));
        assert!(Ledger::decode(resealed.as_bytes()).unwrap_err().contains("version 2"));
        std::fs::write(&path, b"garbage").unwrap();
        let fresh = Ledger::open(&path, 2000);
        assert_eq!(fresh.settled(&key("db")), 2000, "a damaged file starts fresh at the latest firing");
        assert!(Ledger::decode(&std::fs::read(&path).unwrap()).is_ok(), "and is replaced");
    }

    #[test]
    fn a_failed_job_stays_owed_through_its_backoff_and_is_tried_again_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = Catchup { ledger: Ledger::open(&dir.path().join("l"), 1000), backoff: Backoff::default() };
        let jobs = || vec!["db".to_string(), "files".to_string()];
        let key = |name: &String| JobKey::Volume(name.clone());
        let owed = |state: &mut Catchup, latest: i64, now: i64| {
            let (due, keys) = state.due(jobs(), key, latest, now);
            (due, state.owes_any(&keys, latest))
        };
        let (due, keys) = state.due(jobs(), key, 1060, 1060);
        assert_eq!((due.len(), keys.len()), (2, 2));
        state.record(vec![(key(&due[0]), Outcome::Settled), (key(&due[1]), Outcome::Failed)], 1060, 1061);
        // Inside the backoff: nothing to run, but the firing is still owed.
        assert_eq!(owed(&mut state, 1060, 1100), (vec![], true));
        // After it: tried again; a second failure waits longer, and is still owed.
        assert_eq!(owed(&mut state, 1060, 1121), (vec!["files".to_string()], true));
        state.record(vec![(JobKey::Volume("files".into()), Outcome::Failed)], 1060, 1121);
        assert_eq!(owed(&mut state, 1060, 1200), (vec![], true));
        assert_eq!(owed(&mut state, 1060, 1241).0, vec!["files".to_string()]);
        // Waiting (a standby whose primary is gone) is looked at every tick.
        state.record(vec![(JobKey::Volume("files".into()), Outcome::Settled)], 1060, 1241);
        assert_eq!(owed(&mut state, 1060, 1242), (vec![], false), "all settled");
        let (due, _) = state.due(jobs(), key, 1120, 1242);
        state.record(due.iter().map(|d| (key(d), Outcome::Waiting)).collect(), 1120, 1242);
        assert_eq!(owed(&mut state, 1120, 1243).0.len(), 2);
    }

    #[test]
    fn firings_settled_while_the_clock_ran_ahead_do_not_stop_the_schedule() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l");
        let mut state = Catchup { ledger: Ledger::open(&path, 1000), backoff: Backoff::default() };
        let key = |name: &&str| JobKey::Volume((*name).to_owned());
        // The clock jumped a year ahead: the firing then is taken and settled.
        let ahead = 1000 + 365 * 86_400;
        let (due, _) = state.due(vec!["db"], key, ahead, ahead);
        state.record(due.iter().map(|d| (key(d), Outcome::Settled)).collect(), ahead, ahead);
        // Back to the right time (and after a restart): the next firing is owed again.
        let mut state = Catchup { ledger: Ledger::open(&path, 1060), backoff: Backoff::default() };
        assert!(state.due(vec!["db"], key, 1060, 1060).0.is_empty(), "the latest firing counts as settled");
        assert_eq!(state.due(vec!["db"], key, 1120, 1120).0, vec!["db"]);
    }

    #[test]
    fn a_failed_firing_waits_longer_after_each_failure_and_a_new_firing_goes_at_once() {
        let mut backoff = Backoff::default();
        let k = key("db");
        assert!(backoff.ready(&k, 1000, 1000));
        backoff.failed(&k, 1000, 1000);
        assert!(!backoff.ready(&k, 1000, 1059));
        assert!(backoff.ready(&k, 1000, 1060));
        backoff.failed(&k, 1000, 1060);
        assert!(!backoff.ready(&k, 1000, 1060 + 119));
        assert!(backoff.ready(&k, 1000, 1060 + 120));
        for _ in 0..20 {
            backoff.failed(&k, 1000, 5000);
        }
        assert!(!backoff.ready(&k, 1000, 5000 + Backoff::MAX_DELAY_S - 1));
        assert!(backoff.ready(&k, 1000, 5000 + Backoff::MAX_DELAY_S), "capped");
        assert!(backoff.ready(&k, 2000, 5001), "a newer firing is tried at once");
        backoff.settled(&k);
        assert!(backoff.ready(&k, 1000, 5001));
    }
}
