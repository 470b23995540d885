//! The checkpoint: how far the queue index is durable, so that opening the store rescans
//! only the log written after it.
//!
//! Payload (in a state file, see [`crate::state`]): `u64 position`, `u8 flags`,
//! `u32 queue_count`, then per queue `u16 topic_len, topic, u32 queue_id, u64 next_offset`
//! and, when flag bit 1 is set, `u64 min_offset`.
//! Every index entry of a queue in `min_offset..next_offset` points below `position` and was
//! synced before the checkpoint was written; the log below `position` was synced too. Flag
//! bit 0 (`clean`) is set only by a clean shutdown: the log ends exactly at `position`.
//! Checkpoints written without bit 1 read as `min_offset` 0.
//!
//! The queue floors file holds, per queue, the next offset it had when retention last
//! deleted log segments: `u32 queue_count`, then per queue `u16 topic_len, topic,
//! u32 queue_id, u64 next_offset`. A queue whose every record retention deleted is known
//! from it alone, so that its offsets go on from there instead of starting again at 0.

use std::collections::HashMap;

use crate::queue_index::QueueKey;

pub(crate) const FILE_NAME: &str = "checkpoint";
/// The state file holding the queue floors.
pub(crate) const FLOORS_FILE_NAME: &str = "queue-floors";

const CLEAN: u8 = 1;
const WITH_MIN: u8 = 2;

/// What a checkpoint records of one queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct QueueMark {
    /// One past the last durable index entry.
    pub next: u64,
    /// The lowest offset whose record was still in the log.
    pub min: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Checkpoint {
    pub position: u64,
    /// Written by a clean shutdown: nothing follows `position` in the log.
    pub clean: bool,
    pub queues: HashMap<QueueKey, QueueMark>,
}

/// Reads a byte slice front to back.
struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.b.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(s)
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    fn key(&mut self) -> Option<QueueKey> {
        let tl = u16::from_le_bytes(self.take(2)?.try_into().ok()?) as usize;
        let topic = String::from_utf8(self.take(tl)?.to_vec()).ok()?;
        Some((topic, self.u32()?))
    }

    fn done(&self) -> bool {
        self.at == self.b.len()
    }
}

fn put_key(b: &mut Vec<u8>, (topic, qid): &QueueKey) {
    b.extend_from_slice(&(topic.len() as u16).to_le_bytes());
    b.extend_from_slice(topic.as_bytes());
    b.extend_from_slice(&qid.to_le_bytes());
}

impl Checkpoint {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(13 + self.queues.len() * 40);
        b.extend_from_slice(&self.position.to_le_bytes());
        b.push(WITH_MIN | if self.clean { CLEAN } else { 0 });
        b.extend_from_slice(&(self.queues.len() as u32).to_le_bytes());
        for (key, mark) in &self.queues {
            put_key(&mut b, key);
            b.extend_from_slice(&mark.next.to_le_bytes());
            b.extend_from_slice(&mark.min.to_le_bytes());
        }
        b
    }

    pub fn decode(b: &[u8]) -> Option<Self> {
        let mut c = Cursor { b, at: 0 };
        let position = c.u64()?;
        let flags = c.take(1)?[0];
        let count = c.u32()?;
        let mut queues = HashMap::new();
        for _ in 0..count {
            let key = c.key()?;
            let next = c.u64()?;
            let min = if flags & WITH_MIN != 0 { c.u64()? } else { 0 };
            queues.insert(key, QueueMark { next, min });
        }
        c.done().then_some(Self {
            position,
            clean: flags & CLEAN != 0,
            queues,
        })
    }
}

/// Encodes the queue floors.
pub(crate) fn encode_floors(floors: &HashMap<QueueKey, u64>) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + floors.len() * 32);
    b.extend_from_slice(&(floors.len() as u32).to_le_bytes());
    for (key, next) in floors {
        put_key(&mut b, key);
        b.extend_from_slice(&next.to_le_bytes());
    }
    b
}

/// Decodes the queue floors; `None` if the bytes are not a floors payload.
pub(crate) fn decode_floors(b: &[u8]) -> Option<HashMap<QueueKey, u64>> {
    let mut c = Cursor { b, at: 0 };
    let count = c.u32()?;
    let mut floors = HashMap::new();
    for _ in 0..count {
        let key = c.key()?;
        floors.insert(key, c.u64()?);
    }
    c.done().then_some(floors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_round_trips() {
        let mut c = Checkpoint {
            position: 12345,
            clean: true,
            queues: HashMap::new(),
        };
        c.queues
            .insert(("orders".into(), 3), QueueMark { next: 77, min: 70 });
        c.queues
            .insert(("%DLQ%g".into(), 0), QueueMark { next: 1, min: 1 });
        assert_eq!(Checkpoint::decode(&c.encode()), Some(c));
        assert_eq!(Checkpoint::decode(&[1, 2, 3]), None);
    }

    #[test]
    fn a_checkpoint_without_min_offsets_reads_them_as_zero() {
        let mut b = 99u64.to_le_bytes().to_vec();
        b.push(CLEAN);
        b.extend_from_slice(&1u32.to_le_bytes());
        put_key(&mut b, &("orders".into(), 2));
        b.extend_from_slice(&5u64.to_le_bytes());
        let c = Checkpoint::decode(&b).unwrap();
        assert!(c.clean);
        assert_eq!(
            c.queues[&("orders".to_string(), 2)],
            QueueMark { next: 5, min: 0 }
        );
    }

    #[test]
    fn floors_round_trip() {
        let mut f = HashMap::new();
        f.insert(("orders".to_string(), 1), 32u64);
        f.insert(("x".to_string(), 0), 0u64);
        assert_eq!(decode_floors(&encode_floors(&f)), Some(f));
        assert_eq!(decode_floors(&[1, 0, 0]), None);
        assert_eq!(decode_floors(&[1, 0, 0, 0]), None);
    }
}
