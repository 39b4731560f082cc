//! Attention over short key sequences (windowed attention: 49 keys in TinyViT's 7x7 windows,
//! 196 in 14x14 ones and in SAM ViT's windowed blocks) with AVX-512 intrinsics.
//!
//! With at most [`MAX_KEYS`] keys a query's whole score row fits in a small buffer, so the
//! softmax is the plain two-pass one (max, then `exp` and sum) instead of the online rescaling,
//! and every row-wide step is vector code: the scores as 16-key FMA blocks against the
//! transposed keys, the maximum and the sum as lane reductions, `exp` as
//! [`crate::fastmath::avx512::exp_nonpositive16`], and `probabilities · V` as broadcast FMAs into
//! register accumulators over `d`. The portable path spent most of its time in the scalar
//! reductions and the per-row `exp` of the rescale factor. The result is the same softmax up to
//! f32 rounding (tests in `crate::attention`: against an f64 reference and against the online
//! path).

use std::arch::x86_64::*;

use rayon::prelude::*;

use super::{Bias, Head, SharedOut};
use crate::fastmath::avx512::exp_nonpositive16;

/// Longest key sequence this path takes (16 zmm of scores per query row).
pub(super) const MAX_KEYS: usize = 256;
/// Queries per task: a 14x14 window's 196 queries make 4 tasks, a 7x7 window's 49 one.
const QUERY_BLOCK: usize = 64;
/// Lanes of a zmm register.
const LANES: usize = 16;
/// Queries computed together (see `Head::queries` below): 4 queries x 4 key chunks is 16 score
/// accumulators, 4 x 2 value chunks (d = 32) 8, within the 32 zmm registers.
const QUERIES_PER_PASS: usize = 4;

/// Per-thread buffers, reused across tasks.
#[derive(Default)]
pub(super) struct Scratch {
    /// `[d][padded_keys]`: the batch-head's keys, transposed, zero past `nk`.
    keys_t: Vec<f32>,
    /// `[padded_keys]`: one query's scores, then its probabilities (zero past `nk`).
    scores: Vec<f32>,
}

/// `out = softmax(scale · q·kᵀ + bias) · v` for every batch-head, `nk <= MAX_KEYS`.
///
/// # Safety
/// The CPU must support AVX-512F; the shapes must be the ones `super::attention` checked, with
/// `d > 0` and `0 < nk <= MAX_KEYS`.
// q is [bh, nq, d], k and v are [bh, nk, d], out is [bh, nq, d].
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn attention(q: &[f32], k: &[f32], v: &[f32], nq: usize, nk: usize, d: usize, scale: f32, bias: Bias, out: &mut [f32]) {
    debug_assert!(d > 0 && nk > 0 && nk <= MAX_KEYS);
    let bh = out.len() / (nq * d);
    let blocks = nq.div_ceil(QUERY_BLOCK);
    let out_ptr = SharedOut(out.as_mut_ptr());
    (0..bh * blocks).into_par_iter().for_each_init(Scratch::default, |scratch, task| {
        let (b, block) = (task / blocks, task % blocks);
        let rows = block * QUERY_BLOCK..((block + 1) * QUERY_BLOCK).min(nq);
        let head = Head { q: &q[b * nq * d..(b + 1) * nq * d], ldq: d, k: &k[b * nk * d..(b + 1) * nk * d], v: &v[b * nk * d..(b + 1) * nk * d], ldk: d, ldv: d, b, nq, nk, d, scale, bias };
        // SAFETY: each task writes only its own rows of batch-head b; the caller vouches for
        // AVX-512F and the shapes.
        unsafe {
            let out_rows = std::slice::from_raw_parts_mut(out_ptr.ptr().add((b * nq + rows.start) * d), rows.len() * d);
            head.run_short_keys(scratch, rows, out_rows);
        }
    });
}

impl Head<'_> {
    /// Queries `rows` of this batch-head into `out` (`[rows.len(), d]`) on the calling thread.
    ///
    /// # Safety
    /// The CPU must support AVX-512F; `d > 0` and `0 < nk <= MAX_KEYS`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn run_short_keys(&self, s: &mut Scratch, rows: std::ops::Range<usize>, out: &mut [f32]) {
        let (nk, d) = (self.nk, self.d);
        let padded = nk.div_ceil(LANES) * LANES;
        s.keys_t.clear();
        s.keys_t.resize(d * padded, 0.0);
        // [nk, d] -> [d][padded] with 16x16 register transposes (the padding stays zero).
        crate::transpose::transpose_block_at(crate::simd::Isa::Avx512, &self.k[..nk * d], d, &mut s.keys_t, padded, nk, d);
        s.scores.clear();
        s.scores.resize(QUERIES_PER_PASS * padded, 0.0);
        let tail_mask: __mmask16 = (1u32 << (nk - (padded - LANES))).wrapping_sub(1) as u16;
        let mut r = 0;
        while r + QUERIES_PER_PASS <= rows.len() {
            self.queries::<QUERIES_PER_PASS>(rows.start + r, &mut s.scores, &s.keys_t, padded, tail_mask, &mut out[r * d..]);
            r += QUERIES_PER_PASS;
        }
        while r < rows.len() {
            self.queries::<1>(rows.start + r, &mut s.scores, &s.keys_t, padded, tail_mask, &mut out[r * d..]);
            r += 1;
        }
    }

    /// Queries `query0..query0 + R` into `out[..R * d]`: their scores, softmaxes and weighted
    /// values computed together, so that every key and value load feeds R FMAs and the R rows'
    /// accumulators are independent chains (one query alone left the FMA pipes waiting on the
    /// latency of its own few accumulators).
    // scores: at least [R][padded]; keys_t: [d][padded]; out: at least [R, d].
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn queries<const R: usize>(&self, query0: usize, scores: &mut [f32], keys_t: &[f32], padded: usize, tail_mask: __mmask16, out: &mut [f32]) {
        let (nk, d) = (self.nk, self.d);
        let q = self.q.as_ptr().add(query0 * self.ldq);
        let chunks = padded / LANES;
        let mut c = 0;
        while c + 4 <= chunks {
            score_chunks::<R, 4>(q, self.ldq, d, keys_t, padded, c, self.scale, scores.as_mut_ptr());
            c += 4;
        }
        while c < chunks {
            score_chunks::<R, 1>(q, self.ldq, d, keys_t, padded, c, self.scale, scores.as_mut_ptr());
            c += 1;
        }
        let mut inv_sums = [0.0f32; R];
        for (i, inv) in inv_sums.iter_mut().enumerate() {
            let row = &mut scores[i * padded..(i + 1) * padded];
            add_bias(self.bias, self.b, self.nq, nk, query0 + i, &mut row[..nk]);
            *inv = 1.0 / softmax_numerators(row, padded, tail_mask);
        }
        let mut c0 = 0;
        while c0 < d {
            let probs = scores.as_ptr();
            match (d - c0).div_ceil(LANES) {
                1 => value_chunks::<R, 1>(probs, padded, nk, self.v, d, c0, &inv_sums, out.as_mut_ptr()),
                2 => value_chunks::<R, 2>(probs, padded, nk, self.v, d, c0, &inv_sums, out.as_mut_ptr()),
                3 => value_chunks::<R, 3>(probs, padded, nk, self.v, d, c0, &inv_sums, out.as_mut_ptr()),
                _ => value_chunks::<R, 4>(probs, padded, nk, self.v, d, c0, &inv_sums, out.as_mut_ptr()),
            }
            c0 += 4 * LANES;
        }
    }
}

/// Scores of key chunks `c0..c0 + G` (16 keys each) for R queries, R·G accumulators.
// q: R rows of d floats, stride ldq; keys_t: [d][padded]; scores: R rows of padded floats.
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn score_chunks<const R: usize, const G: usize>(q: *const f32, ldq: usize, d: usize, keys_t: &[f32], padded: usize, c0: usize, scale: f32, scores: *mut f32) {
    let mut acc = [[_mm512_setzero_ps(); G]; R];
    let kt = keys_t.as_ptr().add(c0 * LANES);
    for p in 0..d {
        let row = kt.add(p * padded);
        let keys: [__m512; G] = std::array::from_fn(|g| _mm512_loadu_ps(row.add(g * LANES)));
        for (i, acc_i) in acc.iter_mut().enumerate() {
            let qb = _mm512_set1_ps(*q.add(i * ldq + p));
            for (a, &kv) in acc_i.iter_mut().zip(&keys) {
                *a = _mm512_fmadd_ps(qb, kv, *a);
            }
        }
    }
    let scale = _mm512_set1_ps(scale);
    for (i, acc_i) in acc.iter().enumerate() {
        for (g, a) in acc_i.iter().enumerate() {
            _mm512_storeu_ps(scores.add(i * padded + (c0 + g) * LANES), _mm512_mul_ps(*a, scale));
        }
    }
}

/// Replaces the first `nk` scores by `exp(score - max)` and the padding by 0; returns the sum.
/// A row whose scores are all -inf gets NaN - (-inf) lanes, which `exp_nonpositive16` maps to
/// 0: the sum is 0 and the caller's `1 / sum` makes the output NaN, as PyTorch does.
// scores: [padded]; tail_mask: the valid lanes of the last chunk.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn softmax_numerators(scores: &mut [f32], padded: usize, tail_mask: __mmask16) -> f32 {
    let chunks = padded / LANES;
    let ptr = scores.as_mut_ptr();
    let mask = |c: usize| if c + 1 == chunks { tail_mask } else { 0xffff };
    let mut max = _mm512_set1_ps(f32::NEG_INFINITY);
    for c in 0..chunks {
        max = _mm512_mask_max_ps(max, mask(c), max, _mm512_loadu_ps(ptr.add(c * LANES)));
    }
    let max = _mm512_set1_ps(_mm512_reduce_max_ps(max));
    let mut sum = _mm512_setzero_ps();
    for c in 0..chunks {
        let e = _mm512_maskz_mov_ps(mask(c), exp_nonpositive16(_mm512_sub_ps(_mm512_loadu_ps(ptr.add(c * LANES)), max)));
        _mm512_storeu_ps(ptr.add(c * LANES), e);
        sum = _mm512_add_ps(sum, e);
    }
    _mm512_reduce_add_ps(sum)
}

/// `out[i][c0..c0 + 16G] = inv_sums[i] · Σ_j probs[i][j] · v[j, c0..]` for R queries, the
/// last chunk masked to `d`.
// probs: R rows of `padded` floats (the first nk used); v: [nk, d]; out: R rows of d floats.
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn value_chunks<const R: usize, const G: usize>(probs: *const f32, padded: usize, nk: usize, v: &[f32], d: usize, c0: usize, inv_sums: &[f32; R], out: *mut f32) {
    let masks: [__mmask16; G] = std::array::from_fn(|g| {
        let lanes = d.saturating_sub(c0 + g * LANES).min(LANES);
        ((1u32 << lanes) - 1) as u16
    });
    let mut acc = [[_mm512_setzero_ps(); G]; R];
    for j in 0..nk {
        let row = v.as_ptr().add(j * d + c0);
        let vals: [__m512; G] = std::array::from_fn(|g| _mm512_maskz_loadu_ps(masks[g], row.add(g * LANES)));
        for (i, acc_i) in acc.iter_mut().enumerate() {
            let pb = _mm512_set1_ps(*probs.add(i * padded + j));
            for (a, &vv) in acc_i.iter_mut().zip(&vals) {
                *a = _mm512_fmadd_ps(pb, vv, *a);
            }
        }
    }
    for (i, acc_i) in acc.iter().enumerate() {
        let inv = _mm512_set1_ps(inv_sums[i]);
        for (g, a) in acc_i.iter().enumerate() {
            _mm512_mask_storeu_ps(out.add(i * d + c0 + g * LANES), masks[g], _mm512_mul_ps(*a, inv));
        }
    }
}

/// Adds the bias of `query` against every key to `scores` (`[nk]`).
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn add_bias(bias: Bias, b: usize, nq: usize, nk: usize, query: usize, scores: &mut [f32]) {
    match bias {
        Bias::None => {}
        Bias::Table { table, heads } => {
            let row = &table[((b % heads) * nq + query) * nk..][..nk];
            for (sc, &t) in scores.iter_mut().zip(row) {
                *sc += t;
            }
        }
        Bias::RelPos { rel_h, rel_w, kh, kw } => {
            let row_h = &rel_h[(b * nq + query) * kh..][..kh];
            let row_w = &rel_w[(b * nq + query) * kw..][..kw];
            for (y, &h) in row_h.iter().enumerate() {
                for (sc, &w) in scores[y * kw..(y + 1) * kw].iter_mut().zip(row_w) {
                    *sc += h + w;
                }
            }
        }
    }
}
