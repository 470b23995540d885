//! The relay's counters and latency histograms, rendered in the Prometheus text format.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::dialect::TableStats;

/// Histogram bucket bounds, seconds.
const BUCKETS: [f64; 14] = [
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0,
];

/// A Prometheus histogram of seconds.
#[derive(Debug, Default)]
struct Histogram {
    /// Cumulative counts are computed when rendering; these are per bucket, the last one
    /// being +Inf.
    buckets: [AtomicU64; BUCKETS.len() + 1],
    count: AtomicU64,
    /// Sum in microseconds.
    sum_us: AtomicU64,
}

impl Histogram {
    fn observe(&self, d: Duration, n: u64) {
        let secs = d.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(BUCKETS.len());
        self.buckets[i].fetch_add(n, Ordering::Relaxed);
        self.count.fetch_add(n, Ordering::Relaxed);
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.sum_us
            .fetch_add(us.saturating_mul(n), Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, b) in BUCKETS.iter().enumerate() {
            cumulative += self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
        }
        cumulative += self.buckets[BUCKETS.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}");
        let _ = writeln!(out, "{name}_count {}", self.count.load(Ordering::Relaxed));
    }
}

/// What a relay counted since it started. Shared by its workers; render it with
/// [`Metrics::render`].
#[derive(Debug, Default)]
pub struct Metrics {
    published: AtomicU64,
    failed_attempts: AtomicU64,
    dead_lettered: AtomicU64,
    batches: AtomicU64,
    database_errors: AtomicU64,
    panics: AtomicU64,
    publish_seconds: Histogram,
    commit_to_ack_seconds: Histogram,
}

impl Metrics {
    /// Rows published and marked delivered.
    pub fn published(&self) -> u64 {
        self.published.load(Ordering::Relaxed)
    }

    /// Publish attempts that failed.
    pub fn failed_attempts(&self) -> u64 {
        self.failed_attempts.load(Ordering::Relaxed)
    }

    /// Rows this relay moved to dead.
    pub fn dead_lettered(&self) -> u64 {
        self.dead_lettered.load(Ordering::Relaxed)
    }

    /// Database errors of claims, marks and cleanups.
    pub fn database_errors(&self) -> u64 {
        self.database_errors.load(Ordering::Relaxed)
    }

    /// Panics caught: in the sink's publish calls (their rows count as failed attempts)
    /// and in the relay's batches (their claims are released).
    pub fn panics(&self) -> u64 {
        self.panics.load(Ordering::Relaxed)
    }

    pub(crate) fn panicked(&self) {
        self.panics.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn observe_publish(&self, d: Duration) {
        self.publish_seconds.observe(d, 1);
        self.batches.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn observe_delivered(&self, commit_to_ack: Duration) {
        self.published.fetch_add(1, Ordering::Relaxed);
        self.commit_to_ack_seconds.observe(commit_to_ack, 1);
    }

    pub(crate) fn failed(&self, dead: bool) {
        self.failed_attempts.fetch_add(1, Ordering::Relaxed);
        if dead {
            self.dead_lettered.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn database_error(&self) {
        self.database_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// The Prometheus text exposition of these counters and of `table` (read from the
    /// database at scrape time), with `now_ms` for the age of the oldest pending row.
    pub fn render(&self, table: Option<&TableStats>, now_ms: i64) -> String {
        let mut out = String::new();
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} counter");
            let _ = writeln!(out, "{name} {v}");
        };
        let gauge = |out: &mut String, name: &str, help: &str, v: f64| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} gauge");
            let _ = writeln!(out, "{name} {v}");
        };
        counter(
            &mut out,
            "txmq_outbox_published_total",
            "Rows published and marked delivered by this relay.",
            self.published(),
        );
        counter(
            &mut out,
            "txmq_outbox_failed_attempts_total",
            "Publish attempts that failed.",
            self.failed_attempts(),
        );
        counter(
            &mut out,
            "txmq_outbox_dead_lettered_total",
            "Rows this relay marked dead after their last attempt.",
            self.dead_lettered(),
        );
        counter(
            &mut out,
            "txmq_outbox_batches_total",
            "Publish calls to the sink.",
            self.batches.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "txmq_outbox_database_errors_total",
            "Failed claims, marks and cleanups.",
            self.database_errors(),
        );
        counter(
            &mut out,
            "txmq_outbox_panics_total",
            "Panics caught in the sink's publish calls and in the relay's batches.",
            self.panics(),
        );
        self.publish_seconds.render(
            &mut out,
            "txmq_outbox_publish_seconds",
            "Time of one publish call to the sink, with its confirmations.",
        );
        self.commit_to_ack_seconds.render(
            &mut out,
            "txmq_outbox_commit_to_ack_seconds",
            "From a row's enqueue to the sink's confirmation.",
        );
        match table {
            Some(t) => {
                gauge(
                    &mut out,
                    "txmq_outbox_pending_rows",
                    "Rows not yet published.",
                    t.pending as f64,
                );
                gauge(
                    &mut out,
                    "txmq_outbox_retrying_rows",
                    "Pending rows that failed at least once.",
                    t.retrying as f64,
                );
                let age = t
                    .oldest_pending_ms
                    .map_or(0.0, |o| (now_ms.saturating_sub(o)).max(0) as f64 / 1000.0);
                gauge(
                    &mut out,
                    "txmq_outbox_oldest_pending_age_seconds",
                    "Age of the oldest pending row (0 when none).",
                    age,
                );
                gauge(
                    &mut out,
                    "txmq_outbox_dead_rows",
                    "Rows that failed their last attempt.",
                    t.dead as f64,
                );
                gauge(
                    &mut out,
                    "txmq_outbox_up",
                    "1 if the table could be read.",
                    1.0,
                );
            }
            None => gauge(
                &mut out,
                "txmq_outbox_up",
                "1 if the table could be read.",
                0.0,
            ),
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::Metrics;
    use crate::dialect::TableStats;

    #[test]
    fn renders_counters_histograms_and_table_gauges() {
        let m = Metrics::default();
        m.observe_publish(Duration::from_millis(3));
        for _ in 0..10 {
            m.observe_delivered(Duration::from_millis(40));
        }
        m.failed(false);
        m.failed(true);
        m.panicked();
        let table = TableStats {
            pending: 5,
            retrying: 1,
            oldest_pending_ms: Some(1_000),
            dead: 2,
        };
        let text = m.render(Some(&table), 3_500);
        for line in [
            "txmq_outbox_published_total 10",
            "txmq_outbox_failed_attempts_total 2",
            "txmq_outbox_dead_lettered_total 1",
            "txmq_outbox_panics_total 1",
            "txmq_outbox_publish_seconds_bucket{le=\"0.002\"} 0",
            "txmq_outbox_publish_seconds_bucket{le=\"0.005\"} 1",
            "txmq_outbox_commit_to_ack_seconds_bucket{le=\"0.05\"} 10",
            "txmq_outbox_commit_to_ack_seconds_count 10",
            "txmq_outbox_pending_rows 5",
            "txmq_outbox_oldest_pending_age_seconds 2.5",
            "txmq_outbox_dead_rows 2",
            "txmq_outbox_up 1",
        ] {
            assert!(text.contains(line), "no {line:?} in\n{text}");
        }
        assert!(m.render(None, 0).contains("txmq_outbox_up 0"));
    }
}
