//! How the disk and Redis stores write a session: protobuf records (prost), so fields can be
//! added later and old records still read. A session is a [`MetaRecord`], one [`TurnRow`] per
//! turn, one [`ImageRow`] per image and one `SoftPrompt` per image content (sha256).

use std::collections::HashMap;
use std::sync::Arc;

use blip2_proto::v1::{FinishReason, GenerationParams, PromptTemplate, SoftPrompt, Usage};
use prost::Message;

use super::{ImageRecord, Session, StoreError, TurnRecord};

/// A session's metadata.
#[derive(Clone, PartialEq, Message)]
pub(crate) struct MetaRecord {
    #[prost(string, tag = "1")]
    pub session_id: String,
    #[prost(string, tag = "2")]
    pub owner: String,
    #[prost(int64, tag = "3")]
    pub created_at: i64,
    #[prost(int64, tag = "4")]
    pub last_used_ms: i64,
    #[prost(message, optional, tag = "5")]
    pub template: Option<PromptTemplate>,
    #[prost(message, optional, tag = "6")]
    pub default_params: Option<GenerationParams>,
    /// Turns committed (the condition of the next commit).
    #[prost(uint32, tag = "7")]
    pub turns: u32,
    #[prost(uint32, tag = "8")]
    pub images: u32,
}

/// A committed turn.
#[derive(Clone, PartialEq, Message)]
pub(crate) struct TurnRow {
    #[prost(string, tag = "1")]
    pub turn_id: String,
    #[prost(string, tag = "2")]
    pub question: String,
    #[prost(string, tag = "3")]
    pub answer: String,
    #[prost(string, repeated, tag = "4")]
    pub image_ids: Vec<String>,
    #[prost(int32, tag = "5")]
    pub finish_reason: i32,
    #[prost(message, optional, tag = "6")]
    pub usage: Option<Usage>,
    #[prost(string, tag = "7")]
    pub idempotency_key: String,
}

/// An image of a session (its soft prompt is stored once per sha256).
#[derive(Clone, PartialEq, Message)]
pub(crate) struct ImageRow {
    #[prost(string, tag = "1")]
    pub image_id: String,
    #[prost(string, tag = "2")]
    pub sha256: String,
    #[prost(uint32, tag = "3")]
    pub turn_index: u32,
}

pub(crate) fn meta(session: &Session) -> MetaRecord {
    MetaRecord {
        session_id: session.session_id.clone(),
        owner: session.owner.clone(),
        created_at: session.created_at,
        last_used_ms: session.last_used_ms,
        template: Some(session.template.clone()),
        default_params: Some(session.default_params.clone()),
        turns: session.turns.len() as u32,
        images: session.images.len() as u32,
    }
}

pub(crate) fn turn_row(turn: &TurnRecord) -> TurnRow {
    TurnRow {
        turn_id: turn.turn_id.clone(),
        question: turn.question.clone(),
        answer: turn.answer.clone(),
        image_ids: turn.image_ids.clone(),
        finish_reason: turn.finish_reason as i32,
        usage: turn.usage,
        idempotency_key: turn.idempotency_key.clone(),
    }
}

pub(crate) fn image_row(image: &ImageRecord) -> ImageRow {
    ImageRow {
        image_id: image.image_id.clone(),
        sha256: image.sha256.clone(),
        turn_index: image.turn_index,
    }
}

pub(crate) fn decode<M: Message + Default>(what: &str, bytes: &[u8]) -> Result<M, StoreError> {
    M::decode(bytes).map_err(|e| StoreError::Backend(format!("a corrupt {what} record: {e}")))
}

/// The session from its records; `soft_prompts` by sha256.
pub(crate) fn session(
    meta: MetaRecord,
    turns: Vec<TurnRow>,
    images: Vec<ImageRow>,
    soft_prompts: &HashMap<String, Arc<SoftPrompt>>,
) -> Result<Session, StoreError> {
    let images = images
        .into_iter()
        .map(|row| {
            let soft_prompt = soft_prompts.get(&row.sha256).cloned().ok_or_else(|| {
                StoreError::Backend(format!(
                    "session `{}` lacks the soft prompt of image {}",
                    meta.session_id, row.sha256
                ))
            })?;
            Ok(ImageRecord {
                image_id: row.image_id,
                sha256: row.sha256,
                turn_index: row.turn_index,
                soft_prompt,
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    let turns = turns
        .into_iter()
        .map(|row| TurnRecord {
            turn_id: row.turn_id,
            question: row.question,
            answer: row.answer,
            image_ids: row.image_ids,
            finish_reason: FinishReason::try_from(row.finish_reason)
                .unwrap_or(FinishReason::Unspecified),
            usage: row.usage,
            idempotency_key: row.idempotency_key,
        })
        .collect();
    Ok(Session {
        session_id: meta.session_id,
        owner: meta.owner,
        created_at: meta.created_at,
        last_used_ms: meta.last_used_ms,
        template: meta.template.unwrap_or_default(),
        default_params: meta.default_params.unwrap_or_default(),
        turns,
        images,
    })
}

/// The soft prompts of `images` not in `known`, each content once.
pub(crate) fn new_soft_prompts(
    images: &[ImageRecord],
    known: impl Fn(&str) -> bool,
) -> Vec<(&str, Vec<u8>)> {
    let mut out: Vec<(&str, Vec<u8>)> = Vec::new();
    for image in images {
        if known(&image.sha256) || out.iter().any(|(sha, _)| *sha == image.sha256) {
            continue;
        }
        out.push((&image.sha256, image.soft_prompt.encode_to_vec()));
    }
    out
}
