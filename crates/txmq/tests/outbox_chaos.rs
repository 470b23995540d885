//! Chaos tests of the transactional outbox and its relay (`txmq relay`, `txmq_outbox::Relay`)
//! on real databases and brokers:
//!
//! 1. a relay process killed with SIGKILL mid-stream, and a second one taking over
//!    (PostgreSQL → txmq broker in process);
//! 2. the sink down for a while behind a TCP proxy that cuts every connection, then back
//!    (MariaDB → RabbitMQ);
//! 3. the relay's database sessions killed twice while it works, each time while one of
//!    them is inside a claim transaction (PostgreSQL with `pg_terminate_backend`, MariaDB
//!    with `KILL CONNECTION`; NATS JetStream sink); and the database unreachable for 3 s
//!    behind a TCP proxy (PostgreSQL, MariaDB; Redis Streams sink);
//! 4. two relays at once (PostgreSQL, MariaDB, SQLite; Redis Streams sink);
//! 5. transactions that commit out of order (PostgreSQL, MariaDB);
//! 6. a poison row (unroutable in RabbitMQ) going dead, listed and redriven with the CLI;
//! 7. per-key order under concurrency with two relays of two workers each (PostgreSQL,
//!    MariaDB; Redis Streams sink);
//!
//! and the relay's `/metrics` endpoint; a dead ordered row holds only its key's rows (on
//! each database), and an ordered key's backlog drains without waiting for polls.
//!
//! After each: every committed row is delivered at least once with its message id, no row
//! of a rolled-back transaction is delivered, per-key order holds where asked, and rows are
//! dead only where the sink kept failing. Duplicates (allowed: delivery is at least once)
//! are counted and printed.
//!
//! Each test makes its own PostgreSQL schema, MariaDB database, SQLite file, queues, streams
//! and stream keys (UUIDv7 names), and removes them, also when it fails. A service that is
//! not running skips the test, except under `CI=true`, where it fails.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lapin::options::{BasicGetOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Connection, ConnectionProperties};
use redis::AsyncCommands;
use sqlx::{MySql, Pool, Postgres, Sqlite};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use txmq_outbox::sink::nats::NatsSink;
use txmq_outbox::sink::rabbitmq::RabbitMqSink;
use txmq_outbox::sink::redis::RedisSink;
use txmq_outbox::{
    Metrics, Outbox, OutboxDb, OutboxMessage, OutboxRow, Relay, RelayConfig, RetryPolicy, Sink,
    TableStats,
};
use txmq_testkit::{Scratch, ScratchDb, down, unique};

const REDIS_URL: &str = "redis://127.0.0.1:6379";
const RABBITMQ_ADDR: &str = "127.0.0.1:5672";
const RABBITMQ_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const NATS_URL: &str = "nats://127.0.0.1:4222";

type BoxFuture<T> = std::pin::Pin<Box<dyn Future<Output = T> + Send>>;

// ---------------------------------------------------------------------------------------
// Services, scratch databases, clean-up
// ---------------------------------------------------------------------------------------

/// Whether something listens at `addr` (skip or, under CI, fail when not).
async fn reachable(what: &str, addr: &str) -> bool {
    match tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(addr)).await {
        Ok(Ok(_)) => true,
        Ok(Err(e)) => {
            down(what, e);
            false
        }
        Err(_) => {
            down(what, "no answer within 3 s");
            false
        }
    }
}

/// A random number in `0..n` (std's randomly keyed hasher; no extra dependency).
fn random_below(n: u64) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    h.finish() % n.max(1)
}

/// Runs `body` in its own task with a time limit, then `cleanup` (also when the body
/// failed), then resumes the body's panic.
async fn guarded(
    limit: Duration,
    body: impl Future<Output = ()> + Send + 'static,
    cleanup: impl Future<Output = ()>,
) {
    let started = Instant::now();
    let body = async move {
        tokio::time::timeout(limit, body)
            .await
            .unwrap_or_else(|_| panic!("the test did not finish within {limit:?}"));
    };
    let cleanup = async move {
        if tokio::time::timeout(Duration::from_secs(30), cleanup)
            .await
            .is_err()
        {
            eprintln!("warning: clean-up did not finish within 30 s");
        }
        eprintln!("test body took {:?}", started.elapsed());
    };
    txmq_testkit::guarded(body, cleanup).await;
}

/// A spawned task that is aborted when dropped (e.g. when the test body panics).
struct Task(Option<JoinHandle<()>>);

fn spawn(f: impl Future<Output = ()> + Send + 'static) -> Task {
    Task(Some(tokio::spawn(f)))
}

impl Task {
    async fn join(mut self) {
        if let Some(h) = self.0.take() {
            h.await.expect("a spawned task");
        }
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            h.abort();
        }
    }
}

/// A database for these tests: the size of its scratch pool.
trait TestDb: OutboxDb + ScratchDb {
    /// The connections of the scratch database's pool.
    const POOL_SIZE: u32 = 24;
}

impl TestDb for Postgres {}

impl TestDb for MySql {}

impl TestDb for Sqlite {
    const POOL_SIZE: u32 = 4;
}

/// A scratch database of `DB`, or `None` (skip) when its server is down.
async fn scratch<DB: TestDb>() -> Option<Scratch<DB>> {
    DB::scratch("txmq_chaos", DB::POOL_SIZE).await
}

/// Removes a scratch database; a failure is only a warning, so that it cannot hide the
/// test's own result.
async fn drop_scratch<DB: TestDb>(scratch: Scratch<DB>) {
    let name = scratch.name.clone();
    if let Err(e) = scratch.try_drop().await {
        eprintln!("warning: cannot drop the scratch database {name}: {e}");
    }
}

// ---------------------------------------------------------------------------------------
// Enqueuing with a ledger, relays, waiting, checking
// ---------------------------------------------------------------------------------------

/// What the test enqueued: the ids of committed and of rolled-back transactions' rows.
#[derive(Debug, Default)]
struct Ledger {
    committed: Vec<String>,
    rolled_back: Vec<String>,
}

type SharedLedger = Arc<Mutex<Ledger>>;

/// Enqueues `messages` in one transaction and commits or rolls it back; records the ids.
async fn enqueue_tx<DB: OutboxDb>(
    pool: &Pool<DB>,
    messages: Vec<OutboxMessage>,
    commit: bool,
    ledger: &Mutex<Ledger>,
    hold: Duration,
) {
    let ids: Vec<String> = messages.iter().map(|m| m.id().to_string()).collect();
    let outbox = Outbox::new();
    let mut tx = pool.begin().await.expect("begin");
    for m in messages {
        outbox.enqueue(&mut tx, m).await.expect("enqueue");
    }
    if !hold.is_zero() {
        tokio::time::sleep(hold).await;
    }
    if commit {
        tx.commit().await.expect("commit");
        ledger.lock().unwrap().committed.extend(ids);
    } else {
        tx.rollback().await.expect("rollback");
        ledger.lock().unwrap().rolled_back.extend(ids);
    }
}

/// `n` messages to `destination`, each with a fresh id and a payload naming it.
fn messages(destination: &str, n: usize) -> Vec<OutboxMessage> {
    (0..n)
        .map(|_| {
            let id = uuid::Uuid::now_v7().to_string();
            OutboxMessage::new(destination, format!("payload of {id}").into_bytes()).with_id(id)
        })
        .collect()
}

/// A relay running in this process; dropping the handle (e.g. on a panic) stops it too.
struct RunningRelay {
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    metrics: Arc<Metrics>,
}

fn spawn_relay<DB: OutboxDb>(
    pool: Pool<DB>,
    sink: Box<dyn Sink>,
    config: RelayConfig,
) -> RunningRelay {
    let relay = Relay::new(pool, sink, config).expect("valid relay settings");
    let metrics = relay.metrics();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(relay.run(async move {
        let _ = stopped.await;
    }));
    RunningRelay {
        stop: Some(stop),
        task: Some(task),
        metrics,
    }
}

impl RunningRelay {
    /// Stops the relay and waits (at most 20 s) for its batches in flight.
    async fn stop(mut self) {
        drop(self.stop.take());
        if let Some(task) = self.task.take() {
            match tokio::time::timeout(Duration::from_secs(20), task).await {
                Ok(r) => r.expect("the relay task"),
                Err(_) => panic!("the relay did not stop within 20 s"),
            }
        }
    }
}

impl Drop for RunningRelay {
    fn drop(&mut self) {
        drop(self.stop.take());
    }
}

/// Small batches, quick polls, short backoffs and timeouts.
fn fast_config(batch_size: usize, workers: usize, max_attempts: u32) -> RelayConfig {
    RelayConfig {
        batch_size,
        workers,
        poll_interval: Duration::from_millis(100),
        lease: Duration::from_secs(10),
        publish_timeout: Duration::from_secs(5),
        retry: RetryPolicy {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(500),
            max_attempts,
        },
        keep_delivered: None,
        ..RelayConfig::default()
    }
}

async fn stats<DB: OutboxDb>(pool: &Pool<DB>) -> TableStats {
    txmq_outbox::stats(pool).await.expect("outbox stats")
}

/// Waits until nothing is pending (all enqueuers done), at most `limit`.
async fn drained<DB: OutboxDb>(pool: &Pool<DB>, limit: Duration) -> TableStats {
    let deadline = Instant::now() + limit;
    loop {
        let s = stats(pool).await;
        if s.pending == 0 {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "the outbox was not drained within {limit:?}: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Checks what the broker holds against the ledger: every committed row at least once,
/// no rolled-back row, nothing unknown; the number of duplicates.
fn check_delivery(what: &str, ledger: &Ledger, delivered: &[String]) -> usize {
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for id in delivered {
        *counts.entry(id.as_str()).or_default() += 1;
    }
    let missing: Vec<&String> = ledger
        .committed
        .iter()
        .filter(|id| !counts.contains_key(id.as_str()))
        .collect();
    let leaked: Vec<&String> = ledger
        .rolled_back
        .iter()
        .filter(|id| counts.contains_key(id.as_str()))
        .collect();
    let known: HashSet<&str> = ledger.committed.iter().map(String::as_str).collect();
    let unknown: Vec<&&str> = counts.keys().filter(|id| !known.contains(**id)).collect();
    let duplicates: usize = counts.values().map(|n| n - 1).sum();
    let twice = counts.values().filter(|n| **n > 1).count();
    eprintln!(
        "[{what}] committed {}, rolled back {}, delivered messages {}, distinct {}, \
         duplicates {duplicates} (of {twice} rows)",
        ledger.committed.len(),
        ledger.rolled_back.len(),
        delivered.len(),
        counts.len()
    );
    assert!(
        missing.is_empty(),
        "[{what}] {} committed rows not delivered, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    assert!(
        leaked.is_empty(),
        "[{what}] {} rolled-back rows delivered, e.g. {:?}",
        leaked.len(),
        &leaked[..leaked.len().min(5)]
    );
    assert!(
        unknown.is_empty(),
        "[{what}] {} unknown message ids delivered, e.g. {:?}",
        unknown.len(),
        &unknown[..unknown.len().min(5)]
    );
    duplicates
}

// ---------------------------------------------------------------------------------------
// Sinks' read-back
// ---------------------------------------------------------------------------------------

async fn redis_conn() -> Option<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(REDIS_URL).expect("Redis URL");
    match tokio::time::timeout(
        Duration::from_secs(5),
        client.get_multiplexed_async_connection(),
    )
    .await
    {
        Ok(Ok(c)) => Some(c),
        Ok(Err(e)) => {
            down("Redis at 127.0.0.1:6379", e);
            None
        }
        Err(_) => {
            down("Redis at 127.0.0.1:6379", "no answer within 5 s");
            None
        }
    }
}

/// A stream entry: the row id, key and payload.
struct Entry {
    id: String,
    key: Option<String>,
    payload: Vec<u8>,
}

async fn stream_entries(conn: &mut redis::aio::MultiplexedConnection, stream: &str) -> Vec<Entry> {
    let reply: redis::streams::StreamRangeReply = conn.xrange_all(stream).await.expect("XRANGE");
    reply
        .ids
        .iter()
        .map(|e| Entry {
            id: e.get("id").expect("every entry has an id field"),
            key: e.get("key"),
            payload: e.get("payload").unwrap_or_default(),
        })
        .collect()
}

async fn rabbit_admin() -> Option<(Connection, Channel)> {
    if !reachable("RabbitMQ at 127.0.0.1:5672", RABBITMQ_ADDR).await {
        return None;
    }
    let connection = Connection::connect(RABBITMQ_URL, ConnectionProperties::default())
        .await
        .expect("connect to RabbitMQ");
    let channel = connection.create_channel().await.expect("open a channel");
    Some((connection, channel))
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

async fn delete_queue(channel: &Channel, queue: &str) {
    let _ = channel
        .queue_delete(ShortString::from(queue), QueueDeleteOptions::default())
        .await;
}

/// The `message_id` of every message in `queue` (taken off it).
async fn drain_queue(channel: &Channel, queue: &str) -> Vec<String> {
    let mut out = Vec::new();
    while let Some(m) = channel
        .basic_get(ShortString::from(queue), BasicGetOptions { no_ack: true })
        .await
        .expect("basic.get")
    {
        let id = m
            .delivery
            .properties
            .message_id()
            .as_ref()
            .expect("every message has a message_id")
            .to_string();
        out.push(id);
    }
    out
}

// ---------------------------------------------------------------------------------------
// The txmq binary
// ---------------------------------------------------------------------------------------

/// A `txmq relay` process; killed when dropped.
struct RelayProcess {
    child: tokio::process::Child,
    log: PathBuf,
}

fn start_relay_process(
    db: &str,
    sink: &str,
    config: &Path,
    log: PathBuf,
    http: Option<&str>,
) -> RelayProcess {
    let file = std::fs::File::create(&log).expect("create the relay log");
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_txmq"));
    cmd.args([
        "--log-level",
        "info",
        "relay",
        "--db",
        db,
        "--sink",
        sink,
        "--config",
    ])
    .arg(config)
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::from(file))
    .env_remove("RUST_LOG")
    .kill_on_drop(true);
    if let Some(addr) = http {
        cmd.args(["--http", addr]);
    }
    let child = cmd.spawn().expect("start txmq relay");
    RelayProcess { child, log }
}

impl RelayProcess {
    /// SIGKILL, and wait for the process to end.
    async fn kill(&mut self) {
        self.child.start_kill().expect("SIGKILL the relay");
        let status = tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .expect("the killed relay ends")
            .expect("wait for the relay");
        eprintln!("relay process ended: {status}");
    }

    /// Fails if the process has exited (with its log).
    fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().expect("relay status") {
            panic!(
                "txmq relay exited ({status}):\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }

    fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

/// Runs `txmq ARGS` to completion; its stdout (fails on a non-zero exit).
async fn txmq_cli(args: &[&str]) -> String {
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_txmq"))
            .args(args)
            .env_remove("RUST_LOG")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("txmq finished within 30 s")
    .expect("run txmq");
    assert!(
        out.status.success(),
        "txmq {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// A relay configuration file for the binary.
fn write_config(dir: &Path, batch_size: usize, workers: usize, max_attempts: u32) -> PathBuf {
    let path = dir.join("relay.toml");
    std::fs::write(
        &path,
        format!(
            "batch_size = {batch_size}\n\
             workers = {workers}\n\
             poll_interval_ms = 100\n\
             lease_ms = 10000\n\
             publish_timeout_ms = 5000\n\
             max_attempts = {max_attempts}\n\
             backoff_initial_ms = 50\n\
             backoff_max_ms = 500\n\
             keep_delivered_secs = 0\n"
        ),
    )
    .expect("write the relay configuration");
    path
}

async fn count_delivered(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("SELECT COUNT(*) FROM txmq_outbox WHERE status = 'D'")
        .fetch_one(pool)
        .await
        .expect("count delivered rows")
}

// ---------------------------------------------------------------------------------------
// 1. Relay killed mid-batch (PostgreSQL → txmq broker, `txmq relay` processes)
// ---------------------------------------------------------------------------------------

async fn start_broker(dir: &Path) -> txmq_broker::server::Server {
    txmq_broker::server::Server::start(txmq_broker::BrokerConfig {
        data_dir: dir.to_path_buf(),
        listen: "127.0.0.1:0".into(),
        http: "127.0.0.1:0".into(),
        segment_size: 8 << 20,
        ..txmq_broker::BrokerConfig::default()
    })
    .await
    .expect("the broker starts")
}

/// Every message of `topic` (the `txmq-message-id` property of each), read as a fresh
/// group until at least `n` arrived and two receives came back empty.
async fn read_topic(addr: SocketAddr, topic: &str, n: usize) -> Vec<String> {
    use txmq_client::{ClientConfig, SimpleConsumer, Subscription};
    let config =
        ClientConfig::new(addr.to_string()).with_long_polling_timeout(Duration::from_secs(1));
    let consumer = SimpleConsumer::connect(config, unique("checker"), [Subscription::all(topic)])
        .await
        .expect("the consumer connects");
    let mut out = Vec::new();
    let mut quiet = 0;
    while out.len() < n || quiet < 2 {
        let got = consumer
            .receive(32, Duration::from_secs(60))
            .await
            .expect("receive");
        if got.is_empty() {
            quiet += 1;
            continue;
        }
        futures::future::join_all(got.iter().map(|m| consumer.ack(m)))
            .await
            .into_iter()
            .for_each(|r| r.expect("ack"));
        for m in got {
            let id = m
                .properties()
                .get(txmq_outbox::sink::txmq::MESSAGE_ID_PROPERTY)
                .expect("every message carries its row id")
                .clone();
            out.push(id);
        }
    }
    consumer.shutdown().await;
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn relay_process_killed_mid_batch_then_replaced() {
    let Some(scratch) = scratch::<Postgres>().await else {
        return;
    };
    let dir = tempfile::tempdir().expect("a temporary directory");
    let server = start_broker(&dir.path().join("broker")).await;
    let addr = server.grpc_addr;
    let (pool, url) = (scratch.pool.clone(), scratch.url.clone());
    let work = dir.path().to_path_buf();
    let body = async move {
        const TRANSACTIONS: usize = 300;
        const PER_TX: usize = 10;
        txmq_outbox::migrate(&pool).await.expect("migrate");
        let topic = unique("chaos_kill");
        let ledger = SharedLedger::default();
        let enqueuer = {
            let (pool, ledger, topic) = (pool.clone(), ledger.clone(), topic.clone());
            spawn(async move {
                for i in 0..TRANSACTIONS {
                    // One transaction in five rolls back.
                    enqueue_tx(
                        &pool,
                        messages(&topic, PER_TX),
                        i % 5 != 4,
                        &ledger,
                        Duration::ZERO,
                    )
                    .await;
                    if i % 10 == 9 {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            })
        };
        let committed_total = TRANSACTIONS / 5 * 4 * PER_TX;
        // A backlog first, so that the relay works batch after batch when it is killed.
        while ledger.lock().unwrap().committed.len() < 600 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let config = write_config(&work, 50, 2, 100);
        let sink = format!("txmq://{addr}");
        let mut first = start_relay_process(&url, &sink, &config, work.join("relay1.log"), None);
        let started = Instant::now();
        let mut at_kill = 0;
        while at_kill < committed_total as i64 / 3 {
            first.assert_running();
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the first relay delivered only {at_kill} rows in 30 s:\n{}",
                first.log_tail(20)
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
            at_kill = count_delivered(&pool).await;
        }
        first.kill().await;
        let after_kill = count_delivered(&pool).await;
        eprintln!(
            "first relay SIGKILLed after {:?} with {at_kill} rows marked delivered ({after_kill} \
             right after the kill); {} committed so far",
            started.elapsed(),
            ledger.lock().unwrap().committed.len()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut second = start_relay_process(&url, &sink, &config, work.join("relay2.log"), None);
        enqueuer.join().await;
        let drain_started = Instant::now();
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            second.assert_running();
            let s = stats(&pool).await;
            if s.pending == 0 {
                assert_eq!(s.dead, 0, "no row dead: {s:?}");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "not drained: {s:?}\n{}",
                second.log_tail(20)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        eprintln!(
            "second relay drained the rest in {:?}",
            drain_started.elapsed()
        );
        second.kill().await;
        let ledger = std::mem::take(&mut *ledger.lock().unwrap());
        assert_eq!(ledger.committed.len(), committed_total);
        assert_eq!(count_delivered(&pool).await, committed_total as i64);
        let delivered = read_topic(addr, &topic, committed_total).await;
        let duplicates = check_delivery("relay killed (PostgreSQL → txmq)", &ledger, &delivered);
        eprintln!(
            "relay killed mid-batch: {duplicates} duplicates (published by the killed relay, \
             not marked, published again by the second)"
        );
    };
    guarded(Duration::from_secs(90), body, async move {
        drop_scratch(scratch).await;
        server.stop().await.expect("the broker stops");
        drop(dir);
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// 2. Sink down for a while, then back (MariaDB → TCP proxy → RabbitMQ)
// ---------------------------------------------------------------------------------------

/// A TCP proxy to `upstream` that can cut every connection and refuse new ones for a while.
struct Proxy {
    addr: SocketAddr,
    state: Arc<ProxyState>,
    accept: JoinHandle<()>,
}

#[derive(Default)]
struct ProxyState {
    down_until: Mutex<Option<Instant>>,
    connections: Mutex<Vec<JoinHandle<()>>>,
    refused: std::sync::atomic::AtomicUsize,
}

impl ProxyState {
    fn is_down(&self) -> bool {
        self.down_until
            .lock()
            .unwrap()
            .is_some_and(|until| Instant::now() < until)
    }
}

impl Proxy {
    async fn start(upstream: &'static str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let state = Arc::new(ProxyState::default());
        let s = state.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    continue;
                };
                if s.is_down() {
                    // Refused: closed at once, before any byte.
                    s.refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    drop(client);
                    continue;
                }
                let conn = tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                });
                let mut conns = s.connections.lock().unwrap();
                conns.retain(|c| !c.is_finished());
                conns.push(conn);
            }
        });
        Self {
            addr,
            state,
            accept,
        }
    }

    /// Cuts every connection and refuses new ones for `outage`; the connections cut.
    fn cut(&self, outage: Duration) -> usize {
        *self.state.down_until.lock().unwrap() = Some(Instant::now() + outage);
        let conns = std::mem::take(&mut *self.state.connections.lock().unwrap());
        let live = conns.iter().filter(|c| !c.is_finished()).count();
        for c in conns {
            c.abort();
        }
        live
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        for c in self.state.connections.lock().unwrap().drain(..) {
            c.abort();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sink_down_for_a_while_then_back() {
    let Some((rabbit, admin)) = rabbit_admin().await else {
        return;
    };
    let Some(scratch) = scratch::<MySql>().await else {
        return;
    };
    let queue = unique("txmq_chaos_outage");
    declare_queue(&admin, &queue).await;
    let pool = scratch.pool.clone();
    let (q, ch) = (queue.clone(), admin.clone());
    let body = async move {
        const OUTAGE: Duration = Duration::from_secs(6);
        txmq_outbox::migrate(&pool).await.expect("migrate");
        let proxy = Proxy::start(RABBITMQ_ADDR).await;
        let sink = RabbitMqSink::connect(&format!("amqp://guest:guest@{}/%2f", proxy.addr))
            .await
            .expect("the sink connects through the proxy");
        let relay = spawn_relay(pool.clone(), Box::new(sink), fast_config(50, 2, 10_000));
        let ledger = Mutex::new(Ledger::default());

        // Before the outage: delivered at once.
        for i in 0..10 {
            enqueue_tx(&pool, messages(&q, 10), i % 5 != 4, &ledger, Duration::ZERO).await;
        }
        drained(&pool, Duration::from_secs(20)).await;

        // The outage: rows enqueued meanwhile fail and are retried with backoff.
        let cut = proxy.cut(OUTAGE);
        let outage_started = Instant::now();
        eprintln!("proxy down for {OUTAGE:?}: {cut} connections cut");
        let mut max_retrying = 0;
        let mut i = 0;
        while outage_started.elapsed() < OUTAGE - Duration::from_millis(500) {
            if i < 20 {
                enqueue_tx(&pool, messages(&q, 10), i % 5 != 4, &ledger, Duration::ZERO).await;
                i += 1;
            }
            let s = stats(&pool).await;
            assert_eq!(s.dead, 0, "no row dead during the outage: {s:?}");
            max_retrying = max_retrying.max(s.retrying);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let during = stats(&pool).await;
        eprintln!(
            "during the outage: {during:?}, at most {max_retrying} rows retrying, {} failed \
             attempts, {} connections refused",
            relay.metrics.failed_attempts(),
            proxy
                .state
                .refused
                .load(std::sync::atomic::Ordering::Relaxed)
        );
        assert!(max_retrying > 0, "rows were retrying during the outage");
        assert!(during.pending > 0, "rows were pending during the outage");
        assert!(relay.metrics.failed_attempts() > 0);

        // Back: everything goes out.
        while outage_started.elapsed() < OUTAGE {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let back = Instant::now();
        let s = drained(&pool, Duration::from_secs(30)).await;
        eprintln!("proxy back: drained in {:?}", back.elapsed());
        assert_eq!(s.dead, 0, "{s:?}");
        for i in 0..5 {
            enqueue_tx(&pool, messages(&q, 10), i % 5 != 4, &ledger, Duration::ZERO).await;
        }
        let s = drained(&pool, Duration::from_secs(20)).await;
        assert_eq!((s.dead, s.retrying), (0, 0), "{s:?}");
        relay.stop().await;
        let delivered = drain_queue(&ch, &q).await;
        let ledger = ledger.into_inner().unwrap();
        let duplicates = check_delivery("sink outage (MariaDB → RabbitMQ)", &ledger, &delivered);
        eprintln!("sink outage: {duplicates} duplicates");
    };
    guarded(Duration::from_secs(60), body, async move {
        delete_queue(&admin, &queue).await;
        let _ = rabbit.close(200, ShortString::from("done")).await;
        drop_scratch(scratch).await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// 3. The relay's database sessions killed (PostgreSQL, MariaDB → NATS JetStream)
// ---------------------------------------------------------------------------------------

/// A slow broker: waits before and after each publish, so that the relay holds its claim
/// (PostgreSQL, MariaDB: a transaction) for a while, with rows published but not yet marked.
struct SlowSink {
    inner: Box<dyn Sink>,
    delay: Duration,
}

impl Sink for SlowSink {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn publish<'a>(
        &'a self,
        rows: &'a [OutboxRow],
    ) -> txmq_outbox::sink::BoxFuture<'a, Vec<Result<(), txmq_outbox::SinkError>>> {
        Box::pin(async move {
            tokio::time::sleep(self.delay / 2).await;
            let results = self.inner.publish(rows).await;
            tokio::time::sleep(self.delay / 2).await;
            results
        })
    }
}

/// Sees and kills a relay's database sessions.
struct Killer {
    /// How many of the relay's sessions are inside a transaction (a claim held during a
    /// publish, or a marking).
    busy: Box<dyn Fn() -> BoxFuture<u64> + Send + Sync>,
    /// Kills every session of the relay; the number killed.
    kill: Box<dyn Fn() -> BoxFuture<u64> + Send + Sync>,
    /// How often `busy` may look.
    poll: Duration,
}

impl Killer {
    /// Waits (at most `limit`) until a relay session is inside a transaction, so that the
    /// kill lands mid-batch, then kills every session; the number killed and whether one
    /// was busy.
    async fn kill_mid_batch(&self, limit: Duration) -> (u64, bool) {
        let deadline = Instant::now() + limit;
        let mut busy = false;
        while Instant::now() < deadline {
            if (self.busy)().await > 0 {
                busy = true;
                break;
            }
            tokio::time::sleep(self.poll).await;
        }
        ((self.kill)().await, busy)
    }
}

/// A database whose relay sessions the test can find and kill.
trait KillableDb: TestDb {
    /// A pool for a relay on the scratch database at `url` (`name`), and its killer, which
    /// works through `admin`.
    fn killable_pool(
        url: String,
        name: String,
        admin: Pool<Self>,
    ) -> impl Future<Output = (Pool<Self>, Killer)> + Send;
}

impl KillableDb for Postgres {
    async fn killable_pool(url: String, _name: String, admin: Pool<Self>) -> (Pool<Self>, Killer) {
        // The relay's sessions are told apart by their application_name; its LISTEN
        // connection takes the pool's options, so it has it too.
        let app = unique("txmq_relay");
        let options = sqlx::postgres::PgConnectOptions::from_str(&url)
            .expect("a PostgreSQL URL")
            .application_name(&app);
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await
            .expect("the relay's pool");
        let (a, n) = (admin.clone(), app.clone());
        let busy = move || -> BoxFuture<u64> {
            let (admin, app) = (a.clone(), n.clone());
            Box::pin(async move {
                let n: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM pg_stat_activity
                     WHERE application_name = $1 AND xact_start IS NOT NULL",
                )
                .bind(&app)
                .fetch_one(&admin)
                .await
                .expect("pg_stat_activity");
                n.unsigned_abs()
            })
        };
        let kill = move || -> BoxFuture<u64> {
            let (admin, app) = (admin.clone(), app.clone());
            Box::pin(async move {
                let killed: Vec<bool> = sqlx::query_scalar(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                     WHERE application_name = $1",
                )
                .bind(&app)
                .fetch_all(&admin)
                .await
                .expect("pg_terminate_backend");
                killed.iter().filter(|k| **k).count() as u64
            })
        };
        let killer = Killer {
            busy: Box::new(busy),
            kill: Box::new(kill),
            poll: Duration::from_millis(1),
        };
        (pool, killer)
    }
}

impl KillableDb for MySql {
    async fn killable_pool(url: String, name: String, admin: Pool<Self>) -> (Pool<Self>, Killer) {
        // The relay's connection ids, to tell them from the enqueuers' (same database).
        let ids: Arc<Mutex<HashSet<i64>>> = Arc::default();
        let recorded = ids.clone();
        let pool = sqlx::mysql::MySqlPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(10))
            .after_connect(move |conn, _| {
                let recorded = recorded.clone();
                Box::pin(async move {
                    let id: i64 = sqlx::query_scalar("SELECT CAST(CONNECTION_ID() AS SIGNED)")
                        .fetch_one(&mut *conn)
                        .await?;
                    recorded.lock().unwrap().insert(id);
                    Ok(())
                })
            })
            .connect(&url)
            .await
            .expect("the relay's pool");
        let (a, i) = (admin.clone(), ids.clone());
        let busy = move || -> BoxFuture<u64> {
            let (admin, ids) = (a.clone(), i.clone());
            Box::pin(async move {
                let open: Vec<i64> = sqlx::query_scalar(
                    "SELECT CAST(trx_mysql_thread_id AS SIGNED) FROM information_schema.innodb_trx",
                )
                .fetch_all(&admin)
                .await
                .expect("innodb_trx");
                let ids = ids.lock().unwrap();
                open.iter().filter(|id| ids.contains(id)).count() as u64
            })
        };
        let kill = move || -> BoxFuture<u64> {
            let (admin, db, ids) = (admin.clone(), name.clone(), ids.clone());
            Box::pin(async move {
                let listed: Vec<i64> = sqlx::query_scalar(
                    "SELECT CAST(id AS SIGNED) FROM information_schema.processlist WHERE db = ?",
                )
                .bind(&db)
                .fetch_all(&admin)
                .await
                .expect("processlist");
                let relay_ids = ids.lock().unwrap().clone();
                let mut killed = 0;
                for id in listed.into_iter().filter(|id| relay_ids.contains(id)) {
                    if sqlx::query(&format!("KILL CONNECTION {id}"))
                        .execute(&admin)
                        .await
                        .is_ok()
                    {
                        killed += 1;
                    }
                }
                killed
            })
        };
        let killer = Killer {
            busy: Box::new(busy),
            kill: Box::new(kill),
            // InnoDB refreshes information_schema.innodb_trx only when it was not read for
            // 100 ms: reading it more often shows the same stale rows.
            poll: Duration::from_millis(150),
        };
        (pool, killer)
    }
}

async fn database_sessions_killed<DB: KillableDb>() {
    if !reachable("NATS at 127.0.0.1:4222", "127.0.0.1:4222").await {
        return;
    }
    let Some(scratch) = scratch::<DB>().await else {
        return;
    };
    let js = async_nats::jetstream::new(async_nats::connect(NATS_URL).await.expect("NATS"));
    let stream_name = unique("txmq_chaos_dbkill");
    let subject = format!("{stream_name}.orders");
    js.create_stream(async_nats::jetstream::stream::Config {
        name: stream_name.clone(),
        subjects: vec![format!("{stream_name}.>")],
        storage: async_nats::jetstream::stream::StorageType::Memory,
        ..Default::default()
    })
    .await
    .expect("create the stream");
    let (relay_pool, killer) = DB::killable_pool(
        scratch.url.clone(),
        scratch.name.clone(),
        scratch.pool.clone(),
    )
    .await;
    let pool = scratch.pool.clone();
    let (js2, name2) = (js.clone(), stream_name.clone());
    let body = async move {
        const TRANSACTIONS: usize = 100;
        txmq_outbox::migrate(&pool).await.expect("migrate");
        let sink = SlowSink {
            inner: Box::new(NatsSink::connect(NATS_URL).await.expect("the NATS sink")),
            delay: Duration::from_millis(60),
        };
        let relay = spawn_relay(relay_pool.clone(), Box::new(sink), fast_config(50, 2, 1000));
        let ledger = SharedLedger::default();
        let enqueuer = {
            let (pool, ledger, subject) = (pool.clone(), ledger.clone(), subject.clone());
            spawn(async move {
                for i in 0..TRANSACTIONS {
                    enqueue_tx(
                        &pool,
                        messages(&subject, 10),
                        i % 5 != 4,
                        &ledger,
                        Duration::ZERO,
                    )
                    .await;
                    tokio::time::sleep(Duration::from_millis(40)).await;
                }
            })
        };
        let mut hit_busy = 0;
        for round in 1..=2 {
            tokio::time::sleep(Duration::from_millis(1200)).await;
            let published = relay.metrics.published();
            let (killed, busy) = killer.kill_mid_batch(Duration::from_secs(3)).await;
            eprintln!(
                "[{}] kill {round}: {killed} relay sessions killed, {} ({published} rows \
                 published so far)",
                DB::LABEL,
                if busy {
                    "one of them inside a transaction"
                } else {
                    "none was inside a transaction"
                }
            );
            assert!(killed > 0, "the relay had sessions to kill");
            hit_busy += usize::from(busy);
        }
        enqueuer.join().await;
        let started = Instant::now();
        let s = drained(&pool, Duration::from_secs(40)).await;
        eprintln!(
            "[{}] drained {:?} after the last enqueue; relay: {} published, {} failed attempts, \
             {} database errors",
            DB::LABEL,
            started.elapsed(),
            relay.metrics.published(),
            relay.metrics.failed_attempts(),
            relay.metrics.database_errors()
        );
        assert_eq!(s.dead, 0, "{s:?}");
        assert!(
            hit_busy > 0,
            "at least one kill landed inside a relay transaction"
        );
        let metrics = relay.metrics.clone();
        relay.stop().await;
        relay_pool.close().await;
        let ledger = std::mem::take(&mut *ledger.lock().unwrap());
        // Read the stream back: the Nats-Msg-Id of each message.
        let stream = js2.get_stream(&name2).await.expect("get the stream");
        let info = stream.get_info().await.expect("stream info");
        let mut delivered = Vec::new();
        for seq in info.state.first_sequence..=info.state.last_sequence {
            let m = stream.get_raw_message(seq).await.expect("get a message");
            let id = m
                .headers
                .get("Nats-Msg-Id")
                .expect("every message has a Nats-Msg-Id")
                .as_str()
                .to_string();
            delivered.push(id);
        }
        let what = format!("sessions killed ({} → NATS)", DB::LABEL);
        let duplicates = check_delivery(&what, &ledger, &delivered);
        let republished = metrics
            .published()
            .saturating_sub(ledger.committed.len() as u64);
        eprintln!(
            "[{what}] {duplicates} duplicates in the stream; the relay confirmed \
             {republished} rows more than once (JetStream drops repeats of a Nats-Msg-Id)"
        );
    };
    guarded(Duration::from_secs(60), body, async move {
        let _ = js.delete_stream(&stream_name).await;
        drop_scratch(scratch).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_sessions_killed_relay_recovers() {
    database_sessions_killed::<Postgres>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mariadb_connections_killed_relay_recovers() {
    database_sessions_killed::<MySql>().await;
}

/// The database unreachable for a while (a restart as the relay sees it): the relay's
/// connections go through a proxy that cuts them all and refuses new ones for 3 s, while
/// the application (on its own connections) keeps enqueuing.
async fn database_unreachable<DB: TestDb>(server: &'static str) {
    let Some(mut redis) = redis_conn().await else {
        return;
    };
    let Some(scratch) = scratch::<DB>().await else {
        return;
    };
    let stream = unique("txmq_chaos_dbdown");
    let (pool, url, s) = (scratch.pool.clone(), scratch.url.clone(), stream.clone());
    let mut conn = redis.clone();
    let body = async move {
        const OUTAGE: Duration = Duration::from_secs(3);
        txmq_outbox::migrate(&pool).await.expect("migrate");
        let proxy = Proxy::start(server).await;
        let relay_url = url.replacen(server, &proxy.addr.to_string(), 1);
        assert_ne!(relay_url, url);
        let relay_pool = DB::connect(&relay_url, 4).await;
        let sink = SlowSink {
            inner: Box::new(RedisSink::connect(REDIS_URL).await.expect("the Redis sink")),
            delay: Duration::from_millis(20),
        };
        let relay = spawn_relay(relay_pool.clone(), Box::new(sink), fast_config(50, 2, 1000));
        let ledger = SharedLedger::default();
        let enqueuer = {
            let (pool, ledger, s) = (pool.clone(), ledger.clone(), s.clone());
            spawn(async move {
                for i in 0..120 {
                    enqueue_tx(&pool, messages(&s, 10), i % 5 != 4, &ledger, Duration::ZERO).await;
                    tokio::time::sleep(Duration::from_millis(40)).await;
                }
            })
        };
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let cut = proxy.cut(OUTAGE);
        let outage = Instant::now();
        eprintln!(
            "[{}] database unreachable for {OUTAGE:?}: {cut} connections cut",
            DB::LABEL
        );
        tokio::time::sleep(OUTAGE).await;
        let published_at_return = relay.metrics.published();
        enqueuer.join().await;
        let s2 = drained(&pool, Duration::from_secs(30)).await;
        assert_eq!(s2.dead, 0, "{s2:?}");
        eprintln!(
            "[{}] drained {:?} after the outage began; relay: {} published ({} when the \
             database came back), {} database errors",
            DB::LABEL,
            outage.elapsed(),
            relay.metrics.published(),
            published_at_return,
            relay.metrics.database_errors()
        );
        assert!(
            relay.metrics.database_errors() > 0,
            "the relay saw the outage"
        );
        relay.stop().await;
        relay_pool.close().await;
        drop(proxy);
        let ledger = std::mem::take(&mut *ledger.lock().unwrap());
        let delivered: Vec<String> = stream_entries(&mut conn, &s)
            .await
            .into_iter()
            .map(|e| e.id)
            .collect();
        let what = format!("database unreachable ({} → Redis)", DB::LABEL);
        let duplicates = check_delivery(&what, &ledger, &delivered);
        eprintln!("[{what}] {duplicates} duplicates");
    };
    guarded(Duration::from_secs(60), body, async move {
        let _: Result<(), _> = redis.del(&stream).await;
        drop_scratch(scratch).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_unreachable_for_a_while_relay_recovers() {
    database_unreachable::<Postgres>("127.0.0.1:5432").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mariadb_unreachable_for_a_while_relay_recovers() {
    database_unreachable::<MySql>("127.0.0.1:3306").await;
}

// ---------------------------------------------------------------------------------------
// 4. Two relays at once (PostgreSQL, MariaDB, SQLite → Redis)
// ---------------------------------------------------------------------------------------

async fn two_relays<DB: TestDb>() {
    let Some(mut redis) = redis_conn().await else {
        return;
    };
    let Some(scratch) = scratch::<DB>().await else {
        return;
    };
    let stream = unique("txmq_chaos_two");
    let (pool, url, s) = (scratch.pool.clone(), scratch.url.clone(), stream.clone());
    let mut conn = redis.clone();
    let body = async move {
        const ROWS: usize = 5000;
        const PER_TX: usize = 100;
        txmq_outbox::migrate(&pool).await.expect("migrate");
        let ledger = Mutex::new(Ledger::default());
        // Half before the relays start, half while they run.
        for _ in 0..ROWS / PER_TX / 2 {
            enqueue_tx(&pool, messages(&s, PER_TX), true, &ledger, Duration::ZERO).await;
        }
        let started = Instant::now();
        let mut relays = Vec::new();
        for _ in 0..2 {
            let relay_pool = DB::connect(&url, 4).await;
            let sink = RedisSink::connect(REDIS_URL).await.expect("the Redis sink");
            relays.push(spawn_relay(
                relay_pool,
                Box::new(sink),
                fast_config(100, 2, 100),
            ));
        }
        for _ in 0..ROWS / PER_TX / 2 {
            enqueue_tx(&pool, messages(&s, PER_TX), true, &ledger, Duration::ZERO).await;
        }
        let st = drained(&pool, Duration::from_secs(40)).await;
        let took = started.elapsed();
        assert_eq!(st.dead, 0, "{st:?}");
        let shares: Vec<u64> = relays.iter().map(|r| r.metrics.published()).collect();
        let errors: Vec<u64> = relays.iter().map(|r| r.metrics.database_errors()).collect();
        let failed: Vec<u64> = relays.iter().map(|r| r.metrics.failed_attempts()).collect();
        for r in relays {
            r.stop().await;
        }
        let ledger = ledger.into_inner().unwrap();
        assert_eq!(ledger.committed.len(), ROWS);
        let delivered: Vec<String> = stream_entries(&mut conn, &s)
            .await
            .into_iter()
            .map(|e| e.id)
            .collect();
        let what = format!("two relays ({} → Redis)", DB::LABEL);
        let duplicates = check_delivery(&what, &ledger, &delivered);
        eprintln!(
            "[{what}] drained in {took:?}; rows published per relay {shares:?}, failed attempts \
             {failed:?}, database errors {errors:?}; {duplicates} duplicates"
        );
        assert_eq!(
            duplicates, 0,
            "[{what}] no failure, so no row is published twice"
        );
    };
    guarded(Duration::from_secs(60), body, async move {
        let _: Result<(), _> = redis.del(&stream).await;
        drop_scratch(scratch).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_two_relays_at_once() {
    two_relays::<Postgres>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mariadb_two_relays_at_once() {
    two_relays::<MySql>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_two_relays_at_once() {
    two_relays::<Sqlite>().await;
}

// ---------------------------------------------------------------------------------------
// 5. Transactions that commit out of order (PostgreSQL, MariaDB → Redis)
// ---------------------------------------------------------------------------------------

async fn out_of_order_commits<DB: TestDb>() {
    let Some(mut redis) = redis_conn().await else {
        return;
    };
    let Some(scratch) = scratch::<DB>().await else {
        return;
    };
    let stream = unique("txmq_chaos_ooo");
    let (pool, s) = (scratch.pool.clone(), stream.clone());
    let mut conn = redis.clone();
    let body = async move {
        const TASKS: usize = 16;
        const TRANSACTIONS: usize = 25;
        txmq_outbox::migrate(&pool).await.expect("migrate");
        let sink = RedisSink::connect(REDIS_URL).await.expect("the Redis sink");
        let relay = spawn_relay(pool.clone(), Box::new(sink), fast_config(50, 2, 100));
        let ledger = SharedLedger::default();
        let started = Instant::now();
        let tasks: Vec<_> = (0..TASKS)
            .map(|_| {
                let (pool, ledger, s) = (pool.clone(), ledger.clone(), s.clone());
                spawn(async move {
                    for _ in 0..TRANSACTIONS {
                        let n = 1 + random_below(3) as usize;
                        let hold = Duration::from_millis(random_below(201));
                        let commit = random_below(5) != 0;
                        enqueue_tx(&pool, messages(&s, n), commit, &ledger, hold).await;
                    }
                })
            })
            .collect();
        for t in tasks {
            t.join().await;
        }
        let enqueued = started.elapsed();
        let st = drained(&pool, Duration::from_secs(30)).await;
        assert_eq!(st.dead, 0, "{st:?}");
        eprintln!(
            "[{}] {TASKS} tasks × {TRANSACTIONS} transactions enqueued in {enqueued:?}, drained \
             {:?} later",
            DB::LABEL,
            started.elapsed() - enqueued
        );
        relay.stop().await;
        let ledger = std::mem::take(&mut *ledger.lock().unwrap());
        let delivered: Vec<String> = stream_entries(&mut conn, &s)
            .await
            .into_iter()
            .map(|e| e.id)
            .collect();
        let what = format!("out-of-order commits ({} → Redis)", DB::LABEL);
        let duplicates = check_delivery(&what, &ledger, &delivered);
        assert_eq!(duplicates, 0, "[{what}] no failure, no duplicate");
    };
    guarded(Duration::from_secs(60), body, async move {
        let _: Result<(), _> = redis.del(&stream).await;
        drop_scratch(scratch).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_transactions_commit_out_of_order() {
    out_of_order_commits::<Postgres>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mariadb_transactions_commit_out_of_order() {
    out_of_order_commits::<MySql>().await;
}

// ---------------------------------------------------------------------------------------
// 6. Poison message (PostgreSQL → RabbitMQ), dead list and redrive with the CLI
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poison_row_goes_dead_then_is_redriven() {
    let Some((rabbit, admin)) = rabbit_admin().await else {
        return;
    };
    let Some(scratch) = scratch::<Postgres>().await else {
        return;
    };
    let good = unique("txmq_chaos_good");
    let poison_key = unique("txmq_chaos_nowhere");
    declare_queue(&admin, &good).await;
    let (pool, url) = (scratch.pool.clone(), scratch.url.clone());
    let (g, p, ch) = (good.clone(), poison_key.clone(), admin.clone());
    let body = async move {
        txmq_outbox::migrate(&pool).await.expect("migrate");
        let sink = RabbitMqSink::connect(RABBITMQ_URL).await.expect("the sink");
        let relay = spawn_relay(pool.clone(), Box::new(sink), fast_config(20, 2, 4));
        let ledger = Mutex::new(Ledger::default());
        let poison = OutboxMessage::new(p.as_str(), b"poison".to_vec());
        let poison_id = poison.id().to_string();
        for i in 0..6 {
            let mut batch = messages(&g, 10);
            if i == 2 {
                batch.insert(5, poison.clone());
            }
            enqueue_tx(&pool, batch, true, &ledger, Duration::ZERO).await;
        }
        // The poison row: attempts 1 to 4 fail, then it is dead.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let s = stats(&pool).await;
            if s.pending == 0 && s.dead == 1 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the poison row is not dead: {s:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let dead = txmq_outbox::dead(&pool, 10).await.expect("dead rows");
        assert_eq!(dead.len(), 1, "{dead:?}");
        assert_eq!(dead[0].id, poison_id);
        assert_eq!(dead[0].attempts, 4, "{dead:?}");
        let error = dead[0].last_error.clone().unwrap_or_default();
        assert!(
            error.contains(&p),
            "the error names the routing key: {error}"
        );
        eprintln!("poison row dead after 4 attempts: {error}");
        assert_eq!(relay.metrics.dead_lettered(), 1);
        assert_eq!(relay.metrics.failed_attempts(), 4);

        // The good rows: all delivered, once.
        let mut ledger = ledger.into_inner().unwrap();
        ledger.committed.retain(|id| *id != poison_id);
        let delivered = drain_queue(&ch, &g).await;
        let duplicates = check_delivery("poison (PostgreSQL → RabbitMQ)", &ledger, &delivered);
        assert_eq!(duplicates, 0);

        // The CLI lists it.
        let listed = txmq_cli(&["outbox", "dead", "list", "--db", &url, "--json"]).await;
        let rows: Vec<serde_json::Value> =
            serde_json::from_str(listed.trim()).expect("dead list --json is a JSON array");
        assert_eq!(rows.len(), 1, "{listed}");
        assert_eq!(rows[0]["id"], poison_id.as_str(), "{listed}");
        assert_eq!(rows[0]["attempts"], 4, "{listed}");
        assert_eq!(rows[0]["destination"], p.as_str(), "{listed}");
        assert!(
            rows[0]["last_error"]
                .as_str()
                .unwrap_or_default()
                .contains(&p),
            "{listed}"
        );

        // A queue for its routing key, a redrive, and it is delivered.
        declare_queue(&ch, &p).await;
        let out = txmq_cli(&[
            "outbox", "dead", "redrive", "--db", &url, "--id", &poison_id,
        ])
        .await;
        assert!(out.contains("redrove 1"), "{out}");
        let s = drained(&pool, Duration::from_secs(20)).await;
        assert_eq!((s.dead, s.retrying), (0, 0), "{s:?}");
        let redriven = drain_queue(&ch, &p).await;
        assert_eq!(redriven, std::slice::from_ref(&poison_id));
        let listed = txmq_cli(&["outbox", "dead", "list", "--db", &url, "--json"]).await;
        assert_eq!(listed.trim(), "[]");
        relay.stop().await;
    };
    guarded(Duration::from_secs(60), body, async move {
        delete_queue(&admin, &good).await;
        delete_queue(&admin, &poison_key).await;
        let _ = rabbit.close(200, ShortString::from("done")).await;
        drop_scratch(scratch).await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// 7. Per-key order under concurrency (PostgreSQL, MariaDB → Redis; 2 relays × 2 workers)
// ---------------------------------------------------------------------------------------

async fn per_key_order<DB: TestDb>() {
    let Some(mut redis) = redis_conn().await else {
        return;
    };
    let Some(scratch) = scratch::<DB>().await else {
        return;
    };
    let stream = unique("txmq_chaos_order");
    let (pool, url, s) = (scratch.pool.clone(), scratch.url.clone(), stream.clone());
    let mut conn = redis.clone();
    let body = async move {
        const TASKS: usize = 4;
        const KEYS_PER_TASK: usize = 5;
        const PER_KEY: usize = 50;
        txmq_outbox::migrate(&pool).await.expect("migrate");
        let mut relays = Vec::new();
        for _ in 0..2 {
            let relay_pool = DB::connect(&url, 4).await;
            let sink = RedisSink::connect(REDIS_URL).await.expect("the Redis sink");
            relays.push(spawn_relay(
                relay_pool,
                Box::new(sink),
                fast_config(20, 2, 100),
            ));
        }
        let ledger = SharedLedger::default();
        let run = unique("k");
        let started = Instant::now();
        // Each task owns its keys and enqueues their rows in order, several keys per
        // transaction; the tasks' transactions run concurrently. A rolled-back
        // transaction's rows are enqueued again (with new ids) by the next one.
        let tasks: Vec<_> = (0..TASKS)
            .map(|t| {
                let (pool, ledger, s, run) = (pool.clone(), ledger.clone(), s.clone(), run.clone());
                spawn(async move {
                    let keys: Vec<String> = (0..KEYS_PER_TASK)
                        .map(|k| format!("{run}-{}", t * KEYS_PER_TASK + k))
                        .collect();
                    let mut next = vec![0usize; KEYS_PER_TASK];
                    while next.iter().any(|n| *n < PER_KEY) {
                        let plan: Vec<(usize, usize)> = (0..KEYS_PER_TASK)
                            .filter(|k| next[*k] < PER_KEY && random_below(10) < 6)
                            .map(|k| (k, 1 + random_below(3) as usize))
                            .collect();
                        let free = random_below(3) as usize;
                        let hold = Duration::from_millis(random_below(21));
                        let commit = random_below(10) != 0;
                        let mut batch = Vec::new();
                        let mut advanced = next.clone();
                        for (k, n) in plan {
                            for _ in 0..n {
                                if advanced[k] == PER_KEY {
                                    break;
                                }
                                let i = advanced[k];
                                advanced[k] += 1;
                                batch.push(
                                    OutboxMessage::new(s.as_str(), format!("{i}").into_bytes())
                                        .with_key(keys[k].as_str())
                                        .ordered(),
                                );
                            }
                        }
                        batch.extend(messages(&s, free));
                        if batch.is_empty() {
                            continue;
                        }
                        // Interleave the keys' rows within the transaction too.
                        batch.sort_by_cached_key(|_| random_below(1 << 20));
                        let batch = restore_key_order(batch);
                        enqueue_tx(&pool, batch, commit, &ledger, hold).await;
                        if commit {
                            next = advanced;
                        }
                    }
                })
            })
            .collect();
        for t in tasks {
            t.join().await;
        }
        let st = drained(&pool, Duration::from_secs(40)).await;
        assert_eq!(st.dead, 0, "{st:?}");
        let took = started.elapsed();
        let shares: Vec<u64> = relays.iter().map(|r| r.metrics.published()).collect();
        for r in relays {
            r.stop().await;
        }
        let ledger = std::mem::take(&mut *ledger.lock().unwrap());
        let entries = stream_entries(&mut conn, &s).await;
        let what = format!(
            "per-key order ({} → Redis, 2 relays × 2 workers)",
            DB::LABEL
        );
        let ids: Vec<String> = entries.iter().map(|e| e.id.clone()).collect();
        let duplicates = check_delivery(&what, &ledger, &ids);
        // Per key: the payloads (indexes) in stream order are 0, 1, ..., 49.
        let mut by_key: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        let mut free = 0;
        for e in &entries {
            match &e.key {
                Some(k) => by_key.entry(k.as_str()).or_default().push(
                    String::from_utf8_lossy(&e.payload)
                        .parse()
                        .expect("an index payload"),
                ),
                None => free += 1,
            }
        }
        assert_eq!(by_key.len(), TASKS * KEYS_PER_TASK, "every key delivered");
        let expected: Vec<usize> = (0..PER_KEY).collect();
        for (key, order) in &by_key {
            assert_eq!(order, &expected, "[{what}] the order of key {key}");
        }
        eprintln!(
            "[{what}] {} keyed rows in order on {} keys, {free} rows without key interleaved; \
             drained in {took:?}; rows published per relay {shares:?}; {duplicates} duplicates",
            by_key.values().map(Vec::len).sum::<usize>(),
            by_key.len()
        );
        assert!(free > 0, "rows without key were enqueued");
        assert_eq!(duplicates, 0);
    };
    guarded(Duration::from_secs(60), body, async move {
        let _: Result<(), _> = redis.del(&stream).await;
        drop_scratch(scratch).await;
    })
    .await;
}

/// `batch` shuffled, but with each key's rows back in their index order (the payload), so
/// that the keys interleave while each key's rows are enqueued in order.
fn restore_key_order(batch: Vec<OutboxMessage>) -> Vec<OutboxMessage> {
    let mut per_key: HashMap<String, Vec<OutboxMessage>> = HashMap::new();
    for m in &batch {
        if let Some(k) = m.key() {
            per_key.entry(k.to_string()).or_default().push(m.clone());
        }
    }
    for rows in per_key.values_mut() {
        rows.sort_by_key(|m| {
            String::from_utf8_lossy(m.payload())
                .parse::<usize>()
                .expect("an index payload")
        });
        rows.reverse();
    }
    batch
        .into_iter()
        .map(|m| match m.key() {
            Some(k) => per_key
                .get_mut(k)
                .and_then(Vec::pop)
                .expect("a row of the key"),
            None => m,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_per_key_order_under_concurrency() {
    per_key_order::<Postgres>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mariadb_per_key_order_under_concurrency() {
    per_key_order::<MySql>().await;
}

// ---------------------------------------------------------------------------------------
// The relay's /metrics (SQLite → txmq broker in process, `txmq relay --http`)
// ---------------------------------------------------------------------------------------

/// `GET path` on `addr`: the status line and the body.
async fn http_get(addr: &str, path: &str) -> std::io::Result<(String, String)> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    Ok((
        head.lines().next().unwrap_or_default().to_string(),
        body.to_string(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn relay_process_serves_metrics() {
    let Some(scratch) = scratch::<Sqlite>().await else {
        return;
    };
    let dir = tempfile::tempdir().expect("a temporary directory");
    let server = start_broker(&dir.path().join("broker")).await;
    let addr = server.grpc_addr;
    let (pool, url) = (scratch.pool.clone(), scratch.url.clone());
    let work = dir.path().to_path_buf();
    let body = async move {
        txmq_outbox::migrate(&pool).await.expect("migrate");
        let topic = unique("chaos_metrics");
        let ledger = Mutex::new(Ledger::default());
        enqueue_tx(&pool, messages(&topic, 20), true, &ledger, Duration::ZERO).await;
        // A free port: bound, noted, released.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("address")
            .port();
        let http = format!("127.0.0.1:{port}");
        let config = write_config(&work, 50, 2, 16);
        let mut relay = start_relay_process(
            &url,
            &format!("txmq://{addr}"),
            &config,
            work.join("relay.log"),
            Some(&http),
        );
        let s = {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                relay.assert_running();
                let s = stats(&pool).await;
                if s.pending == 0 {
                    break s;
                }
                assert!(
                    Instant::now() < deadline,
                    "not drained: {s:?}\n{}",
                    relay.log_tail(20)
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        assert_eq!(s.dead, 0);
        let deadline = Instant::now() + Duration::from_secs(10);
        let (status, text) = loop {
            relay.assert_running();
            match http_get(&http, "/metrics").await {
                Ok(r) => break r,
                Err(e) => {
                    assert!(Instant::now() < deadline, "no metrics at {http}: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        assert!(status.contains(" 200"), "{status}\n{text}");
        for name in [
            "txmq_outbox_pending_rows 0",
            "txmq_outbox_oldest_pending_age_seconds 0",
            "txmq_outbox_dead_rows 0",
            "txmq_outbox_published_total 20",
            "txmq_outbox_publish_seconds_bucket{le=\"+Inf\"}",
            "txmq_outbox_up 1",
        ] {
            assert!(text.contains(name), "no {name:?} in /metrics:\n{text}");
        }
        let (status, health) = http_get(&http, "/healthz").await.expect("/healthz");
        assert!(
            status.contains(" 200") && health.contains("ok"),
            "{status} {health}"
        );
        relay.kill().await;
        let delivered = read_topic(addr, &topic, 20).await;
        let ledger = ledger.into_inner().unwrap();
        check_delivery("metrics (SQLite → txmq)", &ledger, &delivered);
    };
    guarded(Duration::from_secs(60), body, async move {
        drop_scratch(scratch).await;
        server.stop().await.expect("the broker stops");
        drop(dir);
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// Library bugs found by the chaos tests (minimal reproductions)
// ---------------------------------------------------------------------------------------

/// A key held by a dead ordered row, with many rows of the key waiting behind it (here
/// `workers × batch_size + 1`), holds only its own rows: unkeyed rows and other keys' rows
/// enqueued later are still delivered.
///
/// On MariaDB it fails: the claim (`MySql::claim` in `dialect.rs`) locks the first
/// `batch_size` pending rows by `seq` (`FOR UPDATE SKIP LOCKED`) and only then drops those
/// held by an earlier row of their key, so when the first `workers × batch_size` pending
/// rows are all held, every claim comes back empty and nothing behind them is ever published (the whole outbox stalls until the
/// dead row is redriven or dropped; the same happens, for the length of the backoff, behind
/// an ordered row that is retrying).
async fn held_key_holds_only_its_rows<DB: TestDb>() {
    let Some(mut redis) = redis_conn().await else {
        return;
    };
    let Some(scratch) = scratch::<DB>().await else {
        return;
    };
    let stream = unique("txmq_chaos_held");
    let poison = unique("txmq_chaos_string");
    // A string key: XADD to it always fails (WRONGTYPE).
    let _: () = redis.set(&poison, "not a stream").await.expect("SET");
    let (pool, s, p) = (scratch.pool.clone(), stream.clone(), poison.clone());
    let mut conn = redis.clone();
    let body = async move {
        const BATCH: usize = 5;
        const WORKERS: usize = 2;
        const HELD: usize = WORKERS * BATCH + 1;
        txmq_outbox::migrate(&pool).await.expect("migrate");
        let ledger = Mutex::new(Ledger::default());
        let keyed = |dest: &str, key: &str, i: usize| {
            OutboxMessage::new(dest, format!("{i}").into_bytes())
                .with_key(key)
                .ordered()
        };
        // The key "held": a poison row first, then HELD rows behind it.
        let mut held = vec![keyed(&p, "held", 0)];
        held.extend((1..=HELD).map(|i| keyed(&s, "held", i)));
        enqueue_tx(&pool, held, true, &ledger, Duration::ZERO).await;
        // Enqueued later: unkeyed rows and another key's rows.
        let mut free = messages(&s, 3);
        free.extend((0..3).map(|i| keyed(&s, "other", i)));
        let free_ids: HashSet<String> = free.iter().map(|m| m.id().to_string()).collect();
        enqueue_tx(&pool, free, true, &ledger, Duration::ZERO).await;
        let sink = RedisSink::connect(REDIS_URL).await.expect("the Redis sink");
        let relay = spawn_relay(pool.clone(), Box::new(sink), fast_config(BATCH, WORKERS, 2));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let st = stats(&pool).await;
            let got: HashSet<String> = stream_entries(&mut conn, &s)
                .await
                .into_iter()
                .map(|e| e.id)
                .collect();
            // (A row may be in the stream a moment before it is marked delivered.)
            if st.dead == 1 && st.pending == HELD as i64 && got == free_ids {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "[{}] the rows behind a held key were not delivered within 10 s: {} of {} \
                 delivered, {st:?} (the dead row holds {HELD} rows of its key; batch size \
                 {BATCH}, {WORKERS} workers)",
                DB::LABEL,
                got.len(),
                free_ids.len(),
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        relay.stop().await;
    };
    guarded(Duration::from_secs(30), body, async move {
        let _: Result<(), _> = redis.del(&[&stream, &poison]).await;
        drop_scratch(scratch).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_held_key_holds_only_its_rows() {
    held_key_holds_only_its_rows::<Postgres>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_held_key_holds_only_its_rows() {
    held_key_holds_only_its_rows::<Sqlite>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mariadb_held_key_holds_only_its_rows() {
    held_key_holds_only_its_rows::<MySql>().await;
}

/// A backlog of one key's ordered rows drains at the sink's pace, not one row per poll
/// interval: a claim takes at most one row of an ordered key, and the worker claims again
/// at once after a batch that published rows, since delivering a row releases its key's
/// next one (NOTIFY fires on inserts only). Shown on SQLite, which has no other wake-up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ordered_backlog_drains_without_waiting_for_polls() {
    let Some(mut redis) = redis_conn().await else {
        return;
    };
    let Some(scratch) = scratch::<Sqlite>().await else {
        return;
    };
    let stream = unique("txmq_chaos_backlog");
    let (pool, s) = (scratch.pool.clone(), stream.clone());
    let body = async move {
        const ROWS: usize = 10;
        txmq_outbox::migrate(&pool).await.expect("migrate");
        let ledger = Mutex::new(Ledger::default());
        let rows = (0..ROWS)
            .map(|i| {
                OutboxMessage::new(s.as_str(), format!("{i}").into_bytes())
                    .with_key("hot")
                    .ordered()
            })
            .collect();
        enqueue_tx(&pool, rows, true, &ledger, Duration::ZERO).await;
        let sink = RedisSink::connect(REDIS_URL).await.expect("the Redis sink");
        let config = RelayConfig {
            poll_interval: RelayConfig::default().poll_interval,
            ..fast_config(100, 2, 10)
        };
        let started = Instant::now();
        let relay = spawn_relay(pool.clone(), Box::new(sink), config);
        drained(&pool, Duration::from_secs(30)).await;
        let took = started.elapsed();
        relay.stop().await;
        eprintln!("{ROWS} ordered rows of one key drained in {took:?}");
        assert!(
            took < Duration::from_secs(3),
            "{ROWS} ordered rows of one key took {took:?} to drain (one row per poll interval)"
        );
    };
    guarded(Duration::from_secs(45), body, async move {
        let _: Result<(), _> = redis.del(&stream).await;
        drop_scratch(scratch).await;
    })
    .await;
}
