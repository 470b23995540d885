//! Store configuration.

use std::path::PathBuf;
use std::time::Duration;

/// When an append is acknowledged relative to the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Default. An append completes only after an fdatasync that covers it; concurrent
    /// appends share one write and one fdatasync (group commit).
    ///
    /// Survives a process crash: every acknowledged record. Survives a power loss: every
    /// acknowledged record (as far as the disk honours fdatasync).
    Sync,
    /// An append completes once its bytes are written to the operating system; the log is
    /// fdatasynced every `interval`, or sooner once `max_unsynced_bytes` are pending, and on
    /// every segment roll, checkpoint and clean shutdown.
    ///
    /// Survives a process crash: every acknowledged record (the kernel holds the bytes).
    /// Survives a power loss: only what was synced; up to `interval` (or
    /// `max_unsynced_bytes`) of acknowledged records may be lost, always a suffix of the log.
    Async {
        /// Longest time between two fdatasyncs.
        interval: Duration,
        /// Most bytes written but not yet synced.
        max_unsynced_bytes: u64,
    },
}

/// Which segments retention deletes. See `docs/storage-format.md` for the rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retention {
    /// Delete a segment once its newest record is older than this (default 72 h).
    pub max_age: Option<Duration>,
    /// Delete the oldest segments while the log is larger than this (default: no limit).
    pub max_total_bytes: Option<u64>,
    /// How often the background task applies the rule (default 60 s).
    pub check_interval: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            max_age: Some(Duration::from_secs(72 * 3600)),
            max_total_bytes: None,
            check_interval: Duration::from_secs(60),
        }
    }
}

/// Everything the store needs to open.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Data directory; holds `log/`, `index/`, `state/` and the `checkpoint`.
    pub dir: PathBuf,
    /// Size of each commit-log segment file (default 1 GiB). Applies to new segments.
    pub segment_size: u64,
    /// When appends are acknowledged.
    pub durability: Durability,
    /// Largest encoded record accepted (default 8 MiB).
    pub max_record_size: usize,
    /// Most bytes one group commit writes at once (default 4 MiB).
    pub max_batch_bytes: usize,
    /// Entries per queue-index file (default 262,144, i.e. 8 MiB files; at most 2^24). It may
    /// change between runs: files already made keep their size.
    pub index_entries_per_file: u64,
    /// How often the queue index is synced and a checkpoint written (default 1 s).
    pub checkpoint_interval: Duration,
    /// Which segments are deleted.
    pub retention: Retention,
    /// On open, truncate the log at a damaged record instead of refusing to start.
    pub repair: bool,
    /// Reserve each segment's disk space when it is created (default on). Makes fdatasync
    /// cheaper and turns a full disk into a clean failure at segment roll.
    pub preallocate: bool,
    /// With `preallocate`, keep this many bytes ahead of the log's end overwritten with zeros
    /// by a background thread (default 64 MiB; 0 turns it off). Group commits then land in
    /// space the file system already counts as written, and their fdatasync flushes data
    /// only, without a metadata write.
    pub prewrite_bytes: u64,
}

impl StoreConfig {
    /// Defaults for a data directory.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            segment_size: 1 << 30,
            durability: Durability::Sync,
            max_record_size: 8 << 20,
            max_batch_bytes: 4 << 20,
            index_entries_per_file: 1 << 18,
            checkpoint_interval: Duration::from_secs(1),
            retention: Retention::default(),
            repair: false,
            preallocate: true,
            prewrite_bytes: 64 << 20,
        }
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        let min_segment = (crate::commit_log::SEGMENT_HEADER_LEN as u64) + 4096;
        if self.segment_size < min_segment {
            return Err(format!("segment_size must be at least {min_segment} bytes"));
        }
        if self.max_record_size < crate::record::HEADER_LEN + 64 {
            return Err("max_record_size is too small".into());
        }
        if self.max_record_size as u64
            > self.segment_size - crate::commit_log::SEGMENT_HEADER_LEN as u64
        {
            return Err("max_record_size must fit in a segment".into());
        }
        if self.index_entries_per_file == 0 || self.index_entries_per_file > 1 << 24 {
            return Err("index_entries_per_file must be from 1 to 16777216".into());
        }
        if let Durability::Async { interval, .. } = self.durability
            && interval.is_zero()
        {
            return Err("async flush interval must be positive".into());
        }
        Ok(())
    }
}
