//! Command-line parsing and the `generate` / `encode` / `bench` commands.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::PathBuf;

use anyhow::{Context, Result};
use blip2_model::checkpoint::WeightDtype;
use blip2_model::generation::{self, GenerationParams};
use blip2_model::model::{Blip2Model, LoadOptions};
use candle_core::{DType, Tensor};
use clap::{Args, Parser, Subcommand};

use crate::bench;

#[derive(Parser, Debug)]
#[command(name = "blip2", version, about = "BLIP-2 inference and serving")]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Generate text for images and a prompt.
    Generate(GenerateArgs),
    /// Encode one image and dump the intermediate tensors as safetensors.
    Encode(EncodeArgs),
    /// Print single-model throughput (encode images/s, decode tokens/s) with random weights;
    /// `bench load` drives concurrent chat sessions against a running session tier.
    Bench(BenchArgs),
    /// Serve a tier over gRPC (vision, llm, session), or all three in one process.
    #[command(subcommand)]
    // Boxed: the tiers' flags make it by far the largest command.
    Serve(Box<crate::serve::Tier>),
    /// API keys of the session tier: `keys new` makes one, `keys hash` hashes one for
    /// --api-keys-file.
    #[command(subcommand)]
    Keys(crate::session_state::KeysCommand),
    /// Score how well captions match an image (ITM probability, ITC score) with a
    /// Blip2ForImageTextRetrieval checkpoint.
    Match(crate::retrieval_cli::MatchArgs),
    /// Print the normalised ITC embedding(s) of an image or a text (retrieval checkpoint).
    Embed(crate::retrieval_cli::EmbedArgs),
    /// Training data: `train world` writes the synthetic shapes world (images, captions and
    /// questions in train/val/test manifests).
    #[command(subcommand)]
    Train(crate::train_cli::TrainCommand),
    /// Score a running system: `eval world` asks the session tier the held-out questions of
    /// the shapes world (exact match per type, caption CIDEr-D, retrieval R@1).
    #[command(subcommand)]
    Eval(EvalCommand),
}

#[derive(Subcommand, Debug)]
enum EvalCommand {
    /// VQA accuracy, caption quality and (with --retrieval) R@1 on a world split, through the
    /// session tier's gRPC API.
    World(crate::eval_world::EvalWorldArgs),
}

#[derive(Args, Debug)]
struct ModelArgs {
    /// Checkpoint directory in the Hugging Face layout, or a Hugging Face repo id (owner/name,
    /// fetched into the HF cache; needs the `hub` feature); without it, the small checkpoint
    /// embedded in the binary (the shapes-world demo checkpoint, models/shapes-demo).
    #[arg(long, env = "BLIP2_MODEL")]
    model: Option<PathBuf>,
    /// Weight precision (the Q-Former stays f32).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Storage of the language model's projections and lm_head: f32, f16, bf16, int8 or int4
    /// (weight-only, activations keep `--dtype`; fewer bytes per weight decode faster on CPU).
    /// Default: as `--dtype`.
    #[arg(long, env = "BLIP2_LLM_WEIGHTS")]
    llm_weights: Option<blip2_model::linear::WeightFormat>,
}

impl ModelArgs {
    fn load(&self) -> Result<Blip2Model> {
        let dtype: WeightDtype = self.dtype.parse()?;
        let options = LoadOptions {
            dtype,
            llm_weights: self.llm_weights,
            ..LoadOptions::default()
        };
        let dir = crate::default_model::resolve_model_dir(self.model.as_deref())?;
        Blip2Model::load(&dir, &options).with_context(|| format!("loading {}", dir.display()))
    }
}

#[derive(Args, Debug)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Image file; repeat for several images (they fill the prompt's `<image>` markers in order).
    #[arg(long = "image")]
    images: Vec<PathBuf>,
    /// Prompt text; `<image>` marks where an image goes. "" asks for a caption.
    #[arg(long, default_value = "")]
    prompt: String,
    #[arg(long, default_value_t = 30)]
    max_new_tokens: usize,
    #[arg(long, default_value_t = 0)]
    min_new_tokens: usize,
    #[arg(long, default_value_t = 1)]
    num_beams: usize,
    #[arg(long, default_value_t = 1.0)]
    length_penalty: f64,
    #[arg(long)]
    do_sample: bool,
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// 0 disables top-k (the default when sampling is 50, as in transformers).
    #[arg(long, default_value_t = 50)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f64,
    #[arg(long)]
    seed: Option<u64>,
    /// Stop sequence; repeat for several.
    #[arg(long = "stop")]
    stop: Vec<String>,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct EncodeArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long)]
    image: PathBuf,
    /// Output safetensors file.
    #[arg(long)]
    dump: PathBuf,
}

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
struct BenchArgs {
    /// `load`: the serving benchmark; without it, the single-model one below.
    #[command(subcommand)]
    command: Option<BenchCommand>,
    /// Shapes to measure.
    #[arg(long, value_enum, default_values_t = [bench::Shape::Base])]
    shape: Vec<bench::Shape>,
    /// Images encoded (after one warm-up).
    #[arg(long, default_value_t = 3)]
    images: usize,
    /// Decode steps per measurement.
    #[arg(long, default_value_t = 32)]
    new_tokens: usize,
    /// Text tokens after the soft prompt.
    #[arg(long, default_value_t = 8)]
    prompt_tokens: usize,
    /// Print the results as JSON.
    #[arg(long)]
    json: bool,
    /// Storage of the language model's projections and lm_head: f32, f16, bf16, int8 or int4
    /// (weight-only, activations keep `--dtype`; fewer bytes per weight decode faster on CPU).
    /// Default: f32.
    #[arg(long, env = "BLIP2_LLM_WEIGHTS")]
    llm_weights: Option<blip2_model::linear::WeightFormat>,
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// N concurrent chat sessions with images against a session tier: TTFT, inter-token
    /// latency, tokens/s, requests/s.
    Load(crate::bench_load::LoadArgs),
    /// Image-text retrieval: images/s and texts/s embedded (random weights), brute-force search
    /// latency over 10k and 100k indexed random embeddings.
    Retrieval(crate::bench_retrieval::RetrievalBenchArgs),
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Generate(args) => generate(args),
        Command::Encode(args) => encode(args),
        Command::Serve(tier) => crate::serve::run(*tier),
        Command::Keys(command) => crate::session_state::run_keys(command),
        Command::Match(args) => crate::retrieval_cli::run_match(args),
        Command::Embed(args) => crate::retrieval_cli::run_embed(args),
        Command::Train(command) => crate::train_cli::run(command),
        Command::Eval(EvalCommand::World(args)) => crate::eval_world::run(args),
        Command::Bench(BenchArgs {
            command: Some(BenchCommand::Load(load)),
            ..
        }) => crate::bench_load::run(load),
        Command::Bench(BenchArgs {
            command: Some(BenchCommand::Retrieval(args)),
            ..
        }) => crate::bench_retrieval::run(args),
        Command::Bench(args) => {
            let options = bench::BenchOptions {
                images: args.images,
                new_tokens: args.new_tokens,
                prompt_tokens: args.prompt_tokens,
                llm_weights: args.llm_weights,
            };
            let results = args
                .shape
                .iter()
                .map(|&shape| bench::run(shape, &options))
                .collect::<Result<Vec<_>>>()?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&results)?);
            } else {
                for r in results {
                    println!(
                        "{:<9} encode {:>8.3} s/image ({:.2} images/s)  prefill {} positions {:.3} s  decode {:.1} tokens/s (batch 1), {:.1} tokens/s (batch 8)",
                        r.shape,
                        r.encode_seconds_per_image,
                        r.encode_images_per_second,
                        r.prompt_positions,
                        r.prefill_seconds,
                        r.decode_tokens_per_second_batch1,
                        r.decode_tokens_per_second_batch8
                    );
                }
            }
            Ok(())
        }
    }
}

fn read_images(paths: &[PathBuf]) -> Result<Vec<Vec<u8>>> {
    paths
        .iter()
        .map(|p| std::fs::read(p).with_context(|| format!("reading {}", p.display())))
        .collect()
}

fn generate(args: GenerateArgs) -> Result<()> {
    let model = args.model.load()?;
    let images = read_images(&args.images)?;
    let prompt = model.build_prompt(&args.prompt, images.len())?;
    let soft_prompts = if images.is_empty() {
        Vec::new()
    } else {
        let refs: Vec<&[u8]> = images.iter().map(Vec::as_slice).collect();
        let encoding = model.encode_images(&refs)?;
        (0..images.len())
            .map(|i| encoding.soft_prompt.get(i))
            .collect::<candle_core::Result<Vec<_>>>()?
    };
    let embeds = model.prompt_embeds(&prompt, &soft_prompts)?;
    let params = GenerationParams {
        max_new_tokens: args.max_new_tokens,
        min_new_tokens: args.min_new_tokens,
        num_beams: args.num_beams,
        length_penalty: args.length_penalty,
        do_sample: args.do_sample,
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        repetition_penalty: args.repetition_penalty,
        seed: args.seed,
        stop: args.stop.clone(),
        eos_token_ids: model.generation_defaults().eos_token_ids.clone(),
        ..GenerationParams::default()
    };
    params.validate()?;
    let stream = !args.json;
    let mut on_token = |event: &generation::TokenEvent| {
        if stream {
            use std::io::Write;
            print!("{}", event.text_piece);
            std::io::stdout().flush().ok();
        }
        ControlFlow::Continue(())
    };
    let output = generation::generate(
        model.language_model()?.as_ref(),
        &embeds,
        &model.penalty_context(&prompt),
        &params,
        Some(model.prompt_tokenizer().tokenizer()),
        &mut on_token,
    )?;
    if args.json {
        let json = serde_json::json!({
            "token_ids": output.token_ids,
            "text": output.text,
            "finish_reason": output.finish_reason.as_str(),
            "prompt_tokens": output.prompt_tokens,
        });
        println!("{json}");
    } else {
        println!();
    }
    Ok(())
}

fn encode(args: EncodeArgs) -> Result<()> {
    let model = args.model.load()?;
    let bytes =
        std::fs::read(&args.image).with_context(|| format!("reading {}", args.image.display()))?;
    let encoding = model.encode_images(&[bytes.as_slice()])?;
    let first = |t: &Tensor| -> Result<Tensor> { Ok(t.get(0)?.to_dtype(DType::F32)?) };
    let tensors = HashMap::from([
        ("pixel_values".to_string(), first(&encoding.pixel_values)?),
        ("image_embeds".to_string(), first(&encoding.image_embeds)?),
        ("query_output".to_string(), first(&encoding.query_output)?),
        ("soft_prompt".to_string(), first(&encoding.soft_prompt)?),
    ]);
    candle_core::safetensors::save(&tensors, &args.dump)
        .with_context(|| format!("writing {}", args.dump.display()))?;
    Ok(())
}
