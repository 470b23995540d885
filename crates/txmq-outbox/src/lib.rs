//! The local message table (transactional outbox): messages enqueued in the caller's
//! database transaction on PostgreSQL, MySQL/MariaDB or SQLite, and a relay that publishes
//! them to txmq, RabbitMQ, NATS JetStream, Redis Streams or Kafka.
//!
//! - [`Outbox::enqueue`] inserts a message into `txmq_outbox` on the caller's transaction:
//!   it is published if and only if the transaction commits.
//! - [`Relay`] claims due rows (`FOR UPDATE SKIP LOCKED` on PostgreSQL and MariaDB, an
//!   atomic lease on SQLite), publishes them through a [`Sink`], and marks a row delivered
//!   only after the sink confirmed it; a failure is retried with exponential backoff and
//!   jitter, and after the maximum attempts the row is dead until redriven
//!   ([`redrive`]). Several relays share the work.
//! - Rows are claimed by state, not by position, so a transaction that commits after a
//!   later one is never skipped.
//! - [`Outbox::enqueue_fast`] and [`Outbox::commit_and_publish`] publish right after the
//!   commit, with the relay as the safety net.
//!
//! Delivery is at least once: a relay that dies after publishing and before marking, or
//! a sink that confirms after the publish timeout, leads to a second publish of the same
//! message id. Every sink carries the id so that consumers (or the broker) deduplicate.
//!
//! Details, guarantees and operations: `docs/outbox.md`.

mod dialect;
mod message;
mod metrics;
mod outbox;
mod relay;
pub mod sink;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use dialect::{OutboxDb, RowSummary, TableStats};
pub use message::{OutboxMessage, OutboxRow};
pub use metrics::Metrics;
pub use outbox::{EnqueueError, FastPath, FastPathReport, Outbox};
pub use relay::{Relay, RelayConfig, RelayConfigError, cleanup};
pub use sink::{Sink, SinkError};

/// Backoff of a failing row: the n-th retry waits `initial * 2^(n-1)`, capped at `max`,
/// with jitter (a random wait between half of that and all of it); after `max_attempts`
/// failed attempts the row is dead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Wait before the first retry (default 500 ms).
    pub initial: Duration,
    /// Longest wait (default 10 min).
    pub max: Duration,
    /// Failed attempts after which a row is dead (default 16).
    pub max_attempts: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(600),
            max_attempts: 16,
        }
    }
}

impl RetryPolicy {
    /// Refuses a zero backoff wait (`initial` or `max`): a failing row would be retried back
    /// to back.
    ///
    /// # Errors
    /// [`RelayConfigError::ZeroBackoff`], naming the wait.
    pub fn check(&self) -> Result<(), RelayConfigError> {
        if self.initial.is_zero() {
            return Err(RelayConfigError::ZeroBackoff("initial"));
        }
        if self.max.is_zero() {
            return Err(RelayConfigError::ZeroBackoff("max"));
        }
        Ok(())
    }

    /// The wait after a row's failed attempt, when it had failed `attempts` times before.
    pub fn delay(&self, attempts: u32) -> Duration {
        let factor = 1u32.checked_shl(attempts.min(31)).unwrap_or(u32::MAX);
        let full = self.initial.saturating_mul(factor).min(self.max);
        let half = full / 2;
        let jitter = rand::random_range(0..=millis_u64(full - half));
        half + Duration::from_millis(jitter)
    }
}

fn millis_u64(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Creates `txmq_outbox`, its indexes and (PostgreSQL) the trigger that notifies relays of
/// inserts, if missing. Idempotent; run it at start-up or from your own migrations.
///
/// # Errors
/// The database's error.
pub async fn migrate<DB: OutboxDb>(pool: &sqlx::Pool<DB>) -> Result<(), sqlx::Error> {
    DB::migrate(pool, true).await
}

/// Like [`migrate`], choosing whether inserts notify relays (PostgreSQL; ignored
/// elsewhere): `false` drops the trigger, and relays find rows by polling only (set a
/// short `poll_interval`). PostgreSQL commits notifying transactions one at a time, so the
/// trigger caps how many enqueuing transactions commit per second (see `docs/outbox.md`).
///
/// # Errors
/// The database's error.
pub async fn migrate_with_notify<DB: OutboxDb>(
    pool: &sqlx::Pool<DB>,
    notify: bool,
) -> Result<(), sqlx::Error> {
    DB::migrate(pool, notify).await
}

/// Up to `limit` dead rows, oldest first.
///
/// # Errors
/// The database's error.
pub async fn dead<DB: OutboxDb>(
    pool: &sqlx::Pool<DB>,
    limit: i64,
) -> Result<Vec<RowSummary>, sqlx::Error> {
    DB::list(pool, dialect::DEAD, limit).await
}

/// Puts dead rows back to pending with their attempts reset: all of them (`None`) or those
/// with the given ids; the number redriven.
///
/// # Errors
/// The database's error.
pub async fn redrive<DB: OutboxDb>(
    pool: &sqlx::Pool<DB>,
    ids: Option<&[String]>,
) -> Result<u64, sqlx::Error> {
    DB::redrive(pool, ids, now_ms()).await
}

/// Deletes the dead rows with the given ids (for a message that must never be published;
/// it also releases the later ordered rows of its key); the number deleted.
///
/// # Errors
/// The database's error.
pub async fn drop_dead<DB: OutboxDb>(
    pool: &sqlx::Pool<DB>,
    ids: &[String],
) -> Result<u64, sqlx::Error> {
    DB::drop_dead(pool, ids).await
}

/// Pending, retrying and dead counts and the oldest pending row's enqueue time.
///
/// # Errors
/// The database's error.
pub async fn stats<DB: OutboxDb>(pool: &sqlx::Pool<DB>) -> Result<TableStats, sqlx::Error> {
    DB::stats(pool).await
}

/// Milliseconds since the Unix epoch of `t` (0 before it).
pub(crate) fn epoch_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Now, in milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> i64 {
    epoch_ms(SystemTime::now())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::RetryPolicy;

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        let p = RetryPolicy {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
            max_attempts: 16,
        };
        for _ in 0..100 {
            let d0 = p.delay(0);
            assert!((50..=100).contains(&d0.as_millis()), "{d0:?}");
            let d2 = p.delay(2);
            assert!((200..=400).contains(&d2.as_millis()), "{d2:?}");
            let d9 = p.delay(9);
            assert!((500..=1000).contains(&d9.as_millis()), "{d9:?}");
            assert!(p.delay(40) <= Duration::from_secs(1));
        }
    }
}
