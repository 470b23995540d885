//! Errors, one small enum per operation.

use std::io;
use std::path::PathBuf;

/// Why the store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// An I/O operation on a file failed.
    #[error("I/O error on {path}: {cause}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        cause: io::Error,
    },
    /// The log is damaged before its tail; the store refuses to start rather than drop data.
    /// Opening with `repair` set truncates the log here instead.
    #[error(
        "commit log corrupt in {file} at byte {offset} (log position {position}): {reason}; \
         valid records follow it, so this is not a torn tail. Start with repair enabled to \
         truncate the log at this point, dropping {bytes_after} bytes after it"
    )]
    Corrupt {
        /// The segment file.
        file: PathBuf,
        /// Offset of the damaged record inside the file.
        offset: u64,
        /// Position of the damaged record in the log.
        position: u64,
        /// What is wrong with it.
        reason: String,
        /// How many bytes of log follow the damage (what a repair would drop).
        bytes_after: u64,
    },
    /// A file has a header this build does not understand.
    #[error("{file}: {reason}")]
    BadFile {
        /// The file.
        file: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The configuration is not usable.
    #[error("invalid store configuration: {0}")]
    Config(String),
}

/// Why an append was refused. When an append fails, none of its records was acknowledged.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AppendError {
    /// A previous fsync failed; the store refuses every append until it is reopened, since
    /// it can no longer tell which written bytes are durable.
    #[error("store is poisoned after a failed sync ({0}); restart to recover from the log")]
    Poisoned(String),
    /// The disk is full. Nothing acknowledged was damaged; appends succeed again once space
    /// is freed.
    #[error("disk full: {0}")]
    DiskFull(String),
    /// A record is larger than the configured maximum.
    #[error("record of {size} bytes exceeds the maximum of {max} bytes")]
    TooLarge {
        /// Encoded size of the record.
        size: usize,
        /// Configured maximum.
        max: usize,
    },
    /// A record breaks a limit of the framing (empty topic, oversized key...).
    #[error("invalid record: {0}")]
    Invalid(String),
    /// Writing failed for another reason; nothing of this append was acknowledged.
    #[error("write failed: {0}")]
    Io(String),
    /// The store is closed.
    #[error("store is closed")]
    Closed,
}

/// Why a read failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The position or queue offset is beyond what has been appended.
    #[error("nothing stored at {0}")]
    NotFound(String),
    /// The record was removed by retention.
    #[error("{0} was removed by retention")]
    Expired(String),
    /// The stored bytes are damaged.
    #[error("corrupt data in {file} at byte {offset}: {reason}")]
    Corrupt {
        /// The file.
        file: PathBuf,
        /// Offset in the file.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// An I/O error.
    #[error("I/O error reading {path}: {cause}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        cause: io::Error,
    },
}

/// Why a maintenance operation (checkpoint, retention, sync) failed.
#[derive(Debug, thiserror::Error)]
pub enum MaintenanceError {
    /// An I/O error.
    #[error("I/O error on {path}: {cause}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        cause: io::Error,
    },
    /// The store is poisoned or closed.
    #[error(transparent)]
    Append(#[from] AppendError),
}

pub(crate) trait IoContext<T> {
    fn at(self, path: &std::path::Path) -> Result<T, (PathBuf, io::Error)>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn at(self, path: &std::path::Path) -> Result<T, (PathBuf, io::Error)> {
        self.map_err(|e| (path.to_path_buf(), e))
    }
}

impl From<(PathBuf, io::Error)> for OpenError {
    fn from((path, cause): (PathBuf, io::Error)) -> Self {
        Self::Io { path, cause }
    }
}

impl From<(PathBuf, io::Error)> for ReadError {
    fn from((path, cause): (PathBuf, io::Error)) -> Self {
        Self::Io { path, cause }
    }
}

impl From<(PathBuf, io::Error)> for MaintenanceError {
    fn from((path, cause): (PathBuf, io::Error)) -> Self {
        Self::Io { path, cause }
    }
}
