//! The I/O layer the engine writes through.
//!
//! Every byte the store reads or writes goes through [`Io`] and [`IoFile`], so tests can
//! swap the real file system ([`FsIo`]) for a simulated one ([`SimIo`]) that keeps
//! *written* and *durable* bytes apart, fails a chosen operation, and produces the image a
//! power loss would leave behind.

mod fs;
mod sim;

use std::io;
use std::path::Path;
use std::sync::Arc;

pub use fs::FsIo;
pub use sim::SimIo;

/// A file the engine holds open. All access is positional, so one handle is shared by the
/// writer and any number of readers.
pub trait IoFile: Send + Sync {
    /// Reads up to `buf.len()` bytes at `offset`; returns how many were read (0 at end).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Writes all of `buf` at `offset`, extending the file if needed.
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every byte written so far durable (fdatasync).
    fn sync_data(&self) -> io::Result<()>;
    /// Current length of the file.
    fn len(&self) -> io::Result<u64>;
    /// Whether the file is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Truncates or extends the file to `len` bytes.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Writes the range's dirty pages to the device and waits for them, without syncing
    /// metadata or the device cache (Linux `sync_file_range`). Not a durability barrier: it
    /// only moves I/O off a later `sync_data`. The default does nothing.
    fn write_back(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
    /// The first offset at or after `offset` that may hold data (Linux `SEEK_DATA`): space
    /// the file system knows to be unwritten reads as zeros and is skipped. The file's length
    /// if nothing follows. The default claims every byte may hold data.
    fn next_data(&self, offset: u64) -> io::Result<u64> {
        Ok(offset)
    }
    /// Reserves disk space for the first `len` bytes, so writes inside it cannot fail for
    /// lack of space. Extends the file to `len` with zeros if it is shorter.
    fn allocate(&self, len: u64) -> io::Result<()>;

    /// Reads exactly `buf.len()` bytes at `offset`, failing with `UnexpectedEof` if the file
    /// is shorter.
    fn read_exact_at(&self, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
        while !buf.is_empty() {
            match self.read_at(buf, offset)? {
                0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                n => {
                    buf = &mut buf[n..];
                    offset += n as u64;
                }
            }
        }
        Ok(())
    }
}

/// The file system as the engine sees it.
pub trait Io: Send + Sync + 'static {
    /// Opens a file for reading and writing, creating it if `create` is set.
    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn IoFile>>;
    /// Creates a directory and its parents.
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Names of the entries of a directory (files and directories), in no order.
    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>>;
    /// Whether a file or directory exists.
    fn exists(&self, path: &Path) -> bool;
    /// Removes a file.
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Atomically replaces `to` with `from`.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Makes the directory's entries (creations, renames, removals) durable.
    fn sync_dir(&self, path: &Path) -> io::Result<()>;
    /// Takes an exclusive lock on the data directory so that two processes never share one.
    /// The lock is held until the returned guard is dropped.
    fn lock_dir(&self, path: &Path) -> io::Result<Box<dyn Send + Sync>>;
}

/// Whether an I/O error means the disk (or the user's quota) is full.
pub fn is_disk_full(err: &io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
        || err.kind() == io::ErrorKind::StorageFull
}
