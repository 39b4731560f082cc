//! AVX-512 depthwise convolution of one channel plane, stride 1, with bias and activation fused.
//!
//! Why a kernel of its own: the portable path adds one tap at a time into the output row (one
//! load-multiply-add-store pass per tap, nine for TinyViT's 3x3) at SSE2 width, then runs the
//! activation as another pass. Here 16 output pixels stay in one register while every tap is
//! accumulated with an FMA, the bias starts the sum and GELU/ReLU is applied before the single
//! store. The zero padding is handled with masked loads: lanes whose input column falls outside
//! the row are masked off (they read as zero and never touch memory), so the border needs no
//! padded copy. LiteMedSAM runs this on 256 channels of 256x256 in every MBConv.

use std::arch::x86_64::*;

use crate::activation::Activation;

/// Shape of one plane: input `h x w`, kernel `kh x kw`, zero padding on every side, stride 1,
/// output `oh x ow` (`oh = h + 2p - kh + 1`, likewise `ow`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Plane {
    pub h: usize,
    pub w: usize,
    pub kh: usize,
    pub kw: usize,
    pub padding: usize,
    pub oh: usize,
    pub ow: usize,
}

/// Lanes `lo..hi` set (both within 0..=16).
#[inline]
fn lane_mask(lo: usize, hi: usize) -> __mmask16 {
    if hi <= lo {
        return 0;
    }
    (((1u32 << (hi - lo)) - 1) << lo) as __mmask16
}

/// `dst = act(bias + Σ taps[ky][kx] · src[oy + ky - p][ox + kx - p])` for the output rows
/// `rows` of the plane.
///
/// # Safety
/// The CPU must support AVX-512F; `src` holds `h * w` floats, `taps` `kh * kw`, `dst`
/// `rows.len() * ow`, `rows` lies within `0..oh`, and the geometry is consistent (`oh`, `ow` as
/// above).
// src: [h, w]; taps: [kh, kw]; dst: [rows.len(), ow].
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn plane(src: &[f32], p: Plane, taps: &[f32], bias: f32, act: Activation, rows: std::ops::Range<usize>, dst: &mut [f32]) {
    debug_assert!(src.len() >= p.h * p.w && taps.len() >= p.kh * p.kw && dst.len() >= rows.len() * p.ow && rows.end <= p.oh);
    debug_assert!(p.oh + p.kh == p.h + 2 * p.padding + 1 && p.ow + p.kw == p.w + 2 * p.padding + 1);
    let (w, pad) = (p.w as isize, p.padding as isize);
    let bias_v = _mm512_set1_ps(bias);
    for (r, oy) in rows.enumerate() {
        // Kernel rows whose input row lies inside the image.
        let ky_lo = p.padding.saturating_sub(oy);
        let ky_hi = p.kh.min((p.h + p.padding).saturating_sub(oy));
        let out_row = dst.as_mut_ptr().add(r * p.ow);
        for ox0 in (0..p.ow).step_by(16) {
            let lanes = 16.min(p.ow - ox0);
            let mut acc = bias_v;
            for ky in ky_lo..ky_hi {
                let row = src.as_ptr().add((oy + ky - p.padding) * p.w);
                let tap_row = taps.as_ptr().add(ky * p.kw);
                for kx in 0..p.kw {
                    let tap = _mm512_set1_ps(*tap_row.add(kx));
                    // Input column of lane 0; lane l reads ix0 + l.
                    let ix0 = ox0 as isize + kx as isize - pad;
                    let v = if lanes == 16 && ix0 >= 0 && ix0 + 16 <= w {
                        _mm512_loadu_ps(row.offset(ix0))
                    } else {
                        let lo = (-ix0).clamp(0, 16) as usize;
                        let hi = (w - ix0).clamp(0, lanes as isize) as usize;
                        // Masked-off lanes are not accessed, so the pointer may lie outside the
                        // row (hence `wrapping_offset`, never dereferenced there).
                        _mm512_maskz_loadu_ps(lane_mask(lo, hi), row.wrapping_offset(ix0))
                    };
                    acc = _mm512_fmadd_ps(tap, v, acc);
                }
            }
            let out = match act {
                Activation::None => acc,
                Activation::Relu => _mm512_max_ps(acc, _mm512_setzero_ps()),
                Activation::Gelu => crate::gelu_avx512::gelu16(acc),
            };
            if lanes == 16 {
                _mm512_storeu_ps(out_row.add(ox0), out);
            } else {
                _mm512_mask_storeu_ps(out_row.add(ox0), lane_mask(0, lanes), out);
            }
        }
    }
}
