//! The broker's logic, in process, on a real store in a temporary directory.

use std::sync::Arc;
use std::time::Duration;

use txmq_broker::delivery::{Filter, ReceiveRequest};
use txmq_broker::message::{NewMessage, SendType};
use txmq_broker::metadata::TopicType;
use txmq_broker::transactions::{Resolution, TxState};
use txmq_broker::{Broker, BrokerConfig};
use txmq_proto::v2::Code;
use txmq_store::Store;
use txmq_store::io::SimIo;

fn config(dir: &std::path::Path) -> BrokerConfig {
    BrokerConfig {
        data_dir: dir.to_path_buf(),
        segment_size: 1 << 20,
        max_body_size: 64 << 10,
        default_queues: 2,
        transaction_timeout_ms: 200,
        transaction_check_interval_ms: 100,
        transaction_check_max: 3,
        ..BrokerConfig::default()
    }
}

fn open(dir: &std::path::Path) -> Arc<Broker> {
    Broker::open(config(dir)).expect("open broker")
}

/// A broker on a simulated file system, where the disk can fill and the power go.
fn open_sim(io: &SimIo) -> Arc<Broker> {
    open_sim_with(io, config(std::path::Path::new("/srv/txmq")))
}

fn open_sim_with(io: &SimIo, cfg: BrokerConfig) -> Arc<Broker> {
    let store = Store::open_with(cfg.store_config(), Arc::new(io.clone())).expect("open store");
    Broker::open_on(cfg, store).expect("open broker")
}

fn msg(topic: &str, id: &str, send_type: SendType) -> NewMessage {
    NewMessage {
        topic: topic.into(),
        message_id: id.into(),
        tag: Some("t".into()),
        keys: vec![format!("key-{id}")],
        send_type,
        message_group: None,
        delivery_timestamp: None,
        orphaned_recovery_ms: None,
        user_properties: vec![("p".into(), "v".into())],
        body: format!("body of {id}").into_bytes(),
        gzip: false,
        born_timestamp: txmq_broker::now_ms(),
        born_host: "test".into(),
        trace_context: None,
    }
}

fn receive(group: &str, topic: &str, invisible_ms: i64) -> ReceiveRequest {
    ReceiveRequest {
        group: group.into(),
        topic: topic.into(),
        queue: None,
        filter: Filter::All,
        batch: 32,
        invisible_ms,
        long_poll: Duration::from_millis(0),
        renew_for: None,
    }
}

async fn drain(b: &Arc<Broker>, group: &str, topic: &str) -> Vec<String> {
    let mut ids = Vec::new();
    loop {
        let got = b.receive(&receive(group, topic, 30_000)).await.unwrap();
        if got.is_empty() {
            return ids;
        }
        let handles: Vec<String> = got.iter().map(|d| d.handle.clone()).collect();
        for r in b.ack(group, topic, &handles).await {
            r.unwrap();
        }
        ids.extend(got.into_iter().map(|d| d.record.data.message_id));
    }
}

#[tokio::test]
async fn sent_messages_are_received_once_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path());
    for i in 0..10 {
        b.send(vec![msg("orders", &format!("m{i}"), SendType::Normal)])
            .await
            .unwrap();
    }
    let mut ids = drain(&b, "g1", "orders").await;
    ids.sort();
    assert_eq!(ids.len(), 10);
    assert!(drain(&b, "g1", "orders").await.is_empty());
    // Another group gets its own copy.
    assert_eq!(drain(&b, "g2", "orders").await.len(), 10);
}

#[tokio::test]
async fn an_unacknowledged_message_comes_back_after_its_invisible_time_with_the_next_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path());
    b.send(vec![msg("t", "m1", SendType::Normal)])
        .await
        .unwrap();
    let first = b.receive(&receive("g", "t", 1_000)).await.unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].attempt, 1);
    assert!(
        b.receive(&receive("g", "t", 1_000))
            .await
            .unwrap()
            .is_empty()
    );
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let again = b.receive(&receive("g", "t", 1_000)).await.unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].attempt, 2);
    // The first handle is stale now.
    let stale = b.ack("g", "t", &[first[0].handle.clone()]).await;
    assert_eq!(
        stale[0].as_ref().unwrap_err().code,
        Code::InvalidReceiptHandle
    );
    assert!(b.ack("g", "t", &[again[0].handle.clone()]).await[0].is_ok());
}

#[tokio::test]
async fn a_message_past_its_max_attempts_moves_to_the_dead_letter_topic_and_can_be_redriven() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path());
    b.metadata().put_group("g", 2, false, Vec::new()).unwrap();
    b.send(vec![msg("t", "poison", SendType::Normal)])
        .await
        .unwrap();
    for attempt in 1..=2 {
        let got = b.receive(&receive("g", "t", 30_000)).await.unwrap();
        assert_eq!(got[0].attempt, attempt);
        // A negative acknowledgement: visible again at once.
        b.change_invisible("g", "t", &got[0].handle, 0).unwrap();
    }
    assert!(
        b.receive(&receive("g", "t", 30_000))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(b.group_stats("g").dead_lettered, 1);
    let dlq = drain(&b, "dlq-reader", "%DLQ%g").await;
    assert_eq!(dlq, vec!["poison".to_string()]);
    assert_eq!(b.redrive("g", 10).await.unwrap(), 1);
    assert_eq!(drain(&b, "g", "t").await, vec!["poison".to_string()]);
}

/// A broker whose group `g` (one attempt at most) failed message `poison` of topic `t`
/// once: the next receive moves it to the dead-letter topic.
async fn failed_once(dir: &std::path::Path) -> Arc<Broker> {
    let b = open(dir);
    fail_once(&b, "g").await;
    b
}

/// Has `group` of `b` (one attempt at most) fail message `poison` of topic `t` once. Its
/// body takes a few sectors of the disk.
async fn fail_once(b: &Arc<Broker>, group: &str) {
    b.metadata().put_group(group, 1, false, Vec::new()).unwrap();
    let mut poison = msg("t", "poison", SendType::Normal);
    poison.body = vec![b'p'; 3000];
    b.send(vec![poison]).await.unwrap();
    let got = b.receive(&receive(group, "t", 30_000)).await.unwrap();
    b.change_invisible(group, "t", &got[0].handle, 0).unwrap();
}

#[tokio::test]
async fn a_group_of_the_longest_name_dead_letters_and_redrives() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path());
    let group = "g".repeat(246);
    fail_once(&b, &group).await;
    assert!(
        b.receive(&receive(&group, "t", 0))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(b.group_stats(&group).dead_lettered, 1);
    assert_eq!(b.redrive(&group, 10).await.unwrap(), 1);
    assert_eq!(drain(&b, &group, "t").await, vec!["poison".to_string()]);
}

#[tokio::test]
async fn a_dead_letter_that_names_no_topic_is_left_where_it_is_by_a_redrive() {
    let dir = tempfile::tempdir().unwrap();
    let b = failed_once(dir.path()).await;
    assert!(b.receive(&receive("g", "t", 0)).await.unwrap().is_empty());
    // Sent to the dead-letter topic directly: it names no topic to go back to.
    b.send(vec![msg("%DLQ%g", "stray", SendType::Normal)])
        .await
        .unwrap();
    assert_eq!(b.redrive("g", 10).await.unwrap(), 1);
    assert_eq!(drain(&b, "g", "t").await, vec!["poison".to_string()]);
    let left = b.group_stats("%REDRIVE%g");
    assert_eq!(
        (left.lag, left.in_flight),
        (1, 1),
        "the stray message is not marked done"
    );
}

#[tokio::test]
async fn a_receive_dropped_while_it_dead_letters_still_moves_the_message_once() {
    let dir = tempfile::tempdir().unwrap();
    let b = failed_once(dir.path()).await;
    // Its first poll takes the message out of its queue and starts the move.
    dropped_midway(b.receive(&receive("g", "t", 30_000))).await;
    eventually("the move was cut short", || {
        b.group_stats("g").dead_lettered > 0
    })
    .await;
    assert_eq!(b.group_stats("g").dead_lettered, 1);
    assert_eq!(
        drain(&b, "dlq-reader", "%DLQ%g").await,
        vec!["poison".to_string()]
    );
    assert!(b.receive(&receive("g", "t", 0)).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_committed_transaction_is_delivered_once_even_if_committed_twice() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path());
    b.metadata()
        .create_topic("pay", TopicType::Transaction, 2)
        .unwrap();
    let r = b
        .send(vec![msg("pay", "tx1", SendType::Transaction)])
        .await
        .unwrap();
    let id = r[0].transaction_id.clone().unwrap();
    assert!(
        drain(&b, "g", "pay").await.is_empty(),
        "a half message is never visible"
    );
    assert_eq!(
        b.end_transaction("pay", "tx1", &id, Resolution::Commit)
            .await
            .unwrap(),
        TxState::Committed
    );
    assert_eq!(
        b.end_transaction("pay", "tx1", &id, Resolution::Commit)
            .await
            .unwrap(),
        TxState::Committed
    );
    assert_eq!(drain(&b, "g", "pay").await, vec!["tx1".to_string()]);
    let err = b
        .end_transaction("pay", "tx1", &id, Resolution::Rollback)
        .await
        .unwrap_err();
    assert_eq!(err.code, Code::PreconditionFailed);
}

#[tokio::test]
async fn a_rolled_back_half_message_is_never_delivered_and_commit_after_rollback_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path());
    b.metadata()
        .create_topic("pay", TopicType::Transaction, 2)
        .unwrap();
    let r = b
        .send(vec![msg("pay", "tx2", SendType::Transaction)])
        .await
        .unwrap();
    let id = r[0].transaction_id.clone().unwrap();
    b.end_transaction("pay", "tx2", &id, Resolution::Rollback)
        .await
        .unwrap();
    let err = b
        .end_transaction("pay", "tx2", &id, Resolution::Commit)
        .await
        .unwrap_err();
    assert_eq!(err.code, Code::PreconditionFailed);
    assert!(drain(&b, "g", "pay").await.is_empty());
    let unknown = b
        .end_transaction("pay", "x", "no-such-id", Resolution::Commit)
        .await
        .unwrap_err();
    assert_eq!(unknown.code, Code::InvalidTransactionId);
}

#[tokio::test]
async fn concurrent_commits_of_one_transaction_deliver_once() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path());
    b.metadata()
        .create_topic("pay", TopicType::Transaction, 1)
        .unwrap();
    let r = b
        .send(vec![msg("pay", "tx3", SendType::Transaction)])
        .await
        .unwrap();
    let id = r[0].transaction_id.clone().unwrap();
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (b, id) = (b.clone(), id.clone());
            tokio::spawn(async move {
                b.end_transaction("pay", "tx3", &id, Resolution::Commit)
                    .await
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), TxState::Committed);
    }
    assert_eq!(drain(&b, "g", "pay").await.len(), 1);
}

/// Polls `call` until it waits (for the store), then drops it, as a request is dropped
/// when its client disconnects.
async fn dropped_midway<F: std::future::Future>(call: F) {
    tokio::pin!(call);
    assert!(futures::poll!(call.as_mut()).is_pending());
}

/// Waits up to 5 s for `done`; fails with `what` if it never holds.
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_decision_whose_caller_goes_away_is_still_made_and_leaves_nothing_stuck() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path());
    b.metadata()
        .create_topic("pay", TopicType::Transaction, 1)
        .unwrap();
    let r = b
        .send(vec![msg("pay", "tx4", SendType::Transaction)])
        .await
        .unwrap();
    let id = r[0].transaction_id.clone().unwrap();
    dropped_midway(b.end_transaction("pay", "tx4", &id, Resolution::Commit)).await;
    // The next decision of the transaction is answered, and the first one was made.
    let again = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        b.end_transaction("pay", "tx4", &id, Resolution::Commit),
    )
    .await
    .expect("a later decision of the transaction is not held up");
    assert_eq!(again.unwrap(), TxState::Committed);
    assert_eq!(drain(&b, "g", "pay").await, vec!["tx4".to_string()]);
}

#[tokio::test]
async fn a_half_message_whose_sender_goes_away_still_opens_its_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path());
    b.metadata()
        .create_topic("pay", TopicType::Transaction, 1)
        .unwrap();
    dropped_midway(b.send(vec![msg("pay", "tx5", SendType::Transaction)])).await;
    // Stored, it is a transaction the check-back will find.
    eventually("the stored half message opened no transaction", || {
        let open = b.transactions().list(&[TxState::Prepared]);
        open.iter().any(|tx| tx.message_id == "tx5")
    })
    .await;
}

#[tokio::test]
async fn an_ack_whose_caller_goes_away_is_still_made() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path());
    b.metadata()
        .create_topic("t", TopicType::Normal, 1)
        .unwrap();
    b.send(vec![msg("t", "m1", SendType::Normal)])
        .await
        .unwrap();
    let got = b.receive(&receive("g", "t", 30_000)).await.unwrap();
    assert_eq!(got.len(), 1);
    dropped_midway(b.ack("g", "t", &[got[0].handle.clone()])).await;
    // The message is acknowledged: nothing is left to do for the group.
    eventually("the message is left neither out nor acknowledged", || {
        let stats = b.group_stats("g");
        (stats.lag, stats.in_flight) == (0, 0)
    })
    .await;
}

#[tokio::test]
async fn wrong_message_type_empty_and_oversized_bodies_are_refused_with_their_codes() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path());
    b.metadata()
        .create_topic("plain", TopicType::Normal, 1)
        .unwrap();
    let err = b
        .send(vec![msg("plain", "x", SendType::Transaction)])
        .await
        .unwrap_err();
    assert_eq!(err.code, Code::MessagePropertyConflictWithType);
    let mut big = msg("plain", "big", SendType::Normal);
    big.body = vec![0; 65 << 10];
    assert_eq!(
        b.send(vec![big]).await.unwrap_err().code,
        Code::MessageBodyTooLarge
    );
    let mut empty = msg("plain", "e", SendType::Normal);
    empty.body.clear();
    assert_eq!(
        b.send(vec![empty]).await.unwrap_err().code,
        Code::MessageBodyEmpty
    );
    let mut tag = msg("plain", "tg", SendType::Normal);
    tag.tag = Some("a|b".into());
    assert_eq!(
        b.send(vec![tag]).await.unwrap_err().code,
        Code::IllegalMessageTag
    );
    assert_eq!(
        b.send(vec![msg("bad topic", "x", SendType::Normal)])
            .await
            .unwrap_err()
            .code,
        Code::IllegalTopic
    );
    assert!(
        drain(&b, "g", "plain").await.is_empty(),
        "nothing refused was stored"
    );
}

#[tokio::test]
async fn unknown_topics_are_refused_when_auto_creation_is_off() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.auto_create_topics = false;
    let b = Broker::open(c).unwrap();
    let err = b
        .send(vec![msg("nope", "x", SendType::Normal)])
        .await
        .unwrap_err();
    assert_eq!(err.code, Code::TopicNotFound);
}

#[tokio::test]
async fn a_fifo_group_gets_each_message_group_in_order_one_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path());
    b.metadata().create_topic("f", TopicType::Fifo, 2).unwrap();
    b.metadata().put_group("fg", 16, true, Vec::new()).unwrap();
    for i in 0..3 {
        for g in ["a", "b"] {
            let mut m = msg("f", &format!("{g}{i}"), SendType::Fifo);
            m.message_group = Some(g.into());
            b.send(vec![m]).await.unwrap();
        }
    }
    let mut seen: Vec<String> = Vec::new();
    while seen.len() < 6 {
        let got = b.receive(&receive("fg", "f", 30_000)).await.unwrap();
        assert!(!got.is_empty());
        // At most one message per message group is out at a time.
        let mut groups: Vec<_> = got
            .iter()
            .map(|d| d.record.data.message_id[..1].to_string())
            .collect();
        groups.dedup();
        assert_eq!(
            groups.len(),
            got.len(),
            "two messages of one group out at once: {got:?}"
        );
        for d in &got {
            seen.push(d.record.data.message_id.clone());
        }
        let handles: Vec<String> = got.iter().map(|d| d.handle.clone()).collect();
        for r in b.ack("fg", "f", &handles).await {
            r.unwrap();
        }
    }
    for g in ["a", "b"] {
        let order: Vec<&String> = seen.iter().filter(|id| id.starts_with(g)).collect();
        assert_eq!(
            order,
            vec![&format!("{g}0"), &format!("{g}1"), &format!("{g}2")]
        );
    }
}

#[tokio::test]
async fn a_delayed_message_becomes_visible_at_its_delivery_time_also_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let due = txmq_broker::now_ms() + 1_500;
    {
        let b = open(dir.path());
        let mut m = msg("later", "d1", SendType::Delay);
        m.delivery_timestamp = Some(due);
        b.send(vec![m]).await.unwrap();
        assert!(drain(&b, "g", "later").await.is_empty());
        b.shutdown().await.unwrap();
    }
    let b = open(dir.path());
    assert!(drain(&b, "g", "later").await.is_empty());
    let mut req = receive("g", "later", 30_000);
    req.long_poll = Duration::from_secs(5);
    let got = b.receive(&req).await.unwrap();
    assert_eq!(got.len(), 1);
    assert!(txmq_broker::now_ms() >= due);
}

#[tokio::test]
async fn acknowledgements_and_transactions_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let id;
    let mut unacked: Vec<String>;
    {
        let b = open(dir.path());
        b.metadata()
            .create_topic("pay", TopicType::Transaction, 1)
            .unwrap();
        for i in 0..4 {
            b.send(vec![msg("n", &format!("m{i}"), SendType::Normal)])
                .await
                .unwrap();
        }
        // Ack two of four; leave one in flight.
        let got = b.receive(&receive("g", "n", 30_000)).await.unwrap();
        assert_eq!(got.len(), 4);
        for r in b
            .ack("g", "n", &[got[0].handle.clone(), got[2].handle.clone()])
            .await
        {
            r.unwrap();
        }
        unacked = vec![
            got[1].record.data.message_id.clone(),
            got[3].record.data.message_id.clone(),
        ];
        unacked.sort();
        let r = b
            .send(vec![msg("pay", "open", SendType::Transaction)])
            .await
            .unwrap();
        id = r[0].transaction_id.clone().unwrap();
        // No snapshot written: the restart replays the log.
    }
    let b = open(dir.path());
    let mut ids = drain(&b, "g", "n").await;
    ids.sort();
    assert_eq!(
        ids, unacked,
        "exactly the unacknowledged messages come back"
    );
    assert_eq!(b.transactions().get(&id).unwrap().state, TxState::Prepared);
    b.end_transaction("pay", "open", &id, Resolution::Commit)
        .await
        .unwrap();
    b.shutdown().await.unwrap();
    drop(b);
    let b = open(dir.path());
    assert!(drain(&b, "g", "n").await.is_empty());
    assert_eq!(b.transactions().get(&id).unwrap().state, TxState::Committed);
    assert_eq!(drain(&b, "g", "pay").await, vec!["open".to_string()]);
}

#[tokio::test]
async fn tag_filters_deliver_only_matching_messages() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path());
    for (id, tag) in [("a", "paid"), ("b", "created"), ("c", "paid")] {
        let mut m = msg("tags", id, SendType::Normal);
        m.tag = Some(tag.into());
        b.send(vec![m]).await.unwrap();
    }
    let mut req = receive("g", "tags", 30_000);
    req.filter = Filter::tags("paid").unwrap();
    let mut got: Vec<String> = b
        .receive(&req)
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.record.data.message_id)
        .collect();
    got.sort();
    assert_eq!(got, vec!["a".to_string(), "c".to_string()]);
}

/// The snapshot file under `dir`, found by name.
fn snapshot_file(dir: &std::path::Path) -> std::path::PathBuf {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.file_name().is_some_and(|n| n == "broker") {
                return path;
            }
        }
    }
    panic!("no snapshot file under {}", dir.display());
}

/// The snapshot file's inode: every write replaces the file.
fn snapshot_inode(dir: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(snapshot_file(dir)).unwrap().ino()
}

#[tokio::test]
async fn an_idle_broker_does_not_rewrite_its_snapshot_and_skipped_snapshots_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    {
        let b = open(dir.path());
        for i in 0..2 {
            b.send(vec![msg("n", &format!("m{i}"), SendType::Normal)])
                .await
                .unwrap();
        }
        b.snapshot().await.unwrap();
        let first = snapshot_inode(dir.path());
        b.snapshot().await.unwrap();
        assert_eq!(
            snapshot_inode(dir.path()),
            first,
            "nothing changed: no write"
        );

        let got = b.receive(&receive("g", "n", 30_000)).await.unwrap();
        assert_eq!(got.len(), 2);
        for r in b.ack("g", "n", &[got[0].handle.clone()]).await {
            r.unwrap();
        }
        b.snapshot().await.unwrap();
        let second = snapshot_inode(dir.path());
        assert_ne!(
            second, first,
            "an acknowledgement changed the state: written"
        );
        b.snapshot().await.unwrap();
        b.shutdown().await.unwrap();
        assert_eq!(snapshot_inode(dir.path()), second);
    }
    let b = open(dir.path());
    assert_eq!(drain(&b, "g", "n").await, vec!["m1".to_string()]);
}

/// The names of the files of transaction decisions next to the snapshot, sorted.
fn decision_files(dir: &std::path::Path) -> Vec<String> {
    let state = snapshot_file(dir).parent().unwrap().to_path_buf();
    let mut names: Vec<String> = std::fs::read_dir(state)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("tx-decisions-"))
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn decisions_are_written_once_survive_restarts_and_expire_with_their_files() {
    let dir = tempfile::tempdir().unwrap();
    let begin = |b: Arc<Broker>, id: &'static str| async move {
        let r = b
            .send(vec![msg("pay", id, SendType::Transaction)])
            .await
            .unwrap();
        r[0].transaction_id.clone().unwrap()
    };
    let (committed, rolled_back, open_id);
    {
        let b = open(dir.path());
        b.metadata()
            .create_topic("pay", TopicType::Transaction, 1)
            .unwrap();
        committed = begin(b.clone(), "c").await;
        rolled_back = begin(b.clone(), "r").await;
        open_id = begin(b.clone(), "o").await;
        b.end_transaction("pay", "c", &committed, Resolution::Commit)
            .await
            .unwrap();
        b.snapshot().await.unwrap();
        assert_eq!(decision_files(dir.path()).len(), 1);
        b.end_transaction("pay", "r", &rolled_back, Resolution::Rollback)
            .await
            .unwrap();
        b.snapshot().await.unwrap();
        // Each decision went into the file of the snapshot after it, and only there.
        assert_eq!(decision_files(dir.path()).len(), 2);
        b.shutdown().await.unwrap();
        assert_eq!(decision_files(dir.path()).len(), 2, "nothing new decided");
    }
    // A file no snapshot lists (its snapshot did not complete) is removed at start-up.
    let state = snapshot_file(dir.path()).parent().unwrap().to_path_buf();
    let first = decision_files(dir.path())[0].clone();
    std::fs::copy(state.join(&first), state.join("tx-decisions-1")).unwrap();
    {
        let b = open(dir.path());
        assert_eq!(
            decision_files(dir.path()).len(),
            2,
            "the stray file is gone"
        );
        let state_of = |id: &str| b.transactions().get(id).map(|t| t.state);
        assert_eq!(state_of(&committed), Some(TxState::Committed));
        assert_eq!(state_of(&rolled_back), Some(TxState::RolledBack));
        assert_eq!(state_of(&open_id), Some(TxState::Prepared));
        // Repeats are still answered as the first time, and deliver nothing twice.
        assert_eq!(
            b.end_transaction("pay", "c", &committed, Resolution::Commit)
                .await
                .unwrap(),
            TxState::Committed
        );
        assert_eq!(
            b.end_transaction("pay", "r", &rolled_back, Resolution::Rollback)
                .await
                .unwrap(),
            TxState::RolledBack
        );
        assert_eq!(drain(&b, "g", "pay").await, vec!["c".to_string()]);
        // Past the retention time the decisions and their files go; the open one stays.
        let later = txmq_broker::now_ms() + 10 * 60_000;
        b.snapshot_as_of(later).await.unwrap();
        assert!(decision_files(dir.path()).is_empty());
        assert!(b.transactions().get(&committed).is_none());
        b.shutdown().await.unwrap();
    }
    let b = open(dir.path());
    assert!(b.transactions().get(&committed).is_none());
    assert_eq!(
        b.transactions().get(&open_id).map(|t| t.state),
        Some(TxState::Prepared)
    );
    let err = b
        .end_transaction("pay", "c", &committed, Resolution::Commit)
        .await
        .unwrap_err();
    assert_eq!(err.code, Code::InvalidTransactionId);
    assert_eq!(drain(&b, "g", "pay").await, Vec::<String>::new());
}

#[tokio::test]
async fn delivery_attempts_count_across_restarts_and_still_end_in_the_dead_letter_topic() {
    let dir = tempfile::tempdir().unwrap();
    let nack_once = |b: Arc<Broker>, expected: u32| async move {
        let got = b.receive(&receive("g", "t", 30_000)).await.unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].attempt, expected);
        b.change_invisible("g", "t", &got[0].handle, 0).unwrap();
    };
    {
        let b = open(dir.path());
        b.metadata().put_group("g", 3, false, Vec::new()).unwrap();
        b.send(vec![msg("t", "poison", SendType::Normal)])
            .await
            .unwrap();
        nack_once(b.clone(), 1).await;
        nack_once(b.clone(), 2).await;
        // Dropped without a snapshot: the restart replays the log.
    }
    {
        let b = open(dir.path());
        nack_once(b.clone(), 3).await;
        b.shutdown().await.unwrap();
    }
    // Restarted from the snapshot: three deliveries were made, the group allows three.
    let b = open(dir.path());
    assert!(
        b.receive(&receive("g", "t", 30_000))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(b.group_stats("g").dead_lettered, 1);
    let dead = b
        .receive(&receive("dlq-reader", "%DLQ%g", 30_000))
        .await
        .unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].record.data.message_id, "poison");
}

/// Creates transactional topic `topic` (one queue) and sends `n` half messages to it:
/// each one's message id and transaction id.
async fn halves(b: &Arc<Broker>, topic: &str, n: usize) -> Vec<(String, String)> {
    if b.metadata().topic(topic).is_none() {
        b.metadata()
            .create_topic(topic, TopicType::Transaction, 1)
            .unwrap();
    }
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let id = format!("{topic}-{i}");
        let r = b
            .send(vec![msg(topic, &id, SendType::Transaction)])
            .await
            .unwrap();
        out.push((id, r[0].transaction_id.clone().unwrap()));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recheck_racing_a_commit_never_reopens_the_committed_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let mut ids: Vec<String>;
    {
        let b = open(dir.path());
        let txs = halves(&b, "pay", 40).await;
        let races = txs.iter().map(|(m, id)| {
            let b = b.clone();
            async move {
                let (commit, recheck) = tokio::join!(
                    b.end_transaction("pay", m, id, Resolution::Commit),
                    b.recheck_transaction(id),
                );
                assert_eq!(commit.unwrap(), TxState::Committed);
                // Before the commit, or refused after it.
                if let Err(e) = recheck {
                    assert_eq!(e.code, Code::PreconditionFailed, "{e}");
                }
                assert_eq!(
                    b.transactions().get(id).map(|t| t.state),
                    Some(TxState::Committed),
                    "a recheck reopened a committed transaction"
                );
            }
        });
        futures::future::join_all(races).await;
        ids = txs.into_iter().map(|(m, _)| m).collect();
        // Dropped without a snapshot: the restart replays the log.
    }
    let b = open(dir.path());
    let mut got = drain(&b, "g", "pay").await;
    got.sort();
    ids.sort();
    assert_eq!(got, ids, "each committed message delivered once");
    let open = b
        .transactions()
        .list(&[TxState::Prepared, TxState::Unresolved]);
    assert!(open.is_empty(), "reopened by the replay: {open:?}");
}

#[tokio::test]
async fn records_stored_after_a_decision_do_not_reopen_it_on_replay() {
    use txmq_store::{RecordData, RecordKind};
    let dir = tempfile::tempdir().unwrap();
    let txs;
    {
        let b = open(dir.path());
        txs = halves(&b, "pay", 2).await;
        let (committed, rolled_back) = (&txs[0], &txs[1]);
        b.end_transaction("pay", &committed.0, &committed.1, Resolution::Commit)
            .await
            .unwrap();
        b.end_transaction("pay", &rolled_back.0, &rolled_back.1, Resolution::Rollback)
            .await
            .unwrap();
        assert_eq!(drain(&b, "g", "pay").await, vec![committed.0.clone()]);
        b.shutdown().await.unwrap();
    }
    {
        // A log as a broker that let a check-back's or an operator's record of an open
        // transaction land after its decision would have written it.
        let b = open(dir.path());
        let late: Vec<RecordData> = txs
            .iter()
            .flat_map(|(_, id)| {
                [&b"unresolved"[..], b"recheck"].map(|body| {
                    let mut r =
                        RecordData::new(RecordKind::TxResolution, "%SYS%TX", 0, body.to_vec());
                    r.message_id = id.clone();
                    r
                })
            })
            .collect();
        b.store().append(late).await.unwrap();
        // Dropped without a snapshot: the restart replays those records.
    }
    let b = open(dir.path());
    let state = |i: usize| b.transactions().get(&txs[i].1).map(|t| t.state);
    assert_eq!(state(0), Some(TxState::Committed));
    assert_eq!(state(1), Some(TxState::RolledBack));
    assert!(drain(&b, "g", "pay").await.is_empty());
}

#[tokio::test]
async fn a_commit_to_a_topic_whose_name_starts_with_a_percent_sign_survives_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let txs;
    {
        let b = open(dir.path());
        txs = halves(&b, "%pay", 1).await;
        b.end_transaction("%pay", &txs[0].0, &txs[0].1, Resolution::Commit)
            .await
            .unwrap();
        // Dropped without a snapshot: the restart replays the commit.
    }
    let b = open(dir.path());
    assert_eq!(
        b.transactions().get(&txs[0].1).map(|t| t.state),
        Some(TxState::Committed)
    );
    assert_eq!(drain(&b, "g", "%pay").await, vec![txs[0].0.clone()]);
}

#[tokio::test]
async fn an_out_of_range_recovery_duration_does_not_bring_the_first_check_back_forward() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path());
    b.metadata()
        .create_topic("pay", TopicType::Transaction, 1)
        .unwrap();
    let mut m = msg("pay", "far", SendType::Transaction);
    m.orphaned_recovery_ms = Some(i64::MAX as u64);
    let r = b.send(vec![m]).await.unwrap();
    let tx = b
        .transactions()
        .get(r[0].transaction_id.as_deref().unwrap())
        .unwrap();
    assert!(
        tx.next_check_ms > txmq_broker::now_ms() + 365 * 24 * 3_600_000,
        "first check-back due at {} ms",
        tx.next_check_ms
    );
}

#[tokio::test]
async fn a_restarted_idle_broker_keeps_the_half_message_of_an_open_transaction_from_retention() {
    let dir = tempfile::tempdir().unwrap();
    let txs;
    {
        let b = open(dir.path());
        txs = halves(&b, "pay", 1).await;
        // Enough other messages to fill the half message's 1 MiB segment and start others.
        let filler: Vec<NewMessage> = (0..48)
            .map(|i| {
                let mut m = msg("filler", &format!("f{i}"), SendType::Normal);
                m.body = vec![b'x'; 60 << 10];
                m
            })
            .collect();
        for chunk in filler.chunks(8) {
            b.send(chunk.to_vec()).await.unwrap();
        }
        b.shutdown().await.unwrap();
    }
    let b = open(dir.path());
    // Retention as it would run long after the restart, the broker idle meanwhile.
    let later = txmq_broker::now_ms() + 30 * 24 * 3_600_000;
    let report = b.store().apply_retention_at(later).unwrap();
    assert_eq!(
        report.held_by.as_deref(),
        Some("transactions"),
        "{report:?}"
    );
    b.end_transaction("pay", &txs[0].0, &txs[0].1, Resolution::Commit)
        .await
        .unwrap();
    assert_eq!(drain(&b, "g", "pay").await, vec![txs[0].0.clone()]);
}

/// Sends messages `ids` of FIFO message group `group` to FIFO topic `topic` (created with
/// `queues` queues if it does not exist).
async fn send_fifo(b: &Arc<Broker>, topic: &str, queues: u32, group: &str, ids: &[&str]) {
    if b.metadata().topic(topic).is_none() {
        b.metadata()
            .create_topic(topic, TopicType::Fifo, queues)
            .unwrap();
    }
    for id in ids {
        let mut m = msg(topic, id, SendType::Fifo);
        m.message_group = Some(group.into());
        b.send(vec![m]).await.unwrap();
    }
}

/// Receives everything ready for `group` and gives it back at once (a negative
/// acknowledgement): the ids received, in order.
async fn nack_all(b: &Arc<Broker>, group: &str, topic: &str) -> Vec<String> {
    let got = b.receive(&receive(group, topic, 30_000)).await.unwrap();
    for d in &got {
        b.change_invisible(group, topic, &d.handle, 0).unwrap();
    }
    got.into_iter().map(|d| d.record.data.message_id).collect()
}

#[tokio::test]
async fn messages_found_past_their_max_attempts_after_a_first_move_are_moved_too() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path());
    send_fifo(&b, "f", 1, "G", &["a", "b"]).await;
    // Consumed in parallel first: both messages use up their attempts.
    b.metadata().put_group("g", 2, false, Vec::new()).unwrap();
    for _ in 0..2 {
        assert_eq!(nack_all(&b, "g", "f").await, vec!["a", "b"]);
    }
    // Now in order: "b" waits behind "a" until "a" is moved, and is found past its max
    // attempts only by the look after that move.
    b.metadata().put_group("g", 2, true, Vec::new()).unwrap();
    assert!(
        b.receive(&receive("g", "f", 30_000))
            .await
            .unwrap()
            .is_empty()
    );
    let stats = b.group_stats("g");
    assert_eq!((stats.dead_lettered, stats.lag), (2, 0), "{stats:?}");
    assert_eq!(drain(&b, "dlq-reader", "%DLQ%g").await, vec!["a", "b"]);
}

#[tokio::test]
async fn a_message_dead_lettered_twice_names_its_latest_origin_also_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    {
        let b = failed_once(dir.path()).await;
        assert!(b.receive(&receive("g", "t", 0)).await.unwrap().is_empty());
        // Group h consumes g's dead-letter topic, and fails the message too.
        b.metadata().put_group("h", 1, false, Vec::new()).unwrap();
        assert_eq!(nack_all(&b, "h", "%DLQ%g").await, vec!["poison"]);
        assert!(
            b.receive(&receive("h", "%DLQ%g", 0))
                .await
                .unwrap()
                .is_empty()
        );
        let moved = b
            .receive(&receive("dlq-reader", "%DLQ%h", 30_000))
            .await
            .unwrap();
        assert_eq!(moved.len(), 1);
        let origin = moved[0].record.data.system_properties.iter();
        let origins: Vec<&String> = origin
            .filter(|(k, _)| k == "dlq_origin")
            .map(|(_, v)| v)
            .collect();
        assert_eq!(origins, vec!["h %DLQ%g 0 0"]);
        // Dropped without a snapshot: the restart replays the moves.
    }
    let b = open(dir.path());
    assert_eq!(b.group_stats("g").dead_lettered, 1);
    assert_eq!(b.group_stats("h").dead_lettered, 1);
    assert!(
        b.receive(&receive("h", "%DLQ%g", 0))
            .await
            .unwrap()
            .is_empty(),
        "a message group h moved came back to it"
    );
}

#[tokio::test]
async fn a_redriven_fifo_message_goes_back_to_its_message_groups_queue() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path());
    b.metadata().put_group("g", 1, true, Vec::new()).unwrap();
    // A message group whose queue is not the first: the first dead-lettered message is
    // at offset 0 of the dead-letter topic.
    let group = (0..)
        .map(|i| format!("order-{i}"))
        .find(|g| !crc32c::crc32c(g.as_bytes()).is_multiple_of(4))
        .unwrap();
    send_fifo(&b, "f", 4, &group, &["a"]).await;
    let first = b.receive(&receive("g", "f", 30_000)).await.unwrap();
    let queue = first[0].record.data.queue_id;
    b.change_invisible("g", "f", &first[0].handle, 0).unwrap();
    assert!(b.receive(&receive("g", "f", 0)).await.unwrap().is_empty());
    assert_eq!(b.redrive("g", 10).await.unwrap(), 1);
    let again = b.receive(&receive("g", "f", 30_000)).await.unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].record.data.queue_id, queue);
}

/// Starts a receive that long-polls up to 20 s; returns it and when it started.
fn long_poll(
    b: &Arc<Broker>,
    group: &str,
    topic: &str,
) -> (
    tokio::task::JoinHandle<Vec<txmq_broker::delivery::Delivered>>,
    tokio::time::Instant,
) {
    let mut req = receive(group, topic, 30_000);
    req.long_poll = Duration::from_secs(20);
    let b = b.clone();
    let started = tokio::time::Instant::now();
    (
        tokio::spawn(async move { b.receive(&req).await.unwrap() }),
        started,
    )
}

#[tokio::test]
async fn a_long_poll_wakes_when_a_nack_brings_a_message_back_sooner() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path());
    b.send(vec![msg("t", "m", SendType::Normal)]).await.unwrap();
    let got = b.receive(&receive("g", "t", 30_000)).await.unwrap();
    let (waiting, started) = long_poll(&b, "g", "t");
    tokio::time::sleep(Duration::from_millis(100)).await;
    b.change_invisible("g", "t", &got[0].handle, 300).unwrap();
    let again = waiting.await.unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].attempt, 2);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "woken only by the end of its long poll"
    );
}

#[tokio::test]
async fn a_fifo_long_poll_wakes_when_the_message_ahead_is_forwarded_to_the_dead_letter_topic() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path());
    b.metadata().put_group("g", 16, true, Vec::new()).unwrap();
    send_fifo(&b, "f", 1, "G", &["a", "b"]).await;
    let got = b.receive(&receive("g", "f", 30_000)).await.unwrap();
    assert_eq!(got.len(), 1);
    let (waiting, started) = long_poll(&b, "g", "f");
    tokio::time::sleep(Duration::from_millis(100)).await;
    b.forward_to_dead_letter("g", "f", &got[0].handle)
        .await
        .unwrap();
    let next = waiting.await.unwrap();
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].record.data.message_id, "b");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "woken only by the end of its long poll"
    );
}

#[tokio::test]
async fn delays_and_backoffs_longer_than_the_broker_keeps_or_allows_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path());
    let hour = 3_600_000;
    let delayed = |hours: i64| {
        let mut m = msg("later", "d", SendType::Delay);
        m.delivery_timestamp = Some(txmq_broker::now_ms() + hours * hour);
        m
    };
    // Retention keeps the log 72 hours: a message due later could be deleted first.
    let err = b.send(vec![delayed(73)]).await.unwrap_err();
    assert_eq!(err.code, Code::IllegalDeliveryTime);
    assert!(err.message.contains("retention"), "{}", err.message);
    b.send(vec![delayed(71)]).await.unwrap();
    // So must a transactional message with a delivery time, delayed once committed.
    b.metadata()
        .create_topic("pay-later", TopicType::Transaction, 1)
        .unwrap();
    let mut half = msg("pay-later", "h", SendType::Transaction);
    half.delivery_timestamp = Some(txmq_broker::now_ms() + 73 * hour);
    let err = b.send(vec![half.clone()]).await.unwrap_err();
    assert_eq!(err.code, Code::IllegalDeliveryTime);
    half.delivery_timestamp = Some(txmq_broker::now_ms() + 71 * hour);
    b.send(vec![half]).await.unwrap();
    // A backoff step is a ChangeInvisibleDuration: 12 hours at most.
    let err = b
        .metadata()
        .put_group("g", 3, false, vec![13 * hour as u64])
        .unwrap_err();
    assert_eq!(err.code, Code::BadRequest);
    b.metadata()
        .put_group("g", 3, false, vec![12 * hour as u64])
        .unwrap();
}

#[tokio::test]
async fn a_recheck_whose_caller_goes_away_leaves_nothing_stuck() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path());
    let txs = halves(&b, "pay", 1).await;
    let (message, id) = &txs[0];
    dropped_midway(b.recheck_transaction(id)).await;
    let commit = tokio::time::timeout(
        Duration::from_secs(5),
        b.end_transaction("pay", message, id, Resolution::Commit),
    )
    .await
    .expect("the commit waits for a recheck whose caller went away");
    assert_eq!(commit.unwrap(), TxState::Committed);
    assert_eq!(drain(&b, "g", "pay").await, vec![message.clone()]);
}

#[tokio::test]
async fn a_dead_letter_move_that_fails_leaves_its_message_to_be_moved_or_acknowledged_later() {
    let io = SimIo::new();
    let b = open_sim(&io);
    // Group g fails "poison" once, its max; group h has "forwarded" out with a consumer.
    fail_once(&b, "g").await;
    b.send(vec![msg("f", "forwarded", SendType::Normal)])
        .await
        .unwrap();
    let out = b.receive(&receive("h", "f", 30_000)).await.unwrap();
    let handle = out[0].handle.clone();
    // The disk is full: neither dead-letter topic can be made.
    io.set_capacity(Some(io.used_bytes()));
    assert!(b.receive(&receive("g", "t", 30_000)).await.is_err());
    assert!(b.forward_to_dead_letter("h", "f", &handle).await.is_err());
    assert_eq!(b.group_stats("g").dead_lettered, 0);
    io.set_capacity(None);
    // The failed move is made by the next receive; the failed forward left the message
    // out with its consumer, whose handle still acknowledges it.
    assert!(
        b.receive(&receive("g", "t", 30_000))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(b.group_stats("g").dead_lettered, 1);
    assert_eq!(
        drain(&b, "dlq-reader", "%DLQ%g").await,
        vec!["poison".to_string()]
    );
    assert!(b.ack("h", "f", &[handle]).await[0].is_ok());
    let h = b.group_stats("h");
    assert_eq!((h.lag, h.in_flight, h.dead_lettered), (0, 0, 0));
}

#[tokio::test]
async fn a_redrive_cut_short_by_a_power_loss_sends_each_message_back_once() {
    let mut cut = 0;
    loop {
        let io = SimIo::new();
        let b = open_sim(&io);
        fail_once(&b, "g").await;
        assert!(
            b.receive(&receive("g", "t", 30_000))
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(b.group_stats("g").dead_lettered, 1);
        let before = io.mutations();
        io.cut_power_after(before + cut);
        let redriven = b.redrive("g", 10).await;
        let whole = redriven.is_ok() && io.mutations() < before + cut;
        for seed in 0..3 {
            let image = io.crash(seed);
            let b = open_sim(&image);
            // Whatever the first redrive left, one more sends back what it did not.
            b.redrive("g", 10).await.unwrap();
            assert_eq!(
                drain(&b, "g", "t").await,
                vec!["poison".to_string()],
                "power cut after {cut} of the redrive's writes, seed {seed}"
            );
        }
        if whole {
            break;
        }
        cut += 1;
        assert!(cut < 500, "the redrive never finished");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_async_durability_a_snapshot_never_stands_for_log_a_power_loss_takes() {
    let lazy = BrokerConfig {
        durability: "async".into(),
        // No flush of its own during the test.
        async_flush_ms: 3_600_000,
        ..config(std::path::Path::new("/srv/txmq"))
    };
    for seed in 0..4 {
        let io = SimIo::new();
        let b = open_sim_with(&io, lazy.clone());
        let mut big = msg("t", "big", SendType::Normal);
        big.body = vec![7; 32 << 10];
        b.send(vec![big]).await.unwrap();
        b.snapshot().await.unwrap();
        let io = io.crash(seed);
        drop(b);
        // Next run: a transaction opened and made durable, then the power goes again
        // before any snapshot.
        let b = open_sim_with(&io, config(std::path::Path::new("/srv/txmq")));
        let opened = halves(&b, "pay", 1).await;
        let io = io.crash(seed);
        drop(b);
        let b = open_sim_with(&io, config(std::path::Path::new("/srv/txmq")));
        let tx = b.transactions().get(&opened[0].1);
        assert_eq!(
            tx.map(|t| t.state),
            Some(TxState::Prepared),
            "seed {seed}: the durable half message opens its transaction after the restart"
        );
    }
}
