//! Continuous batching and the prefix cache, over gRPC: concurrent requests (greedy, sampled,
//! beam search, more than the batch holds) each give exactly their direct generation; a prompt
//! that begins like an earlier one reuses its KV, with the same tokens as without; another image
//! never shares KV.

mod common;

use blip2_llm::{prompt_text, LlmConfig};
use blip2_proto::v1::{GenerationParams, LlmInfoRequest, PromptSegment};
use candle_core::DType;
use common::*;
use tonic::Code;

/// Greedy without EOS, so every call runs `n` steps.
fn wire_greedy(n: u32) -> GenerationParams {
    GenerationParams {
        max_new_tokens: Some(n),
        min_new_tokens: Some(n),
        ..GenerationParams::default()
    }
}

fn direct_greedy(n: usize) -> blip2_model::generation::GenerationParams {
    blip2_model::generation::GenerationParams {
        min_new_tokens: n,
        ..greedy(n)
    }
}

struct Case {
    segments: Vec<PromptSegment>,
    images: Vec<&'static str>,
    params: GenerationParams,
    direct: blip2_model::generation::GenerationParams,
}

fn case(prompt: &str, image: Option<&'static str>, n: u32) -> Case {
    let mut segments = Vec::new();
    let mut images = Vec::new();
    if let Some(name) = image {
        let (_, sha) = soft_prompt_of(name);
        segments.push(placeholder(&sha));
        images.push(name);
    }
    segments.push(text(prompt));
    Case {
        segments,
        images,
        params: wire_greedy(n),
        direct: direct_greedy(n as usize),
    }
}

fn inputs(case: &Case) -> Vec<blip2_proto::v1::GenerateInput> {
    let mut inputs = vec![setup(case.segments.clone(), case.params.clone())];
    for name in &case.images {
        let (tensor, sha) = soft_prompt_of(name);
        inputs.push(soft(wire(&tensor, &sha, DType::F32)));
    }
    inputs
}

async fn run(server: &Server, case: &Case) -> Result<Streamed, tonic::Status> {
    let mut client = server.client.clone();
    call(&mut client, inputs(case)).await
}

fn expected(case: &Case) -> Vec<u32> {
    let soft: Vec<_> = case.images.iter().map(|n| soft_prompt_of(n).0).collect();
    direct(&prompt_text(&case.segments), &soft, &case.direct)
        .0
        .token_ids
}

fn ids(streamed: &Streamed) -> Vec<u32> {
    streamed.tokens.iter().map(|t| t.id).collect()
}

fn cached(streamed: &Streamed) -> u32 {
    streamed
        .finish
        .as_ref()
        .and_then(|f| f.usage)
        .map_or(u32::MAX, |u| u.cached_prompt_tokens)
}

#[tokio::test]
async fn concurrent_requests_each_equal_direct_generation() -> anyhow::Result<()> {
    // A batch of 3 sequences for 7 requests (one a 2-beam search): some wait for slots, all
    // join and leave at different steps.
    let server = start(LlmConfig {
        max_concurrency: 3,
        prefill_chunk: 7,
        prefix_cache_bytes: 0,
        ..LlmConfig::default()
    })
    .await?;
    let mut cases = vec![
        case("Question: what is this? Answer:", Some("gray.png"), 9),
        case(" a picture of", Some("palette.png"), 4),
        case(
            "Once upon a time there was a long prompt that takes chunks",
            None,
            12,
        ),
        case(" the colour is", Some("rgba.png"), 6),
        case("hello", None, 3),
        case(" and then", Some("gray.png"), 11),
    ];
    let mut sampled = case("Tell me", None, 8);
    sampled.params.temperature = Some(0.7);
    sampled.params.seed = Some(7);
    sampled.direct.do_sample = true;
    sampled.direct.temperature = f64::from(0.7f32);
    sampled.direct.seed = Some(7);
    cases.push(sampled);
    let mut beam = case(" a photo of", Some("palette.png"), 5);
    beam.params.num_beams = Some(2);
    beam.direct.num_beams = 2;
    cases.push(beam);

    let calls: Vec<_> = cases
        .iter()
        .map(|c| {
            let mut client = server.client.clone();
            let inputs = inputs(c);
            tokio::spawn(async move { call(&mut client, inputs).await })
        })
        .collect();
    for (case, call) in cases.iter().zip(calls) {
        let streamed = call.await??;
        assert_eq!(ids(&streamed), expected(case), "{:?}", case.segments);
        assert!(streamed.finish.is_some());
    }
    // Every call ended and left the batch.
    while server.tier.running() != 0 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert_eq!(server.tier.completed(), cases.len() as u64);
    // They ran side by side: some step ran a full batch (decodes and a prompt chunk).
    assert!(
        server.tier.largest_step() >= 3,
        "{}",
        server.tier.largest_step()
    );
    Ok(())
}

#[tokio::test]
async fn a_continuing_conversation_reuses_its_prefix() -> anyhow::Result<()> {
    let mut server = start(LlmConfig::default()).await?;
    let turn1 = case("Question: what is this? Answer:", Some("gray.png"), 6);
    let first = run(&server, &turn1).await?;
    assert_eq!(cached(&first), 0);
    assert_eq!(ids(&first), expected(&turn1));
    let answer = first
        .finish
        .as_ref()
        .map(|f| f.text.clone())
        .unwrap_or_default();

    // The next turn: the previous prompt, its answer, a new question.
    let mut turn2 = case("", Some("gray.png"), 6);
    turn2.segments = vec![
        turn1.segments[0].clone(),
        text(&format!(
            "Question: what is this? Answer:{answer} Question: and the colour? Answer:"
        )),
    ];
    let second = run(&server, &turn2).await?;
    assert_eq!(ids(&second), expected(&turn2));
    let prompt1 = first
        .finish
        .as_ref()
        .and_then(|f| f.usage)
        .map_or(0, |u| u.prompt_tokens);
    let prompt2 = second
        .finish
        .as_ref()
        .and_then(|f| f.usage)
        .map_or(0, |u| u.prompt_tokens);
    // At least the whole first prompt came from the cache (the answer too, when it re-tokenises
    // the same), never the whole second prompt.
    assert!(
        cached(&second) >= prompt1,
        "{} < {prompt1}",
        cached(&second)
    );
    assert!(cached(&second) < prompt2);

    // The same text with another image shares only what precedes the image.
    let mut other = turn2;
    let (_, sha) = soft_prompt_of("palette.png");
    other.segments[0] = placeholder(&sha);
    other.images = vec!["palette.png"];
    let third = run(&server, &other).await?;
    assert_eq!(ids(&third), expected(&other));
    assert!(cached(&third) <= 1, "{}", cached(&third));

    let info = server.client.info(LlmInfoRequest {}).await?.into_inner();
    assert_eq!(
        info.prefix_cache_hits,
        if cached(&third) == 1 { 2 } else { 1 }
    );
    assert!(info.prefix_cache_tokens >= u64::from(prompt1));
    assert!(info.prefix_cache_bytes > 0);
    assert_eq!(
        (info.running, info.queued, info.running_sequences),
        (0, 0, 0)
    );
    Ok(())
}

#[tokio::test]
async fn repeating_a_prompt_gives_the_same_tokens_from_the_cache() -> anyhow::Result<()> {
    let server = start(LlmConfig::default()).await?;
    let c = case(" the colour is", Some("rgba.png"), 8);
    let a = run(&server, &c).await?;
    let b = run(&server, &c).await?;
    assert_eq!(ids(&a), ids(&b));
    assert_eq!(ids(&a), expected(&c));
    let prompt = b
        .finish
        .as_ref()
        .and_then(|f| f.usage)
        .map_or(0, |u| u.prompt_tokens);
    assert_eq!(cached(&b), prompt - 1);
    Ok(())
}

#[tokio::test]
async fn a_beam_search_wider_than_the_batch_is_refused() -> anyhow::Result<()> {
    let server = start(LlmConfig {
        max_concurrency: 2,
        ..LlmConfig::default()
    })
    .await?;
    let mut c = case("hello", None, 3);
    c.params.num_beams = Some(3);
    let status = run(&server, &c).await.expect_err("refused");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("num_beams"),
        "{}",
        status.message()
    );
    // The tier keeps serving.
    let ok = case("hello", None, 3);
    assert_eq!(ids(&run(&server, &ok).await?), expected(&ok));
    Ok(())
}

#[tokio::test]
async fn many_more_streams_than_the_queue_holds() -> anyhow::Result<()> {
    // 2 running + 6 waiting; 64 calls at once.
    let server = start(LlmConfig {
        max_concurrency: 2,
        max_queue: 6,
        prefix_cache_bytes: 0,
        ..LlmConfig::default()
    })
    .await?;
    let c = case(" the colour is", Some("rgba.png"), 40);
    let calls: Vec<_> = (0..64)
        .map(|_| {
            let mut client = server.client.clone();
            let inputs = inputs(&c);
            tokio::spawn(async move {
                let started = std::time::Instant::now();
                (call(&mut client, inputs).await, started.elapsed())
            })
        })
        .collect();
    let (mut served, mut refused) = (0, 0);
    let all = tokio::time::timeout(std::time::Duration::from_secs(120), async {
        let mut results = Vec::new();
        for call in calls {
            results.push(call.await);
        }
        results
    })
    .await
    .expect("no call hangs");
    for result in all {
        let (result, elapsed) = result?;
        match result {
            Ok(streamed) => {
                served += 1;
                assert_eq!(streamed.tokens.len(), 40);
                assert!(streamed.finish.is_some());
            }
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert!(
                    status.message().contains("capacity"),
                    "{}",
                    status.message()
                );
                // Refused at once, not after waiting for a place.
                assert!(elapsed < std::time::Duration::from_secs(5), "{elapsed:?}");
                refused += 1;
            }
        }
    }
    assert_eq!(served + refused, 64);
    assert!(served >= 8, "{served} served");
    assert!(refused > 0, "nothing was refused");
    while server.tier.running() != 0 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert_eq!(server.tier.completed(), served);
    Ok(())
}

/// Resident memory of this process in bytes (Linux), for leak checks.
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

#[tokio::test]
async fn clients_that_leave_free_their_sequences() -> anyhow::Result<()> {
    let mut server = start(LlmConfig {
        prefix_cache_bytes: 0,
        ..LlmConfig::default()
    })
    .await?;
    let c = case(" the colour is", Some("rgba.png"), 200);
    let leave_after_two = |client: &mut blip2_proto::v1::llm_service_client::LlmServiceClient<
        tonic::transport::Channel,
    >| {
        let mut client = client.clone();
        let inputs = inputs(&c);
        async move {
            let (sender, receiver) = tokio::sync::mpsc::channel(4);
            for input in inputs {
                sender.send(input).await?;
            }
            let mut stream = client
                .generate(tokio_stream::wrappers::ReceiverStream::new(receiver))
                .await?
                .into_inner();
            for _ in 0..2 {
                assert!(stream.message().await?.is_some());
            }
            anyhow::Ok(())
        }
    };
    let rounds = 60;
    let mut before = None;
    for round in 0..rounds {
        if round == 10 {
            before = resident_bytes();
        }
        // Four at a time, all dropped after their second token.
        let batch: Vec<_> = (0..4)
            .map(|_| leave_after_two(&mut server.client))
            .collect();
        for f in batch {
            f.await?;
        }
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while server.tier.running() != 0 {
        assert!(std::time::Instant::now() < deadline, "still running");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert_eq!(server.tier.completed(), 4 * rounds);
    let info = server.client.info(LlmInfoRequest {}).await?.into_inner();
    assert_eq!(
        (info.running, info.running_sequences, info.queued),
        (0, 0, 0)
    );
    if let (Some(before), Some(after)) = (before, resident_bytes()) {
        let growth = after.saturating_sub(before);
        assert!(growth < 64 << 20, "resident memory grew by {growth} bytes");
    }
    Ok(())
}
