//! Durable broker state: a snapshot in a state file, plus the log written after it.
//!
//! Every change of broker state is a record in the log, durable before it is answered
//! (half messages, committed messages, rollbacks, check-backs, acknowledgements,
//! dead-lettered copies). A snapshot of the transaction table and the groups' progress,
//! naming the log position it covers, is written every few seconds and at shutdown; opening
//! the broker loads it and replays the log from that position.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use txmq_store::{Store, StoreConfig};

use crate::broker::Broker;
use crate::config::BrokerConfig;
use crate::delivery::{QueueProgress, RENEW_MS};
use crate::metadata::Metadata;
use crate::transactions::Tx;

const SNAPSHOT: &str = "broker";
const SNAPSHOT_EVERY: Duration = Duration::from_secs(5);
/// Committed and rolled-back transactions are remembered this long (and at most
/// `KEEP_RESOLVED_MAX` of them), so that a repeated `EndTransaction` is answered `OK`; clients
/// repeat within seconds. Later, a repeat is answered `INVALID_TRANSACTION_ID` and still
/// delivers nothing twice.
const KEEP_RESOLVED_MS: i64 = 120_000;
const KEEP_RESOLVED_MAX: usize = 200_000;

#[derive(Serialize, Deserialize)]
struct Snapshot {
    version: u32,
    /// The state is that of the log below this position.
    position: u64,
    transactions: Vec<Tx>,
    groups: BTreeMap<String, BTreeMap<String, QueueProgress>>,
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
        let store = Arc::new(Store::open(store_config)?);
        let metadata = Metadata::load(store.state_files().clone())?;
        let broker = Self::assemble(config, store, metadata);
        let from = match broker.store.state_files().read(SNAPSHOT)? {
            Some(bytes) => {
                let snap: Snapshot = serde_json::from_slice(&bytes)?;
                anyhow::ensure!(
                    snap.version == 1,
                    "unknown broker snapshot version {}",
                    snap.version
                );
                broker.transactions.restore(snap.transactions);
                broker.delivery.restore(snap.groups);
                broker.snapshot_at.store(snap.position, Ordering::Relaxed);
                snap.position
            }
            None => broker.store.log_range().start,
        };
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

    /// Writes a snapshot now and moves the retention floors; does nothing when the log did
    /// not grow since the last snapshot (every durable change of state appends a record, so
    /// the saved state is still that of the log: an idle broker writes nothing).
    ///
    /// # Errors
    /// If the state file cannot be written.
    pub async fn snapshot(&self) -> anyhow::Result<()> {
        self.transactions
            .prune(crate::now_ms() - KEEP_RESOLVED_MS, KEEP_RESOLVED_MAX);
        // Under the gate only the copy: encoding happens after other work resumed.
        let (position, transactions, groups) = {
            let _exclusive = self.gate.write().await;
            let position = self.store.log_range().end;
            if position == self.snapshot_at.load(Ordering::Relaxed) {
                return Ok(());
            }
            (position, self.transactions.copy(), self.delivery.progress())
        };
        // Encoding and the synced write block a thread for a while: not a runtime worker's.
        let files = self.store.state_files().clone();
        tokio::task::spawn_blocking(move || {
            let snap = Snapshot {
                version: 1,
                position,
                transactions: transactions.into_vec(),
                groups,
            };
            let bytes = serde_json::to_vec(&snap)?;
            files.write(SNAPSHOT, &bytes)?;
            Ok::<_, anyhow::Error>(())
        })
        .await??;
        self.snapshot_at.store(position, Ordering::Relaxed);
        self.store
            .set_retention_floor("broker-snapshot", Some(position));
        self.store
            .set_retention_floor("transactions", self.transactions.oldest_open());
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
