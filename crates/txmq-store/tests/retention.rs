mod common;

use std::time::Duration;

use common::*;
use txmq_store::{OpenError, Store};

const HOUR_MS: i64 = 3600 * 1000;

fn fill(store: &Store, n: u64) -> Vec<txmq_store::Appended> {
    (0..n)
        .map(|i| {
            store
                .append_blocking(vec![record("ret", (i % 2) as u32, i)])
                .unwrap()[0]
        })
        .collect()
}

#[test]
fn segments_older_than_the_age_limit_are_deleted_whole() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_config(dir.path());
    let store = Store::open(cfg.clone()).unwrap();
    let acks = fill(&store, 600);
    store.checkpoint().unwrap();
    let segments_before = std::fs::read_dir(cfg.dir.join("log")).unwrap().count();
    assert!(segments_before > 3);

    // Not yet 72 hours old: nothing goes.
    assert_eq!(store.apply_retention().unwrap().segments_deleted, 0);
    let later = txmq_store_now() + 73 * HOUR_MS;
    let r = store.apply_retention_at(later).unwrap();
    // Every segment but the active one is due.
    assert_eq!(r.segments_deleted, segments_before - 1);
    let start = store.log_range().start;
    assert!(start > acks[0].position);
    // Queues now start at the first record still in the log.
    for q in 0..2 {
        let range = store.queue_range("ret", q).unwrap();
        let first = store.read_queue("ret", q, range.start, 1).unwrap();
        assert!(first[0].position >= start);
        assert!(store.read_queue("ret", q, range.start - 1, 1).is_err());
    }
    assert_index_agrees_with_log(&store);
    store.close().unwrap();
    let store = Store::open(cfg).unwrap();
    assert_eq!(store.log_range().start, start);
    assert_index_agrees_with_log(&store);
}

#[test]
fn a_retention_floor_keeps_segments_still_needed() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_config(dir.path());
    let store = Store::open(cfg).unwrap();
    let acks = fill(&store, 200);
    store.checkpoint().unwrap();
    // An unresolved transaction's half message at record 60.
    store.set_retention_floor("transactions", Some(acks[60].position));
    let r = store
        .apply_retention_at(txmq_store_now() + 100 * HOUR_MS)
        .unwrap();
    assert_eq!(r.held_by.as_deref(), Some("transactions"));
    assert!(store.log_range().start <= acks[60].position);
    assert!(store.read(acks[60].position).is_ok());
    store.set_retention_floor("transactions", None);
    let r = store
        .apply_retention_at(txmq_store_now() + 100 * HOUR_MS)
        .unwrap();
    assert!(r.segments_deleted > 0);
    assert!(store.log_range().start > acks[60].position);
}

#[test]
fn the_oldest_segments_go_once_the_log_exceeds_its_size_limit() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = small_config(dir.path());
    cfg.retention.max_age = None;
    cfg.retention.max_total_bytes = Some(3 * cfg.segment_size);
    cfg.retention.check_interval = Duration::from_secs(3600);
    let store = Store::open(cfg.clone()).unwrap();
    fill(&store, 300);
    store.checkpoint().unwrap();
    store.apply_retention().unwrap();
    let left = std::fs::read_dir(cfg.dir.join("log")).unwrap().count() as u64;
    assert_eq!(left, 3);
    assert_index_agrees_with_log(&store);
}

#[test]
fn segments_past_the_checkpoint_are_kept_for_index_recovery() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_config(dir.path());
    let store = Store::open(cfg).unwrap();
    fill(&store, 100);
    store.checkpoint().unwrap();
    let at_checkpoint = store.log_range().end;
    fill(&store, 100);
    let r = store
        .apply_retention_at(txmq_store_now() + 100 * HOUR_MS)
        .unwrap();
    assert_eq!(r.held_by.as_deref(), Some("checkpoint"));
    assert!(store.log_range().start <= at_checkpoint);
}

#[test]
fn a_queue_that_retention_empties_goes_on_from_its_offsets_after_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_config(dir.path());
    let store = Store::open(cfg.clone()).unwrap();
    // 32 records: a whole number of index files, so retention removes all of them.
    for i in 0..32 {
        store.append_blocking(vec![record("gone", 0, i)]).unwrap();
    }
    fill(&store, 400);
    store.checkpoint().unwrap();
    let r = store
        .apply_retention_at(txmq_store_now() + 100 * HOUR_MS)
        .unwrap();
    assert!(r.segments_deleted > 0);
    assert_eq!(store.queue_range("gone", 0), Some(32..32));
    store.close().unwrap();

    // The whole index rebuilt from a log that holds no record of the queue.
    std::fs::remove_file(cfg.dir.join("state/checkpoint")).unwrap();
    let store = Store::open(cfg.clone()).unwrap();
    assert!(store.recovery_report().full_index_rebuild);
    assert_eq!(store.queue_range("gone", 0), Some(32..32));
    store.close().unwrap();

    // Opened from the checkpoint, with no index entry for the queue.
    let store = Store::open(cfg.clone()).unwrap();
    assert!(!store.recovery_report().full_index_rebuild);
    assert_eq!(store.queue_range("gone", 0), Some(32..32));
    let acked = store.append_blocking(vec![record("gone", 0, 32)]).unwrap();
    assert_eq!(acked[0].queue_offset, 32);
    assert_index_agrees_with_log(&store);
    store.close().unwrap();

    let store = Store::open(cfg).unwrap();
    assert!(!store.recovery_report().full_index_rebuild);
    assert_eq!(store.queue_range("gone", 0), Some(32..33));
    assert_index_agrees_with_log(&store);
}

#[test]
fn a_damaged_queue_floors_file_stops_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_config(dir.path());
    let store = Store::open(cfg.clone()).unwrap();
    fill(&store, 400);
    store.checkpoint().unwrap();
    store
        .apply_retention_at(txmq_store_now() + 100 * HOUR_MS)
        .unwrap();
    store.close().unwrap();
    let floors = cfg.dir.join("state/queue-floors");
    let mut bytes = std::fs::read(&floors).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&floors, bytes).unwrap();
    match Store::open(cfg.clone()) {
        Err(OpenError::BadFile { file, .. }) => assert_eq!(file, floors),
        other => panic!("expected BadFile, got {:?}", other.map(|_| ())),
    }
    let mut repair = cfg;
    repair.repair = true;
    let store = Store::open(repair).unwrap();
    assert_index_agrees_with_log(&store);
}

fn txmq_store_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}
