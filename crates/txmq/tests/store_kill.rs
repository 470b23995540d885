//! kill -9 of the real binary while it appends: every acknowledged record survives, nothing
//! that was never written appears, and a store recovered after a kill recovers again after
//! the next one.
//!
//! The writer is `txmq debug store-writer`. Its contract, restated here so that this test
//! checks the binary rather than shares its code: record `seq` goes to topic `kill`, queue
//! `seq % 4`, message id `seq` in decimal, body `payload-{seq}-` repeated `3 + seq % 8`
//! times; after each acknowledged append it prints `ACK <seq> <queue> <queue_offset>`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use txmq_store::{RecordKind, SEGMENT_HEADER_LEN, Store, StoreConfig};

const SEGMENT_SIZE: u64 = 262_144;
/// Small index files, so that the kills also land around index-file creation.
const INDEX_ENTRIES_PER_FILE: u64 = 512;
const TOPIC: &str = "kill";
const QUEUES: u32 = 4;
/// How long the writer appends before it is killed, once it has acknowledged its first record.
const RUN_BEFORE_KILL: Duration = Duration::from_millis(1500);
const KILL_CYCLES: usize = 3;

fn expected_body(seq: u64) -> Vec<u8> {
    format!("payload-{seq}-")
        .repeat(3 + (seq % 8) as usize)
        .into_bytes()
}

/// The configuration the writer opens the store with.
fn config(dir: &Path) -> StoreConfig {
    let mut c = StoreConfig::new(dir);
    c.segment_size = SEGMENT_SIZE;
    c.max_record_size = c
        .max_record_size
        .min((SEGMENT_SIZE - SEGMENT_HEADER_LEN as u64) as usize);
    c.index_entries_per_file = INDEX_ENTRIES_PER_FILE;
    c
}

/// A child process killed when dropped, so that a failing assertion leaves no writer behind.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A running `txmq debug store-writer` and the lines it has printed so far.
struct Writer {
    child: KillOnDrop,
    lines: mpsc::Receiver<String>,
    reader: JoinHandle<()>,
}

fn start_writer(dir: &Path) -> Writer {
    let mut child = Command::new(env!("CARGO_BIN_EXE_txmq"))
        .args(["--log-level", "warn", "debug", "store-writer", "--dir"])
        .arg(dir)
        .args(["--segment-size", &SEGMENT_SIZE.to_string()])
        .args([
            "--index-entries-per-file",
            &INDEX_ENTRIES_PER_FILE.to_string(),
        ])
        .args(["--concurrency", "4"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start txmq debug store-writer");
    let stdout = child.stdout.take().expect("writer stdout");
    let (tx, lines) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut stdout = BufReader::new(stdout);
        loop {
            let mut line = String::new();
            match stdout.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    if tx.send(line).is_err() {
                        return;
                    }
                }
            }
        }
    });
    Writer {
        child: KillOnDrop(child),
        lines,
        reader,
    }
}

/// Parses `ACK <seq> <queue> <queue_offset>\n` into (seq, queue, offset); `None` for a last
/// line cut short (the process died while printing it, so it reported nothing).
fn parse_ack(line: &str) -> Option<(u64, u32, u64)> {
    let complete = line.strip_suffix('\n')?;
    let fields: Vec<&str> = complete.split(' ').collect();
    let parsed = match fields.as_slice() {
        ["ACK", seq, queue, offset] => seq
            .parse()
            .ok()
            .zip(queue.parse().ok())
            .zip(offset.parse().ok())
            .map(|((s, q), o)| (s, q, o)),
        _ => None,
    };
    Some(parsed.unwrap_or_else(|| panic!("writer printed a malformed line {line:?}")))
}

/// Lets the writer append for a while, kills it with SIGKILL, and returns every
/// acknowledgement it printed as seq -> (queue, queue offset).
fn run_and_kill(dir: &Path) -> BTreeMap<u64, (u32, u64)> {
    let Writer {
        child: mut writer,
        lines,
        reader,
    } = start_writer(dir);
    let child = &mut writer.0;
    let mut acks = BTreeMap::new();
    let mut record = |line: String| {
        if let Some((seq, queue, offset)) = parse_ack(&line) {
            let before = acks.insert(seq, (queue, offset));
            assert!(before.is_none(), "seq {seq} acknowledged twice");
        }
    };

    // Start the clock at the first acknowledgement, so that a slow start-up (the writer
    // scans the store) still leaves a full run of appends before the kill.
    let first = lines
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|e| {
            let status = child.try_wait().ok().flatten();
            panic!("writer acknowledged nothing within 60 s ({e}); exit status {status:?}")
        });
    record(first);
    let kill_at = Instant::now() + RUN_BEFORE_KILL;
    while let Some(left) = kill_at.checked_duration_since(Instant::now()) {
        match lines.recv_timeout(left) {
            Ok(line) => record(line),
            Err(mpsc::RecvTimeoutError::Timeout) => break,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                panic!("writer stopped on its own: {:?}", child.try_wait())
            }
        }
    }
    assert_eq!(
        child.try_wait().expect("poll writer"),
        None,
        "writer exited before it was killed"
    );
    child.kill().expect("SIGKILL the writer");
    let status = child.wait().expect("reap the writer");
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "writer ended with {status:?}"
    );
    // Whatever it printed before dying is still in the pipe.
    reader.join().expect("stdout reader");
    for line in lines.try_iter() {
        record(line);
    }
    acks
}

/// Opens the store the killed writer left and checks it against every acknowledgement so
/// far. Returns the number of records stored.
fn check_recovered_store(dir: &Path, acked: &BTreeMap<u64, (u32, u64)>, cycle: usize) -> u64 {
    let store = Store::open(config(dir)).expect("reopen the store after kill -9");

    let report = store.recovery_report().clone();
    eprintln!("cycle {cycle}: {report:?}");
    assert!(
        report.repair.is_none(),
        "cycle {cycle}: a repair ran: {report:?}"
    );
    assert_eq!(
        report.log_end,
        store.log_range().end,
        "cycle {cycle}: {report:?}"
    );
    assert!(
        report.scanned_from <= report.log_end,
        "cycle {cycle}: {report:?}"
    );
    let segment_files = std::fs::read_dir(dir.join("log"))
        .expect("list log segments")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
        .count();
    assert_eq!(report.segments, segment_files, "cycle {cycle}: {report:?}");
    // A kill can tear at most the one write in flight, which is at most one group commit.
    assert!(
        report.torn_tail_bytes <= config(dir).max_batch_bytes as u64,
        "cycle {cycle}: {report:?}"
    );

    // Every record in every queue is one the writer wrote, at most once, and offsets are
    // contiguous from 0 (nothing is old enough for retention).
    assert!(
        store
            .queues()
            .iter()
            .all(|(t, q)| t == TOPIC && *q < QUEUES),
        "cycle {cycle}: unexpected queues {:?}",
        store.queues()
    );
    let mut at: HashMap<(u32, u64), u64> = HashMap::new();
    let mut seen = HashSet::new();
    for queue in 0..QUEUES {
        let Some(range) = store.queue_range(TOPIC, queue) else {
            continue;
        };
        assert_eq!(range.start, 0, "cycle {cycle}: queue {queue} lost its head");
        let mut offset = range.start;
        while offset < range.end {
            let records = store
                .read_queue(TOPIC, queue, offset, 1000)
                .unwrap_or_else(|e| panic!("cycle {cycle}: read {queue}@{offset}: {e}"));
            assert!(
                !records.is_empty(),
                "cycle {cycle}: queue {queue} has a hole at {offset}"
            );
            for r in records {
                assert_eq!(r.queue_offset, offset, "cycle {cycle}: queue {queue}");
                assert_eq!(r.data.kind, RecordKind::Normal);
                assert_eq!((r.data.topic.as_str(), r.data.queue_id), (TOPIC, queue));
                let seq: u64 = r.data.message_id.parse().unwrap_or_else(|_| {
                    panic!(
                        "cycle {cycle}: {queue}@{offset} has message id {:?}",
                        r.data.message_id
                    )
                });
                assert_eq!(
                    seq % QUEUES as u64,
                    queue as u64,
                    "cycle {cycle}: seq {seq}"
                );
                assert!(
                    r.data.body == expected_body(seq),
                    "cycle {cycle}: {queue}@{offset} (seq {seq}) has body {:?}",
                    String::from_utf8_lossy(&r.data.body)
                );
                assert!(seen.insert(seq), "cycle {cycle}: seq {seq} stored twice");
                at.insert((queue, offset), seq);
                offset += 1;
            }
        }
    }

    // Every acknowledged record is where the acknowledgement said.
    for (&seq, &(queue, offset)) in acked {
        assert_eq!(
            at.get(&(queue, offset)),
            Some(&seq),
            "cycle {cycle}: acknowledged seq {seq} is not at {queue}@{offset}"
        );
    }

    // The log holds exactly the indexed records.
    let mut position = store.log_range().start;
    let mut scanned = 0u64;
    loop {
        let (records, next) = store
            .read_log(position, 1000, usize::MAX)
            .unwrap_or_else(|e| panic!("cycle {cycle}: scan log at {position}: {e}"));
        if records.is_empty() {
            break;
        }
        scanned += records.len() as u64;
        position = next;
    }
    assert_eq!(
        scanned,
        seen.len() as u64,
        "cycle {cycle}: log and queue index disagree"
    );
    store.close().expect("close the recovered store");
    scanned
}

#[test]
fn killed_writer_loses_no_acknowledged_record() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut acked = BTreeMap::new();
    let mut stored = 0;
    for cycle in 1..=KILL_CYCLES {
        let acks = run_and_kill(dir.path());
        assert!(!acks.is_empty(), "cycle {cycle}: nothing acknowledged");
        for (seq, place) in acks {
            assert!(
                acked.insert(seq, place).is_none(),
                "cycle {cycle}: seq {seq} was already acknowledged by an earlier run"
            );
        }
        let now = check_recovered_store(dir.path(), &acked, cycle);
        eprintln!(
            "cycle {cycle}: {} acknowledged so far, {now} stored",
            acked.len()
        );
        assert!(
            now > stored,
            "cycle {cycle}: the store did not grow ({stored} -> {now})"
        );
        stored = now;
    }
}
