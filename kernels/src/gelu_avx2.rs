//! Exact (erf) GELU written with AVX2 and FMA intrinsics, eight lanes at a time: the erfc fit of
//! [`crate::activation::gelu`] and of the AVX-512 kernel (`crate::gelu_avx512`), with the
//! polynomial chains as fused multiply-adds, `1/(1 + z/2)` as a reciprocal estimate refined by
//! one Newton step, and `2^n` built from its exponent bits (AVX2 has neither `rcp14` nor
//! `vscalefps`).
//!
//! Why: on AVX2 machines GELU was the scalar code recompiled for eight lanes, whose uncontracted
//! chains and full division made it a fifth of a LiteMedSAM encode (`perf`, `MINISAM_SIMD=avx2`,
//! 2026-12-03). Results differ from the scalar build by a few ulps; the accuracy bound against
//! the f64 reference is the scalar one (tests in `crate::activation`).

use std::arch::x86_64::*;

use crate::activation::{ERFC_FIT, ERFC_Z_CLAMP};
use crate::fastmath::avx2::exp_nonpositive8;

/// `xs[i] = gelu(xs[i])` in place.
///
/// # Safety
/// The CPU must support AVX2 and FMA (`simd::supported`).
// xs: any flat buffer.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn gelu_in_place(xs: &mut [f32]) {
    let mut chunks = xs.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let p = chunk.as_mut_ptr();
        _mm256_storeu_ps(p, gelu8(_mm256_loadu_ps(p)));
    }
    let tail = chunks.into_remainder();
    if !tail.is_empty() {
        // The last few lanes through a zero-padded block, so they get the same arithmetic.
        let mut block = [0.0f32; 8];
        block[..tail.len()].copy_from_slice(tail);
        _mm256_storeu_ps(block.as_mut_ptr(), gelu8(_mm256_loadu_ps(block.as_ptr())));
        tail.copy_from_slice(&block[..tail.len()]);
    }
}

/// GELU of 8 lanes: `x · Φ(x)` with `Φ(x) = 1 - erfc(z)/2` for `x ≥ 0` and `erfc(z)/2` for
/// `x < 0`, `z = |x|/√2`, `erfc(z) = t · e^{P(t) - z²}`, `t = 1/(1 + z/2)`.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn gelu8(x: __m256) -> __m256 {
    let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let scaled = _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::FRAC_1_SQRT_2));
    let z = _mm256_min_ps(_mm256_and_ps(scaled, abs_mask), _mm256_set1_ps(ERFC_Z_CLAMP));
    let d = _mm256_fmadd_ps(z, _mm256_set1_ps(0.5), _mm256_set1_ps(1.0));
    // 1/d: the 12-bit estimate and one Newton step r + r(1 - d·r), about 2^-23 relative.
    let r0 = _mm256_rcp_ps(d);
    let t = _mm256_fmadd_ps(r0, _mm256_fnmadd_ps(d, r0, _mm256_set1_ps(1.0)), r0);
    let mut p = _mm256_set1_ps(ERFC_FIT[0]);
    for &c in &ERFC_FIT[1..] {
        p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(c));
    }
    let erfc = _mm256_mul_ps(t, exp_nonpositive8(_mm256_fnmadd_ps(z, z, p)));
    let half_erfc = _mm256_mul_ps(erfc, _mm256_set1_ps(0.5));
    let negative = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_setzero_ps());
    let phi = _mm256_blendv_ps(_mm256_sub_ps(_mm256_set1_ps(1.0), half_erfc), half_erfc, negative);
    _mm256_mul_ps(x, phi)
}
