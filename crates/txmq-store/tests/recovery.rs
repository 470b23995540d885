mod common;

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;

use common::*;
use txmq_store::{OpenError, Store, StoreConfig};

fn write_records(cfg: &StoreConfig, n: u64) -> Vec<txmq_store::Appended> {
    let store = Store::open(cfg.clone()).unwrap();
    let acks = (0..n)
        .map(|i| store.append_blocking(vec![record("r", 0, i)]).unwrap()[0])
        .collect();
    store.close().unwrap();
    acks
}

fn segment_path(cfg: &StoreConfig, position: u64) -> (std::path::PathBuf, u64) {
    let base = position - position % cfg.segment_size;
    (
        cfg.dir.join("log").join(format!("{base:020}.log")),
        position - base,
    )
}

#[test]
fn recovers_after_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_config(dir.path());
    let acks = write_records(&cfg, 30);
    // Garbage where the next record would go: a write that was cut short, never acknowledged.
    let last = acks.last().unwrap();
    let end = last.position + record("r", 0, 29).encoded_len() as u64;
    let (path, off) = segment_path(&cfg, end);
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(&[0x77, 0x01, 0, 0, 0xde, 0xad, 0xbe, 0xef, 1, 1, 0, 0], off)
        .unwrap();
    drop(f);

    let store = Store::open(cfg.clone()).unwrap();
    let report = store.recovery_report().clone();
    assert!(report.torn_tail_bytes > 0, "{report:?}");
    assert_eq!(report.log_end, end);
    assert_eq!(store.queue_range("r", 0), Some(0..30));
    assert_index_agrees_with_log(&store);
    // Appends continue right after the last good record.
    let next = store.append_blocking(vec![record("r", 0, 30)]).unwrap()[0];
    assert_eq!((next.position, next.queue_offset), (end, 30));
    store.close().unwrap();
    let store = Store::open(cfg).unwrap();
    assert_eq!(store.recovery_report().torn_tail_bytes, 0);
    assert_eq!(store.queue_range("r", 0), Some(0..31));
}

#[test]
fn recovers_after_a_record_cut_in_half_at_the_tail() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_config(dir.path());
    let acks = write_records(&cfg, 10);
    // Simulate the last write landing only partly: zero the second half of the last record.
    let last = acks.last().unwrap();
    let len = record("r", 0, 9).encoded_len() as u64;
    let (path, off) = segment_path(&cfg, last.position);
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(&vec![0u8; (len / 2) as usize], off + len / 2)
        .unwrap();
    drop(f);
    // Remove the checkpoint so that the whole log is scanned, as after a crash mid-run.
    std::fs::remove_file(cfg.dir.join("state/checkpoint")).unwrap();

    let store = Store::open(cfg).unwrap();
    assert_eq!(store.queue_range("r", 0), Some(0..9));
    assert_eq!(store.recovery_report().log_end, last.position);
    assert_index_agrees_with_log(&store);
}

#[test]
fn corruption_before_the_tail_stops_start_up_naming_file_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_config(dir.path());
    let acks = write_records(&cfg, 40);
    std::fs::remove_file(cfg.dir.join("state/checkpoint")).unwrap();
    let victim = acks[20];
    let (path, off) = segment_path(&cfg, victim.position);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, off + 100).unwrap();
    f.write_all_at(&[b[0] ^ 0x01], off + 100).unwrap();
    drop(f);

    let err = Store::open(cfg.clone())
        .err()
        .expect("damaged log must not open");
    match &err {
        OpenError::Corrupt {
            file,
            offset,
            position,
            ..
        } => {
            assert_eq!(file, &path);
            assert_eq!(*offset, off);
            assert_eq!(*position, victim.position);
        }
        other => panic!("unexpected error {other}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains(&path.display().to_string()) && msg.contains("repair"),
        "{msg}"
    );
}

#[test]
fn repair_truncates_at_the_damage_and_reports_what_it_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_config(dir.path());
    let acks = write_records(&cfg, 40);
    std::fs::remove_file(cfg.dir.join("state/checkpoint")).unwrap();
    let victim = acks[20];
    let (path, off) = segment_path(&cfg, victim.position);
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(&[0xff; 16], off + 40).unwrap();
    drop(f);

    let mut repair = cfg.clone();
    repair.repair = true;
    let store = Store::open(repair).unwrap();
    let r = store
        .recovery_report()
        .repair
        .clone()
        .expect("repair report");
    assert_eq!((r.file, r.offset), (path, off));
    assert_eq!(r.records_dropped, 19);
    let dropped: u64 = (21..40)
        .map(|i| record("r", 0, i).encoded_len() as u64)
        .sum();
    assert_eq!(r.bytes_dropped, dropped);
    assert_eq!(store.queue_range("r", 0), Some(0..20));
    assert_index_agrees_with_log(&store);
    store.close().unwrap();
    // The repaired store opens normally afterwards.
    let store = Store::open(cfg).unwrap();
    assert_eq!(store.queue_range("r", 0), Some(0..20));
}

#[test]
fn a_damaged_index_is_rebuilt_from_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_config(dir.path());
    write_records(&cfg, 50);
    // Destroy an index file that the checkpoint counts on.
    let qdir = cfg.dir.join("index/r/0");
    let first = std::fs::read_dir(&qdir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::remove_file(first).unwrap();
    let store = Store::open(cfg).unwrap();
    assert!(store.recovery_report().full_index_rebuild);
    assert_eq!(store.queue_range("r", 0), Some(0..50));
    assert_index_agrees_with_log(&store);
}

#[test]
fn the_number_of_entries_per_index_file_may_change_between_runs() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = small_config(dir.path());
    cfg.index_entries_per_file = 10;
    write_records(&cfg, 25);
    for per_file in [16, 7] {
        cfg.index_entries_per_file = per_file;
        let store = Store::open(cfg.clone()).unwrap();
        let start = store.queue_range("r", 0).unwrap().end;
        for i in start..start + 20 {
            let acked = store.append_blocking(vec![record("r", 0, i)]).unwrap();
            assert_eq!(acked[0].queue_offset, i);
        }
        assert_index_agrees_with_log(&store);
        store.close().unwrap();
    }
    let store = Store::open(cfg).unwrap();
    assert!(!store.recovery_report().full_index_rebuild);
    assert_eq!(store.queue_range("r", 0), Some(0..65));
    assert_index_agrees_with_log(&store);
}

#[test]
fn reopening_after_a_checkpoint_scans_only_the_newer_log() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = small_config(dir.path());
    cfg.segment_size = 64 * 1024;
    let store = Store::open(cfg.clone()).unwrap();
    for i in 0..500 {
        store
            .append_blocking(vec![record("big", (i % 4) as u32, i)])
            .unwrap();
    }
    store.checkpoint().unwrap();
    for i in 500..510 {
        store
            .append_blocking(vec![record("big", (i % 4) as u32, i)])
            .unwrap();
    }
    // Simulate a crash: no final checkpoint.
    std::mem::forget(store);
    // The lock belongs to the forgotten store's process; a crash would release it.
    let _ = std::fs::remove_file(cfg.dir.join("LOCK"));
    let store = Store::open(cfg).unwrap();
    let r = store.recovery_report();
    assert_eq!(r.records_scanned, 10, "{r:?}");
    assert!(!r.full_index_rebuild);
    assert_index_agrees_with_log(&store);
}

#[test]
fn a_newest_segment_whose_header_is_damaged_stops_start_up_instead_of_being_removed() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_config(dir.path());
    let acks = write_records(&cfg, 200);
    let last = acks.last().unwrap().position;
    let first = acks[0].position;
    let (path, _) = segment_path(&cfg, last);
    assert_ne!(
        segment_path(&cfg, first).0,
        path,
        "the records span more than one segment"
    );
    // One flipped bit in the header's version: the segment was finished and holds
    // acknowledged records.
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(&[2], 8).unwrap();
    drop(f);
    let err = Store::open(cfg.clone())
        .err()
        .expect("a damaged segment must not open");
    assert!(matches!(err, OpenError::BadFile { .. }), "{err}");
    assert!(path.exists(), "the segment was removed");
}

#[test]
fn a_segment_whose_creation_never_finished_is_removed_also_in_a_new_store() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_config(dir.path());
    // A new store cut off while its first segment was being made: the file, no header.
    std::fs::create_dir_all(cfg.dir.join("log")).unwrap();
    let (path, _) = segment_path(&cfg, 0);
    std::fs::write(&path, [0u8; 16]).unwrap();
    let store = Store::open(cfg.clone()).unwrap();
    let acked = store.append_blocking(vec![record("r", 0, 1)]).unwrap();
    store.close().unwrap();
    let store = Store::open(cfg).unwrap();
    assert_eq!(
        store.read(acked[0].position).unwrap().data,
        record("r", 0, 1)
    );
}
