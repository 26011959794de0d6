//! Time zones and the calendar: how instants (Unix seconds) map to local wall-clock time, for
//! schedules (`schedule.rs`) and the retention policy's calendar buckets (`retention.rs`).
//!
//! # Time zones
//!
//! A [`TimeZone`] is UTC, a fixed offset, a POSIX TZ rule, or an IANA zone read from the TZif
//! files (RFC 8536, versions 1 to 4) in `/usr/share/zoneinfo`. A TZif file holds a table of
//! transitions (for history) and a POSIX TZ footer for instants past the table. The parser is
//! bounded (files over [`MAX_TZIF_BYTES`] are refused) and total: bad bytes are an error, never a
//! panic. Leap-second zones (`right/…`) are refused: snapshot times are POSIX seconds.
//!
//! All calendar arithmetic is clamped to ±2^45 seconds (about ±1.1 million years) around the
//! epoch, so no input overflows.

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Where [`TimeZone::named`] looks for TZif files.
pub const ZONEINFO_DIR: &str = "/usr/share/zoneinfo";

/// The largest TZif file [`TimeZone::named`] reads. Real zone files are 1–4 KiB.
pub const MAX_TZIF_BYTES: usize = 256 << 10;

pub(crate) const MINUTE_SECONDS: i64 = 60;
pub(crate) const HOUR_SECONDS: i64 = 3_600;
pub(crate) const DAY_SECONDS: i64 = 86_400;

/// No UTC offset from any source may exceed this (RFC 8536 allows -24:59:59..+25:59:59).
/// The local↔UTC searches rely on it: they look only this far either side of an instant.
const MAX_OFFSET_SECONDS: i64 = 26 * HOUR_SECONDS;

/// Instants and local times are clamped to ±this before calendar arithmetic, so that years fit
/// an `i32` and day counts times [`DAY_SECONDS`] cannot overflow.
pub(crate) const TIME_LIMIT: i64 = 1 << 45;

// ---------------------------------------------------------------------------------------------
// Calendar
// ---------------------------------------------------------------------------------------------

/// A date in the proleptic Gregorian calendar.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Date {
    /// The year (astronomical numbering: year 0 exists).
    pub year: i32,
    /// 1..=12.
    pub month: u8,
    /// 1..=31.
    pub day: u8,
}

/// An ISO 8601 week: weeks start on Monday, and week 1 is the week with the year's first
/// Thursday, so 2026-12-31 is in 2026-W53 and 2027-01-04 in 2027-W01.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IsoWeek {
    /// The ISO week-numbering year (differs from the calendar year around New Year).
    pub year: i32,
    /// 1..=53.
    pub week: u8,
}

/// A local date and time of day, as a wall clock in some [`TimeZone`] shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LocalDateTime {
    /// The local date.
    pub date: Date,
    /// 0..=23.
    pub hour: u8,
    /// 0..=59.
    pub minute: u8,
    /// 0..=59.
    pub second: u8,
}

impl Date {
    /// The ISO 8601 week this date falls in.
    pub fn iso_week(self) -> IsoWeek {
        let days = self.days_since_epoch();
        // The Thursday of this date's week decides the week's year.
        let thursday = days - monday_based_weekday(days) as i64 + 3;
        let year = civil_from_days(thursday).0;
        let week = (thursday - days_from_civil(year, 1, 1)) / 7 + 1;
        IsoWeek { year: clamp_year(year), week: week as u8 }
    }

    /// Days since 1970-01-01.
    fn days_since_epoch(self) -> i64 {
        days_from_civil(i64::from(self.year), u32::from(self.month), u32::from(self.day))
    }
}

impl LocalDateTime {
    /// Splits local seconds since 1970-01-01 00:00 (clamped to the supported range).
    pub(crate) fn from_local_seconds(local: i64) -> Self {
        let local = clamp_time(local);
        let (year, month, day) = civil_from_days(local.div_euclid(DAY_SECONDS));
        let second_of_day = local.rem_euclid(DAY_SECONDS);
        LocalDateTime {
            date: Date { year: clamp_year(year), month: month as u8, day: day as u8 },
            hour: (second_of_day / HOUR_SECONDS) as u8,
            minute: (second_of_day % HOUR_SECONDS / MINUTE_SECONDS) as u8,
            second: (second_of_day % MINUTE_SECONDS) as u8,
        }
    }
}

impl fmt::Display for Date {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}-{:02}", self.year, self.month, self.day)
    }
}

impl fmt::Display for IsoWeek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-W{:02}", self.year, self.week)
    }
}

/// `2026-11-30 07:00:00`.
impl fmt::Display for LocalDateTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {:02}:{:02}:{:02}", self.date, self.hour, self.minute, self.second)
    }
}

fn clamp_time(t: i64) -> i64 {
    t.clamp(-TIME_LIMIT, TIME_LIMIT)
}

/// Years of clamped times fit an `i32` by a wide margin; this only guards the conversion.
fn clamp_year(year: i64) -> i32 {
    year.clamp(i64::from(i32::MIN), i64::from(i32::MAX)) as i32
}

/// Weekday of day number `days` (since 1970-01-01, a Thursday), Monday = 0.
pub(crate) fn monday_based_weekday(days: i64) -> usize {
    (days + 3).rem_euclid(7) as usize
}

fn is_leap_year(year: i64) -> bool {
    year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
}

fn days_in_month(year: i64, month: u32) -> i64 {
    match month {
        2 if is_leap_year(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's `days_from_civil`,
/// <https://howardhinnant.github.io/date_algorithms.html>). Exact for |year| < 2^40.
pub(crate) fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year.rem_euclid(400);
    let month_from_march = i64::from((month + 9) % 12);
    let day_of_year = (153 * month_from_march + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// The inverse of [`days_from_civil`]: (year, month, day).
pub(crate) fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let shifted = days + 719_468;
    let era = shifted.div_euclid(146_097);
    let day_of_era = shifted.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * month_from_march + 2) / 5 + 1) as u32;
    let month = if month_from_march < 10 { month_from_march + 3 } else { month_from_march - 9 } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

// ---------------------------------------------------------------------------------------------
// Time zones
// ---------------------------------------------------------------------------------------------

/// A time zone: maps instants (Unix seconds, UTC) to local wall-clock time.
///
/// Parse one from `UTC`/`Z`, a fixed offset (`+02:00`, `-0530`, `UTC+3`) or an IANA name
/// (`Europe/Berlin`, read from [`ZONEINFO_DIR`]); or build one with [`TimeZone::posix`] or
/// [`TimeZone::from_tzif`].
///
/// # Invariants
///
/// - Every offset it can return is within ±26 h.
/// - A TZif table's transitions are strictly increasing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TimeZone {
    name: String,
    rules: Rules,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Rules {
    Fixed(i32),
    Posix(PosixRule),
    Table(Box<Table>),
}

/// A TZif transition table, with its POSIX footer for instants after the last transition.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Table {
    /// Instants of the transitions, strictly increasing.
    transitions: Vec<i64>,
    /// The UTC offset from each transition on (same length as `transitions`).
    offsets_after: Vec<i32>,
    /// The offset before the first transition (RFC 8536: local time type 0).
    initial: i32,
    tail: Option<PosixRule>,
}

/// A POSIX TZ rule such as `CET-1CEST,M3.5.0,M10.5.0/3`. Offsets are seconds *east* of UTC
/// (POSIX writes them west-positive; the parser flips the sign).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PosixRule {
    std_offset: i32,
    dst: Option<DstRule>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct DstRule {
    offset: i32,
    start: RuleDate,
    /// Local (standard) time of day of the start, seconds; may be negative or past 24 h.
    start_time: i32,
    end: RuleDate,
    /// Local (daylight) time of day of the end, seconds; may be negative or past 24 h.
    end_time: i32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RuleDate {
    /// `Jn`: day 1..=365, February 29 never counted.
    JulianNoLeap(u16),
    /// `n`: day 0..=365, February 29 counted.
    JulianZero(u16),
    /// `Mm.w.d`: weekday `d` (0 = Sunday) of week `w` (5 = last) of month `m`.
    MonthWeekDay { month: u8, week: u8, weekday: u8 },
}

/// Why a time zone could not be loaded or parsed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TimeZoneError {
    /// The name is not a plausible IANA zone name (it would escape the zoneinfo directory, or
    /// has characters no zone name has).
    #[error("time zone {name:?}: not a zone name; expected e.g. \"Europe/Berlin\", \"UTC\" or \"+02:00\"")]
    InvalidName {
        /// The name given.
        name: String,
    },
    /// No such zone file.
    #[error("time zone {name:?} not found in {}; check the name or install tzdata", dir.display())]
    UnknownZone {
        /// The name given.
        name: String,
        /// The directory searched.
        dir: PathBuf,
    },
    /// Reading the zone file failed.
    #[error("failed to read time zone file {}: {source}", path.display())]
    Io {
        /// The zone file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The zone file is not valid TZif (RFC 8536), or uses leap seconds.
    #[error("time zone {name:?}: invalid TZif data: {reason}")]
    InvalidTzif {
        /// The zone's name.
        name: String,
        /// What is wrong, in a few words.
        reason: &'static str,
    },
    /// A POSIX TZ rule (given directly or as a TZif footer) does not parse.
    #[error("POSIX TZ string {spec:?}: {reason}")]
    InvalidPosixTz {
        /// The rule as given.
        spec: String,
        /// What is wrong, in a few words.
        reason: &'static str,
    },
    /// A fixed UTC offset is malformed or out of range.
    #[error("UTC offset {token:?}: {reason}")]
    InvalidOffset {
        /// The offset as given.
        token: String,
        /// What is wrong, in a few words.
        reason: &'static str,
    },
}

impl TimeZone {
    /// Coordinated Universal Time.
    pub fn utc() -> Self {
        TimeZone { name: "UTC".to_owned(), rules: Rules::Fixed(0) }
    }

    /// A fixed offset east of UTC, in seconds; less than 24 h either way.
    pub fn fixed(offset_seconds: i32) -> Result<Self, TimeZoneError> {
        if i64::from(offset_seconds).abs() >= DAY_SECONDS {
            return Err(TimeZoneError::InvalidOffset {
                token: offset_seconds.to_string(),
                reason: "must be less than 24 hours either way",
            });
        }
        Ok(TimeZone { name: format_offset(offset_seconds), rules: Rules::Fixed(offset_seconds) })
    }

    /// An IANA zone such as `Europe/Berlin`, read from [`ZONEINFO_DIR`].
    pub fn named(name: &str) -> Result<Self, TimeZoneError> {
        Self::named_in(Path::new(ZONEINFO_DIR), name)
    }

    /// An IANA zone read from `dir` (a `TZDIR`) instead of [`ZONEINFO_DIR`].
    pub fn named_in(dir: &Path, name: &str) -> Result<Self, TimeZoneError> {
        if !is_zone_name(name) {
            return Err(TimeZoneError::InvalidName { name: name.to_owned() });
        }
        let path = dir.join(name);
        let file = File::open(&path).map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => TimeZoneError::UnknownZone { name: name.to_owned(), dir: dir.to_owned() },
            _ => TimeZoneError::Io { path: path.clone(), source },
        })?;
        let mut bytes = Vec::new();
        file.take(MAX_TZIF_BYTES as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(|source| TimeZoneError::Io { path: path.clone(), source })?;
        if bytes.len() > MAX_TZIF_BYTES {
            return Err(TimeZoneError::InvalidTzif { name: name.to_owned(), reason: "file larger than 256 KiB" });
        }
        Self::from_tzif(name, &bytes)
    }

    /// A zone from the bytes of a TZif file (RFC 8536, versions 1–4), named `name`.
    pub fn from_tzif(name: &str, bytes: &[u8]) -> Result<Self, TimeZoneError> {
        let invalid = |reason| TimeZoneError::InvalidTzif { name: name.to_owned(), reason };
        let parsed = tzif::parse(bytes).map_err(invalid)?;
        let tail = match parsed.footer {
            Some(footer) if !footer.is_empty() => {
                Some(posix::parse(footer).map_err(|_| invalid("footer is not a valid POSIX TZ string"))?)
            }
            _ => None,
        };
        let table = Table {
            transitions: parsed.transitions,
            offsets_after: parsed.offsets_after,
            initial: parsed.initial,
            tail,
        };
        Ok(TimeZone { name: name.to_owned(), rules: Rules::Table(Box::new(table)) })
    }

    /// A zone from a POSIX TZ rule, e.g. `CET-1CEST,M3.5.0,M10.5.0/3` (Europe/Berlin since
    /// 1996) or `<+0530>-5:30`. POSIX offsets are *west*-positive.
    pub fn posix(spec: &str) -> Result<Self, TimeZoneError> {
        let rule =
            posix::parse(spec).map_err(|reason| TimeZoneError::InvalidPosixTz { spec: spec.to_owned(), reason })?;
        Ok(TimeZone { name: spec.to_owned(), rules: Rules::Posix(rule) })
    }

    /// The zone's name: `UTC`, `+05:30`, `Europe/Berlin`, or the POSIX rule.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The UTC offset in effect at instant `t`, in seconds east of UTC.
    pub fn offset_at(&self, t: i64) -> i32 {
        let t = clamp_time(t);
        match &self.rules {
            &Rules::Fixed(offset) => offset,
            Rules::Posix(rule) => rule.offset_at(t),
            Rules::Table(table) => table.offset_at(t),
        }
    }

    /// The local wall-clock time at instant `t`.
    pub fn to_local(&self, t: i64) -> LocalDateTime {
        LocalDateTime::from_local_seconds(self.local_seconds(t))
    }

    /// Local seconds since 1970-01-01 00:00 local at instant `t` (clamped).
    fn local_seconds(&self, t: i64) -> i64 {
        clamp_time(t) + i64::from(self.offset_at(t))
    }

    /// `(start, offset)` for the offset in force at `lo` and for every transition in
    /// `(lo, hi]`, in time order. The window is a few days at most, so the list is short.
    fn segments(&self, lo: i64, hi: i64) -> Vec<(i64, i32)> {
        let mut segments = vec![(lo, self.offset_at(lo))];
        match &self.rules {
            Rules::Fixed(_) => {}
            Rules::Posix(rule) => rule.transitions_between(lo, hi, &mut segments),
            Rules::Table(table) => table.transitions_between(lo, hi, &mut segments),
        }
        segments
    }

    /// The latest local time shown at any instant `<= t`. Instants more than 52 h before `t`
    /// show at most `t - 26 h`, which `t` itself beats, so only that window is searched.
    pub(crate) fn local_high_water(&self, t: i64) -> i64 {
        let t = clamp_time(t);
        let segments = self.segments(t - 2 * MAX_OFFSET_SECONDS, t);
        let mut high = i64::MIN;
        for (i, &(start, offset)) in segments.iter().enumerate() {
            let last = segments.get(i + 1).map_or(t, |&(next, _)| next - 1);
            if last >= start {
                high = high.max(last + i64::from(offset));
            }
        }
        high
    }

    /// The first instant at which the wall clock shows `local` or later. Such an instant lies
    /// within `local ± 26 h`, and within each constant-offset segment the wall clock rises
    /// with the instant, so the first segment that reaches `local` holds the answer.
    pub(crate) fn first_instant_showing(&self, local: i64) -> i64 {
        let local = clamp_time(local);
        let segments = self.segments(local - MAX_OFFSET_SECONDS, local + MAX_OFFSET_SECONDS);
        for (i, &(start, offset)) in segments.iter().enumerate() {
            let candidate = start.max(local - i64::from(offset));
            match segments.get(i + 1) {
                Some(&(next, _)) if candidate >= next => continue,
                _ => return candidate,
            }
        }
        // Unreachable: the last segment is unbounded, so the loop returns.
        local
    }
}

impl FromStr for TimeZone {
    type Err = TimeZoneError;

    /// `UTC` or `Z`; a fixed offset `+02:00`, `-0530`, `+2`, `UTC+3`; else an IANA name.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        if text.eq_ignore_ascii_case("utc") || text == "Z" {
            return Ok(TimeZone::utc());
        }
        let offset_text = match text.get(..3) {
            Some(prefix) if prefix.eq_ignore_ascii_case("utc") && text.len() > 3 => text.get(3..).unwrap_or(""),
            _ => text,
        };
        if offset_text.starts_with(['+', '-']) {
            let offset = parse_fixed_offset(offset_text)
                .map_err(|reason| TimeZoneError::InvalidOffset { token: text.to_owned(), reason })?;
            return TimeZone::fixed(offset);
        }
        TimeZone::named(text)
    }
}

impl fmt::Display for TimeZone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

/// `+HH`, `+HHMM`, `+HH:MM` (either sign), less than 24 h.
fn parse_fixed_offset(text: &str) -> Result<i32, &'static str> {
    const EXPECTED: &str = "expected +HH:MM or -HH:MM";
    let (sign, digits) = match text.split_at_checked(1) {
        Some(("+", rest)) => (1, rest),
        Some(("-", rest)) => (-1, rest),
        _ => return Err(EXPECTED),
    };
    let (hours, minutes) = match digits.split_once(':') {
        Some((hours, minutes)) => (hours, minutes),
        None if digits.len() == 4 => digits.split_at_checked(2).ok_or(EXPECTED)?,
        None => (digits, "0"),
    };
    let valid = |s: &str| (1..=2).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit());
    if !valid(hours) || !valid(minutes) {
        return Err(EXPECTED);
    }
    let hours: i32 = hours.parse().map_err(|_| EXPECTED)?;
    let minutes: i32 = minutes.parse().map_err(|_| EXPECTED)?;
    if hours >= 24 || minutes >= 60 {
        return Err("out of range: at most 23:59");
    }
    Ok(sign * (hours * 3_600 + minutes * 60))
}

/// `+05:30`, `-03:00`, `+00:00:30`.
fn format_offset(offset_seconds: i32) -> String {
    let sign = if offset_seconds < 0 { '-' } else { '+' };
    let abs = offset_seconds.unsigned_abs();
    let (hours, minutes, seconds) = (abs / 3_600, abs % 3_600 / 60, abs % 60);
    if seconds == 0 {
        format!("{sign}{hours:02}:{minutes:02}")
    } else {
        format!("{sign}{hours:02}:{minutes:02}:{seconds:02}")
    }
}

/// An IANA-style relative path: components of `[A-Za-z0-9._+-]`, none empty, `.` or `..`.
fn is_zone_name(name: &str) -> bool {
    name.len() <= 255
        && name.split('/').all(|part| {
            !part.is_empty()
                && part != "."
                && part != ".."
                && part.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'+' | b'-'))
        })
}

impl Table {
    fn offset_at(&self, t: i64) -> i32 {
        let after = self.transitions.partition_point(|&at| at <= t);
        if after == self.transitions.len() {
            if let Some(tail) = &self.tail {
                return tail.offset_at(t);
            }
        }
        match after.checked_sub(1) {
            None => self.initial,
            Some(i) => self.offsets_after.get(i).copied().unwrap_or(self.initial),
        }
    }

    fn transitions_between(&self, lo: i64, hi: i64, out: &mut Vec<(i64, i32)>) {
        let first = self.transitions.partition_point(|&at| at <= lo);
        let rows = self.transitions.iter().zip(&self.offsets_after).skip(first);
        out.extend(rows.take_while(|(&at, _)| at <= hi).map(|(&at, &offset)| (at, offset)));
        if let Some(tail) = &self.tail {
            let from = self.transitions.last().map_or(lo, |&last| last.max(lo));
            if from < hi {
                tail.transitions_between(from, hi, out);
            }
        }
    }
}

impl PosixRule {
    /// `(instant, offset after, order)` of the year's two transitions, end first on ties so
    /// that a zone with DST all year (`…,0/0,J365/25`) stays in DST.
    fn transitions_in_year(&self, year: i64) -> Option<[(i64, i32, u8); 2]> {
        let dst = self.dst?;
        let start = dst.start.day(year) * DAY_SECONDS + i64::from(dst.start_time) - i64::from(self.std_offset);
        let end = dst.end.day(year) * DAY_SECONDS + i64::from(dst.end_time) - i64::from(dst.offset);
        Some([(end, self.std_offset, 0), (start, dst.offset, 1)])
    }

    /// Transition years that can matter for instants in `lo..=hi`: rule times reach ±167 h
    /// beyond their date, so a year's transitions may land in a neighbouring year.
    fn years(lo: i64, hi: i64) -> std::ops::RangeInclusive<i64> {
        let year = |t: i64| civil_from_days(t.div_euclid(DAY_SECONDS)).0;
        year(lo) - 2..=year(hi) + 1
    }

    fn offset_at(&self, t: i64) -> i32 {
        let mut latest: Option<(i64, u8, i32)> = None;
        for year in Self::years(t, t) {
            for (at, offset, order) in self.transitions_in_year(year).into_iter().flatten() {
                if at <= t && latest.is_none_or(|(best_at, best_order, _)| (at, order) > (best_at, best_order)) {
                    latest = Some((at, order, offset));
                }
            }
        }
        latest.map_or(self.std_offset, |(_, _, offset)| offset)
    }

    fn transitions_between(&self, lo: i64, hi: i64, out: &mut Vec<(i64, i32)>) {
        let mut found: Vec<(i64, u8, i32)> = Self::years(lo, hi)
            .filter_map(|year| self.transitions_in_year(year))
            .flatten()
            .filter(|&(at, _, _)| lo < at && at <= hi)
            .map(|(at, offset, order)| (at, order, offset))
            .collect();
        found.sort_unstable();
        out.extend(found.into_iter().map(|(at, _, offset)| (at, offset)));
    }
}

impl RuleDate {
    /// Days since 1970-01-01 of this rule's date in `year`.
    fn day(self, year: i64) -> i64 {
        let january_first = days_from_civil(year, 1, 1);
        match self {
            RuleDate::JulianNoLeap(n) => {
                let n = i64::from(n);
                january_first + n - 1 + i64::from(is_leap_year(year) && n >= 60)
            }
            RuleDate::JulianZero(n) => january_first + i64::from(n),
            RuleDate::MonthWeekDay { month, week, weekday } => {
                let month = u32::from(month);
                let first = days_from_civil(year, month, 1);
                let first_weekday = (monday_based_weekday(first) as i64 + 1) % 7; // Sunday = 0
                let mut day = first + (i64::from(weekday) - first_weekday).rem_euclid(7) + 7 * (i64::from(week) - 1);
                while day >= first + days_in_month(year, month) {
                    day -= 7;
                }
                day
            }
        }
    }
}

/// POSIX TZ strings (POSIX.1-2017 §8.3 with the RFC 8536 §3.3.1 extensions: `<+03>` quoted
/// names, rule times from -167 to 167 hours). Total: malformed input is an `Err`.
#[deny(clippy::indexing_slicing, clippy::unwrap_used, clippy::expect_used)]
mod posix {
    use super::{DstRule, PosixRule, RuleDate};

    const SPEC_MAX_BYTES: usize = 128;

    pub(super) fn parse(spec: &str) -> Result<PosixRule, &'static str> {
        if spec.len() > SPEC_MAX_BYTES {
            return Err("longer than 128 bytes");
        }
        let mut cursor = Cursor { bytes: spec.as_bytes(), pos: 0 };
        cursor.name()?;
        // POSIX offsets are west-positive ("CET-1" is UTC+1): flip to east-positive.
        let std_offset = -cursor.hms(24)?;
        if cursor.done() {
            return Ok(PosixRule { std_offset, dst: None });
        }
        cursor.name()?;
        let offset = match cursor.peek() {
            Some(b'+' | b'-' | b'0'..=b'9') => -cursor.hms(24)?,
            _ => std_offset + 3_600,
        };
        if cursor.done() {
            return Err("daylight saving time without rules (expected e.g. \",M3.5.0,M10.5.0/3\")");
        }
        cursor.expect(b',', "expected ',' and the DST start rule")?;
        let (start, start_time) = cursor.date_and_time()?;
        cursor.expect(b',', "expected ',' and the DST end rule")?;
        let (end, end_time) = cursor.date_and_time()?;
        if !cursor.done() {
            return Err("unexpected characters after the DST end rule");
        }
        Ok(PosixRule { std_offset, dst: Some(DstRule { offset, start, start_time, end, end_time }) })
    }

    struct Cursor<'a> {
        bytes: &'a [u8],
        pos: usize,
    }

    impl Cursor<'_> {
        fn peek(&self) -> Option<u8> {
            self.bytes.get(self.pos).copied()
        }

        fn done(&self) -> bool {
            self.pos >= self.bytes.len()
        }

        fn eat(&mut self, byte: u8) -> bool {
            let found = self.peek() == Some(byte);
            if found {
                self.pos += 1;
            }
            found
        }

        fn expect(&mut self, byte: u8, reason: &'static str) -> Result<(), &'static str> {
            if self.eat(byte) {
                Ok(())
            } else {
                Err(reason)
            }
        }

        /// `ABC` (three or more letters) or `<+0330>` (three or more of `[A-Za-z0-9+-]`).
        fn name(&mut self) -> Result<(), &'static str> {
            let start = self.pos;
            if self.eat(b'<') {
                while self.peek().is_some_and(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'-') {
                    self.pos += 1;
                }
                let length = self.pos - start - 1;
                self.expect(b'>', "unterminated <quoted> zone abbreviation")?;
                if length < 3 {
                    return Err("zone abbreviation shorter than 3 characters");
                }
            } else {
                while self.peek().is_some_and(|b| b.is_ascii_alphabetic()) {
                    self.pos += 1;
                }
                if self.pos - start < 3 {
                    return Err("expected a zone abbreviation of 3 or more letters");
                }
            }
            Ok(())
        }

        /// Up to `max_digits` decimal digits, at least one.
        fn number(&mut self, max_digits: usize) -> Result<u32, &'static str> {
            let mut value: u32 = 0;
            let mut digits = 0;
            while let Some(digit) = self.peek().filter(u8::is_ascii_digit) {
                if digits == max_digits {
                    return Err("number has too many digits");
                }
                value = value * 10 + u32::from(digit - b'0');
                digits += 1;
                self.pos += 1;
            }
            if digits == 0 {
                return Err("expected a number");
            }
            Ok(value)
        }

        /// `[+-]h[h[h]][:mm[:ss]]` with hours up to `max_hours`, as signed seconds.
        fn hms(&mut self, max_hours: u32) -> Result<i32, &'static str> {
            let sign = if self.eat(b'-') {
                -1
            } else {
                self.eat(b'+');
                1
            };
            let hours = self.number(3)?;
            if hours > max_hours {
                return Err("hours out of range");
            }
            let mut seconds = hours * 3_600;
            for scale in [60, 1] {
                if !self.eat(b':') {
                    break;
                }
                let part = self.number(2)?;
                if part > 59 {
                    return Err("minutes or seconds out of range");
                }
                seconds += part * scale;
            }
            // At most 167 h 59 min 59 s, far below i32::MAX.
            Ok(sign * seconds as i32)
        }

        /// `Jn`, `n` or `Mm.w.d`, then an optional `/time` (default 02:00).
        fn date_and_time(&mut self) -> Result<(RuleDate, i32), &'static str> {
            let date = if self.eat(b'J') {
                let n = self.number(3)?;
                if !(1..=365).contains(&n) {
                    return Err("Julian day Jn out of range 1..=365");
                }
                RuleDate::JulianNoLeap(n as u16)
            } else if self.eat(b'M') {
                let month = self.number(2)?;
                self.expect(b'.', "expected Mm.w.d")?;
                let week = self.number(1)?;
                self.expect(b'.', "expected Mm.w.d")?;
                let weekday = self.number(1)?;
                if !(1..=12).contains(&month) || !(1..=5).contains(&week) || weekday > 6 {
                    return Err("Mm.w.d out of range (month 1..=12, week 1..=5, day 0..=6)");
                }
                RuleDate::MonthWeekDay { month: month as u8, week: week as u8, weekday: weekday as u8 }
            } else {
                let n = self.number(3)?;
                if n > 365 {
                    return Err("day n out of range 0..=365");
                }
                RuleDate::JulianZero(n as u16)
            };
            let time = if self.eat(b'/') { self.hms(167)? } else { 2 * 3_600 };
            Ok((date, time))
        }
    }
}

/// TZif decoding (RFC 8536). The bytes come from disk: every read is bounds-checked and
/// counts are checked against the bytes present before anything is allocated.
#[deny(clippy::indexing_slicing, clippy::unwrap_used, clippy::expect_used)]
mod tzif {
    use super::MAX_OFFSET_SECONDS;

    const MAGIC: &[u8; 4] = b"TZif";
    /// magic, version, 15 unused bytes, six 32-bit counts.
    const HEADER_LEN: usize = 4 + 1 + 15 + 6 * 4;

    pub(super) struct Parsed<'a> {
        pub(super) transitions: Vec<i64>,
        pub(super) offsets_after: Vec<i32>,
        pub(super) initial: i32,
        /// The POSIX TZ footer of a version 2+ file (may be empty).
        pub(super) footer: Option<&'a str>,
    }

    struct Counts {
        is_ut: usize,
        is_std: usize,
        leap: usize,
        time: usize,
        types: usize,
        chars: usize,
    }

    pub(super) fn parse(bytes: &[u8]) -> Result<Parsed<'_>, &'static str> {
        let mut reader = Reader { rest: bytes };
        let (version, v1_counts) = header(&mut reader)?;
        if version == 0 {
            let (transitions, offsets_after, initial) = data_block(&mut reader, &v1_counts, 4)?;
            return Ok(Parsed { transitions, offsets_after, initial, footer: None });
        }
        // Version 2+: skip the 32-bit block; the 64-bit block and the footer follow.
        let v1_len = block_len(&v1_counts, 4).ok_or("counts overflow")?;
        reader.take(v1_len).map_err(|_| "truncated data block")?;
        let (second_version, counts) = header(&mut reader)?;
        if second_version != version {
            return Err("the two headers disagree on the version");
        }
        let (transitions, offsets_after, initial) = data_block(&mut reader, &counts, 8)?;
        if reader.u8()? != b'\n' {
            return Err("footer does not start with a newline");
        }
        let footer_len = reader.rest.iter().position(|&b| b == b'\n').ok_or("footer has no closing newline")?;
        let footer = std::str::from_utf8(reader.take(footer_len)?).map_err(|_| "footer is not ASCII")?;
        Ok(Parsed { transitions, offsets_after, initial, footer: Some(footer) })
    }

    fn header(reader: &mut Reader<'_>) -> Result<(u8, Counts), &'static str> {
        if reader.rest.len() < HEADER_LEN {
            return Err("truncated header");
        }
        if reader.take(4)? != MAGIC {
            return Err("bad magic: not a TZif file");
        }
        let version = match reader.u8()? {
            0 => 0,
            b'2' => 2,
            b'3' => 3,
            b'4' => 4,
            _ => return Err("unsupported version"),
        };
        reader.take(15)?;
        let mut count = || reader.be_u32().map(|n| n as usize);
        let counts = Counts {
            is_ut: count()?,
            is_std: count()?,
            leap: count()?,
            time: count()?,
            types: count()?,
            chars: count()?,
        };
        if counts.types == 0 {
            return Err("no local time types");
        }
        if counts.is_std != 0 && counts.is_std != counts.types {
            return Err("isstdcnt is neither 0 nor typecnt");
        }
        if counts.is_ut != 0 && counts.is_ut != counts.types {
            return Err("isutcnt is neither 0 nor typecnt");
        }
        if counts.leap != 0 {
            return Err("leap-second zones (right/...) are not supported");
        }
        Ok((version, counts))
    }

    /// Bytes of a data block with `time_size`-byte times, or None on overflow.
    fn block_len(counts: &Counts, time_size: usize) -> Option<usize> {
        let parts = [
            counts.time.checked_mul(time_size + 1)?,
            counts.types.checked_mul(6)?,
            counts.chars,
            counts.leap.checked_mul(time_size + 4)?,
            counts.is_std,
            counts.is_ut,
        ];
        parts.into_iter().try_fold(0usize, usize::checked_add)
    }

    #[allow(clippy::type_complexity)]
    fn data_block(
        reader: &mut Reader<'_>,
        counts: &Counts,
        time_size: usize,
    ) -> Result<(Vec<i64>, Vec<i32>, i32), &'static str> {
        if block_len(counts, time_size).is_none_or(|len| len > reader.rest.len()) {
            return Err("truncated data block");
        }
        let mut transitions = Vec::with_capacity(counts.time);
        for _ in 0..counts.time {
            let at = if time_size == 4 { i64::from(reader.be_i32()?) } else { reader.be_i64()? };
            if transitions.last().is_some_and(|&previous| previous >= at) {
                return Err("transition times are not strictly increasing");
            }
            transitions.push(at);
        }
        let type_indices = reader.take(counts.time)?;
        let mut offsets = Vec::with_capacity(counts.types);
        for _ in 0..counts.types {
            let offset = reader.be_i32()?;
            let is_dst = reader.u8()?;
            let designation = reader.u8()?;
            if i64::from(offset).abs() > MAX_OFFSET_SECONDS {
                return Err("UTC offset beyond 26 hours");
            }
            if is_dst > 1 {
                return Err("isdst is neither 0 nor 1");
            }
            if usize::from(designation) >= counts.chars {
                return Err("designation index out of range");
            }
            offsets.push(offset);
        }
        let offsets_after = type_indices
            .iter()
            .map(|&index| offsets.get(usize::from(index)).copied().ok_or("local time type index out of range"))
            .collect::<Result<Vec<i32>, _>>()?;
        // Designations, leap records (none), standard/wall and UT/local indicators: unused.
        reader.take(counts.chars + counts.is_std + counts.is_ut)?;
        let initial = offsets.first().copied().ok_or("no local time types")?;
        Ok((transitions, offsets_after, initial))
    }

    /// Big-endian reads: TZif is big-endian by definition (RFC 8536 §3).
    struct Reader<'a> {
        rest: &'a [u8],
    }

    impl<'a> Reader<'a> {
        fn take(&mut self, len: usize) -> Result<&'a [u8], &'static str> {
            let (head, tail) = self.rest.split_at_checked(len).ok_or("truncated")?;
            self.rest = tail;
            Ok(head)
        }

        fn array<const N: usize>(&mut self) -> Result<[u8; N], &'static str> {
            self.take(N)?.try_into().map_err(|_| "truncated")
        }

        fn u8(&mut self) -> Result<u8, &'static str> {
            Ok(u8::from_be_bytes(self.array()?))
        }

        fn be_u32(&mut self) -> Result<u32, &'static str> {
            Ok(u32::from_be_bytes(self.array()?))
        }

        fn be_i32(&mut self) -> Result<i32, &'static str> {
            Ok(i32::from_be_bytes(self.array()?))
        }

        fn be_i64(&mut self) -> Result<i64, &'static str> {
            Ok(i64::from_be_bytes(self.array()?))
        }
    }
}

/// Zones and instants shared by the time-zone and schedule tests.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// `"2026-03-29 01:00"` or `"2026-03-29 01:00:30"`, read as UTC, to Unix seconds.
    pub(crate) fn utc(text: &str) -> i64 {
        let (date, time) = text.split_once(' ').expect("date and time");
        let mut date_parts = date.split('-').map(|part| part.parse::<i64>().expect("number"));
        let (year, month, day) = (date_parts.next().unwrap(), date_parts.next().unwrap(), date_parts.next().unwrap());
        let mut time_parts = time.split(':').map(|part| part.parse::<i64>().expect("number"));
        let (hour, minute) = (time_parts.next().unwrap(), time_parts.next().unwrap());
        let second = time_parts.next().unwrap_or(0);
        days_from_civil(year, month as u32, day as u32) * DAY_SECONDS + hour * 3_600 + minute * 60 + second
    }

    /// Europe/Berlin's rule since 1996, independent of the machine's tzdata.
    pub(crate) fn berlin() -> TimeZone {
        TimeZone::posix("CET-1CEST,M3.5.0,M10.5.0/3").unwrap()
    }

    /// The machine's Europe/Berlin TZif file (tzdata is part of every Keel machine image).
    pub(crate) fn berlin_tzif() -> TimeZone {
        TimeZone::named("Europe/Berlin").expect("Europe/Berlin from /usr/share/zoneinfo (install tzdata)")
    }

    pub(crate) fn sydney() -> TimeZone {
        TimeZone::posix("AEST-10AEDT,M10.1.0,M4.1.0/3").unwrap()
    }

    pub(crate) fn new_york() -> TimeZone {
        TimeZone::posix("EST5EDT,M3.2.0,M11.1.0").unwrap()
    }

    /// `2026-03-29 03:00:00 +02:00`, for readable failures.
    pub(crate) fn show(tz: &TimeZone, t: i64) -> String {
        format!("{} {}", tz.to_local(t), format_offset(tz.offset_at(t)))
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;
    // The Berlin TZif test also checks that schedules fire alike in the file and in the rule,
    // and `parsers_never_panic` fuzzes the schedule and duration parsers with the zone ones
    // (`parse_fixed_offset` is private here).
    use crate::schedule::{parse_duration_seconds, BareM, Schedule};
    use proptest::prelude::*;

    #[test]
    fn civil_dates_round_trip_and_match_known_days() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(2026, 11, 30), 20_787);
        assert_eq!(days_from_civil(1600, 2, 29), -135_081);
        assert_eq!(days_from_civil(2400, 12, 31), 157_419);
        for days in (-TIME_LIMIT / DAY_SECONDS..TIME_LIMIT / DAY_SECONDS).step_by(9_973) {
            let (year, month, day) = civil_from_days(days);
            assert!((1..=12).contains(&month) && day >= 1 && i64::from(day) <= days_in_month(year, month));
            assert_eq!(days_from_civil(year, month, day), days, "{year}-{month}-{day}");
        }
    }

    #[test]
    fn iso_weeks_around_new_year() {
        let cases = [
            ((2026, 1, 1), (2026, 1)),
            ((2026, 12, 28), (2026, 53)), // Monday of week 53: 2026 starts on a Thursday
            ((2026, 12, 31), (2026, 53)),
            ((2027, 1, 3), (2026, 53)), // Sunday: still 2026's week 53
            ((2027, 1, 4), (2027, 1)),
            ((2020, 12, 31), (2020, 53)),
            ((2021, 1, 3), (2020, 53)),
            ((2024, 12, 30), (2025, 1)), // Monday 2024-12-30 belongs to 2025
            ((2008, 12, 29), (2009, 1)),
            ((2010, 1, 3), (2009, 53)),
        ];
        for ((year, month, day), (week_year, week)) in cases {
            let date = Date { year, month, day };
            assert_eq!(date.iso_week(), IsoWeek { year: week_year, week }, "{date}");
        }
        assert_eq!(IsoWeek { year: 2026, week: 3 }.to_string(), "2026-W03");
    }

    #[test]
    fn posix_rules_give_the_offsets_of_their_zones() {
        let cases: &[(&str, &str, i32)] = &[
            // Europe/Berlin: CEST from 2026-03-29 01:00 UTC to 2026-10-25 01:00 UTC.
            ("CET-1CEST,M3.5.0,M10.5.0/3", "2026-03-29 00:59:59", 3_600),
            ("CET-1CEST,M3.5.0,M10.5.0/3", "2026-03-29 01:00:00", 7_200),
            ("CET-1CEST,M3.5.0,M10.5.0/3", "2026-10-25 00:59:59", 7_200),
            ("CET-1CEST,M3.5.0,M10.5.0/3", "2026-10-25 01:00:00", 3_600),
            ("CET-1CEST,M3.5.0,M10.5.0/3", "2026-01-01 00:00:00", 3_600),
            // Australia/Sydney: DST over New Year; ends 2026-04-05 03:00 AEDT, starts 2026-10-04 02:00 AEST.
            ("AEST-10AEDT,M10.1.0,M4.1.0/3", "2026-01-01 00:00:00", 39_600),
            ("AEST-10AEDT,M10.1.0,M4.1.0/3", "2026-04-04 15:59:59", 39_600),
            ("AEST-10AEDT,M10.1.0,M4.1.0/3", "2026-04-04 16:00:00", 36_000),
            ("AEST-10AEDT,M10.1.0,M4.1.0/3", "2026-10-03 15:59:59", 36_000),
            ("AEST-10AEDT,M10.1.0,M4.1.0/3", "2026-10-03 16:00:00", 39_600),
            // America/New_York: 2026-03-08 02:00 EST and 2026-11-01 02:00 EDT.
            ("EST5EDT,M3.2.0,M11.1.0", "2026-03-08 06:59:59", -18_000),
            ("EST5EDT,M3.2.0,M11.1.0", "2026-03-08 07:00:00", -14_400),
            ("EST5EDT,M3.2.0,M11.1.0", "2026-11-01 05:59:59", -14_400),
            ("EST5EDT,M3.2.0,M11.1.0", "2026-11-01 06:00:00", -18_000),
            // Jn never counts February 29; n does.
            ("AAA0BBB,J60/0,J300/0", "2024-02-29 23:59:59", 0),
            ("AAA0BBB,J60/0,J300/0", "2024-03-01 00:00:00", 3_600),
            ("AAA0BBB,59/0,300/0", "2024-02-28 23:59:59", 0),
            ("AAA0BBB,59/0,300/0", "2024-02-29 00:00:00", 3_600),
            ("AAA0BBB,59/0,300/0", "2026-03-01 00:00:00", 3_600),
            // DST all year (RFC 8536 §3.3.1): the end and the next start coincide.
            ("EST5EDT,0/0,J365/25", "2026-01-01 05:00:00", -14_400),
            ("EST5EDT,0/0,J365/25", "2026-07-01 00:00:00", -14_400),
            ("EST5EDT,0/0,J365/25", "2026-12-31 23:59:59", -14_400),
            // Quoted names, minutes, no DST.
            ("<-03>3", "2026-07-01 00:00:00", -10_800),
            ("<+0530>-5:30", "2026-07-01 00:00:00", 19_800),
            // Negative rule times (America/Godthab style, v3+) and an explicit DST offset.
            // (-1 h local on Sunday is Saturday 23:00 -02 = Sunday 01:00 UTC, as in the EU).
            ("<-02>2<-01>,M3.5.0/-1,M10.5.0/0", "2026-03-29 00:59:59", -7_200),
            ("<-02>2<-01>,M3.5.0/-1,M10.5.0/0", "2026-03-29 01:00:00", -3_600),
            ("XXX-1YYY-3,M3.5.0,M10.5.0/3", "2026-07-01 00:00:00", 10_800),
        ];
        for &(spec, at, expected) in cases {
            let tz = TimeZone::posix(spec).unwrap();
            assert_eq!(tz.offset_at(utc(at)), expected, "{spec} at {at} UTC");
        }
    }

    #[test]
    fn posix_rules_reject_bad_specs() {
        let cases = [
            ("", "expected a zone abbreviation of 3 or more letters"),
            ("CE-1", "expected a zone abbreviation of 3 or more letters"),
            ("CET", "expected a number"),
            ("CET-25", "hours out of range"),
            ("CET-1CEST", "daylight saving time without rules (expected e.g. \",M3.5.0,M10.5.0/3\")"),
            ("CET-1CEST,M13.5.0,M10.5.0", "Mm.w.d out of range (month 1..=12, week 1..=5, day 0..=6)"),
            ("CET-1CEST,M3.5.0", "expected ',' and the DST end rule"),
            ("CET-1CEST,J0,J10", "Julian day Jn out of range 1..=365"),
            ("CET-1CEST,M3.5.0/168,M10.5.0", "hours out of range"),
            ("CET-1CEST,M3.5.0,M10.5.0x", "unexpected characters after the DST end rule"),
            ("<+0", "unterminated <quoted> zone abbreviation"),
        ];
        for (spec, reason) in cases {
            let error = TimeZone::posix(spec).unwrap_err();
            assert!(
                matches!(&error, TimeZoneError::InvalidPosixTz { spec: s, reason: r } if s == spec && *r == reason),
                "{spec:?}: {error}"
            );
        }
    }

    #[test]
    fn berlin_tzif_has_history_and_agrees_with_the_rule_since_1996() {
        let file = berlin_tzif();
        assert_eq!(file.name(), "Europe/Berlin");
        let history = [
            ("1890-01-01 00:00", 3_208), // local mean time, +00:53:28
            ("1979-07-01 00:00", 3_600), // no DST in 1979
            ("1980-07-01 00:00", 7_200),
            ("2100-07-01 00:00", 7_200), // past the table: the footer rule
            ("2100-12-01 00:00", 3_600),
        ];
        for (at, expected) in history {
            assert_eq!(file.offset_at(utc(at)), expected, "Europe/Berlin at {at} UTC");
        }
        let rule = berlin();
        let (from, to) = (utc("1996-01-01 00:00"), utc("2080-01-01 00:00"));
        for t in (from..to).step_by(3 * 3_600 + 17) {
            assert_eq!(file.offset_at(t), rule.offset_at(t), "at {t}");
        }
        let schedule: Schedule = "02:30".parse().unwrap();
        let mut t = utc("2030-01-01 00:00");
        for _ in 0..(365 * 20) {
            let next = schedule.next_after(t, &file);
            assert_eq!(next, schedule.next_after(t, &rule), "after {}", show(&rule, t));
            t = next;
        }
    }

    /// Hand-made TZif bytes: `transitions` are (time, type index), `types` are UTC offsets.
    fn tzif_bytes(version: u8, transitions: &[(i64, u8)], types: &[i32], footer: &str) -> Vec<u8> {
        fn header(out: &mut Vec<u8>, version: u8, time_count: usize, type_count: usize) {
            out.extend_from_slice(b"TZif");
            out.push(version);
            out.extend_from_slice(&[0; 15]);
            for count in [0, 0, 0, time_count, type_count, 4] {
                out.extend_from_slice(&(count as u32).to_be_bytes());
            }
        }
        fn block(out: &mut Vec<u8>, transitions: &[(i64, u8)], types: &[i32], time_size: usize) {
            for &(at, _) in transitions {
                match time_size {
                    4 => out.extend_from_slice(&(at as i32).to_be_bytes()),
                    _ => out.extend_from_slice(&at.to_be_bytes()),
                }
            }
            out.extend(transitions.iter().map(|&(_, index)| index));
            for &offset in types {
                out.extend_from_slice(&offset.to_be_bytes());
                out.extend_from_slice(&[0, 0]);
            }
            out.extend_from_slice(b"XYZ\0");
        }
        let mut out = Vec::new();
        header(&mut out, version, transitions.len(), types.len());
        block(&mut out, transitions, types, 4);
        if version != 0 {
            header(&mut out, version, transitions.len(), types.len());
            block(&mut out, transitions, types, 8);
            out.push(b'\n');
            out.extend_from_slice(footer.as_bytes());
            out.push(b'\n');
        }
        out
    }

    #[test]
    fn tzif_versions_one_and_two_decode() {
        let transitions = [(1_000, 1), (2_000, 0)];
        let v1 = TimeZone::from_tzif("Test/V1", &tzif_bytes(0, &transitions, &[3_600, 7_200], "")).unwrap();
        let v2 = TimeZone::from_tzif("Test/V2", &tzif_bytes(b'2', &transitions, &[3_600, 7_200], "<+03>-3")).unwrap();
        let expected = [(999, 3_600), (1_000, 7_200), (1_999, 7_200), (2_000, 3_600), (1 << 40, 3_600)];
        for (t, offset) in expected {
            assert_eq!(v1.offset_at(t), offset, "v1 at {t}");
        }
        // v2: the footer takes over after the last transition.
        let expected = [(999, 3_600), (1_000, 7_200), (1_999, 7_200), (2_000, 10_800), (1 << 40, 10_800)];
        for (t, offset) in expected {
            assert_eq!(v2.offset_at(t), offset, "v2 at {t}");
        }
        // No transitions at all: the footer (or type 0) holds everywhere.
        let utc_file = TimeZone::from_tzif("Etc/UTC", &tzif_bytes(b'2', &[], &[0], "UTC0")).unwrap();
        assert_eq!(utc_file.offset_at(utc("2026-07-01 00:00")), 0);
    }

    #[test]
    fn tzif_rejects_malformed_files_without_panicking() {
        let good = tzif_bytes(b'2', &[(1_000, 1), (2_000, 0)], &[3_600, 7_200], "CET-1CEST,M3.5.0,M10.5.0/3");
        assert!(TimeZone::from_tzif("Test/Good", &good).is_ok());
        // Every truncation fails cleanly.
        for len in 0..good.len() - 1 {
            assert!(TimeZone::from_tzif("Test/Cut", &good[..len]).is_err(), "truncated to {len}");
        }
        let with = |edit: &dyn Fn(&mut Vec<u8>)| {
            let mut bytes = good.clone();
            edit(&mut bytes);
            bytes
        };
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (with(&|b| b[0] = b'X'), "bad magic: not a TZif file"),
            (with(&|b| b[4] = b'9'), "unsupported version"),
            (
                with(&|b| b[28..32].copy_from_slice(&1u32.to_be_bytes())),
                "leap-second zones (right/...) are not supported",
            ),
            (tzif_bytes(b'2', &[(2_000, 0), (1_000, 0)], &[0], ""), "transition times are not strictly increasing"),
            (tzif_bytes(b'2', &[(1_000, 5)], &[0], ""), "local time type index out of range"),
            (tzif_bytes(b'2', &[], &[30 * 3_600], ""), "UTC offset beyond 26 hours"),
            (tzif_bytes(b'2', &[], &[], ""), "no local time types"),
            (tzif_bytes(b'2', &[], &[0], "CET-1CEST"), "footer is not a valid POSIX TZ string"),
            (with(&|b| b.truncate(b.len() - 1)), "footer has no closing newline"),
            (with(&|b| b[36..40].copy_from_slice(&u32::MAX.to_be_bytes())), "truncated data block"),
        ];
        for (bytes, reason) in cases {
            let error = TimeZone::from_tzif("Test/Bad", &bytes).unwrap_err();
            assert!(
                matches!(&error, TimeZoneError::InvalidTzif { reason: r, .. } if *r == reason),
                "expected {reason:?}, got {error}"
            );
        }
    }

    #[test]
    fn time_zone_names_and_offsets_parse() {
        let cases = [
            ("UTC", "UTC", 0),
            ("utc", "UTC", 0),
            ("Z", "UTC", 0),
            ("+02:00", "+02:00", 7_200),
            ("-05:30", "-05:30", -19_800),
            ("+0530", "+05:30", 19_800),
            ("+2", "+02:00", 7_200),
            ("UTC+3", "+03:00", 10_800),
            ("UTC-03:30", "-03:30", -12_600),
            ("Europe/Berlin", "Europe/Berlin", 3_600),
        ];
        for (text, name, offset) in cases {
            let tz: TimeZone = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!((tz.name(), tz.offset_at(utc("2026-01-01 00:00"))), (name, offset), "{text}");
        }
        assert_eq!(TimeZone::fixed(-3_600).unwrap().to_string(), "-01:00");
        assert_eq!(TimeZone::fixed(30).unwrap().to_string(), "+00:00:30");

        for text in ["+24:00", "+02:60", "+2:3:4", "-", "UTC+", "+1a"] {
            let error = text.parse::<TimeZone>().unwrap_err();
            assert!(matches!(&error, TimeZoneError::InvalidOffset { token, .. } if token == text), "{text}: {error}");
        }
        for text in ["../../etc/passwd", "/etc/localtime", "Europe//Berlin", "Europe/Ber lin", ""] {
            let error = text.parse::<TimeZone>().unwrap_err();
            assert!(matches!(&error, TimeZoneError::InvalidName { name } if name == text), "{text}: {error}");
        }
        let error = "Europe/Nowhere".parse::<TimeZone>().unwrap_err();
        assert!(matches!(&error, TimeZoneError::UnknownZone { name, .. } if name == "Europe/Nowhere"), "{error}");
        let error = "Europe".parse::<TimeZone>().unwrap_err(); // a directory
        assert!(matches!(&error, TimeZoneError::Io { .. }), "{error}");
        assert!(TimeZone::fixed(24 * 3_600).is_err());
    }

    proptest! {
        #[test]
        fn parsers_never_panic(text in "\\PC{0,40}", bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = text.parse::<Schedule>();
            let _ = TimeZone::posix(&text);
            let _ = parse_fixed_offset(&text);
            let _ = parse_duration_seconds(&text, BareM::Minutes);
            let _ = TimeZone::from_tzif("Fuzz/Bytes", &bytes);
        }
    }
}
