//! Packed f32 GEMM for the encoder side: `C[m, n] = epilogue(A[m, k] · Bᵀ)` where `B` is an
//! `nn.Linear` weight `[n, k]` packed once at load time (or a small operand packed per call, as
//! in attention).
//!
//! Why not candle's matmul: the gemm crate reaches ~106 GFLOP/s on 2 threads on the target
//! machine, about 40% of what the FMA units give; the ViT + Q-Former encode is almost all
//! GEMM, so this module carries a BLIS-style kernel tuned for it:
//! - `B` lives in panels of [`NR`] = 32 columns, k-major, 64-byte aligned, so one k step of
//!   the microkernel reads two aligned `zmm` loads;
//! - `A` is packed per [`KC`] slice into tiles of up to [`MR`] rows (the k-slice of all rows
//!   stays in L2 while each B micro-panel, `KC x 32` floats, stays in L1);
//! - the register tile is `MR x 32` (24 accumulators + 2 B vectors + broadcasts folded into
//!   the FMAs), with row-remainder tiles compiled per size so no work is wasted on padding;
//! - the epilogue (scale, bias, exact GELU, residual add) is applied in registers on the last
//!   k slice, saving a full pass over `C` each;
//! - threads split the column panels; they run on the kernels' persistent pool (see
//!   [`par_for`]) because a GEMM of the Q-Former takes ~100 µs and thread creation would show.
//!
//! AVX-512 is detected at run time; otherwise a portable kernel (compiled once with AVX2+FMA
//! enabled, once without) computes the same tiles.

use std::cell::RefCell;

use super::SharedMut;
use std::sync::OnceLock;

/// Columns per packed panel (two AVX-512 vectors).
pub const NR: usize = 32;
/// Rows per register tile.
pub const MR: usize = 12;
/// Depth of one k slice: a `KC x NR` B micro-panel is 32 KiB, inside a 48 KiB L1.
pub const KC: usize = 256;

/// A 64-byte aligned `f32` buffer (aligned loads never split cache lines).
pub struct AlignedBuf {
    raw: Vec<f32>,
    off: usize,
    len: usize,
}

impl AlignedBuf {
    pub fn zeros(len: usize) -> Self {
        let raw = vec![0f32; len + 16];
        let misalign = (raw.as_ptr() as usize % 64) / 4;
        let off = (16 - misalign) % 16;
        Self { raw, off, len }
    }

    /// Makes room for `len` floats; contents are unspecified afterwards.
    pub fn ensure(&mut self, len: usize) {
        if self.len < len {
            *self = Self::zeros(len);
        }
    }

    pub fn as_slice(&self) -> &[f32] {
        &self.raw[self.off..self.off + self.len]
    }

    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        &mut self.raw[self.off..self.off + self.len]
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({})", self.len)
    }
}

/// `B` `[n, k]` (the operand used transposed) packed in `ceil(n / NR)` panels; panel `p` holds
/// columns `p*NR..` as `k` rows of `NR` floats (zero padded past `n`).
#[derive(Debug)]
pub struct PackedB {
    n: usize,
    k: usize,
    buf: AlignedBuf,
}

impl PackedB {
    /// From an `nn.Linear` weight `w[j * ldw + kk]` (`[n, k]`, row stride `ldw`).
    pub fn from_nk(w: &[f32], n: usize, k: usize, ldw: usize) -> Self {
        let mut buf = AlignedBuf::zeros(0);
        pack_b_nk(&mut buf, w, n, k, ldw);
        Self { n, k, buf }
    }

    pub fn n(&self) -> usize {
        self.n
    }

    pub fn k(&self) -> usize {
        self.k
    }

    fn data(&self) -> &[f32] {
        self.buf.as_slice()
    }
}

fn panels(n: usize) -> usize {
    n.div_ceil(NR)
}

/// Packs `w[j * ldw + kk]` (`[n, k]`) into `dst` in the [`PackedB`] layout.
pub fn pack_b_nk(dst: &mut AlignedBuf, w: &[f32], n: usize, k: usize, ldw: usize) {
    let np = panels(n);
    dst.ensure(np * k * NR);
    let out = dst.as_mut_slice();
    for p in 0..np {
        let panel = &mut out[p * k * NR..(p + 1) * k * NR];
        let cols = NR.min(n - p * NR);
        if cols < NR {
            panel.fill(0.0);
        }
        for j in 0..cols {
            let row = &w[(p * NR + j) * ldw..(p * NR + j) * ldw + k];
            for (kk, &v) in row.iter().enumerate() {
                panel[kk * NR + j] = v;
            }
        }
    }
}

/// Packs `b[kk * ldb + j]` (`[k, n]`, used as is) into `dst` in the [`PackedB`] layout.
pub fn pack_b_kn(dst: &mut AlignedBuf, b: &[f32], k: usize, n: usize, ldb: usize) {
    let np = panels(n);
    dst.ensure(np * k * NR);
    let out = dst.as_mut_slice();
    for p in 0..np {
        let cols = NR.min(n - p * NR);
        for kk in 0..k {
            let d = &mut out[(p * k + kk) * NR..(p * k + kk + 1) * NR];
            let s = &b[kk * ldb + p * NR..kk * ldb + p * NR + cols];
            d[..cols].copy_from_slice(s);
            d[cols..].fill(0.0);
        }
    }
}

/// What happens to each output element after the dot product, in this order:
/// `v = acc * scale + bias[j]`, then `v = gelu_erf(v)` when `gelu`, then `v += residual[i, j]`.
#[derive(Clone, Copy, Default)]
pub struct Epilogue<'a> {
    pub scale: Option<f32>,
    pub bias: Option<&'a [f32]>,
    pub gelu: bool,
    /// `(residual, row stride)`, same shape as `C`.
    pub residual: Option<(&'a [f32], usize)>,
}

/// The epilogue as raw pointers, offset per tile.
#[derive(Clone, Copy)]
struct EpiRaw {
    scale: f32,
    has_scale: bool,
    bias: *const f32,
    gelu: bool,
    residual: *const f32,
    ldr: usize,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Isa {
    Avx512,
    Avx2,
    Generic,
}

fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx512f") {
                return Isa::Avx512;
            }
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                return Isa::Avx2;
            }
        }
        Isa::Generic
    })
}

// ---------------------------------------------------------------------------------------------
// Scalar math shared by the portable paths (same formulas as the vector ones).

/// erf for f32 by the rational approximation Eigen and XLA use (|error| ~ 1e-7 on [-4, 4],
/// saturated outside): exact-GELU needs erf, and a libm call per element is ~10x the cost of
/// this polynomial.
#[inline(always)]
fn erf_scalar(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = x2 * -2.726_142_3e-10 + 2.770_681_4e-8;
    p = x2 * p + -2.101_024e-6;
    p = x2 * p + -5.692_506_5e-5;
    p = x2 * p + -7.349_906_3e-4;
    p = x2 * p + -2.954_6e-3;
    p = x2 * p + -1.609_603_3e-2;
    p *= x;
    let mut q = x2 * -1.456_607_2e-5 + -2.133_740_6e-4;
    q = x2 * q + -1.682_827e-3;
    q = x2 * q + -7.373_329e-3;
    q = x2 * q + -1.426_474e-2;
    p / q
}

/// `x * (1 + erf(x / sqrt 2)) / 2` (transformers' "gelu").
#[inline(always)]
pub fn gelu_erf_scalar(x: f32) -> f32 {
    0.5 * x * (1.0 + erf_scalar(x * std::f32::consts::FRAC_1_SQRT_2))
}

#[inline(always)]
unsafe fn epilogue_scalar(v: f32, e: &EpiRaw, i: usize, j: usize) -> f32 {
    let mut v = if e.has_scale { v * e.scale } else { v };
    if !e.bias.is_null() {
        // SAFETY: the caller offset `bias` to the tile's first column and `j < nv`.
        v += unsafe { *e.bias.add(j) };
    }
    if e.gelu {
        v = gelu_erf_scalar(v);
    }
    if !e.residual.is_null() {
        // SAFETY: the residual has C's shape; the caller offset it to the tile's origin.
        v += unsafe { *e.residual.add(i * e.ldr + j) };
    }
    v
}

// ---------------------------------------------------------------------------------------------
// Portable microkernel.

/// One `M x NR` tile over a k slice. `a`: packed `[kc][M]`; `b`: packed `[kc][NR]`.
///
/// # Safety
/// `a`, `b` readable for `kc * M` / `kc * NR` floats; `c` writable for `M` rows of `nv`
/// columns at stride `ldc`; the epilogue pointers valid for the tile.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel_generic<const M: usize, const FMA: bool>(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    nv: usize,
    first: bool,
    last: bool,
    e: &EpiRaw,
) {
    // SAFETY: bounds as documented above.
    unsafe {
        let mut acc = [[0f32; NR]; M];
        if !first {
            for (i, row) in acc.iter_mut().enumerate() {
                for (j, v) in row.iter_mut().enumerate().take(nv) {
                    *v = *c.add(i * ldc + j);
                }
            }
        }
        for kk in 0..kc {
            let bk = std::slice::from_raw_parts(b.add(kk * NR), NR);
            for (i, row) in acc.iter_mut().enumerate() {
                let av = *a.add(kk * M + i);
                for j in 0..NR {
                    row[j] = if FMA {
                        av.mul_add(bk[j], row[j])
                    } else {
                        row[j] + av * bk[j]
                    };
                }
            }
        }
        for (i, row) in acc.iter().enumerate() {
            for (j, &v) in row.iter().enumerate().take(nv) {
                *c.add(i * ldc + j) = if last { epilogue_scalar(v, e, i, j) } else { v };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel_avx2<const M: usize>(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    nv: usize,
    first: bool,
    last: bool,
    e: &EpiRaw,
) {
    // SAFETY: forwarded contract of `kernel_generic`.
    unsafe { kernel_generic::<M, true>(kc, a, b, c, ldc, nv, first, last, e) }
}

// ---------------------------------------------------------------------------------------------
// AVX-512 microkernel and vector math.

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{EpiRaw, NR};
    use std::arch::x86_64::*;

    /// erf, same rational approximation as [`super::erf_scalar`].
    #[inline(always)]
    pub(super) unsafe fn erf(x: __m512) -> __m512 {
        // SAFETY: only called from avx512f-enabled functions.
        unsafe {
            let x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-4.0)), _mm512_set1_ps(4.0));
            let x2 = _mm512_mul_ps(x, x);
            let mut p = _mm512_fmadd_ps(
                x2,
                _mm512_set1_ps(-2.726_142_3e-10),
                _mm512_set1_ps(2.770_681_4e-8),
            );
            p = _mm512_fmadd_ps(x2, p, _mm512_set1_ps(-2.101_024e-6));
            p = _mm512_fmadd_ps(x2, p, _mm512_set1_ps(-5.692_506_5e-5));
            p = _mm512_fmadd_ps(x2, p, _mm512_set1_ps(-7.349_906_3e-4));
            p = _mm512_fmadd_ps(x2, p, _mm512_set1_ps(-2.954_6e-3));
            p = _mm512_fmadd_ps(x2, p, _mm512_set1_ps(-1.609_603_3e-2));
            p = _mm512_mul_ps(x, p);
            let mut q = _mm512_fmadd_ps(
                x2,
                _mm512_set1_ps(-1.456_607_2e-5),
                _mm512_set1_ps(-2.133_740_6e-4),
            );
            q = _mm512_fmadd_ps(x2, q, _mm512_set1_ps(-1.682_827e-3));
            q = _mm512_fmadd_ps(x2, q, _mm512_set1_ps(-7.373_329e-3));
            q = _mm512_fmadd_ps(x2, q, _mm512_set1_ps(-1.426_474e-2));
            _mm512_div_ps(p, q)
        }
    }

    #[inline(always)]
    pub(super) unsafe fn gelu(x: __m512) -> __m512 {
        // SAFETY: only called from avx512f-enabled functions.
        unsafe {
            let e = erf(_mm512_mul_ps(
                x,
                _mm512_set1_ps(std::f32::consts::FRAC_1_SQRT_2),
            ));
            let half_x = _mm512_mul_ps(x, _mm512_set1_ps(0.5));
            _mm512_fmadd_ps(half_x, e, half_x)
        }
    }

    /// e^x (Cephes expf polynomial, ~1 ulp); 0 for x below -87.3, used for softmax where x <= 0.
    #[inline(always)]
    pub(super) unsafe fn exp(x: __m512) -> __m512 {
        // SAFETY: only called from avx512f-enabled functions.
        unsafe {
            let x = _mm512_min_ps(
                _mm512_max_ps(x, _mm512_set1_ps(-103.0)),
                _mm512_set1_ps(88.376),
            );
            let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
            );
            let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
            let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
            let mut p = _mm512_fmadd_ps(
                r,
                _mm512_set1_ps(1.987_569_1e-4),
                _mm512_set1_ps(1.398_199_9e-3),
            );
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.333_452e-3));
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.166_579_6e-2));
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.666_666_5e-1));
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5));
            let r2 = _mm512_mul_ps(r, r);
            p = _mm512_fmadd_ps(p, r2, _mm512_add_ps(r, _mm512_set1_ps(1.0)));
            _mm512_scalef_ps(p, n)
        }
    }

    #[inline(always)]
    unsafe fn apply(v: __m512, e: &EpiRaw, i: usize, j0: usize, mask: __mmask16) -> __m512 {
        // SAFETY: pointers offset to the tile by the caller; masked lanes are not read.
        unsafe {
            let mut v = if e.has_scale {
                _mm512_mul_ps(v, _mm512_set1_ps(e.scale))
            } else {
                v
            };
            if !e.bias.is_null() {
                v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, e.bias.add(j0)));
            }
            if e.gelu {
                v = gelu(v);
            }
            if !e.residual.is_null() {
                let r = _mm512_maskz_loadu_ps(mask, e.residual.add(i * e.ldr + j0));
                v = _mm512_add_ps(v, r);
            }
            v
        }
    }

    /// One `M x 32` tile over a k slice (see `super::kernel_generic` for the contract).
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn kernel<const M: usize>(
        kc: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        nv: usize,
        first: bool,
        last: bool,
        e: &EpiRaw,
    ) {
        // SAFETY: bounds as in `super::kernel_generic`; `b` is 64-byte aligned (packed panels).
        unsafe {
            let m0: __mmask16 = if nv >= 16 {
                0xffff
            } else {
                ((1u32 << nv) - 1) as u16
            };
            let m1: __mmask16 = if nv >= NR {
                0xffff
            } else if nv > 16 {
                ((1u32 << (nv - 16)) - 1) as u16
            } else {
                0
            };
            let mut acc0 = [_mm512_setzero_ps(); M];
            let mut acc1 = [_mm512_setzero_ps(); M];
            if !first {
                for i in 0..M {
                    acc0[i] = _mm512_maskz_loadu_ps(m0, c.add(i * ldc));
                    acc1[i] = _mm512_maskz_loadu_ps(m1, c.add(i * ldc + 16));
                }
            }
            let mut ap = a;
            let mut bp = b;
            for _ in 0..kc {
                let b0 = _mm512_load_ps(bp);
                let b1 = _mm512_load_ps(bp.add(16));
                for i in 0..M {
                    let av = _mm512_set1_ps(*ap.add(i));
                    acc0[i] = _mm512_fmadd_ps(av, b0, acc0[i]);
                    acc1[i] = _mm512_fmadd_ps(av, b1, acc1[i]);
                }
                ap = ap.add(M);
                bp = bp.add(NR);
            }
            for i in 0..M {
                let (v0, v1) = if last {
                    (apply(acc0[i], e, i, 0, m0), apply(acc1[i], e, i, 16, m1))
                } else {
                    (acc0[i], acc1[i])
                };
                _mm512_mask_storeu_ps(c.add(i * ldc), m0, v0);
                _mm512_mask_storeu_ps(c.add(i * ldc + 16), m1, v1);
            }
        }
    }

    /// In-place `softmax(row)` for each of `rows` rows of `cols` at stride `ld`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn softmax_rows(s: *mut f32, rows: usize, cols: usize, ld: usize) {
        // SAFETY: `s` valid for `rows` rows of `cols` at stride `ld`; tails are masked.
        unsafe {
            for r in 0..rows {
                let row = s.add(r * ld);
                let mut mx = _mm512_set1_ps(f32::NEG_INFINITY);
                let mut j = 0;
                while j < cols {
                    let m = tail_mask(cols - j);
                    let v = _mm512_mask_loadu_ps(_mm512_set1_ps(f32::NEG_INFINITY), m, row.add(j));
                    mx = _mm512_max_ps(mx, v);
                    j += 16;
                }
                let mx = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
                let mut sum = _mm512_setzero_ps();
                j = 0;
                while j < cols {
                    let m = tail_mask(cols - j);
                    let v = _mm512_maskz_loadu_ps(m, row.add(j));
                    let p = exp(_mm512_sub_ps(v, mx));
                    sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(m, p));
                    _mm512_mask_storeu_ps(row.add(j), m, p);
                    j += 16;
                }
                let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(sum));
                j = 0;
                while j < cols {
                    let m = tail_mask(cols - j);
                    let v = _mm512_maskz_loadu_ps(m, row.add(j));
                    _mm512_mask_storeu_ps(row.add(j), m, _mm512_mul_ps(v, inv));
                    j += 16;
                }
            }
        }
    }

    #[inline(always)]
    fn tail_mask(left: usize) -> __mmask16 {
        if left >= 16 {
            0xffff
        } else {
            ((1u32 << left) - 1) as u16
        }
    }

    /// LayerNorm of each row (two-pass mean / variance as torch), `out` may not alias `x`.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn layer_norm_rows(
        x: *const f32,
        out: *mut f32,
        rows: usize,
        cols: usize,
        gamma: *const f32,
        beta: *const f32,
        eps: f32,
    ) {
        // SAFETY: `x`, `out` valid for `rows * cols`; gamma/beta for `cols`; tails masked.
        unsafe {
            for r in 0..rows {
                let xr = x.add(r * cols);
                let or = out.add(r * cols);
                let mut s = _mm512_setzero_ps();
                let mut j = 0;
                while j < cols {
                    s = _mm512_add_ps(s, _mm512_maskz_loadu_ps(tail_mask(cols - j), xr.add(j)));
                    j += 16;
                }
                let mean = _mm512_reduce_add_ps(s) / cols as f32;
                let mv = _mm512_set1_ps(mean);
                let mut s2 = _mm512_setzero_ps();
                j = 0;
                while j < cols {
                    let m = tail_mask(cols - j);
                    let d = _mm512_maskz_sub_ps(m, _mm512_maskz_loadu_ps(m, xr.add(j)), mv);
                    s2 = _mm512_fmadd_ps(d, d, s2);
                    j += 16;
                }
                let var = _mm512_reduce_add_ps(s2) / cols as f32;
                let rstd = _mm512_set1_ps(1.0 / (var + eps).sqrt());
                j = 0;
                while j < cols {
                    let m = tail_mask(cols - j);
                    let d = _mm512_sub_ps(_mm512_maskz_loadu_ps(m, xr.add(j)), mv);
                    let g = _mm512_maskz_loadu_ps(m, gamma.add(j));
                    let b = _mm512_maskz_loadu_ps(m, beta.add(j));
                    let y = _mm512_fmadd_ps(_mm512_mul_ps(d, rstd), g, b);
                    _mm512_mask_storeu_ps(or.add(j), m, y);
                    j += 16;
                }
            }
        }
    }
}

macro_rules! dispatch_rows {
    ($f:ident, $mr:expr, $($args:expr),*) => {
        match $mr {
            12 => $f::<12>($($args),*),
            11 => $f::<11>($($args),*),
            10 => $f::<10>($($args),*),
            9 => $f::<9>($($args),*),
            8 => $f::<8>($($args),*),
            7 => $f::<7>($($args),*),
            6 => $f::<6>($($args),*),
            5 => $f::<5>($($args),*),
            4 => $f::<4>($($args),*),
            3 => $f::<3>($($args),*),
            2 => $f::<2>($($args),*),
            _ => $f::<1>($($args),*),
        }
    };
}

/// Runs the microkernel for a tile of `mr <= MR` rows.
///
/// # Safety
/// As `kernel_generic`; additionally `isa` must be supported by the CPU (it comes from [`isa`]).
#[allow(clippy::too_many_arguments)]
unsafe fn run_kernel(
    isa: Isa,
    mr: usize,
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    nv: usize,
    first: bool,
    last: bool,
    e: &EpiRaw,
) {
    // SAFETY: forwarded contract; the ISA was detected at run time.
    unsafe {
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                use avx512::kernel;
                dispatch_rows!(kernel, mr, kc, a, b, c, ldc, nv, first, last, e)
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                dispatch_rows!(kernel_avx2, mr, kc, a, b, c, ldc, nv, first, last, e)
            }
            _ => {
                dispatch_rows!(generic_nofma, mr, kc, a, b, c, ldc, nv, first, last, e)
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
unsafe fn generic_nofma<const M: usize>(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    nv: usize,
    first: bool,
    last: bool,
    e: &EpiRaw,
) {
    // SAFETY: forwarded contract of `kernel_generic`.
    unsafe { kernel_generic::<M, false>(kc, a, b, c, ldc, nv, first, last, e) }
}

/// Packs rows `0..m`, columns `pc..pc + kc` of `a` (row stride `lda`) into MR-row tiles:
/// tile `t` at offset `t * MR * kc`, laid out `[kc][rows of the tile]`.
fn pack_a(dst: &mut AlignedBuf, a: &[f32], lda: usize, m: usize, pc: usize, kc: usize) {
    dst.ensure(m * kc);
    let out = dst.as_mut_slice();
    let mut i0 = 0;
    while i0 < m {
        let mr = MR.min(m - i0);
        pack_a_tile(&mut out[i0 * kc..(i0 + mr) * kc], a, lda, i0, mr, pc, kc);
        i0 += mr;
    }
}

/// One tile of [`pack_a`]: rows `i0..i0 + mr`, columns `pc..pc + kc`, into `tile`
/// (`[kc][mr]`).
fn pack_a_tile(
    tile: &mut [f32],
    a: &[f32],
    lda: usize,
    i0: usize,
    mr: usize,
    pc: usize,
    kc: usize,
) {
    for i in 0..mr {
        let row = &a[(i0 + i) * lda + pc..(i0 + i) * lda + pc + kc];
        for (kk, &v) in row.iter().enumerate() {
            tile[kk * mr + i] = v;
        }
    }
}

/// Where [`gemm_panels`] gets its packed `A`.
enum APanels<'a> {
    /// Packs each k slice itself into this buffer.
    Pack(&'a mut AlignedBuf),
    /// Already packed, every k slice (slice at `pc` starts at `m * pc`, laid out as
    /// [`pack_a`] lays out one slice); shared by the threads of one call.
    Packed(&'a [f32]),
}

/// Single-thread driver over panels `p0..p1` of `b`.
///
/// # Safety
/// `c` valid for `m` rows of `n` columns at stride `ldc`, with no other writer of the
/// columns of these panels; `epi` slices cover `C`'s shape (checked by the public callers).
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_panels(
    a: &[f32],
    lda: usize,
    m: usize,
    k: usize,
    b: BSource,
    n: usize,
    (p0, p1): (usize, usize),
    c: *mut f32,
    ldc: usize,
    epi: &Epilogue,
    mut apanels: APanels,
) {
    let isa = isa();
    let mut pc = 0;
    while pc < k || (k == 0 && pc == 0) {
        let kc = KC.min(k - pc);
        let a_slice: &[f32] = match &mut apanels {
            APanels::Pack(buf) => {
                pack_a(buf, a, lda, m, pc, kc);
                buf.as_slice()
            }
            APanels::Packed(all) => &all[m * pc..m * (pc + kc)],
        };
        let first = pc == 0;
        let last = pc + kc == k;
        for p in p0..p1 {
            let j0 = p * NR;
            let nv = NR.min(n - j0);
            let bp = match b {
                // SAFETY: panel p of a packed B with `k` rows starts at p * k * NR.
                BSource::Packed(b) => unsafe { b.as_ptr().add(p * k * NR + pc * NR) },
                BSource::Rows { w, ldw } => BPANEL.with(|buf| {
                    let mut buf = buf.borrow_mut();
                    buf.ensure(kc * NR);
                    let dst = buf.as_mut_slice();
                    pack_panel_rows(dst, w, ldw, j0, nv, pc, kc);
                    // The buffer lives in this thread's TLS for the thread's lifetime and is
                    // not touched again until the next panel.
                    dst.as_ptr()
                }),
            };
            let mut i0 = 0;
            while i0 < m {
                let mr = MR.min(m - i0);
                let e = EpiRaw {
                    scale: epi.scale.unwrap_or(1.0),
                    has_scale: epi.scale.is_some(),
                    bias: epi.bias.map_or(std::ptr::null(), |b| b[j0..].as_ptr()),
                    gelu: epi.gelu,
                    residual: epi
                        .residual
                        .map_or(std::ptr::null(), |(r, ld)| r[i0 * ld + j0..].as_ptr()),
                    ldr: epi.residual.map_or(0, |(_, ld)| ld),
                };
                // SAFETY: tile inside C (i0 + mr <= m, j0 + nv <= n); packed operands sized
                // by pack_a / the PackedB layout.
                unsafe {
                    run_kernel(
                        isa,
                        mr,
                        kc,
                        a_slice.as_ptr().add(i0 * kc),
                        bp,
                        c.add(i0 * ldc + j0),
                        ldc,
                        nv,
                        first,
                        last,
                        &e,
                    );
                }
                i0 += mr;
            }
        }
        if k == 0 {
            break;
        }
        pc += kc;
    }
}

/// Packs columns `j0..j0 + nv` (rows of the `[n, k]` weight `w`, stride `ldw`), depth
/// `pc..pc + kc`, into one `kc x NR` panel `dst` (zero past `nv`).
///
/// This runs for every panel of every call with an unpacked weight (an LLM prefill reads all
/// its weights this way), so full panels are transposed in 8 x 8 blocks in AVX registers: the
/// scalar loop's strided stores made packing cost more than the multiplications.
fn pack_panel_rows(
    dst: &mut [f32],
    w: &[f32],
    ldw: usize,
    j0: usize,
    nv: usize,
    pc: usize,
    kc: usize,
) {
    assert!(
        dst.len() >= kc * NR && nv <= NR,
        "gemm: panel buffer too short"
    );
    if nv > 0 {
        assert!(
            w.len() >= (j0 + nv - 1) * ldw + pc + kc,
            "gemm: weight too short"
        );
    }
    let mut done = 0; // k positions packed by the vector path
    #[cfg(target_arch = "x86_64")]
    if nv == NR && std::arch::is_x86_feature_detected!("avx") {
        done = kc - kc % 8;
        // SAFETY: AVX was detected; rows `j0..j0 + NR` hold `pc + done` values at stride `ldw`
        // (asserted above) and `dst` holds `kc * NR` values.
        unsafe { transpose_panel_avx(dst, w, ldw, j0, pc, done) };
    }
    if nv < NR {
        dst[..kc * NR].fill(0.0);
    }
    for j in 0..nv {
        let row = &w[(j0 + j) * ldw + pc + done..(j0 + j) * ldw + pc + kc];
        for (kk, &v) in row.iter().enumerate() {
            dst[(done + kk) * NR + j] = v;
        }
    }
}

/// `dst[kk * NR + j] = w[(j0 + j) * ldw + pc + kk]` for `j < NR`, `kk < kc` (`kc` a multiple
/// of 8), in 8 x 8 register transposes.
///
/// # Safety
/// AVX must be available; the slices must hold the positions named (see `pack_panel_rows`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn transpose_panel_avx(
    dst: &mut [f32],
    w: &[f32],
    ldw: usize,
    j0: usize,
    pc: usize,
    kc: usize,
) {
    use std::arch::x86_64::*;
    debug_assert!(kc.is_multiple_of(8) && dst.len() >= kc * NR);
    let src = w.as_ptr();
    let out = dst.as_mut_ptr();
    for jb in (0..NR).step_by(8) {
        for kb in (0..kc).step_by(8) {
            // SAFETY (all loads and stores below): row j0 + jb + r, columns pc + kb .. + 8, and
            // panel rows kb .. kb + 8, columns jb .. jb + 8, are inside the slices (see above).
            let row = |r: usize| unsafe { _mm256_loadu_ps(src.add((j0 + jb + r) * ldw + pc + kb)) };
            let (r0, r1, r2, r3) = (row(0), row(1), row(2), row(3));
            let (r4, r5, r6, r7) = (row(4), row(5), row(6), row(7));
            let t0 = _mm256_unpacklo_ps(r0, r1);
            let t1 = _mm256_unpackhi_ps(r0, r1);
            let t2 = _mm256_unpacklo_ps(r2, r3);
            let t3 = _mm256_unpackhi_ps(r2, r3);
            let t4 = _mm256_unpacklo_ps(r4, r5);
            let t5 = _mm256_unpackhi_ps(r4, r5);
            let t6 = _mm256_unpacklo_ps(r6, r7);
            let t7 = _mm256_unpackhi_ps(r6, r7);
            let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
            let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
            let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
            let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
            let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
            let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
            let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
            let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
            let cols = [
                _mm256_permute2f128_ps::<0x20>(u0, u4),
                _mm256_permute2f128_ps::<0x20>(u1, u5),
                _mm256_permute2f128_ps::<0x20>(u2, u6),
                _mm256_permute2f128_ps::<0x20>(u3, u7),
                _mm256_permute2f128_ps::<0x31>(u0, u4),
                _mm256_permute2f128_ps::<0x31>(u1, u5),
                _mm256_permute2f128_ps::<0x31>(u2, u6),
                _mm256_permute2f128_ps::<0x31>(u3, u7),
            ];
            for (i, c) in cols.into_iter().enumerate() {
                // SAFETY: see above.
                unsafe { _mm256_storeu_ps(out.add((kb + i) * NR + jb), c) };
            }
        }
    }
}

/// Where the microkernel's B panels come from.
#[derive(Clone, Copy)]
enum BSource<'a> {
    /// Pre-packed ([`PackedB`] layout).
    Packed(&'a [f32]),
    /// An unpacked `[n, k]` weight (row stride `ldw`): each `KC x NR` panel is packed into a
    /// per-thread L1 buffer just before use.
    Rows { w: &'a [f32], ldw: usize },
}

thread_local! {
    static APACK: RefCell<AlignedBuf> = RefCell::new(AlignedBuf::zeros(0));
    /// The whole packed `A` of a multi-threaded call, owned by the calling thread.
    static APACK_ALL: RefCell<AlignedBuf> = RefCell::new(AlignedBuf::zeros(0));
    static BPANEL: RefCell<AlignedBuf> = RefCell::new(AlignedBuf::zeros(0));
}

#[allow(clippy::too_many_arguments)]
fn check_shapes(
    a: &[f32],
    m: usize,
    k: usize,
    lda: usize,
    n: usize,
    epi: &Epilogue,
    c: &[f32],
    ldc: usize,
) {
    assert!(lda >= k && ldc >= n, "gemm: row strides smaller than rows");
    if m > 0 {
        assert!(a.len() >= (m - 1) * lda + k, "gemm: A too short");
        assert!(c.len() >= (m - 1) * ldc + n, "gemm: C too short");
        if let Some((r, ld)) = epi.residual {
            assert!(
                ld >= n && r.len() >= (m - 1) * ld + n,
                "gemm: residual too short"
            );
        }
    }
    if let Some(b) = epi.bias {
        assert!(b.len() >= n, "gemm: bias too short");
    }
}

/// `C = epi(A · Bᵀ)` with `A` `[m, k]` (row stride `lda`), packed `B` (`[n, k]`), `C` `[m, n]`
/// (row stride `ldc`), on up to `threads` threads (columns split between them).
///
/// Panics when a slice is shorter than its shape says (a caller bug, never data-dependent).
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    a: &[f32],
    m: usize,
    lda: usize,
    b: &PackedB,
    epi: Epilogue,
    c: &mut [f32],
    ldc: usize,
    threads: usize,
) {
    gemm_impl(
        a,
        m,
        b.k,
        lda,
        BSource::Packed(b.data()),
        b.n,
        epi,
        c,
        ldc,
        threads,
    );
}

/// `C = epi(A · Wᵀ)` with an unpacked `nn.Linear` weight `w` `[n, k]` (row stride `k`): for
/// projections that were not packed at load (the language model's, used with many rows only at
/// prefill). Each weight panel is packed on the fly, so this costs one extra pass over `W`
/// per call; pre-pack with [`PackedB`] where a weight is used with many rows often.
#[allow(clippy::too_many_arguments)]
pub fn gemm_wt(
    a: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    n: usize,
    epi: Epilogue,
    c: &mut [f32],
    threads: usize,
) {
    assert!(w.len() >= n * k, "gemm: weight too short");
    gemm_impl(
        a,
        m,
        k,
        k,
        BSource::Rows { w, ldw: k },
        n,
        epi,
        c,
        n,
        threads,
    );
}

#[allow(clippy::too_many_arguments)]
fn gemm_impl(
    a: &[f32],
    m: usize,
    k: usize,
    lda: usize,
    b: BSource,
    n: usize,
    epi: Epilogue,
    c: &mut [f32],
    ldc: usize,
    threads: usize,
) {
    check_shapes(a, m, k, lda, n, &epi, c, ldc);
    if m == 0 || n == 0 {
        return;
    }
    let np = panels(n);
    // Keep some work per thread.
    let work = m * n * k;
    let threads = threads.clamp(1, np).min((work / 200_000).max(1));
    let cp = SharedMut::new(c.as_mut_ptr());
    if threads <= 1 || k == 0 {
        APACK.with(|buf| {
            let mut buf = buf.borrow_mut();
            // SAFETY: the only writer; shapes checked above.
            unsafe {
                gemm_panels(
                    a,
                    lda,
                    m,
                    k,
                    b,
                    n,
                    (0, np),
                    cp.ptr(),
                    ldc,
                    &epi,
                    APanels::Pack(&mut buf),
                )
            };
        });
        return;
    }
    // Pack A once, the threads sharing the tiles (each packing all of A for its own panels
    // cost ~5% of an image encode), then let them claim chunks of panels as they go, so a thread
    // that starts late or is interrupted does not hold the other up at the end.
    // The calling thread's buffer, taken for this call (a fresh one if its TLS is gone).
    let mut all = APACK_ALL
        .try_with(|b| b.replace(AlignedBuf::zeros(0)))
        .unwrap_or_else(|_| AlignedBuf::zeros(0));
    all.ensure(m * k);
    {
        let dst = SharedMut::new(all.as_mut_slice().as_mut_ptr());
        let tiles = m.div_ceil(MR);
        let pack = |t: usize| {
            let (slice, tile) = (t / tiles, t % tiles);
            let pc = slice * KC;
            let kc = KC.min(k - pc);
            let i0 = tile * MR;
            let mr = MR.min(m - i0);
            // SAFETY: task t alone writes tile `tile` of slice `slice`, i.e.
            // `[m * pc + i0 * kc, m * pc + (i0 + mr) * kc)`, inside the `m * k` buffer.
            let out =
                unsafe { std::slice::from_raw_parts_mut(dst.ptr().add(m * pc + i0 * kc), mr * kc) };
            pack_a_tile(out, a, lda, i0, mr, pc, kc);
        };
        super::pool::par_chunks(k.div_ceil(KC) * tiles, threads, &pack);
    }
    let packed = all.as_slice();
    let per_chunk = (np / (threads * 4)).max(1);
    let run = |chunk: usize| {
        let p0 = chunk * per_chunk;
        let p1 = (p0 + per_chunk).min(np);
        // SAFETY: chunk `chunk` alone writes the columns of panels p0..p1; shapes checked above.
        unsafe {
            gemm_panels(
                a,
                lda,
                m,
                k,
                b,
                n,
                (p0, p1),
                cp.ptr(),
                ldc,
                &epi,
                APanels::Packed(packed),
            )
        };
    };
    super::pool::par_chunks(np.div_ceil(per_chunk), threads, &run);
    let _ = APACK_ALL.try_with(|b| b.replace(all));
}

/// Single-threaded `C = epi(A · Bᵀ)` with `B` packed in `bpack` by [`pack_b_nk`] /
/// [`pack_b_kn`] for `n` columns and depth `k` (for per-head attention products).
#[allow(clippy::too_many_arguments)]
pub fn gemm_prepacked_st(
    a: &[f32],
    m: usize,
    k: usize,
    lda: usize,
    bpack: &AlignedBuf,
    n: usize,
    epi: Epilogue,
    c: &mut [f32],
    ldc: usize,
    apack: &mut AlignedBuf,
) {
    check_shapes(a, m, k, lda, n, &epi, c, ldc);
    assert!(
        bpack.as_slice().len() >= panels(n) * k * NR,
        "gemm: packed B too short"
    );
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: single writer; shapes checked above.
    unsafe {
        gemm_panels(
            a,
            lda,
            m,
            k,
            BSource::Packed(bpack.as_slice()),
            n,
            (0, panels(n)),
            c.as_mut_ptr(),
            ldc,
            &epi,
            APanels::Pack(apack),
        )
    };
}

/// In-place softmax over each row (`rows` rows of `cols`, stride `ld`).
pub fn softmax_rows(s: &mut [f32], rows: usize, cols: usize, ld: usize) {
    if rows == 0 || cols == 0 {
        return;
    }
    assert!(
        s.len() >= (rows - 1) * ld + cols,
        "softmax: buffer too short"
    );
    #[cfg(target_arch = "x86_64")]
    if isa() == Isa::Avx512 {
        // SAFETY: bounds checked above; AVX-512 detected.
        unsafe { avx512::softmax_rows(s.as_mut_ptr(), rows, cols, ld) };
        return;
    }
    for r in 0..rows {
        let row = &mut s[r * ld..r * ld + cols];
        let mx = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0;
        for v in row.iter_mut() {
            *v = (*v - mx).exp();
            sum += *v;
        }
        let inv = 1.0 / sum;
        row.iter_mut().for_each(|v| *v *= inv);
    }
}

/// LayerNorm over the last dimension of `x` `[rows, cols]` into `out`.
pub fn layer_norm(x: &[f32], out: &mut [f32], cols: usize, gamma: &[f32], beta: &[f32], eps: f32) {
    assert!(x.len() == out.len() && gamma.len() == cols && beta.len() == cols && cols > 0);
    assert!(x.len().is_multiple_of(cols), "layer_norm: ragged rows");
    let rows = x.len() / cols;
    #[cfg(target_arch = "x86_64")]
    if isa() == Isa::Avx512 {
        // SAFETY: bounds checked above; AVX-512 detected.
        unsafe {
            avx512::layer_norm_rows(
                x.as_ptr(),
                out.as_mut_ptr(),
                rows,
                cols,
                gamma.as_ptr(),
                beta.as_ptr(),
                eps,
            )
        };
        return;
    }
    for (xr, or) in x.chunks_exact(cols).zip(out.chunks_exact_mut(cols)) {
        let mean = xr.iter().sum::<f32>() / cols as f32;
        let var = xr.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / cols as f32;
        let rstd = 1.0 / (var + eps).sqrt();
        for (j, (o, v)) in or.iter_mut().zip(xr).enumerate() {
            *o = (v - mean) * rstd * gamma[j] + beta[j];
        }
    }
}

/// Shapes of one multi-head attention call on row-major activations.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub batch: usize,
    /// Query rows per batch element.
    pub tq: usize,
    /// Key / value rows per batch element.
    pub tk: usize,
    pub heads: usize,
    pub head_dim: usize,
    /// Row strides of q, k, v and out.
    pub ldq: usize,
    pub ldk: usize,
    pub ldv: usize,
    pub ldo: usize,
}

thread_local! {
    static ATTN_BUFS: RefCell<[AlignedBuf; 3]> =
        RefCell::new([AlignedBuf::zeros(0), AlignedBuf::zeros(0), AlignedBuf::zeros(0)]);
}

/// Eager attention without a mask, head by head: `out_h = softmax(q_h k_hᵀ * scale) v_h`, with
/// head `h` at columns `h*head_dim..` of each row of `q`, `k`, `v` and `out` (so the fused qkv
/// projection output is read in place and the result lands in `[t, hidden]` order, no
/// transposes). Batch elements x heads are spread over `threads` threads.
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    s: AttnShape,
    scale: f32,
    threads: usize,
) {
    let width = s.heads * s.head_dim;
    let rows_q = s.batch * s.tq;
    let rows_k = s.batch * s.tk;
    if rows_q == 0 || width == 0 {
        return;
    }
    assert!(s.ldq >= width && s.ldk >= width && s.ldv >= width && s.ldo >= width);
    assert!(s.tk > 0, "attention over zero keys");
    assert!(
        q.len() >= (rows_q - 1) * s.ldq + width,
        "attention: q too short"
    );
    assert!(
        k.len() >= (rows_k - 1) * s.ldk + width,
        "attention: k too short"
    );
    assert!(
        v.len() >= (rows_k - 1) * s.ldv + width,
        "attention: v too short"
    );
    assert!(
        out.len() >= (rows_q - 1) * s.ldo + width,
        "attention: out too short"
    );
    let jobs = s.batch * s.heads;
    let op = SharedMut::new(out.as_mut_ptr());
    let out_len = out.len();
    let run = |t: usize| {
        ATTN_BUFS.with(|bufs| {
            let mut bufs = bufs.borrow_mut();
            let [kb, sb, ab] = &mut *bufs;
            let mut vb = AlignedBuf::zeros(0);
            std::mem::swap(&mut vb, kb);
            {
                let job = t;
                let (bi, h) = (job / s.heads, job % s.heads);
                let col = h * s.head_dim;
                let qo = bi * s.tq * s.ldq + col;
                let ko = bi * s.tk * s.ldk + col;
                let vo = bi * s.tk * s.ldv + col;
                // scores = q_h k_hᵀ * scale, [tq, tk]
                pack_b_nk(&mut vb, &k[ko..], s.tk, s.head_dim, s.ldk);
                sb.ensure(s.tq * s.tk);
                let epi = Epilogue {
                    scale: Some(scale),
                    ..Default::default()
                };
                let scores = &mut sb.as_mut_slice()[..s.tq * s.tk];
                // SAFETY: `scores` is this thread's own buffer of tq x tk.
                unsafe {
                    gemm_panels(
                        &q[qo..],
                        s.ldq,
                        s.tq,
                        s.head_dim,
                        BSource::Packed(vb.as_slice()),
                        s.tk,
                        (0, panels(s.tk)),
                        scores.as_mut_ptr(),
                        s.tk,
                        &epi,
                        APanels::Pack(ab),
                    )
                };
                softmax_rows(scores, s.tq, s.tk, s.tk);
                // out_h = probs v_h, [tq, head_dim]
                pack_b_kn(&mut vb, &v[vo..], s.tk, s.head_dim, s.ldv);
                let oo = bi * s.tq * s.ldo + col;
                debug_assert!(oo + (s.tq - 1) * s.ldo + s.head_dim <= out_len);
                // SAFETY: rows bi*tq.. and columns of head h of `out` (bounds asserted above)
                // belong to this job only.
                unsafe {
                    gemm_panels(
                        scores,
                        s.tk,
                        s.tq,
                        s.tk,
                        BSource::Packed(vb.as_slice()),
                        s.head_dim,
                        (0, panels(s.head_dim)),
                        op.ptr().add(oo),
                        s.ldo,
                        &Epilogue::default(),
                        APanels::Pack(ab),
                    )
                };
            }
            std::mem::swap(&mut vb, kb);
        });
    };
    // One chunk per (batch, head), claimed dynamically by the pool's threads.
    super::pool::par_chunks(jobs, threads.max(1), &run);
}

// ---------------------------------------------------------------------------------------------
// Threads.

/// Number of threads the encoder kernels use (candle's setting: RAYON_NUM_THREADS or the
/// available cores).
pub fn num_threads() -> usize {
    super::pool::num_threads()
}

/// Runs `f(0..tasks)` on the kernels' shared fork-join pool (one pool for the encode and decode
/// kernels, so the two never oversubscribe the cores).
pub fn par_for(tasks: usize, f: &(dyn Fn(usize) + Sync)) {
    super::pool::par_chunks(tasks, tasks, f)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand_vec(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..len)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn erf_ref(x: f64) -> f64 {
        // Series / continued fraction good to ~1e-15 over the range used.
        if x.abs() < 5.0 {
            let mut sum = x;
            let mut term = x;
            let x2 = x * x;
            for n in 1..200 {
                term *= -x2 / n as f64;
                sum += term / (2 * n + 1) as f64;
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        } else {
            // erfc asymptotic is tiny here; saturate.
            x.signum() * (1.0 - (-x * x).exp() / (x.abs() * std::f64::consts::PI.sqrt()))
        }
    }

    fn reference(a: &[f32], m: usize, k: usize, w: &[f32], n: usize, epi: &Epilogue) -> Vec<f32> {
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut acc = 0f64;
                for kk in 0..k {
                    acc += a[i * k + kk] as f64 * w[j * k + kk] as f64;
                }
                let mut v = acc * epi.scale.unwrap_or(1.0) as f64;
                if let Some(b) = epi.bias {
                    v += b[j] as f64;
                }
                if epi.gelu {
                    v = 0.5 * v * (1.0 + erf_ref(v / 2f64.sqrt()));
                }
                if let Some((r, ld)) = epi.residual {
                    v += r[i * ld + j] as f64;
                }
                c[i * n + j] = v as f32;
            }
        }
        c
    }

    fn check(m: usize, n: usize, k: usize, bias: bool, gelu: bool, residual: bool, threads: usize) {
        let a = rand_vec(m * k, 1 + m as u64);
        let w = rand_vec(n * k, 2 + n as u64);
        let bv = rand_vec(n, 3);
        let rv = rand_vec(m * n, 4);
        let epi = Epilogue {
            scale: if gelu { None } else { Some(0.37) },
            bias: bias.then_some(&bv[..]),
            gelu,
            residual: residual.then_some((&rv[..], n)),
        };
        let want = reference(&a, m, k, &w, n, &epi);
        let packed = PackedB::from_nk(&w, n, k, k);
        let mut c = vec![f32::NAN; m * n];
        gemm(&a, m, k, &packed, epi, &mut c, n, threads);
        let tol = 1e-5 * (k as f32).sqrt().max(1.0);
        for (idx, (g, w)) in c.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= tol,
                "m={m} n={n} k={k} bias={bias} gelu={gelu} at {idx}: {g} vs {w}"
            );
        }
    }

    #[test]
    fn gemm_matches_reference_on_odd_shapes() {
        for &(m, n, k) in &[
            (1, 1, 1),
            (1, 33, 7),
            (5, 31, 300),
            (13, 64, 513),
            (25, 70, 256),
            (37, 100, 1),
            (257, 96, 65),
            (12, 32, 257),
        ] {
            for &(bias, gelu, residual) in &[
                (false, false, false),
                (true, false, false),
                (true, true, false),
                (true, false, true),
            ] {
                for threads in [1, 2, 3] {
                    check(m, n, k, bias, gelu, residual, threads);
                }
            }
        }
    }

    #[test]
    fn panel_packing_transposes_every_shape() {
        // Full panels (the AVX transposes) with depths that are and are not multiples of 8, a
        // partial panel (scalar, zero padded), and a row stride wider than the depth.
        for &(nv, kc, ldw, pc) in &[(NR, 256, 300, 0), (NR, 44, 300, 256), (13, 37, 40, 3)] {
            let w = rand_vec((nv + 2) * ldw, 31);
            let mut dst = vec![f32::NAN; kc * NR];
            pack_panel_rows(&mut dst, &w, ldw, 2, nv, pc, kc);
            for kk in 0..kc {
                for j in 0..NR {
                    let want = if j < nv {
                        w[(2 + j) * ldw + pc + kk]
                    } else {
                        0.0
                    };
                    assert_eq!(dst[kk * NR + j], want, "nv {nv} kc {kc}: [{kk}, {j}]");
                }
            }
        }
    }

    #[test]
    fn unpacked_weight_matches_packed() {
        for &(m, n, k) in &[(17, 45, 300), (40, 96, 768), (3, 5, 7)] {
            let a = rand_vec(m * k, 21);
            let w = rand_vec(n * k, 22);
            let bias = rand_vec(n, 23);
            let epi = Epilogue {
                bias: Some(&bias),
                ..Default::default()
            };
            let want = reference(&a, m, k, &w, n, &epi);
            let mut c = vec![0f32; m * n];
            gemm_wt(&a, m, k, &w, n, epi, &mut c, 2);
            for (g, w) in c.iter().zip(&want) {
                assert!((g - w).abs() < 1e-4, "{m}x{n}x{k}: {g} vs {w}");
            }
        }
    }

    #[test]
    fn kn_packing_and_strides() {
        // C = A · B with B [k, n] row-major, A and C with padded strides.
        let (m, k, n) = (19, 45, 40);
        let (lda, ldc) = (50, 44);
        let a = rand_vec(m * lda, 7);
        let b = rand_vec(k * n, 8);
        let mut bp = AlignedBuf::zeros(0);
        pack_b_kn(&mut bp, &b, k, n, n);
        let mut ap = AlignedBuf::zeros(0);
        let mut c = vec![0f32; m * ldc];
        gemm_prepacked_st(
            &a,
            m,
            k,
            lda,
            &bp,
            n,
            Epilogue::default(),
            &mut c,
            ldc,
            &mut ap,
        );
        for i in 0..m {
            for j in 0..n {
                let want: f32 = (0..k).map(|kk| a[i * lda + kk] * b[kk * n + j]).sum();
                assert!((c[i * ldc + j] - want).abs() < 1e-4, "{i},{j}");
            }
        }
    }

    #[test]
    fn every_isa_kernel_agrees() {
        // The portable kernels must match the dispatched one (they serve machines without
        // AVX-512).
        let (m, n, k) = (12, 32, 40);
        let a = rand_vec(m * k, 9);
        let w = rand_vec(n * k, 10);
        let packed = PackedB::from_nk(&w, n, k, k);
        let mut apack = AlignedBuf::zeros(0);
        pack_a(&mut apack, &a, k, m, 0, k);
        let e = EpiRaw {
            scale: 1.0,
            has_scale: false,
            bias: std::ptr::null(),
            gelu: true,
            residual: std::ptr::null(),
            ldr: 0,
        };
        let mut isas = vec![Isa::Generic];
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                isas.push(Isa::Avx2);
            }
            if std::is_x86_feature_detected!("avx512f") {
                isas.push(Isa::Avx512);
            }
        }
        let outs: Vec<Vec<f32>> = isas
            .iter()
            .map(|&isa| {
                let mut c = vec![0f32; m * n];
                // SAFETY: full tile inside c; isa supported (detected above).
                unsafe {
                    run_kernel(
                        isa,
                        m,
                        k,
                        apack.as_slice().as_ptr(),
                        packed.data().as_ptr(),
                        c.as_mut_ptr(),
                        n,
                        n,
                        true,
                        true,
                        &e,
                    )
                };
                c
            })
            .collect();
        for o in &outs[1..] {
            for (x, y) in o.iter().zip(&outs[0]) {
                assert!((x - y).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn gelu_and_softmax_and_layer_norm() {
        for i in -1000..=1000 {
            let x = i as f32 * 0.01;
            let want = 0.5 * x as f64 * (1.0 + erf_ref(x as f64 / 2f64.sqrt()));
            assert!((gelu_erf_scalar(x) as f64 - want).abs() < 2e-6, "gelu({x})");
        }
        let (rows, cols) = (3, 37);
        let mut s = rand_vec(rows * cols, 11);
        s.iter_mut().for_each(|v| *v *= 20.0);
        let orig = s.clone();
        softmax_rows(&mut s, rows, cols, cols);
        for r in 0..rows {
            let row = &orig[r * cols..(r + 1) * cols];
            let mx = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let z: f64 = row.iter().map(|&v| (v as f64 - mx).exp()).sum();
            for j in 0..cols {
                let want = (row[j] as f64 - mx).exp() / z;
                assert!((s[r * cols + j] as f64 - want).abs() < 1e-6);
            }
        }
        let x = rand_vec(2 * 40, 12);
        let g = rand_vec(40, 13);
        let b = rand_vec(40, 14);
        let mut out = vec![0f32; 80];
        layer_norm(&x, &mut out, 40, &g, &b, 1e-6);
        for r in 0..2 {
            let row = &x[r * 40..(r + 1) * 40];
            let mean = row.iter().map(|&v| v as f64).sum::<f64>() / 40.0;
            let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / 40.0;
            for j in 0..40 {
                let want = (row[j] as f64 - mean) / (var + 1e-6).sqrt() * g[j] as f64 + b[j] as f64;
                assert!((out[r * 40 + j] as f64 - want).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn vector_gelu_matches_scalar() {
        #[cfg(target_arch = "x86_64")]
        if isa() == Isa::Avx512 {
            // Through the kernel epilogue with an identity B.
            check(3, 16, 1, false, true, false, 1);
        }
    }

    /// Throughput on the ViT shapes: `cargo test --release -p blip2-model --lib gemm_speed -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn gemm_speed() {
        for &(m, n, k) in &[
            (257, 2304, 768),
            (257, 768, 768),
            (257, 3072, 768),
            (257, 768, 3072),
            (32, 3072, 768),
            (32, 768, 3072),
        ] {
            let a = rand_vec(m * k, 1);
            let w = rand_vec(n * k, 2);
            let bias = rand_vec(n, 3);
            let packed = PackedB::from_nk(&w, n, k, k);
            let mut c = vec![0f32; m * n];
            for threads in [1, 2] {
                let epi = Epilogue {
                    bias: Some(&bias),
                    ..Default::default()
                };
                gemm(&a, m, k, &packed, epi, &mut c, n, threads);
                let reps = 20;
                let mut best = f64::MAX;
                for _ in 0..reps {
                    let t = std::time::Instant::now();
                    gemm(&a, m, k, &packed, epi, &mut c, n, threads);
                    best = best.min(t.elapsed().as_secs_f64());
                }
                println!(
                    "m={m} n={n} k={k} threads={threads}: {:.1} GFLOP/s (best {:.3} ms)",
                    2.0 * (m * n * k) as f64 / best / 1e9,
                    best * 1e3
                );
            }
        }
    }
}
