//! The shop's tables and statements on each database: orders, stock, shipments.
//!
//! The statements are the same on PostgreSQL, MariaDB and SQLite except for placeholders
//! (`$1` on PostgreSQL, `?` elsewhere); one macro writes them against each driver.

use std::future::Future;
use std::str::FromStr;
use std::time::Duration;

use sqlx::{MySql, Pool, Postgres, Sqlite};
use txmq_client::db::{BoxFuture, DbTransaction, Dialect};

/// Order states.
pub const NEW: &str = "NEW";
/// The order was paid (its "order paid" message was sent transactionally).
pub const PAID: &str = "PAID";

/// Why an order could not be paid; the payment's database transaction rolls back.
#[derive(Debug, thiserror::Error)]
pub enum PayError {
    /// Not enough stock for the order.
    #[error("out of stock: {sku} has fewer than {qty} left")]
    OutOfStock {
        /// The product.
        sku: String,
        /// How many the order wants.
        qty: i64,
    },
    /// The order does not exist or is not new.
    #[error("order {0} is not a new order")]
    NotPayable(String),
    /// A database error.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// One order as the final report shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderRow {
    /// The order id.
    pub id: String,
    /// The product.
    pub sku: String,
    /// How many.
    pub qty: i64,
    /// `NEW` or `PAID`.
    pub status: String,
    /// How many shipments logistics created for it.
    pub shipments: i64,
}

/// A database the shop runs on.
pub trait Shop: Dialect {
    /// A pool on `url`; SQLite files are created if missing and use WAL, so that the
    /// payer, logistics and the demo itself can write the same file.
    fn connect(url: &str) -> impl Future<Output = Result<Pool<Self>, sqlx::Error>> + Send;

    /// Creates the shop's tables if missing.
    fn setup(pool: &Pool<Self>) -> impl Future<Output = Result<(), sqlx::Error>> + Send;

    /// Sets the stock of `sku` to `available`.
    fn restock(
        pool: &Pool<Self>,
        sku: &str,
        available: i64,
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send;

    /// Places a new order.
    fn place(
        pool: &Pool<Self>,
        id: &str,
        sku: &str,
        qty: i64,
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send;

    /// Pays an order on `tx`: marks it paid and takes its items from stock.
    fn pay<'c>(
        tx: &'c mut DbTransaction<Self>,
        order_id: String,
    ) -> BoxFuture<'c, Result<(), PayError>>;

    /// Creates a shipment of an order on `tx`.
    fn ship<'c>(
        tx: &'c mut DbTransaction<Self>,
        order_id: String,
        message_id: String,
    ) -> BoxFuture<'c, Result<(), sqlx::Error>>;

    /// The orders whose id starts with `prefix`, with their shipment counts.
    fn orders(
        pool: &Pool<Self>,
        prefix: &str,
    ) -> impl Future<Output = Result<Vec<OrderRow>, sqlx::Error>> + Send;

    /// What is left of `sku`.
    fn stock(pool: &Pool<Self>, sku: &str)
    -> impl Future<Output = Result<i64, sqlx::Error>> + Send;
}

/// `sql` with `?` placeholders numbered `$1, $2, ...` for PostgreSQL.
fn numbered(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 8);
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

const TABLES: [&str; 3] = [
    "CREATE TABLE IF NOT EXISTS demo_stock (
        sku VARCHAR(64) PRIMARY KEY,
        available BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS demo_orders (
        id VARCHAR(64) PRIMARY KEY,
        sku VARCHAR(64) NOT NULL,
        qty BIGINT NOT NULL,
        status VARCHAR(8) NOT NULL)",
    // No unique key on order_id: one shipment per paid order is the inbox's doing, and the
    // report counts them.
    "CREATE TABLE IF NOT EXISTS demo_shipments (
        id VARCHAR(64) PRIMARY KEY,
        order_id VARCHAR(64) NOT NULL,
        message_id VARCHAR(128) NOT NULL)",
];

macro_rules! shop {
    ($db:ty, $sql:expr, $connect:expr) => {
        impl Shop for $db {
            async fn connect(url: &str) -> Result<Pool<Self>, sqlx::Error> {
                $connect(url).await
            }

            async fn setup(pool: &Pool<Self>) -> Result<(), sqlx::Error> {
                for ddl in TABLES {
                    sqlx::query(ddl).execute(pool).await?;
                }
                Ok(())
            }

            async fn restock(
                pool: &Pool<Self>,
                sku: &str,
                available: i64,
            ) -> Result<(), sqlx::Error> {
                let mut tx = pool.begin().await?;
                sqlx::query(&$sql("DELETE FROM demo_stock WHERE sku = ?"))
                    .bind(sku)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(&$sql(
                    "INSERT INTO demo_stock (sku, available) VALUES (?, ?)",
                ))
                .bind(sku)
                .bind(available)
                .execute(&mut *tx)
                .await?;
                tx.commit().await
            }

            async fn place(
                pool: &Pool<Self>,
                id: &str,
                sku: &str,
                qty: i64,
            ) -> Result<(), sqlx::Error> {
                sqlx::query(&$sql(
                    "INSERT INTO demo_orders (id, sku, qty, status) VALUES (?, ?, ?, ?)",
                ))
                .bind(id)
                .bind(sku)
                .bind(qty)
                .bind(NEW)
                .execute(pool)
                .await
                .map(drop)
            }

            fn pay<'c>(
                tx: &'c mut DbTransaction<Self>,
                order_id: String,
            ) -> BoxFuture<'c, Result<(), PayError>> {
                Box::pin(async move {
                    let paid = sqlx::query(&$sql(
                        "UPDATE demo_orders SET status = ? WHERE id = ? AND status = ?",
                    ))
                    .bind(PAID)
                    .bind(&order_id)
                    .bind(NEW)
                    .execute(&mut **tx)
                    .await?;
                    if paid.rows_affected() != 1 {
                        return Err(PayError::NotPayable(order_id));
                    }
                    let (sku, qty): (String, i64) =
                        sqlx::query_as(&$sql("SELECT sku, qty FROM demo_orders WHERE id = ?"))
                            .bind(&order_id)
                            .fetch_one(&mut **tx)
                            .await?;
                    let taken = sqlx::query(&$sql(
                        "UPDATE demo_stock SET available = available - ?
                         WHERE sku = ? AND available >= ?",
                    ))
                    .bind(qty)
                    .bind(&sku)
                    .bind(qty)
                    .execute(&mut **tx)
                    .await?;
                    if taken.rows_affected() != 1 {
                        return Err(PayError::OutOfStock { sku, qty });
                    }
                    Ok(())
                })
            }

            fn ship<'c>(
                tx: &'c mut DbTransaction<Self>,
                order_id: String,
                message_id: String,
            ) -> BoxFuture<'c, Result<(), sqlx::Error>> {
                Box::pin(async move {
                    sqlx::query(&$sql(
                        "INSERT INTO demo_shipments (id, order_id, message_id) VALUES (?, ?, ?)",
                    ))
                    .bind(uuid::Uuid::now_v7().simple().to_string())
                    .bind(order_id)
                    .bind(message_id)
                    .execute(&mut **tx)
                    .await
                    .map(drop)
                })
            }

            async fn orders(pool: &Pool<Self>, prefix: &str) -> Result<Vec<OrderRow>, sqlx::Error> {
                let rows: Vec<(String, String, i64, String, i64)> = sqlx::query_as(&$sql(
                    "SELECT o.id, o.sku, o.qty, o.status,
                        (SELECT COUNT(*) FROM demo_shipments s WHERE s.order_id = o.id)
                     FROM demo_orders o WHERE o.id LIKE ? ORDER BY o.id",
                ))
                .bind(format!("{prefix}%"))
                .fetch_all(pool)
                .await?;
                Ok(rows
                    .into_iter()
                    .map(|(id, sku, qty, status, shipments)| OrderRow {
                        id,
                        sku,
                        qty,
                        status,
                        shipments,
                    })
                    .collect())
            }

            async fn stock(pool: &Pool<Self>, sku: &str) -> Result<i64, sqlx::Error> {
                sqlx::query_scalar(&$sql("SELECT available FROM demo_stock WHERE sku = ?"))
                    .bind(sku)
                    .fetch_one(pool)
                    .await
            }
        }
    };
}

shop!(Postgres, numbered, connect_server::<Postgres>);
shop!(MySql, str::to_string, connect_server::<MySql>);
shop!(Sqlite, str::to_string, connect_sqlite);

/// Pool settings of every database.
fn pool_options<DB: sqlx::Database>() -> sqlx::pool::PoolOptions<DB> {
    sqlx::pool::PoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(15))
}

/// A pool on a PostgreSQL or MariaDB/MySQL `url`.
async fn connect_server<DB: sqlx::Database>(url: &str) -> Result<Pool<DB>, sqlx::Error> {
    pool_options::<DB>().connect(url).await
}

/// A pool on a SQLite `url`: the file is created if missing, in WAL mode so that readers
/// do not block the writer, with a busy timeout long enough for the other processes'
/// transactions.
async fn connect_sqlite(url: &str) -> Result<Pool<Sqlite>, sqlx::Error> {
    let options = sqlx::sqlite::SqliteConnectOptions::from_str(url)?
        .create_if_missing(true)
        .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
        .busy_timeout(Duration::from_secs(15));
    pool_options::<Sqlite>().connect_with(options).await
}
