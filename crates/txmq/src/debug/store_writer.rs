//! `txmq debug store-writer`: appends deterministic records forever and reports every
//! acknowledgement on stdout, so that a test can kill it at any moment and then check the
//! store against what was acknowledged.
//!
//! The contract the kill test relies on (`tests/store_kill.rs` states it again on its own):
//! record `seq` goes to topic `kill`, queue `seq % 4`, with message id `seq` in decimal and
//! the body `payload-{seq}-` repeated `3 + seq % 8` times. After its append is acknowledged,
//! one line `ACK <seq> <queue> <queue_offset>` is written to stdout and flushed. Sequence
//! numbers continue after the largest found in the store, so no two records share one.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};

use anyhow::{Context, bail};
use txmq_store::{RecordData, RecordKind, Store, StoreConfig};

use crate::cli::StoreWriterArgs;

/// The topic written.
const TOPIC: &str = "kill";
/// Queues of the topic; record `seq` goes to queue `seq % QUEUES`.
const QUEUES: u64 = 4;

/// The record with sequence number `seq`.
fn record_for(seq: u64) -> RecordData {
    let body = format!("payload-{seq}-").repeat(3 + (seq % 8) as usize);
    let mut r = RecordData::new(RecordKind::Normal, TOPIC, (seq % QUEUES) as u32, body);
    r.message_id = seq.to_string();
    r
}

/// Opens the store and appends from `concurrency` threads until one of them fails.
///
/// # Errors
/// If the store cannot be opened or scanned, an append fails, or stdout is closed.
pub fn run(args: &StoreWriterArgs) -> anyhow::Result<()> {
    let mut config = StoreConfig::new(&args.dir);
    if let Some(size) = args.segment_size {
        config.segment_size = size;
        let room = size.saturating_sub(txmq_store::SEGMENT_HEADER_LEN as u64);
        config.max_record_size = config.max_record_size.min(room as usize);
    }
    if let Some(n) = args.index_entries_per_file {
        config.index_entries_per_file = n;
    }
    let store = Store::open(config)
        .with_context(|| format!("cannot open the store in {}", args.dir.display()))?;
    let store = Arc::new(store);
    let first = next_seq(&store)?;
    tracing::info!(first, threads = args.concurrency, "store-writer appending");
    let seq = Arc::new(AtomicU64::new(first));
    let (done, failed) = mpsc::channel();
    for thread in 0..args.concurrency {
        let store = store.clone();
        let seq = seq.clone();
        let done = done.clone();
        std::thread::Builder::new()
            .name(format!("store-writer-{thread}"))
            .spawn(move || {
                let _ = done.send(append_forever(&store, &seq));
            })
            .context("cannot start a writer thread")?;
    }
    drop(done);
    // The threads only return on failure; the first failure ends the process.
    match failed.recv() {
        Ok(Err(e)) => Err(e),
        Ok(Ok(())) | Err(_) => bail!("a writer thread stopped without an error"),
    }
}

/// Appends records one at a time, taking sequence numbers from `seq`, and reports each
/// acknowledgement. Returns only on failure.
fn append_forever(store: &Store, seq: &AtomicU64) -> anyhow::Result<()> {
    loop {
        let s = seq.fetch_add(1, Ordering::Relaxed);
        let record = record_for(s);
        let queue = record.queue_id;
        let acked = store
            .append_blocking(vec![record])
            .with_context(|| format!("append of record {s} failed"))?;
        let offset = acked
            .first()
            .context("an acknowledged append returned no position")?
            .queue_offset;
        // One line per write, flushed at once, so that a kill never tears a line.
        let mut out = std::io::stdout().lock();
        writeln!(out, "ACK {s} {queue} {offset}")
            .and_then(|()| out.flush())
            .context("cannot write to stdout")?;
    }
}

/// One past the largest sequence number in the store (0 for an empty store).
fn next_seq(store: &Store) -> anyhow::Result<u64> {
    let mut next = 0;
    let mut position = store.log_range().start;
    loop {
        let (records, after) = store
            .read_log(position, 4096, 16 << 20)
            .context("cannot scan the log for the last sequence number")?;
        if records.is_empty() {
            return Ok(next);
        }
        for r in records.iter().filter(|r| r.data.topic == TOPIC) {
            let s: u64 = r.data.message_id.parse().with_context(|| {
                format!(
                    "record at log position {} has message id {:?}, not a sequence number",
                    r.position, r.data.message_id
                )
            })?;
            next = next.max(s + 1);
        }
        position = after;
    }
}
