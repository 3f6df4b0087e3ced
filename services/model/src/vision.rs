//! `Blip2VisionModel`: the frozen ViT (EVA ViT-g/14 in the released checkpoints).
//!
//! Follows transformers' `models/blip_2/modeling_blip_2.py` (Blip2VisionEmbeddings,
//! Blip2Attention, Blip2MLP, Blip2EncoderLayer, Blip2VisionModel): patch convolution, class
//! token, learned positions, pre-LN blocks with a fused qkv projection whose key bias is zero,
//! and `post_layernorm` over all tokens (that output is what the Q-Former cross-attends to).

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, LayerNorm, VarBuilder};

use crate::kernels::gemm::{self, AttnShape, Epilogue, PackedB};
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

/// A projection with its weight pre-packed for [`gemm::gemm`] (f32, CPU): packed once at load
/// so every call streams the weight in the microkernel's order; the original tensor is dropped,
/// so this costs no extra memory.
pub(crate) struct PackedLinear {
    weight: PackedB,
    bias: Option<Vec<f32>>,
}

impl PackedLinear {
    pub(crate) fn new(weight: &Tensor, bias: Option<&Tensor>) -> candle_core::Result<Self> {
        let (n, k) = weight.dims2()?;
        let w = weight
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let bias = bias
            .map(|b| b.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>())
            .transpose()?;
        if bias.as_ref().is_some_and(|b| b.len() != n) {
            candle_core::bail!(
                "bias of {} for a weight [{n}, {k}]",
                bias.map_or(0, |b| b.len())
            );
        }
        Ok(Self {
            weight: PackedB::from_nk(&w, n, k, k),
            bias,
        })
    }

    pub(crate) fn from_linear(linear: &Linear) -> candle_core::Result<Self> {
        Self::new(linear.weight(), linear.bias())
    }

    pub(crate) fn out_dim(&self) -> usize {
        self.weight.n()
    }

    pub(crate) fn in_dim(&self) -> usize {
        self.weight.k()
    }

    /// `out[m, n] = epi(x[m, k] Wᵀ + b)`; `gelu` applies exact GELU, `residual` (`[m, n]`) is
    /// added last.
    pub(crate) fn forward(
        &self,
        x: &[f32],
        m: usize,
        out: &mut [f32],
        gelu: bool,
        residual: Option<&[f32]>,
    ) {
        let n = self.weight.n();
        let epi = Epilogue {
            scale: None,
            bias: self.bias.as_deref(),
            gelu,
            residual: residual.map(|r| (r, n)),
        };
        gemm::gemm(
            x,
            m,
            self.weight.k(),
            &self.weight,
            epi,
            &mut out[..m * n],
            n,
            gemm::num_threads(),
        );
    }
}

/// LayerNorm parameters as plain vectors for [`gemm::layer_norm`].
pub(crate) struct FastLayerNorm {
    weight: Vec<f32>,
    bias: Vec<f32>,
    eps: f32,
}

impl FastLayerNorm {
    pub(crate) fn new(ln: &LayerNorm, eps: f64) -> candle_core::Result<Self> {
        let weight = ln.weight().to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let bias = match ln.bias() {
            Some(b) => b.to_dtype(DType::F32)?.to_vec1::<f32>()?,
            None => vec![0.0; weight.len()],
        };
        Ok(Self {
            weight,
            bias,
            eps: eps as f32,
        })
    }

    pub(crate) fn forward(&self, x: &[f32], out: &mut [f32]) {
        gemm::layer_norm(
            x,
            out,
            self.weight.len(),
            &self.weight,
            &self.bias,
            self.eps,
        );
    }
}

/// One encoder layer on the f32 CPU fast path: fused qkv GEMM, per-head attention read in
/// place, and the bias / GELU / residual folded into the GEMM epilogues.
struct FastLayer {
    layer_norm1: FastLayerNorm,
    qkv: PackedLinear,
    projection: PackedLinear,
    layer_norm2: FastLayerNorm,
    fc1: PackedLinear,
    fc2: PackedLinear,
    num_heads: usize,
    scale: f32,
}

impl FastLayer {
    fn new(layer: EncoderLayer, eps: f64) -> candle_core::Result<Self> {
        Ok(Self {
            layer_norm1: FastLayerNorm::new(&layer.layer_norm1, eps)?,
            qkv: PackedLinear::from_linear(&layer.self_attn.qkv)?,
            projection: PackedLinear::from_linear(&layer.self_attn.projection)?,
            layer_norm2: FastLayerNorm::new(&layer.layer_norm2, eps)?,
            fc1: PackedLinear::from_linear(&layer.mlp.fc1)?,
            fc2: PackedLinear::from_linear(&layer.mlp.fc2)?,
            num_heads: layer.self_attn.num_heads,
            scale: layer.self_attn.scale as f32,
        })
    }
}

/// Scratch buffers of the fast path, allocated once per forward.
struct Scratch {
    ln: Vec<f32>,
    qkv: Vec<f32>,
    attn: Vec<f32>,
    next: Vec<f32>,
    mlp: Vec<f32>,
}

impl FastLayer {
    /// `xs`: `[batch * t, hidden]`, updated in place (via `scratch.next`).
    fn forward(&self, xs: &mut Vec<f32>, batch: usize, t: usize, scratch: &mut Scratch) {
        let rows = batch * t;
        let h = self.projection.out_dim();
        let head_dim = h / self.num_heads;
        self.layer_norm1.forward(xs, &mut scratch.ln);
        self.qkv
            .forward(&scratch.ln, rows, &mut scratch.qkv, false, None);
        let shape = AttnShape {
            batch,
            tq: t,
            tk: t,
            heads: self.num_heads,
            head_dim,
            ldq: 3 * h,
            ldk: 3 * h,
            ldv: 3 * h,
            ldo: h,
        };
        gemm::attention(
            &scratch.qkv,
            &scratch.qkv[h..],
            &scratch.qkv[2 * h..],
            &mut scratch.attn,
            shape,
            self.scale,
            gemm::num_threads(),
        );
        self.projection
            .forward(&scratch.attn, rows, &mut scratch.next, false, Some(xs));
        std::mem::swap(xs, &mut scratch.next);
        self.layer_norm2.forward(xs, &mut scratch.ln);
        self.fc1
            .forward(&scratch.ln, rows, &mut scratch.mlp, true, None);
        self.fc2
            .forward(&scratch.mlp, rows, &mut scratch.next, false, Some(xs));
        std::mem::swap(xs, &mut scratch.next);
    }
}

enum Layers {
    /// candle ops (any dtype / device).
    Candle(Vec<EncoderLayer>),
    /// f32 on the CPU with exact GELU: the packed-GEMM path.
    Fast {
        layers: Vec<FastLayer>,
        post_layernorm: FastLayerNorm,
    },
}

/// The vision encoder; `forward` returns `last_hidden_state` `[B, patches + 1, hidden]`
/// (post_layernorm applied to all tokens).
pub struct VisionModel {
    embeddings: VisionEmbeddings,
    layers: Layers,
    post_layernorm: LayerNorm,
    dtype: DType,
}

impl VisionModel {
    /// `vb` is rooted at `vision_model`.
    pub fn new(cfg: &VisionConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let embeddings = VisionEmbeddings::new(cfg, vb.pp("embeddings"))?;
        let post_layernorm =
            candle_nn::layer_norm(cfg.hidden_size, cfg.layer_norm_eps, vb.pp("post_layernorm"))?;
        let fast = vb.dtype() == DType::F32
            && matches!(vb.device(), Device::Cpu)
            && cfg.hidden_act == Activation::Gelu;
        let layers = if fast {
            // Each layer is packed right after loading so its candle tensors are freed before
            // the next one is read.
            let layers = (0..cfg.num_hidden_layers)
                .map(|i| {
                    let layer = EncoderLayer::new(cfg, vb.pp(format!("encoder.layers.{i}")))?;
                    FastLayer::new(layer, cfg.layer_norm_eps)
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            Layers::Fast {
                layers,
                post_layernorm: FastLayerNorm::new(&post_layernorm, cfg.layer_norm_eps)?,
            }
        } else {
            Layers::Candle(
                (0..cfg.num_hidden_layers)
                    .map(|i| EncoderLayer::new(cfg, vb.pp(format!("encoder.layers.{i}"))))
                    .collect::<candle_core::Result<Vec<_>>>()?,
            )
        };
        Ok(Self {
            embeddings,
            layers,
            post_layernorm,
            dtype: vb.dtype(),
        })
    }

    /// `pixel_values`: `[B, 3, H, W]` (any float dtype; cast to the weights' dtype).
    pub fn forward(&self, pixel_values: &Tensor) -> candle_core::Result<Tensor> {
        // One compute turn per layer (see `crate::compute`): a decode step in the same process
        // waits for one layer at most, not for the whole image.
        let turn = crate::compute::turn();
        let mut xs = self
            .embeddings
            .forward(&pixel_values.to_dtype(self.dtype)?)?;
        drop(turn);
        match &self.layers {
            Layers::Candle(layers) => {
                for layer in layers {
                    let _turn = crate::compute::turn();
                    xs = layer.forward(&xs)?;
                }
                let _turn = crate::compute::turn();
                self.post_layernorm.forward(&xs)
            }
            Layers::Fast {
                layers,
                post_layernorm,
            } => {
                let (batch, t, h) = xs.dims3()?;
                let device = xs.device().clone();
                let mut data = xs.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                let rows = batch * t;
                let inner = layers.first().map_or(0, |l| l.fc1.out_dim());
                let mut scratch = Scratch {
                    ln: vec![0.0; rows * h],
                    qkv: vec![0.0; rows * 3 * h],
                    attn: vec![0.0; rows * h],
                    next: vec![0.0; rows * h],
                    mlp: vec![0.0; rows * inner],
                };
                for layer in layers {
                    let _turn = crate::compute::turn();
                    layer.forward(&mut data, batch, t, &mut scratch);
                }
                let turn = crate::compute::turn();
                post_layernorm.forward(&data, &mut scratch.ln);
                drop(turn);
                Tensor::from_vec(scratch.ln, (batch, t, h), &device)
            }
        }
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Blip2Config;

    use crate::checkpoint::RandomWeights;

    /// Per-part encode timing at bench.rs's "base" shape:
    /// `cargo test --release -p blip2-model --lib encode_parts -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn encode_parts() -> anyhow::Result<()> {
        let json = serde_json::json!({
            "vision_config": {"hidden_size": 768, "intermediate_size": 3072,
                "num_hidden_layers": 12, "num_attention_heads": 12, "image_size": 224,
                "patch_size": 14},
            "qformer_config": {},
            "text_config": {"model_type": "opt", "hidden_size": 768, "num_hidden_layers": 1,
                "num_attention_heads": 12, "ffn_dim": 3072, "vocab_size": 50272},
            "num_query_tokens": 32
        });
        let config = Blip2Config::from_json(&json.to_string(), "bench".as_ref())?;
        let vb = VarBuilder::from_backend(Box::new(RandomWeights), DType::F32, Device::Cpu);
        let vision = VisionModel::new(&config.vision_config, vb.pp("vision_model"))?;
        let qformer = crate::qformer::QFormer::new(
            &config.qformer_config,
            config.num_query_tokens,
            vb.clone(),
        )?;
        let projection = crate::linear::linear(768, 768, vb.pp("language_projection"))?;
        let pixels = Tensor::zeros((1, 3, 224, 224), DType::F32, &Device::Cpu)?;
        let mut best = [f64::MAX; 4];
        for _ in 0..6 {
            let t0 = std::time::Instant::now();
            let emb = vision.embeddings.forward(&pixels)?;
            let t1 = std::time::Instant::now();
            let embeds = vision.forward(&pixels)?;
            let t2 = std::time::Instant::now();
            let q = qformer.forward(&embeds)?;
            let t3 = std::time::Instant::now();
            let _ = projection.forward(&q)?;
            let t4 = std::time::Instant::now();
            drop(emb);
            for (b, d) in best.iter_mut().zip([t1 - t0, t2 - t1, t3 - t2, t4 - t3]) {
                *b = b.min(d.as_secs_f64());
            }
        }
        println!(
            "embeddings {:.1} ms, vision (incl. embeddings) {:.1} ms, qformer {:.1} ms, projection {:.2} ms",
            best[0] * 1e3,
            best[1] * 1e3,
            best[2] * 1e3,
            best[3] * 1e3
        );
        Ok(())
    }
}
