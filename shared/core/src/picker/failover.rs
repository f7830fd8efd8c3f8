//! Failover across a key's hosts: the picker's ordered host list for a request (its preference
//! list), how it is handed to the retry filter, and the choice of each retry's host.
//!
//! A retry that goes back to the host that just failed helps nobody (envoy#2259, #27317). The
//! picker knows where a key goes next: the next distinct endpoint along the ring or the Maglev
//! table from the key's hash, the endpoint a balancer would pick next. It writes that list,
//! first the endpoint it picked, as [`HOSTS_PROPERTY`] on the stream ([`encode_hosts`]); the
//! retry filter reads it ([`decode_hosts`]) and sends attempt `n` to [`next_host`]: the first
//! listed host not yet tried for this request and whose breaker is not open. The list depends
//! only on the key's hash and the endpoint set (see [`super::Picker::preference`]), so every
//! worker and every process with the same set fails a key over to the same host.
//!
//! When every listed host was tried (or is refused by its breaker), [`next_host`] says
//! [`NextHost::Exhausted`] rather than going round again.

use alloc::string::String;
use alloc::vec::Vec;

/// The stream property (one path segment; Envoy keeps it in the stream's filter state as
/// `wasm.keel.picker.hosts`) that holds the picker's host list for the request.
pub const HOSTS_PROPERTY: &str = "keel.picker.hosts";

/// The most hosts a list holds: more than any retry policy has attempts (at most 5).
pub const MAX_HOSTS: usize = 8;

/// The longest host text accepted (`[ipv6]:port` is at most 47 bytes).
const MAX_HOST_LEN: usize = 64;

/// The list as written in [`HOSTS_PROPERTY`]: `ip:port` texts joined by `,`.
pub fn encode_hosts<'a>(hosts: impl IntoIterator<Item = &'a str>) -> String {
    let mut out = String::new();
    for (i, h) in hosts.into_iter().take(MAX_HOSTS).enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(h);
    }
    out
}

/// The hosts of a [`HOSTS_PROPERTY`] value, in order; `None` when it is not a list
/// [`encode_hosts`] writes (empty, an empty or over-long entry, spaces or control characters,
/// more than [`MAX_HOSTS`] entries, a host twice).
pub fn decode_hosts(text: &str) -> Option<Vec<String>> {
    let mut hosts: Vec<String> = Vec::new();
    for h in text.split(',') {
        let well_formed =
            !h.is_empty() && h.len() <= MAX_HOST_LEN && h.bytes().all(|b| b.is_ascii_graphic());
        if !well_formed || hosts.len() == MAX_HOSTS || hosts.iter().any(|k| k == h) {
            return None;
        }
        hosts.push(String::from(h));
    }
    Some(hosts)
}

/// Where the next attempt of a request goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NextHost<'a> {
    /// This host of the list.
    Host(&'a str),
    /// Every listed host was tried or is refused by its breaker: no attempt left to send.
    Exhausted,
}

/// The first host of `preference` not in `tried` for which `open` is false (`open`: whether
/// the host's breaker refuses calls now; it is asked only about untried hosts, in order).
pub fn next_host<'a>(
    preference: &'a [String],
    tried: &[String],
    mut open: impl FnMut(&str) -> bool,
) -> NextHost<'a> {
    preference
        .iter()
        .map(String::as_str)
        .filter(|h| !tried.iter().any(|t| t == h))
        .find(|h| !open(h))
        .map_or(NextHost::Exhausted, NextHost::Host)
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;
    use alloc::string::ToString;
    use alloc::vec;

    fn list(hosts: &[&str]) -> Vec<String> {
        hosts.iter().map(|h| h.to_string()).collect()
    }

    #[test]
    fn lists_round_trip_and_bad_ones_are_refused() {
        let hosts = ["127.0.0.1:1", "[::1]:2", "10.0.0.3:80"];
        let text = encode_hosts(hosts);
        assert_eq!(text, "127.0.0.1:1,[::1]:2,10.0.0.3:80");
        assert_eq!(decode_hosts(&text), Some(list(&hosts)));
        for bad in ["", "a,,b", "a b", "a,a", "a,\u{7f}"] {
            assert_eq!(decode_hosts(bad), None, "{bad:?}");
        }
        let long: Vec<String> = (0..20).map(|i| alloc::format!("10.0.0.{i}:1")).collect();
        let text = encode_hosts(long.iter().map(String::as_str));
        assert_eq!(decode_hosts(&text).map(|l| l.len()), Some(MAX_HOSTS));
        let over = long.join(",");
        assert_eq!(decode_hosts(&over), None);
        assert_eq!(decode_hosts(&"x".repeat(65)), None);
    }

    #[test]
    fn each_attempt_takes_the_next_untried_host_whose_breaker_is_not_open() {
        let pref = list(&["a", "b", "c"]);
        let mut tried = list(&["a"]);
        assert_eq!(next_host(&pref, &tried, |_| false), NextHost::Host("b"));
        tried.push("b".into());
        assert_eq!(next_host(&pref, &tried, |_| false), NextHost::Host("c"));
        // An open breaker is skipped; it is asked about untried hosts only.
        let mut asked = vec![];
        let next = next_host(&pref, &list(&["a"]), |h| {
            asked.push(h.to_string());
            h == "b"
        });
        assert_eq!(next, NextHost::Host("c"));
        assert_eq!(asked, ["b", "c"]);
        tried.push("c".into());
        assert_eq!(next_host(&pref, &tried, |_| false), NextHost::Exhausted);
        assert_eq!(
            next_host(&pref, &list(&["a"]), |h| h != "a"),
            NextHost::Exhausted
        );
        assert_eq!(next_host(&[], &[], |_| false), NextHost::Exhausted);
    }
}
