//! Differentiable building blocks for training, written with candle ops that have a backward
//! pass (`blip2-model`'s inference kernels and candle-nn's fused layer norm have none).

use blip2_model::config::Activation;
use candle_core::{DType, Tensor, D};

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
