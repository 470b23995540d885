//! Benchmarks: programs that print figures (a table, and JSON on request), never timed
//! assertions.

pub mod dd;
pub mod store;
