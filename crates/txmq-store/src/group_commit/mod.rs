//! Where records are appended and acknowledged: group commit in two stages.
//!
//! Appenders send requests over a channel to the **writer** thread
//! ([`writer`]), which takes every request waiting, assigns positions and queue offsets,
//! encodes them into one buffer, writes it with one `pwrite` and writes the group's
//! queue-index entries (not yet visible: readers stop at a queue's published next offset).
//! It hands each written group to the **syncer** thread ([`syncer`]), which makes
//! everything written so far durable with one `fdatasync` (in sync mode), publishes the new
//! end and next offsets to readers, and only then answers the appenders. While the syncer
//! waits for the disk, the writer already writes the next group, and the next fdatasync
//! covers all of it.
//!
//! A request is all-or-nothing: it is answered `Ok` only if every one of its records was
//! written (and synced, in sync mode); an error leaves no record of it visible.
//!
//! Invariants:
//! - every segment but the last is fully synced before the next one is created;
//! - each record carries `synced_upto`, a log position that was durable when it was written,
//!   which lets recovery tell a torn tail from damage to acknowledged data;
//! - after a failed fdatasync the store is poisoned and nothing more is acknowledged.

mod prewrite;
mod syncer;
mod writer;

use std::path::PathBuf;
use std::sync::{Arc, mpsc};

use tokio::sync::oneshot;

pub(crate) use prewrite::Prewriter;
pub(crate) use syncer::Syncer;
pub(crate) use writer::Writer;

use crate::Appended;
use crate::checkpoint::Checkpoint;
use crate::commit_log::Segment;
use crate::error::AppendError;
use crate::queue_index::{IndexFile, QueueIndex};

/// A request to the writer.
pub(crate) enum Command {
    Append(
        Vec<crate::RecordData>,
        oneshot::Sender<Result<Vec<Appended>, AppendError>>,
    ),
    /// Everything before it written, synced and indexed: report what a checkpoint needs.
    Snapshot(mpsc::Sender<Result<Snapshot, AppendError>>),
    /// Make everything written so far durable.
    Sync(oneshot::Sender<Result<(), AppendError>>),
    /// Finish everything and stop both threads.
    Shutdown(mpsc::Sender<Result<(), AppendError>>),
}

/// A consistent cut for a checkpoint: the log below `checkpoint.position` is synced and the
/// index entries counted by it are written; the `dirty` files and `new_dirs` directories
/// must be synced before the checkpoint is written.
pub(crate) struct Snapshot {
    pub checkpoint: Checkpoint,
    pub dirty: Vec<Arc<IndexFile>>,
    pub new_dirs: Vec<PathBuf>,
}

/// An appender waiting for its answer.
pub(crate) struct Pending {
    pub reply: oneshot::Sender<Result<Vec<Appended>, AppendError>>,
    pub results: Vec<Appended>,
}

/// What the writer hands to the syncer.
pub(crate) enum Handoff {
    /// A group written to `segment`, ending at `end`.
    Written(Group),
    /// Control commands, in order with the groups.
    Control(Command),
}

pub(crate) struct Group {
    pub segment: Arc<Segment>,
    pub end: u64,
    pub bytes: u64,
    pub pending: Vec<Pending>,
    /// The queues the group's records went to, each with its next offset after the group.
    /// Their index entries are written (by the writer) but not yet published.
    pub entries: Vec<(Arc<QueueIndex>, u64)>,
    /// Index files the group's entries were written to, to sync before a checkpoint.
    pub dirty: Vec<Arc<IndexFile>>,
    /// Why writing the group's index entries failed, if it did: the records are in the log
    /// (and acknowledged once durable), and the store is poisoned once they are.
    pub index_error: Option<String>,
    pub new_dirs: Vec<PathBuf>,
}
