//! `Blip2QFormerModel`: the Querying Transformer that turns image features into
//! `num_query_tokens` vectors (paper section 3.1).
//!
//! Follows transformers' `models/blip_2/modeling_blip_2.py` (Blip2QFormerMultiHeadAttention,
//! Blip2QFormerAttention, Blip2QFormerLayer, Blip2QFormerModel): the learned query tokens go
//! through `qformer.layernorm`, then post-LN BERT layers; every layer self-attends, layers with
//! `i % cross_attention_frequency == 0` also cross-attend to the image features, and the queries
//! use their own FFN (`intermediate_query` / `output_query`). The Q-Former always runs in f32,
//! as the reference keeps it (`_keep_in_fp32_modules`).

use candle_core::{DType, Module, Tensor};
use candle_nn::{LayerNorm, VarBuilder};

use crate::linear::Linear;

use crate::config::{Activation, QFormerConfig};
use crate::vision::eager_attention;

struct MultiHeadAttention {
    query: Linear,
    key: Linear,
    value: Linear,
    num_heads: usize,
    head_dim: usize,
}

impl MultiHeadAttention {
    fn new(
        cfg: &QFormerConfig,
        is_cross_attention: bool,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let h = cfg.hidden_size;
        let kv_in = if is_cross_attention {
            cfg.encoder_hidden_size
        } else {
            h
        };
        Ok(Self {
            query: crate::linear::linear(h, h, vb.pp("query"))?,
            key: crate::linear::linear(kv_in, h, vb.pp("key"))?,
            value: crate::linear::linear(kv_in, h, vb.pp("value"))?,
            num_heads: cfg.num_attention_heads,
            head_dim: h / cfg.num_attention_heads,
        })
    }

    fn split_heads(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, _) = xs.dims3()?;
        xs.reshape((b, t, self.num_heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()
    }

    /// `states`: the keys/values source (the hidden states themselves, or the image features).
    fn forward(&self, hidden: &Tensor, states: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, h) = hidden.dims3()?;
        let q = self.split_heads(&self.query.forward(hidden)?)?;
        let k = self.split_heads(&self.key.forward(states)?)?;
        let v = self.split_heads(&self.value.forward(states)?)?;
        let scale = (self.head_dim as f64).powf(-0.5);
        let out = eager_attention(&q, &k, &v, scale, None)?;
        out.transpose(1, 2)?.reshape((b, t, h))
    }
}

/// `dense` + residual + `LayerNorm` (Blip2QFormerSelfOutput and Blip2QFormerOutput).
struct Output {
    dense: Linear,
    layer_norm: LayerNorm,
}

impl Output {
    fn new(cfg: &QFormerConfig, in_dim: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            dense: crate::linear::linear(in_dim, cfg.hidden_size, vb.pp("dense"))?,
            layer_norm: candle_nn::layer_norm(
                cfg.hidden_size,
                cfg.layer_norm_eps,
                vb.pp("LayerNorm"),
            )?,
        })
    }

    fn forward(&self, xs: &Tensor, residual: &Tensor) -> candle_core::Result<Tensor> {
        self.layer_norm
            .forward(&(self.dense.forward(xs)? + residual)?)
    }
}

/// Attention followed by its output block (Blip2QFormerAttention).
struct Attention {
    attention: MultiHeadAttention,
    output: Output,
}

impl Attention {
    fn new(
        cfg: &QFormerConfig,
        is_cross_attention: bool,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            attention: MultiHeadAttention::new(cfg, is_cross_attention, vb.pp("attention"))?,
            output: Output::new(cfg, cfg.hidden_size, vb.pp("output"))?,
        })
    }

    fn forward(&self, hidden: &Tensor, states: &Tensor) -> candle_core::Result<Tensor> {
        let attn = self.attention.forward(hidden, states)?;
        self.output.forward(&attn, hidden)
    }
}

/// Intermediate dense + activation, then the output block (the FFN of a Q-Former layer).
struct FeedForward {
    intermediate: Linear,
    act: Activation,
    output: Output,
}

impl FeedForward {
    fn new(
        cfg: &QFormerConfig,
        intermediate: VarBuilder,
        output: VarBuilder,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            intermediate: crate::linear::linear(
                cfg.hidden_size,
                cfg.intermediate_size,
                intermediate.pp("dense"),
            )?,
            act: cfg.hidden_act,
            output: Output::new(cfg, cfg.intermediate_size, output)?,
        })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.act.forward(&self.intermediate.forward(xs)?)?;
        self.output.forward(&h, xs)
    }
}

struct Layer {
    attention: Attention,
    crossattention: Option<Attention>,
    query_ffn: FeedForward,
}

impl Layer {
    fn new(cfg: &QFormerConfig, index: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        let crossattention = if index.is_multiple_of(cfg.cross_attention_frequency) {
            Some(Attention::new(cfg, true, vb.pp("crossattention"))?)
        } else {
            None
        };
        Ok(Self {
            attention: Attention::new(cfg, false, vb.pp("attention"))?,
            crossattention,
            query_ffn: FeedForward::new(cfg, vb.pp("intermediate_query"), vb.pp("output_query"))?,
        })
    }

    /// Query-only forward (no text part): self-attention, cross-attention, query FFN.
    fn forward(&self, queries: &Tensor, image_embeds: &Tensor) -> candle_core::Result<Tensor> {
        let mut xs = self.attention.forward(queries, queries)?;
        if let Some(cross) = &self.crossattention {
            xs = cross.forward(&xs, image_embeds)?;
        }
        self.query_ffn.forward(&xs)
    }
}

/// The Q-Former with its learned query tokens.
pub struct QFormer {
    query_tokens: Tensor,
    layernorm: LayerNorm,
    layers: Vec<Layer>,
}

impl QFormer {
    /// `root` is the checkpoint root: `query_tokens` and `qformer.*` are read from it, in f32.
    pub fn new(
        cfg: &QFormerConfig,
        num_query_tokens: usize,
        root: VarBuilder,
    ) -> candle_core::Result<Self> {
        let root = root.set_dtype(DType::F32);
        let query_tokens = root.get((1, num_query_tokens, cfg.hidden_size), "query_tokens")?;
        let vb = root.pp("qformer");
        let layernorm =
            candle_nn::layer_norm(cfg.hidden_size, cfg.layer_norm_eps, vb.pp("layernorm"))?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::new(cfg, i, vb.pp(format!("encoder.layer.{i}"))))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            query_tokens,
            layernorm,
            layers,
        })
    }

    /// `image_embeds`: `[B, patches + 1, vision_hidden]` (any dtype; cast to f32).
    /// Returns the query output `[B, num_query_tokens, hidden]` in f32.
    pub fn forward(&self, image_embeds: &Tensor) -> candle_core::Result<Tensor> {
        let image_embeds = image_embeds.to_dtype(DType::F32)?;
        let batch = image_embeds.dim(0)?;
        let (_, q, h) = self.query_tokens.dims3()?;
        let queries = self.query_tokens.expand((batch, q, h))?.contiguous()?;
        let mut xs = self.layernorm.forward(&queries)?;
        for layer in &self.layers {
            xs = layer.forward(&xs, &image_embeds)?;
        }
        Ok(xs)
    }
}
