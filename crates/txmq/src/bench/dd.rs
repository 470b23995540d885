//! The disk's own sequential synced-write speed, measured with `dd`, as the yardstick for the
//! store's log throughput.

use std::ffi::OsString;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, bail};

/// What `dd` reported.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DdResult {
    /// Bytes copied.
    pub bytes: u64,
    /// Seconds it took, the final fdatasync included.
    pub seconds: f64,
}

impl DdResult {
    /// Throughput in MB/s (10^6 bytes), as dd itself counts.
    pub fn mb_per_sec(&self) -> f64 {
        self.bytes as f64 / self.seconds / 1e6
    }
}

/// Runs `dd if=/dev/zero of=DIR/dd.tmp bs=1M count=1000 conv=fdatasync`, deletes the file
/// and returns what dd reported.
///
/// # Errors
/// If dd cannot be started, fails, or prints a summary this cannot read.
pub fn measure(dir: &Path) -> anyhow::Result<DdResult> {
    let path = dir.join("dd.tmp");
    let mut of = OsString::from("of=");
    of.push(&path);
    tracing::info!(file = %path.display(), "measuring the disk with dd (1000 MiB, conv=fdatasync)");
    let output = Command::new("dd")
        .arg("if=/dev/zero")
        .arg(of)
        .args(["bs=1M", "count=1000", "conv=fdatasync"])
        // dd's summary uses the locale's decimal separator.
        .env("LC_ALL", "C")
        .output();
    // Remove the file whatever happened: it is 1000 MiB.
    if let Err(e) = std::fs::remove_file(&path)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(file = %path.display(), error = %e, "cannot remove dd's file");
    }
    let output = output.context("cannot run dd")?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        bail!("dd failed ({}): {}", output.status, stderr.trim());
    }
    parse_summary(&stderr)
}

/// Reads bytes and seconds from the last line dd prints, e.g.
/// `1048576000 bytes (1.0 GB, 1000 MiB) copied, 3.21147 s, 327 MB/s`.
///
/// # Errors
/// If the line does not have that shape.
pub fn parse_summary(stderr: &str) -> anyhow::Result<DdResult> {
    let line = stderr
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .context("dd printed no summary")?;
    let unreadable = || format!("cannot read dd's summary line {line:?}");
    let bytes = line
        .split_whitespace()
        .next()
        .and_then(|b| b.parse::<u64>().ok())
        .with_context(unreadable)?;
    let seconds = line
        .split(", ")
        .find_map(|part| {
            part.strip_suffix(" s")
                .or_else(|| part.strip_suffix(" seconds"))
        })
        .and_then(|s| s.trim().parse::<f64>().ok())
        .with_context(unreadable)?;
    if !seconds.is_finite() || seconds <= 0.0 {
        bail!("dd reported a time of {seconds} s in {line:?}");
    }
    Ok(DdResult { bytes, seconds })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_bytes_and_seconds_from_gnu_dd() {
        let stderr = "1000+0 records in\n1000+0 records out\n\
                      1048576000 bytes (1.0 GB, 1000 MiB) copied, 3.21147 s, 327 MB/s\n";
        let r = parse_summary(stderr).unwrap();
        assert_eq!(r.bytes, 1_048_576_000);
        assert!((r.seconds - 3.21147).abs() < 1e-9);
        assert!((r.mb_per_sec() - 326.5).abs() < 0.1, "{}", r.mb_per_sec());
    }

    #[test]
    fn reads_busybox_dd_which_spells_out_seconds() {
        let r =
            parse_summary("1048576000 bytes (1000.0MB) copied, 2.5 seconds, 400.0MB/s\n").unwrap();
        assert_eq!((r.bytes, r.seconds), (1_048_576_000, 2.5));
    }

    #[test]
    fn an_unreadable_summary_is_an_error_that_quotes_it() {
        let err = parse_summary("dd: something odd\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("something odd"), "{err}");
        assert!(parse_summary("").is_err());
        assert!(parse_summary("5 bytes copied, 0 s, inf B/s").is_err());
    }
}
