//! Stage 1 of BLIP-2 (paper section 3.2): the Q-Former learns against the frozen image encoder
//! with three losses, computed as LAVIS' `Blip2Qformer.forward` computes them.
//!
//! - **ITC**: image `normalize(vision_projection(Q))` per query `[B, nq, E]`, text
//!   `normalize(text_projection(T[:, 0]))` (`[CLS]` of the Q-Former on the text alone);
//!   `sim_i2t[i, j] = max_q img[i, q] . txt[j] / temp`, `sim_t2i` its transpose;
//!   `(CE(sim_i2t) + CE(sim_t2i)) / 2` against the diagonal, label smoothing 0.1.
//! - **ITM**: for each text a negative image and for each image a negative text, sampled from
//!   `softmax` of the ITC similarities with the diagonal at -10000 (hard negatives);
//!   `[text, text, neg text]` with `[image, neg image, image]` through the Q-Former together
//!   (queries and text attend to each other), `itm_head` averaged over the query outputs,
//!   cross-entropy against `[1] * B + [0] * 2B`.
//! - **ITG**: the text with `[CLS]` replaced by the BOS token (`[DEC]`) after the queries, with
//!   the multimodal causal mask (queries see the queries; text token `i` sees the queries and
//!   text `0..=i`); a BERT LM head (`itg_head.transform.dense`, the activation,
//!   `itg_head.transform.LayerNorm`, the word embeddings tied as decoder, `itg_head.bias`);
//!   shifted cross-entropy with label smoothing 0.1, padding ignored.
//!
//! The temperature is the scalar parameter `temp` (0.07 at the start in LAVIS), clamped to
//! `[0.001, 0.5]` after each update ([`clamp_temp`]).

use blip2_model::config::QFormerConfig;
use candle_core::{DType, Tensor, D};
use rand::Rng;

use crate::error::{Error, Result};
use crate::nn::{activation, cross_entropy, l2_normalize, layer_norm, linear, IGNORE_INDEX};
use crate::qformer::{padding_mask, Params, QFormer, MASKED};

/// Label smoothing of the ITC and ITG losses (LAVIS).
pub const LABEL_SMOOTHING: f64 = 0.1;

/// One batch of image-text pairs, tokenised for the Q-Former.
pub struct Batch<'a> {
    /// Frozen vision features `[B, S, vision_hidden]` (after `post_layernorm`).
    pub features: &'a Tensor,
    /// Right-padded ids `[B][L]`, `[CLS]` first.
    pub ids: &'a [Vec<u32>],
    /// 1 for tokens, 0 for padding, `[B][L]`.
    pub attention: &'a [Vec<u32>],
}

/// How ITM picks its negatives.
pub enum Negatives<'a, R: Rng> {
    /// `image_for_text[b]`: the negative image of text `b`; `text_for_image[b]`: the negative
    /// text of image `b`.
    Given {
        image_for_text: &'a [usize],
        text_for_image: &'a [usize],
    },
    /// Sampled from the ITC similarities, as LAVIS does.
    Sample(&'a mut R),
}

/// The three losses and their weighted sum.
pub struct Losses {
    pub itc: Tensor,
    pub itm: Tensor,
    pub itg: Tensor,
    pub total: Tensor,
    /// The negatives ITM used.
    pub image_for_text: Vec<usize>,
    pub text_for_image: Vec<usize>,
}

/// Weights of the losses in the total (LAVIS: 1, 1, 1).
#[derive(Debug, Clone, Copy)]
pub struct Weights {
    pub itc: f64,
    pub itm: f64,
    pub itg: f64,
}

impl Default for Weights {
    fn default() -> Self {
        Self {
            itc: 1.0,
            itm: 1.0,
            itg: 1.0,
        }
    }
}

/// The stage-1 losses on `batch`. `bos_id`: the Q-Former tokenizer's `[DEC]`; `pad_id`: its
/// padding id.
pub fn losses<R: Rng>(
    params: &Params,
    cfg: &QFormerConfig,
    batch: &Batch,
    negatives: Negatives<R>,
    bos_id: u32,
    pad_id: u32,
    weights: Weights,
) -> Result<Losses> {
    let qf = QFormer::new(params, cfg)?;
    let b = batch.ids.len();
    if b < 2 || batch.features.dim(0)? != b || batch.attention.len() != b {
        return Err(Error::Invalid(format!(
            "stage 1 needs at least 2 pairs with one image each (got {b} texts, {} images)",
            batch.features.dim(0)?
        )));
    }
    let nq = qf.num_queries;
    let dtype = batch.features.dtype();
    let device = batch.features.device();

    // ITC.
    let query_out = qf.run(&qf.queries(b)?, None, nq, Some(batch.features))?;
    let image_feats = l2_normalize(&linear_named(params, "vision_projection", &query_out)?)?;
    let text_mask = padding_mask(batch.attention, dtype, device)?;
    let text_out = qf.run(&qf.embed_text(batch.ids)?, Some(&text_mask), 0, None)?;
    let cls = text_out.narrow(1, 0, 1)?.squeeze(1)?;
    let text_feat = l2_normalize(&linear_named(params, "text_projection", &cls)?)?;
    let e = text_feat.dim(1)?;
    // [B * nq, E] x [E, B] -> [B, nq, B] -> max over the queries -> [B (image), B (text)].
    let sim_q2t = image_feats
        .reshape((b * nq, e))?
        .matmul(&text_feat.t()?)?
        .reshape((b, nq, b))?;
    let sim = sim_q2t.max(1)?;
    let temp = params.get("temp")?;
    let sim_i2t = sim.broadcast_div(temp)?;
    let sim_t2i = sim_i2t.t()?.contiguous()?;
    let targets: Vec<i64> = (0..b as i64).collect();
    let itc = ((cross_entropy(&sim_i2t, &targets, LABEL_SMOOTHING)?
        + cross_entropy(&sim_t2i, &targets, LABEL_SMOOTHING)?)?
        / 2.0)?;

    // ITM negatives.
    let (image_for_text, text_for_image) = match negatives {
        Negatives::Given {
            image_for_text,
            text_for_image,
        } => {
            if image_for_text.len() != b
                || text_for_image.len() != b
                || image_for_text.iter().chain(text_for_image).any(|&i| i >= b)
            {
                return Err(Error::Invalid(
                    "negative indices must be B indices < B".into(),
                ));
            }
            (image_for_text.to_vec(), text_for_image.to_vec())
        }
        Negatives::Sample(rng) => {
            let s: Vec<Vec<f32>> = sim_i2t.detach().to_dtype(DType::F32)?.to_vec2()?;
            let transposed: Vec<Vec<f32>> =
                (0..b).map(|j| (0..b).map(|i| s[i][j]).collect()).collect();
            let image_for_text = transposed
                .iter()
                .enumerate()
                .map(|(row, sims)| sample_negative(sims, row, rng))
                .collect();
            let text_for_image = s
                .iter()
                .enumerate()
                .map(|(row, sims)| sample_negative(sims, row, rng))
                .collect();
            (image_for_text, text_for_image)
        }
    };

    // ITM.
    let neg_images = index(batch.features, &image_for_text)?;
    let features_all = Tensor::cat(&[batch.features, &neg_images, batch.features], 0)?;
    let mut ids_all: Vec<Vec<u32>> = batch.ids.to_vec();
    ids_all.extend(batch.ids.iter().cloned());
    let mut attention_all: Vec<Vec<u32>> = batch.attention.to_vec();
    attention_all.extend(batch.attention.iter().cloned());
    for &t in &text_for_image {
        ids_all.push(batch.ids[t].clone());
        attention_all.push(batch.attention[t].clone());
    }
    let embeds = Tensor::cat(&[&qf.queries(3 * b)?, &qf.embed_text(&ids_all)?], 1)?;
    let query_keys: Vec<Vec<u32>> = vec![vec![1; nq]; 3 * b];
    let keys: Vec<Vec<u32>> = query_keys
        .into_iter()
        .zip(&attention_all)
        .map(|(mut q, t)| {
            q.extend(t);
            q
        })
        .collect();
    let mask = padding_mask(&keys, dtype, device)?;
    let out = qf.run(&embeds, Some(&mask), nq, Some(&features_all))?;
    let itm_logits = linear_named(params, "itm_head", &out.narrow(1, 0, nq)?)?.mean(1)?;
    let mut itm_labels = vec![1i64; b];
    itm_labels.extend(std::iter::repeat_n(0i64, 2 * b));
    let itm = cross_entropy(&itm_logits, &itm_labels, 0.0)?;

    // ITG.
    let len = batch.ids[0].len();
    let dec_ids: Vec<Vec<u32>> = batch
        .ids
        .iter()
        .map(|row| {
            let mut row = row.clone();
            row[0] = bos_id;
            row
        })
        .collect();
    let labels: Vec<i64> = dec_ids
        .iter()
        .flat_map(|row| {
            row[1..].iter().map(|&id| {
                if id == pad_id {
                    IGNORE_INDEX
                } else {
                    i64::from(id)
                }
            })
        })
        .collect();
    let total_len = nq + len;
    let mut causal = Vec::with_capacity(b * total_len * total_len);
    for attention in batch.attention {
        for row in 0..total_len {
            for col in 0..total_len {
                let visible = if row < nq {
                    col < nq
                } else {
                    col < nq || (col <= row && attention[col - nq] != 0)
                };
                causal.push(if visible { 0f32 } else { MASKED });
            }
        }
    }
    let causal = Tensor::from_vec(causal, (b, 1, total_len, total_len), device)?.to_dtype(dtype)?;
    let embeds = Tensor::cat(&[&qf.queries(b)?, &qf.embed_text(&dec_ids)?], 1)?;
    let out = qf.run(&embeds, Some(&causal), nq, Some(batch.features))?;
    let text_states = out.narrow(1, nq, len - 1)?;
    let hidden = linear_named(params, "itg_head.transform.dense", &text_states)?;
    let hidden = activation(cfg.hidden_act, &hidden)?;
    let hidden = layer_norm(
        &hidden,
        params.get("itg_head.transform.LayerNorm.weight")?,
        params.get("itg_head.transform.LayerNorm.bias")?,
        cfg.layer_norm_eps,
    )?;
    let words = params.get("embeddings.word_embeddings.weight")?;
    let scores = linear(&hidden, words, Some(params.get("itg_head.bias")?))?;
    let vocab = scores.dim(D::Minus1)?;
    let itg = cross_entropy(
        &scores.reshape((b * (len - 1), vocab))?,
        &labels,
        LABEL_SMOOTHING,
    )?;

    let total = (((&itc * weights.itc)? + (&itm * weights.itm)?)? + (&itg * weights.itg)?)?;
    Ok(Losses {
        itc,
        itm,
        itg,
        total,
        image_for_text,
        text_for_image,
    })
}

/// Clamps `temp` into `[0.001, 0.5]` (LAVIS, after each update).
pub fn clamp_temp(params: &Params) -> Result<()> {
    if let Some(var) = params.var("temp") {
        var.set(&var.as_detached_tensor().clamp(0.001, 0.5)?)?;
    }
    Ok(())
}

fn linear_named(params: &Params, prefix: &str, xs: &Tensor) -> Result<Tensor> {
    linear(
        xs,
        params.get(&format!("{prefix}.weight"))?,
        Some(params.get(&format!("{prefix}.bias"))?),
    )
}

fn index(t: &Tensor, rows: &[usize]) -> Result<Tensor> {
    let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
    let idx = Tensor::from_vec(idx, rows.len(), t.device())?;
    Ok(t.index_select(&idx, 0)?)
}

/// One index drawn from `softmax(sims)` with `sims[own]` at -10000 (never `own` in practice).
fn sample_negative<R: Rng>(sims: &[f32], own: usize, rng: &mut R) -> usize {
    let masked: Vec<f64> = sims
        .iter()
        .enumerate()
        .map(|(i, &s)| if i == own { -10000.0 } else { f64::from(s) })
        .collect();
    let max = masked.iter().cloned().fold(f64::MIN, f64::max);
    let weights: Vec<f64> = masked.iter().map(|s| (s - max).exp()).collect();
    let total: f64 = weights.iter().sum();
    let mut draw = rng.random::<f64>() * total;
    for (i, w) in weights.iter().enumerate() {
        if draw < *w {
            return i;
        }
        draw -= w;
    }
    // Rounding left the draw past the end: the last index with weight.
    weights.iter().rposition(|&w| w > 0.0).unwrap_or(0)
}
