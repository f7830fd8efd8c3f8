//! Where a filter finds the fleet store: the Envoy cluster of Webdis, as written in a
//! filter's configuration.
//!
//! ```json
//! {"cluster": "webdis", "timeout": "100ms"}
//! ```

use alloc::format;
use alloc::string::String;

use serde::Deserialize;

use crate::config::{ConfigError, FieldPath, PositiveDuration};
use crate::time::Duration;

/// The default callout timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(100);
/// The longest callout timeout: a request may wait this long for the store.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(10);

/// The store as written.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RedisSpec {
    /// The Envoy cluster whose hosts are Webdis.
    pub cluster: String,
    /// The `:authority` of the calls; the cluster name when absent.
    #[serde(default)]
    pub authority: Option<String>,
    /// How long a call may take before it counts as failed; default `100ms`.
    #[serde(default)]
    pub timeout: Option<PositiveDuration>,
}

/// A validated store: Redis reached through Webdis in an Envoy cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedisStore {
    /// The Envoy cluster.
    pub cluster: String,
    /// The `:authority` of the calls.
    pub authority: String,
    /// The callout timeout.
    pub timeout: Duration,
}

impl RedisStore {
    /// Validates `spec` found at `path`.
    pub fn from_spec(path: &FieldPath, spec: &RedisSpec) -> Result<RedisStore, ConfigError> {
        if spec.cluster.is_empty() {
            return Err(path
                .field("cluster")
                .error("must name the Envoy cluster of Webdis"));
        }
        let authority = spec
            .authority
            .clone()
            .unwrap_or_else(|| spec.cluster.clone());
        if authority.is_empty() || authority.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return Err(path
                .field("authority")
                .error("must be a host name without spaces or control characters"));
        }
        let timeout = match spec.timeout {
            Some(d) if d.0 > MAX_TIMEOUT => {
                return Err(path
                    .field("timeout")
                    .error(format!("must be at most {MAX_TIMEOUT}, got {}", d.0)));
            }
            Some(d) => d.0,
            None => DEFAULT_TIMEOUT,
        };
        Ok(RedisStore {
            cluster: spec.cluster.clone(),
            authority,
            timeout,
        })
    }
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;
    use alloc::string::ToString;

    fn parse(json: &str) -> Result<RedisStore, ConfigError> {
        let at = FieldPath::root().field("redis");
        let value: serde_json::Value =
            serde_json::from_str(json).map_err(|e| ConfigError::new("", e.to_string()))?;
        let spec: RedisSpec = crate::config::from_value(&value, &at)?;
        RedisStore::from_spec(&at, &spec)
    }

    #[test]
    fn defaults_and_fields() {
        let s = parse(r#"{"cluster": "webdis"}"#).unwrap();
        assert_eq!(s.authority, "webdis");
        assert_eq!(s.timeout, DEFAULT_TIMEOUT);
        let s = parse(r#"{"cluster": "w", "authority": "redis.local", "timeout": "2s"}"#).unwrap();
        assert_eq!(
            (s.authority.as_str(), s.timeout),
            ("redis.local", Duration::from_secs(2))
        );
    }

    #[test]
    fn bad_fields_are_named() {
        for (json, path) in [
            (r#"{"cluster": ""}"#, "redis.cluster"),
            (r#"{"cluster": "w", "authority": "a b"}"#, "redis.authority"),
            (r#"{"cluster": "w", "timeout": "0s"}"#, "redis.timeout"),
            (r#"{"cluster": "w", "timeout": "11s"}"#, "redis.timeout"),
            (r#"{"cluster": "w", "timeout": "soon"}"#, "redis.timeout"),
        ] {
            assert_eq!(parse(json).unwrap_err().path, path, "{json}");
        }
    }
}
