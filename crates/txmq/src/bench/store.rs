//! `txmq bench store`: concurrent appends to the storage engine, each awaited, for a fixed
//! time; reports appends/s, MB/s and the acknowledgement latency distribution.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use tokio::task::JoinSet;
use txmq_store::{Durability, RecordData, RecordKind, SEGMENT_HEADER_LEN, Store, StoreConfig};

use super::dd::{self, DdResult};
use super::latency::{Latencies, LatencySummary, bench_body, round3};
use crate::cli::BenchStoreArgs;

/// The topic the benchmark appends to.
const TOPIC: &str = "bench";

/// In async mode, also sync once this many bytes are unsynced, so that the flush interval,
/// not this bound, sets the pace at any realistic rate.
const ASYNC_MAX_UNSYNCED_BYTES: u64 = 256 << 20;

/// What the appending tasks did, apart from latencies.
#[derive(Default)]
struct Tally {
    appends: u64,
    body_bytes: u64,
    /// Framed record bytes written to the commit log (headers and padding included).
    log_bytes: u64,
    max_latency: Duration,
}

impl Tally {
    fn merge(&mut self, other: &Tally) {
        self.appends += other.appends;
        self.body_bytes += other.body_bytes;
        self.log_bytes += other.log_bytes;
        self.max_latency = self.max_latency.max(other.max_latency);
    }
}

/// The figures printed, as a table and as JSON.
#[derive(Debug, Serialize)]
struct Report {
    size: u64,
    concurrency: u64,
    seconds: u64,
    queues: u64,
    durability: &'static str,
    async_flush_ms: Option<u64>,
    segment_size: u64,
    appends: u64,
    elapsed_secs: f64,
    appends_per_sec: f64,
    /// Body bytes acknowledged per second, in 10^6 bytes.
    mb_per_sec: f64,
    /// Framed record bytes written to the log per second, in 10^6 bytes.
    log_mb_per_sec: f64,
    mean_ms: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
    /// Records acknowledged per group commit (one write and one fdatasync).
    records_per_group_commit: f64,
    /// Mean time of one fdatasync of the log.
    fdatasync_mean_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    dd_mb_per_sec: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ratio_to_dd: Option<f64>,
}

/// Runs the benchmark and prints its report.
///
/// # Errors
/// If dd, opening the store, any append, or closing the store fails.
pub fn run(args: &BenchStoreArgs) -> anyhow::Result<()> {
    let config = store_config(args)?;
    let body = Arc::new(bench_body(args.size));
    check_record_fits(args, &body, &config)?;
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("cannot create {}", args.dir.display()))?;
    let dd = if args.dd {
        Some(dd::measure(&args.dir)?)
    } else {
        None
    };

    let segment_size = config.segment_size;
    let store = Store::open(config)
        .with_context(|| format!("cannot open the store in {}", args.dir.display()))?;
    let store = Arc::new(store);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let measured = runtime.block_on(append_for_a_while(store.clone(), args, body));
    drop(runtime);
    // Close even after a failed run, so that the store is left with a final checkpoint.
    let stats = store.stats();
    let closed = store.close();
    let (tally, latency, elapsed) = measured?;
    closed.context("closing the store failed")?;

    let mut report = report(args, segment_size, &tally, &latency, elapsed, dd);
    report.records_per_group_commit =
        round3(stats.records as f64 / stats.group_commits.max(1) as f64);
    report.fdatasync_mean_ms =
        round3(stats.sync_micros as f64 / stats.syncs.max(1) as f64 / 1000.0);
    super::print_report(args.json, &table(&report), &report)
}

/// The store configuration the flags ask for.
fn store_config(args: &BenchStoreArgs) -> anyhow::Result<StoreConfig> {
    let mut config = StoreConfig::new(&args.dir);
    if let Some(size) = args.segment_size {
        config.segment_size = size;
        // Small segments are allowed: cap the record size to what one of them holds.
        let room = size.saturating_sub(SEGMENT_HEADER_LEN as u64);
        config.max_record_size = config.max_record_size.min(room as usize);
    }
    config.durability = match args.async_flush_ms {
        None => Durability::Sync,
        Some(ms) => Durability::Async {
            interval: Duration::from_millis(ms),
            max_unsynced_bytes: ASYNC_MAX_UNSYNCED_BYTES,
        },
    };
    // Checked before the body is allocated; `check_record_fits` then counts the header.
    if args.size > config.max_record_size as u64 {
        bail!(
            "--size {} is too large: the store accepts at most {} bytes per record{}",
            args.size,
            config.max_record_size,
            segment_hint(args)
        );
    }
    Ok(config)
}

/// Fails if the largest record of the run (body, header and the longest message id) would
/// be refused by the store.
fn check_record_fits(
    args: &BenchStoreArgs,
    body: &[u8],
    config: &StoreConfig,
) -> anyhow::Result<()> {
    let framed = bench_record(args.queues, body, args.concurrency, u64::MAX).encoded_len();
    if framed > config.max_record_size {
        bail!(
            "--size {} is too large: a record of it takes {framed} bytes in the log, and the store \
             accepts at most {} bytes per record{}",
            args.size,
            config.max_record_size,
            segment_hint(args)
        );
    }
    Ok(())
}

fn segment_hint(args: &BenchStoreArgs) -> &'static str {
    if args.segment_size.is_some() {
        " (a record must fit in one --segment-size segment)"
    } else {
        ""
    }
}

/// The record task `task` appends as its `n`th: the queues are taken in turn, each task
/// starting at a different one.
fn bench_record(queues: u64, body: &[u8], task: u64, n: u64) -> RecordData {
    let queue = (task.wrapping_add(n) % queues) as u32;
    let mut r = RecordData::new(RecordKind::Normal, TOPIC, queue, body);
    r.message_id = format!("bench-{task}-{n}");
    r
}

/// Starts `concurrency` tasks that append until the time is up and returns what they did,
/// their latencies, and how long it took until the last acknowledgement.
async fn append_for_a_while(
    store: Arc<Store>,
    args: &BenchStoreArgs,
    body: Arc<Vec<u8>>,
) -> anyhow::Result<(Tally, LatencySummary, Duration)> {
    let tasks_n = usize::try_from(args.concurrency).unwrap_or(usize::MAX);
    let latencies = Arc::new(Latencies::new(tasks_n)?);
    let start = Instant::now();
    let deadline = start + Duration::from_secs(args.seconds);
    let mut tasks = JoinSet::new();
    for task in 0..args.concurrency {
        let store = store.clone();
        let body = body.clone();
        let latencies = latencies.clone();
        let queues = args.queues;
        tasks.spawn(async move {
            let mut tally = Tally::default();
            let mut n = 0u64;
            while Instant::now() < deadline {
                let record = bench_record(queues, &body, task, n);
                let log_bytes = record.encoded_len() as u64;
                let sent = Instant::now();
                store
                    .append(vec![record])
                    .await
                    .with_context(|| format!("append {n} of task {task} failed"))?;
                let latency = sent.elapsed();
                latencies.record(task, latency);
                tally.max_latency = tally.max_latency.max(latency);
                tally.appends += 1;
                tally.body_bytes += body.len() as u64;
                tally.log_bytes += log_bytes;
                n += 1;
            }
            Ok::<_, anyhow::Error>(tally)
        });
    }
    let mut total = Tally::default();
    while let Some(joined) = tasks.join_next().await {
        // The first failure ends the run; dropping the set aborts the other tasks.
        let tally = joined.context("an appending task panicked")??;
        total.merge(&tally);
    }
    let elapsed = start.elapsed();
    let summary = latencies.summary(total.max_latency)?;
    Ok((total, summary, elapsed))
}

fn report(
    args: &BenchStoreArgs,
    segment_size: u64,
    tally: &Tally,
    latency: &LatencySummary,
    elapsed: Duration,
    dd: Option<DdResult>,
) -> Report {
    let secs = elapsed.as_secs_f64().max(f64::MIN_POSITIVE);
    let log_mb_per_sec = tally.log_bytes as f64 / secs / 1e6;
    let dd_mb_per_sec = dd.map(|d| d.mb_per_sec());
    Report {
        size: args.size,
        concurrency: args.concurrency,
        seconds: args.seconds,
        queues: args.queues,
        durability: if args.async_flush_ms.is_some() {
            "async"
        } else {
            "sync"
        },
        async_flush_ms: args.async_flush_ms,
        segment_size,
        appends: tally.appends,
        elapsed_secs: round3(secs),
        appends_per_sec: round3(tally.appends as f64 / secs),
        mb_per_sec: round3(tally.body_bytes as f64 / secs / 1e6),
        log_mb_per_sec: round3(log_mb_per_sec),
        mean_ms: latency.mean_ms,
        p50_ms: latency.p50_ms,
        p99_ms: latency.p99_ms,
        p999_ms: latency.p999_ms,
        max_ms: latency.max_ms,
        records_per_group_commit: 0.0,
        fdatasync_mean_ms: 0.0,
        dd_mb_per_sec: dd_mb_per_sec.map(round3),
        ratio_to_dd: dd_mb_per_sec.map(|dd| round3(log_mb_per_sec / dd)),
    }
}

/// The report as an aligned, human-readable table.
fn table(r: &Report) -> String {
    let durability = match r.async_flush_ms {
        Some(ms) => format!("async (fdatasync every {ms} ms)"),
        None => "sync (ack after fdatasync)".to_string(),
    };
    let mut rows = vec![
        (
            "run",
            format!(
                "{} B bodies, {} tasks, {} queues, {} s",
                r.size, r.concurrency, r.queues, r.seconds
            ),
        ),
        ("durability", durability),
        ("segment size", format!("{} B", r.segment_size)),
        (
            "appends",
            format!("{} in {:.3} s", r.appends, r.elapsed_secs),
        ),
        ("appends/s", format!("{:.1}", r.appends_per_sec)),
        ("body MB/s", format!("{:.3}", r.mb_per_sec)),
        ("log MB/s", format!("{:.3}", r.log_mb_per_sec)),
        ("ack mean", format!("{:.3} ms", r.mean_ms)),
        ("ack p50", format!("{:.3} ms", r.p50_ms)),
        ("ack p99", format!("{:.3} ms", r.p99_ms)),
        ("ack p99.9", format!("{:.3} ms", r.p999_ms)),
        ("ack max", format!("{:.3} ms", r.max_ms)),
        (
            "group commit",
            format!("{:.1} records", r.records_per_group_commit),
        ),
        ("fdatasync", format!("{:.3} ms mean", r.fdatasync_mean_ms)),
    ];
    if let (Some(dd), Some(ratio)) = (r.dd_mb_per_sec, r.ratio_to_dd) {
        rows.push(("dd MB/s", format!("{dd:.3}")));
        rows.push(("log / dd", format!("{ratio:.3}")));
    }
    let mut out = String::from("txmq bench store\n");
    for (name, value) in rows {
        out.push_str(&format!("  {name:<14} {value}\n"));
    }
    out
}
