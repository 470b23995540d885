//! Joining concurrent sends: while a producer has its limit of requests in flight, further
//! normal messages (or half messages, for a transactional producer) wait and go out together
//! in the next request.
//!
//! Nothing waits on purpose: a send that finds a request slot free goes out at once, alone.
//! Only under load, when requests are already in flight, do the messages that arrive
//! meanwhile share one `SendMessage`, one fdatasync'd append on the server and one answer.
//! A slot freed by an answer goes to the waiting messages after one yield, so that the
//! senders of that answer, if they send again at once, are among them ([`pass_on`]).
//! Each caller still gets its own receipt, after the server has stored its message.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::oneshot;
use txmq_proto::v2 as pb;

use super::{Prepared, deliver, no_entry, prepare};
use crate::config::Batching;
use crate::error::{CallError, SendError};
use crate::message::{Message, SendReceipt};
use crate::session::Session;

/// The sends of one producer, and the requests it has in flight.
pub(crate) struct Batcher {
    session: Session,
    /// Half messages (each opening a transaction of its own), or normal messages.
    transactional: bool,
    limits: Batching,
    /// Cleared once the server turned down a request of several messages that it then took
    /// one by one: it does not take such requests (a RocketMQ proxy may refuse batches of
    /// half messages), and from then on every message goes alone.
    joining: AtomicBool,
    queue: Mutex<Queue>,
}

#[derive(Default)]
struct Queue {
    /// Requests in flight, each driven by its own task.
    in_flight: usize,
    /// Messages waiting for a request slot, oldest first. Not empty only while
    /// `in_flight` is at the limit.
    waiting: VecDeque<Waiting>,
}

/// A message waiting to go out, and where its outcome goes.
struct Waiting {
    topic: String,
    wire: pb::Message,
    reply: oneshot::Sender<Result<SendReceipt, SendError>>,
}

impl Batcher {
    pub(crate) fn new(session: Session, transactional: bool, limits: Batching) -> Self {
        let limits = Batching {
            max_in_flight: limits.max_in_flight.max(1),
            max_messages: limits.max_messages.max(1),
            ..limits
        };
        Self {
            session,
            transactional,
            limits,
            joining: AtomicBool::new(true),
            queue: Mutex::new(Queue::default()),
        }
    }

    /// Sends one message (a half message if transactional): at once and alone when a
    /// request slot is free, otherwise with the others waiting for the next free slot.
    pub(crate) async fn send(self: &Arc<Self>, message: Message) -> Result<SendReceipt, SendError> {
        let mut prepared = prepare(&self.session, vec![message], self.transactional)?;
        let outcome = {
            let mut queue = self.lock();
            if queue.in_flight < self.limits.max_in_flight {
                queue.in_flight += 1;
                None
            } else {
                let (reply, outcome) = oneshot::channel();
                let Some(wire) = prepared.wire.pop() else {
                    return Err(no_entry());
                };
                queue.waiting.push_back(Waiting {
                    topic: std::mem::take(&mut prepared.topic),
                    wire,
                    reply,
                });
                Some(outcome)
            }
        };
        match outcome {
            // Sent in this task: nobody else is in this request, so cancelling this
            // caller cancels nothing else. The slot passes on when the send ends.
            None => {
                let _slot = Slot(Arc::clone(self));
                deliver(&self.session, prepared, self.transactional)
                    .await
                    .and_then(|mut r| r.pop().ok_or_else(no_entry))
            }
            // The task of the request ended without an answer: the runtime is shutting
            // down, and the request may or may not have reached the server.
            Some(outcome) => outcome.await.unwrap_or_else(|_| {
                Err(SendError::Failed {
                    attempts: 1,
                    source: CallError::Transport {
                        rpc: "SendMessage",
                        code: tonic::Code::Cancelled,
                        message: "the request's task ended without an answer \
                                  (runtime shutting down)"
                            .into(),
                    },
                })
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn message_type(&self) -> pb::MessageType {
        if self.transactional {
            pb::MessageType::Transaction
        } else {
            pb::MessageType::Normal
        }
    }

    /// The limits of the next request: one message once joining was turned down.
    fn batch_limits(&self) -> Batching {
        if self.joining.load(Ordering::Relaxed) {
            self.limits
        } else {
            Batching {
                max_messages: 1,
                ..self.limits
            }
        }
    }

    /// Sends one batch and answers each of its callers. A batch the server refuses as a
    /// whole (it stores all of a request or none) is sent again message by message, so
    /// that only the message at fault fails.
    async fn send_batch(&self, batch: Vec<Waiting>) {
        let topic = batch[0].topic.clone();
        let (wire, replies): (Vec<_>, Vec<_>) =
            batch.into_iter().map(|w| (w.wire, w.reply)).unzip();
        let alone = wire.len() == 1;
        let copy = if alone { Vec::new() } else { wire.clone() };
        let prepared = Prepared {
            topic: topic.clone(),
            message_type: self.message_type(),
            wire,
        };
        match deliver(&self.session, prepared, self.transactional).await {
            Ok(receipts) => {
                for (reply, receipt) in replies.into_iter().zip(receipts) {
                    let _ = reply.send(Ok(receipt));
                }
            }
            Err(e) if alone || !refused_for_a_message(&e) => {
                for reply in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
            Err(e) => {
                tracing::debug!(%topic, error = %e, messages = replies.len(),
                    "batch refused; sending its messages one by one");
                // Nothing of the refused request was stored, so sending its messages again
                // is no retry, for half messages neither.
                let mut all_taken = true;
                for (reply, wire) in replies.into_iter().zip(copy) {
                    let prepared = Prepared {
                        topic: topic.clone(),
                        message_type: self.message_type(),
                        wire: vec![wire],
                    };
                    let outcome = deliver(&self.session, prepared, self.transactional)
                        .await
                        .and_then(|mut r| r.pop().ok_or_else(no_entry));
                    all_taken &= outcome.is_ok();
                    let _ = reply.send(outcome);
                }
                if all_taken && self.joining.swap(false, Ordering::Relaxed) {
                    tracing::info!(%topic, error = %e,
                        "the server refuses requests of several messages; sending one by one");
                }
            }
        }
    }
}

/// A request slot in use. Dropped (the request done, failed, cancelled or panicked), it
/// passes on in a task of its own ([`pass_on`]).
struct Slot(Arc<Batcher>);

impl Drop for Slot {
    fn drop(&mut self) {
        let handoff = Handoff(Some(Arc::clone(&self.0)));
        // With no runtime any more, the handoff is dropped here: see its `Drop`.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(pass_on(handoff));
        }
    }
}

/// A request slot between two requests.
struct Handoff(Option<Arc<Batcher>>);

impl Handoff {
    /// The next batch and the slot to send it in; `None`, the slot freed, when no message
    /// waits.
    fn next(mut self) -> Option<(Slot, Vec<Waiting>)> {
        let batcher = self.0.take()?;
        let batch = {
            let mut queue = batcher.lock();
            let batch = queue.take_batch(&batcher.batch_limits());
            if batch.is_empty() {
                queue.in_flight -= 1;
            }
            batch
        };
        (!batch.is_empty()).then(|| (Slot(batcher), batch))
    }
}

impl Drop for Handoff {
    /// Not handed on: the runtime is gone or shutting down, and nothing more will be sent.
    /// The messages waiting are answered with an error (their channels close) and the slot
    /// is freed.
    fn drop(&mut self) {
        if let Some(batcher) = self.0.take() {
            let gone = {
                let mut queue = batcher.lock();
                queue.in_flight -= 1;
                std::mem::take(&mut queue.waiting)
            };
            drop(gone);
        }
    }
}

/// Passes a slot on to the messages waiting, in a task of its own so that no caller's
/// cancellation cancels the request of the others in it.
///
/// The answer that freed the slot has just woken its senders, and under load they send
/// again at once. Taking the waiting messages right away would leave them out: the first
/// would find a free slot and go alone, and the rest would wait for a slot behind it. So
/// the slot is held while they run, and they join the next request instead.
async fn pass_on(handoff: Handoff) {
    tokio::task::yield_now().await;
    if let Some((slot, batch)) = handoff.next() {
        slot.0.send_batch(batch).await;
    }
}

impl Queue {
    /// Takes the oldest waiting message and those after it of the same topic, up to the
    /// limits (at least one message, whatever its size). Messages whose caller is gone
    /// are dropped unsent.
    fn take_batch(&mut self, limits: &Batching) -> Vec<Waiting> {
        self.waiting.retain(|w| !w.reply.is_closed());
        let Some(first) = self.waiting.front() else {
            return Vec::new();
        };
        let topic = first.topic.clone();
        let mut batch = Vec::new();
        let mut bytes = 0;
        let mut rest = VecDeque::with_capacity(self.waiting.len());
        for w in self.waiting.drain(..) {
            let size = w.wire.body.len();
            let fits = batch.is_empty()
                || (batch.len() < limits.max_messages && bytes + size <= limits.max_bytes);
            if w.topic == topic && fits {
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

/// True when the server refused a request for something about its messages (a property,
/// a size), which may concern one message only; not for the topic or the connection.
fn refused_for_a_message(e: &SendError) -> bool {
    matches!(e, SendError::Failed { source: source @ CallError::Refused { .. }, .. }
        if !source.is_transient())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiting(
        topic: &str,
        size: usize,
    ) -> (Waiting, oneshot::Receiver<Result<SendReceipt, SendError>>) {
        let (reply, rx) = oneshot::channel();
        let wire = pb::Message {
            body: vec![0; size].into(),
            ..Default::default()
        };
        (
            Waiting {
                topic: topic.into(),
                wire,
                reply,
            },
            rx,
        )
    }

    fn limits(max_messages: usize, max_bytes: usize) -> Batching {
        Batching {
            max_in_flight: 1,
            max_messages,
            max_bytes,
        }
    }

    #[test]
    fn a_batch_takes_one_topic_in_order_within_the_limits() {
        let mut queue = Queue::default();
        let mut receivers = Vec::new();
        for (topic, size) in [("a", 10), ("b", 10), ("a", 20), ("a", 30), ("a", 40)] {
            let (w, rx) = waiting(topic, size);
            queue.waiting.push_back(w);
            receivers.push(rx);
        }
        let sizes = |b: &[Waiting]| b.iter().map(|w| w.wire.body.len()).collect::<Vec<_>>();

        // Three messages at most: the first three of topic a.
        let batch = queue.take_batch(&limits(3, 1 << 20));
        assert_eq!(sizes(&batch), [10, 20, 30]);
        assert!(batch.iter().all(|w| w.topic == "a"));
        // Topic b is now oldest; the last message of a waits behind it.
        let batch = queue.take_batch(&limits(3, 1 << 20));
        assert_eq!((batch[0].topic.as_str(), sizes(&batch)), ("b", vec![10]));
        let batch = queue.take_batch(&limits(3, 1 << 20));
        assert_eq!(sizes(&batch), [40]);
        assert!(queue.take_batch(&limits(3, 1 << 20)).is_empty());
    }

    #[test]
    fn the_byte_limit_stops_a_batch_but_never_an_oversized_first_message() {
        let mut queue = Queue::default();
        let mut receivers = Vec::new();
        for size in [100, 10, 10, 10] {
            let (w, rx) = waiting("a", size);
            queue.waiting.push_back(w);
            receivers.push(rx);
        }
        let batch = queue.take_batch(&limits(64, 50));
        assert_eq!(batch.len(), 1, "the 100-byte message goes alone");
        let batch = queue.take_batch(&limits(64, 25));
        assert_eq!(batch.len(), 2, "10 + 10 fit in 25 bytes, a third does not");
        assert_eq!(queue.waiting.len(), 1);
    }

    #[test]
    fn a_message_whose_caller_is_gone_is_not_sent() {
        let mut queue = Queue::default();
        let (gone, rx) = waiting("a", 1);
        drop(rx);
        let (kept, _rx) = waiting("a", 2);
        queue.waiting.extend([gone, kept]);
        let batch = queue.take_batch(&limits(64, 1 << 20));
        assert_eq!(batch.len(), 1);
        assert_eq!(batch[0].wire.body.len(), 2);
    }
}
