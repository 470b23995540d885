//! The published RocketMQ 5 Rust client (`rocketmq` 5.0.0, unchanged) against a real txmq
//! broker on an ephemeral port: sending, simple consumption, transactions and check-back,
//! redelivery, dead-letter, FIFO order, delay and refusals.
//!
//! Each scenario starts its own broker in its own data directory and is bounded by
//! [`SCENARIO_LIMIT`].

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rocketmq::conf::{ClientOption, ProducerOption, SimpleConsumerOption};
use rocketmq::error::ClientError;
use rocketmq::model::common::{FilterExpression, FilterType};
use rocketmq::model::message::{MessageBuilder, MessageView};
use rocketmq::model::transaction::{Transaction, TransactionResolution};
use rocketmq::{Producer, SimpleConsumer};
use tempfile::TempDir;
use txmq_broker::BrokerConfig;
use txmq_broker::metadata::TopicType;
use txmq_broker::server::Server;
use txmq_broker::transactions::TxState;

/// Longest any scenario may take (alone each takes 0.2 to 5 s; 15 scenarios two at a time
/// stay under 2 minutes even if every one runs into this limit).
const SCENARIO_LIMIT: Duration = Duration::from_secs(15);
/// Long-polling time the clients ask for; the broker answers 0.5 s before it.
const LONG_POLL: Duration = Duration::from_secs(2);

/// Runs a scenario, failing it when it takes longer than [`SCENARIO_LIMIT`].
async fn bounded<F: Future<Output = ()>>(scenario: F) {
    tokio::time::timeout(SCENARIO_LIMIT, scenario)
        .await
        .expect("the scenario took too long");
}

/// A broker in a temporary directory.
struct LocalBroker {
    server: Server,
    _dir: TempDir,
}

impl LocalBroker {
    /// Starts a broker whose check-back is fast: first check 500 ms after the half message,
    /// then every 300 ms (doubling), at most 2 checks.
    async fn start(tweak: impl FnOnce(&mut BrokerConfig)) -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let mut config = BrokerConfig {
            data_dir: dir.path().to_path_buf(),
            listen: "127.0.0.1:0".into(),
            http: "127.0.0.1:0".into(),
            segment_size: 16 << 20,
            transaction_timeout_ms: 500,
            transaction_check_interval_ms: 300,
            transaction_check_max: 2,
            ..BrokerConfig::default()
        };
        tweak(&mut config);
        let server = Server::start(config).await.expect("broker starts");
        Self { server, _dir: dir }
    }

    fn topic(&self, name: &str, kind: TopicType, queues: u32) {
        self.server
            .broker
            .metadata()
            .create_topic(name, kind, queues)
            .expect("topic created");
    }

    fn group(&self, name: &str, max_attempts: u32, fifo: bool) {
        self.server
            .broker
            .metadata()
            .put_group(name, max_attempts, fifo, Vec::new())
            .expect("group created");
    }

    fn client_option(&self) -> ClientOption {
        let mut o = ClientOption::default();
        o.set_access_url(self.server.grpc_addr.to_string());
        o.set_enable_tls(false);
        o.set_timeout(Duration::from_secs(5));
        o.set_long_polling_timeout(LONG_POLL);
        o
    }

    async fn producer(&self, topics: &[&str]) -> Producer {
        let mut option = ProducerOption::default();
        if !topics.is_empty() {
            option.set_topics(topics.to_vec());
        }
        let mut p = Producer::new(option, self.client_option()).expect("producer");
        p.start().await.expect("producer starts");
        p
    }

    async fn transaction_producer(&self, topic: &str, checker: &Checker) -> Producer {
        let mut option = ProducerOption::default();
        option.set_topics(vec![topic]);
        let mut p =
            Producer::new_transaction_producer(option, self.client_option(), checker.boxed())
                .expect("transaction producer");
        p.start().await.expect("transaction producer starts");
        p
    }

    async fn consumer(&self, group: &str, topic: &str) -> SimpleConsumer {
        let mut option = SimpleConsumerOption::default();
        option.set_consumer_group(group);
        option.set_topics(vec![topic]);
        let mut c = SimpleConsumer::new(option, self.client_option()).expect("consumer");
        c.start().await.expect("consumer starts");
        c
    }

    fn tx_state(&self, transaction_id: &str) -> Option<TxState> {
        self.server
            .broker
            .transactions()
            .get(transaction_id)
            .map(|t| t.state)
    }

    /// Waits until the transaction is in `state`.
    async fn wait_for_tx_state(&self, transaction_id: &str, state: TxState) {
        loop {
            if self.tx_state(transaction_id) == Some(state) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Shuts the clients down, then the broker. Clients leave first: an open Telemetry
    /// stream would hold the broker's shutdown for its whole grace period.
    async fn stop(self, producers: Vec<Producer>, consumers: Vec<SimpleConsumer>) {
        for p in producers {
            p.shutdown().await.expect("producer shuts down");
        }
        for c in consumers {
            c.shutdown().await.expect("consumer shuts down");
        }
        self.server.stop().await.expect("broker stops cleanly");
    }
}

/// What a check-back asked about.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CheckBack {
    transaction_id: String,
    message_id: String,
    topic: String,
    body: Vec<u8>,
}

/// A check-back answerer that records what it was asked.
#[derive(Clone)]
struct Checker {
    answer: fn() -> TransactionResolution,
    asked: Arc<Mutex<Vec<CheckBack>>>,
}

impl Checker {
    fn answering(answer: fn() -> TransactionResolution) -> Self {
        Self {
            answer,
            asked: Arc::default(),
        }
    }

    fn boxed(
        &self,
    ) -> Box<dyn Fn(String, MessageView) -> TransactionResolution + Send + Sync + 'static> {
        let me = self.clone();
        Box::new(move |transaction_id, message| {
            me.asked.lock().unwrap().push(CheckBack {
                transaction_id,
                message_id: message.message_id().to_string(),
                topic: message.topic().to_string(),
                body: message.body().to_vec(),
            });
            (me.answer)()
        })
    }

    fn asked(&self) -> Vec<CheckBack> {
        self.asked.lock().unwrap().clone()
    }
}

fn all() -> FilterExpression {
    FilterExpression::new(FilterType::Tag, "*")
}

/// One receive call (one queue of the topic, chosen round-robin by the client).
async fn receive_once(
    consumer: &SimpleConsumer,
    topic: &str,
    invisible: Duration,
) -> Vec<MessageView> {
    consumer
        .receive_with(topic, &all(), 32, invisible)
        .await
        .unwrap_or_else(|e| panic!("receive from {topic} failed: {e:?}"))
}

/// Receives until `n` messages arrived (nothing acknowledged here).
async fn receive_n(
    consumer: &SimpleConsumer,
    topic: &str,
    n: usize,
    invisible: Duration,
) -> Vec<MessageView> {
    let mut got = Vec::new();
    while got.len() < n {
        got.extend(receive_once(consumer, topic, invisible).await);
    }
    got
}

/// Receives and acknowledges until `n` messages arrived.
async fn consume_n(consumer: &SimpleConsumer, topic: &str, n: usize) -> Vec<MessageView> {
    let mut got = Vec::new();
    while got.len() < n {
        for m in receive_once(consumer, topic, Duration::from_secs(30)).await {
            consumer.ack(&m).await.expect("ack");
            got.push(m);
        }
    }
    got
}

/// Asserts that `queues` receive calls (one per queue) find nothing.
async fn assert_nothing_to_receive(consumer: &SimpleConsumer, topic: &str, queues: u32) {
    for _ in 0..queues {
        let got = receive_once(consumer, topic, Duration::from_secs(30)).await;
        let ids: Vec<&str> = got.iter().map(|m| m.message_id()).collect();
        assert!(got.is_empty(), "{topic}: unexpected messages {ids:?}");
    }
}

fn code(e: &ClientError) -> Option<&str> {
    e.context()
        .iter()
        .find(|(k, _)| *k == "code")
        .map(|(_, v)| v.as_str())
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as i64
}

// ---------------------------------------------------------------------------------------
// Normal messages

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn normal_message_round_trips_and_acknowledged_messages_are_not_received_again() {
    bounded(async {
        let b = LocalBroker::start(|_| {}).await;
        b.topic("orders", TopicType::Normal, 2);
        let producer = b.producer(&["orders"]).await;
        let consumer = b.consumer("billing", "orders").await;

        let mut sent = BTreeMap::new();
        for i in 0..4 {
            let props = HashMap::from([("order", format!("{i}")), ("currency", "EUR".into())]);
            let msg = MessageBuilder::builder()
                .set_topic("orders")
                .set_body(format!("order {i} paid").into_bytes())
                .set_tag("paid")
                .set_keys(vec![format!("order-{i}"), "customer-7".into()])
                .set_properties(props)
                .build()
                .expect("message");
            let receipt = producer.send(msg).await.expect("send");
            assert!(!receipt.message_id().is_empty());
            sent.insert(receipt.message_id().to_string(), i);
        }

        let got = consume_n(&consumer, "orders", 4).await;
        let mut seen = BTreeMap::new();
        for m in &got {
            let i = *sent
                .get(m.message_id())
                .unwrap_or_else(|| panic!("unknown message id {}", m.message_id()));
            assert_eq!(m.topic(), "orders");
            assert_eq!(m.body(), format!("order {i} paid").as_bytes());
            assert_eq!(m.tag(), Some("paid"));
            assert_eq!(
                m.keys(),
                &[format!("order-{i}"), "customer-7".to_string()][..]
            );
            assert_eq!(
                m.properties().get("order").map(String::as_str),
                Some(format!("{i}").as_str())
            );
            assert_eq!(
                m.properties().get("currency").map(String::as_str),
                Some("EUR")
            );
            assert_eq!(m.delivery_attempt(), 1);
            assert!(m.born_timestamp() > 0);
            assert!(seen.insert(m.message_id().to_string(), i).is_none());
        }
        assert_eq!(seen, sent);

        assert_nothing_to_receive(&consumer, "orders", 2).await;
        let stats = b.server.broker.group_stats("billing");
        assert_eq!((stats.lag, stats.in_flight), (0, 0));

        b.stop(vec![producer], vec![consumer]).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_send_stores_every_message_of_the_batch() {
    bounded(async {
        let b = LocalBroker::start(|_| {}).await;
        b.topic("audit", TopicType::Normal, 1);
        let producer = b.producer(&["audit"]).await;
        let consumer = b.consumer("auditors", "audit").await;
        let batch = (0..5)
            .map(|i| {
                MessageBuilder::builder()
                    .set_topic("audit")
                    .set_body(format!("entry {i}").into_bytes())
                    .build()
                    .expect("message")
            })
            .collect();
        let receipts = producer.batch_send(batch).await.expect("batch send");
        assert_eq!(receipts.len(), 5);
        let got = consume_n(&consumer, "audit", 5).await;
        let mut sent: Vec<&str> = receipts.iter().map(|r| r.message_id()).collect();
        let mut received: Vec<&str> = got.iter().map(|m| m.message_id()).collect();
        sent.sort_unstable();
        received.sort_unstable();
        assert_eq!(sent, received);
        assert_nothing_to_receive(&consumer, "audit", 1).await;
        b.stop(vec![producer], vec![consumer]).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_filter_delivers_only_matching_tags() {
    bounded(async {
        let b = LocalBroker::start(|_| {}).await;
        b.topic("events", TopicType::Normal, 1);
        let producer = b.producer(&["events"]).await;
        let consumer = b.consumer("only-paid", "events").await;
        for tag in ["created", "paid", "shipped", "paid"] {
            let msg = MessageBuilder::builder()
                .set_topic("events")
                .set_body(tag.as_bytes().to_vec())
                .set_tag(tag)
                .build()
                .expect("message");
            producer.send(msg).await.expect("send");
        }
        let filter = FilterExpression::new(FilterType::Tag, "paid");
        let mut got = Vec::new();
        while got.len() < 2 {
            for m in consumer
                .receive_with("events", &filter, 32, Duration::from_secs(30))
                .await
                .expect("receive")
            {
                consumer.ack(&m).await.expect("ack");
                got.push(m);
            }
        }
        assert!(got.iter().all(|m| m.tag() == Some("paid")));
        let more = consumer
            .receive_with("events", &filter, 32, Duration::from_secs(30))
            .await
            .expect("receive");
        assert!(more.is_empty());
        b.stop(vec![producer], vec![consumer]).await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// Transactions

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_transaction_is_delivered_and_rolled_back_one_never_is() {
    bounded(async {
        // Check-back far away: only the producer's own decisions count here.
        let b = LocalBroker::start(|c| c.transaction_timeout_ms = 60_000).await;
        b.topic("payments", TopicType::Transaction, 1);
        let checker = Checker::answering(|| TransactionResolution::UNKNOWN);
        let producer = b.transaction_producer("payments", &checker).await;
        let consumer = b.consumer("ledger", "payments").await;

        let commit_me = MessageBuilder::transaction_message_builder("payments", b"commit".to_vec())
            .build()
            .expect("message");
        let tx1 = producer
            .send_transaction_message(commit_me)
            .await
            .expect("send half message");
        let (msg1, tx1_id) = (
            tx1.message_id().to_string(),
            tx1.transaction_id().to_string(),
        );
        assert!(!tx1_id.is_empty());
        let roll_me = MessageBuilder::transaction_message_builder("payments", b"rollback".to_vec())
            .build()
            .expect("message");
        let tx2 = producer
            .send_transaction_message(roll_me)
            .await
            .expect("send half message");
        let tx2_id = tx2.transaction_id().to_string();
        assert_eq!(b.tx_state(&tx1_id), Some(TxState::Prepared));
        assert_eq!(b.tx_state(&tx2_id), Some(TxState::Prepared));

        // Nothing is visible before the decision.
        assert_nothing_to_receive(&consumer, "payments", 1).await;

        tx1.commit().await.expect("commit");
        tx2.rollback().await.expect("rollback");
        assert_eq!(b.tx_state(&tx1_id), Some(TxState::Committed));
        assert_eq!(b.tx_state(&tx2_id), Some(TxState::RolledBack));

        let got = consume_n(&consumer, "payments", 1).await;
        assert_eq!(got[0].message_id(), msg1);
        assert_eq!(got[0].body(), b"commit");
        assert_nothing_to_receive(&consumer, "payments", 1).await;
        assert!(checker.asked().is_empty(), "no check-back was needed");

        b.stop(vec![producer], vec![consumer]).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_back_answered_commit_delivers_the_message() {
    bounded(async {
        let b = LocalBroker::start(|_| {}).await;
        b.topic("payments", TopicType::Transaction, 1);
        let checker = Checker::answering(|| TransactionResolution::COMMIT);
        let producer = b.transaction_producer("payments", &checker).await;
        let consumer = b.consumer("ledger", "payments").await;

        let msg = MessageBuilder::transaction_message_builder("payments", b"orphan".to_vec())
            .build()
            .expect("message");
        let tx = producer
            .send_transaction_message(msg)
            .await
            .expect("send half message");
        let (msg_id, tx_id) = (tx.message_id().to_string(), tx.transaction_id().to_string());
        // The local transaction's outcome is lost: neither commit nor rollback.
        drop(tx);

        let started = Instant::now();
        let got = consume_n(&consumer, "payments", 1).await;
        assert_eq!(got[0].message_id(), msg_id);
        assert_eq!(got[0].body(), b"orphan");
        assert!(started.elapsed() < Duration::from_secs(10));
        assert_eq!(b.tx_state(&tx_id), Some(TxState::Committed));
        let asked = checker.asked();
        assert_eq!(asked.len(), 1, "one check-back: {asked:?}");
        assert_eq!(
            asked[0],
            CheckBack {
                transaction_id: tx_id,
                message_id: msg_id,
                topic: "payments".into(),
                body: b"orphan".to_vec(),
            }
        );
        assert_nothing_to_receive(&consumer, "payments", 1).await;

        b.stop(vec![producer], vec![consumer]).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_back_answered_rollback_is_never_delivered() {
    bounded(async {
        let b = LocalBroker::start(|_| {}).await;
        b.topic("payments", TopicType::Transaction, 1);
        let checker = Checker::answering(|| TransactionResolution::ROLLBACK);
        let producer = b.transaction_producer("payments", &checker).await;
        let consumer = b.consumer("ledger", "payments").await;

        let msg = MessageBuilder::transaction_message_builder("payments", b"orphan".to_vec())
            .build()
            .expect("message");
        let tx = producer
            .send_transaction_message(msg)
            .await
            .expect("send half message");
        let tx_id = tx.transaction_id().to_string();
        drop(tx);

        b.wait_for_tx_state(&tx_id, TxState::RolledBack).await;
        assert_eq!(checker.asked().len(), 1);
        assert_nothing_to_receive(&consumer, "payments", 1).await;
        let rolled_back = b.server.broker.transactions().list(&[TxState::RolledBack]);
        assert_eq!(
            rolled_back
                .iter()
                .map(|t| t.id.as_str())
                .collect::<Vec<_>>(),
            [tx_id.as_str()]
        );

        b.stop(vec![producer], vec![consumer]).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_back_reaches_a_producer_started_after_the_first_one_left() {
    bounded(async {
        let b = LocalBroker::start(|_| {}).await;
        b.topic("payments", TopicType::Transaction, 1);
        let first_checker = Checker::answering(|| TransactionResolution::ROLLBACK);
        let first = b.transaction_producer("payments", &first_checker).await;
        let consumer = b.consumer("ledger", "payments").await;

        let msg = MessageBuilder::transaction_message_builder("payments", b"survivor".to_vec())
            .build()
            .expect("message");
        let tx = first
            .send_transaction_message(msg)
            .await
            .expect("send half message");
        let tx_id = tx.transaction_id().to_string();
        drop(tx);
        // The producer goes away before the first check-back is due (500 ms).
        first.shutdown().await.expect("producer shuts down");

        // With no producer connected, checks wait and are not counted.
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        assert_eq!(b.tx_state(&tx_id), Some(TxState::Prepared));
        let checks = b.server.broker.transactions().get(&tx_id).map(|t| t.checks);
        assert_eq!(checks, Some(0));

        let second_checker = Checker::answering(|| TransactionResolution::COMMIT);
        let second = b.transaction_producer("payments", &second_checker).await;
        let got = consume_n(&consumer, "payments", 1).await;
        assert_eq!(got[0].body(), b"survivor");
        assert_eq!(b.tx_state(&tx_id), Some(TxState::Committed));
        assert!(first_checker.asked().is_empty());
        assert_eq!(second_checker.asked().len(), 1);
        b.stop(vec![second], vec![consumer]).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_answering_unknown_leaves_the_transaction_unresolved_after_max_checks() {
    bounded(async {
        let b = LocalBroker::start(|_| {}).await;
        b.topic("payments", TopicType::Transaction, 1);
        let checker = Checker::answering(|| TransactionResolution::UNKNOWN);
        let producer = b.transaction_producer("payments", &checker).await;
        let consumer = b.consumer("ledger", "payments").await;

        let msg = MessageBuilder::transaction_message_builder("payments", b"undecided".to_vec())
            .build()
            .expect("message");
        let tx = producer
            .send_transaction_message(msg)
            .await
            .expect("send half message");
        let tx_id = tx.transaction_id().to_string();
        drop(tx);

        b.wait_for_tx_state(&tx_id, TxState::Unresolved).await;
        let unresolved = b.server.broker.transactions().list(&[TxState::Unresolved]);
        assert_eq!(unresolved.len(), 1);
        assert_eq!(unresolved[0].id, tx_id);
        assert_eq!(
            unresolved[0].checks, 2,
            "transaction_check_max checks were sent"
        );
        assert_eq!(checker.asked().len(), 2);
        assert_nothing_to_receive(&consumer, "payments", 1).await;

        b.stop(vec![producer], vec![consumer]).await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// Redelivery and dead-letter

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacknowledged_message_is_redelivered_after_its_invisible_time() {
    bounded(async {
        let b = LocalBroker::start(|_| {}).await;
        b.topic("jobs", TopicType::Normal, 1);
        let producer = b.producer(&["jobs"]).await;
        let consumer = b.consumer("workers", "jobs").await;
        let msg = MessageBuilder::builder()
            .set_topic("jobs")
            .set_body(b"job".to_vec())
            .build()
            .expect("message");
        let id = producer
            .send(msg)
            .await
            .expect("send")
            .message_id()
            .to_string();

        let invisible = Duration::from_secs(1);
        let first = receive_n(&consumer, "jobs", 1, invisible).await;
        let handed_out = Instant::now();
        assert_eq!(
            (first[0].message_id(), first[0].delivery_attempt()),
            (id.as_str(), 1)
        );
        // Not acknowledged: invisible for 1 s, then delivered again.
        let second = receive_n(&consumer, "jobs", 1, invisible).await;
        assert!(handed_out.elapsed() >= Duration::from_millis(900));
        assert_eq!(
            (second[0].message_id(), second[0].delivery_attempt()),
            (id.as_str(), 2)
        );
        assert_eq!(second[0].body(), b"job");
        consumer.ack(&second[0]).await.expect("ack");
        tokio::time::sleep(Duration::from_millis(1_200)).await;
        assert_nothing_to_receive(&consumer, "jobs", 1).await;
        b.stop(vec![producer], vec![consumer]).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_past_max_attempts_moves_to_the_dead_letter_topic() {
    bounded(async {
        let b = LocalBroker::start(|_| {}).await;
        b.topic("jobs", TopicType::Normal, 1);
        b.group("fragile", 2, false);
        let producer = b.producer(&["jobs"]).await;
        let consumer = b.consumer("fragile", "jobs").await;
        let msg = MessageBuilder::builder()
            .set_topic("jobs")
            .set_body(b"poison".to_vec())
            .set_tag("t")
            .build()
            .expect("message");
        let id = producer
            .send(msg)
            .await
            .expect("send")
            .message_id()
            .to_string();

        let invisible = Duration::from_secs(1);
        for attempt in 1..=2 {
            let got = receive_n(&consumer, "jobs", 1, invisible).await;
            assert_eq!(
                (got[0].message_id(), got[0].delivery_attempt()),
                (id.as_str(), attempt)
            );
        }
        // The third delivery would exceed max attempts: it is dead-lettered instead.
        tokio::time::sleep(Duration::from_millis(1_100)).await;
        assert_nothing_to_receive(&consumer, "jobs", 1).await;
        assert_eq!(b.server.broker.group_stats("fragile").dead_lettered, 1);

        let dlq = "%DLQ%fragile";
        let inspector = b.consumer("dlq-inspector", dlq).await;
        let dead = consume_n(&inspector, dlq, 1).await;
        assert_eq!(dead[0].message_id(), id);
        assert_eq!(dead[0].body(), b"poison");
        assert_eq!(dead[0].topic(), dlq);
        assert_eq!(dead[0].tag(), Some("t"));
        assert_nothing_to_receive(&inspector, dlq, 1).await;
        b.stop(vec![producer], vec![consumer, inspector]).await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// FIFO and delay

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifo_group_receives_each_message_group_in_send_order() {
    bounded(async {
        let b = LocalBroker::start(|_| {}).await;
        b.topic("ledger", TopicType::Fifo, 2);
        b.group("ledger-fifo", 16, true);
        let producer = b.producer(&["ledger"]).await;
        let consumer = b.consumer("ledger-fifo", "ledger").await;
        let groups = ["account-a", "account-b", "account-c"];
        for i in 0..5 {
            for g in groups {
                let msg = MessageBuilder::fifo_message_builder(
                    "ledger",
                    format!("{g}:{i}").into_bytes(),
                    g,
                )
                .build()
                .expect("message");
                producer.send(msg).await.expect("send");
            }
        }

        let mut order: BTreeMap<String, Vec<u32>> = BTreeMap::new();
        let mut total = 0;
        while total < 15 {
            let got = receive_once(&consumer, "ledger", Duration::from_secs(30)).await;
            // While a message of a group is out, the next of that group is held back.
            let mut in_batch: Vec<&str> = got.iter().filter_map(|m| m.message_group()).collect();
            in_batch.sort_unstable();
            let n = in_batch.len();
            in_batch.dedup();
            assert_eq!(in_batch.len(), n, "two messages of one group at once");
            for m in &got {
                let body = String::from_utf8(m.body().to_vec()).expect("utf-8");
                let (g, i) = body.split_once(':').expect("group:index");
                assert_eq!(m.message_group(), Some(g));
                order
                    .entry(g.to_string())
                    .or_default()
                    .push(i.parse().expect("index"));
                consumer.ack(m).await.expect("ack");
                total += 1;
            }
        }
        for g in groups {
            assert_eq!(order.get(g), Some(&vec![0, 1, 2, 3, 4]), "order of {g}");
        }
        assert_nothing_to_receive(&consumer, "ledger", 2).await;
        b.stop(vec![producer], vec![consumer]).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_message_is_delivered_at_its_time_and_not_before() {
    bounded(async {
        let b = LocalBroker::start(|_| {}).await;
        b.topic("reminders", TopicType::Delay, 1);
        let producer = b.producer(&["reminders"]).await;
        let consumer = b.consumer("mailer", "reminders").await;
        // The 5.0.0 client sends delivery times in whole seconds.
        let due_s = now_ms() / 1000 + 4;
        let msg = MessageBuilder::delay_message_builder("reminders", b"remind".to_vec(), due_s)
            .build()
            .expect("message");
        let id = producer
            .send(msg)
            .await
            .expect("send")
            .message_id()
            .to_string();

        let mut got = Vec::new();
        while got.is_empty() {
            got = receive_once(&consumer, "reminders", Duration::from_secs(30)).await;
            if got.is_empty() {
                assert!(now_ms() < due_s * 1000 + 2_000, "not delivered on time");
            }
        }
        let at = now_ms();
        assert!(
            at >= due_s * 1000,
            "delivered {} ms early",
            due_s * 1000 - at
        );
        assert!(
            at < due_s * 1000 + 2_000,
            "delivered {} ms late",
            at - due_s * 1000
        );
        assert_eq!(got[0].message_id(), id);
        assert_eq!(got[0].delivery_timestamp(), Some(due_s));
        consumer.ack(&got[0]).await.expect("ack");
        b.stop(vec![producer], vec![consumer]).await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// Refusals

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_body_is_refused_and_nothing_is_stored() {
    bounded(async {
        let b = LocalBroker::start(|c| c.max_body_size = 64 << 10).await;
        b.topic("blobs", TopicType::Normal, 1);
        let producer = b.producer(&["blobs"]).await;
        let consumer = b.consumer("readers", "blobs").await;

        let too_big = MessageBuilder::builder()
            .set_topic("blobs")
            .set_body(vec![7; (64 << 10) + 1])
            .build()
            .expect("message");
        let e = producer.send(too_big).await.expect_err("refused");
        assert_eq!(code(&e), Some("MESSAGE_BODY_TOO_LARGE"), "{e:?}");

        let just_fits = MessageBuilder::builder()
            .set_topic("blobs")
            .set_body(vec![7; 64 << 10])
            .build()
            .expect("message");
        producer
            .send(just_fits)
            .await
            .expect("largest body accepted");
        let got = consume_n(&consumer, "blobs", 1).await;
        assert_eq!(got[0].body().len(), 64 << 10);
        assert_nothing_to_receive(&consumer, "blobs", 1).await;
        b.stop(vec![producer], vec![consumer]).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_topic_and_group_are_refused_when_auto_creation_is_off() {
    bounded(async {
        let b = LocalBroker::start(|c| c.auto_create_topics = false).await;
        b.topic("known", TopicType::Normal, 1);
        b.group("known-group", 16, false);

        // Declared at start: the route prefetch fails.
        let mut option = ProducerOption::default();
        option.set_topics(vec!["nowhere"]);
        let mut p = Producer::new(option, b.client_option()).expect("producer");
        let e = p.start().await.expect_err("start refused");
        assert_eq!(code(&e), Some("TOPIC_NOT_FOUND"), "{e:?}");

        // Not declared: the send fails.
        let producer = b.producer(&[]).await;
        let msg = MessageBuilder::builder()
            .set_topic("nowhere")
            .set_body(b"lost?".to_vec())
            .build()
            .expect("message");
        let e = producer.send(msg).await.expect_err("send refused");
        assert_eq!(code(&e), Some("TOPIC_NOT_FOUND"), "{e:?}");
        assert!(b.server.broker.metadata().topic("nowhere").is_none());

        let consumer = b.consumer("known-group", "known").await;
        let e = consumer
            .receive_with("nowhere", &all(), 32, Duration::from_secs(30))
            .await
            .expect_err("receive refused");
        assert_eq!(code(&e), Some("TOPIC_NOT_FOUND"), "{e:?}");

        let stranger = b.consumer("unknown-group", "known").await;
        let e = stranger
            .receive_with("known", &all(), 32, Duration::from_secs(30))
            .await
            .expect_err("receive refused");
        assert_eq!(code(&e), Some("CONSUMER_GROUP_NOT_FOUND"), "{e:?}");
        assert!(b.server.broker.metadata().group("unknown-group").is_none());

        b.stop(vec![p, producer], vec![consumer, stranger]).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_body_is_refused_and_nothing_is_stored() {
    bounded(async {
        let b = LocalBroker::start(|_| {}).await;
        b.topic("blobs", TopicType::Normal, 1);
        let producer = Arc::new(b.producer(&["blobs"]).await);
        let consumer = b.consumer("readers", "blobs").await;

        // The broker answers MESSAGE_BODY_EMPTY (41302), as the Apache proxy does. The 5.0.0
        // client predates that code and panics on it (`Code::from_i32(..).unwrap()` in
        // `Client::handle_response_status`), so the send runs in its own task.
        let p = producer.clone();
        let outcome = tokio::spawn(async move {
            let empty = MessageBuilder::builder()
                .set_topic("blobs")
                .set_body(Vec::new())
                .build()
                .expect("message");
            p.send(empty).await
        })
        .await;
        match outcome {
            Ok(Ok(receipt)) => panic!("empty body accepted as {}", receipt.message_id()),
            Ok(Err(e)) => assert_eq!(code(&e), Some("MESSAGE_BODY_EMPTY"), "{e:?}"),
            Err(join) => assert!(join.is_panic(), "{join:?}"),
        }
        assert_nothing_to_receive(&consumer, "blobs", 1).await;
        let producer = Arc::try_unwrap(producer).expect("only owner");
        b.stop(vec![producer], vec![consumer]).await;
    })
    .await;
}
