//! Backward passes of the layer normalisations in [`crate::norm`].
//!
//! With `x̂ = (x - μ)·σ⁻¹` and `g = dy ⊙ γ`, the input gradient is
//! `dx = σ⁻¹ · (g - mean(g) - x̂ · mean(g ⊙ x̂))`; `dγ += Σ dy ⊙ x̂`, `dβ += Σ dy`. Statistics are
//! recomputed in f64 as in the forward, so nothing but the input has to be kept.

use rayon::prelude::*;

/// Gradient of one normalised group of `dim` values read with `stride` (1 for rows, the spatial
/// size for channels). Adds into `dx`; returns `x̂` for the caller's `dγ`.
// x, dy: [dim] at stride; dx: [dim] at stride; gamma: [dim].
#[allow(clippy::too_many_arguments)] // one group's view into the shared buffers; a struct would only rename them
fn group_backward(x: &[f32], dy: &[f32], gamma: &[f32], eps: f32, dim: usize, stride: usize, at: usize, dx: &mut [f32], xhat: &mut [f64]) {
    let get = |v: &[f32], c: usize| v[at + c * stride] as f64;
    let mean = (0..dim).map(|c| get(x, c)).sum::<f64>() / dim as f64;
    let var = (0..dim).map(|c| (get(x, c) - mean).powi(2)).sum::<f64>() / dim as f64;
    let inv = 1.0 / (var + eps as f64).sqrt();
    let (mut mean_g, mut mean_gx) = (0.0, 0.0);
    for c in 0..dim {
        xhat[c] = (get(x, c) - mean) * inv;
        let g = get(dy, c) * gamma[c] as f64;
        mean_g += g;
        mean_gx += g * xhat[c];
    }
    mean_g /= dim as f64;
    mean_gx /= dim as f64;
    for c in 0..dim {
        let g = get(dy, c) * gamma[c] as f64;
        dx[at + c * stride] += (inv * (g - mean_g - xhat[c] * mean_gx)) as f32;
    }
}

/// Backward of [`crate::norm::layer_norm`]: adds into `dx`, and into `dgamma`/`dbeta` when given.
// x, dy, dx: [rows, dim]; gamma, dgamma, dbeta: [dim].
#[allow(clippy::too_many_arguments)]
pub fn layer_norm_backward(x: &[f32], dy: &[f32], rows: usize, dim: usize, gamma: &[f32], eps: f32, dx: &mut [f32], dgamma: Option<&mut [f32]>, dbeta: Option<&mut [f32]>) {
    assert!(x.len() == rows * dim && dy.len() == x.len() && dx.len() == x.len(), "layer_norm_backward: x, dy, dx are not [rows, dim]");
    assert_eq!(gamma.len(), dim, "layer_norm_backward: gamma is not [dim]");
    if dim == 0 {
        return;
    }
    let partial = dx
        .par_chunks_mut(dim)
        .zip(x.par_chunks(dim).zip(dy.par_chunks(dim)))
        .fold(
            || (vec![0.0f64; dim], vec![0.0f64; dim], vec![0.0f64; dim]),
            |(mut dg, mut db, mut xhat), (dx, (x, dy))| {
                group_backward(x, dy, gamma, eps, dim, 1, 0, dx, &mut xhat);
                for c in 0..dim {
                    dg[c] += dy[c] as f64 * xhat[c];
                    db[c] += dy[c] as f64;
                }
                (dg, db, xhat)
            },
        )
        .map(|(dg, db, _)| (dg, db))
        .reduce(|| (vec![0.0; dim], vec![0.0; dim]), |(mut a, mut b), (c, d)| {
            a.iter_mut().zip(c).for_each(|(a, c)| *a += c);
            b.iter_mut().zip(d).for_each(|(b, d)| *b += d);
            (a, b)
        });
    if let Some(dgamma) = dgamma {
        dgamma.iter_mut().zip(&partial.0).for_each(|(d, &v)| *d += v as f32);
    }
    if let Some(dbeta) = dbeta {
        dbeta.iter_mut().zip(&partial.1).for_each(|(d, &v)| *d += v as f32);
    }
}

/// Backward of [`crate::norm::layer_norm_channels`] (NCHW, normalised over C for each pixel).
// x, dy, dx: [batch, channels, spatial]; gamma, dgamma, dbeta: [channels].
#[allow(clippy::too_many_arguments)]
pub fn layer_norm_channels_backward(
    x: &[f32],
    dy: &[f32],
    batch: usize,
    channels: usize,
    spatial: usize,
    gamma: &[f32],
    eps: f32,
    dx: &mut [f32],
    dgamma: Option<&mut [f32]>,
    dbeta: Option<&mut [f32]>,
) {
    assert!(x.len() == batch * channels * spatial && dy.len() == x.len() && dx.len() == x.len(), "layer_norm_channels_backward: x, dy, dx are not [B, C, HW]");
    assert_eq!(gamma.len(), channels, "layer_norm_channels_backward: gamma is not [C]");
    if x.is_empty() {
        return;
    }
    let plane = channels * spatial;
    // One task per image; pixels of an image are walked serially (strided access over C).
    let (dg, db) = dx
        .par_chunks_mut(plane)
        .zip(x.par_chunks(plane).zip(dy.par_chunks(plane)))
        .map(|(dx, (x, dy))| {
            let (mut dg, mut db, mut xhat) = (vec![0.0f64; channels], vec![0.0f64; channels], vec![0.0f64; channels]);
            for p in 0..spatial {
                group_backward(x, dy, gamma, eps, channels, spatial, p, dx, &mut xhat);
                for c in 0..channels {
                    dg[c] += dy[c * spatial + p] as f64 * xhat[c];
                    db[c] += dy[c * spatial + p] as f64;
                }
            }
            (dg, db)
        })
        .reduce(|| (vec![0.0; channels], vec![0.0; channels]), |(mut a, mut b), (c, d)| {
            a.iter_mut().zip(c).for_each(|(a, c)| *a += c);
            b.iter_mut().zip(d).for_each(|(b, d)| *b += d);
            (a, b)
        });
    if let Some(dgamma) = dgamma {
        dgamma.iter_mut().zip(&dg).for_each(|(d, &v)| *d += v as f32);
    }
    if let Some(dbeta) = dbeta {
        dbeta.iter_mut().zip(&db).for_each(|(d, &v)| *d += v as f32);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{assert_close, dot, fd_grad, random, rng, to_f32};
    use rand::Rng;

    /// Naive f64 normalisation of `groups` groups of `dim` values at `stride`.
    fn norm_ref(x: &[f64], gamma: &[f64], beta: &[f64], eps: f64, dim: usize, stride: usize, starts: &[usize]) -> Vec<f64> {
        let mut y = vec![0.0; x.len()];
        for &s in starts {
            let mean = (0..dim).map(|c| x[s + c * stride]).sum::<f64>() / dim as f64;
            let var = (0..dim).map(|c| (x[s + c * stride] - mean).powi(2)).sum::<f64>() / dim as f64;
            for c in 0..dim {
                y[s + c * stride] = (x[s + c * stride] - mean) / (var + eps).sqrt() * gamma[c] + beta[c];
            }
        }
        y
    }

    #[test]
    fn layer_norm_backward_matches_finite_differences() {
        let mut rng = rng();
        let (rows, dim, eps) = (rng.gen_range(1..9), rng.gen_range(2..24), 1e-5f32);
        let (x, gamma, beta, r) = (random(&mut rng, rows * dim), random(&mut rng, dim), random(&mut rng, dim), random(&mut rng, rows * dim));
        let starts: Vec<usize> = (0..rows).map(|i| i * dim).collect();
        let f = |x: &[f64], g: &[f64], b: &[f64]| dot(&r, &norm_ref(x, g, b, eps as f64, dim, 1, &starts));
        let want_dx = fd_grad(&x, 1e-6, |x| f(x, &gamma, &beta));
        let want_dg = fd_grad(&gamma, 1e-6, |g| f(&x, g, &beta));
        let want_db = fd_grad(&beta, 1e-6, |b| f(&x, &gamma, b));
        let (mut dx, mut dg, mut db) = (vec![0.0; x.len()], vec![0.0; dim], vec![0.0; dim]);
        layer_norm_backward(&to_f32(&x), &to_f32(&r), rows, dim, &to_f32(&gamma), eps, &mut dx, Some(&mut dg), Some(&mut db));
        assert_close("dx", &dx, &want_dx, 2e-5);
        assert_close("dgamma", &dg, &want_dg, 2e-5);
        assert_close("dbeta", &db, &want_db, 2e-5);
    }

    #[test]
    fn layer_norm_channels_backward_matches_finite_differences() {
        let mut rng = rng();
        let (batch, channels, spatial, eps) = (2, rng.gen_range(2..10), rng.gen_range(1..12), 1e-6f32);
        let n = batch * channels * spatial;
        let (x, gamma, beta, r) = (random(&mut rng, n), random(&mut rng, channels), random(&mut rng, channels), random(&mut rng, n));
        let starts: Vec<usize> = (0..batch).flat_map(|b| (0..spatial).map(move |p| b * channels * spatial + p)).collect();
        let f = |x: &[f64], g: &[f64], b: &[f64]| dot(&r, &norm_ref(x, g, b, eps as f64, channels, spatial, &starts));
        let want_dx = fd_grad(&x, 1e-6, |x| f(x, &gamma, &beta));
        let want_dg = fd_grad(&gamma, 1e-6, |g| f(&x, g, &beta));
        let want_db = fd_grad(&beta, 1e-6, |b| f(&x, &gamma, b));
        let (mut dx, mut dg, mut db) = (vec![0.0; n], vec![0.0; channels], vec![0.0; channels]);
        layer_norm_channels_backward(&to_f32(&x), &to_f32(&r), batch, channels, spatial, &to_f32(&gamma), eps, &mut dx, Some(&mut dg), Some(&mut db));
        assert_close("dx", &dx, &want_dx, 2e-5);
        assert_close("dgamma", &dg, &want_dg, 2e-5);
        assert_close("dbeta", &db, &want_db, 2e-5);
    }
}
