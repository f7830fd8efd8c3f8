//! Lua scripts run by Redis, named by their SHA-1 so that a call carries only the digest.
//!
//! Redis runs a script atomically (no other command runs in between), which is what makes a
//! read-modify-write of shared state exact across every process of a fleet. `EVALSHA` runs a
//! script Redis has cached; after a Redis restart or `SCRIPT FLUSH` it answers `NOSCRIPT`, and
//! `EVAL` (the source) runs it and caches it again. The rule callers follow, which bounds the
//! reloads to one per cache loss and can never loop: send [`Script::evalsha`] while the script
//! is believed loaded; on [`StoreError::NoScript`](super::StoreError::NoScript) believe it is not,
//! and send [`Script::eval`] until one `EVAL` has succeeded.

use alloc::string::{String, ToString};

use super::webdis::Command;

/// A Lua script and its SHA-1.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Script {
    source: String,
    sha: String,
}

impl Script {
    /// The script of `source`; its digest is computed once, here.
    pub fn new(source: &str) -> Script {
        Script {
            source: source.into(),
            // Digest's Display is lowercase hex, as Redis names scripts.
            sha: sha1_smol::Sha1::from(source.as_bytes())
                .digest()
                .to_string(),
        }
    }

    /// The source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The SHA-1 (40 lower-case hex digits), as Redis names the script.
    pub fn sha(&self) -> &str {
        &self.sha
    }

    /// `EVALSHA sha numkeys keys... args...`.
    pub fn evalsha(&self, keys: &[&str], args: &[&str]) -> Command {
        with_arguments(Command::new("EVALSHA").arg(&self.sha), keys, args)
    }

    /// `EVAL source numkeys keys... args...`: runs the script and caches it in Redis.
    pub fn eval(&self, keys: &[&str], args: &[&str]) -> Command {
        with_arguments(Command::new("EVAL").arg(&self.source), keys, args)
    }

    /// [`Script::evalsha`] when `loaded`, else [`Script::eval`].
    pub fn call(&self, loaded: bool, keys: &[&str], args: &[&str]) -> Command {
        if loaded {
            self.evalsha(keys, args)
        } else {
            self.eval(keys, args)
        }
    }
}

fn with_arguments(command: Command, keys: &[&str], args: &[&str]) -> Command {
    let command = command.arg_u64(keys.len() as u64);
    let command = keys.iter().fold(command, |c, k| c.arg(k));
    args.iter().fold(command, |c, a| c.arg(a))
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;

    #[test]
    fn names_a_script_as_redis_does() {
        // Redis 7.0.15 answered `SCRIPT LOAD "return 1"` with this digest.
        assert_eq!(
            Script::new("return 1").sha(),
            "e0e1f9fabfc9d4800c877a703b823ac0578ff8db"
        );
    }

    #[test]
    fn calls_carry_the_digest_or_the_source() {
        let script = Script::new("return 1");
        assert_eq!(script.sha(), "e0e1f9fabfc9d4800c877a703b823ac0578ff8db");
        assert_eq!(
            script.evalsha(&["k"], &["5", "x"]).body(),
            b"EVALSHA/e0e1f9fabfc9d4800c877a703b823ac0578ff8db/1/k/5/x"
        );
        assert_eq!(script.eval(&[], &[]).body(), b"EVAL/return%201/0");
        assert_eq!(script.call(true, &[], &[]).name(), "EVALSHA");
        assert_eq!(script.call(false, &[], &[]).name(), "EVAL");
    }
}
