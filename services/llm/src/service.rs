//! `blip2.v1.LlmService`: admission, the two phases of a Generate call (input, then
//! generation), cancellation, and Info.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use blip2_common::deadline::expired;
use blip2_common::soft_prompt::wire_dtype;
use blip2_proto::v1::llm_service_server::LlmService;
use blip2_proto::v1::{GenerateInput, GenerateOutput, LlmInfo, LlmInfoRequest};
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::error::Error;
use crate::messages::{finish_message, token_message};
use crate::scheduler::{Event, Job};
use crate::setup::{self, language_model};
use crate::{Inner, LlmTier};

/// Tokens buffered per call before its forwarding task waits for the client (the scheduler
/// never waits: it sends on an unbounded channel).
const OUTPUT_BUFFER: usize = 32;

/// The response channel of one Generate call.
type Output = mpsc::Sender<Result<GenerateOutput, Status>>;

fn saturating_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[tonic::async_trait]
impl LlmService for LlmTier {
    type GenerateStream = ReceiverStream<Result<GenerateOutput, Status>>;

    async fn generate(
        &self,
        request: Request<Streaming<GenerateInput>>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let tier = &self.inner;
        let Ok(admission) = tier.admission.clone().try_acquire_owned() else {
            let error = Error::Overloaded {
                running: tier.config.max_concurrency,
                queued: tier.config.max_queue,
            };
            tracing::warn!(error_type = error.error_type(), %error, "generate refused");
            return Err(error.into());
        };
        let (output, receiver) = mpsc::channel(OUTPUT_BUFFER);
        let deadline = blip2_common::deadline::deadline(&request);
        let inbound = request.into_inner();
        let call = drive(tier.clone(), inbound, output, admission, deadline);
        tokio::spawn(call.instrument(tracing::info_span!("generate")));
        // The response starts at once: errors of the input phase arrive as the stream's status,
        // so a client may send its input before or after it sees the response headers.
        Ok(Response::new(ReceiverStream::new(receiver)))
    }

    async fn info(&self, _request: Request<LlmInfoRequest>) -> Result<Response<LlmInfo>, Status> {
        let model = &self.inner.model;
        let lm = language_model(model)?;
        let config = model.config();
        let prefix = self.inner.scheduler.stats.prefix();
        Ok(Response::new(LlmInfo {
            checkpoint: self.inner.checkpoint.clone(),
            checkpoint_fingerprint: model.fingerprint().to_string(),
            model_type: config.text_config.model_type().to_string(),
            hidden_size: saturating_u32(config.text_config.hidden_size()),
            num_query_tokens: saturating_u32(config.num_query_tokens),
            max_positions: saturating_u32(lm.info().max_positions),
            dtype: wire_dtype(model.llm_dtype()) as i32,
            running: self.running(),
            completed: self.completed(),
            queued: self.inner.scheduler.stats.queued.load(Ordering::Relaxed),
            running_sequences: self
                .inner
                .scheduler
                .stats
                .running_sequences
                .load(Ordering::Relaxed),
            prefix_cache_hits: prefix.hits,
            prefix_cache_misses: prefix.misses,
            prefix_cache_tokens: prefix.tokens,
            prefix_cache_bytes: prefix.bytes,
        }))
    }
}

/// One Generate call after admission; errors end the response stream, logged here once.
async fn drive(
    tier: Arc<Inner>,
    inbound: Streaming<GenerateInput>,
    output: Output,
    _admission: OwnedSemaphorePermit,
    deadline: Option<Instant>,
) {
    if let Err(error) = run_call(tier, inbound, &output, deadline).await {
        match &error {
            Error::Transport(status) => tracing::debug!(%status, "client input failed"),
            Error::DeadlineExceeded { .. } => tracing::debug!(%error, "generate stopped"),
            Error::Model(_) | Error::Worker(_) | Error::NoLanguageModel => {
                tracing::error!(error_type = error.error_type(), %error, "generate failed")
            }
            _ => tracing::info!(error_type = error.error_type(), %error, "generate refused"),
        }
        // The client may be gone already; then there is nobody to tell.
        let _ = output.send(Err(error.into())).await;
    }
}

async fn run_call(
    tier: Arc<Inner>,
    mut inbound: Streaming<GenerateInput>,
    output: &Output,
    deadline: Option<Instant>,
) -> Result<(), Error> {
    let started = Instant::now();
    let past_deadline = || Error::DeadlineExceeded {
        elapsed_ms: started.elapsed().as_millis(),
    };
    let mut clock = crate::metrics::TokenClock::start();
    let timeout = tier.config.setup_timeout;
    let receive = setup::receive(&mut inbound, &tier.model, tier.config.max_new_tokens_limit);
    // The client's deadline bounds the setup too; whichever passes first names the error.
    let request = tokio::select! {
        received = tokio::time::timeout(timeout, receive) => received.map_err(|_| {
            Error::SetupTimeout {
                seconds: timeout.as_secs_f64(),
            }
        })??,
        () = expired(deadline) => return Err(past_deadline()),
    };

    let cancel = Arc::new(AtomicBool::new(false));
    let logprobs = request.logprobs;
    let (events, mut receiver) = mpsc::unbounded_channel();
    tier.scheduler.submit(Job {
        request,
        events,
        cancel: cancel.clone(),
        span: tracing::Span::current(),
        queue: tracing::info_span!("queue"),
    })?;

    // While the model runs, the input must stay silent: a further message breaks the protocol,
    // a failed input means the client is gone. Either cancels the generation at its next step,
    // as does a client that stops reading the response.
    let mut inbound_open = true;
    loop {
        tokio::select! {
            event = receiver.recv() => match event {
                Some(Event::Token(token)) => {
                    clock.token();
                    if output.send(Ok(token_message(token, logprobs))).await.is_err() {
                        cancel.store(true, Ordering::Relaxed);
                        return Ok(());
                    }
                }
                Some(Event::Finished { output: generation, cached_prompt_tokens }) => {
                    crate::metrics::finished(&generation);
                    if let Some(finish) = finish_message(&generation, cached_prompt_tokens) {
                        let _ = output.send(Ok(finish)).await;
                    }
                    return Ok(());
                }
                Some(Event::Failed(error)) => return Err(error),
                None => return Err(Error::Worker("the scheduler dropped the request".into())),
            },
            message = inbound.next(), if inbound_open => {
                inbound_open = false;
                match message {
                    None => {}
                    Some(Ok(_)) => {
                        cancel.store(true, Ordering::Relaxed);
                        return Err(Error::invalid(
                            "the input continued after `setup` and one soft prompt per image \
                             placeholder: too many soft prompts, or a second `setup`",
                        ));
                    }
                    Some(Err(status)) => {
                        tracing::debug!(%status, "client input failed; cancelling");
                        cancel.store(true, Ordering::Relaxed);
                        return Ok(());
                    }
                }
            }
            () = output.closed() => {
                tracing::debug!("client left; cancelling");
                cancel.store(true, Ordering::Relaxed);
                return Ok(());
            }
            // tonic's server timeout ends with the response headers: the stream keeps its own.
            () = expired(deadline) => {
                cancel.store(true, Ordering::Relaxed);
                return Err(past_deadline());
            }
        }
    }
}
