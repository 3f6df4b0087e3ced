//! `blip2 train stage1`: stage 1 on a manifest, from a `Blip2ForImageTextRetrieval` checkpoint.
//!
//! The vision encoder is frozen (its features are computed once per image with `blip2-model`'s
//! inference path); everything else trains with [`crate::stage1::losses`] (ITM negatives
//! sampled), AdamW ([`crate::optim`]), linear warm-up and cosine decay, global-norm clipping and
//! the temperature clamp. Captions only: manifest lines with a prompt are left out. The ITG
//! head and `temp` are initialised when the checkpoint lacks them (BERT's init: normal with
//! `initializer_range`, LayerNorm ones and zeros, bias zeros; `temp` 0.07).
//!
//! The result is written as a checkpoint directory in the same layout plus `itg_head.*` and
//! `temp` (which transformers ignores on load), with the config, tokenizer and processor files
//! copied: written into `OUT.tmp` and renamed over `OUT`, so an interrupted run never leaves a
//! half-written checkpoint. Not yet: accumulation, resume, intermediate checkpoints, signals.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use blip2_model::config::Blip2Config;
use blip2_model::retrieval::{RetrievalLoadOptions, RetrievalModel};
use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::data;
use crate::error::{Error, Result};
use crate::nn::scalar;
use crate::optim::{clip_grad_norm, lr_at, AdamW, AdamWConfig};
use crate::qformer::Params;
use crate::stage1::{self, Batch, Negatives, Weights};

/// What to run.
#[derive(Debug, Clone)]
pub struct Stage1Options {
    pub model: PathBuf,
    pub data: PathBuf,
    pub out: PathBuf,
    pub steps: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: usize,
    pub weight_decay: f64,
    pub grad_clip: f64,
    pub seed: u64,
    /// Stop at the first bad manifest line instead of skipping it.
    pub strict: bool,
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct Stage1Report {
    pub pairs: usize,
    pub images: usize,
    pub skipped: Vec<String>,
    /// Per step: (itc, itm, itg, total).
    pub losses: Vec<[f64; 4]>,
    pub seconds: f64,
}

/// Std of the ITG head's initial dense weight (transformers' Q-Former `initializer_range`).
const INITIALIZER_RANGE: f64 = 0.02;

const TOKENIZER_FILES: [&str; 7] = [
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "processor_config.json",
    "preprocessor_config.json",
];

/// Runs stage 1 (see the module docs).
pub fn run(
    opts: &Stage1Options,
    mut on_step: impl FnMut(usize, &[f64; 4]),
) -> Result<Stage1Report> {
    if opts.batch_size < 2 || opts.steps == 0 {
        return Err(Error::Invalid(
            "stage 1 needs --steps >= 1 and --batch-size >= 2 (in-batch contrastive loss)".into(),
        ));
    }
    let started = Instant::now();
    let device = Device::Cpu;
    let model = RetrievalModel::load(&opts.model, &RetrievalLoadOptions::default())?;
    let config = Blip2Config::from_file(&opts.model.join("config.json"))?;
    let qcfg = &config.qformer_config;

    let dataset = data::load(&opts.data, model.processor(), opts.strict)?;
    let pairs: Vec<&data::Pair> = dataset
        .pairs
        .iter()
        .filter(|p| p.prompt.is_none())
        .collect();
    if pairs.len() < opts.batch_size {
        return Err(Error::Invalid(format!(
            "{} captions in {} (lines with a prompt are not used by stage 1): fewer than one batch of {}",
            pairs.len(),
            opts.data.display(),
            opts.batch_size
        )));
    }
    // Frozen features, once per image.
    let mut features: HashMap<usize, Tensor> = HashMap::new();
    for pair in &pairs {
        if let std::collections::hash_map::Entry::Vacant(slot) = features.entry(pair.image_index) {
            let f = model.vision_features(&pair.pixels.unsqueeze(0)?)?;
            slot.insert(f.squeeze(0)?);
        }
    }
    let tokenizer = model.tokenizer();
    let pad_id = tokenizer.token_to_id("[PAD]").unwrap_or(0);
    let bos_id = tokenizer.token_to_id("[DEC]").ok_or_else(|| {
        Error::Invalid("the Q-Former tokenizer has no [DEC] token (ITG's BOS)".into())
    })?;
    let tokens: Vec<Vec<u32>> = pairs
        .iter()
        .map(|p| Ok(model.tokenize(&[p.text.as_str()])?.remove(0).ids))
        .collect::<Result<_>>()?;

    let files = blip2_model::checkpoint::weight_files(&opts.model)?;
    let mut params = Params::load(&files, DType::F32, &device)?;
    init_missing(
        &mut params,
        qcfg.hidden_size,
        qcfg.vocab_size,
        INITIALIZER_RANGE,
        opts.seed,
    )?;
    params.make_trainable(|name| !name.starts_with("vision_model."))?;
    let mut optimizer = AdamW::new(
        params.trainable(),
        AdamWConfig {
            weight_decay: opts.weight_decay,
            ..AdamWConfig::default()
        },
    )?;
    let vars: Vec<candle_core::Var> = params.trainable().into_iter().map(|(_, v)| v).collect();
    let var_refs: Vec<&candle_core::Var> = vars.iter().collect();

    let mut order: Vec<usize> = Vec::new();
    let mut epoch = 0u64;
    let mut losses = Vec::with_capacity(opts.steps);
    for step in 0..opts.steps {
        if order.len() < opts.batch_size {
            let mut next: Vec<usize> = (0..pairs.len()).collect();
            next.shuffle(&mut StdRng::seed_from_u64(opts.seed.wrapping_add(epoch)));
            epoch += 1;
            order = next;
        }
        let picked: Vec<usize> = order.drain(..opts.batch_size).collect();
        let len = picked.iter().map(|&i| tokens[i].len()).max().unwrap_or(1);
        let ids: Vec<Vec<u32>> = picked
            .iter()
            .map(|&i| {
                let mut row = tokens[i].clone();
                row.resize(len, pad_id);
                row
            })
            .collect();
        let attention: Vec<Vec<u32>> = picked
            .iter()
            .map(|&i| (0..len).map(|j| u32::from(j < tokens[i].len())).collect())
            .collect();
        let feats: Vec<&Tensor> = picked
            .iter()
            .map(|&i| &features[&pairs[i].image_index])
            .collect();
        let feats = Tensor::stack(&feats, 0)?;
        let mut rng =
            StdRng::seed_from_u64(opts.seed ^ (step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let out = stage1::losses(
            &params,
            qcfg,
            &Batch {
                features: &feats,
                ids: &ids,
                attention: &attention,
            },
            Negatives::Sample(&mut rng),
            bos_id,
            pad_id,
            Weights::default(),
        )?;
        let values = [
            scalar(&out.itc)?,
            scalar(&out.itm)?,
            scalar(&out.itg)?,
            scalar(&out.total)?,
        ];
        let mut grads = out.total.backward()?;
        clip_grad_norm(&mut grads, &var_refs, opts.grad_clip)?;
        let lr = lr_at(step, opts.steps, opts.warmup_steps, opts.lr, opts.min_lr);
        optimizer.step(&grads, lr)?;
        stage1::clamp_temp(&params)?;
        on_step(step, &values);
        losses.push(values);
    }
    save(&params, &opts.model, &opts.out)?;
    Ok(Stage1Report {
        pairs: pairs.len(),
        images: features.len(),
        skipped: dataset.skipped,
        losses,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The ITG head and `temp` when the checkpoint lacks them.
fn init_missing(params: &mut Params, h: usize, vocab: usize, std: f64, seed: u64) -> Result<()> {
    use rand::Rng;
    let device = Device::Cpu;
    let mut rng = StdRng::seed_from_u64(seed ^ 0x1761);
    let mut normal = |n: usize| -> Vec<f32> {
        // Box-Muller: rand 0.9 has no normal distribution without rand_distr.
        (0..n)
            .map(|_| {
                let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
                let u2: f64 = rng.random();
                ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos() * std) as f32
            })
            .collect()
    };
    let entries: Vec<(&str, Tensor)> = vec![
        (
            "itg_head.transform.dense.weight",
            Tensor::from_vec(normal(h * h), (h, h), &device)?,
        ),
        (
            "itg_head.transform.dense.bias",
            Tensor::zeros(h, DType::F32, &device)?,
        ),
        (
            "itg_head.transform.LayerNorm.weight",
            Tensor::ones(h, DType::F32, &device)?,
        ),
        (
            "itg_head.transform.LayerNorm.bias",
            Tensor::zeros(h, DType::F32, &device)?,
        ),
        ("itg_head.bias", Tensor::zeros(vocab, DType::F32, &device)?),
        ("temp", Tensor::new(0.07f32, &device)?),
    ];
    for (name, t) in entries {
        if !params.contains(name) {
            params.insert(name, t);
        }
    }
    Ok(())
}

/// Writes the checkpoint into `out.tmp`, then renames it over `out`.
fn save(params: &Params, model_dir: &Path, out: &Path) -> Result<()> {
    let tmp = out.with_extension("tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let tensors = params.snapshot();
    let weights = tmp.join("model.safetensors");
    candle_core::safetensors::save(&tensors, &weights)?;
    for name in TOKENIZER_FILES {
        let from = model_dir.join(name);
        if from.is_file() {
            std::fs::copy(&from, tmp.join(name)).map_err(|e| Error::io(&from, e))?;
        }
    }
    if out.exists() {
        std::fs::remove_dir_all(out).map_err(|e| Error::io(out, e))?;
    }
    std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e))
}
