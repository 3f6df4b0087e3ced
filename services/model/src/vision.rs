//! `Blip2VisionModel`: the frozen ViT (EVA ViT-g/14 in the released checkpoints).
//!
//! Follows transformers' `models/blip_2/modeling_blip_2.py` (Blip2VisionEmbeddings,
//! Blip2Attention, Blip2MLP, Blip2EncoderLayer, Blip2VisionModel): patch convolution, class
//! token, learned positions, pre-LN blocks with a fused qkv projection whose key bias is zero,
//! and `post_layernorm` over all tokens (that output is what the Q-Former cross-attends to).

use candle_core::{DType, Module, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, LayerNorm, VarBuilder};

use crate::linear::Linear;

use crate::config::{Activation, VisionConfig};

/// Scaled dot-product attention as transformers' `eager_attention_forward`:
/// `softmax((q k^T) * scale + mask)` in f32, then `@ v`. `q, k, v`: `[.., heads, t, d]`.
pub(crate) fn eager_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let dtype = q.dtype();
    let mut scores = q.matmul(&k.t()?)?;
    if scale != 1.0 {
        scores = (scores * scale)?;
    }
    let mut scores = scores.to_dtype(DType::F32)?;
    if let Some(mask) = mask {
        scores = scores.broadcast_add(mask)?;
    }
    let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(dtype)?;
    probs.matmul(v)
}

struct VisionEmbeddings {
    patch_embedding: Conv2d,
    class_embedding: Tensor,
    position_embedding: Tensor,
}

impl VisionEmbeddings {
    fn new(cfg: &VisionConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let conv_cfg = Conv2dConfig {
            stride: cfg.patch_size,
            ..Default::default()
        };
        let patch_embedding = candle_nn::conv2d(
            cfg.num_channels,
            cfg.hidden_size,
            cfg.patch_size,
            conv_cfg,
            vb.pp("patch_embedding"),
        )?;
        let class_embedding = vb.get((1, 1, cfg.hidden_size), "class_embedding")?;
        let position_embedding = vb.get(
            (1, cfg.num_patches() + 1, cfg.hidden_size),
            "position_embedding",
        )?;
        Ok(Self {
            patch_embedding,
            class_embedding,
            position_embedding,
        })
    }

    fn forward(&self, pixel_values: &Tensor) -> candle_core::Result<Tensor> {
        let batch = pixel_values.dim(0)?;
        let patches = self.patch_embedding.forward(pixel_values)?; // [B, hidden, h, w]
        let patches = patches.flatten_from(2)?.transpose(1, 2)?; // [B, N, hidden]
        let hidden = patches.dim(2)?;
        let class = self.class_embedding.expand((batch, 1, hidden))?;
        let embeddings = Tensor::cat(&[&class, &patches], 1)?;
        let n = embeddings.dim(1)?;
        embeddings.broadcast_add(&self.position_embedding.narrow(1, 0, n)?)
    }
}

struct Attention {
    qkv: Linear,
    projection: Linear,
    num_heads: usize,
    scale: f64,
}

impl Attention {
    fn new(cfg: &VisionConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let h = cfg.hidden_size;
        let qkv_vb = vb.pp("qkv");
        let weight = qkv_vb.get((3 * h, h), "weight")?;
        // Current checkpoints store the fused bias cat(q_bias, 0, v_bias); older conversions keep
        // q_bias and v_bias apart. Either way the key bias is zero.
        let bias = if !cfg.qkv_bias {
            None
        } else if qkv_vb.contains_tensor("bias") {
            Some(qkv_vb.get(3 * h, "bias")?)
        } else {
            let q_bias = vb.get(h, "q_bias")?;
            let v_bias = vb.get(h, "v_bias")?;
            Some(Tensor::cat(&[&q_bias, &q_bias.zeros_like()?, &v_bias], 0)?)
        };
        let head_dim = h / cfg.num_attention_heads;
        Ok(Self {
            qkv: Linear::new(weight, bias),
            projection: crate::linear::linear(h, h, vb.pp("projection"))?,
            num_heads: cfg.num_attention_heads,
            scale: (head_dim as f64).powf(-0.5),
        })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, h) = xs.dims3()?;
        let head_dim = h / self.num_heads;
        let qkv = self
            .qkv
            .forward(xs)?
            .reshape((b, t, 3, self.num_heads, head_dim))?
            .permute((2, 0, 3, 1, 4))?; // [3, B, heads, t, d]
        let q = qkv.get(0)?.contiguous()?;
        let k = qkv.get(1)?.contiguous()?;
        let v = qkv.get(2)?.contiguous()?;
        let out = eager_attention(&q, &k, &v, self.scale, None)?; // [B, heads, t, d]
        let out = out.transpose(1, 2)?.reshape((b, t, h))?;
        self.projection.forward(&out)
    }
}

struct Mlp {
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl Mlp {
    fn new(cfg: &VisionConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            fc1: crate::linear::linear(cfg.hidden_size, cfg.intermediate_size, vb.pp("fc1"))?,
            fc2: crate::linear::linear(cfg.intermediate_size, cfg.hidden_size, vb.pp("fc2"))?,
            act: cfg.hidden_act,
        })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.fc2.forward(&self.act.forward(&self.fc1.forward(xs)?)?)
    }
}

struct EncoderLayer {
    self_attn: Attention,
    layer_norm1: LayerNorm,
    mlp: Mlp,
    layer_norm2: LayerNorm,
}

impl EncoderLayer {
    fn new(cfg: &VisionConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let ln = |name| candle_nn::layer_norm(cfg.hidden_size, cfg.layer_norm_eps, vb.pp(name));
        Ok(Self {
            self_attn: Attention::new(cfg, vb.pp("self_attn"))?,
            layer_norm1: ln("layer_norm1")?,
            mlp: Mlp::new(cfg, vb.pp("mlp"))?,
            layer_norm2: ln("layer_norm2")?,
        })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let xs = (xs + self.self_attn.forward(&self.layer_norm1.forward(xs)?)?)?;
        &xs + self.mlp.forward(&self.layer_norm2.forward(&xs)?)?
    }
}

/// The vision encoder; `forward` returns `last_hidden_state` `[B, patches + 1, hidden]`
/// (post_layernorm applied to all tokens).
pub struct VisionModel {
    embeddings: VisionEmbeddings,
    layers: Vec<EncoderLayer>,
    post_layernorm: LayerNorm,
    dtype: DType,
}

impl VisionModel {
    /// `vb` is rooted at `vision_model`.
    pub fn new(cfg: &VisionConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let embeddings = VisionEmbeddings::new(cfg, vb.pp("embeddings"))?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| EncoderLayer::new(cfg, vb.pp(format!("encoder.layers.{i}"))))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let post_layernorm =
            candle_nn::layer_norm(cfg.hidden_size, cfg.layer_norm_eps, vb.pp("post_layernorm"))?;
        Ok(Self {
            embeddings,
            layers,
            post_layernorm,
            dtype: vb.dtype(),
        })
    }

    /// `pixel_values`: `[B, 3, H, W]` (any float dtype; cast to the weights' dtype).
    pub fn forward(&self, pixel_values: &Tensor) -> candle_core::Result<Tensor> {
        let mut xs = self
            .embeddings
            .forward(&pixel_values.to_dtype(self.dtype)?)?;
        for layer in &self.layers {
            xs = layer.forward(&xs)?;
        }
        self.post_layernorm.forward(&xs)
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }
}
