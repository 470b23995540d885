//! RabbitMQ (AMQP 0-9-1): persistent messages on a channel in publisher-confirm mode.
//!
//! URL: `amqp://USER:PASS@HOST:PORT/VHOST[?exchange=NAME]` (or `amqps://`). The `exchange`
//! query parameter names the exchange to publish to; without it the default exchange `""`
//! is used, where a row's destination (the routing key) is a queue name. Other query
//! parameters (`heartbeat`, `frame_max`, ...) are passed on to the AMQP client.
//!
//! Each row is published with `mandatory` set, delivery mode 2 (persistent), the row id as
//! the `message_id` property, the row headers as AMQP headers (long-string values) and the
//! row key, if any, as the header `txmq-key` (it wins over a row header of that name). The
//! rows of one call are pipelined on one channel and the call waits for every publisher
//! confirmation, at most [`CONFIRM_TIMEOUT`] each. A row is `Ok` only when RabbitMQ acked
//! it and did not return it:
//!
//! - a returned message (no queue bound for the routing key) is an error for its row,
//!   matched to the row by `message_id`;
//! - a nack, a closed channel (e.g. the exchange does not exist) or a lost connection is an
//!   error for the rows that were not confirmed yet;
//! - a confirmation that does not arrive in time fails its row and, conservatively, every
//!   other row of the call (a lost confirmation may have carried the return of another
//!   row); consumers deduplicate by `message_id`.
//!
//! A publisher confirm means the message was taken responsibility for by every queue it was
//! routed to: on disk for a durable queue (classic or quorum), only in memory for a
//! transient one. Declare the destination queues durable.
//!
//! Calls are serialized on one channel. After a failure the channel (and, when it is down,
//! the connection) is dropped and reopened on the next call.

use std::collections::HashMap;
use std::time::Duration;

use futures::future::join_all;
use lapin::message::BasicReturnMessage;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use tokio::sync::Mutex;

use super::{BoxFuture, Sink, SinkError};
use crate::OutboxRow;

/// How long a row waits for its publisher confirmation before it fails.
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

/// How long connecting (TCP, AMQP handshake, channel, `confirm.select`) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// AMQP delivery mode of a persistent message.
const PERSISTENT: u8 = 2;

/// The AMQP header that carries the row key.
const KEY_HEADER: &str = "txmq-key";

/// Publishes rows to RabbitMQ; see the [module docs](self).
pub struct RabbitMqSink {
    /// The URL given to lapin (without the `exchange` parameter).
    url: String,
    /// The URL with the password hidden, for messages.
    shown: String,
    /// The exchange to publish to; `""` is the default exchange.
    exchange: String,
    /// The open connection and confirm-mode channel, if any; held for a whole call.
    link: Mutex<Option<Link>>,
}

/// A connection and its confirm-mode channel.
struct Link {
    connection: Connection,
    channel: Channel,
}

/// What happened to one row of a call.
enum Outcome {
    /// Not sent: the row cannot be expressed in AMQP. The channel is unaffected.
    Invalid(SinkError),
    /// Sent and answered by RabbitMQ (boxed: it may carry a returned message).
    Confirmed(Box<Confirmation>),
    /// Sent, but the channel or connection failed before the confirmation.
    Broken(SinkError),
    /// Sent, but no confirmation arrived within [`CONFIRM_TIMEOUT`].
    TimedOut(SinkError),
}

impl RabbitMqSink {
    /// Connects to the RabbitMQ at `url` (see the [module docs](self)) and opens a channel
    /// in publisher-confirm mode.
    ///
    /// # Errors
    /// A malformed URL, or RabbitMQ cannot be reached, refuses the login or does not answer
    /// within 10 s.
    pub async fn connect(url: &str) -> Result<Self, SinkError> {
        let (lapin_url, exchange) = split_exchange(url)?;
        if let Err(e) = ShortString::try_new(exchange.as_str()) {
            return Err(SinkError::new(format!(
                "invalid RabbitMQ exchange name in {}: {e}",
                super::redact_url(url, false)
            )));
        }
        let sink = Self {
            shown: super::redact_url(&lapin_url, false),
            url: lapin_url,
            exchange,
            link: Mutex::new(None),
        };
        let link = sink.open().await?;
        *sink.link.lock().await = Some(link);
        Ok(sink)
    }

    /// Opens a connection and a confirm-mode channel.
    async fn open(&self) -> Result<Link, SinkError> {
        let connection = tokio::time::timeout(
            CONNECT_TIMEOUT,
            Connection::connect(
                &self.url,
                ConnectionProperties::default()
                    .with_connection_name(LongString::from("txmq-outbox relay")),
            ),
        )
        .await
        .map_err(|_| {
            SinkError::new(format!(
                "cannot connect to RabbitMQ at {}: no answer within {CONNECT_TIMEOUT:?}",
                self.shown
            ))
        })?
        .map_err(|e| {
            SinkError::new(format!("cannot connect to RabbitMQ at {}: {e}", self.shown))
        })?;
        let channel = self.open_channel(&connection).await?;
        Ok(Link {
            connection,
            channel,
        })
    }

    /// Opens a channel on `connection` and puts it in publisher-confirm mode.
    async fn open_channel(&self, connection: &Connection) -> Result<Channel, SinkError> {
        tokio::time::timeout(CONNECT_TIMEOUT, async {
            let channel = connection
                .create_channel()
                .await
                .map_err(|e| format!("cannot open a channel: {e}"))?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .map_err(|e| format!("cannot enable publisher confirms: {e}"))?;
            Ok::<_, String>(channel)
        })
        .await
        .map_err(|_| format!("no answer within {CONNECT_TIMEOUT:?}"))
        .and_then(|r| r)
        .map_err(|e| SinkError::new(format!("RabbitMQ at {}: {e}", self.shown)))
    }

    /// The channel to publish on, reopening what is down.
    async fn channel(&self, link: &mut Option<Link>) -> Result<Channel, SinkError> {
        if let Some(l) = link.as_mut() {
            if l.channel.status().connected() {
                return Ok(l.channel.clone());
            }
            if l.connection.status().connected() {
                match self.open_channel(&l.connection).await {
                    Ok(channel) => {
                        l.channel = channel.clone();
                        return Ok(channel);
                    }
                    Err(e) => {
                        *link = None;
                        return Err(e);
                    }
                }
            }
            *link = None;
        }
        let fresh = self.open().await?;
        let channel = fresh.channel.clone();
        *link = Some(fresh);
        Ok(channel)
    }

    /// The routing key and properties of `row`.
    fn prepare(&self, row: &OutboxRow) -> Result<(ShortString, BasicProperties), SinkError> {
        let short = |what: &str, value: &str| {
            ShortString::try_new(value).map_err(|e| {
                SinkError::new(format!(
                    "message {} cannot be published to RabbitMQ: {what} {value:?} is too long \
                     ({e})",
                    row.id
                ))
            })
        };
        let routing_key = short("routing key", &row.destination)?;
        let message_id = short("message id", &row.id)?;
        let mut headers = FieldTable::default();
        for (name, value) in &row.headers {
            headers.insert(
                short("header name", name)?,
                AMQPValue::LongString(LongString::from(value.as_str())),
            );
        }
        if let Some(key) = &row.key {
            headers.insert(
                ShortString::from(KEY_HEADER),
                AMQPValue::LongString(LongString::from(key.as_str())),
            );
        }
        let properties = BasicProperties::default()
            .with_delivery_mode(PERSISTENT)
            .with_message_id(message_id)
            .with_headers(headers);
        Ok((routing_key, properties))
    }

    /// Publishes `row` on `channel` and waits for its confirmation.
    async fn publish_one(&self, channel: &Channel, row: &OutboxRow) -> Outcome {
        let (routing_key, properties) = match self.prepare(row) {
            Ok(p) => p,
            Err(e) => return Outcome::Invalid(e),
        };
        let exchange = ShortString::from(self.exchange.as_str());
        let sent = async {
            let confirm = channel
                .basic_publish(
                    exchange,
                    routing_key,
                    BasicPublishOptions {
                        mandatory: true,
                        immediate: false,
                    },
                    &row.payload,
                    properties,
                )
                .await
                .map_err(|e| format!("basic.publish failed: {e}"))?;
            confirm
                .await
                .map_err(|e| format!("no publisher confirmation: {e}"))
        };
        match tokio::time::timeout(CONFIRM_TIMEOUT, sent).await {
            Ok(Ok(confirmation)) => Outcome::Confirmed(Box::new(confirmation)),
            Ok(Err(e)) => Outcome::Broken(SinkError::new(format!(
                "RabbitMQ at {} did not confirm message {} ({}): {e}",
                self.shown,
                row.id,
                self.route(row)
            ))),
            Err(_) => Outcome::TimedOut(SinkError::new(format!(
                "RabbitMQ at {} did not confirm message {} ({}) within {CONFIRM_TIMEOUT:?}",
                self.shown,
                row.id,
                self.route(row)
            ))),
        }
    }

    /// `exchange "e", routing key "k"` of `row`, for messages.
    fn route(&self, row: &OutboxRow) -> String {
        format!(
            "exchange {:?}, routing key {:?}",
            self.exchange, row.destination
        )
    }

    /// Publishes `rows` concurrently on one channel; one result per row.
    async fn publish_rows(&self, rows: &[OutboxRow]) -> Vec<Result<(), SinkError>> {
        if rows.is_empty() {
            return Vec::new();
        }
        let mut link = self.link.lock().await;
        let channel = match self.channel(&mut link).await {
            Ok(channel) => channel,
            Err(e) => return rows.iter().map(|_| Err(e.clone())).collect(),
        };
        let outcomes = join_all(rows.iter().map(|row| self.publish_one(&channel, row))).await;

        // lapin hands a returned message to whichever confirmation it processes next, not
        // to the confirmation of that message: match returns to rows by message id.
        let mut returned: HashMap<String, BasicReturnMessage> = HashMap::new();
        let mut unmatched: Option<String> = None;
        let mut outcomes: Vec<Outcome> = outcomes;
        for outcome in &mut outcomes {
            let Outcome::Confirmed(confirmation) = outcome else {
                continue;
            };
            let message = match &mut **confirmation {
                Confirmation::Ack(m) | Confirmation::Nack(m) => m.take(),
                Confirmation::NotRequested => None,
            };
            let Some(message) = message else { continue };
            match message.delivery.properties.message_id() {
                Some(id) if rows.iter().any(|r| r.id == id.as_str()) => {
                    returned.insert(id.as_str().to_string(), message);
                }
                id => {
                    unmatched = Some(format!(
                        "RabbitMQ returned a message with an unknown message id {:?} ({}, \
                         routing key {:?}); no row of this call is reported as delivered",
                        id.as_ref().map(ShortString::as_str),
                        message.reply_text,
                        message.delivery.routing_key.as_str()
                    ));
                }
            }
        }
        let timed_out = outcomes
            .iter()
            .position(|o| matches!(o, Outcome::TimedOut(_)))
            .map(|i| rows[i].id.clone());
        let broken = outcomes
            .iter()
            .any(|o| matches!(o, Outcome::Broken(_) | Outcome::TimedOut(_)));
        if broken {
            // Pending confirmations or returns of this channel would be mixed up with those
            // of the next call: start over with a fresh channel (and connection if down).
            let connection_up = link
                .as_ref()
                .is_some_and(|l| l.connection.status().connected());
            if connection_up {
                if let Some(l) = link.as_ref() {
                    let _ = tokio::time::timeout(
                        Duration::from_secs(1),
                        l.channel
                            .close(200, ShortString::from("txmq-outbox: reopening")),
                    )
                    .await;
                }
                // A closed channel reports not connected: the next call opens another.
            } else {
                *link = None;
            }
        }
        drop(link);

        rows.iter()
            .zip(outcomes)
            .map(|(row, outcome)| match outcome {
                Outcome::Invalid(e) | Outcome::Broken(e) | Outcome::TimedOut(e) => Err(e),
                Outcome::Confirmed(confirmation) => {
                    if let Some(message) = returned.get(&row.id) {
                        return Err(SinkError::new(format!(
                            "RabbitMQ returned message {} as unroutable ({}): {} {}",
                            row.id,
                            self.route(row),
                            message.reply_code,
                            message.reply_text
                        )));
                    }
                    match *confirmation {
                        Confirmation::Ack(_) => {}
                        Confirmation::Nack(_) => {
                            return Err(SinkError::new(format!(
                                "RabbitMQ nacked message {} ({})",
                                row.id,
                                self.route(row)
                            )));
                        }
                        Confirmation::NotRequested => {
                            return Err(SinkError::new(format!(
                                "RabbitMQ did not confirm message {} ({}): publisher confirms \
                                 are off on the channel",
                                row.id,
                                self.route(row)
                            )));
                        }
                    }
                    if let Some(e) = &unmatched {
                        return Err(SinkError::new(format!("message {}: {e}", row.id)));
                    }
                    if let Some(lost) = &timed_out {
                        return Err(SinkError::new(format!(
                            "RabbitMQ acked message {} ({}), but the confirmation of message \
                             {lost} of the same call was lost, and with it possibly the \
                             return of this one: not reported as delivered",
                            row.id,
                            self.route(row)
                        )));
                    }
                    Ok(())
                }
            })
            .collect()
    }
}

impl Sink for RabbitMqSink {
    fn name(&self) -> &'static str {
        "rabbitmq"
    }

    fn publish<'a>(&'a self, rows: &'a [OutboxRow]) -> BoxFuture<'a, Vec<Result<(), SinkError>>> {
        Box::pin(self.publish_rows(rows))
    }
}

impl std::fmt::Debug for RabbitMqSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitMqSink")
            .field("url", &self.shown)
            .field("exchange", &self.exchange)
            .finish_non_exhaustive()
    }
}

/// Splits the `exchange` query parameter off `url`: the URL for lapin and the exchange
/// name (`""` when absent).
fn split_exchange(url: &str) -> Result<(String, String), SinkError> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_string(), String::new()));
    };
    let mut exchange = None;
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        if percent_decode(name).as_deref() == Some("exchange") {
            let value = percent_decode(value).ok_or_else(|| {
                SinkError::new(format!(
                    "invalid exchange parameter in RabbitMQ URL {}: not UTF-8 after \
                     percent-decoding",
                    super::redact_url(url, false)
                ))
            })?;
            if exchange.replace(value).is_some() {
                return Err(SinkError::new(format!(
                    "RabbitMQ URL {} names the exchange twice",
                    super::redact_url(url, false)
                )));
            }
        } else {
            kept.push(pair);
        }
    }
    let lapin_url = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((lapin_url, exchange.unwrap_or_default()))
}

/// Decodes `%XX` escapes and `+` (a space) of a URL query component.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exchange_parameter_is_split_off() {
        let (url, exchange) =
            split_exchange("amqp://u:p@h:5672/%2f?heartbeat=10&exchange=orders%2Ev1&x=1")
                .expect("valid");
        assert_eq!(url, "amqp://u:p@h:5672/%2f?heartbeat=10&x=1");
        assert_eq!(exchange, "orders.v1");
        let (url, exchange) = split_exchange("amqp://h/%2f?exchange=e").expect("valid");
        assert_eq!((url.as_str(), exchange.as_str()), ("amqp://h/%2f", "e"));
        let (url, exchange) = split_exchange("amqp://h/%2f").expect("valid");
        assert_eq!((url.as_str(), exchange.as_str()), ("amqp://h/%2f", ""));
        assert!(split_exchange("amqp://h/?exchange=a&exchange=b").is_err());
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%2Fb+c%").as_deref(), Some("a/b c%"));
        assert_eq!(percent_decode("%zz%4").as_deref(), Some("%zz%4"));
    }
}
