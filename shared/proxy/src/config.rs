//! Loading a filter's configuration.
//!
//! The plugin configuration is JSON. It is parsed into the filter's serde structs (type errors
//! and unknown fields name their path), then validated by the core into typed values. Any error is logged as one line,
//! `keel <filter>: <path>: <what was expected>`, and the configuration is refused.

use keel_core::config::ConfigError;
use serde::de::DeserializeOwned;

/// Parses `bytes` as the JSON of `T`; the error carries the field path
/// (see [`keel_core::config::parse_json`]).
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ConfigError> {
    keel_core::config::parse_json(bytes)
}

/// Reads the plugin configuration of the current root context and parses it with `validate`.
/// On error logs the one line and returns `None`: the caller's `on_configure` returns `false`.
/// A filter that can also run as a pipeline stage loads through its [`Stage`] instead.
///
/// [`Stage`]: crate::stage::Stage
pub fn load<T>(filter: &str, validate: impl FnOnce(&[u8]) -> Result<T, ConfigError>) -> Option<T> {
    crate::stage::Stage::alone().load(filter, validate)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Outer {
        policies: Vec<Inner>,
    }
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        name: String,
        #[serde(default)]
        max_keys: Option<u32>,
    }

    #[test]
    fn errors_name_the_path() {
        let e = parse::<Outer>(br#"{"policies": [{"name": "a"}, {"name": "b", "max_keys": "x"}]}"#)
            .unwrap_err();
        assert_eq!(e.path, "policies[1].max_keys");
        let e = parse::<Outer>(br#"{"policies": [{"name": "a", "nmae": 1}]}"#).unwrap_err();
        assert_eq!(e.path, "policies[0].nmae");
        assert!(e.message.contains("unknown field"), "{e}");
        let e = parse::<Outer>(b"").unwrap_err();
        assert!(e.message.contains("empty"));
        let e = parse::<Outer>(b"{").unwrap_err();
        assert!(e.message.contains("not valid JSON"), "{e}");
    }
}
