//! The queue index: for each (topic, queue) a sequence of fixed-size entries, one per queue
//! offset, pointing into the commit log. Reading offset `n` is one positional read.
//!
//! Entries are written by the group-commit writer after the log write that they describe,
//! and synced by the checkpoint, which records how many entries of each queue are durable.
//! On open, entries past the checkpoint are rebuilt from the log.

mod file;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

pub(crate) use file::IndexFile;

use crate::io::Io;

/// One entry of the queue index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    /// Position of the record in the commit log.
    pub position: u64,
    /// Length of the record, unpadded.
    pub size: u32,
    /// Hash of the record's tag ([`crate::record::tag_hash`]).
    pub tag_hash: u32,
    /// When the record was stored, ms since the epoch.
    pub store_timestamp: i64,
    /// The record's kind byte.
    pub kind: u8,
}

/// Key of a queue.
pub(crate) type QueueKey = (String, u32);

/// The index of one queue, shared by the writer and readers.
pub(crate) struct QueueIndex {
    pub topic: String,
    pub queue_id: u32,
    pub dir: PathBuf,
    files: RwLock<BTreeMap<u64, Arc<IndexFile>>>,
    /// Lowest offset whose record is still in the log.
    pub min_offset: AtomicU64,
    /// One past the highest offset readers may see.
    pub next_offset: AtomicU64,
}

/// Escapes a topic into the name of its directory in the store: keeps `[A-Za-z0-9_-]`,
/// writes other bytes as `%XX`. A topic whose directory name would be longer than a file
/// name may be (255 bytes) cannot be stored.
pub fn escape_topic(topic: &str) -> String {
    let mut out = String::with_capacity(topic.len());
    for b in topic.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Reverses [`escape_topic`].
pub(crate) fn unescape_topic(name: &str) -> Option<String> {
    let bytes = name.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = name.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

impl QueueIndex {
    pub fn dir_for(index_dir: &Path, topic: &str, queue_id: u32) -> PathBuf {
        index_dir
            .join(escape_topic(topic))
            .join(queue_id.to_string())
    }

    pub fn new(index_dir: &Path, topic: &str, queue_id: u32) -> Self {
        Self {
            topic: topic.to_string(),
            queue_id,
            dir: Self::dir_for(index_dir, topic, queue_id),
            files: RwLock::new(BTreeMap::new()),
            min_offset: AtomicU64::new(0),
            next_offset: AtomicU64::new(0),
        }
    }

    /// Opens the index files of a queue directory. Files with a bad header are reported.
    pub fn open(
        io: &dyn Io,
        index_dir: &Path,
        topic: &str,
        queue_id: u32,
    ) -> Result<Self, (PathBuf, String)> {
        let q = Self::new(index_dir, topic, queue_id);
        let names = io
            .list_dir(&q.dir)
            .map_err(|e| (q.dir.clone(), e.to_string()))?;
        let mut files = BTreeMap::new();
        for name in names {
            if !name.ends_with(".idx") {
                continue;
            }
            let path = q.dir.join(&name);
            let f = IndexFile::open(io, &path).map_err(|e| (path.clone(), e))?;
            files.insert(f.first, Arc::new(f));
        }
        *q.files.write().unwrap_or_else(|p| p.into_inner()) = files;
        Ok(q)
    }

    pub fn key(&self) -> QueueKey {
        (self.topic.clone(), self.queue_id)
    }

    fn files(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<u64, Arc<IndexFile>>> {
        self.files.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The file that holds `offset`, if it exists.
    pub fn file_for(&self, offset: u64) -> Option<Arc<IndexFile>> {
        let files = self.files();
        let (_, f) = files.range(..=offset).next_back()?;
        (offset < f.first + f.capacity).then(|| f.clone())
    }

    /// Makes sure the file for `offset` exists, creating (and reserving) it if needed.
    /// Returns the new file's path when one was created.
    ///
    /// A new file starts at a multiple of `per_file`, or where the file before it ends if
    /// that file, made with another `per_file`, reaches past that multiple; and it ends
    /// where the file after it starts, so that no two files hold the same offset.
    pub fn prepare(
        &self,
        io: &dyn Io,
        offset: u64,
        per_file: u64,
    ) -> std::io::Result<Option<PathBuf>> {
        if self.file_for(offset).is_some() {
            return Ok(None);
        }
        io.create_dir_all(&self.dir)?;
        let (first, capacity) = {
            let files = self.files();
            let before = files
                .range(..offset)
                .next_back()
                .map_or(0, |(_, f)| f.first + f.capacity);
            let first = (offset - offset % per_file).max(before);
            let after = files
                .range(offset..)
                .next()
                .map_or(u64::MAX, |(&first, _)| first);
            (first, per_file.min(after - first))
        };
        let f = IndexFile::create(io, &self.dir, first, capacity)?;
        let path = f.path.clone();
        self.files
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(first, Arc::new(f));
        Ok(Some(path))
    }

    /// Writes consecutive entries starting at `offset`; their files must be prepared.
    pub fn write(
        &self,
        offset: u64,
        entries: &[IndexEntry],
    ) -> std::io::Result<Vec<Arc<IndexFile>>> {
        let mut touched = Vec::new();
        let mut done = 0;
        while done < entries.len() {
            let at = offset + done as u64;
            let f = self.file_for(at).ok_or_else(|| {
                std::io::Error::other(format!("index file for offset {at} missing"))
            })?;
            let room = (f.first + f.capacity - at) as usize;
            let n = room.min(entries.len() - done);
            f.write(at, &entries[done..done + n])?;
            done += n;
            touched.push(f);
        }
        Ok(touched)
    }

    /// Reads the entry at `offset`; `None` if the slot is empty or damaged.
    pub fn read(&self, offset: u64) -> std::io::Result<Option<IndexEntry>> {
        match self.file_for(offset) {
            Some(f) => f.read(offset),
            None => Ok(None),
        }
    }

    /// Reads up to `max` consecutive entries from `offset`, stopping at an empty slot.
    pub fn read_many(&self, offset: u64, max: usize) -> std::io::Result<Vec<IndexEntry>> {
        let mut out = Vec::with_capacity(max.min(1024));
        while out.len() < max {
            let at = offset + out.len() as u64;
            let Some(f) = self.file_for(at) else { break };
            let n = ((f.first + f.capacity - at) as usize).min(max - out.len());
            let before = out.len();
            f.read_many(at, n, &mut out)?;
            if out.len() - before < n {
                break;
            }
        }
        Ok(out)
    }

    /// First offset in `[lo, hi)` whose entry points at or after `pos`, assuming entries
    /// increase with offset; `hi` if none does.
    pub fn first_at_or_after(&self, pos: u64, mut lo: u64, mut hi: u64) -> std::io::Result<u64> {
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.read(mid)? {
                Some(e) if e.position >= pos => hi = mid,
                // An unreadable slot below the end counts as old: its record is gone.
                _ => lo = mid + 1,
            }
        }
        Ok(lo)
    }

    /// Removes files that hold only offsets below `min`. Returns the removed paths.
    pub fn drop_files_below(&self, io: &dyn Io, min: u64) -> Vec<PathBuf> {
        let mut files = self.files.write().unwrap_or_else(|p| p.into_inner());
        let doomed: Vec<u64> = files
            .values()
            .filter(|f| f.first + f.capacity <= min)
            .map(|f| f.first)
            .collect();
        let mut removed = Vec::new();
        for first in doomed {
            if let Some(f) = files.remove(&first) {
                if let Err(e) = io.remove_file(&f.path) {
                    tracing::warn!(path = %f.path.display(), error = %e, "could not remove index file");
                }
                removed.push(f.path.clone());
            }
        }
        removed
    }

    /// All open index files.
    pub fn all_files(&self) -> Vec<Arc<IndexFile>> {
        self.files().values().cloned().collect()
    }

    pub fn min(&self) -> u64 {
        self.min_offset.load(Ordering::Acquire)
    }

    pub fn next(&self) -> u64 {
        self.next_offset.load(Ordering::Acquire)
    }
}
