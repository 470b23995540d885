//! Helpers shared by the store's integration tests.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use txmq_store::io::SimIo;
use txmq_store::{RecordData, RecordKind, Store, StoreConfig};

/// A configuration with small files so that tests roll segments and index files.
pub fn small_config(dir: impl Into<PathBuf>) -> StoreConfig {
    let mut c = StoreConfig::new(dir);
    c.segment_size = 16 * 1024;
    c.max_record_size = 8 * 1024;
    c.index_entries_per_file = 16;
    c.checkpoint_interval = Duration::from_secs(3600);
    c
}

/// A record whose body names it, so a read-back can be checked against what was sent.
pub fn record(topic: &str, queue: u32, n: u64) -> RecordData {
    let mut r = RecordData::new(
        RecordKind::Normal,
        topic,
        queue,
        format!("body-{topic}-{queue}-{n}-").repeat(1 + (n % 7) as usize),
    );
    r.message_id = format!("{topic}-{queue}-{n}");
    r.tag = if n.is_multiple_of(2) {
        "even".into()
    } else {
        "odd".into()
    };
    r.keys = vec![format!("k{n}")];
    r.user_properties = vec![("n".into(), n.to_string())];
    r.born_timestamp = 1_700_000_000_000 + n as i64;
    r
}

pub fn open_sim(io: &SimIo, cfg: &StoreConfig) -> Store {
    Store::open_with(cfg.clone(), Arc::new(io.clone())).expect("open store")
}

/// Checks that every queue's index agrees with the log: each entry reads back a record of
/// that queue at that offset, and a scan of the whole log finds exactly the indexed records.
pub fn assert_index_agrees_with_log(store: &Store) {
    let mut indexed = 0usize;
    for (topic, q) in store.queues() {
        let range = store.queue_range(&topic, q).expect("range");
        let recs = store
            .read_queue(&topic, q, range.start, (range.end - range.start) as usize)
            .expect("read queue");
        assert_eq!(recs.len() as u64, range.end - range.start, "{topic}/{q}");
        for (i, r) in recs.iter().enumerate() {
            assert_eq!(r.queue_offset, range.start + i as u64);
        }
        indexed += recs.len();
    }
    let mut pos = store.log_range().start;
    let mut scanned = 0usize;
    loop {
        let (recs, next) = store.read_log(pos, 1000, usize::MAX).expect("scan log");
        if recs.is_empty() {
            break;
        }
        scanned += recs.len();
        pos = next;
    }
    assert_eq!(scanned, indexed, "log scan and queue index disagree");
}
