//! The txmq broker: topics and queues, consumer groups and delivery state, transactions and
//! check-back, retry and dead-letter, and the RocketMQ 5 gRPC service
//! (`apache.rocketmq.v2.MessagingService`) the official clients speak.
//!
//! - [`broker`]: where messages are accepted ([`Broker::send`]).
//! - [`delivery`]: where they become visible to a group, are acknowledged, retried and
//!   dead-lettered ([`Broker::receive`], [`Broker::ack`]).
//! - [`transactions`]: where a transaction is resolved ([`Broker::end_transaction`]) and
//!   checked back.
//! - [`state`]: how all of it survives restarts.
//! - [`grpc`]: the wire protocol; [`admin`]: the HTTP admin API; [`net`]: listening.

pub mod admin;
pub mod broker;
pub mod config;
pub mod delivery;
pub mod error;
pub mod grpc;
pub mod message;
pub mod metadata;
pub mod names;
pub mod net;
pub mod server;
pub mod sessions;
pub mod state;
pub mod transactions;

pub use broker::{Broker, SendReceipt};
pub use config::BrokerConfig;
pub use error::{BrokerError, BrokerResult};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
