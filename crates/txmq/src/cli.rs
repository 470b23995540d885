//! The command line: every subcommand and flag of the `txmq` binary.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// txmq: zero-loss transactional messaging.
#[derive(Debug, Parser)]
#[command(name = "txmq", version, about, propagate_version = true)]
pub struct Cli {
    /// Log filter for stderr: a level (error, warn, info, debug, trace) or tracing
    /// directives such as `txmq_store=debug,info`.
    #[arg(
        long,
        global = true,
        env = "RUST_LOG",
        default_value = "info",
        value_name = "FILTER"
    )]
    pub log_level: String,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the broker on its embedded storage (gRPC, plaintext and TLS on one port; admin HTTP).
    Serve(ServeArgs),
    /// Topics of a running server.
    #[command(subcommand)]
    Topic(TopicCommand),
    /// Consumer groups of a running server.
    #[command(subcommand)]
    Group(GroupCommand),
    /// Transactions of a running server: list open or unresolved ones, decide them.
    #[command(subcommand)]
    Tx(TxCommand),
    /// Dead-lettered messages of a consumer group: list, send back.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Send one message through the gRPC protocol.
    Send(SendArgs),
    /// Receive messages as a consumer group, print and acknowledge them.
    Consume(ConsumeArgs),
    /// Measure txmq's parts and print figures.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Inspect and repair a data directory.
    #[command(subcommand)]
    Store(StoreCommand),
    /// Publish the rows of a database's outbox table (`txmq_outbox`) to a broker.
    Relay(RelayArgs),
    /// The outbox table of a database: create it, count its rows, list and redrive dead rows.
    #[command(subcommand)]
    Outbox(OutboxCommand),
    /// Tools for tests; not a stable interface.
    #[command(subcommand, hide = true)]
    Debug(DebugCommand),
}

/// Flags of `txmq bench relay`.
#[derive(Debug, Args)]
pub struct BenchRelayArgs {
    /// PostgreSQL; the benchmark makes and drops its own schemas there.
    #[arg(
        long,
        default_value = "postgres://postgres@127.0.0.1:5432/test",
        value_name = "URL"
    )]
    pub db: String,
    /// A sink URL (repeatable), e.g. txmq://127.0.0.1:8081 or amqp://guest:guest@127.0.0.1:5672/%2f.
    #[arg(long, required = true, value_name = "URL")]
    pub sink: Vec<String>,
    /// The destination of every row (topic, or queue on RabbitMQ's default exchange).
    #[arg(long, default_value = "bench-relay", value_name = "NAME")]
    pub destination: String,
    /// Rows in the throughput run.
    #[arg(long, default_value_t = 100_000)]
    pub rows: u64,
    /// Relay instances to run at once (repeatable: each count is measured).
    #[arg(long, default_value = "1", value_delimiter = ',')]
    pub relays: Vec<usize>,
    /// Also measure latency at this many rows per second.
    #[arg(long, value_name = "ROWS_PER_SEC")]
    pub rate: Option<u64>,
    /// Length of the latency run.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Rows per batch.
    #[arg(long, default_value_t = 500)]
    pub batch_size: usize,
    /// Batches in flight per relay.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Payload bytes.
    #[arg(long, default_value_t = 256)]
    pub size: u64,
    /// Rows per transaction in the latency run.
    #[arg(long, default_value_t = 1)]
    pub rows_per_tx: u64,
    /// Tasks enqueuing in the latency run, each with its own connection.
    #[arg(long, default_value_t = 16)]
    pub tasks: usize,
    /// No insert trigger and no LISTEN: relays poll every `--poll-ms`.
    #[arg(long)]
    pub no_notify: bool,
    /// Poll interval with `--no-notify`, ms.
    #[arg(long, default_value_t = 20)]
    pub poll_ms: u64,
    /// Print the report as JSON on stdout (the table goes to stderr).
    #[arg(long)]
    pub json: bool,
}

/// Flags of `txmq relay`; they override the configuration file.
#[derive(Debug, Args)]
pub struct RelayArgs {
    /// The database: postgres://USER@HOST/DB, mysql://USER@HOST/DB or sqlite://FILE.
    #[arg(long, env = "TXMQ_RELAY_DB", value_name = "URL")]
    pub db: Option<String>,
    /// The broker: txmq://HOST:PORT, amqp://USER:PASS@HOST:PORT/VHOST[?exchange=NAME],
    /// nats://HOST:PORT, redis://HOST:PORT or kafka://HOST:PORT[,HOST:PORT].
    #[arg(long, env = "TXMQ_RELAY_SINK", value_name = "URL")]
    pub sink: Option<String>,
    /// A TOML file with the relay's settings (see docs/outbox.md).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long, value_name = "ADDR")]
    pub http: Option<String>,
    /// Rows claimed and published per batch (default 500).
    #[arg(long, value_name = "N")]
    pub batch_size: Option<usize>,
    /// Batches in flight at once (default 2).
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,
    /// Failed attempts after which a row is dead (default 16).
    #[arg(long, value_name = "N")]
    pub max_attempts: Option<u32>,
}

/// `txmq outbox` subcommands.
#[derive(Debug, Subcommand)]
pub enum OutboxCommand {
    /// Create the outbox table, its indexes and (PostgreSQL) its NOTIFY trigger.
    Migrate {
        /// The database URL.
        #[arg(long, value_name = "URL")]
        db: String,
    },
    /// Count pending, retrying and dead rows.
    Stats {
        /// The database URL.
        #[arg(long, value_name = "URL")]
        db: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Rows that failed their last attempt.
    #[command(subcommand)]
    Dead(DeadCommand),
}

/// `txmq outbox dead` subcommands.
#[derive(Debug, Subcommand)]
pub enum DeadCommand {
    /// List dead rows, oldest first, with their last error.
    List {
        /// The database URL.
        #[arg(long, value_name = "URL")]
        db: String,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: i64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Put dead rows back to pending, with their attempts reset.
    Redrive {
        /// The database URL.
        #[arg(long, value_name = "URL")]
        db: String,
        /// A row's message id (repeatable).
        #[arg(long = "id", value_name = "ID")]
        ids: Vec<String>,
        /// Every dead row.
        #[arg(long, conflicts_with = "ids")]
        all: bool,
    },
    /// Delete dead rows that must never be published.
    Drop {
        /// The database URL.
        #[arg(long, value_name = "URL")]
        db: String,
        /// A row's message id (repeatable).
        #[arg(long = "id", value_name = "ID", required = true)]
        ids: Vec<String>,
    },
}

/// Data directory tools.
#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Open a data directory as the broker would (cut a torn tail, rebuild the queue index if
    /// needed) and report what was found. Stops with the file and offset if the log is
    /// damaged before its tail.
    Check(StoreCheckArgs),
}

/// Flags of `txmq store check`.
#[derive(Debug, Args)]
pub struct StoreCheckArgs {
    /// Data directory of the store.
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// Truncate the log at damaged data instead of stopping, dropping every record after it.
    #[arg(long)]
    pub repair: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// The benchmarks.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Append records to a store from concurrent tasks and report throughput and ack latency.
    Store(BenchStoreArgs),
    /// Send durable messages from concurrent tasks to txmq (RocketMQ 5 gRPC), RabbitMQ or NATS
    /// JetStream, each awaited, and report throughput and ack latency.
    Produce(BenchProduceArgs),
    /// Send to txmq at a fixed rate while simple consumers receive and ack, and report the
    /// send-to-receive latency.
    E2e(BenchE2eArgs),
    /// Write a row to PostgreSQL and send a message about it from concurrent tasks, safely
    /// (`send_in_transaction`) and unsafely (a plain send after the database commit), in
    /// alternating rounds, and report what the safe path costs.
    DbSend(BenchDbSendArgs),
    /// Relay outbox rows from PostgreSQL to sinks: throughput of a filled table, and
    /// enqueue-to-confirmation latency at a fixed rate, with one or more relays.
    Relay(BenchRelayArgs),
}

/// Where `txmq bench produce` sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchTarget {
    /// A txmq server, over the RocketMQ 5 gRPC protocol (`--server`).
    Txmq,
    /// RabbitMQ (`--rabbitmq-url`).
    Rabbitmq,
    /// NATS JetStream (`--nats-url`).
    Nats,
    /// txmq, RabbitMQ and NATS one after another, with ratios.
    All,
}

/// Flags of `txmq bench produce`.
#[derive(Debug, Args)]
pub struct BenchProduceArgs {
    /// Where to send.
    #[arg(long, value_enum, default_value_t = BenchTarget::Txmq)]
    pub target: BenchTarget,
    /// txmq server gRPC address, plaintext (host:port or http://host:port).
    #[arg(long, default_value = "http://127.0.0.1:8081", value_name = "ADDR")]
    pub server: String,
    /// txmq topic to send to.
    #[arg(long, default_value = "bench", value_name = "TOPIC")]
    pub topic: String,
    /// Body bytes of each message.
    #[arg(long, default_value_t = 1024, value_name = "BYTES", value_parser = at_least_one)]
    pub size: u64,
    /// Tasks sending at once, each waiting for its ack before the next send.
    #[arg(long, default_value_t = 32, value_name = "TASKS", value_parser = at_least_one)]
    pub concurrency: u64,
    /// How long to send to each target.
    #[arg(long, default_value_t = 10, value_name = "SECONDS", value_parser = at_least_one)]
    pub seconds: u64,
    /// Connections to each broker, shared by the tasks (one client per connection).
    #[arg(long, default_value_t = 1, value_name = "N", value_parser = at_least_one)]
    pub connections: u64,
    /// txmq only: send transactional half messages, each committed by EndTransaction (the
    /// pair counts as one send).
    #[arg(long)]
    pub transactional: bool,
    /// txmq only: requests each producer keeps in flight before joining further sends (or
    /// half messages) into one request, the client's batching (default: the client's
    /// default); 0 sends every message in a request of its own.
    #[arg(long, default_value_t = txmq_client::Batching::default().max_in_flight, value_name = "N")]
    pub max_in_flight: usize,
    /// Print one JSON object on stdout (the table goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// RabbitMQ AMQP URL.
    #[arg(
        long,
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        value_name = "URL"
    )]
    pub rabbitmq_url: String,
    /// NATS server URL (JetStream enabled).
    #[arg(long, default_value = "nats://127.0.0.1:4222", value_name = "URL")]
    pub nats_url: String,
}

/// Flags of `txmq bench e2e`.
#[derive(Debug, Args)]
pub struct BenchE2eArgs {
    /// txmq server gRPC address, plaintext (host:port or http://host:port).
    #[arg(long, default_value = "http://127.0.0.1:8081", value_name = "ADDR")]
    pub server: String,
    /// Topic to send to and receive from.
    #[arg(long, default_value = "bench", value_name = "TOPIC")]
    pub topic: String,
    /// Consumer group of the simple consumers.
    #[arg(long, default_value = "bench-e2e", value_name = "GROUP")]
    pub group: String,
    /// Messages sent per second.
    #[arg(long, default_value_t = 5000, value_name = "MSGS", value_parser = at_least_one)]
    pub rate: u64,
    /// How long to send.
    #[arg(long, default_value_t = 10, value_name = "SECONDS", value_parser = at_least_one)]
    pub seconds: u64,
    /// Body bytes of each message.
    #[arg(long, default_value_t = 1024, value_name = "BYTES", value_parser = at_least_one)]
    pub size: u64,
    /// Sending tasks sharing the schedule; more keep the rate when acks are slow.
    #[arg(long, default_value_t = 128, value_name = "TASKS", value_parser = at_least_one)]
    pub senders: u64,
    /// Consuming tasks, each long-polling ReceiveMessage.
    #[arg(long, default_value_t = 4, value_name = "TASKS", value_parser = at_least_one)]
    pub consumers: u64,
    /// Connections of the producer and of the consumer, each.
    #[arg(long, default_value_t = 4, value_name = "N", value_parser = at_least_one)]
    pub connections: u64,
    /// After sending, how long to wait for the last messages to arrive.
    #[arg(long, default_value_t = 10, value_name = "SECONDS")]
    pub drain_seconds: u64,
    /// Send delay messages due this long after their send (the topic is a DELAY topic);
    /// latency is counted from the time each is due.
    #[arg(long, default_value_t = 0, value_name = "MS")]
    pub delay_ms: u64,
    /// Before the clock starts, send this many delay messages due in an hour, which wait in
    /// the topic through the run (as order time-outs do); implies delay messages.
    #[arg(long, default_value_t = 0, value_name = "MESSAGES")]
    pub backlog: u64,
    /// Print one JSON object on stdout (the table goes to stderr).
    #[arg(long)]
    pub json: bool,
}

/// Flags of `txmq bench db-send`.
#[derive(Debug, Args)]
pub struct BenchDbSendArgs {
    /// txmq server gRPC address, plaintext (host:port).
    #[arg(long, default_value = GRPC, value_name = "ADDR")]
    pub server: String,
    /// PostgreSQL URL. The benchmark works in a scratch schema of its own there
    /// (`txmq_bench_<id>`), dropped at the end.
    #[arg(
        long,
        default_value = "postgres://postgres@127.0.0.1:5432/test",
        value_name = "URL"
    )]
    pub db: String,
    /// Topic name prefix: the safe mode sends to `<TOPIC>-tx` (transactional), the unsafe
    /// one to `<TOPIC>-plain` (normal).
    #[arg(long, default_value = "bench-db", value_name = "TOPIC")]
    pub topic: String,
    /// Tasks at once, each waiting for its operation to finish before the next.
    #[arg(long, default_value_t = 16, value_name = "TASKS", value_parser = at_least_one)]
    pub concurrency: u64,
    /// How long each round runs (two rounds per mode).
    #[arg(long, default_value_t = 10, value_name = "SECONDS", value_parser = at_least_one)]
    pub seconds: u64,
    /// Body bytes of each message.
    #[arg(long, default_value_t = 256, value_name = "BYTES", value_parser = at_least_one)]
    pub size: u64,
    /// Print one JSON object on stdout (the table goes to stderr).
    #[arg(long)]
    pub json: bool,
}

/// Flags of `txmq bench store`.
#[derive(Debug, Args)]
pub struct BenchStoreArgs {
    /// Data directory of the store (created if missing; an existing store is appended to).
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// Body bytes of each record.
    #[arg(long, default_value_t = 1024, value_name = "BYTES", value_parser = at_least_one)]
    pub size: u64,
    /// Tasks appending at once, each waiting for its ack before the next append.
    #[arg(long, default_value_t = 64, value_name = "TASKS", value_parser = at_least_one)]
    pub concurrency: u64,
    /// How long to append for.
    #[arg(long, default_value_t = 10, value_name = "SECONDS", value_parser = at_least_one)]
    pub seconds: u64,
    /// Queues of the benchmark topic the appends are spread over.
    #[arg(long, default_value_t = 8, value_name = "N", value_parser = at_least_one)]
    pub queues: u64,
    /// Print one JSON object on stdout (the table goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// Size of each commit-log segment file (default: the store's, 1 GiB).
    #[arg(long, value_name = "BYTES", value_parser = at_least_one)]
    pub segment_size: Option<u64>,
    /// Acknowledge after the write and fdatasync every N ms (async durability) instead of
    /// after an fdatasync (sync durability, the default).
    #[arg(long, value_name = "MS", value_parser = at_least_one)]
    pub async_flush_ms: Option<u64>,
    /// First measure the disk with `dd ... conv=fdatasync` (1000 MiB in DIR) and report the
    /// store's log throughput as a ratio of it.
    #[arg(long)]
    pub dd: bool,
}

/// Test tools.
#[derive(Debug, Subcommand)]
pub enum DebugCommand {
    /// Append deterministic records forever and print `ACK <seq> <queue> <queue_offset>` for
    /// each acknowledged one (used by the kill test).
    StoreWriter(StoreWriterArgs),
}

/// Flags of `txmq debug store-writer`.
#[derive(Debug, Args)]
pub struct StoreWriterArgs {
    /// Data directory of the store.
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// Size of each commit-log segment file (default: the store's, 1 GiB).
    #[arg(long, value_name = "BYTES", value_parser = at_least_one)]
    pub segment_size: Option<u64>,
    /// Entries per queue-index file (default: the store's).
    #[arg(long, value_name = "N", value_parser = at_least_one)]
    pub index_entries_per_file: Option<u64>,
    /// Threads appending at once.
    #[arg(long, default_value_t = 4, value_name = "THREADS", value_parser = at_least_one)]
    pub concurrency: u64,
}

/// Parses a whole number of at least 1.
fn at_least_one(s: &str) -> Result<u64, String> {
    match s.parse::<u64>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("not a whole number ({e})")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn zero_size_is_refused_with_a_message_naming_the_flag() {
        let err = Cli::try_parse_from(["txmq", "bench", "store", "--dir", "d", "--size", "0"])
            .expect_err("size 0 must be refused");
        let msg = err.to_string();
        assert!(
            msg.contains("--size") && msg.contains("at least 1"),
            "{msg}"
        );
    }

    #[test]
    fn bench_store_defaults_to_sync_appends_of_one_kib_from_64_tasks() {
        let cli = Cli::try_parse_from(["txmq", "bench", "store", "--dir", "d"]).unwrap();
        let Command::Bench(BenchCommand::Store(a)) = cli.command else {
            panic!("wrong subcommand");
        };
        assert_eq!(
            (a.size, a.concurrency, a.seconds, a.queues),
            (1024, 64, 10, 8)
        );
        assert_eq!(a.async_flush_ms, None);
        assert!(!a.json && !a.dd);
    }

    #[test]
    fn bench_db_send_defaults_to_16_tasks_on_the_local_server_and_database() {
        let cli = Cli::try_parse_from(["txmq", "bench", "db-send"]).unwrap();
        let Command::Bench(BenchCommand::DbSend(a)) = cli.command else {
            panic!("wrong subcommand");
        };
        assert_eq!(a.server, "127.0.0.1:8081");
        assert_eq!(a.db, "postgres://postgres@127.0.0.1:5432/test");
        assert_eq!(a.topic, "bench-db");
        assert_eq!((a.concurrency, a.seconds, a.size), (16, 10, 256));
        assert!(!a.json);

        let cli = Cli::try_parse_from([
            "txmq",
            "bench",
            "db-send",
            "--server",
            "127.0.0.1:18081",
            "--db",
            "postgres://u@db/x",
            "--topic",
            "t",
            "--concurrency",
            "4",
            "--seconds",
            "2",
            "--size",
            "64",
            "--json",
        ])
        .unwrap();
        let Command::Bench(BenchCommand::DbSend(a)) = cli.command else {
            panic!("wrong subcommand");
        };
        assert_eq!(
            (a.server.as_str(), a.db.as_str(), a.topic.as_str()),
            ("127.0.0.1:18081", "postgres://u@db/x", "t")
        );
        assert_eq!((a.concurrency, a.seconds, a.size), (4, 2, 64));
        assert!(a.json);
        assert!(Cli::try_parse_from(["txmq", "bench", "db-send", "--concurrency", "0"]).is_err());
    }
}

/// Default admin API address.
const ADMIN: &str = "127.0.0.1:8080";
/// Default gRPC address.
const GRPC: &str = "127.0.0.1:8081";

/// Flags of `txmq serve`. Each overrides the same setting from `--config` and `TXMQ_*`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Data directory [default: ./txmq-data; env TXMQ_DATA_DIR].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// gRPC address, plaintext and TLS on one port [default: 127.0.0.1:8081; env TXMQ_LISTEN].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Admin HTTP address [default: 127.0.0.1:8080; env TXMQ_HTTP].
    #[arg(long, value_name = "ADDR")]
    pub http: Option<String>,
    /// TOML configuration file (keys as in `BrokerConfig`: listen, http, data_dir,
    /// auto_create_topics, default_queues, max_body_size, durability, transaction_timeout_ms, ...).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// PEM certificate chain for TLS (a self-signed certificate is made when unset).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for TLS.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

/// `txmq topic ...`.
#[derive(Debug, Subcommand)]
pub enum TopicCommand {
    /// Create a topic.
    Create {
        /// Topic name.
        name: String,
        /// normal, fifo, delay or transaction.
        #[arg(long = "type", default_value = "normal")]
        r#type: String,
        /// Number of queues [default: the server's, 8].
        #[arg(long)]
        queues: Option<u32>,
        /// Admin API of the server.
        #[arg(long, default_value = ADMIN, env = "TXMQ_SERVER")]
        server: String,
    },
    /// List topics.
    List {
        /// Admin API of the server.
        #[arg(long, default_value = ADMIN, env = "TXMQ_SERVER")]
        server: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `txmq group ...`.
#[derive(Debug, Subcommand)]
pub enum GroupCommand {
    /// Create or update a consumer group.
    Create {
        /// Group name.
        name: String,
        /// Delivery attempts before dead-lettering [default: 16].
        #[arg(long)]
        max_attempts: Option<u32>,
        /// Deliver each message group in order.
        #[arg(long)]
        fifo: bool,
        /// Redelivery delays after failed attempts, ms, comma-separated [default: 10 s to 2 h].
        #[arg(long, value_delimiter = ',')]
        backoff_ms: Vec<u64>,
        /// Admin API of the server.
        #[arg(long, default_value = ADMIN, env = "TXMQ_SERVER")]
        server: String,
    },
    /// List groups with lag, messages in flight and dead-lettered.
    List {
        /// Admin API of the server.
        #[arg(long, default_value = ADMIN, env = "TXMQ_SERVER")]
        server: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `txmq tx ...`.
#[derive(Debug, Subcommand)]
pub enum TxCommand {
    /// List transactions: open (prepared or unresolved, the default), unresolved, prepared,
    /// committed, rolled_back or all.
    List {
        /// Which transactions.
        #[arg(long, default_value = "open")]
        state: String,
        /// Admin API of the server.
        #[arg(long, default_value = ADMIN, env = "TXMQ_SERVER")]
        server: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Commit a transaction: its message is delivered.
    Commit {
        /// Transaction id.
        id: String,
        /// Admin API of the server.
        #[arg(long, default_value = ADMIN, env = "TXMQ_SERVER")]
        server: String,
    },
    /// Roll back a transaction: its message is never delivered.
    Rollback {
        /// Transaction id.
        id: String,
        /// Admin API of the server.
        #[arg(long, default_value = ADMIN, env = "TXMQ_SERVER")]
        server: String,
    },
    /// Check an unresolved transaction back with its producers again.
    Recheck {
        /// Transaction id.
        id: String,
        /// Admin API of the server.
        #[arg(long, default_value = ADMIN, env = "TXMQ_SERVER")]
        server: String,
    },
}

/// `txmq dlq ...`.
#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List a group's dead-lettered messages.
    List {
        /// Consumer group.
        group: String,
        /// Admin API of the server.
        #[arg(long, default_value = ADMIN, env = "TXMQ_SERVER")]
        server: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Send a group's dead-lettered messages back to their topics.
    Redrive {
        /// Consumer group.
        group: String,
        /// Most messages to redrive.
        #[arg(long, default_value_t = 1000)]
        max: usize,
        /// Admin API of the server.
        #[arg(long, default_value = ADMIN, env = "TXMQ_SERVER")]
        server: String,
    },
}

/// Flags of `txmq send`.
#[derive(Debug, Args)]
pub struct SendArgs {
    /// Topic.
    pub topic: String,
    /// Message body (text).
    pub body: String,
    /// Tag.
    #[arg(long)]
    pub tag: Option<String>,
    /// Keys, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub keys: Vec<String>,
    /// FIFO message group (makes it a FIFO message).
    #[arg(long)]
    pub group: Option<String>,
    /// Deliver after this many seconds (makes it a delay message).
    #[arg(long, value_name = "SECONDS")]
    pub delay: Option<u64>,
    /// gRPC address of the server.
    #[arg(long, default_value = GRPC, env = "TXMQ_GRPC")]
    pub server: String,
}

/// Flags of `txmq consume`.
#[derive(Debug, Args)]
pub struct ConsumeArgs {
    /// Topic.
    pub topic: String,
    /// Consumer group.
    #[arg(long)]
    pub group: String,
    /// Stop after this many messages [default: run until interrupted].
    #[arg(long)]
    pub count: Option<u64>,
    /// Stop after waiting this many seconds for a message.
    #[arg(long, value_name = "SECONDS")]
    pub wait: Option<u64>,
    /// Tag expression: `*` or `tagA||tagB`.
    #[arg(long, default_value = "*")]
    pub tags: String,
    /// gRPC address of the server.
    #[arg(long, default_value = GRPC, env = "TXMQ_GRPC")]
    pub server: String,
}
