//! The writer thread: stages requests, assigns positions and queue offsets, writes groups.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, mpsc};

use tokio::sync::oneshot;

use super::{Command, Group, Handoff, Pending, Prewriter};
use crate::commit_log::{SEGMENT_HEADER_LEN, Segment};
use crate::error::AppendError;
use crate::io::is_disk_full;
use crate::queue_index::{IndexEntry, IndexFile, QueueIndex, QueueKey};
use crate::record::{self, Assigned, RecordData};
use crate::{Appended, Counters, Shared};

struct QueueState {
    index: Arc<QueueIndex>,
    next: u64,
}

pub(crate) struct Writer {
    shared: Arc<Shared>,
    active: Arc<Segment>,
    /// Position of the next record.
    write_pos: u64,
    queues: HashMap<QueueKey, QueueState>,
    /// Staged records not yet written, starting at `buf_start`.
    buf: Vec<u8>,
    buf_start: u64,
    pending: Vec<Pending>,
    /// Each queue's next offset before the staged records, to undo a failed write.
    undo: HashMap<QueueKey, u64>,
    entries: Vec<(QueueKey, u64, IndexEntry)>,
    new_dirs: BTreeSet<PathBuf>,
    syncer: mpsc::Sender<Handoff>,
    prewriter: Option<Arc<Prewriter>>,
}

impl Writer {
    pub fn new(
        shared: Arc<Shared>,
        active: Arc<Segment>,
        write_pos: u64,
        queues: Vec<(Arc<QueueIndex>, u64)>,
        syncer: mpsc::Sender<Handoff>,
        prewriter: Option<Arc<Prewriter>>,
    ) -> Self {
        let queues = queues
            .into_iter()
            .map(|(index, next)| (index.key(), QueueState { index, next }))
            .collect();
        Self {
            shared,
            active,
            write_pos,
            queues,
            buf: Vec::with_capacity(1 << 20),
            buf_start: write_pos,
            pending: Vec::new(),
            undo: HashMap::new(),
            entries: Vec::new(),
            new_dirs: BTreeSet::new(),
            syncer,
            prewriter,
        }
    }

    /// The writer thread's loop; returns when told to shut down or when every sender is gone.
    pub fn run(mut self, rx: mpsc::Receiver<Command>) {
        while let Ok(first) = rx.recv() {
            let mut control = Vec::new();
            let mut next = Some(first);
            while let Some(cmd) = next {
                match cmd {
                    Command::Append(records, reply) => self.stage(records, reply),
                    other => control.push(other),
                }
                next = rx.try_recv().ok();
            }
            self.write();
            for cmd in control {
                let stop = matches!(cmd, Command::Shutdown(_));
                // The syncer answers control commands once every earlier group is done.
                let _ = self.syncer.send(Handoff::Control(cmd));
                if stop {
                    return;
                }
            }
        }
        self.write();
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
                    self.write();
                }
            }
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    }

    fn try_stage(&mut self, records: Vec<RecordData>) -> Result<Vec<Appended>, AppendError> {
        if let Some(reason) = self.shared.poison_reason() {
            return Err(AppendError::Poisoned(reason));
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
            self.write();
            self.roll()?;
        }
        self.prepare_index(&records)?;
        let store_timestamp = crate::now_ms();
        let synced_upto = self.shared.durable.load(Ordering::Acquire);
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
                synced_upto,
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
                // The file's directory, and those above it up to index/, gained entries that
                // the next checkpoint must make durable.
                for dir in path.ancestors().skip(1) {
                    if !dir.starts_with(&shared.index_dir) {
                        break;
                    }
                    self.new_dirs.insert(dir.to_path_buf());
                }
            }
        }
        Ok(())
    }

    /// Writes the staged buffer and hands it to the syncer.
    fn write(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let pending = std::mem::take(&mut self.pending);
        let offset = self.buf_start - self.active.base;
        if let Some(p) = &self.prewriter {
            p.claim(offset, offset + self.buf.len() as u64);
        }
        if let Err(e) = self.active.file.write_all_at(&self.buf, offset) {
            self.rewind();
            let err = map_io("cannot write to the commit log", &e);
            tracing::warn!(error = %err, "append failed");
            for p in pending {
                let _ = p.reply.send(Err(err.clone()));
            }
            return;
        }
        let bytes = self.buf.len() as u64;
        Counters::add(&self.shared.counters.bytes_written, bytes);
        self.buf.clear();
        self.buf_start = self.write_pos;
        self.undo.clear();
        let mut per_queue: Vec<(Arc<QueueIndex>, u64, Vec<IndexEntry>)> = Vec::new();
        let mut slot: HashMap<QueueKey, usize> = HashMap::new();
        for (key, offset, entry) in self.entries.drain(..) {
            let i = *slot.entry(key).or_insert_with_key(|key| {
                let index = self.queues.get(key).map(|q| q.index.clone());
                per_queue.push((
                    index.unwrap_or_else(|| self.shared.queue_or_create(&key.0, key.1)),
                    offset,
                    Vec::new(),
                ));
                per_queue.len() - 1
            });
            per_queue[i].2.push(entry);
        }
        // The index entries are written here, while the syncer may still be waiting for the
        // previous group's fdatasync, rather than after this group's. Readers cannot see
        // them yet: they read a queue only below its next offset, which the syncer
        // publishes once the group is durable. After a crash, entries of records that never
        // became durable lie beyond the recovered next offset and are overwritten before
        // that offset passes them.
        let mut dirty: Vec<Arc<IndexFile>> = Vec::new();
        let mut index_error = None;
        for (q, first, entries) in &per_queue {
            match q.write(*first, entries) {
                Ok(files) => {
                    for f in files {
                        if !dirty.iter().any(|d| Arc::ptr_eq(d, &f)) {
                            dirty.push(f);
                        }
                    }
                }
                Err(e) => {
                    index_error.get_or_insert_with(|| {
                        format!(
                            "queue index write for {}/{} failed: {e}",
                            q.topic, q.queue_id
                        )
                    });
                }
            }
        }
        let group = Group {
            segment: self.active.clone(),
            end: self.write_pos,
            bytes,
            pending,
            entries: per_queue
                .into_iter()
                .map(|(q, first, entries)| (q, first + entries.len() as u64))
                .collect(),
            dirty,
            index_error,
            new_dirs: std::mem::take(&mut self.new_dirs).into_iter().collect(),
        };
        if let Err(mpsc::SendError(Handoff::Written(g))) = self.syncer.send(Handoff::Written(group))
        {
            for p in g.pending {
                let _ = p.reply.send(Err(AppendError::Closed));
            }
        }
    }

    /// Undoes the staged buffer after its write failed, as if it had never been staged.
    fn rewind(&mut self) {
        for (key, next) in self.undo.drain() {
            if let Some(q) = self.queues.get_mut(&key) {
                q.next = next;
            }
        }
        self.write_pos = self.buf_start;
        self.buf.clear();
        self.entries.clear();
        // Bytes of the refused write may have landed; cut them so that no record of it can
        // be found by a later recovery. Truncation frees space, so it works on a full disk;
        // if it fails we can no longer vouch for the tail.
        let cut = self.buf_start - self.active.base;
        if let Some(p) = &self.prewriter {
            p.reset(self.active.clone(), cut);
        }
        if let Err(e) = self.active.file.set_len(cut) {
            self.shared.poison(format!(
                "cannot cut a failed write from {}: {e}",
                self.active.path.display()
            ));
        } else if self.shared.config.preallocate {
            // Best effort: without the reservation, later writes extend the file.
            let _ = self.active.file.allocate(self.active.capacity);
        }
    }

    /// Seals the active segment (synced in full) and starts the next one.
    fn roll(&mut self) -> Result<(), AppendError> {
        let shared = self.shared.clone();
        if let Err(e) = super::syncer::timed_sync(&shared, &self.active) {
            let reason = shared.poison(format!(
                "fdatasync of {} failed: {e}",
                self.active.path.display()
            ));
            return Err(AppendError::Poisoned(reason));
        }
        // The syncer's fdatasync of this segment may have failed meanwhile: the kernel then
        // reported the lost write-back to it, not to the sync above, which proves nothing.
        if let Some(reason) = shared.poison_reason() {
            return Err(AppendError::Poisoned(reason));
        }
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
        if let Some(p) = &self.prewriter {
            p.reset(seg.clone(), SEGMENT_HEADER_LEN as u64);
        }
        self.active = seg;
        self.write_pos = self.active.first_record();
        self.buf_start = self.write_pos;
        // Everything before the new segment is durable.
        shared.durable.fetch_max(self.write_pos, Ordering::AcqRel);
        Ok(())
    }
}

fn map_io(what: &str, e: &std::io::Error) -> AppendError {
    if is_disk_full(e) {
        AppendError::DiskFull(format!("{what}: {e}"))
    } else {
        AppendError::Io(format!("{what}: {e}"))
    }
}
