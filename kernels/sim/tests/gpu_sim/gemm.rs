//! nf4_gemm.cu: the six GEMM kernels (tensor-core and CUDA-core bodies, B stored as f32, fp16 or
//! NF4) in every operand and output mode the backend uses, against an f64 reference of the
//! `GemmParams` contract.
//!
//! Tolerance: the reference takes the operands the kernel multiplies (for the tensor-core path
//! rounded to bf16 / fp16 exactly as `cvt.rn` does), so what remains is f32 accumulation. With
//! S = sum_k |a_k b_k| + |bias| + |LoRA term| + |residual| per output, a K-term f32 sum is within
//! K·u·S of exact (u = 2^-24); the bound below is twice that plus 16 u·S for the epilogue's few
//! roundings (and GELU, whose slope is below 1.13, plus erff's ulps). A fragment in the wrong
//! place, an operand rounded the wrong way or a stale tile is off by O(2^-8 S) or more.

use minisam_gpusim::{Arg, Dim3};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::common::*;
use crate::params::*;

const ACT_NONE: i64 = 0;
const ACT_GELU: i64 = 1;
const ACT_RELU: i64 = 2;

/// How the kernel rounds operands before multiplying them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operands {
    F32,
    Bf16,
    F16,
}

impl Operands {
    fn round(self, x: f32) -> f64 {
        match self {
            Operands::F32 => x as f64,
            Operands::Bf16 => round_bf16(x) as f64,
            Operands::F16 => round_f16_satfinite(x) as f64,
        }
    }
}

/// One GEMM problem with its buffers (kept alive for the launch) and its parameter record.
pub struct GemmCase {
    pub what: String,
    p: GemmParams,
    a: Vec<f32>,
    b: Weight,
    bias: Vec<f32>,
    residual: Vec<f32>,
    lora_t: Vec<f32>,
    /// Fused LoRA: A [r, K], the kernel computes x·Aᵀ (the CUDA-core body gets it computed here
    /// instead, as the backend does).
    lora_a: Vec<f32>,
    lora_b: Option<Weight>,
    out_len: usize,
}

pub fn erf(x: f64) -> f64 {
    // erf(z) = 2/√π · e^(-z²) · Σ_n 2^n z^(2n+1) / (2n+1)!!: every term positive, no cancellation.
    let z = x.abs();
    if z >= 6.0 {
        return x.signum();
    }
    let (mut term, mut sum, mut n) = (z, z, 0.0);
    while term > 1e-18 * sum {
        n += 1.0;
        term *= 2.0 * z * z / (2.0 * n + 1.0);
        sum += term;
    }
    (std::f64::consts::FRAC_2_SQRT_PI * (-z * z).exp() * sum).copysign(x)
}

fn activate(v: f64, act: i64) -> f64 {
    match act {
        ACT_GELU => 0.5 * v * (1.0 + erf(v * std::f64::consts::FRAC_1_SQRT_2)),
        ACT_RELU => v.max(0.0),
        _ => v,
    }
}

impl GemmCase {
    /// A random problem of a random mode; shapes are drawn to include partial tiles (M, N not
    /// multiples of 64, K not of 32) and multi-tile K loops.
    pub fn random(rng: &mut ChaCha8Rng, kind: i64) -> Self {
        match rng.gen_range(0..4) {
            0 => Self::linear(rng, kind),
            1 => Self::conv(rng, kind),
            2 if kind == W_F32 => Self::matmul(rng),
            _ => Self::conv_transpose(rng, kind),
        }
    }

    fn base(m: usize, n: usize, k: usize) -> GemmParams {
        GemmParams {
            m: m as i64,
            n: n as i64,
            k: k as i64,
            batch_count: 1,
            bias_div: 1,
            ..Default::default()
        }
    }

    /// `linear`: x[M, K] · wᵀ + bias, activation, optional LoRA and residual.
    pub fn linear(rng: &mut ChaCha8Rng, kind: i64) -> Self {
        // K a multiple of 64 half the time: the NF4 path's per-row absmax fast path.
        let k = if rng.gen_bool(0.5) {
            64 * rng.gen_range(1..4)
        } else {
            rng.gen_range(1..200)
        };
        Self::linear_with_k(rng, kind, k)
    }

    pub fn linear_with_k(rng: &mut ChaCha8Rng, kind: i64, k: usize) -> Self {
        let (m, n) = (rng.gen_range(1..150), rng.gen_range(1..140));
        Self::linear_sized(rng, kind, m, n, k)
    }

    pub fn linear_sized(rng: &mut ChaCha8Rng, kind: i64, m: usize, n: usize, k: usize) -> Self {
        let mut p = Self::base(m, n, k);
        p.a_mode = A_ROWMAJOR;
        p.lda = k as i64;
        p.sbn = k as i64;
        p.sbk = 1;
        p.c_mode = C_ROWMAJOR;
        p.ldc = n as i64;
        p.act = pick(rng, &[ACT_NONE, ACT_GELU, ACT_RELU]);
        let a = randn(rng, m * k, 1.0);
        let b = Weight::random(rng, kind, n * k, 0.5);
        let bias = if rng.gen_bool(0.7) {
            randn(rng, n, 0.5)
        } else {
            vec![]
        };
        let residual = if rng.gen_bool(0.5) {
            randn(rng, m * n, 1.0)
        } else {
            vec![]
        };
        // LoRA half the time; of those, half fused (x·Aᵀ in the kernel, any rank up to 64, most
        // not multiples of 8 or 16), half with t given (the unfused path's small ranks).
        let (mut lora_t, mut lora_a, mut lora_b) = (vec![], vec![], None);
        let mut fused = false;
        if rng.gen_bool(0.5) {
            fused = rng.gen_bool(0.5);
            let r = if fused {
                rng.gen_range(1..=64)
            } else {
                rng.gen_range(1..9)
            };
            p.lora_r = r as i64;
            p.lora_scale = rng.gen_range(0.25..2.0);
            let lora_kind = pick(rng, &[W_F32, W_F16]);
            if fused {
                lora_a = randn(rng, r * k, 0.5);
            } else {
                lora_t = randn(rng, m * r, 1.0);
            }
            lora_b = Some(Weight::random(rng, lora_kind, n * r, 0.5));
        }
        let what = format!(
            "linear M={m} N={n} K={k} act={} bias={} residual={} lora_r={}{}",
            p.act,
            !bias.is_empty(),
            !residual.is_empty(),
            p.lora_r,
            if fused { " fused" } else { "" }
        );
        Self {
            what,
            p,
            a,
            b,
            bias,
            residual,
            lora_t,
            lora_a,
            lora_b,
            out_len: m * n,
        }
    }

    /// This linear case with a fused LoRA of rank `r` (x·Aᵀ computed by the tensor-core kernel)
    /// in place of whatever LoRA it drew.
    pub fn with_fused_lora(mut self, rng: &mut ChaCha8Rng, r: usize) -> Self {
        let (n, k) = (self.p.n as usize, self.p.k as usize);
        self.p.lora_r = r as i64;
        self.p.lora_scale = rng.gen_range(0.25..2.0);
        self.lora_t = vec![];
        self.lora_a = randn(rng, r * k, 0.5);
        let lora_kind = pick(rng, &[W_F32, W_F16]);
        self.lora_b = Some(Weight::random(rng, lora_kind, n * r, 0.5));
        self.what = format!("{} -> fused lora_r={r}", self.what);
        self
    }

    /// Batched `matmul` of activations, B transposed or not (B is f32).
    pub fn matmul(rng: &mut ChaCha8Rng) -> Self {
        let (batch, m, n, k) = (
            rng.gen_range(1..4),
            rng.gen_range(1..100),
            rng.gen_range(1..100),
            rng.gen_range(1..120),
        );
        let transpose_b = rng.gen_bool(0.5);
        let mut p = Self::base(m, n, k);
        p.batch_count = batch as i64;
        p.lda = k as i64;
        p.a_batch = (m * k) as i64;
        (p.sbn, p.sbk) = if transpose_b {
            (k as i64, 1)
        } else {
            (1, n as i64)
        };
        p.b_batch = (k * n) as i64;
        p.ldc = n as i64;
        p.c_batch = (m * n) as i64;
        let what = format!("matmul batch={batch} M={m} N={n} K={k} transpose_b={transpose_b}");
        Self {
            what,
            p,
            a: randn(rng, batch * m * k, 1.0),
            b: Weight::random(rng, W_F32, batch * k * n, 1.0),
            bias: vec![],
            residual: vec![],
            lora_t: vec![],
            lora_a: vec![],
            lora_b: None,
            out_len: batch * m * n,
        }
    }

    /// A convolution with at least `pixels` output pixels (M), drawn until one is.
    pub fn conv_with_pixels(rng: &mut ChaCha8Rng, kind: i64, pixels: usize) -> Self {
        loop {
            let case = Self::conv(rng, kind);
            if case.p.m as usize >= pixels {
                return case;
            }
        }
    }

    /// Dense convolution as an implicit GEMM, NCHW output.
    pub fn conv(rng: &mut ChaCha8Rng, kind: i64) -> Self {
        let (batch, cin, cout) = (
            rng.gen_range(1..3),
            rng.gen_range(1..9),
            rng.gen_range(1..80),
        );
        let (kh, kw) = (pick(rng, &[1, 2, 3, 4]), pick(rng, &[1, 2, 3, 4]));
        let (stride, pad) = (rng.gen_range(1..3), rng.gen_range(0..2));
        let (h, w) = (rng.gen_range(kh.max(1)..14), rng.gen_range(kw.max(1)..14));
        let (oh, ow) = (
            (h + 2 * pad - kh) / stride + 1,
            (w + 2 * pad - kw) / stride + 1,
        );
        let k = cin * kh * kw;
        let mut p = Self::base(batch * oh * ow, cout, k);
        p.a_mode = A_IM2COL;
        (p.cin, p.h, p.w, p.kh, p.kw, p.stride, p.pad, p.oh, p.ow) = (
            cin as i64,
            h as i64,
            w as i64,
            kh as i64,
            kw as i64,
            stride as i64,
            pad as i64,
            oh as i64,
            ow as i64,
        );
        p.sbn = k as i64;
        p.sbk = 1;
        p.c_mode = C_NCHW;
        p.act = pick(rng, &[ACT_NONE, ACT_GELU, ACT_RELU]);
        let what = format!("conv batch={batch} cin={cin} {h}x{w} cout={cout} k={kh}x{kw} stride={stride} pad={pad} act={}", p.act);
        Self {
            what,
            p,
            a: randn(rng, batch * cin * h * w, 1.0),
            b: Weight::random(rng, kind, cout * k, 0.5),
            bias: randn(rng, cout, 0.5),
            residual: vec![],
            lora_t: vec![],
            lora_a: vec![],
            lora_b: None,
            out_len: batch * cout * oh * ow,
        }
    }

    /// Transposed convolution with kernel == stride: a GEMM over input pixels whose epilogue
    /// scatters each output to its k x k patch.
    pub fn conv_transpose(rng: &mut ChaCha8Rng, kind: i64) -> Self {
        let (batch, cin, cout, kk) = (
            rng.gen_range(1..3),
            rng.gen_range(1..70),
            rng.gen_range(1..9),
            pick(rng, &[2, 4]),
        );
        let (h, w) = (rng.gen_range(1..12), rng.gen_range(1..12));
        let n = cout * kk * kk;
        let mut p = Self::base(batch * h * w, n, cin);
        p.a_mode = A_IM2COL;
        (p.cin, p.h, p.w, p.kh, p.kw, p.stride, p.pad, p.oh, p.ow) = (
            cin as i64, h as i64, w as i64, 1, 1, 1, 0, h as i64, w as i64,
        );
        p.sbn = 1;
        p.sbk = n as i64;
        p.c_mode = C_CONVT;
        p.ct_k = kk as i64;
        p.bias_div = (kk * kk) as i64;
        let what =
            format!("conv_transpose batch={batch} cin={cin} {h}x{w} cout={cout} k=stride={kk}");
        Self {
            what,
            p,
            a: randn(rng, batch * cin * h * w, 1.0),
            b: Weight::random(rng, kind, cin * n, 0.5),
            bias: randn(rng, cout, 0.5),
            residual: vec![],
            lora_t: vec![],
            lora_a: vec![],
            lora_b: None,
            out_len: batch * cout * h * kk * w * kk,
        }
    }

    /// Element (z, m, k) of A as the kernel reads it (0 outside the image for the implicit im2col).
    fn a_at(&self, z: usize, m: usize, k: usize) -> f32 {
        let p = &self.p;
        if p.a_mode == A_ROWMAJOR {
            return self.a[z * p.a_batch as usize + m * p.lda as usize + k];
        }
        let (oh, ow, kh, kw) = (p.oh as usize, p.ow as usize, p.kh as usize, p.kw as usize);
        let (b, rest) = (m / (oh * ow), m % (oh * ow));
        let (oy, ox) = (rest / ow, rest % ow);
        let (ci, t) = (k / (kh * kw), k % (kh * kw));
        let (ky, kx) = (t / kw, t % kw);
        let y = (oy * p.stride as usize + ky) as i64 - p.pad;
        let x = (ox * p.stride as usize + kx) as i64 - p.pad;
        if y < 0 || y >= p.h || x < 0 || x >= p.w {
            return 0.0;
        }
        self.a[((b * p.cin as usize + ci) * p.h as usize + y as usize) * p.w as usize + x as usize]
    }

    /// Output index of (z, m, n).
    fn out_index(&self, z: usize, m: usize, n: usize) -> usize {
        let p = &self.p;
        match p.c_mode {
            C_ROWMAJOR => z * p.c_batch as usize + m * p.ldc as usize + n,
            C_NCHW => {
                let pix = (p.oh * p.ow) as usize;
                (m / pix * p.n as usize + n) * pix + m % pix
            }
            _ => {
                let (k, pix, w) = (p.ct_k as usize, (p.h * p.w) as usize, p.w as usize);
                let (b, r) = (m / pix, m % pix);
                let (y, x) = (r / w, r % w);
                let (co, t) = (n / (k * k), n % (k * k));
                let (ky, kx) = (t / k, t % k);
                let cout = p.n as usize / (k * k);
                ((b * cout + co) * p.h as usize * k + y * k + ky) * (w * k) + x * k + kx
            }
        }
    }

    /// The f64 reference and each output's error bound.
    fn reference(&self, ops: Operands) -> (Vec<f64>, Vec<f64>) {
        let p = &self.p;
        let (mm, nn, kk) = (p.m as usize, p.n as usize, p.k as usize);
        let mut want = vec![f64::NAN; self.out_len];
        let mut bound = vec![0.0; self.out_len];
        for z in 0..p.batch_count as usize {
            for m in 0..mm {
                let arow: Vec<f64> = (0..kk).map(|k| ops.round(self.a_at(z, m, k))).collect();
                // Row m of t = x·Aᵀ and of Σ_k |x a|: given, or (fused) from the operands the kernel
                // multiplies.
                let r = p.lora_r as usize;
                let (trow, tabs): (Vec<f64>, Vec<f64>) = if self.lora_a.is_empty() {
                    let t: Vec<f64> = (0..r).map(|j| self.lora_t[m * r + j] as f64).collect();
                    (t.clone(), t.iter().map(|v| v.abs()).collect())
                } else {
                    (0..r)
                        .map(|j| {
                            let la = &self.lora_a[j * kk..(j + 1) * kk];
                            let prods = arow.iter().zip(la).map(|(&x, &a)| x * ops.round(a));
                            prods.fold((0.0, 0.0), |(v, s), q| (v + q, s + q.abs()))
                        })
                        .unzip()
                };
                for n in 0..nn {
                    let (mut v, mut s) = (0.0f64, 0.0f64);
                    for (k, &a) in arow.iter().enumerate() {
                        let b = ops.round(
                            self.b.values
                                [z * p.b_batch as usize + n * p.sbn as usize + k * p.sbk as usize],
                        );
                        v += a * b;
                        s += (a * b).abs();
                    }
                    if let Some(lb) = &self.lora_b {
                        // With t computed in f32 from K products, its error is within the same
                        // K-term bound when S counts Σ_j |B| Σ_k |x a| (tabs) rather than |t B|.
                        let t: f64 = (0..r).map(|j| trow[j] * lb.values[n * r + j] as f64).sum();
                        let ta: f64 = (0..r)
                            .map(|j| tabs[j] * (lb.values[n * r + j] as f64).abs())
                            .sum();
                        v += p.lora_scale as f64 * t;
                        s += (p.lora_scale as f64).abs() * ta;
                    }
                    if !self.bias.is_empty() {
                        let b = self.bias[n / p.bias_div as usize] as f64;
                        v += b;
                        s += b.abs();
                    }
                    v = activate(v, p.act);
                    let o = self.out_index(z, m, n);
                    if !self.residual.is_empty() {
                        v += self.residual[o] as f64;
                        s += (self.residual[o] as f64).abs();
                    }
                    want[o] = v;
                    bound[o] = 2.0 * (kk as f64 + 16.0) * U * s + 1e-30;
                }
            }
        }
        (want, bound)
    }

    /// Runs `kernel` (grid and block as the backend launches it) and compares.
    pub fn check(&self, sim: &Sim, kernel: &str, ops: Operands) -> Result<(), String> {
        let out = self.run(sim, kernel)?;
        let (want, bound) = self.reference(ops);
        compare(
            &format!("{kernel} [{}] {}", sim.variant, self.what),
            &out,
            &want,
            &bound,
        )
    }

    /// Launches `kernel` and returns its output buffer (guard included).
    pub fn run(&self, sim: &Sim, kernel: &str) -> Result<Vec<f32>, String> {
        let mut out = poisoned(self.out_len);
        let addr = |v: &Vec<f32>| if v.is_empty() { 0 } else { v.as_ptr() as u64 };
        let mut p = self.p;
        p.a = addr(&self.a);
        p.b = self.b.wref();
        p.bias = addr(&self.bias);
        p.residual = addr(&self.residual);
        p.lora_t = addr(&self.lora_t);
        p.lora_a = addr(&self.lora_a);
        // Only the tensor-core body fuses x·Aᵀ; the backend computes t first for the other (here
        // in f64, rounded to f32).
        let host_t: Vec<f32>;
        if !self.lora_a.is_empty() && !kernel.starts_with("gemm_tc") {
            let (r, k) = (p.lora_r as usize, p.k as usize);
            host_t = (0..p.m as usize * r)
                .map(|i| {
                    let (m, j) = (i / r, i % r);
                    (0..k)
                        .map(|kk| self.a_at(0, m, kk) as f64 * self.lora_a[j * k + kk] as f64)
                        .sum::<f64>() as f32
                })
                .collect();
            p.lora_t = addr(&host_t);
            p.lora_a = 0;
        }
        p.lora_b = self
            .lora_b
            .as_ref()
            .map_or(WeightRef::default(), |w| w.wref());
        p.c = out.as_mut_ptr() as u64;
        let grid = Dim3(
            (p.n as u32).div_ceil(64),
            (p.m as u32).div_ceil(64),
            p.batch_count as u32,
        );
        sim.launch(kernel, grid, Dim3(128, 1, 1), &[Arg::record(&p)])
            .map_err(|e| format!("{kernel} {}: {e}", self.what))?;
        Ok(out)
    }
}

/// Runs `cases` random problems through the kernel for weight kind `kind`; the first failure.
pub fn run(
    sim: &Sim,
    rng: &mut ChaCha8Rng,
    tensor_cores: bool,
    ops: Operands,
    kind: i64,
    cases: usize,
) -> Result<(), String> {
    let kernel = format!(
        "gemm_{}_{}",
        if tensor_cores { "tc" } else { "simt" },
        KIND_NAMES[kind as usize]
    );
    for _ in 0..cases {
        GemmCase::random(rng, kind).check(sim, &kernel, ops)?;
    }
    Ok(())
}
