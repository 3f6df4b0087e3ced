//! The OpenAI-compatible API against the real tiers, in process on loopback, on the committed
//! fixture checkpoint `opt-a`: SSE format, whole completions, error JSON and statuses, and the
//! conversation -> session mapping (a continuing conversation encodes its image once).

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use blip2_gateway::{Gateway, GatewayConfig};
use blip2_model::model::{Blip2Model, LoadOptions};
use blip2_proto::v1::session_service_client::SessionServiceClient;
use blip2_proto::v1::vision_service_client::VisionServiceClient;
use blip2_proto::v1::{ListSessionsRequest, VisionInfoRequest};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

const MODEL: &str = "opt-a";

fn fixture(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(path)
}

fn image_uri(name: &str) -> String {
    let bytes = std::fs::read(fixture(&format!("images/{name}"))).unwrap();
    let data = base64::engine::general_purpose::STANDARD.encode(bytes);
    format!("data:image/jpeg;base64,{data}")
}

/// The three tiers and the gateway, stopped when dropped.
struct System {
    http: String,
    vision: String,
    session: String,
    gateway: Gateway,
    _stop: Vec<oneshot::Sender<()>>,
}

async fn listener() -> (TcpListener, String) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    (listener, addr)
}

fn stop_signal(stops: &mut Vec<oneshot::Sender<()>>) -> impl std::future::Future<Output = ()> {
    let (sender, receiver) = oneshot::channel::<()>();
    stops.push(sender);
    async {
        let _ = receiver.await;
    }
}

async fn start_with(configure: impl FnOnce(&mut GatewayConfig)) -> System {
    start_configured(|_| {}, configure).await
}

/// The system with the session tier's and the gateway's configurations adjusted.
async fn start_configured(
    session_config: impl FnOnce(&mut blip2_session::SessionConfig),
    configure: impl FnOnce(&mut GatewayConfig),
) -> System {
    let dir = fixture(&format!("models/{MODEL}"));
    let model = Arc::new(Blip2Model::load(&dir, &LoadOptions::default()).unwrap());
    let mut stops = Vec::new();
    let (vision_listener, vision) = listener().await;
    let (llm_listener, llm) = listener().await;
    let (session_listener, session) = listener().await;
    let (http_listener, http) = listener().await;

    let vision_tier = blip2_vision::VisionTier::new(
        model.clone(),
        MODEL.into(),
        blip2_vision::VisionConfig::default(),
    );
    tokio::spawn(blip2_vision::serve(
        vision_tier,
        vision_listener,
        stop_signal(&mut stops),
    ));
    let llm_tier =
        blip2_llm::LlmTier::new(model, MODEL.into(), blip2_llm::LlmConfig::default()).unwrap();
    tokio::spawn(blip2_llm::serve(
        llm_tier,
        llm_listener,
        stop_signal(&mut stops),
    ));
    let mut config = blip2_session::SessionConfig {
        vision_addrs: vec![format!("http://{vision}")],
        llm_addrs: vec![format!("http://{llm}")],
        model_dir: Some(dir),
        ..blip2_session::SessionConfig::default()
    };
    session_config(&mut config);
    let session_tier = blip2_session::SessionTier::new(config).unwrap();
    tokio::spawn(blip2_session::serve(
        session_tier,
        session_listener,
        stop_signal(&mut stops),
    ));
    let mut config = GatewayConfig {
        session_addr: format!("http://{session}"),
        model_id: MODEL.into(),
        ..GatewayConfig::default()
    };
    configure(&mut config);
    let gateway = Gateway::new(config).unwrap();
    tokio::spawn(blip2_gateway::serve(
        gateway.clone(),
        http_listener,
        stop_signal(&mut stops),
    ));
    System {
        http: format!("http://{http}"),
        vision: format!("http://{vision}"),
        session: format!("http://{session}"),
        gateway,
        _stop: stops,
    }
}

async fn start() -> System {
    start_with(|_| {}).await
}

impl System {
    async fn images_encoded(&self) -> u64 {
        let mut client = VisionServiceClient::connect(self.vision.clone())
            .await
            .unwrap();
        client
            .info(VisionInfoRequest {})
            .await
            .unwrap()
            .into_inner()
            .images_encoded
    }

    async fn session_count(&self) -> usize {
        let mut client = SessionServiceClient::connect(self.session.clone())
            .await
            .unwrap();
        client
            .list_sessions(ListSessionsRequest {})
            .await
            .unwrap()
            .into_inner()
            .sessions
            .len()
    }

    /// POSTs `body` (raw bytes) to `path`: status, content type, body text.
    async fn post_raw(&self, path: &str, body: Vec<u8>, auth: Option<&str>) -> Reply {
        let url = format!("{}{path}", self.http);
        let auth = auth.map(str::to_string);
        tokio::task::spawn_blocking(move || {
            let mut request = ureq::post(&url).set("Content-Type", "application/json");
            if let Some(auth) = &auth {
                request = request.set("Authorization", auth);
            }
            reply(request.send_bytes(&body))
        })
        .await
        .unwrap()
    }

    async fn post(&self, body: Value) -> Reply {
        self.post_raw("/v1/chat/completions", body.to_string().into_bytes(), None)
            .await
    }

    async fn get(&self, path: &str) -> Reply {
        let url = format!("{}{path}", self.http);
        tokio::task::spawn_blocking(move || reply(ureq::get(&url).call()))
            .await
            .unwrap()
    }
}

struct Reply {
    status: u16,
    content_type: String,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

fn reply(result: Result<ureq::Response, ureq::Error>) -> Reply {
    let response = match result {
        Ok(response) => response,
        Err(ureq::Error::Status(_, response)) => response,
        Err(error) => panic!("HTTP request failed: {error}"),
    };
    let status = response.status();
    let content_type = response.header("content-type").unwrap_or("").to_string();
    let mut body = String::new();
    response.into_reader().read_to_string(&mut body).unwrap();
    Reply {
        status,
        content_type,
        body,
    }
}

fn first_turn(stream: bool) -> Value {
    json!({
        "model": MODEL,
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "what colour is the square?"},
                {"type": "image_url", "image_url": {"url": image_uri("photo.jpg")}}
            ]}
        ],
        "max_tokens": 8,
        "stream": stream,
        "stream_options": if stream { json!({"include_usage": true}) } else { Value::Null },
    })
}

fn second_turn(answer: &str) -> Value {
    json!({
        "model": MODEL,
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "what colour is the square?"},
                {"type": "image_url", "image_url": {"url": image_uri("photo.jpg")}}
            ]},
            {"role": "assistant", "content": answer},
            {"role": "user", "content": "and the background?"}
        ],
        "max_completion_tokens": 8,
    })
}

#[tokio::test]
async fn a_continuing_conversation_reuses_its_session_and_image() {
    let system = start().await;
    let first = system.post(first_turn(false)).await;
    assert_eq!(first.status, 200, "{}", first.body);
    assert!(first.content_type.starts_with("application/json"));
    let first = first.json();
    assert_eq!(first["object"], "chat.completion");
    assert_eq!(first["model"], MODEL);
    assert_eq!(first["choices"][0]["message"]["role"], "assistant");
    let finish = first["choices"][0]["finish_reason"].as_str().unwrap();
    assert!(finish == "stop" || finish == "length", "{finish}");
    let usage = &first["usage"];
    let completion_tokens = usage["completion_tokens"].as_u64().unwrap();
    assert!((1..=8).contains(&completion_tokens));
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + completion_tokens
    );
    assert_eq!(system.images_encoded().await, 1);

    let answer = first["choices"][0]["message"]["content"].as_str().unwrap();
    let second = system.post(second_turn(answer)).await;
    assert_eq!(second.status, 200, "{}", second.body);
    let second = second.json();
    // The image was not encoded again, the history was not read again, one session holds it.
    assert_eq!(system.images_encoded().await, 1);
    let cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert!(cached > 0, "{}", second["usage"]);
    assert_eq!(system.session_count().await, 1);
    assert_eq!(system.gateway.conversations(), 1);
}

#[tokio::test]
async fn an_unknown_history_starts_a_session_with_it_without_generating_it() {
    let system = start().await;
    let reply = system.post(second_turn("white")).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(system.images_encoded().await, 1);
    assert_eq!(system.session_count().await, 1);

    // A different answer in the history is another conversation: another session, but the
    // image's soft prompt comes from the vision tier's cache.
    let reply = system.post(second_turn("black")).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(system.images_encoded().await, 1);
    assert_eq!(system.session_count().await, 2);
}

/// The `data:` payloads of an SSE body.
fn sse_data(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|line| line.strip_prefix("data: ").or(line.strip_prefix("data:")))
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn streaming_answers_with_openai_chunks_and_done() {
    let system = start().await;
    let reply = system.post(first_turn(true)).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(reply.content_type.starts_with("text/event-stream"));
    let data = sse_data(&reply.body);
    assert_eq!(
        data.last().map(String::as_str),
        Some("[DONE]"),
        "{}",
        reply.body
    );
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert!(chunks.len() >= 4, "{}", reply.body);
    let id = chunks[0]["id"].as_str().unwrap();
    assert!(id.starts_with("chatcmpl-"));
    for chunk in &chunks {
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_eq!(chunk["id"], id);
    }
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let usage_chunk = chunks.last().unwrap();
    assert_eq!(usage_chunk["choices"].as_array().map(Vec::len), Some(0));
    let generated = usage_chunk["usage"]["completion_tokens"].as_u64().unwrap();
    assert!((1..=8).contains(&generated));
    let finish_chunk = &chunks[chunks.len() - 2];
    let finish = finish_chunk["choices"][0]["finish_reason"]
        .as_str()
        .unwrap();
    assert!(finish == "stop" || finish == "length");
    for chunk in &chunks[..chunks.len() - 2] {
        assert!(chunk["choices"][0]["finish_reason"].is_null());
    }
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();

    // The streamed text is the answer the session recorded: the next turn finds the session.
    let reply = system.post(second_turn(&text)).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(system.session_count().await, 1);
    assert_eq!(system.images_encoded().await, 1);
}

#[tokio::test]
async fn a_client_leaving_a_stream_cancels_the_turn() {
    let system = start().await;
    // Text only and a long answer (the fixture model has 256 positions): the client leaves
    // long before the end.
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                      "max_tokens": 240, "stream": true});
    let url = format!("{}/v1/chat/completions", system.http);
    tokio::task::spawn_blocking(move || {
        let response = ureq::post(&url)
            .set("Content-Type", "application/json")
            .send_string(&body.to_string())
            .unwrap();
        let mut lines = BufReader::new(response.into_reader()).lines();
        let first = lines.next().unwrap().unwrap();
        assert!(first.starts_with("data: "), "{first}");
        // Dropping the reader closes the connection.
    })
    .await
    .unwrap();
    // The unfinished turn's session is deleted: nothing leads to it.
    let mut sessions = usize::MAX;
    for _ in 0..100 {
        sessions = system.session_count().await;
        if sessions == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(sessions, 0);
    assert_eq!(system.gateway.conversations(), 0);
}

fn assert_error(reply: &Reply, status: u16, param: Option<&str>) -> Value {
    assert_eq!(reply.status, status, "{}", reply.body);
    assert!(reply.content_type.starts_with("application/json"));
    let body = reply.json();
    let error = &body["error"];
    assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
    assert!(error["type"].is_string());
    if let Some(param) = param {
        assert_eq!(error["param"], param, "{body}");
    }
    body
}

#[tokio::test]
async fn errors_are_openai_json_with_matching_statuses() {
    let system = start_with(|config| config.max_body_bytes = 64 << 10).await;

    let mut body = first_turn(false);
    body["model"] = json!("gpt-4o");
    let error = assert_error(&system.post(body).await, 404, Some("model"));
    assert_eq!(error["error"]["code"], "model_not_found");

    let mut body = first_turn(false);
    body["n"] = json!(2);
    assert_error(&system.post(body).await, 400, Some("n"));

    let mut body = first_turn(false);
    body["messages"][0]["content"][1]["image_url"]["url"] = json!("https://example.com/a.png");
    let error = assert_error(
        &system.post(body).await,
        400,
        Some("messages[0].content[1].image_url.url"),
    );
    assert!(error["error"]["message"]
        .as_str()
        .unwrap()
        .contains("data: URI"));

    let body = json!({"model": MODEL, "messages": [{"role": "assistant", "content": "hi"}]});
    assert_error(&system.post(body).await, 400, Some("messages"));

    let reply = system
        .post_raw("/v1/chat/completions", b"{not json".to_vec(), None)
        .await;
    assert_error(&reply, 400, None);

    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                      "temperature": -1.0});
    assert_error(&system.post(body).await, 400, None);

    let big =
        json!({"model": MODEL, "messages": [{"role": "user", "content": "x".repeat(100_000)}]});
    assert_error(&system.post(big).await, 413, None);

    let reply = system
        .post_raw(
            "/v1/chat/completions",
            first_turn(false).to_string().into_bytes(),
            Some("Basic dTpw"),
        )
        .await;
    assert_error(&reply, 401, None);

    assert_error(&system.get("/v1/nothing").await, 404, None);
    assert_eq!(system.images_encoded().await, 0);
}

#[tokio::test]
async fn models_lists_the_served_checkpoint() {
    let system = start().await;
    let reply = system.get("/v1/models").await;
    assert_eq!(reply.status, 200);
    let list = reply.json();
    assert_eq!(list["object"], "list");
    assert_eq!(list["data"][0]["id"], MODEL);
    assert_eq!(list["data"][0]["object"], "model");
    assert_eq!(system.get(&format!("/v1/models/{MODEL}")).await.status, 200);
    assert_error(&system.get("/v1/models/other").await, 404, Some("model"));
}

#[tokio::test]
async fn a_session_tier_that_is_down_is_503() {
    let dead = {
        let (listener, addr) = listener().await;
        drop(listener);
        addr
    };
    let gateway = Gateway::new(GatewayConfig {
        session_addr: format!("http://{dead}"),
        model_id: MODEL.into(),
        ..GatewayConfig::default()
    })
    .unwrap();
    let (http_listener, http) = listener().await;
    let (_stop, stop) = oneshot::channel::<()>();
    tokio::spawn(blip2_gateway::serve(gateway, http_listener, async {
        let _ = stop.await;
    }));
    let url = format!("http://{http}/v1/chat/completions");
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]});
    let reply = tokio::task::spawn_blocking(move || {
        reply(
            ureq::post(&url)
                .set("Content-Type", "application/json")
                .send_string(&body.to_string()),
        )
    })
    .await
    .unwrap();
    assert_error(&reply, 503, None);
}

/// POSTs a one-message chat completion; the HTTP status.
async fn complete_status(http: &str, auth: Option<&str>) -> u16 {
    let url = format!("{http}/v1/chat/completions");
    let auth = auth.map(str::to_string);
    let body = serde_json::json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 3,
    });
    tokio::task::spawn_blocking(move || {
        let mut request = ureq::post(&url).set("Content-Type", "application/json");
        if let Some(auth) = &auth {
            request = request.set("Authorization", auth);
        }
        match request.send_string(&body.to_string()) {
            Ok(response) => response.status(),
            Err(ureq::Error::Status(status, _)) => status,
            Err(error) => panic!("{error}"),
        }
    })
    .await
    .unwrap()
}

async fn sessions_of_key(session: &str, key: Option<&str>) -> Result<usize, tonic::Status> {
    let mut client = SessionServiceClient::connect(session.to_string())
        .await
        .unwrap();
    let mut request = tonic::Request::new(ListSessionsRequest {});
    if let Some(key) = key {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {key}").parse().unwrap());
    }
    Ok(client
        .list_sessions(request)
        .await?
        .into_inner()
        .sessions
        .len())
}

/// The gateway in front of a session tier that requires API keys: the client's `Authorization:
/// Bearer` header reaches the session tier, so no key is a 401 and a key's sessions are its own.
#[tokio::test]
async fn the_bearer_key_reaches_the_session_tier() {
    const KEY: &str = "gateway-test-key";
    let system = start_configured(
        |session| session.api_key_hashes = vec![blip2_session::auth::hash_key(KEY)],
        |_| {},
    )
    .await;
    assert_eq!(complete_status(&system.http, None).await, 401);
    assert_eq!(
        complete_status(&system.http, Some("Bearer wrong-key")).await,
        401
    );
    assert_eq!(
        complete_status(&system.http, Some(&format!("Bearer {KEY}"))).await,
        200
    );
    // The session the gateway made belongs to the key.
    assert_eq!(
        sessions_of_key(&system.session, Some(KEY)).await.unwrap(),
        1
    );
    let status = sessions_of_key(&system.session, None).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
}
