//! Deadlines, graceful shutdown and faults, with every tier a separate `blip2 serve` process on
//! loopback. The LLM tiers run with `--llm-min-step-ms` so that the small committed checkpoint
//! streams long enough to be interrupted.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use blip2_proto::v1::llm_service_client::LlmServiceClient;
use blip2_proto::v1::session_service_client::SessionServiceClient;
use blip2_proto::v1::{
    chat_event, generate_input, generate_output, prompt_segment, ChatEvent, ChatRequest,
    CreateSessionRequest, GenerateInput, GenerateOutput, GenerateSetup, GenerationParams,
    GetSessionRequest, LlmInfoRequest, PromptSegment,
};
use tonic::transport::Channel;
use tonic::{Code, Status, Streaming};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use common::{fixture, spawn, Tier};

/// Milliseconds per decode step of the paced LLM tiers: 200 tokens take 4 s.
const STEP_MS: &str = "20";

fn model_dir() -> String {
    fixture("models/opt-a")
        .to_str()
        .expect("utf-8 path")
        .to_string()
}

fn vision() -> Tier {
    spawn(&["vision", "--listen", "127.0.0.1:0", "--model", &model_dir()])
}

/// A paced LLM tier on `listen`, with extra flags.
fn llm_on(listen: &str, flags: &[&str]) -> Tier {
    let model = model_dir();
    let mut args = vec![
        "llm",
        "--listen",
        listen,
        "--model",
        &model,
        "--llm-min-step-ms",
        STEP_MS,
    ];
    args.extend_from_slice(flags);
    spawn(&args)
}

fn session(vision: &Tier, llms: &[&Tier]) -> Tier {
    let model = model_dir();
    let mut args = vec![
        "session",
        "--listen",
        "127.0.0.1:0",
        "--model",
        &model,
        "--vision",
        &vision.addr,
        // An ejected replica comes back within a second of answering SERVING again.
        "--replica-probe-secs",
        "1",
    ];
    for llm in llms {
        args.extend_from_slice(&["--llm", &llm.addr]);
    }
    spawn(&args)
}

async fn connect(addr: &str) -> Channel {
    Channel::from_shared(addr.to_string())
        .expect("address")
        .connect()
        .await
        .expect("connecting")
}

async fn session_client(tier: &Tier) -> SessionServiceClient<Channel> {
    SessionServiceClient::new(connect(&tier.addr).await)
}

fn params(tokens: u32) -> GenerationParams {
    GenerationParams {
        max_new_tokens: Some(tokens),
        min_new_tokens: Some(tokens),
        ..Default::default()
    }
}

async fn new_session(client: &mut SessionServiceClient<Channel>) -> String {
    client
        .create_session(CreateSessionRequest::default())
        .await
        .expect("CreateSession")
        .into_inner()
        .session_id
}

fn chat_request(session_id: &str, text: &str, tokens: u32) -> ChatRequest {
    ChatRequest {
        session_id: session_id.to_string(),
        text: text.to_string(),
        params: Some(params(tokens)),
        ..Default::default()
    }
}

/// A whole turn: its text pieces and the final text, or the status it ended with.
async fn chat(
    client: &mut SessionServiceClient<Channel>,
    request: tonic::Request<ChatRequest>,
) -> Result<(usize, String), Status> {
    let mut stream = client.chat(request).await?.into_inner();
    let mut pieces = 0;
    while let Some(event) = stream.message().await? {
        match event.kind {
            Some(chat_event::Kind::Text(_)) => pieces += 1,
            Some(chat_event::Kind::Done(done)) => return Ok((pieces, done.text)),
            None => {}
        }
    }
    Err(Status::internal("the turn ended without `done`"))
}

async fn turns(client: &mut SessionServiceClient<Channel>, session_id: &str) -> usize {
    client
        .get_session(GetSessionRequest {
            session_id: session_id.to_string(),
        })
        .await
        .expect("GetSession")
        .into_inner()
        .turns
        .len()
}

/// Reads `n` text events of a turn.
async fn read_pieces(stream: &mut Streaming<ChatEvent>, n: usize) {
    for _ in 0..n {
        match stream.message().await {
            Ok(Some(ChatEvent {
                kind: Some(chat_event::Kind::Text(_)),
            })) => {}
            other => panic!("expected a text event, got {other:?}"),
        }
    }
}

async fn running_sequences(llm: &Tier) -> u32 {
    let mut client = LlmServiceClient::new(connect(&llm.addr).await);
    client
        .info(LlmInfoRequest::default())
        .await
        .expect("Info")
        .into_inner()
        .running_sequences
}

/// The `host:port` of a tier's `http://` address.
fn listen_addr(tier: &Tier) -> String {
    tier.addr
        .strip_prefix("http://")
        .expect("an http:// address")
        .to_string()
}

fn signal(tier: &Tier, signal: &str) {
    let status = Command::new("kill")
        .args([signal, &tier.child.id().to_string()])
        .status()
        .expect("running kill");
    assert!(status.success(), "kill {signal} failed");
}

/// Waits for the tier's process to exit, at most `limit`; its exit status.
fn wait_exit(tier: &mut Tier, limit: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = tier.child.try_wait().expect("try_wait") {
            return status;
        }
        assert!(
            start.elapsed() < limit,
            "the tier was still running {limit:?} after the signal"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test]
async fn a_chat_deadline_stops_the_turn_and_its_sequence() {
    let vision = vision();
    let llm = llm_on("127.0.0.1:0", &[]);
    let session = session(&vision, &[&llm]);
    let mut client = session_client(&session).await;
    let session_id = new_session(&mut client).await;
    // A first turn without a deadline is recorded as usual.
    chat(
        &mut client,
        tonic::Request::new(chat_request(&session_id, "hello", 3)),
    )
    .await
    .expect("a first turn");
    assert_eq!(turns(&mut client, &session_id).await, 1);

    // 200 tokens take 4 s; the deadline is 300 ms.
    let mut request = tonic::Request::new(chat_request(&session_id, "and then?", 200));
    request.set_timeout(Duration::from_millis(300));
    let start = Instant::now();
    let status = chat(&mut client, request)
        .await
        .expect_err("the turn outlives its deadline");
    let elapsed = start.elapsed();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        elapsed < Duration::from_millis(1300),
        "the turn ended {elapsed:?} after it started"
    );
    // The LLM tier stopped the sequence (within a step or so) and the session is unchanged.
    let until = Instant::now() + Duration::from_secs(2);
    while running_sequences(&llm).await != 0 {
        assert!(
            Instant::now() < until,
            "the LLM tier still runs the sequence"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(turns(&mut client, &session_id).await, 1);

    // A deadline the turn fits in changes nothing.
    let mut request = tonic::Request::new(chat_request(&session_id, "short", 3));
    request.set_timeout(Duration::from_secs(30));
    chat(&mut client, request).await.expect("a turn in time");
    assert_eq!(turns(&mut client, &session_id).await, 2);
}

fn text_setup(text: &str, tokens: u32) -> GenerateInput {
    GenerateInput {
        kind: Some(generate_input::Kind::Setup(GenerateSetup {
            segments: vec![PromptSegment {
                kind: Some(prompt_segment::Kind::Text(text.to_string())),
            }],
            params: Some(params(tokens)),
        })),
    }
}

/// A text-only Generate call; the input stays open (as the session tier keeps it).
async fn generate(
    client: &mut LlmServiceClient<Channel>,
    request: tonic::Request<GenerateInput>,
) -> Result<
    (
        Streaming<GenerateOutput>,
        tokio::sync::mpsc::Sender<GenerateInput>,
    ),
    Status,
> {
    let (metadata, extensions, input) = request.into_parts();
    let (sender, receiver) = tokio::sync::mpsc::channel(1);
    sender.try_send(input).expect("queueing setup");
    let request = tonic::Request::from_parts(
        metadata,
        extensions,
        tokio_stream::wrappers::ReceiverStream::new(receiver),
    );
    let stream = client.generate(request).await?.into_inner();
    Ok((stream, sender))
}

/// Tokens until the end of the stream; the finish, or the status it ended with.
async fn drain(stream: &mut Streaming<GenerateOutput>) -> Result<usize, Status> {
    let mut tokens = 0;
    while let Some(output) = stream.message().await? {
        match output.kind {
            Some(generate_output::Kind::Token(_)) => tokens += 1,
            Some(generate_output::Kind::Finish(_)) => return Ok(tokens),
            None => {}
        }
    }
    Err(Status::internal("no finish"))
}

#[tokio::test]
async fn the_llm_tier_enforces_a_deadline_on_its_stream() {
    let llm = llm_on("127.0.0.1:0", &[]);
    let mut client = LlmServiceClient::new(connect(&llm.addr).await);
    let mut request = tonic::Request::new(text_setup("a long answer", 200));
    request.set_timeout(Duration::from_millis(300));
    let start = Instant::now();
    let (mut stream, _input) = generate(&mut client, request).await.expect("Generate");
    let status = drain(&mut stream).await.expect_err("past the deadline");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    let elapsed = start.elapsed();
    assert!(
        elapsed >= Duration::from_millis(250) && elapsed < Duration::from_millis(1000),
        "ended after {elapsed:?}"
    );
    let until = Instant::now() + Duration::from_secs(1);
    while running_sequences(&llm).await != 0 {
        assert!(Instant::now() < until, "the sequence still runs");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A draining session tier: a new call is refused with UNAVAILABLE, and the running turn
/// `stream` still ends with `done`.
async fn refuses_new_calls_and_finishes_the_turn(
    client: &mut SessionServiceClient<Channel>,
    stream: &mut Streaming<ChatEvent>,
) {
    let refused = client
        .create_session(CreateSessionRequest::default())
        .await
        .expect_err("new calls are refused");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    let mut done = false;
    while let Some(event) = stream.message().await.expect("the turn goes on") {
        if let Some(chat_event::Kind::Done(_)) = event.kind {
            done = true;
        }
    }
    assert!(done, "the turn ended without `done`");
}

async fn health(addr: &str) -> i32 {
    let mut client = HealthClient::new(connect(addr).await);
    let response = client
        .check(HealthCheckRequest {
            service: "blip2.v1.LlmService".into(),
        })
        .await
        .expect("health answers");
    response.into_inner().status
}

#[tokio::test]
async fn sigterm_drains_the_llm_tier_then_exits() {
    let mut llm = llm_on("127.0.0.1:0", &["--shutdown-grace", "5"]);
    assert_eq!(health(&llm.addr).await, ServingStatus::Serving as i32);
    let mut client = LlmServiceClient::new(connect(&llm.addr).await);
    // 60 tokens: 1.2 s, well within the grace period.
    let (mut stream, _input) = generate(&mut client, tonic::Request::new(text_setup("hi", 60)))
        .await
        .expect("Generate");
    let first = stream.message().await.expect("a token").expect("a token");
    assert!(matches!(first.kind, Some(generate_output::Kind::Token(_))));
    let signalled = Instant::now();
    signal(&llm, "-TERM");
    tokio::time::sleep(Duration::from_millis(100)).await;

    // Health says NOT_SERVING; a new call is refused; the running stream goes on to its end.
    assert_eq!(health(&llm.addr).await, ServingStatus::NotServing as i32);
    let refused = match generate(&mut client, tonic::Request::new(text_setup("more", 5))).await {
        Ok((mut stream, _input)) => drain(&mut stream).await.expect_err("refused"),
        Err(status) => status,
    };
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    let tokens = drain(&mut stream)
        .await
        .expect("the running stream finishes");
    assert_eq!(tokens + 1, 60);
    let status = wait_exit(&mut llm, Duration::from_secs(5));
    assert!(status.success(), "{status:?}");
    assert!(signalled.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn sigterm_cuts_streams_that_outlast_the_grace_period() {
    let mut llm = llm_on("127.0.0.1:0", &["--shutdown-grace", "0.5"]);
    let mut client = LlmServiceClient::new(connect(&llm.addr).await);
    // 200 tokens: 4 s, longer than the grace period.
    let (mut stream, _input) = generate(&mut client, tonic::Request::new(text_setup("hi", 200)))
        .await
        .expect("Generate");
    stream.message().await.expect("a token").expect("a token");
    let signalled = Instant::now();
    signal(&llm, "-TERM");
    let status = drain(&mut stream).await.expect_err("cut at the grace");
    let cut = signalled.elapsed();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        cut >= Duration::from_millis(400) && cut < Duration::from_millis(2000),
        "cut after {cut:?}"
    );
    let status = wait_exit(&mut llm, Duration::from_secs(4));
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn sigterm_drains_the_session_tier() {
    let vision = vision();
    let llm = llm_on("127.0.0.1:0", &[]);
    let model = model_dir();
    let mut session = spawn(&[
        "session",
        "--listen",
        "127.0.0.1:0",
        "--model",
        &model,
        "--vision",
        &vision.addr,
        "--llm",
        &llm.addr,
        "--shutdown-grace",
        "5",
    ]);
    let mut client = session_client(&session).await;
    let session_id = new_session(&mut client).await;
    let mut stream = client
        .chat(chat_request(&session_id, "hello", 40))
        .await
        .expect("Chat")
        .into_inner();
    read_pieces(&mut stream, 2).await;
    signal(&session, "-TERM");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut health = HealthClient::new(connect(&session.addr).await);
    let status = health
        .check(HealthCheckRequest {
            service: "blip2.v1.SessionService".into(),
        })
        .await
        .expect("health answers while draining")
        .into_inner()
        .status;
    assert_eq!(status, ServingStatus::NotServing as i32);
    refuses_new_calls_and_finishes_the_turn(&mut client, &mut stream).await;
    let status = wait_exit(&mut session, Duration::from_secs(5));
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn a_killed_llm_tier_ends_the_turn_and_the_session_survives() {
    let vision = vision();
    let mut llm = llm_on("127.0.0.1:0", &[]);
    let listen = listen_addr(&llm);
    let session = session(&vision, &[&llm]);
    let mut client = session_client(&session).await;
    let session_id = new_session(&mut client).await;
    for text in ["one", "two"] {
        chat(
            &mut client,
            tonic::Request::new(chat_request(&session_id, text, 4)),
        )
        .await
        .expect("an earlier turn");
    }

    let mut stream = client
        .chat(chat_request(&session_id, "three", 200))
        .await
        .expect("Chat")
        .into_inner();
    read_pieces(&mut stream, 3).await;
    llm.child.kill().expect("kill -9");
    let killed = Instant::now();
    let status = loop {
        match stream.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the turn ended without a status"),
            Err(status) => break status,
        }
    };
    let noticed = killed.elapsed();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        noticed < Duration::from_secs(1),
        "UNAVAILABLE after {noticed:?}"
    );
    llm.child.wait().ok();
    assert_eq!(turns(&mut client, &session_id).await, 2);

    // While no LLM replica is up a turn fails at once; once one is back on the same address,
    // the next turn works.
    let down = chat(
        &mut client,
        tonic::Request::new(chat_request(&session_id, "x", 2)),
    )
    .await;
    assert_eq!(down.map_err(|s| s.code()).err(), Some(Code::Unavailable));
    let _llm = llm_on(&listen, &[]);
    let until = Instant::now() + Duration::from_secs(15);
    loop {
        let request = tonic::Request::new(chat_request(&session_id, "four", 4));
        match chat(&mut client, request).await {
            Ok(_) => break,
            Err(status) if status.code() == Code::Unavailable && Instant::now() < until => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(status) => panic!("the turn after the restart failed: {status:?}"),
        }
    }
    assert_eq!(turns(&mut client, &session_id).await, 3);
}

#[tokio::test]
async fn turns_succeed_with_one_of_two_llm_replicas_down() {
    let vision = vision();
    let mut down = llm_on("127.0.0.1:0", &[]);
    let up = llm_on("127.0.0.1:0", &[]);
    let session = session(&vision, &[&down, &up]);
    down.child.kill().expect("kill -9");
    down.child.wait().ok();
    let mut client = session_client(&session).await;
    // Sessions hash onto both replicas; every turn must land on the one that is up.
    for s in 0..6 {
        let session_id = new_session(&mut client).await;
        for t in 0..2 {
            let text = format!("session {s} turn {t}");
            chat(
                &mut client,
                tonic::Request::new(chat_request(&session_id, &text, 2)),
            )
            .await
            .unwrap_or_else(|status| panic!("{text}: {status:?}"));
        }
        assert_eq!(turns(&mut client, &session_id).await, 2);
    }
}

#[tokio::test]
async fn streams_are_untouched_by_a_channel_that_carries_no_deadline() {
    // The deadline is per call: a paced stream without one runs to its end.
    let llm = llm_on("127.0.0.1:0", &[]);
    let mut client = LlmServiceClient::new(connect(&llm.addr).await);
    let (mut stream, _input) = generate(&mut client, tonic::Request::new(text_setup("hi", 30)))
        .await
        .expect("Generate");
    assert_eq!(drain(&mut stream).await.expect("finishes"), 30);
}

/// `blip2 serve all` (HTTP API off) with paced decoding; the session tier's address.
fn spawn_all(flags: &[&str]) -> Tier {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let model = model_dir();
    let mut child = Command::new(common::blip2_binary())
        .args(["serve", "all", "--listen", "127.0.0.1:0", "--model", &model])
        .args(["--http-listen", "off", "--llm-min-step-ms", STEP_MS])
        .args(flags)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawning blip2 serve all");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let addr = loop {
        match lines.next() {
            Some(Ok(line)) => {
                if let Some(addr) = line.strip_prefix("blip2 session listening on ") {
                    break format!("http://{addr}");
                }
            }
            _ => panic!("blip2 serve all exited before listening"),
        }
    };
    std::thread::spawn(move || for _ in lines {});
    Tier { child, addr }
}

#[tokio::test]
async fn sigterm_drains_serve_all() {
    let mut all = spawn_all(&["--shutdown-grace", "5"]);
    let mut client = session_client(&all).await;
    let session_id = new_session(&mut client).await;
    // 40 tokens: 0.8 s.
    let mut stream = client
        .chat(chat_request(&session_id, "hello", 40))
        .await
        .expect("Chat")
        .into_inner();
    read_pieces(&mut stream, 2).await;
    let signalled = Instant::now();
    signal(&all, "-TERM");
    tokio::time::sleep(Duration::from_millis(100)).await;
    refuses_new_calls_and_finishes_the_turn(&mut client, &mut stream).await;
    let status = wait_exit(&mut all, Duration::from_secs(5));
    assert!(status.success(), "{status:?}");
    assert!(signalled.elapsed() < Duration::from_secs(5));
}
