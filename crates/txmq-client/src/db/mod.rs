//! Transactional messages whose local transaction is a database transaction, and consumers
//! that process each message once, on PostgreSQL, MySQL/MariaDB and SQLite (sqlx).
//!
//! Two tables, created by [`migrate`]:
//!
//! - `txmq_tx_log(transaction_id PRIMARY KEY, message_id, topic, state, created_at)`: one row
//!   per transactional send, written in the same database transaction as the business rows
//!   ([`send_in_transaction`]); `state` is `C` (committed by the sender) or `R` (fenced off
//!   by a check-back that answered ROLLBACK, see below). Old rows go with [`cleanup_log`].
//! - `txmq_inbox(consumer_group, message_id, processed_at, PRIMARY KEY(consumer_group,
//!   message_id))`: one row per message a group processed ([`process_once`]). Old rows go
//!   with [`cleanup_inbox`].
//!
//! `created_at` and `processed_at` are milliseconds since the Unix epoch, from the client's
//! clock.
//!
//! # Sending
//! [`send_in_transaction`] sends the half message first (no database lock is held while it
//! travels), then opens a database transaction, inserts the log row, runs the caller's
//! business writes, commits the database, and commits the message. Any failure before the
//! database commit rolls back both. If the database commit call itself fails, its outcome
//! is unknown, so the message is left to the server's check-back.
//!
//! # How the check-back decides ([`DbChecker`])
//! - The log row exists with state `C`: the database transaction committed → **COMMIT**.
//! - The log row exists with state `R`: an earlier check-back fenced it → **ROLLBACK**.
//! - No row, and the half message is younger than `max_local_transaction` (default 60 s):
//!   the sender may still be working → **UNKNOWN** (the server asks again later).
//! - No row, and older than that: the checker *fences* the transaction id by inserting the
//!   row itself with state `R`, waiting at most `lock_wait` (default 1 s) for row locks, and
//!   commits that. If its insert wins → **ROLLBACK**; if the row turned out to exist (the
//!   sender committed meanwhile) → its state decides; if the wait timed out (the sender's
//!   transaction is still open and holds the row) → **UNKNOWN**.
//!
//! Why ROLLBACK is safe: the sender inserts the log row *first* in its transaction, and the
//! transaction id is the table's primary key. The database lets only one of the two inserts
//! of that key commit: if the sender's transaction is open, its uncommitted row makes the
//! checker's insert wait (PostgreSQL, InnoDB) or the database is locked for writing (SQLite);
//! if the checker's row committed first, the sender's insert fails with a duplicate key and
//! its whole transaction, business rows included, rolls back. So a ROLLBACK answer means
//! the business rows never commit, whatever the clocks say, however long the sender was
//! paused. `max_local_transaction` only decides *when* the checker stops waiting for a slow
//! sender and fences it; set it above the longest business transaction (bound that with a
//! statement or transaction timeout on the database side) so that live senders are not
//! fenced. Its clock is the message's born timestamp (the sender's clock), or the store
//! timestamp when that is missing: a skew only moves the moment of fencing, never safety.
//!
//! # Consuming once
//! [`process_once`] inserts `(consumer group, message id)` into the inbox in the handler's
//! database transaction; a duplicate key means an earlier delivery's transaction committed,
//! so the handler is not run ([`Processed::Duplicate`]) and the message can be acked. Inbox
//! rows are kept until [`cleanup_inbox`] removes them: a duplicate delivered after its row
//! was removed is processed again. Keep rows longer than the server's redelivery horizon
//! (the group's maximum delivery attempts times its longest backoff, plus the invisible
//! duration, plus the topic's retention for re-consumption from an offset); seven days is a
//! safe default for most setups.
//!
//! # Example
//! ```no_run
//! # async fn f(producer: txmq_client::TransactionalProducer) -> Result<(), Box<dyn std::error::Error>> {
//! use txmq_client::Message;
//! use txmq_client::db::{self, send_in_transaction};
//!
//! let pool = sqlx::PgPool::connect("postgres://postgres@127.0.0.1/test").await?;
//! db::migrate(&pool).await?;
//! let sent = send_in_transaction(&producer, &pool, Message::new("orders", "order 42 paid"), |tx| {
//!     Box::pin(async move {
//!         sqlx::query("UPDATE orders SET paid = true WHERE id = 42").execute(&mut **tx).await?;
//!         Ok::<_, sqlx::Error>(())
//!     })
//! })
//! .await?;
//! println!("sent {}", sent.receipt.message_id);
//! # Ok(()) }
//! ```

mod checker;
mod dialect;
#[doc(hidden)]
pub mod fault;
mod inbox;
mod send;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use checker::DbChecker;
pub use dialect::Dialect;
pub use inbox::{ProcessError, Processed, cleanup_inbox, process_once};
pub use send::{Committed, SendInTransactionError, cleanup_log, send_in_transaction};

/// A boxed future borrowing a database transaction, as the closures of
/// [`send_in_transaction`] and [`process_once`] return (like `sqlx::Connection::transaction`).
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// The database transaction the closures of [`send_in_transaction`] and [`process_once`]
/// write on.
pub type DbTransaction<DB> = sqlx::Transaction<'static, DB>;

/// Rows deleted per statement by [`cleanup_log`] and [`cleanup_inbox`], so that no
/// statement holds many row locks for long.
pub const CLEANUP_BATCH: i64 = 1000;

/// Creates the transaction-log and inbox tables and their indexes if they do not exist.
/// Idempotent; run it at start-up or from your own migrations.
///
/// # Errors
/// The database's error.
pub async fn migrate<DB: Dialect>(pool: &sqlx::Pool<DB>) -> Result<(), sqlx::Error> {
    DB::migrate(pool).await
}

/// Milliseconds since the Unix epoch of `t` (0 before the epoch).
fn epoch_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The cut-off, in epoch milliseconds, for rows older than `older_than`.
fn cutoff_ms(older_than: Duration) -> i64 {
    epoch_ms(
        SystemTime::now()
            .checked_sub(older_than)
            .unwrap_or(UNIX_EPOCH),
    )
}
