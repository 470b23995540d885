//! Check-back: asking a live producer about a transaction left open.
//!
//! A prepared transaction is checked once its timeout passes (the message's own orphaned
//! transaction recovery duration, or the broker's default of 6 s), then again with a doubling
//! interval. A check is sent as `RecoverOrphanedTransactionCommand` on the Telemetry stream
//! of a connected producer that declared the topic; the producer answers with
//! `EndTransaction`. Only checks actually sent count, each recorded in the log; when none
//! is connected the check waits. Once the maximum was sent and the next is due, the
//! transaction is declared unresolved and waits for an operator.

use std::sync::Arc;
use std::time::Duration;

use txmq_proto::v2::{RecoverOrphanedTransactionCommand, TelemetryCommand, telemetry_command};

use super::Tx;
use crate::broker::Broker;
use crate::grpc::convert;

/// How often due transactions are looked for.
const TICK: Duration = Duration::from_millis(250);
/// When no producer is connected, look again after this long.
const NO_PRODUCER_RETRY_MS: i64 = 1_000;

impl Broker {
    /// Runs check-backs until `stop` fires.
    pub async fn run_check_backs(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut rotate = 0usize;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(TICK) => {}
                _ = stop.changed() => return,
            }
            for tx in self.transactions.due(crate::now_ms()) {
                rotate = rotate.wrapping_add(1);
                if let Err(e) = self.check_one(&tx, rotate).await {
                    tracing::warn!(transaction = %tx.id, error = %e, "check-back failed");
                }
            }
        }
    }

    async fn check_one(&self, tx: &Tx, rotate: usize) -> crate::error::BrokerResult<()> {
        let _gate = self.gate.read().await;
        if tx.checks >= self.config.transaction_check_max {
            return self.mark_unresolved(&tx.id).await;
        }
        let producers = self.sessions.producers_of(&tx.topic, rotate);
        if producers.is_empty() {
            self.transactions.update(&tx.id, |t| {
                t.next_check_ms = crate::now_ms() + NO_PRODUCER_RETRY_MS
            });
            return Ok(());
        }
        let half = self.store.read(tx.half_position)?;
        let message = convert::message_from_half(&half, tx);
        let command = TelemetryCommand {
            status: None,
            command: Some(
                telemetry_command::Command::RecoverOrphanedTransactionCommand(
                    RecoverOrphanedTransactionCommand {
                        message: Some(message),
                        transaction_id: tx.id.clone(),
                    },
                ),
            ),
        };
        for p in producers {
            if p.outbox.try_send(Ok(command.clone())).is_ok() {
                tracing::debug!(transaction = %tx.id, client = %p.client_id, check = tx.checks + 1, "check-back sent");
                return self.record_check(&tx.id).await;
            }
        }
        // Every producer's stream was full or closing: nothing was sent, nothing counts.
        self.transactions.update(&tx.id, |t| {
            t.next_check_ms = crate::now_ms() + NO_PRODUCER_RETRY_MS
        });
        Ok(())
    }
}
