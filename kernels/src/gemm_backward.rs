//! Backward passes of [`crate::gemm::linear`] and [`crate::gemm::matmul`].
//!
//! `linear_backward_input` multiplies by the weight in whatever precision it is stored in, on the
//! forward's blocked GEMM, one dequantised slab of columns at a time, so a frozen NF4 base weight is
//! never held in f32 as a whole. Every function *adds* into its gradient outputs, so a tensor used
//! by several operations collects all its contributions.

use rayon::prelude::*;

use crate::gemm::transpose_into;
use crate::weights::MatrixRef;

/// Input columns per pass of `linear_backward_input` (a multiple of the NF4 block, 64).
const SLAB: usize = 256;

/// `dst += a · src` over equal-length slices (vectorises).
#[inline]
fn axpy(a: f32, src: &[f32], dst: &mut [f32]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d += a * s;
    }
}

/// `dx += dy · w`: the input gradient of `y = x · wᵀ`.
///
/// Run on the blocked forward GEMM (`linear`), one slab of [`SLAB`] input columns at a time:
/// the slab `w[:, k0..k0+SLAB]` is dequantised and transposed to `[SLAB, n]`, which makes
/// `dx[:, slab] = dy · slabᵀᵀ` a forward `linear`. The weight is thus dequantised once per call
/// (as in the forward) and never held in f32 beyond one slab.
// dy is [m, n], w is [n, k] (any stored precision), dx is [m, k].
pub fn linear_backward_input(dy: &[f32], m: usize, n: usize, w: MatrixRef, k: usize, dx: &mut [f32]) {
    assert_eq!(dy.len(), m * n, "linear_backward_input: dy is not [m, n]");
    assert_eq!(dx.len(), m * k, "linear_backward_input: dx is not [m, k]");
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    let slab = SLAB.min(k);
    let mut rows = vec![0.0f32; n * slab];
    let mut transposed = vec![0.0f32; slab * n];
    let mut product = vec![0.0f32; m * slab];
    for k0 in (0..k).step_by(slab) {
        let ks = slab.min(k - k0);
        rows[..n * ks].par_chunks_mut(ks).enumerate().for_each(|(j, row)| w.dequantize_range(j * k + k0, row));
        transpose_into(&rows[..n * ks], n, ks, &mut transposed[..ks * n]);
        let out = &mut product[..m * ks];
        crate::gemm::linear(dy, m, n, MatrixRef::F32(&transposed[..ks * n]), ks, None, crate::Activation::None, out);
        dx.par_chunks_mut(k).zip(out.par_chunks(ks)).for_each(|(dx_row, p)| {
            for (d, v) in dx_row[k0..k0 + ks].iter_mut().zip(p) {
                *d += v;
            }
        });
    }
}

/// `dw += dyᵀ · x`: the weight gradient of `y = x · wᵀ` (for trainable f32 weights).
// dy is [m, n], x is [m, k], dw is [n, k].
pub fn linear_backward_weight(dy: &[f32], x: &[f32], m: usize, n: usize, k: usize, dw: &mut [f32]) {
    assert_eq!(dy.len(), m * n, "linear_backward_weight: dy is not [m, n]");
    assert_eq!(x.len(), m * k, "linear_backward_weight: x is not [m, k]");
    assert_eq!(dw.len(), n * k, "linear_backward_weight: dw is not [n, k]");
    if k == 0 {
        return;
    }
    dw.par_chunks_mut(k).enumerate().for_each(|(j, row)| {
        for r in 0..m {
            let g = dy[r * n + j];
            if g != 0.0 {
                axpy(g, &x[r * k..(r + 1) * k], row);
            }
        }
    });
}

/// `db += Σ_rows dy`: the bias gradient of a linear layer.
// dy is [m, n], db is [n].
pub fn bias_backward(dy: &[f32], m: usize, n: usize, db: &mut [f32]) {
    assert_eq!(dy.len(), m * n, "bias_backward: dy is not [m, n]");
    assert_eq!(db.len(), n, "bias_backward: db is not [n]");
    for row in dy.chunks_exact(n.max(1)).take(m) {
        axpy(1.0, row, db);
    }
}

/// `dst = srcᵀ`.
// src is [rows, cols], dst is [cols, rows].
fn transpose(src: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut dst = vec![0.0; rows * cols];
    transpose_into(src, rows, cols, &mut dst);
    dst
}


/// Gradients of [`crate::gemm::matmul`]: `da += dc · bᵀ` and `db += aᵀ · dc` (with `b` read as
/// `[n, k]` when `transpose_b`). Either output may be skipped.
// a is [batch, m, k], b is [batch, k, n] (or [batch, n, k] when transpose_b), dc is [batch, m, n];
// da like a, db like b.
#[allow(clippy::too_many_arguments)]
pub fn matmul_backward(
    a: &[f32],
    b: &[f32],
    dc: &[f32],
    batch: usize,
    m: usize,
    k: usize,
    n: usize,
    transpose_b: bool,
    da: Option<&mut [f32]>,
    db: Option<&mut [f32]>,
) {
    assert_eq!(a.len(), batch * m * k, "matmul_backward: a is not [batch, m, k]");
    assert_eq!(b.len(), batch * k * n, "matmul_backward: b is not [batch, k, n]");
    assert_eq!(dc.len(), batch * m * n, "matmul_backward: dc is not [batch, m, n]");
    if let Some(da) = da {
        assert_eq!(da.len(), a.len(), "matmul_backward: da is not like a");
        // da = dc · bᵀ: as a `linear` with weight `b` laid out [k, n] (rows = k).
        let mut tmp = vec![0.0f32; m * k];
        for bi in 0..batch {
            let b_i = &b[bi * k * n..(bi + 1) * k * n];
            let dc_i = &dc[bi * m * n..(bi + 1) * m * n];
            tmp.iter_mut().for_each(|v| *v = 0.0);
            if transpose_b {
                // b_i is [n, k]: da = dc · b_i.
                linear_backward_input(dc_i, m, n, MatrixRef::F32(b_i), k, &mut tmp);
            } else {
                // b_i is [k, n]: da = dc · b_iᵀ, i.e. `linear` of dc by weight b_i.
                crate::gemm::linear(dc_i, m, n, MatrixRef::F32(b_i), k, None, crate::Activation::None, &mut tmp);
            }
            axpy(1.0, &tmp, &mut da[bi * m * k..(bi + 1) * m * k]);
        }
    }
    if let Some(db) = db {
        assert_eq!(db.len(), b.len(), "matmul_backward: db is not like b");
        for bi in 0..batch {
            let a_i = &a[bi * m * k..(bi + 1) * m * k];
            let dc_i = &dc[bi * m * n..(bi + 1) * m * n];
            let db_i = &mut db[bi * k * n..(bi + 1) * k * n];
            if transpose_b {
                // db_i [n, k] += dc_iᵀ · a_i.
                linear_backward_weight(dc_i, a_i, m, n, k, db_i);
            } else {
                // db_i [k, n] += a_iᵀ · dc_i, computed as (dc_iᵀ · a_i)ᵀ.
                let mut tmp = vec![0.0f32; n * k];
                linear_backward_weight(dc_i, a_i, m, n, k, &mut tmp);
                axpy(1.0, &transpose(&tmp, n, k), db_i);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{assert_close, dot, fd_grad, random, rng, to_f32};
    use rand::Rng;

    /// Naive f64 `x · wᵀ + bias`.
    // x [m, k], w [n, k], bias [n]; returns [m, n].
    fn linear_ref(x: &[f64], w: &[f64], bias: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut y = vec![0.0; m * n];
        for r in 0..m {
            for j in 0..n {
                y[r * n + j] = bias[j] + (0..k).map(|p| x[r * k + p] * w[j * k + p]).sum::<f64>();
            }
        }
        y
    }

    #[test]
    fn linear_backward_matches_finite_differences() {
        let mut rng = rng();
        for _ in 0..4 {
            let (m, k, n) = (rng.gen_range(1..80), rng.gen_range(1..40), rng.gen_range(1..40));
            let (x, w, bias, r) = (random(&mut rng, m * k), random(&mut rng, n * k), random(&mut rng, n), random(&mut rng, m * n));
            let h = 1e-6;
            let want_dx = fd_grad(&x, h, |x| dot(&r, &linear_ref(x, &w, &bias, m, k, n)));
            let want_dw = fd_grad(&w, h, |w| dot(&r, &linear_ref(&x, w, &bias, m, k, n)));
            let want_db = fd_grad(&bias, h, |b| dot(&r, &linear_ref(&x, &w, b, m, k, n)));
            let (xf, wf, rf) = (to_f32(&x), to_f32(&w), to_f32(&r));
            let mut dx = vec![0.0; m * k];
            linear_backward_input(&rf, m, n, MatrixRef::F32(&wf), k, &mut dx);
            assert_close("dx", &dx, &want_dx, 1e-5);
            let mut dw = vec![0.0; n * k];
            linear_backward_weight(&rf, &xf, m, n, k, &mut dw);
            assert_close("dw", &dw, &want_dw, 1e-5);
            let mut db = vec![0.0; n];
            bias_backward(&rf, m, n, &mut db);
            assert_close("db", &db, &want_db, 1e-5);
        }
    }

    /// Sizes past one slab and off every block multiple, against a plain f64 product.
    #[test]
    fn linear_backward_input_spans_slabs_and_ragged_edges() {
        let mut rng = rng();
        for (m, n, k) in [(37, 70, 300), (5, 3, 513), (130, 97, 256)] {
            let (w, dy) = (random(&mut rng, n * k), random(&mut rng, m * n));
            let want: Vec<f64> = (0..m * k).map(|i| (0..n).map(|j| dy[(i / k) * n + j] * w[j * k + i % k]).sum::<f64>() + 0.5).collect();
            let mut dx = vec![0.5f32; m * k];
            linear_backward_input(&to_f32(&dy), m, n, MatrixRef::F32(&to_f32(&w)), k, &mut dx);
            assert_close("dx", &dx, &want, 1e-5);
        }
    }

    #[test]
    fn linear_backward_input_through_nf4_uses_the_dequantised_weight() {
        let mut rng = rng();
        let (m, k, n) = (70, 128, 37);
        let w: Vec<f32> = (0..n * k).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let q = crate::nf4::quantize(&w);
        let view = q.view();
        let mut dequantised = vec![0.0; n * k];
        MatrixRef::Nf4(view).dequantize_range(0, &mut dequantised);
        let dy: Vec<f32> = (0..m * n).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let mut from_nf4 = vec![0.0; m * k];
        linear_backward_input(&dy, m, n, MatrixRef::Nf4(view), k, &mut from_nf4);
        let mut from_f32 = vec![0.0; m * k];
        linear_backward_input(&dy, m, n, MatrixRef::F32(&dequantised), k, &mut from_f32);
        let want: Vec<f64> = from_f32.iter().map(|&v| v as f64).collect();
        assert_close("dx through NF4", &from_nf4, &want, 1e-6);
    }

    /// Naive f64 batched `a · b` (b read as [n, k] when transposed).
    fn matmul_ref(a: &[f64], b: &[f64], batch: usize, m: usize, k: usize, n: usize, tb: bool) -> Vec<f64> {
        let mut c = vec![0.0; batch * m * n];
        for bi in 0..batch {
            for i in 0..m {
                for j in 0..n {
                    c[(bi * m + i) * n + j] = (0..k)
                        .map(|p| a[(bi * m + i) * k + p] * if tb { b[(bi * n + j) * k + p] } else { b[(bi * k + p) * n + j] })
                        .sum::<f64>();
                }
            }
        }
        c
    }

    #[test]
    fn matmul_backward_matches_finite_differences() {
        let mut rng = rng();
        for tb in [false, true] {
            let (batch, m, k, n) = (rng.gen_range(1..4), rng.gen_range(1..20), rng.gen_range(1..20), rng.gen_range(1..20));
            let (a, b, r) = (random(&mut rng, batch * m * k), random(&mut rng, batch * k * n), random(&mut rng, batch * m * n));
            let want_da = fd_grad(&a, 1e-6, |a| dot(&r, &matmul_ref(a, &b, batch, m, k, n, tb)));
            let want_db = fd_grad(&b, 1e-6, |b| dot(&r, &matmul_ref(&a, b, batch, m, k, n, tb)));
            let (mut da, mut db) = (vec![0.0; a.len()], vec![0.0; b.len()]);
            matmul_backward(&to_f32(&a), &to_f32(&b), &to_f32(&r), batch, m, k, n, tb, Some(&mut da), Some(&mut db));
            assert_close(&format!("da (transpose_b {tb})"), &da, &want_da, 1e-5);
            assert_close(&format!("db (transpose_b {tb})"), &db, &want_db, 1e-5);
        }
    }
}
