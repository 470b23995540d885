//! Topics and consumer groups, kept in a state file replaced atomically on every change.

use std::collections::BTreeMap;
use std::sync::RwLock;

use serde::{Deserialize, Serialize};
use txmq_proto::v2::Code;
use txmq_store::StateFiles;

use crate::error::{BrokerError, BrokerResult};
use crate::names;

const FILE: &str = "metadata";

/// What kind of messages a topic takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TopicType {
    /// Plain messages.
    Normal,
    /// Messages ordered per message group.
    Fifo,
    /// Messages delivered at a given time.
    Delay,
    /// Transactional (half) messages.
    Transaction,
}

impl TopicType {
    /// Parses `normal`, `fifo`, `delay` or `transaction` (any case).
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s.to_ascii_lowercase().as_str() {
            "normal" => Self::Normal,
            "fifo" => Self::Fifo,
            "delay" => Self::Delay,
            "transaction" => Self::Transaction,
            _ => return None,
        })
    }

    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Normal => "normal",
            Self::Fifo => "fifo",
            Self::Delay => "delay",
            Self::Transaction => "transaction",
        }
    }
}

/// A topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Topic {
    /// Name.
    pub name: String,
    /// Message type it takes.
    pub message_type: TopicType,
    /// Number of queues.
    pub queues: u32,
}

/// A consumer group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    /// Name.
    pub name: String,
    /// Delivery attempts before a message is dead-lettered.
    pub max_attempts: u32,
    /// Deliver each message group in order.
    pub fifo: bool,
    /// Redelivery delays after a failed attempt, ms (empty: the default ladder, 10 s to 2 h).
    #[serde(default)]
    pub backoff_ms: Vec<u64>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Saved {
    topics: BTreeMap<String, Topic>,
    groups: BTreeMap<String, Group>,
}

/// The broker's topics and groups.
pub struct Metadata {
    files: StateFiles,
    state: RwLock<Saved>,
}

impl Metadata {
    /// Loads the metadata saved in `files`.
    ///
    /// # Errors
    /// If the file is unreadable or damaged.
    pub fn load(files: StateFiles) -> anyhow::Result<Self> {
        let state = match files.read(FILE)? {
            Some(bytes) => serde_json::from_slice(&bytes)?,
            None => Saved::default(),
        };
        Ok(Self {
            files,
            state: RwLock::new(state),
        })
    }

    fn save(&self, state: &Saved) -> BrokerResult<()> {
        let bytes = serde_json::to_vec(state).map_err(|e| BrokerError::internal(e.to_string()))?;
        self.files
            .write(FILE, &bytes)
            .map_err(|e| BrokerError::internal(format!("cannot save metadata: {e}")))
    }

    /// A topic by name.
    pub fn topic(&self, name: &str) -> Option<Topic> {
        self.state
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .topics
            .get(name)
            .cloned()
    }

    /// All topics.
    pub fn topics(&self) -> Vec<Topic> {
        self.state
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .topics
            .values()
            .cloned()
            .collect()
    }

    /// Creates a topic, durably. Creating an existing topic with the same settings succeeds.
    ///
    /// # Errors
    /// Illegal name or queue count, or an existing topic with other settings.
    pub fn create_topic(
        &self,
        name: &str,
        message_type: TopicType,
        queues: u32,
    ) -> BrokerResult<Topic> {
        names::check_topic(name)?;
        if queues == 0 || queues > 1024 {
            return Err(BrokerError::bad_request("a topic has 1 to 1024 queues"));
        }
        let topic = Topic {
            name: name.to_string(),
            message_type,
            queues,
        };
        let mut st = self.state.write().unwrap_or_else(|e| e.into_inner());
        if let Some(existing) = st.topics.get(name) {
            return if *existing == topic {
                Ok(topic)
            } else {
                Err(BrokerError::new(
                    Code::BadRequest,
                    format!(
                        "topic {name} exists as {} with {} queues",
                        existing.message_type.as_str(),
                        existing.queues
                    ),
                ))
            };
        }
        st.topics.insert(name.to_string(), topic.clone());
        if let Err(e) = self.save(&st) {
            st.topics.remove(name);
            return Err(e);
        }
        Ok(topic)
    }

    /// A group by name.
    pub fn group(&self, name: &str) -> Option<Group> {
        self.state
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .groups
            .get(name)
            .cloned()
    }

    /// All groups.
    pub fn groups(&self) -> Vec<Group> {
        self.state
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .groups
            .values()
            .cloned()
            .collect()
    }

    /// Creates or updates a group, durably.
    ///
    /// # Errors
    /// Illegal name or attempts.
    pub fn put_group(
        &self,
        name: &str,
        max_attempts: u32,
        fifo: bool,
        backoff_ms: Vec<u64>,
    ) -> BrokerResult<Group> {
        names::check_group(name)?;
        if max_attempts == 0 || max_attempts > 1000 {
            return Err(BrokerError::bad_request("max attempts must be 1 to 1000"));
        }
        // A delay is a ChangeInvisibleDuration, which takes at most 12 hours.
        if backoff_ms.len() > 64 || backoff_ms.iter().any(|&ms| ms > 12 * 3600 * 1000) {
            return Err(BrokerError::bad_request(
                "backoff: at most 64 delays of at most 12 hours",
            ));
        }
        let group = Group {
            name: name.to_string(),
            max_attempts,
            fifo,
            backoff_ms,
        };
        let mut st = self.state.write().unwrap_or_else(|e| e.into_inner());
        let old = st.groups.insert(name.to_string(), group.clone());
        if let Err(e) = self.save(&st) {
            match old {
                Some(g) => st.groups.insert(name.to_string(), g),
                None => st.groups.remove(name),
            };
            return Err(e);
        }
        Ok(group)
    }
}
