//! Benchmarks: programs that print figures (a table, and JSON on request), never timed
//! assertions.

pub mod dd;
pub mod e2e;
pub mod latency;
pub mod peers;
pub mod produce;
pub mod store;
pub mod txmq_wire;
