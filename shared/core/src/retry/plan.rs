//! One request's attempts: whether the next one goes, and after how long.
//!
//! An [`AttemptPlan`] is made when a request arrives (its first attempt is under way) and asked
//! for a [`RetryDecision`] after each attempt. The checks run in this order, each giving up
//! with its own [`GiveUpReason`], which the glue counts in a metric:
//!
//! 1. the outcome is not one `retry_on` retries (a 200 ends here: [`GiveUpReason::NotRetryable`]);
//! 2. the request is not eligible (method, idempotency key, body size);
//! 3. `max_attempts` attempts were made;
//! 4. the server's pushback (429 or 503 with `Retry-After` / `X-RateLimit-Reset`, when
//!    `respect_retry_after`) asks for more than `max_retry_after` or for a time at or past the
//!    deadline: the client gets that response, with the server's own header, rather than a
//!    request held for longer than the policy allows or a retry the server asked not to get;
//! 5. the backoff delay would end at or past the deadline;
//! 6. the retry budget refuses (checked last, so that a retry that would not be made costs
//!    nothing).
//!
//! The delay is the backoff's draw for this retry; with pushback of `d` it is at least `d`:
//! `max(backoff, d + uniform[0, d/2])`, Envoy's jitter on pushback (so that clients told the
//! same instant do not all come back at it), clipped to end before the deadline.
//!
//! Deadline: measured from the request's arrival; an attempt is sent only if it starts before
//! the deadline, and it is given [`AttemptPlan::attempt_timeout`]: `min(per_try_timeout, time
//! left)`. `now` is the host's clock, read as Unix time to turn a `Retry-After` date into a
//! delay (Envoy's clock is Unix time).
//!
//! Invariants: at most `max_attempts` attempts; no retry starts at or after the deadline; a
//! delay never undercuts the server's pushback; a budget token is spent only on a retry that
//! is made.

use crate::rand::Rng;
use crate::retry::after::Pushback;
use crate::retry::condition::Outcome;
use crate::retry::eligibility::Eligibility;
use crate::retry::policy::RetryPolicy;
use crate::time::{Duration, Instant};

/// Why no further attempt is made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GiveUpReason {
    /// The outcome is not one that `retry_on` retries (including every success).
    NotRetryable,
    /// The request may not be sent twice.
    NotEligible(Eligibility),
    /// `max_attempts` attempts were made.
    MaxAttempts,
    /// The next attempt could not start before the deadline.
    Deadline,
    /// The server asked to wait longer than `max_retry_after` or than the deadline allows.
    RetryAfterTooLong,
    /// The retry budget is spent (or could not be read).
    BudgetExhausted,
}

impl GiveUpReason {
    /// A metric-friendly name: `not_retryable`, `not_eligible`, `max_attempts`, `deadline`,
    /// `retry_after_too_long`, `budget_exhausted`.
    pub fn name(self) -> &'static str {
        match self {
            GiveUpReason::NotRetryable => "not_retryable",
            GiveUpReason::NotEligible(_) => "not_eligible",
            GiveUpReason::MaxAttempts => "max_attempts",
            GiveUpReason::Deadline => "deadline",
            GiveUpReason::RetryAfterTooLong => "retry_after_too_long",
            GiveUpReason::BudgetExhausted => "budget_exhausted",
        }
    }
}

/// What to do after an attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryDecision {
    /// Send the next attempt after this delay.
    RetryAfter(Duration),
    /// Hand the last outcome to the client.
    GiveUp(GiveUpReason),
}

/// The attempts of one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttemptPlan {
    deadline: Instant,
    attempts: u32,
    previous_delay: Duration,
    eligibility: Eligibility,
}

impl AttemptPlan {
    /// The plan of a request that arrived at `now`, whose first attempt is under way.
    pub fn new(policy: &RetryPolicy, eligibility: Eligibility, now: Instant) -> AttemptPlan {
        AttemptPlan {
            deadline: now.saturating_add(policy.deadline()),
            attempts: 1,
            previous_delay: Duration::ZERO,
            eligibility,
        }
    }

    /// Attempts made so far, the one under way included (the `attempt_header` value).
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// When the last attempt must have started.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Whether the request may be retried.
    pub fn eligibility(&self) -> Eligibility {
        self.eligibility
    }

    /// Records the body's full length once known (a streamed body): a body beyond `max_body`
    /// makes the request ineligible.
    pub fn body_received(&mut self, policy: &RetryPolicy, body_len: u64) {
        self.eligibility = self.eligibility.with_body(body_len, policy.max_body());
    }

    /// Records that the first attempt ended before the request's body was whole: the request
    /// cannot be replayed. An ineligible request stays as it is (its reason is kept).
    pub fn body_incomplete(&mut self) {
        if self.eligibility.is_eligible() {
            self.eligibility = Eligibility::BodyIncomplete;
        }
    }

    /// The timeout of an attempt sent at `now`: `per_try_timeout`, or less if the deadline is
    /// nearer.
    pub fn attempt_timeout(&self, policy: &RetryPolicy, now: Instant) -> Duration {
        policy
            .per_try_timeout()
            .min(self.deadline.saturating_since(now))
    }

    /// Decides, at `now`, what follows the attempt that ended with `outcome`. `withdraw` takes
    /// a retry from the budget and says whether it may go; it is called only when every other
    /// check passed. A [`RetryDecision::RetryAfter`] counts the next attempt as made.
    pub fn decide(
        &mut self,
        policy: &RetryPolicy,
        outcome: &Outcome<'_>,
        now: Instant,
        rng: &mut impl Rng,
        withdraw: impl FnOnce() -> bool,
    ) -> RetryDecision {
        use RetryDecision::GiveUp;
        let pushback = match outcome {
            Outcome::Response(response) if policy.respect_retry_after() => response.pushback(
                Duration::from_nanos(now.as_nanos()),
                policy.max_retry_after(),
            ),
            _ => None,
        };
        if !policy.retry_on().matches(outcome, pushback.is_some()) {
            return GiveUp(GiveUpReason::NotRetryable);
        }
        if !self.eligibility.is_eligible() {
            return GiveUp(GiveUpReason::NotEligible(self.eligibility));
        }
        if self.attempts >= policy.max_attempts() {
            return GiveUp(GiveUpReason::MaxAttempts);
        }
        let remaining = self.deadline.saturating_since(now);
        let backoff =
            policy
                .backoff()
                .delay(self.attempts.saturating_sub(1), self.previous_delay, rng);
        let delay = match pushback {
            Some(Pushback::TooLong) => return GiveUp(GiveUpReason::RetryAfterTooLong),
            Some(Pushback::After(asked)) => {
                if asked >= remaining {
                    return GiveUp(GiveUpReason::RetryAfterTooLong);
                }
                let spread = Duration::from_nanos(rng.below(asked.as_nanos() / 2 + 1));
                // `asked < remaining`, so the clipped delay still honours `asked`.
                backoff
                    .max(asked.saturating_add(spread))
                    .min(remaining.saturating_sub(Duration::from_nanos(1)))
            }
            None => {
                if backoff >= remaining {
                    return GiveUp(GiveUpReason::Deadline);
                }
                backoff
            }
        };
        if !withdraw() {
            return GiveUp(GiveUpReason::BudgetExhausted);
        }
        self.attempts += 1;
        self.previous_delay = backoff;
        RetryDecision::RetryAfter(delay)
    }
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;
    use crate::rand::SeededRng;
    use crate::retry::budget::RetryBudget;
    use crate::retry::condition::Response;
    use crate::retry::policy::RetryConfig;
    use crate::store::testing::MemoryStore;
    use alloc::format;
    use alloc::vec::Vec;

    const NOW_SECS: u64 = 1_700_000_000;

    fn policy(extra: &str) -> RetryPolicy {
        let json = format!(
            r#"{{"policies": [{{"name": "p", "cluster": "c", "backoff": {{"base": "25ms", "cap": "250ms", "jitter": "none"}} {extra}}}]}}"#
        );
        crate::config::load::<RetryConfig>(json.as_bytes())
            .unwrap()
            .policies()[0]
            .clone()
    }

    fn at(ms: u64) -> Instant {
        Instant::from_nanos(NOW_SECS * 1_000_000_000 + ms * 1_000_000)
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn status(s: u16) -> Outcome<'static> {
        Outcome::Response(Response::status(s))
    }

    fn retry_after(s: u16, value: &str) -> Outcome<'_> {
        Outcome::Response(Response {
            status: s,
            retry_after: Some(value),
            rate_limit_reset: None,
        })
    }

    fn get_plan(policy: &RetryPolicy) -> AttemptPlan {
        AttemptPlan::new(policy, policy.eligibility("GET", None, 0), at(0))
    }

    fn allow() -> bool {
        true
    }

    #[test]
    fn retries_until_max_attempts_with_the_backoff() {
        let p = policy("");
        let mut plan = get_plan(&p);
        let mut rng = SeededRng::new(1);
        let mut delays = Vec::new();
        loop {
            match plan.decide(&p, &status(503), at(0), &mut rng, allow) {
                RetryDecision::RetryAfter(d) => delays.push(d),
                RetryDecision::GiveUp(reason) => {
                    assert_eq!(reason, GiveUpReason::MaxAttempts);
                    break;
                }
            }
        }
        assert_eq!(delays, [ms(25), ms(50)]);
        assert_eq!(plan.attempts(), 3);
    }

    #[test]
    fn attempts_never_exceed_max_attempts() {
        let mut rng = SeededRng::new(2);
        for max in 1..=5 {
            let p = policy(&format!(r#", "max_attempts": {max}"#));
            let mut plan = get_plan(&p);
            let mut retries = 0;
            while let RetryDecision::RetryAfter(_) =
                plan.decide(&p, &Outcome::Reset, at(0), &mut rng, allow)
            {
                retries += 1;
                assert!(retries < 10);
            }
            assert_eq!(plan.attempts(), max);
            assert_eq!(retries, max - 1);
        }
    }

    #[test]
    fn successes_and_unlisted_failures_are_not_retried() {
        let p = policy("");
        let mut rng = SeededRng::new(3);
        for outcome in [status(200), status(404), status(429), status(409)] {
            let mut plan = get_plan(&p);
            assert_eq!(
                plan.decide(&p, &outcome, at(0), &mut rng, allow),
                RetryDecision::GiveUp(GiveUpReason::NotRetryable)
            );
            assert_eq!(plan.attempts(), 1);
        }
        for outcome in [
            status(500),
            Outcome::Reset,
            Outcome::ConnectFailure,
            Outcome::Timeout,
        ] {
            let mut plan = get_plan(&p);
            assert!(matches!(
                plan.decide(&p, &outcome, at(0), &mut rng, allow),
                RetryDecision::RetryAfter(_)
            ));
        }
    }

    #[test]
    fn ineligible_requests_give_up_with_the_reason() {
        let p = policy(r#", "max_body": 100"#);
        let mut rng = SeededRng::new(4);
        let post = AttemptPlan::new(&p, p.eligibility("POST", None, 0), at(0));
        assert_eq!(
            post.clone()
                .decide(&p, &status(503), at(0), &mut rng, allow),
            RetryDecision::GiveUp(GiveUpReason::NotEligible(Eligibility::NotIdempotent))
        );
        // A 200 stays "not retryable": eligibility only matters for what would be retried.
        assert_eq!(
            post.clone()
                .decide(&p, &status(200), at(0), &mut rng, allow),
            RetryDecision::GiveUp(GiveUpReason::NotRetryable)
        );
        let keyed = AttemptPlan::new(&p, p.eligibility("POST", Some("k1"), 0), at(0));
        assert!(matches!(
            keyed
                .clone()
                .decide(&p, &status(503), at(0), &mut rng, allow),
            RetryDecision::RetryAfter(_)
        ));
        let mut early = keyed;
        early.body_incomplete();
        assert_eq!(
            early.decide(&p, &status(503), at(0), &mut rng, allow),
            RetryDecision::GiveUp(GiveUpReason::NotEligible(Eligibility::BodyIncomplete))
        );
        let mut refused = post;
        refused.body_incomplete();
        assert_eq!(refused.eligibility(), Eligibility::NotIdempotent);
        let mut streamed = keyed;
        streamed.body_received(&p, 101);
        assert_eq!(
            streamed.decide(&p, &status(503), at(0), &mut rng, allow),
            RetryDecision::GiveUp(GiveUpReason::NotEligible(Eligibility::BodyTooLarge))
        );
    }

    #[test]
    fn no_retry_starts_at_or_after_the_deadline() {
        let p = policy(
            r#", "deadline": "1s", "max_attempts": 5, "backoff": {"base": "100ms", "cap": "1s", "jitter": "full"}"#,
        );
        for seed in 0..50 {
            let mut rng = SeededRng::new(seed);
            let mut plan = get_plan(&p);
            let mut now = at(0);
            loop {
                match plan.decide(&p, &Outcome::Timeout, now, &mut rng, allow) {
                    RetryDecision::RetryAfter(d) => {
                        now = now.saturating_add(d);
                        assert!(now < plan.deadline(), "seed {seed}");
                        let timeout = plan.attempt_timeout(&p, now);
                        assert!(timeout <= p.per_try_timeout());
                        assert!(now.saturating_add(timeout) <= plan.deadline());
                        // The attempt times out.
                        now = now.saturating_add(timeout);
                    }
                    RetryDecision::GiveUp(reason) => {
                        assert!(
                            matches!(reason, GiveUpReason::Deadline | GiveUpReason::MaxAttempts),
                            "seed {seed}: {reason:?}"
                        );
                        break;
                    }
                }
            }
        }
    }

    #[test]
    fn a_backoff_past_the_deadline_gives_up() {
        let p = policy(r#", "deadline": "40ms""#);
        let mut rng = SeededRng::new(5);
        let mut plan = get_plan(&p);
        assert_eq!(
            plan.decide(&p, &status(502), at(20), &mut rng, allow),
            RetryDecision::GiveUp(GiveUpReason::Deadline)
        );
        let mut plan = get_plan(&p);
        assert_eq!(
            plan.decide(&p, &status(502), at(10), &mut rng, allow),
            RetryDecision::RetryAfter(ms(25))
        );
        assert_eq!(plan.attempt_timeout(&p, at(35)), ms(5));
        assert_eq!(plan.attempt_timeout(&p, at(50)), Duration::ZERO);
    }

    #[test]
    fn retry_after_moves_the_next_delay() {
        let p = policy("");
        for seed in 0..50 {
            let mut rng = SeededRng::new(seed);
            let mut plan = get_plan(&p);
            let RetryDecision::RetryAfter(d) =
                plan.decide(&p, &retry_after(503, "2"), at(0), &mut rng, allow)
            else {
                panic!("seed {seed}: no retry")
            };
            // At least what was asked, at most Envoy's 1.5x.
            assert!(d >= ms(2000) && d <= ms(3000), "seed {seed}: {d}");
        }
        // An HTTP date is converted against `now`.
        let mut plan = get_plan(&p);
        let RetryDecision::RetryAfter(d) = plan.decide(
            &p,
            &retry_after(503, "Tue, 14 Nov 2023 22:13:21 GMT"),
            at(0),
            &mut SeededRng::new(1),
            allow,
        ) else {
            panic!("no retry")
        };
        assert!(d >= ms(1000) && d <= ms(1500), "{d}");
        // A zero pushback leaves the backoff in charge.
        let mut plan = get_plan(&p);
        assert_eq!(
            plan.decide(
                &p,
                &retry_after(503, "0"),
                at(0),
                &mut SeededRng::new(1),
                allow
            ),
            RetryDecision::RetryAfter(ms(25))
        );
    }

    #[test]
    fn retry_after_is_ignored_when_not_respected() {
        let p = policy(r#", "respect_retry_after": false"#);
        let mut plan = get_plan(&p);
        assert_eq!(
            plan.decide(
                &p,
                &retry_after(503, "5"),
                at(0),
                &mut SeededRng::new(1),
                allow
            ),
            RetryDecision::RetryAfter(ms(25))
        );
        let mut plan = get_plan(&p);
        assert_eq!(
            plan.decide(
                &p,
                &retry_after(503, "99999"),
                at(0),
                &mut SeededRng::new(1),
                allow
            ),
            RetryDecision::RetryAfter(ms(25))
        );
    }

    #[test]
    fn retry_after_beyond_the_deadline_or_the_bound_gives_up() {
        let p = policy(r#", "deadline": "5s", "max_retry_after": "60s""#);
        let mut rng = SeededRng::new(6);
        for value in ["5", "30", "61", "99999999999999999999"] {
            let mut plan = get_plan(&p);
            assert_eq!(
                plan.decide(&p, &retry_after(503, value), at(0), &mut rng, allow),
                RetryDecision::GiveUp(GiveUpReason::RetryAfterTooLong),
                "{value}"
            );
        }
        // Just inside the deadline: waits that long, clipped to end before the deadline.
        let mut plan = get_plan(&p);
        let RetryDecision::RetryAfter(d) =
            plan.decide(&p, &retry_after(503, "4"), at(500), &mut rng, allow)
        else {
            panic!("no retry")
        };
        assert!(
            d >= ms(4000) && at(500).saturating_add(d) < plan.deadline(),
            "{d}"
        );
    }

    #[test]
    fn rate_limited_retries_429_only_with_pushback() {
        let p = policy(r#", "retry_on": ["rate-limited"]"#);
        let mut rng = SeededRng::new(7);
        let mut plan = get_plan(&p);
        assert_eq!(
            plan.decide(&p, &status(429), at(0), &mut rng, allow),
            RetryDecision::GiveUp(GiveUpReason::NotRetryable)
        );
        let reset = Outcome::Response(Response {
            status: 429,
            retry_after: None,
            rate_limit_reset: Some("1700000001"),
        });
        let RetryDecision::RetryAfter(d) = plan.decide(&p, &reset, at(0), &mut rng, allow) else {
            panic!("no retry")
        };
        assert!(d >= ms(1000) && d <= ms(1500), "{d}");
        // Garbage pushback is no pushback.
        assert_eq!(
            plan.decide(&p, &retry_after(429, "later"), at(0), &mut rng, allow),
            RetryDecision::GiveUp(GiveUpReason::NotRetryable)
        );
    }

    #[test]
    fn a_spent_budget_gives_up_and_is_asked_last() {
        let p = policy("");
        let mut rng = SeededRng::new(8);
        let mut plan = get_plan(&p);
        assert_eq!(
            plan.decide(&p, &status(503), at(0), &mut rng, || false),
            RetryDecision::GiveUp(GiveUpReason::BudgetExhausted)
        );
        assert_eq!(plan.attempts(), 1);
        // Not asked when another check gives up first.
        let mut asked = false;
        plan.decide(&p, &status(200), at(0), &mut rng, || {
            asked = true;
            true
        });
        assert!(!asked);
    }

    #[test]
    fn a_shared_budget_stops_retries_across_requests() {
        // No reserve, 20 %: 10 requests buy 2 retries.
        let p = policy(r#", "budget": {"ratio": 0.2, "min_per_second": 0, "ttl": "10s"}"#);
        let store = MemoryStore::default();
        let key = p.budget_key();
        let budget: &RetryBudget = p.budget();
        let mut rng = SeededRng::new(9);
        let mut reasons = Vec::new();
        for _ in 0..10 {
            budget.deposit_shared(&store, &key, at(0)).unwrap();
        }
        for _ in 0..4 {
            let mut plan = get_plan(&p);
            let decision = plan.decide(&p, &status(503), at(0), &mut rng, || {
                budget.withdraw_shared(&store, &key, at(0)).unwrap_or(false)
            });
            reasons.push(decision);
        }
        assert!(matches!(reasons[0], RetryDecision::RetryAfter(_)));
        assert!(matches!(reasons[1], RetryDecision::RetryAfter(_)));
        assert_eq!(
            reasons[2..],
            [RetryDecision::GiveUp(GiveUpReason::BudgetExhausted); 2]
        );
    }

    #[test]
    fn decorrelated_backoff_chains_its_previous_draw() {
        let p = policy(
            r#", "max_attempts": 5, "backoff": {"base": "10ms", "cap": "10s", "jitter": "decorrelated"}"#,
        );
        let mut rng = SeededRng::new(10);
        let mut plan = get_plan(&p);
        let mut previous = ms(10);
        while let RetryDecision::RetryAfter(d) =
            plan.decide(&p, &status(500), at(0), &mut rng, allow)
        {
            assert!(d >= ms(10) && d <= previous.saturating_mul(3), "{d}");
            previous = d;
        }
    }

    #[test]
    fn reasons_have_metric_names() {
        assert_eq!(GiveUpReason::BudgetExhausted.name(), "budget_exhausted");
        assert_eq!(
            GiveUpReason::NotEligible(Eligibility::BodyTooLarge).name(),
            "not_eligible"
        );
        assert_eq!(
            GiveUpReason::RetryAfterTooLong.name(),
            "retry_after_too_long"
        );
    }
}
