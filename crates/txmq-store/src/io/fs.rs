//! The real file system.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::Arc;

use super::{Io, IoFile};

/// [`Io`] on the operating system's file system: `pwrite`, `pread`, `fdatasync`,
/// `fallocate`, and `fsync` of directories.
#[derive(Debug, Default, Clone, Copy)]
pub struct FsIo;

/// How long [`Io::lock_dir`] waits for a lock held elsewhere before it gives up.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

struct FsFile(File);

impl IoFile for FsFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.0.read_at(buf, offset)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_all_at(buf, offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }

    fn write_back(&self, offset: u64, len: u64) -> io::Result<()> {
        let (Ok(off), Ok(n)) = (
            libc::off64_t::try_from(offset),
            libc::off64_t::try_from(len),
        ) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "range too large",
            ));
        };
        let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
            | libc::SYNC_FILE_RANGE_WRITE
            | libc::SYNC_FILE_RANGE_WAIT_AFTER;
        // SAFETY: sync_file_range on a valid, open file descriptor owned by `self.0`.
        if unsafe { libc::sync_file_range(self.0.as_raw_fd(), off, n, flags) } == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn next_data(&self, offset: u64) -> io::Result<u64> {
        let Ok(off) = libc::off_t::try_from(offset) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "offset too large",
            ));
        };
        // SAFETY: lseek on a valid, open file descriptor owned by `self.0`. All reads and
        // writes are positional, so moving the file offset affects nothing else.
        let at = unsafe { libc::lseek(self.0.as_raw_fd(), off, libc::SEEK_DATA) };
        if at >= 0 {
            return Ok(at as u64);
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            // Nothing but holes or unwritten space after `offset`.
            Some(libc::ENXIO) => self.len(),
            // File systems without SEEK_DATA: every byte may hold data.
            Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok(offset),
            _ => Err(err),
        }
    }

    fn allocate(&self, len: u64) -> io::Result<()> {
        let Ok(len_off) = libc::off_t::try_from(len) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "allocation too large",
            ));
        };
        // SAFETY: fallocate on a valid, open file descriptor owned by `self.0`.
        let rc = unsafe { libc::fallocate(self.0.as_raw_fd(), 0, 0, len_off) };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            // File systems without fallocate: extend with a hole; space is then claimed on write.
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => {
                if self.len()? < len {
                    self.0.set_len(len)?;
                }
                Ok(())
            }
            _ => Err(err),
        }
    }
}

struct DirLock(#[allow(dead_code)] File);

impl Io for FsIo {
    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn IoFile>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(false)
            .open(path)?;
        Ok(Arc::new(FsFile(file)))
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        fs::create_dir_all(path)
    }

    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(path)? {
            names.push(entry?.file_name().to_string_lossy().into_owned());
        }
        Ok(names)
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        File::open(path)?.sync_all()
    }

    fn lock_dir(&self, path: &Path) -> io::Result<Box<dyn Send + Sync>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path.join("LOCK"))?;
        // A holder may be letting go: a process exiting, or a child forked by this process
        // between fork and exec, which holds a copy of the descriptor (and so the lock) for
        // that moment. Only a lock still held after LOCK_WAIT means another user.
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        loop {
            // SAFETY: flock on a valid, open file descriptor owned by `file`.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if rc == 0 {
                return Ok(Box::new(DirLock(file)));
            }
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(err);
            }
            if std::time::Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    format!("{} is in use by another txmq process", path.display()),
                ));
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}
