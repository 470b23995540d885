//! Where a check-back is answered from the transaction log.

use std::time::{Duration, SystemTime};

use crate::message::MessageView;
use crate::transaction::{TransactionChecker, TransactionResolution};

use super::{Dialect, LOG_PROPERTY, epoch_ms};

/// Log state written by the sender in its database transaction.
pub(crate) const COMMITTED: &str = "C";
/// Log state written by a check-back that answered ROLLBACK.
pub(crate) const FENCED: &str = "R";

/// Answers check-backs from `txmq_tx_log`: COMMIT if the sender's row exists, ROLLBACK
/// once the transaction is older than `max_local_transaction` and fenced off, UNKNOWN
/// otherwise. Only transactions [`send_in_transaction`](super::send_in_transaction) marked
/// with this database's log, born after the latest [`cleanup_log`](super::cleanup_log)
/// cut-off, are fenced. The rule and why it is safe are in the [module docs](super).
///
/// Database errors answer UNKNOWN (the server asks again).
///
/// # Example
/// ```no_run
/// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use txmq_client::{ClientConfig, TransactionalProducer, db::DbChecker};
///
/// let pool = sqlx::SqlitePool::connect("sqlite://orders.db?mode=rwc").await?;
/// txmq_client::db::migrate(&pool).await?;
/// let checker = DbChecker::new(pool.clone()).with_max_local_transaction(Duration::from_secs(30));
/// let producer =
///     TransactionalProducer::connect(ClientConfig::new("127.0.0.1:8081"), ["orders"], checker).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct DbChecker<DB: Dialect> {
    pool: sqlx::Pool<DB>,
    max_local_transaction: Duration,
    lock_wait: Duration,
}

impl<DB: Dialect> DbChecker<DB> {
    /// A checker on `pool`, with `max_local_transaction` 60 s and `lock_wait` 1 s.
    pub fn new(pool: sqlx::Pool<DB>) -> Self {
        Self {
            pool,
            max_local_transaction: Duration::from_secs(60),
            lock_wait: Duration::from_secs(1),
        }
    }

    /// How old a half message without a log row must be before the checker fences it and
    /// answers ROLLBACK. Set it above the longest business transaction.
    pub fn with_max_local_transaction(mut self, d: Duration) -> Self {
        self.max_local_transaction = d;
        self
    }

    /// How long the fencing insert waits for a row lock held by a sender still in its
    /// transaction before answering UNKNOWN (PostgreSQL exactly; MySQL rounded up to whole
    /// seconds; SQLite uses the connection's busy timeout).
    pub fn with_lock_wait(mut self, d: Duration) -> Self {
        self.lock_wait = d;
        self
    }

    async fn decide(
        &self,
        transaction_id: &str,
        message: &MessageView,
    ) -> Result<TransactionResolution, sqlx::Error> {
        if let Some(state) = DB::log_state(&self.pool, transaction_id).await? {
            return Ok(resolution(&state));
        }
        let born = message.born_timestamp().or(message.store_timestamp());
        let age = born.and_then(|b| SystemTime::now().duration_since(b).ok());
        if age.is_none_or(|a| a < self.max_local_transaction) {
            return Ok(TransactionResolution::Unknown);
        }
        // A row missing for another reason than a sender that never got to insert it must
        // not be fenced: its transaction may well have committed.
        let Some(mark) = message.properties().get(LOG_PROPERTY) else {
            tracing::warn!(
                transaction_id,
                topic = message.topic(),
                "check-back: no log row and no log mark (not sent with send_in_transaction), answering UNKNOWN"
            );
            return Ok(TransactionResolution::Unknown);
        };
        // Read after the row was found missing: cleanup records its cut-off before deleting.
        let (log_id, cleaned_before) = DB::log_meta(&self.pool).await?;
        if *mark != log_id {
            tracing::debug!(transaction_id, log = %mark,
                "check-back: recorded in another database's log, answering UNKNOWN");
            return Ok(TransactionResolution::Unknown);
        }
        // The earliest clock: a sender's clock running ahead alone does not move it past
        // the cut-off.
        let earliest = [message.born_timestamp(), message.store_timestamp()]
            .into_iter()
            .flatten()
            .min();
        if earliest.is_none_or(|t| epoch_ms(t) < cleaned_before) {
            tracing::warn!(
                transaction_id,
                "check-back: no log row for a message born before the log's cleanup cut-off, answering UNKNOWN"
            );
            return Ok(TransactionResolution::Unknown);
        }
        let mut tx = self.pool.begin().await?;
        let fenced = DB::fence_log(
            &mut tx,
            transaction_id,
            message.message_id(),
            message.topic(),
            self.lock_wait,
        )
        .await?;
        if fenced {
            // Only a committed fence makes ROLLBACK true; a failed commit answers UNKNOWN.
            tx.commit().await?;
            return Ok(TransactionResolution::Rollback);
        }
        tx.rollback().await?;
        Ok(DB::log_state(&self.pool, transaction_id)
            .await?
            .map_or(TransactionResolution::Unknown, |s| resolution(&s)))
    }
}

fn resolution(state: &str) -> TransactionResolution {
    match state {
        COMMITTED => TransactionResolution::Commit,
        FENCED => TransactionResolution::Rollback,
        _ => TransactionResolution::Unknown,
    }
}

impl<DB: Dialect> TransactionChecker for DbChecker<DB> {
    async fn check(&self, transaction_id: &str, message: &MessageView) -> TransactionResolution {
        match self.decide(transaction_id, message).await {
            Ok(r) => {
                tracing::debug!(transaction_id, resolution = ?r, "check-back answered from the log");
                r
            }
            Err(e) => {
                tracing::warn!(transaction_id, error = %e, "check-back: database error, answering UNKNOWN");
                TransactionResolution::Unknown
            }
        }
    }
}
