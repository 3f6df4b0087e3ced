//! What a training loop drives: an [`Objective`] computes a differentiable loss on a batch of
//! examples over its trainable variables, and writes its model as a checkpoint directory.

use std::path::Path;

use candle_core::{Tensor, Var};
use rand::rngs::StdRng;

use crate::error::Result;

/// The losses of one batch: `total` (differentiable, what the optimiser minimises) and its
/// named parts as numbers, for logging.
pub struct Losses {
    pub total: Tensor,
    pub parts: Vec<(String, f64)>,
}

/// A training objective over named trainable variables.
pub trait Objective {
    /// One training example.
    type Example;

    /// The trainable variables by their Hugging Face names.
    fn trainable(&self) -> Vec<(String, Var)>;

    /// The losses on `batch`; `rng` draws whatever the loss samples (ITM's negatives).
    fn losses(&self, batch: &[Self::Example], rng: &mut StdRng) -> Result<Losses>;

    /// Called after each optimiser update (stage 1 clamps its temperature here).
    fn after_update(&self) -> Result<()> {
        Ok(())
    }

    /// Writes the model as a complete checkpoint directory `dir` (created if needed).
    fn save(&self, dir: &Path) -> Result<()>;
}
