//! Layer normalisations: `torch.nn.LayerNorm` over the last dimension of row-major data, and
//! SAM's `LayerNorm2d`, which normalises NCHW activations over the channel axis of each pixel.
//!
//! Statistics use two passes in f64 (mean, then the mean of squared deviations): one-pass
//! `E[x²] - E[x]²` in f32 loses every digit when the mean is large compared with the spread, which
//! happens in the neck and the mask downscaler.

use rayon::prelude::*;

/// Normalises each row of `x` to zero mean and unit (biased) variance, then scales and shifts.
// x: [rows, dim], gamma: [dim], beta: [dim], out: [rows, dim].
pub fn layer_norm(x: &[f32], rows: usize, dim: usize, gamma: &[f32], beta: &[f32], eps: f32, out: &mut [f32]) {
    assert_eq!(x.len(), rows * dim, "layer_norm: x is not [rows, dim]");
    assert_eq!(out.len(), rows * dim, "layer_norm: out is not [rows, dim]");
    assert!(gamma.len() == dim && beta.len() == dim, "layer_norm: gamma/beta are not [dim]");
    if dim == 0 {
        return;
    }
    out.par_chunks_mut(dim).zip(x.par_chunks(dim)).for_each(|(o, row)| {
        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / dim as f64;
        let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / dim as f64;
        let inv_std = 1.0 / (var + eps as f64).sqrt();
        for (((o, &v), &g), &b) in o.iter_mut().zip(row).zip(gamma).zip(beta) {
            *o = ((v as f64 - mean) * inv_std) as f32 * g + b;
        }
    });
}

/// LayerNorm2d: for every pixel, normalises the `channels` values over the channel axis.
// x: [batch, channels, spatial] (NCHW with spatial = H*W), gamma, beta: [channels],
// out: [batch, channels, spatial].
#[allow(clippy::too_many_arguments)]
pub fn layer_norm_channels(x: &[f32], batch: usize, channels: usize, spatial: usize, gamma: &[f32], beta: &[f32], eps: f32, out: &mut [f32]) {
    assert_eq!(x.len(), batch * channels * spatial, "layer_norm_channels: x is not [B, C, HW]");
    assert_eq!(out.len(), x.len(), "layer_norm_channels: out is not [B, C, HW]");
    assert!(gamma.len() == channels && beta.len() == channels, "layer_norm_channels: gamma/beta are not [C]");
    if x.is_empty() {
        return;
    }
    // Pixels are independent: work on column blocks so the channel loop streams whole rows.
    const PIXELS_PER_TASK: usize = 256;
    let plane = channels * spatial;
    for (xb, ob) in x.chunks(plane).zip(out.chunks_mut(plane)) {
        let blocks = spatial.div_ceil(PIXELS_PER_TASK);
        let stats: Vec<(Vec<f64>, Vec<f64>)> = (0..blocks)
            .into_par_iter()
            .map(|blk| {
                let p0 = blk * PIXELS_PER_TASK;
                let n = PIXELS_PER_TASK.min(spatial - p0);
                let mut mean = vec![0.0f64; n];
                for c in 0..channels {
                    let row = &xb[c * spatial + p0..c * spatial + p0 + n];
                    mean.iter_mut().zip(row).for_each(|(m, &v)| *m += v as f64);
                }
                mean.iter_mut().for_each(|m| *m /= channels as f64);
                let mut var = vec![0.0f64; n];
                for c in 0..channels {
                    let row = &xb[c * spatial + p0..c * spatial + p0 + n];
                    var.iter_mut().zip(row).zip(&mean).for_each(|((s, &v), m)| *s += (v as f64 - m).powi(2));
                }
                let inv_std = var.iter().map(|s| 1.0 / (s / channels as f64 + eps as f64).sqrt()).collect();
                (mean, inv_std)
            })
            .collect();
        ob.par_chunks_mut(spatial).enumerate().for_each(|(c, orow)| {
            let xrow = &xb[c * spatial..(c + 1) * spatial];
            let (g, b) = (gamma[c], beta[c]);
            for (blk, (mean, inv_std)) in stats.iter().enumerate() {
                let p0 = blk * PIXELS_PER_TASK;
                for i in 0..mean.len() {
                    orow[p0 + i] = ((xrow[p0 + i] as f64 - mean[i]) * inv_std[i]) as f32 * g + b;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn rel_err(got: &[f32], want: &[f64]) -> f64 {
        let num: f64 = got.iter().zip(want).map(|(&g, &w)| (g as f64 - w).powi(2)).sum();
        let den: f64 = want.iter().map(|w| w * w).sum();
        (num / den).sqrt()
    }

    fn random(rng: &mut ChaCha8Rng, n: usize, offset: f32) -> Vec<f32> {
        (0..n).map(|_| offset + rng.gen_range(-1.0f32..1.0)).collect()
    }

    fn reference(values: &[f64], g: f64, b: f64, eps: f64, i: usize) -> f64 {
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
        (values[i] - mean) / (var + eps).sqrt() * g + b
    }

    #[test]
    fn layer_norm_matches_f64() {
        let mut rng = ChaCha8Rng::seed_from_u64(rand::random());
        for &(rows, dim, offset) in &[(7, 33, 0.0f32), (64, 256, 50.0), (1, 1, 0.0), (3, 768, -3.0)] {
            let x = random(&mut rng, rows * dim, offset);
            let gamma = random(&mut rng, dim, 1.0);
            let beta = random(&mut rng, dim, 0.0);
            let mut out = vec![f32::NAN; rows * dim];
            layer_norm(&x, rows, dim, &gamma, &beta, 1e-6, &mut out);
            let mut want = vec![0.0; rows * dim];
            for r in 0..rows {
                let row: Vec<f64> = x[r * dim..(r + 1) * dim].iter().map(|&v| v as f64).collect();
                for i in 0..dim {
                    want[r * dim + i] = reference(&row, gamma[i] as f64, beta[i] as f64, 1e-6, i);
                }
            }
            let e = rel_err(&out, &want);
            assert!(e <= 1e-5, "rows {rows} dim {dim}: rel err {e}");
        }
    }

    #[test]
    fn layer_norm_channels_matches_f64() {
        let mut rng = ChaCha8Rng::seed_from_u64(rand::random());
        for &(batch, channels, spatial, offset) in &[(2, 5, 300, 0.0f32), (1, 256, 17, 20.0), (1, 4, 1, 0.0), (3, 16, 513, -2.0)] {
            let x = random(&mut rng, batch * channels * spatial, offset);
            let gamma = random(&mut rng, channels, 1.0);
            let beta = random(&mut rng, channels, 0.0);
            let mut out = vec![f32::NAN; x.len()];
            layer_norm_channels(&x, batch, channels, spatial, &gamma, &beta, 1e-6, &mut out);
            let mut want = vec![0.0; x.len()];
            for b in 0..batch {
                for p in 0..spatial {
                    let pixel: Vec<f64> = (0..channels).map(|c| x[(b * channels + c) * spatial + p] as f64).collect();
                    for c in 0..channels {
                        want[(b * channels + c) * spatial + p] = reference(&pixel, gamma[c] as f64, beta[c] as f64, 1e-6, c);
                    }
                }
            }
            let e = rel_err(&out, &want);
            assert!(e <= 1e-5, "B {batch} C {channels} HW {spatial}: rel err {e}");
        }
    }
}
