//! When to take snapshots: schedules of local wall-clock times. The time zones and calendar
//! they are evaluated in are in `tz.rs`.
//!
//! # Schedules
//!
//! A [`Schedule`] is a set of *slots*: local wall-clock times, written as seconds since
//! 1970-01-01 00:00 *local*.
//!
//! - `07:00,15:00` — every day at those local times.
//! - `every 15m`, `every 4h` — whenever the wall clock shows a multiple of the interval since
//!   1970-01-01 00:00 local (so `every 4h` is 00:00, 04:00, 08:00, … local; an interval that
//!   does not divide a day drifts across days, and `every 7d` fires on Thursdays at 00:00, as
//!   1970-01-01 was a Thursday).
//! - Either form may start with a weekday filter: `mon..fri 07:00`, `sat,sun every 6h`.
//!
//! # How the next firing is found
//!
//! A slot fires at the first instant at which the wall clock shows that time *or later*.
//! [`Schedule::next_after`]`(t)` therefore:
//!
//! 1. takes `high`, the latest wall-clock time shown at any instant up to `t` (that is the local
//!    time at `t`, except in the hour after clocks went back, when it is the time shown just
//!    before the change);
//! 2. takes the first slot after `high` whose local weekday the filter allows;
//! 3. returns the first instant at which the wall clock shows that slot or later.
//!
//! Both searches look only at offsets within ±26 hours of the instant, because no zone's UTC
//! offset is larger (every source is checked against that bound). What follows for DST:
//!
//! - **Gap** (clocks go forward): a slot that does not exist fires at the first instant after the
//!   gap. `02:30` on the last Sunday of March in Europe/Berlin fires at 03:00 CEST; several slots
//!   inside one gap (`every 15m`) fire once, together.
//! - **Overlap** (clocks go back): a wall-clock time that occurs twice fires at its first
//!   occurrence only. For `every` schedules the repeated hour gets no firings: in Europe/Berlin
//!   `every 15m` fires at 02:45 CEST and next at 03:00 CET, 1 h 15 min later. That is the price
//!   of "fires once"; a tighter RPO on that night needs a schedule in `UTC`.
//!
//! After downtime, [`Schedule::last_at_or_before`] names the one firing still owed, so the
//! daemon takes *one* catch-up snapshot rather than one per missed slot (the daemon's ledger
//! of settled firings: tools `snapshot/catchup.rs`).

use std::fmt;
use std::str::FromStr;

use crate::tz::{monday_based_weekday, DAY_SECONDS, HOUR_SECONDS, MINUTE_SECONDS, TIME_LIMIT};

use crate::tz::TimeZone;

const WEEK_SECONDS: i64 = 7 * DAY_SECONDS;

/// [`Schedule::next_after`] answers "never" (`i64::MAX`) from here on, so that the slot search
/// (at most 8 days ahead) and the ±26 h offset windows stay inside [`TIME_LIMIT`].
const SCHEDULE_TIME_LIMIT: i64 = TIME_LIMIT / 2;

/// The shortest and longest `every` interval.
const EVERY_MIN_SECONDS: i64 = MINUTE_SECONDS;
const EVERY_MAX_SECONDS: i64 = WEEK_SECONDS;

/// Any non-empty weekday set matches one of 7 consecutive days, so the slot search ends within
/// 8 local days (today plus 7) when every day has slots.
const SLOT_SEARCH_DAYS: i64 = 8;

/// Bit mask of all seven weekdays (bit 0 = Monday).
const ALL_WEEKDAYS: u8 = 0b111_1111;
const WEEKDAY_NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
const WEEKDAY_FULL_NAMES: [&str; 7] = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"];

// ---------------------------------------------------------------------------------------------
// Schedules
// ---------------------------------------------------------------------------------------------

/// When to take snapshots: local times of day or a fixed interval, optionally on some weekdays
/// only. Parse one with [`str::parse`]; the module docs give the syntax and the DST rules.
///
/// ```
/// use keel_snapshot::{Schedule, TimeZone};
///
/// let schedule: Schedule = "mon..fri 07:00,15:00".parse()?;
/// let tz: TimeZone = "+01:00".parse()?;
/// // Friday 2026-11-27 15:00 +01:00 → Monday 2026-11-30 07:00 +01:00.
/// assert_eq!(schedule.next_after(1_795_788_000, &tz), 1_796_018_400);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Invariants
///
/// - The weekday mask is non-empty.
/// - Times of day are sorted, distinct and below 24 h; an interval is within 1 min..=7 d, and
///   divides 24 h when the weekday mask is not all days (so every local day has slots).
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub struct Schedule {
    /// Allowed local weekdays, bit 0 = Monday.
    weekdays: u8,
    slots: Slots,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Slots {
    /// Seconds after local midnight, sorted and distinct.
    TimesOfDay(Vec<i64>),
    /// Seconds between slots, aligned to 1970-01-01 00:00 local.
    Every(i64),
}

/// Why a schedule string was rejected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ScheduleError {
    /// The string is empty or blank.
    #[error("empty schedule: expected e.g. \"07:00,15:00\", \"every 4h\" or \"mon..fri 07:00\"")]
    Empty,
    /// A token is malformed or out of range.
    #[error("schedule {schedule:?}: bad token {token:?}: {reason}")]
    InvalidToken {
        /// The whole schedule as given.
        schedule: String,
        /// The offending token.
        token: String,
        /// What was expected instead.
        reason: &'static str,
    },
}

impl Schedule {
    /// The next firing strictly after `t` (Unix seconds), evaluated in `tz`.
    ///
    /// A local time that does not exist (DST gap) fires at the first instant after the gap; a
    /// local time that occurs twice (DST overlap) fires once, at its first occurrence. Returns
    /// `i64::MAX` ("never") for `t` past about year 500,000.
    pub fn next_after(&self, t: i64, tz: &TimeZone) -> i64 {
        if t >= SCHEDULE_TIME_LIMIT {
            return i64::MAX;
        }
        let high = tz.local_high_water(t.max(-SCHEDULE_TIME_LIMIT));
        let slot = self.first_slot_after(high);
        let fire = tz.first_instant_showing(slot);
        debug_assert!(fire > t, "next_after({t}) = {fire}: the slot search must move forward");
        fire.max(t.saturating_add(1))
    }

    /// Whether at least one firing fell in `(last_run, now]`: after downtime, take one catch-up
    /// snapshot (not one per missed firing), then wait for [`Schedule::next_after`]`(now)`.
    ///
    /// False when `now <= last_run` (the clock went backwards: nothing can be overdue).
    pub fn missed(&self, last_run: i64, now: i64, tz: &TimeZone) -> bool {
        self.next_after(last_run, tz) <= now
    }

    /// The latest firing at or before `t`: the firing a node that was down (or could not
    /// take it) at `t` still owes. `None` only when nothing fires in the 8 days before `t`
    /// (every schedule fires at least that often; `t` past the schedule's time limit).
    ///
    /// Searches forward from `t − w` for a window `w` doubling from one hour, so a
    /// frequent schedule costs a few dozen [`Schedule::next_after`] calls, never a week's.
    pub fn last_at_or_before(&self, t: i64, tz: &TimeZone) -> Option<i64> {
        let mut window = 3600i64;
        loop {
            let mut last = self.next_after(t.saturating_sub(window), tz);
            if last <= t {
                loop {
                    let next = self.next_after(last, tz);
                    if next > t {
                        return Some(last);
                    }
                    last = next;
                }
            }
            if window > SLOT_SEARCH_DAYS * DAY_SECONDS {
                return None;
            }
            window *= 2;
        }
    }

    /// The first allowed slot (local seconds) strictly after the local time `after`.
    fn first_slot_after(&self, after: i64) -> i64 {
        let today = after.div_euclid(DAY_SECONDS);
        for day in today..today + SLOT_SEARCH_DAYS {
            if !weekday_allowed(self.weekdays, day) {
                continue;
            }
            let day_start = day * DAY_SECONDS;
            let slot = match &self.slots {
                Slots::TimesOfDay(times) => times.iter().map(|&time| day_start + time).find(|&slot| slot > after),
                // Without a weekday filter this is simply the next multiple after `after`;
                // with one, the interval divides a day, so the next multiple lies within it.
                &Slots::Every(interval) => {
                    let slot = (after.max(day_start - 1).div_euclid(interval) + 1) * interval;
                    (self.weekdays == ALL_WEEKDAYS || slot < day_start + DAY_SECONDS).then_some(slot)
                }
            };
            if let Some(slot) = slot {
                return slot;
            }
        }
        debug_assert!(false, "no slot within {SLOT_SEARCH_DAYS} days of {after} for {self}");
        i64::MAX
    }
}

impl FromStr for Schedule {
    type Err = ScheduleError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let text = input.trim();
        if text.is_empty() {
            return Err(ScheduleError::Empty);
        }
        let bad = |token: &str, reason: &'static str| ScheduleError::InvalidToken {
            schedule: input.to_owned(),
            token: token.to_owned(),
            reason,
        };

        let (first, after_first) = match text.split_once(char::is_whitespace) {
            Some((first, rest)) => (first, rest.trim_start()),
            None => (text, ""),
        };
        let starts_alphabetic = first.chars().next().is_some_and(|c| c.is_ascii_alphabetic());
        let (weekdays, body) = if starts_alphabetic && !first.eq_ignore_ascii_case("every") {
            let weekdays = parse_weekdays(first).map_err(|(token, reason)| bad(token, reason))?;
            if after_first.is_empty() {
                return Err(bad(first, "a weekday filter must be followed by times (07:00) or an interval (every 4h)"));
            }
            (weekdays, after_first)
        } else {
            (ALL_WEEKDAYS, text)
        };

        let slots = match body.split_once(char::is_whitespace) {
            Some((keyword, rest)) if keyword.eq_ignore_ascii_case("every") => {
                let rest = rest.trim();
                let mut tokens = rest.split_whitespace();
                let token = tokens.next().unwrap_or(rest);
                if let Some(extra) = tokens.next() {
                    return Err(bad(extra, "unexpected token after the interval"));
                }
                let seconds = parse_duration_seconds(token, BareM::Minutes).map_err(|reason| bad(token, reason))?;
                if !(EVERY_MIN_SECONDS..=EVERY_MAX_SECONDS).contains(&seconds) {
                    return Err(bad(token, "interval must be between 1m and 7d"));
                }
                if weekdays != ALL_WEEKDAYS && DAY_SECONDS % seconds != 0 {
                    return Err(bad(token, "with a weekday filter the interval must divide 24h (e.g. 4h, 90m)"));
                }
                Slots::Every(seconds)
            }
            _ if body.eq_ignore_ascii_case("every") => return Err(bad(body, "expected an interval, e.g. every 4h")),
            _ => {
                let mut times = Vec::new();
                for token in body.split(',').map(str::trim) {
                    times.push(
                        parse_time_of_day(token)
                            .ok_or_else(|| bad(token, "expected a local time HH:MM (00:00..23:59)"))?,
                    );
                }
                times.sort_unstable();
                times.dedup();
                Slots::TimesOfDay(times)
            }
        };

        Ok(Schedule { weekdays, slots })
    }
}

impl TryFrom<String> for Schedule {
    type Error = ScheduleError;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        text.parse()
    }
}

/// The canonical form, which parses back to an equal schedule: `mon..fri 07:00,15:00`,
/// `every 15m`.
impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.weekdays != ALL_WEEKDAYS {
            write!(f, "{} ", WeekdaySet(self.weekdays))?;
        }
        match &self.slots {
            Slots::TimesOfDay(times) => {
                for (i, time) in times.iter().enumerate() {
                    let separator = if i == 0 { "" } else { "," };
                    write!(f, "{separator}{:02}:{:02}", time / HOUR_SECONDS, time % HOUR_SECONDS / MINUTE_SECONDS)?;
                }
                Ok(())
            }
            &Slots::Every(interval) => write!(f, "every {}", format_duration(interval, "m")),
        }
    }
}

/// Displays a weekday mask compactly: runs of three or more days as ranges (`mon..fri`).
struct WeekdaySet(u8);

impl fmt::Display for WeekdaySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        let mut day = 0;
        while day < 7 {
            if self.0 & (1 << day) == 0 {
                day += 1;
                continue;
            }
            let mut end = day;
            while end + 1 < 7 && self.0 & (1 << (end + 1)) != 0 {
                end += 1;
            }
            let separator = if first { "" } else { "," };
            first = false;
            let (start_name, end_name) = (WEEKDAY_NAMES[day], WEEKDAY_NAMES[end]);
            match end - day {
                0 => write!(f, "{separator}{start_name}")?,
                1 => write!(f, "{separator}{start_name},{end_name}")?,
                _ => write!(f, "{separator}{start_name}..{end_name}")?,
            }
            day = end + 1;
        }
        Ok(())
    }
}

/// Whether local day number `day` (days since 1970-01-01) is in the weekday mask.
fn weekday_allowed(mask: u8, day: i64) -> bool {
    mask & (1 << monday_based_weekday(day)) != 0
}

/// Parses `mon..fri`, `sat,sun`, `fri..mon` (wraps), `monday`; case-insensitive. On error,
/// returns the offending token.
fn parse_weekdays(text: &str) -> Result<u8, (&str, &'static str)> {
    const EXPECTED: &str = "expected weekdays such as mon..fri or sat,sun";
    let mut mask = 0u8;
    for item in text.split(',') {
        match item.split_once("..") {
            Some((from, to)) => {
                let from_day = parse_weekday(from).ok_or((from, EXPECTED))?;
                let to_day = parse_weekday(to).ok_or((to, EXPECTED))?;
                let mut day = from_day;
                loop {
                    mask |= 1 << day;
                    if day == to_day {
                        break;
                    }
                    day = (day + 1) % 7;
                }
            }
            None => mask |= 1 << parse_weekday(item).ok_or((item, EXPECTED))?,
        }
    }
    Ok(mask)
}

/// Monday = 0.
fn parse_weekday(name: &str) -> Option<usize> {
    (0..7).find(|&i| name.eq_ignore_ascii_case(WEEKDAY_NAMES[i]) || name.eq_ignore_ascii_case(WEEKDAY_FULL_NAMES[i]))
}

/// `H:MM` or `HH:MM`, 00:00..=23:59, as seconds after midnight.
fn parse_time_of_day(token: &str) -> Option<i64> {
    let (hours, minutes) = token.split_once(':')?;
    let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(hours) || hours.len() > 2 || !all_digits(minutes) || minutes.len() != 2 {
        return None;
    }
    let hours: i64 = hours.parse().ok()?;
    let minutes: i64 = minutes.parse().ok()?;
    (hours < 24 && minutes < 60).then_some(hours * HOUR_SECONDS + minutes * MINUTE_SECONDS)
}

// ---------------------------------------------------------------------------------------------
// Durations (shared with the retention policy)
// ---------------------------------------------------------------------------------------------

/// How a bare `m` unit reads: minutes in schedules (`every 15m`); refused in retention, where
/// restic reads `3m` as three *months* and a silent minutes reading would delete history.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BareM {
    Minutes,
    Refuse,
}

/// The longest duration accepted anywhere: 100 years of days.
const DURATION_MAX_SECONDS: i64 = 36_525 * DAY_SECONDS;

/// Parses `30s`, `15m`/`15min`, `12h`, `14d`, `8w` and sums like `1d12h`, into seconds. Units
/// are case-insensitive. Months and years are refused: they have no fixed length.
pub(crate) fn parse_duration_seconds(token: &str, bare_m: BareM) -> Result<i64, &'static str> {
    if token.is_empty() {
        return Err("empty duration: expected e.g. 14d");
    }
    let bytes = token.as_bytes();
    let mut total: i64 = 0;
    let mut i = 0;
    while i < bytes.len() {
        let digits_start = i;
        while bytes.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        let digits = token.get(digits_start..i).unwrap_or("");
        if digits.is_empty() {
            return Err("expected a number followed by a unit (s, min, h, d, w), e.g. 14d");
        }
        let number: i64 = digits.parse().map_err(|_| "number too large")?;
        let unit_start = i;
        while bytes.get(i).is_some_and(u8::is_ascii_alphabetic) {
            i += 1;
        }
        let unit = token.get(unit_start..i).unwrap_or("").to_ascii_lowercase();
        let unit_seconds = match unit.as_str() {
            "s" | "sec" => 1,
            "min" => MINUTE_SECONDS,
            "m" if bare_m == BareM::Minutes => MINUTE_SECONDS,
            "m" => {
                return Err("ambiguous unit \"m\" (restic reads months): write \"min\" for minutes, or days (\"92d\")")
            }
            "h" => HOUR_SECONDS,
            "d" => DAY_SECONDS,
            "w" => WEEK_SECONDS,
            "mo" | "month" | "months" | "y" | "year" | "years" => {
                return Err("months and years have no fixed length: write days, e.g. 92d or 365d")
            }
            "" => return Err("missing unit: expected s, min, h, d or w"),
            _ => return Err("unknown unit: expected s, min, h, d or w"),
        };
        total = number
            .checked_mul(unit_seconds)
            .and_then(|seconds| total.checked_add(seconds))
            .filter(|&total| total <= DURATION_MAX_SECONDS)
            .ok_or("duration too long: at most 36525d")?;
    }
    Ok(total)
}

/// Formats seconds with the largest unit that divides them: `14d`, `12h`, `30m`/`30min`, `45s`.
pub(crate) fn format_duration(seconds: i64, minute_unit: &str) -> String {
    if seconds != 0 && seconds % DAY_SECONDS == 0 {
        format!("{}d", seconds / DAY_SECONDS)
    } else if seconds != 0 && seconds % HOUR_SECONDS == 0 {
        format!("{}h", seconds / HOUR_SECONDS)
    } else if seconds != 0 && seconds % MINUTE_SECONDS == 0 {
        format!("{}{minute_unit}", seconds / MINUTE_SECONDS)
    } else {
        format!("{seconds}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tz::testing::*;
    use crate::tz::Date;
    use proptest::prelude::*;

    #[test]
    fn schedules_parse_to_a_canonical_form() {
        let cases = [
            ("07:00,15:00", "07:00,15:00"),
            (" 15:00, 7:00 ", "07:00,15:00"),
            ("07:00,07:00", "07:00"),
            ("every 15m", "every 15m"),
            ("every 90min", "every 90m"),
            ("EVERY 4h", "every 4h"),
            ("every 1h30m", "every 90m"),
            ("every 1d", "every 1d"),
            ("every 7d", "every 7d"),
            ("mon..fri 07:00", "mon..fri 07:00"),
            ("Mon..FRI 07:00", "mon..fri 07:00"),
            ("monday,wednesday,friday 12:00", "mon,wed,fri 12:00"),
            ("sat,sun every 6h", "sat,sun every 6h"),
            ("fri..mon 23:30", "mon,fri..sun 23:30"),
            ("mon..sun 07:00", "07:00"),
            ("tue,wed every 90m", "tue,wed every 90m"),
        ];
        for (text, canonical) in cases {
            let schedule: Schedule = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(schedule.to_string(), canonical, "{text}");
            assert_eq!(canonical.parse::<Schedule>().unwrap(), schedule, "{canonical} round trip");
        }
        let from_json: Schedule = serde_json::from_str("\"mon..fri 07:00\"").unwrap();
        assert_eq!(from_json.to_string(), "mon..fri 07:00");
        assert!(serde_json::from_str::<Schedule>("\"25:00\"").unwrap_err().to_string().contains("\"25:00\""));
    }

    #[test]
    fn schedule_errors_name_the_bad_token() {
        assert_eq!("".parse::<Schedule>(), Err(ScheduleError::Empty));
        assert_eq!("  ".parse::<Schedule>(), Err(ScheduleError::Empty));
        let cases = [
            ("25:00", "25:00"),
            ("7:5", "7:5"),
            ("07:00,,15:00", ""),
            ("07:00 15:00", "07:00 15:00"),
            ("every", "every"),
            ("every 0m", "0m"),
            ("every 30s", "30s"),
            ("every 8d", "8d"),
            ("every 15x", "15x"),
            ("every m", "m"),
            ("every 15m now", "now"),
            ("every 15m,07:00", "15m,07:00"),
            ("every 3mo", "3mo"),
            ("mon..fry 07:00", "fry"),
            ("mon", "mon"),
            ("mon every 7h", "7h"),
            ("mon,,fri 07:00", ""),
            ("noon", "noon"),
        ];
        for (text, bad_token) in cases {
            let error = text.parse::<Schedule>().unwrap_err();
            assert!(
                matches!(&error, ScheduleError::InvalidToken { schedule, token, .. } if schedule == text && token == bad_token),
                "{text:?}: expected token {bad_token:?}, got {error}"
            );
        }
        let error = "mon..fry 07:00".parse::<Schedule>().unwrap_err().to_string();
        assert_eq!(
            error,
            "schedule \"mon..fry 07:00\": bad token \"fry\": expected weekdays such as mon..fri or sat,sun"
        );
    }

    #[test]
    fn next_after_handles_times_intervals_weekdays_and_dst() {
        let kolkata = TimeZone::fixed(19_800).unwrap();
        // (schedule, zone, t, expected next firing); times are UTC, comments local.
        let cases: Vec<(&str, TimeZone, &str, &str)> = vec![
            ("07:00,15:00", berlin(), "2026-11-30 05:59:59", "2026-11-30 06:00"), // 07:00 CET
            ("07:00,15:00", berlin(), "2026-11-30 06:00", "2026-11-30 14:00"),    // strictly after
            ("07:00,15:00", berlin(), "2026-11-30 14:00", "2026-12-01 06:00"),
            ("07:00,15:00", berlin(), "2026-07-01 00:00", "2026-07-01 05:00"), // 07:00 CEST
            // Gap: 02:30 does not exist on 2026-03-29; fires at the gap's end, 03:00 CEST.
            ("02:30", berlin(), "2026-03-28 22:00", "2026-03-29 01:00"),
            ("02:30", berlin(), "2026-03-29 01:00", "2026-03-30 00:30"),
            // Overlap: 02:30 occurs twice on 2026-10-25; fires at the first (CEST) only.
            ("02:30", berlin(), "2026-10-24 22:00", "2026-10-25 00:30"),
            ("02:30", berlin(), "2026-10-25 00:30", "2026-10-26 01:30"),
            ("02:30", berlin(), "2026-10-25 01:15", "2026-10-26 01:30"), // 02:15 CET, second pass
            ("every 1h", berlin(), "2026-03-29 00:30", "2026-03-29 01:00"), // slot 02:00 → 03:00 CEST
            ("every 1h", berlin(), "2026-03-29 01:00", "2026-03-29 02:00"), // 04:00 CEST
            ("every 15m", berlin(), "2026-10-25 00:40", "2026-10-25 00:45"),
            ("every 15m", berlin(), "2026-10-25 00:45", "2026-10-25 02:00"), // 02:45 CEST → 03:00 CET
            ("every 15m", berlin(), "2026-10-25 01:20", "2026-10-25 02:00"), // repeated hour: no firing
            ("every 4h", berlin(), "2026-12-01 00:00", "2026-12-01 03:00"),  // 01:00 CET → 04:00 CET
            ("every 4h", kolkata.clone(), "2026-01-01 00:00", "2026-01-01 02:30"), // 05:30 → 08:00 IST
            ("every 15m", TimeZone::utc(), "2026-01-01 00:00", "2026-01-01 00:15"),
            ("mon..fri 07:00", berlin(), "2026-11-27 06:00", "2026-11-30 06:00"), // Friday → Monday
            ("sat,sun every 12h", berlin(), "2026-11-27 06:00", "2026-11-27 23:00"), // Sat 00:00 CET
            ("sat,sun every 12h", berlin(), "2026-11-29 11:00", "2026-12-04 23:00"), // Sun 12:00 → Sat
            ("fri..mon 23:30", berlin(), "2026-11-30 22:30", "2026-12-04 22:30"), // Mon → Fri
            ("02:30", sydney(), "2026-10-03 12:00", "2026-10-03 16:00"),          // Sydney gap: 03:00 AEDT
            ("02:30", new_york(), "2026-11-01 05:00", "2026-11-01 07:30"),        // 01:00 EDT → 02:30 EST
            ("07:00", TimeZone::utc(), "1969-12-31 23:59:59", "1970-01-01 07:00"),
            ("07:00", berlin_tzif(), "1979-07-01 00:00", "1979-07-01 06:00"), // no DST in 1979
        ];
        for (text, tz, at, expected) in cases {
            let schedule: Schedule = text.parse().unwrap();
            let next = schedule.next_after(utc(at), &tz);
            assert_eq!(
                next,
                utc(expected),
                "{text} in {tz} after {} gave {}, expected {}",
                show(&tz, utc(at)),
                show(&tz, next),
                show(&tz, utc(expected))
            );
        }
    }

    #[test]
    fn every_slot_fires_exactly_once_per_day_across_a_dst_year() {
        let schedule: Schedule = "02:30,07:00,15:00".parse().unwrap();
        for tz in [berlin(), berlin_tzif(), sydney(), new_york()] {
            let mut per_day = std::collections::BTreeMap::<Date, Vec<(u8, u8)>>::new();
            let mut t = utc("2025-12-31 00:00");
            while t < utc("2027-01-01 00:00") {
                t = schedule.next_after(t, &tz);
                let local = tz.to_local(t);
                per_day.entry(local.date).or_default().push((local.hour, local.minute));
            }
            let days_2026: Vec<_> = per_day.iter().filter(|(date, _)| date.year == 2026).collect();
            assert_eq!(days_2026.len(), 365, "{tz}");
            for (date, times) in days_2026 {
                // 02:30 fires at 03:00 on the day it does not exist.
                let ok = times == &[(2, 30), (7, 0), (15, 0)] || times == &[(3, 0), (7, 0), (15, 0)];
                assert!(ok, "{tz} {date}: {times:?}");
            }
        }
    }

    #[test]
    fn every_fifteen_minutes_counts_per_local_day_in_berlin() {
        let schedule: Schedule = "every 15m".parse().unwrap();
        let tz = berlin();
        let count_on = |day: &str| {
            let (mut t, end) = (utc(&format!("{day} 00:00")) - 3 * 3_600, utc(&format!("{day} 00:00")) + 26 * 3_600);
            let mut count = 0;
            loop {
                t = schedule.next_after(t, &tz);
                if t > end {
                    return count;
                }
                count += usize::from(tz.to_local(t).date.to_string() == day);
            }
        };
        assert_eq!(count_on("2026-03-28"), 96);
        assert_eq!(count_on("2026-03-29"), 92, "02:00..02:45 do not exist and fold into 03:00");
        assert_eq!(count_on("2026-10-25"), 96, "the repeated hour does not fire twice");
    }

    #[test]
    fn missed_fires_once_after_downtime() {
        let schedule: Schedule = "07:00,15:00".parse().unwrap();
        let tz = berlin();
        let last_run = utc("2026-11-30 06:00");
        let cases = [
            ("2026-11-30 13:59:59", false),
            ("2026-11-30 14:00", true),
            ("2026-12-04 10:00", true),  // days down: one catch-up, not eight
            ("2026-11-29 00:00", false), // clock behind the last run
        ];
        for (now, expected) in cases {
            assert_eq!(schedule.missed(last_run, utc(now), &tz), expected, "now {now}");
        }
        let now = utc("2026-12-04 10:00");
        // The one firing owed: 07:00 CET that morning.
        assert_eq!(schedule.last_at_or_before(now, &tz), Some(utc("2026-12-04 06:00")));
        assert_eq!(schedule.last_at_or_before(utc("2026-12-04 06:00"), &tz), Some(utc("2026-12-04 06:00")));
        assert!(!schedule.missed(now, now, &tz), "after the catch-up at `now` nothing is overdue");
        assert_eq!(schedule.next_after(now, &tz), utc("2026-12-04 14:00"));
    }

    #[test]
    fn extreme_times_do_not_overflow() {
        let schedule: Schedule = "every 15m".parse().unwrap();
        for tz in [TimeZone::utc(), berlin(), berlin_tzif()] {
            assert_eq!(schedule.next_after(i64::MAX, &tz), i64::MAX);
            assert!(schedule.next_after(i64::MIN, &tz) > i64::MIN);
            let _ = tz.to_local(i64::MIN);
            let _ = tz.to_local(i64::MAX);
            assert!(!schedule.missed(i64::MAX, i64::MIN, &tz));
        }
    }

    fn zones() -> Vec<TimeZone> {
        vec![TimeZone::utc(), berlin(), berlin_tzif(), sydney(), new_york(), TimeZone::fixed(19_800).unwrap()]
    }

    const SCHEDULES: [&str; 8] = [
        "07:00,15:00",
        "02:30",
        "every 15m",
        "every 4h",
        "every 7h",
        "mon..fri 02:00,02:30,03:00",
        "sat,sun every 20m",
        "every 7d",
    ];

    fn times() -> impl Strategy<Value = i64> {
        let around = |at: &str| {
            let t = utc(at);
            t - 3 * DAY_SECONDS..t + 3 * DAY_SECONDS
        };
        prop_oneof![
            -(1i64 << 40)..(1i64 << 40),
            around("2026-03-29 01:00"),
            around("2026-10-25 01:00"),
            around("2026-04-04 16:00"),
            around("2026-11-01 06:00"),
        ]
    }

    proptest! {
        #[test]
        fn next_after_is_strictly_later_and_nothing_fires_in_between(
            zone in 0..6usize,
            schedule in 0..SCHEDULES.len(),
            t in times(),
        ) {
            let tz = &zones()[zone];
            let schedule: Schedule = SCHEDULES[schedule].parse().unwrap();
            let next = schedule.next_after(t, tz);
            prop_assert!(next > t);
            prop_assert!(next - t <= 8 * DAY_SECONDS);
            // Nothing fires in (t, next): asking from just before `next` gives `next` again.
            prop_assert_eq!(schedule.next_after(next - 1, tz), next);
            prop_assert!(!schedule.missed(t, next - 1, tz));
            prop_assert!(schedule.missed(t, next, tz));
        }

        #[test]
        fn last_at_or_before_is_the_latest_firing_not_after_t(
            zone in 0..6usize,
            schedule in 0..SCHEDULES.len(),
            t in times(),
        ) {
            let tz = &zones()[zone];
            let schedule: Schedule = SCHEDULES[schedule].parse().unwrap();
            let last = schedule.last_at_or_before(t, tz).unwrap();
            prop_assert!(last <= t);
            // It is a firing, and no firing lies in (last, t].
            prop_assert_eq!(schedule.next_after(last - 1, tz), last);
            prop_assert!(schedule.next_after(last, tz) > t);
        }

        #[test]
        fn schedule_grammar_fragments_never_panic(
            parts in proptest::collection::vec(
                prop_oneof![
                    Just("mon"), Just(".."), Just(","), Just(" "), Just("every"), Just("15m"), Just("07:00"),
                    Just("99:99"), Just("0"), Just("sun"), Just("7d"), Just("1h"), Just("m"), Just(":"),
                ],
                0..8,
            ),
        ) {
            let text: String = parts.concat();
            if let Ok(schedule) = text.parse::<Schedule>() {
                prop_assert_eq!(schedule.to_string().parse::<Schedule>().unwrap(), schedule.clone());
                prop_assert!(schedule.next_after(0, &berlin()) > 0);
            }
        }

        #[test]
        fn mutated_zone_files_never_panic(
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
            t in any::<i64>(),
        ) {
            let mut bytes = std::fs::read("/usr/share/zoneinfo/Europe/Berlin").unwrap();
            for (index, byte) in edits {
                let i = index.index(bytes.len());
                bytes[i] = byte;
            }
            if let Ok(tz) = TimeZone::from_tzif("Fuzz/Berlin", &bytes) {
                let _ = tz.to_local(t);
                let schedule: Schedule = "every 15m".parse().unwrap();
                prop_assert!(schedule.next_after(t, &tz) > t || t >= SCHEDULE_TIME_LIMIT);
            }
        }
    }
}
