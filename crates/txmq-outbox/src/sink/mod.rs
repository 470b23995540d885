//! Where the relay publishes: a [`Sink`] confirms each row durably before the relay marks
//! it delivered.

use crate::OutboxRow;

/// A boxed future, as [`Sink::publish`] returns.
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// Why a row was not published. The relay retries it with backoff and, after the maximum
/// attempts, marks it dead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SinkError(pub String);

impl SinkError {
    /// An error with `message`.
    pub fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}

/// A broker the relay publishes to.
///
/// `publish` returns one result per row, in order: `Ok` only once the broker confirmed the
/// row durably (as durably as the broker is configured to be), carrying the row's id for
/// deduplication. Rows of one call have distinct ordered keys, so the sink may publish them
/// concurrently. A sink reconnects by itself after a failure.
pub trait Sink: Send + Sync + 'static {
    /// A short name for logs and metrics, e.g. `rabbitmq`.
    fn name(&self) -> &'static str;

    /// Publishes `rows`; one result per row, in order.
    fn publish<'a>(&'a self, rows: &'a [OutboxRow]) -> BoxFuture<'a, Vec<Result<(), SinkError>>>;

    /// How long a row may still go out after `publish` began, where the broker's client
    /// keeps trying on its own once the call is dropped (Kafka: librdkafka delivers until
    /// `message.timeout.ms`). A relay refuses a `publish_timeout` shorter than this: it
    /// would count such rows failed and publish them again while the first try may still
    /// land. `None` (the default): no client-side retry goes on once the call is dropped
    /// (what was already sent may still arrive).
    fn longest_publish(&self) -> Option<std::time::Duration> {
        None
    }
}

/// `url` with the secret of its user info replaced by `***`, for messages: the password,
/// and with `bare_user_is_secret` a user info without a password too (a NATS token, a
/// Redis password). A URL without user info is left as it is.
///
/// # Example
/// ```
/// use txmq_outbox::sink::redact_url;
///
/// assert_eq!(redact_url("amqp://guest:secret@h:5672/%2f", false), "amqp://guest:***@h:5672/%2f");
/// assert_eq!(redact_url("postgres://app@db/shop", false), "postgres://app@db/shop");
/// assert_eq!(redact_url("nats://token@h:4222", true), "nats://***@h:4222");
/// ```
pub fn redact_url(url: &str, bare_user_is_secret: bool) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}{tail}"),
            None if bare_user_is_secret => format!("{scheme}://***@{host}{tail}"),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn secrets_are_left_out_of_messages() {
        for (url, token, shown) in [
            (
                "amqp://guest:guest@127.0.0.1:5672/%2f",
                false,
                "amqp://guest:***@127.0.0.1:5672/%2f",
            ),
            (
                "postgres://app:s3cret@db:5432/orders?sslmode=disable",
                false,
                "postgres://app:***@db:5432/orders?sslmode=disable",
            ),
            (
                "postgres://postgres@127.0.0.1:5432/test",
                false,
                "postgres://postgres@127.0.0.1:5432/test",
            ),
            ("nats://u:p@h:4222", true, "nats://u:***@h:4222"),
            ("nats://tok@h:4222", true, "nats://***@h:4222"),
            ("redis://:pw@h:6379/2", true, "redis://:***@h:6379/2"),
            ("redis://h:6379/0", true, "redis://h:6379/0"),
            ("127.0.0.1:4222", false, "127.0.0.1:4222"),
            ("sqlite://x.db", false, "sqlite://x.db"),
        ] {
            assert_eq!(redact_url(url, token), shown, "{url}");
        }
    }
}

pub mod kafka;
pub mod nats;
pub mod rabbitmq;
pub mod redis;
pub mod txmq;

/// Connects the sink a URL names:
///
/// | URL | sink | destination is |
/// |---|---|---|
/// | `txmq://HOST:PORT` | [`txmq::TxmqSink`] | a topic |
/// | `amqp://USER:PASS@HOST:PORT/VHOST[?exchange=NAME]` | [`rabbitmq::RabbitMqSink`] | a routing key |
/// | `nats://HOST:PORT` | [`nats::NatsSink`] | a subject of a JetStream stream |
/// | `redis://HOST:PORT[/DB]` | [`redis::RedisSink`] | a stream key |
/// | `kafka://HOST:PORT[,HOST:PORT...]` | [`kafka::KafkaSink`] | a topic |
///
/// # Errors
/// An unknown scheme, or the sink's connection error.
pub async fn connect(url: &str) -> Result<Box<dyn Sink>, SinkError> {
    let scheme = url.split("://").next().unwrap_or_default();
    Ok(match scheme {
        "txmq" => Box::new(txmq::TxmqSink::connect(url).await?),
        "amqp" | "amqps" => Box::new(rabbitmq::RabbitMqSink::connect(url).await?),
        "nats" => Box::new(nats::NatsSink::connect(url).await?),
        "redis" => Box::new(redis::RedisSink::connect(url).await?),
        "kafka" => Box::new(kafka::KafkaSink::connect(url).await?),
        _ => {
            return Err(SinkError::new(format!(
                "unknown sink URL {url:?}: use txmq://, amqp://, nats://, redis:// or kafka://"
            )));
        }
    })
}
