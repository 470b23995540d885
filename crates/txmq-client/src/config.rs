//! What a client needs to know to reach a server: where, how (TLS), as whom (credentials,
//! namespace), and how long to wait.

use std::fmt;
use std::time::Duration;

/// How to reach one RocketMQ 5 gRPC endpoint (txmq, or a RocketMQ proxy).
///
/// All traffic of a client goes to this endpoint, as with a RocketMQ proxy, which answers
/// routes with the endpoint the client asked through.
///
/// # Example
/// ```
/// use std::time::Duration;
/// use txmq_client::{ClientConfig, Credentials, Tls};
///
/// let config = ClientConfig::new("127.0.0.1:8081")
///     .with_tls(Tls::TrustAll)
///     .with_namespace("payments")
///     .with_credentials(Credentials::new("AK", "SK"))
///     .with_request_timeout(Duration::from_secs(5));
/// assert_eq!(config.endpoint, "127.0.0.1:8081");
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ClientConfig {
    /// `host:port` of the server (`[v6 address]:port` for IPv6). A leading `http://` is
    /// ignored; `https://` turns TLS on (trusting any certificate) unless [`Self::tls`] says
    /// otherwise.
    pub endpoint: String,
    /// Plaintext or TLS.
    pub tls: Tls,
    /// Namespace put on every topic and group (`Resource.resource_namespace`) and sent as
    /// `x-mq-namespace`; empty for none.
    pub namespace: String,
    /// Access key and secret to sign requests with; `None` sends no `authorization` header.
    pub credentials: Option<Credentials>,
    /// Deadline of every unary call, of the settings exchange on connect, and of a TCP
    /// connection (default 3 s). A receive may take the long-polling timeout on top of it.
    pub request_timeout: Duration,
    /// How long a receive waits on the server for messages to arrive (default 20 s; RocketMQ
    /// proxies clamp it to 5..=20 s, txmq to at most 30 s).
    pub long_polling_timeout: Duration,
    /// How a [`Producer`](crate::Producer) joins concurrent sends of normal messages into
    /// one request (and a transactional producer its half messages and decisions, a
    /// consumer its acknowledgements); `None` sends each in a request of its own. On by
    /// default; see [`Batching`].
    pub batching: Option<Batching>,
    /// Most check-backs a transactional producer's checker answers at once (default 4; at
    /// least 1). Further check-backs wait their turn, one per transaction; past 4,096
    /// waiting, new ones are left for the server to repeat. Keep it below the size of the
    /// database pool the checker shares with the application.
    pub max_concurrent_checks: usize,
}

impl ClientConfig {
    /// A plaintext configuration for `endpoint` (`host:port`) with the defaults.
    ///
    /// # Example
    /// ```
    /// let config = txmq_client::ClientConfig::new("localhost:8081");
    /// assert_eq!(config.request_timeout, std::time::Duration::from_secs(3));
    /// ```
    pub fn new(endpoint: impl Into<String>) -> Self {
        Self {
            endpoint: endpoint.into(),
            tls: Tls::Off,
            namespace: String::new(),
            credentials: None,
            request_timeout: Duration::from_secs(3),
            long_polling_timeout: Duration::from_secs(20),
            batching: Some(Batching::default()),
            max_concurrent_checks: 4,
        }
    }

    /// Sets how the connection is secured.
    pub fn with_tls(mut self, tls: Tls) -> Self {
        self.tls = tls;
        self
    }

    /// Sets the namespace.
    pub fn with_namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// Signs every request with these credentials.
    pub fn with_credentials(mut self, credentials: Credentials) -> Self {
        self.credentials = Some(credentials);
        self
    }

    /// Sets the deadline of unary calls.
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Sets the long-polling timeout of receives.
    pub fn with_long_polling_timeout(mut self, timeout: Duration) -> Self {
        self.long_polling_timeout = timeout;
        self
    }

    /// Sets how a client joins concurrent sends, decisions and acknowledgements; `None`
    /// sends each alone.
    pub fn with_batching(mut self, batching: Option<Batching>) -> Self {
        self.batching = batching;
        self
    }

    /// Sets how many check-backs the checker answers at once.
    pub fn with_max_concurrent_checks(mut self, n: usize) -> Self {
        self.max_concurrent_checks = n;
        self
    }
}

/// How a [`Producer`](crate::Producer) joins concurrent sends of normal messages (no
/// message group, no delivery time), and a transactional producer its half messages, into
/// one `SendMessage` request.
///
/// Nothing is held back to wait for company: a send that finds the producer with fewer
/// than `max_in_flight` requests in flight goes out after one yield of the runtime, with
/// the sends that arrived meanwhile. Only when that many are already out do further sends
/// wait, and the next free slot takes the waiting messages of one topic together, oldest
/// first, up to `max_messages` and `max_bytes` of bodies. A slot freed by an answer is
/// passed on after the same one yield. So senders woken together (by one answer, of sends
/// or of half messages whose commits follow) go out together, a lone sender waits one turn
/// of the runtime and no more, and under load one request, one append and one fdatasync on
/// the server serve many sends. A producer carries at most `max_in_flight` ×
/// `max_messages` sends per round trip: with hundreds of concurrent senders over a slow
/// link, raise `max_in_flight`.
///
/// Each send still gets its own receipt once the server has stored its message, and its
/// own error: a request the server refuses as a whole (it stores all of a request or
/// none) is sent again message by message, so that only the message at fault fails. A
/// [`TransactionalProducer`](crate::TransactionalProducer) joins its half messages the same
/// way, each still a transaction of its own, and its commits and rollbacks, of any topics,
/// into calls of txmq's own `EndTransactions` (`EndTransaction` calls, one per transaction,
/// to a server without it). A [`PushConsumer`](crate::PushConsumer), and the `ack` calls of a
/// [`SimpleConsumer`](crate::SimpleConsumer), join acknowledgements of one topic into one
/// `AckMessage`. The same limits apply to each kind
/// of request, counted apart. FIFO and delay messages always go alone.
///
/// # Example
/// ```
/// use txmq_client::{Batching, ClientConfig};
///
/// let config = ClientConfig::new("127.0.0.1:8081");
/// assert_eq!(config.batching, Some(Batching::default()));
/// let busy = config.clone().with_batching(Some(Batching {
///     max_in_flight: 1,
///     ..Batching::default()
/// }));
/// let one_by_one = config.with_batching(None);
/// # let _ = (busy, one_by_one);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batching {
    /// Requests a producer has in flight before further sends wait to be joined
    /// (default 2, at least 1).
    pub max_in_flight: usize,
    /// Messages in one request at most (default 64).
    pub max_messages: usize,
    /// Bytes of message bodies in one request at most (default 1 MiB); a single larger
    /// message goes alone.
    pub max_bytes: usize,
}

impl Default for Batching {
    fn default() -> Self {
        Self {
            max_in_flight: 2,
            max_messages: 64,
            max_bytes: 1 << 20,
        }
    }
}

/// Whether and how the connection is encrypted.
///
/// The official Java and Go clients use TLS trusting any certificate by default; RocketMQ
/// proxies and txmq serve TLS and plaintext on one port.
///
/// # Example
/// ```no_run
/// use txmq_client::{ClientConfig, Tls};
///
/// let ca = std::fs::read("ca.pem").unwrap();
/// let config = ClientConfig::new("mq.example.com:8081").with_tls(Tls::CaPem(ca));
/// ```
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Tls {
    /// Plaintext HTTP/2 (h2c).
    Off,
    /// TLS, accepting any server certificate: encrypted, but not authenticated (what the
    /// official clients do by default).
    TrustAll,
    /// TLS, accepting only certificates that chain to one of these PEM CA certificates and
    /// name the endpoint's host.
    CaPem(Vec<u8>),
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Off => f.write_str("Off"),
            Self::TrustAll => f.write_str("TrustAll"),
            Self::CaPem(pem) => write!(f, "CaPem({} bytes)", pem.len()),
        }
    }
}

/// An access key and its secret; requests are signed with
/// `MQv2-HMAC-SHA1 Credential=<key>, SignedHeaders=x-mq-date-time, Signature=<hex>`.
///
/// `Debug` does not show the secret.
///
/// # Example
/// ```
/// let c = txmq_client::Credentials::new("AK", "SK");
/// assert_eq!(c.access_key(), "AK");
/// assert!(!format!("{c:?}").contains("SK"));
/// ```
#[derive(Clone)]
pub struct Credentials {
    access_key: String,
    secret: String,
}

impl Credentials {
    /// Credentials of `access_key` with `secret`.
    pub fn new(access_key: impl Into<String>, secret: impl Into<String>) -> Self {
        Self {
            access_key: access_key.into(),
            secret: secret.into(),
        }
    }

    /// The access key (sent in the clear).
    pub fn access_key(&self) -> &str {
        &self.access_key
    }

    pub(crate) fn secret(&self) -> &str {
        &self.secret
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key", &self.access_key)
            .finish_non_exhaustive()
    }
}
