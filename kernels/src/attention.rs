//! Flash-style attention on the CPU: `softmax(scale · q·kᵀ + bias) · v` without ever holding an
//! `nq × nk` score matrix (SAM's global attention has nq = nk = 4096 per head).
//!
//! Each task owns one batch-head and a block of [`QUERY_BLOCK`] queries, and walks the keys in
//! blocks of [`KEY_BLOCK`] with the online softmax: per query it keeps the running maximum, the
//! running sum of `exp(score - max)` and an unnormalised output row, rescaling both when the
//! maximum grows. Memory per thread is `QUERY_BLOCK × (KEY_BLOCK + d)` plus one transposed key
//! block, and the result is exact up to f32 rounding (no score is ever exponentiated above 0).
//!
//! Both inner products are written as `axpy` loops over contiguous memory (the key block is
//! transposed first), so they vectorise; on x86-64 with AVX2 the task body is compiled a second
//! time with those features and chosen at run time.

use rayon::prelude::*;

use crate::fastmath::exp_nonpositive;
use crate::simd::Isa;

#[cfg(target_arch = "x86_64")]
mod small_avx512;

/// Queries per task.
const QUERY_BLOCK: usize = 32;
/// Keys per online-softmax step.
const KEY_BLOCK: usize = 64;
/// Lanes of the online softmax's partial maxima and sums (one zmm, two ymm).
const REDUCE_LANES: usize = 16;

/// An additive bias on the scores, evaluated on the fly.
#[derive(Clone, Copy, Debug)]
pub enum Bias<'a> {
    None,
    /// `table` is `[heads, nq, nk]`; batch-head `bh` uses head `bh % heads`.
    Table {
        table: &'a [f32],
        heads: usize,
    },
    /// SAM's decomposed relative position: `rel_h` is `[bh, nq, kh]`, `rel_w` is `[bh, nq, kw]`,
    /// `nk = kh * kw` and `bias(i, j) = rel_h[bh, i, j / kw] + rel_w[bh, i, j % kw]`.
    RelPos {
        rel_h: &'a [f32],
        rel_w: &'a [f32],
        kh: usize,
        kw: usize,
    },
}

/// `out = softmax(scale · q·kᵀ + bias) · v` for every batch-head.
/// A query whose scores are all `-inf` gets NaN, as in PyTorch.
// q is [bh, nq, d], k and v are [bh, nk, d], out is [bh, nq, d].
#[allow(clippy::too_many_arguments)]
pub fn attention(q: &[f32], k: &[f32], v: &[f32], bh: usize, nq: usize, nk: usize, d: usize, scale: f32, bias: Bias, out: &mut [f32]) {
    assert_eq!(q.len(), bh * nq * d, "attention: q is not [bh, nq, d]");
    assert_eq!(k.len(), bh * nk * d, "attention: k is not [bh, nk, d]");
    assert_eq!(v.len(), bh * nk * d, "attention: v is not [bh, nk, d]");
    assert_eq!(out.len(), bh * nq * d, "attention: out is not [bh, nq, d]");
    check_bias(bias, bh, nq, nk);
    if out.is_empty() {
        return;
    }
    run_tasks(q, k, v, nq, nk, d, scale, bias, crate::simd::active(), out);
}

/// Panics unless `bias` fits `bh` batch-heads of `nq` queries and `nk` keys.
fn check_bias(bias: Bias, bh: usize, nq: usize, nk: usize) {
    match bias {
        Bias::None => {}
        Bias::Table { table, heads } => {
            assert!(heads > 0 && table.len() == heads * nq * nk, "attention: bias table is not [heads, nq, nk]");
        }
        Bias::RelPos { rel_h, rel_w, kh, kw } => {
            assert_eq!(kh * kw, nk, "attention: relative position grid {kh}x{kw} does not cover {nk} keys");
            assert_eq!(rel_h.len(), bh * nq * kh, "attention: rel_h is not [bh, nq, kh]");
            assert_eq!(rel_w.len(), bh * nq * kw, "attention: rel_w is not [bh, nq, kw]");
        }
    }
}

/// Whether [`Head::run`] takes the short-key AVX-512 path for `nk` keys.
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
fn takes_short_keys(isa: Isa, nk: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    return isa == Isa::Avx512 && (1..=small_avx512::MAX_KEYS).contains(&nk);
    #[cfg(not(target_arch = "x86_64"))]
    return false;
}

/// Splits the work into (batch-head, query block) tasks and runs them in parallel.
// q is [bh, nq, d], k and v are [bh, nk, d], out is [bh, nq, d] (shapes already checked, d > 0).
#[allow(clippy::too_many_arguments)]
fn run_tasks(q: &[f32], k: &[f32], v: &[f32], nq: usize, nk: usize, d: usize, scale: f32, bias: Bias, isa: Isa, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if takes_short_keys(isa, nk) {
        // SAFETY: `isa` is one the CPU supports; the shapes were checked by `attention`, d > 0
        // since `out` is not empty.
        unsafe { small_avx512::attention(q, k, v, nq, nk, d, scale, bias, out) };
        return;
    }
    out.par_chunks_mut(nq * d).enumerate().for_each(|(b, out_b)| {
        out_b.par_chunks_mut(QUERY_BLOCK * d).enumerate().for_each_init(Scratch::default, |scratch, (block, out_block)| {
            let task = Task {
                q: &q[(b * nq + block * QUERY_BLOCK) * d..][..out_block.len()],
                ldq: d,
                k: &k[b * nk * d..(b + 1) * nk * d],
                v: &v[b * nk * d..(b + 1) * nk * d],
                ldk: d,
                ldv: d,
                b,
                first_query: block * QUERY_BLOCK,
                nq,
                nk,
                d,
                scale,
                bias,
            };
            task.run_at(isa, scratch, out_block);
        });
    });
}

/// One operand of [`attention_heads`] inside a tensor whose heads are merged into the channels:
/// row `i` of head `h` of batch `b` is the `d` floats at
/// `offset + (b · rows + i) · row_stride + h · head_stride`.
#[derive(Clone, Copy, Debug)]
pub struct HeadsView<'a> {
    pub data: &'a [f32],
    /// Rows (tokens) per batch element.
    pub rows: usize,
    pub row_stride: usize,
    pub head_stride: usize,
    pub offset: usize,
}

impl<'a> HeadsView<'a> {
    /// `[batch, rows, heads, d]`: a projection's output viewed per head.
    pub fn merged(data: &'a [f32], rows: usize, heads: usize, d: usize) -> Self {
        Self { data, rows, row_stride: heads * d, head_stride: d, offset: 0 }
    }

    /// Part `part` (0 = q, 1 = k, 2 = v) of `[batch, rows, heads, 3, d]`: one fused projection
    /// whose every head holds its q, k and v side by side (TinyViT's layout).
    pub fn packed_part(data: &'a [f32], rows: usize, heads: usize, d: usize, part: usize) -> Self {
        Self { data, rows, row_stride: heads * 3 * d, head_stride: 3 * d, offset: part * d }
    }

    /// Whether `batch` batch elements of `heads` heads of rows of `d` floats lie inside `data`.
    fn fits(&self, batch: usize, heads: usize, d: usize) -> bool {
        batch == 0 || self.rows == 0 || heads == 0 || self.offset + ((batch * self.rows - 1) * self.row_stride + (heads - 1) * self.head_stride + d) <= self.data.len()
    }

    /// The rows of (batch, head) in place: the data from its first row on, and the row stride.
    fn head_rows(&self, batch: usize, head: usize) -> (&'a [f32], usize) {
        (&self.data[self.offset + batch * self.rows * self.row_stride + head * self.head_stride..], self.row_stride)
    }

    // buf: the rows of (batch, head) one after another, [rows, d].
    fn gather(&self, batch: usize, head: usize, d: usize, buf: &mut Vec<f32>) {
        buf.resize(self.rows * d, 0.0);
        let first = self.offset + batch * self.rows * self.row_stride + head * self.head_stride;
        for (i, dst) in buf.chunks_exact_mut(d).enumerate() {
            copy_row(&self.data[first + i * self.row_stride..][..d], dst);
        }
    }
}

/// `dst = src` for one head's row: in 16-float blocks the compiler turns into vector moves (a
/// `memcpy` call per row of 16 to 80 floats cost more than the copy itself).
#[inline(always)]
fn copy_row(src: &[f32], dst: &mut [f32]) {
    let mut d16 = dst.chunks_exact_mut(16);
    let mut s16 = src.chunks_exact(16);
    for (d, s) in (&mut d16).zip(&mut s16) {
        let block: &[f32; 16] = s.try_into().expect("16 floats");
        let out: &mut [f32; 16] = d.try_into().expect("16 floats");
        *out = *block;
    }
    for (d, &s) in d16.into_remainder().iter_mut().zip(s16.remainder()) {
        *d = s;
    }
}

/// [`attention`] on operands whose heads are still merged into the channels (as the projections
/// write them), output merged the same way: each task gathers its batch-head's queries, keys and
/// values into per-thread buffers (a few tens of KiB, cache-resident), runs the same per-head
/// code as [`attention`] on them, and writes its rows into the merged output. This replaces the
/// whole-tensor passes through memory that split the heads (a permute per operand, plus three
/// copies to separate q, k and v when they come from one projection) and merge them again,
/// which cost TinyViT's windowed blocks more than the attention itself. The arithmetic is
/// exactly [`attention`]'s, so the results are bit-identical. Batch-head `b · heads + h` is the
/// index the bias sees.
// q: nq = q.rows rows per batch element; k, v: nk = k.rows; out is [batch, nq, heads, d].
#[allow(clippy::too_many_arguments)]
pub fn attention_heads(q: HeadsView, k: HeadsView, v: HeadsView, batch: usize, heads: usize, d: usize, scale: f32, bias: Bias, out: &mut [f32]) {
    let (bh, nq, nk) = (batch * heads, q.rows, k.rows);
    assert!(q.fits(batch, heads, d) && k.fits(batch, heads, d) && v.fits(batch, heads, d) && v.rows == nk, "attention_heads: q, k or v does not hold [batch, rows, heads, d]");
    assert_eq!(out.len(), bh * nq * d, "attention_heads: out is not [batch, nq, heads, d]");
    check_bias(bias, bh, nq, nk);
    if out.is_empty() || nk == 0 {
        out.fill(f32::NAN);
        return;
    }
    let isa = crate::simd::active();
    // Queries are read in place, row by row with the merged tensor's stride, and so are keys
    // and values on the online path (gathering them was a twentieth of a LiteMedSAM decode:
    // 4096 keys per head, three times); the short-key path takes its few keys contiguous.
    let gather_kv = takes_short_keys(isa, nk);
    let out_ptr = SharedOut(out.as_mut_ptr());
    (0..bh).into_par_iter().for_each_init(HeadScratch::default, |s, b| {
        let (batch_index, head) = (b / heads, b % heads);
        let (q_rows, ldq) = q.head_rows(batch_index, head);
        let ((k_rows, ldk), (v_rows, ldv)) = if gather_kv {
            k.gather(batch_index, head, d, &mut s.k);
            v.gather(batch_index, head, d, &mut s.v);
            ((&s.k[..], d), (&s.v[..], d))
        } else {
            (k.head_rows(batch_index, head), v.head_rows(batch_index, head))
        };
        // Every element is written by the head's run: grow, never clear.
        s.out.resize(nq * d, 0.0);
        Head { q: q_rows, ldq, k: k_rows, v: v_rows, ldk, ldv, b, nq, nk, d, scale, bias }.run(isa, &mut s.buffers, &mut s.out);
        for (i, row) in s.out.chunks_exact(d).enumerate() {
            // SAFETY: batch-head b alone writes row i's d floats at this head's place in the
            // merged output, inside `out` (its length was checked above).
            let dst = unsafe { std::slice::from_raw_parts_mut(out_ptr.ptr().add(((batch_index * nq + i) * heads + head) * d), d) };
            copy_row(row, dst);
        }
    });
}

/// [`attention_heads`] on the output of one fused `q | k | v` projection.
// qkv is [batch, n, heads, 3, d]; out is [batch, n, heads, d].
#[allow(clippy::too_many_arguments)]
pub fn attention_packed(qkv: &[f32], batch: usize, n: usize, heads: usize, d: usize, scale: f32, bias: Bias, out: &mut [f32]) {
    assert_eq!(qkv.len(), batch * heads * n * 3 * d, "attention_packed: qkv is not [batch, n, heads, 3, d]");
    let part = |p| HeadsView::packed_part(qkv, n, heads, d, p);
    attention_heads(part(0), part(1), part(2), batch, heads, d, scale, bias, out);
}

/// Per-thread buffers, reused across tasks.
#[derive(Default)]
struct Scratch {
    /// `[rows, KEY_BLOCK]` scores, then probabilities, of the current key block.
    scores: Vec<f32>,
    /// `[d, KEY_BLOCK]`: the current key block, transposed.
    keys_t: Vec<f32>,
    /// `[rows, d]` unnormalised outputs.
    acc: Vec<f32>,
    running_max: Vec<f32>,
    running_sum: Vec<f32>,
}

/// Per-thread buffers of [`attention_heads`]: one batch-head's keys and values where the
/// short-key path needs them gathered, and its output rows before they are scattered into the
/// merged layout.
#[derive(Default)]
struct HeadScratch {
    k: Vec<f32>,
    v: Vec<f32>,
    out: Vec<f32>,
    buffers: HeadBuffers,
}

/// What either per-head path needs between calls on one thread.
#[derive(Default)]
struct HeadBuffers {
    online: Scratch,
    #[cfg(target_arch = "x86_64")]
    short: small_avx512::Scratch,
}

/// One batch-head's contiguous operands: what [`attention_heads`] runs per task on the calling
/// thread, by the same code [`run_tasks`] picks for the shape (the short-key AVX-512 path's
/// methods are in `small_avx512`).
struct Head<'a> {
    /// Row `i` at `q[i * ldq..][..d]`.
    q: &'a [f32],
    ldq: usize,
    /// Row `j` at `k[j * ldk..][..d]`, `v[j * ldv..][..d]`; the short-key path takes only
    /// contiguous rows (`ld = d`).
    k: &'a [f32],
    v: &'a [f32],
    ldk: usize,
    ldv: usize,
    b: usize,
    nq: usize,
    nk: usize,
    d: usize,
    scale: f32,
    bias: Bias<'a>,
}

impl Head<'_> {
    // out is [nq, d].
    fn run(&self, isa: Isa, s: &mut HeadBuffers, out: &mut [f32]) {
        let (nq, nk, d) = (self.nq, self.nk, self.d);
        #[cfg(target_arch = "x86_64")]
        if takes_short_keys(isa, nk) {
            assert!(self.ldk == d && self.ldv == d, "the short-key path reads contiguous keys and values");
            // SAFETY: `isa` is one the CPU supports; the caller checked the shapes, d > 0.
            unsafe { self.run_short_keys(&mut s.short, 0..nq, out) };
            return;
        }
        for (block, out_block) in out.chunks_mut(QUERY_BLOCK * d).enumerate() {
            let task = Task {
                q: &self.q[block * QUERY_BLOCK * self.ldq..],
                ldq: self.ldq,
                k: self.k,
                v: self.v,
                ldk: self.ldk,
                ldv: self.ldv,
                b: self.b,
                first_query: block * QUERY_BLOCK,
                nq,
                nk,
                d,
                scale: self.scale,
                bias: self.bias,
            };
            task.run_at(isa, &mut s.online, out_block);
        }
    }
}

/// The output pointer shared by tasks that write disjoint parts of it.
#[derive(Clone, Copy)]
pub(crate) struct SharedOut(pub(crate) *mut f32);
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// The pointer (a method, so that closures capture the `Sync` wrapper, not the raw field).
    pub(crate) fn ptr(self) -> *mut f32 {
        self.0
    }
}

/// `acc += Σ_j probs[j] · values[j]`, walking `acc` in register-sized chunks so that each chunk
/// is loaded and stored once per key block instead of once per key.
// probs is [keys], values holds row j at values[j * ld..][..d], acc is [d].
#[inline(always)]
fn accumulate_values(probs: &[f32], values: &[f32], ld: usize, d: usize, acc: &mut [f32]) {
    let mut c0 = 0;
    while c0 + 32 <= d {
        accumulate_chunk::<32>(probs, values, ld, c0, acc);
        c0 += 32;
    }
    // A 16-float chunk in registers too: SAM's decoder has 16-wide heads, which went through
    // the tail loop below, loading and storing `acc` once per key (7% of a LiteMedSAM decode).
    if c0 + 16 <= d {
        accumulate_chunk::<16>(probs, values, ld, c0, acc);
        c0 += 16;
    }
    if c0 < d {
        let tail = &mut acc[c0..];
        for (j, &prob) in probs.iter().enumerate() {
            for (a, &vv) in tail.iter_mut().zip(&values[j * ld + c0..j * ld + d]) {
                *a += prob * vv;
            }
        }
    }
}

/// [`accumulate_values`] on the `CHUNK` floats of `acc` from `c0`, held in registers over all
/// keys.
#[inline(always)]
fn accumulate_chunk<const CHUNK: usize>(probs: &[f32], values: &[f32], ld: usize, c0: usize, acc: &mut [f32]) {
    let mut chunk: [f32; CHUNK] = acc[c0..c0 + CHUNK].try_into().unwrap();
    for (j, &prob) in probs.iter().enumerate() {
        let v: &[f32; CHUNK] = values[j * ld + c0..][..CHUNK].try_into().unwrap();
        for (a, &vv) in chunk.iter_mut().zip(v) {
            *a += prob * vv;
        }
    }
    acc[c0..c0 + CHUNK].copy_from_slice(&chunk);
}

/// One batch-head's block of queries.
struct Task<'a> {
    /// This block's queries, row `i` at `q[i * ldq..][..d]`.
    q: &'a [f32],
    ldq: usize,
    /// This batch-head's `nk` keys and values, row `j` at `k[j * ldk..][..d]` and
    /// `v[j * ldv..][..d]` (`ld = d` when contiguous, `heads · d` read in place from a tensor
    /// whose heads are merged into the channels).
    k: &'a [f32],
    v: &'a [f32],
    ldk: usize,
    ldv: usize,
    b: usize,
    first_query: usize,
    nq: usize,
    nk: usize,
    d: usize,
    scale: f32,
    bias: Bias<'a>,
}

impl Task<'_> {
    /// [`Task::run`] built for `isa` (one `simd::supported` lists).
    // out is [rows, d].
    fn run_at(&self, isa: Isa, scratch: &mut Scratch, out: &mut [f32]) {
        match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `isa` is one the CPU supports (`simd::supported`).
            Isa::Avx512 => unsafe { self.run_avx512(scratch, out) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Isa::Avx2Fma => unsafe { self.run_avx(scratch, out) },
            _ => self.run(scratch, out),
        }
    }

    /// [`Task::run`] compiled with AVX2 and FMA.
    // out is [rows, d].
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run_avx(&self, scratch: &mut Scratch, out: &mut [f32]) {
        self.run(scratch, out)
    }

    /// [`Task::run`] compiled with AVX-512: the 64-key score block and the 32-wide output chunks
    /// are four and two zmm registers (bit-identical to the AVX2 build: no contraction).
    // out is [rows, d].
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn run_avx512(&self, scratch: &mut Scratch, out: &mut [f32]) {
        self.run(scratch, out)
    }

    /// Online softmax over all key blocks, then normalisation into `out`.
    // out is [rows, d].
    #[inline(always)]
    fn run(&self, s: &mut Scratch, out: &mut [f32]) {
        let d = self.d;
        let rows = out.len() / d;
        s.acc.clear();
        s.acc.resize(rows * d, 0.0);
        s.running_max.clear();
        s.running_max.resize(rows, f32::NEG_INFINITY);
        s.running_sum.clear();
        s.running_sum.resize(rows, 0.0);
        s.scores.resize(rows * KEY_BLOCK, 0.0);
        s.keys_t.resize(d * KEY_BLOCK, 0.0);

        for key0 in (0..self.nk).step_by(KEY_BLOCK) {
            let keys = KEY_BLOCK.min(self.nk - key0);
            // Transpose the key block so that the score loop runs over contiguous keys (register
            // transposes where the CPU has AVX-512: element by element it was a third of the
            // mask decoder's token-to-image attention, 7 queries against 4096 keys).
            crate::transpose::transpose_block(&self.k[key0 * self.ldk..], self.ldk, &mut s.keys_t, KEY_BLOCK, keys, d);
            for i in 0..rows {
                // A whole block of scores fits in registers: accumulate there, store once.
                let mut block = [0.0f32; KEY_BLOCK];
                for (p, &qv) in self.q[i * self.ldq..][..d].iter().enumerate() {
                    let kt: &[f32; KEY_BLOCK] = s.keys_t[p * KEY_BLOCK..][..KEY_BLOCK].try_into().unwrap();
                    for (sc, &kv) in block.iter_mut().zip(kt) {
                        *sc += qv * kv;
                    }
                }
                let scores = &mut s.scores[i * KEY_BLOCK..][..keys];
                for (sc, &b) in scores.iter_mut().zip(&block) {
                    *sc = b * self.scale;
                }
                self.add_bias(self.first_query + i, key0, scores);

                // Maximum and sum over 16 lanes, then across them: one running value each was a
                // chain of dependent operations per key, slower than the exponentials (the
                // decoder's 7 queries against 4096 keys spend most of their time here).
                let mut lane_max = [f32::NEG_INFINITY; REDUCE_LANES];
                for chunk in scores.chunks(REDUCE_LANES) {
                    for (m, &x) in lane_max.iter_mut().zip(chunk) {
                        *m = m.max(x);
                    }
                }
                let block_max = lane_max.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                let new_max = s.running_max[i].max(block_max);
                if new_max == f32::NEG_INFINITY {
                    continue; // every score so far is -inf: nothing to accumulate yet
                }
                // The old maximum is at most the new one, so the vectorisable exponential serves
                // (libm's `expf` was a call per row and key block).
                let rescale = exp_nonpositive(s.running_max[i] - new_max);
                s.running_max[i] = new_max;
                let mut lane_sum = [0.0f32; REDUCE_LANES];
                for chunk in scores.chunks_mut(REDUCE_LANES) {
                    for (l, sc) in lane_sum.iter_mut().zip(chunk) {
                        *sc = exp_nonpositive(*sc - new_max);
                        *l += *sc;
                    }
                }
                let block_sum: f32 = lane_sum.iter().sum();
                s.running_sum[i] = s.running_sum[i] * rescale + block_sum;
                let acc = &mut s.acc[i * d..][..d];
                if rescale != 1.0 {
                    for a in acc.iter_mut() {
                        *a *= rescale;
                    }
                }
                accumulate_values(scores, &self.v[key0 * self.ldv..], self.ldv, d, acc);
            }
        }
        for i in 0..rows {
            let inv = 1.0 / s.running_sum[i];
            for (o, &a) in out[i * d..][..d].iter_mut().zip(&s.acc[i * d..][..d]) {
                *o = a * inv;
            }
        }
    }

    /// Adds the bias of query `query` against keys `key0 ..` to `scores`.
    // scores is [keys] for keys key0 .. key0 + scores.len().
    #[inline(always)]
    fn add_bias(&self, query: usize, key0: usize, scores: &mut [f32]) {
        match self.bias {
            Bias::None => {}
            Bias::Table { table, heads } => {
                let head = self.b % heads;
                let row = &table[(head * self.nq + query) * self.nk + key0..][..scores.len()];
                for (sc, &t) in scores.iter_mut().zip(row) {
                    *sc += t;
                }
            }
            Bias::RelPos { rel_h, rel_w, kh, kw } => {
                let row_h = &rel_h[(self.b * self.nq + query) * kh..][..kh];
                let row_w = &rel_w[(self.b * self.nq + query) * kw..][..kw];
                let (mut y, mut x) = (key0 / kw, key0 % kw);
                for sc in scores.iter_mut() {
                    *sc += row_h[y] + row_w[x];
                    x += 1;
                    if x == kw {
                        x = 0;
                        y += 1;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn rng() -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(rand::random())
    }

    fn random(rng: &mut ChaCha8Rng, n: usize, magnitude: f32) -> Vec<f32> {
        (0..n).map(|_| rng.gen_range(-magnitude..magnitude)).collect()
    }

    /// Plain two-pass softmax attention in f64.
    // q is [bh, nq, d], k and v are [bh, nk, d]; returns [bh, nq, d].
    #[allow(clippy::too_many_arguments)]
    fn naive(q: &[f32], k: &[f32], v: &[f32], bh: usize, nq: usize, nk: usize, d: usize, scale: f32, bias: &dyn Fn(usize, usize, usize) -> f64) -> Vec<f64> {
        let mut out = vec![0.0f64; bh * nq * d];
        for b in 0..bh {
            for i in 0..nq {
                let scores: Vec<f64> = (0..nk)
                    .map(|j| {
                        let dot: f64 = (0..d).map(|p| q[(b * nq + i) * d + p] as f64 * k[(b * nk + j) * d + p] as f64).sum();
                        scale as f64 * dot + bias(b, i, j)
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f64 = weights.iter().sum();
                for p in 0..d {
                    out[(b * nq + i) * d + p] = (0..nk).map(|j| weights[j] * v[(b * nk + j) * d + p] as f64).sum::<f64>() / total;
                }
            }
        }
        out
    }

    fn relative_error(out: &[f32], reference: &[f64]) -> f64 {
        let diff: f64 = out.iter().zip(reference).map(|(&o, &r)| (o as f64 - r).powi(2)).sum();
        let norm: f64 = reference.iter().map(|r| r * r).sum();
        (diff / norm).sqrt()
    }

    enum Kind {
        None,
        Table,
        RelPos,
    }

    fn check(kind: Kind, bh: usize, nq: usize, kh: usize, kw: usize, d: usize, magnitude: f32) {
        let nk = kh * kw;
        let mut rng = rng();
        let q = random(&mut rng, bh * nq * d, magnitude);
        let k = random(&mut rng, bh * nk * d, magnitude);
        let v = random(&mut rng, bh * nk * d, 1.0);
        let heads = 3;
        let table = random(&mut rng, heads * nq * nk, 2.0);
        let rel_h = random(&mut rng, bh * nq * kh, 2.0);
        let rel_w = random(&mut rng, bh * nq * kw, 2.0);
        let scale = 1.0 / (d as f32).sqrt();
        let (bias, reference) = match kind {
            Kind::None => (Bias::None, naive(&q, &k, &v, bh, nq, nk, d, scale, &|_, _, _| 0.0)),
            Kind::Table => {
                (Bias::Table { table: &table, heads }, naive(&q, &k, &v, bh, nq, nk, d, scale, &|b, i, j| table[((b % heads) * nq + i) * nk + j] as f64))
            }
            Kind::RelPos => (
                Bias::RelPos { rel_h: &rel_h, rel_w: &rel_w, kh, kw },
                naive(&q, &k, &v, bh, nq, nk, d, scale, &|b, i, j| rel_h[(b * nq + i) * kh + j / kw] as f64 + rel_w[(b * nq + i) * kw + j % kw] as f64),
            ),
        };
        let mut out = vec![f32::NAN; bh * nq * d];
        attention(&q, &k, &v, bh, nq, nk, d, scale, bias, &mut out);
        let err = relative_error(&out, &reference);
        // f32 rounding of a score grows with its size (products of magnitude², summed over d):
        // at magnitude 30 a score of several hundred carries ~1e-4 absolute rounding, which the
        // softmax turns into relative output error of the same order. Scale the bound with it.
        let tolerance = 1e-5 * (magnitude * magnitude / 100.0).max(1.0) as f64;
        assert!(err <= tolerance, "bh={bh} nq={nq} nk={nk} d={d} magnitude={magnitude}: relative error {err} > {tolerance}");
    }

    #[test]
    fn no_bias_matches_naive() {
        for d in [16, 32, 64, 80] {
            check(Kind::None, 2, 70, 9, 11, d, 1.0);
        }
        check(Kind::None, 1, 1, 1, 1, 16, 1.0);
    }

    #[test]
    fn table_bias_matches_naive() {
        for d in [16, 32, 64, 80] {
            check(Kind::Table, 5, 49, 7, 7, d, 1.0);
        }
        check(Kind::Table, 4, 33, 5, 13, 32, 1.0);
    }

    #[test]
    fn relative_position_bias_matches_naive() {
        for d in [16, 32, 64, 80] {
            check(Kind::RelPos, 3, 40, 8, 12, d, 1.0);
        }
        check(Kind::RelPos, 2, 100, 14, 14, 64, 1.0);
    }

    #[test]
    fn large_scores_stay_finite_and_accurate() {
        // Scores of several hundred: a naive exp would overflow f32.
        check(Kind::None, 2, 37, 10, 10, 64, 30.0);
        check(Kind::RelPos, 2, 37, 10, 10, 32, 30.0);
    }

    #[test]
    fn every_supported_build_matches_naive() {
        // `attention` picks the widest build the CPU has, so every level is run directly.
        let mut rng = rng();
        let (bh, nq, nk, d) = (2, 45, 70, 24);
        let q = random(&mut rng, bh * nq * d, 1.0);
        let k = random(&mut rng, bh * nk * d, 1.0);
        let v = random(&mut rng, bh * nk * d, 1.0);
        let reference = naive(&q, &k, &v, bh, nq, nk, d, 0.3, &|_, _, _| 0.0);
        for isa in crate::simd::supported() {
            let mut out = vec![f32::NAN; bh * nq * d];
            run_tasks(&q, &k, &v, nq, nk, d, 0.3, Bias::None, isa, &mut out);
            let err = relative_error(&out, &reference);
            assert!(err <= 1e-5, "{isa:?}: relative error {err}");
        }
    }

    /// The AVX-512 short-key path against the f64 reference and against the online path, on
    /// key counts around its 16-lane chunks and its limit, head sizes with ragged chunks, and
    /// both bias kinds (the online path is forced by naming the portable build).
    #[test]
    fn short_key_path_matches_naive_and_online_on_edge_shapes() {
        if !crate::simd::supported().contains(&Isa::Avx512) {
            eprintln!("SKIP: this CPU has no AVX-512F");
            return;
        }
        let mut rng = rng();
        for &(kh, kw) in &[(1, 1), (3, 5), (4, 4), (1, 17), (7, 7), (14, 14), (15, 17), (16, 16), (1, 257)] {
            for &(nq, d) in &[(1, 8), (49, 32), (70, 64), (131, 80), (5, 100)] {
                let nk = kh * kw;
                let bh = 3;
                let q = random(&mut rng, bh * nq * d, 1.5);
                let k = random(&mut rng, bh * nk * d, 1.5);
                let v = random(&mut rng, bh * nk * d, 1.0);
                let rel_h = random(&mut rng, bh * nq * kh, 2.0);
                let rel_w = random(&mut rng, bh * nq * kw, 2.0);
                let table = random(&mut rng, 2 * nq * nk, 2.0);
                let biases = [
                    (Bias::RelPos { rel_h: &rel_h, rel_w: &rel_w, kh, kw }, naive(&q, &k, &v, bh, nq, nk, d, 0.2, &|b, i, j| rel_h[(b * nq + i) * kh + j / kw] as f64 + rel_w[(b * nq + i) * kw + j % kw] as f64)),
                    (Bias::Table { table: &table, heads: 2 }, naive(&q, &k, &v, bh, nq, nk, d, 0.2, &|b, i, j| table[((b % 2) * nq + i) * nk + j] as f64)),
                ];
                for (bias, reference) in biases {
                    let mut short = vec![f32::NAN; bh * nq * d];
                    run_tasks(&q, &k, &v, nq, nk, d, 0.2, bias, Isa::Avx512, &mut short);
                    let mut online = vec![f32::NAN; bh * nq * d];
                    run_tasks(&q, &k, &v, nq, nk, d, 0.2, bias, Isa::Portable, &mut online);
                    let (err, err_online) = (relative_error(&short, &reference), relative_error(&online, &reference));
                    assert!(err <= 1e-5, "nk={nk} ({kh}x{kw}) nq={nq} d={d}: relative error {err} (online path: {err_online})");
                }
            }
        }
    }

    /// `attention_packed` against `attention` on q, k and v split out of the same packed tensor
    /// by hand (and its output merged by hand): the same per-head code on the same numbers, so
    /// bit for bit. Short windows (the AVX-512 short-key path where the CPU has it), a sequence
    /// past that path's limit (the online path), ragged head sizes, every bias kind.
    #[test]
    fn packed_qkv_matches_split_heads_bit_for_bit() {
        let mut rng = rng();
        for &(batch, kh, kw, heads, d) in &[(3, 7, 7, 4, 32), (2, 14, 14, 5, 32), (1, 1, 1, 2, 8), (2, 3, 5, 3, 20), (1, 17, 17, 2, 24)] {
            let n = kh * kw;
            let bh = batch * heads;
            let qkv = random(&mut rng, batch * n * heads * 3 * d, 1.5);
            // [batch, n, heads, 3, d] -> part p as [batch * heads, n, d].
            let part = |p: usize| -> Vec<f32> {
                let mut t = Vec::with_capacity(bh * n * d);
                for b in 0..bh {
                    for i in 0..n {
                        t.extend_from_slice(&qkv[((((b / heads) * n + i) * heads + b % heads) * 3 + p) * d..][..d]);
                    }
                }
                t
            };
            let (q, k, v) = (part(0), part(1), part(2));
            let table = random(&mut rng, heads * n * n, 2.0);
            let rel_h = random(&mut rng, bh * n * kh, 2.0);
            let rel_w = random(&mut rng, bh * n * kw, 2.0);
            for bias in [Bias::None, Bias::Table { table: &table, heads }, Bias::RelPos { rel_h: &rel_h, rel_w: &rel_w, kh, kw }] {
                let mut split = vec![f32::NAN; bh * n * d];
                attention(&q, &k, &v, bh, n, n, d, 0.3, bias, &mut split);
                let mut packed = vec![f32::NAN; bh * n * d];
                attention_packed(&qkv, batch, n, heads, d, 0.3, bias, &mut packed);
                for b in 0..bh {
                    for i in 0..n {
                        let expected = &split[(b * n + i) * d..][..d];
                        let got = &packed[(((b / heads) * n + i) * heads + b % heads) * d..][..d];
                        let same = expected.iter().zip(got).all(|(e, g)| e.to_bits() == g.to_bits());
                        assert!(same, "batch {batch} n {n} heads {heads} d {d} {bias:?}: batch-head {b} row {i}: {got:?} != {expected:?}");
                    }
                }
            }
        }
    }

    /// `attention_heads` on separate heads-merged q, k and v (the mask decoder's projections,
    /// queries and keys of different lengths, both attention paths) against `attention` on the
    /// same numbers split by hand: bit for bit.
    #[test]
    fn merged_heads_match_split_heads_bit_for_bit() {
        let mut rng = rng();
        for &(batch, nq, nk, heads, d) in &[(1, 7, 70, 8, 16), (1, 70, 7, 8, 16), (2, 5, 300, 3, 32), (1, 1, 1, 1, 8)] {
            let bh = batch * heads;
            let (q, k, v) = (random(&mut rng, batch * nq * heads * d, 1.5), random(&mut rng, batch * nk * heads * d, 1.5), random(&mut rng, batch * nk * heads * d, 1.0));
            // [batch, rows, heads, d] -> [batch * heads, rows, d].
            let split = |t: &[f32], rows: usize| -> Vec<f32> {
                (0..bh).flat_map(|b| (0..rows).flat_map(move |i| (0..d).map(move |p| (b, i, p)))).map(|(b, i, p)| t[(((b / heads) * rows + i) * heads + b % heads) * d + p]).collect()
            };
            let mut expected = vec![f32::NAN; bh * nq * d];
            attention(&split(&q, nq), &split(&k, nk), &split(&v, nk), bh, nq, nk, d, 0.25, Bias::None, &mut expected);
            let mut got = vec![f32::NAN; bh * nq * d];
            let view = |t, rows| HeadsView::merged(t, rows, heads, d);
            attention_heads(view(&q, nq), view(&k, nk), view(&v, nk), batch, heads, d, 0.25, Bias::None, &mut got);
            assert_eq!(split(&got, nq).iter().map(|x| x.to_bits()).collect::<Vec<_>>(), expected.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), "batch {batch} nq {nq} nk {nk} heads {heads} d {d}");
        }
    }

    /// The contract the CUDA kernel (kernels/attention.cu) mirrors: a query row whose scores are
    /// all -inf gives NaN (as PyTorch), the other rows are unaffected.
    #[test]
    fn a_row_of_minus_infinity_scores_gives_nan_and_leaves_the_others() {
        let mut rng = rng();
        let (nq, nk, d) = (3, 70, 16);
        let q = random(&mut rng, nq * d, 1.0);
        let k = random(&mut rng, nk * d, 1.0);
        let v = random(&mut rng, nk * d, 1.0);
        let mut table = vec![0.0f32; nq * nk];
        table[nk..2 * nk].fill(f32::NEG_INFINITY);
        let mut out = vec![0.0f32; nq * d];
        attention(&q, &k, &v, 1, nq, nk, d, 0.5, Bias::Table { table: &table, heads: 1 }, &mut out);
        assert!(out[d..2 * d].iter().all(|x| x.is_nan()), "the masked row");
        assert!(out[..d].iter().chain(&out[2 * d..]).all(|x| x.is_finite()), "the other rows");
    }

    #[test]
    fn empty_inputs_are_a_no_op() {
        let mut out: Vec<f32> = vec![];
        attention(&[], &[], &[], 0, 4, 4, 8, 1.0, Bias::None, &mut out);
        attention(&[], &[0.0; 16], &[0.0; 16], 1, 0, 2, 8, 1.0, Bias::None, &mut out);
    }

    /// Not a pass/fail test: the short-key AVX-512 path against the online path compiled for
    /// AVX2 on TinyViT's windows (LiteMedSAM stage 1: 361 windows x 4 heads of 49 tokens; stage 2:
    /// 25 x 5 of 196), alternating, medians of 7 (`cargo test -p minisam-kernels --release
    /// window_throughput -- --ignored --nocapture`).
    #[test]
    #[ignore]
    fn window_throughput() {
        if !crate::simd::supported().contains(&Isa::Avx512) {
            eprintln!("SKIP: this CPU has no AVX-512F");
            return;
        }
        let mut rng = rng();
        for (bh, window, d) in [(361 * 4, 7, 32), (25 * 5, 14, 32)] {
            let n = window * window;
            let q = random(&mut rng, bh * n * d, 1.0);
            let k = random(&mut rng, bh * n * d, 1.0);
            let v = random(&mut rng, bh * n * d, 1.0);
            let table = random(&mut rng, 4 * n * n, 1.0);
            let bias = Bias::Table { table: &table, heads: 4 };
            let mut out = vec![0.0f32; bh * n * d];
            let mut times = [Vec::new(), Vec::new()];
            for _ in 0..7 {
                for (slot, isa) in [Isa::Avx512, Isa::Avx2Fma].into_iter().enumerate() {
                    let start = std::time::Instant::now();
                    run_tasks(&q, &k, &v, n, n, d, 0.2, bias, isa, &mut out);
                    times[slot].push(start.elapsed().as_secs_f64() * 1e3);
                }
            }
            for t in &mut times {
                t.sort_by(f64::total_cmp);
            }
            println!("{bh} x {n} tokens, d={d}, {} threads: short-key AVX-512 {:.2} ms, online (AVX2 build) {:.2} ms", rayon::current_num_threads(), times[0][3], times[1][3]);
        }
    }

    /// Not a pass/fail test: prints the throughput (`cargo test -p minisam-kernels --release
    /// attention::tests::throughput -- --ignored --nocapture`).
    #[test]
    #[ignore]
    fn throughput() {
        let mut rng = rng();
        let (bh, n, d) = (2, 4096, 64);
        let q = random(&mut rng, bh * n * d, 1.0);
        let k = random(&mut rng, bh * n * d, 1.0);
        let v = random(&mut rng, bh * n * d, 1.0);
        let mut out = vec![0.0f32; bh * n * d];
        let start = std::time::Instant::now();
        attention(&q, &k, &v, bh, n, n, d, 0.125, Bias::None, &mut out);
        let secs = start.elapsed().as_secs_f64();
        println!(
            "attention {bh}x{n}x{n}x{d}: {secs:.3} s, {:.1} GFLOP/s on {} threads",
            4.0 * (bh * n * n * d) as f64 / secs / 1e9,
            rayon::current_num_threads()
        );
    }
}
