//! The txmq storage engine: a segmented commit log that never loses an acknowledged record.
//!
//! - [`Store::append`] writes records through one writer thread that groups concurrent
//!   appends into one write and one fdatasync ([`Durability::Sync`], the default) and only
//!   then acknowledges them.
//! - Every (topic, queue) has a queue index of fixed-size entries, so
//!   [`Store::read_queue`] reaches any queue offset with one positional read.
//! - On open, a torn tail is cut, damage before it stops start-up with the file and offset
//!   (or is truncated when [`StoreConfig::repair`] is set), and the index is rebuilt from
//!   the log written after the last checkpoint.
//! - Retention deletes whole segments by age or size, never one the broker still needs
//!   ([`Store::set_retention_floor`]).
//! - Small state lives in files replaced atomically ([`StateFiles`]) or in the log itself
//!   (the state [`RecordKind`]s).
//!
//! All file access goes through [`io::Io`], which tests replace with [`io::SimIo`] to cut
//! the power at any point. The byte layout is in `docs/storage-format.md`.
//!
//! ```
//! use txmq_store::{RecordData, RecordKind, Store, StoreConfig};
//! # let dir = tempfile::tempdir()?;
//! let store = Store::open(StoreConfig::new(dir.path()))?;
//! let acked = store.append_blocking(vec![RecordData::new(RecordKind::Normal, "orders", 0, "paid")])?;
//! let back = store.read_queue("orders", 0, acked[0].queue_offset, 1)?;
//! assert_eq!(back[0].data.body, b"paid");
//! store.close()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod checkpoint;
mod commit_log;
mod config;
mod error;
mod group_commit;
pub mod io;
mod maintenance;
mod queue_index;
mod record;
mod recovery;
mod retention;
mod state;

use std::collections::HashMap;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, mpsc};
use std::thread::JoinHandle;

pub use commit_log::SEGMENT_HEADER_LEN;
pub use config::{Durability, Retention, StoreConfig};
pub use error::{AppendError, MaintenanceError, OpenError, ReadError};
pub use queue_index::{IndexEntry, escape_topic};
pub use record::{
    FORMAT_VERSION, HEADER_LEN, MAX_TOPIC_LEN, Record, RecordData, RecordKind, tag_hash,
};
pub use recovery::{RecoveryReport, Repair};
pub use retention::RetentionReport;
pub use state::StateFiles;

use commit_log::CommitLog;
use group_commit::{Command, Prewriter, Syncer, Writer};
use io::{FsIo, Io};
use queue_index::{QueueIndex, QueueKey};

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Where an appended record landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// Position in the commit log.
    pub position: u64,
    /// Offset in its queue.
    pub queue_offset: u64,
    /// Store time, ms since the epoch.
    pub store_timestamp: i64,
}

/// Counters of the write path since the store was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Records acknowledged.
    pub records: u64,
    /// Group commits (writes of one or more requests).
    pub group_commits: u64,
    /// Bytes written to the log.
    pub bytes_written: u64,
    /// fdatasync calls on the log.
    pub syncs: u64,
    /// Time spent in those fdatasync calls, in microseconds.
    pub sync_micros: u64,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub records: AtomicU64,
    pub group_commits: AtomicU64,
    pub bytes_written: AtomicU64,
    pub syncs: AtomicU64,
    pub sync_micros: AtomicU64,
}

impl Counters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// State shared by the writer, the maintenance thread and readers.
pub(crate) struct Shared {
    pub config: StoreConfig,
    pub io: Arc<dyn Io>,
    pub log: CommitLog,
    pub index_dir: PathBuf,
    pub queues: RwLock<HashMap<QueueKey, Arc<QueueIndex>>>,
    /// Readers see the log below this position.
    pub committed: AtomicU64,
    /// The log below this position is durable.
    pub durable: AtomicU64,
    /// Position of the last durable checkpoint.
    pub checkpointed: AtomicU64,
    pub state: StateFiles,
    pub counters: Counters,
    poison: Mutex<Option<String>>,
    floors: Mutex<HashMap<String, u64>>,
    /// Set when an index sync failed: no checkpoint can be trusted until restart.
    checkpoints_disabled: std::sync::atomic::AtomicBool,
    checkpoint_lock: Mutex<()>,
    /// One retention pass at a time.
    pub retention_lock: Mutex<()>,
}

impl Shared {
    /// Marks the store poisoned (the first reason wins) and returns the reason.
    pub fn poison(&self, reason: String) -> String {
        let mut p = self.poison.lock().unwrap_or_else(|e| e.into_inner());
        if p.is_none() {
            tracing::error!(%reason, "store poisoned: refusing further appends");
            *p = Some(reason);
        }
        p.clone().unwrap_or_default()
    }

    pub fn poison_reason(&self) -> Option<String> {
        self.poison
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn floors(&self) -> HashMap<String, u64> {
        self.floors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn queue(&self, topic: &str, queue_id: u32) -> Option<Arc<QueueIndex>> {
        let map = self.queues.read().unwrap_or_else(|e| e.into_inner());
        map.get(&(topic.to_string(), queue_id)).cloned()
    }

    pub fn queue_or_create(&self, topic: &str, queue_id: u32) -> Arc<QueueIndex> {
        if let Some(q) = self.queue(topic, queue_id) {
            return q;
        }
        let mut map = self.queues.write().unwrap_or_else(|e| e.into_inner());
        map.entry((topic.to_string(), queue_id))
            .or_insert_with(|| Arc::new(QueueIndex::new(&self.index_dir, topic, queue_id)))
            .clone()
    }

    pub fn all_queues(&self) -> Vec<Arc<QueueIndex>> {
        self.queues
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }
}

/// The storage engine. Cheap to share behind an `Arc`; every method takes `&self`.
pub struct Store {
    shared: Arc<Shared>,
    tx: Mutex<Option<mpsc::Sender<Command>>>,
    /// The writer, syncer and prewriter threads.
    threads: Mutex<Vec<JoinHandle<()>>>,
    prewriter: Option<Arc<Prewriter>>,
    maintenance: Mutex<Option<maintenance::Handle>>,
    report: RecoveryReport,
    /// The data directory lock, released by `close`.
    dir_lock: Mutex<Option<Box<dyn Send + Sync>>>,
}

impl Store {
    /// Opens (or creates) the store in `config.dir` on the real file system.
    ///
    /// # Errors
    /// See [`OpenError`]: I/O failures, damage before the tail of the log, a directory used
    /// by another process, or an invalid configuration.
    pub fn open(config: StoreConfig) -> Result<Self, OpenError> {
        Self::open_with(config, Arc::new(FsIo))
    }

    /// Opens the store through the given I/O layer.
    ///
    /// # Errors
    /// As [`Store::open`].
    pub fn open_with(config: StoreConfig, io: Arc<dyn Io>) -> Result<Self, OpenError> {
        config.validate().map_err(OpenError::Config)?;
        io.create_dir_all(&config.dir)
            .map_err(|cause| OpenError::Io {
                path: config.dir.clone(),
                cause,
            })?;
        let lock = io.lock_dir(&config.dir).map_err(|cause| OpenError::Io {
            path: config.dir.clone(),
            cause,
        })?;
        let state_dir = config.dir.join("state");
        io.create_dir_all(&state_dir)
            .map_err(|cause| OpenError::Io {
                path: state_dir.clone(),
                cause,
            })?;
        let state = StateFiles::new(io.clone(), state_dir);
        let recovered = recovery::recover(&*io, &config, &state)?;
        let report = recovered.report.clone();
        tracing::info!(
            dir = %config.dir.display(), segments = report.segments, log_end = report.log_end,
            scanned_from = report.scanned_from, records_scanned = report.records_scanned,
            full_index_rebuild = report.full_index_rebuild, torn_tail_bytes = report.torn_tail_bytes,
            "store opened"
        );
        let segments = recovered.segments;
        let shared = Arc::new(Shared {
            index_dir: config.dir.join("index"),
            log: CommitLog::new(config.dir.join("log"), segments),
            queues: RwLock::new(
                recovered
                    .queues
                    .iter()
                    .map(|(q, _)| (q.key(), q.clone()))
                    .collect(),
            ),
            committed: AtomicU64::new(recovered.write_pos),
            durable: AtomicU64::new(recovered.write_pos),
            checkpointed: AtomicU64::new(recovered.checkpoint.position),
            state,
            counters: Counters::default(),
            poison: Mutex::new(None),
            floors: Mutex::new(HashMap::new()),
            checkpoints_disabled: Default::default(),
            checkpoint_lock: Mutex::new(()),
            retention_lock: Mutex::new(()),
            io,
            config,
        });
        // Recovery leaves the write position in the last segment.
        let active = shared
            .log
            .segments()
            .pop()
            .ok_or_else(|| OpenError::Config("no log segment".into()))?;
        let spawn_err = |e| OpenError::Io {
            path: shared.config.dir.clone(),
            cause: e,
        };
        let (to_syncer, from_writer) = mpsc::channel();
        let syncer = Syncer::new(shared.clone(), recovered.write_pos);
        let syncer = std::thread::Builder::new()
            .name("txmq-store-syncer".into())
            .spawn(move || syncer.run(from_writer))
            .map_err(spawn_err)?;
        let mut threads = vec![syncer];
        let prewriter = if shared.config.preallocate && shared.config.prewrite_bytes > 0 {
            let at = recovered.write_pos - active.base;
            let (p, handle) = Prewriter::start(
                shared.io.clone(),
                active.clone(),
                at,
                shared.config.prewrite_bytes,
            )
            .map_err(spawn_err)?;
            threads.push(handle);
            Some(p)
        } else {
            None
        };
        let writer = Writer::new(
            shared.clone(),
            active,
            recovered.write_pos,
            recovered.queues,
            to_syncer,
            prewriter.clone(),
        );
        let (tx, rx) = mpsc::channel();
        let writer = std::thread::Builder::new()
            .name("txmq-store-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(spawn_err)?;
        let maintenance =
            maintenance::start(shared.clone(), tx.clone()).map_err(|e| OpenError::Io {
                path: shared.config.dir.clone(),
                cause: e,
            })?;
        Ok(Self {
            shared,
            tx: Mutex::new(Some(tx)),
            threads: Mutex::new({
                threads.push(writer);
                threads
            }),
            prewriter,
            maintenance: Mutex::new(Some(maintenance)),
            report,
            dir_lock: Mutex::new(Some(lock)),
        })
    }

    /// What opening the store found (torn tail cut, index rebuilt, repair done).
    pub fn recovery_report(&self) -> &RecoveryReport {
        &self.report
    }

    fn send(&self, cmd: Command) -> Result<(), AppendError> {
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        tx.as_ref()
            .ok_or(AppendError::Closed)?
            .send(cmd)
            .map_err(|_| AppendError::Closed)
    }

    /// Appends records, all or nothing, and completes once they are acknowledged: after an
    /// fdatasync that covers them in sync mode, after the write in async mode. Records of one
    /// call are stored contiguously, in order, in one segment.
    ///
    /// # Cancel safety
    /// Dropping the future does not withdraw the records: they may still be stored.
    ///
    /// # Errors
    /// See [`AppendError`]. On error no record of this call is acknowledged or visible.
    pub async fn append(&self, records: Vec<RecordData>) -> Result<Vec<Appended>, AppendError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.send(Command::Append(records, reply))?;
        rx.await.map_err(|_| AppendError::Closed)?
    }

    /// [`Store::append`] for threads outside an async runtime.
    ///
    /// # Errors
    /// As [`Store::append`].
    ///
    /// # Panics
    /// If called from within an async runtime.
    pub fn append_blocking(&self, records: Vec<RecordData>) -> Result<Vec<Appended>, AppendError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.send(Command::Append(records, reply))?;
        rx.blocking_recv().map_err(|_| AppendError::Closed)?
    }

    /// Makes everything acknowledged so far durable (a no-op in sync mode).
    ///
    /// # Errors
    /// If the sync fails (the store is then poisoned) or the store is closed.
    pub fn sync_blocking(&self) -> Result<(), AppendError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.send(Command::Sync(reply))?;
        rx.blocking_recv().map_err(|_| AppendError::Closed)?
    }

    /// Reads the record at a log position.
    ///
    /// # Errors
    /// `NotFound` past the end, `Expired` before the start, `Corrupt` on a checksum failure.
    pub fn read(&self, position: u64) -> Result<Record, ReadError> {
        self.shared.log.read(position, self.committed())
    }

    /// Reads consecutive records of the log from `position`: at most `max_records`, stopping
    /// once `max_bytes` of bodies were read. Returns them and the position to continue from.
    ///
    /// # Errors
    /// As [`Store::read`].
    pub fn read_log(
        &self,
        position: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<(Vec<Record>, u64), ReadError> {
        let start = self.shared.log.start();
        if position < start {
            return Err(ReadError::Expired(format!("log position {position}")));
        }
        self.shared
            .log
            .read_from(position, self.committed(), max_records, max_bytes)
    }

    /// Index entries of a queue from `offset`, at most `max`; empty past the end.
    ///
    /// # Errors
    /// `Expired` if `offset` was removed by retention, `NotFound` for an unknown queue.
    pub fn index_entries(
        &self,
        topic: &str,
        queue_id: u32,
        offset: u64,
        max: usize,
    ) -> Result<Vec<IndexEntry>, ReadError> {
        let q = self
            .shared
            .queue(topic, queue_id)
            .ok_or_else(|| ReadError::NotFound(format!("queue {topic}/{queue_id}")))?;
        if offset < q.min() {
            return Err(ReadError::Expired(format!(
                "{topic}/{queue_id} offset {offset}"
            )));
        }
        let next = q.next();
        if offset >= next {
            return Ok(Vec::new());
        }
        let max = max.min((next - offset) as usize);
        let entries = q.read_many(offset, max).map_err(|e| ReadError::Io {
            path: q.dir.clone(),
            cause: e,
        })?;
        if entries.len() < max {
            return Err(ReadError::Corrupt {
                file: q.dir.clone(),
                offset: offset + entries.len() as u64,
                reason: "queue index entry missing or damaged".into(),
            });
        }
        Ok(entries)
    }

    /// Records of a queue from `offset`, at most `max`, in offset order; empty past the end.
    ///
    /// # Errors
    /// As [`Store::index_entries`], and `Corrupt` if the index and the log disagree.
    pub fn read_queue(
        &self,
        topic: &str,
        queue_id: u32,
        offset: u64,
        max: usize,
    ) -> Result<Vec<Record>, ReadError> {
        let entries = self.index_entries(topic, queue_id, offset, max)?;
        let end = self.committed();
        let mut out = Vec::with_capacity(entries.len());
        for (i, e) in entries.iter().enumerate() {
            let rec = self.shared.log.read(e.position, end)?;
            let want = offset + i as u64;
            if rec.data.topic != topic || rec.data.queue_id != queue_id || rec.queue_offset != want
            {
                return Err(ReadError::Corrupt {
                    file: self.shared.index_dir.clone(),
                    offset: want,
                    reason: format!(
                        "index entry for {topic}/{queue_id}@{want} points at another record"
                    ),
                });
            }
            out.push(rec);
        }
        Ok(out)
    }

    /// The offsets a queue holds: `min..next`. `None` for a queue never written.
    pub fn queue_range(&self, topic: &str, queue_id: u32) -> Option<Range<u64>> {
        self.shared
            .queue(topic, queue_id)
            .map(|q| q.min()..q.next())
    }

    /// Every queue the store holds.
    pub fn queues(&self) -> Vec<(String, u32)> {
        let mut out: Vec<_> = self.shared.all_queues().iter().map(|q| q.key()).collect();
        out.sort();
        out
    }

    /// Positions of the log kept: from the oldest record to the end of the last acknowledged one.
    pub fn log_range(&self) -> Range<u64> {
        self.shared.log.start()..self.committed()
    }

    fn committed(&self) -> u64 {
        self.shared.committed.load(Ordering::Acquire)
    }

    /// Syncs the queue index and writes a checkpoint now (it also happens every
    /// `checkpoint_interval`).
    ///
    /// # Errors
    /// I/O failures, or a poisoned or closed store.
    pub fn checkpoint(&self) -> Result<(), MaintenanceError> {
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let tx = tx.ok_or(AppendError::Closed)?;
        maintenance::checkpoint(&self.shared, &tx, false)
    }

    /// Declares that `owner` still needs every record at or after `position` (`None` lifts
    /// the floor). Retention never deletes a segment that reaches past a floor.
    pub fn set_retention_floor(&self, owner: &str, position: Option<u64>) {
        let mut floors = self.shared.floors.lock().unwrap_or_else(|e| e.into_inner());
        match position {
            Some(p) => floors.insert(owner.to_string(), p),
            None => floors.remove(owner),
        };
    }

    /// Applies the retention rule now.
    ///
    /// # Errors
    /// I/O failures while deleting.
    pub fn apply_retention(&self) -> Result<RetentionReport, MaintenanceError> {
        self.apply_retention_at(now_ms())
    }

    /// Applies the retention rule as if the time were `now_ms`.
    ///
    /// # Errors
    /// I/O failures while deleting.
    pub fn apply_retention_at(&self, now_ms: i64) -> Result<RetentionReport, MaintenanceError> {
        retention::apply(&self.shared, now_ms)
    }

    /// Counters of the write path since the store was opened.
    pub fn stats(&self) -> StoreStats {
        let c = &self.shared.counters;
        StoreStats {
            records: c.records.load(Ordering::Relaxed),
            group_commits: c.group_commits.load(Ordering::Relaxed),
            bytes_written: c.bytes_written.load(Ordering::Relaxed),
            syncs: c.syncs.load(Ordering::Relaxed),
            sync_micros: c.sync_micros.load(Ordering::Relaxed),
        }
    }

    /// The store's atomically replaced state files (in `DIR/state`). The names `checkpoint`
    /// and `queue-floors` are the store's own.
    pub fn state_files(&self) -> &StateFiles {
        &self.shared.state
    }

    /// Why the store refuses appends, if it does.
    pub fn poisoned(&self) -> Option<String> {
        self.shared.poison_reason()
    }

    /// Stops the background work, syncs everything, writes a final checkpoint and stops the
    /// writer. Later appends fail with [`AppendError::Closed`]. Idempotent.
    ///
    /// # Errors
    /// If the final sync fails; acknowledged records are still safe in the log.
    pub fn close(&self) -> Result<(), AppendError> {
        if let Some(m) = self
            .maintenance
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            m.stop();
        }
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(tx) = tx else { return Ok(()) };
        if self.shared.poison_reason().is_none()
            && let Err(e) = maintenance::checkpoint(&self.shared, &tx, true)
        {
            tracing::warn!(error = %e, "final checkpoint failed; the next open rescans more of the log");
        }
        let (reply, rx) = mpsc::channel();
        let result = match tx.send(Command::Shutdown(reply)) {
            Ok(()) => rx.recv().unwrap_or(Err(AppendError::Closed)),
            Err(_) => Err(AppendError::Closed),
        };
        drop(tx);
        if let Some(p) = &self.prewriter {
            p.stop();
        }
        for h in std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner())) {
            let _ = h.join();
        }
        self.dir_lock
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        result
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        let _ = self.close();
    }
}
