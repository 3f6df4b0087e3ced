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

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use blip2_model::config::{Blip2Config, QFormerConfig};
use candle_core::{DType, Device, Tensor, Var, D};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::data::Pair;
use crate::error::{Error, Result};
use crate::nn::{
    activation, cross_entropy, l2_normalize, layer_norm, linear, scalar, Init, IGNORE_INDEX,
};
use crate::objective::{Losses as ObjectiveLosses, Objective};
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
            // A pair whose text equals another pair's (the same caption of two images) is no
            // negative of it: sampling it would teach ITM that a true description mismatches.
            // (LAVIS masks only the pair itself; with distinct texts this is the same.)
            let same = |i: usize, j: usize| i == j || batch.ids[i] == batch.ids[j];
            let image_for_text = transposed
                .iter()
                .enumerate()
                .map(|(row, sims)| sample_negative(sims, |j| same(row, j), rng))
                .collect();
            let text_for_image = s
                .iter()
                .enumerate()
                .map(|(row, sims)| sample_negative(sims, |j| same(row, j), rng))
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

/// One index drawn from `softmax(sims)` with the `excluded` entries at -10000 (never drawn in
/// practice, unless every entry is excluded).
fn sample_negative<R: Rng>(sims: &[f32], excluded: impl Fn(usize) -> bool, rng: &mut R) -> usize {
    let masked: Vec<f64> = sims
        .iter()
        .enumerate()
        .map(|(i, &s)| if excluded(i) { -10000.0 } else { f64::from(s) })
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

/// What [`Stage1::new`] needs besides the checkpoint.
#[derive(Debug, Clone)]
pub struct Stage1Options {
    /// The Q-Former's tokenizer (`tokenizer.json`, BERT-style WordPiece with `[DEC]`); its
    /// directory's `tokenizer_config.json` / `special_tokens_map.json` / `vocab.txt` are
    /// copied on save when present. `None`: the checkpoint's own `tokenizer.json` (a retrieval
    /// checkpoint).
    pub tokenizer: Option<PathBuf>,
    /// Texts are cut to this many tokens, special tokens included (LAVIS' `max_txt_len`).
    pub max_txt_len: usize,
    pub weights: Weights,
    /// Seeds the initialisation of the tensors the checkpoint lacks.
    pub seed: u64,
    /// The dtype of every tensor (f32 to train; f64 for gradient checks).
    pub dtype: DType,
}

impl Default for Stage1Options {
    fn default() -> Self {
        Self {
            tokenizer: None,
            max_txt_len: 32,
            weights: Weights::default(),
            seed: 0,
            dtype: DType::F32,
        }
    }
}

/// Stage 1 as an [`Objective`] over image-text [`Pair`]s: the vision encoder frozen (its
/// features computed once per image and cached), everything else trained.
///
/// Built from any full BLIP-2 checkpoint: a `Blip2ForImageTextRetrieval` one, or a
/// `Blip2ForConditionalGeneration` one whose retrieval parts (text embeddings, the text FFN,
/// projections, `itm_head`) are then initialised as BERT does (normal with
/// `initializer_range`, zero biases, LayerNorm ones and zeros), like `itg_head.*` and `temp`
/// (0.07) when absent. Text embeddings named `qformer.embeddings.*` are read as `embeddings.*`.
pub struct Stage1 {
    params: Params,
    config: Blip2Config,
    raw_config: serde_json::Value,
    model_dir: PathBuf,
    tokenizer_path: PathBuf,
    tokenizer: tokenizers::Tokenizer,
    bos_id: u32,
    pad_id: u32,
    weights: Weights,
    features: RefCell<HashMap<usize, Tensor>>,
}

/// Right-padded ids `[B][L]` and their 0/1 attention mask `[B][L]`.
pub type Tokenized = (Vec<Vec<u32>>, Vec<Vec<u32>>);

/// The names [`Stage1`] trains: everything but the vision encoder and the language model.
fn stage1_trainable(name: &str) -> bool {
    !name.starts_with("vision_model.")
        && !name.starts_with("language_model.")
        && !name.starts_with("language_projection.")
}

impl Stage1 {
    /// Loads `model_dir` (see the type docs).
    pub fn new(model_dir: &Path, options: &Stage1Options) -> Result<Self> {
        let device = Device::Cpu;
        let config_path = model_dir.join("config.json");
        let config = Blip2Config::from_file(&config_path)?;
        let raw_config: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?,
        )
        .map_err(|e| Error::Invalid(format!("{}: {e}", config_path.display())))?;
        let tokenizer_path = options
            .tokenizer
            .clone()
            .unwrap_or_else(|| model_dir.join("tokenizer.json"));
        let mut tokenizer = tokenizers::Tokenizer::from_file(&tokenizer_path)
            .map_err(|e| Error::Invalid(format!("{}: {e}", tokenizer_path.display())))?;
        tokenizer
            .with_truncation(Some(tokenizers::TruncationParams {
                max_length: options.max_txt_len.max(2),
                ..Default::default()
            }))
            .map_err(|e| Error::Invalid(format!("truncation: {e}")))?;
        tokenizer.with_padding(None);
        let bos_id = tokenizer.token_to_id("[DEC]").ok_or_else(|| {
            Error::Invalid(format!(
                "{}: the Q-Former tokenizer has no [DEC] token (ITG's BOS)",
                tokenizer_path.display()
            ))
        })?;
        let pad_id = tokenizer
            .token_to_id("[PAD]")
            .or(config.qformer_config.pad_token_id)
            .unwrap_or(0);
        let vocab = tokenizer.get_vocab_size(true);

        let files = blip2_model::checkpoint::weight_files(model_dir)?;
        let mut params = Params::load(&files, options.dtype, &device)?;
        for part in ["word_embeddings.weight", "position_embeddings.weight"] {
            let from = format!("qformer.embeddings.{part}");
            if let Some(t) = params.remove(&from) {
                let to = format!("embeddings.{part}");
                if !params.contains(&to) {
                    params.insert(&to, t);
                }
            }
        }
        if let Some(words) = params.get_opt("embeddings.word_embeddings.weight") {
            let rows = words.dim(0)?;
            if rows < vocab {
                return Err(Error::Invalid(format!(
                    "the checkpoint's Q-Former word embeddings have {rows} rows, the tokenizer {vocab} tokens"
                )));
            }
        }
        let vocab = params
            .get_opt("embeddings.word_embeddings.weight")
            .map(|w| w.dim(0))
            .transpose()?
            .unwrap_or(vocab);
        init_retrieval_parts(&mut params, &config, vocab, options.seed, options.dtype)?;
        params.make_trainable(stage1_trainable)?;
        Ok(Self {
            params,
            config,
            raw_config,
            model_dir: model_dir.to_path_buf(),
            tokenizer_path,
            tokenizer,
            bos_id,
            pad_id,
            weights: options.weights,
            features: RefCell::new(HashMap::new()),
        })
    }

    pub fn params(&self) -> &Params {
        &self.params
    }

    pub fn config(&self) -> &Blip2Config {
        &self.config
    }

    /// The Q-Former tokenizer's `[DEC]` and padding ids.
    pub fn bos_pad(&self) -> (u32, u32) {
        (self.bos_id, self.pad_id)
    }

    /// Tokenises texts (`[CLS] ... [SEP]`, cut to `max_txt_len`) and right-pads them to the
    /// longest: (ids, attention mask).
    pub fn tokenize(&self, texts: &[&str]) -> Result<Tokenized> {
        let encoded = texts
            .iter()
            .map(|t| {
                self.tokenizer
                    .encode(*t, true)
                    .map(|e| e.get_ids().to_vec())
                    .map_err(|e| Error::Invalid(format!("cannot tokenise `{t}`: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let len = encoded.iter().map(Vec::len).max().unwrap_or(0);
        let attention = encoded
            .iter()
            .map(|ids| (0..len).map(|j| u32::from(j < ids.len())).collect())
            .collect();
        let ids = encoded
            .into_iter()
            .map(|mut ids| {
                ids.resize(len, self.pad_id);
                ids
            })
            .collect();
        Ok((ids, attention))
    }

    /// The frozen vision features `[B, T, vision_hidden]` of the pairs' images, computed once
    /// per `image_index` (all missing images in one batch) and cached.
    pub fn features(&self, batch: &[Pair]) -> Result<Tensor> {
        cached_features(&self.params, &self.config, &self.features, batch)
    }

    /// The stage-1 losses on `batch` with the given ITM negatives or sampled ones.
    pub fn losses_with<R: Rng>(&self, batch: &[Pair], negatives: Negatives<R>) -> Result<Losses> {
        let features = self.features(batch)?;
        let texts: Vec<&str> = batch.iter().map(|p| p.text.as_str()).collect();
        let (ids, attention) = self.tokenize(&texts)?;
        losses(
            &self.params,
            &self.config.qformer_config,
            &Batch {
                features: &features,
                ids: &ids,
                attention: &attention,
            },
            negatives,
            self.bos_id,
            self.pad_id,
            self.weights,
        )
    }
}

impl Objective for Stage1 {
    type Example = Pair;

    fn trainable(&self) -> Vec<(String, Var)> {
        self.params.trainable()
    }

    fn losses(&self, batch: &[Pair], rng: &mut StdRng) -> Result<ObjectiveLosses> {
        let out = self.losses_with(batch, Negatives::Sample(rng))?;
        Ok(ObjectiveLosses {
            parts: vec![
                ("itc".into(), scalar(&out.itc)?),
                ("itm".into(), scalar(&out.itm)?),
                ("itg".into(), scalar(&out.itg)?),
            ],
            total: out.total,
        })
    }

    fn after_update(&self) -> Result<()> {
        clamp_temp(&self.params)
    }

    /// The `Blip2ForImageTextRetrieval` layout (no language model, no `language_projection`)
    /// plus `itg_head.*` and `temp`, its config, the image processor's config and the Q-Former
    /// tokenizer's files.
    fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        self.params.save(&dir.join("model.safetensors"), |name| {
            stage1_saved(name).then(|| name.to_string())
        })?;
        let mut config = self.raw_config.clone();
        let vocab = self
            .params
            .get("embeddings.word_embeddings.weight")?
            .dim(0)?;
        if let Some(obj) = config.as_object_mut() {
            obj.insert(
                "architectures".into(),
                serde_json::json!(["Blip2ForImageTextRetrieval"]),
            );
            obj.insert(
                "image_text_hidden_size".into(),
                serde_json::json!(self.config.image_text_hidden_size),
            );
            let q = obj
                .entry("qformer_config")
                .or_insert_with(|| serde_json::json!({}));
            if let Some(q) = q.as_object_mut() {
                q.insert("use_qformer_text_input".into(), serde_json::json!(true));
                q.insert("vocab_size".into(), serde_json::json!(vocab));
                q.insert("pad_token_id".into(), serde_json::json!(self.pad_id));
            }
        }
        write_json(&dir.join("config.json"), &config)?;
        for name in ["processor_config.json", "preprocessor_config.json"] {
            copy_if_file(&self.model_dir.join(name), &dir.join(name))?;
        }
        copy_if_file(&self.tokenizer_path, &dir.join("tokenizer.json"))?;
        if let Some(tok_dir) = self.tokenizer_path.parent() {
            for name in [
                "tokenizer_config.json",
                "special_tokens_map.json",
                "vocab.txt",
            ] {
                copy_if_file(&tok_dir.join(name), &dir.join(name))?;
            }
        }
        Ok(())
    }
}

/// Whether stage 1 writes `name`: not the language model or its projection.
fn stage1_saved(name: &str) -> bool {
    !name.starts_with("language_model.") && !name.starts_with("language_projection.")
}

/// Writes pretty JSON.
pub(crate) fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

/// A checkpoint's files beside its weights (config, generation config, tokenizer of either
/// kind, image processor) that every stage writes through unchanged.
const MODEL_FILES: [&str; 12] = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "added_tokens.json",
    "processor_config.json",
    "preprocessor_config.json",
    "vocab.txt",
];

/// Copies the [`MODEL_FILES`] that `from` has into `to`.
pub(crate) fn copy_model_files(from: &Path, to: &Path) -> Result<()> {
    for name in MODEL_FILES {
        copy_if_file(&from.join(name), &to.join(name))?;
    }
    Ok(())
}

/// Copies `from` to `to` when `from` is a file (and not `to` itself).
pub(crate) fn copy_if_file(from: &Path, to: &Path) -> Result<()> {
    if from.is_file() && from != to {
        std::fs::copy(from, to).map_err(|e| Error::io(from, e))?;
    }
    Ok(())
}

/// Frozen vision features of the pairs' images through the differentiable ViT (detached),
/// each image computed once and kept in `cache` by `image_index`.
pub(crate) fn cached_features(
    params: &Params,
    config: &Blip2Config,
    cache: &RefCell<HashMap<usize, Tensor>>,
    batch: &[Pair],
) -> Result<Tensor> {
    let mut missing: Vec<&Pair> = Vec::new();
    {
        let cache = cache.borrow();
        for pair in batch {
            if !cache.contains_key(&pair.image_index)
                && !missing.iter().any(|p| p.image_index == pair.image_index)
            {
                missing.push(pair);
            }
        }
    }
    if !missing.is_empty() {
        let pixels: Vec<&Tensor> = missing.iter().map(|p| &p.pixels).collect();
        let dtype = params.get("vision_model.post_layernorm.weight")?.dtype();
        let pixels = Tensor::stack(&pixels, 0)?.to_dtype(dtype)?;
        let vit = crate::vit::Vit::new(params, &config.vision_config, "vision_model");
        let out = vit.forward(&pixels)?.detach();
        let mut cache = cache.borrow_mut();
        for (i, pair) in missing.iter().enumerate() {
            cache.insert(pair.image_index, out.get(i)?);
        }
    }
    let cache = cache.borrow();
    let rows = batch
        .iter()
        .map(|p| {
            cache
                .get(&p.image_index)
                .ok_or_else(|| Error::Invalid("vision feature cache miss".into()))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::stack(&rows, 0)?)
}

/// Initialises the retrieval parts a checkpoint lacks (see [`Stage1`]).
fn init_retrieval_parts(
    params: &mut Params,
    config: &Blip2Config,
    vocab: usize,
    seed: u64,
    dtype: DType,
) -> Result<()> {
    let q = &config.qformer_config;
    let (h, inter) = (q.hidden_size, q.intermediate_size);
    let e = config.image_text_hidden_size;
    let std = 0.02;
    let device = Device::Cpu;
    let mut rng = StdRng::seed_from_u64(seed ^ 0x0005_7471);
    let mut linears: Vec<(String, usize, usize)> = vec![
        ("vision_projection".into(), e, h),
        ("text_projection".into(), e, h),
        ("itm_head".into(), 2, h),
        ("itg_head.transform.dense".into(), h, h),
    ];
    let mut norms: Vec<String> = vec!["itg_head.transform.LayerNorm".into()];
    for i in 0..q.num_hidden_layers {
        let layer = format!("qformer.encoder.layer.{i}");
        linears.push((format!("{layer}.intermediate.dense"), inter, h));
        linears.push((format!("{layer}.output.dense"), h, inter));
        norms.push(format!("{layer}.output.LayerNorm"));
    }
    let mut ensure = |params: &mut Params, name: &str, shape: &[usize], init: Init| {
        params.ensure(name, shape, init, &device, &mut rng)
    };
    ensure(
        params,
        "embeddings.word_embeddings.weight",
        &[vocab, h],
        Init::Normal(std),
    )?;
    ensure(
        params,
        "embeddings.position_embeddings.weight",
        &[q.max_position_embeddings, h],
        Init::Normal(std),
    )?;
    for (name, out, inp) in &linears {
        ensure(
            params,
            &format!("{name}.weight"),
            &[*out, *inp],
            Init::Normal(std),
        )?;
        ensure(params, &format!("{name}.bias"), &[*out], Init::Const(0.0))?;
    }
    for name in &norms {
        ensure(params, &format!("{name}.weight"), &[h], Init::Const(1.0))?;
        ensure(params, &format!("{name}.bias"), &[h], Init::Const(0.0))?;
    }
    ensure(params, "itg_head.bias", &[vocab], Init::Const(0.0))?;
    ensure(params, "temp", &[], Init::Const(0.07))?;
    for name in params.names() {
        let t = params.get(&name)?;
        if t.dtype() != dtype {
            let t = t.to_dtype(dtype)?;
            params.insert(&name, t);
        }
    }
    Ok(())
}
