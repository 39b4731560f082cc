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
    layer_norm_at(crate::simd::active(), x, rows, dim, gamma, beta, eps, out);
}

/// [`layer_norm`] with the row loop built for `isa` (one `simd::supported` lists).
// Shapes as in `layer_norm`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn layer_norm_at(isa: crate::simd::Isa, x: &[f32], rows: usize, dim: usize, gamma: &[f32], beta: &[f32], eps: f32, out: &mut [f32]) {
    assert_eq!(x.len(), rows * dim, "layer_norm: x is not [rows, dim]");
    assert_eq!(out.len(), rows * dim, "layer_norm: out is not [rows, dim]");
    assert!(gamma.len() == dim && beta.len() == dim, "layer_norm: gamma/beta are not [dim]");
    if dim == 0 {
        return;
    }
    out.par_chunks_mut(dim).zip(x.par_chunks(dim)).for_each(|(o, row)| match isa {
        // SAFETY: the caller passes a level the CPU supports.
        #[cfg(target_arch = "x86_64")]
        crate::simd::Isa::Avx512 => unsafe { norm_row_avx512(row, gamma, beta, eps, o) },
        #[cfg(target_arch = "x86_64")]
        crate::simd::Isa::Avx2Fma => unsafe { norm_row_avx2(row, gamma, beta, eps, o) },
        _ => norm_row(row, gamma, beta, eps, o),
    });
}

/// f64 partial sums kept per lane, so that the statistics vectorise: a single f64 accumulator
/// is a serial chain of dependent additions (the compiler may not reassociate it), which made
/// LayerNorm 4% of LiteMedSAM's encode. Eight lanes also round less than one running sum.
const SUM_LANES: usize = 8;

/// Σ f(v) over `row` in f64, as `SUM_LANES` interleaved partial sums added at the end.
#[inline(always)]
fn lane_sum(row: &[f32], f: impl Fn(f64) -> f64) -> f64 {
    let mut acc = [0.0f64; SUM_LANES];
    let chunks = row.chunks_exact(SUM_LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f(v as f64);
        }
    }
    for (a, &v) in acc.iter_mut().zip(tail) {
        *a += f(v as f64);
    }
    acc.iter().sum()
}

/// One row: two-pass f64 statistics (mean, then the mean of squared deviations), then
/// `(v - mean) / std * g + b`.
// row, gamma, beta, out: [dim].
#[inline(always)]
fn norm_row(row: &[f32], gamma: &[f32], beta: &[f32], eps: f32, out: &mut [f32]) {
    let dim = row.len() as f64;
    let mean = lane_sum(row, |v| v) / dim;
    let var = lane_sum(row, |v| (v - mean) * (v - mean)) / dim;
    let inv_std = 1.0 / (var + eps as f64).sqrt();
    for (((o, &v), &g), &b) in out.iter_mut().zip(row).zip(gamma).zip(beta) {
        *o = ((v as f64 - mean) * inv_std) as f32 * g + b;
    }
}

/// [`norm_row`] compiled for AVX-512 (eight f64 lanes per instruction).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn norm_row_avx512(row: &[f32], gamma: &[f32], beta: &[f32], eps: f32, out: &mut [f32]) {
    norm_row(row, gamma, beta, eps, out)
}

/// [`norm_row`] compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn norm_row_avx2(row: &[f32], gamma: &[f32], beta: &[f32], eps: f32, out: &mut [f32]) {
    norm_row(row, gamma, beta, eps, out)
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
        for &(rows, dim, offset) in &[(7, 33, 0.0f32), (64, 256, 50.0), (1, 1, 0.0), (3, 768, -3.0), (5, 7, 2.0), (4, 160, 0.0), (2, 17, 100.0)] {
            let x = random(&mut rng, rows * dim, offset);
            let gamma = random(&mut rng, dim, 1.0);
            let beta = random(&mut rng, dim, 0.0);
            let mut want = vec![0.0; rows * dim];
            for r in 0..rows {
                let row: Vec<f64> = x[r * dim..(r + 1) * dim].iter().map(|&v| v as f64).collect();
                for i in 0..dim {
                    want[r * dim + i] = reference(&row, gamma[i] as f64, beta[i] as f64, 1e-6, i);
                }
            }
            for isa in crate::simd::supported() {
                let mut out = vec![f32::NAN; rows * dim];
                layer_norm_at(isa, &x, rows, dim, &gamma, &beta, 1e-6, &mut out);
                let e = rel_err(&out, &want);
                assert!(e <= 1e-5, "{isa:?} rows {rows} dim {dim}: rel err {e}");
                // Element by element too: a lane left out of the sums shifts every value of a row.
                for (i, (&g, &w)) in out.iter().zip(&want).enumerate() {
                    assert!((g as f64 - w).abs() <= 1e-4 * (1.0 + w.abs()), "{isa:?} rows {rows} dim {dim} element {i}: {g} vs {w}");
                }
            }
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
