//! A minimal Apache RocketMQ 5 gRPC client (`apache.rocketmq.v2`) for the benchmarks: it
//! speaks only the wire protocol, as the official clients do, and knows nothing of the
//! broker's internals.
//!
//! A [`Session`] is one client: one client id, a few HTTP/2 connections (plaintext h2c), and
//! on each connection a Telemetry stream opened with the client's `Settings` before any other
//! call, kept open until the session is dropped. Every request carries the `x-mq-*` headers
//! the official clients send.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use txmq_proto::v2::messaging_service_client::MessagingServiceClient;
use txmq_proto::v2::{
    AckMessageEntry, AckMessageRequest, ClientType, Code, EndTransactionRequest, Language, Message,
    ReceiveMessageRequest, Resource, SendMessageRequest, SendResultEntry, Settings, Status,
    TelemetryCommand, TransactionResolution, TransactionSource, Ua, receive_message_response,
    telemetry_command,
};

/// How long a unary call may take, and the `request_timeout` announced in the settings.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// How long to wait for a TCP connection and for the server's reply to the client settings.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// The generated stub with the `x-mq-*` headers added to every request.
type Stub = MessagingServiceClient<InterceptedService<Channel, Headers>>;

/// Why a session could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// `--server` is not a `host:port` or `http://host:port` address.
    #[error(
        "{server:?} is not a txmq server address (expected host:port or http://host:port): {reason}"
    )]
    BadAddress { server: String, reason: String },
    /// No TCP or HTTP/2 connection could be made.
    #[error("cannot connect to the txmq server at {server}: {reason}")]
    Unreachable { server: String, reason: String },
    /// The Telemetry stream was refused or ended before the server's settings arrived.
    #[error("the txmq server at {server} refused the client settings: {reason}")]
    SettingsRefused { server: String, reason: String },
    /// The server sent nothing back within [`CONNECT_TIMEOUT`].
    #[error("the txmq server at {server} did not answer the client settings within {secs} s")]
    SettingsTimedOut { server: String, secs: u64 },
}

/// Why one call failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The gRPC call itself failed (connection lost, unimplemented, ...).
    #[error("{rpc}: gRPC status {code:?}: {message}")]
    Rpc {
        rpc: &'static str,
        code: tonic::Code,
        message: String,
    },
    /// The server answered with a RocketMQ status other than OK.
    #[error("{rpc}: the server answered {code} ({name}): {message}")]
    Refused {
        rpc: &'static str,
        code: i32,
        name: &'static str,
        message: String,
    },
    /// No answer within the request timeout.
    #[error("{rpc}: no answer within {after:?}")]
    TimedOut { rpc: &'static str, after: Duration },
    /// A SendMessage response without a result entry.
    #[error("{rpc}: the response has no result entry")]
    NoEntry { rpc: &'static str },
}

impl CallError {
    fn rpc(rpc: &'static str, status: tonic::Status) -> Self {
        Self::Rpc {
            rpc,
            code: status.code(),
            message: status.message().to_string(),
        }
    }
}

/// Fails unless `status` is OK. A missing status counts as OK only when `missing_ok`.
fn check(rpc: &'static str, status: Option<&Status>, missing_ok: bool) -> Result<(), CallError> {
    match status {
        Some(s) if s.code == Code::Ok as i32 => Ok(()),
        None if missing_ok => Ok(()),
        Some(s) => Err(CallError::Refused {
            rpc,
            code: s.code,
            name: code_name(s.code),
            message: s.message.clone(),
        }),
        None => Err(CallError::Refused {
            rpc,
            code: 0,
            name: "no status",
            message: String::new(),
        }),
    }
}

/// The protocol's name of a status code, for messages.
pub fn code_name(code: i32) -> &'static str {
    Code::try_from(code).map_or("unknown code", |c| c.as_str_name())
}

/// Runs `call` with the request timeout.
async fn timed<T>(
    rpc: &'static str,
    after: Duration,
    call: impl Future<Output = Result<T, CallError>>,
) -> Result<T, CallError> {
    tokio::time::timeout(after, call)
        .await
        .map_err(|_| CallError::TimedOut { rpc, after })?
}

/// Adds the headers of the official clients to every request.
#[derive(Clone)]
struct Headers {
    client_id: AsciiMetadataValue,
}

impl Interceptor for Headers {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        let m: &mut MetadataMap = request.metadata_mut();
        m.insert("x-mq-client-id", self.client_id.clone());
        m.insert("x-mq-language", AsciiMetadataValue::from_static("RUST"));
        m.insert(
            "x-mq-protocol-version",
            AsciiMetadataValue::from_static("v2"),
        );
        m.insert(
            "x-mq-client-version",
            AsciiMetadataValue::from_static(env!("CARGO_PKG_VERSION")),
        );
        let ascii = |s: String| {
            AsciiMetadataValue::try_from(s).map_err(|e| tonic::Status::internal(e.to_string()))
        };
        m.insert("x-mq-request-id", ascii(uuid::Uuid::now_v7().to_string())?);
        m.insert("x-mq-date-time", ascii(utc_date_time(SystemTime::now()))?);
        Ok(request)
    }
}

/// `yyyyMMddTHHmmssZ` in UTC, the format of the official clients' `x-mq-date-time`.
fn utc_date_time(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// This machine's host name, or `localhost`.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

/// The `http://host:port` URI of `server`, which may omit the scheme. TLS is not spoken.
fn server_uri(server: &str) -> Result<String, OpenError> {
    let bad = |reason: &str| OpenError::BadAddress {
        server: server.to_string(),
        reason: reason.to_string(),
    };
    let uri = match server.split_once("://") {
        None => format!("http://{server}"),
        Some(("http", _)) => server.to_string(),
        Some((scheme, _)) => {
            return Err(bad(&format!(
                "scheme {scheme}:// is not supported, only plaintext http://"
            )));
        }
    };
    let parsed: tonic::codegen::http::Uri = uri.parse().map_err(|e| bad(&format!("{e}")))?;
    if parsed.port_u16().is_none() {
        return Err(bad("no port"));
    }
    Ok(uri)
}

/// `error` and its sources, joined by `: `.
fn chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let s = e.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        source = e.source();
    }
    out
}

/// A user agent for the settings.
fn user_agent() -> Ua {
    Ua {
        language: Language::Rust as i32,
        version: env!("CARGO_PKG_VERSION").to_string(),
        platform: format!("{} {}", std::env::consts::OS, std::env::consts::ARCH),
        hostname: hostname(),
    }
}

/// The settings a producer of `topics` announces.
pub fn producer_settings(topics: &[&str]) -> Settings {
    Settings {
        client_type: Some(ClientType::Producer as i32),
        request_timeout: Some(duration(REQUEST_TIMEOUT)),
        pub_sub: Some(txmq_proto::v2::settings::PubSub::Publishing(
            txmq_proto::v2::Publishing {
                topics: topics.iter().map(|t| resource(t)).collect(),
                ..Default::default()
            },
        )),
        user_agent: Some(user_agent()),
        ..Default::default()
    }
}

/// The settings a simple consumer of `group` subscribed to every tag of `topic` announces.
pub fn simple_consumer_settings(group: &str, topic: &str) -> Settings {
    Settings {
        client_type: Some(ClientType::SimpleConsumer as i32),
        request_timeout: Some(duration(REQUEST_TIMEOUT)),
        pub_sub: Some(txmq_proto::v2::settings::PubSub::Subscription(
            txmq_proto::v2::Subscription {
                group: Some(resource(group)),
                subscriptions: vec![txmq_proto::v2::SubscriptionEntry {
                    topic: Some(resource(topic)),
                    expression: Some(all_tags()),
                }],
                ..Default::default()
            },
        )),
        user_agent: Some(user_agent()),
        ..Default::default()
    }
}

/// The filter that accepts every tag.
pub fn all_tags() -> txmq_proto::v2::FilterExpression {
    txmq_proto::v2::FilterExpression {
        r#type: txmq_proto::v2::FilterType::Tag as i32,
        expression: "*".to_string(),
    }
}

/// A resource in the default (empty) namespace.
pub fn resource(name: &str) -> Resource {
    Resource {
        name: name.to_string(),
        resource_namespace: String::new(),
    }
}

/// A protobuf duration.
pub fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: d.subsec_nanos() as i32,
    }
}

/// A message received by [`Session::receive`], with the time it arrived.
pub struct Delivered {
    pub message: Message,
    pub at: Instant,
}

/// One client of the server: its connections and their Telemetry streams.
pub struct Session {
    server: String,
    stubs: Vec<Stub>,
    next: AtomicUsize,
    /// The tasks reading each Telemetry stream; aborted (closing the streams) on drop.
    telemetry: Vec<JoinHandle<()>>,
}

impl Drop for Session {
    fn drop(&mut self) {
        for t in &self.telemetry {
            t.abort();
        }
    }
}

/// A process-wide counter that makes client ids unique within the process.
static CLIENTS: AtomicU64 = AtomicU64::new(0);

impl Session {
    /// Connects `connections` HTTP/2 connections to `server` and, on each, opens a Telemetry
    /// stream, sends `settings` and waits for the server's settings reply.
    ///
    /// Cancelling drops the connections made so far.
    ///
    /// # Errors
    /// If the address is bad, a connection cannot be made, or the server does not accept
    /// the settings within [`CONNECT_TIMEOUT`].
    pub async fn open(
        server: &str,
        connections: usize,
        settings: Settings,
    ) -> Result<Self, OpenError> {
        let uri = server_uri(server)?;
        let n = CLIENTS.fetch_add(1, Ordering::Relaxed);
        let client_id = format!(
            "{}@{}@{n}@{}",
            hostname(),
            std::process::id(),
            uuid::Uuid::now_v7().simple()
        );
        let headers = Headers {
            client_id: AsciiMetadataValue::try_from(client_id.as_str()).map_err(|e| {
                OpenError::BadAddress {
                    server: server.to_string(),
                    reason: format!("host name not usable in a client id: {e}"),
                }
            })?,
        };
        let endpoint = Endpoint::from_shared(uri.clone())
            .map_err(|e| OpenError::BadAddress {
                server: server.to_string(),
                reason: chain(&e),
            })?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30));
        let mut session = Session {
            server: uri.clone(),
            stubs: Vec::new(),
            next: AtomicUsize::new(0),
            telemetry: Vec::new(),
        };
        for _ in 0..connections.max(1) {
            let channel = endpoint
                .connect()
                .await
                .map_err(|e| OpenError::Unreachable {
                    server: uri.clone(),
                    reason: chain(&e),
                })?;
            let stub = MessagingServiceClient::with_interceptor(channel, headers.clone());
            let reader = open_telemetry(&uri, stub.clone(), settings.clone()).await?;
            session.telemetry.push(reader);
            session.stubs.push(stub);
        }
        Ok(session)
    }

    /// The `http://host:port` address the session is connected to.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// A stub on the next connection in turn.
    fn stub(&self) -> Stub {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.stubs.len();
        self.stubs[i].clone()
    }

    /// Sends one message and returns its result entry once the server acknowledged it.
    ///
    /// # Errors
    /// If the call fails, times out, or the entry's status is not OK.
    pub async fn send(&self, message: Message) -> Result<SendResultEntry, CallError> {
        const RPC: &str = "SendMessage";
        let mut stub = self.stub();
        timed(RPC, REQUEST_TIMEOUT, async move {
            let mut request = tonic::Request::new(SendMessageRequest {
                messages: vec![message],
            });
            request.set_timeout(REQUEST_TIMEOUT);
            let response = stub
                .send_message(request)
                .await
                .map_err(|s| CallError::rpc(RPC, s))?
                .into_inner();
            let Some(entry) = response.entries.into_iter().next() else {
                check(RPC, response.status.as_ref(), false)?;
                return Err(CallError::NoEntry { rpc: RPC });
            };
            check(RPC, entry.status.as_ref(), false)?;
            Ok(entry)
        })
        .await
    }

    /// Commits (or rolls back) the transaction of a half message.
    ///
    /// # Errors
    /// If the call fails, times out, or its status is not OK.
    pub async fn end_transaction(
        &self,
        topic: &str,
        message_id: &str,
        transaction_id: &str,
        resolution: TransactionResolution,
        source: TransactionSource,
    ) -> Result<(), CallError> {
        end_transaction(
            self.stub(),
            topic,
            message_id,
            transaction_id,
            resolution,
            source,
        )
        .await
    }

    /// One long-polling ReceiveMessage: reads the server stream to its end and returns the
    /// messages, each with its arrival time. A `MESSAGE_NOT_FOUND` status is an empty batch.
    ///
    /// Cancelling drops the stream; messages the server sent on it stay invisible until their
    /// invisible duration ends.
    ///
    /// # Errors
    /// If the call fails, times out (long polling + request timeout), or its status is
    /// neither OK nor MESSAGE_NOT_FOUND.
    pub async fn receive(
        &self,
        request: ReceiveMessageRequest,
    ) -> Result<Vec<Delivered>, CallError> {
        const RPC: &str = "ReceiveMessage";
        let long_polling = request.long_polling_timeout.map_or(Duration::ZERO, |d| {
            Duration::new(d.seconds.max(0) as u64, d.nanos.max(0) as u32)
        });
        let after = long_polling + REQUEST_TIMEOUT;
        let mut stub = self.stub();
        timed(RPC, after, async move {
            let mut request = tonic::Request::new(request);
            request.set_timeout(after);
            let mut stream = stub
                .receive_message(request)
                .await
                .map_err(|s| CallError::rpc(RPC, s))?
                .into_inner();
            let mut delivered = Vec::new();
            let mut status = None;
            while let Some(r) = stream.message().await.map_err(|s| CallError::rpc(RPC, s))? {
                match r.content {
                    Some(receive_message_response::Content::Message(message)) => {
                        delivered.push(Delivered {
                            message,
                            at: Instant::now(),
                        });
                    }
                    Some(receive_message_response::Content::Status(s)) => status = Some(s),
                    Some(receive_message_response::Content::DeliveryTimestamp(_)) | None => {}
                }
            }
            match status {
                Some(s) if s.code == Code::MessageNotFound as i32 => Ok(delivered),
                s => {
                    check(RPC, s.as_ref(), !delivered.is_empty())?;
                    Ok(delivered)
                }
            }
        })
        .await
    }

    /// Acknowledges received messages of `topic` for `group`.
    ///
    /// # Errors
    /// If the call fails, times out, or any entry was not acknowledged.
    pub async fn ack(
        &self,
        group: &str,
        topic: &str,
        entries: Vec<AckMessageEntry>,
    ) -> Result<(), CallError> {
        const RPC: &str = "AckMessage";
        let mut stub = self.stub();
        let request = AckMessageRequest {
            group: Some(resource(group)),
            topic: Some(resource(topic)),
            entries,
        };
        timed(RPC, REQUEST_TIMEOUT, async move {
            let mut request = tonic::Request::new(request);
            request.set_timeout(REQUEST_TIMEOUT);
            let response = stub
                .ack_message(request)
                .await
                .map_err(|s| CallError::rpc(RPC, s))?
                .into_inner();
            if response.status.as_ref().map(|s| s.code) == Some(Code::MultipleResults as i32) {
                for entry in &response.entries {
                    check(RPC, entry.status.as_ref(), false)?;
                }
                return Ok(());
            }
            check(RPC, response.status.as_ref(), false)
        })
        .await
    }
}

async fn end_transaction(
    mut stub: Stub,
    topic: &str,
    message_id: &str,
    transaction_id: &str,
    resolution: TransactionResolution,
    source: TransactionSource,
) -> Result<(), CallError> {
    const RPC: &str = "EndTransaction";
    let request = EndTransactionRequest {
        topic: Some(resource(topic)),
        message_id: message_id.to_string(),
        transaction_id: transaction_id.to_string(),
        resolution: resolution as i32,
        source: source as i32,
        trace_context: String::new(),
    };
    timed(RPC, REQUEST_TIMEOUT, async move {
        let mut request = tonic::Request::new(request);
        request.set_timeout(REQUEST_TIMEOUT);
        let response = stub
            .end_transaction(request)
            .await
            .map_err(|s| CallError::rpc(RPC, s))?
            .into_inner();
        check(RPC, response.status.as_ref(), false)
    })
    .await
}

/// Opens a Telemetry stream on `stub`, sends `settings` first, waits for the server's
/// settings reply, then leaves a task reading the stream for the life of the session.
///
/// The task answers `RecoverOrphanedTransactionCommand`s by committing: every transaction
/// the benchmark begins is meant to be committed.
async fn open_telemetry(
    server: &str,
    mut stub: Stub,
    settings: Settings,
) -> Result<JoinHandle<()>, OpenError> {
    let refused = |reason: String| OpenError::SettingsRefused {
        server: server.to_string(),
        reason,
    };
    let (outbound, rx) = mpsc::channel::<TelemetryCommand>(4);
    let first = TelemetryCommand {
        status: None,
        command: Some(telemetry_command::Command::Settings(settings)),
    };
    // The channel is empty and its receiver alive: this cannot fail or wait.
    outbound
        .send(first)
        .await
        .map_err(|_| refused("the telemetry stream closed".to_string()))?;
    let opened = async {
        let mut inbound = stub
            .telemetry(tonic::Request::new(ReceiverStream::new(rx)))
            .await
            .map_err(|s| refused(format!("gRPC status {:?}: {}", s.code(), s.message())))?
            .into_inner();
        loop {
            let reply = inbound
                .message()
                .await
                .map_err(|s| refused(format!("gRPC status {:?}: {}", s.code(), s.message())))?
                .ok_or_else(|| refused("the server ended the stream before replying".into()))?;
            if let Some(s) = &reply.status
                && s.code != Code::Ok as i32
            {
                return Err(refused(format!(
                    "{} ({}): {}",
                    s.code,
                    code_name(s.code),
                    s.message
                )));
            }
            if let Some(telemetry_command::Command::Settings(_)) = reply.command {
                return Ok(inbound);
            }
        }
    };
    let mut inbound = match tokio::time::timeout(CONNECT_TIMEOUT, opened).await {
        Ok(r) => r?,
        Err(_) => {
            return Err(OpenError::SettingsTimedOut {
                server: server.to_string(),
                secs: CONNECT_TIMEOUT.as_secs(),
            });
        }
    };
    Ok(tokio::spawn(async move {
        // Holding the sender keeps the client half of the stream open.
        let _outbound = outbound;
        while let Ok(Some(command)) = inbound.message().await {
            if let Some(telemetry_command::Command::RecoverOrphanedTransactionCommand(c)) =
                command.command
            {
                let Some(message) = c.message else { continue };
                let topic = message.topic.map(|t| t.name).unwrap_or_default();
                let id = message
                    .system_properties
                    .map(|p| p.message_id)
                    .unwrap_or_default();
                let stub = stub.clone();
                tokio::spawn(async move {
                    let _ = end_transaction(
                        stub,
                        &topic,
                        &id,
                        &c.transaction_id,
                        TransactionResolution::Commit,
                        TransactionSource::SourceServerCheck,
                    )
                    .await;
                });
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn date_time_header_is_compact_utc() {
        let t = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(utc_date_time(t), "20231114T221320Z");
        assert_eq!(utc_date_time(UNIX_EPOCH), "19700101T000000Z");
        // A leap day.
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(utc_date_time(t), "20000229T000000Z");
    }

    #[test]
    fn server_address_may_omit_the_scheme_but_not_the_port() {
        assert_eq!(
            server_uri("127.0.0.1:8081").unwrap(),
            "http://127.0.0.1:8081"
        );
        assert_eq!(server_uri("http://h:1").unwrap(), "http://h:1");
        assert!(server_uri("https://h:1").is_err());
        assert!(server_uri("localhost").is_err());
    }
}
