//! Durable sessions and API keys, end to end: the session tier as a `blip2 serve session`
//! process on the disk store (`--data-dir`), killed with SIGKILL and restarted on the same
//! directory; retried Chats with an idempotency key; bearer keys and who may see what.

mod common;

use std::path::PathBuf;

use blip2_proto::v1::session_service_client::SessionServiceClient;
use blip2_proto::v1::{
    chat_event, turn_image, ChatDone, ChatRequest, CreateSessionRequest, DeleteSessionRequest,
    GetSessionRequest, ListSessionsRequest, Session, TurnImage, UploadImageChunk,
};
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

use common::{fixture, spawn, Tier};

const KEY_A: &str = "test-key-alice";
const KEY_B: &str = "test-key-bob";

/// A scratch directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir = std::env::temp_dir().join(format!("blip2-{name}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.0).ok();
    }
}

fn sha256_hex(text: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A keys file accepting KEY_A and KEY_B (by hash, with a comment line).
fn keys_file(dir: &TempDir) -> String {
    let path = dir.0.join("keys.txt");
    let text = format!(
        "# test keys\n{}\n{}\n",
        sha256_hex(KEY_A),
        sha256_hex(KEY_B)
    );
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

fn model_dir() -> String {
    fixture("models/opt-a").to_str().unwrap().to_string()
}

/// `message` with `authorization: Bearer key`.
fn authed<T>(message: T, key: Option<&str>) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(key) = key {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {key}").parse().unwrap());
    }
    request
}

async fn connect(tier: &Tier) -> SessionServiceClient<Channel> {
    SessionServiceClient::connect(tier.addr.clone())
        .await
        .expect("connecting to the session tier")
}

fn chat_request(session_id: &str, text: &str, images: Vec<TurnImage>, key: &str) -> ChatRequest {
    ChatRequest {
        session_id: session_id.to_string(),
        text: text.to_string(),
        images,
        params: Some(blip2_proto::v1::GenerationParams {
            max_new_tokens: Some(6),
            ..Default::default()
        }),
        idempotency_key: key.to_string(),
    }
}

fn image_file(name: &str) -> TurnImage {
    TurnImage {
        source: Some(turn_image::Source::Data(
            std::fs::read(fixture(&format!("images/{name}"))).unwrap(),
        )),
    }
}

/// Runs a turn: the streamed text and the final event.
async fn chat(
    client: &mut SessionServiceClient<Channel>,
    request: ChatRequest,
    key: &str,
) -> Result<(String, ChatDone), Status> {
    let mut stream = client.chat(authed(request, Some(key))).await?.into_inner();
    let mut text = String::new();
    while let Some(event) = stream.next().await {
        match event?.kind {
            Some(chat_event::Kind::Text(piece)) => text.push_str(&piece),
            Some(chat_event::Kind::Done(done)) => return Ok((text, done)),
            None => {}
        }
    }
    Err(Status::internal("the stream ended without `done`"))
}

async fn get(
    client: &mut SessionServiceClient<Channel>,
    session_id: &str,
    key: &str,
) -> Result<Session, Status> {
    let request = GetSessionRequest {
        session_id: session_id.to_string(),
    };
    Ok(client
        .get_session(authed(request, Some(key)))
        .await?
        .into_inner())
}

fn session_tier(vision: &str, llm: &str, data_dir: &str, keys: &str, extra: &[&str]) -> Tier {
    let model = model_dir();
    let mut args = vec![
        "session",
        "--listen",
        "127.0.0.1:0",
        "--model",
        &model,
        "--vision",
        vision,
        "--llm",
        llm,
        "--data-dir",
        data_dir,
        "--api-keys-file",
        keys,
    ];
    args.extend_from_slice(extra);
    spawn(&args)
}

/// (turn id, question, answer) of each turn.
fn turns(session: &Session) -> Vec<(String, String, String)> {
    session
        .turns
        .iter()
        .map(|t| (t.turn_id.clone(), t.question.clone(), t.answer.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_session_tier_restarts_with_every_acknowledged_turn() {
    let dir = TempDir::new("durable");
    let keys = keys_file(&dir);
    let data = dir.0.join("data");
    let data = data.to_str().unwrap();
    let model = model_dir();
    let vision = spawn(&["vision", "--listen", "127.0.0.1:0", "--model", &model]);
    let llm = spawn(&["llm", "--listen", "127.0.0.1:0", "--model", &model]);

    let session = session_tier(&vision.addr, &llm.addr, data, &keys, &[]);
    let mut client = connect(&session).await;
    let created = client
        .create_session(authed(CreateSessionRequest::default(), Some(KEY_A)))
        .await
        .unwrap()
        .into_inner();
    let id = created.session_id;
    let (_, first) = chat(
        &mut client,
        chat_request(&id, "what is this?", vec![image_file("photo.jpg")], ""),
        KEY_A,
    )
    .await
    .unwrap();
    let (streamed, second) = chat(
        &mut client,
        chat_request(&id, "and the colour?", vec![], "retry-me"),
        KEY_A,
    )
    .await
    .unwrap();
    assert_eq!(streamed, second.text);
    let before = get(&mut client, &id, KEY_A).await.unwrap();
    assert_eq!(before.turns.len(), 2);
    assert_eq!(before.turns[0].turn_id, first.turn_id);
    assert_eq!(before.images.len(), 1);

    // SIGKILL: no chance to flush anything the store had not made durable.
    let mut session = session;
    session.child.kill().unwrap();
    session.child.wait().unwrap();
    drop(session);
    drop(client);

    let session = session_tier(&vision.addr, &llm.addr, data, &keys, &[]);
    let mut client = connect(&session).await;
    let after = get(&mut client, &id, KEY_A).await.unwrap();
    assert_eq!(
        turns(&after),
        turns(&before),
        "every acknowledged turn is back"
    );
    assert_eq!(after.images, before.images);
    assert_eq!(after.created_at, before.created_at);

    // The next turn works, with the image attached again by id (its soft prompt from disk).
    let image_id = after.images[0].image_id.clone();
    let again = TurnImage {
        source: Some(turn_image::Source::ImageId(image_id)),
    };
    let (_, third) = chat(
        &mut client,
        chat_request(&id, "once more?", vec![again], ""),
        KEY_A,
    )
    .await
    .unwrap();
    assert!(!third.turn_id.is_empty());

    // A retried Chat with a committed key gets that turn back, streamed, and appends nothing,
    // across the restart too.
    let (replayed_text, replayed) = chat(
        &mut client,
        chat_request(&id, "and the colour?", vec![], "retry-me"),
        KEY_A,
    )
    .await
    .unwrap();
    assert_eq!(replayed.turn_id, second.turn_id);
    assert_eq!(replayed.text, second.text);
    assert_eq!(replayed_text, second.text);
    // A new key with a retry of its own: one turn.
    let (_, fourth) = chat(
        &mut client,
        chat_request(&id, "last one", vec![], "key-4"),
        KEY_A,
    )
    .await
    .unwrap();
    let (_, fourth_again) = chat(
        &mut client,
        chat_request(&id, "last one", vec![], "key-4"),
        KEY_A,
    )
    .await
    .unwrap();
    assert_eq!(fourth_again.turn_id, fourth.turn_id);
    // The key of a turn with other text is refused rather than replayed.
    let reused = chat(
        &mut client,
        chat_request(&id, "something else", vec![], "key-4"),
        KEY_A,
    )
    .await
    .unwrap_err();
    assert_eq!(reused.code(), Code::InvalidArgument, "{reused:?}");

    let last = get(&mut client, &id, KEY_A).await.unwrap();
    let ids: Vec<&str> = last.turns.iter().map(|t| t.turn_id.as_str()).collect();
    assert_eq!(
        ids,
        [
            first.turn_id.as_str(),
            second.turn_id.as_str(),
            third.turn_id.as_str(),
            fourth.turn_id.as_str()
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_guard_sessions_and_images() {
    let dir = TempDir::new("keys");
    let keys = keys_file(&dir);
    let data = dir.0.join("data");
    // Nothing here reaches the vision or LLM tier: refusals come first.
    let nowhere = "http://127.0.0.1:9";
    let session = session_tier(
        nowhere,
        nowhere,
        data.to_str().unwrap(),
        &keys,
        &["--max-sessions-per-key", "2"],
    );
    let mut client = connect(&session).await;

    // No key, an unknown key, a malformed header: UNAUTHENTICATED, on every method.
    for key in [None, Some("not-a-key")] {
        let status = client
            .create_session(authed(CreateSessionRequest::default(), key))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        let status = client
            .list_sessions(authed(ListSessionsRequest {}, key))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    }
    let mut raw = Request::new(CreateSessionRequest::default());
    raw.metadata_mut()
        .insert("authorization", KEY_A.parse().unwrap());
    let status = client.create_session(raw).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(!status.message().contains(KEY_A));

    // Alice's session does not exist for Bob: the same answer as an id that never existed.
    let alice = client
        .create_session(authed(CreateSessionRequest::default(), Some(KEY_A)))
        .await
        .unwrap()
        .into_inner()
        .session_id;
    let never = "0123456789abcdef0123456789abcdef";
    let not_found = |status: Status, id: &str| {
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
        status.message().replace(id, "ID")
    };
    let theirs = not_found(get(&mut client, &alice, KEY_B).await.unwrap_err(), &alice);
    let nobodys = not_found(get(&mut client, never, KEY_B).await.unwrap_err(), never);
    assert_eq!(theirs, nobodys);
    let status = chat(&mut client, chat_request(&alice, "hi", vec![], ""), KEY_B)
        .await
        .unwrap_err();
    assert_eq!(not_found(status, &alice), nobodys);
    let status = client
        .delete_session(authed(
            DeleteSessionRequest {
                session_id: alice.clone(),
            },
            Some(KEY_B),
        ))
        .await
        .unwrap_err();
    assert_eq!(not_found(status, &alice), nobodys);
    let listed = client
        .list_sessions(authed(ListSessionsRequest {}, Some(KEY_B)))
        .await
        .unwrap()
        .into_inner();
    assert!(listed.sessions.is_empty());
    assert!(
        get(&mut client, &alice, KEY_A).await.is_ok(),
        "still Alice's"
    );

    // Alice's upload does not exist for Bob either.
    let chunk = UploadImageChunk {
        data: std::fs::read(fixture("images/photo.jpg")).unwrap(),
        session_id: String::new(),
    };
    let upload = client
        .upload_image(authed(tokio_stream::iter(vec![chunk]), Some(KEY_A)))
        .await
        .unwrap()
        .into_inner()
        .image_id;
    let bob = client
        .create_session(authed(CreateSessionRequest::default(), Some(KEY_B)))
        .await
        .unwrap()
        .into_inner()
        .session_id;
    let by_id = |id: &str| TurnImage {
        source: Some(turn_image::Source::ImageId(id.to_string())),
    };
    let status = chat(
        &mut client,
        chat_request(&bob, "hi", vec![by_id(&upload)], ""),
        KEY_B,
    )
    .await
    .unwrap_err();
    let theirs = not_found(status, &upload);
    let status = chat(
        &mut client,
        chat_request(&bob, "hi", vec![by_id(never)], ""),
        KEY_B,
    )
    .await
    .unwrap_err();
    assert_eq!(theirs, not_found(status, never));
    // Uploading into Alice's session with Bob's key: not found.
    let chunk = UploadImageChunk {
        data: vec![1, 2, 3],
        session_id: alice.clone(),
    };
    let status = client
        .upload_image(authed(tokio_stream::iter(vec![chunk]), Some(KEY_B)))
        .await
        .unwrap_err();
    assert_eq!(not_found(status, &alice), nobodys);

    // Two sessions per key: Bob's third is refused, Alice may still make her second.
    client
        .create_session(authed(CreateSessionRequest::default(), Some(KEY_B)))
        .await
        .unwrap();
    let status = client
        .create_session(authed(CreateSessionRequest::default(), Some(KEY_B)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("--max-sessions-per-key"));
    client
        .create_session(authed(CreateSessionRequest::default(), Some(KEY_A)))
        .await
        .unwrap();
    // Deleting one makes room.
    client
        .delete_session(authed(
            DeleteSessionRequest { session_id: bob },
            Some(KEY_B),
        ))
        .await
        .unwrap();
    client
        .create_session(authed(CreateSessionRequest::default(), Some(KEY_B)))
        .await
        .unwrap();
}
