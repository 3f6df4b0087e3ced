//! [`VisionTier`]: the `blip2.v1.VisionService` implementation.
//!
//! One Encode call runs as two tasks joined by a short channel, so that hashing and decoding the
//! next image overlap with the model encoding the previous one:
//! - the *preparer* walks the images in order: sha256 and decode + preprocess on the blocking
//!   pool, a cache lookup, then the model thread's queue ([`crate::batcher`]);
//! - the *streamer* waits for each image's soft prompt in order and sends it at once.
//!
//! A failed send, or a closed response channel while waiting, means the client left: the
//! streamer returns, the preparer's next send fails, and the images still queued for the model
//! are skipped there.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use blip2_common::soft_prompt::{sha256_hex, wire_dtype};
use blip2_model::model::Blip2Model;
use blip2_proto::v1::vision_service_server::{VisionService, VisionServiceServer};
use blip2_proto::v1::{EncodeRequest, EncodeResponse, SoftPrompt, VisionInfo, VisionInfoRequest};
use candle_core::DType;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status};
use tracing::{Instrument, Span};

use crate::batcher::{to_wire, Batcher, Job, Shared};
use crate::cache::SoftPromptCache;
use crate::error::Error;
use crate::request::{ValidEncodeRequest, ValidImage};
use crate::VisionConfig;

/// Responses buffered between the streamer and the transport.
const RESPONSE_BUFFER: usize = 2;
/// Room for everything but the image bytes in a request message (framing, hashes).
const REQUEST_SLACK: usize = 1 << 20;

/// The vision tier: cheap to clone, every clone serves from the same model, cache and queue.
#[derive(Clone)]
pub struct VisionTier {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    checkpoint: String,
    config: VisionConfig,
    /// One permit per running Encode call.
    admission: Arc<Semaphore>,
    batcher: Batcher,
}

/// One image after the preparer, in request order.
enum Prepared {
    /// Answered from the cache.
    Ready(SoftPrompt),
    /// Queued for the model thread.
    Pending(oneshot::Receiver<Result<SoftPrompt, Error>>),
    /// The same image as an earlier one of this request (by hash).
    Repeat(String),
}

impl VisionTier {
    /// Starts the model thread; `checkpoint` is what Info reports as the checkpoint's name.
    pub fn new(model: Arc<Blip2Model>, checkpoint: String, config: VisionConfig) -> Self {
        let shared = Arc::new(Shared {
            model,
            cache: SoftPromptCache::new(config.cache_bytes),
            images_encoded: Default::default(),
            batches: Default::default(),
            cache_hits: Default::default(),
        });
        // Each running call has at most `lookahead() + 1` images queued.
        let queue = config.max_concurrency.max(1) * (lookahead(&config) + 1);
        let batcher = Batcher::spawn(
            shared.clone(),
            config.max_batch_size,
            config.batch_window,
            queue,
        );
        let admission = Arc::new(Semaphore::new(config.max_concurrency));
        Self {
            inner: Arc::new(Inner {
                shared,
                checkpoint,
                config,
                admission,
                batcher,
            }),
        }
    }

    /// Images run through the model since start (cache misses).
    pub fn images_encoded(&self) -> u64 {
        self.inner.shared.images_encoded.load(Ordering::Relaxed)
    }

    /// Images answered without running the model since start.
    pub fn cache_hits(&self) -> u64 {
        self.inner.shared.cache_hits.load(Ordering::Relaxed)
    }

    /// The gRPC service, with message limits that fit a full request of the largest images and
    /// one f32 soft prompt per response.
    pub fn into_server(self) -> VisionServiceServer<VisionTier> {
        let config = &self.inner.config;
        let max_request = config
            .max_images_per_request
            .saturating_mul(config.max_image_bytes)
            .saturating_add(REQUEST_SLACK);
        let model = self.model().config();
        let max_response = model
            .num_query_tokens
            .saturating_mul(model.text_config.hidden_size())
            .saturating_mul(DType::F32.size_in_bytes())
            .saturating_add(64 << 10);
        VisionServiceServer::new(self)
            .max_decoding_message_size(max_request)
            .max_encoding_message_size(max_response)
    }

    fn model(&self) -> &Arc<Blip2Model> {
        &self.inner.shared.model
    }

    /// The limits this tier runs with.
    pub fn config(&self) -> &VisionConfig {
        &self.inner.config
    }

    /// What the tier's metrics endpoint reads (while the tier lives).
    pub fn metrics(&self) -> std::sync::Weak<dyn blip2_common::metrics::Collect> {
        let inner: std::sync::Weak<Inner> = Arc::downgrade(&self.inner);
        inner
    }
}

impl blip2_common::metrics::Collect for Inner {
    fn collect(&self, out: &mut blip2_common::metrics::Samples) {
        let tier = || vec![("tier", "vision".to_string())];
        let shared = &self.shared;
        out.counter(
            "blip2_vision_cache_hits_total",
            "Images answered without running the model (soft-prompt cache, or repeated in a call).",
            tier(),
            shared.cache_hits.load(Ordering::Relaxed) as f64,
        );
        out.counter(
            "blip2_vision_cache_misses_total",
            "Images run through the vision model.",
            tier(),
            shared.images_encoded.load(Ordering::Relaxed) as f64,
        );
        out.counter(
            "blip2_vision_batches_total",
            "Forward passes of the vision model (each over a batch of images).",
            tier(),
            shared.batches.load(Ordering::Relaxed) as f64,
        );
        let active = self
            .config
            .max_concurrency
            .saturating_sub(self.admission.available_permits());
        out.gauge(
            "blip2_vision_active_calls",
            "Encode calls running now.",
            tier(),
            active as f64,
        );
    }
}

/// How many images one call may prepare ahead of the one being streamed.
fn lookahead(config: &VisionConfig) -> usize {
    config.max_batch_size.max(1)
}

#[tonic::async_trait]
impl VisionService for VisionTier {
    type EncodeStream = ReceiverStream<Result<EncodeResponse, Status>>;

    async fn encode(
        &self,
        request: Request<EncodeRequest>,
    ) -> Result<Response<Self::EncodeStream>, Status> {
        let default_dtype = self.model().dtype().dtype();
        let config = &self.inner.config;
        let deadline = blip2_common::deadline::deadline(&request);
        let request = ValidEncodeRequest::parse(request.into_inner(), config, default_dtype)
            .map_err(refuse)?;
        let permit = self
            .inner
            .admission
            .clone()
            .try_acquire_owned()
            .map_err(|_| {
                refuse(Error::Overloaded {
                    running: config.max_concurrency,
                })
            })?;
        let span = tracing::info_span!(
            "encode",
            images = request.images.len(),
            dtype = request.dtype.as_str()
        );
        let permit = Arc::new(permit);
        let (prepared_tx, prepared_rx) = mpsc::channel(lookahead(config));
        let (response_tx, response_rx) = mpsc::channel(RESPONSE_BUFFER);
        tokio::spawn(
            prepare_all(self.inner.clone(), request, prepared_tx, permit.clone())
                .instrument(span.clone()),
        );
        tokio::spawn(stream_all(prepared_rx, response_tx, permit, deadline).instrument(span));
        Ok(Response::new(ReceiverStream::new(response_rx)))
    }

    async fn info(
        &self,
        _request: Request<VisionInfoRequest>,
    ) -> Result<Response<VisionInfo>, Status> {
        let model = self.model();
        let config = model.config();
        Ok(Response::new(VisionInfo {
            checkpoint: self.inner.checkpoint.clone(),
            checkpoint_fingerprint: model.fingerprint().to_string(),
            image_size: config.vision_config.image_size as u32,
            num_query_tokens: config.num_query_tokens as u32,
            llm_hidden_size: config.text_config.hidden_size() as u32,
            dtype: wire_dtype(model.dtype().dtype()) as i32,
            images_encoded: self.images_encoded(),
            cache_hits: self.cache_hits(),
        }))
    }
}

/// The preparer: one item per image, in order, until the first error.
async fn prepare_all(
    inner: Arc<Inner>,
    request: ValidEncodeRequest,
    out: mpsc::Sender<Result<Prepared, Error>>,
    _permit: Arc<OwnedSemaphorePermit>,
) {
    let mut seen = HashSet::new();
    for (index, image) in request.images.into_iter().enumerate() {
        let prepared = prepare(&inner, image, request.dtype, &mut seen)
            .await
            .map_err(|error| error.at_image(index));
        let failed = prepared.is_err();
        if out.send(prepared).await.is_err() || failed {
            return;
        }
    }
}

async fn prepare(
    inner: &Inner,
    image: ValidImage,
    dtype: DType,
    seen: &mut HashSet<String>,
) -> Result<Prepared, Error> {
    let shared = &inner.shared;
    let (sha256, data) = match image {
        ValidImage::Cached(sha256) => (sha256, None),
        ValidImage::Bytes(data) => {
            let (sha256, data) = blocking(move || (sha256_hex(&data), data)).await?;
            (sha256, Some(data))
        }
    };
    if !seen.insert(sha256.clone()) {
        shared.cache_hits.fetch_add(1, Ordering::Relaxed);
        return Ok(Prepared::Repeat(sha256));
    }
    if let Some(soft_prompt) = shared.cache.get(&sha256) {
        shared.cache_hits.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(sha256, "cache hit");
        let model = shared.model.clone();
        let wire =
            blocking(move || to_wire(&soft_prompt, dtype, &sha256, model.fingerprint())).await??;
        return Ok(Prepared::Ready(wire));
    }
    let Some(data) = data else {
        return Err(Error::NotCached { sha256 });
    };
    let model = shared.model.clone();
    let pixel_values = blocking(move || model.preprocess(&data))
        .instrument(tracing::info_span!("preprocess"))
        .await??;
    let (reply, receiver) = oneshot::channel();
    inner
        .batcher
        .submit(Job {
            sha256,
            pixel_values,
            dtype,
            span: Span::current(),
            queue: tracing::info_span!("queue"),
            reply,
        })
        .await?;
    Ok(Prepared::Pending(receiver))
}

/// The streamer: each image's response as soon as it is ready, then the end of the stream or
/// the first error; DEADLINE_EXCEEDED when the client's deadline passes first (tonic's server
/// timeout ends with the response headers), which also stops the preparer.
async fn stream_all(
    prepared: mpsc::Receiver<Result<Prepared, Error>>,
    out: mpsc::Sender<Result<EncodeResponse, Status>>,
    _permit: Arc<OwnedSemaphorePermit>,
    deadline: Option<tokio::time::Instant>,
) {
    tokio::select! {
        () = stream_each(prepared, &out) => {}
        () = blip2_common::deadline::expired(deadline) => {
            fail(&out, Error::DeadlineExceeded).await;
        }
    }
}

async fn stream_each(
    mut prepared: mpsc::Receiver<Result<Prepared, Error>>,
    out: &mpsc::Sender<Result<EncodeResponse, Status>>,
) {
    // This call's soft prompts by hash, for images that repeat an earlier one.
    let mut earlier: HashMap<String, SoftPrompt> = HashMap::new();
    let mut index = 0u32;
    while let Some(item) = prepared.recv().await {
        let (soft_prompt, cached) = match item {
            Ok(Prepared::Ready(soft_prompt)) => (soft_prompt, true),
            Ok(Prepared::Pending(reply)) => {
                let outcome = tokio::select! {
                    outcome = reply => outcome,
                    () = out.closed() => return client_left(),
                };
                match outcome {
                    Ok(Ok(soft_prompt)) => (soft_prompt, false),
                    Ok(Err(error)) => return fail(out, error.at_image(index as usize)).await,
                    Err(_) => return fail(out, Error::ModelThreadStopped).await,
                }
            }
            Ok(Prepared::Repeat(sha256)) => match earlier.get(&sha256) {
                Some(soft_prompt) => (soft_prompt.clone(), true),
                None => return fail(out, Error::RepeatLost.at_image(index as usize)).await,
            },
            Err(error) => return fail(out, error).await,
        };
        earlier.insert(soft_prompt.image_sha256.clone(), soft_prompt.clone());
        let response = EncodeResponse {
            index,
            soft_prompt: Some(soft_prompt),
            cached,
        };
        if out.send(Ok(response)).await.is_err() {
            return client_left();
        }
        tracing::debug!(index, cached, "soft prompt sent");
        index += 1;
    }
}

fn client_left() {
    tracing::debug!("client left; the remaining images are not encoded");
}

/// Ends the stream with `error`.
async fn fail(out: &mpsc::Sender<Result<EncodeResponse, Status>>, error: Error) {
    // Nobody to tell if the client left already.
    let _ = out.send(Err(refuse(error))).await;
}

/// The status for `error`, logged once, here at the edge: the server's failures as errors, the
/// client's as debug lines.
fn refuse(error: Error) -> Status {
    let error_type = error.error_type();
    let status = Status::from(error);
    match status.code() {
        Code::Internal | Code::Unavailable | Code::FailedPrecondition => {
            tracing::error!(error_type, message = status.message(), "encode failed")
        }
        _ => tracing::debug!(error_type, message = status.message(), "encode refused"),
    }
    status
}

/// Runs CPU work on the blocking pool, inside the caller's span.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Error> {
    let span = Span::current();
    Ok(tokio::task::spawn_blocking(move || span.in_scope(work)).await?)
}
