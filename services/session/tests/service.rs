//! The session tier against fake vision and LLM tiers on loopback.

mod common;

use std::time::Duration;

use blip2_common::soft_prompt::sha256_hex;
use blip2_proto::v1::prompt_segment::Kind;
use blip2_proto::v1::{
    chat_event, CreateSessionRequest, DeleteSessionRequest, FinishReason, GetSessionRequest,
    ListSessionsRequest, PromptTemplate, Session, UploadImageChunk,
};
use blip2_session::prompt::default_template;
use blip2_session::{build_segments, PastTurn};
use common::*;
use tonic::Code;

async fn create(harness: &mut Harness) -> String {
    harness
        .client
        .create_session(CreateSessionRequest::default())
        .await
        .unwrap()
        .into_inner()
        .session_id
}

async fn get(harness: &mut Harness, session_id: &str) -> Session {
    harness
        .client
        .get_session(GetSessionRequest {
            session_id: session_id.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

fn placeholders(segments: &[blip2_proto::v1::PromptSegment]) -> Vec<String> {
    segments
        .iter()
        .filter_map(|s| match &s.kind {
            Some(Kind::Image(image)) => Some(image.image_sha256.clone()),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn three_turn_dialogue_with_two_images() {
    let mut h = Harness::start(LlmMode::Answer).await;
    let session_id = create(&mut h).await;
    let (dog, cat) = (image_bytes("dog"), image_bytes("cat"));
    let (dog_sha, cat_sha) = (sha256_hex(&dog), sha256_hex(&cat));

    let questions = ["What is this?", "And this one?", "Which is bigger?"];
    let images = [vec![with_bytes(dog)], vec![with_bytes(cat)], vec![]];
    let mut turn_ids = Vec::new();
    for (question, images) in questions.iter().zip(images) {
        let (pieces, done) = chat(&mut h.client, chat_request(&session_id, question, images))
            .await
            .unwrap();
        assert_eq!(pieces, PIECES);
        assert_eq!(pieces.concat(), done.text);
        assert_eq!(done.text, ANSWER);
        assert_eq!(done.finish_reason, FinishReason::Eos as i32);
        assert_eq!(done.turn_id.len(), 32);
        turn_ids.push(done.turn_id);
    }

    let session = get(&mut h, &session_id).await;
    let recorded: Vec<_> = session.turns.iter().map(|t| t.question.as_str()).collect();
    assert_eq!(recorded, questions);
    let ids: Vec<_> = session.turns.iter().map(|t| t.turn_id.clone()).collect();
    assert_eq!(ids, turn_ids);
    assert!(session.turns.iter().all(|t| t.answer == ANSWER));
    assert_eq!(session.images.len(), 2);
    assert_eq!(session.images[0].sha256, dog_sha);
    assert_eq!(session.images[0].turn_index, 0);
    assert_eq!(session.images[1].sha256, cat_sha);
    assert_eq!(session.images[1].turn_index, 1);
    assert_eq!(
        session.turns[0].image_ids,
        vec![session.images[0].image_id.clone()]
    );
    assert_eq!(
        session.turns[1].image_ids,
        vec![session.images[1].image_id.clone()]
    );
    assert!(session.turns[2].image_ids.is_empty());

    // Each image went through the vision tier once, at the turn it was attached.
    assert_eq!(h.vision.encoded(), vec![dog_sha.clone(), cat_sha.clone()]);

    let received = h.llm.received();
    assert_eq!(received.len(), 3);
    let third = &received[2];
    assert_eq!(
        placeholders(&third.setup.segments),
        vec![dog_sha.clone(), cat_sha.clone()]
    );
    assert_eq!(third.soft_prompts, vec![dog_sha.clone(), cat_sha.clone()]);
    let past: Vec<PastTurn> = vec![
        (questions[0].into(), ANSWER.into(), vec![dog_sha.clone()]),
        (questions[1].into(), ANSWER.into(), vec![cat_sha.clone()]),
    ];
    let expected = build_segments(&default_template(), &past, (questions[2], &[]));
    assert_eq!(third.setup.segments, expected);
    // The image placeholders sit at their turns: image, turn 1, image, turn 2 + turn 3.
    assert!(
        matches!(&third.setup.segments[0].kind, Some(Kind::Image(i)) if i.image_sha256 == dog_sha)
    );
    assert!(
        matches!(&third.setup.segments[1].kind, Some(Kind::Text(t)) if t == "Question: What is this? Answer: A red ball. ")
    );
    assert!(
        matches!(&third.setup.segments[2].kind, Some(Kind::Image(i)) if i.image_sha256 == cat_sha)
    );
    assert!(
        matches!(&third.setup.segments[3].kind, Some(Kind::Text(t)) if t == "Question: And this one? Answer: A red ball. Question: Which is bigger? Answer:")
    );
    // The first turn's prompt is the LAVIS one: the soft prompt, then the question.
    let first = &received[0].setup.segments;
    assert_eq!(
        first,
        &build_segments(&default_template(), &[], (questions[0], &[dog_sha]))
    );
}

#[tokio::test]
async fn failing_llm_records_nothing() {
    let mut h = Harness::start(LlmMode::FailMidStream).await;
    let session_id = create(&mut h).await;
    let error = chat(
        &mut h.client,
        chat_request(
            &session_id,
            "What is this?",
            vec![with_bytes(image_bytes("dog"))],
        ),
    )
    .await
    .unwrap_err();
    assert_eq!(error.code(), Code::Unavailable);
    assert!(error.message().contains("LLM"), "{}", error.message());
    let session = get(&mut h, &session_id).await;
    assert!(session.turns.is_empty());
    assert!(session.images.is_empty());
}

#[tokio::test]
async fn undecodable_image_is_invalid_and_leaves_the_session_unchanged() {
    let mut h = Harness::start(LlmMode::Answer).await;
    let session_id = create(&mut h).await;
    let bad = with_bytes(b"not an image at all".to_vec());
    let error = chat(&mut h.client, chat_request(&session_id, "hi", vec![bad]))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(
        error.message().contains("cannot decode"),
        "{}",
        error.message()
    );
    let session = get(&mut h, &session_id).await;
    assert!(session.turns.is_empty() && session.images.is_empty());
    assert!(h.llm.received().is_empty());
}

#[tokio::test]
async fn unknown_session_is_not_found() {
    let mut h = Harness::start(LlmMode::Answer).await;
    let error = chat(&mut h.client, chat_request("0123", "hi", vec![]))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::NotFound);
    let get = h
        .client
        .get_session(GetSessionRequest {
            session_id: "0123".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(get.code(), Code::NotFound);
    let delete = h
        .client
        .delete_session(DeleteSessionRequest {
            session_id: "0123".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(delete.code(), Code::NotFound);
}

#[tokio::test]
async fn empty_turn_is_invalid() {
    let mut h = Harness::start(LlmMode::Answer).await;
    let session_id = create(&mut h).await;
    for text in ["", "   "] {
        let error = chat(&mut h.client, chat_request(&session_id, text, vec![]))
            .await
            .unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument);
    }
    let error = chat(
        &mut h.client,
        chat_request(&session_id, "hi", vec![with_bytes(Vec::new())]),
    )
    .await
    .unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(h.llm.received().is_empty());
}

#[tokio::test]
async fn template_without_question_is_invalid() {
    let mut h = Harness::start(LlmMode::Answer).await;
    let error = h
        .client
        .create_session(CreateSessionRequest {
            template: Some(PromptTemplate {
                current_turn: "Answer:".into(),
                ..default_template()
            }),
            default_params: None,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn parallel_sessions_stay_apart() {
    let h = Harness::start(LlmMode::Answer).await;
    let mut client = h.client.clone();
    let mut ids = Vec::new();
    for _ in 0..2 {
        ids.push(
            client
                .create_session(CreateSessionRequest::default())
                .await
                .unwrap()
                .into_inner()
                .session_id,
        );
    }
    let run = |session_id: String, name: &'static str| {
        let mut client = h.client.clone();
        async move {
            for turn in 0..3 {
                let image = image_bytes(&format!("{name}-{turn}"));
                let request = chat_request(&session_id, name, vec![with_bytes(image)]);
                chat(&mut client, request).await.unwrap();
            }
        }
    };
    tokio::join!(run(ids[0].clone(), "left"), run(ids[1].clone(), "right"));

    for (session_id, name) in ids.iter().zip(["left", "right"]) {
        let session = client
            .get_session(GetSessionRequest {
                session_id: session_id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(session.turns.len(), 3);
        assert!(session.turns.iter().all(|t| t.question == name));
        let own: Vec<String> = (0..3)
            .map(|turn| sha256_hex(&image_bytes(&format!("{name}-{turn}"))))
            .collect();
        let shas: Vec<String> = session.images.iter().map(|i| i.sha256.clone()).collect();
        assert_eq!(shas, own);
    }
    // Every prompt the LLM saw holds one session's images and questions only.
    for received in h.llm.received() {
        let images = placeholders(&received.setup.segments);
        let name = if received
            .setup
            .segments
            .iter()
            .any(|s| matches!(&s.kind, Some(Kind::Text(t)) if t.contains("left")))
        {
            "left"
        } else {
            "right"
        };
        let other = if name == "left" { "right" } else { "left" };
        for sha in images {
            assert!((0..3).any(|t| sha == sha256_hex(&image_bytes(&format!("{name}-{t}")))));
        }
        assert!(!received
            .setup
            .segments
            .iter()
            .any(|s| { matches!(&s.kind, Some(Kind::Text(t)) if t.contains(other)) }));
    }
    let list = client
        .list_sessions(ListSessionsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.sessions.len(), 2);
    assert!(list.sessions.iter().all(|s| s.turns == 3));
}

#[tokio::test]
async fn concurrent_turns_of_one_session_are_serialised() {
    let mut h = Harness::start(LlmMode::Slow).await;
    let session_id = create(&mut h).await;
    let (mut a, mut b) = (h.client.clone(), h.client.clone());
    let (first, second) = tokio::join!(
        chat(&mut a, chat_request(&session_id, "one", vec![])),
        chat(&mut b, chat_request(&session_id, "two", vec![])),
    );
    first.unwrap();
    second.unwrap();
    let session = get(&mut h, &session_id).await;
    assert_eq!(session.turns.len(), 2);
    // The later turn's prompt holds the earlier turn, finished.
    let received = h.llm.received();
    let last = &received[1].setup.segments;
    let earlier = &session.turns[0].question;
    assert!(
        matches!(&last[0].kind, Some(Kind::Text(t)) if t.starts_with(&format!("Question: {earlier} Answer: {ANSWER}.")))
    );
}

#[tokio::test]
async fn cancelled_turn_records_nothing() {
    let mut h = Harness::start(LlmMode::Slow).await;
    let session_id = create(&mut h).await;
    let request = chat_request(&session_id, "hi", vec![with_bytes(image_bytes("dog"))]);
    let mut stream = h.client.chat(request).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert!(matches!(first.kind, Some(chat_event::Kind::Text(_))));
    drop(stream);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let session = get(&mut h, &session_id).await;
    assert!(session.turns.is_empty() && session.images.is_empty());
    // Dropping the chat stream cancelled the generation on the LLM tier.
    assert_eq!(h.llm.finished.load(std::sync::atomic::Ordering::SeqCst), 0);
    // The session is free for the next turn, which encodes the image again (nothing was kept).
    let request = chat_request(&session_id, "hi", vec![with_bytes(image_bytes("dog"))]);
    chat(&mut h.client, request).await.unwrap();
    assert_eq!(get(&mut h, &session_id).await.turns.len(), 1);
}

#[tokio::test]
async fn upload_then_chat_by_image_id() {
    let mut h = Harness::with_config(LlmMode::Answer, |c| c.max_image_bytes = 64).await;
    let session_id = create(&mut h).await;
    let data = image_bytes("uploaded");
    let chunks: Vec<UploadImageChunk> = data
        .chunks(7)
        .enumerate()
        .map(|(i, chunk)| UploadImageChunk {
            data: chunk.to_vec(),
            session_id: if i == 0 {
                session_id.clone()
            } else {
                String::new()
            },
        })
        .collect();
    let upload = h
        .client
        .upload_image(tokio_stream::iter(chunks))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(upload.sha256, sha256_hex(&data));
    assert_eq!(upload.size_bytes, data.len() as u64);
    assert_eq!(upload.image_id.len(), 32);

    let (pieces, done) = chat(
        &mut h.client,
        chat_request(&session_id, "What is it?", vec![with_id(&upload.image_id)]),
    )
    .await
    .unwrap();
    assert_eq!(pieces.concat(), done.text);
    let session = get(&mut h, &session_id).await;
    assert_eq!(session.images[0].image_id, upload.image_id);
    assert_eq!(session.images[0].sha256, upload.sha256);
    assert_eq!(h.vision.encoded(), vec![upload.sha256.clone()]);

    // A later turn attaches the same image again by its id: no new encoding.
    chat(
        &mut h.client,
        chat_request(&session_id, "Again?", vec![with_id(&upload.image_id)]),
    )
    .await
    .unwrap();
    assert_eq!(h.vision.encoded().len(), 1);
    assert_eq!(get(&mut h, &session_id).await.images.len(), 2);

    // Unknown ids, empty and oversized uploads are refused.
    let error = chat(
        &mut h.client,
        chat_request(&session_id, "x", vec![with_id("feedface")]),
    )
    .await
    .unwrap_err();
    assert_eq!(error.code(), Code::NotFound);
    let empty = h
        .client
        .upload_image(tokio_stream::iter(Vec::<UploadImageChunk>::new()))
        .await
        .unwrap_err();
    assert_eq!(empty.code(), Code::InvalidArgument);
    let big = UploadImageChunk {
        data: vec![0; 65],
        session_id: String::new(),
    };
    let big = h
        .client
        .upload_image(tokio_stream::iter(vec![big]))
        .await
        .unwrap_err();
    assert_eq!(big.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn unreachable_replicas_are_skipped_and_a_tier_down_is_unavailable() {
    let dead = dead_address().await;
    let mut h = Harness::with_config(LlmMode::Answer, |c| {
        c.vision_addrs.insert(0, dead.clone());
        c.llm_addrs.insert(0, dead.clone());
        c.llm_addrs.push(dead.clone());
    })
    .await;
    let session_id = create(&mut h).await;
    for turn in 0..3 {
        let image = with_bytes(image_bytes(&format!("{turn}")));
        chat(&mut h.client, chat_request(&session_id, "hi", vec![image]))
            .await
            .unwrap();
    }
    assert_eq!(h.llm.received().len(), 3);

    let mut down = Harness::with_config(LlmMode::Answer, |c| c.llm_addrs = vec![dead]).await;
    let session_id = create(&mut down).await;
    let error = chat(&mut down.client, chat_request(&session_id, "hi", vec![]))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::Unavailable);
    assert!(error.message().contains("LLM tier"), "{}", error.message());
}

#[tokio::test]
async fn delete_session_forgets_it() {
    let mut h = Harness::start(LlmMode::Answer).await;
    let session_id = create(&mut h).await;
    h.client
        .delete_session(DeleteSessionRequest {
            session_id: session_id.clone(),
        })
        .await
        .unwrap();
    let error = chat(&mut h.client, chat_request(&session_id, "hi", vec![]))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::NotFound);
}

#[tokio::test]
async fn oldest_turns_leave_the_prompt_under_a_small_budget() {
    // The fixture's tokenizer counts; config.json gives 8 query tokens. A past turn with its
    // image takes 8 + 18 positions, the current one 8 + 10, BOS 1: 49 positions hold the
    // current turn and one earlier turn.
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/opt-a");
    let mut h = Harness::with_config(LlmMode::Answer, |c| {
        c.model_dir = Some(dir);
        c.context_tokens = Some(50);
    })
    .await;
    let session_id = create(&mut h).await;
    let shas: Vec<String> = (0..4)
        .map(|i| sha256_hex(&image_bytes(&format!("{i}"))))
        .collect();
    for i in 0..4 {
        let image = with_bytes(image_bytes(&format!("{i}")));
        let request = chat_request(&session_id, &format!("turn {i}"), vec![image]);
        chat(&mut h.client, request).await.unwrap();
    }
    let received = h.llm.received();
    let past: Vec<PastTurn> = vec![("turn 2".into(), ANSWER.into(), vec![shas[2].clone()])];
    let expected = build_segments(&default_template(), &past, ("turn 3", &shas[3..]));
    assert_eq!(received[3].setup.segments, expected);
    assert_eq!(
        received[3].soft_prompts,
        vec![shas[2].clone(), shas[3].clone()]
    );
    // The history is only left out of the prompt: the session keeps every turn.
    assert_eq!(get(&mut h, &session_id).await.turns.len(), 4);

    let long = "why ".repeat(60);
    let error = chat(&mut h.client, chat_request(&session_id, &long, vec![]))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
    assert_eq!(get(&mut h, &session_id).await.turns.len(), 4);
}
