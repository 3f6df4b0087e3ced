//! `y = x Wᵀ + b` for every projection of the pipeline (ViT, Q-Former, OPT, T5, language
//! projection). One type so that the matrix kernels behind it can be chosen per shape and
//! per weight format in one place:
//! - f32 weights, few rows (decode): [`crate::kernels::gemv`], which streams the weights at
//!   memory speed where candle's GEMV reaches about a third of it;
//! - f32 weights, many rows (prefill, encoders): candle's matmul;
//! - packed weights ([`WeightFormat`] f16 / bf16 / int8 / int4, language model only): always
//!   the gemv kernel, any row count, f32 activations.

use std::sync::Arc;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;

use crate::kernels::gemv::{self, Weights};
use crate::kernels::quant::PackedMatrix;
pub use crate::kernels::quant::WeightFormat;

/// Up to this many rows, f32 projections run on the decode kernel; above it, the packed GEMM
/// (`kernels::gemm`, weight panels packed on the fly). The kernel streams the weights once for
/// all rows; the GEMM packs each weight panel per call (in AVX transposes) and then multiplies
/// near the FMA peak. On OPT-125m a 40-position prefill took 0.070 s through the GEMM against
/// 0.076 s through the kernel (2-core target, 2026-11-29).
pub const GEMV_MAX_ROWS: usize = 16;

#[derive(Debug, Clone)]
enum Weight {
    /// `[out, in]` in the load dtype.
    Dense(Tensor),
    Packed(Arc<PackedMatrix>),
}

/// A dense projection with a weight `[out, in]` (PyTorch's `nn.Linear` layout) and an optional
/// bias `[out]`.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight: Weight::Dense(weight),
            bias,
        }
    }

    /// `weight` stored in `format` (weight-only: activations stay in their dtype, computed in
    /// f32). `None` keeps it as loaded. Packed formats live on the CPU; on another device, or
    /// for `f32`, the weight is kept dense (converted to f32 for `f32`).
    pub fn with_format(
        weight: Tensor,
        bias: Option<Tensor>,
        format: Option<WeightFormat>,
    ) -> candle_core::Result<Self> {
        let Some(format) = format else {
            return Ok(Self::new(weight, bias));
        };
        if format == WeightFormat::F32 || !weight.device().is_cpu() {
            let weight = if format == WeightFormat::F32 {
                weight.to_dtype(DType::F32)?
            } else {
                weight
            };
            return Ok(Self::new(weight, bias));
        }
        let (n, k) = weight.dims2()?;
        let values = weight
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let bias = bias.map(|b| b.to_dtype(DType::F32)).transpose()?;
        match PackedMatrix::quantize(&values, n, k, format)? {
            Some(packed) => Ok(Self {
                weight: Weight::Packed(Arc::new(packed)),
                bias,
            }),
            None => Ok(Self::new(weight, bias)),
        }
    }

    /// The stored weight: `[out, in]` in the load dtype, or for packed formats their main
    /// payload (f16 / bf16 `[out, in]`, int8 / int4 codes as u8), see [`Linear::format`].
    pub fn weight(&self) -> &Tensor {
        match &self.weight {
            Weight::Dense(w) => w,
            Weight::Packed(p) => p.payload(),
        }
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The packed format, `None` for a dense weight.
    pub fn format(&self) -> Option<WeightFormat> {
        match &self.weight {
            Weight::Dense(_) => None,
            Weight::Packed(p) => Some(p.format()),
        }
    }

    pub fn device(&self) -> &Device {
        self.weight().device()
    }

    /// `xs` in the dtype this projection computes in: a dense weight's dtype, or unchanged for
    /// packed weights (which take any float input and answer in its dtype).
    pub fn cast_input(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        match &self.weight {
            Weight::Dense(w) => xs.to_dtype(w.dtype()),
            Weight::Packed(_) => Ok(xs.clone()),
        }
    }

    /// Runs the decode kernel on `xs` (`[.., k]`, f32) with `weights`; `n` outputs.
    fn forward_kernel(
        &self,
        xs: &Tensor,
        n: usize,
        k: usize,
        run: impl FnOnce(&[f32], usize, Option<&[f32]>, &mut [f32]),
    ) -> candle_core::Result<Tensor> {
        let dims = xs.dims();
        if dims.last() != Some(&k) {
            candle_core::bail!("linear: input {:?} does not end in {k}", xs.shape());
        }
        let m = xs.elem_count() / k.max(1);
        let x = xs.contiguous()?;
        let bias = self
            .bias
            .as_ref()
            .map(|b| b.to_dtype(DType::F32))
            .transpose()?;
        let (xg, xl) = x.storage_and_layout();
        let x_slice = f32_slice(&xg, xl)?;
        let bias_guard = bias.as_ref().map(|b| b.storage_and_layout());
        let b_slice = match &bias_guard {
            Some((g, l)) => Some(f32_slice(g, l)?),
            None => None,
        };
        let mut y = vec![0f32; m * n];
        run(x_slice, m, b_slice, &mut y);
        let mut shape = dims.to_vec();
        if let Some(last) = shape.last_mut() {
            *last = n;
        }
        Tensor::from_vec(y, shape, xs.device())
    }
}

/// The contiguous f32 CPU slice behind a storage guard.
fn f32_slice<'a>(
    guard: &'a candle_core::Storage,
    layout: &candle_core::Layout,
) -> candle_core::Result<&'a [f32]> {
    let candle_core::Storage::Cpu(cpu) = guard else {
        candle_core::bail!("the decode kernel runs on the CPU")
    };
    let all = cpu.as_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&all[start..end]),
        None => candle_core::bail!("the decode kernel needs contiguous operands"),
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        match &self.weight {
            Weight::Dense(w) => {
                let (n, k) = w.dims2()?;
                let rows = xs.elem_count() / k.max(1);
                let fast = w.dtype() == DType::F32
                    && xs.dtype() == DType::F32
                    && w.device().is_cpu()
                    && xs.device().is_cpu()
                    && rows <= GEMV_MAX_ROWS
                    && w.is_contiguous();
                // Many rows (prefill, the encoder): the packed GEMM (kernels::gemm) with the
                // weight panels packed on the fly.
                let big = w.dtype() == DType::F32
                    && xs.dtype() == DType::F32
                    && w.device().is_cpu()
                    && xs.device().is_cpu()
                    && rows > GEMV_MAX_ROWS
                    && w.is_contiguous();
                if big {
                    let (wg, wl) = w.storage_and_layout();
                    let w_slice = f32_slice(&wg, wl)?;
                    return self.forward_kernel(xs, n, k, |x, m, b, y| {
                        let epi = crate::kernels::gemm::Epilogue {
                            bias: b,
                            ..Default::default()
                        };
                        let threads = crate::kernels::gemm::num_threads();
                        crate::kernels::gemm::gemm_wt(x, m, k, w_slice, n, epi, y, threads)
                    });
                }
                if !fast {
                    return candle_nn::Linear::new(w.clone(), self.bias.clone()).forward(xs);
                }
                let (wg, wl) = w.storage_and_layout();
                let w_slice = f32_slice(&wg, wl)?;
                self.forward_kernel(xs, n, k, |x, m, b, y| {
                    gemv::matmul_wt(x, m, k, Weights::F32(w_slice), n, b, y)
                })
            }
            Weight::Packed(p) => {
                let (n, k) = (p.n(), p.k());
                let in_dtype = xs.dtype();
                let x = xs.to_dtype(DType::F32)?;
                let mut result = None;
                p.with_view(|view| {
                    result = Some(self.forward_kernel(&x, n, k, |x, m, b, y| {
                        gemv::matmul_wt(x, m, k, Weights::Packed(&view), n, b, y)
                    }));
                })?;
                match result {
                    Some(y) => y?.to_dtype(in_dtype),
                    None => candle_core::bail!("linear: packed weight view was not run"),
                }
            }
        }
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
    linear_in(in_dim, out_dim, bias, None, vb)
}

/// As [`linear_b`], with the weight stored in `format` (`None`: as loaded).
pub fn linear_in(
    in_dim: usize,
    out_dim: usize,
    bias: bool,
    format: Option<WeightFormat>,
    vb: VarBuilder,
) -> candle_core::Result<Linear> {
    let weight = vb.get((out_dim, in_dim), "weight")?;
    let bias = if bias {
        Some(vb.get(out_dim, "bias")?)
    } else {
        None
    };
    Linear::with_format(weight, bias, format)
}
