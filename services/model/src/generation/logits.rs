//! Logits processors and token selection, in transformers' order and `f32` arithmetic.
//!
//! `generate` builds its processor list in this order (the processors this service supports):
//! 1. `RepetitionPenaltyLogitsProcessor` (when `repetition_penalty != 1`),
//! 2. `MinNewTokensLengthLogitsProcessor` (when `min_new_tokens > 0` and EOS is known),
//!
//! then, only when sampling, the warpers:
//! 3. `TemperatureLogitsWarper` (when `temperature != 1`),
//! 4. `TopKLogitsWarper` (when `top_k != 0`),
//! 5. `TopPLogitsWarper` (when `top_p < 1`), with `min_tokens_to_keep = 1`.
//!
//! Greedy and sampling apply them to the raw logits; beam search applies 1-2 to the
//! log-softmax of the raw logits.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::params::GenerationParams;
use crate::error::{Error, Result};

/// The warpers of sampling.
#[derive(Debug, Clone)]
struct Warpers {
    temperature: Option<f32>,
    top_k: usize,
    /// `1 - top_p` as transformers compares it: computed in f64, cast to f32.
    top_p_cutoff: Option<f32>,
}

/// A token chosen by [`LogitsProcessor::select`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Selection {
    pub id: u32,
    /// log_softmax of the processed scores at `id`.
    pub logprob: f32,
}

/// The per-sequence, per-step selection machinery: processors, warpers and the (seeded) RNG.
///
/// A continuous-batching scheduler keeps one per sequence and calls [`next_token`] with the
/// sequence's logits each step; [`super::generate`] does the same.
///
/// [`next_token`]: LogitsProcessor::next_token
#[derive(Debug, Clone)]
pub struct LogitsProcessor {
    /// Ids the repetition penalty always covers (the prompt's), sorted and deduplicated.
    context_ids: Vec<u32>,
    repetition_penalty: Option<f32>,
    min_new_tokens: usize,
    eos_token_ids: Vec<u32>,
    warpers: Option<Warpers>,
    rng: StdRng,
    scratch_ids: Vec<u32>,
    scratch_order: Vec<usize>,
    scratch_probs: Vec<f32>,
}

impl LogitsProcessor {
    /// `context_ids`: the ids the repetition penalty covers besides the generated ones (for a
    /// decoder-only model the prompt's input ids, for an encoder-decoder the decoder start id).
    /// `eos_token_ids`: the resolved EOS ids (see [`GenerationParams::resolve_eos`]).
    pub fn new(
        params: &GenerationParams,
        context_ids: &[u32],
        eos_token_ids: &[u32],
    ) -> Result<Self> {
        params.validate()?;
        let mut ids = context_ids.to_vec();
        ids.sort_unstable();
        ids.dedup();
        let warpers = params.is_sampling().then(|| Warpers {
            temperature: (params.temperature != 1.0).then_some(params.temperature as f32),
            top_k: params.top_k,
            top_p_cutoff: (params.top_p < 1.0).then_some((1.0 - params.top_p) as f32),
        });
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Ok(LogitsProcessor {
            context_ids: ids,
            repetition_penalty: (params.repetition_penalty != 1.0)
                .then_some(params.repetition_penalty as f32),
            min_new_tokens: params.min_new_tokens,
            eos_token_ids: eos_token_ids.to_vec(),
            warpers,
            rng,
            scratch_ids: Vec::new(),
            scratch_order: Vec::new(),
            scratch_probs: Vec::new(),
        })
    }

    /// True when [`select`](Self::select) samples rather than takes the argmax.
    pub fn is_sampling(&self) -> bool {
        self.warpers.is_some()
    }

    /// The EOS ids this processor suppresses under `min_new_tokens`.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    /// Repetition penalty and `min_new_tokens` (the processors that also run in beam search).
    /// `generated`: the ids generated so far for this sequence.
    pub fn apply_penalties(&mut self, scores: &mut [f32], generated: &[u32]) {
        if let Some(penalty) = self.repetition_penalty {
            self.scratch_ids.clear();
            self.scratch_ids.extend_from_slice(&self.context_ids);
            self.scratch_ids.extend_from_slice(generated);
            self.scratch_ids.sort_unstable();
            self.scratch_ids.dedup();
            apply_repetition_penalty(scores, &self.scratch_ids, penalty);
        }
        if generated.len() < self.min_new_tokens {
            suppress(scores, &self.eos_token_ids);
        }
    }

    /// Temperature, top-k and top-p, when sampling; nothing otherwise.
    pub fn apply_warpers(&mut self, scores: &mut [f32]) {
        let Some(w) = &self.warpers else {
            return;
        };
        if let Some(t) = w.temperature {
            scores.iter_mut().for_each(|s| *s /= t);
        }
        if w.top_k != 0 {
            top_k_filter(scores, w.top_k);
        }
        if let Some(cutoff) = w.top_p_cutoff {
            top_p_filter(
                scores,
                cutoff,
                &mut self.scratch_order,
                &mut self.scratch_probs,
            );
        }
    }

    /// All processors of a greedy or sampling step, in transformers' order.
    pub fn process(&mut self, scores: &mut [f32], generated: &[u32]) {
        self.apply_penalties(scores, generated);
        self.apply_warpers(scores);
    }

    /// Picks the next token from processed scores: the argmax (first index on ties, like
    /// `torch.argmax`), or a draw from their softmax with the seeded RNG.
    pub fn select(&mut self, scores: &[f32]) -> Result<Selection> {
        if scores.is_empty() {
            return Err(Error::InvalidInput("empty logits".into()));
        }
        let id = if self.is_sampling() {
            softmax_into(scores, &mut self.scratch_probs);
            let total: f64 = self.scratch_probs.iter().map(|&p| p as f64).sum();
            if !(total > 0.0 && total.is_finite()) {
                return Err(Error::InvalidInput(
                    "sampling distribution has no finite probability mass (NaN or all -inf scores)"
                        .into(),
                ));
            }
            let target = self.rng.random::<f64>() * total;
            let mut acc = 0.0f64;
            let mut chosen = None;
            for (i, &p) in self.scratch_probs.iter().enumerate() {
                if p > 0.0 {
                    acc += p as f64;
                    chosen = Some(i);
                    if acc > target {
                        break;
                    }
                }
            }
            chosen.unwrap_or(0)
        } else {
            argmax(scores)
        };
        Ok(Selection {
            id: id as u32,
            logprob: logprob_at(scores, id),
        })
    }

    /// [`process`](Self::process) then [`select`](Self::select): one step of one sequence.
    pub fn next_token(&mut self, scores: &mut [f32], generated: &[u32]) -> Result<Selection> {
        self.process(scores, generated);
        self.select(scores)
    }
}

/// `RepetitionPenaltyLogitsProcessor`: for each distinct id, negative scores are multiplied by
/// the penalty and the others divided by it. Ids outside the scores are ignored.
pub fn apply_repetition_penalty(scores: &mut [f32], ids: &[u32], penalty: f32) {
    for &id in ids {
        if let Some(s) = scores.get_mut(id as usize) {
            *s = if *s < 0.0 { *s * penalty } else { *s / penalty };
        }
    }
}

/// Sets the scores of `ids` to -inf.
pub fn suppress(scores: &mut [f32], ids: &[u32]) {
    for &id in ids {
        if let Some(s) = scores.get_mut(id as usize) {
            *s = f32::NEG_INFINITY;
        }
    }
}

/// `TopKLogitsWarper`: removes every score below the k-th largest (ties with it are kept).
pub fn top_k_filter(scores: &mut [f32], top_k: usize) {
    let k = top_k.min(scores.len());
    if k == 0 {
        return;
    }
    let mut sorted: Vec<f32> = scores.to_vec();
    let (_, kth, _) = sorted.select_nth_unstable_by(k - 1, |a, b| desc(*a, *b));
    let threshold = *kth;
    for s in scores.iter_mut() {
        if *s < threshold {
            *s = f32::NEG_INFINITY;
        }
    }
}

/// `TopPLogitsWarper` with `min_tokens_to_keep = 1`: sorts ascending, removes the tokens whose
/// cumulative probability (f32 softmax, cumsum accumulated in f64 as torch does on CPU) is
/// `<= 1 - top_p`, always keeping the most likely token. Ties are ordered by index (torch's CPU
/// sort gives no such guarantee; it only matters when tied scores straddle the cutoff).
pub fn top_p_filter(scores: &mut [f32], cutoff: f32, order: &mut Vec<usize>, probs: &mut Vec<f32>) {
    let n = scores.len();
    if n == 0 {
        return;
    }
    order.clear();
    order.extend(0..n);
    order.sort_by(|&a, &b| asc(scores[a], scores[b]).then(a.cmp(&b)));
    let sorted: Vec<f32> = order.iter().map(|&i| scores[i]).collect();
    softmax_into(&sorted, probs);
    let mut cum = 0.0f64;
    for (rank, &i) in order.iter().enumerate() {
        cum += probs[rank] as f64;
        if (cum as f32) <= cutoff && rank + 1 < n {
            scores[i] = f32::NEG_INFINITY;
        }
    }
}

/// Descending order with NaN first (as `torch.topk` / `torch.sort(descending=True)` place it).
pub(crate) fn desc(a: f32, b: f32) -> std::cmp::Ordering {
    asc(b, a)
}

/// Ascending order with NaN last.
fn asc(a: f32, b: f32) -> std::cmp::Ordering {
    use std::cmp::Ordering;
    match (a.is_nan(), b.is_nan()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Greater,
        (false, true) => Ordering::Less,
        (false, false) => a.partial_cmp(&b).unwrap_or(Ordering::Equal),
    }
}

/// Index of the first maximum (NaN counts as the maximum, like `torch.argmax`).
pub fn argmax(scores: &[f32]) -> usize {
    let mut best = 0;
    for (i, &s) in scores.iter().enumerate().skip(1) {
        if desc(s, scores[best]) == std::cmp::Ordering::Less {
            best = i;
        }
    }
    best
}

/// Max and log-sum-exp shift of `scores`: `(max, ln(sum(exp(s - max))))`.
fn lse_parts(scores: &[f32]) -> (f32, f32) {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return (max, 0.0);
    }
    let sum: f64 = scores.iter().map(|&s| ((s - max).exp()) as f64).sum();
    (max, sum.ln() as f32)
}

/// In-place log_softmax (`x - max - ln(sum(exp(x - max)))`).
pub fn log_softmax_in_place(scores: &mut [f32]) {
    let (max, log_sum) = lse_parts(scores);
    for s in scores.iter_mut() {
        *s = *s - max - log_sum;
    }
}

/// log_softmax of `scores` at one index.
pub fn logprob_at(scores: &[f32], index: usize) -> f32 {
    let (max, log_sum) = lse_parts(scores);
    scores
        .get(index)
        .map_or(f32::NEG_INFINITY, |&s| s - max - log_sum)
}

/// Softmax of `scores` into `out` (`exp(x - max) / sum`).
pub fn softmax_into(scores: &[f32], out: &mut Vec<f32>) {
    out.clear();
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        out.resize(scores.len(), 0.0);
        return;
    }
    out.extend(scores.iter().map(|&s| (s - max).exp()));
    let sum: f64 = out.iter().map(|&p| p as f64).sum();
    let inv = (1.0 / sum) as f32;
    out.iter_mut().for_each(|p| *p *= inv);
}
