//! Broker errors. Every error that crosses the wire carries a RocketMQ status code.

use txmq_proto::v2::Code;
use txmq_store::AppendError;

/// An error answered to a client as a RocketMQ `Status`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct BrokerError {
    /// The protocol's status code.
    pub code: Code,
    /// What went wrong, for people.
    pub message: String,
}

impl BrokerError {
    /// An error with a code and a message.
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// `BAD_REQUEST`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(Code::BadRequest, message)
    }

    /// `TOPIC_NOT_FOUND` for a topic.
    pub fn topic_not_found(topic: &str) -> Self {
        Self::new(Code::TopicNotFound, format!("topic {topic} does not exist"))
    }

    /// `CONSUMER_GROUP_NOT_FOUND` for a group.
    pub fn group_not_found(group: &str) -> Self {
        Self::new(
            Code::ConsumerGroupNotFound,
            format!("consumer group {group} does not exist"),
        )
    }

    /// `INTERNAL_SERVER_ERROR`.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(Code::InternalServerError, message)
    }
}

impl From<AppendError> for BrokerError {
    fn from(e: AppendError) -> Self {
        match e {
            AppendError::TooLarge { .. } => Self::new(Code::MessageBodyTooLarge, e.to_string()),
            AppendError::Invalid(_) => Self::bad_request(e.to_string()),
            // Nothing of the request was stored; the client may retry.
            AppendError::DiskFull(_)
            | AppendError::Io(_)
            | AppendError::Poisoned(_)
            | AppendError::Closed => Self::internal(format!("message not stored: {e}")),
        }
    }
}

impl From<txmq_store::ReadError> for BrokerError {
    fn from(e: txmq_store::ReadError) -> Self {
        Self::internal(format!("read failed: {e}"))
    }
}

/// Result of broker operations.
pub type BrokerResult<T> = Result<T, BrokerError>;
