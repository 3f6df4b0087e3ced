//! A differentiable Q-Former (transformers' `Blip2QFormerModel` with the text embeddings of
//! `Blip2ForImageTextRetrieval`), written with [`crate::nn`]'s ops so that a loss on its outputs
//! back-propagates into its parameters.
//!
//! Parameters live in [`Params`]: every tensor of a checkpoint by its Hugging Face name, each
//! either a trainable [`Var`] or a frozen tensor. The layout is the retrieval checkpoint's
//! (`query_tokens`, `embeddings.*`, `qformer.layernorm`, `qformer.encoder.layer.N.*`); the
//! same post-LN BERT layers as `blip2_model::qformer`: self-attention over every position with
//! an additive mask, then for the first `nq` positions (the queries) cross-attention to the
//! image features (layers `i % cross_attention_frequency == 0`) and the query FFN, for the
//! rest (text) the text FFN.

use blip2_model::config::QFormerConfig;
use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::nn::{activation, layer_norm, linear, log_softmax};

/// The checkpoint's tensors (the same type as [`crate::nn::ParamStore`]).
pub use crate::nn::ParamStore as Params;

/// The additive mask value (see [`crate::nn::MASKED`]).
pub use crate::nn::MASKED;

/// The Q-Former over a [`Params`].
pub struct QFormer<'a> {
    pub params: &'a Params,
    pub cfg: &'a QFormerConfig,
    /// Query tokens: `query_tokens` `[1, nq, H]`.
    pub num_queries: usize,
}

impl<'a> QFormer<'a> {
    pub fn new(params: &'a Params, cfg: &'a QFormerConfig) -> Result<Self> {
        let num_queries = params.get("query_tokens")?.dim(1)?;
        Ok(Self {
            params,
            cfg,
            num_queries,
        })
    }

    fn p(&self, name: &str) -> Result<&Tensor> {
        self.params.get(name)
    }

    /// `query_tokens` repeated `batch` times: `[B, nq, H]`.
    pub fn queries(&self, batch: usize) -> Result<Tensor> {
        let q = self.p("query_tokens")?;
        let (_, n, h) = q.dims3()?;
        Ok(q.broadcast_as((batch, n, h))?.contiguous()?)
    }

    /// Word + position embeddings of right-padded ids `[B, L]`: `[B, L, H]`.
    pub fn embed_text(&self, ids: &[Vec<u32>]) -> Result<Tensor> {
        let len = ids.first().map_or(0, Vec::len);
        let max = self.cfg.max_position_embeddings;
        if len == 0 || len > max || ids.iter().any(|r| r.len() != len) {
            return Err(Error::Invalid(format!(
                "texts must be padded to one length in 1..={max} (got {len})"
            )));
        }
        let words = self.p("embeddings.word_embeddings.weight")?;
        let flat: Vec<u32> = ids.concat();
        let idx = Tensor::from_vec(flat, ids.len() * len, words.device())?;
        let h = words.dim(1)?;
        let emb = words.index_select(&idx, 0)?.reshape((ids.len(), len, h))?;
        let pos = self
            .p("embeddings.position_embeddings.weight")?
            .narrow(0, 0, len)?
            .unsqueeze(0)?;
        Ok(emb.broadcast_add(&pos)?)
    }

    fn lin(&self, prefix: &str, xs: &Tensor) -> Result<Tensor> {
        let bias = if self.params.contains(&format!("{prefix}.bias")) {
            Some(self.p(&format!("{prefix}.bias"))?)
        } else {
            None
        };
        linear(xs, self.p(&format!("{prefix}.weight"))?, bias)
    }

    fn ln(&self, prefix: &str, xs: &Tensor) -> Result<Tensor> {
        layer_norm(
            xs,
            self.p(&format!("{prefix}.weight"))?,
            self.p(&format!("{prefix}.bias"))?,
            self.cfg.layer_norm_eps,
        )
    }

    /// Multi-head attention + `output.dense` + residual + `output.LayerNorm`.
    /// `mask`: additive, broadcastable to `[B, heads, T, S]`.
    fn attention(
        &self,
        prefix: &str,
        xs: &Tensor,
        kv: &Tensor,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, t, h) = xs.dims3()?;
        let s = kv.dim(1)?;
        let heads = self.cfg.num_attention_heads;
        let d = h / heads;
        let split = |x: Tensor, len: usize| -> Result<Tensor> {
            Ok(x.reshape((b, len, heads, d))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = split(self.lin(&format!("{prefix}.attention.query"), xs)?, t)?;
        let k = split(self.lin(&format!("{prefix}.attention.key"), kv)?, s)?;
        let v = split(self.lin(&format!("{prefix}.attention.value"), kv)?, s)?;
        let mut scores = (q.matmul(&k.t()?)? * (d as f64).powf(-0.5))?;
        if let Some(mask) = mask {
            scores = scores.broadcast_add(mask)?;
        }
        let probs = log_softmax(&scores)?.exp()?;
        let out = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, t, h))?;
        let out = self.lin(&format!("{prefix}.output.dense"), &out)?;
        self.ln(&format!("{prefix}.output.LayerNorm"), &(out + xs)?)
    }

    fn ffn(&self, prefix: &str, intermediate: &str, output: &str, xs: &Tensor) -> Result<Tensor> {
        let hidden = self.lin(&format!("{prefix}.{intermediate}.dense"), xs)?;
        let hidden = activation(self.cfg.hidden_act, &hidden)?;
        let out = self.lin(&format!("{prefix}.{output}.dense"), &hidden)?;
        self.ln(&format!("{prefix}.{output}.LayerNorm"), &(out + xs)?)
    }

    /// The Q-Former on `embeds` `[B, L, H]` (the first `queries` positions are query tokens),
    /// `mask` additive (`[B, 1, 1, L]` or `[B, 1, L, L]`), `image` the vision features for the
    /// cross-attention (needed when `queries > 0`). Returns `[B, L, H]`.
    pub fn run(
        &self,
        embeds: &Tensor,
        mask: Option<&Tensor>,
        queries: usize,
        image: Option<&Tensor>,
    ) -> Result<Tensor> {
        let mut xs = self.ln("qformer.layernorm", embeds)?;
        let len = xs.dim(1)?;
        for i in 0..self.cfg.num_hidden_layers {
            let prefix = format!("qformer.encoder.layer.{i}");
            let attn = self.attention(&format!("{prefix}.attention"), &xs, &xs, mask)?;
            if queries == 0 {
                xs = self.ffn(&prefix, "intermediate", "output", &attn)?;
                continue;
            }
            let mut q = attn.narrow(1, 0, queries)?;
            if i % self.cfg.cross_attention_frequency.max(1) == 0 {
                let image = image.ok_or_else(|| {
                    Error::Invalid("the query positions need image features".into())
                })?;
                q = self.attention(&format!("{prefix}.crossattention"), &q, image, None)?;
            }
            let q = self.ffn(&prefix, "intermediate_query", "output_query", &q)?;
            xs = if len > queries {
                let text = attn.narrow(1, queries, len - queries)?;
                let text = self.ffn(&prefix, "intermediate", "output", &text)?;
                Tensor::cat(&[&q, &text], 1)?
            } else {
                q
            };
        }
        Ok(xs)
    }
}

/// Additive key-padding mask `[B, 1, 1, L]` (0 for tokens, [`MASKED`] for padding) from a 0/1
/// attention mask, in `dtype`.
pub fn padding_mask(attention: &[Vec<u32>], dtype: DType, device: &Device) -> Result<Tensor> {
    let (b, l) = (attention.len(), attention.first().map_or(0, Vec::len));
    let values: Vec<f32> = attention
        .iter()
        .flat_map(|row| row.iter().map(|&a| if a == 0 { MASKED } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(values, (b, 1, 1, l), device)?.to_dtype(dtype)?)
}
