//! Register-blocked GEMM micro-kernels, one per instruction set, all with one contract:
//!
//! `C[MR×NR] (+)= Σₚ A[p][0..MR] ⊗ B[p][0..NR]` for `p < kc`, where A and B are packed panels
//! (`[kc][MR]` and `[kc][NR]`, see `crate::packed_gemm`), so each step is one broadcast of an A
//! value per row against NR contiguous B values: an outer product held in MR×NR/lanes
//! accumulator registers. The tile sizes fill the register file (AVX-512: 32 zmm, AVX2: 16 ymm,
//! NEON: 32 q) while leaving room for the B loads, and the kernels write whole tiles; the driver
//! gives a scratch tile for the ragged edges.

use crate::simd::Isa;

mod portable;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
// Built and tested for aarch64 in CI by cross-compilation, run under qemu-user (.ci/aarch64.sh).
#[cfg(target_arch = "aarch64")]
mod neon;

/// Rows and columns of the register tile for `isa`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TileShape {
    pub mr: usize,
    pub nr: usize,
}

/// The largest `mr * nr` of any kernel: the size of the drivers' edge scratch tile.
pub(crate) const MAX_TILE: usize = 16 * 32;

/// The tile `isa`'s kernel computes.
pub(crate) fn tile_shape(isa: Isa) -> TileShape {
    match isa {
        Isa::Avx512 => TileShape { mr: avx512::MR, nr: avx512::NR },
        Isa::Avx2Fma => TileShape { mr: avx2::MR, nr: avx2::NR },
        Isa::Neon => TileShape { mr: neon_shape().0, nr: neon_shape().1 },
        Isa::Portable => TileShape { mr: portable::MR, nr: portable::NR },
    }
}

#[cfg(target_arch = "aarch64")]
fn neon_shape() -> (usize, usize) {
    (neon::MR, neon::NR)
}

/// Off aarch64 its shape is the portable one so that the dispatcher stays total (it is never
/// selected there: `simd::supported` does not list it).
#[cfg(not(target_arch = "aarch64"))]
fn neon_shape() -> (usize, usize) {
    (portable::MR, portable::NR)
}

#[cfg(not(target_arch = "x86_64"))]
mod avx512 {
    pub(crate) const MR: usize = super::portable::MR;
    pub(crate) const NR: usize = super::portable::NR;
}
#[cfg(not(target_arch = "x86_64"))]
mod avx2 {
    pub(crate) const MR: usize = super::portable::MR;
    pub(crate) const NR: usize = super::portable::NR;
}

/// One tile: `accumulate` adds into C, otherwise C is overwritten.
///
/// # Safety
/// `a` must hold `kc * mr` and `b` `kc * nr` readable floats (`tile_shape(isa)`), `c` must point
/// to `mr` rows of `nr` writable floats with row stride `ldc`, and the CPU must support `isa`
/// (`simd::supported`).
#[inline]
pub(crate) unsafe fn run(isa: Isa, kc: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize, accumulate: bool) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => avx512::kernel(kc, a, b, c, ldc, accumulate),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => avx2::kernel(kc, a, b, c, ldc, accumulate),
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => neon::kernel(kc, a, b, c, ldc, accumulate),
        _ => portable::kernel(kc, a, b, c, ldc, accumulate),
    }
}

/// The first `height` rows of a full-width tile (`1 <= height <= mr`), for the last row panel of
/// a matrix whose rows are not a multiple of `mr`: returns `false`, touching nothing, where
/// `isa`'s kernel has no such variant (the driver then goes through its scratch tile).
///
/// # Safety
/// As [`run`], with `c` pointing to `height` rows.
#[inline]
#[allow(clippy::too_many_arguments)]
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))] // only x86 has such kernels
pub(crate) unsafe fn run_rows(isa: Isa, height: usize, kc: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize, accumulate: bool) -> bool {
    debug_assert!(height >= 1 && height <= tile_shape(isa).mr);
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => {
            avx512::kernel_height(height, kc, a, b, c, ldc, accumulate);
            true
        }
        _ => false,
    }
}

/// The first `height` rows of a full-width tile with A read in place from a row-major matrix
/// (row stride `lda`) instead of a packed panel: returns `false`, touching nothing, where `isa`
/// has no such kernel (the driver then packs A).
///
/// # Safety
/// As [`run_rows`], with `a` pointing to `height` rows of `kc` readable floats, `lda` apart.
#[inline]
#[allow(clippy::too_many_arguments)]
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))] // only x86 has such kernels
pub(crate) unsafe fn run_row_major_a(isa: Isa, height: usize, kc: usize, a: *const f32, lda: usize, b: *const f32, c: *mut f32, ldc: usize, accumulate: bool) -> bool {
    debug_assert!(height >= 1 && height <= tile_shape(isa).mr);
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => {
            avx512::kernel_row_major_a(height, kc, a, lda, b, c, ldc, accumulate);
            true
        }
        _ => false,
    }
}

/// Whether [`run_row_major_a`] has a kernel for `isa`.
pub(crate) fn reads_row_major_a(isa: Isa) -> bool {
    matches!(isa, Isa::Avx512) && cfg!(target_arch = "x86_64")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simd;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// Every kernel this CPU runs, on random panels, against an f64 sum; both C modes.
    #[test]
    fn every_supported_kernel_matches_f64() {
        let mut rng = ChaCha8Rng::seed_from_u64(rand::random());
        for isa in simd::supported() {
            let TileShape { mr, nr } = tile_shape(isa);
            assert!(mr * nr <= MAX_TILE);
            for kc in [0usize, 1, 2, 7, 64, 257] {
                let a: Vec<f32> = (0..kc * mr).map(|_| rng.gen_range(-1.0..1.0)).collect();
                let b: Vec<f32> = (0..kc * nr).map(|_| rng.gen_range(-1.0..1.0)).collect();
                let ldc = nr + 3;
                let c0: Vec<f32> = (0..mr * ldc).map(|_| rng.gen_range(-1.0..1.0)).collect();
                // height == mr: the whole-tile kernel; below it the partial-height variants,
                // where the ISA has them (rows past `height` must stay untouched).
                for (height, accumulate) in (1..=mr).rev().flat_map(|h| [(h, false), (h, true)]) {
                    let mut c = c0.clone();
                    if height == mr {
                        unsafe { run(isa, kc, a.as_ptr(), b.as_ptr(), c.as_mut_ptr(), ldc, accumulate) };
                    } else if !unsafe { run_rows(isa, height, kc, a.as_ptr(), b.as_ptr(), c.as_mut_ptr(), ldc, accumulate) } {
                        continue;
                    }
                    for i in 0..mr {
                        for j in 0..ldc {
                            let got = c[i * ldc + j] as f64;
                            if i >= height {
                                assert_eq!(got, c0[i * ldc + j] as f64, "{isa:?} height {height} wrote row {i}");
                                continue;
                            }
                            if j >= nr {
                                assert_eq!(got, c0[i * ldc + j] as f64, "{isa:?} wrote past the tile at ({i}, {j})");
                                continue;
                            }
                            let mut want = if accumulate { c0[i * ldc + j] as f64 } else { 0.0 };
                            for p in 0..kc {
                                want += a[p * mr + i] as f64 * b[p * nr + j] as f64;
                            }
                            assert!((got - want).abs() <= 1e-5 * (1.0 + kc as f64).sqrt(), "{isa:?} kc={kc} height={height} acc={accumulate} ({i}, {j}): {got} vs {want}");
                        }
                    }
                }
            }
        }
    }
}
