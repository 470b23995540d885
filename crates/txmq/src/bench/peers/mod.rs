//! The brokers txmq is compared with in `txmq bench produce`, each driven with the same
//! workload as txmq: durable publishes, each awaited until the broker acknowledges it.
//!
//! Each driver creates a uniquely named queue or stream for the run and deletes it at the
//! end, whether the run succeeded or not.

pub mod nats;
pub mod rabbitmq;

use std::time::Duration;

/// How long to wait for a connection to a peer broker.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long setting up or deleting a queue or stream may take.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);

/// `error` and those of its sources its message does not already include, as one error
/// (client errors often repeat their source's message).
fn flat(error: impl std::error::Error) -> anyhow::Error {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let s = e.to_string();
        if !text.contains(&s) {
            text = format!("{text}: {s}");
        }
        source = e.source();
    }
    anyhow::Error::msg(text)
}

/// A unique name for the run's queue or stream.
fn unique_name() -> String {
    format!("txmq-bench-{}", uuid::Uuid::now_v7().simple())
}
