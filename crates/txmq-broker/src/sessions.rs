//! Connected clients: one session per open Telemetry stream.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use tokio::sync::mpsc;
use txmq_proto::v2::TelemetryCommand;

/// What kind of client a session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientKind {
    /// Sends messages (and answers check-backs).
    Producer,
    /// Receives with automatic renewal.
    PushConsumer,
    /// Receives and acknowledges explicitly.
    SimpleConsumer,
    /// Anything else.
    Other,
}

/// One client's Telemetry stream.
pub struct Session {
    /// Broker-wide id of the stream.
    pub id: u64,
    /// The client's `x-mq-client-id`.
    pub client_id: String,
    /// Producer, consumer...
    pub kind: ClientKind,
    /// Topics a producer declared it publishes to.
    pub topics: Vec<String>,
    /// A consumer's group.
    pub group: Option<String>,
    /// Commands to the client.
    pub outbox: mpsc::Sender<Result<TelemetryCommand, tonic::Status>>,
}

/// The sessions of all connected clients.
#[derive(Default)]
pub struct Sessions {
    map: RwLock<HashMap<u64, Arc<Session>>>,
    next: AtomicU64,
}

impl Sessions {
    /// A fresh stream id.
    pub fn next_id(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Adds or replaces a session (a client re-sending its settings).
    pub fn register(&self, s: Session) {
        self.map
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(s.id, Arc::new(s));
    }

    /// Removes a session when its stream ends.
    pub fn remove(&self, id: u64) {
        self.map
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }

    /// Removes every session of a client (on `NotifyClientTermination`).
    pub fn remove_client(&self, client_id: &str) {
        self.map
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, s| s.client_id != client_id);
    }

    /// Live producers that declared `topic`, in a rotating order.
    pub fn producers_of(&self, topic: &str, rotate: usize) -> Vec<Arc<Session>> {
        let map = self.map.read().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<Arc<Session>> = map
            .values()
            .filter(|s| {
                s.kind == ClientKind::Producer
                    && s.topics.iter().any(|t| t == topic)
                    && !s.outbox.is_closed()
            })
            .cloned()
            .collect();
        out.sort_by_key(|s| s.id);
        if !out.is_empty() {
            let n = rotate % out.len();
            out.rotate_left(n);
        }
        out
    }

    /// Client ids with at least one open stream.
    pub fn connected_clients(&self) -> HashSet<String> {
        let map = self.map.read().unwrap_or_else(|e| e.into_inner());
        map.values()
            .filter(|s| !s.outbox.is_closed())
            .map(|s| s.client_id.clone())
            .collect()
    }

    /// Whether a client has a session (settings received).
    pub fn knows(&self, client_id: &str) -> bool {
        let map = self.map.read().unwrap_or_else(|e| e.into_inner());
        map.values().any(|s| s.client_id == client_id)
    }
}
