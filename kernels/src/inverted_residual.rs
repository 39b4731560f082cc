//! TinyViT's MBConv (an inverted residual) as one operation, computed in bands of rows:
//! `out = act(x + project(act(depthwise(act(expand(x))))))`, with a 1x1 `expand` to `hidden`
//! channels, a `k x k` depthwise convolution (stride 1, padding `k/2`) and a 1x1 `project` back.
//!
//! Why: the hidden tensor is four times the input. At LiteMedSAM's first stage (64 channels of
//! 256x256 expanded to 256) each intermediate is 64 MiB, so computing the three convolutions
//! one after the other writes and reads 256 MiB through DRAM per block, and the depthwise
//! convolution (a few FLOPs per byte) runs at memory speed. Here a band of `rows` output rows
//! is finished at a time: its expansion (with `k/2` halo rows on each side), the depthwise rows,
//! and the projection with bias, residual and activation fused into its epilogue. The band's
//! intermediates ([`BAND_BYTES`]) stay in the last-level cache; the halo rows are expanded twice
//! (once per band that needs them), a few percent of the expansion's FLOPs.
//!
//! Every output element goes through exactly the arithmetic of the unfused path (the same
//! micro-kernels over the same `k` order, the same epilogue order: bias, then residual, then
//! activation), so the two agree bit for bit (tests below).

use std::cell::RefCell;

use rayon::prelude::*;

use crate::activation::{self, Activation};
use crate::conv::{depthwise_plane_rows, Geometry};
use crate::packed_gemm::{self, BOperand};
use crate::simd::{self, Isa};
use crate::weights::MatrixRef;

/// Target size of one band's two intermediates (expanded rows with halo, depthwise rows): a
/// share of the last-level cache (32 MiB on the machines measured), leaving room for the input
/// and output rows the band touches. For LiteMedSAM's first stage this gives bands of 22 rows;
/// measured there (`inverted_residual_timing`), bands of 16-32 rows took two thirds of the
/// unfused time, 8 rows or fewer lost it again to the per-band GEMM set-up and halo work.
const BAND_BYTES: usize = 12 << 20;

/// One inverted residual's weights, each `[rows, cols]` row-major in any stored precision.
#[derive(Clone, Copy)]
pub struct InvertedResidualWeights<'a> {
    /// `[hidden, c]` and its bias `[hidden]`.
    pub expand: MatrixRef<'a>,
    pub expand_bias: Option<&'a [f32]>,
    /// `[hidden, k·k]` and its bias `[hidden]`.
    pub depthwise: MatrixRef<'a>,
    pub depthwise_bias: Option<&'a [f32]>,
    /// `[c, hidden]` and its bias `[c]`.
    pub project: MatrixRef<'a>,
    pub project_bias: Option<&'a [f32]>,
}

thread_local! {
    /// The dequantised weights (expand, depthwise taps, project) and the band's two
    /// intermediates: reused call after call, so a frame allocates nothing.
    static BUFFERS: RefCell<[Vec<f32>; 5]> = const { RefCell::new([Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new()]) };
}

/// `out = act(x + project(act(depthwise(act(expand(x))))))` for NCHW `x`.
// x, out: [batch, c, h, w]; weights as documented on InvertedResidualWeights.
#[allow(clippy::too_many_arguments)]
pub fn inverted_residual(x: &[f32], batch: usize, c: usize, h: usize, w: usize, hidden: usize, k: usize, weights: InvertedResidualWeights, act: Activation, out: &mut [f32]) {
    let halo = k / 2;
    // Rows per band: the budget over one row's two intermediates, at least one row.
    let per_row = 2 * hidden * w * std::mem::size_of::<f32>();
    let band = (BAND_BYTES / per_row.max(1)).saturating_sub(2 * halo).clamp(1, h.max(1));
    inverted_residual_banded(x, batch, c, h, w, hidden, k, weights, act, band, out);
}

/// [`inverted_residual`] with an explicit band height (the tests take several).
#[allow(clippy::too_many_arguments)]
fn inverted_residual_banded(x: &[f32], batch: usize, c: usize, h: usize, w: usize, hidden: usize, k: usize, weights: InvertedResidualWeights, act: Activation, band: usize, out: &mut [f32]) {
    let plane = h * w;
    assert!(k % 2 == 1 && band >= 1, "inverted_residual: odd kernel {k} and a band of at least one row");
    assert_eq!(x.len(), batch * c * plane, "inverted_residual: x is not [batch, c, h, w]");
    assert_eq!(out.len(), x.len(), "inverted_residual: out is not x's shape");
    for (bias, len, what) in [(weights.expand_bias, hidden, "expand"), (weights.depthwise_bias, hidden, "depthwise"), (weights.project_bias, c, "project")] {
        assert!(bias.is_none_or(|b| b.len() == len), "inverted_residual: {what} bias is not [{len}]");
    }
    if out.is_empty() {
        return;
    }
    let isa = simd::active();
    let halo = k / 2;
    let with_buffers = |f: &mut dyn FnMut(&mut [Vec<f32>; 5])| {
        BUFFERS.with(|cell| match cell.try_borrow_mut() {
            Ok(mut bufs) => f(&mut bufs),
            // A second caller on this thread (waiting inside rayon): buffers of its own.
            Err(_) => f(&mut Default::default()),
        })
    };
    with_buffers(&mut |[expand, taps, project, expanded, depthwise]| {
        for (buf, m, len) in [(&mut *expand, weights.expand, hidden * c), (&mut *taps, weights.depthwise, hidden * k * k), (&mut *project, weights.project, c * hidden)] {
            buf.resize(len, 0.0);
            m.dequantize_range(0, buf);
        }
        expanded.resize(hidden * (band + 2 * halo) * w, 0.0);
        depthwise.resize(hidden * band * w, 0.0);
        for b in 0..batch {
            let (x_b, out_b) = (&x[b * c * plane..][..c * plane], &mut out[b * c * plane..][..c * plane]);
            for r0 in (0..h).step_by(band) {
                let r1 = (r0 + band).min(h);
                let rows = Rows { first: r0.saturating_sub(halo), end: (r1 + halo).min(h), out: r0..r1 };
                run_band(isa, x_b, c, h, w, hidden, k, &weights, act, (expand, taps, project), &rows, expanded, depthwise, out_b);
            }
        }
    });
}

/// The image rows one band reads (`first..end`, its output rows plus the halo inside the image)
/// and writes (`out`).
struct Rows {
    first: usize,
    end: usize,
    out: std::ops::Range<usize>,
}

/// One band: expansion of rows `first..end`, depthwise rows `out`, projection into `out`.
// x, out: one image [c, h, w]; dequantised: expand [hidden, c], taps [hidden, k·k], project
// [c, hidden]; expanded, depthwise: scratch of at least hidden·(band + 2·halo)·w and hidden·band·w.
#[allow(clippy::too_many_arguments)]
fn run_band(
    isa: Isa,
    x: &[f32],
    c: usize,
    h: usize,
    w: usize,
    hidden: usize,
    k: usize,
    weights: &InvertedResidualWeights,
    act: Activation,
    (expand, taps, project): (&[f32], &[f32], &[f32]),
    rows: &Rows,
    expanded: &mut [f32],
    depthwise: &mut [f32],
    out: &mut [f32],
) {
    let plane = h * w;
    let (in_cols, out_cols) = ((rows.end - rows.first) * w, rows.out.len() * w);
    let expanded = &mut expanded[..hidden * in_cols];
    let depthwise = &mut depthwise[..hidden * out_cols];

    // Expansion: [hidden, c] · x[c, first·w .. end·w] (rows of x are planes `plane` apart).
    let expand_epilogue = |row: usize, _col0: usize, seg: &mut [f32]| {
        if let Some(b) = weights.expand_bias {
            let b = b[row];
            seg.iter_mut().for_each(|v| *v += b);
        }
        activation::apply_serial_at(isa, act, seg);
    };
    let b = BOperand::RowMajor { data: &x[rows.first * w..], ldb: plane };
    packed_gemm::gemm(isa, hidden, in_cols, c, expand, c, b, expanded, in_cols, &expand_epilogue);

    // Depthwise, per channel: the band's expanded rows are a small image of their own whose zero
    // padding stands for the image's only where the image really ends; the rows computed are the
    // band's output rows, whose every tap lies in the expanded rows or outside the image.
    let halo = k / 2;
    let g = Geometry { h: rows.end - rows.first, w, kh: k, kw: k, stride: 1, padding: halo, oh: rows.end - rows.first, ow: w };
    let local = rows.out.start - rows.first..rows.out.end - rows.first;
    expanded.par_chunks(in_cols).zip(depthwise.par_chunks_mut(out_cols)).enumerate().for_each(|(ch, (src, dst))| {
        let bias = weights.depthwise_bias.map_or(0.0, |b| b[ch]);
        depthwise_plane_rows(isa, src, g, &taps[ch * k * k..][..k * k], bias, act, local.clone(), dst);
    });

    // Projection into the output rows, with bias, the residual and the activation in the epilogue
    // (in that order, as the unfused path adds them).
    let col_base = rows.out.start * w;
    let epilogue = |row: usize, col0: usize, seg: &mut [f32]| {
        if let Some(b) = weights.project_bias {
            let b = b[row];
            seg.iter_mut().for_each(|v| *v += b);
        }
        let residual = &x[row * plane + col_base + col0..][..seg.len()];
        seg.iter_mut().zip(residual).for_each(|(v, &r)| *v += r);
        activation::apply_serial_at(isa, act, seg);
    };
    let b = BOperand::RowMajor { data: depthwise, ldb: out_cols };
    packed_gemm::gemm(isa, c, out_cols, hidden, project, hidden, b, &mut out[col_base..], plane, &epilogue);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conv::conv2d;
    use crate::nf4;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn random(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect()
    }

    /// The unfused path the network ran before: three convolutions, the residual add, the
    /// activation.
    #[allow(clippy::too_many_arguments)]
    fn unfused(x: &[f32], batch: usize, c: usize, h: usize, w: usize, hidden: usize, k: usize, wt: &InvertedResidualWeights, act: Activation) -> Vec<f32> {
        let (mut e, mut d, mut p) = (vec![0.0; batch * hidden * h * w], vec![0.0; batch * hidden * h * w], vec![0.0; x.len()]);
        unfused_into(x, batch, c, h, w, hidden, k, wt, act, [&mut e, &mut d, &mut p]);
        p
    }

    /// [`unfused`] into caller-owned buffers (expanded, depthwise, out), as the network's pooled
    /// buffers are.
    #[allow(clippy::too_many_arguments)]
    fn unfused_into(x: &[f32], batch: usize, c: usize, h: usize, w: usize, hidden: usize, k: usize, wt: &InvertedResidualWeights, act: Activation, [e, d, p]: [&mut [f32]; 3]) {
        conv2d(x, batch, c, h, w, wt.expand, hidden, 1, 1, wt.expand_bias, 1, 0, 1, act, e);
        conv2d(e, batch, hidden, h, w, wt.depthwise, hidden, k, k, wt.depthwise_bias, 1, k / 2, hidden, act, d);
        conv2d(d, batch, hidden, h, w, wt.project, c, 1, 1, wt.project_bias, 1, 0, 1, Activation::None, p);
        p.iter_mut().zip(x).for_each(|(v, &r)| *v += r);
        activation::apply(act, p);
    }

    /// Banded against unfused, bit for bit: band heights from one row to the whole image (and
    /// not dividing it), images narrower than a register and wider than a GEMM column block,
    /// f32 and NF4 weights, with and without biases, GELU and ReLU.
    #[test]
    fn banded_equals_unfused_bit_for_bit() {
        let mut rng = ChaCha8Rng::seed_from_u64(rand::random());
        for &(batch, c, h, w, hidden, k) in &[(1, 8, 7, 9, 32, 3), (2, 12, 13, 40, 48, 3), (1, 16, 6, 70, 64, 5), (1, 5, 1, 3, 20, 3)] {
            let x = random(&mut rng, batch * c * h * w);
            let (raw_e, raw_d, raw_p) = (random(&mut rng, hidden * c), random(&mut rng, hidden * k * k), random(&mut rng, c * hidden));
            let (q_e, q_d, q_p) = (nf4::quantize(&raw_e), nf4::quantize(&raw_d), nf4::quantize(&raw_p));
            let (be, bd, bp) = (random(&mut rng, hidden), random(&mut rng, hidden), random(&mut rng, c));
            for (nf4, biases, act) in [(false, true, Activation::Gelu), (true, true, Activation::Gelu), (false, false, Activation::Relu)] {
                fn m<'a>(nf4: bool, raw: &'a [f32], q: &'a nf4::Nf4Owned) -> MatrixRef<'a> {
                    if nf4 {
                        MatrixRef::Nf4(q.view())
                    } else {
                        MatrixRef::F32(raw)
                    }
                }
                let weights = InvertedResidualWeights {
                    expand: m(nf4, &raw_e, &q_e),
                    expand_bias: biases.then_some(&be[..]),
                    depthwise: m(nf4, &raw_d, &q_d),
                    depthwise_bias: biases.then_some(&bd[..]),
                    project: m(nf4, &raw_p, &q_p),
                    project_bias: biases.then_some(&bp[..]),
                };
                let expected = unfused(&x, batch, c, h, w, hidden, k, &weights, act);
                for band in [1, 2, 3, h.div_ceil(2), h, h + 4] {
                    let mut out = vec![f32::NAN; x.len()];
                    inverted_residual_banded(&x, batch, c, h, w, hidden, k, weights, act, band, &mut out);
                    let first_diff = out.iter().zip(&expected).position(|(o, e)| o.to_bits() != e.to_bits());
                    assert!(first_diff.is_none(), "c {c} h {h} w {w} hidden {hidden} k {k} band {band} nf4 {nf4} {act:?}: first difference at {first_diff:?}");
                }
                let mut out = vec![f32::NAN; x.len()];
                inverted_residual(&x, batch, c, h, w, hidden, k, weights, act, &mut out);
                assert!(out.iter().zip(&expected).all(|(o, e)| o.to_bits() == e.to_bits()), "the budgeted band height");
            }
        }
    }

    /// LiteMedSAM's first-stage MBConv (64 channels of 256x256, hidden 256, NF4), banded against
    /// unfused, alternating, medians of 5: `cargo test --release -p minisam-kernels --lib
    /// inverted_residual_timing -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn inverted_residual_timing() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let (c, h, w, hidden, k) = (64, 256, 256, 256, 3);
        let x = random(&mut rng, c * h * w);
        let (q_e, q_d, q_p) = (nf4::quantize(&random(&mut rng, hidden * c)), nf4::quantize(&random(&mut rng, hidden * k * k)), nf4::quantize(&random(&mut rng, c * hidden)));
        let (be, bd, bp) = (random(&mut rng, hidden), random(&mut rng, hidden), random(&mut rng, c));
        let weights = InvertedResidualWeights {
            expand: MatrixRef::Nf4(q_e.view()),
            expand_bias: Some(&be),
            depthwise: MatrixRef::Nf4(q_d.view()),
            depthwise_bias: Some(&bd),
            project: MatrixRef::Nf4(q_p.view()),
            project_bias: Some(&bp),
        };
        let mut out = vec![0.0; x.len()];
        let (mut e, mut d) = (vec![0.0; hidden * h * w], vec![0.0; hidden * h * w]);
        let (mut fused, mut plain) = (Vec::new(), Vec::new());
        for _ in 0..6 {
            let t = std::time::Instant::now();
            inverted_residual(&x, 1, c, h, w, hidden, k, weights, Activation::Gelu, &mut out);
            fused.push(t.elapsed().as_secs_f64() * 1e3);
            let t = std::time::Instant::now();
            unfused_into(&x, 1, c, h, w, hidden, k, &weights, Activation::Gelu, [&mut e, &mut d, &mut out]);
            plain.push(t.elapsed().as_secs_f64() * 1e3);
        }
        for v in [&mut fused, &mut plain] {
            v.remove(0);
            v.sort_by(f64::total_cmp);
        }
        eprintln!("MBConv 64->256->64 @256x256 NF4: banded {:.2} ms, unfused {:.2} ms (medians of 5)", fused[2], plain[2]);
        for band in [2, 4, 8, 16, 32, 64, 256] {
            let mut t: Vec<f64> = (0..4)
                .map(|_| {
                    let t = std::time::Instant::now();
                    inverted_residual_banded(&x, 1, c, h, w, hidden, k, weights, Activation::Gelu, band, &mut out);
                    t.elapsed().as_secs_f64() * 1e3
                })
                .collect();
            t.sort_by(f64::total_cmp);
            eprintln!("band {band}: {:.2} ms", t[1]);
        }
    }
}
