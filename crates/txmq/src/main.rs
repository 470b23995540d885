//! `txmq`: the one binary of txmq: the broker (`serve`), its admin and client commands, the
//! outbox relay, the storage checks and the benchmarks.

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

/// The broker and the benchmarks allocate and free many small buffers per request on every
/// core; mimalloc's per-thread heaps serve them with less contention than glibc's arenas.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Keeps the kernel from backing this process's memory with transparent huge pages.
///
/// mimalloc reserves its heap in large aligned regions; where THP is set to `always`, the
/// first byte touched in such a region makes 2 MiB resident, which more than doubled an idle
/// broker's memory (28 MB against 16 MB). Nothing in txmq gains from huge pages: its large
/// data is the commit log, in the page cache.
fn no_huge_pages() {
    // SAFETY: PR_SET_THP_DISABLE only sets a flag on this process; it takes no pointers.
    let _ = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
}

fn main() -> ExitCode {
    no_huge_pages();
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
