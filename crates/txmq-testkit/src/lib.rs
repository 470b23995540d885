//! Scaffolding shared by txmq's integration tests.
//!
//! - [`down`]: what a test does when a service it needs is not running: it is skipped,
//!   except under `CI=true`, where it fails.
//! - [`unique`]: a fresh lowercase name (`prefix_<UUIDv7>`) for schemas, databases, queues,
//!   streams and keys.
//! - [`Scratch`] and [`ScratchDb`]: a scratch database on the local services (a schema in
//!   the PostgreSQL database `test`, a MariaDB database, a SQLite file in a temporary
//!   directory), with a pool on it and a URL for more pools and child processes.
//! - [`guarded`] and [`Scratch::run`]: run a test body in its own task, clean up also when
//!   it panics, then report its panic.
//!
//! The services: PostgreSQL at 127.0.0.1:5432 (user `postgres`, trust authentication,
//! database `test`) and MariaDB at 127.0.0.1:3306 (user `root`, no password).

#![warn(missing_docs)]

use std::fmt::Display;
use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use std::time::Duration;

use sqlx::{Database, MySql, Pool, Postgres, Sqlite};

/// A database server the scratch databases are made on, and how.
struct Server {
    /// The server and its address, in messages.
    what: &'static str,
    /// Where the administrator connects.
    admin_url: &'static str,
    /// What a scratch database is there: `SCHEMA` or `DATABASE`.
    kind: &'static str,
    /// What follows `DROP <kind> <name>`.
    drop_options: &'static str,
    /// A scratch database's URL is this and its name.
    url_prefix: &'static str,
}

/// Scratch schemas in the PostgreSQL database `test`.
const POSTGRES: Server = Server {
    what: "PostgreSQL at 127.0.0.1:5432",
    admin_url: "postgres://postgres@127.0.0.1:5432/test",
    kind: "SCHEMA",
    drop_options: " CASCADE",
    url_prefix: "postgres://postgres@127.0.0.1:5432/test?options=-c%20search_path%3D",
};

/// Scratch databases on MariaDB.
const MARIADB: Server = Server {
    what: "MariaDB at 127.0.0.1:3306",
    admin_url: "mysql://root@127.0.0.1:3306/test",
    kind: "DATABASE",
    drop_options: "",
    url_prefix: "mysql://root@127.0.0.1:3306/",
};

/// How long a scratch pool waits for a connection.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Whether the tests run under `CI=true`.
fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// A service the test needs is not reachable: prints that the test is skipped and returns
/// (the caller then returns early), except under `CI=true`, where it panics so that the
/// test fails.
///
/// `what` names the service and its address (`"Redis at 127.0.0.1:6379"`), `err` says why
/// it is not reachable.
pub fn down(what: &str, err: impl Display) {
    assert!(!ci(), "{what} is not reachable under CI=true: {err}");
    eprintln!("skipping: {what} is not reachable: {err}");
}

/// A unique lowercase name: `prefix`, `_` and a UUIDv7 without hyphens.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::now_v7().simple())
}

/// Runs `body` in its own task, then `cleanup` (also when `body` panicked), then resumes
/// `body`'s panic, if any.
///
/// # Panics
///
/// With `body`'s panic, or if its task was cancelled.
pub async fn guarded(
    body: impl Future<Output = ()> + Send + 'static,
    cleanup: impl Future<Output = ()>,
) {
    let outcome = tokio::spawn(body).await;
    cleanup.await;
    if let Err(e) = outcome {
        if e.is_panic() {
            std::panic::resume_unwind(e.into_panic());
        }
        panic!("the test task failed: {e}");
    }
}

/// A scratch database made for one test: a schema in the PostgreSQL database `test`, a
/// MariaDB database, or a SQLite file in a temporary directory.
///
/// Remove it with [`Scratch::drop`] (or [`Scratch::try_drop`]); [`Scratch::run`] does so
/// after the test body, also when the body panics.
pub struct Scratch<DB: Database> {
    /// A pool on the scratch database.
    pub pool: Pool<DB>,
    /// A URL that reaches the scratch database, for more pools and for child processes:
    /// `postgres://postgres@127.0.0.1:5432/test?options=-c%20search_path%3D<schema>`,
    /// `mysql://root@127.0.0.1:3306/<database>` or `sqlite://<file>`.
    pub url: String,
    /// The schema (PostgreSQL), the database (MariaDB) or the file's path (SQLite).
    pub name: String,
    /// Removes the database once [`Scratch::pool`] is closed.
    remove: BoxFuture<Result<(), sqlx::Error>>,
}

impl<DB: Database> Scratch<DB> {
    /// Closes [`Scratch::pool`] and removes the scratch database: `DROP SCHEMA ... CASCADE`
    /// (PostgreSQL), `DROP DATABASE` (MariaDB), or the temporary directory (SQLite).
    ///
    /// # Errors
    ///
    /// The error of the `DROP` statement.
    pub async fn try_drop(self) -> Result<(), sqlx::Error> {
        self.pool.close().await;
        self.remove.await
    }

    /// Closes [`Scratch::pool`] and removes the scratch database, like
    /// [`Scratch::try_drop`].
    ///
    /// # Panics
    ///
    /// If the database cannot be removed.
    pub async fn drop(self) {
        let name = self.name.clone();
        if let Err(e) = self.try_drop().await {
            panic!("cannot drop the scratch database {name}: {e}");
        }
    }

    /// Runs `body` on a clone of [`Scratch::pool`] in its own task, then drops the scratch
    /// database (also when `body` panicked), then resumes `body`'s panic, if any.
    ///
    /// # Panics
    ///
    /// With `body`'s panic, if its task was cancelled, or if the database cannot be
    /// removed.
    pub async fn run<F, Fut>(self, body: F)
    where
        F: FnOnce(Pool<DB>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let body = body(self.pool.clone());
        guarded(body, self.drop()).await;
    }
}

/// A database the tests can make scratch databases on: PostgreSQL, MariaDB (MySQL driver)
/// or SQLite.
pub trait ScratchDb: Database {
    /// The database's name in messages: `PostgreSQL`, `MariaDB` or `SQLite`.
    const LABEL: &'static str;

    /// A fresh scratch database named [`unique`]`(prefix)` (SQLite: the file
    /// `<prefix>.db` in a fresh temporary directory) with a pool of at most
    /// `max_connections` on it, or `None` when the server is not reachable (see [`down`]:
    /// under `CI=true` it panics instead).
    fn scratch(
        prefix: &str,
        max_connections: u32,
    ) -> impl Future<Output = Option<Scratch<Self>>> + Send;

    /// Another pool of at most `max_connections` on the database at `url` (such as
    /// [`Scratch::url`]). SQLite files are created if missing and opened in WAL mode with
    /// a busy timeout of 10 s.
    ///
    /// # Panics
    ///
    /// If it cannot connect.
    fn connect(url: &str, max_connections: u32) -> impl Future<Output = Pool<Self>> + Send;
}

/// A pool of at most two administrator connections on `url`, or `None` (see [`down`]) when
/// `what` is not reachable.
async fn admin<DB: Database>(url: &str, what: &str) -> Option<Pool<DB>> {
    match sqlx::pool::PoolOptions::<DB>::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(5))
        .connect(url)
        .await
    {
        Ok(pool) => Some(pool),
        Err(e) => {
            down(what, e);
            None
        }
    }
}

/// A pool of at most `max_connections` on `url`.
async fn connect_server<DB: Database>(url: &str, max_connections: u32) -> Pool<DB> {
    sqlx::pool::PoolOptions::<DB>::new()
        .max_connections(max_connections)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .connect(url)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"))
}

/// A scratch database on `server` (see [`ScratchDb::scratch`]).
async fn on_server<DB>(server: &Server, prefix: &str, max_connections: u32) -> Option<Scratch<DB>>
where
    DB: ScratchDb,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
{
    let admin = admin::<DB>(server.admin_url, server.what).await?;
    let (kind, name) = (server.kind, unique(prefix));
    sqlx::query(&format!("CREATE {kind} {name}"))
        .execute(&admin)
        .await
        .unwrap_or_else(|e| panic!("cannot create {kind} {name}: {e}"));
    let url = format!("{}{name}", server.url_prefix);
    let pool = DB::connect(&url, max_connections).await;
    let sql = format!("DROP {kind} {name}{}", server.drop_options);
    Some(Scratch {
        pool,
        url,
        name,
        remove: Box::pin(async move {
            let dropped = sqlx::query(&sql).execute(&admin).await.map(drop);
            admin.close().await;
            dropped
        }),
    })
}

impl ScratchDb for Postgres {
    const LABEL: &'static str = "PostgreSQL";

    async fn scratch(prefix: &str, max_connections: u32) -> Option<Scratch<Self>> {
        on_server(&POSTGRES, prefix, max_connections).await
    }

    async fn connect(url: &str, max_connections: u32) -> Pool<Self> {
        connect_server(url, max_connections).await
    }
}

impl ScratchDb for MySql {
    const LABEL: &'static str = "MariaDB";

    async fn scratch(prefix: &str, max_connections: u32) -> Option<Scratch<Self>> {
        on_server(&MARIADB, prefix, max_connections).await
    }

    async fn connect(url: &str, max_connections: u32) -> Pool<Self> {
        connect_server(url, max_connections).await
    }
}

impl ScratchDb for Sqlite {
    const LABEL: &'static str = "SQLite";

    async fn scratch(prefix: &str, max_connections: u32) -> Option<Scratch<Self>> {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let file = dir.path().join(format!("{prefix}.db"));
        let url = format!("sqlite://{}", file.display());
        let pool = Self::connect(&url, max_connections).await;
        Some(Scratch {
            pool,
            url,
            name: file.display().to_string(),
            remove: Box::pin(async move {
                drop(dir);
                Ok(())
            }),
        })
    }

    async fn connect(url: &str, max_connections: u32) -> Pool<Self> {
        let options = sqlx::sqlite::SqliteConnectOptions::from_str(url)
            .unwrap_or_else(|e| panic!("not a SQLite URL: {url}: {e}"))
            .create_if_missing(true)
            .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(10));
        sqlx::sqlite::SqlitePoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await
            .unwrap_or_else(|e| panic!("cannot open {url}: {e}"))
    }
}
