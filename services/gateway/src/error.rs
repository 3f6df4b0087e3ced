//! The gateway's one error type and its rendering as OpenAI's error JSON with the matching
//! HTTP status, so that OpenAI client libraries raise their usual exception classes
//! (`BadRequestError`, `AuthenticationError`, `NotFoundError`, `RateLimitError`, ...).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tonic::Code;

/// Everything that can go wrong between an HTTP request and the session tier.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The gateway cannot start with this configuration.
    #[error("invalid HTTP gateway configuration: {0}")]
    Config(String),
    /// A bad request; `param` names the field when one is to blame.
    #[error("{message}")]
    InvalidRequest {
        message: String,
        param: Option<String>,
    },
    /// The request names a model this server does not serve.
    #[error("The model `{0}` does not exist")]
    ModelNotFound(String),
    /// No route for the path.
    #[error("Unknown request URL: {0}")]
    UnknownUrl(String),
    /// The body is over `max_body_bytes`.
    #[error("the request body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    /// The session tier refused or failed the call.
    #[error("{}", .0.message())]
    Status(#[from] tonic::Status),
    /// The session tier's stream ended without its final event.
    #[error("the session tier ended the turn without a final event")]
    Truncated,
}

impl GatewayError {
    /// A 400 about `param`.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::InvalidRequest {
            message: message.into(),
            param: Some(param.into()),
        }
    }

    /// The HTTP status, OpenAI's error `type` and `code`.
    fn classify(&self) -> (StatusCode, &'static str, Option<&'static str>) {
        match self {
            Self::Config(_) | Self::Truncated => {
                (StatusCode::INTERNAL_SERVER_ERROR, "server_error", None)
            }
            Self::InvalidRequest { .. } => (StatusCode::BAD_REQUEST, "invalid_request_error", None),
            Self::ModelNotFound(_) => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                Some("model_not_found"),
            ),
            Self::UnknownUrl(_) => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                Some("unknown_url"),
            ),
            Self::PayloadTooLarge(_) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                Some("request_too_large"),
            ),
            Self::Status(status) => match status.code() {
                Code::InvalidArgument | Code::OutOfRange => {
                    (StatusCode::BAD_REQUEST, "invalid_request_error", None)
                }
                Code::Unauthenticated => (
                    StatusCode::UNAUTHORIZED,
                    "authentication_error",
                    Some("invalid_api_key"),
                ),
                Code::PermissionDenied => (StatusCode::FORBIDDEN, "permission_error", None),
                Code::NotFound => (StatusCode::NOT_FOUND, "not_found_error", None),
                Code::ResourceExhausted => (
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limit_error",
                    Some("overloaded"),
                ),
                Code::Unavailable => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "server_error",
                    Some("service_unavailable"),
                ),
                Code::DeadlineExceeded => (StatusCode::GATEWAY_TIMEOUT, "server_error", None),
                _ => (StatusCode::INTERNAL_SERVER_ERROR, "server_error", None),
            },
        }
    }

    pub fn status_code(&self) -> StatusCode {
        self.classify().0
    }

    /// `{"error": {"message", "type", "param", "code"}}`, as OpenAI answers.
    pub fn body(&self) -> ErrorBody {
        let (_, kind, code) = self.classify();
        let param = match self {
            Self::InvalidRequest { param, .. } => param.clone(),
            Self::ModelNotFound(_) => Some("model".into()),
            _ => None,
        };
        ErrorBody {
            error: ErrorDetail {
                message: self.to_string(),
                kind,
                param,
                code,
            },
        }
    }
}

#[derive(Debug, Serialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl IntoResponse for GatewayError {
    /// Logged here, once: the client's mistakes at DEBUG, the rest at WARN.
    fn into_response(self) -> Response {
        let status = self.status_code();
        if status.is_server_error() {
            tracing::warn!(status = status.as_u16(), error = %self, "HTTP request failed");
        } else {
            tracing::debug!(status = status.as_u16(), error = %self, "HTTP request refused");
        }
        crate::openai::json_response(status, &self.body())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_codes_map_to_openai_statuses() {
        let cases = [
            (Code::InvalidArgument, 400),
            (Code::Unauthenticated, 401),
            (Code::NotFound, 404),
            (Code::ResourceExhausted, 429),
            (Code::Unavailable, 503),
            (Code::Internal, 500),
        ];
        for (code, http) in cases {
            let error = GatewayError::from(tonic::Status::new(code, "x"));
            assert_eq!(error.status_code().as_u16(), http, "{code:?}");
        }
        assert_eq!(GatewayError::PayloadTooLarge(1).status_code().as_u16(), 413);
        assert_eq!(
            GatewayError::ModelNotFound("m".into())
                .status_code()
                .as_u16(),
            404
        );
    }

    #[test]
    fn the_body_has_openai_fields() {
        let body = serde_json::to_value(GatewayError::invalid("n", "`n` must be 1").body())
            .unwrap_or_default();
        assert_eq!(body["error"]["message"], "`n` must be 1");
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["param"], "n");
        assert!(body["error"]["code"].is_null());
    }
}
