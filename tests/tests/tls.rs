//! TLS on every tier and mutual TLS between tiers, as separate `blip2 serve` processes with
//! certificates made here: a chat works through TLS end to end; a plain client, a client that
//! does not trust the CA, and a tier client without a certificate are all refused.

mod common;

use std::path::{Path, PathBuf};

use blip2_proto::v1::llm_service_client::LlmServiceClient;
use blip2_proto::v1::session_service_client::SessionServiceClient;
use blip2_proto::v1::{
    chat_event, turn_image, ChatRequest, CreateSessionRequest, LlmInfoRequest, TurnImage,
};
use common::{fixture, spawn, Tier};
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use tokio_stream::StreamExt;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// PEM files of a CA, a server certificate for localhost and a client certificate.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn path(&self, name: &str) -> String {
        self.dir.join(name).to_string_lossy().into_owned()
    }

    fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.dir.join(name)).expect("pem file")
    }

    fn new(tag: &str) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("blip2-tls-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let write = |name: &str, pem: String| std::fs::write(dir.join(name), pem);
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_key = KeyPair::generate()?;
        let ca = ca_params.self_signed(&ca_key)?;
        write("ca.pem", ca.pem())?;
        for (name, sans) in [
            ("server", vec!["localhost".to_string()]),
            ("client", vec!["session-tier".to_string()]),
        ] {
            let key = KeyPair::generate()?;
            let cert = CertificateParams::new(sans)?.signed_by(&key, &ca, &ca_key)?;
            write(&format!("{name}.pem"), cert.pem())?;
            write(&format!("{name}.key"), key.serialize_pem())?;
        }
        // A second CA nobody trusts.
        let mut other = CertificateParams::new(Vec::<String>::new())?;
        other.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        write(
            "other-ca.pem",
            other.self_signed(&KeyPair::generate()?)?.pem(),
        )?;
        Ok(Pki { dir })
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.dir).ok();
    }
}

/// `https://localhost:PORT` for a tier that announced `http://127.0.0.1:PORT`.
fn https(tier: &Tier) -> String {
    let port = tier.addr.rsplit(':').next().expect("a port");
    format!("https://localhost:{port}")
}

async fn channel(address: &str, tls: Option<ClientTlsConfig>) -> Result<Channel, String> {
    let endpoint = Endpoint::from_shared(address.to_string()).map_err(|e| e.to_string())?;
    let endpoint = match tls {
        Some(tls) => endpoint.tls_config(tls).map_err(|e| e.to_string())?,
        None => endpoint,
    };
    endpoint.connect().await.map_err(|e| format!("{e:?}"))
}

fn trusting(pki: &Pki, ca: &str) -> ClientTlsConfig {
    ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pki.read(ca)))
}

async fn chat_once(channel: Channel) -> Result<String, tonic::Status> {
    let mut client = SessionServiceClient::new(channel);
    let session_id = client
        .create_session(CreateSessionRequest::default())
        .await?
        .into_inner()
        .session_id;
    let image = std::fs::read(fixture("images/gray.png")).expect("fixture image");
    let request = ChatRequest {
        session_id,
        text: "what is this?".into(),
        images: vec![TurnImage {
            source: Some(turn_image::Source::Data(image)),
        }],
        params: Some(blip2_proto::v1::GenerationParams {
            max_new_tokens: Some(4),
            ..Default::default()
        }),
        idempotency_key: String::new(),
    };
    let mut stream = client.chat(request).await?.into_inner();
    while let Some(event) = stream.next().await {
        if let Some(chat_event::Kind::Done(done)) = event?.kind {
            return Ok(done.turn_id);
        }
    }
    Err(tonic::Status::internal("no final event"))
}

fn serve_tier(tier: &str, model: &Path, pki: &Pki) -> Tier {
    let model = model.to_str().expect("utf-8 path");
    spawn(&[
        tier,
        "--listen",
        "127.0.0.1:0",
        "--model",
        model,
        "--tls-cert",
        &pki.path("server.pem"),
        "--tls-key",
        &pki.path("server.key"),
        "--tls-client-ca",
        &pki.path("ca.pem"),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_everywhere_and_mutual_tls_between_tiers() -> anyhow::Result<()> {
    let pki = Pki::new("e2e")?;
    let model = fixture("models/opt-a");
    let vision = serve_tier("vision", &model, &pki);
    let llm = serve_tier("llm", &model, &pki);
    let (vision_addr, llm_addr) = (https(&vision), https(&llm));
    let session = spawn(&[
        "session",
        "--listen",
        "127.0.0.1:0",
        "--model",
        model.to_str().expect("utf-8 path"),
        "--vision",
        &vision_addr,
        "--llm",
        &llm_addr,
        "--tls-cert",
        &pki.path("server.pem"),
        "--tls-key",
        &pki.path("server.key"),
        "--upstream-ca",
        &pki.path("ca.pem"),
        "--upstream-cert",
        &pki.path("client.pem"),
        "--upstream-key",
        &pki.path("client.key"),
    ]);

    // A chat through TLS, over mutual TLS to the tiers below.
    let session_addr = https(&session);
    let secure = channel(&session_addr, Some(trusting(&pki, "ca.pem"))).await;
    let turn_id = chat_once(secure.expect("TLS connection")).await?;
    assert!(!turn_id.is_empty());

    // Plain HTTP/2 to a TLS port, and TLS that does not trust the CA: no connection or no call.
    let plain = format!(
        "http://127.0.0.1:{}",
        session_addr.rsplit(':').next().unwrap_or("")
    );
    if let Ok(channel) = channel(&plain, None).await {
        assert!(chat_once(channel).await.is_err(), "plain call served");
    }
    let distrust = channel(&session_addr, Some(trusting(&pki, "other-ca.pem"))).await;
    if let Ok(channel) = distrust {
        assert!(chat_once(channel).await.is_err(), "untrusted CA served");
    }

    // The LLM tier requires a client certificate signed by the CA.
    let no_identity = channel(&llm_addr, Some(trusting(&pki, "ca.pem"))).await;
    let refused = match no_identity {
        Ok(channel) => LlmServiceClient::new(channel)
            .info(LlmInfoRequest {})
            .await
            .is_err(),
        Err(_) => true,
    };
    assert!(
        refused,
        "the LLM tier served a client without a certificate"
    );
    let identity = Identity::from_pem(pki.read("client.pem"), pki.read("client.key"));
    let with_identity = channel(&llm_addr, Some(trusting(&pki, "ca.pem").identity(identity)))
        .await
        .expect("mutual TLS connection");
    let info = LlmServiceClient::new(with_identity)
        .info(LlmInfoRequest {})
        .await?
        .into_inner();
    assert_eq!(info.model_type, "opt");
    drop((vision, llm, session));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_tier_without_a_client_certificate_gets_unavailable() -> anyhow::Result<()> {
    let pki = Pki::new("nocert")?;
    let model = fixture("models/opt-a");
    let vision = serve_tier("vision", &model, &pki);
    let llm = serve_tier("llm", &model, &pki);
    let session = spawn(&[
        "session",
        "--listen",
        "127.0.0.1:0",
        "--model",
        model.to_str().expect("utf-8 path"),
        "--vision",
        &https(&vision),
        "--llm",
        &https(&llm),
        "--upstream-ca",
        &pki.path("ca.pem"),
    ]);
    let plain = channel(&session.addr, None)
        .await
        .expect("plain session port");
    let status = chat_once(plain).await.expect_err("the tiers refuse it");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    Ok(())
}
