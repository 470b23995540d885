//! `txmq store check`: open a data directory, report recovery, optionally repair.

use anyhow::Context;
use txmq_store::{Store, StoreConfig};

use crate::cli::StoreCheckArgs;

pub fn run(args: &StoreCheckArgs) -> anyhow::Result<()> {
    if !args.dir.is_dir() {
        anyhow::bail!("{} is not a directory", args.dir.display());
    }
    let mut config = StoreConfig::new(&args.dir);
    config.repair = args.repair;
    let store = Store::open(config)
        .with_context(|| format!("cannot open the store in {}", args.dir.display()))?;
    let r = store.recovery_report().clone();
    let queues = store.queues();
    let records: u64 = queues
        .iter()
        .filter_map(|(t, q)| store.queue_range(t, *q))
        .map(|r| r.end - r.start)
        .sum();
    let log = store.log_range();
    store.close().context("closing the store")?;
    if args.json {
        let repair = r.repair.as_ref().map(|p| {
            serde_json::json!({
                "file": p.file.display().to_string(),
                "offset": p.offset,
                "reason": p.reason,
                "records_dropped": p.records_dropped,
                "bytes_dropped": p.bytes_dropped,
            })
        });
        let out = serde_json::json!({
            "segments": r.segments,
            "log_start": log.start,
            "log_end": log.end,
            "queues": queues.len(),
            "records_indexed": records,
            "scanned_from": r.scanned_from,
            "records_scanned": r.records_scanned,
            "full_index_rebuild": r.full_index_rebuild,
            "torn_tail_bytes": r.torn_tail_bytes,
            "repair": repair,
        });
        println!("{out}");
    } else {
        println!("segments            {}", r.segments);
        println!("log                 {}..{}", log.start, log.end);
        println!("queues              {}", queues.len());
        println!("records indexed     {records}");
        println!(
            "scanned from        {} ({} records)",
            r.scanned_from, r.records_scanned
        );
        println!(
            "index rebuilt       {}",
            if r.full_index_rebuild { "yes" } else { "no" }
        );
        println!("torn tail cut       {} bytes", r.torn_tail_bytes);
        match &r.repair {
            Some(p) => println!(
                "repaired            truncated {} at byte {} ({}); dropped {} records, {} bytes",
                p.file.display(),
                p.offset,
                p.reason,
                p.records_dropped,
                p.bytes_dropped
            ),
            None => println!("repaired            nothing to repair"),
        }
    }
    Ok(())
}
