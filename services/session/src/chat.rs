//! One chat turn: validate the request, take the session's turn lock, assemble the prompt within
//! the context budget, encode the images the session does not have yet, then stream the LLM
//! tier's tokens to the client and commit the turn only once it finished.
//!
//! Everything up to the LLM call runs in the handler, so a bad request or a vision error is the
//! RPC's status; from the LLM call on, errors end the response stream. Nothing is written to the
//! session before the LLM tier's `finish`: soft prompts encoded for a turn stay with the turn.

use std::collections::HashMap;
use std::sync::Arc;

use blip2_proto::v1::llm_service_client::LlmServiceClient;
use blip2_proto::v1::{
    chat_event, generate_input, generate_output, turn_image, ChatDone, ChatEvent, ChatRequest,
    Finish, FinishReason, GenerateInput, GenerateSetup, GenerationParams, SoftPrompt, TurnImage,
};
use tokio::sync::{mpsc, OwnedMutexGuard};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::Status;

use crate::error::SessionError;
use crate::prompt::{self, PromptBudget};
use crate::replicas::{self, Attempt};
use crate::store::{random_id, ImageRecord, TurnRecord};
use crate::SessionTier;

/// The client's side of a turn's response stream.
pub(crate) type ChatSender = mpsc::Sender<Result<ChatEvent, Status>>;

/// An image of the turn, resolved to its content.
pub(crate) struct Attachment {
    /// Its id in the session.
    pub(crate) image_id: String,
    pub(crate) sha256: String,
    /// The file, when it may need encoding (absent for a session image attached again).
    pub(crate) data: Option<Arc<Vec<u8>>>,
    /// The upload it came from: dropped from the upload store once the turn commits.
    pub(crate) upload_id: Option<String>,
}

/// A turn ready for the LLM tier. It holds its session's turn lock until it is dropped.
pub(crate) struct PreparedTurn {
    session_id: String,
    question: String,
    attachments: Vec<Attachment>,
    /// Soft prompts of the images the session did not have, by sha256.
    encoded: HashMap<String, Arc<SoftPrompt>>,
    /// `setup`, then one soft prompt per image placeholder.
    inputs: Vec<GenerateInput>,
    turns_before: usize,
    images_before: usize,
    _turn_lock: OwnedMutexGuard<()>,
}

/// The session's defaults with the request's overrides, field by field. Written without `..`
/// so a new field of `GenerationParams` cannot be forgotten here.
pub(crate) fn merge_params(
    defaults: &GenerationParams,
    overrides: Option<&GenerationParams>,
) -> GenerationParams {
    let Some(o) = overrides else {
        return defaults.clone();
    };
    GenerationParams {
        max_new_tokens: o.max_new_tokens.or(defaults.max_new_tokens),
        min_new_tokens: o.min_new_tokens.or(defaults.min_new_tokens),
        temperature: o.temperature.or(defaults.temperature),
        top_p: o.top_p.or(defaults.top_p),
        top_k: o.top_k.or(defaults.top_k),
        repetition_penalty: o.repetition_penalty.or(defaults.repetition_penalty),
        num_beams: o.num_beams.or(defaults.num_beams),
        length_penalty: o.length_penalty.or(defaults.length_penalty),
        stop: if o.stop.is_empty() {
            defaults.stop.clone()
        } else {
            o.stop.clone()
        },
        seed: o.seed.or(defaults.seed),
        logprobs: o.logprobs.or(defaults.logprobs),
    }
}

fn session_not_found(session_id: &str) -> SessionError {
    SessionError::NotFound(format!("no session `{session_id}`"))
}

impl SessionTier {
    /// Validates a turn and gets it ready for the LLM tier (see the module documentation).
    pub(crate) async fn prepare_turn(
        &self,
        request: ChatRequest,
    ) -> Result<PreparedTurn, SessionError> {
        let inner = &self.inner;
        let config = &inner.config;
        let ChatRequest {
            session_id,
            text,
            images,
            params,
        } = request;
        let question = if text.trim().is_empty() {
            String::new()
        } else {
            text
        };
        if question.is_empty() && images.is_empty() {
            return Err(SessionError::InvalidArgument(
                "a turn needs `text` or `images`".into(),
            ));
        }
        if images.len() > config.max_images_per_turn {
            return Err(SessionError::InvalidArgument(format!(
                "`images` has {} images; a turn takes at most {}",
                images.len(),
                config.max_images_per_turn
            )));
        }
        let turn_lock = inner
            .sessions
            .get(&session_id)
            .map(|session| session.turn_lock.clone())
            .ok_or_else(|| session_not_found(&session_id))?;
        let turn_lock = turn_lock.lock_owned().await;

        // A snapshot of the session: the turn lock keeps other turns out, so it stays current.
        let (template, default_params, past, turns_before, images_before, mut known) = {
            let session = inner
                .sessions
                .get(&session_id)
                .ok_or_else(|| session_not_found(&session_id))?;
            let known: HashMap<String, Arc<SoftPrompt>> = session
                .images
                .iter()
                .map(|image| (image.sha256.clone(), image.soft_prompt.clone()))
                .collect();
            (
                session.template.clone(),
                session.default_params.clone(),
                session.past_turns(),
                session.turns.len(),
                session.images.len(),
                known,
            )
        };
        let attachments = self.resolve_images(&session_id, images).await?;
        if images_before + attachments.len() > config.max_images_per_session {
            return Err(SessionError::ResourceExhausted(format!(
                "the session has {images_before} images; a session holds at most {}",
                config.max_images_per_session
            )));
        }

        // The prompt first: a turn that cannot fit is refused before any image is encoded.
        let params = merge_params(&default_params, params.as_ref());
        let budget = self.budget(&session_id, &params).await?;
        let current_images: Vec<String> = attachments.iter().map(|a| a.sha256.clone()).collect();
        let segments = {
            let tokens = inner.tokens.clone();
            let question = question.clone();
            tokio::task::spawn_blocking(move || {
                let count = |text: &str| tokens.count(text);
                let current = (question.as_str(), current_images.as_slice());
                let drop = prompt::turns_to_drop(&template, &past, current, budget, &count)?;
                Ok::<_, SessionError>(prompt::build_segments(&template, &past[drop..], current))
            })
            .await
            .map_err(|e| SessionError::Internal(format!("prompt assembly failed: {e}")))??
        };

        // New images (by content) go to the vision tier, each once.
        let mut new_images: Vec<(String, Arc<Vec<u8>>)> = Vec::new();
        for attachment in &attachments {
            let sha256 = &attachment.sha256;
            if known.contains_key(sha256) || new_images.iter().any(|(s, _)| s == sha256) {
                continue;
            }
            let data = attachment.data.clone().ok_or_else(|| {
                SessionError::Internal(format!("image {sha256} has neither bytes nor a cache"))
            })?;
            new_images.push((sha256.clone(), data));
        }
        let mut encoded = HashMap::new();
        if !new_images.is_empty() {
            let prompts =
                replicas::encode(&inner.vision, &new_images, config.soft_prompt_dtype).await?;
            for ((sha256, _), soft_prompt) in new_images.into_iter().zip(prompts) {
                let soft_prompt = Arc::new(soft_prompt);
                known.insert(sha256.clone(), soft_prompt.clone());
                encoded.insert(sha256, soft_prompt);
            }
        }

        let placeholders: Vec<String> = prompt::placeholder_images(&segments)
            .into_iter()
            .map(str::to_string)
            .collect();
        let mut inputs = Vec::with_capacity(1 + placeholders.len());
        inputs.push(GenerateInput {
            kind: Some(generate_input::Kind::Setup(GenerateSetup {
                segments,
                params: Some(params),
            })),
        });
        for sha256 in placeholders {
            let soft_prompt = known.get(&sha256).ok_or_else(|| {
                SessionError::Internal(format!("no soft prompt for image {sha256}"))
            })?;
            inputs.push(GenerateInput {
                kind: Some(generate_input::Kind::SoftPrompt(
                    soft_prompt.as_ref().clone(),
                )),
            });
        }
        Ok(PreparedTurn {
            session_id,
            question,
            attachments,
            encoded,
            inputs,
            turns_before,
            images_before,
            _turn_lock: turn_lock,
        })
    }

    /// Resolves the turn's images: bytes (size-checked, hashed), an upload of this session or
    /// of none, or an image of the session attached again (its soft prompt is reused).
    pub(crate) async fn resolve_images(
        &self,
        session_id: &str,
        images: Vec<TurnImage>,
    ) -> Result<Vec<Attachment>, SessionError> {
        let inner = &self.inner;
        let max_bytes = inner.config.max_image_bytes;
        let mut attachments = Vec::with_capacity(images.len());
        let mut to_hash = Vec::new();
        for (index, image) in images.into_iter().enumerate() {
            match image.source {
                Some(turn_image::Source::Data(data)) => {
                    if data.is_empty() {
                        return Err(SessionError::InvalidArgument(format!(
                            "`images[{index}].data` is empty"
                        )));
                    }
                    if data.len() > max_bytes {
                        return Err(SessionError::InvalidArgument(format!(
                            "`images[{index}].data` has {} bytes; an image may have at most {max_bytes}",
                            data.len()
                        )));
                    }
                    to_hash.push(attachments.len());
                    attachments.push(Attachment {
                        image_id: random_id(),
                        sha256: String::new(),
                        data: Some(Arc::new(data)),
                        upload_id: None,
                    });
                }
                Some(turn_image::Source::ImageId(id)) => {
                    let from_session = inner.sessions.get(session_id).and_then(|session| {
                        session
                            .images
                            .iter()
                            .find(|image| image.image_id == id)
                            .map(|image| image.sha256.clone())
                    });
                    let attachment = match from_session {
                        Some(sha256) => Attachment {
                            image_id: random_id(),
                            sha256,
                            data: None,
                            upload_id: None,
                        },
                        None => {
                            let upload = inner.uploads.get(&id, session_id).ok_or_else(|| {
                                SessionError::NotFound(format!(
                                    "`images[{index}].image_id` `{id}` is neither an upload \
                                         nor an image of this session"
                                ))
                            })?;
                            let used = attachments.iter().any(|a: &Attachment| a.image_id == id);
                            Attachment {
                                image_id: if used { random_id() } else { id.clone() },
                                sha256: upload.sha256,
                                data: Some(upload.data),
                                upload_id: Some(id),
                            }
                        }
                    };
                    attachments.push(attachment);
                }
                None => {
                    return Err(SessionError::InvalidArgument(format!(
                        "`images[{index}]` has neither `data` nor `image_id`"
                    )))
                }
            }
        }
        if !to_hash.is_empty() {
            let files: Vec<Arc<Vec<u8>>> = to_hash
                .iter()
                .filter_map(|&i| attachments.get(i).and_then(|a| a.data.clone()))
                .collect();
            let hashes = tokio::task::spawn_blocking(move || {
                files
                    .iter()
                    .map(|data| blip2_common::soft_prompt::sha256_hex(data))
                    .collect::<Vec<_>>()
            })
            .await
            .map_err(|e| SessionError::Internal(format!("hashing images failed: {e}")))?;
            for (&index, sha256) in to_hash.iter().zip(hashes) {
                if let Some(attachment) = attachments.get_mut(index) {
                    attachment.sha256 = sha256;
                }
            }
        }
        Ok(attachments)
    }

    /// The turn's prompt budget: `context_tokens`, or the LLM tier's `max_positions` less the
    /// turn's `max_new_tokens` (decoder-only models hold both in one sequence), less the special
    /// tokens the tokenizer adds.
    async fn budget(
        &self,
        session_id: &str,
        params: &GenerationParams,
    ) -> Result<PromptBudget, SessionError> {
        let inner = &self.inner;
        let info = if inner.config.context_tokens.is_none() || inner.num_query_tokens.is_none() {
            let info = inner
                .llm_info
                .get_or_try_init(|| replicas::llm_info(&inner.llm, session_id))
                .await?;
            Some(info)
        } else {
            None
        };
        let num_query_tokens = match (inner.num_query_tokens, info) {
            (Some(n), _) => n,
            (None, Some(info)) => info.num_query_tokens as usize,
            (None, None) => 0,
        };
        let positions = match (inner.config.context_tokens, info) {
            (Some(tokens), _) => tokens,
            (None, Some(info)) => {
                let max_new_tokens = params.max_new_tokens.map_or(
                    blip2_model::generation::GenerationParams::default().max_new_tokens,
                    |n| n as usize,
                );
                let max_positions = info.max_positions as usize;
                if info.model_type == "t5" {
                    max_positions
                } else {
                    max_positions.saturating_sub(max_new_tokens)
                }
            }
            (None, None) => 0,
        };
        Ok(PromptBudget {
            max_tokens: positions.saturating_sub(inner.tokens.special_tokens()),
            num_query_tokens,
        })
    }

    /// Streams the turn's generation to `events` and commits the turn when it finished; errors
    /// end the stream. Runs on its own task; the client leaving ends it, recording nothing.
    pub(crate) async fn run_turn(self, turn: PreparedTurn, events: ChatSender) {
        match self.generate(&turn, &events).await {
            Ok(Some(finish)) => self.finish_turn(turn, finish, &events).await,
            Ok(None) => tracing::debug!(session = %turn.session_id, "client left during a turn"),
            Err(error) => {
                let status = crate::error::report(error, &turn.session_id);
                let _ = events.send(Err(status)).await;
            }
        }
    }

    /// Runs the generation on the session's LLM replica, or the next one while none was
    /// reachable and nothing was streamed yet. `Ok(None)`: the client left.
    async fn generate(
        &self,
        turn: &PreparedTurn,
        events: &ChatSender,
    ) -> Result<Option<Finish>, SessionError> {
        let llm = &self.inner.llm;
        let mut streamed = false;
        let mut last = None;
        for index in llm.affinity(&turn.session_id) {
            let Some(client) = llm.llm_client(index) else {
                continue;
            };
            match generate_on(client, &turn.inputs, events, &mut streamed).await? {
                Attempt::Done(finish) => return Ok(finish),
                Attempt::Unreachable(message) => last = Some((index, message)),
            }
        }
        Err(llm.exhausted(last))
    }

    /// Records the turn, then sends `done`. Recording first means a client that saw `done`
    /// finds the turn in GetSession; if `done` cannot be delivered (the client left) the turn is
    /// taken back, so a cancelled turn leaves the session as it was.
    async fn finish_turn(&self, turn: PreparedTurn, finish: Finish, events: &ChatSender) {
        let finish_reason =
            FinishReason::try_from(finish.reason).unwrap_or(FinishReason::Unspecified);
        let done = ChatDone {
            turn_id: random_id(),
            finish_reason: finish_reason as i32,
            usage: finish.usage,
            text: finish.text,
        };
        if let Err(error) = self.commit(&turn, &done, finish_reason) {
            let status = crate::error::report(error, &turn.session_id);
            let _ = events.send(Err(status)).await;
            return;
        }
        let event = ChatEvent {
            kind: Some(chat_event::Kind::Done(done)),
        };
        if events.send(Ok(event)).await.is_err() {
            self.roll_back(&turn);
            return;
        }
        for upload_id in turn.attachments.iter().filter_map(|a| a.upload_id.as_ref()) {
            self.inner.uploads.remove(upload_id);
        }
    }

    fn commit(
        &self,
        turn: &PreparedTurn,
        done: &ChatDone,
        finish_reason: FinishReason,
    ) -> Result<(), SessionError> {
        let mut session = self
            .inner
            .sessions
            .get_mut(&turn.session_id)
            .ok_or_else(|| {
                SessionError::NotFound(format!(
                    "session `{}` was deleted during the turn",
                    turn.session_id
                ))
            })?;
        let turn_index = session.turns.len() as u32;
        for attachment in &turn.attachments {
            let soft_prompt = session
                .soft_prompt(&attachment.sha256)
                .or_else(|| turn.encoded.get(&attachment.sha256).cloned())
                .ok_or_else(|| {
                    SessionError::Internal(format!("no soft prompt for {}", attachment.sha256))
                })?;
            session.images.push(ImageRecord {
                image_id: attachment.image_id.clone(),
                sha256: attachment.sha256.clone(),
                turn_index,
                soft_prompt,
            });
        }
        session.turns.push(TurnRecord {
            turn_id: done.turn_id.clone(),
            question: turn.question.clone(),
            answer: done.text.clone(),
            image_ids: turn
                .attachments
                .iter()
                .map(|a| a.image_id.clone())
                .collect(),
            finish_reason,
            usage: done.usage,
        });
        Ok(())
    }

    fn roll_back(&self, turn: &PreparedTurn) {
        if let Some(mut session) = self.inner.sessions.get_mut(&turn.session_id) {
            session.turns.truncate(turn.turns_before);
            session.images.truncate(turn.images_before);
        }
    }
}

/// One Generate call on one replica, forwarding token text to `events`.
async fn generate_on(
    mut client: LlmServiceClient<Channel>,
    inputs: &[GenerateInput],
    events: &ChatSender,
    streamed: &mut bool,
) -> Result<Attempt<Option<Finish>>, SessionError> {
    let (input_sender, input_receiver) = mpsc::channel(inputs.len().max(1));
    for input in inputs {
        input_sender
            .try_send(input.clone())
            .map_err(|e| SessionError::Internal(format!("queueing the LLM input: {e}")))?;
    }
    // The input stream stays open until the generation ends: a tier may read its end as the
    // client giving up.
    let _input_open = input_sender;
    let response = tokio::select! {
        response = client.generate(ReceiverStream::new(input_receiver)) => response,
        () = events.closed() => return Ok(Attempt::Done(None)),
    };
    let unreachable =
        |status: &Status, streamed: bool| crate::error::unreachable(status) && !streamed;
    let mut stream = match response {
        Ok(response) => response.into_inner(),
        Err(status) if unreachable(&status, *streamed) => {
            return Ok(Attempt::Unreachable(status.message().to_string()))
        }
        Err(status) => return Err(SessionError::from_tier("LLM", &status)),
    };
    loop {
        let message = tokio::select! {
            message = stream.message() => message,
            () = events.closed() => return Ok(Attempt::Done(None)),
        };
        match message {
            Ok(Some(output)) => match output.kind {
                Some(generate_output::Kind::Token(token)) => {
                    if token.text.is_empty() {
                        continue;
                    }
                    let event = ChatEvent {
                        kind: Some(chat_event::Kind::Text(token.text)),
                    };
                    if events.send(Ok(event)).await.is_err() {
                        return Ok(Attempt::Done(None));
                    }
                    *streamed = true;
                }
                Some(generate_output::Kind::Finish(finish)) => {
                    return Ok(Attempt::Done(Some(finish)))
                }
                None => {}
            },
            Ok(None) => {
                let message = "the generation stream ended without a `finish`".to_string();
                if *streamed {
                    return Err(SessionError::Unavailable {
                        tier: "LLM",
                        message,
                    });
                }
                return Ok(Attempt::Unreachable(message));
            }
            Err(status) if unreachable(&status, *streamed) => {
                return Ok(Attempt::Unreachable(status.message().to_string()))
            }
            Err(status) => return Err(SessionError::from_tier("LLM", &status)),
        }
    }
}
