//! The `SessionStore` contract, checked on each backend: in memory, redb on disk, and a real
//! redis-server (started by the test; see `redis_server`).

mod redis_server;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use blip2_proto::v1::{Dtype, FinishReason, GenerationParams, PromptTemplate, SoftPrompt, Usage};
use blip2_session::store::{
    random_id, DiskStore, ImageRecord, Limits, MemoryStore, RedisStore, Session, SessionStore,
    StoreError, TurnCommit, TurnRecord,
};

const ROOMY: Limits = Limits {
    max_sessions: 1000,
    max_per_owner: 0,
};

/// A scratch directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("blip2-store-test-{}", random_id()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.0).ok();
    }
}

fn soft_prompt(sha256: &str) -> Arc<SoftPrompt> {
    Arc::new(SoftPrompt {
        data: sha256.bytes().cycle().take(4 * 8 * 4).collect(),
        dtype: Dtype::F32 as i32,
        shape: vec![4, 8],
        image_sha256: sha256.to_string(),
        checkpoint_fingerprint: "test".into(),
    })
}

fn image(sha256: &str, turn_index: u32) -> ImageRecord {
    ImageRecord {
        image_id: random_id(),
        sha256: sha256.to_string(),
        turn_index,
        soft_prompt: soft_prompt(sha256),
    }
}

fn turn(question: &str, image_ids: Vec<String>, key: &str) -> TurnRecord {
    TurnRecord {
        turn_id: random_id(),
        question: question.to_string(),
        answer: format!("answer to {question}"),
        image_ids,
        finish_reason: FinishReason::Eos,
        usage: Some(Usage {
            prompt_tokens: 12,
            generated_tokens: 3,
            cached_prompt_tokens: 1,
        }),
        idempotency_key: key.to_string(),
    }
}

/// A session of `owner` with one finished turn holding one image.
fn session(owner: &str) -> Session {
    let mut session = Session::new(
        owner.to_string(),
        PromptTemplate {
            system: "be brief".into(),
            ..PromptTemplate::default()
        },
        GenerationParams {
            max_new_tokens: Some(7),
            ..GenerationParams::default()
        },
    );
    let first = image("aaaa", 0);
    session
        .turns
        .push(turn("what is it?", vec![first.image_id.clone()], ""));
    session.images.push(first);
    session
}

fn commit_for(session: &Session, expected_turns: usize, question: &str, key: &str) -> TurnCommit {
    let index = expected_turns as u32;
    // One image seen before (same content) and one new.
    let images = vec![image("aaaa", index), image("bbbb", index)];
    TurnCommit {
        session_id: session.session_id.clone(),
        owner: session.owner.clone(),
        expected_turns,
        turn: turn(
            question,
            images.iter().map(|i| i.image_id.clone()).collect(),
            key,
        ),
        images,
    }
}

/// `a` and `b` equal but for the last-used time (the store sets it).
fn assert_same(a: &Session, b: &Session) {
    let mut b = b.clone();
    b.last_used_ms = a.last_used_ms;
    assert_eq!(a, &b);
}

async fn contract(store: Arc<dyn SessionStore>) {
    // Create and read back, history included.
    let mut alice = session("alice");
    store.create(&alice, ROOMY).await.unwrap();
    let loaded = store
        .load(&alice.session_id)
        .await
        .unwrap()
        .expect("stored");
    assert_same(&loaded, &alice);
    assert!(store.load(&random_id()).await.unwrap().is_none());
    let owner = store.owner(&alice.session_id).await.unwrap();
    assert_eq!(owner.as_deref(), Some("alice"));
    assert_eq!(store.owner(&random_id()).await.unwrap(), None);

    // A commit appends the turn and its images, soft prompts with their bytes.
    let commit = commit_for(&alice, 1, "and now?", "key-1");
    store.commit(&commit).await.unwrap();
    alice.turns.push(commit.turn.clone());
    alice.images.extend(commit.images.clone());
    let loaded = store.load(&alice.session_id).await.unwrap().unwrap();
    assert_same(&loaded, &alice);
    assert_eq!(loaded.turns[1].idempotency_key, "key-1");
    assert_eq!(loaded.turn_with_key("key-1"), Some(&commit.turn));
    assert_eq!(loaded.images[2].soft_prompt.data, soft_prompt("bbbb").data);

    // A commit against a stale turn count is refused and changes nothing.
    let stale = commit_for(&alice, 1, "again?", "key-2");
    assert!(matches!(
        store.commit(&stale).await,
        Err(StoreError::Conflict(_))
    ));
    assert_same(
        &store.load(&alice.session_id).await.unwrap().unwrap(),
        &alice,
    );
    // So is one on a session that does not exist.
    let mut ghost = commit_for(&alice, 2, "anyone?", "");
    ghost.session_id = random_id();
    assert!(matches!(
        store.commit(&ghost).await,
        Err(StoreError::NotFound(_))
    ));

    // Concurrent commits prepared against the same count: exactly one applies.
    let base = store.load(&alice.session_id).await.unwrap().unwrap();
    let racers = (0..8).map(|i| {
        let store = store.clone();
        let commit = commit_for(&base, 2, &format!("racer {i}"), "");
        tokio::spawn(async move { store.commit(&commit).await })
    });
    let results = futures_join(racers).await;
    let won = results.iter().filter(|r| r.is_ok()).count();
    let lost = results
        .iter()
        .filter(|r| matches!(r, Err(StoreError::Conflict(_))))
        .count();
    assert_eq!((won, lost), (1, 7), "{results:?}");
    assert_eq!(
        store
            .load(&alice.session_id)
            .await
            .unwrap()
            .unwrap()
            .turns
            .len(),
        3
    );

    // Lists are per owner; delete removes everything.
    let bob = session("bob");
    store.create(&bob, ROOMY).await.unwrap();
    let listed = store.list("alice").await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].session_id, alice.session_id);
    assert_eq!(listed[0].turns, 3);
    assert_eq!(store.list("bob").await.unwrap().len(), 1);
    assert!(store.list("carol").await.unwrap().is_empty());
    assert_eq!(store.count().await.unwrap(), 2);
    assert!(store.delete(&bob.session_id).await.unwrap());
    assert!(!store.delete(&bob.session_id).await.unwrap());
    assert!(store.load(&bob.session_id).await.unwrap().is_none());
    assert!(store.list("bob").await.unwrap().is_empty());
    assert_eq!(store.count().await.unwrap(), 1);
}

async fn futures_join<T: Send + 'static>(
    tasks: impl Iterator<Item = tokio::task::JoinHandle<T>>,
) -> Vec<T> {
    let mut out = Vec::new();
    for task in tasks.collect::<Vec<_>>() {
        out.push(task.await.unwrap());
    }
    out
}

async fn limits(store: Arc<dyn SessionStore>) {
    let per_owner = Limits {
        max_sessions: 3,
        max_per_owner: 2,
    };
    store.create(&session("k1"), per_owner).await.unwrap();
    store.create(&session("k1"), per_owner).await.unwrap();
    let refused = store.create(&session("k1"), per_owner).await;
    assert!(
        matches!(&refused, Err(StoreError::Limit(m)) if m.contains("API key")),
        "{refused:?}"
    );
    store.create(&session("k2"), per_owner).await.unwrap();
    let refused = store.create(&session("k3"), per_owner).await;
    assert!(
        matches!(&refused, Err(StoreError::Limit(m)) if m.contains("limit of 3")),
        "{refused:?}"
    );
    // Room again once one is deleted.
    let first = store.list("k1").await.unwrap()[0].session_id.clone();
    assert!(store.delete(&first).await.unwrap());
    store.create(&session("k1"), per_owner).await.unwrap();
}

/// Sessions of `store` expire after [`TTL`] without use.
async fn expiry(store: Arc<dyn SessionStore>) {
    let kept = session("o");
    let idle = session("o");
    store.create(&kept, ROOMY).await.unwrap();
    store.create(&idle, ROOMY).await.unwrap();
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        store.touch(&kept.session_id).await.unwrap();
    }
    assert!(store.load(&kept.session_id).await.unwrap().is_some());
    assert_eq!(store.owner(&idle.session_id).await.unwrap(), None);
    assert!(
        store.load(&idle.session_id).await.unwrap().is_none(),
        "expired on read"
    );
    let listed = store.list("o").await.unwrap();
    assert_eq!(listed.len(), 1);
    // A commit keeps a session alive too; then, idle, the sweep removes it.
    store
        .commit(&commit_for(&kept, 1, "still here?", ""))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    store.sweep().await.unwrap();
    assert_eq!(store.count().await.unwrap(), 0);
    assert!(store.load(&kept.session_id).await.unwrap().is_none());
    assert!(matches!(
        store.commit(&commit_for(&kept, 2, "hello?", "")).await,
        Err(StoreError::NotFound(_))
    ));
}

const TTL: Option<Duration> = Some(Duration::from_millis(1000));

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_store_keeps_the_contract() {
    contract(Arc::new(MemoryStore::new(None))).await;
    limits(Arc::new(MemoryStore::new(None))).await;
    expiry(Arc::new(MemoryStore::new(TTL))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn disk_store_keeps_the_contract() {
    let dir = TempDir::new();
    contract(Arc::new(DiskStore::open(&dir.0.join("a"), None).unwrap())).await;
    limits(Arc::new(DiskStore::open(&dir.0.join("b"), None).unwrap())).await;
    expiry(Arc::new(DiskStore::open(&dir.0.join("c"), TTL).unwrap())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_store_keeps_the_contract() {
    let Some(redis) = redis_server::start() else {
        return;
    };
    // Databases 0, 1, 2 of one server: separate key spaces.
    let store = |db: u32, ttl| RedisStore::new(&format!("{}/{db}", redis.url), ttl).unwrap();
    contract(Arc::new(store(0, None))).await;
    limits(Arc::new(store(1, None))).await;
    expiry(Arc::new(store(2, TTL))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn disk_store_survives_reopening() {
    let dir = TempDir::new();
    let mut alice = session("alice");
    {
        let store = DiskStore::open(&dir.0, None).unwrap();
        store.create(&alice, ROOMY).await.unwrap();
        let commit = commit_for(&alice, 1, "and now?", "k");
        store.commit(&commit).await.unwrap();
        alice.turns.push(commit.turn);
        alice.images.extend(commit.images);
    }
    let store = DiskStore::open(&dir.0, None).unwrap();
    let loaded = store.load(&alice.session_id).await.unwrap().unwrap();
    assert_same(&loaded, &alice);
    assert_eq!(store.list("alice").await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_store_reports_an_unreachable_server() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let store = RedisStore::new(&format!("redis://127.0.0.1:{port}"), None).unwrap();
    let started = std::time::Instant::now();
    let error = store.load("x").await.unwrap_err();
    assert!(matches!(error, StoreError::Backend(_)), "{error:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}
