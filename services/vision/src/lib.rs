//! # blip2-vision
//!
//! The vision tier: `blip2.v1.VisionService`. Image bytes in, one soft visual prompt
//! `[num_query_tokens, llm_hidden]` per image out, streamed in request order as each is ready.
//! Soft prompts are cached by the image's sha256, so a client may later send the hash alone.
//!
//! # Layout
//! - [`service`]: [`VisionTier`], the gRPC service: validation, admission, the per-call pipeline.
//! - [`batcher`]: the model's own thread, running queued images in micro-batches.
//! - [`cache`]: the byte-bounded LRU soft-prompt cache.
//! - [`request`]: `EncodeRequest` checked into a validated type.
//! - [`retrieval`], [`retrieval_index`]: `blip2.v1.RetrievalService` (image-text retrieval on a
//!   `Blip2ForImageTextRetrieval` checkpoint) and its index.
//! - [`error`]: the crate's error type and its mapping to gRPC statuses.
//! - [`serve`]: the tier with health and reflection on a listener, until shutdown.

pub mod batcher;
pub mod cache;
pub mod error;
pub mod request;
pub mod retrieval;
pub mod retrieval_index;
pub mod service;

use std::future::Future;

use blip2_proto::v1::vision_service_server::VisionServiceServer;

pub use error::Error;
pub use service::VisionTier;

/// Limits and sizes of a vision tier.
#[derive(Debug, Clone)]
pub struct VisionConfig {
    /// Budget of the soft-prompt cache in bytes (tensor data, in the model dtype).
    pub cache_bytes: usize,
    /// Encode calls running at once; one more is refused with RESOURCE_EXHAUSTED at once (0
    /// refuses every call).
    pub max_concurrency: usize,
    /// Images in one Encode call.
    pub max_images_per_request: usize,
    /// Encoded size of one image in bytes.
    pub max_image_bytes: usize,
    /// Images run through the model in one forward pass, at most. Also how far one call
    /// prepares ahead.
    pub max_batch_size: usize,
    /// How long the model thread waits after a first image for more to share its forward.
    pub batch_window: std::time::Duration,
    /// After SIGTERM, how long running Encode calls may go on before they are cut.
    pub shutdown_grace: std::time::Duration,
}

impl Default for VisionConfig {
    fn default() -> Self {
        Self {
            cache_bytes: 256 << 20,
            max_concurrency: 4,
            max_images_per_request: 16,
            max_image_bytes: 20 << 20,
            max_batch_size: 8,
            batch_window: std::time::Duration::from_millis(2),
            shutdown_grace: blip2_common::server::DEFAULT_SHUTDOWN_GRACE,
        }
    }
}

/// Serves VisionService, grpc.health.v1 and reflection on `listener` until `shutdown` resolves,
/// then finishes the calls in flight (for up to `VisionConfig::shutdown_grace`, then cuts them;
/// see [`blip2_common::server::serve_gracefully`]). Health of `blip2.v1.VisionService` and of
/// the server ("") is SERVING while serving and NOT_SERVING from the moment shutdown starts.
pub async fn serve(
    tier: VisionTier,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    serve_with(tier, listener, shutdown, None).await
}

/// [`serve`] with TLS (and mutual TLS when the configuration names a client CA).
pub async fn serve_with(
    tier: VisionTier,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    tls: Option<tonic::transport::ServerTlsConfig>,
) -> Result<(), tonic::transport::Error> {
    blip2_common::metrics::registry().register(tier.metrics());
    let grace = tier.config().shutdown_grace;
    blip2_common::server::serve_tier(
        "vision",
        <VisionServiceServer<VisionTier> as tonic::server::NamedService>::NAME,
        |routes| routes.add_service(tier.into_server()),
        listener,
        shutdown,
        tls,
        grace,
    )
    .await
}
