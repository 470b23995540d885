//! `txmq_client::db` against the real broker and real databases (PostgreSQL, MariaDB,
//! SQLite): transactional sends whose local transaction is a database transaction, their
//! check-backs after crashes, and the idempotent consumer.
//!
//! Each test makes its own schema (PostgreSQL), database (MariaDB) or file (SQLite) and
//! drops it. A database that is not running skips its test, except under `CI=true`, where
//! it fails.

#![cfg(feature = "db")]

mod common;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{client, start, within};
use sqlx::{MySql, Pool, Postgres, Sqlite};
use txmq_broker::metadata::TopicType;
use txmq_broker::transactions::TxState;
use txmq_client::db::fault::{self, Crash};
use txmq_client::db::{
    self, BoxFuture, DbChecker, DbTransaction, Dialect, ProcessError, Processed,
    SendInTransactionError,
};
use txmq_client::{
    Message, MessageView, SimpleConsumer, Subscription, TransactionChecker, TransactionResolution,
    TransactionalProducer,
};
use txmq_testkit::ScratchDb;

/// A database for these tests: the size of its scratch pool, and portable SQL.
trait TestDb: Dialect + ScratchDb {
    /// The connections of the scratch database's pool.
    const POOL_SIZE: u32 = 8;

    /// Whether a failed statement ends the whole transaction (PostgreSQL: every later
    /// statement is refused and COMMIT rolls back), rather than only itself.
    const ABORTS_ON_ERROR: bool = false;

    /// Whether `process_once` can tell that the database ended its transaction even when
    /// another delivery has since committed the same inbox row (PostgreSQL, MySQL and
    /// MariaDB: `ProcessError::Aborted`). SQLite cannot, and its COMMIT of the ended
    /// transaction fails instead (`ProcessError::Database`).
    const TELLS_ENDED_TRANSACTIONS: bool = true;

    /// Runs `sql` on the transaction.
    fn exec<'c>(tx: &'c mut DbTransaction<Self>, sql: String) -> BoxFuture<'c, sqlx::Result<()>>;

    /// Runs `sql` on the pool.
    fn exec_pool(pool: &Pool<Self>, sql: String) -> BoxFuture<'_, sqlx::Result<()>>;

    /// The single BIGINT `sql` selects.
    fn scalar(pool: &Pool<Self>, sql: String) -> BoxFuture<'_, sqlx::Result<i64>>;
}

macro_rules! sql_helpers {
    () => {
        fn exec<'c>(
            tx: &'c mut DbTransaction<Self>,
            sql: String,
        ) -> BoxFuture<'c, sqlx::Result<()>> {
            Box::pin(async move { sqlx::query(&sql).execute(&mut **tx).await.map(drop) })
        }

        fn exec_pool(pool: &Pool<Self>, sql: String) -> BoxFuture<'_, sqlx::Result<()>> {
            Box::pin(async move { sqlx::query(&sql).execute(pool).await.map(drop) })
        }

        fn scalar(pool: &Pool<Self>, sql: String) -> BoxFuture<'_, sqlx::Result<i64>> {
            Box::pin(async move { sqlx::query_scalar::<_, i64>(&sql).fetch_one(pool).await })
        }
    };
}

impl TestDb for Postgres {
    const ABORTS_ON_ERROR: bool = true;
    sql_helpers!();
}

impl TestDb for MySql {
    sql_helpers!();
}

impl TestDb for Sqlite {
    const POOL_SIZE: u32 = 4;
    const TELLS_ENDED_TRANSACTIONS: bool = false;
    sql_helpers!();
}

/// A server with the transactional topic `payments` (2 queues).
async fn payments_server(dir: &std::path::Path) -> txmq_broker::server::Server {
    server_with_topic(dir, "payments", TopicType::Transaction).await
}

/// A server with the normal topic `paid` (2 queues).
async fn paid_server(dir: &std::path::Path) -> txmq_broker::server::Server {
    server_with_topic(dir, "paid", TopicType::Normal).await
}

/// A server with `topic` of `kind` (2 queues).
async fn server_with_topic(
    dir: &std::path::Path,
    topic: &str,
    kind: TopicType,
) -> txmq_broker::server::Server {
    let server = start(dir).await;
    server
        .broker
        .metadata()
        .create_topic(topic, kind, 2)
        .unwrap();
    server
}

/// A producer of `payments` whose check-backs `checker` answers, and a consumer of
/// `payments` in group `shipping`.
async fn payments_clients(
    server: &txmq_broker::server::Server,
    checker: impl TransactionChecker,
) -> (TransactionalProducer, SimpleConsumer) {
    let producer = TransactionalProducer::connect(client(server), ["payments"], checker)
        .await
        .unwrap();
    let consumer =
        SimpleConsumer::connect(client(server), "shipping", [Subscription::all("payments")])
            .await
            .unwrap();
    (producer, consumer)
}

/// A [`DbChecker`] whose answers are recorded by message body, and which answers UNKNOWN
/// without asking it while `paused`.
struct Watched<DB: Dialect> {
    checker: Arc<DbChecker<DB>>,
    paused: Arc<AtomicBool>,
    answers: Arc<Mutex<Vec<(String, TransactionResolution)>>>,
}

// Not derived: that would ask `DB: Clone`.
impl<DB: Dialect> Clone for Watched<DB> {
    fn clone(&self) -> Self {
        Self {
            checker: self.checker.clone(),
            paused: self.paused.clone(),
            answers: self.answers.clone(),
        }
    }
}

impl<DB: Dialect> Watched<DB> {
    fn new(checker: DbChecker<DB>, paused: bool) -> Self {
        Self {
            checker: Arc::new(checker),
            paused: Arc::new(AtomicBool::new(paused)),
            answers: Arc::default(),
        }
    }

    /// The checker's answers so far about the message with `body`.
    fn answers_to(&self, body: &str) -> Vec<TransactionResolution> {
        let answers = self.answers.lock().unwrap();
        answers
            .iter()
            .filter(|(b, _)| b == body)
            .map(|(_, r)| *r)
            .collect()
    }

    /// Waits until the message with `body` is answered `resolution`.
    async fn until_answered(&self, body: &str, resolution: TransactionResolution) {
        while !self.answers_to(body).contains(&resolution) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until each message of `bodies` is answered once more than now, or anything
    /// but UNKNOWN; then every answer to them.
    async fn next_answers(&self, bodies: &[&str]) -> Vec<TransactionResolution> {
        let seen: Vec<usize> = bodies.iter().map(|b| self.answers_to(b).len()).collect();
        loop {
            let answers: Vec<_> = bodies.iter().map(|b| self.answers_to(b)).collect();
            let all = answers.concat();
            let asked_again = answers.iter().zip(&seen).all(|(a, n)| a.len() > *n);
            if asked_again || all.iter().any(|r| *r != TransactionResolution::Unknown) {
                return all;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl<DB: Dialect> TransactionChecker for Watched<DB> {
    async fn check(&self, transaction_id: &str, message: &MessageView) -> TransactionResolution {
        if self.paused.load(Ordering::SeqCst) {
            return TransactionResolution::Unknown;
        }
        let r = self.checker.check(transaction_id, message).await;
        let body = String::from_utf8_lossy(message.body()).into_owned();
        self.answers.lock().unwrap().push((body, r));
        r
    }
}

/// Sends `body` with `send_in_transaction` and crashes right after the half message: the
/// transaction has no log row, and this log's check-back fences it.
async fn send_orphan<DB: TestDb>(producer: &TransactionalProducer, pool: &Pool<DB>, body: &str) {
    let err = fault::inject(
        Crash::AfterHalf,
        db::send_in_transaction(producer, pool, Message::new("payments", body), |_tx| {
            Box::pin(async { Ok::<_, sqlx::Error>(()) })
        }),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, SendInTransactionError::Crashed(Crash::AfterHalf)),
        "{err:?}"
    );
}

/// Sends `body` with `send_in_transaction`, inserting order `order`, and crashes right
/// after the database committed: the message is left to the check-back.
async fn send_and_crash_after_commit<DB: TestDb>(
    producer: &TransactionalProducer,
    pool: &Pool<DB>,
    body: &str,
    order: i64,
) {
    let err = fault::inject(
        Crash::AfterDbCommit,
        db::send_in_transaction(producer, pool, Message::new("payments", body), |tx| {
            Box::pin(async move {
                DB::exec(tx, format!("INSERT INTO orders (id) VALUES ({order})")).await
            })
        }),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, SendInTransactionError::Crashed(_)), "{err:?}");
}

/// The `db` tables and a table `orders (id BIGINT PRIMARY KEY)`.
async fn orders_schema<DB: TestDb>(pool: &Pool<DB>) {
    db::migrate(pool).await.unwrap();
    DB::exec_pool(pool, "CREATE TABLE orders (id BIGINT PRIMARY KEY)".into())
        .await
        .unwrap();
}

/// Runs `body` on a scratch database of `DB`, dropping it afterwards even if `body` panics.
async fn with_scratch<DB, F, Fut>(body: F)
where
    DB: TestDb,
    F: FnOnce(Pool<DB>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    if let Some(scratch) = DB::scratch("txmq_t", DB::POOL_SIZE).await {
        scratch.run(body).await;
    }
}

/// Receives and acks for `wait`; the bodies received, with how often each came.
async fn drain(consumer: &SimpleConsumer, wait: Duration) -> HashMap<String, u32> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut out = HashMap::new();
    while tokio::time::Instant::now() < deadline {
        for m in consumer.receive(32, Duration::from_secs(30)).await.unwrap() {
            consumer.ack(&m).await.unwrap();
            *out.entry(String::from_utf8_lossy(m.body()).into_owned())
                .or_insert(0) += 1;
        }
    }
    out
}

/// Waits until `sql` counts `n`.
async fn until_count<DB: TestDb>(pool: &Pool<DB>, sql: &str, n: i64) {
    while DB::scalar(pool, sql.to_string()).await.unwrap() != n {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sends payments that commit, fail, crash after the half message, before the database
/// commit and after it, and a slow one, and checks the database rows and what consumers
/// get.
async fn every_outcome_of_a_transactional_send<DB: TestDb>(pool: Pool<DB>) {
    let dir = tempfile::tempdir().unwrap();
    let server = payments_server(dir.path()).await;
    within(60, async {
        orders_schema(&pool).await;
        db::migrate(&pool).await.unwrap(); // idempotent
        let checker = DbChecker::new(pool.clone())
            .with_max_local_transaction(Duration::from_secs(1))
            .with_lock_wait(Duration::from_secs(1));
        let (producer, consumer) = payments_clients(&server, checker).await;

        // Committed: the row and the message.
        let sent =
            db::send_in_transaction(&producer, &pool, Message::new("payments", "commit"), |tx| {
                Box::pin(async move {
                    DB::exec(tx, "INSERT INTO orders (id) VALUES (1)".into()).await?;
                    Ok::<_, sqlx::Error>(7)
                })
            })
            .await
            .unwrap();
        assert_eq!(sent.value, 7);
        sent.message_commit.unwrap();

        // The business write fails after a first row: neither row nor message.
        let err =
            db::send_in_transaction(&producer, &pool, Message::new("payments", "error"), |tx| {
                Box::pin(async move {
                    DB::exec(tx, "INSERT INTO orders (id) VALUES (2)".into()).await?;
                    // Duplicate key.
                    DB::exec(tx, "INSERT INTO orders (id) VALUES (1)".into()).await?;
                    Ok::<_, sqlx::Error>(())
                })
            })
            .await
            .unwrap_err();
        assert!(matches!(err, SendInTransactionError::Local(_)), "{err:?}");

        // Crash after the database commit: the check-back commits the message.
        send_and_crash_after_commit(&producer, &pool, "crash-after", 3).await;

        // Crash right after the half message: no row; the check-back fences it and rolls
        // back.
        let err = fault::inject(
            Crash::AfterHalf,
            db::send_in_transaction(
                &producer,
                &pool,
                Message::new("payments", "crash-after-half"),
                |tx| {
                    Box::pin(async move {
                        DB::exec(tx, "INSERT INTO orders (id) VALUES (6)".into()).await
                    })
                },
            ),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(err, SendInTransactionError::Crashed(Crash::AfterHalf)),
            "{err:?}"
        );

        // Crash before the database commit: the check-back fences it and rolls back.
        let err = fault::inject(
            Crash::BeforeDbCommit,
            db::send_in_transaction(
                &producer,
                &pool,
                Message::new("payments", "crash-before"),
                |tx| {
                    Box::pin(async move {
                        DB::exec(tx, "INSERT INTO orders (id) VALUES (4)".into()).await
                    })
                },
            ),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, SendInTransactionError::Crashed(_)), "{err:?}");

        // A live sender slower than max_local_transaction holds its log row: check-backs
        // meanwhile cannot fence it (they answer UNKNOWN) and it commits.
        let slow =
            db::send_in_transaction(&producer, &pool, Message::new("payments", "slow"), |tx| {
                Box::pin(async move {
                    DB::exec(tx, "INSERT INTO orders (id) VALUES (5)".into()).await?;
                    tokio::time::sleep(Duration::from_millis(2500)).await;
                    Ok::<_, sqlx::Error>(())
                })
            })
            .await
            .unwrap();
        slow.message_commit.unwrap();

        // The fence rows are the check-back's ROLLBACKs; wait for them, then a few more
        // checks.
        until_count(
            &pool,
            "SELECT COUNT(*) FROM txmq_tx_log WHERE state = 'R'",
            2,
        )
        .await;
        let got = drain(&consumer, Duration::from_secs(3)).await;
        assert_eq!(
            got,
            HashMap::from([
                ("commit".to_string(), 1),
                ("crash-after".to_string(), 1),
                ("slow".to_string(), 1)
            ])
        );
        let orders = DB::scalar(&pool, "SELECT COUNT(*) FROM orders".into())
            .await
            .unwrap();
        let committed = DB::scalar(
            &pool,
            "SELECT COUNT(*) FROM orders WHERE id IN (1, 3, 5)".into(),
        )
        .await
        .unwrap();
        assert_eq!((orders, committed), (3, 3));
        let logged = DB::scalar(
            &pool,
            "SELECT COUNT(*) FROM txmq_tx_log WHERE state = 'C'".into(),
        )
        .await
        .unwrap();
        assert_eq!(logged, 3);

        // Cleanup keeps young rows and deletes old ones.
        assert_eq!(
            db::cleanup_log(&pool, Duration::from_secs(3600))
                .await
                .unwrap(),
            0
        );
        assert_eq!(db::cleanup_log(&pool, Duration::ZERO).await.unwrap(), 5);
        producer.shutdown().await;
        consumer.shutdown().await;
    })
    .await;
    server.stop().await.unwrap();
}

/// A local transaction the database ended before the closure returned (the closure caught
/// a failed statement and went on) commits no message, and an inbox handler's such
/// transaction records nothing.
async fn a_transaction_the_database_ended_commits_nothing<DB: TestDb>(pool: Pool<DB>) {
    let dir = tempfile::tempdir().unwrap();
    let server = payments_server(dir.path()).await;
    within(60, async {
        orders_schema(&pool).await;
        let (producer, consumer) = payments_clients(&server, DbChecker::new(pool.clone())).await;

        // Ended as InnoDB ends a transaction that hit a deadlock: later statements run on
        // their own.
        let err =
            db::send_in_transaction(&producer, &pool, Message::new("payments", "ended"), |tx| {
                Box::pin(async move {
                    DB::exec(tx, "INSERT INTO orders (id) VALUES (1)".into()).await?;
                    DB::exec(tx, "ROLLBACK".into()).await?;
                    Ok::<_, sqlx::Error>(())
                })
            })
            .await
            .unwrap_err();
        assert!(
            matches!(err, SendInTransactionError::Aborted { .. }),
            "{err:?}"
        );

        // A duplicate key caught and ignored: PostgreSQL ends the transaction, the others
        // fail only the statement and commit the rest.
        let caught =
            db::send_in_transaction(&producer, &pool, Message::new("payments", "caught"), |tx| {
                Box::pin(async move {
                    DB::exec(tx, "INSERT INTO orders (id) VALUES (2)".into()).await?;
                    let _ = DB::exec(tx, "INSERT INTO orders (id) VALUES (2)".into()).await;
                    Ok::<_, sqlx::Error>(())
                })
            })
            .await;
        let mut expected = HashMap::new();
        if DB::ABORTS_ON_ERROR {
            let err = caught.unwrap_err();
            assert!(
                matches!(err, SendInTransactionError::Aborted { .. }),
                "{err:?}"
            );
        } else {
            caught.unwrap().message_commit.unwrap();
            expected.insert("caught".to_string(), 1);
        }
        assert_eq!(drain(&consumer, Duration::from_secs(3)).await, expected);
        let orders = DB::scalar(&pool, "SELECT COUNT(*) FROM orders".into())
            .await
            .unwrap();
        assert_eq!(orders, i64::from(!DB::ABORTS_ON_ERROR));
        let logged = DB::scalar(&pool, "SELECT COUNT(*) FROM txmq_tx_log".into())
            .await
            .unwrap();
        assert_eq!(logged, i64::from(!DB::ABORTS_ON_ERROR));

        // The inbox: nothing recorded, so the next delivery runs the handler.
        let plain = txmq_client::Producer::connect(client(&server), ["paid"])
            .await
            .unwrap();
        plain.send(Message::new("paid", "order 9")).await.unwrap();
        let inbox =
            SimpleConsumer::connect(client(&server), "logistics", [Subscription::all("paid")])
                .await
                .unwrap();
        let m: MessageView = loop {
            if let Some(m) = inbox
                .receive(1, Duration::from_secs(30))
                .await
                .unwrap()
                .pop()
            {
                break m;
            }
        };
        let ended = db::process_once(&pool, "logistics", &m, |tx, _m| {
            Box::pin(async move { DB::exec(tx, "ROLLBACK".into()).await })
        })
        .await;
        assert!(matches!(ended, Err(ProcessError::Aborted)), "{ended:?}");
        let again = db::process_once(&pool, "logistics", &m, |_tx, _m| {
            Box::pin(async { Ok::<_, sqlx::Error>(()) })
        })
        .await;
        assert_eq!(again.unwrap(), Processed::Done(()));
        inbox.ack(&m).await.unwrap();
        for c in [consumer, inbox] {
            c.shutdown().await;
        }
        producer.shutdown().await;
        plain.shutdown().await;
    })
    .await;
    server.stop().await.unwrap();
}

/// A sender that gets to its database only after the check-back fenced its transaction
/// (here: it waits for a pooled connection longer than `max_local_transaction`) fails with
/// `Fenced`, writes nothing, and its message is never delivered.
async fn a_sender_fenced_by_the_check_back_writes_nothing<DB: TestDb>(pool: Pool<DB>) {
    let dir = tempfile::tempdir().unwrap();
    let server = payments_server(dir.path()).await;
    within(60, async {
        orders_schema(&pool).await;
        let checker = DbChecker::new(pool.clone())
            .with_max_local_transaction(Duration::from_secs(1))
            .with_lock_wait(Duration::from_secs(1));
        let (producer, consumer) = payments_clients(&server, checker).await;
        // The sender's pool has one connection, and this test holds it. The pool's first
        // send read the log's id; the next one sends its half message without the pool.
        let options = (*pool.connect_options()).clone();
        let sender_pool = sqlx::pool::PoolOptions::<DB>::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options)
            .await
            .unwrap();
        db::send_in_transaction(
            &producer,
            &sender_pool,
            Message::new("payments", "early"),
            |_tx| Box::pin(async { Ok::<_, sqlx::Error>(()) }),
        )
        .await
        .unwrap()
        .message_commit
        .unwrap();
        let held = sender_pool.acquire().await.unwrap();
        let send = {
            let (producer, sender_pool) = (producer.clone(), sender_pool.clone());
            tokio::spawn(async move {
                db::send_in_transaction(
                    &producer,
                    &sender_pool,
                    Message::new("payments", "late"),
                    |tx| {
                        Box::pin(async move {
                            DB::exec(tx, "INSERT INTO orders (id) VALUES (1)".into()).await
                        })
                    },
                )
                .await
                .map(|c| c.receipt.transaction_id)
            })
        };
        until_count(
            &pool,
            "SELECT COUNT(*) FROM txmq_tx_log WHERE state = 'R'",
            1,
        )
        .await;
        drop(held);
        let err = send.await.unwrap().unwrap_err();
        assert!(
            matches!(err, SendInTransactionError::Fenced { .. }),
            "{err:?}"
        );
        let orders = DB::scalar(&pool, "SELECT COUNT(*) FROM orders".into())
            .await
            .unwrap();
        assert_eq!(orders, 0);
        assert_eq!(
            drain(&consumer, Duration::from_secs(3)).await,
            HashMap::from([("early".to_string(), 1)])
        );
        sender_pool.close().await;
        producer.shutdown().await;
        consumer.shutdown().await;
    })
    .await;
    server.stop().await.unwrap();
}

/// A sender whose transaction the database ended inside the closure (as InnoDB ends one on
/// a deadlock), and which a check-back then fenced, commits nothing: the row its commit
/// finds is the fence's, not its own.
async fn a_sender_ended_and_fenced_meanwhile_commits_nothing<DB: TestDb>(pool: Pool<DB>) {
    let dir = tempfile::tempdir().unwrap();
    let server = payments_server(dir.path()).await;
    within(60, async {
        orders_schema(&pool).await;
        let checker =
            DbChecker::new(pool.clone()).with_max_local_transaction(Duration::from_secs(1));
        let (producer, consumer) = payments_clients(&server, checker).await;
        let err = db::send_in_transaction(&producer, &pool, Message::new("payments", "late"), {
            let pool = pool.clone();
            |tx| {
                Box::pin(async move {
                    DB::exec(tx, "INSERT INTO orders (id) VALUES (1)".into()).await?;
                    DB::exec(tx, "ROLLBACK".into()).await?;
                    let fenced = "SELECT COUNT(*) FROM txmq_tx_log WHERE state = 'R'";
                    until_count(&pool, fenced, 1).await;
                    Ok::<_, sqlx::Error>(())
                })
            }
        })
        .await
        .unwrap_err();
        assert!(
            matches!(err, SendInTransactionError::Aborted { .. }),
            "{err:?}"
        );
        assert_eq!(
            drain(&consumer, Duration::from_secs(2)).await,
            HashMap::new()
        );
        let orders = DB::scalar(&pool, "SELECT COUNT(*) FROM orders".into())
            .await
            .unwrap();
        assert_eq!(orders, 0);
        let committed = "SELECT COUNT(*) FROM txmq_tx_log WHERE state = 'C'";
        assert_eq!(DB::scalar(&pool, committed.into()).await.unwrap(), 0);
        producer.shutdown().await;
        consumer.shutdown().await;
    })
    .await;
    server.stop().await.unwrap();
}

/// A check-back fences only transactions `send_in_transaction` marked with its own log: one
/// sent with `begin` by hand, or recorded in another database's log, is answered UNKNOWN
/// and left for its own sender (here: committed by hand), with no row written.
async fn only_transactions_marked_with_its_own_log_are_fenced<DB: TestDb>(pool: Pool<DB>) {
    let dir = tempfile::tempdir().unwrap();
    let server = payments_server(dir.path()).await;
    within(60, async {
        orders_schema(&pool).await;
        let checker = DbChecker::new(pool.clone())
            .with_max_local_transaction(Duration::from_secs(1))
            .with_lock_wait(Duration::from_secs(1));
        let watched = Watched::new(checker, false);
        let (producer, consumer) = payments_clients(&server, watched.clone()).await;

        // Its sender committed its own database and crashed before the message commit.
        let plain = producer
            .begin(Message::new("payments", "plain"))
            .await
            .unwrap();
        // The property's name is a wire format between versions: spelled out.
        let foreign = producer
            .begin(Message::new("payments", "foreign").with_property("txmq-db-log", "elsewhere"))
            .await
            .unwrap();
        let resumable = [&plain, &foreign].map(|t| {
            let ids = (t.topic(), t.message_id(), t.transaction_id());
            (ids.0.to_string(), ids.1.to_string(), ids.2.to_string())
        });
        drop((plain, foreign));
        send_orphan(&producer, &pool, "orphan").await;

        // Once this log's orphan is fenced, the others are older than
        // max_local_transaction too; ask each once more.
        watched
            .until_answered("orphan", TransactionResolution::Rollback)
            .await;
        let answers = watched.next_answers(&["plain", "foreign"]).await;
        assert!(
            answers.iter().all(|r| *r == TransactionResolution::Unknown),
            "{answers:?}"
        );
        let rows = DB::scalar(&pool, "SELECT COUNT(*) FROM txmq_tx_log".into())
            .await
            .unwrap();
        assert_eq!(rows, 1, "only the orphan's fence row");

        for (topic, message_id, transaction_id) in resumable {
            producer
                .resume(topic, message_id, transaction_id)
                .commit()
                .await
                .unwrap();
        }
        let got = drain(&consumer, Duration::from_secs(3)).await;
        assert_eq!(
            got,
            HashMap::from([("plain".to_string(), 1), ("foreign".to_string(), 1)])
        );
        producer.shutdown().await;
        consumer.shutdown().await;
    })
    .await;
    server.stop().await.unwrap();
}

/// A transaction whose database transaction committed, whose log row a cleanup deleted
/// before any check-back came, is answered UNKNOWN (left for an operator), not fenced; a
/// transaction born after the cleanup is fenced as before.
async fn a_committed_transaction_whose_log_row_was_cleaned_up_is_not_rolled_back<DB: TestDb>(
    pool: Pool<DB>,
) {
    let dir = tempfile::tempdir().unwrap();
    let server = payments_server(dir.path()).await;
    within(60, async {
        orders_schema(&pool).await;
        let checker = DbChecker::new(pool.clone())
            .with_max_local_transaction(Duration::from_secs(1))
            .with_lock_wait(Duration::from_secs(1));
        let watched = Watched::new(checker, true);
        let (producer, consumer) = payments_clients(&server, watched.clone()).await;

        send_and_crash_after_commit(&producer, &pool, "committed", 1).await;
        // Older than the cut-off by the database's clock, to the millisecond.
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(db::cleanup_log(&pool, Duration::ZERO).await.unwrap(), 1);
        tokio::time::sleep(Duration::from_millis(20)).await;
        send_orphan(&producer, &pool, "orphan").await;
        watched.paused.store(false, Ordering::SeqCst);

        watched
            .until_answered("orphan", TransactionResolution::Rollback)
            .await;
        let answers = watched.next_answers(&["committed"]).await;
        assert!(
            answers.iter().all(|r| *r == TransactionResolution::Unknown),
            "{answers:?}"
        );
        let fenced = DB::scalar(
            &pool,
            "SELECT COUNT(*) FROM txmq_tx_log WHERE state = 'R'".into(),
        )
        .await
        .unwrap();
        assert_eq!(fenced, 1, "only the orphan's fence row");
        let orders = DB::scalar(&pool, "SELECT COUNT(*) FROM orders".into())
            .await
            .unwrap();
        assert_eq!(orders, 1);
        assert!(drain(&consumer, Duration::from_secs(1)).await.is_empty());
        producer.shutdown().await;
        consumer.shutdown().await;
    })
    .await;
    server.stop().await.unwrap();
}

/// Log and inbox rows are stamped, and aged by the cleanups, with the database's clock,
/// not the client's: a session clock set two days ahead stands for a database whose clock
/// has moved on while this client's has not (a client clock behind).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mariadb_rows_are_stamped_and_aged_by_the_database_clock() {
    with_scratch::<MySql, _, _>(|pool| async move {
        let dir = tempfile::tempdir().unwrap();
        let server = payments_server(dir.path()).await;
        within(60, async {
            orders_schema(&pool).await;
            let (producer, consumer) =
                payments_clients(&server, DbChecker::new(pool.clone())).await;
            let options = (*pool.connect_options()).clone();
            let later = sqlx::mysql::MySqlPoolOptions::new()
                .max_connections(2)
                .after_connect(|conn, _| {
                    Box::pin(async move {
                        sqlx::query("SET timestamp = UNIX_TIMESTAMP() + 2 * 86400")
                            .execute(conn)
                            .await
                            .map(drop)
                    })
                })
                .connect_with(options)
                .await
                .unwrap();

            // Written now; a day's retention, two days later, deletes them.
            db::send_in_transaction(&producer, &pool, Message::new("payments", "now"), |tx| {
                Box::pin(async move {
                    MySql::exec(tx, "INSERT INTO orders (id) VALUES (1)".into()).await
                })
            })
            .await
            .unwrap()
            .message_commit
            .unwrap();
            let m = loop {
                let mut got = consumer.receive(1, Duration::from_secs(30)).await.unwrap();
                if let Some(m) = got.pop() {
                    break m;
                }
            };
            consumer.ack(&m).await.unwrap();
            let done = db::process_once(&pool, "shipping", &m, |_tx, _m| {
                Box::pin(async { Ok::<_, sqlx::Error>(()) })
            })
            .await;
            assert_eq!(done.unwrap(), Processed::Done(()));
            let day = Duration::from_secs(86400);
            assert_eq!(db::cleanup_log(&later, day).await.unwrap(), 1);
            assert_eq!(db::cleanup_inbox(&later, day).await.unwrap(), 1);

            // Written two days later: stamped then.
            db::send_in_transaction(&producer, &later, Message::new("payments", "later"), |tx| {
                Box::pin(async move {
                    MySql::exec(tx, "INSERT INTO orders (id) VALUES (2)".into()).await
                })
            })
            .await
            .unwrap()
            .message_commit
            .unwrap();
            let done = db::process_once(&later, "billing", &m, |_tx, _m| {
                Box::pin(async { Ok::<_, sqlx::Error>(()) })
            })
            .await;
            assert_eq!(done.unwrap(), Processed::Done(()));
            for sql in [
                "SELECT COUNT(*) FROM txmq_tx_log WHERE created_at > (UNIX_TIMESTAMP() - 60) * 1000",
                "SELECT COUNT(*) FROM txmq_inbox WHERE processed_at > (UNIX_TIMESTAMP() - 60) * 1000",
            ] {
                assert_eq!(MySql::scalar(&later, sql.into()).await.unwrap(), 1, "{sql}");
            }
            later.close().await;
            producer.shutdown().await;
            consumer.shutdown().await;
        })
        .await;
        server.stop().await.unwrap();
    })
    .await;
}

/// Makes the inbox's tables and `shipments` (`message_id`, and the `run` that wrote it),
/// sends one message to `paid` and receives it in group `logistics`, invisible for
/// `invisible`; the producer and consumer stay open.
async fn one_paid_delivery<DB: TestDb>(
    server: &txmq_broker::server::Server,
    pool: &Pool<DB>,
    invisible: Duration,
) -> (txmq_client::Producer, SimpleConsumer, MessageView) {
    db::migrate(pool).await.unwrap();
    DB::exec_pool(
        pool,
        "CREATE TABLE shipments (message_id VARCHAR(128) PRIMARY KEY, run VARCHAR(8))".into(),
    )
    .await
    .unwrap();
    let producer = txmq_client::Producer::connect(client(server), ["paid"])
        .await
        .unwrap();
    producer
        .send(Message::new("paid", "order 1"))
        .await
        .unwrap();
    let consumer =
        SimpleConsumer::connect(client(server), "logistics", [Subscription::all("paid")])
            .await
            .unwrap();
    let m = loop {
        let mut got = consumer.receive(1, invisible).await.unwrap();
        if let Some(m) = got.pop() {
            break m;
        }
    };
    (producer, consumer, m)
}

/// A handler writing one shipment per message, counting its runs, failing if `fail`.
fn ship<DB: TestDb>(
    runs: Arc<AtomicU32>,
    fail: bool,
) -> impl for<'c> FnOnce(&'c mut DbTransaction<DB>, &'c MessageView) -> BoxFuture<'c, Result<(), String>>
{
    move |tx, m| {
        let sql = format!(
            "INSERT INTO shipments (message_id) VALUES ('{}')",
            m.message_id()
        );
        Box::pin(async move {
            runs.fetch_add(1, Ordering::SeqCst);
            DB::exec(tx, sql).await.map_err(|e| e.to_string())?;
            if fail {
                Err("handler failed".to_string())
            } else {
                Ok(())
            }
        })
    }
}

/// A message delivered twice to `process_once` runs the handler once; a failing handler
/// leaves nothing and the next delivery runs it.
async fn duplicate_delivery_runs_the_handler_once<DB: TestDb>(pool: Pool<DB>) {
    let dir = tempfile::tempdir().unwrap();
    let server = paid_server(dir.path()).await;
    within(60, async {
        // Not acked, short invisibility: the server delivers it again.
        let (producer, consumer, first) =
            one_paid_delivery(&server, &pool, Duration::from_secs(1)).await;
        let runs = Arc::new(AtomicU32::new(0));
        let failed =
            db::process_once(&pool, "logistics", &first, ship::<DB>(runs.clone(), true)).await;
        assert!(
            matches!(failed, Err(ProcessError::Handler(_))),
            "{failed:?}"
        );
        let done =
            db::process_once(&pool, "logistics", &first, ship::<DB>(runs.clone(), false)).await;
        assert_eq!(done.unwrap(), Processed::Done(()));

        let again: MessageView = loop {
            let mut got = consumer.receive(1, Duration::from_secs(30)).await.unwrap();
            if let Some(m) = got.pop() {
                break m;
            }
        };
        assert_eq!(again.message_id(), first.message_id());
        assert!(again.delivery_attempt() > first.delivery_attempt());
        let dup =
            db::process_once(&pool, "logistics", &again, ship::<DB>(runs.clone(), false)).await;
        assert_eq!(dup.unwrap(), Processed::Duplicate);
        consumer.ack(&again).await.unwrap();
        // Another group processes it on its own.
        let other = db::process_once(&pool, "billing", &again, |_tx, _m| {
            Box::pin(async { Ok::<_, String>(()) })
        })
        .await;
        assert_eq!(other.unwrap(), Processed::Done(()));

        assert_eq!(runs.load(Ordering::SeqCst), 2); // the failed run and the committed one
        let shipments = DB::scalar(&pool, "SELECT COUNT(*) FROM shipments".into())
            .await
            .unwrap();
        assert_eq!(shipments, 1);
        assert_eq!(
            db::cleanup_inbox(&pool, Duration::from_secs(3600))
                .await
                .unwrap(),
            0
        );
        assert_eq!(db::cleanup_inbox(&pool, Duration::ZERO).await.unwrap(), 2);
        producer.shutdown().await;
        consumer.shutdown().await;
    })
    .await;
    server.stop().await.unwrap();
}

/// A delivery whose transaction the database ended under its handler is not reported done
/// when another delivery of the same message has committed the inbox row meanwhile (a
/// deadlock's victim stops holding the row, and the delivery waiting for it goes on): the
/// row it reads back before its commit is not its own.
async fn an_ended_delivery_is_not_done_by_another_deliverys_row<DB: TestDb>(pool: Pool<DB>) {
    let dir = tempfile::tempdir().unwrap();
    let server = paid_server(dir.path()).await;
    within(60, async {
        let (producer, consumer, m) =
            one_paid_delivery(&server, &pool, Duration::from_secs(30)).await;
        let other = pool.clone();
        let first = db::process_once(&pool, "logistics", &m, |tx, m| {
            Box::pin(async move {
                let sql = format!(
                    "INSERT INTO shipments (message_id, run) VALUES ('{}', 'first')",
                    m.message_id()
                );
                DB::exec(tx, sql).await?;
                // Ended as InnoDB ends a deadlock's victim; the handler goes on.
                DB::exec(tx, "ROLLBACK".into()).await?;
                let second = db::process_once(&other, "logistics", m, |tx, m| {
                    let sql = format!(
                        "INSERT INTO shipments (message_id, run) VALUES ('{}', 'second')",
                        m.message_id()
                    );
                    Box::pin(async move { DB::exec(tx, sql).await })
                })
                .await;
                assert_eq!(second.unwrap(), Processed::Done(()));
                Ok::<_, sqlx::Error>(())
            })
        })
        .await;
        if DB::TELLS_ENDED_TRANSACTIONS {
            assert!(matches!(first, Err(ProcessError::Aborted)), "{first:?}");
        } else {
            assert!(matches!(first, Err(ProcessError::Database(_))), "{first:?}");
        }
        let shipped = DB::scalar(
            &pool,
            "SELECT COUNT(*) FROM shipments WHERE run = 'second'".into(),
        )
        .await
        .unwrap();
        let all = DB::scalar(&pool, "SELECT COUNT(*) FROM shipments".into())
            .await
            .unwrap();
        assert_eq!((all, shipped), (1, 1));
        let again = db::process_once(&pool, "logistics", &m, |_tx, _m| {
            Box::pin(async { Ok::<_, sqlx::Error>(()) })
        })
        .await;
        assert_eq!(again.unwrap(), Processed::Duplicate);
        consumer.ack(&m).await.unwrap();
        producer.shutdown().await;
        consumer.shutdown().await;
    })
    .await;
    server.stop().await.unwrap();
}

/// The fence sets InnoDB's lock wait for itself only: its connection goes back to the
/// pool with the lock wait it had, not the server's default, also after a fence that was
/// cut short.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mariadb_the_fence_gives_its_connection_back_with_the_lock_wait_it_had() {
    with_scratch::<MySql, _, _>(|pool| async move {
        let dir = tempfile::tempdir().unwrap();
        let server = payments_server(dir.path()).await;
        within(60, async {
            db::migrate(&pool).await.unwrap();
            let options = (*pool.connect_options()).clone();
            let checker_pool = sqlx::mysql::MySqlPoolOptions::new()
                .max_connections(1)
                .after_connect(|conn, _| {
                    Box::pin(async move {
                        sqlx::query("SET SESSION innodb_lock_wait_timeout = 17")
                            .execute(conn)
                            .await
                            .map(drop)
                    })
                })
                .connect_with(options)
                .await
                .unwrap();
            let checker = DbChecker::new(checker_pool.clone())
                .with_max_local_transaction(Duration::from_secs(1))
                .with_lock_wait(Duration::from_secs(2));
            let producer = TransactionalProducer::connect(client(&server), ["payments"], checker)
                .await
                .unwrap();
            // Left open with no log row: a check-back fences it once it is a second old.
            // The checker's connection then has the lock wait it had.
            let fenced_orphan = async |fenced: i64| {
                send_orphan(&producer, &pool, &format!("orphan {fenced}")).await;
                let sql = "SELECT COUNT(*) FROM txmq_tx_log WHERE state = 'R'";
                until_count(&pool, sql, fenced).await;
                let sql = "SELECT CAST(@@SESSION.innodb_lock_wait_timeout AS SIGNED)";
                assert_eq!(MySql::scalar(&checker_pool, sql.into()).await.unwrap(), 17);
            };
            fenced_orphan(1).await;
            // What a fence cut short before its reset leaves on the connection: its own
            // lock wait kept aside, the fence's in force. The next fence puts it back.
            MySql::exec_pool(
                &checker_pool,
                "SET @txmq_lock_wait = 17, SESSION innodb_lock_wait_timeout = 2".into(),
            )
            .await
            .unwrap();
            fenced_orphan(2).await;
            producer.shutdown().await;
            checker_pool.close().await;
        })
        .await;
        server.stop().await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_every_outcome_of_a_transactional_send() {
    with_scratch::<Postgres, _, _>(every_outcome_of_a_transactional_send).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mariadb_every_outcome_of_a_transactional_send() {
    with_scratch::<MySql, _, _>(every_outcome_of_a_transactional_send).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_every_outcome_of_a_transactional_send() {
    with_scratch::<Sqlite, _, _>(every_outcome_of_a_transactional_send).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_duplicate_delivery_runs_the_handler_once() {
    with_scratch::<Postgres, _, _>(duplicate_delivery_runs_the_handler_once).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mariadb_duplicate_delivery_runs_the_handler_once() {
    with_scratch::<MySql, _, _>(duplicate_delivery_runs_the_handler_once).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_duplicate_delivery_runs_the_handler_once() {
    with_scratch::<Sqlite, _, _>(duplicate_delivery_runs_the_handler_once).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_an_ended_delivery_is_not_done_by_another_deliverys_row() {
    with_scratch::<Postgres, _, _>(an_ended_delivery_is_not_done_by_another_deliverys_row).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mariadb_an_ended_delivery_is_not_done_by_another_deliverys_row() {
    with_scratch::<MySql, _, _>(an_ended_delivery_is_not_done_by_another_deliverys_row).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_an_ended_delivery_is_not_done_by_another_deliverys_row() {
    with_scratch::<Sqlite, _, _>(an_ended_delivery_is_not_done_by_another_deliverys_row).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_a_sender_fenced_by_the_check_back_writes_nothing() {
    with_scratch::<Postgres, _, _>(a_sender_fenced_by_the_check_back_writes_nothing).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mariadb_a_sender_fenced_by_the_check_back_writes_nothing() {
    with_scratch::<MySql, _, _>(a_sender_fenced_by_the_check_back_writes_nothing).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_a_sender_fenced_by_the_check_back_writes_nothing() {
    with_scratch::<Sqlite, _, _>(a_sender_fenced_by_the_check_back_writes_nothing).await;
}

/// A COMMIT the database refuses for certain (a deferred unique constraint: SQLSTATE 23505)
/// rolls the message back at once, without waiting for a check-back, and writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_a_commit_the_database_refuses_rolls_the_message_back_at_once() {
    with_scratch::<Postgres, _, _>(|pool: Pool<Postgres>| async move {
        let dir = tempfile::tempdir().unwrap();
        let server = payments_server(dir.path()).await;
        within(60, async {
            orders_schema(&pool).await;
            let deferred = "CREATE TABLE refs (r BIGINT UNIQUE DEFERRABLE INITIALLY DEFERRED)";
            Postgres::exec_pool(&pool, deferred.into()).await.unwrap();
            let watched = Watched::new(DbChecker::new(pool.clone()), false);
            let (producer, consumer) = payments_clients(&server, watched.clone()).await;
            let message = Message::new("payments", "refused");
            let err = db::send_in_transaction(&producer, &pool, message, |tx| {
                Box::pin(async move {
                    Postgres::exec(tx, "INSERT INTO orders (id) VALUES (1)".into()).await?;
                    Postgres::exec(tx, "INSERT INTO refs (r) VALUES (7), (7)".into()).await?;
                    Ok::<_, sqlx::Error>(())
                })
            })
            .await
            .unwrap_err();
            match &err {
                SendInTransactionError::Database(sqlx::Error::Database(e)) => {
                    assert_eq!(e.code().as_deref(), Some("23505"), "{e}");
                }
                other => panic!("{other:?}"),
            }
            let txs = server.broker.transactions().list(&[
                TxState::Prepared,
                TxState::Committed,
                TxState::RolledBack,
                TxState::Unresolved,
            ]);
            assert_eq!(txs.len(), 1, "{txs:?}");
            assert_eq!((txs[0].state, txs[0].checks), (TxState::RolledBack, 0));
            assert_eq!(
                drain(&consumer, Duration::from_secs(2)).await,
                HashMap::new()
            );
            assert!(watched.answers_to("refused").is_empty());
            for table in ["orders", "refs", "txmq_tx_log"] {
                let sql = format!("SELECT COUNT(*) FROM {table}");
                assert_eq!(Postgres::scalar(&pool, sql).await.unwrap(), 0, "{table}");
            }
            producer.shutdown().await;
            consumer.shutdown().await;
        })
        .await;
        server.stop().await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_a_transaction_the_database_ended_commits_nothing() {
    with_scratch::<Postgres, _, _>(a_transaction_the_database_ended_commits_nothing).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mariadb_a_transaction_the_database_ended_commits_nothing() {
    with_scratch::<MySql, _, _>(a_transaction_the_database_ended_commits_nothing).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_a_transaction_the_database_ended_commits_nothing() {
    with_scratch::<Sqlite, _, _>(a_transaction_the_database_ended_commits_nothing).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_only_transactions_marked_with_its_own_log_are_fenced() {
    with_scratch::<Postgres, _, _>(only_transactions_marked_with_its_own_log_are_fenced).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mariadb_only_transactions_marked_with_its_own_log_are_fenced() {
    with_scratch::<MySql, _, _>(only_transactions_marked_with_its_own_log_are_fenced).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_only_transactions_marked_with_its_own_log_are_fenced() {
    with_scratch::<Sqlite, _, _>(only_transactions_marked_with_its_own_log_are_fenced).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_a_committed_transaction_whose_log_row_was_cleaned_up_is_not_rolled_back() {
    with_scratch::<Postgres, _, _>(
        a_committed_transaction_whose_log_row_was_cleaned_up_is_not_rolled_back,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mariadb_a_committed_transaction_whose_log_row_was_cleaned_up_is_not_rolled_back() {
    with_scratch::<MySql, _, _>(
        a_committed_transaction_whose_log_row_was_cleaned_up_is_not_rolled_back,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_a_committed_transaction_whose_log_row_was_cleaned_up_is_not_rolled_back() {
    with_scratch::<Sqlite, _, _>(
        a_committed_transaction_whose_log_row_was_cleaned_up_is_not_rolled_back,
    )
    .await;
}

/// A check-back reads only committed log rows, whatever the isolation level of the pool it
/// reads with: on a pool whose sessions read uncommitted rows, a sender's log row written
/// but not yet committed is not taken for a commit. The sender then rolls back, and nothing
/// is delivered; a send that committed is still answered COMMIT from that pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mariadb_a_check_back_reads_only_committed_rows_on_a_read_uncommitted_pool() {
    with_scratch::<MySql, _, _>(|pool| async move {
        let dir = tempfile::tempdir().unwrap();
        let server = payments_server(dir.path()).await;
        within(60, async {
            orders_schema(&pool).await;
            let options = (*pool.connect_options()).clone();
            let dirty_pool = sqlx::mysql::MySqlPoolOptions::new()
                .max_connections(3)
                .after_connect(|conn, _| {
                    Box::pin(async move {
                        sqlx::query("SET SESSION TRANSACTION ISOLATION LEVEL READ UNCOMMITTED")
                            .execute(conn)
                            .await
                            .map(drop)
                    })
                })
                .connect_with(options)
                .await
                .unwrap();
            let watched = Watched::new(DbChecker::new(dirty_pool.clone()), false);
            let (producer, consumer) = payments_clients(&server, watched.clone()).await;
            // The sender's log row and order are written; it waits, open, through two
            // check-backs (or until one answers otherwise than UNKNOWN), then fails.
            let err = db::send_in_transaction(
                &producer,
                &dirty_pool,
                Message::new("payments", "open"),
                |tx| {
                    let (watched, dirty_pool) = (watched.clone(), dirty_pool.clone());
                    Box::pin(async move {
                        MySql::exec(tx, "INSERT INTO orders (id) VALUES (1)".into())
                            .await
                            .map_err(|e| e.to_string())?;
                        let id: String =
                            sqlx::query_scalar("SELECT transaction_id FROM txmq_tx_log")
                                .fetch_one(&mut **tx)
                                .await
                                .map_err(|e| e.to_string())?;
                        // What the checker reads, from the pool that sees the row.
                        let state = <MySql as Dialect>::log_state(&dirty_pool, &id).await;
                        assert_eq!(state.map_err(|e| e.to_string()), Ok(None));
                        watched.next_answers(&["open"]).await;
                        watched.next_answers(&["open"]).await;
                        Err::<(), _>("payment declined".to_string())
                    })
                },
            )
            .await
            .unwrap_err();
            assert!(
                matches!(&err, SendInTransactionError::Local(e) if e == "payment declined"),
                "{err:?}"
            );
            let answers = watched.answers_to("open");
            assert!(
                answers.iter().all(|r| *r == TransactionResolution::Unknown),
                "{answers:?}"
            );
            // Committed, and left to the check-back: read from the same pool, it commits.
            send_and_crash_after_commit(&producer, &dirty_pool, "paid", 2).await;
            watched
                .until_answered("paid", TransactionResolution::Commit)
                .await;
            assert_eq!(
                drain(&consumer, Duration::from_secs(2)).await,
                HashMap::from([("paid".to_string(), 1)])
            );
            for table in ["orders", "txmq_tx_log"] {
                let sql = format!("SELECT COUNT(*) FROM {table}");
                assert_eq!(MySql::scalar(&pool, sql).await.unwrap(), 1, "{table}");
            }
            producer.shutdown().await;
            consumer.shutdown().await;
            dirty_pool.close().await;
        })
        .await;
        server.stop().await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_a_sender_ended_and_fenced_meanwhile_commits_nothing() {
    with_scratch::<Postgres, _, _>(a_sender_ended_and_fenced_meanwhile_commits_nothing).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mariadb_a_sender_ended_and_fenced_meanwhile_commits_nothing() {
    with_scratch::<MySql, _, _>(a_sender_ended_and_fenced_meanwhile_commits_nothing).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_a_sender_ended_and_fenced_meanwhile_commits_nothing() {
    with_scratch::<Sqlite, _, _>(a_sender_ended_and_fenced_meanwhile_commits_nothing).await;
}
