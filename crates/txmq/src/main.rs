//! `txmq`: the one binary of txmq. Today it benchmarks and checks the storage engine;
//! `serve` and the other commands of ARCHITECTURE.md follow.

mod admin_cmd;
mod bench;
mod cli;
mod client_cmd;
mod debug;
mod relay_cmd;
mod serve;
mod store_check;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use cli::{BenchCommand, Cli, Command, DebugCommand, StoreCommand};

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = init_logging(&cli.log_level) {
        eprintln!("txmq: error: {e:#}");
        return ExitCode::from(2);
    }
    let result = match cli.command {
        Command::Serve(args) => serve::run(&args),
        Command::Topic(cmd) => admin_cmd::topic(&cmd),
        Command::Group(cmd) => admin_cmd::group(&cmd),
        Command::Tx(cmd) => admin_cmd::tx(&cmd),
        Command::Dlq(cmd) => admin_cmd::dlq(&cmd),
        Command::Send(args) => client_cmd::send(&args),
        Command::Consume(args) => client_cmd::consume(&args),
        Command::Bench(BenchCommand::Store(args)) => bench::store::run(&args),
        Command::Bench(BenchCommand::Produce(args)) => bench::produce::run(&args),
        Command::Bench(BenchCommand::E2e(args)) => bench::e2e::run(&args),
        Command::Bench(BenchCommand::DbSend(args)) => bench::db_send::run(&args),
        Command::Bench(BenchCommand::Relay(args)) => bench::relay::run(&args),
        Command::Store(StoreCommand::Check(args)) => store_check::run(&args),
        Command::Relay(args) => relay_cmd::relay(&args),
        Command::Outbox(cmd) => relay_cmd::outbox(&cmd),
        Command::Debug(DebugCommand::StoreWriter(args)) => debug::store_writer::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("txmq: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Sends logs to stderr, filtered by `--log-level` (or `RUST_LOG`), so stdout stays for
/// results.
fn init_logging(filter: &str) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(filter)
        .map_err(|e| anyhow::anyhow!("invalid --log-level / RUST_LOG {filter:?}: {e}"))?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    Ok(())
}
