//! Latency recording shared by the wire benchmarks (`bench produce`, `bench e2e`): a few
//! histogram shards behind mutexes, merged once at the end, and the percentiles printed.

use std::sync::Mutex;
use std::time::Duration;

use anyhow::Context;
use hdrhistogram::Histogram;
use serde::Serialize;

/// Latencies are recorded in microseconds, up to an hour, to 3 significant digits.
const LATENCY_MAX_US: u64 = 3_600_000_000;

/// Every latency of a run, in microseconds. Tasks pick a shard by number, so they rarely
/// wait for each other and memory does not grow with the number of tasks.
pub struct Latencies {
    shards: Vec<Mutex<Histogram<u64>>>,
}

impl Latencies {
    /// Empty histograms for up to `tasks` recording tasks.
    ///
    /// # Errors
    /// If a histogram cannot be created (never with these bounds).
    pub fn new(tasks: usize) -> anyhow::Result<Self> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let shards = (0..(4 * cores).min(tasks).max(1))
            .map(|_| new_histogram().map(Mutex::new))
            .collect::<anyhow::Result<_>>()?;
        Ok(Self { shards })
    }

    /// Records one latency from task `task`.
    pub fn record(&self, task: u64, latency: Duration) {
        let shard = &self.shards[(task % self.shards.len() as u64) as usize];
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        shard
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .saturating_record(us.max(1));
    }

    /// The percentiles of everything recorded so far; `max` is the exact maximum, which the
    /// caller tracks (the histogram rounds it).
    ///
    /// # Errors
    /// If the shards cannot be merged (never: they share their bounds).
    pub fn summary(&self, max: Duration) -> anyhow::Result<LatencySummary> {
        let mut all = new_histogram()?;
        for shard in &self.shards {
            let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            all.add(&*shard)
                .context("cannot merge latency histograms")?;
        }
        let ms = |us: u64| round3(us as f64 / 1000.0);
        Ok(LatencySummary {
            mean_ms: round3(all.mean() / 1000.0),
            p50_ms: ms(all.value_at_quantile(0.50)),
            p99_ms: ms(all.value_at_quantile(0.99)),
            p999_ms: ms(all.value_at_quantile(0.999)),
            max_ms: round3(max.as_secs_f64() * 1000.0),
        })
    }
}

/// Latency percentiles in milliseconds (0 when nothing was recorded).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct LatencySummary {
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

fn new_histogram() -> anyhow::Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, LATENCY_MAX_US, 3).context("cannot create a latency histogram")
}

/// Rounds to three decimals, so that JSON figures stay readable.
pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// A body of `size` bytes; not all zeros, in case a layer below compresses.
pub fn bench_body(size: u64) -> Vec<u8> {
    (0..size).map(|i| (i % 251) as u8).collect()
}
