//! In-test fakes of the vision and LLM tiers on loopback, and a session tier wired to them.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blip2_common::soft_prompt::sha256_hex;
use blip2_proto::v1::generate_input::Kind as InputKind;
use blip2_proto::v1::llm_service_server::{LlmService, LlmServiceServer};
use blip2_proto::v1::session_service_client::SessionServiceClient;
use blip2_proto::v1::vision_service_server::{VisionService, VisionServiceServer};
use blip2_proto::v1::{
    chat_event, generate_output, image_input, prompt_segment, ChatDone, ChatRequest, Dtype,
    EncodeRequest, EncodeResponse, Finish, FinishReason, GenerateInput, GenerateOutput,
    GenerateSetup, LlmInfo, LlmInfoRequest, SoftPrompt, Token, TurnImage, Usage, VisionInfo,
    VisionInfoRequest,
};
use blip2_session::{SessionConfig, SessionTier};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

pub const NUM_QUERY_TOKENS: u32 = 4;
pub const HIDDEN: u32 = 8;
/// What the fake LLM answers, as three token pieces.
pub const PIECES: [&str; 3] = ["A", " red", " ball"];
pub const ANSWER: &str = "A red ball";

/// A vision tier whose soft prompts are the image's sha256 bytes, repeated; counts encodings.
#[derive(Clone, Default)]
pub struct FakeVision {
    pub encoded: Arc<Mutex<Vec<String>>>,
}

impl FakeVision {
    pub fn encoded(&self) -> Vec<String> {
        self.encoded.lock().unwrap().clone()
    }
}

#[tonic::async_trait]
impl VisionService for FakeVision {
    type EncodeStream = tokio_stream::Iter<std::vec::IntoIter<Result<EncodeResponse, Status>>>;

    async fn encode(
        &self,
        request: Request<EncodeRequest>,
    ) -> Result<Response<Self::EncodeStream>, Status> {
        let request = request.into_inner();
        let mut responses = Vec::new();
        for (index, image) in request.images.into_iter().enumerate() {
            let Some(image_input::Source::Data(data)) = image.source else {
                return Err(Status::invalid_argument("fake vision takes bytes only"));
            };
            if data.starts_with(b"not an image") {
                return Err(Status::invalid_argument(format!(
                    "image {index}: cannot decode the image"
                )));
            }
            let sha256 = sha256_hex(&data);
            self.encoded.lock().unwrap().push(sha256.clone());
            let bytes = (NUM_QUERY_TOKENS * HIDDEN * 4) as usize;
            responses.push(Ok(EncodeResponse {
                index: index as u32,
                soft_prompt: Some(SoftPrompt {
                    data: sha256.bytes().cycle().take(bytes).collect(),
                    dtype: Dtype::F32 as i32,
                    shape: vec![NUM_QUERY_TOKENS, HIDDEN],
                    image_sha256: sha256,
                    checkpoint_fingerprint: "fake".into(),
                }),
                cached: false,
            }));
        }
        Ok(Response::new(tokio_stream::iter(responses)))
    }

    async fn info(&self, _: Request<VisionInfoRequest>) -> Result<Response<VisionInfo>, Status> {
        Ok(Response::new(VisionInfo {
            num_query_tokens: NUM_QUERY_TOKENS,
            llm_hidden_size: HIDDEN,
            ..VisionInfo::default()
        }))
    }
}

/// How the fake LLM behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LlmMode {
    /// Streams the three pieces, then finishes.
    Answer,
    /// Streams one piece, then fails with UNAVAILABLE.
    FailMidStream,
    /// As `Answer`, with a pause before each piece.
    Slow,
}

/// What the fake LLM received for one generation.
#[derive(Clone, Debug)]
pub struct Received {
    pub setup: GenerateSetup,
    /// The sha256 carried by each soft prompt, in order.
    pub soft_prompts: Vec<String>,
}

/// An LLM tier that answers [`ANSWER`] and records every setup and soft prompt it receives.
#[derive(Clone)]
pub struct FakeLlm {
    pub mode: LlmMode,
    pub received: Arc<Mutex<Vec<Received>>>,
    pub finished: Arc<AtomicUsize>,
}

impl FakeLlm {
    pub fn new(mode: LlmMode) -> Self {
        Self {
            mode,
            received: Arc::default(),
            finished: Arc::default(),
        }
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }
}

fn token(text: &str) -> Result<GenerateOutput, Status> {
    Ok(GenerateOutput {
        kind: Some(generate_output::Kind::Token(Token {
            id: 1,
            text: text.into(),
            logprob: None,
        })),
    })
}

#[tonic::async_trait]
impl LlmService for FakeLlm {
    type GenerateStream = ReceiverStream<Result<GenerateOutput, Status>>;

    async fn generate(
        &self,
        request: Request<Streaming<GenerateInput>>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let mut inputs = request.into_inner();
        let setup = match inputs.message().await?.and_then(|m| m.kind) {
            Some(InputKind::Setup(setup)) => setup,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message must be `setup`",
                ))
            }
        };
        let placeholders: Vec<String> = setup
            .segments
            .iter()
            .filter_map(|s| match &s.kind {
                Some(prompt_segment::Kind::Image(image)) => Some(image.image_sha256.clone()),
                _ => None,
            })
            .collect();
        let mut soft_prompts = Vec::new();
        for expected in &placeholders {
            match inputs.message().await?.and_then(|m| m.kind) {
                Some(InputKind::SoftPrompt(prompt)) => {
                    if &prompt.image_sha256 != expected {
                        return Err(Status::invalid_argument("soft prompt out of order"));
                    }
                    soft_prompts.push(prompt.image_sha256);
                }
                _ => return Err(Status::invalid_argument("expected a soft prompt")),
            }
        }
        self.received.lock().unwrap().push(Received {
            setup,
            soft_prompts,
        });
        let (sender, receiver) = mpsc::channel(8);
        let mode = self.mode;
        let finished = self.finished.clone();
        tokio::spawn(async move {
            for (i, piece) in PIECES.iter().enumerate() {
                if mode == LlmMode::Slow {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                if mode == LlmMode::FailMidStream && i == 1 {
                    let _ = sender
                        .send(Err(Status::unavailable("replica lost its accelerator")))
                        .await;
                    return;
                }
                if sender.send(token(piece)).await.is_err() {
                    return;
                }
            }
            let finish = Finish {
                reason: FinishReason::Eos as i32,
                usage: Some(Usage {
                    prompt_tokens: 10,
                    generated_tokens: 3,
                    cached_prompt_tokens: 0,
                }),
                text: ANSWER.into(),
            };
            let output = GenerateOutput {
                kind: Some(generate_output::Kind::Finish(finish)),
            };
            if sender.send(Ok(output)).await.is_ok() {
                finished.fetch_add(1, Ordering::SeqCst);
            }
        });
        Ok(Response::new(ReceiverStream::new(receiver)))
    }

    async fn info(&self, _: Request<LlmInfoRequest>) -> Result<Response<LlmInfo>, Status> {
        Ok(Response::new(LlmInfo {
            model_type: "opt".into(),
            hidden_size: HIDDEN,
            num_query_tokens: NUM_QUERY_TOKENS,
            max_positions: 2048,
            dtype: Dtype::F32 as i32,
            ..LlmInfo::default()
        }))
    }
}

/// A loopback address nothing listens on.
pub async fn dead_address() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}")
}

async fn spawn_server<F>(serve: F) -> SocketAddr
where
    F: FnOnce(TcpListenerStream) -> tokio::task::JoinHandle<()>,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    serve(TcpListenerStream::new(listener));
    addr
}

pub async fn spawn_vision(vision: FakeVision) -> String {
    let addr = spawn_server(|incoming| {
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(VisionServiceServer::new(vision))
                .serve_with_incoming(incoming)
                .await
                .unwrap();
        })
    })
    .await;
    format!("http://{addr}")
}

pub async fn spawn_llm(llm: FakeLlm) -> String {
    let addr = spawn_server(|incoming| {
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(LlmServiceServer::new(llm))
                .serve_with_incoming(incoming)
                .await
                .unwrap();
        })
    })
    .await;
    format!("http://{addr}")
}

/// The fakes and a session tier in front of them.
pub struct Harness {
    pub vision: FakeVision,
    pub llm: FakeLlm,
    pub client: SessionServiceClient<Channel>,
    _shutdown: oneshot::Sender<()>,
}

impl Harness {
    pub async fn start(mode: LlmMode) -> Self {
        Self::with_config(mode, |_| {}).await
    }

    /// Starts the fakes and a session tier; `configure` adjusts its config (addresses are set).
    pub async fn with_config(mode: LlmMode, configure: impl FnOnce(&mut SessionConfig)) -> Self {
        let vision = FakeVision::default();
        let llm = FakeLlm::new(mode);
        let mut config = SessionConfig {
            vision_addrs: vec![spawn_vision(vision.clone()).await],
            llm_addrs: vec![spawn_llm(llm.clone()).await],
            ..SessionConfig::default()
        };
        configure(&mut config);
        let tier = SessionTier::new(config).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (shutdown, stop) = oneshot::channel::<()>();
        tokio::spawn(async move {
            blip2_session::serve(tier, listener, async {
                let _ = stop.await;
            })
            .await
            .unwrap();
        });
        let client = SessionServiceClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        Self {
            vision,
            llm,
            client,
            _shutdown: shutdown,
        }
    }
}

/// A deterministic "image file" (the fakes never decode it).
pub fn image_bytes(name: &str) -> Vec<u8> {
    format!("fake image file {name}").into_bytes()
}

pub fn with_bytes(data: Vec<u8>) -> TurnImage {
    TurnImage {
        source: Some(blip2_proto::v1::turn_image::Source::Data(data)),
    }
}

pub fn with_id(id: &str) -> TurnImage {
    TurnImage {
        source: Some(blip2_proto::v1::turn_image::Source::ImageId(id.to_string())),
    }
}

pub fn chat_request(session_id: &str, text: &str, images: Vec<TurnImage>) -> ChatRequest {
    ChatRequest {
        session_id: session_id.to_string(),
        text: text.to_string(),
        images,
        params: None,
        idempotency_key: String::new(),
    }
}

/// Runs one turn: the text pieces and the final event, or the status that ended it (from the
/// call or from the stream).
pub async fn chat(
    client: &mut SessionServiceClient<Channel>,
    request: ChatRequest,
) -> Result<(Vec<String>, ChatDone), Status> {
    let mut stream = client.chat(request).await?.into_inner();
    let mut pieces = Vec::new();
    while let Some(event) = stream.message().await? {
        match event.kind {
            Some(chat_event::Kind::Text(text)) => pieces.push(text),
            Some(chat_event::Kind::Done(done)) => {
                assert!(stream.message().await?.is_none(), "events after `done`");
                return Ok((pieces, done));
            }
            None => {}
        }
    }
    Err(Status::internal("the stream ended without `done`"))
}
