//! [`CudaBackend`]: the [`Backend`] trait on an NVIDIA GPU. Shapes are checked on the host with
//! the same rules (and messages) as the CPU reference, then each operation is one or a few kernel
//! launches on the backend's stream; nothing is synchronised except `to_host`.
//!
//! Precision: GEMM-shaped operations (linear, matmul, dense and transposed convolutions) run on
//! the tensor cores with bf16 operands (fp16 on request) and f32 accumulation, or on the CUDA
//! cores in f32 with [`MmaPrecision::F32`] and whenever K < 32 (the prompt encoder's K = 2
//! Fourier features would lose their phase to 16-bit operands for no speed gain). Attention follows
//! the same modes: on the tensor cores (FlashAttention-2 style, f32 softmax and accumulation) for
//! head dims 16 to 80, else in f32. Everything else (norms, convolutions with groups, resizes) is
//! f32.

use std::sync::Arc;

use cudarc::driver::LaunchConfig;

use super::compile::MmaPrecision;
use super::device::{grid_for, Arg, Block, CudaOptions, Device, DeviceParam, VramReport};
use super::driver::Driver;
use super::graph::FrameGraphs;
use super::params::*;
use super::profile::{KernelProfile, Work, ACTIVATION_BYTES};
use crate::backend::{Activation, AttentionBias, Backend, Conv2dSpec, FrameFn, Lora};
use crate::store::{StoredTensor, TensorData};
use crate::{Error, Result};

/// An activation on the device: a block of the arena, f32, row-major.
pub struct CudaTensor {
    shape: Vec<usize>,
    block: Block,
}

impl CudaTensor {
    pub(super) fn ptr(&self) -> u64 {
        self.block.ptr()
    }
    pub(super) fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub(super) fn shape(&self) -> &[usize] {
        &self.shape
    }
}

/// A weight on the device in its stored precision.
pub struct CudaWeight {
    shape: Vec<usize>,
    kind: i64,
    /// Its stored size (NF4 with its scales): what a kernel reads to use it once.
    bytes: u64,
    _parts: Vec<DeviceParam>,
    wref: WeightRef,
}

/// A small f32 parameter on the device.
pub struct CudaVector {
    shape: Vec<usize>,
    param: DeviceParam,
}

impl CudaVector {
    /// What a kernel reads to use it once.
    fn bytes(&self) -> u64 {
        4 * self.shape.iter().product::<usize>() as u64
    }
}

/// The bytes of an optional parameter (a bias), 0 without one.
fn param_bytes(v: Option<&CudaVector>) -> u64 {
    v.map_or(0, CudaVector::bytes)
}

/// The CUDA backend. Build with [`CudaBackend::new`]; see `crate::cuda::select_backend` for the
/// fall-back-to-CPU policy.
pub struct CudaBackend {
    /// Declared first so it is dropped first: a graph goes before the device memory it uses.
    graphs: FrameGraphs,
    dev: Device,
}

fn act_code(a: Activation) -> i64 {
    match a {
        Activation::None => 0,
        Activation::Gelu => 1,
        Activation::Relu => 2,
    }
}

fn shape_err(msg: String) -> Error {
    Error::Shape(msg)
}

fn expect_rank<'a>(op: &str, what: &str, shape: &'a [usize], rank: usize) -> Result<&'a [usize]> {
    if shape.len() != rank {
        return Err(shape_err(format!("{op}: {what} must have rank {rank}, got shape {shape:?}")));
    }
    Ok(shape)
}

fn split_last(op: &str, shape: &[usize]) -> Result<(usize, usize)> {
    match shape.split_last() {
        Some((&last, lead)) => Ok((lead.iter().product(), last)),
        None => Err(shape_err(format!("{op}: needs rank >= 1, got a scalar"))),
    }
}

fn as_i64(v: usize) -> i64 {
    v as i64
}

impl CudaBackend {
    /// Opens the GPU and loads the kernels. Errors (no driver, no device, too old a GPU, NVRTC
    /// missing with nothing cached, a kernel that fails to compile) are returned, never panicked.
    pub fn new(options: CudaOptions) -> Result<Self> {
        let graphs = FrameGraphs::new(options.graphs);
        Ok(Self { graphs, dev: Device::open(options)? })
    }

    /// The same backend on another [`Driver`] (`options.device` unused): the SIMT simulator's in
    /// CI (`cuda::sim_driver`, feature `gpusim`), so the code above runs unmodified without a GPU.
    pub fn with_driver(options: CudaOptions, driver: Arc<dyn Driver>) -> Result<Self> {
        let graphs = FrameGraphs::new(options.graphs);
        Ok(Self { graphs, dev: Device::with_driver(options, driver)? })
    }

    /// One line for logs: device, architecture, precision, where the kernels came from.
    pub fn describe(&self) -> String {
        format!(
            "CUDA {} (sm_{}), {} tensor-core operands, {} of {} kernel modules from the PTX cache, VRAM budget {:.0} MiB",
            self.dev.name,
            self.dev.arch,
            self.dev.options.precision.name(),
            self.dev.cached_modules,
            super::compile::SOURCES.len(),
            self.dev.options.vram_budget as f64 / (1024.0 * 1024.0)
        )
    }

    pub fn vram_report(&self) -> VramReport {
        self.dev.report()
    }

    /// Sizes the activation arena to what the frames so far needed: their high-water mark, a
    /// quarter more for allocation orders a later frame may bring, 16 MiB, and `keep` bytes the
    /// caller holds across frames (cached embeddings). Call with no tensor alive; the encoder's
    /// graph is dropped and captured again by the next frame. Returns the arena's bytes before
    /// and after; the budget never grows, so the result is at most the old size.
    pub fn fit_arena(&self, keep: u64) -> Result<(u64, u64)> {
        let before = self.dev.report();
        let want = before.arena_peak + before.arena_peak / 4 + (16 << 20) + keep;
        if want >= before.arena {
            return Ok((before.arena, before.arena));
        }
        self.graphs.release();
        let after = self.dev.resize_arena(want)?;
        Ok((before.arena, after))
    }

    /// Whether encoder frames replay a CUDA graph, and if not, why.
    pub fn graph_status(&self) -> String {
        self.graphs.status()
    }

    pub(super) fn device(&self) -> &Device {
        &self.dev
    }

    pub(super) fn graphs(&self) -> &FrameGraphs {
        &self.graphs
    }

    pub fn precision(&self) -> MmaPrecision {
        self.dev.options.precision
    }

    /// Waits for all queued work (for timing).
    pub fn synchronize(&self) -> Result<()> {
        self.dev.sync()
    }

    /// Runs `run` with every launch timed by device events and its work counted, and returns the
    /// launches it made (`cuda::profile`). Encoder frames run kernel by kernel meanwhile, as a
    /// graph's launches cannot be timed one by one; launches other threads make on this backend
    /// in that time are in the profile too.
    pub fn profile_kernels<T>(&self, run: impl FnOnce() -> Result<T>) -> Result<(T, KernelProfile)> {
        self.dev.set_profiling(true);
        let out = run();
        self.dev.set_profiling(false);
        // Read (and drop) the events even when `run` failed, so the next profile starts empty.
        let profile = self.dev.take_profile();
        Ok((out?, profile?))
    }

    pub(super) fn tensor(&self, shape: Vec<usize>) -> Result<CudaTensor> {
        // The kernels index inside tensors with 32-bit integers.
        let numel: usize = shape.iter().product();
        if numel > i32::MAX as usize {
            return Err(Error::Backend(format!("tensor {shape:?} has {numel} elements; the CUDA kernels take at most 2^31 - 1")));
        }
        let block = self.dev.alloc(shape.iter().product())?;
        Ok(CudaTensor { shape, block })
    }

    /// A view of an activation tensor as a B operand (f32).
    fn tensor_ref(t: &CudaTensor) -> WeightRef {
        WeightRef { data: t.ptr(), absq: 0, scales: 0, kind: W_F32 }
    }

    /// Whether a GEMM of depth `k` runs on the tensor-core body (which alone can fuse LoRA's x·Aᵀ).
    fn gemm_on_tensor_cores(&self, k: i64) -> bool {
        self.dev.options.precision != MmaPrecision::F32 && k >= 32
    }

    /// Launches one GEMM; the caller filled every geometric field of `p` and counted its `work`.
    fn gemm(&self, p: &GemmParams, kind: i64, work: Work) -> Result<()> {
        if p.m == 0 || p.n == 0 || p.batch_count == 0 {
            return Ok(());
        }
        let (gx, gy) = ((p.n as u64).div_ceil(64), (p.m as u64).div_ceil(64));
        if gx > i32::MAX as u64 || gy > 65_535 || p.batch_count > 65_535 {
            return Err(Error::Backend(format!("GEMM of {} x {} x {} (batch {}) exceeds the launch grid", p.m, p.n, p.k, p.batch_count)));
        }
        let tc = self.gemm_on_tensor_cores(p.k);
        let table = if tc { &self.dev.kernels.gemm_tc } else { &self.dev.kernels.gemm_simt };
        let cfg = LaunchConfig { grid_dim: (gx as u32, gy as u32, p.batch_count as u32), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
        self.dev.launch_record("gemm", &table[kind as usize], cfg, p, work)
    }

    /// `x[M, K] · wᵀ` with the optional LoRA term and epilogue, into a fresh `[.., N]`.
    fn linear_impl(&self, x: &CudaTensor, w: &CudaWeight, bias: Option<&CudaVector>, act: Activation, lora: Option<&Lora<Self>>) -> Result<CudaTensor> {
        let (m, k) = split_last("linear", &x.shape)?;
        let ws = expect_rank("linear", "weight", &w.shape, 2)?;
        let n = ws[0];
        if ws[1] != k {
            return Err(shape_err(format!("linear: input {:?} against weight {ws:?}", x.shape)));
        }
        if let Some(b) = bias {
            if b.shape != [n] {
                return Err(shape_err(format!("linear: bias {:?} is not [{n}]", b.shape)));
            }
        }
        let mut shape = x.shape.clone();
        *shape.last_mut().expect("rank >= 1 checked") = n;
        // LoRA: the tensor-core GEMM computes t = x·Aᵀ itself from the x tiles it stages (A f32,
        // rank <= 64) and adds scale·t·Bᵀ in its epilogue. Otherwise (the f32 CUDA-core body,
        // K < 32, an fp16/NF4 A or a rank above 64) t ([M, r], small) is a GEMM of its own first.
        let mut fused = false;
        let lora_t = match lora {
            Some(l) => {
                let (a_s, b_s) = (&l.a.shape, &l.b.shape);
                if a_s.len() != 2 || b_s.len() != 2 || a_s[0] != l.rank || a_s[1] != k || b_s[0] != n || b_s[1] != l.rank {
                    return Err(shape_err(format!("linear_lora: A {a_s:?} / B {b_s:?} are not [{}, {k}] / [{n}, {}]", l.rank, l.rank)));
                }
                fused = self.gemm_on_tensor_cores(as_i64(k)) && l.a.kind == W_F32 && l.rank <= 64;
                if fused { None } else { Some(self.linear_impl(x, &l.a, None, Activation::None, None)?) }
            }
            None => None,
        };
        let out = self.tensor(shape)?;
        let mut p = GemmParams {
            m: as_i64(m),
            n: as_i64(n),
            k: as_i64(k),
            batch_count: 1,
            a: x.ptr(),
            a_mode: A_ROWMAJOR,
            lda: as_i64(k),
            b: w.wref,
            sbn: as_i64(k),
            sbk: 1,
            c: out.ptr(),
            c_mode: C_ROWMAJOR,
            ldc: as_i64(n),
            bias: bias.map_or(0, |b| b.param.ptr),
            bias_div: 1,
            act: act_code(act),
            ..Default::default()
        };
        // x read, y written, W and the bias read once: CostMeter's linear (which leaves the bias out).
        let mut work = Work::compute(2 * (m * n * k) as u64, m * k + m * n, w.bytes + param_bytes(bias));
        if let Some(l) = lora {
            let r = l.rank;
            // The LoRA update's FLOPs add up to CostMeter's (its default `linear_lora`: x·Aᵀ, then
            // t·Bᵀ), but not its bytes: the meter prices six operations and their intermediates,
            // the fused GEMM reads A and B and writes nothing more.
            match (&lora_t, fused) {
                (_, true) => {
                    p.lora_a = l.a.wref.data;
                    work = work.plus(Work::compute(2 * (m * r * (k + n)) as u64, 0, l.a.bytes + l.b.bytes));
                }
                (Some(t), false) => {
                    // x·Aᵀ was its own GEMM above (and counted there); this one reads t.
                    p.lora_t = t.ptr();
                    work = work.plus(Work::compute(2 * (m * r * n) as u64, m * r, l.b.bytes));
                }
                (None, false) => unreachable!("an unfused LoRA has its t"),
            }
            p.lora_b = l.b.wref;
            p.lora_r = as_i64(r);
            p.lora_scale = l.scale;
        }
        self.gemm(&p, w.kind, work)?;
        Ok(out)
    }

    fn add_impl(&self, op: &str, a: &CudaTensor, b_shape: &[usize], b_ptr: u64) -> Result<CudaTensor> {
        if b_shape.len() > a.shape.len() || a.shape[a.shape.len() - b_shape.len()..] != *b_shape {
            return Err(shape_err(format!("{op}: shape {b_shape:?} is not a suffix of {:?}", a.shape)));
        }
        let out = self.tensor(a.shape.clone())?;
        let (n, blen) = (a.numel(), b_shape.iter().product::<usize>());
        if n > 0 {
            let args = [Arg::U64(a.ptr()), Arg::U64(b_ptr), Arg::U64(out.ptr()), Arg::I64(as_i64(n)), Arg::I64(as_i64(blen.max(1)))];
            // `b` read once however often it is broadcast (CostMeter leaves a vector's out).
            self.dev.launch_args(op, &self.dev.kernels.add_broadcast, grid_for(n), &args, Work::traffic(2 * n + blen))?;
        }
        Ok(out)
    }

    fn scale_act(&self, a: &CudaTensor, s: f32, act: Activation) -> Result<CudaTensor> {
        let out = self.tensor(a.shape.clone())?;
        let n = a.numel();
        if n > 0 {
            let args = [Arg::U64(a.ptr()), Arg::U64(out.ptr()), Arg::I64(as_i64(n)), Arg::F32(s), Arg::I64(act_code(act))];
            self.dev.launch_args("scale_act", &self.dev.kernels.scale_act, grid_for(n), &args, Work::traffic(2 * n))?;
        }
        Ok(out)
    }

    /// `dst[b, dst_off.., r] = src[b, src_off.., r]` (see `copy_block` in elementwise.cu).
    #[allow(clippy::too_many_arguments)]
    fn copy_block(&self, src: u64, dst: u64, outer: usize, len: usize, inner: usize, src_dim: usize, src_off: usize, dst_dim: usize, dst_off: usize) -> Result<()> {
        let n = outer * len * inner;
        if n == 0 {
            return Ok(());
        }
        let args = [
            Arg::U64(src),
            Arg::U64(dst),
            Arg::I64(as_i64(outer)),
            Arg::I64(as_i64(len)),
            Arg::I64(as_i64(inner)),
            Arg::I64(as_i64(src_dim)),
            Arg::I64(as_i64(src_off)),
            Arg::I64(as_i64(dst_dim)),
            Arg::I64(as_i64(dst_off)),
        ];
        // Reads only what it copies (as CostMeter prices `narrow`; `concat` adds up the same).
        self.dev.launch_args("copy_block", &self.dev.kernels.copy_block, grid_for(n), &args, Work::traffic(2 * n))
    }
}

/// Checks a stored payload against its shape (same rule as the CPU backend) so no kernel can
/// index past an upload.
fn check_payload(t: &StoredTensor) -> Result<()> {
    let numel: usize = t.shape.iter().product();
    let problem = match &t.data {
        TensorData::F32(v) if v.len() != numel => Some(format!("{} f32 values", v.len())),
        TensorData::F16(b) if b.len() != 2 * numel => Some(format!("{} fp16 bytes", b.len())),
        TensorData::Nf4(q) => {
            let view = minisam_kernels::nf4::Nf4View { codes: q.codes.as_slice(), absmax_q: q.absmax_q.as_slice(), absmax_scales: q.absmax_scales.as_slice() };
            view.check_len(numel).err()
        }
        _ => None,
    };
    match problem {
        Some(p) => Err(shape_err(format!("tensor {} of shape {:?}: {p}", t.name, t.shape))),
        None => Ok(()),
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

impl Backend for CudaBackend {
    type Tensor = CudaTensor;
    type Weight = CudaWeight;
    type Vector = CudaVector;

    fn name(&self) -> &'static str {
        "cuda"
    }
    fn numerics(&self) -> String {
        format!("cuda-{}", self.precision().name())
    }

    fn weight(&self, t: &StoredTensor) -> Result<CudaWeight> {
        check_payload(t)?;
        let (kind, parts) = match &t.data {
            TensorData::F32(v) => (W_F32, vec![self.dev.upload_param(&t.name, &f32_bytes(v))?]),
            TensorData::F16(b) => (W_F16, vec![self.dev.upload_param(&t.name, b.as_slice())?]),
            TensorData::Nf4(q) => (
                W_NF4,
                vec![
                    self.dev.upload_param(&t.name, q.codes.as_slice())?,
                    self.dev.upload_param(&t.name, q.absmax_q.as_slice())?,
                    self.dev.upload_param(&t.name, q.absmax_scales.as_slice())?,
                ],
            ),
        };
        let wref = WeightRef { data: parts[0].ptr, absq: parts.get(1).map_or(0, |p| p.ptr), scales: parts.get(2).map_or(0, |p| p.ptr), kind };
        Ok(CudaWeight { shape: t.shape.clone(), kind, bytes: crate::cost::stored_bytes(t), _parts: parts, wref })
    }

    fn vector(&self, t: &StoredTensor) -> Result<CudaVector> {
        check_payload(t)?;
        let param = self.dev.upload_param(&t.name, &f32_bytes(&t.to_f32()))?;
        Ok(CudaVector { shape: t.shape.clone(), param })
    }

    fn vector_from_host(&self, shape: &[usize], data: &[f32]) -> Result<CudaVector> {
        let numel: usize = shape.iter().product();
        if numel != data.len() {
            return Err(shape_err(format!("vector_from_host: shape {shape:?} needs {numel} elements, got {}", data.len())));
        }
        let param = self.dev.upload_param("a derived parameter", &f32_bytes(data))?;
        Ok(CudaVector { shape: shape.to_vec(), param })
    }

    fn vector_shape<'a>(&self, v: &'a CudaVector) -> &'a [usize] {
        &v.shape
    }

    fn from_host(&self, shape: &[usize], data: &[f32]) -> Result<CudaTensor> {
        let numel: usize = shape.iter().product();
        if numel != data.len() {
            return Err(shape_err(format!("from_host: shape {shape:?} needs {numel} elements, got {}", data.len())));
        }
        let t = self.tensor(shape.to_vec())?;
        self.dev.upload_f32(t.ptr(), data)?;
        Ok(t)
    }

    fn to_host(&self, t: &CudaTensor) -> Result<Vec<f32>> {
        self.dev.download_f32(t.ptr(), t.numel())
    }

    fn shape<'a>(&self, t: &'a CudaTensor) -> &'a [usize] {
        &t.shape
    }

    fn tensor_from_vector(&self, v: &CudaVector) -> Result<CudaTensor> {
        let t = self.tensor(v.shape.clone())?;
        self.dev.copy_d2d(t.ptr(), v.param.ptr, t.numel())?;
        Ok(t)
    }

    fn reshape(&self, mut t: CudaTensor, shape: &[usize]) -> Result<CudaTensor> {
        if shape.iter().product::<usize>() != t.numel() {
            return Err(shape_err(format!("reshape: cannot view {:?} as {shape:?}", t.shape)));
        }
        t.shape = shape.to_vec();
        Ok(t)
    }

    fn permute(&self, t: &CudaTensor, perm: &[usize]) -> Result<CudaTensor> {
        let rank = t.shape.len();
        let mut seen = vec![false; rank];
        if perm.len() != rank || perm.iter().any(|&p| p >= rank || std::mem::replace(&mut seen[p], true)) {
            return Err(shape_err(format!("permute: {perm:?} is not a permutation of the axes of {:?}", t.shape)));
        }
        if rank > MAX_RANK {
            return Err(shape_err(format!("permute: rank {rank} above the CUDA kernel's {MAX_RANK}")));
        }
        let out_shape: Vec<usize> = perm.iter().map(|&p| t.shape[p]).collect();
        let out = self.tensor(out_shape.clone())?;
        let n = t.numel();
        if n == 0 {
            return Ok(out);
        }
        let mut strides = vec![1usize; rank];
        for i in (0..rank.saturating_sub(1)).rev() {
            strides[i] = strides[i + 1] * t.shape[i + 1];
        }
        let mut p = PermuteParams { rank: as_i64(rank), n: as_i64(n), ..Default::default() };
        for (axis, &src_axis) in perm.iter().enumerate() {
            p.out_shape[axis] = as_i64(out_shape[axis]);
            p.src_stride[axis] = as_i64(strides[src_axis]);
        }
        let args = [Arg::U64(t.ptr()), Arg::U64(out.ptr()), Arg::record(&p)];
        self.dev.launch_args("permute", &self.dev.kernels.permute, grid_for(n), &args, Work::traffic(2 * n))?;
        Ok(out)
    }

    fn narrow(&self, t: &CudaTensor, axis: usize, start: usize, len: usize) -> Result<CudaTensor> {
        let dim = match t.shape.get(axis) {
            Some(&d) => d,
            None => return Err(shape_err(format!("narrow: axis {axis} out of range for {:?}", t.shape))),
        };
        if start.checked_add(len).is_none_or(|end| end > dim) {
            return Err(shape_err(format!("narrow: {start}..{start}+{len} outside axis {axis} of {:?}", t.shape)));
        }
        let outer: usize = t.shape[..axis].iter().product();
        let inner: usize = t.shape[axis + 1..].iter().product();
        let mut shape = t.shape.clone();
        shape[axis] = len;
        let out = self.tensor(shape)?;
        self.copy_block(t.ptr(), out.ptr(), outer, len, inner, dim, start, len, 0)?;
        Ok(out)
    }

    fn concat(&self, ts: &[&CudaTensor], axis: usize) -> Result<CudaTensor> {
        let first = ts.first().ok_or_else(|| shape_err("concat: no tensors".into()))?;
        if axis >= first.shape.len() {
            return Err(shape_err(format!("concat: axis {axis} out of range for {:?}", first.shape)));
        }
        for t in ts {
            let same_rank = t.shape.len() == first.shape.len();
            if !same_rank || t.shape.iter().zip(&first.shape).enumerate().any(|(i, (a, b))| i != axis && a != b) {
                return Err(shape_err(format!("concat along {axis}: {:?} does not match {:?}", t.shape, first.shape)));
            }
        }
        let outer: usize = first.shape[..axis].iter().product();
        let inner: usize = first.shape[axis + 1..].iter().product();
        let total: usize = ts.iter().map(|t| t.shape[axis]).sum();
        let mut shape = first.shape.clone();
        shape[axis] = total;
        let out = self.tensor(shape)?;
        let mut at = 0;
        for t in ts {
            let len = t.shape[axis];
            self.copy_block(t.ptr(), out.ptr(), outer, len, inner, len, 0, total, at)?;
            at += len;
        }
        Ok(out)
    }

    fn pad_hw(&self, t: &CudaTensor, pad_h: usize, pad_w: usize) -> Result<CudaTensor> {
        let s = expect_rank("pad_hw", "input", &t.shape, 4)?;
        let (b, h, w, c) = (s[0], s[1], s[2], s[3]);
        let (oh, ow) = (h + pad_h, w + pad_w);
        let out = self.tensor(vec![b, oh, ow, c])?;
        let n = b * oh * ow * c;
        if n > 0 {
            let args = [b, h, w, c, oh, ow].map(|v| Arg::I64(as_i64(v)));
            let mut all = vec![Arg::U64(t.ptr()), Arg::U64(out.ptr())];
            all.extend(args);
            self.dev.launch_args("pad_hw", &self.dev.kernels.pad_hw, grid_for(n), &all, Work::traffic(b * h * w * c + n))?;
        }
        Ok(out)
    }

    fn linear(&self, x: &CudaTensor, w: &CudaWeight, bias: Option<&CudaVector>, act: Activation) -> Result<CudaTensor> {
        self.linear_impl(x, w, bias, act, None)
    }

    /// One fused kernel for the base product, bias, LoRA update and activation (after a small
    /// GEMM for `x·Aᵀ`), instead of the default's six operations.
    fn linear_lora(&self, x: &CudaTensor, w: &CudaWeight, bias: Option<&CudaVector>, act: Activation, lora: Option<&Lora<Self>>) -> Result<CudaTensor> {
        self.linear_impl(x, w, bias, act, lora)
    }

    fn matmul(&self, a: &CudaTensor, b: &CudaTensor, transpose_b: bool) -> Result<CudaTensor> {
        let sa = expect_rank("matmul", "a", &a.shape, 3)?;
        let sb = expect_rank("matmul", "b", &b.shape, 3)?;
        let (batch, m, k) = (sa[0], sa[1], sa[2]);
        let (b_k, n) = if transpose_b { (sb[2], sb[1]) } else { (sb[1], sb[2]) };
        if sb[0] != batch || b_k != k {
            return Err(shape_err(format!("matmul: {sa:?} by {sb:?} (transpose_b = {transpose_b})")));
        }
        let out = self.tensor(vec![batch, m, n])?;
        let (sbn, sbk) = if transpose_b { (k, 1) } else { (1, n) };
        let p = GemmParams {
            m: as_i64(m),
            n: as_i64(n),
            k: as_i64(k),
            batch_count: as_i64(batch),
            a: a.ptr(),
            a_mode: A_ROWMAJOR,
            lda: as_i64(k),
            a_batch: as_i64(m * k),
            b: Self::tensor_ref(b),
            sbn: as_i64(sbn),
            sbk: as_i64(sbk),
            b_batch: as_i64(k * n),
            c: out.ptr(),
            c_mode: C_ROWMAJOR,
            ldc: as_i64(n),
            c_batch: as_i64(m * n),
            bias_div: 1,
            ..Default::default()
        };
        // Both operands are activations.
        let work = Work::compute(2 * (batch * m * n * k) as u64, batch * (m * k + k * n + m * n), 0);
        self.gemm(&p, W_F32, work)?;
        Ok(out)
    }

    fn conv2d(&self, x: &CudaTensor, w: &CudaWeight, bias: Option<&CudaVector>, spec: Conv2dSpec, act: Activation) -> Result<CudaTensor> {
        let xs = expect_rank("conv2d", "input", &x.shape, 4)?;
        let ws = expect_rank("conv2d", "weight", &w.shape, 4)?;
        let (batch, c_in, h, wd) = (xs[0], xs[1], xs[2], xs[3]);
        let (c_out, kh, kw) = (ws[0], ws[2], ws[3]);
        let Conv2dSpec { stride, padding, groups } = spec;
        let bad_groups = groups == 0 || c_in % groups != 0 || c_out % groups != 0 || ws[1] * groups != c_in;
        if bad_groups || stride == 0 || kh == 0 || kw == 0 || h + 2 * padding < kh || wd + 2 * padding < kw {
            return Err(shape_err(format!("conv2d: input {xs:?}, weight {ws:?}, {spec:?}")));
        }
        if let Some(b) = bias {
            if b.shape != [c_out] {
                return Err(shape_err(format!("conv2d: bias {:?} is not [{c_out}]", b.shape)));
            }
        }
        let (oh, ow) = ((h + 2 * padding - kh) / stride + 1, (wd + 2 * padding - kw) / stride + 1);
        let out = self.tensor(vec![batch, c_out, oh, ow])?;
        let bias_ptr = bias.map_or(0, |b| b.param.ptr);
        // Each output element is c_in/groups·kh·kw multiply-adds on either path (CostMeter's count).
        let outputs = batch * c_out * oh * ow;
        let work = Work::compute(2 * (outputs * (c_in / groups) * kh * kw) as u64, batch * c_in * h * wd + outputs, w.bytes + param_bytes(bias));
        if groups == 1 {
            // Implicit GEMM: M = output pixels, N = output channels, K = c_in·kh·kw.
            let k = c_in * kh * kw;
            let p = GemmParams {
                m: as_i64(batch * oh * ow),
                n: as_i64(c_out),
                k: as_i64(k),
                batch_count: 1,
                a: x.ptr(),
                a_mode: A_IM2COL,
                cin: as_i64(c_in),
                h: as_i64(h),
                w: as_i64(wd),
                kh: as_i64(kh),
                kw: as_i64(kw),
                stride: as_i64(stride),
                pad: as_i64(padding),
                oh: as_i64(oh),
                ow: as_i64(ow),
                b: w.wref,
                sbn: as_i64(k),
                sbk: 1,
                c: out.ptr(),
                c_mode: C_NCHW,
                bias: bias_ptr,
                bias_div: 1,
                act: act_code(act),
                ..Default::default()
            };
            self.gemm(&p, w.kind, work)?;
        } else {
            let n = batch * c_out * oh * ow;
            if n > 0 {
                let p = ConvParams {
                    x: x.ptr(),
                    out: out.ptr(),
                    w: w.wref,
                    bias: bias_ptr,
                    batch: as_i64(batch),
                    cin: as_i64(c_in),
                    h: as_i64(h),
                    w_: as_i64(wd),
                    cout: as_i64(c_out),
                    kh: as_i64(kh),
                    kw: as_i64(kw),
                    stride: as_i64(stride),
                    pad: as_i64(padding),
                    groups: as_i64(groups),
                    oh: as_i64(oh),
                    ow: as_i64(ow),
                    act: act_code(act),
                };
                self.dev.launch_record("conv2d_direct", &self.dev.kernels.conv2d_direct, grid_for(n), &p, work)?;
            }
        }
        Ok(out)
    }

    fn conv_transpose2d(&self, x: &CudaTensor, w: &CudaWeight, bias: Option<&CudaVector>, stride: usize) -> Result<CudaTensor> {
        let xs = expect_rank("conv_transpose2d", "input", &x.shape, 4)?;
        let ws = expect_rank("conv_transpose2d", "weight", &w.shape, 4)?;
        let (batch, c_in, h, wd) = (xs[0], xs[1], xs[2], xs[3]);
        let (c_out, k) = (ws[1], ws[2]);
        if ws[0] != c_in || ws[3] != k || k == 0 || stride != k {
            return Err(shape_err(format!(
                "conv_transpose2d: input {xs:?}, weight {ws:?}, stride {stride} (kernel must be square and equal the stride)"
            )));
        }
        if let Some(b) = bias {
            if b.shape != [c_out] {
                return Err(shape_err(format!("conv_transpose2d: bias {:?} is not [{c_out}]", b.shape)));
            }
        }
        let out = self.tensor(vec![batch, c_out, h * k, wd * k])?;
        // GEMM over input pixels (M) x (c_out, ky, kx) (N) x c_in (K); A read straight from NCHW
        // as a 1x1 implicit im2col, B(n, ci) = w[ci, n], scattered to k x k patches on store.
        let n = c_out * k * k;
        let p = GemmParams {
            m: as_i64(batch * h * wd),
            n: as_i64(n),
            k: as_i64(c_in),
            batch_count: 1,
            a: x.ptr(),
            a_mode: A_IM2COL,
            cin: as_i64(c_in),
            h: as_i64(h),
            w: as_i64(wd),
            kh: 1,
            kw: 1,
            stride: 1,
            pad: 0,
            oh: as_i64(h),
            ow: as_i64(wd),
            b: w.wref,
            sbn: 1,
            sbk: as_i64(n),
            c: out.ptr(),
            c_mode: C_CONVT,
            ct_k: as_i64(k),
            bias: bias.map_or(0, |b| b.param.ptr),
            bias_div: as_i64(k * k),
            ..Default::default()
        };
        // 2·M·N·K = 2·(output elements)·c_in: CostMeter's count.
        let work = Work::compute(2 * (batch * h * wd * n * c_in) as u64, batch * c_in * h * wd + batch * n * h * wd, w.bytes + param_bytes(bias));
        self.gemm(&p, w.kind, work)?;
        Ok(out)
    }

    fn layer_norm(&self, x: &CudaTensor, gamma: &CudaVector, beta: &CudaVector, eps: f32) -> Result<CudaTensor> {
        let (rows, dim) = split_last("layer_norm", &x.shape)?;
        if gamma.shape != [dim] || beta.shape != [dim] {
            return Err(shape_err(format!("layer_norm: input {:?}, gamma {:?}, beta {:?}", x.shape, gamma.shape, beta.shape)));
        }
        let out = self.tensor(x.shape.clone())?;
        if rows > 0 && dim > 0 {
            let blocks = rows.div_ceil(4);
            if blocks > i32::MAX as usize {
                return Err(Error::Backend(format!("layer_norm: {rows} rows exceed the launch grid")));
            }
            let cfg = LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
            let args = [Arg::U64(x.ptr()), Arg::U64(out.ptr()), Arg::U64(gamma.param.ptr), Arg::U64(beta.param.ptr), Arg::I64(as_i64(rows)), Arg::I64(as_i64(dim)), Arg::F32(eps)];
            // The affine parameters are read too (CostMeter leaves them out).
            let work = Work::traffic(2 * rows * dim).plus(Work::compute(0, 0, gamma.bytes() + beta.bytes()));
            self.dev.launch_args("layer_norm_rows", &self.dev.kernels.layer_norm_rows, cfg, &args, work)?;
        }
        Ok(out)
    }

    fn layer_norm_nchw(&self, x: &CudaTensor, gamma: &CudaVector, beta: &CudaVector, eps: f32) -> Result<CudaTensor> {
        let xs = expect_rank("layer_norm_nchw", "input", &x.shape, 4)?;
        let (batch, channels, spatial) = (xs[0], xs[1], xs[2] * xs[3]);
        if gamma.shape != [channels] || beta.shape != [channels] {
            return Err(shape_err(format!("layer_norm_nchw: input {xs:?}, gamma {:?}, beta {:?}", gamma.shape, beta.shape)));
        }
        let out = self.tensor(x.shape.clone())?;
        let n = batch * spatial;
        if n > 0 && channels > 0 {
            let cfg = LaunchConfig { grid_dim: (n.div_ceil(128) as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
            let args = [
                Arg::U64(x.ptr()),
                Arg::U64(out.ptr()),
                Arg::U64(gamma.param.ptr),
                Arg::U64(beta.param.ptr),
                Arg::I64(as_i64(batch)),
                Arg::I64(as_i64(channels)),
                Arg::I64(as_i64(spatial)),
                Arg::F32(eps),
            ];
            let work = Work::traffic(2 * batch * channels * spatial).plus(Work::compute(0, 0, gamma.bytes() + beta.bytes()));
            self.dev.launch_args("layer_norm_nchw", &self.dev.kernels.layer_norm_nchw, cfg, &args, work)?;
        }
        Ok(out)
    }

    fn activation(&self, x: &CudaTensor, act: Activation) -> Result<CudaTensor> {
        self.scale_act(x, 1.0, act)
    }

    fn add(&self, a: &CudaTensor, b: &CudaTensor) -> Result<CudaTensor> {
        self.add_impl("add", a, &b.shape, b.ptr())
    }

    fn add_vector(&self, a: &CudaTensor, v: &CudaVector) -> Result<CudaTensor> {
        self.add_impl("add_vector", a, &v.shape, v.param.ptr)
    }

    fn scale(&self, a: &CudaTensor, s: f32) -> Result<CudaTensor> {
        self.scale_act(a, s, Activation::None)
    }

    fn attention(&self, q: &CudaTensor, k: &CudaTensor, v: &CudaTensor, scale: f32, bias: AttentionBias<'_, Self>) -> Result<CudaTensor> {
        let qs = expect_rank("attention", "q", &q.shape, 3)?;
        let ks = expect_rank("attention", "k", &k.shape, 3)?;
        let (bh, nq, d) = (qs[0], qs[1], qs[2]);
        let nk = ks[1];
        if ks[0] != bh || ks[2] != d || v.shape != ks {
            return Err(shape_err(format!("attention: q {qs:?}, k {ks:?}, v {:?}", v.shape)));
        }
        let mut p = AttnParams {
            q: q.ptr(),
            k: k.ptr(),
            v: v.ptr(),
            bh: as_i64(bh),
            nq: as_i64(nq),
            nk: as_i64(nk),
            d: as_i64(d),
            scale,
            ..Default::default()
        };
        // The bias inputs are read once each (CostMeter leaves them out).
        let bias_bytes = match bias {
            AttentionBias::None => 0,
            AttentionBias::Table(table) => {
                let s = &table.shape;
                if s.len() != 3 || s[0] == 0 || s[1] != nq || s[2] != nk {
                    return Err(shape_err(format!("attention: bias table {s:?} is not [heads, {nq}, {nk}]")));
                }
                p.bias_mode = 1;
                p.table = table.param.ptr;
                p.heads = as_i64(s[0]);
                table.bytes()
            }
            AttentionBias::DecomposedRelPos { rel_h, rel_w } => {
                let (sh, sw) = (&rel_h.shape, &rel_w.shape);
                if sh.len() != 3 || sw.len() != 3 || sh[0] != bh || sw[0] != bh || sh[1] != nq || sw[1] != nq || sh[2] * sw[2] != nk {
                    return Err(shape_err(format!("attention: rel_h {sh:?} / rel_w {sw:?} are not [{bh}, {nq}, kh] / [{bh}, {nq}, kw] with kh*kw = {nk}")));
                }
                p.bias_mode = 2;
                p.rel_h = rel_h.ptr();
                p.rel_w = rel_w.ptr();
                p.kh = as_i64(sh[2]);
                p.kw = as_i64(sw[2]);
                ACTIVATION_BYTES * (rel_h.numel() + rel_w.numel()) as u64
            }
        };
        // The tensor cores in the GEMMs' tensor-core modes, for head dims of at least one k16 step
        // (the models' 16, 32, 64, 80): 64 query rows per block. Below 16 (the tiny decoders' 2-
        // and 4-wide heads) most of each mma would multiply padding; above 80, and in the f32
        // mode, the f32 kernel: 128 query rows per block.
        let tc = self.dev.options.precision != MmaPrecision::F32 && d >= 16;
        let tc_kernel = if tc { self.dev.kernels.attention_tc.iter().find(|(dp, _)| d <= *dp) } else { None };
        let (kernel, rows_per_block) = match tc_kernel {
            Some((_, kernel)) => (kernel, 64),
            None => match self.dev.kernels.attention.iter().find(|(dp, _)| d <= *dp) {
                Some((_, kernel)) => (kernel, 128),
                None => return Err(Error::Backend(format!("attention: head dim {d} above the CUDA kernel's 128"))),
            },
        };
        let out = self.tensor(q.shape.clone())?;
        p.out = out.ptr();
        if bh > 0 && nq > 0 && d > 0 {
            if bh > 65_535 {
                return Err(Error::Backend(format!("attention: {bh} batch-heads exceed the launch grid")));
            }
            let cfg = LaunchConfig { grid_dim: (nq.div_ceil(rows_per_block) as u32, bh as u32, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
            // q·kᵀ and p·v, 2·nq·nk·d each per batch-head (CostMeter's count); q, k, v read and o
            // written once, and the bias inputs.
            let work = Work::compute(4 * (bh * nq * nk * d) as u64, 2 * bh * nq * d + 2 * bh * nk * d, bias_bytes);
            self.dev.launch_record("attention", kernel, cfg, &p, work)?;
        }
        Ok(out)
    }

    fn resize_bilinear(&self, x: &CudaTensor, out_h: usize, out_w: usize) -> Result<CudaTensor> {
        let rank = x.shape.len();
        if rank < 2 || x.shape[rank - 2] == 0 || x.shape[rank - 1] == 0 {
            return Err(shape_err(format!("resize_bilinear: input {:?} has no [.., H, W] planes", x.shape)));
        }
        let (h, w) = (x.shape[rank - 2], x.shape[rank - 1]);
        let planes: usize = x.shape[..rank - 2].iter().product();
        let mut shape = x.shape.clone();
        shape[rank - 2] = out_h;
        shape[rank - 1] = out_w;
        let out = self.tensor(shape)?;
        let n = planes * out_h * out_w;
        if n > 0 {
            let args = [Arg::U64(x.ptr()), Arg::U64(out.ptr())].into_iter().chain([planes, h, w, out_h, out_w].map(|v| Arg::I64(as_i64(v)))).collect::<Vec<_>>();
            self.dev.launch_args("resize_bilinear", &self.dev.kernels.resize_bilinear, grid_for(n), &args, Work::traffic(planes * h * w + n))?;
        }
        Ok(out)
    }

    fn run_frame(&self, key: u64, shape: &[usize], input: &[f32], f: FrameFn<'_, Self>) -> Result<CudaTensor> {
        self.run_frame_graphed(key, shape, input, f)
    }
}

// The backend is shared across threads behind `&`; the device state is either immutable after
// start-up or behind mutexes.
const _: fn() = || {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<CudaBackend>();
    assert_send_sync::<CudaTensor>();
    assert_send_sync::<Arc<CudaWeight>>();
};
