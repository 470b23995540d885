//! NATS JetStream: each row is published to its subject and awaited until JetStream's
//! PubAck.
//!
//! URL: `nats://HOST:PORT` (credentials in the URL as `nats://USER:PASS@HOST:PORT` or
//! `nats://TOKEN@HOST:PORT`). A row's destination is a subject that must be bound to a
//! JetStream stream: a subject without a stream ("no responders") fails its row.
//!
//! Each row carries its id in the `Nats-Msg-Id` header, so JetStream drops a republished
//! row inside the stream's duplicate window (the PubAck then says `duplicate`, which counts
//! as delivered); its headers become NATS headers and its key, if any, the header
//! `txmq-key`. Both win over a row header of the same name. A header name or value NATS
//! cannot carry (control characters, `:` in a name, a line break in a value) fails its row.
//!
//! The rows of one call are published concurrently; each waits at most
//! [`CONFIRM_TIMEOUT`] for its PubAck. A PubAck means the stream stored the message (on a
//! replicated stream, on a quorum of replicas); with file storage the NATS server writes
//! before acknowledging but syncs to disk periodically (`sync_interval`, default 2 min)
//! unless configured with `sync_interval: always`.
//!
//! The NATS client reconnects by itself; while it is disconnected, publishes fail after
//! the timeout.

use std::str::FromStr;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::header::{HeaderName, HeaderValue, NATS_MESSAGE_ID};
use async_nats::jetstream::{self, message::PublishMessage};
use bytes::Bytes;
use futures::future::join_all;

use super::{BoxFuture, Sink, SinkError};
use crate::OutboxRow;

/// How long a row waits for its PubAck before it fails.
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the first connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The NATS header that carries the row key.
const KEY_HEADER: &str = "txmq-key";

/// Publishes rows to NATS JetStream; see the [module docs](self).
pub struct NatsSink {
    /// The URL with the password hidden, for messages.
    shown: String,
    /// The JetStream context on the (self-reconnecting) client.
    js: jetstream::Context,
}

impl NatsSink {
    /// Connects to the NATS server at `url` (see the [module docs](self)).
    ///
    /// # Errors
    /// A malformed URL, or the server cannot be reached or does not answer within 10 s.
    pub async fn connect(url: &str) -> Result<Self, SinkError> {
        let shown = super::redact_url(url, true);
        let client = tokio::time::timeout(
            CONNECT_TIMEOUT,
            async_nats::ConnectOptions::new()
                .name("txmq-outbox relay")
                .connection_timeout(CONNECT_TIMEOUT)
                .connect(url),
        )
        .await
        .map_err(|_| {
            SinkError::new(format!(
                "cannot connect to NATS at {shown}: no answer within {CONNECT_TIMEOUT:?}"
            ))
        })?
        .map_err(|e| SinkError::new(format!("cannot connect to NATS at {shown}: {e}")))?;
        let js = jetstream::ContextBuilder::new()
            .timeout(CONFIRM_TIMEOUT)
            .build(client);
        Ok(Self { shown, js })
    }

    /// The NATS headers of `row`.
    fn headers(row: &OutboxRow) -> Result<HeaderMap, SinkError> {
        let invalid = |what: &str, text: &str| {
            SinkError::new(format!(
                "message {} cannot be published to NATS: invalid {what} {text:?}",
                row.id
            ))
        };
        let name = |n: &str| {
            if n.is_empty() {
                return Err(invalid("header name", n));
            }
            HeaderName::from_str(n).map_err(|_| invalid("header name", n))
        };
        let value = |what: &str, v: &str| HeaderValue::from_str(v).map_err(|_| invalid(what, v));
        let mut headers = HeaderMap::new();
        for (n, v) in &row.headers {
            headers.insert(name(n)?, value("header value", v)?);
        }
        if let Some(key) = &row.key {
            headers.insert(name(KEY_HEADER)?, value("key", key)?);
        }
        headers.insert(NATS_MESSAGE_ID, value("message id", &row.id)?);
        Ok(headers)
    }

    /// Publishes `row` and waits for its PubAck.
    async fn publish_one(&self, row: &OutboxRow) -> Result<(), SinkError> {
        let headers = Self::headers(row)?;
        let message = PublishMessage::build()
            .payload(Bytes::copy_from_slice(&row.payload))
            .headers(headers);
        let acked = async {
            self.js
                .send_publish(row.destination.clone(), message)
                .await
                .map_err(|e| format!("publish failed: {e}"))?
                .await
                .map_err(|e| format!("no PubAck: {e}"))
        };
        let ack = tokio::time::timeout(CONFIRM_TIMEOUT, acked)
            .await
            .map_err(|_| format!("no PubAck within {CONFIRM_TIMEOUT:?}"))
            .and_then(|r| r)
            .map_err(|e| {
                SinkError::new(format!(
                    "NATS JetStream at {} did not store message {} on subject {:?}: {e}",
                    self.shown, row.id, row.destination
                ))
            })?;
        // `ack.duplicate`: the stream already holds this id (an earlier attempt got
        // through), which is as delivered as a fresh store.
        tracing::trace!(
            id = %row.id,
            stream = %ack.stream,
            seq = ack.sequence,
            duplicate = ack.duplicate,
            "PubAck"
        );
        Ok(())
    }

    /// Publishes `rows` concurrently; one result per row.
    async fn publish_rows(&self, rows: &[OutboxRow]) -> Vec<Result<(), SinkError>> {
        join_all(rows.iter().map(|row| self.publish_one(row))).await
    }
}

impl Sink for NatsSink {
    fn name(&self) -> &'static str {
        "nats"
    }

    fn publish<'a>(&'a self, rows: &'a [OutboxRow]) -> BoxFuture<'a, Vec<Result<(), SinkError>>> {
        Box::pin(self.publish_rows(rows))
    }
}

impl std::fmt::Debug for NatsSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsSink")
            .field("url", &self.shown)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row() -> OutboxRow {
        OutboxRow {
            seq: 1,
            id: "id-1".into(),
            destination: "orders.paid".into(),
            key: Some("order-1".into()),
            headers: [("content-type".to_string(), "text/plain".to_string())].into(),
            payload: b"x".to_vec(),
            attempts: 0,
            created_at_ms: 0,
        }
    }

    #[test]
    fn headers_carry_id_key_and_row_headers() {
        let h = NatsSink::headers(&row()).expect("valid");
        assert_eq!(h.get("Nats-Msg-Id").map(HeaderValue::as_str), Some("id-1"));
        assert_eq!(h.get("txmq-key").map(HeaderValue::as_str), Some("order-1"));
        assert_eq!(
            h.get("content-type").map(HeaderValue::as_str),
            Some("text/plain")
        );
    }

    #[test]
    fn invalid_headers_fail_the_row_without_panicking() {
        let mut r = row();
        r.headers.insert("a:b".into(), "v".into());
        assert!(NatsSink::headers(&r).is_err());
        let mut r = row();
        r.headers.insert("a".into(), "line\nbreak".into());
        assert!(NatsSink::headers(&r).is_err());
        let mut r = row();
        r.headers.insert(String::new(), "v".into());
        assert!(NatsSink::headers(&r).is_err());
    }
}
