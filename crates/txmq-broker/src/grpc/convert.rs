//! Between wire messages and stored records.

use std::collections::HashMap;

use prost_types::{Duration, Timestamp};
use txmq_proto::v2::{
    self as pb, Code, DeadLetterQueue, Digest, DigestType, Encoding, MessageType, Resource,
    SystemProperties,
};
use txmq_store::Record;

use crate::delivery::Delivered;
use crate::error::BrokerError;
use crate::message::{NewMessage, SendType, prop, sys};
use crate::names::DLQ_PREFIX;
use crate::transactions::Tx;

/// A `Status` for a code and message.
pub fn status(code: Code, message: impl Into<String>) -> pb::Status {
    pb::Status {
        code: code as i32,
        message: message.into(),
    }
}

/// `OK`.
pub fn ok() -> pb::Status {
    status(Code::Ok, "OK")
}

/// The `Status` of an error.
pub fn error_status(e: &BrokerError) -> pb::Status {
    status(e.code, e.message.clone())
}

/// A resource name.
pub fn resource(name: &str) -> Resource {
    Resource {
        resource_namespace: String::new(),
        name: name.to_string(),
    }
}

/// Milliseconds since the epoch as a protobuf timestamp.
pub fn timestamp(ms: i64) -> Timestamp {
    Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

/// A protobuf timestamp as milliseconds since the epoch.
pub fn millis(t: &Timestamp) -> i64 {
    t.seconds
        .saturating_mul(1000)
        .saturating_add(i64::from(t.nanos) / 1_000_000)
}

/// A protobuf duration in milliseconds (negative durations are returned as such).
pub fn duration_ms(d: &Duration) -> i64 {
    d.seconds
        .saturating_mul(1000)
        .saturating_add(i64::from(d.nanos) / 1_000_000)
}

/// Milliseconds as a protobuf duration.
pub fn duration(ms: i64) -> Duration {
    Duration {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

/// The message a producer sent, checked for what the wire format requires.
///
/// # Errors
/// `BAD_REQUEST` without a topic or system properties, `ILLEGAL_MESSAGE_ID` without an id,
/// `MESSAGE_CORRUPTED` for a body that does not match its digest, `UNSUPPORTED` for message
/// types txmq does not have (lite, priority).
pub fn new_message(m: pb::Message, born_host: &str) -> Result<NewMessage, BrokerError> {
    let topic = m
        .topic
        .map(|t| t.name)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| BrokerError::bad_request("message without a topic"))?;
    let sp = m
        .system_properties
        .ok_or_else(|| BrokerError::bad_request("message without system properties"))?;
    if sp.message_id.is_empty() {
        return Err(BrokerError::new(
            Code::IllegalMessageId,
            "message without a message id",
        ));
    }
    let send_type = match MessageType::try_from(sp.message_type).unwrap_or(MessageType::Unspecified)
    {
        MessageType::Normal => SendType::Normal,
        MessageType::Fifo => SendType::Fifo,
        MessageType::Delay => SendType::Delay,
        MessageType::Transaction => SendType::Transaction,
        MessageType::Unspecified if sp.message_group.is_some() => SendType::Fifo,
        MessageType::Unspecified if sp.delivery_timestamp.is_some() => SendType::Delay,
        MessageType::Unspecified => SendType::Normal,
        other => {
            return Err(BrokerError::new(
                Code::Unsupported,
                format!("message type {} is not supported", other.as_str_name()),
            ));
        }
    };
    if let Some(d) = &sp.body_digest
        && !txmq_proto::digest::matches(d, &m.body)
    {
        return Err(BrokerError::new(
            Code::MessageCorrupted,
            format!(
                "the body of message {} does not match its {} digest {:?}",
                sp.message_id,
                DigestType::try_from(d.r#type).map_or("unknown", |t| t.as_str_name()),
                d.checksum
            ),
        ));
    }
    if sp.lite_topic.is_some() {
        return Err(BrokerError::new(
            Code::Unsupported,
            "lite topics are not supported",
        ));
    }
    let mut user_properties: Vec<(String, String)> = m.user_properties.into_iter().collect();
    user_properties.sort();
    let gzip = Encoding::try_from(sp.body_encoding) == Ok(Encoding::Gzip);
    let orphaned_recovery_ms = sp
        .orphaned_transaction_recovery_duration
        .map(|d| duration_ms(&d).max(0) as u64);
    Ok(NewMessage {
        topic,
        message_id: sp.message_id,
        tag: sp.tag,
        keys: sp.keys,
        send_type,
        message_group: sp.message_group,
        delivery_timestamp: sp.delivery_timestamp.as_ref().map(millis),
        orphaned_recovery_ms,
        user_properties,
        body: m.body.into(),
        gzip,
        born_timestamp: sp
            .born_timestamp
            .as_ref()
            .map_or_else(crate::now_ms, millis),
        born_host: if sp.born_host.is_empty() {
            born_host.to_string()
        } else {
            sp.born_host
        },
        trace_context: sp.trace_context,
    })
}

fn message_type(s: Option<&str>) -> MessageType {
    match s {
        Some("fifo") => MessageType::Fifo,
        Some("delay") => MessageType::Delay,
        Some("transaction") => MessageType::Transaction,
        _ => MessageType::Normal,
    }
}

/// The digest a delivered message carries: the body's MD5, which every official client
/// checks the same way (CRC32 is formatted without leading zeros by the Java client and with
/// them by the Python client, so no one CRC32 string satisfies both).
fn body_digest(body: &[u8]) -> Digest {
    txmq_proto::digest::md5(body)
}

/// The wire form of a stored message, as `topic`.
fn base_message(rec: &Record, topic: &str) -> pb::Message {
    let d = &rec.data;
    let user_properties: HashMap<String, String> = d.user_properties.iter().cloned().collect();
    let gzip = sys(d, prop::BODY_ENCODING) == Some("gzip");
    let dead_letter_queue = (rec.data.topic.starts_with(DLQ_PREFIX)).then(|| DeadLetterQueue {
        topic: sys(d, prop::DLQ_ORIGIN)
            .and_then(|o| o.split(' ').nth(1))
            .unwrap_or_default()
            .to_string(),
        message_id: d.message_id.clone(),
    });
    let sp = SystemProperties {
        tag: (!d.tag.is_empty()).then(|| d.tag.clone()),
        keys: d.keys.clone(),
        message_id: d.message_id.clone(),
        body_digest: Some(body_digest(&d.body)),
        body_encoding: if gzip {
            Encoding::Gzip
        } else {
            Encoding::Identity
        } as i32,
        message_type: message_type(sys(d, prop::MESSAGE_TYPE)) as i32,
        born_timestamp: Some(timestamp(d.born_timestamp)),
        born_host: sys(d, prop::BORN_HOST).unwrap_or_default().to_string(),
        store_timestamp: Some(timestamp(rec.store_timestamp)),
        store_host: "txmq".into(),
        delivery_timestamp: (d.deliver_at > 0).then(|| timestamp(d.deliver_at)),
        queue_id: d.queue_id as i32,
        queue_offset: Some(rec.queue_offset as i64),
        message_group: sys(d, prop::MESSAGE_GROUP).map(str::to_string),
        trace_context: sys(d, prop::TRACE_CONTEXT).map(str::to_string),
        dead_letter_queue,
        ..Default::default()
    };
    pb::Message {
        topic: Some(resource(topic)),
        user_properties,
        system_properties: Some(sp),
        body: d.body.clone().into(),
    }
}

/// A delivery as sent to a consumer.
pub fn message_from_delivery(d: &Delivered) -> pb::Message {
    let mut m = base_message(&d.record, &d.record.data.topic);
    if let Some(sp) = m.system_properties.as_mut() {
        sp.receipt_handle = Some(d.handle.clone());
        sp.invisible_duration = Some(duration(d.invisible_ms));
        sp.delivery_attempt = Some(d.attempt as i32);
    }
    m
}

/// A half message as sent to a producer with a check-back: under its real topic.
pub fn message_from_half(half: &Record, tx: &Tx) -> pb::Message {
    let mut m = base_message(half, &tx.topic);
    if let Some(sp) = m.system_properties.as_mut() {
        sp.message_type = MessageType::Transaction as i32;
        sp.queue_id = tx.queue as i32;
        sp.orphaned_transaction_recovery_duration = sys(&half.data, prop::RECOVERY_MS)
            .and_then(|v| v.parse().ok())
            .map(duration);
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_and_durations_convert_both_ways() {
        for ms in [0, 1, 999, 1_700_000_000_123, -1500] {
            assert_eq!(millis(&timestamp(ms)), ms);
            assert_eq!(duration_ms(&duration(ms)), ms);
        }
    }

    #[test]
    fn body_digest_is_upper_case_md5_hex() {
        assert_eq!(
            body_digest(b"hello").checksum,
            "5D41402ABC4B2A76B9719D911017C592"
        );
        assert_eq!(
            body_digest(b"").checksum,
            "D41D8CD98F00B204E9800998ECF8427E"
        );
        assert_eq!(body_digest(b"").r#type, DigestType::Md5 as i32);
    }

    fn wire(body: &[u8], digest: Option<Digest>) -> pb::Message {
        pb::Message {
            topic: Some(resource("t")),
            user_properties: HashMap::new(),
            system_properties: Some(SystemProperties {
                message_id: "m1".into(),
                body_digest: digest,
                ..Default::default()
            }),
            body: body.to_vec().into(),
        }
    }

    #[test]
    fn a_body_that_does_not_match_its_digest_is_refused_as_corrupted() {
        let sent = txmq_proto::digest::crc32(b"pay 100");
        let e = new_message(wire(b"pay 900", Some(sent.clone())), "h").unwrap_err();
        assert_eq!(e.code, Code::MessageCorrupted);
        assert!(e.message.contains("CRC32"), "{}", e.message);
        let md5 = txmq_proto::digest::md5(b"pay 100");
        let e = new_message(wire(b"pay 900", Some(md5)), "h").unwrap_err();
        assert_eq!(e.code, Code::MessageCorrupted);

        assert_eq!(
            new_message(wire(b"pay 100", Some(sent)), "h").unwrap().body,
            b"pay 100"
        );
        // No digest, or one of a type not known: nothing to check.
        assert!(new_message(wire(b"pay 900", None), "h").is_ok());
        let unknown = Digest {
            r#type: 99,
            checksum: "?".into(),
        };
        assert!(new_message(wire(b"pay 900", Some(unknown)), "h").is_ok());
    }
}
