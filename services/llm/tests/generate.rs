//! Generate over gRPC gives exactly the tokens of direct generation on the same prompt.

mod common;

use blip2_llm::{prompt_text, LlmConfig};
use blip2_proto::v1::{FinishReason, GenerationParams, LlmInfoRequest};
use candle_core::DType;
use common::*;

fn wire_params(max_new_tokens: u32) -> GenerationParams {
    GenerationParams {
        max_new_tokens: Some(max_new_tokens),
        logprobs: Some(true),
        ..GenerationParams::default()
    }
}

fn reason(reason: blip2_model::generation::FinishReason) -> i32 {
    use blip2_model::generation::FinishReason as F;
    match reason {
        F::Length => FinishReason::Length as i32,
        F::Eos => FinishReason::Eos as i32,
        F::StopSequence => FinishReason::StopSequence as i32,
        F::Cancelled => FinishReason::Unspecified as i32,
    }
}

/// Runs `segments` with `soft_prompts` sent in `dtype` and checks the stream against direct
/// generation on the same prompt text with the soft prompts as the tier sees them.
async fn check_parity(
    checkpoint: &str,
    segments: Vec<blip2_proto::v1::PromptSegment>,
    images: &[&str],
    dtype: DType,
    params: GenerationParams,
    direct_params: blip2_model::generation::GenerationParams,
) -> anyhow::Result<()> {
    let model = load(checkpoint);
    let mut server = start_with(model.clone(), checkpoint, LlmConfig::default()).await?;
    let encoded: Vec<_> = images
        .iter()
        .map(|name| soft_prompt_by(&model, name))
        .collect();
    let mut inputs = vec![setup(segments.clone(), params.clone())];
    inputs.extend(
        encoded
            .iter()
            .map(|(t, sha)| soft(wire_by(&model, t, sha, dtype))),
    );
    let streamed = call(&mut server.client, inputs).await?;

    let as_seen: Vec<_> = encoded.iter().map(|(t, _)| rounded(t, dtype)).collect();
    let (expected, events, prompt_positions) =
        direct_by(&model, &prompt_text(&segments), &as_seen, &direct_params);

    let ids: Vec<u32> = streamed.tokens.iter().map(|t| t.id).collect();
    assert_eq!(ids, expected.token_ids);
    assert!(!ids.is_empty());
    let pieces: Vec<&str> = streamed.tokens.iter().map(|t| t.text.as_str()).collect();
    let expected_pieces: Vec<&str> = events.iter().map(|e| e.text_piece.as_str()).collect();
    assert_eq!(pieces, expected_pieces);
    let logprobs: Vec<Option<f32>> = streamed.tokens.iter().map(|t| t.logprob).collect();
    let want_logprobs: Vec<Option<f32>> = events
        .iter()
        .map(|e| params.logprobs.unwrap_or(false).then_some(e.logprob))
        .collect();
    assert_eq!(logprobs, want_logprobs);

    let finish = streamed.finish.expect("a Finish message");
    assert_eq!(finish.text, pieces.concat());
    assert_eq!(finish.text, expected.text);
    assert_eq!(finish.reason, reason(expected.finish_reason));
    let usage = finish.usage.expect("usage");
    assert_eq!(usage.prompt_tokens as usize, prompt_positions);
    assert_eq!(usage.prompt_tokens as usize, expected.prompt_tokens);
    assert_eq!(usage.generated_tokens as usize, ids.len());
    assert_eq!(server.tier.running(), 0);
    assert_eq!(server.tier.completed(), 1);
    Ok(())
}

#[tokio::test]
async fn greedy_f32_equals_direct_generation() -> anyhow::Result<()> {
    let (_, sha) = soft_prompt_of("gray.png");
    let segments = vec![placeholder(&sha), text("Question: what is shown? Answer:")];
    check_parity(
        "opt-a",
        segments,
        &["gray.png"],
        DType::F32,
        wire_params(24),
        greedy(24),
    )
    .await
}

#[tokio::test]
async fn f16_soft_prompts_equal_direct_generation_on_the_rounded_prompt() -> anyhow::Result<()> {
    let (_, sha) = soft_prompt_of("rgba.png");
    let segments = vec![text("a photo of"), placeholder(&sha), text(" showing")];
    check_parity(
        "opt-a",
        segments,
        &["rgba.png"],
        DType::F16,
        // EOS suppressed, for a sequence long enough to tell the soft prompts apart.
        GenerationParams {
            min_new_tokens: Some(16),
            ..wire_params(16)
        },
        blip2_model::generation::GenerationParams {
            min_new_tokens: 16,
            ..greedy(16)
        },
    )
    .await
}

#[tokio::test]
async fn two_image_placeholders() -> anyhow::Result<()> {
    let (_, first) = soft_prompt_of("gray.png");
    let segments = vec![
        text("first:"),
        placeholder(&first),
        text(" second:"),
        placeholder(""), // no hash: any image fills it
        text(" the difference is"),
    ];
    // Full length (EOS suppressed), without logprobs.
    let params = GenerationParams {
        max_new_tokens: Some(12),
        min_new_tokens: Some(12),
        ..GenerationParams::default()
    };
    let direct_params = blip2_model::generation::GenerationParams {
        min_new_tokens: 12,
        ..greedy(12)
    };
    let images = ["gray.png", "palette.png"];
    check_parity(
        "opt-a",
        segments,
        &images,
        DType::F32,
        params,
        direct_params,
    )
    .await
}

#[tokio::test]
async fn text_only_prompt_and_seeded_sampling() -> anyhow::Result<()> {
    let params = GenerationParams {
        max_new_tokens: Some(10),
        min_new_tokens: Some(10),
        temperature: Some(0.8),
        top_p: Some(0.9),
        seed: Some(42),
        ..GenerationParams::default()
    };
    let direct_params = blip2_model::generation::GenerationParams {
        do_sample: true,
        min_new_tokens: 10,
        temperature: f64::from(0.8f32),
        top_p: f64::from(0.9f32),
        seed: Some(42),
        ..greedy(10)
    };
    check_parity(
        "opt-a",
        vec![text("Once upon a time")],
        &[],
        DType::F32,
        params,
        direct_params,
    )
    .await
}

#[tokio::test]
async fn t5_greedy_equals_direct_generation() -> anyhow::Result<()> {
    let t5 = load("t5-a");
    let (_, sha) = soft_prompt_by(&t5, "wide.png");
    let segments = vec![placeholder(&sha), text("Question: what is it? Answer:")];
    let params = GenerationParams {
        max_new_tokens: Some(10),
        repetition_penalty: Some(1.3),
        ..GenerationParams::default()
    };
    let direct_params = blip2_model::generation::GenerationParams {
        repetition_penalty: f64::from(1.3f32),
        ..greedy_by(&t5, 10)
    };
    check_parity(
        "t5-a",
        segments,
        &["wide.png"],
        DType::F16,
        params,
        direct_params,
    )
    .await
}

#[tokio::test]
async fn input_left_open_still_ends_the_response() -> anyhow::Result<()> {
    let mut server = start(LlmConfig::default()).await?;
    let (tensor, sha) = soft_prompt_of("gray.png");
    let (sender, receiver) = tokio::sync::mpsc::channel(4);
    // The response is requested before any input is sent.
    let response = server
        .client
        .generate(tokio_stream::wrappers::ReceiverStream::new(receiver))
        .await?;
    sender
        .send(setup(vec![placeholder(&sha)], wire_params(8)))
        .await?;
    sender.send(soft(wire(&tensor, &sha, DType::BF16))).await?;
    let streamed = collect(response.into_inner()).await?;
    assert!(streamed.finish.is_some());
    let (expected, _, _) = direct("<image>", &[rounded(&tensor, DType::BF16)], &greedy(8));
    let ids: Vec<u32> = streamed.tokens.iter().map(|t| t.id).collect();
    assert_eq!(ids, expected.token_ids);
    drop(sender);
    Ok(())
}

#[tokio::test]
async fn info_describes_the_checkpoint() -> anyhow::Result<()> {
    let mut server = start(LlmConfig::default()).await?;
    let info = server.client.info(LlmInfoRequest {}).await?.into_inner();
    let model = model();
    assert_eq!(info.checkpoint, "opt-a");
    assert_eq!(info.checkpoint_fingerprint, model.fingerprint());
    assert_eq!(info.model_type, "opt");
    assert_eq!(info.hidden_size, 64);
    assert_eq!(info.num_query_tokens, 8);
    assert_eq!(info.max_positions, 256);
    assert_eq!(info.dtype, blip2_proto::v1::Dtype::F32 as i32);
    assert_eq!((info.running, info.completed), (0, 0));
    Ok(())
}

#[tokio::test]
async fn health_is_served() -> anyhow::Result<()> {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let server = start(LlmConfig::default()).await?;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", server.addr))?
        .connect()
        .await?;
    let mut health = HealthClient::new(channel);
    for service in ["blip2.v1.LlmService", ""] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await?
            .into_inner()
            .status;
        assert_eq!(
            status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );
    }
    Ok(())
}
