//! The `txmq` binary's command line, run for real.

use std::process::{Command, Output};

fn txmq(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_txmq"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run txmq")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn version_comes_from_the_crate() {
    let out = txmq(&["--version"]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("txmq {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn bad_bench_arguments_fail_with_a_message_naming_the_problem() {
    let out = txmq(&["bench", "store"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--dir"), "{}", stderr(&out));

    for flag in ["--size", "--concurrency", "--seconds"] {
        let out = txmq(&["bench", "store", "--dir", "unused", flag, "0"]);
        assert!(!out.status.success(), "{flag} 0 was accepted");
        let msg = stderr(&out);
        assert!(msg.contains(flag) && msg.contains("at least 1"), "{msg}");
    }

    let dir = tempfile::tempdir().expect("temp dir");
    let target = dir.path().join("never-created");
    let out = txmq(&[
        "bench",
        "store",
        "--dir",
        target.to_str().expect("utf-8 path"),
        "--size",
        "100000000",
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("--size 100000000 is too large"),
        "{}",
        stderr(&out)
    );
    assert!(
        !target.exists(),
        "a refused run must not create the directory"
    );
}

#[test]
fn bench_store_prints_one_json_object_with_its_figures() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = txmq(&[
        "--log-level",
        "warn",
        "bench",
        "store",
        "--dir",
        dir.path().to_str().expect("utf-8 path"),
        "--seconds",
        "1",
        "--concurrency",
        "4",
        "--size",
        "100",
        "--segment-size",
        "1048576",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let json: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("stdout is one JSON object");
    assert_eq!(json["size"], 100);
    assert_eq!(json["concurrency"], 4);
    assert_eq!(json["durability"], "sync");
    assert!(json["appends"].as_u64().is_some_and(|n| n > 0), "{json}");
    for field in [
        "appends_per_sec",
        "mb_per_sec",
        "log_mb_per_sec",
        "p50_ms",
        "p99_ms",
        "p999_ms",
        "max_ms",
    ] {
        assert!(json[field].as_f64().is_some(), "{field} missing in {json}");
    }
    assert!(json.get("dd_mb_per_sec").is_none());
    assert!(stderr(&out).contains("appends/s"), "table goes to stderr");
}

#[test]
fn store_check_stops_at_damage_and_repair_truncates_there() {
    use std::os::unix::fs::FileExt;
    use txmq_store::{RecordData, RecordKind, Store, StoreConfig};

    let dir = tempfile::tempdir().expect("temp dir");
    let mut cfg = StoreConfig::new(dir.path());
    cfg.segment_size = 64 * 1024;
    cfg.max_record_size = 16 * 1024;
    let store = Store::open(cfg).expect("open");
    let acks: Vec<_> = (0..20)
        .map(|n| {
            let r = RecordData::new(RecordKind::Normal, "chk", 0, format!("record {n}"));
            store.append_blocking(vec![r]).expect("append")[0]
        })
        .collect();
    store.close().expect("close");
    std::fs::remove_file(dir.path().join("state/checkpoint")).expect("drop checkpoint");
    let seg = dir.path().join("log/00000000000000000000.log");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&seg)
        .expect("segment");
    f.write_all_at(&[0xee; 8], acks[10].position + 90)
        .expect("damage");
    drop(f);

    let d = dir.path().to_str().expect("utf-8 path");
    let out = txmq(&["store", "check", "--dir", d]);
    assert!(!out.status.success());
    let msg = stderr(&out);
    assert!(msg.contains(&seg.display().to_string()), "{msg}");
    assert!(
        msg.contains(&format!("at byte {}", acks[10].position)),
        "{msg}"
    );

    let out = txmq(&["store", "check", "--dir", d, "--repair", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(report["repair"]["records_dropped"], 9);
    assert_eq!(report["records_indexed"], 10);

    let out = txmq(&["store", "check", "--dir", d]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing to repair"));
}
