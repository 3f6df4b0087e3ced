//! POST /v1/chat/completions: parse and validate, find or create the conversation's session,
//! run the turn on the session tier, answer as one JSON object or as Server-Sent Events.
//!
//! Everything up to the session tier's Chat call happens before the response starts, so those
//! errors get their HTTP status; a failure during a stream is sent as a last `data:` event
//! holding OpenAI's error object (what OpenAI's clients raise from).

use std::convert::Infallible;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use blip2_proto::v1::{chat_event, ChatDone, ChatEvent, FinishReason, GenerationParams};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

use crate::conversation::{self, Conversation};
use crate::error::GatewayError;
use crate::openai::{
    self, AssistantMessage, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, Choice,
    ChunkChoice, CompletionUsage, Delta, Stop,
};
use crate::sessions::{Claim, Outcome};
use crate::Gateway;

/// Chunks a slow client may have queued before the turn waits for it.
const CHUNK_BUFFER: usize = 32;

/// OpenAI allows at most this many stop sequences.
const MAX_STOP: usize = 4;

pub(crate) async fn chat_completions(
    State(gateway): State<Gateway>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match handle(gateway, headers, body).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    }
}

/// What every chunk and the completion repeat.
#[derive(Clone)]
struct Meta {
    id: String,
    created: i64,
    model: String,
}

/// A validated request: the session tier's parameters and how to answer.
struct ValidRequest {
    params: GenerationParams,
    stream: bool,
    include_usage: bool,
}

async fn handle(
    gateway: Gateway,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, GatewayError> {
    let config = &gateway.inner.config;
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            GatewayError::PayloadTooLarge(config.max_body_bytes)
        } else {
            GatewayError::InvalidRequest {
                message: rejection.body_text(),
                param: None,
            }
        }
    })?;
    let request: ChatCompletionRequest =
        serde_json::from_slice(&body).map_err(|e| GatewayError::InvalidRequest {
            message: format!("the body is not a valid chat completion request: {e}"),
            param: None,
        })?;
    if request.model != config.model_id {
        return Err(GatewayError::ModelNotFound(request.model));
    }
    let authorization = authorization(&headers)?;
    let valid = validate(&request)?;
    let conversation = conversation::parse(&request.messages, &config.images).await?;
    let (claim, events) = gateway
        .start_turn(&conversation, valid.params, authorization)
        .await?;
    let meta = Meta {
        id: format!("chatcmpl-{:032x}", rand::random::<u128>()),
        created: crate::unix_now(),
        model: config.model_id.clone(),
    };
    if valid.stream {
        Ok(stream(
            claim,
            events,
            conversation,
            meta,
            valid.include_usage,
        ))
    } else {
        complete(claim, events, conversation, meta).await
    }
}

/// `Authorization: Bearer KEY`, passed on to the session tier as is; the tier decides whether
/// the key is good.
fn authorization(headers: &HeaderMap) -> Result<Option<String>, GatewayError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value.to_str().ok().filter(|v| {
        v.get(..7)
            .is_some_and(|scheme| scheme.eq_ignore_ascii_case("bearer "))
    });
    match value {
        Some(value) => Ok(Some(value.to_string())),
        None => Err(GatewayError::Status(tonic::Status::unauthenticated(
            "the Authorization header must be `Bearer <API key>`",
        ))),
    }
}

/// Checks the parameters against what the tiers can honour and maps them to the session
/// tier's; the tier checks the ranges.
fn validate(request: &ChatCompletionRequest) -> Result<ValidRequest, GatewayError> {
    if let Some(n) = request.n.filter(|&n| n != 1) {
        return Err(GatewayError::invalid(
            "n",
            format!("`n` is {n}; this server returns one choice (`n` = 1)"),
        ));
    }
    for (name, value) in [
        ("frequency_penalty", request.frequency_penalty),
        ("presence_penalty", request.presence_penalty),
    ] {
        if value.is_some_and(|v| v != 0.0) {
            return Err(GatewayError::invalid(
                name,
                format!("`{name}` is not supported (only 0)"),
            ));
        }
    }
    if request.logprobs == Some(true) || request.top_logprobs.is_some_and(|n| n > 0) {
        return Err(GatewayError::invalid(
            "logprobs",
            "`logprobs` is not supported",
        ));
    }
    if request.logit_bias.as_ref().is_some_and(|b| !b.is_empty()) {
        return Err(GatewayError::invalid(
            "logit_bias",
            "`logit_bias` is not supported",
        ));
    }
    if request.tools.as_ref().is_some_and(|t| !t.is_empty())
        || request.functions.as_ref().is_some_and(|f| !f.is_empty())
    {
        return Err(GatewayError::invalid(
            "tools",
            "`tools` is not supported: the model calls no tools",
        ));
    }
    if let Some(format) = request
        .response_format
        .as_ref()
        .filter(|f| f.kind != "text")
    {
        return Err(GatewayError::invalid(
            "response_format",
            format!(
                "`response_format` `{}` is not supported (only `text`)",
                format.kind
            ),
        ));
    }
    let stop = match &request.stop {
        None => Vec::new(),
        Some(Stop::One(stop)) => vec![stop.clone()],
        Some(Stop::Many(stops)) => stops.clone(),
    };
    if stop.len() > MAX_STOP {
        return Err(GatewayError::invalid(
            "stop",
            format!("`stop` has {} sequences; at most {MAX_STOP}", stop.len()),
        ));
    }
    let seed = request
        .seed
        .map(|seed| {
            u64::try_from(seed)
                .map_err(|_| GatewayError::invalid("seed", "`seed` must not be negative"))
        })
        .transpose()?;
    let params = GenerationParams {
        max_new_tokens: request.max_completion_tokens.or(request.max_tokens),
        temperature: request.temperature,
        top_p: request.top_p,
        stop,
        seed,
        ..GenerationParams::default()
    };
    let stream = request.stream.unwrap_or(false);
    let include_usage = stream
        && request
            .stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false);
    Ok(ValidRequest {
        params,
        stream,
        include_usage,
    })
}

fn finish_reason(done: &ChatDone) -> &'static str {
    match FinishReason::try_from(done.finish_reason) {
        Ok(FinishReason::Length) => "length",
        _ => "stop",
    }
}

/// Reads the turn to its end and answers with the whole completion.
async fn complete(
    mut claim: Claim,
    mut events: Streaming<ChatEvent>,
    conversation: Conversation,
    meta: Meta,
) -> Result<Response, GatewayError> {
    loop {
        match events.message().await {
            Ok(Some(ChatEvent {
                kind: Some(chat_event::Kind::Done(done)),
            })) => {
                let key =
                    conversation.answered_key(claim.session.authorization.as_deref(), &done.text);
                claim.settle(Outcome::Recorded(key));
                let completion = ChatCompletion {
                    id: meta.id,
                    object: "chat.completion",
                    created: meta.created,
                    model: meta.model,
                    choices: vec![Choice {
                        index: 0,
                        finish_reason: finish_reason(&done),
                        message: AssistantMessage {
                            role: "assistant",
                            content: done.text,
                            refusal: None,
                        },
                        logprobs: None,
                    }],
                    usage: Some(done.usage.unwrap_or_default().into()),
                    system_fingerprint: None,
                };
                return Ok(openai::json_response(StatusCode::OK, &completion));
            }
            Ok(Some(_)) => {}
            Ok(None) => return Err(GatewayError::Truncated),
            Err(status) => {
                // A failed turn is not recorded: the session is as it was.
                claim.settle(Outcome::Unchanged);
                return Err(status.into());
            }
        }
    }
}

fn chunk(meta: &Meta, delta: Delta, finish_reason: Option<&'static str>) -> ChatCompletionChunk {
    ChatCompletionChunk {
        id: meta.id.clone(),
        object: "chat.completion.chunk",
        created: meta.created,
        model: meta.model.clone(),
        choices: vec![ChunkChoice {
            index: 0,
            delta,
            finish_reason,
            logprobs: None,
        }],
        usage: None,
    }
}

fn event<T: serde::Serialize>(value: &T) -> Result<Event, Infallible> {
    let data = serde_json::to_string(value).unwrap_or_else(|e| {
        format!(r#"{{"error":{{"message":"serialising a chunk failed: {e}","type":"server_error","param":null,"code":null}}}}"#)
    });
    Ok(Event::default().data(data))
}

/// Answers with Server-Sent Events fed by a task that reads the turn. The client leaving drops
/// the event receiver; the task sees it at once (`closed`), drops the session tier's stream,
/// and that cancels the generation down to the LLM tier.
fn stream(
    mut claim: Claim,
    mut events: Streaming<ChatEvent>,
    conversation: Conversation,
    meta: Meta,
    include_usage: bool,
) -> Response {
    let (sender, receiver) = mpsc::channel(CHUNK_BUFFER);
    tokio::spawn(async move {
        let first = Delta {
            role: Some("assistant"),
            content: Some(String::new()),
        };
        if sender
            .send(event(&chunk(&meta, first, None)))
            .await
            .is_err()
        {
            return;
        }
        loop {
            let message = tokio::select! {
                message = events.message() => message,
                () = sender.closed() => return,
            };
            let done = match message {
                Ok(Some(ChatEvent {
                    kind: Some(chat_event::Kind::Text(text)),
                })) => {
                    let delta = Delta {
                        role: None,
                        content: Some(text),
                    };
                    if sender
                        .send(event(&chunk(&meta, delta, None)))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    continue;
                }
                Ok(Some(ChatEvent {
                    kind: Some(chat_event::Kind::Done(done)),
                })) => done,
                Ok(Some(_)) => continue,
                Ok(None) => {
                    let _ = sender.send(event(&GatewayError::Truncated.body())).await;
                    return;
                }
                Err(status) => {
                    claim.settle(Outcome::Unchanged);
                    let error = GatewayError::from(status);
                    tracing::warn!(error = %error, "chat completion stream failed");
                    let _ = sender.send(event(&error.body())).await;
                    return;
                }
            };
            let key = conversation.answered_key(claim.session.authorization.as_deref(), &done.text);
            claim.settle(Outcome::Recorded(key));
            let last = chunk(&meta, Delta::default(), Some(finish_reason(&done)));
            let mut tail = vec![event(&last)];
            if include_usage {
                let mut usage_chunk = chunk(&meta, Delta::default(), None);
                usage_chunk.choices.clear();
                usage_chunk.usage = Some(CompletionUsage::from(done.usage.unwrap_or_default()));
                tail.push(event(&usage_chunk));
            }
            tail.push(Ok(Event::default().data("[DONE]")));
            for item in tail {
                if sender.send(item).await.is_err() {
                    return;
                }
            }
            return;
        }
    });
    Sse::new(ReceiverStream::new(receiver))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}
