//! What a refused request gets back: the configured local reply, or a fallback.
//!
//! While a breaker is open the upstream receives nothing; the glue answers locally with the
//! [`Reply`] built here. The open reply carries `retry-after` (whole seconds, rounded up, so
//! that a client that obeys it finds the breaker half-open, not still open); a fallback carries
//! the configured fallback header (value: the breaker's name) and a standard `age` header
//! (RFC 9111), and no `retry-after`, since it answers the request.
//!
//! Invariants: header names are lower-case HTTP tokens, values hold no control characters;
//! `retry-after` is never configured by hand (the breaker owns it).

use alloc::borrow::ToOwned;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use super::fallback::FallbackEntry;
use super::policy::BreakerPolicy;
use crate::config::LocalReply;
use crate::time::{Duration, Instant};

/// A local reply for the glue to send as is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// HTTP status.
    pub status: u16,
    /// Headers, lower-case names.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Vec<u8>,
}

const DEFAULT_BODY: &str = "circuit breaker open\n";

/// The open reply without an `open_reply` section: `503`, a one-line text body.
pub(crate) fn default_open_reply() -> LocalReply {
    LocalReply::new(503, DEFAULT_BODY)
}

/// Headers an `open_reply` may not set: the breaker sets `retry-after` itself.
pub(crate) const RESERVED_HEADERS: [&str; 1] = ["retry-after"];

impl BreakerPolicy {
    /// The local reply for a refused request. `retry_after` (from
    /// [`Admission::Reject`](super::Admission::Reject)) becomes a `retry-after` header in
    /// whole seconds, rounded up, at least 1.
    pub fn open_reply(&self, retry_after: Option<Duration>) -> Reply {
        let r = &self.open_reply;
        let mut headers = r.headers.clone();
        if let Some(after) = retry_after {
            headers.push((
                "retry-after".to_owned(),
                after.as_secs_ceil().max(1).to_string(),
            ));
        }
        Reply {
            status: r.status,
            headers,
            body: r.body.as_bytes().to_vec(),
        }
    }

    /// The reply that serves `entry` as a fallback at `now`: its status, headers and body,
    /// plus the fallback header (naming this breaker) and `age`. Without fallback settings
    /// the header is `x-keel-fallback`.
    pub fn fallback_reply(&self, entry: &FallbackEntry, now: Instant) -> Reply {
        let header = self
            .fallback
            .as_ref()
            .map_or(super::fallback::DEFAULT_HEADER, |f| f.header());
        let mut headers = entry.headers().to_vec();
        headers.push((header.to_owned(), self.name.clone()));
        headers.push((
            "age".to_owned(),
            now.saturating_since(entry.stored_at())
                .as_secs()
                .to_string(),
        ));
        Reply {
            status: entry.status(),
            headers,
            body: entry.body().to_vec(),
        }
    }
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;
    use crate::circuit_breaker::Breakers;

    fn policy(json: &str) -> BreakerPolicy {
        crate::config::load::<Breakers>(json.as_bytes())
            .unwrap()
            .policies()[0]
            .clone()
    }

    #[test]
    fn the_default_reply_is_503_with_retry_after_rounded_up() {
        let p = policy(r#"{"breakers": [{"name": "orders"}]}"#);
        let r = p.open_reply(Some(Duration::from_millis(4200)));
        assert_eq!(r.status, 503);
        assert_eq!(r.body, DEFAULT_BODY.as_bytes());
        assert!(r.headers.contains(&("retry-after".into(), "5".into())));
        assert!(r.headers.contains(&(
            "content-type".into(),
            crate::config::fields::TEXT_PLAIN.into()
        )));
        let r = p.open_reply(Some(Duration::from_nanos(1)));
        assert!(r.headers.contains(&("retry-after".into(), "1".into())));
        let r = p.open_reply(None);
        assert!(!r.headers.iter().any(|(n, _)| n == "retry-after"));
    }

    #[test]
    fn the_configured_reply_is_used() {
        let p = policy(
            r#"{"breakers": [{"name": "orders", "open_reply":
                {"status": 429, "body": "{\"error\":\"open\"}", "headers": {"Content-Type": "application/json", "x-why": "breaker"}}}]}"#,
        );
        let r = p.open_reply(Some(Duration::from_secs(2)));
        assert_eq!(r.status, 429);
        assert_eq!(r.body, br#"{"error":"open"}"#);
        assert_eq!(
            r.headers,
            alloc::vec![
                ("content-type".into(), "application/json".into()),
                ("x-why".into(), "breaker".into()),
                ("retry-after".into(), "2".into()),
            ]
        );
        let p = policy(r#"{"breakers": [{"name": "o", "open_reply": {"body": ""}}]}"#);
        assert!(p.open_reply(None).headers.is_empty());
    }
}
