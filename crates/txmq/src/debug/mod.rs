//! Hidden tools that tests drive through the real binary.

pub mod store_writer;
