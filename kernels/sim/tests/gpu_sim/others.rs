//! attention.cu, norm.cu, elementwise.cu, resize.cu and conv.cu against the CPU references of
//! minisam-kernels (attention, norms, resize) or small f64 references (layout kernels, grouped
//! convolution), in the backend's launch geometry and in a deliberately small grid that makes the
//! grid-stride loops go round.

use minisam_gpusim::{Arg, Dim3};
use minisam_kernels::attention::{attention as cpu_attention, Bias};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::common::*;
use crate::params::*;

/// The backend's 1-D geometry, or now and then a tiny grid so each thread loops.
fn grid_stride(rng: &mut ChaCha8Rng, n: usize) -> (Dim3, Dim3) {
    if rng.gen_bool(0.3) {
        (
            Dim3(rng.gen_range(1..4), 1, 1),
            Dim3(pick(rng, &[32, 64, 96]), 1, 1),
        )
    } else {
        Sim::grid_for(n)
    }
}

// ---- attention.cu ---------------------------------------------------------------------------

/// One attention problem for the kernel instance of head dim `dp` (d drawn at most dp, above the
/// next smaller instance's bound half the time), with a random bias mode.
///
/// Tolerance: the kernel is f32 with an online softmax, the CPU reference f32 with its own exp
/// approximation (relative error about 1e-7) and blocking. Scores differ by at most about
/// (d + 2)·u·sum|q·k| (under 2e-5 here: d <= 128, |q|,|k| < 1, scale 1/sqrt(d)), which moves each
/// softmax weight by that relative amount, so each output by at most 2·2e-5·max|v|: the bound is
/// 1e-4·max|v| (plus 8 u |want|), a few times above that. A stale or missing key tile is off by
/// O(max|v| / nk) or NaN.
///
/// `large` draws at least 65 queries (two or more live warps per block) and at least 130 keys
/// (three or more key tiles): what a missing barrier needs to show on every draw.
pub fn attention_case(
    sim: &Sim,
    rng: &mut ChaCha8Rng,
    dp: usize,
    large: bool,
) -> Result<(), String> {
    let kernel = format!("attention_d{dp}");
    let smaller = match dp {
        32 => 1,
        64 => 33,
        96 => 65,
        _ => 97,
    };
    let d = if rng.gen_bool(0.5) {
        rng.gen_range(smaller..=dp)
    } else {
        rng.gen_range(1..=dp)
    };
    let (bh, nq) = (
        rng.gen_range(1..4),
        rng.gen_range(if large { 65 } else { 1 }..200),
    );
    let mode = rng.gen_range(0..3);
    // Several key tiles (64 or 32 keys) with a partial last one.
    let (kh, kw) = if large {
        (rng.gen_range(10..14), rng.gen_range(13..16))
    } else {
        (rng.gen_range(1..12), rng.gen_range(1..14))
    };
    let nk = if mode == 2 {
        kh * kw
    } else {
        rng.gen_range(if large { 130 } else { 1 }..200)
    };
    let scale = 1.0 / (d as f32).sqrt();
    let q = randn(rng, bh * nq * d, 1.0);
    let k = randn(rng, bh * nk * d, 1.0);
    let v = randn(rng, bh * nk * d, 1.0);
    let heads = if bh > 1 && rng.gen_bool(0.5) {
        bh - 1
    } else {
        bh
    };
    let mut table = randn(rng, heads * nq * nk, 2.0);
    // One query row whose scores are all -inf: NaN on the CPU, so on the GPU too.
    let dead_row = mode == 1 && rng.gen_bool(0.5);
    if dead_row {
        table[..nk].iter_mut().for_each(|t| *t = f32::NEG_INFINITY);
    }
    let rel_h = randn(rng, bh * nq * kh, 1.0);
    let rel_w = randn(rng, bh * nq * kw, 1.0);
    let bias = match mode {
        1 => Bias::Table { table: &table, heads },
        2 => Bias::RelPos { rel_h: &rel_h, rel_w: &rel_w, kh, kw },
        _ => Bias::None,
    };
    let mut out = poisoned(bh * nq * d);
    let p = AttnParams::new(&q, &k, &v, &mut out, bh, nq, nk, d, scale, bias);
    let what = format!(
        "{kernel} [{}] bh={bh} nq={nq} nk={nk} d={d} bias_mode={mode} dead_row={dead_row}",
        sim.variant
    );
    sim.launch(
        &kernel,
        Dim3(nq.div_ceil(128) as u32, bh as u32, 1),
        Dim3(128, 1, 1),
        &[Arg::record(&p)],
    )
    .map_err(|e| format!("{what}: {e}"))?;
    let mut want = vec![0.0f32; bh * nq * d];
    cpu_attention(&q, &k, &v, bh, nq, nk, d, scale, bias, &mut want);
    let want: Vec<f64> = want.iter().map(|&w| w as f64).collect();
    let bound: Vec<f64> = want.iter().map(|w| 1e-4 + 8.0 * U * w.abs()).collect();
    compare(&what, &out, &want, &bound)
}

// ---- norm.cu --------------------------------------------------------------------------------

/// Per-element bound of a normalisation over `n` values in f32 (two-pass mean and variance):
/// mean and 1/std each within about (n + 16)·u relative, so the output within
/// 4·(n + 16)·u·((|x| + |mean|)·inv·|gamma| + |beta|).
fn norm_bound(n: usize, x: f64, mean: f64, inv: f64, gamma: f64, beta: f64) -> f64 {
    4.0 * (n as f64 + 16.0) * U * ((x.abs() + mean.abs()) * inv * gamma.abs() + beta.abs())
}

fn stats(values: impl Iterator<Item = f64> + Clone, eps: f32) -> (f64, f64) {
    let n = values.clone().count() as f64;
    let mean = values.clone().sum::<f64>() / n;
    let var = values.map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
    (mean, 1.0 / (var + eps as f64).sqrt())
}

pub fn layer_norm_rows_case(sim: &Sim, rng: &mut ChaCha8Rng) -> Result<(), String> {
    let (rows, dim) = (rng.gen_range(1..40), rng.gen_range(1..300));
    let eps = 1e-6f32;
    // An offset mean, so a one-pass variance would fail.
    let offset = rng.gen_range(-50.0..50.0);
    let x: Vec<f32> = randn(rng, rows * dim, 1.0)
        .iter()
        .map(|v| v + offset)
        .collect();
    let (gamma, beta) = (randn(rng, dim, 1.5), randn(rng, dim, 0.5));
    let mut out = poisoned(rows * dim);
    let args = [
        Arg::ptr(&x),
        Arg::ptr_mut(&mut out),
        Arg::ptr(&gamma),
        Arg::ptr(&beta),
        Arg::I64(rows as i64),
        Arg::I64(dim as i64),
        Arg::F32(eps),
    ];
    let what = format!("layer_norm_rows rows={rows} dim={dim}");
    sim.launch(
        "layer_norm_rows",
        Dim3(rows.div_ceil(4) as u32, 1, 1),
        Dim3(128, 1, 1),
        &args,
    )
    .map_err(|e| format!("{what}: {e}"))?;
    let mut cpu = vec![0.0f32; rows * dim];
    minisam_kernels::norm::layer_norm(&x, rows, dim, &gamma, &beta, eps, &mut cpu);
    let mut bound = vec![0.0; rows * dim];
    for r in 0..rows {
        let row = &x[r * dim..(r + 1) * dim];
        let (mean, inv) = stats(row.iter().map(|&v| v as f64), eps);
        for c in 0..dim {
            bound[r * dim + c] = norm_bound(
                dim,
                row[c] as f64,
                mean,
                inv,
                gamma[c] as f64,
                beta[c] as f64,
            );
        }
    }
    compare(
        &what,
        &out,
        &cpu.iter().map(|&v| v as f64).collect::<Vec<_>>(),
        &bound,
    )
}

pub fn layer_norm_nchw_case(sim: &Sim, rng: &mut ChaCha8Rng) -> Result<(), String> {
    let (batch, channels, spatial) = (
        rng.gen_range(1..3),
        rng.gen_range(1..70),
        rng.gen_range(1..300),
    );
    let eps = 1e-6f32;
    let x = randn(rng, batch * channels * spatial, 3.0);
    let (gamma, beta) = (randn(rng, channels, 1.5), randn(rng, channels, 0.5));
    let mut out = poisoned(batch * channels * spatial);
    let args = [
        Arg::ptr(&x),
        Arg::ptr_mut(&mut out),
        Arg::ptr(&gamma),
        Arg::ptr(&beta),
        Arg::I64(batch as i64),
        Arg::I64(channels as i64),
        Arg::I64(spatial as i64),
        Arg::F32(eps),
    ];
    let what = format!("layer_norm_nchw batch={batch} channels={channels} spatial={spatial}");
    sim.launch(
        "layer_norm_nchw",
        Dim3((batch * spatial).div_ceil(128) as u32, 1, 1),
        Dim3(128, 1, 1),
        &args,
    )
    .map_err(|e| format!("{what}: {e}"))?;
    let mut cpu = vec![0.0f32; x.len()];
    minisam_kernels::norm::layer_norm_channels(
        &x, batch, channels, spatial, &gamma, &beta, eps, &mut cpu,
    );
    let mut bound = vec![0.0; x.len()];
    for b in 0..batch {
        for p in 0..spatial {
            let at = |c: usize| (b * channels + c) * spatial + p;
            let (mean, inv) = stats((0..channels).map(|c| x[at(c)] as f64), eps);
            for c in 0..channels {
                bound[at(c)] = norm_bound(
                    channels,
                    x[at(c)] as f64,
                    mean,
                    inv,
                    gamma[c] as f64,
                    beta[c] as f64,
                );
            }
        }
    }
    compare(
        &what,
        &out,
        &cpu.iter().map(|&v| v as f64).collect::<Vec<_>>(),
        &bound,
    )
}

// ---- elementwise.cu (exact: they move or add single values) ----------------------------------

pub fn permute_case(sim: &Sim, rng: &mut ChaCha8Rng) -> Result<(), String> {
    let rank = rng.gen_range(1..=5);
    let shape: Vec<usize> = (0..rank).map(|_| rng.gen_range(1..7)).collect();
    let mut axes: Vec<usize> = (0..rank).collect();
    for i in (1..rank).rev() {
        axes.swap(i, rng.gen_range(0..=i));
    }
    let n: usize = shape.iter().product();
    let mut in_strides = vec![1usize; rank];
    for a in (0..rank.saturating_sub(1)).rev() {
        in_strides[a] = in_strides[a + 1] * shape[a + 1];
    }
    let mut p = PermuteParams {
        rank: rank as i64,
        n: n as i64,
        ..Default::default()
    };
    for (o, &a) in axes.iter().enumerate() {
        p.out_shape[o] = shape[a] as i64;
        p.src_stride[o] = in_strides[a] as i64;
    }
    let x = randn(rng, n, 1.0);
    let mut want = vec![0.0f32; n];
    for (o, w) in want.iter_mut().enumerate() {
        let (mut rest, mut src) = (o, 0);
        for a in (0..rank).rev() {
            src += rest % p.out_shape[a] as usize * p.src_stride[a] as usize;
            rest /= p.out_shape[a] as usize;
        }
        *w = x[src];
    }
    let mut out = poisoned(n);
    let (grid, block) = grid_stride(rng, n);
    let what = format!("permute shape={shape:?} axes={axes:?}");
    sim.launch(
        "permute",
        grid,
        block,
        &[Arg::ptr(&x), Arg::ptr_mut(&mut out), Arg::record(&p)],
    )
    .map_err(|e| format!("{what}: {e}"))?;
    compare_exact(&what, &out, &want)
}

pub fn copy_block_case(sim: &Sim, rng: &mut ChaCha8Rng) -> Result<(), String> {
    let (outer, inner) = (rng.gen_range(1..6), rng.gen_range(1..9));
    let (src_dim, dst_dim) = (rng.gen_range(1..10), rng.gen_range(1..10));
    let len = rng.gen_range(1..=src_dim.min(dst_dim));
    let (src_off, dst_off) = (
        rng.gen_range(0..=src_dim - len),
        rng.gen_range(0..=dst_dim - len),
    );
    let src = randn(rng, outer * src_dim * inner, 1.0);
    let mut dst = poisoned(outer * dst_dim * inner);
    let mut want = vec![f32::from_bits(POISON); outer * dst_dim * inner];
    for b in 0..outer {
        for j in 0..len {
            for r in 0..inner {
                want[(b * dst_dim + dst_off + j) * inner + r] =
                    src[(b * src_dim + src_off + j) * inner + r];
            }
        }
    }
    let (grid, block) = grid_stride(rng, outer * len * inner);
    let args = [outer, len, inner, src_dim, src_off, dst_dim, dst_off].map(|v| Arg::I64(v as i64));
    let mut all = vec![Arg::ptr(&src), Arg::ptr_mut(&mut dst)];
    all.extend(args);
    let what = format!("copy_block outer={outer} len={len} inner={inner} src {src_off}/{src_dim} dst {dst_off}/{dst_dim}");
    sim.launch("copy_block", grid, block, &all)
        .map_err(|e| format!("{what}: {e}"))?;
    compare_exact(&what, &dst, &want)
}

pub fn pad_hw_case(sim: &Sim, rng: &mut ChaCha8Rng) -> Result<(), String> {
    let (b, h, w, c) = (
        rng.gen_range(1..3),
        rng.gen_range(1..9),
        rng.gen_range(1..9),
        rng.gen_range(1..6),
    );
    let (oh, ow) = (h + rng.gen_range(0..4), w + rng.gen_range(0..4));
    let x = randn(rng, b * h * w * c, 1.0);
    let mut want = vec![0.0f32; b * oh * ow * c];
    for bi in 0..b {
        for y in 0..h {
            for xx in 0..w {
                for ch in 0..c {
                    want[((bi * oh + y) * ow + xx) * c + ch] = x[((bi * h + y) * w + xx) * c + ch];
                }
            }
        }
    }
    let mut out = poisoned(want.len());
    let (grid, block) = grid_stride(rng, want.len());
    let mut args = vec![Arg::ptr(&x), Arg::ptr_mut(&mut out)];
    args.extend([b, h, w, c, oh, ow].map(|v| Arg::I64(v as i64)));
    let what = format!("pad_hw [{b}, {h}, {w}, {c}] -> {oh}x{ow}");
    sim.launch("pad_hw", grid, block, &args)
        .map_err(|e| format!("{what}: {e}"))?;
    compare_exact(&what, &out, &want)
}

pub fn add_broadcast_case(sim: &Sim, rng: &mut ChaCha8Rng) -> Result<(), String> {
    let blen = rng.gen_range(1..50);
    let n = blen * rng.gen_range(1..40);
    let (a, bv) = (randn(rng, n, 2.0), randn(rng, blen, 2.0));
    // f32 addition is correctly rounded, so the f32 sum is the exact answer.
    let want: Vec<f32> = (0..n).map(|i| a[i] + bv[i % blen]).collect();
    let mut out = poisoned(n);
    let (grid, block) = grid_stride(rng, n);
    let what = format!("add_broadcast n={n} blen={blen}");
    let args = [
        Arg::ptr(&a),
        Arg::ptr(&bv),
        Arg::ptr_mut(&mut out),
        Arg::I64(n as i64),
        Arg::I64(blen as i64),
    ];
    sim.launch("add_broadcast", grid, block, &args)
        .map_err(|e| format!("{what}: {e}"))?;
    compare_exact(&what, &out, &want)
}

pub fn scale_act_case(sim: &Sim, rng: &mut ChaCha8Rng) -> Result<(), String> {
    let n = rng.gen_range(1..3000);
    let a = randn(rng, n, 6.0);
    let s = rng.gen_range(-2.0f32..2.0);
    let act = rng.gen_range(0..3i64);
    let gelu = |v: f64| 0.5 * v * (1.0 + crate::gemm::erf(v * std::f64::consts::FRAC_1_SQRT_2));
    // a*s in f32 is correctly rounded; GELU then adds erff's few ulps, and 1 + erf(.) cancels for
    // negative inputs: within 8 u (|v| + |gelu(v)|) absolute.
    let want: Vec<f64> = a
        .iter()
        .map(|&x| (x * s) as f64)
        .map(|v| match act {
            1 => gelu(v),
            2 => v.max(0.0),
            _ => v,
        })
        .collect();
    let bound: Vec<f64> = a
        .iter()
        .zip(&want)
        .map(|(&x, w)| {
            if act == 1 {
                8.0 * U * ((x * s).abs() as f64 + w.abs())
            } else {
                0.0
            }
        })
        .collect();
    let mut out = poisoned(n);
    let (grid, block) = grid_stride(rng, n);
    let what = format!("scale_act n={n} s={s} act={act}");
    let args = [
        Arg::ptr(&a),
        Arg::ptr_mut(&mut out),
        Arg::I64(n as i64),
        Arg::F32(s),
        Arg::I64(act),
    ];
    sim.launch("scale_act", grid, block, &args)
        .map_err(|e| format!("{what}: {e}"))?;
    compare(&what, &out, &want, &bound)
}

// ---- resize.cu: bit for bit with the CPU (same taps, same association, no FMA contraction) -----

pub fn resize_case(sim: &Sim, rng: &mut ChaCha8Rng) -> Result<(), String> {
    let (planes, h, w) = (
        rng.gen_range(1..4),
        rng.gen_range(1..40),
        rng.gen_range(1..40),
    );
    let (out_h, out_w) = (rng.gen_range(1..60), rng.gen_range(1..60));
    let x = randn(rng, planes * h * w, 10.0);
    let mut want = vec![0.0f32; planes * out_h * out_w];
    minisam_kernels::resize::bilinear(&x, planes, h, w, out_h, out_w, &mut want);
    let mut out = poisoned(want.len());
    let (grid, block) = grid_stride(rng, want.len());
    let mut args = vec![Arg::ptr(&x), Arg::ptr_mut(&mut out)];
    args.extend([planes, h, w, out_h, out_w].map(|v| Arg::I64(v as i64)));
    let what = format!("resize_bilinear {planes}x{h}x{w} -> {out_h}x{out_w}");
    sim.launch("resize_bilinear", grid, block, &args)
        .map_err(|e| format!("{what}: {e}"))?;
    compare_exact(&what, &out, &want)
}

// ---- conv.cu: grouped and depthwise convolution --------------------------------------------

/// Tolerance as for the GEMM: an f32 fma chain of cin/groups·kh·kw terms, bound
/// 2·(terms + 16)·u·(sum|x·w| + |bias|).
pub fn conv_direct_case(sim: &Sim, rng: &mut ChaCha8Rng, kind: i64) -> Result<(), String> {
    let groups = rng.gen_range(2..6);
    let depthwise = rng.gen_bool(0.5);
    let (cin_g, cout_g) = if depthwise {
        (1, 1)
    } else {
        (rng.gen_range(1..4), rng.gen_range(1..4))
    };
    let (cin, cout, batch) = (cin_g * groups, cout_g * groups, rng.gen_range(1..3));
    let (kh, kw) = (pick(rng, &[1, 3, 5]), pick(rng, &[1, 3, 5]));
    let (stride, pad) = (rng.gen_range(1..3), rng.gen_range(0..3));
    let (h, w) = (rng.gen_range(kh..16), rng.gen_range(kw..16));
    let (oh, ow) = (
        (h + 2 * pad - kh) / stride + 1,
        (w + 2 * pad - kw) / stride + 1,
    );
    let act = rng.gen_range(0..3i64);
    let x = randn(rng, batch * cin * h * w, 1.0);
    let wt = Weight::random(rng, kind, cout * cin_g * kh * kw, 0.5);
    let bias = randn(rng, cout, 0.5);
    let n = batch * cout * oh * ow;
    let mut out = poisoned(n);
    let p = ConvParams {
        x: x.as_ptr() as u64,
        out: out.as_mut_ptr() as u64,
        w: wt.wref(),
        bias: bias.as_ptr() as u64,
        batch: batch as i64,
        cin: cin as i64,
        h: h as i64,
        w_: w as i64,
        cout: cout as i64,
        kh: kh as i64,
        kw: kw as i64,
        stride: stride as i64,
        pad: pad as i64,
        groups: groups as i64,
        oh: oh as i64,
        ow: ow as i64,
        act,
    };
    let (grid, block) = grid_stride(rng, n);
    let what = format!("conv2d_direct {} batch={batch} cin={cin} {h}x{w} cout={cout} groups={groups} k={kh}x{kw} stride={stride} pad={pad} act={act}", KIND_NAMES[kind as usize]);
    sim.launch("conv2d_direct", grid, block, &[Arg::record(&p)])
        .map_err(|e| format!("{what}: {e}"))?;
    let (mut want, mut bound) = (vec![0.0f64; n], vec![0.0f64; n]);
    for b in 0..batch {
        for (co, &bias_co) in bias.iter().enumerate() {
            let g = co / cout_g;
            for oy in 0..oh {
                for ox in 0..ow {
                    let (mut v, mut s) = (bias_co as f64, (bias_co as f64).abs());
                    for ci in 0..cin_g {
                        for ky in 0..kh {
                            for kx in 0..kw {
                                let (y, xx) = (
                                    (oy * stride + ky) as i64 - pad as i64,
                                    (ox * stride + kx) as i64 - pad as i64,
                                );
                                if y < 0 || y >= h as i64 || xx < 0 || xx >= w as i64 {
                                    continue;
                                }
                                let xv = x[((b * cin + g * cin_g + ci) * h + y as usize) * w
                                    + xx as usize] as f64;
                                let wv = wt.values[((co * cin_g + ci) * kh + ky) * kw + kx] as f64;
                                v += xv * wv;
                                s += (xv * wv).abs();
                            }
                        }
                    }
                    let o = ((b * cout + co) * oh + oy) * ow + ox;
                    want[o] = match act {
                        1 => {
                            0.5 * v * (1.0 + crate::gemm::erf(v * std::f64::consts::FRAC_1_SQRT_2))
                        }
                        2 => v.max(0.0),
                        _ => v,
                    };
                    bound[o] = 2.0 * ((cin_g * kh * kw) as f64 + 16.0) * U * s + 1e-30;
                }
            }
        }
    }
    compare(&what, &out, &want, &bound)
}
