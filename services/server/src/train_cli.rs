//! `blip2 train`: the Q-Former's training. `train world` writes the synthetic shapes world
//! (blip2_train::world); `train stage1` runs stage 1 (blip2_train::stage1_run). Stage 2 is not
//! written yet (docs/training.md).

use std::path::PathBuf;

use anyhow::{Context, Result};
use blip2_train::stage1_run::{self, Stage1Options};
use blip2_train::world::{self, WorldConfig};
use clap::{Args, Subcommand};

#[derive(Subcommand, Debug)]
pub enum TrainCommand {
    /// Write the synthetic shapes world: images of one to four objects of one shape and
    /// colour in one half of the image, with captions and questions (train/val/test).
    World(WorldArgs),
    /// Stage 1 (ITC + ITM + ITG) on the captions of a manifest or directory, the vision encoder
    /// frozen, from a Blip2ForImageTextRetrieval checkpoint; writes the trained checkpoint
    /// (same layout, plus itg_head.* and temp) to --out.
    Stage1(Stage1Args),
}

#[derive(Args, Debug)]
pub struct Stage1Args {
    /// A Blip2ForImageTextRetrieval checkpoint directory (the vision encoder stays frozen).
    #[arg(long)]
    model: PathBuf,
    /// A JSONL manifest (`{"image", "text"}` per line) or a directory of images with .txt
    /// captions; lines with a `prompt` are left out.
    #[arg(long)]
    data: PathBuf,
    /// Where to write the trained checkpoint (replaced atomically at the end).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 1000)]
    steps: usize,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Peak learning rate (AdamW), reached after --warmup-steps, then cosine decay to --min-lr.
    #[arg(long, default_value_t = 1e-4)]
    lr: f64,
    #[arg(long, default_value_t = 0.0)]
    min_lr: f64,
    #[arg(long, default_value_t = 100)]
    warmup_steps: usize,
    /// AdamW's decoupled weight decay (not on biases, norms and `temp`).
    #[arg(long, default_value_t = 0.05)]
    weight_decay: f64,
    /// Global gradient-norm limit.
    #[arg(long, default_value_t = 1.0)]
    grad_clip: f64,
    /// Seed of the data order and of ITM's negative sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop at the first bad manifest line instead of reporting and skipping it.
    #[arg(long)]
    strict: bool,
    /// Print the losses every N steps.
    #[arg(long, default_value_t = 10)]
    log_every: usize,
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
        TrainCommand::Stage1(args) => stage1(args),
        TrainCommand::World(args) => {
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
    }
}

fn stage1(args: Stage1Args) -> Result<()> {
    let opts = Stage1Options {
        model: args.model,
        data: args.data,
        out: args.out,
        steps: args.steps,
        batch_size: args.batch_size,
        lr: args.lr,
        min_lr: args.min_lr,
        warmup_steps: args.warmup_steps,
        weight_decay: args.weight_decay,
        grad_clip: args.grad_clip,
        seed: args.seed,
        strict: args.strict,
    };
    let started = std::time::Instant::now();
    let every = args.log_every;
    let total = opts.steps;
    let report = stage1_run::run(&opts, |step, l| {
        if every > 0 && (step % every == 0 || step + 1 == total) {
            let rate = (step + 1) as f64 / started.elapsed().as_secs_f64().max(1e-9);
            eprintln!(
                "step {:>6}/{total}  itc {:.4}  itm {:.4}  itg {:.4}  total {:.4}  {rate:.1} steps/s",
                step + 1,
                l[0],
                l[1],
                l[2],
                l[3]
            );
        }
    })
    .with_context(|| format!("stage 1 from {}", opts.model.display()))?;
    for line in &report.skipped {
        eprintln!("skipped {line}");
    }
    println!(
        "stage 1: {} steps on {} captions of {} images in {:.1} s; wrote {}",
        report.losses.len(),
        report.pairs,
        report.images,
        report.seconds,
        opts.out.display()
    );
    Ok(())
}
