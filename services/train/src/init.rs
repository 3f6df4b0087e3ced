//! A freshly initialised BLIP-2 checkpoint for the shapes world (`blip2 train init`): the
//! first directory of the training pipeline.
//!
//! It is a complete `Blip2ForConditionalGeneration` checkpoint in the Hugging Face layout
//! (config.json, model.safetensors, generation_config.json, processor_config.json) with an OPT
//! language model, whose tokenizer is built from the world's closed vocabulary
//! ([`crate::vocab::write_opt_tokenizer`]: every world word one token, `<image>` the image
//! token), plus the Q-Former's own WordPiece tokenizer with `[DEC]` in `qformer/` for stage 1.
//!
//! The tensors are exactly those the serving loader (`blip2_model`) asks for, with the shapes it
//! asks for: the loader runs over a weight source that creates each tensor on request, so the
//! layout cannot drift from what `blip2 serve` loads. Values follow transformers'
//! `_init_weights` for BLIP-2: normal(0, `initializer_range`) for matrices and embeddings, zero
//! biases, LayerNorm weights one. Every tensor is drawn from its own stream seeded by
//! `(seed, name)`, so the same options write the same bytes.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use blip2_model::config::{Blip2Config, TextConfig};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::json;

use crate::error::{Error, Result};
use crate::stage1::write_json;
use crate::vocab::{self, OptTokenizerInfo, QFormerTokenizerInfo};
use crate::world;

/// The Q-Former tokenizer's directory inside an initial checkpoint.
pub const QFORMER_TOKENIZER_DIR: &str = "qformer";

/// The dimensions of a new checkpoint (defaults: the demo model).
#[derive(Debug, Clone, Serialize)]
pub struct InitOptions {
    /// Side of the square input images, in pixels (the world's `--image-size`).
    pub image_size: usize,
    pub patch_size: usize,
    pub vision_hidden: usize,
    pub vision_layers: usize,
    pub vision_heads: usize,
    pub vision_intermediate: usize,
    pub qformer_hidden: usize,
    pub qformer_layers: usize,
    pub qformer_heads: usize,
    pub qformer_intermediate: usize,
    pub cross_attention_frequency: usize,
    pub num_query_tokens: usize,
    /// Width of the ITC embeddings (`image_text_hidden_size`).
    pub embed_dim: usize,
    pub llm_hidden: usize,
    pub llm_layers: usize,
    pub llm_heads: usize,
    pub llm_ffn: usize,
    /// OPT's and the Q-Former's `max_position_embeddings`.
    pub max_positions: usize,
    pub initializer_range: f64,
    pub seed: u64,
}

impl Default for InitOptions {
    fn default() -> Self {
        Self {
            image_size: 64,
            patch_size: 8,
            vision_hidden: 96,
            vision_layers: 3,
            vision_heads: 4,
            vision_intermediate: 192,
            qformer_hidden: 96,
            qformer_layers: 2,
            qformer_heads: 4,
            qformer_intermediate: 192,
            cross_attention_frequency: 1,
            num_query_tokens: 8,
            embed_dim: 64,
            llm_hidden: 96,
            llm_layers: 2,
            llm_heads: 4,
            llm_ffn: 256,
            max_positions: 64,
            initializer_range: 0.02,
            seed: 0,
        }
    }
}

/// What [`init`] wrote.
#[derive(Debug, Clone, Serialize)]
pub struct InitSummary {
    pub tensors: usize,
    pub parameters: usize,
    pub opt_tokenizer: OptTokenizerInfo,
    pub qformer_tokenizer: QFormerTokenizerInfo,
}

/// A weight source that creates every tensor the loader asks for and remembers it.
struct Recorder {
    seed: u64,
    std: f64,
    tensors: Mutex<BTreeMap<String, Tensor>>,
}

impl Recorder {
    fn value(&self, name: &str, shape: &Shape) -> candle_core::Result<Tensor> {
        let n = shape.elem_count();
        let last = name.rsplit('.').next().unwrap_or(name);
        let is_norm = name.to_ascii_lowercase().contains("norm");
        let data: Vec<f32> = if last.ends_with("bias") {
            vec![0.0; n]
        } else if is_norm && shape.rank() == 1 {
            vec![1.0; n]
        } else {
            let mut rng = StdRng::seed_from_u64(stream_seed(self.seed, name));
            (0..n)
                .map(|_| (normal(&mut rng) * self.std) as f32)
                .collect()
        };
        Tensor::from_vec(data, shape.clone(), &Device::Cpu)
    }
}

impl SimpleBackend for Recorder {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _init: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut tensors = self
            .tensors
            .lock()
            .map_err(|_| candle_core::Error::Msg("the recorder's lock is poisoned".into()))?;
        if let Some(t) = tensors.get(name) {
            if t.shape() != &shape {
                candle_core::bail!(
                    "`{name}` requested as {:?} and as {:?}",
                    t.dims(),
                    shape.dims()
                );
            }
            return t.to_dtype(dtype)?.to_device(dev);
        }
        let t = self.value(name, &shape)?;
        tensors.insert(name.to_string(), t.clone());
        t.to_dtype(dtype)?.to_device(dev)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("a new checkpoint has no stored shape for `{name}`")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        // The vision attention's bias is stored fused (`qkv.bias`), as transformers 5 writes
        // it; other optional tensors (OPT's lm_head) take the loader's fallback (tied weights).
        if name.ends_with(".qkv.bias") {
            return true;
        }
        self.tensors
            .lock()
            .map(|t| t.contains_key(name))
            .unwrap_or(false)
    }
}

/// A per-name seed (FNV-1a of the name, mixed with `seed`).
fn stream_seed(seed: u64, name: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325 ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for b in name.bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// A standard normal draw (Box-Muller).
fn normal(rng: &mut StdRng) -> f64 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

fn check(options: &InitOptions) -> Result<()> {
    let positive = [
        ("image size", options.image_size),
        ("patch size", options.patch_size),
        ("vision hidden size", options.vision_hidden),
        ("vision layers", options.vision_layers),
        ("vision heads", options.vision_heads),
        ("Q-Former hidden size", options.qformer_hidden),
        ("Q-Former layers", options.qformer_layers),
        ("Q-Former heads", options.qformer_heads),
        (
            "cross-attention frequency",
            options.cross_attention_frequency,
        ),
        ("query tokens", options.num_query_tokens),
        ("LLM hidden size", options.llm_hidden),
        ("LLM layers", options.llm_layers),
        ("LLM heads", options.llm_heads),
        ("max positions", options.max_positions),
    ];
    for (what, value) in positive {
        if value == 0 {
            return Err(Error::Invalid(format!("the {what} must be at least 1")));
        }
    }
    if !options.image_size.is_multiple_of(options.patch_size) {
        return Err(Error::Invalid(format!(
            "the image size {} is not a multiple of the patch size {}",
            options.image_size, options.patch_size
        )));
    }
    for (what, hidden, heads) in [
        ("vision", options.vision_hidden, options.vision_heads),
        ("Q-Former", options.qformer_hidden, options.qformer_heads),
        ("LLM", options.llm_hidden, options.llm_heads),
    ] {
        if !hidden.is_multiple_of(heads) {
            return Err(Error::Invalid(format!(
                "the {what} hidden size {hidden} is not a multiple of its {heads} heads"
            )));
        }
    }
    Ok(())
}

/// The config.json of a new checkpoint.
fn config_json(
    o: &InitOptions,
    opt: &OptTokenizerInfo,
    qf: &QFormerTokenizerInfo,
) -> serde_json::Value {
    json!({
        "architectures": ["Blip2ForConditionalGeneration"],
        "dtype": "float32",
        "image_text_hidden_size": o.embed_dim,
        "image_token_index": opt.image_token_id,
        "initializer_factor": 1.0,
        "initializer_range": o.initializer_range,
        "model_type": "blip-2",
        "num_query_tokens": o.num_query_tokens,
        "qformer_config": {
            "attention_probs_dropout_prob": 0.0,
            "cross_attention_frequency": o.cross_attention_frequency,
            "encoder_hidden_size": o.vision_hidden,
            "hidden_act": "gelu",
            "hidden_dropout_prob": 0.0,
            "hidden_size": o.qformer_hidden,
            "initializer_range": o.initializer_range,
            "intermediate_size": o.qformer_intermediate,
            "layer_norm_eps": 1e-12,
            "max_position_embeddings": o.max_positions,
            "model_type": "blip_2_qformer",
            "num_attention_heads": o.qformer_heads,
            "num_hidden_layers": o.qformer_layers,
            "pad_token_id": qf.pad_token_id,
            "use_qformer_text_input": false,
            "vocab_size": qf.vocab_size,
        },
        "text_config": {
            "_remove_final_layer_norm": false,
            "activation_function": "relu",
            "attention_dropout": 0.0,
            "bos_token_id": opt.bos_token_id,
            "do_layer_norm_before": true,
            "dropout": 0.0,
            "enable_bias": true,
            "eos_token_id": opt.eos_token_id,
            "ffn_dim": o.llm_ffn,
            "hidden_size": o.llm_hidden,
            "init_std": o.initializer_range,
            "layer_norm_elementwise_affine": true,
            "layerdrop": 0.0,
            "max_position_embeddings": o.max_positions,
            "model_type": "opt",
            "num_attention_heads": o.llm_heads,
            "num_hidden_layers": o.llm_layers,
            "pad_token_id": opt.pad_token_id,
            "tie_word_embeddings": true,
            "use_cache": true,
            "vocab_size": opt.vocab_size,
            "word_embed_proj_dim": o.llm_hidden,
        },
        "use_decoder_only_language_model": true,
        "vision_config": {
            "attention_dropout": 0.0,
            "hidden_act": "gelu",
            "hidden_size": o.vision_hidden,
            "image_size": o.image_size,
            "initializer_range": o.initializer_range,
            "intermediate_size": o.vision_intermediate,
            "layer_norm_eps": 1e-6,
            "model_type": "blip_2_vision_model",
            "num_attention_heads": o.vision_heads,
            "num_hidden_layers": o.vision_layers,
            "patch_size": o.patch_size,
            "qkv_bias": true,
        },
    })
}

/// Writes a new checkpoint for the shapes world into `out` (see the module docs).
pub fn init(out: &Path, options: &InitOptions) -> Result<InitSummary> {
    check(options)?;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let words = world::tokenizer_words();
    let opt = vocab::write_opt_tokenizer(out, &words)?;
    let qformer = vocab::write_qformer_tokenizer(
        &out.join(QFORMER_TOKENIZER_DIR),
        &world::vocabulary(),
        options.max_positions,
    )?;
    let config = config_json(options, &opt, &qformer);
    let config_path = out.join("config.json");
    write_json(&config_path, &config)?;
    write_json(
        &out.join("generation_config.json"),
        &json!({
            "bos_token_id": opt.bos_token_id,
            "eos_token_id": opt.eos_token_id,
            "pad_token_id": opt.pad_token_id,
            "max_new_tokens": 16,
        }),
    )?;
    let size = options.image_size;
    write_json(
        &out.join("processor_config.json"),
        &json!({
            "image_processor": {
                "do_convert_rgb": true,
                "do_normalize": true,
                "do_rescale": true,
                "do_resize": true,
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_processor_type": "BlipImageProcessor",
                "image_std": [0.26862954, 0.26130258, 0.27577711],
                "resample": 3,
                "rescale_factor": 1.0 / 255.0,
                "size": {"height": size, "width": size},
            },
            "num_query_tokens": options.num_query_tokens,
            "processor_class": "Blip2Processor",
        }),
    )?;

    // The serving loader asks for every tensor; the recorder creates it.
    let parsed = Blip2Config::from_file(&config_path)?;
    let TextConfig::Opt(opt_config) = &parsed.text_config else {
        return Err(Error::Invalid("the new config is not an OPT config".into()));
    };
    let recorder = std::sync::Arc::new(Recorder {
        seed: options.seed,
        std: options.initializer_range,
        tensors: Mutex::new(BTreeMap::new()),
    });
    let vb = VarBuilder::from_backend(
        Box::new(SharedRecorder(recorder.clone())),
        DType::F32,
        Device::Cpu,
    );
    blip2_model::vision::VisionModel::new(&parsed.vision_config, vb.pp("vision_model"))?;
    blip2_model::qformer::QFormer::new(
        &parsed.qformer_config,
        parsed.num_query_tokens,
        vb.clone(),
    )?;
    blip2_model::linear::linear(
        parsed.qformer_config.hidden_size,
        opt_config.hidden_size,
        vb.pp("language_projection"),
    )?;
    blip2_model::opt::Opt::new(opt_config, vb.pp("language_model"))?;
    let tensors = recorder
        .tensors
        .lock()
        .map_err(|_| Error::Invalid("the recorder's lock is poisoned".into()))?
        .clone();
    let parameters = tensors.values().map(Tensor::elem_count).sum();
    let count = tensors.len();
    let weights = out.join("model.safetensors");
    let map: std::collections::HashMap<String, Tensor> = tensors.into_iter().collect();
    candle_core::safetensors::save(&map, &weights)?;
    // The directory must load as the server loads it.
    blip2_model::model::Blip2Model::load(out, &blip2_model::model::LoadOptions::default())?;
    Ok(InitSummary {
        tensors: count,
        parameters,
        opt_tokenizer: opt,
        qformer_tokenizer: qformer,
    })
}

/// [`Recorder`] shared between the `VarBuilder` and [`init`].
struct SharedRecorder(std::sync::Arc<Recorder>);

impl SimpleBackend for SharedRecorder {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        init: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.0.get(shape, name, init, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.0.get_unchecked(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.contains_tensor(name)
    }
}
