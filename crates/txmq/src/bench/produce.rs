//! `txmq bench produce`: concurrent durable sends, each awaited, for a fixed time, against
//! txmq over the RocketMQ 5 gRPC protocol and, for comparison, against RabbitMQ and NATS
//! JetStream with the same workload. Reports sends/s, MB/s and acknowledgement latencies.
//!
//! Every target gets the same shape of load: `--concurrency` tasks, each sending one message
//! and waiting for the broker's durable acknowledgement before sending the next, over a few
//! connections shared by the tasks.
//!
//! txmq is driven through the product's own client, [`txmq_client`]: one [`Producer`] (or
//! [`TransactionalProducer`]) per connection, task `i` sending through producer
//! `i % connections`. The client retries a send that failed transiently (connection lost,
//! timeout, throttling, server error) as the server's retry policy says (3 attempts by
//! default, with the same message id), and likewise a commit; a half message is sent once.
//! A send counts as an error only when the client gives up (or [`SEND_TIMEOUT`] passes),
//! and its latency includes the client's retries.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use tokio::task::JoinSet;
use txmq_client::{
    Batching, ClientConfig, Message, MessageView, Producer, TransactionChecker,
    TransactionResolution, TransactionalProducer,
};

use super::latency::{Latencies, LatencySummary, bench_body, round3};
use super::peers;
use crate::cli::{BenchProduceArgs, BenchTarget};

/// The longest one send (with its commit, if transactional) may take before it counts as an
/// error; it also bounds how far a run can overrun its deadline.
const SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// Pause after a failed send, so that a dead broker does not turn the run into a busy loop.
const ERROR_BACKOFF: Duration = Duration::from_millis(20);

/// What the durable acknowledgement of each target means, for the table's footnote.
pub const TXMQ_DURABILITY: &str = "ack after the message is in the commit log and fdatasync'd \
     (with the server's default durability = \"sync\"; \"async\" acks before the fdatasync)";
pub const RABBITMQ_DURABILITY: &str = "publisher confirm after the persistent message is written \
     to disk for a durable queue (fsyncs batched across messages)";
pub const NATS_DURABILITY: &str = "PubAck after the write, before any fsync: the server fsyncs \
     every 2 min by default (sync_interval), so acked messages can be lost on power loss";

/// The load every target gets.
pub struct Workload {
    pub size: u64,
    pub concurrency: u64,
    pub seconds: u64,
    /// Connections shared by the tasks (at most one per task).
    pub connections: usize,
    pub body: Arc<Vec<u8>>,
}

/// One durable send, as each target does it.
pub trait Publisher: Send + Sync + 'static {
    /// Sends message `n` of task `task` and waits for the broker's acknowledgement.
    ///
    /// # Errors
    /// A description of what failed; the run counts it and goes on.
    fn publish(&self, task: u64, n: u64) -> impl Future<Output = Result<(), String>> + Send;
}

/// What one target did, as printed.
#[derive(Debug, Serialize)]
pub struct TargetReport {
    pub target: &'static str,
    /// The broker's address (credentials removed).
    pub server: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_version: Option<String>,
    /// The topic, queue or stream the run wrote to.
    pub resource: String,
    /// Whether a temporary queue or stream was deleted at the end (`None`: nothing to delete).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deleted: Option<bool>,
    /// Messages the queue or stream held just before deletion (a check of `msgs`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stored: Option<u64>,
    pub msgs: u64,
    pub elapsed_secs: f64,
    pub msgs_per_sec: f64,
    /// Body bytes acknowledged per second, in 10^6 bytes.
    pub mb_per_sec: f64,
    #[serde(flatten)]
    pub latency: LatencySummary,
    pub errors: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
    pub durability: &'static str,
}

/// What the driving loop measured.
pub struct Measured {
    pub msgs: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub elapsed: Duration,
    pub latency: LatencySummary,
}

impl Measured {
    /// The report row of a target, with nothing to delete.
    pub fn report(
        self,
        target: &'static str,
        server: String,
        resource: String,
        w: &Workload,
        durability: &'static str,
    ) -> TargetReport {
        let secs = self.elapsed.as_secs_f64().max(f64::MIN_POSITIVE);
        TargetReport {
            target,
            server,
            server_version: None,
            resource,
            deleted: None,
            stored: None,
            msgs: self.msgs,
            elapsed_secs: round3(secs),
            msgs_per_sec: round3(self.msgs as f64 / secs),
            mb_per_sec: round3((self.msgs * w.size) as f64 / secs / 1e6),
            latency: self.latency,
            errors: self.errors,
            first_error: self.first_error,
            durability,
        }
    }
}

/// The whole printed result.
#[derive(Debug, Serialize)]
struct Report {
    size: u64,
    concurrency: u64,
    seconds: u64,
    connections: usize,
    transactional: bool,
    /// txmq's client batching: requests per producer in flight before further sends of
    /// normal messages are joined (0: off, every message in a request of its own).
    max_in_flight: usize,
    results: Vec<TargetReport>,
    /// txmq's msgs/s divided by each peer's, when both ran.
    ratios: BTreeMap<&'static str, f64>,
}

/// Runs the benchmark against the chosen targets and prints the report.
///
/// # Errors
/// If a target cannot be reached or set up, or any send failed, or a temporary queue or
/// stream could not be deleted; the report is printed first whenever the runs happened.
pub fn run(args: &BenchProduceArgs) -> anyhow::Result<()> {
    if args.transactional && matches!(args.target, BenchTarget::Rabbitmq | BenchTarget::Nats) {
        bail!("--transactional applies to txmq only; use --target txmq or --target all");
    }
    let workload = Workload {
        size: args.size,
        concurrency: args.concurrency,
        seconds: args.seconds,
        connections: args.connections.min(args.concurrency) as usize,
        body: Arc::new(bench_body(args.size)),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let results = runtime.block_on(async {
        let mut results = Vec::new();
        let all = args.target == BenchTarget::All;
        if all || args.target == BenchTarget::Txmq {
            results.push(run_txmq(args, &workload).await?);
        }
        if all || args.target == BenchTarget::Rabbitmq {
            results.push(peers::rabbitmq::run(&args.rabbitmq_url, &workload).await?);
        }
        if all || args.target == BenchTarget::Nats {
            results.push(peers::nats::run(&args.nats_url, &workload).await?);
        }
        anyhow::Ok(results)
    })?;
    drop(runtime);

    let rate = |name: &str| {
        results
            .iter()
            .find(|r| r.target == name)
            .map(|r| r.msgs_per_sec)
    };
    let mut ratios = BTreeMap::new();
    if let Some(txmq) = rate("txmq") {
        for (key, peer) in [
            ("txmq_over_rabbitmq", "rabbitmq"),
            ("txmq_over_nats", "nats"),
        ] {
            if let Some(p) = rate(peer).filter(|p| *p > 0.0) {
                ratios.insert(key, round3(txmq / p));
            }
        }
    }
    let report = Report {
        size: args.size,
        concurrency: args.concurrency,
        seconds: args.seconds,
        connections: workload.connections,
        transactional: args.transactional,
        max_in_flight: args.max_in_flight,
        results,
        ratios,
    };
    super::print_report(args.json, &table(&report), &report)?;

    let mut problems = Vec::new();
    for r in &report.results {
        if r.errors > 0 {
            problems.push(format!(
                "{}: {} sends failed (first: {})",
                r.target,
                r.errors,
                r.first_error.as_deref().unwrap_or("?")
            ));
        }
        if r.deleted == Some(false) {
            problems.push(format!("{}: {} was not deleted", r.target, r.resource));
        }
    }
    if !problems.is_empty() {
        bail!("{}", problems.join("; "));
    }
    Ok(())
}

/// Starts `concurrency` tasks that publish through `publisher` until the time is up, and
/// returns what they did (see [`run_timed`]).
///
/// # Errors
/// If a task panicked.
pub async fn drive<P: Publisher>(publisher: Arc<P>, w: &Workload) -> anyhow::Result<Measured> {
    let publish = move |task, n| {
        let publisher = publisher.clone();
        async move { publisher.publish(task, n).await }
    };
    Ok(run_timed(w.concurrency, w.seconds, None, publish).await?.0)
}

/// Starts `concurrency` tasks, each doing `op(task, n)` for n = 0, 1, ... and waiting for it,
/// until `seconds` have passed, and returns what they did and the longest latency. Each
/// latency is also recorded in `also`, when given. Every task stops at the deadline; an
/// operation in flight then may run for up to [`SEND_TIMEOUT`] more, and counts as an error
/// past it. After an error a task pauses [`ERROR_BACKOFF`].
///
/// # Errors
/// If a task panicked.
pub async fn run_timed<F, Fut>(
    concurrency: u64,
    seconds: u64,
    also: Option<Arc<Latencies>>,
    op: F,
) -> anyhow::Result<(Measured, Duration)>
where
    F: Fn(u64, u64) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    let latencies = Arc::new(Latencies::new(
        usize::try_from(concurrency).unwrap_or(usize::MAX),
    )?);
    let first_error = Arc::new(Mutex::new(None::<String>));
    let start = Instant::now();
    let deadline = start + Duration::from_secs(seconds);
    let mut tasks = JoinSet::new();
    for task in 0..concurrency {
        let op = op.clone();
        let latencies = latencies.clone();
        let also = also.clone();
        let first_error = first_error.clone();
        tasks.spawn(async move {
            let (mut done, mut errors, mut max) = (0u64, 0u64, Duration::ZERO);
            let mut n = 0u64;
            while Instant::now() < deadline {
                let started = Instant::now();
                let outcome = tokio::time::timeout(SEND_TIMEOUT, op(task, n))
                    .await
                    .unwrap_or_else(|_| Err(format!("no answer within {SEND_TIMEOUT:?}")));
                n += 1;
                match outcome {
                    Ok(()) => {
                        let latency = started.elapsed();
                        latencies.record(task, latency);
                        if let Some(also) = &also {
                            also.record(task, latency);
                        }
                        max = max.max(latency);
                        done += 1;
                    }
                    Err(e) => {
                        errors += 1;
                        first_error
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .get_or_insert(e);
                        tokio::time::sleep_until(
                            (Instant::now() + ERROR_BACKOFF).min(deadline).into(),
                        )
                        .await;
                    }
                }
            }
            (done, errors, max)
        });
    }
    let (mut msgs, mut errors, mut max) = (0, 0, Duration::ZERO);
    while let Some(joined) = tasks.join_next().await {
        let (d, e, x) = joined.context("a benchmark task panicked")?;
        msgs += d;
        errors += e;
        max = max.max(x);
    }
    let elapsed = start.elapsed();
    let latency = if msgs > 0 {
        latencies.summary(max)?
    } else {
        LatencySummary::default()
    };
    let first_error = first_error.lock().unwrap_or_else(|e| e.into_inner()).take();
    let measured = Measured {
        msgs,
        errors,
        first_error,
        elapsed,
        latency,
    };
    Ok((measured, max))
}

/// One connection's client of txmq.
enum TxmqClient {
    Plain(Producer),
    /// Each send is a half message ([`TransactionalProducer::begin`]) and its commit.
    Transactional(TransactionalProducer),
}

/// Answers the server's check-backs with commit: the benchmark begins only transactions it
/// commits, so a check-back comes only for one whose commit was lost or late (e.g. when a
/// send ran out of time).
struct CommitAll;

impl TransactionChecker for CommitAll {
    async fn check(&self, _transaction_id: &str, _message: &MessageView) -> TransactionResolution {
        TransactionResolution::Commit
    }
}

/// Sends to txmq through [`txmq_client`], over the RocketMQ 5 gRPC protocol.
struct Txmq {
    /// One client per connection; task `i` uses client `i % clients.len()`.
    clients: Vec<TxmqClient>,
    topic: String,
    body: Arc<Vec<u8>>,
}

impl Publisher for Txmq {
    async fn publish(&self, task: u64, _n: u64) -> Result<(), String> {
        let i = usize::try_from(task).unwrap_or(usize::MAX) % self.clients.len();
        let message = Message::new(self.topic.as_str(), self.body.as_ref().clone());
        match &self.clients[i] {
            TxmqClient::Plain(producer) => producer
                .send(message)
                .await
                .map(drop)
                .map_err(|e| e.to_string()),
            TxmqClient::Transactional(producer) => {
                let transaction = producer
                    .begin(message)
                    .await
                    .map_err(|e| format!("half message: {e}"))?;
                transaction
                    .commit()
                    .await
                    .map_err(|e| format!("commit: {e}"))
            }
        }
    }
}

/// The error context of a failed connection to the txmq server at `server`.
pub fn cannot_connect(server: &str) -> String {
    format!(
        "cannot connect to the txmq server at {}",
        server_uri(server)
    )
}

/// `server` as a URI for the report: `http://` is added when no scheme is given.
pub fn server_uri(server: &str) -> String {
    if server.contains("://") {
        server.to_string()
    } else {
        format!("http://{server}")
    }
}

async fn run_txmq(args: &BenchProduceArgs, w: &Workload) -> anyhow::Result<TargetReport> {
    let batching = (args.max_in_flight > 0).then(|| Batching {
        max_in_flight: args.max_in_flight,
        ..Batching::default()
    });
    let config = ClientConfig::new(&args.server).with_batching(batching);
    let topics = [args.topic.as_str()];
    let mut clients = Vec::with_capacity(w.connections.max(1));
    for _ in 0..w.connections.max(1) {
        let client = if args.transactional {
            TransactionalProducer::connect(config.clone(), topics, CommitAll)
                .await
                .map(TxmqClient::Transactional)
        } else {
            Producer::connect(config.clone(), topics)
                .await
                .map(TxmqClient::Plain)
        };
        clients.push(client.with_context(|| cannot_connect(&args.server))?);
    }
    let publisher = Arc::new(Txmq {
        clients,
        topic: args.topic.clone(),
        body: w.body.clone(),
    });
    let measured = drive(publisher.clone(), w).await?;
    // Every task has finished: this is the last reference.
    if let Some(publisher) = Arc::into_inner(publisher) {
        let shutdowns = publisher.clients.into_iter().map(|c| async move {
            match c {
                TxmqClient::Plain(p) => p.shutdown().await,
                TxmqClient::Transactional(p) => p.shutdown().await,
            }
        });
        futures::future::join_all(shutdowns).await;
    }
    let durability = TXMQ_DURABILITY;
    Ok(measured.report(
        "txmq",
        server_uri(&args.server),
        args.topic.clone(),
        w,
        durability,
    ))
}

/// The report as an aligned, human-readable table with a footnote on what each target's
/// acknowledgement guarantees.
fn table(r: &Report) -> String {
    let mut out = format!(
        "txmq bench produce: {} B bodies, {} tasks, {} connections, {} s per target{}\n  {}\n",
        r.size,
        r.concurrency,
        r.connections,
        r.seconds,
        if r.transactional {
            " (txmq: transactional sends, half message + commit counted as one)"
        } else {
            ""
        },
        match r.max_in_flight {
            0 => "txmq client batching: off, one message per request".to_string(),
            n => format!(
                "txmq client batching: sends wait and are joined while a producer has {n} \
                 request(s) in flight"
            ),
        }
    );
    out.push_str(&format!(
        "  {:<9} {:>10} {:>9} {:>8} {:>8} {:>9} {:>9} {:>9} {:>7}\n",
        "target", "msgs", "msgs/s", "MB/s", "p50 ms", "p99 ms", "p99.9 ms", "max ms", "errors"
    ));
    for t in &r.results {
        let l = &t.latency;
        out.push_str(&format!(
            "  {:<9} {:>10} {:>9.1} {:>8.3} {:>8.3} {:>9.3} {:>9.3} {:>9.3} {:>7}\n",
            t.target,
            t.msgs,
            t.msgs_per_sec,
            t.mb_per_sec,
            l.p50_ms,
            l.p99_ms,
            l.p999_ms,
            l.max_ms,
            t.errors
        ));
    }
    for t in r.results.iter().filter(|t| t.target != "txmq") {
        if let Some(ratio) = r.ratios.get(format!("txmq_over_{}", t.target).as_str()) {
            out.push_str(&format!("  txmq / {}: {ratio:.3}x msgs/s\n", t.target));
        }
    }
    out.push_str("  where:\n");
    for t in &r.results {
        let version = t
            .server_version
            .as_deref()
            .map(|v| format!(" {v}"))
            .unwrap_or_default();
        let stored = match (t.stored, t.deleted) {
            (Some(n), Some(true)) => format!(", {n} stored, deleted"),
            (Some(n), _) => format!(", {n} stored, NOT deleted"),
            (None, Some(false)) => ", NOT deleted".to_string(),
            _ => String::new(),
        };
        out.push_str(&format!(
            "    {:<9} {}{version}, {}{stored}\n",
            t.target, t.server, t.resource
        ));
    }
    out.push_str("  durability of an acknowledged message:\n");
    for t in &r.results {
        out.push_str(&format!("    {:<9} {}\n", t.target, t.durability));
    }
    if r.transactional && r.results.len() > 1 {
        out.push_str("    (the peers publish plain durable messages: they have no equivalent of a RocketMQ transactional send)\n");
    }
    for t in &r.results {
        if let Some(e) = &t.first_error {
            out.push_str(&format!("  {} first error: {e}\n", t.target));
        }
    }
    out
}
