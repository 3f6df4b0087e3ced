//! The session tier on its stores: idempotent retries, idle expiry, and two session replicas
//! sharing one Redis (turns on one session never interleave).

mod common;
mod redis_server;

use std::sync::atomic::Ordering;
use std::time::Duration;

use blip2_proto::v1::{CreateSessionRequest, GetSessionRequest};
use blip2_session::StoreConfig;
use tonic::Code;

use common::{chat, chat_request, image_bytes, with_bytes, Harness, LlmMode, ANSWER};

async fn create(harness: &mut Harness) -> String {
    harness
        .client
        .create_session(CreateSessionRequest::default())
        .await
        .unwrap()
        .into_inner()
        .session_id
}

async fn turn_count(harness: &mut Harness, session_id: &str) -> Result<usize, tonic::Status> {
    let session = harness
        .client
        .get_session(GetSessionRequest {
            session_id: session_id.to_string(),
        })
        .await?
        .into_inner();
    Ok(session.turns.len())
}

#[tokio::test]
async fn a_retried_chat_with_its_idempotency_key_is_answered_from_the_store() {
    let mut harness = Harness::start(LlmMode::Answer).await;
    let id = create(&mut harness).await;
    let mut request = chat_request(&id, "what is it?", vec![with_bytes(image_bytes("a"))]);
    request.idempotency_key = "client-retry-1".into();
    let (pieces, done) = chat(&mut harness.client, request.clone()).await.unwrap();
    assert_eq!(pieces.concat(), ANSWER);
    let (replayed, again) = chat(&mut harness.client, request.clone()).await.unwrap();
    assert_eq!(again, done);
    assert_eq!(replayed.concat(), ANSWER, "the answer is streamed back");
    assert_eq!(harness.llm.received().len(), 1, "the LLM ran once");
    assert_eq!(
        harness.vision.encoded().len(),
        1,
        "the image was encoded once"
    );
    assert_eq!(turn_count(&mut harness, &id).await.unwrap(), 1);

    // Without a key, a retry is a new turn.
    request.idempotency_key.clear();
    chat(&mut harness.client, request.clone()).await.unwrap();
    chat(&mut harness.client, request.clone()).await.unwrap();
    assert_eq!(turn_count(&mut harness, &id).await.unwrap(), 3);

    // An oversize key is refused.
    request.idempotency_key = "k".repeat(129);
    let status = chat(&mut harness.client, request).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn idle_sessions_expire_and_are_swept() {
    let mut harness = Harness::with_config(LlmMode::Answer, |config| {
        config.session_ttl = Some(Duration::from_millis(1000));
        config.sweep_interval = Duration::from_millis(100);
    })
    .await;
    let read = create(&mut harness).await;
    let used = create(&mut harness).await;
    let idle = create(&mut harness).await;
    // `used` gets a turn and `read` a read every 300 ms; `idle` nothing.
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(turn_count(&mut harness, &read).await.unwrap(), 0);
        chat(
            &mut harness.client,
            chat_request(&used, "still there?", vec![]),
        )
        .await
        .unwrap();
    }
    let status = turn_count(&mut harness, &idle).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(turn_count(&mut harness, &used).await.unwrap(), 5);
    let status = chat(&mut harness.client, chat_request(&idle, "hello?", vec![]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    // Untouched, the sweeper removes the rest without any read.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let listed = harness
        .client
        .list_sessions(blip2_proto::v1::ListSessionsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(listed.sessions.is_empty(), "{listed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_on_one_redis_never_interleave_turns() {
    let Some(redis) = redis_server::start() else {
        return;
    };
    let shared = |config: &mut blip2_session::SessionConfig| {
        config.store = StoreConfig::Redis(redis.url.clone());
    };
    let mut a = Harness::with_config(LlmMode::Slow, shared).await;
    let mut b = Harness::with_config(LlmMode::Slow, shared).await;
    let id = create(&mut a).await;
    assert_eq!(
        turn_count(&mut b, &id).await.unwrap(),
        0,
        "B sees A's session"
    );

    // Both replicas prepare a turn against 0 turns; only one may commit.
    let (on_a, on_b) = tokio::join!(
        chat(&mut a.client, chat_request(&id, "from a", vec![])),
        chat(&mut b.client, chat_request(&id, "from b", vec![])),
    );
    let results = [on_a, on_b];
    let won = results.iter().filter(|r| r.is_ok()).count();
    let aborted: Vec<_> = results
        .iter()
        .filter_map(|r| r.as_ref().err())
        .filter(|status| status.code() == Code::Aborted)
        .collect();
    assert_eq!((won, aborted.len()), (1, 1), "{results:?}");
    assert!(aborted[0].message().contains("send the turn again"));
    assert_eq!(a.llm.finished.load(Ordering::SeqCst), 1);
    assert_eq!(b.llm.finished.load(Ordering::SeqCst), 1);
    assert_eq!(turn_count(&mut a, &id).await.unwrap(), 1);

    // The loser's retry goes through, on either replica; both see both turns.
    chat(&mut b.client, chat_request(&id, "again from b", vec![]))
        .await
        .unwrap();
    assert_eq!(turn_count(&mut a, &id).await.unwrap(), 2);
    assert_eq!(turn_count(&mut b, &id).await.unwrap(), 2);
}
