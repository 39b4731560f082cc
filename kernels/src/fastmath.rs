//! Vectorisable f32 transcendental functions for kernel inner loops, and the CPU feature check
//! the kernels use to pick their AVX2+FMA builds. The standard library's `exp` is a scalar libm
//! call; these are straight-line arithmetic the compiler turns into SIMD.

/// Whether the AVX2+FMA builds of the kernels may run on this CPU (the crate itself is compiled
/// for baseline x86-64, so the wide builds are chosen at run time). Cheap: the standard library
/// caches the CPUID answer.
pub fn avx2_fma_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Arguments below this give 0: `e^-87` is near the bottom of f32's normal range. Shared by
/// every build of the exponential (scalar, AVX2, AVX-512), as are the constants below.
pub(crate) const EXP_FLOOR: f32 = -87.0;
/// `ln 2` split in two, so that `a - n·ln2` keeps its low bits: `LN2_HI` has few enough
/// significant bits that `n · LN2_HI` is exact for the `n` here.
pub(crate) const LN2_HI: f32 = 0.693_359_4;
pub(crate) const LN2_LO: f32 = -2.121_944_4e-4;
/// `e^r`'s degree-7 Taylor polynomial in Horner order, highest degree first.
pub(crate) const EXP_TAYLOR: [f32; 8] = [1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0];

/// `e^x` for `x <= 0` (or NaN), accurate to a few f32 ulps, written so that loops over it
/// vectorise (the standard library's `exp` is a scalar call): `e^x = 2^n · e^r` with
/// `n = round(x / ln 2)`, `|r| <= ln 2 / 2`, and `e^r` by its degree-7 Taylor polynomial
/// (truncation error < 2e-9 relative there).
// x: scalar, x <= 0; results below f32's normal range flush to 0, NaN propagates.
#[inline(always)]
pub fn exp_nonpositive(x: f32) -> f32 {
    let clamped = x.max(EXP_FLOOR);
    // Round to nearest by the 1.5·2^23 trick: `f32::round` is a libm call on baseline x86-64 and
    // would stop the loops around this function from vectorising.
    const ROUNDER: f32 = 12_582_912.0;
    let n = (clamped * std::f32::consts::LOG2_E + ROUNDER) - ROUNDER;
    let r = (clamped - n * LN2_HI) - n * LN2_LO;
    let mut poly = EXP_TAYLOR[0];
    for c in &EXP_TAYLOR[1..] {
        poly = poly * r + c;
    }
    // `n` is an integer in [-126, 1] here (`max` maps NaN to -87 too), so the unchecked cast is
    // sound; the saturating `as` cast would keep this loop from vectorising.
    // SAFETY: `n` is finite and well inside i32's range.
    let n_int = unsafe { n.to_int_unchecked::<i32>() };
    let scale = f32::from_bits(((n_int + 127) as u32) << 23);
    let result = poly * scale;
    if x < EXP_FLOOR {
        0.0
    } else if x.is_nan() {
        x
    } else {
        result
    }
}

/// AVX-512 versions for the intrinsics kernels (`crate::gelu_avx512`, the attention's
/// small-window path).
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use std::arch::x86_64::*;

    use super::{EXP_FLOOR, EXP_TAYLOR, LN2_HI, LN2_LO};

    /// `e^a` for `a ≤ 0` lane-wise (NaN lanes give 0; the caller's final product with `x` restores
    /// the NaN): `2^n · e^r`, `n = round(a·log2 e)`, degree-7 Taylor polynomial on `|r| ≤ ln2/2`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn exp_nonpositive16(a: __m512) -> __m512 {
        let in_range = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(a, _mm512_set1_ps(EXP_FLOOR));
        let a = _mm512_max_ps(a, _mm512_set1_ps(EXP_FLOOR));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(a, _mm512_set1_ps(std::f32::consts::LOG2_E)));
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), a));
        let mut poly = _mm512_set1_ps(EXP_TAYLOR[0]);
        for &c in &EXP_TAYLOR[1..] {
            poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(c));
        }
        _mm512_maskz_mov_ps(in_range, _mm512_scalef_ps(poly, n))
    }
}

/// AVX2+FMA versions for the intrinsics kernels (`crate::gelu_avx2`).
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use std::arch::x86_64::*;

    use super::{EXP_FLOOR, EXP_TAYLOR, LN2_HI, LN2_LO};

    /// `e^a` for `a ≤ 0` lane-wise (NaN lanes give 0; the caller's final product with `x` restores
    /// the NaN): as [`super::avx512::exp_nonpositive16`], with `2^n` built from its exponent bits
    /// (AVX2 has no `vscalefps`).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn exp_nonpositive8(a: __m256) -> __m256 {
        let in_range = _mm256_cmp_ps::<_CMP_GE_OQ>(a, _mm256_set1_ps(EXP_FLOOR));
        let a = _mm256_max_ps(a, _mm256_set1_ps(EXP_FLOOR));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(a, _mm256_set1_ps(std::f32::consts::LOG2_E)));
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), a));
        let mut poly = _mm256_set1_ps(EXP_TAYLOR[0]);
        for &c in &EXP_TAYLOR[1..] {
            poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(c));
        }
        // n is an integer in [-126, 1]: 2^n is its biased exponent shifted into place.
        let scale = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127))));
        _mm256_and_ps(_mm256_mul_ps(poly, scale), in_range)
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

    #[test]
    fn fast_exp_matches_f64_exp() {
        let mut rng = rng();
        for i in 0..100_000 {
            let x: f32 = if i % 2 == 0 { rng.gen_range(-20.0..=0.0) } else { rng.gen_range(-87.0..=0.0) };
            let want = (x as f64).exp();
            let got = exp_nonpositive(x) as f64;
            assert!(((got - want) / want).abs() <= 4e-7, "exp({x}) = {got}, want {want}");
        }
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(-100.0), 0.0);
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
        assert!(exp_nonpositive(f32::NAN).is_nan());
    }

    /// The AVX-512 exponential: same bound as the scalar one; below the floor, -inf and NaN
    /// give 0 (its callers rely on that for masked lanes).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_exp_matches_f64_exp() {
        use std::arch::x86_64::*;
        if !crate::simd::supported().contains(&crate::simd::Isa::Avx512) {
            eprintln!("SKIP: this CPU has no AVX-512F");
            return;
        }
        let exp16 = |xs: [f32; 16]| -> [f32; 16] {
            let mut out = [0.0f32; 16];
            // SAFETY: AVX-512F checked above; both arrays hold 16 floats.
            unsafe { _mm512_storeu_ps(out.as_mut_ptr(), avx512::exp_nonpositive16(_mm512_loadu_ps(xs.as_ptr()))) };
            out
        };
        let mut rng = rng();
        for _ in 0..10_000 {
            let xs: [f32; 16] = std::array::from_fn(|_| rng.gen_range(-87.0..=0.0));
            for (x, got) in xs.iter().zip(exp16(xs)) {
                let want = (*x as f64).exp();
                assert!(((got as f64 - want) / want).abs() <= 4e-7, "exp({x}) = {got}, want {want}");
            }
        }
        let specials = exp16([0.0, -0.0, -100.0, f32::NEG_INFINITY, f32::NAN, -87.5, -1e30, -1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
        assert_eq!(specials[..7], [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
        assert!((specials[7] as f64 - (-1.0f64).exp()).abs() <= 4e-7 * (-1.0f64).exp());
    }
}
