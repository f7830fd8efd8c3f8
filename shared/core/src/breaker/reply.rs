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
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use super::config::{BreakerPolicy, OpenReplySpec};
use super::fallback::FallbackEntry;
use crate::config::{ConfigError, FieldPath};
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

/// The validated `open_reply` settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenReply {
    status: u16,
    body: String,
    headers: Vec<(String, String)>,
}

const DEFAULT_BODY: &str = "circuit breaker open\n";
const TEXT_PLAIN: &str = "text/plain; charset=utf-8";

impl Default for OpenReply {
    /// `503`, a one-line text body.
    fn default() -> Self {
        OpenReply {
            status: 503,
            body: DEFAULT_BODY.to_owned(),
            headers: alloc::vec![("content-type".to_owned(), TEXT_PLAIN.to_owned())],
        }
    }
}

impl OpenReply {
    /// The reply's status.
    pub fn status(&self) -> u16 {
        self.status
    }

    /// Validates `open_reply` at `path`. A body without a `content-type` header is sent as
    /// `text/plain; charset=utf-8`.
    pub(crate) fn from_spec(
        path: &FieldPath,
        spec: &OpenReplySpec,
    ) -> Result<OpenReply, ConfigError> {
        let status = match spec.status {
            None => 503,
            Some(s @ 200..=599) => s as u16,
            Some(s) => {
                return Err(path
                    .field("status")
                    .error(format!("must be a status 200 to 599, got {s}")))
            }
        };
        let body = spec.body.clone().unwrap_or_else(|| DEFAULT_BODY.to_owned());
        let mut headers = Vec::new();
        for (name, value) in spec.headers.iter().flatten() {
            let at = path.field("headers").field(name);
            let name = header_name(&at, name)?;
            if matches!(
                name.as_str(),
                "retry-after" | "content-length" | "transfer-encoding" | "connection"
            ) {
                return Err(at.error(format!("\"{name}\" is set by the breaker or the proxy")));
            }
            headers.push((name, header_value(&at, value)?));
        }
        if !body.is_empty() && !headers.iter().any(|(n, _)| n == "content-type") {
            headers.push(("content-type".to_owned(), TEXT_PLAIN.to_owned()));
        }
        Ok(OpenReply {
            status,
            body,
            headers,
        })
    }
}

/// A lower-cased HTTP field name (an RFC 9110 token), or an error at `path`.
pub(crate) fn header_name(path: &FieldPath, name: &str) -> Result<String, ConfigError> {
    let tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if name.is_empty() || !name.bytes().all(tchar) {
        return Err(path.error(format!(
            "a header name must be a non-empty token (letters, digits, '-', ...), got \"{name}\""
        )));
    }
    Ok(name.to_ascii_lowercase())
}

fn header_value(path: &FieldPath, value: &str) -> Result<String, ConfigError> {
    if value.bytes().any(|b| (b < b' ' && b != b'\t') || b == 0x7f) {
        return Err(path.error("a header value must not hold control characters (CR, LF, NUL)"));
    }
    Ok(value.to_owned())
}

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
    use crate::breaker::{Breakers, BreakersConfig};

    fn policy(json: &str) -> BreakerPolicy {
        let c: BreakersConfig = serde_json::from_str(json).unwrap();
        Breakers::try_from(&c).unwrap().policies()[0].clone()
    }

    #[test]
    fn the_default_reply_is_503_with_retry_after_rounded_up() {
        let p = policy(r#"{"breakers": [{"name": "orders"}]}"#);
        let r = p.open_reply(Some(Duration::from_millis(4200)));
        assert_eq!(r.status, 503);
        assert_eq!(r.body, DEFAULT_BODY.as_bytes());
        assert!(r.headers.contains(&("retry-after".into(), "5".into())));
        assert!(r
            .headers
            .contains(&("content-type".into(), TEXT_PLAIN.into())));
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
