//! What goes into the outbox, and what the relay hands to a sink.

use std::collections::BTreeMap;
use std::time::SystemTime;

/// A message to enqueue with [`Outbox::enqueue`](crate::Outbox::enqueue).
///
/// # Example
/// ```
/// use txmq_outbox::OutboxMessage;
///
/// let m = OutboxMessage::new("orders.paid", b"{\"order\":42}".to_vec())
///     .with_key("order-42")
///     .ordered()
///     .with_header("content-type", "application/json");
/// assert_eq!(m.key(), Some("order-42"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxMessage {
    pub(crate) id: String,
    pub(crate) destination: String,
    pub(crate) key: Option<String>,
    pub(crate) ordered: bool,
    pub(crate) headers: BTreeMap<String, String>,
    pub(crate) payload: Vec<u8>,
    pub(crate) not_before: Option<SystemTime>,
}

impl OutboxMessage {
    /// A message for `destination` (a txmq topic, a RabbitMQ routing key, a NATS subject, a
    /// Redis stream or a Kafka topic, depending on the sink) with a fresh UUIDv7 id.
    pub fn new(destination: impl Into<String>, payload: impl Into<Vec<u8>>) -> Self {
        Self {
            id: uuid::Uuid::now_v7().to_string(),
            destination: destination.into(),
            key: None,
            ordered: false,
            headers: BTreeMap::new(),
            payload: payload.into(),
            not_before: None,
        }
    }

    /// Uses the caller's message id instead of a fresh UUIDv7 (at most 128 bytes). The id
    /// is unique in the outbox: enqueuing it twice fails with a duplicate key.
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.id = id.into();
        self
    }

    /// Sets the key (an aggregate id: a Kafka message key, a RabbitMQ/txmq message key).
    pub fn with_key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Delivers this message only after every earlier message of its key was delivered
    /// (earlier by enqueue order); needs a key. A dead earlier message holds the key's later
    /// ones until it is redriven or dropped.
    pub fn ordered(mut self) -> Self {
        self.ordered = true;
        self
    }

    /// Adds a header (carried as a message property, an AMQP header, a NATS header, a Redis
    /// field or a Kafka header).
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// Publishes no earlier than `time`.
    pub fn not_before(mut self, time: SystemTime) -> Self {
        self.not_before = Some(time);
        self
    }

    /// The message id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The destination.
    pub fn destination(&self) -> &str {
        &self.destination
    }

    /// The key.
    pub fn key(&self) -> Option<&str> {
        self.key.as_deref()
    }

    /// The payload.
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }
}

/// An outbox row as the relay hands it to a [`Sink`](crate::Sink).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRow {
    /// Position in the outbox (enqueue order).
    pub seq: i64,
    /// The message id; sinks carry it for deduplication.
    pub id: String,
    /// Where to publish.
    pub destination: String,
    /// The key, if any.
    pub key: Option<String>,
    /// Headers.
    pub headers: BTreeMap<String, String>,
    /// The payload.
    pub payload: Vec<u8>,
    /// Failed publish attempts so far.
    pub attempts: u32,
    /// When the row was enqueued, ms since the Unix epoch.
    pub created_at_ms: i64,
}
