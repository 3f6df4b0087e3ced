//! Generation off the async threads: one blocking-pool task per running request streams its
//! tokens into the response channel and stops at the next token once the client has left.

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use blip2_model::generation::{self, FinishReason, GenerationOutput, TokenEvent};
use blip2_model::model::Blip2Model;
use blip2_proto::v1::{self, generate_output, GenerateOutput};
use tokio::sync::mpsc;
use tonic::Status;

use crate::error::Error;
use crate::setup::{language_model, ValidRequest};

/// The response channel of one Generate call.
pub(crate) type Output = mpsc::Sender<Result<GenerateOutput, Status>>;

/// Where a generation's tokens go: the response channel, unless the request was cancelled.
pub(crate) struct TokenSink {
    pub output: Output,
    /// Set by the call's driver when the client broke the protocol or its input failed.
    pub cancel: Arc<AtomicBool>,
    pub logprobs: bool,
}

impl TokenSink {
    /// Sends one token (waiting while the channel is full); `Break` once nobody listens, so
    /// generation stops within one step and its KV cache is freed.
    pub fn send(&self, event: &TokenEvent) -> ControlFlow<()> {
        if self.cancel.load(Ordering::Relaxed) {
            return ControlFlow::Break(());
        }
        let token = v1::Token {
            id: event.id,
            text: event.text_piece.clone(),
            logprob: self.logprobs.then_some(event.logprob),
        };
        let message = GenerateOutput {
            kind: Some(generate_output::Kind::Token(token)),
        };
        match self.output.blocking_send(Ok(message)) {
            Ok(()) => ControlFlow::Continue(()),
            Err(_) => ControlFlow::Break(()),
        }
    }
}

/// Runs one request to the end on the calling (blocking) thread.
pub(crate) fn run(
    model: &Blip2Model,
    request: &ValidRequest,
    sink: &TokenSink,
) -> Result<GenerationOutput, Error> {
    let lm = language_model(model)?;
    let embeds = model.prompt_embeds(&request.prompt, &request.soft_prompts)?;
    let context = model.penalty_context(&request.prompt);
    let tokenizer = model.prompt_tokenizer().tokenizer();
    let output = generation::generate(
        lm.as_ref(),
        &embeds,
        &context,
        &request.params,
        Some(tokenizer),
        &mut |event| sink.send(event),
    )?;
    Ok(output)
}

/// The closing message of a generation; `None` when it was cancelled (nobody to tell).
pub(crate) fn finish_message(output: &GenerationOutput) -> Option<GenerateOutput> {
    let reason = match output.finish_reason {
        FinishReason::Length => v1::FinishReason::Length,
        FinishReason::Eos => v1::FinishReason::Eos,
        FinishReason::StopSequence => v1::FinishReason::StopSequence,
        FinishReason::Cancelled => return None,
    };
    let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    let finish = v1::Finish {
        reason: reason as i32,
        usage: Some(v1::Usage {
            prompt_tokens: count(output.prompt_tokens),
            generated_tokens: count(output.token_ids.len()),
        }),
        text: output.text.clone(),
    };
    Some(GenerateOutput {
        kind: Some(generate_output::Kind::Finish(finish)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> TokenEvent {
        TokenEvent {
            id: 7,
            text_piece: "a".into(),
            logprob: -0.5,
        }
    }

    #[test]
    fn sink_streams_tokens_and_breaks_once_the_client_left() {
        let (output, mut rx) = mpsc::channel(4);
        let cancel = Arc::new(AtomicBool::new(false));
        let sink = TokenSink {
            output,
            cancel: cancel.clone(),
            logprobs: true,
        };
        assert!(sink.send(&event()).is_continue());
        let Some(Ok(GenerateOutput {
            kind: Some(generate_output::Kind::Token(token)),
        })) = rx.blocking_recv()
        else {
            panic!("expected a token");
        };
        assert_eq!((token.id, token.text.as_str()), (7, "a"));
        assert_eq!(token.logprob, Some(-0.5));

        cancel.store(true, Ordering::Relaxed);
        assert!(sink.send(&event()).is_break());
        cancel.store(false, Ordering::Relaxed);
        drop(rx);
        assert!(sink.send(&event()).is_break());
    }

    #[test]
    fn logprobs_only_when_asked() {
        let (output, mut rx) = mpsc::channel(1);
        let sink = TokenSink {
            output,
            cancel: Arc::new(AtomicBool::new(false)),
            logprobs: false,
        };
        assert!(sink.send(&event()).is_continue());
        let Some(Ok(GenerateOutput {
            kind: Some(generate_output::Kind::Token(token)),
        })) = rx.blocking_recv()
        else {
            panic!("expected a token");
        };
        assert_eq!(token.logprob, None);
    }

    #[test]
    fn cancelled_generations_send_no_finish() {
        let mut output = GenerationOutput {
            token_ids: vec![5, 2],
            text: "hi".into(),
            finish_reason: FinishReason::Eos,
            prompt_tokens: 12,
        };
        let Some(GenerateOutput {
            kind: Some(generate_output::Kind::Finish(finish)),
        }) = finish_message(&output)
        else {
            panic!("expected a finish");
        };
        assert_eq!(finish.reason, v1::FinishReason::Eos as i32);
        let usage = finish.usage.unwrap();
        assert_eq!((usage.prompt_tokens, usage.generated_tokens), (12, 2));
        output.finish_reason = FinishReason::Cancelled;
        assert!(finish_message(&output).is_none());
    }
}
