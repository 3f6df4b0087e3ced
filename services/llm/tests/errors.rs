//! Refusals of the LLM tier (each with its status code), admission, timeouts, cancellation.

mod common;

use std::time::Duration;

use blip2_llm::LlmConfig;
use blip2_proto::v1::{GenerateInput, GenerationParams};
use candle_core::{DType, Tensor};
use common::*;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

fn params(max_new_tokens: u32) -> GenerationParams {
    GenerationParams {
        max_new_tokens: Some(max_new_tokens),
        ..GenerationParams::default()
    }
}

/// Runs one call that must fail with `code`; returns the message.
async fn refused(server: &mut Server, inputs: Vec<GenerateInput>, code: Code) -> String {
    match call(&mut server.client, inputs).await {
        Ok(streamed) => panic!("expected {code:?}, got {streamed:?}"),
        Err(status) => {
            assert_eq!(status.code(), code, "{}", status.message());
            status.message().to_string()
        }
    }
}

/// The setup of a one-image prompt and its f32 soft prompt.
fn one_image() -> (GenerateInput, GenerateInput, Tensor, String) {
    let (tensor, sha) = soft_prompt_of("gray.png");
    let first = setup(vec![placeholder(&sha), text("a photo of")], params(5));
    let second = soft(wire(&tensor, &sha, DType::F32));
    (first, second, tensor, sha)
}

#[tokio::test]
async fn wrong_fingerprint_is_a_failed_precondition() -> anyhow::Result<()> {
    let mut server = start(LlmConfig::default()).await?;
    let (setup, _, tensor, sha) = one_image();
    let foreign = blip2_common::soft_prompt::encode_2d(&tensor, DType::F32, &sha, "0123abcd")?;
    let message = refused(
        &mut server,
        vec![setup, soft(foreign)],
        Code::FailedPrecondition,
    )
    .await;
    assert_eq!(
        message,
        format!(
            "soft prompt was made by checkpoint 0123abcd, this LLM tier serves {}",
            model().fingerprint()
        )
    );
    Ok(())
}

#[tokio::test]
async fn wrong_shape_and_hash_are_invalid() -> anyhow::Result<()> {
    let mut server = start(LlmConfig::default()).await?;
    let (setup_input, _, tensor, sha) = one_image();
    let narrow = tensor.narrow(1, 0, 63)?;
    let message = refused(
        &mut server,
        vec![setup_input.clone(), soft(wire(&narrow, &sha, DType::F32))],
        Code::InvalidArgument,
    )
    .await;
    assert!(message.contains("shape"), "{message}");

    let (other, other_sha) = soft_prompt_of("palette.png");
    let message = refused(
        &mut server,
        vec![setup_input, soft(wire(&other, &other_sha, DType::F32))],
        Code::InvalidArgument,
    )
    .await;
    assert!(message.contains(&sha), "{message}");
    Ok(())
}

#[tokio::test]
async fn protocol_errors_are_invalid() -> anyhow::Result<()> {
    let mut server = start(LlmConfig::default()).await?;
    let (setup_input, soft_input, _, _) = one_image();
    // Missing setup: a soft prompt first, or nothing at all.
    let message = refused(&mut server, vec![soft_input.clone()], Code::InvalidArgument).await;
    assert!(message.contains("`setup`"), "{message}");
    refused(&mut server, vec![], Code::InvalidArgument).await;
    // The input ends before all soft prompts arrived.
    let message = refused(
        &mut server,
        vec![setup_input.clone()],
        Code::InvalidArgument,
    )
    .await;
    assert!(message.contains("0 of 1"), "{message}");
    // One soft prompt too many.
    let inputs = vec![setup_input.clone(), soft_input.clone(), soft_input.clone()];
    let message = refused(&mut server, inputs, Code::InvalidArgument).await;
    assert!(message.contains("too many"), "{message}");
    // A second setup.
    let inputs = vec![setup_input.clone(), setup_input.clone()];
    refused(&mut server, inputs, Code::InvalidArgument).await;
    // Prompts: the marker in text, no segments, an empty prompt.
    let marker = setup(vec![text("look: <image>")], params(5));
    let message = refused(&mut server, vec![marker], Code::InvalidArgument).await;
    assert!(message.contains("use an image placeholder"), "{message}");
    refused(
        &mut server,
        vec![setup(vec![], params(5))],
        Code::InvalidArgument,
    )
    .await;
    refused(
        &mut server,
        vec![setup(vec![text("")], params(5))],
        Code::InvalidArgument,
    )
    .await;
    // Only the call with one soft prompt too many started generating; its error went out at
    // once and the scheduler drops it at its next step.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while server.tier.completed() < 1 || server.tier.running() != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the cancelled call still runs"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(server.tier.completed(), 1);
    Ok(())
}

#[tokio::test]
async fn bad_params_name_the_field() -> anyhow::Result<()> {
    let mut server = start(LlmConfig::default()).await?;
    let (_, soft_input, _, sha) = one_image();
    let bad = GenerationParams {
        top_p: Some(0.0),
        ..params(5)
    };
    let inputs = vec![setup(vec![placeholder(&sha)], bad), soft_input.clone()];
    let message = refused(&mut server, inputs, Code::InvalidArgument).await;
    assert!(message.contains("`top_p`"), "{message}");
    // Over the tier's limit, and over the model's 256 positions.
    let inputs = vec![
        setup(vec![placeholder(&sha)], params(513)),
        soft_input.clone(),
    ];
    let message = refused(&mut server, inputs, Code::InvalidArgument).await;
    assert!(message.contains("`max_new_tokens`"), "{message}");
    let inputs = vec![setup(vec![placeholder(&sha)], params(300)), soft_input];
    let message = refused(&mut server, inputs, Code::InvalidArgument).await;
    assert!(message.contains("256 positions"), "{message}");
    Ok(())
}

#[tokio::test]
async fn setup_must_arrive_in_time() -> anyhow::Result<()> {
    let config = LlmConfig {
        setup_timeout: Duration::from_millis(300),
        ..LlmConfig::default()
    };
    let mut server = start(config).await?;
    let (setup_input, _, _, _) = one_image();
    let (sender, receiver) = mpsc::channel(4);
    sender.send(setup_input).await?;
    // The soft prompt never comes; the input stays open.
    let response = server
        .client
        .generate(ReceiverStream::new(receiver))
        .await?;
    let status = collect(response.into_inner()).await.unwrap_err();
    assert_eq!(
        status.code(),
        Code::DeadlineExceeded,
        "{}",
        status.message()
    );
    drop(sender);
    Ok(())
}

#[tokio::test]
async fn a_full_tier_refuses_at_once() -> anyhow::Result<()> {
    let config = LlmConfig {
        max_concurrency: 1,
        max_queue: 1,
        ..LlmConfig::default()
    };
    let mut server = start(config).await?;
    // Two calls that have not sent their input hold the running and the queued place.
    let mut held = Vec::new();
    for _ in 0..2 {
        let (sender, receiver) = mpsc::channel::<GenerateInput>(1);
        let response = server
            .client
            .generate(ReceiverStream::new(receiver))
            .await?;
        held.push((sender, response));
    }
    let (_, soft_input, _, sha) = one_image();
    let inputs = vec![
        setup(vec![placeholder(&sha)], params(3)),
        soft_input.clone(),
    ];
    let started = std::time::Instant::now();
    refused(&mut server, inputs.clone(), Code::ResourceExhausted).await;
    assert!(started.elapsed() < Duration::from_secs(5));
    // Once they leave, the tier serves again.
    drop(held);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match call(&mut server.client, inputs.clone()).await {
            Ok(streamed) => {
                assert!(streamed.finish.is_some());
                break;
            }
            Err(status) if status.code() == Code::ResourceExhausted => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the places were not freed"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(status) => panic!("{status:?}"),
        }
    }
    Ok(())
}

#[tokio::test]
async fn a_client_that_leaves_cancels_its_generation() -> anyhow::Result<()> {
    let mut server = start(LlmConfig::default()).await?;
    let (tensor, sha) = soft_prompt_of("gray.png");
    let long = GenerationParams {
        max_new_tokens: Some(200),
        min_new_tokens: Some(200),
        ..GenerationParams::default()
    };
    let (sender, receiver) = mpsc::channel(4);
    sender.send(setup(vec![placeholder(&sha)], long)).await?;
    sender.send(soft(wire(&tensor, &sha, DType::F32))).await?;
    let mut stream = server
        .client
        .generate(ReceiverStream::new(receiver))
        .await?
        .into_inner();
    for _ in 0..2 {
        let message = stream.message().await?;
        assert!(message.is_some());
    }
    drop(stream);
    drop(sender);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while server.tier.running() != 0 {
        assert!(std::time::Instant::now() < deadline, "still running");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(server.tier.completed(), 1);

    // The tier still serves.
    let inputs = vec![
        setup(vec![placeholder(&sha)], params(4)),
        soft(wire(&tensor, &sha, DType::F32)),
    ];
    let streamed = call(&mut server.client, inputs).await?;
    assert!(streamed.finish.is_some());
    assert_eq!(server.tier.completed(), 2);
    Ok(())
}

#[test]
fn check_setup_gives_positions_or_the_calls_status() {
    let model = model();
    let ok = blip2_proto::v1::GenerateSetup {
        segments: vec![placeholder(""), text(" a photo of")],
        params: Some(params(5)),
    };
    let positions = blip2_llm::check_setup(&ok, &model, 512).expect("a valid setup");
    assert!(positions > model.config().num_query_tokens);
    let too_long = blip2_proto::v1::GenerateSetup {
        params: Some(params(100_000)),
        ..ok.clone()
    };
    let status = blip2_llm::check_setup(&too_long, &model, 512).expect_err("over the limit");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("max_new_tokens"),
        "{}",
        status.message()
    );
    let empty = blip2_proto::v1::GenerateSetup {
        segments: vec![],
        ..ok
    };
    assert_eq!(
        blip2_llm::check_setup(&empty, &model, 512)
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
}
