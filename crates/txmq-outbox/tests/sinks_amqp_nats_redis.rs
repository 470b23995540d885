//! The RabbitMQ, NATS JetStream and Redis Streams sinks against the real services on this
//! machine: RabbitMQ at 127.0.0.1:5672 (guest/guest), NATS with JetStream at
//! 127.0.0.1:4222, Redis at 127.0.0.1:6379.
//!
//! Each test makes its own uniquely named queue, exchange, stream or key and deletes it at
//! the end, also when the test fails. A service that cannot be reached skips its tests
//! (they print "skipping"), except with `CI=true`, where they fail.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use futures::FutureExt;
use lapin::options::{
    BasicGetOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use txmq_outbox::sink::nats::NatsSink;
use txmq_outbox::sink::rabbitmq::RabbitMqSink;
use txmq_outbox::sink::redis::RedisSink;
use txmq_outbox::{OutboxRow, Sink, SinkError};

const RABBITMQ_ADDR: &str = "127.0.0.1:5672";
const RABBITMQ_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const NATS_ADDR: &str = "127.0.0.1:4222";
const NATS_URL: &str = "nats://127.0.0.1:4222";
const REDIS_ADDR: &str = "127.0.0.1:6379";
const REDIS_URL: &str = "redis://127.0.0.1:6379";

/// How many rows a batch test publishes in one call.
const BATCH: usize = 100;

/// A sink must answer (connect or publish) within this even when the broker is gone: its
/// 10 s timeout plus slack.
const ANSWER_WITHIN: Duration = Duration::from_secs(15);

/// Whether `service` answers at `addr`; prints "skipping" when not, panics when not and
/// `CI=true`.
async fn available(service: &str, addr: &str) -> bool {
    let up = matches!(
        tokio::time::timeout(Duration::from_secs(3), tokio::net::TcpStream::connect(addr)).await,
        Ok(Ok(_))
    );
    if !up {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{service} at {addr} is not reachable, and CI=true");
        }
        eprintln!("skipping: {service} at {addr} is not reachable");
    }
    up
}

/// Runs `body`, then `cleanup` whatever `body` did, then re-raises a panic of `body`.
async fn with_cleanup(body: impl Future<Output = ()>, cleanup: impl Future<Output = ()>) {
    let outcome = AssertUnwindSafe(body).catch_unwind().await;
    cleanup.await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

/// A name no other test run uses.
fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::now_v7().simple())
}

/// A port on 127.0.0.1 where nothing listens.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local address").port()
}

/// Row `i` of a batch to `destination`: every third row has no key, every row has two
/// headers, the payload is binary.
fn row(i: usize, destination: &str) -> OutboxRow {
    let mut headers = BTreeMap::new();
    headers.insert(
        "content-type".to_string(),
        "application/octet-stream".to_string(),
    );
    headers.insert("n".to_string(), format!("{i} (é)"));
    OutboxRow {
        seq: i as i64 + 1,
        id: uuid::Uuid::now_v7().to_string(),
        destination: destination.to_string(),
        key: (!i.is_multiple_of(3)).then(|| format!("order-{i}")),
        headers,
        payload: [format!("payload {i} ").as_bytes(), &[0, 0xff, 0x80]].concat(),
        attempts: 0,
        created_at_ms: 1_700_000_000_000 + i as i64,
    }
}

/// Asserts every result is `Ok`, naming the first failure.
fn assert_all_ok(results: &[Result<(), SinkError>], rows: &[OutboxRow]) {
    assert_eq!(results.len(), rows.len(), "one result per row");
    for (r, row) in results.iter().zip(rows) {
        if let Err(e) = r {
            panic!("row {} failed: {e}", row.id);
        }
    }
}

/// Runs `f` and asserts it finishes within [`ANSWER_WITHIN`].
async fn answers_in_time<T>(what: &str, f: impl Future<Output = T>) -> T {
    let started = Instant::now();
    let out = tokio::time::timeout(ANSWER_WITHIN, f)
        .await
        .unwrap_or_else(|_| panic!("{what} hung for more than {ANSWER_WITHIN:?}"));
    eprintln!("{what} answered in {:?}", started.elapsed());
    out
}

// ---------------------------------------------------------------------------- RabbitMQ

/// An admin connection and channel to the test RabbitMQ.
async fn rabbit_admin() -> (Connection, Channel) {
    let connection = Connection::connect(RABBITMQ_URL, ConnectionProperties::default())
        .await
        .expect("connect to RabbitMQ");
    let channel = connection.create_channel().await.expect("open a channel");
    (connection, channel)
}

async fn declare_queue(channel: &Channel, queue: &str) {
    channel
        .queue_declare(
            ShortString::from(queue),
            QueueDeclareOptions::durable(),
            FieldTable::default(),
        )
        .await
        .expect("declare the queue");
}

/// Every message in `queue`, taken with basic.get.
async fn drain_queue(channel: &Channel, queue: &str) -> Vec<lapin::message::Delivery> {
    let mut out = Vec::new();
    while let Some(m) = channel
        .basic_get(ShortString::from(queue), BasicGetOptions { no_ack: true })
        .await
        .expect("basic.get")
    {
        out.push(m.delivery);
    }
    out
}

/// The string value of AMQP header `name`.
fn amqp_header(delivery: &lapin::message::Delivery, name: &str) -> Option<String> {
    let headers = delivery.properties.headers().as_ref()?;
    match headers.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        other => panic!("header {name} is not a long string: {other:?}"),
    }
}

/// Asserts `deliveries` are exactly `rows`, each once, with id, key, headers and payload.
fn assert_amqp_rows(deliveries: &[lapin::message::Delivery], rows: &[&OutboxRow]) {
    assert_eq!(deliveries.len(), rows.len(), "each row once in the queue");
    let by_id: HashMap<&str, &OutboxRow> = rows.iter().map(|r| (r.id.as_str(), *r)).collect();
    let mut seen = std::collections::HashSet::new();
    for d in deliveries {
        let id = d
            .properties
            .message_id()
            .as_ref()
            .expect("message_id is set")
            .as_str();
        let row = by_id
            .get(id)
            .unwrap_or_else(|| panic!("unknown message id {id}"));
        assert!(seen.insert(id), "message {id} twice");
        assert_eq!(d.properties.delivery_mode(), &Some(2), "persistent");
        assert_eq!(d.data, row.payload, "payload of {id}");
        assert_eq!(amqp_header(d, "txmq-key"), row.key, "key of {id}");
        for (name, value) in &row.headers {
            assert_eq!(
                amqp_header(d, name).as_ref(),
                Some(value),
                "header {name} of {id}"
            );
        }
    }
}

/// Runs `body` with an admin channel and a fresh durable queue, then deletes the queue and
/// closes the admin connection, whatever `body` did. RabbitMQ down: skipped (failed under
/// `CI=true`).
async fn with_rabbit_queue<F, Fut>(body: F)
where
    F: FnOnce(Channel, String) -> Fut,
    Fut: Future<Output = ()>,
{
    if !available("RabbitMQ", RABBITMQ_ADDR).await {
        return;
    }
    let (connection, admin) = rabbit_admin().await;
    let queue = unique("txmq-outbox-test");
    declare_queue(&admin, &queue).await;
    with_cleanup(body(admin.clone(), queue.clone()), async {
        let _ = admin
            .queue_delete(
                ShortString::from(queue.as_str()),
                QueueDeleteOptions::default(),
            )
            .await;
        let _ = connection.close(200, ShortString::from("done")).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rabbitmq_batch_is_confirmed_and_read_back() {
    with_rabbit_queue(|admin, queue| async move {
        let sink = RabbitMqSink::connect(RABBITMQ_URL)
            .await
            .expect("connect the sink");
        assert_eq!(sink.name(), "rabbitmq");
        let rows: Vec<OutboxRow> = (0..BATCH).map(|i| row(i, &queue)).collect();
        let results = answers_in_time("publish", sink.publish(&rows)).await;
        assert_all_ok(&results, &rows);
        let deliveries = drain_queue(&admin, &queue).await;
        assert_amqp_rows(&deliveries, &rows.iter().collect::<Vec<_>>());
        // An empty call publishes nothing.
        assert!(sink.publish(&[]).await.is_empty());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rabbitmq_unroutable_row_fails_alone_and_channel_recovers() {
    if !available("RabbitMQ", RABBITMQ_ADDR).await {
        return;
    }
    let (connection, admin) = rabbit_admin().await;
    let exchange = unique("txmq-outbox-test-x");
    let queue = unique("txmq-outbox-test-q");
    let declare_exchange = || async {
        admin
            .exchange_declare(
                ShortString::from(exchange.as_str()),
                ExchangeKind::Direct,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("declare the exchange");
        admin
            .queue_bind(
                ShortString::from(queue.as_str()),
                ShortString::from(exchange.as_str()),
                ShortString::from("routed"),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind the queue");
    };
    declare_queue(&admin, &queue).await;
    declare_exchange().await;
    let body = async {
        let url = format!("{RABBITMQ_URL}?exchange={exchange}");
        let sink = RabbitMqSink::connect(&url).await.expect("connect the sink");
        // Every fourth row goes to a routing key no queue is bound to.
        let unroutable = |i: usize| i % 4 == 1;
        let rows: Vec<OutboxRow> = (0..40)
            .map(|i| {
                if unroutable(i) {
                    row(i, &format!("unbound-{i}"))
                } else {
                    row(i, "routed")
                }
            })
            .collect();
        let results = answers_in_time("publish", sink.publish(&rows)).await;
        assert_eq!(results.len(), rows.len());
        for (i, (r, row)) in results.iter().zip(&rows).enumerate() {
            if unroutable(i) {
                let e = r.as_ref().expect_err("an unroutable row fails");
                assert!(
                    e.0.contains("unroutable") && e.0.contains(&row.id),
                    "names the failure: {e}"
                );
                assert!(
                    e.0.contains(&exchange) && e.0.contains(&row.destination),
                    "{e}"
                );
            } else if let Err(e) = r {
                panic!("routed row {i} failed: {e}");
            }
        }
        let routed: Vec<&OutboxRow> = rows
            .iter()
            .enumerate()
            .filter(|(i, _)| !unroutable(*i))
            .map(|(_, r)| r)
            .collect();
        assert_amqp_rows(&drain_queue(&admin, &queue).await, &routed);

        // The exchange disappears: RabbitMQ closes the sink's channel, the row fails.
        admin
            .exchange_delete(
                ShortString::from(exchange.as_str()),
                ExchangeDeleteOptions::default(),
            )
            .await
            .expect("delete the exchange");
        let lost = vec![row(100, "routed")];
        let results = answers_in_time("publish to a deleted exchange", sink.publish(&lost)).await;
        let e = results[0].as_ref().expect_err("no exchange, no delivery");
        eprintln!("publish to a deleted exchange: {e}");
        // Back again: the next call opens a fresh channel and succeeds.
        declare_exchange().await;
        let again = vec![row(101, "routed")];
        let results = answers_in_time("publish after recovery", sink.publish(&again)).await;
        assert_all_ok(&results, &again);
        assert_amqp_rows(&drain_queue(&admin, &queue).await, &[&again[0]]);
    };
    with_cleanup(body, async {
        let _ = admin
            .queue_delete(
                ShortString::from(queue.as_str()),
                QueueDeleteOptions::default(),
            )
            .await;
        let _ = admin
            .exchange_delete(
                ShortString::from(exchange.as_str()),
                ExchangeDeleteOptions::default(),
            )
            .await;
        let _ = connection.close(200, ShortString::from("done")).await;
    })
    .await;
}

/// A call dropped before its confirmations (the relay's `publish_timeout`) leaves nothing
/// on the channel for the next call: the return of its unroutable message, arriving late,
/// stays with its own dropped confirmation (lapin keeps those) and is not handed to the next
/// call's row.
#[tokio::test(flavor = "multi_thread")]
async fn rabbitmq_a_dropped_call_leaves_nothing_for_the_next() {
    with_rabbit_queue(|admin, queue| async move {
        let sink = RabbitMqSink::connect(RABBITMQ_URL)
            .await
            .expect("connect the sink");
        let mut cut = 0;
        let mut sent = Vec::new();
        for i in 0..40 {
            // The default exchange routes by queue name: no queue has this one.
            let unroutable = vec![row(i, &unique("txmq-outbox-nowhere"))];
            let call = sink.publish(&unroutable);
            let dropped = if i % 8 == 0 {
                // Dropped right after its first poll: timers are too coarse to cut short a
                // call that a quick broker confirms within a millisecond.
                call.now_or_never().is_none()
            } else {
                let wait = Duration::from_micros(250 * (i as u64 % 8));
                tokio::time::timeout(wait, call).await.is_err()
            };
            cut += usize::from(dropped);
            tokio::time::sleep(Duration::from_millis(20)).await;
            let next = vec![row(100 + i, &queue)];
            let results =
                answers_in_time("publish after a dropped call", sink.publish(&next)).await;
            assert_all_ok(&results, &next);
            sent.extend(next);
        }
        assert!(cut > 0, "no call was cut short");
        assert_amqp_rows(
            &drain_queue(&admin, &queue).await,
            &sent.iter().collect::<Vec<_>>(),
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rabbitmq_closed_port_fails_without_hanging() {
    let url = format!("amqp://guest:guest@127.0.0.1:{}/%2f", closed_port());
    let result = answers_in_time("connect to a closed port", RabbitMqSink::connect(&url)).await;
    let e = result.expect_err("nothing listens there");
    assert!(
        e.0.contains("RabbitMQ") && !e.0.contains("guest:guest"),
        "{e}"
    );
}

// -------------------------------------------------------------------------------- NATS

/// A JetStream context of an admin client to the test NATS.
async fn nats_admin() -> async_nats::jetstream::Context {
    let client = async_nats::connect(NATS_URL)
        .await
        .expect("connect to NATS");
    async_nats::jetstream::new(client)
}

/// Creates a file stream `name` over the subjects `name.>` (dots instead of dashes).
async fn create_stream(js: &async_nats::jetstream::Context, name: &str) -> String {
    let prefix = name.replace('-', "_");
    js.create_stream(async_nats::jetstream::stream::Config {
        name: name.to_string(),
        subjects: vec![format!("{prefix}.>")],
        storage: async_nats::jetstream::stream::StorageType::File,
        ..Default::default()
    })
    .await
    .expect("create the stream");
    prefix
}

async fn stream_messages(js: &async_nats::jetstream::Context, name: &str) -> u64 {
    let stream = js.get_stream(name).await.expect("get the stream");
    stream.get_info().await.expect("stream info").state.messages
}

#[tokio::test(flavor = "multi_thread")]
async fn nats_batch_is_acked_read_back_and_deduplicated() {
    if !available("NATS", NATS_ADDR).await {
        return;
    }
    let js = nats_admin().await;
    let name = unique("txmq-outbox-test");
    let prefix = create_stream(&js, &name).await;
    let body = async {
        let sink = NatsSink::connect(NATS_URL).await.expect("connect the sink");
        assert_eq!(sink.name(), "nats");
        let subject = format!("{prefix}.orders");
        let rows: Vec<OutboxRow> = (0..BATCH).map(|i| row(i, &subject)).collect();
        let results = answers_in_time("publish", sink.publish(&rows)).await;
        assert_all_ok(&results, &rows);

        let stream = js.get_stream(&name).await.expect("get the stream");
        assert_eq!(stream_messages(&js, &name).await, BATCH as u64);
        let by_id: HashMap<&str, &OutboxRow> = rows.iter().map(|r| (r.id.as_str(), r)).collect();
        let mut seen = std::collections::HashSet::new();
        for seq in 1..=BATCH as u64 {
            let m = stream.get_raw_message(seq).await.expect("get a message");
            let id = m
                .headers
                .get("Nats-Msg-Id")
                .expect("Nats-Msg-Id is set")
                .as_str();
            let row = by_id.get(id).unwrap_or_else(|| panic!("unknown id {id}"));
            assert!(seen.insert(id.to_string()), "message {id} twice");
            assert_eq!(m.subject.as_str(), subject);
            assert_eq!(
                m.payload.as_ref(),
                row.payload.as_slice(),
                "payload of {id}"
            );
            assert_eq!(
                m.headers.get("txmq-key").map(|v| v.as_str().to_string()),
                row.key,
                "key of {id}"
            );
            for (n, v) in &row.headers {
                assert_eq!(
                    m.headers.get(n.as_str()).map(|v| v.as_str()),
                    Some(v.as_str()),
                    "header {n} of {id}"
                );
            }
        }

        // Republishing rows (a retry after a lost PubAck) stores nothing new, and succeeds.
        let results = answers_in_time("republish", sink.publish(&rows[..10])).await;
        assert_all_ok(&results, &rows[..10]);
        // The same row twice in one call is stored once too.
        let twice = vec![row(200, &subject); 2];
        let results = answers_in_time("publish twice", sink.publish(&twice)).await;
        assert_all_ok(&results, &twice);
        assert_eq!(stream_messages(&js, &name).await, BATCH as u64 + 1);
    };
    with_cleanup(body, async {
        let _ = js.delete_stream(&name).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn nats_subject_without_stream_fails_its_row() {
    if !available("NATS", NATS_ADDR).await {
        return;
    }
    let js = nats_admin().await;
    let name = unique("txmq-outbox-test");
    let prefix = create_stream(&js, &name).await;
    let body = async {
        let sink = NatsSink::connect(NATS_URL).await.expect("connect the sink");
        let nowhere = format!("{}.nowhere", unique("txmq_outbox_nostream"));
        let rows = vec![
            row(0, &format!("{prefix}.ok")),
            row(1, &nowhere),
            row(2, &format!("{prefix}.ok")),
        ];
        let results = answers_in_time("publish", sink.publish(&rows)).await;
        assert!(results[0].is_ok() && results[2].is_ok(), "{results:?}");
        let e = results[1].as_ref().expect_err("no stream, no delivery");
        assert!(
            e.0.contains(&rows[1].id) && e.0.contains(&nowhere) && e.0.contains("no stream"),
            "names the failure: {e}"
        );
        assert_eq!(stream_messages(&js, &name).await, 2);
    };
    with_cleanup(body, async {
        let _ = js.delete_stream(&name).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn nats_closed_port_fails_without_hanging() {
    let url = format!("nats://127.0.0.1:{}", closed_port());
    let result = answers_in_time("connect to a closed port", NatsSink::connect(&url)).await;
    let e = result.expect_err("nothing listens there");
    assert!(e.0.contains("NATS"), "{e}");
}

// ------------------------------------------------------------------------------- Redis

async fn redis_admin() -> redis::aio::MultiplexedConnection {
    redis::Client::open(REDIS_URL)
        .expect("Redis URL")
        .get_multiplexed_async_connection()
        .await
        .expect("connect to Redis")
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_batch_is_appended_read_back_and_survives_a_killed_connection() {
    if !available("Redis", REDIS_ADDR).await {
        return;
    }
    let mut admin = redis_admin().await;
    let stream = unique("txmq-outbox-test");
    let string_key = format!("{stream}-string");
    let mut cleaner = admin.clone();
    let body = async {
        let sink = RedisSink::connect(REDIS_URL)
            .await
            .expect("connect the sink");
        assert_eq!(sink.name(), "redis");
        let rows: Vec<OutboxRow> = (0..BATCH).map(|i| row(i, &stream)).collect();
        let results = answers_in_time("publish", sink.publish(&rows)).await;
        assert_all_ok(&results, &rows);

        let entries: Vec<(String, Vec<Vec<u8>>)> = redis::cmd("XRANGE")
            .arg(&stream)
            .arg("-")
            .arg("+")
            .query_async(&mut admin)
            .await
            .expect("XRANGE");
        assert_eq!(entries.len(), BATCH, "each row once");
        for ((_, fields), row) in entries.iter().zip(&rows) {
            // One pipeline on one connection: entries in row order.
            let fields: HashMap<String, Vec<u8>> = fields
                .chunks(2)
                .map(|kv| {
                    (
                        String::from_utf8(kv[0].clone()).expect("field name"),
                        kv[1].clone(),
                    )
                })
                .collect();
            let text = |f: &str| {
                fields
                    .get(f)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            };
            assert_eq!(text("id").as_deref(), Some(row.id.as_str()));
            assert_eq!(
                fields.get("payload"),
                Some(&row.payload),
                "payload of {}",
                row.id
            );
            assert_eq!(text("key"), row.key, "key of {}", row.id);
            for (n, v) in &row.headers {
                assert_eq!(text(&format!("h:{n}")).as_ref(), Some(v), "header {n}");
            }
            let expected = 2 + usize::from(row.key.is_some()) + row.headers.len();
            assert_eq!(fields.len(), expected, "no other fields");
        }

        // A key that is not a stream fails its row only.
        let _: () = redis::cmd("SET")
            .arg(&string_key)
            .arg("not a stream")
            .query_async(&mut admin)
            .await
            .expect("SET");
        let mixed = vec![row(0, &stream), row(1, &string_key), row(2, &stream)];
        let results = answers_in_time("publish mixed", sink.publish(&mixed)).await;
        assert!(results[0].is_ok() && results[2].is_ok(), "{results:?}");
        let e = results[1].as_ref().expect_err("WRONGTYPE");
        assert!(
            e.0.contains(&mixed[1].id) && e.0.contains("WRONGTYPE"),
            "{e}"
        );

        // Kill the sink's connection (the only client whose last command was XADD): calls
        // fail or succeed, never hang, and the connection comes back by itself.
        let clients: String = redis::cmd("CLIENT")
            .arg("LIST")
            .query_async(&mut admin)
            .await
            .expect("CLIENT LIST");
        let mut killed = 0;
        for line in clients.lines().filter(|l| l.contains(" cmd=xadd ")) {
            let Some(id) = line.split(' ').find_map(|f| f.strip_prefix("id=")) else {
                continue;
            };
            let n: i64 = redis::cmd("CLIENT")
                .arg("KILL")
                .arg("ID")
                .arg(id)
                .query_async(&mut admin)
                .await
                .expect("CLIENT KILL");
            killed += n;
        }
        assert!(killed >= 1, "found the sink's connection in {clients}");
        let after = vec![row(300, &stream)];
        let mut delivered = false;
        for attempt in 0..20 {
            let results = answers_in_time("publish after a kill", sink.publish(&after)).await;
            match &results[0] {
                Ok(()) => {
                    delivered = true;
                    break;
                }
                Err(e) => eprintln!("attempt {attempt} after the kill: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        assert!(delivered, "the sink reconnects");
    };
    with_cleanup(body, async {
        let _: Result<i64, _> = redis::cmd("DEL")
            .arg(&stream)
            .arg(&string_key)
            .query_async(&mut cleaner)
            .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_closed_port_fails_without_hanging() {
    let url = format!("redis://127.0.0.1:{}", closed_port());
    let result = answers_in_time("connect to a closed port", RedisSink::connect(&url)).await;
    let e = result.expect_err("nothing listens there");
    assert!(e.0.contains("Redis"), "{e}");
}

// ------------------------------------------------------------------------- connect(url)

#[tokio::test(flavor = "multi_thread")]
async fn connect_by_url_picks_the_sink() {
    let cases = [
        (
            "RabbitMQ",
            RABBITMQ_ADDR,
            RABBITMQ_URL.to_string(),
            "rabbitmq",
        ),
        (
            "RabbitMQ",
            RABBITMQ_ADDR,
            format!("{RABBITMQ_URL}?exchange=amq.direct"),
            "rabbitmq",
        ),
        ("NATS", NATS_ADDR, NATS_URL.to_string(), "nats"),
        ("Redis", REDIS_ADDR, format!("{REDIS_URL}/0"), "redis"),
    ];
    for (service, addr, url, name) in cases {
        if !available(service, addr).await {
            continue;
        }
        let sink = answers_in_time("connect", txmq_outbox::sink::connect(&url))
            .await
            .unwrap_or_else(|e| panic!("connect {url}: {e}"));
        assert_eq!(sink.name(), name, "{url}");
    }
}
