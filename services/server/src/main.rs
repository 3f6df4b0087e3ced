//! The `blip2` binary: `generate`, `encode` and `bench` on a BLIP-2 checkpoint.
//!
//! The command forms of `generate` and `encode` are how the model is checked from outside:
//! keep them stable.

mod bench;
mod cli;

use anyhow::Result;
use clap::Parser;

fn main() -> Result<()> {
    let args = cli::Cli::parse();
    cli::run(args)
}
