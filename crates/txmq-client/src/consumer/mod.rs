//! Consuming: what a consumer subscribes to, and the two consumers — [`SimpleConsumer`]
//! (the application receives and acknowledges) and [`PushConsumer`] (a handler is called).

mod push;
mod simple;

pub use push::{PushConsumer, PushConsumerBuilder};
pub use simple::SimpleConsumer;

use std::sync::Arc;

use txmq_proto::v2 as pb;

use crate::config::Batching;
use crate::error::{AckError, CallError};
use crate::join::{Join, Joiner, Pending, abandoned_call};
use crate::session::Session;

/// Which messages of a topic a consumer group takes.
///
/// # Example
/// ```
/// use txmq_client::{Filter, Subscription};
///
/// let all = Subscription::all("orders");
/// let some = Subscription::new("orders", "paid||refunded");
/// assert_eq!(some.filter, Filter::Tag("paid||refunded".into()));
/// # let _ = all;
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    /// The topic.
    pub topic: String,
    /// The filter.
    pub filter: Filter,
}

impl Subscription {
    /// Messages of `topic` whose tag matches `tag_expression` (`*`, `a`, or `a||b||c`).
    pub fn new(topic: impl Into<String>, tag_expression: impl Into<String>) -> Self {
        Self {
            topic: topic.into(),
            filter: Filter::Tag(tag_expression.into()),
        }
    }

    /// Every message of `topic`.
    pub fn all(topic: impl Into<String>) -> Self {
        Self::new(topic, "*")
    }
}

/// A message filter.
///
/// # Example
/// ```
/// let f = txmq_client::Filter::Sql("region = 'eu'".into());
/// # let _ = f;
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Filter {
    /// A tag expression: `*`, `a`, or `a||b||c`.
    Tag(String),
    /// An SQL92 expression over user properties (RocketMQ servers with property filtering
    /// only; txmq refuses it).
    Sql(String),
}

impl Filter {
    pub(crate) fn to_proto(&self) -> pb::FilterExpression {
        let (t, e) = match self {
            Self::Tag(e) => (pb::FilterType::Tag, e),
            Self::Sql(e) => (pb::FilterType::Sql, e),
        };
        pb::FilterExpression {
            r#type: t as i32,
            expression: e.clone(),
        }
    }
}

/// An ack or change-of-invisibility failure, with an expired handle told apart.
fn ack_error(message_id: &str, e: CallError) -> AckError {
    match e {
        CallError::Refused { code, message, .. }
            if code == pb::Code::InvalidReceiptHandle as i32 =>
        {
            AckError::InvalidReceiptHandle {
                message_id: message_id.to_string(),
                message,
            }
        }
        e => AckError::Call(e),
    }
}

/// Sends a consumer's acknowledgements. With batching on, they are joined
/// ([`crate::join`]): while the consumer has its limit of `AckMessage` calls in flight, those
/// of one topic that wait share the next call. Each still has its own outcome; the server
/// acknowledges each entry on its own.
#[derive(Clone)]
struct Acker {
    session: Session,
    group: Arc<str>,
    joiner: Option<Arc<Joiner<Acks>>>,
}

impl Acker {
    fn new(session: &Session, group: &str, batching: Option<Batching>) -> Self {
        let joiner = batching.map(|limits| {
            let acks = Acks {
                session: session.clone(),
                group: group.to_string(),
            };
            Arc::new(Joiner::new(acks, limits))
        });
        Self {
            session: session.clone(),
            group: group.into(),
            joiner,
        }
    }

    /// Acknowledges one message.
    async fn ack(&self, topic: &str, message_id: &str, handle: &str) -> Result<(), CallError> {
        match &self.joiner {
            Some(joiner) => {
                joiner
                    .submit(Ack {
                        topic: topic.to_string(),
                        message_id: message_id.to_string(),
                        handle: handle.to_string(),
                    })
                    .await
            }
            None => {
                self.session
                    .ack(&self.group, topic, message_id, handle)
                    .await
            }
        }
    }
}

/// An acknowledgement to send.
struct Ack {
    topic: String,
    message_id: String,
    handle: String,
}

/// The joined acknowledgements of one consumer.
struct Acks {
    session: Session,
    group: String,
}

impl Join for Acks {
    type Item = Ack;
    type Output = Result<(), CallError>;

    async fn many(&self, batch: Vec<Pending<Self>>) {
        let topic = &batch[0].item.topic;
        let entries: Vec<(&str, &str)> = batch
            .iter()
            .map(|p| (p.item.message_id.as_str(), p.item.handle.as_str()))
            .collect();
        match self.session.ack_many(&self.group, topic, &entries).await {
            Ok(outcomes) => {
                for (pending, outcome) in batch.into_iter().zip(outcomes) {
                    let _ = pending.reply.send(outcome);
                }
            }
            Err(e) => {
                for pending in batch {
                    let _ = pending.reply.send(Err(e.clone()));
                }
            }
        }
    }

    fn goes_with(first: &Ack, ack: &Ack) -> bool {
        first.topic == ack.topic
    }

    /// An entry is a message id and a receipt handle: only the count of entries limits a
    /// call.
    fn size(_: &Ack) -> usize {
        0
    }

    fn joining(&self) -> bool {
        true
    }

    fn abandoned() -> Self::Output {
        Err(abandoned_call("AckMessage"))
    }
}
