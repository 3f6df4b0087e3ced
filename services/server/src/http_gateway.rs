//! `--http-listen`: the OpenAI-compatible HTTP API (blip2-gateway) in front of this process's
//! session tier, for `blip2 serve session` and `blip2 serve all`.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;

use anyhow::{Context, Result};
use clap::Args;
use tokio::task::JoinHandle;

/// Flags of the HTTP API.
#[derive(Args, Debug, Clone)]
pub struct HttpArgs {
    /// Serve the OpenAI-compatible HTTP API (POST /v1/chat/completions, GET /v1/models) on
    /// ADDR; `off` serves none. Default: none for `serve session`, 127.0.0.1:8080 for
    /// `serve all`.
    #[arg(long = "http-listen", value_name = "ADDR")]
    http_listen: Option<String>,
    /// Host whose http(s) image URLs the HTTP API may fetch (repeat; `*.example.com` allows
    /// its subdomains). Without one, images come only as data: URIs.
    #[arg(long = "http-allow-host", value_name = "HOST")]
    http_allow_host: Vec<String>,
    /// Largest HTTP request body in MiB; larger requests get 413.
    #[arg(long, default_value_t = 25)]
    http_max_body_mib: usize,
}

/// The model id HTTP clients name: the checkpoint directory's name, a repo id as given, or
/// `blip2-default` for the embedded checkpoint.
fn model_id(model: Option<&Path>) -> String {
    match model {
        None => "blip2-default".into(),
        Some(path) if path.is_dir() => path
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| path.display().to_string()),
        Some(path) => path.display().to_string(),
    }
}

/// Binds, announces (`blip2 http listening on ADDR`) and spawns the HTTP API for the session
/// tier listening on `session_addr`, unless the flags (or `default_listen`) ask for none.
/// `session_tls`: whether that session tier serves TLS (not supported behind the gateway yet).
pub async fn spawn(
    args: &HttpArgs,
    default_listen: Option<&str>,
    session_addr: SocketAddr,
    session_tls: bool,
    model: Option<&Path>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<Option<JoinHandle<std::io::Result<()>>>> {
    let listen = match args.http_listen.as_deref().or(default_listen) {
        None | Some("off") => return Ok(None),
        Some(listen) => listen
            .parse::<SocketAddr>()
            .with_context(|| format!("--http-listen {listen}: not ADDR:PORT"))?,
    };
    // The gateway is a plaintext gRPC client of the session tier on loopback.
    if session_tls {
        anyhow::bail!(
            "the HTTP API cannot front a session tier that serves TLS (--tls-cert) yet: pass \
             --http-listen off, or terminate TLS for both in a proxy in front of them"
        );
    }
    // The session tier may listen on every interface; the gateway reaches it on loopback.
    let session_ip = match session_addr.ip() {
        ip if ip.is_unspecified() && ip.is_ipv4() => Ipv4Addr::LOCALHOST.into(),
        ip if ip.is_unspecified() => Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    let session_addr = SocketAddr::new(session_ip, session_addr.port());
    let mut config = blip2_gateway::GatewayConfig {
        session_addr: format!("http://{session_addr}"),
        model_id: model_id(model),
        max_body_bytes: args.http_max_body_mib << 20,
        ..blip2_gateway::GatewayConfig::default()
    };
    config.images.allow_hosts = args.http_allow_host.clone();
    let gateway = blip2_gateway::Gateway::new(config)?;
    let listener = crate::serve::bind("http", listen).await?;
    crate::serve::announce("http", &listener)?;
    Ok(Some(tokio::spawn(blip2_gateway::serve(
        gateway, listener, shutdown,
    ))))
}
