//! A differentiable BLIP-2 vision encoder (transformers' `Blip2VisionModel`) over a
//! [`ParamStore`], for pretraining the tiny ViT and for stage 1's frozen features.
//!
//! Same computation as `blip2_model::vision`: patch embedding (a stride-`patch_size`
//! convolution, written here as patches times the flattened kernel), class token, learned
//! positions; pre-LN encoder layers (`layer_norm1`, fused `qkv` with `q_bias` / `v_bias` or a
//! full bias, `projection`, `layer_norm2`, `mlp.fc1`, the activation, `mlp.fc2`); and
//! `post_layernorm` on every token.

use blip2_model::config::VisionConfig;
use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::nn::{activation, attention, layer_norm, linear, ParamStore};

/// The vision encoder over the tensors `{prefix}.*` of a [`ParamStore`] (prefix
/// `vision_model` in every BLIP-2 layout).
pub struct Vit<'a> {
    params: &'a ParamStore,
    cfg: &'a VisionConfig,
    prefix: String,
}

impl<'a> Vit<'a> {
    pub fn new(params: &'a ParamStore, cfg: &'a VisionConfig, prefix: &str) -> Self {
        Self {
            params,
            cfg,
            prefix: prefix.to_string(),
        }
    }

    fn p(&self, name: &str) -> Result<&Tensor> {
        self.params.get(&format!("{}.{name}", self.prefix))
    }

    fn lin(&self, name: &str, xs: &Tensor) -> Result<Tensor> {
        let bias = self.params.get_opt(&format!("{}.{name}.bias", self.prefix));
        linear(xs, self.p(&format!("{name}.weight"))?, bias)
    }

    fn ln(&self, name: &str, xs: &Tensor) -> Result<Tensor> {
        layer_norm(
            xs,
            self.p(&format!("{name}.weight"))?,
            self.p(&format!("{name}.bias"))?,
            self.cfg.layer_norm_eps,
        )
    }

    /// Class token + patch embeddings + positions: `[B, patches + 1, hidden]`.
    fn embeddings(&self, pixels: &Tensor) -> Result<Tensor> {
        let (b, c, height, width) = pixels.dims4()?;
        let p = self.cfg.patch_size;
        if c != self.cfg.num_channels || p == 0 || height % p != 0 || width % p != 0 {
            return Err(Error::Invalid(format!(
                "pixels [{b}, {c}, {height}, {width}] do not fit {} channels in {p}-pixel patches",
                self.cfg.num_channels
            )));
        }
        let (gh, gw) = (height / p, width / p);
        // [B, C, gh, p, gw, p] -> [B, gh, gw, C, p, p] -> [B, gh * gw, C * p * p]: row-major
        // patches, each flattened as the kernel `[hidden, C, p, p]` is.
        let patches = pixels
            .reshape((b, c, gh, p, gw, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b, gh * gw, c * p * p))?;
        let kernel = self.p("embeddings.patch_embedding.weight")?;
        let hidden = kernel.dim(0)?;
        let kernel = kernel.reshape((hidden, c * p * p))?;
        let patches = linear(
            &patches,
            &kernel,
            self.params
                .get_opt(&format!("{}.embeddings.patch_embedding.bias", self.prefix)),
        )?;
        let class = self
            .p("embeddings.class_embedding")?
            .reshape((1, 1, hidden))?
            .broadcast_as((b, 1, hidden))?;
        let xs = Tensor::cat(&[&class, &patches], 1)?;
        let n = xs.dim(1)?;
        let pos = self.p("embeddings.position_embedding")?.narrow(1, 0, n)?;
        Ok(xs.broadcast_add(&pos)?)
    }

    /// The fused qkv bias: the stored `qkv.bias`, or `cat(q_bias, 0, v_bias)`.
    fn qkv_bias(&self, layer: &str) -> Result<Option<Tensor>> {
        if !self.cfg.qkv_bias {
            return Ok(None);
        }
        if let Some(bias) = self
            .params
            .get_opt(&format!("{}.{layer}.self_attn.qkv.bias", self.prefix))
        {
            return Ok(Some(bias.clone()));
        }
        let q = self.p(&format!("{layer}.self_attn.q_bias"))?;
        let v = self.p(&format!("{layer}.self_attn.v_bias"))?;
        Ok(Some(Tensor::cat(&[q, &q.zeros_like()?, v], 0)?))
    }

    /// `last_hidden_state` `[B, patches + 1, hidden]` of pixels `[B, C, H, W]` (post_layernorm
    /// applied to every token).
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let mut xs = self.embeddings(pixels)?;
        let h = xs.dim(2)?;
        let heads = self.cfg.num_attention_heads;
        let scale = ((h / heads.max(1)) as f64).powf(-0.5);
        for i in 0..self.cfg.num_hidden_layers {
            let layer = format!("encoder.layers.{i}");
            let normed = self.ln(&format!("{layer}.layer_norm1"), &xs)?;
            let qkv = linear(
                &normed,
                self.p(&format!("{layer}.self_attn.qkv.weight"))?,
                self.qkv_bias(&layer)?.as_ref(),
            )?;
            let q = qkv.narrow(2, 0, h)?;
            let k = qkv.narrow(2, h, h)?;
            let v = qkv.narrow(2, 2 * h, h)?;
            let attn = attention(&q, &k, &v, heads, scale, None)?;
            let attn = self.lin(&format!("{layer}.self_attn.projection"), &attn)?;
            xs = (xs + attn)?;
            let normed = self.ln(&format!("{layer}.layer_norm2"), &xs)?;
            let hidden = self.lin(&format!("{layer}.mlp.fc1"), &normed)?;
            let hidden = activation(self.cfg.hidden_act, &hidden)?;
            xs = (&xs + self.lin(&format!("{layer}.mlp.fc2"), &hidden)?)?;
        }
        self.ln("post_layernorm", &xs)
    }
}
