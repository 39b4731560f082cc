//! What one frame costs, counted rather than estimated: [`CostMeter`] is a [`Backend`] that runs
//! every operation on an inner backend and adds up its floating-point operations and the bytes
//! it must at least move. Running a real encode/decode through it gives the exact work of that
//! model at that input, so a benchmark can state achieved FLOP/s against a machine's peak, and
//! a roofline floor is known before a GPU ever runs (`minisam inspect MODEL --cost`).
//!
//! Conventions (those of FLOP counting in the field): a multiply-add is 2 FLOPs; a GEMM-shaped
//! operation (linear, matmul, convolution, attention's two products) counts `2·M·N·K`; softmax,
//! norms, activations and adds are counted as memory traffic, not FLOPs (they are bandwidth
//! bound on every machine this runs on). Minimum traffic: each weight read once per use in its
//! stored precision (NF4 with its scales, fp16, f32), each operation's inputs and output once.
//! Activations are counted in elements; the caller prices them (4 bytes on the CPU, 2 for the
//! GPU's bf16 tensor-core path where the kernels keep them in f32 too: see `benches/gpu`).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::backend::{Activation, AttentionBias, Backend, Conv2dSpec, InvertedResidual};
use crate::store::{StoredTensor, TensorData};
use crate::Result;

/// Counts of one run (or since the last [`CostMeter::take`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cost {
    /// Linear layers and activation-by-activation products (`matmul`).
    pub gemm_flops: u64,
    /// Convolutions and transposed convolutions (as implicit GEMMs; depthwise included).
    pub conv_flops: u64,
    /// Attention's `q·kᵀ` and `p·v`.
    pub attention_flops: u64,
    /// Weight bytes read, in their stored precision, once per use.
    pub weight_bytes: u64,
    /// Activation elements read and written, once per operation.
    pub activation_elements: u64,
    /// Backend operations issued (kernel launches on a GPU, roughly).
    pub ops: u64,
}

impl Cost {
    pub fn flops(&self) -> u64 {
        self.gemm_flops + self.conv_flops + self.attention_flops
    }

    /// Minimum bytes moved with activations of `activation_bytes` each.
    pub fn bytes(&self, activation_bytes: u64) -> u64 {
        self.weight_bytes + self.activation_elements * activation_bytes
    }

    /// The roofline floor in seconds on a machine with these peaks: whichever of compute and
    /// memory takes longer at full speed.
    pub fn floor_seconds(&self, peak_flops: f64, peak_bytes_per_s: f64, activation_bytes: u64) -> f64 {
        (self.flops() as f64 / peak_flops).max(self.bytes(activation_bytes) as f64 / peak_bytes_per_s)
    }
}

#[derive(Default)]
struct Counters {
    gemm: AtomicU64,
    conv: AtomicU64,
    attention: AtomicU64,
    weight_bytes: AtomicU64,
    elements: AtomicU64,
    ops: AtomicU64,
}

/// A weight of the inner backend with what the meter needs to price its use.
pub struct MeteredWeight<W> {
    inner: W,
    shape: Vec<usize>,
    bytes: u64,
}

/// The stored size of a parameter: what a kernel must read to use it.
pub(crate) fn stored_bytes(t: &StoredTensor) -> u64 {
    match &t.data {
        TensorData::F32(v) => 4 * v.len() as u64,
        TensorData::F16(b) => b.len() as u64,
        TensorData::Nf4(q) => (q.codes.len() + q.absmax_q.len() + q.absmax_scales.len()) as u64,
    }
}

/// A [`Backend`] that delegates to `B` and counts; see the module docs.
pub struct CostMeter<B: Backend> {
    inner: B,
    c: Counters,
}

impl<B: Backend> CostMeter<B> {
    pub fn new(inner: B) -> Self {
        Self { inner, c: Counters::default() }
    }

    /// The counts so far, resetting them (so encode and decode can be priced apart).
    pub fn take(&self) -> Cost {
        Cost {
            gemm_flops: self.c.gemm.swap(0, Relaxed),
            conv_flops: self.c.conv.swap(0, Relaxed),
            attention_flops: self.c.attention.swap(0, Relaxed),
            weight_bytes: self.c.weight_bytes.swap(0, Relaxed),
            activation_elements: self.c.elements.swap(0, Relaxed),
            ops: self.c.ops.swap(0, Relaxed),
        }
    }

    fn numel(&self, t: &B::Tensor) -> u64 {
        self.inner.shape(t).iter().product::<usize>() as u64
    }

    /// One operation that read `inputs` and wrote `out`.
    fn traffic(&self, inputs: &[&B::Tensor], out: &Result<B::Tensor>) {
        let read: u64 = inputs.iter().map(|t| self.numel(t)).sum();
        let written = out.as_ref().map_or(0, |o| self.numel(o));
        self.c.elements.fetch_add(read + written, Relaxed);
        self.c.ops.fetch_add(1, Relaxed);
    }
}

/// The same bias, seen through the inner backend (the meter's tensor and vector types are its).
fn inner_bias<'a, B: Backend>(bias: AttentionBias<'a, CostMeter<B>>) -> AttentionBias<'a, B> {
    match bias {
        AttentionBias::None => AttentionBias::None,
        AttentionBias::Table(t) => AttentionBias::Table(t),
        AttentionBias::DecomposedRelPos { rel_h, rel_w } => AttentionBias::DecomposedRelPos { rel_h, rel_w },
    }
}

impl<B: Backend> Backend for CostMeter<B> {
    type Tensor = B::Tensor;
    type Weight = MeteredWeight<B::Weight>;
    type Vector = B::Vector;

    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn numerics(&self) -> String {
        self.inner.numerics()
    }
    fn weight(&self, t: &StoredTensor) -> Result<Self::Weight> {
        Ok(MeteredWeight { inner: self.inner.weight(t)?, shape: t.shape.clone(), bytes: stored_bytes(t) })
    }
    fn vector(&self, t: &StoredTensor) -> Result<B::Vector> {
        self.inner.vector(t)
    }
    fn vector_from_host(&self, shape: &[usize], data: &[f32]) -> Result<B::Vector> {
        self.inner.vector_from_host(shape, data)
    }
    fn vector_shape<'a>(&self, v: &'a B::Vector) -> &'a [usize] {
        self.inner.vector_shape(v)
    }
    fn from_host(&self, shape: &[usize], data: &[f32]) -> Result<B::Tensor> {
        self.inner.from_host(shape, data)
    }
    fn to_host(&self, t: &B::Tensor) -> Result<Vec<f32>> {
        self.inner.to_host(t)
    }
    fn shape<'a>(&self, t: &'a B::Tensor) -> &'a [usize] {
        self.inner.shape(t)
    }
    fn tensor_from_vector(&self, v: &B::Vector) -> Result<B::Tensor> {
        self.inner.tensor_from_vector(v)
    }
    fn reshape(&self, t: B::Tensor, shape: &[usize]) -> Result<B::Tensor> {
        // A view: no traffic.
        self.inner.reshape(t, shape)
    }
    fn permute(&self, t: &B::Tensor, perm: &[usize]) -> Result<B::Tensor> {
        let out = self.inner.permute(t, perm);
        self.traffic(&[t], &out);
        out
    }
    fn narrow(&self, t: &B::Tensor, axis: usize, start: usize, len: usize) -> Result<B::Tensor> {
        let out = self.inner.narrow(t, axis, start, len);
        // Reads only the slice it copies: the output's size, twice.
        let n = out.as_ref().map_or(0, |o| self.numel(o));
        self.c.elements.fetch_add(2 * n, Relaxed);
        self.c.ops.fetch_add(1, Relaxed);
        out
    }
    fn concat(&self, ts: &[&B::Tensor], axis: usize) -> Result<B::Tensor> {
        let out = self.inner.concat(ts, axis);
        self.traffic(ts, &out);
        out
    }
    fn pad_hw(&self, t: &B::Tensor, pad_h: usize, pad_w: usize) -> Result<B::Tensor> {
        let out = self.inner.pad_hw(t, pad_h, pad_w);
        self.traffic(&[t], &out);
        out
    }
    fn linear(&self, x: &B::Tensor, w: &Self::Weight, bias: Option<&B::Vector>, act: Activation) -> Result<B::Tensor> {
        let out = self.inner.linear(x, &w.inner, bias, act);
        // x [.., K] · wᵀ, w [N, K]: 2·(rows)·K·N.
        let (n, k) = (w.shape[0] as u64, w.shape[1..].iter().product::<usize>() as u64);
        let rows = self.numel(x) / k.max(1);
        self.c.gemm.fetch_add(2 * rows * k * n, Relaxed);
        self.c.weight_bytes.fetch_add(w.bytes, Relaxed);
        self.traffic(&[x], &out);
        out
    }
    fn matmul(&self, a: &B::Tensor, b: &B::Tensor, transpose_b: bool) -> Result<B::Tensor> {
        let out = self.inner.matmul(a, b, transpose_b);
        let (sa, sb) = (self.inner.shape(a), self.inner.shape(b));
        let k = sa[sa.len() - 1] as u64;
        let n = if transpose_b { sb[sb.len() - 2] } else { sb[sb.len() - 1] } as u64;
        let batch_rows = self.numel(a) / k.max(1);
        self.c.gemm.fetch_add(2 * batch_rows * k * n, Relaxed);
        self.traffic(&[a, b], &out);
        out
    }
    fn conv2d(&self, x: &B::Tensor, w: &Self::Weight, bias: Option<&B::Vector>, spec: Conv2dSpec, act: Activation) -> Result<B::Tensor> {
        let out = self.inner.conv2d(x, &w.inner, bias, spec, act);
        // Each output element: C_in/groups · kh · kw multiply-adds (w is [C_out, C_in/groups, kh, kw]).
        let per_output: u64 = w.shape[1..].iter().product::<usize>() as u64;
        let outputs = out.as_ref().map_or(0, |o| self.numel(o));
        self.c.conv.fetch_add(2 * outputs * per_output, Relaxed);
        self.c.weight_bytes.fetch_add(w.bytes, Relaxed);
        self.traffic(&[x], &out);
        out
    }
    fn conv_transpose2d(&self, x: &B::Tensor, w: &Self::Weight, bias: Option<&B::Vector>, stride: usize) -> Result<B::Tensor> {
        let out = self.inner.conv_transpose2d(x, &w.inner, bias, stride);
        // Kernel == stride: every output element is one input pixel's C_in multiply-adds.
        let c_in = w.shape[0] as u64;
        let outputs = out.as_ref().map_or(0, |o| self.numel(o));
        self.c.conv.fetch_add(2 * outputs * c_in, Relaxed);
        self.c.weight_bytes.fetch_add(w.bytes, Relaxed);
        self.traffic(&[x], &out);
        out
    }
    fn layer_norm(&self, x: &B::Tensor, gamma: &B::Vector, beta: &B::Vector, eps: f32) -> Result<B::Tensor> {
        let out = self.inner.layer_norm(x, gamma, beta, eps);
        self.traffic(&[x], &out);
        out
    }
    fn layer_norm_nchw(&self, x: &B::Tensor, gamma: &B::Vector, beta: &B::Vector, eps: f32) -> Result<B::Tensor> {
        let out = self.inner.layer_norm_nchw(x, gamma, beta, eps);
        self.traffic(&[x], &out);
        out
    }
    fn activation(&self, x: &B::Tensor, act: Activation) -> Result<B::Tensor> {
        let out = self.inner.activation(x, act);
        self.traffic(&[x], &out);
        out
    }
    fn add(&self, a: &B::Tensor, b: &B::Tensor) -> Result<B::Tensor> {
        let out = self.inner.add(a, b);
        self.traffic(&[a, b], &out);
        out
    }
    fn add_vector(&self, a: &B::Tensor, v: &B::Vector) -> Result<B::Tensor> {
        let out = self.inner.add_vector(a, v);
        self.traffic(&[a], &out);
        out
    }
    fn scale(&self, a: &B::Tensor, s: f32) -> Result<B::Tensor> {
        let out = self.inner.scale(a, s);
        self.traffic(&[a], &out);
        out
    }
    fn attention(&self, q: &B::Tensor, k: &B::Tensor, v: &B::Tensor, scale: f32, bias: AttentionBias<'_, Self>) -> Result<B::Tensor> {
        let out = self.inner.attention(q, k, v, scale, inner_bias(bias));
        let (sq, sk) = (self.inner.shape(q), self.inner.shape(k));
        let (bh, nq, d, nk) = (sq[0] as u64, sq[1] as u64, sq[2] as u64, sk[1] as u64);
        // q·kᵀ and p·v: 2·Nq·Nk·D each per batch-head. The bias tables are traffic.
        self.c.attention.fetch_add(4 * bh * nq * nk * d, Relaxed);
        self.traffic(&[q, k, v], &out);
        out
    }
    fn inverted_residual(&self, x: &B::Tensor, block: &InvertedResidual<'_, Self>) -> Result<B::Tensor> {
        let inner = InvertedResidual {
            expand: &block.expand.inner,
            expand_bias: block.expand_bias,
            depthwise: &block.depthwise.inner,
            depthwise_bias: block.depthwise_bias,
            kernel: block.kernel,
            project: &block.project.inner,
            project_bias: block.project_bias,
            act: block.act,
        };
        let out = self.inner.inverted_residual(x, &inner);
        // Priced as its three convolutions (each output element's multiply-adds), its weights
        // once each, and x read twice (input and residual) and the output written: the hidden
        // intermediates are not traffic a fused implementation must make.
        let pixels = self.inner.shape(x)[2..].iter().product::<usize>() as u64 * self.inner.shape(x)[0] as u64;
        let (hidden, c) = (block.expand.shape[0] as u64, block.expand.shape[1] as u64);
        let taps = (block.kernel * block.kernel) as u64;
        self.c.conv.fetch_add(2 * pixels * (hidden * c + hidden * taps + c * hidden), Relaxed);
        self.c.weight_bytes.fetch_add(block.expand.bytes + block.depthwise.bytes + block.project.bytes, Relaxed);
        self.traffic(&[x, x], &out);
        out
    }
    fn attention_heads(&self, q: B::Tensor, k: B::Tensor, v: B::Tensor, heads: usize, scale: f32, bias: AttentionBias<'_, Self>) -> Result<B::Tensor> {
        let (batch, nq, d) = crate::backend::merged_heads_dims(self.inner.shape(&q), heads)?;
        let nk = self.inner.shape(&k)[1];
        // Priced as `attention`: q·kᵀ and p·v per batch-head, q, k, v read and the output written.
        self.c.attention.fetch_add(4 * (batch * heads * nq * nk * d) as u64, Relaxed);
        self.c.elements.fetch_add((batch * heads * d * (2 * nq + 2 * nk)) as u64, Relaxed);
        self.c.ops.fetch_add(1, Relaxed);
        self.inner.attention_heads(q, k, v, heads, scale, inner_bias(bias))
    }
    fn depthwise_conv_nhwc(&self, x: &B::Tensor, w: &Self::Weight, bias: Option<&B::Vector>, kernel: usize) -> Result<B::Tensor> {
        let out = self.inner.depthwise_conv_nhwc(x, &w.inner, bias, kernel);
        let outputs = out.as_ref().map_or(0, |o| self.numel(o));
        self.c.conv.fetch_add(2 * outputs * (kernel * kernel) as u64, Relaxed);
        self.c.weight_bytes.fetch_add(w.bytes, Relaxed);
        self.traffic(&[x], &out);
        out
    }
    fn attention_packed(&self, qkv: B::Tensor, heads: usize, scale: f32, bias: AttentionBias<'_, Self>) -> Result<B::Tensor> {
        let (batch, n, d) = crate::backend::packed_qkv_dims(self.inner.shape(&qkv), heads)?;
        // Priced as `attention`: q·kᵀ and p·v per batch-head, q, k, v read and the output written.
        self.c.attention.fetch_add(4 * (batch * heads * n * n * d) as u64, Relaxed);
        self.c.elements.fetch_add((batch * n * heads * 4 * d) as u64, Relaxed);
        self.c.ops.fetch_add(1, Relaxed);
        self.inner.attention_packed(qkv, heads, scale, inner_bias(bias))
    }
    fn resize_bilinear(&self, x: &B::Tensor, out_h: usize, out_w: usize) -> Result<B::Tensor> {
        let out = self.inner.resize_bilinear(x, out_h, out_w);
        self.traffic(&[x], &out);
        out
    }
    // `run_frame` stays the trait's default (no replay), so every operation of a frame passes
    // through the meter.
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::CpuBackend;
    use crate::store::{SharedBytes, TensorData};

    fn weight(shape: &[usize]) -> StoredTensor {
        let n = shape.iter().product();
        StoredTensor { name: "w".into(), shape: shape.to_vec(), data: TensorData::F32(vec![0.5f32; n].into()) }
    }

    #[test]
    fn each_operation_is_priced_by_its_shapes() {
        let m = CostMeter::new(CpuBackend::new(1).unwrap());
        let x = m.from_host(&[2, 3, 8], &[1.0; 48]).unwrap();
        let w = m.weight(&weight(&[5, 8])).unwrap();
        let y = m.linear(&x, &w, None, Activation::Gelu).unwrap();
        let c = m.take();
        assert_eq!((c.gemm_flops, c.weight_bytes, c.activation_elements, c.ops), (2 * 6 * 8 * 5, 4 * 40, 48 + 30, 1));

        let img = m.from_host(&[1, 4, 6, 6], &[1.0; 144]).unwrap();
        let k = m.weight(&weight(&[3, 4, 3, 3])).unwrap();
        let spec = Conv2dSpec { stride: 1, padding: 1, groups: 1 };
        m.conv2d(&img, &k, None, spec, Activation::None).unwrap();
        let dw = m.weight(&weight(&[4, 1, 3, 3])).unwrap();
        m.conv2d(&img, &dw, None, Conv2dSpec { stride: 2, padding: 1, groups: 4 }, Activation::None).unwrap();
        let up = m.weight(&weight(&[4, 2, 2, 2])).unwrap();
        m.conv_transpose2d(&img, &up, None, 2).unwrap();
        let c = m.take();
        let dense = 2 * (3 * 6 * 6) * (4 * 3 * 3);
        let depthwise = 2 * (4 * 3 * 3) * 9;
        let transposed = 2 * (2 * 12 * 12) * 4;
        assert_eq!(c.conv_flops, dense + depthwise + transposed);

        let q = m.from_host(&[2, 7, 4], &[0.1; 56]).unwrap();
        let kv = m.from_host(&[2, 9, 4], &[0.1; 72]).unwrap();
        m.attention(&q, &kv, &kv, 0.5, AttentionBias::None).unwrap();
        m.matmul(&x, &x, true).unwrap(); // [2,3,8]·[2,3,8]ᵀ = [2,3,3]
        m.matmul(&y, &m.from_host(&[2, 5, 4], &[1.0; 40]).unwrap(), false).unwrap(); // [2,3,5]·[2,5,4]
        let c = m.take();
        assert_eq!(c.attention_flops, 4 * 2 * 7 * 9 * 4);
        assert_eq!(c.gemm_flops, 2 * 6 * 8 * 3 + 2 * 6 * 5 * 4);
    }

    #[test]
    fn nf4_weights_are_priced_at_their_stored_size() {
        let values: Vec<f32> = (0..512).map(|i| (i as f32 - 256.0) / 256.0).collect();
        let q = minisam_kernels::nf4::quantize(&values);
        let bytes = (q.codes.len() + q.absmax_q.len() + q.absmax_scales.len()) as u64;
        let t = StoredTensor {
            name: "w".into(),
            shape: vec![16, 32],
            data: TensorData::Nf4(crate::store::Nf4Data { codes: SharedBytes::from_vec(q.codes), absmax_q: SharedBytes::from_vec(q.absmax_q), absmax_scales: SharedBytes::from_vec(q.absmax_scales) }),
        };
        assert_eq!(stored_bytes(&t), bytes);
        assert!(bytes < 512 / 2 + 32, "NF4 is about half a byte per weight: {bytes}");
    }
}
