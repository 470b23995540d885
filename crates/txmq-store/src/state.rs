//! Durable small state in files replaced atomically.
//!
//! A state file is written to `NAME.tmp`, fsynced, renamed over `NAME`, and the directory is
//! fsynced, so after a crash or power loss the file holds either the old or the new
//! contents, never a mix. The contents are framed with a checksum:
//!
//! ```text
//! 0 "TXMQST1\0"  8 u64 payload_len  16 u32 crc32c(payload)  20 u32 zero  24 payload
//! ```
//!
//! The broker keeps compact snapshots here (consumer progress, the transaction table,
//! timers) and writes each change in between as a record in the commit log, so every change
//! is durable when acknowledged and replay starts from the snapshot's log position.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::io::Io;

const MAGIC: &[u8; 8] = b"TXMQST1\0";
const HEADER: usize = 24;

/// Named state files in one directory, each replaced atomically.
#[derive(Clone)]
pub struct StateFiles {
    io: Arc<dyn Io>,
    dir: PathBuf,
}

fn check_name(name: &str) -> io::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !name.starts_with('.')
        && !name.ends_with(".tmp");
    if ok {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid state file name {name:?}"),
        ))
    }
}

impl StateFiles {
    /// State files kept in `dir`, which must exist.
    pub fn new(io: Arc<dyn Io>, dir: impl Into<PathBuf>) -> Self {
        Self {
            io,
            dir: dir.into(),
        }
    }

    /// The directory holding the files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Replaces the state file `name` with `payload`; durable when this returns.
    ///
    /// # Errors
    /// An invalid name, or any I/O failure; on failure the previous contents remain.
    pub fn write(&self, name: &str, payload: &[u8]) -> io::Result<()> {
        check_name(name)?;
        let tmp = self.dir.join(format!("{name}.tmp"));
        let path = self.dir.join(name);
        let mut buf = Vec::with_capacity(HEADER + payload.len());
        buf.extend_from_slice(MAGIC);
        buf.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        buf.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
        buf.extend_from_slice(&[0; 4]);
        buf.extend_from_slice(payload);
        let file = self.io.open(&tmp, true)?;
        file.set_len(0)?;
        file.write_all_at(&buf, 0)?;
        file.sync_data()?;
        self.io.rename(&tmp, &path)?;
        self.io.sync_dir(&self.dir)
    }

    /// Reads the state file `name`; `None` if it was never written.
    ///
    /// # Errors
    /// `InvalidData` if the file is damaged (it was not written by [`StateFiles::write`]).
    pub fn read(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        check_name(name)?;
        let path = self.dir.join(name);
        if !self.io.exists(&path) {
            return Ok(None);
        }
        let file = self.io.open(&path, false)?;
        let len = file.len()? as usize;
        let bad = |why: &str| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {why}", path.display()),
            )
        };
        if len < HEADER {
            return Err(bad("too short"));
        }
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, 0)?;
        if &buf[..8] != MAGIC {
            return Err(bad("not a txmq state file"));
        }
        let plen = u64::from_le_bytes(buf[8..16].try_into().unwrap_or_default()) as usize;
        if plen != len - HEADER {
            return Err(bad("length mismatch"));
        }
        let crc = u32::from_le_bytes(buf[16..20].try_into().unwrap_or_default());
        if crc32c::crc32c(&buf[HEADER..]) != crc {
            return Err(bad("checksum mismatch"));
        }
        buf.drain(..HEADER);
        Ok(Some(buf))
    }

    /// Removes the state file `name` (durably). Missing files are not an error.
    pub fn remove(&self, name: &str) -> io::Result<()> {
        check_name(name)?;
        let path = self.dir.join(name);
        if self.io.exists(&path) {
            self.io.remove_file(&path)?;
            self.io.sync_dir(&self.dir)?;
        }
        Ok(())
    }
}
