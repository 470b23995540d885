//! The Telemetry stream: client settings in, settings and check-backs out.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::mpsc;
use txmq_proto::v2::{
    ClientType, CustomizedBackoff, ExponentialBackoff, RetryPolicy, Settings, TelemetryCommand,
    retry_policy, settings::PubSub, telemetry_command,
};

use super::convert::{duration, error_status, ok};
use crate::broker::Broker;
use crate::sessions::{ClientKind, Session};

/// Retry ladder of unordered consumption: 10 s, 30 s, 1 min, 2 min ... 10 min, 20 min,
/// 30 min, 1 h, 2 h.
const LADDER_MS: [i64; 16] = [
    10_000, 30_000, 60_000, 120_000, 180_000, 240_000, 300_000, 360_000, 420_000, 480_000, 540_000,
    600_000, 1_200_000, 1_800_000, 3_600_000, 7_200_000,
];
/// Retry interval of FIFO consumption.
const FIFO_RETRY_MS: i64 = 3_000;

impl Broker {
    /// The settings the broker answers a client's settings with.
    pub(crate) fn merged_settings(
        &self,
        mut s: Settings,
    ) -> Result<Settings, crate::error::BrokerError> {
        match s.pub_sub.as_mut() {
            Some(PubSub::Publishing(p)) => {
                p.max_body_size = self.config.max_body_size as i32;
                p.validate_message_type = true;
                s.backoff_policy = Some(RetryPolicy {
                    max_attempts: 3,
                    strategy: Some(retry_policy::Strategy::ExponentialBackoff(
                        ExponentialBackoff {
                            initial: Some(duration(10)),
                            max: Some(duration(1_000)),
                            multiplier: 2.0,
                        },
                    )),
                });
            }
            Some(PubSub::Subscription(sub)) => {
                let name = sub
                    .group
                    .as_ref()
                    .map(|g| g.name.clone())
                    .unwrap_or_default();
                let group = self.group_or_default(&name)?;
                sub.fifo = Some(group.fifo);
                sub.receive_batch_size = Some(32);
                sub.long_polling_timeout = Some(duration(20_000));
                let ladder: Vec<i64> = if group.fifo {
                    vec![FIFO_RETRY_MS]
                } else if group.backoff_ms.is_empty() {
                    LADDER_MS.to_vec()
                } else {
                    group.backoff_ms.iter().map(|&ms| ms as i64).collect()
                };
                s.backoff_policy = Some(RetryPolicy {
                    max_attempts: group.max_attempts.min(i32::MAX as u32) as i32,
                    strategy: Some(retry_policy::Strategy::CustomizedBackoff(
                        CustomizedBackoff {
                            next: ladder.into_iter().map(duration).collect(),
                        },
                    )),
                });
            }
            None => {}
        }
        s.request_timeout = s.request_timeout.or(Some(duration(3_000)));
        Ok(s)
    }

    /// Serves one Telemetry stream until the client closes it.
    pub(crate) fn telemetry_session(
        self: &Arc<Self>,
        client_id: String,
        mut inbound: tonic::Streaming<TelemetryCommand>,
    ) -> mpsc::Receiver<Result<TelemetryCommand, tonic::Status>> {
        let (tx, rx) = mpsc::channel(256);
        let broker = self.clone();
        tokio::spawn(async move {
            let id = broker.sessions.next_id();
            loop {
                let next = tokio::select! {
                    next = inbound.next() => next,
                    _ = broker.closed() => break,
                };
                let Some(Ok(cmd)) = next else { break };
                let Some(telemetry_command::Command::Settings(settings)) = cmd.command else {
                    // Thread stack traces and message verification results need no answer.
                    continue;
                };
                let reply = match broker.merged_settings(settings.clone()) {
                    Ok(merged) => {
                        broker
                            .sessions
                            .register(session(id, &client_id, &settings, tx.clone()));
                        TelemetryCommand {
                            status: Some(ok()),
                            command: Some(telemetry_command::Command::Settings(merged)),
                        }
                    }
                    Err(e) => TelemetryCommand {
                        status: Some(error_status(&e)),
                        command: None,
                    },
                };
                if tx
                    .send_timeout(Ok(reply), Duration::from_secs(3))
                    .await
                    .is_err()
                {
                    break;
                }
            }
            broker.sessions.remove(id);
            tracing::debug!(client = %client_id, "telemetry stream closed");
        });
        rx
    }
}

fn session(
    id: u64,
    client_id: &str,
    s: &Settings,
    outbox: mpsc::Sender<Result<TelemetryCommand, tonic::Status>>,
) -> Session {
    let kind =
        match ClientType::try_from(s.client_type.unwrap_or(0)).unwrap_or(ClientType::Unspecified) {
            ClientType::Producer => ClientKind::Producer,
            ClientType::PushConsumer => ClientKind::PushConsumer,
            ClientType::SimpleConsumer => ClientKind::SimpleConsumer,
            _ => ClientKind::Other,
        };
    let (topics, group) = match &s.pub_sub {
        Some(PubSub::Publishing(p)) => (p.topics.iter().map(|t| t.name.clone()).collect(), None),
        Some(PubSub::Subscription(sub)) => (Vec::new(), sub.group.as_ref().map(|g| g.name.clone())),
        None => (Vec::new(), None),
    };
    Session {
        id,
        client_id: client_id.to_string(),
        kind,
        topics,
        group,
        outbox,
    }
}
