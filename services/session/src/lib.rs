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
//! - [`store`]: sessions, turns, images with their cached soft prompts; the upload store.
//! - `replicas`: lazily connected channels to the vision and LLM replicas (round robin, session
//!   affinity, fail-over to the next replica).
//! - `chat`: one turn, from the request to the committed turn.
//! - `history`: sessions created with finished turns (CreateSession's `history`), for clients
//!   that hold the conversation themselves.
//! - `service`: the `blip2.v1.SessionService` handlers.
//! - [`error`]: [`SessionError`] and its mapping to `tonic::Status`.

mod chat;
pub mod error;
mod history;
pub mod prompt;
mod replicas;
mod service;
pub mod store;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use blip2_model::config::Blip2Config;
use blip2_model::prompt::PromptTokenizer;
use blip2_proto::v1::session_service_server::SessionServiceServer;
use blip2_proto::v1::{Dtype, LlmInfo};
use dashmap::DashMap;

pub use error::SessionError;
pub use prompt::{build_segments, PastTurn, PromptBudget};

use prompt::TokenCounter;
use replicas::Replicas;
use store::{Session, UploadStore};

/// How the session tier runs.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Vision tier replicas, e.g. `http://127.0.0.1:50051`; balanced round robin.
    pub vision_addrs: Vec<String>,
    /// LLM tier replicas; a session sticks to one (by a hash of its id) for prefix reuse.
    pub llm_addrs: Vec<String>,
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
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            vision_addrs: vec!["http://127.0.0.1:50051".into()],
            llm_addrs: vec!["http://127.0.0.1:50052".into()],
            model_dir: None,
            max_images_per_turn: 4,
            max_images_per_session: 32,
            max_image_bytes: 20 << 20,
            max_sessions: 10_000,
            context_tokens: None,
            soft_prompt_dtype: Dtype::F32,
            upstream_tls: blip2_common::tls::ClientTls::default(),
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
    sessions: DashMap<String, Session>,
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
        let tls = config
            .upstream_tls
            .load()
            .map_err(|e| SessionError::Config(format!("upstream TLS: {e}")))?;
        let vision = Replicas::new("vision", &config.vision_addrs, tls.as_ref())?;
        let llm = Replicas::new("LLM", &config.llm_addrs, tls.as_ref())?;
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
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                sessions: DashMap::new(),
                uploads: UploadStore::default(),
                vision,
                llm,
                tokens: Arc::new(tokens),
                num_query_tokens,
                llm_info: tokio::sync::OnceCell::new(),
            }),
        })
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

    /// Sessions held now.
    pub fn session_count(&self) -> usize {
        self.inner.sessions.len()
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
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let service = tier.into_server();
    let routes = match blip2_common::server::standard_routes() {
        Ok((health, routes)) => {
            health
                .set_serving::<SessionServiceServer<SessionTier>>()
                .await;
            routes.add_service(service)
        }
        // Only a broken descriptor set fails here; serve the API rather than nothing.
        Err(error) => {
            tracing::error!(%error, "health and reflection services unavailable");
            tonic::service::Routes::new(service)
        }
    };
    blip2_common::tls::server_builder(tls)?
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}
