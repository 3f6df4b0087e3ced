//! Differentiable building blocks for training, written with candle ops that have a backward
//! pass (`blip2-model`'s inference kernels and candle-nn's fused layer norm have none).

use blip2_model::config::Activation;
use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var, D};

use crate::error::{Error, Result};

/// Labels equal to this are left out of [`cross_entropy`] (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// `LayerNorm` over the last dimension: `(x - mean) / sqrt(var + eps) * weight + bias`, with the
/// biased variance, as `torch.nn.LayerNorm`.
pub fn layer_norm(xs: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = xs.mean_keepdim(D::Minus1)?;
    let centred = xs.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centred.broadcast_div(&(var + eps)?.sqrt()?)?;
    Ok(normed.broadcast_mul(weight)?.broadcast_add(bias)?)
}

/// `log_softmax` over the last dimension of `[N, C]` logits (the max is a detached shift, which
/// leaves the value and the gradient exact).
pub fn log_softmax(logits: &Tensor) -> Result<Tensor> {
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

/// Cross-entropy of `[N, C]` logits against class indices, as `torch.nn.functional.cross_entropy`
/// with `ignore_index=-100`, `reduction="mean"` and `label_smoothing`: per kept row,
/// `-(1 - eps) * logp[y] - eps / C * sum_c logp[c]`, averaged over the rows whose label is not
/// [`IGNORE_INDEX`]. A label outside `0..C` (other than the ignore index) is an error; with
/// every row ignored the loss is NaN, as in PyTorch.
pub fn cross_entropy(logits: &Tensor, labels: &[i64], label_smoothing: f64) -> Result<Tensor> {
    let (n, classes) = logits.dims2()?;
    if labels.len() != n {
        return Err(Error::Invalid(format!(
            "cross_entropy: {} labels for {n} rows",
            labels.len()
        )));
    }
    if !(0.0..=1.0).contains(&label_smoothing) {
        return Err(Error::Invalid(format!(
            "label_smoothing {label_smoothing} is outside [0, 1]"
        )));
    }
    let mut target = vec![0f64; n * classes];
    let mut kept = 0usize;
    for (row, &label) in labels.iter().enumerate() {
        if label == IGNORE_INDEX {
            continue;
        }
        let Some(class) = usize::try_from(label).ok().filter(|&c| c < classes) else {
            return Err(Error::Invalid(format!(
                "cross_entropy: label {label} of row {row} is outside 0..{classes}"
            )));
        };
        kept += 1;
        let row = &mut target[row * classes..(row + 1) * classes];
        for t in row.iter_mut() {
            *t = label_smoothing / classes as f64;
        }
        row[class] += 1.0 - label_smoothing;
    }
    let target =
        Tensor::from_vec(target, (n, classes), logits.device())?.to_dtype(logits.dtype())?;
    let total = (log_softmax(logits)? * target)?.sum_all()?;
    Ok((total.neg()? / kept as f64)?)
}

/// `x / max(||x||, eps)` over the last dimension, as `torch.nn.functional.normalize` (eps 1e-12).
pub fn l2_normalize(xs: &Tensor) -> Result<Tensor> {
    let norm = xs.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
    let floor = norm.ones_like()?.affine(1e-12, 0.0)?;
    Ok(xs.broadcast_div(&norm.maximum(&floor)?)?)
}

/// `x W^T + b` for `x` of any rank (`weight` `[out, in]`, PyTorch's layout).
pub fn linear(xs: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let ys = xs.broadcast_matmul(&weight.t()?)?;
    Ok(match bias {
        Some(b) => ys.broadcast_add(b)?,
        None => ys,
    })
}

/// A config's activation (`hidden_act` / `activation_function`), differentiable in every dtype.
pub fn activation(act: Activation, xs: &Tensor) -> Result<Tensor> {
    Ok(match act {
        Activation::Gelu => xs.gelu_erf()?,
        Activation::GeluTanh => xs.gelu()?,
        Activation::Relu => xs.relu()?,
        Activation::QuickGelu => (xs * sigmoid(&(xs * 1.702)?)?)?,
        Activation::Silu => (xs * sigmoid(xs)?)?,
    })
}

/// `1 / (1 + exp(-x))` from primitives (differentiable in every dtype).
fn sigmoid(xs: &Tensor) -> Result<Tensor> {
    Ok((xs.neg()?.exp()? + 1.0)?.recip()?)
}

/// The scalar value of a 0-d or 1-element tensor.
pub fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?[0])
}

/// Additive mask value for hidden positions: PyTorch's `finfo(float32).min`, as transformers'
/// eager attention uses.
pub const MASKED: f32 = f32::MIN;

/// Multi-head scaled dot-product attention: `q` `[B, T, H]`, `k`, `v` `[B, S, H]` (already
/// projected), `mask` additive and broadcastable to `[B, heads, T, S]`; `scale` multiplies the
/// scores. Returns `[B, T, H]`.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, t, h) = q.dims3()?;
    let s = k.dim(1)?;
    if heads == 0 || !h.is_multiple_of(heads) {
        return Err(Error::Invalid(format!(
            "attention: width {h} is not divisible by {heads} heads"
        )));
    }
    let d = h / heads;
    let split = |x: &Tensor, len: usize| -> Result<Tensor> {
        Ok(x.reshape((b, len, heads, d))?
            .transpose(1, 2)?
            .contiguous()?)
    };
    let (q, k, v) = (split(q, t)?, split(k, s)?, split(v, s)?);
    let mut scores = q.matmul(&k.t()?)?;
    if scale != 1.0 {
        scores = (scores * scale)?;
    }
    if let Some(mask) = mask {
        scores = scores.broadcast_add(mask)?;
    }
    let probs = softmax(&scores)?;
    Ok(probs
        .matmul(&v)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b, t, h))?)
}

/// `softmax` over the last dimension (via [`log_softmax`], differentiable in every dtype).
pub fn softmax(xs: &Tensor) -> Result<Tensor> {
    let max = xs.max_keepdim(D::Minus1)?.detach();
    let e = xs.broadcast_sub(&max)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

/// Rows of an embedding table `[V, H]` for ids `[B][L]` (all rows one length): `[B, L, H]`.
pub fn embedding(table: &Tensor, ids: &[Vec<u32>]) -> Result<Tensor> {
    let len = ids.first().map_or(0, Vec::len);
    if ids.iter().any(|r| r.len() != len) {
        return Err(Error::Invalid(
            "embedding: rows of different lengths".into(),
        ));
    }
    let (vocab, h) = table.dims2()?;
    if let Some(bad) = ids.iter().flatten().find(|&&id| id as usize >= vocab) {
        return Err(Error::Invalid(format!(
            "token id {bad} is outside the embedding table ({vocab} rows)"
        )));
    }
    let flat: Vec<u32> = ids.concat();
    let idx = Tensor::from_vec(flat, ids.len() * len, table.device())?;
    Ok(table.index_select(&idx, 0)?.reshape((ids.len(), len, h))?)
}

/// How a tensor absent from a checkpoint is initialised (BERT / BLIP-2's `_init_weights`).
#[derive(Debug, Clone, Copy)]
pub enum Init {
    /// Normal with mean 0 and this standard deviation.
    Normal(f64),
    /// Every entry this value (0 for biases and LayerNorm biases, 1 for LayerNorm weights).
    Const(f64),
}

/// A checkpoint's tensors by their Hugging Face names, some of them trainable [`Var`]s.
///
/// Load a whole checkpoint ([`ParamStore::load_dir`]), add the tensors it lacks
/// ([`ParamStore::ensure`]), make the trained ones variables ([`ParamStore::make_trainable`]);
/// the model code reads every tensor by name with [`ParamStore::get`], so a loss
/// back-propagates into exactly the variables. [`ParamStore::save`] writes the current values
/// back under their names.
pub struct ParamStore {
    tensors: BTreeMap<String, Tensor>,
    vars: BTreeMap<String, Var>,
}

impl ParamStore {
    /// An empty store.
    pub fn new() -> Self {
        Self {
            tensors: BTreeMap::new(),
            vars: BTreeMap::new(),
        }
    }

    /// Every tensor of the safetensors `files`, as `dtype` on `device`.
    pub fn load(files: &[impl AsRef<Path>], dtype: DType, device: &Device) -> Result<Self> {
        let mut tensors = BTreeMap::new();
        for file in files {
            let file = file.as_ref();
            for (name, t) in candle_core::safetensors::load(file, device)? {
                tensors.insert(name, t.to_dtype(dtype)?);
            }
        }
        Ok(Self {
            tensors,
            vars: BTreeMap::new(),
        })
    }

    /// Every tensor of a checkpoint directory's weight files, as f32 on `device`.
    pub fn load_dir(dir: &Path, device: &Device) -> Result<Self> {
        let files = blip2_model::checkpoint::weight_files(dir)?;
        Self::load(&files, DType::F32, device)
    }

    /// Adds (or replaces) a frozen tensor.
    pub fn insert(&mut self, name: &str, t: Tensor) {
        self.vars.remove(name);
        self.tensors.insert(name.to_string(), t);
    }

    /// Removes a tensor; returns it when it was there.
    pub fn remove(&mut self, name: &str) -> Option<Tensor> {
        self.vars.remove(name);
        self.tensors.remove(name)
    }

    /// Adds `name` with `shape` initialised by `init` unless the store has it; returns whether
    /// it was added. `rng` draws the normal entries (Box-Muller), so a seed fixes the result.
    pub fn ensure<R: rand::Rng>(
        &mut self,
        name: &str,
        shape: &[usize],
        init: Init,
        device: &Device,
        rng: &mut R,
    ) -> Result<bool> {
        if self.tensors.contains_key(name) {
            return Ok(false);
        }
        let n: usize = shape.iter().product();
        let values: Vec<f32> = match init {
            Init::Const(c) => vec![c as f32; n],
            Init::Normal(std) => (0..n)
                .map(|_| {
                    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
                    let u2: f64 = rng.random::<f64>();
                    let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
                    (z * std) as f32
                })
                .collect(),
        };
        self.insert(name, Tensor::from_vec(values, shape, device)?);
        Ok(true)
    }

    /// Makes every tensor whose name satisfies `trainable` a variable; returns how many.
    pub fn make_trainable(&mut self, trainable: impl Fn(&str) -> bool) -> Result<usize> {
        let mut n = 0;
        for (name, t) in &self.tensors {
            if trainable(name) && !self.vars.contains_key(name) {
                self.vars.insert(name.clone(), Var::from_tensor(t)?);
                n += 1;
            }
        }
        Ok(n)
    }

    /// Makes the tensors whose names start with one of `prefixes` trainable; returns how many.
    pub fn make_trainable_prefixes(&mut self, prefixes: &[&str]) -> Result<usize> {
        self.make_trainable(|name| prefixes.iter().any(|p| name.starts_with(p)))
    }

    /// The trainable variables by name (for the optimiser), in name order.
    pub fn trainable(&self) -> Vec<(String, Var)> {
        self.vars
            .iter()
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect()
    }

    /// The variable named `name`, if it is trainable.
    pub fn var(&self, name: &str) -> Option<&Var> {
        self.vars.get(name)
    }

    /// The tensor named `name` (a variable's current value, tracked for gradients).
    pub fn get(&self, name: &str) -> Result<&Tensor> {
        if let Some(v) = self.vars.get(name) {
            return Ok(v.as_tensor());
        }
        self.tensors
            .get(name)
            .ok_or_else(|| Error::Invalid(format!("the checkpoint has no tensor `{name}`")))
    }

    /// The tensor named `name`, or `None` when the store has none.
    pub fn get_opt(&self, name: &str) -> Option<&Tensor> {
        match self.vars.get(name) {
            Some(v) => Some(v.as_tensor()),
            None => self.tensors.get(name),
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Every name, in order.
    pub fn names(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }

    /// Every tensor with its current value (variables detached), for saving.
    pub fn snapshot(&self) -> BTreeMap<String, Tensor> {
        self.tensors
            .iter()
            .map(|(name, t)| {
                let t = match self.vars.get(name) {
                    Some(v) => v.as_detached_tensor(),
                    None => t.clone(),
                };
                (name.clone(), t)
            })
            .collect()
    }

    /// Writes every tensor (variables at their current values) as f32 safetensors to `path`;
    /// `rename` maps each name to the name to write, `None` leaving the tensor out.
    pub fn save(&self, path: &Path, rename: impl Fn(&str) -> Option<String>) -> Result<()> {
        let mut out = std::collections::HashMap::new();
        for (name, t) in self.snapshot() {
            if let Some(to) = rename(&name) {
                out.insert(to, t.to_dtype(DType::F32)?.contiguous()?);
            }
        }
        candle_core::safetensors::save(&out, path)?;
        Ok(())
    }
}

impl Default for ParamStore {
    fn default() -> Self {
        Self::new()
    }
}
