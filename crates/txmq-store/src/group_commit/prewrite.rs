//! Writing zeros ahead of the log's end.
//!
//! A preallocated (`fallocate`) range is *unwritten* to the file system: the first write into
//! it must also record that the range now holds data, which makes every fdatasync of a fresh
//! log pay for a metadata write. A background thread therefore overwrites the space just
//! ahead of the write position with zeros and writes them back in small steps, so that group
//! commits mostly land in space the file system already holds as written. The metadata that
//! marks a step as written is made durable by the next group commit's fdatasync, as
//! fdatasync does for any metadata needed to read the data back.
//!
//! The write-back goes through a file handle of the prewriter's own. Waiting for write-back
//! reports, and clears for that handle, any error the kernel recorded for the file since the
//! handle last looked, such as a failed write-back of records; through the syncer's handle
//! that error would then never reach the syncer's fdatasync, which would acknowledge
//! records that are not on disk. Each handle sees each error once, so the syncer still sees
//! it.
//!
//! Zeros are what an unwritten range reads as, so the log's format and recovery do not
//! change. The one rule: zeros must never land on records. The *frontier* is the file offset
//! below which the active segment holds records or zeros already; the prewriter only zeroes
//! at or above it, and the writer moves it past every range it is about to write. Both move it
//! under one lock, and the prewriter writes its zeros while holding it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::commit_log::Segment;
use crate::io::{Io, IoFile};

/// Zeros written per step.
const STEP: u64 = 256 << 10;

struct State {
    segment: Arc<Segment>,
    /// The prewriter's own handle of the segment's file, for write-back; `None` if it could
    /// not be opened (zeros are then written but not written back here).
    flush: Option<Arc<dyn IoFile>>,
    /// File offset below which the segment holds records or zeros.
    frontier: u64,
}

pub(crate) struct Prewriter {
    state: Mutex<State>,
    /// A copy of `state.frontier` for the writer's fast path.
    frontier: AtomicU64,
    /// File offset of the writer's latest write.
    write_at: AtomicU64,
    wake: Condvar,
    stop: AtomicBool,
    ahead: u64,
    io: Arc<dyn Io>,
}

impl Prewriter {
    /// Starts the prewriter thread for `segment`, whose next record goes at file offset
    /// `write_at`, keeping `ahead` bytes zeroed in front of it.
    pub fn start(
        io: Arc<dyn Io>,
        segment: Arc<Segment>,
        write_at: u64,
        ahead: u64,
    ) -> std::io::Result<(Arc<Self>, JoinHandle<()>)> {
        let flush = own_handle(io.as_ref(), &segment);
        let p = Arc::new(Self {
            state: Mutex::new(State {
                segment,
                flush,
                frontier: write_at,
            }),
            frontier: AtomicU64::new(write_at),
            write_at: AtomicU64::new(write_at),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
            ahead,
            io,
        });
        let worker = p.clone();
        let handle = std::thread::Builder::new()
            .name("txmq-store-prewrite".into())
            .spawn(move || worker.run())?;
        Ok((p, handle))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Called by the writer before it writes `[from, to)` (file offsets) of the active
    /// segment: no zeros will land there afterwards.
    pub fn claim(&self, from: u64, to: u64) {
        if to > self.frontier.load(Ordering::Acquire) {
            let mut st = self.lock();
            st.frontier = st.frontier.max(to);
            self.frontier.store(st.frontier, Ordering::Release);
        }
        self.write_at.store(from, Ordering::Release);
        if self.frontier.load(Ordering::Acquire) < to + self.ahead / 2 {
            self.wake.notify_one();
        }
    }

    /// The writer moved to a new segment, or cut the active one back to `write_at`.
    pub fn reset(&self, segment: Arc<Segment>, write_at: u64) {
        let flush = if Arc::ptr_eq(&segment, &self.lock().segment) {
            None
        } else {
            Some(own_handle(self.io.as_ref(), &segment))
        };
        let mut st = self.lock();
        if let Some(flush) = flush {
            st.flush = flush;
        }
        st.segment = segment;
        st.frontier = write_at;
        self.frontier.store(write_at, Ordering::Release);
        self.write_at.store(write_at, Ordering::Release);
        self.wake.notify_one();
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    fn run(&self) {
        let zeros = vec![0u8; STEP as usize];
        while !self.stop.load(Ordering::Acquire) {
            let mut st = self.lock();
            let write_at = self.write_at.load(Ordering::Acquire);
            let target = (write_at + self.ahead).min(st.segment.capacity);
            if st.frontier >= target {
                let (guard, _) = self
                    .wake
                    .wait_timeout(st, Duration::from_millis(50))
                    .unwrap_or_else(|e| e.into_inner());
                drop(guard);
                continue;
            }
            let (from, len) = (st.frontier, (target - st.frontier).min(STEP));
            let segment = st.segment.clone();
            let flush = st.flush.clone();
            // Zeros are written under the lock, so the writer cannot write records there now.
            let written = segment.file.write_all_at(&zeros[..len as usize], from);
            if written.is_ok() {
                st.frontier = from + len;
                self.frontier.store(st.frontier, Ordering::Release);
            }
            drop(st);
            if let Err(e) = written {
                tracing::debug!(error = %e, "writing zeros ahead of the log failed; group commits will pay for it");
                // Try again later, not in a tight loop.
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            // Writing the zeros back outside the lock, a small range at a time, keeps the
            // disk time they take out of any one group commit's fdatasync, which then only
            // adds the small metadata write that marks the range as written.
            if let Some(flush) = flush
                && let Err(e) = flush.write_back(from, len)
            {
                tracing::debug!(error = %e, "write-back of zeros ahead of the log failed");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// A handle of `segment`'s file of the prewriter's own (see the module docs).
fn own_handle(io: &dyn Io, segment: &Segment) -> Option<Arc<dyn IoFile>> {
    match io.open(&segment.path, false) {
        Ok(file) => Some(file),
        Err(e) => {
            tracing::debug!(file = %segment.path.display(), error = %e,
                "cannot open a handle for writing zeros back; group commits will pay for it");
            None
        }
    }
}
