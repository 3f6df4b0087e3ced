//! Flags every `blip2 serve` tier shares for observability: log format, the Prometheus
//! endpoint. Traces are configured by the standard OTEL_* environment variables
//! (`blip2_common::telemetry`).

use std::net::SocketAddr;

use anyhow::{Context, Result};
use blip2_common::telemetry::LogFormat;
use clap::Args;

#[derive(Args, Debug, Clone, Default)]
pub struct ObservabilityArgs {
    /// Log lines on stderr: `text`, or `json` (one object a line, with trace_id/span_id while a
    /// traced span is active). Levels: RUST_LOG (default info).
    #[arg(long, env = "BLIP2_LOG_FORMAT", default_value = "text", value_parser = parse_log_format)]
    pub log_format: LogFormat,
    /// Serve Prometheus metrics on http://ADDR/metrics (off by default). Port 0 picks one; the
    /// tier prints `blip2 metrics listening on ADDR`.
    #[arg(long, env = "BLIP2_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
}

fn parse_log_format(s: &str) -> Result<LogFormat, String> {
    s.parse()
}

/// Installs logging and tracing inside `runtime` (the OTLP exporter runs on it).
pub fn init(
    runtime: &tokio::runtime::Runtime,
    service: &str,
    flags: &ObservabilityArgs,
) -> Result<blip2_common::telemetry::Telemetry> {
    let _context = runtime.enter();
    blip2_common::telemetry::init(service, flags.log_format).context("starting telemetry")
}

/// Exports the spans still buffered (at exit, while the runtime still runs).
pub fn shutdown(runtime: &tokio::runtime::Runtime, telemetry: blip2_common::telemetry::Telemetry) {
    if telemetry.exporting() {
        runtime.block_on(async {
            let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
        });
    }
}

/// Starts the metrics endpoint when `--metrics-listen` asks for one; it stops on SIGTERM/SIGINT.
pub async fn metrics_endpoint(flags: &ObservabilityArgs) -> Result<()> {
    let Some(addr) = flags.metrics_listen else {
        return Ok(());
    };
    let listener = crate::serve::bind("metrics", addr).await?;
    crate::serve::announce("metrics", &listener)?;
    tokio::spawn(async move {
        let served =
            blip2_common::metrics::serve(listener, blip2_common::server::shutdown_signal()).await;
        if let Err(error) = served {
            tracing::error!(%error, "metrics endpoint failed");
        }
    });
    Ok(())
}
