use std::path::Path;
use std::sync::Arc;

use proptest::prelude::*;
use txmq_store::StateFiles;
use txmq_store::io::{Io, SimIo};

fn files(io: &SimIo) -> StateFiles {
    io.create_dir_all(Path::new("/s")).unwrap();
    io.sync_dir(Path::new("/")).unwrap();
    StateFiles::new(Arc::new(io.clone()), "/s")
}

#[test]
fn a_state_file_reads_back_what_was_written() {
    let io = SimIo::new();
    let f = files(&io);
    assert_eq!(f.read("offsets").unwrap(), None);
    f.write("offsets", b"v1").unwrap();
    f.write("offsets", b"version two").unwrap();
    assert_eq!(
        f.read("offsets").unwrap().as_deref(),
        Some(&b"version two"[..])
    );
    f.remove("offsets").unwrap();
    assert_eq!(f.read("offsets").unwrap(), None);
}

#[test]
fn bad_state_file_names_are_refused() {
    let io = SimIo::new();
    let f = files(&io);
    for name in ["", "../x", "a/b", ".hidden", "x.tmp"] {
        assert!(f.write(name, b"x").is_err(), "{name:?} accepted");
    }
}

#[test]
fn a_damaged_state_file_is_reported_not_returned() {
    let io = SimIo::new();
    let f = files(&io);
    f.write("tx", b"transactions").unwrap();
    io.corrupt(Path::new("/s/tx"), 30);
    let err = f.read("tx").unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, failure_persistence: None, ..ProptestConfig::default() })]

    /// A power loss at any point of a replacement leaves the old or the new contents, whole.
    #[test]
    fn power_loss_during_replacement_leaves_old_or_new_contents(cut in 0u64..12, seed in any::<u64>()) {
        let io = SimIo::new();
        let f = files(&io);
        let old = vec![1u8; 3000];
        let new = vec![2u8; 5000];
        f.write("state", &old).unwrap();
        io.cut_power_after(io.mutations() + cut);
        let acked = f.write("state", &new).is_ok();
        let image = io.crash(seed);
        let got = files(&image).read("state").unwrap().expect("state file must exist");
        if acked {
            prop_assert_eq!(got, new);
        } else {
            prop_assert!(got == old || got == new);
        }
    }
}

/// The broker's pattern for small state: a snapshot in a state file naming the log position it
/// covers, and every change after it as a record in the log. After a power loss, the snapshot
/// plus the acknowledged changes after its position are all there, in order.
#[test]
fn state_changes_written_through_the_log_replay_after_a_power_loss() {
    use txmq_store::{RecordData, RecordKind, Store, StoreConfig};

    let io = SimIo::new();
    let mut cfg = StoreConfig::new("/broker");
    cfg.segment_size = 16 * 1024;
    cfg.max_record_size = 4096;
    let store = Store::open_with(cfg.clone(), Arc::new(io.clone())).unwrap();
    let change = |kind, n: u64| RecordData::new(kind, "%SYS%STATE", 0, format!("change {n}"));
    for n in 0..10 {
        store
            .append_blocking(vec![change(RecordKind::ConsumerOffset, n)])
            .unwrap();
    }
    // Snapshot of everything so far, naming the position it covers.
    let covered = store.log_range().end;
    store
        .state_files()
        .write("offsets", format!("through 9 at {covered}").as_bytes())
        .unwrap();
    let mut acked = Vec::new();
    for n in 10..40 {
        let kind = if n % 2 == 0 {
            RecordKind::TxResolution
        } else {
            RecordKind::DeliveryState
        };
        acked.push(store.append_blocking(vec![change(kind, n)]).unwrap()[0]);
    }
    let image = io.crash(11);
    drop(store);

    let store = Store::open_with(cfg, Arc::new(image)).unwrap();
    let snapshot = store.state_files().read("offsets").unwrap().unwrap();
    assert_eq!(snapshot, format!("through 9 at {covered}").into_bytes());
    let (replayed, _) = store.read_log(covered, 1000, usize::MAX).unwrap();
    let bodies: Vec<String> = replayed
        .iter()
        .map(|r| String::from_utf8(r.data.body.clone()).unwrap())
        .collect();
    let expected: Vec<String> = (10..40).map(|n| format!("change {n}")).collect();
    assert_eq!(bodies, expected);
    assert_eq!(
        replayed.iter().map(|r| r.position).collect::<Vec<_>>(),
        acked.iter().map(|a| a.position).collect::<Vec<_>>()
    );
    assert_eq!(replayed[0].data.kind, RecordKind::TxResolution);
}
