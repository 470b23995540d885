//! Compatibility tests of txmq with the published RocketMQ 5 Rust client (`rocketmq` 5.0.0).
//!
//! The library is empty; the scenarios are in `tests/`.
