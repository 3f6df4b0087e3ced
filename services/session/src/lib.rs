//! # blip2-session
//!
//! The session tier: multi-turn conversations about images, what a chatbot calls. It keeps the
//! conversations, encodes each image once per session on the vision tier, assembles each turn's
//! prompt (history, images' placeholders, context budget) and streams the LLM tier's tokens back.
//! A turn is recorded only when it finished; a failed or cancelled turn leaves the session as it
//! was.
//!
//! # Layout
//! - [`prompt`]: the template, [`build_segments`] (the separator rule), the context budget.
//! - [`store`]: the [`store::SessionStore`] trait (sessions, turns, images with their soft
//!   prompts; in memory, on disk with redb, or in Redis), the upload store.
//! - [`auth`]: API keys (bearer tokens, compared by sha256) and the owner of each session.
//! - `replicas`: the vision and LLM replicas, static or found through DNS (a headless Service),
//!   one channel each, balanced per request (least outstanding requests; rendezvous hashing of
//!   the session id on the LLM tier), ejected on failure and re-admitted by health checks;
//!   fail-over to the next replica.
//! - `chat`: one turn, from the request to the committed turn.
//! - `history`: sessions created with finished turns (CreateSession's `history`), for clients
//!   that hold the conversation themselves.
//! - `service`: the `blip2.v1.SessionService` handlers.
//! - [`error`]: [`SessionError`] and its mapping to `tonic::Status`.

pub mod auth;
mod chat;
mod deadline;
pub mod error;
mod history;
mod metrics;
pub mod prompt;
mod replicas;
mod service;
pub mod store;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use blip2_model::config::Blip2Config;
use blip2_model::prompt::PromptTokenizer;
use blip2_proto::v1::session_service_server::SessionServiceServer;
use blip2_proto::v1::{Dtype, LlmInfo};
use dashmap::DashMap;

pub use error::SessionError;
pub use prompt::{build_segments, PastTurn, PromptBudget};

use prompt::TokenCounter;
use replicas::Replicas;
use store::{SessionStore, UploadStore};

/// Where the session tier keeps its sessions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum StoreConfig {
    /// In memory: lost when the process ends.
    #[default]
    Memory,
    /// A redb file in this directory (created if missing): survives restarts and crashes.
    Disk(PathBuf),
    /// A Redis server (`redis://host:port[/db]`), shared by several session replicas.
    Redis(String),
}

/// How the session tier runs.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Vision tier replicas: `http(s)://host:port` each, or `dns:///host:port` for every address
    /// of a name (re-resolved every `replica_refresh`); each request goes to the replica with
    /// the fewest requests in flight.
    pub vision_addrs: Vec<String>,
    /// LLM tier replicas, as `vision_addrs`; a session sticks to one (rendezvous hashing of its
    /// id over the healthy replicas) for prefix reuse.
    pub llm_addrs: Vec<String>,
    /// How often `dns:///` replica names are resolved again.
    pub replica_refresh: Duration,
    /// How often each replica's grpc.health.v1 status is checked (an ejected replica comes back
    /// when it answers SERVING).
    pub replica_probe: Duration,
    /// Checkpoint directory whose tokenizer counts prompt tokens; `None`: estimate the count.
    pub model_dir: Option<PathBuf>,
    pub max_images_per_turn: usize,
    pub max_images_per_session: usize,
    /// Largest image file, by bytes or by upload.
    pub max_image_bytes: usize,
    pub max_sessions: usize,
    /// Prompt budget in positions; default: the LLM tier's `max_positions` minus the turn's
    /// `max_new_tokens`.
    pub context_tokens: Option<usize>,
    /// Element type the vision tier is asked to send soft prompts in.
    pub soft_prompt_dtype: Dtype,
    /// TLS towards the vision and LLM tiers (CA to trust, identity for mutual TLS).
    pub upstream_tls: blip2_common::tls::ClientTls,
    /// After SIGTERM, how long running turns may go on before they are cut (and not recorded).
    pub shutdown_grace: Duration,
    /// Where sessions are kept.
    pub store: StoreConfig,
    /// Sessions unused this long are removed (`None`: kept until deleted).
    pub session_ttl: Option<Duration>,
    /// How often expired sessions are swept (they are also dropped when next read).
    pub sweep_interval: Duration,
    /// sha256 (hex) of the accepted API keys; empty: no key needed (an open tier).
    pub api_key_hashes: Vec<String>,
    /// Sessions one API key may hold at once; 0: no limit beyond `max_sessions`.
    pub max_sessions_per_key: usize,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            vision_addrs: vec!["http://127.0.0.1:50051".into()],
            llm_addrs: vec!["http://127.0.0.1:50052".into()],
            replica_refresh: Duration::from_secs(10),
            replica_probe: Duration::from_secs(2),
            model_dir: None,
            max_images_per_turn: 4,
            max_images_per_session: 32,
            max_image_bytes: 20 << 20,
            max_sessions: 10_000,
            context_tokens: None,
            soft_prompt_dtype: Dtype::F32,
            upstream_tls: blip2_common::tls::ClientTls::default(),
            shutdown_grace: blip2_common::server::DEFAULT_SHUTDOWN_GRACE,
            store: StoreConfig::Memory,
            session_ttl: None,
            sweep_interval: Duration::from_secs(60),
            api_key_hashes: Vec::new(),
            max_sessions_per_key: 0,
        }
    }
}

/// The session tier; cheap to clone (one shared state).
#[derive(Clone)]
pub struct SessionTier {
    inner: Arc<Inner>,
}

struct Inner {
    config: SessionConfig,
    store: Arc<dyn SessionStore>,
    /// Held for a whole turn so the turns of a session on this replica stay in order (the
    /// store's conditional commit orders them across replicas).
    turn_locks: DashMap<String, Arc<tokio::sync::Mutex<()>>>,
    keys: auth::ApiKeys,
    uploads: UploadStore,
    vision: Replicas,
    llm: Replicas,
    tokens: Arc<TokenCounter>,
    /// `num_query_tokens` from the checkpoint's config.json, when the tier has one.
    num_query_tokens: Option<usize>,
    /// The LLM tier's facts, asked once (on the first turn that needs them).
    llm_info: tokio::sync::OnceCell<LlmInfo>,
}

impl SessionTier {
    /// Checks the configuration and loads the tokenizer; connects to no tier yet (channels
    /// connect on first use, so the tiers may start in any order).
    pub fn new(config: SessionConfig) -> Result<Self, SessionError> {
        let store: Arc<dyn SessionStore> = match &config.store {
            StoreConfig::Memory => Arc::new(store::MemoryStore::new(config.session_ttl)),
            StoreConfig::Disk(dir) => Arc::new(
                store::DiskStore::open(dir, config.session_ttl)
                    .map_err(|e| SessionError::Config(e.to_string()))?,
            ),
            StoreConfig::Redis(url) => Arc::new(
                store::RedisStore::new(url, config.session_ttl)
                    .map_err(|e| SessionError::Config(e.to_string()))?,
            ),
        };
        Self::with_store(config, store)
    }

    /// [`SessionTier::new`] on a store of the caller's (`config.store` is not used): e.g. one
    /// store shared by several tiers, as session replicas share a Redis.
    pub fn with_store(
        config: SessionConfig,
        store: Arc<dyn SessionStore>,
    ) -> Result<Self, SessionError> {
        let keys = auth::ApiKeys::from_hashes(&config.api_key_hashes)?;
        let tls = config
            .upstream_tls
            .load()
            .map_err(|e| SessionError::Config(format!("upstream TLS: {e}")))?;
        let upstream = replicas::Upstream {
            tls: tls.as_ref(),
            domain_fixed: config.upstream_tls.domain.is_some(),
            discovery: replicas::Discovery {
                refresh: config.replica_refresh,
                probe: config.replica_probe,
            },
        };
        let vision = Replicas::new(
            "vision",
            blip2_proto::v1::vision_service_server::SERVICE_NAME,
            &config.vision_addrs,
            &upstream,
        )?;
        let llm = Replicas::new(
            "LLM",
            blip2_proto::v1::llm_service_server::SERVICE_NAME,
            &config.llm_addrs,
            &upstream,
        )?;
        for (name, value) in [
            ("max_images_per_turn", config.max_images_per_turn),
            ("max_image_bytes", config.max_image_bytes),
            ("max_sessions", config.max_sessions),
        ] {
            if value == 0 {
                return Err(SessionError::Config(format!("`{name}` must be at least 1")));
            }
        }
        if config.soft_prompt_dtype == Dtype::Unspecified {
            return Err(SessionError::Config(
                "`soft_prompt_dtype` must be F32, F16 or BF16".into(),
            ));
        }
        let (tokens, num_query_tokens) = match &config.model_dir {
            Some(dir) => {
                let model_config = Blip2Config::from_file(&dir.join("config.json"))?;
                let tokenizer = PromptTokenizer::from_dir(dir, &model_config)?;
                (
                    TokenCounter::from_tokenizer(tokenizer)?,
                    Some(model_config.num_query_tokens),
                )
            }
            None => (TokenCounter::Estimate, None),
        };
        let tier = Self {
            inner: Arc::new(Inner {
                config,
                store,
                turn_locks: DashMap::new(),
                keys,
                uploads: UploadStore::default(),
                vision,
                llm,
                tokens: Arc::new(tokens),
                num_query_tokens,
                llm_info: tokio::sync::OnceCell::new(),
            }),
        };
        tier.start_sweeper();
        tracing::info!("session tier: {}", tier.describe());
        Ok(tier)
    }

    /// With a TTL, sweeps expired sessions every `sweep_interval` on the current tokio runtime
    /// (none: reads still drop expired sessions), until the tier is dropped.
    fn start_sweeper(&self) {
        if self.inner.config.session_ttl.is_none() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let interval = self
            .inner
            .config
            .sweep_interval
            .max(Duration::from_millis(10));
        let tier = Arc::downgrade(&self.inner);
        runtime.spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks.tick().await;
            loop {
                ticks.tick().await;
                let Some(inner) = tier.upgrade() else {
                    return;
                };
                match inner.store.sweep().await {
                    Ok(0) => {}
                    Ok(removed) => tracing::info!(removed, "expired idle sessions"),
                    Err(error) => tracing::warn!(%error, "sweeping expired sessions failed"),
                }
                // Locks of sessions gone (expired, deleted elsewhere) and not in use.
                inner
                    .turn_locks
                    .retain(|_, lock| Arc::strong_count(lock) > 1);
            }
        });
    }

    /// The store's description for the startup log line.
    pub fn describe(&self) -> String {
        let config = &self.inner.config;
        let store = match &config.store {
            StoreConfig::Memory => "in memory (lost on exit)".to_string(),
            StoreConfig::Disk(dir) => format!("on disk in {}", dir.display()),
            StoreConfig::Redis(_) => "in Redis".to_string(),
        };
        let ttl = match config.session_ttl {
            Some(ttl) => format!("idle sessions expire after {}s", ttl.as_secs_f64()),
            None => "sessions never expire".to_string(),
        };
        let keys = match self.inner.keys.len() {
            0 => "OPEN: no API keys configured, every client may use every session".to_string(),
            n => format!("{n} API key(s) required"),
        };
        format!("sessions {store}; {ttl}; {keys}")
    }

    /// The gRPC service, accepting requests as large as a turn's images allow.
    pub fn into_server(self) -> SessionServiceServer<SessionTier> {
        let config = &self.inner.config;
        let largest_request = config
            .max_image_bytes
            .saturating_mul(config.max_images_per_turn)
            .saturating_add(1 << 20);
        SessionServiceServer::new(self).max_decoding_message_size(largest_request)
    }

    /// What the tier's metrics endpoint reads (while the tier lives).
    pub fn metrics(&self) -> std::sync::Weak<dyn blip2_common::metrics::CollectAsync> {
        let inner: std::sync::Weak<Inner> = Arc::downgrade(&self.inner);
        inner
    }

    /// Sessions held now.
    pub async fn session_count(&self) -> Result<usize, SessionError> {
        Ok(self.inner.store.count().await?)
    }
}

/// Serves the session tier, grpc.health.v1 (SERVING from the start: the tier needs no
/// weights) and reflection on `listener` until `shutdown` resolves.
pub async fn serve(
    tier: SessionTier,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    serve_with(tier, listener, shutdown, None).await
}

/// [`serve`] with TLS (and mutual TLS when the configuration names a client CA).
pub async fn serve_with(
    tier: SessionTier,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    tls: Option<tonic::transport::ServerTlsConfig>,
) -> Result<(), tonic::transport::Error> {
    blip2_common::metrics::registry().register_async(tier.metrics());
    // Shutdown: NOT_SERVING and new calls refused, running turns get the grace period, then are
    // cut (and recorded as nothing, like any turn whose client left).
    let grace = tier.inner.config.shutdown_grace;
    blip2_common::server::serve_tier(
        "session",
        <SessionServiceServer<SessionTier> as tonic::server::NamedService>::NAME,
        |routes| routes.add_service(tier.into_server()),
        listener,
        shutdown,
        tls,
        grace,
    )
    .await
}
