//! The broker: where messages are accepted, and what ties the parts together.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, RwLock};
use txmq_proto::v2::Code;
use txmq_store::{Appended, RecordData, RecordKind, Store};

use crate::config::BrokerConfig;
use crate::delivery::Delivery;
use crate::error::{BrokerError, BrokerResult};
use crate::message::{NewMessage, SendType, prop, to_record};
use crate::metadata::{Group, Metadata, TopicType};
use crate::names::{self, TX_TOPIC};
use crate::sessions::Sessions;
use crate::transactions::Transactions;

/// Runs `work` to its end in a task of its own, whatever becomes of the caller: a request
/// whose client goes away is cancelled, and work cut short half-way would leave the
/// broker's state half-changed. A panic of `work` is the error "`what` failed".
pub(crate) async fn detached<T: Send + 'static>(
    what: &str,
    work: impl Future<Output = T> + Send + 'static,
) -> BrokerResult<T> {
    tokio::spawn(work)
        .await
        .map_err(|e| BrokerError::internal(format!("{what} failed: {e}")))
}

/// Where a sent message landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendReceipt {
    /// The producer's message id.
    pub message_id: String,
    /// Transaction id, for a transactional message.
    pub transaction_id: Option<String>,
    /// Queue the message went to.
    pub queue: u32,
    /// Offset in that queue (of the half-message queue, for a transactional message).
    pub offset: u64,
}

/// The broker. Shared behind an `Arc` by the gRPC service, the admin API and background
/// tasks.
pub struct Broker {
    pub(crate) config: BrokerConfig,
    pub(crate) store: Arc<Store>,
    pub(crate) metadata: Metadata,
    pub(crate) transactions: Arc<Transactions>,
    pub(crate) delivery: Delivery,
    pub(crate) sessions: Sessions,
    /// Check-backs sent and not answered yet.
    pub(crate) open_checks: crate::transactions::check_back::OpenChecks,
    /// Held (shared) by every change of broker state from before its record is appended
    /// until it is applied in memory; a snapshot takes it exclusively, so the state it saves
    /// is exactly that of the log below the position it names.
    pub(crate) gate: Arc<RwLock<()>>,
    /// Identifies this run of the broker in receipt handles.
    pub(crate) nonce: u32,
    /// Log position of the snapshot last written or loaded (`u64::MAX`: none yet).
    pub(crate) snapshot_at: std::sync::atomic::AtomicU64,
    /// The files of transaction decisions the last snapshot lists, and the log position up
    /// to which decisions are in them; one snapshot is written at a time.
    pub(crate) decisions: tokio::sync::Mutex<crate::state::DecisionFiles>,
    arrivals: Mutex<HashMap<String, Arc<Notify>>>,
    round_robin: AtomicU32,
    /// Set when the server stops: long polls answer, Telemetry streams end.
    closing: tokio::sync::watch::Sender<bool>,
}

impl Broker {
    pub(crate) fn assemble(config: BrokerConfig, store: Arc<Store>, metadata: Metadata) -> Self {
        let nonce = (crate::now_ms() as u32) ^ std::process::id().rotate_left(16);
        Self {
            config,
            store,
            metadata,
            transactions: Arc::default(),
            delivery: Delivery::default(),
            sessions: Sessions::default(),
            open_checks: Default::default(),
            gate: Arc::new(RwLock::new(())),
            nonce,
            snapshot_at: std::sync::atomic::AtomicU64::new(u64::MAX),
            decisions: tokio::sync::Mutex::new(crate::state::DecisionFiles::default()),
            arrivals: Mutex::new(HashMap::new()),
            round_robin: AtomicU32::new(0),
            closing: tokio::sync::watch::channel(false).0,
        }
    }

    /// The configuration the broker runs with.
    pub fn config(&self) -> &BrokerConfig {
        &self.config
    }

    /// The topics and groups.
    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    /// The transaction table.
    pub fn transactions(&self) -> &Transactions {
        &self.transactions
    }

    /// The storage engine.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The connected clients.
    pub fn sessions(&self) -> &Sessions {
        &self.sessions
    }

    /// Starts a shutdown: long polls answer at once and Telemetry streams end, so clients
    /// let go of their connections.
    pub fn begin_shutdown(&self) {
        self.closing.send_replace(true);
    }

    /// Whether a shutdown has begun.
    pub(crate) fn is_closing(&self) -> bool {
        *self.closing.borrow()
    }

    /// Resolves once a shutdown has begun.
    pub(crate) async fn closed(&self) {
        let mut rx = self.closing.subscribe();
        let _ = rx.wait_for(|c| *c).await;
    }

    pub(crate) fn next_round(&self) -> u32 {
        self.round_robin.fetch_add(1, Ordering::Relaxed)
    }

    /// Wakes long-polling receivers of a topic.
    pub(crate) fn arrived(&self, topic: &str) {
        let map = self.arrivals.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get(topic) {
            n.notify_waiters();
        }
    }

    pub(crate) fn arrivals_of(&self, topic: &str) -> Arc<Notify> {
        let mut map = self.arrivals.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(topic.to_string()).or_default().clone()
    }

    /// A group's settings; unknown groups get the defaults (created on first use when topics
    /// are auto-created).
    pub(crate) fn group_or_default(&self, name: &str) -> BrokerResult<Group> {
        if let Some(of) = name.strip_prefix(names::REDRIVE_PREFIX) {
            // Where the redrive of a group's dead letters reads: it never dead-letters.
            names::check_group(of)?;
            return Ok(Group {
                name: name.into(),
                max_attempts: u32::MAX,
                fifo: false,
                backoff_ms: Vec::new(),
            });
        }
        names::check_group(name)?;
        if let Some(g) = self.metadata.group(name) {
            return Ok(g);
        }
        if !self.config.auto_create_topics {
            return Err(BrokerError::group_not_found(name));
        }
        self.metadata
            .put_group(name, self.config.default_max_attempts, false, Vec::new())
    }

    /// Stores a batch of messages for one topic, all or nothing, durably before it returns.
    /// A transactional message is stored as a half message, invisible until committed; each
    /// half message of a batch opens a transaction of its own.
    ///
    /// # Errors
    /// The first invalid message's error (nothing is stored then): unknown topic, a message
    /// type the topic does not take, a body too large or empty, a bad tag, key, message id,
    /// message group or delivery time; or a storage error.
    ///
    /// # Cancel safety
    /// Dropped once the messages went to the store, they may still be stored, as with
    /// [`Store::append`]; half messages stored then still open their transactions.
    pub async fn send(
        self: &Arc<Self>,
        messages: Vec<NewMessage>,
    ) -> BrokerResult<Vec<SendReceipt>> {
        let Some(first) = messages.first() else {
            return Err(BrokerError::bad_request("no message to send"));
        };
        if messages.iter().any(|m| m.topic != first.topic) {
            return Err(BrokerError::bad_request(
                "all messages of a batch must have the same topic",
            ));
        }
        let topic = self.topic_for_send(first)?;
        for m in &messages {
            self.validate(m, topic.message_type)?;
        }
        let mut records = Vec::with_capacity(messages.len());
        let mut receipts = Vec::with_capacity(messages.len());
        // The messages of a request share a queue, taken in turn (a FIFO message goes to its
        // group's): one index write per request, as a RocketMQ batch goes to one queue.
        let shared_queue = self.next_round() % topic.queues;
        for m in messages {
            let queue = match &m.message_group {
                Some(g) if m.send_type == SendType::Fifo => queue_of_group(g, topic.queues),
                _ => shared_queue,
            };
            let (record, tx_id) = match m.send_type {
                SendType::Transaction => {
                    let id = uuid::Uuid::now_v7().simple().to_string();
                    let extra = [
                        (prop::TRANSACTION_ID, id.clone()),
                        (prop::REAL_TOPIC, topic.name.clone()),
                        (prop::REAL_QUEUE, queue.to_string()),
                    ];
                    (
                        to_record(m, RecordKind::Half, TX_TOPIC, 0, &extra),
                        Some(id),
                    )
                }
                SendType::Delay => (
                    to_record(m, RecordKind::Delayed, &topic.name, queue, &[]),
                    None,
                ),
                SendType::Normal | SendType::Fifo => (
                    to_record(m, RecordKind::Normal, &topic.name, queue, &[]),
                    None,
                ),
            };
            receipts.push(SendReceipt {
                message_id: record.message_id.clone(),
                transaction_id: tx_id,
                queue,
                offset: 0,
            });
            records.push(record);
        }
        let half = receipts[0].transaction_id.is_some();
        let appended = if half {
            // Stored and entered in the transaction table in a task of its own: a caller
            // that goes away meanwhile (a client that disconnects or times out) must not
            // leave a stored half message out of the table, where no check-back would find
            // it and a snapshot would forget it.
            let broker = Arc::clone(self);
            detached("storing half messages", async move {
                broker.store_half_messages(records).await
            })
            .await??
        } else {
            self.store.append(records).await?
        };
        for (r, at) in receipts.iter_mut().zip(&appended) {
            r.offset = at.queue_offset;
        }
        if !half {
            self.arrived(&topic.name);
        }
        Ok(receipts)
    }

    /// Stores half messages and opens their transactions.
    async fn store_half_messages(&self, records: Vec<RecordData>) -> BrokerResult<Vec<Appended>> {
        // A half message changes the transaction table: hold the gate until it is applied.
        let _gate = self.gate.read().await;
        let appended = self.store.append(records.clone()).await?;
        for (data, at) in records.into_iter().zip(&appended) {
            let rec = txmq_store::Record {
                position: at.position,
                queue_offset: at.queue_offset,
                store_timestamp: at.store_timestamp,
                data,
            };
            self.transactions.apply(
                &rec,
                |rec| self.first_check_ms(rec),
                |c| self.check_interval_ms(c),
            );
        }
        Ok(appended)
    }

    fn topic_for_send(&self, m: &NewMessage) -> BrokerResult<crate::metadata::Topic> {
        names::check_topic(&m.topic)?;
        if let Some(t) = self.metadata.topic(&m.topic) {
            return Ok(t);
        }
        if !self.config.auto_create_topics {
            return Err(BrokerError::topic_not_found(&m.topic));
        }
        let kind = match m.send_type {
            SendType::Normal => TopicType::Normal,
            SendType::Fifo => TopicType::Fifo,
            SendType::Delay => TopicType::Delay,
            SendType::Transaction => TopicType::Transaction,
        };
        tracing::info!(topic = %m.topic, kind = kind.as_str(), "auto-creating topic");
        self.metadata
            .create_topic(&m.topic, kind, self.config.default_queues)
    }

    fn validate(&self, m: &NewMessage, topic_type: TopicType) -> BrokerResult<()> {
        let expected = match topic_type {
            TopicType::Normal => SendType::Normal,
            TopicType::Fifo => SendType::Fifo,
            TopicType::Delay => SendType::Delay,
            TopicType::Transaction => SendType::Transaction,
        };
        if m.send_type != expected {
            return Err(BrokerError::new(
                Code::MessagePropertyConflictWithType,
                format!(
                    "topic {} takes {} messages, not {}",
                    m.topic,
                    topic_type.as_str(),
                    m.send_type.as_str()
                ),
            ));
        }
        if m.message_id.is_empty() || m.message_id.len() > 128 {
            return Err(BrokerError::new(
                Code::IllegalMessageId,
                "message id must be 1 to 128 characters",
            ));
        }
        if m.body.is_empty() {
            return Err(BrokerError::new(
                Code::MessageBodyEmpty,
                "message body is empty",
            ));
        }
        if m.body.len() > self.config.max_body_size {
            return Err(BrokerError::new(
                Code::MessageBodyTooLarge,
                format!(
                    "message body of {} bytes exceeds {} bytes",
                    m.body.len(),
                    self.config.max_body_size
                ),
            ));
        }
        if let Some(tag) = &m.tag {
            names::check_tag(tag)?;
        }
        for k in &m.keys {
            names::check_key(k)?;
        }
        for (k, _) in &m.user_properties {
            if k.is_empty() || k.len() > 1024 {
                return Err(BrokerError::new(
                    Code::IllegalMessagePropertyKey,
                    format!("illegal property key {k:?}"),
                ));
            }
        }
        match m.send_type {
            SendType::Fifo
                if m.message_group
                    .as_deref()
                    .is_none_or(|g| g.is_empty() || g.len() > 256) =>
            {
                return Err(BrokerError::new(
                    Code::IllegalMessageGroup,
                    "a FIFO message needs a message group of 1 to 256 characters",
                ));
            }
            SendType::Delay if m.delivery_timestamp.is_none() => {
                return Err(BrokerError::new(
                    Code::IllegalDeliveryTime,
                    "a delay message needs a delivery time",
                ));
            }
            // A committed transactional message with a delivery time is delayed too.
            SendType::Delay | SendType::Transaction => {
                // A delayed message is kept as long as any other: retention removes its
                // segment once it is older than the retention time, delivered or not. So it
                // must be due before then.
                let now = crate::now_ms();
                let hours = self.config.retention_hours;
                let longest = i64::try_from(hours.saturating_mul(3_600_000)).unwrap_or(i64::MAX);
                if m.delivery_timestamp
                    .is_some_and(|t| t > now.saturating_add(longest))
                {
                    return Err(BrokerError::new(
                        Code::IllegalDeliveryTime,
                        format!(
                            "delivery time is more than {hours} hours ahead, the log's \
                             retention time (retention_hours)"
                        ),
                    ));
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// The queue of a topic with `queues` queues that holds FIFO message group `group`: all its
/// messages go to one queue, where they are delivered in order.
pub(crate) fn queue_of_group(group: &str, queues: u32) -> u32 {
    crc32c::crc32c(group.as_bytes()) % queues.max(1)
}
