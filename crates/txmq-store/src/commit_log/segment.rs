//! One segment file of the commit log.
//!
//! ```text
//! 0 "TXMQLOG\0"  8 u32 version  12 u32 header_len  16 u64 base  24 u64 capacity
//! 32 i64 created_ms  40..60 zero  60 u32 crc32c(0..60)  64.. records
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::io::{Io, IoFile};

pub(crate) const SEGMENT_MAGIC: &[u8; 8] = b"TXMQLOG\0";
/// Bytes before the first record of a segment.
pub const SEGMENT_HEADER_LEN: usize = 64;

/// A segment: the log positions `[base, base + capacity)`.
pub(crate) struct Segment {
    pub base: u64,
    pub capacity: u64,
    pub path: PathBuf,
    pub file: Arc<dyn IoFile>,
}

impl Segment {
    /// Position just past the segment.
    pub fn end(&self) -> u64 {
        self.base + self.capacity
    }

    /// Position of the first record.
    pub fn first_record(&self) -> u64 {
        self.base + SEGMENT_HEADER_LEN as u64
    }

    pub fn file_name(base: u64) -> String {
        format!("{base:020}.log")
    }

    /// Creates a segment file: reserves its space, writes and syncs the header, and syncs the
    /// directory so the file survives a power loss.
    pub fn create(
        io: &dyn Io,
        dir: &Path,
        base: u64,
        capacity: u64,
        preallocate: bool,
    ) -> std::io::Result<Self> {
        let path = dir.join(Self::file_name(base));
        let file = io.open(&path, true)?;
        let result = (|| {
            if preallocate {
                file.allocate(capacity)?;
            }
            let mut header = [0u8; SEGMENT_HEADER_LEN];
            header[..8].copy_from_slice(SEGMENT_MAGIC);
            header[8..12].copy_from_slice(&1u32.to_le_bytes());
            header[12..16].copy_from_slice(&(SEGMENT_HEADER_LEN as u32).to_le_bytes());
            header[16..24].copy_from_slice(&base.to_le_bytes());
            header[24..32].copy_from_slice(&capacity.to_le_bytes());
            header[32..40].copy_from_slice(&crate::now_ms().to_le_bytes());
            let crc = crc32c::crc32c(&header[..60]);
            header[60..64].copy_from_slice(&crc.to_le_bytes());
            file.write_all_at(&header, 0)?;
            file.sync_data()?;
            io.sync_dir(dir)
        })();
        if let Err(e) = result {
            // Leave no half-made segment behind; a later roll will try again.
            let _ = io.remove_file(&path);
            let _ = io.sync_dir(dir);
            return Err(e);
        }
        Ok(Self {
            base,
            capacity,
            path,
            file,
        })
    }

    /// Opens an existing segment and checks its header.
    /// Whether the file at `path` is a segment whose creation never finished: shorter than
    /// a header, or with a header of zeros (the header is synced before any record is
    /// written, so such a file never held one). A file that cannot be opened or read, or
    /// whose header is damaged or of another version, is not: it may hold records.
    pub fn never_finished(io: &dyn Io, path: &Path) -> bool {
        let Ok(file) = io.open(path, false) else {
            return false;
        };
        let mut header = [0u8; SEGMENT_HEADER_LEN];
        match file.read_exact_at(&mut header, 0) {
            Ok(()) => header.iter().all(|&b| b == 0),
            Err(e) => e.kind() == std::io::ErrorKind::UnexpectedEof,
        }
    }

    pub fn open(io: &dyn Io, path: &Path) -> Result<Self, String> {
        let file = io.open(path, false).map_err(|e| e.to_string())?;
        let mut header = [0u8; SEGMENT_HEADER_LEN];
        file.read_exact_at(&mut header, 0)
            .map_err(|e| format!("cannot read segment header: {e}"))?;
        if &header[..8] != SEGMENT_MAGIC {
            return Err("not a txmq log segment (bad magic)".into());
        }
        let crc = u32::from_le_bytes(header[60..64].try_into().unwrap_or_default());
        if crc32c::crc32c(&header[..60]) != crc {
            return Err("segment header checksum mismatch".into());
        }
        let version = u32::from_le_bytes(header[8..12].try_into().unwrap_or_default());
        if version != 1 {
            return Err(format!("unsupported segment version {version}"));
        }
        let base = u64::from_le_bytes(header[16..24].try_into().unwrap_or_default());
        let capacity = u64::from_le_bytes(header[24..32].try_into().unwrap_or_default());
        if capacity <= SEGMENT_HEADER_LEN as u64 {
            return Err(format!("segment capacity {capacity} too small"));
        }
        Ok(Self {
            base,
            capacity,
            path: path.to_path_buf(),
            file,
        })
    }
}
