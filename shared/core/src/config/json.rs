//! The one JSON entry point: text in, a filter's wire structs out, every error at its field path.
//!
//! The text is read into a [`serde_json::Value`] (syntax errors keep serde_json's line and
//! column), then the wire structs are deserialized from that tree through [`Node`], a
//! deserializer that knows where it stands (`policies[1].limit.per`). Every error, whether serde
//! raises it (type, unknown field, missing field, unknown variant) or a validated wire type does
//! (a bad duration, a route listed twice), comes out located at the deepest value it concerns.
//!
//! Two rules are enforced here once for every filter: an object is never read from a JSON array
//! by position (serde's derived structs would take `"backoff": ["25ms", "250ms"]` as base and
//! cap), and a required field that is absent is reported at its own path
//! (`policies[0].name: required`).

use alloc::borrow::ToOwned;
use alloc::format;
use alloc::string::{String, ToString};
use core::fmt;

use serde::de::value::BorrowedStrDeserializer;
use serde::de::{self, DeserializeSeed, Visitor};
use serde::forward_to_deserialize_any;
use serde_json::{Map, Value};

use super::{ConfigError, FieldPath};

/// Parses a filter's JSON configuration into its wire structs. The error names the field path
/// (`policies[1].max_keys: invalid type: string "x", expected u32`); syntax errors say where the
/// text stops being JSON.
pub fn parse_json<T: de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ConfigError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ConfigError::new(
            "",
            "not valid JSON: the configuration is empty; expected a JSON object (see the filter's configuration reference)",
        ));
    }
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| ConfigError::new("", format!("not valid JSON: {e}")))?;
    from_value(&value, &FieldPath::root())
}

/// Deserializes `T` from `value`, which stands at `path` of a larger document (a pipeline
/// stage's `config`); errors carry the whole path.
pub fn from_value<T: de::DeserializeOwned>(
    value: &Value,
    path: &FieldPath,
) -> Result<T, ConfigError> {
    T::deserialize(Node {
        value,
        path: path.clone(),
    })
    .map_err(|e| e.located(path).into_config())
}

/// A deserialization error on its way out: the message, and once known, where.
#[derive(Debug)]
pub struct Error {
    path: Option<String>,
    /// A field that serde found missing: reported at the field's own path.
    missing: Option<&'static str>,
    message: String,
}

impl Error {
    /// Sets the path unless a deeper one is set already.
    fn located(mut self, path: &FieldPath) -> Error {
        if self.path.is_none() {
            let at = match self.missing {
                Some(field) => path.field(field),
                None => path.clone(),
            };
            self.path = Some(at.as_str().to_owned());
        }
        self
    }

    fn into_config(self) -> ConfigError {
        ConfigError::new(self.path.unwrap_or_default(), self.message)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl de::StdError for Error {}

impl de::Error for Error {
    fn custom<M: fmt::Display>(message: M) -> Self {
        Error {
            path: None,
            missing: None,
            message: message.to_string(),
        }
    }

    fn missing_field(field: &'static str) -> Self {
        Error {
            path: None,
            missing: Some(field),
            message: "required".to_owned(),
        }
    }

    /// Closed sets read as the hand-written checks did: `expected "a", "b" or "c", got "d"`.
    fn unknown_variant(variant: &str, expected: &'static [&'static str]) -> Self {
        Error::custom(format!("expected {}, got \"{variant}\"", one_of(expected)))
    }
}

/// `"a"`, `"a" or "b"`, `"a", "b" or "c"`.
pub(crate) fn one_of(names: &[&str]) -> String {
    let mut out = String::new();
    for (i, name) in names.iter().enumerate() {
        if i > 0 {
            out.push_str(if i + 1 == names.len() { " or " } else { ", " });
        }
        out.push('"');
        out.push_str(name);
        out.push('"');
    }
    out
}

/// A value of the document and where it stands.
struct Node<'a> {
    value: &'a Value,
    path: FieldPath,
}

impl<'de> de::Deserializer<'de> for Node<'de> {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.value {
            Value::Null => visitor.visit_unit(),
            Value::Bool(b) => visitor.visit_bool(*b),
            Value::Number(n) => {
                if let Some(u) = n.as_u64() {
                    visitor.visit_u64(u)
                } else if let Some(i) = n.as_i64() {
                    visitor.visit_i64(i)
                } else {
                    visitor.visit_f64(n.as_f64().unwrap_or(f64::NAN))
                }
            }
            Value::String(s) => visitor.visit_borrowed_str(s),
            Value::Array(items) => visitor.visit_seq(Items {
                items: items.iter(),
                index: 0,
                path: self.path,
            }),
            Value::Object(map) => visitor.visit_map(Members::new(map, self.path)),
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        match self.value {
            Value::Array(_) => Err(de::Error::custom("expected an object {...}, got an array")),
            Value::Object(map) => visitor.visit_map(Members::new(map, self.path)),
            _ => self.deserialize_any(visitor),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.value {
            Value::Null => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Error> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        match self.value {
            Value::String(s) => visitor.visit_enum(Variant {
                name: s,
                value: None,
                path: self.path.clone(),
            }),
            Value::Object(map) if map.len() == 1 => {
                let Some((name, value)) = map.iter().next() else {
                    return Err(de::Error::custom("expected one key"));
                };
                visitor.visit_enum(Variant {
                    name,
                    value: Some(value),
                    path: self.path.field(name),
                })
            }
            _ => self.deserialize_any(visitor),
        }
    }

    forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf unit unit_struct seq tuple tuple_struct map identifier ignored_any
    }
}

/// The items of an array.
struct Items<'a> {
    items: core::slice::Iter<'a, Value>,
    index: usize,
    path: FieldPath,
}

impl<'de> de::SeqAccess<'de> for Items<'de> {
    type Error = Error;

    fn next_element_seed<S: DeserializeSeed<'de>>(
        &mut self,
        seed: S,
    ) -> Result<Option<S::Value>, Error> {
        let Some(value) = self.items.next() else {
            return Ok(None);
        };
        let path = self.path.index(self.index);
        self.index += 1;
        seed.deserialize(Node {
            value,
            path: path.clone(),
        })
        .map(Some)
        .map_err(|e| e.located(&path))
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.items.len())
    }
}

/// The members of an object, in key order.
struct Members<'a> {
    members: serde_json::map::Iter<'a>,
    /// The member whose key was read last: its value comes next.
    current: Option<(&'a str, &'a Value)>,
    path: FieldPath,
}

impl<'a> Members<'a> {
    fn new(map: &'a Map<String, Value>, path: FieldPath) -> Self {
        Members {
            members: map.iter(),
            current: None,
            path,
        }
    }
}

impl<'de> de::MapAccess<'de> for Members<'de> {
    type Error = Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Error> {
        let Some((key, value)) = self.members.next() else {
            return Ok(None);
        };
        self.current = Some((key, value));
        seed.deserialize(BorrowedStrDeserializer::<Error>::new(key))
            .map(Some)
            .map_err(|e| e.located(&self.path.field(key)))
    }

    fn next_value_seed<S: DeserializeSeed<'de>>(&mut self, seed: S) -> Result<S::Value, Error> {
        let Some((key, value)) = self.current.take() else {
            return Err(de::Error::custom("a value without its key"));
        };
        let path = self.path.field(key);
        seed.deserialize(Node {
            value,
            path: path.clone(),
        })
        .map_err(|e| e.located(&path))
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.members.len())
    }
}

/// An enum as written: `"name"` or `{"name": value}`.
struct Variant<'a> {
    name: &'a str,
    value: Option<&'a Value>,
    path: FieldPath,
}

impl<'de> de::EnumAccess<'de> for Variant<'de> {
    type Error = Error;
    type Variant = Self;

    fn variant_seed<S: DeserializeSeed<'de>>(self, seed: S) -> Result<(S::Value, Self), Error> {
        let variant = seed.deserialize(BorrowedStrDeserializer::<Error>::new(self.name))?;
        Ok((variant, self))
    }
}

impl<'de> de::VariantAccess<'de> for Variant<'de> {
    type Error = Error;

    fn unit_variant(self) -> Result<(), Error> {
        match self.value {
            None | Some(Value::Null) => Ok(()),
            Some(_) => Err(de::Error::custom(format!(
                "\"{}\" takes no value",
                self.name
            ))),
        }
    }

    fn newtype_variant_seed<S: DeserializeSeed<'de>>(self, seed: S) -> Result<S::Value, Error> {
        let value = self.value.unwrap_or(&Value::Null);
        seed.deserialize(Node {
            value,
            path: self.path.clone(),
        })
        .map_err(|e| e.located(&self.path))
    }

    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value, Error> {
        let value = self.value.unwrap_or(&Value::Null);
        de::Deserializer::deserialize_any(
            Node {
                value,
                path: self.path.clone(),
            },
            visitor,
        )
        .map_err(|e| e.located(&self.path))
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        let value = self.value.unwrap_or(&Value::Null);
        de::Deserializer::deserialize_struct(
            Node {
                value,
                path: self.path.clone(),
            },
            "",
            fields,
            visitor,
        )
        .map_err(|e| e.located(&self.path))
    }
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use alloc::vec::Vec;

    use serde::Deserialize;

    use super::*;

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
        #[serde(default)]
        mode: Option<Mode>,
        #[serde(default)]
        limit: Option<Limit>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Limit {
        requests: u64,
        per: String,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "snake_case")]
    #[allow(dead_code)]
    enum Mode {
        Normal,
        ForcedOpen,
    }

    fn err(json: &str) -> ConfigError {
        parse_json::<Outer>(json.as_bytes()).unwrap_err()
    }

    #[test]
    fn errors_name_the_deepest_path() {
        let e = err(r#"{"policies": [{"name": "a"}, {"name": "b", "max_keys": "x"}]}"#);
        assert_eq!(e.path, "policies[1].max_keys", "{e}");
        assert!(e.message.starts_with("invalid type: string"), "{e}");
        let e = err(r#"{"policies": [{"name": "a", "nmae": 1}]}"#);
        assert_eq!(e.path, "policies[0].nmae", "{e}");
        assert!(e.message.contains("unknown field"), "{e}");
        let e = err(r#"{"policies": [{"name": "a", "limit": {"requests": 1, "per": 5}}]}"#);
        assert_eq!(e.path, "policies[0].limit.per", "{e}");
        let e = err(r#"{"policies": [{"name": "a", "limit": {"requests": -1, "per": "1s"}}]}"#);
        assert_eq!(e.path, "policies[0].limit.requests", "{e}");
        let e = err(r#"{"policies": {"name": "a"}}"#);
        assert_eq!(e.path, "policies", "{e}");
    }

    #[test]
    fn a_missing_field_is_reported_at_its_own_path() {
        let e = err(r#"{"policies": [{"max_keys": 1}]}"#);
        assert_eq!(e.to_string(), "policies[0].name: required");
        let e = err(r#"{"policies": [{"name": "a", "limit": {"per": "1s"}}]}"#);
        assert_eq!(e.to_string(), "policies[0].limit.requests: required");
    }

    #[test]
    fn closed_sets_name_every_choice() {
        let e = err(r#"{"policies": [{"name": "a", "mode": "open"}]}"#);
        assert_eq!(
            e.to_string(),
            "policies[0].mode: expected \"normal\" or \"forced_open\", got \"open\""
        );
        assert_eq!(one_of(&["a", "b", "c"]), "\"a\", \"b\" or \"c\"");
    }

    #[test]
    fn objects_are_never_read_from_arrays() {
        let e = err(r#"{"policies": [["a", 1]]}"#);
        assert_eq!(e.path, "policies[0]");
        assert!(e.message.contains("got an array"), "{e}");
        let e = err("[[]]");
        assert_eq!(e.path, "");
        assert!(e.message.contains("got an array"), "{e}");
    }

    #[test]
    fn documents_that_are_not_json_or_empty_are_refused() {
        let e = err("{");
        assert_eq!(e.path, "");
        assert!(e.message.starts_with("not valid JSON"), "{e}");
        assert!(err("  ").message.contains("empty"));
        let e = err("7");
        assert!(
            e.path.is_empty() && e.message.contains("invalid type"),
            "{e}"
        );
    }

    #[test]
    fn a_nested_document_keeps_its_prefix() {
        let value: Value = serde_json::from_str(r#"{"policies": [{"name": 1}]}"#).unwrap();
        let at = FieldPath::root().field("stages").index(2).field("config");
        let e = from_value::<Outer>(&value, &at).unwrap_err();
        assert_eq!(e.path, "stages[2].config.policies[0].name");
    }
}
