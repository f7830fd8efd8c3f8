//! The Webdis wire: Redis commands as HTTP request bodies, and Webdis's JSON answers as typed
//! replies and errors.
//!
//! Webdis (an HTTP front end for Redis) runs the command in the body of `POST /`: the command
//! name and its arguments joined by `/`, each argument percent-encoded, and answers
//! `{"<COMMAND>": <reply>}`. What was checked by hand with Debian's Webdis 0.1.9 and Redis
//! 7.0.15, and what this module therefore does:
//!
//! | Redis reply | Webdis JSON | [`Reply`] |
//! |---|---|---|
//! | integer | `{"EVAL":5}` | [`Reply::Integer`] |
//! | bulk string | `{"GET":"hello"}` | [`Reply::Text`] |
//! | nil | `{"GET":null}` | [`Reply::Nil`] |
//! | status | `{"SET":[true,"OK"]}` | [`Reply::Status`] |
//! | error | `{"EVALSHA":[false,"NOSCRIPT No matching script. ..."]}` | `Err(`[`StoreError::NoScript`]`)` or `Err(`[`StoreError::Redis`]`)` |
//! | array | `{"EVAL":[1,null,"x"]}` | [`Reply::Array`] (Webdis does not nest: an inner array comes as `null`) |
//!
//! - Every argument is percent-encoded except ASCII letters, digits, `-`, `_` and `~`: Webdis
//!   reads `+` as a space and a trailing `.ext` of the last argument as an output format
//!   (`GET/a.txt` is `GET a` answered as text/plain), so `.` and `+` must be escaped too.
//! - Arguments are text. Webdis cuts an argument at a NUL byte, and a value that is not UTF-8
//!   comes back as `{}` (which parses as [`StoreError::Garbage`]): store UTF-8 text, e.g. base64.
//! - The answer is always HTTP 200 when Redis answered, errors included. Webdis answers
//!   `503` with an empty body when it cannot reach Redis (it reconnects by itself on a later
//!   request) and `403` for a command its ACL disables.
//! - The object's one key is the command name as sent; [`Command::new`] upper-cases it.
//!
//! [`parse_reply`] takes the HTTP status as the callout delivered it (`None`: no answer at all,
//! i.e. the connection was refused or reset, or the callout timed out) and the body, and never
//! panics: anything else than Webdis's JSON for the command sent is [`StoreError::Garbage`] with
//! an excerpt of what came, for the log line.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use serde_json::Value;

use crate::time::Duration;

/// The most bytes of an answer worth reading: Keel's commands answer a few dozen bytes.
pub const MAX_REPLY_BYTES: usize = 64 * 1024;
/// How much of a strange answer [`StoreError`] keeps for its log line.
pub const EXCERPT_CHARS: usize = 80;

/// One Redis command as a Webdis request body (`NAME/arg/arg...`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Command {
    name: String,
    body: String,
}

impl Command {
    /// A command named `name` (upper-cased; ASCII letters only by Redis's own naming).
    pub fn new(name: &str) -> Command {
        let name = name.to_ascii_uppercase();
        let mut body = String::with_capacity(name.len() + 32);
        percent_encode(&mut body, name.as_bytes());
        Command { name, body }
    }

    /// Appends an argument (percent-encoded).
    pub fn arg(mut self, arg: impl AsRef<[u8]>) -> Command {
        self.body.push('/');
        percent_encode(&mut self.body, arg.as_ref());
        self
    }

    /// Appends a decimal integer argument.
    pub fn arg_u64(mut self, n: u64) -> Command {
        self.body.push('/');
        crate::codec::push_decimal(&mut self.body, n);
        self
    }

    /// The command's name as Webdis will key its answer (`EVALSHA`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The request body to `POST /`.
    pub fn body(&self) -> &[u8] {
        self.body.as_bytes()
    }

    /// `GET key`: [`Reply::Text`] or [`Reply::Nil`].
    pub fn get(key: &str) -> Command {
        Command::new("GET").arg(key)
    }

    /// `SET key value PX ttl`: [`Reply::Status`] `OK`. A TTL below a millisecond is one
    /// millisecond (Redis refuses `PX 0`).
    pub fn set_with_ttl(key: &str, value: &str, ttl: Duration) -> Command {
        Command::new("SET")
            .arg(key)
            .arg(value)
            .arg("PX")
            .arg_u64(ttl.as_millis().max(1))
    }

    /// `SET key value NX PX ttl`, set-if-absent: [`Reply::Status`] `OK` when it was set,
    /// [`Reply::Nil`] when the key already existed (nothing changed).
    pub fn set_if_absent(key: &str, value: &str, ttl: Duration) -> Command {
        Command::new("SET")
            .arg(key)
            .arg(value)
            .arg("NX")
            .arg("PX")
            .arg_u64(ttl.as_millis().max(1))
    }

    /// `DEL key`: [`Reply::Integer`], how many keys were removed.
    pub fn del(key: &str) -> Command {
        Command::new("DEL").arg(key)
    }
}

/// Percent-encodes `bytes` onto `out`, leaving only ASCII letters, digits, `-`, `_` and `~`
/// (see the module docs for why `.` and `+` are escaped too).
pub fn percent_encode(out: &mut String, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in bytes {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'~' {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        }
    }
}

/// A Redis reply, as Webdis carries it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// Nil (a missing key, `SET NX` on an existing key, a Lua `false`).
    Nil,
    /// An integer.
    Integer(i64),
    /// A bulk string.
    Text(String),
    /// A status reply, such as `OK`.
    Status(String),
    /// An array (flat: Webdis gives inner arrays as [`Reply::Nil`]).
    Array(Vec<Reply>),
}

impl Reply {
    /// The integer, if this is one.
    pub fn as_integer(&self) -> Option<i64> {
        match self {
            Reply::Integer(n) => Some(*n),
            _ => None,
        }
    }

    /// The text of a bulk string, if this is one.
    pub fn as_text(&self) -> Option<&str> {
        match self {
            Reply::Text(s) => Some(s),
            _ => None,
        }
    }

    /// The items, if this is an array.
    pub fn as_array(&self) -> Option<&[Reply]> {
        match self {
            Reply::Array(items) => Some(items),
            _ => None,
        }
    }

    /// Whether this is nil.
    pub fn is_nil(&self) -> bool {
        matches!(self, Reply::Nil)
    }

    /// Whether this is the status `OK`.
    pub fn is_ok(&self) -> bool {
        matches!(self, Reply::Status(s) if s == "OK")
    }
}

/// Why a command did not give a [`Reply`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreError {
    /// No HTTP answer: the connection was refused or reset, or the callout timed out.
    NoAnswer,
    /// The host refused to send the callout (an unknown cluster, a host without callouts).
    NotSent,
    /// An HTTP status other than 200: `503` when Webdis cannot reach Redis, `403` for a
    /// command its ACL disables, anything from a proxy in between.
    Status {
        /// The HTTP status.
        status: u16,
        /// The start of the body.
        excerpt: String,
    },
    /// Redis does not have the script (`EVALSHA` after a restart or `SCRIPT FLUSH`): send it
    /// again with `EVAL`.
    NoScript,
    /// Redis answered an error (a script error, a wrong type, ...): its message.
    Redis(String),
    /// The answer is not Webdis's JSON for the command (HTML from a proxy, another service,
    /// a wrong reply shape): an excerpt of it.
    Garbage(String),
    /// The body was larger than [`MAX_REPLY_BYTES`]; not read.
    TooLarge(usize),
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::NoAnswer => {
                f.write_str("no answer (connection refused, reset or timed out)")
            }
            StoreError::NotSent => f.write_str("the host refused to send the call"),
            StoreError::Status { status, excerpt } => {
                write!(f, "HTTP status {status}, body \"{excerpt}\"")
            }
            StoreError::NoScript => f.write_str("NOSCRIPT (the script is not loaded)"),
            StoreError::Redis(message) => write!(f, "Redis error \"{message}\""),
            StoreError::Garbage(excerpt) => write!(f, "not a Webdis answer: \"{excerpt}\""),
            StoreError::TooLarge(size) => write!(f, "an answer of {size} bytes (too large)"),
        }
    }
}

impl StoreError {
    /// A short stable name for metrics and state changes: `no_answer`, `not_sent`, `status`,
    /// `noscript`, `redis`, `garbage`, `too_large`.
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::NoAnswer => "no_answer",
            StoreError::NotSent => "not_sent",
            StoreError::Status { .. } => "status",
            StoreError::NoScript => "noscript",
            StoreError::Redis(_) => "redis",
            StoreError::Garbage(_) => "garbage",
            StoreError::TooLarge(_) => "too_large",
        }
    }
}

/// Reads Webdis's answer to `command` (the name as [`Command::name`] gives it): the HTTP
/// `status` as the callout delivered it (`None` when no answer came) and the `body`.
pub fn parse_reply(command: &str, status: Option<u16>, body: &[u8]) -> Result<Reply, StoreError> {
    let Some(status) = status else {
        return Err(StoreError::NoAnswer);
    };
    if status != 200 {
        return Err(StoreError::Status {
            status,
            excerpt: excerpt(body),
        });
    }
    let garbage = || StoreError::Garbage(excerpt(body));
    let value: Value = serde_json::from_slice(body).map_err(|_| garbage())?;
    let Value::Object(map) = value else {
        return Err(garbage());
    };
    if map.len() != 1 {
        return Err(garbage());
    }
    let Some(reply) = map.get(command) else {
        return Err(garbage());
    };
    match reply {
        Value::Array(items) => match items.as_slice() {
            // Only status and error replies carry JSON booleans: a Lua `true` becomes the
            // integer 1 and a `false` nil, so an array reply never starts with one.
            [Value::Bool(true), Value::String(status)] => Ok(Reply::Status(status.clone())),
            [Value::Bool(false), Value::String(message)] => Err(redis_error(message)),
            [Value::Bool(_), ..] => Err(garbage()),
            _ => items
                .iter()
                .map(|item| scalar(item).ok_or_else(garbage))
                .collect::<Result<Vec<Reply>, StoreError>>()
                .map(Reply::Array),
        },
        other => scalar(other).ok_or_else(garbage),
    }
}

/// A reply that is not an array.
fn scalar(value: &Value) -> Option<Reply> {
    match value {
        Value::Null => Some(Reply::Nil),
        Value::Number(n) => n.as_i64().map(Reply::Integer),
        Value::String(s) => Some(Reply::Text(s.clone())),
        _ => None,
    }
}

fn redis_error(message: &str) -> StoreError {
    if message.starts_with("NOSCRIPT") {
        StoreError::NoScript
    } else {
        StoreError::Redis(cut(message))
    }
}

/// The first [`EXCERPT_CHARS`] characters of `body`, control characters and invalid UTF-8
/// shown as `?`, quotes as `'`, so the excerpt fits on one log line.
pub fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    cut(&text)
}

fn cut(text: &str) -> String {
    let mut out = String::with_capacity(EXCERPT_CHARS.min(text.len()) + 3);
    for (i, c) in text.chars().enumerate() {
        if i == EXCERPT_CHARS {
            out.push_str("...");
            break;
        }
        out.push(match c {
            '"' => '\'',
            '\u{fffd}' => '?',
            c if c.is_control() => ' ',
            c => c,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;
    use alloc::string::ToString;
    use alloc::vec;

    fn ok(command: &str, body: &str) -> Result<Reply, StoreError> {
        parse_reply(command, Some(200), body.as_bytes())
    }

    #[test]
    fn commands_encode_every_byte_webdis_would_misread() {
        let c = Command::new("evalsha")
            .arg("a.txt")
            .arg("x+y z/w%")
            .arg_u64(42);
        assert_eq!(c.name(), "EVALSHA");
        assert_eq!(c.body(), b"EVALSHA/a%2Etxt/x%2By%20z%2Fw%25/42");
        let c = Command::new("GET").arg([0xc3, 0xa9, b'~', b'-', b'_']);
        assert_eq!(c.body(), b"GET/%C3%A9~-_");
        assert_eq!(Command::new("PING").body(), b"PING");
        assert_eq!(Command::new("GET").arg("").body(), b"GET/");
    }

    #[test]
    fn store_commands_for_idempotency_keys() {
        let ms = Duration::from_millis;
        assert_eq!(Command::get("k:1").body(), b"GET/k%3A1");
        assert_eq!(
            Command::set_with_ttl("k", "v", ms(1500)).body(),
            b"SET/k/v/PX/1500"
        );
        assert_eq!(
            Command::set_if_absent("k", "v", Duration::from_nanos(5)).body(),
            b"SET/k/v/NX/PX/1"
        );
        assert_eq!(Command::del("k").body(), b"DEL/k");
    }

    #[test]
    fn replies_seen_from_webdis_0_1_9() {
        // Each body is what Webdis answered by hand on this machine.
        assert_eq!(ok("EVAL", r#"{"EVAL":5}"#), Ok(Reply::Integer(5)));
        assert_eq!(
            ok("GET", r#"{"GET":"hello"}"#),
            Ok(Reply::Text("hello".into()))
        );
        assert_eq!(ok("GET", r#"{"GET":null}"#), Ok(Reply::Nil));
        let set = ok("SET", r#"{"SET":[true,"OK"]}"#).unwrap();
        assert!(set.is_ok());
        assert_eq!(ok("SET", r#"{"SET":null}"#), Ok(Reply::Nil));
        assert_eq!(
            ok("EVAL", r#"{"EVAL":[1,2,"x"]}"#),
            Ok(Reply::Array(vec![
                Reply::Integer(1),
                Reply::Integer(2),
                Reply::Text("x".into())
            ]))
        );
        assert_eq!(
            ok("EVAL", r#"{"EVAL":[null,"x"]}"#),
            Ok(Reply::Array(vec![Reply::Nil, Reply::Text("x".into())]))
        );
        assert_eq!(ok("EVAL", r#"{"EVAL":[]}"#), Ok(Reply::Array(vec![])));
        assert_eq!(
            ok("EVAL", r#"{"EVAL":"a\"b\n"}"#),
            Ok(Reply::Text("a\"b\n".into()))
        );
        assert_eq!(
            ok(
                "EVALSHA",
                r#"{"EVALSHA":[false,"NOSCRIPT No matching script. Please use EVAL."]}"#
            ),
            Err(StoreError::NoScript)
        );
        assert_eq!(
            ok(
                "EVAL",
                r#"{"EVAL":[false,"ERR user_script:1: boom script: 82903a04, on @user_script:1."]}"#
            ),
            Err(StoreError::Redis(
                "ERR user_script:1: boom script: 82903a04, on @user_script:1.".into()
            ))
        );
        assert_eq!(
            ok(
                "SCRIPT",
                r#"{"SCRIPT":"e0e1f9fabfc9d4800c877a703b823ac0578ff8db"}"#
            )
            .unwrap()
            .as_text(),
            Some("e0e1f9fabfc9d4800c877a703b823ac0578ff8db")
        );
    }

    #[test]
    fn redis_down_and_no_answer() {
        // Webdis without Redis: 503 with an empty body.
        assert_eq!(
            parse_reply("EVAL", Some(503), b""),
            Err(StoreError::Status {
                status: 503,
                excerpt: "".into()
            })
        );
        assert_eq!(parse_reply("EVAL", None, b""), Err(StoreError::NoAnswer));
        let forbidden = parse_reply("DEBUG", Some(403), b"<html>no</html>").unwrap_err();
        assert_eq!(
            forbidden.to_string(),
            "HTTP status 403, body \"<html>no</html>\""
        );
        assert_eq!(forbidden.kind(), "status");
    }

    #[test]
    fn garbage_names_what_came() {
        let html = "<!DOCTYPE html><html><body>It works!</body></html>";
        let e = ok("EVAL", html).unwrap_err();
        assert_eq!(e, StoreError::Garbage(html.replace('"', "'")));
        assert!(e.to_string().contains("It works!"), "{e}");
        for body in [
            r#"{}"#,                     // a value that is not UTF-8, as Webdis sends it
            r#"{"GET":"x"}"#,            // the answer to another command
            r#"{"EVAL":1,"GET":2}"#,     // two keys
            r#"{"EVAL":1.5}"#,           // not an integer
            r#"{"EVAL":true}"#,          // a bare boolean
            r#"{"EVAL":[true]}"#,        // a status without text
            r#"{"EVAL":[true,"OK",1]}"#, // a status with more
            r#"{"EVAL":{"a":1}}"#,       // an object
            r#"{"EVAL":[1,[2]]}"#,       // nested
            r#"[1]"#,
            r#""EVAL""#,
            "",
            "{\"EVAL\":",
        ] {
            assert!(
                matches!(ok("EVAL", body), Err(StoreError::Garbage(_))),
                "{body}"
            );
        }
        let long = "x".repeat(500);
        let StoreError::Garbage(cut) = ok("EVAL", &long).unwrap_err() else {
            unreachable!()
        };
        assert_eq!(cut.len(), EXCERPT_CHARS + 3);
        assert_eq!(excerpt(b"a\r\nb\xff\"c"), "a  b?'c");
    }

    #[test]
    fn nothing_panics_on_any_byte_string() {
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..2000 {
            let len = rng.usize(0..40);
            let mut body: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
            if rng.bool() {
                body.splice(0..0, br#"{"EVAL":"#.iter().copied());
            }
            let _ = parse_reply("EVAL", Some(200), &body);
        }
    }
}
