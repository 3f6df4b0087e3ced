//! # blip2-model
//!
//! BLIP-2 (Li et al. 2023, <https://arxiv.org/abs/2301.12597>) inference on candle, loading
//! Hugging Face checkpoints unchanged and matching transformers' `Blip2ForConditionalGeneration`
//! (fp32, eager attention). No gRPC and no async runtime here: the service crates build on this.
//!
//! # Layout
//! - [`config`]: `config.json` (Blip2Config and its vision / Q-Former / OPT / T5 sub-configs).
//! - [`checkpoint`]: safetensors files (single or sharded), memory-mapped, dtype selection.
//! - [`processor`]: image decoding under limits, Pillow-equal bicubic resize, normalisation.
//! - [`vision`]: `Blip2VisionModel` (ViT).
//! - [`qformer`]: `Blip2QFormerModel` and the query tokens.
//! - [`linear`]: every projection (`x Wᵀ + b`), one seam for the matrix kernels.
//! - [`llm`]: the [`llm::LanguageModel`] trait and the explicit per-sequence KV cache.
//! - [`opt`], [`t5`]: the language models, driven by input embeddings.
//! - [`prompt`]: tokenisation and image placeholder expansion.
//! - [`generation`]: greedy, beam search, sampling, stop sequences, incremental detokenisation.
//! - [`model`]: [`model::Blip2Model`], the whole pipeline from image to text.
//! - [`retrieval`]: [`retrieval::RetrievalModel`], image-text retrieval (ITC embeddings, ITM
//!   matching) on `Blip2ForImageTextRetrieval` checkpoints.
//! - [`error`]: the crate's error type.
//! - [`repo_id`]: telling a Hugging Face repo id from a checkpoint path.
//! - `hub` (cargo feature `hub`): checkpoints by Hugging Face repo id, downloaded into the HF
//!   cache.

pub mod checkpoint;
pub mod compute;
pub mod config;
pub mod error;
pub mod generation;
#[cfg(feature = "hub")]
pub mod hub;
mod jpeg;
pub mod kernels;
pub mod linear;
pub mod llm;
pub mod model;
pub mod opt;
pub mod processor;
pub mod prompt;
pub mod qformer;
pub mod repo_id;
pub mod retrieval;
pub mod t5;
pub mod vision;

pub use error::{Error, Result};
