//! `txmq send` and `txmq consume`: a producer and a simple consumer for people, through
//! `txmq-client`, the same protocol the official clients speak.

use std::time::{Duration, Instant};

use anyhow::Context;
use txmq_client::{ClientConfig, Message, Producer, SimpleConsumer, Subscription};

use crate::cli::{ConsumeArgs, SendArgs};

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the runtime")
}

/// Sends one message and prints where it went.
pub fn send(args: &SendArgs) -> anyhow::Result<()> {
    if args.group.is_some() && args.delay.is_some() {
        anyhow::bail!("a message is either FIFO (--group) or delayed (--delay), not both");
    }
    runtime()?.block_on(async {
        let producer = Producer::connect(ClientConfig::new(&args.server), [args.topic.as_str()])
            .await
            .with_context(|| format!("cannot connect to {}", args.server))?;
        let mut message =
            Message::new(&args.topic, args.body.clone().into_bytes()).with_keys(args.keys.clone());
        if let Some(tag) = &args.tag {
            message = message.with_tag(tag);
        }
        if let Some(group) = &args.group {
            message = message.with_message_group(group);
        }
        if let Some(seconds) = args.delay {
            message = message.with_delay(Duration::from_secs(seconds));
        }
        let receipt = producer.send(message).await?;
        println!(
            "sent {} to {} (queue offset {})",
            receipt.message_id, args.topic, receipt.offset
        );
        producer.shutdown().await;
        Ok(())
    })
}

/// Receives, prints and acknowledges messages.
pub fn consume(args: &ConsumeArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let mut config = ClientConfig::new(&args.server);
        if let Some(w) = args.wait {
            config = config.with_long_polling_timeout(Duration::from_secs(w.clamp(1, 20)));
        }
        let subscription = Subscription::new(&args.topic, &args.tags);
        let consumer = SimpleConsumer::connect(config, &args.group, [subscription])
            .await
            .with_context(|| format!("cannot connect to {}", args.server))?;
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
            let batch = args.count.map_or(32, |n| (n - received).min(32)) as u32;
            let messages = consumer.receive(batch, Duration::from_secs(30)).await?;
            if messages.is_empty() {
                continue;
            }
            last = Instant::now();
            for m in messages {
                println!(
                    "{}\t{}\tattempt {}\ttag {}\t{}",
                    m.message_id(),
                    m.topic(),
                    m.delivery_attempt(),
                    m.tag().unwrap_or_default(),
                    String::from_utf8_lossy(m.body())
                );
                consumer.ack(&m).await?;
                received += 1;
            }
        }
        eprintln!("consumed {received} message(s)");
        consumer.shutdown().await;
        Ok(())
    })
}
