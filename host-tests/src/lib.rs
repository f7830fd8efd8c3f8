//! Keel host tests.
