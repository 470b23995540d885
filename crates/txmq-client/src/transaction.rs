//! Transactional messages: where a half message is sent, and where the client resolves a
//! transaction, on its own (commit/rollback) or when the server checks back.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use txmq_proto::txmq::v1::MAX_END_TRANSACTIONS;
use txmq_proto::v2 as pb;

use crate::config::{Batching, ClientConfig};
use crate::error::{CallError, ConnectError, EndTransactionError, SendError};
use crate::join::{Join, Joiner, Pending, abandoned_call};
use crate::message::{Message, MessageView, SendReceipt};
use crate::producer::{self, batch::Batcher};
use crate::session::{BoxFuture, CheckFn, Role, Session};

/// The outcome of a local transaction, as a [`TransactionChecker`] reports it.
///
/// # Example
/// ```
/// use txmq_client::TransactionResolution;
/// let order_row_exists = true;
/// let r = if order_row_exists { TransactionResolution::Commit } else { TransactionResolution::Unknown };
/// assert_eq!(r, TransactionResolution::Commit);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransactionResolution {
    /// The local transaction committed: deliver the message.
    Commit,
    /// The local transaction rolled back and never will commit: drop the message.
    Rollback,
    /// Not known yet: nothing is sent and the server asks again later.
    Unknown,
}

/// Answers the server's check-backs of transactions whose outcome it did not learn
/// (the producer crashed, or its commit or rollback was lost).
///
/// Called on a task of its own for each check-back; the answer is sent to the server with
/// `EndTransaction` (source `SOURCE_SERVER_CHECK`), except for
/// [`TransactionResolution::Unknown`], for which nothing is sent. At most
/// [`ClientConfig::max_concurrent_checks`](crate::ClientConfig::max_concurrent_checks) calls
/// run at once, and never two for one transaction: a check-back that comes while one of
/// the same transaction is waiting or running is dropped (the server asks again later). A
/// call that takes more than 30 s is dropped, with no answer sent: bound the checker's own
/// waits (a database pool's acquire timeout, say) well below that.
///
/// # Example
/// ```
/// use txmq_client::{MessageView, TransactionChecker, TransactionResolution};
///
/// struct Orders;
///
/// impl TransactionChecker for Orders {
///     async fn check(&self, transaction_id: &str, message: &MessageView) -> TransactionResolution {
///         // Look the order up by the message key, e.g. in the database.
///         let paid = message.keys().iter().any(|k| k.starts_with("paid-"));
///         if paid { TransactionResolution::Commit } else { TransactionResolution::Rollback }
///     }
/// }
/// ```
pub trait TransactionChecker: Send + Sync + 'static {
    /// The outcome of the local transaction of `transaction_id`, whose half message is
    /// `message` (its id, topic, keys, properties and body as sent).
    fn check(
        &self,
        transaction_id: &str,
        message: &MessageView,
    ) -> impl Future<Output = TransactionResolution> + Send;
}

/// The checker with its type erased, for the telemetry reader.
fn erase<C: TransactionChecker>(checker: C) -> CheckFn {
    let checker = Arc::new(checker);
    Arc::new(move |transaction_id: String, message: MessageView| {
        let checker = checker.clone();
        Box::pin(async move { checker.check(&transaction_id, &message).await })
            as BoxFuture<TransactionResolution>
    })
}

/// Sends transactional messages: [`begin`](Self::begin) sends a half message, which
/// consumers do not see until [`Transaction::commit`]; [`Transaction::rollback`] drops it.
/// When neither arrives, the server asks the [`TransactionChecker`].
///
/// The topic must take transactional messages. Cheap to clone; clones share one
/// connection. It can also send ordinary messages.
///
/// # Example
/// ```no_run
/// # async fn f() -> Result<(), txmq_client::Error> {
/// use txmq_client::{
///     ClientConfig, Message, MessageView, TransactionChecker, TransactionResolution,
///     TransactionalProducer,
/// };
///
/// struct AlwaysCommit;
/// impl TransactionChecker for AlwaysCommit {
///     async fn check(&self, _: &str, _: &MessageView) -> TransactionResolution {
///         TransactionResolution::Commit
///     }
/// }
///
/// let config = ClientConfig::new("127.0.0.1:8081");
/// let producer = TransactionalProducer::connect(config, ["payments"], AlwaysCommit).await?;
/// let tx = producer.begin(Message::new("payments", "order 42 paid")).await?;
/// // ... the local transaction ...
/// tx.commit().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct TransactionalProducer {
    session: Session,
    /// Joins concurrent half messages into shared requests; `None` when batching is off.
    batcher: Option<Batcher>,
    /// Joins concurrent commits and rollbacks into shared requests; `None` when batching
    /// is off.
    ends: Option<Arc<Joiner<Ends>>>,
}

impl TransactionalProducer {
    /// Connects a producer of transactional messages to `topics`, with `checker` answering
    /// check-backs. Check-backs of a topic come only once the producer announced it: list
    /// every topic here so that check-backs reach this producer right after a restart.
    ///
    /// Cancelling drops the connection being made.
    ///
    /// # Errors
    /// As [`Producer::connect`](crate::Producer::connect).
    pub async fn connect<C: TransactionChecker>(
        config: ClientConfig,
        topics: impl IntoIterator<Item = impl Into<String>>,
        checker: C,
    ) -> Result<Self, ConnectError> {
        let topics = topics.into_iter().map(Into::into).collect();
        let batching = config.batching;
        let session =
            Session::connect(config, Role::Producer { topics }, Some(erase(checker))).await?;
        let batcher = batching.map(|limits| Batcher::new(session.clone(), true, limits));
        let ends = batching.map(|limits| Arc::new(Ends::joiner(session.clone(), limits)));
        Ok(Self {
            session,
            batcher,
            ends,
        })
    }

    /// Sends `message` as a half message (sent once, never retried) and returns the open
    /// transaction.
    ///
    /// # Cancel safety
    /// Not cancel safe: cancelled after the request went out, a half message may have been
    /// stored; the server then checks it back.
    ///
    /// # Errors
    /// As [`Producer::send`](crate::Producer::send); a message group or delivery time is
    /// an [`SendError::InvalidMessage`].
    pub async fn begin(&self, message: Message) -> Result<Transaction, SendError> {
        let topic = message.topic().to_string();
        let receipt = match &self.batcher {
            Some(batcher) => batcher.send(message).await?,
            None => producer::send_one(&self.session, message, true).await?,
        };
        Ok(Transaction {
            session: self.session.clone(),
            ends: self.ends.clone(),
            topic,
            receipt,
        })
    }

    /// Resumes a transaction begun earlier (e.g. by a process that crashed after recording
    /// the ids), to commit or roll it back.
    pub fn resume(
        &self,
        topic: impl Into<String>,
        message_id: impl Into<String>,
        transaction_id: impl Into<String>,
    ) -> Transaction {
        Transaction {
            session: self.session.clone(),
            ends: self.ends.clone(),
            topic: topic.into(),
            receipt: SendReceipt {
                message_id: message_id.into(),
                transaction_id: transaction_id.into(),
                offset: -1,
                recall_handle: String::new(),
            },
        }
    }

    /// Sends an ordinary (non-transactional) message, as [`Producer::send`] does.
    ///
    /// [`Producer::send`]: crate::Producer::send
    ///
    /// # Cancel safety
    /// Not cancel safe, like [`Producer::send`](crate::Producer::send).
    ///
    /// # Errors
    /// As [`Producer::send`](crate::Producer::send).
    pub async fn send(&self, message: Message) -> Result<SendReceipt, SendError> {
        producer::send_one(&self.session, message, false).await
    }

    /// The client id this producer sends as `x-mq-client-id`.
    pub fn client_id(&self) -> &str {
        self.session.client_id()
    }

    /// Tells the server this producer is going away, then closes the connection (once the
    /// other clones are dropped too). Open transactions are then checked back with other
    /// producers of their topics.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn shutdown(self) {
        if let Err(e) = self.session.notify_termination().await {
            tracing::debug!(error = %e, "NotifyClientTermination failed");
        }
    }
}

/// An open transaction: a half message the server holds until it is committed or rolled
/// back. Dropped without either, it is resolved by the server's check-back.
///
/// # Example
/// ```no_run
/// # async fn f(producer: txmq_client::TransactionalProducer) -> Result<(), txmq_client::Error> {
/// let tx = producer.begin(txmq_client::Message::new("payments", "paid")).await?;
/// let local_ok = true; // the local (database) transaction
/// if local_ok { tx.commit().await? } else { tx.rollback().await? }
/// # Ok(()) }
/// ```
#[must_use = "a transaction neither committed nor rolled back waits for the server's check-back"]
pub struct Transaction {
    session: Session,
    ends: Option<Arc<Joiner<Ends>>>,
    topic: String,
    receipt: SendReceipt,
}

impl Transaction {
    /// The topic of the half message.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The id of the half message.
    pub fn message_id(&self) -> &str {
        &self.receipt.message_id
    }

    /// The transaction id the server gave.
    pub fn transaction_id(&self) -> &str {
        &self.receipt.transaction_id
    }

    /// The receipt of the half message.
    pub fn receipt(&self) -> &SendReceipt {
        &self.receipt
    }

    /// Commits: the message becomes visible to consumers.
    ///
    /// # Cancel safety
    /// Not cancel safe: the commit may or may not have reached the server; if it did not,
    /// the check-back settles it.
    ///
    /// # Errors
    /// If the call failed or was refused; the check-back then settles the transaction.
    pub async fn commit(self) -> Result<(), EndTransactionError> {
        self.end(pb::TransactionResolution::Commit).await
    }

    /// Rolls back: the message is dropped.
    ///
    /// # Cancel safety
    /// Not cancel safe, like [`commit`](Self::commit).
    ///
    /// # Errors
    /// As [`commit`](Self::commit).
    pub async fn rollback(self) -> Result<(), EndTransactionError> {
        self.end(pb::TransactionResolution::Rollback).await
    }

    async fn end(self, resolution: pb::TransactionResolution) -> Result<(), EndTransactionError> {
        let request = self.session.end_request(
            &self.topic,
            &self.receipt.message_id,
            &self.receipt.transaction_id,
            resolution,
            pb::TransactionSource::SourceClient,
        );
        let policy = self.session.retry_policy();
        // Resolving twice is harmless: retry transient failures like a send.
        let mut attempt = 1;
        loop {
            let outcome = match &self.ends {
                Some(ends) => ends.submit(request.clone()).await,
                None => self.session.end_transaction(request.clone()).await,
            };
            match outcome {
                Ok(()) => return Ok(()),
                Err(e) if e.is_transient() && attempt < policy.max_attempts => {
                    tokio::time::sleep(policy.delay(attempt)).await;
                    attempt += 1;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Commits and rollbacks of one producer, joined ([`crate::join`]) into calls of txmq's
/// own `txmq.v1.Transactions.EndTransactions`, whose decisions share one durable write on
/// the server. A server without it (a RocketMQ proxy answers `UNIMPLEMENTED`) gets
/// `EndTransaction` calls, one per transaction, from then on.
pub(crate) struct Ends {
    session: Session,
    /// Cleared once the server turned down `EndTransactions`.
    joining: AtomicBool,
}

impl Ends {
    fn joiner(session: Session, limits: Batching) -> Joiner<Self> {
        let limits = Batching {
            max_messages: limits.max_messages.min(MAX_END_TRANSACTIONS),
            ..limits
        };
        let ends = Self {
            session,
            joining: AtomicBool::new(true),
        };
        Joiner::new(ends, limits)
    }
}

impl Ends {
    /// Sends one decision in an `EndTransaction` of its own.
    async fn one(&self, request: pb::EndTransactionRequest) -> Result<(), CallError> {
        self.session.end_transaction(request).await
    }

    /// Sends each decision in an `EndTransaction` of its own, one after the other, and
    /// answers its caller.
    async fn each_alone(
        &self,
        requests: Vec<pb::EndTransactionRequest>,
        replies: Vec<tokio::sync::oneshot::Sender<Result<(), CallError>>>,
    ) {
        for (request, reply) in requests.into_iter().zip(replies) {
            let _ = reply.send(self.one(request).await);
        }
    }
}

impl Join for Ends {
    type Item = pb::EndTransactionRequest;
    type Output = Result<(), CallError>;

    async fn many(&self, batch: Vec<Pending<Self>>) {
        let (requests, replies): (Vec<_>, Vec<_>) =
            batch.into_iter().map(|p| (p.item, p.reply)).unzip();
        if requests.len() == 1 {
            return self.each_alone(requests, replies).await;
        }
        match self.session.end_transactions(requests.clone()).await {
            Ok(outcomes) => {
                for (reply, outcome) in replies.into_iter().zip(outcomes) {
                    let _ = reply.send(outcome);
                }
            }
            Err(CallError::Transport {
                code: tonic::Code::Unimplemented,
                message,
                ..
            }) => {
                if self.joining.swap(false, Ordering::Relaxed) {
                    tracing::info!(%message, "the server does not serve EndTransactions; \
                        ending transactions one by one");
                }
                // Nothing was decided by the refused call.
                self.each_alone(requests, replies).await;
            }
            Err(e) => {
                for reply in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }

    /// Transactions of any topics share a call.
    fn goes_with(_: &Self::Item, _: &Self::Item) -> bool {
        true
    }

    /// A decision carries no body: only the count of entries limits a call.
    fn size(_: &Self::Item) -> usize {
        0
    }

    fn joining(&self) -> bool {
        self.joining.load(Ordering::Relaxed)
    }

    fn abandoned() -> Self::Output {
        Err(abandoned_call("EndTransactions"))
    }
}

impl std::fmt::Debug for Transaction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transaction")
            .field("topic", &self.topic)
            .field("message_id", &self.receipt.message_id)
            .field("transaction_id", &self.receipt.transaction_id)
            .finish()
    }
}
