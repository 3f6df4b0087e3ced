//! The optimiser of the training stages: AdamW as `torch.optim.AdamW` with LAVIS' two parameter
//! groups, the learning-rate schedule (linear warm-up, cosine decay), global-norm gradient
//! clipping as `torch.nn.utils.clip_grad_norm_`, gradient accumulation over micro-batches
//! ([`GradAccumulator`]) and the optimiser's state on disk ([`AdamW::save_state`]).

use std::collections::HashMap;
use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};

use crate::error::{Error, Result};

/// The file [`AdamW::save_state`] writes: `exp_avg.<name>` and `exp_avg_sq.<name>` per
/// parameter and the update count `step` (a 0-d i64).
pub const STATE_FILE: &str = "optimizer.safetensors";

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

    /// The hyper-parameters.
    pub fn config(&self) -> AdamWConfig {
        self.config
    }

    /// The names in the decay group, then those in the no-decay group.
    pub fn groups(&self) -> (Vec<&str>, Vec<&str>) {
        let (decay, rest): (Vec<&Param>, Vec<&Param>) = self.params.iter().partition(|p| p.decay);
        (
            decay.iter().map(|p| p.name.as_str()).collect(),
            rest.iter().map(|p| p.name.as_str()).collect(),
        )
    }

    /// One update with learning rate `lr`, as `torch.optim.AdamW.step` (t = the update's
    /// 1-based count): `p *= 1 - lr * wd` (decay group only), `m = b1 m + (1 - b1) g`,
    /// `v = b2 v + (1 - b2) g^2`, `p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)`
    /// (eps outside the square root). A variable without a gradient (not on the loss's path)
    /// is left as it is, its moments too, as PyTorch skips parameters whose `grad` is None.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.step += 1;
        let c = self.config;
        let t = i32::try_from(self.step).unwrap_or(i32::MAX);
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

    /// Writes the moments and the update count as `dir/optimizer.safetensors`
    /// ([`STATE_FILE`]: `exp_avg.<name>`, `exp_avg_sq.<name>` in the parameters' dtype, `step`),
    /// so that [`AdamW::load_state`] continues bit-identically.
    pub fn save_state(&self, dir: &Path) -> Result<()> {
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        for p in &self.params {
            tensors.insert(format!("exp_avg.{}", p.name), p.exp_avg.clone());
            tensors.insert(format!("exp_avg_sq.{}", p.name), p.exp_avg_sq.clone());
        }
        let step = i64::try_from(self.step)
            .map_err(|_| Error::Invalid(format!("step {} does not fit an i64", self.step)))?;
        tensors.insert("step".into(), Tensor::new(step, &Device::Cpu)?);
        candle_core::safetensors::save(&tensors, dir.join(STATE_FILE))?;
        Ok(())
    }

    /// Reads what [`AdamW::save_state`] wrote into `dir`. Every parameter's moments must be
    /// there with the parameter's shape and dtype (the state of another model is refused);
    /// nothing changes unless all of them are.
    pub fn load_state(&mut self, dir: &Path) -> Result<()> {
        let path = dir.join(STATE_FILE);
        let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu)?;
        let missing = |key: &str| Error::Invalid(format!("{}: no `{key}`", path.display()));
        let step = tensors.remove("step").ok_or_else(|| missing("step"))?;
        let step = step.to_dtype(DType::I64)?.to_scalar::<i64>()?;
        let step = usize::try_from(step)
            .map_err(|_| Error::Invalid(format!("{}: step {step}", path.display())))?;
        let mut moments = Vec::with_capacity(self.params.len());
        for p in &self.params {
            let mut take = |kind: &str| -> Result<Tensor> {
                let key = format!("{kind}.{}", p.name);
                let t = tensors.remove(&key).ok_or_else(|| missing(&key))?;
                if t.dims() != p.var.dims() || t.dtype() != p.var.dtype() {
                    return Err(Error::Invalid(format!(
                        "{}: `{key}` is {:?} {:?}, the parameter {:?} {:?}",
                        path.display(),
                        t.dtype(),
                        t.dims(),
                        p.var.dtype(),
                        p.var.dims()
                    )));
                }
                Ok(t.to_device(p.var.device())?)
            };
            moments.push((take("exp_avg")?, take("exp_avg_sq")?));
        }
        if let Some(extra) = tensors.keys().next() {
            return Err(Error::Invalid(format!(
                "{}: `{extra}` is not a parameter of this model",
                path.display()
            )));
        }
        for (p, (m, v)) in self.params.iter_mut().zip(moments) {
            p.exp_avg = m;
            p.exp_avg_sq = v;
        }
        self.step = step;
        Ok(())
    }
}

/// Sums the gradients of `vars` over the micro-batches of one optimiser step (gradient
/// accumulation). The caller scales each micro-batch's loss by `1 / k` before `backward()`,
/// so the sum is the gradient of the mean of the `k` losses (`sum(grads) / k`). Only the
/// variables' gradients are kept: each micro-batch's [`GradStore`], with the gradients of
/// every intermediate tensor, is dropped as soon as it is added.
pub struct GradAccumulator {
    vars: Vec<Var>,
    sums: Vec<Option<Tensor>>,
    added: usize,
}

impl GradAccumulator {
    pub fn new(vars: Vec<Var>) -> Self {
        let sums = vec![None; vars.len()];
        Self {
            vars,
            sums,
            added: 0,
        }
    }

    /// Adds one micro-batch's gradients.
    pub fn add(&mut self, grads: GradStore) -> Result<()> {
        for (var, sum) in self.vars.iter().zip(self.sums.iter_mut()) {
            if let Some(g) = grads.get(var.as_tensor()) {
                let g = g.detach();
                *sum = Some(match sum.take() {
                    Some(s) => (s + g)?,
                    None => g,
                });
            }
        }
        self.added += 1;
        Ok(())
    }

    /// Micro-batches added since the last [`GradAccumulator::take`].
    pub fn added(&self) -> usize {
        self.added
    }

    /// The summed gradients of the variables as a [`GradStore`] for [`clip_grad_norm`] and
    /// [`AdamW::step`] (`None` when nothing was added; a variable that never got a gradient is
    /// absent); the accumulator is empty again afterwards.
    pub fn take(&mut self) -> Option<GradStore> {
        if self.added == 0 {
            return None;
        }
        self.added = 0;
        let mut store = GradStore::default();
        for (var, sum) in self.vars.iter().zip(self.sums.iter_mut()) {
            if let Some(s) = sum.take() {
                store.insert(var.as_tensor(), s);
            }
        }
        Some(store)
    }
}

/// Clips the gradients of `vars` in place to a global L2 norm of at most `max_norm`, as
/// `torch.nn.utils.clip_grad_norm_`: when the norm exceeds it, every gradient is multiplied by
/// `max_norm / (norm + 1e-6)`. Returns the norm before clipping (`f64::INFINITY` as
/// `max_norm` only measures it). A non-finite norm is an error (the step would poison the
/// weights).
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

/// The learning rate of step `step` (0-based) of `total`, warm-up `warmup` steps, peak `peak`,
/// floor `min`:
///
/// - warm-up, `step < warmup`: `peak * (step + 1) / warmup`, a straight line from 0 (before
///   the first step) reaching `peak` on step `warmup - 1`;
/// - then cosine decay, `progress = min(1, (step - warmup) / max(1, total - warmup))`:
///   `min + (peak - min) * (1 + cos(pi * progress)) / 2`, `peak` on step `warmup`, falling to
///   `min` at `step = total` (the last step, `total - 1`, is one decay step above it: no step
///   is taken at a learning rate of exactly `min`, which is 0 by default).
pub fn lr_at(step: usize, total: usize, warmup: usize, peak: f64, min: f64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    min + (peak - min) * (1.0 + (std::f64::consts::PI * progress).cos()) / 2.0
}
