//! The in-memory store: one map behind a mutex (held for a copy or a push, never across an
//! `.await`). Nothing survives the process; for tests and for a tier without `--data-dir`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use blip2_proto::v1::SessionSummary;

use super::{expired, unix_now_ms, Limits, Session, SessionStore, StoreError, TurnCommit};

/// Sessions in memory.
#[derive(Debug, Default)]
pub struct MemoryStore {
    sessions: Mutex<HashMap<String, Session>>,
    ttl: Option<Duration>,
}

impl MemoryStore {
    /// A store whose sessions expire after `ttl` without use (`None`: never).
    pub fn new(ttl: Option<Duration>) -> Self {
        Self {
            sessions: Mutex::default(),
            ttl,
        }
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        // A panic while holding the lock leaves a consistent map (every change is one call).
        self.sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Drops the expired sessions of `sessions`; returns how many.
    fn purge(&self, sessions: &mut HashMap<String, Session>) -> usize {
        let now = unix_now_ms();
        let before = sessions.len();
        sessions.retain(|_, session| !expired(self.ttl, session.last_used_ms, now));
        before - sessions.len()
    }
}

#[tonic::async_trait]
impl SessionStore for MemoryStore {
    async fn create(&self, session: &Session, limits: Limits) -> Result<(), StoreError> {
        let mut sessions = self.sessions();
        self.purge(&mut sessions);
        if sessions.len() >= limits.max_sessions {
            return Err(StoreError::too_many(limits.max_sessions));
        }
        if limits.max_per_owner > 0
            && sessions
                .values()
                .filter(|s| s.owner == session.owner)
                .count()
                >= limits.max_per_owner
        {
            return Err(StoreError::too_many_for_key(limits.max_per_owner));
        }
        if sessions.contains_key(&session.session_id) {
            return Err(StoreError::Conflict(format!(
                "session `{}` exists already",
                session.session_id
            )));
        }
        let mut session = session.clone();
        session.last_used_ms = unix_now_ms();
        sessions.insert(session.session_id.clone(), session);
        Ok(())
    }

    async fn load(&self, session_id: &str) -> Result<Option<Session>, StoreError> {
        let mut sessions = self.sessions();
        let Some(session) = sessions.get(session_id) else {
            return Ok(None);
        };
        if expired(self.ttl, session.last_used_ms, unix_now_ms()) {
            sessions.remove(session_id);
            return Ok(None);
        }
        Ok(Some(session.clone()))
    }

    async fn owner(&self, session_id: &str) -> Result<Option<String>, StoreError> {
        let sessions = self.sessions();
        Ok(sessions
            .get(session_id)
            .filter(|session| !expired(self.ttl, session.last_used_ms, unix_now_ms()))
            .map(|session| session.owner.clone()))
    }

    async fn touch(&self, session_id: &str) -> Result<(), StoreError> {
        if let Some(session) = self.sessions().get_mut(session_id) {
            session.last_used_ms = unix_now_ms();
        }
        Ok(())
    }

    async fn commit(&self, commit: &TurnCommit) -> Result<(), StoreError> {
        let mut sessions = self.sessions();
        let now = unix_now_ms();
        let session = match sessions.get_mut(&commit.session_id) {
            Some(session) if !expired(self.ttl, session.last_used_ms, now) => session,
            _ => return Err(StoreError::NotFound(commit.session_id.clone())),
        };
        if session.turns.len() != commit.expected_turns {
            return Err(StoreError::conflict(&commit.session_id));
        }
        session.images.extend(commit.images.iter().cloned());
        session.turns.push(commit.turn.clone());
        session.last_used_ms = now;
        Ok(())
    }

    async fn delete(&self, session_id: &str) -> Result<bool, StoreError> {
        Ok(self.sessions().remove(session_id).is_some())
    }

    async fn list(&self, owner: &str) -> Result<Vec<SessionSummary>, StoreError> {
        let mut sessions = self.sessions();
        self.purge(&mut sessions);
        let mut list: Vec<_> = sessions
            .values()
            .filter(|session| session.owner == owner)
            .map(Session::summary)
            .collect();
        list.sort_by(|a, b| (a.created_at, &a.session_id).cmp(&(b.created_at, &b.session_id)));
        Ok(list)
    }

    async fn count(&self) -> Result<usize, StoreError> {
        Ok(self.sessions().len())
    }

    async fn sweep(&self) -> Result<usize, StoreError> {
        let mut sessions = self.sessions();
        Ok(self.purge(&mut sessions))
    }
}
