//! `blip2 train`: training data for the Q-Former's two-stage training. `train world` writes the
//! synthetic shapes world (blip2_train::world); the training stages themselves are not written
//! yet (docs/training.md).

use std::path::PathBuf;

use anyhow::{Context, Result};
use blip2_train::world::{self, WorldConfig};
use clap::{Args, Subcommand};

#[derive(Subcommand, Debug)]
pub enum TrainCommand {
    /// Write the synthetic shapes world: images of one to four objects of one shape and
    /// colour in one half of the image, with captions and questions (train/val/test).
    World(WorldArgs),
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
