//! The gateway in front of a session tier that requires API keys: the client's `Authorization:
//! Bearer` header reaches the session tier, so no key is a 401 and a key's sessions are its own.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use blip2_gateway::{Gateway, GatewayConfig};
use blip2_model::model::{Blip2Model, LoadOptions};
use blip2_proto::v1::session_service_client::SessionServiceClient;
use blip2_proto::v1::ListSessionsRequest;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

const MODEL: &str = "opt-a";
const KEY: &str = "gateway-test-key";

fn fixture(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(path)
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

/// POSTs a one-message chat completion; the HTTP status.
async fn complete(http: &str, auth: Option<&str>) -> u16 {
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

async fn sessions_of(session: &str, key: Option<&str>) -> Result<usize, tonic::Status> {
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

#[tokio::test]
async fn the_bearer_key_reaches_the_session_tier() {
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
    let session_tier = blip2_session::SessionTier::new(blip2_session::SessionConfig {
        vision_addrs: vec![format!("http://{vision}")],
        llm_addrs: vec![format!("http://{llm}")],
        model_dir: Some(dir),
        api_key_hashes: vec![blip2_session::auth::hash_key(KEY)],
        ..blip2_session::SessionConfig::default()
    })
    .unwrap();
    tokio::spawn(blip2_session::serve(
        session_tier,
        session_listener,
        stop_signal(&mut stops),
    ));
    let gateway = Gateway::new(GatewayConfig {
        session_addr: format!("http://{session}"),
        model_id: MODEL.into(),
        ..GatewayConfig::default()
    })
    .unwrap();
    tokio::spawn(blip2_gateway::serve(
        gateway,
        http_listener,
        stop_signal(&mut stops),
    ));
    let http = format!("http://{http}");
    let session = format!("http://{session}");

    assert_eq!(complete(&http, None).await, 401);
    assert_eq!(complete(&http, Some("Bearer wrong-key")).await, 401);
    assert_eq!(complete(&http, Some(&format!("Bearer {KEY}"))).await, 200);
    // The session the gateway made belongs to the key.
    assert_eq!(sessions_of(&session, Some(KEY)).await.unwrap(), 1);
    let status = sessions_of(&session, None).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
}
