//! The Telemetry stream: the client's settings first, the server's settings reply, then
//! commands from the server (transaction check-backs) for as long as the client lives. A
//! broken stream is opened again with exponential backoff.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use txmq_proto::v2::{self as pb, Code, telemetry_command::Command};

use super::check_backs::CHECK_TIMEOUT;
use super::{Shared, lock};
use crate::error::{CallError, ConnectError};
use crate::message::MessageView;
use crate::transaction::TransactionResolution;

/// First wait before opening a broken stream again; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Keeps a Telemetry stream open. The outcome of the first attempt goes to `first`; if it
/// failed, the task ends (the caller reports the error), otherwise it reconnects for ever.
pub(super) async fn run(shared: Arc<Shared>, first: oneshot::Sender<Result<(), ConnectError>>) {
    let mut first = Some(first);
    let mut failures: u32 = 0;
    loop {
        match open(&shared).await {
            Ok(inbound) => {
                failures = 0;
                if let Some(f) = first.take() {
                    let _ = f.send(Ok(()));
                }
                read(&shared, inbound).await;
                tracing::info!(endpoint = %shared.config.endpoint, "telemetry stream ended; reopening");
            }
            Err(e) => {
                if let Some(f) = first.take() {
                    let _ = f.send(Err(e));
                    return;
                }
                tracing::warn!(error = %e, "cannot reopen the telemetry stream");
            }
        }
        *lock(&shared.telemetry_out) = None;
        failures = failures.saturating_add(1);
        tokio::time::sleep(backoff(failures)).await;
    }
}

/// The wait before attempt `failures + 1`: doubling from [`FIRST_BACKOFF`], at most
/// [`MAX_BACKOFF`], less up to a fifth at random so that clients do not come back together.
fn backoff(failures: u32) -> Duration {
    let base = FIRST_BACKOFF
        .saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(MAX_BACKOFF);
    let random = (uuid::Uuid::now_v7().as_u128() & 0xffff) as u32;
    base - base / 5 * random / 0xffff
}

/// Opens a stream, sends the settings and waits for the reply, within the request timeout.
async fn open(
    shared: &Arc<Shared>,
) -> Result<tonic::Streaming<pb::TelemetryCommand>, ConnectError> {
    const RPC: &str = "Telemetry";
    let endpoint = shared.config.endpoint.clone();
    let unreachable = |source| ConnectError::Unreachable {
        endpoint: endpoint.clone(),
        cause: source,
    };
    let (out, rx) = mpsc::channel(16);
    let settings = pb::TelemetryCommand {
        status: None,
        command: Some(Command::Settings(shared.settings())),
    };
    // The channel is new and empty: this cannot fail.
    let _ = out.try_send(settings);
    let opened = async {
        let mut stub = shared.stub.clone();
        let mut inbound = stub
            .telemetry(tonic::Request::new(ReceiverStream::new(rx)))
            .await
            .map_err(|s| unreachable(CallError::transport(RPC, s)))?
            .into_inner();
        loop {
            let reply = inbound
                .message()
                .await
                .map_err(|s| unreachable(CallError::transport(RPC, s)))?
                .ok_or_else(|| {
                    unreachable(CallError::Malformed {
                        rpc: RPC,
                        reason: "the server ended the stream before replying".into(),
                    })
                })?;
            if let Some(s) = &reply.status
                && s.code != Code::Ok as i32
            {
                return Err(ConnectError::SettingsRefused {
                    endpoint: endpoint.clone(),
                    code: s.code,
                    message: s.message.clone(),
                });
            }
            match reply.command {
                Some(Command::Settings(s)) => {
                    shared.server_settings.send_replace(Some(s));
                    return Ok(inbound);
                }
                Some(other) => handle(shared, other),
                None => {}
            }
        }
    };
    let after = shared.config.request_timeout;
    let inbound = tokio::time::timeout(after, opened).await.map_err(|_| {
        ConnectError::SettingsTimedOut {
            endpoint: endpoint.clone(),
            after,
        }
    })??;
    *lock(&shared.telemetry_out) = Some(out);
    Ok(inbound)
}

/// Reads server commands until the stream ends or breaks.
async fn read(shared: &Arc<Shared>, mut inbound: tonic::Streaming<pb::TelemetryCommand>) {
    loop {
        match inbound.message().await {
            Ok(Some(pb::TelemetryCommand {
                status,
                command: Some(command),
            })) => {
                if let Command::Settings(_) = &command
                    && status.as_ref().is_some_and(|s| s.code != Code::Ok as i32)
                {
                    tracing::warn!(?status, "the server refused updated settings");
                    continue;
                }
                handle(shared, command);
            }
            Ok(Some(_)) => {}
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(error = %e, "telemetry stream broke");
                return;
            }
        }
    }
}

/// Acts on one server command.
fn handle(shared: &Arc<Shared>, command: Command) {
    match command {
        Command::Settings(s) => {
            shared.server_settings.send_replace(Some(s));
        }
        Command::RecoverOrphanedTransactionCommand(c) => {
            let Some(checker) = shared.checker.clone() else {
                tracing::debug!("check-back for a producer without a transaction checker");
                return;
            };
            let Some(message) = c.message else { return };
            let Some(admitted) = shared.check_backs.admit(&c.transaction_id) else {
                return;
            };
            let shared = shared.clone();
            tokio::spawn(async move {
                let view = MessageView::from_proto(message);
                // The answer goes out after the turn, without holding up the next check.
                let checked = admitted
                    .check(checker(c.transaction_id.clone(), view.clone()))
                    .await;
                let resolution = match checked {
                    Some(TransactionResolution::Commit) => pb::TransactionResolution::Commit,
                    Some(TransactionResolution::Rollback) => pb::TransactionResolution::Rollback,
                    // The server asks again later.
                    Some(TransactionResolution::Unknown) => return,
                    None => {
                        tracing::warn!(transaction = %c.transaction_id, timeout = ?CHECK_TIMEOUT, "the checker did not answer in time; the server asks again later");
                        return;
                    }
                };
                let request = shared.end_request(
                    view.topic(),
                    view.message_id(),
                    &c.transaction_id,
                    resolution,
                    pb::TransactionSource::SourceServerCheck,
                );
                if let Err(e) = shared.end_transaction(request).await {
                    tracing::warn!(transaction = %c.transaction_id, error = %e, "cannot answer a check-back");
                }
            });
        }
        Command::PrintThreadStackTraceCommand(c) => {
            reply(
                shared,
                None,
                Command::ThreadStackTrace(pb::ThreadStackTrace {
                    nonce: c.nonce,
                    thread_stack_trace: None,
                }),
            );
        }
        Command::VerifyMessageCommand(c) => {
            let status = pb::Status {
                code: Code::NotImplemented as i32,
                message: "this client does not verify messages".into(),
            };
            reply(
                shared,
                Some(status),
                Command::VerifyMessageResult(pb::VerifyMessageResult { nonce: c.nonce }),
            );
        }
        other => tracing::debug!(command = ?other, "telemetry command ignored"),
    }
}

fn reply(shared: &Shared, status: Option<pb::Status>, command: Command) {
    if let Some(out) = lock(&shared.telemetry_out).as_ref() {
        let _ = out.try_send(pb::TelemetryCommand {
            status,
            command: Some(command),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_backoff_doubles_up_to_its_cap_with_jitter() {
        for failures in 1..30 {
            let d = backoff(failures);
            let base = FIRST_BACKOFF
                .saturating_mul(1 << (failures - 1).min(16))
                .min(MAX_BACKOFF);
            assert!(d <= base && d >= base - base / 5, "{failures}: {d:?}");
        }
    }
}
