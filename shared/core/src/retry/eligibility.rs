//! Which requests may be sent twice.
//!
//! RFC 9110 §9.2.2: a proxy must not retry a non-idempotent request automatically, because the
//! first attempt may have taken effect even when its response was lost. The idempotent methods
//! are GET, HEAD, OPTIONS, TRACE (safe) and PUT, DELETE. A request of any other method (POST,
//! PATCH, ...) becomes safe to repeat when it carries an `Idempotency-Key` (IETF draft
//! `draft-ietf-httpapi-idempotency-key-header`): the server then recognises the repeat and
//! replays its first result. Methods are case-sensitive (RFC 9110 §9.1): `get` is not `GET`,
//! and an unknown method is never retried.
//!
//! A retried request is replayed from a buffered copy of its body, so the body must also fit
//! `max_body`; a larger one is never retried (it is forwarded, not held in memory). Nor is one
//! whose response arrived before the whole body had (an upstream may answer early): there is
//! no complete copy to replay.
//!
//! Invariant: anything not positively known to be safe is [`Eligibility::NotIdempotent`].

/// Methods that RFC 9110 defines as idempotent.
pub const IDEMPOTENT_METHODS: [&str; 6] = ["GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"];

/// The default request header that makes any method retryable.
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";

/// Whether a request may be retried, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Eligibility {
    /// The method is idempotent and the body fits.
    Idempotent,
    /// The request carries an idempotency key and the body fits.
    Keyed,
    /// Neither an idempotent method nor an idempotency key: never retried.
    NotIdempotent,
    /// The body is larger than `max_body`: never retried.
    BodyTooLarge,
    /// The response came before the whole body: there is no complete copy to replay.
    BodyIncomplete,
}

impl Eligibility {
    /// Whether the request may be retried.
    pub fn is_eligible(self) -> bool {
        matches!(self, Eligibility::Idempotent | Eligibility::Keyed)
    }

    /// A short name for logs and metrics: `idempotent`, `keyed`, `not_idempotent`,
    /// `body_too_large`, `body_incomplete`.
    pub fn name(self) -> &'static str {
        match self {
            Eligibility::Idempotent => "idempotent",
            Eligibility::Keyed => "keyed",
            Eligibility::NotIdempotent => "not_idempotent",
            Eligibility::BodyTooLarge => "body_too_large",
            Eligibility::BodyIncomplete => "body_incomplete",
        }
    }

    /// The eligibility of a request with `method`, the value of its idempotency-key header if
    /// present, and a body of `body_len` bytes (0 for none), against `max_body`. A key that is
    /// empty (or an empty quoted string) does not count.
    pub fn of(
        method: &str,
        idempotency_key: Option<&str>,
        body_len: u64,
        max_body: u64,
    ) -> Eligibility {
        let why = if IDEMPOTENT_METHODS.contains(&method) {
            Eligibility::Idempotent
        } else if idempotency_key.is_some_and(is_present) {
            Eligibility::Keyed
        } else {
            return Eligibility::NotIdempotent;
        };
        if body_len > max_body {
            return Eligibility::BodyTooLarge;
        }
        why
    }

    /// The eligibility once the body turned out to be `body_len` bytes (a streamed body whose
    /// length was not known from the headers): an eligible request whose body outgrew
    /// `max_body` no longer is.
    pub fn with_body(self, body_len: u64, max_body: u64) -> Eligibility {
        if self.is_eligible() && body_len > max_body {
            Eligibility::BodyTooLarge
        } else {
            self
        }
    }
}

/// A key value that says something: not blank, not `""`.
fn is_present(value: &str) -> bool {
    let value = value.trim();
    let unquoted = value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(value);
    !unquoted.trim().is_empty()
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;

    const MAX: u64 = 64 * 1024;
    const KEY: Option<&str> = Some("\"8e03978e-40d5-43e8-bc93-6894a57f9324\"");

    #[test]
    fn idempotent_methods_with_and_without_a_key() {
        for method in IDEMPOTENT_METHODS {
            assert_eq!(
                Eligibility::of(method, None, 0, MAX),
                Eligibility::Idempotent,
                "{method}"
            );
            // The method alone suffices; the key changes nothing.
            assert_eq!(
                Eligibility::of(method, KEY, 10, MAX),
                Eligibility::Idempotent,
                "{method}"
            );
        }
    }

    #[test]
    fn other_methods_need_a_key() {
        for method in ["POST", "PATCH", "CONNECT", "PROPFIND", "get", "Put", ""] {
            assert_eq!(
                Eligibility::of(method, None, 0, MAX),
                Eligibility::NotIdempotent,
                "{method:?}"
            );
            assert_eq!(
                Eligibility::of(method, KEY, 100, MAX),
                Eligibility::Keyed,
                "{method:?}"
            );
            assert_eq!(
                Eligibility::of(method, Some("abc"), 0, MAX),
                Eligibility::Keyed
            );
        }
    }

    #[test]
    fn an_empty_key_does_not_count() {
        for key in ["", "  ", "\"\"", " \" \" "] {
            assert_eq!(
                Eligibility::of("POST", Some(key), 0, MAX),
                Eligibility::NotIdempotent,
                "{key:?}"
            );
        }
    }

    #[test]
    fn an_oversized_body_is_never_retried() {
        assert_eq!(
            Eligibility::of("PUT", None, MAX, MAX),
            Eligibility::Idempotent
        );
        assert_eq!(
            Eligibility::of("PUT", None, MAX + 1, MAX),
            Eligibility::BodyTooLarge
        );
        assert_eq!(
            Eligibility::of("POST", KEY, MAX + 1, MAX),
            Eligibility::BodyTooLarge
        );
        // Not idempotent is the first reason: the body does not matter then.
        assert_eq!(
            Eligibility::of("POST", None, u64::MAX, MAX),
            Eligibility::NotIdempotent
        );
        assert_eq!(
            Eligibility::of("GET", None, 1, 0),
            Eligibility::BodyTooLarge
        );
        assert_eq!(Eligibility::of("GET", None, 0, 0), Eligibility::Idempotent);
    }

    #[test]
    fn a_streamed_body_can_outgrow_the_limit() {
        let e = Eligibility::of("POST", KEY, 0, MAX);
        assert_eq!(e.with_body(MAX, MAX), Eligibility::Keyed);
        assert_eq!(e.with_body(MAX + 1, MAX), Eligibility::BodyTooLarge);
        assert_eq!(
            Eligibility::NotIdempotent.with_body(MAX + 1, MAX),
            Eligibility::NotIdempotent
        );
        assert!(!Eligibility::BodyTooLarge.is_eligible());
        assert_eq!(Eligibility::BodyTooLarge.name(), "body_too_large");
        assert!(!Eligibility::BodyIncomplete.is_eligible());
        assert_eq!(Eligibility::BodyIncomplete.name(), "body_incomplete");
    }
}
