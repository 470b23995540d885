//! The connection: reconnect after a broker restart (also with joined sends in flight), the
//! settings deadline, TLS (trust any certificate, or a given CA), and signed requests.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{broker_config, client, joining_client, start, topic, within};
use txmq_broker::BrokerConfig;
use txmq_broker::metadata::TopicType;
use txmq_broker::server::Server;
use txmq_client::{
    ClientConfig, ConnectError, Credentials, Message, MessageView, Producer, SimpleConsumer,
    Subscription, Tls, TransactionChecker, TransactionResolution, TransactionalProducer,
};

#[derive(Clone, Default)]
struct Commit(Arc<AtomicUsize>);

impl TransactionChecker for Commit {
    async fn check(&self, _: &str, _: &MessageView) -> TransactionResolution {
        self.0.fetch_add(1, Ordering::SeqCst);
        TransactionResolution::Commit
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_keeps_working_after_a_broker_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    topic(&server, "orders", TopicType::Normal);
    topic(&server, "payments", TopicType::Transaction);
    let port = server.grpc_addr.port();
    let config = client(&server);
    let checks = Commit::default();
    let (producer, tx_producer) = within(10, async {
        let producer = Producer::connect(config.clone(), ["orders"]).await.unwrap();
        producer
            .send(Message::new("orders", "before"))
            .await
            .unwrap();
        let tx_producer =
            TransactionalProducer::connect(config.clone(), ["payments"], checks.clone())
                .await
                .unwrap();
        (producer, tx_producer)
    })
    .await;
    server.stop().await.unwrap();

    let server = Server::start(BrokerConfig {
        listen: format!("127.0.0.1:{port}"),
        ..broker_config(dir.path())
    })
    .await
    .unwrap();
    within(20, async {
        // The next send goes through on a new connection.
        let started = Instant::now();
        producer
            .send(Message::new("orders", "after"))
            .await
            .unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );

        // The Telemetry stream was reopened: check-backs reach the producer again.
        let tx = tx_producer
            .begin(Message::new("payments", "orphan"))
            .await
            .unwrap();
        drop(tx);
        while checks.0.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        let consumer =
            SimpleConsumer::connect(config.clone(), "audit", [Subscription::all("orders")])
                .await
                .unwrap();
        let mut bodies = Vec::new();
        while bodies.len() < 2 {
            for m in consumer.receive(8, Duration::from_secs(30)).await.unwrap() {
                bodies.push(String::from_utf8(m.body().to_vec()).unwrap());
            }
        }
        bodies.sort();
        assert_eq!(bodies, ["after", "before"]);
    })
    .await;
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joined_sends_across_a_broker_restart_each_end_and_none_acknowledged_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    topic(&server, "orders", TopicType::Normal);
    let port = server.grpc_addr.port();
    // One request in flight: the other senders' messages wait and are joined, also while
    // the broker is gone.
    let producer = within(10, Producer::connect(joining_client(&server), ["orders"]))
        .await
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    // Message id -> body of every send answered OK; count of sends that failed.
    let acked = Arc::new(Mutex::new(HashMap::new()));
    let failed = Arc::new(AtomicUsize::new(0));
    let senders: Vec<_> = (0..8)
        .map(|task| {
            let (producer, stop, acked, failed) = (
                producer.clone(),
                stop.clone(),
                acked.clone(),
                failed.clone(),
            );
            tokio::spawn(async move {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let body = format!("t{task}-{n}");
                    match producer.send(Message::new("orders", body.clone())).await {
                        Ok(r) => {
                            acked.lock().unwrap().insert(r.message_id, body);
                        }
                        Err(_) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.stop().await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let server = Server::start(BrokerConfig {
        listen: format!("127.0.0.1:{port}"),
        ..broker_config(dir.path())
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    // Every send ends, with a receipt or an error: none hangs on a request slot.
    within(30, async {
        for s in senders {
            s.await.unwrap();
        }
    })
    .await;
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    assert!(!acked.is_empty());
    eprintln!(
        "{} sends acknowledged, {} failed",
        acked.len(),
        failed.load(Ordering::Relaxed)
    );

    // Every acknowledged message is delivered, with its body.
    within(60, async {
        let consumer =
            SimpleConsumer::connect(client(&server), "audit", [Subscription::all("orders")])
                .await
                .unwrap();
        let mut seen = std::collections::HashSet::new();
        while !acked.keys().all(|id| seen.contains(id)) {
            let batch = consumer.receive(32, Duration::from_secs(30)).await.unwrap();
            for (m, outcome) in batch.iter().zip(consumer.ack_all(&batch).await) {
                outcome.unwrap();
                if let Some(body) = acked.get(m.message_id()) {
                    assert_eq!(m.body(), body.as_bytes());
                }
                seen.insert(m.message_id().to_string());
            }
        }
    })
    .await;
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_server_fails_the_connect_within_the_request_timeout() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // Accepts connections and never says a word.
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let config =
        ClientConfig::new(addr.to_string()).with_request_timeout(Duration::from_millis(500));
    let started = Instant::now();
    let err = within(10, Producer::connect(config, ["t"]))
        .await
        .err()
        .expect("no server");
    assert!(
        matches!(err, ConnectError::SettingsTimedOut { .. }),
        "{err:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    hold.abort();

    // Nothing listening at all: refused at once.
    let err = within(
        10,
        Producer::connect(ClientConfig::new(addr.to_string()), ["t"]),
    )
    .await
    .err()
    .expect("no server");
    assert!(matches!(err, ConnectError::Unreachable { .. }), "{err:?}");
    let err = within(10, Producer::connect(ClientConfig::new("no-port"), ["t"]))
        .await
        .err()
        .expect("bad endpoint");
    assert!(matches!(err, ConnectError::BadEndpoint { .. }), "{err:?}");
}

/// Sends one message and receives it back over `config`.
async fn round_trip(config: ClientConfig, topic: &str) {
    let producer = Producer::connect(config.clone(), [topic]).await.unwrap();
    let receipt = producer
        .send(Message::new(topic, "over tls"))
        .await
        .unwrap();
    let consumer = SimpleConsumer::connect(config, "tls-readers", [Subscription::all(topic)])
        .await
        .unwrap();
    let mut got = Vec::new();
    while got.is_empty() {
        got = consumer.receive(8, Duration::from_secs(30)).await.unwrap();
    }
    assert_eq!(got[0].message_id(), receipt.message_id);
    consumer.ack(&got[0]).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_any_certificate_and_signed_requests_work() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    topic(&server, "secure", TopicType::Normal);
    within(20, async {
        let config = client(&server)
            .with_tls(Tls::TrustAll)
            .with_namespace("")
            .with_credentials(Credentials::new("AK", "SK"));
        round_trip(config, "secure").await;
        // `https://` turns TLS on by itself.
        let https = ClientConfig::new(format!("https://{}", server.grpc_addr))
            .with_long_polling_timeout(Duration::from_secs(1));
        Producer::connect(https, ["secure"]).await.unwrap();
    })
    .await;
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_given_ca_accepts_its_certificates_only() {
    let dir = tempfile::tempdir().unwrap();
    let (ca_pem, cert_pem, key_pem) = certificates();
    let cert = dir.path().join("server.pem");
    let key = dir.path().join("server.key");
    std::fs::write(&cert, cert_pem).unwrap();
    std::fs::write(&key, key_pem).unwrap();
    let server = Server::start(BrokerConfig {
        tls_cert: Some(cert),
        tls_key: Some(key),
        ..broker_config(&dir.path().join("data"))
    })
    .await
    .unwrap();
    topic(&server, "secure", TopicType::Normal);
    within(20, async {
        round_trip(
            client(&server).with_tls(Tls::CaPem(ca_pem.into_bytes())),
            "secure",
        )
        .await;
        let (other_ca, _, _) = certificates();
        let err = Producer::connect(
            client(&server).with_tls(Tls::CaPem(other_ca.into_bytes())),
            ["secure"],
        )
        .await
        .err()
        .expect("an unknown CA is refused");
        assert!(matches!(err, ConnectError::Unreachable { .. }), "{err:?}");
        let err = Producer::connect(
            client(&server).with_tls(Tls::CaPem(b"junk".to_vec())),
            ["x"],
        )
        .await
        .err()
        .expect("no CA");
        assert!(matches!(err, ConnectError::Tls { .. }), "{err:?}");
    })
    .await;
    server.stop().await.unwrap();
}

/// A CA, and a certificate and key it signed for 127.0.0.1, in PEM.
fn certificates() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let params = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    (ca_cert.pem(), cert.pem(), key.serialize_pem())
}
