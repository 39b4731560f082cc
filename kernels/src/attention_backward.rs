//! Backward pass of [`crate::attention::attention`], flash style: no `nq × nk` matrix is kept.
//!
//! For each query the scores are recomputed (one row of `nk` floats), softmax-normalised, and the
//! output row `o = Σ p_j v_j` rebuilt; then with `D = dO·o` and `ds_j = p_j (dO·v_j - D)`:
//! `dq += scale Σ ds_j k_j`, `dk_j += scale ds_j q`, `dv_j += p_j dO`, and the additive bias gets
//! `ds_j` at the entry it read (a table cell, or one `rel_h` and one `rel_w` entry). Work is split
//! over batch-heads, which own their rows of every gradient; a bias table shared by several
//! batch-heads is reduced afterwards.

use rayon::prelude::*;

use crate::attention::Bias;

/// Where the gradient of the additive bias goes (same layout as the [`Bias`] it belongs to).
pub enum BiasGrad<'a> {
    /// The bias needs no gradient (or there is none).
    None,
    /// `[heads, nq, nk]`, for [`Bias::Table`].
    Table(&'a mut [f32]),
    /// `[bh, nq, kh]` and `[bh, nq, kw]`, for [`Bias::RelPos`].
    RelPos { rel_h: &'a mut [f32], rel_w: &'a mut [f32] },
}

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[inline]
fn axpy(a: f32, src: &[f32], dst: &mut [f32]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d += a * s;
    }
}

/// Gradients of `out = softmax(scale · q·kᵀ + bias) · v`, added into `dq`, `dk`, `dv` and the
/// bias gradient.
// q, dq: [bh, nq, d]; k, v, dk, dv: [bh, nk, d]; dout: [bh, nq, d]; bias and bias_grad as their docs.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dout: &[f32],
    bh: usize,
    nq: usize,
    nk: usize,
    d: usize,
    scale: f32,
    bias: Bias,
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    bias_grad: BiasGrad,
) {
    assert!(q.len() == bh * nq * d && dq.len() == q.len() && dout.len() == q.len(), "attention_backward: q, dq, dout are not [bh, nq, d]");
    assert!(k.len() == bh * nk * d && v.len() == k.len() && dk.len() == k.len() && dv.len() == k.len(), "attention_backward: k, v, dk, dv are not [bh, nk, d]");
    let (kh, kw) = match bias {
        Bias::None => (0, 0),
        Bias::Table { table, heads } => {
            assert!(heads > 0 && table.len() == heads * nq * nk, "attention_backward: bias table is not [heads, nq, nk]");
            (0, 0)
        }
        Bias::RelPos { rel_h, rel_w, kh, kw } => {
            assert!(kh * kw == nk && rel_h.len() == bh * nq * kh && rel_w.len() == bh * nq * kw, "attention_backward: rel_h/rel_w are not [bh, nq, kh]/[bh, nq, kw]");
            (kh, kw)
        }
    };
    let (want_table, drel_h, drel_w) = match bias_grad {
        BiasGrad::None => (None, None, None),
        BiasGrad::Table(t) => {
            assert!(matches!(bias, Bias::Table { .. }) && t.len() % (nq * nk).max(1) == 0, "attention_backward: table gradient without a table bias of its shape");
            (Some(t), None, None)
        }
        BiasGrad::RelPos { rel_h, rel_w } => {
            assert!(matches!(bias, Bias::RelPos { .. }) && rel_h.len() == bh * nq * kh && rel_w.len() == bh * nq * kw, "attention_backward: rel-pos gradient without a rel-pos bias of its shape");
            (None, Some(rel_h), Some(rel_w))
        }
    };
    if bh == 0 || nq == 0 || d == 0 {
        return;
    }
    let wants_table = want_table.is_some();
    // Per batch-head, its rows of every gradient (rel-pos grads may be absent: empty chunks).
    let rel_h_chunks: Vec<Option<&mut [f32]>> = match drel_h {
        Some(g) => g.chunks_mut(nq * kh).map(Some).collect(),
        None => (0..bh).map(|_| None).collect(),
    };
    let rel_w_chunks: Vec<Option<&mut [f32]>> = match drel_w {
        Some(g) => g.chunks_mut(nq * kw).map(Some).collect(),
        None => (0..bh).map(|_| None).collect(),
    };
    let table_parts: Vec<Option<Vec<f32>>> = dq
        .par_chunks_mut(nq * d)
        .zip(dk.par_chunks_mut(nk * d))
        .zip(dv.par_chunks_mut(nk * d))
        .zip(rel_h_chunks.into_par_iter().zip(rel_w_chunks.into_par_iter()))
        .enumerate()
        .map(|(b, (((dq, dk), dv), (mut gh, mut gw)))| {
            let (qb, kb, vb, gob) = (&q[b * nq * d..][..nq * d], &k[b * nk * d..][..nk * d], &v[b * nk * d..][..nk * d], &dout[b * nq * d..][..nq * d]);
            let mut table_part = wants_table.then(|| vec![0.0f32; nq * nk]);
            let mut p = vec![0.0f32; nk];
            let mut o = vec![0.0f32; d];
            for i in 0..nq {
                let qi = &qb[i * d..(i + 1) * d];
                let go = &gob[i * d..(i + 1) * d];
                for (j, pj) in p.iter_mut().enumerate() {
                    let b_ij = match bias {
                        Bias::None => 0.0,
                        Bias::Table { table, heads } => table[((b % heads) * nq + i) * nk + j],
                        Bias::RelPos { rel_h, rel_w, kh, kw } => rel_h[(b * nq + i) * kh + j / kw] + rel_w[(b * nq + i) * kw + j % kw],
                    };
                    *pj = scale * dot(qi, &kb[j * d..(j + 1) * d]) + b_ij;
                }
                let max = p.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let mut total = 0.0f32;
                for pj in p.iter_mut() {
                    *pj = if *pj == f32::NEG_INFINITY { 0.0 } else { (*pj - max).exp() };
                    total += *pj;
                }
                p.iter_mut().for_each(|pj| *pj /= total);
                o.iter_mut().for_each(|x| *x = 0.0);
                for (j, &pj) in p.iter().enumerate() {
                    axpy(pj, &vb[j * d..(j + 1) * d], &mut o);
                }
                let big_d = dot(go, &o);
                let dqi = &mut dq[i * d..(i + 1) * d];
                for (j, &pj) in p.iter().enumerate() {
                    let vj = &vb[j * d..(j + 1) * d];
                    let ds = pj * (dot(go, vj) - big_d);
                    axpy(scale * ds, &kb[j * d..(j + 1) * d], dqi);
                    axpy(scale * ds, qi, &mut dk[j * d..(j + 1) * d]);
                    axpy(pj, go, &mut dv[j * d..(j + 1) * d]);
                    if let Some(gh) = gh.as_deref_mut() {
                        gh[i * kh + j / kw] += ds;
                    }
                    if let Some(gw) = gw.as_deref_mut() {
                        gw[i * kw + j % kw] += ds;
                    }
                    if let Some(t) = table_part.as_mut() {
                        t[i * nk + j] += ds;
                    }
                }
            }
            table_part
        })
        .collect();
    if let (Some(table_grad), Bias::Table { heads, .. }) = (want_table, bias) {
        for (b, part) in table_parts.into_iter().enumerate() {
            let dst = &mut table_grad[(b % heads) * nq * nk..][..nq * nk];
            axpy(1.0, &part.expect("table part computed when its gradient is wanted"), dst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{assert_close, dot as dot64, fd_grad, random, rng, to_f32};
    use rand::Rng;

    /// The inputs of one attention call, in f64.
    struct Case {
        bh: usize,
        nq: usize,
        nk: usize,
        d: usize,
        heads: usize,
        kh: usize,
        kw: usize,
        scale: f64,
    }

    /// Naive f64 attention; `bias(b, i, j)` from the table or rel-pos arrays.
    // q [bh, nq, d], k/v [bh, nk, d], table [heads, nq, nk] (may be empty), rel_h [bh, nq, kh], rel_w [bh, nq, kw] (may be empty).
    fn attention_ref(c: &Case, q: &[f64], k: &[f64], v: &[f64], table: &[f64], rel_h: &[f64], rel_w: &[f64]) -> Vec<f64> {
        let mut out = vec![0.0; c.bh * c.nq * c.d];
        for b in 0..c.bh {
            for i in 0..c.nq {
                let s: Vec<f64> = (0..c.nk)
                    .map(|j| {
                        let mut s = c.scale * (0..c.d).map(|p| q[(b * c.nq + i) * c.d + p] * k[(b * c.nk + j) * c.d + p]).sum::<f64>();
                        if !table.is_empty() {
                            s += table[((b % c.heads) * c.nq + i) * c.nk + j];
                        }
                        if !rel_h.is_empty() {
                            s += rel_h[(b * c.nq + i) * c.kh + j / c.kw] + rel_w[(b * c.nq + i) * c.kw + j % c.kw];
                        }
                        s
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let total: f64 = s.iter().map(|x| (x - m).exp()).sum();
                for p in 0..c.d {
                    out[(b * c.nq + i) * c.d + p] = (0..c.nk).map(|j| (s[j] - m).exp() / total * v[(b * c.nk + j) * c.d + p]).sum::<f64>();
                }
            }
        }
        out
    }

    #[test]
    fn attention_backward_matches_finite_differences_for_every_bias_kind() {
        let mut rng = rng();
        for kind in 0..3 {
            let (kh, kw) = (rng.gen_range(1..4), rng.gen_range(1..4));
            let c = Case { bh: 4, nq: rng.gen_range(1..7), nk: kh * kw, d: rng.gen_range(1..6), heads: 2, kh, kw, scale: 0.7 };
            let q = random(&mut rng, c.bh * c.nq * c.d);
            let k = random(&mut rng, c.bh * c.nk * c.d);
            let v = random(&mut rng, c.bh * c.nk * c.d);
            let r = random(&mut rng, c.bh * c.nq * c.d);
            let table = if kind == 1 { random(&mut rng, c.heads * c.nq * c.nk) } else { vec![] };
            let (rel_h, rel_w) = if kind == 2 { (random(&mut rng, c.bh * c.nq * kh), random(&mut rng, c.bh * c.nq * kw)) } else { (vec![], vec![]) };
            let h = 1e-6;
            let loss = |q: &[f64], k: &[f64], v: &[f64], t: &[f64], rh: &[f64], rw: &[f64]| dot64(&r, &attention_ref(&c, q, k, v, t, rh, rw));
            let want_dq = fd_grad(&q, h, |x| loss(x, &k, &v, &table, &rel_h, &rel_w));
            let want_dk = fd_grad(&k, h, |x| loss(&q, x, &v, &table, &rel_h, &rel_w));
            let want_dv = fd_grad(&v, h, |x| loss(&q, &k, x, &table, &rel_h, &rel_w));

            let (qf, kf, vf, tf, rhf, rwf) = (to_f32(&q), to_f32(&k), to_f32(&v), to_f32(&table), to_f32(&rel_h), to_f32(&rel_w));
            let bias = match kind {
                0 => Bias::None,
                1 => Bias::Table { table: &tf, heads: c.heads },
                _ => Bias::RelPos { rel_h: &rhf, rel_w: &rwf, kh, kw },
            };
            let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
            let (mut dt, mut drh, mut drw) = (vec![0.0; table.len()], vec![0.0; rel_h.len()], vec![0.0; rel_w.len()]);
            let grad = match kind {
                0 => BiasGrad::None,
                1 => BiasGrad::Table(&mut dt),
                _ => BiasGrad::RelPos { rel_h: &mut drh, rel_w: &mut drw },
            };
            attention_backward(&qf, &kf, &vf, &to_f32(&r), c.bh, c.nq, c.nk, c.d, c.scale as f32, bias, &mut dq, &mut dk, &mut dv, grad);
            let tol = 2e-5;
            assert_close(&format!("dq (bias kind {kind})"), &dq, &want_dq, tol);
            assert_close(&format!("dk (bias kind {kind})"), &dk, &want_dk, tol);
            assert_close(&format!("dv (bias kind {kind})"), &dv, &want_dv, tol);
            if kind == 1 {
                let want = fd_grad(&table, h, |x| loss(&q, &k, &v, x, &rel_h, &rel_w));
                assert_close("dtable", &dt, &want, tol);
            }
            if kind == 2 {
                let want_h = fd_grad(&rel_h, h, |x| loss(&q, &k, &v, &table, x, &rel_w));
                let want_w = fd_grad(&rel_w, h, |x| loss(&q, &k, &v, &table, &rel_h, x));
                assert_close("drel_h", &drh, &want_h, tol);
                assert_close("drel_w", &drw, &want_w, tol);
            }
        }
    }
}
