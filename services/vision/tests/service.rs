//! VisionService over loopback: the tier served on port 0, a real gRPC client, the small opt-a
//! checkpoint from tests/fixtures.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use blip2_common::soft_prompt::{decode, sha256_hex};
use blip2_model::model::{Blip2Model, Components, LoadOptions};
use blip2_proto::v1::image_input::Source;
use blip2_proto::v1::vision_service_client::VisionServiceClient;
use blip2_proto::v1::{
    Dtype, EncodeRequest, EncodeResponse, ImageInput, SoftPrompt, VisionInfoRequest,
};
use blip2_vision::{serve, VisionConfig, VisionTier};
use candle_core::{DType, Device};
use tokio::sync::oneshot;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fixture_image(name: &str) -> Vec<u8> {
    let path = workspace().join("tests/fixtures/images").join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn load_model() -> Arc<Blip2Model> {
    let options = LoadOptions {
        components: Components {
            vision: true,
            language_model: false,
        },
        ..LoadOptions::default()
    };
    let dir = workspace().join("tests/fixtures/models/opt-a");
    Arc::new(Blip2Model::load(&dir, &options).expect("load opt-a"))
}

struct Harness {
    model: Arc<Blip2Model>,
    tier: VisionTier,
    client: VisionServiceClient<Channel>,
    channel: Channel,
    stop: oneshot::Sender<()>,
    served: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

async fn start(config: VisionConfig) -> Harness {
    let model = load_model();
    let tier = VisionTier::new(model.clone(), "opt-a".into(), config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let served = tokio::spawn(serve(tier.clone(), listener, async move {
        let _ = stopped.await;
    }));
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connect");
    let client = VisionServiceClient::new(channel.clone());
    Harness {
        model,
        tier,
        client,
        channel,
        stop,
        served,
    }
}

impl Harness {
    async fn shutdown(self) {
        drop(self.client);
        drop(self.channel);
        self.stop.send(()).unwrap();
        let served = tokio::time::timeout(Duration::from_secs(10), self.served).await;
        served
            .expect("shuts down")
            .unwrap()
            .expect("served cleanly");
    }

    /// The responses of one Encode call, then the status that ended it (None: a clean end).
    async fn encode(&mut self, request: EncodeRequest) -> (Vec<EncodeResponse>, Option<Status>) {
        let mut stream = match self.client.encode(request).await {
            Ok(response) => response.into_inner(),
            Err(status) => return (vec![], Some(status)),
        };
        let mut responses = vec![];
        loop {
            match stream.message().await {
                Ok(Some(response)) => responses.push(response),
                Ok(None) => return (responses, None),
                Err(status) => return (responses, Some(status)),
            }
        }
    }

    /// The model's own soft prompt for one image alone, `[Q, H]` as f32 rows.
    fn reference(&self, bytes: &[u8]) -> Vec<Vec<f32>> {
        let encoding = self.model.encode_images(&[bytes]).unwrap();
        let soft_prompt = encoding.soft_prompt.get(0).unwrap();
        soft_prompt.to_dtype(DType::F32).unwrap().to_vec2().unwrap()
    }

    fn shape(&self) -> [usize; 2] {
        let config = self.model.config();
        [config.num_query_tokens, config.text_config.hidden_size()]
    }

    fn rows(&self, soft_prompt: &SoftPrompt) -> Vec<Vec<f32>> {
        let tensor = decode(soft_prompt, self.shape(), &Device::Cpu).unwrap();
        tensor.to_dtype(DType::F32).unwrap().to_vec2().unwrap()
    }
}

fn bytes(data: Vec<u8>) -> ImageInput {
    ImageInput {
        source: Some(Source::Data(data)),
    }
}

fn hash(sha256: &str) -> ImageInput {
    ImageInput {
        source: Some(Source::Sha256(sha256.to_string())),
    }
}

fn request(images: Vec<ImageInput>) -> EncodeRequest {
    EncodeRequest {
        images,
        dtype: Dtype::Unspecified as i32,
    }
}

fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Distinct images (distinct hashes) that decode to the same pixels: bytes after the end of a
/// JPEG are ignored by decoders.
fn variants(count: usize) -> Vec<Vec<u8>> {
    let photo = fixture_image("photo.jpg");
    (0..count)
        .map(|i| {
            let mut data = photo.clone();
            data.extend_from_slice(&(i as u64).to_le_bytes());
            data
        })
        .collect()
}

#[tokio::test]
async fn streams_each_image_in_order_equal_to_the_model_alone() {
    // One image per forward pass: results are bitwise those of the model on each image alone.
    let config = VisionConfig {
        max_batch_size: 1,
        ..VisionConfig::default()
    };
    let mut h = start(config).await;
    let (photo, rgba) = (fixture_image("photo.jpg"), fixture_image("rgba.png"));
    let (responses, status) = h
        .encode(request(vec![bytes(photo.clone()), bytes(rgba.clone())]))
        .await;
    assert!(status.is_none(), "{status:?}");
    assert_eq!(responses.len(), 2);
    for (i, (response, image)) in responses.iter().zip([&photo, &rgba]).enumerate() {
        assert_eq!(response.index, i as u32);
        assert!(!response.cached);
        let soft_prompt = response.soft_prompt.as_ref().unwrap();
        assert_eq!(soft_prompt.dtype, Dtype::F32 as i32);
        assert_eq!(soft_prompt.shape, vec![8, 64]);
        assert_eq!(soft_prompt.image_sha256, sha256_hex(image));
        assert_eq!(soft_prompt.checkpoint_fingerprint, h.model.fingerprint());
        assert_eq!(h.rows(soft_prompt), h.reference(image), "image {i}");
    }
    assert_eq!(h.tier.images_encoded(), 2);
    assert_eq!(h.tier.cache_hits(), 0);
    h.shutdown().await;
}

#[tokio::test]
async fn batched_images_stay_within_rounding_of_the_model_alone() {
    let mut h = start(VisionConfig::default()).await;
    let images: Vec<Vec<u8>> = ["photo.jpg", "rgba.png", "gray.png", "palette.png"]
        .into_iter()
        .map(fixture_image)
        .collect();
    let (responses, status) = h
        .encode(request(images.iter().cloned().map(bytes).collect()))
        .await;
    assert!(status.is_none(), "{status:?}");
    assert_eq!(responses.len(), images.len());
    for (i, (response, image)) in responses.iter().zip(&images).enumerate() {
        assert_eq!(response.index, i as u32);
        let rows = h.rows(response.soft_prompt.as_ref().unwrap());
        let diff = max_abs_diff(&rows, &h.reference(image));
        assert!(diff <= 1e-5, "image {i}: max |diff| {diff}");
    }
    h.shutdown().await;
}

#[tokio::test]
async fn a_cached_image_is_answered_by_hash_without_the_model() {
    let mut h = start(VisionConfig::default()).await;
    let photo = fixture_image("photo.jpg");
    let sha256 = sha256_hex(&photo);
    let (first, status) = h.encode(request(vec![bytes(photo.clone())])).await;
    assert!(status.is_none(), "{status:?}");
    assert_eq!(h.tier.images_encoded(), 1);

    // By hash, upper case accepted; and by bytes again.
    for image in [hash(&sha256.to_uppercase()), bytes(photo.clone())] {
        let (again, status) = h.encode(request(vec![image])).await;
        assert!(status.is_none(), "{status:?}");
        assert!(again[0].cached);
        assert_eq!(again[0].soft_prompt, first[0].soft_prompt);
    }
    assert_eq!(h.tier.images_encoded(), 1);
    assert_eq!(h.tier.cache_hits(), 2);

    // An image repeated within one call, by bytes then by hash, runs the model once.
    let rgba = fixture_image("rgba.png");
    let images = vec![bytes(rgba.clone()), hash(&sha256_hex(&rgba)), bytes(rgba)];
    let (responses, status) = h.encode(request(images)).await;
    assert!(status.is_none(), "{status:?}");
    let cached: Vec<bool> = responses.iter().map(|r| r.cached).collect();
    assert_eq!(cached, [false, true, true]);
    assert_eq!(responses[1].soft_prompt, responses[0].soft_prompt);
    assert_eq!(responses[2].soft_prompt, responses[0].soft_prompt);
    assert_eq!(h.tier.images_encoded(), 2);
    h.shutdown().await;
}

#[tokio::test]
async fn returns_the_requested_dtype() {
    let mut h = start(VisionConfig::default()).await;
    let photo = fixture_image("photo.jpg");
    for (dtype, width) in [(Dtype::F16, 2), (Dtype::Bf16, 2), (Dtype::F32, 4)] {
        let (responses, status) = h
            .encode(EncodeRequest {
                images: vec![bytes(photo.clone())],
                dtype: dtype as i32,
            })
            .await;
        assert!(status.is_none(), "{status:?}");
        let soft_prompt = responses[0].soft_prompt.as_ref().unwrap();
        assert_eq!(soft_prompt.dtype, dtype as i32);
        assert_eq!(soft_prompt.shape, vec![8, 64]);
        assert_eq!(soft_prompt.data.len(), 8 * 64 * width);
        let diff = max_abs_diff(&h.rows(soft_prompt), &h.reference(&photo));
        assert!(diff < 0.05, "{dtype:?}: max |diff| {diff}");
    }
    // The first call ran the model, the other two came from the cache (stored once, in f32).
    assert_eq!(h.tier.images_encoded(), 1);
    assert_eq!(h.tier.cache_hits(), 2);
    h.shutdown().await;
}

#[tokio::test]
async fn refuses_bad_requests_and_keeps_serving() {
    let config = VisionConfig {
        max_images_per_request: 3,
        max_image_bytes: 64 << 10,
        ..VisionConfig::default()
    };
    let mut h = start(config).await;
    let photo = fixture_image("photo.jpg");

    let (_, status) = h.encode(request(vec![])).await;
    let status = status.unwrap();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("`images`"), "{status:?}");

    let four = vec![bytes(photo.clone()); 4];
    let (_, status) = h.encode(request(four)).await;
    let status = status.unwrap();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("at most 3"), "{status:?}");

    let (_, status) = h.encode(request(vec![bytes(vec![0; 65 << 10])])).await;
    let status = status.unwrap();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("limit"), "{status:?}");

    let unknown = sha256_hex(b"never sent");
    let (responses, status) = h.encode(request(vec![hash(&unknown)])).await;
    assert!(responses.is_empty());
    let status = status.unwrap();
    assert_eq!(status.code(), Code::NotFound);
    assert!(status.message().contains(&unknown), "{status:?}");
    assert!(status.message().contains("send the bytes"), "{status:?}");

    // A corrupt image in position 1: image 0 streams, then the call ends with the reason.
    let corrupt = b"\x89PNG\r\n\x1a\nthis is not a png".to_vec();
    let images = vec![bytes(photo.clone()), bytes(corrupt), bytes(photo.clone())];
    let (responses, status) = h.encode(request(images)).await;
    assert_eq!(responses.len(), 1);
    assert_eq!(responses[0].index, 0);
    let status = status.unwrap();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().starts_with("`images[1]`: image: "),
        "{status:?}"
    );
    assert!(status.message().len() > "`images[1]`: image: ".len());

    let (_, status) = h
        .encode(EncodeRequest {
            images: vec![bytes(photo.clone())],
            dtype: 42,
        })
        .await;
    assert_eq!(status.unwrap().code(), Code::InvalidArgument);

    // Still serving.
    let (responses, status) = h.encode(request(vec![bytes(photo)])).await;
    assert!(status.is_none(), "{status:?}");
    assert_eq!(responses.len(), 1);
    h.shutdown().await;
}

#[tokio::test]
async fn refuses_calls_beyond_the_concurrency_limit() {
    let config = VisionConfig {
        max_concurrency: 0,
        ..VisionConfig::default()
    };
    let mut h = start(config).await;
    let (_, status) = h
        .encode(request(vec![bytes(fixture_image("photo.jpg"))]))
        .await;
    assert_eq!(status.unwrap().code(), Code::ResourceExhausted);
    assert_eq!(h.tier.images_encoded(), 0);
    h.shutdown().await;
}

#[tokio::test]
async fn a_client_that_leaves_stops_the_encoding() {
    let count = 16;
    let mut h = start(VisionConfig::default()).await;
    let images = variants(count).into_iter().map(bytes).collect();
    let mut stream = h.client.encode(request(images)).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(first.index, 0);
    drop(stream);
    // Let the server notice and settle, then check that it stopped short.
    let mut settled = h.tier.images_encoded();
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = h.tier.images_encoded();
        if now == settled {
            break;
        }
        settled = now;
    }
    assert!(settled < count as u64, "encoded {settled} of {count}");
    // The slot was freed: a new call runs.
    let (responses, status) = h
        .encode(request(vec![bytes(fixture_image("rgba.png"))]))
        .await;
    assert!(status.is_none(), "{status:?}");
    assert_eq!(responses.len(), 1);
    h.shutdown().await;
}

#[tokio::test]
async fn describes_the_checkpoint_and_reports_health() {
    let mut h = start(VisionConfig::default()).await;
    let photo = fixture_image("photo.jpg");
    let _ = h.encode(request(vec![bytes(photo.clone())])).await;
    let _ = h.encode(request(vec![bytes(photo)])).await;
    let info = h
        .client
        .info(VisionInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.checkpoint, "opt-a");
    assert_eq!(info.checkpoint_fingerprint, h.model.fingerprint());
    let config = h.model.config();
    assert_eq!(info.image_size as usize, config.vision_config.image_size);
    assert_eq!(info.num_query_tokens, 8);
    assert_eq!(info.llm_hidden_size, 64);
    assert_eq!(info.dtype, Dtype::F32 as i32);
    assert_eq!(info.images_encoded, 1);
    assert_eq!(info.cache_hits, 1);

    let mut health = HealthClient::new(h.channel.clone());
    for service in ["blip2.v1.VisionService", ""] {
        let response = health
            .check(HealthCheckRequest {
                service: service.to_string(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            response.status,
            ServingStatus::Serving as i32,
            "{service:?}"
        );
    }
    h.shutdown().await;
}
