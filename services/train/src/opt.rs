//! A differentiable OPT decoder (transformers' `OPTForCausalLM`) over a [`ParamStore`], driven
//! by input embeddings, for stage 2's LM loss through the frozen LLM and for pretraining the
//! tiny OPT.
//!
//! Same computation as `blip2_model::opt`: learned positions with an offset of 2, taken from
//! the attention mask as transformers does (`cumsum(mask) * mask - 1`, so padding sits at row
//! 1); pre-LN (`do_layer_norm_before`) or post-LN blocks; q scaled after its projection; the
//! config's activation between `fc1` and `fc2`; `final_layer_norm` for pre-LN; `project_in` /
//! `project_out` when `word_embed_proj_dim` differs from `hidden_size`; an `lm_head` tied to
//! `embed_tokens` when the checkpoint has none. A causal mask plus the key-padding mask.

use blip2_model::config::OptConfig;
use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::nn::{activation, attention, embedding, layer_norm, linear, ParamStore, MASKED};

/// Row offset of OPT's learned positions.
pub const POSITION_OFFSET: usize = 2;

/// `nn.LayerNorm`'s default eps, which OPT uses.
const EPS: f64 = 1e-5;

/// OPT over the tensors `{prefix}.model.decoder.*` and `{prefix}.lm_head.weight` (prefix
/// `language_model` in BLIP-2 checkpoints).
pub struct Opt<'a> {
    params: &'a ParamStore,
    cfg: &'a OptConfig,
    prefix: String,
}

impl<'a> Opt<'a> {
    pub fn new(params: &'a ParamStore, cfg: &'a OptConfig, prefix: &str) -> Self {
        Self {
            params,
            cfg,
            prefix: prefix.to_string(),
        }
    }

    fn name(&self, name: &str) -> String {
        format!("{}.model.decoder.{name}", self.prefix)
    }

    fn p(&self, name: &str) -> Result<&Tensor> {
        self.params.get(&self.name(name))
    }

    fn lin(&self, name: &str, xs: &Tensor) -> Result<Tensor> {
        let bias = self.params.get_opt(&self.name(&format!("{name}.bias")));
        linear(xs, self.p(&format!("{name}.weight"))?, bias)
    }

    fn ln(&self, name: &str, xs: &Tensor) -> Result<Tensor> {
        if self.cfg.layer_norm_elementwise_affine {
            layer_norm(
                xs,
                self.p(&format!("{name}.weight"))?,
                self.p(&format!("{name}.bias"))?,
                EPS,
            )
        } else {
            let h = xs.dim(candle_core::D::Minus1)?;
            let ones = Tensor::ones(h, xs.dtype(), xs.device())?;
            layer_norm(xs, &ones, &ones.zeros_like()?, EPS)
        }
    }

    /// The token embedding table `[vocab, word_embed_proj_dim]`.
    pub fn embed_table(&self) -> Result<&Tensor> {
        self.p("embed_tokens.weight")
    }

    /// Token embeddings of ids `[B][L]` (rows one length): `[B, L, word_embed_proj_dim]`.
    pub fn embed(&self, ids: &[Vec<u32>]) -> Result<Tensor> {
        embedding(self.embed_table()?, ids)
    }

    /// Logits `[B, L, vocab]` for input embeddings `[B, L, word_embed_proj_dim]` with a 0/1
    /// attention mask `[B][L]` (right or left padding).
    pub fn forward(&self, embeds: &Tensor, attention_mask: &[Vec<u32>]) -> Result<Tensor> {
        let (b, l, _) = embeds.dims3()?;
        if attention_mask.len() != b || attention_mask.iter().any(|r| r.len() != l) {
            return Err(Error::Invalid(format!(
                "the attention mask must be [{b}][{l}] like the embeddings"
            )));
        }
        let device = embeds.device();
        let dtype = embeds.dtype();
        // Positions from the mask (transformers' OPTLearnedPositionalEmbedding).
        let mut positions = Vec::with_capacity(b * l);
        let mut mask = Vec::with_capacity(b * l * l);
        for row in attention_mask {
            let mut count = 0i64;
            for &m in row {
                count += i64::from(m != 0);
                let pos = if m != 0 { count - 1 } else { -1 };
                positions.push((pos + POSITION_OFFSET as i64) as u32);
            }
            for i in 0..l {
                for (j, &m) in row.iter().enumerate() {
                    mask.push(if j <= i && m != 0 { 0f32 } else { MASKED });
                }
            }
        }
        let max_pos = self.cfg.max_position_embeddings + POSITION_OFFSET;
        if let Some(&p) = positions.iter().max() {
            if p as usize >= max_pos {
                return Err(Error::Invalid(format!(
                    "{l} positions exceed OPT's {} learned positions",
                    self.cfg.max_position_embeddings
                )));
            }
        }
        let positions: Vec<Vec<u32>> = positions.chunks(l).map(<[u32]>::to_vec).collect();
        let pos = embedding(self.p("embed_positions.weight")?, &positions)?;
        let mask = Tensor::from_vec(mask, (b, 1, l, l), device)?.to_dtype(dtype)?;

        let mut xs = if self.params.contains(&self.name("project_in.weight")) {
            self.lin("project_in", embeds)?
        } else {
            embeds.clone()
        };
        xs = (xs + pos)?;
        let heads = self.cfg.num_attention_heads;
        let h = self.cfg.hidden_size;
        let scaling = ((h / heads.max(1)) as f64).powf(-0.5);
        let pre = self.cfg.do_layer_norm_before;
        for i in 0..self.cfg.num_hidden_layers {
            let layer = format!("layers.{i}");
            let residual = xs.clone();
            let hidden = if pre {
                self.ln(&format!("{layer}.self_attn_layer_norm"), &xs)?
            } else {
                xs.clone()
            };
            let q = (self.lin(&format!("{layer}.self_attn.q_proj"), &hidden)? * scaling)?;
            let k = self.lin(&format!("{layer}.self_attn.k_proj"), &hidden)?;
            let v = self.lin(&format!("{layer}.self_attn.v_proj"), &hidden)?;
            let attn = attention(&q, &k, &v, heads, 1.0, Some(&mask))?;
            let attn = self.lin(&format!("{layer}.self_attn.out_proj"), &attn)?;
            xs = (residual + attn)?;
            if !pre {
                xs = self.ln(&format!("{layer}.self_attn_layer_norm"), &xs)?;
            }
            let residual = xs.clone();
            let hidden = if pre {
                self.ln(&format!("{layer}.final_layer_norm"), &xs)?
            } else {
                xs.clone()
            };
            let hidden = self.lin(&format!("{layer}.fc1"), &hidden)?;
            let hidden = activation(self.cfg.activation_function, &hidden)?;
            let hidden = self.lin(&format!("{layer}.fc2"), &hidden)?;
            xs = (residual + hidden)?;
            if !pre {
                xs = self.ln(&format!("{layer}.final_layer_norm"), &xs)?;
            }
        }
        if pre {
            xs = self.ln("final_layer_norm", &xs)?;
        }
        if self.params.contains(&self.name("project_out.weight")) {
            xs = self.lin("project_out", &xs)?;
        }
        let head_name = format!("{}.lm_head.weight", self.prefix);
        let head = match self.params.get_opt(&head_name) {
            Some(w) => w,
            None => self.embed_table()?,
        };
        linear(&xs, head, None)
    }

    /// OPT's causal-LM loss: logits of positions `0..L-1` against `labels[:, 1..]`
    /// (`-100` ignored), cross-entropy mean over the kept labels, no smoothing.
    pub fn lm_loss(&self, logits: &Tensor, labels: &[Vec<i64>]) -> Result<Tensor> {
        let (b, l, vocab) = logits.dims3()?;
        if labels.len() != b || labels.iter().any(|r| r.len() != l) || l < 2 {
            return Err(Error::Invalid(format!(
                "labels must be [{b}][{l}] like the logits, with at least 2 positions"
            )));
        }
        let shifted = logits.narrow(1, 0, l - 1)?.reshape((b * (l - 1), vocab))?;
        let targets: Vec<i64> = labels.iter().flat_map(|r| r[1..].to_vec()).collect();
        crate::nn::cross_entropy(&shifted, &targets, 0.0)
    }
}
