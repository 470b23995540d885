//! The txmq and Kafka sinks against real brokers in process: a txmq broker in a temporary
//! directory, and librdkafka's mock Kafka cluster. Nothing external is needed.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::time::{Duration, Instant};

use txmq_outbox::{OutboxRow, Sink, SinkError};

/// Runs a test body with a bound on its duration.
async fn within<T>(secs: u64, body: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), body)
        .await
        .expect("the test finished in time")
}

/// `n` rows spread over `topics`, each with a key, two headers and a distinct payload.
fn rows(n: usize, topics: &[&str]) -> Vec<OutboxRow> {
    (0..n)
        .map(|i| {
            let mut headers = BTreeMap::new();
            headers.insert("content-type".to_string(), "application/json".to_string());
            headers.insert("row".to_string(), i.to_string());
            OutboxRow {
                seq: i as i64 + 1,
                id: format!("row-{i:05}-{}", uuid_like(i)),
                destination: topics[i % topics.len()].to_string(),
                key: (i % 7 != 0).then(|| format!("order-{}", i % 13)),
                headers,
                payload: format!("{{\"n\":{i}}}").into_bytes(),
                attempts: 0,
                created_at_ms: 0,
            }
        })
        .collect()
}

fn uuid_like(i: usize) -> String {
    format!("{:016x}", (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

/// A local port nothing listens on.
async fn closed_port() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("local addr").port();
    drop(listener);
    port
}

fn all_ok(results: &[Result<(), SinkError>]) {
    let failed: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{} rows failed, e.g. {:?}",
        failed.len(),
        failed.first()
    );
}

mod txmq {
    use super::*;

    use txmq_broker::BrokerConfig;
    use txmq_broker::server::Server;
    use txmq_client::{ClientConfig, MessageView, SimpleConsumer, Subscription};
    use txmq_outbox::sink::txmq::{MESSAGE_ID_PROPERTY, TxmqSink};

    async fn start(dir: &std::path::Path, listen: &str) -> Server {
        start_with(dir, listen, BrokerConfig::default().max_body_size).await
    }

    async fn start_with(dir: &std::path::Path, listen: &str, max_body_size: usize) -> Server {
        Server::start(BrokerConfig {
            data_dir: dir.to_path_buf(),
            listen: listen.into(),
            http: "127.0.0.1:0".into(),
            segment_size: 8 << 20,
            max_body_size,
            ..BrokerConfig::default()
        })
        .await
        .expect("broker starts")
    }

    /// Receives (and acks) from `topic` until `n` messages arrived, then checks that no more
    /// come.
    async fn drain(server: &Server, topic: &str, n: usize) -> Vec<MessageView> {
        let config = ClientConfig::new(server.grpc_addr.to_string())
            .with_long_polling_timeout(Duration::from_secs(1));
        let consumer = SimpleConsumer::connect(config, "checker", [Subscription::all(topic)])
            .await
            .expect("consumer connects");
        let mut out = Vec::new();
        let mut quiet = 0;
        while out.len() < n || quiet < 2 {
            let got = consumer
                .receive(32, Duration::from_secs(30))
                .await
                .expect("receive");
            if got.is_empty() {
                quiet += 1;
            }
            for m in &got {
                consumer.ack(m).await.expect("ack");
            }
            out.extend(got);
        }
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rows_arrive_once_with_id_key_headers_and_payload() {
        let dir = tempfile::tempdir().expect("tempdir");
        let server = start(dir.path(), "127.0.0.1:0").await;
        within(120, async {
            let url = format!("txmq://{}", server.grpc_addr);
            let sink = txmq_outbox::sink::connect(&url)
                .await
                .expect("sink connects");
            assert_eq!(sink.name(), "txmq");
            let topics = ["orders", "payments", "shipments"];
            let rows = rows(1000, &topics);
            // Two calls of 500 rows, as a relay would make them.
            let started = Instant::now();
            for half in rows.chunks(500) {
                let results = sink.publish(half).await;
                assert_eq!(results.len(), half.len());
                all_ok(&results);
            }
            eprintln!("1000 rows published in {:?}", started.elapsed());

            let expected: HashMap<&str, &OutboxRow> =
                rows.iter().map(|r| (r.id.as_str(), r)).collect();
            let mut seen = HashMap::new();
            for topic in topics {
                let n = rows.iter().filter(|r| r.destination == topic).count();
                for m in drain(&server, topic, n).await {
                    assert!(!m.corrupted());
                    let id = m.properties()[MESSAGE_ID_PROPERTY].clone();
                    let row = expected[id.as_str()];
                    assert_eq!(m.topic(), row.destination);
                    assert_eq!(m.body(), row.payload);
                    let mut keys = vec![row.id.clone()];
                    keys.extend(row.key.clone());
                    assert_eq!(m.keys(), keys);
                    let mut props: HashMap<String, String> =
                        row.headers.clone().into_iter().collect();
                    props.insert(MESSAGE_ID_PROPERTY.into(), row.id.clone());
                    assert_eq!(m.properties(), &props);
                    *seen.entry(id).or_insert(0) += 1;
                }
            }
            assert_eq!(seen.len(), rows.len(), "every row arrived");
            assert!(seen.values().all(|&n| n == 1), "no row arrived twice");
        })
        .await;
        server.stop().await.expect("broker stops");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bad_topics_and_rows_fail_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let server = start_with(dir.path(), "127.0.0.1:0", 1024).await;
        within(60, async {
            let sink = TxmqSink::connect(&format!("txmq://{}", server.grpc_addr))
                .await
                .expect("sink connects");
            let long = "t".repeat(200);
            let mut rows = rows(12, &["good", "has space", &long]);
            rows[3].payload.clear(); // a good topic, but an empty body
            rows[6].payload = vec![b'x'; 2048]; // a good topic, but a body over the limit
            let results = sink.publish(&rows).await;
            let mut shown = std::collections::HashSet::new();
            for (row, r) in rows.iter().zip(&results) {
                let bad = row.destination != "good" || !(1..=1024).contains(&row.payload.len());
                match r {
                    Ok(()) => assert!(!bad, "row {} to {:?} passed", row.id, row.destination),
                    Err(e) => {
                        assert!(bad, "row {} failed: {e}", row.id);
                        assert!(e.0.contains("txmq sink"), "{e}");
                        if shown.insert(e.0.clone()) {
                            eprintln!("{e}");
                        }
                    }
                }
            }
            let good = results.iter().filter(|r| r.is_ok()).count();
            assert_eq!(good, 2);
            assert_eq!(drain(&server, "good", good).await.len(), good);
        })
        .await;
        server.stop().await.expect("broker stops");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn closed_port_fails_in_bounded_time() {
        let port = closed_port().await;
        let started = Instant::now();
        let err = within(30, TxmqSink::connect(&format!("txmq://127.0.0.1:{port}")))
            .await
            .expect_err("nothing listens");
        assert!(err.0.contains(&format!("127.0.0.1:{port}")), "{err}");
        assert!(started.elapsed() < Duration::from_secs(20));
        assert!(TxmqSink::connect("txmq://nohost").await.is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn broker_restart_fails_rows_then_recovers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let server = start(dir.path(), "127.0.0.1:0").await;
        let addr = server.grpc_addr;
        let sink = TxmqSink::connect(&format!("txmq://{addr}"))
            .await
            .expect("sink connects");
        let rows = rows(20, &["orders"]);
        within(30, async { all_ok(&sink.publish(&rows[..10]).await) }).await;
        server.stop().await.expect("broker stops");

        let started = Instant::now();
        let results = within(45, sink.publish(&rows[10..])).await;
        assert!(results.iter().all(Result::is_err), "{results:?}");
        assert!(started.elapsed() < Duration::from_secs(40));
        eprintln!("{:?}", results[0]);

        let server = start(dir.path(), &addr.to_string()).await;
        within(60, async {
            let results = loop {
                let results = sink.publish(&rows[10..]).await;
                if results.iter().all(Result::is_ok) {
                    break results;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            };
            assert_eq!(results.len(), 10);
            // At least the 20 rows (a row whose outcome was unknown may come twice).
            assert!(drain(&server, "orders", 20).await.len() >= 20);
        })
        .await;
        server.stop().await.expect("broker stops");
    }
}

#[cfg(feature = "kafka")]
mod kafka {
    use super::*;

    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::message::{BorrowedMessage, Headers, Message};
    use rdkafka::mocking::MockCluster;
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    use rdkafka::{ClientConfig, Offset, TopicPartitionList};
    use txmq_outbox::sink::kafka::{KafkaSink, MESSAGE_ID_HEADER};

    const PARTITIONS: i32 = 3;

    /// Reads `n` records of `topics` from the beginning.
    async fn consume(bootstrap: &str, topics: &[&str], n: usize) -> Vec<Record> {
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", "checker")
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .create()
            .expect("consumer");
        let mut assignment = TopicPartitionList::new();
        for topic in topics {
            for p in 0..PARTITIONS {
                assignment
                    .add_partition_offset(topic, p, Offset::Beginning)
                    .expect("partition");
            }
        }
        consumer.assign(&assignment).expect("assign");
        let mut out = Vec::new();
        while out.len() < n {
            let m = consumer.recv().await.expect("record");
            out.push(Record::of(&m));
        }
        out
    }

    #[derive(Debug)]
    struct Record {
        topic: String,
        key: Option<String>,
        payload: Vec<u8>,
        headers: BTreeMap<String, String>,
    }

    impl Record {
        fn of(m: &BorrowedMessage<'_>) -> Self {
            let headers = m
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| {
                            let value = h.value.map(|v| String::from_utf8_lossy(v).into_owned());
                            (h.key.to_string(), value.unwrap_or_default())
                        })
                        .collect()
                })
                .unwrap_or_default();
            Self {
                topic: m.topic().to_string(),
                key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                payload: m.payload().unwrap_or_default().to_vec(),
                headers,
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rows_arrive_with_id_header_key_headers_and_payload() {
        let cluster = MockCluster::new(3).expect("mock cluster");
        let topics = ["orders", "payments"];
        for t in topics {
            cluster.create_topic(t, PARTITIONS, 3).expect("topic");
        }
        let bootstrap = cluster.bootstrap_servers();
        within(60, async {
            let sink = txmq_outbox::sink::connect(&format!("kafka://{bootstrap}"))
                .await
                .expect("sink connects");
            assert_eq!(sink.name(), "kafka");
            let rows = rows(100, &topics);
            let results = sink.publish(&rows).await;
            assert_eq!(results.len(), rows.len());
            all_ok(&results);

            let expected: HashMap<&str, &OutboxRow> =
                rows.iter().map(|r| (r.id.as_str(), r)).collect();
            let mut seen = HashMap::new();
            for rec in consume(&bootstrap, &topics, rows.len()).await {
                let id = rec.headers[MESSAGE_ID_HEADER].clone();
                let row = expected[id.as_str()];
                assert_eq!(rec.topic, row.destination);
                assert_eq!(rec.key, row.key);
                assert_eq!(rec.payload, row.payload);
                let mut headers = row.headers.clone();
                headers.insert(MESSAGE_ID_HEADER.into(), row.id.clone());
                assert_eq!(rec.headers, headers);
                *seen.entry(id).or_insert(0) += 1;
            }
            assert_eq!(seen.len(), rows.len());
            assert!(seen.values().all(|&n| n == 1));
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn produce_errors_fail_rows_then_the_sink_recovers() {
        let cluster = MockCluster::new(1).expect("mock cluster");
        cluster
            .create_topic("orders", PARTITIONS, 1)
            .expect("topic");
        let bootstrap = cluster.bootstrap_servers();
        let sink = KafkaSink::connect(&format!("kafka://{bootstrap}?message.timeout.ms=3000"))
            .await
            .expect("sink connects");
        let rows = rows(10, &["orders"]);
        // Warm up: metadata and producer id.
        within(30, async { all_ok(&sink.publish(&rows[..2]).await) }).await;

        // Every Produce request is refused with a permanent error.
        cluster.request_errors(
            RDKafkaApiKey::Produce,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 64],
        );
        let started = Instant::now();
        let results = within(30, sink.publish(&rows[2..6])).await;
        assert!(results.iter().all(Result::is_err), "{results:?}");
        let e = results[0].as_ref().expect_err("failed");
        assert!(e.0.contains("kafka sink") && e.0.contains("orders"), "{e}");
        eprintln!("{e} (after {:?})", started.elapsed());

        cluster.clear_request_errors(RDKafkaApiKey::Produce);
        within(60, async {
            loop {
                let results = sink.publish(&rows[6..]).await;
                if results.iter().all(Result::is_ok) {
                    break;
                }
                eprintln!("not yet recovered: {:?}", results[0]);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
        .await;
        let got = within(30, consume(&bootstrap, &["orders"], 6)).await;
        let ids: Vec<&str> = got
            .iter()
            .map(|r| r.headers[MESSAGE_ID_HEADER].as_str())
            .collect();
        for row in rows[..2].iter().chain(&rows[6..]) {
            assert!(ids.contains(&row.id.as_str()), "{} is missing", row.id);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unreachable_cluster_fails_rows_within_the_message_timeout() {
        let port = closed_port().await;
        let sink = KafkaSink::connect(&format!("kafka://127.0.0.1:{port}?message.timeout.ms=2000"))
            .await
            .expect("connecting is lazy");
        let rows = rows(5, &["orders"]);
        let started = Instant::now();
        let results = within(20, sink.publish(&rows)).await;
        let elapsed = started.elapsed();
        assert!(results.iter().all(Result::is_err), "{results:?}");
        assert!(elapsed < Duration::from_secs(10), "{elapsed:?}");
        let e = results[0].as_ref().expect_err("failed");
        assert!(e.0.contains(&format!("127.0.0.1:{port}")), "{e}");
        eprintln!("{e} (after {elapsed:?})");
    }

    #[tokio::test]
    async fn bad_urls_are_refused() {
        for url in [
            "kafka://",
            "kafka://h:1?acks=1",
            "kafka://h:1?message.timeout.ms=0",
            "kafka://h:1?no.such.property=1",
        ] {
            let e = KafkaSink::connect(url).await.expect_err(url);
            assert!(e.0.contains("kafka sink"), "{e}");
        }
    }

    /// librdkafka goes on delivering a record after the relay stops waiting: a relay
    /// refuses a publish timeout shorter than that, and the defaults fit together.
    #[tokio::test]
    async fn a_relay_waits_as_long_as_librdkafka_may_deliver() {
        use txmq_outbox::{Relay, RelayConfig, RelayConfigError};

        let pool = sqlx::SqlitePool::connect_lazy("sqlite::memory:").unwrap();
        let port = closed_port().await;
        let sink = |query: &'static str| async move {
            Box::new(
                KafkaSink::connect(&format!("kafka://127.0.0.1:{port}{query}"))
                    .await
                    .unwrap(),
            )
        };
        let defaults = sink("").await;
        assert_eq!(defaults.longest_publish(), Some(Duration::from_secs(30)));
        assert!(Relay::new(pool.clone(), defaults, RelayConfig::default()).is_ok());

        let e = Relay::new(
            pool.clone(),
            sink("?message.timeout.ms=60000").await,
            RelayConfig::default(),
        )
        .err()
        .expect("a 30 s publish timeout is refused");
        assert_eq!(
            e,
            RelayConfigError::PublishTimeoutBelowSink {
                sink: "kafka",
                longest: Duration::from_secs(70),
                publish_timeout: Duration::from_secs(30),
            }
        );
        assert!(e.to_string().contains("publish_timeout (30s)"), "{e}");
        let longer = RelayConfig {
            publish_timeout: Duration::from_secs(70),
            lease: Duration::from_secs(80),
            ..RelayConfig::default()
        };
        assert!(Relay::new(pool, sink("?message.timeout.ms=60000").await, longer).is_ok());
    }
}
