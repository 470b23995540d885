//! The commit log: append-only segment files holding every record, addressed by position.
//!
//! Appends happen only in [`crate::group_commit`]; this module owns the segment set and
//! reads.

mod segment;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

pub use segment::SEGMENT_HEADER_LEN;
pub(crate) use segment::Segment;

use crate::error::ReadError;
use crate::record::{self, DecodeError, Header, Record};

/// Bytes read at once when a record's length is not yet known.
const FIRST_READ: usize = 4096;

pub(crate) struct CommitLog {
    pub dir: PathBuf,
    segments: RwLock<BTreeMap<u64, Arc<Segment>>>,
}

/// Outcome of reading the bytes at a position.
pub(crate) enum Raw {
    /// A record whose header parsed; `bytes` holds the whole record, checksum not verified.
    Record(Header, Vec<u8>),
    /// The bytes are not a record.
    Bad(DecodeError),
}

impl CommitLog {
    pub fn new(dir: PathBuf, segments: Vec<Segment>) -> Self {
        let map = segments
            .into_iter()
            .map(|s| (s.base, Arc::new(s)))
            .collect();
        Self {
            dir,
            segments: RwLock::new(map),
        }
    }

    fn map(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<u64, Arc<Segment>>> {
        self.segments.read().unwrap_or_else(|p| p.into_inner())
    }

    /// All segments, oldest first.
    pub fn segments(&self) -> Vec<Arc<Segment>> {
        self.map().values().cloned().collect()
    }

    pub fn insert(&self, seg: Arc<Segment>) {
        self.segments
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(seg.base, seg);
    }

    pub fn remove(&self, base: u64) -> Option<Arc<Segment>> {
        self.segments
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&base)
    }

    /// The segment holding `pos`.
    pub fn segment_at(&self, pos: u64) -> Option<Arc<Segment>> {
        let map = self.map();
        let (_, seg) = map.range(..=pos).next_back()?;
        (pos < seg.end()).then(|| seg.clone())
    }

    /// The segment after the one holding `pos`.
    pub fn segment_after(&self, pos: u64) -> Option<Arc<Segment>> {
        self.map().range(pos + 1..).next().map(|(_, s)| s.clone())
    }

    /// Position of the oldest record still kept.
    pub fn start(&self) -> u64 {
        self.map().values().next().map_or(0, |s| s.first_record())
    }

    /// Reads the bytes of the record at `pos` of `seg`.
    pub fn read_raw(seg: &Segment, pos: u64) -> std::io::Result<Raw> {
        let max_len = (seg.end() - pos) as usize;
        let mut buf = vec![0u8; FIRST_READ.min(max_len)];
        let n = read_full(seg, &mut buf, pos - seg.base)?;
        if n == 0 {
            // Past the end of a file that was not preallocated: unwritten, like zeros.
            return Ok(Raw::Bad(DecodeError::Empty));
        }
        buf.truncate(n);
        let header = match record::decode_header(&buf, max_len) {
            Ok(h) => h,
            Err(e) => return Ok(Raw::Bad(e)),
        };
        let total = header.total_len as usize;
        if buf.len() < total {
            let have = buf.len();
            buf.resize(total, 0);
            let n = read_full(seg, &mut buf[have..], pos - seg.base + have as u64)?;
            if have + n < total {
                return Ok(Raw::Bad(DecodeError::Truncated));
            }
        }
        Ok(Raw::Record(header, buf))
    }

    /// Reads and checks the record at `pos`, which must lie below `end` (the committed end).
    pub fn read(&self, pos: u64, end: u64) -> Result<Record, ReadError> {
        match self.read_at(pos, end)? {
            Some(rec) => Ok(rec),
            None => Err(ReadError::NotFound(format!("log position {pos}"))),
        }
    }

    /// Reads the record at `pos`, or `None` if `pos` is the zeroed end of a segment.
    fn read_at(&self, pos: u64, end: u64) -> Result<Option<Record>, ReadError> {
        if pos >= end {
            return Err(ReadError::NotFound(format!("log position {pos}")));
        }
        if pos < self.start() {
            return Err(ReadError::Expired(format!("log position {pos}")));
        }
        let Some(seg) = self.segment_at(pos) else {
            return Err(ReadError::NotFound(format!("log position {pos}")));
        };
        let corrupt = |reason: String| ReadError::Corrupt {
            file: seg.path.clone(),
            offset: pos - seg.base,
            reason,
        };
        let (header, bytes) = match Self::read_raw(&seg, pos).map_err(|e| (seg.path.clone(), e))? {
            Raw::Record(h, b) => (h, b),
            Raw::Bad(DecodeError::Empty) => return Ok(None),
            Raw::Bad(e) => return Err(corrupt(e.to_string())),
        };
        if header.position != pos {
            return Err(corrupt(format!(
                "record claims position {}",
                header.position
            )));
        }
        record::decode(&bytes, &header)
            .map(Some)
            .map_err(|e| corrupt(e.to_string()))
    }

    /// Reads consecutive records from `pos` up to `end`: at most `max_records`, and stops
    /// after `max_bytes` of bodies. Returns the records and the position after the last one.
    pub fn read_from(
        &self,
        mut pos: u64,
        end: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<(Vec<Record>, u64), ReadError> {
        let mut out = Vec::new();
        let mut bytes = 0;
        while pos < end && out.len() < max_records && bytes < max_bytes {
            // A segment that was filled exactly ends where the next one's header begins.
            if let Some(seg) = self.segment_at(pos)
                && pos < seg.first_record()
            {
                pos = seg.first_record();
                continue;
            }
            match self.read_at(pos, end)? {
                Some(rec) => {
                    bytes += rec.data.body.len();
                    pos += rec.data.encoded_len() as u64;
                    out.push(rec);
                }
                // Zeroed end of a segment: the next record starts the next segment.
                None => match self.segment_after(pos) {
                    Some(next) => pos = next.first_record(),
                    None => break,
                },
            }
        }
        Ok((out, pos.min(end)))
    }
}

/// Reads as many bytes as the file has at `offset`, up to `buf.len()`.
pub(crate) fn read_full(seg: &Segment, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match seg.file.read_at(&mut buf[done..], offset + done as u64)? {
            0 => break,
            n => done += n,
        }
    }
    Ok(done)
}
