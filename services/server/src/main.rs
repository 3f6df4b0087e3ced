//! The `blip2` binary: `serve` any tier, and `generate`, `encode`, `bench` on a checkpoint.
//!
//! The command forms of `generate` and `encode` are how the model is checked from outside:
//! keep them stable.

mod bench;
mod bench_load;
mod bench_retrieval;
mod bench_stats;
mod cli;
mod default_model;
mod eval_world;
mod http_gateway;
mod observability;
mod retrieval_cli;
mod serve;
mod session_state;
mod train_cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // candle looks its thread count up on every CPU matmul and, without RAYON_NUM_THREADS,
    // counts the physical cores by reading /proc/cpuinfo each time (tens of microseconds per
    // matmul). Pin the same value once, here, before any thread exists.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let threads = candle_core::utils::get_num_threads();
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // One line with the whole cause chain: what failed and why.
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
