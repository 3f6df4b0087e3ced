//! CreateSession with `history`: finished turns recorded as given, their images encoded once.

mod common;

use blip2_common::soft_prompt::sha256_hex;
use blip2_proto::v1::{CreateSessionRequest, GetSessionRequest, HistoryTurn};
use blip2_session::prompt::default_template;
use blip2_session::{build_segments, PastTurn};
use common::*;
use tonic::Code;

fn turn(question: &str, answer: &str, images: Vec<blip2_proto::v1::TurnImage>) -> HistoryTurn {
    HistoryTurn {
        question: question.into(),
        answer: answer.into(),
        images,
    }
}

#[tokio::test]
async fn history_is_recorded_and_its_images_are_not_encoded_again() {
    let mut h = Harness::start(LlmMode::Answer).await;
    let dog = image_bytes("dog");
    let dog_sha = sha256_hex(&dog);
    let history = vec![
        turn("What is this?", "a dog", vec![with_bytes(dog.clone())]),
        turn("Is it big?", "no", vec![]),
    ];
    let session = h
        .client
        .create_session(CreateSessionRequest {
            history,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(session.turns.len(), 2);
    assert_eq!(session.turns[0].answer, "a dog");
    assert_eq!(session.images.len(), 1);
    assert_eq!(session.images[0].sha256, dog_sha);
    assert_eq!(h.vision.encoded(), vec![dog_sha.clone()]);
    assert!(h.llm.received().is_empty(), "history is never generated");

    // The next turn attaches the same image again: its soft prompt is the session's.
    let request = chat_request(&session.session_id, "What colour?", vec![with_bytes(dog)]);
    let (_, done) = chat(&mut h.client, request).await.unwrap();
    assert_eq!(done.text, ANSWER);
    assert_eq!(h.vision.encoded().len(), 1);

    let past: Vec<PastTurn> = vec![
        (
            "What is this?".into(),
            "a dog".into(),
            vec![dog_sha.clone()],
        ),
        ("Is it big?".into(), "no".into(), vec![]),
    ];
    let current = vec![dog_sha.clone()];
    let expected = build_segments(&default_template(), &past, ("What colour?", &current));
    let received = h.llm.received();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].setup.segments, expected);

    let stored = h
        .client
        .get_session(GetSessionRequest {
            session_id: session.session_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stored.turns.len(), 3);
}

#[tokio::test]
async fn an_empty_history_turn_is_invalid() {
    let mut h = Harness::start(LlmMode::Answer).await;
    let error = h
        .client
        .create_session(CreateSessionRequest {
            history: vec![turn("hi", "hello", vec![]), turn(" ", "", vec![])],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(
        error.message().contains("`history[1]`"),
        "{}",
        error.message()
    );
}

#[tokio::test]
async fn an_undecodable_history_image_is_invalid_and_creates_nothing() {
    let mut h = Harness::start(LlmMode::Answer).await;
    let error = h
        .client
        .create_session(CreateSessionRequest {
            history: vec![turn(
                "what?",
                "x",
                vec![with_bytes(b"not an image".to_vec())],
            )],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
    let sessions = h
        .client
        .list_sessions(blip2_proto::v1::ListSessionsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(sessions.sessions.is_empty());
}
