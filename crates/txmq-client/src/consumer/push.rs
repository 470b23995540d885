//! The push consumer: receive loops hand each message to the application's handler, with
//! bounded concurrency, then acknowledge it (handler `Ok`) or ask for a later redelivery
//! (handler `Err`). In a FIFO group the messages of one message group are handled one at a
//! time, in order, retried in place.

use std::collections::HashMap;
use std::fmt::Display;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinHandle;
use txmq_proto::v2 as pb;

use super::{Acker, Subscription};
use crate::config::ClientConfig;
use crate::error::ConnectError;
use crate::message::MessageView;
use crate::retry::{RetryPolicy, from_duration};
use crate::session::{BoxFuture, Role, Session};

/// Handlers called at once, by default.
const DEFAULT_CONCURRENCY: usize = 16;
/// Receive batch when the server's settings do not say.
const DEFAULT_BATCH: usize = 32;
/// How often the queues to receive from are asked again.
const ASSIGNMENT_REFRESH_PERIOD: Duration = Duration::from_secs(30);

/// The handler with its type erased; the error is kept as text for the log.
type Handler = Arc<dyn Fn(MessageView) -> BoxFuture<Result<(), String>> + Send + Sync>;

/// Configures a [`PushConsumer`]; [`start`](Self::start) connects and starts it.
///
/// # Example
/// ```no_run
/// # async fn f() -> Result<(), txmq_client::Error> {
/// use txmq_client::{ClientConfig, PushConsumer, Subscription};
///
/// let consumer = PushConsumer::builder(ClientConfig::new("127.0.0.1:8081"), "shipping")
///     .subscribe(Subscription::new("orders", "paid"))
///     .max_concurrency(32)
///     .start(|m| async move {
///         println!("ship {}", String::from_utf8_lossy(m.body()));
///         Ok::<(), std::io::Error>(())
///     })
///     .await?;
/// # consumer.shutdown().await;
/// # Ok(()) }
/// ```
#[must_use = "a builder does nothing until started"]
pub struct PushConsumerBuilder {
    config: ClientConfig,
    group: String,
    subscriptions: Vec<Subscription>,
    max_concurrency: usize,
}

impl PushConsumerBuilder {
    /// Adds a subscription.
    pub fn subscribe(mut self, subscription: Subscription) -> Self {
        self.subscriptions.push(subscription);
        self
    }

    /// Sets how many handlers may run at once (default 16; at least 1). It also bounds the
    /// messages the consumer holds: it receives no more than it can hand out.
    pub fn max_concurrency(mut self, n: usize) -> Self {
        self.max_concurrency = n.max(1);
        self
    }

    /// Connects, learns from the server whether the group is FIFO and its retry policy,
    /// asks which queues to receive from, and starts receiving.
    ///
    /// `handler` is called once per delivery: `Ok` acknowledges the message; `Err` (or a
    /// panic) has it delivered again after the group's backoff for that attempt (in a FIFO
    /// group: handled again in place after the backoff, and dead-lettered after the
    /// group's max attempts). Handlers must be idempotent: delivery is at least once.
    ///
    /// Cancelling drops the connection being made.
    ///
    /// # Errors
    /// As [`Producer::connect`](crate::Producer::connect),
    /// [`ConnectError::NoSubscription`], and [`ConnectError::Assignment`] when a topic
    /// has no queues for the group (e.g. it does not exist).
    pub async fn start<F, Fut, E>(self, handler: F) -> Result<PushConsumer, ConnectError>
    where
        F: Fn(MessageView) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Display + Send + 'static,
    {
        if self.subscriptions.is_empty() {
            return Err(ConnectError::NoSubscription);
        }
        let role = Role::PushConsumer {
            group: self.group.clone(),
            subscriptions: self.subscriptions.clone(),
        };
        let batching = self.config.batching;
        let session = Session::connect(self.config, role, None).await?;
        let settings = session.subscription_settings();
        let fifo = settings.as_ref().and_then(|s| s.fifo).unwrap_or(false);
        let batch = settings
            .as_ref()
            .and_then(|s| s.receive_batch_size)
            .and_then(|b| usize::try_from(b).ok())
            .filter(|&b| b > 0)
            .unwrap_or(DEFAULT_BATCH)
            .min(self.max_concurrency);
        let mut assigned = Vec::new();
        for sub in &self.subscriptions {
            let queues = session
                .query_assignment(&sub.topic, &self.group)
                .await
                .map_err(|source| ConnectError::Assignment {
                    topic: sub.topic.clone(),
                    cause: source,
                })?;
            assigned.push((sub.clone(), queues));
        }
        let handler: Handler = Arc::new(move |m| {
            let fut = handler(m);
            Box::pin(async move { fut.await.map_err(|e| e.to_string()) })
        });
        let (stop, stopped) = watch::channel(false);
        let acks = Acker::new(&session, &self.group, batching);
        let worker = Arc::new(Worker {
            session: session.clone(),
            acks,
            group: self.group,
            handler,
            permits: Arc::new(Semaphore::new(self.max_concurrency)),
            fifo,
            batch,
            stopped,
        });
        let supervisors = assigned
            .into_iter()
            .map(|(sub, queues)| tokio::spawn(worker.clone().supervise(sub, queues)))
            .collect();
        Ok(PushConsumer {
            worker,
            stop,
            supervisors,
            max_concurrency: self.max_concurrency,
        })
    }
}

/// Calls a handler for each message of its subscriptions, with bounded concurrency;
/// acknowledges on `Ok`, and on `Err` has the message delivered again after the backoff
/// the server's settings give for that delivery attempt.
///
/// In a FIFO group (the server's settings say so), the messages of one message group are
/// handled one at a time, in order; a failed one is handled again in place after the
/// backoff, and forwarded to the dead-letter queue after the group's max attempts.
///
/// Receives with `auto_renew`: the server keeps a message invisible while its handler runs
/// and the client is connected. Dropping the consumer stops receiving; call
/// [`shutdown`](Self::shutdown) to also wait for the running handlers.
///
/// # Example
/// ```no_run
/// # async fn f() -> Result<(), txmq_client::Error> {
/// use txmq_client::{ClientConfig, PushConsumer, Subscription};
///
/// let consumer = PushConsumer::builder(ClientConfig::new("127.0.0.1:8081"), "billing")
///     .subscribe(Subscription::all("orders"))
///     .start(|m| async move {
///         if m.body().is_empty() {
///             return Err("empty order"); // redelivered after the group's backoff
///         }
///         Ok(())
///     })
///     .await?;
/// tokio::time::sleep(std::time::Duration::from_secs(60)).await;
/// consumer.shutdown().await;
/// # Ok(()) }
/// ```
pub struct PushConsumer {
    worker: Arc<Worker>,
    stop: watch::Sender<bool>,
    /// One task per subscription, keeping a receive loop per assigned queue.
    supervisors: Vec<JoinHandle<()>>,
    max_concurrency: usize,
}

impl PushConsumer {
    /// A builder for a consumer of `group`.
    pub fn builder(config: ClientConfig, group: impl Into<String>) -> PushConsumerBuilder {
        PushConsumerBuilder {
            config,
            group: group.into(),
            subscriptions: Vec::new(),
            max_concurrency: DEFAULT_CONCURRENCY,
        }
    }

    /// Whether the server runs the group as FIFO.
    pub fn is_fifo(&self) -> bool {
        self.worker.fifo
    }

    /// The client id this consumer sends as `x-mq-client-id`.
    pub fn client_id(&self) -> &str {
        self.worker.session.client_id()
    }

    /// Stops receiving, waits for the running handlers (and their acks) to finish, then
    /// tells the server the client is going away.
    ///
    /// A long poll under way is abandoned; a message the server was handing out on it at
    /// that moment comes again after its invisible time.
    ///
    /// # Cancel safety
    /// Cancel safe: receiving has stopped either way; handlers still running finish on
    /// their own.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        for s in std::mem::take(&mut self.supervisors) {
            let _ = s.await;
        }
        let all = u32::try_from(self.max_concurrency).unwrap_or(u32::MAX);
        // Every handler holds a permit until its message is acknowledged or given back.
        let _ = self.worker.permits.acquire_many(all).await;
        if let Err(e) = self.worker.session.notify_termination().await {
            tracing::debug!(error = %e, "NotifyClientTermination failed");
        }
    }
}

impl Drop for PushConsumer {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

struct Worker {
    session: Session,
    /// Sends acknowledgements, joining those that wait into shared calls.
    acks: Acker,
    group: String,
    handler: Handler,
    /// One permit per message held, from receipt to ack or nack.
    permits: Arc<Semaphore>,
    fifo: bool,
    batch: usize,
    stopped: watch::Receiver<bool>,
}

/// Identifies an assigned queue: broker name and queue id.
fn queue_key(q: &pb::MessageQueue) -> (String, i32) {
    let broker = q
        .broker
        .as_ref()
        .map(|b| b.name.clone())
        .unwrap_or_default();
    (broker, q.id)
}

/// Waits until the consumer is stopped.
async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|&s| s).await;
}

impl Worker {
    fn is_stopped(&self) -> bool {
        *self.stopped.borrow()
    }

    /// The consumer retry policy of the server's settings (they may change at run time).
    fn policy(&self) -> RetryPolicy {
        self.session.retry_policy()
    }

    /// Keeps one receive loop per queue assigned for `sub`, asking for the assignment again
    /// every [`ASSIGNMENT_REFRESH_PERIOD`]; a failed or empty answer keeps the loops as
    /// they are. Returns once stopped and its loops have ended.
    async fn supervise(self: Arc<Self>, sub: Subscription, mut queues: Vec<pb::MessageQueue>) {
        let filter = sub.filter.to_proto();
        let mut loops: HashMap<(String, i32), JoinHandle<()>> = HashMap::new();
        loop {
            let wanted: HashMap<(String, i32), pb::MessageQueue> =
                queues.iter().map(|q| (queue_key(q), q.clone())).collect();
            loops.retain(|k, task| {
                let keep = wanted.contains_key(k) && !task.is_finished();
                if !keep {
                    // Its handlers run on tasks of their own and finish.
                    task.abort();
                }
                keep
            });
            for (k, q) in wanted {
                loops
                    .entry(k)
                    .or_insert_with(|| tokio::spawn(self.clone().receive_loop(q, filter.clone())));
            }
            tokio::select! {
                () = tokio::time::sleep(ASSIGNMENT_REFRESH_PERIOD) => {}
                () = stopped(self.stopped.clone()) => break,
            }
            match self.session.query_assignment(&sub.topic, &self.group).await {
                Ok(q) if !q.is_empty() => queues = q,
                Ok(_) => {
                    tracing::debug!(topic = %sub.topic, "empty assignment; keeping the queues")
                }
                Err(e) => {
                    tracing::debug!(topic = %sub.topic, error = %e, "assignment refresh failed")
                }
            }
        }
        for (_, task) in loops {
            let _ = task.await;
        }
    }

    /// Receives from `queue` until stopped, handing each message to a handler.
    async fn receive_loop(self: Arc<Self>, queue: pb::MessageQueue, filter: pb::FilterExpression) {
        let long_polling = self.session.config().long_polling_timeout;
        let mut failures: u32 = 0;
        while !self.is_stopped() {
            // Receive no more than can be handed out now.
            let first = tokio::select! {
                p = self.permits.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return,
                },
                () = stopped(self.stopped.clone()) => return,
            };
            let mut held = vec![first];
            while held.len() < self.batch {
                match self.permits.clone().try_acquire_owned() {
                    Ok(p) => held.push(p),
                    Err(_) => break,
                }
            }
            let request = pb::ReceiveMessageRequest {
                group: Some(self.session.resource(&self.group)),
                message_queue: Some(queue.clone()),
                filter_expression: Some(filter.clone()),
                batch_size: i32::try_from(held.len()).unwrap_or(i32::MAX),
                invisible_duration: None,
                auto_renew: true,
                long_polling_timeout: Some(from_duration(long_polling)),
                attempt_id: Some(uuid::Uuid::now_v7().to_string()),
            };
            let received = tokio::select! {
                r = self.session.receive(request, long_polling) => r,
                () = stopped(self.stopped.clone()) => return,
            };
            match received {
                Ok(messages) => {
                    failures = 0;
                    let views = messages.into_iter().map(MessageView::from_proto).collect();
                    self.dispatch(views, held);
                }
                Err(e) => {
                    drop(held);
                    failures = failures.saturating_add(1);
                    let wait = Duration::from_millis(100)
                        .saturating_mul(1 << failures.min(6))
                        .min(Duration::from_secs(5));
                    tracing::warn!(group = %self.group, error = %e, ?wait, "receive failed");
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = stopped(self.stopped.clone()) => return,
                    }
                }
            }
        }
    }

    /// Starts handling a batch; each message takes one of `permits` (extra ones go back).
    /// A server that answered with more messages than asked for gets them all handled:
    /// each extra one waits on its task for a permit of its own.
    fn dispatch(self: &Arc<Self>, messages: Vec<MessageView>, permits: Vec<OwnedSemaphorePermit>) {
        if messages.len() > permits.len() {
            tracing::debug!(
                asked = permits.len(),
                got = messages.len(),
                "the server answered with more messages than asked for"
            );
        }
        let mut permits = permits.into_iter();
        let paired: Vec<(MessageView, Option<OwnedSemaphorePermit>)> =
            messages.into_iter().map(|m| (m, permits.next())).collect();
        drop(permits);
        if !self.fifo {
            for (m, permit) in paired {
                let worker = self.clone();
                tokio::spawn(async move {
                    let Some(permit) = worker.permit(permit).await else {
                        return;
                    };
                    worker.consume(m).await;
                    drop(permit);
                });
            }
            return;
        }
        // FIFO: one task per message group, taking its messages in order.
        let mut groups: Vec<Vec<(MessageView, Option<OwnedSemaphorePermit>)>> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        for (m, permit) in paired {
            match m.message_group().map(str::to_string) {
                Some(g) => {
                    let i = *index.entry(g).or_insert_with(|| {
                        groups.push(Vec::new());
                        groups.len() - 1
                    });
                    groups[i].push((m, permit));
                }
                None => groups.push(vec![(m, permit)]),
            }
        }
        for group in groups {
            let worker = self.clone();
            tokio::spawn(async move {
                let mut rest = group.into_iter();
                for (m, permit) in rest.by_ref() {
                    let Some(permit) = worker.permit(permit).await else {
                        break;
                    };
                    let done = worker.consume_in_order(m).await;
                    drop(permit);
                    if !done {
                        // Stopped: the rest of the group stays unacknowledged, in order.
                        break;
                    }
                }
            });
        }
    }

    /// `held`, or a permit waited for; `None` once the consumer stops (the message stays
    /// unacknowledged and comes back).
    async fn permit(&self, held: Option<OwnedSemaphorePermit>) -> Option<OwnedSemaphorePermit> {
        if held.is_some() {
            return held;
        }
        tokio::select! {
            p = self.permits.clone().acquire_owned() => p.ok(),
            () = stopped(self.stopped.clone()) => None,
        }
    }

    /// Runs the handler on its own task, so that a panic counts as a failure.
    async fn run_handler(&self, m: MessageView) -> Result<(), String> {
        match tokio::spawn((self.handler)(m)).await {
            Ok(r) => r,
            Err(e) => Err(format!("the handler panicked: {e}")),
        }
    }

    /// Handles one message of an unordered group: ack on success, otherwise make it
    /// visible again after the backoff of its attempt.
    async fn consume(&self, m: MessageView) {
        match self.run_handler(m.clone()).await {
            Ok(()) => self.ack(&m).await,
            Err(error) => {
                let delay = self.policy().delay(m.delivery_attempt());
                tracing::debug!(message = %m.message_id(), attempt = m.delivery_attempt(), %error, ?delay, "handler failed; redelivering later");
                self.nack(&m, delay).await;
            }
        }
    }

    /// Handles one message of a FIFO group until it succeeds or runs out of attempts (then
    /// it is dead-lettered). False if the consumer stopped first.
    async fn consume_in_order(&self, mut m: MessageView) -> bool {
        loop {
            let error = match self.run_handler(m.clone()).await {
                Ok(()) => {
                    self.ack(&m).await;
                    return true;
                }
                Err(e) => e,
            };
            let policy = self.policy();
            let attempt = m.delivery_attempt();
            if attempt >= policy.max_attempts {
                tracing::warn!(message = %m.message_id(), attempt, %error, "handler failed on the last attempt; dead-lettering");
                if let Err(e) = self
                    .session
                    .forward_to_dead_letter_queue(&self.group, &m, policy.max_attempts)
                    .await
                {
                    tracing::warn!(message = %m.message_id(), error = %e, "cannot dead-letter");
                }
                return true;
            }
            tracing::debug!(message = %m.message_id(), attempt, %error, "handler failed; retrying in order");
            tokio::select! {
                () = tokio::time::sleep(policy.delay(attempt)) => {}
                () = stopped(self.stopped.clone()) => return false,
            }
            m.set_delivery_attempt(attempt + 1);
        }
    }

    async fn ack(&self, m: &MessageView) {
        let Some(handle) = m.receipt_handle() else {
            return;
        };
        if let Err(e) = self.acks.ack(m.topic(), m.message_id(), handle).await {
            tracing::warn!(message = %m.message_id(), error = %e, "ack failed; the message will come again");
        }
    }

    async fn nack(&self, m: &MessageView, delay: Duration) {
        let Some(handle) = m.receipt_handle() else {
            return;
        };
        if let Err(e) = self
            .session
            .change_invisible_duration(&self.group, m.topic(), m.message_id(), handle, delay)
            .await
        {
            tracing::warn!(message = %m.message_id(), error = %e, "nack failed; the message comes again after its invisible time");
        }
    }
}
