//! OPT (Zhang et al. 2022), decoder-only, driven by input embeddings with explicit
//! per-sequence KV caches.
//!
//! Follows transformers' `models/opt/modeling_opt.py`: learned positions with an offset of 2
//! (`OPTLearnedPositionalEmbedding`: a sequence without padding takes rows `pos + 2`), pre-LN
//! blocks (`do_layer_norm_before`, post-LN otherwise), q scaled right after its projection,
//! ReLU FFN, `decoder.final_layer_norm`, `project_in` / `project_out` when `word_embed_proj_dim`
//! differs from `hidden_size`, and an `lm_head` tied to `embed_tokens` when the file has none.

use candle_core::{DType, Device, IndexOp, Module, Tensor};
use candle_nn::{LayerNorm, VarBuilder};

use crate::linear::{Linear, WeightFormat};

use crate::config::{Activation, OptConfig};
use crate::error::{Error, Result};
use crate::llm::{LanguageModel, LmInfo, SeqCache, StepInput};
use crate::vision::eager_attention;

/// Row offset of OPT's learned positions (`OPTLearnedPositionalEmbedding.offset`).
const POSITION_OFFSET: usize = 2;

fn layer_norm(cfg: &OptConfig, size: usize, vb: VarBuilder) -> candle_core::Result<LayerNorm> {
    // nn.LayerNorm's default eps.
    const EPS: f64 = 1e-5;
    if cfg.layer_norm_elementwise_affine {
        candle_nn::layer_norm(size, EPS, vb)
    } else {
        let ones = Tensor::ones(size, vb.dtype(), vb.device())?;
        Ok(LayerNorm::new(ones.clone(), ones.zeros_like()?, EPS))
    }
}

struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    num_heads: usize,
    head_dim: usize,
    scaling: f64,
}

impl Attention {
    fn new(
        cfg: &OptConfig,
        vb: VarBuilder,
        format: Option<WeightFormat>,
    ) -> candle_core::Result<Self> {
        let h = cfg.hidden_size;
        let linear = |name| crate::linear::linear_in(h, h, cfg.enable_bias, format, vb.pp(name));
        let head_dim = h / cfg.num_attention_heads;
        Ok(Self {
            q_proj: linear("q_proj")?,
            k_proj: linear("k_proj")?,
            v_proj: linear("v_proj")?,
            out_proj: linear("out_proj")?,
            num_heads: cfg.num_attention_heads,
            head_dim,
            scaling: (head_dim as f64).powf(-0.5),
        })
    }

    /// `xs`: the new positions of all sequences, stacked `[sum_t, hidden]`; `lengths[i]` rows
    /// belong to sequence `i`, whose cache receives their keys and values.
    fn forward(
        &self,
        xs: &Tensor,
        lengths: &[usize],
        caches: &mut [&mut SeqCache],
        layer: usize,
    ) -> Result<Tensor> {
        // The reference scales q after the projection (bias included), then attends unscaled.
        let q = (self.q_proj.forward(xs)? * self.scaling)?;
        let k = self.k_proj.forward(xs)?;
        let v = self.v_proj.forward(xs)?;
        let width = self.num_heads * self.head_dim;
        let fast_dtype = q.dtype() == DType::F32 && q.device().is_cpu();
        // Per sequence: its output rows, or `None` for a decode row the kernel computes below.
        let mut outputs: Vec<Option<Tensor>> = Vec::with_capacity(lengths.len());
        let mut decode_rows = Vec::new(); // (sequence, row of q)
        let mut offset = 0;
        for (i, (cache, &t)) in caches.iter_mut().zip(lengths).enumerate() {
            if t == 1 && fast_dtype && cache.len > 0 {
                // A decode step: append the new key and value in place, attend in the kernel.
                let row = |m: &Tensor| -> candle_core::Result<Tensor> {
                    m.narrow(0, offset, 1)?
                        .reshape((self.num_heads, 1, self.head_dim))
                };
                cache.append(layer, row(&k)?, row(&v)?)?;
                decode_rows.push((i, offset));
                outputs.push(None);
                offset += t;
                continue;
            }
            let heads = |m: &Tensor| -> candle_core::Result<Tensor> {
                m.narrow(0, offset, t)?
                    .reshape((t, self.num_heads, self.head_dim))?
                    .transpose(0, 1)?
                    .contiguous()
            };
            let (q_i, k_i, v_i) = (heads(&q)?, heads(&k)?, heads(&v)?);
            let past = cache.len;
            let (k_all, v_all) = cache.append(layer, k_i, v_i)?;
            let mask = causal_mask(t, past, xs.device())?;
            let out = eager_attention(&q_i, &k_all, &v_all, 1.0, mask.as_ref())?; // [heads, t, d]
            outputs.push(Some(out.transpose(0, 1)?.reshape((t, width))?));
            offset += t;
        }
        if !decode_rows.is_empty() {
            let decoded = self.decode_attention(&q, &decode_rows, caches, layer)?;
            if decode_rows.len() == lengths.len() {
                // A pure decode step: the rows are already in order.
                return Ok(self.out_proj.forward(&decoded)?);
            }
            for (n, &(i, _)) in decode_rows.iter().enumerate() {
                outputs[i] = Some(decoded.narrow(0, n, 1)?);
            }
        }
        let outputs = outputs.into_iter().flatten().collect::<Vec<_>>();
        let out = match outputs.as_slice() {
            [only] => only.clone(),
            _ => Tensor::cat(&outputs, 0)?,
        };
        Ok(self.out_proj.forward(&out)?)
    }

    /// Attention of the decode rows `(sequence, row of q)`, each one new position whose key and
    /// value are already in its cache: one kernel call over all of them, reading the caches in
    /// place. Returns `[rows, hidden]`.
    fn decode_attention(
        &self,
        q: &Tensor,
        rows: &[(usize, usize)],
        caches: &[&mut SeqCache],
        layer: usize,
    ) -> Result<Tensor> {
        let width = self.num_heads * self.head_dim;
        let q = q.contiguous()?;
        let (qg, ql) = q.storage_and_layout();
        let candle_core::Storage::Cpu(qc) = &*qg else {
            return Err(Error::internal("decode attention needs CPU tensors"));
        };
        let q_all = &qc.as_slice::<f32>()?[ql.start_offset()..];
        let reads = rows
            .iter()
            .map(|&(i, _)| caches[i].kv_read(layer))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| Error::internal("a decode row has no KV buffer"))?;
        let seqs = rows
            .iter()
            .zip(&reads)
            .map(|(&(_, row), read)| {
                Some(crate::kernels::attention::DecodeSeq {
                    q: q_all.get(row * width..(row + 1) * width)?,
                    kv: read.slices()?,
                })
            })
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| Error::internal("a decode row's KV is not f32"))?;
        let mut out = vec![0f32; rows.len() * width];
        crate::kernels::attention::decode(&seqs, self.num_heads, self.head_dim, &mut out);
        Ok(Tensor::from_vec(out, (rows.len(), width), q.device())?)
    }
}

/// Additive mask `[t, past + t]` hiding future positions of a chunk of `t` new queries that
/// follow `past` cached positions; `None` when nothing is hidden (a single query).
pub(crate) fn causal_mask(
    t: usize,
    past: usize,
    device: &Device,
) -> candle_core::Result<Option<Tensor>> {
    if t <= 1 {
        return Ok(None);
    }
    let total = past + t;
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| (0..total).map(move |j| if j > past + i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (t, total), device).map(Some)
}

struct DecoderLayer {
    self_attn: Attention,
    self_attn_layer_norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    final_layer_norm: LayerNorm,
    act: Activation,
    pre_norm: bool,
}

impl DecoderLayer {
    fn new(
        cfg: &OptConfig,
        vb: VarBuilder,
        format: Option<WeightFormat>,
    ) -> candle_core::Result<Self> {
        let h = cfg.hidden_size;
        let linear =
            |i, o, name| crate::linear::linear_in(i, o, cfg.enable_bias, format, vb.pp(name));
        Ok(Self {
            self_attn: Attention::new(cfg, vb.pp("self_attn"), format)?,
            self_attn_layer_norm: layer_norm(cfg, h, vb.pp("self_attn_layer_norm"))?,
            fc1: linear(h, cfg.ffn_dim, "fc1")?,
            fc2: linear(cfg.ffn_dim, h, "fc2")?,
            final_layer_norm: layer_norm(cfg, h, vb.pp("final_layer_norm"))?,
            act: cfg.activation_function,
            pre_norm: cfg.do_layer_norm_before,
        })
    }

    fn forward(
        &self,
        xs: &Tensor,
        lengths: &[usize],
        caches: &mut [&mut SeqCache],
        layer: usize,
    ) -> Result<Tensor> {
        let h = if self.pre_norm {
            self.self_attn_layer_norm.forward(xs)?
        } else {
            xs.clone()
        };
        let mut xs = (xs + self.self_attn.forward(&h, lengths, caches, layer)?)?;
        if !self.pre_norm {
            xs = self.self_attn_layer_norm.forward(&xs)?;
        }
        let h = if self.pre_norm {
            self.final_layer_norm.forward(&xs)?
        } else {
            xs.clone()
        };
        let h = self
            .fc2
            .forward(&self.act.forward(&self.fc1.forward(&h)?)?)?;
        let mut xs = (xs + h)?;
        if !self.pre_norm {
            xs = self.final_layer_norm.forward(&xs)?;
        }
        Ok(xs)
    }
}

/// `OPTForCausalLM` as BLIP-2 drives it.
pub struct Opt {
    embed_tokens: Tensor,
    embed_positions: Tensor,
    project_in: Option<Linear>,
    project_out: Option<Linear>,
    layers: Vec<DecoderLayer>,
    final_layer_norm: Option<LayerNorm>,
    lm_head: Linear,
    info: LmInfo,
    device: Device,
    dtype: DType,
}

impl Opt {
    /// `vb` is rooted at `language_model` (weights `model.decoder.*`, `lm_head.weight`).
    pub fn new(cfg: &OptConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        Self::with_weights(cfg, vb, None)
    }

    /// As [`Opt::new`], with every projection (and `lm_head`) stored in `format` (`None`: as
    /// loaded); embeddings and norms stay in the load dtype.
    pub fn with_weights(
        cfg: &OptConfig,
        vb: VarBuilder,
        format: Option<WeightFormat>,
    ) -> candle_core::Result<Self> {
        let decoder = vb.pp("model.decoder");
        let proj_dim = cfg.word_embed_proj_dim();
        let embed_tokens = decoder.get((cfg.vocab_size, proj_dim), "embed_tokens.weight")?;
        let embed_positions = decoder.get(
            (
                cfg.max_position_embeddings + POSITION_OFFSET,
                cfg.hidden_size,
            ),
            "embed_positions.weight",
        )?;
        let (project_in, project_out) = if proj_dim != cfg.hidden_size {
            (
                Some(crate::linear::linear_in(
                    proj_dim,
                    cfg.hidden_size,
                    false,
                    format,
                    decoder.pp("project_in"),
                )?),
                Some(crate::linear::linear_in(
                    cfg.hidden_size,
                    proj_dim,
                    false,
                    format,
                    decoder.pp("project_out"),
                )?),
            )
        } else {
            (None, None)
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::new(cfg, decoder.pp(format!("layers.{i}")), format))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let final_layer_norm = if cfg.do_layer_norm_before {
            Some(layer_norm(
                cfg,
                cfg.hidden_size,
                decoder.pp("final_layer_norm"),
            )?)
        } else {
            None
        };
        // The released checkpoints tie lm_head to embed_tokens and may omit it.
        let lm_head_weight = if vb.contains_tensor("lm_head.weight") {
            vb.get((cfg.vocab_size, proj_dim), "lm_head.weight")?
        } else {
            embed_tokens.clone()
        };
        let info = LmInfo {
            hidden_size: proj_dim,
            vocab_size: cfg.vocab_size,
            max_positions: cfg.max_position_embeddings,
            bos_token_id: cfg.bos_token_id,
            eos_token_id: cfg.eos_token_id,
            pad_token_id: cfg.pad_token_id,
            decoder_start_token_id: None,
            is_encoder_decoder: false,
        };
        Ok(Self {
            embed_tokens,
            embed_positions,
            project_in,
            project_out,
            layers,
            final_layer_norm,
            lm_head: Linear::with_format(lm_head_weight, None, format)?,
            info,
            device: vb.device().clone(),
            dtype: vb.dtype(),
        })
    }

    fn input_embeds(&self, input: &StepInput) -> Result<Tensor> {
        match input {
            StepInput::Embeds(embeds) => {
                let (_, width) = embeds.dims2()?;
                if width != self.info.hidden_size {
                    return Err(Error::InvalidInput(format!(
                        "input embeddings have width {width}, the language model expects {}",
                        self.info.hidden_size
                    )));
                }
                Ok(embeds.to_dtype(self.dtype)?)
            }
            StepInput::Tokens(ids) => self.embed_tokens(ids),
        }
    }
}

impl LanguageModel for Opt {
    fn info(&self) -> &LmInfo {
        &self.info
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn embed_tokens(&self, ids: &[u32]) -> Result<Tensor> {
        crate::llm::embedding_rows(&self.embed_tokens, ids)
    }

    fn new_cache(&self) -> SeqCache {
        SeqCache::new(self.layers.len())
    }

    fn prefill(&self, prompt_embeds: &Tensor, cache: &mut SeqCache) -> Result<Tensor> {
        let logits =
            self.forward_ragged(&[StepInput::Embeds(prompt_embeds.clone())], &mut [cache])?;
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
        let mut positions = Vec::new();
        let mut lengths = Vec::with_capacity(inputs.len());
        for (input, cache) in inputs.iter().zip(caches.iter()) {
            let e = self.input_embeds(input)?;
            let t = e.dim(0)?;
            if t == 0 {
                return Err(Error::InvalidInput(
                    "a sequence has no new positions".into(),
                ));
            }
            if cache.len + t > self.info.max_positions {
                return Err(Error::InvalidInput(format!(
                    "sequence of {} positions exceeds the context window of {}",
                    cache.len + t,
                    self.info.max_positions
                )));
            }
            positions.extend((cache.len..cache.len + t).map(|p| (p + POSITION_OFFSET) as u32));
            lengths.push(t);
            embeds.push(e);
        }
        let mut xs = Tensor::cat(&embeds, 0)?;
        if let Some(project_in) = &self.project_in {
            xs = project_in.forward(&xs)?;
        }
        let positions = Tensor::new(positions.as_slice(), &self.device)?;
        xs = (xs + self.embed_positions.index_select(&positions, 0)?)?;
        for (index, layer) in self.layers.iter().enumerate() {
            xs = layer.forward(&xs, &lengths, caches, index)?;
        }
        for (cache, &t) in caches.iter_mut().zip(&lengths) {
            cache.len += t;
        }
        // Only each sequence's last position needs logits.
        let mut last_rows = Vec::with_capacity(lengths.len());
        let mut end = 0;
        for &t in &lengths {
            end += t;
            last_rows.push((end - 1) as u32);
        }
        let mut xs = xs.index_select(&Tensor::new(last_rows.as_slice(), &self.device)?, 0)?;
        if let Some(norm) = &self.final_layer_norm {
            xs = norm.forward(&xs)?;
        }
        if let Some(project_out) = &self.project_out {
            xs = project_out.forward(&xs)?;
        }
        Ok(self.lm_head.forward(&xs)?.to_dtype(DType::F32)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causal_mask_hides_only_future_positions() {
        let mask = causal_mask(2, 3, &Device::Cpu).unwrap().unwrap();
        let rows: Vec<Vec<f32>> = mask.to_vec2().unwrap();
        assert_eq!(rows[0], vec![0.0, 0.0, 0.0, 0.0, f32::NEG_INFINITY]);
        assert_eq!(rows[1], vec![0.0; 5]);
        assert!(causal_mask(1, 7, &Device::Cpu).unwrap().is_none());
    }
}
