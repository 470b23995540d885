//! The simple consumer: the application receives, then acknowledges each message or
//! changes how long it stays invisible.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use txmq_proto::v2::{self as pb, Code};

use super::{Acker, Subscription, ack_error};
use crate::config::ClientConfig;
use crate::error::{AckError, ConnectError, ReceiveError};
use crate::message::MessageView;
use crate::retry::from_duration;
use crate::session::{Role, Session};

/// Receives messages for a consumer group; the application acknowledges each one.
///
/// A received message is invisible to the group for the invisible duration given to
/// [`receive`](Self::receive); not acknowledged by then, it is delivered again with
/// `delivery_attempt + 1`. Cheap to clone; clones share one connection.
///
/// # Example
/// ```no_run
/// # async fn f() -> Result<(), txmq_client::Error> {
/// use std::time::Duration;
/// use txmq_client::{ClientConfig, SimpleConsumer, Subscription};
///
/// let config = ClientConfig::new("127.0.0.1:8081");
/// let consumer =
///     SimpleConsumer::connect(config, "shipping", [Subscription::new("orders", "paid")]).await?;
/// loop {
///     for m in consumer.receive(16, Duration::from_secs(30)).await? {
///         println!("{}", String::from_utf8_lossy(m.body()));
///         consumer.ack(&m).await?;
///     }
/// }
/// # }
/// ```
#[derive(Clone)]
pub struct SimpleConsumer {
    session: Session,
    group: Arc<str>,
    subscriptions: Arc<[Subscription]>,
    /// Round robin over subscriptions and route queues.
    next: Arc<AtomicUsize>,
    /// Sends [`ack`](Self::ack)s, joining those that wait into shared calls.
    acks: Acker,
}

impl SimpleConsumer {
    /// Connects a consumer of `group` with `subscriptions`.
    ///
    /// Cancelling drops the connection being made.
    ///
    /// # Errors
    /// As [`Producer::connect`](crate::Producer::connect), and
    /// [`ConnectError::NoSubscription`].
    pub async fn connect(
        config: ClientConfig,
        group: impl Into<String>,
        subscriptions: impl IntoIterator<Item = Subscription>,
    ) -> Result<Self, ConnectError> {
        let group = group.into();
        let subscriptions: Vec<Subscription> = subscriptions.into_iter().collect();
        if subscriptions.is_empty() {
            return Err(ConnectError::NoSubscription);
        }
        let role = Role::SimpleConsumer {
            group: group.clone(),
            subscriptions: subscriptions.clone(),
        };
        let batching = config.batching;
        let session = Session::connect(config, role, None).await?;
        let acks = Acker::new(&session, &group, batching);
        Ok(Self {
            session,
            group: group.into(),
            subscriptions: subscriptions.into(),
            next: Arc::new(AtomicUsize::new(0)),
            acks,
        })
    }

    /// Receives up to `max` messages of one subscribed topic (in turn), waiting up to the
    /// long-polling timeout for some to arrive; they stay invisible to the group for
    /// `invisible`. An empty result means none arrived in time.
    ///
    /// Never takes longer than the long-polling timeout plus the request timeout.
    ///
    /// # Cancel safety
    /// Cancelling drops the call; messages the server handed out on it stay invisible
    /// until `invisible` has passed, then come again.
    ///
    /// # Errors
    /// [`ReceiveError::InvalidArgument`] for `max == 0`, [`ReceiveError::TopicNotFound`],
    /// or the failed call (e.g. an invisible duration the server does not accept).
    pub async fn receive(
        &self,
        max: u32,
        invisible: Duration,
    ) -> Result<Vec<MessageView>, ReceiveError> {
        if max == 0 {
            return Err(ReceiveError::InvalidArgument {
                reason: "a receive asks for at least one message".into(),
            });
        }
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        let sub = &self.subscriptions[turn % self.subscriptions.len()];
        let route = self.session.route(&sub.topic).await.map_err(|e| {
            if e.code() == Some(Code::TopicNotFound) {
                ReceiveError::TopicNotFound {
                    topic: sub.topic.clone(),
                }
            } else {
                ReceiveError::Call(e)
            }
        })?;
        let readable: Vec<&pb::MessageQueue> = route
            .iter()
            .filter(|q| {
                matches!(
                    pb::Permission::try_from(q.permission),
                    Ok(pb::Permission::Read | pb::Permission::ReadWrite)
                )
            })
            .collect();
        let queue = match readable.len() {
            0 => pb::MessageQueue {
                topic: Some(self.session.resource(&sub.topic)),
                id: -1,
                ..Default::default()
            },
            n => readable[turn / self.subscriptions.len() % n].clone(),
        };
        let long_polling = self.session.config().long_polling_timeout;
        let request = pb::ReceiveMessageRequest {
            group: Some(self.session.resource(&self.group)),
            message_queue: Some(queue),
            filter_expression: Some(sub.filter.to_proto()),
            batch_size: i32::try_from(max).unwrap_or(i32::MAX),
            invisible_duration: Some(from_duration(invisible)),
            auto_renew: false,
            long_polling_timeout: Some(from_duration(long_polling)),
            attempt_id: Some(uuid::Uuid::now_v7().to_string()),
        };
        let messages = self
            .session
            .receive(request, long_polling)
            .await
            .map_err(|e| {
                if e.code() == Some(Code::TopicNotFound) {
                    ReceiveError::TopicNotFound {
                        topic: sub.topic.clone(),
                    }
                } else {
                    ReceiveError::Call(e)
                }
            })?;
        Ok(messages.into_iter().map(MessageView::from_proto).collect())
    }

    /// Acknowledges a received message: it is done for the group.
    ///
    /// Acknowledgements made at the same time by tasks sharing this consumer (or its
    /// clones) are joined like sends (the client's [`Batching`](crate::Batching)): while it
    /// has its limit of calls in flight, those of one topic that wait share the next
    /// `AckMessage`. Each still gets its own outcome.
    ///
    /// # Cancel safety
    /// Not cancel safe: the acknowledgement may or may not have reached the server; if it
    /// did not, the message comes again.
    ///
    /// # Errors
    /// [`AckError::NotReceived`], [`AckError::InvalidReceiptHandle`] when the invisible
    /// duration ran out (the message comes again), or the failed call.
    pub async fn ack(&self, message: &MessageView) -> Result<(), AckError> {
        let handle = handle(message)?;
        self.acks
            .ack(message.topic(), message.message_id(), handle)
            .await
            .map_err(|e| ack_error(message.message_id(), e))
    }

    /// Acknowledges received messages, one call per topic among them; returns the outcome
    /// of each, in order.
    ///
    /// # Cancel safety
    /// Not cancel safe, like [`ack`](Self::ack).
    ///
    /// # Errors
    /// Per message, as [`ack`](Self::ack); a failed call fails each message of its topic.
    ///
    /// # Example
    /// ```no_run
    /// # async fn f(consumer: txmq_client::SimpleConsumer) -> Result<(), txmq_client::Error> {
    /// let messages = consumer.receive(32, std::time::Duration::from_secs(30)).await?;
    /// // ... handle them ...
    /// for (m, acked) in messages.iter().zip(consumer.ack_all(&messages).await) {
    ///     if let Err(e) = acked {
    ///         eprintln!("{} comes again: {e}", m.message_id());
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn ack_all(&self, messages: &[MessageView]) -> Vec<Result<(), AckError>> {
        let mut outcomes: Vec<Option<Result<(), AckError>>> = Vec::with_capacity(messages.len());
        // Per topic, in order of first appearance.
        let mut topics: Vec<TopicAcks<'_>> = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            match handle(m) {
                Err(e) => outcomes.push(Some(Err(e))),
                Ok(h) => {
                    outcomes.push(None);
                    let at = match topics.iter().position(|t| t.topic == m.topic()) {
                        Some(at) => at,
                        None => {
                            topics.push(TopicAcks {
                                topic: m.topic(),
                                places: Vec::new(),
                                entries: Vec::new(),
                            });
                            topics.len() - 1
                        }
                    };
                    topics[at].places.push(i);
                    topics[at].entries.push((m.message_id(), h));
                }
            }
        }
        for TopicAcks {
            topic,
            places,
            entries,
        } in topics
        {
            match self.session.ack_many(&self.group, topic, &entries).await {
                Ok(results) => {
                    for ((i, (id, _)), r) in places.into_iter().zip(&entries).zip(results) {
                        outcomes[i] = Some(r.map_err(|e| ack_error(id, e)));
                    }
                }
                Err(e) => {
                    for (i, (id, _)) in places.into_iter().zip(&entries) {
                        outcomes[i] = Some(Err(ack_error(id, e.clone())));
                    }
                }
            }
        }
        outcomes
            .into_iter()
            .map(|o| o.unwrap_or_else(|| unreachable!("every message has an outcome")))
            .collect()
    }

    /// Makes a received message invisible for `invisible` from now (zero: visible again at
    /// once) and returns it with its new receipt handle, which the next
    /// [`ack`](Self::ack) must use: the old one is no longer valid.
    ///
    /// # Cancel safety
    /// Not cancel safe: the server may have changed the handle without the client learning
    /// the new one; the message then comes again.
    ///
    /// # Errors
    /// As [`ack`](Self::ack).
    pub async fn change_invisible_duration(
        &self,
        message: &MessageView,
        invisible: Duration,
    ) -> Result<MessageView, AckError> {
        let handle = handle(message)?;
        let new = self
            .session
            .change_invisible_duration(
                &self.group,
                message.topic(),
                message.message_id(),
                handle,
                invisible,
            )
            .await
            .map_err(|e| ack_error(message.message_id(), e))?;
        Ok(message.clone().with_receipt_handle(new))
    }

    /// The consumer group.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// The client id this consumer sends as `x-mq-client-id`.
    pub fn client_id(&self) -> &str {
        self.session.client_id()
    }

    /// Tells the server this consumer is going away, then closes the connection (once the
    /// other clones are dropped too).
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn shutdown(self) {
        if let Err(e) = self.session.notify_termination().await {
            tracing::debug!(error = %e, "NotifyClientTermination failed");
        }
    }
}

/// The messages of one topic in an [`SimpleConsumer::ack_all`]: their places in the
/// argument, and their (message id, receipt handle) entries.
struct TopicAcks<'a> {
    topic: &'a str,
    places: Vec<usize>,
    entries: Vec<(&'a str, &'a str)>,
}

fn handle(message: &MessageView) -> Result<&str, AckError> {
    message
        .receipt_handle()
        .ok_or_else(|| AckError::NotReceived {
            message_id: message.message_id().to_string(),
        })
}
