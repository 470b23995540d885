//! Opening the store: find the segments, check the checkpoint, rebuild the queue index from
//! the log written after it, and cut a torn tail.
//!
//! Torn tail or damage? Every record carries `synced_upto`, the position that was durable
//! when it was written. If the record at `P` is unreadable and some valid record after it
//! says `synced_upto > P`, then `P` was durable before that record was written: acknowledged
//! data is damaged and opening stops (unless `repair` is set). If every valid record after
//! `P` says `synced_upto <= P`, everything from `P` on was written after the last sync: an
//! un-acknowledged, torn tail, which is cut. Segments before the last were fully synced
//! before the next one was created, so any unreadable record in them is damage.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::checkpoint::{self, Checkpoint, QueueMark};
use crate::commit_log::{SEGMENT_HEADER_LEN, Segment};
use crate::config::StoreConfig;
use crate::error::{IoContext, OpenError};
use crate::io::{Io, IoFile};
use crate::queue_index::{IndexEntry, QueueIndex, QueueKey, unescape_topic};
use crate::record::{self, ALIGN, DecodeError, HEADER_LEN, Record};
use crate::state::StateFiles;

const CHUNK: usize = 1 << 20;
/// Index entries buffered per queue during replay before they are written.
const REPLAY_BATCH: usize = 4096;

/// What opening the store found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Number of log segments.
    pub segments: usize,
    /// Log position the scan started from (the checkpoint, or the start of the log).
    pub scanned_from: u64,
    /// Records read by the scan.
    pub records_scanned: u64,
    /// Whether the whole queue index was rebuilt (no usable checkpoint or index).
    pub full_index_rebuild: bool,
    /// Bytes of an un-acknowledged torn tail that were cut.
    pub torn_tail_bytes: u64,
    /// Set when `repair` truncated the log at damaged data.
    pub repair: Option<Repair>,
    /// Position after the last record.
    pub log_end: u64,
}

/// What a repair dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repair {
    /// The segment file holding the damage.
    pub file: PathBuf,
    /// Offset of the damage in that file.
    pub offset: u64,
    /// What was wrong.
    pub reason: String,
    /// Valid records after the damage that were dropped.
    pub records_dropped: u64,
    /// Bytes of valid records after the damage that were dropped.
    pub bytes_dropped: u64,
}

pub(crate) struct Recovered {
    pub segments: Vec<Segment>,
    pub write_pos: u64,
    pub queues: Vec<(Arc<QueueIndex>, u64)>,
    pub checkpoint: Checkpoint,
    pub report: RecoveryReport,
}

/// Reads a segment in large chunks.
struct Reader<'a> {
    seg: &'a Segment,
    chunk: Vec<u8>,
    start: u64,
    /// Bytes the file holds; past them the segment reads as zeros.
    limit: u64,
}

impl<'a> Reader<'a> {
    fn new(seg: &'a Segment) -> std::io::Result<Self> {
        let limit = seg.file.len()?.min(seg.capacity);
        Ok(Self {
            seg,
            chunk: Vec::new(),
            start: 0,
            limit,
        })
    }

    /// Up to `len` bytes at file offset `off` (fewer at the end of the file).
    fn get(&mut self, off: u64, len: usize) -> std::io::Result<&[u8]> {
        if off >= self.limit {
            return Ok(&[]);
        }
        let end = (off + len as u64).min(self.limit);
        let cached = off >= self.start && end <= self.start + self.chunk.len() as u64;
        if !cached {
            let want = (end - off).max(CHUNK as u64).min(self.limit - off) as usize;
            self.chunk.resize(want, 0);
            let n = crate::commit_log::read_full(self.seg, &mut self.chunk, off)?;
            self.chunk.truncate(n);
            self.start = off;
        }
        let from = (off - self.start) as usize;
        let to = ((end - self.start) as usize)
            .min(self.chunk.len())
            .max(from);
        Ok(&self.chunk[from..to])
    }

    /// The record at `off`, checked, with its `synced_upto`.
    fn probe(&mut self, off: u64) -> std::io::Result<Result<(Record, u64), DecodeError>> {
        if off + 4 > self.limit {
            return Ok(Err(DecodeError::Empty));
        }
        let max = (self.seg.capacity - off) as usize;
        let head = self.get(off, HEADER_LEN)?;
        let header = match record::decode_header(head, max) {
            Ok(h) => h,
            Err(e) => return Ok(Err(e)),
        };
        if header.position != self.seg.base + off {
            return Ok(Err(DecodeError::Invalid(
                "record is not at the position it claims",
            )));
        }
        let bytes = self.get(off, header.total_len as usize)?;
        Ok(record::decode(bytes, &header).map(|r| (r, header.synced_upto)))
    }

    /// The first aligned offset at or after `off` that is not zero (or the end of the file).
    fn skip_zeros(&mut self, mut off: u64) -> std::io::Result<u64> {
        while off < self.limit {
            let chunk = self.get(off, CHUNK)?;
            match chunk.iter().position(|&b| b != 0) {
                Some(i) => return Ok((off + i as u64) / ALIGN as u64 * ALIGN as u64),
                None => {
                    off += chunk.len().max(1) as u64;
                    // Jump over space the file system holds as unwritten.
                    let data = self.seg.file.next_data(off)?;
                    off = off.max(data / ALIGN as u64 * ALIGN as u64);
                }
            }
        }
        Ok(off)
    }

    /// Scans from `off` to the end of the segment for valid records at aligned offsets.
    fn survey(&mut self, mut off: u64) -> std::io::Result<Survey> {
        let mut s = Survey::default();
        while off + 4 <= self.limit {
            match self.probe(off)? {
                Ok((rec, synced_upto)) => {
                    s.records += 1;
                    let len = rec.data.encoded_len() as u64;
                    s.bytes += len;
                    s.max_synced_upto = s.max_synced_upto.max(synced_upto);
                    s.extent = off + len;
                    off += len;
                }
                Err(DecodeError::Empty) => off = self.skip_zeros(off)?.max(off + ALIGN as u64),
                Err(_) => {
                    s.extent = s.extent.max(off + ALIGN as u64);
                    off += ALIGN as u64;
                }
            }
        }
        Ok(s)
    }
}

/// Valid records found after a bad spot.
#[derive(Default)]
struct Survey {
    records: u64,
    bytes: u64,
    max_synced_upto: u64,
    /// File offset past the last non-zero bytes seen.
    extent: u64,
}

/// Index state of a queue during replay.
struct Replay {
    index: Arc<QueueIndex>,
    min: u64,
    next: u64,
    staged_from: u64,
    staged: Vec<IndexEntry>,
}

/// Why an incremental replay must start over as a full rebuild.
struct NeedsFullRebuild(String);

pub(crate) fn recover(
    io: &dyn Io,
    cfg: &StoreConfig,
    state: &StateFiles,
) -> Result<Recovered, OpenError> {
    let log_dir = cfg.dir.join("log");
    let index_dir = cfg.dir.join("index");
    io.create_dir_all(&log_dir).at(&log_dir)?;
    io.create_dir_all(&index_dir).at(&index_dir)?;
    // The entries of the directories just made (`log`, `index`, `state`, the data directory
    // itself and any directory made above it) are durable before any record written under
    // them is acknowledged. A directory above the data directory's parent that cannot be
    // opened (no read permission) is passed over: such a directory is hardly a new one.
    for (depth, dir) in cfg.dir.ancestors().enumerate() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        match io.sync_dir(dir) {
            Ok(()) => {}
            Err(e) if depth >= 2 => {
                tracing::debug!(dir = %dir.display(), error = %e, "cannot sync a directory above the data directory");
            }
            Err(e) => return Err((dir.to_path_buf(), e).into()),
        }
        if dir == Path::new(".") {
            break;
        }
    }
    let mut segments = open_segments(io, &log_dir)?;
    let fresh = segments.is_empty();
    if fresh {
        segments.push(
            Segment::create(io, &log_dir, 0, cfg.segment_size, cfg.preallocate).at(&log_dir)?,
        );
    }
    let log_start = segments[0].first_record();
    let log_limit = segments.last().map_or(0, |s| s.end());

    let decoded = match state.read(checkpoint::FILE_NAME) {
        Ok(Some(bytes)) => Checkpoint::decode(&bytes),
        Ok(None) => None,
        Err(e) => {
            tracing::warn!(error = %e, "checkpoint unreadable; rebuilding the queue index");
            None
        }
    };
    let floors = queue_floors(cfg, state, decoded.as_ref())?;
    let checkpoint = decoded.filter(|c| {
        let ok = c.position >= log_start && c.position <= log_limit;
        if !ok {
            tracing::warn!(
                position = c.position,
                "checkpoint outside the log; rebuilding the queue index"
            );
        }
        ok
    });

    let mut attempt = checkpoint.filter(|_| !cfg.repair);
    loop {
        match replay(io, cfg, &index_dir, &mut segments, attempt.as_ref(), fresh) {
            Ok(rec) => return finish(io, state, &index_dir, segments, rec, &floors),
            Err(Ok(NeedsFullRebuild(why))) if attempt.is_some() => {
                tracing::warn!(reason = %why, "queue index does not match the checkpoint; rebuilding it");
                attempt = None;
            }
            Err(Ok(NeedsFullRebuild(why))) => {
                return Err(OpenError::BadFile {
                    file: index_dir,
                    reason: why,
                });
            }
            Err(Err(e)) => return Err(e),
        }
    }
}

/// The lowest next offset of each queue, whatever the log still holds: the floors retention
/// wrote before it last deleted segments, raised to the next offsets of the last checkpoint.
/// Both were durable, so a queue's offsets never go below them.
fn queue_floors(
    cfg: &StoreConfig,
    state: &StateFiles,
    checkpoint: Option<&Checkpoint>,
) -> Result<HashMap<QueueKey, u64>, OpenError> {
    let file = state.dir().join(checkpoint::FLOORS_FILE_NAME);
    let read = match state.read(checkpoint::FLOORS_FILE_NAME) {
        Ok(None) => Ok(HashMap::new()),
        Ok(Some(bytes)) => checkpoint::decode_floors(&bytes)
            .ok_or_else(|| "not a queue floors payload".to_string()),
        Err(e) => Err(e.to_string()),
    };
    let mut floors = match read {
        Ok(floors) => floors,
        // Without it, a queue that retention emptied could start again at offset 0 and
        // its new messages look consumed.
        Err(reason) if !cfg.repair => return Err(OpenError::BadFile { file, reason }),
        Err(reason) => {
            tracing::warn!(file = %file.display(), %reason, "repair: ignoring the damaged queue floors");
            HashMap::new()
        }
    };
    for (key, mark) in checkpoint.map(|c| &c.queues).into_iter().flatten() {
        let floor = floors.entry(key.clone()).or_default();
        *floor = (*floor).max(mark.next);
    }
    Ok(floors)
}

/// Lists and opens the segments, oldest first, and checks they are contiguous.
fn open_segments(io: &dyn Io, log_dir: &Path) -> Result<Vec<Segment>, OpenError> {
    let mut names: Vec<(u64, String)> = io
        .list_dir(log_dir)
        .at(log_dir)?
        .into_iter()
        .filter_map(|n| Some((n.strip_suffix(".log")?.parse::<u64>().ok()?, n)))
        .collect();
    names.sort();
    let mut segments: Vec<Segment> = Vec::new();
    let count = names.len();
    for (i, (base, name)) in names.into_iter().enumerate() {
        let path = log_dir.join(&name);
        let seg = match Segment::open(io, &path) {
            Ok(s) => s,
            // A power loss while the newest segment was being created (the first of a new
            // store, or the next at a roll) can leave it without its header; no record was
            // ever written to it (the header is synced first). Any other failure to open it
            // stops the start: it may hold acknowledged records.
            Err(reason)
                if i + 1 == count && (i > 0 || base == 0) && Segment::never_finished(io, &path) =>
            {
                tracing::warn!(file = %path.display(), %reason, "removing a segment that was never finished");
                io.remove_file(&path).at(&path)?;
                io.sync_dir(log_dir).at(log_dir)?;
                continue;
            }
            Err(reason) => return Err(OpenError::BadFile { file: path, reason }),
        };
        if seg.base != base {
            return Err(OpenError::BadFile {
                file: path,
                reason: format!("header says base {}", seg.base),
            });
        }
        if let Some(prev) = segments.last()
            && prev.end() != seg.base
        {
            return Err(OpenError::BadFile {
                file: path,
                reason: format!("gap in the log: previous segment ends at {}", prev.end()),
            });
        }
        segments.push(seg);
    }
    Ok(segments)
}

/// Opens every queue index under `index/`.
fn open_indexes(io: &dyn Io, index_dir: &Path) -> Result<Vec<QueueIndex>, String> {
    let mut out = Vec::new();
    for tdir in io.list_dir(index_dir).map_err(|e| e.to_string())? {
        let Some(topic) = unescape_topic(&tdir) else {
            continue;
        };
        let tpath = index_dir.join(&tdir);
        for qdir in io.list_dir(&tpath).map_err(|e| e.to_string())? {
            let Ok(qid) = qdir.parse::<u32>() else {
                continue;
            };
            let q = QueueIndex::open(io, index_dir, &topic, qid)
                .map_err(|(p, e)| format!("{}: {e}", p.display()))?;
            out.push(q);
        }
    }
    Ok(out)
}

/// Removes every index file, for a full rebuild.
fn clear_indexes(io: &dyn Io, index_dir: &Path) -> Result<(), OpenError> {
    for tdir in io.list_dir(index_dir).at(index_dir)? {
        let tpath = index_dir.join(&tdir);
        for qdir in io.list_dir(&tpath).unwrap_or_default() {
            let qpath = tpath.join(&qdir);
            for f in io.list_dir(&qpath).unwrap_or_default() {
                let fpath = qpath.join(&f);
                io.remove_file(&fpath).at(&fpath)?;
            }
        }
    }
    Ok(())
}

type ReplayResult = Result<ReplayDone, Result<NeedsFullRebuild, OpenError>>;

struct ReplayDone {
    write_pos: u64,
    queues: HashMap<QueueKey, Replay>,
    report: RecoveryReport,
}

fn replay(
    io: &dyn Io,
    cfg: &StoreConfig,
    index_dir: &Path,
    segments: &mut Vec<Segment>,
    checkpoint: Option<&Checkpoint>,
    fresh: bool,
) -> ReplayResult {
    let log_start = segments[0].first_record();
    let mut report = RecoveryReport {
        segments: segments.len(),
        ..Default::default()
    };
    let mut queues: HashMap<QueueKey, Replay> = HashMap::new();
    let start = match checkpoint {
        Some(cp) => {
            let opened = open_indexes(io, index_dir).map_err(|e| Ok(NeedsFullRebuild(e)))?;
            for q in opened {
                let key = q.key();
                let next = cp.queues.get(&key).map_or(0, |m| m.next);
                queues.insert(key, Replay::new(Arc::new(q), next));
            }
            for (key, mark) in &cp.queues {
                let next = mark.next;
                // A queue that held no record at the checkpoint needs no index entry.
                let empty = mark.min >= next;
                let Some(r) = queues.get_mut(key) else {
                    if !empty {
                        return Err(Ok(NeedsFullRebuild(format!(
                            "index of {}/{} is missing",
                            key.0, key.1
                        ))));
                    }
                    let index = QueueIndex::new(index_dir, &key.0, key.1);
                    queues.insert(key.clone(), Replay::new(Arc::new(index), next));
                    continue;
                };
                if !empty {
                    let last = r
                        .index
                        .read(next - 1)
                        .map_err(|e| Ok(NeedsFullRebuild(e.to_string())))?;
                    if last.is_none_or(|e| e.position >= cp.position) {
                        return Err(Ok(NeedsFullRebuild(format!(
                            "index of {}/{} lacks offset {} recorded by the checkpoint",
                            key.0,
                            key.1,
                            next - 1
                        ))));
                    }
                }
            }
            for r in queues.values_mut() {
                let lowest = r
                    .index
                    .all_files()
                    .first()
                    .map_or(r.next, |f| f.first.min(r.next));
                // Slots below the checkpoint's min may hold entries of records lost after
                // it was written (a queue moved up to its floor skips their offsets).
                let lowest = lowest.max(cp.queues.get(&r.index.key()).map_or(0, |m| m.min));
                r.min = r
                    .index
                    .first_at_or_after(log_start, lowest, r.next)
                    .map_err(|e| Ok(NeedsFullRebuild(e.to_string())))?;
            }
            cp.position
        }
        None => {
            report.full_index_rebuild = true;
            clear_indexes(io, index_dir).map_err(Err)?;
            log_start
        }
    };
    report.scanned_from = start;
    if fresh || checkpoint.is_some_and(|c| c.clean && ends_at(segments, c.position)) {
        // A new log, or a clean shutdown: the log ends exactly here, nothing to scan.
        report.log_end = start;
        report.full_index_rebuild &= !fresh;
        return Ok(ReplayDone {
            write_pos: start,
            queues,
            report,
        });
    }

    let mut i = segments
        .iter()
        .position(|s| start < s.end())
        .unwrap_or(segments.len() - 1);
    let mut off = start.max(segments[i].first_record()) - segments[i].base;
    let write_pos;
    loop {
        let last = i + 1 == segments.len();
        let seg = &segments[i];
        let mut reader = Reader::new(seg).at(&seg.path).map_err(|e| Err(e.into()))?;
        let outcome = loop {
            if off + HEADER_LEN as u64 > seg.capacity {
                break Ok(());
            }
            match reader.probe(off).at(&seg.path).map_err(|e| Err(e.into()))? {
                Ok((rec, _)) => {
                    off += rec.data.encoded_len() as u64;
                    report.records_scanned += 1;
                    apply(io, cfg, index_dir, &mut queues, rec, checkpoint.is_some())?;
                }
                Err(e) => break Err(e),
            }
        };
        let bad = match outcome {
            Ok(()) => None,
            Err(e) => {
                let survey = reader
                    .survey(off + ALIGN as u64)
                    .at(&seg.path)
                    .map_err(|e| Err(e.into()))?;
                let pos = seg.base + off;
                let damaged = match (&e, last) {
                    // The zeroed rest of a sealed segment, with nothing valid after it.
                    (DecodeError::Empty, false) => survey.records > 0,
                    (_, false) => true,
                    // The tail of the last segment: damage only if data after it was synced.
                    (_, true) => survey.max_synced_upto > pos,
                };
                if !damaged {
                    if last {
                        report.torn_tail_bytes = survey.extent.saturating_sub(off);
                    }
                    None
                } else {
                    Some((e, survey))
                }
            }
        };
        if let Some((e, survey)) = bad {
            let seg = &segments[i];
            let mut dropped = (survey.records, survey.bytes);
            for later in &segments[i + 1..] {
                let s = Reader::new(later)
                    .and_then(|mut r| r.survey(SEGMENT_HEADER_LEN as u64))
                    .at(&later.path)
                    .map_err(|e| Err(e.into()))?;
                dropped.0 += s.records;
                dropped.1 += s.bytes;
            }
            if !cfg.repair {
                return Err(Err(OpenError::Corrupt {
                    file: seg.path.clone(),
                    offset: off,
                    position: seg.base + off,
                    reason: e.to_string(),
                    bytes_after: dropped.1,
                }));
            }
            tracing::warn!(
                file = %seg.path.display(), offset = off, records = dropped.0, bytes = dropped.1,
                "repair: truncating the commit log at damaged data"
            );
            report.repair = Some(Repair {
                file: seg.path.clone(),
                offset: off,
                reason: e.to_string(),
                records_dropped: dropped.0,
                bytes_dropped: dropped.1,
            });
            for later in segments.drain(i + 1..) {
                io.remove_file(&later.path)
                    .at(&later.path)
                    .map_err(|e| Err(e.into()))?;
            }
            let log_dir = &segments[i]
                .path
                .parent()
                .map(PathBuf::from)
                .unwrap_or_default();
            io.sync_dir(log_dir)
                .at(log_dir)
                .map_err(|e| Err(e.into()))?;
            report.segments = segments.len();
            write_pos = segments[i].base + off;
            cut_tail(
                &*segments[i].file,
                off,
                segments[i].capacity,
                cfg.preallocate,
            )
            .at(&segments[i].path)
            .map_err(|e| Err(e.into()))?;
            break;
        }
        if last {
            write_pos = seg.base + off;
            if report.torn_tail_bytes > 0 {
                tracing::warn!(
                    file = %seg.path.display(), offset = off, bytes = report.torn_tail_bytes,
                    "cut a torn tail of un-acknowledged bytes"
                );
                cut_tail(&*seg.file, off, seg.capacity, cfg.preallocate)
                    .at(&seg.path)
                    .map_err(|e| Err(e.into()))?;
            }
            break;
        }
        i += 1;
        off = SEGMENT_HEADER_LEN as u64;
    }
    report.log_end = write_pos;
    // A brand-new store has nothing to rebuild.
    report.full_index_rebuild &= report.records_scanned > 0;
    for r in queues.values_mut() {
        r.flush(io, cfg).map_err(Err)?;
    }
    Ok(ReplayDone {
        write_pos,
        queues,
        report,
    })
}

/// Whether `pos` lies in the last segment and holds no record: the end of the log.
fn ends_at(segments: &[Segment], pos: u64) -> bool {
    let Some(last) = segments.last() else {
        return false;
    };
    if pos < last.first_record() || pos > last.end() {
        return false;
    }
    if pos == last.end() {
        return true;
    }
    Reader::new(last)
        .and_then(|mut r| r.probe(pos - last.base))
        .is_ok_and(|probe| matches!(probe, Err(DecodeError::Empty)))
}

/// Zeroes everything from `off` to the end of the segment and syncs it.
fn cut_tail(file: &dyn IoFile, off: u64, capacity: u64, preallocate: bool) -> std::io::Result<()> {
    file.set_len(off)?;
    if preallocate {
        file.allocate(capacity)?;
    }
    file.sync_data()
}

impl Replay {
    fn new(index: Arc<QueueIndex>, next: u64) -> Self {
        Self {
            index,
            min: next,
            next,
            staged_from: next,
            staged: Vec::new(),
        }
    }

    fn flush(&mut self, io: &dyn Io, cfg: &StoreConfig) -> Result<(), OpenError> {
        if self.staged.is_empty() {
            return Ok(());
        }
        let dir = self.index.dir.clone();
        for k in 0..self.staged.len() as u64 {
            let offset = self.staged_from + k;
            if self.index.file_for(offset).is_none() {
                self.index
                    .prepare(io, offset, cfg.index_entries_per_file)
                    .at(&dir)?;
            }
        }
        self.index.write(self.staged_from, &self.staged).at(&dir)?;
        self.staged.clear();
        self.staged_from = self.next;
        Ok(())
    }
}

/// Adds a replayed record to its queue's index.
fn apply(
    io: &dyn Io,
    cfg: &StoreConfig,
    index_dir: &Path,
    queues: &mut HashMap<QueueKey, Replay>,
    rec: Record,
    incremental: bool,
) -> Result<(), Result<NeedsFullRebuild, OpenError>> {
    let key = (rec.data.topic.clone(), rec.data.queue_id);
    let r = queues.entry(key).or_insert_with(|| {
        Replay::new(
            Arc::new(QueueIndex::new(
                index_dir,
                &rec.data.topic,
                rec.data.queue_id,
            )),
            0,
        )
    });
    if rec.queue_offset != r.next {
        if r.next == r.min && r.staged.is_empty() {
            // The queue's older records were removed by retention: it starts here.
            r.min = rec.queue_offset;
            r.next = rec.queue_offset;
            r.staged_from = rec.queue_offset;
        } else if incremental {
            return Err(Ok(NeedsFullRebuild(format!(
                "{}/{} offset {} found where {} was expected",
                rec.data.topic, rec.data.queue_id, rec.queue_offset, r.next
            ))));
        } else {
            return Err(Err(OpenError::Corrupt {
                file: cfg.dir.join("log"),
                offset: rec.position,
                position: rec.position,
                reason: format!(
                    "queue {}/{} offset {} out of sequence (expected {})",
                    rec.data.topic, rec.data.queue_id, rec.queue_offset, r.next
                ),
                bytes_after: 0,
            }));
        }
    }
    r.staged.push(IndexEntry {
        position: rec.position,
        size: rec.data.framed_len() as u32,
        tag_hash: rec.data.tag_hash(),
        store_timestamp: rec.store_timestamp,
        kind: rec.data.kind as u8,
    });
    r.next += 1;
    if r.staged.len() >= REPLAY_BATCH {
        r.flush(io, cfg).map_err(Err)?;
    }
    Ok(())
}

/// Syncs the rebuilt index, writes a fresh checkpoint and hands the state to the store.
/// A queue the log no longer holds a record of goes on from its floor.
fn finish(
    io: &dyn Io,
    state: &StateFiles,
    index_dir: &Path,
    segments: Vec<Segment>,
    mut done: ReplayDone,
    floors: &HashMap<QueueKey, u64>,
) -> Result<Recovered, OpenError> {
    for (key, &floor) in floors {
        let r = done.queues.entry(key.clone()).or_insert_with(|| {
            Replay::new(Arc::new(QueueIndex::new(index_dir, &key.0, key.1)), floor)
        });
        if r.next >= floor {
            continue;
        }
        if r.min == r.next {
            // Offsets from `r.next` to the floor are skipped: their records, if any, were
            // lost with an un-synced tail (async durability), or by a repair.
            r.min = floor;
            r.next = floor;
            r.staged_from = floor;
        } else {
            // A repair, a log cut short by hand, or in async durability the loss of an
            // un-synced tail gets here: records of offsets from `r.next` were once written.
            tracing::warn!(
                topic = %key.0, queue = key.1, next = r.next, floor,
                "queue offsets below its floor will be used again"
            );
        }
    }
    let mut dirs = vec![index_dir.to_path_buf()];
    for r in done.queues.values() {
        for f in r.index.all_files() {
            f.file.sync_data().at(&f.path)?;
        }
        dirs.push(r.index.dir.clone());
        if let Some(t) = r.index.dir.parent() {
            dirs.push(t.to_path_buf());
        }
    }
    dirs.sort();
    dirs.dedup();
    for d in &dirs {
        if io.exists(d) {
            io.sync_dir(d).at(d)?;
        }
    }
    let checkpoint = Checkpoint {
        position: done.write_pos,
        clean: false,
        queues: done
            .queues
            .iter()
            .map(|(k, r)| {
                let mark = QueueMark {
                    next: r.next,
                    min: r.min,
                };
                (k.clone(), mark)
            })
            .collect(),
    };
    state
        .write(checkpoint::FILE_NAME, &checkpoint.encode())
        .at(state.dir())?;
    let queues = done
        .queues
        .into_values()
        .map(|r| {
            r.index.min_offset.store(r.min, Ordering::Release);
            r.index.next_offset.store(r.next, Ordering::Release);
            (r.index, r.next)
        })
        .collect();
    Ok(Recovered {
        segments,
        write_pos: done.write_pos,
        queues,
        checkpoint,
        report: done.report,
    })
}
