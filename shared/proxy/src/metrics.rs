//! Metrics defined once per root context.
//!
//! Envoy exposes a metric defined by a wasm module as `wasmcustom.<name>`; every worker's VM that
//! defines the same name adds to the same statistic. Keel names metrics
//! `keel.<filter>.<policy>.<what>` (see docs/operations.md for the list); a filter declares its
//! metrics through one [`Family`] per policy.
//!
//! A host that refuses to define a metric (or to move one) is reported once by
//! [`crate::host`]; the metric is then a no-op and the filter serves on.

use std::cell::Cell;

use crate::host::{self, MetricType};

/// The metrics of one filter's policy (or service, or breaker): `keel.<filter>.<name>.<what>`.
#[derive(Clone, Debug)]
pub struct Family {
    prefix: String,
}

impl Family {
    /// The family `keel.<filter>.<name>` (`filter` as in metrics: `rate_limit`, `retry`, ...).
    pub fn new(filter: &str, name: &str) -> Family {
        let mut prefix = String::with_capacity(6 + filter.len() + name.len());
        prefix.push_str("keel.");
        prefix.push_str(filter);
        if !name.is_empty() {
            prefix.push('.');
            prefix.push_str(name);
        }
        Family { prefix }
    }

    /// The full name of the family's metric `what`.
    pub fn name(&self, what: &str) -> String {
        let mut name = String::with_capacity(self.prefix.len() + 1 + what.len());
        name.push_str(&self.prefix);
        name.push('.');
        name.push_str(what);
        name
    }

    /// Defines (or finds) the counter `<family>.<what>`.
    pub fn counter(&self, what: &str) -> Counter {
        Counter::define(&self.name(what))
    }

    /// Defines (or finds) the gauge `<family>.<what>`.
    pub fn gauge(&self, what: &str) -> Gauge {
        Gauge::define(&self.name(what))
    }
}

/// A counter; a no-op if the host could not define it.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counter(Option<u32>);

impl Counter {
    /// Defines (or finds) the counter `name`.
    pub fn define(name: &str) -> Counter {
        Counter(host::define_metric(MetricType::Counter, name).ok())
    }
    /// Adds `n`.
    pub fn increment(&self, n: u64) {
        if let Some(id) = self.0 {
            if n > 0 {
                let _ = host::increment_metric(id, i64::try_from(n).unwrap_or(i64::MAX));
            }
        }
    }
}

/// A gauge; a no-op if the host could not define it.
#[derive(Clone, Copy, Debug, Default)]
pub struct Gauge(Option<u32>);

impl Gauge {
    /// Defines (or finds) the gauge `name`.
    pub fn define(name: &str) -> Gauge {
        Gauge(host::define_metric(MetricType::Gauge, name).ok())
    }
    /// Sets the value.
    pub fn set(&self, value: u64) {
        if let Some(id) = self.0 {
            let _ = host::record_metric(id, value);
        }
    }
    /// Adds `delta` (may be negative).
    pub fn add(&self, delta: i64) {
        if let Some(id) = self.0 {
            let _ = host::increment_metric(id, delta);
        }
    }
}

/// A counter tallied in the VM and added to the host's counter by [`Tally::flush`] (on the
/// root context's tick): a host call per tick instead of one per request. What is not yet
/// flushed is lost if the VM goes away.
#[derive(Debug, Default)]
pub struct Tally {
    counter: Counter,
    pending: Cell<u64>,
}

impl Tally {
    /// Tallies into `counter`.
    pub fn new(counter: Counter) -> Tally {
        Tally {
            counter,
            pending: Cell::new(0),
        }
    }
    /// Counts `n` now, to be added on the next flush.
    pub fn add(&self, n: u64) {
        self.pending.set(self.pending.get().saturating_add(n));
    }
    /// Counts `n`: tallied when `batched` (a tick will flush it), else added to the host's
    /// counter at once with what was tallied before (a host without ticks).
    pub fn count(&self, n: u64, batched: bool) {
        self.add(n);
        if !batched {
            self.flush();
        }
    }
    /// Adds what was counted since the last flush to the host's counter; whether there was any.
    pub fn flush(&self) -> bool {
        let n = self.pending.take();
        self.counter.increment(n);
        n > 0
    }
}
