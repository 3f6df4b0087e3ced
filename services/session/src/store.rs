//! Conversation state: the sessions (a DashMap of id -> session), and the bounded store of
//! uploaded images waiting for the turn that uses them.
//!
//! A DashMap shard lock is only ever held for a copy or a push, never across an `.await`; the
//! per-session `turn_lock` (a tokio Mutex held for a whole turn) serialises turns of one session.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use blip2_proto::v1::{
    FinishReason, GenerationParams, PromptTemplate, Session as SessionMessage, SessionImage,
    SessionSummary, SoftPrompt, Turn, Usage,
};
use dashmap::DashMap;

use crate::error::SessionError;
use crate::prompt::PastTurn;

/// 128 random bits as 32 lowercase hex characters (session, turn and image ids).
pub fn random_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Unix seconds now.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// A finished turn.
#[derive(Debug, Clone)]
pub struct TurnRecord {
    pub turn_id: String,
    pub question: String,
    pub answer: String,
    /// Ids of the images attached at this turn, in order.
    pub image_ids: Vec<String>,
    pub finish_reason: FinishReason,
    pub usage: Option<Usage>,
}

/// An image of a session, with its soft prompt as the vision tier sent it: later turns send
/// this again and never re-encode the image.
#[derive(Debug, Clone)]
pub struct ImageRecord {
    pub image_id: String,
    pub sha256: String,
    /// Index of the turn it was attached at.
    pub turn_index: u32,
    pub soft_prompt: Arc<SoftPrompt>,
}

/// One conversation.
#[derive(Debug)]
pub struct Session {
    pub session_id: String,
    pub created_at: i64,
    pub template: PromptTemplate,
    pub default_params: GenerationParams,
    pub turns: Vec<TurnRecord>,
    pub images: Vec<ImageRecord>,
    /// Held for a whole turn so the turns of a session stay in order.
    pub turn_lock: Arc<tokio::sync::Mutex<()>>,
}

impl Session {
    pub fn new(template: PromptTemplate, default_params: GenerationParams) -> Self {
        Self {
            session_id: random_id(),
            created_at: unix_now(),
            template,
            default_params,
            turns: Vec::new(),
            images: Vec::new(),
            turn_lock: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    /// The session as the API shows it.
    pub fn to_message(&self) -> SessionMessage {
        SessionMessage {
            session_id: self.session_id.clone(),
            turns: self
                .turns
                .iter()
                .map(|turn| Turn {
                    turn_id: turn.turn_id.clone(),
                    question: turn.question.clone(),
                    answer: turn.answer.clone(),
                    image_ids: turn.image_ids.clone(),
                    finish_reason: turn.finish_reason as i32,
                    usage: turn.usage,
                })
                .collect(),
            images: self
                .images
                .iter()
                .map(|image| SessionImage {
                    image_id: image.image_id.clone(),
                    sha256: image.sha256.clone(),
                    turn_index: image.turn_index,
                })
                .collect(),
            template: Some(self.template.clone()),
            default_params: Some(self.default_params.clone()),
            created_at: self.created_at,
        }
    }

    pub fn summary(&self) -> SessionSummary {
        SessionSummary {
            session_id: self.session_id.clone(),
            turns: self.turns.len() as u32,
            created_at: self.created_at,
        }
    }

    /// The finished turns for prompt assembly: question, answer, sha256 of their images.
    pub fn past_turns(&self) -> Vec<PastTurn> {
        self.turns
            .iter()
            .enumerate()
            .map(|(index, turn)| {
                let images = self
                    .images
                    .iter()
                    .filter(|image| image.turn_index as usize == index)
                    .map(|image| image.sha256.clone())
                    .collect();
                (turn.question.clone(), turn.answer.clone(), images)
            })
            .collect()
    }

    /// The cached soft prompt of an image this session already has.
    pub fn soft_prompt(&self, sha256: &str) -> Option<Arc<SoftPrompt>> {
        self.images
            .iter()
            .find(|image| image.sha256 == sha256)
            .map(|image| image.soft_prompt.clone())
    }
}

/// An uploaded image waiting to be used by a turn.
#[derive(Debug, Clone)]
pub struct Upload {
    pub data: Arc<Vec<u8>>,
    pub sha256: String,
    /// The session it was uploaded for, if the client named one: no other session may use it.
    pub session_id: Option<String>,
    created: Instant,
}

/// Uploads at most this many images at once...
const UPLOAD_STORE_MAX_IMAGES: usize = 1024;
/// ...holding at most these many bytes.
const UPLOAD_STORE_MAX_BYTES: usize = 1 << 30;
/// An upload no turn used for this long is dropped when room is needed.
const UPLOAD_TTL: Duration = Duration::from_secs(3600);

/// Uploaded images, bounded in count and bytes, kept until a turn that uses them commits (or
/// until they expire).
#[derive(Debug, Default)]
pub struct UploadStore {
    uploads: DashMap<String, Upload>,
    bytes: AtomicUsize,
}

impl UploadStore {
    /// Stores an upload, returning its id; RESOURCE_EXHAUSTED when the store is full of
    /// unexpired uploads.
    pub fn insert(
        &self,
        data: Vec<u8>,
        sha256: String,
        session_id: Option<String>,
    ) -> Result<String, SessionError> {
        let size = data.len();
        if !self.has_room(size) {
            self.purge_expired();
        }
        if !self.has_room(size) {
            return Err(SessionError::ResourceExhausted(format!(
                "the upload store is full ({} images, {} bytes); use or wait for uploaded images",
                self.uploads.len(),
                self.bytes.load(Ordering::Relaxed)
            )));
        }
        let id = random_id();
        self.bytes.fetch_add(size, Ordering::Relaxed);
        self.uploads.insert(
            id.clone(),
            Upload {
                data: Arc::new(data),
                sha256,
                session_id,
                created: Instant::now(),
            },
        );
        Ok(id)
    }

    fn has_room(&self, size: usize) -> bool {
        self.uploads.len() < UPLOAD_STORE_MAX_IMAGES
            && self.bytes.load(Ordering::Relaxed).saturating_add(size) <= UPLOAD_STORE_MAX_BYTES
    }

    fn purge_expired(&self) {
        let expired: Vec<String> = self
            .uploads
            .iter()
            .filter(|entry| entry.created.elapsed() > UPLOAD_TTL)
            .map(|entry| entry.key().clone())
            .collect();
        for id in expired {
            self.remove(&id);
        }
    }

    /// The upload `id`, if it exists and `session_id` may use it.
    pub fn get(&self, id: &str, session_id: &str) -> Option<Upload> {
        let upload = self.uploads.get(id)?;
        match &upload.session_id {
            Some(owner) if owner != session_id => None,
            _ => Some(upload.clone()),
        }
    }

    pub fn remove(&self, id: &str) {
        if let Some((_, upload)) = self.uploads.remove(id) {
            self.bytes.fetch_sub(upload.data.len(), Ordering::Relaxed);
        }
    }

    /// Drops the uploads made for a deleted session.
    pub fn remove_session(&self, session_id: &str) {
        let owned: Vec<String> = self
            .uploads
            .iter()
            .filter(|entry| entry.session_id.as_deref() == Some(session_id))
            .map(|entry| entry.key().clone())
            .collect();
        for id in owned {
            self.remove(&id);
        }
    }

    pub fn len(&self) -> usize {
        self.uploads.len()
    }

    pub fn is_empty(&self) -> bool {
        self.uploads.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_32_hex() {
        let id = random_id();
        assert_eq!(id.len(), 32);
        assert!(id
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_uppercase()));
        assert_ne!(id, random_id());
    }

    #[test]
    fn uploads_belong_to_their_session() {
        let store = UploadStore::default();
        let free = store.insert(vec![1], "a".into(), None).unwrap();
        let owned = store
            .insert(vec![2, 3], "b".into(), Some("s1".into()))
            .unwrap();
        assert!(store.get(&free, "anyone").is_some());
        assert!(store.get(&owned, "s1").is_some());
        assert!(store.get(&owned, "s2").is_none());
        store.remove(&owned);
        assert_eq!(store.len(), 1);
        assert_eq!(store.bytes.load(Ordering::Relaxed), 1);
    }
}
