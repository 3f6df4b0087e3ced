//! Attention of one new position per sequence (a decode step), reading each sequence's KV in
//! place from its cache buffers.
//!
//! Why: through tensors, a decode step of a batch of `b` sequences runs ~10 small tensor ops per
//! sequence per layer (split heads, append, scores, softmax, weighted sum, merge heads), each
//! allocating its output; at batch 8 on OPT-125m that is ~1000 ops per token step, a visible
//! share of the step. Here every (sequence, head) pair is one task on the shared fork-join
//! pool, reading the query row, the cached keys and values where they lie, and writing its
//! slice of the output row.
//!
//! Numerics follow `eager_attention`: scores `q·k` in f32 (the query already scaled),
//! softmax with the row maximum subtracted, probabilities divided by their sum before the
//! weighted sum of the values.

use std::cell::RefCell;

use super::SharedMut;
use crate::llm::KvSlices;

/// One sequence's share of a decode attention call.
pub struct DecodeSeq<'a> {
    /// The new position's query, `[heads * head_dim]` (heads side by side), already scaled.
    pub q: &'a [f32],
    /// The sequence's keys and values, the new position included.
    pub kv: KvSlices<'a>,
}

/// Attention of each sequence's single query over its cached positions. `out` is
/// `[seqs.len(), heads * head_dim]`, rows in `seqs` order.
///
/// Panics when a slice is shorter than its shape says (a caller bug, never data-dependent).
pub fn decode(seqs: &[DecodeSeq<'_>], heads: usize, head_dim: usize, out: &mut [f32]) {
    let width = heads * head_dim;
    assert!(
        out.len() >= seqs.len() * width,
        "attention: output too short"
    );
    for s in seqs {
        assert!(s.q.len() >= width, "attention: query too short");
        assert!(s.kv.len <= s.kv.capacity, "attention: len beyond capacity");
        let need = heads * s.kv.capacity * head_dim;
        assert!(
            s.kv.k.len() >= need && s.kv.v.len() >= need,
            "attention: KV shorter than [heads, capacity, head_dim]"
        );
    }
    let shared = SharedMut::new(out.as_mut_ptr());
    let run = |task: usize| {
        let (i, h) = (task / heads, task % heads);
        let s = &seqs[i];
        let q = &s.q[h * head_dim..(h + 1) * head_dim];
        let base = h * s.kv.capacity * head_dim;
        let keys = &s.kv.k[base..base + s.kv.len * head_dim];
        let values = &s.kv.v[base..base + s.kv.len * head_dim];
        // SAFETY: task (i, h) alone writes `out[i * width + h * head_dim..][..head_dim]`, and
        // `out` outlives the call (par_chunks returns after every task has finished).
        let o = unsafe {
            std::slice::from_raw_parts_mut(shared.ptr().add(i * width + h * head_dim), head_dim)
        };
        head(q, keys, values, head_dim, o);
    };
    let tasks = seqs.len() * heads;
    // Small calls (a short cache, one sequence) are not worth waking the helper for.
    let work: usize = seqs.iter().map(|s| s.kv.len).sum::<usize>() * width;
    let threads = if work < 32_768 {
        1
    } else {
        super::pool::num_threads()
    };
    super::pool::par_chunks(tasks, threads, &run);
}

thread_local! {
    /// Each pool thread's buffer for one head's scores, kept between calls (a decode step runs
    /// sequences x layers x heads of them).
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// One head: `o = softmax(q · Kᵀ) · V` over `keys`/`values` `[len, head_dim]`.
fn head(q: &[f32], keys: &[f32], values: &[f32], head_dim: usize, o: &mut [f32]) {
    SCORES.with(|scores| {
        let mut scores = scores.borrow_mut();
        scores.clear();
        #[cfg(target_arch = "x86_64")]
        if super::gemv::has_avx2() {
            // SAFETY: AVX2 and FMA were detected at run time.
            unsafe { head_avx2(q, keys, values, head_dim, o, &mut scores) };
            return;
        }
        head_generic(q, keys, values, head_dim, o, &mut scores)
    })
}

/// Turns the raw scores (their maximum `max`) into softmax probabilities in place: the maximum
/// subtracted, exponentiated, divided by their sum.
#[inline(always)]
fn softmax(scores: &mut [f32], max: f32) {
    let mut sum = 0f32;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    let inv = 1.0 / sum;
    for s in scores.iter_mut() {
        *s *= inv;
    }
}

/// [`head_generic`] with AVX2 FMAs: each score is one pass of 8-wide FMAs over the key, and
/// the weighted sum keeps up to 64 output values in registers over one pass of the values.
///
/// # Safety
/// AVX2 and FMA must be available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn head_avx2(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    head_dim: usize,
    o: &mut [f32],
    scores: &mut Vec<f32>,
) {
    use std::arch::x86_64::*;
    if !head_dim.is_multiple_of(8) || head_dim == 0 {
        return head_generic(q, keys, values, head_dim, o, scores);
    }
    let len = keys.len() / head_dim;
    assert!(
        q.len() >= head_dim && o.len() >= head_dim && values.len() >= len * head_dim,
        "attention: head slices too short"
    );
    let qp = q.as_ptr();
    let mut max = f32::NEG_INFINITY;
    for key in keys.chunks_exact(head_dim) {
        let kp = key.as_ptr();
        let mut acc = _mm256_setzero_ps();
        for c in (0..head_dim).step_by(8) {
            // SAFETY: c + 8 <= head_dim, and q and the key hold head_dim values.
            acc = unsafe {
                _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(c)), _mm256_loadu_ps(kp.add(c)), acc)
            };
        }
        let half = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps::<1>(acc));
        let pairs = _mm_add_ps(half, _mm_movehl_ps(half, half));
        let s = _mm_cvtss_f32(_mm_add_ss(pairs, _mm_shuffle_ps::<0x55>(pairs, pairs)));
        max = max.max(s);
        scores.push(s);
    }
    softmax(scores, max);
    // Blocks of up to 64 output values (8 registers), one pass over the values each.
    let mut c0 = 0;
    while c0 < head_dim {
        let width = (head_dim - c0).min(64);
        let mut acc = [_mm256_setzero_ps(); 8];
        for (j, p) in scores.iter().enumerate() {
            let p = _mm256_set1_ps(*p);
            // SAFETY: row j of the values holds head_dim values; c0 + width <= head_dim.
            let vp = unsafe { values.as_ptr().add(j * head_dim + c0) };
            if width == 64 {
                // A fixed trip count, so the accumulators stay in registers.
                for (r, a) in acc.iter_mut().enumerate() {
                    // SAFETY: as above, 8 * r + 8 <= 64 = width.
                    *a = unsafe { _mm256_fmadd_ps(p, _mm256_loadu_ps(vp.add(8 * r)), *a) };
                }
            } else {
                for (r, a) in acc.iter_mut().enumerate().take(width / 8) {
                    // SAFETY: as above, 8 * r + 8 <= width.
                    *a = unsafe { _mm256_fmadd_ps(p, _mm256_loadu_ps(vp.add(8 * r)), *a) };
                }
            }
        }
        for (r, a) in acc.iter().enumerate().take(width / 8) {
            // SAFETY: c0 + 8 * r + 8 <= head_dim <= o.len().
            unsafe { _mm256_storeu_ps(o.as_mut_ptr().add(c0 + 8 * r), *a) };
        }
        c0 += width;
    }
}

#[inline(always)]
fn head_generic(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    head_dim: usize,
    o: &mut [f32],
    scores: &mut Vec<f32>,
) {
    let mut max = f32::NEG_INFINITY;
    for key in keys.chunks_exact(head_dim) {
        let s = dot(q, key);
        max = max.max(s);
        scores.push(s);
    }
    softmax(scores, max);
    o.fill(0.0);
    for (&p, value) in scores.iter().zip(values.chunks_exact(head_dim)) {
        for (acc, v) in o.iter_mut().zip(value) {
            *acc += p * v;
        }
    }
}

/// A dot product with eight independent partial sums (so the compiler keeps them in one vector
/// register), reduced pairwise.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const L: usize = 8;
    let mut acc = [0f32; L];
    let (a_chunks, b_chunks) = (a.chunks_exact(L), b.chunks_exact(L));
    let tail: f32 = a_chunks
        .remainder()
        .iter()
        .zip(b_chunks.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a_chunks.zip(b_chunks) {
        for i in 0..L {
            acc[i] += x[i] * y[i];
        }
    }
    ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7])) + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same attention through plain loops in f64.
    fn reference(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        cap: usize,
        len: usize,
        heads: usize,
    ) -> Vec<f32> {
        let d = q.len() / heads;
        let mut out = vec![0f32; heads * d];
        for h in 0..heads {
            let scores: Vec<f64> = (0..len)
                .map(|j| {
                    (0..d)
                        .map(|x| q[h * d + x] as f64 * k[(h * cap + j) * d + x] as f64)
                        .sum()
                })
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            for x in 0..d {
                out[h * d + x] = (0..len)
                    .map(|j| e[j] / sum * v[(h * cap + j) * d + x] as f64)
                    .sum::<f64>() as f32;
            }
        }
        out
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                (state % 2000) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn matches_plain_attention_for_ragged_caches() {
        // A head_dim that is not a multiple of 8 (the portable path), 64 (OPT-125m: one block
        // of registers) and 80 (OPT-2.7B: a block and a remainder).
        for (heads, d) in [(3, 20), (2, 64), (2, 80)] {
            check(heads, d);
        }
    }

    fn check(heads: usize, d: usize) {
        let shapes = [(1, 4), (37, 64), (300, 320)]; // (len, capacity)
        let data: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = shapes
            .iter()
            .enumerate()
            .map(|(i, &(_, cap))| {
                let n = heads * cap * d;
                (
                    values(heads * d, 3 * i as u32),
                    values(n, 3 * i as u32 + 1),
                    values(n, 3 * i as u32 + 2),
                )
            })
            .collect();
        let seqs: Vec<DecodeSeq> = shapes
            .iter()
            .zip(&data)
            .map(|(&(len, capacity), (q, k, v))| DecodeSeq {
                q,
                kv: KvSlices {
                    k,
                    v,
                    capacity,
                    len,
                },
            })
            .collect();
        let mut out = vec![0f32; shapes.len() * heads * d];
        decode(&seqs, heads, d, &mut out);
        for (i, (&(len, cap), (q, k, v))) in shapes.iter().zip(&data).enumerate() {
            let want = reference(q, k, v, cap, len, heads);
            let got = &out[i * heads * d..(i + 1) * heads * d];
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 1e-5, "d {d}, sequence {i}: {g} vs {w}");
            }
        }
    }
}
