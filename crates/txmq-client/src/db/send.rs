//! Where a message is sent together with a database transaction, and where old log rows
//! are deleted.

use std::any::Any;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use crate::error::{EndTransactionError, SendError};
use crate::message::{Message, SendReceipt};
use crate::transaction::{Transaction, TransactionalProducer};

use super::checker::COMMITTED;
use super::dialect::ended_by_database;
use super::fault::{self, Crash};
use super::{BoxFuture, CLEANUP_BATCH, DbTransaction, Dialect, LOG_PROPERTY, cutoff_ms};

/// A transactional send whose database transaction committed.
#[derive(Debug)]
pub struct Committed<T> {
    /// What the closure returned.
    pub value: T,
    /// The half message's id and transaction id.
    pub receipt: SendReceipt,
    /// The message commit. An error here loses nothing: the database committed, so the
    /// server's check-back ([`DbChecker`](super::DbChecker)) commits the message later.
    pub message_commit: Result<(), EndTransactionError>,
}

/// Why [`send_in_transaction`] did not commit, and what state it left.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SendInTransactionError<E> {
    /// The log's id, which marks the half message, could not be read (has
    /// [`migrate`](super::migrate) run since the upgrade that added `txmq_tx_log_meta`?);
    /// nothing was sent or written.
    #[error("could not read the transaction log's id (has db::migrate run?), nothing sent: {0}")]
    LogId(sqlx::Error),
    /// The half message was not sent; the database was not touched.
    #[error("half message not sent: {0}")]
    Send(SendError),
    /// A database call failed, before the commit or as the commit with an error that says
    /// the database rolled back (a deferred constraint, a serialization failure); the
    /// database transaction and the message were rolled back.
    #[error("database error, rolled back the database and the message: {0}")]
    Database(sqlx::Error),
    /// A check-back had already answered ROLLBACK for this transaction (the sender was
    /// slower than `max_local_transaction`); the database transaction was rolled back.
    #[error(
        "transaction {transaction_id} was rolled back by a check-back before the database wrote it"
    )]
    Fenced {
        /// The transaction id.
        transaction_id: String,
    },
    /// The database had already rolled the transaction back when the closure returned: a
    /// statement inside it failed and the closure went on (PostgreSQL then refuses every
    /// statement and turns COMMIT into ROLLBACK; MySQL rolls back a whole transaction on a
    /// deadlock and runs later statements on their own). Nothing of the transaction was
    /// committed by txmq, and the message was rolled back.
    #[error(
        "the database rolled transaction {transaction_id} back before its commit (a failed statement inside it was caught); rolled back the message"
    )]
    Aborted {
        /// The transaction id.
        transaction_id: String,
    },
    /// The closure failed; the database transaction and the message were rolled back.
    #[error("the local transaction failed, rolled back the database and the message: {0}")]
    Local(E),
    /// The database commit call failed in a way that leaves unknown whether it committed
    /// (a lost connection); the message is left open and the check-back settles it from
    /// the log table.
    #[error(
        "database commit of transaction {transaction_id} has an unknown outcome; the check-back settles the message: {cause}"
    )]
    CommitUnknown {
        /// The transaction id.
        transaction_id: String,
        /// The commit's error.
        cause: sqlx::Error,
    },
    /// Stopped by an injected [`fault`](super::fault).
    #[doc(hidden)]
    #[error("crashed at {0:?} (fault injection)")]
    Crashed(Crash),
}

/// How the database part ended.
enum Local<T, E> {
    Committed(T),
    RolledBack(SendInTransactionError<E>),
    Unknown(SendInTransactionError<E>),
}

/// Sends `message` as a half message, then runs `local` in a database transaction of
/// `pool` that also records the transaction id in `txmq_tx_log`, commits the database, and
/// commits the message.
///
/// The half message is sent before the database transaction begins, so no database lock
/// is held while it travels. It carries the log's id (read from `pool` on the pool's first
/// send) in the user property [`LOG_PROPERTY`]: a [`DbChecker`](super::DbChecker) fences
/// only transactions marked with its own log. The log row is inserted first in the
/// transaction: it fences the transaction against a check-back that answers ROLLBACK (see
/// the [module docs](super)). `local` gets the transaction, like
/// `sqlx::Connection::transaction`:
/// `|tx| Box::pin(async move { sqlx::query(..).execute(&mut **tx).await?; Ok(..) })`;
/// it must not commit or roll back itself, and what it captures must be owned.
///
/// The producer's checker must be a [`DbChecker`](super::DbChecker) on the same database,
/// and `migrate` must have run.
///
/// # Cancel safety
/// Not cancel safe, and that is harmless: cancelled before the database commit, the
/// database transaction rolls back and the check-back rolls the message back once it is
/// older than `max_local_transaction`; cancelled after, the check-back commits it.
///
/// # Errors
/// [`SendInTransactionError`], which says what was rolled back. A failed *message* commit
/// after the database commit is not an error: see [`Committed::message_commit`].
pub async fn send_in_transaction<DB, F, T, E>(
    producer: &TransactionalProducer,
    pool: &sqlx::Pool<DB>,
    message: Message,
    local: F,
) -> Result<Committed<T>, SendInTransactionError<E>>
where
    DB: Dialect,
    F: for<'c> FnOnce(&'c mut DbTransaction<DB>) -> BoxFuture<'c, Result<T, E>>,
{
    let log_id = log_id(pool).await.map_err(SendInTransactionError::LogId)?;
    let half = producer
        .begin(message.with_property(LOG_PROPERTY, log_id))
        .await
        .map_err(SendInTransactionError::Send)?;
    let receipt = half.receipt().clone();
    if fault::at(Crash::AfterHalf) {
        drop(half);
        return Err(SendInTransactionError::Crashed(Crash::AfterHalf));
    }
    match run_local(pool, &half, local).await {
        Local::Committed(value) => {
            if fault::at(Crash::AfterDbCommit) {
                drop(half);
                return Err(SendInTransactionError::Crashed(Crash::AfterDbCommit));
            }
            let message_commit = half.commit().await;
            if let Err(e) = &message_commit {
                tracing::warn!(transaction_id = %receipt.transaction_id, error = %e,
                    "message commit failed after the database commit; the check-back commits it");
            }
            Ok(Committed {
                value,
                receipt,
                message_commit,
            })
        }
        Local::RolledBack(SendInTransactionError::Crashed(c)) => {
            drop(half);
            Err(SendInTransactionError::Crashed(c))
        }
        Local::RolledBack(err) => {
            if let Err(e) = half.rollback().await {
                tracing::warn!(transaction_id = %receipt.transaction_id, error = %e,
                    "message rollback failed; the check-back rolls it back");
            }
            Err(err)
        }
        Local::Unknown(err) => {
            drop(half);
            Err(err)
        }
    }
}

/// The log ids [`send_in_transaction`] read, one per pool, found by the address of the
/// pool's connect options (shared by its clones); the `Weak` keeps that address from being
/// reused while the entry is there.
static LOG_IDS: Mutex<Vec<(Weak<dyn Any + Send + Sync>, String)>> = Mutex::new(Vec::new());

/// The id of the log in `pool`'s database, read on the pool's first send.
async fn log_id<DB: Dialect>(pool: &sqlx::Pool<DB>) -> Result<String, sqlx::Error> {
    let options: Arc<dyn Any + Send + Sync> = pool.connect_options();
    let key = Arc::downgrade(&options);
    let cached = LOG_IDS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .find(|(k, _)| k.ptr_eq(&key))
        .map(|(_, id)| id.clone());
    if let Some(id) = cached {
        return Ok(id);
    }
    let (id, _) = DB::log_meta(pool).await?;
    let mut ids = LOG_IDS.lock().unwrap_or_else(PoisonError::into_inner);
    ids.retain(|(k, _)| k.strong_count() > 0);
    ids.push((key, id.clone()));
    Ok(id)
}

/// The database part: log row, business writes, commit.
async fn run_local<DB, F, T, E>(pool: &sqlx::Pool<DB>, half: &Transaction, local: F) -> Local<T, E>
where
    DB: Dialect,
    F: for<'c> FnOnce(&'c mut DbTransaction<DB>) -> BoxFuture<'c, Result<T, E>>,
{
    let mut tx = match pool.begin().await {
        Ok(tx) => tx,
        Err(e) => return Local::RolledBack(SendInTransactionError::Database(e)),
    };
    let logged = DB::insert_log(
        &mut tx,
        half.transaction_id(),
        half.message_id(),
        half.topic(),
        COMMITTED,
    )
    .await;
    let failure = match logged {
        Ok(()) => match local(&mut tx).await {
            Ok(value) => {
                if fault::at(Crash::BeforeDbCommit) {
                    drop(tx);
                    return Local::RolledBack(SendInTransactionError::Crashed(
                        Crash::BeforeDbCommit,
                    ));
                }
                // COMMIT of a transaction the database already ended answers without an
                // error: the log row, read inside it, says whether it is still whole.
                match DB::log_row_kept(&mut tx, half.transaction_id()).await {
                    Ok(true) => {
                        return match tx.commit().await {
                            Ok(()) => Local::Committed(value),
                            Err(cause) if refused_commit(&cause) => {
                                Local::RolledBack(SendInTransactionError::Database(cause))
                            }
                            Err(cause) => Local::Unknown(SendInTransactionError::CommitUnknown {
                                transaction_id: half.transaction_id().to_string(),
                                cause,
                            }),
                        };
                    }
                    Ok(false) => SendInTransactionError::Aborted {
                        transaction_id: half.transaction_id().to_string(),
                    },
                    Err(e) if ended_by_database(&e) => SendInTransactionError::Aborted {
                        transaction_id: half.transaction_id().to_string(),
                    },
                    Err(e) => SendInTransactionError::Database(e),
                }
            }
            Err(e) => SendInTransactionError::Local(e),
        },
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
            SendInTransactionError::Fenced {
                transaction_id: half.transaction_id().to_string(),
            }
        }
        Err(e) => SendInTransactionError::Database(e),
    };
    if let Err(e) = tx.rollback().await {
        // The connection is dropped and the server rolls the transaction back.
        tracing::debug!(error = %e, "database rollback failed");
    }
    Local::RolledBack(failure)
}

/// Whether `e`, the error of a COMMIT, says for certain that the database rolled the
/// transaction back: a constraint checked at commit failed (SQLSTATE class 23: a deferred
/// constraint on PostgreSQL), or the database gave the transaction up (40001 serialization
/// failure, 40P01 deadlock, 40002; MariaDB Galera's certification failure is 40001). Any
/// other error, a lost connection above all, leaves the outcome unknown: PostgreSQL, for
/// one, may end the session with the transaction committed while it waits for a
/// synchronous standby.
fn refused_commit(e: &sqlx::Error) -> bool {
    let sqlx::Error::Database(d) = e else {
        return false;
    };
    d.code()
        .is_some_and(|c| c.starts_with("23") || matches!(&*c, "40001" | "40P01" | "40002"))
}

/// Deletes transaction-log rows older than `older_than` by the database's clock,
/// [`CLEANUP_BATCH`] rows per statement; returns how many were deleted.
///
/// The cut-off is recorded in `txmq_tx_log_meta` before any row goes, and a check-back
/// never fences a message born before it: a transaction whose row was deleted is answered
/// UNKNOWN, and is left for an operator once the server stops asking. Keep rows well
/// beyond the server's check-back horizon (its transaction timeout plus check interval
/// times maximum checks; a day is ample for txmq's defaults) so that this does not happen.
///
/// # Cancel safety
/// Cancel safe: batches already deleted stay deleted, and the cut-off stays recorded.
///
/// # Errors
/// The database's error; earlier batches stay deleted.
pub async fn cleanup_log<DB: Dialect>(
    pool: &sqlx::Pool<DB>,
    older_than: Duration,
) -> Result<u64, sqlx::Error> {
    let cutoff = cutoff_ms::<DB>(pool, older_than).await?;
    // Recorded first: a check-back that finds a row gone finds the cut-off too.
    DB::record_cleanup(pool, cutoff).await?;
    let mut total = 0;
    loop {
        let n = DB::delete_log_batch(pool, cutoff, CLEANUP_BATCH).await?;
        total += n;
        if n < CLEANUP_BATCH as u64 {
            return Ok(total);
        }
    }
}
