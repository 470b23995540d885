//! The Kafka sink: rows become records of a Kafka topic, produced with rdkafka's
//! `FutureProducer` (librdkafka). Needs the `kafka` feature (on by default); without it,
//! [`KafkaSink::connect`] fails with "built without the kafka feature".
//!
//! # Guarantees
//!
//! The producer runs with `acks=all` and `enable.idempotence=true`: a row is `Ok` only once
//! every in-sync replica of its partition has the record, and librdkafka's retries within
//! one producer session never duplicate or reorder records. The rows of one call are
//! produced concurrently and each delivery report is awaited, at most
//! `message.timeout.ms` (20 s by default) plus 10 s: 5 s for room in librdkafka's queue and
//! 5 s for the report. A relay's `publish_timeout` must be at least that (30 s by default),
//! since librdkafka goes on delivering a record after the relay stops waiting.
//!
//! A row becomes a record:
//!
//! | row | record |
//! |---|---|
//! | `destination` | topic |
//! | `key` | key (none: librdkafka's partitioner spreads the records) |
//! | `headers` | headers |
//! | `id` | header [`MESSAGE_ID_HEADER`] |
//! | `payload` | value |
//!
//! A row may still be published twice (the relay retries a row whose outcome it did not
//! learn, across producer sessions): consumers deduplicate by the [`MESSAGE_ID_HEADER`]
//! header.
//!
//! # URL
//!
//! `kafka://HOST:PORT[,HOST:PORT...][?NAME=VALUE&...]`: the hosts are `bootstrap.servers`;
//! each query parameter (percent-decoded) is a librdkafka producer property, e.g.
//! `?message.timeout.ms=5000&compression.type=lz4&linger.ms=10`. The properties the
//! guarantees rest on (`acks`, `enable.idempotence`, `transactional.id`) cannot be set, and
//! `message.timeout.ms` must be 1 to 300000 ms.
//!
//! After a fatal producer error (e.g. a fenced idempotent producer), the affected rows fail
//! and the next call creates a fresh producer.

#[cfg(feature = "kafka")]
pub use enabled::KafkaSink;

#[cfg(not(feature = "kafka"))]
pub use disabled::KafkaSink;

/// The record header carrying the row id, for deduplication by consumers.
pub const MESSAGE_ID_HEADER: &str = "txmq-message-id";

/// `message.timeout.ms` unless the URL sets it: how long librdkafka tries to deliver a record.
/// With the margins, a call takes at most 30 s, the relay's default `publish_timeout`.
pub const DEFAULT_MESSAGE_TIMEOUT_MS: u64 = 20_000;

/// Longest `message.timeout.ms` the URL may set.
pub const MAX_MESSAGE_TIMEOUT_MS: u64 = 300_000;

/// Producer properties the URL may not set.
const RESERVED: [&str; 5] = [
    "bootstrap.servers",
    "acks",
    "request.required.acks",
    "enable.idempotence",
    "transactional.id",
];

/// The parts of a `kafka://` URL: bootstrap servers and producer properties.
#[derive(Debug, Clone, PartialEq, Eq)]
struct KafkaUrl {
    servers: String,
    properties: Vec<(String, String)>,
    message_timeout_ms: u64,
}

fn parse_url(url: &str) -> Result<KafkaUrl, super::SinkError> {
    let bad = |reason: String| {
        super::SinkError::new(format!(
            "kafka sink: bad URL {url:?}: {reason} (expected kafka://HOST:PORT[,HOST:PORT...][?NAME=VALUE&...])"
        ))
    };
    let rest = url
        .strip_prefix("kafka://")
        .ok_or_else(|| bad("the scheme is not kafka".into()))?;
    let (hosts, query) = rest.split_once('?').unwrap_or((rest, ""));
    let hosts = hosts.strip_suffix('/').unwrap_or(hosts);
    if hosts.is_empty() || hosts.split(',').any(|h| h.trim().is_empty()) {
        return Err(bad("no host, or an empty one in the list".into()));
    }
    if hosts.contains(['/', '@', '#']) {
        return Err(bad("a path, user or fragment is not supported".into()));
    }
    let mut properties = vec![("message.timeout.ms".to_string(), String::new())];
    let mut message_timeout_ms = DEFAULT_MESSAGE_TIMEOUT_MS;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair
            .split_once('=')
            .ok_or_else(|| bad(format!("query parameter {pair:?} is not NAME=VALUE")))?;
        let name = percent_decode(name).ok_or_else(|| bad(format!("bad escape in {name:?}")))?;
        let value = percent_decode(value).ok_or_else(|| bad(format!("bad escape in {value:?}")))?;
        if RESERVED.contains(&name.as_str()) {
            return Err(bad(format!(
                "{name} cannot be set: the sink needs acks=all and enable.idempotence=true"
            )));
        }
        if name == "message.timeout.ms" || name == "delivery.timeout.ms" {
            message_timeout_ms = value
                .parse::<u64>()
                .ok()
                .filter(|ms| (1..=MAX_MESSAGE_TIMEOUT_MS).contains(ms))
                .ok_or_else(|| {
                    bad(format!(
                        "{name}={value:?} is not 1 to {MAX_MESSAGE_TIMEOUT_MS} ms"
                    ))
                })?;
            continue;
        }
        properties.push((name, value));
    }
    properties[0].1 = message_timeout_ms.to_string();
    Ok(KafkaUrl {
        servers: hosts.to_string(),
        properties,
        message_timeout_ms,
    })
}

/// `%XX` escapes (and `+` as a space) decoded; `None` for a bad escape or non-UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(feature = "kafka")]
mod enabled {
    use std::sync::{Arc, RwLock};
    use std::time::Duration;

    use futures::future::join_all;
    use rdkafka::ClientConfig;
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
    use rdkafka::util::Timeout;

    use super::{KafkaUrl, MESSAGE_ID_HEADER, parse_url};
    use crate::OutboxRow;
    use crate::sink::{BoxFuture, Sink, SinkError};

    /// How long a record may wait for room in librdkafka's local queue.
    const QUEUE_TIMEOUT: Duration = Duration::from_secs(5);

    /// Waited beyond `message.timeout.ms` for a delivery report before giving up on it.
    const REPORT_MARGIN: Duration = Duration::from_secs(5);

    /// Publishes rows to Kafka topics with an idempotent `acks=all` producer.
    ///
    /// # Example
    /// ```no_run
    /// # async fn f() -> Result<(), txmq_outbox::SinkError> {
    /// use txmq_outbox::Sink;
    /// use txmq_outbox::sink::kafka::KafkaSink;
    ///
    /// let sink = KafkaSink::connect("kafka://k1:9092,k2:9092?linger.ms=10").await?;
    /// assert_eq!(sink.name(), "kafka");
    /// # Ok(()) }
    /// ```
    pub struct KafkaSink {
        config: ClientConfig,
        servers: String,
        /// Longest wait for one row: queueing, `message.timeout.ms`, and a margin.
        bound: Duration,
        producer: RwLock<Arc<FutureProducer>>,
    }

    impl std::fmt::Debug for KafkaSink {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("KafkaSink")
                .field("bootstrap_servers", &self.servers)
                .field("bound", &self.bound)
                .finish_non_exhaustive()
        }
    }

    impl KafkaSink {
        /// Creates the producer of `url` (see the [module docs](super) for the URL). Kafka is
        /// not contacted yet: an unreachable cluster shows as failed rows.
        ///
        /// # Errors
        /// A malformed URL, a reserved or unknown producer property, or a bad value.
        pub async fn connect(url: &str) -> Result<Self, SinkError> {
            let KafkaUrl {
                servers,
                properties,
                message_timeout_ms,
            } = parse_url(url)?;
            let mut config = ClientConfig::new();
            config
                .set("bootstrap.servers", &servers)
                .set("enable.idempotence", "true")
                .set("acks", "all");
            for (name, value) in properties {
                config.set(name, value);
            }
            let producer = create(&config, &servers)?;
            Ok(Self {
                config,
                servers,
                bound: QUEUE_TIMEOUT + Duration::from_millis(message_timeout_ms) + REPORT_MARGIN,
                producer: RwLock::new(Arc::new(producer)),
            })
        }

        /// The bootstrap servers, as the URL lists them.
        pub fn bootstrap_servers(&self) -> &str {
            &self.servers
        }

        fn current(&self) -> Arc<FutureProducer> {
            self.producer
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
        }

        /// Replaces `failed` with a fresh producer, unless another call already did.
        fn replace(&self, failed: &Arc<FutureProducer>) {
            if !Arc::ptr_eq(&self.current(), failed) {
                return;
            }
            let fresh = match create(&self.config, &self.servers) {
                Ok(p) => Arc::new(p),
                Err(e) => {
                    tracing::warn!(error = %e, "kafka sink: cannot recreate the producer");
                    return;
                }
            };
            let mut slot = self.producer.write().unwrap_or_else(|e| e.into_inner());
            if Arc::ptr_eq(&slot, failed) {
                let old = std::mem::replace(&mut *slot, fresh);
                drop(slot);
                // Dropping a producer purges and flushes it for up to 500 ms: not on this task.
                drop(tokio::task::spawn_blocking(move || drop(old)));
            }
        }

        async fn produce(
            &self,
            producer: &FutureProducer,
            row: &OutboxRow,
        ) -> Result<(), SinkError> {
            let mut headers = OwnedHeaders::new_with_capacity(row.headers.len() + 1);
            for (name, value) in &row.headers {
                if name != MESSAGE_ID_HEADER {
                    headers = headers.insert(Header {
                        key: name,
                        value: Some(value.as_str()),
                    });
                }
            }
            headers = headers.insert(Header {
                key: MESSAGE_ID_HEADER,
                value: Some(row.id.as_str()),
            });
            let mut record = FutureRecord::<str, [u8]>::to(&row.destination)
                .payload(&row.payload)
                .headers(headers);
            if let Some(key) = row.key.as_deref() {
                record = record.key(key);
            }
            let send = producer.send(record, Timeout::After(QUEUE_TIMEOUT));
            let failed = |reason: String| {
                SinkError::new(format!(
                    "kafka sink: producing row {} to topic {:?} via {} failed: {reason}",
                    row.id, row.destination, self.servers
                ))
            };
            match tokio::time::timeout(self.bound, send).await {
                Ok(Ok(_delivery)) => Ok(()),
                Ok(Err((e, _record))) => Err(failed(e.to_string())),
                Err(_) => Err(failed(format!(
                    "no delivery report within {:?} (the outcome is unknown)",
                    self.bound
                ))),
            }
        }
    }

    fn create(config: &ClientConfig, servers: &str) -> Result<FutureProducer, SinkError> {
        config.create().map_err(|e| {
            SinkError::new(format!(
                "kafka sink: cannot create a producer for {servers}: {e}"
            ))
        })
    }

    impl Sink for KafkaSink {
        fn name(&self) -> &'static str {
            "kafka"
        }

        fn longest_publish(&self) -> Option<Duration> {
            Some(self.bound)
        }

        fn publish<'a>(
            &'a self,
            rows: &'a [OutboxRow],
        ) -> BoxFuture<'a, Vec<Result<(), SinkError>>> {
            Box::pin(async move {
                let producer = self.current();
                let results = join_all(rows.iter().map(|row| self.produce(&producer, row))).await;
                if let Some((code, reason)) = producer.client().fatal_error() {
                    tracing::warn!(
                        ?code,
                        %reason,
                        servers = %self.servers,
                        "kafka sink: fatal producer error; creating a new producer"
                    );
                    self.replace(&producer);
                }
                results
            })
        }
    }
}

#[cfg(not(feature = "kafka"))]
mod disabled {
    use crate::OutboxRow;
    use crate::sink::{BoxFuture, Sink, SinkError};

    /// The Kafka sink of a build without the `kafka` feature: it cannot be connected.
    #[derive(Debug)]
    pub struct KafkaSink {
        _never: std::convert::Infallible,
    }

    impl KafkaSink {
        /// Always fails: this build has no Kafka client.
        ///
        /// # Errors
        /// Always: "built without the kafka feature" (or the URL's error).
        pub async fn connect(url: &str) -> Result<Self, SinkError> {
            super::parse_url(url)?;
            Err(SinkError::new(format!(
                "kafka sink: cannot connect to {url:?}: txmq-outbox was built without the kafka feature"
            )))
        }
    }

    impl Sink for KafkaSink {
        fn name(&self) -> &'static str {
            "kafka"
        }

        fn publish<'a>(
            &'a self,
            _rows: &'a [OutboxRow],
        ) -> BoxFuture<'a, Vec<Result<(), SinkError>>> {
            match self._never {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_give_servers_and_properties() {
        let u = parse_url("kafka://a:9092,b:9093?linger.ms=10&client.id=outbox%20relay").unwrap();
        assert_eq!(u.servers, "a:9092,b:9093");
        assert_eq!(u.message_timeout_ms, DEFAULT_MESSAGE_TIMEOUT_MS);
        assert_eq!(
            u.properties,
            [
                ("message.timeout.ms".to_string(), "20000".to_string()),
                ("linger.ms".into(), "10".into()),
                ("client.id".into(), "outbox relay".into()),
            ]
        );
        let u = parse_url("kafka://a:9092/?message.timeout.ms=2000").unwrap();
        assert_eq!(u.message_timeout_ms, 2000);
        assert_eq!(u.properties, [("message.timeout.ms".into(), "2000".into())]);
        for bad in [
            "kafka://",
            "kafka://a:1,,b:2",
            "nats://a:1",
            "kafka://a:1?acks=1",
            "kafka://a:1?enable.idempotence=false",
            "kafka://a:1?message.timeout.ms=0",
            "kafka://a:1?message.timeout.ms=x",
            "kafka://a:1?linger.ms",
            "kafka://a:1?x=%zz",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    #[cfg(not(feature = "kafka"))]
    #[tokio::test]
    async fn without_the_feature_connecting_fails_clearly() {
        let e = crate::sink::connect("kafka://localhost:9092")
            .await
            .err()
            .map(|e| e.0);
        assert!(
            e.as_deref()
                .is_some_and(|e| e.contains("built without the kafka feature")),
            "{e:?}"
        );
    }
}
