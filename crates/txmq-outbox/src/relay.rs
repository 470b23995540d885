//! The relay: claims due rows, publishes them through a sink, marks them delivered (only
//! after the sink confirmed them) or failed with backoff, and deletes old delivered rows.

use std::collections::HashSet;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::FutureExt;
use sqlx::Pool;
use tokio::sync::{Notify, watch};

use crate::OutboxRow;
use crate::dialect::{Failure, OutboxDb};
use crate::metrics::Metrics;
use crate::outbox::millis;
use crate::sink::{Sink, SinkError};
use crate::{RetryPolicy, now_ms};

/// How a relay works. The defaults suit most setups.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Rows claimed and published per batch (default 500).
    pub batch_size: usize,
    /// Batches in flight at once in this relay (default 2).
    pub workers: usize,
    /// How often an idle worker looks for due rows (default 1 s). On PostgreSQL, inserts
    /// also wake the workers at once through LISTEN/NOTIFY; this is the fallback.
    pub poll_interval: Duration,
    /// SQLite only: how long a claimed batch stays with this relay before another may
    /// take it (default 60 s). Must be longer than `publish_timeout`.
    pub lease: Duration,
    /// Longest wait for the sink's confirmations of one batch (default 30 s); past it the
    /// batch counts as failed. At least the sink's [`Sink::longest_publish`] (Kafka).
    pub publish_timeout: Duration,
    /// Backoff and maximum attempts of a failing row; the waits must be above zero.
    pub retry: RetryPolicy,
    /// Delivered rows older than this are deleted (default 1 h); `None` keeps them.
    pub keep_delivered: Option<Duration>,
    /// Pause between cleanups (default 10 s).
    pub cleanup_interval: Duration,
    /// Rows deleted per cleanup statement (default 1000).
    pub cleanup_batch: i64,
    /// Listen for inserts on PostgreSQL (default true).
    pub listen: bool,
    /// This relay's name in leases (SQLite: `<instance>.<claim number>`) and logs (default a
    /// fresh UUIDv7). Give relays that run at once different names.
    pub instance: String,
}

/// Why [`Relay::new`] refused a [`RelayConfig`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RelayConfigError {
    /// A backoff wait (`retry.initial` or `retry.max`) is zero: a failing row would be
    /// retried back to back.
    #[error("retry.{0} must be above zero: a failing row would be retried back to back")]
    ZeroBackoff(&'static str),
    /// The publish timeout is shorter than the sink may go on publishing a row after the
    /// relay stops waiting ([`Sink::longest_publish`]): the row would be counted failed and
    /// published again while the first try may still land.
    #[error(
        "publish_timeout ({publish_timeout:?}) must be at least {longest:?}: the {sink} sink may go on publishing a row that long"
    )]
    PublishTimeoutBelowSink {
        /// The sink's name.
        sink: &'static str,
        /// How long the sink may go on publishing.
        longest: Duration,
        /// The publish timeout given.
        publish_timeout: Duration,
    },
    /// On SQLite the lease is not longer than the publish timeout: another relay could
    /// take and publish a batch while this one still waits for its confirmations.
    #[error(
        "the lease ({lease:?}) must be longer than publish_timeout ({publish_timeout:?}) on SQLite"
    )]
    LeaseNotAbovePublishTimeout {
        /// The lease given.
        lease: Duration,
        /// The publish timeout given.
        publish_timeout: Duration,
    },
}

impl RelayConfig {
    /// Checks the settings for a relay on `DB` publishing through `sink`.
    fn check<DB: OutboxDb>(&self, sink: &dyn Sink) -> Result<(), RelayConfigError> {
        if let Some(longest) = sink.longest_publish()
            && self.publish_timeout < longest
        {
            return Err(RelayConfigError::PublishTimeoutBelowSink {
                sink: sink.name(),
                longest,
                publish_timeout: self.publish_timeout,
            });
        }
        self.retry.check()?;
        if DB::LEASED_CLAIMS && self.lease <= self.publish_timeout {
            return Err(RelayConfigError::LeaseNotAbovePublishTimeout {
                lease: self.lease,
                publish_timeout: self.publish_timeout,
            });
        }
        Ok(())
    }
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            batch_size: 500,
            workers: 2,
            poll_interval: Duration::from_secs(1),
            lease: Duration::from_secs(60),
            publish_timeout: Duration::from_secs(30),
            retry: RetryPolicy::default(),
            keep_delivered: Some(Duration::from_secs(3600)),
            cleanup_interval: Duration::from_secs(10),
            cleanup_batch: 1000,
            listen: true,
            instance: uuid::Uuid::now_v7().simple().to_string(),
        }
    }
}

/// Publishes the rows of `txmq_outbox` through a [`Sink`]. Run several, in one process or
/// many: they share the rows without publishing one twice in the normal case.
///
/// # Example
/// ```no_run
/// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
/// use txmq_outbox::{Relay, RelayConfig, sink};
///
/// let pool = sqlx::PgPool::connect("postgres://postgres@127.0.0.1/shop").await?;
/// txmq_outbox::migrate(&pool).await?;
/// let sink = sink::connect("amqp://guest:guest@127.0.0.1:5672/%2f").await?;
/// let relay = Relay::new(pool, sink, RelayConfig::default())?;
/// relay.run(async { tokio::signal::ctrl_c().await.ok(); }).await;
/// # Ok(()) }
/// ```
pub struct Relay<DB: OutboxDb> {
    pool: Pool<DB>,
    sink: Arc<dyn Sink>,
    config: RelayConfig,
    metrics: Arc<Metrics>,
    /// Claims made so far: each lease (SQLite) is named apart, so that two workers of this
    /// relay never mark each other's.
    claims: AtomicU64,
}

impl<DB: OutboxDb> Relay<DB> {
    /// A relay of `pool`'s outbox to `sink`.
    ///
    /// # Errors
    /// [`RelayConfigError`]: a zero backoff, a publish timeout shorter than the sink may go
    /// on publishing, or on SQLite a lease not longer than the publish timeout.
    pub fn new(
        pool: Pool<DB>,
        sink: Box<dyn Sink>,
        config: RelayConfig,
    ) -> Result<Self, RelayConfigError> {
        config.check::<DB>(&*sink)?;
        Ok(Self {
            pool,
            sink: Arc::from(sink),
            config,
            metrics: Arc::new(Metrics::default()),
            claims: AtomicU64::new(0),
        })
    }

    /// The relay's counters, for a metrics endpoint.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Claims one batch, publishes it and marks it; the number of rows claimed.
    ///
    /// # Errors
    /// A database error of the claim or the marking. After a marking error, the rows
    /// published are published again later (at least once).
    pub async fn run_once(&self) -> Result<usize, sqlx::Error> {
        let began = Instant::now();
        let now = now_ms();
        let lease_until = now.saturating_add(millis(self.config.lease));
        let limit = i64::try_from(self.config.batch_size.max(1)).unwrap_or(i64::MAX);
        let claim = self.claims.fetch_add(1, Ordering::Relaxed);
        let worker = format!("{}.{claim}", self.config.instance);
        let claimed = DB::claim(&self.pool, &worker, now, lease_until, limit).await?;
        let rows = claimed.rows;
        if rows.is_empty() {
            if let Some(tx) = claimed.tx {
                tx.commit().await?;
            }
            return Ok(0);
        }
        let started = Instant::now();
        let claiming = started - began;
        let results = publish(
            &*self.sink,
            &rows,
            self.config.publish_timeout,
            Some(&self.metrics),
        )
        .await;
        let publishing = started.elapsed();
        self.metrics.observe_publish(publishing);
        // A lease is marked only while it is still this claim's; row locks need no check.
        let locked = claimed.tx.is_some();
        let holder = (!locked).then_some(worker.as_str());
        let marked = match mark_published(
            &self.pool,
            claimed.tx,
            holder,
            &rows,
            &results,
            &self.config.retry,
        )
        .await
        {
            Ok(m) => m,
            // The claim's transaction failed (its connection lost): the rows are unlocked
            // now. Marking anew those still pending that no other worker took meanwhile
            // spares publishing them again; the others are their new holder's to publish
            // and mark. (Should the failed call have been a COMMIT that went through, a
            // failed row counts this attempt twice.)
            Err(e) if locked => {
                self.metrics.database_error();
                tracing::warn!(error = %e, rows = rows.len(), "relay: the claim's transaction failed; marking in a new one");
                let seqs: Vec<i64> = rows.iter().map(|r| r.seq).collect();
                let (tx, held) = DB::relock(&self.pool, &seqs).await?;
                let held: HashSet<i64> = held.into_iter().collect();
                let (kept, results): (Vec<OutboxRow>, Vec<_>) = rows
                    .iter()
                    .zip(&results)
                    .filter(|(row, _)| held.contains(&row.seq))
                    .map(|(row, r)| (row.clone(), r.clone()))
                    .unzip();
                mark_published(&self.pool, tx, None, &kept, &results, &self.config.retry).await?
            }
            Err(e) => return Err(e),
        };
        tracing::debug!(
            rows = rows.len(),
            failed = marked.failed,
            claim_ms = claiming.as_secs_f64() * 1e3,
            publish_ms = publishing.as_secs_f64() * 1e3,
            mark_ms = (started.elapsed() - publishing).as_secs_f64() * 1e3,
            "batch done"
        );
        // Counted once marked: a row whose marking failed is published again.
        for w in marked.waits_ms {
            self.metrics
                .observe_delivered(Duration::from_millis(w.unsigned_abs()));
        }
        for i in 0..marked.failed {
            self.metrics.failed(i < marked.dead);
        }
        Ok(rows.len())
    }

    /// Runs until `shutdown` completes: the workers, the PostgreSQL listener and the
    /// cleanup. Batches in flight finish first; database errors are logged and retried.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) {
        let relay = Arc::new(self);
        let (stop_tx, stop) = watch::channel(false);
        let wake = Arc::new(Notify::new());
        let listener = if relay.config.listen {
            DB::listen(&relay.pool, wake.clone())
        } else {
            None
        };
        let mut tasks = Vec::new();
        for _ in 0..relay.config.workers.max(1) {
            let (r, stop, wake) = (relay.clone(), stop.clone(), wake.clone());
            tasks.push(tokio::spawn(async move { r.work(stop, wake).await }));
        }
        if relay.config.keep_delivered.is_some() {
            let (r, stop) = (relay.clone(), stop.clone());
            tasks.push(tokio::spawn(async move { r.clean(stop).await }));
        }
        tracing::info!(instance = %relay.config.instance, sink = relay.sink.name(), workers = relay.config.workers, "relay started");
        shutdown.await;
        let _ = stop_tx.send(true);
        wake.notify_waiters();
        for t in tasks {
            if let Err(e) = t.await {
                tracing::error!(error = %e, "relay task failed");
            }
        }
        if let Some(l) = listener {
            l.abort();
        }
        tracing::info!(instance = %relay.config.instance, "relay stopped");
    }

    /// One worker: a batch after another while there is work, else wait for a wake-up
    /// or the poll interval.
    async fn work(&self, mut stop: watch::Receiver<bool>, wake: Arc<Notify>) {
        let mut error_pause = Duration::from_millis(200);
        while !*stop.borrow() {
            let notified = wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // A panic in a batch (the sink's own are caught in `publish`) must not end the
            // worker: its claim is released as an error's would be, and it goes on.
            let batch = AssertUnwindSafe(self.run_once()).catch_unwind().await;
            let failed = match batch {
                // More may be due at once: the rest of a backlog, or the next ordered row of a
                // key whose row was just delivered.
                Ok(Ok(n)) if n > 0 => {
                    error_pause = Duration::from_millis(200);
                    continue;
                }
                Ok(Ok(_)) => false,
                Ok(Err(e)) => {
                    self.metrics.database_error();
                    tracing::warn!(error = %e, pause = ?error_pause, "relay: database error; retrying");
                    true
                }
                Err(panic) => {
                    self.metrics.panicked();
                    tracing::error!(panic = %panic_message(&*panic), pause = ?error_pause, "relay: a batch panicked; going on");
                    true
                }
            };
            let pause = if failed {
                let p = error_pause;
                error_pause = (error_pause * 2).min(Duration::from_secs(10));
                p
            } else {
                error_pause = Duration::from_millis(200);
                self.config.poll_interval
            };
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep(pause) => {}
                _ = stop.changed() => {}
            }
        }
    }

    /// Deletes delivered rows older than `keep_delivered`, in small batches.
    async fn clean(&self, mut stop: watch::Receiver<bool>) {
        let Some(keep) = self.config.keep_delivered else {
            return;
        };
        while !*stop.borrow() {
            match cleanup::<DB>(&self.pool, keep, self.config.cleanup_batch).await {
                Ok(0) => {}
                Ok(n) => tracing::debug!(rows = n, "relay: deleted delivered rows"),
                Err(e) => {
                    self.metrics.database_error();
                    tracing::warn!(error = %e, "relay: cleanup failed");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(self.config.cleanup_interval) => {}
                _ = stop.changed() => {}
            }
        }
    }
}

/// Publishes `rows` through `sink`, waiting at most `timeout`: one result per row. Every
/// row fails if the sink does not answer in time or answers for another number of rows. A
/// call that panics (counted in `metrics`) is made again row by row, and a row whose call
/// panics fails; a failed row is retried with backoff, as for any failure.
pub(crate) async fn publish(
    sink: &dyn Sink,
    rows: &[OutboxRow],
    timeout: Duration,
    metrics: Option<&Metrics>,
) -> Vec<Result<(), SinkError>> {
    let call = async {
        match caught(sink, rows, metrics).await {
            Ok(r) => r,
            Err(panicked) if rows.len() == 1 => vec![Err(panicked)],
            // Which row made it panic is unknown: each goes alone, so that a row that always
            // does fails alone, not every row claimed with it.
            Err(_) => {
                let mut results = Vec::with_capacity(rows.len());
                for row in rows.chunks(1) {
                    results.push(match caught(sink, row, metrics).await {
                        Ok(r) if r.len() == 1 => r.into_iter().next().unwrap_or(Ok(())),
                        Ok(r) => Err(SinkError::new(format!(
                            "the {} sink answered {} results for 1 row",
                            sink.name(),
                            r.len()
                        ))),
                        Err(alone) => Err(alone),
                    });
                }
                results
            }
        }
    };
    let failure = match tokio::time::timeout(timeout, call).await {
        Ok(r) if r.len() == rows.len() => return r,
        Ok(r) => format!(
            "the {} sink answered {} results for {} rows",
            sink.name(),
            r.len(),
            rows.len()
        ),
        Err(_) => format!(
            "no confirmation from the {} sink within {timeout:?}",
            sink.name()
        ),
    };
    vec![Err(SinkError::new(failure)); rows.len()]
}

/// `sink.publish(rows)`, or the failure of a panic in it (counted in `metrics`). The call
/// itself is inside the caught future, so that a sink panicking before it returns its
/// future is caught too.
async fn caught(
    sink: &dyn Sink,
    rows: &[OutboxRow],
    metrics: Option<&Metrics>,
) -> Result<Vec<Result<(), SinkError>>, SinkError> {
    let call = AssertUnwindSafe(async { sink.publish(rows).await }).catch_unwind();
    call.await.map_err(|panic| {
        if let Some(m) = metrics {
            m.panicked();
        }
        let why = panic_message(&*panic);
        tracing::error!(sink = sink.name(), rows = rows.len(), panic = %why, "relay: the sink panicked");
        SinkError::new(format!("the {} sink panicked: {why}", sink.name()))
    })
}

/// The text of a panic's payload.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("a panic without a message")
}

/// What [`mark_published`] recorded.
pub(crate) struct Marked {
    /// Enqueue-to-confirmation time of each delivered row, ms.
    pub waits_ms: Vec<i64>,
    /// Rows that failed this attempt.
    pub failed: usize,
    /// Of those, rows now dead (that was their last attempt).
    pub dead: usize,
}

/// Marks the rows of one publish from the sink's `results`: delivered, or failed with
/// `retry`'s backoff (dead after the last attempt). The marks commit with `claimed` (the
/// claim's transaction) or in a transaction of their own. With `holder`, rows whose lease
/// no longer names it (taken by another relay since) are left as they are.
///
/// # Errors
/// The database's error; then nothing is marked and the rows are published again later.
pub(crate) async fn mark_published<DB: OutboxDb>(
    pool: &Pool<DB>,
    claimed: Option<sqlx::Transaction<'static, DB>>,
    holder: Option<&str>,
    rows: &[OutboxRow],
    results: &[Result<(), SinkError>],
    retry: &RetryPolicy,
) -> Result<Marked, sqlx::Error> {
    let acked = now_ms();
    let mut delivered = Vec::with_capacity(rows.len());
    let mut waits_ms = Vec::with_capacity(rows.len());
    let mut errors = Vec::new();
    let mut dead = 0;
    for (row, result) in rows.iter().zip(results) {
        match result {
            Ok(()) => {
                delivered.push(row.seq);
                waits_ms.push(acked.saturating_sub(row.created_at_ms).max(0));
            }
            Err(e) => {
                let last = row.attempts.saturating_add(1) >= retry.max_attempts;
                dead += usize::from(last);
                tracing::debug!(id = %row.id, attempts = row.attempts + 1, dead = last, error = %e, "publish failed");
                errors.push((row.seq, e.to_string(), row.attempts));
            }
        }
    }
    let failed: Vec<Failure<'_>> = errors
        .iter()
        .map(|(seq, e, attempts)| Failure {
            seq: *seq,
            error: e,
            next_attempt_at: acked.saturating_add(millis(retry.delay(*attempts))),
        })
        .collect();
    DB::finish(
        pool,
        claimed,
        holder,
        &delivered,
        &failed,
        acked,
        retry.max_attempts,
    )
    .await?;
    Ok(Marked {
        waits_ms,
        failed: failed.len(),
        dead,
    })
}

/// Deletes delivered rows older than `keep`, `batch` rows per statement, until none is
/// left; the number deleted. Each statement is its own short transaction, so inserts are
/// never held up for long.
///
/// # Errors
/// The database's error; earlier batches stay deleted.
pub async fn cleanup<DB: OutboxDb>(
    pool: &Pool<DB>,
    keep: Duration,
    batch: i64,
) -> Result<u64, sqlx::Error> {
    let cutoff = now_ms().saturating_sub(millis(keep));
    let batch = batch.max(1);
    let mut total = 0;
    loop {
        let n = DB::delete_delivered(pool, cutoff, batch).await?;
        total += n;
        if n < batch.unsigned_abs() {
            return Ok(total);
        }
        tokio::task::yield_now().await;
    }
}

#[cfg(test)]
mod tests {
    use sqlx::Sqlite;
    use txmq_testkit::ScratchDb;

    use super::mark_published;
    use crate::dialect::OutboxDb;
    use crate::sink::SinkError;
    use crate::{Outbox, OutboxMessage, RetryPolicy, now_ms};

    /// Relay A's lease runs out while it publishes, relay B takes the row and publishes
    /// it; A's late failure must not count against B's claim (with one attempt allowed,
    /// it would make the row dead), and B's delivery is recorded.
    #[tokio::test]
    async fn an_expired_lease_cannot_mark_a_row_another_relay_took() {
        let scratch = Sqlite::scratch("txmq_ob_lease", 2).await.expect("SQLite");
        let pool = scratch.pool.clone();
        crate::migrate(&pool).await.unwrap();
        let mut tx = pool.begin().await.unwrap();
        Outbox::new()
            .enqueue(&mut tx, OutboxMessage::new("d", "x").with_id("m1"))
            .await
            .unwrap();
        tx.commit().await.unwrap();

        let now = now_ms();
        let a = Sqlite::claim(&pool, "a", now, now + 10, 10).await.unwrap();
        let b = Sqlite::claim(&pool, "b", now + 20, now + 60_000, 10)
            .await
            .unwrap();
        assert_eq!((a.rows.len(), b.rows.len()), (1, 1));
        let once = RetryPolicy {
            max_attempts: 1,
            ..RetryPolicy::default()
        };
        let timed_out = [Err(SinkError::new("no confirmation in time"))];
        mark_published(&pool, None, Some("a"), &a.rows, &timed_out, &once)
            .await
            .unwrap();
        mark_published(&pool, None, Some("b"), &b.rows, &[Ok(())], &once)
            .await
            .unwrap();

        let delivered = Sqlite::list(&pool, "D", 10).await.unwrap();
        assert_eq!(
            delivered.len(),
            1,
            "{:?}",
            Sqlite::list(&pool, "X", 10).await
        );
        assert_eq!((delivered[0].id.as_str(), delivered[0].attempts), ("m1", 0));
        scratch.drop().await;
    }
}
