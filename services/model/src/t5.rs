//! Flan-T5 (Chung et al. 2022), the encoder-decoder language model of the BLIP-2 Flan-T5
//! checkpoints, driven by input embeddings with explicit per-sequence KV caches.
//!
//! Follows transformers 5.24's `models/t5/modeling_t5.py`: pre-norm blocks with `T5LayerNorm`
//! (RMS norm, variance in f32), attention without `1/sqrt(d)` scaling, a relative position bias
//! held by block 0 of each stack and reused by the later blocks (bidirectional buckets in the
//! encoder, unidirectional in the decoder, none in cross-attention), the gated (`wi_0`, `wi_1`)
//! or plain (`wi`) feed-forward, a final norm per stack and `lm_head` (the file's
//! `lm_head.weight`, else `shared`). As `from_pretrained` does, a float16 model keeps the FFN's
//! `wo` in f32 (`_keep_in_fp32_modules = ["wo"]`), which turns the residual stream f32 from the
//! first FFN on, and `T5Block`'s clamp of float16 hidden states is ported.

use candle_core::{DType, Device, IndexOp, Module, Tensor, D};
use candle_nn::VarBuilder;

use crate::linear::{Linear, WeightFormat};

use crate::config::{Activation, T5Config};
use crate::error::{Error, Result};
use crate::llm::{LanguageModel, LayerKv, LmInfo, SeqCache, StepInput};
use crate::opt::causal_mask;

/// `T5Attention._relative_position_bucket` for one `relative_position = key_pos - query_pos`.
///
/// The log-spaced part is computed as the reference does: in f32, with the divisor's log taken
/// in f64 and rounded to f32, truncated toward zero. Boundary distances (16, 32 and 64 with
/// 32 buckets, bidirectional) land on exact integers, so the rounding order matters.
pub(crate) fn relative_position_bucket(
    relative_position: i64,
    bidirectional: bool,
    num_buckets: usize,
    max_distance: usize,
) -> u32 {
    let mut num_buckets = num_buckets as i64;
    let mut bucket = 0;
    let distance = if bidirectional {
        num_buckets /= 2;
        if relative_position > 0 {
            bucket += num_buckets;
        }
        relative_position.abs()
    } else {
        -relative_position.min(0)
    };
    let max_exact = num_buckets / 2;
    if distance < max_exact {
        return (bucket + distance) as u32;
    }
    let log_ratio = (max_distance as f64 / max_exact as f64).ln() as f32;
    let large = ((distance as f32 / max_exact as f32).ln() / log_ratio
        * (num_buckets - max_exact) as f32) as i64;
    (bucket + (max_exact + large).min(num_buckets - 1)) as u32
}

/// `relative_attention_bias` of a stack's block 0 (`nn.Embedding(num_buckets, heads)`).
struct RelativeBias {
    embedding: Tensor,
    bidirectional: bool,
    num_buckets: usize,
    max_distance: usize,
}

impl RelativeBias {
    fn new(cfg: &T5Config, bidirectional: bool, vb: VarBuilder) -> candle_core::Result<Self> {
        let embedding = vb.get(
            (cfg.relative_attention_num_buckets, cfg.num_heads),
            "relative_attention_bias.weight",
        )?;
        Ok(Self {
            embedding,
            bidirectional,
            num_buckets: cfg.relative_attention_num_buckets,
            max_distance: cfg.relative_attention_max_distance,
        })
    }

    /// `T5Attention.compute_bias`: `[heads, q_len, k_len]` for queries at positions
    /// `past..past + q_len` and keys at `0..k_len`.
    fn compute_bias(&self, q_len: usize, k_len: usize, past: usize) -> candle_core::Result<Tensor> {
        let (bidirectional, buckets, max_distance) =
            (self.bidirectional, self.num_buckets, self.max_distance);
        let ids: Vec<u32> = (0..q_len)
            .flat_map(|i| {
                (0..k_len).map(move |j| {
                    let relative = j as i64 - (past + i) as i64;
                    relative_position_bucket(relative, bidirectional, buckets, max_distance)
                })
            })
            .collect();
        let ids = Tensor::from_vec(ids, q_len * k_len, self.embedding.device())?;
        let heads = self.embedding.dim(1)?;
        self.embedding
            .index_select(&ids, 0)?
            .reshape((q_len, k_len, heads))?
            .permute((2, 0, 1))?
            .contiguous()
    }
}

/// `T5LayerNorm`: `weight * x / sqrt(mean(x^2) + eps)`, computed in f32 and cast to the
/// weight's dtype before the multiplication.
struct T5LayerNorm {
    weight: Tensor,
    eps: f64,
}

impl T5LayerNorm {
    fn new(cfg: &T5Config, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            weight: vb.get(cfg.d_model, "weight")?,
            eps: cfg.layer_norm_epsilon,
        })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let xs = xs.to_dtype(DType::F32)?;
        let variance = xs.sqr()?.mean_keepdim(D::Minus1)?;
        let xs = xs.broadcast_mul(&(variance + self.eps)?.sqrt()?.recip()?)?;
        xs.to_dtype(self.weight.dtype())?
            .broadcast_mul(&self.weight)
    }
}

/// `T5DenseGatedActDense` (`wi_0`, `wi_1`, `wo`) or `T5DenseActDense` (`wi`, `wo`).
struct DenseReluDense {
    wi_0: Linear,
    wi_1: Option<Linear>,
    wo: Linear,
    act: Activation,
}

impl DenseReluDense {
    fn new(cfg: &T5Config, vb: VarBuilder, format: Option<WeightFormat>) -> Result<Self> {
        let (d_model, d_ff) = (cfg.d_model, cfg.d_ff);
        let linear = |i, o, vb| crate::linear::linear_in(i, o, false, format, vb);
        let (wi_0, wi_1) = if cfg.is_gated_act() {
            (
                linear(d_model, d_ff, vb.pp("wi_0"))?,
                Some(linear(d_model, d_ff, vb.pp("wi_1"))?),
            )
        } else {
            (linear(d_model, d_ff, vb.pp("wi"))?, None)
        };
        // `_keep_in_fp32_modules = ["wo"]`: from_pretrained keeps `wo` in f32 for float16 only.
        let wo_vb = if vb.dtype() == DType::F16 {
            vb.pp("wo").to_dtype(DType::F32)
        } else {
            vb.pp("wo")
        };
        Ok(Self {
            wi_0,
            wi_1,
            wo: linear(d_ff, d_model, wo_vb)?,
            act: cfg.activation()?,
        })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let mut hidden = self.act.forward(&self.wi_0.forward(xs)?)?;
        if let Some(wi_1) = &self.wi_1 {
            hidden = (hidden * wi_1.forward(xs)?)?;
        }
        // The reference casts the input of `wo` to `wo`'s dtype.
        self.wo.forward(&self.wo.cast_input(&hidden)?)
    }
}

/// `T5Attention` without its cache logic: the projections and the head layout.
struct T5Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    n_heads: usize,
    d_kv: usize,
}

impl T5Attention {
    fn new(
        cfg: &T5Config,
        vb: VarBuilder,
        format: Option<WeightFormat>,
    ) -> candle_core::Result<Self> {
        let inner = cfg.num_heads * cfg.d_kv;
        let linear = |i, o, name| crate::linear::linear_in(i, o, false, format, vb.pp(name));
        Ok(Self {
            q: linear(cfg.d_model, inner, "q")?,
            k: linear(cfg.d_model, inner, "k")?,
            v: linear(cfg.d_model, inner, "v")?,
            o: linear(inner, cfg.d_model, "o")?,
            n_heads: cfg.num_heads,
            d_kv: cfg.d_kv,
        })
    }

    /// `[t, heads * d_kv]` rows `offset..offset + t` of a projection -> `[heads, t, d_kv]`.
    fn split_heads(&self, xs: &Tensor, offset: usize, t: usize) -> candle_core::Result<Tensor> {
        xs.narrow(0, offset, t)?
            .reshape((t, self.n_heads, self.d_kv))?
            .transpose(0, 1)?
            .contiguous()
    }

    /// Keys and values of the encoder output for cross-attention, `[heads, t_enc, d_kv]`.
    fn cross_kv(&self, encoder_out: &Tensor) -> candle_core::Result<LayerKv> {
        let t = encoder_out.dim(0)?;
        Ok(LayerKv {
            k: self.split_heads(&self.k.forward(encoder_out)?, 0, t)?,
            v: self.split_heads(&self.v.forward(encoder_out)?, 0, t)?,
        })
    }
}

/// `eager_attention_forward` with T5's scaling of 1: `softmax(q k^T + bias + mask) v`, the
/// scores in the compute dtype, the mask and softmax in f32. Returns `[t, heads * d_kv]`.
fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
    mask: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let mut scores = q.matmul(&k.t()?)?;
    if let Some(bias) = bias {
        scores = scores.broadcast_add(bias)?;
    }
    let mut scores = scores.to_dtype(DType::F32)?;
    if let Some(mask) = mask {
        scores = scores.broadcast_add(mask)?;
    }
    let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(q.dtype())?;
    let (heads, t, d_kv) = q.dims3()?;
    probs.matmul(v)?.transpose(0, 1)?.reshape((t, heads * d_kv))
}

/// `hidden + sublayer` with torch's type promotion (a float16 stream meets the f32 output of
/// `wo`), then `T5Block`'s clamp of float16 hidden states: when any value is infinite, all are
/// clamped to `±(f16::MAX - 1000)`, which rounds to ±64512 in float16.
fn residual(hidden: &Tensor, sublayer: &Tensor) -> candle_core::Result<Tensor> {
    let sum = if hidden.dtype() == sublayer.dtype() {
        (hidden + sublayer)?
    } else {
        (hidden.to_dtype(DType::F32)? + sublayer.to_dtype(DType::F32)?)?
    };
    if sum.dtype() != DType::F16 {
        return Ok(sum);
    }
    let max_abs = sum
        .abs()?
        .max_all()?
        .to_dtype(DType::F32)?
        .to_scalar::<f32>()?;
    if max_abs.is_infinite() {
        let limit = f32::from(half::f16::MAX) - 1000.0;
        sum.clamp(-limit, limit)
    } else {
        Ok(sum)
    }
}

/// An encoder `T5Block`: `layer.0` (SelfAttention), `layer.1` (DenseReluDense).
struct EncoderBlock {
    self_attention: T5Attention,
    self_attention_norm: T5LayerNorm,
    ff: DenseReluDense,
    ff_norm: T5LayerNorm,
}

impl EncoderBlock {
    fn new(cfg: &T5Config, vb: VarBuilder, format: Option<WeightFormat>) -> Result<Self> {
        Ok(Self {
            self_attention: T5Attention::new(cfg, vb.pp("layer.0.SelfAttention"), format)?,
            self_attention_norm: T5LayerNorm::new(cfg, vb.pp("layer.0.layer_norm"))?,
            ff: DenseReluDense::new(cfg, vb.pp("layer.1.DenseReluDense"), format)?,
            ff_norm: T5LayerNorm::new(cfg, vb.pp("layer.1.layer_norm"))?,
        })
    }

    /// One sequence `[t, d_model]`, attending bidirectionally with `bias` `[heads, t, t]`.
    fn forward(&self, xs: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
        let attn = &self.self_attention;
        let h = self.self_attention_norm.forward(xs)?;
        let t = h.dim(0)?;
        let q = attn.split_heads(&attn.q.forward(&h)?, 0, t)?;
        let k = attn.split_heads(&attn.k.forward(&h)?, 0, t)?;
        let v = attn.split_heads(&attn.v.forward(&h)?, 0, t)?;
        let out = attn.o.forward(&attend(&q, &k, &v, Some(bias), None)?)?;
        let xs = residual(xs, &out)?;
        residual(&xs, &self.ff.forward(&self.ff_norm.forward(&xs)?)?)
    }
}

/// The per-sequence layout of a ragged decoder forward: `lengths[i]` new rows of sequence `i`,
/// its self-attention position bias and causal mask (shared by all blocks, as block 0's bias is).
struct RaggedBatch {
    lengths: Vec<usize>,
    biases: Vec<Tensor>,
    masks: Vec<Option<Tensor>>,
}

/// A decoder `T5Block`: `layer.0` (SelfAttention), `layer.1` (EncDecAttention),
/// `layer.2` (DenseReluDense).
struct DecoderBlock {
    self_attention: T5Attention,
    self_attention_norm: T5LayerNorm,
    enc_dec_attention: T5Attention,
    enc_dec_attention_norm: T5LayerNorm,
    ff: DenseReluDense,
    ff_norm: T5LayerNorm,
}

impl DecoderBlock {
    fn new(cfg: &T5Config, vb: VarBuilder, format: Option<WeightFormat>) -> Result<Self> {
        Ok(Self {
            self_attention: T5Attention::new(cfg, vb.pp("layer.0.SelfAttention"), format)?,
            self_attention_norm: T5LayerNorm::new(cfg, vb.pp("layer.0.layer_norm"))?,
            enc_dec_attention: T5Attention::new(cfg, vb.pp("layer.1.EncDecAttention"), format)?,
            enc_dec_attention_norm: T5LayerNorm::new(cfg, vb.pp("layer.1.layer_norm"))?,
            ff: DenseReluDense::new(cfg, vb.pp("layer.2.DenseReluDense"), format)?,
            ff_norm: T5LayerNorm::new(cfg, vb.pp("layer.2.layer_norm"))?,
        })
    }

    /// `xs`: the new positions of all sequences, stacked `[sum_t, d_model]`.
    fn forward(
        &self,
        xs: &Tensor,
        batch: &RaggedBatch,
        caches: &mut [&mut SeqCache],
        layer: usize,
    ) -> Result<Tensor> {
        let attn = &self.self_attention;
        let h = self.self_attention_norm.forward(xs)?;
        let (q, k, v) = (
            attn.q.forward(&h)?,
            attn.k.forward(&h)?,
            attn.v.forward(&h)?,
        );
        let mut outputs = Vec::with_capacity(caches.len());
        let mut offset = 0;
        for (i, cache) in caches.iter_mut().enumerate() {
            let t = batch.lengths[i];
            let (k_all, v_all) = cache.append(
                layer,
                attn.split_heads(&k, offset, t)?,
                attn.split_heads(&v, offset, t)?,
            )?;
            let q_i = attn.split_heads(&q, offset, t)?;
            let mask = batch.masks[i].as_ref();
            outputs.push(attend(&q_i, &k_all, &v_all, Some(&batch.biases[i]), mask)?);
            offset += t;
        }
        let xs = residual(xs, &attn.o.forward(&Tensor::cat(&outputs, 0)?)?)?;

        let attn = &self.enc_dec_attention;
        let q = attn.q.forward(&self.enc_dec_attention_norm.forward(&xs)?)?;
        let mut outputs = Vec::with_capacity(caches.len());
        let mut offset = 0;
        for (i, cache) in caches.iter().enumerate() {
            let t = batch.lengths[i];
            let (q_i, kv) = (attn.split_heads(&q, offset, t)?, &cache.cross_kv[layer]);
            outputs.push(attend(&q_i, &kv.k, &kv.v, None, None)?);
            offset += t;
        }
        let xs = residual(&xs, &attn.o.forward(&Tensor::cat(&outputs, 0)?)?)?;

        let ff = self.ff.forward(&self.ff_norm.forward(&xs)?)?;
        Ok(residual(&xs, &ff)?)
    }
}

/// `T5ForConditionalGeneration` as BLIP-2 drives it.
pub struct T5 {
    shared: Tensor,
    encoder_blocks: Vec<EncoderBlock>,
    encoder_bias: RelativeBias,
    encoder_final_layer_norm: T5LayerNorm,
    decoder_blocks: Vec<DecoderBlock>,
    decoder_bias: RelativeBias,
    decoder_final_layer_norm: T5LayerNorm,
    lm_head: Linear,
    /// `d_model^-0.5` when `scale_decoder_outputs` (T5 v1.0-style tied checkpoints).
    output_scale: Option<f64>,
    info: LmInfo,
    device: Device,
    dtype: DType,
}

impl T5 {
    /// `vb` is rooted at `language_model` (weights `shared`, `encoder.*`, `decoder.*`,
    /// `lm_head`); its dtype is the compute dtype.
    pub fn new(cfg: &T5Config, vb: VarBuilder) -> Result<Self> {
        Self::with_weights(cfg, vb, None)
    }

    /// As [`T5::new`], with every projection (and `lm_head`) stored in `format` (`None`: as
    /// loaded); embeddings, norms and relative biases stay in the load dtype.
    pub fn with_weights(
        cfg: &T5Config,
        vb: VarBuilder,
        format: Option<WeightFormat>,
    ) -> Result<Self> {
        let (vocab, d_model) = (cfg.vocab_size, cfg.d_model);
        // `encoder.embed_tokens` / `decoder.embed_tokens` are tied to `shared` and usually absent;
        // from_pretrained ties to whichever of them the file has.
        let shared_name = [
            "shared.weight",
            "encoder.embed_tokens.weight",
            "decoder.embed_tokens.weight",
        ]
        .into_iter()
        .find(|name| vb.contains_tensor(name))
        .unwrap_or("shared.weight");
        let shared = vb.get((vocab, d_model), shared_name)?;

        let encoder = vb.pp("encoder");
        let encoder_blocks = (0..cfg.num_layers)
            .map(|i| EncoderBlock::new(cfg, encoder.pp(format!("block.{i}")), format))
            .collect::<Result<Vec<_>>>()?;
        let decoder = vb.pp("decoder");
        let decoder_blocks = (0..cfg.num_decoder_layers())
            .map(|i| DecoderBlock::new(cfg, decoder.pp(format!("block.{i}")), format))
            .collect::<Result<Vec<_>>>()?;
        // Block 0's self-attention holds the stack's relative position bias.
        let bias_owner = "block.0.layer.0.SelfAttention";

        // transformers 5.x always ties `lm_head` to `shared`, except when the file holds a
        // different `lm_head.weight` (Flan-T5); scaling follows `scale_decoder_outputs`.
        let lm_head = if vb.contains_tensor("lm_head.weight") {
            vb.get((vocab, d_model), "lm_head.weight")?
        } else {
            shared.clone()
        };
        let info = LmInfo {
            hidden_size: d_model,
            vocab_size: vocab,
            max_positions: cfg.n_positions,
            bos_token_id: None,
            eos_token_id: cfg.eos_token_id,
            pad_token_id: cfg.pad_token_id,
            decoder_start_token_id: Some(cfg.decoder_start_token_id()),
            is_encoder_decoder: true,
        };
        Ok(Self {
            encoder_bias: RelativeBias::new(cfg, true, encoder.pp(bias_owner))?,
            encoder_final_layer_norm: T5LayerNorm::new(cfg, encoder.pp("final_layer_norm"))?,
            decoder_bias: RelativeBias::new(cfg, false, decoder.pp(bias_owner))?,
            decoder_final_layer_norm: T5LayerNorm::new(cfg, decoder.pp("final_layer_norm"))?,
            shared,
            encoder_blocks,
            decoder_blocks,
            lm_head: Linear::with_format(lm_head, None, format)?,
            output_scale: cfg
                .scale_decoder_outputs()
                .then(|| (d_model as f64).powf(-0.5)),
            info,
            device: vb.device().clone(),
            dtype: vb.dtype(),
        })
    }

    fn check_width(&self, embeds: &Tensor) -> Result<usize> {
        let (t, width) = embeds.dims2()?;
        if width != self.info.hidden_size {
            return Err(Error::InvalidInput(format!(
                "input embeddings have width {width}, the language model expects {}",
                self.info.hidden_size
            )));
        }
        if t == 0 {
            return Err(Error::InvalidInput("a sequence has no positions".into()));
        }
        Ok(t)
    }

    /// The encoder stack (`T5Stack`, not causal, no padding): `[t, d_model]` input embeddings
    /// to the encoder output `[t, d_model]` in the compute dtype.
    pub fn encode(&self, embeds: &Tensor) -> Result<Tensor> {
        let t = self.check_width(embeds)?;
        let mut xs = embeds.to_dtype(self.dtype)?;
        let bias = self.encoder_bias.compute_bias(t, t, 0)?;
        for block in &self.encoder_blocks {
            xs = block.forward(&xs, &bias)?;
        }
        Ok(self.encoder_final_layer_norm.forward(&xs)?)
    }

    fn check_cache(&self, cache: &SeqCache) -> Result<()> {
        let layers = self.decoder_blocks.len();
        if cache.self_kv.len() != layers || cache.cross_kv.len() != layers {
            return Err(Error::InvalidInput(format!(
                "T5 cache has {} self / {} cross-attention layers, expected {layers} each \
                 (a decoder step needs a cache started by prefill)",
                cache.self_kv.len(),
                cache.cross_kv.len()
            )));
        }
        Ok(())
    }
}

impl LanguageModel for T5 {
    fn info(&self) -> &LmInfo {
        &self.info
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn embed_tokens(&self, ids: &[u32]) -> Result<Tensor> {
        crate::llm::embedding_rows(&self.shared, ids)
    }

    fn new_cache(&self) -> SeqCache {
        SeqCache::new(self.decoder_blocks.len())
    }

    /// Encodes the prompt, replaces `cache` with a fresh one holding every decoder layer's
    /// cross-attention KV, and runs the decoder on `decoder_start_token_id`.
    fn prefill(&self, prompt_embeds: &Tensor, cache: &mut SeqCache) -> Result<Tensor> {
        let encoder_out = self.encode(prompt_embeds)?;
        let mut fresh = self.new_cache();
        fresh.cross_kv = self
            .decoder_blocks
            .iter()
            .map(|block| block.enc_dec_attention.cross_kv(&encoder_out))
            .collect::<candle_core::Result<Vec<_>>>()?;
        fresh.encoder_len = encoder_out.dim(0)?;
        *cache = fresh;
        let start = self.info.decoder_start_token_id.unwrap_or(0);
        let logits = self.forward_ragged(&[StepInput::Tokens(vec![start])], &mut [cache])?;
        Ok(logits.i(0)?)
    }

    fn forward_ragged(&self, inputs: &[StepInput], caches: &mut [&mut SeqCache]) -> Result<Tensor> {
        if inputs.len() != caches.len() || inputs.is_empty() {
            return Err(Error::InvalidInput(format!(
                "forward_ragged needs one cache per input (got {} inputs, {} caches)",
                inputs.len(),
                caches.len()
            )));
        }
        let mut embeds = Vec::with_capacity(inputs.len());
        let mut batch = RaggedBatch {
            lengths: Vec::with_capacity(inputs.len()),
            biases: Vec::with_capacity(inputs.len()),
            masks: Vec::with_capacity(inputs.len()),
        };
        for (input, cache) in inputs.iter().zip(caches.iter()) {
            self.check_cache(cache)?;
            let e = match input {
                StepInput::Embeds(e) => e.to_dtype(self.dtype)?,
                StepInput::Tokens(ids) => self.embed_tokens(ids)?,
            };
            let t = self.check_width(&e)?;
            let past = cache.len;
            batch.lengths.push(t);
            batch
                .biases
                .push(self.decoder_bias.compute_bias(t, past + t, past)?);
            batch.masks.push(causal_mask(t, past, &self.device)?);
            embeds.push(e);
        }
        let mut xs = Tensor::cat(&embeds, 0)?;
        for (layer, block) in self.decoder_blocks.iter().enumerate() {
            xs = block.forward(&xs, &batch, caches, layer)?;
        }
        for (cache, &t) in caches.iter_mut().zip(&batch.lengths) {
            cache.len += t;
        }
        // Only each sequence's last position needs logits.
        let last_rows: Vec<u32> = batch
            .lengths
            .iter()
            .scan(0, |end, &t| {
                *end += t;
                Some((*end - 1) as u32)
            })
            .collect();
        let xs = xs.index_select(&Tensor::new(last_rows.as_slice(), &self.device)?, 0)?;
        let mut xs = self.decoder_final_layer_norm.forward(&xs)?;
        if let Some(scale) = self.output_scale {
            xs = (xs * scale)?;
        }
        Ok(self.lm_head.forward(&xs)?.to_dtype(DType::F32)?)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        let (a, b) = (
            a.to_dtype(DType::F32).unwrap(),
            b.to_dtype(DType::F32).unwrap(),
        );
        let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        diff.to_scalar::<f32>().unwrap()
    }

    /// Decodes several sequences together: prefill each from its encoder input, then feed the
    /// rest of its decoder ids (the first is `decoder_start_token_id`) `chunk` at a time, all
    /// active sequences in one ragged forward per step, alternating token and embedding inputs.
    /// Returns, per sequence, the logits of each decoder position that produced some.
    fn decode_together(
        model: &T5,
        seqs: &[(Tensor, Vec<u32>, usize)],
    ) -> Vec<Vec<(usize, Tensor)>> {
        let mut caches: Vec<SeqCache> = seqs.iter().map(|_| model.new_cache()).collect();
        let mut rows: Vec<Vec<(usize, Tensor)>> = Vec::new();
        for ((embeds, _, _), cache) in seqs.iter().zip(caches.iter_mut()) {
            rows.push(vec![(0, model.prefill(embeds, cache).unwrap())]);
        }
        let mut done = vec![1; seqs.len()];
        for step in 0.. {
            let active: Vec<usize> = (0..seqs.len())
                .filter(|&i| done[i] < seqs[i].1.len())
                .collect();
            if active.is_empty() {
                break;
            }
            let mut inputs = Vec::new();
            for &i in &active {
                let (_, ids, chunk) = &seqs[i];
                let ids = ids[done[i]..(done[i] + chunk).min(ids.len())].to_vec();
                done[i] += ids.len();
                inputs.push(if (step + i) % 2 == 0 {
                    StepInput::Tokens(ids)
                } else {
                    StepInput::Embeds(model.embed_tokens(&ids).unwrap())
                });
            }
            let mut active_caches: Vec<&mut SeqCache> = caches
                .iter_mut()
                .enumerate()
                .filter(|(i, _)| active.contains(i))
                .map(|(_, c)| c)
                .collect();
            let logits = model.forward_ragged(&inputs, &mut active_caches).unwrap();
            for (n, &i) in active.iter().enumerate() {
                rows[i].push((done[i] - 1, logits.i(n).unwrap()));
                assert_eq!(caches[i].len, done[i]);
            }
        }
        rows
    }

    /// Regenerate the fixtures with `/opt/venv-ref/bin/python /tmp/t5_ref/gen.py` (a tiny random
    /// `T5ForConditionalGeneration` per config: `a` gated exact GELU, untied `lm_head`, 3 encoder
    /// and 2 decoder blocks; `b` ReLU, tied and scaled, 2 and 3 blocks; 8 buckets, max distance
    /// 20), then `cargo test -p blip2-model t5 -- --ignored --nocapture`.
    #[test]
    #[ignore = "needs /tmp/t5_ref fixtures from transformers"]
    fn parity_with_transformers() {
        let dir = std::path::Path::new("/tmp/t5_ref");
        let load = |path: std::path::PathBuf| candle_core::safetensors::load(path, &Device::Cpu);
        for name in ["a", "b"] {
            let dir = dir.join(name);
            let config = std::fs::read_to_string(dir.join("config.json")).unwrap();
            let cfg: T5Config = serde_json::from_str(&config).unwrap();
            let weights = load(dir.join("model.safetensors")).unwrap();
            let r = load(dir.join("ref.safetensors")).unwrap();
            let model = |dtype| {
                let vb = VarBuilder::from_tensors(weights.clone(), dtype, &Device::Cpu);
                T5::new(&cfg, vb.pp("language_model")).unwrap()
            };
            let seq = |prefix: &str, chunk| {
                let ids = r[&format!("{prefix}decoder_ids")].to_vec1::<i64>().unwrap();
                let ids = ids.into_iter().map(|x| x as u32).collect();
                (r[&format!("{prefix}inputs_embeds")].clone(), ids, chunk)
            };
            // Max error of the rows against the reference logits `key`.
            let worst = |rows: &[(usize, Tensor)], key: &str| {
                let errs = rows
                    .iter()
                    .map(|(p, row)| max_diff(row, &r[key].i(*p).unwrap()));
                errs.fold(0f32, f32::max)
            };

            let f32_model = model(DType::F32);
            let encoded = f32_model.encode(&r["inputs_embeds"]).unwrap();
            let (err, err64) = (
                max_diff(&encoded, &r["encoder_out"]),
                max_diff(&encoded, &r["encoder_out_f64"]),
            );
            println!("{name}: encoder max error {err:e} (torch f64: {err64:e})");
            assert!(err < 1e-5);
            let steps = decode_together(&f32_model, &[seq("", 1)]);
            assert_eq!(steps[0].len(), 25);
            let chunks = decode_together(&f32_model, &[seq("", 3)]);
            let pair = decode_together(&f32_model, &[seq("", 1), seq("2_", 2)]);
            let cases = [
                ("prefill + steps", &steps[0], "logits"),
                ("chunks of 3", &chunks[0], "logits"),
                ("ragged pair, first", &pair[0], "logits"),
                ("ragged pair, second", &pair[1], "2_logits"),
            ];
            for (what, rows, key) in cases {
                let (err, err64) = (worst(rows, key), worst(rows, &format!("{key}_f64")));
                println!("{name}: {what}: logits max error {err:e} (torch f64: {err64:e})");
                assert!(err < 1e-4, "{name} {what}: {err}");
            }

            for (dtype, key, tol) in [
                (DType::F16, "f16_logits", 0.03),
                (DType::BF16, "bf16_logits", 0.1),
            ] {
                let rows = decode_together(&model(dtype), &[seq("", 1)]).remove(0);
                let err = worst(&rows, key);
                println!("{name}: {dtype:?} vs transformers {dtype:?}: logits max error {err:e}");
                assert!(err < tol);
            }
        }
    }

    /// Expected buckets from transformers 5.24's `T5Attention._relative_position_bucket` for
    /// relative positions -40..=40.
    #[test]
    fn relative_position_bucket_matches_transformers() {
        #[rustfmt::skip]
        let cases: [(usize, usize, bool, [u32; 81]); 4] = [
            (8, 20, true, [3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 1, 0, 5, 6, 6, 6, 6, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7]),
            (8, 20, false, [7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 6, 6, 6, 6, 6, 5, 5, 5, 4, 4, 3, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            (32, 128, true, [12, 12, 12, 12, 12, 12, 12, 12, 12, 11, 11, 11, 11, 11, 11, 11, 11, 11, 10, 10, 10, 10, 10, 10, 10, 9, 9, 9, 9, 8, 8, 8, 8, 7, 6, 5, 4, 3, 2, 1, 0, 17, 18, 19, 20, 21, 22, 23, 24, 24, 24, 24, 25, 25, 25, 25, 26, 26, 26, 26, 26, 26, 26, 27, 27, 27, 27, 27, 27, 27, 27, 27, 28, 28, 28, 28, 28, 28, 28, 28, 28]),
            (32, 128, false, [23, 22, 22, 22, 22, 22, 21, 21, 21, 21, 20, 20, 20, 20, 19, 19, 19, 18, 18, 18, 17, 17, 16, 16, 16, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
        ];
        for (num_buckets, max_distance, bidirectional, expected) in cases {
            let got: Vec<u32> = (-40..=40)
                .map(|r| relative_position_bucket(r, bidirectional, num_buckets, max_distance))
                .collect();
            assert_eq!(
                got, expected,
                "{num_buckets} buckets, max {max_distance}, {bidirectional}"
            );
        }
        let far = [-1000, -128, -127, -64, -63, 63, 64, 127, 128, 1000];
        let bucket = |bi| far.map(|r| relative_position_bucket(r, bi, 32, 128));
        assert_eq!(bucket(true), [15, 15, 15, 14, 13, 29, 30, 31, 31, 31]);
        assert_eq!(bucket(false), [31, 31, 31, 26, 26, 0, 0, 0, 0, 0]);
    }

    /// A tiny random T5 (gated or not, tied or not) from a weight map built by name.
    fn random_model(gated: bool, tied: bool) -> T5 {
        let cfg: T5Config = serde_json::from_value(serde_json::json!({
            "vocab_size": 40, "d_model": 24, "d_kv": 8, "num_heads": 3, "d_ff": 32,
            "num_layers": 2, "num_decoder_layers": 3, "relative_attention_num_buckets": 8,
            "relative_attention_max_distance": 20, "tie_word_embeddings": tied,
            "feed_forward_proj": if gated { "gated-gelu" } else { "relu" },
        }))
        .unwrap();
        let (d, inner, ff) = (24, 24, 32);
        let mut shapes: Vec<(String, Vec<usize>)> = vec![("shared.weight".into(), vec![40, d])];
        if !tied {
            shapes.push(("lm_head.weight".into(), vec![40, d]));
        }
        for (stack, blocks, sublayers) in [("encoder", 2, 2), ("decoder", 3, 3)] {
            shapes.push((format!("{stack}.final_layer_norm.weight"), vec![d]));
            let bias =
                format!("{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight");
            shapes.push((bias, vec![8, 3]));
            for i in 0..blocks {
                let layer = |j: usize, rest: &str| format!("{stack}.block.{i}.layer.{j}.{rest}");
                for j in 0..sublayers {
                    shapes.push((layer(j, "layer_norm.weight"), vec![d]));
                }
                for (j, attn) in [(0, "SelfAttention"), (1, "EncDecAttention")]
                    .into_iter()
                    .take(sublayers - 1)
                {
                    for p in ["q", "k", "v"] {
                        shapes.push((layer(j, &format!("{attn}.{p}.weight")), vec![inner, d]));
                    }
                    shapes.push((layer(j, &format!("{attn}.o.weight")), vec![d, inner]));
                }
                let wi: &[&str] = if gated { &["wi_0", "wi_1"] } else { &["wi"] };
                for w in wi {
                    shapes.push((
                        layer(sublayers - 1, &format!("DenseReluDense.{w}.weight")),
                        vec![ff, d],
                    ));
                }
                shapes.push((
                    layer(sublayers - 1, "DenseReluDense.wo.weight"),
                    vec![d, ff],
                ));
            }
        }
        let weights: HashMap<String, Tensor> = shapes
            .into_iter()
            .map(|(name, shape)| {
                let std = if name.contains("relative_attention_bias") {
                    1.5
                } else {
                    0.3
                };
                let w = Tensor::randn(0f32, std, shape, &Device::Cpu).unwrap();
                (format!("language_model.{name}"), w)
            })
            .collect();
        let vb = VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
        T5::new(&cfg, vb.pp("language_model")).unwrap()
    }

    /// Ragged batches and chunked decoder inputs give each sequence the logits it gets alone,
    /// one position at a time.
    #[test]
    fn ragged_and_chunked_match_single_steps() {
        for (gated, tied) in [(true, false), (false, true)] {
            let model = random_model(gated, tied);
            let embeds = |t| Tensor::randn(0f32, 1.0, (t, 24), &Device::Cpu).unwrap();
            let ids1: Vec<u32> = (0..22).map(|i| (i * 7 + 3) % 40).collect();
            let ids2: Vec<u32> = (0..9).map(|i| (i * 5 + 1) % 40).collect();
            let (e1, e2) = (embeds(11), embeds(5));
            let alone1 = decode_together(&model, &[(e1.clone(), ids1.clone(), 1)]).remove(0);
            let alone2 = decode_together(&model, &[(e2.clone(), ids2.clone(), 1)]).remove(0);
            let chunked = decode_together(&model, &[(e1.clone(), ids1.clone(), 3)]).remove(0);
            let pair = decode_together(&model, &[(e1, ids1, 2), (e2, ids2, 1)]);
            for (rows, reference) in [
                (&chunked, &alone1),
                (&pair[0], &alone1),
                (&pair[1], &alone2),
            ] {
                for (position, row) in rows {
                    let err = max_diff(row, &reference[*position].1);
                    assert!(err < 1e-5, "position {position}: {err}");
                }
            }
        }
    }

    /// `T5Block` clamps float16 hidden states to ±64512 only when one is infinite.
    #[test]
    fn float16_residual_clamps_only_with_infinities() {
        let f16s = |v: &[f32]| {
            Tensor::new(v, &Device::Cpu)
                .unwrap()
                .to_dtype(DType::F16)
                .unwrap()
        };
        let values = |t: Tensor| t.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
        let finite = residual(&f16s(&[65504.0, -3.0]), &f16s(&[0.0, 1.0])).unwrap();
        assert_eq!(values(finite), [65504.0, -2.0]);
        let hidden = f16s(&[65504.0, -65504.0, 1.5]);
        let clamped = residual(&hidden, &f16s(&[65504.0, 0.0, 0.0])).unwrap();
        assert_eq!(values(clamped), [64512.0, -64512.0, 1.5]);
        // float16 + float32 (a `wo` kept in f32) promotes to f32, which is never clamped.
        let promoted = residual(
            &hidden,
            &Tensor::new(&[1e6f32, 0.0, 0.0], &Device::Cpu).unwrap(),
        );
        assert_eq!(values(promoted.unwrap()), [1_065_504.0, -65504.0, 1.5]);
    }

    #[test]
    fn decoder_step_needs_a_prefilled_cache() {
        let model = random_model(true, false);
        let mut cache = model.new_cache();
        let err = model.step(&[3], &mut [&mut cache]).unwrap_err();
        assert!(matches!(err, Error::InvalidInput(_)), "{err}");
    }
}
