//! Retention: which whole segments may be deleted.
//!
//! Rule, applied oldest segment first, never to the active (last) segment:
//! 1. A segment is *due* when its newest record is older than `max_age` (its newest record
//!    is no newer than the first record of the next segment, whose time is used), or when
//!    the log is larger than `max_total_bytes`.
//! 2. A due segment is deleted only if it lies wholly below every *retention floor*: the
//!    checkpoint (records after it are needed to rebuild the index), and each floor the
//!    broker sets (the oldest unresolved transaction, the oldest in-flight delivery, the
//!    oldest record its state snapshots still need).
//! 3. Deletion stops at the first segment that is not due or is held by a floor, so the log
//!    always stays one contiguous range.
//!
//! Before the first segment of a pass goes, every queue's next offset is written to the
//! queue floors file: a queue whose every record is deleted is then still known, with its
//! offsets, to an open that rebuilds the index from the log.

use std::sync::atomic::Ordering;

use crate::Shared;
use crate::checkpoint;
use crate::commit_log::{CommitLog, Raw};
use crate::error::{IoContext, MaintenanceError};

/// What a retention pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetentionReport {
    /// Segments deleted.
    pub segments_deleted: usize,
    /// Bytes of segment files deleted.
    pub bytes_freed: u64,
    /// The floor that kept a due segment, if one did.
    pub held_by: Option<String>,
}

pub(crate) fn apply(shared: &Shared, now_ms: i64) -> Result<RetentionReport, MaintenanceError> {
    let _pass = shared
        .retention_lock
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let cfg = &shared.config.retention;
    let segments = shared.log.segments();
    let mut report = RetentionReport::default();
    if segments.len() < 2 {
        return Ok(report);
    }
    let mut floors: Vec<(String, u64)> = shared.floors().into_iter().collect();
    floors.push((
        "checkpoint".into(),
        shared.checkpointed.load(Ordering::Acquire),
    ));
    let mut total: u64 = segments.iter().map(|s| s.capacity).sum();
    for pair in segments.windows(2) {
        let (seg, next) = (&pair[0], &pair[1]);
        let expired =
            cfg.max_age
                .is_some_and(|age| match CommitLog::read_raw(next, next.first_record()) {
                    Ok(Raw::Record(h, _)) => {
                        now_ms.saturating_sub(h.store_timestamp) > age.as_millis() as i64
                    }
                    _ => false,
                });
        let oversize = cfg.max_total_bytes.is_some_and(|max| total > max);
        if !expired && !oversize {
            break;
        }
        if let Some((owner, _)) = floors
            .iter()
            .filter(|(_, f)| seg.end() > *f)
            .min_by_key(|(_, f)| *f)
        {
            report.held_by = Some(owner.clone());
            break;
        }
        if report.segments_deleted == 0 {
            write_floors(shared)?;
        }
        shared.log.remove(seg.base);
        shared.io.remove_file(&seg.path).at(&seg.path)?;
        tracing::info!(file = %seg.path.display(), expired, oversize, "retention deleted a log segment");
        total -= seg.capacity;
        report.segments_deleted += 1;
        report.bytes_freed += seg.capacity;
    }
    if report.segments_deleted > 0 {
        shared.io.sync_dir(&shared.log.dir).at(&shared.log.dir)?;
        let start = shared.log.start();
        for q in shared.all_queues() {
            let min = q.first_at_or_after(start, q.min(), q.next()).at(&q.dir)?;
            q.min_offset.store(min, Ordering::Release);
            q.drop_files_below(&*shared.io, min);
        }
    }
    Ok(report)
}

/// Durably records every queue's next offset as its floor.
fn write_floors(shared: &Shared) -> Result<(), MaintenanceError> {
    let floors = shared
        .all_queues()
        .iter()
        .map(|q| (q.key(), q.next()))
        .filter(|(_, next)| *next > 0)
        .collect();
    shared
        .state
        .write(
            checkpoint::FLOORS_FILE_NAME,
            &checkpoint::encode_floors(&floors),
        )
        .at(shared.state.dir())?;
    Ok(())
}
