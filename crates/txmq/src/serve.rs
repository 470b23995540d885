//! `txmq serve`: the broker on its embedded storage.

use anyhow::Context;
use txmq_broker::BrokerConfig;
use txmq_broker::server::Server;

use crate::cli::ServeArgs;

/// The configuration: defaults, then `--config FILE`, then `TXMQ_*` variables, then flags.
pub fn config(args: &ServeArgs) -> anyhow::Result<BrokerConfig> {
    let mut config = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            BrokerConfig::from_toml(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
        }
        None => BrokerConfig::default(),
    };
    config
        .apply_env(std::env::vars())
        .map_err(anyhow::Error::msg)?;
    if let Some(d) = &args.data_dir {
        config.data_dir = d.clone();
    }
    if let Some(l) = &args.listen {
        config.listen = l.clone();
    }
    if let Some(h) = &args.http {
        config.http = h.clone();
    }
    if let Some(c) = &args.tls_cert {
        config.tls_cert = Some(c.clone());
    }
    if let Some(k) = &args.tls_key {
        config.tls_key = Some(k.clone());
    }
    config.validate().map_err(anyhow::Error::msg)?;
    Ok(config)
}

/// Runs the broker until SIGINT or SIGTERM, then shuts down cleanly.
pub fn run(args: &ServeArgs) -> anyhow::Result<()> {
    let config = config(args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    runtime.block_on(async move {
        let server = Server::start(config).await?;
        // Tests and scripts read the bound addresses from here (ports may be 0).
        println!("grpc {}", server.grpc_addr);
        println!("http {}", server.http_addr);
        wait_for_signal().await?;
        tracing::info!("shutting down");
        server.stop().await
    })
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("cannot watch SIGINT")?,
        _ = term.recv() => {}
    }
    Ok(())
}
