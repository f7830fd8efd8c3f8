//! A filter as a stage: what a filter asks of whatever runs it, beyond the host calls every
//! filter makes for itself.
//!
//! A Keel filter runs either as an Envoy filter of its own (its module, or `keel.wasm` by
//! root_id) or as one stage of Keel's pipeline (one Envoy filter that runs several Keel
//! filters per request, see [`crate::pipeline`]). The filter's code is the same in both; the
//! [`Stage`] it is given at creation answers the few things that differ:
//!
//! - its configuration: the plugin configuration, or the stage's part of the pipeline's;
//! - its tick: the root context's tick, or a share of it (one root context has one tick
//!   period, so the pipeline multiplexes its stages' periods);
//! - resuming a stream it paused: straight to the host, or into the pipeline, which runs the
//!   stages after it first.
//!
//! Everything else (headers, properties, shared data, callouts, local replies, metrics) the
//! filter does through the host as usual: a stage runs inside the pipeline's stream callbacks,
//! with the stream as the effective context.

use std::rc::Rc;

use crate::host::{self, Buffer, StreamType};
use keel_core::config::ConfigError;

/// What runs a filter: the host itself ([`Stage::alone`]) or a pipeline.
pub trait Driver {
    /// The filter's configuration, JSON.
    fn configuration(&self) -> Vec<u8>;
    /// Logs the one line of a refused configuration (`error`'s path is inside the filter's
    /// configuration).
    fn refuse(&self, filter: &str, error: &ConfigError);
    /// Sets the filter's tick period (zero stops it); `false` when the host has no ticks.
    fn set_tick_period(&self, period: std::time::Duration) -> bool;
    /// Lets the request of stream `context_id`, paused by this filter, go on. The stream is
    /// the effective context ([`Stage::resume_request`] switched to it).
    fn resume_request(&self, context_id: u32) -> bool;
    /// Lets the response of stream `context_id`, paused by this filter, go on. The stream is
    /// the effective context.
    fn resume_response(&self, context_id: u32) -> bool;
}

/// The filter is the plugin: everything goes straight to the host.
struct Alone;

impl Driver for Alone {
    fn configuration(&self) -> Vec<u8> {
        host::get_buffer(Buffer::PluginConfiguration, 0, usize::MAX).unwrap_or_default()
    }

    fn refuse(&self, filter: &str, error: &ConfigError) {
        crate::log::error(filter, &format!("{error}; configuration refused"));
    }

    fn set_tick_period(&self, period: std::time::Duration) -> bool {
        host::set_tick_period(period).is_ok()
    }

    fn resume_request(&self, _context_id: u32) -> bool {
        host::continue_stream(StreamType::HttpRequest).is_ok()
    }

    fn resume_response(&self, _context_id: u32) -> bool {
        host::continue_stream(StreamType::HttpResponse).is_ok()
    }
}

/// A filter's handle on what runs it; cheap to clone.
#[derive(Clone)]
pub struct Stage(Rc<dyn Driver>);

impl Stage {
    /// The filter is an Envoy filter of its own.
    pub fn alone() -> Stage {
        Stage(Rc::new(Alone))
    }

    /// The filter is run by `driver` (a pipeline's stage).
    pub fn driven_by(driver: Rc<dyn Driver>) -> Stage {
        Stage(driver)
    }

    /// Reads the filter's configuration and validates it with `validate`. On error logs the
    /// one line that names the field and returns `None`: `on_configure` then returns `false`.
    pub fn load<T>(
        &self,
        filter: &str,
        validate: impl FnOnce(&[u8]) -> Result<T, ConfigError>,
    ) -> Option<T> {
        match validate(&self.0.configuration()) {
            Ok(config) => Some(config),
            Err(e) => {
                self.0.refuse(filter, &e);
                None
            }
        }
    }

    /// Sets the filter's tick period (zero stops it); `false` when the host has no ticks.
    pub fn set_tick_period(&self, period: std::time::Duration) -> bool {
        self.0.set_tick_period(period)
    }

    /// Lets the request of stream `context_id`, which this filter paused, go on (through the
    /// pipeline's later stages first, in a pipeline). Makes the stream the effective context
    /// first; `false` when the stream is gone.
    pub fn resume_request(&self, context_id: u32) -> bool {
        crate::stream::switch_to(context_id) && self.0.resume_request(context_id)
    }

    /// Lets the response of stream `context_id`, which this filter paused, go on. Makes the
    /// stream the effective context first; `false` when the stream is gone.
    pub fn resume_response(&self, context_id: u32) -> bool {
        crate::stream::switch_to(context_id) && self.0.resume_response(context_id)
    }
}

impl Default for Stage {
    fn default() -> Stage {
        Stage::alone()
    }
}
