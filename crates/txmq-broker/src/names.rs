//! Names: what clients may call topics, groups and tags, and the broker's internal topics.

use txmq_proto::v2::Code;

use crate::error::BrokerError;

/// Internal topic holding half messages, transaction resolutions and check-backs.
pub const TX_TOPIC: &str = "%SYS%TX";
/// Internal topic holding acknowledgements of consumer groups.
pub const DELIVERY_TOPIC: &str = "%SYS%DELIVERY";
/// Prefix of internal topics.
pub const SYSTEM_PREFIX: &str = "%SYS%";
/// Prefix of dead-letter topics: `%DLQ%<group>`.
pub const DLQ_PREFIX: &str = "%DLQ%";

/// Prefix of the group a redrive of `<group>`'s dead letters reads them as:
/// `%REDRIVE%<group>`.
pub const REDRIVE_PREFIX: &str = "%REDRIVE%";

/// Longest topic name.
pub const MAX_TOPIC_LEN: usize = 127;
/// Longest consumer group name.
pub const MAX_GROUP_LEN: usize = 255;

/// The dead-letter topic of a group.
pub fn dlq_topic(group: &str) -> String {
    format!("{DLQ_PREFIX}{group}")
}

/// Longest name of a topic's directory in the store: one file name.
const MAX_STORED_NAME: usize = 255;

/// The length of `topic`'s directory name in the store.
fn stored_len(topic: &str) -> usize {
    txmq_store::escape_topic(topic).len()
}

fn charset_ok(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'%' || b == b'|')
}

/// Checks a topic name a client wants to send to or create.
///
/// A group's dead-letter topic, `%DLQ%<group>`, is checked as its group is: it may be
/// longer than other topics.
pub fn check_topic(topic: &str) -> Result<(), BrokerError> {
    if let Some(group) = topic.strip_prefix(DLQ_PREFIX)
        && check_group(group).is_ok()
    {
        return Ok(());
    }
    if topic.is_empty()
        || topic.len() > MAX_TOPIC_LEN
        || !charset_ok(topic)
        || stored_len(topic) > MAX_STORED_NAME
    {
        return Err(BrokerError::new(
            Code::IllegalTopic,
            format!(
                "illegal topic {topic:?}: 1 to {MAX_TOPIC_LEN} characters of [A-Za-z0-9_-%|], \
                 each % and | counting three towards {MAX_STORED_NAME}"
            ),
        ));
    }
    if topic.starts_with(SYSTEM_PREFIX) {
        return Err(BrokerError::new(
            Code::IllegalTopic,
            format!("topic {topic} is reserved"),
        ));
    }
    Ok(())
}

/// Checks a consumer group name.
pub fn check_group(group: &str) -> Result<(), BrokerError> {
    if group.is_empty()
        || group.len() > MAX_GROUP_LEN
        || !charset_ok(group)
        || group.starts_with(SYSTEM_PREFIX)
        || stored_len(&dlq_topic(group)) > MAX_STORED_NAME
    {
        return Err(BrokerError::new(
            Code::IllegalConsumerGroup,
            format!(
                "illegal consumer group {group:?}: 1 to {MAX_GROUP_LEN} characters of \
                 [A-Za-z0-9_-%|], and its dead-letter topic %DLQ%<group> at most \
                 {MAX_STORED_NAME} with each % and | counting three"
            ),
        ));
    }
    Ok(())
}

/// Checks a message tag: not blank, no `|` (it separates tags in filter expressions).
pub fn check_tag(tag: &str) -> Result<(), BrokerError> {
    if tag.trim().is_empty()
        || tag.contains('|')
        || tag.len() > 1024
        || tag.chars().any(char::is_control)
    {
        return Err(BrokerError::new(
            Code::IllegalMessageTag,
            format!("illegal tag {tag:?}"),
        ));
    }
    Ok(())
}

/// Checks a message key.
pub fn check_key(key: &str) -> Result<(), BrokerError> {
    if key.trim().is_empty() || key.len() > 1024 {
        return Err(BrokerError::new(
            Code::IllegalMessageKey,
            format!("illegal key {key:?}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names_follow_the_rocketmq_rules() {
        assert!(check_topic("orders_paid-1").is_ok());
        assert!(check_topic("").is_err());
        assert!(check_topic("a b").is_err());
        assert!(check_topic("%SYS%TX").is_err());
        assert!(check_topic(&"x".repeat(128)).is_err());
        assert_eq!(check_topic("a/b").unwrap_err().code, Code::IllegalTopic);
        // Each % and | takes three bytes of the topic's directory name in the store.
        assert!(check_topic(&"%".repeat(85)).is_ok());
        assert!(check_topic(&"%".repeat(86)).is_err());
    }

    #[test]
    fn every_group_that_is_accepted_has_a_dead_letter_topic_that_is_too() {
        for group in [
            "g".to_string(),
            "g".repeat(246),
            "%".repeat(82),
            format!("{}|", "g".repeat(243)),
        ] {
            assert!(check_group(&group).is_ok(), "{group}");
            assert!(check_topic(&dlq_topic(&group)).is_ok(), "{group}");
        }
        for group in ["g".repeat(247), "%".repeat(83), "g".repeat(256)] {
            assert_eq!(
                check_group(&group).unwrap_err().code,
                Code::IllegalConsumerGroup
            );
            assert!(check_topic(&dlq_topic(&group)).is_err(), "{group}");
        }
    }

    #[test]
    fn tags_may_not_be_blank_or_contain_a_bar() {
        assert!(check_tag("created").is_ok());
        assert_eq!(check_tag("a|b").unwrap_err().code, Code::IllegalMessageTag);
        assert!(check_tag("  ").is_err());
    }
}
