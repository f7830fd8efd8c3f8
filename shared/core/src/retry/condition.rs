//! What an attempt returned, and which outcomes `retry_on` retries.
//!
//! The condition names and meanings are Envoy's router's (`x-envoy-retry-on`), so that an
//! Envoy user reads a Keel policy the way they read a route:
//!
//! | condition | retries |
//! |---|---|
//! | `5xx` | any 500-599 response, and every attempt with no response (reset, connect failure, per-try timeout), which Envoy counts as a 5xx |
//! | `gateway-error` | 502, 503, 504, and every attempt with no response |
//! | `reset` | every attempt with no response: reset, connect failure, per-try timeout |
//! | `connect-failure` | a connect failure only |
//! | `retriable-4xx` | 409 Conflict (a concurrent duplicate under an idempotency key) |
//! | `retriable-status-codes` | the statuses in `retriable_statuses` (Keel retries those even without this name; it is accepted for Envoy users) |
//! | `rate-limited` | 429 and 503 that carry a usable `Retry-After` or `X-RateLimit-Reset` (Keel's own: a 429 without one means "you are over your quota", not "come back soon") |
//!
//! The default is `["5xx", "reset", "connect-failure"]`: what an Envoy user writes for safe
//! retries. `5xx` alone already covers the other two; they are listed so the default reads
//! plainly, and so that removing `5xx` keeps the retries of lost connections. A 429 is not
//! retried by default: add `rate-limited` (or list 429 in `retriable_statuses`).
//!
//! Pushback (`Retry-After`, then `X-RateLimit-Reset`) is read only from 429 and 503, the
//! statuses it is defined for (RFC 9110 §10.2.3, RFC 6585 §4).

use alloc::vec::Vec;

use crate::retry::after::{parse_rate_limit_reset, parse_retry_after, Pushback};
use crate::time::Duration;

/// One `retry_on` condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RetryCondition {
    /// `5xx`.
    #[serde(rename = "5xx")]
    ServerError,
    /// `gateway-error`.
    GatewayError,
    /// `reset`.
    Reset,
    /// `connect-failure`.
    ConnectFailure,
    /// `retriable-4xx`.
    #[serde(rename = "retriable-4xx")]
    Retriable4xx,
    /// `retriable-status-codes`.
    RetriableStatusCodes,
    /// `rate-limited`.
    RateLimited,
}

/// Every condition, in documentation order.
pub const ALL_CONDITIONS: [RetryCondition; 7] = [
    RetryCondition::ServerError,
    RetryCondition::GatewayError,
    RetryCondition::Reset,
    RetryCondition::ConnectFailure,
    RetryCondition::Retriable4xx,
    RetryCondition::RetriableStatusCodes,
    RetryCondition::RateLimited,
];

/// The default `retry_on`.
pub const DEFAULT_RETRY_ON: [RetryCondition; 3] = [
    RetryCondition::ServerError,
    RetryCondition::Reset,
    RetryCondition::ConnectFailure,
];

impl RetryCondition {
    /// The configuration name.
    pub fn name(self) -> &'static str {
        match self {
            RetryCondition::ServerError => "5xx",
            RetryCondition::GatewayError => "gateway-error",
            RetryCondition::Reset => "reset",
            RetryCondition::ConnectFailure => "connect-failure",
            RetryCondition::Retriable4xx => "retriable-4xx",
            RetryCondition::RetriableStatusCodes => "retriable-status-codes",
            RetryCondition::RateLimited => "rate-limited",
        }
    }

    /// The condition named `name`, if any.
    pub fn from_name(name: &str) -> Option<RetryCondition> {
        ALL_CONDITIONS.into_iter().find(|c| c.name() == name)
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// An upstream response, with the headers that may ask for a pause.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Response<'a> {
    /// The HTTP status.
    pub status: u16,
    /// The `Retry-After` header, if any.
    pub retry_after: Option<&'a str>,
    /// The `X-RateLimit-Reset` header, if any.
    pub rate_limit_reset: Option<&'a str>,
}

impl<'a> Response<'a> {
    /// A response with no pushback headers.
    pub fn status(status: u16) -> Response<'static> {
        Response {
            status,
            retry_after: None,
            rate_limit_reset: None,
        }
    }

    /// What the server asked for, read from a 429 or 503 only: `Retry-After` when it parses,
    /// else `X-RateLimit-Reset`. `unix_now` is the time since the Unix epoch; `max` the bound.
    pub fn pushback(&self, unix_now: Duration, max: Duration) -> Option<Pushback> {
        if !matches!(self.status, 429 | 503) {
            return None;
        }
        self.retry_after
            .and_then(|v| parse_retry_after(v, unix_now, max))
            .or_else(|| {
                self.rate_limit_reset
                    .and_then(|v| parse_rate_limit_reset(v, unix_now, max))
            })
    }
}

/// How an attempt ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome<'a> {
    /// The upstream answered.
    Response(Response<'a>),
    /// The stream was reset or the connection dropped before a response (a failed callout
    /// whose cause is unknown counts here).
    Reset,
    /// No connection could be made.
    ConnectFailure,
    /// The per-try timeout expired before a response.
    Timeout,
}

/// A validated `retry_on` with its `retriable_statuses`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryOn {
    bits: u8,
    statuses: Vec<u16>,
}

impl Default for RetryOn {
    fn default() -> Self {
        RetryOn::new(&DEFAULT_RETRY_ON, Vec::new())
    }
}

impl RetryOn {
    /// Retries on `conditions` and on the statuses listed.
    pub fn new(conditions: &[RetryCondition], statuses: Vec<u16>) -> RetryOn {
        RetryOn {
            bits: conditions.iter().fold(0, |bits, c| bits | c.bit()),
            statuses,
        }
    }

    /// Whether `condition` is on.
    pub fn contains(&self, condition: RetryCondition) -> bool {
        self.bits & condition.bit() != 0
    }

    /// The conditions that are on, in documentation order.
    pub fn conditions(&self) -> impl Iterator<Item = RetryCondition> + '_ {
        ALL_CONDITIONS.into_iter().filter(|c| self.contains(*c))
    }

    /// The `retriable_statuses`.
    pub fn statuses(&self) -> &[u16] {
        &self.statuses
    }

    /// Whether `outcome` calls for a retry. `pushback` says whether the response asked for a
    /// usable pause (only `rate-limited` depends on it).
    pub fn matches(&self, outcome: &Outcome<'_>, pushback: bool) -> bool {
        use RetryCondition as C;
        let any = |conditions: &[C]| conditions.iter().any(|c| self.contains(*c));
        match outcome {
            Outcome::Response(response) => {
                let status = response.status;
                (any(&[C::ServerError]) && (500..=599).contains(&status))
                    || (any(&[C::GatewayError]) && matches!(status, 502..=504))
                    || (any(&[C::Retriable4xx]) && status == 409)
                    || (any(&[C::RateLimited]) && pushback && matches!(status, 429 | 503))
                    || self.statuses.contains(&status)
            }
            Outcome::Reset | Outcome::Timeout => any(&[C::ServerError, C::GatewayError, C::Reset]),
            Outcome::ConnectFailure => {
                any(&[C::ServerError, C::GatewayError, C::Reset, C::ConnectFailure])
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;
    use alloc::vec;

    fn only(condition: RetryCondition) -> RetryOn {
        RetryOn::new(&[condition], Vec::new())
    }

    fn status(s: u16) -> Outcome<'static> {
        Outcome::Response(Response::status(s))
    }

    /// The outcomes each condition retries, among a fixed sample, without pushback.
    fn retried(on: &RetryOn) -> Vec<&'static str> {
        let sample: [(&str, Outcome<'static>); 12] = [
            ("200", status(200)),
            ("404", status(404)),
            ("409", status(409)),
            ("429", status(429)),
            ("500", status(500)),
            ("501", status(501)),
            ("502", status(502)),
            ("503", status(503)),
            ("504", status(504)),
            ("reset", Outcome::Reset),
            ("connect", Outcome::ConnectFailure),
            ("timeout", Outcome::Timeout),
        ];
        sample
            .into_iter()
            .filter(|(_, o)| on.matches(o, false))
            .map(|(n, _)| n)
            .collect()
    }

    #[test]
    fn each_condition_retries_what_envoy_does() {
        use RetryCondition as C;
        let all_failures = ["reset", "connect", "timeout"];
        assert_eq!(
            retried(&only(C::ServerError)),
            [
                ["500", "501", "502", "503", "504"].as_slice(),
                &all_failures
            ]
            .concat()
        );
        assert_eq!(
            retried(&only(C::GatewayError)),
            [["502", "503", "504"].as_slice(), &all_failures].concat()
        );
        assert_eq!(retried(&only(C::Reset)), all_failures);
        assert_eq!(retried(&only(C::ConnectFailure)), ["connect"]);
        assert_eq!(retried(&only(C::Retriable4xx)), ["409"]);
        assert!(retried(&only(C::RetriableStatusCodes)).is_empty());
        assert!(retried(&only(C::RateLimited)).is_empty());
        assert!(retried(&RetryOn::new(&[], Vec::new())).is_empty());
    }

    #[test]
    fn rate_limited_needs_pushback() {
        let on = only(RetryCondition::RateLimited);
        assert!(on.matches(&status(429), true));
        assert!(on.matches(&status(503), true));
        assert!(!on.matches(&status(429), false));
        assert!(!on.matches(&status(500), true));
    }

    #[test]
    fn listed_statuses_are_retried_with_or_without_the_envoy_name() {
        let on = RetryOn::new(&[], vec![429, 418]);
        assert_eq!(retried(&on), ["429"]);
        assert!(on.matches(&status(418), false));
        let on = RetryOn::new(&[RetryCondition::RetriableStatusCodes], vec![409]);
        assert_eq!(retried(&on), ["409"]);
    }

    #[test]
    fn the_default_is_5xx_reset_and_connect_failure() {
        let on = RetryOn::default();
        let names: Vec<&str> = on.conditions().map(RetryCondition::name).collect();
        assert_eq!(names, ["5xx", "reset", "connect-failure"]);
        assert_eq!(
            retried(&on),
            ["500", "501", "502", "503", "504", "reset", "connect", "timeout"]
        );
    }

    #[test]
    fn names_round_trip() {
        for c in ALL_CONDITIONS {
            assert_eq!(RetryCondition::from_name(c.name()), Some(c));
        }
        assert_eq!(RetryCondition::from_name("5XX"), None);
        assert_eq!(RetryCondition::from_name("retriable-headers"), None);
    }

    #[test]
    fn pushback_is_read_from_429_and_503_only() {
        let max = Duration::from_secs(300);
        let now = Duration::from_secs(1_700_000_000);
        let with = |status, retry_after, reset| Response {
            status,
            retry_after,
            rate_limit_reset: reset,
        };
        let two = Some(Pushback::After(Duration::from_secs(2)));
        assert_eq!(with(429, Some("2"), None).pushback(now, max), two);
        assert_eq!(with(503, Some("2"), Some("9")).pushback(now, max), two);
        assert_eq!(with(429, None, Some("1700000002")).pushback(now, max), two);
        // Retry-After that does not parse falls back to X-RateLimit-Reset.
        assert_eq!(with(429, Some("soon"), Some("2")).pushback(now, max), two);
        assert_eq!(with(500, Some("2"), None).pushback(now, max), None);
        assert_eq!(with(200, Some("2"), Some("2")).pushback(now, max), None);
        assert_eq!(
            with(503, Some("3600"), None).pushback(now, max),
            Some(Pushback::TooLong)
        );
    }
}
