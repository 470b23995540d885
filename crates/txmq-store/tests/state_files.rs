use std::path::Path;
use std::sync::Arc;

use proptest::prelude::*;
use txmq_store::StateFiles;
use txmq_store::io::{Io, SimIo};

fn files(io: &SimIo) -> StateFiles {
    io.create_dir_all(Path::new("/s")).unwrap();
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
