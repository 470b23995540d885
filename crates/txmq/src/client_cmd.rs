//! `txmq send` and `txmq consume`: a producer and a simple consumer for people, speaking the
//! same gRPC protocol as the official clients.

use std::time::{Duration, Instant};

use anyhow::Context;
use txmq_proto::v2::{
    AckMessageEntry, FilterExpression, FilterType, Message, MessageQueue, MessageType,
    ReceiveMessageRequest, SystemProperties,
};

use crate::bench::txmq_wire::{
    Session, duration, producer_settings, resource, simple_consumer_settings,
};
use crate::cli::{ConsumeArgs, SendArgs};

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the runtime")
}

fn timestamp(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Sends one message and prints where it went.
pub fn send(args: &SendArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let session = Session::open(&args.server, 1, producer_settings(&[&args.topic])).await?;
        let message_id = uuid::Uuid::now_v7().simple().to_string();
        let (message_type, delivery) = match (&args.group, args.delay) {
            (Some(_), Some(_)) => {
                anyhow::bail!("a message is either FIFO (--group) or delayed (--delay), not both")
            }
            (Some(_), None) => (MessageType::Fifo, None),
            (None, Some(s)) => (
                MessageType::Delay,
                Some(timestamp(now_ms() + (s as i64) * 1000)),
            ),
            (None, None) => (MessageType::Normal, None),
        };
        let message = Message {
            topic: Some(resource(&args.topic)),
            user_properties: Default::default(),
            system_properties: Some(SystemProperties {
                message_id: message_id.clone(),
                tag: args.tag.clone(),
                keys: args.keys.clone(),
                message_type: message_type as i32,
                message_group: args.group.clone(),
                delivery_timestamp: delivery,
                born_timestamp: Some(timestamp(now_ms())),
                body_encoding: txmq_proto::v2::Encoding::Identity as i32,
                ..Default::default()
            }),
            body: args.body.clone().into_bytes(),
        };
        let entry = session.send(message).await?;
        println!(
            "sent {} to {} (queue offset {})",
            entry.message_id, args.topic, entry.offset
        );
        Ok(())
    })
}

/// Receives, prints and acknowledges messages.
pub fn consume(args: &ConsumeArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let session = Session::open(
            &args.server,
            1,
            simple_consumer_settings(&args.group, &args.topic),
        )
        .await?;
        let mut received = 0u64;
        let mut last = Instant::now();
        loop {
            if args.count.is_some_and(|n| received >= n) {
                break;
            }
            if args
                .wait
                .is_some_and(|w| last.elapsed() >= Duration::from_secs(w))
            {
                break;
            }
            let batch = args.count.map_or(32, |n| (n - received).min(32)) as i32;
            let poll = args.wait.map_or(Duration::from_secs(20), |w| {
                Duration::from_secs(w)
                    .saturating_sub(last.elapsed())
                    .min(Duration::from_secs(20))
            });
            let request = ReceiveMessageRequest {
                group: Some(resource(&args.group)),
                message_queue: Some(MessageQueue {
                    topic: Some(resource(&args.topic)),
                    id: -1,
                    ..Default::default()
                }),
                filter_expression: Some(FilterExpression {
                    r#type: FilterType::Tag as i32,
                    expression: args.tags.clone(),
                }),
                batch_size: batch,
                invisible_duration: Some(duration(Duration::from_secs(30))),
                auto_renew: false,
                long_polling_timeout: Some(duration(poll)),
                attempt_id: None,
            };
            let delivered = session.receive(request).await?;
            if delivered.is_empty() {
                continue;
            }
            last = Instant::now();
            let mut acks = Vec::new();
            for d in delivered {
                let m = d.message;
                let sp = m.system_properties.unwrap_or_default();
                println!(
                    "{}\t{}\tattempt {}\ttag {}\t{}",
                    sp.message_id,
                    m.topic.map(|t| t.name).unwrap_or_default(),
                    sp.delivery_attempt.unwrap_or(1),
                    sp.tag.unwrap_or_default(),
                    String::from_utf8_lossy(&m.body)
                );
                if let Some(h) = sp.receipt_handle {
                    acks.push(AckMessageEntry {
                        message_id: sp.message_id,
                        receipt_handle: h,
                        lite_topic: None,
                    });
                }
                received += 1;
            }
            session.ack(&args.group, &args.topic, acks).await?;
        }
        eprintln!("consumed {received} message(s)");
        Ok(())
    })
}
