//! `MessagingService`: each RPC checks its request, calls the broker, and answers with a
//! RocketMQ `Status` inside the response. Transport errors (a gRPC status) are used only
//! where the protocol has no response to carry a status.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use txmq_proto::txmq::v1 as txmq_pb;
use txmq_proto::txmq::v1::transactions_server::{Transactions, TransactionsServer};
use txmq_proto::v2::messaging_service_server::MessagingService;
use txmq_proto::v2::{
    self as pb, Code, MessageType, Permission, TransactionResolution, receive_message_response,
};

use super::convert::{self, error_status, ok, resource, status};
use crate::broker::Broker;
use crate::delivery::{Filter, RENEW_MS, ReceiveRequest};
use crate::error::{BrokerError, BrokerResult};
use crate::metadata::TopicType;
use crate::transactions::{End, Resolution, TxState};

/// The gRPC service over a broker.
#[derive(Clone)]
pub struct Messaging {
    broker: Arc<Broker>,
    /// Where clients reach this broker, for routes asked without endpoints.
    advertised: pb::Endpoints,
}

impl Messaging {
    /// The service for `broker`, reached by clients at `advertised`.
    pub fn new(broker: Arc<Broker>, advertised: std::net::SocketAddr) -> Self {
        Self {
            broker,
            advertised: endpoints_of(advertised),
        }
    }

    /// The tonic server for this service, accepting gzip-compressed requests.
    pub fn into_server(self) -> pb::messaging_service_server::MessagingServiceServer<Self> {
        pb::messaging_service_server::MessagingServiceServer::new(self)
            .max_decoding_message_size(96 << 20)
            .max_encoding_message_size(96 << 20)
    }

    /// The tonic server for txmq's own `txmq.v1.Transactions` service over this broker.
    pub fn into_transactions_server(self) -> TransactionsServer<Self> {
        TransactionsServer::new(self)
    }

    /// Both services, as served on the gRPC port.
    pub fn into_routes(self) -> tonic::service::Routes {
        tonic::service::Routes::new(self.clone().into_server())
            .add_service(self.into_transactions_server())
    }
}

/// The decision an `EndTransaction` request asks for; `None` for "unknown", which changes
/// nothing (the check-back goes on).
fn end_of(req: pb::EndTransactionRequest) -> Option<End> {
    let resolution = match TransactionResolution::try_from(req.resolution) {
        Ok(TransactionResolution::Commit) => Resolution::Commit,
        Ok(TransactionResolution::Rollback) => Resolution::Rollback,
        _ => return None,
    };
    Some(End {
        topic: name(&req.topic),
        message_id: req.message_id,
        id: req.transaction_id,
        resolution,
    })
}

fn end_status(outcome: &BrokerResult<TxState>) -> pb::Status {
    match outcome {
        Ok(_) => ok(),
        Err(e) => error_status(e),
    }
}

#[tonic::async_trait]
impl Transactions for Messaging {
    /// Each entry as `EndTransaction`, all at once: their records join one durable write.
    async fn end_transactions(
        &self,
        request: Request<txmq_pb::EndTransactionsRequest>,
    ) -> Result<Response<txmq_pb::EndTransactionsResponse>, Status> {
        let req = request.into_inner();
        let refused = |reason: String| {
            Ok(Response::new(txmq_pb::EndTransactionsResponse {
                status: Some(status(Code::BadRequest, reason)),
                entries: Vec::new(),
            }))
        };
        if req.entries.is_empty() {
            return refused("no transaction to end".into());
        }
        if req.entries.len() > txmq_pb::MAX_END_TRANSACTIONS {
            return refused(format!(
                "{} transactions in one call; at most {}",
                req.entries.len(),
                txmq_pb::MAX_END_TRANSACTIONS
            ));
        }
        let ends: Vec<Option<End>> = req.entries.into_iter().map(end_of).collect();
        let asked: Vec<End> = ends.iter().flatten().cloned().collect();
        let mut outcomes = self.broker.end_transactions(asked).await.into_iter();
        let entries: Vec<pb::Status> = ends
            .iter()
            .map(|end| match end {
                Some(_) => outcomes.next().map_or_else(ok, |o| end_status(&o)),
                None => ok(),
            })
            .collect();
        let st = match entries.split_first() {
            Some((first, rest)) if rest.iter().all(|s| s.code == first.code) => first.clone(),
            _ => status(Code::MultipleResults, "some transactions were not ended"),
        };
        Ok(Response::new(txmq_pb::EndTransactionsResponse {
            status: Some(st),
            entries,
        }))
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

fn header<T>(req: &Request<T>, name: &str) -> Option<String> {
    req.metadata()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

fn client_id<T>(req: &Request<T>) -> Result<String, BrokerError> {
    header(req, "x-mq-client-id")
        .filter(|c| !c.is_empty())
        .ok_or_else(|| {
            BrokerError::new(
                Code::ClientIdRequired,
                "the x-mq-client-id header is required",
            )
        })
}

fn peer<T>(req: &Request<T>) -> String {
    req.remote_addr()
        .map(|a| a.ip().to_string())
        .unwrap_or_default()
}

/// What is left of the caller's deadline (`grpc-timeout`), if it set one.
fn deadline<T>(req: &Request<T>) -> Option<Duration> {
    let v = header(req, "grpc-timeout")?;
    let (num, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// An address as route endpoints.
fn endpoints_of(mut addr: std::net::SocketAddr) -> pb::Endpoints {
    // Bound to every interface: no one address is right for every client; loopback is right
    // for local ones (the official clients always send the endpoints they used).
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    let scheme = if addr.is_ipv4() {
        pb::AddressScheme::IPv4
    } else {
        pb::AddressScheme::IPv6
    };
    pb::Endpoints {
        scheme: scheme as i32,
        addresses: vec![pb::Address {
            host: addr.ip().to_string(),
            port: i32::from(addr.port()),
        }],
    }
}

/// The last response of a ReceiveMessage stream: when the messages were delivered.
fn delivery_timestamp() -> pb::ReceiveMessageResponse {
    pb::ReceiveMessageResponse {
        content: Some(receive_message_response::Content::DeliveryTimestamp(
            convert::timestamp(crate::now_ms()),
        )),
    }
}

fn name(r: &Option<pb::Resource>) -> String {
    r.as_ref().map(|r| r.name.clone()).unwrap_or_default()
}

/// The consumer group a client names. The group a redrive reads dead letters as is the
/// broker's own: a client that received or acknowledged as it could keep dead letters
/// from going back.
fn client_group(r: &Option<pb::Resource>) -> Result<String, BrokerError> {
    let group = name(r);
    if group.starts_with(crate::names::REDRIVE_PREFIX) {
        return Err(BrokerError::new(
            Code::IllegalConsumerGroup,
            format!("consumer group {group} is reserved"),
        ));
    }
    Ok(group)
}

fn accept_types(t: TopicType) -> Vec<i32> {
    vec![match t {
        TopicType::Normal => MessageType::Normal,
        TopicType::Fifo => MessageType::Fifo,
        TopicType::Delay => MessageType::Delay,
        TopicType::Transaction => MessageType::Transaction,
    } as i32]
}

fn queue(
    topic: &str,
    id: i32,
    endpoints: &Option<pb::Endpoints>,
    accept: Vec<i32>,
) -> pb::MessageQueue {
    pb::MessageQueue {
        topic: Some(resource(topic)),
        id,
        permission: Permission::ReadWrite as i32,
        broker: Some(pb::Broker {
            name: "txmq".into(),
            id: 0,
            endpoints: endpoints.clone(),
        }),
        accept_message_types: accept,
    }
}

impl Messaging {
    /// Queues of a topic as a route; an unknown topic gets the default route when topics are
    /// created on first send.
    fn route(
        &self,
        topic: &str,
        endpoints: &Option<pb::Endpoints>,
    ) -> Result<Vec<pb::MessageQueue>, BrokerError> {
        let (queues, accept) = match self.broker.metadata().topic(topic) {
            Some(t) => (t.queues, accept_types(t.message_type)),
            None if self.broker.config().auto_create_topics => {
                crate::names::check_topic(topic)?;
                let all = [
                    MessageType::Normal,
                    MessageType::Fifo,
                    MessageType::Delay,
                    MessageType::Transaction,
                ];
                (
                    self.broker.config().default_queues,
                    all.iter().map(|t| *t as i32).collect(),
                )
            }
            None => return Err(BrokerError::topic_not_found(topic)),
        };
        // Clients reach the broker where they reached it for the route; without that, at the
        // address it is bound to.
        let own;
        let endpoints = match endpoints {
            Some(e) if !e.addresses.is_empty() => endpoints,
            _ => {
                own = Some(self.advertised.clone());
                &own
            }
        };
        Ok((0..queues as i32)
            .map(|id| queue(topic, id, endpoints, accept.clone()))
            .collect())
    }
}

#[tonic::async_trait]
impl MessagingService for Messaging {
    async fn query_route(
        &self,
        request: Request<pb::QueryRouteRequest>,
    ) -> Result<Response<pb::QueryRouteResponse>, Status> {
        let req = request.into_inner();
        let topic = name(&req.topic);
        let resp = match self.route(&topic, &req.endpoints) {
            Ok(queues) => pb::QueryRouteResponse {
                status: Some(ok()),
                message_queues: queues,
            },
            Err(e) => pb::QueryRouteResponse {
                status: Some(error_status(&e)),
                message_queues: Vec::new(),
            },
        };
        Ok(Response::new(resp))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let st = match client_id(&request) {
            Err(e) => error_status(&e),
            Ok(id) if !self.broker.sessions().knows(&id) => status(
                Code::UnrecognizedClientType,
                "send settings on the telemetry stream before heartbeats",
            ),
            Ok(_) => ok(),
        };
        Ok(Response::new(pb::HeartbeatResponse { status: Some(st) }))
    }

    async fn send_message(
        &self,
        request: Request<pb::SendMessageRequest>,
    ) -> Result<Response<pb::SendMessageResponse>, Status> {
        let host = peer(&request);
        let req = request.into_inner();
        if req.messages.is_empty() {
            let e = BrokerError::bad_request("no message to send");
            return Ok(Response::new(pb::SendMessageResponse {
                status: Some(error_status(&e)),
                entries: Vec::new(),
            }));
        }
        let ids: Vec<String> = req
            .messages
            .iter()
            .map(|m| {
                m.system_properties
                    .as_ref()
                    .map(|s| s.message_id.clone())
                    .unwrap_or_default()
            })
            .collect();
        let result = async {
            let messages = req
                .messages
                .into_iter()
                .map(|m| convert::new_message(m, &host))
                .collect::<Result<Vec<_>, _>>()?;
            self.broker.send(messages).await
        }
        .await;
        let resp = match result {
            Ok(receipts) => pb::SendMessageResponse {
                status: Some(ok()),
                entries: receipts
                    .into_iter()
                    .map(|r| pb::SendResultEntry {
                        status: Some(ok()),
                        message_id: r.message_id,
                        transaction_id: r.transaction_id.unwrap_or_default(),
                        offset: r.offset as i64,
                        recall_handle: String::new(),
                    })
                    .collect(),
            },
            Err(e) => pb::SendMessageResponse {
                status: Some(error_status(&e)),
                entries: ids
                    .into_iter()
                    .map(|message_id| pb::SendResultEntry {
                        status: Some(error_status(&e)),
                        message_id,
                        ..Default::default()
                    })
                    .collect(),
            },
        };
        Ok(Response::new(resp))
    }

    async fn query_assignment(
        &self,
        request: Request<pb::QueryAssignmentRequest>,
    ) -> Result<Response<pb::QueryAssignmentResponse>, Status> {
        let req = request.into_inner();
        let topic = name(&req.topic);
        let result = (|| {
            let group = client_group(&req.group)?;
            let t = self
                .broker
                .metadata()
                .topic(&topic)
                .ok_or_else(|| BrokerError::topic_not_found(&topic))?;
            let g = self.broker.group_or_default(&group)?;
            let accept = accept_types(t.message_type);
            // A FIFO group is assigned each queue; others receive from every queue at once.
            let queues: Vec<i32> = if g.fifo {
                (0..t.queues as i32).collect()
            } else {
                vec![-1]
            };
            Ok::<_, BrokerError>(
                queues
                    .into_iter()
                    .map(|id| pb::Assignment {
                        message_queue: Some(queue(&topic, id, &req.endpoints, accept.clone())),
                    })
                    .collect(),
            )
        })();
        let resp = match result {
            Ok(assignments) => pb::QueryAssignmentResponse {
                status: Some(ok()),
                assignments,
            },
            Err(e) => pb::QueryAssignmentResponse {
                status: Some(error_status(&e)),
                assignments: Vec::new(),
            },
        };
        Ok(Response::new(resp))
    }

    type ReceiveMessageStream = BoxStream<pb::ReceiveMessageResponse>;

    async fn receive_message(
        &self,
        request: Request<pb::ReceiveMessageRequest>,
    ) -> Result<Response<Self::ReceiveMessageStream>, Status> {
        let deadline = deadline(&request);
        let client = header(&request, "x-mq-client-id");
        let req = request.into_inner();
        let one = |st: pb::Status| -> Result<Response<Self::ReceiveMessageStream>, Status> {
            let item = pb::ReceiveMessageResponse {
                content: Some(receive_message_response::Content::Status(st)),
            };
            Ok(Response::new(Box::pin(tokio_stream::iter(vec![
                Ok(item),
                Ok(delivery_timestamp()),
            ]))))
        };
        let mq = req.message_queue.clone().unwrap_or_default();
        let topic = name(&mq.topic);
        let filter = match req.filter_expression.as_ref() {
            Some(f) if f.r#type == pb::FilterType::Sql as i32 => {
                return one(status(
                    Code::IllegalFilterExpression,
                    "SQL92 filters are not supported; use tags",
                ));
            }
            Some(f) => match Filter::tags(&f.expression) {
                Ok(f) => f,
                Err(e) => return one(error_status(&e)),
            },
            None => Filter::All,
        };
        let invisible_ms = match (req.auto_renew, req.invisible_duration.as_ref()) {
            (_, Some(d)) => convert::duration_ms(d),
            (true, None) => RENEW_MS,
            (false, None) => {
                return one(status(
                    Code::IllegalInvisibleTime,
                    "invisible_duration is required without auto_renew",
                ));
            }
        };
        if !(1_000..=12 * 3600 * 1000).contains(&invisible_ms) {
            return one(status(
                Code::IllegalInvisibleTime,
                "invisible duration must be 1 s to 12 hours",
            ));
        }
        let mut long_poll = req
            .long_polling_timeout
            .as_ref()
            .map_or(20_000, convert::duration_ms)
            .clamp(0, 30_000) as u64;
        if let Some(d) = deadline {
            // Answer before the caller gives up, with a margin for the trip back.
            long_poll =
                long_poll.min(u64::try_from(d.as_millis().saturating_sub(500)).unwrap_or(u64::MAX));
        }
        let batch = match req.batch_size {
            n if n <= 0 => 32,
            n => (n as usize).min(1024),
        };
        let group = match client_group(&req.group) {
            Ok(group) => group,
            Err(e) => return one(error_status(&e)),
        };
        let rr = ReceiveRequest {
            group,
            topic,
            // Like the RocketMQ proxy, a receive reads every queue of the topic: the official
            // simple consumers name one route queue per call, picked at random.
            queue: None,
            filter,
            batch,
            invisible_ms,
            long_poll: Duration::from_millis(long_poll),
            renew_for: if req.auto_renew { client } else { None },
        };
        match self.broker.receive(&rr).await {
            Err(e) => one(error_status(&e)),
            Ok(found) if found.is_empty() => one(status(Code::MessageNotFound, "no new message")),
            Ok(found) => {
                let mut items = Vec::with_capacity(found.len() + 1);
                items.push(Ok(pb::ReceiveMessageResponse {
                    content: Some(receive_message_response::Content::Status(ok())),
                }));
                for d in &found {
                    let m = convert::message_from_delivery(d);
                    items.push(Ok(pb::ReceiveMessageResponse {
                        content: Some(receive_message_response::Content::Message(m)),
                    }));
                }
                // The stream ends with the time of delivery, as the proxy's does; clients
                // measure receive latency with it.
                items.push(Ok(delivery_timestamp()));
                Ok(Response::new(Box::pin(tokio_stream::iter(items))))
            }
        }
    }

    async fn ack_message(
        &self,
        request: Request<pb::AckMessageRequest>,
    ) -> Result<Response<pb::AckMessageResponse>, Status> {
        let req = request.into_inner();
        let topic = name(&req.topic);
        if req.entries.is_empty() {
            // Nothing to acknowledge: an illegal group is still named as such.
            let st = match client_group(&req.group).and_then(|g| crate::names::check_group(&g)) {
                Ok(()) => status(Code::BadRequest, "AckMessage carries no entries"),
                Err(e) => error_status(&e),
            };
            return Ok(Response::new(pb::AckMessageResponse {
                status: Some(st),
                entries: Vec::new(),
            }));
        }
        let handles: Vec<String> = req
            .entries
            .iter()
            .map(|e| e.receipt_handle.clone())
            .collect();
        let results = match client_group(&req.group) {
            Ok(group) => self.broker.ack(&group, &topic, &handles).await,
            Err(e) => vec![Err(e); handles.len()],
        };
        let mut all_ok = true;
        let entries = req
            .entries
            .into_iter()
            .zip(results)
            .map(|(e, r)| {
                let st = match r {
                    Ok(()) => ok(),
                    Err(err) => {
                        all_ok = false;
                        error_status(&err)
                    }
                };
                pb::AckMessageResultEntry {
                    message_id: e.message_id,
                    receipt_handle: e.receipt_handle,
                    status: Some(st),
                }
            })
            .collect::<Vec<_>>();
        let st = if all_ok {
            ok()
        } else if entries.len() == 1 {
            entries[0].status.clone().unwrap_or_else(ok)
        } else {
            status(Code::MultipleResults, "some acknowledgements failed")
        };
        Ok(Response::new(pb::AckMessageResponse {
            status: Some(st),
            entries,
        }))
    }

    async fn forward_message_to_dead_letter_queue(
        &self,
        request: Request<pb::ForwardMessageToDeadLetterQueueRequest>,
    ) -> Result<Response<pb::ForwardMessageToDeadLetterQueueResponse>, Status> {
        let req = request.into_inner();
        let forwarded = match client_group(&req.group) {
            Ok(group) => {
                self.broker
                    .forward_to_dead_letter(&group, &name(&req.topic), &req.receipt_handle)
                    .await
            }
            Err(e) => Err(e),
        };
        let st = match forwarded {
            Ok(()) => ok(),
            Err(e) => error_status(&e),
        };
        Ok(Response::new(pb::ForwardMessageToDeadLetterQueueResponse {
            status: Some(st),
        }))
    }

    type PullMessageStream = BoxStream<pb::PullMessageResponse>;

    async fn pull_message(
        &self,
        _request: Request<pb::PullMessageRequest>,
    ) -> Result<Response<Self::PullMessageStream>, Status> {
        let item = pb::PullMessageResponse {
            content: Some(pb::pull_message_response::Content::Status(status(
                Code::NotImplemented,
                "pull consumers are not supported; use simple or push consumers",
            ))),
        };
        Ok(Response::new(Box::pin(tokio_stream::iter(vec![Ok(item)]))))
    }

    async fn update_offset(
        &self,
        _request: Request<pb::UpdateOffsetRequest>,
    ) -> Result<Response<pb::UpdateOffsetResponse>, Status> {
        Ok(Response::new(pb::UpdateOffsetResponse {
            status: Some(status(
                Code::NotImplemented,
                "pull consumers are not supported",
            )),
        }))
    }

    async fn get_offset(
        &self,
        _request: Request<pb::GetOffsetRequest>,
    ) -> Result<Response<pb::GetOffsetResponse>, Status> {
        Ok(Response::new(pb::GetOffsetResponse {
            status: Some(status(
                Code::NotImplemented,
                "pull consumers are not supported",
            )),
            offset: 0,
        }))
    }

    async fn query_offset(
        &self,
        _request: Request<pb::QueryOffsetRequest>,
    ) -> Result<Response<pb::QueryOffsetResponse>, Status> {
        Ok(Response::new(pb::QueryOffsetResponse {
            status: Some(status(
                Code::NotImplemented,
                "pull consumers are not supported",
            )),
            offset: 0,
        }))
    }

    async fn end_transaction(
        &self,
        request: Request<pb::EndTransactionRequest>,
    ) -> Result<Response<pb::EndTransactionResponse>, Status> {
        let st = match end_of(request.into_inner()) {
            Some(end) => end_status(&self.broker.end_transactions(vec![end]).await[0]),
            None => ok(),
        };
        Ok(Response::new(pb::EndTransactionResponse {
            status: Some(st),
        }))
    }

    type TelemetryStream = BoxStream<pb::TelemetryCommand>;

    async fn telemetry(
        &self,
        request: Request<tonic::Streaming<pb::TelemetryCommand>>,
    ) -> Result<Response<Self::TelemetryStream>, Status> {
        let id = client_id(&request).map_err(|e| Status::invalid_argument(e.message))?;
        let rx = self.broker.telemetry_session(id, request.into_inner());
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn notify_client_termination(
        &self,
        request: Request<pb::NotifyClientTerminationRequest>,
    ) -> Result<Response<pb::NotifyClientTerminationResponse>, Status> {
        let st = match client_id(&request) {
            Ok(id) => {
                self.broker.sessions().remove_client(&id);
                ok()
            }
            Err(e) => error_status(&e),
        };
        Ok(Response::new(pb::NotifyClientTerminationResponse {
            status: Some(st),
        }))
    }

    async fn change_invisible_duration(
        &self,
        request: Request<pb::ChangeInvisibleDurationRequest>,
    ) -> Result<Response<pb::ChangeInvisibleDurationResponse>, Status> {
        let req = request.into_inner();
        let ms = req
            .invisible_duration
            .as_ref()
            .map_or(-1, convert::duration_ms);
        let changed = client_group(&req.group).and_then(|group| {
            self.broker
                .change_invisible(&group, &name(&req.topic), &req.receipt_handle, ms)
        });
        let resp = match changed {
            Ok(handle) => pb::ChangeInvisibleDurationResponse {
                status: Some(ok()),
                receipt_handle: handle,
            },
            Err(e) => pb::ChangeInvisibleDurationResponse {
                status: Some(error_status(&e)),
                receipt_handle: String::new(),
            },
        };
        Ok(Response::new(resp))
    }

    async fn recall_message(
        &self,
        _request: Request<pb::RecallMessageRequest>,
    ) -> Result<Response<pb::RecallMessageResponse>, Status> {
        Ok(Response::new(pb::RecallMessageResponse {
            status: Some(status(
                Code::NotImplemented,
                "recalling delay messages is not supported",
            )),
            message_id: String::new(),
        }))
    }

    async fn sync_lite_subscription(
        &self,
        _request: Request<pb::SyncLiteSubscriptionRequest>,
    ) -> Result<Response<pb::SyncLiteSubscriptionResponse>, Status> {
        Ok(Response::new(pb::SyncLiteSubscriptionResponse {
            status: Some(status(
                Code::NotImplemented,
                "lite topics are not supported",
            )),
        }))
    }
}
