//! `blip2 bench load`: a closed-loop load generator for a running session tier.
//!
//! N sessions run at once, each doing T turns back to back: the first turn attaches an image, the
//! later ones are text only, so they can reuse the LLM tier's prefix cache (the session's earlier
//! prompt and answer). Every turn asks for exactly `--new-tokens` tokens (min = max new tokens,
//! greedy), so EOS never shortens an answer and the work per turn is fixed.
//!
//! Measured on the client, per turn: TTFT (request sent, retries included, to the first text
//! piece), the gaps between text pieces (inter-token latency), the whole turn, and the usage the
//! server reports. First turns and later turns are summarised apart: the first turn pays for the
//! image encode and the whole prefill, later ones should not. Throughput is over the wall time of
//! the measured run. Result: a table on stdout, optionally JSON (`--json FILE`); progress on stderr.
//!
//! The client runs on one thread of its own (a current-thread runtime) so that on a small machine
//! it takes as little CPU from the server as it can. The session tier drops text pieces that are
//! empty (a token ending inside a UTF-8 character), so a few gaps may span two tokens.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use blip2_proto::v1::session_service_client::SessionServiceClient;
use blip2_proto::v1::{
    chat_event, turn_image, ChatRequest, CreateSessionRequest, DeleteSessionRequest,
    GenerationParams, TurnImage,
};
use clap::Args;
use serde::Serialize;
use tonic::transport::Channel;
use tonic::Code;

use crate::bench_stats::{GroupSummary, TurnSample};

#[derive(Args, Debug)]
pub struct LoadArgs {
    /// Address of the session tier (`blip2 serve all` or `blip2 serve session`).
    #[arg(long, default_value = "http://127.0.0.1:50050")]
    addr: String,
    /// Concurrent sessions.
    #[arg(long, default_value_t = 8)]
    sessions: usize,
    /// Turns per session (the first with the image, the rest text only).
    #[arg(long, default_value_t = 2)]
    turns: usize,
    /// Tokens per answer, exactly (min_new_tokens = max_new_tokens, greedy).
    #[arg(long, default_value_t = 32)]
    new_tokens: u32,
    /// Image file for every session's first turn. Without it each session gets its own random
    /// 224x224 image, so no session finds another's soft prompt or prefix in a cache.
    #[arg(long)]
    image: Option<PathBuf>,
    /// Side of the generated random images, in pixels.
    #[arg(long, default_value_t = 224)]
    image_size: u32,
    /// Seed of the random images (session `s` gets seed + s). Default: from the clock, so that
    /// repeated runs against the same server (e.g. at rising concurrency) never find earlier
    /// runs' images in the vision cache or their prompts in the prefix cache.
    #[arg(long)]
    image_seed: Option<u64>,
    /// Text of the first turn.
    #[arg(long, default_value = "What is in the picture?")]
    question: String,
    /// Text of the later turns.
    #[arg(long, default_value = "Tell me more about it.")]
    follow_up: String,
    /// Single-turn sessions run (and discarded) before the measurement: connections, first
    /// allocations and lazy initialisation are not what is measured.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Attempts of a turn refused with RESOURCE_EXHAUSTED or UNAVAILABLE (a tier at its limit),
    /// with a pause growing from 10 to 100 ms between them (short, so that the pause adds little
    /// to the turn's TTFT, which counts the wait).
    #[arg(long, default_value_t = 300)]
    max_retries: u32,
    /// Write the result as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    no_progress: bool,
}

/// The JSON result (also what the table prints).
#[derive(Debug, Serialize)]
pub struct LoadResult {
    pub addr: String,
    pub sessions: usize,
    pub turns_per_session: usize,
    pub new_tokens: u32,
    pub image: String,
    /// Wall time of the measured run (warm-up excluded).
    pub wall_seconds: f64,
    pub turns_completed: usize,
    pub turns_failed: usize,
    /// Attempts refused by a tier at its limit and tried again.
    pub retries: u64,
    /// Generated tokens of all turns over the wall time.
    pub tokens_per_second: f64,
    /// Finished turns over the wall time.
    pub requests_per_second: f64,
    pub first_turns: GroupSummary,
    pub later_turns: GroupSummary,
    pub all_turns: GroupSummary,
    /// A few distinct error messages, if any turn failed.
    pub errors: Vec<String>,
}

/// One turn's outcome, tagged with where it was in its session.
struct TurnOutcome {
    turn_index: usize,
    result: Result<TurnSample, String>,
    retries: u32,
}

pub fn run(args: LoadArgs) -> Result<()> {
    if args.sessions == 0 || args.turns == 0 || args.new_tokens == 0 {
        bail!("--sessions, --turns and --new-tokens must be at least 1");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let result = runtime.block_on(drive(&args))?;
    print_table(&result);
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&result)?;
        std::fs::write(path, json + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    if result.turns_completed == 0 {
        bail!(
            "no turn finished ({} failed): {}",
            result.turns_failed,
            result.errors.join("; ")
        );
    }
    Ok(())
}

async fn drive(args: &LoadArgs) -> Result<LoadResult> {
    let channel = Channel::from_shared(args.addr.clone())
        .with_context(|| format!("bad address {}", args.addr))?
        .connect()
        .await
        .with_context(|| format!("connecting to the session tier at {}", args.addr))?;
    let client = SessionServiceClient::new(channel).max_decoding_message_size(64 << 20);
    let fixed_image = match &args.image {
        Some(path) => {
            Some(std::fs::read(path).with_context(|| format!("reading {}", path.display()))?)
        }
        None => None,
    };
    let image_seed = args.image_seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    });
    let image_for = |index: u64| -> Vec<u8> {
        fixed_image.clone().unwrap_or_else(|| {
            random_bmp(
                args.image_size,
                args.image_size,
                image_seed.wrapping_add(index),
            )
        })
    };
    let params = GenerationParams {
        max_new_tokens: Some(args.new_tokens),
        min_new_tokens: Some(args.new_tokens),
        temperature: Some(0.0),
        num_beams: Some(1),
        ..GenerationParams::default()
    };

    for w in 0..args.warmup {
        let outcomes = run_session(
            client.clone(),
            args,
            &params,
            image_for(u64::MAX - w as u64),
            1,
            None,
        )
        .await;
        if let Some(Err(e)) = outcomes.into_iter().next().map(|o| o.result) {
            bail!("warm-up turn failed: {e}");
        }
    }

    let progress = if args.no_progress {
        indicatif::ProgressBar::hidden()
    } else {
        let bar = indicatif::ProgressBar::new((args.sessions * args.turns) as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} turns {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    };
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for s in 0..args.sessions {
        let client = client.clone();
        let params = params.clone();
        let image = image_for(s as u64);
        let progress = progress.clone();
        let session_args = SessionPlan {
            turns: args.turns,
            question: args.question.clone(),
            follow_up: args.follow_up.clone(),
            max_retries: args.max_retries,
        };
        tasks.spawn(async move {
            session_task(client, session_args, params, image, Some(progress)).await
        });
    }
    let mut outcomes = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        outcomes.extend(joined.context("a session task panicked")?);
    }
    let wall_seconds = start.elapsed().as_secs_f64();
    progress.finish_and_clear();
    Ok(summarise(
        args,
        wall_seconds,
        outcomes,
        fixed_image.is_some(),
    ))
}

/// What one session does, owned so that it can move into a task.
struct SessionPlan {
    turns: usize,
    question: String,
    follow_up: String,
    max_retries: u32,
}

async fn run_session(
    client: SessionServiceClient<Channel>,
    args: &LoadArgs,
    params: &GenerationParams,
    image: Vec<u8>,
    turns: usize,
    progress: Option<indicatif::ProgressBar>,
) -> Vec<TurnOutcome> {
    let plan = SessionPlan {
        turns,
        question: args.question.clone(),
        follow_up: args.follow_up.clone(),
        max_retries: args.max_retries,
    };
    session_task(client, plan, params.clone(), image, progress).await
}

/// Creates a session, runs its turns one after the other, deletes it. A failed turn ends the
/// session (the later turns would not have the history they are meant to measure); its remaining
/// turns count as failed too.
async fn session_task(
    mut client: SessionServiceClient<Channel>,
    plan: SessionPlan,
    params: GenerationParams,
    image: Vec<u8>,
    progress: Option<indicatif::ProgressBar>,
) -> Vec<TurnOutcome> {
    let mut outcomes = Vec::with_capacity(plan.turns);
    let fail_rest = |outcomes: &mut Vec<TurnOutcome>, from: usize, message: String| {
        for turn_index in from..plan.turns {
            outcomes.push(TurnOutcome {
                turn_index,
                result: Err(message.clone()),
                retries: 0,
            });
        }
    };
    let session_id = match client
        .create_session(CreateSessionRequest {
            default_params: Some(params.clone()),
            ..CreateSessionRequest::default()
        })
        .await
    {
        Ok(session) => session.into_inner().session_id,
        Err(status) => {
            fail_rest(
                &mut outcomes,
                0,
                format!("CreateSession: {}: {}", status.code(), status.message()),
            );
            return outcomes;
        }
    };
    let mut image = Some(image);
    for turn_index in 0..plan.turns {
        let (text, images) = match image.take() {
            Some(data) => (
                plan.question.clone(),
                vec![TurnImage {
                    source: Some(turn_image::Source::Data(data)),
                }],
            ),
            None => (plan.follow_up.clone(), Vec::new()),
        };
        let request = ChatRequest {
            session_id: session_id.clone(),
            text,
            images,
            params: Some(params.clone()),
            idempotency_key: String::new(),
        };
        let (result, retries) = timed_turn(&mut client, request, plan.max_retries).await;
        if let Some(bar) = &progress {
            bar.inc(1);
        }
        let failed = result.as_ref().err().cloned();
        outcomes.push(TurnOutcome {
            turn_index,
            result,
            retries,
        });
        if let Some(message) = failed {
            fail_rest(
                &mut outcomes,
                turn_index + 1,
                format!("an earlier turn failed: {message}"),
            );
            if let Some(bar) = &progress {
                bar.inc((plan.turns - turn_index - 1) as u64);
            }
            break;
        }
    }
    // Leave the tier as it was; a failure here changes no measurement.
    let _ = client
        .delete_session(DeleteSessionRequest { session_id })
        .await;
    outcomes
}

/// Whether a refused call is worth trying again: the tier was at a limit, not wrong.
fn retryable(code: Code) -> bool {
    matches!(code, Code::ResourceExhausted | Code::Unavailable)
}

/// Sends one turn and times its stream; retries refusals (before anything streamed).
async fn timed_turn(
    client: &mut SessionServiceClient<Channel>,
    request: ChatRequest,
    max_retries: u32,
) -> (Result<TurnSample, String>, u32) {
    let sent = Instant::now();
    let mut retries = 0u32;
    let mut pause = Duration::from_millis(10);
    let mut stream = loop {
        match client.chat(request.clone()).await {
            Ok(response) => break response.into_inner(),
            Err(status) if retryable(status.code()) && retries < max_retries => {
                retries += 1;
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(100));
            }
            Err(status) => {
                return (
                    Err(format!("Chat: {}: {}", status.code(), status.message())),
                    retries,
                )
            }
        }
    };
    let mut first: Option<Instant> = None;
    let mut last: Option<Instant> = None;
    let mut inter_token = Vec::new();
    loop {
        match stream.message().await {
            Ok(Some(event)) => match event.kind {
                Some(chat_event::Kind::Text(_)) => {
                    let now = Instant::now();
                    if let Some(previous) = last {
                        inter_token.push(now.duration_since(previous).as_secs_f64());
                    }
                    first.get_or_insert(now);
                    last = Some(now);
                }
                Some(chat_event::Kind::Done(done)) => {
                    let now = Instant::now();
                    let usage = done.usage.unwrap_or_default();
                    let sample = TurnSample {
                        ttft: first.unwrap_or(now).duration_since(sent).as_secs_f64(),
                        inter_token,
                        latency: now.duration_since(sent).as_secs_f64(),
                        generated_tokens: usage.generated_tokens,
                        prompt_tokens: usage.prompt_tokens,
                        cached_prompt_tokens: usage.cached_prompt_tokens,
                    };
                    return (Ok(sample), retries);
                }
                None => {}
            },
            Ok(None) => return (Err("the stream ended without `done`".into()), retries),
            Err(status) => {
                return (
                    Err(format!(
                        "Chat stream: {}: {}",
                        status.code(),
                        status.message()
                    )),
                    retries,
                )
            }
        }
    }
}

fn summarise(
    args: &LoadArgs,
    wall_seconds: f64,
    outcomes: Vec<TurnOutcome>,
    fixed_image: bool,
) -> LoadResult {
    let retries = outcomes.iter().map(|o| u64::from(o.retries)).sum();
    let mut errors: Vec<String> = Vec::new();
    let mut first = Vec::new();
    let mut later = Vec::new();
    for outcome in outcomes {
        match outcome.result {
            Ok(sample) if outcome.turn_index == 0 => first.push(sample),
            Ok(sample) => later.push(sample),
            Err(message) => errors.push(message),
        }
    }
    let turns_failed = errors.len();
    errors.sort();
    errors.dedup();
    errors.truncate(5);
    let all_turns = GroupSummary::from_samples(first.iter().chain(&later));
    let wall = wall_seconds.max(f64::MIN_POSITIVE);
    LoadResult {
        addr: args.addr.clone(),
        sessions: args.sessions,
        turns_per_session: args.turns,
        new_tokens: args.new_tokens,
        image: match (&args.image, fixed_image) {
            (Some(path), true) => path.display().to_string(),
            _ => format!("random {0}x{0} BMP per session", args.image_size),
        },
        wall_seconds,
        turns_completed: all_turns.turns,
        turns_failed,
        retries,
        tokens_per_second: all_turns.generated_tokens as f64 / wall,
        requests_per_second: all_turns.turns as f64 / wall,
        first_turns: GroupSummary::from_samples(&first),
        later_turns: GroupSummary::from_samples(&later),
        all_turns,
        errors,
    }
}

fn print_table(r: &LoadResult) {
    let ms = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.1}"));
    println!(
        "{} sessions x {} turns, {} new tokens, {}: {:.2} s wall, {} turns done, {} failed, {} retries",
        r.sessions,
        r.turns_per_session,
        r.new_tokens,
        r.image,
        r.wall_seconds,
        r.turns_completed,
        r.turns_failed,
        r.retries
    );
    println!(
        "throughput: {:.2} tokens/s, {:.3} requests/s",
        r.tokens_per_second, r.requests_per_second
    );
    println!(
        "{:<7} {:>5} {:>9} {:>9} {:>9} {:>8} {:>8} {:>10} {:>7} {:>7}",
        "turns",
        "n",
        "TTFT p50",
        "TTFT p95",
        "TTFT p99",
        "ITL p50",
        "ITL p99",
        "stream t/s",
        "prompt",
        "cached"
    );
    for (name, g) in [
        ("first", &r.first_turns),
        ("later", &r.later_turns),
        ("all", &r.all_turns),
    ] {
        println!(
            "{:<7} {:>5} {:>9} {:>9} {:>9} {:>8} {:>8} {:>10} {:>7} {:>7}",
            name,
            g.turns,
            ms(g.ttft_ms.p50),
            ms(g.ttft_ms.p95),
            ms(g.ttft_ms.p99),
            ms(g.itl_ms.p50),
            ms(g.itl_ms.p99),
            ms(g.stream_tokens_per_second_p50),
            ms(g.mean_prompt_tokens),
            ms(g.mean_cached_prompt_tokens)
        );
    }
    println!("(milliseconds; prompt and cached: mean positions per turn)");
    for e in &r.errors {
        println!("error: {e}");
    }
}

/// An uncompressed 24-bit BMP of random pixels (xorshift from `seed`): a distinct image per
/// session without an encoder dependency. The vision tier resizes it like any photo.
pub fn random_bmp(width: u32, height: u32, seed: u64) -> Vec<u8> {
    let row = (width as usize * 3).div_ceil(4) * 4;
    let pixels = row * height as usize;
    let file_size = 54 + pixels;
    let mut out = Vec::with_capacity(file_size);
    out.extend_from_slice(b"BM");
    out.extend_from_slice(&(file_size as u32).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&54u32.to_le_bytes());
    out.extend_from_slice(&40u32.to_le_bytes()); // BITMAPINFOHEADER
    out.extend_from_slice(&(width as i32).to_le_bytes());
    out.extend_from_slice(&(height as i32).to_le_bytes());
    out.extend_from_slice(&1u16.to_le_bytes()); // planes
    out.extend_from_slice(&24u16.to_le_bytes()); // bits per pixel
    out.extend_from_slice(&0u32.to_le_bytes()); // no compression
    out.extend_from_slice(&(pixels as u32).to_le_bytes());
    out.extend_from_slice(&2835i32.to_le_bytes()); // 72 dpi
    out.extend_from_slice(&2835i32.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    let mut state = seed ^ 0x9E37_79B9_7F4A_7C15;
    for _ in 0..height {
        for x in 0..row {
            if x < width as usize * 3 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                out.push((state >> 24) as u8);
            } else {
                out.push(0);
            }
        }
    }
    out
}
