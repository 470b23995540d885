//! The order/payment scenario on txmq.
//!
//! Paying an order writes the order and stock rows and sends "order paid" as a
//! transactional message, with the database transaction as the local transaction
//! (`txmq_client::db::send_in_transaction`). A logistics consumer creates one shipment per
//! paid order through the inbox (`txmq_client::db::process_once`).
//!
//! The demo runs three processes against one `txmq serve` and one database: itself (it
//! pays orders and answers check-backs from the database), a payer that is killed between
//! the database commit and the message commit, and logistics, killed once after committing
//! a shipment and before acknowledging its message. It prints what happens and checks at
//! the end that every paid order has exactly one shipment and no unpaid order has one.
//!
//! ```sh
//! txmq serve &                                           # 127.0.0.1:8081
//! cargo run -p order-payment                             # SQLite file ./order-payment.db
//! cargo run -p order-payment -- --db postgres://postgres@127.0.0.1/test
//! cargo run -p order-payment -- --db mysql://root@127.0.0.1/test
//! ```

mod shop;

use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use sqlx::{MySql, Pool, Postgres, Sqlite};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use txmq_client::db::fault::{self, Crash};
use txmq_client::db::{self, DbChecker, Processed, SendInTransactionError};
use txmq_client::{
    ClientConfig, Message, MessageView, ReceiveError, SimpleConsumer, Subscription,
    TransactionChecker, TransactionResolution, TransactionalProducer,
};

use shop::{PAID, PayError, Shop};

/// The consumer group of logistics.
const LOGISTICS: &str = "logistics";
/// The tag of "order paid" messages.
const TAG: &str = "paid";
/// The message property carrying the order id.
const ORDER_ID: &str = "order_id";
/// How long a message logistics received stays invisible before it comes again.
const INVISIBLE: Duration = Duration::from_secs(5);
/// A child process prints this when it reached its crash point; the demo then kills it.
const CRASH_POINT: &str = "crash point:";
/// Logistics prints this for a delivery the inbox recognised.
const DUPLICATE: &str = "duplicate delivery";

/// Paying orders with a transactional "order paid" message and shipping each paid order
/// once, with crashes along the way; see the crate docs.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// The txmq server's gRPC address.
    #[arg(long, default_value = "127.0.0.1:8081", global = true)]
    server: String,
    /// The database: sqlite://FILE, postgres://USER@HOST/DB or mysql://USER@HOST/DB.
    #[arg(long, default_value = "sqlite://order-payment.db", global = true)]
    db: String,
    /// The topic of "order paid" messages (created as a transactional topic on first use
    /// when the server auto-creates topics).
    #[arg(long, default_value = "order-paid", global = true)]
    topic: String,
    /// How long the demo waits for every paid order to be shipped, in seconds.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
    #[command(subcommand)]
    role: Option<Role>,
}

/// The processes the demo starts.
#[derive(Subcommand)]
enum Role {
    /// Ships paid orders, once each, through the inbox.
    #[command(hide = true)]
    Logistics {
        /// Stop at the crash point after committing this many shipments.
        #[arg(long)]
        crash_after_shipments: Option<u32>,
    },
    /// Pays one order and stops at the crash point after the database commit.
    #[command(hide = true)]
    Pay {
        /// The order.
        #[arg(long)]
        order: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let scheme = cli.db.split(':').next().unwrap_or_default();
        match scheme {
            "sqlite" => start::<Sqlite>(&cli).await,
            "postgres" | "postgresql" => start::<Postgres>(&cli).await,
            "mysql" | "mariadb" => start::<MySql>(&cli).await,
            _ => bail!(
                "unsupported database URL {:?}: use sqlite://FILE, postgres://... or mysql://...",
                cli.db
            ),
        }
    });
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Connects to the database, creates the tables, and plays this process's role.
async fn start<DB: Shop>(cli: &Cli) -> anyhow::Result<bool> {
    let pool = DB::connect(&cli.db)
        .await
        .with_context(|| format!("cannot open the database {}", cli.db))?;
    db::migrate(&pool)
        .await
        .context("cannot create the txmq tables")?;
    DB::setup(&pool)
        .await
        .context("cannot create the shop's tables")?;
    let config =
        ClientConfig::new(cli.server.clone()).with_long_polling_timeout(Duration::from_secs(2));
    match &cli.role {
        None => demo(cli, config, pool).await,
        Some(Role::Logistics {
            crash_after_shipments,
        }) => logistics(config, &cli.topic, pool, *crash_after_shipments)
            .await
            .map(|()| true),
        Some(Role::Pay { order }) => pay_and_crash(config, &cli.topic, pool, order)
            .await
            .map(|()| true),
    }
}

/// The "order paid" message of `order_id`.
fn order_paid(topic: &str, order_id: &str, qty: i64, sku: &str) -> Message {
    Message::new(topic, format!("order {order_id} paid: {qty} x {sku}"))
        .with_tag(TAG)
        .with_key(order_id)
        .with_property(ORDER_ID, order_id)
}

/// The order id a message is about.
fn order_of(message: &MessageView) -> &str {
    message
        .properties()
        .get(ORDER_ID)
        .map_or("?", String::as_str)
}

/// Answers check-backs from the database and says what it answered.
struct Narrated<DB: Shop>(DbChecker<DB>);

impl<DB: Shop> TransactionChecker for Narrated<DB> {
    async fn check(&self, transaction_id: &str, message: &MessageView) -> TransactionResolution {
        let answer = self.0.check(transaction_id, message).await;
        let (why, word) = match answer {
            TransactionResolution::Commit => ("its transaction-log row is committed", "COMMIT"),
            TransactionResolution::Rollback => {
                ("its transaction-log row is fenced off", "ROLLBACK")
            }
            TransactionResolution::Unknown => ("no decision yet", "UNKNOWN"),
        };
        println!(
            "check-back from the broker for order {} (transaction {transaction_id}): {why}, answering {word}",
            order_of(message)
        );
        answer
    }
}

/// The orders of a run: id suffix, product, quantity.
const ORDERS: [(&str, &str, i64); 5] = [
    ("1", "keyboard", 1),
    ("2", "monitor", 1),
    ("3", "keyboard", 2),
    ("4", "monitor", 1),
    ("5", "keyboard", 1),
];
/// Stock at the start of a run: order 4 finds no monitor left.
const STOCK: [(&str, i64); 2] = [("keyboard", 4), ("monitor", 1)];

/// The whole scenario; `Ok(false)` if the final check fails.
async fn demo<DB: Shop>(cli: &Cli, config: ClientConfig, pool: Pool<DB>) -> anyhow::Result<bool> {
    let run = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let prefix = format!("o{run}-");
    println!(
        "order/payment demo, run {run}: broker {}, database {}",
        cli.server,
        redact(&cli.db)
    );
    for (sku, n) in STOCK {
        DB::restock(&pool, sku, n).await.context("cannot restock")?;
    }
    for (n, sku, qty) in ORDERS {
        DB::place(&pool, &format!("{prefix}{n}"), sku, qty)
            .await
            .context("cannot place an order")?;
    }
    let stock: Vec<String> = STOCK
        .iter()
        .map(|(sku, n)| format!("{n} x {sku}"))
        .collect();
    println!(
        "stock: {}; {} new orders placed\n",
        stock.join(", "),
        ORDERS.len()
    );

    let checker = DbChecker::new(pool.clone()).with_max_local_transaction(Duration::from_secs(30));
    let producer =
        TransactionalProducer::connect(config.clone(), [cli.topic.as_str()], Narrated(checker))
            .await
            .with_context(|| format!("cannot connect to txmq at {}", cli.server))?;
    let (lines_tx, mut lines) = mpsc::unbounded_channel();

    println!("logistics starts, and will be killed after committing its first shipment");
    let mut logistics = spawn(
        cli,
        &["logistics", "--crash-after-shipments", "1"],
        "logistics",
        lines_tx.clone(),
    )?;

    for (n, sku, qty) in &ORDERS[..4] {
        let id = format!("{prefix}{n}");
        let message = order_paid(&cli.topic, &id, *qty, sku);
        let order = id.clone();
        match db::send_in_transaction(&producer, &pool, message, move |tx| DB::pay(tx, order)).await
        {
            Ok(sent) => {
                println!(
                    "order {id}: paid {qty} x {sku}; \"order paid\" committed (transaction {})",
                    sent.receipt.transaction_id
                );
                if let Err(e) = sent.message_commit {
                    println!("  the message commit failed ({e}); the check-back commits it");
                }
            }
            Err(SendInTransactionError::Local(e @ PayError::OutOfStock { .. })) => {
                println!(
                    "order {id}: {e}; the payment's database transaction and its half message were rolled back"
                );
            }
            Err(e) => return Err(e).with_context(|| format!("cannot pay order {id}")),
        }
    }

    let crashed = format!("{prefix}5");
    println!(
        "order {crashed}: paid by another process, killed after the database commit and before the message commit"
    );
    let mut payer = spawn(
        cli,
        &["pay", "--order", &crashed],
        "payer",
        lines_tx.clone(),
    )?;

    // Kill children at their crash points, restart logistics once, and wait until every
    // paid order is shipped and the shipment logistics did not acknowledge came back.
    let deadline = Instant::now() + Duration::from_secs(cli.timeout);
    let mut restarted = false;
    let mut duplicates = 0;
    let mut check = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            Some((who, line)) = lines.recv() => {
                if line.starts_with(CRASH_POINT) {
                    let child = if who == "payer" { &mut payer } else { &mut logistics };
                    kill(child).await;
                    println!("{who} killed (SIGKILL)");
                    if who == "logistics" && !restarted {
                        restarted = true;
                        println!("logistics starts again");
                        logistics = spawn(cli, &["logistics"], "logistics", lines_tx.clone())?;
                    }
                } else if line.starts_with(DUPLICATE) {
                    duplicates += 1;
                }
            }
            _ = check.tick() => {
                let orders = DB::orders(&pool, &prefix).await.context("cannot read the orders")?;
                let shipped = orders.iter().all(|o| o.status != PAID || o.shipments > 0);
                if shipped && restarted && duplicates > 0 {
                    break;
                }
                if Instant::now() > deadline {
                    println!("\ngave up waiting after {} s", cli.timeout);
                    break;
                }
                if let Ok(Some(status)) = logistics.try_wait() {
                    bail!("logistics exited on its own ({status})");
                }
            }
        }
    }
    kill(&mut logistics).await;
    producer.shutdown().await;
    report::<DB>(&pool, &prefix, restarted, duplicates).await
}

/// Prints the orders and checks that every paid order has exactly one shipment and no
/// other order has one.
async fn report<DB: Shop>(
    pool: &Pool<DB>,
    prefix: &str,
    restarted: bool,
    duplicates: u32,
) -> anyhow::Result<bool> {
    let orders = DB::orders(pool, prefix)
        .await
        .context("cannot read the orders")?;
    println!(
        "\n{:<22} {:<14} {:<7} shipments",
        "order", "items", "status"
    );
    for o in &orders {
        println!(
            "{:<22} {:<14} {:<7} {}",
            o.id,
            format!("{} x {}", o.qty, o.sku),
            o.status,
            o.shipments
        );
    }
    let keyboards = DB::stock(pool, "keyboard").await?;
    let monitors = DB::stock(pool, "monitor").await?;
    println!("stock left: {keyboards} keyboards, {monitors} monitors");
    let mut ok = true;
    for o in &orders {
        let want = i64::from(o.status == PAID);
        if o.shipments != want {
            ok = false;
            println!(
                "FAILED: order {} is {} and has {} shipments, expected {want}",
                o.id, o.status, o.shipments
            );
        }
    }
    if orders.len() != ORDERS.len() {
        ok = false;
        println!(
            "FAILED: {} orders found, expected {}",
            orders.len(),
            ORDERS.len()
        );
    }
    if !restarted || duplicates == 0 {
        ok = false;
        println!("FAILED: the shipment logistics did not acknowledge was not delivered again");
    }
    if ok {
        let paid = orders.iter().filter(|o| o.status == PAID).count();
        println!(
            "OK: {paid} paid orders with one shipment each, {} unpaid with none; the redelivered message was recognised by the inbox",
            orders.len() - paid
        );
    }
    Ok(ok)
}

/// Starts this program with `role` arguments; its output lines are printed with a prefix
/// and passed to `lines`.
fn spawn(
    cli: &Cli,
    role: &[&str],
    who: &'static str,
    lines: mpsc::UnboundedSender<(&'static str, String)>,
) -> anyhow::Result<Child> {
    let exe = std::env::current_exe().context("cannot find this program's executable")?;
    let mut child = Command::new(exe)
        .args([
            "--server",
            &cli.server,
            "--db",
            &cli.db,
            "--topic",
            &cli.topic,
        ])
        .args(role)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start the {who} process"))?;
    let out = child.stdout.take().context("no stdout of the child")?;
    tokio::spawn(async move {
        let mut out = BufReader::new(out).lines();
        while let Ok(Some(line)) = out.next_line().await {
            println!("  [{who}] {line}");
            if lines.send((who, line)).is_err() {
                break;
            }
        }
    });
    Ok(child)
}

/// Kills a child with SIGKILL and reaps it.
async fn kill(child: &mut Child) {
    if let Err(e) = child.kill().await {
        eprintln!("cannot kill a child process: {e}");
    }
}

/// `url` without its password.
fn redact(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(s), Some(at)) if at > s => {
            let user = &url[s + 3..at];
            match user.split_once(':') {
                Some((name, _)) => format!("{}{name}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// Logistics: receives "order paid", creates the shipment through the inbox, acks.
async fn logistics<DB: Shop>(
    config: ClientConfig,
    topic: &str,
    pool: Pool<DB>,
    crash_after: Option<u32>,
) -> anyhow::Result<()> {
    let consumer = SimpleConsumer::connect(config, LOGISTICS, [Subscription::new(topic, TAG)])
        .await
        .context("cannot connect the logistics consumer")?;
    println!("consumer group {LOGISTICS} connected");
    let mut shipped = 0;
    loop {
        let messages = match consumer.receive(8, INVISIBLE).await {
            Ok(m) => m,
            Err(ReceiveError::TopicNotFound { .. }) => {
                // Nothing was paid yet.
                tokio::time::sleep(Duration::from_millis(300)).await;
                continue;
            }
            Err(e) => {
                println!("receive failed, retrying: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        for m in messages {
            let order = order_of(&m).to_string();
            let outcome = db::process_once(&pool, LOGISTICS, &m, |tx, m| {
                DB::ship(tx, order.clone(), m.message_id().to_string())
            })
            .await;
            match outcome {
                Ok(Processed::Done(())) => {
                    shipped += 1;
                    println!(
                        "shipment created for order {order} (message {}, delivery attempt {})",
                        m.message_id(),
                        m.delivery_attempt()
                    );
                    if crash_after == Some(shipped) {
                        println!("{CRASH_POINT} shipment committed, message not acknowledged");
                        return park().await;
                    }
                }
                Ok(Processed::Duplicate) => println!(
                    "{DUPLICATE} of message {} for order {order} (attempt {}): already shipped, acknowledged without shipping again",
                    m.message_id(),
                    m.delivery_attempt()
                ),
                Err(e) => {
                    println!("shipping order {order} failed, it comes again: {e}");
                    continue;
                }
            }
            if let Err(e) = consumer.ack(&m).await {
                println!(
                    "ack of message {} failed, it comes again: {e}",
                    m.message_id()
                );
            }
        }
    }
}

/// The payer: pays `order` and stops after the database commit, before the message commit.
async fn pay_and_crash<DB: Shop>(
    config: ClientConfig,
    topic: &str,
    pool: Pool<DB>,
    order: &str,
) -> anyhow::Result<()> {
    let producer = TransactionalProducer::connect(config, [topic], DbChecker::new(pool.clone()))
        .await
        .context("cannot connect the payer")?;
    let (sku, qty) = DB::orders(&pool, order)
        .await?
        .first()
        .map(|o| (o.sku.clone(), o.qty))
        .with_context(|| format!("no order {order}"))?;
    let message = order_paid(topic, order, qty, &sku);
    let id = order.to_string();
    let sent = fault::inject(
        Crash::AfterDbCommit,
        db::send_in_transaction(&producer, &pool, message, move |tx| DB::pay(tx, id)),
    )
    .await;
    match sent {
        Err(SendInTransactionError::Crashed(_)) => {
            println!("{CRASH_POINT} database committed, half message sent, message not committed");
            park().await
        }
        Ok(_) => bail!("the crash point was not reached"),
        Err(e) => Err(e).with_context(|| format!("cannot pay order {order}")),
    }
}

/// Waits to be killed.
async fn park() -> anyhow::Result<()> {
    use std::io::Write;
    std::io::stdout()
        .flush()
        .context("cannot write to stdout")?;
    loop {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn passwords_are_not_printed() {
        assert_eq!(
            redact("postgres://app:secret@db:5432/shop"),
            "postgres://app:***@db:5432/shop"
        );
        assert_eq!(
            redact("mysql://root@127.0.0.1/test"),
            "mysql://root@127.0.0.1/test"
        );
        assert_eq!(
            redact("sqlite://order-payment.db"),
            "sqlite://order-payment.db"
        );
    }
}
