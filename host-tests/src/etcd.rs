//! A real etcd on loopback for discovery tests (being written).
