//! Stage 2 of BLIP-2 (paper section 3.3) with OPT: the Q-Former's query outputs, projected by
//! `language_projection`, become a soft prompt of the frozen language model, which is trained
//! with the language-modelling loss (LAVIS' `Blip2OPT.forward`).
//!
//! The sequence of a pair is what the serving tiers feed for a first turn with one image and
//! the prompt: the session tier sends the image placeholder followed by the turn's text, which
//! the LLM tier tokenises as `"<image>" + prompt` ([`PromptTokenizer::build`]: OPT's BOS, the
//! image's placeholders, the prompt's tokens, as transformers tokenises text with an
//! `<image>` marker; a checkpoint without an image token takes the placeholders first),
//! followed by the target `encode(" " + text)` (no special tokens) and the EOS token. The
//! placeholders' embeddings are the soft-prompt rows. Labels are -100 on the soft prompt, BOS
//! and prompt, the ids on the target and EOS; OPT's shifted cross-entropy, mean over labels.
//!
//! The vision encoder and OPT are frozen (the vision features cached per image); the
//! Q-Former (`qformer.*`, `query_tokens`) and `language_projection` train. The Q-Former can
//! start from a stage-1 checkpoint ([`Stage2Options::qformer_from`]) or from the base
//! checkpoint's (the ablation without stage 1).

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use blip2_model::config::{Blip2Config, OptConfig, TextConfig};
use blip2_model::prompt::{PromptPiece, PromptTokenizer, IMAGE_MARKER};
use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;

use crate::data::Pair;
use crate::error::{Error, Result};
use crate::nn::{linear, scalar, ParamStore, IGNORE_INDEX};
use crate::objective::{Losses, Objective};
use crate::opt::Opt;
use crate::qformer::QFormer;
use crate::stage1::{cached_features, copy_model_files};

/// What [`Stage2::new`] needs besides the checkpoint.
#[derive(Debug, Clone)]
pub struct Stage2Options {
    /// A stage-1 checkpoint whose `qformer.*` and `query_tokens` replace the base
    /// checkpoint's (only the names the base has: its layout is kept).
    pub qformer_from: Option<PathBuf>,
    /// The dtype of every tensor (f32 to train; f64 for gradient checks).
    pub dtype: DType,
}

impl Default for Stage2Options {
    fn default() -> Self {
        Self {
            qformer_from: None,
            dtype: DType::F32,
        }
    }
}

/// Stage 2 through a frozen OPT as an [`Objective`] over [`Pair`]s (see the module docs).
pub struct Stage2 {
    params: ParamStore,
    config: Blip2Config,
    opt_config: OptConfig,
    model_dir: PathBuf,
    prompt: PromptTokenizer,
    eos_id: u32,
    pad_id: u32,
    features: RefCell<HashMap<usize, Tensor>>,
}

/// One position of a stage-2 sequence (OPT's, or T5's encoder input).
#[derive(Clone, Copy)]
pub(crate) enum Slot {
    Token(u32),
    /// Soft-prompt row `q` of the pair's image.
    Soft(usize),
}

/// The names stage 2 trains.
fn stage2_trainable(name: &str) -> bool {
    name.starts_with("qformer.")
        || name == "query_tokens"
        || name.starts_with("language_projection.")
}

/// A `Blip2ForConditionalGeneration` checkpoint's tensors for stage 2 (either language model):
/// with [`Stage2Options::qformer_from`], its `qformer.*` and `query_tokens` replaced by a stage-1
/// checkpoint's (only the names the base has: its layout is kept); the Q-Former,
/// `query_tokens` and `language_projection` trainable.
pub(crate) fn load_params(model_dir: &Path, options: &Stage2Options) -> Result<ParamStore> {
    let device = Device::Cpu;
    let files = blip2_model::checkpoint::weight_files(model_dir)?;
    let mut params = ParamStore::load(&files, options.dtype, &device)?;
    if let Some(from) = &options.qformer_from {
        let files = blip2_model::checkpoint::weight_files(from)?;
        let stage1 = ParamStore::load(&files, options.dtype, &device)?;
        for name in params.names() {
            if !(name.starts_with("qformer.") || name == "query_tokens") {
                continue;
            }
            let Some(t) = stage1.get_opt(&name) else {
                return Err(Error::Invalid(format!(
                    "{}: the stage-1 checkpoint has no `{name}`",
                    from.display()
                )));
            };
            let base = params.get(&name)?;
            if base.dims() != t.dims() {
                return Err(Error::Invalid(format!(
                    "{}: `{name}` is {:?}, the base checkpoint's {:?}",
                    from.display(),
                    t.dims(),
                    base.dims()
                )));
            }
            params.insert(&name, t.clone());
        }
    }
    params.make_trainable(stage2_trainable)?;
    Ok(params)
}

/// The soft prompts `[B, nq, llm_hidden]` of vision features `[B, T, vision_hidden]`:
/// `language_projection(qformer(query_tokens, features))`.
pub(crate) fn soft_prompts(
    params: &ParamStore,
    config: &Blip2Config,
    features: &Tensor,
) -> Result<Tensor> {
    let qf = QFormer::new(params, &config.qformer_config)?;
    let b = features.dim(0)?;
    let out = qf.run(&qf.queries(b)?, None, qf.num_queries, Some(features))?;
    linear(
        &out,
        params.get("language_projection.weight")?,
        Some(params.get("language_projection.bias")?),
    )
}

/// The positions the serving tiers feed for a first turn with one image and `text`: the
/// session tier sends the image placeholder, then the turn's text, and the LLM tier tokenises
/// `"<image>" + text` ([`PromptTokenizer::build`]); a checkpoint without an image token takes
/// the soft prompt before the text.
pub(crate) fn image_then_text(
    prompt: &PromptTokenizer,
    num_query_tokens: usize,
    text: &str,
) -> Result<Vec<Slot>> {
    let text = if prompt.image_token_id().is_some() {
        format!("{IMAGE_MARKER}{text}")
    } else {
        text.to_string()
    };
    let built = prompt.build(&text, 1)?;
    let mut slots = Vec::with_capacity(built.num_positions);
    for piece in &built.pieces {
        match piece {
            PromptPiece::Tokens(ids) => slots.extend(ids.iter().map(|&id| Slot::Token(id))),
            PromptPiece::Image(_) => slots.extend((0..num_query_tokens).map(Slot::Soft)),
        }
    }
    Ok(slots)
}

/// Writes `params` as `dir/model.safetensors` (every tensor, the trained ones at their current
/// values) with `model_dir`'s config, tokenizer, processor and generation config.
pub(crate) fn save_checkpoint(params: &ParamStore, model_dir: &Path, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    params.save(&dir.join("model.safetensors"), |name| {
        Some(name.to_string())
    })?;
    copy_model_files(model_dir, dir)
}

impl Stage2 {
    /// Loads `model_dir` (a `Blip2ForConditionalGeneration` checkpoint with an OPT).
    pub fn new(model_dir: &Path, options: &Stage2Options) -> Result<Self> {
        let config = Blip2Config::from_file(&model_dir.join("config.json"))?;
        let TextConfig::Opt(opt_config) = &config.text_config else {
            return Err(Error::Invalid(format!(
                "{}: stage 2 supports OPT language models (this is {})",
                model_dir.display(),
                config.text_config.model_type()
            )));
        };
        let opt_config = opt_config.clone();
        let params = load_params(model_dir, options)?;
        let prompt = PromptTokenizer::from_dir(model_dir, &config)?;
        Ok(Self {
            eos_id: opt_config.eos_token_id.unwrap_or(2),
            pad_id: opt_config.pad_token_id.unwrap_or(1),
            params,
            config,
            opt_config,
            model_dir: model_dir.to_path_buf(),
            prompt,
            features: RefCell::new(HashMap::new()),
        })
    }

    pub fn params(&self) -> &ParamStore {
        &self.params
    }

    pub fn config(&self) -> &Blip2Config {
        &self.config
    }

    /// The soft prompts `[B, nq, llm_hidden]` of vision features `[B, T, vision_hidden]`.
    pub fn soft_prompts(&self, features: &Tensor) -> Result<Tensor> {
        soft_prompts(&self.params, &self.config, features)
    }

    /// One pair's positions and labels.
    fn sequence(&self, pair: &Pair) -> Result<(Vec<Slot>, Vec<i64>)> {
        let prompt_text = pair.prompt.as_deref().unwrap_or("");
        let mut slots = image_then_text(&self.prompt, self.config.num_query_tokens, prompt_text)?;
        let mut labels = vec![IGNORE_INDEX; slots.len()];
        let target = self
            .prompt
            .tokenizer()
            .encode(format!(" {}", pair.text), false)
            .map_err(|e| Error::Invalid(format!("cannot tokenise `{}`: {e}", pair.text)))?;
        for &id in target.get_ids().iter().chain(std::iter::once(&self.eos_id)) {
            slots.push(Slot::Token(id));
            labels.push(i64::from(id));
        }
        Ok((slots, labels))
    }

    /// A pair's input ids as the reference writes them (each soft-prompt position as the
    /// image token, or the pad id without one) and its labels.
    pub fn input_ids(&self, pair: &Pair) -> Result<(Vec<u32>, Vec<i64>)> {
        let (slots, labels) = self.sequence(pair)?;
        let image = self.prompt.image_token_id().unwrap_or(self.pad_id);
        let ids = slots
            .iter()
            .map(|s| match *s {
                Slot::Token(id) => id,
                Slot::Soft(_) => image,
            })
            .collect();
        Ok((ids, labels))
    }

    /// The LM loss on `batch` (a scalar tensor).
    pub fn loss(&self, batch: &[Pair]) -> Result<Tensor> {
        if batch.is_empty() {
            return Err(Error::Invalid("stage 2 needs at least one pair".into()));
        }
        let features = cached_features(&self.params, &self.config, &self.features, batch)?;
        let soft = self.soft_prompts(&features)?;
        let (b, nq, width) = soft.dims3()?;
        let opt = Opt::new(&self.params, &self.opt_config, "language_model");
        let table = opt.embed_table()?;
        let vocab = table.dim(0)?;
        // One gather from [token embeddings; every soft-prompt row] builds the whole batch.
        let table = Tensor::cat(&[table, &soft.reshape((b * nq, width))?], 0)?;
        let sequences = batch
            .iter()
            .map(|p| self.sequence(p))
            .collect::<Result<Vec<_>>>()?;
        let len = sequences.iter().map(|(s, _)| s.len()).max().unwrap_or(0);
        let mut index = Vec::with_capacity(b);
        let mut attention = Vec::with_capacity(b);
        let mut labels = Vec::with_capacity(b);
        for (row, (slots, row_labels)) in sequences.into_iter().enumerate() {
            let mut ids: Vec<u32> = slots
                .iter()
                .map(|slot| match *slot {
                    Slot::Token(id) => id,
                    Slot::Soft(q) => (vocab + row * nq + q) as u32,
                })
                .collect();
            for slot in &slots {
                if let Slot::Token(id) = *slot {
                    if id as usize >= vocab {
                        return Err(Error::Invalid(format!(
                            "token id {id} is outside OPT's vocabulary ({vocab})"
                        )));
                    }
                }
            }
            let real = ids.len();
            ids.resize(len, self.pad_id);
            let mut row_labels = row_labels;
            row_labels.resize(len, IGNORE_INDEX);
            attention.push((0..len).map(|j| u32::from(j < real)).collect::<Vec<u32>>());
            index.push(ids);
            labels.push(row_labels);
        }
        let embeds = crate::nn::embedding(&table, &index)?;
        let logits = opt.forward(&embeds, &attention)?;
        opt.lm_loss(&logits, &labels)
    }
}

impl Objective for Stage2 {
    type Example = Pair;

    fn trainable(&self) -> Vec<(String, Var)> {
        self.params.trainable()
    }

    fn losses(&self, batch: &[Pair], _rng: &mut StdRng) -> Result<Losses> {
        let total = self.loss(batch)?;
        Ok(Losses {
            parts: vec![("lm".into(), scalar(&total)?)],
            total,
        })
    }

    /// The `Blip2ForConditionalGeneration` layout of the base checkpoint (its tensors, with the
    /// trained ones at their current values), with its config, tokenizer, processor and
    /// generation config copied.
    fn save(&self, dir: &Path) -> Result<()> {
        save_checkpoint(&self.params, &self.model_dir, dir)
    }
}
