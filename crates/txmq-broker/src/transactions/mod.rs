//! Transactional messages: where a transaction is resolved.
//!
//! One entry per transaction id, rebuilt from the log: a half message (kind `Half`, in
//! [`TX_TOPIC`]) opens it; a message carrying its `transaction_id` in a user topic commits
//! it; a `TxResolution` record rolls it back or declares it unresolved; each `TxCheck`
//! record counts one check-back actually sent. A resolution is durable before it is
//! answered, and resolving twice the same way is answered without writing again, so a
//! repeated commit delivers once.

pub mod check_back;

use std::collections::{BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use txmq_proto::v2::Code;
use txmq_store::{Appended, Record, RecordData, RecordKind};

use crate::broker::{Broker, detached};
use crate::error::{BrokerError, BrokerResult};
use crate::message::{copy_record, prop, sys};
use crate::names::{SYSTEM_PREFIX, TX_TOPIC};

/// Where a transaction stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TxState {
    /// Half message stored; waiting for the producer's decision.
    Prepared,
    /// Committed: the message was delivered to its topic.
    Committed,
    /// Rolled back: the message is never delivered.
    RolledBack,
    /// No decision after the last check-back; waits for an operator.
    Unresolved,
}

/// One transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tx {
    /// Transaction id.
    pub id: String,
    /// The message id the producer gave.
    pub message_id: String,
    /// Topic the message is for.
    pub topic: String,
    /// Queue the message goes to.
    pub queue: u32,
    /// Log position of the half message.
    pub half_position: u64,
    /// When the half message was stored, ms.
    pub created_ms: i64,
    /// When the next check-back is due, ms.
    pub next_check_ms: i64,
    /// Check-backs actually sent to a producer.
    pub checks: u32,
    /// Where it stands.
    pub state: TxState,
    /// When it was committed, rolled back or declared unresolved, ms.
    pub resolved_ms: Option<i64>,
    /// Log position of the record that committed, rolled back or declared it unresolved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved_at: Option<u64>,
}

/// What a producer or operator decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    /// Deliver the message.
    Commit,
    /// Never deliver it.
    Rollback,
}

#[derive(Clone)]
struct Entry {
    tx: Tx,
    /// Set while a resolution is being written; others wait on it.
    busy: Option<Arc<Notify>>,
}

/// The transaction table. A persistent map, so that a snapshot copies it in constant time
/// while every other request waits.
#[derive(Default)]
pub struct Transactions {
    table: Mutex<Table>,
}

/// The transactions by id, and the two orders the broker walks them in. The table holds
/// the decisions of the last minutes too (up to 200,000): walking all of it for the few
/// check-backs due, or for the few decisions old enough to forget, took tens of
/// milliseconds under the lock that every half message and decision takes.
#[derive(Default)]
struct Table {
    txs: imbl::HashMap<String, Entry>,
    order: Order,
}

/// Where transactions stand in time; filed by [`Order::file`] on every change.
#[derive(Default)]
struct Order {
    /// `(check-back time, id)`: one pair per prepared transaction, replaced whenever its
    /// check-back time changes and removed when it stops being prepared. A pair that does
    /// not match its transaction when its time comes (a change not filed) is dropped, or
    /// filed again at the right time.
    checks: BTreeSet<(i64, String)>,
    /// `(decision time, id)` of committed and rolled-back transactions, in the order they
    /// were decided: the oldest are forgotten first.
    decided: VecDeque<(i64, String)>,
}

fn is_decided(state: TxState) -> bool {
    matches!(state, TxState::Committed | TxState::RolledBack)
}

impl Order {
    /// Files `tx` after a change from state `was` (`None`: new to the table).
    fn file(&mut self, tx: &Tx, was: Option<TxState>) {
        if tx.state == TxState::Prepared {
            self.checks.insert((tx.next_check_ms, tx.id.clone()));
        }
        if is_decided(tx.state) && !was.is_some_and(is_decided) {
            self.decided
                .push_back((tx.resolved_ms.unwrap_or(0), tx.id.clone()));
        }
    }
}

impl Table {
    /// Applies `f` to the entry of `id`, if any, and files the transaction's change.
    fn change<R>(&mut self, id: &str, f: impl FnOnce(&mut Entry) -> R) -> Option<R> {
        let e = self.txs.get_mut(id)?;
        let was = (e.tx.state, e.tx.next_check_ms);
        let r = f(e);
        if (e.tx.state, e.tx.next_check_ms) != was {
            // Its old pair goes at once: most transactions are decided long before their
            // first check-back, which may be hours away.
            if was.0 == TxState::Prepared {
                self.order.checks.remove(&(was.1, id.to_string()));
            }
            self.order.file(&e.tx, Some(was.0));
        }
        Some(r)
    }
}

/// A copy of the transaction table at one moment, taken in constant time.
pub struct TxTableCopy(imbl::HashMap<String, Entry>);

impl TxTableCopy {
    /// Splits the copy into the transactions still open (prepared or unresolved) and the
    /// decisions (committed, rolled back) stored by records at or after log position `from`;
    /// decisions stored before it are left out. A decision of unknown position (loaded from
    /// an older snapshot) counts as stored at 0.
    ///
    /// Borrowed, not taken: the copy shares its entries with the live table, and taking
    /// them would clone every one of them (the whole table, up to `KEEP_RESOLVED_MAX`
    /// decisions), where the snapshot only reads them.
    pub fn split(&self, from: u64) -> (Vec<&Tx>, Vec<&Tx>) {
        let mut open = Vec::new();
        let mut decided = Vec::new();
        for e in self.0.values() {
            match e.tx.state {
                TxState::Prepared | TxState::Unresolved => open.push(&e.tx),
                TxState::Committed | TxState::RolledBack => {
                    if e.tx.resolved_at.unwrap_or(0) >= from {
                        decided.push(&e.tx);
                    }
                }
            }
        }
        (open, decided)
    }
}

/// Decisions [`Transactions::prune`] forgets in one hold of the table's lock (about a
/// millisecond), and its pause between two holds.
const PRUNE_BATCH: usize = 1024;
const PRUNE_PAUSE: std::time::Duration = std::time::Duration::from_millis(1);

/// Resolution records' bodies.
const ROLLBACK: &[u8] = b"rollback";
const UNRESOLVED: &[u8] = b"unresolved";
const RECHECK: &[u8] = b"recheck";

impl Transactions {
    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A transaction by id.
    pub fn get(&self, id: &str) -> Option<Tx> {
        self.lock().txs.get(id).map(|e| e.tx.clone())
    }

    /// Transactions in the given states, oldest first.
    pub fn list(&self, states: &[TxState]) -> Vec<Tx> {
        let mut out: Vec<Tx> = self
            .lock()
            .txs
            .values()
            .filter(|e| states.contains(&e.tx.state))
            .map(|e| e.tx.clone())
            .collect();
        out.sort_by_key(|t| t.half_position);
        out
    }

    /// The whole table as it is now, in constant time (for snapshots).
    pub fn copy(&self) -> TxTableCopy {
        TxTableCopy(self.lock().txs.clone())
    }

    /// Replaces the table (loading a snapshot).
    pub fn restore(&self, mut txs: Vec<Tx>) {
        // Decisions filed oldest first.
        txs.sort_by_key(|tx| tx.resolved_ms);
        let mut order = Order::default();
        for tx in &txs {
            order.file(tx, None);
        }
        let txs = txs
            .into_iter()
            .map(|tx| (tx.id.clone(), Entry { tx, busy: None }))
            .collect();
        *self.lock() = Table { txs, order };
    }

    /// Forgets committed and rolled-back transactions resolved before `before_ms`, and the
    /// oldest of them beyond `max_resolved`. Open and unresolved ones are always kept.
    /// Blocks the thread for a while: not for a runtime worker.
    pub fn prune(&self, before_ms: i64, max_resolved: usize) {
        // Oldest decisions first: the walk stops at the first one to keep. At most
        // `PRUNE_BATCH` at a time under the lock: after a restart, or at thousands of
        // transactions a second, tens of thousands may go at once.
        loop {
            let mut t = self.lock();
            let Table { txs, order } = &mut *t;
            for _ in 0..PRUNE_BATCH {
                let Some((at, _)) = order.decided.front() else {
                    return;
                };
                if *at >= before_ms && order.decided.len() <= max_resolved {
                    return;
                }
                let Some((_, id)) = order.decided.pop_front() else {
                    return;
                };
                if txs.get(&id).is_some_and(|e| is_decided(e.tx.state)) {
                    txs.remove(&id);
                }
            }
            // A mutex is no queue: relocked at once, it would go on being this walk's, and
            // every half message and decision would wait for the whole of it (tens of
            // milliseconds). A pause lets those waiting go first.
            drop(t);
            std::thread::sleep(PRUNE_PAUSE);
        }
    }

    /// Prepared transactions whose check-back is due. One stays due, and is found again by
    /// the next call, until its check is recorded or it is decided.
    pub fn due(&self, now_ms: i64) -> Vec<Tx> {
        let mut t = self.lock();
        let Table { txs, order } = &mut *t;
        let mut due = Vec::new();
        let mut stale = Vec::new();
        let mut moved = Vec::new();
        for (at, id) in order
            .checks
            .range(..(now_ms.saturating_add(1), String::new()))
        {
            match txs.get(id) {
                Some(e) if e.tx.state == TxState::Prepared && e.tx.next_check_ms == *at => {
                    if e.busy.is_none() {
                        due.push(e.tx.clone());
                    }
                }
                Some(e) if e.tx.state == TxState::Prepared => {
                    stale.push((*at, id.clone()));
                    moved.push((e.tx.next_check_ms, id.clone()));
                }
                _ => stale.push((*at, id.clone())),
            }
        }
        for pair in &stale {
            order.checks.remove(pair);
        }
        order.checks.extend(moved);
        due
    }

    pub(crate) fn update(&self, id: &str, f: impl FnOnce(&mut Tx)) {
        self.lock().change(id, |e| f(&mut e.tx));
    }

    /// Applies a record read back from the log (replay) or just written.
    pub(crate) fn apply(
        &self,
        rec: &Record,
        first_check_ms: impl Fn(&Record) -> i64,
        interval_ms: impl Fn(u32) -> i64,
    ) {
        let mut t = self.lock();
        match rec.data.kind {
            RecordKind::Half if rec.data.topic == TX_TOPIC => {
                let Some(id) = sys(&rec.data, prop::TRANSACTION_ID) else {
                    return;
                };
                let tx = Tx {
                    id: id.to_string(),
                    message_id: rec.data.message_id.clone(),
                    topic: sys(&rec.data, prop::REAL_TOPIC)
                        .unwrap_or_default()
                        .to_string(),
                    queue: sys(&rec.data, prop::REAL_QUEUE)
                        .and_then(|q| q.parse().ok())
                        .unwrap_or(0),
                    half_position: rec.position,
                    created_ms: rec.store_timestamp,
                    next_check_ms: first_check_ms(rec),
                    checks: 0,
                    state: TxState::Prepared,
                    resolved_ms: None,
                    resolved_at: None,
                };
                if !t.txs.contains_key(&tx.id) {
                    t.order.file(&tx, None);
                    t.txs.insert(tx.id.clone(), Entry { tx, busy: None });
                }
            }
            RecordKind::TxResolution | RecordKind::TxCheck if rec.data.topic == TX_TOPIC => {
                t.change(&rec.data.message_id, |e| {
                    let tx = &mut e.tx;
                    // A record stored after its transaction was decided changes nothing: the
                    // broker stores none, and a log written before it did is read the same way.
                    let open = matches!(tx.state, TxState::Prepared | TxState::Unresolved);
                    if !open {
                        return;
                    }
                    if rec.data.kind == RecordKind::TxCheck {
                        tx.checks += 1;
                        tx.next_check_ms = rec.store_timestamp + interval_ms(tx.checks);
                        return;
                    }
                    match rec.data.body.as_slice() {
                        ROLLBACK => {
                            tx.state = TxState::RolledBack;
                            tx.resolved_ms = Some(rec.store_timestamp);
                            tx.resolved_at = Some(rec.position);
                        }
                        UNRESOLVED if tx.state == TxState::Prepared => {
                            tx.state = TxState::Unresolved;
                            tx.resolved_ms = Some(rec.store_timestamp);
                            tx.resolved_at = Some(rec.position);
                        }
                        RECHECK => {
                            tx.state = TxState::Prepared;
                            tx.checks = 0;
                            tx.resolved_ms = None;
                            tx.resolved_at = None;
                            tx.next_check_ms = rec.store_timestamp;
                        }
                        _ => {}
                    }
                });
            }
            _ => {
                // A commit is the first copy of the half message in a user topic; later
                // copies (dead-lettered, redriven) carry the transaction id too.
                if rec.data.topic.starts_with(SYSTEM_PREFIX) {
                    return;
                }
                let Some(id) = sys(&rec.data, prop::TRANSACTION_ID) else {
                    return;
                };
                t.change(id, |e| {
                    if matches!(e.tx.state, TxState::Prepared | TxState::Unresolved) {
                        e.tx.state = TxState::Committed;
                        e.tx.resolved_ms = Some(rec.store_timestamp);
                        e.tx.resolved_at = Some(rec.position);
                    }
                });
            }
        }
    }
}

/// A record of [`TX_TOPIC`] about transaction `id`.
fn tx_record(kind: RecordKind, id: &str, body: &[u8]) -> RecordData {
    let mut r = RecordData::new(kind, TX_TOPIC, 0, body.to_vec());
    r.message_id = id.to_string();
    r
}

/// One decision asked for: commit or roll back transaction `id`, named with its topic and
/// message id (either may be empty: not checked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct End {
    /// The topic the producer names; empty: not checked.
    pub topic: String,
    /// The message id the producer names; empty: not checked.
    pub message_id: String,
    /// The transaction id.
    pub id: String,
    /// What to do.
    pub resolution: Resolution,
}

/// What a decision asked for finds in the table.
enum Claim {
    /// This caller writes the decision; the entry is marked busy until it is written.
    Mine,
    /// Answered without writing: already decided the same way, or refused.
    Answered(BrokerResult<TxState>),
    /// Another decision of this transaction is being written: wait for it, then look again.
    Wait(Arc<Notify>),
}

fn decided(resolution: Resolution) -> TxState {
    match resolution {
        Resolution::Commit => TxState::Committed,
        Resolution::Rollback => TxState::RolledBack,
    }
}

impl Transactions {
    /// Looks at transaction `end.id` for `end`, and marks it busy when the decision is this
    /// caller's to write.
    fn claim(&self, end: &End) -> Claim {
        let id = &end.id;
        let mut table = self.lock();
        let Some(entry) = table.txs.get_mut(id) else {
            return Claim::Answered(Err(BrokerError::new(
                Code::InvalidTransactionId,
                format!("unknown transaction {id}"),
            )));
        };
        if (!end.topic.is_empty() && entry.tx.topic != end.topic)
            || (!end.message_id.is_empty() && entry.tx.message_id != end.message_id)
        {
            return Claim::Answered(Err(BrokerError::new(
                Code::InvalidTransactionId,
                format!(
                    "transaction {id} belongs to message {} of topic {}",
                    entry.tx.message_id, entry.tx.topic
                ),
            )));
        }
        let refused = |message: String| {
            Claim::Answered(Err(BrokerError::new(Code::PreconditionFailed, message)))
        };
        match (entry.tx.state, end.resolution) {
            (TxState::Committed, Resolution::Commit)
            | (TxState::RolledBack, Resolution::Rollback) => {
                return Claim::Answered(Ok(entry.tx.state));
            }
            (TxState::Committed, Resolution::Rollback) => {
                return refused(format!("transaction {id} is already committed"));
            }
            (TxState::RolledBack, Resolution::Commit) => {
                return refused(format!("transaction {id} was rolled back"));
            }
            _ => {}
        }
        match &entry.busy {
            Some(n) => Claim::Wait(n.clone()),
            None => {
                entry.busy = Some(Arc::new(Notify::new()));
                Claim::Mine
            }
        }
    }

    /// Clears the busy mark of `id` and wakes those waiting on it; with `at`, where the
    /// record that stored its decision went, the decision is applied.
    fn release(&self, id: &str, resolution: Resolution, at: Option<&Appended>) {
        self.finish(id, |tx| {
            if let Some(at) = at {
                tx.state = decided(resolution);
                tx.resolved_ms = Some(at.store_timestamp);
                tx.resolved_at = Some(at.position);
            }
        });
    }

    /// Marks transaction `id` busy for a change of an open transaction other than a
    /// decision (declaring it unresolved, checking it again), if it is in one of `states`
    /// and no decision or other change of it is being written: the change is stored and
    /// applied before any decision that comes meanwhile, in the log's order. `Mine` when
    /// marked; refused (`Answered`) when unknown or in another state.
    fn claim_open(&self, id: &str, states: &[TxState]) -> Claim {
        let mut table = self.lock();
        let Some(entry) = table.txs.get_mut(id) else {
            return Claim::Answered(Err(BrokerError::new(
                Code::InvalidTransactionId,
                format!("unknown transaction {id}"),
            )));
        };
        if !states.contains(&entry.tx.state) {
            return Claim::Answered(Err(BrokerError::new(
                Code::PreconditionFailed,
                format!("transaction {id} is {:?}", entry.tx.state),
            )));
        }
        match &entry.busy {
            Some(n) => Claim::Wait(n.clone()),
            None => {
                entry.busy = Some(Arc::new(Notify::new()));
                Claim::Mine
            }
        }
    }

    /// Returns once busy mark `mark` of transaction `id` is cleared (at once if it was
    /// already, even when another caller marked it again since).
    async fn released(&self, id: &str, mark: &Arc<Notify>) {
        let notified = mark.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self
            .lock()
            .txs
            .get(id)
            .and_then(|e| e.busy.as_ref())
            .is_some_and(|b| Arc::ptr_eq(b, mark))
        {
            notified.await;
        }
    }

    /// Clears the busy mark of `id`, applies `f` to it, and wakes those waiting on it.
    fn finish(&self, id: &str, f: impl FnOnce(&mut Tx)) {
        self.lock().change(id, |entry| {
            f(&mut entry.tx);
            if let Some(n) = entry.busy.take() {
                n.notify_waiters();
            }
        });
    }
}

impl Broker {
    /// Commits or rolls back a transaction. Idempotent: the same decision twice is answered
    /// `Ok` without storing anything again; the opposite decision is refused.
    ///
    /// # Errors
    /// `INVALID_TRANSACTION_ID` for an unknown id or one of another topic or message;
    /// `PRECONDITION_FAILED` for a commit after a rollback or the reverse; storage errors.
    pub async fn end_transaction(
        self: &Arc<Self>,
        topic: &str,
        message_id: &str,
        id: &str,
        resolution: Resolution,
    ) -> BrokerResult<TxState> {
        let end = End {
            topic: topic.to_string(),
            message_id: message_id.to_string(),
            id: id.to_string(),
            resolution,
        };
        self.end_transactions(vec![end])
            .await
            .pop()
            .unwrap_or_else(|| Err(BrokerError::internal("decision without outcome")))
    }

    /// Commits or rolls back several transactions, each as [`Broker::end_transaction`]
    /// would, on its own: the outcome of each, in order. The decisions to write are
    /// stored in one append, so they share one durable write.
    ///
    /// # Cancel safety
    /// Cancel safe, in that a decision is made whole or not at all: they are made in a
    /// task of their own, which goes on when the caller goes away (a client that
    /// disconnects). Cancelled half-way, a decision would leave its transaction marked as
    /// being decided, and every later decision of it waiting.
    pub async fn end_transactions(self: &Arc<Self>, ends: Vec<End>) -> Vec<BrokerResult<TxState>> {
        let broker = Arc::clone(self);
        let n = ends.len();
        detached("deciding", async move { broker.decide_all(&ends).await })
            .await
            .unwrap_or_else(|e| vec![Err(e); n])
    }

    /// [`Broker::end_transactions`], in the caller's task.
    async fn decide_all(&self, ends: &[End]) -> Vec<BrokerResult<TxState>> {
        // An answer to a check-back, whatever it decides, leaves its producer room for the
        // next check.
        for end in ends {
            self.open_checks.decided(&end.id);
        }
        let mut outcomes: Vec<Option<BrokerResult<TxState>>> = vec![None; ends.len()];
        let mut mine = Vec::new();
        let mut waiting = Vec::new();
        for (i, end) in ends.iter().enumerate() {
            match self.transactions.claim(end) {
                Claim::Mine => mine.push(i),
                Claim::Answered(outcome) => outcomes[i] = Some(outcome),
                // Being decided by another call, or by an earlier entry of this one: that
                // decision is written meanwhile, so these wait alongside it.
                Claim::Wait(_) => waiting.push(i),
            }
        }
        let (written, waited) = tokio::join!(
            self.decide(mine.iter().map(|&i| &ends[i]).collect()),
            futures::future::join_all(waiting.iter().map(|&i| self.end_one(&ends[i]))),
        );
        for (i, outcome) in mine
            .into_iter()
            .zip(written)
            .chain(waiting.into_iter().zip(waited))
        {
            outcomes[i] = Some(outcome);
        }
        outcomes
            .into_iter()
            .map(|o| o.unwrap_or_else(|| Err(BrokerError::internal("decision without outcome"))))
            .collect()
    }

    /// One decision: waits while another decision of the transaction is being written.
    async fn end_one(&self, end: &End) -> BrokerResult<TxState> {
        loop {
            let wait = match self.transactions.claim(end) {
                Claim::Mine => break,
                Claim::Answered(outcome) => return outcome,
                Claim::Wait(n) => n,
            };
            self.transactions.released(&end.id, &wait).await;
        }
        let mut outcome = self.decide(vec![end]).await;
        outcome
            .pop()
            .unwrap_or_else(|| Err(BrokerError::internal("decision without outcome")))
    }

    /// Stores decisions claimed by this caller, in one append, and applies them: the
    /// outcome of each, in order. Every busy mark is cleared, whatever the outcome.
    async fn decide(&self, ends: Vec<&End>) -> Vec<BrokerResult<TxState>> {
        if ends.is_empty() {
            return Vec::new();
        }
        // The decisions and their entries in the table change together for snapshots.
        let gate = self.gate.read().await;
        let mut outcomes: Vec<BrokerResult<TxState>> = Vec::with_capacity(ends.len());
        let mut records = Vec::new();
        for end in &ends {
            match self.resolution_record(&end.id, end.resolution) {
                Ok(data) => {
                    records.push(data);
                    outcomes.push(Ok(decided(end.resolution)));
                }
                Err(e) => outcomes.push(Err(e)),
            }
        }
        let topics: Vec<String> = records.iter().map(|r| r.topic.clone()).collect();
        let appended = if records.is_empty() {
            Ok(Vec::new())
        } else {
            self.store.append(records).await
        };
        let mut stored = match appended {
            Ok(at) => Some(at.into_iter().zip(topics)),
            Err(e) => {
                let e = BrokerError::from(e);
                for outcome in outcomes.iter_mut().filter(|o| o.is_ok()) {
                    *outcome = Err(e.clone());
                }
                None
            }
        };
        let mut committed = Vec::new();
        for (end, outcome) in ends.iter().zip(&outcomes) {
            let at = match (outcome, stored.as_mut()) {
                (Ok(_), Some(stored)) => stored.next(),
                _ => None,
            };
            self.transactions
                .release(&end.id, end.resolution, at.as_ref().map(|(at, _)| at));
            if let Some((_, topic)) = at {
                tracing::debug!(transaction = %end.id, resolution = ?end.resolution,
                    "transaction resolved");
                if end.resolution == Resolution::Commit {
                    committed.push(topic);
                }
            }
        }
        drop(gate);
        committed.sort_unstable();
        committed.dedup();
        for topic in &committed {
            self.arrived(topic);
        }
        outcomes
    }

    /// The record that stores a decision: the committed message itself, or a rollback
    /// record.
    fn resolution_record(&self, id: &str, resolution: Resolution) -> BrokerResult<RecordData> {
        let tx = self
            .transactions
            .get(id)
            .ok_or_else(|| BrokerError::internal("transaction vanished"))?;
        Ok(match resolution {
            Resolution::Commit => {
                let half = self.store.read(tx.half_position)?;
                let kind = if half.data.deliver_at > 0 {
                    RecordKind::Delayed
                } else {
                    RecordKind::Normal
                };
                copy_record(
                    &half,
                    kind,
                    &tx.topic,
                    tx.queue,
                    &[prop::REAL_TOPIC, prop::REAL_QUEUE, prop::RECOVERY_MS],
                    &[],
                )
            }
            Resolution::Rollback => tx_record(RecordKind::TxResolution, id, ROLLBACK),
        })
    }

    /// Declares a transaction unresolved after its last check-back went unanswered, unless
    /// it was decided meanwhile or a decision of it is being written (that one wins).
    pub(crate) async fn mark_unresolved(&self, id: &str) -> BrokerResult<()> {
        if !matches!(
            self.transactions.claim_open(id, &[TxState::Prepared]),
            Claim::Mine
        ) {
            return Ok(());
        }
        // Put back to checking by an operator since it was found past the maximum: it stays.
        let max = self.config.transaction_check_max;
        if self.transactions.get(id).is_none_or(|t| t.checks < max) {
            self.transactions.finish(id, |_| {});
            return Ok(());
        }
        let stored = self
            .store
            .append(vec![tx_record(RecordKind::TxResolution, id, UNRESOLVED)])
            .await;
        self.transactions.finish(id, |tx| {
            if let Ok(at) = &stored {
                tx.state = TxState::Unresolved;
                tx.resolved_ms = Some(at[0].store_timestamp);
                tx.resolved_at = Some(at[0].position);
            }
        });
        stored?;
        tracing::warn!(
            transaction = id,
            "transaction unresolved after the last check-back"
        );
        Ok(())
    }

    /// Records that a check-back of each of `ids` was sent, in one append, and when the
    /// next of each is due.
    pub(crate) async fn record_checks(&self, ids: &[String]) -> BrokerResult<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let records = ids
            .iter()
            .map(|id| tx_record(RecordKind::TxCheck, id, b""))
            .collect();
        let stored = self.store.append(records).await?;
        for (id, at) in ids.iter().zip(stored) {
            let interval = |checks| self.check_interval_ms(checks);
            self.transactions.update(id, |tx| {
                tx.checks += 1;
                tx.next_check_ms = at.store_timestamp + interval(tx.checks);
            });
        }
        Ok(())
    }

    /// Puts an unresolved transaction back to checking (operator action).
    ///
    /// # Errors
    /// `INVALID_TRANSACTION_ID` for an unknown transaction; `PRECONDITION_FAILED` if it is
    /// not unresolved or prepared (it was decided, perhaps while this waited for a decision
    /// being written).
    ///
    /// # Cancel safety
    /// Cancel safe: made in a task of its own, as decisions are. Cut short while its record
    /// is written, it would leave the transaction marked as being changed, and every later
    /// decision of it waiting.
    pub async fn recheck_transaction(self: &Arc<Self>, id: &str) -> BrokerResult<()> {
        let broker = Arc::clone(self);
        let id = id.to_string();
        detached("rechecking", async move { broker.recheck_now(&id).await }).await?
    }

    /// [`Broker::recheck_transaction`], in the caller's task.
    async fn recheck_now(&self, id: &str) -> BrokerResult<()> {
        loop {
            let wait = match self
                .transactions
                .claim_open(id, &[TxState::Unresolved, TxState::Prepared])
            {
                Claim::Mine => break,
                Claim::Wait(n) => n,
                Claim::Answered(outcome) => return outcome.map(drop),
            };
            self.transactions.released(id, &wait).await;
        }
        let gate = self.gate.read().await;
        let stored = self
            .store
            .append(vec![tx_record(RecordKind::TxResolution, id, RECHECK)])
            .await;
        self.transactions.finish(id, |tx| {
            if let Ok(at) = &stored {
                tx.state = TxState::Prepared;
                tx.checks = 0;
                tx.resolved_ms = None;
                tx.resolved_at = None;
                tx.next_check_ms = at[0].store_timestamp;
            }
        });
        drop(gate);
        stored.map(drop).map_err(Into::into)
    }

    /// Delay before check-back number `checks + 1`: the interval, doubling, at most 5 minutes.
    pub(crate) fn check_interval_ms(&self, checks: u32) -> i64 {
        let base = self.config.transaction_check_interval_ms as i64;
        let factor = 1i64 << checks.saturating_sub(1).min(16);
        (base.saturating_mul(factor)).min(300_000.max(base))
    }

    /// When the first check-back of a half message is due.
    pub(crate) fn first_check_ms(&self, rec: &Record) -> i64 {
        let wait = sys(&rec.data, prop::RECOVERY_MS)
            .and_then(|v| v.parse::<i64>().ok())
            .unwrap_or(self.config.transaction_timeout_ms as i64);
        rec.store_timestamp.saturating_add(wait.max(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tx(id: &str, state: TxState, resolved_ms: Option<i64>) -> Tx {
        Tx {
            id: id.into(),
            message_id: id.into(),
            topic: "t".into(),
            queue: 0,
            half_position: 64,
            created_ms: 0,
            next_check_ms: 0,
            checks: 0,
            state,
            resolved_ms,
            resolved_at: resolved_ms.map(|ms| ms as u64),
        }
    }

    #[test]
    fn pruning_forgets_old_decisions_but_never_open_or_unresolved_transactions() {
        let t = Transactions::default();
        t.restore(vec![
            tx("old-commit", TxState::Committed, Some(10)),
            tx("old-rollback", TxState::RolledBack, Some(20)),
            tx("new-commit", TxState::Committed, Some(1_000)),
            tx("newer-commit", TxState::Committed, Some(2_000)),
            tx("unresolved", TxState::Unresolved, Some(5)),
            tx("open", TxState::Prepared, None),
        ]);
        t.prune(500, 1);
        let all = [
            TxState::Prepared,
            TxState::Unresolved,
            TxState::Committed,
            TxState::RolledBack,
        ];
        let mut left: Vec<String> = t.list(&all).into_iter().map(|x| x.id).collect();
        left.sort();
        assert_eq!(left, vec!["newer-commit", "open", "unresolved"]);
    }

    /// The ids `due(now)` finds, sorted.
    fn due_ids(t: &Transactions, now: i64) -> Vec<String> {
        let mut ids: Vec<String> = t.due(now).into_iter().map(|x| x.id).collect();
        ids.sort();
        ids
    }

    #[test]
    fn a_check_back_is_due_from_its_time_until_it_is_recorded_or_decided() {
        let t = Transactions::default();
        let at = |id: &str, ms: i64| Tx {
            next_check_ms: ms,
            ..tx(id, TxState::Prepared, None)
        };
        t.restore(vec![
            at("a", 100),
            at("b", 300),
            tx("decided", TxState::Committed, Some(5)),
            tx("unresolved", TxState::Unresolved, Some(5)),
        ]);
        assert!(due_ids(&t, 99).is_empty());
        assert_eq!(due_ids(&t, 100), ["a"]);
        // Not checked yet: still due.
        assert_eq!(due_ids(&t, 150), ["a"]);
        // Its check recorded: due again at the next time only.
        t.update("a", |x| x.next_check_ms = 400);
        assert!(due_ids(&t, 250).is_empty());
        assert_eq!(due_ids(&t, 300), ["b"]);
        assert_eq!(due_ids(&t, 400), ["a", "b"]);
        // Moved earlier, then later again without a pair of its own: found at its time.
        t.update("b", |x| x.next_check_ms = 350);
        t.lock().txs.get_mut("b").unwrap().tx.next_check_ms = 500;
        assert_eq!(due_ids(&t, 450), ["a"]);
        assert_eq!(due_ids(&t, 500), ["a", "b"]);
        // Busy (a decision being written) is left out; decided is gone for good.
        let mark = t.claim(&End {
            topic: String::new(),
            message_id: String::new(),
            id: "a".into(),
            resolution: Resolution::Commit,
        });
        assert!(matches!(mark, Claim::Mine));
        assert_eq!(due_ids(&t, 500), ["b"]);
        t.finish("a", |x| {
            x.state = TxState::Committed;
            x.resolved_ms = Some(500);
        });
        assert_eq!(due_ids(&t, 1_000), ["b"]);
        assert_eq!(t.lock().order.checks.len(), 1);
        // A decision takes its pair away at once, whenever its check-back would have been.
        t.update("b", |x| x.next_check_ms = i64::MAX);
        t.finish("b", |x| {
            x.state = TxState::RolledBack;
            x.resolved_ms = Some(1_000);
        });
        assert!(t.lock().order.checks.is_empty());
        // An unresolved one checked again is due at once.
        t.update("unresolved", |x| {
            x.state = TxState::Prepared;
            x.next_check_ms = 900;
        });
        assert_eq!(due_ids(&t, 1_000), ["unresolved"]);
    }

    #[test]
    fn pruning_forgets_the_oldest_decisions_first_also_those_decided_after_a_restore() {
        let t = Transactions::default();
        t.restore(vec![
            tx("late", TxState::Committed, Some(300)),
            tx("early", TxState::RolledBack, Some(100)),
            tx("open", TxState::Prepared, None),
        ]);
        t.finish("open", |x| {
            x.state = TxState::Committed;
            x.resolved_ms = Some(400);
        });
        t.prune(0, 2);
        let all = [TxState::Prepared, TxState::Committed, TxState::RolledBack];
        let left = |t: &Transactions| -> Vec<String> {
            let mut ids: Vec<String> = t.list(&all).into_iter().map(|x| x.id).collect();
            ids.sort();
            ids
        };
        assert_eq!(left(&t), ["late", "open"]);
        t.prune(350, 2);
        assert_eq!(left(&t), ["open"]);
        assert!(t.lock().order.decided.len() == 1);
        // More than one lock hold's worth.
        let many = (0..3 * PRUNE_BATCH as i64)
            .map(|i| tx(&format!("d{i}"), TxState::Committed, Some(i)))
            .collect();
        t.restore(many);
        t.prune(0, 10);
        let kept: Vec<String> = t.list(&all).into_iter().map(|x| x.id).collect();
        let newest = 3 * PRUNE_BATCH - 10;
        assert_eq!(kept.len(), 10);
        assert!(
            kept.iter()
                .all(|id| id[1..].parse::<usize>().unwrap() >= newest)
        );
        assert_eq!(t.lock().order.decided.len(), 10);
        t.prune(i64::MAX, 10);
        assert!(t.list(&all).is_empty());
    }

    #[test]
    fn a_split_keeps_every_open_transaction_and_only_the_newer_decisions() {
        let t = Transactions::default();
        let mut legacy = tx("legacy", TxState::RolledBack, Some(1));
        legacy.resolved_at = None;
        t.restore(vec![
            tx("before", TxState::Committed, Some(10)),
            tx("at", TxState::Committed, Some(20)),
            tx("after", TxState::RolledBack, Some(30)),
            tx("unresolved", TxState::Unresolved, Some(5)),
            tx("open", TxState::Prepared, None),
            legacy,
        ]);
        let ids = |txs: Vec<&Tx>| {
            let mut ids: Vec<String> = txs.into_iter().map(|x| x.id.clone()).collect();
            ids.sort();
            ids
        };
        let copy = t.copy();
        let (open, decided) = copy.split(20);
        assert_eq!(ids(open), vec!["open", "unresolved"]);
        assert_eq!(ids(decided), vec!["after", "at"]);
        let (_, decided) = copy.split(0);
        assert_eq!(ids(decided), vec!["after", "at", "before", "legacy"]);
    }
}
