//! Joining concurrent sends ([`crate::join`]): normal messages, or half messages for a
//! transactional producer, of one topic share a `SendMessage`, one fdatasync'd append on
//! the server and one answer. Each caller gets its own receipt, after the server stored
//! its message.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use txmq_proto::v2 as pb;

use super::{Prepared, deliver, no_entry, prepare};
use crate::config::Batching;
use crate::error::{CallError, SendError};
use crate::join::{Join, Joiner, Pending, abandoned_call};
use crate::message::{Message, SendReceipt};
use crate::session::Session;

/// Joins the sends of one producer. Clones share the joining.
#[derive(Clone)]
pub(crate) struct Batcher(Arc<Joiner<Sends>>);

impl Batcher {
    pub(crate) fn new(session: Session, transactional: bool, limits: Batching) -> Self {
        let sends = Sends {
            session,
            transactional,
            joining: AtomicBool::new(true),
        };
        Self(Arc::new(Joiner::new(sends, limits)))
    }

    /// Sends one message (a half message if transactional): at once and alone when a
    /// request slot is free, otherwise with the others waiting for the next free slot.
    pub(crate) async fn send(&self, message: Message) -> Result<SendReceipt, SendError> {
        let session = &self.0.job().session;
        let mut prepared = prepare(session, vec![message], self.0.job().transactional)?;
        let wire = prepared.wire.pop().ok_or_else(no_entry)?;
        self.0
            .submit(Outgoing {
                topic: prepared.topic,
                wire,
            })
            .await
    }
}

/// A checked message in its wire form, and its topic.
pub(crate) struct Outgoing {
    topic: String,
    wire: pb::Message,
}

/// Sends of one producer.
pub(crate) struct Sends {
    session: Session,
    /// Half messages (each opening a transaction of its own), or normal messages.
    transactional: bool,
    /// Cleared once the server turned down a request of several messages that it then took
    /// one by one: it does not take such requests (a RocketMQ proxy may refuse batches of
    /// half messages), and from then on every message goes alone.
    joining: AtomicBool,
}

impl Sends {
    fn message_type(&self) -> pb::MessageType {
        if self.transactional {
            pb::MessageType::Transaction
        } else {
            pb::MessageType::Normal
        }
    }

    async fn deliver(
        &self,
        topic: String,
        wire: Vec<pb::Message>,
    ) -> Result<Vec<SendReceipt>, SendError> {
        let prepared = Prepared {
            topic,
            message_type: self.message_type(),
            wire,
        };
        deliver(&self.session, prepared, self.transactional).await
    }

    /// Sends one message in a request of its own.
    async fn one(&self, item: Outgoing) -> <Self as Join>::Output {
        self.deliver(item.topic, vec![item.wire])
            .await
            .and_then(|mut r| r.pop().ok_or_else(no_entry))
    }
}

impl Join for Sends {
    type Item = Outgoing;
    type Output = Result<SendReceipt, SendError>;

    /// A batch the server refuses as a whole (it stores all of a request or none) is sent
    /// again message by message, so that only the message at fault fails.
    async fn many(&self, batch: Vec<Pending<Self>>) {
        let topic = batch[0].item.topic.clone();
        let (wire, replies): (Vec<_>, Vec<_>) =
            batch.into_iter().map(|p| (p.item.wire, p.reply)).unzip();
        let alone = wire.len() == 1;
        let copy = if alone { Vec::new() } else { wire.clone() };
        match self.deliver(topic.clone(), wire).await {
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
                    let outcome = self
                        .one(Outgoing {
                            topic: topic.clone(),
                            wire,
                        })
                        .await;
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

    fn goes_with(first: &Outgoing, item: &Outgoing) -> bool {
        first.topic == item.topic
    }

    fn size(item: &Outgoing) -> usize {
        item.wire.body.len()
    }

    fn joining(&self) -> bool {
        self.joining.load(Ordering::Relaxed)
    }

    fn abandoned() -> Self::Output {
        Err(SendError::Failed {
            attempts: 1,
            cause: abandoned_call("SendMessage"),
        })
    }
}

/// True when the server refused a request for something about its messages (a property,
/// a size), which may concern one message only; not for the topic or the connection.
fn refused_for_a_message(e: &SendError) -> bool {
    matches!(e, SendError::Failed { cause: cause @ CallError::Refused { .. }, .. }
        if !cause.is_transient())
}
