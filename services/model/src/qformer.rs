//! `Blip2QFormerModel`: the Querying Transformer that turns image features into
//! `num_query_tokens` vectors (paper section 3.1).
//!
//! Follows transformers' `models/blip_2/modeling_blip_2.py` (Blip2QFormerMultiHeadAttention,
//! Blip2QFormerAttention, Blip2QFormerLayer, Blip2QFormerModel): the learned query tokens go
//! through `qformer.layernorm`, then post-LN BERT layers; every layer self-attends, layers with
//! `i % cross_attention_frequency == 0` also cross-attend to the image features, and the queries
//! use their own FFN (`intermediate_query` / `output_query`). The Q-Former always runs in f32,
//! as the reference keeps it (`_keep_in_fp32_modules`).

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{LayerNorm, VarBuilder};

use crate::kernels::gemm::{self, AttnShape};
use crate::linear::Linear;

use crate::config::{Activation, QFormerConfig};
use crate::vision::{eager_attention, FastLayerNorm, PackedLinear};

pub(crate) struct MultiHeadAttention {
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
        self.forward_masked(hidden, states, None)
    }

    /// As [`Self::forward`], with an additive mask broadcast onto the scores `[B, heads, t, s]`
    /// (the text padding mask of the retrieval heads: 0 or `f32::MIN` per key).
    fn forward_masked(
        &self,
        hidden: &Tensor,
        states: &Tensor,
        mask: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let (b, t, h) = hidden.dims3()?;
        let q = self.split_heads(&self.query.forward(hidden)?)?;
        let k = self.split_heads(&self.key.forward(states)?)?;
        let v = self.split_heads(&self.value.forward(states)?)?;
        let scale = (self.head_dim as f64).powf(-0.5);
        let out = eager_attention(&q, &k, &v, scale, mask)?;
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
pub(crate) struct Attention {
    attention: MultiHeadAttention,
    output: Output,
}

impl Attention {
    pub(crate) fn new(
        cfg: &QFormerConfig,
        is_cross_attention: bool,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            attention: MultiHeadAttention::new(cfg, is_cross_attention, vb.pp("attention"))?,
            output: Output::new(cfg, cfg.hidden_size, vb.pp("output"))?,
        })
    }

    pub(crate) fn forward(&self, hidden: &Tensor, states: &Tensor) -> candle_core::Result<Tensor> {
        let attn = self.attention.forward(hidden, states)?;
        self.output.forward(&attn, hidden)
    }

    /// Self- or cross-attention with an additive key mask (see `MultiHeadAttention`).
    pub(crate) fn forward_masked(
        &self,
        hidden: &Tensor,
        states: &Tensor,
        mask: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let attn = self.attention.forward_masked(hidden, states, mask)?;
        self.output.forward(&attn, hidden)
    }
}

/// Intermediate dense + activation, then the output block (the FFN of a Q-Former layer).
pub(crate) struct FeedForward {
    intermediate: Linear,
    act: Activation,
    output: Output,
}

impl FeedForward {
    pub(crate) fn new(
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

    pub(crate) fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
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

/// One Q-Former layer on the f32 CPU fast path (packed GEMMs with fused epilogues; the
/// self-attention q/k/v and the cross-attention k/v are each one fused projection).
struct FastLayer {
    self_qkv: PackedLinear,
    self_out: PackedLinear,
    self_ln: FastLayerNorm,
    cross: Option<FastCross>,
    ffn_in: PackedLinear,
    ffn_out: PackedLinear,
    ffn_ln: FastLayerNorm,
    num_heads: usize,
    head_dim: usize,
}

struct FastCross {
    query: PackedLinear,
    /// `[2 * hidden, encoder_hidden]`: keys then values over the image features.
    kv: PackedLinear,
    out: PackedLinear,
    ln: FastLayerNorm,
}

fn cat_linears(parts: &[&Linear]) -> candle_core::Result<PackedLinear> {
    let weights = parts.iter().map(|l| l.weight()).collect::<Vec<_>>();
    let biases = parts.iter().map(|l| l.bias()).collect::<Option<Vec<_>>>();
    let weight = Tensor::cat(&weights, 0)?;
    let bias = biases.map(|b| Tensor::cat(&b, 0)).transpose()?;
    PackedLinear::new(&weight, bias.as_ref())
}

impl FastLayer {
    fn new(layer: Layer, eps: f64) -> candle_core::Result<Self> {
        let sa = &layer.attention.attention;
        let cross = layer
            .crossattention
            .as_ref()
            .map(|c| -> candle_core::Result<FastCross> {
                Ok(FastCross {
                    query: PackedLinear::from_linear(&c.attention.query)?,
                    kv: cat_linears(&[&c.attention.key, &c.attention.value])?,
                    out: PackedLinear::from_linear(&c.output.dense)?,
                    ln: FastLayerNorm::new(&c.output.layer_norm, eps)?,
                })
            })
            .transpose()?;
        Ok(Self {
            self_qkv: cat_linears(&[&sa.query, &sa.key, &sa.value])?,
            self_out: PackedLinear::from_linear(&layer.attention.output.dense)?,
            self_ln: FastLayerNorm::new(&layer.attention.output.layer_norm, eps)?,
            cross,
            ffn_in: PackedLinear::from_linear(&layer.query_ffn.intermediate)?,
            ffn_out: PackedLinear::from_linear(&layer.query_ffn.output.dense)?,
            ffn_ln: FastLayerNorm::new(&layer.query_ffn.output.layer_norm, eps)?,
            num_heads: sa.num_heads,
            head_dim: sa.head_dim,
        })
    }

    /// `xs`: `[batch * q, hidden]` updated in place; `image`: `[batch * t, encoder_hidden]`.
    fn forward(&self, xs: &mut [f32], batch: usize, q: usize, image: &[f32], t: usize) {
        let rows = batch * q;
        let h = self.num_heads * self.head_dim;
        let scale = (self.head_dim as f32).powf(-0.5);
        let threads = gemm::num_threads();
        let shape = |tk: usize, ldq: usize, ldkv: usize| AttnShape {
            batch,
            tq: q,
            tk,
            heads: self.num_heads,
            head_dim: self.head_dim,
            ldq,
            ldk: ldkv,
            ldv: ldkv,
            ldo: h,
        };
        let mut attn = vec![0f32; rows * h];
        let mut tmp = vec![0f32; rows * h];

        let mut qkv = vec![0f32; rows * 3 * h];
        self.self_qkv.forward(xs, rows, &mut qkv, false, None);
        let s = shape(q, 3 * h, 3 * h);
        gemm::attention(&qkv, &qkv[h..], &qkv[2 * h..], &mut attn, s, scale, threads);
        self.self_out
            .forward(&attn, rows, &mut tmp, false, Some(xs));
        self.self_ln.forward(&tmp, xs);

        if let Some(cross) = &self.cross {
            let mut qb = vec![0f32; rows * h];
            cross.query.forward(xs, rows, &mut qb, false, None);
            let mut kv = vec![0f32; batch * t * 2 * h];
            cross.kv.forward(image, batch * t, &mut kv, false, None);
            let s = shape(t, h, 2 * h);
            gemm::attention(&qb, &kv, &kv[h..], &mut attn, s, scale, threads);
            cross.out.forward(&attn, rows, &mut tmp, false, Some(xs));
            cross.ln.forward(&tmp, xs);
        }

        let mut mid = vec![0f32; rows * self.ffn_in.out_dim()];
        self.ffn_in.forward(xs, rows, &mut mid, true, None);
        self.ffn_out.forward(&mid, rows, &mut tmp, false, Some(xs));
        self.ffn_ln.forward(&tmp, xs);
    }
}

enum Layers {
    Candle(Vec<Layer>),
    /// CPU with exact GELU: the packed-GEMM path (the Q-Former is always f32).
    Fast(Vec<FastLayer>),
}

/// The Q-Former with its learned query tokens.
pub struct QFormer {
    query_tokens: Tensor,
    layernorm: LayerNorm,
    layers: Layers,
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
            .map(|i| Layer::new(cfg, i, vb.pp(format!("encoder.layer.{i}"))));
        let layers = if matches!(vb.device(), Device::Cpu) && cfg.hidden_act == Activation::Gelu {
            // Packed one by one so each layer's candle tensors are freed before the next loads.
            Layers::Fast(
                layers
                    .map(|l| FastLayer::new(l?, cfg.layer_norm_eps))
                    .collect::<candle_core::Result<Vec<_>>>()?,
            )
        } else {
            Layers::Candle(layers.collect::<candle_core::Result<Vec<_>>>()?)
        };
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
        match &self.layers {
            Layers::Candle(layers) => {
                for layer in layers {
                    xs = layer.forward(&xs, &image_embeds)?;
                }
                Ok(xs)
            }
            Layers::Fast(layers) => {
                let (_, t, width) = image_embeds.dims3()?;
                let want = layers
                    .iter()
                    .find_map(|l| l.cross.as_ref().map(|c| c.kv.in_dim()));
                if want.is_some_and(|w| w != width) {
                    candle_core::bail!(
                        "image features of width {width}, the Q-Former expects {want:?}"
                    );
                }
                let image = image_embeds.flatten_all()?.to_vec1::<f32>()?;
                let mut data = xs.flatten_all()?.to_vec1::<f32>()?;
                for layer in layers {
                    layer.forward(&mut data, batch, q, &image, t);
                }
                Tensor::from_vec(data, (batch, q, h), xs.device())
            }
        }
    }
}
