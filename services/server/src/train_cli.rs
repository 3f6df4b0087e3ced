//! `blip2 train`: the synthetic shapes world and the training stages.
//!
//! `train world` writes the world (blip2_train::world). `train vit`, `train opt`, `train stage1`
//! and `train stage2` each read a checkpoint directory (`--model`) and write a full one
//! (`--out`) through blip2_train's training loop (blip2_train::trainer: AdamW, warm-up +
//! cosine schedule, clipping, accumulation, `OUT/steps.jsonl`, checkpoints in
//! `OUT/checkpoints/step-N`, the final model in `OUT`). Ctrl-C or SIGTERM finishes the current
//! step, writes a checkpoint and stops; `--resume OUT` continues it exactly.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use blip2_model::config::{Blip2Config, TextConfig};
use blip2_model::processor::{DecodeLimits, ImageProcessor, ImageProcessorConfig};
use blip2_train::data::{self, Pair};
use blip2_train::init::InitOptions;
use blip2_train::objective::Objective;
use blip2_train::pretrain::{OptPretrain, VitPretrain};
use blip2_train::stage1::{Stage1, Stage1Options};
use blip2_train::stage2::{Stage2, Stage2Options};
use blip2_train::stage2_t5::Stage2T5;
use blip2_train::trainer::{self, TrainConfig, TrainReport};
use blip2_train::world::{self, WorldConfig};
use candle_core::Tensor;
use clap::{Args, Subcommand};

#[derive(Subcommand, Debug)]
pub enum TrainCommand {
    /// Write the synthetic shapes world: images of one to four objects of one shape and
    /// colour in one half of the image, with captions and questions (train/val/test).
    World(WorldArgs),
    /// Write a freshly initialised BLIP-2 checkpoint (OPT) for the world: tokenizers built
    /// from the world's vocabulary, every tensor the server loads, drawn as transformers
    /// initialises BLIP-2 (the first step of the training pipeline).
    Init(InitArgs),
    /// Pretrain the vision encoder on the world's attributes (`labels.jsonl`: one
    /// classification head per attribute, dropped on save); everything else is copied.
    Vit(VitArgs),
    /// Pretrain OPT as a language model on text lines (the world's `text.txt`); everything
    /// else is copied.
    Opt(OptArgs),
    /// Stage 1 (ITC + ITM + ITG) on the captions of a manifest or directory, the vision encoder
    /// frozen; writes the Blip2ForImageTextRetrieval layout plus itg_head.* and temp.
    Stage1(Stage1Args),
    /// Stage 2 on captions and question-answer pairs, the vision encoder and the LLM frozen:
    /// the language-modelling loss through OPT, or the prefix-LM loss through Flan-T5 (a
    /// caption split into prefix and target at a seeded word); writes
    /// Blip2ForConditionalGeneration.
    Stage2(Stage2Args),
}

/// The flags every training stage shares.
#[derive(Args, Debug)]
pub struct CommonArgs {
    /// The checkpoint directory to start from.
    #[arg(long)]
    model: PathBuf,
    /// The run's directory: the final checkpoint, `checkpoints/step-N` and `steps.jsonl`.
    #[arg(long)]
    out: PathBuf,
    /// Optimiser steps in all (a resumed run continues up to this).
    #[arg(long, default_value_t = 1000)]
    steps: usize,
    /// Examples per micro-batch.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Micro-batches per optimiser step (gradient accumulation).
    #[arg(long, default_value_t = 1)]
    accumulate: usize,
    /// Peak learning rate (AdamW), reached after --warmup-steps, then cosine decay to --min-lr.
    #[arg(long, default_value_t = 1e-4)]
    lr: f64,
    #[arg(long, default_value_t = 0.0)]
    min_lr: f64,
    #[arg(long, default_value_t = 100)]
    warmup_steps: usize,
    /// AdamW's decoupled weight decay (not on biases, norms and 0-d parameters such as temp).
    #[arg(long, default_value_t = 0.05)]
    weight_decay: f64,
    /// Global gradient-norm limit (0: none).
    #[arg(long, default_value_t = 1.0)]
    grad_clip: f64,
    /// Seed of the data order and of each step's random draws.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write a checkpoint every N steps (0: only at the end).
    #[arg(long, default_value_t = 0)]
    save_every: usize,
    /// Checkpoints kept in OUT/checkpoints.
    #[arg(long, default_value_t = 2)]
    keep: usize,
    /// Evaluate on the validation data every N steps (0: never).
    #[arg(long, default_value_t = 0)]
    eval_every: usize,
    /// With --no-progress, print the losses every N steps.
    #[arg(long, default_value_t = 10)]
    log_every: usize,
    /// Continue a run: a checkpoint directory, or a run's OUT (its latest checkpoint). Needs
    /// the same --model, --seed, --batch-size and --accumulate.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Stop at the first bad data line instead of reporting and skipping it.
    #[arg(long)]
    strict: bool,
    /// No progress bar (log lines on stderr instead).
    #[arg(long)]
    no_progress: bool,
}

impl CommonArgs {
    fn config(&self) -> TrainConfig {
        TrainConfig {
            steps: self.steps,
            batch_size: self.batch_size,
            accumulate: self.accumulate,
            lr: self.lr,
            min_lr: self.min_lr,
            warmup_steps: self.warmup_steps,
            weight_decay: self.weight_decay,
            grad_clip: self.grad_clip,
            seed: self.seed,
            save_every: self.save_every,
            keep: self.keep,
            eval_every: self.eval_every,
            log_every: self.log_every,
            progress: !self.no_progress,
            ..TrainConfig::default()
        }
    }
}

#[derive(Args, Debug)]
pub struct VitArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// The world's `labels.jsonl` (its `train` split trains, its `val` split evaluates).
    #[arg(long)]
    data: PathBuf,
    /// Start the position embeddings as 2-D sine-cosine ones (MAE's initialisation) instead of
    /// the checkpoint's: where a patch is is then in its features from the start, readable by
    /// attention (the Q-Former's queries) and not only by a patch's place.
    #[arg(long)]
    sincos_positions: bool,
}

#[derive(Args, Debug)]
pub struct OptArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// A text file, one text per line (the world's `text.txt`).
    #[arg(long)]
    data: PathBuf,
    /// Optional validation text file.
    #[arg(long)]
    val: Option<PathBuf>,
    /// Lines are cut to this many tokens (BOS and EOS included).
    #[arg(long, default_value_t = 64)]
    max_len: usize,
}

#[derive(Args, Debug)]
pub struct Stage1Args {
    #[command(flatten)]
    common: CommonArgs,
    /// A JSONL manifest (`{"image", "text"}` per line) or a directory of images with .txt
    /// captions; lines with a prompt (questions) are left out.
    #[arg(long)]
    data: PathBuf,
    /// Optional validation manifest (captions).
    #[arg(long)]
    val: Option<PathBuf>,
    /// The Q-Former's tokenizer.json (WordPiece with [DEC]); default: the checkpoint's.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Texts are cut to this many tokens (LAVIS' max_txt_len).
    #[arg(long, default_value_t = 32)]
    max_txt_len: usize,
}

#[derive(Args, Debug)]
pub struct Stage2Args {
    #[command(flatten)]
    common: CommonArgs,
    /// A JSONL manifest (`{"image", "text", "prompt"?}` per line) or a directory of images
    /// with .txt captions.
    #[arg(long)]
    data: PathBuf,
    /// Optional validation manifest.
    #[arg(long)]
    val: Option<PathBuf>,
    /// A stage-1 checkpoint whose Q-Former and query tokens to start from (without it: stage 2
    /// without stage 1, the ablation).
    #[arg(long)]
    qformer_from: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct InitArgs {
    /// The checkpoint directory to write (created if missing).
    #[arg(long)]
    out: PathBuf,
    /// Side of the square images (the world's --image-size).
    #[arg(long, default_value_t = 64)]
    image_size: usize,
    #[arg(long, default_value_t = 8)]
    patch_size: usize,
    #[arg(long, default_value_t = 96)]
    vision_hidden: usize,
    #[arg(long, default_value_t = 3)]
    vision_layers: usize,
    #[arg(long, default_value_t = 4)]
    vision_heads: usize,
    #[arg(long, default_value_t = 192)]
    vision_intermediate: usize,
    #[arg(long, default_value_t = 96)]
    qformer_hidden: usize,
    #[arg(long, default_value_t = 2)]
    qformer_layers: usize,
    #[arg(long, default_value_t = 4)]
    qformer_heads: usize,
    #[arg(long, default_value_t = 192)]
    qformer_intermediate: usize,
    #[arg(long, default_value_t = 1)]
    cross_attention_frequency: usize,
    #[arg(long, default_value_t = 8)]
    num_query_tokens: usize,
    /// Width of the image-text contrastive embeddings.
    #[arg(long, default_value_t = 64)]
    embed_dim: usize,
    #[arg(long, default_value_t = 96)]
    llm_hidden: usize,
    #[arg(long, default_value_t = 2)]
    llm_layers: usize,
    #[arg(long, default_value_t = 4)]
    llm_heads: usize,
    #[arg(long, default_value_t = 256)]
    llm_ffn: usize,
    /// OPT's and the Q-Former's max_position_embeddings.
    #[arg(long, default_value_t = 64)]
    max_positions: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Args, Debug)]
pub struct WorldArgs {
    /// The directory to write (created if missing).
    #[arg(long)]
    out: PathBuf,
    /// Side of the square images, in pixels (at least 32).
    #[arg(long, default_value_t = 64)]
    image_size: u32,
    #[arg(long, default_value_t = 3000)]
    train_images: usize,
    #[arg(long, default_value_t = 300)]
    val_images: usize,
    #[arg(long, default_value_t = 300)]
    test_images: usize,
    /// Seed of every random choice: the same flags write the same bytes.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub fn run(command: TrainCommand) -> Result<()> {
    match command {
        TrainCommand::World(args) => world(args),
        TrainCommand::Init(args) => init(args),
        TrainCommand::Vit(args) => vit(args),
        TrainCommand::Opt(args) => opt(args),
        TrainCommand::Stage1(args) => stage1(args),
        TrainCommand::Stage2(args) => stage2(args),
    }
}

fn world(args: WorldArgs) -> Result<()> {
    let cfg = WorldConfig {
        image_size: args.image_size,
        train_images: args.train_images,
        val_images: args.val_images,
        test_images: args.test_images,
        seed: args.seed,
    };
    let summary = world::generate(&args.out, &cfg)
        .with_context(|| format!("writing the world into {}", args.out.display()))?;
    println!(
        "{} images in {}; {}; {} words",
        summary.images,
        args.out.display(),
        summary
            .pairs
            .iter()
            .map(|(split, n)| format!("{split}.jsonl {n} pairs"))
            .collect::<Vec<_>>()
            .join(", "),
        summary.vocabulary.len()
    );
    Ok(())
}

fn init(args: InitArgs) -> Result<()> {
    let options = InitOptions {
        image_size: args.image_size,
        patch_size: args.patch_size,
        vision_hidden: args.vision_hidden,
        vision_layers: args.vision_layers,
        vision_heads: args.vision_heads,
        vision_intermediate: args.vision_intermediate,
        qformer_hidden: args.qformer_hidden,
        qformer_layers: args.qformer_layers,
        qformer_heads: args.qformer_heads,
        qformer_intermediate: args.qformer_intermediate,
        cross_attention_frequency: args.cross_attention_frequency,
        num_query_tokens: args.num_query_tokens,
        embed_dim: args.embed_dim,
        llm_hidden: args.llm_hidden,
        llm_layers: args.llm_layers,
        llm_heads: args.llm_heads,
        llm_ffn: args.llm_ffn,
        max_positions: args.max_positions,
        seed: args.seed,
        ..InitOptions::default()
    };
    let summary = blip2_train::init::init(&args.out, &options)
        .with_context(|| format!("writing a new checkpoint into {}", args.out.display()))?;
    println!(
        "{}: {} tensors, {} parameters; OPT vocabulary {}, Q-Former vocabulary {} (tokenizer in {}/{})",
        args.out.display(),
        summary.tensors,
        summary.parameters,
        summary.opt_tokenizer.vocab_size,
        summary.qformer_tokenizer.vocab_size,
        args.out.display(),
        blip2_train::init::QFORMER_TOKENIZER_DIR,
    );
    Ok(())
}

/// The checkpoint's image processor (its processor files, else BLIP's defaults at the vision
/// config's image size).
fn processor(model: &Path) -> Result<ImageProcessor> {
    let config = Blip2Config::from_file(&model.join("config.json"))
        .with_context(|| format!("reading {}", model.join("config.json").display()))?;
    let cfg = ImageProcessorConfig::from_dir(model, config.vision_config.image_size)
        .with_context(|| format!("reading the image processor of {}", model.display()))?;
    Ok(ImageProcessor::new(cfg, DecodeLimits::default()))
}

/// Loads image-text pairs, reporting the lines left out.
fn pairs(path: &Path, processor: &ImageProcessor, strict: bool) -> Result<Vec<Pair>> {
    let dataset = data::load(path, processor, strict)
        .with_context(|| format!("loading {}", path.display()))?;
    for line in &dataset.skipped {
        eprintln!("skipped {line}");
    }
    eprintln!(
        "{}: {} pairs of {} images",
        path.display(),
        dataset.pairs.len(),
        dataset.images
    );
    Ok(dataset.pairs)
}

fn vit(args: VitArgs) -> Result<()> {
    let c = &args.common;
    let processor = processor(&c.model)?;
    let load = |split: &str| {
        data::load_labels(&args.data, &processor, Some(split), c.strict)
            .with_context(|| format!("loading {} ({split})", args.data.display()))
    };
    let train_set = load("train")?;
    for line in &train_set.skipped {
        eprintln!("skipped {line}");
    }
    let heads: Vec<usize> = train_set.heads.iter().map(|(_, n)| *n).collect();
    let examples: Vec<(Tensor, Vec<usize>)> = train_set
        .images
        .into_iter()
        .map(|i| (i.pixels, i.labels))
        .collect();
    let val: Option<Vec<(Tensor, Vec<usize>)>> = if c.eval_every > 0 {
        Some(
            load("val")?
                .images
                .into_iter()
                .map(|i| (i.pixels, i.labels))
                .collect(),
        )
    } else {
        None
    };
    let objective = VitPretrain::with_options(&c.model, &heads, c.seed, args.sincos_positions)
        .with_context(|| format!("loading {}", c.model.display()))?;
    fit("ViT pretraining", &objective, &examples, val.as_deref(), c)
}

fn opt(args: OptArgs) -> Result<()> {
    let c = &args.common;
    let examples = data::load_text(&args.data)?;
    let val = args.val.as_deref().map(data::load_text).transpose()?;
    let objective = OptPretrain::new(&c.model, args.max_len)
        .with_context(|| format!("loading {}", c.model.display()))?;
    fit("OPT pretraining", &objective, &examples, val.as_deref(), c)
}

fn stage1(args: Stage1Args) -> Result<()> {
    let c = &args.common;
    let processor = processor(&c.model)?;
    let captions = |path: &Path| -> Result<Vec<Pair>> {
        let all = pairs(path, &processor, c.strict)?;
        let n = all.len();
        let kept: Vec<Pair> = all.into_iter().filter(Pair::is_caption).collect();
        if kept.len() < n {
            eprintln!(
                "{}: {} lines with a prompt left out (stage 1 trains on captions)",
                path.display(),
                n - kept.len()
            );
        }
        Ok(kept)
    };
    let examples = captions(&args.data)?;
    let val = args.val.as_deref().map(captions).transpose()?;
    let objective = Stage1::new(
        &c.model,
        &Stage1Options {
            tokenizer: args.tokenizer.clone(),
            max_txt_len: args.max_txt_len,
            seed: c.seed,
            ..Stage1Options::default()
        },
    )
    .with_context(|| format!("loading {}", c.model.display()))?;
    fit("stage 1", &objective, &examples, val.as_deref(), c)
}

fn stage2(args: Stage2Args) -> Result<()> {
    let c = &args.common;
    let processor = processor(&c.model)?;
    let examples = pairs(&args.data, &processor, c.strict)?;
    let val = args
        .val
        .as_deref()
        .map(|p| pairs(p, &processor, c.strict))
        .transpose()?;
    let options = Stage2Options {
        qformer_from: args.qformer_from.clone(),
        ..Stage2Options::default()
    };
    let config = Blip2Config::from_file(&c.model.join("config.json"))
        .with_context(|| format!("reading {}", c.model.join("config.json").display()))?;
    if matches!(config.text_config, TextConfig::T5(_)) {
        let objective = Stage2T5::new(&c.model, &options)
            .with_context(|| format!("loading {}", c.model.display()))?;
        return fit(
            "stage 2 (Flan-T5, prefix LM)",
            &objective,
            &examples,
            val.as_deref(),
            c,
        );
    }
    let objective = Stage2::new(&c.model, &options)
        .with_context(|| format!("loading {}", c.model.display()))?;
    fit("stage 2", &objective, &examples, val.as_deref(), c)
}

/// SIGINT (Ctrl-C) and SIGTERM ask the training loop to stop after its current step: a
/// thread with its own small runtime waits for either and calls [`trainer::request_stop`].
fn install_interrupt_handler() -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the signal handler's runtime")?;
    std::thread::Builder::new()
        .name("train-signals".into())
        .spawn(move || {
            runtime.block_on(async {
                #[cfg(unix)]
                {
                    use tokio::signal::unix::{signal, SignalKind};
                    let Ok(mut term) = signal(SignalKind::terminate()) else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::signal::ctrl_c() => {}
                        _ = term.recv() => {}
                    }
                }
                #[cfg(not(unix))]
                {
                    let _ = tokio::signal::ctrl_c().await;
                }
                eprintln!("stopping after the current step (a checkpoint follows)");
                trainer::request_stop();
            });
        })
        .context("starting the signal handler's thread")?;
    Ok(())
}

/// Runs the training loop and reports the result; an interrupted run is an error that says
/// how to continue it.
fn fit<O: Objective>(
    what: &str,
    objective: &O,
    examples: &[O::Example],
    val: Option<&[O::Example]>,
    c: &CommonArgs,
) -> Result<()>
where
    O::Example: Clone,
{
    install_interrupt_handler()?;
    let cfg = c.config();
    let mut run = trainer::Run::new(&c.out);
    run.resume = c.resume.as_deref();
    run.val = val;
    let report = trainer::train(objective, examples, &cfg, &run)
        .with_context(|| format!("{what} from {}", c.model.display()))?;
    print_report(what, &report, &c.out);
    if report.interrupted {
        bail!(
            "{what} interrupted after step {} of {}; the checkpoint is {}; continue with the same flags and --resume {}",
            report.steps,
            cfg.steps,
            report
                .checkpoint
                .as_deref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "not written".into()),
            c.out.display()
        );
    }
    Ok(())
}

fn print_report(what: &str, report: &TrainReport, out: &Path) {
    let losses = |l: &[(String, f64)]| {
        l.iter()
            .map(|(name, value)| format!("{name} {value:.4}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "{what}: step {} ({} this run) in {:.1} s, {:.1} examples/s; losses (last {} steps) {}",
        report.steps,
        report.steps_this_run,
        report.seconds,
        report.examples_per_second,
        trainer::SMOOTHING,
        losses(&report.smoothed)
    );
    if let Some(val) = &report.val_losses {
        println!("validation: {}", losses(val));
    }
    if !report.interrupted {
        println!("wrote {}", out.display());
    }
}
