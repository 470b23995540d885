//! Records: what the commit log holds, and their byte framing.
//!
//! Layout (all integers little-endian; see `docs/storage-format.md`):
//!
//! ```text
//!  0 u32 total_len    4 u32 crc32c(bytes 8..total_len)
//!  8 u8  version      9 u8  kind      10 u16 flags      12 u32 queue_id
//! 16 u64 position    24 u64 synced_upto                 32 u64 queue_offset
//! 40 i64 born_ts     48 i64 store_ts                    56 i64 deliver_at
//! 64 u16 topic_len   66 u16 message_id_len  68 u16 tag_len  70 u16 key_count
//! 72 u32 user_props_len  76 u32 system_props_len  80 u32 body_len  84 u32 reserved
//! 88 topic | message_id | tag | keys | user props | system props | body | pad to 8
//! ```

use std::fmt;

/// Size of the fixed part of a record.
pub const HEADER_LEN: usize = 88;
/// Records start on multiples of this.
pub const ALIGN: usize = 8;
/// The framing version written by this build.
pub const FORMAT_VERSION: u8 = 1;
/// Longest topic name the store accepts, in bytes.
pub const MAX_TOPIC_LEN: usize = 255;

/// What a record is, so the broker can rebuild its state from the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum RecordKind {
    /// A message visible to consumers as soon as it is stored.
    Normal = 1,
    /// A message visible at its `deliver_at` time.
    Delayed = 2,
    /// A transactional ("half") message: stored, never visible until its transaction commits.
    Half = 3,
    /// The resolution (commit or rollback) of a transaction.
    TxResolution = 4,
    /// A check-back sent to a producer about an open transaction.
    TxCheck = 5,
    /// A change of delivery state: acknowledgement, new invisible time, dead-lettering.
    DeliveryState = 6,
    /// Consumer progress (a group's committed offset on a queue).
    ConsumerOffset = 7,
    /// Broker metadata: topic and group definitions.
    Meta = 8,
}

impl RecordKind {
    /// The kind for a byte read from disk.
    pub fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            1 => Self::Normal,
            2 => Self::Delayed,
            3 => Self::Half,
            4 => Self::TxResolution,
            5 => Self::TxCheck,
            6 => Self::DeliveryState,
            7 => Self::ConsumerOffset,
            8 => Self::Meta,
            _ => return None,
        })
    }
}

/// What a caller appends: everything in a record but what the store assigns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordData {
    /// What the record is.
    pub kind: RecordKind,
    /// Topic (for state records, an internal topic of the broker's).
    pub topic: String,
    /// Queue of the topic; the store keeps one index per (topic, queue).
    pub queue_id: u32,
    /// The message id (the transaction id for transaction records).
    pub message_id: String,
    /// Tag; empty for none.
    pub tag: String,
    /// Keys, for lookup.
    pub keys: Vec<String>,
    /// Properties set by the producer.
    pub user_properties: Vec<(String, String)>,
    /// Properties set by the broker or the protocol.
    pub system_properties: Vec<(String, String)>,
    /// When the producer created the message, ms since the epoch.
    pub born_timestamp: i64,
    /// When a delayed message (or timer) becomes due, ms since the epoch; 0 for none.
    pub deliver_at: i64,
    /// Payload.
    pub body: Vec<u8>,
}

impl RecordData {
    /// A record with the given kind, place and body, and everything else empty.
    pub fn new(
        kind: RecordKind,
        topic: impl Into<String>,
        queue_id: u32,
        body: impl Into<Vec<u8>>,
    ) -> Self {
        Self {
            kind,
            topic: topic.into(),
            queue_id,
            message_id: String::new(),
            tag: String::new(),
            keys: Vec::new(),
            user_properties: Vec::new(),
            system_properties: Vec::new(),
            born_timestamp: 0,
            deliver_at: 0,
            body: body.into(),
        }
    }

    /// Bytes this record takes in the log, padding included.
    pub fn encoded_len(&self) -> usize {
        align(self.framed_len())
    }

    /// Length of the framed record without padding (its `total_len`).
    pub fn framed_len(&self) -> usize {
        HEADER_LEN + self.variable_len()
    }

    fn variable_len(&self) -> usize {
        self.topic.len()
            + self.message_id.len()
            + self.tag.len()
            + self.keys.iter().map(|k| 2 + k.len()).sum::<usize>()
            + props_len(&self.user_properties)
            + props_len(&self.system_properties)
            + self.body.len()
    }

    /// Checks the limits of the framing, so that an append fails before anything is written.
    pub fn validate(&self) -> Result<(), String> {
        if self.topic.is_empty() || self.topic.len() > MAX_TOPIC_LEN {
            return Err(format!(
                "topic must be 1 to {MAX_TOPIC_LEN} bytes, got {}",
                self.topic.len()
            ));
        }
        if self.topic.contains(['/', '\0']) || self.topic == "." || self.topic == ".." {
            return Err(format!(
                "topic {:?} contains a character the store does not allow",
                self.topic
            ));
        }
        let u16max = u16::MAX as usize;
        if self.message_id.len() > u16max || self.tag.len() > u16max {
            return Err("message id and tag must be shorter than 64 KiB".into());
        }
        if self.keys.len() > u16max || self.keys.iter().any(|k| k.len() > u16max) {
            return Err("too many keys, or a key longer than 64 KiB".into());
        }
        for (k, _) in self.user_properties.iter().chain(&self.system_properties) {
            if k.len() > u16max {
                return Err("a property name is longer than 64 KiB".into());
            }
        }
        let u32max = u32::MAX as usize;
        if props_len(&self.user_properties) > u32max
            || props_len(&self.system_properties) > u32max
            || self.body.len() > u32max
        {
            return Err("properties or body exceed 4 GiB".into());
        }
        Ok(())
    }

    /// Hash of the tag kept in the queue index, for filtering without reading the log.
    pub fn tag_hash(&self) -> u32 {
        tag_hash(&self.tag)
    }
}

/// Hash of a tag as kept in the queue index (CRC32C of its bytes; 0 for no tag).
pub fn tag_hash(tag: &str) -> u32 {
    crc32c::crc32c(tag.as_bytes())
}

/// A record read back from the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Position of the record in the log (its address).
    pub position: u64,
    /// Offset of the record in its queue.
    pub queue_offset: u64,
    /// When the store appended it, ms since the epoch.
    pub store_timestamp: i64,
    /// What the caller appended.
    pub data: RecordData,
}

/// Fields the store assigns at append time.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Assigned {
    pub position: u64,
    pub synced_upto: u64,
    pub queue_offset: u64,
    pub store_timestamp: i64,
}

/// The fixed part of a record, read before the rest.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Header {
    pub total_len: u32,
    pub position: u64,
    pub synced_upto: u64,
    pub queue_offset: u64,
    pub store_timestamp: i64,
    pub kind: RecordKind,
    pub queue_id: u32,
}

/// Why bytes in the log are not a valid record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// A zero length: the unwritten (zeroed) end of a segment.
    Empty,
    /// Fewer bytes than the record claims.
    Truncated,
    /// The bytes do not frame a record.
    Invalid(&'static str),
    /// The checksum does not match.
    Checksum,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Empty => f.write_str("no record (zeroed space)"),
            Self::Truncated => f.write_str("record cut short"),
            Self::Invalid(why) => write!(f, "invalid record: {why}"),
            Self::Checksum => f.write_str("checksum mismatch"),
        }
    }
}

/// Rounds up to the record alignment.
pub fn align(n: usize) -> usize {
    n.div_ceil(ALIGN) * ALIGN
}

fn props_len(props: &[(String, String)]) -> usize {
    props.iter().map(|(k, v)| 2 + k.len() + 4 + v.len()).sum()
}

/// Appends the encoded record, padded, to `buf`.
pub(crate) fn encode_into(buf: &mut Vec<u8>, data: &RecordData, at: Assigned) {
    let start = buf.len();
    let total = HEADER_LEN + data.variable_len();
    buf.reserve(align(total));
    buf.extend_from_slice(&(total as u32).to_le_bytes());
    buf.extend_from_slice(&[0; 4]); // CRC, filled below
    buf.push(FORMAT_VERSION);
    buf.push(data.kind as u8);
    buf.extend_from_slice(&0u16.to_le_bytes());
    buf.extend_from_slice(&data.queue_id.to_le_bytes());
    buf.extend_from_slice(&at.position.to_le_bytes());
    buf.extend_from_slice(&at.synced_upto.to_le_bytes());
    buf.extend_from_slice(&at.queue_offset.to_le_bytes());
    buf.extend_from_slice(&data.born_timestamp.to_le_bytes());
    buf.extend_from_slice(&at.store_timestamp.to_le_bytes());
    buf.extend_from_slice(&data.deliver_at.to_le_bytes());
    buf.extend_from_slice(&(data.topic.len() as u16).to_le_bytes());
    buf.extend_from_slice(&(data.message_id.len() as u16).to_le_bytes());
    buf.extend_from_slice(&(data.tag.len() as u16).to_le_bytes());
    buf.extend_from_slice(&(data.keys.len() as u16).to_le_bytes());
    buf.extend_from_slice(&(props_len(&data.user_properties) as u32).to_le_bytes());
    buf.extend_from_slice(&(props_len(&data.system_properties) as u32).to_le_bytes());
    buf.extend_from_slice(&(data.body.len() as u32).to_le_bytes());
    buf.extend_from_slice(&0u32.to_le_bytes());
    debug_assert_eq!(buf.len() - start, HEADER_LEN);
    buf.extend_from_slice(data.topic.as_bytes());
    buf.extend_from_slice(data.message_id.as_bytes());
    buf.extend_from_slice(data.tag.as_bytes());
    for key in &data.keys {
        buf.extend_from_slice(&(key.len() as u16).to_le_bytes());
        buf.extend_from_slice(key.as_bytes());
    }
    for (k, v) in data.user_properties.iter().chain(&data.system_properties) {
        buf.extend_from_slice(&(k.len() as u16).to_le_bytes());
        buf.extend_from_slice(k.as_bytes());
        buf.extend_from_slice(&(v.len() as u32).to_le_bytes());
        buf.extend_from_slice(v.as_bytes());
    }
    buf.extend_from_slice(&data.body);
    debug_assert_eq!(buf.len() - start, total);
    let crc = crc32c::crc32c(&buf[start + 8..]);
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    buf.resize(start + align(total), 0);
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Reads the fixed part of a record; `bytes` must hold at least [`HEADER_LEN`] bytes or be
/// the rest of the segment.
pub(crate) fn decode_header(bytes: &[u8], max_len: usize) -> Result<Header, DecodeError> {
    if bytes.len() < 4 {
        return Err(DecodeError::Truncated);
    }
    let total_len = u32_at(bytes, 0);
    if total_len == 0 {
        return Err(DecodeError::Empty);
    }
    if bytes.len() < HEADER_LEN {
        return Err(DecodeError::Truncated);
    }
    if (total_len as usize) < HEADER_LEN || total_len as usize > max_len {
        return Err(DecodeError::Invalid("length out of range"));
    }
    if bytes[8] != FORMAT_VERSION {
        return Err(DecodeError::Invalid("unknown format version"));
    }
    let kind =
        RecordKind::from_byte(bytes[9]).ok_or(DecodeError::Invalid("unknown record kind"))?;
    Ok(Header {
        total_len,
        kind,
        queue_id: u32_at(bytes, 12),
        position: u64_at(bytes, 16),
        synced_upto: u64_at(bytes, 24),
        queue_offset: u64_at(bytes, 32),
        store_timestamp: u64_at(bytes, 48) as i64,
    })
}

/// Checks the checksum of a whole record (`bytes` holds at least `total_len` bytes).
pub(crate) fn verify(bytes: &[u8], header: &Header) -> Result<(), DecodeError> {
    let total = header.total_len as usize;
    if bytes.len() < total {
        return Err(DecodeError::Truncated);
    }
    if crc32c::crc32c(&bytes[8..total]) != u32_at(bytes, 4) {
        return Err(DecodeError::Checksum);
    }
    Ok(())
}

/// Decodes a whole record whose checksum was verified.
pub(crate) fn decode(bytes: &[u8], header: &Header) -> Result<Record, DecodeError> {
    verify(bytes, header)?;
    let bad = DecodeError::Invalid("field lengths do not add up");
    let total = header.total_len as usize;
    let topic_len = u16_at(bytes, 64) as usize;
    let id_len = u16_at(bytes, 66) as usize;
    let tag_len = u16_at(bytes, 68) as usize;
    let key_count = u16_at(bytes, 70) as usize;
    let user_len = u32_at(bytes, 72) as usize;
    let sys_len = u32_at(bytes, 76) as usize;
    let body_len = u32_at(bytes, 80) as usize;
    let mut cur = Cursor {
        b: &bytes[..total],
        at: HEADER_LEN,
    };
    let topic = cur.string(topic_len)?;
    let message_id = cur.string(id_len)?;
    let tag = cur.string(tag_len)?;
    let mut keys = Vec::with_capacity(key_count);
    for _ in 0..key_count {
        let n = cur.u16()? as usize;
        keys.push(cur.string(n)?);
    }
    let user_properties = cur.props(user_len)?;
    let system_properties = cur.props(sys_len)?;
    let body = cur.take(body_len)?.to_vec();
    if cur.at != total {
        return Err(bad);
    }
    Ok(Record {
        position: header.position,
        queue_offset: header.queue_offset,
        store_timestamp: header.store_timestamp,
        data: RecordData {
            kind: header.kind,
            topic,
            queue_id: header.queue_id,
            message_id,
            tag,
            keys,
            user_properties,
            system_properties,
            born_timestamp: u64_at(bytes, 40) as i64,
            deliver_at: u64_at(bytes, 56) as i64,
            body,
        },
    })
}

struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.b.len());
        let end = end.ok_or(DecodeError::Invalid("field runs past the record"))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        self.take(2).map(|s| u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        self.take(4)
            .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn string(&mut self, n: usize) -> Result<String, DecodeError> {
        let s = self.take(n)?;
        String::from_utf8(s.to_vec()).map_err(|_| DecodeError::Invalid("text is not UTF-8"))
    }
    fn props(&mut self, len: usize) -> Result<Vec<(String, String)>, DecodeError> {
        let end = self.at + len;
        let mut out = Vec::new();
        while self.at < end {
            let k = self.u16()? as usize;
            let key = self.string(k)?;
            let v = self.u32()? as usize;
            out.push((key, self.string(v)?));
        }
        if self.at != end {
            return Err(DecodeError::Invalid("property section length mismatch"));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> RecordData {
        let mut d = RecordData::new(RecordKind::Half, "orders", 3, b"paid".to_vec());
        d.message_id = "01J0000000".into();
        d.tag = "created".into();
        d.keys = vec!["order-1".into(), "user-9".into()];
        d.user_properties = vec![("a".into(), "1".into())];
        d.system_properties = vec![("txmq.producer".into(), "p1".into())];
        d.born_timestamp = 1_700_000_000_000;
        d.deliver_at = 42;
        d
    }

    #[test]
    fn record_round_trips_through_its_framing() {
        let data = sample();
        let mut buf = Vec::new();
        let at = Assigned {
            position: 4096,
            synced_upto: 64,
            queue_offset: 7,
            store_timestamp: 99,
        };
        encode_into(&mut buf, &data, at);
        assert_eq!(buf.len(), data.encoded_len());
        assert_eq!(buf.len() % ALIGN, 0);
        let h = decode_header(&buf, 1 << 20).unwrap();
        assert_eq!((h.position, h.synced_upto, h.queue_offset), (4096, 64, 7));
        let rec = decode(&buf, &h).unwrap();
        assert_eq!(rec.data, data);
        assert_eq!(
            (rec.position, rec.queue_offset, rec.store_timestamp),
            (4096, 7, 99)
        );
    }

    #[test]
    fn any_flipped_bit_is_caught_by_the_checksum_or_the_framing() {
        let mut buf = Vec::new();
        let at = Assigned {
            position: 0,
            synced_upto: 0,
            queue_offset: 0,
            store_timestamp: 1,
        };
        encode_into(&mut buf, &sample(), at);
        let total = u32_at(&buf, 0) as usize;
        for byte in 0..total {
            let mut b = buf.clone();
            b[byte] ^= 0x04;
            let ok = decode_header(&b, 1 << 20)
                .and_then(|h| decode(&b, &h))
                .is_ok();
            assert!(!ok, "flip at byte {byte} went unnoticed");
        }
    }
}
