//! The tail of SAM's mask decoder as one operation: the image tokens upscaled 4x by
//! `output_upscaling` (2x2/stride-2 transposed convolution → LayerNorm2d → GELU → 2x2/stride-2
//! transposed convolution → GELU) and multiplied by the hypernetwork weights of each mask,
//! computed in bands of grid rows.
//!
//! Why: op by op, the tail writes and reads its 4 MiB and 8 MiB intermediates through memory
//! about a dozen times (the tokens' permute to NCHW, each convolution's scatter into NCHW, the
//! norm, both GELUs, the mask product), and those memory-bound passes were a fifth of a
//! LiteMedSAM decode. Here everything stays channels-last, as the transformer leaves the tokens:
//! - a grid pixel's first convolution is one GEMM row, `token · W1` with `W1`'s columns ordered
//!   (sub-pixel, channel), so each of its four output pixels is a contiguous run of `c1`
//!   channels: the LayerNorm2d is an ordinary row norm and that row is at once the second
//!   convolution's GEMM row, with bias and GELU in the GEMM's epilogue;
//! - the mask logits are one more GEMM against the hypernetwork weights, then the only scatter,
//!   of `k` floats per output pixel.
//!
//! A band's intermediates ([`BAND_BYTES`]) stay in the cache; only the tokens are read and only
//! the masks written.
//!
//! Every sum runs over the same inputs in the same order as the unfused path (the same
//! micro-kernels; the norm's statistics in f64), so the two agree to rounding (tests below).

use std::cell::RefCell;

use rayon::prelude::*;

use crate::activation::{self, Activation};
use crate::norm;
use crate::packed_gemm::{self, BOperand};
use crate::simd::{self, Isa};
use crate::weights::MatrixRef;

/// Kernel and stride of both transposed convolutions (SAM's `output_upscaling`).
const STRIDE: usize = 2;
/// Output pixels of one input pixel per convolution.
const SUB: usize = STRIDE * STRIDE;
/// Target size of one band's intermediates (first convolution, normalised, second convolution):
/// well inside the last-level cache. At SAM's 64x64 grid with 256 → 64 → 32 channels that is 8
/// grid rows a band.
const BAND_BYTES: usize = 4 << 20;

/// SAM's `output_upscaling` weights, each as stored (`[c_in, c_out, 2, 2]` row-major, any
/// precision).
#[derive(Clone, Copy)]
pub struct UpscalingWeights<'a> {
    /// `[c, c1, 2, 2]` and its bias `[c1]`.
    pub up1: MatrixRef<'a>,
    pub up1_bias: Option<&'a [f32]>,
    /// The LayerNorm2d over the `c1` channels.
    pub norm_gamma: &'a [f32],
    pub norm_beta: &'a [f32],
    pub norm_eps: f32,
    /// `[c1, c2, 2, 2]` and its bias `[c2]`.
    pub up2: MatrixRef<'a>,
    pub up2_bias: Option<&'a [f32]>,
}

thread_local! {
    /// Both reordered weights, the hypernetwork weights transposed, and a band's four
    /// intermediates: reused call after call, so a decode allocates nothing.
    static BUFFERS: RefCell<[Vec<f32>; 7]> = const { RefCell::new([Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new()]) };
}

/// `masks[m] = hyper[m] · gelu(up2(gelu(norm(up1(tokens)))))` at `4e x 4e`.
// tokens: [e·e, c], row i·e + j the grid cell (i, j); hyper: [k, c2]; masks: [k, 4e, 4e].
#[allow(clippy::too_many_arguments)]
pub fn upscale_masks(tokens: &[f32], e: usize, c: usize, c1: usize, c2: usize, weights: UpscalingWeights, hyper: &[f32], masks: &mut [f32]) {
    // Bytes of one grid row's intermediates: the first convolution and its normalised copy
    // (SUB·c1 per pixel each), the second convolution (SUB·SUB·c2) and the logits (SUB·SUB·k).
    let k = hyper.len().checked_div(c2).unwrap_or(0);
    let per_row = e * (2 * SUB * c1 + SUB * SUB * (c2 + k)) * std::mem::size_of::<f32>();
    let band = (BAND_BYTES / per_row.max(1)).clamp(1, e.max(1));
    upscale_masks_banded(simd::active(), tokens, e, c, c1, c2, weights, hyper, band, masks);
}

/// [`upscale_masks`] at a given SIMD level and band height (the tests take several).
#[allow(clippy::too_many_arguments)]
fn upscale_masks_banded(isa: Isa, tokens: &[f32], e: usize, c: usize, c1: usize, c2: usize, w: UpscalingWeights, hyper: &[f32], band: usize, masks: &mut [f32]) {
    assert!(band >= 1 && c2 > 0 && hyper.len().is_multiple_of(c2), "upscale_masks: a band of at least one row, hyper [k, c2]");
    let k = hyper.len() / c2;
    let side = 2 * STRIDE * e;
    assert_eq!(tokens.len(), e * e * c, "upscale_masks: tokens are not [e·e, c]");
    assert_eq!(masks.len(), k * side * side, "upscale_masks: masks are not [k, 4e, 4e]");
    assert!(w.norm_gamma.len() == c1 && w.norm_beta.len() == c1, "upscale_masks: norm is not [c1]");
    assert!(w.up1_bias.is_none_or(|b| b.len() == c1) && w.up2_bias.is_none_or(|b| b.len() == c2), "upscale_masks: a bias of the wrong length");
    if masks.is_empty() {
        return;
    }
    let with_buffers = |f: &mut dyn FnMut(&mut [Vec<f32>; 7])| {
        BUFFERS.with(|cell| match cell.try_borrow_mut() {
            Ok(mut bufs) => f(&mut bufs),
            // A second caller on this thread (waiting inside rayon): buffers of its own.
            Err(_) => f(&mut Default::default()),
        })
    };
    with_buffers(&mut |[w1, w2, hyper_t, first, normed, second, logits]| {
        sub_pixel_major(w.up1, c, c1, w1, first);
        sub_pixel_major(w.up2, c1, c2, w2, second);
        hyper_t.resize(c2 * k, 0.0);
        crate::transpose::transpose_block(hyper, c2, hyper_t, k, k, c2);
        for r0 in (0..e).step_by(band) {
            let rows = band.min(e - r0);
            let pixels = rows * e;
            first.resize(pixels * SUB * c1, 0.0);
            normed.resize(pixels * SUB * c1, 0.0);
            second.resize(pixels * SUB * SUB * c2, 0.0);
            logits.resize(pixels * SUB * SUB * k, 0.0);
            let band_tokens = &tokens[r0 * e * c..][..pixels * c];
            run_band(isa, band_tokens, pixels, c, c1, c2, k, &w, (&w1[..], &w2[..], &hyper_t[..]), (&mut first[..], &mut normed[..], &mut second[..], &mut logits[..]));
            scatter_band(logits, r0, rows, e, k, masks);
        }
    });
}

/// A stored `[c_in, c_out, 2, 2]` weight as the GEMM's `[c_in, SUB·c_out]` with columns ordered
/// (sub-pixel, channel), so that a GEMM row holds each output pixel's channels contiguously.
// stored: scratch of at least c_in·SUB·c_out (holds the dequantised weight); out: the reordered one.
fn sub_pixel_major(weight: MatrixRef, c_in: usize, c_out: usize, out: &mut Vec<f32>, stored: &mut Vec<f32>) {
    let len = c_in * c_out * SUB;
    stored.resize(len, 0.0);
    out.resize(len, 0.0);
    weight.dequantize_range(0, &mut stored[..len]);
    for (src, dst) in stored[..len].chunks_exact(c_out * SUB).zip(out.chunks_exact_mut(c_out * SUB)) {
        for (co, taps) in src.chunks_exact(SUB).enumerate() {
            for (s, &v) in taps.iter().enumerate() {
                dst[s * c_out + co] = v;
            }
        }
    }
}

/// One band of `pixels` grid pixels: both convolutions, the norm and GELUs, and the logits
/// `[pixels·SUB·SUB, k]`, row `(p·SUB + s1)·SUB + s2` for grid pixel `p`, first sub-pixel `s1`
/// and second `s2`.
#[allow(clippy::too_many_arguments)]
fn run_band(
    isa: Isa,
    tokens: &[f32],
    pixels: usize,
    c: usize,
    c1: usize,
    c2: usize,
    k: usize,
    w: &UpscalingWeights,
    (w1, w2, hyper_t): (&[f32], &[f32], &[f32]),
    (first, normed, second, logits): (&mut [f32], &mut [f32], &mut [f32], &mut [f32]),
) {
    fn plus_bias(isa: Isa, bias: Option<&[f32]>, channels: usize, act: Activation) -> impl Fn(usize, usize, &mut [f32]) + Sync + '_ {
        move |_row, col0, seg| {
            if let Some(b) = bias {
                // The segment's columns run through the channels periodically: add the bias in
                // runs of whole periods (a `%` per element was 8% of a decode).
                let (mut channel, mut rest) = (col0 % channels, &mut seg[..]);
                while !rest.is_empty() {
                    let (run, tail) = rest.split_at_mut((channels - channel).min(rest.len()));
                    run.iter_mut().zip(&b[channel..]).for_each(|(v, &bv)| *v += bv);
                    (channel, rest) = (0, tail);
                }
            }
            activation::apply_serial_at(isa, act, seg);
        }
    }
    // First convolution: [pixels, c] · [c, SUB·c1], bias; then LayerNorm2d and GELU per output
    // pixel, i.e. per row of `c1` channels.
    let (n1, n2) = (SUB * c1, SUB * c2);
    let epilogue = plus_bias(isa, w.up1_bias, c1, Activation::None);
    packed_gemm::gemm(isa, pixels, n1, c, tokens, c, BOperand::RowMajor { data: w1, ldb: n1 }, first, n1, &epilogue);
    norm::layer_norm_at(isa, first, pixels * SUB, c1, w.norm_gamma, w.norm_beta, w.norm_eps, normed);
    normed.par_chunks_mut(1 << 14).for_each(|chunk| activation::apply_serial_at(isa, Activation::Gelu, chunk));
    // Second convolution: [pixels·SUB, c1] · [c1, SUB·c2], bias and GELU in the epilogue.
    let epilogue = plus_bias(isa, w.up2_bias, c2, Activation::Gelu);
    packed_gemm::gemm(isa, pixels * SUB, n2, c1, normed, c1, BOperand::RowMajor { data: w2, ldb: n2 }, second, n2, &epilogue);
    // Logits: [pixels·SUB·SUB, c2] · [c2, k].
    let none = |_: usize, _: usize, _: &mut [f32]| {};
    packed_gemm::gemm(isa, pixels * SUB * SUB, k, c2, second, c2, BOperand::RowMajor { data: hyper_t, ldb: k }, logits, k, &none);
}

/// Writes a band's logits (grid rows `r0..r0 + rows`) to their places in the `[k, 4e, 4e]`
/// masks: grid pixel `(i, j)`, sub-pixels `(dy1, dx1)` and `(dy2, dx2)` land at
/// `(4i + 2·dy1 + dy2, 4j + 2·dx1 + dx2)`.
// logits: [rows·e·SUB·SUB, k]; masks: [k, 4e, 4e].
fn scatter_band(logits: &[f32], r0: usize, rows: usize, e: usize, k: usize, masks: &mut [f32]) {
    let side = 2 * STRIDE * e;
    let per_grid_row = side * 2 * STRIDE; // the output elements one grid row covers, per mask
    for (m, plane) in masks.chunks_exact_mut(side * side).enumerate() {
        let band_rows = &mut plane[r0 * per_grid_row..(r0 + rows) * per_grid_row];
        band_rows.par_chunks_mut(per_grid_row).enumerate().for_each(|(i, out)| {
            // out: output rows 4(r0 + i) .. 4(r0 + i) + 4 of mask m.
            for j in 0..e {
                let pixel = (i * e + j) * SUB * SUB;
                for s1 in 0..SUB {
                    for s2 in 0..SUB {
                        let (y, x) = (STRIDE * (s1 / STRIDE) + s2 / STRIDE, 2 * STRIDE * j + STRIDE * (s1 % STRIDE) + s2 % STRIDE);
                        out[y * side + x] = logits[(pixel + s1 * SUB + s2) * k + m];
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conv::conv_transpose2d;
    use crate::gemm::matmul;
    use crate::norm::layer_norm_channels;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn random(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect()
    }

    /// The unfused path the decoder ran before: permute to NCHW, transposed convolution,
    /// LayerNorm2d, GELU, transposed convolution, GELU, the mask product.
    #[allow(clippy::too_many_arguments)]
    fn unfused(tokens: &[f32], e: usize, c: usize, c1: usize, c2: usize, w: &UpscalingWeights, hyper: &[f32]) -> Vec<f32> {
        let k = hyper.len() / c2;
        let nchw: Vec<f32> = (0..c * e * e).map(|i| tokens[(i % (e * e)) * c + i / (e * e)]).collect();
        let mut up1 = vec![0.0; c1 * 4 * e * e];
        conv_transpose2d(&nchw, 1, c, e, e, w.up1, c1, STRIDE, w.up1_bias, &mut up1);
        let mut normed = vec![0.0; up1.len()];
        layer_norm_channels(&up1, 1, c1, 4 * e * e, w.norm_gamma, w.norm_beta, w.norm_eps, &mut normed);
        activation::apply(Activation::Gelu, &mut normed);
        let mut up2 = vec![0.0; c2 * 16 * e * e];
        conv_transpose2d(&normed, 1, c1, 2 * e, 2 * e, w.up2, c2, STRIDE, w.up2_bias, &mut up2);
        activation::apply(Activation::Gelu, &mut up2);
        let mut masks = vec![0.0; k * 16 * e * e];
        matmul(hyper, &up2, 1, k, c2, 16 * e * e, false, &mut masks);
        masks
    }

    /// The fused tail equals the unfused one on random weights, for bands of one row, a few
    /// rows, a ragged last band and the whole grid, at every SIMD level this CPU has, with and
    /// without biases and for one to four masks.
    #[test]
    fn fused_tail_matches_the_unfused_ops() {
        let mut rng = ChaCha8Rng::seed_from_u64(rand::random());
        let (e, c, c1, c2) = (7, 24, 12, 8);
        let tokens = random(&mut rng, e * e * c);
        let (w1, w2) = (random(&mut rng, c * c1 * SUB), random(&mut rng, c1 * c2 * SUB));
        let (b1, b2, gamma, beta) = (random(&mut rng, c1), random(&mut rng, c2), random(&mut rng, c1), random(&mut rng, c1));
        for (k, biased) in [(1, true), (3, true), (4, false)] {
            let hyper = random(&mut rng, k * c2);
            let w = UpscalingWeights {
                up1: MatrixRef::F32(&w1),
                up1_bias: biased.then_some(&b1[..]),
                norm_gamma: &gamma,
                norm_beta: &beta,
                norm_eps: 1e-6,
                up2: MatrixRef::F32(&w2),
                up2_bias: biased.then_some(&b2[..]),
            };
            let want = unfused(&tokens, e, c, c1, c2, &w, &hyper);
            let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            for isa in simd::supported() {
                for band in [1, 3, e] {
                    let mut got = vec![f32::NAN; want.len()];
                    upscale_masks_banded(isa, &tokens, e, c, c1, c2, w, &hyper, band, &mut got);
                    let worst = got.iter().zip(&want).map(|(g, w)| (g - w).abs()).fold(0.0f32, f32::max);
                    assert!(worst <= 1e-5 * scale, "{isa:?}, band {band}, k {k}: largest difference {worst} (scale {scale})");
                }
            }
        }
    }
}
