//! Sending: where a message is checked, given its id and type, and sent with retries.

pub(crate) mod batch;

use std::sync::Arc;

use txmq_proto::v2::{self as pb, Code};

use crate::config::ClientConfig;
use crate::error::{CallError, ConnectError, SendError};
use crate::message::{Message, SendReceipt};
use crate::session::{Role, Session};

/// Sends messages: normal, FIFO (with a message group), delay (with a delivery time), one
/// by one or in batches.
///
/// Cheap to clone; clones share one connection. Concurrent sends of normal messages are
/// joined into one request while the producer is busy ([`ClientConfig::batching`]).
/// Transient failures (connection lost, timeouts, throttling, server errors) are retried
/// with the same message id, as often and with the waits the server's settings say (3
/// attempts by default); refusals are not.
///
/// # Example
/// ```no_run
/// # async fn f() -> Result<(), txmq_client::Error> {
/// use txmq_client::{ClientConfig, Message, Producer};
///
/// let producer = Producer::connect(ClientConfig::new("127.0.0.1:8081"), ["orders"]).await?;
/// let receipt = producer
///     .send(Message::new("orders", "order 42 paid").with_tag("paid").with_keys(["42"]))
///     .await?;
/// println!("sent {}", receipt.message_id);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Producer {
    session: Session,
    /// Joins concurrent sends of normal messages; `None` when batching is off.
    batcher: Option<batch::Batcher>,
}

impl Producer {
    /// Connects a producer that announces `topics` (more are announced on first send).
    ///
    /// Cancelling drops the connection being made.
    ///
    /// # Errors
    /// A bad endpoint or TLS configuration, an unreachable server, or settings refused or
    /// not answered within the request timeout.
    pub async fn connect(
        config: ClientConfig,
        topics: impl IntoIterator<Item = impl Into<String>>,
    ) -> Result<Self, ConnectError> {
        let topics = topics.into_iter().map(Into::into).collect();
        let batching = config.batching;
        let session = Session::connect(config, Role::Producer { topics }, None).await?;
        let batcher = batching.map(|limits| batch::Batcher::new(session.clone(), false, limits));
        Ok(Self { session, batcher })
    }

    /// Sends one message and returns its receipt once the server has stored it.
    ///
    /// # Cancel safety
    /// Not cancel safe: cancelled after the request went out, the message may or may not
    /// have been stored. Cancelled while it waits to be joined into a request, it is not
    /// sent.
    ///
    /// # Errors
    /// [`SendError::InvalidMessage`] (nothing sent), [`SendError::TopicNotFound`],
    /// [`SendError::MessageTypeMismatch`], or [`SendError::Failed`] with the last failure
    /// after the retries.
    pub async fn send(&self, message: Message) -> Result<SendReceipt, SendError> {
        if let Some(batcher) = &self.batcher
            && message.message_type() == pb::MessageType::Normal
        {
            return batcher.send(message).await;
        }
        send_one(&self.session, message, false).await
    }

    /// Sends messages of one topic and one type in one request; returns their receipts in
    /// order. The server stores all of them or none.
    ///
    /// # Cancel safety
    /// Not cancel safe, like [`send`](Self::send).
    ///
    /// # Errors
    /// As [`send`](Self::send); also [`SendError::InvalidMessage`] for an empty batch or
    /// one that mixes topics or message types.
    pub async fn send_batch(&self, messages: Vec<Message>) -> Result<Vec<SendReceipt>, SendError> {
        send(&self.session, messages, false).await
    }

    /// The client id this producer sends as `x-mq-client-id`.
    pub fn client_id(&self) -> &str {
        self.session.client_id()
    }

    /// Tells the server this producer is going away, then closes the connection (once the
    /// other clones are dropped too).
    ///
    /// # Cancel safety
    /// Cancel safe: the connection closes when the producer is dropped either way.
    pub async fn shutdown(self) {
        if let Err(e) = self.session.notify_termination().await {
            tracing::debug!(error = %e, "NotifyClientTermination failed");
        }
    }
}

/// Sends one message in a request of its own; `transactional` makes it a half message.
pub(crate) async fn send_one(
    session: &Session,
    message: Message,
    transactional: bool,
) -> Result<SendReceipt, SendError> {
    send(session, vec![message], transactional)
        .await?
        .pop()
        .ok_or_else(no_entry)
}

/// The error of an answer that lacks the result entry of a message.
pub(crate) fn no_entry() -> SendError {
    SendError::Failed {
        attempts: 1,
        cause: CallError::Malformed {
            rpc: "SendMessage",
            reason: "no result entry".into(),
        },
    }
}

/// Sends `messages` (one topic); `transactional` makes them half messages and sends once.
pub(crate) async fn send(
    session: &Session,
    messages: Vec<Message>,
    transactional: bool,
) -> Result<Vec<SendReceipt>, SendError> {
    let prepared = prepare(session, messages, transactional)?;
    deliver(session, prepared, transactional).await
}

/// Messages of one topic and one type, checked and in their wire form.
pub(crate) struct Prepared {
    pub(crate) topic: String,
    pub(crate) message_type: pb::MessageType,
    pub(crate) wire: Vec<pb::Message>,
}

/// Checks `messages` (one topic, one type) and turns them into what goes on the wire, each
/// with a new message id. Nothing is sent.
pub(crate) fn prepare(
    session: &Session,
    messages: Vec<Message>,
    transactional: bool,
) -> Result<Prepared, SendError> {
    let invalid = |reason: &str| SendError::InvalidMessage {
        reason: reason.to_string(),
    };
    let Some(first) = messages.first() else {
        return Err(invalid("no message to send"));
    };
    let topic = first.topic().to_string();
    let message_type = if transactional {
        pb::MessageType::Transaction
    } else {
        first.message_type()
    };
    if messages.iter().any(|m| m.topic() != topic) {
        return Err(invalid("the messages of a batch must have one topic"));
    }
    if messages
        .iter()
        .any(|m| m.message_type() != first.message_type())
    {
        return Err(invalid("the messages of a batch must have one type"));
    }
    if transactional && first.message_type() != pb::MessageType::Normal {
        return Err(invalid(
            "a transactional message cannot have a message group or a delivery time",
        ));
    }
    let max_body_size = session.max_body_size();
    for m in &messages {
        m.validate(max_body_size)
            .map_err(|reason| SendError::InvalidMessage { reason })?;
    }
    session.announce_topic(&topic);
    let config = session.config();
    let host = session.hostname();
    let wire = messages
        .into_iter()
        .map(|m| m.into_proto(&config.namespace, message_type, host))
        .collect();
    Ok(Prepared {
        topic,
        message_type,
        wire,
    })
}

/// Sends prepared messages in one request, retrying transient failures with the same
/// message ids; a half message (`transactional`) is sent once.
pub(crate) async fn deliver(
    session: &Session,
    prepared: Prepared,
    transactional: bool,
) -> Result<Vec<SendReceipt>, SendError> {
    let Prepared {
        topic,
        message_type,
        mut wire,
    } = prepared;
    let policy = session.retry_policy();
    // A half message is sent once, as the Java client does: a second copy would be a
    // second transaction.
    let max_attempts = if transactional {
        1
    } else {
        policy.max_attempts.max(1)
    };
    let mut attempt = 1;
    loop {
        let outcome = match session.route(&topic).await {
            Ok(route) => {
                if session.validate_message_type() {
                    check_type(&topic, &route, message_type)?;
                }
                let request = if attempt == max_attempts {
                    std::mem::take(&mut wire)
                } else {
                    wire.clone()
                };
                session.send_message(request).await
            }
            Err(e) => Err(e),
        };
        match outcome {
            Ok(entries) => return Ok(entries.into_iter().map(SendReceipt::from_entry).collect()),
            Err(e) if e.code() == Some(Code::TopicNotFound) => {
                return Err(SendError::TopicNotFound { topic });
            }
            Err(e) if e.is_transient() && attempt < max_attempts => {
                tracing::debug!(%topic, attempt, error = %e, "send failed; retrying");
                tokio::time::sleep(policy.delay(attempt)).await;
                attempt += 1;
            }
            Err(source) => {
                return Err(SendError::Failed {
                    attempts: attempt,
                    cause: source,
                });
            }
        }
    }
}

/// Fails if the route says the topic takes other message types.
fn check_type(
    topic: &str,
    route: &Arc<Vec<pb::MessageQueue>>,
    message_type: pb::MessageType,
) -> Result<(), SendError> {
    let mut accepted: Vec<i32> = route
        .iter()
        .flat_map(|q| q.accept_message_types.iter().copied())
        .collect();
    accepted.sort_unstable();
    accepted.dedup();
    if accepted.is_empty() || accepted.contains(&(message_type as i32)) {
        return Ok(());
    }
    let name = |t: i32| pb::MessageType::try_from(t).map_or("UNKNOWN", |t| t.as_str_name());
    Err(SendError::MessageTypeMismatch {
        topic: topic.to_string(),
        message_type: message_type.as_str_name(),
        accepted: accepted
            .into_iter()
            .map(name)
            .collect::<Vec<_>>()
            .join(", "),
    })
}
