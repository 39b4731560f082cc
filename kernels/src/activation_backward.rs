//! Backward passes of the activations in [`crate::activation`], from the pre-activation input.
//!
//! GELU's derivative is `Φ(x) + x·φ(x)`; Φ is evaluated through the same erfc fit the forward
//! uses (fractional error < 1.2e-7), in f64 because the backward is not on the per-frame path.

use rayon::prelude::*;

use crate::activation::Activation;

/// `erfc(z)` for `z >= 0` (Numerical Recipes' `erfcc`, fractional error < 1.2e-7).
fn erfc_nonnegative(z: f64) -> f64 {
    let t = 1.0 / (1.0 + 0.5 * z);
    let coefficients = [0.17087277, -0.82215223, 1.48851587, -1.13520398, 0.27886807, -0.18628806, 0.09678418, 0.37409196, 1.00002368, -1.26551223];
    let p = coefficients.iter().fold(0.0, |p, &c| p * t + c);
    t * (p - z * z).exp()
}

/// `d gelu(x) / dx = Φ(x) + x·φ(x)` for the exact (erf) GELU.
// x: scalar.
pub fn gelu_derivative(x: f32) -> f32 {
    let x = x as f64;
    let half_erfc = 0.5 * erfc_nonnegative(x.abs() * std::f64::consts::FRAC_1_SQRT_2);
    let cdf = if x < 0.0 { half_erfc } else { 1.0 - half_erfc };
    let pdf = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
    (cdf + x * pdf) as f32
}

/// `dx += act'(x) ⊙ dy`, with `x` the activation's input (pre-activation).
// x, dy, dx: [n].
pub fn activation_backward(act: Activation, x: &[f32], dy: &[f32], dx: &mut [f32]) {
    assert!(x.len() == dy.len() && dx.len() == dy.len(), "activation_backward: x, dy and dx differ in length");
    const CHUNK: usize = 4096;
    dx.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).zip(dy.par_chunks(CHUNK)).for_each(|((dx, x), dy)| match act {
        Activation::None => dx.iter_mut().zip(dy).for_each(|(d, &g)| *d += g),
        // torch's relu passes no gradient at 0 (its mask is `x > 0`).
        Activation::Relu => dx.iter_mut().zip(x).zip(dy).for_each(|((d, &v), &g)| *d += if v > 0.0 { g } else { 0.0 }),
        Activation::Gelu => dx.iter_mut().zip(x).zip(dy).for_each(|((d, &v), &g)| *d += gelu_derivative(v) * g),
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{assert_close, dot, fd_grad, random, rng, to_f32};

    fn erf_ref(x: f64) -> f64 {
        // Abramowitz-Stegun 7.1.26 is too coarse for a reference; integrate φ with Simpson's rule.
        let n = 2000;
        let h = x / n as f64;
        let f = |t: f64| (-t * t).exp();
        let mut s = f(0.0) + f(x);
        for i in 1..n {
            s += f(i as f64 * h) * if i % 2 == 1 { 4.0 } else { 2.0 };
        }
        s * h / 3.0 * 2.0 / std::f64::consts::PI.sqrt()
    }

    fn forward_ref(act: Activation, x: f64) -> f64 {
        match act {
            Activation::None => x,
            Activation::Relu => x.max(0.0),
            Activation::Gelu => 0.5 * x * (1.0 + erf_ref(x / std::f64::consts::SQRT_2)),
        }
    }

    #[test]
    fn activation_backward_matches_finite_differences() {
        let mut rng = rng();
        for act in [Activation::None, Activation::Relu, Activation::Gelu] {
            // Inputs spread over [-4, 4], kept away from ReLU's kink where differences are undefined.
            let x: Vec<f64> = random(&mut rng, 200).into_iter().map(|v| if v.abs() < 1e-3 { 0.5 } else { 4.0 * v }).collect();
            let x: Vec<f64> = to_f32(&x).into_iter().map(|v| v as f64).collect();
            let r = random(&mut rng, x.len());
            let want = fd_grad(&x, 1e-5, |x| dot(&r, &x.iter().map(|&v| forward_ref(act, v)).collect::<Vec<_>>()));
            let mut dx = vec![0.0; x.len()];
            activation_backward(act, &to_f32(&x), &to_f32(&r), &mut dx);
            assert_close(&format!("{act:?}"), &dx, &want, 2e-6);
        }
    }
}
