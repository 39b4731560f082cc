//! Backward passes of [`crate::conv::conv2d`] (dense, grouped and depthwise) and
//! [`crate::conv::conv_transpose2d`].
//!
//! The input gradient of a convolution scatters every output gradient back through the kernel
//! taps that produced it. Work is split over input planes (one `(batch, channel)` per task), so
//! each task owns the plane it writes and no atomics are needed. A frozen NF4/fp16 kernel is
//! dequantised in tiles of [`CO_TILE`] output channels, never as a whole. All functions add into
//! their outputs.

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
        assert!(self.groups > 0 && self.c_in % self.groups == 0 && self.c_out % self.groups == 0, "{what}: groups must divide both channel counts");
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
