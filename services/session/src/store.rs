//! Conversation state: the [`SessionStore`] trait with its three implementations (in memory,
//! [`DiskStore`] on redb, [`RedisStore`] for several session replicas), the session snapshot
//! a turn works on, and the bounded store of uploaded images waiting for the turn that uses them.
//!
//! A store keeps each session's metadata (owner, template, defaults, created and last-used
//! times), its committed turns (with their idempotency keys) and its images with their soft
//! prompts (the bytes, once per content). A turn is written by one atomic, conditional
//! [`SessionStore::commit`]: it applies only when the session still has the turn count the
//! turn was prepared against, so two session replicas running turns on one session cannot
//! interleave them (the loser gets [`StoreError::Conflict`]). Within one replica a per-session
//! lock (in the tier) keeps turns in order before they reach the store.
//!
//! Idle sessions expire after the store's TTL: a read of an expired session finds nothing (and
//! removes it), [`SessionStore::sweep`] removes the rest periodically; Redis expires its keys
//! itself (PEXPIRE on every write).

mod codec;
mod disk;
mod memory;
mod redis_store;

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

pub use disk::DiskStore;
pub use memory::MemoryStore;
pub use redis_store::RedisStore;

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

/// Unix milliseconds now (last-used times and expiry).
pub fn unix_now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Why a store refused a change or could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No such session (or it expired).
    #[error("no session `{0}`")]
    NotFound(String),
    /// The session changed since the turn was prepared (a turn committed elsewhere).
    #[error("{0}")]
    Conflict(String),
    /// A session limit (in all, or per API key).
    #[error("{0}")]
    Limit(String),
    /// The backend failed (I/O, Redis unreachable, a corrupt record).
    #[error("session store: {0}")]
    Backend(String),
}

impl StoreError {
    pub(crate) fn backend(error: impl std::fmt::Display) -> Self {
        Self::Backend(error.to_string())
    }

    fn conflict(session_id: &str) -> Self {
        Self::Conflict(format!(
            "session `{session_id}` got another turn while this one ran (another request on \
             the same session); send the turn again"
        ))
    }

    fn too_many(limit: usize) -> Self {
        Self::Limit(format!(
            "the tier holds its limit of {limit} sessions; delete one first"
        ))
    }

    fn too_many_for_key(limit: usize) -> Self {
        Self::Limit(format!(
            "this API key holds its limit of {limit} sessions (`--max-sessions-per-key`); \
             delete one first"
        ))
    }
}

/// Limits checked atomically with a session's creation.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Sessions in the store, at most.
    pub max_sessions: usize,
    /// Sessions of one owner, at most; 0: no limit.
    pub max_per_owner: usize,
}

/// A finished turn to append to a session.
#[derive(Debug, Clone)]
pub struct TurnCommit {
    pub session_id: String,
    /// The session's owner (the index of its sessions is per owner).
    pub owner: String,
    /// Turns the session had when the turn was prepared: the commit applies only if it still has
    /// exactly these.
    pub expected_turns: usize,
    pub turn: TurnRecord,
    /// The images attached at this turn, with their soft prompts.
    pub images: Vec<ImageRecord>,
}

/// Where sessions live. Every method is atomic on its own; see the module documentation.
#[tonic::async_trait]
pub trait SessionStore: Send + Sync + 'static {
    /// Stores a new session (with the turns and images it starts with) unless a limit of
    /// `limits` is reached.
    async fn create(&self, session: &Session, limits: Limits) -> Result<(), StoreError>;
    /// The session with its turns and images, or `None` if there is none (or it expired).
    async fn load(&self, session_id: &str) -> Result<Option<Session>, StoreError>;
    /// The owner of the session, or `None` if there is none (or it expired): a cheap check
    /// that reads no turns or soft prompts.
    async fn owner(&self, session_id: &str) -> Result<Option<String>, StoreError>;
    /// Marks the session used now (postpones its expiry).
    async fn touch(&self, session_id: &str) -> Result<(), StoreError>;
    /// Appends a finished turn, atomically and only if the session still has
    /// `expected_turns` turns ([`StoreError::Conflict`] otherwise).
    async fn commit(&self, commit: &TurnCommit) -> Result<(), StoreError>;
    /// Removes a session; `false` if there was none.
    async fn delete(&self, session_id: &str) -> Result<bool, StoreError>;
    /// The unexpired sessions of `owner`, oldest first.
    async fn list(&self, owner: &str) -> Result<Vec<SessionSummary>, StoreError>;
    /// Sessions held now.
    async fn count(&self) -> Result<usize, StoreError>;
    /// Removes the sessions idle longer than the TTL; returns how many it removed.
    async fn sweep(&self) -> Result<usize, StoreError>;
}

/// Whether a session last used at `last_used_ms` has expired at `now_ms`.
pub(crate) fn expired(ttl: Option<Duration>, last_used_ms: i64, now_ms: i64) -> bool {
    ttl.is_some_and(|ttl| now_ms.saturating_sub(last_used_ms) > ttl.as_millis() as i64)
}

/// A finished turn.
#[derive(Debug, Clone, PartialEq)]
pub struct TurnRecord {
    pub turn_id: String,
    pub question: String,
    pub answer: String,
    /// Ids of the images attached at this turn, in order.
    pub image_ids: Vec<String>,
    pub finish_reason: FinishReason,
    pub usage: Option<Usage>,
    /// The client's idempotency key of the Chat that made it ("" if none).
    pub idempotency_key: String,
}

/// An image of a session, with its soft prompt as the vision tier sent it: later turns send
/// this again and never re-encode the image.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageRecord {
    pub image_id: String,
    pub sha256: String,
    /// Index of the turn it was attached at.
    pub turn_index: u32,
    pub soft_prompt: Arc<SoftPrompt>,
}

/// One conversation, as a store holds it (a snapshot: changes go through the store).
#[derive(Debug, Clone, PartialEq)]
pub struct Session {
    pub session_id: String,
    /// Hash of the API key that created it ("" when the tier takes no keys).
    pub owner: String,
    pub created_at: i64,
    /// Unix milliseconds of the last turn or read; the TTL counts from here.
    pub last_used_ms: i64,
    pub template: PromptTemplate,
    pub default_params: GenerationParams,
    pub turns: Vec<TurnRecord>,
    pub images: Vec<ImageRecord>,
}

impl Session {
    pub fn new(owner: String, template: PromptTemplate, default_params: GenerationParams) -> Self {
        Self {
            session_id: random_id(),
            owner,
            created_at: unix_now(),
            last_used_ms: unix_now_ms(),
            template,
            default_params,
            turns: Vec::new(),
            images: Vec::new(),
        }
    }

    /// The turn committed with idempotency key `key`, if any.
    pub fn turn_with_key(&self, key: &str) -> Option<&TurnRecord> {
        if key.is_empty() {
            return None;
        }
        self.turns.iter().find(|turn| turn.idempotency_key == key)
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
    /// Hash of the API key that uploaded it: no other key may use it.
    pub owner: String,
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
        owner: String,
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
                owner,
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

    /// The upload `id`, if it exists and `owner`'s session `session_id` may use it.
    pub fn get(&self, id: &str, session_id: &str, owner: &str) -> Option<Upload> {
        let upload = self.uploads.get(id)?;
        if upload.owner != owner {
            return None;
        }
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
        let free = store.insert(vec![1], "a".into(), None, "k".into()).unwrap();
        let owned = store
            .insert(vec![2, 3], "b".into(), Some("s1".into()), "k".into())
            .unwrap();
        assert!(store.get(&free, "anyone", "k").is_some());
        assert!(store.get(&free, "anyone", "other key").is_none());
        assert!(store.get(&owned, "s1", "k").is_some());
        assert!(store.get(&owned, "s1", "other key").is_none());
        assert!(store.get(&owned, "s2", "k").is_none());
        store.remove(&owned);
        assert_eq!(store.len(), 1);
        assert_eq!(store.bytes.load(Ordering::Relaxed), 1);
    }
}
