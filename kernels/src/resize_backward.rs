//! Adjoint of [`crate::resize::bilinear`]: every output gradient goes back to the four source
//! pixels it was interpolated from, with the same weights (torch's `align_corners=False` taps).

use rayon::prelude::*;

use crate::resize::torch_linear_taps;

/// `dx += Bᵀ · dy` where `B` is the bilinear resize `[planes, h, w] → [planes, out_h, out_w]`.
// dy: [planes, out_h, out_w]; dx: [planes, h, w].
pub fn bilinear_backward(dy: &[f32], planes: usize, h: usize, w: usize, out_h: usize, out_w: usize, dx: &mut [f32]) {
    assert_eq!(dy.len(), planes * out_h * out_w, "bilinear_backward: dy is not [planes, out_h, out_w]");
    assert_eq!(dx.len(), planes * h * w, "bilinear_backward: dx is not [planes, h, w]");
    if dy.is_empty() || dx.is_empty() {
        return;
    }
    let (ys, xs) = (torch_linear_taps(h, out_h), torch_linear_taps(w, out_w));
    dx.par_chunks_mut(h * w).zip(dy.par_chunks(out_h * out_w)).for_each(|(dxp, dyp)| {
        for (oy, ty) in ys.iter().enumerate() {
            for (ox, tx) in xs.iter().enumerate() {
                let g = dyp[oy * out_w + ox];
                dxp[ty.i0 * w + tx.i0] += g * ty.w0 * tx.w0;
                dxp[ty.i0 * w + tx.i1] += g * ty.w0 * tx.w1;
                dxp[ty.i1 * w + tx.i0] += g * ty.w1 * tx.w0;
                dxp[ty.i1 * w + tx.i1] += g * ty.w1 * tx.w1;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{assert_close, dot, fd_grad, random, rng, to_f32};

    /// Naive f64 bilinear resize with torch's taps written out independently.
    fn bilinear_ref(x: &[f64], planes: usize, h: usize, w: usize, oh: usize, ow: usize) -> Vec<f64> {
        let tap = |o: usize, n: usize, on: usize| {
            let real = ((n as f64 / on as f64) * (o as f64 + 0.5) - 0.5).max(0.0);
            let i0 = (real.floor() as usize).min(n - 1);
            let i1 = (i0 + 1).min(n - 1);
            let l = (real - i0 as f64).clamp(0.0, 1.0);
            (i0, i1, 1.0 - l, l)
        };
        let mut y = vec![0.0; planes * oh * ow];
        for p in 0..planes {
            for oy in 0..oh {
                let (y0, y1, wy0, wy1) = tap(oy, h, oh);
                for ox in 0..ow {
                    let (x0, x1, wx0, wx1) = tap(ox, w, ow);
                    let at = |yy: usize, xx: usize| x[(p * h + yy) * w + xx];
                    y[(p * oh + oy) * ow + ox] = wy0 * (wx0 * at(y0, x0) + wx1 * at(y0, x1)) + wy1 * (wx0 * at(y1, x0) + wx1 * at(y1, x1));
                }
            }
        }
        y
    }

    #[test]
    fn bilinear_backward_is_the_adjoint_for_up_and_down_sizing() {
        let mut rng = rng();
        for (h, w, oh, ow) in [(4, 5, 8, 10), (7, 6, 3, 4), (5, 5, 12, 7), (1, 3, 2, 5)] {
            let planes = 2;
            let x = random(&mut rng, planes * h * w);
            let r = random(&mut rng, planes * oh * ow);
            // The resize is linear, so differences are exact up to rounding at any step.
            let want = fd_grad(&x, 1e-3, |x| dot(&r, &bilinear_ref(x, planes, h, w, oh, ow)));
            let mut dx = vec![0.0; x.len()];
            bilinear_backward(&to_f32(&r), planes, h, w, oh, ow, &mut dx);
            assert_close(&format!("{h}x{w} -> {oh}x{ow}"), &dx, &want, 1e-5);
        }
    }
}
