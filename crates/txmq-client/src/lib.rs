//! An async (tokio) client of the Apache RocketMQ 5 gRPC protocol (`apache.rocketmq.v2`),
//! for txmq and for any RocketMQ 5 endpoint (proxy).
//!
//! - [`Producer`]: send, batch send, FIFO message groups, delay, keys, tags, properties.
//! - [`TransactionalProducer`]: half messages, commit and rollback, and a
//!   [`TransactionChecker`] answering the server's check-backs.
//! - [`SimpleConsumer`]: receive, acknowledge, change invisible duration.
//! - [`PushConsumer`]: a handler called with bounded concurrency; ack on `Ok`, redelivery
//!   with the server's backoff on `Err`; FIFO message groups in order.
//!
//! Every client keeps a Telemetry stream open (its settings first, the server's settings
//! reply awaited within the request timeout; reopened with backoff when it breaks), sends a
//! heartbeat every 10 s, caches routes and refreshes them every 30 s, and reconnects its
//! HTTP/2 connection on the next call after losing it. Every call has a deadline. TLS
//! (trusting any certificate, or a given CA) and access-key signing are in [`ClientConfig`].
//!
//! # Example
//! ```no_run
//! # async fn f() -> Result<(), txmq_client::Error> {
//! use std::time::Duration;
//! use txmq_client::{ClientConfig, Message, Producer, SimpleConsumer, Subscription};
//!
//! let config = ClientConfig::new("127.0.0.1:8081");
//! let producer = Producer::connect(config.clone(), ["orders"]).await?;
//! producer.send(Message::new("orders", "order 42 paid").with_tag("paid")).await?;
//!
//! let consumer = SimpleConsumer::connect(config, "shipping", [Subscription::all("orders")]).await?;
//! for m in consumer.receive(16, Duration::from_secs(30)).await? {
//!     consumer.ack(&m).await?;
//! }
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

mod config;
mod consumer;
#[cfg(feature = "db")]
pub mod db;
mod error;
mod join;
mod message;
mod producer;
mod retry;
mod session;
mod transaction;

pub use config::{Batching, ClientConfig, Credentials, Tls};
pub use consumer::{Filter, PushConsumer, PushConsumerBuilder, SimpleConsumer, Subscription};
pub use error::{
    AckError, CallError, ConnectError, EndTransactionError, Error, ReceiveError, SendError,
    code_name,
};
pub use message::{MAX_INFLATED_BODY, Message, MessageView, SendReceipt};
pub use producer::Producer;
pub use retry::{Backoff, RetryPolicy};
pub use transaction::{
    Transaction, TransactionChecker, TransactionResolution, TransactionalProducer,
};

/// The protocol's generated types (`apache.rocketmq.v2`), e.g. [`proto::Code`] to match
/// [`CallError::code`].
pub use txmq_proto::v2 as proto;
