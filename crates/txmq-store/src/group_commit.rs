//! Where records are appended: the single writer thread and its group commit.
//!
//! Appenders send requests over a channel. The writer takes every request waiting, encodes
//! them into one buffer (assigning positions and queue offsets), writes it with one
//! `pwrite`, makes it durable with one `fdatasync` (in sync mode), writes the queue-index
//! entries, publishes the new end to readers, and only then answers the appenders. A request
//! is all-or-nothing: it is answered `Ok` only if every one of its records was written (and
//! synced), and an error leaves no record of it visible.
//!
//! Invariants:
//! - every segment but the last is fully synced before the next one is created;
//! - each record carries `synced_upto`, the log position durable when it was written, which
//!   lets recovery tell a torn tail from damage to acknowledged data;
//! - after a failed fdatasync the store is poisoned and nothing more is acknowledged.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::checkpoint::Checkpoint;
use crate::commit_log::{SEGMENT_HEADER_LEN, Segment};
use crate::config::Durability;
use crate::error::AppendError;
use crate::io::is_disk_full;
use crate::queue_index::{IndexEntry, IndexFile, QueueIndex, QueueKey};
use crate::record::{self, Assigned, RecordData};
use crate::{Appended, Shared};

/// A request to the writer.
pub(crate) enum Command {
    Append(
        Vec<RecordData>,
        oneshot::Sender<Result<Vec<Appended>, AppendError>>,
    ),
    /// Flush, sync, and report what a checkpoint needs.
    Snapshot(mpsc::Sender<Result<Snapshot, AppendError>>),
    /// Flush and sync everything written so far.
    Sync(oneshot::Sender<Result<(), AppendError>>),
    /// Flush, sync and stop.
    Shutdown(mpsc::Sender<Result<(), AppendError>>),
}

/// A consistent cut for a checkpoint: the log below `checkpoint.position` is synced and the
/// index entries listed by it are written; `dirty` files must be synced before the
/// checkpoint is written, and `new_dirs` directories too (they gained files).
pub(crate) struct Snapshot {
    pub checkpoint: Checkpoint,
    pub dirty: Vec<Arc<IndexFile>>,
    pub new_dirs: Vec<PathBuf>,
}

struct QueueState {
    index: Arc<QueueIndex>,
    next: u64,
}

struct Pending {
    reply: oneshot::Sender<Result<Vec<Appended>, AppendError>>,
    results: Vec<Appended>,
}

pub(crate) struct Writer {
    shared: Arc<Shared>,
    active: Arc<Segment>,
    /// Position of the next record.
    write_pos: u64,
    /// Everything below this is durable.
    synced: u64,
    /// Bytes written but not synced, and since when (async mode).
    unsynced_bytes: u64,
    unsynced_since: Option<Instant>,
    queues: HashMap<QueueKey, QueueState>,
    /// Staged records not yet written, starting at `buf_start`.
    buf: Vec<u8>,
    buf_start: u64,
    pending: Vec<Pending>,
    /// Each queue's next offset before the staged records, to undo a failed write.
    undo: HashMap<QueueKey, u64>,
    entries: Vec<(QueueKey, u64, IndexEntry)>,
    dirty: HashMap<PathBuf, Arc<IndexFile>>,
    new_dirs: BTreeSet<PathBuf>,
}

impl Writer {
    pub fn new(
        shared: Arc<Shared>,
        active: Arc<Segment>,
        write_pos: u64,
        queues: Vec<(Arc<QueueIndex>, u64)>,
    ) -> Self {
        let queues = queues
            .into_iter()
            .map(|(index, next)| (index.key(), QueueState { index, next }))
            .collect();
        Self {
            shared,
            active,
            write_pos,
            synced: write_pos,
            unsynced_bytes: 0,
            unsynced_since: None,
            queues,
            buf: Vec::with_capacity(1 << 20),
            buf_start: write_pos,
            pending: Vec::new(),
            undo: HashMap::new(),
            entries: Vec::new(),
            dirty: HashMap::new(),
            new_dirs: BTreeSet::new(),
        }
    }

    fn async_interval(&self) -> Option<(Duration, u64)> {
        match self.shared.config.durability {
            Durability::Sync => None,
            Durability::Async {
                interval,
                max_unsynced_bytes,
            } => Some((interval, max_unsynced_bytes)),
        }
    }

    /// The writer thread's loop; returns when told to shut down or when every sender is gone.
    pub fn run(mut self, rx: Receiver<Command>) {
        loop {
            let deadline = self
                .async_interval()
                .zip(self.unsynced_since)
                .map(|((interval, _), since)| interval.saturating_sub(since.elapsed()));
            let first = match deadline {
                Some(wait) => match rx.recv_timeout(wait) {
                    Ok(c) => c,
                    Err(RecvTimeoutError::Timeout) => {
                        let _ = self.sync();
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => break,
                },
                None => match rx.recv() {
                    Ok(c) => c,
                    Err(_) => break,
                },
            };
            let mut control = Vec::new();
            let mut next = Some(first);
            while let Some(cmd) = next {
                match cmd {
                    Command::Append(records, reply) => self.stage(records, reply),
                    other => control.push(other),
                }
                next = rx.try_recv().ok();
            }
            self.flush();
            for cmd in control {
                match cmd {
                    Command::Append(..) => unreachable!("appends are staged above"),
                    Command::Snapshot(reply) => {
                        let _ = reply.send(self.snapshot());
                    }
                    Command::Sync(reply) => {
                        let _ = reply.send(self.sync());
                    }
                    Command::Shutdown(reply) => {
                        let _ = reply.send(self.sync());
                        return;
                    }
                }
            }
            if let Some((interval, _)) = self.async_interval()
                && self.unsynced_since.is_some_and(|t| t.elapsed() >= interval)
            {
                let _ = self.sync();
            }
        }
        self.flush();
        let _ = self.sync();
    }

    fn poisoned(&self) -> Option<AppendError> {
        self.shared.poison_reason().map(AppendError::Poisoned)
    }

    /// Validates a request and adds its records to the staged buffer.
    fn stage(
        &mut self,
        records: Vec<RecordData>,
        reply: oneshot::Sender<Result<Vec<Appended>, AppendError>>,
    ) {
        match self.try_stage(records) {
            Ok(results) => {
                self.pending.push(Pending { reply, results });
                if self.buf.len() >= self.shared.config.max_batch_bytes {
                    self.flush();
                }
            }
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    }

    fn try_stage(&mut self, records: Vec<RecordData>) -> Result<Vec<Appended>, AppendError> {
        if let Some(e) = self.poisoned() {
            return Err(e);
        }
        let cfg = &self.shared.config;
        let mut total = 0u64;
        for r in &records {
            r.validate().map_err(AppendError::Invalid)?;
            let size = r.encoded_len();
            if size > cfg.max_record_size {
                return Err(AppendError::TooLarge {
                    size,
                    max: cfg.max_record_size,
                });
            }
            total += size as u64;
        }
        let room = cfg.segment_size - SEGMENT_HEADER_LEN as u64;
        if total > room {
            return Err(AppendError::Invalid(format!(
                "a batch of {total} bytes does not fit in one {room}-byte segment"
            )));
        }
        if self.write_pos + total > self.active.end() {
            self.flush();
            self.roll()?;
        }
        self.prepare_index(&records)?;
        let store_timestamp = crate::now_ms();
        let mut results = Vec::with_capacity(records.len());
        for r in &records {
            let key = (r.topic.clone(), r.queue_id);
            let q = self
                .queues
                .get_mut(&key)
                .ok_or_else(|| AppendError::Io("queue vanished".into()))?;
            self.undo.entry(key.clone()).or_insert(q.next);
            let at = Assigned {
                position: self.write_pos,
                synced_upto: self.synced,
                queue_offset: q.next,
                store_timestamp,
            };
            let before = self.buf.len();
            record::encode_into(&mut self.buf, r, at);
            let entry = IndexEntry {
                position: at.position,
                size: r.framed_len() as u32,
                tag_hash: r.tag_hash(),
                store_timestamp,
                kind: r.kind as u8,
            };
            self.entries.push((key, q.next, entry));
            results.push(Appended {
                position: at.position,
                queue_offset: q.next,
                store_timestamp,
            });
            q.next += 1;
            self.write_pos += (self.buf.len() - before) as u64;
        }
        Ok(results)
    }

    /// Creates the queues and index files the records need, before anything is written, so
    /// that running out of space there fails the request cleanly.
    fn prepare_index(&mut self, records: &[RecordData]) -> Result<(), AppendError> {
        let shared = self.shared.clone();
        let mut extra: HashMap<QueueKey, u64> = HashMap::new();
        for r in records {
            let key = (r.topic.clone(), r.queue_id);
            let q = self.queues.entry(key.clone()).or_insert_with(|| {
                let index = shared.queue_or_create(&key.0, key.1);
                QueueState {
                    next: index.next(),
                    index,
                }
            });
            let n = extra.entry(key).or_insert(0);
            let offset = q.next + *n;
            *n += 1;
            let created = q
                .index
                .prepare(&*shared.io, offset, shared.config.index_entries_per_file)
                .map_err(|e| map_io("cannot create queue index file", &e))?;
            if let Some(path) = created {
                // The file's directory, and the directories above it up to index/, gained
                // entries that the next checkpoint must make durable.
                let mut dir = path.parent().map(PathBuf::from);
                while let Some(d) = dir {
                    if !d.starts_with(&shared.index_dir) {
                        break;
                    }
                    self.new_dirs.insert(d.clone());
                    dir = d.parent().map(PathBuf::from);
                }
            }
        }
        Ok(())
    }

    /// Writes the staged buffer, syncs it (sync mode), writes its index entries, publishes,
    /// and answers its appenders.
    fn flush(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let pending = std::mem::take(&mut self.pending);
        let offset = self.buf_start - self.active.base;
        if let Err(e) = self.active.file.write_all_at(&self.buf, offset) {
            // Nothing of this buffer was acknowledged: rewind as if it had never been staged.
            // Partly written bytes past `write_pos` are overwritten by the next write, and
            // recovery treats any left at the tail as torn.
            for (key, next) in self.undo.drain() {
                if let Some(q) = self.queues.get_mut(&key) {
                    q.next = next;
                }
            }
            self.write_pos = self.buf_start;
            self.buf.clear();
            self.entries.clear();
            // Bytes of the refused write may have landed; cut them so that no record of it
            // can be found by a later recovery. Truncation frees space, so it works on a
            // full disk; if it fails we can no longer vouch for the tail.
            let cut = self.buf_start - self.active.base;
            if let Err(te) = self.active.file.set_len(cut) {
                self.shared.poison(format!(
                    "cannot cut a failed write from {}: {te}",
                    self.active.path.display()
                ));
            } else if self.shared.config.preallocate {
                // Best effort: without the reservation, later writes extend the file.
                let _ = self.active.file.allocate(self.active.capacity);
            }
            let err = map_io("cannot write to the commit log", &e);
            tracing::warn!(error = %err, "append failed");
            for p in pending {
                let _ = p.reply.send(Err(err.clone()));
            }
            return;
        }
        let written = self.buf.len() as u64;
        self.buf.clear();
        self.buf_start = self.write_pos;
        match self.async_interval() {
            None => {
                if let Err(e) = self.active.file.sync_data() {
                    let reason = self.shared.poison(format!(
                        "fdatasync of {} failed: {e}",
                        self.active.path.display()
                    ));
                    self.entries.clear();
                    self.undo.clear();
                    for p in pending {
                        let _ = p.reply.send(Err(AppendError::Poisoned(reason.clone())));
                    }
                    return;
                }
                self.synced = self.write_pos;
            }
            Some(_) => {
                self.unsynced_bytes += written;
                self.unsynced_since.get_or_insert_with(Instant::now);
            }
        }
        self.write_index();
        self.shared
            .committed
            .store(self.write_pos, Ordering::Release);
        for key in std::mem::take(&mut self.undo).into_keys() {
            if let Some(q) = self.queues.get(&key) {
                q.index.next_offset.store(q.next, Ordering::Release);
            }
        }
        for p in pending {
            let _ = p.reply.send(Ok(p.results));
        }
        if let Some((_, max_unsynced)) = self.async_interval()
            && self.unsynced_bytes >= max_unsynced
        {
            let _ = self.sync();
        }
    }

    /// Writes the staged index entries, one write per run of consecutive offsets.
    fn write_index(&mut self) {
        let entries = std::mem::take(&mut self.entries);
        let mut by_queue: HashMap<&QueueKey, (u64, Vec<IndexEntry>)> = HashMap::new();
        for (key, offset, entry) in &entries {
            let run = by_queue.entry(key).or_insert_with(|| (*offset, Vec::new()));
            run.1.push(*entry);
        }
        for (key, (first, run)) in by_queue {
            let Some(q) = self.queues.get(key) else {
                continue;
            };
            match q.index.write(first, &run) {
                Ok(files) => {
                    for f in files {
                        self.dirty.entry(f.path.clone()).or_insert(f);
                    }
                }
                Err(e) => {
                    // The records are in the log (and synced, in sync mode), so they were
                    // acknowledged; the index is rebuilt from the log on the next open.
                    self.shared.poison(format!(
                        "queue index write for {}/{} failed: {e}",
                        key.0, key.1
                    ));
                }
            }
        }
    }

    /// Makes everything written durable (async mode; in sync mode it already is).
    fn sync(&mut self) -> Result<(), AppendError> {
        if let Some(e) = self.poisoned() {
            return Err(e);
        }
        if self.synced == self.write_pos {
            return Ok(());
        }
        if let Err(e) = self.active.file.sync_data() {
            let reason = self.shared.poison(format!(
                "fdatasync of {} failed: {e}",
                self.active.path.display()
            ));
            return Err(AppendError::Poisoned(reason));
        }
        self.synced = self.write_pos;
        self.unsynced_bytes = 0;
        self.unsynced_since = None;
        Ok(())
    }

    /// Seals the active segment and starts the next one.
    fn roll(&mut self) -> Result<(), AppendError> {
        self.sync()?;
        let shared = &self.shared;
        let base = self.active.end();
        let seg = Segment::create(
            &*shared.io,
            &shared.log.dir,
            base,
            shared.config.segment_size,
            shared.config.preallocate,
        )
        .map_err(|e| map_io("cannot create a new log segment", &e))?;
        let seg = Arc::new(seg);
        shared.log.insert(seg.clone());
        tracing::debug!(base, "rolled to a new log segment");
        self.active = seg;
        self.write_pos = self.active.first_record();
        self.buf_start = self.write_pos;
        self.synced = self.write_pos;
        Ok(())
    }

    fn snapshot(&mut self) -> Result<Snapshot, AppendError> {
        self.sync()?;
        let queues = self
            .queues
            .iter()
            .map(|(k, q)| (k.clone(), q.next))
            .collect();
        Ok(Snapshot {
            checkpoint: Checkpoint {
                position: self.write_pos,
                queues,
            },
            dirty: self.dirty.drain().map(|(_, f)| f).collect(),
            new_dirs: std::mem::take(&mut self.new_dirs).into_iter().collect(),
        })
    }
}

fn map_io(what: &str, e: &std::io::Error) -> AppendError {
    if is_disk_full(e) {
        AppendError::DiskFull(format!("{what}: {e}"))
    } else {
        AppendError::Io(format!("{what}: {e}"))
    }
}
