//! Sessions that start with finished turns (CreateSession's `history`).
//!
//! A client that holds the conversation itself (OpenAI's Chat Completions protocol sends the
//! whole history with every request) can continue it here without the tier generating the
//! earlier answers again: the turns are recorded as given. Their images are resolved and
//! checked as a turn's are, and the ones new to the session are encoded once, in one Encode
//! call, so the session's later turns send only cached soft prompts.

use std::collections::HashMap;
use std::sync::Arc;

use blip2_proto::v1::{FinishReason, GenerationParams, HistoryTurn, PromptTemplate};

use crate::chat::Attachment;
use crate::error::SessionError;
use crate::replicas;
use crate::store::{random_id, ImageRecord, Session, TurnRecord};
use crate::SessionTier;

/// A history turn with its images resolved.
struct ResolvedTurn {
    question: String,
    answer: String,
    attachments: Vec<Attachment>,
}

/// Names the history turn in a message about one of its images (`images[0]` alone would not
/// say which turn).
fn in_turn(index: usize, error: SessionError) -> SessionError {
    match error {
        SessionError::InvalidArgument(message) => {
            SessionError::InvalidArgument(format!("`history[{index}]`: {message}"))
        }
        SessionError::NotFound(message) => {
            SessionError::NotFound(format!("`history[{index}]`: {message}"))
        }
        other => other,
    }
}

impl SessionTier {
    /// A new session of `owner` (not yet stored) holding `history` as finished turns, and the
    /// uploads it used (to drop once it is stored).
    pub(crate) async fn session_with_history(
        &self,
        owner: String,
        template: PromptTemplate,
        default_params: GenerationParams,
        history: Vec<HistoryTurn>,
    ) -> Result<(Session, Vec<String>), SessionError> {
        let mut session = Session::new(owner, template, default_params);
        if history.is_empty() {
            return Ok((session, Vec::new()));
        }
        let config = &self.inner.config;
        let mut turns = Vec::with_capacity(history.len());
        let mut image_count = 0usize;
        for (index, turn) in history.into_iter().enumerate() {
            let HistoryTurn {
                question,
                answer,
                images,
            } = turn;
            let question = if question.trim().is_empty() {
                String::new()
            } else {
                question
            };
            if question.is_empty() && answer.is_empty() && images.is_empty() {
                return Err(SessionError::InvalidArgument(format!(
                    "`history[{index}]` is empty: a turn needs `question`, `answer` or `images`"
                )));
            }
            if images.len() > config.max_images_per_turn {
                return Err(SessionError::InvalidArgument(format!(
                    "`history[{index}].images` has {} images; a turn takes at most {}",
                    images.len(),
                    config.max_images_per_turn
                )));
            }
            image_count += images.len();
            if image_count > config.max_images_per_session {
                return Err(SessionError::ResourceExhausted(format!(
                    "`history` has more than {} images, the most a session holds",
                    config.max_images_per_session
                )));
            }
            let attachments = self
                .resolve_images(&session, &session.owner, images)
                .await
                .map_err(|error| in_turn(index, error))?;
            turns.push(ResolvedTurn {
                question,
                answer,
                attachments,
            });
        }

        // Each image content once, in one Encode call.
        let mut new_images: Vec<(String, Arc<Vec<u8>>)> = Vec::new();
        for attachment in turns.iter().flat_map(|turn| &turn.attachments) {
            if new_images
                .iter()
                .any(|(sha256, _)| *sha256 == attachment.sha256)
            {
                continue;
            }
            let data = attachment.data.clone().ok_or_else(|| {
                SessionError::Internal(format!("image {} has no bytes", attachment.sha256))
            })?;
            new_images.push((attachment.sha256.clone(), data));
        }
        let mut soft_prompts = HashMap::with_capacity(new_images.len());
        if !new_images.is_empty() {
            let encoded =
                replicas::encode(&self.inner.vision, &new_images, config.soft_prompt_dtype).await?;
            for ((sha256, _), soft_prompt) in new_images.into_iter().zip(encoded) {
                soft_prompts.insert(sha256, Arc::new(soft_prompt));
            }
        }

        let mut used_uploads = Vec::new();
        for (turn_index, turn) in turns.into_iter().enumerate() {
            let mut image_ids = Vec::with_capacity(turn.attachments.len());
            for attachment in turn.attachments {
                let soft_prompt =
                    soft_prompts
                        .get(&attachment.sha256)
                        .cloned()
                        .ok_or_else(|| {
                            SessionError::Internal(format!(
                                "no soft prompt for {}",
                                attachment.sha256
                            ))
                        })?;
                image_ids.push(attachment.image_id.clone());
                used_uploads.extend(attachment.upload_id);
                session.images.push(ImageRecord {
                    image_id: attachment.image_id,
                    sha256: attachment.sha256,
                    turn_index: turn_index as u32,
                    soft_prompt,
                });
            }
            session.turns.push(TurnRecord {
                turn_id: random_id(),
                question: turn.question,
                answer: turn.answer,
                image_ids,
                // Not generated here: the tier cannot say why the answer ended.
                finish_reason: FinishReason::Unspecified,
                usage: None,
                idempotency_key: String::new(),
            });
        }
        Ok((session, used_uploads))
    }
}
