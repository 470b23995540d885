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
    /// Measure txmq's parts and print figures.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Inspect and repair a data directory.
    #[command(subcommand)]
    Store(StoreCommand),
    /// Tools for tests; not a stable interface.
    #[command(subcommand, hide = true)]
    Debug(DebugCommand),
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
}
