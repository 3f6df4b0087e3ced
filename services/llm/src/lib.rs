//! # blip2-llm
//!
//! The LLM tier of the BLIP-2 backend: `Generate` takes a prompt as text segments and image
//! placeholders, then one soft prompt per placeholder (from the vision tier, possibly via the
//! session tier), and streams the generated tokens back; `Info` describes the checkpoint.
//!
//! A scheduler thread owns the language model and runs continuous batching: every step is one
//! ragged forward over all running sequences (decode steps and chunks of newcomers' prompts),
//! so a request joins at the next step and leaves as soon as it ends; a prefix cache keeps the
//! KV of earlier prompts so a conversation's next turn computes only its new positions.
//! Admission is a semaphore over calls in flight (running + waiting, RESOURCE_EXHAUSTED beyond);
//! the scheduler runs at most `max_concurrency` sequences at once (a beam search takes
//! `num_beams`) and the rest wait in order.
//!
//! # Layout
//! - [`prompt`]: segments -> the prompt text to tokenise ([`prompt_text`]) and placeholders.
//! - [`params`]: proto parameters -> validated decoding parameters ([`generation_params`]).
//! - `setup`: the first phase of a call: `setup` and the soft prompts, checked.
//! - `scheduler`: the continuous-batching thread; `prefix`: the prefix cache.
//! - `messages`: the scheduler's events as response messages.
//! - `service`: the `LlmService` implementation, admission, cancellation.
//! - [`error`]: the tier's error type and its mapping to `tonic::Status`.

pub mod error;
mod messages;
mod metrics;
pub mod params;
mod prefix;
pub mod prompt;
mod scheduler;
mod service;
mod setup;

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use blip2_model::model::Blip2Model;
use blip2_proto::v1::llm_service_server::LlmServiceServer;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

pub use error::Error;
pub use params::generation_params;
pub use prompt::prompt_text;
use scheduler::{Scheduler, SchedulerConfig};
pub use setup::check_setup;

/// Limits of an LLM tier.
#[derive(Debug, Clone)]
pub struct LlmConfig {
    /// Sequences in the running batch (at least 1; a beam search takes `num_beams`).
    pub max_concurrency: usize,
    /// Calls waiting (receiving their input or waiting for a running slot); beyond them a call
    /// is refused with RESOURCE_EXHAUSTED at once.
    pub max_queue: usize,
    /// Prompt positions read per batched step (chunked prefill): bounds how long one newcomer's
    /// prompt holds up the running streams.
    pub prefill_chunk: usize,
    /// Bytes of prompt KV kept for reuse by later prompts with the same beginning (0: off).
    pub prefix_cache_bytes: usize,
    /// Largest `max_new_tokens` a request may ask for.
    pub max_new_tokens_limit: usize,
    /// Time for a call to send `setup` and all its soft prompts (DEADLINE_EXCEEDED beyond).
    pub setup_timeout: Duration,
    /// After SIGTERM, how long running generations may go on before they are cut.
    pub shutdown_grace: Duration,
    /// Shortest time one batched step takes (default zero: as fast as the model runs). Only
    /// for tests and demos that need streams longer than a tiny checkpoint makes (deadlines,
    /// faults, shutdown while streaming); it slows every stream of the tier.
    pub min_step_time: Duration,
}

impl Default for LlmConfig {
    fn default() -> Self {
        LlmConfig {
            max_concurrency: 16,
            max_queue: 64,
            prefill_chunk: 128,
            prefix_cache_bytes: 1 << 30,
            max_new_tokens_limit: 512,
            setup_timeout: Duration::from_secs(30),
            shutdown_grace: blip2_common::server::DEFAULT_SHUTDOWN_GRACE,
            min_step_time: Duration::ZERO,
        }
    }
}

/// Largest message a client may send besides soft prompts (the setup's prompt text).
const MAX_SETUP_MESSAGE_BYTES: usize = 4 << 20;
/// Room in a soft prompt message for its hash, fingerprint and framing.
const SOFT_PROMPT_OVERHEAD_BYTES: usize = 64 << 10;

/// The LLM tier: a cloneable handle on one loaded checkpoint and its admission state.
#[derive(Clone)]
pub struct LlmTier {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub model: Arc<Blip2Model>,
    pub checkpoint: String,
    pub config: LlmConfig,
    /// Calls in flight: running + waiting.
    pub admission: Arc<Semaphore>,
    pub scheduler: Scheduler,
}

impl LlmTier {
    /// A tier serving `model` (which must include its language model), named `checkpoint` in
    /// `Info`.
    ///
    /// Fails only when the scheduler thread cannot be spawned.
    pub fn new(
        model: Arc<Blip2Model>,
        checkpoint: String,
        config: LlmConfig,
    ) -> std::io::Result<Self> {
        let config = LlmConfig {
            max_concurrency: config.max_concurrency.max(1),
            prefill_chunk: config.prefill_chunk.max(1),
            ..config
        };
        let in_flight = config.max_concurrency.saturating_add(config.max_queue);
        let scheduler = Scheduler::start(
            model.clone(),
            SchedulerConfig {
                max_sequences: config.max_concurrency,
                prefill_chunk: config.prefill_chunk,
                prefix_cache_bytes: config.prefix_cache_bytes,
                min_step_time: config.min_step_time,
            },
        )?;
        let inner = Inner {
            model,
            checkpoint,
            admission: Arc::new(Semaphore::new(in_flight.min(Semaphore::MAX_PERMITS))),
            config,
            scheduler,
        };
        Ok(LlmTier {
            inner: Arc::new(inner),
        })
    }

    /// Generations in the running batch now.
    pub fn running(&self) -> u32 {
        self.inner.scheduler.stats.running.load(Ordering::SeqCst)
    }

    /// The most rows (decoding sequences + prompt chunks) one batched step has run since start.
    pub fn largest_step(&self) -> u32 {
        self.inner
            .scheduler
            .stats
            .largest_step
            .load(Ordering::SeqCst)
    }

    /// Generations finished since start, for any reason (cancelled and failed ones included).
    pub fn completed(&self) -> u64 {
        self.inner.scheduler.stats.completed.load(Ordering::SeqCst)
    }

    /// What the tier's metrics endpoint reads (while the tier lives).
    pub fn metrics(&self) -> std::sync::Weak<dyn blip2_common::metrics::Collect> {
        let inner: std::sync::Weak<Inner> = Arc::downgrade(&self.inner);
        inner
    }

    /// The gRPC service, accepting messages as large as one f32 soft prompt of this checkpoint.
    pub fn into_server(self) -> LlmServiceServer<LlmTier> {
        let config = self.inner.model.config();
        let soft_prompt_bytes =
            config.num_query_tokens * config.text_config.hidden_size() * std::mem::size_of::<f32>()
                + SOFT_PROMPT_OVERHEAD_BYTES;
        LlmServiceServer::new(self)
            .max_decoding_message_size(soft_prompt_bytes.max(MAX_SETUP_MESSAGE_BYTES))
            .max_encoding_message_size(MAX_SETUP_MESSAGE_BYTES)
    }
}

/// Serves the tier (+ grpc.health.v1, SERVING for "blip2.v1.LlmService" and "", and
/// reflection) on `listener` until `shutdown` resolves; then shuts down gracefully
/// ([`blip2_common::server::serve_gracefully`], `LlmConfig::shutdown_grace`).
pub async fn serve(
    tier: LlmTier,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    serve_with(tier, listener, shutdown, None).await
}

/// [`serve`] with TLS (and mutual TLS when the configuration names a client CA).
pub async fn serve_with(
    tier: LlmTier,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    tls: Option<tonic::transport::ServerTlsConfig>,
) -> Result<(), tonic::transport::Error> {
    // Shutdown: NOT_SERVING and new calls refused, running generations get the grace period,
    // then are cut (which cancels their sequences).
    blip2_common::metrics::registry().register(tier.metrics());
    let grace = tier.inner.config.shutdown_grace;
    blip2_common::server::serve_tier(
        "llm",
        <LlmServiceServer<LlmTier> as tonic::server::NamedService>::NAME,
        |routes| routes.add_service(tier.into_server()),
        listener,
        shutdown,
        tls,
        grace,
    )
    .await
}
