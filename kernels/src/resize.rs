//! Image and logit resizing with the exact arithmetic of the libraries the reference pipelines
//! use, because the golden outputs were produced by them and a one-grey-level difference in the
//! input already moves the logits:
//! - [`bilinear`]: `torch.nn.functional.interpolate(mode="bilinear", align_corners=False)` on f32
//!   planes (mask logits 256 → 1024 → H×W);
//! - [`resize_area_u8`]: OpenCV `cv2.resize(..., interpolation=cv2.INTER_AREA)` on interleaved
//!   uint8 (LiteMedSAM's preprocessing);
//! - [`resize_bilinear_pil_u8`]: PIL `Image.resize(size, Image.BILINEAR)` on interleaved uint8
//!   (SAM / MobileSAM's `ResizeLongestSide`).

use rayon::prelude::*;

/// Source taps of one output coordinate under torch's `align_corners=False` rule.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LinearTap {
    pub(crate) i0: usize,
    pub(crate) i1: usize,
    pub(crate) w0: f32,
    pub(crate) w1: f32,
}

/// Taps for every output coordinate, computed in f32 exactly as torch's CPU kernel does.
// in_size, out_size >= 1; returns [out_size] taps.
pub(crate) fn torch_linear_taps(in_size: usize, out_size: usize) -> Vec<LinearTap> {
    let scale = in_size as f32 / out_size as f32;
    (0..out_size)
        .map(|d| {
            let real = (scale * (d as f32 + 0.5) - 0.5).max(0.0);
            let i0 = (real as usize).min(in_size - 1);
            let w1 = (real - i0 as f32).clamp(0.0, 1.0);
            let i1 = if i0 < in_size - 1 { i0 + 1 } else { i0 };
            LinearTap { i0, i1, w0: 1.0 - w1, w1 }
        })
        .collect()
}

/// Bilinear resize of each plane with PyTorch's `align_corners=False, antialias=False` semantics.
// x: [planes, h, w]; out: [planes, out_h, out_w].
pub fn bilinear(x: &[f32], planes: usize, h: usize, w: usize, out_h: usize, out_w: usize, out: &mut [f32]) {
    bilinear_map(x, planes, h, w, out_h, out_w, out, |v| v);
}

/// `bilinear(..) > 0` as a 0/1 mask, without the f32 plane in between: a decoded mask at the
/// frame's resolution (800x540 and more) is one pass instead of a resize, a threshold pass and
/// the float buffer between them. Same arithmetic as [`bilinear`], so the same decisions.
// x: [planes, h, w]; out: [planes, out_h, out_w].
pub fn bilinear_mask(x: &[f32], planes: usize, h: usize, w: usize, out_h: usize, out_w: usize, out: &mut [u8]) {
    bilinear_map(x, planes, h, w, out_h, out_w, out, |v| u8::from(v > 0.0));
}

/// [`bilinear`] with each interpolated value passed through `f` on its way out.
// x: [planes, h, w]; out: [planes, out_h, out_w].
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn bilinear_map<T: Send>(x: &[f32], planes: usize, h: usize, w: usize, out_h: usize, out_w: usize, out: &mut [T], f: impl Fn(f32) -> T + Sync) {
    assert_eq!(x.len(), planes * h * w, "bilinear: x is not [planes, h, w]");
    assert_eq!(out.len(), planes * out_h * out_w, "bilinear: out is not [planes, out_h, out_w]");
    if out.is_empty() {
        return;
    }
    assert!(h > 0 && w > 0, "bilinear: empty input plane");
    let (ys, xs) = (torch_linear_taps(h, out_h), torch_linear_taps(w, out_w));
    out.par_chunks_mut(out_w).enumerate().for_each(|(row, dst)| {
        let (plane, oy) = (row / out_h, row % out_h);
        let ty = ys[oy];
        let src = &x[plane * h * w..(plane + 1) * h * w];
        let (r0, r1) = (&src[ty.i0 * w..(ty.i0 + 1) * w], &src[ty.i1 * w..(ty.i1 + 1) * w]);
        for (o, tx) in dst.iter_mut().zip(&xs) {
            // Same association as torch: interpolate along x within each row, then along y.
            let top = r0[tx.i0] * tx.w0 + r0[tx.i1] * tx.w1;
            let bottom = r1[tx.i0] * tx.w0 + r1[tx.i1] * tx.w1;
            *o = f(top * ty.w0 + bottom * ty.w1);
        }
    });
}

// ---------------------------------------------------------------------------------------------
// OpenCV INTER_AREA
// ---------------------------------------------------------------------------------------------

/// OpenCV's `saturate_cast<uchar>(float)`: round half to even, then clamp.
#[inline]
fn saturate_u8(v: f32) -> u8 {
    v.round_ties_even().clamp(0.0, 255.0) as u8
}

/// One term of OpenCV's area-decimation table: destination index, source index, weight.
#[derive(Clone, Copy, Debug)]
struct AreaTap {
    dst: usize,
    src: usize,
    alpha: f32,
}

/// OpenCV's `computeResizeAreaTab` for one axis (indices in pixels, not yet times channels).
// src_size, dst_size: axis lengths; scale = src/dst (as OpenCV computes it, >= 1).
fn area_taps(src_size: usize, dst_size: usize, scale: f64) -> Vec<AreaTap> {
    let mut taps = Vec::with_capacity(2 * src_size);
    for dx in 0..dst_size {
        let fsx1 = dx as f64 * scale;
        let fsx2 = fsx1 + scale;
        let cell_width = scale.min(src_size as f64 - fsx1);
        let mut sx1 = fsx1.ceil() as isize;
        let sx2 = (fsx2.floor() as isize).min(src_size as isize - 1);
        sx1 = sx1.min(sx2);
        if sx1 as f64 - fsx1 > 1e-3 {
            taps.push(AreaTap {
                dst: dx,
                src: (sx1 - 1) as usize,
                alpha: ((sx1 as f64 - fsx1) / cell_width) as f32,
            });
        }
        for sx in sx1..sx2 {
            taps.push(AreaTap {
                dst: dx,
                src: sx as usize,
                alpha: (1.0 / cell_width) as f32,
            });
        }
        if fsx2 - sx2 as f64 > 1e-3 {
            taps.push(AreaTap {
                dst: dx,
                src: sx2 as usize,
                alpha: ((fsx2 - sx2 as f64).min(1.0).min(cell_width) / cell_width) as f32,
            });
        }
    }
    taps
}

/// OpenCV's true area decimation for non-integer factors: every destination pixel is the
/// overlap-weighted mean of the source pixels under it, accumulated in f32 row by row.
// src: [h, w, cn]; out: [out_h, out_w, cn]; both scales >= 1.
#[allow(clippy::too_many_arguments)]
fn area_decimate(src: &[u8], h: usize, w: usize, cn: usize, out_h: usize, out_w: usize, scale_x: f64, scale_y: f64, out: &mut [u8]) {
    let xtab = area_taps(w, out_w, scale_x);
    let ytab = area_taps(h, out_h, scale_y);
    let width = out_w * cn;
    out.par_chunks_mut(width).enumerate().for_each(|(dy, dst)| {
        let mut sum = vec![0.0f32; width];
        let mut buf = vec![0.0f32; width];
        for ty in ytab.iter().filter(|t| t.dst == dy) {
            let row = &src[ty.src * w * cn..(ty.src + 1) * w * cn];
            buf.fill(0.0);
            for tx in &xtab {
                for c in 0..cn {
                    let d = tx.dst * cn + c;
                    buf[d] += row[tx.src * cn + c] as f32 * tx.alpha;
                }
            }
            for (s, &b) in sum.iter_mut().zip(&buf) {
                *s += ty.alpha * b;
            }
        }
        for (d, &s) in dst.iter_mut().zip(&sum) {
            *d = saturate_u8(s);
        }
    });
}

/// OpenCV's `resizeAreaFast_` for integer factors: a plain box mean. For 2x2 boxes OpenCV's vector
/// path rounds half up with `(sum + 2) >> 2`; other boxes go through `saturate_cast(sum * (1/area))`.
// src: [h, w, cn]; out: [out_h, out_w, cn]; fx, fy: integer factors.
#[allow(clippy::too_many_arguments)]
fn area_integer(src: &[u8], h: usize, w: usize, cn: usize, out_h: usize, out_w: usize, fx: usize, fy: usize, out: &mut [u8]) {
    let two_by_two = fx == 2 && fy == 2 && (cn == 1 || cn == 3 || cn == 4);
    let inv_area = 1.0f32 / (fx * fy) as f32;
    debug_assert_eq!(out.len(), out_h * out_w * cn);
    let full_cols = w / fx; // destination columns whose box lies wholly inside the source
    out.par_chunks_mut(out_w * cn).enumerate().for_each(|(dy, dst)| {
        let sy0 = dy * fy;
        let full_row = sy0 + fy <= h;
        for dx in 0..out_w {
            for c in 0..cn {
                let mut sum = 0u32;
                let mut count = 0u32;
                for sy in sy0..(sy0 + fy).min(h) {
                    for sx in dx * fx..(dx * fx + fx).min(w) {
                        sum += src[(sy * w + sx) * cn + c] as u32;
                        count += 1;
                    }
                }
                dst[dx * cn + c] = if full_row && dx < full_cols {
                    if two_by_two {
                        ((sum + 2) >> 2) as u8
                    } else {
                        saturate_u8(sum as f32 * inv_area)
                    }
                } else if count == 0 {
                    0
                } else {
                    saturate_u8(sum as f32 / count as f32)
                };
            }
        }
    });
}

/// Fixed-point resolution of OpenCV's linear interpolation weights (`INTER_RESIZE_COEF_BITS`).
const CV_COEF_BITS: u32 = 11;
const CV_COEF_ONE: i32 = 1 << CV_COEF_BITS;

/// One axis of OpenCV's linear resize in "area mode" (what INTER_AREA does when enlarging):
/// the two source indices and their fixed-point weights.
#[derive(Clone, Copy, Debug)]
struct CvLinearTap {
    i0: usize,
    i1: usize,
    a0: i32,
    a1: i32,
}

// src_size, dst_size: axis lengths; scale = src/dst, inv_scale = dst/src (as OpenCV has them).
fn cv_area_mode_taps(src_size: usize, dst_size: usize, scale: f64, inv_scale: f64) -> Vec<CvLinearTap> {
    (0..dst_size)
        .map(|d| {
            let mut sx = (d as f64 * scale).floor() as isize;
            let mut fx = ((d + 1) as f64 - (sx + 1) as f64 * inv_scale) as f32;
            fx = if fx <= 0.0 { 0.0 } else { fx - fx.floor() };
            if sx < 0 {
                fx = 0.0;
                sx = 0;
            }
            if sx >= src_size as isize - 1 {
                fx = 0.0;
                sx = src_size as isize - 1;
            }
            let a0 = ((1.0f32 - fx) * CV_COEF_ONE as f32).round_ties_even() as i32;
            let a1 = (fx * CV_COEF_ONE as f32).round_ties_even() as i32;
            let i0 = sx as usize;
            // OpenCV clamps the second source row/column into the image.
            CvLinearTap {
                i0,
                i1: (i0 + 1).min(src_size - 1),
                a0,
                a1,
            }
        })
        .collect()
}

/// OpenCV's fixed-point vertical blend of two horizontally interpolated rows. The SIMD path
/// (which covers all but the last few values of a row) pre-shifts by 4 and keeps the high half
/// of 16x16-bit products; the scalar tail rounds the full 22-bit product. Both are reproduced.
// s0, s1: horizontally interpolated rows (values scaled by 2^11); dst: output row.
fn cv_vertical_blend(s0: &[i32], s1: &[i32], b0: i32, b1: i32, dst: &mut [u8]) {
    const LANES_U8: usize = 16; // 128-bit SIMD, OpenCV's x86-64 baseline
    const LANES_I16: usize = 8;
    let width = dst.len();
    // Where OpenCV's vector loops stop: whole 16-byte vectors, then 8-lane steps while *strictly*
    // more than 8 values remain; the rest is scalar.
    let mut simd_end = width / LANES_U8 * LANES_U8;
    while simd_end + LANES_I16 < width {
        simd_end += LANES_I16;
    }
    for (x, d) in dst.iter_mut().enumerate() {
        *d = if x < simd_end {
            let t0 = ((s0[x] >> 4) * b0) >> 16;
            let t1 = ((s1[x] >> 4) * b1) >> 16;
            ((t0 + t1 + 2) >> 2).clamp(0, 255) as u8
        } else {
            ((s0[x] * b0 + s1[x] * b1 + (1 << 21)) >> 22).clamp(0, 255) as u8
        };
    }
}

/// OpenCV INTER_AREA when at least one axis is enlarged: bilinear-like weights from the pixel
/// overlap ("area mode" of the linear resizer), in 11-bit fixed point per axis.
// src: [h, w, cn]; out: [out_h, out_w, cn].
#[allow(clippy::too_many_arguments)]
fn area_enlarge(src: &[u8], h: usize, w: usize, cn: usize, out_h: usize, out_w: usize, scales: [f64; 4], out: &mut [u8]) {
    let [scale_x, scale_y, inv_x, inv_y] = scales;
    let xtab = cv_area_mode_taps(w, out_w, scale_x, inv_x);
    let ytab = cv_area_mode_taps(h, out_h, scale_y, inv_y);
    // OpenCV stops using the right tap from the first destination column whose left tap is the
    // last source column; such columns are `S[last] * ONE`, which the taps above already give.
    let horizontal = |sy: usize| -> Vec<i32> {
        let row = &src[sy * w * cn..(sy + 1) * w * cn];
        let mut d = vec![0i32; out_w * cn];
        for (dx, t) in xtab.iter().enumerate() {
            for c in 0..cn {
                d[dx * cn + c] = row[t.i0 * cn + c] as i32 * t.a0 + row[t.i1 * cn + c] as i32 * t.a1;
            }
        }
        d
    };
    out.par_chunks_mut(out_w * cn).enumerate().for_each(|(dy, dst)| {
        let t = ytab[dy];
        let (r0, r1) = (horizontal(t.i0), horizontal(t.i1));
        cv_vertical_blend(&r0, &r1, t.a0, t.a1, dst);
    });
}

/// `cv2.resize(src, (out_w, out_h), interpolation=cv2.INTER_AREA)` for interleaved uint8.
// src: [h, w, channels] row-major (HWC); out: [out_h, out_w, channels].
pub fn resize_area_u8(src: &[u8], h: usize, w: usize, channels: usize, out_h: usize, out_w: usize, out: &mut [u8]) {
    assert_eq!(src.len(), h * w * channels, "resize_area_u8: src is not [h, w, channels]");
    assert_eq!(out.len(), out_h * out_w * channels, "resize_area_u8: out is not [out_h, out_w, channels]");
    if out.is_empty() {
        return;
    }
    assert!(h > 0 && w > 0, "resize_area_u8: empty source");
    if (h, w) == (out_h, out_w) {
        out.copy_from_slice(src);
        return;
    }
    // The same doubles OpenCV derives from the sizes.
    let inv_x = out_w as f64 / w as f64;
    let inv_y = out_h as f64 / h as f64;
    let (scale_x, scale_y) = (1.0 / inv_x, 1.0 / inv_y);
    if scale_x >= 1.0 && scale_y >= 1.0 {
        let (ix, iy) = (scale_x.round(), scale_y.round());
        let integer = (scale_x - ix).abs() < f64::EPSILON && (scale_y - iy).abs() < f64::EPSILON;
        if integer {
            area_integer(src, h, w, channels, out_h, out_w, ix as usize, iy as usize, out);
        } else {
            area_decimate(src, h, w, channels, out_h, out_w, scale_x, scale_y, out);
        }
    } else {
        area_enlarge(src, h, w, channels, out_h, out_w, [scale_x, scale_y, inv_x, inv_y], out);
    }
}

// ---------------------------------------------------------------------------------------------
// PIL BILINEAR
// ---------------------------------------------------------------------------------------------

/// Fixed-point resolution of PIL's 8-bit resampling coefficients (`PRECISION_BITS`).
const PIL_PRECISION_BITS: u32 = 32 - 8 - 2;

/// PIL's triangle filter (support 1).
fn pil_triangle(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 {
        1.0 - x
    } else {
        0.0
    }
}

/// Taps of one output coordinate in PIL's resampler: first source index and fixed-point weights.
#[derive(Clone, Debug)]
struct PilTaps {
    first: usize,
    weights: Vec<i32>,
}

/// PIL's `precompute_coeffs` + `normalize_coeffs_8bpc` for the bilinear filter on one axis:
/// the triangle is stretched by the downscale factor (antialiasing), weights are normalised in
/// f64 and rounded to 22-bit fixed point.
// in_size, out_size >= 1; returns [out_size] taps.
fn pil_taps(in_size: usize, out_size: usize) -> Vec<PilTaps> {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = filter_scale; // triangle support 1.0, stretched
    let inv_filter_scale = 1.0 / filter_scale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            // C's (int) cast truncates toward zero; so does `as`.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let raw: Vec<f64> = (xmin..xmax).map(|x| pil_triangle((x as f64 - center + 0.5) * inv_filter_scale)).collect();
            let total: f64 = raw.iter().sum();
            let one = (1u32 << PIL_PRECISION_BITS) as f64;
            let weights = raw
                .iter()
                .map(|&k| {
                    let k = if total != 0.0 { k / total } else { k };
                    if k < 0.0 {
                        (-0.5 + k * one) as i32
                    } else {
                        (0.5 + k * one) as i32
                    }
                })
                .collect();
            PilTaps { first: xmin, weights }
        })
        .collect()
}

/// PIL's rounding and clipping of a fixed-point accumulator to a byte.
#[inline]
fn pil_clip8(acc: i64) -> u8 {
    (acc >> PIL_PRECISION_BITS).clamp(0, 255) as u8
}

/// `Image.resize((out_w, out_h), Image.BILINEAR)` for interleaved uint8 (modes L, RGB, RGBA):
/// a horizontal pass to uint8, then a vertical pass, each skipped when its axis keeps its size.
// src: [h, w, channels] (HWC); out: [out_h, out_w, channels].
pub fn resize_bilinear_pil_u8(src: &[u8], h: usize, w: usize, channels: usize, out_h: usize, out_w: usize, out: &mut [u8]) {
    assert_eq!(src.len(), h * w * channels, "resize_bilinear_pil_u8: src is not [h, w, channels]");
    assert_eq!(
        out.len(),
        out_h * out_w * channels,
        "resize_bilinear_pil_u8: out is not [out_h, out_w, channels]"
    );
    if out.is_empty() {
        return;
    }
    assert!(h > 0 && w > 0, "resize_bilinear_pil_u8: empty source");
    let cn = channels;
    let round_half = 1i64 << (PIL_PRECISION_BITS - 1);
    let horizontal: Vec<u8> = if w == out_w {
        src.to_vec()
    } else {
        let taps = pil_taps(w, out_w);
        let mut tmp = vec![0u8; h * out_w * cn];
        tmp.par_chunks_mut(out_w * cn).enumerate().for_each(|(y, dst)| {
            let row = &src[y * w * cn..(y + 1) * w * cn];
            for (xx, t) in taps.iter().enumerate() {
                for c in 0..cn {
                    let mut acc = round_half;
                    for (i, &k) in t.weights.iter().enumerate() {
                        acc += row[(t.first + i) * cn + c] as i64 * k as i64;
                    }
                    dst[xx * cn + c] = pil_clip8(acc);
                }
            }
        });
        tmp
    };
    if h == out_h {
        out.copy_from_slice(&horizontal);
        return;
    }
    let taps = pil_taps(h, out_h);
    let row_len = out_w * cn;
    out.par_chunks_mut(row_len).enumerate().for_each(|(yy, dst)| {
        let t = &taps[yy];
        for (x, d) in dst.iter_mut().enumerate() {
            let mut acc = round_half;
            for (i, &k) in t.weights.iter().enumerate() {
                acc += horizontal[(t.first + i) * row_len + x] as i64 * k as i64;
            }
            *d = pil_clip8(acc);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn rng() -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(rand::random())
    }

    fn random_u8(rng: &mut ChaCha8Rng, n: usize) -> Vec<u8> {
        (0..n).map(|_| rng.gen()).collect()
    }

    /// torch's bilinear formula, transcribed in f64 (source = (dst + 0.5) * in/out - 0.5, clamped).
    fn naive_bilinear(x: &[f32], planes: usize, h: usize, w: usize, oh: usize, ow: usize) -> Vec<f64> {
        let tap = |d: usize, n_in: usize, n_out: usize| -> (usize, usize, f64) {
            let s = ((d as f64 + 0.5) * n_in as f64 / n_out as f64 - 0.5).max(0.0);
            let i0 = (s.floor() as usize).min(n_in - 1);
            let i1 = (i0 + 1).min(n_in - 1);
            (i0, i1, (s - i0 as f64).min(1.0))
        };
        let mut out = vec![0.0; planes * oh * ow];
        for p in 0..planes {
            for oy in 0..oh {
                let (y0, y1, fy) = tap(oy, h, oh);
                for ox in 0..ow {
                    let (x0, x1, fx) = tap(ox, w, ow);
                    let v = |y: usize, xx: usize| x[(p * h + y) * w + xx] as f64;
                    out[(p * oh + oy) * ow + ox] = (1.0 - fy) * ((1.0 - fx) * v(y0, x0) + fx * v(y0, x1)) + fy * ((1.0 - fx) * v(y1, x0) + fx * v(y1, x1));
                }
            }
        }
        out
    }

    #[test]
    fn bilinear_mask_is_bilinear_thresholded() {
        let mut rng = rng();
        for &(planes, h, w, oh, ow) in &[(1, 173, 256, 540, 800), (2, 7, 5, 13, 11), (1, 1, 1, 3, 4)] {
            let x: Vec<f32> = (0..planes * h * w).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let mut plane = vec![0.0f32; planes * oh * ow];
            bilinear(&x, planes, h, w, oh, ow, &mut plane);
            let mut mask = vec![7u8; planes * oh * ow];
            bilinear_mask(&x, planes, h, w, oh, ow, &mut mask);
            assert!(plane.iter().zip(&mask).all(|(&v, &m)| m == u8::from(v > 0.0)), "{planes}x{h}x{w} -> {oh}x{ow}");
        }
    }

    #[test]
    fn bilinear_matches_torch_formula() {
        let mut rng = rng();
        for &(planes, h, w, oh, ow) in &[
            (1, 16, 16, 64, 64),
            (2, 7, 5, 13, 11),
            (3, 20, 30, 9, 14),
            (1, 12, 9, 12, 9),
            (2, 1, 1, 4, 3),
            (1, 5, 8, 17, 3),
        ] {
            let x: Vec<f32> = (0..planes * h * w).map(|_| rng.gen_range(-10.0f32..10.0)).collect();
            let mut out = vec![f32::NAN; planes * oh * ow];
            bilinear(&x, planes, h, w, oh, ow, &mut out);
            let want = naive_bilinear(&x, planes, h, w, oh, ow);
            let num: f64 = out.iter().zip(&want).map(|(&g, &w)| (g as f64 - w).powi(2)).sum();
            let den: f64 = want.iter().map(|w| w * w).sum();
            let e = (num / den).sqrt();
            assert!(e <= 1e-5, "{planes}x{h}x{w} -> {oh}x{ow}: rel err {e}");
        }
    }

    /// Exact area average in f64: each destination pixel is the mean of the source under its cell.
    fn naive_area(src: &[u8], h: usize, w: usize, cn: usize, oh: usize, ow: usize) -> Vec<f64> {
        let overlap = |d: usize, s: usize, scale: f64| -> f64 {
            let (a, b) = (d as f64 * scale, (d + 1) as f64 * scale);
            ((s + 1) as f64).min(b) - (s as f64).max(a)
        };
        let (sx, sy) = (w as f64 / ow as f64, h as f64 / oh as f64);
        let mut out = vec![0.0; oh * ow * cn];
        for dy in 0..oh {
            for dx in 0..ow {
                for c in 0..cn {
                    let mut acc = 0.0;
                    for y in 0..h {
                        let wy = overlap(dy, y, sy);
                        if wy <= 0.0 {
                            continue;
                        }
                        for x in 0..w {
                            let wx = overlap(dx, x, sx);
                            if wx > 0.0 {
                                acc += wy * wx * src[(y * w + x) * cn + c] as f64;
                            }
                        }
                    }
                    out[(dy * ow + dx) * cn + c] = acc / (sx * sy);
                }
            }
        }
        out
    }

    #[test]
    fn area_downscale_is_the_area_mean() {
        let mut rng = rng();
        for &(h, w, cn, oh, ow) in &[
            (20, 30, 3, 7, 11),
            (540, 800, 1, 173, 256),
            (16, 16, 1, 8, 8),
            (15, 9, 3, 5, 3),
            (10, 13, 1, 9, 12),
        ] {
            let src = random_u8(&mut rng, h * w * cn);
            let mut out = vec![0xAAu8; oh * ow * cn];
            resize_area_u8(&src, h, w, cn, oh, ow, &mut out);
            let want = naive_area(&src, h, w, cn, oh, ow);
            for (i, (&g, &r)) in out.iter().zip(&want).enumerate() {
                // f32 accumulation may flip a rounding exactly at .5; nothing more.
                assert!((g as f64 - r).abs() <= 0.5 + 1e-3, "{h}x{w} -> {oh}x{ow}, index {i}: got {g}, exact {r}");
            }
        }
    }

    #[test]
    fn area_two_by_two_rounds_half_up_like_opencv() {
        // OpenCV's 2x2 path computes (sum + 2) >> 2: 1+1+2+2 = 6 -> 1.5 -> 2, 2+2+3+3 = 10 -> 3.
        let src = [1u8, 1, 2, 3, 2, 2, 3, 2];
        let mut out = [0u8; 2];
        resize_area_u8(&src, 2, 4, 1, 1, 2, &mut out);
        assert_eq!(out, [2, 3]);
    }

    #[test]
    fn area_constant_and_identity() {
        let mut rng = rng();
        for &(h, w, oh, ow) in &[(9, 7, 4, 3), (4, 6, 9, 13), (5, 5, 5, 5), (30, 20, 60, 40), (12, 12, 4, 4)] {
            let value: u8 = rng.gen();
            let src = vec![value; h * w * 3];
            let mut out = vec![value.wrapping_add(1); oh * ow * 3];
            resize_area_u8(&src, h, w, 3, oh, ow, &mut out);
            assert!(out.iter().all(|&v| v == value), "{h}x{w} -> {oh}x{ow} not constant {value}");
        }
        let src = random_u8(&mut rng, 6 * 7 * 3);
        let mut out = vec![0u8; src.len()];
        resize_area_u8(&src, 6, 7, 3, 6, 7, &mut out);
        assert_eq!(out, src);
    }

    #[test]
    fn area_enlarge_stays_between_neighbours() {
        // Upscaling by an integer factor in area mode replicates pixels except at cell edges,
        // where it blends the two neighbours.
        let mut rng = rng();
        let (h, w) = (6, 5);
        let src = random_u8(&mut rng, h * w);
        let mut out = vec![0u8; 4 * h * 4 * w];
        resize_area_u8(&src, h, w, 1, 4 * h, 4 * w, &mut out);
        for y in 0..4 * h {
            for x in 0..4 * w {
                let (sy, sx) = (y / 4, x / 4);
                let v = out[y * 4 * w + x];
                if y % 4 != 3 && x % 4 != 3 {
                    assert_eq!(v, src[sy * w + sx], "({y}, {x}) should copy its source pixel");
                }
                let lo = (sy..=(sy + 1).min(h - 1))
                    .flat_map(|yy| (sx..=(sx + 1).min(w - 1)).map(move |xx| (yy, xx)))
                    .map(|(yy, xx)| src[yy * w + xx]);
                let (mn, mx) = lo.fold((255u8, 0u8), |(a, b), v| (a.min(v), b.max(v)));
                assert!(v >= mn && v <= mx, "({y}, {x}) = {v} outside [{mn}, {mx}]");
            }
        }
    }

    #[test]
    fn area_enlarge_hand_computed_case() {
        // 3 -> 7 columns (rows unchanged): scale 3/7, OpenCV's area-mode weight for column dx is
        // fx = (dx+1) - (floor(dx*3/7)+1) * 7/3 when positive (fractional part), else 0:
        // dx 0, 1 -> S0; dx 2 -> fx 2/3 (weights 683/1365 of 2048) -> 90 * 2/3 = 60;
        // dx 3 -> S1; dx 4 -> fx 1/3 -> 90 * 2/3 + 255 / 3 = 145; dx 5, 6 -> clamped to S2.
        let src = [0u8, 90, 255];
        let mut out = [0u8; 7];
        resize_area_u8(&src, 1, 3, 1, 1, 7, &mut out);
        assert_eq!(out, [0, 0, 60, 90, 145, 255, 255]);
    }

    /// Unquantised PIL bilinear in f64 (same filter, no fixed point, no intermediate rounding).
    fn naive_pil(src: &[u8], h: usize, w: usize, cn: usize, oh: usize, ow: usize) -> Vec<f64> {
        let weights = |n_in: usize, n_out: usize| -> Vec<Vec<(usize, f64)>> {
            let scale = n_in as f64 / n_out as f64;
            let fs = scale.max(1.0);
            (0..n_out)
                .map(|o| {
                    let center = (o as f64 + 0.5) * scale;
                    let ws: Vec<(usize, f64)> = (0..n_in)
                        .map(|i| (i, (1.0 - ((i as f64 + 0.5 - center) / fs).abs()).max(0.0)))
                        .filter(|&(_, v)| v > 0.0)
                        .collect();
                    let total: f64 = ws.iter().map(|p| p.1).sum();
                    ws.into_iter().map(|(i, v)| (i, v / total)).collect()
                })
                .collect()
        };
        let (wx, wy) = (weights(w, ow), weights(h, oh));
        let mut out = vec![0.0; oh * ow * cn];
        for y in 0..oh {
            for x in 0..ow {
                for c in 0..cn {
                    let mut acc = 0.0;
                    for &(sy, ky) in &wy[y] {
                        for &(sx, kx) in &wx[x] {
                            acc += ky * kx * src[(sy * w + sx) * cn + c] as f64;
                        }
                    }
                    out[(y * ow + x) * cn + c] = acc;
                }
            }
        }
        out
    }

    #[test]
    fn pil_bilinear_hand_computed_case() {
        // 4 -> 2 columns: scale 2, support 2; output 0 has centre 1.0, taps x = 0, 1, 2 with
        // triangle weights 0.75, 0.75, 0.25 -> normalised 3/7, 3/7, 1/7.
        // 0*3/7 + 70*3/7 + 140/7 = 50; output 1 (centre 3, taps 1..3: 1/7, 3/7, 3/7):
        // 70/7 + 140*3/7 + 210*3/7 = 10 + 60 + 90 = 160.
        let src = [0u8, 70, 140, 210];
        let mut out = [0u8; 2];
        resize_bilinear_pil_u8(&src, 1, 4, 1, 1, 2, &mut out);
        assert_eq!(out, [50, 160]);
        // Enlarging 2 -> 4 is plain linear interpolation with edge clamping:
        // centres 0.25, 0.75, 1.25, 1.75 -> 0, 0 + 0.25*100 = 25, 75, 100.
        let src = [0u8, 100];
        let mut out = [0u8; 4];
        resize_bilinear_pil_u8(&src, 1, 2, 1, 1, 4, &mut out);
        assert_eq!(out, [0, 25, 75, 100]);
    }

    #[test]
    fn pil_bilinear_properties() {
        let mut rng = rng();
        for &(h, w, cn, oh, ow) in &[(20, 30, 3, 7, 11), (8, 6, 1, 24, 19), (33, 17, 3, 64, 33), (15, 40, 1, 15, 12), (9, 9, 3, 4, 9)] {
            let value: u8 = rng.gen();
            let constant = vec![value; h * w * cn];
            let mut out = vec![value.wrapping_add(1); oh * ow * cn];
            resize_bilinear_pil_u8(&constant, h, w, cn, oh, ow, &mut out);
            assert!(out.iter().all(|&v| v == value), "{h}x{w} -> {oh}x{ow} not constant {value}");

            let src = random_u8(&mut rng, h * w * cn);
            let mut out = vec![0u8; oh * ow * cn];
            resize_bilinear_pil_u8(&src, h, w, cn, oh, ow, &mut out);
            let want = naive_pil(&src, h, w, cn, oh, ow);
            for (i, (&g, &r)) in out.iter().zip(&want).enumerate() {
                // Two passes, each rounding to a byte: at most one grey level apart.
                assert!((g as f64 - r).abs() <= 1.0 + 1e-9, "{h}x{w} -> {oh}x{ow}, index {i}: got {g}, exact {r}");
            }
        }
        let src = random_u8(&mut rng, 5 * 4 * 3);
        let mut out = vec![0u8; src.len()];
        resize_bilinear_pil_u8(&src, 5, 4, 3, 5, 4, &mut out);
        assert_eq!(out, src);
    }

    /// LiteMedSAM's preprocessing against the golden inputs written by the PyTorch reference.
    mod litemedsam_golden {
        use super::super::resize_area_u8;
        use std::path::{Path, PathBuf};

        fn shared() -> PathBuf {
            PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared"))
        }

        /// Minimal `.npy` reader: magic, v1/v2 header with descr and shape, little-endian f4/f8.
        fn read_npy(path: &Path) -> (Vec<usize>, Vec<f64>) {
            let bytes = std::fs::read(path).unwrap();
            assert_eq!(&bytes[..6], b"\x93NUMPY", "{}: not an npy file", path.display());
            let (len, start) = match bytes[6] {
                1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
                _ => (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12),
            };
            let header = std::str::from_utf8(&bytes[start..start + len]).unwrap();
            assert!(!header.contains("'fortran_order': True"), "{}: Fortran order", path.display());
            let shape_text = &header[header.find("'shape': (").unwrap() + 10..];
            let shape: Vec<usize> = shape_text[..shape_text.find(')').unwrap()]
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| s.parse().unwrap())
                .collect();
            let data = &bytes[start + len..];
            let values = if header.contains("'<f4'") {
                data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64).collect()
            } else if header.contains("'<f8'") {
                data.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect()
            } else {
                panic!("{}: unsupported dtype in {header}", path.display())
            };
            (shape, values)
        }

        fn read_grey_png(path: &Path) -> (usize, usize, Vec<u8>) {
            let decoder = png::Decoder::new(std::fs::File::open(path).unwrap());
            let mut reader = decoder.read_info().unwrap();
            let mut buf = vec![0; reader.output_buffer_size()];
            let info = reader.next_frame(&mut buf).unwrap();
            assert_eq!(
                (info.color_type, info.bit_depth),
                (png::ColorType::Grayscale, png::BitDepth::Eight),
                "{}",
                path.display()
            );
            buf.truncate(info.buffer_size());
            (info.height as usize, info.width as usize, buf)
        }

        /// LiteMedSAM's input: INTER_AREA to longest side 256, min-max to [0, 1], zero pad.
        // grey: [h, w]; returns channel 0 of the [3, 256, 256] network input.
        fn preprocess(grey: &[u8], h: usize, w: usize) -> Vec<f32> {
            let s = 256.0 / h.max(w) as f64;
            let (nh, nw) = ((h as f64 * s + 0.5) as usize, (w as f64 * s + 0.5) as usize);
            let rgb: Vec<u8> = grey.iter().flat_map(|&v| [v, v, v]).collect();
            let mut small = vec![0u8; nh * nw * 3];
            resize_area_u8(&rgb, h, w, 3, nh, nw, &mut small);
            let (mn, mx) = small.iter().fold((255u8, 0u8), |(a, b), &v| (a.min(v), b.max(v)));
            let range = ((mx - mn) as f64).max(1e-8);
            let mut out = vec![0.0f32; 256 * 256];
            for y in 0..nh {
                for x in 0..nw {
                    out[y * 256 + x] = ((small[(y * nw + x) * 3] - mn) as f64 / range) as f32;
                }
            }
            out
        }

        #[test]
        fn inter_area_matches_golden_inputs() {
            let root = shared();
            let golden = root.join("reference/litemedsam");
            if !golden.is_dir() {
                eprintln!("SKIP: {} not found (the shared data tree sits beside the checkout)", golden.display());
                return;
            }
            let mut sets: Vec<_> = std::fs::read_dir(&golden).unwrap().map(|e| e.unwrap().path()).filter(|p| p.is_dir()).collect();
            sets.sort();
            let mut checked = 0;
            let mut worst = 0.0f64;
            for set in sets {
                let mut files: Vec<_> = std::fs::read_dir(&set)
                    .unwrap()
                    .map(|e| e.unwrap().path())
                    .filter(|p| p.to_string_lossy().ends_with("_input256_ch0.npy"))
                    .collect();
                files.sort();
                for npy in files {
                    let file = npy.file_name().unwrap().to_string_lossy().into_owned();
                    let name = file.trim_end_matches("_input256_ch0.npy");
                    let png = root.join("data").join(set.file_name().unwrap()).join("images").join(format!("{name}.png"));
                    let (shape, want) = read_npy(&npy);
                    assert_eq!(shape, [256, 256], "{file}");
                    let (h, w, grey) = read_grey_png(&png);
                    let got = preprocess(&grey, h, w);
                    let diff = got.iter().zip(&want).map(|(&g, &r)| (g as f64 - r).abs()).fold(0.0, f64::max);
                    let mismatches = got.iter().zip(&want).filter(|(&g, &r)| g as f64 != r).count();
                    eprintln!(
                        "{}/{name} ({h}x{w}): max abs diff {diff:e}, {mismatches} differing pixels",
                        set.file_name().unwrap().to_string_lossy()
                    );
                    worst = worst.max(diff);
                    checked += 1;
                }
            }
            eprintln!("checked {checked} golden inputs, worst max abs diff {worst:e}");
            assert!(checked >= 15, "expected 15 golden inputs, found {checked}");
            assert!(worst <= 1e-7, "INTER_AREA differs from OpenCV: max abs diff {worst}");
        }
    }
}
