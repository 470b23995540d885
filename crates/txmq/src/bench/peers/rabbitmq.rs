//! RabbitMQ: persistent messages (delivery mode 2) to a durable classic queue through the
//! default exchange, on channels in publisher-confirm mode, one channel per task.

use std::sync::Arc;

use anyhow::{Context, anyhow};
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};

use super::{ADMIN_TIMEOUT, CONNECT_TIMEOUT, flat, unique_name};
use crate::bench::produce::{Publisher, RABBITMQ_DURABILITY, TargetReport, Workload, drive};

/// AMQP delivery mode of a persistent message.
const PERSISTENT: u8 = 2;

/// Publishes to one queue, each task on its own confirm-mode channel.
struct Rabbit {
    channels: Vec<Channel>,
    queue: ShortString,
    body: Arc<Vec<u8>>,
}

impl Publisher for Rabbit {
    async fn publish(&self, task: u64, _n: u64) -> Result<(), String> {
        let channel = &self.channels[task as usize % self.channels.len()];
        let confirm = channel
            .basic_publish(
                ShortString::from(""),
                self.queue.clone(),
                BasicPublishOptions::default(),
                &self.body,
                BasicProperties::default().with_delivery_mode(PERSISTENT),
            )
            .await
            .map_err(|e| format!("basic.publish: {e}"))?;
        match confirm.await.map_err(|e| format!("confirm: {e}"))? {
            Confirmation::Ack(_) => Ok(()),
            Confirmation::Nack(_) => Err("the broker nacked the message".to_string()),
            Confirmation::NotRequested => Err("confirms are not enabled".to_string()),
        }
    }
}

/// Runs the workload against the RabbitMQ at `url` and deletes its queue afterwards.
///
/// # Errors
/// If RabbitMQ cannot be reached or the queue cannot be declared; failed publishes and a
/// failed deletion are reported in the result instead.
pub async fn run(url: &str, w: &Workload) -> anyhow::Result<TargetReport> {
    let shown = txmq_outbox::sink::redact_url(url, false);
    let mut connections = Vec::new();
    for _ in 0..w.connections.max(1) {
        let connection = tokio::time::timeout(
            CONNECT_TIMEOUT,
            Connection::connect(url, ConnectionProperties::default()),
        )
        .await
        .map_err(|_| anyhow!("no answer within {CONNECT_TIMEOUT:?}"))
        .and_then(|c| c.map_err(flat))
        .with_context(|| format!("cannot connect to RabbitMQ at {shown}"))?;
        connections.push(connection);
    }
    let admin = connections[0]
        .create_channel()
        .await
        .with_context(|| format!("cannot open a channel to RabbitMQ at {shown}"))?;
    let queue = unique_name();
    tokio::time::timeout(
        ADMIN_TIMEOUT,
        admin.queue_declare(
            ShortString::from(queue.as_str()),
            QueueDeclareOptions::durable(),
            FieldTable::default(),
        ),
    )
    .await
    .map_err(|_| anyhow!("no answer within {ADMIN_TIMEOUT:?}"))
    .and_then(|r| r.map_err(flat))
    .with_context(|| format!("cannot declare queue {queue} on RabbitMQ at {shown}"))?;

    // From here on the queue exists: delete it whatever happens to the run.
    let measured = async {
        let mut channels = Vec::new();
        for task in 0..w.concurrency {
            let channel = connections[task as usize % connections.len()]
                .create_channel()
                .await
                .context("cannot open a channel")?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .context("cannot enable publisher confirms")?;
            channels.push(channel);
        }
        let publisher = Arc::new(Rabbit {
            channels,
            queue: ShortString::from(queue.as_str()),
            body: w.body.clone(),
        });
        drive(publisher, w).await
    }
    .await;
    let deleted = tokio::time::timeout(
        ADMIN_TIMEOUT,
        admin.queue_delete(
            ShortString::from(queue.as_str()),
            QueueDeleteOptions::default(),
        ),
    )
    .await;
    for c in &connections {
        let _ = tokio::time::timeout(ADMIN_TIMEOUT, c.close(200, ShortString::from("bench done")))
            .await;
    }
    let measured = measured.with_context(|| format!("RabbitMQ at {shown}"))?;
    let mut report = measured.report(
        "rabbitmq",
        shown,
        format!("durable classic queue {queue}"),
        w,
        RABBITMQ_DURABILITY,
    );
    match deleted {
        Ok(Ok(stored)) => {
            report.stored = Some(u64::from(stored));
            report.deleted = Some(true);
        }
        Ok(Err(e)) => {
            report.deleted = Some(false);
            report
                .first_error
                .get_or_insert(format!("queue.delete: {e}"));
        }
        Err(_) => {
            report.deleted = Some(false);
            report
                .first_error
                .get_or_insert(format!("queue.delete: no answer within {ADMIN_TIMEOUT:?}"));
        }
    }
    Ok(report)
}
