//! Skinny matmuls `y[m, n] = x[m, k] · Wᵀ + b` for decode (a few rows `m`, weight `[n, k]`).
//!
//! Why: with one row, candle's matmul (the gemm crate) is a GEMV that reads the weights at
//! ~8 GB/s on the target machine, while the memory moves ~21 GB/s; a decoded token reads every
//! weight once, so decode speed is that bandwidth. This kernel:
//! - streams each weight row block ([`R`] rows) once and applies it to all `m` activation rows
//!   from registers ([`MR`] rows x [`R`] weight rows of accumulators), k-slice by k-slice
//!   ([`KC`]) so that the block is re-read from L1 for the next group of activation rows;
//! - reads int8 / int4 weights ([`super::quant`]) with AVX-512 in fused kernels (`fused`):
//!   each group of codes is widened to f32 and scaled in registers right before its FMAs, and
//!   the next row block is prefetched (rows of a few hundred bytes are too short for the
//!   hardware prefetcher);
//! - reads the other packed weights (f16, bf16; int8 / int4 without AVX-512) by dequantizing a
//!   `R x KC` tile into an L1 buffer and running the f32 inner loop;
//! - splits the output columns over the cores on a spinning helper ([`super::pool`]), because
//!   one core alone cannot pull the full memory bandwidth.
//!
//! The inner loop is AVX-512 when the CPU has it (detected at run time), else AVX2+FMA, else
//! portable scalar code.

use std::sync::OnceLock;

use super::quant::{PackedView, GROUP};
use super::SharedMut;

/// Weight rows per tile.
pub const R: usize = 4;
/// Activation rows per register tile (`MR x R` accumulators).
pub const MR: usize = 4;
/// Depth of one k slice: a dequantized `R x KC` tile is 8 KiB, well inside L1.
pub const KC: usize = 512;
const _: () = assert!(KC.is_multiple_of(GROUP));

/// The weight operand.
#[derive(Debug, Clone, Copy)]
pub enum Weights<'a> {
    /// `[n, k]` row-major f32.
    F32(&'a [f32]),
    Packed(&'a PackedView<'a>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Isa {
    Avx512,
    Avx2Fma,
    Scalar,
}

fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Isa::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Isa::Avx2Fma;
            }
        }
        Isa::Scalar
    })
}

/// Whether the AVX-512 kernels run (AVX-512F, and BW/VL for the dequantization loops).
pub fn has_avx512() -> bool {
    static AVX512: OnceLock<bool> = OnceLock::new();
    *AVX512.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            isa() == Isa::Avx512
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vl")
                && std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Whether AVX2 and FMA are available.
pub fn has_avx2() -> bool {
    static AVX2: OnceLock<bool> = OnceLock::new();
    *AVX2.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Whether F16C conversions are available (for f16 weights).
pub fn has_f16c() -> bool {
    static F16C: OnceLock<bool> = OnceLock::new();
    *F16C.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("f16c")
                && std::arch::is_x86_feature_detected!("avx")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// `y = x · Wᵀ (+ bias)`: `x` `[m, k]`, `W` `[n, k]`, `y` `[m, n]`, all row-major.
///
/// Panics when a slice is shorter than its shape says (a caller bug, never data-dependent).
pub fn matmul_wt(
    x: &[f32],
    m: usize,
    k: usize,
    w: Weights<'_>,
    n: usize,
    bias: Option<&[f32]>,
    y: &mut [f32],
) {
    assert!(x.len() >= m * k, "gemv: x shorter than [m, k]");
    assert!(y.len() >= m * n, "gemv: y shorter than [m, n]");
    match w {
        Weights::F32(w) => assert!(w.len() >= n * k, "gemv: weight shorter than [n, k]"),
        Weights::Packed(p) => assert!(p.n() == n && p.k() == k, "gemv: packed weight shape"),
    }
    if let Some(b) = bias {
        assert!(b.len() >= n, "gemv: bias shorter than n");
    }
    if m == 0 || n == 0 {
        return;
    }
    // Chunks of weight rows claimed dynamically by the threads: ~64k weights each, so a
    // claim is cheap next to its work and a descheduled helper holds up little.
    let rows_per_chunk = (65_536 / k.max(1)).div_ceil(R).max(1) * R;
    let chunks = n.div_ceil(rows_per_chunk);
    let threads = pool_threads(n * k);
    let out = SharedMut::new(y.as_mut_ptr());
    let isa = isa();
    let run = |c: usize| {
        let j0 = c * rows_per_chunk;
        let j1 = (j0 + rows_per_chunk).min(n);
        rows_task(isa, x, m, k, w, n, bias, (j0, j1), out);
    };
    super::pool::par_chunks(chunks, threads, &run);
}

fn pool_threads(weights: usize) -> usize {
    super::pool::num_threads().min((weights / 65_536).max(1))
}

#[allow(clippy::too_many_arguments)]
fn rows_task(
    isa: Isa,
    x: &[f32],
    m: usize,
    k: usize,
    w: Weights<'_>,
    n: usize,
    bias: Option<&[f32]>,
    (j0, j1): (usize, usize),
    out: SharedMut,
) {
    #[cfg(target_arch = "x86_64")]
    if let Weights::Packed(p) = w {
        if isa == Isa::Avx512 && has_avx512() {
            if let Some(parts) = p.quant_parts() {
                // SAFETY: AVX-512F/BW/VL were detected; `matmul_wt` checked the output and
                // bias lengths and gives this thread columns `j0..j1` alone.
                unsafe { fused::rows(x, m, k, parts, n, bias, (j0, j1), out) };
                return;
            }
        }
    }
    let mut acc = vec![0f32; R * m];
    let mut buf = [0f32; R * KC];
    let mut j = j0;
    while j < j1 {
        let r = R.min(j1 - j);
        acc.fill(0.0);
        let mut k0 = 0;
        while k0 < k {
            let kl = KC.min(k - k0);
            let (wt, ws): (&[f32], usize) = match w {
                Weights::F32(w) => (&w[j * k + k0..(j + r - 1) * k + k0 + kl], k),
                Weights::Packed(p) => {
                    p.dequantize_tile(j, r, k0, kl, &mut buf, KC);
                    (&buf[..(r - 1) * KC + kl], KC)
                }
            };
            tile(isa, &x[k0..], k, m, wt, ws, r, kl, &mut acc);
            k0 += kl;
        }
        for i in 0..m {
            for rr in 0..r {
                let b = bias.map_or(0.0, |b| b[j + rr]);
                // SAFETY: `i < m`, `j + rr < n` and `y` holds `m * n` values (checked in
                // `matmul_wt`); this thread alone writes columns `j0..j1`.
                unsafe { *out.ptr().add(i * n + j + rr) = acc[rr * m + i] + b };
            }
        }
        j += r;
    }
}

/// `acc[rr * m + i] += Σ_{t < kl} x[i * xs + t] · w[rr * ws + t]` for `rr < r`, `i < m`.
#[allow(clippy::too_many_arguments)]
fn tile(
    isa: Isa,
    x: &[f32],
    xs: usize,
    m: usize,
    w: &[f32],
    ws: usize,
    r: usize,
    kl: usize,
    acc: &mut [f32],
) {
    debug_assert!((1..=R).contains(&r));
    debug_assert!(w.len() > (r - 1) * ws + kl - 1);
    debug_assert!(acc.len() >= r * m);
    let mut i = 0;
    while i < m {
        let mr = MR.min(m - i);
        debug_assert!(x.len() >= (i + mr - 1) * xs + kl);
        let xp = &x[i * xs..];
        let ap = &mut acc[i..];
        match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX-512F was detected; the slice bounds are asserted above.
            Isa::Avx512 => unsafe { avx512::tile(xp, xs, mr, w, ws, r, kl, ap, m) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX2 and FMA were detected; the slice bounds are asserted above.
            Isa::Avx2Fma => unsafe { avx2::tile(xp, xs, mr, w, ws, r, kl, ap, m) },
            _ => scalar_tile(xp, xs, mr, w, ws, r, kl, ap, m),
        }
        i += mr;
    }
}

#[allow(clippy::too_many_arguments)]
fn scalar_tile(
    x: &[f32],
    xs: usize,
    mr: usize,
    w: &[f32],
    ws: usize,
    r: usize,
    kl: usize,
    acc: &mut [f32],
    accs: usize,
) {
    for i in 0..mr {
        let xr = &x[i * xs..i * xs + kl];
        for rr in 0..r {
            let wr = &w[rr * ws..rr * ws + kl];
            // Eight partial sums, as a vector unit would keep.
            let mut s = [0f32; 8];
            let mut cx = xr.chunks_exact(8);
            let mut cw = wr.chunks_exact(8);
            for (a, b) in (&mut cx).zip(&mut cw) {
                for l in 0..8 {
                    s[l] += a[l] * b[l];
                }
            }
            let mut t: f32 = s.iter().sum();
            for (a, b) in cx.remainder().iter().zip(cw.remainder()) {
                t += a * b;
            }
            acc[rr * accs + i] += t;
        }
    }
}

/// Expands `$body` for every `(R, MR)` pair of tile sizes as const generics.
macro_rules! dispatch_tile {
    ($r:expr, $mr:expr, $f:ident, $($arg:expr),*) => {
        match ($r, $mr) {
            (4, 4) => $f::<4, 4>($($arg),*),
            (4, 3) => $f::<4, 3>($($arg),*),
            (4, 2) => $f::<4, 2>($($arg),*),
            (4, 1) => $f::<4, 1>($($arg),*),
            (3, 4) => $f::<3, 4>($($arg),*),
            (3, 3) => $f::<3, 3>($($arg),*),
            (3, 2) => $f::<3, 2>($($arg),*),
            (3, 1) => $f::<3, 1>($($arg),*),
            (2, 4) => $f::<2, 4>($($arg),*),
            (2, 3) => $f::<2, 3>($($arg),*),
            (2, 2) => $f::<2, 2>($($arg),*),
            (2, 1) => $f::<2, 1>($($arg),*),
            (1, 4) => $f::<1, 4>($($arg),*),
            (1, 3) => $f::<1, 3>($($arg),*),
            (1, 2) => $f::<1, 2>($($arg),*),
            _ => $f::<1, 1>($($arg),*),
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// See [`super::tile`]; `acc` row stride `accs`.
    ///
    /// # Safety
    /// AVX-512F must be available; `x` holds `mr` rows of `kl` at stride `xs`, `w` holds `r`
    /// rows of `kl` at stride `ws`, `acc` holds `(r - 1) * accs + mr` values.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn tile(
        x: &[f32],
        xs: usize,
        mr: usize,
        w: &[f32],
        ws: usize,
        r: usize,
        kl: usize,
        acc: &mut [f32],
        accs: usize,
    ) {
        let (xp, wp, ap) = (x.as_ptr(), w.as_ptr(), acc.as_mut_ptr());
        // SAFETY: forwarded from this function's contract.
        unsafe { dispatch_tile!(r, mr, kernel, xp, xs, wp, ws, kl, ap, accs) }
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn kernel<const RR: usize, const M: usize>(
        x: *const f32,
        xs: usize,
        w: *const f32,
        ws: usize,
        kl: usize,
        acc: *mut f32,
        accs: usize,
    ) {
        let mut a = [[_mm512_setzero_ps(); RR]; M];
        let mut t = 0;
        // SAFETY (whole body): every access is below `kl` in a row the contract of `tile`
        // covers; the tail uses masked loads that touch no memory past `kl`.
        unsafe {
            while t + 16 <= kl {
                let mut wv = [_mm512_setzero_ps(); RR];
                for (rr, v) in wv.iter_mut().enumerate() {
                    *v = _mm512_loadu_ps(w.add(rr * ws + t));
                }
                for (i, ai) in a.iter_mut().enumerate() {
                    let xv = _mm512_loadu_ps(x.add(i * xs + t));
                    for (acc, v) in ai.iter_mut().zip(&wv) {
                        *acc = _mm512_fmadd_ps(xv, *v, *acc);
                    }
                }
                t += 16;
            }
            if t < kl {
                let mask: __mmask16 = ((1u32 << (kl - t)) - 1) as __mmask16;
                let mut wv = [_mm512_setzero_ps(); RR];
                for (rr, v) in wv.iter_mut().enumerate() {
                    *v = _mm512_maskz_loadu_ps(mask, w.add(rr * ws + t));
                }
                for (i, ai) in a.iter_mut().enumerate() {
                    let xv = _mm512_maskz_loadu_ps(mask, x.add(i * xs + t));
                    for (acc, v) in ai.iter_mut().zip(&wv) {
                        *acc = _mm512_fmadd_ps(xv, *v, *acc);
                    }
                }
            }
            for (i, ai) in a.iter().enumerate() {
                for (rr, v) in ai.iter().enumerate() {
                    *acc.add(rr * accs + i) += _mm512_reduce_add_ps(*v);
                }
            }
        }
    }
}

/// int8 / int4 weights dequantized in registers and fused into the dot products (AVX-512):
/// each group of [`GROUP`] codes of [`R`] weight rows is widened to f32, scaled (and, for int4,
/// offset) in registers, then applied to up to [`MR`] activation rows at once. The weights are
/// read once per block of activation rows (from memory for the first, from L1 after), and no
/// f32 copy of them is ever written.
/// As [`dispatch_tile`] for 1-2 weight rows and 5-8 activation rows.
#[cfg(target_arch = "x86_64")]
macro_rules! dispatch_wide {
    ($r:expr, $mr:expr, $f:ident, $($arg:expr),*) => {
        match ($r, $mr) {
            (2, 8) => $f::<2, 8>($($arg),*),
            (2, 7) => $f::<2, 7>($($arg),*),
            (2, 6) => $f::<2, 6>($($arg),*),
            (2, 5) => $f::<2, 5>($($arg),*),
            (1, 8) => $f::<1, 8>($($arg),*),
            (1, 7) => $f::<1, 7>($($arg),*),
            (1, 6) => $f::<1, 6>($($arg),*),
            _ => $f::<1, 5>($($arg),*),
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod fused {
    use std::arch::x86_64::*;

    use super::{SharedMut, MR, R};
    use crate::kernels::quant::{QuantParts, GROUP};

    /// How many row blocks ahead the codes are prefetched.
    const PF: usize = 2;

    /// Rows `j0..j1` of `y = x · Wᵀ (+ bias)` for a quantized `W`; see [`super::rows_task`].
    ///
    /// # Safety
    /// AVX-512F/BW/VL must be available ([`super::has_avx512`]); `y` (behind `out`) holds
    /// `[m, n]` values, `bias` (if any) `n`, and no other thread writes columns `j0..j1`.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn rows(
        x: &[f32],
        m: usize,
        k: usize,
        parts: QuantParts<'_>,
        n: usize,
        bias: Option<&[f32]>,
        (j0, j1): (usize, usize),
        out: SharedMut,
    ) {
        let g = k.div_ceil(GROUP);
        assert!(
            x.len() >= m * k && j1 <= n,
            "fused gemv: x or row range out of bounds"
        );
        let (q, qs, scales, mins) = match parts {
            QuantParts::Int8 { q, scales } => (q, k, scales, None),
            QuantParts::Int4 { q, scales, mins } => (q, g * GROUP / 2, scales, Some(mins)),
        };
        assert!(
            q.len() >= n * qs && scales.len() >= n * g && mins.is_none_or(|v| v.len() >= n * g),
            "fused gemv: packed weight shorter than its shape"
        );
        let bp = bias.map_or(std::ptr::null(), |b| b.as_ptr());
        let mut j = j0;
        while j < j1 {
            let r = R.min(j1 - j);
            let mut i = 0;
            while i < m {
                // Up to 8 activation rows against 2 weight rows (16 accumulators) when there
                // are many: the dequantization is then shared by more FMAs than with 4 x 4.
                let mr = if m - i > MR {
                    (2 * MR).min(m - i)
                } else {
                    m - i
                };
                let (rstep, r) = if mr > MR { (2, r) } else { (r, r) };
                let mut rr0 = 0;
                while rr0 < r {
                    let rl = rstep.min(r - rr0);
                    let jj = j + rr0;
                    // SAFETY: AVX-512F/BW/VL were detected (caller); `i + mr <= m`,
                    // `jj + rl <= j1 <= n`, `rl <= 2` when `mr > MR`; the slices' lengths were
                    // asserted above, `bias` has `n` values (`matmul_wt`) and this thread alone
                    // writes columns `j0..j1`.
                    unsafe { tile(x, i, mr, k, q, qs, scales, mins, g, jj, rl, n, bp, out) };
                    rr0 += rl;
                }
                i += mr;
            }
            j += r;
        }
    }

    /// Output rows `i..i + mr`, columns `j..j + r` of `y = x · Wᵀ (+ bias)`.
    ///
    /// # Safety
    /// AVX-512F/BW/VL must be available; `i + mr <= m`, `j + r <= n`, `mr <= 2 * MR`,
    /// `r <= R` (`r <= 2` when `mr > MR`), the slices hold their `[m, k]` / `[n, ..]` shapes,
    /// `bp` is null or points at `n` biases, `out` at an `[m, n]` output whose rows
    /// `i..i + mr`, columns `j..j + r` no other thread touches.
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile(
        x: &[f32],
        i: usize,
        mr: usize,
        k: usize,
        q: &[u8],
        qs: usize,
        scales: &[f32],
        mins: Option<&[f32]>,
        g: usize,
        j: usize,
        r: usize,
        n: usize,
        bp: *const f32,
        out: SharedMut,
    ) {
        let a = Args {
            x: x[i * k..].as_ptr(),
            xs: k,
            q: q[j * qs..].as_ptr(),
            qs,
            s: scales[j * g..].as_ptr(),
            mn: mins.map_or(std::ptr::null(), |v| v[j * g..].as_ptr()),
            gs: g,
            k,
            // SAFETY: `i < m`, `j < n`: inside the `[m, n]` output (contract).
            y: unsafe { out.ptr().add(i * n + j) },
            ys: n,
            b: if bp.is_null() {
                bp
            } else {
                // SAFETY: `j < n` and the bias holds `n` values (contract).
                unsafe { bp.add(j) }
            },
        };
        // SAFETY: the contract above is what the kernels need.
        unsafe {
            match (mr > MR, a.mn.is_null()) {
                (false, true) => dispatch_tile!(r, mr, int8, a),
                (false, false) => dispatch_tile!(r, mr, int4, a),
                (true, true) => dispatch_wide!(r, mr, int8, a),
                (true, false) => dispatch_wide!(r, mr, int4, a),
            }
        }
    }

    /// Raw operands of one `RR x M` tile.
    #[derive(Clone, Copy)]
    struct Args {
        /// `M` activation rows of `k` at stride `xs`.
        x: *const f32,
        xs: usize,
        /// `RR` code rows at stride `qs` bytes.
        q: *const u8,
        qs: usize,
        /// `RR` rows of scales (and int4 minima) at stride `gs`.
        s: *const f32,
        mn: *const f32,
        gs: usize,
        k: usize,
        /// Output `y[i * ys + rr]`, bias `b[rr]` (null: none).
        y: *mut f32,
        ys: usize,
        b: *const f32,
    }

    /// # Safety
    /// See [`rows`]: AVX-512F/BW/VL, and `a` describes valid int8 operands.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn int8<const RR: usize, const M: usize>(a: Args) {
        // SAFETY: forwarded.
        unsafe { kernel::<RR, M, false>(a) }
    }

    /// # Safety
    /// See [`rows`]: AVX-512F/BW/VL, and `a` describes valid int4 operands.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn int4<const RR: usize, const M: usize>(a: Args) {
        // SAFETY: forwarded.
        unsafe { kernel::<RR, M, true>(a) }
    }

    /// Group `gi` (elements `t..t + 32` of a row, masked to `ma` / `mb` per half) of weight row
    /// `rr`, dequantized as two vectors of 16.
    ///
    /// # Safety
    /// AVX-512F/BW/VL; the group lies inside row `rr` of `a` (masked-off bytes are not read).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn weights<const INT4: bool>(
        a: &Args,
        rr: usize,
        gi: usize,
        ma: __mmask16,
        mb: __mmask16,
    ) -> (__m512, __m512) {
        // SAFETY: the caller's contract; int4 groups are stored whole (padded), int8 ones are
        // read under the masks.
        unsafe {
            let s = _mm512_set1_ps(*a.s.add(rr * a.gs + gi));
            if INT4 {
                let mn = _mm512_set1_ps(*a.mn.add(rr * a.gs + gi));
                let p = a.q.add(rr * a.qs + gi * GROUP / 2) as *const __m128i;
                let bytes = _mm_loadu_si128(p);
                let nib = _mm_set1_epi8(15);
                let lo = _mm_and_si128(bytes, nib);
                let hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), nib);
                let lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo));
                let hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi));
                (_mm512_fmadd_ps(lo, s, mn), _mm512_fmadd_ps(hi, s, mn))
            } else {
                let p = a.q.add(rr * a.qs + gi * GROUP) as *const i8;
                let lo = _mm_maskz_loadu_epi8(ma, p);
                // `wrapping_add`: in a partial last group this may point past the codes; `mb`
                // then masks every byte off.
                let hi = _mm_maskz_loadu_epi8(mb, p.wrapping_add(16));
                let lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(lo));
                let hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(hi));
                (_mm512_mul_ps(lo, s), _mm512_mul_ps(hi, s))
            }
        }
    }

    /// One group for all `RR x M` accumulators.
    ///
    /// # Safety
    /// As for [`weights`]; `x` rows hold the group's elements not masked off.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn group<const RR: usize, const M: usize, const INT4: bool>(
        a: &Args,
        gi: usize,
        ma: __mmask16,
        mb: __mmask16,
        acc: &mut [[__m512; RR]; M],
    ) {
        // SAFETY: the caller's contract; x is read under the masks.
        unsafe {
            // The rows of a block are contiguous and short (k bytes, k / 2 for int4), too short
            // for the hardware prefetcher to ramp up on each: fetch the next block's group now.
            // A prefetch never faults; `wrapping_add` as it may point past the codes.
            // One prefetch per 64 bytes of each row (a cache line).
            let bytes = if INT4 { GROUP / 2 } else { GROUP };
            if (gi * bytes).is_multiple_of(64) {
                for rr in 0..RR {
                    let p = a.q.wrapping_add((rr + PF * RR) * a.qs + gi * bytes);
                    _mm_prefetch::<_MM_HINT_T0>(p as *const i8);
                }
            }
            if !INT4 && M == 1 {
                // One activation row: sum the raw codes' products first and scale the group's
                // partial sum once (one multiply per group instead of one per 16 codes).
                let xp = a.x.add(gi * GROUP);
                let xa = _mm512_maskz_loadu_ps(ma, xp);
                let xb = _mm512_maskz_loadu_ps(mb, xp.wrapping_add(16));
                for (rr, c) in acc[0].iter_mut().enumerate() {
                    let s = _mm512_set1_ps(*a.s.add(rr * a.gs + gi));
                    let p = a.q.add(rr * a.qs + gi * GROUP) as *const i8;
                    let lo = _mm_maskz_loadu_epi8(ma, p);
                    let hi = _mm_maskz_loadu_epi8(mb, p.wrapping_add(16));
                    let lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(lo));
                    let hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(hi));
                    let g = _mm512_fmadd_ps(xb, hi, _mm512_mul_ps(xa, lo));
                    *c = _mm512_fmadd_ps(g, s, *c);
                }
                return;
            }
            let mut w = [(_mm512_setzero_ps(), _mm512_setzero_ps()); RR];
            for (rr, v) in w.iter_mut().enumerate() {
                *v = weights::<INT4>(a, rr, gi, ma, mb);
            }
            let t = gi * GROUP;
            for (i, ai) in acc.iter_mut().enumerate() {
                let xp = a.x.add(i * a.xs + t);
                let xa = _mm512_maskz_loadu_ps(ma, xp);
                let xb = _mm512_maskz_loadu_ps(mb, xp.wrapping_add(16));
                for (c, (wa, wb)) in ai.iter_mut().zip(&w) {
                    *c = _mm512_fmadd_ps(xa, *wa, *c);
                    *c = _mm512_fmadd_ps(xb, *wb, *c);
                }
            }
        }
    }

    /// `y[i][rr] = Σ_t x[i][t] · w[rr][t] (+ b[rr])` for `RR` weight rows and `M` activation rows.
    ///
    /// # Safety
    /// See [`rows`].
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn kernel<const RR: usize, const M: usize, const INT4: bool>(a: Args) {
        let mut acc = [[_mm512_setzero_ps(); RR]; M];
        let full = a.k / GROUP;
        // SAFETY (whole body): groups `0..full` are whole; the last, partial one is read under
        // masks covering its `k % GROUP` elements; outputs as `rows` checked.
        unsafe {
            for gi in 0..full {
                group::<RR, M, INT4>(&a, gi, 0xFFFF, 0xFFFF, &mut acc);
            }
            let rest = a.k - full * GROUP;
            if rest > 0 {
                let ma = ((1u32 << rest.min(16)) - 1) as __mmask16;
                let mb = ((1u32 << rest.saturating_sub(16)) - 1) as __mmask16;
                group::<RR, M, INT4>(&a, full, ma, mb, &mut acc);
            }
            for (i, ai) in acc.iter().enumerate() {
                for (rr, v) in ai.iter().enumerate() {
                    let b = if a.b.is_null() { 0.0 } else { *a.b.add(rr) };
                    *a.y.add(i * a.ys + rr) = _mm512_reduce_add_ps(*v) + b;
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// See [`super::avx512::tile`]; needs AVX2 and FMA instead.
    ///
    /// # Safety
    /// AVX2 and FMA must be available; bounds as for the AVX-512 tile.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tile(
        x: &[f32],
        xs: usize,
        mr: usize,
        w: &[f32],
        ws: usize,
        r: usize,
        kl: usize,
        acc: &mut [f32],
        accs: usize,
    ) {
        let (xp, wp, ap) = (x.as_ptr(), w.as_ptr(), acc.as_mut_ptr());
        // SAFETY: forwarded from this function's contract.
        unsafe { dispatch_tile!(r, mr, kernel, xp, xs, wp, ws, kl, ap, accs) }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn kernel<const RR: usize, const M: usize>(
        x: *const f32,
        xs: usize,
        w: *const f32,
        ws: usize,
        kl: usize,
        acc: *mut f32,
        accs: usize,
    ) {
        let mut a = [[_mm256_setzero_ps(); RR]; M];
        let mut t = 0;
        // SAFETY (whole body): every access is below `kl` in a row the contract of `tile`
        // covers.
        unsafe {
            while t + 8 <= kl {
                let mut wv = [_mm256_setzero_ps(); RR];
                for (rr, v) in wv.iter_mut().enumerate() {
                    *v = _mm256_loadu_ps(w.add(rr * ws + t));
                }
                for (i, ai) in a.iter_mut().enumerate() {
                    let xv = _mm256_loadu_ps(x.add(i * xs + t));
                    for (acc, v) in ai.iter_mut().zip(&wv) {
                        *acc = _mm256_fmadd_ps(xv, *v, *acc);
                    }
                }
                t += 8;
            }
            for (i, ai) in a.iter().enumerate() {
                for (rr, v) in ai.iter().enumerate() {
                    let mut s = hsum(*v);
                    for u in t..kl {
                        s += *x.add(i * xs + u) * *w.add(rr * ws + u);
                    }
                    *acc.add(rr * accs + i) += s;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::quant::{PackedMatrix, WeightFormat};

    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| ((i + seed) * 2654435761usize % 10007) as f32 / 10007.0 - 0.5)
            .collect()
    }

    fn naive(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, b: Option<&[f32]>) -> Vec<f32> {
        let mut y = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0f64;
                for t in 0..k {
                    s += x[i * k + t] as f64 * w[j * k + t] as f64;
                }
                y[i * n + j] = s as f32 + b.map_or(0.0, |b| b[j]);
            }
        }
        y
    }

    fn check(isa: Isa, m: usize, k: usize, n: usize, bias: bool) {
        let x = values(m * k, 1);
        let w = values(n * k, 2);
        let b = values(n, 3);
        let b = bias.then_some(&b[..]);
        let want = naive(&x, m, k, &w, n, b);
        let mut got = vec![f32::NAN; m * n];
        let out = SharedMut::new(got.as_mut_ptr());
        rows_task(isa, &x, m, k, Weights::F32(&w), n, b, (0, n), out);
        for (idx, (g, e)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - e).abs() <= 1e-4 * (1.0 + e.abs()),
                "{isa:?} m={m} k={k} n={n} bias={bias} at {idx}: {g} vs {e}"
            );
        }
    }

    fn isas() -> Vec<Isa> {
        let mut v = vec![Isa::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                v.push(Isa::Avx2Fma);
            }
            if std::arch::is_x86_feature_detected!("avx512f") {
                v.push(Isa::Avx512);
            }
        }
        v
    }

    #[test]
    fn every_isa_matches_naive_on_odd_shapes() {
        for isa in isas() {
            for m in 1..=17 {
                for (k, n) in [(1, 1), (7, 3), (33, 5), (100, 9), (531, 13), (1030, 6)] {
                    check(isa, m, k, n, m % 2 == 0);
                }
            }
        }
    }

    #[test]
    fn threaded_entry_point_matches_naive() {
        for (m, k, n) in [(1, 768, 2305), (3, 1000, 517), (16, 129, 4099)] {
            let x = values(m * k, 4);
            let w = values(n * k, 5);
            let b = values(n, 6);
            let want = naive(&x, m, k, &w, n, Some(&b));
            let mut got = vec![0f32; m * n];
            matmul_wt(&x, m, k, Weights::F32(&w), n, Some(&b), &mut got);
            for (g, e) in got.iter().zip(&want) {
                assert!((g - e).abs() <= 1e-4 * (1.0 + e.abs()), "{g} vs {e}");
            }
        }
    }

    /// The fused int8 / int4 kernels (AVX-512) and the dequantize-into-L1 path (every ISA)
    /// against a naive matmul with the dequantized weights.
    #[test]
    fn quantized_kernels_match_dequantized_reference() {
        for format in [WeightFormat::Int8, WeightFormat::Int4] {
            for (k, n) in [(32, 1), (64, 7), (96, 13), (768, 9), (45, 5), (1000, 3)] {
                let w = values(n * k, 9);
                let p = PackedMatrix::quantize(&w, n, k, format).unwrap().unwrap();
                let deq = p.dequantize().unwrap();
                for m in 1..=17 {
                    let x = values(m * k, m);
                    let b = values(n, 10);
                    let b = (m % 2 == 1).then_some(&b[..]);
                    let want = naive(&x, m, k, &deq, n, b);
                    for isa in isas() {
                        let mut got = vec![f32::NAN; m * n];
                        let out = SharedMut::new(got.as_mut_ptr());
                        p.with_view(|v| {
                            rows_task(isa, &x, m, k, Weights::Packed(&v), n, b, (0, n), out)
                        })
                        .unwrap();
                        for (idx, (g, e)) in got.iter().zip(&want).enumerate() {
                            assert!(
                                (g - e).abs() <= 1e-4 * (1.0 + e.abs()),
                                "{format} {isa:?} m={m} k={k} n={n} at {idx}: {g} vs {e}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn threaded_quantized_entry_point_matches_reference() {
        for format in [WeightFormat::Int8, WeightFormat::Int4] {
            for (m, k, n) in [(1, 768, 2305), (8, 3072, 771), (16, 128, 4099)] {
                let x = values(m * k, 11);
                let w = values(n * k, 12);
                let b = values(n, 13);
                let p = PackedMatrix::quantize(&w, n, k, format).unwrap().unwrap();
                let want = naive(&x, m, k, &p.dequantize().unwrap(), n, Some(&b));
                let mut got = vec![0f32; m * n];
                p.with_view(|v| matmul_wt(&x, m, k, Weights::Packed(&v), n, Some(&b), &mut got))
                    .unwrap();
                for (g, e) in got.iter().zip(&want) {
                    assert!(
                        (g - e).abs() <= 1e-4 * (1.0 + e.abs()),
                        "{format}: {g} vs {e}"
                    );
                }
            }
        }
    }

    /// `cargo test --release -p blip2-model --lib gemv_speed -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn gemv_speed() {
        for (m, k, n) in [
            (1, 768, 3072),
            (1, 3072, 768),
            (1, 768, 50272),
            (8, 768, 3072),
        ] {
            let x = values(m * k, 1);
            let w = values(n * k, 2);
            let mut y = vec![0f32; m * n];
            for format in [WeightFormat::F32, WeightFormat::Int8, WeightFormat::Int4] {
                let p = PackedMatrix::quantize(&w, n, k, format).unwrap();
                let mut run = || match &p {
                    None => matmul_wt(&x, m, k, Weights::F32(&w), n, None, &mut y),
                    Some(p) => p
                        .with_view(|v| matmul_wt(&x, m, k, Weights::Packed(&v), n, None, &mut y))
                        .unwrap(),
                };
                run();
                let mut best = f64::MAX;
                for _ in 0..50 {
                    let t = std::time::Instant::now();
                    run();
                    best = best.min(t.elapsed().as_secs_f64());
                }
                println!(
                    "m={m} k={k} n={n} {format}: best {:.1} us, {:.1} Gweights/s",
                    best * 1e6,
                    (n * k) as f64 / best / 1e9
                );
            }
        }
    }

    #[test]
    fn packed_formats_match_their_dequantized_weights() {
        for format in [
            WeightFormat::F16,
            WeightFormat::Bf16,
            WeightFormat::Int8,
            WeightFormat::Int4,
        ] {
            for (m, k, n) in [(1, 45, 7), (5, 577, 11), (17, 1100, 3)] {
                let x = values(m * k, 7);
                let w = values(n * k, 8);
                let p = PackedMatrix::quantize(&w, n, k, format).unwrap().unwrap();
                let want = naive(&x, m, k, &p.dequantize().unwrap(), n, None);
                let mut got = vec![0f32; m * n];
                p.with_view(|v| matmul_wt(&x, m, k, Weights::Packed(&v), n, None, &mut got))
                    .unwrap();
                for (g, e) in got.iter().zip(&want) {
                    assert!(
                        (g - e).abs() <= 1e-4 * (1.0 + e.abs()),
                        "{format}: {g} vs {e}"
                    );
                }
            }
        }
    }
}
