//! `y = x Wᵀ + b` for every projection of the pipeline (ViT, Q-Former, OPT, T5, language
//! projection). One type so that the matrix kernels behind it can be chosen per shape and
//! per weight format in one place.

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

/// A dense projection with a weight `[out, in]` (PyTorch's `nn.Linear` layout) and an optional
/// bias `[out]`.
#[derive(Debug, Clone)]
pub struct Linear {
    inner: candle_nn::Linear,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            inner: candle_nn::Linear::new(weight, bias),
        }
    }

    /// The weight `[out, in]`.
    pub fn weight(&self) -> &Tensor {
        self.inner.weight()
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.inner.bias()
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.inner.forward(xs)
    }
}

/// `prefix.weight` `[out, in]` and `prefix.bias` `[out]`.
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> candle_core::Result<Linear> {
    linear_b(in_dim, out_dim, true, vb)
}

/// `prefix.weight` `[out, in]` only.
pub fn linear_no_bias(
    in_dim: usize,
    out_dim: usize,
    vb: VarBuilder,
) -> candle_core::Result<Linear> {
    linear_b(in_dim, out_dim, false, vb)
}

/// `prefix.weight` `[out, in]`, and `prefix.bias` `[out]` when `bias`.
pub fn linear_b(
    in_dim: usize,
    out_dim: usize,
    bias: bool,
    vb: VarBuilder,
) -> candle_core::Result<Linear> {
    let weight = vb.get((out_dim, in_dim), "weight")?;
    let bias = if bias {
        Some(vb.get(out_dim, "bias")?)
    } else {
        None
    };
    Ok(Linear::new(weight, bias))
}
