//! Transactional producer against a real broker: commit, rollback, and check-backs
//! answered by the checker.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{
    assert_nothing_comes, client, joining_client, serve, start, stored_in_few_writes, topic, within,
};
use txmq_broker::metadata::TopicType;
use txmq_client::{
    Message, MessageView, SendError, SimpleConsumer, Subscription, Transaction, TransactionChecker,
    TransactionResolution, TransactionalProducer,
};

/// Decides by the message key; records what it was asked.
#[derive(Clone, Default)]
struct ByKey {
    asked: Arc<Mutex<Vec<(String, String)>>>,
}

impl TransactionChecker for ByKey {
    async fn check(&self, transaction_id: &str, message: &MessageView) -> TransactionResolution {
        let key = message.keys().first().cloned().unwrap_or_default();
        self.asked
            .lock()
            .unwrap()
            .push((transaction_id.to_string(), key.clone()));
        match key.as_str() {
            "commit" => TransactionResolution::Commit,
            "rollback" => TransactionResolution::Rollback,
            _ => TransactionResolution::Unknown,
        }
    }
}

async fn drain(consumer: &SimpleConsumer, wait: Duration) -> Vec<MessageView> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut out = Vec::new();
    while tokio::time::Instant::now() < deadline {
        for m in consumer.receive(32, Duration::from_secs(30)).await.unwrap() {
            consumer.ack(&m).await.unwrap();
            out.push(m);
        }
    }
    out
}

/// Commits the even transactions and rolls back the odd ones, all at once; the message
/// ids of the committed ones.
async fn end_all(transactions: Vec<Transaction>) -> Vec<String> {
    let mut committed = Vec::new();
    let mut ends = tokio::task::JoinSet::new();
    for (i, tx) in transactions.into_iter().enumerate() {
        if i % 2 == 0 {
            committed.push(tx.message_id().to_string());
            ends.spawn(tx.commit());
        } else {
            ends.spawn(tx.rollback());
        }
    }
    while let Some(ended) = ends.join_next().await {
        ended.expect("end task").expect("commit or rollback");
    }
    committed
}

/// Asserts that topic `payments` delivers exactly the messages `committed` (ids), to a
/// new consumer group.
async fn assert_delivered(config: txmq_client::ClientConfig, mut committed: Vec<String>) {
    let consumer = SimpleConsumer::connect(config, "ledger", [Subscription::all("payments")])
        .await
        .unwrap();
    let mut got: Vec<String> = drain(&consumer, Duration::from_secs(3))
        .await
        .iter()
        .map(|m| m.message_id().to_string())
        .collect();
    got.sort_unstable();
    committed.sort_unstable();
    assert_eq!(got, committed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_transaction_is_delivered_and_rolled_back_one_never_is() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    topic(&server, "payments", TopicType::Transaction);
    within(20, async {
        // Check-backs of the open transaction (while the receive waits) answer "unknown".
        let checker = ByKey::default();
        let producer = TransactionalProducer::connect(client(&server), ["payments"], checker)
            .await
            .unwrap();
        let consumer =
            SimpleConsumer::connect(client(&server), "ledger", [Subscription::all("payments")])
                .await
                .unwrap();
        let kept = producer
            .begin(Message::new("payments", "kept").with_key("client"))
            .await
            .unwrap();
        let kept_id = kept.message_id().to_string();
        assert!(!kept.transaction_id().is_empty());
        // Half messages are not delivered.
        assert_nothing_comes(&consumer, Duration::from_secs(30)).await;
        kept.commit().await.unwrap();
        let dropped = producer
            .begin(Message::new("payments", "dropped").with_key("client"))
            .await
            .unwrap();
        dropped.rollback().await.unwrap();

        let got = drain(&consumer, Duration::from_secs(2)).await;
        let ids: Vec<&str> = got.iter().map(|m| m.message_id()).collect();
        assert_eq!(ids, [kept_id.as_str()]);

        // A transactional message cannot be FIFO or delayed.
        let err = producer
            .begin(Message::new("payments", "x").with_message_group("g"))
            .await
            .unwrap_err();
        assert!(matches!(err, SendError::InvalidMessage { .. }), "{err:?}");
    })
    .await;
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checker_settles_orphaned_transactions_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    topic(&server, "orders", TopicType::Transaction);
    within(20, async {
        let checker = ByKey::default();
        let producer = TransactionalProducer::connect(client(&server), ["orders"], checker.clone())
            .await
            .unwrap();
        let consumer =
            SimpleConsumer::connect(client(&server), "shipping", [Subscription::all("orders")])
                .await
                .unwrap();
        // The producer "crashes" before resolving either transaction.
        let commit = producer
            .begin(Message::new("orders", "to commit").with_key("commit"))
            .await
            .unwrap();
        let rollback = producer
            .begin(Message::new("orders", "to roll back").with_key("rollback"))
            .await
            .unwrap();
        let (commit_tx, rollback_tx) = (
            commit.transaction_id().to_string(),
            rollback.transaction_id().to_string(),
        );
        let commit_id = commit.message_id().to_string();
        drop((commit, rollback));

        let mut got = Vec::new();
        while got.is_empty() {
            got = consumer.receive(32, Duration::from_secs(30)).await.unwrap();
        }
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].message_id(), commit_id);
        assert_eq!(got[0].body(), b"to commit");
        consumer.ack(&got[0]).await.unwrap();
        // The rolled-back one never comes, though check-backs would have asked again.
        assert!(drain(&consumer, Duration::from_secs(2)).await.is_empty());
        let asked = checker.asked.lock().unwrap().clone();
        assert!(
            asked.contains(&(commit_tx, "commit".to_string())),
            "{asked:?}"
        );
        assert!(
            asked.contains(&(rollback_tx, "rollback".to_string())),
            "{asked:?}"
        );
    })
    .await;
    server.stop().await.unwrap();
}

/// Commits after a pause; records how many checks ran at once, and whether two checks of
/// one transaction ever did.
#[derive(Clone, Default)]
struct Slow {
    running: Arc<Mutex<HashSet<String>>>,
    most_at_once: Arc<AtomicUsize>,
    one_transaction_twice: Arc<AtomicBool>,
    answered: Arc<Mutex<HashSet<String>>>,
}

impl TransactionChecker for Slow {
    async fn check(&self, transaction_id: &str, _: &MessageView) -> TransactionResolution {
        {
            let mut running = self.running.lock().unwrap();
            if !running.insert(transaction_id.to_string()) {
                self.one_transaction_twice.store(true, Ordering::SeqCst);
            }
            self.most_at_once.fetch_max(running.len(), Ordering::SeqCst);
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
        self.running.lock().unwrap().remove(transaction_id);
        self.answered
            .lock()
            .unwrap()
            .insert(transaction_id.to_string());
        TransactionResolution::Commit
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_backs_run_a_few_at_a_time_and_one_per_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    topic(&server, "refunds", TopicType::Transaction);
    within(30, async {
        let checker = Slow::default();
        let config = client(&server).with_max_concurrent_checks(2);
        let producer = TransactionalProducer::connect(config, ["refunds"], checker.clone())
            .await
            .unwrap();
        let consumer =
            SimpleConsumer::connect(client(&server), "cashier", [Subscription::all("refunds")])
                .await
                .unwrap();
        let mut ids = HashSet::new();
        for i in 0..12 {
            let tx = producer
                .begin(Message::new("refunds", format!("refund {i}")))
                .await
                .unwrap();
            ids.insert(tx.transaction_id().to_string());
            // Left open: the server checks each back, all about the same time.
            drop(tx);
        }
        while *checker.answered.lock().unwrap() != ids {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(checker.most_at_once.load(Ordering::SeqCst), 2);
        assert!(!checker.one_transaction_twice.load(Ordering::SeqCst));
        let mut got = HashSet::new();
        while got.len() < 12 {
            for m in consumer.receive(32, Duration::from_secs(30)).await.unwrap() {
                consumer.ack(&m).await.unwrap();
                got.insert(m.body().to_vec());
            }
        }
    })
    .await;
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_answer_leaves_the_transaction_open_for_the_next_check() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    topic(&server, "transfers", TopicType::Transaction);
    within(20, async {
        let checker = ByKey::default();
        let producer =
            TransactionalProducer::connect(client(&server), ["transfers"], checker.clone())
                .await
                .unwrap();
        let consumer =
            SimpleConsumer::connect(client(&server), "bank", [Subscription::all("transfers")])
                .await
                .unwrap();
        let tx = producer
            .begin(Message::new("transfers", "pending").with_key("undecided"))
            .await
            .unwrap();
        let (topic, id, tx_id) = (
            tx.topic().to_string(),
            tx.message_id().to_string(),
            tx.transaction_id().to_string(),
        );
        drop(tx);
        // Asked at least twice, answered "unknown" each time: still not delivered.
        while checker.asked.lock().unwrap().len() < 2 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_nothing_comes(&consumer, Duration::from_secs(30)).await;
        // A process that recorded the ids can still settle it.
        producer
            .resume(topic, id.clone(), tx_id)
            .commit()
            .await
            .unwrap();
        let mut got = Vec::new();
        while got.is_empty() {
            got = consumer.receive(32, Duration::from_secs(30)).await.unwrap();
        }
        assert_eq!(got[0].message_id(), id);
    })
    .await;
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_transactions_share_requests_both_ways_and_each_is_one_of_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    topic(&server, "payments", TopicType::Transaction);
    within(60, async {
        let producer =
            TransactionalProducer::connect(joining_client(&server), ["payments"], ByKey::default())
                .await
                .unwrap();
        const N: usize = 200;
        let transactions = stored_in_few_writes(&server, N, N / 4, "half messages", async {
            let begins: Vec<_> = (0..N)
                .map(|i| {
                    let producer = producer.clone();
                    tokio::spawn(async move {
                        producer
                            .begin(Message::new("payments", format!("p{i}")).with_key("client"))
                            .await
                    })
                })
                .collect();
            let mut transactions = Vec::with_capacity(N);
            for begin in begins {
                transactions.push(begin.await.expect("begin task").expect("begin"));
            }
            transactions
        })
        .await;
        let mut ids: Vec<&str> = transactions.iter().map(|t| t.transaction_id()).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(
            ids.len(),
            N,
            "every half message has a transaction of its own"
        );

        // Commit the even ones, roll back the odd ones, all at once: the decisions share
        // calls too, and each decides only its own transaction.
        let committed =
            stored_in_few_writes(&server, N, N / 4, "decisions", end_all(transactions)).await;
        assert_delivered(client(&server), committed).await;
    })
    .await;
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_go_one_by_one_to_a_server_without_end_transactions() {
    let dir = tempfile::tempdir().unwrap();
    // Only `apache.rocketmq.v2.MessagingService`, as a RocketMQ proxy serves: none of
    // txmq's additions.
    let (addr, broker, shutdown) = serve(dir.path(), |broker, addr| {
        tonic::service::Routes::new(txmq_broker::grpc::Messaging::new(broker, addr).into_server())
    })
    .await;
    broker
        .metadata()
        .create_topic("payments", TopicType::Transaction, 4)
        .unwrap();
    within(60, async {
        let config = txmq_client::ClientConfig::new(addr.to_string())
            .with_long_polling_timeout(Duration::from_secs(1))
            .with_batching(Some(txmq_client::Batching {
                max_in_flight: 1,
                ..txmq_client::Batching::default()
            }));
        let producer =
            TransactionalProducer::connect(config.clone(), ["payments"], ByKey::default())
                .await
                .unwrap();
        const N: usize = 60;
        let mut transactions = Vec::with_capacity(N);
        for i in 0..N {
            let begin =
                producer.begin(Message::new("payments", format!("p{i}")).with_key("client"));
            transactions.push(begin.await.expect("begin"));
        }
        // The first joined call is answered UNIMPLEMENTED; its decisions and all later
        // ones go as EndTransaction calls, and none is lost.
        let committed = end_all(transactions).await;
        assert_delivered(config, committed).await;
        let open = broker.transactions().list(&[
            txmq_broker::transactions::TxState::Prepared,
            txmq_broker::transactions::TxState::Unresolved,
        ]);
        assert!(open.is_empty(), "{} transactions left open", open.len());
    })
    .await;
    shutdown().await;
}
