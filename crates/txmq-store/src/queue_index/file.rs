//! One queue-index file.
//!
//! ```text
//! header (32 bytes): 0 "TXMQIDX\0"  8 u32 version  12 u32 entry_len  16 u64 first_offset
//!                    24 u32 capacity (entries)  28 u32 crc32c(0..28)
//! entry  (32 bytes): 0 u64 position  8 i64 store_ts  16 u32 size  20 u32 tag_hash
//!                    24 u8 kind  25..28 zero  28 u32 crc32c(0..28)
//! ```
//! Offset `n` lives at byte `32 + (n - first_offset) * 32`. A slot of zeros is empty.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::IndexEntry;
use crate::io::{Io, IoFile};

const MAGIC: &[u8; 8] = b"TXMQIDX\0";
const HEADER_LEN: u64 = 32;
/// Size of one index entry.
pub(crate) const ENTRY_LEN: usize = 32;

pub(crate) struct IndexFile {
    pub first: u64,
    pub capacity: u64,
    pub path: PathBuf,
    pub file: Arc<dyn IoFile>,
}

fn encode(e: &IndexEntry) -> [u8; ENTRY_LEN] {
    let mut b = [0u8; ENTRY_LEN];
    b[0..8].copy_from_slice(&e.position.to_le_bytes());
    b[8..16].copy_from_slice(&e.store_timestamp.to_le_bytes());
    b[16..20].copy_from_slice(&e.size.to_le_bytes());
    b[20..24].copy_from_slice(&e.tag_hash.to_le_bytes());
    b[24] = e.kind;
    let crc = crc32c::crc32c(&b[..28]);
    b[28..32].copy_from_slice(&crc.to_le_bytes());
    b
}

fn decode(b: &[u8]) -> Option<IndexEntry> {
    let word = |r: std::ops::Range<usize>| {
        let mut a = [0u8; 8];
        a[..r.len()].copy_from_slice(&b[r]);
        u64::from_le_bytes(a)
    };
    let size = word(16..20) as u32;
    if size == 0 || crc32c::crc32c(&b[..28]) != word(28..32) as u32 {
        return None;
    }
    Some(IndexEntry {
        position: word(0..8),
        store_timestamp: word(8..16) as i64,
        size,
        tag_hash: word(20..24) as u32,
        kind: b[24],
    })
}

impl IndexFile {
    pub fn file_name(first: u64) -> String {
        format!("{first:020}.idx")
    }

    fn slot(&self, offset: u64) -> u64 {
        HEADER_LEN + (offset - self.first) * ENTRY_LEN as u64
    }

    /// Creates an index file holding `capacity` entries from `first`, with its space reserved.
    pub fn create(io: &dyn Io, dir: &Path, first: u64, capacity: u64) -> std::io::Result<Self> {
        let path = dir.join(Self::file_name(first));
        let file = io.open(&path, true)?;
        let result = (|| {
            file.allocate(HEADER_LEN + capacity * ENTRY_LEN as u64)?;
            let mut h = [0u8; HEADER_LEN as usize];
            h[..8].copy_from_slice(MAGIC);
            h[8..12].copy_from_slice(&1u32.to_le_bytes());
            h[12..16].copy_from_slice(&(ENTRY_LEN as u32).to_le_bytes());
            h[16..24].copy_from_slice(&first.to_le_bytes());
            h[24..28].copy_from_slice(&(capacity as u32).to_le_bytes());
            let crc = crc32c::crc32c(&h[..28]);
            h[28..32].copy_from_slice(&crc.to_le_bytes());
            file.write_all_at(&h, 0)
        })();
        if let Err(e) = result {
            let _ = io.remove_file(&path);
            return Err(e);
        }
        Ok(Self {
            first,
            capacity,
            path,
            file,
        })
    }

    pub fn open(io: &dyn Io, path: &Path) -> Result<Self, String> {
        let file = io.open(path, false).map_err(|e| e.to_string())?;
        let mut h = [0u8; HEADER_LEN as usize];
        file.read_exact_at(&mut h, 0)
            .map_err(|e| format!("cannot read index header: {e}"))?;
        let crc = u32::from_le_bytes([h[28], h[29], h[30], h[31]]);
        if &h[..8] != MAGIC || crc32c::crc32c(&h[..28]) != crc {
            return Err("bad index file header".into());
        }
        let first = u64::from_le_bytes(h[16..24].try_into().unwrap_or_default());
        let capacity = u32::from_le_bytes(h[24..28].try_into().unwrap_or_default()) as u64;
        if capacity == 0 {
            return Err("index file with no capacity".into());
        }
        Ok(Self {
            first,
            capacity,
            path: path.to_path_buf(),
            file,
        })
    }

    pub fn write(&self, offset: u64, entries: &[IndexEntry]) -> std::io::Result<()> {
        let mut buf = Vec::with_capacity(entries.len() * ENTRY_LEN);
        for e in entries {
            buf.extend_from_slice(&encode(e));
        }
        self.file.write_all_at(&buf, self.slot(offset))
    }

    pub fn read(&self, offset: u64) -> std::io::Result<Option<IndexEntry>> {
        let mut b = [0u8; ENTRY_LEN];
        let n = self.file.read_at(&mut b, self.slot(offset))?;
        Ok(if n == ENTRY_LEN { decode(&b) } else { None })
    }

    /// Appends up to `n` entries from `offset` to `out`, stopping at the first empty slot.
    pub fn read_many(
        &self,
        offset: u64,
        n: usize,
        out: &mut Vec<IndexEntry>,
    ) -> std::io::Result<()> {
        let mut buf = vec![0u8; n * ENTRY_LEN];
        let mut got = 0;
        while got < buf.len() {
            match self
                .file
                .read_at(&mut buf[got..], self.slot(offset) + got as u64)?
            {
                0 => break,
                k => got += k,
            }
        }
        for chunk in buf[..got - got % ENTRY_LEN].chunks_exact(ENTRY_LEN) {
            match decode(chunk) {
                Some(e) => out.push(e),
                None => break,
            }
        }
        Ok(())
    }
}
