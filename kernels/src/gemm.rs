//! Matrix products: the engine's hot loop.
//!
//! [`linear`] computes `act(x · wᵀ + bias)` with `w` in its stored precision (f32, fp16 or NF4).
//! Two paths, by the number of rows of `x`:
//! - from [`PACKED_MIN_ROWS`] rows on (every encoder layer), the blocked GEMM of
//!   `crate::packed_gemm`: the weight is dequantised row by row into micro-kernel panels once
//!   per call (`n·k` work against `m·n·k` multiply-adds) and bias and activation run in the
//!   epilogue; AVX-512 / AVX2 / NEON / portable micro-kernels chosen at run time
//!   (`crate::simd`);
//! - below it (the decoder's handful of tokens), the tile-by-tile path: each task dequantises a
//!   tile of [`TILE_N`] weight rows and takes register-blocked dot products against the rows of
//!   `x` (an AVX2+FMA intrinsics copy where the CPU has it), so a weight read by few rows is never
//!   packed whole.
//!
//! [`matmul`] (both operands activations) reads a row-major right-hand side in place on the
//! blocked GEMM, and otherwise reuses `linear` with an f32 "weight".

use rayon::prelude::*;

use std::cell::RefCell;

use crate::activation::{self, Activation};
use crate::packed_gemm::{self, BOperand};
use crate::simd::{self, Isa};
use crate::weights::MatrixRef;

/// From this many rows of `x` on, `linear` packs the weight into micro-kernel panels and runs the
/// blocked GEMM; below it (the decoder's few tokens) packing the whole weight would cost more
/// than the product, so the tile-by-tile dot-product path runs instead.
pub const PACKED_MIN_ROWS: usize = 32;

thread_local! {
    /// The packed weight of the `linear` call running on this thread, reused across calls.
    static PACKED_WEIGHT: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `linear` on the blocked GEMM: the weight is dequantised and packed once per call (its cost
/// is `n·k`, against `m·n·k` multiply-adds), bias and activation fused into the epilogue.
// Shapes as in `linear`.
#[allow(clippy::too_many_arguments)]
fn linear_packed(isa: Isa, x: &[f32], m: usize, k: usize, w: MatrixRef, n: usize, bias: Option<&[f32]>, act: Activation, out: &mut [f32]) {
    let epilogue = |_row: usize, col0: usize, seg: &mut [f32]| {
        if let Some(b) = bias {
            let len = seg.len();
            for (v, &bv) in seg.iter_mut().zip(&b[col0..col0 + len]) {
                *v += bv;
            }
        }
        activation::apply(act, seg);
    };
    let len = packed_gemm::packed_b_len(isa, n, k);
    let mut run = |packed: &mut Vec<f32>| {
        if packed.len() < len {
            packed.resize(len, 0.0);
        }
        packed_gemm::pack_b_transposed(isa, w, n, k, &mut packed[..len]);
        packed_gemm::gemm(isa, m, n, k, x, k, BOperand::Packed(&packed[..len]), out, n, &epilogue);
    };
    // A second call on this thread while the first waits inside rayon (two callers sharing one
    // pool) finds the buffer taken and packs into its own.
    PACKED_WEIGHT.with(|cell| match cell.try_borrow_mut() {
        Ok(mut packed) => run(&mut packed),
        Err(_) => run(&mut Vec::new()),
    });
}

/// Output features per task: the dequantised tile is `TILE_N × k` f32 (≤ 1 MiB for k = 5120).
const TILE_N: usize = 48;
/// Bounds on the rows of `x` per task: more rows amortise dequantising the tile over more
/// products, fewer give the threads enough tasks when `n` has few tiles.
const MIN_ROWS_PER_TASK: usize = 32;
const MAX_ROWS_PER_TASK: usize = 256;
/// Tasks wanted per thread, so that uneven tasks still balance.
const TASKS_PER_THREAD: usize = 4;
/// Depth of one pass over `k`, so that the `TILE_N × KC` slice of the tile stays in L2.
const KC: usize = 256;
/// Micro-kernel: rows of `x` and rows of `w` per block, and the width of the partial sums.
const MR: usize = 4;
const NR: usize = 3;
const LANES: usize = 8;

/// Batched product of two f32 operands.
// a is [batch, m, k], b is [batch, k, n] (or [batch, n, k] when transpose_b), out is [batch, m, n].
#[allow(clippy::too_many_arguments)]
pub fn matmul(a: &[f32], b: &[f32], batch: usize, m: usize, k: usize, n: usize, transpose_b: bool, out: &mut [f32]) {
    assert_eq!(a.len(), batch * m * k, "matmul: a is not [batch, m, k]");
    assert_eq!(b.len(), batch * k * n, "matmul: b is not [batch, k, n]");
    assert_eq!(out.len(), batch * m * n, "matmul: out is not [batch, m, n]");
    let mut transposed = Vec::new();
    for bi in 0..batch {
        let a_i = &a[bi * m * k..(bi + 1) * m * k];
        let b_i = &b[bi * k * n..(bi + 1) * k * n];
        let out_i = &mut out[bi * m * n..(bi + 1) * m * n];
        if !transpose_b {
            // b is already the row-major [k, n] the blocked GEMM reads: no transpose. Also for
            // a few rows (the decoder's masks: 3 rows against 64K pixel columns), where
            // transposing b into a fresh buffer for the tile path cost 20 times the product.
            packed_gemm::gemm(simd::active(), m, n, k, a_i, k, BOperand::RowMajor { data: b_i, ldb: n }, out_i, n, &|_, _, _| {});
            continue;
        }
        let b_nk: &[f32] = if transpose_b {
            b_i
        } else {
            transposed.resize(k * n, 0.0);
            transpose_into(b_i, k, n, &mut transposed);
            &transposed
        };
        linear(a_i, m, k, MatrixRef::F32(b_nk), n, None, Activation::None, out_i);
    }
}

/// `dst = srcᵀ`, by `crate::transpose` (16x16 register blocks with AVX-512, 32x32 element
/// tiles otherwise).
// src is [rows, cols], dst is [cols, rows].
pub(crate) fn transpose_into(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    crate::transpose::transpose_block(src, cols, dst, rows, rows, cols);
}

/// `out = act(x · wᵀ + bias)`, `w` in torch `Linear` layout and any stored precision.
// x is [m, k], w is [n, k], bias is [n], out is [m, n].
#[allow(clippy::too_many_arguments)]
pub fn linear(x: &[f32], m: usize, k: usize, w: MatrixRef, n: usize, bias: Option<&[f32]>, act: Activation, out: &mut [f32]) {
    assert_eq!(x.len(), m * k, "linear: x is not [m, k]");
    assert_eq!(out.len(), m * n, "linear: out is not [m, n]");
    if let Some(b) = bias {
        assert_eq!(b.len(), n, "linear: bias is not [n]");
    }
    if let MatrixRef::F32(v) = w {
        assert_eq!(v.len(), n * k, "linear: w is not [n, k]");
    }
    if let MatrixRef::F16(v) = w {
        assert_eq!(v.len(), 2 * n * k, "linear: w is not [n, k] fp16");
    }
    if let MatrixRef::Nf4(q) = w {
        if let Err(e) = q.check_len(n * k) {
            panic!("linear: w is not [n, k] NF4: {e}");
        }
    }
    if m == 0 || n == 0 {
        return;
    }
    let isa = simd::active();
    if m >= PACKED_MIN_ROWS {
        linear_packed(isa, x, m, k, w, n, bias, act, out);
        return;
    }
    let tiles = n.div_ceil(TILE_N);
    let wanted_row_blocks = (TASKS_PER_THREAD * rayon::current_num_threads()).div_ceil(tiles);
    let rows_per_task = m.div_ceil(wanted_row_blocks).clamp(MIN_ROWS_PER_TASK, MAX_ROWS_PER_TASK).div_ceil(MR) * MR;
    let row_blocks = m.div_ceil(rows_per_task);
    let out_ptr = SharedOut(out.as_mut_ptr());
    let use_fma = isa >= Isa::Avx2Fma;
    (0..tiles * row_blocks).into_par_iter().for_each_init(Scratch::default, |scratch, task| {
        let tile = task / row_blocks;
        let row_block = task % row_blocks;
        let cols = tile * TILE_N..((tile + 1) * TILE_N).min(n);
        let rows = row_block * rows_per_task..((row_block + 1) * rows_per_task).min(m);
        let task = Task { x, k, w, n, bias, act, rows, cols };
        // SAFETY: tasks cover disjoint (rows, cols) rectangles of out, which outlives the loop.
        unsafe { task.run(scratch, use_fma, out_ptr) };
    });
}

/// The output pointer shared by tasks that write disjoint rectangles.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

/// Per-thread buffers, reused across tasks.
#[derive(Default)]
struct Scratch {
    /// The dequantised rows of `w` for one tile, padded with zero rows to a multiple of `NR`.
    w_tile: Vec<f32>,
    /// `rows × padded tile width` partial sums.
    acc: Vec<f32>,
}

/// One rectangle of the output: `rows` of `x` against the weight rows `cols`.
struct Task<'a> {
    x: &'a [f32],
    k: usize,
    w: MatrixRef<'a>,
    n: usize,
    bias: Option<&'a [f32]>,
    act: Activation,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
}

impl Task<'_> {
    /// Dequantises the tile, accumulates the products, then writes `act(acc + bias)`.
    // out points to [m, n]; this task writes out[rows, cols] only.
    unsafe fn run(&self, scratch: &mut Scratch, use_fma: bool, out: SharedOut) {
        let k = self.k;
        let width = self.cols.len();
        let padded = width.div_ceil(NR) * NR;
        scratch.w_tile.clear();
        scratch.w_tile.resize(padded * k, 0.0);
        self.w.dequantize_range(self.cols.start * k, &mut scratch.w_tile[..width * k]);
        scratch.acc.clear();
        scratch.acc.resize(self.rows.len() * padded, 0.0);

        let x_rows = &self.x[self.rows.start * k..self.rows.end * k];
        if use_fma {
            #[cfg(target_arch = "x86_64")]
            accumulate_fma(x_rows, &scratch.w_tile, k, padded, &mut scratch.acc);
        } else {
            accumulate(x_rows, &scratch.w_tile, k, padded, &mut scratch.acc);
        }

        for (r, acc_row) in self.rows.clone().zip(scratch.acc.chunks_exact_mut(padded)) {
            let row = &mut acc_row[..width];
            if let Some(b) = self.bias {
                for (v, &bv) in row.iter_mut().zip(&b[self.cols.clone()]) {
                    *v += bv;
                }
            }
            activation::apply(self.act, row);
            let dst = std::slice::from_raw_parts_mut(out.0.add(r * self.n + self.cols.start), width);
            dst.copy_from_slice(row);
        }
    }
}

/// [`accumulate`] with an explicit AVX2+FMA micro-kernel (the portable one does not vectorise
/// its lanes reliably).
// Same shapes as `accumulate`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn accumulate_fma(x_rows: &[f32], w_tile: &[f32], k: usize, padded: usize, acc: &mut [f32]) {
    let rows = x_rows.len() / k.max(1);
    assert!(w_tile.len() >= padded * k && acc.len() >= rows * padded);
    for k0 in (0..k).step_by(KC) {
        let kc = KC.min(k - k0);
        let mut r = 0;
        while r < rows {
            let mr = MR.min(rows - r);
            for j in (0..padded).step_by(NR) {
                let w: [*const f32; NR] = std::array::from_fn(|jj| w_tile.as_ptr().add((j + jj) * k + k0));
                let x = x_rows.as_ptr().add(r * k + k0);
                let dst = acc.as_mut_ptr().add(r * padded + j);
                match mr {
                    4 => avx::dot_block::<4>(x, k, w, kc, dst, padded),
                    3 => avx::dot_block::<3>(x, k, w, kc, dst, padded),
                    2 => avx::dot_block::<2>(x, k, w, kc, dst, padded),
                    _ => avx::dot_block::<1>(x, k, w, kc, dst, padded),
                }
            }
            r += mr;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx {
    use super::NR;
    use std::arch::x86_64::*;

    /// `R × NR` dot products of length `kc`, added into `dst`.
    // x points to R rows of stride k (kc readable each), w to NR rows of kc, dst to R rows of
    // stride padded (NR writable each).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_block<const R: usize>(x: *const f32, k: usize, w: [*const f32; NR], kc: usize, dst: *mut f32, padded: usize) {
        let mut sums = [[_mm256_setzero_ps(); NR]; R];
        let full = kc / 8 * 8;
        let mut p = 0;
        while p < full {
            let wv: [__m256; NR] = std::array::from_fn(|jj| _mm256_loadu_ps(w[jj].add(p)));
            for (rr, row_sums) in sums.iter_mut().enumerate() {
                let xv = _mm256_loadu_ps(x.add(rr * k + p));
                for jj in 0..NR {
                    row_sums[jj] = _mm256_fmadd_ps(xv, wv[jj], row_sums[jj]);
                }
            }
            p += 8;
        }
        for (rr, row_sums) in sums.iter().enumerate() {
            for jj in 0..NR {
                let mut total = horizontal_sum(row_sums[jj]);
                for q in full..kc {
                    total += *x.add(rr * k + q) * *w[jj].add(q);
                }
                *dst.add(rr * padded + jj) += total;
            }
        }
    }

    /// The sum of the 8 lanes of `v`.
    // v: 8 lanes.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn horizontal_sum(v: __m256) -> f32 {
        let quad = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
        let single = _mm_add_ss(pair, _mm_shuffle_ps(pair, pair, 1));
        _mm_cvtss_f32(single)
    }
}

/// `acc += x_rows · w_tileᵀ`, in passes of `KC` along `k`.
// x_rows is [rows, k], w_tile is [padded, k] (padded a multiple of NR), acc is [rows, padded].
fn accumulate(x_rows: &[f32], w_tile: &[f32], k: usize, padded: usize, acc: &mut [f32]) {
    let rows = x_rows.len() / k.max(1);
    for k0 in (0..k).step_by(KC) {
        let kc = KC.min(k - k0);
        let mut r = 0;
        while r < rows {
            let mr = MR.min(rows - r);
            for j in (0..padded).step_by(NR) {
                let w: [&[f32]; NR] = std::array::from_fn(|jj| &w_tile[(j + jj) * k + k0..][..kc]);
                match mr {
                    4 => dot_block::<4>(x_rows, k, r, k0, kc, w, acc, padded, j),
                    3 => dot_block::<3>(x_rows, k, r, k0, kc, w, acc, padded, j),
                    2 => dot_block::<2>(x_rows, k, r, k0, kc, w, acc, padded, j),
                    _ => dot_block::<1>(x_rows, k, r, k0, kc, w, acc, padded, j),
                }
            }
            r += mr;
        }
    }
}

/// The micro-kernel: `R × NR` dot products of length `kc`, added into `acc`.
// x_rows is [rows, k] (uses rows r..r+R, columns k0..k0+kc), w holds NR slices of length kc,
// acc is [rows, padded] (updates rows r..r+R, columns j..j+NR).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn dot_block<const R: usize>(x_rows: &[f32], k: usize, r: usize, k0: usize, kc: usize, w: [&[f32]; NR], acc: &mut [f32], padded: usize, j: usize) {
    let x: [&[f32]; R] = std::array::from_fn(|rr| &x_rows[(r + rr) * k + k0..][..kc]);
    let mut sums = [[[0.0f32; LANES]; NR]; R];
    let full = kc / LANES * LANES;
    let mut p = 0;
    while p < full {
        let wv: [&[f32; LANES]; NR] = std::array::from_fn(|jj| w[jj][p..p + LANES].try_into().unwrap());
        for rr in 0..R {
            let xv: &[f32; LANES] = x[rr][p..p + LANES].try_into().unwrap();
            for jj in 0..NR {
                for l in 0..LANES {
                    sums[rr][jj][l] += xv[l] * wv[jj][l];
                }
            }
        }
        p += LANES;
    }
    for rr in 0..R {
        for jj in 0..NR {
            let mut total = sums[rr][jj].iter().sum::<f32>();
            for q in full..kc {
                total += x[rr][q] * w[jj][q];
            }
            acc[(r + rr) * padded + j + jj] += total;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nf4;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn rng() -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(rand::random())
    }

    fn random(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect()
    }

    fn relative_error(out: &[f32], reference: &[f64]) -> f64 {
        assert_eq!(out.len(), reference.len());
        let diff: f64 = out.iter().zip(reference).map(|(&o, &r)| (o as f64 - r).powi(2)).sum();
        let norm: f64 = reference.iter().map(|r| r * r).sum();
        (diff / norm.max(1e-300)).sqrt()
    }

    fn reference_activation(act: Activation, v: f64) -> f64 {
        match act {
            Activation::None => v,
            Activation::Relu => v.max(0.0),
            Activation::Gelu => 0.5 * v * crate::activation::reference::erfc(-v / std::f64::consts::SQRT_2),
        }
    }

    // x is [m, k], w is [n, k] (already dequantised), out [m, n].
    fn naive_linear(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, bias: Option<&[f32]>, act: Activation) -> Vec<f64> {
        let mut out = vec![0.0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = bias.map_or(0.0, |b| b[j] as f64);
                for p in 0..k {
                    s += x[i * k + p] as f64 * w[j * k + p] as f64;
                }
                out[i * n + j] = reference_activation(act, s);
            }
        }
        out
    }

    enum Stored {
        F32(Vec<f32>),
        F16(Vec<u8>),
        Nf4(nf4::Nf4Owned),
    }

    impl Stored {
        fn matrix(&self) -> MatrixRef<'_> {
            match self {
                Stored::F32(v) => MatrixRef::F32(v),
                Stored::F16(b) => MatrixRef::F16(b),
                Stored::Nf4(q) => MatrixRef::Nf4(q.view()),
            }
        }
    }

    fn store(w: &[f32], dtype: &str) -> Stored {
        match dtype {
            "f32" => Stored::F32(w.to_vec()),
            "f16" => Stored::F16(w.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect()),
            _ => Stored::Nf4(nf4::quantize(w)),
        }
    }

    fn check_linear(m: usize, k: usize, n: usize, dtype: &str, with_bias: bool, act: Activation) {
        let mut rng = rng();
        let x = random(&mut rng, m * k);
        let w = random(&mut rng, n * k);
        let bias = random(&mut rng, n);
        let bias = with_bias.then_some(&bias[..]);
        let stored = store(&w, dtype);
        let mut dequantised = vec![0.0f32; n * k];
        stored.matrix().dequantize_range(0, &mut dequantised);
        let reference = naive_linear(&x, m, k, &dequantised, n, bias, act);
        let mut out = vec![f32::NAN; m * n];
        linear(&x, m, k, stored.matrix(), n, bias, act, &mut out);
        let err = relative_error(&out, &reference);
        assert!(err <= 1e-5, "linear m={m} k={k} n={n} {dtype} bias={with_bias} {act:?}: relative error {err}");
    }

    #[test]
    fn linear_every_dtype_bias_and_activation() {
        for dtype in ["f32", "f16", "nf4"] {
            for with_bias in [false, true] {
                for act in [Activation::None, Activation::Relu, Activation::Gelu] {
                    check_linear(37, 100, 53, dtype, with_bias, act);
                }
            }
        }
    }

    #[test]
    fn linear_odd_and_edge_sizes() {
        for &(m, k, n) in &[(1, 1, 1), (1, 7, 1), (2, 3, 5), (5, 65, 49), (129, 257, 97), (3, 513, 47), (130, 64, 96), (4, 300, 3), (1100, 33, 50)] {
            check_linear(m, k, n, "nf4", true, Activation::None);
            check_linear(m, k, n, "f32", false, Activation::Gelu);
        }
    }

    #[test]
    fn portable_kernel_matches_naive() {
        // `linear` picks the AVX2 kernel where it can, so the fallback is checked directly.
        let mut rng = rng();
        for &(rows, k, padded) in &[(7, 300, 9), (1, 5, 3), (4, 520, 48)] {
            let x = random(&mut rng, rows * k);
            let w = random(&mut rng, padded * k);
            let reference = naive_linear(&x, rows, k, &w, padded, None, Activation::None);
            let mut acc = vec![0.0f32; rows * padded];
            accumulate(&x, &w, k, padded, &mut acc);
            let err = relative_error(&acc, &reference);
            assert!(err <= 1e-5, "rows={rows} k={k} padded={padded}: relative error {err}");
        }
    }

    #[test]
    fn linear_empty_is_a_no_op() {
        let mut out: Vec<f32> = vec![];
        linear(&[], 0, 4, MatrixRef::F32(&[0.0; 8]), 2, None, Activation::None, &mut out);
        // k == 0: the product is empty, so the output is bias only.
        let mut out = vec![f32::NAN; 6];
        linear(&[], 3, 0, MatrixRef::F32(&[]), 2, Some(&[1.0, -2.0]), Activation::Relu, &mut out);
        assert_eq!(out, [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]);
    }

    #[test]
    fn matmul_both_layouts() {
        let mut rng = rng();
        // b as [k, n] always takes the blocked GEMM (m = 3 as the decoder's masks); as [n, k],
        // m = 19 takes the dot-product path and m = 45 the blocked GEMM.
        for (batch, m, k, n) in [(3, 19, 45, 23), (2, 45, 300, 37), (1, 3, 32, 1000)] {
        let a = random(&mut rng, batch * m * k);
        let b = random(&mut rng, batch * k * n);
        for transpose_b in [false, true] {
            let mut reference = vec![0.0f64; batch * m * n];
            for bi in 0..batch {
                for i in 0..m {
                    for j in 0..n {
                        let mut s = 0.0;
                        for p in 0..k {
                            let bv = if transpose_b { b[bi * n * k + j * k + p] } else { b[bi * k * n + p * n + j] };
                            s += a[bi * m * k + i * k + p] as f64 * bv as f64;
                        }
                        reference[bi * m * n + i * n + j] = s;
                    }
                }
            }
            let mut out = vec![f32::NAN; batch * m * n];
            matmul(&a, &b, batch, m, k, n, transpose_b, &mut out);
            let err = relative_error(&out, &reference);
            assert!(err <= 1e-5, "matmul m={m} transpose_b={transpose_b}: relative error {err}");
        }
        }
    }

    /// TinyViT's linear layers at LiteMedSAM's stages (tokens x in -> out, GELU where the MLP
    /// has it): median of 7 calls after a warm-up, 2 threads when run as `cargo test --release
    /// -p minisam-kernels --lib tinyvit_linear_timings -- --ignored --nocapture` on 2 cores.
    #[test]
    #[ignore]
    fn tinyvit_linear_timings() {
        let mut rng = rng();
        for (m, k, n, act) in [(16384, 128, 512, Activation::Gelu), (16384, 512, 128, Activation::None), (4096, 160, 480, Activation::None), (4096, 640, 160, Activation::None)] {
            let x = random(&mut rng, m * k);
            let w = random(&mut rng, n * k);
            let bias = random(&mut rng, n);
            let mut out = vec![0.0; m * n];
            let mut times = Vec::new();
            for _ in 0..8 {
                let start = std::time::Instant::now();
                linear(&x, m, k, MatrixRef::F32(&w), n, Some(&bias), act, &mut out);
                times.push(start.elapsed().as_secs_f64() * 1e3);
            }
            times.remove(0);
            times.sort_by(f64::total_cmp);
            eprintln!("{m}x{k}x{n} {act:?}: median {:.2} ms, {:.1} GFLOP/s", times[3], 2.0 * (m * k * n) as f64 / times[3] / 1e6);
        }
    }

    /// Not a pass/fail test: prints the throughput (`cargo test -p minisam-kernels --release
    /// gemm::tests::throughput -- --ignored --nocapture`).
    #[test]
    #[ignore]
    fn throughput() {
        let mut rng = rng();
        for dtype in ["f32", "nf4"] {
            let (m, k, n) = (1024, 768, 3072);
            let x = random(&mut rng, m * k);
            let w = store(&random(&mut rng, n * k), dtype);
            let mut out = vec![0.0f32; m * n];
            linear(&x, m, k, w.matrix(), n, None, Activation::None, &mut out);
            let start = std::time::Instant::now();
            let reps = 3;
            for _ in 0..reps {
                linear(&x, m, k, w.matrix(), n, None, Activation::None, &mut out);
            }
            let secs = start.elapsed().as_secs_f64() / reps as f64;
            println!("{dtype} {m}x{k}x{n}: {:.1} GFLOP/s on {} threads", 2.0 * (m * k * n) as f64 / secs / 1e9, rayon::current_num_threads());
        }
    }
}
