//! The syncer thread: makes written groups durable, indexes and publishes them, answers.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use super::{Command, Group, Handoff, Snapshot};
use crate::checkpoint::{Checkpoint, QueueMark};
use crate::commit_log::Segment;
use crate::config::Durability;
use crate::error::AppendError;
use crate::queue_index::IndexFile;
use crate::{Counters, Shared};

/// fdatasync of a segment, counted and timed.
pub(crate) fn timed_sync(shared: &Shared, seg: &Segment) -> std::io::Result<()> {
    let started = Instant::now();
    let result = seg.file.sync_data();
    let c = &shared.counters;
    Counters::add(&c.syncs, 1);
    Counters::add(&c.sync_micros, started.elapsed().as_micros() as u64);
    result
}

pub(crate) struct Syncer {
    shared: Arc<Shared>,
    /// Readers see the log below this; everything below it is written.
    published: u64,
    /// Async mode: the segment last written to, bytes not yet synced, and since when.
    last_segment: Option<Arc<Segment>>,
    unsynced_bytes: u64,
    unsynced_since: Option<Instant>,
    dirty: HashMap<PathBuf, Arc<IndexFile>>,
    new_dirs: BTreeSet<PathBuf>,
}

impl Syncer {
    pub fn new(shared: Arc<Shared>, published: u64) -> Self {
        Self {
            shared,
            published,
            last_segment: None,
            unsynced_bytes: 0,
            unsynced_since: None,
            dirty: HashMap::new(),
            new_dirs: BTreeSet::new(),
        }
    }

    fn async_mode(&self) -> Option<(Duration, u64)> {
        match self.shared.config.durability {
            Durability::Sync => None,
            Durability::Async {
                interval,
                max_unsynced_bytes,
            } => Some((interval, max_unsynced_bytes)),
        }
    }

    pub fn run(mut self, rx: mpsc::Receiver<Handoff>) {
        loop {
            let wait = self
                .async_mode()
                .zip(self.unsynced_since)
                .map(|((interval, _), since)| interval.saturating_sub(since.elapsed()));
            let first = match wait {
                Some(wait) => match rx.recv_timeout(wait) {
                    Ok(h) => h,
                    Err(RecvTimeoutError::Timeout) => {
                        let _ = self.sync_async();
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => break,
                },
                None => match rx.recv() {
                    Ok(h) => h,
                    Err(_) => break,
                },
            };
            let mut groups = Vec::new();
            let mut next = Some(first);
            while let Some(h) = next {
                match h {
                    Handoff::Written(g) => groups.push(g),
                    Handoff::Control(cmd) => {
                        self.commit(std::mem::take(&mut groups));
                        if self.control(cmd) {
                            return;
                        }
                    }
                }
                next = rx.try_recv().ok();
            }
            self.commit(groups);
            if let Some((interval, _)) = self.async_mode()
                && self.unsynced_since.is_some_and(|t| t.elapsed() >= interval)
            {
                let _ = self.sync_async();
            }
        }
        let _ = self.sync_async();
    }

    /// Makes the groups durable with one fdatasync per segment (sync mode), then indexes,
    /// publishes and acknowledges them in order.
    fn commit(&mut self, groups: Vec<Group>) {
        let Some(last) = groups.last() else { return };
        let refuse = |groups: Vec<Group>, reason: String| {
            for g in groups {
                for p in g.pending {
                    let _ = p.reply.send(Err(AppendError::Poisoned(reason.clone())));
                }
            }
        };
        if let Some(reason) = self.shared.poison_reason() {
            return refuse(groups, reason);
        }
        Counters::add(&self.shared.counters.group_commits, 1);
        match self.async_mode() {
            None => {
                let mut synced = BTreeSet::new();
                for g in &groups {
                    if synced.insert(g.segment.base)
                        && let Err(e) = timed_sync(&self.shared, &g.segment)
                    {
                        let reason = self.shared.poison(format!(
                            "fdatasync of {} failed: {e}",
                            g.segment.path.display()
                        ));
                        return refuse(groups, reason);
                    }
                }
                self.shared.durable.fetch_max(last.end, Ordering::AcqRel);
            }
            Some(_) => {
                self.last_segment = Some(last.segment.clone());
                self.unsynced_bytes += groups.iter().map(|g| g.bytes).sum::<u64>();
                self.unsynced_since.get_or_insert_with(Instant::now);
            }
        }
        for g in groups {
            for f in g.dirty {
                self.dirty.entry(f.path.clone()).or_insert(f);
            }
            self.new_dirs.extend(g.new_dirs);
            self.published = g.end;
            self.shared.committed.store(g.end, Ordering::Release);
            for (q, next) in &g.entries {
                q.next_offset.store(*next, Ordering::Release);
            }
            if let Some(reason) = g.index_error {
                // The records are in the log (and synced, in sync mode), so they are
                // acknowledged; the index is rebuilt from the log on the next open.
                self.shared.poison(reason);
            }
            for p in g.pending {
                Counters::add(&self.shared.counters.records, p.results.len() as u64);
                let _ = p.reply.send(Ok(p.results));
            }
        }
        if let Some((_, max_unsynced)) = self.async_mode()
            && self.unsynced_bytes >= max_unsynced
        {
            let _ = self.sync_async();
        }
    }

    /// Syncs what async mode left un-synced.
    fn sync_async(&mut self) -> Result<(), AppendError> {
        if let Some(reason) = self.shared.poison_reason() {
            return Err(AppendError::Poisoned(reason));
        }
        if self.unsynced_since.is_none() {
            return Ok(());
        }
        if let Some(seg) = &self.last_segment
            && let Err(e) = timed_sync(&self.shared, seg)
        {
            let reason = self
                .shared
                .poison(format!("fdatasync of {} failed: {e}", seg.path.display()));
            return Err(AppendError::Poisoned(reason));
        }
        self.shared
            .durable
            .fetch_max(self.published, Ordering::AcqRel);
        self.unsynced_bytes = 0;
        self.unsynced_since = None;
        Ok(())
    }

    /// Answers a control command; returns whether to stop.
    fn control(&mut self, cmd: Command) -> bool {
        match cmd {
            Command::Append(_, reply) => {
                let _ = reply.send(Err(AppendError::Io("append routed to the syncer".into())));
            }
            Command::Snapshot(reply) => {
                let _ = reply.send(self.snapshot());
            }
            Command::Sync(reply) => {
                let _ = reply.send(self.sync_async());
            }
            Command::Shutdown(reply) => {
                let _ = reply.send(self.sync_async());
                return true;
            }
        }
        false
    }

    fn snapshot(&mut self) -> Result<Snapshot, AppendError> {
        self.sync_async()?;
        let queues = self
            .shared
            .all_queues()
            .iter()
            .map(|q| {
                let next = q.next();
                (
                    q.key(),
                    QueueMark {
                        next,
                        min: q.min().min(next),
                    },
                )
            })
            .collect();
        Ok(Snapshot {
            checkpoint: Checkpoint {
                position: self.published,
                clean: false,
                queues,
            },
            dirty: self.dirty.drain().map(|(_, f)| f).collect(),
            new_dirs: std::mem::take(&mut self.new_dirs).into_iter().collect(),
        })
    }
}
