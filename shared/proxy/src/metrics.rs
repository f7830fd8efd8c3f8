//! Metrics defined once per root context.
//!
//! Envoy exposes a metric defined by a wasm module as `wasmcustom.<name>`; every worker's VM that
//! defines the same name adds to the same statistic. Keel names metrics
//! `keel.<filter>.<policy>.<what>` (see docs/operations.md for the list).

use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;

/// A counter; a no-op if the host could not define it.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counter(Option<u32>);

impl Counter {
    /// Defines (or finds) the counter `name`.
    pub fn define(name: &str) -> Counter {
        Counter(hostcalls::define_metric(MetricType::Counter, name).ok())
    }
    /// Adds `n`.
    pub fn increment(&self, n: u64) {
        if let Some(id) = self.0 {
            let _ = hostcalls::increment_metric(id, i64::try_from(n).unwrap_or(i64::MAX));
        }
    }
}

/// A gauge; a no-op if the host could not define it.
#[derive(Clone, Copy, Debug, Default)]
pub struct Gauge(Option<u32>);

impl Gauge {
    /// Defines (or finds) the gauge `name`.
    pub fn define(name: &str) -> Gauge {
        Gauge(hostcalls::define_metric(MetricType::Gauge, name).ok())
    }
    /// Sets the value.
    pub fn set(&self, value: u64) {
        if let Some(id) = self.0 {
            let _ = hostcalls::record_metric(id, value);
        }
    }
    /// Adds `delta` (may be negative).
    pub fn add(&self, delta: i64) {
        if let Some(id) = self.0 {
            let _ = hostcalls::increment_metric(id, delta);
        }
    }
}

/// A histogram; a no-op if the host could not define it.
#[derive(Clone, Copy, Debug, Default)]
pub struct Histogram(Option<u32>);

impl Histogram {
    /// Defines (or finds) the histogram `name`.
    pub fn define(name: &str) -> Histogram {
        Histogram(hostcalls::define_metric(MetricType::Histogram, name).ok())
    }
    /// Records one value.
    pub fn record(&self, value: u64) {
        if let Some(id) = self.0 {
            let _ = hostcalls::record_metric(id, value);
        }
    }
}
