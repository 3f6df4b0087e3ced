//! The session tier's one error type and its mapping to gRPC statuses.

use tonic::{Code, Status};

/// Everything that can go wrong in the session tier.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The configuration cannot work (no replicas, an address that does not parse).
    #[error("invalid session tier configuration: {0}")]
    Config(String),
    /// A bad request: the message names the field.
    #[error("{0}")]
    InvalidArgument(String),
    /// An unknown session, turn image or upload.
    #[error("{0}")]
    NotFound(String),
    /// A limit of the tier (sessions, images per session, the upload store).
    #[error("{0}")]
    ResourceExhausted(String),
    /// No replica of a tier could be reached, or one failed in the middle of a turn.
    #[error("the {tier} tier is unavailable: {message}")]
    Unavailable { tier: &'static str, message: String },
    /// A status a tier answered with, passed through with its code and message.
    #[error("{message}")]
    Tier {
        tier: &'static str,
        code: Code,
        message: String,
    },
    /// A tier answered something that breaks the protocol.
    #[error("the {tier} tier broke the protocol: {message}")]
    Protocol { tier: &'static str, message: String },
    /// The tokenizer could not be loaded or could not tokenise.
    #[error(transparent)]
    Model(#[from] blip2_model::Error),
    /// A blocking task died.
    #[error("internal error: {0}")]
    Internal(String),
    /// The client's deadline passed before the turn ended; nothing was recorded.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// No API key, or an unknown one.
    #[error("{0}")]
    Unauthenticated(String),
    /// The session changed under the turn (a turn committed by another replica).
    #[error("{0}")]
    Aborted(String),
    /// The session store failed or cannot be reached.
    #[error("{0}")]
    Store(String),
}

impl From<crate::store::StoreError> for SessionError {
    fn from(error: crate::store::StoreError) -> Self {
        use crate::store::StoreError;
        match error {
            StoreError::NotFound(id) => Self::NotFound(format!("no session `{id}`")),
            StoreError::Conflict(message) => Self::Aborted(message),
            StoreError::Limit(message) => Self::ResourceExhausted(message),
            error @ StoreError::Backend(_) => Self::Store(error.to_string()),
        }
    }
}

impl SessionError {
    /// A short label for metrics and logs.
    pub fn error_type(&self) -> &'static str {
        match self {
            Self::Config(_) => "config",
            Self::InvalidArgument(_) => "invalid_argument",
            Self::NotFound(_) => "not_found",
            Self::ResourceExhausted(_) => "resource_exhausted",
            Self::Unavailable { .. } => "unavailable",
            Self::Tier { .. } => "tier",
            Self::Protocol { .. } => "protocol",
            Self::Model(_) => "model",
            Self::Internal(_) => "internal",
            Self::DeadlineExceeded(_) => "deadline_exceeded",
            Self::Unauthenticated(_) => "unauthenticated",
            Self::Aborted(_) => "aborted",
            Self::Store(_) => "store",
        }
    }

    /// What a tier's status becomes for the client: UNAVAILABLE (a replica down, or one that
    /// failed mid-stream) names the tier; every other status passes through with its message.
    pub(crate) fn from_tier(tier: &'static str, status: &Status) -> Self {
        match status.code() {
            _ if unreachable(status) => Self::Unavailable {
                tier,
                message: status.message().to_string(),
            },
            code => Self::Tier {
                tier,
                code,
                message: status.message().to_string(),
            },
        }
    }
}

/// Whether a tier's status means the replica could not be reached (or the connection broke)
/// rather than that it refused the request: UNAVAILABLE, or a status that tonic made from a
/// transport error (it carries the error as its source; a server's own status has none), or
/// CANCELLED (the session tier never cancels a call it is still reading, so it is tonic
/// reporting a reset stream). A TLS 1.3 server that refuses the client's certificate after the
/// handshake shows up as either of the last two.
pub(crate) fn unreachable(status: &Status) -> bool {
    matches!(status.code(), Code::Unavailable | Code::Cancelled)
        || std::error::Error::source(status).is_some()
}

/// The status a client gets for `error`, logged here, once: the client's mistakes (INVALID_ARGUMENT,
/// NOT_FOUND, whichever tier found them) at DEBUG, everything else at WARN.
pub(crate) fn report(error: SessionError, session_id: &str) -> Status {
    let error_type = error.error_type();
    let message = error.to_string();
    let status = Status::from(error);
    match status.code() {
        Code::InvalidArgument | Code::NotFound | Code::Unauthenticated => {
            tracing::debug!(session = session_id, error_type, error = %message, "request refused")
        }
        _ => tracing::warn!(session = session_id, error_type, error = %message, "request failed"),
    }
    status
}

impl From<SessionError> for Status {
    fn from(error: SessionError) -> Self {
        match &error {
            SessionError::Config(_) => Status::failed_precondition(error.to_string()),
            SessionError::InvalidArgument(_) => Status::invalid_argument(error.to_string()),
            SessionError::NotFound(_) => Status::not_found(error.to_string()),
            SessionError::ResourceExhausted(_) => Status::resource_exhausted(error.to_string()),
            SessionError::Unavailable { .. } => Status::unavailable(error.to_string()),
            SessionError::Tier { code, message, .. } => Status::new(*code, message.clone()),
            SessionError::Protocol { .. } | SessionError::Internal(_) => {
                Status::internal(error.to_string())
            }
            SessionError::Model(model) => blip2_common::status::model_error(model),
            SessionError::DeadlineExceeded(_) => Status::deadline_exceeded(error.to_string()),
            SessionError::Unauthenticated(_) => Status::unauthenticated(error.to_string()),
            SessionError::Aborted(_) => Status::aborted(error.to_string()),
            SessionError::Store(_) => Status::unavailable(error.to_string()),
        }
    }
}
