//! `txmq bench relay`: the outbox relay from PostgreSQL to one or more sinks.
//!
//! For each sink and each relay count it measures, on a fresh schema:
//! - **throughput**: `--rows` rows are enqueued first (in transactions of 1,000), then the
//!   relays start and the clock runs until every row is delivered;
//! - **latency** (with `--rate`): the relays run, and `--tasks` tasks enqueue rows at `--rate` rows/s
//!   for `--seconds`, each in its own transaction; a row's latency runs from its enqueue
//!   (just before its commit) to the sink's confirmation, both stamped in milliseconds on
//!   this host's clock (`created_at`, `delivered_at`).
//!
//! Relays are in-process [`txmq_outbox::Relay`]s, each with its own connection pool, woken
//! by LISTEN/NOTIFY with the 1 s poll as fallback, or (`--no-notify`) polling every
//! `--poll-ms` with no insert trigger. `--rows-per-tx` sets how many rows each transaction
//! of the latency run enqueues.

use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use sqlx::{PgPool, Postgres};
use tokio::sync::watch;
use txmq_outbox::{Outbox, OutboxMessage, Relay, RelayConfig};

use super::latency::{bench_body, round3};
use crate::cli::BenchRelayArgs;

/// Rows per transaction when filling the table for the throughput run.
const FILL_TX: usize = 1000;

/// One measured configuration.
#[derive(Debug, Serialize)]
struct Measurement {
    sink: String,
    relays: usize,
    mode: &'static str,
    rows: u64,
    seconds: f64,
    rows_per_sec: f64,
    /// Latency run: the rate asked for and the rate reached by the enqueuers.
    target_rate: Option<u64>,
    enqueue_rate: Option<f64>,
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
    max_ms: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Report {
    db: String,
    notify: bool,
    poll_ms: Option<u64>,
    tasks: usize,
    rows_per_tx: u64,
    batch_size: usize,
    workers: usize,
    size: u64,
    results: Vec<Measurement>,
}

/// Runs the benchmark.
///
/// # Errors
/// The database or a sink cannot be reached, or a run does not drain.
pub fn run(args: &BenchRelayArgs) -> anyhow::Result<()> {
    if args.relays.is_empty() || args.relays.contains(&0) {
        bail!("--relays needs one or more counts of at least 1");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    let report = runtime.block_on(measure_all(args))?;
    let wake = match report.poll_ms {
        None => "LISTEN/NOTIFY, 1 s poll as fallback".to_string(),
        Some(ms) => format!("no trigger, poll every {ms} ms"),
    };
    let mut table = format!(
        "outbox relay, PostgreSQL {} -> sinks; batch {} x {} workers per relay, {} B payloads\n\
         wake-up: {wake}; latency run: {} tasks, {} row(s) per transaction\n\n",
        report.db, report.batch_size, report.workers, report.size, report.tasks, report.rows_per_tx
    );
    table.push_str(&format!(
        "{:<34} {:>6} {:<10} {:>8} {:>10} {:>9} {:>8} {:>8} {:>8}\n",
        "sink", "relays", "mode", "rows", "rows/s", "enq/s", "p50 ms", "p99 ms", "max ms"
    ));
    let opt = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.1}"));
    for m in &report.results {
        table.push_str(&format!(
            "{:<34} {:>6} {:<10} {:>8} {:>10.0} {:>9} {:>8} {:>8} {:>8}\n",
            m.sink,
            m.relays,
            m.mode,
            m.rows,
            m.rows_per_sec,
            opt(m.enqueue_rate),
            opt(m.p50_ms),
            opt(m.p99_ms),
            opt(m.max_ms)
        ));
    }
    super::print_report(args.json, &table, &report)
}

async fn measure_all(args: &BenchRelayArgs) -> anyhow::Result<Report> {
    let admin = PgPool::connect(&args.db)
        .await
        .with_context(|| format!("cannot connect to PostgreSQL at {}", args.db))?;
    let mut results = Vec::new();
    for sink in &args.sink {
        for &relays in &args.relays {
            let m = throughput(args, &admin, sink, relays).await?;
            eprintln!(
                "{sink}, {relays} relay(s): {:.0} rows/s over {} rows",
                m.rows_per_sec, m.rows
            );
            results.push(m);
            if let Some(rate) = args.rate {
                let m = latency(args, &admin, sink, relays, rate).await?;
                eprintln!(
                    "{sink}, {relays} relay(s), {rate} rows/s: p50 {:?} ms, p99 {:?} ms",
                    m.p50_ms, m.p99_ms
                );
                results.push(m);
            }
        }
    }
    Ok(Report {
        db: args.db.clone(),
        notify: !args.no_notify,
        poll_ms: args.no_notify.then_some(args.poll_ms),
        tasks: args.tasks,
        rows_per_tx: args.rows_per_tx.max(1),
        batch_size: args.batch_size,
        workers: args.workers,
        size: args.size,
        results,
    })
}

/// A scratch schema, its pool factory, and its removal.
struct Scratch {
    schema: String,
    url: String,
}

impl Scratch {
    async fn new(admin: &PgPool, url: &str) -> anyhow::Result<Self> {
        let schema = format!("txmq_bench_{}", uuid::Uuid::now_v7().simple());
        sqlx::query(&format!("CREATE SCHEMA {schema}"))
            .execute(admin)
            .await
            .context("cannot create the scratch schema")?;
        Ok(Self {
            schema,
            url: url.to_string(),
        })
    }

    async fn pool(&self, connections: u32) -> anyhow::Result<PgPool> {
        let options = sqlx::postgres::PgConnectOptions::from_str(&self.url)
            .context("bad PostgreSQL URL")?
            .options([("search_path", self.schema.as_str())]);
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(connections)
            .connect_with(options)
            .await
            .context("cannot connect to PostgreSQL")
    }

    async fn drop(self, admin: &PgPool) {
        if let Err(e) = sqlx::query(&format!("DROP SCHEMA {} CASCADE", self.schema))
            .execute(admin)
            .await
        {
            eprintln!("cannot drop schema {}: {e}", self.schema);
        }
    }
}

fn relay_config(args: &BenchRelayArgs, relay: usize) -> RelayConfig {
    let defaults = RelayConfig::default();
    RelayConfig {
        batch_size: args.batch_size,
        workers: args.workers,
        keep_delivered: None,
        instance: format!("bench-{relay}"),
        listen: !args.no_notify,
        poll_interval: if args.no_notify {
            Duration::from_millis(args.poll_ms)
        } else {
            defaults.poll_interval
        },
        ..defaults
    }
}

/// Starts `n` relays; the sender that stops them, and their tasks.
async fn start_relays(
    args: &BenchRelayArgs,
    scratch: &Scratch,
    sink_url: &str,
    n: usize,
) -> anyhow::Result<(watch::Sender<bool>, Vec<tokio::task::JoinHandle<()>>)> {
    let (stop, stopped) = watch::channel(false);
    let mut tasks = Vec::new();
    for i in 0..n {
        let pool = scratch
            .pool(u32::try_from(args.workers).unwrap_or(8) + 2)
            .await?;
        let sink = txmq_outbox::sink::connect(sink_url)
            .await
            .with_context(|| format!("cannot connect the sink {sink_url}"))?;
        let relay = Relay::<Postgres>::new(pool, sink, relay_config(args, i))?;
        let mut stopped = stopped.clone();
        tasks.push(tokio::spawn(async move {
            relay
                .run(async move {
                    let _ = stopped.wait_for(|s| *s).await;
                })
                .await;
        }));
    }
    Ok((stop, tasks))
}

async fn stop_relays(stop: watch::Sender<bool>, tasks: Vec<tokio::task::JoinHandle<()>>) {
    let _ = stop.send(true);
    for t in tasks {
        let _ = t.await;
    }
}

fn message(args: &BenchRelayArgs, body: &[u8]) -> OutboxMessage {
    OutboxMessage::new(args.destination.as_str(), body.to_vec())
}

/// Waits until no row is pending, at most `limit`.
async fn until_drained(pool: &PgPool, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let s = txmq_outbox::stats(pool).await?;
        if s.pending == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the outbox did not drain within {limit:?}: {} rows pending ({} retrying)",
                s.pending,
                s.retrying
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn throughput(
    args: &BenchRelayArgs,
    admin: &PgPool,
    sink: &str,
    relays: usize,
) -> anyhow::Result<Measurement> {
    // A fresh destination each time: no backlog from the previous measurement.
    prepare_destination(sink, &args.destination).await?;
    let scratch = Scratch::new(admin, &args.db).await?;
    let result = async {
        let pool = scratch.pool(4).await?;
        txmq_outbox::migrate_with_notify(&pool, !args.no_notify).await?;
        let body = bench_body(args.size);
        let outbox = Outbox::new();
        let mut left = args.rows;
        while left > 0 {
            let n = left.min(FILL_TX as u64);
            let mut tx = pool.begin().await?;
            for _ in 0..n {
                outbox.enqueue(&mut tx, message(args, &body)).await?;
            }
            tx.commit().await?;
            left -= n;
        }
        let started = Instant::now();
        let (stop, tasks) = start_relays(args, &scratch, sink, relays).await?;
        let drained = until_drained(&pool, Duration::from_secs(600)).await;
        let seconds = started.elapsed().as_secs_f64();
        stop_relays(stop, tasks).await;
        drained?;
        pool.close().await;
        Ok(Measurement {
            sink: sink.to_string(),
            relays,
            mode: "throughput",
            rows: args.rows,
            seconds: round3(seconds),
            rows_per_sec: round3(args.rows as f64 / seconds),
            target_rate: None,
            enqueue_rate: None,
            p50_ms: None,
            p99_ms: None,
            max_ms: None,
        })
    }
    .await;
    scratch.drop(admin).await;
    cleanup_destination(sink, &args.destination).await;
    result
}

async fn latency(
    args: &BenchRelayArgs,
    admin: &PgPool,
    sink: &str,
    relays: usize,
    rate: u64,
) -> anyhow::Result<Measurement> {
    // A fresh destination each time: no backlog from the previous measurement.
    prepare_destination(sink, &args.destination).await?;
    let scratch = Scratch::new(admin, &args.db).await?;
    let result = async {
        let pool = scratch.pool(args.tasks as u32 + 2).await?;
        txmq_outbox::migrate_with_notify(&pool, !args.no_notify).await?;
        let (stop, tasks) = start_relays(args, &scratch, sink, relays).await?;
        // Let the relays connect and LISTEN before the clock starts.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let total = rate * args.seconds;
        let per_tx = args.rows_per_tx.max(1);
        let interval = Duration::from_secs_f64(args.tasks as f64 * per_tx as f64 / rate as f64);
        let spread = interval.div_f64(args.tasks as f64);
        let body = Arc::new(bench_body(args.size));
        let started = Instant::now();
        let mut writers = Vec::new();
        for t in 0..args.tasks as u64 {
            let (pool, body, destination) = (pool.clone(), body.clone(), args.destination.clone());
            let start = tokio::time::Instant::now() + spread.mul_f64(t as f64);
            let count = total / args.tasks as u64 + u64::from(t < total % args.tasks as u64);
            writers.push(tokio::spawn(async move {
                let outbox = Outbox::new();
                let mut tick = tokio::time::interval_at(start, interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                let mut left = count;
                while left > 0 {
                    tick.tick().await;
                    let n = left.min(per_tx);
                    let mut tx = pool.begin().await?;
                    for _ in 0..n {
                        outbox
                            .enqueue(
                                &mut tx,
                                OutboxMessage::new(destination.as_str(), body.to_vec()),
                            )
                            .await?;
                    }
                    tx.commit().await?;
                    left -= n;
                }
                anyhow::Ok(())
            }));
        }
        for w in writers {
            w.await.context("an enqueuing task panicked")??;
        }
        let enqueue_seconds = started.elapsed().as_secs_f64();
        let drained = until_drained(&pool, Duration::from_secs(120)).await;
        stop_relays(stop, tasks).await;
        drained?;
        let mut waits: Vec<i64> = sqlx::query_scalar(
            "SELECT delivered_at - created_at FROM txmq_outbox WHERE status = 'D'",
        )
        .fetch_all(&pool)
        .await?;
        pool.close().await;
        if waits.len() as u64 != total {
            bail!("{} rows delivered out of {total}", waits.len());
        }
        waits.sort_unstable();
        let pick = |q: f64| {
            let i = ((waits.len() as f64 * q).ceil() as usize).clamp(1, waits.len()) - 1;
            waits[i] as f64
        };
        Ok(Measurement {
            sink: sink.to_string(),
            relays,
            mode: "latency",
            rows: total,
            seconds: round3(enqueue_seconds),
            rows_per_sec: round3(total as f64 / enqueue_seconds),
            target_rate: Some(rate),
            enqueue_rate: Some(round3(total as f64 / enqueue_seconds)),
            p50_ms: Some(pick(0.50)),
            p99_ms: Some(pick(0.99)),
            max_ms: waits.last().map(|m| *m as f64),
        })
    }
    .await;
    scratch.drop(admin).await;
    cleanup_destination(sink, &args.destination).await;
    result
}

/// RabbitMQ: the destination is a routing key of the default exchange, so a durable queue
/// of that name must exist.
async fn prepare_destination(sink: &str, destination: &str) -> anyhow::Result<()> {
    if let Some(url) = amqp_url(sink) {
        let conn = lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
            .await
            .with_context(|| format!("cannot connect to RabbitMQ at {url}"))?;
        let channel = conn.create_channel().await?;
        channel
            .queue_declare(
                lapin::types::ShortString::from(destination),
                lapin::options::QueueDeclareOptions::durable(),
                lapin::types::FieldTable::default(),
            )
            .await
            .context("cannot declare the benchmark queue")?;
        let _ = conn
            .close(200, lapin::types::ShortString::from("bench done"))
            .await;
    }
    Ok(())
}

async fn cleanup_destination(sink: &str, destination: &str) {
    if let Some(url) = amqp_url(sink)
        && let Ok(conn) =
            lapin::Connection::connect(&url, lapin::ConnectionProperties::default()).await
        && let Ok(channel) = conn.create_channel().await
    {
        let _ = channel
            .queue_delete(
                lapin::types::ShortString::from(destination),
                lapin::options::QueueDeleteOptions::default(),
            )
            .await;
        let _ = conn
            .close(200, lapin::types::ShortString::from("bench done"))
            .await;
    }
}

fn amqp_url(sink: &str) -> Option<String> {
    sink.starts_with("amqp://")
        .then(|| sink.split('?').next().unwrap_or(sink).to_string())
}
