//! The outbox and relay on each real database (PostgreSQL, MariaDB, SQLite) with a real
//! sink (Redis Streams): rolled-back rows never published, transactions committing out of
//! order, per-key order, a poison row going dead, redrive and drop, cleanup, the fast path
//! (and what it leaves to the relay), ids compared byte for byte on MariaDB, the relay
//! settings refused, and faults: a sink that panics, a pool of one connection with LISTEN,
//! a short `idle_in_transaction_session_timeout`, a claim's connection killed during a
//! publish (PostgreSQL and MariaDB).
//!
//! Each test makes its own schema (PostgreSQL), database (MariaDB) or file (SQLite) and
//! Redis keys, and removes them. A service that is not running skips the test, except
//! under `CI=true`, where it fails.

use std::collections::HashMap;
use std::future::Future;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, SystemTime};

use redis::AsyncCommands;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{MySql, Pool, Postgres, Sqlite};
use txmq_outbox::sink::BoxFuture;
use txmq_outbox::sink::redis::RedisSink;
use txmq_outbox::{
    Outbox, OutboxDb, OutboxMessage, OutboxRow, Relay, RelayConfig, RelayConfigError, RetryPolicy,
    Sink, SinkError,
};
use txmq_testkit::{ScratchDb, down, guarded, unique};

const REDIS: &str = "redis://127.0.0.1:6379";

/// A database for these tests: the size of its scratch pool, and what it can do.
trait TestDb: OutboxDb + ScratchDb {
    /// The connections of the scratch database's pool.
    const POOL_SIZE: u32 = 8;
    /// Whether two write transactions can be open at once.
    const CONCURRENT_WRITERS: bool = true;
}

impl TestDb for Postgres {}

impl TestDb for MySql {}

impl TestDb for Sqlite {
    const POOL_SIZE: u32 = 4;
    const CONCURRENT_WRITERS: bool = false;
}

/// A Redis connection, or `None` (skip) when Redis is down.
async fn redis() -> Option<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(REDIS).unwrap();
    match client.get_multiplexed_async_connection().await {
        Ok(c) => Some(c),
        Err(e) => {
            down("Redis at 127.0.0.1:6379", e);
            None
        }
    }
}

/// The `id` fields of a stream, in order.
async fn ids(conn: &mut redis::aio::MultiplexedConnection, stream: &str) -> Vec<String> {
    let reply: redis::streams::StreamRangeReply = conn.xrange_all(stream).await.unwrap();
    reply
        .ids
        .iter()
        .map(|e| e.get::<String>("id").expect("every entry has an id field"))
        .collect()
}

fn config() -> RelayConfig {
    RelayConfig {
        batch_size: 100,
        retry: RetryPolicy {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(100),
            max_attempts: 3,
        },
        lease: Duration::from_secs(5),
        publish_timeout: Duration::from_secs(4),
        ..RelayConfig::default()
    }
}

/// Runs batches until nothing is pending, or 20 s.
async fn drain<DB: OutboxDb>(relay: &Relay<DB>, pool: &Pool<DB>) {
    drain_to(relay, pool, 0).await;
}

/// Runs batches until `left` rows are pending (held by a dead row of their key), or 20 s.
async fn drain_to<DB: OutboxDb>(relay: &Relay<DB>, pool: &Pool<DB>, left: i64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let n = relay.run_once().await.unwrap();
        let s = txmq_outbox::stats(pool).await.unwrap();
        if n == 0 && s.pending == left && s.retrying == 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "outbox not drained: {:?}, last batch {n}, metrics {:?}",
            txmq_outbox::stats(pool).await,
            relay.metrics()
        );
        if n == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn enqueue_committed<DB: OutboxDb>(pool: &Pool<DB>, messages: Vec<OutboxMessage>) {
    let mut tx = pool.begin().await.unwrap();
    for m in messages {
        Outbox::new().enqueue(&mut tx, m).await.unwrap();
    }
    tx.commit().await.unwrap();
}

async fn everything<DB: TestDb>(pool: Pool<DB>) {
    let Some(mut conn) = redis().await else {
        return;
    };
    let stream = unique("txmq_ob_stream");
    let poison = unique("txmq_ob_poison");
    // A string key: XADD to it always fails (WRONGTYPE).
    let _: () = conn.set(&poison, "not a stream").await.unwrap();
    txmq_outbox::migrate(&pool).await.unwrap();
    txmq_outbox::migrate(&pool).await.unwrap(); // idempotent
    let relay = Relay::new(
        pool.clone(),
        Box::new(RedisSink::connect(REDIS).await.unwrap()),
        config(),
    )
    .expect("valid relay settings");
    let m = |id: &str| OutboxMessage::new(stream.as_str(), id.as_bytes().to_vec()).with_id(id);

    // Committed and rolled back.
    enqueue_committed(&pool, vec![m("c1"), m("c2"), m("c3")]).await;
    let mut tx = pool.begin().await.unwrap();
    Outbox::new().enqueue(&mut tx, m("r1")).await.unwrap();
    tx.rollback().await.unwrap();

    // A duplicate id is refused and leaves the first.
    let mut tx = pool.begin().await.unwrap();
    let dup = Outbox::new().enqueue(&mut tx, m("c1")).await.unwrap_err();
    assert!(
        matches!(dup, txmq_outbox::EnqueueError::DuplicateId(_)),
        "{dup:?}"
    );
    tx.rollback().await.unwrap();
    drain(&relay, &pool).await;
    assert_eq!(ids(&mut conn, &stream).await, ["c1", "c2", "c3"]);

    // Out of order: the earlier row commits after the later one and is still published.
    if DB::CONCURRENT_WRITERS {
        let mut early = pool.begin().await.unwrap();
        Outbox::new().enqueue(&mut early, m("early")).await.unwrap();
        enqueue_committed(&pool, vec![m("late")]).await;
        drain(&relay, &pool).await;
        early.commit().await.unwrap();
        drain(&relay, &pool).await;
        assert_eq!(
            ids(&mut conn, &stream).await,
            ["c1", "c2", "c3", "late", "early"]
        );
    }

    // Per-key order, with a poison row holding its key's later rows.
    let k = |id: &str, dest: &str| {
        OutboxMessage::new(dest, id.as_bytes().to_vec())
            .with_id(id)
            .with_key("order-7")
            .ordered()
    };
    enqueue_committed(
        &pool,
        vec![
            k("k1", &stream),
            k("k2", &stream),
            k("k3-poison", &poison),
            k("k4", &stream),
            m("free"),
        ],
    )
    .await;
    drain_to(&relay, &pool, 1).await;
    let got = ids(&mut conn, &stream).await;
    let tail: Vec<&str> = got.iter().skip(got.len() - 3).map(String::as_str).collect();
    assert!(tail.contains(&"free"), "{got:?}");
    let keyed: Vec<&str> = tail.iter().copied().filter(|i| *i != "free").collect();
    assert_eq!(keyed, ["k1", "k2"], "{got:?}");
    let dead = txmq_outbox::dead(&pool, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].id, "k3-poison");
    assert_eq!(dead[0].attempts, 3);
    assert!(
        dead[0]
            .last_error
            .as_deref()
            .unwrap_or_default()
            .contains("WRONGTYPE"),
        "{dead:?}"
    );
    let metrics = relay.metrics();
    assert_eq!(metrics.dead_lettered(), 1);
    assert_eq!(metrics.failed_attempts(), 3);

    // Redrive: it fails again and goes dead again; dropping it releases k4.
    assert_eq!(txmq_outbox::redrive(&pool, None).await.unwrap(), 1);
    drain_to(&relay, &pool, 1).await;
    assert_eq!(txmq_outbox::dead(&pool, 10).await.unwrap().len(), 1);
    assert!(!ids(&mut conn, &stream).await.contains(&"k4".to_string()));
    assert_eq!(
        txmq_outbox::drop_dead(&pool, &["k3-poison".to_string()])
            .await
            .unwrap(),
        1
    );
    drain(&relay, &pool).await;
    assert_eq!(ids(&mut conn, &stream).await.last().unwrap(), "k4");

    // Fast path: published at once, and not again by the relay.
    let sink = RedisSink::connect(REDIS).await.unwrap();
    let outbox = Outbox::new();
    let mut tx = pool.begin().await.unwrap();
    let fast = vec![
        outbox.enqueue_fast(&mut tx, m("fast1")).await.unwrap(),
        outbox.enqueue_fast(&mut tx, m("fast2")).await.unwrap(),
    ];
    let report = outbox
        .commit_and_publish(tx, &pool, &sink as &dyn Sink, fast)
        .await
        .unwrap();
    assert_eq!((report.published, report.left_to_relay), (2, 0));
    drain(&relay, &pool).await;
    let all = ids(&mut conn, &stream).await;
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for id in &all {
        *counts.entry(id.as_str()).or_default() += 1;
    }
    assert!(
        counts.values().all(|n| *n == 1),
        "a row published twice: {all:?}"
    );
    assert_eq!(counts.get("fast1"), Some(&1));
    assert!(!counts.contains_key("r1"));

    // Cleanup deletes delivered rows only (those delivered before now).
    tokio::time::sleep(Duration::from_millis(5)).await;
    let deleted = txmq_outbox::cleanup(&pool, Duration::ZERO, 2)
        .await
        .unwrap();
    assert_eq!(deleted as usize, all.len());
    assert_eq!(txmq_outbox::stats(&pool).await.unwrap().pending, 0);

    let _: () = conn.del(&[&stream, &poison]).await.unwrap();
}

/// Runs `test` on a scratch database of `DB`, dropping it afterwards even if it fails.
async fn on_scratch<DB: TestDb, F, Fut>(test: F)
where
    F: FnOnce(Pool<DB>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let Some(scratch) = DB::scratch("txmq_ob", DB::POOL_SIZE).await else {
        return;
    };
    scratch
        .run(|pool| {
            let body = test(pool);
            async move {
                tokio::time::timeout(Duration::from_secs(120), body)
                    .await
                    .expect("finished in time");
            }
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outbox_and_relay() {
    on_scratch(everything::<Postgres>).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_outbox_and_relay() {
    on_scratch(everything::<MySql>).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_outbox_and_relay() {
    on_scratch(everything::<Sqlite>).await;
}

/// The fast path publishes only what may go out now: a message with a future `not_before`
/// and an ordered one are left to the relay, which publishes the ordered one at once and the
/// others not before their time; none of them counts a failed attempt.
async fn fast_path_leaves_to_the_relay<DB: TestDb>(pool: Pool<DB>) {
    let Some(mut conn) = redis().await else {
        return;
    };
    let stream = unique("txmq_ob_stream");
    let poison = unique("txmq_ob_poison");
    let _: () = conn.set(&poison, "not a stream").await.unwrap();
    txmq_outbox::migrate(&pool).await.unwrap();
    let relay = Relay::new(
        pool.clone(),
        Box::new(RedisSink::connect(REDIS).await.unwrap()),
        config(),
    )
    .expect("valid relay settings");
    let in_an_hour = SystemTime::now() + Duration::from_secs(3600);
    let m = |id: &str, dest: &str| OutboxMessage::new(dest, id.as_bytes().to_vec()).with_id(id);

    let sink = RedisSink::connect(REDIS).await.unwrap();
    let outbox = Outbox::new()
        .with_retry(config().retry)
        .expect("valid retry policy");
    let mut tx = pool.begin().await.unwrap();
    let mut fast = Vec::new();
    for message in [
        m("later", &stream).not_before(in_an_hour),
        m("later-poison", &poison).not_before(in_an_hour),
        m("keyed", &stream).with_key("order-9").ordered(),
        m("now", &stream),
    ] {
        fast.push(outbox.enqueue_fast(&mut tx, message).await.unwrap());
    }
    let left: Vec<bool> = fast.iter().map(|f| f.left_to_relay()).collect();
    assert_eq!(left, [true, true, true, false]);
    let report = outbox
        .commit_and_publish(tx, &pool, &sink as &dyn Sink, fast)
        .await
        .unwrap();
    assert_eq!((report.published, report.left_to_relay), (1, 3));
    assert_eq!(ids(&mut conn, &stream).await, ["now"]);

    // The relay publishes the ordered row; the others wait for their time, also past the
    // backoff a failed attempt would have had.
    tokio::time::sleep(Duration::from_millis(100)).await;
    drain_to(&relay, &pool, 2).await;
    assert_eq!(ids(&mut conn, &stream).await, ["now", "keyed"]);
    let s = txmq_outbox::stats(&pool).await.unwrap();
    assert_eq!((s.pending, s.retrying, s.dead), (2, 0, 0));

    let _: () = conn.del(&[&stream, &poison]).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_fast_path_leaves_future_and_ordered_messages_to_the_relay() {
    on_scratch(fast_path_leaves_to_the_relay::<Postgres>).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_fast_path_leaves_future_and_ordered_messages_to_the_relay() {
    on_scratch(fast_path_leaves_to_the_relay::<MySql>).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_fast_path_leaves_future_and_ordered_messages_to_the_relay() {
    on_scratch(fast_path_leaves_to_the_relay::<Sqlite>).await;
}

/// In a MariaDB database whose default character set is latin1 (case-insensitive
/// collation), the outbox table still compares ids byte for byte and holds any Unicode
/// text: ids differing only by case are two messages, dropping or redriving one leaves the
/// other, and non-Latin-1 ids, keys and headers go out unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_ids_differing_only_by_case_are_different_messages() {
    const ADMIN: &str = "mysql://root@127.0.0.1:3306/test";
    let admin = match sqlx::MySqlPool::connect(ADMIN).await {
        Ok(p) => p,
        Err(e) => return down("MariaDB at 127.0.0.1:3306", e),
    };
    let Some(mut conn) = redis().await else {
        return;
    };
    let name = unique("txmq_ob_latin1");
    sqlx::query(&format!("CREATE DATABASE {name} CHARACTER SET latin1"))
        .execute(&admin)
        .await
        .unwrap();
    let pool = MySql::connect(&format!("mysql://root@127.0.0.1:3306/{name}"), 4).await;
    let body_pool = pool.clone();
    let body = async move {
        let pool = body_pool;
        let stream = unique("txmq_ob_stream");
        let poison = unique("txmq_ob_poison");
        let _: () = conn.set(&poison, "not a stream").await.unwrap();
        txmq_outbox::migrate(&pool).await.unwrap();
        let mut once = config();
        once.retry.max_attempts = 1;
        let relay = Relay::new(
            pool.clone(),
            Box::new(RedisSink::connect(REDIS).await.unwrap()),
            once,
        )
        .expect("valid relay settings");
        let dead = |id: &str| OutboxMessage::new(poison.as_str(), "x").with_id(id);
        enqueue_committed(
            &pool,
            vec![
                dead("Order-1"),
                dead("order-1"),
                OutboxMessage::new(stream.as_str(), "x")
                    .with_id("заказ-1")
                    .with_key("ключ-€")
                    .with_header("名前", "値"),
            ],
        )
        .await;
        drain_to(&relay, &pool, 0).await;
        let entries: redis::streams::StreamRangeReply = conn.xrange_all(&stream).await.unwrap();
        assert_eq!(entries.ids.len(), 1);
        let entry = &entries.ids[0];
        assert_eq!(entry.get::<String>("id").as_deref(), Some("заказ-1"));
        assert_eq!(entry.get::<String>("key").as_deref(), Some("ключ-€"));
        assert_eq!(entry.get::<String>("h:名前").as_deref(), Some("値"));

        let dead_ids = |rows: Vec<txmq_outbox::RowSummary>| -> Vec<String> {
            rows.into_iter().map(|r| r.id).collect()
        };
        let rows = txmq_outbox::dead(&pool, 10).await.unwrap();
        assert_eq!(dead_ids(rows), ["Order-1", "order-1"]);
        let upper = ["ORDER-1".to_string()];
        assert_eq!(txmq_outbox::redrive(&pool, Some(&upper)).await.unwrap(), 0);
        let lower = ["order-1".to_string()];
        assert_eq!(txmq_outbox::drop_dead(&pool, &lower).await.unwrap(), 1);
        let rows = txmq_outbox::dead(&pool, 10).await.unwrap();
        assert_eq!(dead_ids(rows), ["Order-1"]);

        let _: () = conn.del(&[&stream, &poison]).await.unwrap();
    };
    guarded(body, async move {
        pool.close().await;
        sqlx::query(&format!("DROP DATABASE {name}"))
            .execute(&admin)
            .await
            .unwrap();
    })
    .await;
}

/// A zero backoff, and on SQLite a lease not longer than the publish timeout, are refused
/// with the setting named; PostgreSQL and MariaDB relays use no lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_refuses_a_zero_backoff_and_a_sqlite_lease_within_the_publish_timeout() {
    if redis().await.is_none() {
        return;
    }
    let sqlite = sqlx::SqlitePool::connect_lazy("sqlite::memory:").unwrap();
    let sink = async || txmq_outbox::sink::connect(REDIS).await.unwrap();
    let mut zero = config();
    zero.retry.initial = Duration::ZERO;
    let e = Relay::new(sqlite.clone(), sink().await, zero).err();
    assert_eq!(e, Some(RelayConfigError::ZeroBackoff("initial")));
    assert!(e.unwrap().to_string().contains("retry.initial"));

    let mut short = config();
    short.lease = short.publish_timeout;
    let e = Relay::new(sqlite.clone(), sink().await, short.clone()).err();
    assert!(
        matches!(
            e,
            Some(RelayConfigError::LeaseNotAbovePublishTimeout { .. })
        ),
        "{e:?}"
    );
    assert!(e.unwrap().to_string().contains("publish_timeout"));
    let postgres = sqlx::PgPool::connect_lazy("postgres://postgres@127.0.0.1:5432/test").unwrap();
    assert!(Relay::new(postgres, sink().await, short).is_ok());
}

/// A sink that panics on its first two calls (once before it returns its future, once
/// inside it), then publishes to Redis.
struct PanicsTwice {
    inner: RedisSink,
    calls: AtomicU32,
}

impl Sink for PanicsTwice {
    fn name(&self) -> &'static str {
        "panics-twice"
    }

    fn publish<'a>(&'a self, rows: &'a [OutboxRow]) -> BoxFuture<'a, Vec<Result<(), SinkError>>> {
        match self.calls.fetch_add(1, Ordering::SeqCst) {
            0 => panic!("the sink broke before publishing {} rows", rows.len()),
            1 => Box::pin(async move { panic!("the sink broke publishing {} rows", rows.len()) }),
            _ => self.inner.publish(rows),
        }
    }
}

/// Waits until `stream` holds `n` entries (10 s at most); its ids.
async fn await_ids(
    conn: &mut redis::aio::MultiplexedConnection,
    stream: &str,
    n: usize,
) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let got = ids(conn, stream).await;
        if got.len() >= n {
            return got;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{stream} holds {got:?}, not {n} entries"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A sink that panics does not stop a running relay: a call that panics is made again row
/// by row, a row whose call panics fails and goes out on a later attempt, and the worker
/// (the only one) goes on.
async fn panicking_sink<DB: TestDb>(pool: Pool<DB>) {
    let Some(mut conn) = redis().await else {
        return;
    };
    let stream = unique("txmq_ob_panics");
    txmq_outbox::migrate(&pool).await.unwrap();
    enqueue_committed(
        &pool,
        ["a", "b", "c"]
            .map(|id| OutboxMessage::new(&stream, id).with_id(id))
            .into(),
    )
    .await;
    let sink = PanicsTwice {
        inner: RedisSink::connect(REDIS).await.unwrap(),
        calls: AtomicU32::new(0),
    };
    let relay = Relay::new(
        pool.clone(),
        Box::new(sink),
        RelayConfig {
            workers: 1,
            poll_interval: Duration::from_millis(20),
            ..config()
        },
    )
    .unwrap();
    let metrics = relay.metrics();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(relay.run(async {
        stopped.await.ok();
    }));

    // Unordered rows: their backoffs' jitter decides which goes first.
    let mut published = await_ids(&mut conn, &stream, 3).await;
    published.sort();
    assert_eq!(published, ["a", "b", "c"]);
    stop.send(()).unwrap();
    running.await.unwrap();
    // The first call panics; made again row by row, the first row's call panics too (it
    // fails and goes out later), the other two rows go out at once.
    assert_eq!((metrics.panics(), metrics.failed_attempts()), (2, 1));
    let s = txmq_outbox::stats(&pool).await.unwrap();
    assert_eq!((s.pending, s.dead), (0, 0));
    let _: () = conn.del(&stream).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_relay_goes_on_after_its_sink_panics() {
    on_scratch(panicking_sink::<Postgres>).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_relay_goes_on_after_its_sink_panics() {
    on_scratch(panicking_sink::<MySql>).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_relay_goes_on_after_its_sink_panics() {
    on_scratch(panicking_sink::<Sqlite>).await;
}

/// The relay's LISTEN connection is not one of its pool's: with a pool of one connection,
/// the worker still claims, and a row inserted later is published at once on its NOTIFY
/// (the poll interval is a minute).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_listen_takes_no_connection_from_the_relays_pool() {
    let Some(mut conn) = redis().await else {
        return;
    };
    let Some(scratch) = Postgres::scratch("txmq_ob_listen", 1).await else {
        return;
    };
    scratch
        .run(|pool| async move {
            let stream = unique("txmq_ob_listen");
            txmq_outbox::migrate(&pool).await.unwrap();
            let m = |id: &str| OutboxMessage::new(&stream, id).with_id(id);
            enqueue_committed(&pool, vec![m("before")]).await;
            let relay = Relay::new(
                pool.clone(),
                Box::new(RedisSink::connect(REDIS).await.unwrap()),
                RelayConfig {
                    workers: 1,
                    poll_interval: Duration::from_secs(60),
                    keep_delivered: None,
                    ..config()
                },
            )
            .unwrap();
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let running = tokio::spawn(relay.run(async {
                stopped.await.ok();
            }));
            assert_eq!(await_ids(&mut conn, &stream, 1).await, ["before"]);
            enqueue_committed(&pool, vec![m("after")]).await;
            assert_eq!(await_ids(&mut conn, &stream, 2).await, ["before", "after"]);
            stop.send(()).unwrap();
            running.await.unwrap();
            let _: () = conn.del(&stream).await.unwrap();
        })
        .await;
}

/// A sink that runs `before` (a fault for the relay to meet), then takes `delay`, then
/// publishes to Redis.
struct Slow {
    inner: RedisSink,
    delay: Duration,
    before: Box<dyn Fn() -> BoxFuture<'static, ()> + Send + Sync>,
}

impl Sink for Slow {
    fn name(&self) -> &'static str {
        "slow"
    }

    fn publish<'a>(&'a self, rows: &'a [OutboxRow]) -> BoxFuture<'a, Vec<Result<(), SinkError>>> {
        Box::pin(async move {
            (self.before)().await;
            tokio::time::sleep(self.delay).await;
            self.inner.publish(rows).await
        })
    }
}

/// A pool on the scratch database `url` whose sessions are named `name` and whose server
/// ends a transaction idle for more than 300 ms.
async fn impatient_pool(url: &str, name: &str) -> Pool<Postgres> {
    let options = PgConnectOptions::from_str(url)
        .unwrap()
        .application_name(name)
        .options([("idle_in_transaction_session_timeout", "300")]);
    PgPoolOptions::new()
        .max_connections(2)
        .connect_with(options)
        .await
        .unwrap()
}

/// A claim's transaction outlasts the server's `idle_in_transaction_session_timeout` while
/// its batch is out: the batch is marked in it, with no database error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_claim_outlasts_a_short_idle_in_transaction_timeout() {
    let Some(mut conn) = redis().await else {
        return;
    };
    let Some(scratch) = Postgres::scratch("txmq_ob_idle", 2).await else {
        return;
    };
    let url = scratch.url.clone();
    scratch
        .run(|pool| async move {
            let stream = unique("txmq_ob_idle");
            txmq_outbox::migrate(&pool).await.unwrap();
            let m = OutboxMessage::new(&stream, "x").with_id("only");
            enqueue_committed(&pool, vec![m]).await;
            let impatient = impatient_pool(&url, &unique("txmq_ob_relay")).await;
            let sink = Slow {
                inner: RedisSink::connect(REDIS).await.unwrap(),
                delay: Duration::from_millis(1500),
                before: Box::new(|| Box::pin(async {})),
            };
            let relay = Relay::new(impatient.clone(), Box::new(sink), config()).unwrap();
            assert_eq!(relay.run_once().await.unwrap(), 1);
            assert_eq!(relay.metrics().database_errors(), 0);
            assert_eq!(relay.run_once().await.unwrap(), 0);
            assert_eq!(ids(&mut conn, &stream).await, ["only"]);
            assert_eq!(Postgres::list(&pool, "D", 10).await.unwrap().len(), 1);
            impatient.close().await;
            let _: () = conn.del(&stream).await.unwrap();
        })
        .await;
}

/// A database whose relay's claim a test can kill.
trait KillsClaims: TestDb {
    /// A pool of two connections on the scratch database `url` for a relay, its sessions
    /// named `name` where the database names sessions.
    fn relay_pool(url: &str, name: &str) -> impl Future<Output = Pool<Self>> + Send;

    /// Kills the connection of the relay named `name` whose claim's transaction is open
    /// while its batch is out; asserts it found one.
    fn kill_claim(pool: &Pool<Self>, name: &str) -> impl Future<Output = ()> + Send;

    /// A transaction on `pool` holding the locks of every outbox row, as another worker's
    /// claim would.
    fn hold_all(pool: &Pool<Self>)
    -> impl Future<Output = sqlx::Transaction<'static, Self>> + Send;
}

impl KillsClaims for Postgres {
    async fn relay_pool(url: &str, name: &str) -> Pool<Self> {
        impatient_pool(url, name).await
    }

    async fn kill_claim(pool: &Pool<Self>, name: &str) {
        let killed: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE application_name = $1 AND state = 'idle in transaction'",
        )
        .bind(name)
        .fetch_all(pool)
        .await
        .unwrap();
        assert_eq!(killed, [true]);
    }

    async fn hold_all(pool: &Pool<Self>) -> sqlx::Transaction<'static, Self> {
        let mut tx = pool.begin().await.unwrap();
        sqlx::query("SELECT seq FROM txmq_outbox FOR UPDATE")
            .execute(&mut *tx)
            .await
            .unwrap();
        tx
    }
}

impl KillsClaims for MySql {
    /// MariaDB names no sessions: the claim is told by its transaction, the only one open
    /// in the scratch database while the batch is out.
    async fn relay_pool(url: &str, _name: &str) -> Pool<Self> {
        MySql::connect(url, 2).await
    }

    /// InnoDB fills `INNODB_TRX` from a cache it refreshes only when the last read of it (by
    /// any session: other tests run alongside) is over 0.1 s old, so a claim just begun may
    /// be missing from a read. It is read again, more than 0.1 s apart and at uneven times
    /// (two tests reading in step could each keep the other's refresh from happening), until
    /// it shows or 3 s have passed; the claim stays open meanwhile, since the sink waits for
    /// this hook.
    async fn kill_claim(pool: &Pool<Self>, _name: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        let claims = loop {
            let claims: Vec<u64> = sqlx::query_scalar(
                "SELECT t.trx_mysql_thread_id FROM information_schema.INNODB_TRX t
                 JOIN information_schema.PROCESSLIST p ON p.ID = t.trx_mysql_thread_id
                 WHERE p.DB = DATABASE() AND p.ID <> CONNECTION_ID()",
            )
            .fetch_all(pool)
            .await
            .unwrap();
            if !claims.is_empty() || tokio::time::Instant::now() >= deadline {
                break claims;
            }
            tokio::time::sleep(Duration::from_millis(rand::random_range(120..300))).await;
        };
        assert_eq!(claims.len(), 1, "open transactions: {claims:?}");
        sqlx::query(&format!("KILL CONNECTION {}", claims[0]))
            .execute(pool)
            .await
            .unwrap();
    }

    async fn hold_all(pool: &Pool<Self>) -> sqlx::Transaction<'static, Self> {
        let mut tx = pool.begin().await.unwrap();
        sqlx::query("SELECT seq FROM txmq_outbox FOR UPDATE")
            .execute(&mut *tx)
            .await
            .unwrap();
        tx
    }
}

/// The claim's connection dies while the first batch is out. The relay marks the row in a new
/// transaction, unless another worker took it meanwhile (`held`): then it leaves it to that
/// worker at once, without waiting for its locks.
async fn claim_connection_killed<DB: KillsClaims>(held: bool) {
    let Some(mut conn) = redis().await else {
        return;
    };
    let Some(scratch) = DB::scratch("txmq_ob_killed", 4).await else {
        return;
    };
    let url = scratch.url.clone();
    scratch
        .run(move |pool| async move {
            let stream = unique("txmq_ob_killed");
            txmq_outbox::migrate(&pool).await.unwrap();
            let m = OutboxMessage::new(&stream, "x").with_id("only");
            enqueue_committed(&pool, vec![m]).await;
            let name = unique("txmq_ob_relay");
            let relays = DB::relay_pool(&url, &name).await;
            let holder = Arc::new(tokio::sync::Mutex::new(None));
            let armed = Arc::new(AtomicBool::new(true));
            let before = {
                let (pool, holder) = (pool.clone(), holder.clone());
                move || -> BoxFuture<'static, ()> {
                    let (pool, holder, name) = (pool.clone(), holder.clone(), name.clone());
                    let first = armed.swap(false, Ordering::SeqCst);
                    Box::pin(async move {
                        if !first {
                            return;
                        }
                        DB::kill_claim(&pool, &name).await;
                        if held {
                            *holder.lock().await = Some(DB::hold_all(&pool).await);
                        }
                    })
                }
            };
            let sink = Slow {
                inner: RedisSink::connect(REDIS).await.unwrap(),
                delay: Duration::from_millis(200),
                before: Box::new(before),
            };
            let relay = Relay::new(relays.clone(), Box::new(sink), config()).unwrap();
            let ran = tokio::time::timeout(Duration::from_secs(10), relay.run_once()).await;
            assert_eq!(ran.expect("no wait for another's locks").unwrap(), 1);
            assert_eq!(relay.metrics().database_errors(), 1);
            assert_eq!(ids(&mut conn, &stream).await, ["only"]);
            let s = txmq_outbox::stats(&pool).await.unwrap();
            assert_eq!((s.pending, s.retrying), (i64::from(held), 0));
            if let Some(tx) = holder.lock().await.take() {
                // The other worker's to publish and mark: here it gives the row up.
                tx.rollback().await.unwrap();
            }
            let again = relay.run_once().await.unwrap();
            assert_eq!(again, usize::from(held));
            let published = ids(&mut conn, &stream).await.len();
            assert_eq!(published, 1 + usize::from(held));
            assert_eq!(DB::list(&pool, "D", 10).await.unwrap().len(), 1);
            relays.close().await;
            let _: () = conn.del(&stream).await.unwrap();
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_batch_is_marked_after_its_claim_connection_was_killed() {
    claim_connection_killed::<Postgres>(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_batch_is_marked_after_its_claim_connection_was_killed() {
    claim_connection_killed::<MySql>(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_batch_another_worker_took_after_its_claim_died_is_left_to_it() {
    claim_connection_killed::<Postgres>(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_batch_another_worker_took_after_its_claim_died_is_left_to_it() {
    claim_connection_killed::<MySql>(true).await;
}
