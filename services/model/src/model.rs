//! [`Blip2Model`]: a whole BLIP-2 checkpoint, from image bytes to soft prompts to text.
//!
//! As transformers' `Blip2ForConditionalGeneration`: vision encoder -> Q-Former (f32) ->
//! `language_projection` -> soft visual prompt `[num_query_tokens, llm_hidden]`, which fills the
//! image placeholders of the prompt before the language model (OPT or Flan-T5) generates.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::linear::Linear;
use candle_core::{DType, Device, Module, Tensor};

use crate::checkpoint::{CheckpointFiles, WeightDtype, WeightStore};
use crate::config::{Blip2Config, TextConfig};
use crate::error::{Error, Result};
use crate::llm::LanguageModel;
use crate::opt::Opt;
use crate::processor::{DecodeLimits, ImageProcessor, ImageProcessorConfig};
use crate::prompt::{Prompt, PromptPiece, PromptTokenizer};
use crate::qformer::QFormer;
use crate::t5::T5;
use crate::vision::VisionModel;

/// How to load a checkpoint.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Precision of the vision encoder, projection and language model (the Q-Former stays f32).
    pub dtype: WeightDtype,
    pub device: Device,
    pub limits: DecodeLimits,
    pub components: Components,
    /// Storage of the language model's projections and `lm_head` (weight-only: activations keep
    /// `dtype`). `None` keeps them in `dtype`. f16/bf16/int8/int4 shrink the bytes each decoded
    /// token reads, which is what bounds decode speed on a CPU; bf16 works on CPU here because
    /// the decode kernel computes in f32.
    pub llm_weights: Option<crate::linear::WeightFormat>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dtype: WeightDtype::F32,
            device: Device::Cpu,
            limits: DecodeLimits::default(),
            components: Components::default(),
            llm_weights: None,
        }
    }
}

/// Which parts of a checkpoint to load: the vision tier needs no language model, the LLM tier
/// no vision encoder.
#[derive(Debug, Clone, Copy)]
pub struct Components {
    pub vision: bool,
    pub language_model: bool,
}

impl Default for Components {
    fn default() -> Self {
        Self {
            vision: true,
            language_model: true,
        }
    }
}

struct VisionParts {
    vision: VisionModel,
    qformer: QFormer,
}

/// sha256 over config.json and one layer's weights (the language projection here, the ITM head
/// of a retrieval checkpoint), as lowercase hex (first 32 chars).
pub(crate) fn fingerprint(config: &Path, layer: &Linear) -> Result<String> {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    let text = std::fs::read(config).map_err(|source| Error::Io {
        path: config.to_path_buf(),
        source,
    })?;
    hasher.update(&text);
    for tensor in std::iter::once(layer.weight()).chain(layer.bias()) {
        let values: Vec<f32> = tensor.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        for v in values {
            hasher.update(v.to_le_bytes());
        }
    }
    let digest = hasher.finalize();
    Ok(digest.iter().take(16).map(|b| format!("{b:02x}")).collect())
}

/// The intermediate tensors of encoding a batch of images.
#[derive(Debug, Clone)]
pub struct ImageEncoding {
    /// `[B, 3, H, W]` f32.
    pub pixel_values: Tensor,
    /// `[B, patches + 1, vision_hidden]` in the vision dtype.
    pub image_embeds: Tensor,
    /// `[B, num_query_tokens, qformer_hidden]` f32.
    pub query_output: Tensor,
    /// `[B, num_query_tokens, llm_hidden]` in the language model's dtype.
    pub soft_prompt: Tensor,
}

/// Generation settings from `generation_config.json`, when the checkpoint has one.
#[derive(Debug, Clone, Default)]
pub struct GenerationDefaults {
    pub eos_token_ids: Vec<u32>,
}

/// A loaded BLIP-2 checkpoint.
pub struct Blip2Model {
    config: Blip2Config,
    files: CheckpointFiles,
    dtype: WeightDtype,
    fingerprint: String,
    vision: Option<VisionParts>,
    language_projection: Linear,
    language_model: Option<Arc<dyn LanguageModel>>,
    processor: ImageProcessor,
    prompt: PromptTokenizer,
    generation: GenerationDefaults,
}

fn read_generation_defaults(dir: &Path, config: &Blip2Config) -> Result<GenerationDefaults> {
    let path = dir.join("generation_config.json");
    let from_text_config = match &config.text_config {
        TextConfig::Opt(c) => c.eos_token_id,
        TextConfig::T5(c) => c.eos_token_id,
    };
    let mut eos_token_ids: Vec<u32> = from_text_config.into_iter().collect();
    if path.is_file() {
        let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Config {
            path: path.clone(),
            message: e.to_string(),
        })?;
        match value.get("eos_token_id") {
            Some(serde_json::Value::Number(n)) => {
                eos_token_ids = n.as_u64().map(|id| vec![id as u32]).unwrap_or_default();
            }
            Some(serde_json::Value::Array(ids)) => {
                eos_token_ids = ids
                    .iter()
                    .filter_map(|v| v.as_u64())
                    .map(|id| id as u32)
                    .collect();
            }
            _ => {}
        }
    }
    Ok(GenerationDefaults { eos_token_ids })
}

impl Blip2Model {
    /// Loads a checkpoint directory in the Hugging Face layout.
    pub fn load(dir: &Path, options: &LoadOptions) -> Result<Self> {
        if options.dtype == WeightDtype::Bf16 && options.device.is_cpu() {
            // candle 0.11's CPU backend has no bf16 matmul: fail here, not on the first request.
            return Err(Error::InvalidInput(
                "`dtype` bf16 needs an accelerator: candle's CPU backend has no bf16 matmul; use f16 or f32 on CPU".into(),
            ));
        }
        let files = CheckpointFiles::locate(dir)?;
        let config = Blip2Config::from_file(&files.config)?;
        let store = Arc::new(WeightStore::open(&files.weights)?);
        let dtype = options.dtype.dtype();
        let root = store.var_builder(dtype, &options.device);
        let explain = |e: Error| match e {
            Error::Candle(e) => store.explain(e),
            other => other,
        };
        let language_projection = crate::linear::linear(
            config.qformer_config.hidden_size,
            config.text_config.hidden_size(),
            root.pp("language_projection"),
        )
        .map_err(|e| store.explain(e))?;
        let fingerprint = fingerprint(&files.config, &language_projection)?;
        let vision = if options.components.vision {
            let build = || -> candle_core::Result<_> {
                let vision = VisionModel::new(&config.vision_config, root.pp("vision_model"))?;
                let qformer = QFormer::new(
                    &config.qformer_config,
                    config.num_query_tokens,
                    root.clone(),
                )?;
                Ok(VisionParts { vision, qformer })
            };
            Some(build().map_err(|e| store.explain(e))?)
        } else {
            None
        };
        let language_model: Option<Arc<dyn LanguageModel>> = if options.components.language_model {
            let lm: Arc<dyn LanguageModel> = match &config.text_config {
                TextConfig::Opt(cfg) => Arc::new(
                    Opt::with_weights(cfg, root.pp("language_model"), options.llm_weights)
                        .map_err(|e| store.explain(e))?,
                ),
                TextConfig::T5(cfg) => Arc::new(
                    T5::with_weights(cfg, root.pp("language_model"), options.llm_weights)
                        .map_err(explain)?,
                ),
            };
            if lm.info().hidden_size != config.text_config.hidden_size() {
                return Err(Error::Config {
                    path: files.config.clone(),
                    message: format!(
                        "language_projection gives width {} but the language model embeds tokens at width {}",
                        config.text_config.hidden_size(),
                        lm.info().hidden_size
                    ),
                });
            }
            Some(lm)
        } else {
            None
        };
        let image_size = config.vision_config.image_size;
        let processor = ImageProcessor::new(
            ImageProcessorConfig::from_dir(dir, image_size)?,
            options.limits.clone(),
        );
        let prompt = PromptTokenizer::from_dir(dir, &config)?;
        let generation = read_generation_defaults(dir, &config)?;
        Ok(Self {
            config,
            files,
            dtype: options.dtype,
            fingerprint,
            vision,
            language_projection,
            language_model,
            processor,
            prompt,
            generation,
        })
    }

    /// Identifies the vision side of the checkpoint (config + projection weights): soft prompts
    /// carry it so that a tier serving another checkpoint can refuse them.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    fn vision_parts(&self) -> Result<&VisionParts> {
        self.vision.as_ref().ok_or_else(|| {
            Error::InvalidInput("this instance was loaded without the vision encoder".into())
        })
    }

    /// The language model; an error when it was not loaded ([`Components`]).
    pub fn language_model(&self) -> Result<&Arc<dyn LanguageModel>> {
        self.language_model.as_ref().ok_or_else(|| {
            Error::InvalidInput("this instance was loaded without the language model".into())
        })
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        self.language_projection.weight().device()
    }

    pub fn config(&self) -> &Blip2Config {
        &self.config
    }

    pub fn dir(&self) -> &PathBuf {
        &self.files.dir
    }

    pub fn dtype(&self) -> WeightDtype {
        self.dtype
    }

    pub fn processor(&self) -> &ImageProcessor {
        &self.processor
    }

    pub fn prompt_tokenizer(&self) -> &PromptTokenizer {
        &self.prompt
    }

    pub fn generation_defaults(&self) -> &GenerationDefaults {
        &self.generation
    }

    /// Decodes and preprocesses one image: `[3, H, W]` f32.
    pub fn preprocess(&self, bytes: &[u8]) -> Result<Tensor> {
        self.processor.preprocess(bytes)
    }

    /// Runs preprocessed images `[B, 3, H, W]` through vision encoder, Q-Former and projection.
    pub fn encode_pixels(&self, pixel_values: &Tensor) -> Result<ImageEncoding> {
        let parts = self.vision_parts()?;
        // The vision encoder takes a compute turn per layer (see `compute`); the Q-Former and
        // the projection (a few ms) take one together.
        let image_embeds = parts.vision.forward(pixel_values)?;
        let turn = crate::compute::turn();
        let query_output = parts.qformer.forward(&image_embeds)?;
        // The reference casts the f32 query output back to the vision dtype for the projection.
        let soft_prompt = self
            .language_projection
            .forward(&query_output.to_dtype(parts.vision.dtype())?)?;
        drop(turn);
        Ok(ImageEncoding {
            pixel_values: pixel_values.clone(),
            image_embeds,
            query_output,
            soft_prompt,
        })
    }

    /// Decodes, preprocesses and encodes images (in one batch).
    pub fn encode_images(&self, images: &[&[u8]]) -> Result<ImageEncoding> {
        if images.is_empty() {
            return Err(Error::InvalidInput("no image to encode".into()));
        }
        let pixels = images
            .iter()
            .map(|bytes| self.preprocess(bytes))
            .collect::<Result<Vec<_>>>()?;
        let device = self.language_projection.weight().device().clone();
        let pixel_values = Tensor::stack(&pixels, 0)?.to_device(&device)?;
        self.encode_pixels(&pixel_values)
    }

    /// Tokenises a prompt and places `num_images` images (see [`PromptTokenizer::build`]).
    pub fn build_prompt(&self, text: &str, num_images: usize) -> Result<Prompt> {
        self.prompt.build(text, num_images)
    }

    /// The language model's input embeddings `[positions, hidden]` for a prompt, with
    /// `soft_prompts[i]` (`[num_query_tokens, hidden]`) at the placeholders of image `i`.
    pub fn prompt_embeds(&self, prompt: &Prompt, soft_prompts: &[Tensor]) -> Result<Tensor> {
        if soft_prompts.len() != prompt.num_images {
            return Err(Error::InvalidInput(format!(
                "the prompt places {} image(s) but {} soft prompt(s) were given",
                prompt.num_images,
                soft_prompts.len()
            )));
        }
        let expected = (
            self.config.num_query_tokens,
            self.config.text_config.hidden_size(),
        );
        let lm = self.language_model()?;
        let dtype = self.language_projection.weight().dtype();
        let mut parts = Vec::with_capacity(prompt.pieces.len());
        for piece in &prompt.pieces {
            match piece {
                PromptPiece::Tokens(ids) => parts.push(lm.embed_tokens(ids)?),
                PromptPiece::Image(index) => {
                    let soft = &soft_prompts[*index];
                    if soft.dims2()? != expected {
                        return Err(Error::InvalidInput(format!(
                            "soft prompt {index} has shape {:?}, this checkpoint expects {expected:?}",
                            soft.dims()
                        )));
                    }
                    parts.push(soft.to_dtype(dtype)?.to_device(lm.device())?);
                }
            }
        }
        if parts.is_empty() {
            return Err(Error::InvalidInput("the prompt is empty".into()));
        }
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// The ids the reference's repetition penalty sees before the first generated token: the
    /// decoder input for decoder-only models, the decoder start for encoder-decoder models.
    pub fn penalty_context(&self, prompt: &Prompt) -> Vec<u32> {
        match &self.config.text_config {
            TextConfig::T5(cfg) => vec![cfg.decoder_start_token_id()],
            TextConfig::Opt(_) => prompt.input_ids.clone(),
        }
    }

    /// The compute dtype of the language model's inputs.
    pub fn llm_dtype(&self) -> DType {
        self.language_projection.weight().dtype()
    }
}
