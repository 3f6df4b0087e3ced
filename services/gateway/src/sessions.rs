//! Which session holds which conversation: a bounded map (least recently used out first, and
//! entries unused for the TTL) from a conversation's [`Key`] to the session whose committed
//! turns are exactly that conversation.
//!
//! A request *takes* its prefix's entry for the length of its turn, so two requests that send
//! the same history at once (a regenerate, a branch) never both append to one session: the
//! second misses and gets a session of its own. The [`Claim`] puts an entry back when the turn
//! ends: the new conversation's key once the turn was recorded, the old key when the turn
//! surely was not, and none when that is unknown (the client left while the answer was being
//! committed); a session no key leads to is deleted from the session tier.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::conversation::Key;

/// A session of the session tier, and the `authorization` to reach it with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRef {
    pub session_id: String,
    pub authorization: Option<String>,
}

#[derive(Debug)]
struct Entry {
    session: SessionRef,
    stamp: u64,
    used: Instant,
}

#[derive(Debug, Default)]
struct State {
    entries: HashMap<Key, Entry>,
    /// Entries by last use, oldest first.
    order: BTreeMap<u64, Key>,
    next_stamp: u64,
}

impl State {
    fn remove(&mut self, key: &Key) -> Option<Entry> {
        let entry = self.entries.remove(key)?;
        self.order.remove(&entry.stamp);
        Some(entry)
    }

    /// Drops entries unused for `ttl`, returning their sessions.
    fn purge_expired(&mut self, ttl: Duration, dropped: &mut Vec<SessionRef>) {
        while let Some((_, key)) = self.order.first_key_value() {
            let key = *key;
            let expired = self
                .entries
                .get(&key)
                .is_none_or(|entry| entry.used.elapsed() >= ttl);
            if !expired {
                break;
            }
            if let Some(entry) = self.remove(&key) {
                dropped.push(entry.session);
            } else {
                self.order.pop_first();
            }
        }
    }
}

/// The conversation map; its sessions that fall out must be deleted by the caller.
#[derive(Debug)]
pub struct ConversationMap {
    state: Mutex<State>,
    capacity: usize,
    ttl: Duration,
}

impl ConversationMap {
    pub fn new(capacity: usize, ttl: Duration) -> Self {
        Self {
            state: Mutex::default(),
            capacity: capacity.max(1),
            ttl,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves the map consistent (every change is one
        // insert or remove), so a poisoned lock is used as is.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes the session of `key` out of the map; also returns the sessions that expired.
    pub fn take(&self, key: &Key) -> (Option<SessionRef>, Vec<SessionRef>) {
        let mut dropped = Vec::new();
        let mut state = self.lock();
        state.purge_expired(self.ttl, &mut dropped);
        let taken = state.remove(key).map(|entry| entry.session);
        (taken, dropped)
    }

    /// Maps `key` to `session`; returns the sessions that fell out (least recently used, or
    /// one `key` led to before).
    pub fn insert(&self, key: Key, session: SessionRef) -> Vec<SessionRef> {
        let mut dropped = Vec::new();
        let mut state = self.lock();
        state.purge_expired(self.ttl, &mut dropped);
        if let Some(old) = state.remove(&key) {
            if old.session != session {
                dropped.push(old.session);
            }
        }
        while state.entries.len() >= self.capacity {
            let Some((_, oldest)) = state.order.pop_first() else {
                break;
            };
            if let Some(entry) = state.entries.remove(&oldest) {
                dropped.push(entry.session);
            }
        }
        let stamp = state.next_stamp;
        state.next_stamp += 1;
        state.order.insert(stamp, key);
        state.entries.insert(
            key,
            Entry {
                session,
                stamp,
                used: Instant::now(),
            },
        );
        dropped
    }

    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Deletes sessions of the session tier that no key leads to any more.
pub trait SessionReaper: Send + Sync + 'static {
    fn delete(&self, sessions: Vec<SessionRef>);
}

/// What is known of a claimed session's turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The turn may or may not have been recorded.
    Unknown,
    /// The session is as it was: its old key leads to it again.
    Unchanged,
    /// The turn was recorded: the new key leads to it.
    Recorded(Key),
    /// The session no longer exists in the session tier.
    Gone,
}

/// A session taken for one turn; see the module documentation for what dropping it does.
pub struct Claim {
    map: Arc<ConversationMap>,
    reaper: Arc<dyn SessionReaper>,
    pub session: SessionRef,
    prefix_key: Key,
    outcome: Outcome,
}

impl Claim {
    pub fn new(
        map: Arc<ConversationMap>,
        reaper: Arc<dyn SessionReaper>,
        session: SessionRef,
        prefix_key: Key,
    ) -> Self {
        Self {
            map,
            reaper,
            session,
            prefix_key,
            outcome: Outcome::Unknown,
        }
    }

    /// Records what is known of the turn now; dropping the claim acts on the last one.
    pub fn settle(&mut self, outcome: Outcome) {
        self.outcome = outcome;
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let session = self.session.clone();
        let dropped = match self.outcome {
            Outcome::Recorded(key) => self.map.insert(key, session),
            Outcome::Unchanged => self.map.insert(self.prefix_key, session),
            Outcome::Unknown => vec![session],
            Outcome::Gone => Vec::new(),
        };
        if !dropped.is_empty() {
            self.reaper.delete(dropped);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(id: &str) -> SessionRef {
        SessionRef {
            session_id: id.into(),
            authorization: None,
        }
    }

    #[derive(Default)]
    struct Recorder(Mutex<Vec<String>>);

    impl SessionReaper for Recorder {
        fn delete(&self, sessions: Vec<SessionRef>) {
            if let Ok(mut deleted) = self.0.lock() {
                deleted.extend(sessions.into_iter().map(|s| s.session_id));
            }
        }
    }

    #[test]
    fn least_recently_used_falls_out() {
        let map = ConversationMap::new(2, Duration::from_secs(60));
        assert!(map.insert([1; 32], session("a")).is_empty());
        assert!(map.insert([2; 32], session("b")).is_empty());
        let dropped = map.insert([3; 32], session("c"));
        assert_eq!(dropped, vec![session("a")]);
        assert_eq!(map.take(&[2; 32]).0, Some(session("b")));
        assert_eq!(map.take(&[2; 32]).0, None);
        assert_eq!(map.len(), 1);
    }

    #[test]
    fn expired_entries_are_dropped() {
        let map = ConversationMap::new(8, Duration::ZERO);
        map.insert([1; 32], session("a"));
        let (taken, dropped) = map.take(&[1; 32]);
        assert_eq!(taken, None);
        assert_eq!(dropped, vec![session("a")]);
        assert!(map.is_empty());
    }

    #[test]
    fn claims_put_the_right_key_back() {
        let map = Arc::new(ConversationMap::new(8, Duration::from_secs(60)));
        let recorder = Arc::new(Recorder::default());
        let reaper: Arc<dyn SessionReaper> = recorder.clone();

        let mut claim = Claim::new(map.clone(), reaper.clone(), session("a"), [1; 32]);
        claim.settle(Outcome::Recorded([2; 32]));
        drop(claim);
        assert_eq!(map.take(&[2; 32]).0, Some(session("a")));

        let mut claim = Claim::new(map.clone(), reaper.clone(), session("b"), [3; 32]);
        claim.settle(Outcome::Unchanged);
        drop(claim);
        assert_eq!(map.take(&[3; 32]).0, Some(session("b")));

        drop(Claim::new(map.clone(), reaper, session("c"), [4; 32]));
        assert!(map.is_empty());
        let deleted = recorder.0.lock().map(|d| d.clone()).unwrap_or_default();
        assert_eq!(deleted, vec!["c".to_string()]);
    }
}
