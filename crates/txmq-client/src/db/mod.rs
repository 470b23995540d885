//! Transactional messages whose local transaction is a database transaction, and consumers
//! that process each message once, on PostgreSQL, MySQL/MariaDB and SQLite (sqlx).
//!
//! Three tables, created by [`migrate`]:
//!
//! - `txmq_tx_log(transaction_id PRIMARY KEY, message_id, topic, state, created_at)`: one row
//!   per transactional send, written in the same database transaction as the business rows
//!   ([`send_in_transaction`]); `state` is `C` (committed by the sender) or `R` (fenced off
//!   by a check-back that answered ROLLBACK, see below). Old rows go with [`cleanup_log`].
//! - `txmq_tx_log_meta(id PRIMARY KEY, log_id, cleaned_before)`: one row (`id` 1) with the
//!   log's id, a UUID `migrate` draws once, and the cut-off of the latest [`cleanup_log`].
//! - `txmq_inbox(consumer_group, message_id, processed_at, PRIMARY KEY(consumer_group,
//!   message_id))`: one row per message a group processed ([`process_once`]). Old rows go
//!   with [`cleanup_inbox`].
//!
//! `created_at`, `cleaned_before` and `processed_at` are milliseconds since the Unix epoch,
//! from the database's clock: rows are stamped and aged by one clock, whatever the clocks of
//! the clients that write and clean them.
//!
//! # Sending
//! [`send_in_transaction`] sends the half message first (no database lock is held while it
//! travels), then opens a database transaction, inserts the log row, runs the caller's
//! business writes, commits the database, and commits the message. Any failure before the
//! database commit rolls back both. If the database commit call itself fails, its outcome
//! is unknown, so the message is left to the server's check-back. The half message carries
//! the log's id in the user property [`LOG_PROPERTY`] (`txmq-db-log`), so that a check-back
//! can tell a transaction recorded in its log from any other.
//!
//! # How the check-back decides ([`DbChecker`])
//! - The log row exists with state `C`: the database transaction committed → **COMMIT**.
//! - The log row exists with state `R`: an earlier check-back fenced it → **ROLLBACK**.
//! - No row, and the half message is younger than `max_local_transaction` (default 60 s):
//!   the sender may still be working → **UNKNOWN** (the server asks again later).
//! - No row, older, and the message does not carry this log's id in [`LOG_PROPERTY`]: it
//!   was not sent by [`send_in_transaction`] on this database (another database's log, a
//!   plain `begin`/`commit`, or a sender older than the mark), so a missing row says
//!   nothing about its outcome → **UNKNOWN**, left to its own sender's checker or, once the
//!   server stops asking, to an operator (`txmq tx commit|rollback`).
//! - No row, older, and born before the latest [`cleanup_log`] cut-off: its row may have
//!   been deleted → **UNKNOWN** (warned), left to an operator likewise.
//! - Otherwise: the checker *fences* the transaction id by inserting the row itself with
//!   state `R`, waiting at most `lock_wait` (default 1 s) for row locks, and commits that.
//!   If its insert wins → **ROLLBACK**; if the row turned out to exist (the sender committed
//!   meanwhile) → its state decides; if the wait timed out (the sender's transaction is
//!   still open and holds the row) → **UNKNOWN**.
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
//! The cleanup cut-off (the database's clock, recorded before any row is deleted) is
//! compared with the earlier of the message's born and store timestamps (the sender's and
//! the server's clocks). Only when both run ahead of the database's clock can a message
//! whose row was deleted look born after the cut-off, and only if its row was written
//! within that lead before the cut-off: with log rows kept far longer than any transaction
//! stays open (see [`cleanup_log`]), no such message is still open.
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

/// The user property of a half message sent by [`send_in_transaction`] that names the
/// transaction log it is recorded in (the log id `migrate` stored in the database). A
/// [`DbChecker`] fences only transactions marked with its own log; it answers UNKNOWN for
/// the others. Consumers see it as any user property.
pub const LOG_PROPERTY: &str = "txmq-db-log";

/// Rows deleted per statement by [`cleanup_log`] and [`cleanup_inbox`], so that no
/// statement holds many row locks for long.
pub const CLEANUP_BATCH: i64 = 1000;

/// Creates the transaction-log and inbox tables and their indexes if they do not exist,
/// and the log's meta row with a new log id if it does not exist. Idempotent; run it at
/// start-up or from your own migrations (and again after upgrading txmq, which may add
/// tables).
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

/// The cut-off, in epoch milliseconds by the database's clock (which stamped the rows),
/// for rows older than `older_than`.
async fn cutoff_ms<DB: Dialect>(
    pool: &sqlx::Pool<DB>,
    older_than: Duration,
) -> Result<i64, sqlx::Error> {
    let older_than = i64::try_from(older_than.as_millis()).unwrap_or(i64::MAX);
    Ok(DB::now_ms(pool).await?.saturating_sub(older_than))
}
