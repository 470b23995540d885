//! Power loss at any point: the store runs on a simulated file system that keeps written and
//! durable bytes apart; the power is cut after a chosen number of mutating operations, and
//! the store is reopened on the image a power loss leaves (un-synced sectors kept or lost at
//! random). Whatever the cut point:
//! - every acknowledged record comes back intact at its queue offset and position;
//! - nothing comes back that was not written, and no record comes back partial;
//! - the queue index agrees with the log.
//!
//! The crash is repeated on the recovered store, so recovery of a recovered store is covered.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use proptest::prelude::*;
use txmq_store::io::SimIo;
use txmq_store::{Appended, Durability, RecordData, Store, StoreConfig};

#[derive(Default)]
struct Ledger {
    /// Every record ever submitted, by message id.
    attempted: HashMap<String, RecordData>,
    /// Acknowledged records and where they landed.
    acked: Vec<(RecordData, Appended)>,
}

/// Appends from three threads (single records and small batches) and checkpoints from a
/// fourth until the power is cut or `per_thread` appends were made each.
fn run_workload(store: &Arc<Store>, ledger: &Arc<Mutex<Ledger>>, round: u64, per_thread: u64) {
    let mut threads = Vec::new();
    for t in 0..3u64 {
        let (store, ledger) = (store.clone(), ledger.clone());
        threads.push(std::thread::spawn(move || {
            for n in 0..per_thread {
                let id = round * 1_000_000 + t * 10_000 + n;
                let batch: Vec<RecordData> = (0..1 + id % 3)
                    .map(|k| record("crash", ((id + k) % 3) as u32, id * 10 + k))
                    .collect();
                {
                    let mut l = ledger.lock().unwrap();
                    for r in &batch {
                        l.attempted.insert(r.message_id.clone(), r.clone());
                    }
                }
                match store.append_blocking(batch.clone()) {
                    Ok(acks) => {
                        assert_eq!(acks.len(), batch.len());
                        ledger
                            .lock()
                            .unwrap()
                            .acked
                            .extend(batch.into_iter().zip(acks));
                    }
                    Err(_) => return,
                }
            }
        }));
    }
    let cp_store = store.clone();
    threads.push(std::thread::spawn(move || {
        for _ in 0..6 {
            std::thread::sleep(Duration::from_millis(2));
            if cp_store.checkpoint().is_err() {
                return;
            }
        }
    }));
    for t in threads {
        t.join().expect("workload thread");
    }
}

/// Checks the recovered store against the ledger.
fn verify(store: &Store, ledger: &Ledger, durable_acks: bool) {
    // Nothing that was not written, nothing partial.
    let mut present: HashMap<String, (u64, u64)> = HashMap::new();
    for (topic, q) in store.queues() {
        let range = store.queue_range(&topic, q).unwrap();
        for rec in store
            .read_queue(&topic, q, range.start, (range.end - range.start) as usize)
            .unwrap()
        {
            let sent = ledger
                .attempted
                .get(&rec.data.message_id)
                .unwrap_or_else(|| {
                    panic!(
                        "store returned a record never written: {:?}",
                        rec.data.message_id
                    )
                });
            assert_eq!(
                &rec.data, sent,
                "record {} differs from what was written",
                rec.data.message_id
            );
            assert!(
                present
                    .insert(
                        rec.data.message_id.clone(),
                        (rec.position, rec.queue_offset)
                    )
                    .is_none()
            );
        }
    }
    let end = store.log_range().end;
    for (data, at) in &ledger.acked {
        // In async mode only what was synced survives a power loss: always a prefix of the log.
        if !durable_acks && at.position >= end {
            continue;
        }
        let got = present.get(&data.message_id);
        assert_eq!(
            got,
            Some(&(at.position, at.queue_offset)),
            "acknowledged record {} at position {} lost or moved",
            data.message_id,
            at.position
        );
    }
    assert_index_agrees_with_log(store);
}

fn config(async_mode: bool) -> StoreConfig {
    let mut cfg = small_config("/data");
    cfg.segment_size = 8 * 1024;
    cfg.max_record_size = 4 * 1024;
    if async_mode {
        cfg.durability = Durability::Async {
            interval: Duration::from_millis(1),
            max_unsynced_bytes: 2048,
        };
    }
    cfg
}

fn crash_and_check(cut: u64, seed: u64, async_mode: bool) {
    let cfg = config(async_mode);
    let mut io = SimIo::new();
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    for round in 0..2 {
        let store = Arc::new(open_sim(&io, &cfg));
        if round > 0 {
            verify(&store, &ledger.lock().unwrap(), !async_mode);
        }
        io.cut_power_after(io.mutations() + cut);
        run_workload(&store, &ledger, round, 40);
        drop(store);
        io = io.crash(seed.wrapping_add(round));
        let store = open_sim(&io, &cfg);
        verify(&store, &ledger.lock().unwrap(), !async_mode);
        // Keep only what survived as acknowledged for the next round.
        let mut l = ledger.lock().unwrap();
        let end = store.log_range().end;
        l.acked.retain(|(_, at)| at.position < end);
        drop(store);
        io = io.crash(seed ^ 0x5555);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn power_loss_at_any_point_loses_no_acknowledged_record(cut in 1u64..400, seed in any::<u64>()) {
        crash_and_check(cut, seed, false);
    }

    #[test]
    fn power_loss_in_async_mode_keeps_a_consistent_prefix(cut in 1u64..400, seed in any::<u64>()) {
        crash_and_check(cut, seed, true);
    }
}

#[test]
fn power_loss_at_every_one_of_the_first_cut_points_loses_nothing_acknowledged() {
    for cut in 1..120 {
        crash_and_check(cut, cut * 7919, false);
    }
}
