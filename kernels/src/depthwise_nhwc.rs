//! Depthwise convolution on channels-last (NHWC) tensors, stride 1, zero padding `k / 2`.
//!
//! Why: TinyViT's blocks keep their tokens as `[B, H, W, C]`, and each block's `local_conv`
//! (3x3 depthwise) used to go through NCHW and back: two whole-tensor permutes around a cheap
//! convolution. Here the channels are the vector lanes (16 per zmm): for each output pixel the
//! taps of `k x k` neighbours are accumulated channel-wise, reading the input where it lies.
//!
//! Every output element gets exactly the operations of the NCHW kernel at the same SIMD level
//! (`crate::conv::conv2d` with `groups == c`): with AVX-512, the bias, then one FMA per tap over
//! the rows inside the image and every column (a zero for columns outside it, as the NCHW
//! kernel's masked loads give); otherwise the bias plus `tap * v` for the taps inside the image,
//! in the same order. So the two layouts agree bit for bit (tests below).

use rayon::prelude::*;

use crate::simd::{self, Isa};
use crate::weights::MatrixRef;

/// `out[b, y, x, ch] = bias[ch] + Σ weight[ch, ky, kx] · x[b, y + ky - k/2, x + kx - k/2, ch]`.
// x, out: [batch, h, w, c]; weight: [c, 1, k, k] in any precision; bias: [c] or None.
#[allow(clippy::too_many_arguments)]
pub fn depthwise_nhwc(x: &[f32], batch: usize, h: usize, w: usize, c: usize, weight: MatrixRef, k: usize, bias: Option<&[f32]>, out: &mut [f32]) {
    depthwise_nhwc_at(simd::active(), x, batch, h, w, c, weight, k, bias, out);
}

/// [`depthwise_nhwc`] at level `isa` (one `simd::supported` lists; the tests run each).
#[allow(clippy::too_many_arguments)]
pub(crate) fn depthwise_nhwc_at(isa: Isa, x: &[f32], batch: usize, h: usize, w: usize, c: usize, weight: MatrixRef, k: usize, bias: Option<&[f32]>, out: &mut [f32]) {
    assert!(k % 2 == 1, "depthwise_nhwc: odd kernel, got {k}");
    assert_eq!(x.len(), batch * h * w * c, "depthwise_nhwc: x is not [batch, h, w, c]");
    assert_eq!(out.len(), x.len(), "depthwise_nhwc: out is not x's shape");
    assert!(bias.is_none_or(|b| b.len() == c), "depthwise_nhwc: bias is not [c]");
    if out.is_empty() {
        return;
    }
    TAPS.with(|cell| {
        let mut guard = cell.try_borrow_mut();
        let mut fresh = Default::default();
        // A second caller on this thread (waiting inside rayon) gets buffers of its own.
        let (stored, taps, zeros): &mut (Vec<f32>, Vec<f32>, Vec<f32>) = match guard.as_deref_mut() {
            Ok(bufs) => bufs,
            Err(_) => &mut fresh,
        };
        stored.resize(c * k * k, 0.0);
        weight.dequantize_range(0, stored);
        // Taps transposed to [ky][kx][c] so that one tap row of 16 channels is one load.
        taps.clear();
        taps.extend((0..k * k).flat_map(|t| (0..c).map(move |ch| (t, ch))).map(|(t, ch)| stored[ch * k * k + t]));
        zeros.resize(c, 0.0);
        let bias = bias.unwrap_or(zeros);
        let taps = &taps[..];
        let geometry = Geometry { h, w, c, k };
        out.par_chunks_mut(w * c).enumerate().for_each(|(row, dst)| {
            let (b, y) = (row / h, row % h);
            let image = &x[b * h * w * c..][..h * w * c];
            #[cfg(target_arch = "x86_64")]
            if isa == Isa::Avx512 {
                // SAFETY: `isa` is supported (caller's contract); the asserts above bound the image.
                unsafe { row_avx512(image, geometry, taps, bias, y, dst) };
                return;
            }
            let _ = isa;
            row_portable(image, geometry, taps, bias, y, dst);
        });
    });
}

thread_local! {
    /// The dequantised weight, its transposed taps and a zero bias: reused call after call.
    static TAPS: std::cell::RefCell<(Vec<f32>, Vec<f32>, Vec<f32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new(), Vec::new())) };
}

#[derive(Clone, Copy)]
struct Geometry {
    h: usize,
    w: usize,
    c: usize,
    k: usize,
}

/// Output row `y`, the NCHW portable kernel's order: bias, then `+= tap * v` for each tap inside
/// the image, rows then columns.
// image: [h, w, c]; taps: [k*k][c]; bias: [c]; dst: [w, c].
fn row_portable(image: &[f32], g: Geometry, taps: &[f32], bias: &[f32], y: usize, dst: &mut [f32]) {
    let half = g.k / 2;
    for (x, out) in dst.chunks_exact_mut(g.c).enumerate() {
        out.copy_from_slice(bias);
        for ky in 0..g.k {
            let Some(iy) = (y + ky).checked_sub(half).filter(|&iy| iy < g.h) else { continue };
            for kx in 0..g.k {
                let Some(ix) = (x + kx).checked_sub(half).filter(|&ix| ix < g.w) else { continue };
                let input = &image[(iy * g.w + ix) * g.c..][..g.c];
                let tap = &taps[(ky * g.k + kx) * g.c..][..g.c];
                for ((o, &t), &v) in out.iter_mut().zip(tap).zip(input) {
                    *o += t * v;
                }
            }
        }
    }
}

/// Output row `y` with AVX-512, the NCHW AVX-512 kernel's order: the bias, then one FMA per tap
/// for the kernel rows inside the image, a zero input for columns outside it.
///
/// # Safety
/// The CPU supports AVX-512F; shapes as in [`row_portable`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn row_avx512(image: &[f32], g: Geometry, taps: &[f32], bias: &[f32], y: usize, dst: &mut [f32]) {
    use std::arch::x86_64::*;
    let half = g.k / 2;
    let ky_range = half.saturating_sub(y)..g.k.min(g.h + half - y);
    for x in 0..g.w {
        for c0 in (0..g.c).step_by(16) {
            let lanes = 16.min(g.c - c0);
            let mask: __mmask16 = if lanes == 16 { 0xffff } else { (1u16 << lanes) - 1 };
            let mut acc = _mm512_maskz_loadu_ps(mask, bias.as_ptr().add(c0));
            for ky in ky_range.clone() {
                let iy = y + ky - half;
                for kx in 0..g.k {
                    let tap = _mm512_maskz_loadu_ps(mask, taps.as_ptr().add((ky * g.k + kx) * g.c + c0));
                    let v = match (x + kx).checked_sub(half).filter(|&ix| ix < g.w) {
                        Some(ix) => _mm512_maskz_loadu_ps(mask, image.as_ptr().add((iy * g.w + ix) * g.c + c0)),
                        None => _mm512_setzero_ps(),
                    };
                    acc = _mm512_fmadd_ps(tap, v, acc);
                }
            }
            _mm512_mask_storeu_ps(dst.as_mut_ptr().add(x * g.c + c0), mask, acc);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::activation::Activation;
    use crate::conv::{conv_depthwise_at, Geometry as ConvGeometry};
    use crate::nf4;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// NHWC against the NCHW convolution at the same level, on transposed copies: bit for bit, at
    /// every supported level, channel counts around the 16-lane chunks, images narrower than the
    /// kernel, f32 and NF4 taps, with and without bias.
    #[test]
    fn nhwc_equals_nchw_bit_for_bit() {
        let mut rng = ChaCha8Rng::seed_from_u64(rand::random());
        for &(batch, h, w, c, k) in &[(1, 9, 11, 16, 3), (2, 5, 7, 37, 3), (1, 2, 1, 5, 3), (1, 8, 6, 20, 5)] {
            let x: Vec<f32> = (0..batch * h * w * c).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let raw: Vec<f32> = (0..c * k * k).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let bias: Vec<f32> = (0..c).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let q = nf4::quantize(&raw);
            let nchw_x: Vec<f32> = (0..batch * c * h * w).map(|i| (i / (c * h * w), (i / (h * w)) % c, i % (h * w))).map(|(b, ch, p)| x[(b * h * w + p) * c + ch]).collect();
            for weight in [MatrixRef::F32(&raw), MatrixRef::Nf4(q.view())] {
                for bias in [Some(&bias[..]), None] {
                    for isa in simd::supported() {
                        let mut nchw = vec![f32::NAN; x.len()];
                        let g = ConvGeometry { h, w, kh: k, kw: k, stride: 1, padding: k / 2, oh: h, ow: w };
                        conv_depthwise_at(isa, &nchw_x, batch, c, g, weight, c, bias, Activation::None, &mut nchw);
                        let mut nhwc = vec![f32::NAN; x.len()];
                        depthwise_nhwc_at(isa, &x, batch, h, w, c, weight, k, bias, &mut nhwc);
                        for (i, &got) in nhwc.iter().enumerate() {
                            let (b, p, ch) = (i / (h * w * c), (i / c) % (h * w), i % c);
                            let want = nchw[(b * c + ch) * h * w + p];
                            assert_eq!(got.to_bits(), want.to_bits(), "{isa:?} {h}x{w}x{c} k {k} bias {}: element {i}: {got} vs {want}", bias.is_some());
                        }
                    }
                }
            }
        }
    }
}
