//! The LLM tier's metrics: what a call records as its tokens go out (TTFT, inter-token latency,
//! tokens), and the scheduler's live figures read at scrape time (queue depth, running batch,
//! prefix cache).

use std::sync::atomic::Ordering;
use std::time::Instant;

use blip2_common::metrics::{registry, Collect, Samples, LATENCY_BUCKETS};
use blip2_model::generation::GenerationOutput;

fn tier() -> Vec<(&'static str, String)> {
    vec![("tier", "llm".to_string())]
}

/// One call's token timing; the `stream` span lasts from its first token to its end.
pub(crate) struct TokenClock {
    started: Instant,
    last: Option<Instant>,
    stream: Option<tracing::Span>,
}

impl TokenClock {
    /// At the call's start (TTFT counts from here).
    pub fn start() -> Self {
        TokenClock {
            started: Instant::now(),
            last: None,
            stream: None,
        }
    }

    /// A token is going out.
    pub fn token(&mut self) {
        let now = Instant::now();
        match self.last {
            None => {
                registry().observe(
                    "blip2_llm_ttft_seconds",
                    "Time from a Generate call's start to its first token.",
                    tier(),
                    LATENCY_BUCKETS,
                    now.duration_since(self.started).as_secs_f64(),
                );
                self.stream = Some(tracing::info_span!("stream"));
            }
            Some(last) => registry().observe(
                "blip2_llm_inter_token_seconds",
                "Time between consecutive tokens of one generation.",
                tier(),
                LATENCY_BUCKETS,
                now.duration_since(last).as_secs_f64(),
            ),
        }
        self.last = Some(now);
    }
}

/// A generation ended: its tokens and its reason.
pub(crate) fn finished(output: &GenerationOutput) {
    let registry = registry();
    registry.add(
        "blip2_llm_generated_tokens_total",
        "Tokens generated (every finished generation's output tokens).",
        tier(),
        output.token_ids.len() as u64,
    );
    registry.add(
        "blip2_llm_prompt_tokens_total",
        "Prompt positions of finished generations (soft prompts included).",
        tier(),
        output.prompt_tokens as u64,
    );
    let mut labels = tier();
    labels.push(("reason", output.finish_reason.as_str().to_string()));
    registry.add(
        "blip2_llm_generations_total",
        "Generations finished, by finish reason.",
        labels,
        1,
    );
}

impl Collect for crate::Inner {
    fn collect(&self, out: &mut Samples) {
        let stats = &self.scheduler.stats;
        out.gauge(
            "blip2_llm_queue_depth",
            "Generations waiting for a slot in the running batch.",
            tier(),
            f64::from(stats.queued.load(Ordering::Relaxed)),
        );
        out.gauge(
            "blip2_llm_running_sequences",
            "Sequences in the running batch (a beam search counts num_beams).",
            tier(),
            f64::from(stats.running_sequences.load(Ordering::Relaxed)),
        );
        out.gauge(
            "blip2_llm_running_requests",
            "Generations in the running batch.",
            tier(),
            f64::from(stats.running.load(Ordering::Relaxed)),
        );
        let in_flight = self
            .config
            .max_concurrency
            .saturating_add(self.config.max_queue)
            .saturating_sub(self.admission.available_permits());
        out.gauge(
            "blip2_llm_calls_in_flight",
            "Generate calls admitted and not finished (receiving input, waiting or running).",
            tier(),
            in_flight as f64,
        );
        out.counter(
            "blip2_llm_completed_total",
            "Generations that left the scheduler, for any reason.",
            tier(),
            stats.completed.load(Ordering::Relaxed) as f64,
        );
        let prefix = stats.prefix();
        out.counter(
            "blip2_llm_prefix_cache_hits_total",
            "Prompts whose beginning was found in the prefix cache.",
            tier(),
            prefix.hits as f64,
        );
        out.counter(
            "blip2_llm_prefix_cache_misses_total",
            "Prompts looked up in the prefix cache without a reusable beginning.",
            tier(),
            prefix.misses as f64,
        );
        out.counter(
            "blip2_llm_prefix_cache_reused_tokens_total",
            "Prompt positions whose KV was taken from the prefix cache instead of computed.",
            tier(),
            prefix.tokens as f64,
        );
        out.gauge(
            "blip2_llm_prefix_cache_bytes",
            "Bytes of KV the prefix cache holds.",
            tier(),
            prefix.bytes as f64,
        );
    }
}
