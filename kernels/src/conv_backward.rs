//! Backward passes of [`crate::conv::conv2d`] (dense, grouped and depthwise) and
//! [`crate::conv::conv_transpose2d`].
//!
//! Dense convolutions (`groups == 1`: patch embeddings, necks, TinyViT's pointwise convs) run on
//! the blocked GEMM through bounded im2col/col2im chunks (module `dense`). Grouped and depthwise
//! ones, whose products are small, scatter every output gradient back through the kernel taps
//! that produced it, split over input planes (one `(batch, channel)` per task) so each task owns
//! the plane it writes and no atomics are needed; their kernel is dequantised in tiles of
//! [`CO_TILE`] output channels. All functions add into their outputs.

use rayon::prelude::*;

use crate::conv::output_size;
use crate::weights::MatrixRef;

/// Output channels dequantised together in `conv2d_backward_input`.
const CO_TILE: usize = 16;

/// Geometry of one `conv2d` call.
#[derive(Clone, Copy, Debug)]
pub struct ConvShape {
    pub batch: usize,
    pub c_in: usize,
    pub h: usize,
    pub w: usize,
    pub c_out: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub padding: usize,
    pub groups: usize,
}

impl ConvShape {
    pub fn out_hw(&self) -> (usize, usize) {
        (output_size(self.h, self.kh, self.stride, self.padding), output_size(self.w, self.kw, self.stride, self.padding))
    }
    fn check(&self, what: &str, x_len: usize, dy_len: usize, w_len: usize) {
        let (oh, ow) = self.out_hw();
        assert!(self.groups > 0 && self.c_in.is_multiple_of(self.groups) && self.c_out.is_multiple_of(self.groups), "{what}: groups must divide both channel counts");
        assert_eq!(x_len, self.batch * self.c_in * self.h * self.w, "{what}: x/dx is not [batch, c_in, h, w]");
        assert_eq!(dy_len, self.batch * self.c_out * oh * ow, "{what}: dy is not [batch, c_out, oh, ow]");
        assert_eq!(w_len, self.c_out * self.c_in / self.groups * self.kh * self.kw, "{what}: weight is not [c_out, c_in/groups, kh, kw]");
    }
    /// Input coordinate of output coordinate `o` and tap `t`, if inside the input.
    #[inline]
    fn source(&self, o: usize, t: usize, len: usize) -> Option<usize> {
        (o * self.stride + t).checked_sub(self.padding).filter(|&i| i < len)
    }
}

/// `dx += ∂(conv2d)/∂x · dy`.
// dy: [batch, c_out, oh, ow]; weight: [c_out, c_in/groups, kh, kw] (any precision);
// dx: [batch, c_in, h, w].
pub fn conv2d_backward_input(dy: &[f32], weight: MatrixRef, s: ConvShape, dx: &mut [f32]) {
    s.check("conv2d_backward_input", dx.len(), dy.len(), s.c_out * s.c_in / s.groups * s.kh * s.kw);
    if s.groups == 1 && !dx.is_empty() && !dy.is_empty() {
        return dense::backward_input(dy, weight, s, dx);
    }
    let (oh, ow) = s.out_hw();
    let (cin_g, cout_g) = (s.c_in / s.groups, s.c_out / s.groups);
    let taps = s.kh * s.kw;
    let row = cin_g * taps;
    if dx.is_empty() || dy.is_empty() {
        return;
    }
    let mut tile = vec![0.0f32; CO_TILE * row];
    for co0 in (0..s.c_out).step_by(CO_TILE) {
        let tn = CO_TILE.min(s.c_out - co0);
        weight.dequantize_range(co0 * row, &mut tile[..tn * row]);
        let tile = &tile[..tn * row];
        dx.par_chunks_mut(s.h * s.w).enumerate().for_each(|(plane, dxp)| {
            let (b, ci) = (plane / s.c_in, plane % s.c_in);
            let g = ci / cin_g;
            let cig = ci % cin_g;
            // Only this tile's output channels of ci's group contribute.
            let lo = co0.max(g * cout_g);
            let hi = (co0 + tn).min((g + 1) * cout_g);
            for co in lo..hi {
                let wk = &tile[(co - co0) * row + cig * taps..][..taps];
                let dyp = &dy[(b * s.c_out + co) * oh * ow..][..oh * ow];
                for ky in 0..s.kh {
                    for kx in 0..s.kw {
                        let wv = wk[ky * s.kw + kx];
                        if wv == 0.0 {
                            continue;
                        }
                        for oy in 0..oh {
                            let Some(iy) = s.source(oy, ky, s.h) else { continue };
                            let dst = &mut dxp[iy * s.w..(iy + 1) * s.w];
                            let src = &dyp[oy * ow..(oy + 1) * ow];
                            for (ox, &gv) in src.iter().enumerate() {
                                if let Some(ix) = s.source(ox, kx, s.w) {
                                    dst[ix] += wv * gv;
                                }
                            }
                        }
                    }
                }
            }
        });
    }
}

/// `dw += ∂(conv2d)/∂w · dy` (for a trainable f32 kernel).
// dy: [batch, c_out, oh, ow]; x: [batch, c_in, h, w]; dw: [c_out, c_in/groups, kh, kw].
pub fn conv2d_backward_weight(dy: &[f32], x: &[f32], s: ConvShape, dw: &mut [f32]) {
    s.check("conv2d_backward_weight", x.len(), dy.len(), dw.len());
    if s.groups == 1 && !dw.is_empty() && !dy.is_empty() {
        return dense::backward_weight(dy, x, s, dw);
    }
    let (oh, ow) = s.out_hw();
    let (cin_g, cout_g) = (s.c_in / s.groups, s.c_out / s.groups);
    let taps = s.kh * s.kw;
    if dw.is_empty() {
        return;
    }
    dw.par_chunks_mut(cin_g * taps).enumerate().for_each(|(co, dwr)| {
        let g = co / cout_g;
        for b in 0..s.batch {
            let dyp = &dy[(b * s.c_out + co) * oh * ow..][..oh * ow];
            for cig in 0..cin_g {
                let xp = &x[(b * s.c_in + g * cin_g + cig) * s.h * s.w..][..s.h * s.w];
                for ky in 0..s.kh {
                    for kx in 0..s.kw {
                        let mut acc = 0.0f32;
                        for oy in 0..oh {
                            let Some(iy) = s.source(oy, ky, s.h) else { continue };
                            for ox in 0..ow {
                                if let Some(ix) = s.source(ox, kx, s.w) {
                                    acc += dyp[oy * ow + ox] * xp[iy * s.w + ix];
                                }
                            }
                        }
                        dwr[cig * taps + ky * s.kw + kx] += acc;
                    }
                }
            }
        }
    });
}

/// Dense (`groups == 1`) convolutions on the blocked GEMM, through column matrices of
/// [`POSITIONS`] output positions at a time (im2col / col2im), so the column buffer stays
/// bounded (`c_in·kh·kw × POSITIONS` floats) whatever the image size.
mod dense {
    use rayon::prelude::*;

    use super::ConvShape;
    use crate::gemm::{matmul, transpose_into};
    use crate::weights::MatrixRef;

    /// Output positions per column matrix.
    const POSITIONS: usize = 512;

    /// `dyc[co, p] = dy[b, co, p0 + p]` for the `pc` positions of this chunk.
    fn gather_dy(dy: &[f32], s: ConvShape, b: usize, p0: usize, pc: usize, dyc: &mut [f32]) {
        let (oh, ow) = s.out_hw();
        dyc.par_chunks_mut(pc).enumerate().for_each(|(co, row)| {
            row.copy_from_slice(&dy[(b * s.c_out + co) * oh * ow + p0..][..pc]);
        });
    }

    /// `dx += ∂(conv2d)/∂x · dy`: per chunk, `dcol = Wᵀ · dyc` (`[K, c_out] · [c_out, pc]`, K =
    /// `c_in·kh·kw`), then each column scattered back to the input pixels it was read from. The
    /// kernel is dequantised whole, once (SAM's largest, the ViT-H patch embedding, is 3.9 MB in f32).
    pub(super) fn backward_input(dy: &[f32], weight: MatrixRef, s: ConvShape, dx: &mut [f32]) {
        let (oh, ow) = s.out_hw();
        let (taps, positions) = (s.kh * s.kw, oh * ow);
        let k = s.c_in * taps;
        let mut w = vec![0.0f32; s.c_out * k];
        weight.dequantize_range(0, &mut w);
        let mut wt = vec![0.0f32; k * s.c_out];
        transpose_into(&w, s.c_out, k, &mut wt);
        let chunk = POSITIONS.min(positions);
        let (mut dyc, mut dcol) = (vec![0.0f32; s.c_out * chunk], vec![0.0f32; k * chunk]);
        for b in 0..s.batch {
            let dxb = &mut dx[b * s.c_in * s.h * s.w..][..s.c_in * s.h * s.w];
            for p0 in (0..positions).step_by(chunk) {
                let pc = chunk.min(positions - p0);
                gather_dy(dy, s, b, p0, pc, &mut dyc[..s.c_out * pc]);
                matmul(&wt, &dyc[..s.c_out * pc], 1, k, s.c_out, pc, false, &mut dcol[..k * pc]);
                let dcol = &dcol[..k * pc];
                // col2im: each task owns one input channel's plane.
                dxb.par_chunks_mut(s.h * s.w).enumerate().for_each(|(ci, plane)| {
                    for t in 0..taps {
                        let (ky, kx) = (t / s.kw, t % s.kw);
                        let row = &dcol[(ci * taps + t) * pc..][..pc];
                        for (i, &v) in row.iter().enumerate() {
                            let (oy, ox) = ((p0 + i) / ow, (p0 + i) % ow);
                            if let (Some(iy), Some(ix)) = (s.source(oy, ky, s.h), s.source(ox, kx, s.w)) {
                                plane[iy * s.w + ix] += v;
                            }
                        }
                    }
                });
            }
        }
    }

    /// `dw += ∂(conv2d)/∂w · dy`: per chunk, `dW += dyc · colᵀ` (`[c_out, pc] · [pc, K]`) with
    /// `col` the chunk's im2col of `x` (zero where the tap falls in the padding).
    pub(super) fn backward_weight(dy: &[f32], x: &[f32], s: ConvShape, dw: &mut [f32]) {
        let (oh, ow) = s.out_hw();
        let (taps, positions) = (s.kh * s.kw, oh * ow);
        let k = s.c_in * taps;
        let chunk = POSITIONS.min(positions);
        let (mut dyc, mut col, mut product) = (vec![0.0f32; s.c_out * chunk], vec![0.0f32; k * chunk], vec![0.0f32; s.c_out * k]);
        for b in 0..s.batch {
            let xb = &x[b * s.c_in * s.h * s.w..][..s.c_in * s.h * s.w];
            for p0 in (0..positions).step_by(chunk) {
                let pc = chunk.min(positions - p0);
                gather_dy(dy, s, b, p0, pc, &mut dyc[..s.c_out * pc]);
                col[..k * pc].par_chunks_mut(pc).enumerate().for_each(|(r, row)| {
                    let (ci, t) = (r / taps, r % taps);
                    let (ky, kx) = (t / s.kw, t % s.kw);
                    let plane = &xb[ci * s.h * s.w..][..s.h * s.w];
                    for (i, v) in row.iter_mut().enumerate() {
                        let (oy, ox) = ((p0 + i) / ow, (p0 + i) % ow);
                        *v = match (s.source(oy, ky, s.h), s.source(ox, kx, s.w)) {
                            (Some(iy), Some(ix)) => plane[iy * s.w + ix],
                            _ => 0.0,
                        };
                    }
                });
                matmul(&dyc[..s.c_out * pc], &col[..k * pc], 1, s.c_out, pc, k, true, &mut product);
                dw.par_iter_mut().zip(product.par_iter()).for_each(|(d, p)| *d += p);
            }
        }
    }
}

/// `db[c] += Σ_{batch, pixels} dy[., c, .]`: the bias gradient of any NCHW op with a per-channel bias.
// dy: [batch, channels, spatial]; db: [channels].
pub fn channel_bias_backward(dy: &[f32], batch: usize, channels: usize, spatial: usize, db: &mut [f32]) {
    assert_eq!(dy.len(), batch * channels * spatial, "channel_bias_backward: dy is not [batch, channels, spatial]");
    assert_eq!(db.len(), channels, "channel_bias_backward: db is not [channels]");
    for (i, plane) in dy.chunks_exact(spatial.max(1)).enumerate().take(batch * channels) {
        db[i % channels] += plane.iter().sum::<f32>();
    }
}

/// The output gradient seen by kernel tap `(ky, kx)` of a stride == kernel transposed
/// convolution, gathered contiguous: `dyk[co, y*w + x] = dy[b, co, y*k + ky, x*k + kx]`.
#[allow(clippy::too_many_arguments)]
fn gather_tap(dy: &[f32], b: usize, c_out: usize, h: usize, w: usize, k: usize, ky: usize, kx: usize, dyk: &mut [f32]) {
    let ow = w * k;
    dyk.par_chunks_mut(h * w).enumerate().for_each(|(co, plane)| {
        let src = &dy[(b * c_out + co) * h * k * ow..][..h * k * ow];
        for y in 0..h {
            let row = &src[(y * k + ky) * ow..][..ow];
            for (x, v) in plane[y * w..(y + 1) * w].iter_mut().enumerate() {
                *v = row[x * k + kx];
            }
        }
    });
}

/// `dx += ∂(conv_transpose2d)/∂x · dy` for kernel == stride == `k`.
///
/// Each output pixel comes from exactly one input pixel and one tap, so per tap the input
/// gradient is one matrix product, `dx[b] += W[:, :, ky, kx] · dyk` (`[c_in, c_out] ·
/// [c_out, h·w]`), run on the blocked GEMM. The kernel (SAM's upscaling: at most
/// `c_in·c_out·k² = 65536` values) is dequantised whole, once.
// dy: [batch, c_out, h*k, w*k]; weight: [c_in, c_out, k, k] (any precision); dx: [batch, c_in, h, w].
#[allow(clippy::too_many_arguments)]
pub fn conv_transpose2d_backward_input(dy: &[f32], weight: MatrixRef, batch: usize, c_in: usize, h: usize, w: usize, c_out: usize, k: usize, dx: &mut [f32]) {
    assert_eq!(dx.len(), batch * c_in * h * w, "conv_transpose2d_backward_input: dx is not [batch, c_in, h, w]");
    assert_eq!(dy.len(), batch * c_out * h * k * w * k, "conv_transpose2d_backward_input: dy is not [batch, c_out, h*k, w*k]");
    let (hw, taps) = (h * w, k * k);
    if dx.is_empty() || c_out == 0 || taps == 0 {
        return;
    }
    let mut kernel = vec![0.0f32; c_in * c_out * taps];
    weight.dequantize_range(0, &mut kernel);
    // Per tap, the [c_in, c_out] slice of the kernel.
    let tap_matrices: Vec<Vec<f32>> = (0..taps)
        .map(|t| (0..c_in * c_out).map(|i| kernel[i * taps + t]).collect())
        .collect();
    let mut dyk = vec![0.0f32; c_out * hw];
    let mut product = vec![0.0f32; c_in * hw];
    for b in 0..batch {
        let dxb = &mut dx[b * c_in * hw..][..c_in * hw];
        for (t, wt) in tap_matrices.iter().enumerate() {
            gather_tap(dy, b, c_out, h, w, k, t / k, t % k, &mut dyk);
            crate::gemm::matmul(wt, &dyk, 1, c_in, c_out, hw, false, &mut product);
            dxb.par_iter_mut().zip(product.par_iter()).for_each(|(d, p)| *d += p);
        }
    }
}

/// `dw += ∂(conv_transpose2d)/∂w · dy` (for a trainable f32 kernel): per tap and batch item,
/// `dW[:, :, ky, kx] += x[b] · dykᵀ` (`[c_in, h·w] · [h·w, c_out]`) on the blocked GEMM.
// dy: [batch, c_out, h*k, w*k]; x: [batch, c_in, h, w]; dw: [c_in, c_out, k, k].
#[allow(clippy::too_many_arguments)]
pub fn conv_transpose2d_backward_weight(dy: &[f32], x: &[f32], batch: usize, c_in: usize, h: usize, w: usize, c_out: usize, k: usize, dw: &mut [f32]) {
    assert_eq!(x.len(), batch * c_in * h * w, "conv_transpose2d_backward_weight: x is not [batch, c_in, h, w]");
    assert_eq!(dy.len(), batch * c_out * h * k * w * k, "conv_transpose2d_backward_weight: dy is not [batch, c_out, h*k, w*k]");
    assert_eq!(dw.len(), c_in * c_out * k * k, "conv_transpose2d_backward_weight: dw is not [c_in, c_out, k, k]");
    let (hw, taps) = (h * w, k * k);
    if dw.is_empty() {
        return;
    }
    let mut dyk = vec![0.0f32; c_out * hw];
    let mut product = vec![0.0f32; c_in * c_out];
    for b in 0..batch {
        let xb = &x[b * c_in * hw..][..c_in * hw];
        for t in 0..taps {
            gather_tap(dy, b, c_out, h, w, k, t / k, t % k, &mut dyk);
            crate::gemm::matmul(xb, &dyk, 1, c_in, hw, c_out, true, &mut product);
            for (i, p) in product.iter().enumerate() {
                dw[i * taps + t] += p;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{assert_close, dot, fd_grad, random, rng, to_f32};
    use rand::Rng;

    /// Naive f64 grouped convolution with zero padding.
    fn conv_ref(x: &[f64], wt: &[f64], bias: &[f64], s: ConvShape) -> Vec<f64> {
        let (oh, ow) = s.out_hw();
        let (cin_g, cout_g) = (s.c_in / s.groups, s.c_out / s.groups);
        let mut y = vec![0.0; s.batch * s.c_out * oh * ow];
        for b in 0..s.batch {
            for co in 0..s.c_out {
                let g = co / cout_g;
                for oy in 0..oh {
                    for ox in 0..ow {
                        let mut acc = bias[co];
                        for cig in 0..cin_g {
                            for ky in 0..s.kh {
                                for kx in 0..s.kw {
                                    let iy = (oy * s.stride + ky) as isize - s.padding as isize;
                                    let ix = (ox * s.stride + kx) as isize - s.padding as isize;
                                    if iy >= 0 && ix >= 0 && (iy as usize) < s.h && (ix as usize) < s.w {
                                        let xi = ((b * s.c_in + g * cin_g + cig) * s.h + iy as usize) * s.w + ix as usize;
                                        acc += x[xi] * wt[((co * cin_g + cig) * s.kh + ky) * s.kw + kx];
                                    }
                                }
                            }
                        }
                        y[((b * s.c_out + co) * oh + oy) * ow + ox] = acc;
                    }
                }
            }
        }
        y
    }

    #[test]
    fn conv2d_backward_matches_finite_differences() {
        let mut rng = rng();
        // Dense with stride/padding, depthwise 3x3, grouped, 1x1.
        let cases = [(3, 5, 3, 2, 1, 1), (4, 4, 3, 1, 1, 4), (4, 6, 3, 1, 0, 2), (5, 3, 1, 1, 0, 1), (2, 20, 3, 2, 1, 1)];
        for (c_in, c_out, k, stride, padding, groups) in cases {
            let s = ConvShape { batch: 2, c_in, h: rng.gen_range(3..8), w: rng.gen_range(3..8), c_out, kh: k, kw: k, stride, padding, groups };
            let (oh, ow) = s.out_hw();
            let x = random(&mut rng, s.batch * c_in * s.h * s.w);
            let wt = random(&mut rng, c_out * c_in / groups * k * k);
            let bias = random(&mut rng, c_out);
            let r = random(&mut rng, s.batch * c_out * oh * ow);
            let want_dx = fd_grad(&x, 1e-6, |x| dot(&r, &conv_ref(x, &wt, &bias, s)));
            let want_dw = fd_grad(&wt, 1e-6, |w| dot(&r, &conv_ref(&x, w, &bias, s)));
            let want_db = fd_grad(&bias, 1e-6, |b| dot(&r, &conv_ref(&x, &wt, b, s)));
            let (rf, wf) = (to_f32(&r), to_f32(&wt));
            let mut dx = vec![0.0; x.len()];
            conv2d_backward_input(&rf, MatrixRef::F32(&wf), s, &mut dx);
            assert_close(&format!("dx {s:?}"), &dx, &want_dx, 1e-5);
            let mut dw = vec![0.0; wt.len()];
            conv2d_backward_weight(&rf, &to_f32(&x), s, &mut dw);
            assert_close(&format!("dw {s:?}"), &dw, &want_dw, 1e-5);
            let mut db = vec![0.0; c_out];
            channel_bias_backward(&rf, s.batch, c_out, oh * ow, &mut db);
            assert_close(&format!("db {s:?}"), &db, &want_db, 1e-5);
        }
    }

    /// Past one im2col chunk (more output positions than `dense::POSITIONS`), with stride and
    /// padding: the dense GEMM path against a plain f64 adjoint of `conv_ref`.
    #[test]
    fn dense_conv_backward_spans_column_chunks() {
        let mut rng = rng();
        for (h, w, k, stride, padding) in [(30, 29, 3, 1, 1), (41, 37, 4, 4, 0), (26, 25, 3, 2, 1)] {
            let s = ConvShape { batch: 2, c_in: 3, h, w, c_out: 5, kh: k, kw: k, stride, padding, groups: 1 };
            let (oh, ow) = s.out_hw();
            let (x, wt, r) = (random(&mut rng, 2 * 3 * h * w), random(&mut rng, 5 * 3 * k * k), random(&mut rng, 2 * 5 * oh * ow));
            let (mut want_dx, mut want_dw) = (vec![0.0f64; x.len()], vec![0.0f64; wt.len()]);
            for b in 0..2 {
                for co in 0..5 {
                    for ci in 0..3 {
                        for ky in 0..k {
                            for kx in 0..k {
                                for oy in 0..oh {
                                    for ox in 0..ow {
                                        let (Some(iy), Some(ix)) = (s.source(oy, ky, h), s.source(ox, kx, w)) else { continue };
                                        let g = r[((b * 5 + co) * oh + oy) * ow + ox];
                                        let wi = ((co * 3 + ci) * k + ky) * k + kx;
                                        let xi = ((b * 3 + ci) * h + iy) * w + ix;
                                        want_dx[xi] += g * wt[wi];
                                        want_dw[wi] += g * x[xi];
                                    }
                                }
                            }
                        }
                    }
                }
            }
            let mut dx = vec![0.0; x.len()];
            conv2d_backward_input(&to_f32(&r), MatrixRef::F32(&to_f32(&wt)), s, &mut dx);
            assert_close(&format!("dx {s:?}"), &dx, &want_dx, 1e-5);
            let mut dw = vec![0.0; wt.len()];
            conv2d_backward_weight(&to_f32(&r), &to_f32(&x), s, &mut dw);
            assert_close(&format!("dw {s:?}"), &dw, &want_dw, 1e-5);
        }
    }

    #[allow(clippy::too_many_arguments)] // the layer's geometry, spelled out as in the kernel
    fn conv_transpose_ref(x: &[f64], wt: &[f64], batch: usize, c_in: usize, h: usize, w: usize, c_out: usize, k: usize) -> Vec<f64> {
        let (oh, ow) = (h * k, w * k);
        let mut y = vec![0.0; batch * c_out * oh * ow];
        for b in 0..batch {
            for ci in 0..c_in {
                for co in 0..c_out {
                    for yy in 0..h {
                        for xx in 0..w {
                            for ky in 0..k {
                                for kx in 0..k {
                                    y[((b * c_out + co) * oh + yy * k + ky) * ow + xx * k + kx] +=
                                        x[((b * c_in + ci) * h + yy) * w + xx] * wt[((ci * c_out + co) * k + ky) * k + kx];
                                }
                            }
                        }
                    }
                }
            }
        }
        y
    }

    #[test]
    fn conv_transpose2d_backward_matches_finite_differences() {
        let mut rng = rng();
        let (batch, c_in, h, w, c_out, k) = (2, 3, rng.gen_range(1..5), rng.gen_range(1..5), 4, 2);
        let x = random(&mut rng, batch * c_in * h * w);
        let wt = random(&mut rng, c_in * c_out * k * k);
        let r = random(&mut rng, batch * c_out * h * k * w * k);
        let want_dx = fd_grad(&x, 1e-6, |x| dot(&r, &conv_transpose_ref(x, &wt, batch, c_in, h, w, c_out, k)));
        let want_dw = fd_grad(&wt, 1e-6, |wt| dot(&r, &conv_transpose_ref(&x, wt, batch, c_in, h, w, c_out, k)));
        let (rf, wf) = (to_f32(&r), to_f32(&wt));
        let mut dx = vec![0.0; x.len()];
        conv_transpose2d_backward_input(&rf, MatrixRef::F32(&wf), batch, c_in, h, w, c_out, k, &mut dx);
        assert_close("dx", &dx, &want_dx, 1e-5);
        let mut dw = vec![0.0; wt.len()];
        conv_transpose2d_backward_weight(&rf, &to_f32(&x), batch, c_in, h, w, c_out, k, &mut dw);
        assert_close("dw", &dw, &want_dw, 1e-5);
    }
}
