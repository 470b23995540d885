//! Errors: [`CallError`] says why one call failed; each operation has its own small enum
//! around it; [`Error`] gathers them all.

use std::time::Duration;

use txmq_proto::v2::Code;

/// The protocol's name of a RocketMQ status code, e.g. `TOPIC_NOT_FOUND`.
///
/// # Example
/// ```
/// assert_eq!(txmq_client::code_name(40402), "TOPIC_NOT_FOUND");
/// assert_eq!(txmq_client::code_name(1), "unknown code");
/// ```
pub fn code_name(code: i32) -> &'static str {
    Code::try_from(code).map_or("unknown code", |c| c.as_str_name())
}

/// Why one RPC failed.
///
/// The RocketMQ status code and message of a refusal are kept as the server sent them.
///
/// # Example
/// ```
/// use txmq_client::CallError;
/// use txmq_client::proto::Code;
///
/// let e = CallError::Refused { rpc: "SendMessage", code: 40402, message: "no topic".into() };
/// assert_eq!(e.code(), Some(Code::TopicNotFound));
/// assert!(!e.is_transient());
/// ```
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum CallError {
    /// The call did not complete at the gRPC level: no connection, connection lost, or the
    /// server does not implement the RPC. The server may or may not have acted on it.
    #[error("{rpc}: gRPC status {code:?}: {message}")]
    Transport {
        /// The RPC.
        rpc: &'static str,
        /// The gRPC status code.
        code: tonic::Code,
        /// The gRPC status message.
        message: String,
    },
    /// The server answered with a RocketMQ status other than OK.
    #[error("{rpc}: the server answered {code} ({}): {message}", code_name(*code))]
    Refused {
        /// The RPC.
        rpc: &'static str,
        /// The RocketMQ status code (`txmq_proto::v2::Code`), e.g. 40402.
        code: i32,
        /// The server's explanation.
        message: String,
    },
    /// No answer within the deadline. The server may or may not have acted on it.
    #[error("{rpc}: no answer within {after:?}")]
    TimedOut {
        /// The RPC.
        rpc: &'static str,
        /// The deadline.
        after: Duration,
    },
    /// The answer lacks something the protocol requires.
    #[error("{rpc}: malformed answer: {reason}")]
    Malformed {
        /// The RPC.
        rpc: &'static str,
        /// What is missing or wrong.
        reason: String,
    },
}

impl CallError {
    pub(crate) fn transport(rpc: &'static str, status: tonic::Status) -> Self {
        Self::Transport {
            rpc,
            code: status.code(),
            message: status.message().to_string(),
        }
    }

    /// The RocketMQ status code of a refusal; `None` for other failures or unknown codes.
    pub fn code(&self) -> Option<Code> {
        match self {
            Self::Refused { code, .. } => Code::try_from(*code).ok(),
            _ => None,
        }
    }

    /// True when trying again may succeed: lost connections, timeouts, throttling and
    /// server-side failures. False for definite refusals (the `4xxxx` codes other than
    /// `REQUEST_TIMEOUT` and `TOO_MANY_REQUESTS`, and `NOT_IMPLEMENTED`/`UNSUPPORTED`).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Transport { code, .. } => matches!(
                code,
                tonic::Code::Unavailable
                    | tonic::Code::Unknown
                    | tonic::Code::Internal
                    | tonic::Code::Cancelled
                    | tonic::Code::Aborted
                    | tonic::Code::DeadlineExceeded
                    | tonic::Code::ResourceExhausted
            ),
            Self::TimedOut { .. } => true,
            Self::Refused { code, .. } => match Code::try_from(*code) {
                Ok(Code::RequestTimeout | Code::TooManyRequests) => true,
                Ok(
                    Code::NotImplemented
                    | Code::Unsupported
                    | Code::VersionUnsupported
                    | Code::VerifyFifoMessageUnsupported,
                ) => false,
                _ => (50_000..60_000).contains(code),
            },
            Self::Malformed { .. } => false,
        }
    }
}

/// Why a client could not be connected.
///
/// # Example
/// ```no_run
/// # async fn f() {
/// use txmq_client::{ClientConfig, ConnectError, Producer};
///
/// match Producer::connect(ClientConfig::new("localhost:8081"), ["orders"]).await {
///     Ok(_) => {}
///     Err(ConnectError::SettingsTimedOut { .. }) => eprintln!("is this a RocketMQ 5 endpoint?"),
///     Err(e) => eprintln!("{e}"),
/// }
/// # }
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The endpoint is not `host:port`.
    #[error("{endpoint:?} is not a usable endpoint (expected host:port): {reason}")]
    BadEndpoint {
        /// The configured endpoint.
        endpoint: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The TLS configuration is unusable (e.g. no certificate in the CA PEM).
    #[error("TLS configuration: {reason}")]
    Tls {
        /// What is wrong.
        reason: String,
    },
    /// A name (group, topic, namespace, host) cannot be sent in a request.
    #[error("{what} {value:?} is not usable: {reason}")]
    BadName {
        /// Which name.
        what: &'static str,
        /// The name.
        value: String,
        /// Why.
        reason: String,
    },
    /// The Telemetry stream could not be opened, or ended before the server's settings.
    #[error("cannot open the telemetry stream to {endpoint}: {cause}")]
    Unreachable {
        /// The endpoint.
        endpoint: String,
        /// The failed call.
        cause: CallError,
    },
    /// The server answered the client's settings with an error status.
    #[error("{endpoint} refused the client settings: {code} ({}): {message}", code_name(*code))]
    SettingsRefused {
        /// The endpoint.
        endpoint: String,
        /// RocketMQ status code.
        code: i32,
        /// The server's explanation.
        message: String,
    },
    /// The server did not answer the client's settings in time.
    #[error("{endpoint} did not answer the client settings within {after:?}")]
    SettingsTimedOut {
        /// The endpoint.
        endpoint: String,
        /// How long the client waited.
        after: Duration,
    },
    /// A consumer was given no subscription.
    #[error("a consumer needs at least one subscription")]
    NoSubscription,
    /// A consumer could not learn which queues to receive from.
    #[error("no assignment for topic {topic}: {cause}")]
    Assignment {
        /// The topic.
        topic: String,
        /// The failed call.
        cause: CallError,
    },
}

/// Why a message (or batch) was not sent.
///
/// # Example
/// ```no_run
/// # async fn f(producer: txmq_client::Producer) {
/// use txmq_client::{Message, SendError};
///
/// match producer.send(Message::new("orders", "paid")).await {
///     Ok(receipt) => println!("sent {}", receipt.message_id),
///     Err(SendError::TopicNotFound { topic }) => eprintln!("create {topic} first"),
///     Err(e) if e.is_definite() => eprintln!("refused: {e}"),
///     Err(e) => eprintln!("outcome unknown, may have been stored: {e}"),
/// }
/// # }
/// ```
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// The message was rejected before sending: nothing was sent.
    #[error("invalid message: {reason}")]
    InvalidMessage {
        /// What is wrong with it.
        reason: String,
    },
    /// The topic does not exist (and the server does not create topics on first send).
    #[error("topic {topic} does not exist")]
    TopicNotFound {
        /// The topic.
        topic: String,
    },
    /// The topic does not take messages of this type (e.g. a FIFO message to a normal topic).
    #[error("topic {topic} does not take {message_type} messages (it takes {accepted})")]
    MessageTypeMismatch {
        /// The topic.
        topic: String,
        /// The type of the message.
        message_type: &'static str,
        /// The types the topic takes.
        accepted: String,
    },
    /// Sending failed after `attempts` attempts; `cause` is the last failure.
    #[error("send failed after {attempts} attempt(s): {cause}")]
    Failed {
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        cause: CallError,
    },
}

impl SendError {
    /// True when the message was certainly not stored: it was refused or never sent. False
    /// when the outcome is unknown (connection lost or timed out after sending).
    pub fn is_definite(&self) -> bool {
        match self {
            Self::InvalidMessage { .. }
            | Self::TopicNotFound { .. }
            | Self::MessageTypeMismatch { .. } => true,
            Self::Failed { cause, .. } => matches!(cause, CallError::Refused { .. }),
        }
    }

    /// The RocketMQ status code the server refused with, if it did.
    pub fn code(&self) -> Option<Code> {
        match self {
            Self::TopicNotFound { .. } => Some(Code::TopicNotFound),
            Self::Failed { cause, .. } => cause.code(),
            _ => None,
        }
    }
}

/// Why committing or rolling back a transaction failed.
///
/// The outcome is then unknown to the client; the server checks the transaction back
/// (see [`TransactionChecker`](crate::TransactionChecker)).
///
/// # Example
/// ```no_run
/// # async fn f(tx: txmq_client::Transaction) {
/// if let Err(e) = tx.commit().await {
///     eprintln!("commit not confirmed, the check-back will settle it: {e}");
/// }
/// # }
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EndTransactionError {
    /// The EndTransaction call failed.
    #[error(transparent)]
    Call(#[from] CallError),
}

/// Why a receive failed.
///
/// # Example
/// ```no_run
/// # async fn f(consumer: txmq_client::SimpleConsumer) {
/// use std::time::Duration;
/// if let Err(e) = consumer.receive(16, Duration::from_secs(30)).await {
///     eprintln!("receive failed: {e}");
/// }
/// # }
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReceiveError {
    /// The topic does not exist.
    #[error("topic {topic} does not exist")]
    TopicNotFound {
        /// The topic.
        topic: String,
    },
    /// An argument is out of range (e.g. a batch of 0).
    #[error("invalid argument: {reason}")]
    InvalidArgument {
        /// What is wrong.
        reason: String,
    },
    /// The ReceiveMessage (or QueryRoute) call failed.
    #[error(transparent)]
    Call(#[from] CallError),
}

/// Why acknowledging a message, or changing its invisible duration, failed.
///
/// # Example
/// ```no_run
/// # async fn f(consumer: txmq_client::SimpleConsumer, m: txmq_client::MessageView) {
/// use txmq_client::AckError;
/// match consumer.ack(&m).await {
///     Ok(()) => {}
///     Err(AckError::InvalidReceiptHandle { .. }) => eprintln!("too late: it will come again"),
///     Err(e) => eprintln!("{e}"),
/// }
/// # }
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AckError {
    /// The message was not received by this consumer (it has no receipt handle).
    #[error("message {message_id} has no receipt handle: it was not received by a consumer")]
    NotReceived {
        /// The message id.
        message_id: String,
    },
    /// The receipt handle is expired or was replaced (by a redelivery, or by a change of
    /// invisible duration, which returns a new one): the message will be delivered again.
    #[error("the receipt handle of message {message_id} is no longer valid: {message}")]
    InvalidReceiptHandle {
        /// The message id.
        message_id: String,
        /// The server's explanation.
        message: String,
    },
    /// The call failed.
    #[error(transparent)]
    Call(#[from] CallError),
}

/// Any error of this crate.
///
/// # Example
/// ```no_run
/// # async fn f() -> Result<(), txmq_client::Error> {
/// use txmq_client::{ClientConfig, Message, Producer};
/// let producer = Producer::connect(ClientConfig::new("localhost:8081"), ["orders"]).await?;
/// producer.send(Message::new("orders", "paid")).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// See [`ConnectError`].
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// See [`SendError`].
    #[error(transparent)]
    Send(#[from] SendError),
    /// See [`EndTransactionError`].
    #[error(transparent)]
    EndTransaction(#[from] EndTransactionError),
    /// See [`ReceiveError`].
    #[error(transparent)]
    Receive(#[from] ReceiveError),
    /// See [`AckError`].
    #[error(transparent)]
    Ack(#[from] AckError),
    /// See [`CallError`].
    #[error(transparent)]
    Call(#[from] CallError),
}

/// Fails unless `status` is OK.
pub(crate) fn check(
    rpc: &'static str,
    status: Option<&txmq_proto::v2::Status>,
) -> Result<(), CallError> {
    match status {
        Some(s) if s.code == Code::Ok as i32 => Ok(()),
        Some(s) => Err(CallError::Refused {
            rpc,
            code: s.code,
            message: s.message.clone(),
        }),
        None => Err(CallError::Malformed {
            rpc,
            reason: "no status".into(),
        }),
    }
}
