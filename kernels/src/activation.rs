//! Element-wise activations fused into the epilogues of GEMM and convolution.
//!
//! GELU is the exact erf form of `torch.nn.GELU()`: the networks were trained with it, and the
//! tanh approximation differs by up to ~1e-3, far above the tolerance the golden outputs allow.
//! Rust's standard library has no `erf`, so erfc is evaluated here in f64 through the scaled
//! function erfcx(z) = exp(z²)·erfc(z) (piecewise polynomials, then a continued fraction), which
//! keeps ~1e-10 relative accuracy even deep in the negative tail of GELU, well beyond f32.

use rayon::prelude::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    None,
    /// Exact (erf) GELU, as `torch.nn.GELU()`.
    Gelu,
    Relu,
}

/// Width of the pieces of the erfcx approximation below.
const ERFCX_PIECE: f64 = 0.5;

/// erfcx(z) = exp(z²)·erfc(z) on [0, 8], as 16 degree-8 polynomials in t ∈ [-1, 1] over pieces of
/// width 0.5 (t = 4(z - z0) - 1). erfcx is smooth and slowly varying, so low-degree pieces reach
/// 1.5e-10 relative error. Coefficients: Chebyshev interpolation at 9 Chebyshev nodes per piece of
/// double-precision erfc·exp values, converted to the monomial basis (generated offline once; the
/// tests check the result against an independent series / continued-fraction evaluation).
#[rustfmt::skip]
const ERFCX_POLY: [[f64; 9]; 16] = [
    [0.7703465477309971, -0.18580147239978598, 0.03653406705799848, -0.006219487350207546, 0.0009473322419759869, -0.00013176015876166974, 1.698567974194197e-05, -2.1078928895690296e-06, 2.3937526884133655e-07],
    [0.506937650293145, -0.09199317278573559, 0.014434883210117665, -0.0020286901771440708, 0.0002609007144263289, -3.114352964258178e-05, 3.4880072523119702e-06, -3.775116728850965e-07, 3.79481015500005e-08],
    [0.36782291645236126, -0.05220546896896993, 0.006674723216691294, -0.0007846608330699388, 8.598191614823174e-05, -8.86771411185489e-06, 8.673703177919377e-07, -8.233211130143697e-08, 7.3493385204730855e-09],
    [0.28497223473743655, -0.03274408637404019, 0.003485226880094795, -0.00034781248671217964, 3.2829376499066136e-05, -2.9499509460369686e-06, 2.5369558069125253e-07, -2.1259695238819e-08, 1.6927626707759675e-09],
    [0.231087258730392, -0.022121625701084394, 0.001999539213090472, -0.00017190721402703267, 1.413670162407775e-05, -1.11686943382594e-06, 8.50880300539024e-08, -6.340012366952881e-09, 4.5268006627136653e-10],
    [0.19366209627906877, -0.01580940938985578, 0.0012349120616859726, -9.272403368528377e-05, 6.717117007109468e-06, -4.708790775569898e-07, 3.2025877850906504e-08, -2.1372241260703757e-09, 1.376250224893738e-10],
    [0.16633534842682196, -0.011799850580199795, 0.0008085806801805446, -5.3679240319712574e-05, 3.460955468289247e-06, -2.1716599175726336e-07, 1.3285949032295877e-08, -7.997259151200826e-10, 4.672193496288754e-11],
    [0.14558972127503858, -0.009114064383149377, 0.0005549222204538905, -3.2926295271135724e-05, 1.9071187167756734e-06, -1.0798633207384809e-07, 5.985324927040538e-09, -3.2716032352355895e-10, 1.7443626789928304e-11],
    [0.12934527478598795, -0.007236082853642188, 0.0003957416421142495, -2.1186455894587713e-05, 1.1116217296041556e-06, -5.722159459844691e-08, 2.892545265038077e-09, -1.4447731899736027e-10, 7.0742424264204195e-12],
    [0.11630270721024737, -0.00587586214953664, 0.0002913328980587622, -1.4189045324945285e-05, 6.794074490655709e-07, -3.200737832800529e-08, 1.484622350981605e-09, -6.814578531096534e-11, 3.0776369107520115e-12],
    [0.10561273546889184, -0.004861361168035598, 0.00022025943375533454, -9.82971082188724e-06, 4.3235960325540805e-07, -1.8753890169204762e-08, 8.026055869297326e-10, -3.4036872086239276e-11, 1.4279935258956456e-12],
    [0.09669877816971398, -0.004085804535950439, 0.00017032961517620928, -7.009307791307052e-06, 2.8486051591632605e-07, -1.1437874968144177e-08, 4.539079729366019e-10, -1.786334043648215e-11, 7.046215462954326e-13],
    [0.08915663178727447, -0.0034803174386454235, 0.00013429348881887254, -5.124175760669776e-06, 1.934092288546907e-07, -7.2236116347805055e-09, 2.67028128004338e-10, -9.804108142614293e-12, 3.6612688189860713e-13],
    [0.0826950567750531, -0.00299897515807424, 0.00010767046918938902, -3.828020413222511e-06, 1.3480994820458392e-07, -4.703799350025406e-09, 1.6263415305830778e-10, -5.583977724654687e-12, 1.9890262276728914e-13],
    [0.07709918035125993, -0.002610263000560809, 8.759708343580554e-05, -2.9144825408487935e-06, 9.615906632682363e-08, -3.1467357608505604e-09, 1.0213948205735808e-10, -3.3008657535699764e-12, 1.1324274851176597e-13],
    [0.07220717081466979, -0.0022920048670330476, 7.218874604039386e-05, -2.2564058229399307e-06, 7.000517121547034e-08, -2.1561358377732e-09, 6.593777375959083e-11, -2.006000304138272e-12, 5.985335683868066e-14],
];

/// erfcx(z) for z >= 0.
// z: scalar >= 0.
fn erfcx_nonnegative(z: f64) -> f64 {
    if z < ERFCX_PIECE * ERFCX_POLY.len() as f64 {
        let piece = (z / ERFCX_PIECE) as usize;
        let t = 2.0 * (z - piece as f64 * ERFCX_PIECE) / ERFCX_PIECE - 1.0;
        ERFCX_POLY[piece].iter().rev().fold(0.0, |acc, &c| acc * t + c)
    } else {
        // Laplace continued fraction 1/√π · 1/(z + (1/2)/(z + 1/(z + …))); beyond z = 8 six levels
        // are accurate to 6e-12 relative.
        let mut tail = z;
        for k in (1..=6).rev() {
            tail = z + (k as f64 * 0.5) / tail;
        }
        1.0 / (std::f64::consts::PI.sqrt() * tail)
    }
}

/// Complementary error function in f64, ~1e-10 relative accuracy including the far tail (far
/// more than the f32 results need).
// z: scalar, any value; NaN propagates.
pub fn erfc_f64(z: f64) -> f64 {
    if z.is_nan() {
        return z;
    }
    let a = z.abs();
    let tail = if a > 27.0 { 0.0 } else { erfcx_nonnegative(a) * (-a * a).exp() };
    if z >= 0.0 {
        tail
    } else {
        2.0 - tail
    }
}

/// Exact GELU, `x * Φ(x) = 0.5 · x · erfc(-x/√2)`; written with erfc so that the negative tail
/// keeps full relative precision instead of cancelling in `1 + erf`.
// x: scalar.
#[inline]
pub fn gelu(x: f32) -> f32 {
    let x = x as f64;
    (0.5 * x * erfc_f64(-x * std::f64::consts::FRAC_1_SQRT_2)) as f32
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
    match act {
        Activation::None => {}
        Activation::Relu => xs.iter_mut().for_each(|v| *v = relu(*v)),
        Activation::Gelu => xs.iter_mut().for_each(|v| *v = gelu(*v)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    const FRAC_2_SQRT_PI: f64 = std::f64::consts::FRAC_2_SQRT_PI;

    /// Reference erfc by a different route than the kernel: for |z| < 5 the all-positive series
    /// erf(z) = 2/√π · e^(-z²) · Σ 2^n z^(2n+1) / (2n+1)!!  (no cancellation), beyond it a very
    /// long continued fraction evaluated forwards with the modified Lentz algorithm.
    fn reference_erfc(z: f64) -> f64 {
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

    #[test]
    fn erfc_matches_known_values() {
        // Values from tables (Abramowitz & Stegun / mpmath).
        let cases = [
            (0.5, 0.4795001221869535),
            (1.0, 0.15729920705028513),
            (3.0, 2.209049699858544e-05),
            (-1.0, 1.8427007929497148),
            (6.0, 2.1519736712498913e-17),
        ];
        for (z, want) in cases {
            let got = erfc_f64(z);
            assert!(((got - want) / want).abs() < 1e-9, "erfc({z}) = {got}, want {want}");
            let r = reference_erfc(z);
            assert!(((r - want) / want).abs() < 1e-13, "reference erfc({z}) = {r}, want {want}");
        }
    }

    #[test]
    fn erfc_sweep_covers_every_piece() {
        // Random points in every polynomial piece, across the switch to the continued fraction
        // at z = 8 and on the negative side.
        let mut rng = ChaCha8Rng::seed_from_u64(rand::random());
        let mut worst = 0.0f64;
        for _ in 0..20000 {
            let z: f64 = rng.gen_range(-6.0..12.0);
            let (got, want) = (erfc_f64(z), reference_erfc(z));
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 1e-9, "worst relative error of erfc {worst}");
    }

    #[test]
    fn gelu_matches_high_precision_reference() {
        let mut rng = ChaCha8Rng::seed_from_u64(rand::random());
        let mut worst = 0.0f64;
        for i in 0..20000 {
            let x: f32 = if i % 2 == 0 { rng.gen_range(-4.0..4.0) } else { rng.gen_range(-12.0..12.0) };
            let xd = x as f64;
            let want = 0.5 * xd * reference_erfc(-xd / 2f64.sqrt());
            let got = gelu(x) as f64;
            if want != 0.0 {
                worst = worst.max(((got - want) / want).abs());
            } else {
                assert_eq!(got, 0.0);
            }
        }
        // f32 rounding of the result is 6e-8; anything above ~1e-7 is an erf error.
        assert!(worst <= 1.2e-7, "worst relative error {worst}");
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
                    Activation::Gelu => 0.5 * *x as f64 * reference_erfc(-*x as f64 / 2f64.sqrt()),
                };
                assert!((*y as f64 - want).abs() <= 1e-6 * want.abs().max(1e-30), "{act:?}({x}) = {y}, want {want}");
            }
        }
        assert_eq!(relu(-0.0), 0.0);
        assert!(relu(f32::NAN).is_nan());
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
    }
}
