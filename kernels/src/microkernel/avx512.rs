//! AVX-512 micro-kernel: 12 rows × 32 columns, 24 zmm accumulators + 2 B registers + the
//! broadcasts (of 32 zmm). Twelve rows amortise each pair of B loads over 24 FMAs, enough to
//! keep two 512-bit FMA pipes busy from L1.
//!
//! [`kernel_height`] computes only the first rows of a tile from the same `[kc][MR]` A panel:
//! a matrix whose row count is not a multiple of 12 (64 output channels: 5 full panels and 4
//! rows) then neither multiplies the panel's zero padding nor goes through the driver's scratch
//! tile and its copies.

use std::arch::x86_64::*;

pub(crate) const MR: usize = 12;
pub(crate) const NR: usize = 32;

/// See [`super::run`].
// a: [kc][MR]; b: [kc][NR]; c: MR rows of NR with stride ldc.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn kernel(kc: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize, accumulate: bool) {
    kernel_rows::<MR>(kc, a, b, c, ldc, accumulate)
}

/// The first `height` rows of a tile (`1 <= height <= MR`); see [`super::run_rows`].
// a: [kc][MR]; b: [kc][NR]; c: height rows of NR with stride ldc.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn kernel_height(height: usize, kc: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize, accumulate: bool) {
    match height {
        1 => kernel_rows::<1>(kc, a, b, c, ldc, accumulate),
        2 => kernel_rows::<2>(kc, a, b, c, ldc, accumulate),
        3 => kernel_rows::<3>(kc, a, b, c, ldc, accumulate),
        4 => kernel_rows::<4>(kc, a, b, c, ldc, accumulate),
        5 => kernel_rows::<5>(kc, a, b, c, ldc, accumulate),
        6 => kernel_rows::<6>(kc, a, b, c, ldc, accumulate),
        7 => kernel_rows::<7>(kc, a, b, c, ldc, accumulate),
        8 => kernel_rows::<8>(kc, a, b, c, ldc, accumulate),
        9 => kernel_rows::<9>(kc, a, b, c, ldc, accumulate),
        10 => kernel_rows::<10>(kc, a, b, c, ldc, accumulate),
        11 => kernel_rows::<11>(kc, a, b, c, ldc, accumulate),
        _ => kernel_rows::<MR>(kc, a, b, c, ldc, accumulate),
    }
}

/// The first `height` rows of a tile with A read in place, row-major with row stride `lda`
/// (`1 <= height <= MR`); see [`super::run_row_major_a`].
// a: height rows of kc floats, stride lda; b: [kc][NR]; c: height rows of NR with stride ldc.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn kernel_row_major_a(height: usize, kc: usize, a: *const f32, lda: usize, b: *const f32, c: *mut f32, ldc: usize, accumulate: bool) {
    let a = RowMajor { a, lda };
    match height {
        1 => kernel_tile::<1, _>(kc, a, b, c, ldc, accumulate),
        2 => kernel_tile::<2, _>(kc, a, b, c, ldc, accumulate),
        3 => kernel_tile::<3, _>(kc, a, b, c, ldc, accumulate),
        4 => kernel_tile::<4, _>(kc, a, b, c, ldc, accumulate),
        5 => kernel_tile::<5, _>(kc, a, b, c, ldc, accumulate),
        6 => kernel_tile::<6, _>(kc, a, b, c, ldc, accumulate),
        7 => kernel_tile::<7, _>(kc, a, b, c, ldc, accumulate),
        8 => kernel_tile::<8, _>(kc, a, b, c, ldc, accumulate),
        9 => kernel_tile::<9, _>(kc, a, b, c, ldc, accumulate),
        10 => kernel_tile::<10, _>(kc, a, b, c, ldc, accumulate),
        11 => kernel_tile::<11, _>(kc, a, b, c, ldc, accumulate),
        _ => kernel_tile::<MR, _>(kc, a, b, c, ldc, accumulate),
    }
}

/// Where the kernel finds A's value for row `i` at depth `p`.
trait ALayout: Copy {
    /// # Safety
    /// `(i, p)` lies inside the operand the layout was made for.
    unsafe fn at(self, i: usize, p: usize) -> f32;
}

/// A packed `[kc][MR]` panel.
#[derive(Clone, Copy)]
struct Packed(*const f32);

impl ALayout for Packed {
    #[inline(always)]
    unsafe fn at(self, i: usize, p: usize) -> f32 {
        *self.0.add(p * MR + i)
    }
}

/// A row-major matrix read in place: each row's `kc` values are contiguous, rows `lda` apart,
/// so every value is a broadcast load from one of `R` sequential streams (no packing copy).
#[derive(Clone, Copy)]
struct RowMajor {
    a: *const f32,
    lda: usize,
}

impl ALayout for RowMajor {
    #[inline(always)]
    unsafe fn at(self, i: usize, p: usize) -> f32 {
        *self.a.add(i * self.lda + p)
    }
}

/// `R` rows of the tile; A's panel keeps its `MR` stride.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn kernel_rows<const R: usize>(kc: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize, accumulate: bool) {
    kernel_tile::<R, _>(kc, Packed(a), b, c, ldc, accumulate)
}

/// `R` rows of the tile, A in either layout.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn kernel_tile<const R: usize, A: ALayout>(kc: usize, a: A, b: *const f32, c: *mut f32, ldc: usize, accumulate: bool) {
    let mut lo = [_mm512_setzero_ps(); R];
    let mut hi = [_mm512_setzero_ps(); R];
    if accumulate {
        for i in 0..R {
            lo[i] = _mm512_loadu_ps(c.add(i * ldc));
            hi[i] = _mm512_loadu_ps(c.add(i * ldc + 16));
        }
    }
    for p in 0..kc {
        let b_lo = _mm512_loadu_ps(b.add(p * NR));
        let b_hi = _mm512_loadu_ps(b.add(p * NR + 16));
        for i in 0..R {
            let av = _mm512_set1_ps(a.at(i, p));
            lo[i] = _mm512_fmadd_ps(av, b_lo, lo[i]);
            hi[i] = _mm512_fmadd_ps(av, b_hi, hi[i]);
        }
    }
    for i in 0..R {
        _mm512_storeu_ps(c.add(i * ldc), lo[i]);
        _mm512_storeu_ps(c.add(i * ldc + 16), hi[i]);
    }
}
