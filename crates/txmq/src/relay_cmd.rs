//! `txmq relay` and `txmq outbox`: the outbox relay as a process, and the outbox table's
//! operations (migrate, stats, dead rows).

use std::net::SocketAddr;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Deserialize;
use sqlx::{MySql, Pool, Postgres, Sqlite};
use txmq_outbox::{OutboxDb, Relay, RelayConfig, RetryPolicy};

use crate::cli::{DeadCommand, OutboxCommand, RelayArgs};

/// The database kinds a URL can name.
enum Db {
    Postgres,
    MySql,
    Sqlite,
}

fn db_kind(url: &str) -> anyhow::Result<Db> {
    match url.split(':').next().unwrap_or_default() {
        "postgres" | "postgresql" => Ok(Db::Postgres),
        "mysql" | "mariadb" => Ok(Db::MySql),
        "sqlite" => Ok(Db::Sqlite),
        _ => bail!(
            "unsupported database URL {url:?}: use postgres://..., mysql://... or sqlite://FILE"
        ),
    }
}

/// Runs `$body` with `$pool` bound to a pool of the database `$url` names.
macro_rules! with_pool {
    ($url:expr, $workers:expr, |$pool:ident| $body:expr) => {
        match db_kind($url)? {
            Db::Postgres => {
                let options = sqlx::postgres::PgConnectOptions::from_str($url)
                    .with_context(|| format!("bad PostgreSQL URL {:?}", $url))?
                    .application_name("txmq-relay");
                let $pool: Pool<Postgres> = pool_options($workers)
                    .connect_with(options)
                    .await
                    .with_context(|| {
                        format!(
                            "cannot connect to PostgreSQL at {}",
                            txmq_outbox::sink::redact_url($url, false)
                        )
                    })?;
                $body
            }
            Db::MySql => {
                let $pool: Pool<MySql> =
                    pool_options($workers)
                        .connect($url)
                        .await
                        .with_context(|| {
                            format!(
                                "cannot connect to MySQL at {}",
                                txmq_outbox::sink::redact_url($url, false)
                            )
                        })?;
                $body
            }
            Db::Sqlite => {
                let options = sqlx::sqlite::SqliteConnectOptions::from_str($url)
                    .with_context(|| format!("bad SQLite URL {:?}", $url))?
                    .create_if_missing(true)
                    .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
                    .busy_timeout(Duration::from_secs(10));
                let $pool: Pool<Sqlite> = pool_options($workers)
                    .connect_with(options)
                    .await
                    .with_context(|| format!("cannot open SQLite database {}", $url))?;
                $body
            }
        }
    };
}

fn pool_options<DB: sqlx::Database>(workers: usize) -> sqlx::pool::PoolOptions<DB> {
    // One connection per worker, one for cleanup, one for metrics; the listener has its own.
    sqlx::pool::PoolOptions::new()
        .max_connections(u32::try_from(workers).unwrap_or(64).saturating_add(2))
        .acquire_timeout(Duration::from_secs(10))
}

/// Settings of `txmq relay --config FILE` (TOML); flags override them.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RelayFile {
    db: Option<String>,
    sink: Option<String>,
    http: Option<String>,
    batch_size: Option<usize>,
    workers: Option<usize>,
    poll_interval_ms: Option<u64>,
    lease_ms: Option<u64>,
    publish_timeout_ms: Option<u64>,
    max_attempts: Option<u32>,
    backoff_initial_ms: Option<u64>,
    backoff_max_ms: Option<u64>,
    /// 0 keeps delivered rows.
    keep_delivered_secs: Option<u64>,
    cleanup_interval_ms: Option<u64>,
    listen: Option<bool>,
}

fn read_file(path: &Path) -> anyhow::Result<RelayFile> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("bad relay configuration in {}", path.display()))
}

/// The relay's settings from the file and the flags.
fn settings(args: &RelayArgs) -> anyhow::Result<(String, String, Option<SocketAddr>, RelayConfig)> {
    let file = match &args.config {
        Some(p) => read_file(p)?,
        None => RelayFile::default(),
    };
    let db = args
        .db
        .clone()
        .or(file.db)
        .context("no database: give --db URL or `db` in the configuration file")?;
    let sink = args
        .sink
        .clone()
        .or(file.sink)
        .context("no sink: give --sink URL or `sink` in the configuration file")?;
    let http = match args.http.clone().or(file.http) {
        Some(a) => Some(
            a.parse::<SocketAddr>()
                .with_context(|| format!("bad --http address {a:?}"))?,
        ),
        None => None,
    };
    let mut c = RelayConfig::default();
    let ms = Duration::from_millis;
    if let Some(v) = args.batch_size.or(file.batch_size) {
        c.batch_size = v;
    }
    if let Some(v) = args.workers.or(file.workers) {
        c.workers = v;
    }
    if let Some(v) = file.poll_interval_ms {
        c.poll_interval = ms(v);
    }
    if let Some(v) = file.lease_ms {
        c.lease = ms(v);
    }
    if let Some(v) = file.publish_timeout_ms {
        c.publish_timeout = ms(v);
    }
    let mut retry = RetryPolicy::default();
    if let Some(v) = args.max_attempts.or(file.max_attempts) {
        retry.max_attempts = v;
    }
    if let Some(v) = file.backoff_initial_ms {
        retry.initial = ms(v);
    }
    if let Some(v) = file.backoff_max_ms {
        retry.max = ms(v);
    }
    c.retry = retry;
    if let Some(v) = file.keep_delivered_secs {
        c.keep_delivered = (v > 0).then(|| Duration::from_secs(v));
    }
    if let Some(v) = file.cleanup_interval_ms {
        c.cleanup_interval = ms(v);
    }
    if let Some(v) = file.listen {
        c.listen = v;
    }
    if c.batch_size == 0 || c.workers == 0 || c.retry.max_attempts == 0 {
        bail!("batch size, workers and max attempts must be at least 1");
    }
    for (name, wait) in [
        ("backoff_initial_ms", c.retry.initial),
        ("backoff_max_ms", c.retry.max),
    ] {
        if wait.is_zero() {
            bail!("{name} must be at least 1: a failing row would be retried back to back");
        }
    }
    if db.starts_with("sqlite:") && c.publish_timeout >= c.lease {
        bail!("the publish timeout must be shorter than the lease (lease_ms) on SQLite");
    }
    Ok((db, sink, http, c))
}

/// `txmq relay`.
///
/// # Errors
/// Bad settings, or the database or sink cannot be reached at start.
pub fn relay(args: &RelayArgs) -> anyhow::Result<()> {
    let (db, sink_url, http, config) = settings(args)?;
    let runtime = tokio::runtime::Runtime::new().context("cannot start the runtime")?;
    runtime.block_on(async move {
        with_pool!(&db, config.workers, |pool| run_relay(
            pool, &sink_url, http, config
        )
        .await)
    })
}

async fn run_relay<DB: OutboxDb>(
    pool: Pool<DB>,
    sink_url: &str,
    http: Option<SocketAddr>,
    config: RelayConfig,
) -> anyhow::Result<()> {
    // Without LISTEN the insert trigger is dropped too: it would only cost commits.
    txmq_outbox::migrate_with_notify(&pool, config.listen)
        .await
        .context("cannot create the outbox table")?;
    let sink = txmq_outbox::sink::connect(sink_url)
        .await
        .with_context(|| {
            format!(
                "cannot connect the sink {}",
                txmq_outbox::sink::redact_url(sink_url, false)
            )
        })?;
    let relay = Relay::new(pool.clone(), sink, config)?;
    let metrics = relay.metrics();
    let server = match http {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr}"))?;
            let addr = listener.local_addr().context("no local address")?;
            tracing::info!(%addr, "relay metrics at http://{addr}/metrics");
            let app = metrics_router(pool, metrics);
            Some(tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, app).await {
                    tracing::error!(error = %e, "metrics server failed");
                }
            }))
        }
        None => None,
    };
    relay.run(shutdown_signal()).await;
    if let Some(s) = server {
        s.abort();
    }
    Ok(())
}

/// `/metrics` (Prometheus text) and `/healthz`.
fn metrics_router<DB: OutboxDb>(
    pool: Pool<DB>,
    metrics: Arc<txmq_outbox::Metrics>,
) -> axum::Router {
    use axum::routing::get;
    axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let (pool, metrics) = (pool.clone(), metrics.clone());
                async move {
                    let stats = txmq_outbox::stats(&pool).await;
                    if let Err(e) = &stats {
                        tracing::warn!(error = %e, "metrics: cannot read the outbox table");
                    }
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
                    (
                        [("content-type", "text/plain; version=0.0.4")],
                        metrics.render(stats.ok().as_ref(), now),
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch SIGTERM");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("stopping: finishing the batches in flight");
}

/// `txmq outbox ...`.
///
/// # Errors
/// The database cannot be reached, or its error.
pub fn outbox(cmd: &OutboxCommand) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("cannot start the runtime")?;
    runtime.block_on(async move {
        let url = match cmd {
            OutboxCommand::Migrate { db } | OutboxCommand::Stats { db, .. } => db,
            OutboxCommand::Dead(d) => match d {
                DeadCommand::List { db, .. }
                | DeadCommand::Redrive { db, .. }
                | DeadCommand::Drop { db, .. } => db,
            },
        };
        with_pool!(url, 1, |pool| table_command(&pool, cmd).await)
    })
}

async fn table_command<DB: OutboxDb>(pool: &Pool<DB>, cmd: &OutboxCommand) -> anyhow::Result<()> {
    match cmd {
        OutboxCommand::Migrate { .. } => {
            txmq_outbox::migrate(pool)
                .await
                .context("cannot create the outbox table")?;
            println!("txmq_outbox is ready");
        }
        OutboxCommand::Stats { json, .. } => {
            let s = txmq_outbox::stats(pool)
                .await
                .context("cannot read the outbox table")?;
            if *json {
                println!("{}", serde_json::to_string(&s)?);
            } else {
                println!(
                    "pending {}, retrying {}, dead {}, oldest pending enqueued at {}",
                    s.pending,
                    s.retrying,
                    s.dead,
                    s.oldest_pending_ms
                        .map_or_else(|| "-".to_string(), |ms| format!("{ms} ms"))
                );
            }
        }
        OutboxCommand::Dead(DeadCommand::List { limit, json, .. }) => {
            let rows = txmq_outbox::dead(pool, *limit)
                .await
                .context("cannot read the outbox table")?;
            if *json {
                println!("{}", serde_json::to_string(&rows)?);
            } else if rows.is_empty() {
                println!("no dead rows");
            } else {
                println!(
                    "{:<10} {:<38} {:<24} {:>8}  last error",
                    "seq", "id", "destination", "attempts"
                );
                for r in rows {
                    println!(
                        "{:<10} {:<38} {:<24} {:>8}  {}",
                        r.seq,
                        r.id,
                        r.destination,
                        r.attempts,
                        r.last_error.unwrap_or_default()
                    );
                }
            }
        }
        OutboxCommand::Dead(DeadCommand::Redrive { ids, all, .. }) => {
            if ids.is_empty() && !all {
                bail!("say which dead rows to redrive: --id ID (repeatable) or --all");
            }
            let which = (!all).then_some(ids.as_slice());
            let n = txmq_outbox::redrive(pool, which)
                .await
                .context("cannot redrive")?;
            println!("redrove {n} dead rows");
        }
        OutboxCommand::Dead(DeadCommand::Drop { ids, .. }) => {
            let n = txmq_outbox::drop_dead(pool, ids)
                .await
                .context("cannot delete dead rows")?;
            println!("deleted {n} dead rows");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::settings;
    use crate::cli::RelayArgs;

    /// `txmq relay` with `file` as its configuration file.
    fn args(file: &tempfile::NamedTempFile) -> RelayArgs {
        RelayArgs {
            db: Some("postgres://app@db/shop".into()),
            sink: Some("redis://127.0.0.1:6379".into()),
            config: Some(file.path().to_path_buf()),
            http: None,
            batch_size: None,
            workers: None,
            max_attempts: None,
        }
    }

    #[test]
    fn zero_backoff_is_refused_with_the_setting_named() {
        for setting in ["backoff_initial_ms", "backoff_max_ms"] {
            let file = tempfile::NamedTempFile::new().unwrap();
            std::fs::write(file.path(), format!("{setting} = 0\n")).unwrap();
            let e = settings(&args(&file)).unwrap_err().to_string();
            assert!(e.contains(setting), "{setting}: {e}");
        }
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), "backoff_initial_ms = 1\nbackoff_max_ms = 1\n").unwrap();
        settings(&args(&file)).unwrap();
    }
}
