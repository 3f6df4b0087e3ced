//! What the decoding loop and the LLM tier need from any language model (OPT or Flan-T5):
//! embed tokens, and run a *ragged* batch of sequences through the model, each with its own
//! explicit KV cache.
//!
//! A ragged forward stacks the new positions of all sequences into one `[sum_t, hidden]` matrix
//! for the linear layers (so a weight is read once per step for the whole batch) and runs attention
//! per sequence against its own cache. That lets prefill chunks of newcomers and decode steps of
//! running sequences share one step, with no padding and no mask arithmetic, and keeps every
//! sequence's numerics identical to a batch of one.

use std::sync::Arc;

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
/// A clone shares the growable KV stores behind `self_kv` and copies them on its next append
/// (copy on write), so forks and prefix-cache entries never see each other's new positions.
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
    /// The growable buffers behind `self_kv`, per layer (see [`KvStore`]).
    stores: Vec<Option<KvStore>>,
}

/// Positions a KV store grows by beyond what it must hold, so that decoding appends in place
/// for this many steps before the next copy (instead of copying the whole cache every step, as
/// concatenation would).
const KV_HEADROOM: usize = 64;

/// The buffers behind one layer's self-attention KV: `[heads, capacity, head_dim]` each, of
/// which the first `len` positions are filled. `self_kv[layer]` holds views of them, `len` long.
#[derive(Debug, Clone)]
struct KvStore {
    k: Tensor,
    v: Tensor,
    len: usize,
    /// The id of the key view last handed out, so a `self_kv` entry replaced from outside is
    /// noticed (the store is then replaced, never written under someone else's tensor).
    view: candle_core::TensorId,
    /// Shared by clones of the cache: a store is written in place only while it has one owner.
    owner: Arc<()>,
}

impl KvStore {
    fn capacity(&self) -> usize {
        self.k.dim(1).unwrap_or(0)
    }
}

/// One layer's KV of one sequence as f32 slices, for decode kernels that read it in place:
/// `[heads, capacity, head_dim]` each, the first `len` positions filled.
pub struct KvSlices<'a> {
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub capacity: usize,
    pub len: usize,
}

/// Read access to one layer's KV buffers (see [`SeqCache::kv_read`]); holds them locked for
/// reading while it lives.
pub struct KvRead<'a> {
    k: candle_core::StorageRef<'a>,
    v: candle_core::StorageRef<'a>,
    k_start: usize,
    v_start: usize,
    capacity: usize,
    len: usize,
}

impl KvRead<'_> {
    /// The buffers as f32 slices; `None` unless they are f32 on the CPU.
    pub fn slices(&self) -> Option<KvSlices<'_>> {
        let (candle_core::Storage::Cpu(k), candle_core::Storage::Cpu(v)) = (&*self.k, &*self.v)
        else {
            return None;
        };
        Some(KvSlices {
            k: k.as_slice::<f32>().ok()?.get(self.k_start..)?,
            v: v.as_slice::<f32>().ok()?.get(self.v_start..)?,
            capacity: self.capacity,
            len: self.len,
        })
    }
}

impl SeqCache {
    pub fn new(num_layers: usize) -> Self {
        SeqCache {
            self_kv: vec![None; num_layers],
            cross_kv: Vec::new(),
            len: 0,
            encoder_len: 0,
            stores: Vec::new(),
        }
    }

    /// Appends new keys/values `[heads, t, head_dim]` to layer `layer` and returns the full
    /// keys/values. Does not advance `len`: the model does that once per forward.
    ///
    /// The positions go into buffers with room to spare ([`KV_HEADROOM`]), written in place
    /// while this cache is their only owner, so a decode step copies only its new position.
    pub fn append(&mut self, layer: usize, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        let (heads, t, head_dim) = k.dims3()?;
        if v.dims3()? != (heads, t, head_dim) {
            return Err(crate::Error::internal(format!(
                "keys {:?} and values {:?} differ in shape",
                k.shape(),
                v.shape()
            )));
        }
        let store = self.reserve(layer, &k, t)?;
        store.k.slice_set(&k.contiguous()?, 1, store.len)?;
        store.v.slice_set(&v.contiguous()?, 1, store.len)?;
        store.len += t;
        let k_all = store.k.narrow(1, 0, store.len)?;
        let v_all = store.v.narrow(1, 0, store.len)?;
        store.view = k_all.id();
        self.self_kv[layer] = Some(LayerKv {
            k: k_all.clone(),
            v: v_all.clone(),
        });
        Ok((k_all, v_all))
    }

    /// The store of layer `layer`, ready to take `t` positions like `like` (`[heads, _, d]`) in
    /// place: the current one when this cache owns it alone, it backs `self_kv[layer]` and has
    /// room; else a new one holding a copy of `self_kv[layer]`.
    fn reserve(&mut self, layer: usize, like: &Tensor, t: usize) -> Result<&mut KvStore> {
        let layers = self.self_kv.len();
        if layer >= layers {
            return Err(crate::Error::internal(format!(
                "layer {layer} of a cache of {layers} layers"
            )));
        }
        if self.stores.len() < layers {
            self.stores.resize(layers, None);
        }
        let (heads, _, head_dim) = like.dims3()?;
        let prev = self.self_kv[layer].clone();
        let prev_len = match &prev {
            Some(p) => p.k.dim(1)?,
            None => 0,
        };
        let current = self.stores[layer].take().filter(|s| {
            prev.as_ref().is_some_and(|p| {
                Arc::strong_count(&s.owner) == 1
                    && s.view == p.k.id()
                    && s.len == prev_len
                    && prev_len + t <= s.capacity()
                    && s.k.dtype() == like.dtype()
                    && s.k.dims3().ok() == Some((heads, s.capacity(), head_dim))
            })
        });
        let store = match current {
            Some(store) => store,
            None => {
                let capacity = (prev_len + t + KV_HEADROOM).next_multiple_of(KV_HEADROOM);
                let shape = (heads, capacity, head_dim);
                let k = Tensor::zeros(shape, like.dtype(), like.device())?;
                let v = Tensor::zeros(shape, like.dtype(), like.device())?;
                if let Some(p) = &prev {
                    if prev_len > 0 {
                        k.slice_set(&p.k.to_dtype(like.dtype())?.contiguous()?, 1, 0)?;
                        v.slice_set(&p.v.to_dtype(like.dtype())?.contiguous()?, 1, 0)?;
                    }
                }
                KvStore {
                    view: k.id(),
                    k,
                    v,
                    len: prev_len,
                    owner: Arc::new(()),
                }
            }
        };
        Ok(self.stores[layer].insert(store))
    }

    /// Layer `layer`'s KV for reading in place (see [`KvRead::slices`]); `None` when the layer
    /// has no store backing its current KV (the caller then attends through tensors).
    pub fn kv_read(&self, layer: usize) -> Option<KvRead<'_>> {
        let store = self.stores.get(layer)?.as_ref()?;
        let view = self.self_kv.get(layer)?.as_ref()?;
        if store.view != view.k.id() || !store.k.is_contiguous() || !store.v.is_contiguous() {
            return None;
        }
        let (k, kl) = store.k.storage_and_layout();
        let (v, vl) = store.v.storage_and_layout();
        Some(KvRead {
            k,
            v,
            k_start: kl.start_offset(),
            v_start: vl.start_offset(),
            capacity: store.capacity(),
            len: store.len,
        })
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
            stores: Vec::new(),
        })
    }

    /// Bytes held by this cache's tensors (a layer's whole KV buffer, spare room included).
    pub fn size_in_bytes(&self) -> usize {
        let layer_bytes =
            |kv: &LayerKv| (kv.k.elem_count() + kv.v.elem_count()) * kv.k.dtype().size_in_bytes();
        let self_bytes: usize = self
            .self_kv
            .iter()
            .enumerate()
            .map(|(layer, kv)| {
                let Some(kv) = kv else { return 0 };
                match self.stores.get(layer).and_then(|s| s.as_ref()) {
                    Some(s) if s.view == kv.k.id() => {
                        (s.k.elem_count() + s.v.elem_count()) * s.k.dtype().size_in_bytes()
                    }
                    _ => layer_bytes(kv),
                }
            })
            .sum();
        self_bytes + self.cross_kv.iter().map(layer_bytes).sum::<usize>()
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

#[cfg(test)]
mod tests {
    use candle_core::{Device, IndexOp, Tensor};

    use super::*;

    /// `[heads, t, d]` keys whose every value is `base + position`.
    fn rows(base: f32, t: usize) -> Tensor {
        let data: Vec<f32> = (0..2 * t * 3)
            .map(|i| base + ((i / 3) % t) as f32)
            .collect();
        Tensor::from_vec(data, (2, t, 3), &Device::Cpu).unwrap()
    }

    fn positions(cache: &SeqCache, layer: usize) -> Vec<f32> {
        let kv = cache.self_kv[layer].as_ref().unwrap();
        kv.k.i((0, .., 0)).unwrap().to_vec1().unwrap()
    }

    fn append(cache: &mut SeqCache, base: f32, t: usize) {
        cache.append(0, rows(base, t), rows(base, t)).unwrap();
        cache.len += t;
    }

    #[test]
    fn appends_past_the_headroom_keep_every_position() {
        let mut cache = SeqCache::new(1);
        append(&mut cache, 0.0, 5);
        for step in 0..2 * KV_HEADROOM {
            append(&mut cache, 100.0 * (step + 1) as f32, 1);
        }
        let got = positions(&cache, 0);
        assert_eq!(got.len(), 5 + 2 * KV_HEADROOM);
        assert_eq!(&got[..5], &[0.0, 1.0, 2.0, 3.0, 4.0]);
        for step in 0..2 * KV_HEADROOM {
            assert_eq!(got[5 + step], 100.0 * (step + 1) as f32);
        }
        let read = cache.kv_read(0).unwrap();
        let slices = read.slices().unwrap();
        assert_eq!(slices.len, 5 + 2 * KV_HEADROOM);
        assert!(slices.capacity >= slices.len);
        // The whole buffer is accounted for, spare room included.
        assert_eq!(
            cache.size_in_bytes(),
            2 * 2 * slices.capacity * 3 * std::mem::size_of::<f32>()
        );
    }

    #[test]
    fn a_clone_never_sees_the_other_clones_positions() {
        let mut a = SeqCache::new(1);
        append(&mut a, 0.0, 3);
        let mut b = a.clone();
        let prefix = a.truncated(2).unwrap();
        append(&mut a, 10.0, 1);
        append(&mut b, 20.0, 1);
        let mut c = prefix.clone();
        append(&mut c, 30.0, 1);
        assert_eq!(positions(&a, 0), vec![0.0, 1.0, 2.0, 10.0]);
        assert_eq!(positions(&b, 0), vec![0.0, 1.0, 2.0, 20.0]);
        assert_eq!(positions(&prefix, 0), vec![0.0, 1.0]);
        assert_eq!(positions(&c, 0), vec![0.0, 1.0, 30.0]);
        // And a second append still lands in each one's own buffer.
        append(&mut a, 11.0, 1);
        append(&mut b, 21.0, 1);
        assert_eq!(positions(&a, 0), vec![0.0, 1.0, 2.0, 10.0, 11.0]);
        assert_eq!(positions(&b, 0), vec![0.0, 1.0, 2.0, 20.0, 21.0]);
    }

    #[test]
    fn a_replaced_entry_is_never_written_under() {
        let mut cache = SeqCache::new(1);
        append(&mut cache, 0.0, 2);
        let outside = rows(50.0, 2);
        cache.self_kv[0] = Some(LayerKv {
            k: outside.clone(),
            v: outside.clone(),
        });
        assert!(cache.kv_read(0).is_none());
        append(&mut cache, 60.0, 1);
        assert_eq!(positions(&cache, 0), vec![50.0, 51.0, 60.0]);
        let untouched: Vec<f32> = outside.i((0, .., 0)).unwrap().to_vec1().unwrap();
        assert_eq!(untouched, vec![50.0, 51.0]);
    }
}
