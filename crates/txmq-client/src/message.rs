//! Messages going out ([`Message`], [`SendReceipt`]) and coming in ([`MessageView`]).

use std::collections::HashMap;
use std::io::Read;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use txmq_proto::v2 as pb;

use crate::retry::to_duration;
use txmq_proto::digest::hex_upper;

/// A message to send, built with `with_*` calls.
///
/// The message type follows from what is set: a message group makes a FIFO message, a
/// delivery time a delay message, [`TransactionalProducer::begin`] a transactional one;
/// otherwise it is a normal message.
///
/// [`TransactionalProducer::begin`]: crate::TransactionalProducer::begin
///
/// # Example
/// ```
/// use std::time::Duration;
/// use txmq_client::Message;
///
/// let m = Message::new("orders", r#"{"order":42}"#)
///     .with_tag("paid")
///     .with_keys(["order-42"])
///     .with_property("currency", "EUR")
///     .with_message_group("customer-7");
/// assert_eq!(m.topic(), "orders");
/// let later = Message::new("reminders", "ping").with_delay(Duration::from_secs(60));
/// assert!(later.delivery_time().is_some());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    topic: String,
    body: Vec<u8>,
    tag: Option<String>,
    keys: Vec<String>,
    properties: HashMap<String, String>,
    message_group: Option<String>,
    delivery_time: Option<SystemTime>,
}

impl Message {
    /// A normal message to `topic`.
    pub fn new(topic: impl Into<String>, body: impl Into<Vec<u8>>) -> Self {
        Self {
            topic: topic.into(),
            body: body.into(),
            tag: None,
            keys: Vec::new(),
            properties: HashMap::new(),
            message_group: None,
            delivery_time: None,
        }
    }

    /// Sets the tag consumers filter on.
    pub fn with_tag(mut self, tag: impl Into<String>) -> Self {
        self.tag = Some(tag.into());
        self
    }

    /// Adds a key (business id) to look the message up by.
    pub fn with_key(mut self, key: impl Into<String>) -> Self {
        self.keys.push(key.into());
        self
    }

    /// Adds keys.
    pub fn with_keys(mut self, keys: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.keys.extend(keys.into_iter().map(Into::into));
        self
    }

    /// Sets a user property.
    pub fn with_property(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.properties.insert(key.into(), value.into());
        self
    }

    /// Makes it a FIFO message of `group`: consumers of a FIFO consumer group get the
    /// messages of one group in the order they were sent.
    pub fn with_message_group(mut self, group: impl Into<String>) -> Self {
        self.message_group = Some(group.into());
        self
    }

    /// Makes it a delay message, delivered at `time`.
    pub fn with_delivery_time(mut self, time: SystemTime) -> Self {
        self.delivery_time = Some(time);
        self
    }

    /// Makes it a delay message, delivered `delay` from now.
    pub fn with_delay(self, delay: Duration) -> Self {
        self.with_delivery_time(SystemTime::now() + delay)
    }

    /// The topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The body.
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    /// The tag.
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// The keys.
    pub fn keys(&self) -> &[String] {
        &self.keys
    }

    /// The user properties.
    pub fn properties(&self) -> &HashMap<String, String> {
        &self.properties
    }

    /// The FIFO message group.
    pub fn message_group(&self) -> Option<&str> {
        self.message_group.as_deref()
    }

    /// When a delay message is to be delivered.
    pub fn delivery_time(&self) -> Option<SystemTime> {
        self.delivery_time
    }

    /// The wire message type, before a transactional producer overrides it.
    pub(crate) fn message_type(&self) -> pb::MessageType {
        if self.message_group.is_some() {
            pb::MessageType::Fifo
        } else if self.delivery_time.is_some() {
            pb::MessageType::Delay
        } else {
            pb::MessageType::Normal
        }
    }

    /// Checks what every server refuses anyway, so that nothing is sent for it.
    pub(crate) fn validate(&self, max_body_size: Option<usize>) -> Result<(), String> {
        if self.topic.is_empty() {
            return Err("no topic".into());
        }
        if self.body.is_empty() {
            return Err("empty body".into());
        }
        if let Some(max) = max_body_size
            && self.body.len() > max
        {
            return Err(format!(
                "body of {} bytes exceeds the server's limit of {max} bytes",
                self.body.len()
            ));
        }
        if let Some(tag) = &self.tag
            && (tag.trim().is_empty() || tag.contains('|'))
        {
            return Err(format!("tag {tag:?} is blank or contains '|'"));
        }
        if self.keys.iter().any(|k| k.trim().is_empty()) {
            return Err("blank key".into());
        }
        if self.properties.keys().any(|k| k.is_empty()) {
            return Err("property with an empty name".into());
        }
        if let Some(g) = &self.message_group
            && g.trim().is_empty()
        {
            return Err("blank message group".into());
        }
        if self.message_group.is_some() && self.delivery_time.is_some() {
            return Err("a message cannot both have a message group and a delivery time".into());
        }
        Ok(())
    }

    /// The wire form, with a new message id.
    pub(crate) fn into_proto(
        self,
        namespace: &str,
        message_type: pb::MessageType,
        born_host: &str,
    ) -> pb::Message {
        pb::Message {
            topic: Some(pb::Resource {
                resource_namespace: namespace.to_string(),
                name: self.topic,
            }),
            user_properties: self.properties,
            system_properties: Some(pb::SystemProperties {
                tag: self.tag,
                keys: self.keys,
                message_id: new_message_id(),
                body_digest: Some(txmq_proto::digest::crc32(&self.body)),
                body_encoding: pb::Encoding::Identity as i32,
                message_type: message_type as i32,
                born_timestamp: Some(timestamp(SystemTime::now())),
                born_host: born_host.to_string(),
                delivery_timestamp: self.delivery_time.map(timestamp),
                message_group: self.message_group,
                ..Default::default()
            }),
            body: self.body.into(),
        }
    }
}

/// A new unique message id: a UUID v7 in upper-case hex (time-ordered, 32 characters).
pub(crate) fn new_message_id() -> String {
    hex_upper(uuid::Uuid::now_v7().as_bytes())
}

fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: d.subsec_nanos() as i32,
    }
}

fn system_time(t: &prost_types::Timestamp) -> Option<SystemTime> {
    let secs = u64::try_from(t.seconds).ok()?;
    let nanos = u32::try_from(t.nanos).ok()?;
    UNIX_EPOCH.checked_add(Duration::new(secs, nanos))
}

/// What the server answered for one sent message.
///
/// # Example
/// ```no_run
/// # async fn f(producer: txmq_client::Producer) -> Result<(), txmq_client::SendError> {
/// let receipt = producer.send(txmq_client::Message::new("orders", "paid")).await?;
/// println!("{} stored at offset {}", receipt.message_id, receipt.offset);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SendReceipt {
    /// The message id (made by the client).
    pub message_id: String,
    /// The transaction id of a transactional (half) message; empty otherwise.
    pub transaction_id: String,
    /// The offset in its queue.
    pub offset: i64,
    /// A handle to recall a delay message before delivery, where the server supports it.
    pub recall_handle: String,
}

impl SendReceipt {
    pub(crate) fn from_entry(e: pb::SendResultEntry) -> Self {
        Self {
            message_id: e.message_id,
            transaction_id: e.transaction_id,
            offset: e.offset,
            recall_handle: e.recall_handle,
        }
    }
}

/// A received message (or the message of a transaction check-back).
///
/// The body is decompressed when the server sent it gzip-encoded, and checked against the
/// body digest the server sent; [`corrupted`](Self::corrupted) says if it did not match.
///
/// # Example
/// ```no_run
/// # async fn f(consumer: txmq_client::SimpleConsumer) -> Result<(), txmq_client::Error> {
/// use std::time::Duration;
/// for m in consumer.receive(16, Duration::from_secs(30)).await? {
///     println!("{} {:?} attempt {}", m.message_id(), m.tag(), m.delivery_attempt());
///     if !m.corrupted() {
///         consumer.ack(&m).await?;
///     }
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct MessageView {
    message_id: String,
    topic: String,
    body: Vec<u8>,
    tag: Option<String>,
    keys: Vec<String>,
    properties: HashMap<String, String>,
    message_group: Option<String>,
    delivery_attempt: u32,
    born_timestamp: Option<SystemTime>,
    born_host: String,
    store_timestamp: Option<SystemTime>,
    delivery_timestamp: Option<SystemTime>,
    queue_id: i32,
    queue_offset: Option<i64>,
    receipt_handle: Option<String>,
    invisible_duration: Option<Duration>,
    corrupted: bool,
}

/// The largest body a compressed body is inflated to (64 MiB, the largest body a txmq
/// broker can be set to take); a larger one is left compressed and the message is marked
/// [corrupted](MessageView::corrupted).
pub const MAX_INFLATED_BODY: usize = 64 << 20;

impl MessageView {
    /// The view of a wire message.
    pub(crate) fn from_proto(m: pb::Message) -> Self {
        let sp = m.system_properties.unwrap_or_default();
        let mut corrupted = match &sp.body_digest {
            Some(d) => !txmq_proto::digest::matches(d, &m.body),
            None => false,
        };
        let body = match pb::Encoding::try_from(sp.body_encoding) {
            Ok(pb::Encoding::Gzip) => {
                // A few bytes can inflate to gigabytes: a body past the limit is not
                // inflated further, and the message is marked corrupted.
                let mut out = Vec::new();
                let limit = MAX_INFLATED_BODY as u64 + 1;
                match flate2::read::GzDecoder::new(&m.body[..])
                    .take(limit)
                    .read_to_end(&mut out)
                {
                    Ok(n) if n <= MAX_INFLATED_BODY => out,
                    _ => {
                        corrupted = true;
                        m.body.into()
                    }
                }
            }
            _ => m.body.into(),
        };
        Self {
            message_id: sp.message_id,
            topic: m.topic.map(|t| t.name).unwrap_or_default(),
            body,
            tag: sp.tag,
            keys: sp.keys,
            properties: m.user_properties,
            message_group: sp.message_group,
            delivery_attempt: sp
                .delivery_attempt
                .and_then(|a| u32::try_from(a).ok())
                .unwrap_or(1)
                .max(1),
            born_timestamp: sp.born_timestamp.as_ref().and_then(system_time),
            born_host: sp.born_host,
            store_timestamp: sp.store_timestamp.as_ref().and_then(system_time),
            delivery_timestamp: sp.delivery_timestamp.as_ref().and_then(system_time),
            queue_id: sp.queue_id,
            queue_offset: sp.queue_offset,
            receipt_handle: sp.receipt_handle,
            invisible_duration: sp.invisible_duration.as_ref().map(to_duration),
            corrupted,
        }
    }

    /// The message id.
    pub fn message_id(&self) -> &str {
        &self.message_id
    }

    /// The topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The body (decompressed).
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    /// The body, taken out of the view.
    pub fn into_body(self) -> Vec<u8> {
        self.body
    }

    /// The tag.
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// The keys.
    pub fn keys(&self) -> &[String] {
        &self.keys
    }

    /// The user properties.
    pub fn properties(&self) -> &HashMap<String, String> {
        &self.properties
    }

    /// The FIFO message group.
    pub fn message_group(&self) -> Option<&str> {
        self.message_group.as_deref()
    }

    /// Which delivery of the message this is, from 1.
    pub fn delivery_attempt(&self) -> u32 {
        self.delivery_attempt
    }

    /// When the producer made the message.
    pub fn born_timestamp(&self) -> Option<SystemTime> {
        self.born_timestamp
    }

    /// The producer's host.
    pub fn born_host(&self) -> &str {
        &self.born_host
    }

    /// When the server stored the message.
    pub fn store_timestamp(&self) -> Option<SystemTime> {
        self.store_timestamp
    }

    /// When a delay message was due.
    pub fn delivery_timestamp(&self) -> Option<SystemTime> {
        self.delivery_timestamp
    }

    /// The queue the message is in.
    pub fn queue_id(&self) -> i32 {
        self.queue_id
    }

    /// The message's offset in its queue.
    pub fn queue_offset(&self) -> Option<i64> {
        self.queue_offset
    }

    /// The receipt handle to acknowledge this delivery with; `None` for check-back messages.
    pub fn receipt_handle(&self) -> Option<&str> {
        self.receipt_handle.as_deref()
    }

    /// How long the message stays invisible to other consumers after this delivery.
    pub fn invisible_duration(&self) -> Option<Duration> {
        self.invisible_duration
    }

    /// True when the body does not match the digest the server sent, or does not
    /// decompress, or would inflate past [`MAX_INFLATED_BODY`]: do not trust it.
    pub fn corrupted(&self) -> bool {
        self.corrupted
    }

    pub(crate) fn with_receipt_handle(mut self, handle: String) -> Self {
        self.receipt_handle = Some(handle);
        self
    }

    pub(crate) fn set_delivery_attempt(&mut self, attempt: u32) {
        self.delivery_attempt = attempt;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(body: &[u8], digest: pb::Digest, encoding: pb::Encoding) -> pb::Message {
        pb::Message {
            topic: Some(pb::Resource {
                resource_namespace: String::new(),
                name: "t".into(),
            }),
            user_properties: HashMap::new(),
            system_properties: Some(pb::SystemProperties {
                message_id: "id".into(),
                body_digest: Some(digest),
                body_encoding: encoding as i32,
                ..Default::default()
            }),
            body: body.to_vec().into(),
        }
    }

    fn digest(t: pb::DigestType, checksum: &str) -> pb::Digest {
        pb::Digest {
            r#type: t as i32,
            checksum: checksum.into(),
        }
    }

    #[test]
    fn body_digests_of_every_type_are_checked() {
        use pb::DigestType::*;
        use pb::Encoding::Identity;
        let ok = [
            digest(Md5, "5d41402abc4b2a76b9719d911017c592"),
            digest(Sha1, "AAF4C61DDCC5E8A2DABEDE0F3B482CD9AEA9434D"),
            digest(Crc32, "3610A686"),
        ];
        for d in ok {
            assert!(!MessageView::from_proto(wire(b"hello", d, Identity)).corrupted());
        }
        let bad = wire(
            b"hellO",
            digest(Md5, "5D41402ABC4B2A76B9719D911017C592"),
            Identity,
        );
        assert!(MessageView::from_proto(bad).corrupted());
    }

    #[test]
    fn gzip_bodies_are_decompressed_after_the_digest_check() {
        use std::io::Write;
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(b"hello hello hello").unwrap();
        let zipped = enc.finish().unwrap();
        let d = digest(
            pb::DigestType::Crc32,
            &txmq_proto::digest::crc32(&zipped).checksum,
        );
        let v = MessageView::from_proto(wire(&zipped, d, pb::Encoding::Gzip));
        assert!(!v.corrupted());
        assert_eq!(v.body(), b"hello hello hello");
        let garbage = wire(
            b"not gzip",
            digest(pb::DigestType::Unspecified, ""),
            pb::Encoding::Gzip,
        );
        assert!(MessageView::from_proto(garbage).corrupted());
    }

    #[test]
    fn a_gzip_body_that_inflates_past_the_limit_is_not_inflated() {
        use std::io::Write;
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..=(MAX_INFLATED_BODY >> 20) {
            enc.write_all(&zeros).unwrap();
        }
        let bomb = enc.finish().unwrap();
        assert!(bomb.len() < 1 << 20, "{} bytes", bomb.len());
        let v = MessageView::from_proto(wire(
            &bomb,
            digest(pb::DigestType::Unspecified, ""),
            pb::Encoding::Gzip,
        ));
        assert!(v.corrupted());
        assert_eq!(v.body(), &bomb[..], "left as it came");
    }

    #[test]
    fn message_with_group_and_delivery_time_is_invalid() {
        let m = Message::new("t", "b")
            .with_message_group("g")
            .with_delay(Duration::from_secs(1));
        assert!(m.validate(None).is_err());
        assert!(Message::new("t", "").validate(None).is_err());
        assert!(Message::new("t", "xx").validate(Some(1)).is_err());
        assert!(
            Message::new("t", "x")
                .with_tag("a|b")
                .validate(None)
                .is_err()
        );
        assert!(Message::new("t", "x").validate(Some(1)).is_ok());
    }

    #[test]
    fn message_ids_are_unique_upper_case_hex() {
        let (a, b) = (new_message_id(), new_message_id());
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
        assert!(
            a.chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_lowercase())
        );
    }
}
