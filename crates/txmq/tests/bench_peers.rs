//! `txmq bench produce` against the real RabbitMQ and NATS of this machine and against a real
//! `txmq serve`, `txmq bench e2e` against a real `txmq serve`, and both against a txmq address
//! where nothing listens. RabbitMQ and NATS must be running: these tests fail, never skip,
//! when they are not.

use std::process::{Command, Output};

use serde_json::Value;

const RABBITMQ_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const NATS_URL: &str = "nats://127.0.0.1:4222";

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

/// Runs a one-second produce benchmark against `target` and returns its only result.
fn produce_for_a_second(target: &str, url_flag: &str, url: &str) -> Value {
    let out = txmq(&[
        "--log-level",
        "warn",
        "bench",
        "produce",
        "--target",
        target,
        url_flag,
        url,
        "--seconds",
        "1",
        "--concurrency",
        "4",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "txmq bench produce --target {target} failed (is {target} running at {url}? It must be, \
         in CI and outside): {}",
        stderr(&out)
    );
    let report: Value = serde_json::from_slice(&out.stdout).expect("one JSON object on stdout");
    let results = report["results"].as_array().expect("results");
    assert_eq!(results.len(), 1, "{report}");
    let r = results[0].clone();
    assert_eq!(r["target"], target, "{r}");
    assert!(r["msgs"].as_u64().expect("msgs") > 0, "{r}");
    assert_eq!(r["errors"], 0, "{r}");
    assert_eq!(r["deleted"], true, "{r}");
    // Every acknowledged message was in the queue or stream when it was deleted.
    assert_eq!(r["stored"], r["msgs"], "{r}");
    for key in [
        "msgs_per_sec",
        "mb_per_sec",
        "p50_ms",
        "p99_ms",
        "p999_ms",
        "max_ms",
    ] {
        assert!(r[key].as_f64().expect(key) > 0.0, "{key}: {r}");
    }
    r
}

/// The name at the end of `resource` ("durable classic queue NAME").
fn resource_name(r: &Value) -> String {
    let resource = r["resource"].as_str().expect("resource");
    let name = resource.rsplit(' ').next().expect("a name");
    assert!(name.starts_with("txmq-bench-"), "{resource}");
    name.to_string()
}

#[tokio::test]
async fn rabbitmq_run_publishes_confirmed_messages_and_deletes_its_queue() {
    let r = produce_for_a_second("rabbitmq", "--rabbitmq-url", RABBITMQ_URL);
    let queue = resource_name(&r);

    use lapin::options::QueueDeclareOptions;
    use lapin::types::FieldTable;
    let connection =
        lapin::Connection::connect(RABBITMQ_URL, lapin::ConnectionProperties::default())
            .await
            .expect("RabbitMQ must be running at 127.0.0.1:5672");
    let channel = connection.create_channel().await.expect("channel");
    let passive = channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions::durable().passive(),
            FieldTable::default(),
        )
        .await;
    assert!(passive.is_err(), "queue {queue} still exists after the run");
    let _ = connection.close(200, "test done".into()).await;
}

#[tokio::test]
async fn nats_run_publishes_acked_messages_and_deletes_its_stream() {
    let r = produce_for_a_second("nats", "--nats-url", NATS_URL);
    let stream = resource_name(&r);
    assert!(r["server_version"].is_string(), "{r}");

    let client = async_nats::connect(NATS_URL)
        .await
        .expect("NATS must be running at 127.0.0.1:4222");
    let js = async_nats::jetstream::new(client);
    assert!(
        js.get_stream(&stream).await.is_err(),
        "stream {stream} still exists after the run"
    );
}

#[test]
fn unreachable_txmq_server_fails_with_its_address() {
    for args in [
        &[
            "bench",
            "produce",
            "--server",
            "127.0.0.1:1",
            "--seconds",
            "1",
        ][..],
        &[
            "bench",
            "produce",
            "--target",
            "all",
            "--server",
            "127.0.0.1:1",
            "--seconds",
            "1",
        ],
        &["bench", "e2e", "--server", "127.0.0.1:1", "--seconds", "1"],
    ] {
        let out = txmq(args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let msg = stderr(&out);
        assert!(
            msg.contains("cannot connect to the txmq server at http://127.0.0.1:1"),
            "{args:?}: {msg}"
        );
        assert!(out.stdout.is_empty(), "{args:?} printed a report");
    }
}

#[test]
fn transactional_sends_are_refused_for_a_peer_alone() {
    let out = txmq(&["bench", "produce", "--target", "nats", "--transactional"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--transactional"), "{}", stderr(&out));
}

/// A `txmq serve` on free ports and a temporary data directory, killed on drop.
struct Server {
    child: std::process::Child,
    grpc: String,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start() -> Self {
        let free_port = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
                .to_string()
        };
        let (grpc, http) = (free_port(), free_port());
        let dir = tempfile::tempdir().expect("temp dir");
        let child = Command::new(env!("CARGO_BIN_EXE_txmq"))
            .args([
                "--log-level",
                "warn",
                "serve",
                "--listen",
                &grpc,
                "--http",
                &http,
            ])
            .arg("--data-dir")
            .arg(dir.path())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start txmq serve");
        let server = Server {
            child,
            grpc,
            _dir: dir,
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while std::net::TcpStream::connect(&server.grpc).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "txmq serve did not listen on {}",
                server.grpc
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        server
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn txmq_target_sends_plain_and_transactional_messages_to_a_real_server() {
    let server = Server::start();
    for (topic, extra) in [("bench-plain", None), ("bench-tx", Some("--transactional"))] {
        let mut args = vec![
            "--log-level",
            "warn",
            "bench",
            "produce",
            "--server",
            &server.grpc,
            "--topic",
            topic,
            "--seconds",
            "1",
            "--concurrency",
            "4",
            "--json",
        ];
        args.extend(extra);
        let out = txmq(&args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        let report: Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
        let r = &report["results"][0];
        assert_eq!(r["target"], "txmq", "{report}");
        assert!(r["msgs"].as_u64().expect("msgs") > 0, "{report}");
        assert_eq!(r["errors"], 0, "{report}");
        assert_eq!(report["transactional"], extra.is_some(), "{report}");
    }
}

#[test]
fn e2e_receives_every_acknowledged_message_once() {
    let server = Server::start();
    let out = txmq(&[
        "--log-level",
        "warn",
        "bench",
        "e2e",
        "--server",
        &server.grpc,
        "--topic",
        "e2e",
        "--group",
        "e2e-group",
        "--rate",
        "500",
        "--seconds",
        "1",
        "--size",
        "100",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let r: Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(r["sent"], 500, "{r}");
    assert_eq!(r["received"], r["sent"], "{r}");
    for key in [
        "lost",
        "duplicates",
        "stale",
        "send_errors",
        "receive_errors",
        "ack_errors",
    ] {
        assert_eq!(r[key], 0, "{key}: {r}");
    }
    assert!(r["e2e"]["p50_ms"].as_f64().expect("p50") > 0.0, "{r}");
}
