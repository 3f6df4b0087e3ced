//! Shared by the service tests: the opt-a checkpoint, a served tier on loopback, soft prompts
//! and direct generation to compare with.

#![allow(dead_code)]

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::Result;
use blip2_common::soft_prompt::{encode_2d, sha256_hex};
use blip2_llm::{serve, LlmConfig, LlmTier};
use blip2_model::generation::{self, GenerationOutput, GenerationParams, TokenEvent};
use blip2_model::model::{Blip2Model, LoadOptions};
use blip2_proto::v1::llm_service_client::LlmServiceClient;
use blip2_proto::v1::{
    generate_input, generate_output, prompt_segment, Finish, GenerateInput, GenerateSetup,
    ImagePlaceholder, PromptSegment, SoftPrompt, Token,
};
use candle_core::{DType, Tensor};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::Status;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// A fixture checkpoint (vision included, to make soft prompts), loaded once per test binary.
pub fn load(name: &str) -> Arc<Blip2Model> {
    static MODELS: OnceLock<Mutex<HashMap<String, Arc<Blip2Model>>>> = OnceLock::new();
    let mut models = MODELS
        .get_or_init(Default::default)
        .lock()
        .expect("model cache");
    models
        .entry(name.to_string())
        .or_insert_with(|| {
            let dir = fixtures().join("models").join(name);
            Arc::new(Blip2Model::load(&dir, &LoadOptions::default()).expect("loading a fixture"))
        })
        .clone()
}

/// The opt-a checkpoint most tests serve.
pub fn model() -> Arc<Blip2Model> {
    load("opt-a")
}

pub fn image(name: &str) -> Vec<u8> {
    std::fs::read(fixtures().join("images").join(name)).expect("reading a fixture image")
}

/// An image's soft prompt `[num_query_tokens, hidden]` (f32) and its sha256, by opt-a.
pub fn soft_prompt_of(name: &str) -> (Tensor, String) {
    soft_prompt_by(&model(), name)
}

/// An image's soft prompt by `model`.
pub fn soft_prompt_by(model: &Blip2Model, name: &str) -> (Tensor, String) {
    let bytes = image(name);
    let encoding = model.encode_images(&[&bytes]).expect("encoding");
    let tensor = encoding.soft_prompt.get(0).expect("first image");
    (tensor, sha256_hex(&bytes))
}

/// A soft prompt on the wire in `dtype`, made by opt-a.
pub fn wire(tensor: &Tensor, sha256: &str, dtype: DType) -> SoftPrompt {
    wire_by(&model(), tensor, sha256, dtype)
}

pub fn wire_by(model: &Blip2Model, tensor: &Tensor, sha256: &str, dtype: DType) -> SoftPrompt {
    encode_2d(tensor, dtype, sha256, model.fingerprint()).expect("encoding a soft prompt")
}

pub struct Server {
    pub tier: LlmTier,
    pub client: LlmServiceClient<Channel>,
    pub addr: std::net::SocketAddr,
    _stop: oneshot::Sender<()>,
}

/// Serves opt-a on 127.0.0.1:0 until the returned value is dropped.
pub async fn start(config: LlmConfig) -> Result<Server> {
    start_with(model(), "opt-a", config).await
}

/// Serves `model` on 127.0.0.1:0 until the returned value is dropped.
pub async fn start_with(model: Arc<Blip2Model>, name: &str, config: LlmConfig) -> Result<Server> {
    let tier = LlmTier::new(model, name.into(), config)?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(serve(tier.clone(), listener, async {
        stopped.await.ok();
    }));
    let client = LlmServiceClient::connect(format!("http://{addr}")).await?;
    Ok(Server {
        tier,
        client,
        addr,
        _stop: stop,
    })
}

pub fn text(t: &str) -> PromptSegment {
    PromptSegment {
        kind: Some(prompt_segment::Kind::Text(t.to_string())),
    }
}

pub fn placeholder(sha256: &str) -> PromptSegment {
    PromptSegment {
        kind: Some(prompt_segment::Kind::Image(ImagePlaceholder {
            image_sha256: sha256.to_string(),
        })),
    }
}

pub fn setup(
    segments: Vec<PromptSegment>,
    params: blip2_proto::v1::GenerationParams,
) -> GenerateInput {
    GenerateInput {
        kind: Some(generate_input::Kind::Setup(GenerateSetup {
            segments,
            params: Some(params),
        })),
    }
}

pub fn soft(prompt: SoftPrompt) -> GenerateInput {
    GenerateInput {
        kind: Some(generate_input::Kind::SoftPrompt(prompt)),
    }
}

/// What a Generate call streamed.
#[derive(Debug)]
pub struct Streamed {
    pub tokens: Vec<Token>,
    pub finish: Option<Finish>,
}

/// Sends `inputs`, closes the input, and collects the response (or its error status).
pub async fn call(
    client: &mut LlmServiceClient<Channel>,
    inputs: Vec<GenerateInput>,
) -> Result<Streamed, Status> {
    let (sender, receiver) = mpsc::channel(16);
    for input in inputs {
        sender.send(input).await.expect("queueing input");
    }
    drop(sender);
    let response = client.generate(ReceiverStream::new(receiver)).await?;
    collect(response.into_inner()).await
}

pub async fn collect(
    mut stream: tonic::Streaming<blip2_proto::v1::GenerateOutput>,
) -> Result<Streamed, Status> {
    let mut streamed = Streamed {
        tokens: Vec::new(),
        finish: None,
    };
    while let Some(message) = stream.message().await? {
        match message.kind {
            Some(generate_output::Kind::Token(token)) => {
                assert!(streamed.finish.is_none(), "a token after Finish");
                streamed.tokens.push(token);
            }
            Some(generate_output::Kind::Finish(finish)) => {
                assert!(streamed.finish.is_none(), "two Finish messages");
                streamed.finish = Some(finish);
            }
            None => panic!("an empty output message"),
        }
    }
    Ok(streamed)
}

/// Generates directly with opt-a on `text` and f32 soft prompts, as `blip2 generate`.
pub fn direct(
    text: &str,
    soft_prompts: &[Tensor],
    params: &GenerationParams,
) -> (GenerationOutput, Vec<TokenEvent>, usize) {
    direct_by(&model(), text, soft_prompts, params)
}

/// Generates directly with `model`; also returns the streamed events and prompt positions.
pub fn direct_by(
    model: &Blip2Model,
    text: &str,
    soft_prompts: &[Tensor],
    params: &GenerationParams,
) -> (GenerationOutput, Vec<TokenEvent>, usize) {
    let prompt = model
        .build_prompt(text, soft_prompts.len())
        .expect("building the prompt");
    let embeds = model
        .prompt_embeds(&prompt, soft_prompts)
        .expect("prompt embeddings");
    let mut events = Vec::new();
    let output = generation::generate(
        model.language_model().expect("language model").as_ref(),
        &embeds,
        &model.penalty_context(&prompt),
        params,
        Some(model.prompt_tokenizer().tokenizer()),
        &mut |event| {
            events.push(event.clone());
            ControlFlow::Continue(())
        },
    )
    .expect("direct generation");
    (output, events, prompt.num_positions)
}

/// Greedy parameters as `blip2 generate` builds them for opt-a.
pub fn greedy(max_new_tokens: usize) -> GenerationParams {
    greedy_by(&model(), max_new_tokens)
}

pub fn greedy_by(model: &Blip2Model, max_new_tokens: usize) -> GenerationParams {
    GenerationParams {
        max_new_tokens,
        eos_token_ids: model.generation_defaults().eos_token_ids.clone(),
        ..GenerationParams::default()
    }
}

/// A soft prompt rounded through `dtype` and back to f32.
pub fn rounded(tensor: &Tensor, dtype: DType) -> Tensor {
    tensor
        .to_dtype(dtype)
        .and_then(|t| t.to_dtype(DType::F32))
        .expect("rounding")
}
