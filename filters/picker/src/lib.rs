//! Keel picker filter (being written).
