//! # blip2-gateway
//!
//! OpenAI's Chat Completions protocol over HTTP in front of the session tier, so chatbot
//! frameworks that speak it use this backend unchanged; gRPC stays the native API. The gateway
//! is a gRPC client of `blip2.v1.SessionService` and keeps no conversation itself: OpenAI
//! clients send the whole history with every request, and the gateway finds the session that
//! already holds that history (see [`sessions`]), so a continuing conversation reuses the
//! session's cached soft prompts and the LLM tier's prefix KV instead of encoding its images
//! and reading its history again. A history it does not know becomes a new session created with
//! those turns (CreateSession's `history`), never generated again.
//!
//! # Layout
//! - [`openai`]: the wire types, field names as in OpenAI's API reference.
//! - [`conversation`]: messages to (system, finished turns, final question), and their keys.
//! - [`images`]: `image_url` parts: data: URIs, allow-listed http(s) URLs.
//! - [`sessions`]: the bounded conversation -> session map and the per-turn claim on a session.
//! - `chat`: POST /v1/chat/completions, as one JSON object or Server-Sent Events.
//! - [`error`]: [`GatewayError`] and its OpenAI error JSON with the matching HTTP status.

mod chat;
pub mod conversation;
pub mod error;
pub mod images;
pub mod openai;
pub mod sessions;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use blip2_proto::v1::session_service_client::SessionServiceClient;
use blip2_proto::v1::{
    ChatEvent, ChatRequest, CreateSessionRequest, DeleteSessionRequest, GenerationParams,
    HistoryTurn, PromptTemplate, TurnImage,
};
use tonic::transport::Channel;
use tonic::{Code, Streaming};

pub use error::GatewayError;
pub use images::ImageLimits;

use conversation::{Conversation, Question};
use sessions::{Claim, ConversationMap, Outcome, SessionReaper, SessionRef};

/// How the gateway runs.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// The session tier, e.g. `http://127.0.0.1:50050`.
    pub session_addr: String,
    /// The model id clients name (`model`), listed by GET /v1/models.
    pub model_id: String,
    pub images: ImageLimits,
    /// Largest request body; beyond it 413.
    pub max_body_bytes: usize,
    /// Conversations remembered (least recently used out first); each holds one session.
    pub max_conversations: usize,
    /// A conversation unused this long is forgotten and its session deleted.
    pub conversation_ttl: Duration,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            session_addr: "http://127.0.0.1:50050".into(),
            model_id: "blip2".into(),
            images: ImageLimits {
                allow_hosts: Vec::new(),
                max_image_bytes: 20 << 20,
                fetch_timeout: Duration::from_secs(10),
            },
            max_body_bytes: 25 << 20,
            max_conversations: 4096,
            conversation_ttl: Duration::from_secs(3600),
        }
    }
}

/// Unix seconds now.
pub(crate) fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The gateway; cheap to clone (one shared state).
#[derive(Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
}

struct Inner {
    config: GatewayConfig,
    client: SessionServiceClient<Channel>,
    map: Arc<ConversationMap>,
    reaper: Arc<dyn SessionReaper>,
    started: i64,
}

/// A gRPC request carrying the client's `authorization` as metadata.
fn with_auth<T>(
    message: T,
    authorization: Option<&str>,
) -> Result<tonic::Request<T>, GatewayError> {
    let mut request = tonic::Request::new(message);
    if let Some(value) = authorization {
        let value = value.parse().map_err(|_| {
            GatewayError::Status(tonic::Status::unauthenticated(
                "the Authorization header holds characters gRPC metadata cannot carry",
            ))
        })?;
        request.metadata_mut().insert("authorization", value);
    }
    Ok(request)
}

/// Deletes sessions no conversation leads to any more, in the background.
struct TierReaper {
    client: SessionServiceClient<Channel>,
}

impl SessionReaper for TierReaper {
    fn delete(&self, sessions: Vec<SessionRef>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let mut client = self.client.clone();
        runtime.spawn(async move {
            for session in sessions {
                let message = DeleteSessionRequest {
                    session_id: session.session_id.clone(),
                };
                let Ok(request) = with_auth(message, session.authorization.as_deref()) else {
                    continue;
                };
                if let Err(status) = client.delete_session(request).await {
                    tracing::debug!(session = %session.session_id, %status, "deleting a forgotten session failed");
                }
            }
        });
    }
}

fn turn_images(question: &Question) -> Vec<TurnImage> {
    question
        .images
        .iter()
        .map(|image| TurnImage {
            source: Some(blip2_proto::v1::turn_image::Source::Data(
                image.data.as_ref().clone(),
            )),
        })
        .collect()
}

impl Gateway {
    /// Checks the configuration; the channel to the session tier connects on first use (so
    /// the tiers may start in any order). Must run inside a tokio runtime.
    pub fn new(config: GatewayConfig) -> Result<Self, GatewayError> {
        if config.model_id.is_empty() {
            return Err(GatewayError::Config("`model_id` must not be empty".into()));
        }
        let channel = Channel::from_shared(config.session_addr.clone())
            .map_err(|e| {
                GatewayError::Config(format!(
                    "session tier address `{}`: {e}",
                    config.session_addr
                ))
            })?
            .connect_lazy();
        let client = SessionServiceClient::new(channel);
        let map = Arc::new(ConversationMap::new(
            config.max_conversations,
            config.conversation_ttl,
        ));
        let reaper = Arc::new(TierReaper {
            client: client.clone(),
        });
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                client,
                map,
                reaper,
                started: unix_now(),
            }),
        })
    }

    /// Conversations remembered now (each holds a session of the session tier).
    pub fn conversations(&self) -> usize {
        self.inner.map.len()
    }

    /// The HTTP routes: POST /v1/chat/completions, GET /v1/models[/{model}].
    pub fn router(&self) -> Router {
        Router::new()
            .route("/v1/chat/completions", post(chat::chat_completions))
            .route("/v1/models", get(list_models))
            .route("/v1/models/{model}", get(get_model))
            .fallback(unknown_url)
            .layer(DefaultBodyLimit::max(self.inner.config.max_body_bytes))
            .with_state(self.clone())
    }

    fn model(&self) -> openai::Model {
        openai::Model {
            id: self.inner.config.model_id.clone(),
            object: "model",
            created: self.inner.started,
            owned_by: "blip2",
        }
    }

    /// Starts the turn on the session holding the conversation's history, or on a new session
    /// created with that history.
    async fn start_turn(
        &self,
        conversation: &Conversation,
        params: GenerationParams,
        authorization: Option<String>,
    ) -> Result<(Claim, Streaming<ChatEvent>), GatewayError> {
        let inner = &self.inner;
        let prefix_key = conversation.prefix_key(authorization.as_deref());
        let (taken, expired) = inner.map.take(&prefix_key);
        if !expired.is_empty() {
            inner.reaper.delete(expired);
        }
        if let Some(session) = taken {
            let mut claim =
                Claim::new(inner.map.clone(), inner.reaper.clone(), session, prefix_key);
            match self
                .chat(&claim.session, conversation, params.clone())
                .await
            {
                Ok(events) => return Ok((claim, events)),
                // Deleted or evicted by the session tier: start over below.
                Err(status) if status.code() == Code::NotFound => claim.settle(Outcome::Gone),
                Err(status) => {
                    claim.settle(Outcome::Unchanged);
                    return Err(status.into());
                }
            }
        }
        let session = self.create(conversation, authorization).await?;
        let mut claim = Claim::new(inner.map.clone(), inner.reaper.clone(), session, prefix_key);
        match self.chat(&claim.session, conversation, params).await {
            Ok(events) => Ok((claim, events)),
            Err(status) => {
                claim.settle(Outcome::Unchanged);
                Err(status.into())
            }
        }
    }

    /// A session holding the conversation's system text and finished turns.
    async fn create(
        &self,
        conversation: &Conversation,
        authorization: Option<String>,
    ) -> Result<SessionRef, GatewayError> {
        let template = (!conversation.system.is_empty()).then(|| PromptTemplate {
            system: conversation.system.clone(),
            ..PromptTemplate::default()
        });
        let history = conversation
            .history
            .iter()
            .map(|turn| HistoryTurn {
                question: turn.question.text.clone(),
                answer: turn.answer.clone(),
                images: turn_images(&turn.question),
            })
            .collect();
        let message = CreateSessionRequest {
            template,
            default_params: None,
            history,
        };
        let request = with_auth(message, authorization.as_deref())?;
        let session = self.inner.client.clone().create_session(request).await?;
        Ok(SessionRef {
            session_id: session.into_inner().session_id,
            authorization,
        })
    }

    async fn chat(
        &self,
        session: &SessionRef,
        conversation: &Conversation,
        params: GenerationParams,
    ) -> Result<Streaming<ChatEvent>, tonic::Status> {
        let message = ChatRequest {
            session_id: session.session_id.clone(),
            text: conversation.current.text.clone(),
            images: turn_images(&conversation.current),
            params: Some(params),
            idempotency_key: String::new(),
        };
        let request =
            with_auth(message, session.authorization.as_deref()).map_err(|e| match e {
                GatewayError::Status(status) => status,
                other => tonic::Status::internal(other.to_string()),
            })?;
        let response = self.inner.client.clone().chat(request).await?;
        Ok(response.into_inner())
    }
}

async fn list_models(State(gateway): State<Gateway>) -> Response {
    let list = openai::ModelList {
        object: "list",
        data: vec![gateway.model()],
    };
    openai::json_response(StatusCode::OK, &list)
}

async fn get_model(State(gateway): State<Gateway>, Path(model): Path<String>) -> Response {
    if model == gateway.inner.config.model_id {
        openai::json_response(StatusCode::OK, &gateway.model())
    } else {
        GatewayError::ModelNotFound(model).into_response()
    }
}

async fn unknown_url(uri: Uri) -> Response {
    GatewayError::UnknownUrl(uri.path().to_string()).into_response()
}

/// Serves the gateway on `listener` until `shutdown` resolves (open streams then finish).
pub async fn serve(
    gateway: Gateway,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, gateway.router())
        .with_graceful_shutdown(shutdown)
        .await
}
