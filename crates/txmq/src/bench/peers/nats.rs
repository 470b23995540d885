//! NATS JetStream: publishes with a `Nats-Msg-Id` to a file-storage stream, each awaited
//! until its PubAck. The NATS server acknowledges after writing, not after an fsync (see
//! [`NATS_DURABILITY`]).

use std::sync::Arc;

use anyhow::{Context, anyhow};
use async_nats::jetstream::{self, message::PublishMessage, stream};
use bytes::Bytes;

use super::{ADMIN_TIMEOUT, CONNECT_TIMEOUT, flat, unique_name};
use crate::bench::produce::{NATS_DURABILITY, Publisher, TargetReport, Workload, drive};

/// Publishes to one stream over a few connections.
struct Nats {
    contexts: Vec<jetstream::Context>,
    subject: async_nats::Subject,
    stream: String,
    body: Bytes,
}

impl Publisher for Nats {
    async fn publish(&self, task: u64, _n: u64) -> Result<(), String> {
        let js = &self.contexts[task as usize % self.contexts.len()];
        let id = uuid::Uuid::now_v7().simple().to_string();
        let ack = js
            .send_publish(
                self.subject.clone(),
                PublishMessage::build()
                    .payload(self.body.clone())
                    .message_id(id),
            )
            .await
            .map_err(|e| format!("publish: {e}"))?
            .await
            .map_err(|e| format!("PubAck: {e}"))?;
        if ack.stream != self.stream {
            return Err(format!("acknowledged by stream {:?}", ack.stream));
        }
        if ack.duplicate {
            return Err("the server took a fresh message id for a duplicate".to_string());
        }
        Ok(())
    }
}

/// Runs the workload against the NATS server at `url` and deletes its stream afterwards.
///
/// # Errors
/// If NATS cannot be reached or the stream cannot be created; failed publishes and a failed
/// deletion are reported in the result instead.
pub async fn run(url: &str, w: &Workload) -> anyhow::Result<TargetReport> {
    let shown = txmq_outbox::sink::redact_url(url, true);
    let mut clients = Vec::new();
    for _ in 0..w.connections.max(1) {
        let client = tokio::time::timeout(
            CONNECT_TIMEOUT,
            async_nats::ConnectOptions::new()
                .name("txmq bench produce")
                .connection_timeout(CONNECT_TIMEOUT)
                .connect(url),
        )
        .await
        .map_err(|_| anyhow!("no answer within {CONNECT_TIMEOUT:?}"))
        .and_then(|c| c.map_err(flat))
        .with_context(|| format!("cannot connect to NATS at {shown}"))?;
        clients.push(client);
    }
    let version = clients[0].server_info().version;
    let contexts: Vec<_> = clients.iter().map(|c| jetstream::new(c.clone())).collect();
    let name = unique_name();
    let subject = name.replace('-', ".");
    tokio::time::timeout(
        ADMIN_TIMEOUT,
        contexts[0].create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![subject.clone()],
            storage: stream::StorageType::File,
            ..Default::default()
        }),
    )
    .await
    .map_err(|_| anyhow!("no answer within {ADMIN_TIMEOUT:?}"))
    .and_then(|r| r.map_err(flat))
    .with_context(|| format!("cannot create JetStream stream {name} on NATS at {shown}"))?;

    // From here on the stream exists: delete it whatever happens to the run.
    let publisher = Arc::new(Nats {
        contexts: contexts.clone(),
        subject: subject.into(),
        stream: name.clone(),
        body: Bytes::from(w.body.as_ref().clone()),
    });
    let measured = drive(publisher, w).await;
    let stored = tokio::time::timeout(ADMIN_TIMEOUT, async {
        let stream = contexts[0].get_stream(&name).await.ok()?;
        stream.get_info().await.ok().map(|i| i.state.messages)
    })
    .await
    .ok()
    .flatten();
    let deleted = tokio::time::timeout(ADMIN_TIMEOUT, contexts[0].delete_stream(&name)).await;
    for c in &clients {
        let _ = tokio::time::timeout(ADMIN_TIMEOUT, c.flush()).await;
    }
    let measured = measured.with_context(|| format!("NATS at {shown}"))?;
    let mut report = measured.report(
        "nats",
        shown,
        format!("file-storage stream {name}"),
        w,
        NATS_DURABILITY,
    );
    report.server_version = Some(version);
    report.stored = stored;
    match deleted {
        Ok(Ok(status)) if status.success => report.deleted = Some(true),
        Ok(Ok(_)) => {
            report.deleted = Some(false);
            report
                .first_error
                .get_or_insert("stream delete: the server answered success: false".to_string());
        }
        Ok(Err(e)) => {
            report.deleted = Some(false);
            report
                .first_error
                .get_or_insert(format!("stream delete: {e}"));
        }
        Err(_) => {
            report.deleted = Some(false);
            report
                .first_error
                .get_or_insert(format!("stream delete: no answer within {ADMIN_TIMEOUT:?}"));
        }
    }
    Ok(report)
}
