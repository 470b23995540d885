//! The outbox table and its statements on each database.
//!
//! One table, `txmq_outbox`, keyed by `seq` (enqueue order) with a unique `id`. A row is
//! `P` (pending), `D` (delivered) or `X` (dead). A pending row is due when
//! `next_attempt_at <= now` and its lease `claimed_until <= now`.
//!
//! Claiming differs by database:
//! - PostgreSQL and MariaDB/MySQL: the relay selects due rows `FOR UPDATE SKIP LOCKED` in a
//!   transaction it keeps open while it publishes, then marks them and commits. A relay that
//!   dies, or loses its connection, leaves nothing claimed: its transaction rolls back.
//! - SQLite has one writer and no row locks: the relay leases due rows with one
//!   `UPDATE ... RETURNING` (atomic under the database's write lock) and marks them after
//!   publishing; a dead relay's rows are due again when the lease ends.
//!
//! A lease (SQLite claims, and fast-path rows everywhere) is marked only by its holder:
//! the marks require `claimed_by` to still name it, so a holder whose lease ran out cannot
//! mark a row that someone else has taken since.
//!
//! Ordered rows: a row with a key and `ordered = 1` is due only when no earlier row of its
//! key is pending or dead.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use sqlx::{MySql, Pool, Postgres, Sqlite};
use tokio::sync::Notify;

use crate::OutboxRow;

mod sealed {
    pub trait Sealed {}
    impl Sealed for sqlx::Postgres {}
    impl Sealed for sqlx::MySql {}
    impl Sealed for sqlx::Sqlite {}
}

/// The state of a dead row (`P` is pending, `D` delivered).
pub(crate) const DEAD: &str = "X";

/// Longest `last_error` kept, in bytes.
const MAX_ERROR: usize = 1000;

/// A row to insert.
#[doc(hidden)]
pub struct NewRow<'a> {
    pub id: &'a str,
    pub destination: &'a str,
    pub key: Option<&'a str>,
    pub ordered: bool,
    pub headers: String,
    pub payload: &'a [u8],
    pub next_attempt_at: i64,
    pub created_at: i64,
    pub claimed_by: Option<&'a str>,
    pub claimed_until: i64,
}

/// A failed publish to record.
#[doc(hidden)]
pub struct Failure<'a> {
    pub seq: i64,
    pub error: &'a str,
    pub next_attempt_at: i64,
}

/// A row as `txmq outbox dead list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RowSummary {
    /// Position in the outbox.
    pub seq: i64,
    /// The message id.
    pub id: String,
    /// The destination.
    pub destination: String,
    /// The key.
    pub key: Option<String>,
    /// Failed attempts.
    pub attempts: i64,
    /// The last publish error.
    pub last_error: Option<String>,
    /// Enqueued at, ms since the Unix epoch.
    pub created_at_ms: i64,
}

/// Counts for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct TableStats {
    /// Rows waiting to be published (due or not).
    pub pending: i64,
    /// Pending rows that failed at least once.
    pub retrying: i64,
    /// Enqueue time of the oldest pending row, ms since the Unix epoch.
    pub oldest_pending_ms: Option<i64>,
    /// Dead rows.
    pub dead: i64,
}

/// Rows claimed by a relay worker: with the transaction that holds their locks
/// (PostgreSQL, MySQL), or leased (SQLite).
#[doc(hidden)]
pub struct Claimed<DB: sqlx::Database> {
    pub(crate) tx: Option<sqlx::Transaction<'static, DB>>,
    pub(crate) rows: Vec<OutboxRow>,
}

/// What [`OutboxDb::relock`] returns: the transaction holding the rows, and their `seq`s.
#[doc(hidden)]
pub type Relocked<DB> = (Option<sqlx::Transaction<'static, DB>>, Vec<i64>);

/// A database the outbox works with: [`sqlx::Postgres`], [`sqlx::MySql`] (MySQL and
/// MariaDB) or [`sqlx::Sqlite`]. Sealed; its methods are the crate's building blocks.
pub trait OutboxDb: sqlx::Database + sealed::Sealed {
    /// Whether the relay claims rows with a lease (`claimed_by`, `claimed_until`) rather
    /// than with row locks held while it publishes.
    #[doc(hidden)]
    const LEASED_CLAIMS: bool = false;

    /// Creates the table and its indexes if missing; on PostgreSQL also creates the
    /// NOTIFY trigger (`notify`) or drops it.
    #[doc(hidden)]
    fn migrate(
        pool: &Pool<Self>,
        notify: bool,
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send;

    /// Inserts a row; its `seq`.
    #[doc(hidden)]
    fn insert(
        conn: &mut Self::Connection,
        row: &NewRow<'_>,
    ) -> impl Future<Output = Result<i64, sqlx::Error>> + Send;

    /// Claims up to `limit` due rows, in `seq` order.
    #[doc(hidden)]
    fn claim(
        pool: &Pool<Self>,
        worker: &str,
        now: i64,
        lease_until: i64,
        limit: i64,
    ) -> impl Future<Output = Result<Claimed<Self>, sqlx::Error>> + Send;

    /// For a batch whose claim's transaction failed (row-lock dialects): a new transaction
    /// holding those of `seqs` still pending that no other transaction holds
    /// (`FOR UPDATE SKIP LOCKED`), and their `seq`s. Without row locks (SQLite): no
    /// transaction, and every `seq`.
    #[doc(hidden)]
    fn relock(
        _pool: &Pool<Self>,
        seqs: &[i64],
    ) -> impl Future<Output = Result<Relocked<Self>, sqlx::Error>> + Send {
        std::future::ready(Ok((None, seqs.to_vec())))
    }

    /// Marks published rows delivered and failed ones for retry (or dead after
    /// `max_attempts`), and releases the claim. With `holder`, only the rows whose lease
    /// `claimed_by` still names it are marked.
    #[doc(hidden)]
    fn finish(
        pool: &Pool<Self>,
        claimed: Option<sqlx::Transaction<'static, Self>>,
        holder: Option<&str>,
        delivered: &[i64],
        failed: &[Failure<'_>],
        now: i64,
        max_attempts: u32,
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send;

    /// Up to `limit` rows in `status`, oldest first.
    #[doc(hidden)]
    fn list(
        pool: &Pool<Self>,
        status: &str,
        limit: i64,
    ) -> impl Future<Output = Result<Vec<RowSummary>, sqlx::Error>> + Send;

    /// Dead rows back to pending with no attempts; all of them, or those with `ids`.
    #[doc(hidden)]
    fn redrive(
        pool: &Pool<Self>,
        ids: Option<&[String]>,
        now: i64,
    ) -> impl Future<Output = Result<u64, sqlx::Error>> + Send;

    /// Deletes the dead rows with `ids`.
    #[doc(hidden)]
    fn drop_dead(
        pool: &Pool<Self>,
        ids: &[String],
    ) -> impl Future<Output = Result<u64, sqlx::Error>> + Send;

    /// Deletes up to `limit` rows delivered before `cutoff`; the count.
    #[doc(hidden)]
    fn delete_delivered(
        pool: &Pool<Self>,
        cutoff: i64,
        limit: i64,
    ) -> impl Future<Output = Result<u64, sqlx::Error>> + Send;

    /// Counts for metrics.
    #[doc(hidden)]
    fn stats(pool: &Pool<Self>) -> impl Future<Output = Result<TableStats, sqlx::Error>> + Send;

    /// Wakes `wake` whenever rows are inserted, where the database can tell (PostgreSQL
    /// LISTEN/NOTIFY); the listening task, or `None`.
    #[doc(hidden)]
    fn listen(_pool: &Pool<Self>, _wake: Arc<Notify>) -> Option<tokio::task::JoinHandle<()>> {
        None
    }
}

/// `sql` with `?` placeholders numbered `$1, $2, ...` (PostgreSQL).
fn numbered(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 16);
    let mut n = 0;
    for c in sql.chars() {
        if c == '?' {
            n += 1;
            out.push('$');
            out.push_str(&n.to_string());
        } else {
            out.push(c);
        }
    }
    out
}

/// `?, ?, ...` for `n` values.
fn marks(n: usize) -> String {
    let mut s = String::with_capacity(n * 3);
    for i in 0..n {
        if i > 0 {
            s.push_str(", ");
        }
        s.push('?');
    }
    s
}

/// `error` without NUL characters (PostgreSQL refuses them in text: the marking would fail
/// each time) and cut to [`MAX_ERROR`] bytes at a character boundary.
fn clip(error: &str) -> String {
    let mut error = error.replace('\0', "");
    if error.len() > MAX_ERROR {
        let mut end = MAX_ERROR;
        while !error.is_char_boundary(end) {
            end -= 1;
        }
        error.truncate(end);
    }
    error
}

/// Decodes stored headers; a damaged value becomes one header saying so, and the row is
/// still published.
fn headers(json: &str) -> BTreeMap<String, String> {
    serde_json::from_str(json)
        .unwrap_or_else(|e| BTreeMap::from([("txmq-headers-error".to_string(), e.to_string())]))
}

type RawRow = (
    i64,
    String,
    String,
    Option<String>,
    String,
    Vec<u8>,
    i64,
    i64,
);

fn row((seq, id, destination, key, hdrs, payload, attempts, created): RawRow) -> OutboxRow {
    OutboxRow {
        seq,
        id,
        destination,
        key,
        headers: headers(&hdrs),
        payload,
        attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
        created_at_ms: created,
    }
}

const COLUMNS: &str = "seq, id, destination, msg_key, headers, payload, attempts, created_at";

/// The due-row predicate on alias `o`; binds: now, now.
const DUE: &str = "o.status = 'P' AND o.next_attempt_at <= ? AND o.claimed_until <= ?
    AND (o.ordered = 0 OR o.msg_key IS NULL OR NOT EXISTS (
        SELECT 1 FROM txmq_outbox e
        WHERE e.msg_key = o.msg_key AND e.seq < o.seq AND e.status <> 'D'))";

const INSERT: &str = "INSERT INTO txmq_outbox (id, destination, msg_key, ordered, headers, payload,
    status, attempts, next_attempt_at, claimed_by, claimed_until, created_at)
    VALUES (?, ?, ?, ?, ?, ?, 'P', 0, ?, ?, ?, ?)";

/// Binds: max attempts, error, next attempt (twice), seq. The next attempt never moves
/// earlier: a row is not retried before its `not_before`.
const FAIL: &str = "UPDATE txmq_outbox SET
    status = CASE WHEN attempts + 1 >= ? THEN 'X' ELSE 'P' END,
    attempts = attempts + 1, last_error = ?,
    next_attempt_at = CASE WHEN next_attempt_at > ? THEN next_attempt_at ELSE ? END,
    claimed_by = NULL, claimed_until = 0
    WHERE seq = ? AND status = 'P'";

/// What the marks add for a lease's `holder` (bound last).
fn held_by(holder: Option<&str>) -> &'static str {
    if holder.is_some() {
        " AND claimed_by = ?"
    } else {
        ""
    }
}

const LIST: &str = "SELECT seq, id, destination, msg_key, attempts, last_error, created_at
    FROM txmq_outbox WHERE status = ? ORDER BY seq LIMIT ?";

const REDRIVE: &str = "UPDATE txmq_outbox SET status = 'P', attempts = 0, next_attempt_at = ?,
    claimed_by = NULL, claimed_until = 0, last_error = NULL WHERE status = 'X'";

const STATS: &str = "SELECT
    COUNT(CASE WHEN status = 'P' THEN 1 END),
    COUNT(CASE WHEN status = 'P' AND attempts > 0 THEN 1 END),
    MIN(CASE WHEN status = 'P' THEN created_at END),
    COUNT(CASE WHEN status = 'X' THEN 1 END)
    FROM txmq_outbox WHERE status IN ('P', 'X')";

mod pg {
    /// Claims and cleanups walk the `(status, seq)` index in order and stop at their
    /// limit. Left to itself, the planner may instead fetch every row of the status and
    /// sort them (a bitmap scan), which costs as much as the backlog is long whenever the
    /// statistics lag behind a burst of inserts.
    pub const BEGIN_INDEX_ORDER: &str =
        "BEGIN; SET LOCAL enable_bitmapscan = off; SET LOCAL enable_sort = off";

    /// A claim's transaction: in index order, and idle while its batch is out, which a
    /// server-wide `idle_in_transaction_session_timeout` shorter than a publish must not
    /// end.
    pub const BEGIN_CLAIM: &str = "BEGIN; SET LOCAL enable_bitmapscan = off; \
        SET LOCAL enable_sort = off; SET LOCAL idle_in_transaction_session_timeout = 0";

    pub const DDL: &[&str] = &[
        "CREATE TABLE IF NOT EXISTS txmq_outbox (
            seq BIGSERIAL PRIMARY KEY,
            id VARCHAR(128) NOT NULL UNIQUE,
            destination VARCHAR(255) NOT NULL,
            msg_key VARCHAR(255),
            ordered SMALLINT NOT NULL DEFAULT 0,
            headers TEXT NOT NULL,
            payload BYTEA NOT NULL,
            status VARCHAR(1) NOT NULL,
            attempts BIGINT NOT NULL DEFAULT 0,
            next_attempt_at BIGINT NOT NULL,
            claimed_by VARCHAR(64),
            claimed_until BIGINT NOT NULL DEFAULT 0,
            last_error TEXT,
            created_at BIGINT NOT NULL,
            delivered_at BIGINT)",
        "CREATE INDEX IF NOT EXISTS txmq_outbox_status_seq ON txmq_outbox (status, seq)",
        "CREATE INDEX IF NOT EXISTS txmq_outbox_key_seq ON txmq_outbox (msg_key, seq)
            WHERE msg_key IS NOT NULL",
    ];

    /// One notification per inserting statement, on a channel per schema; PostgreSQL folds
    /// repeats within a transaction and delivers them at commit. A notifying commit takes
    /// a database-wide lock until it ends, so notifying transactions commit one at a time.
    pub const NOTIFY: &[&str] = &[
        "CREATE OR REPLACE FUNCTION txmq_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS
            $$ BEGIN PERFORM pg_notify('txmq_outbox.' || TG_TABLE_SCHEMA, ''); RETURN NULL; END $$",
        "CREATE OR REPLACE TRIGGER txmq_outbox_notify AFTER INSERT ON txmq_outbox
            FOR EACH STATEMENT EXECUTE FUNCTION txmq_outbox_notify()",
    ];

    pub const NO_NOTIFY: &[&str] = &["DROP TRIGGER IF EXISTS txmq_outbox_notify ON txmq_outbox"];
}

mod mysql {
    // Indexes inline: MySQL has no CREATE INDEX IF NOT EXISTS. The character set and
    // collation are the table's own, not the database's defaults (often latin1, or
    // case-insensitive): any Unicode text fits, and ids, keys and destinations match byte
    // for byte, as on PostgreSQL and SQLite.
    pub const DDL: &[&str] = &["CREATE TABLE IF NOT EXISTS txmq_outbox (
            seq BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
            id VARCHAR(128) NOT NULL,
            destination VARCHAR(255) NOT NULL,
            msg_key VARCHAR(255),
            ordered SMALLINT NOT NULL DEFAULT 0,
            headers LONGTEXT NOT NULL,
            payload LONGBLOB NOT NULL,
            status VARCHAR(1) NOT NULL,
            attempts BIGINT NOT NULL DEFAULT 0,
            next_attempt_at BIGINT NOT NULL,
            claimed_by VARCHAR(64),
            claimed_until BIGINT NOT NULL DEFAULT 0,
            last_error TEXT,
            created_at BIGINT NOT NULL,
            delivered_at BIGINT,
            UNIQUE KEY txmq_outbox_id (id),
            KEY txmq_outbox_status_seq (status, seq),
            KEY txmq_outbox_key_seq (msg_key, seq))
        ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin"];

    // The server flags a text column of a binary collation as binary, and sqlx then
    // refuses to decode it as a `String`: text columns are read converted, which gives
    // them the character set's default collation (whatever the table's, so tables made
    // before it had its own collation read the same).

    /// [`COLUMNS`](super::COLUMNS), decodable.
    pub const COLUMNS: &str = "seq, CONVERT(id USING utf8mb4),
        CONVERT(destination USING utf8mb4), CONVERT(msg_key USING utf8mb4),
        CONVERT(headers USING utf8mb4), payload, attempts, created_at";

    /// [`LIST`](super::LIST), decodable.
    pub const LIST: &str = "SELECT seq, CONVERT(id USING utf8mb4),
        CONVERT(destination USING utf8mb4), CONVERT(msg_key USING utf8mb4), attempts,
        CONVERT(last_error USING utf8mb4), created_at
        FROM txmq_outbox WHERE status = ? ORDER BY seq LIMIT ?";

    /// Claims and cleanups read committed rows and lock only the rows they take (no gap
    /// locks that would hold up inserts). `SET TRANSACTION` applies to the next
    /// transaction only.
    pub const BEGIN_READ_COMMITTED: &str =
        "SET TRANSACTION ISOLATION LEVEL READ COMMITTED; START TRANSACTION";
}

mod sqlite {
    pub const DDL: &[&str] = &[
        "CREATE TABLE IF NOT EXISTS txmq_outbox (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            id TEXT NOT NULL UNIQUE,
            destination TEXT NOT NULL,
            msg_key TEXT,
            ordered INTEGER NOT NULL DEFAULT 0,
            headers TEXT NOT NULL,
            payload BLOB NOT NULL,
            status TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            next_attempt_at INTEGER NOT NULL,
            claimed_by TEXT,
            claimed_until INTEGER NOT NULL DEFAULT 0,
            last_error TEXT,
            created_at INTEGER NOT NULL,
            delivered_at INTEGER)",
        "CREATE INDEX IF NOT EXISTS txmq_outbox_status_seq ON txmq_outbox (status, seq)",
        "CREATE INDEX IF NOT EXISTS txmq_outbox_key_seq ON txmq_outbox (msg_key, seq)
            WHERE msg_key IS NOT NULL",
    ];
}

/// The statements every database shares, written against one driver's concrete types.
macro_rules! common {
    ($sql:expr, $list:expr) => {
        async fn list(
            pool: &Pool<Self>,
            status: &str,
            limit: i64,
        ) -> Result<Vec<RowSummary>, sqlx::Error> {
            let rows: Vec<(
                i64,
                String,
                String,
                Option<String>,
                i64,
                Option<String>,
                i64,
            )> = sqlx::query_as(&$sql(&$list))
                .bind(status)
                .bind(limit)
                .fetch_all(pool)
                .await?;
            Ok(rows
                .into_iter()
                .map(
                    |(seq, id, destination, key, attempts, last_error, created_at_ms)| RowSummary {
                        seq,
                        id,
                        destination,
                        key,
                        attempts,
                        last_error,
                        created_at_ms,
                    },
                )
                .collect())
        }

        async fn redrive(
            pool: &Pool<Self>,
            ids: Option<&[String]>,
            now: i64,
        ) -> Result<u64, sqlx::Error> {
            let sql = match ids {
                None => REDRIVE.to_string(),
                Some([]) => return Ok(0),
                Some(ids) => format!("{REDRIVE} AND id IN ({})", marks(ids.len())),
            };
            let sql = $sql(&sql);
            let mut q = sqlx::query(&sql).bind(now);
            for id in ids.unwrap_or_default() {
                q = q.bind(id);
            }
            Ok(q.execute(pool).await?.rows_affected())
        }

        async fn drop_dead(pool: &Pool<Self>, ids: &[String]) -> Result<u64, sqlx::Error> {
            if ids.is_empty() {
                return Ok(0);
            }
            let sql = $sql(&format!(
                "DELETE FROM txmq_outbox WHERE status = 'X' AND id IN ({})",
                marks(ids.len())
            ));
            let mut q = sqlx::query(&sql);
            for id in ids {
                q = q.bind(id);
            }
            Ok(q.execute(pool).await?.rows_affected())
        }

        async fn stats(pool: &Pool<Self>) -> Result<TableStats, sqlx::Error> {
            let (pending, retrying, oldest, dead): (i64, i64, Option<i64>, i64) =
                sqlx::query_as(STATS).fetch_one(pool).await?;
            Ok(TableStats {
                pending,
                retrying,
                oldest_pending_ms: oldest,
                dead,
            })
        }
    };
}

/// `$query` ([`INSERT`]'s statement) with the values of the new row `$r` bound in order.
macro_rules! bind_row {
    ($query:expr, $r:expr) => {
        $query
            .bind($r.id)
            .bind($r.destination)
            .bind($r.key)
            .bind(i16::from($r.ordered))
            .bind(&$r.headers)
            .bind($r.payload)
            .bind($r.next_attempt_at)
            .bind($r.claimed_by)
            .bind($r.claimed_until)
            .bind($r.created_at)
    };
}

/// Marks rows on `conn`: the delivered ones in one statement, the failed ones each; with
/// a `holder`, only the rows its lease still holds.
macro_rules! mark {
    ($conn:expr, $sql:expr, $holder:expr, $delivered:expr, $failed:expr, $now:expr, $max:expr) => {{
        if !$delivered.is_empty() {
            let sql = $sql(&format!(
                "UPDATE txmq_outbox SET status = 'D', delivered_at = ?, claimed_by = NULL,
                 claimed_until = 0 WHERE status = 'P' AND seq IN ({}){}",
                marks($delivered.len()),
                held_by($holder)
            ));
            let mut q = sqlx::query(&sql).bind($now);
            for seq in $delivered {
                q = q.bind(*seq);
            }
            if let Some(h) = $holder {
                q = q.bind(h);
            }
            q.execute(&mut *$conn).await?;
        }
        let fail = $sql(&format!("{FAIL}{}", held_by($holder)));
        for f in $failed {
            let mut q = sqlx::query(&fail)
                .bind(i64::from($max))
                .bind(clip(f.error))
                .bind(f.next_attempt_at)
                .bind(f.next_attempt_at)
                .bind(f.seq);
            if let Some(h) = $holder {
                q = q.bind(h);
            }
            q.execute(&mut *$conn).await?;
        }
        Ok::<(), sqlx::Error>(())
    }};
}

/// `finish` for the databases with `?` placeholders: the claim's transaction, or a new one.
macro_rules! finish_with_question_marks {
    () => {
        async fn finish(
            pool: &Pool<Self>,
            claimed: Option<sqlx::Transaction<'static, Self>>,
            holder: Option<&str>,
            delivered: &[i64],
            failed: &[Failure<'_>],
            now: i64,
            max_attempts: u32,
        ) -> Result<(), sqlx::Error> {
            let mut tx = match claimed {
                Some(tx) => tx,
                None => pool.begin().await?,
            };
            mark!(
                tx,
                |s: &str| s.to_string(),
                holder,
                delivered,
                failed,
                now,
                max_attempts
            )?;
            tx.commit().await
        }
    };
}

impl OutboxDb for Postgres {
    async fn migrate(pool: &Pool<Self>, notify: bool) -> Result<(), sqlx::Error> {
        // Serialised: concurrent CREATE OR REPLACE of one function or trigger can fail.
        let mut tx = pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(7370617291)")
            .execute(&mut *tx)
            .await?;
        let trigger = if notify { pg::NOTIFY } else { pg::NO_NOTIFY };
        for ddl in pg::DDL.iter().chain(trigger) {
            sqlx::query(ddl).execute(&mut *tx).await?;
        }
        tx.commit().await
    }

    async fn insert(conn: &mut sqlx::PgConnection, r: &NewRow<'_>) -> Result<i64, sqlx::Error> {
        bind_row!(
            sqlx::query_scalar(&numbered(&format!("{INSERT} RETURNING seq"))),
            r
        )
        .fetch_one(conn)
        .await
    }

    async fn claim(
        pool: &Pool<Self>,
        _worker: &str,
        now: i64,
        _lease_until: i64,
        limit: i64,
    ) -> Result<Claimed<Self>, sqlx::Error> {
        let mut tx = pool.begin_with(pg::BEGIN_CLAIM).await?;
        let sql = numbered(&format!(
            "SELECT {COLUMNS} FROM txmq_outbox o WHERE {DUE}
             ORDER BY o.seq LIMIT ? FOR UPDATE SKIP LOCKED"
        ));
        let rows: Vec<RawRow> = sqlx::query_as(&sql)
            .bind(now)
            .bind(now)
            .bind(limit)
            .fetch_all(&mut *tx)
            .await?;
        Ok(Claimed {
            tx: Some(tx),
            rows: rows.into_iter().map(row).collect(),
        })
    }

    async fn relock(pool: &Pool<Self>, seqs: &[i64]) -> Result<Relocked<Self>, sqlx::Error> {
        let mut tx = pool.begin_with(pg::BEGIN_INDEX_ORDER).await?;
        let held = sqlx::query_scalar(
            "SELECT seq FROM txmq_outbox WHERE seq = ANY($1) AND status = 'P'
             FOR UPDATE SKIP LOCKED",
        )
        .bind(seqs)
        .fetch_all(&mut *tx)
        .await?;
        Ok((Some(tx), held))
    }

    async fn finish(
        pool: &Pool<Self>,
        claimed: Option<sqlx::Transaction<'static, Self>>,
        holder: Option<&str>,
        delivered: &[i64],
        failed: &[Failure<'_>],
        now: i64,
        max_attempts: u32,
    ) -> Result<(), sqlx::Error> {
        let mut tx = match claimed {
            Some(tx) => tx,
            None => pool.begin_with(pg::BEGIN_INDEX_ORDER).await?,
        };
        if !delivered.is_empty() {
            // One statement for any number of rows, found through the index.
            let sql = numbered(&format!(
                "UPDATE txmq_outbox SET status = 'D', delivered_at = ?, claimed_by = NULL,
                 claimed_until = 0 WHERE status = 'P' AND seq = ANY(?){}",
                held_by(holder)
            ));
            let mut q = sqlx::query(&sql).bind(now).bind(delivered);
            if let Some(h) = holder {
                q = q.bind(h);
            }
            q.execute(&mut *tx).await?;
        }
        let none: &[i64] = &[];
        mark!(
            tx,
            |s: &str| numbered(s),
            holder,
            none,
            failed,
            now,
            max_attempts
        )?;
        tx.commit().await
    }

    async fn delete_delivered(
        pool: &Pool<Self>,
        cutoff: i64,
        limit: i64,
    ) -> Result<u64, sqlx::Error> {
        let mut tx = pool.begin_with(pg::BEGIN_INDEX_ORDER).await?;
        let r = sqlx::query(
            "DELETE FROM txmq_outbox WHERE seq IN (
                SELECT seq FROM txmq_outbox WHERE status = 'D' AND delivered_at < $1
                ORDER BY seq LIMIT $2 FOR UPDATE SKIP LOCKED)",
        )
        .bind(cutoff)
        .bind(limit)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(r.rows_affected())
    }

    common!(|s: &str| numbered(s), LIST);

    fn listen(pool: &Pool<Self>, wake: Arc<Notify>) -> Option<tokio::task::JoinHandle<()>> {
        let pool = pool.clone();
        Some(tokio::spawn(async move {
            loop {
                // The listening connection is one of its own, with the pool's settings as
                // they are now (they may change: rotated credentials), not one held from
                // the pool: that would leave the workers a connection short, and a pool of
                // one none at all.
                let own = sqlx::postgres::PgPoolOptions::new()
                    .max_connections(1)
                    .idle_timeout(None)
                    .max_lifetime(None)
                    .connect_lazy_with((*pool.connect_options()).clone());
                let mut listener = match sqlx::postgres::PgListener::connect_with(&own).await {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::warn!(error = %e, "relay: cannot LISTEN; polling until it can");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                };
                let channel = match sqlx::query_scalar::<_, String>("SELECT current_schema()")
                    .fetch_one(&pool)
                    .await
                {
                    Ok(schema) => format!("txmq_outbox.{schema}"),
                    Err(e) => {
                        tracing::warn!(error = %e, "relay: cannot LISTEN; polling until it can");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                };
                if let Err(e) = listener.listen(&channel).await {
                    tracing::warn!(error = %e, "relay: cannot LISTEN; polling until it can");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
                // Whatever was inserted while not listening is found now.
                wake.notify_waiters();
                loop {
                    match listener.try_recv().await {
                        Ok(Some(_)) => wake.notify_waiters(),
                        // The connection was lost; notifications in between are lost too.
                        Ok(None) => wake.notify_waiters(),
                        Err(e) => {
                            tracing::warn!(error = %e, "relay: LISTEN connection failed");
                            break;
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }))
    }
}

impl OutboxDb for MySql {
    async fn migrate(pool: &Pool<Self>, _notify: bool) -> Result<(), sqlx::Error> {
        for ddl in mysql::DDL {
            sqlx::query(ddl).execute(pool).await?;
        }
        Ok(())
    }

    async fn insert(conn: &mut sqlx::MySqlConnection, r: &NewRow<'_>) -> Result<i64, sqlx::Error> {
        let done = bind_row!(sqlx::query(INSERT), r).execute(conn).await?;
        Ok(i64::try_from(done.last_insert_id()).unwrap_or(i64::MAX))
    }

    async fn claim(
        pool: &Pool<Self>,
        _worker: &str,
        now: i64,
        _lease_until: i64,
        limit: i64,
    ) -> Result<Claimed<Self>, sqlx::Error> {
        let mut tx = pool.begin_with(mysql::BEGIN_READ_COMMITTED).await?;
        // Candidates first, by a plain read of the latest committed rows with the ordering
        // test: a locking read in MariaDB may also lock (and so skip) the rows its subquery
        // reads. Then the candidates not locked by other workers are locked, rechecked.
        // More candidates than the batch, so that concurrent workers find rows past each
        // other's.
        let candidates: Vec<i64> = sqlx::query_scalar(&format!(
            "SELECT o.seq FROM txmq_outbox o WHERE {DUE} ORDER BY o.seq LIMIT ?"
        ))
        .bind(now)
        .bind(now)
        .bind(limit.saturating_mul(4))
        .fetch_all(&mut *tx)
        .await?;
        if candidates.is_empty() {
            return Ok(Claimed {
                tx: Some(tx),
                rows: Vec::new(),
            });
        }
        let sql = format!(
            "SELECT {} FROM txmq_outbox o
             WHERE o.seq IN ({}) AND o.status = 'P' AND o.next_attempt_at <= ?
                AND o.claimed_until <= ?
             ORDER BY o.seq LIMIT ? FOR UPDATE SKIP LOCKED",
            mysql::COLUMNS,
            marks(candidates.len())
        );
        let mut q = sqlx::query_as::<_, RawRow>(&sql);
        for seq in &candidates {
            q = q.bind(*seq);
        }
        let rows: Vec<RawRow> = q
            .bind(now)
            .bind(now)
            .bind(limit)
            .fetch_all(&mut *tx)
            .await?;
        Ok(Claimed {
            tx: Some(tx),
            rows: rows.into_iter().map(row).collect(),
        })
    }

    async fn relock(pool: &Pool<Self>, seqs: &[i64]) -> Result<Relocked<Self>, sqlx::Error> {
        let mut tx = pool.begin_with(mysql::BEGIN_READ_COMMITTED).await?;
        let sql = format!(
            "SELECT seq FROM txmq_outbox WHERE seq IN ({}) AND status = 'P'
             FOR UPDATE SKIP LOCKED",
            marks(seqs.len())
        );
        let mut q = sqlx::query_scalar(&sql);
        for seq in seqs {
            q = q.bind(*seq);
        }
        let held = q.fetch_all(&mut *tx).await?;
        Ok((Some(tx), held))
    }

    finish_with_question_marks!();

    async fn delete_delivered(
        pool: &Pool<Self>,
        cutoff: i64,
        limit: i64,
    ) -> Result<u64, sqlx::Error> {
        let mut tx = pool.begin_with(mysql::BEGIN_READ_COMMITTED).await?;
        let r = sqlx::query(
            "DELETE FROM txmq_outbox WHERE status = 'D' AND delivered_at < ? ORDER BY seq LIMIT ?",
        )
        .bind(cutoff)
        .bind(limit)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(r.rows_affected())
    }

    common!(|s: &str| s.to_string(), mysql::LIST);
}

impl OutboxDb for Sqlite {
    const LEASED_CLAIMS: bool = true;

    async fn migrate(pool: &Pool<Self>, _notify: bool) -> Result<(), sqlx::Error> {
        for ddl in sqlite::DDL {
            sqlx::query(ddl).execute(pool).await?;
        }
        Ok(())
    }

    async fn insert(conn: &mut sqlx::SqliteConnection, r: &NewRow<'_>) -> Result<i64, sqlx::Error> {
        bind_row!(sqlx::query_scalar(&format!("{INSERT} RETURNING seq")), r)
            .fetch_one(conn)
            .await
    }

    async fn claim(
        pool: &Pool<Self>,
        worker: &str,
        now: i64,
        lease_until: i64,
        limit: i64,
    ) -> Result<Claimed<Self>, sqlx::Error> {
        let sql = format!(
            "UPDATE txmq_outbox SET claimed_by = ?, claimed_until = ?
             WHERE seq IN (SELECT o.seq FROM txmq_outbox o WHERE {DUE} ORDER BY o.seq LIMIT ?)
             RETURNING {COLUMNS}"
        );
        let mut rows: Vec<RawRow> = sqlx::query_as(&sql)
            .bind(worker)
            .bind(lease_until)
            .bind(now)
            .bind(now)
            .bind(limit)
            .fetch_all(pool)
            .await?;
        rows.sort_by_key(|r| r.0);
        Ok(Claimed {
            tx: None,
            rows: rows.into_iter().map(row).collect(),
        })
    }

    finish_with_question_marks!();

    async fn delete_delivered(
        pool: &Pool<Self>,
        cutoff: i64,
        limit: i64,
    ) -> Result<u64, sqlx::Error> {
        let r = sqlx::query(
            "DELETE FROM txmq_outbox WHERE seq IN (
                SELECT seq FROM txmq_outbox WHERE status = 'D' AND delivered_at < ?
                ORDER BY seq LIMIT ?)",
        )
        .bind(cutoff)
        .bind(limit)
        .execute(pool)
        .await?;
        Ok(r.rows_affected())
    }

    common!(|s: &str| s.to_string(), LIST);
}

#[cfg(test)]
mod tests {
    use super::{clip, marks, numbered};

    #[test]
    fn placeholders_are_numbered_for_postgres() {
        assert_eq!(
            numbered("a = ? AND b IN (?, ?)"),
            "a = $1 AND b IN ($2, $3)"
        );
        assert_eq!(marks(3), "?, ?, ?");
        assert_eq!(marks(0), "");
    }

    #[test]
    fn errors_are_clipped_at_a_character_boundary() {
        let long = "é".repeat(600);
        let c = clip(&long);
        assert!(c.len() <= 1000 && c.chars().all(|ch| ch == 'é'));
        assert_eq!(clip("short"), "short");
        assert_eq!(clip("nul\0 inside"), "nul inside");
    }
}
