//! UTC calendar days: the unit of a token budget and of usage reports.
//!
//! chatpool needs only a day's number, its `YYYY-MM-DD` name and the seconds until the next
//! one, so it computes them here from the Unix clock (Howard Hinnant's civil-date algorithms)
//! rather than take a calendar crate.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const DAY_SECS: u64 = 86_400;

/// A UTC calendar day, counted from 1970-01-01.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Day(i64);

impl Day {
    /// The day `time` falls in.
    pub fn of(time: SystemTime) -> Day {
        Day((unix_secs(time) / DAY_SECS) as i64)
    }

    /// How long from `time` until the next day begins (at least a second, as `Retry-After`
    /// counts whole seconds).
    pub fn rest_after(time: SystemTime) -> Duration {
        let secs = DAY_SECS - unix_secs(time) % DAY_SECS;
        Duration::from_secs(secs.max(1))
    }

    /// Parses `YYYY-MM-DD`, refusing anything else and dates that do not exist.
    pub fn parse(text: &str) -> Option<Day> {
        let bytes = text.as_bytes();
        let shaped = bytes.len() == 10
            && bytes[4] == b'-'
            && bytes[7] == b'-'
            && bytes
                .iter()
                .enumerate()
                .all(|(i, b)| i == 4 || i == 7 || b.is_ascii_digit());
        if !shaped {
            return None;
        }
        let year: i64 = text[..4].parse().ok()?;
        let month: u32 = text[5..7].parse().ok()?;
        let day: u32 = text[8..].parse().ok()?;
        if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
            return None;
        }
        Some(Day(days_from_civil(year, month, day)))
    }
}

impl fmt::Display for Day {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (year, month, day) = civil_from_days(self.0);
        write!(f, "{year:04}-{month:02}-{day:02}")
    }
}

/// Seconds since the epoch; a clock set before 1970 counts as 1970.
fn unix_secs(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn is_leap(year: i64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn names_days_and_reads_them_back() {
        assert_eq!(Day::of(at(0)).to_string(), "1970-01-01");
        // 2026-11-30T23:59:59Z, then midnight.
        assert_eq!(Day::of(at(1_796_083_199)).to_string(), "2026-11-30");
        assert_eq!(Day::of(at(1_796_083_200)).to_string(), "2026-12-01");
        assert_eq!(Day::of(at(951_782_400)).to_string(), "2000-02-29");
        for day in (-719_162..2_932_896).step_by(997) {
            let day = Day(day);
            assert_eq!(Day::parse(&day.to_string()), Some(day), "{day}");
        }
    }

    #[test]
    fn refuses_what_is_not_a_date() {
        for bad in [
            "2026-02-29",
            "2100-02-29",
            "2026-13-01",
            "2026-00-10",
            "2026-04-31",
            "2026-1-01",
            "26-11-30",
            "2026/11/30",
            "2026-11-3x",
            "+026-11-30",
            "",
        ] {
            assert_eq!(Day::parse(bad), None, "{bad}");
        }
        assert!(Day::parse("2024-02-29").is_some());
    }

    #[test]
    fn the_rest_of_a_day_runs_to_midnight() {
        assert_eq!(Day::rest_after(at(1_796_083_199)), Duration::from_secs(1));
        assert_eq!(
            Day::rest_after(at(1_796_083_200)),
            Duration::from_secs(86_400)
        );
        assert_eq!(
            Day::rest_after(at(1_796_083_200 - 3600)),
            Duration::from_secs(3600)
        );
    }
}
