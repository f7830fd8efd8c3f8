//! Server pushback: `Retry-After` and `X-RateLimit-Reset`.
//!
//! A 429 or 503 may tell the client when to come back. Two headers say it:
//!
//! - `Retry-After` (RFC 9110 §10.2.3): either delay seconds (`120`, digits only) or an HTTP date.
//!   Dates are read in all three forms RFC 9110 §5.6.7 asks recipients to accept: IMF-fixdate
//!   (`Sun, 06 Nov 1994 08:49:37 GMT`), the obsolete RFC 850 form (`Sunday, 06-Nov-94 08:49:37
//!   GMT`, a two-digit year more than 50 years ahead of now meaning the century before) and
//!   asctime (`Sun Nov  6 08:49:37 1994`). A date is turned into a delay against the current Unix
//!   time passed in; a date in the past means "now" (zero).
//! - `X-RateLimit-Reset` (no standard; GitHub and Envoy's `local_ratelimit` send Unix seconds,
//!   other APIs send seconds to wait). Rule: a non-negative number, optionally with a fraction
//!   (`1470173023.123`). A value below 10^9 (a Unix time in September 2001, before any live
//!   reset time) is delay seconds; from 10^9 on it is a Unix time, converted like a date.
//!
//! Both are bounded, as in Envoy, which discards values above 300 s: a delay above `max` is not
//! a delay but an outage notice, reported as [`Pushback::TooLong`] so that the retry plan can
//! give up and hand the server's own answer to the client rather than hold a request for
//! minutes (Envoy instead falls back to its normal backoff). Text that is not one of these forms
//! (garbage, negative numbers, impossible dates) is ignored: `None`.
//!
//! Invariant: parsing never panics and never overflows, whatever the header holds.

use crate::time::Duration;

/// What a server asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pushback {
    /// Wait this long before the next attempt (at most the bound it was parsed with).
    After(Duration),
    /// The server asked for a wait longer than the bound.
    TooLong,
}

impl Pushback {
    fn bounded(delay: Duration, max: Duration) -> Pushback {
        if delay > max {
            Pushback::TooLong
        } else {
            Pushback::After(delay)
        }
    }
}

/// Unix times below this are read as delay seconds in `X-RateLimit-Reset`.
pub const RESET_DELTA_BELOW: u64 = 1_000_000_000;

const NANOS_PER_SEC: u64 = 1_000_000_000;

/// Reads a `Retry-After` value: delay seconds or an HTTP date, against `unix_now` (the time since
/// the Unix epoch), bounded by `max`. `None` when the value is neither.
pub fn parse_retry_after(value: &str, unix_now: Duration, max: Duration) -> Option<Pushback> {
    let value = value.trim();
    if value.bytes().all(|b| b.is_ascii_digit()) {
        return parse_seconds(value, max);
    }
    let date = parse_http_date(value, unix_now)?;
    Some(Pushback::bounded(until(date, 0, unix_now), max))
}

/// Reads an `X-RateLimit-Reset` value (see the module docs for the delay-or-Unix-time rule),
/// against `unix_now`, bounded by `max`. `None` when the value is not a non-negative number.
pub fn parse_rate_limit_reset(value: &str, unix_now: Duration, max: Duration) -> Option<Pushback> {
    let value = value.trim();
    let (whole, frac) = value.split_once('.').unwrap_or((value, ""));
    if whole.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if !frac.bytes().all(|b| b.is_ascii_digit()) || (value.contains('.') && frac.is_empty()) {
        return None;
    }
    let Ok(secs) = whole.parse::<u64>() else {
        // All digits but more than u64 holds: a number, and far too large.
        return Some(Pushback::TooLong);
    };
    let nanos = fraction_nanos(frac);
    if secs < RESET_DELTA_BELOW {
        let delay = Duration::from_secs(secs).saturating_add(Duration::from_nanos(nanos));
        Some(Pushback::bounded(delay, max))
    } else {
        Some(Pushback::bounded(until(secs, nanos, unix_now), max))
    }
}

/// Digits only: delay seconds. Too many digits for a `u64` is still a number, and too long.
fn parse_seconds(digits: &str, max: Duration) -> Option<Pushback> {
    if digits.is_empty() {
        return None;
    }
    match digits.parse::<u64>() {
        Ok(secs) => Some(Pushback::bounded(Duration::from_secs(secs), max)),
        Err(_) => Some(Pushback::TooLong),
    }
}

/// Up to nine fractional digits as nanoseconds; further digits are below resolution.
fn fraction_nanos(frac: &str) -> u64 {
    let mut nanos = 0;
    let mut place = NANOS_PER_SEC;
    for digit in frac.bytes().take(9) {
        place /= 10;
        nanos += u64::from(digit - b'0') * place;
    }
    nanos
}

/// The delay from `unix_now` until Unix time `secs` + `nanos`; zero if that is past.
fn until(secs: u64, nanos: u64, unix_now: Duration) -> Duration {
    let at = Duration::from_secs(secs).saturating_add(Duration::from_nanos(nanos));
    at.saturating_sub(unix_now)
}

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];
const SHORT_DAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
const LONG_DAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// Parses an HTTP date (IMF-fixdate, RFC 850 or asctime) into Unix seconds. `unix_now` only
/// places an RFC 850 two-digit year in its century. `None` for anything else, dates before
/// 1970 included. The day name must be a day name but is not checked against the date, as RFC
/// 9110 allows.
pub fn parse_http_date(value: &str, unix_now: Duration) -> Option<u64> {
    let value = value.trim();
    let (day_name, rest) = match value.split_once(", ") {
        Some(split) => split,
        None => {
            // asctime: `Sun Nov  6 08:49:37 1994`.
            let (day_name, rest) = value.split_once(' ')?;
            if !SHORT_DAYS.contains(&day_name) {
                return None;
            }
            return parse_asctime(rest);
        }
    };
    if SHORT_DAYS.contains(&day_name) {
        parse_imf_fixdate(rest)
    } else if LONG_DAYS.contains(&day_name) {
        parse_rfc850(rest, unix_now)
    } else {
        None
    }
}

/// `06 Nov 1994 08:49:37 GMT`.
fn parse_imf_fixdate(rest: &str) -> Option<u64> {
    let mut parts = rest.split(' ');
    let day = two_digits(parts.next()?)?;
    let month = month(parts.next()?)?;
    let year = four_digits(parts.next()?)?;
    let time = parts.next()?;
    if parts.next()? != "GMT" || parts.next().is_some() {
        return None;
    }
    unix_seconds(year, month, day, time)
}

/// `06-Nov-94 08:49:37 GMT`.
fn parse_rfc850(rest: &str, unix_now: Duration) -> Option<u64> {
    let mut parts = rest.split(' ');
    let date = parts.next()?;
    let time = parts.next()?;
    if parts.next()? != "GMT" || parts.next().is_some() {
        return None;
    }
    let mut fields = date.split('-');
    let day = two_digits(fields.next()?)?;
    let month = month(fields.next()?)?;
    let yy = two_digits(fields.next()?)?;
    if fields.next().is_some() {
        return None;
    }
    // RFC 9110 §5.6.7: a two-digit year that appears to be more than 50 years in the future
    // is the most recent past year with the same last two digits.
    let this_year = year_of(unix_now.as_secs());
    let mut year = this_year - this_year % 100 + yy;
    if year > this_year + 50 {
        year -= 100;
    }
    unix_seconds(year, month, day, time)
}

/// `Nov  6 08:49:37 1994` (the day padded with a space to two characters).
fn parse_asctime(rest: &str) -> Option<u64> {
    let month = month(rest.get(0..3)?)?;
    let rest = rest.get(3..)?.strip_prefix(' ')?;
    let day_field = rest.get(0..2)?;
    let day = match day_field.strip_prefix(' ') {
        Some(single) => digits::<1>(single)?,
        None => two_digits(day_field)?,
    };
    let mut parts = rest.get(2..)?.strip_prefix(' ')?.split(' ');
    let time = parts.next()?;
    let year = four_digits(parts.next()?)?;
    if parts.next().is_some() {
        return None;
    }
    unix_seconds(year, month, day, time)
}

fn month(name: &str) -> Option<u64> {
    let index = MONTHS.iter().position(|m| *m == name)?;
    Some(index as u64 + 1)
}

fn digits<const N: usize>(text: &str) -> Option<u64> {
    if text.len() != N || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

fn two_digits(text: &str) -> Option<u64> {
    digits::<2>(text)
}

fn four_digits(text: &str) -> Option<u64> {
    digits::<4>(text)
}

/// `08:49:37` and a checked calendar date to Unix seconds; `None` before 1970.
fn unix_seconds(year: u64, month: u64, day: u64, time: &str) -> Option<u64> {
    let mut hms = time.split(':');
    let hour = two_digits(hms.next()?)?;
    let minute = two_digits(hms.next()?)?;
    let second = two_digits(hms.next()?)?;
    // A leap second (`:60`) is accepted: it reads as the next second.
    if hms.next().is_some() || hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    if year < 1970 || month == 0 || month > 12 || day == 0 || day > days_in_month(year, month) {
        return None;
    }
    let days = days_from_civil(year, month, day);
    Some(days * 86_400 + hour * 3600 + minute * 60 + second)
}

fn is_leap(year: u64) -> bool {
    year.is_multiple_of(4) && (!year.is_multiple_of(100) || year.is_multiple_of(400))
}

fn days_in_month(year: u64, month: u64) -> u64 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days from 1970-01-01 to a date on or after it (Howard Hinnant's `days_from_civil`, for
/// years from 1970, so all in unsigned arithmetic).
fn days_from_civil(year: u64, month: u64, day: u64) -> u64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The calendar year of a Unix time in seconds.
fn year_of(unix_secs: u64) -> u64 {
    // Hinnant's `civil_from_days`, the year part only.
    let z = unix_secs / 86_400 + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let month_is_jan_or_feb = mp >= 10;
    yoe + era * 400 + u64::from(month_is_jan_or_feb)
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;

    /// 1994-11-06 08:49:37 UTC, the RFC's example date.
    const RFC_EXAMPLE: u64 = 784_111_777;
    const MAX: Duration = Duration::from_secs(300);

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn after(n: u64) -> Option<Pushback> {
        Some(Pushback::After(secs(n)))
    }

    #[test]
    fn delay_seconds() {
        let now = secs(RFC_EXAMPLE);
        assert_eq!(parse_retry_after("0", now, MAX), after(0));
        assert_eq!(parse_retry_after("120", now, MAX), after(120));
        assert_eq!(parse_retry_after(" 7 ", now, MAX), after(7));
        assert_eq!(parse_retry_after("300", now, MAX), after(300));
        assert_eq!(parse_retry_after("301", now, MAX), Some(Pushback::TooLong));
    }

    #[test]
    fn huge_values_are_too_long_not_garbage() {
        let now = secs(RFC_EXAMPLE);
        let huge = "99999999999999999999999999999999";
        assert_eq!(parse_retry_after(huge, now, MAX), Some(Pushback::TooLong));
        assert_eq!(
            parse_retry_after("18446744073709551615", now, MAX),
            Some(Pushback::TooLong)
        );
        assert_eq!(
            parse_rate_limit_reset(huge, now, MAX),
            Some(Pushback::TooLong)
        );
        assert_eq!(
            parse_retry_after("18446744073709551615", now, Duration::MAX),
            Some(Pushback::After(Duration::MAX))
        );
    }

    #[test]
    fn garbage_and_negative_values_are_ignored() {
        let now = secs(RFC_EXAMPLE);
        for value in [
            "",
            " ",
            "-1",
            "-120",
            "+5",
            "1.5",
            "5s",
            "soon",
            "0x10",
            "１２",
            "Sun, 06 Nov 1994 08:49:37 UTC",
            "Sun, 06 Nov 1994 08:49:37",
            "Sun, 6 Nov 1994 08:49:37 GMT",
            "Sun, 06 nov 1994 08:49:37 GMT",
            "Sun, 06 Nov 94 08:49:37 GMT",
            "Sun, 31 Nov 1994 08:49:37 GMT",
            "Sun, 29 Feb 1995 08:49:37 GMT",
            "Sun, 06 Nov 1994 24:00:00 GMT",
            "Sun, 06 Nov 1994 08:60:00 GMT",
            "Sun, 06 Nov 1994 08:49 GMT",
            "Sun, 06 Nov 1994 08:49:37 GMT extra",
            "Sun, 01 Jan 1969 00:00:00 GMT",
            "Funday, 06-Nov-94 08:49:37 GMT",
            "Sun, 06-Nov-94 08:49:37 GMT",
            "Sun Nov 6 08:49:37 1994",
            "Sun Nov  6 08:49:37 94",
            "Xyz Nov  6 08:49:37 1994",
        ] {
            assert_eq!(parse_retry_after(value, now, MAX), None, "{value:?}");
        }
        for value in ["", "-5", "1e9", "abc", "1.", ".5", "1.2.3", "1.x"] {
            assert_eq!(parse_rate_limit_reset(value, now, MAX), None, "{value:?}");
        }
    }

    #[test]
    fn the_three_http_date_forms() {
        let now = Duration::from_secs(RFC_EXAMPLE);
        for value in [
            "Sun, 06 Nov 1994 08:49:37 GMT",
            "Sunday, 06-Nov-94 08:49:37 GMT",
            "Sun Nov  6 08:49:37 1994",
        ] {
            assert_eq!(parse_http_date(value, now), Some(RFC_EXAMPLE), "{value}");
        }
        assert_eq!(
            parse_http_date("Thu, 01 Jan 1970 00:00:00 GMT", now),
            Some(0)
        );
        assert_eq!(
            parse_http_date("Tue, 29 Feb 2000 23:59:59 GMT", now),
            Some(951_868_799)
        );
        assert_eq!(
            parse_http_date("Sat, 01 Jan 2039 00:00:00 GMT", now),
            Some(2_177_452_800)
        );
        assert_eq!(
            parse_http_date("Sun Nov 16 08:49:37 1994", now),
            Some(RFC_EXAMPLE + 10 * 86_400)
        );
        // The weekday is not checked against the date.
        assert_eq!(
            parse_http_date("Mon, 06 Nov 1994 08:49:37 GMT", now),
            Some(RFC_EXAMPLE)
        );
    }

    #[test]
    fn rfc850_two_digit_years_follow_the_fifty_year_rule() {
        // Now is in 2024: 74 would be 2074, exactly 50 years ahead, so it stays; 75 is 1975.
        let now = Duration::from_secs(1_717_200_000);
        let at = |yy: &str| {
            parse_http_date(&alloc::format!("Monday, 01-Jan-{yy} 00:00:00 GMT"), now).map(year_of)
        };
        assert_eq!(at("24"), Some(2024));
        assert_eq!(at("74"), Some(2074));
        assert_eq!(at("75"), Some(1975));
        assert_eq!(at("99"), Some(1999));
    }

    #[test]
    fn a_date_becomes_a_delay_against_now() {
        let date = "Sun, 06 Nov 1994 08:49:37 GMT";
        let now = secs(RFC_EXAMPLE - 90);
        assert_eq!(parse_retry_after(date, now, MAX), after(90));
        let now_with_fraction = Duration::from_millis((RFC_EXAMPLE - 2) * 1000 + 250);
        assert_eq!(
            parse_retry_after(date, now_with_fraction, MAX),
            Some(Pushback::After(Duration::from_millis(1750)))
        );
        // In the past: come back now.
        assert_eq!(
            parse_retry_after(date, secs(RFC_EXAMPLE + 5), MAX),
            after(0)
        );
        // Far ahead.
        assert_eq!(
            parse_retry_after(date, secs(RFC_EXAMPLE - 3600), MAX),
            Some(Pushback::TooLong)
        );
    }

    #[test]
    fn rate_limit_reset_small_is_a_delay_large_is_a_unix_time() {
        let now = secs(1_700_000_000);
        assert_eq!(parse_rate_limit_reset("30", now, MAX), after(30));
        assert_eq!(parse_rate_limit_reset("0", now, MAX), after(0));
        assert_eq!(
            parse_rate_limit_reset("1.5", now, MAX),
            Some(Pushback::After(Duration::from_millis(1500)))
        );
        assert_eq!(
            parse_rate_limit_reset("999999999", now, MAX),
            Some(Pushback::TooLong)
        );
        assert_eq!(parse_rate_limit_reset("1700000042", now, MAX), after(42));
        assert_eq!(
            parse_rate_limit_reset("1700000000.25", now, MAX),
            Some(Pushback::After(Duration::from_millis(250)))
        );
        assert_eq!(parse_rate_limit_reset("1600000000", now, MAX), after(0));
        assert_eq!(
            parse_rate_limit_reset("1700009999", now, MAX),
            Some(Pushback::TooLong)
        );
        assert_eq!(
            parse_rate_limit_reset("1000000000", Duration::ZERO, MAX),
            Some(Pushback::TooLong)
        );
        assert_eq!(
            parse_rate_limit_reset("5.1234567891", now, MAX),
            Some(Pushback::After(Duration::from_nanos(5_123_456_789)))
        );
    }

    #[test]
    fn random_bytes_never_panic() {
        use crate::rand::{Rng, SeededRng};
        let mut rng = SeededRng::new(9);
        let alphabet = b"0123456789 ,:-.GMTSunNovJanFebday\t+x";
        for _ in 0..5000 {
            let len = rng.below(40) as usize;
            let text: alloc::string::String = (0..len)
                .map(|_| alphabet[rng.below(alphabet.len() as u64) as usize] as char)
                .collect();
            let now = Duration::from_nanos(rng.next_u64());
            let _ = parse_retry_after(&text, now, MAX);
            let _ = parse_rate_limit_reset(&text, now, MAX);
        }
    }

    #[test]
    fn year_of_matches_known_dates() {
        assert_eq!(year_of(0), 1970);
        assert_eq!(year_of(RFC_EXAMPLE), 1994);
        assert_eq!(year_of(951_868_799), 2000);
        assert_eq!(year_of(951_868_800), 2000);
        assert_eq!(year_of(978_307_199), 2000);
        assert_eq!(year_of(978_307_200), 2001);
    }
}
