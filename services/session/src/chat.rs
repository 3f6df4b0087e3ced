//! One chat turn: validate the request, take the session's turn lock, assemble the prompt within
//! the context budget, encode the images the session does not have yet, then stream the LLM
//! tier's tokens to the client and commit the turn only once it finished.
//!
//! Everything up to the LLM call runs in the handler, so a bad request or a vision error is the
//! RPC's status; from the LLM call on, errors end the response stream. Nothing is written to the
//! session before the LLM tier's `finish`: soft prompts encoded for a turn stay with the turn,
//! and the store commits the turn in one conditional write (it applies only if the session
//! still has the turns the turn was prepared against).
//!
//! A request with an `idempotency_key` the session already committed is not run again: the
//! stored turn is sent back ([`Prepared::Replay`]).

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
use crate::store::{random_id, ImageRecord, Session, TurnCommit, TurnRecord};
use crate::SessionTier;

/// The longest idempotency key, in bytes.
const MAX_IDEMPOTENCY_KEY_BYTES: usize = 128;

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
    /// The session's owner (the hash of its API key).
    owner: String,
    question: String,
    idempotency_key: String,
    attachments: Vec<Attachment>,
    /// Soft prompts of the turn's images (the session's and the newly encoded), by sha256.
    soft_prompts: HashMap<String, Arc<SoftPrompt>>,
    /// `setup`, then one soft prompt per image placeholder.
    inputs: Vec<GenerateInput>,
    /// Turns the session had: the commit's condition.
    turns_before: usize,
    _turn_lock: OwnedMutexGuard<()>,
}

/// What a Chat request turned into.
pub(crate) enum Prepared {
    /// A new turn, to run.
    Turn(Box<PreparedTurn>),
    /// The request's idempotency key names a committed turn: send it back.
    Replay(ChatDone),
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

/// The committed turn `turn` as the final event of a Chat.
fn done_of(turn: &TurnRecord) -> ChatDone {
    ChatDone {
        turn_id: turn.turn_id.clone(),
        finish_reason: turn.finish_reason as i32,
        usage: turn.usage,
        text: turn.answer.clone(),
    }
}

impl SessionTier {
    /// Validates a turn and gets it ready for the LLM tier (see the module documentation).
    pub(crate) async fn prepare_turn(
        &self,
        request: ChatRequest,
        owner: String,
    ) -> Result<Prepared, SessionError> {
        let inner = &self.inner;
        let config = &inner.config;
        let ChatRequest {
            session_id,
            text,
            images,
            params,
            idempotency_key,
        } = request;
        if idempotency_key.len() > MAX_IDEMPOTENCY_KEY_BYTES {
            return Err(SessionError::InvalidArgument(format!(
                "`idempotency_key` has {} bytes; at most {MAX_IDEMPOTENCY_KEY_BYTES}",
                idempotency_key.len()
            )));
        }
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
        // Another key's session is "not found", as one that never existed.
        self.check_owner(&session_id, &owner).await?;
        let turn_lock = self.turn_lock(&session_id).lock_owned().await;

        // A snapshot of the session, read under the turn lock: no other turn of this replica
        // runs until this one ends, and the commit's condition catches other replicas'.
        let session = self.owned_session(&session_id, &owner).await?;
        if let Some(turn) = session.turn_with_key(&idempotency_key) {
            if turn.question != question {
                return Err(SessionError::InvalidArgument(
                    "`idempotency_key` belongs to another turn of this session (with other \
                     text); use a new key for a new turn"
                        .into(),
                ));
            }
            return Ok(Prepared::Replay(done_of(turn)));
        }
        let mut known: HashMap<String, Arc<SoftPrompt>> = session
            .images
            .iter()
            .map(|image| (image.sha256.clone(), image.soft_prompt.clone()))
            .collect();
        let template = session.template.clone();
        let default_params = session.default_params.clone();
        let past = session.past_turns();
        let turns_before = session.turns.len();
        let images_before = session.images.len();
        let attachments = self.resolve_images(&session, &owner, images).await?;
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
        if !new_images.is_empty() {
            let prompts =
                replicas::encode(&inner.vision, &new_images, config.soft_prompt_dtype).await?;
            for ((sha256, _), soft_prompt) in new_images.into_iter().zip(prompts) {
                known.insert(sha256, Arc::new(soft_prompt));
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
        Ok(Prepared::Turn(Box::new(PreparedTurn {
            session_id,
            owner,
            question,
            idempotency_key,
            attachments,
            soft_prompts: known,
            inputs,
            turns_before,
            _turn_lock: turn_lock,
        })))
    }

    /// Resolves the turn's images: bytes (size-checked, hashed), an upload of `owner` for this
    /// session or for none, or an image of the session attached again (its soft prompt is
    /// reused).
    pub(crate) async fn resolve_images(
        &self,
        session: &Session,
        owner: &str,
        images: Vec<TurnImage>,
    ) -> Result<Vec<Attachment>, SessionError> {
        let session_id = session.session_id.as_str();
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
                    let from_session = session
                        .images
                        .iter()
                        .find(|image| image.image_id == id)
                        .map(|image| image.sha256.clone());
                    let attachment = match from_session {
                        Some(sha256) => Attachment {
                            image_id: random_id(),
                            sha256,
                            data: None,
                            upload_id: None,
                        },
                        None => {
                            let upload = inner.uploads.get(&id, session_id, owner);
                            let upload = upload.ok_or_else(|| {
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
        match crate::deadline::within(self.generate(&turn, &events)).await {
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
        let (mut last, mut full) = (None, None);
        for replica in llm.affinity(&turn.session_id).await? {
            let _in_flight = replica.begin();
            let attempt = generate_on(replica.llm_client(), &turn.inputs, events, &mut streamed);
            match attempt.await {
                Ok(Attempt::Done(finish)) => {
                    llm.succeeded(&replica);
                    return Ok(finish);
                }
                Ok(Attempt::Unreachable(message)) => {
                    llm.eject(&replica, &message);
                    last = Some((replica.address().to_string(), message));
                }
                // The session's replica is full: the next one takes the turn (without the
                // prefix cache) rather than the client getting RESOURCE_EXHAUSTED.
                Ok(Attempt::Busy(status)) => full = Some(status),
                Err(error) => {
                    // Broke mid-stream: the turn is lost, and the replica is suspect too.
                    if matches!(error, SessionError::Unavailable { .. }) {
                        llm.eject(&replica, &error.to_string());
                    }
                    return Err(error);
                }
            }
        }
        Err(replicas::exhausted(llm, full, last))
    }

    /// Records the turn, then sends `done`. Recording first means a client that saw `done`
    /// finds the turn in GetSession. A client that left before the turn finished gets nothing
    /// recorded; one that leaves between the commit and `done` finds the turn committed (a
    /// retry with the same idempotency key gets it back).
    async fn finish_turn(&self, turn: PreparedTurn, finish: Finish, events: &ChatSender) {
        if events.is_closed() {
            tracing::debug!(session = %turn.session_id, "client left before the turn finished");
            return;
        }
        let finish_reason =
            FinishReason::try_from(finish.reason).unwrap_or(FinishReason::Unspecified);
        let done = ChatDone {
            turn_id: random_id(),
            finish_reason: finish_reason as i32,
            usage: finish.usage,
            text: finish.text,
        };
        if let Err(error) = self.commit(&turn, &done, finish_reason).await {
            let status = crate::error::report(error, &turn.session_id);
            let _ = events.send(Err(status)).await;
            return;
        }
        for upload_id in turn.attachments.iter().filter_map(|a| a.upload_id.as_ref()) {
            self.inner.uploads.remove(upload_id);
        }
        let event = ChatEvent {
            kind: Some(chat_event::Kind::Done(done)),
        };
        if events.send(Ok(event)).await.is_err() {
            tracing::debug!(session = %turn.session_id, "client left before `done`; the turn is committed");
        }
    }

    /// Appends the turn to the session in the store, if the session still has the turns the
    /// turn was prepared against.
    async fn commit(
        &self,
        turn: &PreparedTurn,
        done: &ChatDone,
        finish_reason: FinishReason,
    ) -> Result<(), SessionError> {
        let turn_index = turn.turns_before as u32;
        let images = turn
            .attachments
            .iter()
            .map(|attachment| {
                let soft_prompt = turn
                    .soft_prompts
                    .get(&attachment.sha256)
                    .cloned()
                    .ok_or_else(|| {
                        SessionError::Internal(format!("no soft prompt for {}", attachment.sha256))
                    })?;
                Ok(ImageRecord {
                    image_id: attachment.image_id.clone(),
                    sha256: attachment.sha256.clone(),
                    turn_index,
                    soft_prompt,
                })
            })
            .collect::<Result<Vec<_>, SessionError>>()?;
        let commit = TurnCommit {
            session_id: turn.session_id.clone(),
            owner: turn.owner.clone(),
            expected_turns: turn.turns_before,
            turn: TurnRecord {
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
                idempotency_key: turn.idempotency_key.clone(),
            },
            images,
        };
        self.inner
            .store
            .commit(&commit)
            .await
            .map_err(|error| match error {
                crate::store::StoreError::NotFound(id) => {
                    SessionError::NotFound(format!("session `{id}` was deleted during the turn"))
                }
                other => other.into(),
            })
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
        response = client.generate(crate::deadline::limit(blip2_common::telemetry::traced_request(
            ReceiverStream::new(input_receiver),
        ))) => response,
        () = events.closed() => return Ok(Attempt::Done(None)),
    };
    let unreachable =
        |status: &Status, streamed: bool| crate::error::unreachable(status) && !streamed;
    let mut stream = match response {
        Ok(response) => response.into_inner(),
        Err(status) if unreachable(&status, *streamed) => {
            return Ok(Attempt::Unreachable(status.message().to_string()))
        }
        Err(status) if replicas::busy(&status) && !*streamed => return Ok(Attempt::Busy(status)),
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
            Err(status) if replicas::busy(&status) && !*streamed => {
                return Ok(Attempt::Busy(status))
            }
            Err(status) => return Err(SessionError::from_tier("LLM", &status)),
        }
    }
}
