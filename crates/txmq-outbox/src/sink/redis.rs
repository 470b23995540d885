//! Redis Streams: each row is appended with `XADD` to the stream its destination names.
//!
//! URL: `redis://[USER:PASS@]HOST:PORT[/DB]`. A row becomes the stream entry
//!
//! ```text
//! XADD <destination> * id <row id> payload <bytes> [key <key>] [h:<name> <value>]...
//! ```
//!
//! (one `h:`-prefixed field per row header). The XADDs of one call go out as one pipeline
//! (one round trip) and each gets its own reply: an error reply (e.g. `WRONGTYPE`, the key
//! holds something other than a stream) fails only its row; a connection failure or no
//! reply within [`CONFIRM_TIMEOUT`] fails every row of the call.
//!
//! **Durability.** Redis acknowledges an XADD once it is applied in memory. It is durable
//! only as configured on the Redis server: with `appendonly yes` and `appendfsync always`
//! every write is fsynced to the append-only file before the reply; with the default
//! `appendfsync everysec` up to a second of acknowledged entries, and without `appendonly`
//! everything since the last RDB snapshot, is lost if the server crashes. Replication is
//! asynchronous. This sink does not wait for the AOF or replicas (`WAIT`/`WAITAOF`).
//!
//! **Duplicates.** XADD with `*` assigns a fresh entry id every time, so a row republished
//! after a lost reply is appended again: consumers deduplicate by the `id` field.
//!
//! The connection is a [`ConnectionManager`], which reconnects by itself after a
//! connection failure; the rows of the failed call get errors and the relay retries them.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::{BoxFuture, Sink, SinkError};
use crate::OutboxRow;

/// How long a call waits for the replies of its XADDs before its rows fail.
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Publishes rows to Redis Streams; see the [module docs](self).
#[derive(Clone)]
pub struct RedisSink {
    /// The URL with the password hidden, for messages.
    shown: String,
    /// The self-reconnecting connection.
    connection: ConnectionManager,
}

impl RedisSink {
    /// Connects to the Redis server at `url` (see the [module docs](self)).
    ///
    /// # Errors
    /// A malformed URL, or the server cannot be reached, refuses the login or does not
    /// answer within 10 s.
    pub async fn connect(url: &str) -> Result<Self, SinkError> {
        let shown = super::redact_url(url, true);
        let client = redis::Client::open(url)
            .map_err(|e| SinkError::new(format!("invalid Redis URL {shown}: {e}")))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(CONFIRM_TIMEOUT))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1));
        let connection = tokio::time::timeout(
            CONNECT_TIMEOUT,
            client.get_connection_manager_with_config(config),
        )
        .await
        .map_err(|_| {
            SinkError::new(format!(
                "cannot connect to Redis at {shown}: no answer within {CONNECT_TIMEOUT:?}"
            ))
        })?
        .map_err(|e| SinkError::new(format!("cannot connect to Redis at {shown}: {e}")))?;
        Ok(Self { shown, connection })
    }

    /// Appends `rows` in one pipeline; one result per row.
    async fn publish_rows(&self, rows: &[OutboxRow]) -> Vec<Result<(), SinkError>> {
        if rows.is_empty() {
            return Vec::new();
        }
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for row in rows {
            let cmd = pipe
                .cmd("XADD")
                .arg(&row.destination)
                .arg("*")
                .arg("id")
                .arg(&row.id)
                .arg("payload")
                .arg(&row.payload);
            if let Some(key) = &row.key {
                cmd.arg("key").arg(key);
            }
            for (name, value) in &row.headers {
                cmd.arg(format!("h:{name}")).arg(value);
            }
        }
        let mut connection = self.connection.clone();
        let replies = tokio::time::timeout(
            CONFIRM_TIMEOUT,
            pipe.query_async::<Vec<redis::RedisResult<String>>>(&mut connection),
        )
        .await
        .map_err(|_| format!("no reply within {CONFIRM_TIMEOUT:?}"))
        .and_then(|r| r.map_err(|e| e.to_string()));
        match replies {
            Ok(replies) if replies.len() == rows.len() => rows
                .iter()
                .zip(replies)
                .map(|(row, reply)| {
                    reply.map(|_entry_id| ()).map_err(|e| {
                        SinkError::new(format!(
                            "Redis at {} refused XADD of message {} to stream {:?}: {e}",
                            self.shown, row.id, row.destination
                        ))
                    })
                })
                .collect(),
            Ok(replies) => {
                let e = SinkError::new(format!(
                    "Redis at {} answered {} replies to {} XADDs",
                    self.shown,
                    replies.len(),
                    rows.len()
                ));
                rows.iter().map(|_| Err(e.clone())).collect()
            }
            Err(e) => rows
                .iter()
                .map(|row| {
                    Err(SinkError::new(format!(
                        "Redis at {} did not confirm XADD of message {} to stream {:?}: {e}",
                        self.shown, row.id, row.destination
                    )))
                })
                .collect(),
        }
    }
}

impl Sink for RedisSink {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn publish<'a>(&'a self, rows: &'a [OutboxRow]) -> BoxFuture<'a, Vec<Result<(), SinkError>>> {
        Box::pin(self.publish_rows(rows))
    }
}

impl std::fmt::Debug for RedisSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSink")
            .field("url", &self.shown)
            .finish_non_exhaustive()
    }
}
