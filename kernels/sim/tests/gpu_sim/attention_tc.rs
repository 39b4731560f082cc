//! attention.cu's tensor-core body (`attention_tc_d*`, FlashAttention-2 style) against an f64
//! reference whose q, k and v are rounded to the mma operand type exactly as `cvt.rn` rounds them.
//!
//! Tolerance, per output element (row i, column c), with p_j the reference's softmax weights and
//! A = Σ_j p_j·|ṽ_jc| / Σ_j p_j (ṽ: v as rounded):
//! - the kernel rounds the weights P to 16 bits before P·V (and sums the unrounded ones), which
//!   moves the output by at most u_p·A, u_p the unit roundoff of the operand type (bf16 2^-8,
//!   fp16 2^-11; fp16 also flushes weights below 2^-14 into subnormals, an absolute 2^-25 per
//!   key: nk·2^-25·max|ṽ| at most);
//! - scores carry f32 errors: the mma's sum over the head dim (at most one rounding per k16 step
//!   and per accumulation), the fmaf with the bias and the bias's own f32 sum, at most
//!   δ = (d/16 + 4)·u·(scale·Σ_c|q̃_c·k̃_jc| + |bias_j| + |s_j|) for the worst key j, plus expf's
//!   2 ulp; a relative change of every weight within e^{±2δ} moves the output by (e^{2δ}-1)·A;
//! - the f32 accumulation of O and of the sum l over nk keys and their per-tile rescaling, at most
//!   (nk + 64)·2u·A.
//!
//! The first term dominates: about 2e-3 for bf16 against outputs of order 0.1-1 (the draws use
//! sharp attention, q scaled by up to 4, so that an output is a few keys' values and a wrong
//! fragment, key or tile moves it by O(max|v|), far beyond the bound).

use minisam_gpusim::{Arg, Dim3};
use minisam_kernels::attention::Bias;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::common::*;
use crate::params::*;

/// The mma operand type of a build: "" is bf16, "f16" fp16 (and "mutant" is bf16).
fn operand_rounding(variant: &str) -> (fn(f32) -> f32, f64, bool) {
    if variant == "f16" {
        (round_f16_satfinite, 1.0 / 2048.0, true)
    } else {
        (round_bf16, 1.0 / 256.0, false)
    }
}

/// Shapes of one draw; `None` fields are drawn.
#[derive(Clone, Copy, Debug, Default)]
pub struct Shape {
    pub d: Option<usize>,
    pub nq: Option<usize>,
    pub nk: Option<usize>,
    pub mode: Option<usize>,
    /// With `nk` in rel-pos mode: the key grid's width (nk a multiple of it).
    pub kw: Option<usize>,
    /// At least 65 queries (two blocks, every warp of the first live) and 3 key tiles: what a
    /// missing barrier or wait needs to show on every draw.
    pub large: bool,
    /// Force a query row whose scores are all -inf (bias table mode).
    pub dead_row: bool,
}

/// Max error / bound over the outputs of one check (for the report).
pub struct Outcome {
    pub max_err: f64,
    pub max_ratio: f64,
}

/// One attention problem for the tensor-core instance of head dim `dp`.
pub fn case(sim: &Sim, rng: &mut ChaCha8Rng, dp: usize, shape: Shape) -> Result<Outcome, String> {
    let kernel = format!("attention_tc_d{dp}");
    let smaller = match dp {
        16 => 1,
        32 => 17,
        64 => 33,
        _ => 65,
    };
    // The instance's own head dim half the time (the models' 16, 32, 64, 80), else one it pads.
    let d = shape.d.unwrap_or_else(|| {
        if rng.gen_bool(0.5) {
            dp
        } else {
            rng.gen_range(smaller..=dp)
        }
    });
    assert!(d <= dp);
    let bh = if shape.large {
        rng.gen_range(1..3)
    } else {
        rng.gen_range(1..4)
    };
    let nq = shape
        .nq
        .unwrap_or_else(|| rng.gen_range(if shape.large { 65 } else { 1 }..200));
    let mode = shape.mode.unwrap_or_else(|| {
        if shape.dead_row {
            1
        } else {
            rng.gen_range(0..3)
        }
    });
    let bkv = if dp <= 32 { 64 } else { 32 };
    let (kh, kw) = match shape.nk {
        Some(nk) => {
            let kw = shape.kw.unwrap_or(nk);
            assert_eq!(nk % kw, 0, "nk must be a whole number of key rows");
            (nk / kw, kw)
        }
        None if shape.large => (rng.gen_range(6..10), rng.gen_range(2 * bkv / 5..bkv)),
        None => (rng.gen_range(1..12), rng.gen_range(1..14)),
    };
    let nk = match shape.nk {
        Some(nk) => nk,
        None if mode == 2 => kh * kw,
        None => rng.gen_range(if shape.large { 2 * bkv + 1 } else { 1 }..200),
    };
    assert!(mode != 2 || kh * kw == nk);
    let scale = 1.0 / (d as f32).sqrt();
    let sharp = rng.gen_range(1.0..4.0);
    // K and V one float past a 16-byte boundary now and then: the kernel's 4-byte copy path (also
    // taken when d is not a multiple of 4).
    let misalign = rng.gen_bool(0.25) as usize;
    let q = randn(rng, bh * nq * d, sharp);
    let k_buf = randn(rng, misalign + bh * nk * d, 1.0);
    let v_buf = randn(rng, misalign + bh * nk * d, 1.0);
    let (k, v) = (&k_buf[misalign..], &v_buf[misalign..]);
    let heads = if bh > 1 && rng.gen_bool(0.5) {
        bh - 1
    } else {
        bh
    };
    let mut table = randn(rng, heads * nq * nk, 2.0);
    let dead_row = shape.dead_row || (mode == 1 && rng.gen_bool(0.3));
    // The dead row: a random query of head 0, all its scores -inf (NaN on the CPU backend).
    let dead = rng.gen_range(0..nq);
    if dead_row && mode == 1 {
        table[dead * nk..(dead + 1) * nk].fill(f32::NEG_INFINITY);
    }
    // A few more -inf keys elsewhere: masked keys inside live rows.
    if mode == 1 {
        for _ in 0..rng.gen_range(0..4) {
            let i = rng.gen_range(0..table.len());
            table[i] = f32::NEG_INFINITY;
        }
    }
    let rel_h = randn(rng, bh * nq * kh, 1.0);
    let rel_w = randn(rng, bh * nq * kw, 1.0);
    let bias = match mode {
        1 => Bias::Table { table: &table, heads },
        2 => Bias::RelPos { rel_h: &rel_h, rel_w: &rel_w, kh, kw },
        _ => Bias::None,
    };
    let mut out = poisoned(bh * nq * d);
    let p = AttnParams::new(&q, k, v, &mut out, bh, nq, nk, d, scale, bias);
    let what = format!(
        "{kernel} [{}] bh={bh} nq={nq} nk={nk} d={d} bias_mode={mode} dead_row={dead_row} misaligned={misalign}",
        sim.variant
    );
    sim.launch(
        &kernel,
        Dim3(nq.div_ceil(64) as u32, bh as u32, 1),
        Dim3(128, 1, 1),
        &[Arg::record(&p)],
    )
    .map_err(|e| format!("{what}: {e}"))?;

    // The f64 reference on the rounded operands.
    let (round, u_p, subnormal_p) = operand_rounding(sim.variant);
    let rq: Vec<f64> = q.iter().map(|&x| round(x) as f64).collect();
    let rk: Vec<f64> = k.iter().map(|&x| round(x) as f64).collect();
    let rv: Vec<f64> = v.iter().map(|&x| round(x) as f64).collect();
    let max_v = rv.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    let mut want = vec![0.0f64; bh * nq * d];
    let mut bound = vec![0.0f64; bh * nq * d];
    let mut s = vec![0.0f64; nk];
    let mut w = vec![0.0f64; nk];
    for b in 0..bh {
        for i in 0..nq {
            let qi = &rq[(b * nq + i) * d..][..d];
            let mut delta = 0.0f64;
            for (j, sj) in s.iter_mut().enumerate() {
                let kj = &rk[(b * nk + j) * d..][..d];
                let dot: f64 = qi.iter().zip(kj).map(|(a, c)| a * c).sum();
                let mag: f64 =
                    qi.iter().zip(kj).map(|(a, c)| (a * c).abs()).sum::<f64>() * scale as f64;
                let bias = match mode {
                    1 => table[((b % heads) * nq + i) * nk + j] as f64,
                    2 => {
                        rel_h[(b * nq + i) * kh + j / kw] as f64
                            + rel_w[(b * nq + i) * kw + j % kw] as f64
                    }
                    _ => 0.0,
                };
                *sj = dot * scale as f64 + bias;
                if sj.is_finite() {
                    let e = (d as f64 / 16.0 + 4.0) * U * (mag + bias.abs() + sj.abs());
                    delta = delta.max(e);
                }
            }
            delta += 4.0 * U; // expf within 2 ulp
            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let row = (b * nq + i) * d;
            if m == f64::NEG_INFINITY {
                want[row..row + d].fill(f64::NAN);
                continue;
            }
            for (wj, sj) in w.iter_mut().zip(&s) {
                *wj = (sj - m).exp();
            }
            let l: f64 = w.iter().sum();
            for c in 0..d {
                let (mut acc, mut mag) = (0.0, 0.0);
                for j in 0..nk {
                    let vj = rv[(b * nk + j) * d + c];
                    acc += w[j] * vj;
                    mag += w[j] * vj.abs();
                }
                let a = mag / l;
                want[row + c] = acc / l;
                bound[row + c] = a * (u_p + (2.0 * delta).exp_m1() + (nk as f64 + 64.0) * 2.0 * U)
                    + if subnormal_p {
                        nk as f64 * max_v / (1u64 << 25) as f64
                    } else {
                        0.0
                    }
                    + 1e-30;
            }
        }
    }
    compare(&what, &out, &want, &bound)?;
    let mut outcome = Outcome {
        max_err: 0.0,
        max_ratio: 0.0,
    };
    for i in 0..want.len() {
        if want[i].is_finite() {
            let e = (out[i] as f64 - want[i]).abs();
            outcome.max_err = outcome.max_err.max(e);
            outcome.max_ratio = outcome.max_ratio.max(e / bound[i]);
        }
    }
    Ok(outcome)
}
