mod common;

use common::*;
use txmq_store::{AppendError, RecordData, RecordKind, Store};

#[test]
fn appended_records_read_back_by_queue_offset_and_position() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(small_config(dir.path())).unwrap();
    let mut acked = Vec::new();
    for n in 0..200 {
        let a = store
            .append_blocking(vec![record("orders", (n % 3) as u32, n)])
            .unwrap();
        acked.push((n, a[0]));
    }
    for (n, a) in &acked {
        let r = store.read(a.position).unwrap();
        assert_eq!(r.data, record("orders", (n % 3) as u32, *n));
        let q = store
            .read_queue("orders", (n % 3) as u32, a.queue_offset, 1)
            .unwrap();
        assert_eq!(q[0].position, a.position);
    }
    assert_eq!(store.queue_range("orders", 0), Some(0..67));
    assert_index_agrees_with_log(&store);
    store.close().unwrap();
}

#[test]
fn a_batch_gets_consecutive_queue_offsets_and_reads_back_in_one_call() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(small_config(dir.path())).unwrap();
    let batch: Vec<_> = (0..10).map(|n| record("t", 0, n)).collect();
    let acked = store.append_blocking(batch.clone()).unwrap();
    let offsets: Vec<_> = acked.iter().map(|a| a.queue_offset).collect();
    assert_eq!(offsets, (0..10).collect::<Vec<_>>());
    let back = store.read_queue("t", 0, 0, 100).unwrap();
    assert_eq!(
        back.iter().map(|r| r.data.clone()).collect::<Vec<_>>(),
        batch
    );
    let entries = store.index_entries("t", 0, 3, 4).unwrap();
    assert_eq!(entries.len(), 4);
    assert_eq!(entries[0].tag_hash, txmq_store::tag_hash("odd"));
}

#[test]
fn records_survive_reopen_with_and_without_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_config(dir.path());
    {
        let store = Store::open(cfg.clone()).unwrap();
        for n in 0..100 {
            store.append_blocking(vec![record("a", 1, n)]).unwrap();
        }
        store.checkpoint().unwrap();
        for n in 100..150 {
            store.append_blocking(vec![record("a", 1, n)]).unwrap();
        }
        store.close().unwrap();
    }
    let store = Store::open(cfg.clone()).unwrap();
    assert!(!store.recovery_report().full_index_rebuild);
    assert_eq!(store.queue_range("a", 1), Some(0..150));
    assert_index_agrees_with_log(&store);
    store.close().unwrap();
    std::fs::remove_file(dir.path().join("state/checkpoint")).unwrap();
    let store = Store::open(cfg).unwrap();
    assert!(store.recovery_report().full_index_rebuild);
    assert_eq!(store.queue_range("a", 1), Some(0..150));
    let recs = store.read_queue("a", 1, 0, 150).unwrap();
    for (n, r) in recs.iter().enumerate() {
        assert_eq!(r.data, record("a", 1, n as u64));
    }
}

#[test]
fn invalid_and_oversized_records_are_refused_without_side_effects() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(small_config(dir.path())).unwrap();
    let big = RecordData::new(RecordKind::Normal, "t", 0, vec![0u8; 9000]);
    assert!(matches!(
        store.append_blocking(vec![record("t", 0, 0), big]),
        Err(AppendError::TooLarge { .. })
    ));
    let bad = RecordData::new(RecordKind::Normal, "", 0, "x");
    assert!(matches!(
        store.append_blocking(vec![bad]),
        Err(AppendError::Invalid(_))
    ));
    assert_eq!(store.queue_range("t", 0).map(|r| r.end).unwrap_or(0), 0);
    assert_eq!(
        store.append_blocking(vec![record("t", 0, 1)]).unwrap()[0].queue_offset,
        0
    );
}

#[test]
fn a_second_process_cannot_open_the_same_directory() {
    let dir = tempfile::tempdir().unwrap();
    let _store = Store::open(small_config(dir.path())).unwrap();
    let err = Store::open(small_config(dir.path()))
        .err()
        .expect("second open must fail");
    assert!(err.to_string().contains("in use"), "{err}");
}

#[test]
fn an_open_waits_briefly_for_a_holder_that_is_letting_go() {
    let dir = tempfile::tempdir().unwrap();
    let first = Store::open(small_config(dir.path())).unwrap();
    let closer = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(200));
        drop(first);
    });
    let second = Store::open(small_config(dir.path()));
    closer.join().unwrap();
    assert!(second.is_ok(), "{:?}", second.err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_async_appends_are_all_acknowledged_and_ordered_per_queue() {
    let dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(Store::open(small_config(dir.path())).unwrap());
    let mut tasks = Vec::new();
    for t in 0..16u64 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut last = None;
            for n in 0..50 {
                let a = store
                    .append(vec![record("c", (t % 4) as u32, t * 1000 + n)])
                    .await
                    .unwrap();
                if let Some(prev) = last {
                    assert!(a[0].queue_offset > prev);
                }
                last = Some(a[0].queue_offset);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let total: u64 = (0..4).map(|q| store.queue_range("c", q).unwrap().end).sum();
    assert_eq!(total, 800);
    assert_index_agrees_with_log(&store);
}
