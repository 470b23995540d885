//! The checkpoint: how far the queue index is durable, so that opening the store rescans
//! only the log written after it.
//!
//! Payload (in a state file, see [`crate::state`]): `u64 position`, `u8 flags`,
//! `u32 queue_count`, then per queue `u16 topic_len, topic, u32 queue_id, u64 next_offset`.
//! Every index entry of a queue below `next_offset` points below `position` and was synced
//! before the checkpoint was written; the log below `position` was synced too. Flag bit 0
//! (`clean`) is set only by a clean shutdown: the log ends exactly at `position`.

use std::collections::HashMap;

use crate::queue_index::QueueKey;

pub(crate) const FILE_NAME: &str = "checkpoint";

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Checkpoint {
    pub position: u64,
    /// Written by a clean shutdown: nothing follows `position` in the log.
    pub clean: bool,
    pub queues: HashMap<QueueKey, u64>,
}

impl Checkpoint {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(12 + self.queues.len() * 32);
        b.extend_from_slice(&self.position.to_le_bytes());
        b.push(u8::from(self.clean));
        b.extend_from_slice(&(self.queues.len() as u32).to_le_bytes());
        for ((topic, qid), next) in &self.queues {
            b.extend_from_slice(&(topic.len() as u16).to_le_bytes());
            b.extend_from_slice(topic.as_bytes());
            b.extend_from_slice(&qid.to_le_bytes());
            b.extend_from_slice(&next.to_le_bytes());
        }
        b
    }

    pub fn decode(b: &[u8]) -> Option<Self> {
        let mut at = 0usize;
        let mut take = |n: usize| -> Option<&[u8]> {
            let s = b.get(at..at.checked_add(n)?)?;
            at += n;
            Some(s)
        };
        let position = u64::from_le_bytes(take(8)?.try_into().ok()?);
        let clean = take(1)?[0] & 1 == 1;
        let count = u32::from_le_bytes(take(4)?.try_into().ok()?);
        let mut queues = HashMap::new();
        for _ in 0..count {
            let tl = u16::from_le_bytes(take(2)?.try_into().ok()?) as usize;
            let topic = String::from_utf8(take(tl)?.to_vec()).ok()?;
            let qid = u32::from_le_bytes(take(4)?.try_into().ok()?);
            let next = u64::from_le_bytes(take(8)?.try_into().ok()?);
            queues.insert((topic, qid), next);
        }
        (at == b.len()).then_some(Self {
            position,
            clean,
            queues,
        })
    }
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
        c.queues.insert(("orders".into(), 3), 77);
        c.queues.insert(("%DLQ%g".into(), 0), 1);
        assert_eq!(Checkpoint::decode(&c.encode()), Some(c));
        assert_eq!(Checkpoint::decode(&[1, 2, 3]), None);
    }
}
