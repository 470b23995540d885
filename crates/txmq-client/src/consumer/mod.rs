//! Consuming: what a consumer subscribes to, and the two consumers — [`SimpleConsumer`]
//! (the application receives and acknowledges) and [`PushConsumer`] (a handler is called).

mod push;
mod simple;

pub use push::{PushConsumer, PushConsumerBuilder};
pub use simple::SimpleConsumer;

use txmq_proto::v2 as pb;

use crate::error::{AckError, CallError};

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
