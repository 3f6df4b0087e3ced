//! Beam search with the semantics of transformers 5.24's `GenerationMixin._beam_search`
//! (batch size 1, no sampling).
//!
//! Per step, with `g` tokens generated so far and `K = max(2, 1 + n_eos) * num_beams`:
//! 1. `log_softmax` of each running beam's raw logits (f32), then the processors (repetition
//!    penalty, `min_new_tokens`) on the log-probs, then the beam's running score is added.
//! 2. The top `K` of the flattened `num_beams * vocab` scores are the candidates (sorted; ties by
//!    flat index). A candidate "hits the stopping criteria" when its token is an EOS id, when it
//!    reaches `max_new_tokens` (`g + 1 >= max_new_tokens`), or when its text contains a stop
//!    sequence.
//! 3. Running beams for the next step: the top `num_beams` candidates after adding -1e9 to those
//!    that hit.
//! 4. Finished hypotheses: candidates among the first `num_beams` that hit are scored
//!    `score / (g + 1) ^ length_penalty` (the *generated* length: the prompt never counts, for
//!    decoder-only models fed `input_ids` and for encoder-decoders whose decoder starts at
//!    `decoder_start_token_id`); the others get -1e9 added (and -1e9 more when all hypotheses are
//!    finished and `early_stopping` is `True`, or when the heuristic says no improvement is
//!    possible); the best `num_beams` of the old hypotheses and these are kept.
//! 5. Early-stop heuristic: with `best = running[0] / L ^ length_penalty`, where `L` is
//!    `max_new_tokens` for `early_stopping = "never"` with a positive `length_penalty` and
//!    `g + 1` otherwise, improvement stays possible while `best` beats some hypothesis slot's
//!    worst score (a finished slot: the minimum of all hypothesis scores; an unfinished slot:
//!    -1e9).
//! 6. The search ends when no improvement is possible, or all hypotheses are finished and
//!    `early_stopping` is `True`, or every candidate hit a stopping criterion.
//!
//! Scores start at 0 for the first beam and -1e9 for the others (all beams hold the prompt), and
//! the hypotheses at -1e9. The result is the best hypothesis; EOS stays in its ids.

use super::logits::{desc, log_softmax_in_place, LogitsProcessor};
use super::params::{EarlyStopping, GenerationParams};
use crate::error::{Error, Result};

const NEG: f32 = -1.0e9;

/// A running beam or a hypothesis.
#[derive(Debug, Clone, Default)]
pub struct Beam {
    /// Generated ids.
    pub tokens: Vec<u32>,
    /// log-prob (after processors) of each generated id.
    pub logprobs: Vec<f32>,
    /// Running beams: accumulated log-prob. Hypotheses: length-penalised score.
    pub score: f32,
    /// Hypotheses only: true once a real finished sequence holds the slot.
    pub finished: bool,
}

/// What the caller feeds the model next: running beam `i` continues from the cache of the
/// previous step's running beam `parents[i]` with token `tokens[i]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BeamStep {
    pub parents: Vec<usize>,
    pub tokens: Vec<u32>,
}

struct Candidate {
    score: f32,
    beam: usize,
    token: u32,
    logprob: f32,
    hit: bool,
}

/// Beam search over one prompt, driven step by step by the caller.
pub struct BeamSearch {
    num_beams: usize,
    beams_to_keep: usize,
    length_penalty: f64,
    early_stopping: EarlyStopping,
    max_new_tokens: usize,
    processor: LogitsProcessor,
    running: Vec<Beam>,
    hypotheses: Vec<Beam>,
    improvement_possible: bool,
    generated_len: usize,
    done: bool,
}

impl BeamSearch {
    /// `context_ids` and `eos_token_ids` as for [`LogitsProcessor::new`].
    pub fn new(
        params: &GenerationParams,
        context_ids: &[u32],
        eos_token_ids: &[u32],
    ) -> Result<Self> {
        let processor = LogitsProcessor::new(params, context_ids, eos_token_ids)?;
        if processor.is_sampling() {
            return Err(Error::InvalidInput(
                "beam sampling (`do_sample` with `num_beams` > 1) is not supported".into(),
            ));
        }
        let num_beams = params.num_beams;
        let running = (0..num_beams)
            .map(|i| Beam {
                score: if i == 0 { 0.0 } else { NEG },
                ..Beam::default()
            })
            .collect();
        let hypotheses = vec![
            Beam {
                score: NEG,
                ..Beam::default()
            };
            num_beams
        ];
        Ok(BeamSearch {
            num_beams,
            beams_to_keep: (1 + eos_token_ids.len()).max(2) * num_beams,
            length_penalty: params.length_penalty,
            early_stopping: params.early_stopping,
            max_new_tokens: params.max_new_tokens,
            processor,
            running,
            hypotheses,
            improvement_possible: true,
            generated_len: 0,
            done: false,
        })
    }

    pub fn num_beams(&self) -> usize {
        self.num_beams
    }

    pub fn is_done(&self) -> bool {
        self.done
    }

    /// The running beams (in the order the model must be fed).
    pub fn running(&self) -> &[Beam] {
        &self.running
    }

    /// The best hypothesis (the search's result once it is done).
    pub fn best(&self) -> &Beam {
        &self.hypotheses[0]
    }

    /// One step. `logits`: the raw f32 logits of every running beam, `num_beams` rows of
    /// `vocab_size` (on the first step, the prompt's logits repeated for every beam).
    /// `hits_stop`: whether a candidate's generated ids contain a stop sequence.
    ///
    /// Returns the next step's inputs, or `None` when the search is done.
    pub fn step(
        &mut self,
        logits: &mut [f32],
        vocab_size: usize,
        hits_stop: &mut dyn FnMut(&[u32]) -> bool,
    ) -> Result<Option<BeamStep>> {
        if self.done {
            return Err(Error::InvalidInput(
                "beam search has already finished".into(),
            ));
        }
        if vocab_size == 0 || logits.len() != self.num_beams * vocab_size {
            return Err(Error::InvalidInput(format!(
                "beam search expects {} x {vocab_size} logits, got {}",
                self.num_beams,
                logits.len()
            )));
        }
        // 1. log-probs, processors, running scores.
        let mut token_logprobs = logits.to_vec();
        for (b, row) in token_logprobs.chunks_mut(vocab_size).enumerate() {
            log_softmax_in_place(row);
            self.processor.apply_penalties(row, &self.running[b].tokens);
        }
        for (b, (acc, lp)) in logits
            .chunks_mut(vocab_size)
            .zip(token_logprobs.chunks(vocab_size))
            .enumerate()
        {
            let running_score = self.running[b].score;
            for (a, &l) in acc.iter_mut().zip(lp) {
                *a = l + running_score;
            }
        }

        // 2. top-K candidates of the flattened scores.
        let k = self.beams_to_keep.min(logits.len());
        let flat = top_k_indices(logits, k);
        let g = self.generated_len;
        let at_max_length = g + 1 >= self.max_new_tokens;
        let eos = self.processor.eos_token_ids().to_vec();
        let mut scratch = Vec::new();
        let candidates: Vec<Candidate> = flat
            .into_iter()
            .map(|i| {
                let (beam, token) = (i / vocab_size, (i % vocab_size) as u32);
                let hit = at_max_length || eos.contains(&token) || {
                    scratch.clear();
                    scratch.extend_from_slice(&self.running[beam].tokens);
                    scratch.push(token);
                    hits_stop(&scratch)
                };
                Candidate {
                    score: logits[i],
                    beam,
                    token,
                    logprob: token_logprobs[i],
                    hit,
                }
            })
            .collect();
        let extend = |c: &Candidate, running: &[Beam]| {
            let parent = &running[c.beam];
            let mut tokens = parent.tokens.clone();
            tokens.push(c.token);
            let mut logprobs = parent.logprobs.clone();
            logprobs.push(c.logprob);
            (tokens, logprobs)
        };

        // 3. running beams for the next step.
        let masked: Vec<f32> = candidates
            .iter()
            .map(|c| c.score + if c.hit { NEG } else { -0.0 })
            .collect();
        let next = top_k_indices(&masked, self.num_beams);
        let next_running: Vec<Beam> = next
            .iter()
            .map(|&j| {
                let (tokens, logprobs) = extend(&candidates[j], &self.running);
                Beam {
                    tokens,
                    logprobs,
                    score: masked[j],
                    finished: false,
                }
            })
            .collect();

        // 4. finished hypotheses.
        let all_finished = self.hypotheses.iter().all(|h| h.finished);
        let full = all_finished && self.early_stopping == EarlyStopping::True;
        let divisor = ((g + 1) as f64).powf(self.length_penalty) as f32;
        let mut merged_scores: Vec<f32> = self.hypotheses.iter().map(|h| h.score).collect();
        for (j, c) in candidates.iter().enumerate() {
            let just_finished = c.hit && j < self.num_beams;
            let mut s = c.score / divisor;
            s += if full { NEG } else { -0.0 };
            s += if self.improvement_possible { -0.0 } else { NEG };
            s += if just_finished { -0.0 } else { NEG };
            merged_scores.push(s);
        }
        let keep = top_k_indices(&merged_scores, self.num_beams);
        let n_old = self.hypotheses.len();
        let hypotheses: Vec<Beam> = keep
            .iter()
            .map(|&m| {
                if m < n_old {
                    self.hypotheses[m].clone()
                } else {
                    let j = m - n_old;
                    let (tokens, logprobs) = extend(&candidates[j], &self.running);
                    Beam {
                        tokens,
                        logprobs,
                        score: merged_scores[m],
                        finished: candidates[j].hit && j < self.num_beams,
                    }
                }
            })
            .collect();

        // 5. early-stop heuristic and the stopping rule.
        self.generated_len = g + 1;
        let best_len = if self.early_stopping == EarlyStopping::Never && self.length_penalty > 0.0 {
            self.max_new_tokens
        } else {
            self.generated_len
        };
        let best_possible =
            next_running[0].score / (best_len as f64).powf(self.length_penalty) as f32;
        let min_score = hypotheses
            .iter()
            .map(|h| h.score)
            .fold(f32::INFINITY, f32::min);
        self.improvement_possible &= hypotheses
            .iter()
            .any(|h| best_possible > if h.finished { min_score } else { NEG });
        let all_finished = hypotheses.iter().all(|h| h.finished);
        let exists_open_beam = !(all_finished && self.early_stopping == EarlyStopping::True);
        let valid_continuations = !candidates.iter().all(|c| c.hit);
        self.done = !(self.improvement_possible && exists_open_beam && valid_continuations);

        let step = BeamStep {
            parents: next.iter().map(|&j| candidates[j].beam).collect(),
            tokens: next.iter().map(|&j| candidates[j].token).collect(),
        };
        self.running = next_running;
        self.hypotheses = hypotheses;
        Ok((!self.done).then_some(step))
    }
}

/// Indices of the `k` largest values, largest first (ties: lower index first; NaN largest).
fn top_k_indices(values: &[f32], k: usize) -> Vec<usize> {
    let k = k.min(values.len());
    let cmp = |a: &usize, b: &usize| desc(values[*a], values[*b]).then(a.cmp(b));
    let mut idx: Vec<usize> = (0..values.len()).collect();
    if k == 0 {
        return Vec::new();
    }
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, cmp);
        idx.truncate(k);
    }
    idx.sort_by(cmp);
    idx
}
