//! Image-text retrieval with BLIP-2's stage-1 heads: [`RetrievalModel`] loads the layout of
//! transformers' `Blip2ForImageTextRetrieval` (checkpoints like `Salesforce/blip2-itm-vit-g`) and
//! computes what `Blip2VisionModelWithProjection`, `Blip2TextModelWithProjection` and the
//! retrieval model's two heads compute:
//!
//! - **ITC** (image-text contrastive): an image embeds as `normalize(vision_projection(Q))`
//!   over the `num_query_tokens` query outputs `Q` of the Q-Former (`[queries, D]`, D =
//!   `image_text_hidden_size`); a text as `normalize(text_projection(cls))`, where `cls` is the
//!   `[CLS]` output of the Q-Former run on the text alone (no queries, no image). The score is
//!   the largest dot product over the queries.
//! - **ITM** (image-text matching): queries and text go through the Q-Former together (the
//!   self-attention sees both; only the query part cross-attends to the image and uses the
//!   query FFN, the text part uses the text FFN); `itm_head` on each query output, averaged over
//!   the queries, gives two logits; the match probability is `softmax(logits)[1]`.
//!
//! Text takes learned absolute positions from 0 (`embeddings.position_embeddings`), so a text
//! longer than `max_position_embeddings` tokens is truncated as the tokenizer does with
//! `truncation=True` (`[CLS]`, the first tokens, `[SEP]`), and [`TokenizedText::truncated`] says
//! so. Everything runs in f32 (the reference keeps the Q-Former in f32).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{LayerNorm, VarBuilder};
use tokenizers::{Tokenizer, TruncationParams};

use crate::checkpoint::{CheckpointFiles, WeightStore};
use crate::config::{Blip2Config, QFormerConfig};
use crate::error::{Error, Result};
use crate::linear::Linear;
use crate::processor::{DecodeLimits, ImageProcessor, ImageProcessorConfig};
use crate::qformer::{Attention, FeedForward};
use crate::vision::VisionModel;

/// Texts scored by ITM in one forward (each repeats the image features).
pub const ITM_CHUNK: usize = 32;

/// The weight whose presence marks a retrieval checkpoint.
pub const ITM_HEAD_WEIGHT: &str = "itm_head.weight";

/// Whether the checkpoint in `dir` has the retrieval heads (`itm_head`, `text_projection`,
/// `vision_projection`, text embeddings) rather than a language model.
pub fn is_retrieval_checkpoint(dir: &Path) -> Result<bool> {
    let files = crate::checkpoint::weight_files(dir)?;
    let store = WeightStore::open(&files)?;
    Ok(store.contains(ITM_HEAD_WEIGHT) && store.contains("text_projection.weight"))
}

/// How to load a retrieval checkpoint (always f32).
#[derive(Debug, Clone)]
pub struct RetrievalLoadOptions {
    pub device: Device,
    pub limits: DecodeLimits,
}

impl Default for RetrievalLoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            limits: DecodeLimits::default(),
        }
    }
}

/// One text as the Q-Former reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedText {
    /// `[CLS] ... [SEP]`, at most `max_position_embeddings` ids.
    pub ids: Vec<u32>,
    /// Tokens before truncation (special tokens included).
    pub num_tokens: usize,
    /// Whether the text was cut to fit `max_position_embeddings`.
    pub truncated: bool,
}

/// ITM and ITC scores of one image-text pair.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MatchScore {
    /// `softmax(itm_logits)[1]`.
    pub itm_probability: f32,
    /// The two ITM logits (no match, match).
    pub itm_logits: [f32; 2],
    /// Largest cosine similarity over the queries.
    pub itc_score: f32,
}

/// The BERT WordPiece tokenizer of a retrieval checkpoint (`[CLS] text [SEP]`).
pub struct RetrievalTokenizer {
    full: Tokenizer,
    truncating: Tokenizer,
    max_len: usize,
    pad_id: u32,
    vocab_size: usize,
}

impl RetrievalTokenizer {
    /// Reads `tokenizer.json`; `max_len` is the Q-Former's `max_position_embeddings`,
    /// `vocab_size` its word embedding rows.
    pub fn from_file(path: &Path, max_len: usize, vocab_size: usize) -> Result<Self> {
        let bad = |message: String| Error::Tokenizer {
            path: path.to_path_buf(),
            message,
        };
        let mut full = Tokenizer::from_file(path).map_err(|e| bad(e.to_string()))?;
        full.with_truncation(None).map_err(|e| bad(e.to_string()))?;
        full.with_padding(None);
        // Added tokens beyond the embedding rows (Blip2Processor's `<image>`) are refused when
        // a text contains them; the WordPiece vocabulary itself must fit.
        let size = full.get_vocab_size(false);
        if size > vocab_size {
            return Err(bad(format!(
                "{size} tokens, but the Q-Former embeds only {vocab_size} (qformer_config.vocab_size)"
            )));
        }
        for special in ["[CLS]", "[SEP]"] {
            if full.token_to_id(special).is_none() {
                return Err(bad(format!(
                    "no `{special}` token: not a BERT WordPiece tokenizer"
                )));
            }
        }
        if max_len < 2 {
            return Err(bad(format!(
                "max_position_embeddings {max_len} leaves no room for [CLS] and [SEP]"
            )));
        }
        let pad_id = full.token_to_id("[PAD]").unwrap_or(0);
        let mut truncating = full.clone();
        truncating
            .with_truncation(Some(TruncationParams {
                max_length: max_len,
                ..Default::default()
            }))
            .map_err(|e| bad(e.to_string()))?;
        Ok(Self {
            full,
            truncating,
            max_len,
            pad_id,
            vocab_size,
        })
    }

    /// The longest token sequence the Q-Former takes (`max_position_embeddings`).
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.full.token_to_id(token)
    }

    /// Tokenises one text; empty (or whitespace-only) text is an error.
    pub fn encode(&self, text: &str) -> Result<TokenizedText> {
        if text.trim().is_empty() {
            return Err(Error::InvalidInput("the text is empty".into()));
        }
        let fail = |e: tokenizers::Error| Error::InvalidInput(format!("cannot tokenise: {e}"));
        let full = self.full.encode(text, true).map_err(fail)?;
        if let Some(&id) = full
            .get_ids()
            .iter()
            .find(|&&id| id as usize >= self.vocab_size)
        {
            let token = self.full.id_to_token(id).unwrap_or_default();
            return Err(Error::InvalidInput(format!(
                "the text contains the special token `{token}` (id {id}), which the Q-Former has no embedding for"
            )));
        }
        let num_tokens = full.get_ids().len();
        if num_tokens <= self.max_len {
            return Ok(TokenizedText {
                ids: full.get_ids().to_vec(),
                num_tokens,
                truncated: false,
            });
        }
        let cut = self.truncating.encode(text, true).map_err(fail)?;
        Ok(TokenizedText {
            ids: cut.get_ids().to_vec(),
            num_tokens,
            truncated: true,
        })
    }
}

/// One Q-Former layer with both FFNs (`intermediate`/`output` for text,
/// `intermediate_query`/`output_query` for queries).
struct Layer {
    attention: Attention,
    crossattention: Option<Attention>,
    text_ffn: FeedForward,
    query_ffn: FeedForward,
}

impl Layer {
    fn new(cfg: &QFormerConfig, index: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        let crossattention = if index.is_multiple_of(cfg.cross_attention_frequency) {
            Some(Attention::new(cfg, true, vb.pp("crossattention"))?)
        } else {
            None
        };
        Ok(Self {
            attention: Attention::new(cfg, false, vb.pp("attention"))?,
            crossattention,
            text_ffn: FeedForward::new(cfg, vb.pp("intermediate"), vb.pp("output"))?,
            query_ffn: FeedForward::new(cfg, vb.pp("intermediate_query"), vb.pp("output_query"))?,
        })
    }

    /// `xs`: `[B, queries + text, H]` with the queries first; `mask`: additive `[B, 1, 1, len]`.
    fn forward(
        &self,
        xs: &Tensor,
        mask: Option<&Tensor>,
        queries: usize,
        image: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let attn = self.attention.forward_masked(xs, xs, mask)?;
        let len = attn.dim(1)?;
        if queries == 0 {
            return self.text_ffn.forward(&attn);
        }
        let mut q = attn.narrow(1, 0, queries)?;
        if let Some(cross) = &self.crossattention {
            let Some(image) = image else {
                candle_core::bail!("cross-attention layers need image features");
            };
            q = cross.forward(&q, image)?;
        }
        let q = self.query_ffn.forward(&q)?;
        if len > queries {
            let text = self
                .text_ffn
                .forward(&attn.narrow(1, queries, len - queries)?)?;
            Tensor::cat(&[&q, &text], 1)
        } else {
            Ok(q)
        }
    }
}

/// The Q-Former with text input, its query tokens and text embeddings.
struct TextQFormer {
    query_tokens: Tensor,
    word_embeddings: Tensor,
    position_embeddings: Tensor,
    layernorm: LayerNorm,
    layers: Vec<Layer>,
}

impl TextQFormer {
    fn new(cfg: &QFormerConfig, num_queries: usize, root: VarBuilder) -> candle_core::Result<Self> {
        let h = cfg.hidden_size;
        let query_tokens = root.get((1, num_queries, h), "query_tokens")?;
        let word_embeddings = root.get((cfg.vocab_size, h), "embeddings.word_embeddings.weight")?;
        let position_embeddings = root.get(
            (cfg.max_position_embeddings, h),
            "embeddings.position_embeddings.weight",
        )?;
        let vb = root.pp("qformer");
        let layernorm = candle_nn::layer_norm(h, cfg.layer_norm_eps, vb.pp("layernorm"))?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::new(cfg, i, vb.pp(format!("encoder.layer.{i}"))))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            query_tokens,
            word_embeddings,
            position_embeddings,
            layernorm,
            layers,
        })
    }

    fn queries(&self, batch: usize) -> candle_core::Result<Tensor> {
        let (_, q, h) = self.query_tokens.dims3()?;
        self.query_tokens.expand((batch, q, h))?.contiguous()
    }

    /// Word + position embeddings `[B, L, H]` of right-padded texts, and the additive key mask
    /// `[B, L]` (0 for tokens, `f32::MIN` for padding, as transformers' eager mask).
    fn embed_text(&self, texts: &[&[u32]], pad_id: u32) -> candle_core::Result<(Tensor, Tensor)> {
        let device = self.word_embeddings.device();
        let len = texts.iter().map(|t| t.len()).max().unwrap_or(0);
        let max_pos = self.position_embeddings.dim(0)?;
        if len == 0 || len > max_pos {
            candle_core::bail!("text of {len} tokens; the Q-Former takes 1 to {max_pos}");
        }
        let mut ids = Vec::with_capacity(texts.len() * len);
        let mut mask = Vec::with_capacity(texts.len() * len);
        for text in texts {
            for i in 0..len {
                ids.push(text.get(i).copied().unwrap_or(pad_id));
                mask.push(if i < text.len() { 0f32 } else { f32::MIN });
            }
        }
        let ids = Tensor::from_vec(ids, texts.len() * len, device)?;
        let h = self.word_embeddings.dim(1)?;
        let words = self
            .word_embeddings
            .index_select(&ids, 0)?
            .reshape((texts.len(), len, h))?;
        let positions = self.position_embeddings.narrow(0, 0, len)?.unsqueeze(0)?;
        let embeds = words.broadcast_add(&positions)?;
        let mask = Tensor::from_vec(mask, (texts.len(), len), device)?;
        Ok((embeds, mask))
    }

    fn run(
        &self,
        embeds: &Tensor,
        mask: Option<&Tensor>,
        queries: usize,
        image: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let mask = mask.map(|m| m.unsqueeze(1)?.unsqueeze(1)).transpose()?;
        let mut xs = self.layernorm.forward(embeds)?;
        for layer in &self.layers {
            xs = layer.forward(&xs, mask.as_ref(), queries, image)?;
        }
        Ok(xs)
    }
}

/// A loaded `Blip2ForImageTextRetrieval` checkpoint.
pub struct RetrievalModel {
    config: Blip2Config,
    dir: PathBuf,
    fingerprint: String,
    vision: VisionModel,
    qformer: TextQFormer,
    vision_projection: Linear,
    text_projection: Linear,
    itm_head: Linear,
    tokenizer: RetrievalTokenizer,
    processor: ImageProcessor,
}

impl RetrievalModel {
    /// Loads a checkpoint directory in the Hugging Face layout of `Blip2ForImageTextRetrieval`.
    pub fn load(dir: &Path, options: &RetrievalLoadOptions) -> Result<Self> {
        let files = CheckpointFiles::locate(dir)?;
        let config = Blip2Config::from_file(&files.config)?;
        let store = Arc::new(WeightStore::open(&files.weights)?);
        if !store.contains(ITM_HEAD_WEIGHT) {
            return Err(Error::Weight {
                path: files.dir.clone(),
                name: ITM_HEAD_WEIGHT.into(),
                message:
                    "missing: not an image-text retrieval checkpoint (Blip2ForImageTextRetrieval)"
                        .into(),
            });
        }
        let root = store.var_builder(DType::F32, &options.device);
        let processor = ImageProcessor::new(
            ImageProcessorConfig::from_dir(dir, config.vision_config.image_size)?,
            options.limits.clone(),
        );
        let explain = |e: Error| match e {
            Error::Candle(e) => store.explain(e),
            other => other,
        };
        let mut model = Self::from_weights(config, root, &files.tokenizer, processor, &files.dir)
            .map_err(explain)?;
        model.fingerprint = crate::model::fingerprint(&files.config, &model.itm_head)?;
        Ok(model)
    }

    /// Builds the model from any weight source (`root` at the checkpoint root, f32), e.g.
    /// [`crate::checkpoint::RandomWeights`] for benchmarks; `tokenizer` is a `tokenizer.json`.
    /// The fingerprint is then that of the config alone.
    pub fn from_weights(
        config: Blip2Config,
        root: VarBuilder,
        tokenizer: &Path,
        processor: ImageProcessor,
        dir: &Path,
    ) -> Result<Self> {
        let qcfg = &config.qformer_config;
        let build = || -> candle_core::Result<_> {
            let vision = VisionModel::new(&config.vision_config, root.pp("vision_model"))?;
            let qformer = TextQFormer::new(qcfg, config.num_query_tokens, root.clone())?;
            let d = config.image_text_hidden_size;
            let h = qcfg.hidden_size;
            let vision_projection = crate::linear::linear(h, d, root.pp("vision_projection"))?;
            let text_projection = crate::linear::linear(h, d, root.pp("text_projection"))?;
            let itm_head = crate::linear::linear(h, 2, root.pp("itm_head"))?;
            Ok((
                vision,
                qformer,
                vision_projection,
                text_projection,
                itm_head,
            ))
        };
        let (vision, qformer, vision_projection, text_projection, itm_head) = build()?;
        let tokenizer = RetrievalTokenizer::from_file(
            tokenizer,
            qcfg.max_position_embeddings,
            qcfg.vocab_size,
        )?;
        let fingerprint = {
            use sha2::Digest;
            let digest = sha2::Sha256::digest(format!("{config:?}").as_bytes());
            digest.iter().take(16).map(|b| format!("{b:02x}")).collect()
        };
        Ok(Self {
            config,
            dir: dir.to_path_buf(),
            fingerprint,
            vision,
            qformer,
            vision_projection,
            text_projection,
            itm_head,
            tokenizer,
            processor,
        })
    }

    pub fn config(&self) -> &Blip2Config {
        &self.config
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Identifies the checkpoint (config.json and the ITM head): embeddings carry it so that an
    /// index built with one checkpoint is not searched with another.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    pub fn tokenizer(&self) -> &RetrievalTokenizer {
        &self.tokenizer
    }

    pub fn processor(&self) -> &ImageProcessor {
        &self.processor
    }

    pub fn device(&self) -> &Device {
        self.itm_head.weight().device()
    }

    /// `image_text_hidden_size`: the width of every embedding.
    pub fn embed_dim(&self) -> usize {
        self.config.image_text_hidden_size
    }

    pub fn num_query_tokens(&self) -> usize {
        self.config.num_query_tokens
    }

    /// Tokenises texts (see [`RetrievalTokenizer::encode`]); the error names the text's index.
    pub fn tokenize(&self, texts: &[&str]) -> Result<Vec<TokenizedText>> {
        texts
            .iter()
            .enumerate()
            .map(|(i, t)| {
                self.tokenizer.encode(t).map_err(|e| match e {
                    Error::InvalidInput(m) => Error::InvalidInput(format!("text {i}: {m}")),
                    other => other,
                })
            })
            .collect()
    }

    /// Decodes and preprocesses one image: `[3, H, W]` f32.
    pub fn preprocess(&self, bytes: &[u8]) -> Result<Tensor> {
        self.processor.preprocess(bytes)
    }

    /// The vision encoder's `last_hidden_state` `[B, patches + 1, vision_hidden]` for
    /// preprocessed images `[B, 3, H, W]`: what ITM cross-attends to.
    pub fn vision_features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let pixel_values = pixel_values.to_device(self.device())?;
        Ok(self.vision.forward(&pixel_values)?.to_dtype(DType::F32)?)
    }

    /// Normalised ITC image embeddings `[B, queries, D]` from vision features.
    pub fn image_embeds_from_features(&self, features: &Tensor) -> Result<Tensor> {
        let batch = features.dim(0)?;
        let q = self.qformer.queries(batch)?;
        let out = self
            .qformer
            .run(&q, None, self.config.num_query_tokens, Some(features))?;
        Ok(l2_normalize(&self.vision_projection.forward(&out)?)?)
    }

    /// Normalised ITC image embeddings `[B, queries, D]` for preprocessed images.
    pub fn embed_pixels(&self, pixel_values: &Tensor) -> Result<Tensor> {
        self.image_embeds_from_features(&self.vision_features(pixel_values)?)
    }

    /// Decodes, preprocesses and embeds images in one batch: `[B, queries, D]`.
    pub fn embed_images(&self, images: &[&[u8]]) -> Result<Tensor> {
        let pixels = self.pixel_batch(images)?;
        self.embed_pixels(&pixels)
    }

    /// `[B, 3, H, W]` from encoded images.
    pub fn pixel_batch(&self, images: &[&[u8]]) -> Result<Tensor> {
        if images.is_empty() {
            return Err(Error::InvalidInput("no image".into()));
        }
        let pixels = images
            .iter()
            .map(|bytes| self.preprocess(bytes))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::stack(&pixels, 0)?.to_device(self.device())?)
    }

    /// Normalised ITC text embeddings `[N, D]` (texts padded on the right in one batch).
    pub fn embed_texts(&self, texts: &[TokenizedText]) -> Result<Tensor> {
        if texts.is_empty() {
            return Err(Error::InvalidInput("no text".into()));
        }
        let ids = texts.iter().map(|t| t.ids.as_slice()).collect::<Vec<_>>();
        let (embeds, mask) = self.qformer.embed_text(&ids, self.tokenizer.pad_id)?;
        let out = self.qformer.run(&embeds, Some(&mask), 0, None)?;
        let cls = out.narrow(1, 0, 1)?.squeeze(1)?;
        Ok(l2_normalize(&self.text_projection.forward(&cls)?)?)
    }

    /// ITM logits `[N, 2]` of pairs: `features[i]` (vision features, `[N, T, vision_hidden]`)
    /// with `texts[i]`.
    pub fn itm_logits(&self, features: &Tensor, texts: &[TokenizedText]) -> Result<Tensor> {
        let n = features.dim(0)?;
        if n != texts.len() || n == 0 {
            return Err(Error::InvalidInput(format!(
                "{n} image(s) for {} text(s): ITM scores pairs",
                texts.len()
            )));
        }
        let ids = texts.iter().map(|t| t.ids.as_slice()).collect::<Vec<_>>();
        let (text, text_mask) = self.qformer.embed_text(&ids, self.tokenizer.pad_id)?;
        let nq = self.config.num_query_tokens;
        let queries = self.qformer.queries(n)?;
        let embeds = Tensor::cat(&[&queries, &text], 1)?;
        let query_mask = Tensor::zeros((n, nq), DType::F32, self.device())?;
        let mask = Tensor::cat(&[&query_mask, &text_mask], 1)?;
        let out = self.qformer.run(&embeds, Some(&mask), nq, Some(features))?;
        let logits = self.itm_head.forward(&out.narrow(1, 0, nq)?)?;
        Ok(logits.mean(1)?)
    }

    /// ITM logits of one image's vision features (`[1, T, vision_hidden]`) against each text,
    /// in chunks of [`ITM_CHUNK`] texts (the features are repeated per text of a chunk).
    pub fn itm_logits_one_image(
        &self,
        features: &Tensor,
        texts: &[TokenizedText],
    ) -> Result<Vec<[f32; 2]>> {
        let (_, t, w) = features.dims3()?;
        let mut out = Vec::with_capacity(texts.len());
        for chunk in texts.chunks(ITM_CHUNK) {
            let expanded = features.expand((chunk.len(), t, w))?.contiguous()?;
            let logits = self.itm_logits(&expanded, chunk)?.to_vec2::<f32>()?;
            out.extend(logits.into_iter().map(|l| [l[0], l[1]]));
        }
        Ok(out)
    }

    /// Scores one image (preprocessed, `[3, H, W]` or `[1, 3, H, W]`) against texts: ITM
    /// probability and ITC score per text, in order. The vision encoder runs once.
    pub fn match_pixels(
        &self,
        pixels: &Tensor,
        texts: &[TokenizedText],
    ) -> Result<Vec<MatchScore>> {
        let pixels = if pixels.rank() == 3 {
            pixels.unsqueeze(0)?
        } else {
            pixels.clone()
        };
        if pixels.dim(0)? != 1 {
            return Err(Error::InvalidInput("match_pixels takes one image".into()));
        }
        let features = self.vision_features(&pixels)?;
        let image = self.image_embeds_from_features(&features)?;
        let text = self.embed_texts(texts)?;
        let itc = itc_scores(&image, &text)?.squeeze(0)?.to_vec1::<f32>()?;
        let logits = self.itm_logits_one_image(&features, texts)?;
        Ok(logits
            .into_iter()
            .zip(itc)
            .map(|(l, itc_score)| MatchScore {
                itm_probability: match_probability([l[0], l[1]]),
                itm_logits: [l[0], l[1]],
                itc_score,
            })
            .collect())
    }
}

/// `softmax(logits)[1]`, computed stably.
pub fn match_probability(logits: [f32; 2]) -> f32 {
    let m = logits[0].max(logits[1]);
    let a = (logits[0] - m).exp();
    let b = (logits[1] - m).exp();
    b / (a + b)
}

/// `x / max(||x||, 1e-12)` over the last dimension (torch's `F.normalize`).
pub fn l2_normalize(xs: &Tensor) -> candle_core::Result<Tensor> {
    let norm = xs
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-12, f64::MAX)?;
    xs.broadcast_div(&norm)
}

/// ITC scores `[B, N]`: for image `b` (`image_embeds[b]`: `[queries, D]`) and text `n`
/// (`text_embeds[n]`: `[D]`), the largest dot product over the queries.
pub fn itc_scores(image_embeds: &Tensor, text_embeds: &Tensor) -> candle_core::Result<Tensor> {
    let (b, q, d) = image_embeds.dims3()?;
    let sims = image_embeds
        .reshape((b * q, d))?
        .matmul(&text_embeds.t()?)?
        .reshape((b, q, text_embeds.dim(0)?))?;
    sims.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture_tokenizer() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/models/retrieval-a/tokenizer.json")
    }

    #[test]
    fn added_tokens_beyond_the_embeddings_are_refused_in_text() {
        // The fixture's `[DEC]` is 234 and `<image>` 235: with 235 embedding rows, `<image>` has none.
        let tok = RetrievalTokenizer::from_file(&fixture_tokenizer(), 24, 235).unwrap();
        assert!(tok.encode("a red square").is_ok());
        let err = tok.encode("a <image> square").unwrap_err().to_string();
        assert!(err.contains("<image>") && err.contains("235"), "{err}");
        // The WordPiece vocabulary itself must fit.
        assert!(RetrievalTokenizer::from_file(&fixture_tokenizer(), 24, 100).is_err());
    }

    #[test]
    fn match_probability_is_a_stable_softmax() {
        assert!((match_probability([0.0, 0.0]) - 0.5).abs() < 1e-7);
        assert!((match_probability([-1000.0, 1000.0]) - 1.0).abs() < 1e-7);
        let p = match_probability([0.3, 1.1]);
        assert!((p - 1.0 / (1.0 + (-0.8f32).exp())).abs() < 1e-6);
    }
}
