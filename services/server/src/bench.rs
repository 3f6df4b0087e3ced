//! `blip2 bench`: single-model throughput with random weights at the shapes that matter
//! ("base": ViT-B/14 at 224 px, the real Q-Former, OPT-125m; "opt-2.7b": the released
//! blip2-opt-2.7b dims). Weight values do not change the arithmetic, so random weights measure
//! the same work as real ones without a download. (Not zeros: an all-zero allocation maps the
//! kernel's shared zero page, so decode would read no memory and look faster than it can be.)

use std::time::Instant;

use anyhow::Result;
use blip2_model::checkpoint::RandomWeights;
use blip2_model::config::{Blip2Config, TextConfig};
use blip2_model::llm::{LanguageModel, StepInput};
use blip2_model::opt::Opt;
use blip2_model::qformer::QFormer;
use blip2_model::vision::VisionModel;
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use serde::Serialize;

/// A named shape to benchmark.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Shape {
    Base,
    #[value(name = "opt-2.7b")]
    Opt2_7b,
}

impl Shape {
    fn config(self) -> Result<Blip2Config> {
        let json = match self {
            Shape::Base => serde_json::json!({
                "vision_config": {"hidden_size": 768, "intermediate_size": 3072,
                    "num_hidden_layers": 12, "num_attention_heads": 12, "image_size": 224,
                    "patch_size": 14},
                "qformer_config": {},
                "text_config": {"model_type": "opt", "hidden_size": 768, "num_hidden_layers": 12,
                    "num_attention_heads": 12, "ffn_dim": 3072, "vocab_size": 50272},
                "num_query_tokens": 32
            }),
            Shape::Opt2_7b => serde_json::json!({
                "vision_config": {},
                "qformer_config": {},
                "text_config": {"model_type": "opt", "hidden_size": 2560, "num_hidden_layers": 32,
                    "num_attention_heads": 32, "ffn_dim": 10240, "vocab_size": 50272},
                "num_query_tokens": 32
            }),
        };
        Ok(Blip2Config::from_json(&json.to_string(), "bench".as_ref())?)
    }

    fn name(self) -> &'static str {
        match self {
            Shape::Base => "base",
            Shape::Opt2_7b => "opt-2.7b",
        }
    }
}

#[derive(Debug, Serialize)]
pub struct BenchResult {
    pub shape: &'static str,
    pub encode_seconds_per_image: f64,
    pub encode_images_per_second: f64,
    pub prefill_seconds: f64,
    pub prompt_positions: usize,
    pub decode_tokens_per_second_batch1: f64,
    pub decode_tokens_per_second_batch8: f64,
}

pub struct BenchOptions {
    pub images: usize,
    pub new_tokens: usize,
    pub prompt_tokens: usize,
    /// Storage of the language model's projections (`None`: f32).
    pub llm_weights: Option<blip2_model::linear::WeightFormat>,
}

pub fn run(shape: Shape, options: &BenchOptions) -> Result<BenchResult> {
    let device = Device::Cpu;
    let config = shape.config()?;
    let vb = VarBuilder::from_backend(Box::new(RandomWeights), DType::F32, device.clone());
    let TextConfig::Opt(opt_config) = &config.text_config else {
        anyhow::bail!("bench shapes are OPT shapes");
    };
    eprintln!("[{}] building random weights", shape.name());
    let vision = VisionModel::new(&config.vision_config, vb.pp("vision_model"))?;
    let qformer = QFormer::new(&config.qformer_config, config.num_query_tokens, vb.clone())?;
    let projection = blip2_model::linear::linear(
        config.qformer_config.hidden_size,
        opt_config.hidden_size,
        vb.pp("language_projection"),
    )?;
    let lm = Opt::with_weights(opt_config, vb.pp("language_model"), options.llm_weights)?;

    let size = config.vision_config.image_size;
    let pixels = Tensor::zeros((1, 3, size, size), DType::F32, &device)?;
    let encode = |p: &Tensor| -> Result<Tensor> {
        let embeds = vision.forward(p)?;
        let query = qformer.forward(&embeds)?;
        Ok(projection.forward(&query)?)
    };
    encode(&pixels)?; // warm-up
    let start = Instant::now();
    let mut soft_prompt = None;
    for _ in 0..options.images {
        soft_prompt = Some(encode(&pixels)?);
    }
    let encode_seconds = start.elapsed().as_secs_f64() / options.images.max(1) as f64;
    let soft_prompt = match soft_prompt {
        Some(s) => s.squeeze(0)?,
        None => encode(&pixels)?.squeeze(0)?,
    };
    eprintln!("[{}] encode: {encode_seconds:.3} s/image", shape.name());

    let text: Vec<u32> = (0..options.prompt_tokens as u32).map(|i| 100 + i).collect();
    let prompt = Tensor::cat(&[soft_prompt, lm.embed_tokens(&text)?], 0)?;
    let prompt_positions = prompt.dim(0)?;

    // Warm-up once (first-touch allocations), then the mean of ten prefills.
    lm.prefill(&prompt, &mut lm.new_cache())?;
    let start = Instant::now();
    for _ in 0..10 {
        lm.prefill(&prompt, &mut lm.new_cache())?;
    }
    let prefill_seconds = start.elapsed().as_secs_f64() / 10.0;
    eprintln!(
        "[{}] prefill of {prompt_positions} positions: {prefill_seconds:.3} s",
        shape.name()
    );

    let decode = |batch: usize| -> Result<f64> {
        let mut caches = Vec::with_capacity(batch);
        for _ in 0..batch {
            let mut cache = lm.new_cache();
            lm.forward_ragged(&[StepInput::Embeds(prompt.clone())], &mut [&mut cache])?;
            caches.push(cache);
        }
        let start = Instant::now();
        for step in 0..options.new_tokens {
            let tokens = vec![(200 + step) as u32; batch];
            let mut refs: Vec<&mut _> = caches.iter_mut().collect();
            lm.step(&tokens, &mut refs)?;
        }
        Ok((batch * options.new_tokens) as f64 / start.elapsed().as_secs_f64())
    };
    let batch1 = decode(1)?;
    eprintln!("[{}] decode batch 1: {batch1:.1} tokens/s", shape.name());
    let batch8 = decode(8)?;
    eprintln!("[{}] decode batch 8: {batch8:.1} tokens/s", shape.name());
    Ok(BenchResult {
        shape: shape.name(),
        encode_seconds_per_image: encode_seconds,
        encode_images_per_second: 1.0 / encode_seconds,
        prefill_seconds,
        prompt_positions,
        decode_tokens_per_second_batch1: batch1,
        decode_tokens_per_second_batch8: batch8,
    })
}
