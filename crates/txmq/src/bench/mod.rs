//! Benchmarks: programs that print figures (a table, and JSON on request), never timed
//! assertions.

pub mod db_send;
pub mod dd;
pub mod e2e;
pub mod latency;
pub mod peers;
pub mod produce;
pub mod relay;
pub mod store;

/// Prints a benchmark's report: the table on stdout, or with `json` one JSON object on stdout
/// and the table on stderr.
///
/// # Errors
/// If stdout cannot be written or the report cannot be encoded.
pub fn print_report(json: bool, table: &str, report: &impl serde::Serialize) -> anyhow::Result<()> {
    use std::io::Write;

    use anyhow::Context;

    let mut out = std::io::stdout().lock();
    if json {
        eprint!("{table}");
        let encoded = serde_json::to_string(report).context("cannot encode the report")?;
        writeln!(out, "{encoded}").context("cannot write to stdout")?;
    } else {
        out.write_all(table.as_bytes())
            .context("cannot write to stdout")?;
    }
    out.flush().context("cannot write to stdout")
}
