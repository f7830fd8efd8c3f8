//! One attempt as the host reports it: how it ended, and which headers go into a replay and
//! back to the client.
//!
//! A proxy does not see "connection refused" or "reset" directly: Envoy's router turns them into
//! a local 503 (504 for a timeout) and says why elsewhere. Keel reads the why from what each
//! path offers:
//!
//! - The first attempt goes through the router. Its local reply carries no marker in its headers,
//!   but Envoy's stream info does: the property `response.code_details`
//!   (`upstream_reset_before_response_started{remote_connection_failure|...}`,
//!   `upstream_reset_before_response_started{remote_reset}`, `upstream_response_timeout`,
//!   `upstream_per_try_timeout`), and the legacy bit set `response.flags` (UF `0x20` connect
//!   failure, UR `0x10` remote reset, UC `0x40` connection termination, LR `0x8` local reset,
//!   UT `0x4` timeout). Details win over flags: they name the cause; flags are the fallback.
//! - A retry is a callout. A callout that fails outright (no headers at all) is a reset. A
//!   callout the router could not complete comes back as the router's local reply: a 503 whose
//!   body is `upstream connect error or disconnect/reset before headers. reset reason: <why>`
//!   (a connect failure when `<why>` names a connection failure), or a 504 `upstream request
//!   timeout` once the callout's own timeout (the per-try timeout) passed.
//!
//! Headers follow RFC 9110 §7.6.1: hop-by-hop fields (`connection`, `keep-alive`,
//! `proxy-connection`, `te`, `trailer`, `transfer-encoding`, `upgrade`) belong to one connection
//! and are never replayed or handed on. A response handed on is re-framed by the host, so its
//! `content-length` is dropped too (the host sets it for the body it sends), as are pseudo-headers
//! other than those a request needs.
//!
//! Invariant: anything not recognised is a plain response, retried only if `retry_on` says so.

use crate::retry::condition::Outcome;
use crate::time::Duration;

/// Hop-by-hop header fields (RFC 9110 §7.6.1, plus the common `keep-alive` and
/// `proxy-connection`).
pub const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Envoy's legacy response flag: upstream request timeout (UT).
pub const FLAG_UPSTREAM_REQUEST_TIMEOUT: u64 = 0x4;
/// Envoy's legacy response flag: local reset (LR).
pub const FLAG_LOCAL_RESET: u64 = 0x8;
/// Envoy's legacy response flag: upstream remote reset (UR).
pub const FLAG_UPSTREAM_REMOTE_RESET: u64 = 0x10;
/// Envoy's legacy response flag: upstream connection failure (UF).
pub const FLAG_UPSTREAM_CONNECTION_FAILURE: u64 = 0x20;
/// Envoy's legacy response flag: upstream connection termination (UC).
pub const FLAG_UPSTREAM_CONNECTION_TERMINATION: u64 = 0x40;

/// The start of the body of Envoy's local reply when an upstream request failed before any
/// response header.
pub const RESET_BODY_PREFIX: &str = "upstream connect error or disconnect/reset before headers";
/// The body of Envoy's local reply when an upstream request timed out.
pub const TIMEOUT_BODY: &str = "upstream request timeout";

/// How the router's attempt failed, from Envoy's `response.code_details` and `response.flags`
/// of a response it produced itself. `None`: the upstream answered (or nothing tells
/// otherwise), so the response is judged by its status.
pub fn router_failure(
    code_details: Option<&str>,
    response_flags: Option<u64>,
) -> Option<Outcome<'static>> {
    if let Some(details) = code_details {
        if let Some(reason) = details.strip_prefix("upstream_reset_before_response_started") {
            return Some(if names_connect_failure(reason) {
                Outcome::ConnectFailure
            } else {
                Outcome::Reset
            });
        }
        if matches!(
            details,
            "upstream_response_timeout" | "upstream_per_try_timeout"
        ) {
            return Some(Outcome::Timeout);
        }
    }
    let flags = response_flags?;
    if flags & FLAG_UPSTREAM_CONNECTION_FAILURE != 0 {
        Some(Outcome::ConnectFailure)
    } else if flags
        & (FLAG_UPSTREAM_REMOTE_RESET | FLAG_UPSTREAM_CONNECTION_TERMINATION | FLAG_LOCAL_RESET)
        != 0
    {
        Some(Outcome::Reset)
    } else if flags & FLAG_UPSTREAM_REQUEST_TIMEOUT != 0 {
        Some(Outcome::Timeout)
    } else {
        None
    }
}

/// How a callout that came back with `status` and `body` ended, `elapsed` after it was sent
/// with `timeout`. `None`: a genuine response. A 504 counts as the timeout when it says so or
/// when the timeout had passed (a millisecond of slack for the host's timer granularity).
pub fn callout_failure(
    status: u16,
    body: &[u8],
    elapsed: Duration,
    timeout: Duration,
) -> Option<Outcome<'static>> {
    match status {
        504 if body == TIMEOUT_BODY.as_bytes()
            || elapsed.saturating_add(Duration::from_millis(1)) >= timeout =>
        {
            Some(Outcome::Timeout)
        }
        503 => {
            let reason = body.strip_prefix(RESET_BODY_PREFIX.as_bytes())?;
            let reason = core::str::from_utf8(reason).unwrap_or("");
            Some(if names_connect_failure(reason) {
                Outcome::ConnectFailure
            } else {
                Outcome::Reset
            })
        }
        _ => None,
    }
}

/// Whether a reset reason (`{remote_connection_failure|...}` or `reset reason: connection
/// failure, ...`) names a failed connection attempt rather than a reset of an open one.
fn names_connect_failure(reason: &str) -> bool {
    reason.contains("connection_failure") || reason.contains("connection failure")
}

/// Whether a request header is copied into a replayed attempt: everything but the hop-by-hop
/// fields (`name` in lower case, as hosts give them).
pub fn replayed_request_header(name: &str) -> bool {
    !HOP_BY_HOP.contains(&name)
}

/// Whether a header of an attempt's response is handed on to the client in the filter's own
/// answer: not a pseudo-header (the status is passed apart), not hop-by-hop, not
/// `content-length` (the host frames the body it sends).
pub fn handed_on_response_header(name: &str) -> bool {
    !name.starts_with(':') && name != "content-length" && !HOP_BY_HOP.contains(&name)
}

/// The stream property (Envoy: filter state `wasm.keel.retry.router_attempt`) in which the
/// retry filter leaves what the router's attempt got, when it holds that response to retry:
/// the response the client finally gets (another host's answer) says nothing about the host
/// the router went to, and discovery's passive ejection must judge that host by its own answer.
pub const ROUTER_ATTEMPT_PROPERTY: &str = "keel.retry.router_attempt";

/// The [`ROUTER_ATTEMPT_PROPERTY`] value: the status, then a space and Envoy's
/// `response.code_details` when known (`"503 upstream_reset_before_response_started{...}"`).
pub fn encode_router_attempt(status: u16, details: Option<&str>) -> alloc::string::String {
    match details.filter(|d| !d.is_empty()) {
        Some(d) => alloc::format!("{status} {d}"),
        None => alloc::format!("{status}"),
    }
}

/// The status and code details of a [`ROUTER_ATTEMPT_PROPERTY`] value; `None` when it does not
/// start with a status code of three digits.
pub fn decode_router_attempt(text: &str) -> Option<(u16, Option<&str>)> {
    let (code, details) = match text.split_once(' ') {
        Some((c, d)) => (c, Some(d).filter(|d| !d.is_empty())),
        None => (text, None),
    };
    if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    code.parse().ok().map(|status| (status, details))
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;

    #[test]
    fn the_router_attempt_hand_off_round_trips() {
        let text = encode_router_attempt(503, Some("upstream_reset_before_response_started{x}"));
        assert_eq!(text, "503 upstream_reset_before_response_started{x}");
        assert_eq!(
            decode_router_attempt(&text),
            Some((503, Some("upstream_reset_before_response_started{x}")))
        );
        assert_eq!(
            decode_router_attempt(&encode_router_attempt(500, None)),
            Some((500, None))
        );
        assert_eq!(
            decode_router_attempt(&encode_router_attempt(500, Some(""))),
            Some((500, None))
        );
        for bad in ["", "50", "5000", "abc", " 500"] {
            assert_eq!(decode_router_attempt(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn code_details_name_the_cause() {
        for (details, outcome) in [
            (
                "upstream_reset_before_response_started{remote_connection_failure|delayed_connect_error:_Connection_refused}",
                Outcome::ConnectFailure,
            ),
            (
                "upstream_reset_before_response_started{connection_failure}",
                Outcome::ConnectFailure,
            ),
            (
                "upstream_reset_before_response_started{remote_reset}",
                Outcome::Reset,
            ),
            (
                "upstream_reset_before_response_started{connection_termination}",
                Outcome::Reset,
            ),
            ("upstream_response_timeout", Outcome::Timeout),
            ("upstream_per_try_timeout", Outcome::Timeout),
        ] {
            assert_eq!(router_failure(Some(details), None), Some(outcome), "{details}");
            // Details win over flags.
            assert_eq!(
                router_failure(Some(details), Some(FLAG_UPSTREAM_REQUEST_TIMEOUT | 0x20)),
                Some(outcome),
                "{details}"
            );
        }
    }

    #[test]
    fn upstream_responses_are_not_failures() {
        for details in ["via_upstream", "no_healthy_upstream", "route_not_found", ""] {
            assert_eq!(router_failure(Some(details), Some(0)), None, "{details}");
        }
        assert_eq!(router_failure(None, None), None);
        // No healthy upstream (UH, 0x2) is not a connection attempt that failed.
        assert_eq!(router_failure(None, Some(0x2)), None);
    }

    #[test]
    fn flags_are_the_fallback() {
        assert_eq!(
            router_failure(None, Some(0x20)),
            Some(Outcome::ConnectFailure)
        );
        assert_eq!(router_failure(None, Some(0x10)), Some(Outcome::Reset));
        assert_eq!(router_failure(None, Some(0x40)), Some(Outcome::Reset));
        assert_eq!(router_failure(None, Some(0x8)), Some(Outcome::Reset));
        assert_eq!(router_failure(None, Some(0x4)), Some(Outcome::Timeout));
        // A connect failure also reported as a reset is a connect failure.
        assert_eq!(
            router_failure(Some("via_upstream"), Some(0x30)),
            Some(Outcome::ConnectFailure)
        );
    }

    #[test]
    fn callout_local_replies_are_recognised() {
        let ms = Duration::from_millis;
        let refused = b"upstream connect error or disconnect/reset before headers. reset reason: remote connection failure, transport failure reason: delayed connect error: Connection refused";
        assert_eq!(
            callout_failure(503, refused, ms(1), ms(2000)),
            Some(Outcome::ConnectFailure)
        );
        let reset = b"upstream connect error or disconnect/reset before headers. reset reason: connection termination";
        assert_eq!(
            callout_failure(503, reset, ms(1), ms(2000)),
            Some(Outcome::Reset)
        );
        assert_eq!(
            callout_failure(504, TIMEOUT_BODY.as_bytes(), ms(5), ms(2000)),
            Some(Outcome::Timeout)
        );
        assert_eq!(
            callout_failure(504, b"", ms(2000), ms(2000)),
            Some(Outcome::Timeout)
        );
        assert_eq!(
            callout_failure(504, b"", ms(1999), ms(2000)),
            Some(Outcome::Timeout)
        );
        // The upstream's own answers.
        assert_eq!(callout_failure(504, b"gateway", ms(10), ms(2000)), None);
        assert_eq!(callout_failure(503, b"busy", ms(10), ms(2000)), None);
        assert_eq!(callout_failure(503, &[0xff, 0xfe], ms(10), ms(2000)), None);
        assert_eq!(callout_failure(200, refused, ms(10), ms(2000)), None);
    }

    #[test]
    fn hop_by_hop_headers_stay_on_their_connection() {
        for name in HOP_BY_HOP {
            assert!(!replayed_request_header(name), "{name}");
            assert!(!handed_on_response_header(name), "{name}");
        }
        for name in [
            ":method",
            ":path",
            ":authority",
            "x-request-id",
            "content-length",
        ] {
            assert!(replayed_request_header(name), "{name}");
        }
        for name in [":status", "content-length"] {
            assert!(!handed_on_response_header(name), "{name}");
        }
        for name in ["content-type", "retry-after", "set-cookie", "x-upstream"] {
            assert!(handed_on_response_header(name), "{name}");
        }
    }
}
