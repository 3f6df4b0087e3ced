//! OpenAI's Chat Completions wire types: what the gateway reads and writes, field names as in
//! OpenAI's API reference. Fields the gateway neither honours nor refuses are left out of the
//! request type; serde skips them (`user`, `metadata`, `store`, `service_tier`, ...), as OpenAI
//! documents them as having no effect on the completion's text.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

/// POST /v1/chat/completions.
#[derive(Debug, Deserialize)]
pub struct ChatCompletionRequest {
    pub model: String,
    pub messages: Vec<Message>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    /// Deprecated by OpenAI in favour of `max_completion_tokens`; both are honoured.
    pub max_tokens: Option<u32>,
    pub max_completion_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub stop: Option<Stop>,
    pub seed: Option<i64>,
    pub n: Option<u32>,
    // Refused unless neutral: the tiers cannot honour them.
    pub frequency_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<u32>,
    pub logit_bias: Option<serde_json::Map<String, serde_json::Value>>,
    pub tools: Option<Vec<serde_json::Value>>,
    pub functions: Option<Vec<serde_json::Value>>,
    pub response_format: Option<ResponseFormat>,
}

#[derive(Debug, Deserialize)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

#[derive(Debug, Deserialize)]
pub struct ResponseFormat {
    #[serde(rename = "type")]
    pub kind: String,
}

/// `stop`: one string or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
pub struct Message {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
    pub tool_calls: Option<serde_json::Value>,
    pub function_call: Option<serde_json::Value>,
}

/// A message's content: text, or a list of parts.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

/// One part of a message's content; `type` is checked by the conversation parser so that an
/// unsupported kind (`input_audio`, `file`) gets a message naming it.
#[derive(Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
    /// An assistant's `refusal` part.
    pub refusal: Option<String>,
    pub image_url: Option<ImageUrl>,
}

/// `image_url`: `{"url": ..., "detail": ...}`; some clients send the URL alone.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum ImageUrl {
    Object { url: String },
    Url(String),
}

impl ImageUrl {
    pub fn url(&self) -> &str {
        match self {
            Self::Object { url } | Self::Url(url) => url,
        }
    }
}

/// The whole answer (`stream` false).
#[derive(Debug, Serialize)]
pub struct ChatCompletion {
    pub id: String,
    pub object: &'static str,
    pub created: i64,
    pub model: String,
    pub choices: Vec<Choice>,
    pub usage: Option<CompletionUsage>,
    pub system_fingerprint: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Choice {
    pub index: u32,
    pub message: AssistantMessage,
    pub finish_reason: &'static str,
    pub logprobs: Option<()>,
}

#[derive(Debug, Serialize)]
pub struct AssistantMessage {
    pub role: &'static str,
    pub content: String,
    pub refusal: Option<String>,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct CompletionUsage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
    pub prompt_tokens_details: PromptTokensDetails,
}

/// `cached_tokens`: prompt positions whose keys and values the LLM tier took from its prefix
/// cache (OpenAI reports its prompt caching the same way).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct PromptTokensDetails {
    pub cached_tokens: u32,
}

impl From<blip2_proto::v1::Usage> for CompletionUsage {
    fn from(usage: blip2_proto::v1::Usage) -> Self {
        Self {
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.generated_tokens,
            total_tokens: usage.prompt_tokens.saturating_add(usage.generated_tokens),
            prompt_tokens_details: PromptTokensDetails {
                cached_tokens: usage.cached_prompt_tokens,
            },
        }
    }
}

/// One Server-Sent Event of a streamed answer.
#[derive(Debug, Serialize)]
pub struct ChatCompletionChunk {
    pub id: String,
    pub object: &'static str,
    pub created: i64,
    pub model: String,
    pub choices: Vec<ChunkChoice>,
    /// Only on the last chunk, and only when `stream_options.include_usage` asked for it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<CompletionUsage>,
}

#[derive(Debug, Serialize)]
pub struct ChunkChoice {
    pub index: u32,
    pub delta: Delta,
    pub finish_reason: Option<&'static str>,
    pub logprobs: Option<()>,
}

#[derive(Debug, Default, Serialize)]
pub struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// GET /v1/models.
#[derive(Debug, Serialize)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<Model>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Model {
    pub id: String,
    pub object: &'static str,
    pub created: i64,
    pub owned_by: &'static str,
}

/// `value` as a JSON response with `status`. Serialising these types cannot fail; should it,
/// the client still gets a well-formed OpenAI error.
pub fn json_response<T: Serialize>(status: StatusCode, value: &T) -> Response {
    let body = serde_json::to_vec(value).unwrap_or_else(|_| {
        br#"{"error":{"message":"response serialisation failed","type":"server_error","param":null,"code":null}}"#
            .to_vec()
    });
    let mut response = (status, body).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}
