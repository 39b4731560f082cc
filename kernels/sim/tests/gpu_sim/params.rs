//! `#[repr(C)]` mirrors of the kernels' by-value parameter records (the same layout as
//! models/src/cuda/params.rs; the launch checks each record's size against the C++ `sizeof`), and
//! weights stored the three ways the kernels read them.

use minisam_kernels::attention::Bias;
use minisam_kernels::nf4;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct WeightRef {
    pub data: u64,
    pub absq: u64,
    pub scales: u64,
    pub kind: i64,
}

pub const W_F32: i64 = 0;
pub const W_F16: i64 = 1;
pub const W_NF4: i64 = 2;

pub const A_ROWMAJOR: i64 = 0;
pub const A_IM2COL: i64 = 1;
pub const C_ROWMAJOR: i64 = 0;
pub const C_NCHW: i64 = 1;
pub const C_CONVT: i64 = 2;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct GemmParams {
    pub m: i64,
    pub n: i64,
    pub k: i64,
    pub batch_count: i64,
    pub a: u64,
    pub a_mode: i64,
    pub lda: i64,
    pub a_batch: i64,
    pub cin: i64,
    pub h: i64,
    pub w: i64,
    pub kh: i64,
    pub kw: i64,
    pub stride: i64,
    pub pad: i64,
    pub oh: i64,
    pub ow: i64,
    pub b: WeightRef,
    pub sbn: i64,
    pub sbk: i64,
    pub b_batch: i64,
    pub c: u64,
    pub c_mode: i64,
    pub ldc: i64,
    pub c_batch: i64,
    pub ct_k: i64,
    pub bias: u64,
    pub bias_div: i64,
    pub residual: u64,
    pub act: i64,
    pub lora_t: u64,
    pub lora_b: WeightRef,
    pub lora_r: i64,
    pub lora_scale: f32,
    pub pad_: f32,
    pub lora_a: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct AttnParams {
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub out: u64,
    pub bh: i64,
    pub nq: i64,
    pub nk: i64,
    pub d: i64,
    pub scale: f32,
    pub pad_: f32,
    pub bias_mode: i64,
    pub table: u64,
    pub heads: i64,
    pub rel_h: u64,
    pub rel_w: u64,
    pub kh: i64,
    pub kw: i64,
}

impl AttnParams {
    /// The record for `out = attention(q, k, v)` over `bh` batch-heads of `nq` queries and `nk`
    /// keys of `d`, with `bias` choosing the mode and its tables (the kernels' `bias_mode`: 0
    /// none, 1 table, 2 decomposed relative position).
    #[allow(clippy::too_many_arguments)]
    pub fn new(q: &[f32], k: &[f32], v: &[f32], out: &mut [f32], bh: usize, nq: usize, nk: usize, d: usize, scale: f32, bias: Bias) -> Self {
        let mut p = AttnParams {
            q: q.as_ptr() as u64,
            k: k.as_ptr() as u64,
            v: v.as_ptr() as u64,
            out: out.as_mut_ptr() as u64,
            bh: bh as i64,
            nq: nq as i64,
            nk: nk as i64,
            d: d as i64,
            scale,
            ..Default::default()
        };
        match bias {
            Bias::None => {}
            Bias::Table { table, heads } => (p.bias_mode, p.table, p.heads) = (1, table.as_ptr() as u64, heads as i64),
            Bias::RelPos { rel_h, rel_w, kh, kw } => {
                (p.bias_mode, p.rel_h, p.rel_w, p.kh, p.kw) = (2, rel_h.as_ptr() as u64, rel_w.as_ptr() as u64, kh as i64, kw as i64)
            }
        }
        p
    }
}

pub const MAX_RANK: usize = 8;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PermuteParams {
    pub rank: i64,
    pub n: i64,
    pub out_shape: [i64; MAX_RANK],
    pub src_stride: [i64; MAX_RANK],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ConvParams {
    pub x: u64,
    pub out: u64,
    pub w: WeightRef,
    pub bias: u64,
    pub batch: i64,
    pub cin: i64,
    pub h: i64,
    pub w_: i64,
    pub cout: i64,
    pub kh: i64,
    pub kw: i64,
    pub stride: i64,
    pub pad: i64,
    pub groups: i64,
    pub oh: i64,
    pub ow: i64,
    pub act: i64,
}

/// A weight in one stored precision, with the f32 values the kernel should see.
pub struct Weight {
    pub kind: i64,
    data: Vec<u8>,
    absq: Vec<u8>,
    scales: Vec<u8>,
    /// The dequantised values (exact for f32 and fp16; NF4 through the CPU's decoder).
    pub values: Vec<f32>,
}

impl Weight {
    pub fn new(kind: i64, raw: &[f32]) -> Self {
        match kind {
            W_F32 => Weight {
                kind,
                data: raw.iter().flat_map(|v| v.to_le_bytes()).collect(),
                absq: vec![],
                scales: vec![],
                values: raw.to_vec(),
            },
            W_F16 => {
                let h: Vec<half::f16> = raw.iter().map(|&v| half::f16::from_f32(v)).collect();
                Weight {
                    kind,
                    data: h.iter().flat_map(|v| v.to_le_bytes()).collect(),
                    absq: vec![],
                    scales: vec![],
                    values: h.iter().map(|v| v.to_f32()).collect(),
                }
            }
            W_NF4 => {
                let q = nf4::quantize(raw);
                let mut values = vec![0.0; raw.len()];
                nf4::dequantize(&q.view(), 0, &mut values);
                Weight {
                    kind,
                    data: q.codes,
                    absq: q.absmax_q,
                    scales: q.absmax_scales,
                    values,
                }
            }
            _ => unreachable!("weight kind {kind}"),
        }
    }
    pub fn random(rng: &mut ChaCha8Rng, kind: i64, n: usize, scale: f32) -> Self {
        let raw: Vec<f32> = (0..n)
            .map(|_| (rng.gen::<f32>() * 2.0 - 1.0) * scale)
            .collect();
        Self::new(kind, &raw)
    }
    pub fn wref(&self) -> WeightRef {
        let addr = |v: &Vec<u8>| if v.is_empty() { 0 } else { v.as_ptr() as u64 };
        WeightRef {
            data: addr(&self.data),
            absq: addr(&self.absq),
            scales: addr(&self.scales),
            kind: self.kind,
        }
    }
}

pub const KIND_NAMES: [&str; 3] = ["f32w", "f16w", "nf4w"];
