//! `txmq serve` killed with SIGKILL under a mixed load and restarted on the same data
//! directory, twice, then stopped with SIGTERM and restarted once more.
//!
//! The load: producers of normal messages, 1 to 4 to a request; transactional producers of 1
//! to 3 half messages to a request (each a transaction of its own) that commit even sequence
//! numbers and roll back odd ones, leaving every fifth open to be answered after the restart;
//! consumers of group `g` that acknowledge what they receive. The test keeps a ledger of the
//! broker's answers and, after each restart, checks the broker against it:
//!
//! - every message whose SendMessage was answered OK, and every committed transaction's
//!   message, is delivered at least once across the runs;
//! - no rolled-back transaction's message is ever delivered;
//! - no message whose acknowledgement was answered OK is delivered by a later run;
//! - nothing is delivered that was never sent, and every body is the one sent;
//! - transactions keep their state across the kill, and open ones are still known and can
//!   be resolved by their transaction ids;
//! - receipt handles of the killed run are refused.
//!
//! A call cut short by the kill got no answer, so whether it took effect is in doubt: the
//! ledger keeps such calls apart and the checks accept either outcome for them.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use serde_json::{Value, json};
use tonic::Request;
use tonic::transport::{Channel, Endpoint};
use txmq_proto::v2::messaging_service_client::MessagingServiceClient;
use txmq_proto::v2::{
    self as pb, Code, MessageType, TransactionResolution, receive_message_response,
};

const NORMAL_TOPIC: &str = "orders";
const TX_TOPIC: &str = "payments";
const GROUP: &str = "g";
const KILL_CYCLES: usize = 2;
const NORMAL_PRODUCERS: usize = 3;
const TX_PRODUCERS: usize = 2;
const CONSUMERS_PER_TOPIC: usize = 2;
/// Far longer than a run, so one run delivers each message at most once.
const INVISIBLE: Duration = Duration::from_secs(30);
/// Load before the first kill, at least.
const MIN_LOAD: Duration = Duration::from_millis(1500);
/// The broker snapshots its state when it starts and then every 5 s: the second kill comes
/// after the first periodic snapshot, so that restart loads a snapshot taken under load.
const FIRST_PERIODIC_SNAPSHOT: Duration = Duration::from_secs(5);
/// Small segments: the load fills several, so kills also land around segment rollover, and
/// the scan past the tail after a kill (to the end of the last segment) stays short.
const SEGMENT_SIZE: u64 = 256 << 10;
/// Bounds every gRPC and HTTP call.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
const START_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

type Client = MessagingServiceClient<Channel>;

/// The body sent with message `id`.
fn body_of(id: &str) -> Vec<u8> {
    format!("body of {id};")
        .repeat(1 + id.len() % 5)
        .into_bytes()
}

/// Whether transaction message `id` (`...-<seq>`) is to be committed (even `seq`) or rolled
/// back (odd).
fn commits(id: &str) -> bool {
    sequence(id).is_multiple_of(2)
}

/// Whether transaction message `id` is left open for the check after the restart (every
/// fifth).
fn commits_left_open(id: &str) -> bool {
    sequence(id).is_multiple_of(5)
}

fn sequence(id: &str) -> u64 {
    id.rsplit('-')
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("message id {id:?} does not end with a sequence number"))
}

/// Up to `max` milliseconds, from the clock: where in its window a kill lands.
fn jitter(max: Duration) -> Duration {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    max.mul_f64(f64::from(nanos % 1000) / 1000.0)
}

// ---------------------------------------------------------------------------------------
// The server process.

/// A running `txmq serve`; killed when dropped, so a failing test leaves no broker behind.
struct ServerProcess {
    child: Child,
    grpc: SocketAddr,
    http: SocketAddr,
    /// When it printed its addresses.
    started: Instant,
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ServerProcess {
    fn start(dir: &Path) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_txmq"));
        cmd.args(["--log-level", "warn", "serve", "--data-dir"])
            .arg(dir)
            .args(["--listen", "127.0.0.1:0", "--http", "127.0.0.1:0"])
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("TXMQ_") {
                cmd.env_remove(key);
            }
        }
        cmd.env("TXMQ_SEGMENT_SIZE", SEGMENT_SIZE.to_string());
        let mut child = cmd.spawn().expect("start txmq serve");
        let stdout = child.stdout.take().expect("txmq serve stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let unbound = SocketAddr::from(([127, 0, 0, 1], 0));
        let mut server = Self {
            child,
            grpc: unbound,
            http: unbound,
            started: Instant::now(),
        };
        server.grpc = server.read_addr(&lines, "grpc");
        server.http = server.read_addr(&lines, "http");
        server.started = Instant::now();
        server
    }

    /// Reads the `<name> ADDR` line the server prints once it listens.
    fn read_addr(&mut self, lines: &mpsc::Receiver<String>, name: &str) -> SocketAddr {
        let line = match lines.recv_timeout(START_TIMEOUT) {
            Ok(line) => line,
            Err(e) => panic!(
                "txmq serve printed no `{name} ADDR` line within {START_TIMEOUT:?} ({e}); exit status {:?}",
                self.child.try_wait()
            ),
        };
        line.strip_prefix(name)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|addr| addr.trim().parse().ok())
            .unwrap_or_else(|| panic!("txmq serve printed {line:?}, expected `{name} ADDR`"))
    }

    /// SIGKILL (what `Child::kill` sends on unix), and check that is how it ended.
    fn kill9(mut self) {
        assert_eq!(
            self.child.try_wait().expect("poll txmq serve"),
            None,
            "txmq serve exited before it was killed"
        );
        self.child.kill().expect("SIGKILL txmq serve");
        let status = self.child.wait().expect("reap txmq serve");
        assert_eq!(
            status.signal(),
            Some(libc::SIGKILL),
            "txmq serve ended with {status:?}"
        );
    }

    /// SIGTERM, and check it exits with status 0 in time.
    fn terminate(mut self) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits pid_t");
        // SAFETY: `pid` is our child and not reaped yet, so it names that process.
        let sent = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(sent, 0, "SIGTERM: {}", std::io::Error::last_os_error());
        let deadline = Instant::now() + STOP_TIMEOUT;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("poll txmq serve") {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "txmq serve did not exit within {STOP_TIMEOUT:?} of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(
            status.code(),
            Some(0),
            "txmq serve ended with {status:?} after SIGTERM"
        );
    }
}

async fn start(dir: &Path) -> ServerProcess {
    let dir: PathBuf = dir.to_path_buf();
    tokio::task::spawn_blocking(move || ServerProcess::start(&dir))
        .await
        .expect("start txmq serve")
}

async fn kill9(server: ServerProcess) {
    tokio::task::spawn_blocking(move || server.kill9())
        .await
        .expect("kill -9 txmq serve");
}

async fn terminate(server: ServerProcess) {
    tokio::task::spawn_blocking(move || server.terminate())
        .await
        .expect("stop txmq serve with SIGTERM");
}

// ---------------------------------------------------------------------------------------
// The admin API.

/// GET `path`, or POST `body` to it; the JSON answer of a 2xx response.
async fn admin(http: SocketAddr, path: &str, body: Option<Value>) -> Value {
    let url = format!("http://{http}{path}");
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(CALL_TIMEOUT))
            .build()
            .into();
        let response = match body {
            Some(b) => agent.post(&url).send_json(b),
            None => agent.get(&url).call(),
        };
        let mut response = response.unwrap_or_else(|e| panic!("{url}: {e}"));
        let status = response.status();
        let value: Value = response
            .body_mut()
            .read_json()
            .unwrap_or_else(|e| panic!("{url} answered {status} without JSON: {e}"));
        assert!(status.is_success(), "{url} answered {status}: {value}");
        value
    })
    .await
    .expect("admin call")
}

async fn create_topics(http: SocketAddr) {
    for (name, kind, queues) in [(NORMAL_TOPIC, "normal", 4), (TX_TOPIC, "transaction", 2)] {
        let t = admin(
            http,
            "/topics",
            Some(json!({"name": name, "type": kind, "queues": queues})),
        )
        .await;
        assert_eq!(
            (t["name"].as_str(), t["type"].as_str(), t["queues"].as_u64()),
            (Some(name), Some(kind), Some(queues)),
            "{t}"
        );
    }
}

/// Every transaction the broker knows: message id -> (transaction id, state).
async fn transactions(http: SocketAddr) -> BTreeMap<String, (String, String)> {
    let list = admin(http, "/transactions?state=all", None).await;
    let mut out = BTreeMap::new();
    for tx in list.as_array().expect("GET /transactions answers a list") {
        let field = |k: &str| {
            tx[k]
                .as_str()
                .unwrap_or_else(|| panic!("transaction without {k}: {tx}"))
                .to_string()
        };
        assert_eq!(field("topic"), TX_TOPIC, "{tx}");
        let message_id = field("message_id");
        let before = out.insert(message_id.clone(), (field("id"), field("state")));
        assert!(
            before.is_none(),
            "two transactions for message {message_id}: {before:?} and {tx}"
        );
    }
    out
}

// ---------------------------------------------------------------------------------------
// The gRPC client.

fn resource(name: &str) -> Option<pb::Resource> {
    Some(pb::Resource {
        resource_namespace: String::new(),
        name: name.into(),
    })
}

fn req<T>(client_id: &str, body: T) -> Request<T> {
    let mut r = Request::new(body);
    r.metadata_mut().insert(
        "x-mq-client-id",
        client_id.parse().expect("ASCII client id"),
    );
    r.set_timeout(CALL_TIMEOUT);
    r
}

fn code(status: Option<&pb::Status>) -> Code {
    status.map_or(Code::Unspecified, |s| {
        Code::try_from(s.code).unwrap_or(Code::Unspecified)
    })
}

async fn connect(addr: SocketAddr) -> Client {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect_timeout(CALL_TIMEOUT)
        .timeout(CALL_TIMEOUT);
    let channel = tokio::time::timeout(CALL_TIMEOUT, endpoint.connect())
        .await
        .unwrap_or_else(|_| panic!("connecting to {addr} timed out"))
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    MessagingServiceClient::new(channel)
}

/// The broker's answer to a call, or `None` if the call failed or timed out (then whatever
/// it asked for may or may not have happened).
async fn answer<T>(
    call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Option<T> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(Ok(response)) => Some(response.into_inner()),
        _ => None,
    }
}

fn message(topic: &str, id: &str, kind: MessageType) -> pb::Message {
    pb::Message {
        topic: resource(topic),
        user_properties: Default::default(),
        system_properties: Some(pb::SystemProperties {
            message_id: id.into(),
            message_type: kind as i32,
            tag: Some("kill".into()),
            ..Default::default()
        }),
        body: body_of(id).into(),
    }
}

/// One SendMessage with a message per id, all of one topic and type.
async fn send(
    c: &mut Client,
    client_id: &str,
    topic: &str,
    ids: &[String],
    kind: MessageType,
) -> Option<pb::SendMessageResponse> {
    let r = pb::SendMessageRequest {
        messages: ids.iter().map(|id| message(topic, id, kind)).collect(),
    };
    answer(c.send_message(req(client_id, r))).await
}

/// The transaction ids (empty for normal messages) of a SendMessage answered OK for each of
/// its `n` messages.
fn accepted(r: &pb::SendMessageResponse, n: usize) -> Option<Vec<String>> {
    let ok = code(r.status.as_ref()) == Code::Ok
        && r.entries.len() == n
        && r.entries
            .iter()
            .all(|e| code(e.status.as_ref()) == Code::Ok);
    ok.then(|| r.entries.iter().map(|e| e.transaction_id.clone()).collect())
}

/// The ids of the next request of `name`: 1 to `most` messages, by request number, each with
/// the next sequence number.
fn next_ids(name: &str, request: u64, most: u64, seq: &mut u64) -> Vec<String> {
    (0..1 + request % most)
        .map(|_| {
            *seq += 1;
            format!("{name}-{seq}")
        })
        .collect()
}

async fn end_transaction(
    c: &mut Client,
    client_id: &str,
    id: &str,
    tx_id: &str,
    commit: bool,
) -> Option<Code> {
    let resolution = if commit {
        TransactionResolution::Commit
    } else {
        TransactionResolution::Rollback
    };
    let r = pb::EndTransactionRequest {
        topic: resource(TX_TOPIC),
        message_id: id.into(),
        transaction_id: tx_id.into(),
        resolution: resolution as i32,
        source: pb::TransactionSource::SourceClient as i32,
        trace_context: String::new(),
    };
    answer(c.end_transaction(req(client_id, r)))
        .await
        .map(|r| code(r.status.as_ref()))
}

/// What one ReceiveMessage call brought.
struct Received {
    status: Option<Code>,
    /// Everything that arrived, also when the stream broke afterwards.
    messages: Vec<pb::Message>,
    /// Whether the stream ended normally.
    complete: bool,
}

async fn receive(c: &mut Client, client_id: &str, topic: &str, long_poll: Duration) -> Received {
    let r = pb::ReceiveMessageRequest {
        group: resource(GROUP),
        message_queue: Some(pb::MessageQueue {
            topic: resource(topic),
            id: -1,
            ..Default::default()
        }),
        filter_expression: Some(pb::FilterExpression {
            r#type: pb::FilterType::Tag as i32,
            expression: "*".into(),
        }),
        batch_size: 16,
        invisible_duration: Some(INVISIBLE.try_into().expect("duration")),
        auto_renew: false,
        long_polling_timeout: Some(long_poll.try_into().expect("duration")),
        attempt_id: None,
    };
    let mut got = Received {
        status: None,
        messages: Vec::new(),
        complete: false,
    };
    let call = async {
        let Ok(response) = c.receive_message(req(client_id, r)).await else {
            return false;
        };
        let mut stream = response.into_inner();
        while let Some(item) = stream.next().await {
            match item.map(|i| i.content) {
                Ok(Some(receive_message_response::Content::Status(s))) => {
                    got.status = Some(code(Some(&s)));
                }
                Ok(Some(receive_message_response::Content::Message(m))) => got.messages.push(m),
                Ok(_) => {}
                Err(_) => return false,
            }
        }
        true
    };
    let complete = tokio::time::timeout(long_poll + CALL_TIMEOUT, call)
        .await
        .unwrap_or(false);
    got.complete = complete;
    got
}

/// Acknowledges (message id, receipt handle) pairs; the answer for each, or `None` if the
/// call got no answer.
async fn ack(
    c: &mut Client,
    client_id: &str,
    topic: &str,
    entries: &[(String, String)],
) -> Option<Vec<(String, Code)>> {
    let r = pb::AckMessageRequest {
        group: resource(GROUP),
        topic: resource(topic),
        entries: entries
            .iter()
            .map(|(id, handle)| pb::AckMessageEntry {
                message_id: id.clone(),
                receipt_handle: handle.clone(),
                lite_topic: None,
            })
            .collect(),
    };
    let response = answer(c.ack_message(req(client_id, r))).await?;
    Some(
        entries
            .iter()
            .map(|(id, handle)| {
                let c = response
                    .entries
                    .iter()
                    .find(|e| &e.message_id == id && &e.receipt_handle == handle)
                    .map_or(Code::Unspecified, |e| code(e.status.as_ref()));
                (id.clone(), c)
            })
            .collect(),
    )
}

// ---------------------------------------------------------------------------------------
// The ledger.

/// One delivery to group `g`.
#[derive(Debug, Clone)]
struct Delivery {
    topic: String,
    id: String,
    body: Vec<u8>,
    handle: String,
}

impl Delivery {
    fn of(m: &pb::Message) -> Self {
        let sp = m.system_properties.clone().unwrap_or_default();
        Self {
            topic: m.topic.as_ref().map(|t| t.name.clone()).unwrap_or_default(),
            id: sp.message_id,
            body: m.body.to_vec(),
            handle: sp.receipt_handle.unwrap_or_default(),
        }
    }
}

/// What one server process answered: the ids of the messages concerned.
#[derive(Debug, Default)]
struct Run {
    /// Normal messages whose SendMessage was answered OK.
    sent: BTreeSet<String>,
    /// Normal messages sent without an answer.
    sent_in_doubt: BTreeSet<String>,
    /// Half messages answered OK: message id -> transaction id.
    halves: BTreeMap<String, String>,
    /// Half messages sent without an answer.
    halves_in_doubt: BTreeSet<String>,
    /// EndTransaction COMMIT answered OK.
    committed: BTreeSet<String>,
    /// EndTransaction ROLLBACK answered OK.
    rolled_back: BTreeSet<String>,
    /// EndTransaction sent without an answer.
    ends_in_doubt: BTreeSet<String>,
    /// Transactions left open on purpose, for the next run to resolve.
    left_open: BTreeSet<String>,
    /// Every delivery, in order.
    delivered: Vec<Delivery>,
    /// Acknowledgements answered OK.
    acked: BTreeSet<String>,
    /// Acknowledgements sent without an answer.
    acks_in_doubt: BTreeSet<String>,
    /// Answers a live broker should not give.
    errors: Vec<String>,
}

impl Run {
    fn summary(&self) -> String {
        format!(
            "{} sent ({} in doubt), {} halves ({} in doubt), {} committed, {} rolled back, {} left open, {} ends in doubt, {} delivered, {} acked ({} in doubt)",
            self.sent.len(),
            self.sent_in_doubt.len(),
            self.halves.len(),
            self.halves_in_doubt.len(),
            self.committed.len(),
            self.rolled_back.len(),
            self.left_open.len(),
            self.ends_in_doubt.len(),
            self.delivered.len(),
            self.acked.len(),
            self.acks_in_doubt.len(),
        )
    }

    /// Whether the load exercised every kind of call, with both topics consumed.
    fn has_every_kind(&self) -> bool {
        !self.sent.is_empty()
            && !self.committed.is_empty()
            && !self.rolled_back.is_empty()
            && !self.left_open.is_empty()
            && self.acked.iter().any(|id| id.starts_with('n'))
            && self.acked.iter().any(|id| id.starts_with('t'))
    }
}

fn union(runs: &[&Run], set: impl Fn(&Run) -> &BTreeSet<String>) -> BTreeSet<String> {
    runs.iter().flat_map(|r| set(r).iter().cloned()).collect()
}

/// Judges every delivery so far against what the broker answered.
fn check_history(runs: &[&Run], label: &str) {
    for (i, r) in runs.iter().enumerate() {
        assert!(
            r.errors.is_empty(),
            "{label}: run {i} got unexpected answers: {:?}",
            &r.errors[..r.errors.len().min(10)]
        );
    }
    let sent = union(runs, |r| &r.sent);
    let sent_in_doubt = union(runs, |r| &r.sent_in_doubt);
    let committed = union(runs, |r| &r.committed);
    let rolled_back = union(runs, |r| &r.rolled_back);
    let acks_in_doubt = union(runs, |r| &r.acks_in_doubt);
    let both = committed.intersection(&rolled_back).next();
    assert!(
        both.is_none(),
        "{label}: {both:?} was both committed and rolled back"
    );

    // Per delivery: sent, right body, not rolled back, not acknowledged by an earlier run,
    // and once per run (the invisible time outlasts a run).
    let mut acked_in: HashMap<&str, usize> = HashMap::new();
    let mut delivered = HashSet::new();
    for (i, r) in runs.iter().enumerate() {
        let mut this_run = HashSet::new();
        for d in &r.delivered {
            let id = d.id.as_str();
            assert!(
                d.body == body_of(id),
                "{label}: run {i} delivered {id} with body {:?}",
                String::from_utf8_lossy(&d.body)
            );
            match d.topic.as_str() {
                NORMAL_TOPIC => assert!(
                    sent.contains(id) || sent_in_doubt.contains(id),
                    "{label}: run {i} delivered {id}, which was never sent to {NORMAL_TOPIC} (or was refused)"
                ),
                TX_TOPIC => {
                    assert!(
                        !rolled_back.contains(id),
                        "{label}: run {i} delivered {id}, whose transaction was rolled back"
                    );
                    assert!(
                        committed.contains(id),
                        "{label}: run {i} delivered {id}, whose transaction was never committed"
                    );
                }
                other => panic!("{label}: run {i} delivered {id} of topic {other:?}"),
            }
            if let Some(k) = acked_in.get(id) {
                panic!(
                    "{label}: run {i} delivered {id} again, although run {k} answered its acknowledgement OK"
                );
            }
            assert!(
                this_run.insert(id),
                "{label}: run {i} delivered {id} twice within its invisible time"
            );
            delivered.insert(id);
        }
        for id in &r.acked {
            assert!(
                this_run.contains(id.as_str()),
                "{label}: run {i} acknowledged {id}, which it never delivered"
            );
            acked_in.entry(id).or_insert(i);
        }
    }

    // Everything acknowledged to a producer was delivered, and acknowledged by the consumer
    // (or its acknowledgement was in doubt when the broker died).
    let missing: Vec<&String> = sent
        .iter()
        .chain(&committed)
        .filter(|id| {
            !delivered.contains(id.as_str())
                || !(acked_in.contains_key(id.as_str()) || acks_in_doubt.contains(*id))
        })
        .collect();
    assert!(
        missing.is_empty(),
        "{label}: {} of {} acknowledged messages were never delivered, or not acknowledged since: {:?}",
        missing.len(),
        sent.len() + committed.len(),
        &missing[..missing.len().min(20)]
    );
}

/// The transaction table the broker lists against the ledger. With `settled`, every
/// transaction must be resolved.
fn check_transactions(
    runs: &[&Run],
    listed: &BTreeMap<String, (String, String)>,
    settled: bool,
    label: &str,
) {
    let committed = union(runs, |r| &r.committed);
    let rolled_back = union(runs, |r| &r.rolled_back);
    let ends_in_doubt = union(runs, |r| &r.ends_in_doubt);
    let halves_in_doubt = union(runs, |r| &r.halves_in_doubt);
    let expected = |id: &str| -> Vec<&str> {
        let decided = if commits(id) {
            "committed"
        } else {
            "rolled_back"
        };
        if committed.contains(id) {
            vec!["committed"]
        } else if rolled_back.contains(id) {
            vec!["rolled_back"]
        } else if settled {
            vec![decided]
        } else if ends_in_doubt.contains(id) {
            vec!["prepared", decided]
        } else {
            vec!["prepared"]
        }
    };
    let mut halves = BTreeMap::new();
    for r in runs {
        halves.extend(r.halves.iter());
    }
    for (id, tx_id) in &halves {
        let Some((listed_id, state)) = listed.get(id.as_str()) else {
            panic!(
                "{label}: transaction {tx_id} of message {id}, whose half message was answered OK, is unknown"
            );
        };
        assert_eq!(listed_id, *tx_id, "{label}: transaction id of {id}");
        assert!(
            expected(id).contains(&state.as_str()),
            "{label}: transaction {tx_id} of {id} is {state}, expected one of {:?}",
            expected(id)
        );
    }
    for (id, (tx_id, state)) in listed {
        if halves.contains_key(id) {
            continue;
        }
        assert!(
            halves_in_doubt.contains(id),
            "{label}: transaction {tx_id} of message {id}, which was never sent"
        );
        assert!(
            expected(id).contains(&state.as_str()),
            "{label}: transaction {tx_id} of {id} (half message in doubt) is {state}, expected one of {:?}",
            expected(id)
        );
    }
}

// ---------------------------------------------------------------------------------------
// The load.

fn note(ledger: &Mutex<Run>, f: impl FnOnce(&mut Run)) {
    f(&mut ledger.lock().expect("ledger"));
}

async fn normal_producer(
    addr: SocketAddr,
    name: String,
    ledger: Arc<Mutex<Run>>,
    stop: Arc<AtomicBool>,
) {
    let mut c = connect(addr).await;
    let (mut seq, mut request) = (0u64, 0u64);
    while !stop.load(Ordering::Relaxed) {
        request += 1;
        // Requests of 1 to 4 messages: a request is stored whole or not at all.
        let ids = next_ids(&name, request, 4, &mut seq);
        let answer = send(&mut c, &name, NORMAL_TOPIC, &ids, MessageType::Normal).await;
        let gone = answer.is_none();
        note(&ledger, |l| match answer {
            None => l.sent_in_doubt.extend(ids),
            Some(r) if accepted(&r, ids.len()).is_some() => l.sent.extend(ids),
            Some(r) => l.errors.push(format!("SendMessage {ids:?}: {r:?}")),
        });
        if gone {
            break;
        }
    }
}

async fn tx_producer(
    addr: SocketAddr,
    name: String,
    ledger: Arc<Mutex<Run>>,
    stop: Arc<AtomicBool>,
) {
    let mut c = connect(addr).await;
    let (mut seq, mut request) = (0u64, 0u64);
    'requests: while !stop.load(Ordering::Relaxed) {
        request += 1;
        // Requests of 1 to 3 half messages, each a transaction of its own.
        let ids = next_ids(&name, request, 3, &mut seq);
        let answer = send(&mut c, &name, TX_TOPIC, &ids, MessageType::Transaction).await;
        let tx_ids = match answer {
            None => {
                note(&ledger, |l| l.halves_in_doubt.extend(ids));
                break;
            }
            Some(r) => match accepted(&r, ids.len()).filter(|t| t.iter().all(|t| !t.is_empty())) {
                Some(tx_ids) => tx_ids,
                None => {
                    note(&ledger, |l| {
                        l.errors.push(format!("SendMessage (half) {ids:?}: {r:?}"));
                    });
                    continue;
                }
            },
        };
        // Every half message of the request is stored before any is ended.
        note(&ledger, |l| {
            l.halves
                .extend(ids.iter().cloned().zip(tx_ids.iter().cloned()));
        });
        for (id, tx_id) in ids.into_iter().zip(tx_ids) {
            if commits_left_open(&id) {
                note(&ledger, |l| {
                    l.left_open.insert(id);
                });
                continue;
            }
            let commit = commits(&id);
            let answer = end_transaction(&mut c, &name, &id, &tx_id, commit).await;
            let gone = answer.is_none();
            note(&ledger, |l| match answer {
                None => {
                    l.ends_in_doubt.insert(id);
                }
                Some(Code::Ok) if commit => {
                    l.committed.insert(id);
                }
                Some(Code::Ok) => {
                    l.rolled_back.insert(id);
                }
                Some(other) => l
                    .errors
                    .push(format!("EndTransaction {id} commit={commit}: {other:?}")),
            });
            if gone {
                break 'requests;
            }
        }
    }
}

async fn consumer(
    addr: SocketAddr,
    topic: &'static str,
    name: String,
    ledger: Arc<Mutex<Run>>,
    stop: Arc<AtomicBool>,
) {
    let mut c = connect(addr).await;
    while !stop.load(Ordering::Relaxed) {
        let got = receive(&mut c, &name, topic, Duration::from_millis(500)).await;
        let deliveries: Vec<Delivery> = got.messages.iter().map(Delivery::of).collect();
        let entries: Vec<(String, String)> = deliveries
            .iter()
            .map(|d| (d.id.clone(), d.handle.clone()))
            .collect();
        note(&ledger, |l| {
            for d in &deliveries {
                if d.topic != topic {
                    l.errors
                        .push(format!("received {} of {} from {topic}", d.id, d.topic));
                }
            }
            l.delivered.extend(deliveries);
            match got.status {
                None | Some(Code::Ok | Code::MessageNotFound) => {}
                Some(other) => l.errors.push(format!("ReceiveMessage {topic}: {other:?}")),
            }
        });
        if !entries.is_empty() {
            let answer = ack(&mut c, &name, topic, &entries).await;
            let gone = answer.is_none();
            note(&ledger, |l| match answer {
                None => l
                    .acks_in_doubt
                    .extend(entries.into_iter().map(|(id, _)| id)),
                Some(results) => {
                    for (id, c) in results {
                        if c == Code::Ok {
                            l.acked.insert(id);
                        } else {
                            l.errors.push(format!("AckMessage {id}: {c:?}"));
                        }
                    }
                }
            });
            if gone {
                break;
            }
        }
        if !got.complete {
            break;
        }
    }
}

/// Runs the mixed load on `server` into `run`, kills the server with SIGKILL while the load
/// runs, and returns the ledger once every task has seen the broker go.
async fn load_then_kill(server: ServerProcess, cycle: usize, run: Run) -> Run {
    let ledger = Arc::new(Mutex::new(run));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for i in 0..NORMAL_PRODUCERS {
        let name = format!("n{cycle}-{i}");
        tasks.push(tokio::spawn(normal_producer(
            server.grpc,
            name,
            ledger.clone(),
            stop.clone(),
        )));
    }
    for i in 0..TX_PRODUCERS {
        let name = format!("t{cycle}-{i}");
        tasks.push(tokio::spawn(tx_producer(
            server.grpc,
            name,
            ledger.clone(),
            stop.clone(),
        )));
    }
    for topic in [NORMAL_TOPIC, TX_TOPIC] {
        for i in 0..CONSUMERS_PER_TOPIC {
            let name = format!("c{cycle}-{topic}-{i}");
            tasks.push(tokio::spawn(consumer(
                server.grpc,
                topic,
                name,
                ledger.clone(),
                stop.clone(),
            )));
        }
    }
    let mut kill_at = Instant::now() + MIN_LOAD;
    if cycle > 1 {
        kill_at =
            kill_at.max(server.started + FIRST_PERIODIC_SNAPSHOT + Duration::from_millis(300));
    }
    kill_at += jitter(Duration::from_millis(800));
    tokio::time::sleep_until(kill_at.into()).await;
    // On a slow machine, wait until every kind of call has happened at least once.
    let give_up = Instant::now() + Duration::from_secs(10);
    loop {
        let (ready, summary) = {
            let l = ledger.lock().expect("ledger");
            (l.has_every_kind(), l.summary())
        };
        if ready {
            break;
        }
        assert!(
            Instant::now() < give_up,
            "cycle {cycle}: the load did not make every kind of call: {summary}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    kill9(server).await;
    stop.store(true, Ordering::Relaxed);
    let deadline = tokio::time::Instant::now() + STOP_TIMEOUT;
    for task in tasks {
        tokio::time::timeout_at(deadline, task)
            .await
            .unwrap_or_else(|_| {
                panic!("cycle {cycle}: a load task still runs {STOP_TIMEOUT:?} after the kill")
            })
            .expect("load task");
    }
    std::mem::take(&mut *ledger.lock().expect("ledger"))
}

// ---------------------------------------------------------------------------------------
// After a restart.

/// Receives from both topics until MESSAGE_NOT_FOUND twice in a row, acknowledging
/// everything; every call must be answered OK.
async fn drain(c: &mut Client, run: &mut Run, label: &str) {
    for topic in [NORMAL_TOPIC, TX_TOPIC] {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut empty = 0;
        while empty < 2 {
            assert!(
                Instant::now() < deadline,
                "{label}: draining {topic} took over 30 s"
            );
            let got = receive(c, "drainer", topic, Duration::from_millis(300)).await;
            assert!(
                got.complete,
                "{label}: ReceiveMessage on {topic} failed while draining"
            );
            match got.status {
                Some(Code::MessageNotFound) if got.messages.is_empty() => {
                    empty += 1;
                    continue;
                }
                Some(Code::Ok) if !got.messages.is_empty() => empty = 0,
                other => panic!(
                    "{label}: ReceiveMessage on {topic} answered {other:?} with {} messages",
                    got.messages.len()
                ),
            }
            let deliveries: Vec<Delivery> = got.messages.iter().map(Delivery::of).collect();
            let entries: Vec<(String, String)> = deliveries
                .iter()
                .map(|d| (d.id.clone(), d.handle.clone()))
                .collect();
            run.delivered.extend(deliveries);
            let results = ack(c, "drainer", topic, &entries)
                .await
                .unwrap_or_else(|| panic!("{label}: AckMessage on {topic} got no answer"));
            for (id, c) in results {
                assert_eq!(c, Code::Ok, "{label}: acknowledging {id} while draining");
                run.acked.insert(id);
            }
        }
    }
}

/// After a restart: checks the transaction table, resolves every open transaction by its
/// id (and repeats some decisions made before, which must be answered OK again), checks that
/// receipt handles of the previous run are refused, drains group `g`, and checks the
/// history.
async fn recover(server: &ServerProcess, past: &[Run], now: &mut Run, label: &str) {
    let mut c = connect(server.grpc).await;
    let history: Vec<&Run> = past.iter().collect();

    let listed = transactions(server.http).await;
    check_transactions(&history, &listed, false, label);
    let committed = union(&history, |r| &r.committed);
    let rolled_back = union(&history, |r| &r.rolled_back);
    let mut open: BTreeMap<String, String> = BTreeMap::new();
    for r in past {
        for (id, tx_id) in &r.halves {
            if !committed.contains(id) && !rolled_back.contains(id) {
                open.insert(id.clone(), tx_id.clone());
            }
        }
        for id in &r.halves_in_doubt {
            if let Some((tx_id, state)) = listed.get(id)
                && state == "prepared"
            {
                open.insert(id.clone(), tx_id.clone());
            }
        }
    }
    for (id, tx_id) in &open {
        let commit = commits(id);
        let answer = end_transaction(&mut c, "resolver", id, tx_id, commit).await;
        assert_eq!(
            answer,
            Some(Code::Ok),
            "{label}: EndTransaction commit={commit} of {id} (transaction {tx_id}) after the restart"
        );
        if commit {
            now.committed.insert(id.clone());
        } else {
            now.rolled_back.insert(id.clone());
        }
    }
    // A decision repeated after the restart is answered OK and changes nothing.
    for id in committed.iter().take(5).chain(rolled_back.iter().take(5)) {
        let tx_id = &listed[id].0;
        let answer = end_transaction(&mut c, "resolver", id, tx_id, commits(id)).await;
        assert_eq!(
            answer,
            Some(Code::Ok),
            "{label}: repeating the decision on {id} (transaction {tx_id}) after the restart"
        );
    }
    let mut history: Vec<&Run> = past.iter().collect();
    history.push(now);
    check_transactions(&history, &transactions(server.http).await, true, label);

    // Receipt handles of the killed run: those not acknowledged, and a few that were.
    let last = past.last().expect("a previous run");
    let unacked = last
        .delivered
        .iter()
        .filter(|d| !last.acked.contains(&d.id));
    let acked = last.delivered.iter().filter(|d| last.acked.contains(&d.id));
    let stale: Vec<&Delivery> = unacked.take(16).chain(acked.take(4)).collect();
    for d in &stale {
        let entry = [(d.id.clone(), d.handle.clone())];
        let answer = ack(&mut c, "stale", &d.topic, &entry).await;
        assert_eq!(
            answer,
            Some(vec![(d.id.clone(), Code::InvalidReceiptHandle)]),
            "{label}: acknowledging {} with a receipt handle of the previous run",
            d.id
        );
    }

    drain(&mut c, now, label).await;
    let mut history: Vec<&Run> = past.iter().collect();
    history.push(now);
    check_history(&history, label);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_broker_loses_no_acknowledged_message_and_redelivers_no_acked_one() {
    let began = Instant::now();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut server = start(dir.path()).await;
    create_topics(server.http).await;
    let mut runs: Vec<Run> = Vec::new();
    let mut current = Run::default();
    for cycle in 1..=KILL_CYCLES {
        let run = load_then_kill(server, cycle, std::mem::take(&mut current)).await;
        eprintln!(
            "{:?} cycle {cycle}: killed after {}",
            began.elapsed(),
            run.summary()
        );
        assert!(run.has_every_kind(), "cycle {cycle}: {}", run.summary());
        runs.push(run);
        server = start(dir.path()).await;
        eprintln!("{:?} restarted", began.elapsed());
        let label = format!("after kill {cycle}");
        recover(&server, &runs, &mut current, &label).await;
        eprintln!("{:?} {label}: {}", began.elapsed(), current.summary());
    }

    // A clean stop keeps everything: after it, nothing is left to deliver.
    terminate(server).await;
    runs.push(std::mem::take(&mut current));
    let server = start(dir.path()).await;
    recover(&server, &runs, &mut current, "after SIGTERM").await;
    assert!(
        current.delivered.is_empty(),
        "after a clean stop the broker delivered again: {:?}",
        current
            .delivered
            .iter()
            .map(|d| &d.id)
            .take(20)
            .collect::<Vec<_>>()
    );
    assert!(current.committed.is_empty() && current.rolled_back.is_empty());
    terminate(server).await;
    eprintln!("{KILL_CYCLES} kill cycles in {:?}", began.elapsed());
}

/// The same properties, one message of each kind, without load: what was acknowledged
/// before the kill stays acknowledged, what was not is delivered again, and the open
/// transaction is still known.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledgements_and_open_transactions_survive_a_kill() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = start(dir.path()).await;
    create_topics(server.http).await;
    let mut c = connect(server.grpc).await;
    for id in ["n-1", "n-2"] {
        let r = send(&mut c, "p", NORMAL_TOPIC, &[id.into()], MessageType::Normal).await;
        assert!(
            r.as_ref().and_then(|r| accepted(r, 1)).is_some(),
            "send {id}: {r:?}"
        );
    }
    let mut tx_ids = BTreeMap::new();
    for id in ["t-2", "t-3", "t-4"] {
        let r = send(
            &mut c,
            "p",
            TX_TOPIC,
            &[id.into()],
            MessageType::Transaction,
        )
        .await;
        let tx_id = r
            .as_ref()
            .and_then(|r| accepted(r, 1))
            .and_then(|mut t| t.pop())
            .filter(|t| !t.is_empty());
        tx_ids.insert(id, tx_id.unwrap_or_else(|| panic!("half {id}: {r:?}")));
    }
    for (id, commit) in [("t-2", true), ("t-3", false)] {
        let answer = end_transaction(&mut c, "p", id, &tx_ids[id], commit).await;
        assert_eq!(answer, Some(Code::Ok), "end {id}");
    }
    // Receive both normal messages; acknowledge only n-1.
    let mut handles = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while handles.len() < 2 {
        assert!(
            Instant::now() < deadline,
            "n-1 and n-2 not delivered: {handles:?}"
        );
        let got = receive(&mut c, "c", NORMAL_TOPIC, Duration::from_millis(500)).await;
        for d in got.messages.iter().map(Delivery::of) {
            assert!(
                handles.insert(d.id.clone(), d.handle).is_none(),
                "{} twice",
                d.id
            );
        }
    }
    let entry = [("n-1".to_string(), handles["n-1"].clone())];
    let answer = ack(&mut c, "c", NORMAL_TOPIC, &entry).await;
    assert_eq!(answer, Some(vec![("n-1".to_string(), Code::Ok)]));
    kill9(server).await;

    let server = start(dir.path()).await;
    let mut c = connect(server.grpc).await;
    let entry = [("n-2".to_string(), handles["n-2"].clone())];
    let answer = ack(&mut c, "c", NORMAL_TOPIC, &entry).await;
    assert_eq!(
        answer,
        Some(vec![("n-2".to_string(), Code::InvalidReceiptHandle)]),
        "a receipt handle from before the kill"
    );
    let listed = transactions(server.http).await;
    let state = |id: &str| listed.get(id).map(|(t, s)| (t.as_str(), s.as_str()));
    assert_eq!(state("t-2"), Some((tx_ids["t-2"].as_str(), "committed")));
    assert_eq!(state("t-3"), Some((tx_ids["t-3"].as_str(), "rolled_back")));
    assert_eq!(state("t-4"), Some((tx_ids["t-4"].as_str(), "prepared")));
    let answer = end_transaction(&mut c, "p", "t-4", &tx_ids["t-4"], true).await;
    assert_eq!(answer, Some(Code::Ok), "commit the open transaction");
    let answer = end_transaction(&mut c, "p", "t-2", &tx_ids["t-2"], true).await;
    assert_eq!(
        answer,
        Some(Code::Ok),
        "repeat a commit made before the kill"
    );
    let answer = end_transaction(&mut c, "p", "t-2", &tx_ids["t-2"], false).await;
    assert_eq!(
        answer,
        Some(Code::PreconditionFailed),
        "roll back a transaction committed before the kill"
    );

    let mut run = Run::default();
    drain(&mut c, &mut run, "after the kill").await;
    let mut delivered: Vec<(&str, &str)> = run
        .delivered
        .iter()
        .map(|d| (d.topic.as_str(), d.id.as_str()))
        .collect();
    delivered.sort();
    assert_eq!(
        delivered,
        [(NORMAL_TOPIC, "n-2"), (TX_TOPIC, "t-2"), (TX_TOPIC, "t-4")],
        "after the kill"
    );
    for d in &run.delivered {
        assert_eq!(d.body, body_of(&d.id));
    }
    terminate(server).await;
}
