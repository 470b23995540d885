//! Producer and simple consumer against a real broker: every message field, batches,
//! delay messages, invisible durations, and typed errors.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use common::{
    assert_all_acked, assert_nothing_comes, client, fill, group, joining_client, start,
    stored_in_few_writes, topic, within,
};
use txmq_broker::metadata::TopicType;
use txmq_client::proto::Code;
use txmq_client::{
    AckError, ConnectError, Message, Producer, PushConsumer, ReceiveError, SendError,
    SimpleConsumer, Subscription,
};

/// Receives until `n` messages arrived or `deadline` passed.
async fn receive_n(
    consumer: &SimpleConsumer,
    n: usize,
    invisible: Duration,
) -> Vec<txmq_client::MessageView> {
    let mut out = Vec::new();
    while out.len() < n {
        out.extend(consumer.receive(32, invisible).await.expect("receive"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sent_message_arrives_with_every_field() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    topic(&server, "orders", TopicType::Normal);
    within(20, async {
        let producer = Producer::connect(client(&server), ["orders"])
            .await
            .unwrap();
        let before = SystemTime::now() - Duration::from_secs(1);
        let receipt = producer
            .send(
                Message::new("orders", "order 42 paid")
                    .with_tag("paid")
                    .with_keys(["order-42", "customer-7"])
                    .with_property("currency", "EUR")
                    .with_property("amount", "12.50"),
            )
            .await
            .unwrap();
        assert_eq!(receipt.message_id.len(), 32);
        assert!(receipt.transaction_id.is_empty());

        let consumer = SimpleConsumer::connect(
            client(&server),
            "shipping",
            [Subscription::new("orders", "paid")],
        )
        .await
        .unwrap();
        let got = receive_n(&consumer, 1, Duration::from_secs(2)).await;
        assert_eq!(got.len(), 1);
        let m = &got[0];
        assert_eq!(m.message_id(), receipt.message_id);
        assert_eq!(m.topic(), "orders");
        assert_eq!(m.body(), b"order 42 paid");
        assert_eq!(m.tag(), Some("paid"));
        assert_eq!(m.keys(), ["order-42", "customer-7"]);
        let props: HashMap<String, String> = [("currency", "EUR"), ("amount", "12.50")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(m.properties(), &props);
        assert_eq!(m.message_group(), None);
        assert_eq!(m.delivery_attempt(), 1);
        assert!(m.born_timestamp().unwrap() > before);
        assert!(
            m.store_timestamp().unwrap() >= m.born_timestamp().unwrap() - Duration::from_secs(1)
        );
        assert_eq!(m.queue_offset(), Some(receipt.offset));
        assert!(m.receipt_handle().is_some());
        assert!(!m.corrupted());
        consumer.ack(m).await.unwrap();
        // Acknowledged: it does not come back once its invisible time is over.
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_nothing_comes(&consumer, Duration::from_secs(2)).await;
    })
    .await;
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifo_message_carries_its_message_group() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    topic(&server, "ledger", TopicType::Fifo);
    within(20, async {
        let producer = Producer::connect(client(&server), ["ledger"])
            .await
            .unwrap();
        producer
            .send(Message::new("ledger", "debit").with_message_group("account-1"))
            .await
            .unwrap();
        let consumer =
            SimpleConsumer::connect(client(&server), "audit", [Subscription::all("ledger")])
                .await
                .unwrap();
        let got = receive_n(&consumer, 1, Duration::from_secs(10)).await;
        assert_eq!(got[0].message_group(), Some("account-1"));
        consumer.ack(&got[0]).await.unwrap();
        // A normal message does not go to a FIFO topic: the route says so.
        let err = producer
            .send(Message::new("ledger", "no group"))
            .await
            .unwrap_err();
        assert!(
            matches!(err, SendError::MessageTypeMismatch { .. }),
            "{err:?}"
        );
    })
    .await;
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_is_stored_whole_and_received_in_full() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    topic(&server, "events", TopicType::Normal);
    within(20, async {
        let producer = Producer::connect(client(&server), ["events"])
            .await
            .unwrap();
        let batch: Vec<Message> = (0..10)
            .map(|i| Message::new("events", format!("event {i}")).with_key(format!("k{i}")))
            .collect();
        let receipts = producer.send_batch(batch).await.unwrap();
        assert_eq!(receipts.len(), 10);
        let consumer =
            SimpleConsumer::connect(client(&server), "stats", [Subscription::all("events")])
                .await
                .unwrap();
        let got = receive_n(&consumer, 10, Duration::from_secs(10)).await;
        let mut bodies: Vec<String> = got
            .iter()
            .map(|m| String::from_utf8(m.body().to_vec()).unwrap())
            .collect();
        bodies.sort();
        let mut expected: Vec<String> = (0..10).map(|i| format!("event {i}")).collect();
        expected.sort();
        assert_eq!(bodies, expected);
        for m in &got {
            assert!(receipts.iter().any(|r| r.message_id == m.message_id()));
            consumer.ack(m).await.unwrap();
        }
        // A batch has one topic.
        let mixed = vec![Message::new("events", "a"), Message::new("other", "b")];
        assert!(matches!(
            producer.send_batch(mixed).await,
            Err(SendError::InvalidMessage { .. })
        ));
    })
    .await;
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_message_is_delivered_no_earlier_than_its_time() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    topic(&server, "reminders", TopicType::Delay);
    within(20, async {
        let producer = Producer::connect(client(&server), ["reminders"])
            .await
            .unwrap();
        let consumer = SimpleConsumer::connect(
            client(&server),
            "notifier",
            [Subscription::all("reminders")],
        )
        .await
        .unwrap();
        let due = SystemTime::now() + Duration::from_millis(1500);
        producer
            .send(Message::new("reminders", "ping").with_delivery_time(due))
            .await
            .unwrap();
        let got = receive_n(&consumer, 1, Duration::from_secs(10)).await;
        assert!(SystemTime::now() >= due - Duration::from_millis(50));
        let at = got[0].delivery_timestamp().expect("a delivery timestamp");
        assert!(at.duration_since(due).unwrap_or_else(|e| e.duration()) < Duration::from_millis(5));
        consumer.ack(&got[0]).await.unwrap();
    })
    .await;
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_invisible_duration_returns_a_working_handle() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    topic(&server, "jobs", TopicType::Normal);
    within(20, async {
        let producer = Producer::connect(client(&server), ["jobs"]).await.unwrap();
        producer
            .send(Message::new("jobs", "long job"))
            .await
            .unwrap();
        let consumer =
            SimpleConsumer::connect(client(&server), "workers", [Subscription::all("jobs")])
                .await
                .unwrap();
        let got = receive_n(&consumer, 1, Duration::from_secs(10)).await;
        let old = &got[0];
        let renewed = consumer
            .change_invisible_duration(old, Duration::from_secs(30))
            .await
            .unwrap();
        assert_ne!(renewed.receipt_handle(), old.receipt_handle());
        assert_eq!(renewed.message_id(), old.message_id());
        // The old handle no longer works; the new one does.
        assert!(matches!(
            consumer.ack(old).await,
            Err(AckError::InvalidReceiptHandle { .. })
        ));
        consumer.ack(&renewed).await.unwrap();

        // Zero makes it visible again at once, as the next delivery attempt.
        producer
            .send(Message::new("jobs", "retry me"))
            .await
            .unwrap();
        let first = receive_n(&consumer, 1, Duration::from_secs(30)).await;
        consumer
            .change_invisible_duration(&first[0], Duration::ZERO)
            .await
            .unwrap();
        let again = receive_n(&consumer, 1, Duration::from_secs(30)).await;
        assert_eq!(again[0].message_id(), first[0].message_id());
        assert_eq!(again[0].delivery_attempt(), 2);
        consumer.ack(&again[0]).await.unwrap();
    })
    .await;
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_all_answers_each_message_across_topics() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    topic(&server, "jobs", TopicType::Normal);
    topic(&server, "mail", TopicType::Normal);
    within(30, async {
        let producer = Producer::connect(client(&server), ["jobs", "mail"])
            .await
            .unwrap();
        for i in 0..3 {
            for t in ["jobs", "mail"] {
                producer
                    .send(Message::new(t, format!("{t} {i}")))
                    .await
                    .unwrap();
            }
        }
        let consumer = SimpleConsumer::connect(
            client(&server),
            "workers",
            [Subscription::all("jobs"), Subscription::all("mail")],
        )
        .await
        .unwrap();
        // Each receive takes the next subscription in turn.
        let got = receive_n(&consumer, 6, Duration::from_secs(30)).await;
        assert_eq!(got.len(), 6);
        // The first message's handle is replaced: in the batch, its old handle fails alone.
        let renewed = consumer
            .change_invisible_duration(&got[0], Duration::from_secs(30))
            .await
            .unwrap();
        let outcomes = consumer.ack_all(&got).await;
        assert_eq!(outcomes.len(), 6);
        assert!(
            matches!(&outcomes[0], Err(AckError::InvalidReceiptHandle { message_id, .. })
                if message_id == got[0].message_id()),
            "{:?}",
            outcomes[0]
        );
        for (m, outcome) in got.iter().zip(&outcomes).skip(1) {
            assert!(outcome.is_ok(), "{}: {outcome:?}", m.message_id());
        }
        assert!(consumer.ack_all(&[renewed]).await[0].is_ok());
        // Nothing comes again from either topic: every message is acknowledged.
        for _ in 0..2 {
            assert_nothing_comes(&consumer, Duration::from_secs(30)).await;
        }
        assert!(consumer.ack_all(&[]).await.is_empty());
    })
    .await;
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_made_at_once_by_many_tasks_share_calls() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    topic(&server, "tickets", TopicType::Normal);
    within(60, async {
        const N: usize = 200;
        fill(&server, "tickets", N).await;
        // One ack call in flight at a time: the acks made meanwhile wait for it.
        let consumer = SimpleConsumer::connect(
            joining_client(&server),
            "desk",
            [Subscription::all("tickets")],
        )
        .await
        .unwrap();
        let got = receive_n(&consumer, N, Duration::from_secs(30)).await;
        // One ack is one record. Acks one call each make 50 to 100 group commits here (the
        // store joins some of them); joined ones, about 20.
        stored_in_few_writes(&server, N, N / 6, "acknowledgements", async {
            let tasks: Vec<_> = got
                .into_iter()
                .map(|m| {
                    let consumer = consumer.clone();
                    tokio::spawn(async move { consumer.ack(&m).await })
                })
                .collect();
            for t in tasks {
                t.await.unwrap().expect("each ack gets its own outcome: ok");
            }
        })
        .await;
        assert_all_acked(&server, "desk");
        assert_nothing_comes(&consumer, Duration::from_secs(30)).await;
    })
    .await;
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_topic_is_a_typed_error_when_auto_creation_is_off() {
    let dir = tempfile::tempdir().unwrap();
    let server = txmq_broker::server::Server::start(txmq_broker::BrokerConfig {
        auto_create_topics: false,
        ..common::broker_config(dir.path())
    })
    .await
    .unwrap();
    within(20, async {
        let producer = Producer::connect(client(&server), ["nowhere"])
            .await
            .unwrap();
        let err = producer
            .send(Message::new("nowhere", "x"))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, SendError::TopicNotFound { topic } if topic == "nowhere"),
            "{err:?}"
        );
        assert!(err.is_definite());
        assert_eq!(err.code(), Some(txmq_client::proto::Code::TopicNotFound));

        // Without auto creation, groups must exist too.
        let err = SimpleConsumer::connect(client(&server), "g", [Subscription::all("nowhere")])
            .await
            .err()
            .expect("no group");
        assert!(
            matches!(err, ConnectError::SettingsRefused { code: 40403, .. }),
            "{err:?}"
        );
        group(&server, "g", 3, false, vec![]);
        let consumer =
            SimpleConsumer::connect(client(&server), "g", [Subscription::all("nowhere")])
                .await
                .unwrap();
        let err = consumer
            .receive(1, Duration::from_secs(10))
            .await
            .unwrap_err();
        assert!(matches!(err, ReceiveError::TopicNotFound { .. }), "{err:?}");

        let err = PushConsumer::builder(client(&server), "g")
            .subscribe(Subscription::all("nowhere"))
            .start(|_| async { Ok::<(), String>(()) })
            .await
            .err()
            .expect("no assignment");
        assert!(matches!(err, ConnectError::Assignment { .. }), "{err:?}");
    })
    .await;
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receive_never_outlasts_long_polling_plus_request_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    topic(&server, "quiet", TopicType::Normal);
    within(20, async {
        let config = client(&server)
            .with_long_polling_timeout(Duration::from_secs(2))
            .with_request_timeout(Duration::from_secs(1));
        let consumer = SimpleConsumer::connect(config, "idle", [Subscription::all("quiet")])
            .await
            .unwrap();
        for _ in 0..2 {
            let started = Instant::now();
            let got = consumer.receive(8, Duration::from_secs(10)).await.unwrap();
            let took = started.elapsed();
            assert!(got.is_empty());
            assert!(took <= Duration::from_secs(3), "{took:?}");
            // The server did wait: this is long polling, not a busy loop.
            assert!(took >= Duration::from_millis(1000), "{took:?}");
        }
        assert!(matches!(
            consumer.receive(0, Duration::from_secs(10)).await,
            Err(ReceiveError::InvalidArgument { .. })
        ));
    })
    .await;
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sends_share_requests_and_each_gets_its_own_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    topic(&server, "bulk", TopicType::Normal);
    within(60, async {
        // One request in flight at a time: the sends that arrive meanwhile wait and join
        // (64 to a request at most).
        let producer = Producer::connect(joining_client(&server), ["bulk"])
            .await
            .unwrap();
        const N: usize = 300;
        const BAD: usize = 150;
        let before = server.broker.store().stats();
        let sends: Vec<_> = (0..N)
            .map(|i| {
                let producer = producer.clone();
                // A control character in a tag passes the client's checks; the server refuses
                // it, and with it the whole request it arrives in.
                let tag = if i == BAD { "bad\ttag" } else { "ok" };
                tokio::spawn(async move {
                    producer
                        .send(Message::new("bulk", format!("m{i}")).with_tag(tag))
                        .await
                })
            })
            .collect();
        let mut outcomes = Vec::with_capacity(N);
        for send in sends {
            outcomes.push(send.await.expect("send task"));
        }
        let after = server.broker.store().stats();

        let mut sent = HashMap::new();
        for (i, outcome) in outcomes.into_iter().enumerate() {
            match outcome {
                Ok(receipt) => {
                    assert_ne!(i, BAD, "the bad message was stored");
                    assert!(sent.insert(receipt.message_id, format!("m{i}")).is_none());
                }
                Err(e) => {
                    assert_eq!(i, BAD, "message {i} failed: {e}");
                    assert_eq!(e.code(), Some(Code::IllegalMessageTag), "{e}");
                    assert!(e.is_definite());
                }
            }
        }
        assert_eq!(sent.len(), N - 1);
        let stored = after.records - before.records;
        let requests = after.group_commits - before.group_commits;
        assert_eq!(stored, (N - 1) as u64);
        // Alone, each send is a request and a group commit of its own. Joined, they take a
        // few requests, plus one per message of the refused request sent again alone.
        assert!(
            requests < (N / 2) as u64,
            "{requests} group commits for {stored} messages"
        );

        let consumer =
            SimpleConsumer::connect(client(&server), "bulk-readers", [Subscription::all("bulk")])
                .await
                .unwrap();
        let mut delivered = HashMap::new();
        while delivered.len() < N - 1 {
            for m in consumer.receive(32, Duration::from_secs(30)).await.unwrap() {
                let body = String::from_utf8(m.body().to_vec()).unwrap();
                assert_eq!(sent.get(m.message_id()), Some(&body));
                assert!(delivered.insert(m.message_id().to_string(), body).is_none());
                consumer.ack(&m).await.unwrap();
            }
        }
        assert_nothing_comes(&consumer, Duration::from_secs(30)).await;
    })
    .await;
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn senders_answered_together_send_again_together() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    topic(&server, "rounds", TopicType::Normal);
    const TASKS: usize = 16;
    const ROUNDS: usize = 25;
    let before = server.broker.store().stats();
    // The senders run on a runtime of their own with one thread, as an application's
    // might: which task runs when is then up to the client alone.
    let config = joining_client(&server);
    let senders = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(within(60, async move {
            // One request in flight at a time, and tasks that each send again as soon as
            // they are answered: all the senders of one answer should share the next
            // request, not leave the first of them to take the free slot alone.
            let producer = Producer::connect(config, ["rounds"]).await.unwrap();
            let tasks: Vec<_> = (0..TASKS)
                .map(|t| {
                    let producer = producer.clone();
                    tokio::spawn(async move {
                        for r in 0..ROUNDS {
                            producer
                                .send(Message::new("rounds", format!("t{t} r{r}")))
                                .await
                                .unwrap();
                        }
                    })
                })
                .collect();
            for task in tasks {
                task.await.expect("send task");
            }
        }));
    });
    tokio::task::spawn_blocking(move || senders.join())
        .await
        .unwrap()
        .expect("senders");
    let after = server.broker.store().stats();
    let stored = after.records - before.records;
    let requests = after.group_commits - before.group_commits;
    assert_eq!(stored, (TASKS * ROUNDS) as u64);
    // About one request per round. A sender going alone after each answer would make it
    // about two.
    assert!(
        requests <= (ROUNDS + ROUNDS / 2) as u64,
        "{requests} requests for {ROUNDS} rounds of {TASKS} senders"
    );
    server.stop().await.unwrap();
}
