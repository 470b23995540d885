//! The admin HTTP API (JSON), used by `txmq topic|group|tx|dlq` and by operators.
//!
//! | method | path | what |
//! |---|---|---|
//! | GET | `/health` | liveness |
//! | GET, POST | `/topics` | list; create `{name, type, queues}` |
//! | GET, POST | `/groups` | list with lag, in flight, dead-lettered; create or update `{name, max_attempts, fifo, backoff_ms}` |
//! | GET | `/transactions?state=open\|unresolved\|prepared\|all` | transactions |
//! | POST | `/transactions/{id}/commit`, `/rollback`, `/recheck` | operator decisions |
//! | GET | `/dlq/{group}` | dead-lettered messages of a group |
//! | POST | `/dlq/{group}/redrive` `{max}` | send them back to their topics |

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;
use txmq_proto::v2::Code;

use crate::broker::Broker;
use crate::error::BrokerError;
use crate::metadata::TopicType;
use crate::names::dlq_topic;
use crate::transactions::{Resolution, TxState};

/// The admin API's routes.
pub fn router(broker: Arc<Broker>) -> Router {
    Router::new()
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/topics", get(list_topics).post(create_topic))
        .route("/groups", get(list_groups).post(put_group))
        .route("/transactions", get(list_transactions))
        .route("/transactions/{id}/{action}", post(act_on_transaction))
        .route("/dlq/{group}", get(list_dlq))
        .route("/dlq/{group}/redrive", post(redrive))
        .with_state(broker)
}

struct ApiError(BrokerError);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match self.0.code {
            Code::TopicNotFound
            | Code::ConsumerGroupNotFound
            | Code::NotFound
            | Code::InvalidTransactionId => StatusCode::NOT_FOUND,
            Code::PreconditionFailed => StatusCode::CONFLICT,
            Code::InternalServerError | Code::InternalError => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::BAD_REQUEST,
        };
        (
            status,
            Json(json!({"error": self.0.message, "code": self.0.code.as_str_name()})),
        )
            .into_response()
    }
}

impl From<BrokerError> for ApiError {
    fn from(e: BrokerError) -> Self {
        Self(e)
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

#[derive(Serialize)]
struct TopicView {
    name: String,
    #[serde(rename = "type")]
    message_type: &'static str,
    queues: u32,
    messages: u64,
}

async fn list_topics(State(b): State<Arc<Broker>>) -> Json<Vec<TopicView>> {
    let views = b
        .metadata()
        .topics()
        .into_iter()
        .map(|t| {
            let messages = (0..t.queues)
                .filter_map(|q| b.store().queue_range(&t.name, q))
                .map(|r| r.end - r.start)
                .sum();
            TopicView {
                message_type: t.message_type.as_str(),
                queues: t.queues,
                messages,
                name: t.name,
            }
        })
        .collect();
    Json(views)
}

#[derive(Deserialize)]
struct NewTopic {
    name: String,
    #[serde(rename = "type", default = "normal")]
    message_type: String,
    queues: Option<u32>,
}

fn normal() -> String {
    "normal".into()
}

async fn create_topic(
    State(b): State<Arc<Broker>>,
    Json(t): Json<NewTopic>,
) -> ApiResult<serde_json::Value> {
    let kind = TopicType::parse(&t.message_type).ok_or_else(|| {
        BrokerError::bad_request(format!(
            "unknown topic type {:?}: normal, fifo, delay or transaction",
            t.message_type
        ))
    })?;
    let topic =
        b.metadata()
            .create_topic(&t.name, kind, t.queues.unwrap_or(b.config().default_queues))?;
    Ok(Json(
        json!({"name": topic.name, "type": topic.message_type.as_str(), "queues": topic.queues}),
    ))
}

#[derive(Serialize)]
struct GroupView {
    name: String,
    max_attempts: u32,
    fifo: bool,
    backoff_ms: Vec<u64>,
    #[serde(flatten)]
    stats: crate::delivery::GroupStats,
}

async fn list_groups(State(b): State<Arc<Broker>>) -> Json<Vec<GroupView>> {
    let views = b
        .metadata()
        .groups()
        .into_iter()
        .map(|g| GroupView {
            stats: b.group_stats(&g.name),
            max_attempts: g.max_attempts,
            fifo: g.fifo,
            backoff_ms: g.backoff_ms,
            name: g.name,
        })
        .collect();
    Json(views)
}

#[derive(Deserialize)]
struct NewGroup {
    name: String,
    max_attempts: Option<u32>,
    #[serde(default)]
    fifo: bool,
    #[serde(default)]
    backoff_ms: Vec<u64>,
}

async fn put_group(
    State(b): State<Arc<Broker>>,
    Json(g): Json<NewGroup>,
) -> ApiResult<crate::metadata::Group> {
    let attempts = g.max_attempts.unwrap_or(b.config().default_max_attempts);
    Ok(Json(b.metadata().put_group(
        &g.name,
        attempts,
        g.fifo,
        g.backoff_ms,
    )?))
}

#[derive(Deserialize)]
struct TxQuery {
    state: Option<String>,
}

async fn list_transactions(
    State(b): State<Arc<Broker>>,
    Query(q): Query<TxQuery>,
) -> ApiResult<Vec<crate::transactions::Tx>> {
    let states: &[TxState] = match q.state.as_deref().unwrap_or("open") {
        "open" => &[TxState::Prepared, TxState::Unresolved],
        "unresolved" => &[TxState::Unresolved],
        "prepared" => &[TxState::Prepared],
        "committed" => &[TxState::Committed],
        "rolled_back" => &[TxState::RolledBack],
        "all" => &[
            TxState::Prepared,
            TxState::Unresolved,
            TxState::Committed,
            TxState::RolledBack,
        ],
        other => {
            return Err(BrokerError::bad_request(format!(
                "unknown state {other:?}: open, unresolved, prepared, committed, rolled_back or all"
            ))
            .into());
        }
    };
    Ok(Json(b.transactions().list(states)))
}

async fn act_on_transaction(
    State(b): State<Arc<Broker>>,
    Path((id, action)): Path<(String, String)>,
) -> ApiResult<serde_json::Value> {
    match action.as_str() {
        "commit" | "rollback" => {
            let r = if action == "commit" {
                Resolution::Commit
            } else {
                Resolution::Rollback
            };
            let state = b.end_transaction("", "", &id, r).await?;
            Ok(Json(json!({"id": id, "state": state})))
        }
        "recheck" => {
            b.recheck_transaction(&id).await?;
            Ok(Json(json!({"id": id, "state": TxState::Prepared})))
        }
        other => Err(BrokerError::bad_request(format!(
            "unknown action {other:?}: commit, rollback or recheck"
        ))
        .into()),
    }
}

#[derive(Serialize)]
struct DeadView {
    message_id: String,
    topic: String,
    offset: u64,
    attempts: String,
    tag: String,
    body_bytes: usize,
    stored_ms: i64,
}

async fn list_dlq(
    State(b): State<Arc<Broker>>,
    Path(group): Path<String>,
) -> ApiResult<serde_json::Value> {
    let topic = dlq_topic(&group);
    let Some(range) = b.store().queue_range(&topic, 0) else {
        return Ok(Json(
            json!({"group": group, "topic": topic, "count": 0, "messages": []}),
        ));
    };
    let records = b
        .store()
        .read_queue(
            &topic,
            0,
            range.start,
            (range.end - range.start).min(1000) as usize,
        )
        .map_err(BrokerError::from)?;
    let messages: Vec<DeadView> = records
        .iter()
        .map(|r| {
            let origin =
                crate::message::sys(&r.data, crate::message::prop::DLQ_ORIGIN).unwrap_or_default();
            DeadView {
                message_id: r.data.message_id.clone(),
                topic: origin.split(' ').nth(1).unwrap_or_default().to_string(),
                offset: r.queue_offset,
                attempts: crate::message::sys(&r.data, crate::message::prop::DLQ_ATTEMPTS)
                    .unwrap_or_default()
                    .to_string(),
                tag: r.data.tag.clone(),
                body_bytes: r.data.body.len(),
                stored_ms: r.store_timestamp,
            }
        })
        .collect();
    let pending = b
        .group_stats(&format!("{}{group}", crate::names::REDRIVE_PREFIX))
        .lag;
    Ok(Json(
        json!({"group": group, "topic": topic, "count": range.end - range.start, "not_redriven": pending, "messages": messages}),
    ))
}

#[derive(Deserialize, Default)]
struct RedriveRequest {
    max: Option<usize>,
}

async fn redrive(
    State(b): State<Arc<Broker>>,
    Path(group): Path<String>,
    body: Option<Json<RedriveRequest>>,
) -> ApiResult<serde_json::Value> {
    let max = body.and_then(|Json(r)| r.max).unwrap_or(1024);
    let mut total = 0;
    loop {
        let n = b.redrive(&group, (max - total).min(1024)).await?;
        total += n;
        if n == 0 || total >= max {
            break;
        }
    }
    Ok(Json(json!({"group": group, "redriven": total})))
}
