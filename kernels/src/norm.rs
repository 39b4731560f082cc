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

/// `layer_norm(x + delta)` in one pass over the rows: each row's sum is formed in `out` and
/// normalised there while it is in cache (a residual followed by a post-norm, as in SAM's
/// two-way transformer; apart, the sum went through memory between the two passes). Bit for
/// bit [`layer_norm`] of the f32 sum.
// x, delta, out: [rows, dim]; gamma, beta: [dim].
#[allow(clippy::too_many_arguments)]
pub fn add_layer_norm(x: &[f32], delta: &[f32], rows: usize, dim: usize, gamma: &[f32], beta: &[f32], eps: f32, out: &mut [f32]) {
    add_layer_norm_at(crate::simd::active(), x, delta, rows, dim, gamma, beta, eps, out);
}

/// [`add_layer_norm`] with the row loop built for `isa` (one `simd::supported` lists).
#[allow(clippy::too_many_arguments)]
pub(crate) fn add_layer_norm_at(isa: crate::simd::Isa, x: &[f32], delta: &[f32], rows: usize, dim: usize, gamma: &[f32], beta: &[f32], eps: f32, out: &mut [f32]) {
    assert!(x.len() == rows * dim && delta.len() == rows * dim, "add_layer_norm: x or delta is not [rows, dim]");
    assert_eq!(out.len(), rows * dim, "add_layer_norm: out is not [rows, dim]");
    assert!(gamma.len() == dim && beta.len() == dim, "add_layer_norm: gamma/beta are not [dim]");
    if dim == 0 {
        return;
    }
    // Rows per task: enough that a task is more than its scheduling (the decoder's rows are 256
    // floats), few enough that every thread gets several.
    let per_task = (1usize << 12).div_ceil(dim).max(1);
    out.par_chunks_mut(per_task * dim).zip(x.par_chunks(per_task * dim).zip(delta.par_chunks(per_task * dim))).for_each(|(o, (xs, ds))| {
        for ((row, xr), dr) in o.chunks_exact_mut(dim).zip(xs.chunks_exact(dim)).zip(ds.chunks_exact(dim)) {
            for ((r, &a), &b) in row.iter_mut().zip(xr).zip(dr) {
                *r = a + b;
            }
            match isa {
                // SAFETY: the caller passes a level the CPU supports.
                #[cfg(target_arch = "x86_64")]
                crate::simd::Isa::Avx512 => unsafe { norm_row_in_place_avx512(row, gamma, beta, eps) },
                #[cfg(target_arch = "x86_64")]
                crate::simd::Isa::Avx2Fma => unsafe { norm_row_in_place_avx2(row, gamma, beta, eps) },
                _ => norm_row_in_place(row, gamma, beta, eps),
            }
        }
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
    let (mean, inv_std) = row_statistics(row, eps);
    for (((o, &v), &g), &b) in out.iter_mut().zip(row).zip(gamma).zip(beta) {
        *o = normalise(v, mean, inv_std, g, b);
    }
}

/// A row's mean and `1 / sqrt(var + eps)`, both in f64, the variance from a second pass.
#[inline(always)]
fn row_statistics(row: &[f32], eps: f32) -> (f64, f64) {
    let dim = row.len() as f64;
    let mean = lane_sum(row, |v| v) / dim;
    let var = lane_sum(row, |v| (v - mean) * (v - mean)) / dim;
    (mean, 1.0 / (var + eps as f64).sqrt())
}

/// One element: `(v - mean) / std` rounded to f32, then scaled and shifted in f32.
#[inline(always)]
fn normalise(v: f32, mean: f64, inv_std: f64, g: f32, b: f32) -> f32 {
    ((v as f64 - mean) * inv_std) as f32 * g + b
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

/// [`norm_row`] over `row` itself: the same statistics and the same expression per element
/// (each element is read before it is overwritten), so the same bits.
// row, gamma, beta: [dim].
#[inline(always)]
fn norm_row_in_place(row: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32) {
    let (mean, inv_std) = row_statistics(row, eps);
    for ((v, &g), &b) in row.iter_mut().zip(gamma).zip(beta) {
        *v = normalise(*v, mean, inv_std, g, b);
    }
}

/// [`norm_row_in_place`] compiled for AVX-512.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn norm_row_in_place_avx512(row: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32) {
    norm_row_in_place(row, gamma, beta, eps)
}

/// [`norm_row_in_place`] compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn norm_row_in_place_avx2(row: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32) {
    norm_row_in_place(row, gamma, beta, eps)
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

    /// The fused residual and norm is bit for bit `layer_norm` of the f32 sum, at every SIMD
    /// level, on row counts that leave a ragged last task.
    #[test]
    fn add_layer_norm_equals_layer_norm_of_the_sum() {
        let mut rng = ChaCha8Rng::seed_from_u64(rand::random());
        for &(rows, dim, offset) in &[(4103, 256, 0.0f32), (7, 33, 5.0), (1, 1, 0.0), (37, 768, -3.0)] {
            let (x, delta) = (random(&mut rng, rows * dim, offset), random(&mut rng, rows * dim, 0.0));
            let (gamma, beta) = (random(&mut rng, dim, 1.0), random(&mut rng, dim, 0.0));
            let sum: Vec<f32> = x.iter().zip(&delta).map(|(a, b)| a + b).collect();
            for isa in crate::simd::supported() {
                let (mut want, mut got) = (vec![f32::NAN; rows * dim], vec![f32::NAN; rows * dim]);
                layer_norm_at(isa, &sum, rows, dim, &gamma, &beta, 1e-5, &mut want);
                add_layer_norm_at(isa, &x, &delta, rows, dim, &gamma, &beta, 1e-5, &mut got);
                assert!(got.iter().zip(&want).all(|(g, w)| g.to_bits() == w.to_bits()), "{isa:?} rows {rows} dim {dim}");
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
