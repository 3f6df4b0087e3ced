//! The Redis store, shared by several session replicas. Each change is one Lua script, so it
//! is atomic on the server; a turn's commit checks the session's turn count in the same script
//! (two replicas that prepared a turn against the same count: the second gets
//! [`StoreError::Conflict`]). Every write sets PEXPIRE on the session's keys when a TTL is
//! configured, so Redis itself drops idle sessions.
//!
//! Keys of session `ID` (prefix `blip2:`):
//! - `blip2:s:ID:meta`: hash `meta` (a `MetaRecord`: template, defaults), `owner`, `turns`,
//!   `images`, `last_used` (unix ms), `created_at`;
//! - `blip2:s:ID:turns`, `blip2:s:ID:images`: lists of `TurnRow`s and `ImageRow`s;
//! - `blip2:s:ID:sp`: hash sha256 -> `SoftPrompt`;
//! - `blip2:sessions` and `blip2:o:OWNER`: sorted sets of session ids scored by the time they
//!   expire (`+inf` without a TTL), for the session limits and ListSessions.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use blip2_proto::v1::{SessionSummary, SoftPrompt};
use prost::Message;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;

use super::codec::{self, ImageRow, MetaRecord, TurnRow};
use super::{unix_now_ms, Limits, Session, SessionStore, StoreError, TurnCommit};

const PREFIX: &str = "blip2:";

/// Drops the expired entries of both indexes, checks the limits, writes the session.
const CREATE: &str = r"
local now = ARGV[3]
redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', '(' .. now)
redis.call('ZREMRANGEBYSCORE', KEYS[6], '-inf', '(' .. now)
if redis.call('ZCARD', KEYS[5]) >= tonumber(ARGV[6]) then return -1 end
local max_owner = tonumber(ARGV[7])
if max_owner > 0 and redis.call('ZCARD', KEYS[6]) >= max_owner then return -2 end
if redis.call('EXISTS', KEYS[1]) == 1 then return -3 end
redis.call('HSET', KEYS[1], 'meta', ARGV[2], 'owner', ARGV[1], 'turns', ARGV[10],
  'images', ARGV[11], 'last_used', now, 'created_at', ARGV[9])
local i = 13
for _ = 1, tonumber(ARGV[10]) do redis.call('RPUSH', KEYS[2], ARGV[i]); i = i + 1 end
for _ = 1, tonumber(ARGV[11]) do redis.call('RPUSH', KEYS[3], ARGV[i]); i = i + 1 end
for _ = 1, tonumber(ARGV[12]) do redis.call('HSET', KEYS[4], ARGV[i], ARGV[i + 1]); i = i + 2 end
redis.call('ZADD', KEYS[5], ARGV[5], ARGV[8])
redis.call('ZADD', KEYS[6], ARGV[5], ARGV[8])
if tonumber(ARGV[4]) > 0 then
  for k = 1, 4 do redis.call('PEXPIRE', KEYS[k], ARGV[4]) end
end
return 0
";

/// Appends a turn if the session still has the expected number of turns.
const COMMIT: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local n = tonumber(redis.call('HGET', KEYS[1], 'turns'))
if n ~= tonumber(ARGV[1]) then return -2 end
redis.call('RPUSH', KEYS[2], ARGV[6])
local i = 9
for _ = 1, tonumber(ARGV[7]) do redis.call('RPUSH', KEYS[3], ARGV[i]); i = i + 1 end
for _ = 1, tonumber(ARGV[8]) do redis.call('HSETNX', KEYS[4], ARGV[i], ARGV[i + 1]); i = i + 2 end
redis.call('HINCRBY', KEYS[1], 'turns', 1)
redis.call('HINCRBY', KEYS[1], 'images', ARGV[7])
redis.call('HSET', KEYS[1], 'last_used', ARGV[2])
redis.call('ZADD', KEYS[5], ARGV[4], ARGV[5])
redis.call('ZADD', KEYS[6], ARGV[4], ARGV[5])
if tonumber(ARGV[3]) > 0 then
  for k = 1, 4 do redis.call('PEXPIRE', KEYS[k], ARGV[3]) end
end
return n + 1
";

/// Marks a session used: last_used, its index scores and its keys' expiry.
const TOUCH: &str = r"
local owner = redis.call('HGET', KEYS[1], 'owner')
if not owner then return 0 end
redis.call('HSET', KEYS[1], 'last_used', ARGV[1])
redis.call('ZADD', KEYS[5], ARGV[3], ARGV[4])
redis.call('ZADD', ARGV[5] .. owner, ARGV[3], ARGV[4])
if tonumber(ARGV[2]) > 0 then
  for k = 1, 4 do redis.call('PEXPIRE', KEYS[k], ARGV[2]) end
end
return 1
";

/// Removes a session's keys and index entries; 1 if it existed.
const DELETE: &str = r"
local owner = redis.call('HGET', KEYS[1], 'owner')
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
redis.call('ZREM', KEYS[5], ARGV[1])
if not owner then return 0 end
redis.call('ZREM', ARGV[2] .. owner, ARGV[1])
return 1
";

/// Sessions in Redis.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    client: redis::Client,
    /// Connected on first use (so the tier may start before Redis), reconnecting by itself.
    connection: tokio::sync::OnceCell<ConnectionManager>,
    ttl: Option<Duration>,
    create: Script,
    commit: Script,
    touch: Script,
    delete: Script,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("ttl", &self.inner.ttl)
            .finish_non_exhaustive()
    }
}

type Result<T> = std::result::Result<T, StoreError>;

fn backend(error: redis::RedisError) -> StoreError {
    StoreError::Backend(format!("redis: {error}"))
}

/// The keys of session `id`: meta, turns, images, soft prompts, the index of all sessions.
fn keys(id: &str) -> [String; 5] {
    [
        format!("{PREFIX}s:{id}:meta"),
        format!("{PREFIX}s:{id}:turns"),
        format!("{PREFIX}s:{id}:images"),
        format!("{PREFIX}s:{id}:sp"),
        format!("{PREFIX}sessions"),
    ]
}

fn owner_prefix() -> String {
    format!("{PREFIX}o:")
}

fn owner_key(owner: &str) -> String {
    format!("{}{owner}", owner_prefix())
}

impl RedisStore {
    /// A store on the Redis at `url` (`redis://host:port[/db]`); connects on first use.
    /// Sessions expire after `ttl` without use (`None`: never).
    pub fn new(url: &str, ttl: Option<Duration>) -> Result<Self> {
        let client = redis::Client::open(url)
            .map_err(|e| StoreError::Backend(format!("redis URL `{url}`: {e}")))?;
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                connection: tokio::sync::OnceCell::new(),
                ttl,
                create: Script::new(CREATE),
                commit: Script::new(COMMIT),
                touch: Script::new(TOUCH),
                delete: Script::new(DELETE),
            }),
        })
    }

    async fn connection(&self) -> Result<ConnectionManager> {
        let inner = &self.inner;
        let connection = inner
            .connection
            .get_or_try_init(|| async {
                // One quick retry (delays in ms, at most 500): a request fails within about
                // a second when Redis is down, and the next request tries again.
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Duration::from_secs(2))
                    .set_response_timeout(Duration::from_secs(5))
                    .set_factor(2)
                    .set_max_delay(500)
                    .set_number_of_retries(1);
                ConnectionManager::new_with_config(inner.client.clone(), config).await
            })
            .await
            .map_err(backend)?;
        Ok(connection.clone())
    }

    /// PEXPIRE argument ("0": none) and index score of a session used at `now`.
    fn expiry(&self, now: i64) -> (String, String) {
        match self.inner.ttl {
            Some(ttl) => {
                let ttl = ttl.as_millis().max(1) as i64;
                (ttl.to_string(), now.saturating_add(ttl).to_string())
            }
            None => ("0".into(), "+inf".into()),
        }
    }
}

#[tonic::async_trait]
impl SessionStore for RedisStore {
    async fn create(&self, session: &Session, limits: Limits) -> Result<()> {
        let id = session.session_id.as_str();
        let now = unix_now_ms();
        let (ttl, deadline) = self.expiry(now);
        let mut meta = codec::meta(session);
        meta.last_used_ms = now;
        let soft_prompts = codec::new_soft_prompts(&session.images, |_| false);
        let mut connection = self.connection().await?;
        let mut invocation = self.inner.create.prepare_invoke();
        for key in keys(id) {
            invocation.key(key);
        }
        invocation
            .key(owner_key(&session.owner))
            .arg(&session.owner)
            .arg(meta.encode_to_vec())
            .arg(now)
            .arg(ttl)
            .arg(deadline)
            .arg(limits.max_sessions)
            .arg(limits.max_per_owner)
            .arg(id)
            .arg(session.created_at)
            .arg(session.turns.len())
            .arg(session.images.len())
            .arg(soft_prompts.len());
        for turn in &session.turns {
            invocation.arg(codec::turn_row(turn).encode_to_vec());
        }
        for image in &session.images {
            invocation.arg(codec::image_row(image).encode_to_vec());
        }
        for (sha, bytes) in soft_prompts {
            invocation.arg(sha).arg(bytes);
        }
        match invocation
            .invoke_async::<i64>(&mut connection)
            .await
            .map_err(backend)?
        {
            0 => Ok(()),
            -1 => Err(StoreError::too_many(limits.max_sessions)),
            -2 => Err(StoreError::too_many_for_key(limits.max_per_owner)),
            _ => Err(StoreError::Conflict(format!(
                "session `{id}` exists already"
            ))),
        }
    }

    async fn load(&self, session_id: &str) -> Result<Option<Session>> {
        let [meta_key, turns_key, images_key, sp_key, _] = keys(session_id);
        let mut connection = self.connection().await?;
        type Loaded = (
            HashMap<String, Vec<u8>>,
            Vec<Vec<u8>>,
            Vec<Vec<u8>>,
            HashMap<String, Vec<u8>>,
        );
        let (fields, turns, images, soft_prompts): Loaded = redis::pipe()
            .atomic()
            .cmd("HGETALL")
            .arg(&meta_key)
            .cmd("LRANGE")
            .arg(&turns_key)
            .arg(0)
            .arg(-1)
            .cmd("LRANGE")
            .arg(&images_key)
            .arg(0)
            .arg(-1)
            .cmd("HGETALL")
            .arg(&sp_key)
            .query_async(&mut connection)
            .await
            .map_err(backend)?;
        let Some(blob) = fields.get("meta") else {
            return Ok(None);
        };
        let mut meta: MetaRecord = codec::decode("session", blob)?;
        let number = |name: &str| -> Result<i64> {
            let text = fields
                .get(name)
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default();
            text.parse().map_err(|_| {
                StoreError::Backend(format!("session `{session_id}`: a bad `{name}` field"))
            })
        };
        meta.turns = number("turns")? as u32;
        meta.images = number("images")? as u32;
        meta.last_used_ms = number("last_used")?;
        if turns.len() != meta.turns as usize || images.len() != meta.images as usize {
            return Err(StoreError::Backend(format!(
                "session `{session_id}` has {} turns and {} images stored, {} and {} counted",
                turns.len(),
                images.len(),
                meta.turns,
                meta.images
            )));
        }
        let turns = turns
            .iter()
            .map(|bytes| codec::decode::<TurnRow>("turn", bytes))
            .collect::<Result<Vec<_>>>()?;
        let images = images
            .iter()
            .map(|bytes| codec::decode::<ImageRow>("image", bytes))
            .collect::<Result<Vec<_>>>()?;
        let soft_prompts = soft_prompts
            .into_iter()
            .map(|(sha, bytes)| {
                let soft_prompt: SoftPrompt = codec::decode("soft prompt", &bytes)?;
                Ok((sha, Arc::new(soft_prompt)))
            })
            .collect::<Result<HashMap<_, _>>>()?;
        codec::session(meta, turns, images, &soft_prompts).map(Some)
    }

    async fn owner(&self, session_id: &str) -> Result<Option<String>> {
        let [meta_key, ..] = keys(session_id);
        let mut connection = self.connection().await?;
        redis::cmd("HGET")
            .arg(meta_key)
            .arg("owner")
            .query_async(&mut connection)
            .await
            .map_err(backend)
    }

    async fn touch(&self, session_id: &str) -> Result<()> {
        let now = unix_now_ms();
        let (ttl, deadline) = self.expiry(now);
        let mut connection = self.connection().await?;
        let mut invocation = self.inner.touch.prepare_invoke();
        for key in keys(session_id) {
            invocation.key(key);
        }
        invocation
            .arg(now)
            .arg(ttl)
            .arg(deadline)
            .arg(session_id)
            .arg(owner_prefix());
        invocation
            .invoke_async::<i64>(&mut connection)
            .await
            .map_err(backend)?;
        Ok(())
    }

    async fn commit(&self, commit: &TurnCommit) -> Result<()> {
        let id = commit.session_id.as_str();
        let now = unix_now_ms();
        let (ttl, deadline) = self.expiry(now);
        let soft_prompts = codec::new_soft_prompts(&commit.images, |_| false);
        let mut connection = self.connection().await?;
        let mut invocation = self.inner.commit.prepare_invoke();
        for key in keys(id) {
            invocation.key(key);
        }
        invocation
            .key(owner_key(&commit.owner))
            .arg(commit.expected_turns)
            .arg(now)
            .arg(ttl)
            .arg(deadline)
            .arg(id)
            .arg(codec::turn_row(&commit.turn).encode_to_vec())
            .arg(commit.images.len())
            .arg(soft_prompts.len());
        for image in &commit.images {
            invocation.arg(codec::image_row(image).encode_to_vec());
        }
        for (sha, bytes) in soft_prompts {
            invocation.arg(sha).arg(bytes);
        }
        match invocation
            .invoke_async::<i64>(&mut connection)
            .await
            .map_err(backend)?
        {
            -1 => Err(StoreError::NotFound(id.to_string())),
            -2 => Err(StoreError::conflict(id)),
            _ => Ok(()),
        }
    }

    async fn delete(&self, session_id: &str) -> Result<bool> {
        let mut connection = self.connection().await?;
        let mut invocation = self.inner.delete.prepare_invoke();
        for key in keys(session_id) {
            invocation.key(key);
        }
        invocation.arg(session_id).arg(owner_prefix());
        let existed: i64 = invocation
            .invoke_async(&mut connection)
            .await
            .map_err(backend)?;
        Ok(existed == 1)
    }

    async fn list(&self, owner: &str) -> Result<Vec<SessionSummary>> {
        let index = owner_key(owner);
        let now = unix_now_ms();
        let mut connection = self.connection().await?;
        let (_, ids): (i64, Vec<String>) = redis::pipe()
            .cmd("ZREMRANGEBYSCORE")
            .arg(&index)
            .arg("-inf")
            .arg(format!("({now}"))
            .cmd("ZRANGE")
            .arg(&index)
            .arg(0)
            .arg(-1)
            .query_async(&mut connection)
            .await
            .map_err(backend)?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in &ids {
            let [meta_key, ..] = keys(id);
            pipe.cmd("HMGET")
                .arg(meta_key)
                .arg("turns")
                .arg("created_at");
        }
        let fields: Vec<(Option<u32>, Option<i64>)> =
            pipe.query_async(&mut connection).await.map_err(backend)?;
        let mut list: Vec<SessionSummary> = ids
            .into_iter()
            .zip(fields)
            .filter_map(|(session_id, fields)| match fields {
                (Some(turns), Some(created_at)) => Some(SessionSummary {
                    session_id,
                    turns,
                    created_at,
                }),
                // Expired (its keys are gone) but still in the index.
                _ => None,
            })
            .collect();
        list.sort_by(|a, b| (a.created_at, &a.session_id).cmp(&(b.created_at, &b.session_id)));
        Ok(list)
    }

    async fn count(&self) -> Result<usize> {
        let [.., index] = keys("");
        let now = unix_now_ms();
        let mut connection = self.connection().await?;
        let (_, count): (i64, usize) = redis::pipe()
            .cmd("ZREMRANGEBYSCORE")
            .arg(&index)
            .arg("-inf")
            .arg(format!("({now}"))
            .cmd("ZCARD")
            .arg(&index)
            .query_async(&mut connection)
            .await
            .map_err(backend)?;
        Ok(count)
    }

    async fn sweep(&self) -> Result<usize> {
        if self.inner.ttl.is_none() {
            return Ok(0);
        }
        // Redis drops the sessions' keys itself (PEXPIRE); this drops their index entries.
        let [.., index] = keys("");
        let now = unix_now_ms();
        let mut connection = self.connection().await?;
        let removed: usize = redis::cmd("ZREMRANGEBYSCORE")
            .arg(&index)
            .arg("-inf")
            .arg(format!("({now}"))
            .query_async(&mut connection)
            .await
            .map_err(backend)?;
        Ok(removed)
    }
}
