//! Serving gRPC: TLS and plaintext HTTP/2 on one TCP port.
//!
//! RocketMQ 5 clients disagree on the transport: the Java and Go clients connect with TLS
//! (trusting any certificate), the Python and Rust clients with plaintext HTTP/2 (h2c with
//! prior knowledge). Like the RocketMQ proxy, txmq serves both on one port and tells them
//! apart by the first byte a client sends: `0x16` opens a TLS handshake, anything else must
//! be the HTTP/2 connection preface `PRI * HTTP/2.0…`.
//!
//! A connection is served once it has sent the full preface (after the TLS handshake, if any)
//! within [`ServeOptions::handshake_timeout`]; anything else only closes that connection.

mod handshake;
mod tls;

use std::{io, pin::pin, sync::Arc, time::Duration};

use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
    service::TowerToHyperService,
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinSet,
    time::timeout,
};
use tokio_rustls::TlsAcceptor;
use tonic::service::Routes;
use tracing::{Instrument as _, debug, info, warn};

pub use self::tls::{TlsSettings, TlsSettingsError};

/// How long the accept loop pauses after an error that is not about one connection
/// (e.g. out of file descriptors), so it neither spins nor floods the log.
const ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// Timeouts and limits for the connections of one listener.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Time a new connection has, from accept, to finish the TLS handshake (if any) and send
    /// the HTTP/2 preface; silent or stalled clients are dropped after it.
    pub handshake_timeout: Duration,
    /// Interval of HTTP/2 PINGs to every client, busy or idle. There is no idle timeout:
    /// Telemetry streams live for hours and ReceiveMessage long-polls for up to 30 s, so a
    /// connection only closes when its client stops answering PINGs.
    pub keepalive_interval: Duration,
    /// Time a client has to answer a PING before its connection is closed.
    pub keepalive_timeout: Duration,
    /// Streams one client may have open at once. Each long-polling ReceiveMessage and each
    /// Telemetry session holds one stream for its whole life.
    pub max_concurrent_streams: u32,
    /// Time open connections get, once shutdown starts, to finish their in-flight calls
    /// before they are closed.
    pub grace: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(20),
            max_concurrent_streams: 1024,
            grace: Duration::from_secs(10),
        }
    }
}

/// Serves `routes` on `listener` to plaintext HTTP/2 clients, and to TLS clients (ALPN `h2`)
/// when `tls` is set, until `shutdown` resolves.
///
/// Then it stops accepting (closing the listener), asks every open connection to finish
/// (HTTP/2 GOAWAY: calls in flight continue, new ones are refused), waits up to
/// [`ServeOptions::grace`] for them, closes those still open, and returns.
///
/// Never fails: errors accepting connections are logged and accepting goes on; errors on one
/// connection are logged at debug level and close only that connection.
///
/// Cancelling (dropping) the returned future closes the listener and every connection at once.
pub async fn serve_grpc(
    listener: TcpListener,
    routes: Routes,
    tls: Option<TlsSettings>,
    options: ServeOptions,
    shutdown: impl Future<Output = ()>,
) {
    let routes = routes.prepare();
    let acceptor = tls.map(|tls| TlsAcceptor::from(tls.server_config()));
    let http = Arc::new(http2_server(&options));
    // Flipped once at shutdown; each connection watches its own receiver.
    let (stop, _) = watch::channel(());
    // Owns every connection task, so none outlives this function.
    let mut connections = JoinSet::new();
    let mut shutdown = pin!(shutdown);

    if let Ok(addr) = listener.local_addr() {
        info!(%addr, tls = acceptor.is_some(), "serving gRPC");
    }
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
            Some(finished) = connections.join_next() => {
                log_panic(finished);
                continue;
            }
        };
        match accepted {
            Ok((stream, peer)) => {
                let connection = Connection {
                    tls: acceptor.clone(),
                    http: Arc::clone(&http),
                    routes: routes.clone(),
                    handshake_timeout: options.handshake_timeout,
                    stop: stop.subscribe(),
                };
                let span = tracing::debug_span!("grpc_connection", %peer);
                connections.spawn(connection.run(stream).instrument(span));
            }
            Err(e) if is_about_one_connection(&e) => debug!(error = %e, "accept failed"),
            Err(e) => {
                warn!(error = %e, "accept failed; pausing before accepting again");
                tokio::select! {
                    () = &mut shutdown => break,
                    () = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                }
            }
        }
    }

    drop(listener);
    stop.send_replace(());
    if !connections.is_empty() {
        info!(
            connections = connections.len(),
            grace = ?options.grace,
            "shutting down: waiting for open connections to finish"
        );
    }
    let drained = timeout(options.grace, async {
        while let Some(finished) = connections.join_next().await {
            log_panic(finished);
        }
    })
    .await;
    if drained.is_err() {
        info!(
            connections = connections.len(),
            "grace period over: closing connections still open"
        );
        connections.shutdown().await;
    }
}

/// The HTTP/2-only server settings shared by all connections.
fn http2_server(options: &ServeOptions) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new()).http2_only();
    builder
        .http2()
        // Keep-alive PINGs need a timer.
        .timer(TokioTimer::new())
        .keep_alive_interval(options.keepalive_interval)
        .keep_alive_timeout(options.keepalive_timeout)
        .max_concurrent_streams(options.max_concurrent_streams);
    builder
}

/// Whether an accept error concerns only the connection being accepted (the client gave up
/// early), as opposed to the listener or the process (e.g. out of file descriptors).
fn is_about_one_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
            | io::ErrorKind::TimedOut
    )
}

fn log_panic(finished: Result<(), tokio::task::JoinError>) {
    if let Err(e) = finished
        && e.is_panic()
    {
        warn!(error = %e, "a gRPC connection task panicked");
    }
}

/// What one accepted connection needs from its listener.
struct Connection {
    tls: Option<TlsAcceptor>,
    http: Arc<auto::Builder<TokioExecutor>>,
    routes: Routes,
    handshake_timeout: Duration,
    stop: watch::Receiver<()>,
}

impl Connection {
    /// Runs the handshake and then HTTP/2 on `stream` until the client leaves or shutdown
    /// has let the calls in flight finish.
    async fn run(mut self, stream: TcpStream) {
        // gRPC messages are written whole; Nagle would only delay small responses and PINGs.
        if let Err(e) = stream.set_nodelay(true) {
            debug!(error = %e, "could not set TCP_NODELAY");
        }

        let established = tokio::select! {
            established = timeout(
                self.handshake_timeout,
                handshake::establish(stream, self.tls.as_ref()),
            ) => established,
            () = stopped(&mut self.stop) => return,
        };
        let io = match established {
            Ok(Ok(io)) => io,
            Ok(Err(e)) => {
                debug!(error = %e, "dropping connection");
                return;
            }
            Err(_elapsed) => {
                debug!(timeout = ?self.handshake_timeout, "dropping connection: handshake timed out");
                return;
            }
        };
        debug!(tls = io.is_tls(), "serving HTTP/2");

        let mut conn = pin!(
            self.http
                .serve_connection(TokioIo::new(io), TowerToHyperService::new(self.routes))
        );
        let served = tokio::select! {
            served = conn.as_mut() => served,
            () = stopped(&mut self.stop) => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        match served {
            Ok(()) => debug!("connection closed"),
            Err(e) => debug!(error = %e, "connection closed with an error"),
        }
    }
}

/// Resolves once shutdown has started (or the listener is gone).
async fn stopped(stop: &mut watch::Receiver<()>) {
    // An error means the sender is gone, which also means stop.
    let _ = stop.changed().await;
}
