//! etcd v3 through its JSON gateway (etcd 3.4: `/v3/...`).
//!
//! Registration follows etcd's lease pattern: each instance puts one key under the service's
//! prefix, attached to a lease it keeps alive (`/v3/lease/grant`, `/v3/lease/keepalive`).
//! When the instance stops refreshing, the lease expires and the key vanishes; the next range
//! read no longer lists it, so it leaves the endpoint set. Presence is health.
//!
//! The poller reads every key under the prefix with `POST /v3/kv/range`, body
//! `{"key": b64(prefix), "range_end": b64(prefix + 1)}`, where `prefix + 1` is the prefix with
//! its last byte that is not `0xff` incremented and the rest dropped (etcd's own
//! `GetPrefixRangeEnd`). The gateway answers with the gRPC message in JSON: `bytes` fields in
//! base64, `int64` fields as strings, empty repeated fields omitted:
//!
//! ```json
//! {"header":{"cluster_id":"14841639068965178418","member_id":"10276657743932975437",
//!            "revision":"7","raft_term":"2"},
//!  "kvs":[{"key":"L3NlcnZpY2VzL3VzZXJzLzE=","create_revision":"5","mod_revision":"5",
//!          "version":"1","value":"eyJhZGRyZXNzIjoiMTAuMC4wLjEiLCJwb3J0Ijo4MDgwfQ==",
//!          "lease":"7587870453916416516"}],
//!  "count":"1"}
//! ```
//!
//! Each value is a JSON object: `address` (IP literal), `port`, optional `weight` (default 1),
//! `priority` (default 0), `zone`, `meta` (object of strings). Unknown fields are ignored, so
//! registrations may carry more. A key outside the prefix, a value that is not base64, not
//! UTF-8, not JSON, not an object or larger than [`MAX_VALUE_BYTES`] is skipped with its
//! reason.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::Value;

use super::policy::EtcdSource;
use super::registry::{
    quote, Collector, ParseError, ParseLimits, RawEndpoint, RegistryAnswer, RegistryRequest,
    SkipReason,
};
use crate::time::Duration;

/// The largest etcd value accepted for one endpoint.
pub const MAX_VALUE_BYTES: usize = 4096;
/// The largest etcd key accepted.
pub const MAX_KEY_BYTES: usize = 1024;
/// How long the glue lets a range request run.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The end of the key range that holds exactly the keys starting with `prefix`: the prefix
/// with its last byte below `0xff` incremented and what follows dropped. A prefix of only
/// `0xff` bytes (or an empty one) has no such end; etcd's convention is then `"\0"`, "every
/// key from `key` on".
pub fn prefix_range_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    alloc::vec![0]
}

/// The JSON body of the range request for every key under `prefix`.
pub fn range_request_body(prefix: &str) -> Vec<u8> {
    let key = STANDARD.encode(prefix.as_bytes());
    let end = STANDARD.encode(prefix_range_end(prefix.as_bytes()));
    // Base64 text needs no JSON escaping.
    format!("{{\"key\":\"{key}\",\"range_end\":\"{end}\"}}").into_bytes()
}

/// The callout that reads every key under the source's prefix.
pub fn range_request(source: &EtcdSource) -> RegistryRequest {
    RegistryRequest {
        cluster: source.cluster.clone(),
        method: "POST",
        path: String::from("/v3/kv/range"),
        authority: source.cluster.clone(),
        body: Some(range_request_body(&source.prefix)),
        timeout: REQUEST_TIMEOUT,
    }
}

/// An etcd int64: a string of digits (as the gateway sends it) or a JSON number.
fn int64(value: Option<&Value>) -> Option<u64> {
    match value? {
        Value::String(s) if s.len() <= 20 => s.parse().ok(),
        Value::Number(n) => n.as_u64(),
        _ => None,
    }
}

/// Parses a range response for `prefix`. A body that is not the gateway's document is an
/// error; each invalid key-value is skipped with its reason.
pub fn parse_range_response(
    body: &[u8],
    prefix: &str,
    limits: &ParseLimits,
) -> Result<RegistryAnswer, ParseError> {
    limits.check_size(body)?;
    let doc: Value =
        serde_json::from_slice(body).map_err(|e| ParseError::NotJson(format!("{e}")))?;
    let doc = doc
        .as_object()
        .ok_or(ParseError::Shape("the etcd answer is not a JSON object"))?;
    let revision = int64(doc.get("header").and_then(|h| h.get("revision")))
        .ok_or(ParseError::MissingRevision)?;
    let mut collector = Collector::new(*limits);
    match doc.get("kvs") {
        // The gateway omits empty repeated fields: no `kvs` means no keys.
        None | Some(Value::Null) => {}
        Some(Value::Array(kvs)) => {
            for (i, kv) in kvs.iter().enumerate() {
                let (label, entry) = parse_kv(kv, prefix.as_bytes());
                collector.push(|| label.unwrap_or_else(|| format!("kvs[{i}]")), entry);
            }
        }
        Some(_) => return Err(ParseError::Shape("\"kvs\" is not an array")),
    }
    collector.finish(Some(revision))
}

/// One key-value: its label (the key, quoted) and the endpoint or why it was skipped.
fn parse_kv(
    kv: &Value,
    prefix: &[u8],
) -> (
    Option<String>,
    Result<super::DiscoveredEndpoint, SkipReason>,
) {
    let Some(kv) = kv.as_object() else {
        return (None, Err(SkipReason::NotAnObject));
    };
    let key = match kv.get("key").map(|k| k.as_str()) {
        None => return (None, Err(SkipReason::MissingField("key"))),
        Some(None) => {
            return (
                None,
                Err(SkipReason::WrongType {
                    field: "key",
                    expected: "a base64 string",
                }),
            )
        }
        Some(Some(k)) => k,
    };
    if key.len() > MAX_KEY_BYTES * 4 / 3 + 4 {
        return (
            None,
            Err(SkipReason::Oversized {
                field: "key",
                limit: MAX_KEY_BYTES,
            }),
        );
    }
    let Ok(key) = STANDARD.decode(key) else {
        return (Some(quote(key)), Err(SkipReason::BadBase64("key")));
    };
    let label = Some(quote(&String::from_utf8_lossy(&key)));
    if !key.starts_with(prefix) {
        return (label, Err(SkipReason::OutsidePrefix));
    }
    (label, parse_value(kv.get("value")))
}

fn parse_value(value: Option<&Value>) -> Result<super::DiscoveredEndpoint, SkipReason> {
    // A key put with an empty value has no `value` field at all in the gateway's JSON.
    let encoded = match value {
        None | Some(Value::Null) => return Err(SkipReason::MissingField("value")),
        Some(v) => v.as_str().ok_or(SkipReason::WrongType {
            field: "value",
            expected: "a base64 string",
        })?,
    };
    if encoded.len() > MAX_VALUE_BYTES * 4 / 3 + 4 {
        return Err(SkipReason::Oversized {
            field: "value",
            limit: MAX_VALUE_BYTES,
        });
    }
    let bytes = STANDARD
        .decode(encoded)
        .map_err(|_| SkipReason::BadBase64("value"))?;
    if bytes.len() > MAX_VALUE_BYTES {
        return Err(SkipReason::Oversized {
            field: "value",
            limit: MAX_VALUE_BYTES,
        });
    }
    let text = core::str::from_utf8(&bytes).map_err(|_| SkipReason::NotUtf8("value"))?;
    let value: Value = serde_json::from_str(text).map_err(|_| SkipReason::NotJson)?;
    let obj = value.as_object().ok_or(SkipReason::NotAnObject)?;
    RawEndpoint {
        address: obj.get("address"),
        port: obj.get("port"),
        weight: obj.get("weight"),
        priority: obj.get("priority"),
        zone: obj.get("zone"),
        meta: obj.get("meta"),
        tags: None,
        registry_healthy: true,
    }
    .validate()
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;
    use crate::rand::{Rng, SeededRng};
    use alloc::string::ToString;
    use alloc::vec;

    const PREFIX: &str = "/services/users/";

    fn b64(s: &str) -> String {
        STANDARD.encode(s.as_bytes())
    }

    fn kv(key: &str, value_json: &str, lease: &str) -> String {
        format!(
            r#"{{"key":"{}","create_revision":"5","mod_revision":"6","version":"2","value":"{}","lease":"{}"}}"#,
            b64(key),
            b64(value_json),
            lease
        )
    }

    fn response(kvs: &[String]) -> String {
        let header = r#"{"cluster_id":"14841639068965178418","member_id":"10276657743932975437","revision":"7","raft_term":"2"}"#;
        if kvs.is_empty() {
            return format!(r#"{{"header":{header}}}"#);
        }
        format!(
            r#"{{"header":{header},"kvs":[{}],"count":"{}"}}"#,
            kvs.join(","),
            kvs.len()
        )
    }

    fn sample() -> String {
        response(&[
            kv(
                "/services/users/1",
                r#"{"address":"10.0.0.1","port":8080}"#,
                "7587870453916416516",
            ),
            kv(
                "/services/users/2",
                r#"{"address":"10.0.0.2","port":8080,"weight":3,"priority":1,"zone":"eu-1b","meta":{"version":"2.4.1"},"id":"users-2"}"#,
                "7587870453916416517",
            ),
            kv(
                "/services/users/3",
                r#"{"address":"fd00::3","port":"8080"}"#,
                "7587870453916416518",
            ),
        ])
    }

    fn limits() -> ParseLimits {
        ParseLimits::for_endpoints(1024)
    }

    #[test]
    fn builds_the_range_request() {
        assert_eq!(prefix_range_end(b"/services/users/"), b"/services/users0");
        assert_eq!(prefix_range_end(b"a\xff"), b"b");
        assert_eq!(prefix_range_end(b"\xff\xff"), vec![0]);
        assert_eq!(
            range_request_body(PREFIX),
            br#"{"key":"L3NlcnZpY2VzL3VzZXJzLw==","range_end":"L3NlcnZpY2VzL3VzZXJzMA=="}"#
        );
        let req = range_request(&EtcdSource {
            cluster: "etcd".into(),
            prefix: PREFIX.into(),
        });
        assert_eq!((req.method, req.path.as_str()), ("POST", "/v3/kv/range"));
        assert!(req
            .headers()
            .contains(&("content-type", "application/json".to_string())));
    }

    #[test]
    fn parses_a_real_shaped_answer() {
        // The example from the issue: key "/services/users/1".
        assert_eq!(b64("/services/users/1"), "L3NlcnZpY2VzL3VzZXJzLzE=");
        let answer = parse_range_response(sample().as_bytes(), PREFIX, &limits()).unwrap();
        assert_eq!(answer.revision, Some(7));
        assert!(answer.skipped.is_empty(), "{:?}", answer.skipped);
        let addrs: Vec<String> = answer.endpoints.iter().map(|e| e.address_text()).collect();
        assert_eq!(addrs, ["10.0.0.1:8080", "10.0.0.2:8080", "[fd00::3]:8080"]);
        let second = &answer.endpoints[1];
        assert_eq!((second.weight, second.priority), (3, 1));
        assert_eq!(second.zone, "eu-1b");
        assert_eq!(second.meta, [("version".to_string(), "2.4.1".to_string())]);
        assert!(answer.endpoints.iter().all(|e| e.registry_healthy));
    }

    #[test]
    fn no_kvs_means_no_instances() {
        let answer = parse_range_response(response(&[]).as_bytes(), PREFIX, &limits()).unwrap();
        assert!(answer.endpoints.is_empty());
        assert_eq!(answer.revision, Some(7));
    }

    #[test]
    fn skips_hostile_entries_with_reasons() {
        let body = response(&[
            kv(
                "/services/users/ok",
                r#"{"address":"10.0.0.1","port":80}"#,
                "1",
            ),
            kv(
                "/services/users/host",
                r#"{"address":"users-1.internal","port":80}"#,
                "1",
            ),
            kv(
                "/services/users/crlf",
                "{\"address\":\"10.0.0.9\\r\\nx-a: b\",\"port\":80}",
                "1",
            ),
            kv(
                "/services/users/p0",
                r#"{"address":"10.0.0.2","port":0}"#,
                "1",
            ),
            kv(
                "/services/users/pbig",
                r#"{"address":"10.0.0.2","port":70000}"#,
                "1",
            ),
            kv("/services/users/arr", r#"["10.0.0.3",80]"#, "1"),
            kv("/services/users/str", r#""10.0.0.3:80""#, "1"),
            kv("/services/users/notjson", "address=10.0.0.3", "1"),
            kv(
                "/services/other/1",
                r#"{"address":"10.0.0.4","port":80}"#,
                "1",
            ),
            kv(
                "/services/users/dup",
                r#"{"address":"10.0.0.1","port":80}"#,
                "1",
            ),
            format!(
                r#"{{"key":"{}","value":"!!notbase64!!"}}"#,
                b64("/services/users/b64")
            ),
            format!(
                r#"{{"key":"{}","value":"{}"}}"#,
                b64("/services/users/utf8"),
                STANDARD.encode(b"{\"address\":\"\xff\"}")
            ),
            format!(
                r#"{{"key":"{}","value":"{}"}}"#,
                b64("/services/users/big"),
                STANDARD.encode("x".repeat(MAX_VALUE_BYTES + 1))
            ),
            format!(r#"{{"key":"{}"}}"#, b64("/services/users/empty")),
            r#"{"key":12}"#.to_string(),
            r#""just a string""#.to_string(),
        ]);
        let answer = parse_range_response(body.as_bytes(), PREFIX, &limits()).unwrap();
        assert_eq!(answer.endpoints.len(), 1);
        let reasons: Vec<(String, SkipReason)> = answer
            .skipped
            .iter()
            .map(|s| (s.entry.clone(), s.reason.clone()))
            .collect();
        let expect = |entry: &str, check: fn(&SkipReason) -> bool| {
            let found = reasons.iter().find(|(e, _)| e.contains(entry));
            assert!(found.is_some_and(|(_, r)| check(r)), "{entry}: {found:?}");
        };
        expect("/host", |r| matches!(r, SkipReason::Hostname(_)));
        expect("/crlf", |r| *r == SkipReason::UnsafeCharacters("address"));
        expect("/p0", |r| {
            matches!(r, SkipReason::OutOfRange { field: "port", .. })
        });
        expect("/pbig", |r| {
            matches!(r, SkipReason::OutOfRange { field: "port", .. })
        });
        expect("/arr", |r| *r == SkipReason::NotAnObject);
        expect("/str", |r| *r == SkipReason::NotAnObject);
        expect("/notjson", |r| *r == SkipReason::NotJson);
        expect("/other/", |r| *r == SkipReason::OutsidePrefix);
        expect("/dup", |r| matches!(r, SkipReason::Duplicate(_)));
        expect("/b64", |r| *r == SkipReason::BadBase64("value"));
        expect("/utf8", |r| *r == SkipReason::NotUtf8("value"));
        expect("/big", |r| {
            matches!(r, SkipReason::Oversized { field: "value", .. })
        });
        expect("/empty", |r| *r == SkipReason::MissingField("value"));
        expect("kvs[14]", |r| {
            matches!(r, SkipReason::WrongType { field: "key", .. })
        });
        expect("kvs[15]", |r| *r == SkipReason::NotAnObject);
        // Every reason is printable for a log line.
        for s in &answer.skipped {
            assert!(!s.to_string().contains('\n'), "{s}");
        }
    }

    #[test]
    fn refuses_documents_that_are_not_the_gateways() {
        let bad: [&[u8]; 7] = [
            b"",
            b"null",
            b"[]",
            br#"{"kvs":[]}"#,
            br#"{"header":{"revision":"x7"}}"#,
            br#"{"header":{"revision":"7"},"kvs":{}}"#,
            b"<html>502 Bad Gateway</html>",
        ];
        for body in bad {
            assert!(
                parse_range_response(body, PREFIX, &limits()).is_err(),
                "{body:?}"
            );
        }
        let tiny = ParseLimits {
            max_endpoints: 10,
            max_body_bytes: 10,
        };
        assert!(matches!(
            parse_range_response(sample().as_bytes(), PREFIX, &tiny),
            Err(ParseError::TooLarge { .. })
        ));
    }

    #[test]
    fn bounds_the_endpoint_count() {
        let kvs: Vec<String> = (0..20)
            .map(|i| {
                kv(
                    &format!("/services/users/{i}"),
                    &format!(r#"{{"address":"10.0.1.{i}","port":80}}"#),
                    "1",
                )
            })
            .collect();
        let limits = ParseLimits::for_endpoints(5);
        let answer = parse_range_response(response(&kvs).as_bytes(), PREFIX, &limits).unwrap();
        assert_eq!(answer.endpoints.len(), 5);
        assert_eq!(answer.skipped_total(), 15);
        assert_eq!(answer.skipped[0].reason, SkipReason::TooManyEndpoints(5));
    }

    #[test]
    fn truncated_and_random_bodies_never_panic() {
        let body = sample();
        let bytes = body.as_bytes();
        for len in 0..bytes.len() {
            // Every strict prefix of a JSON object is incomplete: always an error.
            assert!(parse_range_response(&bytes[..len], PREFIX, &limits()).is_err());
        }
        let mut rng = SeededRng::new(0xe7cd);
        for round in 0..400 {
            let mut noisy = bytes.to_vec();
            if round % 2 == 0 {
                // Flip a few bytes of the valid body.
                for _ in 0..4 {
                    let i = rng.below(noisy.len() as u64) as usize;
                    noisy[i] = rng.next_u64() as u8;
                }
            } else {
                let n = rng.below(200) as usize;
                noisy = (0..n).map(|_| rng.next_u64() as u8).collect();
            }
            match parse_range_response(&noisy, PREFIX, &limits()) {
                Ok(answer) => assert!(answer.endpoints.len() <= 3),
                Err(e) => assert!(!e.to_string().is_empty()),
            }
        }
    }
}
