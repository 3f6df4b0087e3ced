//! The client's deadline on an Encode stream, and graceful shutdown with a call in flight. A
//! long batch window holds an image in the model's queue so that a call outlasts both.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blip2_model::model::{Blip2Model, Components, LoadOptions};
use blip2_proto::v1::image_input::Source;
use blip2_proto::v1::vision_service_client::VisionServiceClient;
use blip2_proto::v1::{EncodeRequest, ImageInput};
use blip2_vision::{serve, VisionConfig, VisionTier};
use tokio::sync::oneshot;
use tonic::transport::Channel;
use tonic::{Code, Status};

/// How long an image waits for others to share its forward pass.
const WINDOW: Duration = Duration::from_millis(1500);

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn request() -> EncodeRequest {
    let data = std::fs::read(workspace().join("tests/fixtures/images/gray.png")).expect("image");
    EncodeRequest {
        images: vec![ImageInput {
            source: Some(Source::Data(data)),
        }],
        ..Default::default()
    }
}

struct Served {
    client: VisionServiceClient<Channel>,
    stop: oneshot::Sender<()>,
    served: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

async fn start(shutdown_grace: Duration) -> Served {
    let options = LoadOptions {
        components: Components {
            vision: true,
            language_model: false,
        },
        ..LoadOptions::default()
    };
    let dir = workspace().join("tests/fixtures/models/opt-a");
    let model = Arc::new(Blip2Model::load(&dir, &options).expect("load opt-a"));
    let config = VisionConfig {
        max_batch_size: 8,
        batch_window: WINDOW,
        shutdown_grace,
        ..VisionConfig::default()
    };
    let tier = VisionTier::new(model, "opt-a".into(), config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let served = tokio::spawn(serve(tier, listener, async move {
        let _ = stopped.await;
    }));
    let client = VisionServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");
    Served {
        client,
        stop,
        served,
    }
}

/// The number of soft prompts of one Encode call, or the status that ended it.
async fn encode(
    client: &mut VisionServiceClient<Channel>,
    request: tonic::Request<EncodeRequest>,
) -> Result<usize, Status> {
    let mut stream = client.encode(request).await?.into_inner();
    let mut n = 0;
    while stream.message().await?.is_some() {
        n += 1;
    }
    Ok(n)
}

#[tokio::test]
async fn an_encode_stream_ends_at_the_clients_deadline() {
    let mut served = start(Duration::from_secs(10)).await;
    let mut limited = tonic::Request::new(request());
    limited.set_timeout(Duration::from_millis(300));
    let start = Instant::now();
    let status = encode(&mut served.client, limited)
        .await
        .expect_err("the image waits longer than the deadline");
    let elapsed = start.elapsed();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        elapsed >= Duration::from_millis(250) && elapsed < WINDOW,
        "ended after {elapsed:?}"
    );
    // Without a deadline the same call waits out the window and succeeds.
    let n = encode(&mut served.client, tonic::Request::new(request()))
        .await
        .expect("encodes");
    assert_eq!(n, 1);
}

#[tokio::test]
async fn shutdown_cuts_a_call_that_outlasts_the_grace_period() {
    let served = start(Duration::from_millis(200)).await;
    let mut client = served.client.clone();
    let call =
        tokio::spawn(async move { encode(&mut client, tonic::Request::new(request())).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stopping = Instant::now();
    served.stop.send(()).unwrap();
    let status = call
        .await
        .unwrap()
        .expect_err("cut at the end of the grace period");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let cut = stopping.elapsed();
    assert!(cut < WINDOW, "cut after {cut:?}");
    tokio::time::timeout(Duration::from_secs(5), served.served)
        .await
        .expect("the server stops")
        .unwrap()
        .expect("served cleanly");
}
