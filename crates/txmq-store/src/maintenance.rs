//! Background upkeep: periodic checkpoints and retention passes.

use std::sync::atomic::Ordering;
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::Instant;

use crate::Shared;
use crate::checkpoint;
use crate::error::{AppendError, IoContext, MaintenanceError};
use crate::group_commit::Command;

pub(crate) struct Handle {
    stop: mpsc::Sender<()>,
    thread: JoinHandle<()>,
}

impl Handle {
    pub fn stop(self) {
        drop(self.stop);
        let _ = self.thread.join();
    }
}

pub(crate) fn start(shared: Arc<Shared>, tx: mpsc::Sender<Command>) -> std::io::Result<Handle> {
    let (stop, stopped) = mpsc::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("txmq-store-upkeep".into())
        .spawn(move || {
            let mut last_retention = Instant::now();
            loop {
                match stopped.recv_timeout(shared.config.checkpoint_interval) {
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    _ => return,
                }
                if shared.poison_reason().is_some() {
                    continue;
                }
                if let Err(e) = checkpoint(&shared, &tx, false) {
                    tracing::warn!(error = %e, "checkpoint failed");
                }
                if last_retention.elapsed() >= shared.config.retention.check_interval {
                    last_retention = Instant::now();
                    match crate::retention::apply(&shared, crate::now_ms()) {
                        Ok(r) if r.segments_deleted > 0 => {
                            tracing::info!(
                                segments = r.segments_deleted,
                                bytes = r.bytes_freed,
                                "retention pass"
                            )
                        }
                        Ok(_) => {}
                        Err(e) => tracing::warn!(error = %e, "retention pass failed"),
                    }
                }
            }
        })?;
    Ok(Handle { stop, thread })
}

/// Takes a consistent cut from the writer, syncs the index files it lists, and writes the
/// checkpoint (`clean` only at shutdown, once nothing more can be appended). If an index
/// sync fails, the index can no longer be trusted up to any
/// checkpoint, so the checkpoint is removed and no other is written until restart (which
/// then rebuilds the index from the log).
pub(crate) fn checkpoint(
    shared: &Shared,
    tx: &mpsc::Sender<Command>,
    clean: bool,
) -> Result<(), MaintenanceError> {
    let _guard = shared
        .checkpoint_lock
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if shared.checkpoints_disabled.load(Ordering::Acquire) {
        return Ok(());
    }
    let (reply, rx) = mpsc::channel();
    tx.send(Command::Snapshot(reply))
        .map_err(|_| AppendError::Closed)?;
    let mut snap = rx.recv().map_err(|_| AppendError::Closed)??;
    snap.checkpoint.clean = clean;
    let synced = (|| {
        for f in &snap.dirty {
            f.file.sync_data().at(&f.path)?;
        }
        for d in &snap.new_dirs {
            shared.io.sync_dir(d).at(d)?;
        }
        Ok::<(), MaintenanceError>(())
    })();
    if let Err(e) = synced {
        shared.checkpoints_disabled.store(true, Ordering::Release);
        tracing::error!(error = %e, "queue index sync failed; checkpoints stop until restart");
        let _ = shared.state.remove(checkpoint::FILE_NAME);
        return Err(e);
    }
    shared
        .state
        .write(checkpoint::FILE_NAME, &snap.checkpoint.encode())
        .at(shared.state.dir())?;
    shared
        .checkpointed
        .store(snap.checkpoint.position, Ordering::Release);
    Ok(())
}
