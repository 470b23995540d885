//! The SQL of each database: DDL, the log and inbox statements, the database's clock, lock
//! waits.
//!
//! The statements differ only in placeholders, DDL details and how a duplicate key is
//! swallowed; one macro writes the same code against each driver's concrete types.

use std::future::Future;
use std::time::Duration;

use sqlx::{MySql, MySqlConnection, PgConnection, Pool, Postgres, Sqlite, SqliteConnection};

mod sealed {
    pub trait Sealed {}
    impl Sealed for sqlx::Postgres {}
    impl Sealed for sqlx::MySql {}
    impl Sealed for sqlx::Sqlite {}
}

/// A database the `db` module works with: [`sqlx::Postgres`], [`sqlx::MySql`] (MySQL and
/// MariaDB) or [`sqlx::Sqlite`]. Sealed; its methods are the module's building blocks and
/// not meant to be called directly.
pub trait Dialect: sqlx::Database + sealed::Sealed {
    /// Creates the tables and indexes if missing, and the log's meta row with a new log id
    /// if missing.
    #[doc(hidden)]
    fn migrate(pool: &Pool<Self>) -> impl Future<Output = Result<(), sqlx::Error>> + Send;

    /// The database's clock, in milliseconds since the Unix epoch.
    #[doc(hidden)]
    fn now_ms(pool: &Pool<Self>) -> impl Future<Output = Result<i64, sqlx::Error>> + Send;

    /// The log's id and the cut-off of its latest cleanup (epoch ms, 0 if none).
    #[doc(hidden)]
    fn log_meta(
        pool: &Pool<Self>,
    ) -> impl Future<Output = Result<(String, i64), sqlx::Error>> + Send;

    /// Raises the recorded cleanup cut-off to `cutoff_ms` if it is lower.
    #[doc(hidden)]
    fn record_cleanup(
        pool: &Pool<Self>,
        cutoff_ms: i64,
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send;

    /// Inserts a log row stamped with the database's clock; a duplicate key is an error.
    #[doc(hidden)]
    fn insert_log(
        conn: &mut Self::Connection,
        transaction_id: &str,
        message_id: &str,
        topic: &str,
        state: &str,
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send;

    /// Inserts a log row unless the key exists; `true` if inserted. Waits for row locks
    /// at most `lock_wait` where the database allows setting it per transaction.
    #[doc(hidden)]
    fn fence_log(
        conn: &mut Self::Connection,
        transaction_id: &str,
        message_id: &str,
        topic: &str,
        lock_wait: Duration,
    ) -> impl Future<Output = Result<bool, sqlx::Error>> + Send;

    /// The state of a committed log row, if it exists: never one a transaction still open
    /// wrote, whatever the isolation level of the pool's sessions.
    #[doc(hidden)]
    fn log_state(
        pool: &Pool<Self>,
        transaction_id: &str,
    ) -> impl Future<Output = Result<Option<String>, sqlx::Error>> + Send;

    /// Whether the sender's own log row of `transaction_id` (state `C`) is there, read
    /// inside the caller's transaction: before a commit, to find a transaction the database
    /// already rolled back (an error caught inside it), whose COMMIT would end it without
    /// writing anything. A check-back's fence in its place counts as gone.
    #[doc(hidden)]
    fn log_row_kept(
        conn: &mut Self::Connection,
        transaction_id: &str,
    ) -> impl Future<Output = Result<bool, sqlx::Error>> + Send;

    /// Inserts an inbox row stamped with the database's clock unless the key exists;
    /// `true` if inserted.
    #[doc(hidden)]
    fn insert_inbox(
        conn: &mut Self::Connection,
        group: &str,
        message_id: &str,
    ) -> impl Future<Output = Result<bool, sqlx::Error>> + Send;

    /// Whether the inbox row of `(group, message_id)` that the caller's transaction inserted
    /// is still there: as [`Dialect::log_row_kept`], but the key is not the caller's alone.
    /// Once the database has ended the caller's transaction (a deadlock's victim, say), a
    /// later delivery of the same message can insert that row, and a read would find it;
    /// so where the database ends transactions by itself and goes on, the transaction is
    /// first checked to be still open (see `STILL_OPEN`).
    #[doc(hidden)]
    fn inbox_row_kept(
        conn: &mut Self::Connection,
        group: &str,
        message_id: &str,
    ) -> impl Future<Output = Result<bool, sqlx::Error>> + Send;

    /// Deletes up to `limit` log rows created before `cutoff_ms`; the count deleted.
    #[doc(hidden)]
    fn delete_log_batch(
        pool: &Pool<Self>,
        cutoff_ms: i64,
        limit: i64,
    ) -> impl Future<Output = Result<u64, sqlx::Error>> + Send;

    /// Deletes up to `limit` inbox rows processed before `cutoff_ms`; the count deleted.
    #[doc(hidden)]
    fn delete_inbox_batch(
        pool: &Pool<Self>,
        cutoff_ms: i64,
        limit: i64,
    ) -> impl Future<Output = Result<u64, sqlx::Error>> + Send;
}

/// Whether `e` says the database already ended the transaction it ran in: PostgreSQL's
/// `in_failed_sql_transaction` (SQLSTATE 25P02), answered to every statement after a failed
/// one until the transaction ends.
pub(crate) fn ended_by_database(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.code().as_deref() == Some("25P02"))
}

/// Whether an insert that may hit a duplicate key inserted its row.
fn inserted<R>(
    result: Result<R, sqlx::Error>,
    rows: impl Fn(&R) -> u64,
) -> Result<bool, sqlx::Error> {
    match result {
        Ok(r) => Ok(rows(&r) > 0),
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Ok(false),
        Err(e) => Err(e),
    }
}

mod pg {
    /// The database's clock in epoch milliseconds (the transaction's start).
    macro_rules! now_ms {
        () => {
            "CAST(EXTRACT(EPOCH FROM now()) * 1000 AS BIGINT)"
        };
    }

    pub const DDL: &[&str] = &[
        "CREATE TABLE IF NOT EXISTS txmq_tx_log (
            transaction_id VARCHAR(128) PRIMARY KEY,
            message_id VARCHAR(128) NOT NULL,
            topic VARCHAR(255) NOT NULL,
            state VARCHAR(1) NOT NULL,
            created_at BIGINT NOT NULL)",
        "CREATE INDEX IF NOT EXISTS txmq_tx_log_created_at ON txmq_tx_log (created_at)",
        "CREATE TABLE IF NOT EXISTS txmq_inbox (
            consumer_group VARCHAR(255) NOT NULL,
            message_id VARCHAR(128) NOT NULL,
            processed_at BIGINT NOT NULL,
            PRIMARY KEY (consumer_group, message_id))",
        "CREATE INDEX IF NOT EXISTS txmq_inbox_processed_at ON txmq_inbox (processed_at)",
        "CREATE TABLE IF NOT EXISTS txmq_tx_log_meta (
            id SMALLINT PRIMARY KEY,
            log_id VARCHAR(64) NOT NULL,
            cleaned_before BIGINT NOT NULL)",
    ];
    pub const INSERT_META: &str = "INSERT INTO txmq_tx_log_meta (id, log_id, cleaned_before) VALUES (1, $1, 0) ON CONFLICT (id) DO NOTHING";
    pub const LOG_META: &str = "SELECT log_id, cleaned_before FROM txmq_tx_log_meta WHERE id = 1";
    pub const RECORD_CLEANUP: &str =
        "UPDATE txmq_tx_log_meta SET cleaned_before = GREATEST(cleaned_before, $1) WHERE id = 1";
    pub const NOW: &str = concat!("SELECT ", now_ms!());
    pub const INSERT_LOG: &str = concat!(
        "INSERT INTO txmq_tx_log (transaction_id, message_id, topic, state, created_at) VALUES ($1, $2, $3, $4, ",
        now_ms!(),
        ")"
    );
    pub const FENCE_LOG: &str = concat!(
        "INSERT INTO txmq_tx_log (transaction_id, message_id, topic, state, created_at) VALUES ($1, $2, $3, $4, ",
        now_ms!(),
        ") ON CONFLICT (transaction_id) DO NOTHING"
    );
    pub const LOG_STATE: &str = "SELECT state FROM txmq_tx_log WHERE transaction_id = $1";
    pub const INBOX_ROW: &str =
        "SELECT 1 FROM txmq_inbox WHERE consumer_group = $1 AND message_id = $2";
    pub const INSERT_INBOX: &str = concat!(
        "INSERT INTO txmq_inbox (consumer_group, message_id, processed_at) VALUES ($1, $2, ",
        now_ms!(),
        ") ON CONFLICT (consumer_group, message_id) DO NOTHING"
    );
    pub const DELETE_LOG: &str = "DELETE FROM txmq_tx_log WHERE transaction_id IN (SELECT transaction_id FROM txmq_tx_log WHERE created_at < $1 LIMIT $2)";
    pub const DELETE_INBOX: &str = "DELETE FROM txmq_inbox WHERE (consumer_group, message_id) IN (SELECT consumer_group, message_id FROM txmq_inbox WHERE processed_at < $1 LIMIT $2)";

    /// `SET LOCAL` ends with the transaction: nothing to restore.
    pub fn lock_wait(d: std::time::Duration) -> Option<String> {
        Some(format!(
            "SET LOCAL lock_timeout = '{}ms'",
            d.as_millis().max(1)
        ))
    }
    pub const LOCK_WAIT_RESET: Option<&str> = None;

    /// READ UNCOMMITTED reads committed rows in PostgreSQL: a plain read sees only
    /// committed log rows at any level.
    pub const BEGIN_READ_COMMITTED: Option<&str> = None;

    /// PostgreSQL ends a transaction only when told to, but a handler can still send its own
    /// `ROLLBACK`; after it, statements run on their own. A savepoint is refused outside a
    /// transaction block (25P01) and in a failed one (25P02).
    pub const STILL_OPEN: Option<&str> =
        Some("SAVEPOINT txmq_still_open; RELEASE SAVEPOINT txmq_still_open");
    pub fn ended(e: &sqlx::Error) -> bool {
        super::ended_by_database(e)
            || matches!(e, sqlx::Error::Database(d) if d.code().as_deref() == Some("25P01"))
    }
}

mod mysql {
    /// The database's clock in epoch milliseconds. `UNIX_TIMESTAMP(NOW(3))` would go through
    /// the session's time zone and be an hour off in the hour a daylight-saving clock repeats.
    macro_rules! now_ms {
        () => {
            "CAST(TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', UTC_TIMESTAMP(6)) DIV 1000 AS SIGNED)"
        };
    }

    // Indexes inline: MySQL has no CREATE INDEX IF NOT EXISTS (MariaDB has).
    pub const DDL: &[&str] = &[
        "CREATE TABLE IF NOT EXISTS txmq_tx_log (
            transaction_id VARCHAR(128) NOT NULL PRIMARY KEY,
            message_id VARCHAR(128) NOT NULL,
            topic VARCHAR(255) NOT NULL,
            state VARCHAR(1) NOT NULL,
            created_at BIGINT NOT NULL,
            INDEX txmq_tx_log_created_at (created_at)) ENGINE=InnoDB",
        "CREATE TABLE IF NOT EXISTS txmq_inbox (
            consumer_group VARCHAR(255) NOT NULL,
            message_id VARCHAR(128) NOT NULL,
            processed_at BIGINT NOT NULL,
            PRIMARY KEY (consumer_group, message_id),
            INDEX txmq_inbox_processed_at (processed_at)) ENGINE=InnoDB",
        "CREATE TABLE IF NOT EXISTS txmq_tx_log_meta (
            id SMALLINT NOT NULL PRIMARY KEY,
            log_id VARCHAR(64) NOT NULL,
            cleaned_before BIGINT NOT NULL) ENGINE=InnoDB",
    ];
    // Not INSERT IGNORE, which would also swallow unrelated errors.
    pub const INSERT_META: &str = "INSERT INTO txmq_tx_log_meta (id, log_id, cleaned_before) VALUES (1, ?, 0) ON DUPLICATE KEY UPDATE id = id";
    pub const LOG_META: &str = "SELECT log_id, cleaned_before FROM txmq_tx_log_meta WHERE id = 1";
    pub const RECORD_CLEANUP: &str =
        "UPDATE txmq_tx_log_meta SET cleaned_before = GREATEST(cleaned_before, ?) WHERE id = 1";
    pub const NOW: &str = concat!("SELECT ", now_ms!());
    pub const INSERT_LOG: &str = concat!(
        "INSERT INTO txmq_tx_log (transaction_id, message_id, topic, state, created_at) VALUES (?, ?, ?, ?, ",
        now_ms!(),
        ")"
    );
    // A duplicate key fails only the statement in InnoDB; `inserted` maps it to `false`.
    // (INSERT IGNORE would also swallow unrelated errors.)
    pub const FENCE_LOG: &str = INSERT_LOG;
    pub const LOG_STATE: &str = "SELECT state FROM txmq_tx_log WHERE transaction_id = ?";
    pub const INBOX_ROW: &str =
        "SELECT 1 FROM txmq_inbox WHERE consumer_group = ? AND message_id = ?";
    pub const INSERT_INBOX: &str = concat!(
        "INSERT INTO txmq_inbox (consumer_group, message_id, processed_at) VALUES (?, ?, ",
        now_ms!(),
        ")"
    );
    pub const DELETE_LOG: &str = "DELETE FROM txmq_tx_log WHERE created_at < ? LIMIT ?";
    pub const DELETE_INBOX: &str = "DELETE FROM txmq_inbox WHERE processed_at < ? LIMIT ?";

    /// InnoDB's lock wait is per session, in whole seconds: the session's own value is kept
    /// aside (the statement's expressions are read before any variable is set, and it sets
    /// all or none) and put back after the fence, so a pooled connection goes back with the
    /// lock wait it had. A value already kept aside is kept: a fence cut short before its
    /// reset leaves it there, and the next fence on that connection puts it back.
    pub fn lock_wait(d: std::time::Duration) -> Option<String> {
        Some(format!(
            "SET @txmq_lock_wait = COALESCE(@txmq_lock_wait, @@SESSION.innodb_lock_wait_timeout), \
             SESSION innodb_lock_wait_timeout = {}",
            d.as_secs().max(1)
        ))
    }
    pub const LOCK_WAIT_RESET: Option<&str> = Some(
        "SET SESSION innodb_lock_wait_timeout = CAST(@txmq_lock_wait AS UNSIGNED), \
         @txmq_lock_wait = NULL",
    );

    /// A check-back reads the log in a transaction of its own at READ COMMITTED: on a
    /// session at READ UNCOMMITTED, a plain read would see a sender's log row before its
    /// transaction commits, and answer COMMIT for a transaction that may yet roll back.
    /// `SET TRANSACTION` applies to the next transaction only, and both statements go in
    /// one round trip. (Not `READ ONLY`: a transaction left open by a cut-short read would
    /// refuse the writes of whoever gets the connection next; and a connection in that
    /// state is closed, not given back, see `log_state`.)
    pub const BEGIN_READ_COMMITTED: Option<&str> =
        Some("SET TRANSACTION ISOLATION LEVEL READ COMMITTED; START TRANSACTION");

    /// InnoDB ends a deadlock's victim by itself, and the session's later statements then
    /// run on their own, each committed at once. A savepoint outside a transaction lives for
    /// its own statement only, so releasing it in the next fails with
    /// ER_SP_DOES_NOT_EXIST (1305).
    pub const STILL_OPEN: Option<&str> =
        Some("SAVEPOINT txmq_still_open; RELEASE SAVEPOINT txmq_still_open");
    pub fn ended(e: &sqlx::Error) -> bool {
        e.as_database_error()
            .and_then(|d| d.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>())
            .is_some_and(|d| d.number() == 1305)
    }
}

mod sqlite {
    /// The database's clock in epoch milliseconds, on any SQLite version (`unixepoch` needs
    /// 3.38, its `'subsec'` 3.42). `'now'` is the same throughout a statement.
    macro_rules! now_ms {
        () => {
            "CAST(ROUND((julianday('now') - 2440587.5) * 86400000) AS INTEGER)"
        };
    }

    pub const DDL: &[&str] = &[
        "CREATE TABLE IF NOT EXISTS txmq_tx_log (
            transaction_id TEXT NOT NULL PRIMARY KEY,
            message_id TEXT NOT NULL,
            topic TEXT NOT NULL,
            state TEXT NOT NULL,
            created_at INTEGER NOT NULL)",
        "CREATE INDEX IF NOT EXISTS txmq_tx_log_created_at ON txmq_tx_log (created_at)",
        "CREATE TABLE IF NOT EXISTS txmq_inbox (
            consumer_group TEXT NOT NULL,
            message_id TEXT NOT NULL,
            processed_at INTEGER NOT NULL,
            PRIMARY KEY (consumer_group, message_id))",
        "CREATE INDEX IF NOT EXISTS txmq_inbox_processed_at ON txmq_inbox (processed_at)",
        "CREATE TABLE IF NOT EXISTS txmq_tx_log_meta (
            id INTEGER NOT NULL PRIMARY KEY,
            log_id TEXT NOT NULL,
            cleaned_before INTEGER NOT NULL)",
    ];
    pub const INSERT_META: &str = "INSERT INTO txmq_tx_log_meta (id, log_id, cleaned_before) VALUES (1, ?, 0) ON CONFLICT (id) DO NOTHING";
    pub const LOG_META: &str = "SELECT log_id, cleaned_before FROM txmq_tx_log_meta WHERE id = 1";
    pub const RECORD_CLEANUP: &str =
        "UPDATE txmq_tx_log_meta SET cleaned_before = max(cleaned_before, ?) WHERE id = 1";
    pub const NOW: &str = concat!("SELECT ", now_ms!());
    pub const INSERT_LOG: &str = concat!(
        "INSERT INTO txmq_tx_log (transaction_id, message_id, topic, state, created_at) VALUES (?, ?, ?, ?, ",
        now_ms!(),
        ")"
    );
    pub const FENCE_LOG: &str = concat!(
        "INSERT INTO txmq_tx_log (transaction_id, message_id, topic, state, created_at) VALUES (?, ?, ?, ?, ",
        now_ms!(),
        ") ON CONFLICT (transaction_id) DO NOTHING"
    );
    pub const LOG_STATE: &str = "SELECT state FROM txmq_tx_log WHERE transaction_id = ?";
    pub const INBOX_ROW: &str =
        "SELECT 1 FROM txmq_inbox WHERE consumer_group = ? AND message_id = ?";
    pub const INSERT_INBOX: &str = concat!(
        "INSERT INTO txmq_inbox (consumer_group, message_id, processed_at) VALUES (?, ?, ",
        now_ms!(),
        ") ON CONFLICT (consumer_group, message_id) DO NOTHING"
    );
    pub const DELETE_LOG: &str = "DELETE FROM txmq_tx_log WHERE transaction_id IN (SELECT transaction_id FROM txmq_tx_log WHERE created_at < ? LIMIT ?)";
    pub const DELETE_INBOX: &str = "DELETE FROM txmq_inbox WHERE rowid IN (SELECT rowid FROM txmq_inbox WHERE processed_at < ? LIMIT ?)";

    /// One writer at a time: the connection's busy timeout (sqlx: 5 s) bounds the wait.
    pub fn lock_wait(_: std::time::Duration) -> Option<String> {
        None
    }
    pub const LOCK_WAIT_RESET: Option<&str> = None;

    /// SQLite reads uncommitted rows only on a shared cache with `PRAGMA
    /// read_uncommitted` on, which a checker's pool must not set (documented).
    pub const BEGIN_READ_COMMITTED: Option<&str> = None;

    /// A savepoint outside a transaction starts one in SQLite, so it tells nothing. SQLite
    /// refuses the COMMIT of a transaction it ended instead ("no transaction is active").
    pub const STILL_OPEN: Option<&str> = None;
    pub fn ended(_: &sqlx::Error) -> bool {
        false
    }
}

/// A pooled connection closed when dropped, rather than given back to the pool, unless
/// the work on it was marked `done`.
struct ClosedUnlessDone<DB: sqlx::Database> {
    conn: sqlx::pool::PoolConnection<DB>,
    done: bool,
}

impl<DB: sqlx::Database> Drop for ClosedUnlessDone<DB> {
    fn drop(&mut self) {
        if !self.done {
            self.conn.close_on_drop();
        }
    }
}

macro_rules! dialect {
    ($db:ty, $conn:ty, $sql:ident) => {
        impl Dialect for $db {
            async fn migrate(pool: &Pool<Self>) -> Result<(), sqlx::Error> {
                for ddl in $sql::DDL {
                    sqlx::query(ddl).execute(pool).await?;
                }
                sqlx::query($sql::INSERT_META)
                    .bind(uuid::Uuid::now_v7().to_string())
                    .execute(pool)
                    .await
                    .map(drop)
            }

            async fn now_ms(pool: &Pool<Self>) -> Result<i64, sqlx::Error> {
                sqlx::query_scalar($sql::NOW).fetch_one(pool).await
            }

            async fn log_meta(pool: &Pool<Self>) -> Result<(String, i64), sqlx::Error> {
                sqlx::query_as($sql::LOG_META).fetch_one(pool).await
            }

            async fn record_cleanup(pool: &Pool<Self>, cutoff_ms: i64) -> Result<(), sqlx::Error> {
                sqlx::query($sql::RECORD_CLEANUP)
                    .bind(cutoff_ms)
                    .execute(pool)
                    .await
                    .map(drop)
            }

            async fn insert_log(
                conn: &mut $conn,
                transaction_id: &str,
                message_id: &str,
                topic: &str,
                state: &str,
            ) -> Result<(), sqlx::Error> {
                sqlx::query($sql::INSERT_LOG)
                    .bind(transaction_id)
                    .bind(message_id)
                    .bind(topic)
                    .bind(state)
                    .execute(conn)
                    .await
                    .map(drop)
            }

            async fn fence_log(
                conn: &mut $conn,
                transaction_id: &str,
                message_id: &str,
                topic: &str,
                lock_wait: Duration,
            ) -> Result<bool, sqlx::Error> {
                if let Some(set) = $sql::lock_wait(lock_wait) {
                    sqlx::query(&set).execute(&mut *conn).await?;
                }
                let result = sqlx::query($sql::FENCE_LOG)
                    .bind(transaction_id)
                    .bind(message_id)
                    .bind(topic)
                    .bind(super::checker::FENCED)
                    .execute(&mut *conn)
                    .await;
                if let Some(reset) = $sql::LOCK_WAIT_RESET {
                    sqlx::query(reset).execute(&mut *conn).await?;
                }
                inserted(result, |r| r.rows_affected())
            }

            async fn log_state(
                pool: &Pool<Self>,
                transaction_id: &str,
            ) -> Result<Option<String>, sqlx::Error> {
                let read = sqlx::query_scalar($sql::LOG_STATE).bind(transaction_id);
                let Some(begin) = $sql::BEGIN_READ_COMMITTED else {
                    return read.fetch_optional(pool).await;
                };
                // Cut short once the begin went out, the server starts the transaction but
                // sqlx knows of none to roll back: that connection is closed, not reused.
                let mut held = ClosedUnlessDone {
                    conn: pool.acquire().await?,
                    done: false,
                };
                let mut tx = sqlx::Connection::begin_with(&mut *held.conn, begin).await?;
                let state = read.fetch_optional(&mut *tx).await?;
                tx.commit().await?;
                held.done = true;
                Ok(state)
            }

            async fn log_row_kept(
                conn: &mut $conn,
                transaction_id: &str,
            ) -> Result<bool, sqlx::Error> {
                let state: Option<String> = sqlx::query_scalar($sql::LOG_STATE)
                    .bind(transaction_id)
                    .fetch_optional(conn)
                    .await?;
                // The sender's own row: a check-back's fence (`R`) there means the sender's
                // transaction is gone, its row with it.
                Ok(state.as_deref() == Some(super::checker::COMMITTED))
            }

            async fn inbox_row_kept(
                conn: &mut $conn,
                group: &str,
                message_id: &str,
            ) -> Result<bool, sqlx::Error> {
                if let Some(probe) = $sql::STILL_OPEN {
                    // No arguments: one simple query, both statements in one round trip.
                    match sqlx::Executor::execute(&mut *conn, probe).await {
                        Ok(_) => {}
                        Err(e) if $sql::ended(&e) => return Ok(false),
                        Err(e) => return Err(e),
                    }
                }
                // Open: the row, if there, is this transaction's, since it holds the key.
                let row = sqlx::query($sql::INBOX_ROW)
                    .bind(group)
                    .bind(message_id)
                    .fetch_optional(conn)
                    .await?;
                Ok(row.is_some())
            }

            async fn insert_inbox(
                conn: &mut $conn,
                group: &str,
                message_id: &str,
            ) -> Result<bool, sqlx::Error> {
                let result = sqlx::query($sql::INSERT_INBOX)
                    .bind(group)
                    .bind(message_id)
                    .execute(conn)
                    .await;
                inserted(result, |r| r.rows_affected())
            }

            async fn delete_log_batch(
                pool: &Pool<Self>,
                cutoff_ms: i64,
                limit: i64,
            ) -> Result<u64, sqlx::Error> {
                let r = sqlx::query($sql::DELETE_LOG)
                    .bind(cutoff_ms)
                    .bind(limit)
                    .execute(pool)
                    .await?;
                Ok(r.rows_affected())
            }

            async fn delete_inbox_batch(
                pool: &Pool<Self>,
                cutoff_ms: i64,
                limit: i64,
            ) -> Result<u64, sqlx::Error> {
                let r = sqlx::query($sql::DELETE_INBOX)
                    .bind(cutoff_ms)
                    .bind(limit)
                    .execute(pool)
                    .await?;
                Ok(r.rows_affected())
            }
        }
    };
}

dialect!(Postgres, PgConnection, pg);
dialect!(MySql, MySqlConnection, mysql);
dialect!(Sqlite, SqliteConnection, sqlite);
