//! Where messages enter the outbox, in the caller's transaction, and the after-commit fast
//! path.

use std::time::Duration;

use sqlx::{Pool, Transaction};

use crate::dialect::{NewRow, OutboxDb};
use crate::relay;
use crate::sink::Sink;
use crate::{OutboxMessage, OutboxRow, RelayConfigError, RetryPolicy, now_ms};

/// Longest message id, destination and key, in bytes.
const MAX_ID: usize = 128;
const MAX_NAME: usize = 255;

/// The lease holder of fast-path rows.
const FAST_PATH: &str = "fast-path";

/// Why a message was not enqueued. The caller's transaction is untouched by a validation
/// error; after a database error it should be rolled back, as after any failed statement.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EnqueueError {
    /// The message is not valid; nothing was written.
    #[error("invalid outbox message: {0}")]
    Invalid(String),
    /// A message with this id is already in the outbox.
    #[error("message id {0:?} is already in the outbox")]
    DuplicateId(String),
    /// The database failed.
    #[error("database error while enqueuing: {0}")]
    Database(sqlx::Error),
}

/// Enqueues messages in the caller's database transaction.
///
/// # Example
/// ```no_run
/// # async fn f(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
/// use txmq_outbox::{Outbox, OutboxMessage};
///
/// let outbox = Outbox::new();
/// let mut tx = pool.begin().await?;
/// sqlx::query("UPDATE orders SET status = 'PAID' WHERE id = 42").execute(&mut *tx).await?;
/// outbox
///     .enqueue(&mut tx, OutboxMessage::new("orders.paid", "42").with_key("order-42"))
///     .await?;
/// tx.commit().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Outbox {
    fast_path_lease: Duration,
    retry: RetryPolicy,
}

impl Default for Outbox {
    fn default() -> Self {
        Self::new()
    }
}

/// A message enqueued for the after-commit fast path: publish it with
/// [`Outbox::commit_and_publish`].
#[derive(Debug, Clone)]
pub struct FastPath {
    row: OutboxRow,
    /// Enqueued for the relay alone (see [`Outbox::enqueue_fast`]).
    relay_only: bool,
}

impl FastPath {
    /// The message id.
    pub fn id(&self) -> &str {
        &self.row.id
    }

    /// Whether the message was left to the relay: `commit_and_publish` does not publish
    /// it (a future `not_before`, or an ordered message).
    pub fn left_to_relay(&self) -> bool {
        self.relay_only
    }
}

/// What [`Outbox::commit_and_publish`] did after the commit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FastPathReport {
    /// Published and marked delivered.
    pub published: usize,
    /// Not published (or not marked): left to the relay, after a backoff (or the lease),
    /// or from the start ([`FastPath::left_to_relay`]).
    pub left_to_relay: usize,
}

impl Outbox {
    /// An outbox with a 30 s fast-path lease and the default [`RetryPolicy`].
    pub fn new() -> Self {
        Self {
            fast_path_lease: Duration::from_secs(30),
            retry: RetryPolicy::default(),
        }
    }

    /// How long the relay leaves a fast-path row alone after its enqueue, so that it is
    /// not published twice (default 30 s). If the process dies before publishing, the
    /// relay publishes the row once the lease ends. Keep it above the commit time plus
    /// the sink's publish time: with a sink that may go on publishing for longer
    /// ([`Sink::longest_publish`], Kafka), `commit_and_publish` leaves the rows to the relay.
    pub fn with_fast_path_lease(mut self, lease: Duration) -> Self {
        self.fast_path_lease = lease;
        self
    }

    /// The retry policy a failed fast-path publish is recorded with (use the relay's).
    ///
    /// # Errors
    /// [`RelayConfigError::ZeroBackoff`]: a zero backoff wait, which [`Relay::new`]
    /// refuses too.
    ///
    /// [`Relay::new`]: crate::Relay::new
    pub fn with_retry(mut self, retry: RetryPolicy) -> Result<Self, RelayConfigError> {
        retry.check()?;
        self.retry = retry;
        Ok(self)
    }

    /// Inserts `message` into `txmq_outbox` on the caller's transaction: it is published
    /// by the relay once the transaction commits, and never if it rolls back. Returns the
    /// row's position in the outbox (`seq`).
    ///
    /// # Errors
    /// [`EnqueueError`].
    pub async fn enqueue<DB: OutboxDb>(
        &self,
        tx: &mut Transaction<'_, DB>,
        message: OutboxMessage,
    ) -> Result<i64, EnqueueError> {
        insert(tx, &message, None).await
    }

    /// Like [`enqueue`](Self::enqueue), for publishing right after the commit with
    /// [`commit_and_publish`](Self::commit_and_publish); the relay is the safety net.
    ///
    /// A message with a `not_before` in the future, or an ordered one (which must wait for
    /// the earlier messages of its key), is enqueued as by [`enqueue`](Self::enqueue) and
    /// left to the relay: `commit_and_publish` only commits it.
    ///
    /// # Errors
    /// [`EnqueueError`].
    pub async fn enqueue_fast<DB: OutboxDb>(
        &self,
        tx: &mut Transaction<'_, DB>,
        message: OutboxMessage,
    ) -> Result<FastPath, EnqueueError> {
        let now = now_ms();
        let relay_only =
            message.ordered || message.not_before.is_some_and(|t| crate::epoch_ms(t) > now);
        let lease_until = (!relay_only).then(|| now.saturating_add(millis(self.fast_path_lease)));
        let seq = insert(tx, &message, lease_until).await?;
        Ok(FastPath {
            relay_only,
            row: OutboxRow {
                seq,
                id: message.id,
                destination: message.destination,
                key: message.key,
                headers: message.headers,
                payload: message.payload,
                attempts: 0,
                created_at_ms: now_ms(),
            },
        })
    }

    /// Commits `tx`, then publishes the fast-path messages enqueued on it through `sink`
    /// and marks them delivered on `pool`. A publish that fails is recorded as a failed
    /// attempt and left to the relay; so is everything if this process dies on the way.
    /// Messages [`enqueue_fast`](Self::enqueue_fast) left to the relay (a future
    /// `not_before`, ordered) are not published here.
    ///
    /// # Errors
    /// The commit's error: then nothing was published, and whether the rows committed is
    /// unknown (if they did, the relay publishes them after the lease). Errors after the
    /// commit are not returned: they are logged and counted in the report.
    pub async fn commit_and_publish<DB: OutboxDb>(
        &self,
        tx: Transaction<'_, DB>,
        pool: &Pool<DB>,
        sink: &dyn Sink,
        messages: Vec<FastPath>,
    ) -> Result<FastPathReport, sqlx::Error> {
        tx.commit().await?;
        let total = messages.len();
        // A sink that may go on publishing past the lease (Kafka with a long
        // `message.timeout.ms`) could publish a row the relay publishes again after the
        // lease: such rows are the relay's alone.
        let beyond_lease = sink
            .longest_publish()
            .is_some_and(|longest| longest > self.fast_path_lease);
        if beyond_lease {
            tracing::warn!(sink = sink.name(), lease = ?self.fast_path_lease, "the sink may publish for longer than the fast-path lease; leaving the rows to the relay");
        }
        let rows: Vec<OutboxRow> = messages
            .into_iter()
            .filter(|m| !m.relay_only && !beyond_lease)
            .map(|m| m.row)
            .collect();
        if rows.is_empty() {
            return Ok(FastPathReport {
                published: 0,
                left_to_relay: total,
            });
        }
        // Past the lease the relay may publish them too: wait no longer than that.
        let results = relay::publish(sink, &rows, self.fast_path_lease, None).await;
        let marked =
            relay::mark_published(pool, None, Some(FAST_PATH), &rows, &results, &self.retry).await;
        let published = match marked {
            Ok(m) => rows.len() - m.failed,
            Err(e) => {
                tracing::warn!(error = %e, "cannot mark fast-path rows; the relay publishes them again after the lease");
                0
            }
        };
        Ok(FastPathReport {
            published,
            left_to_relay: total - published,
        })
    }
}

/// Validates and inserts one message.
async fn insert<DB: OutboxDb>(
    tx: &mut Transaction<'_, DB>,
    m: &OutboxMessage,
    lease_until: Option<i64>,
) -> Result<i64, EnqueueError> {
    validate(m)?;
    let headers = serde_json::to_string(&m.headers)
        .map_err(|e| EnqueueError::Invalid(format!("headers cannot be encoded: {e}")))?;
    let now = now_ms();
    let not_before = m.not_before.map_or(now, crate::epoch_ms);
    let row = NewRow {
        id: &m.id,
        destination: &m.destination,
        key: m.key.as_deref(),
        ordered: m.ordered,
        headers,
        payload: &m.payload,
        next_attempt_at: not_before,
        created_at: now,
        claimed_by: lease_until.map(|_| FAST_PATH),
        claimed_until: lease_until.unwrap_or(0),
    };
    DB::insert(&mut **tx, &row).await.map_err(|e| match e {
        sqlx::Error::Database(d) if d.is_unique_violation() => {
            EnqueueError::DuplicateId(m.id.clone())
        }
        e => EnqueueError::Database(e),
    })
}

fn validate(m: &OutboxMessage) -> Result<(), EnqueueError> {
    let bad = |what: String| Err(EnqueueError::Invalid(what));
    if m.id.is_empty() || m.id.len() > MAX_ID {
        return bad(format!("message id must be 1 to {MAX_ID} bytes"));
    }
    if m.destination.is_empty() || m.destination.len() > MAX_NAME {
        return bad(format!("destination must be 1 to {MAX_NAME} bytes"));
    }
    if let Some(k) = &m.key
        && (k.is_empty() || k.len() > MAX_NAME)
    {
        return bad(format!("key must be 1 to {MAX_NAME} bytes"));
    }
    if m.ordered && m.key.is_none() {
        return bad("an ordered message needs a key".into());
    }
    Ok(())
}

/// `d` in whole milliseconds, saturating.
pub(crate) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{EnqueueError, Outbox, validate};
    use crate::{OutboxMessage, RelayConfigError, RetryPolicy};

    /// The fast path's retry policy is held to the relay's rule: no zero backoff wait.
    #[test]
    fn a_fast_path_retry_policy_with_a_zero_backoff_is_refused() {
        let zero_initial = RetryPolicy {
            initial: Duration::ZERO,
            ..RetryPolicy::default()
        };
        let zero_max = RetryPolicy {
            max: Duration::ZERO,
            ..RetryPolicy::default()
        };
        let e = Outbox::new().with_retry(zero_initial).err();
        assert_eq!(e, Some(RelayConfigError::ZeroBackoff("initial")));
        assert!(e.unwrap().to_string().contains("retry.initial"));
        let e = Outbox::new().with_retry(zero_max).err();
        assert_eq!(e, Some(RelayConfigError::ZeroBackoff("max")));
        let kept = RetryPolicy {
            initial: Duration::from_millis(1),
            ..RetryPolicy::default()
        };
        assert_eq!(Outbox::new().with_retry(kept).unwrap().retry, kept);
    }

    #[test]
    fn bad_messages_are_refused_with_the_reason() {
        let cases = [
            (OutboxMessage::new("", "x"), "destination"),
            (OutboxMessage::new("d", "x").with_id(""), "message id"),
            (
                OutboxMessage::new("d", "x").with_id("i".repeat(129)),
                "message id",
            ),
            (OutboxMessage::new("d", "x").ordered(), "needs a key"),
            (OutboxMessage::new("d", "x").with_key(""), "key"),
        ];
        for (m, reason) in cases {
            match validate(&m) {
                Err(EnqueueError::Invalid(why)) => assert!(why.contains(reason), "{why}"),
                other => panic!("{m:?}: {other:?}"),
            }
        }
        validate(&OutboxMessage::new("d", "x").with_key("k").ordered()).unwrap();
    }
}
