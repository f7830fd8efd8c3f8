//! Keel discovery filter (being written).
