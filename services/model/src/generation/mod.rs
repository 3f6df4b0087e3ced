//! Decoding: greedy, sampling and beam search over any [`LanguageModel`], with transformers
//! 5.24's semantics, plus stop sequences and incremental detokenisation.
//!
//! - [`params`]: [`GenerationParams`] and its validation.
//! - [`logits`]: processors and token selection ([`LogitsProcessor`]), per sequence and step.
//! - [`sequence`]: [`SequenceDecoder`], one greedy or sampled sequence between model steps.
//! - [`beam`]: [`BeamSearch`], step by step.
//! - [`stop`]: stop sequences with hold-back; [`detok`]: [`Detokenizer`].
//!
//! [`generate`] runs one prompt to the end with these blocks; a continuous-batching scheduler
//! can run the same blocks per sequence per step.

pub mod beam;
pub mod detok;
pub mod logits;
pub mod params;
pub mod sequence;
pub mod stop;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_beam;
#[cfg(test)]
mod tests_detok;

use std::ops::ControlFlow;

use candle_core::{DType, Tensor};
use tokenizers::Tokenizer;

pub use beam::{Beam, BeamSearch, BeamStep};
pub use detok::Detokenizer;
pub use logits::{LogitsProcessor, Selection};
pub use params::{EarlyStopping, GenerationParams};
pub use sequence::{SequenceDecoder, StepResult};
pub use stop::{StopMatcher, TextStream};

use crate::error::{Error, Result};
use crate::llm::{LanguageModel, SeqCache};

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// `max_new_tokens` reached.
    Length,
    /// An EOS id was generated (it is the last of `token_ids`).
    Eos,
    /// A stop sequence appeared in the text (the text is cut before it).
    StopSequence,
    /// The token callback asked to stop.
    Cancelled,
}

impl FinishReason {
    /// A short label for APIs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::Eos => "eos",
            FinishReason::StopSequence => "stop",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

/// One generated token, as streamed to the caller.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenEvent {
    pub id: u32,
    /// Text this token completes: possibly empty (an incomplete UTF-8 character, text held back
    /// because it may begin a stop sequence, EOS, or no tokenizer).
    pub text_piece: String,
    /// log_softmax of the processed scores at `id` (for beam search: of the processed log-probs
    /// at the step the token was chosen).
    pub logprob: f32,
}

/// The result of [`generate`].
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationOutput {
    /// Generated ids, as transformers returns them after the prompt: EOS included when
    /// generated; for encoder-decoders without the decoder start id. After a stop sequence, the
    /// ids up to the one that completed it.
    pub token_ids: Vec<u32>,
    /// Decoded text of `token_ids` (EOS excluded), cut before a stop sequence; empty without a
    /// tokenizer.
    pub text: String,
    pub finish_reason: FinishReason,
    /// Prompt positions: decoder positions for decoder-only models, encoder positions for
    /// encoder-decoders.
    pub prompt_tokens: usize,
}

/// Generates a continuation of `prompt_embeds` (`[t, hidden]`, soft prompts in place).
///
/// `context_ids`: the ids the repetition penalty covers besides the generated ones (BLIP-2 OPT:
/// the prompt's input ids, image tokens included; T5: the decoder start id), or empty.
/// `detok`: the tokenizer for text and stop sequences.
/// `on_token`: called for every token; `ControlFlow::Break` stops generation after it.
///
/// Greedy and sampling stream tokens as they are chosen. Beam search streams nothing until the
/// search ends, then emits the best sequence's tokens through `on_token` (a `Break` then cuts the
/// output there and reports [`FinishReason::Cancelled`]).
pub fn generate(
    model: &dyn LanguageModel,
    prompt_embeds: &Tensor,
    context_ids: &[u32],
    params: &GenerationParams,
    detok: Option<&Tokenizer>,
    on_token: &mut dyn FnMut(&TokenEvent) -> ControlFlow<()>,
) -> Result<GenerationOutput> {
    params.validate()?;
    let info = model.info();
    let (prompt_len, _) = prompt_embeds.dims2()?;
    if prompt_len == 0 {
        return Err(Error::InvalidInput("the prompt is empty".into()));
    }
    if !info.is_encoder_decoder && prompt_len + params.max_new_tokens - 1 > info.max_positions {
        return Err(Error::InvalidInput(format!(
            "`max_new_tokens` ({}) plus the prompt ({prompt_len} positions) exceeds the model's \
             {} positions",
            params.max_new_tokens, info.max_positions
        )));
    }
    let eos = params.resolve_eos(info.eos_token_id);
    if params.num_beams > 1 {
        beam_search(
            model,
            prompt_embeds,
            context_ids,
            &eos,
            params,
            detok,
            on_token,
        )
    } else {
        decode_single(
            model,
            prompt_embeds,
            context_ids,
            &eos,
            params,
            detok,
            on_token,
        )
    }
}

/// f32 logits of a tensor, flattened.
fn logits_vec(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

/// Greedy or sampling: one sequence, one token per model step.
fn decode_single(
    model: &dyn LanguageModel,
    prompt_embeds: &Tensor,
    context_ids: &[u32],
    eos: &[u32],
    params: &GenerationParams,
    detok: Option<&Tokenizer>,
    on_token: &mut dyn FnMut(&TokenEvent) -> ControlFlow<()>,
) -> Result<GenerationOutput> {
    let prompt_len = prompt_embeds.dim(0)?;
    let mut seq = SequenceDecoder::new(params, context_ids, eos, detok)?;
    let mut cache = model.new_cache();
    let mut logits = logits_vec(&model.prefill(prompt_embeds, &mut cache)?)?;
    loop {
        let result = seq.step(&mut logits)?;
        let flow = on_token(&result.event);
        if result.finish.is_some() {
            break;
        }
        if flow.is_break() {
            seq.cancel();
            break;
        }
        logits = logits_vec(&model.step(&[result.event.id], &mut [&mut cache])?)?;
    }
    Ok(seq.into_output(prompt_len))
}

/// Beam search, then the best sequence streamed through `on_token`.
fn beam_search(
    model: &dyn LanguageModel,
    prompt_embeds: &Tensor,
    context_ids: &[u32],
    eos: &[u32],
    params: &GenerationParams,
    detok: Option<&Tokenizer>,
    on_token: &mut dyn FnMut(&TokenEvent) -> ControlFlow<()>,
) -> Result<GenerationOutput> {
    let prompt_len = prompt_embeds.dim(0)?;
    // Validates the parameters and the tokenizer requirement before any model work.
    let mut seq = SequenceDecoder::new(params, context_ids, eos, detok)?;
    let mut search = BeamSearch::new(params, context_ids, eos)?;
    let num_beams = search.num_beams();

    let matcher = StopMatcher::new(&params.stop);
    let mut decode_error = None;
    let mut hits_stop = |ids: &[u32]| -> bool {
        let Some(tokenizer) = detok.filter(|_| !matcher.is_empty()) else {
            return false;
        };
        match tokenizer.decode(ids, params.skip_special_tokens) {
            Ok(text) => matcher.find(&text, 0).is_some(),
            Err(e) => {
                decode_error.get_or_insert_with(|| e.to_string());
                false
            }
        }
    };

    let mut cache = model.new_cache();
    let first = logits_vec(&model.prefill(prompt_embeds, &mut cache)?)?;
    let vocab_size = first.len();
    let mut logits = first.repeat(num_beams);
    let mut caches: Vec<SeqCache> = vec![cache; num_beams];
    while let Some(step) = search.step(&mut logits, vocab_size, &mut hits_stop)? {
        caches = step.parents.iter().map(|&p| caches[p].clone()).collect();
        let mut refs: Vec<&mut SeqCache> = caches.iter_mut().collect();
        logits = logits_vec(&model.step(&step.tokens, &mut refs)?)?;
    }
    if let Some(message) = decode_error {
        return Err(Error::Tokenizer {
            path: "tokenizer.json".into(),
            message: format!("cannot decode token ids: {message}"),
        });
    }
    drop(caches);

    let best = search.best();
    for (&id, &logprob) in best.tokens.iter().zip(&best.logprobs) {
        let result = seq.push_token(id, logprob)?;
        let flow = on_token(&result.event);
        if result.finish.is_some() {
            break;
        }
        if flow.is_break() {
            seq.cancel();
            break;
        }
    }
    Ok(seq.into_output(prompt_len))
}
