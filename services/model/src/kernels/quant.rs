//! Weight-only formats for the language model's projections: f16, bf16, int8 and int4 weights
//! with f32 activations.
//!
//! Why weight-only: decode is bound by the bytes of weights read per token, not by arithmetic,
//! so shrinking the weights is what speeds it up; activations stay f32, so the rest of the
//! model (norms, attention, residuals) is untouched and bf16 becomes usable on CPU, where candle
//! 0.11 has no bf16 matmul.
//!
//! Why not candle's `QMatMul` (Q8_0 / Q4_0): its CPU path quantizes the activations to 8 bits
//! per call as well (an extra error on top of the weights'), and it cannot hold f16/bf16, so it
//! would give two code paths for four formats. Its speed was not compared here. With AVX-512,
//! int8 and int4 are dequantized in registers inside the dot products ([`super::gemv`]'s fused
//! kernels: widen, convert, scale, FMA), with exact f32 arithmetic on the dequantized weights;
//! f16 / bf16, and every format without AVX-512, dequantize a weight tile into L1 and reuse the
//! f32 kernel. Dequantizing through L1 doubled the work per weight and made int8 decode
//! compute-bound at about the f32 speed.
//!
//! Layouts (all `[n, k]` row-major like `nn.Linear`, groups of [`GROUP`] along `k`):
//! - int8: symmetric per group, `w ≈ q · scale`, `q ∈ [-127, 127]`;
//! - int4: asymmetric per group, `w ≈ q · scale + min`, `q ∈ [0, 15]`, two per byte: byte `t`
//!   of a group holds element `t` in its low nibble and element `t + 16` in its high nibble,
//!   so one 16-byte load unpacks into two contiguous runs of 16.

use candle_core::{Device, Layout, Result, Storage, Tensor, WithDType};
use half::{bf16, f16};

/// Elements of `k` sharing one scale (and, for int4, one minimum).
pub const GROUP: usize = 32;

/// How the language model's projection weights are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WeightFormat {
    F32,
    F16,
    Bf16,
    Int8,
    Int4,
}

impl WeightFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            WeightFormat::F32 => "f32",
            WeightFormat::F16 => "f16",
            WeightFormat::Bf16 => "bf16",
            WeightFormat::Int8 => "int8",
            WeightFormat::Int4 => "int4",
        }
    }

    /// Every format, for tests and reports.
    pub const ALL: [WeightFormat; 5] = [
        WeightFormat::F32,
        WeightFormat::F16,
        WeightFormat::Bf16,
        WeightFormat::Int8,
        WeightFormat::Int4,
    ];
}

impl std::fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for WeightFormat {
    type Err = crate::Error;

    fn from_str(s: &str) -> crate::Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(WeightFormat::F32),
            "f16" | "float16" => Ok(WeightFormat::F16),
            "bf16" | "bfloat16" => Ok(WeightFormat::Bf16),
            "int8" | "i8" | "q8" => Ok(WeightFormat::Int8),
            "int4" | "i4" | "q4" => Ok(WeightFormat::Int4),
            other => Err(crate::Error::InvalidInput(format!(
                "`llm_weights` must be one of f32, f16, bf16, int8, int4 (got `{other}`)"
            ))),
        }
    }
}

/// The payload of a packed weight, held in candle tensors so that [`crate::linear::Linear`]
/// can hand it out as its weight and place it like any other tensor.
#[derive(Debug, Clone)]
enum Data {
    /// `[n, k]` f16.
    F16(Tensor),
    /// `[n, k]` bf16.
    Bf16(Tensor),
    /// `[n, k]` codes (i8 stored as u8: candle has no i8 dtype), `[n, groups]` f32 scales.
    Int8 { q: Tensor, scales: Tensor },
    /// `[n, groups * GROUP / 2]` nibble pairs, `[n, groups]` f32 scales and minima.
    Int4 {
        q: Tensor,
        scales: Tensor,
        mins: Tensor,
    },
}

/// A `[n, k]` weight in a reduced format. The kernels read it through [`PackedView`].
#[derive(Debug, Clone)]
pub struct PackedMatrix {
    n: usize,
    k: usize,
    data: Data,
}

/// Borrowed slices of a [`PackedMatrix`]'s payload, valid while the storage is read-locked.
#[derive(Debug, Clone, Copy)]
enum ViewData<'a> {
    F16(&'a [f16]),
    Bf16(&'a [bf16]),
    Int8 {
        q: &'a [u8],
        scales: &'a [f32],
    },
    Int4 {
        q: &'a [u8],
        scales: &'a [f32],
        mins: &'a [f32],
    },
}

/// What [`super::gemv`] reads: a packed `[n, k]` weight as plain slices.
#[derive(Debug, Clone, Copy)]
pub struct PackedView<'a> {
    n: usize,
    k: usize,
    data: ViewData<'a>,
}

fn groups(k: usize) -> usize {
    k.div_ceil(GROUP)
}

/// The contiguous CPU slice behind `t`.
fn cpu_slice<'a, T: WithDType>(guard: &'a Storage, layout: &Layout) -> Result<&'a [T]> {
    let Storage::Cpu(cpu) = guard else {
        candle_core::bail!("packed weights live on the CPU")
    };
    let all = cpu.as_slice::<T>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&all[start..end]),
        None => candle_core::bail!("packed weights must be contiguous"),
    }
}

impl PackedMatrix {
    /// Packs `w` (`[n, k]`, row-major f32). `F32` is not a packed format: `None`.
    pub fn quantize(w: &[f32], n: usize, k: usize, format: WeightFormat) -> Result<Option<Self>> {
        if w.len() != n * k {
            candle_core::bail!("quantize: {} values for a [{n}, {k}] weight", w.len());
        }
        let cpu = Device::Cpu;
        let g = groups(k);
        let data = match format {
            WeightFormat::F32 => return Ok(None),
            WeightFormat::F16 => Data::F16(Tensor::from_vec(
                w.iter().map(|&v| f16::from_f32(v)).collect::<Vec<_>>(),
                (n, k),
                &cpu,
            )?),
            WeightFormat::Bf16 => Data::Bf16(Tensor::from_vec(
                w.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>(),
                (n, k),
                &cpu,
            )?),
            WeightFormat::Int8 => {
                let (q, scales) = quantize_int8(w, n, k);
                Data::Int8 {
                    q: Tensor::from_vec(q, (n, k), &cpu)?,
                    scales: Tensor::from_vec(scales, (n, g), &cpu)?,
                }
            }
            WeightFormat::Int4 => {
                let (q, scales, mins) = quantize_int4(w, n, k);
                Data::Int4 {
                    q: Tensor::from_vec(q, (n, g * GROUP / 2), &cpu)?,
                    scales: Tensor::from_vec(scales, (n, g), &cpu)?,
                    mins: Tensor::from_vec(mins, (n, g), &cpu)?,
                }
            }
        };
        Ok(Some(Self { n, k, data }))
    }

    /// The main payload tensor (f16 / bf16 weights, or the int8 / int4 codes as u8).
    pub fn payload(&self) -> &Tensor {
        match &self.data {
            Data::F16(t) | Data::Bf16(t) => t,
            Data::Int8 { q, .. } | Data::Int4 { q, .. } => q,
        }
    }

    /// Runs `f` on slices of the payload (read-locking the storage meanwhile).
    pub fn with_view<T>(&self, f: impl FnOnce(PackedView<'_>) -> T) -> Result<T> {
        let (n, k) = (self.n, self.k);
        let view = |data| PackedView { n, k, data };
        match &self.data {
            Data::F16(t) => {
                let (g, l) = t.storage_and_layout();
                Ok(f(view(ViewData::F16(cpu_slice(&g, l)?))))
            }
            Data::Bf16(t) => {
                let (g, l) = t.storage_and_layout();
                Ok(f(view(ViewData::Bf16(cpu_slice(&g, l)?))))
            }
            Data::Int8 { q, scales } => {
                let (qg, ql) = q.storage_and_layout();
                let (sg, sl) = scales.storage_and_layout();
                Ok(f(view(ViewData::Int8 {
                    q: cpu_slice(&qg, ql)?,
                    scales: cpu_slice(&sg, sl)?,
                })))
            }
            Data::Int4 { q, scales, mins } => {
                let (qg, ql) = q.storage_and_layout();
                let (sg, sl) = scales.storage_and_layout();
                let (mg, ml) = mins.storage_and_layout();
                Ok(f(view(ViewData::Int4 {
                    q: cpu_slice(&qg, ql)?,
                    scales: cpu_slice(&sg, sl)?,
                    mins: cpu_slice(&mg, ml)?,
                })))
            }
        }
    }

    pub fn n(&self) -> usize {
        self.n
    }

    pub fn k(&self) -> usize {
        self.k
    }

    pub fn format(&self) -> WeightFormat {
        match self.data {
            Data::F16(_) => WeightFormat::F16,
            Data::Bf16(_) => WeightFormat::Bf16,
            Data::Int8 { .. } => WeightFormat::Int8,
            Data::Int4 { .. } => WeightFormat::Int4,
        }
    }

    /// The whole matrix back in f32 `[n, k]`.
    pub fn dequantize(&self) -> Result<Vec<f32>> {
        self.with_view(|v| v.dequantize())
    }
}

/// The codes and per-group parameters of an int8 / int4 view, for the fused kernels of
/// [`super::gemv`] that dequantize in registers.
#[derive(Debug, Clone, Copy)]
pub(crate) enum QuantParts<'a> {
    /// `[n, k]` codes (i8 bits), `[n, groups]` scales.
    Int8 { q: &'a [u8], scales: &'a [f32] },
    /// `[n, groups * GROUP / 2]` nibble pairs, `[n, groups]` scales and minima.
    Int4 {
        q: &'a [u8],
        scales: &'a [f32],
        mins: &'a [f32],
    },
}

impl<'a> PackedView<'a> {
    /// The int8 / int4 payload as slices; `None` for f16 / bf16.
    pub(crate) fn quant_parts(&self) -> Option<QuantParts<'a>> {
        match self.data {
            ViewData::Int8 { q, scales } => Some(QuantParts::Int8 { q, scales }),
            ViewData::Int4 { q, scales, mins } => Some(QuantParts::Int4 { q, scales, mins }),
            ViewData::F16(_) | ViewData::Bf16(_) => None,
        }
    }
}

impl PackedView<'_> {
    pub fn n(&self) -> usize {
        self.n
    }

    pub fn k(&self) -> usize {
        self.k
    }

    /// The whole matrix back in f32 `[n, k]`.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.n * self.k];
        for (j, row) in out.chunks_mut(self.k.max(1)).enumerate().take(self.n) {
            self.dequantize_row(j, 0, self.k, row);
        }
        out
    }

    /// Rows `j..j + rows`, columns `k0..k0 + kl` into `out` (row stride `stride`). `k0` is a
    /// multiple of [`GROUP`].
    pub fn dequantize_tile(
        &self,
        j: usize,
        rows: usize,
        k0: usize,
        kl: usize,
        out: &mut [f32],
        stride: usize,
    ) {
        debug_assert_eq!(k0 % GROUP, 0);
        // The crate is compiled for baseline x86-64 (SSE2); the same loops compiled with the
        // wider ISA vectorize 16 (8) lanes at a time instead of 4.
        #[cfg(target_arch = "x86_64")]
        {
            if super::gemv::has_avx512() {
                // SAFETY: AVX-512F/BW/VL were detected at run time.
                unsafe { self.dequantize_tile_avx512(j, rows, k0, kl, out, stride) };
                return;
            }
            if super::gemv::has_avx2() {
                // SAFETY: AVX2 and FMA were detected at run time.
                unsafe { self.dequantize_tile_avx2(j, rows, k0, kl, out, stride) };
                return;
            }
        }
        self.dequantize_tile_generic(j, rows, k0, kl, out, stride)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    unsafe fn dequantize_tile_avx512(
        &self,
        j: usize,
        rows: usize,
        k0: usize,
        kl: usize,
        out: &mut [f32],
        stride: usize,
    ) {
        self.dequantize_tile_generic(j, rows, k0, kl, out, stride)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dequantize_tile_avx2(
        &self,
        j: usize,
        rows: usize,
        k0: usize,
        kl: usize,
        out: &mut [f32],
        stride: usize,
    ) {
        self.dequantize_tile_generic(j, rows, k0, kl, out, stride)
    }

    #[inline(always)]
    fn dequantize_tile_generic(
        &self,
        j: usize,
        rows: usize,
        k0: usize,
        kl: usize,
        out: &mut [f32],
        stride: usize,
    ) {
        for r in 0..rows {
            self.dequantize_row(j + r, k0, kl, &mut out[r * stride..r * stride + kl]);
        }
    }

    #[inline(always)]
    fn dequantize_row(&self, j: usize, k0: usize, kl: usize, out: &mut [f32]) {
        let k = self.k;
        let base = j * k + k0;
        match self.data {
            ViewData::F16(v) => f16_to_f32(&v[base..base + kl], &mut out[..kl]),
            ViewData::Bf16(v) => {
                for (o, &w) in out[..kl].iter_mut().zip(&v[base..base + kl]) {
                    *o = f32::from_bits((w.to_bits() as u32) << 16);
                }
            }
            ViewData::Int8 { q, scales } => {
                let g = groups(k);
                let q = &q[base..base + kl];
                for ((oc, qc), &s) in out[..kl]
                    .chunks_mut(GROUP)
                    .zip(q.chunks(GROUP))
                    .zip(&scales[j * g + k0 / GROUP..])
                {
                    for (o, &v) in oc.iter_mut().zip(qc) {
                        *o = v as i8 as f32 * s;
                    }
                }
            }
            ViewData::Int4 { q, scales, mins } => {
                let g = groups(k);
                let g0 = k0 / GROUP;
                for (c, oc) in out[..kl].chunks_mut(GROUP).enumerate() {
                    let gi = j * g + g0 + c;
                    let (s, m) = (scales[gi], mins[gi]);
                    let bytes = &q[gi * GROUP / 2..(gi + 1) * GROUP / 2];
                    if oc.len() == GROUP {
                        let (lo, hi) = oc.split_at_mut(GROUP / 2);
                        for ((l, h), &b) in lo.iter_mut().zip(hi.iter_mut()).zip(bytes) {
                            *l = (b & 15) as f32 * s + m;
                            *h = (b >> 4) as f32 * s + m;
                        }
                    } else {
                        for (t, o) in oc.iter_mut().enumerate() {
                            let b = bytes[t % (GROUP / 2)];
                            let code = if t < GROUP / 2 { b & 15 } else { b >> 4 };
                            *o = code as f32 * s + m;
                        }
                    }
                }
            }
        }
    }
}

/// f16 -> f32 with F16C where the CPU has it (half's scalar path is a bit-twiddling loop that
/// does not vectorize).
/// Symmetric int8 per group: codes (as u8 bits) and scales.
fn quantize_int8(w: &[f32], n: usize, k: usize) -> (Vec<u8>, Vec<f32>) {
    let g = groups(k);
    let mut q = vec![0u8; n * k];
    let mut scales = vec![0f32; n * g];
    for j in 0..n {
        for gi in 0..g {
            let range = j * k + gi * GROUP..j * k + ((gi + 1) * GROUP).min(k);
            let amax = w[range.clone()].iter().fold(0f32, |a, v| a.max(v.abs()));
            let scale = amax / 127.0;
            let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            scales[j * g + gi] = scale;
            for (qv, &v) in q[range.clone()].iter_mut().zip(&w[range]) {
                *qv = (v * inv).round().clamp(-127.0, 127.0) as i8 as u8;
            }
        }
    }
    (q, scales)
}

/// Asymmetric int4 per group: nibble pairs, scales and minima.
fn quantize_int4(w: &[f32], n: usize, k: usize) -> (Vec<u8>, Vec<f32>, Vec<f32>) {
    let g = groups(k);
    let mut q = vec![0u8; n * g * GROUP / 2];
    let mut scales = vec![0f32; n * g];
    let mut mins = vec![0f32; n * g];
    for j in 0..n {
        for gi in 0..g {
            let start = j * k + gi * GROUP;
            let len = GROUP.min(k - gi * GROUP);
            let vals = &w[start..start + len];
            let lo = vals.iter().fold(f32::INFINITY, |a, &v| a.min(v));
            let hi = vals.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
            let scale = (hi - lo) / 15.0;
            let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            scales[j * g + gi] = scale;
            mins[j * g + gi] = lo;
            let bytes = &mut q[(j * g + gi) * GROUP / 2..(j * g + gi + 1) * GROUP / 2];
            for (t, &v) in vals.iter().enumerate() {
                let code = ((v - lo) * inv).round().clamp(0.0, 15.0) as u8;
                if t < GROUP / 2 {
                    bytes[t] |= code;
                } else {
                    bytes[t - GROUP / 2] |= code << 4;
                }
            }
        }
    }
    (q, scales, mins)
}

#[inline(always)]
fn f16_to_f32(src: &[f16], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if super::gemv::has_f16c() {
            // SAFETY: F16C (and AVX) were detected at run time; the slices have equal lengths.
            unsafe { f16_to_f32_f16c(src, dst) };
            return;
        }
    }
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s.to_f32();
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
unsafe fn f16_to_f32_f16c(src: &[f16], dst: &mut [f32]) {
    use std::arch::x86_64::{__m128i, _mm256_cvtph_ps, _mm256_storeu_ps, _mm_loadu_si128};
    let n = src.len().min(dst.len());
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: `i + 8 <= n` elements of both slices; unaligned loads and stores.
        unsafe {
            let h = _mm_loadu_si128(src.as_ptr().add(i) as *const __m128i);
            _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
        }
        i += 8;
    }
    for t in i..n {
        dst[t] = src[t].to_f32();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weights(n: usize, k: usize) -> Vec<f32> {
        (0..n * k)
            .map(|i| ((i * 7919 % 1000) as f32 / 1000.0 - 0.5) * 0.2)
            .collect()
    }

    #[test]
    fn round_trip_error_is_bounded_per_format() {
        let (n, k) = (5, 77);
        let w = weights(n, k);
        for (format, tol) in [
            (WeightFormat::F16, 1e-3),
            (WeightFormat::Bf16, 1e-3),
            (WeightFormat::Int8, 1e-3),
            (WeightFormat::Int4, 7e-3),
        ] {
            let p = PackedMatrix::quantize(&w, n, k, format).unwrap().unwrap();
            let back = p.dequantize().unwrap();
            let err = w
                .iter()
                .zip(&back)
                .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
            assert!(err <= tol, "{format}: max error {err}");
        }
        assert!(PackedMatrix::quantize(&w, n, k, WeightFormat::F32)
            .unwrap()
            .is_none());
    }

    #[test]
    fn constant_groups_are_exact() {
        let w = vec![0.25f32; 3 * 40];
        for format in [WeightFormat::Int8, WeightFormat::Int4] {
            let p = PackedMatrix::quantize(&w, 3, 40, format).unwrap().unwrap();
            assert!(p
                .dequantize()
                .unwrap()
                .iter()
                .all(|&v| (v - 0.25).abs() < 1e-6));
        }
        let z = vec![0f32; 2 * 33];
        let p = PackedMatrix::quantize(&z, 2, 33, WeightFormat::Int8)
            .unwrap()
            .unwrap();
        assert!(p.dequantize().unwrap().iter().all(|&v| v == 0.0));
    }
}
