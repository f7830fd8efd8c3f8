//! Keel rate limit filter.
