//! Where a consumed message is recorded as processed, once per consumer group.

use std::time::Duration;

use crate::message::MessageView;

use super::dialect::ended_by_database;
use super::{BoxFuture, CLEANUP_BATCH, DbTransaction, Dialect, cutoff_ms};

/// What [`process_once`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Processed<T> {
    /// The handler ran and its transaction committed with the inbox row.
    Done(T),
    /// The group had processed this message before: the handler did not run. Ack it.
    Duplicate,
}

/// Why [`process_once`] did not commit; nothing it wrote stays, so the message should be
/// redelivered (not acked).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProcessError<E> {
    /// A database call failed (a failed commit included: a redelivery then finds the
    /// inbox row if it did commit, and reports a duplicate).
    #[error("database error, nothing processed: {0}")]
    Database(sqlx::Error),
    /// The database had already rolled the handler's transaction back when the handler
    /// returned (a statement inside it failed and the handler went on; see
    /// [`SendInTransactionError::Aborted`](super::SendInTransactionError::Aborted)). Nothing
    /// was recorded: the message is not acknowledged and comes again.
    #[error(
        "the database rolled the handler's transaction back before its commit (a failed statement inside it was caught); nothing processed"
    )]
    Aborted,
    /// The message arrived damaged ([`MessageView::corrupted`]: its body does not match its
    /// digest, or does not decompress within [`crate::MAX_INFLATED_BODY`]); the handler did
    /// not run and nothing was recorded, so an intact delivery is still processed.
    #[error(
        "message {0} arrived damaged (body digest mismatch, or a compressed body that does \
         not inflate within the limit); nothing processed"
    )]
    Corrupted(String),
    /// The handler failed; its transaction was rolled back.
    #[error("handler failed, rolled back: {0}")]
    Handler(E),
}

/// Processes `message` once for `group`: opens a database transaction, inserts
/// `(group, message id)` into `txmq_inbox`, runs `handler` on the transaction and commits.
/// If the row exists (an earlier delivery committed), the handler does not run and the
/// result is [`Processed::Duplicate`].
///
/// Concurrent deliveries of one message wait for each other on the inbox row (PostgreSQL,
/// InnoDB) or the write lock (SQLite), so only one runs the handler. Retention: see
/// [`cleanup_inbox`].
///
/// # Example
/// ```no_run
/// # async fn f(pool: sqlx::PgPool, config: txmq_client::ClientConfig) -> Result<(), txmq_client::Error> {
/// use txmq_client::{PushConsumer, Subscription, db::process_once};
///
/// let consumer = PushConsumer::builder(config, "logistics")
///     .subscribe(Subscription::all("orders"))
///     .start(move |m| {
///         let pool = pool.clone();
///         async move {
///             process_once(&pool, "logistics", &m, |tx, m| Box::pin(async move {
///                 sqlx::query("INSERT INTO shipments (message_id) VALUES ($1)")
///                     .bind(m.message_id())
///                     .execute(&mut **tx)
///                     .await
///             }))
///             .await
///             .map(drop)
///         }
///     })
///     .await?;
/// # Ok(()) }
/// ```
///
/// # Cancel safety
/// Cancel safe: cancelled before the commit, nothing stays.
///
/// # Errors
/// [`ProcessError`]; nothing was recorded.
pub async fn process_once<DB, F, T, E>(
    pool: &sqlx::Pool<DB>,
    group: &str,
    message: &MessageView,
    handler: F,
) -> Result<Processed<T>, ProcessError<E>>
where
    DB: Dialect,
    F: for<'c> FnOnce(&'c mut DbTransaction<DB>, &'c MessageView) -> BoxFuture<'c, Result<T, E>>,
{
    if message.corrupted() {
        return Err(ProcessError::Corrupted(message.message_id().to_string()));
    }
    let mut tx = pool.begin().await.map_err(ProcessError::Database)?;
    let fresh = DB::insert_inbox(&mut tx, group, message.message_id()).await;
    let failure = match fresh {
        Ok(false) => {
            let _ = tx.rollback().await;
            return Ok(Processed::Duplicate);
        }
        Ok(true) => match handler(&mut tx, message).await {
            // As in `send_in_transaction`: a COMMIT of a transaction the database already
            // ended would write nothing and answer without an error.
            Ok(value) => match DB::inbox_row_kept(&mut tx, group, message.message_id()).await {
                Ok(true) => {
                    tx.commit().await.map_err(ProcessError::Database)?;
                    return Ok(Processed::Done(value));
                }
                Ok(false) => ProcessError::Aborted,
                Err(e) if ended_by_database(&e) => ProcessError::Aborted,
                Err(e) => ProcessError::Database(e),
            },
            Err(e) => ProcessError::Handler(e),
        },
        Err(e) => ProcessError::Database(e),
    };
    if let Err(e) = tx.rollback().await {
        tracing::debug!(error = %e, "database rollback failed");
    }
    Err(failure)
}

/// Deletes inbox rows processed more than `older_than` ago by the database's clock,
/// [`CLEANUP_BATCH`] rows per statement; returns how many were deleted.
///
/// After its row is gone, a redelivered duplicate is processed again: keep rows longer
/// than any redelivery can come (the group's maximum delivery attempts times its longest
/// backoff plus the invisible duration, and any replay from an older offset); seven days
/// suits most setups.
///
/// # Cancel safety
/// Cancel safe: batches already deleted stay deleted.
///
/// # Errors
/// The database's error; earlier batches stay deleted.
pub async fn cleanup_inbox<DB: Dialect>(
    pool: &sqlx::Pool<DB>,
    older_than: Duration,
) -> Result<u64, sqlx::Error> {
    let cutoff = cutoff_ms::<DB>(pool, older_than).await?;
    let mut total = 0;
    loop {
        let n = DB::delete_inbox_batch(pool, cutoff, CLEANUP_BATCH).await?;
        total += n;
        if n < CLEANUP_BATCH as u64 {
            return Ok(total);
        }
    }
}

#[cfg(test)]
mod tests {
    use txmq_proto::v2 as pb;

    use super::*;

    #[tokio::test]
    async fn a_damaged_message_is_not_processed_and_leaves_no_inbox_row() {
        // One connection: each has a memory database of its own.
        let pool = sqlx::sqlite::SqlitePoolOptions::new()
            .max_connections(1)
            .connect("sqlite::memory:")
            .await
            .unwrap();
        super::super::migrate(&pool).await.unwrap();
        let damaged = MessageView::from_proto(pb::Message {
            topic: None,
            user_properties: Default::default(),
            system_properties: Some(pb::SystemProperties {
                message_id: "m1".into(),
                body_digest: Some(pb::Digest {
                    r#type: pb::DigestType::Crc32 as i32,
                    checksum: "00000000".into(),
                }),
                ..Default::default()
            }),
            body: b"amount=100".to_vec().into(),
        });
        assert!(damaged.corrupted());
        let ran = std::sync::atomic::AtomicBool::new(false);
        let out = process_once(&pool, "g", &damaged, |_tx, _m| {
            ran.store(true, std::sync::atomic::Ordering::SeqCst);
            Box::pin(async { Ok::<_, String>(()) })
        })
        .await;
        assert!(
            matches!(out, Err(ProcessError::Corrupted(ref id)) if id == "m1"),
            "{out:?}"
        );
        assert!(!ran.load(std::sync::atomic::Ordering::SeqCst));
        let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM txmq_inbox")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(rows, 0);
    }
}
