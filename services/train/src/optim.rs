//! The optimiser of the training stages: AdamW as `torch.optim.AdamW` with LAVIS' two parameter
//! groups, the learning-rate schedule (linear warm-up, cosine decay) and global-norm gradient
//! clipping as `torch.nn.utils.clip_grad_norm_`.

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::error::{Error, Result};

/// AdamW's hyper-parameters (PyTorch's defaults but for the learning rate, set per step).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay, applied to the decay group only ([`decays`]).
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        // PyTorch's betas and eps; weight decay 0.05 as LAVIS' BLIP-2 pretraining configs.
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.05,
        }
    }
}

/// Whether a parameter gets weight decay: matrices and higher, but no normalisation weights;
/// biases, 1-d and 0-d parameters (such as ITC's temperature) do not (LAVIS' grouping).
pub fn decays(name: &str, var: &Var) -> bool {
    var.rank() >= 2 && !name.to_lowercase().contains("norm")
}

struct Param {
    name: String,
    var: Var,
    decay: bool,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

/// AdamW over named variables.
pub struct AdamW {
    params: Vec<Param>,
    config: AdamWConfig,
    step: usize,
}

impl AdamW {
    pub fn new(vars: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        let params = vars
            .into_iter()
            .map(|(name, var)| {
                Ok(Param {
                    decay: decays(&name, &var),
                    exp_avg: var.zeros_like()?,
                    exp_avg_sq: var.zeros_like()?,
                    name,
                    var,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            params,
            config,
            step: 0,
        })
    }

    /// Updates taken so far.
    pub fn steps(&self) -> usize {
        self.step
    }

    /// The names in the decay group, then those in the no-decay group.
    pub fn groups(&self) -> (Vec<&str>, Vec<&str>) {
        let (decay, rest): (Vec<&Param>, Vec<&Param>) = self.params.iter().partition(|p| p.decay);
        (
            decay.iter().map(|p| p.name.as_str()).collect(),
            rest.iter().map(|p| p.name.as_str()).collect(),
        )
    }

    /// One update with learning rate `lr`, as `torch.optim.AdamW.step`:
    /// `p *= 1 - lr * wd` (decay group), `m = b1 m + (1 - b1) g`, `v = b2 v + (1 - b2) g^2`,
    /// `p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)`. A variable without a
    /// gradient (not on the loss's path) is left as it is, its moments too.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.step += 1;
        let c = self.config;
        let t = self.step as i32;
        let bias1 = 1.0 - c.beta1.powi(t);
        let bias2_sqrt = (1.0 - c.beta2.powi(t)).sqrt();
        for p in &mut self.params {
            let Some(g) = grads.get(p.var.as_tensor()) else {
                continue;
            };
            let g = g.detach();
            let mut theta = p.var.as_detached_tensor();
            if p.decay && c.weight_decay != 0.0 {
                theta = (theta * (1.0 - lr * c.weight_decay))?;
            }
            p.exp_avg = ((&p.exp_avg * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            p.exp_avg_sq = ((&p.exp_avg_sq * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let denom = ((p.exp_avg_sq.sqrt()? / bias2_sqrt)? + c.eps)?;
            let update = ((&p.exp_avg / &denom)? * (lr / bias1))?;
            p.var.set(&(theta - update)?)?;
        }
        Ok(())
    }
}

/// Clips the gradients of `vars` in place to a global L2 norm of at most `max_norm`, as
/// `torch.nn.utils.clip_grad_norm_`: when the norm exceeds it, every gradient is multiplied by
/// `max_norm / (norm + 1e-6)`. Returns the norm before clipping. A non-finite norm is an error
/// (the step would poison the weights).
pub fn clip_grad_norm(grads: &mut GradStore, vars: &[&Var], max_norm: f64) -> Result<f64> {
    let mut total = 0f64;
    for var in vars {
        if let Some(g) = grads.get(var.as_tensor()) {
            total += crate::nn::scalar(&g.sqr()?.sum_all()?)?;
        }
    }
    let norm = total.sqrt();
    if !norm.is_finite() {
        return Err(Error::Invalid(format!(
            "the gradient norm is {norm}: the loss diverged"
        )));
    }
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for var in vars {
            if let Some(g) = grads.remove(var.as_tensor()) {
                grads.insert(var.as_tensor(), (g * coef)?);
            }
        }
    }
    Ok(norm)
}

/// The learning rate of step `step` (0-based) of `total`: linear warm-up to `peak` over
/// `warmup` steps (`peak * (step + 1) / warmup`), then cosine decay to `min`:
/// `min + (peak - min) * (1 + cos(pi * (step - warmup) / max(1, total - warmup))) / 2`.
pub fn lr_at(step: usize, total: usize, warmup: usize, peak: f64, min: f64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    min + (peak - min) * (1.0 + (std::f64::consts::PI * progress).cos()) / 2.0
}
