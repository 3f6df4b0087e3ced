//! Continuous batching: one thread owns the language model, the KV caches of every running
//! sequence and the prefix cache, and runs one ragged forward per step over all of them.
//!
//! Each step feeds every decoding sequence its last token (a beam search feeds `num_beams`
//! sequences) and, within a budget of `prefill_chunk` positions, the next chunk of the prompts
//! still being read (decoder-only models; an encoder-decoder reads its prompt through the
//! encoder in one call between steps). So a newcomer joins at the next step, a long prompt does
//! not stall the running streams for longer than one chunk, and a weight matrix is read once per
//! step for the whole batch. A sequence that finishes, fails or is cancelled leaves at once and
//! frees its KV; waiting requests take freed slots first come, first served.
//!
//! Tokens go out on an unbounded channel per request (at most `max_new_tokens` small events), so
//! a slow client never holds up the batch; the call's task forwards them to the client.

use std::borrow::Borrow;
use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex, PoisonError};

use blip2_model::generation::{
    BeamSearch, FinishReason, GenerationOutput, SequenceDecoder, StopMatcher, TokenEvent,
};
use blip2_model::llm::{LanguageModel, SeqCache, StepInput};
use blip2_model::model::Blip2Model;
use candle_core::Tensor;
use tokenizers::Tokenizer;
use tokio::sync::mpsc;

use crate::error::Error;
use crate::prefix::{self, PosKey, PrefixCache, PrefixStats};
use crate::setup::ValidRequest;

/// The scheduler's limits.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SchedulerConfig {
    /// Sequences in the running batch (a beam search takes `num_beams`).
    pub max_sequences: usize,
    /// Prompt positions read per step, over all prefilling sequences.
    pub prefill_chunk: usize,
    /// Bytes of KV the prefix cache may hold (0: no prefix cache).
    pub prefix_cache_bytes: usize,
    /// Shortest time a step with running requests takes (see `LlmConfig::min_step_time`).
    pub min_step_time: std::time::Duration,
}

/// What the scheduler tells a call.
#[derive(Debug)]
pub(crate) enum Event {
    Token(TokenEvent),
    /// The generation ended (cancelled ones too: nobody may be listening).
    Finished {
        output: GenerationOutput,
        cached_prompt_tokens: usize,
    },
    Failed(Error),
}

/// One request for the scheduler.
pub(crate) struct Job {
    pub request: ValidRequest,
    pub events: mpsc::UnboundedSender<Event>,
    /// Set by the call when its client left or broke the protocol.
    pub cancel: Arc<AtomicBool>,
    pub span: tracing::Span,
    /// Open while the request waits for a slot (closed when it joins the batch).
    pub queue: tracing::Span,
}

/// Live figures of the scheduler.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub queued: AtomicU32,
    pub running: AtomicU32,
    pub running_sequences: AtomicU32,
    pub completed: AtomicU64,
    /// Most rows (decode sequences + prompt chunks) one step has run.
    pub largest_step: AtomicU32,
    pub prefix: Mutex<PrefixStats>,
}

impl Stats {
    pub fn prefix(&self) -> PrefixStats {
        *self.prefix.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The handle the service holds: submitting jobs, reading figures.
pub(crate) struct Scheduler {
    jobs: Mutex<std_mpsc::Sender<Job>>,
    pub stats: Arc<Stats>,
}

impl Scheduler {
    /// Starts the scheduler thread for `model`.
    pub fn start(model: Arc<Blip2Model>, config: SchedulerConfig) -> std::io::Result<Self> {
        let (jobs, receiver) = std_mpsc::channel();
        let stats = Arc::new(Stats::default());
        let worker = Worker {
            lm: model.language_model().ok().cloned(),
            tokenizer: ModelTokenizer(model.clone()),
            model,
            config: SchedulerConfig {
                max_sequences: config.max_sequences.max(1),
                prefill_chunk: config.prefill_chunk.max(1),
                ..config
            },
            stats: stats.clone(),
            jobs: receiver,
            waiting: VecDeque::new(),
            active: Vec::new(),
            prefix: PrefixCache::new(config.prefix_cache_bytes),
        };
        std::thread::Builder::new()
            .name("llm-scheduler".into())
            .spawn(move || worker.run())?;
        Ok(Scheduler {
            jobs: Mutex::new(jobs),
            stats,
        })
    }

    pub fn submit(&self, job: Job) -> Result<(), Error> {
        self.stats.queued.fetch_add(1, Ordering::SeqCst);
        let sent = self
            .jobs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .send(job);
        sent.map_err(|_| {
            self.stats.queued.fetch_sub(1, Ordering::SeqCst);
            Error::Worker("the scheduler thread has stopped".into())
        })
    }
}

/// The checkpoint's tokenizer, owned through the model (decoders outlive any borrow).
#[derive(Clone)]
struct ModelTokenizer(Arc<Blip2Model>);

impl Borrow<Tokenizer> for ModelTokenizer {
    fn borrow(&self) -> &Tokenizer {
        self.0.prompt_tokenizer().tokenizer()
    }
}

enum Decoder {
    Single(SequenceDecoder<ModelTokenizer>),
    Beam {
        search: Box<BeamSearch>,
        /// Streams the best beam's tokens once the search is done.
        seq: SequenceDecoder<ModelTokenizer>,
        tokenizer: ModelTokenizer,
        stop: StopMatcher,
        skip_special_tokens: bool,
        decode_error: Option<String>,
    },
}

/// A request in the running batch.
struct Active {
    events: mpsc::UnboundedSender<Event>,
    cancel: Arc<AtomicBool>,
    span: tracing::Span,
    /// `prefill` while the prompt is read, then `decode` (children of `span`).
    phase: tracing::Span,
    /// Sequence slots taken.
    width: usize,
    prompt_len: usize,
    /// Position keys of the prompt (empty: no prefix caching for this request).
    keys: Vec<PosKey>,
    cached_prompt_tokens: usize,
    /// The prompt's embeddings while it is being read.
    embeds: Option<Tensor>,
    /// Prompt positions in the cache so far.
    prefilled: usize,
    /// One cache while prefilling; one per running sequence (beam) after.
    caches: Vec<SeqCache>,
    /// The tokens to feed next, one per cache.
    next: Vec<u32>,
    decoder: Decoder,
    /// Set when the request leaves the batch at the end of this step.
    done: Option<Outcome>,
}

enum Outcome {
    Finished,
    Failed(Error),
}

impl Active {
    fn is_prefilling(&self) -> bool {
        self.embeds.is_some()
    }

    fn gone(&self) -> bool {
        self.cancel.load(Ordering::Relaxed) || self.events.is_closed()
    }
}

/// Where a row of the step's logits goes.
enum Row {
    /// Row for beam `b` (or the single sequence) of a decoding request.
    Decode,
    /// The last row of a prompt chunk of `n` positions.
    Prefill(usize),
}

struct Worker {
    model: Arc<Blip2Model>,
    lm: Option<Arc<dyn LanguageModel>>,
    tokenizer: ModelTokenizer,
    config: SchedulerConfig,
    stats: Arc<Stats>,
    jobs: std_mpsc::Receiver<Job>,
    waiting: VecDeque<Job>,
    active: Vec<Active>,
    prefix: PrefixCache,
}

impl Worker {
    fn run(mut self) {
        loop {
            if self.active.is_empty() && self.waiting.is_empty() {
                match self.jobs.recv() {
                    Ok(job) => self.waiting.push_back(job),
                    Err(_) => return, // The tier is gone.
                }
            }
            while let Ok(job) = self.jobs.try_recv() {
                self.waiting.push_back(job);
            }
            let started = std::time::Instant::now();
            let step = catch_unwind(AssertUnwindSafe(|| {
                self.admit();
                self.step();
            }));
            if !self.active.is_empty() {
                // A paced tier (tests, demos): decode no faster than one step per period.
                if let Some(rest) = self.config.min_step_time.checked_sub(started.elapsed()) {
                    std::thread::sleep(rest);
                }
            }
            if step.is_err() {
                tracing::error!("the scheduler step panicked; failing the running batch");
                for a in &mut self.active {
                    a.done = Some(Outcome::Failed(Error::Worker(
                        "the model panicked during a batched step".into(),
                    )));
                }
            }
            self.retire();
            self.publish();
        }
    }

    fn slots_used(&self) -> usize {
        self.active.iter().map(|a| a.width).sum()
    }

    /// Moves waiting requests into the batch while their slots are free (first come, first
    /// served: a wide beam search at the front waits rather than being overtaken forever).
    fn admit(&mut self) {
        while let Some(job) = self.waiting.front() {
            if job.cancel.load(Ordering::Relaxed) || job.events.is_closed() {
                self.waiting.pop_front();
                self.stats.queued.fetch_sub(1, Ordering::SeqCst);
                self.stats.completed.fetch_add(1, Ordering::SeqCst);
                continue;
            }
            let width = job.request.params.num_beams.max(1);
            if width <= self.config.max_sequences
                && self.slots_used() + width > self.config.max_sequences
            {
                break;
            }
            let Some(job) = self.waiting.pop_front() else {
                break;
            };
            self.stats.queued.fetch_sub(1, Ordering::SeqCst);
            let events = job.events.clone();
            match self.start(job) {
                Ok(active) => self.active.push(active),
                Err(error) => {
                    self.stats.completed.fetch_add(1, Ordering::SeqCst);
                    let _ = events.send(Event::Failed(error));
                }
            }
        }
    }

    /// Turns a request into a batch member: embeddings, decoder, prefix-cache lookup.
    fn start(&mut self, job: Job) -> Result<Active, Error> {
        drop(job.queue);
        let _span = job.span.enter();
        let lm = self.lm.as_ref().ok_or(Error::NoLanguageModel)?;
        let request = &job.request;
        let params = &request.params;
        let width = params.num_beams.max(1);
        if width > self.config.max_sequences {
            return Err(Error::invalid(format!(
                "`num_beams` {width} exceeds this LLM tier's batch of {} sequences",
                self.config.max_sequences
            )));
        }
        params.validate()?;
        let info = lm.info();
        let embeds = self
            .model
            .prompt_embeds(&request.prompt, &request.soft_prompts)?;
        let prompt_len = embeds.dim(0).map_err(blip2_model::Error::from)?;
        if prompt_len == 0 {
            return Err(Error::invalid("the prompt is empty"));
        }
        if !info.is_encoder_decoder && prompt_len + params.max_new_tokens - 1 > info.max_positions {
            return Err(Error::invalid(format!(
                "the prompt ({prompt_len} positions) plus `max_new_tokens` ({}) exceeds the \
                 model's {} positions",
                params.max_new_tokens, info.max_positions
            )));
        }
        let context = self.model.penalty_context(&request.prompt);
        let eos = params.resolve_eos(info.eos_token_id);
        let seq = SequenceDecoder::new(params, &context, &eos, Some(self.tokenizer.clone()))?;
        let decoder = if width > 1 {
            Decoder::Beam {
                search: Box::new(BeamSearch::new(params, &context, &eos)?),
                seq,
                tokenizer: self.tokenizer.clone(),
                stop: StopMatcher::new(&params.stop),
                skip_special_tokens: params.skip_special_tokens,
                decode_error: None,
            }
        } else {
            Decoder::Single(seq)
        };

        let mut keys = Vec::new();
        let mut cache = None;
        let mut prefilled = 0;
        if !info.is_encoder_decoder && self.config.prefix_cache_bytes > 0 {
            let rows = self.model.config().num_query_tokens;
            keys = prefix::prompt_keys(&request.prompt, &request.image_digests, rows);
            if keys.len() == prompt_len {
                if let Some(hit) = self.prefix.lookup(&keys) {
                    prefilled = hit.len;
                    cache = Some(hit.cache);
                }
            } else {
                keys.clear();
            }
        }
        tracing::debug!(prompt_len, cached = prefilled, width, "joined the batch");
        Ok(Active {
            events: job.events,
            cancel: job.cancel,
            span: job.span.clone(),
            phase: tracing::info_span!(
                parent: &job.span,
                "prefill",
                prompt_tokens = prompt_len,
                cached_prompt_tokens = prefilled
            ),
            width,
            prompt_len,
            keys,
            cached_prompt_tokens: prefilled,
            embeds: Some(embeds),
            prefilled,
            caches: vec![cache.unwrap_or_else(|| lm.new_cache())],
            next: Vec::new(),
            decoder,
            done: None,
        })
    }

    /// One batched step over the running requests.
    fn step(&mut self) {
        let Some(lm) = self.lm.clone() else {
            return;
        };
        for a in &mut self.active {
            if a.done.is_none() && a.gone() {
                cancel(a);
            }
        }
        if lm.info().is_encoder_decoder {
            self.prefill_encoder(lm.as_ref());
        }

        let mut inputs = Vec::new();
        let mut rows = Vec::new(); // (active index, row kind)
        let mut refs: Vec<&mut SeqCache> = Vec::new();
        let mut budget = self.config.prefill_chunk;
        for (i, a) in self.active.iter_mut().enumerate() {
            if a.done.is_some() {
                continue;
            }
            match &a.embeds {
                None => {
                    for (cache, &token) in a.caches.iter_mut().zip(&a.next) {
                        inputs.push(StepInput::Tokens(vec![token]));
                        rows.push((i, Row::Decode));
                        refs.push(cache);
                    }
                }
                Some(embeds) => {
                    if budget == 0 {
                        continue;
                    }
                    let take = (a.prompt_len - a.prefilled).min(budget);
                    let chunk = match embeds.narrow(0, a.prefilled, take) {
                        Ok(chunk) => chunk,
                        Err(e) => {
                            a.done = Some(Outcome::Failed(Error::Model(e.into())));
                            continue;
                        }
                    };
                    budget -= take;
                    inputs.push(StepInput::Embeds(chunk));
                    rows.push((i, Row::Prefill(take)));
                    if let Some(cache) = a.caches.first_mut() {
                        refs.push(cache);
                    }
                }
            }
        }
        if inputs.is_empty() {
            return;
        }
        self.stats
            .largest_step
            .fetch_max(inputs.len() as u32, Ordering::SeqCst);
        // A compute turn for the step: an image encode in this process (`blip2 serve all`)
        // runs between steps, one encoder layer at a time, instead of beside them.
        let turn = blip2_model::compute::turn();
        let logits = lm
            .forward_ragged(&inputs, &mut refs)
            .and_then(|t| Ok(t.flatten_all()?.to_vec1::<f32>()?));
        drop(turn);
        drop(refs);
        let mut logits = match logits {
            Ok(logits) => logits,
            Err(error) => {
                tracing::error!(%error, "batched step failed");
                let message = error.to_string();
                for &(i, _) in &rows {
                    if let Some(a) = self.active.get_mut(i) {
                        if a.done.is_none() {
                            a.done = Some(Outcome::Failed(Error::Worker(message.clone())));
                        }
                    }
                }
                return;
            }
        };
        let vocab = logits.len() / rows.len();
        // Group the rows per request, in order.
        let mut start = 0;
        while start < rows.len() {
            let i = rows[start].0;
            let mut end = start;
            while end < rows.len() && rows[end].0 == i {
                end += 1;
            }
            let block = &mut logits[start * vocab..end * vocab];
            let Some(a) = self.active.get_mut(i) else {
                start = end;
                continue;
            };
            match rows[start].1 {
                Row::Prefill(n) => {
                    a.prefilled += n;
                    if a.prefilled == a.prompt_len {
                        a.embeds = None;
                        if let Some(cache) = a.caches.first() {
                            self.prefix.insert(a.keys.clone(), cache.clone());
                        }
                        first_logits(a, block, vocab);
                    }
                }
                Row::Decode => decode_logits(a, block, vocab),
            }
            start = end;
        }
    }

    /// Encoder-decoder models: reads one waiting prompt through the encoder per step.
    fn prefill_encoder(&mut self, lm: &dyn LanguageModel) {
        let Some(a) = self
            .active
            .iter_mut()
            .find(|a| a.done.is_none() && a.is_prefilling())
        else {
            return;
        };
        let Some(embeds) = a.embeds.take() else {
            return;
        };
        let Some(cache) = a.caches.first_mut() else {
            return;
        };
        let turn = blip2_model::compute::turn();
        let logits = lm
            .prefill(&embeds, cache)
            .and_then(|t| Ok(t.flatten_all()?.to_vec1::<f32>()?));
        drop(turn);
        match logits {
            Ok(mut logits) => {
                a.prefilled = a.prompt_len;
                let vocab = logits.len();
                first_logits(a, &mut logits, vocab);
            }
            Err(e) => a.done = Some(Outcome::Failed(Error::Model(e))),
        }
    }

    /// Sends the final events of requests that left the batch and keeps their KV for later
    /// prompts. The figures are updated first, so a client that has its Finish sees the
    /// generation counted as completed and no longer running.
    fn retire(&mut self) {
        let mut leaving = Vec::new();
        let mut index = 0;
        while index < self.active.len() {
            if self.active[index].done.is_none() {
                index += 1;
                continue;
            }
            leaving.push(self.active.swap_remove(index));
        }
        if leaving.is_empty() {
            return;
        }
        self.stats
            .completed
            .fetch_add(leaving.len() as u64, Ordering::SeqCst);
        self.publish();
        for a in leaving {
            let span = a.span.clone();
            let _span = span.enter();
            match a.done {
                Some(Outcome::Failed(error)) => {
                    let _ = a.events.send(Event::Failed(error));
                }
                _ => finish(a, &mut self.prefix),
            }
        }
    }

    fn publish(&self) {
        let stats = &self.stats;
        stats
            .running
            .store(self.active.len() as u32, Ordering::SeqCst);
        stats
            .running_sequences
            .store(self.slots_used() as u32, Ordering::SeqCst);
        *stats.prefix.lock().unwrap_or_else(PoisonError::into_inner) = self.prefix.stats();
    }
}

/// Marks a request cancelled: it leaves at the end of this step.
fn cancel(a: &mut Active) {
    match &mut a.decoder {
        Decoder::Single(seq) => seq.cancel(),
        Decoder::Beam { seq, .. } => seq.cancel(),
    }
    a.done = Some(Outcome::Finished);
}

/// The prompt's logits: the first token, or the first step of a beam search.
fn first_logits(a: &mut Active, logits: &mut [f32], vocab: usize) {
    a.phase = tracing::Span::none();
    a.phase = tracing::info_span!(parent: &a.span, "decode");
    let beams = match &a.decoder {
        Decoder::Single(_) => None,
        Decoder::Beam { search, .. } => Some(search.num_beams()),
    };
    match beams {
        None => decode_logits(a, logits, vocab),
        Some(beams) => {
            let mut repeated = logits.repeat(beams);
            if let Some(cache) = a.caches.first().cloned() {
                a.caches = vec![cache; beams];
            }
            decode_logits(a, &mut repeated, vocab);
        }
    }
}

/// One step's logits for every sequence of a request: the next tokens, streamed.
fn decode_logits(a: &mut Active, logits: &mut [f32], vocab: usize) {
    match &mut a.decoder {
        Decoder::Single(seq) => match seq.step(logits) {
            Ok(result) => {
                let id = result.event.id;
                let listening = a.events.send(Event::Token(result.event)).is_ok();
                if result.finish.is_some() {
                    a.done = Some(Outcome::Finished);
                } else if !listening {
                    cancel(a);
                } else {
                    a.next = vec![id];
                }
            }
            Err(e) => a.done = Some(Outcome::Failed(Error::Model(e))),
        },
        Decoder::Beam {
            search,
            stop,
            skip_special_tokens,
            decode_error,
            tokenizer,
            ..
        } => {
            let tokenizer: &Tokenizer = (*tokenizer).borrow();
            let skip = *skip_special_tokens;
            let mut hits_stop = |ids: &[u32]| -> bool {
                if stop.is_empty() {
                    return false;
                }
                match tokenizer.decode(ids, skip) {
                    Ok(text) => stop.find(&text, 0).is_some(),
                    Err(e) => {
                        decode_error.get_or_insert_with(|| e.to_string());
                        false
                    }
                }
            };
            match search.step(logits, vocab, &mut hits_stop) {
                Ok(Some(step)) => {
                    a.caches = step
                        .parents
                        .iter()
                        .filter_map(|&p| a.caches.get(p).cloned())
                        .collect();
                    a.next = step.tokens;
                    if a.caches.len() != a.next.len() {
                        a.done = Some(Outcome::Failed(Error::Worker(
                            "beam search named a parent beam that does not exist".into(),
                        )));
                    }
                }
                Ok(None) => a.done = Some(Outcome::Finished),
                Err(e) => a.done = Some(Outcome::Failed(Error::Model(e))),
            }
        }
    }
}

/// The end of a request: a beam search streams its best sequence now; the result and the
/// prompt's KV (with the generated tokens fed so far) go to the prefix cache.
fn finish(a: Active, prefix: &mut PrefixCache) {
    let Active {
        events,
        prompt_len,
        keys,
        cached_prompt_tokens,
        caches,
        decoder,
        ..
    } = a;
    let output = match decoder {
        Decoder::Single(seq) => {
            if let (Some(cache), false) = (caches.first(), keys.is_empty()) {
                if cache.len > prompt_len {
                    let mut all = keys;
                    all.extend(seq.generated().iter().map(|&id| PosKey::Token(id)));
                    prefix.insert(all, cache.clone());
                }
            }
            seq.into_output(prompt_len)
        }
        Decoder::Beam {
            search,
            mut seq,
            decode_error,
            ..
        } => {
            if let Some(message) = decode_error {
                let error = blip2_model::Error::Tokenizer {
                    path: "tokenizer.json".into(),
                    message: format!("cannot decode token ids: {message}"),
                };
                let _ = events.send(Event::Failed(Error::Model(error)));
                return;
            }
            if seq.finish_reason().is_none() {
                let best = search.best();
                for (&id, &logprob) in best.tokens.iter().zip(&best.logprobs) {
                    match seq.push_token(id, logprob) {
                        Ok(result) => {
                            let listening = events.send(Event::Token(result.event)).is_ok();
                            if result.finish.is_some() {
                                break;
                            }
                            if !listening {
                                seq.cancel();
                                break;
                            }
                        }
                        Err(e) => {
                            let _ = events.send(Event::Failed(Error::Model(e)));
                            return;
                        }
                    }
                }
            }
            seq.into_output(prompt_len)
        }
    };
    if output.finish_reason != FinishReason::Cancelled {
        tracing::debug!(
            reason = output.finish_reason.as_str(),
            prompt_tokens = output.prompt_tokens,
            cached_prompt_tokens,
            generated_tokens = output.token_ids.len(),
            "generation ended"
        );
    }
    let _ = events.send(Event::Finished {
        output,
        cached_prompt_tokens,
    });
}
