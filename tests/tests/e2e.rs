//! End to end: the three tiers as separate `blip2 serve` processes on ephemeral loopback ports
//! with the small committed checkpoint, driven through SessionService.

mod common;

use std::ops::ControlFlow;

use blip2_model::generation::{self, GenerationParams};
use blip2_model::model::{Blip2Model, LoadOptions};
use blip2_proto::v1::session_service_client::SessionServiceClient;
use blip2_proto::v1::vision_service_client::VisionServiceClient;
use blip2_proto::v1::{
    chat_event, turn_image, ChatRequest, CreateSessionRequest, GetSessionRequest, PromptTemplate,
    TurnImage, VisionInfoRequest,
};
use candle_core::{DType, IndexOp, Tensor};
use tokio_stream::StreamExt;
use tonic::Code;

use common::{fixture, spawn, Tier};

const MAX_NEW_TOKENS: u32 = 10;

struct System {
    vision: Tier,
    _llm: Tier,
    session: Tier,
}

fn start_system(model: &str, llm_model: &str, session_flags: &[&str]) -> System {
    let model_dir = fixture(&format!("models/{model}"));
    let llm_dir = fixture(&format!("models/{llm_model}"));
    let model_dir = model_dir.to_str().expect("utf-8 path");
    let llm_dir = llm_dir.to_str().expect("utf-8 path");
    let vision = spawn(&["vision", "--listen", "127.0.0.1:0", "--model", model_dir]);
    let llm = spawn(&["llm", "--listen", "127.0.0.1:0", "--model", llm_dir]);
    let mut args = vec![
        "session",
        "--listen",
        "127.0.0.1:0",
        "--model",
        model_dir,
        "--vision",
        &vision.addr,
        "--llm",
        &llm.addr,
    ];
    args.extend_from_slice(session_flags);
    let session = spawn(&args);
    System {
        vision,
        _llm: llm,
        session,
    }
}

struct TurnResult {
    pieces: Vec<String>,
    text: String,
    turn_id: String,
    /// Prompt positions whose KV the LLM tier took from its prefix cache.
    cached_prompt_tokens: u32,
    prompt_tokens: u32,
}

async fn chat(
    client: &mut SessionServiceClient<tonic::transport::Channel>,
    session_id: &str,
    text: &str,
    images: &[&str],
) -> Result<TurnResult, tonic::Status> {
    let images = images
        .iter()
        .map(|name| TurnImage {
            source: Some(turn_image::Source::Data(
                std::fs::read(fixture(&format!("images/{name}"))).expect("fixture image"),
            )),
        })
        .collect();
    let request = ChatRequest {
        session_id: session_id.to_string(),
        text: text.to_string(),
        images,
        params: Some(blip2_proto::v1::GenerationParams {
            max_new_tokens: Some(MAX_NEW_TOKENS),
            ..Default::default()
        }),
        idempotency_key: String::new(),
    };
    let mut stream = client.chat(request).await?.into_inner();
    let mut pieces = Vec::new();
    while let Some(event) = stream.next().await {
        match event?.kind {
            Some(chat_event::Kind::Text(piece)) => pieces.push(piece),
            Some(chat_event::Kind::Done(done)) => {
                let usage = done.usage.unwrap_or_default();
                return Ok(TurnResult {
                    pieces,
                    text: done.text,
                    turn_id: done.turn_id,
                    cached_prompt_tokens: usage.cached_prompt_tokens,
                    prompt_tokens: usage.prompt_tokens,
                });
            }
            None => {}
        }
    }
    Err(tonic::Status::internal(
        "stream ended without a final event",
    ))
}

/// What the model library itself generates for a dialogue's prompt (the reference for the tiers).
fn library_answer(
    model: &Blip2Model,
    history: &[(String, String, Vec<String>)],
    question: &str,
    new_images: &[String],
    image_files: &[(&str, String)],
    wire_dtype: DType,
) -> String {
    let segments =
        blip2_session::build_segments(&PromptTemplate::default(), history, (question, new_images));
    let text = blip2_llm::prompt_text(&segments);
    // Soft prompts in placeholder order, rounded through the wire dtype as the tiers send them.
    let mut soft_prompts = Vec::new();
    for segment in &segments {
        if let Some(blip2_proto::v1::prompt_segment::Kind::Image(placeholder)) = &segment.kind {
            let (file, _) = image_files
                .iter()
                .find(|(_, sha)| *sha == placeholder.image_sha256)
                .expect("placeholder of a known image");
            let bytes = std::fs::read(fixture(&format!("images/{file}"))).expect("image");
            let encoding = model.encode_images(&[bytes.as_slice()]).expect("encode");
            let soft = encoding.soft_prompt.i(0).expect("soft prompt");
            let soft = soft
                .to_dtype(wire_dtype)
                .and_then(|t| t.to_dtype(DType::F32));
            soft_prompts.push(soft.expect("dtype round trip"));
        }
    }
    let prompt = model
        .build_prompt(&text, soft_prompts.len())
        .expect("prompt");
    let embeds: Tensor = model.prompt_embeds(&prompt, &soft_prompts).expect("embeds");
    let params = GenerationParams {
        max_new_tokens: MAX_NEW_TOKENS as usize,
        eos_token_ids: model.generation_defaults().eos_token_ids.clone(),
        ..GenerationParams::default()
    };
    let mut ignore = |_: &generation::TokenEvent| ControlFlow::Continue(());
    generation::generate(
        model.language_model().expect("lm").as_ref(),
        &embeds,
        &model.penalty_context(&prompt),
        &params,
        Some(model.prompt_tokenizer().tokenizer()),
        &mut ignore,
    )
    .expect("generate")
    .text
}

fn sha(file: &str) -> String {
    blip2_common_sha(&std::fs::read(fixture(&format!("images/{file}"))).expect("image"))
}

fn blip2_common_sha(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let digest = <sha2::Sha256 as sha2::Digest>::digest(bytes);
    digest.iter().fold(String::new(), |mut s, b| {
        write!(s, "{b:02x}").ok();
        s
    })
}

async fn three_turn_dialogue(wire_dtype: DType, session_flags: &[&str]) {
    let system = start_system("opt-a", "opt-a", session_flags);
    let model = Blip2Model::load(&fixture("models/opt-a"), &LoadOptions::default()).expect("model");
    let mut client = SessionServiceClient::connect(system.session.addr.clone())
        .await
        .expect("connect");
    let session_id = client
        .create_session(CreateSessionRequest::default())
        .await
        .expect("create")
        .into_inner()
        .session_id;
    let files = [
        ("wide.png", sha("wide.png")),
        ("photo.jpg", sha("photo.jpg")),
    ];
    let turns: [(&str, Vec<&str>); 3] = [
        ("what is in the picture?", vec!["wide.png"]),
        ("and in this one?", vec!["photo.jpg"]),
        ("which is brighter?", vec![]),
    ];
    let mut history: Vec<(String, String, Vec<String>)> = Vec::new();
    let mut turn_ids = Vec::new();
    for (question, images) in &turns {
        let result = chat(&mut client, &session_id, question, images)
            .await
            .expect("chat turn");
        assert_eq!(
            result.pieces.concat(),
            result.text,
            "streamed pieces joined = final text"
        );
        let new_shas: Vec<String> = images.iter().map(|f| sha(f)).collect();
        let expected = library_answer(&model, &history, question, &new_shas, &files, wire_dtype);
        assert_eq!(
            result.text, expected,
            "turn {question:?}: tiers = model library"
        );
        // Later turns begin with the earlier prompt and answer: the LLM tier (one replica,
        // prefix cache on by default) computes only the new positions, with the same answer.
        if history.is_empty() {
            assert_eq!(result.cached_prompt_tokens, 0);
        } else {
            assert!(
                result.cached_prompt_tokens > 0
                    && result.cached_prompt_tokens < result.prompt_tokens,
                "turn {question:?}: {} of {} prompt positions cached",
                result.cached_prompt_tokens,
                result.prompt_tokens
            );
        }
        history.push((question.to_string(), result.text.clone(), new_shas));
        turn_ids.push(result.turn_id);
    }
    // The vision tier encoded each image exactly once.
    let mut vision = VisionServiceClient::connect(system.vision.addr.clone())
        .await
        .expect("connect vision");
    let info = vision
        .info(VisionInfoRequest {})
        .await
        .expect("info")
        .into_inner();
    assert_eq!(info.images_encoded, 2, "each image encoded once");
    // GetSession returns the turns in order.
    let session = client
        .get_session(GetSessionRequest {
            session_id: session_id.clone(),
        })
        .await
        .expect("get")
        .into_inner();
    let questions: Vec<&str> = session.turns.iter().map(|t| t.question.as_str()).collect();
    assert_eq!(questions, turns.iter().map(|t| t.0).collect::<Vec<_>>());
    let ids: Vec<&str> = session.turns.iter().map(|t| t.turn_id.as_str()).collect();
    assert_eq!(ids, turn_ids.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(session.images.len(), 2);
    assert_eq!(session.turns[1].image_ids.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_turns_with_two_images_match_the_model_library() {
    three_turn_dialogue(DType::F32, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soft_prompts_sent_as_f16_add_no_drift_beyond_rounding() {
    three_turn_dialogue(DType::F16, &["--soft-prompt-dtype", "f16"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_isolated_and_errors_leave_them_unchanged() {
    let system = start_system("opt-a", "opt-a", &[]);
    let mut client = SessionServiceClient::connect(system.session.addr.clone())
        .await
        .expect("connect");
    let new_session = || {
        let mut client = client.clone();
        async move {
            client
                .create_session(CreateSessionRequest::default())
                .await
                .expect("create")
                .into_inner()
                .session_id
        }
    };
    let (a, b) = (new_session().await, new_session().await);
    let (mut ca, mut cb) = (client.clone(), client.clone());
    let (ra, rb) = tokio::join!(
        chat(&mut ca, &a, "what is this?", &["gray.png"]),
        chat(&mut cb, &b, "and this?", &["rgba.png"]),
    );
    ra.expect("turn a");
    rb.expect("turn b");
    for (id, question, image) in [
        (&a, "what is this?", "gray.png"),
        (&b, "and this?", "rgba.png"),
    ] {
        let session = client
            .get_session(GetSessionRequest {
                session_id: id.clone(),
            })
            .await
            .expect("get")
            .into_inner();
        assert_eq!(session.turns.len(), 1);
        assert_eq!(session.turns[0].question, question);
        assert_eq!(session.images.len(), 1);
        assert_eq!(session.images[0].sha256, sha(image));
    }
    // An undecodable image: INVALID_ARGUMENT, and the session keeps exactly its one turn.
    let mut bad = client.clone();
    let request = ChatRequest {
        session_id: a.clone(),
        text: "and now?".into(),
        images: vec![TurnImage {
            source: Some(turn_image::Source::Data(b"not an image".to_vec())),
        }],
        params: None,
        idempotency_key: String::new(),
    };
    let status = match bad.chat(request).await {
        Err(status) => status,
        Ok(response) => {
            let mut stream = response.into_inner();
            loop {
                match stream.next().await {
                    Some(Err(status)) => break status,
                    Some(Ok(_)) => continue,
                    None => panic!("an undecodable image must fail the turn"),
                }
            }
        }
    };
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let session = client
        .get_session(GetSessionRequest { session_id: a })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(session.turns.len(), 1);
    // Unknown session: NOT_FOUND; an empty turn: INVALID_ARGUMENT.
    let err = chat(&mut client, &"0".repeat(32), "hi", &[])
        .await
        .err()
        .expect("error");
    assert_eq!(err.code(), Code::NotFound);
    let err = chat(&mut client, &b, "", &[]).await.err().expect("error");
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_llm_tier_serving_another_checkpoint_is_refused() {
    // Vision and session on opt-a, the LLM tier on t5-a: soft prompts carry opt-a's fingerprint.
    let system = start_system("opt-a", "t5-a", &[]);
    let mut client = SessionServiceClient::connect(system.session.addr.clone())
        .await
        .expect("connect");
    let id = client
        .create_session(CreateSessionRequest::default())
        .await
        .expect("create")
        .into_inner()
        .session_id;
    let err = chat(&mut client, &id, "what is this?", &["wide.png"])
        .await
        .err()
        .expect("a mismatched checkpoint must be refused");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
}
