//! Push consumer against a real broker: retries with the group's backoff, FIFO order,
//! bounded concurrency, graceful shutdown.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{
    assert_all_acked, client, fill, group, serve, start, stored_in_few_writes, topic, within,
};
use tonic::{Request, Response, Status};
use txmq_broker::grpc::Messaging;
use txmq_broker::metadata::TopicType;
use txmq_client::{ClientConfig, Message, Producer, PushConsumer, SimpleConsumer, Subscription};
use txmq_proto::v2::{self as pb, messaging_service_server::MessagingService};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_handler_gets_the_message_again_after_the_group_backoff() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    topic(&server, "invoices", TopicType::Normal);
    group(&server, "billing", 5, false, vec![200]);
    within(20, async {
        let producer = Producer::connect(client(&server), ["invoices"])
            .await
            .unwrap();
        let seen: Arc<Mutex<Vec<(u32, Instant)>>> = Arc::default();
        let s = seen.clone();
        let consumer = PushConsumer::builder(client(&server), "billing")
            .subscribe(Subscription::all("invoices"))
            .start(move |m| {
                let s = s.clone();
                async move {
                    s.lock()
                        .unwrap()
                        .push((m.delivery_attempt(), Instant::now()));
                    if m.delivery_attempt() == 1 {
                        Err("the first attempt fails")
                    } else {
                        Ok(())
                    }
                }
            })
            .await
            .unwrap();
        assert!(!consumer.is_fifo());
        producer
            .send(Message::new("invoices", "invoice 1"))
            .await
            .unwrap();
        while seen.lock().unwrap().len() < 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Acknowledged on the second attempt: no third delivery.
        tokio::time::sleep(Duration::from_millis(600)).await;
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert_eq!((seen[0].0, seen[1].0), (1, 2));
        let gap = seen[1].1 - seen[0].1;
        assert!(
            gap >= Duration::from_millis(180),
            "redelivered after {gap:?}"
        );
        assert!(gap < Duration::from_secs(5), "redelivered after {gap:?}");
        consumer.shutdown().await;
    })
    .await;
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifo_groups_are_handled_in_order_by_a_push_consumer() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    topic(&server, "accounts", TopicType::Fifo);
    group(&server, "ledger", 5, true, vec![]);
    within(30, async {
        let producer = Producer::connect(client(&server), ["accounts"])
            .await
            .unwrap();
        for seq in 0..8 {
            for account in ["a", "b", "c"] {
                producer
                    .send(Message::new("accounts", format!("{seq}")).with_message_group(account))
                    .await
                    .unwrap();
            }
        }
        // Per message group: (sequence number, delivery attempt), in handling order.
        type Seen = HashMap<String, Vec<(u32, u32)>>;
        let seen: Arc<Mutex<Seen>> = Arc::default();
        let s = seen.clone();
        let consumer = PushConsumer::builder(client(&server), "ledger")
            .subscribe(Subscription::all("accounts"))
            .start(move |m| {
                let s = s.clone();
                async move {
                    let seq: u32 = String::from_utf8_lossy(m.body()).parse().unwrap();
                    let group = m.message_group().unwrap().to_string();
                    s.lock()
                        .unwrap()
                        .entry(group.clone())
                        .or_default()
                        .push((seq, m.delivery_attempt()));
                    // One failure in group "a": retried in place, before seq 3.
                    if group == "a" && seq == 2 && m.delivery_attempt() == 1 {
                        return Err("transient failure");
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    Ok(())
                }
            })
            .await
            .unwrap();
        assert!(consumer.is_fifo());
        loop {
            let done = seen
                .lock()
                .unwrap()
                .values()
                .map(|v| v.iter().filter(|(_, a)| *a == 1).count())
                .sum::<usize>();
            let retried = seen.lock().unwrap().get("a").is_some_and(|v| v.len() == 9);
            if done == 24 && retried {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        consumer.shutdown().await;
        let seen = seen.lock().unwrap().clone();
        let in_order: Vec<(u32, u32)> = (0..8).map(|s| (s, 1)).collect();
        assert_eq!(seen["b"], in_order);
        assert_eq!(seen["c"], in_order);
        let mut a = in_order.clone();
        a.insert(3, (2, 2));
        assert_eq!(seen["a"], a);
    })
    .await;
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handlers_run_with_bounded_concurrency_and_shutdown_waits_for_them() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    topic(&server, "emails", TopicType::Normal);
    group(&server, "mailer", 5, false, vec![]);
    within(30, async {
        let producer = Producer::connect(client(&server), ["emails"])
            .await
            .unwrap();
        let batch = (0..20)
            .map(|i| Message::new("emails", format!("mail {i}")))
            .collect();
        producer.send_batch(batch).await.unwrap();
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let done: Arc<Mutex<Vec<String>>> = Arc::default();
        let (r, m, d) = (running.clone(), most.clone(), done.clone());
        let consumer = PushConsumer::builder(client(&server), "mailer")
            .subscribe(Subscription::all("emails"))
            .max_concurrency(4)
            .start(move |msg| {
                let (r, m, d) = (r.clone(), m.clone(), d.clone());
                async move {
                    let now = r.fetch_add(1, Ordering::SeqCst) + 1;
                    m.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    r.fetch_sub(1, Ordering::SeqCst);
                    d.lock().unwrap().push(msg.message_id().to_string());
                    Ok::<(), String>(())
                }
            })
            .await
            .unwrap();
        while done.lock().unwrap().len() < 18 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Shutdown waits for the handlers under way and their acks.
        consumer.shutdown().await;
        assert_eq!(running.load(Ordering::SeqCst), 0);
        let handled = done.lock().unwrap().clone();
        assert!(
            most.load(Ordering::SeqCst) <= 4,
            "{} at once",
            most.load(Ordering::SeqCst)
        );
        assert!(most.load(Ordering::SeqCst) >= 2);
        // What was handled was acknowledged: it does not come again.
        let rest =
            SimpleConsumer::connect(client(&server), "mailer", [Subscription::all("emails")])
                .await
                .unwrap();
        loop {
            let got = rest.receive(32, Duration::from_secs(30)).await.unwrap();
            if got.is_empty() {
                break;
            }
            assert!(
                got.iter()
                    .all(|m| !handled.iter().any(|h| h == m.message_id()))
            );
        }
    })
    .await;
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledgements_that_wait_share_calls() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    topic(&server, "parcels", TopicType::Normal);
    group(&server, "depot", 5, false, vec![]);
    within(60, async {
        const N: usize = 200;
        fill(&server, "parcels", N).await;
        let handled = Arc::new(AtomicUsize::new(0));
        let h = handled.clone();
        // One ack is one record (a first delivery writes none). Acks one call each make 50
        // to 100 group commits here (the store joins some of them); joined ones, about 20.
        stored_in_few_writes(&server, N, N / 6, "acknowledgements", async {
            // One ack call in flight at a time: the acks of the other handlers wait for it.
            let consumer = PushConsumer::builder(common::joining_client(&server), "depot")
                .subscribe(Subscription::all("parcels"))
                .max_concurrency(32)
                .start(move |_| {
                    let h = h.clone();
                    async move {
                        h.fetch_add(1, Ordering::SeqCst);
                        Ok::<(), String>(())
                    }
                })
                .await
                .unwrap();
            while handled.load(Ordering::SeqCst) < N {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            // Shutting down waits for the handlers and their acks.
            consumer.shutdown().await;
        })
        .await;
        assert_all_acked(&server, "depot");
    })
    .await;
    server.stop().await.unwrap();
}

/// The broker's service, answering every receive with up to twice the messages asked for.
#[derive(Clone)]
struct Generous(Messaging);

/// Implements `MessagingService` for `Generous`: `receive_message` as given, every other
/// call passed on unchanged.
macro_rules! generous {
    ($receive:item; $($call:ident($request:ty) -> $response:ty;)*) => {
        #[tonic::async_trait]
        impl MessagingService for Generous {
            type ReceiveMessageStream = <Messaging as MessagingService>::ReceiveMessageStream;
            type PullMessageStream = <Messaging as MessagingService>::PullMessageStream;
            type TelemetryStream = <Messaging as MessagingService>::TelemetryStream;

            $receive

            $(async fn $call(&self, request: Request<$request>) -> Result<Response<$response>, Status> {
                self.0.$call(request).await
            })*
        }
    };
}

generous! {
    async fn receive_message(
        &self,
        mut request: Request<pb::ReceiveMessageRequest>,
    ) -> Result<Response<Self::ReceiveMessageStream>, Status> {
        request.get_mut().batch_size *= 2;
        self.0.receive_message(request).await
    };
    query_route(pb::QueryRouteRequest) -> pb::QueryRouteResponse;
    heartbeat(pb::HeartbeatRequest) -> pb::HeartbeatResponse;
    send_message(pb::SendMessageRequest) -> pb::SendMessageResponse;
    query_assignment(pb::QueryAssignmentRequest) -> pb::QueryAssignmentResponse;
    ack_message(pb::AckMessageRequest) -> pb::AckMessageResponse;
    forward_message_to_dead_letter_queue(pb::ForwardMessageToDeadLetterQueueRequest)
        -> pb::ForwardMessageToDeadLetterQueueResponse;
    pull_message(pb::PullMessageRequest) -> Self::PullMessageStream;
    update_offset(pb::UpdateOffsetRequest) -> pb::UpdateOffsetResponse;
    get_offset(pb::GetOffsetRequest) -> pb::GetOffsetResponse;
    query_offset(pb::QueryOffsetRequest) -> pb::QueryOffsetResponse;
    end_transaction(pb::EndTransactionRequest) -> pb::EndTransactionResponse;
    telemetry(tonic::Streaming<pb::TelemetryCommand>) -> Self::TelemetryStream;
    notify_client_termination(pb::NotifyClientTerminationRequest)
        -> pb::NotifyClientTerminationResponse;
    change_invisible_duration(pb::ChangeInvisibleDurationRequest)
        -> pb::ChangeInvisibleDurationResponse;
    recall_message(pb::RecallMessageRequest) -> pb::RecallMessageResponse;
    sync_lite_subscription(pb::SyncLiteSubscriptionRequest) -> pb::SyncLiteSubscriptionResponse;
}

/// A server may answer a receive with more messages than asked for: each extra one is
/// handled too, within the consumer's concurrency, not dropped (where the server would
/// keep renewing it for as long as the consumer lives).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_past_the_batch_asked_for_are_handled_too() {
    let dir = tempfile::tempdir().unwrap();
    let (addr, broker, shutdown) = serve(dir.path(), |broker, addr| {
        tonic::service::Routes::new(pb::messaging_service_server::MessagingServiceServer::new(
            Generous(Messaging::new(broker, addr)),
        ))
    })
    .await;
    broker
        .metadata()
        .create_topic("parcels", TopicType::Normal, 1)
        .unwrap();
    within(30, async {
        let config =
            ClientConfig::new(addr.to_string()).with_long_polling_timeout(Duration::from_secs(1));
        let producer = Producer::connect(config.clone(), ["parcels"])
            .await
            .unwrap();
        let batch = (0..20)
            .map(|i| Message::new("parcels", format!("parcel {i}")))
            .collect();
        producer.send_batch(batch).await.unwrap();
        let handled: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
        let (running, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (h, r, m) = (handled.clone(), running.clone(), most.clone());
        let consumer = PushConsumer::builder(config, "couriers")
            .subscribe(Subscription::all("parcels"))
            .max_concurrency(2)
            .start(move |msg| {
                let (h, r, m) = (h.clone(), r.clone(), m.clone());
                async move {
                    m.fetch_max(r.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    r.fetch_sub(1, Ordering::SeqCst);
                    *h.lock()
                        .unwrap()
                        .entry(String::from_utf8_lossy(msg.body()).into_owned())
                        .or_insert(0) += 1;
                    Ok::<(), String>(())
                }
            })
            .await
            .unwrap();
        while handled.lock().unwrap().len() < 20 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        consumer.shutdown().await;
        assert!(handled.lock().unwrap().values().all(|&n| n == 1));
        assert!(most.load(Ordering::SeqCst) <= 2);
    })
    .await;
    shutdown().await;
}
