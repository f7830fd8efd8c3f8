//! Time as plain nanosecond counts.
//!
//! An [`Instant`] is a point on the host's clock (nanoseconds since the Unix epoch in Envoy,
//! since the start of a test in the harness); a [`Duration`] is a span. Both are `u64`
//! newtypes with saturating and checked arithmetic, after governor's `Nanos` and embassy-time:
//! the core never panics on time that goes backwards or overflows, it clamps.
//!
//! Durations in configuration are strings: `"250ms"`, `"10s"`, `"1m"`, `"1h"`, also `"ns"`,
//! `"us"` and decimals such as `"1.5s"`. See [`Duration::parse`].

use core::fmt;

/// A span of time in nanoseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Duration(u64);

/// A point in time, in nanoseconds on the host's clock.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Instant(u64);

const NANOS_PER_MICRO: u64 = 1_000;
const NANOS_PER_MILLI: u64 = 1_000_000;
const NANOS_PER_SEC: u64 = 1_000_000_000;

impl Duration {
    /// No time at all.
    pub const ZERO: Duration = Duration(0);
    /// The longest representable span (about 584 years).
    pub const MAX: Duration = Duration(u64::MAX);

    /// A span of `n` nanoseconds.
    pub const fn from_nanos(n: u64) -> Self {
        Duration(n)
    }
    /// A span of `n` microseconds (saturating).
    pub const fn from_micros(n: u64) -> Self {
        Duration(n.saturating_mul(NANOS_PER_MICRO))
    }
    /// A span of `n` milliseconds (saturating).
    pub const fn from_millis(n: u64) -> Self {
        Duration(n.saturating_mul(NANOS_PER_MILLI))
    }
    /// A span of `n` seconds (saturating).
    pub const fn from_secs(n: u64) -> Self {
        Duration(n.saturating_mul(NANOS_PER_SEC))
    }
    /// The span in nanoseconds.
    pub const fn as_nanos(self) -> u64 {
        self.0
    }
    /// The span in whole milliseconds, rounded down.
    pub const fn as_millis(self) -> u64 {
        self.0 / NANOS_PER_MILLI
    }
    /// The span in whole seconds, rounded down.
    pub const fn as_secs(self) -> u64 {
        self.0 / NANOS_PER_SEC
    }
    /// The span in whole seconds, rounded up: what a `Retry-After` header must say so that a
    /// client that obeys it is not refused again.
    pub const fn as_secs_ceil(self) -> u64 {
        self.0.div_ceil(NANOS_PER_SEC)
    }
    /// The span in seconds as a float.
    pub fn as_secs_f64(self) -> f64 {
        self.0 as f64 / NANOS_PER_SEC as f64
    }
    /// Whether the span is empty.
    pub const fn is_zero(self) -> bool {
        self.0 == 0
    }
    /// `self + rhs`, or `None` on overflow.
    pub const fn checked_add(self, rhs: Duration) -> Option<Duration> {
        match self.0.checked_add(rhs.0) {
            Some(n) => Some(Duration(n)),
            None => None,
        }
    }
    /// `self + rhs`, clamped to [`Duration::MAX`].
    pub const fn saturating_add(self, rhs: Duration) -> Duration {
        Duration(self.0.saturating_add(rhs.0))
    }
    /// `self - rhs`, clamped to zero.
    pub const fn saturating_sub(self, rhs: Duration) -> Duration {
        Duration(self.0.saturating_sub(rhs.0))
    }
    /// `self * n`, clamped to [`Duration::MAX`].
    pub const fn saturating_mul(self, n: u64) -> Duration {
        Duration(self.0.saturating_mul(n))
    }
    /// `self / n`; a division by zero gives [`Duration::MAX`] rather than a panic.
    pub const fn div(self, n: u64) -> Duration {
        match self.0.checked_div(n) {
            Some(v) => Duration(v),
            None => Duration::MAX,
        }
    }
    /// The smaller of two spans.
    pub fn min(self, other: Duration) -> Duration {
        Ord::min(self, other)
    }

    /// Parses a duration string: a non-negative number (integer or decimal) followed by a unit,
    /// one of `ns`, `us`, `ms`, `s`, `m`, `h`. Examples: `"250ms"`, `"10s"`, `"1.5s"`, `"1m"`.
    pub fn parse(text: &str) -> Result<Duration, DurationError> {
        let text = text.trim();
        let split = text
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or(DurationError::MissingUnit)?;
        let (number, unit) = text.split_at(split);
        if number.is_empty() {
            return Err(DurationError::MissingNumber);
        }
        let unit_nanos = match unit {
            "ns" => 1,
            "us" | "µs" => NANOS_PER_MICRO,
            "ms" => NANOS_PER_MILLI,
            "s" => NANOS_PER_SEC,
            "m" => 60 * NANOS_PER_SEC,
            "h" => 3600 * NANOS_PER_SEC,
            _ => return Err(DurationError::UnknownUnit),
        };
        let (whole, frac) = match number.split_once('.') {
            Some((w, f)) => (w, f),
            None => (number, ""),
        };
        if whole.is_empty() && frac.is_empty() || frac.contains('.') {
            return Err(DurationError::MissingNumber);
        }
        let whole: u64 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| DurationError::TooLarge)?
        };
        let mut nanos = whole
            .checked_mul(unit_nanos)
            .ok_or(DurationError::TooLarge)?;
        // Fractional digits: each digit is worth a tenth of the previous one. Digits beyond a
        // nanosecond's resolution are dropped.
        let mut place = unit_nanos;
        for digit in frac.bytes() {
            place /= 10;
            if place == 0 {
                break;
            }
            nanos = nanos
                .checked_add(u64::from(digit - b'0') * place)
                .ok_or(DurationError::TooLarge)?;
        }
        Ok(Duration(nanos))
    }
}

impl fmt::Display for Duration {
    /// Formats in the largest unit that divides the span exactly (`"250ms"`, `"10s"`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        let units: [(u64, &str); 5] = [
            (3600 * NANOS_PER_SEC, "h"),
            (60 * NANOS_PER_SEC, "m"),
            (NANOS_PER_SEC, "s"),
            (NANOS_PER_MILLI, "ms"),
            (NANOS_PER_MICRO, "us"),
        ];
        if n == 0 {
            return f.write_str("0s");
        }
        for (size, name) in units {
            if n.is_multiple_of(size) {
                return write!(f, "{}{}", n / size, name);
            }
        }
        write!(f, "{n}ns")
    }
}

/// Why a duration string was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DurationError {
    /// No number before the unit.
    MissingNumber,
    /// No unit after the number.
    MissingUnit,
    /// A unit other than `ns`, `us`, `ms`, `s`, `m`, `h`.
    UnknownUnit,
    /// More than `u64::MAX` nanoseconds.
    TooLarge,
}

impl fmt::Display for DurationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DurationError::MissingNumber => "no number",
            DurationError::MissingUnit => "no unit (ns, us, ms, s, m, h)",
            DurationError::UnknownUnit => "unknown unit (use ns, us, ms, s, m, h)",
            DurationError::TooLarge => "too large",
        })
    }
}

impl Instant {
    /// The clock's origin.
    pub const ZERO: Instant = Instant(0);

    /// The instant `n` nanoseconds after the clock's origin.
    pub const fn from_nanos(n: u64) -> Self {
        Instant(n)
    }
    /// Nanoseconds since the clock's origin.
    pub const fn as_nanos(self) -> u64 {
        self.0
    }
    /// `self + d`, clamped at the end of time.
    pub const fn saturating_add(self, d: Duration) -> Instant {
        Instant(self.0.saturating_add(d.0))
    }
    /// `self - d`, clamped at the origin.
    pub const fn saturating_sub(self, d: Duration) -> Instant {
        Instant(self.0.saturating_sub(d.0))
    }
    /// `self + d`, or `None` past the end of time.
    pub const fn checked_add(self, d: Duration) -> Option<Instant> {
        match self.0.checked_add(d.0) {
            Some(n) => Some(Instant(n)),
            None => None,
        }
    }
    /// How long after `earlier` this instant is; zero if it is not later.
    pub const fn saturating_since(self, earlier: Instant) -> Duration {
        Duration(self.0.saturating_sub(earlier.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_config_contract_examples() {
        assert_eq!(Duration::parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(Duration::parse("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(Duration::parse("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(Duration::parse("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(Duration::parse("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(Duration::parse("0.001ms"), Ok(Duration::from_nanos(1000)));
        assert_eq!(Duration::parse("20us"), Ok(Duration::from_micros(20)));
        assert_eq!(Duration::parse(" 5ns "), Ok(Duration::from_nanos(5)));
    }

    #[test]
    fn refuses_what_is_not_a_duration() {
        assert_eq!(Duration::parse("fast"), Err(DurationError::MissingNumber));
        assert_eq!(Duration::parse("10"), Err(DurationError::MissingUnit));
        assert_eq!(Duration::parse("10d"), Err(DurationError::UnknownUnit));
        assert_eq!(Duration::parse("-1s"), Err(DurationError::MissingNumber));
        assert_eq!(Duration::parse("1.2.3s"), Err(DurationError::MissingNumber));
        assert_eq!(Duration::parse("."), Err(DurationError::MissingUnit));
        assert_eq!(Duration::parse(".s"), Err(DurationError::MissingNumber));
        assert_eq!(
            Duration::parse("99999999999999999999s"),
            Err(DurationError::TooLarge)
        );
        assert_eq!(
            Duration::parse("9999999999999h"),
            Err(DurationError::TooLarge)
        );
    }

    #[test]
    fn displays_in_the_largest_exact_unit() {
        use alloc::string::ToString;
        assert_eq!(Duration::from_millis(250).to_string(), "250ms");
        assert_eq!(Duration::from_secs(120).to_string(), "2m");
        assert_eq!(Duration::from_nanos(1500).to_string(), "1500ns");
        assert_eq!(Duration::ZERO.to_string(), "0s");
    }

    #[test]
    fn arithmetic_clamps_instead_of_panicking() {
        let t = Instant::from_nanos(10);
        assert_eq!(t.saturating_sub(Duration::from_nanos(20)), Instant::ZERO);
        assert_eq!(t.saturating_since(Instant::from_nanos(30)), Duration::ZERO);
        assert_eq!(
            Instant::from_nanos(u64::MAX).saturating_add(Duration::from_secs(1)),
            Instant::from_nanos(u64::MAX)
        );
        assert_eq!(Duration::from_secs(1).div(0), Duration::MAX);
        assert_eq!(Duration::from_millis(1500).as_secs_ceil(), 2);
        assert_eq!(Duration::from_secs(2).as_secs_ceil(), 2);
    }
}
