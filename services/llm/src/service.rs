//! `blip2.v1.LlmService`: admission, the two phases of a Generate call (input, then
//! generation), cancellation, and Info.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use blip2_common::soft_prompt::wire_dtype;
use blip2_proto::v1::llm_service_server::LlmService;
use blip2_proto::v1::{GenerateInput, GenerateOutput, LlmInfo, LlmInfoRequest};
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::error::Error;
use crate::setup::{self, language_model};
use crate::worker::{self, Output, TokenSink};
use crate::{Inner, LlmTier};

/// Tokens buffered per call before the generation waits for the client.
const OUTPUT_BUFFER: usize = 32;

/// A running generation: counted while it lives, holding its slot.
struct Running {
    tier: Arc<Inner>,
    _slot: OwnedSemaphorePermit,
}

impl Running {
    fn start(tier: Arc<Inner>, slot: OwnedSemaphorePermit) -> Self {
        tier.running.fetch_add(1, Ordering::Relaxed);
        Running { tier, _slot: slot }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // Completed first: whoever sees `running` drop sees the generation counted.
        self.tier.completed.fetch_add(1, Ordering::SeqCst);
        self.tier.running.fetch_sub(1, Ordering::SeqCst);
    }
}

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
        let inbound = request.into_inner();
        let call = drive(tier.clone(), inbound, output, admission);
        tokio::spawn(call.instrument(tracing::info_span!("generate")));
        // The response starts at once: errors of the input phase arrive as the stream's status,
        // so a client may send its input before or after it sees the response headers.
        Ok(Response::new(ReceiverStream::new(receiver)))
    }

    async fn info(&self, _request: Request<LlmInfoRequest>) -> Result<Response<LlmInfo>, Status> {
        let model = &self.inner.model;
        let lm = language_model(model)?;
        let config = model.config();
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
        }))
    }
}

/// One Generate call after admission; errors end the response stream, logged here once.
async fn drive(
    tier: Arc<Inner>,
    inbound: Streaming<GenerateInput>,
    output: Output,
    _admission: OwnedSemaphorePermit,
) {
    if let Err(error) = run_call(tier, inbound, &output).await {
        match &error {
            Error::Transport(status) => tracing::debug!(%status, "client input failed"),
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
) -> Result<(), Error> {
    let timeout = tier.config.setup_timeout;
    let receive = setup::receive(&mut inbound, &tier.model, tier.config.max_new_tokens_limit);
    let request =
        tokio::time::timeout(timeout, receive)
            .await
            .map_err(|_| Error::SetupTimeout {
                seconds: timeout.as_secs_f64(),
            })??;

    let slot = tokio::select! {
        slot = tier.slots.clone().acquire_owned() => {
            slot.map_err(|_| Error::Worker("the running slots were closed".into()))?
        }
        () = output.closed() => {
            tracing::debug!("client left while waiting for a running slot");
            return Ok(());
        }
    };
    let cancel = Arc::new(AtomicBool::new(false));
    let sink = TokenSink {
        output: output.clone(),
        cancel: cancel.clone(),
        logprobs: request.logprobs,
    };
    let running = Running::start(tier.clone(), slot);
    let model = tier.model.clone();
    let span = tracing::Span::current();
    let mut job = tokio::task::spawn_blocking(move || {
        let _span = span.enter();
        // Dropped when generation stops: the count, the slot and the KV cache go together.
        let _running = running;
        worker::run(&model, &request, &sink)
    });

    // While the model runs, the input must stay silent: a further message breaks the protocol,
    // a failed input means the client is gone. Either cancels the generation at its next token.
    let mut inbound_open = true;
    let mut protocol_error = None;
    let joined = loop {
        tokio::select! {
            joined = &mut job => break joined,
            message = inbound.next(), if inbound_open => {
                inbound_open = false;
                match message {
                    None => {}
                    Some(Ok(_)) => {
                        cancel.store(true, Ordering::Relaxed);
                        protocol_error = Some(Error::invalid(
                            "the input continued after `setup` and one soft prompt per image \
                             placeholder: too many soft prompts, or a second `setup`",
                        ));
                    }
                    Some(Err(status)) => {
                        tracing::debug!(%status, "client input failed; cancelling");
                        cancel.store(true, Ordering::Relaxed);
                    }
                }
            }
        }
    };
    if let Some(error) = protocol_error {
        return Err(error);
    }
    let generation = joined.map_err(|e| Error::Worker(e.to_string()))??;
    tracing::debug!(
        reason = generation.finish_reason.as_str(),
        prompt_tokens = generation.prompt_tokens,
        generated_tokens = generation.token_ids.len(),
        "generation ended"
    );
    if let Some(finish) = worker::finish_message(&generation) {
        let _ = output.send(Ok(finish)).await;
    }
    Ok(())
}
