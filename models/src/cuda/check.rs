//! Parity of the CUDA backend with the CPU reference, kernel by kernel and end to end. Needs a
//! GPU; `minisam cuda-check` and the `#[ignore]`d test below run it.
//!
//! Each kernel case draws fresh random inputs (seeded from the clock, the seed printed), runs
//! the operation on both backends and compares ‖out − ref‖ / ‖ref‖ against a tolerance for the
//! precision the CUDA path uses. The CUDA backend runs with poisoning on, so every fresh output
//! starts as NaN: an element a kernel forgets to write fails the check (NaN never passes), and
//! every driver return code is checked by the backend itself.

use std::sync::Arc;

use minisam_kernels::nf4;

use super::{CudaBackend, CudaOptions, MmaPrecision};
use crate::backend::{Activation, AttentionBias, Backend, Conv2dSpec, Lora};
use crate::cpu::CpuBackend;
use crate::image::{Mask, RgbImage};
use crate::prompt::Prompts;
use crate::sam::Segmenter;
use crate::store::{Nf4Data, SharedBytes, StoredTensor, TensorData};
use crate::{Error, Result};

/// Relative error allowed for f32 kernels (different summation order, GPU exp/erf within a few
/// ulp): measured errors are ~1e-6.
pub const TOL_F32: f64 = 1e-4;
/// For GEMMs on the tensor cores: bf16 operands carry 8 significant bits, so a K-long dot
/// product of random data lands near 2^-9 / sqrt(...) ~ 3e-3 relative.
pub const TOL_BF16: f64 = 1.5e-2;
/// fp16 operands carry 11 bits.
pub const TOL_F16: f64 = 3e-3;

/// Small, deterministic-per-seed generator (the checks must not depend on dev-dependencies).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    fn uniform(&mut self) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform() * scale).collect()
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// A weight in one of the three stored precisions, built from host values.
fn stored(name: &str, shape: &[usize], values: &[f32], kind: &str) -> StoredTensor {
    let data = match kind {
        "nf4" => {
            let q = nf4::quantize(values);
            TensorData::Nf4(Nf4Data {
                codes: SharedBytes::from_vec(q.codes),
                absmax_q: SharedBytes::from_vec(q.absmax_q),
                absmax_scales: SharedBytes::from_vec(q.absmax_scales),
            })
        }
        "f16" => TensorData::F16(SharedBytes::from_vec(values.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect())),
        _ => TensorData::F32(Arc::from(values)),
    };
    StoredTensor { name: name.into(), shape: shape.to_vec(), data }
}

/// One operation with its host inputs, runnable on any backend (a few dozen, built once per check).
#[allow(clippy::large_enum_variant)]
enum Case {
    Linear { x: (Vec<usize>, Vec<f32>), w: StoredTensor, bias: Option<Vec<f32>>, act: Activation },
    LinearLora { x: (Vec<usize>, Vec<f32>), w: StoredTensor, bias: Vec<f32>, a: StoredTensor, b: StoredTensor, rank: usize, scale: f32, act: Activation },
    Matmul { a: (Vec<usize>, Vec<f32>), b: (Vec<usize>, Vec<f32>), transpose_b: bool },
    Conv { x: (Vec<usize>, Vec<f32>), w: StoredTensor, bias: Vec<f32>, spec: Conv2dSpec, act: Activation },
    ConvT { x: (Vec<usize>, Vec<f32>), w: StoredTensor, bias: Vec<f32>, k: usize },
    LayerNorm { x: (Vec<usize>, Vec<f32>), g: Vec<f32>, b: Vec<f32>, nchw: bool },
    Attention { q: (Vec<usize>, Vec<f32>), k: (Vec<usize>, Vec<f32>), v: (Vec<usize>, Vec<f32>), scale: f32, bias: BiasCase },
    Resize { x: (Vec<usize>, Vec<f32>), oh: usize, ow: usize },
    Permute { x: (Vec<usize>, Vec<f32>), perm: Vec<usize> },
    NarrowConcat { x: (Vec<usize>, Vec<f32>), axis: usize, cut: usize },
    PadHw { x: (Vec<usize>, Vec<f32>), ph: usize, pw: usize },
    Elementwise { a: (Vec<usize>, Vec<f32>), b: (Vec<usize>, Vec<f32>), v: Vec<f32> },
}

enum BiasCase {
    None,
    Table(Vec<usize>, Vec<f32>),
    RelPos((Vec<usize>, Vec<f32>), (Vec<usize>, Vec<f32>)),
}

fn t<B: Backend>(b: &B, (shape, data): &(Vec<usize>, Vec<f32>)) -> Result<B::Tensor> {
    b.from_host(shape, data)
}

fn vecp<B: Backend>(b: &B, data: &[f32]) -> Result<B::Vector> {
    b.vector_from_host(&[data.len()], data)
}

/// Runs `case` on backend `be` and returns the output on the host.
fn run_case<B: Backend>(be: &B, case: &Case) -> Result<Vec<f32>> {
    let out = match case {
        Case::Linear { x, w, bias, act } => {
            let bias = bias.as_ref().map(|v| vecp(be, v)).transpose()?;
            be.linear(&t(be, x)?, &be.weight(w)?, bias.as_ref(), *act)?
        }
        Case::LinearLora { x, w, bias, a, b, rank, scale, act } => {
            let lora = Lora { a: be.weight(a)?, b: be.weight(b)?, rank: *rank, scale: *scale };
            be.linear_lora(&t(be, x)?, &be.weight(w)?, Some(&vecp(be, bias)?), *act, Some(&lora))?
        }
        Case::Matmul { a, b, transpose_b } => be.matmul(&t(be, a)?, &t(be, b)?, *transpose_b)?,
        Case::Conv { x, w, bias, spec, act } => be.conv2d(&t(be, x)?, &be.weight(w)?, Some(&vecp(be, bias)?), *spec, *act)?,
        Case::ConvT { x, w, bias, k } => be.conv_transpose2d(&t(be, x)?, &be.weight(w)?, Some(&vecp(be, bias)?), *k)?,
        Case::LayerNorm { x, g, b, nchw } => {
            let (g, b) = (vecp(be, g)?, vecp(be, b)?);
            if *nchw {
                be.layer_norm_nchw(&t(be, x)?, &g, &b, 1e-6)?
            } else {
                be.layer_norm(&t(be, x)?, &g, &b, 1e-5)?
            }
        }
        Case::Attention { q, k, v, scale, bias } => {
            let (q, k, v) = (t(be, q)?, t(be, k)?, t(be, v)?);
            match bias {
                BiasCase::None => be.attention(&q, &k, &v, *scale, AttentionBias::None)?,
                BiasCase::Table(shape, data) => {
                    let table = be.vector_from_host(shape, data)?;
                    be.attention(&q, &k, &v, *scale, AttentionBias::Table(&table))?
                }
                BiasCase::RelPos(h, w) => {
                    let (rel_h, rel_w) = (t(be, h)?, t(be, w)?);
                    be.attention(&q, &k, &v, *scale, AttentionBias::DecomposedRelPos { rel_h: &rel_h, rel_w: &rel_w })?
                }
            }
        }
        Case::Resize { x, oh, ow } => be.resize_bilinear(&t(be, x)?, *oh, *ow)?,
        Case::Permute { x, perm } => be.permute(&t(be, x)?, perm)?,
        Case::NarrowConcat { x, axis, cut } => {
            let x = t(be, x)?;
            let dim = be.shape(&x)[*axis];
            let head = be.narrow(&x, *axis, 0, *cut)?;
            let tail = be.narrow(&x, *axis, *cut, dim - cut)?;
            // Swapped order, so a concat that ignored offsets would not give x back by accident.
            be.concat(&[&tail, &head], *axis)?
        }
        Case::PadHw { x, ph, pw } => be.pad_hw(&t(be, x)?, *ph, *pw)?,
        Case::Elementwise { a, b, v } => {
            let (a, b) = (t(be, a)?, t(be, b)?);
            let v = vecp(be, v)?;
            let s = be.add(&a, &b)?;
            let s = be.add_vector(&s, &v)?;
            let s = be.scale(&s, -1.75)?;
            let g = be.activation(&s, Activation::Gelu)?;
            let r = be.activation(&s, Activation::Relu)?;
            let tv = be.tensor_from_vector(&v)?;
            let parts = [be.reshape(g, &[s_len(be, &s)])?, be.reshape(r, &[s_len(be, &s)])?, tv];
            be.concat(&[&parts[0], &parts[1], &parts[2]], 0)?
        }
    };
    be.to_host(&out)
}

fn s_len<B: Backend>(be: &B, t: &B::Tensor) -> usize {
    be.shape(t).iter().product()
}

/// ‖a − b‖ / ‖b‖ in f64; NaN when any element is non-finite or the lengths differ (never passes).
pub fn rel_error(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() || a.iter().chain(b).any(|v| !v.is_finite()) {
        return f64::NAN;
    }
    let (mut d, mut n) = (0.0f64, 0.0f64);
    for (x, y) in a.iter().zip(b) {
        d += (*x as f64 - *y as f64).powi(2);
        n += (*y as f64).powi(2);
    }
    if n == 0.0 {
        return d.sqrt();
    }
    (d / n).sqrt()
}

/// One line of the report.
#[derive(Clone, Debug)]
pub struct CheckResult {
    pub name: String,
    pub rel_error: f64,
    pub tolerance: f64,
    pub error: Option<String>,
}

impl CheckResult {
    pub fn passed(&self) -> bool {
        self.error.is_none() && self.rel_error <= self.tolerance
    }
}

impl std::fmt::Display for CheckResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let verdict = if self.passed() { "ok  " } else { "FAIL" };
        match &self.error {
            Some(e) => write!(f, "{verdict} {:<44} error: {e}", self.name),
            None => write!(f, "{verdict} {:<44} rel err {:.2e} (tol {:.0e})", self.name, self.rel_error, self.tolerance),
        }
    }
}

/// The kernel cases, with fresh random inputs from `seed`. Sizes are chosen to cover ragged
/// tile edges (M, N, K not multiples of 64/32), the NF4 fast path (rows of whole blocks) and its
/// general path, every weight precision and every bias kind.
fn cases(seed: u64, gemm_tol: f64) -> Vec<(String, Case, f64)> {
    let mut r = Rng(seed);
    let cut = 1 + r.below(6);
    let mut v = |shape: &[usize], scale: f32| (shape.to_vec(), r.vec(shape.iter().product(), scale));
    let mut out: Vec<(String, Case, f64)> = Vec::new();
    for (kind, n, k) in [("nf4", 200, 256), ("nf4", 70, 129), ("f16", 96, 160), ("f32", 33, 48)] {
        let x = v(&[3, 37, k], 1.0);
        let (_, w) = v(&[n, k], 0.2);
        let (_, bias) = v(&[n], 0.5);
        let w = stored("w", &[n, k], &w, kind);
        let tol = if k >= 32 { gemm_tol } else { TOL_F32 };
        out.push((format!("linear {kind} [111x{k}]·[{n}x{k}]ᵀ +bias GELU"), Case::Linear { x, w, bias: Some(bias), act: Activation::Gelu }, tol));
    }
    {
        let x = v(&[50, 2], 1.0);
        let (_, w) = v(&[128, 2], 1.0);
        out.push(("linear f32 K=2 (CUDA cores)".into(), Case::Linear { x, w: stored("w", &[128, 2], &w, "f32"), bias: None, act: Activation::None }, TOL_F32));
    }
    {
        let (n, k, rank) = (192, 128, 8);
        let x = v(&[77, k], 1.0);
        let (_, w) = v(&[n, k], 0.2);
        let (_, bias) = v(&[n], 0.5);
        let (_, a) = v(&[rank, k], 0.3);
        let (_, b) = v(&[n, rank], 0.3);
        let case = Case::LinearLora {
            x,
            w: stored("w", &[n, k], &w, "nf4"),
            bias,
            a: stored("lora_a", &[rank, k], &a, "f32"),
            b: stored("lora_b", &[n, rank], &b, "f32"),
            rank,
            scale: 2.0,
            act: Activation::Relu,
        };
        out.push(("linear_lora nf4 + r=8 fused epilogue ReLU".into(), case, gemm_tol));
    }
    for transpose_b in [true, false] {
        let a = v(&[5, 70, 96], 1.0);
        let b = if transpose_b { v(&[5, 45, 96], 1.0) } else { v(&[5, 96, 45], 1.0) };
        out.push((format!("matmul batched transpose_b={transpose_b}"), Case::Matmul { a, b, transpose_b }, gemm_tol));
    }
    for (kind, cin, cout, kk, stride, pad) in [("nf4", 64, 48, 3, 2, 1), ("f16", 40, 72, 1, 1, 0), ("f32", 3, 16, 16, 16, 0)] {
        let x = v(&[2, cin, 19, 23], 1.0);
        let (_, w) = v(&[cout, cin, kk, kk], 0.2);
        let (_, bias) = v(&[cout], 0.5);
        let spec = Conv2dSpec { stride, padding: pad, groups: 1 };
        let tol = if cin * kk * kk >= 32 { gemm_tol } else { TOL_F32 };
        out.push((format!("conv2d {kind} {kk}x{kk}/s{stride}/p{pad} implicit GEMM"), Case::Conv { x, w: stored("w", &[cout, cin, kk, kk], &w, kind), bias, spec, act: Activation::Gelu }, tol));
    }
    for (kind, ch, kk, groups) in [("f16", 24, 3, 24), ("f32", 16, 5, 4)] {
        let x = v(&[2, ch, 17, 13], 1.0);
        let cin_g = ch / groups;
        let (_, w) = v(&[ch, cin_g, kk, kk], 0.3);
        let (_, bias) = v(&[ch], 0.5);
        let spec = Conv2dSpec { stride: 1, padding: kk / 2, groups };
        out.push((format!("conv2d {kind} {kk}x{kk} groups={groups} direct"), Case::Conv { x, w: stored("w", &[ch, cin_g, kk, kk], &w, kind), bias, spec, act: Activation::Relu }, TOL_F32));
    }
    for kind in ["nf4", "f32"] {
        let (cin, cout, k) = (64, 32, 2);
        let x = v(&[1, cin, 9, 11], 1.0);
        let (_, w) = v(&[cin, cout, k, k], 0.2);
        let (_, bias) = v(&[cout], 0.5);
        out.push((format!("conv_transpose2d {kind} k=stride=2"), Case::ConvT { x, w: stored("w", &[cin, cout, k, k], &w, kind), bias, k }, gemm_tol));
    }
    {
        let mut x = v(&[7, 9, 300], 2.0);
        x.1.iter_mut().for_each(|e| *e += 50.0); // a large mean must not cost the variance
        let (_, g) = v(&[300], 1.0);
        let (_, b) = v(&[300], 1.0);
        out.push(("layer_norm last axis (mean 50)".into(), Case::LayerNorm { x, g, b, nchw: false }, TOL_F32));
        let x = v(&[2, 64, 13, 11], 3.0);
        let (_, g) = v(&[64], 1.0);
        let (_, b) = v(&[64], 1.0);
        out.push(("layer_norm NCHW channels".into(), Case::LayerNorm { x, g, b, nchw: true }, TOL_F32));
    }
    // Head dims 16..=80 run on the tensor cores in the bf16/fp16 modes (bf16/fp16 q, k, v and
    // softmax weights, f32 softmax and accumulation): the GEMMs' tolerance; d = 8 and d = 96 stay
    // on the f32 kernel in every mode.
    for (d, nq, kh, kw) in [(64, 196, 14, 14), (32, 150, 7, 9), (80, 64, 8, 8), (16, 37, 5, 3), (8, 40, 3, 4), (96, 50, 4, 6)] {
        let bh = 6;
        let tol = if (16..=80).contains(&d) { gemm_tol } else { TOL_F32 };
        let nk = kh * kw;
        let (q, k, val) = (v(&[bh, nq, d], 1.0), v(&[bh, nk, d], 1.0), v(&[bh, nk, d], 1.0));
        let scale = 1.0 / (d as f32).sqrt();
        let table = v(&[3, nq, nk], 1.0);
        let (rh, rw) = (v(&[bh, nq, kh], 1.0), v(&[bh, nq, kw], 1.0));
        out.push((format!("attention d={d} no bias"), Case::Attention { q: q.clone(), k: k.clone(), v: val.clone(), scale, bias: BiasCase::None }, tol));
        out.push((format!("attention d={d} TinyViT table"), Case::Attention { q: q.clone(), k: k.clone(), v: val.clone(), scale, bias: BiasCase::Table(table.0, table.1) }, tol));
        out.push((format!("attention d={d} SAM rel-pos"), Case::Attention { q, k, v: val, scale, bias: BiasCase::RelPos(rh, rw) }, tol));
    }
    {
        // Many keys, to cross several K/V tiles with the online softmax.
        let (bh, nq, nk, d) = (2, 70, 1000, 64);
        let (q, k, val) = (v(&[bh, nq, d], 2.0), v(&[bh, nk, d], 2.0), v(&[bh, nk, d], 1.0));
        out.push(("attention d=64 Nk=1000 (online softmax)".into(), Case::Attention { q, k, v: val, scale: 0.125, bias: BiasCase::None }, gemm_tol));
    }
    out.push(("resize_bilinear 64x48 -> 256x200".into(), Case::Resize { x: v(&[2, 3, 64, 48], 5.0), oh: 256, ow: 200 }, TOL_F32));
    out.push(("resize_bilinear 256x256 -> 97x131".into(), Case::Resize { x: v(&[1, 2, 256, 256], 5.0), oh: 97, ow: 131 }, TOL_F32));
    out.push(("permute rank 4 [0,2,3,1]".into(), Case::Permute { x: v(&[2, 5, 7, 3], 1.0), perm: vec![0, 2, 3, 1] }, TOL_F32));
    out.push(("permute rank 6".into(), Case::Permute { x: v(&[2, 3, 4, 5, 2, 3], 1.0), perm: vec![0, 1, 3, 2, 4, 5] }, TOL_F32));
    out.push(("narrow + concat axis 1".into(), Case::NarrowConcat { x: v(&[3, 8, 5], 1.0), axis: 1, cut }, TOL_F32));
    out.push(("narrow + concat axis 2".into(), Case::NarrowConcat { x: v(&[3, 8, 5], 1.0), axis: 2, cut: 2 }, TOL_F32));
    out.push(("pad_hw NHWC".into(), Case::PadHw { x: v(&[2, 13, 9, 7], 1.0), ph: 1, pw: 5 }, TOL_F32));
    let (a, b) = (v(&[4, 6, 10], 2.0), v(&[6, 10], 2.0));
    let (_, vv) = v(&[10], 1.0);
    out.push(("add / add_vector / scale / GELU / ReLU / tensor_from_vector".into(), Case::Elementwise { a, b, v: vv }, TOL_F32));
    out
}

/// Runs every kernel case on `cuda` against `cpu`. Failures are collected, not fatal: the report
/// names each.
pub fn kernel_checks(cpu: &CpuBackend, cuda: &CudaBackend, seed: u64) -> Vec<CheckResult> {
    let gemm_tol = match cuda.precision() {
        MmaPrecision::Bf16 => TOL_BF16,
        MmaPrecision::F16 => TOL_F16,
        MmaPrecision::F32 => TOL_F32,
    };
    cases(seed, gemm_tol)
        .into_iter()
        .map(|(name, case, tolerance)| {
            let result = run_case(cpu, &case).and_then(|want| Ok((want, run_case(cuda, &case)?)));
            match result {
                Ok((want, got)) => CheckResult { name, rel_error: rel_error(&got, &want), tolerance, error: None },
                Err(e) => CheckResult { name, rel_error: f64::NAN, tolerance, error: Some(e.to_string()) },
            }
        })
        .collect()
}

/// Intersection over union of two masks of the same size (1.0 when both are empty).
pub fn mask_iou(a: &Mask, b: &Mask) -> Result<f64> {
    if (a.width, a.height) != (b.width, b.height) {
        return Err(Error::Shape(format!("masks of {}x{} and {}x{}", a.width, a.height, b.width, b.height)));
    }
    let (mut inter, mut union) = (0usize, 0usize);
    for (x, y) in a.data.iter().zip(&b.data) {
        let (x, y) = (*x != 0, *y != 0);
        inter += (x && y) as usize;
        union += (x || y) as usize;
    }
    Ok(if union == 0 { 1.0 } else { inter as f64 / union as f64 })
}

/// End-to-end parity of one model on one image: image-embedding relative error and the IoU of
/// every output mask (multimask), CUDA against CPU.
pub struct E2eParity {
    pub embedding_rel_error: f64,
    pub min_mask_iou: f64,
    pub low_res_rel_error: f64,
}

pub fn e2e_parity(cpu: &Segmenter<CpuBackend>, cuda: &Segmenter<CudaBackend>, image: &RgbImage, prompts: &Prompts) -> Result<E2eParity> {
    let ec = cpu.encode(image)?;
    let eg = cuda.encode(image)?;
    let (hc, hg) = (cpu.backend().to_host(&ec.embedding)?, cuda.backend().to_host(&eg.embedding)?);
    let sc = cpu.decode(&ec, prompts, true)?;
    let sg = cuda.decode(&eg, prompts, true)?;
    let mut min_iou = 1.0f64;
    if sc.masks.len() != sg.masks.len() {
        return Err(Error::Backend(format!("CPU gave {} masks, CUDA {}", sc.masks.len(), sg.masks.len())));
    }
    for (a, b) in sc.masks.iter().zip(&sg.masks) {
        min_iou = min_iou.min(mask_iou(a, b)?);
    }
    Ok(E2eParity { embedding_rel_error: rel_error(&hg, &hc), min_mask_iou: min_iou, low_res_rel_error: rel_error(&sg.low_res_logits, &sc.low_res_logits) })
}

/// The largest embedding relative error between frames encoded by `graphed` (a backend with
/// CUDA graphs on) and by `eager` (off), over `images` twice in turn: the first frame captures,
/// every later one replays with a new input, so a replay that missed its input, or wrote over a
/// kept result, shows. NaN (never passing) if any frame differs in size or is not finite.
pub fn graph_replay(graphed: &Segmenter<CudaBackend>, eager: &Segmenter<CudaBackend>, images: &[RgbImage]) -> Result<f64> {
    let mut kept = Vec::new();
    let mut worst = 0.0f64;
    for image in images.iter().chain(images) {
        let g = graphed.encode(image)?;
        let e = eager.encode(image)?;
        let err = rel_error(&graphed.backend().to_host(&g.embedding)?, &eager.backend().to_host(&e.embedding)?);
        if err.is_nan() || err > worst {
            worst = err;
        }
        kept.push((g, e));
    }
    // Every kept result must still be the one its frame produced.
    for (g, e) in &kept {
        let err = rel_error(&graphed.backend().to_host(&g.embedding)?, &eager.backend().to_host(&e.embedding)?);
        if err.is_nan() || err > worst {
            worst = err;
        }
    }
    Ok(worst)
}

/// `image` mirrored left to right (a second, different frame of the same size).
pub fn mirrored(image: &RgbImage) -> RgbImage {
    let mut data = Vec::with_capacity(image.data.len());
    for row in image.data.chunks_exact(image.width * 3) {
        data.extend(row.chunks_exact(3).rev().flatten());
    }
    RgbImage { width: image.width, height: image.height, data }
}

/// Options for the checks' CUDA backend: the caller's, with poisoning on.
pub fn check_options(mut o: CudaOptions) -> CudaOptions {
    o.poison = true;
    o
}

/// A seed from the clock, so every run draws new inputs (printed for reproduction).
pub fn fresh_seed() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0x5eed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuda_check_rel_error_never_passes_nan() {
        assert!(rel_error(&[1.0, f32::NAN], &[1.0, 2.0]).is_nan());
        assert!(rel_error(&[1.0], &[1.0, 2.0]).is_nan());
        assert!((rel_error(&[1.0, 2.0], &[1.0, 2.0])).abs() < 1e-12);
        let r = CheckResult { name: "x".into(), rel_error: f64::NAN, tolerance: 1.0, error: None };
        assert!(!r.passed());
    }

    #[test]
    fn cuda_check_mirrored_image_reverses_pixels_not_channels() {
        let img = RgbImage { width: 2, height: 2, data: vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12] };
        assert_eq!(mirrored(&img).data, vec![4, 5, 6, 1, 2, 3, 10, 11, 12, 7, 8, 9]);
    }

    #[test]
    fn cuda_check_cases_run_on_the_cpu_backend() {
        // The cases themselves must be well-formed (shapes the backends accept).
        let cpu = CpuBackend::new(2).unwrap();
        for (name, case, _) in cases(fresh_seed(), TOL_BF16) {
            let out = run_case(&cpu, &case).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(out.iter().all(|v| v.is_finite()), "{name}");
        }
    }

    /// Kernel parity on a real GPU. `cargo test -p minisam-models cuda_kernels -- --ignored`
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn cuda_kernels_match_cpu() {
        let cuda = match CudaBackend::new(check_options(CudaOptions::default())) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("SKIP: no usable CUDA GPU: {e}");
                return;
            }
        };
        let cpu = CpuBackend::new(0).unwrap();
        let seed = fresh_seed();
        let results = kernel_checks(&cpu, &cuda, seed);
        for r in &results {
            eprintln!("{r}");
        }
        assert!(results.iter().all(CheckResult::passed), "seed {seed}: some kernels differ from the CPU reference");
    }
}
