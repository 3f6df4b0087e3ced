//! What the decoding loop and the LLM tier need from any language model (OPT or Flan-T5):
//! embed tokens, and run a *ragged* batch of sequences through the model, each with its own
//! explicit KV cache.
//!
//! A ragged forward stacks the new positions of all sequences into one `[sum_t, hidden]` matrix
//! for the linear layers (so a weight is read once per step for the whole batch) and runs attention
//! per sequence against its own cache. That lets prefill chunks of newcomers and decode steps of
//! running sequences share one step, with no padding and no mask arithmetic, and keeps every
//! sequence's numerics identical to a batch of one.

use candle_core::{Device, Tensor};

use crate::error::Result;

/// Keys and values of one attention layer for one sequence: `[heads, len, head_dim]` each.
#[derive(Debug, Clone)]
pub struct LayerKv {
    pub k: Tensor,
    pub v: Tensor,
}

/// The per-sequence state of a language model: self-attention KV per decoder layer and, for
/// encoder-decoder models, the cross-attention KV computed once from the encoder output.
///
/// Cloning is cheap (tensors are reference counted), which is how beam search forks a sequence.
#[derive(Debug, Clone, Default)]
pub struct SeqCache {
    /// Self-attention KV per decoder layer; `None` until the first forward.
    pub self_kv: Vec<Option<LayerKv>>,
    /// Cross-attention KV per decoder layer (encoder-decoder models only).
    pub cross_kv: Vec<LayerKv>,
    /// Number of decoder positions already in the cache.
    pub len: usize,
    /// Number of encoder positions (encoder-decoder models only).
    pub encoder_len: usize,
}

impl SeqCache {
    pub fn new(num_layers: usize) -> Self {
        SeqCache {
            self_kv: vec![None; num_layers],
            cross_kv: Vec::new(),
            len: 0,
            encoder_len: 0,
        }
    }

    /// Appends new keys/values `[heads, t, head_dim]` to layer `layer` and returns the full
    /// keys/values. Does not advance `len`: the model does that once per forward.
    pub fn append(&mut self, layer: usize, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        let entry = &mut self.self_kv[layer];
        let (k, v) = match entry.take() {
            None => (k.contiguous()?, v.contiguous()?),
            Some(prev) => (
                Tensor::cat(&[&prev.k, &k], 1)?,
                Tensor::cat(&[&prev.v, &v], 1)?,
            ),
        };
        *entry = Some(LayerKv {
            k: k.clone(),
            v: v.clone(),
        });
        Ok((k, v))
    }

    /// The first `len` decoder positions of this cache (views, no copy): how a prefix cache
    /// hands a shorter shared beginning to a new sequence. Decoder-only caches only: an
    /// encoder-decoder cache's cross-attention KV belongs to one whole encoder input.
    pub fn truncated(&self, len: usize) -> Result<SeqCache> {
        if len > self.len || !self.cross_kv.is_empty() {
            return Err(crate::Error::InvalidInput(format!(
                "cannot cut a cache of {} positions{} to {len}",
                self.len,
                if self.cross_kv.is_empty() {
                    ""
                } else {
                    " with cross-attention"
                }
            )));
        }
        let self_kv = self
            .self_kv
            .iter()
            .map(|kv| match kv {
                Some(kv) if len > 0 => Ok(Some(LayerKv {
                    k: kv.k.narrow(1, 0, len)?,
                    v: kv.v.narrow(1, 0, len)?,
                })),
                _ => Ok(None),
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(SeqCache {
            self_kv,
            cross_kv: Vec::new(),
            len,
            encoder_len: 0,
        })
    }

    /// Bytes held by this cache's tensors.
    pub fn size_in_bytes(&self) -> usize {
        let layer_bytes =
            |kv: &LayerKv| (kv.k.elem_count() + kv.v.elem_count()) * kv.k.dtype().size_in_bytes();
        self.self_kv
            .iter()
            .flatten()
            .map(layer_bytes)
            .sum::<usize>()
            + self.cross_kv.iter().map(layer_bytes).sum::<usize>()
    }
}

/// Rows `ids` of an embedding table `[vocab, hidden]`, refusing ids outside the vocabulary.
pub(crate) fn embedding_rows(table: &Tensor, ids: &[u32]) -> Result<Tensor> {
    let vocab = table.dim(0)?;
    if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
        return Err(crate::error::Error::InvalidInput(format!(
            "token id {bad} is outside the vocabulary ({vocab} entries)"
        )));
    }
    let ids = Tensor::new(ids, table.device())?;
    Ok(table.index_select(&ids, 0)?)
}

/// Token ids and sizes a decoding loop needs to know about a language model.
#[derive(Debug, Clone)]
pub struct LmInfo {
    pub hidden_size: usize,
    pub vocab_size: usize,
    /// Longest sequence the model accepts (OPT: learned positions; T5: unlimited in principle,
    /// `n_positions` by convention).
    pub max_positions: usize,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
    /// Encoder-decoder models: the first decoder input; it is not part of the generated ids.
    pub decoder_start_token_id: Option<u32>,
    pub is_encoder_decoder: bool,
}

/// One sequence's share of a ragged forward.
pub enum StepInput {
    /// New positions given as embeddings `[t, hidden]` (prompt with soft prompts, or a chunk of it).
    Embeds(Tensor),
    /// New positions given as token ids.
    Tokens(Vec<u32>),
}

/// A language model driven by input embeddings with explicit per-sequence caches.
pub trait LanguageModel: Send + Sync {
    fn info(&self) -> &LmInfo;

    fn device(&self) -> &Device;

    /// Token embeddings `[t, hidden]` in the model's compute dtype.
    fn embed_tokens(&self, ids: &[u32]) -> Result<Tensor>;

    /// A fresh, empty cache for one sequence.
    fn new_cache(&self) -> SeqCache;

    /// Starts a sequence from its prompt embeddings `[t, hidden]` (soft prompts already in place)
    /// and returns the f32 logits `[vocab]` of the first generated token.
    ///
    /// Decoder-only models run the prompt through the decoder. Encoder-decoder models run the
    /// prompt through the encoder, keep its cross-attention KV in the cache, and feed
    /// `decoder_start_token_id` to the decoder.
    fn prefill(&self, prompt_embeds: &Tensor, cache: &mut SeqCache) -> Result<Tensor>;

    /// Runs new decoder positions of several sequences in one forward. Returns f32 logits
    /// `[n, vocab]` of each sequence's last new position, in input order.
    fn forward_ragged(&self, inputs: &[StepInput], caches: &mut [&mut SeqCache]) -> Result<Tensor>;

    /// One decode step: one token per sequence. Returns f32 logits `[n, vocab]`.
    fn step(&self, tokens: &[u32], caches: &mut [&mut SeqCache]) -> Result<Tensor> {
        let inputs: Vec<StepInput> = tokens.iter().map(|&t| StepInput::Tokens(vec![t])).collect();
        self.forward_ragged(&inputs, caches)
    }
}
