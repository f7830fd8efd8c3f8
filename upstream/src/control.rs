//! The control interface of an upstream, on its own port under `/__keel/`, so the demo can
//! switch a running `keel-upstream` process:
//!
//! | request | effect |
//! |---|---|
//! | `GET /__keel/stats` | counters as JSON: `name`, `mode`, `healthy`, `total`, `health_checks`, `by_path`, `by_method`, `by_status` |
//! | `GET /__keel/mode` | the mode as JSON |
//! | `POST /__keel/mode` | sets the mode from a JSON body (below); answers the new mode |
//! | `POST /__keel/health` | `{"up": false}` makes `/healthz` answer 503 |
//! | `POST /__keel/reset` | clears the counters and the log |
//! | `GET /__keel/capacity` | capacity mode as JSON, with `in_service`, `queued`, `rejected`, `waited` |
//! | `POST /__keel/capacity` | sets capacity mode: `{"concurrency": 20, "service": "10ms", "queue": 200, "growth": 0.0}` (`queue` and `growth` optional), or `{"off": true}` |
//!
//! Modes as JSON: `{"mode": "normal"}`, `{"mode": "fail", "status": 503, "headers":
//! {"retry-after": "2"}}`, `{"mode": "fail_first", "attempts": 1, "status": 503}`,
//! `{"mode": "fail_rate", "rate": 0.2, "status": 500}`, `{"mode": "stall", "for": "5s"}`,
//! `{"mode": "close"}`, `{"mode": "delay", "for": "200ms"}`. Unknown fields are errors, as in
//! every Keel configuration.
//!
//! Example: `curl -s -XPOST localhost:18091/__keel/mode -d '{"mode":"fail","status":503}'`.

use std::time::Duration;

use bytes::Bytes;
use serde_json::{json, Map, Value};

use crate::capacity::Capacity;
use crate::server::{reply, Reply};
use crate::{Mode, Shared};

/// Answers a request under `/__keel/`.
pub(crate) fn handle(shared: &Shared, method: &str, path: &str, body: &[u8]) -> Reply {
    match (method, path) {
        ("GET", "/__keel/stats") => json_reply(200, &stats(shared)),
        ("GET", "/__keel/mode") => json_reply(200, &mode_to_json(&shared.state().mode)),
        ("POST", "/__keel/mode") => match parse_body(body).and_then(|v| mode_from_json(&v)) {
            Ok(mode) => {
                let answer = mode_to_json(&mode);
                shared.state().mode = mode;
                json_reply(200, &answer)
            }
            Err(e) => json_reply(400, &json!({ "error": e })),
        },
        ("POST", "/__keel/health") => match parse_body(body).and_then(|v| health_from_json(&v)) {
            Ok(up) => {
                shared.state().healthy = up;
                json_reply(200, &json!({ "up": up }))
            }
            Err(e) => json_reply(400, &json!({ "error": e })),
        },
        ("GET", "/__keel/capacity") => json_reply(200, &capacity_json(shared)),
        ("POST", "/__keel/capacity") => {
            match parse_body(body).and_then(|v| capacity_from_json(&v)) {
                Ok(capacity) => {
                    shared.gate.set(capacity);
                    json_reply(200, &capacity_json(shared))
                }
                Err(e) => json_reply(400, &json!({ "error": e })),
            }
        }
        ("POST", "/__keel/reset") => {
            shared.gate.reset_counts();
            shared.state().reset_counts();
            json_reply(200, &json!({ "reset": true }))
        }
        _ => json_reply(
            404,
            &json!({ "error": format!("no control endpoint {method} {path}") }),
        ),
    }
}

/// The counters of an upstream as JSON.
pub(crate) fn stats(shared: &Shared) -> Value {
    let state = shared.state();
    let by_status: Map<String, Value> = state
        .by_status
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    json!({
        "name": shared.name,
        "mode": mode_to_json(&state.mode),
        "healthy": state.healthy,
        "total": state.total,
        "health_checks": state.health_checks,
        "by_path": state.by_path,
        "by_method": state.by_method,
        "by_status": by_status,
        "capacity": capacity_json(shared),
    })
}

/// Capacity mode as JSON: the setting (`null` when off) and the gate's counts.
fn capacity_json(shared: &Shared) -> Value {
    let counts = shared.gate.counts();
    let setting = match shared.gate.capacity() {
        Some(c) => json!({
            "concurrency": c.concurrency,
            "service": format!("{}us", c.service.as_micros()),
            "queue": c.queue,
            "growth": c.growth,
        }),
        None => Value::Null,
    };
    json!({
        "setting": setting,
        "in_service": counts.in_service,
        "queued": counts.queued,
        "rejected": counts.rejected,
        "waited": counts.waited,
    })
}

/// Parses a capacity setting (`None`: off); the error names the field.
pub fn capacity_from_json(value: &Value) -> Result<Option<Capacity>, String> {
    let object = value
        .as_object()
        .ok_or("expected an object like {\"concurrency\": 20, \"service\": \"10ms\"}")?;
    if object.get("off").is_some() {
        check_fields(object, &["off"])?;
        return match object.get("off").and_then(Value::as_bool) {
            Some(true) => Ok(None),
            _ => Err("off: expected true".to_string()),
        };
    }
    check_fields(object, &["concurrency", "service", "queue", "growth"])?;
    let concurrency = object
        .get("concurrency")
        .and_then(Value::as_u64)
        .and_then(|n| u32::try_from(n).ok())
        .filter(|n| *n >= 1)
        .ok_or("concurrency: expected a whole number >= 1")?;
    let text = object
        .get("service")
        .and_then(Value::as_str)
        .ok_or("service: expected a duration like \"10ms\"")?;
    let service = keel_core::time::Duration::parse(text)
        .map(|d| Duration::from_nanos(d.as_nanos()))
        .map_err(|e| format!("service: expected a duration like \"10ms\", got {text:?}: {e}"))?;
    let mut capacity = Capacity::new(concurrency, service);
    if let Some(queue) = object.get("queue") {
        capacity.queue = queue
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or("queue: expected a whole number")?;
    }
    if let Some(growth) = object.get("growth") {
        capacity.growth = growth
            .as_f64()
            .filter(|g| g.is_finite() && *g >= 0.0)
            .ok_or("growth: expected a number >= 0")?;
    }
    Ok(Some(capacity))
}

fn json_reply(status: u16, value: &Value) -> Reply {
    let mut response = reply(status, &[], Bytes::from(format!("{value}\n")));
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

fn parse_body(body: &[u8]) -> Result<Value, String> {
    serde_json::from_slice(body).map_err(|e| format!("the body is not JSON: {e}"))
}

fn health_from_json(value: &Value) -> Result<bool, String> {
    let object = value
        .as_object()
        .ok_or("expected an object like {\"up\": false}")?;
    check_fields(object, &["up"])?;
    object
        .get("up")
        .and_then(Value::as_bool)
        .ok_or_else(|| "up: expected true or false".to_string())
}

/// Parses a mode; the error names the field.
pub fn mode_from_json(value: &Value) -> Result<Mode, String> {
    let object = value
        .as_object()
        .ok_or("expected an object like {\"mode\": \"fail\", \"status\": 503}")?;
    let name = object
        .get("mode")
        .and_then(Value::as_str)
        .ok_or("mode: expected one of normal, fail, fail_first, fail_rate, stall, close, delay")?;
    match name {
        "normal" => {
            check_fields(object, &["mode"])?;
            Ok(Mode::Normal)
        }
        "fail" => {
            check_fields(object, &["mode", "status", "headers"])?;
            Ok(Mode::Fail {
                status: status(object)?,
                headers: headers(object)?,
            })
        }
        "fail_first" => {
            check_fields(object, &["mode", "attempts", "status", "headers"])?;
            let attempts = object
                .get("attempts")
                .and_then(Value::as_u64)
                .and_then(|n| u32::try_from(n).ok())
                .ok_or("attempts: expected a whole number")?;
            Ok(Mode::FailFirst {
                attempts,
                status: status(object)?,
                headers: headers(object)?,
            })
        }
        "fail_rate" => {
            check_fields(object, &["mode", "rate", "status"])?;
            let rate = object
                .get("rate")
                .and_then(Value::as_f64)
                .filter(|r| (0.0..=1.0).contains(r))
                .ok_or("rate: expected a number in [0, 1]")?;
            Ok(Mode::FailRate {
                rate,
                status: status(object)?,
            })
        }
        "stall" => {
            check_fields(object, &["mode", "for"])?;
            Ok(Mode::Stall(duration(object)?))
        }
        "close" => {
            check_fields(object, &["mode"])?;
            Ok(Mode::Close)
        }
        "delay" => {
            check_fields(object, &["mode", "for"])?;
            Ok(Mode::Delay(duration(object)?))
        }
        other => Err(format!(
            "mode: expected one of normal, fail, fail_first, fail_rate, stall, close, delay, got {other:?}"
        )),
    }
}

/// A mode as JSON, in the form [`mode_from_json`] reads.
pub fn mode_to_json(mode: &Mode) -> Value {
    let headers = |headers: &[(String, String)]| -> Value {
        Value::Object(
            headers
                .iter()
                .map(|(n, v)| (n.clone(), Value::String(v.clone())))
                .collect(),
        )
    };
    match mode {
        Mode::Normal => json!({ "mode": "normal" }),
        Mode::Fail { status, headers: h } => {
            json!({ "mode": "fail", "status": status, "headers": headers(h) })
        }
        Mode::FailFirst {
            attempts,
            status,
            headers: h,
        } => json!({
            "mode": "fail_first", "attempts": attempts, "status": status, "headers": headers(h)
        }),
        Mode::FailRate { rate, status } => {
            json!({ "mode": "fail_rate", "rate": rate, "status": status })
        }
        Mode::Stall(d) => json!({ "mode": "stall", "for": format!("{}ms", d.as_millis()) }),
        Mode::Close => json!({ "mode": "close" }),
        Mode::Delay(d) => json!({ "mode": "delay", "for": format!("{}ms", d.as_millis()) }),
    }
}

fn check_fields(object: &Map<String, Value>, allowed: &[&str]) -> Result<(), String> {
    match object.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(unknown) => Err(format!(
            "{unknown}: unknown field (expected one of {})",
            allowed.join(", ")
        )),
        None => Ok(()),
    }
}

fn status(object: &Map<String, Value>) -> Result<u16, String> {
    object
        .get("status")
        .and_then(Value::as_u64)
        .and_then(|n| u16::try_from(n).ok())
        .filter(|n| (100..=599).contains(n))
        .ok_or_else(|| "status: expected an HTTP status in 100..=599".to_string())
}

fn headers(object: &Map<String, Value>) -> Result<Vec<(String, String)>, String> {
    match object.get("headers") {
        None => Ok(Vec::new()),
        Some(Value::Object(map)) => map
            .iter()
            .map(|(name, value)| match value.as_str() {
                Some(v) => Ok((name.clone(), v.to_string())),
                None => Err(format!("headers.{name}: expected a string")),
            })
            .collect(),
        Some(_) => Err("headers: expected an object of strings".to_string()),
    }
}

fn duration(object: &Map<String, Value>) -> Result<Duration, String> {
    let text = object
        .get("for")
        .and_then(Value::as_str)
        .ok_or("for: expected a duration like \"500ms\"")?;
    keel_core::time::Duration::parse(text)
        .map(|d| Duration::from_nanos(d.as_nanos()))
        .map_err(|e| format!("for: expected a duration like \"500ms\", got {text:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_round_trip() {
        let modes = [
            Mode::Normal,
            Mode::fail(503).with_header("retry-after", "2"),
            Mode::fail_first(2, 500),
            Mode::FailRate {
                rate: 0.25,
                status: 502,
            },
            Mode::Stall(Duration::from_millis(1500)),
            Mode::Close,
            Mode::Delay(Duration::from_millis(200)),
        ];
        for mode in modes {
            assert_eq!(mode_from_json(&mode_to_json(&mode)), Ok(mode));
        }
    }

    #[test]
    fn capacity_settings_parse_and_errors_name_the_field() {
        let c = capacity_from_json(&json!({"concurrency": 20, "service": "10ms"}))
            .unwrap()
            .unwrap();
        assert_eq!(c, Capacity::new(20, Duration::from_millis(10)));
        assert_eq!(c.queue, 200);
        let c = capacity_from_json(
            &json!({"concurrency": 4, "service": "1s", "queue": 0, "growth": 0.5}),
        )
        .unwrap()
        .unwrap();
        assert_eq!((c.queue, c.growth), (0, 0.5));
        assert_eq!(capacity_from_json(&json!({"off": true})), Ok(None));
        let err = |v: Value| capacity_from_json(&v).unwrap_err();
        assert!(err(json!({"concurrency": 0, "service": "1ms"})).starts_with("concurrency:"));
        assert!(err(json!({"concurrency": 2})).starts_with("service:"));
        assert!(err(json!({"concurrency": 2, "service": "1ms", "qeue": 1})).starts_with("qeue:"));
        assert!(
            err(json!({"concurrency": 2, "service": "1ms", "growth": -1})).starts_with("growth:")
        );
    }

    #[test]
    fn errors_name_the_field() {
        let err = |v: Value| mode_from_json(&v).unwrap_err();
        assert!(err(json!({"mode": "fail"})).starts_with("status:"));
        assert!(err(json!({"mode": "fail", "status": 503, "satus": 1})).starts_with("satus:"));
        assert!(err(json!({"mode": "stall", "for": "soon"})).starts_with("for:"));
        assert!(err(json!({"mode": "fail_rate", "rate": 1.5, "status": 500})).starts_with("rate:"));
        assert!(err(json!({"mode": "explode"})).starts_with("mode:"));
    }
}
