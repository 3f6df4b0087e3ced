//! Training data and evaluation for BLIP-2's Q-Former training (issue 9, in progress):
//!
//! - [`world`]: the synthetic shapes world (images of coloured shapes with captions and
//!   question-answer pairs) that the demo checkpoint is to be trained and evaluated on;
//! - [`data`]: image-text pairs from a JSONL manifest or a directory, every bad line reported
//!   with its place;
//! - [`metrics`]: exact match, CIDEr-D and attribute recall, as `blip2 eval world` scores a
//!   running system;
//! - [`vocab`]: an OPT byte-level BPE and a Q-Former WordPiece tokenizer built from the
//!   world's closed vocabulary, every world word one token;
//! - [`nn`] and [`optim`]: the first training primitives, differentiable layer norm,
//!   cross-entropy with label smoothing and ignored labels, AdamW with LAVIS' parameter groups,
//!   the warm-up + cosine schedule and gradient clipping;
//! - [`qformer`] and [`stage1`]: a differentiable Q-Former over named trainable parameters and
//!   stage 1's ITC, ITM and ITG losses as LAVIS computes them, equal to PyTorch's losses and
//!   gradients (tests/stage1.rs).
//!
//! Stage 2 (the LM loss through the frozen LLM), the training loop and the trained demo
//! checkpoint are not written yet; docs/training.md says what exists and what is left.

pub mod checkpoint;
pub mod data;
pub mod error;
pub mod init;
pub mod metrics;
pub mod nn;
pub mod objective;
pub mod opt;
pub mod optim;
pub mod pretrain;
pub mod qformer;
pub mod stage1;
pub mod stage2;
pub mod stage2_t5;
pub mod t5;
pub mod trainer;
pub mod vit;
pub mod vocab;
pub mod world;

pub use error::{Error, Result};
