//! Which snapshots to keep: restic-style `keep-*` rules, evaluated in a time zone.
//!
//! [`RetentionPolicy::apply`] is pure: given the snapshots of one volume, `now` and a
//! [`TimeZone`], it returns one [`Decision`] per snapshot with every reason that keeps it. The
//! caller deletes the rest. docs/retention.md has a worked example.
//!
//! # The rules
//!
//! Snapshots are ordered newest first (ties on time: the greater id counts as newer). The
//! *eligible* snapshots are the complete ones whose time is not after `now`; the rules below
//! count only those.
//!
//! 1. **Protected** snapshots are kept, whatever else applies.
//! 2. **Future** snapshots (time after `now`: clock skew, or a forged timestamp) are kept and
//!    not counted, so they cannot push real snapshots out of a bucket.
//! 3. **In progress**: if the newest non-future snapshot is incomplete, it is kept (it may still
//!    be being written). Other incomplete snapshots are removed unless protected.
//! 4. **Newest**: the newest eligible snapshot is always kept.
//! 5. **keep-hourly/daily/weekly/monthly/yearly N**: walking eligible snapshots newest first,
//!    the first snapshot seen in each new bucket (local hour, local day, ISO week, month, year in
//!    the zone) is kept, until N distinct buckets have one. As in restic ≥ 0.16, if the walk
//!    reaches the oldest eligible snapshot with buckets to spare, the oldest is kept too
//!    ([`Keep::Oldest`]), so a young volume keeps its full history.
//! 6. **keep-last N**: the N newest eligible snapshots.
//! 7. **keep-within D**: eligible snapshots with time > `now - D`.
//!
//! Unlike restic, which compares each snapshot's bucket with the previous one only, buckets
//! are counted as a set: in zones that fall back across midnight a local day occurs twice,
//! and must still count once. Unlike restic, `keep-within` is relative to `now`, not to the
//! newest snapshot; rule 4 keeps a stalled volume from losing its last snapshot.
//!
//! A policy that keeps nothing (every count zero, no `keep-within`) cannot be constructed.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use crate::schedule::{format_duration, parse_duration_seconds, BareM};
use crate::tz::{Date, IsoWeek, LocalDateTime, TimeZone};

/// The rules of a retention policy, as written in the `[retention]` table of the config:
///
/// ```toml
/// [retention]
/// keep_last = 3
/// keep_daily = 7
/// keep_within = "14d"   # s, min, h, d, w; sums like "1d12h"
/// ```
///
/// Absent keys are zero (or no `keep_within`); unknown keys are an error. Turn it into a
/// [`RetentionPolicy`] with [`RetentionPolicy::new`], which rejects a policy that keeps
/// nothing; or deserialize a `RetentionPolicy` directly.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionConfig {
    /// Keep the N newest snapshots.
    pub keep_last: u32,
    /// Keep the newest snapshot of each of the N newest local hours that have one.
    pub keep_hourly: u32,
    /// Keep the newest snapshot of each of the N newest local days that have one.
    pub keep_daily: u32,
    /// Keep the newest snapshot of each of the N newest ISO weeks that have one.
    pub keep_weekly: u32,
    /// Keep the newest snapshot of each of the N newest months that have one.
    pub keep_monthly: u32,
    /// Keep the newest snapshot of each of the N newest years that have one.
    pub keep_yearly: u32,
    /// Keep every snapshot newer than `now` minus this (whole seconds; at least one).
    #[serde(deserialize_with = "deserialize_keep_within")]
    pub keep_within: Option<Duration>,
}

/// A validated retention policy: one that keeps at least something.
///
/// Parse one from `keep-last=3,keep-daily=7,keep-within=2d` (keys also with `_`; the same
/// duration syntax as [`RetentionConfig::keep_within`]), deserialize it from the `[retention]`
/// table, or build one from a [`RetentionConfig`]. `Display` gives the string form back.
///
/// ```
/// use keel_snapshot::{RetentionPolicy, SnapshotInfo, TimeZone};
///
/// let policy: RetentionPolicy = "keep-last=1,keep-daily=2".parse()?;
/// let snapshot = |id, time| SnapshotInfo { id, time, protected: false, complete: true };
/// let snapshots = [snapshot("a", 1_000), snapshot("b", 90_000), snapshot("c", 90_060)];
/// let decisions = policy.apply(&snapshots, 100_000, &TimeZone::utc());
/// let kept: Vec<&str> = decisions.iter().filter(|d| d.keep).map(|d| d.id).collect();
/// assert_eq!(kept, ["c", "a"]); // c: newest, last 1, daily; b: same day as c; a: daily
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Invariants
///
/// - Some count is non-zero, or `keep_within` is at least one second.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "RetentionConfig")]
pub struct RetentionPolicy {
    config: RetentionConfig,
}

/// One snapshot as retention sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SnapshotInfo<'a> {
    /// The snapshot's id (ties on `time` are broken by it).
    pub id: &'a str,
    /// When the snapshot was taken, Unix seconds (UTC).
    pub time: i64,
    /// Protected snapshots are never removed.
    pub protected: bool,
    /// Whether the snapshot finished. Incomplete snapshots fill no bucket.
    pub complete: bool,
}

/// What to do with one snapshot, and why.
///
/// `Display` gives one line: `keep   2026-11-30 07:00 snap-x  (daily 2026-11-30, last 3)` or
/// `remove 2026-11-01 15:00 snap-y` (local time in the zone given to `apply`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision<'a> {
    /// The snapshot's id.
    pub id: &'a str,
    /// The snapshot's time, Unix seconds.
    pub time: i64,
    /// The snapshot's time on the zone's wall clock.
    pub local_time: LocalDateTime,
    /// Whether to keep it: exactly when `reasons` is non-empty.
    pub keep: bool,
    /// Every rule that keeps it, in rule order.
    pub reasons: Vec<Keep>,
}

/// A reason to keep a snapshot. Bucketed reasons carry their bucket, in local time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum Keep {
    /// The snapshot is protected.
    Protected,
    /// The snapshot's time is after `now`; it is kept and not counted.
    Future,
    /// The newest snapshot is incomplete and may still be being written.
    InProgress,
    /// The newest complete snapshot, kept whatever the policy.
    Newest,
    /// Newest of this local hour (keep-hourly).
    Hourly {
        /// The local date.
        date: Date,
        /// The local hour, 0..=23.
        hour: u8,
    },
    /// Newest of this local day (keep-daily).
    Daily(Date),
    /// Newest of this ISO week (keep-weekly).
    Weekly(IsoWeek),
    /// Newest of this month (keep-monthly).
    Monthly {
        /// The year.
        year: i32,
        /// 1..=12.
        month: u8,
    },
    /// Newest of this year (keep-yearly).
    Yearly(i32),
    /// The oldest snapshot, kept because this rule had buckets to spare (restic's "oldest").
    Oldest(Period),
    /// Among the keep-last newest; `rank` 1 is the newest.
    Last {
        /// 1-based position, newest first, among complete snapshots.
        rank: u32,
    },
    /// Newer than `now - keep_within`.
    Within,
}

/// The calendar unit of a bucketed rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Period {
    /// keep-hourly.
    Hourly,
    /// keep-daily.
    Daily,
    /// keep-weekly (ISO weeks, Monday to Sunday).
    Weekly,
    /// keep-monthly.
    Monthly,
    /// keep-yearly.
    Yearly,
}

/// Why a retention policy was rejected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RetentionError {
    /// Every count is zero and there is no `keep-within`: the policy would delete every
    /// snapshot but the newest.
    #[error(
        "retention policy keeps nothing: set at least one of keep-last, keep-hourly, keep-daily, keep-weekly, \
         keep-monthly, keep-yearly or keep-within (refusing to delete every snapshot)"
    )]
    KeepsNothing,
    /// `keep_within` is shorter than one second.
    #[error("retention keep_within must be at least 1s")]
    ZeroKeepWithin,
    /// A token of a policy string or of the `keep_within` setting is malformed.
    #[error("retention policy {policy:?}: bad token {token:?}: {reason}")]
    InvalidToken {
        /// The whole policy (or setting) as given.
        policy: String,
        /// The offending token.
        token: String,
        /// What was expected instead.
        reason: &'static str,
    },
}

impl RetentionPolicy {
    /// Validates `config`: it must keep something.
    pub fn new(config: RetentionConfig) -> Result<Self, RetentionError> {
        if config.keep_within.is_some_and(|within| within.as_secs() == 0) {
            return Err(RetentionError::ZeroKeepWithin);
        }
        let counts = [
            config.keep_last,
            config.keep_hourly,
            config.keep_daily,
            config.keep_weekly,
            config.keep_monthly,
            config.keep_yearly,
        ];
        if counts.iter().all(|&count| count == 0) && config.keep_within.is_none() {
            return Err(RetentionError::KeepsNothing);
        }
        Ok(RetentionPolicy { config })
    }

    /// The rules.
    pub fn config(&self) -> &RetentionConfig {
        &self.config
    }

    /// Decides, for each snapshot, whether to keep it and why (the module docs list the
    /// rules). Buckets use local time in `tz`; `keep-within` counts back from `now`.
    ///
    /// Returns one decision per input snapshot, newest first. The result does not depend on
    /// the order of `snapshots`, never removes a protected snapshot, and keeps at least one
    /// snapshot whenever there is one.
    pub fn apply<'a>(&self, snapshots: &[SnapshotInfo<'a>], now: i64, tz: &TimeZone) -> Vec<Decision<'a>> {
        let mut ordered: Vec<SnapshotInfo<'a>> = snapshots.to_vec();
        ordered.sort_unstable_by(|a, b| newest_first_key(b).cmp(&newest_first_key(a)));

        let mut decisions: Vec<Decision<'a>> = ordered
            .iter()
            .map(|snapshot| Decision {
                id: snapshot.id,
                time: snapshot.time,
                local_time: tz.to_local(snapshot.time),
                keep: false,
                reasons: Vec::new(),
            })
            .collect();

        for (decision, snapshot) in decisions.iter_mut().zip(&ordered) {
            if snapshot.protected {
                decision.reasons.push(Keep::Protected);
            }
            if snapshot.time > now {
                decision.reasons.push(Keep::Future);
            }
        }
        let newest_present = ordered.iter().position(|snapshot| snapshot.time <= now);
        if let Some(i) = newest_present.filter(|&i| ordered.get(i).is_some_and(|snapshot| !snapshot.complete)) {
            push_reason(&mut decisions, i, Keep::InProgress);
        }

        // Indices into `ordered` of the snapshots the rules count, newest first.
        let eligible: Vec<usize> = (0..ordered.len())
            .filter(|&i| ordered.get(i).is_some_and(|snapshot| snapshot.complete && snapshot.time <= now))
            .collect();
        if let Some(&newest) = eligible.first() {
            push_reason(&mut decisions, newest, Keep::Newest);
        }

        let config = &self.config;
        let bucket_rules = [
            (Period::Hourly, config.keep_hourly),
            (Period::Daily, config.keep_daily),
            (Period::Weekly, config.keep_weekly),
            (Period::Monthly, config.keep_monthly),
            (Period::Yearly, config.keep_yearly),
        ];
        for (period, count) in bucket_rules {
            let count = count as usize;
            if count == 0 {
                continue;
            }
            let mut buckets_seen = BTreeSet::new();
            for (position, &i) in eligible.iter().enumerate() {
                if buckets_seen.len() >= count {
                    break;
                }
                let Some(local_time) = decisions.get(i).map(|decision| decision.local_time) else { continue };
                let bucket = period.bucket(local_time);
                if buckets_seen.insert(bucket) {
                    push_reason(&mut decisions, i, bucket);
                } else if position + 1 == eligible.len() {
                    push_reason(&mut decisions, i, Keep::Oldest(period));
                }
            }
        }

        for (rank, &i) in eligible.iter().take(config.keep_last as usize).enumerate() {
            push_reason(&mut decisions, i, Keep::Last { rank: rank as u32 + 1 });
        }

        if let Some(within) = config.keep_within {
            let within_seconds = i64::try_from(within.as_secs()).unwrap_or(i64::MAX);
            let cutoff = now.saturating_sub(within_seconds);
            for &i in &eligible {
                if ordered.get(i).is_some_and(|snapshot| snapshot.time > cutoff) {
                    push_reason(&mut decisions, i, Keep::Within);
                }
            }
        }

        for decision in &mut decisions {
            decision.keep = !decision.reasons.is_empty();
        }
        debug_assert!(decisions.is_empty() || decisions.iter().any(|decision| decision.keep));
        decisions
    }
}

/// Newest-first order is descending on this key: time, then id, then the flags (so that even
/// duplicate ids order the same whatever the input order).
fn newest_first_key<'a>(snapshot: &SnapshotInfo<'a>) -> (i64, &'a str, bool, bool) {
    (snapshot.time, snapshot.id, snapshot.complete, snapshot.protected)
}

fn push_reason(decisions: &mut [Decision<'_>], index: usize, reason: Keep) {
    if let Some(decision) = decisions.get_mut(index) {
        decision.reasons.push(reason);
    }
}

impl Period {
    /// The bucket (as the reason it gives) that a snapshot at `local_time` falls in.
    fn bucket(self, local_time: LocalDateTime) -> Keep {
        let date = local_time.date;
        match self {
            Period::Hourly => Keep::Hourly { date, hour: local_time.hour },
            Period::Daily => Keep::Daily(date),
            Period::Weekly => Keep::Weekly(date.iso_week()),
            Period::Monthly => Keep::Monthly { year: date.year, month: date.month },
            Period::Yearly => Keep::Yearly(date.year),
        }
    }
}

impl TryFrom<RetentionConfig> for RetentionPolicy {
    type Error = RetentionError;

    fn try_from(config: RetentionConfig) -> Result<Self, Self::Error> {
        RetentionPolicy::new(config)
    }
}

const UNKNOWN_RULE: &str = "unknown rule: expected keep-last, keep-hourly, keep-daily, keep-weekly, keep-monthly, \
                            keep-yearly or keep-within";

impl FromStr for RetentionPolicy {
    type Err = RetentionError;

    /// `keep-last=3,keep-daily=7,keep-within=2d`: comma-separated `key=value`, each key at
    /// most once; keys may use `_` for `-`.
    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let bad = |token: &str, reason| RetentionError::InvalidToken {
            policy: input.to_owned(),
            token: token.to_owned(),
            reason,
        };
        let mut config = RetentionConfig::default();
        let mut keys_seen = BTreeSet::new();
        for item in input.split(',').map(str::trim) {
            let (key, value) =
                item.split_once('=').ok_or_else(|| bad(item, "expected key=value, e.g. keep-daily=7"))?;
            let (key, value) = (key.trim(), value.trim());
            let normalized = key.replace('_', "-").to_ascii_lowercase();
            let count_slot = match normalized.as_str() {
                "keep-last" => Some(&mut config.keep_last),
                "keep-hourly" => Some(&mut config.keep_hourly),
                "keep-daily" => Some(&mut config.keep_daily),
                "keep-weekly" => Some(&mut config.keep_weekly),
                "keep-monthly" => Some(&mut config.keep_monthly),
                "keep-yearly" => Some(&mut config.keep_yearly),
                "keep-within" => None,
                _ => return Err(bad(key, UNKNOWN_RULE)),
            };
            if !keys_seen.insert(normalized.clone()) {
                return Err(bad(key, "rule given twice"));
            }
            match count_slot {
                Some(slot) => {
                    let all_digits = !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit());
                    *slot = value
                        .parse()
                        .ok()
                        .filter(|_| all_digits)
                        .ok_or_else(|| bad(value, "expected a count 0..=4294967295"))?;
                }
                None => config.keep_within = Some(parse_keep_within(value).map_err(|reason| bad(value, reason))?),
            }
        }
        RetentionPolicy::new(config)
    }
}

/// The string form, which parses back to an equal policy: `keep-last=3,keep-within=14d`.
impl fmt::Display for RetentionPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let config = &self.config;
        let counts = [
            ("keep-last", config.keep_last),
            ("keep-hourly", config.keep_hourly),
            ("keep-daily", config.keep_daily),
            ("keep-weekly", config.keep_weekly),
            ("keep-monthly", config.keep_monthly),
            ("keep-yearly", config.keep_yearly),
        ];
        let mut separator = "";
        for (key, count) in counts.into_iter().filter(|&(_, count)| count != 0) {
            write!(f, "{separator}{key}={count}")?;
            separator = ",";
        }
        if let Some(within) = config.keep_within {
            let seconds = i64::try_from(within.as_secs()).unwrap_or(i64::MAX);
            write!(f, "{separator}keep-within={}", format_duration(seconds, "min"))?;
        }
        Ok(())
    }
}

/// `keep   2026-11-30 07:00 snap-x  (daily 2026-11-30, last 3)`.
impl fmt::Display for Decision<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.keep { "keep" } else { "remove" };
        let LocalDateTime { date, hour, minute, .. } = self.local_time;
        write!(f, "{verdict:<6} {date} {hour:02}:{minute:02} {}", self.id)?;
        for (i, reason) in self.reasons.iter().enumerate() {
            let separator = if i == 0 { "  (" } else { ", " };
            write!(f, "{separator}{reason}")?;
        }
        if !self.reasons.is_empty() {
            f.write_str(")")?;
        }
        Ok(())
    }
}

impl fmt::Display for Keep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Keep::Protected => f.write_str("protected"),
            Keep::Future => f.write_str("future"),
            Keep::InProgress => f.write_str("in progress"),
            Keep::Newest => f.write_str("newest"),
            Keep::Hourly { date, hour } => write!(f, "hourly {date} {hour:02}h"),
            Keep::Daily(date) => write!(f, "daily {date}"),
            Keep::Weekly(week) => write!(f, "weekly {week}"),
            Keep::Monthly { year, month } => write!(f, "monthly {year:04}-{month:02}"),
            Keep::Yearly(year) => write!(f, "yearly {year:04}"),
            Keep::Oldest(period) => write!(f, "oldest {period}"),
            Keep::Last { rank } => write!(f, "last {rank}"),
            Keep::Within => f.write_str("within"),
        }
    }
}

impl fmt::Display for Period {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Period::Hourly => "hourly",
            Period::Daily => "daily",
            Period::Weekly => "weekly",
            Period::Monthly => "monthly",
            Period::Yearly => "yearly",
        })
    }
}

/// A `keep-within` duration: s, min, h, d, w (sums like `1d12h`), at least 1s. A bare `m` is
/// refused: restic reads `3m` as three months, and reading it as minutes would delete history.
fn parse_keep_within(token: &str) -> Result<Duration, &'static str> {
    let seconds = parse_duration_seconds(token, BareM::Refuse)?;
    let seconds =
        u64::try_from(seconds).ok().filter(|&seconds| seconds > 0).ok_or("keep-within must be at least 1s")?;
    Ok(Duration::from_secs(seconds))
}

fn deserialize_keep_within<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<Duration>, D::Error> {
    let text: Option<String> = serde::Deserialize::deserialize(deserializer)?;
    text.map(|text| {
        parse_keep_within(&text).map_err(|reason| {
            serde::de::Error::custom(RetentionError::InvalidToken {
                policy: "keep_within".to_owned(),
                token: text,
                reason,
            })
        })
    })
    .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tz::days_from_civil;
    use proptest::prelude::*;

    /// `"2026-03-29 01:00"` read as UTC, to Unix seconds.
    fn utc(text: &str) -> i64 {
        let number = |range: std::ops::Range<usize>| text[range].parse::<i64>().unwrap();
        let days = days_from_civil(number(0..4), number(5..7) as u32, number(8..10) as u32);
        days * 86_400 + number(11..13) * 3_600 + number(14..16) * 60
    }

    fn berlin() -> TimeZone {
        TimeZone::posix("CET-1CEST,M3.5.0,M10.5.0/3").unwrap()
    }

    /// A complete, unprotected snapshot at `at` (UTC).
    fn snap(id: &'static str, at: &str) -> SnapshotInfo<'static> {
        SnapshotInfo { id, time: utc(at), protected: false, complete: true }
    }

    fn protected(snapshot: SnapshotInfo<'static>) -> SnapshotInfo<'static> {
        SnapshotInfo { protected: true, ..snapshot }
    }

    fn incomplete(snapshot: SnapshotInfo<'static>) -> SnapshotInfo<'static> {
        SnapshotInfo { complete: false, ..snapshot }
    }

    struct Case {
        name: &'static str,
        policy: &'static str,
        tz: TimeZone,
        now: &'static str,
        snapshots: Vec<SnapshotInfo<'static>>,
        /// `Display` of each decision, newest first.
        expected: &'static [&'static str],
    }

    fn check(case: &Case) {
        let policy: RetentionPolicy = case.policy.parse().unwrap();
        let decisions = policy.apply(&case.snapshots, utc(case.now), &case.tz);
        let lines: Vec<String> = decisions.iter().map(ToString::to_string).collect();
        assert_eq!(lines, case.expected, "{}", case.name);
        let mut reversed = case.snapshots.clone();
        reversed.reverse();
        assert_eq!(policy.apply(&reversed, utc(case.now), &case.tz), decisions, "{}: input order", case.name);
    }

    #[test]
    fn each_rule_keeps_what_restic_would() {
        let utc_zone = TimeZone::utc;
        let cases = vec![
            Case {
                name: "keep-last keeps the N newest",
                policy: "keep-last=2",
                tz: utc_zone(),
                now: "2026-12-01 00:00",
                snapshots: vec![
                    snap("a", "2026-11-28 07:00"),
                    snap("b", "2026-11-29 07:00"),
                    snap("c", "2026-11-30 07:00"),
                    snap("d", "2026-11-30 15:00"),
                ],
                expected: &[
                    "keep   2026-11-30 15:00 d  (newest, last 1)",
                    "keep   2026-11-30 07:00 c  (last 2)",
                    "remove 2026-11-29 07:00 b",
                    "remove 2026-11-28 07:00 a",
                ],
            },
            Case {
                name: "keep-hourly keeps the newest of each of the N newest hours",
                policy: "keep-hourly=2",
                tz: utc_zone(),
                now: "2026-12-01 00:00",
                snapshots: vec![
                    snap("h1a", "2026-11-30 10:05"),
                    snap("h1b", "2026-11-30 10:40"),
                    snap("h2a", "2026-11-30 11:10"),
                    snap("h2b", "2026-11-30 11:50"),
                    snap("h3", "2026-11-30 12:30"),
                ],
                expected: &[
                    "keep   2026-11-30 12:30 h3  (newest, hourly 2026-11-30 12h)",
                    "keep   2026-11-30 11:50 h2b  (hourly 2026-11-30 11h)",
                    "remove 2026-11-30 11:10 h2a",
                    "remove 2026-11-30 10:40 h1b",
                    "remove 2026-11-30 10:05 h1a",
                ],
            },
            Case {
                name: "keep-daily buckets by the local date (x2 is the 28th in UTC, the 29th in Berlin)",
                policy: "keep-daily=3",
                tz: berlin(),
                now: "2026-12-01 00:00",
                snapshots: vec![
                    snap("x1", "2026-11-28 12:00"),
                    snap("x2", "2026-11-28 23:30"),
                    snap("x3", "2026-11-29 22:59"),
                    snap("x4", "2026-11-29 23:00"),
                ],
                expected: &[
                    "keep   2026-11-30 00:00 x4  (newest, daily 2026-11-30)",
                    "keep   2026-11-29 23:59 x3  (daily 2026-11-29)",
                    "remove 2026-11-29 00:30 x2",
                    "keep   2026-11-28 13:00 x1  (daily 2026-11-28)",
                ],
            },
            Case {
                name: "the same snapshots in UTC: two days only, so the oldest is kept too",
                policy: "keep-daily=3",
                tz: utc_zone(),
                now: "2026-12-01 00:00",
                snapshots: vec![
                    snap("x1", "2026-11-28 12:00"),
                    snap("x2", "2026-11-28 23:30"),
                    snap("x3", "2026-11-29 22:59"),
                    snap("x4", "2026-11-29 23:00"),
                ],
                expected: &[
                    "keep   2026-11-29 23:00 x4  (newest, daily 2026-11-29)",
                    "remove 2026-11-29 22:59 x3",
                    "keep   2026-11-28 23:30 x2  (daily 2026-11-28)",
                    "keep   2026-11-28 12:00 x1  (oldest daily)",
                ],
            },
            Case {
                name: "keep-daily on the 23-hour day when Berlin springs forward",
                policy: "keep-daily=2",
                tz: berlin(),
                now: "2026-03-31 00:00",
                snapshots: vec![
                    snap("s1", "2026-03-28 22:30"),
                    snap("s2", "2026-03-28 23:30"),
                    snap("s3", "2026-03-29 21:30"),
                    snap("s4", "2026-03-29 22:30"),
                ],
                expected: &[
                    "keep   2026-03-30 00:30 s4  (newest, daily 2026-03-30)",
                    "keep   2026-03-29 23:30 s3  (daily 2026-03-29)",
                    "remove 2026-03-29 00:30 s2",
                    "remove 2026-03-28 23:30 s1",
                ],
            },
            Case {
                name: "keep-hourly: the hour that repeats when Berlin falls back is one bucket",
                policy: "keep-hourly=3",
                tz: berlin(),
                now: "2026-10-26 00:00",
                snapshots: vec![
                    snap("o1", "2026-10-25 00:10"), // 02:10 CEST
                    snap("o2", "2026-10-25 00:50"), // 02:50 CEST
                    snap("o3", "2026-10-25 01:10"), // 02:10 CET
                    snap("o4", "2026-10-25 01:50"), // 02:50 CET
                    snap("o5", "2026-10-25 02:10"), // 03:10 CET
                ],
                expected: &[
                    "keep   2026-10-25 03:10 o5  (newest, hourly 2026-10-25 03h)",
                    "keep   2026-10-25 02:50 o4  (hourly 2026-10-25 02h)",
                    "remove 2026-10-25 02:10 o3",
                    "remove 2026-10-25 02:50 o2",
                    "keep   2026-10-25 02:10 o1  (oldest hourly)",
                ],
            },
            Case {
                name: "keep-hourly: across the spring-forward gap 01:59 CET and 03:00 CEST are two hours",
                policy: "keep-hourly=2",
                tz: berlin(),
                now: "2026-03-30 00:00",
                snapshots: vec![
                    snap("g0", "2026-03-29 00:30"),
                    snap("g1", "2026-03-29 00:59"),
                    snap("g2", "2026-03-29 01:00"),
                ],
                expected: &[
                    "keep   2026-03-29 03:00 g2  (newest, hourly 2026-03-29 03h)",
                    "keep   2026-03-29 01:59 g1  (hourly 2026-03-29 01h)",
                    "remove 2026-03-29 01:30 g0",
                ],
            },
            Case {
                name: "keep-weekly uses ISO weeks: 2026 has a week 53 that runs into 2027",
                policy: "keep-weekly=3",
                tz: utc_zone(),
                now: "2027-01-05 00:00",
                snapshots: vec![
                    snap("w1", "2026-12-27 12:00"), // Sunday, W52
                    snap("w2", "2026-12-28 12:00"), // Monday, W53
                    snap("w3", "2026-12-31 12:00"),
                    snap("w4", "2027-01-03 12:00"), // Sunday, still 2026-W53
                    snap("w5", "2027-01-04 12:00"), // Monday, 2027-W01
                ],
                expected: &[
                    "keep   2027-01-04 12:00 w5  (newest, weekly 2027-W01)",
                    "keep   2027-01-03 12:00 w4  (weekly 2026-W53)",
                    "remove 2026-12-31 12:00 w3",
                    "remove 2026-12-28 12:00 w2",
                    "keep   2026-12-27 12:00 w1  (weekly 2026-W52)",
                ],
            },
            Case {
                name: "keep-monthly and keep-yearly across New Year in UTC",
                policy: "keep-monthly=2,keep-yearly=2",
                tz: utc_zone(),
                now: "2026-02-01 00:00",
                snapshots: vec![
                    snap("m1", "2025-11-15 12:00"),
                    snap("m2", "2025-12-31 23:00"),
                    snap("m3", "2026-01-01 00:30"),
                    snap("m4", "2026-01-20 12:00"),
                ],
                expected: &[
                    "keep   2026-01-20 12:00 m4  (newest, monthly 2026-01, yearly 2026)",
                    "remove 2026-01-01 00:30 m3",
                    "keep   2025-12-31 23:00 m2  (monthly 2025-12, yearly 2025)",
                    "remove 2025-11-15 12:00 m1",
                ],
            },
            Case {
                name: "the same in Berlin: 2025-12-31 23:00 UTC is already 2026 there",
                policy: "keep-monthly=2,keep-yearly=2",
                tz: berlin(),
                now: "2026-02-01 00:00",
                snapshots: vec![
                    snap("m1", "2025-11-15 12:00"),
                    snap("m2", "2025-12-31 23:00"),
                    snap("m3", "2026-01-01 00:30"),
                    snap("m4", "2026-01-20 12:00"),
                ],
                expected: &[
                    "keep   2026-01-20 13:00 m4  (newest, monthly 2026-01, yearly 2026)",
                    "remove 2026-01-01 01:30 m3",
                    "remove 2026-01-01 00:00 m2",
                    "keep   2025-11-15 13:00 m1  (monthly 2025-11, yearly 2025)",
                ],
            },
            Case {
                name: "keep-within keeps what is strictly newer than now - d",
                policy: "keep-within=2d",
                tz: utc_zone(),
                now: "2026-12-01 00:00",
                snapshots: vec![
                    snap("k1", "2026-11-28 23:59"),
                    snap("k2", "2026-11-29 00:00"),
                    snap("k3", "2026-11-29 00:01"),
                    snap("k4", "2026-11-30 12:00"),
                ],
                expected: &[
                    "keep   2026-11-30 12:00 k4  (newest, within)",
                    "keep   2026-11-29 00:01 k3  (within)",
                    "remove 2026-11-29 00:00 k2",
                    "remove 2026-11-28 23:59 k1",
                ],
            },
            Case {
                name: "keep-within: a stalled volume still keeps its newest snapshot",
                policy: "keep-within=1h",
                tz: utc_zone(),
                now: "2026-12-01 00:00",
                snapshots: vec![snap("a", "2026-01-01 00:00"), snap("b", "2026-02-01 00:00")],
                expected: &["keep   2026-02-01 00:00 b  (newest)", "remove 2026-01-01 00:00 a"],
            },
            Case {
                name: "ties on time: the greater id counts as newer",
                policy: "keep-last=1",
                tz: utc_zone(),
                now: "2026-12-01 00:00",
                snapshots: vec![snap("snap-a", "2026-11-30 07:00"), snap("snap-b", "2026-11-30 07:00")],
                expected: &["keep   2026-11-30 07:00 snap-b  (newest, last 1)", "remove 2026-11-30 07:00 snap-a"],
            },
            Case {
                name: "protected, future and incomplete snapshots",
                policy: "keep-last=2",
                tz: utc_zone(),
                now: "2026-12-01 00:00",
                snapshots: vec![
                    snap("f1", "2026-12-02 00:00"),
                    incomplete(snap("i1", "2026-11-30 20:00")),
                    snap("c1", "2026-11-30 15:00"),
                    incomplete(snap("i2", "2026-11-30 10:00")),
                    snap("c2", "2026-11-30 07:00"),
                    snap("c3", "2026-11-29 07:00"),
                    protected(snap("p1", "2026-01-01 07:00")),
                ],
                expected: &[
                    "keep   2026-12-02 00:00 f1  (future)",
                    "keep   2026-11-30 20:00 i1  (in progress)",
                    "keep   2026-11-30 15:00 c1  (newest, last 1)",
                    "remove 2026-11-30 10:00 i2",
                    "keep   2026-11-30 07:00 c2  (last 2)",
                    "remove 2026-11-29 07:00 c3",
                    "keep   2026-01-01 07:00 p1  (protected)",
                ],
            },
            Case {
                name: "an incomplete snapshot does not fill a daily bucket",
                policy: "keep-daily=2",
                tz: utc_zone(),
                now: "2026-12-01 00:00",
                snapshots: vec![
                    snap("c1", "2026-11-30 15:00"),
                    incomplete(snap("i1", "2026-11-29 20:00")),
                    snap("c2", "2026-11-29 07:00"),
                ],
                expected: &[
                    "keep   2026-11-30 15:00 c1  (newest, daily 2026-11-30)",
                    "remove 2026-11-29 20:00 i1",
                    "keep   2026-11-29 07:00 c2  (daily 2026-11-29)",
                ],
            },
            Case {
                name: "a protected snapshot is kept and also counts in its bucket",
                policy: "keep-daily=1",
                tz: utc_zone(),
                now: "2026-12-01 00:00",
                snapshots: vec![protected(snap("p", "2026-11-30 15:00")), snap("c", "2026-11-30 07:00")],
                expected: &[
                    "keep   2026-11-30 15:00 p  (protected, newest, daily 2026-11-30)",
                    "remove 2026-11-30 07:00 c",
                ],
            },
            Case {
                name: "only incomplete snapshots: the newest is kept",
                policy: "keep-last=1",
                tz: utc_zone(),
                now: "2026-12-01 00:00",
                snapshots: vec![incomplete(snap("i1", "2026-11-29 07:00")), incomplete(snap("i2", "2026-11-30 07:00"))],
                expected: &["keep   2026-11-30 07:00 i2  (in progress)", "remove 2026-11-29 07:00 i1"],
            },
            Case {
                name: "no snapshots, no decisions",
                policy: "keep-last=1",
                tz: utc_zone(),
                now: "2026-12-01 00:00",
                snapshots: vec![],
                expected: &[],
            },
        ];
        for case in &cases {
            check(case);
        }
    }

    /// The worked example in docs/retention.md, line for line.
    #[test]
    fn worked_example_in_the_docs() {
        check(&Case {
            name: "docs/retention.md",
            policy: "keep-last=2,keep-daily=3,keep-weekly=3",
            tz: berlin(),
            now: "2026-11-30 15:00", // 16:00 CET
            snapshots: vec![
                snap("snap-1121-15", "2026-11-21 14:00"),
                snap("snap-1122-07", "2026-11-22 06:00"),
                protected(snap("pre-upgrade", "2026-11-25 10:20")),
                snap("snap-1128-07", "2026-11-28 06:00"),
                snap("snap-1128-15", "2026-11-28 14:00"),
                snap("snap-1129-07", "2026-11-29 06:00"),
                snap("snap-1129-15", "2026-11-29 14:00"),
                snap("snap-1130-07", "2026-11-30 06:00"),
                incomplete(snap("snap-1130-15", "2026-11-30 14:00")),
            ],
            expected: &[
                "keep   2026-11-30 15:00 snap-1130-15  (in progress)",
                "keep   2026-11-30 07:00 snap-1130-07  (newest, daily 2026-11-30, weekly 2026-W49, last 1)",
                "keep   2026-11-29 15:00 snap-1129-15  (daily 2026-11-29, weekly 2026-W48, last 2)",
                "remove 2026-11-29 07:00 snap-1129-07",
                "keep   2026-11-28 15:00 snap-1128-15  (daily 2026-11-28)",
                "remove 2026-11-28 07:00 snap-1128-07",
                "keep   2026-11-25 11:20 pre-upgrade  (protected)",
                "keep   2026-11-22 07:00 snap-1122-07  (weekly 2026-W47)",
                "remove 2026-11-21 15:00 snap-1121-15",
            ],
        });
    }

    #[test]
    fn policies_parse_and_print_back() {
        let cases = [
            ("keep-last=3,keep-daily=7,keep-within=2d", "keep-last=3,keep-daily=7,keep-within=2d"),
            (" keep_last = 3 , KEEP-DAILY=7 ", "keep-last=3,keep-daily=7"),
            ("keep-within=1d12h", "keep-within=36h"),
            ("keep-within=90min", "keep-within=90min"),
            ("keep-within=8w", "keep-within=56d"),
            ("keep-within=30s", "keep-within=30s"),
            ("keep-within=92d", "keep-within=92d"),
            (
                "keep-yearly=10,keep-monthly=12,keep-weekly=4,keep-hourly=24",
                "keep-hourly=24,keep-weekly=4,keep-monthly=12,keep-yearly=10",
            ),
            ("keep-last=0,keep-daily=1", "keep-daily=1"),
        ];
        for (text, canonical) in cases {
            let policy: RetentionPolicy = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(policy.to_string(), canonical, "{text}");
            assert_eq!(canonical.parse::<RetentionPolicy>().unwrap(), policy, "{canonical} round trip");
        }
        let policy: RetentionPolicy = "keep-last=3,keep-within=14d".parse().unwrap();
        assert_eq!(
            policy.config(),
            &RetentionConfig {
                keep_last: 3,
                keep_within: Some(Duration::from_secs(14 * 86_400)),
                ..Default::default()
            }
        );
    }

    #[test]
    fn policy_errors_name_the_bad_token() {
        let cases = [
            ("", ""),
            ("keep-dayly=7", "keep-dayly"),
            ("keep-daily=x", "x"),
            ("keep-daily=-1", "-1"),
            ("keep-daily=+1", "+1"),
            ("keep-daily=99999999999", "99999999999"),
            ("keep-daily", "keep-daily"),
            ("keep-daily=7,", ""),
            ("keep-daily=7,keep_daily=3", "keep_daily"),
            ("keep-within=3m", "3m"),
            ("keep-within=1y", "1y"),
            ("keep-within=0d", "0d"),
            ("keep-within=14", "14"),
            ("keep-within=", ""),
        ];
        for (text, bad_token) in cases {
            let error = text.parse::<RetentionPolicy>().unwrap_err();
            assert!(
                matches!(&error, RetentionError::InvalidToken { policy, token, .. } if policy == text && token == bad_token),
                "{text:?}: expected token {bad_token:?}, got {error}"
            );
        }
        assert_eq!(
            "keep-within=3m".parse::<RetentionPolicy>().unwrap_err().to_string(),
            "retention policy \"keep-within=3m\": bad token \"3m\": ambiguous unit \"m\" (restic reads months): \
             write \"min\" for minutes, or days (\"92d\")"
        );
    }

    #[test]
    fn a_policy_that_keeps_nothing_is_rejected() {
        for text in ["keep-last=0", "keep-daily=0,keep-weekly=0"] {
            assert_eq!(text.parse::<RetentionPolicy>(), Err(RetentionError::KeepsNothing), "{text}");
        }
        assert_eq!(RetentionPolicy::new(RetentionConfig::default()), Err(RetentionError::KeepsNothing));
        let half_second = RetentionConfig { keep_within: Some(Duration::from_millis(500)), ..Default::default() };
        assert_eq!(RetentionPolicy::new(half_second), Err(RetentionError::ZeroKeepWithin));
    }

    #[test]
    fn the_retention_table_deserializes() {
        let policy: RetentionPolicy =
            serde_json::from_str(r#"{"keep_last": 3, "keep_daily": 7, "keep_within": "14d"}"#).unwrap();
        assert_eq!(policy.to_string(), "keep-last=3,keep-daily=7,keep-within=14d");
        let cases = [
            (r#"{}"#, "retention policy keeps nothing"),
            (r#"{"keep_last": 0}"#, "retention policy keeps nothing"),
            (r#"{"keep_dayly": 7}"#, "unknown field `keep_dayly`"),
            (r#"{"keep_within": "3m"}"#, "bad token \"3m\": ambiguous unit"),
            (r#"{"keep_last": -1}"#, "invalid value"),
        ];
        for (json, message) in cases {
            let error = serde_json::from_str::<RetentionPolicy>(json).unwrap_err().to_string();
            assert!(error.contains(message), "{json}: {error}");
        }
        let config: RetentionConfig = serde_json::from_str(r#"{"keep_within": null}"#).unwrap();
        assert_eq!(config, RetentionConfig::default());
    }

    const IDS: [&str; 6] = ["s0", "s1", "s2", "s3", "s4", "s5"];

    fn snapshot_sets() -> impl Strategy<Value = Vec<SnapshotInfo<'static>>> {
        let start = utc("2026-10-18 00:00");
        let snapshot = (0..IDS.len(), start..start + 21 * 86_400, any::<bool>(), any::<bool>(), any::<bool>())
            .prop_map(|(id, time, protected, complete, round)| SnapshotInfo {
                id: IDS[id],
                // Round half the times to the hour so that ties and shared buckets are common.
                time: if round { time - time % 3_600 } else { time },
                protected: protected && id == 0,
                complete: complete || id > 3,
            });
        proptest::collection::vec(snapshot, 0..40)
    }

    fn policies() -> impl Strategy<Value = RetentionPolicy> {
        (proptest::collection::vec(0..4u32, 6), proptest::option::of(1..20u64 * 86_400)).prop_map(|(counts, within)| {
            let config = RetentionConfig {
                keep_last: counts[0],
                keep_hourly: counts[1],
                keep_daily: counts[2],
                keep_weekly: counts[3],
                keep_monthly: counts[4],
                keep_yearly: counts[5],
                keep_within: within.map(Duration::from_secs),
            };
            RetentionPolicy::new(config).unwrap_or_else(|_| "keep-last=1".parse().unwrap())
        })
    }

    proptest! {
        #[test]
        fn decisions_are_safe_deterministic_and_order_independent(
            snapshots in snapshot_sets(),
            policy in policies(),
            now_offset in 0..30 * 86_400i64,
            shuffled_seed in any::<u64>(),
        ) {
            let now = utc("2026-10-15 00:00") + now_offset;
            for tz in [TimeZone::utc(), berlin()] {
                let decisions = policy.apply(&snapshots, now, &tz);
                prop_assert_eq!(decisions.len(), snapshots.len());
                prop_assert_eq!(&policy.apply(&snapshots, now, &tz), &decisions);
                if !snapshots.is_empty() {
                    prop_assert!(decisions.iter().any(|decision| decision.keep));
                }
                for decision in &decisions {
                    prop_assert_eq!(decision.keep, !decision.reasons.is_empty());
                }
                // Every protected snapshot has a kept decision with the same id and time.
                for snapshot in snapshots.iter().filter(|snapshot| snapshot.protected) {
                    prop_assert!(decisions.iter().any(|decision| decision.id == snapshot.id
                        && decision.time == snapshot.time
                        && decision.keep
                        && decision.reasons.contains(&Keep::Protected)));
                }
                let protected_count = snapshots.iter().filter(|snapshot| snapshot.protected).count();
                let kept_protected = decisions.iter().filter(|d| d.keep && d.reasons.contains(&Keep::Protected)).count();
                prop_assert_eq!(kept_protected, protected_count);
                // Any permutation of the input gives the same decisions.
                let mut permuted = snapshots.clone();
                let mut seed = shuffled_seed;
                for i in (1..permuted.len()).rev() {
                    seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                    permuted.swap(i, (seed >> 33) as usize % (i + 1));
                }
                prop_assert_eq!(&policy.apply(&permuted, now, &tz), &decisions);
            }
        }

        #[test]
        fn policy_strings_never_panic(text in "\\PC{0,40}") {
            if let Ok(policy) = text.parse::<RetentionPolicy>() {
                prop_assert_eq!(policy.to_string().parse::<RetentionPolicy>(), Ok(policy.clone()));
            }
        }

        #[test]
        fn extreme_snapshot_times_never_panic(times in proptest::collection::vec(any::<i64>(), 1..8), now in any::<i64>()) {
            let snapshots: Vec<SnapshotInfo<'_>> =
                times.iter().map(|&time| SnapshotInfo { id: "x", time, protected: false, complete: true }).collect();
            let policy: RetentionPolicy = "keep-hourly=2,keep-weekly=2,keep-within=1d".parse().unwrap();
            let decisions = policy.apply(&snapshots, now, &berlin());
            prop_assert!(decisions.iter().any(|decision| decision.keep));
            for decision in &decisions {
                let _ = decision.to_string();
            }
        }
    }
}
