//! `txmq bench db-send`: what sending a message together with a database transaction costs.
//!
//! Two ways of doing the same business write (one `INSERT` of an order row in PostgreSQL)
//! and sending one message about it, each from `--concurrency` tasks that loop for
//! `--seconds`:
//!
//! - **safe**: [`txmq_client::db::send_in_transaction`]: a half message to `<topic>-tx`, a
//!   database transaction with the transaction-log row and the order row, the database
//!   commit, then the message commit. The message is delivered if and only if the row
//!   committed, crashes included.
//! - **unsafe**: a database transaction with the order row, the database commit, then a
//!   plain send to `<topic>-plain`. A crash or a failed send after the commit loses the
//!   message.
//!
//! The modes run alternately (unsafe, safe, unsafe, safe) so that drift of a noisy machine
//! affects both alike, and the report gives each mode's operations per second, latencies
//! per operation, and the cost ratio: unsafe ops/s divided by safe ops/s.
//!
//! Everything in the database lives in a scratch schema of its own, created at the start
//! and dropped at the end (also when the run fails after creating it).

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use serde::Serialize;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};
use tokio::task::JoinSet;
use txmq_client::db::{self, DbChecker};
use txmq_client::{ClientConfig, Message, Producer, TransactionalProducer};

use super::latency::{Latencies, LatencySummary, bench_body, round3};
use super::produce::run_timed;
use crate::cli::BenchDbSendArgs;

/// Pairs of rounds (unsafe then safe) measured.
const PAIRS: u32 = 2;
/// Pool connections beyond one per task (the check-back answers use the pool too).
const EXTRA_CONNECTIONS: u32 = 4;
/// Operations each task does in each mode before the clock starts: creates the topics,
/// opens the pool's connections and warms both paths.
const WARM_UP_OPS: u64 = 2;
/// The longest one warm-up operation may take (timed rounds use
/// [`run_timed`]'s limit).
const OP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long to wait for PostgreSQL to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The business table, in the scratch schema.
const CREATE_ORDERS: &str = "CREATE TABLE bench_orders (id BIGINT PRIMARY KEY, amount BIGINT NOT NULL, paid_at BIGINT NOT NULL)";
/// The business write of every operation, in both modes.
const INSERT_ORDER: &str = "INSERT INTO bench_orders (id, amount, paid_at) VALUES ($1, $2, $3)";

/// How an operation writes and sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Mode {
    /// Database commit, then a plain send.
    Unsafe,
    /// [`db::send_in_transaction`].
    Safe,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Unsafe => "unsafe",
            Mode::Safe => "safe",
        }
    }
}

/// What one round did.
#[derive(Debug, Serialize)]
struct RoundReport {
    /// 1-based, in the order run.
    round: u32,
    mode: Mode,
    ops: u64,
    elapsed_secs: f64,
    ops_per_sec: f64,
    #[serde(flatten)]
    latency: LatencySummary,
    errors: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    first_error: Option<String>,
}

/// Both rounds of one mode together.
#[derive(Debug, Serialize)]
struct ModeReport {
    ops: u64,
    elapsed_secs: f64,
    /// Operations divided by the time of the mode's rounds.
    ops_per_sec: f64,
    /// Latency of an operation over all of the mode's rounds.
    #[serde(flatten)]
    latency: LatencySummary,
    errors: u64,
}

/// The whole printed result.
#[derive(Debug, Serialize)]
struct Report {
    server: String,
    /// The PostgreSQL URL, password removed.
    db: String,
    /// The scratch schema the run wrote to.
    schema: String,
    schema_dropped: bool,
    tx_topic: String,
    plain_topic: String,
    size: u64,
    concurrency: u64,
    seconds: u64,
    pool_size: u32,
    /// Operations per task and mode before the measured rounds.
    warm_up_ops_per_task: u64,
    rounds: Vec<RoundReport>,
    #[serde(rename = "unsafe")]
    unsafe_mode: ModeReport,
    safe: ModeReport,
    /// Unsafe ops/s divided by safe ops/s, over all rounds: how many times more the safe
    /// path costs.
    cost_ratio: f64,
    /// The same ratio for each pair of rounds (unsafe round, then safe round).
    pair_ratios: Vec<f64>,
    /// Rows in `bench_orders` at the end (warm-up included).
    order_rows: i64,
    /// Rows in `txmq_tx_log` at the end (one per safe operation whose database part
    /// committed, warm-up included).
    log_rows: i64,
}

/// What the rounds measured, before the schema is dropped.
struct Measured {
    pool_size: u32,
    rounds: Vec<RoundReport>,
    unsafe_mode: ModeReport,
    safe: ModeReport,
    order_rows: i64,
    log_rows: i64,
}

/// Runs the benchmark and prints the report.
///
/// # Errors
/// If PostgreSQL or the server cannot be reached or set up, or the warm-up fails; after
/// printing the report, if any operation failed or the scratch schema could not be dropped.
pub fn run(args: &BenchDbSendArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let report = runtime.block_on(measure(args))?;
    drop(runtime);

    super::print_report(args.json, &table(&report), &report)?;

    let mut problems = Vec::new();
    for r in &report.rounds {
        if r.errors > 0 {
            problems.push(format!(
                "round {} ({}): {} operations failed (first: {})",
                r.round,
                r.mode.name(),
                r.errors,
                r.first_error.as_deref().unwrap_or("?")
            ));
        }
    }
    if !report.schema_dropped {
        problems.push(format!(
            "the scratch schema {} was not dropped; drop it with DROP SCHEMA {} CASCADE",
            report.schema, report.schema
        ));
    }
    if !problems.is_empty() {
        bail!("{}", problems.join("; "));
    }
    Ok(())
}

/// Creates the scratch schema, runs the rounds in it, and drops it.
async fn measure(args: &BenchDbSendArgs) -> anyhow::Result<Report> {
    let db = txmq_outbox::sink::redact_url(&args.db, false);
    let base = PgConnectOptions::from_str(&args.db)
        .with_context(|| format!("invalid PostgreSQL URL {db}"))?;
    let mut admin = tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(&base))
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {CONNECT_TIMEOUT:?}"))
        .and_then(|r| r.map_err(anyhow::Error::from))
        .with_context(|| format!("cannot connect to PostgreSQL at {db}"))?;
    let schema = format!("txmq_bench_{}", uuid::Uuid::now_v7().simple());
    sqlx::query(&format!("CREATE SCHEMA \"{schema}\""))
        .execute(&mut admin)
        .await
        .with_context(|| format!("cannot create the schema {schema} in {db}"))?;

    let measured = in_schema(args, &base, &schema).await;

    let dropped = drop_schema(&mut admin, &schema).await;
    if let Err(e) = &dropped {
        tracing::warn!(%schema, error = %format!("{e:#}"), "cannot drop the scratch schema");
    }
    if let Err(e) = admin.close().await {
        tracing::debug!(error = %e, "closing the PostgreSQL connection failed");
    }
    let measured = measured.with_context(|| match &dropped {
        Ok(()) => format!("the run failed (the schema {schema} was dropped)"),
        Err(_) => format!("the run failed (the schema {schema} could NOT be dropped)"),
    })?;

    let unsafe_rate = measured.unsafe_mode.ops_per_sec;
    let safe_rate = measured.safe.ops_per_sec;
    let pair_ratios = measured
        .rounds
        .chunks(2)
        .filter_map(|pair| match pair {
            [u, s] if s.ops_per_sec > 0.0 => Some(round3(u.ops_per_sec / s.ops_per_sec)),
            _ => None,
        })
        .collect();
    Ok(Report {
        server: args.server.clone(),
        db,
        schema,
        schema_dropped: dropped.is_ok(),
        tx_topic: tx_topic(&args.topic),
        plain_topic: plain_topic(&args.topic),
        size: args.size,
        concurrency: args.concurrency,
        seconds: args.seconds,
        pool_size: measured.pool_size,
        warm_up_ops_per_task: WARM_UP_OPS,
        rounds: measured.rounds,
        unsafe_mode: measured.unsafe_mode,
        safe: measured.safe,
        cost_ratio: if safe_rate > 0.0 {
            round3(unsafe_rate / safe_rate)
        } else {
            0.0
        },
        pair_ratios,
        order_rows: measured.order_rows,
        log_rows: measured.log_rows,
    })
}

/// Drops the scratch schema and everything in it, waiting at most 10 s for locks (and
/// without the notice listing what the drop cascades to).
async fn drop_schema(admin: &mut PgConnection, schema: &str) -> anyhow::Result<()> {
    for set in [
        "SET lock_timeout = '10s'",
        "SET client_min_messages = warning",
    ] {
        sqlx::query(set)
            .execute(&mut *admin)
            .await
            .with_context(|| format!("cannot run {set}"))?;
    }
    sqlx::query(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
        .execute(&mut *admin)
        .await
        .with_context(|| format!("cannot drop the schema {schema}"))?;
    Ok(())
}

/// Opens a pool whose connections work in `schema`, runs the rounds, and closes the pool.
async fn in_schema(
    args: &BenchDbSendArgs,
    base: &PgConnectOptions,
    schema: &str,
) -> anyhow::Result<Measured> {
    let concurrency = u32::try_from(args.concurrency).context("--concurrency is too large")?;
    let pool_size = concurrency.saturating_add(EXTRA_CONNECTIONS);
    let options = base.clone().options([("search_path", schema)]);
    let pool = PgPoolOptions::new()
        .max_connections(pool_size)
        .acquire_timeout(CONNECT_TIMEOUT)
        .connect_with(options)
        .await
        .with_context(|| {
            format!(
                "cannot connect to PostgreSQL at {}",
                txmq_outbox::sink::redact_url(&args.db, false)
            )
        })?;
    let measured = with_pool(args, &pool, pool_size).await;
    pool.close().await;
    measured
}

/// Creates the tables, connects the producers, warms up and runs the rounds.
async fn with_pool(
    args: &BenchDbSendArgs,
    pool: &PgPool,
    pool_size: u32,
) -> anyhow::Result<Measured> {
    db::migrate(pool)
        .await
        .context("cannot create the transaction-log tables (db::migrate)")?;
    sqlx::query(CREATE_ORDERS)
        .execute(pool)
        .await
        .context("cannot create the table bench_orders")?;

    let config = ClientConfig::new(&args.server);
    let (tx_topic, plain_topic) = (tx_topic(&args.topic), plain_topic(&args.topic));
    let producer = Producer::connect(config.clone(), [plain_topic.as_str()])
        .await
        .with_context(|| {
            format!(
                "cannot connect a producer to the txmq server at {}",
                args.server
            )
        })?;
    let tx_producer = match TransactionalProducer::connect(
        config,
        [tx_topic.as_str()],
        DbChecker::new(pool.clone()),
    )
    .await
    {
        Ok(p) => p,
        Err(e) => {
            producer.shutdown().await;
            return Err(e).with_context(|| {
                format!(
                    "cannot connect a transactional producer to the txmq server at {}",
                    args.server
                )
            });
        }
    };
    let ops = Arc::new(Operations {
        pool: pool.clone(),
        producer,
        tx_producer,
        tx_topic,
        plain_topic,
        body: bench_body(args.size),
        next_id: AtomicI64::new(1),
    });

    let measured = rounds(args, &ops, pool, pool_size).await;
    ops.producer.clone().shutdown().await;
    ops.tx_producer.clone().shutdown().await;
    measured
}

/// The warm-up, the rounds, and the row counts.
async fn rounds(
    args: &BenchDbSendArgs,
    ops: &Arc<Operations>,
    pool: &PgPool,
    pool_size: u32,
) -> anyhow::Result<Measured> {
    for mode in [Mode::Unsafe, Mode::Safe] {
        warm_up(ops, mode, args.concurrency).await?;
    }

    let tasks = usize::try_from(args.concurrency).unwrap_or(usize::MAX);
    let totals = [
        Arc::new(Latencies::new(tasks)?),
        Arc::new(Latencies::new(tasks)?),
    ];
    let mut rounds = Vec::new();
    let mut number = 0;
    for _ in 0..PAIRS {
        for (i, mode) in [Mode::Unsafe, Mode::Safe].into_iter().enumerate() {
            number += 1;
            let round = drive(ops, mode, number, args, totals[i].clone()).await?;
            tracing::info!(
                round = number,
                mode = mode.name(),
                ops_per_sec = round.report.ops_per_sec,
                "round done"
            );
            rounds.push(round);
        }
    }
    let total = |mode: Mode, latencies: &Latencies| -> anyhow::Result<ModeReport> {
        let of_mode = || rounds.iter().filter(|r| r.report.mode == mode);
        let n: u64 = of_mode().map(|r| r.report.ops).sum();
        let elapsed: f64 = of_mode().map(|r| r.elapsed.as_secs_f64()).sum();
        let max = of_mode().map(|r| r.max).max().unwrap_or_default();
        Ok(ModeReport {
            ops: n,
            elapsed_secs: round3(elapsed),
            ops_per_sec: round3(n as f64 / elapsed.max(f64::MIN_POSITIVE)),
            latency: if n > 0 {
                latencies.summary(max)?
            } else {
                LatencySummary::default()
            },
            errors: of_mode().map(|r| r.report.errors).sum(),
        })
    };
    let unsafe_mode = total(Mode::Unsafe, &totals[0])?;
    let safe = total(Mode::Safe, &totals[1])?;

    let count = |table: &'static str| async move {
        sqlx::query_scalar::<_, i64>(&format!("SELECT count(*) FROM {table}"))
            .fetch_one(pool)
            .await
            .with_context(|| format!("cannot count the rows of {table}"))
    };
    let order_rows = count("bench_orders").await?;
    let log_rows = count("txmq_tx_log").await?;
    Ok(Measured {
        pool_size,
        rounds: rounds.into_iter().map(|r| r.report).collect(),
        unsafe_mode,
        safe,
        order_rows,
        log_rows,
    })
}

/// The clients every task shares, and how one operation of each mode is done.
struct Operations {
    pool: PgPool,
    producer: Producer,
    tx_producer: TransactionalProducer,
    tx_topic: String,
    plain_topic: String,
    body: Vec<u8>,
    /// The next order id; unique across modes and rounds.
    next_id: AtomicI64,
}

impl Operations {
    /// Writes one order row and sends one message about it, as `mode` does.
    ///
    /// # Errors
    /// A description of what failed; the round counts it and goes on.
    async fn run(&self, mode: Mode) -> Result<(), String> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let paid_at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        match mode {
            Mode::Unsafe => {
                let mut tx = self
                    .pool
                    .begin()
                    .await
                    .map_err(|e| format!("database begin: {e}"))?;
                insert_order(&mut tx, id, paid_at)
                    .await
                    .map_err(|e| format!("insert into bench_orders: {e}"))?;
                tx.commit()
                    .await
                    .map_err(|e| format!("database commit: {e}"))?;
                self.producer
                    .send(self.message(&self.plain_topic, id))
                    .await
                    .map_err(|e| format!("send after the database commit: {e}"))?;
            }
            Mode::Safe => {
                let message = self.message(&self.tx_topic, id);
                let committed =
                    db::send_in_transaction(&self.tx_producer, &self.pool, message, move |tx| {
                        Box::pin(async move { insert_order(tx, id, paid_at).await })
                    })
                    .await
                    .map_err(|e| format!("send_in_transaction: {e}"))?;
                committed
                    .message_commit
                    .map_err(|e| format!("message commit after the database commit: {e}"))?;
            }
        }
        Ok(())
    }

    /// The message about order `id`.
    fn message(&self, topic: &str, id: i64) -> Message {
        Message::new(topic, self.body.clone()).with_key(id.to_string())
    }
}

/// The business write: one order row.
async fn insert_order(conn: &mut PgConnection, id: i64, paid_at: i64) -> Result<(), sqlx::Error> {
    sqlx::query(INSERT_ORDER)
        .bind(id)
        .bind(100 + id % 900)
        .bind(paid_at)
        .execute(conn)
        .await
        .map(drop)
}

/// Runs [`WARM_UP_OPS`] operations of `mode` from each of `concurrency` tasks at once.
///
/// # Errors
/// The first failure: a warm-up that fails means the set-up is wrong (e.g. a topic of
/// that name exists with another message type), not that the machine is slow.
async fn warm_up(ops: &Arc<Operations>, mode: Mode, concurrency: u64) -> anyhow::Result<()> {
    let mut tasks = JoinSet::new();
    for _ in 0..concurrency {
        let ops = ops.clone();
        tasks.spawn(async move {
            for _ in 0..WARM_UP_OPS {
                tokio::time::timeout(OP_TIMEOUT, ops.run(mode))
                    .await
                    .unwrap_or_else(|_| Err(format!("no answer within {OP_TIMEOUT:?}")))?;
            }
            Ok::<_, String>(())
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined
            .context("a warm-up task panicked")?
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("warm-up of the {} mode failed", mode.name()))?;
    }
    Ok(())
}

/// A round's report and what the mode totals need from it.
struct Round {
    report: RoundReport,
    elapsed: Duration,
    max: Duration,
}

/// Runs round `number`: `--concurrency` tasks doing operations of `mode` until the time is
/// up. Latencies go into the round's histograms and into `mode_latencies`.
///
/// # Errors
/// If a task panicked.
async fn drive(
    ops: &Arc<Operations>,
    mode: Mode,
    number: u32,
    args: &BenchDbSendArgs,
    mode_latencies: Arc<Latencies>,
) -> anyhow::Result<Round> {
    let ops = ops.clone();
    let op = move |_task, _n| {
        let ops = ops.clone();
        async move { ops.run(mode).await }
    };
    let (m, max) = run_timed(args.concurrency, args.seconds, Some(mode_latencies), op).await?;
    let secs = m.elapsed.as_secs_f64().max(f64::MIN_POSITIVE);
    Ok(Round {
        report: RoundReport {
            round: number,
            mode,
            ops: m.msgs,
            elapsed_secs: round3(secs),
            ops_per_sec: round3(m.msgs as f64 / secs),
            latency: m.latency,
            errors: m.errors,
            first_error: m.first_error,
        },
        elapsed: m.elapsed,
        max,
    })
}

/// The transactional topic of the safe mode.
fn tx_topic(prefix: &str) -> String {
    format!("{prefix}-tx")
}

/// The normal topic of the unsafe mode.
fn plain_topic(prefix: &str) -> String {
    format!("{prefix}-plain")
}

/// The report as an aligned, human-readable table, with what each mode does.
fn table(r: &Report) -> String {
    let mut out = format!(
        "txmq bench db-send: {} B bodies, {} tasks, {} s per round, pool of {} connections\n",
        r.size, r.concurrency, r.seconds, r.pool_size
    );
    out.push_str(&format!(
        "  {:<6} {:<7} {:>9} {:>9} {:>8} {:>8} {:>9} {:>9} {:>7}\n",
        "round", "mode", "ops", "ops/s", "mean ms", "p50 ms", "p99 ms", "max ms", "errors"
    ));
    let row = |out: &mut String,
               round: &str,
               mode: Mode,
               ops: u64,
               rate: f64,
               l: &LatencySummary,
               errors: u64| {
        out.push_str(&format!(
            "  {:<6} {:<7} {:>9} {:>9.1} {:>8.3} {:>8.3} {:>9.3} {:>9.3} {:>7}\n",
            round,
            mode.name(),
            ops,
            rate,
            l.mean_ms,
            l.p50_ms,
            l.p99_ms,
            l.max_ms,
            errors
        ));
    };
    for t in &r.rounds {
        row(
            &mut out,
            &t.round.to_string(),
            t.mode,
            t.ops,
            t.ops_per_sec,
            &t.latency,
            t.errors,
        );
    }
    for (mode, m) in [(Mode::Unsafe, &r.unsafe_mode), (Mode::Safe, &r.safe)] {
        row(
            &mut out,
            "total",
            mode,
            m.ops,
            m.ops_per_sec,
            &m.latency,
            m.errors,
        );
    }
    let pairs = r
        .pair_ratios
        .iter()
        .map(|p| format!("{p:.3}x"))
        .collect::<Vec<_>>()
        .join(", ");
    out.push_str(&format!(
        "  cost ratio (unsafe ops/s / safe ops/s): {:.3}x (per pair of rounds: {pairs})\n",
        r.cost_ratio
    ));
    out.push_str("  where:\n");
    out.push_str(&format!(
        "    unsafe  BEGIN, INSERT bench_orders, COMMIT, then send to {} (NORMAL); a crash or failed send after the commit loses the message\n",
        r.plain_topic
    ));
    out.push_str(&format!(
        "    safe    send_in_transaction: half message to {} (TRANSACTION), BEGIN, INSERT txmq_tx_log, INSERT bench_orders, COMMIT, message commit\n",
        r.tx_topic
    ));
    out.push_str(&format!(
        "    server  {}\n    db      {}, schema {} ({}), {} order rows, {} log rows\n",
        r.server,
        r.db,
        r.schema,
        if r.schema_dropped {
            "dropped"
        } else {
            "NOT dropped"
        },
        r.order_rows,
        r.log_rows
    ));
    for t in &r.rounds {
        if let Some(e) = &t.first_error {
            out.push_str(&format!("  round {} first error: {e}\n", t.round));
        }
    }
    out
}
