//! Keel circuit-breaker filter (being written).
