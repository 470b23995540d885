//! A real txmq broker in process, on ephemeral ports, for the client tests.

#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use txmq_broker::metadata::TopicType;
use txmq_broker::server::Server;
use txmq_broker::{Broker, BrokerConfig};
use txmq_client::{Batching, ClientConfig, Message, Producer, SimpleConsumer};

/// Broker settings for tests: quick check-backs, small segments.
pub fn broker_config(dir: &Path) -> BrokerConfig {
    BrokerConfig {
        data_dir: dir.to_path_buf(),
        listen: "127.0.0.1:0".into(),
        http: "127.0.0.1:0".into(),
        segment_size: 8 << 20,
        transaction_timeout_ms: 500,
        transaction_check_interval_ms: 300,
        ..BrokerConfig::default()
    }
}

/// Starts a broker on `dir`.
pub async fn start(dir: &Path) -> Server {
    Server::start(broker_config(dir))
        .await
        .expect("broker starts")
}

/// A broker on `dir` serving the gRPC services `routes` makes of it (given the address it
/// listens on). Returns that address, the broker, and what stops it.
pub async fn serve(
    dir: &Path,
    routes: impl FnOnce(Arc<Broker>, SocketAddr) -> tonic::service::Routes,
) -> (SocketAddr, Arc<Broker>, impl AsyncFnOnce()) {
    let broker = Broker::open(broker_config(dir)).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let background = tokio::spawn(broker.clone().run_background(stopped.clone()));
    let mut until = stopped;
    let serving = tokio::spawn(txmq_broker::net::serve_grpc(
        listener,
        routes(broker.clone(), addr),
        None,
        txmq_broker::net::ServeOptions::default(),
        async move {
            let _ = until.wait_for(|s| *s).await;
        },
    ));
    let b = broker.clone();
    let shutdown = async move || {
        b.begin_shutdown();
        stop.send_replace(true);
        serving.await.unwrap();
        background.await.unwrap();
        b.shutdown().await.unwrap();
    };
    (addr, broker, shutdown)
}

/// Client settings for `server`, with a short long poll so that empty receives are quick.
pub fn client(server: &Server) -> ClientConfig {
    ClientConfig::new(server.grpc_addr.to_string())
        .with_long_polling_timeout(Duration::from_secs(1))
}

/// Client settings for `server` whose producers keep one request in flight, so that sends
/// made meanwhile wait and are joined.
pub fn joining_client(server: &Server) -> ClientConfig {
    client(server).with_batching(Some(Batching {
        max_in_flight: 1,
        ..Batching::default()
    }))
}

pub fn topic(server: &Server, name: &str, kind: TopicType) {
    server
        .broker
        .metadata()
        .create_topic(name, kind, 4)
        .expect("topic created");
}

pub fn group(server: &Server, name: &str, max_attempts: u32, fifo: bool, backoff_ms: Vec<u64>) {
    server
        .broker
        .metadata()
        .put_group(name, max_attempts, fifo, backoff_ms)
        .expect("group created");
}

/// Runs a test body with a bound on its duration.
pub async fn within<T>(secs: u64, body: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), body)
        .await
        .expect("the test finished in time")
}

/// Asserts that one receive (a long poll) brings nothing: every message was acknowledged,
/// or is not deliverable, or is still invisible. Whatever does come stays invisible for
/// `invisible`.
pub async fn assert_nothing_comes(consumer: &SimpleConsumer, invisible: Duration) {
    let got = consumer.receive(32, invisible).await.expect("receive");
    assert!(got.is_empty(), "{} message(s) came", got.len());
}

/// Runs `work`, which stores `n` records, and asserts that they took fewer than
/// `fewer_than` group commits: they were joined into few requests.
pub async fn stored_in_few_writes<T>(
    server: &Server,
    n: usize,
    fewer_than: usize,
    what: &str,
    work: impl Future<Output = T>,
) -> T {
    let before = server.broker.store().stats();
    let out = work.await;
    let after = server.broker.store().stats();
    assert_eq!(after.records - before.records, n as u64);
    let writes = after.group_commits - before.group_commits;
    assert!(
        writes < fewer_than as u64,
        "{writes} group commits for {n} {what}"
    );
    out
}

/// Asserts that `group` has acknowledged every message it was given.
pub fn assert_all_acked(server: &Server, group: &str) {
    let stats = server.broker.group_stats(group);
    assert_eq!(
        (stats.lag, stats.in_flight),
        (0, 0),
        "every message acknowledged"
    );
}

/// Sends `n` messages to `topic` (`"<topic> 0"`, `"<topic> 1"`, ...), in batches of 50.
pub async fn fill(server: &Server, topic: &str, n: usize) {
    let producer = Producer::connect(client(server), [topic]).await.unwrap();
    for start in (0..n).step_by(50) {
        let batch = (start..n.min(start + 50))
            .map(|i| Message::new(topic, format!("{topic} {i}")))
            .collect();
        producer.send_batch(batch).await.unwrap();
    }
}
