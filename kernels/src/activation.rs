//! Element-wise activations fused into the epilogues of GEMM and convolution.
//!
//! GELU is the erf form of `torch.nn.GELU()`, not the tanh approximation: the networks were
//! trained with it, and the tanh form differs by up to ~1e-3, far above what the golden outputs
//! allow. Rust has no `erf`, and GELU runs on every element of every MLP (about 10^8 times per
//! LiteMedSAM frame), so erfc is evaluated with a branch-free Chebyshev fit that vectorises:
//! erfc(z) = t·exp(-z² + P(t)), t = 1/(1 + z/2) (Numerical Recipes' `erfcc`, fractional error
//! below 1.2e-7 for every z ≥ 0), with [`crate::fastmath::exp_nonpositive`].

use rayon::prelude::*;

use crate::fastmath::exp_nonpositive;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    None,
    /// Exact (erf) GELU, as `torch.nn.GELU()`.
    Gelu,
    Relu,
}

/// The Chebyshev fit `P(t)` of `erfc(z) = t·exp(-z² + P(t))`, `t = 1/(1 + z/2)`, in Horner
/// order, highest degree first. Every build of GELU (scalar, AVX2, AVX-512) evaluates it.
pub(crate) const ERFC_FIT: [f32; 10] =
    [0.170_872_77, -0.822_152_23, 1.488_515_9, -1.135_204, 0.278_868_07, -0.186_288_06, 0.096_784_18, 0.374_091_96, 1.000_023_7, -1.265_512_2];

/// Above this `z = |x|/√2`, `erfc(z)` is below f32's range (`e^{-z²}` underflows): the
/// intrinsics builds clamp their lanes here so that the reciprocal and the polynomial never see
/// infinity.
#[cfg(target_arch = "x86_64")]
pub(crate) const ERFC_Z_CLAMP: f32 = 10.0;

/// Exact GELU, `x · Φ(x) = 0.5 · x · erfc(-x/√2)`. Against an f64 reference over [-12, 12]
/// (test below) the error stays under `1.5e-6·|gelu(x)| + 1e-9`; the golden-output tests show
/// this is invisible at the network's output.
// x: scalar.
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    let z = x.abs() * std::f32::consts::FRAC_1_SQRT_2;
    let t = 1.0 / (1.0 + 0.5 * z);
    let mut p = ERFC_FIT[0];
    for c in &ERFC_FIT[1..] {
        p = p * t + c;
    }
    let erfc_abs = t * exp_nonpositive(p - z * z);
    // erfc(-x/√2) is erfc(z) for x < 0 and 2 - erfc(z) for x ≥ 0; written so no `1 + erf`
    // cancellation happens on either side.
    let half_erfc = 0.5 * erfc_abs;
    if x < 0.0 {
        x * half_erfc
    } else {
        x * (1.0 - half_erfc)
    }
}

// x: scalar.
#[inline]
pub fn relu(x: f32) -> f32 {
    // NaN passes through (as torch's relu does) instead of becoming 0.
    if x > 0.0 || x.is_nan() {
        x
    } else {
        0.0
    }
}

/// Applies `act` to every element in place, spread over the rayon pool for large buffers.
// xs: any flat buffer.
pub fn apply(act: Activation, xs: &mut [f32]) {
    const SERIAL_LIMIT: usize = 1 << 15;
    if act == Activation::None {
        return;
    }
    if xs.len() > SERIAL_LIMIT {
        xs.par_chunks_mut(SERIAL_LIMIT).for_each(|chunk| apply_serial(act, chunk));
    } else {
        apply_serial(act, xs);
    }
}

// xs: any flat buffer.
fn apply_serial(act: Activation, xs: &mut [f32]) {
    apply_serial_at(crate::simd::active(), act, xs);
}

/// `act` on every element on the calling thread, with the build for `isa` (which must be one
/// `simd::supported` lists): for callers already inside a parallel loop, and for tests that
/// compare levels.
// xs: any flat buffer.
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))] // wide builds are x86's only
pub(crate) fn apply_serial_at(isa: crate::simd::Isa, act: Activation, xs: &mut [f32]) {
    if act == Activation::None {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    match isa {
        // SAFETY: the caller passes a level the CPU supports.
        crate::simd::Isa::Avx512 => return unsafe { apply_serial_avx512(act, xs) },
        crate::simd::Isa::Avx2Fma => return unsafe { apply_serial_avx2(act, xs) },
        _ => {}
    }
    apply_portable(act, xs);
}

/// AVX-512: GELU by the intrinsics kernel of `crate::gelu_avx512` (FMA contractions and a
/// refined reciprocal, so a few ulps from the portable build, same accuracy bound), ReLU by the
/// portable loop compiled for 16 lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn apply_serial_avx512(act: Activation, xs: &mut [f32]) {
    match act {
        Activation::Gelu => crate::gelu_avx512::gelu_in_place(xs),
        _ => apply_portable(act, xs),
    }
}

/// AVX2: GELU by the intrinsics kernel of `crate::gelu_avx2` (a few ulps from the portable
/// build, same accuracy bound), ReLU by the portable loop compiled for 8 lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn apply_serial_avx2(act: Activation, xs: &mut [f32]) {
    match act {
        Activation::Gelu => crate::gelu_avx2::gelu_in_place(xs),
        _ => apply_portable(act, xs),
    }
}

// xs: any flat buffer.
#[inline(always)]
fn apply_portable(act: Activation, xs: &mut [f32]) {
    match act {
        Activation::None => {}
        Activation::Relu => xs.iter_mut().for_each(|v| *v = relu(*v)),
        Activation::Gelu => xs.iter_mut().for_each(|v| *v = gelu(*v)),
    }
}

#[cfg(test)]
/// High-precision f64 erfc, by a route independent of [`gelu`]: the reference kernel tests
/// compare against.
pub(crate) mod reference {
    const FRAC_2_SQRT_PI: f64 = std::f64::consts::FRAC_2_SQRT_PI;

    /// Reference erfc by a different route than the kernel: for |z| < 5 the all-positive series
    /// erf(z) = 2/√π · e^(-z²) · Σ 2^n z^(2n+1) / (2n+1)!!  (no cancellation), beyond it a very
    /// long continued fraction evaluated forwards with the modified Lentz algorithm.
    pub fn erfc(z: f64) -> f64 {
        if z.abs() < 5.0 {
            let z2 = z * z;
            let mut term = z;
            let mut sum = z;
            let mut n = 0.0;
            while term.abs() > 1e-20 * sum.abs() {
                n += 1.0;
                term *= 2.0 * z2 / (2.0 * n + 1.0);
                sum += term;
            }
            let erf = FRAC_2_SQRT_PI * (-z2).exp() * sum;
            if z > 2.0 {
                // 1 - erf loses digits here; use the continued fraction instead.
                return lentz_erfc(z);
            }
            1.0 - erf
        } else if z > 0.0 {
            lentz_erfc(z)
        } else {
            2.0 - lentz_erfc(-z)
        }
    }

    fn lentz_erfc(z: f64) -> f64 {
        // erfc(z) = e^(-z²)/√π · 1/(z + a1/(z + a2/(z + …))) with a_k = k/2.
        let tiny = 1e-300;
        let mut f = z;
        let mut c = z;
        let mut d = 0.0;
        for k in 1..2000 {
            let a = k as f64 * 0.5;
            d = z + a * d;
            if d.abs() < tiny {
                d = tiny;
            }
            c = z + a / c;
            if c.abs() < tiny {
                c = tiny;
            }
            d = 1.0 / d;
            let delta = c * d;
            f *= delta;
            if (delta - 1.0).abs() < 1e-17 {
                break;
            }
        }
        (-z * z).exp() / (std::f64::consts::PI.sqrt() * f)
    }

}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::activation::reference;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;


    #[test]
    fn gelu_matches_high_precision_reference() {
        // Relative where GELU is of order one; in the negative tail the f32 rounding of `z²` and
        // of the exponent costs up to ~1.2e-6 relative (seen near x = -2.9, where GELU is -0.006:
        // 7e-9 absolute) and the bound turns absolute, far under the activations' resolution.
        let mut rng = ChaCha8Rng::seed_from_u64(rand::random());
        let mut worst = 0.0f64;
        for i in 0..200_000 {
            let x: f32 = if i % 2 == 0 { rng.gen_range(-5.0..5.0) } else { rng.gen_range(-12.0..12.0) };
            let xd = x as f64;
            let want = 0.5 * xd * reference::erfc(-xd / 2f64.sqrt());
            let got = gelu(x) as f64;
            worst = worst.max((got - want).abs() / (1.5e-6 * want.abs() + 1e-9));
        }
        assert!(worst <= 1.0, "error reaches {worst} x (1.5e-6 |gelu| + 1e-9)");
        assert_eq!(gelu(0.0), 0.0);
        assert!(gelu(f32::NAN).is_nan());
        assert_eq!(gelu(f32::INFINITY), f32::INFINITY);
    }

    #[test]
    fn apply_each_activation() {
        let mut rng = ChaCha8Rng::seed_from_u64(rand::random());
        let xs: Vec<f32> = (0..1000).map(|_| rng.gen_range(-5.0..5.0)).collect();
        for act in [Activation::None, Activation::Relu, Activation::Gelu] {
            let mut ys = xs.clone();
            apply(act, &mut ys);
            for (x, y) in xs.iter().zip(&ys) {
                let want = match act {
                    Activation::None => *x as f64,
                    Activation::Relu => (*x as f64).max(0.0),
                    Activation::Gelu => 0.5 * *x as f64 * reference::erfc(-*x as f64 / 2f64.sqrt()),
                };
                assert!((*y as f64 - want).abs() <= 1.5e-6 * want.abs() + 1e-9, "{act:?}({x}) = {y}, want {want}");
            }
        }
        assert_eq!(relu(-0.0), 0.0);
        assert!(relu(f32::NAN).is_nan());
    }

    /// ReLU's wide builds are the portable loop recompiled: bit-identical. (GELU's are
    /// intrinsics kernels of their own, checked against the reference below.)
    #[test]
    fn wide_builds_are_bit_identical_to_portable() {
        let mut rng = ChaCha8Rng::seed_from_u64(rand::random());
        let xs: Vec<f32> = (0..4099).map(|_| rng.gen_range(-12.0..12.0)).chain([f32::NAN, -0.0, f32::INFINITY, -100.0]).collect();
        for act in [Activation::Relu, Activation::Gelu] {
            let mut want = xs.clone();
            apply_portable(act, &mut want);
            #[cfg(target_arch = "x86_64")]
            for isa in crate::simd::supported() {
                let mut got = xs.clone();
                match isa {
                    crate::simd::Isa::Avx512 | crate::simd::Isa::Avx2Fma if act == Activation::Gelu => continue,
                    crate::simd::Isa::Avx512 => unsafe { apply_serial_avx512(act, &mut got) },
                    crate::simd::Isa::Avx2Fma => unsafe { apply_serial_avx2(act, &mut got) },
                    _ => apply_portable(act, &mut got),
                }
                let same = got.iter().zip(&want).all(|(g, w)| g.to_bits() == w.to_bits());
                assert!(same, "{isa:?} {act:?} differs from the portable build");
            }
        }
    }

    /// The AVX-512 and AVX2 GELU kernels against the f64 reference with the scalar bound, on
    /// every length 0..40 (tails) and a long buffer, plus the special values the scalar handles.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn wide_gelu_kernels_match_reference() {
        type Kernel = unsafe fn(&mut [f32]);
        let kernels: [(crate::simd::Isa, Kernel); 2] = [(crate::simd::Isa::Avx512, crate::gelu_avx512::gelu_in_place), (crate::simd::Isa::Avx2Fma, crate::gelu_avx2::gelu_in_place)];
        for (isa, kernel) in kernels {
            if !crate::simd::supported().contains(&isa) {
                eprintln!("SKIP: this CPU has no {isa:?}");
                continue;
            }
            let mut rng = ChaCha8Rng::seed_from_u64(rand::random());
            let mut worst = 0.0f64;
            for len in (0..40).chain([100_003]) {
                let xs: Vec<f32> = (0..len).map(|i| if i % 2 == 0 { rng.gen_range(-5.0..5.0) } else { rng.gen_range(-13.0..13.0) }).collect();
                let mut ys = xs.clone();
                // SAFETY: the CPU supports `isa` (checked above).
                unsafe { kernel(&mut ys) };
                for (&x, &y) in xs.iter().zip(&ys) {
                    let want = 0.5 * x as f64 * reference::erfc(-x as f64 / 2f64.sqrt());
                    worst = worst.max((y as f64 - want).abs() / (1.5e-6 * want.abs() + 1e-9));
                }
            }
            assert!(worst <= 1.0, "{isa:?} GELU error reaches {worst} x (1.5e-6 |gelu| + 1e-9)");
            let specials = [0.0f32, -0.0, f32::NAN, f32::INFINITY, -100.0, 100.0, 1e30, -1e30, f32::MIN_POSITIVE];
            let mut got = specials;
            // SAFETY: as above.
            unsafe { kernel(&mut got) };
            for (&x, &y) in specials.iter().zip(&got) {
                let want = gelu(x);
                assert!(y == want || (y.is_nan() && want.is_nan()) || (y - want).abs() <= 1e-30, "{isa:?}: gelu({x}) = {y}, scalar {want}");
            }
        }
    }

    /// Throughput of `apply(Gelu)`: `cargo test -p minisam-kernels gelu_timing -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn gelu_timing() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut xs: Vec<f32> = (0..1 << 22).map(|_| rng.gen_range(-4.0..4.0)).collect();
        apply(Activation::Gelu, &mut xs.clone()); // starts the pool
        let start = std::time::Instant::now();
        apply(Activation::Gelu, &mut xs);
        let t = start.elapsed().as_secs_f64();
        eprintln!("gelu: {:.1} ns/element (rayon pool)", t * 1e9 / xs.len() as f64);
        let start = std::time::Instant::now();
        apply_serial(Activation::Gelu, &mut xs);
        let t = start.elapsed().as_secs_f64();
        eprintln!("gelu: {:.1} ns/element (one thread)", t * 1e9 / xs.len() as f64);
        // The AVX-512 intrinsics kernel against the scalar code compiled for AVX-512, alternating
        // so that both see the same machine load; medians of 7.
        #[cfg(target_arch = "x86_64")]
        if crate::simd::supported().contains(&crate::simd::Isa::Avx512) {
            #[target_feature(enable = "avx512f")]
            unsafe fn scalar_avx512(xs: &mut [f32]) {
                apply_portable(Activation::Gelu, xs);
            }
            // Fresh inputs each time: GELU applied to its own output drifts into subnormals.
            let fresh: Vec<f32> = (0..xs.len()).map(|_| rng.gen_range(-4.0..4.0)).collect();
            let (mut intrinsics, mut scalar) = (Vec::new(), Vec::new());
            for _ in 0..7 {
                xs.copy_from_slice(&fresh);
                let start = std::time::Instant::now();
                unsafe { crate::gelu_avx512::gelu_in_place(&mut xs) };
                intrinsics.push(start.elapsed().as_secs_f64());
                xs.copy_from_slice(&fresh);
                let start = std::time::Instant::now();
                unsafe { scalar_avx512(&mut xs) };
                scalar.push(start.elapsed().as_secs_f64());
            }
            let median = |v: &mut Vec<f64>| {
                v.sort_by(f64::total_cmp);
                v[v.len() / 2] * 1e9 / xs.len() as f64
            };
            eprintln!("gelu, one thread: AVX-512 intrinsics {:.2} ns/element, scalar code built for AVX-512 {:.2}", median(&mut intrinsics), median(&mut scalar));
        }
    }
}
