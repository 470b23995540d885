//! Delivery to consumer groups: where a message becomes visible to a group, where it is
//! acknowledged, and where it is dead-lettered.
//!
//! For each (group, topic, queue) the broker keeps an *ack floor* (every offset below it is
//! done) and the acknowledged offsets above it; both are rebuilt from the log, where every
//! acknowledgement is a `DeliveryState` record written before the ack is answered. What was
//! handed out but not acknowledged is kept in memory only, so after a restart every
//! unacknowledged message is delivered again and no acknowledged one is. The number of
//! deliveries is durable from the second delivery on (an `attempt` record before the
//! message goes out again); only a restart while a message is out for the first time gives
//! it one delivery more than its group's max attempts.
//!
//! A delivered message is invisible to the group until its invisible time runs out; then it
//! is delivered again with `delivery_attempt + 1`, and past the group's max attempts it is
//! moved to `%DLQ%<group>` (one record that is both the dead-lettered copy and the end of the
//! original). A FIFO group holds the next message of a message group until the current one
//! is acknowledged or dead-lettered. A delayed message waits, undelivered, until its time.

mod filter;
mod handle;
mod pending;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use filter::Filter;
pub use handle::ReceiptHandle;
use pending::{Pending, Pendings, SETTLING};
use serde::{Deserialize, Serialize};
use txmq_proto::v2::Code;
use txmq_store::{Record, RecordData, RecordKind};

use crate::broker::{Broker, detached, queue_of_group};
use crate::error::{BrokerError, BrokerResult};
use crate::message::{copy_record, prop, sys};
use crate::metadata::{Group, TopicType};
use crate::names::{DELIVERY_TOPIC, DLQ_PREFIX, REDRIVE_PREFIX, dlq_topic};

/// A message handed to a consumer.
#[derive(Debug, Clone)]
pub struct Delivered {
    /// The stored message.
    pub record: Record,
    /// Which delivery this is, from 1.
    pub attempt: u32,
    /// What the consumer acknowledges with.
    pub handle: String,
    /// How long it stays invisible, ms.
    pub invisible_ms: i64,
}

/// A receive request.
#[derive(Debug, Clone)]
pub struct ReceiveRequest {
    /// Consumer group.
    pub group: String,
    /// Topic.
    pub topic: String,
    /// One queue, or all of them.
    pub queue: Option<u32>,
    /// Which tags the group wants.
    pub filter: Filter,
    /// Most messages to return.
    pub batch: usize,
    /// Invisible time of delivered messages, ms.
    pub invisible_ms: i64,
    /// Wait this long for a message when none is ready.
    pub long_poll: Duration,
    /// Client to renew the invisible time for while it is connected (push consumers).
    pub renew_for: Option<String>,
}

/// What is kept durable per (group, topic, queue).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueProgress {
    /// Every offset below is done.
    pub ack_floor: u64,
    /// Done offsets above the floor.
    pub acked: BTreeSet<u64>,
    /// Messages dead-lettered so far.
    pub dead: u64,
    /// Deliveries made so far of messages delivered more than once and not yet done.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attempts: BTreeMap<u64, u32>,
}

#[derive(Debug, Default)]
struct QueueState {
    progress: QueueProgress,
    /// Next offset never looked at.
    next: u64,
    pending: Pendings,
}

impl QueueState {
    fn ack(&mut self, offset: u64) {
        self.pending.remove(offset);
        self.progress.attempts.remove(&offset);
        if offset < self.progress.ack_floor {
            return;
        }
        self.progress.acked.insert(offset);
        while self.progress.acked.remove(&self.progress.ack_floor) {
            self.progress.ack_floor += 1;
        }
        self.next = self.next.max(self.progress.ack_floor);
    }

    /// Records that message `offset` was delivered `n` times, unless it is done.
    fn note_attempt(&mut self, offset: u64, n: u32) {
        if offset >= self.progress.ack_floor && !self.progress.acked.contains(&offset) {
            let at = self.progress.attempts.entry(offset).or_insert(0);
            *at = (*at).max(n);
        }
    }
}

/// The body of the record saying message `offset` of a group's queue was delivered `n` times.
fn attempt_record(group: &str, topic: &str, queue: u32, offset: u64, n: u32) -> RecordData {
    let body = format!("attempt {} {n}", origin(group, topic, queue, offset));
    RecordData::new(
        RecordKind::DeliveryState,
        DELIVERY_TOPIC,
        0,
        body.into_bytes(),
    )
}

type QueueKey = (String, u32);

/// Delivery state of every group.
#[derive(Default)]
pub struct Delivery {
    groups: Mutex<HashMap<String, HashMap<QueueKey, QueueState>>>,
}

/// Group statistics for operators.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct GroupStats {
    /// Messages not yet done.
    pub lag: u64,
    /// Messages out with consumers now.
    pub in_flight: u64,
    /// Messages dead-lettered.
    pub dead_lettered: u64,
}

/// A message to move to the dead-letter topic once the lock is released.
struct DeadLetter {
    record: Record,
    attempts: u32,
    /// The epoch of its last handle: a handle it had stays expired if the move fails.
    epoch: u32,
}

/// Acknowledgements being written: the outcome of each handle so far, and the messages
/// settled for them, with the index of their handle and how they were.
struct Acks {
    outcomes: Vec<BrokerResult<()>>,
    taken: Vec<(usize, ReceiptHandle, Pending)>,
}

impl Acks {
    /// The records that store the acknowledgements of a group.
    fn records(&self, group: &str) -> Vec<RecordData> {
        self.taken
            .iter()
            .map(|(_, h, _)| {
                let body = format!("ack {}", origin(group, &h.topic, h.queue, h.offset));
                RecordData::new(
                    RecordKind::DeliveryState,
                    DELIVERY_TOPIC,
                    0,
                    body.into_bytes(),
                )
            })
            .collect()
    }
}

/// What the looks of one receive found: what goes out, when a held message becomes
/// visible, and whether new messages were left unread.
struct Found {
    delivered: Vec<Delivered>,
    wake_ms: Option<i64>,
    more: bool,
}

/// What one look at a group's queues found.
struct Collected {
    delivered: Vec<Delivered>,
    /// Past their max attempts: to move to the dead-letter topic.
    dead: Vec<DeadLetter>,
    /// When the next held message becomes visible, ms.
    wake: Option<i64>,
    /// Whether new messages were left unread for the next look.
    more: bool,
    /// The storage failure that stopped the look early.
    failure: Option<BrokerError>,
}

/// New messages a look reads per queue that cannot go out now, before it lets go of the
/// delivery lock: a backlog of delayed messages is read a part at a time.
const READ_AHEAD: usize = 1024;

/// Messages a FIFO group holds behind busy message groups in one queue before it stops
/// reading the queue's new messages (as a FIFO consumer of RocketMQ reads nothing past the
/// message it waits on, only much further).
const FIFO_LOOKAHEAD: usize = 1024;

/// Body bytes one receive returns at most, past its first message.
const RECEIVE_BYTES: usize = 64 << 20;

impl Delivery {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, HashMap<QueueKey, QueueState>>> {
        self.groups.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Durable progress of every group (for snapshots): group → "topic/queue" → progress.
    pub fn progress(&self) -> BTreeMap<String, BTreeMap<String, QueueProgress>> {
        self.lock()
            .iter()
            .map(|(g, qs)| {
                (
                    g.clone(),
                    qs.iter()
                        .map(|((t, q), s)| (format!("{t}/{q}"), s.progress.clone()))
                        .collect(),
                )
            })
            .collect()
    }

    /// Loads progress from a snapshot; nothing is in flight after a restart.
    pub fn restore(&self, saved: BTreeMap<String, BTreeMap<String, QueueProgress>>) {
        let mut groups = self.lock();
        groups.clear();
        for (g, qs) in saved {
            let map = groups.entry(g).or_default();
            for (key, progress) in qs {
                let Some((t, q)) = key.rsplit_once('/') else {
                    continue;
                };
                let Ok(q) = q.parse() else { continue };
                map.insert(
                    (t.to_string(), q),
                    QueueState {
                        next: progress.ack_floor,
                        progress,
                        pending: Pendings::default(),
                    },
                );
            }
        }
    }

    /// Applies a record read back from the log: acknowledgements and dead-lettered copies.
    pub(crate) fn apply(&self, rec: &Record) {
        enum Effect {
            Attempt(u32),
            Ack,
            DeadLettered,
        }
        let (origin, effect) =
            if rec.data.kind == RecordKind::DeliveryState && rec.data.topic == DELIVERY_TOPIC {
                let Ok(body) = std::str::from_utf8(&rec.data.body) else {
                    return;
                };
                if let Some(rest) = body.strip_prefix("attempt ") {
                    let Some((origin, n)) = rest.rsplit_once(' ') else {
                        return;
                    };
                    let Ok(n) = n.parse() else { return };
                    (origin, Effect::Attempt(n))
                } else if let Some(origin) = body.strip_prefix("ack ") {
                    (origin, Effect::Ack)
                } else {
                    return;
                }
            } else if let Some(origin) =
                sys(&rec.data, prop::DLQ_ORIGIN).filter(|_| rec.data.topic.starts_with(DLQ_PREFIX))
            {
                (origin, Effect::DeadLettered)
            } else if let Some(from) = sys(&rec.data, prop::REDRIVEN_FROM) {
                // A redriven copy: its dead-lettered message is done (a copy of an older
                // broker names no group, and its acknowledgement is a record of its own).
                (from, Effect::Ack)
            } else {
                return;
            };
        let Some((group, topic, queue, offset)) = parse_origin(origin) else {
            return;
        };
        let mut groups = self.lock();
        let q = groups
            .entry(group)
            .or_default()
            .entry((topic, queue))
            .or_default();
        match effect {
            Effect::Attempt(n) => q.note_attempt(offset, n),
            Effect::Ack => q.ack(offset),
            Effect::DeadLettered => {
                q.progress.dead += 1;
                q.ack(offset);
            }
        }
    }

    /// Statistics of a group, given each queue's end offset.
    pub fn stats(&self, group: &str, now_ms: i64, end_of: impl Fn(&str, u32) -> u64) -> GroupStats {
        let groups = self.lock();
        let mut s = GroupStats::default();
        if let Some(qs) = groups.get(group) {
            for ((t, q), st) in qs {
                let end = end_of(t, *q);
                s.lag += end
                    .saturating_sub(st.progress.ack_floor)
                    .saturating_sub(st.progress.acked.len() as u64);
                s.in_flight += st.pending.in_flight(now_ms);
                s.dead_lettered += st.progress.dead;
            }
        }
        s
    }

    /// The oldest message out with a consumer (or held back) on each queue, for retention
    /// floors. A group that stopped consuming holds nothing back: its backlog expires with
    /// the log like any other message.
    pub fn floors(&self) -> Vec<(String, u32, u64)> {
        let groups = self.lock();
        let mut out: HashMap<QueueKey, u64> = HashMap::new();
        for qs in groups.values() {
            for (k, st) in qs {
                if let Some(oldest) = st.pending.first_offset() {
                    let f = out.entry(k.clone()).or_insert(u64::MAX);
                    *f = (*f).min(oldest);
                }
            }
        }
        out.into_iter().map(|((t, q), o)| (t, q, o)).collect()
    }

    /// Extends the invisible time of messages held by connected push consumers.
    pub fn renew(&self, now_ms: i64, connected: &HashSet<String>, extend_ms: i64) {
        let mut groups = self.lock();
        for qs in groups.values_mut() {
            for st in qs.values_mut() {
                // Only messages about to become visible again; those already back are due.
                for offset in st.pending.due_before(now_ms + extend_ms / 2) {
                    let renewed = st.pending.get(offset).is_some_and(|p| {
                        p.delivered
                            && now_ms < p.renew_until
                            && p.renew_for.as_ref().is_some_and(|c| connected.contains(c))
                    });
                    if renewed {
                        st.pending
                            .update(offset, |p| p.visible_at = now_ms + extend_ms);
                    }
                }
            }
        }
    }
}

/// Parses `group topic queue offset`.
fn parse_origin(s: &str) -> Option<(String, String, u32, u64)> {
    let mut it = s.split(' ');
    let (g, t, q, o) = (it.next()?, it.next()?, it.next()?, it.next()?);
    Some((
        g.to_string(),
        t.to_string(),
        q.parse().ok()?,
        o.parse().ok()?,
    ))
}

fn origin(group: &str, topic: &str, queue: u32, offset: u64) -> String {
    format!("{group} {topic} {queue} {offset}")
}

/// How long a push consumer's message stays invisible between renewals, and for how long at
/// most it is renewed.
pub const RENEW_MS: i64 = 60_000;
const RENEW_MAX_MS: i64 = 3 * 3600 * 1000;

impl Broker {
    /// Delivers up to `req.batch` messages to a group, waiting up to `req.long_poll` for
    /// one to be ready.
    ///
    /// # Errors
    /// Unknown topic or group, or storage errors.
    ///
    /// # Cancel safety
    /// Cancel safe: messages past their max attempts are moved to the dead-letter topic in a
    /// task of its own, and messages handed out but not returned come back after their
    /// invisible duration.
    pub async fn receive(self: &Arc<Self>, req: &ReceiveRequest) -> BrokerResult<Vec<Delivered>> {
        let topic = self
            .metadata
            .topic(&req.topic)
            .ok_or_else(|| BrokerError::topic_not_found(&req.topic))?;
        let group = self.group_or_default(&req.group)?;
        if let Some(q) = req.queue
            && q >= topic.queues
        {
            return Err(BrokerError::bad_request(format!(
                "topic {} has no queue {q}",
                topic.name
            )));
        }
        let deadline = tokio::time::Instant::now() + req.long_poll;
        let arrivals = self.arrivals_of(&req.topic);
        loop {
            let notified = arrivals.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let Found {
                delivered,
                wake_ms,
                more,
            } = self.collect_ready(req, &group, topic.queues).await?;
            if !delivered.is_empty() {
                return Ok(delivered);
            }
            let now_i = tokio::time::Instant::now();
            if now_i >= deadline || self.is_closing() {
                return Ok(Vec::new());
            }
            if more {
                // New messages not read yet may be due: read on while the long poll lasts,
                // letting others in between; the next receive reads on from where this one
                // stopped.
                tokio::task::yield_now().await;
                continue;
            }
            let mut wake = deadline;
            if let Some(ms) = wake_ms {
                let at = now_i + Duration::from_millis((ms - crate::now_ms()).max(1) as u64);
                wake = wake.min(at);
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep_until(wake) => {}
                _ = self.closed() => return Ok(Vec::new()),
            }
        }
    }

    /// One look for ready messages: what is delivered, and when a held message becomes
    /// visible. Messages past their max attempts are moved to the dead-letter topic on the
    /// way, and the queues looked at again while the batch has room: a move may free a FIFO
    /// message group, and each look moves what it finds.
    async fn collect_ready(
        self: &Arc<Self>,
        req: &ReceiveRequest,
        group: &Group,
        queues: u32,
    ) -> BrokerResult<Found> {
        let mut gate = Arc::clone(&self.gate).read_owned().await;
        let mut delivered: Vec<Delivered> = Vec::new();
        let mut wake_ms: Option<i64> = None;
        let mut more = false;
        let failure = loop {
            let taken: usize = delivered.iter().map(|d| d.record.data.body.len()).sum();
            let found = self.collect(
                req,
                req.batch - delivered.len(),
                RECEIVE_BYTES.saturating_sub(taken),
                group,
                queues,
                crate::now_ms(),
            );
            delivered.extend(found.delivered);
            more |= found.more;
            wake_ms = match (wake_ms, found.wake) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let mut failure = found.failure;
            if !found.dead.is_empty() {
                // Kept in their queues as settling above: the move must finish, under the
                // gate, even if this receive is dropped.
                let moved;
                (moved, gate) = self
                    .dead_letter_detached(&req.group, found.dead, gate)
                    .await?;
                match moved {
                    Err(e) => failure = failure.or(Some(e)),
                    Ok(()) if failure.is_none() && delivered.len() < req.batch => continue,
                    Ok(()) => {}
                }
            }
            break failure;
        };
        self.record_attempts(&req.group, &delivered).await;
        drop(gate);
        match failure {
            // What was handed out goes to the consumer; the failure shows on the next look.
            Some(e) if delivered.is_empty() => Err(e),
            Some(e) => {
                tracing::warn!(group = %req.group, topic = %req.topic, error = %e, "a receive stopped early");
                Ok(Found {
                    delivered,
                    wake_ms,
                    more: false,
                })
            }
            None => Ok(Found {
                delivered,
                wake_ms,
                more,
            }),
        }
    }

    /// [`Broker::dead_letter`] in a task of its own, which holds the snapshot gate until the
    /// move is applied and then gives it back.
    async fn dead_letter_detached(
        self: &Arc<Self>,
        group: &str,
        dead: Vec<DeadLetter>,
        gate: tokio::sync::OwnedRwLockReadGuard<()>,
    ) -> BrokerResult<(BrokerResult<()>, tokio::sync::OwnedRwLockReadGuard<()>)> {
        let broker = Arc::clone(self);
        let group = group.to_string();
        detached("dead-lettering", async move {
            (broker.dead_letter(&group, dead).await, gate)
        })
        .await
    }

    /// Picks what is ready, under the delivery lock: up to `limit` deliveries and, past the
    /// first, `bytes` of bodies; the messages past their max attempts (kept in their queues
    /// as settling until they are moved); and when the next held message becomes visible.
    /// A storage failure stops the look; what it found before is returned with it, and the
    /// message it could not read stays where it was.
    ///
    /// The look costs what it finds, not what waits: ready messages and the next due ones
    /// come from [`Pendings`], and at most [`READ_AHEAD`] new messages that cannot go out
    /// now (due later, not for this group's tags, of a busy FIFO message group) are read per
    /// queue, the rest left for the next look (`more`). A FIFO group reads no new messages
    /// while [`FIFO_LOOKAHEAD`] wait behind busy message groups.
    fn collect(
        &self,
        req: &ReceiveRequest,
        limit: usize,
        bytes: usize,
        group: &Group,
        queues: u32,
        now: i64,
    ) -> Collected {
        let (max_attempts, fifo) = (group.max_attempts, group.fifo);
        let mut out = Vec::new();
        let mut taken = 0;
        let mut dead = Vec::new();
        let mut wake: Option<i64> = None;
        let mut more = false;
        let mut groups = self.delivery.lock();
        let states = groups.entry(req.group.clone()).or_default();
        let order: Vec<u32> = match req.queue {
            Some(q) => vec![q],
            None => {
                let start = self.next_round() % queues;
                (0..queues).map(|i| (start + i) % queues).collect()
            }
        };
        let mut failure = None;
        'queues: for q in order {
            if out.len() >= limit || taken >= bytes {
                break;
            }
            let Some(range) = self.store.queue_range(&req.topic, q) else {
                continue;
            };
            let st = states
                .entry((req.topic.clone(), q))
                .or_insert_with(|| QueueState {
                    progress: QueueProgress {
                        ack_floor: range.start,
                        ..Default::default()
                    },
                    next: range.start,
                    pending: Pendings::default(),
                });
            if st.progress.ack_floor < range.start {
                // Retention removed what the group never consumed.
                st.progress.ack_floor = range.start;
                st.progress.acked.retain(|&o| o >= range.start);
                st.progress.attempts.retain(|&o, _| o >= range.start);
                st.pending.drop_below(range.start);
                st.next = st.next.max(range.start);
            }
            st.pending.promote(now);
            // Held or back from a consumer, oldest first. In a FIFO group, a message group
            // with a message out (or settling, or handed out just now) waits.
            let mut cursor = None;
            while out.len() < limit && taken < bytes {
                let Some(offset) = st.pending.next_ready(cursor) else {
                    break;
                };
                cursor = Some(offset);
                let Some(p) = st.pending.get(offset) else {
                    continue;
                };
                if fifo
                    && let Some(g) = &p.message_group
                    && st.pending.is_out(g)
                {
                    continue;
                }
                let p = p.clone();
                let rec = match self.read_offset(&req.topic, q, offset) {
                    Ok(rec) => rec,
                    Err(e) => {
                        failure = Some(e);
                        break 'queues;
                    }
                };
                if p.attempt >= max_attempts {
                    st.pending.insert(offset, p.settling());
                    dead.push(DeadLetter {
                        record: rec,
                        attempts: p.attempt,
                        epoch: p.epoch,
                    });
                    continue;
                }
                taken += rec.data.body.len();
                out.push(hand_out(st, offset, rec, p, req, now, self.nonce));
            }
            // New messages.
            let mut read_ahead = 0;
            while out.len() < limit && taken < bytes && st.next < range.end {
                if read_ahead >= READ_AHEAD {
                    more = true;
                    break;
                }
                if fifo && st.pending.ready_len() >= FIFO_LOOKAHEAD {
                    // Read on when the busy message groups move (an ack wakes the look).
                    break;
                }
                let offset = st.next;
                if st.progress.acked.contains(&offset) || st.pending.contains(offset) {
                    st.next += 1;
                    continue;
                }
                let rec = match self.read_offset(&req.topic, q, offset) {
                    Ok(rec) => rec,
                    Err(e) => {
                        failure = Some(e);
                        break 'queues;
                    }
                };
                st.next += 1;
                if !req.filter.matches(&rec.data.tag) {
                    // Not for this group: done, as if consumed.
                    st.ack(offset);
                    read_ahead += 1;
                    continue;
                }
                let message_group = sys(&rec.data, prop::MESSAGE_GROUP).map(str::to_string);
                // Deliveries made before a restart still count.
                let attempt = st.progress.attempts.get(&offset).copied().unwrap_or(0);
                let held = Pending::held(0, attempt, message_group);
                if attempt >= max_attempts {
                    st.pending.insert(offset, held.settling());
                    dead.push(DeadLetter {
                        record: rec,
                        attempts: attempt,
                        epoch: 0,
                    });
                    read_ahead += 1;
                    continue;
                }
                if rec.data.kind == RecordKind::Delayed && rec.data.deliver_at > now {
                    let due = Pending {
                        visible_at: rec.data.deliver_at,
                        ..held
                    };
                    st.pending.insert(offset, due);
                    read_ahead += 1;
                    continue;
                }
                if fifo
                    && let Some(g) = &held.message_group
                    && st.pending.is_out(g)
                {
                    st.pending.insert(offset, held);
                    read_ahead += 1;
                    continue;
                }
                taken += rec.data.body.len();
                out.push(hand_out(st, offset, rec, held, req, now, self.nonce));
            }
            // Wake a long poll when the next message becomes visible (due, or back from a
            // consumer).
            if let Some(at) = st.pending.next_visible() {
                wake = Some(wake.map_or(at, |w| w.min(at)));
            }
        }
        Collected {
            delivered: out,
            dead,
            wake,
            more,
            failure,
        }
    }

    /// Makes the delivery counts of messages going out again durable before they go.
    async fn record_attempts(&self, group: &str, delivered: &[Delivered]) {
        let records: Vec<RecordData> = delivered
            .iter()
            .filter(|d| d.attempt > 1)
            .map(|d| {
                let r = &d.record;
                attempt_record(
                    group,
                    &r.data.topic,
                    r.data.queue_id,
                    r.queue_offset,
                    d.attempt,
                )
            })
            .collect();
        if records.is_empty() {
            return;
        }
        if let Err(e) = self.store.append(records).await {
            // The messages go out anyway; after a restart they would count from the last
            // recorded delivery.
            tracing::warn!(group, error = %e, "cannot record delivery attempts");
        }
    }

    fn read_offset(&self, topic: &str, queue: u32, offset: u64) -> BrokerResult<Record> {
        let mut recs = self.store.read_queue(topic, queue, offset, 1)?;
        recs.pop()
            .ok_or_else(|| BrokerError::internal(format!("{topic}/{queue}@{offset} is missing")))
    }

    /// Moves messages past their max attempts to the group's dead-letter topic. When the
    /// move fails, nothing was stored, and the messages are due again.
    async fn dead_letter(&self, group: &str, dead: Vec<DeadLetter>) -> BrokerResult<()> {
        let Err(e) = self.move_to_dead_letter(group, &dead).await else {
            return Ok(());
        };
        // Not moved: they stay due and are tried again on the next receive (unless retention
        // took one meanwhile).
        self.on_queues_of(group, &dead, |st, d| {
            let settling = st
                .pending
                .get(d.record.queue_offset)
                .is_some_and(|p| p.visible_at == SETTLING);
            if !settling {
                return;
            }
            let group = sys(&d.record.data, prop::MESSAGE_GROUP).map(str::to_string);
            st.pending.insert(
                d.record.queue_offset,
                Pending {
                    epoch: d.epoch,
                    ..Pending::held(0, d.attempts, group)
                },
            );
        });
        Err(e)
    }

    /// Runs `f` on the state of the queue of each of `dead` in `group`, under the delivery
    /// lock.
    fn on_queues_of(
        &self,
        group: &str,
        dead: &[DeadLetter],
        mut f: impl FnMut(&mut QueueState, &DeadLetter),
    ) {
        let mut groups = self.delivery.lock();
        let states = groups.entry(group.to_string()).or_default();
        for d in dead {
            let key = (d.record.data.topic.clone(), d.record.data.queue_id);
            f(states.entry(key).or_default(), d);
        }
    }

    /// Stores copies of `dead` in the group's dead-letter topic and takes them out of their
    /// queues. On an error nothing was stored, and nothing changed in memory.
    async fn move_to_dead_letter(&self, group: &str, dead: &[DeadLetter]) -> BrokerResult<()> {
        if dead.is_empty() {
            return Ok(());
        }
        let topic = dlq_topic(group);
        if self.metadata.topic(&topic).is_none() {
            self.metadata
                .create_topic(&topic, crate::metadata::TopicType::Normal, 1)?;
        }
        let records: Vec<RecordData> = dead
            .iter()
            .map(|d| {
                let r = &d.record;
                copy_record(
                    r,
                    RecordKind::Normal,
                    &topic,
                    0,
                    // Where a redriven message came from was done with when it went back.
                    &[prop::REDRIVEN_FROM],
                    &[
                        (
                            prop::DLQ_ORIGIN,
                            origin(group, &r.data.topic, r.data.queue_id, r.queue_offset),
                        ),
                        (prop::DLQ_ATTEMPTS, d.attempts.to_string()),
                    ],
                )
            })
            .collect();
        self.store.append(records).await?;
        self.on_queues_of(group, dead, |st, d| {
            st.progress.dead += 1;
            st.ack(d.record.queue_offset);
        });
        tracing::info!(
            group,
            count = dead.len(),
            "moved messages to the dead-letter topic"
        );
        self.arrived(&topic);
        // A move may free the next message of a FIFO message group.
        let sources: BTreeSet<&str> = dead.iter().map(|d| d.record.data.topic.as_str()).collect();
        for source in sources {
            self.arrived(source);
        }
        Ok(())
    }

    /// Changes the message a handle names, under the delivery lock, after checking that the
    /// handle is current: `f` gets the message as it is and returns what `with_in_flight`
    /// returns.
    fn with_in_flight<T>(
        &self,
        group: &str,
        topic: &str,
        h: &ReceiptHandle,
        f: impl FnOnce(&mut Pending) -> T,
    ) -> BrokerResult<T> {
        let bad = || {
            BrokerError::new(
                Code::InvalidReceiptHandle,
                "receipt handle is expired or was already used",
            )
        };
        if h.nonce != self.nonce || h.topic != topic {
            return Err(bad());
        }
        let mut groups = self.delivery.lock();
        let pending = groups
            .get_mut(group)
            .and_then(|g| g.get_mut(&(h.topic.clone(), h.queue)))
            .map(|st| &mut st.pending)
            .filter(|pending| {
                pending
                    .get(h.offset)
                    .is_some_and(|p| p.delivered && p.epoch == h.epoch && p.visible_at != SETTLING)
            })
            .ok_or_else(bad)?;
        pending.update(h.offset, f).ok_or_else(bad)
    }

    /// Marks the message a handle names as settling (its acknowledgement or move is being
    /// written; the handle no longer names it) and returns it as it was, for
    /// [`Broker::put_back`] if the write fails.
    fn settle(&self, group: &str, topic: &str, h: &ReceiptHandle) -> BrokerResult<Pending> {
        self.with_in_flight(group, topic, h, |p| std::mem::replace(p, p.settling()))
    }

    /// Puts back a message [`Broker::settle`] marked, as it was: its write failed.
    fn put_back(&self, group: &str, h: &ReceiptHandle, p: Pending) {
        let mut groups = self.delivery.lock();
        if let Some(pending) = groups
            .get_mut(group)
            .and_then(|g| g.get_mut(&(h.topic.clone(), h.queue)))
            .map(|st| &mut st.pending)
            .filter(|pending| {
                pending
                    .get(h.offset)
                    .is_some_and(|at| at.visible_at == SETTLING)
            })
        {
            pending.insert(h.offset, p);
        }
    }

    /// Acknowledges messages; each acknowledgement is durable before it is answered.
    /// Returns one result per handle.
    ///
    /// # Errors
    /// Per handle: `INVALID_RECEIPT_HANDLE` for a handle that is malformed, expired (the
    /// message was delivered again since) or already used.
    ///
    /// # Cancel safety
    /// Cancel safe: the acknowledgements are made in a task of their own, which finishes
    /// when the caller goes away (a client that disconnects). Cut short, an acknowledgement
    /// would leave its message neither in flight nor acknowledged in memory: the group's
    /// lag would not reach zero until a restart, and a snapshot taken meanwhile would
    /// forget the acknowledgement.
    pub async fn ack(
        self: &Arc<Self>,
        group: &str,
        topic: &str,
        handles: &[String],
    ) -> Vec<BrokerResult<()>> {
        let broker = Arc::clone(self);
        let (group, topic, owned) = (group.to_string(), topic.to_string(), handles.to_vec());
        detached("acknowledging", async move {
            broker.ack_now(&group, &topic, &owned).await
        })
        .await
        .unwrap_or_else(|e| vec![Err(e); handles.len()])
    }

    /// [`Broker::ack`], in the caller's task.
    async fn ack_now(&self, group: &str, topic: &str, handles: &[String]) -> Vec<BrokerResult<()>> {
        let _gate = self.gate.read().await;
        let acks = self.take_acks(group, topic, handles);
        if acks.taken.is_empty() {
            return acks.outcomes;
        }
        let stored = self.store.append(acks.records(group)).await;
        self.finish_acks(group, topic, acks, stored.map(drop).map_err(Into::into))
    }

    /// Settles the messages `handles` name, for their acknowledgements to be written (under
    /// the snapshot gate).
    fn take_acks(&self, group: &str, topic: &str, handles: &[String]) -> Acks {
        let mut outcomes: Vec<BrokerResult<()>> = Vec::with_capacity(handles.len());
        let mut taken = Vec::new();
        for (i, raw) in handles.iter().enumerate() {
            match ReceiptHandle::parse(raw)
                .and_then(|h| self.settle(group, topic, &h).map(|p| (h, p)))
            {
                Ok((h, p)) => {
                    taken.push((i, h, p));
                    outcomes.push(Ok(()));
                }
                Err(e) => outcomes.push(Err(e)),
            }
        }
        Acks { outcomes, taken }
    }

    /// Applies acknowledgements whose records were `stored`, or puts their messages back as
    /// they were if not: the outcome of each handle.
    fn finish_acks(
        &self,
        group: &str,
        topic: &str,
        acks: Acks,
        stored: BrokerResult<()>,
    ) -> Vec<BrokerResult<()>> {
        let Acks {
            mut outcomes,
            taken,
        } = acks;
        match stored {
            Ok(()) => {
                let mut groups = self.delivery.lock();
                let states = groups.entry(group.to_string()).or_default();
                for (_, h, _) in &taken {
                    states
                        .entry((h.topic.clone(), h.queue))
                        .or_default()
                        .ack(h.offset);
                }
                drop(groups);
                // An ack may free the next message of a FIFO message group.
                self.arrived(topic);
            }
            Err(err) => {
                for (i, h, p) in taken {
                    self.put_back(group, &h, p);
                    outcomes[i] = Err(err.clone());
                }
            }
        }
        outcomes
    }

    /// Changes how long a delivered message stays invisible (a negative acknowledgement when
    /// short). Returns the new handle; the old one is no longer valid.
    ///
    /// # Errors
    /// `INVALID_RECEIPT_HANDLE`, or `ILLEGAL_INVISIBLE_TIME` for a negative duration.
    pub fn change_invisible(
        &self,
        group: &str,
        topic: &str,
        handle: &str,
        invisible_ms: i64,
    ) -> BrokerResult<String> {
        if !(0..=12 * 3600 * 1000).contains(&invisible_ms) {
            return Err(BrokerError::new(
                Code::IllegalInvisibleTime,
                "invisible duration must be 0 to 12 hours",
            ));
        }
        let h = ReceiptHandle::parse(handle)?;
        let epoch = self.with_in_flight(group, topic, &h, |p| {
            p.epoch = p.epoch.wrapping_add(1);
            p.visible_at = crate::now_ms() + invisible_ms;
            // Renewal would undo a negative acknowledgement.
            p.renew_for = None;
            p.epoch
        })?;
        // A long poll waiting for this topic computes when to look again from the new time.
        self.arrived(topic);
        Ok(ReceiptHandle { epoch, ..h }.encode())
    }

    /// Moves a delivered message to the group's dead-letter topic now (clients do this when
    /// their own retry count runs out, e.g. FIFO push consumers).
    ///
    /// # Errors
    /// `INVALID_RECEIPT_HANDLE`, or storage errors.
    ///
    /// # Cancel safety
    /// Cancel safe, as [`Broker::ack`]: the move is made in a task of its own.
    pub async fn forward_to_dead_letter(
        self: &Arc<Self>,
        group: &str,
        topic: &str,
        handle: &str,
    ) -> BrokerResult<()> {
        let broker = Arc::clone(self);
        let (group, topic, handle) = (group.to_string(), topic.to_string(), handle.to_string());
        detached("dead-lettering", async move {
            broker.forward_now(&group, &topic, &handle).await
        })
        .await?
    }

    /// [`Broker::forward_to_dead_letter`], in the caller's task.
    async fn forward_now(&self, group: &str, topic: &str, handle: &str) -> BrokerResult<()> {
        let _gate = self.gate.read().await;
        let h = ReceiptHandle::parse(handle)?;
        let p = self.settle(group, topic, &h)?;
        let record = match self.read_offset(&h.topic, h.queue, h.offset) {
            Ok(record) => record,
            Err(e) => {
                self.put_back(group, &h, p);
                return Err(e);
            }
        };
        let dead = DeadLetter {
            record,
            attempts: p.attempt,
            epoch: p.epoch.wrapping_add(1),
        };
        let moved = self
            .move_to_dead_letter(group, std::slice::from_ref(&dead))
            .await;
        if moved.is_err() {
            // As it was: still in flight, and the same handle acknowledges it.
            self.put_back(group, &h, p);
        }
        moved
    }

    /// Copies dead-lettered messages of a group back to their topics, as new messages
    /// (same id, body and properties), and marks them done in the dead-letter topic; one
    /// that names no topic to go back to is left there. Returns how many were redriven.
    ///
    /// # Errors
    /// Unknown group, or storage errors.
    ///
    /// # Cancel safety
    /// Cancel safe: each batch is copied and marked done in a task of its own.
    pub async fn redrive(self: &Arc<Self>, group: &str, max: usize) -> BrokerResult<usize> {
        let broker = Arc::clone(self);
        let group = group.to_string();
        detached(
            "redriving",
            async move { broker.redrive_now(&group, max).await },
        )
        .await?
    }

    /// [`Broker::redrive`], in the caller's task.
    async fn redrive_now(self: &Arc<Self>, group: &str, max: usize) -> BrokerResult<usize> {
        let dlq = dlq_topic(group);
        if self.metadata.topic(&dlq).is_none() {
            return Ok(0);
        }
        let redrive_group = format!("{REDRIVE_PREFIX}{group}");
        let req = ReceiveRequest {
            group: redrive_group.clone(),
            topic: dlq.clone(),
            queue: None,
            filter: Filter::All,
            batch: max.clamp(1, 1024),
            invisible_ms: 60_000,
            long_poll: Duration::ZERO,
            renew_for: None,
        };
        let batch = self.receive(&req).await?;
        // Each copy with the handle that marks its message done.
        let mut copies = Vec::new();
        let mut handles = Vec::new();
        for d in &batch {
            let from = sys(&d.record.data, prop::DLQ_ORIGIN).and_then(parse_origin);
            let Some(t) = from.and_then(|(_, topic, _, _)| self.metadata.topic(&topic)) else {
                // Not put there by a move (e.g. sent to the dead-letter topic directly): it
                // stays, not marked done, for an operator to look at.
                tracing::warn!(group, message_id = %d.record.data.message_id,
                    "a dead-lettered message names no topic to go back to; left where it is");
                continue;
            };
            let topic = t.name.clone();
            handles.push(d.handle.clone());
            // A FIFO message goes back to its message group's queue, behind the group's
            // messages still there.
            let queue = match sys(&d.record.data, prop::MESSAGE_GROUP) {
                Some(g) if t.message_type == TopicType::Fifo => queue_of_group(g, t.queues),
                _ => d.record.queue_offset as u32 % t.queues.max(1),
            };
            copies.push(copy_record(
                &d.record,
                RecordKind::Normal,
                &topic,
                queue,
                &[prop::DLQ_ORIGIN, prop::DLQ_ATTEMPTS],
                &[(
                    prop::REDRIVEN_FROM,
                    origin(
                        &redrive_group,
                        &dlq,
                        d.record.data.queue_id,
                        d.record.queue_offset,
                    ),
                )],
            ));
        }
        if copies.is_empty() {
            return Ok(0);
        }
        // Each copy is also the mark that its message was redriven (`REDRIVEN_FROM`, read
        // back as its acknowledgement): a crash or a failed write keeps both or neither, so
        // no message goes back twice.
        let _gate = self.gate.read().await;
        let acks = self.take_acks(&redrive_group, &dlq, &handles);
        let copies: Vec<RecordData> = copies
            .into_iter()
            .zip(&acks.outcomes)
            .filter(|(_, taken)| taken.is_ok())
            .map(|(copy, _)| copy)
            .collect();
        let n = copies.len();
        let topics: BTreeSet<String> = copies.iter().map(|c| c.topic.clone()).collect();
        let stored = if n == 0 {
            Ok(())
        } else {
            self.store
                .append(copies)
                .await
                .map(drop)
                .map_err(Into::into)
        };
        let failed = stored.as_ref().err().cloned();
        let outcomes = self.finish_acks(&redrive_group, &dlq, acks, stored);
        if let Some(e) = failed {
            return Err(e);
        }
        for e in outcomes.iter().filter_map(|o| o.as_ref().err()) {
            // Delivered to the redrive again meanwhile: it goes back with a later redrive.
            tracing::warn!(group, error = %e, "a dead-lettered message was not redriven");
        }
        for t in topics {
            self.arrived(&t);
        }
        Ok(n)
    }

    /// Delivery statistics of a group.
    pub fn group_stats(&self, group: &str) -> GroupStats {
        self.delivery.stats(group, crate::now_ms(), |t, q| {
            self.store.queue_range(t, q).map_or(0, |r| r.end)
        })
    }
}

fn hand_out(
    st: &mut QueueState,
    offset: u64,
    rec: Record,
    mut p: Pending,
    req: &ReceiveRequest,
    now: i64,
    nonce: u32,
) -> Delivered {
    p.attempt += 1;
    p.epoch = p.epoch.wrapping_add(1);
    p.delivered = true;
    p.visible_at = now + req.invisible_ms;
    // Renewed for this receive's client only, if it asked: never for an earlier one.
    p.renew_for = req.renew_for.clone();
    p.renew_until = if p.renew_for.is_some() {
        now + RENEW_MAX_MS
    } else {
        0
    };
    let handle = ReceiptHandle {
        nonce,
        queue: rec.data.queue_id,
        offset,
        epoch: p.epoch,
        topic: rec.data.topic.clone(),
    };
    let attempt = p.attempt;
    if attempt > 1 {
        st.progress.attempts.insert(offset, attempt);
    }
    st.pending.insert(offset, p);
    Delivered {
        record: rec,
        attempt,
        handle: handle.encode(),
        invisible_ms: req.invisible_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(renew_for: Option<&str>, invisible_ms: i64) -> ReceiveRequest {
        ReceiveRequest {
            group: "g".into(),
            topic: "t".into(),
            queue: None,
            filter: Filter::All,
            batch: 1,
            invisible_ms,
            long_poll: Duration::ZERO,
            renew_for: renew_for.map(str::to_string),
        }
    }

    #[test]
    fn a_message_delivered_again_is_renewed_only_for_the_client_that_received_it() {
        let record = Record {
            position: 0,
            queue_offset: 0,
            store_timestamp: 0,
            data: RecordData::new(RecordKind::Normal, "t", 0, b"x".to_vec()),
        };
        let new = Pending::held(0, 0, None);
        let mut st = QueueState::default();
        // A push consumer receives it, and loses its stream: its invisible time runs out.
        hand_out(
            &mut st,
            0,
            record.clone(),
            new,
            &request(Some("push-a"), 30_000),
            1_000,
            1,
        );
        let out = st.pending.get(0).cloned().expect("handed out");
        assert_eq!(out.renew_for.as_deref(), Some("push-a"));
        // A simple consumer receives it; then the push consumer connects again.
        let now = 100_000;
        hand_out(&mut st, 0, record, out, &request(None, 5_000), now, 1);
        let delivery = Delivery::default();
        delivery
            .lock()
            .entry("g".into())
            .or_default()
            .insert(("t".into(), 0), st);
        let connected = HashSet::from(["push-a".to_string()]);
        delivery.renew(now + 4_000, &connected, 30_000);
        let groups = delivery.lock();
        let p = groups["g"][&("t".to_string(), 0)]
            .pending
            .get(0)
            .expect("still out");
        assert_eq!(
            p.visible_at,
            now + 5_000,
            "back after the simple consumer's invisible time, not kept out by the push consumer"
        );
        assert_eq!((p.renew_for.as_deref(), p.renew_until), (None, 0));
    }

    fn broker(dir: &std::path::Path) -> Arc<Broker> {
        Broker::open(crate::BrokerConfig {
            data_dir: dir.to_path_buf(),
            segment_size: 8 << 20,
            durability: "async".into(),
            ..Default::default()
        })
        .expect("open broker")
    }

    fn message(
        topic: &str,
        id: &str,
        message_group: Option<&str>,
        due: Option<i64>,
    ) -> crate::message::NewMessage {
        use crate::message::SendType;
        crate::message::NewMessage {
            topic: topic.into(),
            message_id: id.into(),
            tag: None,
            keys: Vec::new(),
            send_type: match (message_group, due) {
                (Some(_), _) => SendType::Fifo,
                (None, Some(_)) => SendType::Delay,
                (None, None) => SendType::Normal,
            },
            message_group: message_group.map(str::to_string),
            delivery_timestamp: due,
            orphaned_recovery_ms: None,
            user_properties: Vec::new(),
            body: id.as_bytes().to_vec(),
            gzip: false,
            born_timestamp: crate::now_ms(),
            born_host: "test".into(),
            trace_context: None,
        }
    }

    async fn send_all(b: &Arc<Broker>, messages: Vec<crate::message::NewMessage>) {
        let mut messages = messages.into_iter().peekable();
        while messages.peek().is_some() {
            b.send(messages.by_ref().take(128).collect())
                .await
                .expect("send");
        }
    }

    /// Messages of a group's queue the broker keeps in memory (out, held or due later).
    fn held(b: &Broker, group: &str, topic: &str) -> usize {
        b.delivery.lock()[group][&(topic.to_string(), 0)]
            .pending
            .len()
    }

    fn ids(got: &[Delivered]) -> Vec<String> {
        got.iter()
            .map(|d| d.record.data.message_id.clone())
            .collect()
    }

    #[tokio::test]
    async fn a_backlog_of_later_messages_is_read_a_part_at_a_time_and_the_one_due_still_goes_out() {
        let dir = tempfile::tempdir().unwrap();
        let b = broker(dir.path());
        b.metadata()
            .create_topic("later", TopicType::Delay, 1)
            .unwrap();
        let in_an_hour = crate::now_ms() + 3_600_000;
        let backlog = READ_AHEAD * 5 / 2;
        send_all(
            &b,
            (0..backlog)
                .map(|i| message("later", &format!("l{i}"), None, Some(in_an_hour)))
                .collect(),
        )
        .await;
        let soon = crate::now_ms() + 300;
        send_all(&b, vec![message("later", "soon", None, Some(soon))]).await;
        let req = ReceiveRequest {
            topic: "later".into(),
            ..request(None, 30_000)
        };
        // A receive that may not wait makes one look, which reads one part.
        assert!(b.receive(&req).await.unwrap().is_empty());
        assert_eq!(held(&b, "g", "later"), READ_AHEAD, "one part read per look");
        // A long poll reads on, and gets the message due at its time.
        let got = b
            .receive(&ReceiveRequest {
                long_poll: Duration::from_secs(10),
                batch: 32,
                ..req.clone()
            })
            .await
            .unwrap();
        assert_eq!(ids(&got), ["soon"]);
        assert!(crate::now_ms() >= soon);
        assert_eq!(
            held(&b, "g", "later"),
            backlog + 1,
            "the rest waits for its time"
        );
        assert!(b.receive(&req).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_fifo_group_reads_no_further_than_its_lookahead_behind_a_busy_message_group() {
        let dir = tempfile::tempdir().unwrap();
        let b = broker(dir.path());
        b.metadata().create_topic("f", TopicType::Fifo, 1).unwrap();
        b.metadata().put_group("g", 16, true, Vec::new()).unwrap();
        let behind = FIFO_LOOKAHEAD + 100;
        let mut messages: Vec<_> = (0..behind)
            .map(|i| message("f", &format!("a{i}"), Some("a"), None))
            .collect();
        messages.push(message("f", "b", Some("b"), None));
        send_all(&b, messages).await;
        let req = ReceiveRequest {
            topic: "f".into(),
            batch: 32,
            ..request(None, 30_000)
        };
        let first = b.receive(&req).await.unwrap();
        assert_eq!(ids(&first), ["a0"]);
        assert_eq!(
            held(&b, "g", "f"),
            FIFO_LOOKAHEAD + 1,
            "the message out and the look-ahead behind it, no more"
        );
        assert!(b.receive(&req).await.unwrap().is_empty());
        // As the busy message group moves, the queue is read on, in order.
        let mut seen = ids(&first);
        let mut handles = vec![first[0].handle.clone()];
        while seen.len() < behind + 1 {
            for acked in b.ack("g", "f", &handles).await {
                acked.unwrap();
            }
            let got = b.receive(&req).await.unwrap();
            assert!(!got.is_empty(), "stuck after {} messages", seen.len());
            handles = got.iter().map(|d| d.handle.clone()).collect();
            seen.extend(ids(&got));
            assert!(held(&b, "g", "f") <= FIFO_LOOKAHEAD + 2);
        }
        let a: Vec<String> = seen
            .iter()
            .filter(|id| id.starts_with('a'))
            .cloned()
            .collect();
        let expected: Vec<String> = (0..behind).map(|i| format!("a{i}")).collect();
        assert_eq!(a, expected);
        assert!(seen.contains(&"b".to_string()));
    }

    #[tokio::test]
    async fn a_receive_returns_about_its_byte_budget_of_bodies() {
        let dir = tempfile::tempdir().unwrap();
        let b = broker(dir.path());
        let big = (4 << 20) - 1024;
        let expected = RECEIVE_BYTES.div_ceil(big);
        let count = expected + 4;
        for i in 0..count {
            let mut m = message("t", &format!("m{i}"), None, None);
            m.body = vec![b'x'; big];
            b.send(vec![m]).await.expect("send");
        }
        let req = ReceiveRequest {
            batch: 1024,
            ..request(None, 30_000)
        };
        let got = b.receive(&req).await.unwrap();
        assert_eq!(got.len(), expected, "stops once the budget is taken");
        let rest = b.receive(&req).await.unwrap();
        assert_eq!(rest.len(), 4);
    }
}
