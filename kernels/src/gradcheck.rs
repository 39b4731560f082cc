//! Test support for the backward kernels: central finite differences in f64 of a scalar loss,
//! and a comparison that reports the worst element. Each backward test writes a naive f64
//! forward, takes `loss = Σ r ⊙ forward(inputs)` for a random `r`, and checks the kernel's
//! gradient against the finite difference of that loss.

/// Central differences `(f(x + h·e_i) - f(x - h·e_i)) / 2h` for every `i`.
// x: [n]; returns [n].
pub fn fd_grad(x: &[f64], h: f64, f: impl Fn(&[f64]) -> f64) -> Vec<f64> {
    let mut probe = x.to_vec();
    (0..x.len())
        .map(|i| {
            probe[i] = x[i] + h;
            let plus = f(&probe);
            probe[i] = x[i] - h;
            let minus = f(&probe);
            probe[i] = x[i];
            (plus - minus) / (2.0 * h)
        })
        .collect()
}

/// Asserts `|got - want| <= tol · (1 + |want|)` elementwise, naming the worst element.
// got, want: [n].
pub fn assert_close(what: &str, got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    let mut worst = (0usize, 0.0f64);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g as f64 - w).abs() / (1.0 + w.abs());
        #[allow(clippy::neg_cmp_op_on_partial_ord)] // deliberate: a NaN error must become the worst
        if !(err <= worst.1) {
            worst = (i, err);
        }
    }
    assert!(worst.1 <= tol, "{what}: element {} is {} but finite differences give {} (scaled error {:.2e} > {tol:.0e})", worst.0, got[worst.0], want[worst.0], worst.1);
}

/// `Σ r_i · y_i`.
pub fn dot(r: &[f64], y: &[f64]) -> f64 {
    r.iter().zip(y).map(|(a, b)| a * b).sum()
}

/// Uniform values in `[-1, 1)` from a seeded generator, as f64 (the f32 inputs are these rounded).
pub fn random(rng: &mut impl rand::Rng, n: usize) -> Vec<f64> {
    (0..n).map(|_| rng.gen_range(-1.0..1.0f32) as f64).collect()
}

pub fn to_f32(x: &[f64]) -> Vec<f32> {
    x.iter().map(|&v| v as f32).collect()
}

pub fn rng() -> rand_chacha::ChaCha8Rng {
    use rand::SeedableRng;
    let seed = rand::random();
    eprintln!("seed {seed}");
    rand_chacha::ChaCha8Rng::seed_from_u64(seed)
}
