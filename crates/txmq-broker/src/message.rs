//! Messages as the broker sees them, and how their properties are kept in records.

use txmq_store::{Record, RecordData, RecordKind};

/// Keys of the system properties the broker stores with each record.
pub mod prop {
    /// `normal`, `fifo`, `delay` or `transaction`.
    pub const MESSAGE_TYPE: &str = "message_type";
    /// The FIFO message group.
    pub const MESSAGE_GROUP: &str = "message_group";
    /// Producer host.
    pub const BORN_HOST: &str = "born_host";
    /// Trace context, passed through.
    pub const TRACE_CONTEXT: &str = "trace_context";
    /// `gzip` when the body is compressed by the producer.
    pub const BODY_ENCODING: &str = "body_encoding";
    /// Transaction id, on half messages and on the messages their commit delivers.
    pub const TRANSACTION_ID: &str = "transaction_id";
    /// On half messages: where the committed message goes.
    pub const REAL_TOPIC: &str = "real_topic";
    /// On half messages: the queue of the committed message.
    pub const REAL_QUEUE: &str = "real_queue";
    /// On half messages: the producer's orphaned-transaction recovery duration, ms.
    pub const RECOVERY_MS: &str = "orphaned_recovery_ms";
    /// On dead-lettered copies: `group topic queue offset` of the original.
    pub const DLQ_ORIGIN: &str = "dlq_origin";
    /// On dead-lettered copies: the delivery attempts made.
    pub const DLQ_ATTEMPTS: &str = "dlq_attempts";
    /// On redriven copies: `group topic queue offset` of the dead-lettered message they
    /// came from, as the redrive's group read it; the copy is also the mark that it was
    /// redriven (written before by a separate acknowledgement, and as `topic queue offset`).
    pub const REDRIVEN_FROM: &str = "redriven_from";
}

/// What a producer asked to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendType {
    /// Normal message.
    Normal,
    /// FIFO message in a message group.
    Fifo,
    /// Delivered at a time.
    Delay,
    /// Transactional (half) message.
    Transaction,
}

impl SendType {
    /// The name stored in records.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Normal => "normal",
            Self::Fifo => "fifo",
            Self::Delay => "delay",
            Self::Transaction => "transaction",
        }
    }
}

/// A message to store.
#[derive(Debug, Clone)]
pub struct NewMessage {
    /// Destination topic.
    pub topic: String,
    /// Producer-assigned id.
    pub message_id: String,
    /// Tag, if any.
    pub tag: Option<String>,
    /// Keys.
    pub keys: Vec<String>,
    /// The kind of send.
    pub send_type: SendType,
    /// FIFO message group.
    pub message_group: Option<String>,
    /// Delivery time of a delayed message, ms since the epoch.
    pub delivery_timestamp: Option<i64>,
    /// Orphaned-transaction recovery duration of a transactional message, ms.
    pub orphaned_recovery_ms: Option<u64>,
    /// User properties.
    pub user_properties: Vec<(String, String)>,
    /// Payload.
    pub body: Vec<u8>,
    /// Whether the body is gzip-compressed.
    pub gzip: bool,
    /// When the producer made it, ms.
    pub born_timestamp: i64,
    /// Producer host.
    pub born_host: String,
    /// Trace context.
    pub trace_context: Option<String>,
}

/// The value of a system property of a record.
pub fn sys<'a>(data: &'a RecordData, key: &str) -> Option<&'a str> {
    data.system_properties
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// The record for a message; `topic`/`queue` say where it is stored.
pub fn to_record(
    m: NewMessage,
    kind: RecordKind,
    topic: &str,
    queue: u32,
    extra: &[(&str, String)],
) -> RecordData {
    let mut r = RecordData::new(kind, topic, queue, m.body);
    r.message_id = m.message_id;
    r.tag = m.tag.unwrap_or_default();
    r.keys = m.keys;
    r.user_properties = m.user_properties;
    r.born_timestamp = m.born_timestamp;
    r.deliver_at = m.delivery_timestamp.unwrap_or(0);
    let sp = &mut r.system_properties;
    sp.push((prop::MESSAGE_TYPE.into(), m.send_type.as_str().into()));
    if let Some(g) = m.message_group {
        sp.push((prop::MESSAGE_GROUP.into(), g));
    }
    if !m.born_host.is_empty() {
        sp.push((prop::BORN_HOST.into(), m.born_host));
    }
    if let Some(t) = m.trace_context {
        sp.push((prop::TRACE_CONTEXT.into(), t));
    }
    if m.gzip {
        sp.push((prop::BODY_ENCODING.into(), "gzip".into()));
    }
    if let Some(ms) = m.orphaned_recovery_ms {
        sp.push((prop::RECOVERY_MS.into(), ms.to_string()));
    }
    for (k, v) in extra {
        sp.push(((*k).to_string(), v.clone()));
    }
    r
}

/// A copy of a stored record's message for another place (commit of a half message,
/// dead-lettering, redrive): same id, body and properties, new kind and location. The
/// system properties named in `drop` are left out, and those of `extra` replace any the
/// message already has (a dead-lettered message dead-lettered again names its latest origin).
pub fn copy_record(
    from: &Record,
    kind: RecordKind,
    topic: &str,
    queue: u32,
    drop: &[&str],
    extra: &[(&str, String)],
) -> RecordData {
    let mut r = from.data.clone();
    r.kind = kind;
    r.topic = topic.to_string();
    r.queue_id = queue;
    r.system_properties
        .retain(|(k, _)| !drop.contains(&k.as_str()) && !extra.iter().any(|(e, _)| e == k));
    for (k, v) in extra {
        r.system_properties.push(((*k).to_string(), v.clone()));
    }
    r
}
