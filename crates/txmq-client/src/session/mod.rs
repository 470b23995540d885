//! One client's connection to the server: the HTTP/2 connection, the Telemetry stream (settings in
//! both directions, check-backs from the server), heartbeats, the route cache, and a
//! wrapper per RPC with its deadline and status check.
//!
//! A [`Session`] is cheap to clone. Its background tasks (telemetry reader, heartbeats,
//! route refresh) stop when the last clone is dropped.

mod check_backs;
mod telemetry;
pub(crate) mod transport;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tonic::service::interceptor::InterceptedService;
use txmq_proto::txmq::v1::{self as txmq_pb, transactions_client::TransactionsClient};
use txmq_proto::v2::messaging_service_client::MessagingServiceClient;
use txmq_proto::v2::{self as pb, Code, receive_message_response, settings::PubSub};

use crate::config::ClientConfig;
use crate::consumer::Subscription;
use crate::error::{CallError, ConnectError, check};
use crate::message::MessageView;
use crate::retry::{RetryPolicy, from_duration};
use crate::transaction::TransactionResolution;
use check_backs::CheckBacks;
use transport::{Connection, Headers, Target};

/// The generated stub with the `x-mq-*` headers added to every request.
pub(crate) type Stub = MessagingServiceClient<InterceptedService<Connection, Headers>>;

/// The stub of txmq's own `txmq.v1.Transactions`, on the same connection.
type TransactionsStub = TransactionsClient<InterceptedService<Connection, Headers>>;

/// A boxed, sendable future.
pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// A transaction checker with its type erased: (transaction id, half message) → resolution.
pub(crate) type CheckFn =
    Arc<dyn Fn(String, MessageView) -> BoxFuture<TransactionResolution> + Send + Sync>;

/// How often heartbeats are sent (as the Java client does).
const HEARTBEAT_PERIOD: Duration = Duration::from_secs(10);
/// How often cached routes are queried again.
const ROUTE_REFRESH_PERIOD: Duration = Duration::from_secs(30);

/// What the client is, as announced in its settings.
#[derive(Debug, Clone)]
pub(crate) enum Role {
    Producer {
        topics: Vec<String>,
    },
    SimpleConsumer {
        group: String,
        subscriptions: Vec<Subscription>,
    },
    PushConsumer {
        group: String,
        subscriptions: Vec<Subscription>,
    },
}

impl Role {
    fn client_type(&self) -> pb::ClientType {
        match self {
            Self::Producer { .. } => pb::ClientType::Producer,
            Self::SimpleConsumer { .. } => pb::ClientType::SimpleConsumer,
            Self::PushConsumer { .. } => pb::ClientType::PushConsumer,
        }
    }

    fn group(&self) -> Option<&str> {
        match self {
            Self::Producer { .. } => None,
            Self::SimpleConsumer { group, .. } | Self::PushConsumer { group, .. } => Some(group),
        }
    }
}

/// State shared by a session's handles and its background tasks.
pub(crate) struct Shared {
    pub(crate) config: ClientConfig,
    target: Target,
    client_id: String,
    hostname: String,
    stub: Stub,
    transactions: TransactionsStub,
    role: Mutex<Role>,
    /// The server's last settings reply.
    server_settings: watch::Sender<Option<pb::Settings>>,
    /// The client half of the current Telemetry stream; dropping it closes the stream.
    telemetry_out: Mutex<Option<mpsc::Sender<pb::TelemetryCommand>>>,
    routes: Mutex<HashMap<String, Arc<Vec<pb::MessageQueue>>>>,
    checker: Option<CheckFn>,
    check_backs: Arc<CheckBacks>,
}

/// Aborts the background tasks when the last session handle goes.
struct Tasks(Vec<JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// A connected client. See the module docs.
#[derive(Clone)]
pub(crate) struct Session {
    shared: Arc<Shared>,
    _tasks: Arc<Tasks>,
}

/// Makes client ids unique within the process.
static CLIENTS: AtomicU64 = AtomicU64::new(0);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// This machine's host name, or `localhost`.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty() && s.is_ascii())
        .unwrap_or_else(|| "localhost".to_string())
}

impl Session {
    /// Connects: opens the Telemetry stream, sends the settings of `role` and waits for the
    /// server's reply; then starts heartbeats and route refreshes.
    ///
    /// Cancelling stops the background work started so far.
    pub(crate) async fn connect(
        config: ClientConfig,
        role: Role,
        checker: Option<CheckFn>,
    ) -> Result<Self, ConnectError> {
        let target = Target::parse(&config.endpoint)?;
        let hostname = hostname();
        let client_id = format!(
            "{hostname}@{}@{}@{}",
            std::process::id(),
            CLIENTS.fetch_add(1, Ordering::Relaxed),
            uuid::Uuid::now_v7().simple()
        );
        let headers = Headers::new(&client_id, &config)?;
        let connection = Connection::new(&config, &target)?;
        let channel = InterceptedService::new(connection, headers);
        let stub = MessagingServiceClient::with_origin(channel.clone(), transport::origin(&target))
            .max_decoding_message_size(256 << 20)
            .max_encoding_message_size(256 << 20);
        let transactions = TransactionsClient::with_origin(channel, transport::origin(&target));
        let check_backs = CheckBacks::new(config.max_concurrent_checks);
        let shared = Arc::new(Shared {
            config,
            target,
            client_id,
            hostname,
            stub,
            transactions,
            role: Mutex::new(role),
            server_settings: watch::Sender::new(None),
            telemetry_out: Mutex::new(None),
            routes: Mutex::new(HashMap::new()),
            check_backs,
            checker,
        });
        let (first_tx, first_rx) = oneshot::channel();
        let mut tasks = Tasks(vec![tokio::spawn(telemetry::run(shared.clone(), first_tx))]);
        match first_rx.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(ConnectError::Unreachable {
                    endpoint: shared.config.endpoint.clone(),
                    cause: CallError::Malformed {
                        rpc: "Telemetry",
                        reason: "the telemetry task stopped".into(),
                    },
                });
            }
        }
        tasks.0.push(tokio::spawn(heartbeats(shared.clone())));
        tasks.0.push(tokio::spawn(refresh_routes(shared.clone())));
        Ok(Self {
            shared,
            _tasks: Arc::new(tasks),
        })
    }

    pub(crate) fn config(&self) -> &ClientConfig {
        &self.shared.config
    }

    /// The client id sent as `x-mq-client-id`.
    pub(crate) fn client_id(&self) -> &str {
        &self.shared.client_id
    }

    /// This machine's host name, sent as the born host of messages.
    pub(crate) fn hostname(&self) -> &str {
        &self.shared.hostname
    }

    pub(crate) fn resource(&self, name: &str) -> pb::Resource {
        self.shared.resource(name)
    }

    /// The server's last settings reply.
    pub(crate) fn server_settings(&self) -> Option<pb::Settings> {
        self.shared.server_settings.borrow().clone()
    }

    /// The retry policy of the server's settings, or the default one.
    pub(crate) fn retry_policy(&self) -> RetryPolicy {
        self.server_settings()
            .and_then(|s| s.backoff_policy)
            .and_then(|p| RetryPolicy::from_proto(&p))
            .unwrap_or_default()
    }

    /// The largest body the server takes, when it said.
    pub(crate) fn max_body_size(&self) -> Option<usize> {
        match self.server_settings()?.pub_sub? {
            PubSub::Publishing(p) if p.max_body_size > 0 => usize::try_from(p.max_body_size).ok(),
            _ => None,
        }
    }

    /// Whether the server asks producers to check message types against routes (default
    /// yes, as RocketMQ proxies do).
    pub(crate) fn validate_message_type(&self) -> bool {
        match self.server_settings().and_then(|s| s.pub_sub) {
            Some(PubSub::Publishing(p)) => p.validate_message_type,
            _ => true,
        }
    }

    /// The subscription part of the server's settings (fifo, batch size, ...).
    pub(crate) fn subscription_settings(&self) -> Option<pb::Subscription> {
        match self.server_settings()?.pub_sub? {
            PubSub::Subscription(s) => Some(s),
            PubSub::Publishing(_) => None,
        }
    }

    /// Announces `topic` among the producer's topics (the server sends check-backs of a
    /// topic's transactions only to producers that announced it).
    pub(crate) fn announce_topic(&self, topic: &str) {
        let changed = {
            let mut role = lock(&self.shared.role);
            match &mut *role {
                Role::Producer { topics } if !topics.iter().any(|t| t == topic) => {
                    topics.push(topic.to_string());
                    true
                }
                _ => false,
            }
        };
        if changed {
            self.shared.resend_settings();
        }
    }

    /// The route of `topic`, from the cache or the server.
    pub(crate) async fn route(&self, topic: &str) -> Result<Arc<Vec<pb::MessageQueue>>, CallError> {
        if let Some(r) = lock(&self.shared.routes).get(topic) {
            return Ok(r.clone());
        }
        let route = Arc::new(self.shared.query_route(topic).await?);
        lock(&self.shared.routes).insert(topic.to_string(), route.clone());
        Ok(route)
    }

    /// Runs one unary call with the request timeout.
    async fn unary<Req, Resp, Fut>(
        &self,
        rpc: &'static str,
        request: Req,
        call: impl FnOnce(Stub, tonic::Request<Req>) -> Fut,
    ) -> Result<Resp, CallError>
    where
        Fut: Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
    {
        self.shared.unary(rpc, request, call).await
    }

    /// Sends messages of one topic; returns one entry per message, each OK.
    pub(crate) async fn send_message(
        &self,
        messages: Vec<pb::Message>,
    ) -> Result<Vec<pb::SendResultEntry>, CallError> {
        const RPC: &str = "SendMessage";
        let n = messages.len();
        let response = self
            .unary(
                RPC,
                pb::SendMessageRequest { messages },
                |mut s, r| async move { s.send_message(r).await },
            )
            .await?;
        for e in &response.entries {
            check(RPC, e.status.as_ref())?;
        }
        match response.status.as_ref().map(|s| s.code) {
            Some(c) if c == Code::MultipleResults as i32 => {}
            _ => check(RPC, response.status.as_ref())?,
        }
        if response.entries.len() != n {
            return Err(CallError::Malformed {
                rpc: RPC,
                reason: format!("{} result entries for {n} messages", response.entries.len()),
            });
        }
        Ok(response.entries)
    }

    /// The request that commits or rolls back a half message.
    pub(crate) fn end_request(
        &self,
        topic: &str,
        message_id: &str,
        transaction_id: &str,
        resolution: pb::TransactionResolution,
        source: pb::TransactionSource,
    ) -> pb::EndTransactionRequest {
        self.shared
            .end_request(topic, message_id, transaction_id, resolution, source)
    }

    /// Commits or rolls back a half message.
    pub(crate) async fn end_transaction(
        &self,
        request: pb::EndTransactionRequest,
    ) -> Result<(), CallError> {
        self.shared.end_transaction(request).await
    }

    /// Commits or rolls back several half messages in one call of txmq's own
    /// `txmq.v1.Transactions.EndTransactions`: the outcome of each, in order. A server
    /// without it (a RocketMQ proxy) fails the whole call with gRPC status `UNIMPLEMENTED`.
    pub(crate) async fn end_transactions(
        &self,
        requests: Vec<pb::EndTransactionRequest>,
    ) -> Result<Vec<Result<(), CallError>>, CallError> {
        const RPC: &str = "EndTransactions";
        let n = requests.len();
        let response = self
            .shared
            .unary_on(
                self.shared.transactions.clone(),
                RPC,
                txmq_pb::EndTransactionsRequest { entries: requests },
                |mut s, r| async move { s.end_transactions(r).await },
            )
            .await?;
        if response.entries.len() != n {
            // A refusal of the whole request comes without entries.
            check(RPC, response.status.as_ref())?;
            return Err(CallError::Malformed {
                rpc: RPC,
                reason: format!(
                    "{} result entries for {n} transactions",
                    response.entries.len()
                ),
            });
        }
        Ok(response
            .entries
            .iter()
            .map(|status| check(RPC, Some(status)))
            .collect())
    }

    /// One long-polling receive: the messages of the stream (none on `MESSAGE_NOT_FOUND`),
    /// within the long-polling timeout plus the request timeout.
    pub(crate) async fn receive(
        &self,
        request: pb::ReceiveMessageRequest,
        long_polling: Duration,
    ) -> Result<Vec<pb::Message>, CallError> {
        const RPC: &str = "ReceiveMessage";
        let after = long_polling + self.shared.config.request_timeout;
        let mut stub = self.shared.stub.clone();
        let call = async move {
            let mut request = tonic::Request::new(request);
            request.set_timeout(after);
            let mut stream = stub
                .receive_message(request)
                .await
                .map_err(|s| CallError::transport(RPC, s))?
                .into_inner();
            let mut messages = Vec::new();
            let mut status = None;
            while let Some(r) = stream
                .message()
                .await
                .map_err(|s| CallError::transport(RPC, s))?
            {
                match r.content {
                    Some(receive_message_response::Content::Message(m)) => messages.push(m),
                    Some(receive_message_response::Content::Status(s)) => status = Some(s),
                    Some(receive_message_response::Content::DeliveryTimestamp(_)) | None => {}
                }
            }
            match status {
                Some(s) if s.code == Code::MessageNotFound as i32 => Ok(messages),
                None if !messages.is_empty() => Ok(messages),
                s => check(RPC, s.as_ref()).map(|()| messages),
            }
        };
        tokio::time::timeout(after, call)
            .await
            .map_err(|_| CallError::TimedOut { rpc: RPC, after })?
    }

    /// Acknowledges one delivery.
    pub(crate) async fn ack(
        &self,
        group: &str,
        topic: &str,
        message_id: &str,
        receipt_handle: &str,
    ) -> Result<(), CallError> {
        self.ack_many(group, topic, &[(message_id, receipt_handle)])
            .await?
            .pop()
            .unwrap_or_else(|| {
                Err(CallError::Malformed {
                    rpc: "AckMessage",
                    reason: "no result entry".into(),
                })
            })
    }

    /// Acknowledges messages of one topic (message id, receipt handle) in one call: the
    /// outcome of each, in order, or the failure of the call.
    pub(crate) async fn ack_many(
        &self,
        group: &str,
        topic: &str,
        entries: &[(&str, &str)],
    ) -> Result<Vec<Result<(), CallError>>, CallError> {
        const RPC: &str = "AckMessage";
        let request = pb::AckMessageRequest {
            group: Some(self.resource(group)),
            topic: Some(self.resource(topic)),
            entries: entries
                .iter()
                .map(|(message_id, receipt_handle)| pb::AckMessageEntry {
                    message_id: message_id.to_string(),
                    receipt_handle: receipt_handle.to_string(),
                    lite_topic: None,
                })
                .collect(),
        };
        let response = self
            .unary(
                RPC,
                request,
                |mut s, r| async move { s.ack_message(r).await },
            )
            .await?;
        // MULTIPLE_RESULTS: each entry has its own status. Otherwise the call's status holds
        // for every entry without one, and no entry's OK overrides a failed call.
        let multiple = response
            .status
            .as_ref()
            .is_some_and(|s| s.code == Code::MultipleResults as i32);
        let call = if multiple {
            Ok(())
        } else {
            check(RPC, response.status.as_ref())
        };
        // Each result entry names the receipt handle it answers.
        let results: HashMap<&str, Option<&pb::Status>> = response
            .entries
            .iter()
            .map(|e| (e.receipt_handle.as_str(), e.status.as_ref()))
            .collect();
        Ok(entries
            .iter()
            .map(|(_, handle)| match results.get(handle) {
                Some(status) => check(RPC, *status).and(call.clone()),
                None if multiple => Err(CallError::Malformed {
                    rpc: RPC,
                    reason: format!("no result entry for receipt handle {handle}"),
                }),
                None => call.clone(),
            })
            .collect())
    }

    /// Changes how long a delivery stays invisible; returns the new receipt handle.
    pub(crate) async fn change_invisible_duration(
        &self,
        group: &str,
        topic: &str,
        message_id: &str,
        receipt_handle: &str,
        invisible: Duration,
    ) -> Result<String, CallError> {
        const RPC: &str = "ChangeInvisibleDuration";
        let request = pb::ChangeInvisibleDurationRequest {
            group: Some(self.resource(group)),
            topic: Some(self.resource(topic)),
            receipt_handle: receipt_handle.to_string(),
            invisible_duration: Some(from_duration(invisible)),
            message_id: message_id.to_string(),
            lite_topic: None,
            suspend: None,
        };
        let response = self
            .unary(RPC, request, |mut s, r| async move {
                s.change_invisible_duration(r).await
            })
            .await?;
        check(RPC, response.status.as_ref())?;
        if response.receipt_handle.is_empty() {
            return Err(CallError::Malformed {
                rpc: RPC,
                reason: "no receipt handle".into(),
            });
        }
        Ok(response.receipt_handle)
    }

    /// Moves a delivery to the group's dead-letter queue.
    pub(crate) async fn forward_to_dead_letter_queue(
        &self,
        group: &str,
        view: &MessageView,
        max_attempts: u32,
    ) -> Result<(), CallError> {
        const RPC: &str = "ForwardMessageToDeadLetterQueue";
        let request = pb::ForwardMessageToDeadLetterQueueRequest {
            group: Some(self.resource(group)),
            topic: Some(self.resource(view.topic())),
            receipt_handle: view.receipt_handle().unwrap_or_default().to_string(),
            message_id: view.message_id().to_string(),
            delivery_attempt: i32::try_from(view.delivery_attempt()).unwrap_or(i32::MAX),
            max_delivery_attempts: i32::try_from(max_attempts).unwrap_or(i32::MAX),
            lite_topic: None,
        };
        let response = self
            .unary(RPC, request, |mut s, r| async move {
                s.forward_message_to_dead_letter_queue(r).await
            })
            .await?;
        check(RPC, response.status.as_ref())
    }

    /// The queues a push consumer of `group` is to receive `topic` from.
    pub(crate) async fn query_assignment(
        &self,
        topic: &str,
        group: &str,
    ) -> Result<Vec<pb::MessageQueue>, CallError> {
        const RPC: &str = "QueryAssignment";
        let request = pb::QueryAssignmentRequest {
            topic: Some(self.resource(topic)),
            group: Some(self.resource(group)),
            endpoints: Some(self.shared.target.endpoints()),
        };
        let response = self
            .unary(RPC, request, |mut s, r| async move {
                s.query_assignment(r).await
            })
            .await?;
        check(RPC, response.status.as_ref())?;
        Ok(response
            .assignments
            .into_iter()
            .filter_map(|a| a.message_queue)
            .collect())
    }

    /// Tells the server the client is going away (it stops renewing its deliveries).
    pub(crate) async fn notify_termination(&self) -> Result<(), CallError> {
        const RPC: &str = "NotifyClientTermination";
        let group = lock(&self.shared.role).group().map(|g| self.resource(g));
        let response = self
            .unary(
                RPC,
                pb::NotifyClientTerminationRequest { group },
                |mut s, r| async move { s.notify_client_termination(r).await },
            )
            .await?;
        check(RPC, response.status.as_ref())
    }
}

impl Shared {
    fn resource(&self, name: &str) -> pb::Resource {
        pb::Resource {
            resource_namespace: self.config.namespace.clone(),
            name: name.to_string(),
        }
    }

    /// A call of `MessagingService`, bounded by the request timeout.
    async fn unary<Req, Resp, Fut>(
        &self,
        rpc: &'static str,
        request: Req,
        call: impl FnOnce(Stub, tonic::Request<Req>) -> Fut,
    ) -> Result<Resp, CallError>
    where
        Fut: Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
    {
        self.unary_on(self.stub.clone(), rpc, request, call).await
    }

    /// A call on `stub`, bounded by the request timeout.
    async fn unary_on<S, Req, Resp, Fut>(
        &self,
        stub: S,
        rpc: &'static str,
        request: Req,
        call: impl FnOnce(S, tonic::Request<Req>) -> Fut,
    ) -> Result<Resp, CallError>
    where
        Fut: Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
    {
        let after = self.config.request_timeout;
        let mut request = tonic::Request::new(request);
        request.set_timeout(after);
        match tokio::time::timeout(after, call(stub, request)).await {
            Err(_) => Err(CallError::TimedOut { rpc, after }),
            Ok(Err(status)) => Err(CallError::transport(rpc, status)),
            Ok(Ok(response)) => Ok(response.into_inner()),
        }
    }

    /// The settings this client announces.
    fn settings(&self) -> pb::Settings {
        let role = lock(&self.role).clone();
        let pub_sub = match &role {
            Role::Producer { topics } => PubSub::Publishing(pb::Publishing {
                topics: topics.iter().map(|t| self.resource(t)).collect(),
                max_body_size: 0,
                validate_message_type: true,
            }),
            Role::SimpleConsumer {
                group,
                subscriptions,
            }
            | Role::PushConsumer {
                group,
                subscriptions,
            } => PubSub::Subscription(pb::Subscription {
                group: Some(self.resource(group)),
                subscriptions: subscriptions
                    .iter()
                    .map(|s| pb::SubscriptionEntry {
                        topic: Some(self.resource(&s.topic)),
                        expression: Some(s.filter.to_proto()),
                    })
                    .collect(),
                long_polling_timeout: Some(from_duration(self.config.long_polling_timeout)),
                ..Default::default()
            }),
        };
        pb::Settings {
            client_type: Some(role.client_type() as i32),
            access_point: Some(self.target.endpoints()),
            backoff_policy: None,
            request_timeout: Some(from_duration(self.config.request_timeout)),
            pub_sub: Some(pub_sub),
            user_agent: Some(pb::Ua {
                language: pb::Language::Rust as i32,
                version: env!("CARGO_PKG_VERSION").to_string(),
                platform: format!("{} {}", std::env::consts::OS, std::env::consts::ARCH),
                hostname: self.hostname.clone(),
            }),
            metric: None,
        }
    }

    /// Sends the settings again on the current Telemetry stream (a new stream sends them
    /// first anyway).
    fn resend_settings(&self) {
        let command = pb::TelemetryCommand {
            status: None,
            command: Some(pb::telemetry_command::Command::Settings(self.settings())),
        };
        if let Some(out) = lock(&self.telemetry_out).as_ref()
            && out.try_send(command).is_err()
        {
            tracing::debug!("telemetry stream busy or closed; settings go with the next one");
        }
    }

    async fn query_route(&self, topic: &str) -> Result<Vec<pb::MessageQueue>, CallError> {
        const RPC: &str = "QueryRoute";
        let request = pb::QueryRouteRequest {
            topic: Some(self.resource(topic)),
            endpoints: Some(self.target.endpoints()),
        };
        let response = self
            .unary(
                RPC,
                request,
                |mut s, r| async move { s.query_route(r).await },
            )
            .await?;
        check(RPC, response.status.as_ref())?;
        Ok(response.message_queues)
    }

    /// The request that commits or rolls back a half message.
    fn end_request(
        &self,
        topic: &str,
        message_id: &str,
        transaction_id: &str,
        resolution: pb::TransactionResolution,
        source: pb::TransactionSource,
    ) -> pb::EndTransactionRequest {
        pb::EndTransactionRequest {
            topic: Some(self.resource(topic)),
            message_id: message_id.to_string(),
            transaction_id: transaction_id.to_string(),
            resolution: resolution as i32,
            source: source as i32,
            trace_context: String::new(),
        }
    }

    async fn end_transaction(&self, request: pb::EndTransactionRequest) -> Result<(), CallError> {
        const RPC: &str = "EndTransaction";
        let response = self
            .unary(RPC, request, |mut s, r| async move {
                s.end_transaction(r).await
            })
            .await?;
        check(RPC, response.status.as_ref())
    }

    async fn heartbeat(&self) -> Result<(), CallError> {
        const RPC: &str = "Heartbeat";
        let (group, client_type) = {
            let role = lock(&self.role);
            (role.group().map(|g| self.resource(g)), role.client_type())
        };
        let request = pb::HeartbeatRequest {
            group,
            client_type: client_type as i32,
        };
        let response = self
            .unary(RPC, request, |mut s, r| async move { s.heartbeat(r).await })
            .await?;
        check(RPC, response.status.as_ref())
    }
}

/// Sends a heartbeat every [`HEARTBEAT_PERIOD`]; failures are logged and otherwise ignored
/// (the Telemetry stream reconnects on its own).
async fn heartbeats(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(HEARTBEAT_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = shared.heartbeat().await {
            tracing::debug!(error = %e, "heartbeat failed");
        }
    }
}

/// Queries every cached route again each [`ROUTE_REFRESH_PERIOD`]; a topic that is gone is
/// dropped from the cache, other failures keep the old route.
async fn refresh_routes(shared: Arc<Shared>) {
    loop {
        tokio::time::sleep(ROUTE_REFRESH_PERIOD).await;
        let topics: Vec<String> = lock(&shared.routes).keys().cloned().collect();
        for topic in topics {
            match shared.query_route(&topic).await {
                Ok(route) => {
                    lock(&shared.routes).insert(topic, Arc::new(route));
                }
                Err(e) if e.code() == Some(Code::TopicNotFound) => {
                    lock(&shared.routes).remove(&topic);
                }
                Err(e) => tracing::debug!(%topic, error = %e, "route refresh failed"),
            }
        }
    }
}
