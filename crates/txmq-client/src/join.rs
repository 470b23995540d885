//! Joining concurrent requests of one kind: while a producer has its limit of requests of
//! that kind in flight, further items (messages to send, transactions to end) wait and go
//! out together in the next request.
//!
//! Nothing waits for company on purpose. An item that finds a request slot free takes it,
//! and its request goes out after one yield of the runtime, with the items that arrived
//! meanwhile: callers woken together by one answer (of this kind or of another, as the
//! commits that follow half messages) go out together, rather than the first alone and the
//! rest behind it. Under load, the items that arrive while the slots are taken share the
//! next request, one durable write on the server and one answer; a slot freed by an answer
//! goes to them after the same one yield ([`pass_on`]). Each caller still gets its own
//! outcome.
//!
//! What a request is, and how its answer is shared out, is the [`Join`] of the kind.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::oneshot;

use crate::config::Batching;
use crate::error::CallError;

/// One kind of request whose items can share a call.
pub(crate) trait Join: Send + Sync + Sized + 'static {
    /// What a caller hands in.
    type Item: Send + 'static;
    /// What a caller gets back.
    type Output: Send + 'static;

    /// Sends `items` (one or more that wait, taken together) and answers each caller. Runs
    /// in a task of its own.
    fn many(&self, items: Vec<Pending<Self>>) -> impl Future<Output = ()> + Send;

    /// Whether `item` may share a request whose oldest item is `first`.
    fn goes_with(first: &Self::Item, item: &Self::Item) -> bool;

    /// The bytes `item` adds to a request, counted against [`Batching::max_bytes`].
    fn size(item: &Self::Item) -> usize;

    /// False once the server turned down a request of several items: every item then goes
    /// alone.
    fn joining(&self) -> bool;

    /// The outcome of a caller whose request's task ended without an answer: the runtime
    /// is shutting down, and the request may or may not have reached the server.
    fn abandoned() -> Self::Output;
}

/// The failure of a caller of `rpc` whose request's task ended without an answer: the
/// runtime is shutting down, and the request may or may not have reached the server.
pub(crate) fn abandoned_call(rpc: &'static str) -> CallError {
    CallError::Transport {
        rpc,
        code: tonic::Code::Cancelled,
        message: "the request's task ended without an answer (runtime shutting down)".into(),
    }
}

/// An item waiting to go out, and where its outcome goes.
pub(crate) struct Pending<J: Join> {
    pub(crate) item: J::Item,
    pub(crate) reply: oneshot::Sender<J::Output>,
}

/// The items of one kind a producer sends, and its requests of that kind in flight.
pub(crate) struct Joiner<J: Join> {
    job: J,
    limits: Batching,
    queue: Mutex<Queue<J>>,
}

struct Queue<J: Join> {
    /// Request slots taken: requests in flight, each driven by its own task, and slots
    /// about to take the waiting items ([`pass_on`]).
    in_flight: usize,
    /// Items waiting for a request slot, oldest first.
    waiting: VecDeque<Pending<J>>,
}

impl<J: Join> Default for Queue<J> {
    fn default() -> Self {
        Self {
            in_flight: 0,
            waiting: VecDeque::new(),
        }
    }
}

impl<J: Join> Joiner<J> {
    pub(crate) fn new(job: J, limits: Batching) -> Self {
        let limits = Batching {
            max_in_flight: limits.max_in_flight.max(1),
            max_messages: limits.max_messages.max(1),
            ..limits
        };
        Self {
            job,
            limits,
            queue: Mutex::new(Queue::default()),
        }
    }

    /// Sends `item`: when a request slot is free, after one yield of the runtime, with
    /// the items that arrived meanwhile; otherwise with the others waiting for the next free
    /// slot.
    pub(crate) async fn submit(self: &Arc<Self>, item: J::Item) -> J::Output {
        let (reply, outcome) = oneshot::channel();
        let free = {
            let mut queue = self.lock();
            queue.waiting.push_back(Pending { item, reply });
            let free = queue.in_flight < self.limits.max_in_flight;
            if free {
                queue.in_flight += 1;
            }
            free
        };
        if free {
            tokio::spawn(pass_on(Handoff(Some(Arc::clone(self)))));
        }
        outcome.await.unwrap_or_else(|_| J::abandoned())
    }

    /// The kind of request joined.
    pub(crate) fn job(&self) -> &J {
        &self.job
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue<J>> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The limits of the next request: one item once joining was turned down.
    fn batch_limits(&self) -> Batching {
        if self.job.joining() {
            self.limits
        } else {
            Batching {
                max_messages: 1,
                ..self.limits
            }
        }
    }
}

/// A request slot in use. Dropped (the request done, failed, cancelled or panicked), it
/// passes on in a task of its own ([`pass_on`]).
struct Slot<J: Join>(Arc<Joiner<J>>);

impl<J: Join> Drop for Slot<J> {
    fn drop(&mut self) {
        let handoff = Handoff(Some(Arc::clone(&self.0)));
        // With no runtime any more, the handoff is dropped here: see its `Drop`.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(pass_on(handoff));
        }
    }
}

/// A request slot between two requests.
struct Handoff<J: Join>(Option<Arc<Joiner<J>>>);

impl<J: Join> Handoff<J> {
    /// The next batch and the slot to send it in; `None`, the slot freed, when no item
    /// waits.
    fn next(mut self) -> Option<(Slot<J>, Vec<Pending<J>>)> {
        let joiner = self.0.take()?;
        let batch = {
            let mut queue = joiner.lock();
            let batch = queue.take_batch(&joiner.batch_limits());
            if batch.is_empty() {
                queue.in_flight -= 1;
            }
            batch
        };
        (!batch.is_empty()).then(|| (Slot(joiner), batch))
    }
}

impl<J: Join> Drop for Handoff<J> {
    /// Not handed on: the runtime is gone or shutting down, and nothing more will be sent.
    /// The items waiting are answered with [`Join::abandoned`] (their channels close) and
    /// the slot is freed.
    fn drop(&mut self) {
        if let Some(joiner) = self.0.take() {
            let gone = {
                let mut queue = joiner.lock();
                queue.in_flight -= 1;
                std::mem::take(&mut queue.waiting)
            };
            drop(gone);
        }
    }
}

/// Passes a slot on to the items waiting, in a task of its own so that no caller's
/// cancellation cancels the request of the others in it.
///
/// The answer that freed the slot has just woken its callers, and under load they call
/// again at once. Taking the waiting items right away would leave them out: the first
/// would find a free slot and go alone, and the rest would wait for a slot behind it. So
/// the slot is held while they run, and they join the next request instead.
async fn pass_on<J: Join>(handoff: Handoff<J>) {
    tokio::task::yield_now().await;
    if let Some((slot, batch)) = handoff.next() {
        slot.0.job.many(batch).await;
    }
}

impl<J: Join> Queue<J> {
    /// Takes the oldest waiting item and those after it that go with it, up to the limits
    /// (at least one item, whatever its size). Items whose caller is gone are dropped
    /// unsent.
    fn take_batch(&mut self, limits: &Batching) -> Vec<Pending<J>> {
        self.waiting.retain(|w| !w.reply.is_closed());
        if self.waiting.is_empty() {
            return Vec::new();
        }
        let mut batch: Vec<Pending<J>> = Vec::new();
        let mut bytes = 0;
        let mut rest = VecDeque::with_capacity(self.waiting.len());
        for w in self.waiting.drain(..) {
            let size = J::size(&w.item);
            let joins = match batch.first() {
                None => true,
                Some(first) => {
                    J::goes_with(&first.item, &w.item)
                        && batch.len() < limits.max_messages
                        && bytes + size <= limits.max_bytes
                }
            };
            if joins {
                bytes += size;
                batch.push(w);
            } else {
                rest.push_back(w);
            }
        }
        self.waiting = rest;
        batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Items are (group, size); the same group goes together.
    struct Groups;

    impl Join for Groups {
        type Item = (&'static str, usize);
        type Output = ();

        async fn many(&self, _: Vec<Pending<Self>>) {}

        fn goes_with(first: &Self::Item, item: &Self::Item) -> bool {
            first.0 == item.0
        }

        fn size(item: &Self::Item) -> usize {
            item.1
        }

        fn joining(&self) -> bool {
            true
        }

        fn abandoned() {}
    }

    fn queue(items: &[(&'static str, usize)]) -> (Queue<Groups>, Vec<oneshot::Receiver<()>>) {
        let mut queue = Queue::default();
        let mut receivers = Vec::new();
        for &item in items {
            let (reply, rx) = oneshot::channel();
            queue.waiting.push_back(Pending { item, reply });
            receivers.push(rx);
        }
        (queue, receivers)
    }

    fn limits(max_messages: usize, max_bytes: usize) -> Batching {
        Batching {
            max_in_flight: 1,
            max_messages,
            max_bytes,
        }
    }

    fn items(batch: &[Pending<Groups>]) -> Vec<(&'static str, usize)> {
        batch.iter().map(|p| p.item).collect()
    }

    /// Answers each item with itself, and records the size of each request.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<usize>>);

    impl Join for Recorder {
        type Item = u32;
        type Output = u32;

        async fn many(&self, batch: Vec<Pending<Self>>) {
            self.0.lock().unwrap().push(batch.len());
            for p in batch {
                let _ = p.reply.send(p.item);
            }
        }

        fn goes_with(_: &u32, _: &u32) -> bool {
            true
        }

        fn size(_: &u32) -> usize {
            0
        }

        fn joining(&self) -> bool {
            true
        }

        fn abandoned() -> u32 {
            u32::MAX
        }
    }

    #[tokio::test]
    async fn callers_arriving_together_at_a_free_slot_share_its_request() {
        let joiner = Arc::new(Joiner::new(Recorder::default(), limits(64, 1 << 20)));
        let callers: Vec<_> = (0..8)
            .map(|i| {
                let joiner = Arc::clone(&joiner);
                tokio::spawn(async move { joiner.submit(i).await })
            })
            .collect();
        for (i, caller) in (0..).zip(callers) {
            assert_eq!(caller.await.unwrap(), i, "each caller gets its own outcome");
        }
        // The first found the slot free; the other seven arrived during its yield.
        assert_eq!(*joiner.job().0.lock().unwrap(), [8]);
        // A lone caller goes alone, and the slot is free again afterwards.
        assert_eq!(joiner.submit(9).await, 9);
        assert_eq!(*joiner.job().0.lock().unwrap(), [8, 1]);
        // The slot passes on (here: is freed) in a task of its own, after one yield.
        for _ in 0..100 {
            if joiner.lock().in_flight == 0 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(joiner.lock().in_flight, 0);
    }

    #[test]
    fn a_batch_takes_what_goes_with_the_oldest_in_order_within_the_limits() {
        let (mut queue, _rx) = queue(&[("a", 10), ("b", 10), ("a", 20), ("a", 30), ("a", 40)]);
        // Three items at most: the first three of group a.
        let batch = queue.take_batch(&limits(3, 1 << 20));
        assert_eq!(items(&batch), [("a", 10), ("a", 20), ("a", 30)]);
        // Group b is now oldest; the last item of a waits behind it.
        let batch = queue.take_batch(&limits(3, 1 << 20));
        assert_eq!(items(&batch), [("b", 10)]);
        let batch = queue.take_batch(&limits(3, 1 << 20));
        assert_eq!(items(&batch), [("a", 40)]);
        assert!(queue.take_batch(&limits(3, 1 << 20)).is_empty());
    }

    #[test]
    fn the_byte_limit_stops_a_batch_but_never_an_oversized_first_item() {
        let (mut queue, _rx) = queue(&[("a", 100), ("a", 10), ("a", 10), ("a", 10)]);
        let batch = queue.take_batch(&limits(64, 50));
        assert_eq!(batch.len(), 1, "the 100-byte item goes alone");
        let batch = queue.take_batch(&limits(64, 25));
        assert_eq!(batch.len(), 2, "10 + 10 fit in 25 bytes, a third does not");
        assert_eq!(queue.waiting.len(), 1);
    }

    #[test]
    fn an_item_whose_caller_is_gone_is_not_sent() {
        let (mut queue, mut rx) = queue(&[("a", 1), ("a", 2)]);
        drop(rx.remove(0));
        let batch = queue.take_batch(&limits(64, 1 << 20));
        assert_eq!(items(&batch), [("a", 2)]);
    }
}
