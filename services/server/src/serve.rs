//! `blip2 serve vision|llm|session|all`: one binary serves any tier.
//!
//! Each tier prints `blip2 <tier> listening on ADDR` on stdout once it accepts connections
//! (tests and scripts bind port 0 and read the port from that line), serves grpc.health.v1 and
//! reflection, and stops on SIGTERM/SIGINT.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use blip2_model::checkpoint::WeightDtype;
use blip2_model::model::{Blip2Model, Components, LoadOptions};
use clap::{Args, Subcommand};
use tokio::net::TcpListener;

#[derive(Subcommand, Debug)]
pub enum Tier {
    /// Image bytes in, soft visual prompts out.
    Vision(VisionArgs),
    /// Prompt + soft prompts in, tokens out.
    Llm(LlmArgs),
    /// Multi-turn dialogue; what a chatbot calls.
    Session(SessionArgs),
    /// The three tiers in one process on loopback (one machine).
    All(AllArgs),
    /// Image-text retrieval (RetrievalService: embeddings, ITM/ITC matching, an index) on a
    /// Blip2ForImageTextRetrieval checkpoint such as Salesforce/blip2-itm-vit-g.
    Retrieval(crate::retrieval_cli::RetrievalServeArgs),
}

#[derive(Args, Debug, Clone)]
pub struct ModelFlags {
    /// Checkpoint directory, or a Hugging Face repo id (owner/name; needs the `hub` feature);
    /// without it, the small checkpoint embedded in the binary.
    #[arg(long, env = "BLIP2_MODEL")]
    pub model: Option<PathBuf>,
    /// Weight precision (the Q-Former stays f32).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Storage of the language model's projections and lm_head: f32, f16, bf16, int8 or int4
    /// (weight-only, activations keep `--dtype`; fewer bytes per weight decode faster on CPU).
    /// Default: as `--dtype`.
    #[arg(long, env = "BLIP2_LLM_WEIGHTS")]
    pub llm_weights: Option<blip2_model::linear::WeightFormat>,
}

impl ModelFlags {
    fn dir(&self) -> Result<PathBuf> {
        crate::default_model::resolve_model_dir(self.model.as_deref())
    }

    fn load(&self, components: Components) -> Result<(Arc<Blip2Model>, String)> {
        self.load_from(&self.dir()?, components)
    }

    /// Loads from `dir`, the directory [`ModelFlags::dir`] resolved.
    fn load_from(&self, dir: &Path, components: Components) -> Result<(Arc<Blip2Model>, String)> {
        let dtype: WeightDtype = self.dtype.parse()?;
        let options = LoadOptions {
            dtype,
            components,
            llm_weights: self.llm_weights,
            ..LoadOptions::default()
        };
        let model = Blip2Model::load(dir, &options)
            .with_context(|| format!("loading {}", dir.display()))?;
        let name = self
            .model
            .as_ref()
            .map(|d| d.display().to_string())
            .unwrap_or_else(|| {
                "embedded-default (the shapes-world demo, models/shapes-demo)".to_string()
            });
        Ok((Arc::new(model), name))
    }
}

/// TLS of a tier's listener.
#[derive(Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// Serve TLS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, env = "BLIP2_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, env = "BLIP2_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (PEM): mutual TLS. Needs --tls-cert.
    #[arg(long, env = "BLIP2_TLS_CLIENT_CA", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
}

impl TlsArgs {
    pub(crate) fn load(&self) -> Result<Option<tonic::transport::ServerTlsConfig>> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return Ok(None);
        };
        let tls = blip2_common::tls::ServerTls {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: self.tls_client_ca.clone(),
        };
        Ok(Some(tls.load()?))
    }
}

/// How the session tier reaches `https://` vision and LLM replicas.
#[derive(Args, Debug, Clone, Default)]
pub struct UpstreamTlsArgs {
    /// CA (PEM) that signed the vision and LLM tiers' certificates (use https:// addresses;
    /// dns:/// targets use TLS whenever this is set).
    #[arg(long, env = "BLIP2_UPSTREAM_CA")]
    upstream_ca: Option<PathBuf>,
    /// Client certificate (PEM) for tiers that require mutual TLS; needs --upstream-key.
    #[arg(long, env = "BLIP2_UPSTREAM_CERT", requires = "upstream_key")]
    upstream_cert: Option<PathBuf>,
    /// Private key (PEM) of --upstream-cert.
    #[arg(long, env = "BLIP2_UPSTREAM_KEY", requires = "upstream_cert")]
    upstream_key: Option<PathBuf>,
    /// Name to verify in the tiers' certificates instead of each address's host.
    #[arg(long)]
    upstream_domain: Option<String>,
}

impl UpstreamTlsArgs {
    fn config(&self) -> blip2_common::tls::ClientTls {
        blip2_common::tls::ClientTls {
            ca: self.upstream_ca.clone(),
            identity: self.upstream_cert.clone().zip(self.upstream_key.clone()),
            domain: self.upstream_domain.clone(),
        }
    }
}

#[derive(Args, Debug)]
pub struct VisionArgs {
    #[arg(long, default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    #[command(flatten)]
    model: ModelFlags,
    #[command(flatten)]
    tls: TlsArgs,
    /// Soft-prompt cache budget in MiB.
    #[arg(long, default_value_t = 256)]
    cache_mib: usize,
    /// Concurrent Encode calls (their images queue for the model thread); beyond them
    /// RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 16)]
    max_concurrency: usize,
    /// Images in one forward pass of the vision model (micro-batching), at most. On a CPU one
    /// 224 px image already fills the matrix kernels, so batching adds no throughput and only
    /// holds every image of a batch until the last is done: 1 by default; raise it on
    /// accelerators.
    #[arg(long = "vision-max-batch", default_value_t = 1)]
    max_batch: usize,
    /// Milliseconds the vision model waits after an image for others to batch with it.
    #[arg(long, default_value_t = 2)]
    batch_window_ms: u64,
    #[command(flatten)]
    observability: crate::observability::ObservabilityArgs,
    #[command(flatten)]
    shutdown: ShutdownArgs,
}

#[derive(Args, Debug)]
pub struct LlmArgs {
    #[arg(long, default_value = "127.0.0.1:50052")]
    listen: SocketAddr,
    #[command(flatten)]
    model: ModelFlags,
    #[command(flatten)]
    batching: LlmBatching,
    #[command(flatten)]
    tls: TlsArgs,
    #[command(flatten)]
    observability: crate::observability::ObservabilityArgs,
    #[command(flatten)]
    shutdown: ShutdownArgs,
}

/// The LLM tier's scheduler.
#[derive(Args, Debug, Clone)]
pub struct LlmBatching {
    /// Sequences in the running batch (continuous batching; a beam search takes num_beams).
    #[arg(
        long = "llm-max-batch",
        alias = "max-concurrency",
        default_value_t = 16
    )]
    max_batch: usize,
    /// Generations waiting for a batch slot; beyond them RESOURCE_EXHAUSTED.
    #[arg(long = "llm-max-queue", alias = "max-queue", default_value_t = 64)]
    max_queue: usize,
    /// Prompt positions read per batched step (chunked prefill).
    #[arg(long, default_value_t = 128)]
    prefill_chunk: usize,
    /// MiB of prompt KV kept for reuse by later turns (0: no prefix cache).
    #[arg(long, default_value_t = 1024)]
    prefix_cache_mib: usize,
    /// Testing aid: every batched step takes at least this many milliseconds (0: off), so a
    /// tiny checkpoint streams long enough for deadline, shutdown and fault tests.
    #[arg(long = "llm-min-step-ms", default_value_t = 0, hide = true)]
    min_step_ms: u64,
}

/// Graceful shutdown on SIGTERM/SIGINT.
#[derive(Args, Debug, Clone)]
pub struct ShutdownArgs {
    /// Seconds running calls may go on after SIGTERM (health is NOT_SERVING and new calls are
    /// refused with UNAVAILABLE meanwhile); then they are cut. The process exits at the latest
    /// 10 s after the grace period.
    #[arg(
        long = "shutdown-grace",
        env = "BLIP2_SHUTDOWN_GRACE",
        default_value_t = 10.0
    )]
    shutdown_grace: f64,
}

impl Default for ShutdownArgs {
    fn default() -> Self {
        Self {
            shutdown_grace: blip2_common::server::DEFAULT_SHUTDOWN_GRACE.as_secs_f64(),
        }
    }
}

impl ShutdownArgs {
    pub(crate) fn grace(&self) -> std::time::Duration {
        std::time::Duration::try_from_secs_f64(self.shutdown_grace)
            .unwrap_or(blip2_common::server::DEFAULT_SHUTDOWN_GRACE)
    }
}

/// After the grace period, how long the process may take to exit before it is forced to.
const FORCED_EXIT_MARGIN: std::time::Duration = std::time::Duration::from_secs(10);

/// The outer timeout of a shutdown: once a signal arrives, the process exits (status 1) if it
/// has not ended by itself within `grace` + [`FORCED_EXIT_MARGIN`].
fn exit_watchdog(runtime: &tokio::runtime::Runtime, grace: std::time::Duration) {
    runtime.spawn(async move {
        blip2_common::server::shutdown_signal().await;
        let limit = grace + FORCED_EXIT_MARGIN;
        std::thread::spawn(move || {
            std::thread::sleep(limit);
            eprintln!("blip2: still running {limit:?} after the shutdown signal; exiting");
            std::process::exit(1);
        });
    });
}

#[derive(Args, Debug)]
pub struct SessionArgs {
    #[arg(long, default_value = "127.0.0.1:50050")]
    listen: SocketAddr,
    /// Vision tier address (repeat for replicas), e.g. http://127.0.0.1:50051, or
    /// dns:///HOST:PORT for every address of a name (a Kubernetes headless Service).
    #[arg(long = "vision", required = true)]
    vision: Vec<String>,
    /// LLM tier address (repeat for replicas), e.g. http://127.0.0.1:50052, or
    /// dns:///HOST:PORT for every address of a name (a Kubernetes headless Service).
    #[arg(long = "llm", required = true)]
    llm: Vec<String>,
    #[command(flatten)]
    replicas: ReplicaArgs,
    /// Checkpoint whose tokenizer counts prompt tokens (default: the embedded one).
    #[command(flatten)]
    model: ModelFlags,
    /// Element type in which soft prompts travel from the vision tier (f32, f16, bf16).
    #[arg(long, default_value = "f32")]
    soft_prompt_dtype: String,
    #[command(flatten)]
    http: crate::http_gateway::HttpArgs,
    #[command(flatten)]
    tls: TlsArgs,
    #[command(flatten)]
    upstream_tls: UpstreamTlsArgs,
    #[command(flatten)]
    observability: crate::observability::ObservabilityArgs,
    #[command(flatten)]
    shutdown: ShutdownArgs,
    /// Where sessions are kept, their TTL, API keys (boxed: keeps `Tier` small).
    #[command(flatten)]
    state: Box<crate::session_state::SessionStateArgs>,
}

#[derive(Args, Debug)]
pub struct AllArgs {
    /// Address of the session tier (the one clients call).
    #[arg(long, default_value = "127.0.0.1:50050")]
    listen: SocketAddr,
    #[command(flatten)]
    model: ModelFlags,
    #[command(flatten)]
    batching: LlmBatching,
    #[command(flatten)]
    http: crate::http_gateway::HttpArgs,
    /// TLS of the session tier's listener (the tiers inside talk over loopback).
    #[command(flatten)]
    tls: TlsArgs,
    /// One metrics endpoint and one log format for the three tiers.
    #[command(flatten)]
    observability: crate::observability::ObservabilityArgs,
    /// One grace period for the three tiers.
    #[command(flatten)]
    shutdown: ShutdownArgs,
    /// Where sessions are kept, their TTL, API keys (boxed: keeps `Tier` small).
    #[command(flatten)]
    state: Box<crate::session_state::SessionStateArgs>,
}

pub(crate) async fn bind(tier: &str, addr: SocketAddr) -> Result<TcpListener> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("{tier}: binding {addr}"))?;
    Ok(listener)
}

pub(crate) fn announce(tier: &str, listener: &TcpListener) -> Result<SocketAddr> {
    let addr = listener.local_addr()?;
    use std::io::Write;
    let mut out = std::io::stdout();
    writeln!(out, "blip2 {tier} listening on {addr}")?;
    out.flush()?;
    Ok(addr)
}

fn vision_tier(
    model: Arc<Blip2Model>,
    name: String,
    args: &VisionArgs,
) -> blip2_vision::VisionTier {
    let config = blip2_vision::VisionConfig {
        cache_bytes: args.cache_mib << 20,
        max_concurrency: args.max_concurrency,
        max_batch_size: args.max_batch,
        batch_window: std::time::Duration::from_millis(args.batch_window_ms),
        shutdown_grace: args.shutdown.grace(),
        ..blip2_vision::VisionConfig::default()
    };
    blip2_vision::VisionTier::new(model, name, config)
}

fn llm_tier(
    model: Arc<Blip2Model>,
    name: String,
    args: &LlmBatching,
    shutdown: &ShutdownArgs,
) -> Result<blip2_llm::LlmTier> {
    let config = blip2_llm::LlmConfig {
        max_concurrency: args.max_batch,
        max_queue: args.max_queue,
        prefill_chunk: args.prefill_chunk,
        prefix_cache_bytes: args.prefix_cache_mib << 20,
        shutdown_grace: shutdown.grace(),
        min_step_time: std::time::Duration::from_millis(args.min_step_ms),
        ..blip2_llm::LlmConfig::default()
    };
    blip2_llm::LlmTier::new(model, name, config).context("starting the LLM scheduler thread")
}

fn wire_dtype(name: &str) -> Result<blip2_proto::v1::Dtype> {
    let dtype: WeightDtype = name.parse()?;
    Ok(match dtype {
        WeightDtype::F32 => blip2_proto::v1::Dtype::F32,
        WeightDtype::F16 => blip2_proto::v1::Dtype::F16,
        WeightDtype::Bf16 => blip2_proto::v1::Dtype::Bf16,
    })
}

/// How the session tier finds and checks the vision and LLM replicas.
#[derive(Args, Debug, Clone)]
pub struct ReplicaArgs {
    /// Seconds between DNS resolutions of dns:/// replica names (pods joining and leaving).
    #[arg(long, env = "BLIP2_REPLICA_REFRESH_SECS", default_value_t = 10)]
    replica_refresh_secs: u64,
    /// Seconds between grpc.health.v1 checks of every replica: a failed replica is ejected and
    /// comes back once its check answers SERVING.
    #[arg(long, env = "BLIP2_REPLICA_PROBE_SECS", default_value_t = 2)]
    replica_probe_secs: u64,
}

impl Default for ReplicaArgs {
    fn default() -> Self {
        Self {
            replica_refresh_secs: 10,
            replica_probe_secs: 2,
        }
    }
}

#[allow(clippy::too_many_arguments)] // one per flag group of the session tier
fn session_tier(
    vision: Vec<String>,
    llm: Vec<String>,
    replicas: &ReplicaArgs,
    model_dir: PathBuf,
    soft_prompt_dtype: blip2_proto::v1::Dtype,
    upstream_tls: blip2_common::tls::ClientTls,
    shutdown: &ShutdownArgs,
    state: &crate::session_state::SessionStateArgs,
) -> Result<blip2_session::SessionTier> {
    let mut config = blip2_session::SessionConfig {
        vision_addrs: vision,
        llm_addrs: llm,
        replica_refresh: std::time::Duration::from_secs(replicas.replica_refresh_secs),
        replica_probe: std::time::Duration::from_secs(replicas.replica_probe_secs),
        model_dir: Some(model_dir),
        soft_prompt_dtype,
        upstream_tls,
        shutdown_grace: shutdown.grace(),
        ..blip2_session::SessionConfig::default()
    };
    state.apply(&mut config)?;
    Ok(blip2_session::SessionTier::new(config)?)
}

pub fn run(tier: Tier) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    // Service names in traces (OTEL_SERVICE_NAME overrides).
    let (service, observability) = match &tier {
        Tier::Vision(args) => ("blip2-vision", &args.observability),
        Tier::Llm(args) => ("blip2-llm", &args.observability),
        Tier::Session(args) => ("blip2-session", &args.observability),
        Tier::All(args) => ("blip2", &args.observability),
        Tier::Retrieval(args) => ("blip2-retrieval", &args.observability),
    };
    let telemetry = crate::observability::init(&runtime, service, observability)?;
    let grace = match &tier {
        Tier::Vision(args) => args.shutdown.grace(),
        Tier::Llm(args) => args.shutdown.grace(),
        Tier::Session(args) => args.shutdown.grace(),
        Tier::All(args) => args.shutdown.grace(),
        Tier::Retrieval(args) => args.shutdown.grace(),
    };
    exit_watchdog(&runtime, grace);
    let served = runtime.block_on(serve(tier));
    crate::observability::shutdown(&runtime, telemetry);
    served
}

async fn serve(tier: Tier) -> Result<()> {
    let shutdown = blip2_common::server::shutdown_signal;
    match tier {
        Tier::Retrieval(args) => crate::retrieval_cli::serve(args, shutdown()).await?,
        Tier::Vision(args) => {
            let (model, name) = args.model.load(Components {
                vision: true,
                language_model: false,
            })?;
            let tier = vision_tier(model, name, &args);
            let listener = bind("vision", args.listen).await?;
            crate::observability::metrics_endpoint(&args.observability).await?;
            announce("vision", &listener)?;
            blip2_vision::serve_with(tier, listener, shutdown(), args.tls.load()?).await?;
        }
        Tier::Llm(args) => {
            let (model, name) = args.model.load(Components {
                vision: false,
                language_model: true,
            })?;
            let tier = llm_tier(model, name, &args.batching, &args.shutdown)?;
            let listener = bind("llm", args.listen).await?;
            crate::observability::metrics_endpoint(&args.observability).await?;
            announce("llm", &listener)?;
            blip2_llm::serve_with(tier, listener, shutdown(), args.tls.load()?).await?;
        }
        Tier::Session(args) => {
            let dtype = wire_dtype(&args.soft_prompt_dtype)?;
            let tls = args.tls.load()?;
            let tier = session_tier(
                args.vision,
                args.llm,
                &args.replicas,
                args.model.dir()?,
                dtype,
                args.upstream_tls.config(),
                &args.shutdown,
                &args.state,
            )?;
            let listener = bind("session", args.listen).await?;
            crate::observability::metrics_endpoint(&args.observability).await?;
            let session_addr = announce("session", &listener)?;
            let model = args.model.model.as_deref();
            let http = crate::http_gateway::spawn(
                &args.http,
                None,
                session_addr,
                tls.is_some(),
                model,
                shutdown(),
            );
            let http_task = http.await?;
            blip2_session::serve_with(tier, listener, shutdown(), tls).await?;
            if let Some(task) = http_task {
                task.await??;
            }
        }
        Tier::All(args) => {
            // One model instance serves the vision and LLM tiers of this process; the checkpoint
            // is resolved (and downloaded, for a repo id) once.
            let model_dir = args.model.dir()?;
            let (model, name) = args.model.load_from(&model_dir, Components::default())?;
            let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
            let vision_listener = bind("vision", loopback).await?;
            let llm_listener = bind("llm", loopback).await?;
            crate::observability::metrics_endpoint(&args.observability).await?;
            let vision_addr = announce("vision", &vision_listener)?;
            let llm_addr = announce("llm", &llm_listener)?;
            let vision = vision_tier(
                model.clone(),
                name.clone(),
                &VisionArgs {
                    listen: vision_addr,
                    model: args.model.clone(),
                    tls: TlsArgs::default(),
                    cache_mib: 256,
                    max_concurrency: 16,
                    max_batch: 1,
                    batch_window_ms: 2,
                    observability: Default::default(),
                    shutdown: args.shutdown.clone(),
                },
            );
            let llm = llm_tier(model, name, &args.batching, &args.shutdown)?;
            let session = session_tier(
                vec![format!("http://{vision_addr}")],
                vec![format!("http://{llm_addr}")],
                &ReplicaArgs::default(),
                model_dir,
                blip2_proto::v1::Dtype::F32,
                blip2_common::tls::ClientTls::default(),
                &args.shutdown,
                &args.state,
            )?;
            let tls = args.tls.load()?;
            let session_listener = bind("session", args.listen).await?;
            let vision_task =
                tokio::spawn(blip2_vision::serve(vision, vision_listener, shutdown()));
            let llm_task = tokio::spawn(blip2_llm::serve(llm, llm_listener, shutdown()));
            let session_addr = session_listener.local_addr()?;
            let model = args.model.model.as_deref();
            let http = crate::http_gateway::spawn(
                &args.http,
                Some("127.0.0.1:8080"),
                session_addr,
                tls.is_some(),
                model,
                shutdown(),
            );
            let http_task = http.await?;
            announce("session", &session_listener)?;
            blip2_session::serve_with(session, session_listener, shutdown(), tls).await?;
            vision_task.await??;
            llm_task.await??;
            if let Some(task) = http_task {
                task.await??;
            }
        }
    }
    Ok(())
}
