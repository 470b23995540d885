//! Receipt handles: which delivery of which message a consumer holds.

use txmq_proto::v2::Code;

use crate::error::BrokerError;

/// `v1.<nonce>.<queue>.<offset>.<epoch>.<topic>`: the broker run (so handles from before a
/// restart are refused), the message, and which delivery or invisibility change it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiptHandle {
    /// Identifies the broker run that issued it.
    pub nonce: u32,
    /// Queue of the message.
    pub queue: u32,
    /// Queue offset of the message.
    pub offset: u64,
    /// Delivery or invisibility change it belongs to.
    pub epoch: u32,
    /// Topic of the message.
    pub topic: String,
}

impl ReceiptHandle {
    /// The text form sent to clients.
    pub fn encode(&self) -> String {
        format!(
            "v1.{:x}.{}.{}.{}.{}",
            self.nonce, self.queue, self.offset, self.epoch, self.topic
        )
    }

    /// Parses the text form.
    ///
    /// # Errors
    /// `INVALID_RECEIPT_HANDLE` if it is not one of ours.
    pub fn parse(s: &str) -> Result<Self, BrokerError> {
        let bad = || {
            BrokerError::new(
                Code::InvalidReceiptHandle,
                format!("malformed receipt handle {s:?}"),
            )
        };
        let mut it = s.splitn(6, '.');
        if it.next() != Some("v1") {
            return Err(bad());
        }
        let nonce = u32::from_str_radix(it.next().ok_or_else(bad)?, 16).map_err(|_| bad())?;
        let queue = it.next().ok_or_else(bad)?.parse().map_err(|_| bad())?;
        let offset = it.next().ok_or_else(bad)?.parse().map_err(|_| bad())?;
        let epoch = it.next().ok_or_else(bad)?.parse().map_err(|_| bad())?;
        let topic = it
            .next()
            .filter(|t| !t.is_empty())
            .ok_or_else(bad)?
            .to_string();
        Ok(Self {
            nonce,
            queue,
            offset,
            epoch,
            topic,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_handle_round_trips_and_garbage_is_refused() {
        let h = ReceiptHandle {
            nonce: 0xabc,
            queue: 3,
            offset: 99,
            epoch: 2,
            topic: "%DLQ%g.x".into(),
        };
        assert_eq!(ReceiptHandle::parse(&h.encode()).unwrap(), h);
        for bad in ["", "v1", "v2.1.1.1.1.t", "v1.zz.1.1.1.t", "v1.1.1.1.1."] {
            assert_eq!(
                ReceiptHandle::parse(bad).unwrap_err().code,
                Code::InvalidReceiptHandle,
                "{bad}"
            );
        }
    }
}
