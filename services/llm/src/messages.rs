//! The scheduler's events as response messages.

use blip2_model::generation::{FinishReason, GenerationOutput, TokenEvent};
use blip2_proto::v1::{self, generate_output, GenerateOutput};

/// One streamed token; its log-probability only when the request asked for it.
pub(crate) fn token_message(event: TokenEvent, logprobs: bool) -> GenerateOutput {
    let token = v1::Token {
        id: event.id,
        text: event.text_piece,
        logprob: logprobs.then_some(event.logprob),
    };
    GenerateOutput {
        kind: Some(generate_output::Kind::Token(token)),
    }
}

/// The closing message of a generation; `None` when it was cancelled (nobody to tell).
pub(crate) fn finish_message(
    output: &GenerationOutput,
    cached_prompt_tokens: usize,
) -> Option<GenerateOutput> {
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
            cached_prompt_tokens: count(cached_prompt_tokens),
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
    fn logprobs_only_when_asked() {
        let Some(generate_output::Kind::Token(token)) = token_message(event(), true).kind else {
            panic!("expected a token");
        };
        assert_eq!((token.id, token.text.as_str()), (7, "a"));
        assert_eq!(token.logprob, Some(-0.5));
        let Some(generate_output::Kind::Token(token)) = token_message(event(), false).kind else {
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
        }) = finish_message(&output, 9)
        else {
            panic!("expected a finish");
        };
        assert_eq!(finish.reason, v1::FinishReason::Eos as i32);
        let usage = finish.usage.unwrap();
        assert_eq!(
            (
                usage.prompt_tokens,
                usage.generated_tokens,
                usage.cached_prompt_tokens
            ),
            (12, 2, 9)
        );
        output.finish_reason = FinishReason::Cancelled;
        assert!(finish_message(&output, 0).is_none());
    }
}
