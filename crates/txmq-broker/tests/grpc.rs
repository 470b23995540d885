//! The gRPC service over a real server on an ephemeral port, with the generated client.

use std::time::Duration;

use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use tonic::Request;
use tonic::transport::Channel;
use txmq_broker::BrokerConfig;
use txmq_broker::server::Server;
use txmq_proto::v2::messaging_service_client::MessagingServiceClient;
use txmq_proto::v2::{self as pb, Code, MessageType, receive_message_response, telemetry_command};

fn config(dir: &std::path::Path) -> BrokerConfig {
    BrokerConfig {
        data_dir: dir.to_path_buf(),
        listen: "127.0.0.1:0".into(),
        http: "127.0.0.1:0".into(),
        segment_size: 1 << 20,
        max_body_size: 64 << 10,
        transaction_timeout_ms: 300,
        transaction_check_interval_ms: 200,
        transaction_check_max: 2,
        ..BrokerConfig::default()
    }
}

/// A server on `dir` with the transactional topic `pay` (2 queues).
async fn with_pay_topic(dir: &std::path::Path) -> Server {
    let server = Server::start(config(dir)).await.unwrap();
    server
        .broker
        .metadata()
        .create_topic("pay", txmq_broker::metadata::TopicType::Transaction, 2)
        .unwrap();
    server
}

async fn client(server: &Server) -> MessagingServiceClient<Channel> {
    let ch = Channel::from_shared(format!("http://{}", server.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    MessagingServiceClient::new(ch)
}

fn req<T>(client_id: &str, body: T) -> Request<T> {
    let mut r = Request::new(body);
    r.metadata_mut()
        .insert("x-mq-client-id", client_id.parse().unwrap());
    r
}

fn resource(name: &str) -> Option<pb::Resource> {
    Some(pb::Resource {
        resource_namespace: String::new(),
        name: name.into(),
    })
}

fn message(topic: &str, id: &str, kind: MessageType, body: Vec<u8>) -> pb::Message {
    pb::Message {
        topic: resource(topic),
        user_properties: Default::default(),
        system_properties: Some(pb::SystemProperties {
            message_id: id.into(),
            message_type: kind as i32,
            tag: Some("tag".into()),
            ..Default::default()
        }),
        body: body.into(),
    }
}

fn code(st: &Option<pb::Status>) -> Code {
    Code::try_from(st.as_ref().map_or(0, |s| s.code)).unwrap_or(Code::Unspecified)
}

async fn receive(
    c: &mut MessagingServiceClient<Channel>,
    group: &str,
    topic: &str,
) -> (Code, Vec<pb::Message>) {
    let r = pb::ReceiveMessageRequest {
        group: resource(group),
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
        invisible_duration: Some(prost_types::Duration {
            seconds: 30,
            nanos: 0,
        }),
        auto_renew: false,
        long_polling_timeout: Some(prost_types::Duration {
            seconds: 1,
            nanos: 0,
        }),
        attempt_id: None,
    };
    let mut stream = c.receive_message(req("c1", r)).await.unwrap().into_inner();
    let mut status = Code::Unspecified;
    let mut msgs = Vec::new();
    let mut ends_with_time = false;
    while let Some(item) = stream.next().await {
        match item.unwrap().content {
            Some(receive_message_response::Content::Status(s)) => {
                status = Code::try_from(s.code).unwrap()
            }
            Some(receive_message_response::Content::Message(m)) => msgs.push(m),
            Some(receive_message_response::Content::DeliveryTimestamp(_)) => ends_with_time = true,
            None => {}
        }
    }
    assert!(
        ends_with_time,
        "a receive stream ends with the delivery timestamp"
    );
    (status, msgs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_receive_and_ack_over_grpc() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(config(dir.path())).await.unwrap();
    let mut c = client(&server).await;
    let route = c
        .query_route(pb::QueryRouteRequest {
            topic: resource("orders"),
            endpoints: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code(&route.status), Code::Ok);
    assert_eq!(route.message_queues.len(), 8);
    // Asked without endpoints, the route names the broker's own address.
    let addr = route.message_queues[0]
        .broker
        .as_ref()
        .unwrap()
        .endpoints
        .as_ref()
        .unwrap()
        .addresses[0]
        .clone();
    assert_eq!(
        (addr.host.as_str(), addr.port),
        ("127.0.0.1", i32::from(server.grpc_addr.port()))
    );
    let sent = c
        .send_message(req(
            "c1",
            pb::SendMessageRequest {
                messages: vec![message(
                    "orders",
                    "m1",
                    MessageType::Normal,
                    b"hello".to_vec(),
                )],
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code(&sent.status), Code::Ok);
    assert_eq!(sent.entries[0].message_id, "m1");
    let (st, msgs) = receive(&mut c, "g", "orders").await;
    assert_eq!(st, Code::Ok);
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].body, &b"hello"[..]);
    let sp = msgs[0].system_properties.clone().unwrap();
    assert_eq!(sp.delivery_attempt, Some(1));
    // MD5 of "hello", upper-case hex, as the official clients check it.
    assert_eq!(
        sp.body_digest.unwrap().checksum,
        "5D41402ABC4B2A76B9719D911017C592"
    );
    let ack = c
        .ack_message(req(
            "c1",
            pb::AckMessageRequest {
                group: resource("g"),
                topic: resource("orders"),
                entries: vec![pb::AckMessageEntry {
                    message_id: "m1".into(),
                    receipt_handle: sp.receipt_handle.clone().unwrap(),
                    lite_topic: None,
                }],
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code(&ack.status), Code::Ok);
    let (st, msgs) = receive(&mut c, "g", "orders").await;
    assert_eq!((st, msgs.len()), (Code::MessageNotFound, 0));
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_rocketmq_status_codes_and_garbage_does_not_disturb_others() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.auto_create_topics = false;
    let server = Server::start(cfg).await.unwrap();
    let mut c = client(&server).await;
    let route = c
        .query_route(pb::QueryRouteRequest {
            topic: resource("missing"),
            endpoints: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code(&route.status), Code::TopicNotFound);
    let sent = c
        .send_message(req(
            "c1",
            pb::SendMessageRequest {
                messages: vec![message("missing", "m", MessageType::Normal, b"x".to_vec())],
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code(&sent.status), Code::TopicNotFound);
    server
        .broker
        .metadata()
        .create_topic("plain", txmq_broker::metadata::TopicType::Normal, 2)
        .unwrap();
    // A deadline past what any clock counts: treated as no deadline worth shortening for.
    server
        .broker
        .metadata()
        .put_group("g", 16, false, Vec::new())
        .unwrap();
    let mut far = req(
        "c1",
        pb::ReceiveMessageRequest {
            group: resource("g"),
            message_queue: Some(pb::MessageQueue {
                topic: resource("plain"),
                id: -1,
                ..Default::default()
            }),
            invisible_duration: Some(prost_types::Duration {
                seconds: 30,
                nanos: 0,
            }),
            long_polling_timeout: Some(prost_types::Duration::default()),
            ..Default::default()
        },
    );
    far.metadata_mut()
        .insert("grpc-timeout", "99999999999999999H".parse().unwrap());
    let mut answers = c.receive_message(far).await.unwrap().into_inner();
    let first = answers.next().await.unwrap().unwrap().content;
    assert!(
        matches!(&first, Some(receive_message_response::Content::Status(s)) if s.code == Code::MessageNotFound as i32),
        "{first:?}"
    );
    let big = message("plain", "big", MessageType::Normal, vec![1; 65 << 10]);
    let sent = c
        .send_message(req(
            "c1",
            pb::SendMessageRequest {
                messages: vec![big],
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code(&sent.status), Code::MessageBodyTooLarge);
    let tx = message("plain", "tx", MessageType::Transaction, b"x".to_vec());
    let sent = c
        .send_message(req("c1", pb::SendMessageRequest { messages: vec![tx] }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code(&sent.status), Code::MessagePropertyConflictWithType);
    // A body that does not match its digest (changed on its way) is refused, and with it
    // the whole request: nothing of it is stored.
    let stored = server.broker.store().stats().records;
    let mut good = message("plain", "good", MessageType::Normal, b"pay 100".to_vec());
    let mut changed = message("plain", "changed", MessageType::Normal, b"pay 900".to_vec());
    for (m, digest_of) in [
        (&mut good, &b"pay 100"[..]),
        (&mut changed, &b"pay 100"[..]),
    ] {
        m.system_properties.as_mut().unwrap().body_digest =
            Some(txmq_proto::digest::crc32(digest_of));
    }
    let sent = c
        .send_message(req(
            "c1",
            pb::SendMessageRequest {
                messages: vec![good, changed],
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code(&sent.status), Code::MessageCorrupted);
    assert!(
        sent.status.as_ref().unwrap().message.contains("changed"),
        "{:?}",
        sent.status
    );
    assert_eq!(server.broker.store().stats().records, stored);
    let hb = c
        .heartbeat(req(
            "stranger",
            pb::HeartbeatRequest {
                group: None,
                client_type: 1,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code(&hb.status), Code::UnrecognizedClientType);
    // An acknowledgement of nothing: its group is checked all the same, and an empty one
    // of a legal group is a bad request.
    for (group, expected) in [
        ("bad group!", Code::IllegalConsumerGroup),
        ("g", Code::BadRequest),
    ] {
        let acked = c
            .ack_message(req(
                "c1",
                pb::AckMessageRequest {
                    group: resource(group),
                    topic: resource("plain"),
                    entries: Vec::new(),
                },
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (code(&acked.status), acked.entries.len()),
            (expected, 0),
            "{group}"
        );
    }
    // Garbage on the port closes only that connection.
    for junk in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        &[0xff; 64][..],
        &[0x16, 3, 1, 0, 5, 1, 2, 3, 4, 5][..],
    ] {
        let mut s = tokio::net::TcpStream::connect(server.grpc_addr)
            .await
            .unwrap();
        let _ = s.write_all(junk).await;
        drop(s);
    }
    let sent = c
        .send_message(req(
            "c1",
            pb::SendMessageRequest {
                messages: vec![message("plain", "ok", MessageType::Normal, b"x".to_vec())],
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code(&sent.status), Code::Ok);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_client_may_read_dead_letters_as_the_group_a_redrive_reads_them_as() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(config(dir.path())).await.unwrap();
    let mut c = client(&server).await;
    let (st, msgs) = receive(&mut c, "%REDRIVE%g", "%DLQ%g").await;
    assert_eq!((st, msgs.len()), (Code::IllegalConsumerGroup, 0));
    let acked = c
        .ack_message(req(
            "c1",
            pb::AckMessageRequest {
                group: resource("%REDRIVE%g"),
                topic: resource("%DLQ%g"),
                entries: vec![pb::AckMessageEntry {
                    message_id: "m".into(),
                    receipt_handle: "h".into(),
                    ..Default::default()
                }],
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code(&acked.status), Code::IllegalConsumerGroup);
    let changed = c
        .change_invisible_duration(req(
            "c1",
            pb::ChangeInvisibleDurationRequest {
                group: resource("%REDRIVE%g"),
                topic: resource("%DLQ%g"),
                receipt_handle: "h".into(),
                invisible_duration: Some(prost_types::Duration {
                    seconds: 1,
                    nanos: 0,
                }),
                message_id: "m".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code(&changed.status), Code::IllegalConsumerGroup);
    // The group it stands for is a client's as any other.
    let (st, _) = receive(&mut c, "g", "%DLQ%g").await;
    assert_eq!(st, Code::TopicNotFound);
    server.stop().await.unwrap();
}

/// The Telemetry stream of producer `client_id` that declared `topics`, once the broker
/// answered its settings: the sender that keeps it open, and what the broker sends on it.
async fn producer_stream(
    c: &mut MessagingServiceClient<Channel>,
    client_id: &str,
    topics: &[&str],
) -> (
    tokio::sync::mpsc::Sender<pb::TelemetryCommand>,
    tonic::Streaming<pb::TelemetryCommand>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let settings = pb::Settings {
        client_type: Some(pb::ClientType::Producer as i32),
        pub_sub: Some(pb::settings::PubSub::Publishing(pb::Publishing {
            topics: topics.iter().map(|t| resource(t).unwrap()).collect(),
            ..Default::default()
        })),
        ..Default::default()
    };
    tx.send(pb::TelemetryCommand {
        status: None,
        command: Some(telemetry_command::Command::Settings(settings)),
    })
    .await
    .unwrap();
    let mut inbound = c
        .telemetry(req(
            client_id,
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(3), inbound.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        matches!(first.command, Some(telemetry_command::Command::Settings(_))),
        "{first:?}"
    );
    (tx, inbound)
}

/// The next check-back on `inbound` within `wait`: its transaction id, or None.
async fn next_check(
    inbound: &mut tonic::Streaming<pb::TelemetryCommand>,
    wait: Duration,
) -> Option<String> {
    let cmd = tokio::time::timeout(wait, inbound.next()).await.ok()?;
    match cmd.unwrap().unwrap().command {
        Some(telemetry_command::Command::RecoverOrphanedTransactionCommand(c)) => {
            Some(c.transaction_id)
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_transaction_is_checked_back_on_the_telemetry_stream_and_the_answer_commits_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = with_pay_topic(dir.path()).await;
    let mut c = client(&server).await;
    let (tx, mut inbound) = producer_stream(&mut c, "producer-1", &["pay"]).await;
    let sent = c
        .send_message(req(
            "producer-1",
            pb::SendMessageRequest {
                messages: vec![message(
                    "pay",
                    "t1",
                    MessageType::Transaction,
                    b"paid".to_vec(),
                )],
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code(&sent.status), Code::Ok);
    let tx_id = sent.entries[0].transaction_id.clone();
    // Never ended by the producer: the broker asks.
    let check = tokio::time::timeout(Duration::from_secs(5), inbound.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let Some(telemetry_command::Command::RecoverOrphanedTransactionCommand(cmd)) = check.command
    else {
        panic!("{check:?}")
    };
    assert_eq!(cmd.transaction_id, tx_id);
    assert_eq!(
        cmd.message.as_ref().unwrap().topic.as_ref().unwrap().name,
        "pay"
    );
    let end = c
        .end_transaction(req(
            "producer-1",
            answer("pay", "t1", &tx_id, pb::TransactionResolution::Commit),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code(&end.status), Code::Ok);
    let (_, msgs) = receive(&mut c, "g", "pay").await;
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].body, &b"paid"[..]);
    drop(tx);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_mid_stream_leaves_the_server_and_its_messages_intact() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(config(dir.path())).await.unwrap();
    server
        .broker
        .metadata()
        .create_topic("quiet", txmq_broker::metadata::TopicType::Normal, 2)
        .unwrap();
    // A telemetry stream and a long poll, both dropped with their connection.
    {
        let mut c = client(&server).await;
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let settings = pb::Settings {
            client_type: Some(pb::ClientType::SimpleConsumer as i32),
            pub_sub: Some(pb::settings::PubSub::Subscription(pb::Subscription {
                group: resource("g"),
                ..Default::default()
            })),
            ..Default::default()
        };
        tx.send(pb::TelemetryCommand {
            status: None,
            command: Some(telemetry_command::Command::Settings(settings)),
        })
        .await
        .unwrap();
        let mut inbound = c
            .telemetry(req(
                "leaver",
                tokio_stream::wrappers::ReceiverStream::new(rx),
            ))
            .await
            .unwrap()
            .into_inner();
        inbound.next().await.unwrap().unwrap();
        assert!(server.broker.sessions().knows("leaver"));
        let mut poller = c.clone();
        let poll = tokio::spawn(async move { receive(&mut poller, "g", "quiet").await });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!poll.is_finished(), "the receive should be long-polling");
        poll.abort();
        drop(inbound);
        drop(tx);
    }
    // The session goes away with its stream.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while server.broker.sessions().knows("leaver") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "session of a gone client is still registered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Others are served as before, and a message sent now is delivered.
    let mut c = client(&server).await;
    let sent = c
        .send_message(req(
            "c2",
            pb::SendMessageRequest {
                messages: vec![message(
                    "quiet",
                    "after",
                    MessageType::Normal,
                    b"x".to_vec(),
                )],
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code(&sent.status), Code::Ok);
    let (_, msgs) = receive(&mut c, "g", "quiet").await;
    assert_eq!(msgs.len(), 1);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_the_server_ends_telemetry_streams_and_long_polls_promptly() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(config(dir.path())).await.unwrap();
    server
        .broker
        .metadata()
        .create_topic("idle", txmq_broker::metadata::TopicType::Normal, 1)
        .unwrap();
    let mut c = client(&server).await;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let settings = pb::Settings {
        client_type: Some(pb::ClientType::Producer as i32),
        pub_sub: Some(pb::settings::PubSub::Publishing(pb::Publishing {
            topics: vec![resource("idle").unwrap()],
            ..Default::default()
        })),
        ..Default::default()
    };
    tx.send(pb::TelemetryCommand {
        status: None,
        command: Some(telemetry_command::Command::Settings(settings)),
    })
    .await
    .unwrap();
    let mut inbound = c
        .telemetry(req(
            "stayer",
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
        .await
        .unwrap()
        .into_inner();
    inbound.next().await.unwrap().unwrap();
    let mut poller = c.clone();
    let poll = tokio::spawn(async move { receive(&mut poller, "g", "idle").await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    server.stop().await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "stop took {:?}",
        started.elapsed()
    );
    // The client sees its telemetry stream end, and its long poll answered.
    let end = tokio::time::timeout(Duration::from_secs(2), inbound.next())
        .await
        .unwrap();
    assert!(end.is_none() || end.unwrap().is_err());
    let _ = tokio::time::timeout(Duration::from_secs(2), poll)
        .await
        .unwrap();
    drop(tx);
}

/// An `EndTransactions` entry.
fn end(
    topic: &str,
    message_id: &str,
    tx_id: &str,
    resolution: pb::TransactionResolution,
) -> pb::EndTransactionRequest {
    pb::EndTransactionRequest {
        topic: resource(topic),
        message_id: message_id.into(),
        transaction_id: tx_id.into(),
        resolution: resolution as i32,
        source: pb::TransactionSource::SourceClient as i32,
        trace_context: String::new(),
    }
}

/// [`end`], as the answer to a check-back.
fn answer(
    topic: &str,
    message_id: &str,
    tx_id: &str,
    resolution: pb::TransactionResolution,
) -> pb::EndTransactionRequest {
    pb::EndTransactionRequest {
        source: pb::TransactionSource::SourceServerCheck as i32,
        ..end(topic, message_id, tx_id, resolution)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_transactions_decides_each_entry_on_its_own_in_one_call() {
    use pb::TransactionResolution::{Commit, Rollback};
    use txmq_proto::txmq::v1::{self as txmq_pb, transactions_client::TransactionsClient};

    let dir = tempfile::tempdir().unwrap();
    let server = with_pay_topic(dir.path()).await;
    let mut c = client(&server).await;
    let ends = TransactionsClient::new(
        Channel::from_shared(format!("http://{}", server.grpc_addr))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    let sent = c
        .send_message(req(
            "p1",
            pb::SendMessageRequest {
                messages: ["t1", "t2", "t3"]
                    .map(|id| message("pay", id, MessageType::Transaction, id.as_bytes().to_vec()))
                    .to_vec(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code(&sent.status), Code::Ok);
    let ids: Vec<String> = sent
        .entries
        .iter()
        .map(|e| e.transaction_id.clone())
        .collect();
    let call = |entries: Vec<pb::EndTransactionRequest>| {
        let mut ends = ends.clone();
        async move {
            ends.end_transactions(req("p1", txmq_pb::EndTransactionsRequest { entries }))
                .await
                .unwrap()
                .into_inner()
        }
    };

    // Refused as a whole, with nothing decided: no entry, or too many.
    let none = call(Vec::new()).await;
    assert_eq!(
        (code(&none.status), none.entries.len()),
        (Code::BadRequest, 0)
    );
    let too_many = call(vec![
        end("pay", "t1", &ids[0], Commit);
        txmq_pb::MAX_END_TRANSACTIONS + 1
    ])
    .await;
    assert_eq!(
        (code(&too_many.status), too_many.entries.len()),
        (Code::BadRequest, 0)
    );
    let (_, msgs) = receive(&mut c, "g", "pay").await;
    assert!(msgs.is_empty(), "nothing was committed by a refused call");

    // t1 committed twice in one call, t2 rolled back, an unknown id, and t3 named with the
    // wrong message: each entry gets its own status. The two decisions are stored in one
    // append; the repeated commit waits for the first and writes nothing.
    let before = server.broker.store().stats();
    let answer = call(vec![
        end("pay", "t1", &ids[0], Commit),
        end("pay", "t2", &ids[1], Rollback),
        end("pay", "t1", &ids[0], Commit),
        end("pay", "t9", "no-such-transaction", Commit),
        end("pay", "t2", &ids[2], Commit),
    ])
    .await;
    let after = server.broker.store().stats();
    assert_eq!(
        (
            after.records - before.records,
            after.group_commits - before.group_commits
        ),
        (2, 1)
    );
    assert_eq!(code(&answer.status), Code::MultipleResults);
    let codes: Vec<Code> = answer
        .entries
        .iter()
        .map(|s| code(&Some(s.clone())))
        .collect();
    assert_eq!(
        codes,
        [
            Code::Ok,
            Code::Ok,
            Code::Ok,
            Code::InvalidTransactionId,
            Code::InvalidTransactionId
        ]
    );

    // The opposite decision afterwards is refused; the same one again is answered OK.
    let again = call(vec![
        end("pay", "t1", &ids[0], Rollback),
        end("pay", "t2", &ids[1], Commit),
    ])
    .await;
    assert_eq!(code(&again.status), Code::PreconditionFailed);
    let same = call(vec![
        end("pay", "t1", &ids[0], Commit),
        end("pay", "t2", &ids[1], Rollback),
    ])
    .await;
    assert_eq!(code(&same.status), Code::Ok);

    // Only t1 is delivered, once; t3 is still open.
    let (_, msgs) = receive(&mut c, "g", "pay").await;
    let bodies: Vec<&[u8]> = msgs.iter().map(|m| &m.body[..]).collect();
    assert_eq!(bodies, [&b"t1"[..]]);
    let open = server.broker.transactions().get(&ids[2]).unwrap();
    assert_eq!(open.state, txmq_broker::transactions::TxState::Prepared);
    server.stop().await.unwrap();
}

/// Sends half message `id` to `topic` as producer-1: its transaction id.
async fn send_half(c: &mut MessagingServiceClient<Channel>, topic: &str, id: &str) -> String {
    let sent = c
        .send_message(req(
            "producer-1",
            pb::SendMessageRequest {
                messages: vec![message(topic, id, MessageType::Transaction, vec![1])],
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code(&sent.status), Code::Ok);
    sent.entries[0].transaction_id.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_is_sent_a_few_check_backs_at_a_time_and_each_answer_makes_room() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(BrokerConfig {
        transaction_checks_per_producer: 3,
        // Long enough that no check closes by its time during the test.
        transaction_check_interval_ms: 20_000,
        ..config(dir.path())
    })
    .await
    .unwrap();
    server
        .broker
        .metadata()
        .create_topic("pay", txmq_broker::metadata::TopicType::Transaction, 2)
        .unwrap();
    let mut c = client(&server).await;
    let (keep, mut inbound) = producer_stream(&mut c, "producer-1", &["pay"]).await;
    let mut open = std::collections::HashMap::new();
    for i in 0..8 {
        let id = format!("m{i}");
        open.insert(send_half(&mut c, "pay", &id).await, id);
    }
    let checked = |server: &Server| -> u32 {
        let txs = server
            .broker
            .transactions()
            .list(&[txmq_broker::transactions::TxState::Prepared]);
        txs.iter().map(|t| t.checks).sum()
    };
    // All 8 are due after 300 ms; the producer gets 3, and no more while it answers none.
    let mut asked = Vec::new();
    for _ in 0..3 {
        asked.push(
            next_check(&mut inbound, Duration::from_secs(5))
                .await
                .unwrap(),
        );
    }
    assert_eq!(
        next_check(&mut inbound, Duration::from_millis(1_500)).await,
        None
    );
    assert_eq!(checked(&server), 3, "only checks sent count");
    // Each answer, whatever it decides, makes room for one more, until every transaction
    // was asked once.
    let mut answered = 0;
    while let Some(id) = asked.pop() {
        let message_id = open.remove(&id).expect("each transaction is asked once");
        let resolution = if answered % 2 == 0 {
            pb::TransactionResolution::Commit
        } else {
            pb::TransactionResolution::Rollback
        };
        let end = c
            .end_transaction(req(
                "producer-1",
                answer("pay", &message_id, &id, resolution),
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(code(&end.status), Code::Ok);
        answered += 1;
        if open.len() > asked.len() {
            asked.push(
                next_check(&mut inbound, Duration::from_secs(5))
                    .await
                    .unwrap(),
            );
        }
    }
    assert_eq!(answered, 8);
    assert!(open.is_empty(), "{open:?}");
    assert_eq!(
        next_check(&mut inbound, Duration::from_millis(500)).await,
        None
    );
    let (_, msgs) = receive(&mut c, "g", "pay").await;
    assert_eq!(msgs.len(), 4, "the four commits, and none of the rollbacks");
    drop(keep);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_that_share_a_producer_share_its_check_backs_oldest_first() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(BrokerConfig {
        transaction_checks_per_producer: 1,
        transaction_check_interval_ms: 20_000,
        ..config(dir.path())
    })
    .await
    .unwrap();
    for topic in ["pay", "ship"] {
        server
            .broker
            .metadata()
            .create_topic(topic, txmq_broker::metadata::TopicType::Transaction, 1)
            .unwrap();
    }
    let mut c = client(&server).await;
    let (keep, mut inbound) = producer_stream(&mut c, "producer-1", &["pay", "ship"]).await;
    // One of ship, then a backlog of pay, then another of ship (a few ms apart, so that
    // no two are stored in the same millisecond): asked in that order.
    let mut order = Vec::new();
    for (topic, id) in [
        ("ship", "s0"),
        ("pay", "p0"),
        ("pay", "p1"),
        ("pay", "p2"),
        ("pay", "p3"),
        ("ship", "s1"),
    ] {
        order.push((topic, send_half(&mut c, topic, id).await));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for (topic, tx_id) in &order {
        let asked = next_check(&mut inbound, Duration::from_secs(5)).await;
        assert_eq!(asked.as_ref(), Some(tx_id), "{topic}");
        let end = c
            .end_transaction(req(
                "producer-1",
                answer(topic, "", tx_id, pb::TransactionResolution::Rollback),
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(code(&end.status), Code::Ok);
    }
    drop(keep);
    server.stop().await.unwrap();
}
