//! Decoding parameters, with transformers' `GenerationConfig` defaults and the service's limits.

use serde::{Deserialize, Deserializer};

use crate::error::{Error, Result};

/// Most beams a request may ask for.
pub const MAX_NUM_BEAMS: usize = 16;
/// Most new tokens a request may ask for.
pub const MAX_NEW_TOKENS_LIMIT: usize = 2048;
/// Most stop sequences per request.
pub const MAX_STOP_SEQUENCES: usize = 8;
/// Longest stop sequence, in bytes.
pub const MAX_STOP_BYTES: usize = 256;

/// Beam search's `early_stopping` (transformers accepts `True`, `False` and `"never"`).
///
/// - `False` (the default): stop when the best running beam, scored at the *current* length,
///   cannot beat the worst finished hypothesis (transformers' heuristic).
/// - `True`: stop as soon as `num_beams` hypotheses are finished.
/// - `"never"`: like `False`, but with a positive `length_penalty` the best running beam is
///   scored at the maximum length (the canonical beam search bound).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EarlyStopping {
    #[default]
    False,
    True,
    Never,
}

impl<'de> Deserialize<'de> for EarlyStopping {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bool(bool),
            Str(String),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Bool(false) => Ok(EarlyStopping::False),
            Raw::Bool(true) => Ok(EarlyStopping::True),
            Raw::Str(s) if s == "never" => Ok(EarlyStopping::Never),
            Raw::Str(s) => Err(serde::de::Error::custom(format!(
                "`early_stopping` must be true, false or \"never\", got {s:?}"
            ))),
        }
    }
}

/// Decoding parameters of one request.
///
/// Floats are `f64` like Python's; they are applied to the `f32` scores exactly as transformers
/// does (cast to `f32` at the point of use).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GenerationParams {
    /// Most tokens to generate, EOS included. Default 20 (transformers' default `max_length` of 20
    /// counts new tokens when `max_new_tokens` is not set).
    pub max_new_tokens: usize,
    /// EOS is suppressed (its score set to -inf) while fewer tokens than this have been generated.
    /// Default 0.
    pub min_new_tokens: usize,
    /// Sample instead of picking the most likely token. Default false.
    pub do_sample: bool,
    /// Sampling temperature; 0 means greedy. Ignored unless `do_sample`. Default 1.
    pub temperature: f64,
    /// Keep only the `top_k` most likely tokens when sampling; 0 disables. Default 50
    /// (transformers' default).
    pub top_k: usize,
    /// Nucleus sampling mass in (0, 1]; 1 disables. Default 1.
    pub top_p: f64,
    /// > 1 penalises tokens already in the context or generated; 1 disables. Default 1.
    pub repetition_penalty: f64,
    /// Number of beams; 1 is greedy or sampling. Default 1.
    pub num_beams: usize,
    /// Beam scores are divided by `generated_len ^ length_penalty`. Default 1.
    pub length_penalty: f64,
    /// Beam search stopping rule. Default false.
    pub early_stopping: EarlyStopping,
    /// Seed of the sampling RNG; `None` seeds from the OS.
    pub seed: Option<u64>,
    /// Stop sequences, matched on the decoded text of the generated tokens.
    pub stop: Vec<String>,
    /// End-of-sequence ids; empty means the model's `eos_token_id`.
    pub eos_token_ids: Vec<u32>,
    /// Decode without special tokens (what `batch_decode(..., skip_special_tokens=True)` gives).
    /// Default true.
    pub skip_special_tokens: bool,
}

impl Default for GenerationParams {
    fn default() -> Self {
        GenerationParams {
            max_new_tokens: 20,
            min_new_tokens: 0,
            do_sample: false,
            temperature: 1.0,
            top_k: 50,
            top_p: 1.0,
            repetition_penalty: 1.0,
            num_beams: 1,
            length_penalty: 1.0,
            early_stopping: EarlyStopping::False,
            seed: None,
            stop: Vec::new(),
            eos_token_ids: Vec::new(),
            skip_special_tokens: true,
        }
    }
}

fn invalid(message: impl Into<String>) -> Error {
    Error::InvalidInput(message.into())
}

impl GenerationParams {
    /// Checks every parameter against its range and the service's limits.
    pub fn validate(&self) -> Result<()> {
        if self.max_new_tokens == 0 || self.max_new_tokens > MAX_NEW_TOKENS_LIMIT {
            return Err(invalid(format!(
                "`max_new_tokens` must be in [1, {MAX_NEW_TOKENS_LIMIT}], got {}",
                self.max_new_tokens
            )));
        }
        if self.min_new_tokens > self.max_new_tokens {
            return Err(invalid(format!(
                "`min_new_tokens` ({}) must not exceed `max_new_tokens` ({})",
                self.min_new_tokens, self.max_new_tokens
            )));
        }
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(invalid(format!(
                "`temperature` must be a finite number >= 0 (0 means greedy), got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(invalid(format!(
                "`top_p` must be in (0, 1], got {}",
                self.top_p
            )));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Err(invalid(format!(
                "`repetition_penalty` must be a finite number > 0, got {}",
                self.repetition_penalty
            )));
        }
        if self.num_beams == 0 || self.num_beams > MAX_NUM_BEAMS {
            return Err(invalid(format!(
                "`num_beams` must be in [1, {MAX_NUM_BEAMS}], got {}",
                self.num_beams
            )));
        }
        if !self.length_penalty.is_finite() {
            return Err(invalid(format!(
                "`length_penalty` must be finite, got {}",
                self.length_penalty
            )));
        }
        if self.do_sample && self.num_beams > 1 {
            return Err(invalid(
                "`do_sample` with `num_beams` > 1 (beam sampling) is not supported: \
                 use `num_beams` = 1 to sample, or `do_sample` = false for beam search",
            ));
        }
        if self.stop.len() > MAX_STOP_SEQUENCES {
            return Err(invalid(format!(
                "`stop` may hold at most {MAX_STOP_SEQUENCES} sequences, got {}",
                self.stop.len()
            )));
        }
        for (i, s) in self.stop.iter().enumerate() {
            if s.is_empty() {
                return Err(invalid(format!("`stop`[{i}] must not be empty")));
            }
            if s.len() > MAX_STOP_BYTES {
                return Err(invalid(format!(
                    "`stop`[{i}] must be at most {MAX_STOP_BYTES} bytes, got {}",
                    s.len()
                )));
            }
        }
        Ok(())
    }

    /// True when tokens are drawn at random (`do_sample` with a positive temperature).
    pub fn is_sampling(&self) -> bool {
        self.do_sample && self.temperature > 0.0
    }

    /// The EOS ids in force: `eos_token_ids`, or the model's `eos_token_id` when empty.
    pub fn resolve_eos(&self, model_eos: Option<u32>) -> Vec<u32> {
        if self.eos_token_ids.is_empty() {
            model_eos.into_iter().collect()
        } else {
            self.eos_token_ids.clone()
        }
    }
}
