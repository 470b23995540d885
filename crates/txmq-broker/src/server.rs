//! Running the broker: the gRPC port (plaintext and TLS), the admin HTTP port, the
//! background work, and a clean shutdown.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::broker::Broker;
use crate::config::BrokerConfig;
use crate::grpc::Messaging;
use crate::net::{ServeOptions, TlsSettings, serve_grpc};

/// A running broker.
pub struct Server {
    /// Where gRPC is served.
    pub grpc_addr: SocketAddr,
    /// Where the admin API is served.
    pub http_addr: SocketAddr,
    /// The broker itself.
    pub broker: Arc<Broker>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Server {
    /// Opens the data directory, binds both ports and starts serving.
    ///
    /// # Errors
    /// If the store cannot be opened, a port cannot be bound, or the TLS files are unusable.
    pub async fn start(config: BrokerConfig) -> anyhow::Result<Self> {
        let tls = match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => {
                TlsSettings::from_pem_files(cert, key).with_context(|| {
                    format!(
                        "cannot load TLS certificate {} and key {}",
                        cert.display(),
                        key.display()
                    )
                })?
            }
            _ => TlsSettings::self_signed(&[])
                .context("cannot make a self-signed TLS certificate")?,
        };
        let grpc = TcpListener::bind(&config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let http = TcpListener::bind(&config.http)
            .await
            .with_context(|| format!("cannot listen on {}", config.http))?;
        let (grpc_addr, http_addr) = (grpc.local_addr()?, http.local_addr()?);
        let broker =
            tokio::task::block_in_place(|| Broker::open(config.clone())).with_context(|| {
                format!(
                    "cannot open the data directory {}",
                    config.data_dir.display()
                )
            })?;
        let (stop, stopped) = watch::channel(false);
        let background = tokio::spawn(broker.clone().run_background(stopped.clone()));
        let routes = Messaging::new(broker.clone(), grpc_addr).into_routes();
        let grpc_stop = wait(stopped.clone());
        let grpc_task = tokio::spawn(serve_grpc(
            grpc,
            routes,
            Some(tls),
            ServeOptions::default(),
            grpc_stop,
        ));
        let admin = crate::admin::router(broker.clone());
        let http_stop = wait(stopped);
        let http_task = tokio::spawn(async move {
            axum::serve(http, admin)
                .with_graceful_shutdown(http_stop)
                .await
        });
        tracing::info!(%grpc_addr, %http_addr, data_dir = %config.data_dir.display(), "txmq serving");
        let b = broker.clone();
        let task = tokio::spawn(async move {
            let _ = grpc_task.await;
            let _ = http_task.await;
            let _ = background.await;
            // Every request in flight has finished: sync, snapshot, close.
            b.shutdown().await
        });
        Ok(Self {
            grpc_addr,
            http_addr,
            broker,
            stop,
            task,
        })
    }

    /// Stops accepting, lets calls in flight finish, writes a final snapshot and closes the
    /// store. Nothing acknowledged is lost.
    ///
    /// # Errors
    /// If the final snapshot or sync failed (acknowledged messages are in the log either way).
    pub async fn stop(self) -> anyhow::Result<()> {
        self.broker.begin_shutdown();
        let _ = self.stop.send(true);
        self.task.await.context("server task failed")?
    }
}

async fn wait(mut stopped: watch::Receiver<bool>) {
    while !*stopped.borrow() {
        if stopped.changed().await.is_err() {
            return;
        }
    }
}
