//! The messages of one queue a group holds in memory: out with a consumer, held back (a busy
//! FIFO message group, a delivery time not reached), or settling. They are kept by offset,
//! and indexed by when each becomes visible, so that a look at the queue costs what it finds
//! rather than what waits: a million messages due in an hour cost nothing to a look that
//! delivers the one due now.

use std::collections::{BTreeMap, BTreeSet, HashMap};

/// A handed-out or held message of a queue.
#[derive(Debug, Clone)]
pub(super) struct Pending {
    /// Invisible until then (ms); 0 for a message held back with no time of its own (ready
    /// as soon as nothing holds it).
    pub visible_at: i64,
    /// Deliveries made so far.
    pub attempt: u32,
    /// Bumped on every delivery and invisibility change; a handle names one epoch.
    pub epoch: u32,
    /// Whether it is out with a consumer now (as opposed to held back).
    pub delivered: bool,
    /// FIFO message group.
    pub message_group: Option<String>,
    /// Client whose connection keeps it invisible (push consumers).
    pub renew_for: Option<String>,
    /// When auto-renewal stops, ms.
    pub renew_until: i64,
}

/// The invisible time of a message whose acknowledgement or move to the dead-letter topic
/// is being written: it stays in its queue, out with no one, so that a FIFO group holds its
/// message group meanwhile and no other look takes it; a failed write puts it back as it
/// was.
pub(super) const SETTLING: i64 = i64::MAX;

impl Pending {
    /// A message never delivered, held back until `visible_at` (0: no time of its own).
    pub fn held(visible_at: i64, attempt: u32, message_group: Option<String>) -> Self {
        Pending {
            visible_at,
            attempt,
            epoch: 0,
            delivered: false,
            message_group,
            renew_for: None,
            renew_until: 0,
        }
    }

    /// This message while its acknowledgement or move is written: no handle names it.
    pub fn settling(&self) -> Self {
        Pending {
            visible_at: SETTLING,
            epoch: self.epoch.wrapping_add(1),
            delivered: true,
            renew_for: None,
            ..self.clone()
        }
    }

    /// The message group it keeps busy while it is not visible: one out with a consumer.
    fn out_group(&self) -> Option<&str> {
        self.message_group.as_deref().filter(|_| self.delivered)
    }
}

/// The pending messages of a queue.
///
/// Every message is in exactly one of two indexes: `ready` (visible at the last look) or
/// `timers` (not visible until its time). A message enters `timers` whenever its
/// `visible_at` is above 0 and moves to `ready` at the first look ([`Pendings::promote`])
/// at or after that time; `out_groups` counts the messages in `timers` that are out with
/// a consumer, by message group.
#[derive(Debug, Default)]
pub(super) struct Pendings {
    all: BTreeMap<u64, Pending>,
    ready: BTreeSet<u64>,
    timers: BTreeSet<(i64, u64)>,
    out_groups: HashMap<String, u32>,
}

impl Pendings {
    pub fn get(&self, offset: u64) -> Option<&Pending> {
        self.all.get(&offset)
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.all.len()
    }

    pub fn contains(&self, offset: u64) -> bool {
        self.all.contains_key(&offset)
    }

    /// The oldest pending offset.
    pub fn first_offset(&self) -> Option<u64> {
        self.all.first_key_value().map(|(&o, _)| o)
    }

    /// Messages visible at the last look and not taken since.
    pub fn ready_len(&self) -> usize {
        self.ready.len()
    }

    /// Sets the message at `offset`, replacing what was there.
    pub fn insert(&mut self, offset: u64, p: Pending) {
        self.remove(offset);
        if p.visible_at > 0 {
            self.timers.insert((p.visible_at, offset));
            if let Some(g) = p.out_group() {
                *self.out_groups.entry(g.to_string()).or_insert(0) += 1;
            }
        } else {
            self.ready.insert(offset);
        }
        self.all.insert(offset, p);
    }

    pub fn remove(&mut self, offset: u64) -> Option<Pending> {
        let p = self.all.remove(&offset)?;
        if !self.ready.remove(&offset)
            && self.timers.remove(&(p.visible_at, offset))
            && let Some(g) = p.out_group()
        {
            release(&mut self.out_groups, g);
        }
        Some(p)
    }

    /// Changes the message at `offset` through `f`, keeping the indexes right.
    pub fn update<T>(&mut self, offset: u64, f: impl FnOnce(&mut Pending) -> T) -> Option<T> {
        let mut p = self.remove(offset)?;
        let out = f(&mut p);
        self.insert(offset, p);
        Some(out)
    }

    /// Forgets every message below `start` (retention removed them).
    pub fn drop_below(&mut self, start: u64) {
        while let Some(offset) = self.first_offset().filter(|&o| o < start) {
            self.remove(offset);
        }
    }

    /// Moves the messages whose time came by `now` to the ready ones.
    pub fn promote(&mut self, now: i64) {
        while let Some(&(at, offset)) = self.timers.first()
            && at <= now
        {
            self.timers.pop_first();
            self.ready.insert(offset);
            if let Some(g) = self.all.get(&offset).and_then(Pending::out_group) {
                release(&mut self.out_groups, g);
            }
        }
    }

    /// The first ready offset after `after` (from the oldest when `None`).
    pub fn next_ready(&self, after: Option<u64>) -> Option<u64> {
        match after {
            None => self.ready.first().copied(),
            Some(a) => self.ready.range(a + 1..).next().copied(),
        }
    }

    /// When the next message not yet visible becomes visible (settling ones never do).
    pub fn next_visible(&self) -> Option<i64> {
        self.timers
            .first()
            .map(|&(at, _)| at)
            .filter(|&at| at != SETTLING)
    }

    /// Whether a message of `group` is out with a consumer (or settling), as of the last
    /// [`Pendings::promote`].
    pub fn is_out(&self, group: &str) -> bool {
        self.out_groups.contains_key(group)
    }

    /// Messages out with a consumer and still invisible at `now`.
    pub fn in_flight(&self, now: i64) -> u64 {
        self.timers
            .range((now.saturating_add(1), 0)..)
            .filter(|(_, o)| self.all.get(o).is_some_and(|p| p.delivered))
            .count() as u64
    }

    /// Offsets of the messages that become visible before `at` and are not yet ready.
    pub fn due_before(&self, at: i64) -> Vec<u64> {
        self.timers.range(..(at, 0)).map(|&(_, o)| o).collect()
    }

    /// Checks the indexes against the messages (tests).
    #[cfg(test)]
    pub fn check(&self) {
        assert_eq!(self.all.len(), self.ready.len() + self.timers.len());
        let mut out: HashMap<String, u32> = HashMap::new();
        for &(at, o) in &self.timers {
            let p = &self.all[&o];
            assert_eq!(p.visible_at, at);
            assert!(!self.ready.contains(&o));
            if let Some(g) = p.out_group() {
                *out.entry(g.to_string()).or_insert(0) += 1;
            }
        }
        assert_eq!(out, self.out_groups);
    }
}

/// Counts one message of `group` fewer out with a consumer.
fn release(out_groups: &mut HashMap<String, u32>, group: &str) {
    if let Some(n) = out_groups.get_mut(group) {
        *n -= 1;
        if *n == 0 {
            out_groups.remove(group);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(visible_at: i64, group: &str) -> Pending {
        Pending {
            delivered: true,
            ..Pending::held(visible_at, 1, Some(group.to_string()))
        }
    }

    #[test]
    fn a_message_becomes_ready_when_its_time_comes_and_frees_its_group() {
        let mut p = Pendings::default();
        p.insert(1, out(100, "a"));
        p.insert(2, Pending::held(0, 0, Some("a".into())));
        p.insert(3, Pending::held(50, 0, None));
        p.check();
        assert!(p.is_out("a"));
        assert_eq!(p.next_visible(), Some(50));
        assert_eq!(p.next_ready(None), Some(2));
        p.promote(60);
        p.check();
        assert_eq!(
            (p.next_ready(None), p.next_ready(Some(2))),
            (Some(2), Some(3))
        );
        assert!(p.is_out("a"));
        p.promote(100);
        p.check();
        assert!(
            !p.is_out("a"),
            "back from its consumer, the message frees its group"
        );
        assert_eq!(p.next_ready(None), Some(1), "oldest first");
        assert_eq!(p.ready_len(), 3);
    }

    #[test]
    fn changes_and_removals_keep_the_indexes_right() {
        let mut p = Pendings::default();
        for o in 0..10 {
            p.insert(
                o,
                out(1_000 + o as i64, if o % 2 == 0 { "even" } else { "odd" }),
            );
        }
        p.check();
        p.update(0, |m| *m = m.settling());
        p.update(1, |m| m.visible_at = 5);
        p.check();
        assert_eq!(p.next_visible(), Some(5));
        assert_eq!(p.due_before(1_003), vec![1, 2]);
        p.promote(1_004);
        p.check();
        assert_eq!(p.in_flight(1_004), 6, "5 to 9 out, and 0 settling");
        p.remove(0);
        p.drop_below(4);
        p.check();
        assert_eq!(p.first_offset(), Some(4));
        assert!(p.is_out("even") && p.is_out("odd"));
        for o in 4..10 {
            p.remove(o);
        }
        p.check();
        assert!(!p.is_out("even") && p.next_visible().is_none());
        // A settling message is never due, and keeps its group busy.
        p.insert(20, out(1, "s").settling());
        p.promote(i64::MAX - 1);
        assert!(p.is_out("s") && p.next_visible().is_none());
        p.check();
    }
}
