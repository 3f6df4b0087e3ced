//! One sequence's decoding state: token selection, detokenisation, stop conditions.

use std::borrow::Borrow;

use tokenizers::Tokenizer;

use super::detok::Detokenizer;
use super::logits::{LogitsProcessor, Selection};
use super::params::GenerationParams;
use super::stop::{StopMatcher, TextStream};
use super::{FinishReason, GenerationOutput, TokenEvent};
use crate::error::{Error, Result};

/// What one token did to its sequence.
#[derive(Debug, Clone)]
pub struct StepResult {
    pub event: TokenEvent,
    /// `Some` when this token ended the sequence.
    pub finish: Option<FinishReason>,
}

/// The state of one greedy or sampled sequence between model steps.
///
/// A continuous-batching scheduler keeps one per sequence: each step it hands the sequence's
/// logits to [`step`](Self::step), streams the returned event, and feeds
/// [`StepResult::event`]`.id` to the model unless the sequence finished. [`super::generate`]
/// runs the same loop for one sequence.
pub struct SequenceDecoder<T: Borrow<Tokenizer>> {
    processor: LogitsProcessor,
    detok: Option<Detokenizer<T>>,
    stream: TextStream,
    eos_token_ids: Vec<u32>,
    max_new_tokens: usize,
    generated: Vec<u32>,
    finish: Option<FinishReason>,
}

impl<T: Borrow<Tokenizer>> SequenceDecoder<T> {
    /// `context_ids`: ids for the repetition penalty besides the generated ones.
    /// `eos_token_ids`: resolved EOS ids ([`GenerationParams::resolve_eos`]).
    /// `tokenizer`: needed for text and stop sequences; without it `text` stays empty.
    pub fn new(
        params: &GenerationParams,
        context_ids: &[u32],
        eos_token_ids: &[u32],
        tokenizer: Option<T>,
    ) -> Result<Self> {
        let processor = LogitsProcessor::new(params, context_ids, eos_token_ids)?;
        if tokenizer.is_none() && !params.stop.is_empty() {
            return Err(Error::InvalidInput(
                "`stop` sequences need a tokenizer to match the decoded text".into(),
            ));
        }
        Ok(SequenceDecoder {
            processor,
            detok: tokenizer.map(|t| Detokenizer::new(t, params.skip_special_tokens)),
            stream: TextStream::new(StopMatcher::new(&params.stop)),
            eos_token_ids: eos_token_ids.to_vec(),
            max_new_tokens: params.max_new_tokens,
            generated: Vec::new(),
            finish: None,
        })
    }

    /// The ids generated so far (EOS included when it was generated).
    pub fn generated(&self) -> &[u32] {
        &self.generated
    }

    /// Why the sequence ended, once it has.
    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.finish
    }

    pub fn is_finished(&self) -> bool {
        self.finish.is_some()
    }

    /// The selection machinery, for callers that process or select themselves.
    pub fn processor_mut(&mut self) -> &mut LogitsProcessor {
        &mut self.processor
    }

    /// Processes `logits` (the raw f32 logits of this sequence's last position, modified in
    /// place), selects the next token and appends it.
    pub fn step(&mut self, logits: &mut [f32]) -> Result<StepResult> {
        if self.finish.is_some() {
            return Err(Error::InvalidInput(
                "the sequence has already finished".into(),
            ));
        }
        let Selection { id, logprob } = self.processor.next_token(logits, &self.generated)?;
        self.push_token(id, logprob)
    }

    /// Appends a token chosen elsewhere (beam search) and updates text and stop conditions.
    ///
    /// EOS ends the sequence and adds no text; a stop sequence ends it with the text cut before
    /// the match; reaching `max_new_tokens` ends it with [`FinishReason::Length`]. Text that may
    /// begin a stop sequence is held back until it cannot, and flushed when the sequence ends.
    pub fn push_token(&mut self, id: u32, logprob: f32) -> Result<StepResult> {
        if self.finish.is_some() {
            return Err(Error::InvalidInput(
                "the sequence has already finished".into(),
            ));
        }
        self.generated.push(id);
        let is_eos = self.eos_token_ids.contains(&id);
        let mut text_piece = String::new();
        if let Some(detok) = self.detok.as_mut() {
            if !is_eos {
                let piece = detok.push(id)?;
                text_piece = self.stream.push(&piece);
            }
        }
        let mut finish = if self.stream.is_stopped() {
            Some(FinishReason::StopSequence)
        } else if is_eos {
            Some(FinishReason::Eos)
        } else if self.generated.len() >= self.max_new_tokens {
            Some(FinishReason::Length)
        } else {
            None
        };
        if finish.is_some() && !self.stream.is_stopped() {
            if let Some(detok) = self.detok.as_mut() {
                let rest = detok.finish()?;
                text_piece.push_str(&self.stream.push(&rest));
                if self.stream.is_stopped() {
                    finish = Some(FinishReason::StopSequence);
                }
            }
            text_piece.push_str(&self.stream.flush());
        }
        self.finish = finish;
        Ok(StepResult {
            event: TokenEvent {
                id,
                text_piece,
                logprob,
            },
            finish,
        })
    }

    /// Ends the sequence on the caller's request (after the current token).
    pub fn cancel(&mut self) {
        if self.finish.is_none() {
            self.finish = Some(FinishReason::Cancelled);
        }
    }

    /// The result. The text is everything decoded (held-back text included), cut before a
    /// matched stop sequence.
    pub fn into_output(self, prompt_tokens: usize) -> GenerationOutput {
        GenerationOutput {
            token_ids: self.generated,
            text: self.stream.into_text(),
            finish_reason: self.finish.unwrap_or(FinishReason::Length),
            prompt_tokens,
        }
    }
}
