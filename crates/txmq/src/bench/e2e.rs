//! `txmq bench e2e`: end-to-end latency through txmq over the RocketMQ 5 gRPC protocol. A
//! producer sends at a fixed rate while simple consumers long-poll, receive and acknowledge;
//! each message carries its send time, and the consumer, in the same process and on the
//! same monotonic clock, records how long it took to arrive.
//!
//! Every message is accounted for: sends the server acknowledged must all be received before
//! the drain time ends, each once; messages of other runs found in the group are
//! acknowledged and counted apart.
//!
//! Both sides use the product's own client, [`txmq_client`]: `--connections` [`Producer`]s
//! and as many [`SimpleConsumer`]s (one connection each), sending task `i` using producer
//! `i % connections` and consuming task `i` consumer `i % connections`. The producers retry
//! a send that failed transiently (connection lost, timeout, throttling, server error) as
//! the server's retry policy says (3 attempts by default, with the same message id): a send
//! counts as an error only when the client gives up, and its latency includes the retries.
//! A message's arrival time is when the receive call that brought it returned (the server
//! writes a batch's messages out at once, and the client reads the stream to its end).
//!
//! With `--delay-ms` or `--backlog` the messages are delay messages, each due `--delay-ms`
//! after its send, and its latency runs from the time it is due; `--backlog` first sends
//! that many delay messages due in an hour, which wait in the topic through the run, so
//! the figures show what a large set of waiting messages costs the ones due now.

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinSet;
use txmq_client::{
    ClientConfig, Message, MessageView, Producer, ReceiveError, SimpleConsumer, Subscription,
};

use super::latency::{Latencies, LatencySummary, bench_body, round3};
use super::produce::{cannot_connect, server_uri};
use crate::cli::BenchE2eArgs;

/// User property naming the run a message belongs to.
const RUN_PROPERTY: &str = "bench-run";
/// Marks the one message sent before the clock starts (see [`warm_up`]).
const WARM_UP_PROPERTY: &str = "bench-warm-up";
/// User property with the message's number in its run.
const SEQ_PROPERTY: &str = "bench-seq";
/// User property with the send time, in nanoseconds since the run's clock base.
const SENT_NS_PROPERTY: &str = "bench-sent-ns";

/// Messages asked for per ReceiveMessage.
const BATCH_SIZE: u32 = 32;
/// How long a received message stays invisible to other consumers before it must be acked.
const INVISIBLE_DURATION: Duration = Duration::from_secs(30);
/// How long the server may hold a ReceiveMessage open waiting for messages.
const LONG_POLLING_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause after a failed call, so that a dead broker does not turn the run into a busy loop.
const ERROR_BACKOFF: Duration = Duration::from_millis(100);
/// How often the drain checks whether everything arrived.
const DRAIN_POLL: Duration = Duration::from_millis(10);
/// When the backlog's messages are due, after their send.
const BACKLOG_DUE_IN: Duration = Duration::from_secs(3600);
/// Sends of the backlog in flight at once.
const BACKLOG_TASKS: u64 = 64;

/// Per-message state bits: the send was acknowledged / the message was received.
const ACKED: u8 = 1;
const RECEIVED: u8 = 2;

/// What happened to each message of the run, by number, and the counts derived from it.
struct Ledger {
    messages: Vec<AtomicU8>,
    /// Sends the server acknowledged.
    acked: AtomicU64,
    /// Messages both acknowledged to the producer and received, each counted once.
    matched: AtomicU64,
    duplicates: AtomicU64,
}

impl Ledger {
    fn new(len: u64) -> Self {
        Self {
            messages: (0..len).map(|_| AtomicU8::new(0)).collect(),
            acked: AtomicU64::new(0),
            matched: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
        }
    }

    /// Marks `seq` with `bit` and returns the bits it had before (None if out of range).
    fn mark(&self, seq: u64, bit: u8) -> Option<u8> {
        let slot = self.messages.get(usize::try_from(seq).ok()?)?;
        let before = slot.fetch_or(bit, Ordering::AcqRel);
        if before & bit == 0 && before & (ACKED | RECEIVED) & !bit != 0 {
            self.matched.fetch_add(1, Ordering::AcqRel);
        }
        if bit == ACKED && before & ACKED == 0 {
            self.acked.fetch_add(1, Ordering::AcqRel);
        }
        if bit == RECEIVED && before & RECEIVED != 0 {
            self.duplicates.fetch_add(1, Ordering::Relaxed);
        }
        Some(before)
    }

    /// Acknowledged messages never received.
    fn lost(&self) -> u64 {
        self.messages
            .iter()
            .filter(|m| m.load(Ordering::Acquire) == ACKED)
            .count() as u64
    }
}

/// Counts and the first error of one side (producer or consumers).
#[derive(Default)]
struct Errors {
    count: AtomicU64,
    first: Mutex<Option<String>>,
}

impl Errors {
    fn note(&self, what: String) {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.first
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(what);
    }

    fn first(&self) -> Option<String> {
        self.first.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The figures printed, as a table and as JSON.
#[derive(Debug, Serialize)]
struct Report {
    server: String,
    topic: String,
    group: String,
    run_id: String,
    size: u64,
    seconds: u64,
    senders: u64,
    consumers: u64,
    target_rate: u64,
    /// Messages due this long after their send (0 without delay messages).
    delay_ms: u64,
    /// Delay messages due in an hour, sent before the run and waiting through it.
    backlog: u64,
    /// How long the backlog took to send.
    backlog_secs: f64,
    /// Sends the server acknowledged.
    sent: u64,
    /// Acknowledged sends per second over the sending time.
    achieved_rate: f64,
    /// How far the latest send started behind its schedule.
    max_send_lag_ms: f64,
    /// Messages of this run received (each counted once).
    received: u64,
    /// Acknowledged sends not received before the drain time ended.
    lost: u64,
    duplicates: u64,
    /// Messages of other runs (or without the benchmark's properties) received and acked.
    stale: u64,
    /// Send time (or, for delay messages, the time due) to receive time.
    e2e: LatencySummary,
    /// Send to the server's acknowledgement.
    send: LatencySummary,
    send_errors: u64,
    receive_errors: u64,
    ack_errors: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    first_error: Option<String>,
    /// From the end of sending until every message arrived (or the drain time ended).
    drain_secs: f64,
}

/// Runs the benchmark and prints its report.
///
/// # Errors
/// If the server cannot be reached, or after printing the report, if any call failed or an
/// acknowledged message was not received.
pub fn run(args: &BenchE2eArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let report = runtime.block_on(measure(args))?;
    drop(runtime);

    super::print_report(args.json, &table(&report), &report)?;

    let errors = report.send_errors + report.receive_errors + report.ack_errors;
    if report.lost > 0 {
        bail!(
            "{} of {} acknowledged messages were not received within {} s of the end of sending",
            report.lost,
            report.sent,
            args.drain_seconds
        );
    }
    if errors > 0 {
        bail!(
            "{errors} calls failed (first: {})",
            report.first_error.as_deref().unwrap_or("?")
        );
    }
    Ok(())
}

/// Everything the consumer tasks share.
struct Consuming {
    /// One consumer per connection; task `i` uses consumer `i % consumers.len()`.
    consumers: Vec<SimpleConsumer>,
    run_id: String,
    base: Instant,
    /// How long after its send a message is due.
    delay: Duration,
    ledger: Arc<Ledger>,
    latencies: Latencies,
    max_latency: Mutex<Duration>,
    stale: AtomicU64,
    receive_errors: Errors,
    ack_errors: Errors,
}

/// Everything the sending tasks share.
struct Sending {
    /// One producer per connection; task `i` uses producer `i % producers.len()`.
    producers: Vec<Producer>,
    topic: String,
    run_id: String,
    base: Instant,
    /// Due this long after the send, as delay messages; `None`: normal messages.
    delay: Option<Duration>,
    rate: u64,
    body: Vec<u8>,
    next: AtomicU64,
    total: u64,
    ledger: Arc<Ledger>,
    latencies: Latencies,
    max_latency: Mutex<Duration>,
    max_lag: Mutex<Duration>,
    errors: Errors,
}

async fn measure(args: &BenchE2eArgs) -> anyhow::Result<Report> {
    let connections = |tasks: u64| (args.connections.min(tasks) as usize).max(1);
    let config = ClientConfig::new(&args.server).with_long_polling_timeout(LONG_POLLING_TIMEOUT);
    // The consumers announce their subscription before anything is sent.
    let mut consumers = Vec::new();
    for _ in 0..connections(args.consumers) {
        let consumer = SimpleConsumer::connect(
            config.clone(),
            &args.group,
            [Subscription::all(&args.topic)],
        )
        .await
        .with_context(|| cannot_connect(&args.server))?;
        consumers.push(consumer);
    }
    let mut producers = Vec::new();
    for _ in 0..connections(args.senders) {
        let producer = Producer::connect(config.clone(), [args.topic.as_str()])
            .await
            .with_context(|| cannot_connect(&args.server))?;
        producers.push(producer);
    }
    let server = server_uri(&args.server);
    // One message per producer before the clock starts, so that the topic exists (the first
    // send creates it) when the consumers begin to poll, and every producer has the topic's
    // route; consumers acknowledge them and count them nowhere.
    let delay =
        (args.delay_ms > 0 || args.backlog > 0).then(|| Duration::from_millis(args.delay_ms));
    warm_up(&producers, &args.topic, delay.is_some()).await?;
    let backlog_started = Instant::now();
    send_backlog(&producers, &args.topic, args.backlog, args.size).await?;
    let backlog_secs = round3(backlog_started.elapsed().as_secs_f64());
    let run_id = uuid::Uuid::now_v7().simple().to_string();
    let total = args.rate.saturating_mul(args.seconds);
    let ledger = Arc::new(Ledger::new(total));
    let base = Instant::now();

    let consuming = Arc::new(Consuming {
        consumers,
        run_id: run_id.clone(),
        base,
        delay: delay.unwrap_or_default(),
        ledger: ledger.clone(),
        latencies: Latencies::new(args.consumers as usize)?,
        max_latency: Mutex::new(Duration::ZERO),
        stale: AtomicU64::new(0),
        receive_errors: Errors::default(),
        ack_errors: Errors::default(),
    });
    let (stop, stopped) = watch::channel(false);
    let mut consuming_tasks = JoinSet::new();
    for task in 0..args.consumers {
        consuming_tasks.spawn(consume(consuming.clone(), task, stopped.clone()));
    }

    let sending = Arc::new(Sending {
        producers,
        topic: args.topic.clone(),
        run_id: run_id.clone(),
        base,
        delay,
        rate: args.rate,
        body: bench_body(args.size),
        next: AtomicU64::new(0),
        total,
        ledger: ledger.clone(),
        latencies: Latencies::new(args.senders as usize)?,
        max_latency: Mutex::new(Duration::ZERO),
        max_lag: Mutex::new(Duration::ZERO),
        errors: Errors::default(),
    });
    let mut senders = JoinSet::new();
    for task in 0..args.senders {
        senders.spawn(send(sending.clone(), task));
    }
    while let Some(joined) = senders.join_next().await {
        joined.context("a sending task panicked")?;
    }
    let sending_time = base.elapsed();

    // Drain: wait until every acknowledged send arrived, or the drain time ends.
    let sent = ledger.acked.load(Ordering::Acquire);
    let drain_start = Instant::now();
    let drain_deadline = drain_start + Duration::from_secs(args.drain_seconds);
    while ledger.matched.load(Ordering::Acquire) < sent && Instant::now() < drain_deadline {
        tokio::time::sleep(DRAIN_POLL).await;
    }
    let drain = drain_start.elapsed();
    let _ = stop.send(true);
    while let Some(joined) = consuming_tasks.join_next().await {
        joined.context("a consuming task panicked")?;
    }
    // Every task has finished: the clients are no longer used.
    let shutdowns = sending
        .producers
        .iter()
        .map(|p| p.clone().shutdown())
        .collect::<Vec<_>>();
    futures::future::join_all(shutdowns).await;
    let shutdowns = consuming
        .consumers
        .iter()
        .map(|c| c.clone().shutdown())
        .collect::<Vec<_>>();
    futures::future::join_all(shutdowns).await;

    let c = &consuming;
    let s = &sending;
    let secs = sending_time.as_secs_f64().max(f64::MIN_POSITIVE);
    let summary = |l: &Latencies, max: &Mutex<Duration>, n: u64| {
        if n == 0 {
            return Ok(LatencySummary::default());
        }
        l.summary(*max.lock().unwrap_or_else(|e| e.into_inner()))
    };
    let received = ledger
        .messages
        .iter()
        .filter(|m| m.load(Ordering::Acquire) & RECEIVED != 0)
        .count() as u64;
    Ok(Report {
        server,
        topic: args.topic.clone(),
        group: args.group.clone(),
        run_id,
        size: args.size,
        seconds: args.seconds,
        senders: args.senders,
        consumers: args.consumers,
        target_rate: args.rate,
        delay_ms: args.delay_ms,
        backlog: args.backlog,
        backlog_secs,
        sent,
        achieved_rate: round3(sent as f64 / secs),
        max_send_lag_ms: round3(
            s.max_lag
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_secs_f64()
                * 1000.0,
        ),
        received,
        lost: ledger.lost(),
        duplicates: ledger.duplicates.load(Ordering::Relaxed),
        stale: c.stale.load(Ordering::Relaxed),
        e2e: summary(&c.latencies, &c.max_latency, received)?,
        send: summary(&s.latencies, &s.max_latency, sent)?,
        send_errors: s.errors.count.load(Ordering::Relaxed),
        receive_errors: c.receive_errors.count.load(Ordering::Relaxed),
        ack_errors: c.ack_errors.count.load(Ordering::Relaxed),
        first_error: s
            .errors
            .first()
            .or_else(|| c.receive_errors.first())
            .or_else(|| c.ack_errors.first()),
        drain_secs: round3(drain.as_secs_f64()),
    })
}

/// Sends one message that belongs to no run through each producer (a delay message due
/// now if `delayed`).
async fn warm_up(producers: &[Producer], topic: &str, delayed: bool) -> anyhow::Result<()> {
    let sends = producers.iter().map(|p| {
        let m = Message::new(topic, b"warm-up".to_vec()).with_property(WARM_UP_PROPERTY, "1");
        p.send(if delayed {
            m.with_delivery_time(SystemTime::now())
        } else {
            m
        })
    });
    for sent in futures::future::join_all(sends).await {
        sent.context("warm-up send failed")?;
    }
    Ok(())
}

/// Sends `count` delay messages due in an hour, [`BACKLOG_TASKS`] at a time over the
/// producers. They belong to no run: received, they would count as stale.
async fn send_backlog(
    producers: &[Producer],
    topic: &str,
    count: u64,
    size: u64,
) -> anyhow::Result<()> {
    let next = AtomicU64::new(0);
    let body = bench_body(size);
    let tasks = (0..BACKLOG_TASKS.min(count)).map(|task| {
        let producer = &producers[usize::try_from(task).unwrap_or(0) % producers.len()];
        let (next, body) = (&next, &body);
        async move {
            while next.fetch_add(1, Ordering::Relaxed) < count {
                let m = Message::new(topic, body.clone())
                    .with_delivery_time(SystemTime::now() + BACKLOG_DUE_IN);
                producer.send(m).await.context("backlog send failed")?;
            }
            anyhow::Ok(())
        }
    });
    for sent in futures::future::join_all(tasks).await {
        sent?;
    }
    Ok(())
}

/// One sending task: takes the next message number, waits for its slot in the schedule
/// (`rate` per second from the clock base), sends it and waits for the acknowledgement;
/// stops at the first slot past the end of the run.
async fn send(s: Arc<Sending>, task: u64) {
    let producer = &s.producers[usize::try_from(task).unwrap_or(usize::MAX) % s.producers.len()];
    loop {
        let seq = s.next.fetch_add(1, Ordering::Relaxed);
        if seq >= s.total {
            return;
        }
        let due_ns = u128::from(seq) * 1_000_000_000 / u128::from(s.rate);
        let due = s.base + Duration::from_nanos(u64::try_from(due_ns).unwrap_or(u64::MAX));
        tokio::time::sleep_until(due.into()).await;
        let now = Instant::now();
        let lag = now.saturating_duration_since(due);
        {
            let mut max = s.max_lag.lock().unwrap_or_else(|e| e.into_inner());
            *max = (*max).max(lag);
        }
        let sent_ns = now.duration_since(s.base).as_nanos();
        let mut message = Message::new(s.topic.as_str(), s.body.clone())
            .with_property(RUN_PROPERTY, s.run_id.as_str())
            .with_property(SEQ_PROPERTY, seq.to_string())
            .with_property(SENT_NS_PROPERTY, sent_ns.to_string());
        if let Some(delay) = s.delay {
            message = message.with_delivery_time(SystemTime::now() + delay);
        }
        match producer.send(message).await {
            Ok(_) => {
                let latency = now.elapsed();
                s.latencies.record(task, latency);
                let mut max = s.max_latency.lock().unwrap_or_else(|e| e.into_inner());
                *max = (*max).max(latency);
                drop(max);
                s.ledger.mark(seq, ACKED);
            }
            Err(e) => {
                s.errors.note(e.to_string());
                tokio::time::sleep(ERROR_BACKOFF).await;
            }
        }
    }
}

/// One consuming task: long-polls ReceiveMessage for up to [`BATCH_SIZE`] messages, records
/// each message's latency, acks the batch (one AckMessage for all of it), until
/// told to stop (a receive in progress is then abandoned).
async fn consume(c: Arc<Consuming>, task: u64, mut stop: watch::Receiver<bool>) {
    let consumer = &c.consumers[usize::try_from(task).unwrap_or(usize::MAX) % c.consumers.len()];
    while !*stop.borrow() {
        // Until a send is acknowledged the topic may not exist yet (the first send can create
        // it), so TOPIC_NOT_FOUND is then no error.
        let before_first_send = c.ledger.acked.load(Ordering::Acquire) == 0;
        let received = tokio::select! {
            r = consumer.receive(BATCH_SIZE, INVISIBLE_DURATION) => r,
            _ = stop.wait_for(|s| *s) => return,
        };
        let at = Instant::now();
        let batch = match received {
            Ok(batch) => batch,
            Err(e) => {
                let topic_not_yet_created =
                    before_first_send && matches!(e, ReceiveError::TopicNotFound { .. });
                if !topic_not_yet_created {
                    c.receive_errors.note(e.to_string());
                }
                tokio::select! {
                    () = tokio::time::sleep(ERROR_BACKOFF) => continue,
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
        };
        if batch.is_empty() {
            continue;
        }
        for message in &batch {
            record(&c, task, message, at);
        }
        for acked in consumer.ack_all(&batch).await {
            if let Err(e) = acked {
                c.ack_errors.note(e.to_string());
            }
        }
    }
}

/// Records the arrival, at `at`, of one message: its latency if it is this run's and new.
fn record(c: &Consuming, task: u64, m: &MessageView, at: Instant) {
    let props = m.properties();
    if props.contains_key(WARM_UP_PROPERTY) {
        return;
    }
    let ours = props.get(RUN_PROPERTY).is_some_and(|r| *r == c.run_id);
    let seq = props.get(SEQ_PROPERTY).and_then(|s| s.parse::<u64>().ok());
    let sent_ns = props
        .get(SENT_NS_PROPERTY)
        .and_then(|s| s.parse::<u64>().ok());
    let (true, Some(seq), Some(sent_ns)) = (ours, seq, sent_ns) else {
        c.stale.fetch_add(1, Ordering::Relaxed);
        return;
    };
    match c.ledger.mark(seq, RECEIVED) {
        Some(before) if before & RECEIVED == 0 => {
            let due = c.base + Duration::from_nanos(sent_ns) + c.delay;
            let latency = at.saturating_duration_since(due);
            c.latencies.record(task, latency);
            let mut max = c.max_latency.lock().unwrap_or_else(|e| e.into_inner());
            *max = (*max).max(latency);
        }
        Some(_) => {} // A duplicate, counted by the ledger.
        None => {
            c.stale.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The report as an aligned, human-readable table.
fn table(r: &Report) -> String {
    let latency = |l: &LatencySummary| {
        format!(
            "p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms, max {:.3} ms",
            l.p50_ms, l.p99_ms, l.p999_ms, l.max_ms
        )
    };
    let delayed = r.delay_ms > 0 || r.backlog > 0;
    let mut rows = vec![
        (
            "run",
            format!(
                "{} B bodies at {} msgs/s for {} s, {} senders, {} consumers",
                r.size, r.target_rate, r.seconds, r.senders, r.consumers
            ),
        ),
        (
            "server",
            format!("{}, topic {}, group {}", r.server, r.topic, r.group),
        ),
    ];
    if delayed {
        rows.push((
            "delay",
            format!(
                "each due {} ms after its send, latency from then; {} waiting, due in an hour (sent in {:.3} s)",
                r.delay_ms, r.backlog, r.backlog_secs
            ),
        ));
    }
    rows.extend([
        (
            "sent",
            format!(
                "{} acknowledged, {:.1} msgs/s (send lag max {:.3} ms)",
                r.sent, r.achieved_rate, r.max_send_lag_ms
            ),
        ),
        (
            "received",
            format!(
                "{} of {} sent, {} lost, {} duplicates, drained in {:.3} s",
                r.received, r.sent, r.lost, r.duplicates, r.drain_secs
            ),
        ),
        (
            if delayed {
                "due to receive"
            } else {
                "send to receive"
            },
            latency(&r.e2e),
        ),
        ("send to ack", latency(&r.send)),
        (
            "errors",
            format!(
                "{} send, {} receive, {} ack",
                r.send_errors, r.receive_errors, r.ack_errors
            ),
        ),
    ]);
    if r.stale > 0 {
        rows.push((
            "stale",
            format!(
                "{} messages of earlier runs were in the group and were acked (they can delay this run's)",
                r.stale
            ),
        ));
    }
    if r.achieved_rate < r.target_rate as f64 * 0.99 {
        rows.push((
            "note",
            "the target rate was not kept: try more --senders".to_string(),
        ));
    }
    if let Some(e) = &r.first_error {
        rows.push(("first error", e.clone()));
    }
    let mut out = String::from("txmq bench e2e\n");
    for (name, value) in rows {
        out.push_str(&format!("  {name:<16} {value}\n"));
    }
    out
}
