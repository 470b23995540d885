//! Check-back: asking a live producer about a transaction left open.
//!
//! A prepared transaction is checked once its timeout passes (the message's own orphaned
//! transaction recovery duration, or the broker's default of 6 s), then again with a doubling
//! interval. A check is sent as `RecoverOrphanedTransactionCommand` on the Telemetry stream
//! of a connected producer that declared the topic; the producer answers with
//! `EndTransaction`. Only checks actually sent count, each recorded in the log; when none
//! is connected the check waits. Once the maximum was sent and the next is due, the
//! transaction is declared unresolved and waits for an operator.
//!
//! A producer is sent a few checks at a time ([`BrokerConfig::transaction_checks_per_producer`]):
//! a check stays open from when it is sent until its transaction is decided or the check's
//! interval passes (a producer answers nothing while it does not know). The checks due
//! beyond that wait, uncounted, for an open one to close, oldest due first. So a backlog
//! (after an outage, say) reaches a producer no faster than it answers, and a transaction
//! spends its checks only on checks its producer had room for.
//!
//! [`BrokerConfig::transaction_checks_per_producer`]: crate::BrokerConfig::transaction_checks_per_producer

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;
use txmq_proto::v2::{RecoverOrphanedTransactionCommand, TelemetryCommand, telemetry_command};

use super::{Tx, TxState};
use crate::broker::Broker;
use crate::error::BrokerResult;
use crate::grpc::convert;
use crate::sessions::Session;

/// How often due transactions are looked for.
const TICK: Duration = Duration::from_millis(250);
/// When no producer is connected, look again after this long.
const NO_PRODUCER_RETRY_MS: i64 = 1_000;

/// Check-backs sent and not closed yet, and the signal that one closed early.
#[derive(Default)]
pub struct OpenChecks {
    /// By transaction id: the Telemetry stream the check went to, and until when it stays
    /// open unless its transaction is decided first, ms.
    open: Mutex<HashMap<String, (u64, i64)>>,
    /// Notified when a decision closes an open check: room for another.
    closed: Notify,
}

impl OpenChecks {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (u64, i64)>> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Forgets the checks whose time passed, and counts the others by stream.
    fn by_stream(&self, now_ms: i64) -> HashMap<u64, usize> {
        let mut open = self.lock();
        open.retain(|_, &mut (_, until)| until > now_ms);
        let mut counts = HashMap::new();
        for &(stream, _) in open.values() {
            *counts.entry(stream).or_insert(0) += 1;
        }
        counts
    }

    fn opened(&self, id: &str, stream: u64, until_ms: i64) {
        self.lock().insert(id.to_string(), (stream, until_ms));
    }

    /// Closes the check of transaction `id`, if one is open: it was decided.
    pub(crate) fn decided(&self, id: &str) {
        if self.lock().remove(id).is_some() {
            self.closed.notify_one();
        }
    }
}

/// Due transactions waiting for room to be checked, by topic, oldest due first.
type Waiting = HashMap<String, VecDeque<Tx>>;

impl Broker {
    /// Runs check-backs until `stop` fires.
    pub async fn run_check_backs(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut rotate = 0usize;
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut waiting = Waiting::new();
        loop {
            let mut unresolved = Vec::new();
            tokio::select! {
                _ = tick.tick() => {
                    let mut found = self.transactions.due(crate::now_ms());
                    found.sort_by_key(|tx| tx.next_check_ms);
                    waiting.clear();
                    for tx in found {
                        // Past the maximum: declared unresolved, which needs no producer.
                        if tx.checks >= self.config.transaction_check_max {
                            unresolved.push(tx.id);
                        } else {
                            waiting.entry(tx.topic.clone()).or_default().push_back(tx);
                        }
                    }
                }
                // Room for a check that waits: it need not wait for the next tick.
                _ = self.open_checks.closed.notified() => {}
                _ = stop.changed() => return,
            }
            if !waiting.is_empty() || !unresolved.is_empty() {
                self.check_due(&mut waiting, unresolved, &mut rotate).await;
            }
        }
    }

    /// Sends the checks of `waiting` that producers have room for and records them, and
    /// declares `unresolved` unresolved. Leaves in `waiting` the transactions whose
    /// producers had no room.
    async fn check_due(
        &self,
        waiting: &mut Waiting,
        mut unresolved: Vec<String>,
        rotate: &mut usize,
    ) {
        let now = crate::now_ms();
        let limit = self.config.transaction_checks_per_producer as usize;
        let mut open = self.open_checks.by_stream(now);
        let _gate = self.gate.read().await;
        let mut sent = Vec::new();
        // Topics by their oldest waiting transaction: one check at a time goes to the topic
        // whose turn is oldest, so topics that share producers share their room by age.
        let mut turns: BinaryHeap<Reverse<(i64, String)>> = waiting
            .iter()
            .filter_map(|(topic, txs)| Some(Reverse((txs.front()?.next_check_ms, topic.clone()))))
            .collect();
        let mut producers: HashMap<String, Vec<Arc<Session>>> = HashMap::new();
        let mut turn = 0usize;
        while let Some(Reverse((_, topic))) = turns.pop() {
            let Some(txs) = waiting.get_mut(&topic) else {
                continue;
            };
            let of_topic = producers.entry(topic.clone()).or_insert_with(|| {
                *rotate = rotate.wrapping_add(1);
                self.sessions.producers_of(&topic, *rotate)
            });
            if of_topic.is_empty() {
                for tx in txs.drain(..) {
                    self.retry_later(&tx.id, now);
                }
                continue;
            }
            let with_room: Vec<_> = of_topic
                .iter()
                .filter(|p| open.get(&p.id).copied().unwrap_or(0) < limit)
                .collect();
            if with_room.is_empty() {
                // Its turn ends for this pass; the others may still have room.
                continue;
            }
            let Some(tx) = txs.pop_front() else { continue };
            if let Some(next) = txs.front() {
                turns.push(Reverse((next.next_check_ms, topic.clone())));
            }
            // Decided, checked or put back since it was found due: looked at as it is now.
            let Some(tx) = self
                .transactions
                .get(&tx.id)
                .filter(|t| t.state == TxState::Prepared && t.next_check_ms <= now)
            else {
                continue;
            };
            if tx.checks >= self.config.transaction_check_max {
                unresolved.push(tx.id);
                continue;
            }
            let command = match self.check_command(&tx) {
                Ok(command) => command,
                Err(e) => {
                    tracing::warn!(transaction = %tx.id, error = %e, "check-back failed");
                    self.retry_later(&tx.id, now);
                    continue;
                }
            };
            // The producers with room take turns.
            turn = turn.wrapping_add(1);
            let n = with_room.len();
            let Some(p) = (0..n)
                .map(|i| with_room[(turn + i) % n])
                .find(|p| p.outbox.try_send(Ok(command.clone())).is_ok())
            else {
                // Every producer's stream was full or closing: nothing was sent, nothing
                // counts.
                self.retry_later(&tx.id, now);
                continue;
            };
            tracing::debug!(transaction = %tx.id, client = %p.client_id, check = tx.checks + 1, "check-back sent");
            *open.entry(p.id).or_insert(0) += 1;
            let until = now + self.check_interval_ms(tx.checks + 1);
            self.open_checks.opened(&tx.id, p.id, until);
            sent.push(tx.id);
        }
        waiting.retain(|_, txs| !txs.is_empty());
        if let Err(e) = self.record_checks(&sent).await {
            tracing::warn!(checks = sent.len(), error = %e, "check-backs sent but not recorded");
        }
        for id in unresolved {
            if let Err(e) = self.mark_unresolved(&id).await {
                tracing::warn!(transaction = %id, error = %e, "declaring a transaction unresolved failed");
            }
        }
    }

    /// The command that asks a producer about `tx`.
    fn check_command(&self, tx: &Tx) -> BrokerResult<TelemetryCommand> {
        let half = self.store.read(tx.half_position)?;
        let message = convert::message_from_half(&half, tx);
        Ok(TelemetryCommand {
            status: None,
            command: Some(
                telemetry_command::Command::RecoverOrphanedTransactionCommand(
                    RecoverOrphanedTransactionCommand {
                        message: Some(message),
                        transaction_id: tx.id.clone(),
                    },
                ),
            ),
        })
    }

    /// Looks at transaction `id` again a little later; nothing was sent.
    fn retry_later(&self, id: &str, now: i64) {
        self.transactions
            .update(id, |t| t.next_check_ms = now + NO_PRODUCER_RETRY_MS);
    }
}
