//! One request under a rate-limit policy: which bucket it takes (its key, the missing-key rule,
//! its tier), how its limiter is named to the client, and the refusal it gets.
//!
//! The glue reads the key and the tier from the request ([`crate::config::Selector`]), asks
//! [`bucket_key`] what the key means, takes the bucket [`tier_fingerprint`] names in the
//! policy's [`super::KeyTable`], and turns a [`super::Decision`] into response headers
//! ([`Label::response_headers`]) or a refusal ([`refusal`]).

use alloc::borrow::Cow;
use alloc::string::String;
use alloc::vec::Vec;

use super::headers;
use super::policy::{DenyReply, MissingKey, RateLimitPolicy};
use super::table::fingerprint;
use crate::codec::push_decimal;
use crate::time::Duration;

/// The key of the one bucket every request without a key shares ([`MissingKey::Shared`]). The
/// NUL cannot come from a header value, so no client can name this bucket.
pub const MISSING_KEY: &[u8] = b"\0missing";

/// What a request's key (`None`: the request has none) means under a policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BucketKey {
    /// The request takes the bucket of this key.
    Key(Vec<u8>),
    /// The policy does not apply to the request ([`MissingKey::Allow`]).
    Skip,
    /// The request is refused without a bucket ([`MissingKey::Deny`]): [`refusal`] with no
    /// limit.
    Refuse,
}

/// The bucket of a request whose key selector gave `key`, under the policy's `missing` rule.
pub fn bucket_key(key: Option<Vec<u8>>, missing: MissingKey) -> BucketKey {
    match (key, missing) {
        (Some(key), _) => BucketKey::Key(key),
        // One shared bucket for every keyless request.
        (None, MissingKey::Shared) => BucketKey::Key(MISSING_KEY.to_vec()),
        (None, MissingKey::Allow) => BucketKey::Skip,
        (None, MissingKey::Deny) => BucketKey::Refuse,
    }
}

/// The fingerprint of `key`'s bucket under the limiter of `tier` (empty without tiers). The
/// tier is part of the key: a client that changes plan starts a fresh bucket. The NUL
/// separator cannot appear in a header value. The bytes are joined on the stack when they fit
/// (no allocation per request), else in a Vec: the same bytes either way.
pub fn tier_fingerprint(tier: &str, key: &[u8]) -> u64 {
    let len = tier.len() + 1 + key.len();
    let mut stack = [0u8; 128];
    if let Some(joined) = stack.get_mut(..len) {
        let (t, rest) = joined.split_at_mut(tier.len());
        t.copy_from_slice(tier.as_bytes());
        if let Some((nul, k)) = rest.split_first_mut() {
            *nul = 0;
            k.copy_from_slice(key);
        }
        return fingerprint(joined);
    }
    let mut joined = Vec::with_capacity(len);
    joined.extend_from_slice(tier.as_bytes());
    joined.push(0);
    joined.extend_from_slice(key);
    fingerprint(&joined)
}

/// How a policy names one of its limiters to a client; a filter computes them when the
/// configuration loads ([`Label::all`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Label {
    /// `policy` or `policy.tier`: the name in the `RateLimit` headers.
    pub name: String,
    /// The `RateLimit-Policy` value.
    pub policy: String,
    /// The start of every `RateLimit` value (`"name";r=`), computed once: a response completes
    /// it with its numbers ([`headers::rate_limit_after`]).
    prefix: String,
}

impl Label {
    /// The label of `policy`'s limiter at `index` ([`RateLimitPolicy::limiter_index`]).
    pub fn of(policy: &RateLimitPolicy, index: usize) -> Label {
        let (tier, limiter) = policy.limiter_at(index);
        let mut name = policy.name.clone();
        if !tier.is_empty() {
            name.push('.');
            name.push_str(tier);
        }
        Label {
            policy: headers::policy(&name, &limiter.rate()),
            prefix: headers::rate_limit_prefix(&name),
            name,
        }
    }

    /// The labels of every limiter of `policy`, by index.
    pub fn all(policy: &RateLimitPolicy) -> Vec<Label> {
        (0..policy.limiter_count())
            .map(|i| Label::of(policy, i))
            .collect()
    }

    /// The `RateLimit-Policy` and `RateLimit` headers of a request admitted with `remaining`
    /// requests left and `reset` until the bucket is fresh.
    pub fn response_headers(
        &self,
        remaining: u64,
        reset: Duration,
    ) -> [(&'static str, Cow<'_, str>); 2] {
        [
            ("ratelimit-policy", Cow::Borrowed(self.policy.as_str())),
            ("ratelimit", Cow::Owned(self.rate_limit(remaining, reset))),
        ]
    }

    /// The `RateLimit` value with `remaining` left and `reset` until the bucket is fresh: the
    /// text of [`headers::rate_limit`], from the precomputed prefix.
    pub fn rate_limit(&self, remaining: u64, reset: Duration) -> String {
        headers::rate_limit_after(&self.prefix, remaining, reset)
    }
}

/// A refused request's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The status (the policy's `deny.status`, 429 by default).
    pub status: u16,
    /// The headers, in order.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

/// Where a refused request stood: the limiter that refused it, how long until a request of the
/// same cost would pass, and until its bucket is fresh.
#[derive(Clone, Copy, Debug)]
pub struct Refused<'a> {
    /// The refusing limiter's label.
    pub label: &'a Label,
    /// `Decision::Deny`'s `retry_after`.
    pub retry_after: Duration,
    /// `Decision::Deny`'s `reset`.
    pub reset: Duration,
}

/// The refusal `deny` describes: for a request a limiter refused (`limit`; `None` for one
/// refused for having no key) `Retry-After` (whole seconds, rounded up) and the `RateLimit`
/// headers with nothing remaining, then the reply's own headers (its `content-type` among
/// them).
pub fn refusal(deny: &DenyReply, limit: Option<Refused<'_>>) -> Refusal {
    let mut out: Vec<(String, String)> = Vec::with_capacity(3 + deny.headers.len());
    if let Some(limit) = limit {
        let mut seconds = String::new();
        push_decimal(&mut seconds, headers::retry_after_secs(limit.retry_after));
        out.push(("retry-after".into(), seconds));
        out.push(("ratelimit-policy".into(), limit.label.policy.clone()));
        out.push(("ratelimit".into(), limit.label.rate_limit(0, limit.reset)));
    }
    out.extend(deny.headers.iter().cloned());
    Refusal {
        status: deny.status,
        headers: out,
        body: deny.body.as_bytes().to_vec(),
    }
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;

    #[test]
    fn a_tier_fingerprint_is_that_of_the_joined_bytes() {
        let long = alloc::vec![b'k'; 200];
        for (tier, key) in [
            ("", &b"bench"[..]),
            ("gold", b"bench"),
            ("", b""),
            ("t", &long[..126]),
            ("t", &long[..127]),
            ("", &long[..127]),
            ("", &long[..]),
        ] {
            let mut joined = tier.as_bytes().to_vec();
            joined.push(0);
            joined.extend_from_slice(key);
            assert_eq!(
                tier_fingerprint(tier, key),
                fingerprint(&joined),
                "{tier:?} {}",
                key.len()
            );
        }
    }
    use alloc::vec;

    fn policy(json: &str) -> RateLimitPolicy {
        let mut policies: Vec<RateLimitPolicy> = crate::config::load(json.as_bytes()).unwrap();
        policies.remove(0)
    }

    const TIERED: &str = r#"{"policies": [{"name": "api", "key": "header:x-api-key",
        "limit": {"requests": 10, "per": "1s"},
        "tiers": {"key": "header:x-plan", "limits": {"gold": {"requests": 100, "per": "1m"}}},
        "deny": {"headers": {"x-why": "limited"}, "body": "slow down\n"}}]}"#;

    #[test]
    fn a_missing_key_shares_one_bucket_passes_or_is_refused() {
        assert_eq!(
            bucket_key(Some(b"k".to_vec()), MissingKey::Deny),
            BucketKey::Key(b"k".to_vec())
        );
        assert_eq!(
            bucket_key(None, MissingKey::Shared),
            BucketKey::Key(MISSING_KEY.to_vec())
        );
        assert_eq!(bucket_key(None, MissingKey::Allow), BucketKey::Skip);
        assert_eq!(bucket_key(None, MissingKey::Deny), BucketKey::Refuse);
    }

    #[test]
    fn the_tier_is_part_of_the_bucket() {
        let free = tier_fingerprint("", b"client");
        let gold = tier_fingerprint("gold", b"client");
        assert_ne!(free, gold);
        assert_eq!(gold, tier_fingerprint("gold", b"client"));
        assert_eq!(free, fingerprint(b"\0client"));
        // No client can name the shared bucket or another tier's bucket through its key.
        assert_ne!(
            tier_fingerprint("", MISSING_KEY),
            tier_fingerprint("", b"missing")
        );
    }

    #[test]
    fn labels_name_the_policy_and_its_tier() {
        let p = policy(TIERED);
        let labels = Label::all(&p);
        assert_eq!(labels.len(), 2);
        assert_eq!(labels[0].name, "api");
        assert_eq!(labels[0].policy, "\"api\";q=10;w=1");
        assert_eq!(labels[1].name, "api.gold");
        assert_eq!(labels[1].policy, "\"api.gold\";q=100;w=60");
        assert_eq!(
            Label::of(&p, 7),
            labels[0],
            "out of range: the policy's own limiter"
        );
        assert_eq!(
            labels[1].response_headers(42, Duration::from_millis(1500)),
            [
                ("ratelimit-policy", Cow::from("\"api.gold\";q=100;w=60")),
                ("ratelimit", Cow::from("\"api.gold\";r=42;t=2")),
            ]
        );
    }

    #[test]
    fn a_refusal_says_when_to_come_back() {
        let p = policy(TIERED);
        let label = Label::of(&p, 1);
        let refused = Refused {
            label: &label,
            retry_after: Duration::from_millis(200),
            reset: Duration::from_millis(59_100),
        };
        let r = refusal(&p.deny, Some(refused));
        assert_eq!(r.status, 429);
        assert_eq!(r.body, b"slow down\n");
        let pairs: Vec<(&str, &str)> = r
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            pairs,
            vec![
                ("retry-after", "1"),
                ("ratelimit-policy", "\"api.gold\";q=100;w=60"),
                ("ratelimit", "\"api.gold\";r=0;t=60"),
                ("x-why", "limited"),
                ("content-type", "text/plain; charset=utf-8"),
            ]
        );
    }

    #[test]
    fn a_request_without_a_key_is_refused_without_limit_headers() {
        let p = policy(TIERED);
        let r = refusal(&p.deny, None);
        let names: Vec<&str> = r.headers.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, ["x-why", "content-type"]);
    }
}
