//! Stage 2 of BLIP-2 (paper section 3.3) with Flan-T5: the Q-Former's query outputs, projected
//! by `language_projection`, become a soft prompt of the frozen encoder-decoder, which is
//! trained with the prefix language-modelling loss (LAVIS' `Blip2T5.forward`).
//!
//! Each pair divides into a prefix, which the encoder reads after the image, and a target,
//! which the decoder learns to write ([`Split`]): a question-answer pair's prompt and answer;
//! a caption split at a word drawn uniformly (the paper's prefix LM), so that the target is
//! never empty. The encoder's input is what the serving tiers feed for one image and the
//! prefix: the LLM tier tokenises `"<image>" + prefix` ([`PromptTokenizer::build`]: the image's
//! placeholders, the prefix's tokens and T5's `</s>`; a checkpoint without an image token
//! takes the placeholders first), and the placeholders' embeddings are the soft-prompt rows.
//! The labels are `tokenizer(target)` (which ends with `</s>`), padded with -100; the decoder
//! reads them shifted right after `decoder_start_token_id` (-100 as the pad id); cross-entropy
//! mean over the labels, no smoothing.
//!
//! The vision encoder and T5 are frozen (the vision features cached per image); the Q-Former
//! (`qformer.*`, `query_tokens`) and `language_projection` train. The Q-Former can start from
//! a stage-1 checkpoint ([`Stage2Options::qformer_from`]) or from the base checkpoint's.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use blip2_model::config::{Blip2Config, T5Config, TextConfig};
use blip2_model::prompt::PromptTokenizer;
use candle_core::{Tensor, Var};
use rand::rngs::StdRng;
use rand::Rng;

use crate::data::Pair;
use crate::error::{Error, Result};
use crate::nn::{scalar, ParamStore, IGNORE_INDEX};
use crate::objective::{Losses, Objective};
use crate::stage1::cached_features;
pub use crate::stage2::Stage2Options;
use crate::stage2::{image_then_text, load_params, save_checkpoint, soft_prompts, Slot};
use crate::t5::T5;

/// How a pair divides into the encoder's prefix and the decoder's target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// The pair's prompt (none: empty) is the prefix, its text the target.
    Prompt,
    /// A caption (a pair without a prompt) split after its first `n` whitespace-separated
    /// words: those words joined by spaces are the prefix, the rest the target (`n` is less
    /// than the number of words, so the target is never empty).
    Words(usize),
}

impl Split {
    /// The split [`Objective::losses`] uses: [`Split::Prompt`] for a pair with a prompt; for
    /// a caption of `n >= 2` words, `Words(k)` with `k` uniform in `1..n`; a one-word caption
    /// `Words(0)` (an empty prefix); an empty caption [`Split::Prompt`].
    pub fn draw(pair: &Pair, rng: &mut impl Rng) -> Split {
        if pair.prompt.is_some() {
            return Split::Prompt;
        }
        match pair.text.split_whitespace().count() {
            0 => Split::Prompt,
            1 => Split::Words(0),
            n => Split::Words(rng.random_range(1..n)),
        }
    }

    /// The prefix and target texts of `pair`.
    pub fn apply(self, pair: &Pair) -> Result<(String, String)> {
        match self {
            Split::Prompt => Ok((pair.prompt.clone().unwrap_or_default(), pair.text.clone())),
            Split::Words(n) => {
                if pair.prompt.is_some() {
                    return Err(Error::Invalid(format!(
                        "a pair with a prompt is not split into words (`{}`)",
                        pair.text
                    )));
                }
                let words: Vec<&str> = pair.text.split_whitespace().collect();
                if n >= words.len() {
                    return Err(Error::Invalid(format!(
                        "cannot split `{}` after {n} word(s): the target would be empty",
                        pair.text
                    )));
                }
                Ok((words[..n].join(" "), words[n..].join(" ")))
            }
        }
    }
}

/// A batch as the reference's tensors hold it (rows right-padded to one length).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct T5Batch {
    /// Encoder ids, each soft-prompt position as the image token (the pad id without one),
    /// padded with the pad id.
    pub input_ids: Vec<Vec<u32>>,
    pub attention_mask: Vec<Vec<u32>>,
    /// The target's ids (ending with `</s>`), padded with -100.
    pub labels: Vec<Vec<i64>>,
    /// `decoder_start_token_id` then the labels but the last, -100 as the pad id.
    pub decoder_input_ids: Vec<Vec<u32>>,
    pub decoder_attention_mask: Vec<Vec<u32>>,
}

/// Stage 2 through a frozen Flan-T5 as an [`Objective`] over [`Pair`]s (see the module docs).
pub struct Stage2T5 {
    params: ParamStore,
    config: Blip2Config,
    t5_config: T5Config,
    model_dir: PathBuf,
    prompt: PromptTokenizer,
    eos_id: u32,
    pad_id: u32,
    features: RefCell<HashMap<usize, Tensor>>,
}

impl Stage2T5 {
    /// Loads `model_dir` (a `Blip2ForConditionalGeneration` checkpoint with a T5).
    pub fn new(model_dir: &Path, options: &Stage2Options) -> Result<Self> {
        let config = Blip2Config::from_file(&model_dir.join("config.json"))?;
        let TextConfig::T5(t5_config) = &config.text_config else {
            return Err(Error::Invalid(format!(
                "{}: this stage 2 is for T5 language models (this is {})",
                model_dir.display(),
                config.text_config.model_type()
            )));
        };
        let t5_config = t5_config.clone();
        let params = load_params(model_dir, options)?;
        let prompt = PromptTokenizer::from_dir(model_dir, &config)?;
        Ok(Self {
            eos_id: t5_config.eos_token_id.unwrap_or(1),
            pad_id: t5_config.pad_token_id.unwrap_or(0),
            params,
            config,
            t5_config,
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

    /// The soft prompts `[B, nq, d_model]` of vision features `[B, T, vision_hidden]`.
    pub fn soft_prompts(&self, features: &Tensor) -> Result<Tensor> {
        soft_prompts(&self.params, &self.config, features)
    }

    /// The encoder positions of one image and `prefix` (see the module docs).
    fn encoder_slots(&self, prefix: &str) -> Result<Vec<Slot>> {
        image_then_text(&self.prompt, self.config.num_query_tokens, prefix)
    }

    /// `tokenizer(target)`: its ids with `</s>` last (appended if the tokenizer does not).
    fn target_ids(&self, target: &str) -> Result<Vec<u32>> {
        let mut ids = self.prompt.encode(target)?;
        if ids.last() != Some(&self.eos_id) {
            ids.push(self.eos_id);
        }
        Ok(ids)
    }

    /// The encoder positions and target ids of each pair under its split.
    fn rows(&self, batch: &[Pair], splits: &[Split]) -> Result<Vec<(Vec<Slot>, Vec<u32>)>> {
        if batch.is_empty() {
            return Err(Error::Invalid("stage 2 needs at least one pair".into()));
        }
        if splits.len() != batch.len() {
            return Err(Error::Invalid(format!(
                "{} splits for {} pairs",
                splits.len(),
                batch.len()
            )));
        }
        let vocab = self.t5_config.vocab_size;
        batch
            .iter()
            .zip(splits)
            .map(|(pair, split)| {
                let (prefix, target) = split.apply(pair)?;
                let slots = self.encoder_slots(&prefix)?;
                let target = self.target_ids(&target)?;
                let tokens = slots.iter().filter_map(|s| match *s {
                    Slot::Token(id) => Some(id),
                    Slot::Soft(_) => None,
                });
                if let Some(bad) = tokens
                    .chain(target.iter().copied())
                    .find(|&id| id as usize >= vocab)
                {
                    return Err(Error::Invalid(format!(
                        "token id {bad} is outside T5's vocabulary ({vocab})"
                    )));
                }
                Ok((slots, target))
            })
            .collect()
    }

    /// The batch's ids, masks, labels and decoder inputs, as the reference writes them.
    pub fn batch(&self, batch: &[Pair], splits: &[Split]) -> Result<T5Batch> {
        let rows = self.rows(batch, splits)?;
        let image = self.prompt.image_token_id().unwrap_or(self.pad_id);
        Ok(self.layout(&rows, |_, slot| match slot {
            Slot::Token(id) => id,
            Slot::Soft(_) => image,
        }))
    }

    /// Pads `rows` into a [`T5Batch`], `encoder_id` giving the id of each encoder slot of row
    /// `i`.
    fn layout(
        &self,
        rows: &[(Vec<Slot>, Vec<u32>)],
        encoder_id: impl Fn(usize, Slot) -> u32,
    ) -> T5Batch {
        let le = rows.iter().map(|(s, _)| s.len()).max().unwrap_or(0);
        let ld = rows.iter().map(|(_, t)| t.len()).max().unwrap_or(0);
        let start = self.t5_config.decoder_start_token_id();
        let mut out = T5Batch {
            input_ids: Vec::with_capacity(rows.len()),
            attention_mask: Vec::with_capacity(rows.len()),
            labels: Vec::with_capacity(rows.len()),
            decoder_input_ids: Vec::with_capacity(rows.len()),
            decoder_attention_mask: Vec::with_capacity(rows.len()),
        };
        for (i, (slots, target)) in rows.iter().enumerate() {
            let mut ids: Vec<u32> = slots.iter().map(|&s| encoder_id(i, s)).collect();
            ids.resize(le, self.pad_id);
            out.input_ids.push(ids);
            out.attention_mask
                .push((0..le).map(|j| u32::from(j < slots.len())).collect());
            let mut labels: Vec<i64> = target.iter().map(|&id| i64::from(id)).collect();
            labels.resize(ld, IGNORE_INDEX);
            let mut decoder = Vec::with_capacity(ld);
            decoder.push(start);
            decoder.extend(
                labels
                    .iter()
                    .take(ld.saturating_sub(1))
                    .map(|&l| u32::try_from(l).unwrap_or(self.pad_id)),
            );
            out.labels.push(labels);
            out.decoder_input_ids.push(decoder);
            out.decoder_attention_mask
                .push((0..ld).map(|j| u32::from(j < target.len())).collect());
        }
        out
    }

    /// The prefix-LM loss on `batch` with each pair divided by its `split` (a scalar tensor).
    pub fn loss_with_splits(&self, batch: &[Pair], splits: &[Split]) -> Result<Tensor> {
        let rows = self.rows(batch, splits)?;
        let features = cached_features(&self.params, &self.config, &self.features, batch)?;
        let soft = self.soft_prompts(&features)?;
        let (b, nq, width) = soft.dims3()?;
        let t5 = T5::new(&self.params, &self.t5_config, "language_model");
        let table = t5.embed_table()?;
        let vocab = table.dim(0)?;
        // One gather from [token embeddings; every soft-prompt row] builds the encoder input.
        let table = Tensor::cat(&[table, &soft.reshape((b * nq, width))?], 0)?;
        let layout = self.layout(&rows, |row, slot| match slot {
            Slot::Token(id) => id,
            Slot::Soft(q) => (vocab + row * nq + q) as u32,
        });
        let embeds = crate::nn::embedding(&table, &layout.input_ids)?;
        let logits = t5.forward(
            &embeds,
            &layout.attention_mask,
            &layout.decoder_input_ids,
            &layout.decoder_attention_mask,
        )?;
        t5.lm_loss(&logits, &layout.labels)
    }
}

impl Objective for Stage2T5 {
    type Example = Pair;

    fn trainable(&self) -> Vec<(String, Var)> {
        self.params.trainable()
    }

    /// The prefix-LM loss, each caption split at a word drawn from `rng` ([`Split::draw`]).
    fn losses(&self, batch: &[Pair], rng: &mut StdRng) -> Result<Losses> {
        let splits: Vec<Split> = batch.iter().map(|p| Split::draw(p, rng)).collect();
        let total = self.loss_with_splits(batch, &splits)?;
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
