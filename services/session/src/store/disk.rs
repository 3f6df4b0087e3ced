//! The disk store: one redb database file (`DIR/sessions.redb`). Every change is one write
//! transaction, durable (fsync) when it returns, so a tier killed at any moment restarts with
//! every acknowledged turn and nothing of an unfinished one. redb calls block, so they run on
//! tokio's blocking pool.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use blip2_proto::v1::{SessionSummary, SoftPrompt};
use prost::Message;
use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition, WriteTransaction};

use super::codec::{self, ImageRow, MetaRecord, TurnRow};
use super::{expired, unix_now_ms, Limits, Session, SessionStore, StoreError, TurnCommit};

/// session id -> [`MetaRecord`].
const SESSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("sessions");
/// (session id, turn index) -> [`TurnRow`].
const TURNS: TableDefinition<(&str, u32), &[u8]> = TableDefinition::new("turns");
/// (session id, image index) -> [`ImageRow`].
const IMAGES: TableDefinition<(&str, u32), &[u8]> = TableDefinition::new("images");
/// (session id, image sha256) -> `SoftPrompt`.
const SOFT_PROMPTS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("soft_prompts");
/// (owner, session id): the sessions of each owner.
const OWNED: TableDefinition<(&str, &str), ()> = TableDefinition::new("owned");

/// Sessions in a redb file.
#[derive(Clone)]
pub struct DiskStore {
    inner: Arc<Inner>,
}

struct Inner {
    db: Database,
    ttl: Option<Duration>,
    path: PathBuf,
}

impl std::fmt::Debug for DiskStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskStore")
            .field("path", &self.inner.path)
            .field("ttl", &self.inner.ttl)
            .finish()
    }
}

type Result<T> = std::result::Result<T, StoreError>;

fn backend(error: impl std::fmt::Display) -> StoreError {
    StoreError::backend(error)
}

impl DiskStore {
    /// Opens (or creates) `dir/sessions.redb`, creating `dir` if needed; sessions expire after
    /// `ttl` without use (`None`: never).
    pub fn open(dir: &Path, ttl: Option<Duration>) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::Backend(format!("creating {}: {e}", dir.display())))?;
        let path = dir.join("sessions.redb");
        let db = Database::create(&path)
            .map_err(|e| StoreError::Backend(format!("opening {}: {e}", path.display())))?;
        // Every table exists from the start, so readers never meet a missing one.
        let txn = db.begin_write().map_err(backend)?;
        txn.open_table(SESSIONS).map_err(backend)?;
        txn.open_table(TURNS).map_err(backend)?;
        txn.open_table(IMAGES).map_err(backend)?;
        txn.open_table(SOFT_PROMPTS).map_err(backend)?;
        txn.open_table(OWNED).map_err(backend)?;
        txn.commit().map_err(backend)?;
        Ok(Self {
            inner: Arc::new(Inner { db, ttl, path }),
        })
    }

    /// Runs `work` on the blocking pool.
    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Inner) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || work(&inner))
            .await
            .map_err(|e| StoreError::Backend(format!("a store task died: {e}")))?
    }
}

impl Inner {
    fn write<T>(&self, work: impl FnOnce(&WriteTransaction) -> Result<T>) -> Result<T> {
        let txn = self.db.begin_write().map_err(backend)?;
        let value = work(&txn)?;
        txn.commit().map_err(backend)?;
        Ok(value)
    }

    /// Removes session `id` and everything of it; `false` if there was none.
    fn remove(txn: &WriteTransaction, id: &str) -> Result<bool> {
        let meta = {
            let mut sessions = txn.open_table(SESSIONS).map_err(backend)?;
            let removed = sessions.remove(id).map_err(backend)?;
            match removed {
                Some(bytes) => Some(codec::decode::<MetaRecord>("session", bytes.value())?),
                None => None,
            }
        };
        let Some(meta) = meta else {
            return Ok(false);
        };
        let mut turns = txn.open_table(TURNS).map_err(backend)?;
        for index in 0..meta.turns {
            turns.remove((id, index)).map_err(backend)?;
        }
        let mut images = txn.open_table(IMAGES).map_err(backend)?;
        for index in 0..meta.images {
            images.remove((id, index)).map_err(backend)?;
        }
        let mut soft_prompts = txn.open_table(SOFT_PROMPTS).map_err(backend)?;
        let shas: Vec<String> = {
            let mut shas = Vec::new();
            for entry in soft_prompts.range((id, "")..).map_err(backend)? {
                let (key, _) = entry.map_err(backend)?;
                let (session, sha) = key.value();
                if session != id {
                    break;
                }
                shas.push(sha.to_string());
            }
            shas
        };
        for sha in &shas {
            soft_prompts.remove((id, sha.as_str())).map_err(backend)?;
        }
        let mut owned = txn.open_table(OWNED).map_err(backend)?;
        owned.remove((meta.owner.as_str(), id)).map_err(backend)?;
        Ok(true)
    }

    /// Removes every expired session; returns how many.
    fn purge(&self, txn: &WriteTransaction) -> Result<usize> {
        if self.ttl.is_none() {
            return Ok(0);
        }
        let now = unix_now_ms();
        let expired_ids: Vec<String> = {
            let sessions = txn.open_table(SESSIONS).map_err(backend)?;
            let mut ids = Vec::new();
            for entry in sessions.iter().map_err(backend)? {
                let (key, value) = entry.map_err(backend)?;
                let meta: MetaRecord = codec::decode("session", value.value())?;
                if expired(self.ttl, meta.last_used_ms, now) {
                    ids.push(key.value().to_string());
                }
            }
            ids
        };
        for id in &expired_ids {
            Self::remove(txn, id)?;
        }
        Ok(expired_ids.len())
    }

    fn owned_count(txn: &WriteTransaction, owner: &str) -> Result<usize> {
        let owned = txn.open_table(OWNED).map_err(backend)?;
        let mut count = 0;
        for entry in owned.range((owner, "")..).map_err(backend)? {
            let (key, _) = entry.map_err(backend)?;
            if key.value().0 != owner {
                break;
            }
            count += 1;
        }
        Ok(count)
    }

    fn session_count(txn: &WriteTransaction) -> Result<usize> {
        let sessions = txn.open_table(SESSIONS).map_err(backend)?;
        Ok(sessions.len().map_err(backend)? as usize)
    }

    /// Whether `limits` leave room for one more session of `owner`.
    fn has_room(txn: &WriteTransaction, owner: &str, limits: Limits) -> Result<Option<StoreError>> {
        if Self::session_count(txn)? >= limits.max_sessions {
            return Ok(Some(StoreError::too_many(limits.max_sessions)));
        }
        if limits.max_per_owner > 0 && Self::owned_count(txn, owner)? >= limits.max_per_owner {
            return Ok(Some(StoreError::too_many_for_key(limits.max_per_owner)));
        }
        Ok(None)
    }

    fn create(&self, session: &Session, limits: Limits) -> Result<()> {
        self.write(|txn| {
            if Self::has_room(txn, &session.owner, limits)?.is_some() {
                self.purge(txn)?;
                if let Some(refusal) = Self::has_room(txn, &session.owner, limits)? {
                    return Err(refusal);
                }
            }
            let id = session.session_id.as_str();
            let mut meta = codec::meta(session);
            meta.last_used_ms = unix_now_ms();
            {
                let mut sessions = txn.open_table(SESSIONS).map_err(backend)?;
                if sessions.get(id).map_err(backend)?.is_some() {
                    return Err(StoreError::Conflict(format!(
                        "session `{id}` exists already"
                    )));
                }
                sessions
                    .insert(id, meta.encode_to_vec().as_slice())
                    .map_err(backend)?;
            }
            let mut turns = txn.open_table(TURNS).map_err(backend)?;
            for (index, turn) in session.turns.iter().enumerate() {
                let row = codec::turn_row(turn).encode_to_vec();
                turns
                    .insert((id, index as u32), row.as_slice())
                    .map_err(backend)?;
            }
            Self::add_images(txn, id, 0, &session.images)?;
            let mut owned = txn.open_table(OWNED).map_err(backend)?;
            owned
                .insert((session.owner.as_str(), id), ())
                .map_err(backend)?;
            Ok(())
        })
    }

    /// Writes `images` from index `first` on, with the soft prompts the session lacks.
    fn add_images(
        txn: &WriteTransaction,
        id: &str,
        first: u32,
        images: &[super::ImageRecord],
    ) -> Result<()> {
        let mut rows = txn.open_table(IMAGES).map_err(backend)?;
        for (offset, image) in images.iter().enumerate() {
            let row = codec::image_row(image).encode_to_vec();
            rows.insert((id, first + offset as u32), row.as_slice())
                .map_err(backend)?;
        }
        let mut soft_prompts = txn.open_table(SOFT_PROMPTS).map_err(backend)?;
        let known = |sha: &str| {
            soft_prompts
                .get((id, sha))
                .map(|found| found.is_some())
                .unwrap_or(false)
        };
        let new = codec::new_soft_prompts(images, known);
        for (sha, bytes) in new {
            soft_prompts
                .insert((id, sha), bytes.as_slice())
                .map_err(backend)?;
        }
        Ok(())
    }

    fn load(&self, id: &str) -> Result<Option<Session>> {
        let txn = self.db.begin_read().map_err(backend)?;
        let sessions = txn.open_table(SESSIONS).map_err(backend)?;
        let Some(meta) = sessions.get(id).map_err(backend)? else {
            return Ok(None);
        };
        let meta: MetaRecord = codec::decode("session", meta.value())?;
        if expired(self.ttl, meta.last_used_ms, unix_now_ms()) {
            drop(sessions);
            drop(txn);
            self.write(|txn| Self::remove(txn, id))?;
            return Ok(None);
        }
        let turns_table = txn.open_table(TURNS).map_err(backend)?;
        let mut turns = Vec::with_capacity(meta.turns as usize);
        for index in 0..meta.turns {
            let row = turns_table
                .get((id, index))
                .map_err(backend)?
                .ok_or_else(|| StoreError::Backend(format!("session `{id}` lacks turn {index}")))?;
            turns.push(codec::decode::<TurnRow>("turn", row.value())?);
        }
        let images_table = txn.open_table(IMAGES).map_err(backend)?;
        let mut images = Vec::with_capacity(meta.images as usize);
        for index in 0..meta.images {
            let row = images_table
                .get((id, index))
                .map_err(backend)?
                .ok_or_else(|| {
                    StoreError::Backend(format!("session `{id}` lacks image {index}"))
                })?;
            images.push(codec::decode::<ImageRow>("image", row.value())?);
        }
        let soft_prompts_table = txn.open_table(SOFT_PROMPTS).map_err(backend)?;
        let mut soft_prompts = HashMap::new();
        for entry in soft_prompts_table.range((id, "")..).map_err(backend)? {
            let (key, value) = entry.map_err(backend)?;
            let (session, sha) = key.value();
            if session != id {
                break;
            }
            let soft_prompt: SoftPrompt = codec::decode("soft prompt", value.value())?;
            soft_prompts.insert(sha.to_string(), Arc::new(soft_prompt));
        }
        codec::session(meta, turns, images, &soft_prompts).map(Some)
    }

    /// Reads session `id`'s metadata in `txn` (`None`: none, or expired).
    fn meta(&self, txn: &WriteTransaction, id: &str) -> Result<Option<MetaRecord>> {
        let sessions = txn.open_table(SESSIONS).map_err(backend)?;
        let Some(bytes) = sessions.get(id).map_err(backend)? else {
            return Ok(None);
        };
        let meta: MetaRecord = codec::decode("session", bytes.value())?;
        if expired(self.ttl, meta.last_used_ms, unix_now_ms()) {
            return Ok(None);
        }
        Ok(Some(meta))
    }

    fn put_meta(txn: &WriteTransaction, meta: &MetaRecord) -> Result<()> {
        let mut sessions = txn.open_table(SESSIONS).map_err(backend)?;
        sessions
            .insert(meta.session_id.as_str(), meta.encode_to_vec().as_slice())
            .map_err(backend)?;
        Ok(())
    }

    fn commit(&self, commit: &TurnCommit) -> Result<()> {
        let id = commit.session_id.as_str();
        self.write(|txn| {
            let Some(mut meta) = self.meta(txn, id)? else {
                return Err(StoreError::NotFound(id.to_string()));
            };
            if meta.turns as usize != commit.expected_turns {
                return Err(StoreError::conflict(id));
            }
            {
                let mut turns = txn.open_table(TURNS).map_err(backend)?;
                let row = codec::turn_row(&commit.turn).encode_to_vec();
                turns
                    .insert((id, meta.turns), row.as_slice())
                    .map_err(backend)?;
            }
            Self::add_images(txn, id, meta.images, &commit.images)?;
            meta.turns += 1;
            meta.images += commit.images.len() as u32;
            meta.last_used_ms = unix_now_ms();
            Self::put_meta(txn, &meta)
        })
    }

    fn touch(&self, id: &str) -> Result<()> {
        self.write(|txn| {
            if let Some(mut meta) = self.meta(txn, id)? {
                meta.last_used_ms = unix_now_ms();
                Self::put_meta(txn, &meta)?;
            }
            Ok(())
        })
    }

    fn list(&self, owner: &str) -> Result<Vec<SessionSummary>> {
        let txn = self.db.begin_read().map_err(backend)?;
        let owned = txn.open_table(OWNED).map_err(backend)?;
        let sessions = txn.open_table(SESSIONS).map_err(backend)?;
        let now = unix_now_ms();
        let mut list = Vec::new();
        for entry in owned.range((owner, "")..).map_err(backend)? {
            let (key, _) = entry.map_err(backend)?;
            let (session_owner, id) = key.value();
            if session_owner != owner {
                break;
            }
            let Some(bytes) = sessions.get(id).map_err(backend)? else {
                continue;
            };
            let meta: MetaRecord = codec::decode("session", bytes.value())?;
            if expired(self.ttl, meta.last_used_ms, now) {
                continue;
            }
            list.push(SessionSummary {
                session_id: meta.session_id,
                turns: meta.turns,
                created_at: meta.created_at,
            });
        }
        list.sort_by(|a, b| (a.created_at, &a.session_id).cmp(&(b.created_at, &b.session_id)));
        Ok(list)
    }
}

#[tonic::async_trait]
impl SessionStore for DiskStore {
    async fn create(&self, session: &Session, limits: Limits) -> Result<()> {
        let session = session.clone();
        self.blocking(move |inner| inner.create(&session, limits))
            .await
    }

    async fn load(&self, session_id: &str) -> Result<Option<Session>> {
        let id = session_id.to_string();
        self.blocking(move |inner| inner.load(&id)).await
    }

    async fn owner(&self, session_id: &str) -> Result<Option<String>> {
        let id = session_id.to_string();
        self.blocking(move |inner| {
            let txn = inner.db.begin_read().map_err(backend)?;
            let sessions = txn.open_table(SESSIONS).map_err(backend)?;
            let Some(bytes) = sessions.get(id.as_str()).map_err(backend)? else {
                return Ok(None);
            };
            let meta: MetaRecord = codec::decode("session", bytes.value())?;
            Ok((!expired(inner.ttl, meta.last_used_ms, unix_now_ms())).then_some(meta.owner))
        })
        .await
    }

    async fn touch(&self, session_id: &str) -> Result<()> {
        let id = session_id.to_string();
        self.blocking(move |inner| inner.touch(&id)).await
    }

    async fn commit(&self, commit: &TurnCommit) -> Result<()> {
        let commit = commit.clone();
        self.blocking(move |inner| inner.commit(&commit)).await
    }

    async fn delete(&self, session_id: &str) -> Result<bool> {
        let id = session_id.to_string();
        self.blocking(move |inner| inner.write(|txn| Inner::remove(txn, &id)))
            .await
    }

    async fn list(&self, owner: &str) -> Result<Vec<SessionSummary>> {
        let owner = owner.to_string();
        self.blocking(move |inner| inner.list(&owner)).await
    }

    async fn count(&self) -> Result<usize> {
        self.blocking(|inner| {
            let txn = inner.db.begin_read().map_err(backend)?;
            let sessions = txn.open_table(SESSIONS).map_err(backend)?;
            Ok(sessions.len().map_err(backend)? as usize)
        })
        .await
    }

    async fn sweep(&self) -> Result<usize> {
        if self.inner.ttl.is_none() {
            return Ok(0);
        }
        self.blocking(|inner| inner.write(|txn| inner.purge(txn)))
            .await
    }
}
