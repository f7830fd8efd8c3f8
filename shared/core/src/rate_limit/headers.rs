//! Values of the response headers that tell a client about its limit.
//!
//! - `Retry-After` (RFC 9110) in whole seconds, rounded up: a client that waits exactly that
//!   long is not refused again, since [`super::Decision::Deny`]'s `retry_after` is exact.
//! - The IETF RateLimit fields (draft-ietf-httpapi-ratelimit-headers):
//!   `RateLimit-Policy: "NAME";q=QUOTA;w=WINDOW_SECONDS` describes the policy, and
//!   `RateLimit: "NAME";r=REMAINING;t=RESET_SECONDS` its state for this client. `Retry-After`
//!   wins when both are present. Seconds are rounded up, so `t` never promises a reset
//!   earlier than it comes; `w` is at least 1.
//!
//! The policy name is a structured-field string: `"` and `\` are escaped, and bytes outside
//! printable ASCII (which validated policy names never contain) become `_`.
//!
//! Numbers are written digit by digit rather than through `core::fmt`: a filter builds these
//! values on every response.

use alloc::string::String;

use crate::codec::push_decimal;
use crate::config::Rate;
use crate::time::Duration;

/// `Retry-After` in seconds for a wait of `wait`: rounded up, so at least 1 for any wait above
/// zero, and 0 for none.
pub fn retry_after_secs(wait: Duration) -> u64 {
    wait.as_secs_ceil()
}

/// The `RateLimit-Policy` value: `"NAME";q=QUOTA;w=WINDOW_SECONDS`, the window rounded up to
/// at least one second.
pub fn rate_limit_policy(name: &str, quota: u64, window: Duration) -> String {
    let mut out = sf_string(name);
    out.push_str(";q=");
    push_decimal(&mut out, quota);
    out.push_str(";w=");
    push_decimal(&mut out, window.as_secs_ceil().max(1));
    out
}

/// The `RateLimit` value: `"NAME";r=REMAINING;t=RESET_SECONDS`, the reset rounded up.
pub fn rate_limit(name: &str, remaining: u64, reset: Duration) -> String {
    rate_limit_after(&rate_limit_prefix(name), remaining, reset)
}

/// The part of a `RateLimit` value that depends only on the name (`"name";r=`), to compute
/// once per limiter: [`rate_limit_after`] completes it per response.
pub fn rate_limit_prefix(name: &str) -> String {
    let mut out = sf_string(name);
    out.push_str(";r=");
    out
}

/// The `RateLimit` value of [`rate_limit`] from its [`rate_limit_prefix`]: the same text.
pub fn rate_limit_after(prefix: &str, remaining: u64, reset: Duration) -> String {
    let mut out = String::with_capacity(prefix.len() + 24);
    out.push_str(prefix);
    push_decimal(&mut out, remaining);
    out.push_str(";t=");
    push_decimal(&mut out, reset.as_secs_ceil());
    out
}

/// The `RateLimit-Policy` value of a limiter's rate: `q` is `requests`, `w` the period in
/// seconds (rounded up, at least 1), as configured. With a `burst` above `requests`, `r` can
/// briefly exceed `q`.
pub fn policy(name: &str, rate: &Rate) -> String {
    rate_limit_policy(name, rate.requests, rate.period)
}

/// `text` as an RFC 8941 string: quoted, with `"` and `\` escaped.
fn sf_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 24);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            ' '..='~' => out.push(c),
            _ => out.push('_'),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_secs(Duration::ZERO), 0);
        assert_eq!(retry_after_secs(Duration::from_nanos(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(999)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
    }

    #[test]
    fn ietf_fields_as_in_the_draft() {
        assert_eq!(
            rate_limit_policy("default", 100, Duration::from_secs(60)),
            "\"default\";q=100;w=60"
        );
        assert_eq!(
            rate_limit("default", 50, Duration::from_millis(4_200)),
            "\"default\";r=50;t=5"
        );
        assert_eq!(
            rate_limit("default", 100, Duration::ZERO),
            "\"default\";r=100;t=0"
        );
        assert_eq!(
            rate_limit_policy("fast", 10, Duration::from_millis(100)),
            "\"fast\";q=10;w=1"
        );
        let rate = Rate {
            requests: 100,
            period: Duration::from_secs(1),
            burst: 200,
        };
        assert_eq!(policy("per-key", &rate), "\"per-key\";q=100;w=1");
        assert_eq!(
            rate_limit("per-key", 0, Duration::from_millis(10)),
            "\"per-key\";r=0;t=1"
        );
        assert_eq!(
            rate_limit("a\"b\\c\u{e9}", 1, Duration::from_secs(1)),
            "\"a\\\"b\\\\c_\";r=1;t=1"
        );
    }
}
