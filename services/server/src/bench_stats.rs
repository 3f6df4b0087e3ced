//! Statistics of `blip2 bench load`: percentiles and per-group summaries of chat turns.
//!
//! Kept free of gRPC and of the rest of the binary (only `serde`) so that
//! `services/server/tests/bench_load.rs` can include it by path and test it on its own: the binary
//! crate has no library target to import from.

use serde::Serialize;

/// What one finished chat turn measured, from the client's side.
#[derive(Debug, Clone, Default)]
pub struct TurnSample {
    /// Seconds from sending the request (its first attempt, retries included) to the first text
    /// piece: what a user waits before anything appears.
    pub ttft: f64,
    /// Seconds between consecutive text pieces.
    pub inter_token: Vec<f64>,
    /// Seconds from sending the request to the final `done` event.
    pub latency: f64,
    /// `usage.generated_tokens` of the turn.
    pub generated_tokens: u32,
    /// `usage.prompt_tokens`: soft prompts included.
    pub prompt_tokens: u32,
    /// `usage.cached_prompt_tokens`: prompt positions the LLM tier's prefix cache supplied.
    pub cached_prompt_tokens: u32,
}

/// The `p`-th percentile (0..=100) of `sorted` (ascending), interpolated linearly between the
/// closest ranks, as numpy's default does, so the Python side computes the same figures from
/// the same samples. `None` for no samples.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    let (first, last) = (sorted.first()?, sorted.last()?);
    if sorted.len() == 1 || p <= 0.0 {
        return Some(*first);
    }
    if p >= 100.0 {
        return Some(*last);
    }
    let rank = p / 100.0 * (sorted.len() - 1) as f64;
    let below = rank.floor() as usize;
    let fraction = rank - below as f64;
    let low = sorted.get(below)?;
    let high = sorted.get(below + 1).unwrap_or(low);
    Some(low + (high - low) * fraction)
}

/// Percentiles of a set of durations, in milliseconds (null fields when there were none).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Distribution {
    pub count: usize,
    pub mean: Option<f64>,
    pub p50: Option<f64>,
    pub p95: Option<f64>,
    pub p99: Option<f64>,
    pub max: Option<f64>,
}

impl Distribution {
    /// Summarises `seconds` (any order) in milliseconds.
    pub fn from_seconds(seconds: &[f64]) -> Self {
        let mut ms: Vec<f64> = seconds
            .iter()
            .filter(|s| s.is_finite())
            .map(|s| s * 1e3)
            .collect();
        ms.sort_by(f64::total_cmp);
        let mean = if ms.is_empty() {
            None
        } else {
            Some(ms.iter().sum::<f64>() / ms.len() as f64)
        };
        Self {
            count: ms.len(),
            mean,
            p50: percentile(&ms, 50.0),
            p95: percentile(&ms, 95.0),
            p99: percentile(&ms, 99.0),
            max: ms.last().copied(),
        }
    }
}

/// A group of turns (first turns, later turns, all).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct GroupSummary {
    /// Turns that finished.
    pub turns: usize,
    /// Time to first text piece.
    pub ttft_ms: Distribution,
    /// Inter-token latency: the gaps between text pieces of all the group's turns pooled.
    pub itl_ms: Distribution,
    /// Whole turn, request to `done`.
    pub latency_ms: Distribution,
    pub generated_tokens: u64,
    pub mean_prompt_tokens: Option<f64>,
    pub mean_cached_prompt_tokens: Option<f64>,
    /// Median over turns of one stream's decode rate: text pieces after the first over the time
    /// from the first piece to the last. What a single user sees once the answer started.
    pub stream_tokens_per_second_p50: Option<f64>,
}

impl GroupSummary {
    pub fn from_samples<'a>(samples: impl IntoIterator<Item = &'a TurnSample>) -> Self {
        let samples: Vec<&TurnSample> = samples.into_iter().collect();
        let mean = |f: fn(&TurnSample) -> f64| {
            if samples.is_empty() {
                None
            } else {
                Some(samples.iter().map(|s| f(s)).sum::<f64>() / samples.len() as f64)
            }
        };
        let ttft: Vec<f64> = samples.iter().map(|s| s.ttft).collect();
        let latency: Vec<f64> = samples.iter().map(|s| s.latency).collect();
        let itl: Vec<f64> = samples
            .iter()
            .flat_map(|s| s.inter_token.iter().copied())
            .collect();
        let mut rates: Vec<f64> = samples
            .iter()
            .filter_map(|s| {
                let span: f64 = s.inter_token.iter().sum();
                (span > 0.0).then(|| s.inter_token.len() as f64 / span)
            })
            .collect();
        rates.sort_by(f64::total_cmp);
        Self {
            turns: samples.len(),
            ttft_ms: Distribution::from_seconds(&ttft),
            itl_ms: Distribution::from_seconds(&itl),
            latency_ms: Distribution::from_seconds(&latency),
            generated_tokens: samples.iter().map(|s| u64::from(s.generated_tokens)).sum(),
            mean_prompt_tokens: mean(|s| f64::from(s.prompt_tokens)),
            mean_cached_prompt_tokens: mean(|s| f64::from(s.cached_prompt_tokens)),
            stream_tokens_per_second_p50: percentile(&rates, 50.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_interpolates_like_numpy() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&v, 50.0), Some(2.5));
        assert_eq!(percentile(&v, 0.0), Some(1.0));
        assert_eq!(percentile(&v, 100.0), Some(4.0));
        assert_eq!(percentile(&[], 50.0), None);
    }
}
