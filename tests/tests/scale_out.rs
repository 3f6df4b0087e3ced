//! Scale-out on one machine: 2 vision + 2 LLM replicas + 1 session tier as separate `blip2 serve`
//! processes on loopback. 16 concurrent sessions spread over every replica, each session's turns
//! stay on one LLM replica (its prefix cache serves them), and when one LLM replica is killed no
//! session is lost: later turns of every session succeed on the other. And `dns:///` targets
//! over mutual TLS verify the name they resolved, not the address they connect to.

mod common;

use std::collections::HashMap;

use blip2_proto::v1::llm_service_client::LlmServiceClient;
use blip2_proto::v1::session_service_client::SessionServiceClient;
use blip2_proto::v1::vision_service_client::VisionServiceClient;
use blip2_proto::v1::{
    chat_event, turn_image, ChatRequest, CreateSessionRequest, GenerationParams, GetSessionRequest,
    LlmInfo, LlmInfoRequest, TurnImage, VisionInfo, VisionInfoRequest,
};
use tokio_stream::StreamExt;
use tonic::transport::Channel;

use common::{fixture, spawn, Tier};
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};

const SESSIONS: usize = 16;
const MAX_NEW_TOKENS: u32 = 4;
/// Prompt positions every prompt shares (OPT's BOS before the image): a replica that never saw
/// a session reuses this many of its prompt and no more.
const SHARED_PREFIX: u32 = 1;

/// A 24-bit BMP of 32 x 32 pixels, different for every `seed`: each session gets its own image,
/// so no two sessions' prompts share a prefix (the LLM tier's prefix cache keys positions by the
/// soft prompt's content) and a session's cache hits come from its own earlier turns only.
fn image(seed: usize) -> Vec<u8> {
    const SIDE: u32 = 32;
    let row = (3 * SIDE).div_ceil(4) * 4;
    let pixels = row * SIDE;
    let mut bmp = Vec::with_capacity(54 + pixels as usize);
    bmp.extend_from_slice(b"BM");
    for value in [54 + pixels, 0, 54, 40, SIDE, SIDE] {
        bmp.extend_from_slice(&value.to_le_bytes());
    }
    bmp.extend_from_slice(&1u16.to_le_bytes());
    bmp.extend_from_slice(&24u16.to_le_bytes());
    for value in [0, pixels, 2835, 2835, 0, 0] {
        bmp.extend_from_slice(&value.to_le_bytes());
    }
    let seed = seed as u32;
    for y in 0..SIDE {
        let start = bmp.len();
        for x in 0..SIDE {
            let blue = (x * 8 + seed * 37) % 256;
            let green = (y * 8 + seed * 71) % 256;
            let red = ((x ^ y) * 8 + seed * 113) % 256;
            bmp.extend_from_slice(&[blue as u8, green as u8, red as u8]);
        }
        bmp.resize(start + row as usize, 0);
    }
    bmp
}

struct Turn {
    prompt_tokens: u32,
    cached_prompt_tokens: u32,
}

async fn chat(
    mut client: SessionServiceClient<Channel>,
    session_id: String,
    text: &str,
    image: Option<Vec<u8>>,
) -> Result<Turn, tonic::Status> {
    let images = image
        .map(|data| {
            vec![TurnImage {
                source: Some(turn_image::Source::Data(data)),
            }]
        })
        .unwrap_or_default();
    let request = ChatRequest {
        session_id,
        text: text.to_string(),
        images,
        params: Some(GenerationParams {
            max_new_tokens: Some(MAX_NEW_TOKENS),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut stream = client.chat(request).await?.into_inner();
    while let Some(event) = stream.next().await {
        if let Some(chat_event::Kind::Done(done)) = event?.kind {
            let usage = done.usage.unwrap_or_default();
            return Ok(Turn {
                prompt_tokens: usage.prompt_tokens,
                cached_prompt_tokens: usage.cached_prompt_tokens,
            });
        }
    }
    Err(tonic::Status::internal("the stream ended without `done`"))
}

/// One turn of every session at once; the turns' results by session.
async fn turn_of_every_session(
    client: &SessionServiceClient<Channel>,
    sessions: &[String],
    text: &str,
    with_image: bool,
) -> HashMap<String, Result<Turn, tonic::Status>> {
    let mut tasks = tokio::task::JoinSet::new();
    for (index, session_id) in sessions.iter().enumerate() {
        let client = client.clone();
        let session_id = session_id.clone();
        let image = with_image.then(|| image(index));
        let text = format!("{text} ({index})");
        tasks.spawn(async move {
            let result = chat(client, session_id.clone(), &text, image).await;
            (session_id, result)
        });
    }
    let mut results = HashMap::new();
    while let Some(joined) = tasks.join_next().await {
        let (session_id, result) = joined.expect("turn task");
        results.insert(session_id, result);
    }
    results
}

async fn vision_info(tier: &Tier) -> VisionInfo {
    VisionServiceClient::connect(tier.addr.clone())
        .await
        .expect("connect to a vision replica")
        .info(VisionInfoRequest {})
        .await
        .expect("vision Info")
        .into_inner()
}

async fn llm_info(tier: &Tier) -> LlmInfo {
    LlmServiceClient::connect(tier.addr.clone())
        .await
        .expect("connect to an LLM replica")
        .info(LlmInfoRequest {})
        .await
        .expect("LLM Info")
        .into_inner()
}

fn port(tier: &Tier) -> &str {
    tier.addr.rsplit(':').next().expect("address with a port")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_spread_over_replicas_and_survive_losing_an_llm_replica() {
    let model = fixture("models/opt-a");
    let model = model.to_str().expect("utf-8 path");
    let replica = |tier: &str| spawn(&[tier, "--listen", "127.0.0.1:0", "--model", model]);
    let vision = [replica("vision"), replica("vision")];
    let mut llm = vec![replica("llm"), replica("llm")];
    // The vision replicas by name through DNS, as a headless Service is found; the LLM ones by
    // address.
    let vision_names: Vec<String> = vision
        .iter()
        .map(|tier| format!("dns:///localhost:{}", port(tier)))
        .collect();
    let session = spawn(&[
        "session",
        "--listen",
        "127.0.0.1:0",
        "--model",
        model,
        "--vision",
        &vision_names[0],
        "--vision",
        &vision_names[1],
        "--llm",
        &llm[0].addr,
        "--llm",
        &llm[1].addr,
        "--replica-probe-secs",
        "1",
    ]);
    let client = SessionServiceClient::connect(session.addr.clone())
        .await
        .expect("connect to the session tier");

    let mut sessions = Vec::new();
    for _ in 0..SESSIONS {
        let created = client
            .clone()
            .create_session(CreateSessionRequest::default())
            .await
            .expect("CreateSession");
        sessions.push(created.into_inner().session_id);
    }

    // Two turns of 16 concurrent sessions: an image, then a follow-up.
    let first = turn_of_every_session(&client, &sessions, "what is this?", true).await;
    let second = turn_of_every_session(&client, &sessions, "and what colour?", false).await;
    for session_id in &sessions {
        first[session_id].as_ref().expect("first turn");
        let turn = second[session_id].as_ref().expect("second turn");
        // The follow-up went to the replica that answered the first turn: its prefix cache
        // held the session's prompt.
        assert!(
            turn.cached_prompt_tokens > SHARED_PREFIX,
            "session {session_id}: turn 2 reused none of {} prompt tokens",
            turn.prompt_tokens
        );
    }

    // Every replica served a share.
    let mut encoded = 0;
    for tier in &vision {
        let info = vision_info(tier).await;
        let served = info.images_encoded + info.cache_hits;
        assert!(served > 0, "vision replica {} served nothing", tier.addr);
        encoded += served;
    }
    assert_eq!(encoded, SESSIONS as u64, "one encoding per session's image");
    let completed: Vec<u64> = {
        let mut completed = Vec::new();
        for tier in &llm {
            completed.push(llm_info(tier).await.completed);
        }
        completed
    };
    assert!(
        completed.iter().all(|&n| n > 0),
        "LLM replicas completed {completed:?}"
    );
    assert_eq!(completed.iter().sum::<u64>(), 2 * SESSIONS as u64);
    // Each session's two turns on one replica: each replica holds whole sessions.
    let killed_sessions = (completed[0] / 2) as usize;
    assert_eq!(completed[0] % 2, 0, "{completed:?}");

    // One LLM replica dies (SIGKILL: no goodbye). Every session's next turn still succeeds.
    let dead = llm.remove(0);
    drop(dead);
    let third = turn_of_every_session(&client, &sessions, "is it big?", false).await;
    let mut moved = 0;
    for session_id in &sessions {
        let turn = third[session_id]
            .as_ref()
            .unwrap_or_else(|status| panic!("session {session_id}, turn 3: {status:?}"));
        if turn.cached_prompt_tokens <= SHARED_PREFIX {
            moved += 1;
        }
    }
    // Exactly the dead replica's sessions moved (and lost their cached prefix); the survivor's
    // sessions stayed and kept theirs.
    assert_eq!(
        moved, killed_sessions,
        "sessions that lost their prefix cache"
    );
    let survivor = llm_info(&llm[0]).await;
    assert_eq!(survivor.completed, completed[1] + SESSIONS as u64);

    // A fourth turn: the moved sessions now stick to the survivor and reuse its cache.
    let fourth = turn_of_every_session(&client, &sessions, "thanks", false).await;
    for session_id in &sessions {
        let turn = fourth[session_id].as_ref().expect("fourth turn");
        assert!(
            turn.cached_prompt_tokens > SHARED_PREFIX,
            "session {session_id}"
        );
    }

    // No session lost a turn.
    for session_id in &sessions {
        let stored = client
            .clone()
            .get_session(GetSessionRequest {
                session_id: session_id.clone(),
            })
            .await
            .expect("GetSession")
            .into_inner();
        assert_eq!(stored.turns.len(), 4, "session {session_id}");
    }
    drop(session);
}

/// PEM files in a temporary directory: a CA, a tier certificate for `localhost` only (no IP
/// address), and the session tier's client certificate.
struct Pki(std::path::PathBuf);

impl Pki {
    fn new() -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("blip2-scale-out-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_key = KeyPair::generate()?;
        let ca = ca_params.self_signed(&ca_key)?;
        std::fs::write(dir.join("ca.pem"), ca.pem())?;
        for (name, san) in [("tier", "localhost"), ("session", "session-tier")] {
            let key = KeyPair::generate()?;
            let cert =
                CertificateParams::new(vec![san.to_string()])?.signed_by(&key, &ca, &ca_key)?;
            std::fs::write(dir.join(format!("{name}.pem")), cert.pem())?;
            std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem())?;
        }
        Ok(Self(dir))
    }

    fn path(&self, name: &str) -> String {
        self.0.join(name).to_string_lossy().into_owned()
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.0).ok();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_targets_over_mutual_tls_verify_the_resolved_name() {
    let pki = Pki::new().expect("certificates");
    let model = fixture("models/opt-a");
    let model = model.to_str().expect("utf-8 path");
    let (cert, key, ca) = (
        pki.path("tier.pem"),
        pki.path("tier.key"),
        pki.path("ca.pem"),
    );
    let tier = |name: &str| {
        spawn(&[
            name,
            "--listen",
            "127.0.0.1:0",
            "--model",
            model,
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--tls-client-ca",
            &ca,
        ])
    };
    let vision = tier("vision");
    let llm = tier("llm");
    let (session_cert, session_key) = (pki.path("session.pem"), pki.path("session.key"));
    let session_tier = |extra: &[&str]| {
        let vision_target = format!("dns:///localhost:{}", port(&vision));
        let llm_target = format!("dns:///localhost:{}", port(&llm));
        let mut args = vec![
            "session",
            "--listen",
            "127.0.0.1:0",
            "--model",
            model,
            "--vision",
            &vision_target,
            "--llm",
            &llm_target,
            "--upstream-ca",
            &ca,
            "--upstream-cert",
            &session_cert,
            "--upstream-key",
            &session_key,
        ];
        args.extend_from_slice(extra);
        spawn(&args)
    };
    let turn = |session: &Tier| {
        let address = session.addr.clone();
        async move {
            let mut client = SessionServiceClient::connect(address)
                .await
                .expect("connect to the session tier");
            let session_id = client
                .create_session(CreateSessionRequest::default())
                .await
                .expect("CreateSession")
                .into_inner()
                .session_id;
            chat(client, session_id, "what is this?", Some(image(1))).await
        }
    };

    // The replicas are https://127.0.0.1:PORT; the certificates name only localhost, the name
    // the targets resolved: verified against it, the turn goes through.
    let session = session_tier(&[]);
    let done = turn(&session).await.expect("a turn over mutual TLS");
    assert!(done.prompt_tokens > 0);

    // Told to expect another name, the session tier refuses the tiers' certificates.
    let wrong = session_tier(&["--upstream-domain", "not-localhost"]);
    let refused = turn(&wrong)
        .await
        .err()
        .expect("a certificate for another name");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
}
