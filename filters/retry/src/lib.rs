//! Keel retry filter (being written).
