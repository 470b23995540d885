//! `txmq serve` and the commands people use against it, run as real processes.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

struct Serve {
    child: Child,
    grpc: String,
    http: String,
}

impl Serve {
    fn start(dir: &std::path::Path) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_txmq"))
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--http",
                "127.0.0.1:0",
                "--data-dir",
            ])
            .arg(dir)
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start txmq serve");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let mut addr = |prefix: &str| -> String {
            let line = lines
                .next()
                .expect("serve printed its addresses")
                .expect("read stdout");
            line.strip_prefix(prefix)
                .unwrap_or_else(|| panic!("unexpected line {line:?}"))
                .to_string()
        };
        let grpc = addr("grpc ");
        let http = addr("http ");
        Self { child, grpc, http }
    }

    fn stop(mut self) {
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                assert!(status.success(), "txmq serve exited with {status}");
                return;
            }
            assert!(
                Instant::now() < deadline,
                "txmq serve did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_txmq"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run txmq")
}

fn txmq(args: &[&str]) -> Output {
    let out = run(args);
    assert!(
        out.status.success(),
        "txmq {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).expect("JSON on stdout")
}

#[test]
fn an_operator_creates_topics_sends_consumes_and_inspects_through_the_cli() {
    let dir = tempfile::tempdir().expect("temp dir");
    let serve = Serve::start(dir.path());
    let (g, h) = (serve.grpc.as_str(), serve.http.as_str());

    txmq(&[
        "topic",
        "create",
        "payments",
        "--type",
        "transaction",
        "--queues",
        "2",
        "--server",
        h,
    ]);
    txmq(&[
        "group",
        "create",
        "billing",
        "--max-attempts",
        "3",
        "--server",
        h,
    ]);
    let topics = json(&txmq(&["topic", "list", "--json", "--server", h]));
    assert!(
        topics
            .as_array()
            .expect("array")
            .iter()
            .any(|t| t["name"] == "payments" && t["type"] == "transaction")
    );

    let sent = txmq(&[
        "send",
        "orders",
        "order 7 paid",
        "--tag",
        "paid",
        "--server",
        g,
    ]);
    assert!(String::from_utf8_lossy(&sent.stdout).contains("sent "));
    let got = txmq(&[
        "consume", "orders", "--group", "billing", "--count", "1", "--server", g,
    ]);
    let line = String::from_utf8_lossy(&got.stdout);
    assert!(
        line.contains("order 7 paid") && line.contains("tag paid"),
        "{line}"
    );

    let groups = json(&txmq(&["group", "list", "--json", "--server", h]));
    let billing = groups
        .as_array()
        .expect("array")
        .iter()
        .find(|g| g["name"] == "billing")
        .expect("group listed")
        .clone();
    assert_eq!(
        (billing["max_attempts"].as_u64(), billing["lag"].as_u64()),
        (Some(3), Some(0))
    );
    assert_eq!(
        json(&txmq(&["tx", "list", "--json", "--server", h])),
        serde_json::json!([])
    );
    assert_eq!(
        json(&txmq(&["dlq", "list", "billing", "--json", "--server", h]))["count"],
        0
    );

    // A normal message to a transaction topic is refused, naming the problem.
    let err = failure(&["send", "payments", "x", "--server", g]);
    assert!(err.to_lowercase().contains("transaction"), "{err}");

    // A refusal's status is printed once, not once per layer that wraps it.
    let err = failure(&["send", "bad topic!", "x", "--server", g]);
    assert_eq!(err.matches("ILLEGAL_TOPIC").count(), 1, "{err}");
    serve.stop();
}

/// Runs txmq expecting it to fail; returns its stderr.
fn failure(args: &[&str]) -> String {
    let out = run(args);
    assert!(!out.status.success(), "txmq {args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn an_unreachable_server_is_reported_once() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let server = format!("127.0.0.1:{port}");
    let err = failure(&["send", "orders", "x", "--server", &server]);
    assert!(err.contains(&server), "{err}");
    assert_eq!(err.matches("Unavailable").count(), 1, "{err}");
}
