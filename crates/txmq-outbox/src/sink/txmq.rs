//! The txmq sink: rows become messages of a txmq topic (or of any RocketMQ 5 endpoint),
//! sent with [`txmq_client::Producer`].
//!
//! # Guarantees
//!
//! A row is `Ok` only once the broker answered its send with OK; txmq stores a batch all or
//! nothing and fsyncs it before answering, so an `Ok` row is durable. The rows of one call
//! are grouped by destination (topic) and each group is sent with batch sends of at most
//! [`MAX_BATCH_MESSAGES`] messages and about [`MAX_BATCH_BYTES`] bytes, all batches
//! concurrently; a failed batch fails each of its rows with the error.
//!
//! A row becomes a normal message:
//!
//! | row | message |
//! |---|---|
//! | `destination` | topic (auto-created by txmq by default) |
//! | `payload` | body (txmq refuses empty bodies: such a row fails) |
//! | `key` | a message key (a blank key is left out) |
//! | `headers` | user properties |
//! | `id` | property [`MESSAGE_ID_PROPERTY`] and a message key, so it can be looked up |
//!
//! A row may be published twice (the relay retries a row whose outcome it did not learn):
//! consumers deduplicate by the [`MESSAGE_ID_PROPERTY`] property.
//!
//! Every send has a deadline ([`SEND_TIMEOUT`]); the client reconnects by itself on the next
//! call after losing its connection.

use std::collections::HashMap;
use std::time::Duration;

use futures::future::join_all;
use txmq_client::{ClientConfig, Message, Producer, SendError, proto::Code};

use super::{BoxFuture, Sink, SinkError};
use crate::OutboxRow;

/// The message property carrying the row id, for deduplication by consumers.
pub const MESSAGE_ID_PROPERTY: &str = "txmq-message-id";

/// Most messages in one batch send.
pub const MAX_BATCH_MESSAGES: usize = 512;

/// Most bytes (bodies, keys and properties) in one batch send; a single larger message is
/// sent alone.
pub const MAX_BATCH_BYTES: usize = 4 << 20;

/// The longest a batch send may take, retries included, before its rows fail.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(30);

/// Deadline of one request (and of connecting); the client retries transient failures.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(8);

/// Longest key and property name the broker takes.
const MAX_KEY_LEN: usize = 1024;

/// Publishes rows to txmq topics.
///
/// # Example
/// ```no_run
/// # async fn f() -> Result<(), txmq_outbox::SinkError> {
/// use txmq_outbox::Sink;
/// use txmq_outbox::sink::txmq::TxmqSink;
///
/// let sink = TxmqSink::connect("txmq://127.0.0.1:8081").await?;
/// assert_eq!(sink.name(), "txmq");
/// # Ok(()) }
/// ```
pub struct TxmqSink {
    producer: Producer,
    endpoint: String,
}

impl std::fmt::Debug for TxmqSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TxmqSink")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl TxmqSink {
    /// Connects a producer to `url`, `txmq://HOST:PORT`.
    ///
    /// # Errors
    /// A URL that is not `txmq://HOST:PORT`, or an endpoint that cannot be reached or does
    /// not answer the client settings in time.
    pub async fn connect(url: &str) -> Result<Self, SinkError> {
        let endpoint = parse_url(url)?;
        let config = ClientConfig::new(endpoint.clone()).with_request_timeout(REQUEST_TIMEOUT);
        // Topics are announced on first send: the destinations are not known yet.
        let connect = Producer::connect(config, Vec::<String>::new());
        let producer = match tokio::time::timeout(SEND_TIMEOUT, connect).await {
            Ok(Ok(producer)) => producer,
            Ok(Err(e)) => {
                return Err(SinkError::new(format!(
                    "txmq sink: cannot connect to {endpoint}: {e}"
                )));
            }
            Err(_) => {
                return Err(SinkError::new(format!(
                    "txmq sink: connecting to {endpoint} took more than {SEND_TIMEOUT:?}"
                )));
            }
        };
        Ok(Self { producer, endpoint })
    }

    /// The `host:port` this sink sends to.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Sends one batch (one topic) and returns the result of each of its rows.
    async fn send_chunk(
        &self,
        topic: &str,
        rows: &[OutboxRow],
        chunk: Vec<(usize, Message)>,
    ) -> Vec<(usize, Result<(), SinkError>)> {
        let (indices, messages): (Vec<usize>, Vec<Message>) = chunk.into_iter().unzip();
        let n = messages.len();
        let outcome = self.send_bounded(messages).await;
        let error = match outcome {
            Ok(()) => return indices.into_iter().map(|i| (i, Ok(()))).collect(),
            Err(e) => e,
        };
        // Nothing was stored for a definite refusal: when it may be about one message (a body
        // too large, a bad key), send the messages one by one so that only the bad ones fail.
        if n > 1
            && let Some(e) = &error.refusal
            && message_specific(e)
        {
            // The messages were consumed by the send: made again from their rows.
            let singles = indices.iter().map(|&i| async move {
                let message = to_message(&rows[i]).map_err(|reason| ChunkError {
                    message: reason,
                    refusal: None,
                })?;
                self.send_bounded(vec![message]).await
            });
            return indices
                .iter()
                .copied()
                .zip(join_all(singles).await)
                .map(|(i, r)| (i, r.map_err(|e| self.error(topic, 1, &e.message))))
                .collect();
        }
        let error = self.error(topic, n, &error.message);
        indices
            .into_iter()
            .map(|i| (i, Err(error.clone())))
            .collect()
    }

    /// One batch send with a deadline.
    async fn send_bounded(&self, messages: Vec<Message>) -> Result<(), ChunkError> {
        match tokio::time::timeout(SEND_TIMEOUT, self.producer.send_batch(messages)).await {
            Ok(Ok(_receipts)) => Ok(()),
            Ok(Err(e)) => Err(ChunkError {
                message: e.to_string(),
                refusal: e.is_definite().then_some(e),
            }),
            Err(_) => Err(ChunkError {
                message: format!("no answer within {SEND_TIMEOUT:?} (the outcome is unknown)"),
                refusal: None,
            }),
        }
    }

    fn error(&self, topic: &str, n: usize, reason: &str) -> SinkError {
        SinkError::new(format!(
            "txmq sink: sending {n} message(s) to topic {topic:?} at {} failed: {reason}",
            self.endpoint
        ))
    }
}

/// Why a batch failed; `refusal` is set when nothing was stored.
struct ChunkError {
    message: String,
    refusal: Option<SendError>,
}

/// True when a definite refusal may be about single messages rather than the topic.
fn message_specific(e: &SendError) -> bool {
    match e {
        SendError::InvalidMessage { .. } => true,
        SendError::TopicNotFound { .. } | SendError::MessageTypeMismatch { .. } => false,
        _ => !matches!(
            e.code(),
            Some(
                Code::IllegalTopic
                    | Code::TopicNotFound
                    | Code::Forbidden
                    | Code::Unauthorized
                    | Code::MessagePropertyConflictWithType
            )
        ),
    }
}

impl Sink for TxmqSink {
    fn name(&self) -> &'static str {
        "txmq"
    }

    fn publish<'a>(&'a self, rows: &'a [OutboxRow]) -> BoxFuture<'a, Vec<Result<(), SinkError>>> {
        Box::pin(async move {
            let mut results: Vec<Result<(), SinkError>> = vec![Ok(()); rows.len()];
            // Destination -> chunks of (row index, message), in row order.
            let mut topics: Vec<(&str, Vec<Chunk>)> = Vec::new();
            let mut by_topic: HashMap<&str, usize> = HashMap::new();
            for (i, row) in rows.iter().enumerate() {
                let message = match to_message(row) {
                    Ok(m) => m,
                    Err(reason) => {
                        results[i] = Err(SinkError::new(format!(
                            "txmq sink: row {} cannot be sent to topic {:?}: {reason}",
                            row.id, row.destination
                        )));
                        continue;
                    }
                };
                let size = message_size(&message);
                let slot = *by_topic.entry(row.destination.as_str()).or_insert_with(|| {
                    topics.push((row.destination.as_str(), Vec::new()));
                    topics.len() - 1
                });
                let chunks = &mut topics[slot].1;
                match chunks.last_mut() {
                    Some(c)
                        if c.messages.len() < MAX_BATCH_MESSAGES
                            && c.bytes + size <= MAX_BATCH_BYTES =>
                    {
                        c.bytes += size;
                        c.messages.push((i, message));
                    }
                    _ => chunks.push(Chunk {
                        bytes: size,
                        messages: vec![(i, message)],
                    }),
                }
            }
            let sends = topics.into_iter().flat_map(|(topic, chunks)| {
                chunks
                    .into_iter()
                    .map(move |c| self.send_chunk(topic, rows, c.messages))
            });
            for (i, r) in join_all(sends).await.into_iter().flatten() {
                results[i] = r;
            }
            results
        })
    }
}

/// Messages of one batch send.
struct Chunk {
    bytes: usize,
    messages: Vec<(usize, Message)>,
}

/// The message of a row, or why the broker would refuse it.
fn to_message(row: &OutboxRow) -> Result<Message, String> {
    if row.payload.is_empty() {
        return Err("the payload is empty (txmq refuses empty message bodies)".into());
    }
    let mut keys = Vec::with_capacity(2);
    if !row.id.trim().is_empty() {
        keys.push(row.id.clone());
    }
    if let Some(key) = row.key.as_deref()
        && !key.trim().is_empty()
    {
        if key.len() > MAX_KEY_LEN {
            return Err(format!(
                "the key is {} bytes long (at most {MAX_KEY_LEN})",
                key.len()
            ));
        }
        keys.push(key.to_string());
    }
    let mut message = Message::new(row.destination.clone(), row.payload.clone()).with_keys(keys);
    for (name, value) in &row.headers {
        if name.is_empty() || name.len() > MAX_KEY_LEN {
            return Err(format!(
                "header name {name:?} is empty or longer than {MAX_KEY_LEN} bytes"
            ));
        }
        if name != MESSAGE_ID_PROPERTY {
            message = message.with_property(name.clone(), value.clone());
        }
    }
    Ok(message.with_property(MESSAGE_ID_PROPERTY, row.id.clone()))
}

/// About how many bytes a message takes on the wire.
fn message_size(m: &Message) -> usize {
    let keys: usize = m.keys().iter().map(|k| k.len() + 4).sum();
    let properties: usize = m
        .properties()
        .iter()
        .map(|(k, v)| k.len() + v.len() + 8)
        .sum();
    m.body().len() + keys + properties + m.topic().len() + 128
}

/// `HOST:PORT` of `txmq://HOST:PORT[/]`.
fn parse_url(url: &str) -> Result<String, SinkError> {
    let bad = |reason: &str| {
        SinkError::new(format!(
            "txmq sink: bad URL {url:?}: {reason} (expected txmq://HOST:PORT)"
        ))
    };
    let rest = url
        .strip_prefix("txmq://")
        .ok_or_else(|| bad("the scheme is not txmq"))?;
    let endpoint = rest.strip_suffix('/').unwrap_or(rest);
    if endpoint.is_empty() {
        return Err(bad("no host"));
    }
    if endpoint.contains(['/', '?', '#', '@']) {
        return Err(bad("a path, query, fragment or user is not supported"));
    }
    let port = endpoint
        .rsplit_once(':')
        .map(|(_, port)| port)
        .ok_or_else(|| bad("no port"))?;
    if port.parse::<u16>().is_err() {
        return Err(bad("the port is not a number"));
    }
    Ok(endpoint.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, payload: &[u8]) -> OutboxRow {
        OutboxRow {
            seq: 1,
            id: id.into(),
            destination: "orders".into(),
            key: None,
            headers: Default::default(),
            payload: payload.to_vec(),
            attempts: 0,
            created_at_ms: 0,
        }
    }

    #[test]
    fn urls_need_host_and_port() {
        assert_eq!(
            parse_url("txmq://127.0.0.1:8081").unwrap(),
            "127.0.0.1:8081"
        );
        assert_eq!(parse_url("txmq://[::1]:8081/").unwrap(), "[::1]:8081");
        for bad in [
            "txmq://",
            "txmq://host",
            "txmq://host:x",
            "nats://h:1",
            "txmq://h:1/p",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn rows_become_messages_with_their_id() {
        let mut r = row("id-1", b"x");
        r.key = Some("order-42".into());
        r.headers.insert("content-type".into(), "text/plain".into());
        r.headers
            .insert(MESSAGE_ID_PROPERTY.into(), "forged".into());
        let m = to_message(&r).unwrap();
        assert_eq!(m.keys(), ["id-1", "order-42"]);
        assert_eq!(m.properties()[MESSAGE_ID_PROPERTY], "id-1");
        assert_eq!(m.properties()["content-type"], "text/plain");
        assert!(to_message(&row("id-2", b"")).is_err());
        let mut blank = row("id-3", b"x");
        blank.key = Some(" ".into());
        assert_eq!(to_message(&blank).unwrap().keys(), ["id-3"]);
    }
}
