//! The order/payment demo end to end: the demo program with its killed payer and killed
//! logistics processes, against a real broker and each real database (SQLite, PostgreSQL,
//! MariaDB). After each run the database and the broker are checked directly: every paid
//! order has exactly one shipment, the unpaid one none, the inbox has one row per paid
//! order, and no message or transaction is left open on the broker.
//!
//! A database that is not running skips its test, except under `CI=true`, where it fails.

use std::process::Output;
use std::time::Duration;

use txmq_broker::BrokerConfig;
use txmq_broker::server::Server;
use txmq_broker::transactions::TxState;
use txmq_testkit::ScratchDb;

/// Runs the demo against a fresh broker and `db`, then checks the broker's side.
async fn run_demo(db: &str) -> (String, Server, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(BrokerConfig {
        data_dir: dir.path().to_path_buf(),
        listen: "127.0.0.1:0".into(),
        http: "127.0.0.1:0".into(),
        segment_size: 8 << 20,
        ..BrokerConfig::default()
    })
    .await
    .unwrap();
    let output: Output = tokio::time::timeout(
        Duration::from_secs(150),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_order-payment"))
            .args(["--server", &server.grpc_addr.to_string(), "--db", db])
            .args(["--timeout", "120"])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the demo finished in time")
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "demo failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    for expected in [
        "logistics killed (SIGKILL)",
        "payer killed (SIGKILL)",
        "out of stock",
        "answering COMMIT",
        "duplicate delivery of message",
        "OK: 4 paid orders with one shipment each, 1 unpaid with none",
    ] {
        assert!(stdout.contains(expected), "no {expected:?} in:\n{stdout}");
    }

    // Nothing stuck on the broker: every transaction decided, four committed and one
    // rolled back, and the logistics group has nothing left or in flight.
    let txs = server.broker.transactions().list(&[
        TxState::Prepared,
        TxState::Committed,
        TxState::RolledBack,
        TxState::Unresolved,
    ]);
    let count = |s: TxState| txs.iter().filter(|t| t.state == s).count();
    assert_eq!(
        (
            count(TxState::Committed),
            count(TxState::RolledBack),
            count(TxState::Prepared) + count(TxState::Unresolved)
        ),
        (4, 1, 0),
        "{txs:?}"
    );
    let stats = server.broker.group_stats("logistics");
    assert_eq!(
        (stats.lag, stats.in_flight, stats.dead_lettered),
        (0, 0, 0),
        "{stats:?}"
    );
    (stdout, server, dir)
}

/// The rows the demo left: (status, shipments) per order, inbox rows, log rows by state.
async fn check_rows<DB: sqlx::Database>(pool: &sqlx::Pool<DB>)
where
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'q> <DB as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'r> (String, i64): sqlx::FromRow<'r, DB::Row>,
    for<'r> (i64,): sqlx::FromRow<'r, DB::Row>,
{
    let orders: Vec<(String, i64)> = sqlx::query_as(
        "SELECT o.status, (SELECT COUNT(*) FROM demo_shipments s WHERE s.order_id = o.id)
         FROM demo_orders o ORDER BY o.id",
    )
    .fetch_all(&mut *pool.acquire().await.unwrap())
    .await
    .unwrap();
    let expected = [
        ("PAID", 1),
        ("PAID", 1),
        ("PAID", 1),
        ("NEW", 0),
        ("PAID", 1),
    ];
    let got: Vec<(&str, i64)> = orders.iter().map(|(s, n)| (s.as_str(), *n)).collect();
    assert_eq!(got, expected);
    let scalar = |sql: &'static str| async move {
        let (n,): (i64,) = sqlx::query_as(sql)
            .fetch_one(&mut *pool.acquire().await.unwrap())
            .await
            .unwrap();
        n
    };
    assert_eq!(scalar("SELECT COUNT(*) FROM demo_shipments").await, 4);
    assert_eq!(
        scalar("SELECT COUNT(*) FROM txmq_inbox WHERE consumer_group = 'logistics'").await,
        4
    );
    assert_eq!(
        scalar("SELECT COUNT(*) FROM txmq_tx_log WHERE state = 'C'").await,
        4
    );
    assert_eq!(
        scalar("SELECT COUNT(*) FROM demo_stock WHERE available <> 0").await,
        0
    );
}

/// Runs the demo on a scratch database of `DB` and checks what it left there, dropping the
/// database afterwards even if the run fails.
async fn demo_on<DB: ScratchDb>()
where
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'q> <DB as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'r> (String, i64): sqlx::FromRow<'r, DB::Row>,
    for<'r> (i64,): sqlx::FromRow<'r, DB::Row>,
{
    let Some(scratch) = DB::scratch("txmq_demo", 2).await else {
        return;
    };
    let url = scratch.url.clone();
    scratch
        .run(|pool| async move {
            let (_, server, _data) = run_demo(&url).await;
            check_rows(&pool).await;
            server.stop().await.unwrap();
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_on_sqlite() {
    demo_on::<sqlx::Sqlite>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_on_postgres() {
    demo_on::<sqlx::Postgres>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_on_mariadb() {
    demo_on::<sqlx::MySql>().await;
}
