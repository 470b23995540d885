//! Durable broker state: a snapshot in a state file, plus the log written after it.
//!
//! Every change of broker state is a record in the log, durable before it is answered
//! (half messages, committed messages, rollbacks, check-backs, acknowledgements,
//! dead-lettered copies). A snapshot of the transaction table and the groups' progress,
//! naming the log position it covers, is written every few seconds and at shutdown; opening
//! the broker loads it and replays the log from that position.
//!
//! Decided transactions (committed, rolled back) are kept for a while so that a repeated
//! `EndTransaction` is answered `OK`, which can mean hundreds of thousands of them after a
//! burst. They never change once decided, so each is written once: a snapshot puts the
//! decisions made since the previous one into a file of their own (`tx-decisions-<position>`)
//! and lists the files still in their retention time; it carries only the open
//! transactions itself. A snapshot's cost follows the rate of decisions, not their number.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use txmq_store::{Store, StoreConfig};

use crate::broker::Broker;
use crate::config::BrokerConfig;
use crate::delivery::{QueueProgress, RENEW_MS};
use crate::metadata::Metadata;
use crate::transactions::{Tx, TxState};

const SNAPSHOT: &str = "broker";
const SNAPSHOT_EVERY: Duration = Duration::from_secs(5);
/// Committed and rolled-back transactions are remembered this long (and at most
/// `KEEP_RESOLVED_MAX` of them), so that a repeated `EndTransaction` is answered `OK`; clients
/// repeat within seconds. Later, a repeat is answered `INVALID_TRANSACTION_ID` and still
/// delivers nothing twice.
const KEEP_RESOLVED_MS: i64 = 120_000;
const KEEP_RESOLVED_MAX: usize = 200_000;

/// Snapshot versions this broker reads; it writes the last.
const SNAPSHOT_VERSIONS: [u32; 2] = [1, 2];
const DECISIONS_PREFIX: &str = "tx-decisions-";

/// Read with `T` = [`Tx`]; written with `T` = `&Tx`, borrowed from the copy of the table.
#[derive(Serialize, Deserialize)]
struct Snapshot<T = Tx> {
    version: u32,
    /// The state is that of the log below this position.
    position: u64,
    /// Version 1: every transaction; version 2: those still open.
    transactions: Vec<T>,
    /// Version 2: the files holding the decisions made below `position`, oldest first.
    #[serde(default)]
    decision_files: Vec<DecisionFile>,
    groups: BTreeMap<String, BTreeMap<String, QueueProgress>>,
}

/// A file of decisions, named after the position of the snapshot that wrote it: it holds the
/// decisions stored between the previous snapshot's position and that one.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub(crate) struct DecisionFile {
    position: u64,
    /// When its newest decision was made, ms: the file goes once that is out of retention.
    newest_ms: i64,
}

impl DecisionFile {
    fn name(&self) -> String {
        format!("{DECISIONS_PREFIX}{}", self.position)
    }
}

/// What the decision files hold, as of the last snapshot.
#[derive(Debug, Default)]
pub(crate) struct DecisionFiles {
    files: Vec<DecisionFile>,
    /// Decisions stored below this log position are in `files` (or out of retention).
    upto: u64,
}

impl Broker {
    /// Opens the broker's data directory: the store, the metadata, the last snapshot, and the
    /// log after it.
    ///
    /// # Errors
    /// If the store cannot be opened (damaged log, directory in use...) or the state is
    /// unreadable.
    pub fn open(config: BrokerConfig) -> anyhow::Result<Arc<Self>> {
        config.validate().map_err(anyhow::Error::msg)?;
        Self::open_with_store(config.clone(), config.store_config())
    }

    /// As [`Broker::open`], with the store configured by the caller.
    ///
    /// # Errors
    /// As [`Broker::open`].
    pub fn open_with_store(
        config: BrokerConfig,
        store_config: StoreConfig,
    ) -> anyhow::Result<Arc<Self>> {
        Self::open_on(config, Store::open(store_config)?)
    }

    /// As [`Broker::open`], on a store the caller opened (through an I/O layer of its own,
    /// for instance).
    ///
    /// # Errors
    /// As [`Broker::open`], but for the store's own.
    pub fn open_on(config: BrokerConfig, store: Store) -> anyhow::Result<Arc<Self>> {
        let store = Arc::new(store);
        let metadata = Metadata::load(store.state_files().clone())?;
        let mut broker = Self::assemble(config, store, metadata);
        let files = broker.store.state_files().clone();
        let from = match files.read(SNAPSHOT)? {
            Some(bytes) => {
                let snap: Snapshot = serde_json::from_slice(&bytes)?;
                anyhow::ensure!(
                    SNAPSHOT_VERSIONS.contains(&snap.version),
                    "unknown broker snapshot version {}",
                    snap.version
                );
                let mut transactions = snap.transactions;
                for f in &snap.decision_files {
                    match files.read(&f.name())? {
                        Some(bytes) => {
                            let decided: Vec<Tx> = serde_json::from_slice(&bytes)
                                .with_context(|| format!("damaged state file {}", f.name()))?;
                            transactions.extend(decided);
                        }
                        // Decisions only answer repeated EndTransaction calls: without them
                        // a repeat is refused, and nothing is delivered twice or lost.
                        None => tracing::warn!(
                            file = f.name(),
                            "a file of transaction decisions is missing; repeated commits or \
                             rollbacks of those transactions will be refused"
                        ),
                    }
                }
                broker.transactions.restore(transactions);
                broker.delivery.restore(snap.groups);
                broker.snapshot_at.store(snap.position, Ordering::Relaxed);
                if snap.version >= 2 {
                    *broker.decisions.get_mut() = DecisionFiles {
                        files: snap.decision_files,
                        upto: snap.position,
                    };
                }
                snap.position
            }
            None => broker.store.log_range().start,
        };
        remove_unlisted_decision_files(&files, &broker.decisions.get_mut().files);
        // Retention may run from now on (the store runs it), while the log is replayed and
        // before the next snapshot, which an idle broker does not write: what the snapshot
        // needs is held from the start.
        let oldest_open = broker
            .transactions
            .list(&[TxState::Prepared, TxState::Unresolved])
            .first()
            .map(|t| t.half_position);
        broker.hold_log(from, oldest_open);
        let replayed = broker.replay(from)?;
        tracing::info!(from, replayed, "broker state recovered");
        Ok(Arc::new(broker))
    }

    /// Applies every record from `from` to the end of the log.
    fn replay(&self, from: u64) -> anyhow::Result<u64> {
        let start = self.store.log_range().start;
        anyhow::ensure!(
            from >= start,
            "the broker snapshot needs the log from position {from}, but it starts at {start}"
        );
        let mut pos = from;
        let mut n = 0;
        loop {
            let (records, next) = self.store.read_log(pos, 1024, 64 << 20)?;
            if records.is_empty() {
                break;
            }
            for rec in &records {
                self.transactions.apply(
                    rec,
                    |r| self.first_check_ms(r),
                    |c| self.check_interval_ms(c),
                );
                self.delivery.apply(rec);
            }
            n += records.len() as u64;
            pos = next;
        }
        Ok(n)
    }

    /// Keeps retention from deleting the log the broker's state needs: from `snapshot_at`
    /// (replayed at the next start), and from `oldest_open`, the half message of the oldest
    /// transaction still open.
    fn hold_log(&self, snapshot_at: u64, oldest_open: Option<u64>) {
        self.store
            .set_retention_floor("broker-snapshot", Some(snapshot_at));
        self.store.set_retention_floor("transactions", oldest_open);
    }

    /// Writes a snapshot now and moves the retention floors; does nothing when the log did
    /// not grow since the last snapshot (every durable change of state appends a record, so
    /// the saved state is still that of the log: an idle broker writes nothing).
    ///
    /// # Errors
    /// If the state file cannot be written.
    pub async fn snapshot(&self) -> anyhow::Result<()> {
        self.snapshot_as_of(crate::now_ms()).await
    }

    /// [`Broker::snapshot`] as if the time were `now_ms`, for retention.
    ///
    /// # Errors
    /// As [`Broker::snapshot`].
    #[doc(hidden)]
    pub async fn snapshot_as_of(&self, now_ms: i64) -> anyhow::Result<()> {
        let mut decisions = self.decisions.lock().await;
        let keep_after = now_ms - KEEP_RESOLVED_MS;
        // A scan of up to KEEP_RESOLVED_MAX decisions: not on a runtime worker.
        let transactions = self.transactions.clone();
        tokio::task::spawn_blocking(move || transactions.prune(keep_after, KEEP_RESOLVED_MAX))
            .await?;
        // Under the gate only the copy: encoding happens after other work resumed.
        let (position, transactions, groups) = {
            let _exclusive = self.gate.write().await;
            let position = self.store.log_range().end;
            if position == self.snapshot_at.load(Ordering::Relaxed) {
                return Ok(());
            }
            (position, self.transactions.copy(), self.delivery.progress())
        };
        // Encoding and the synced writes block a thread for a while: not a runtime worker's.
        let files = self.store.state_files().clone();
        let (expired, mut listed): (Vec<DecisionFile>, Vec<DecisionFile>) = decisions
            .files
            .iter()
            .partition(|f| f.newest_ms < keep_after);
        let upto = decisions.upto;
        let store = self.store.clone();
        let (listed, oldest_open) = tokio::task::spawn_blocking(move || {
            // The snapshot stands for the log up to `position`, so that part of the log is
            // made durable first (it may not be yet with async durability). Otherwise a power
            // loss would leave the snapshot past the log's end: the records written next
            // would land below its position, and the replay after a second loss would skip
            // them.
            store.sync_blocking()?;
            // Encoded first, and the copy let go before the synced writes: while it lives, the
            // live table copies each part of itself it changes.
            let (open, decided) = transactions.split(upto);
            let oldest_open = open.iter().map(|t| t.half_position).min();
            let decided = if decided.is_empty() {
                None
            } else {
                let file = DecisionFile {
                    position,
                    newest_ms: decided.iter().filter_map(|t| t.resolved_ms).max().unwrap_or(0),
                };
                listed.push(file);
                Some((file, serde_json::to_vec(&decided)?))
            };
            let snap = serde_json::to_vec(&Snapshot {
                version: 2,
                position,
                transactions: open,
                decision_files: listed.clone(),
                groups,
            })?;
            drop(transactions);
            if let Some((file, json)) = decided {
                // Durable before the snapshot that lists it.
                files.write(&file.name(), &json)?;
            }
            files.write(SNAPSHOT, &snap)?;
            // No snapshot lists them any more.
            for f in &expired {
                if let Err(e) = files.remove(&f.name()) {
                    tracing::warn!(file = f.name(), error = %e, "cannot remove an expired state file");
                }
            }
            Ok::<_, anyhow::Error>((listed, oldest_open))
        })
        .await??;
        *decisions = DecisionFiles {
            files: listed,
            upto: position,
        };
        self.snapshot_at.store(position, Ordering::Relaxed);
        self.hold_log(position, oldest_open);
        let oldest_unacked = self
            .delivery
            .floors()
            .into_iter()
            .filter_map(|(t, q, offset)| {
                self.store
                    .index_entries(&t, q, offset, 1)
                    .ok()?
                    .first()
                    .map(|e| e.position)
            })
            .min();
        self.store.set_retention_floor("deliveries", oldest_unacked);
        Ok(())
    }

    /// Runs the broker's background work (check-backs, snapshots, renewal of push consumers'
    /// messages) until `stop` fires.
    pub async fn run_background(self: Arc<Self>, stop: tokio::sync::watch::Receiver<bool>) {
        let checks = tokio::spawn(self.clone().run_check_backs(stop.clone()));
        let mut stop = stop;
        let mut snapshot = tokio::time::interval(SNAPSHOT_EVERY);
        let mut renew = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = snapshot.tick() => {
                    if let Err(e) = self.snapshot().await {
                        tracing::warn!(error = %e, "broker snapshot failed");
                    }
                }
                _ = renew.tick() => {
                    self.delivery.renew(crate::now_ms(), &self.sessions.connected_clients(), RENEW_MS);
                }
                _ = stop.changed() => break,
            }
        }
        let _ = checks.await;
    }

    /// Writes a final snapshot and closes the store (syncing everything).
    ///
    /// # Errors
    /// If the snapshot or the final sync fails; acknowledged messages are safe in the log
    /// either way.
    pub async fn shutdown(&self) -> anyhow::Result<()> {
        let snap = self.snapshot().await;
        self.store.close()?;
        snap
    }
}

/// Removes decision files no snapshot lists: written by a snapshot that did not complete.
fn remove_unlisted_decision_files(files: &txmq_store::StateFiles, listed: &[DecisionFile]) {
    let Ok(entries) = std::fs::read_dir(files.dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let ours = name
            .strip_prefix(DECISIONS_PREFIX)
            .is_some_and(|n| n.parse::<u64>().is_ok());
        if ours
            && !listed.iter().any(|f| f.name() == name)
            && let Err(e) = files.remove(name)
        {
            tracing::warn!(file = name, error = %e, "cannot remove a stray state file");
        }
    }
}
