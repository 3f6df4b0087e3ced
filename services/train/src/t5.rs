//! A differentiable Flan-T5 (transformers' `T5ForConditionalGeneration`) over a [`ParamStore`],
//! driven by the encoder's input embeddings, for stage 2's prefix-LM loss through the frozen
//! LLM (the loss back-propagates into the embeddings, so into the soft prompt).
//!
//! Same computation as `blip2_model::t5`, batched and without caches: pre-norm blocks with
//! `T5LayerNorm` (an RMS norm, no mean subtraction, no bias, the config's eps); attention
//! without `1/sqrt(d)` scaling; a relative position bias held by block 0 of each stack and
//! shared by its later blocks (bidirectional buckets in the encoder, unidirectional in the
//! decoder, none in cross-attention); the gated (`wi_0`, `wi_1`) or plain (`wi`) feed-forward
//! with the config's `dense_act_fn`; a final norm per stack; the decoder output scaled by
//! `d_model^-0.5` when `scale_decoder_outputs`; `lm_head.weight`, else the shared embedding.
//! Masks: the encoder's key padding in encoder self-attention and in cross-attention; causal
//! plus the decoder's key padding in decoder self-attention.
//!
//! Every op runs in the tensors' dtype. transformers takes `T5LayerNorm`'s variance in f32
//! whatever the dtype: the same in f32, and in f64 this keeps the computation exact (what the
//! f64 gradient checks need).

use blip2_model::config::{Activation, T5Config};
use candle_core::{Tensor, D};

use crate::error::{Error, Result};
use crate::nn::{activation, attention, embedding, linear, ParamStore, MASKED};

/// `T5Attention._relative_position_bucket` for one `relative_position = key - query`.
///
/// Half of the buckets (per direction when bidirectional) hold the exact distances below
/// `num_buckets / 2`; the others are log-spaced up to `max_distance`, computed in f32 with the
/// divisor's log rounded from f64 and truncated toward zero, as PyTorch does it (distances on a
/// bucket boundary are exact integers, so the order of the roundings matters).
pub fn relative_position_bucket(
    relative_position: i64,
    bidirectional: bool,
    num_buckets: usize,
    max_distance: usize,
) -> u32 {
    let (half, offset, distance) = if bidirectional {
        let half = (num_buckets / 2) as i64;
        let offset = if relative_position > 0 { half } else { 0 };
        (half, offset, relative_position.abs())
    } else {
        (num_buckets as i64, 0, (-relative_position).max(0))
    };
    let exact = half / 2;
    if distance < exact {
        return (offset + distance) as u32;
    }
    let divisor = (max_distance as f64 / exact as f64).ln() as f32;
    let scaled = (distance as f32 / exact as f32).ln() / divisor * (half - exact) as f32;
    let bucket = (exact + scaled as i64).min(half - 1);
    (offset + bucket) as u32
}

/// `T5LayerNorm`: `weight * x / sqrt(mean(x^2) + eps)` over the last dimension.
pub fn rms_norm(xs: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let variance = xs.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = xs.broadcast_div(&(variance + eps)?.sqrt()?)?;
    Ok(normed.broadcast_mul(weight)?)
}

/// The FFN's activation. Exact GELU is composed from `erf`, whose backward is exact: candle's
/// fused `gelu_erf` backward rounds `1/sqrt(2 pi)` to 0.398942, a 7e-7 relative error that
/// would show in the f64 gradients.
fn ffn_activation(act: Activation, xs: &Tensor) -> Result<Tensor> {
    match act {
        Activation::Gelu => {
            let cdf = ((xs * std::f64::consts::FRAC_1_SQRT_2)?.erf()? + 1.0)?;
            Ok(((xs * 0.5)? * cdf)?)
        }
        other => activation(other, xs),
    }
}

/// The additive key-padding mask `[B, 1, 1, S]` of a 0/1 mask `[B][S]`.
fn padding_mask(mask: &[Vec<u32>], like: &Tensor) -> Result<Tensor> {
    let (b, s) = (mask.len(), mask.first().map_or(0, Vec::len));
    let values: Vec<f32> = mask
        .iter()
        .flatten()
        .map(|&m| if m != 0 { 0.0 } else { MASKED })
        .collect();
    Ok(Tensor::from_vec(values, (b, 1, 1, s), like.device())?.to_dtype(like.dtype())?)
}

/// The decoder's self-attention mask `[B, 1, T, T]`: position `i` sees the real keys `j <= i`.
fn causal_mask(mask: &[Vec<u32>], like: &Tensor) -> Result<Tensor> {
    let (b, t) = (mask.len(), mask.first().map_or(0, Vec::len));
    let mut values = Vec::with_capacity(b * t * t);
    for row in mask {
        for i in 0..t {
            values.extend(
                row.iter()
                    .enumerate()
                    .map(|(j, &m)| if j <= i && m != 0 { 0.0 } else { MASKED }),
            );
        }
    }
    Ok(Tensor::from_vec(values, (b, 1, t, t), like.device())?.to_dtype(like.dtype())?)
}

/// Checks that a 0/1 mask is `[b][l]`.
fn check_mask(mask: &[Vec<u32>], b: usize, l: usize, what: &str) -> Result<()> {
    if mask.len() != b || mask.iter().any(|r| r.len() != l) {
        return Err(Error::Invalid(format!(
            "the {what} mask must be [{b}][{l}] like its sequences"
        )));
    }
    Ok(())
}

/// Flan-T5 over the tensors `{prefix}.shared.weight`, `{prefix}.encoder.*`,
/// `{prefix}.decoder.*` and `{prefix}.lm_head.weight` (prefix `language_model` in BLIP-2
/// checkpoints).
pub struct T5<'a> {
    params: &'a ParamStore,
    cfg: &'a T5Config,
    prefix: String,
}

impl<'a> T5<'a> {
    pub fn new(params: &'a ParamStore, cfg: &'a T5Config, prefix: &str) -> Self {
        Self {
            params,
            cfg,
            prefix: prefix.to_string(),
        }
    }

    fn name(&self, name: &str) -> String {
        format!("{}.{name}", self.prefix)
    }

    fn p(&self, name: &str) -> Result<&Tensor> {
        self.params.get(&self.name(name))
    }

    /// A bias-free projection `{name}.weight`.
    fn lin(&self, name: &str, xs: &Tensor) -> Result<Tensor> {
        linear(xs, self.p(&format!("{name}.weight"))?, None)
    }

    fn norm(&self, name: &str, xs: &Tensor) -> Result<Tensor> {
        rms_norm(
            xs,
            self.p(&format!("{name}.weight"))?,
            self.cfg.layer_norm_epsilon,
        )
    }

    /// The shared token embedding `[vocab, d_model]`: `shared`, or the stack's tied copy the
    /// file holds instead.
    pub fn embed_table(&self) -> Result<&Tensor> {
        let names = [
            "shared.weight",
            "encoder.embed_tokens.weight",
            "decoder.embed_tokens.weight",
        ];
        match names.iter().find(|n| self.params.contains(&self.name(n))) {
            Some(name) => self.p(name),
            None => self.p(names[0]),
        }
    }

    /// Token embeddings of ids `[B][L]` (rows one length): `[B, L, d_model]`.
    pub fn embed(&self, ids: &[Vec<u32>]) -> Result<Tensor> {
        embedding(self.embed_table()?, ids)
    }

    /// `T5Attention.compute_bias` of a stack's block 0: `[1, heads, q_len, k_len]`.
    fn position_bias(&self, stack: &str, q_len: usize, k_len: usize) -> Result<Tensor> {
        let bidirectional = stack == "encoder";
        let table = self.p(&format!(
            "{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        ))?;
        let (buckets, max_distance) = (
            self.cfg.relative_attention_num_buckets,
            self.cfg.relative_attention_max_distance,
        );
        let ids: Vec<u32> = (0..q_len)
            .flat_map(|i| {
                (0..k_len).map(move |j| {
                    relative_position_bucket(
                        j as i64 - i as i64,
                        bidirectional,
                        buckets,
                        max_distance,
                    )
                })
            })
            .collect();
        let heads = table.dim(1)?;
        let ids = Tensor::from_vec(ids, q_len * k_len, table.device())?;
        Ok(table
            .index_select(&ids, 0)?
            .reshape((q_len, k_len, heads))?
            .permute((2, 0, 1))?
            .unsqueeze(0)?
            .contiguous()?)
    }

    /// `T5Attention` `{name}` (`q`, `k`, `v`, `o`): queries from `xs`, keys and values from
    /// `kv`, the additive `mask` (position bias included) broadcastable to the scores.
    fn attend(&self, name: &str, xs: &Tensor, kv: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let q = self.lin(&format!("{name}.q"), xs)?;
        let k = self.lin(&format!("{name}.k"), kv)?;
        let v = self.lin(&format!("{name}.v"), kv)?;
        let out = attention(&q, &k, &v, self.cfg.num_heads, 1.0, Some(mask))?;
        self.lin(&format!("{name}.o"), &out)
    }

    /// `T5DenseGatedActDense` or `T5DenseActDense` `{name}`.
    fn feed_forward(&self, name: &str, xs: &Tensor) -> Result<Tensor> {
        let act = self.cfg.activation()?;
        let hidden = if self.cfg.is_gated_act() {
            let gate = ffn_activation(act, &self.lin(&format!("{name}.wi_0"), xs)?)?;
            (gate * self.lin(&format!("{name}.wi_1"), xs)?)?
        } else {
            ffn_activation(act, &self.lin(&format!("{name}.wi"), xs)?)?
        };
        self.lin(&format!("{name}.wo"), &hidden)
    }

    /// The encoder stack: input embeddings `[B, L, d_model]` with a 0/1 mask `[B][L]` to the
    /// encoder output `[B, L, d_model]` (after its final norm).
    pub fn encode(&self, embeds: &Tensor, mask: &[Vec<u32>]) -> Result<Tensor> {
        let (b, l, _) = embeds.dims3()?;
        check_mask(mask, b, l, "encoder")?;
        let mask = self
            .position_bias("encoder", l, l)?
            .broadcast_add(&padding_mask(mask, embeds)?)?;
        let mut xs = embeds.clone();
        for i in 0..self.cfg.num_layers {
            let block = format!("encoder.block.{i}");
            let h = self.norm(&format!("{block}.layer.0.layer_norm"), &xs)?;
            let attn = self.attend(&format!("{block}.layer.0.SelfAttention"), &h, &h, &mask)?;
            xs = (xs + attn)?;
            let h = self.norm(&format!("{block}.layer.1.layer_norm"), &xs)?;
            xs = (&xs + self.feed_forward(&format!("{block}.layer.1.DenseReluDense"), &h)?)?;
        }
        self.norm("encoder.final_layer_norm", &xs)
    }

    /// The decoder stack and `lm_head`: logits `[B, T, vocab]` of decoder input ids `[B][T]`
    /// (mask `[B][T]`) attending to `encoder_out` `[B, S, d_model]` (mask `[B][S]`).
    pub fn decode(
        &self,
        decoder_ids: &[Vec<u32>],
        decoder_mask: &[Vec<u32>],
        encoder_out: &Tensor,
        encoder_mask: &[Vec<u32>],
    ) -> Result<Tensor> {
        let (b, s, _) = encoder_out.dims3()?;
        check_mask(encoder_mask, b, s, "encoder")?;
        let t = decoder_ids.first().map_or(0, Vec::len);
        if decoder_ids.len() != b || t == 0 {
            return Err(Error::Invalid(format!(
                "the decoder needs {b} rows of at least one id"
            )));
        }
        check_mask(decoder_mask, b, t, "decoder")?;
        let mut xs = self.embed(decoder_ids)?;
        let self_mask = self
            .position_bias("decoder", t, t)?
            .broadcast_add(&causal_mask(decoder_mask, &xs)?)?;
        let cross_mask = padding_mask(encoder_mask, &xs)?;
        for i in 0..self.cfg.num_decoder_layers() {
            let block = format!("decoder.block.{i}");
            let h = self.norm(&format!("{block}.layer.0.layer_norm"), &xs)?;
            let attn = self.attend(
                &format!("{block}.layer.0.SelfAttention"),
                &h,
                &h,
                &self_mask,
            )?;
            xs = (xs + attn)?;
            let h = self.norm(&format!("{block}.layer.1.layer_norm"), &xs)?;
            let attn = self.attend(
                &format!("{block}.layer.1.EncDecAttention"),
                &h,
                encoder_out,
                &cross_mask,
            )?;
            xs = (xs + attn)?;
            let h = self.norm(&format!("{block}.layer.2.layer_norm"), &xs)?;
            xs = (&xs + self.feed_forward(&format!("{block}.layer.2.DenseReluDense"), &h)?)?;
        }
        let mut xs = self.norm("decoder.final_layer_norm", &xs)?;
        if self.cfg.scale_decoder_outputs() {
            xs = (xs * (self.cfg.d_model as f64).powf(-0.5))?;
        }
        let head = match self.params.get_opt(&self.name("lm_head.weight")) {
            Some(w) => w,
            None => self.embed_table()?,
        };
        linear(&xs, head, None)
    }

    /// [`T5::encode`] then [`T5::decode`]: logits `[B, T, vocab]`.
    pub fn forward(
        &self,
        embeds: &Tensor,
        mask: &[Vec<u32>],
        decoder_ids: &[Vec<u32>],
        decoder_mask: &[Vec<u32>],
    ) -> Result<Tensor> {
        let encoded = self.encode(embeds, mask)?;
        self.decode(decoder_ids, decoder_mask, &encoded, mask)
    }

    /// T5's LM loss: cross-entropy of every decoder position's logits `[B, T, vocab]` against
    /// `labels` `[B][T]` (no shift: the decoder input is already shifted; `-100` ignored), mean
    /// over the kept labels, no smoothing.
    pub fn lm_loss(&self, logits: &Tensor, labels: &[Vec<i64>]) -> Result<Tensor> {
        let (b, t, vocab) = logits.dims3()?;
        if labels.len() != b || labels.iter().any(|r| r.len() != t) {
            return Err(Error::Invalid(format!(
                "labels must be [{b}][{t}] like the logits"
            )));
        }
        crate::nn::cross_entropy(&logits.reshape((b * t, vocab))?, &labels.concat(), 0.0)
    }
}
