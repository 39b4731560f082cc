//! The reference [`Backend`]: every operation on the host, in f32, through `minisam_kernels`.
//!
//! It exists so that the networks can be checked (and run) without a GPU, and so that a GPU
//! backend has something to be compared against operation by operation. Weights stay in their
//! stored precision (the kernels dequantise tile by tile); tensors are plain row-major `Vec<f32>`.
//! Every operation checks its shapes and returns [`Error::Shape`] with the shapes it was given,
//! so a wiring mistake in a network reads as a message rather than a panic deep in a kernel.
//! All work runs inside the backend's own rayon pool, so several backends (or a host
//! application's own rayon work) do not fight over threads.

use std::sync::{Arc, OnceLock};

use rayon::prelude::*;

use minisam_kernels::attention::{self, Bias};
use minisam_kernels::depthwise_nhwc;
use minisam_kernels::inverted_residual::{self, InvertedResidualWeights};
use minisam_kernels::upscale::{self, UpscalingWeights};
use minisam_kernels::{activation, conv, gemm, norm, resize, MatrixRef};

use crate::backend::{Activation, AttentionBias, Backend, Conv2dSpec, InvertedResidual, Lora, OutputUpscaling};
use crate::buffer_pool::BufferPool;
use crate::store::{StoredTensor, TensorData};
use crate::{Error, Result};

/// A host tensor: row-major, contiguous. Tensors made by a [`CpuBackend`] give their buffer back
/// to its pool when dropped (see `crate::buffer_pool`).
#[derive(Clone, Debug)]
pub struct CpuTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
    recycle: Option<Arc<BufferPool>>,
}

impl PartialEq for CpuTensor {
    fn eq(&self, other: &Self) -> bool {
        self.shape == other.shape && self.data == other.data
    }
}

impl Drop for CpuTensor {
    fn drop(&mut self) {
        if let Some(pool) = &self.recycle {
            pool.give(std::mem::take(&mut self.data));
        }
    }
}

impl CpuTensor {
    /// A tensor, if `data` holds exactly the elements `shape` needs.
    // shape: any rank; data: [product of shape].
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Result<Self> {
        let numel: usize = shape.iter().product();
        if numel != data.len() {
            return Err(Error::Shape(format!("shape {shape:?} needs {numel} elements, got {}", data.len())));
        }
        Ok(Self { shape, data, recycle: None })
    }
}

/// A weight in its stored precision.
#[derive(Clone, Debug)]
pub struct CpuWeight {
    pub shape: Vec<usize>,
    pub data: TensorData,
    /// `data` in f32, made the first time a linear reads the weight with few rows (see
    /// [`CpuWeight::matrix_for_rows`]).
    few_rows: OnceLock<Vec<f32>>,
}

impl CpuWeight {
    /// A weight of `shape` holding `data` (checked by the caller).
    pub fn new(shape: Vec<usize>, data: TensorData) -> Self {
        Self { shape, data, few_rows: OnceLock::new() }
    }

    /// The borrowed view the kernels take.
    pub fn matrix(&self) -> MatrixRef<'_> {
        match &self.data {
            TensorData::F32(v) => MatrixRef::F32(v),
            TensorData::F16(bytes) => MatrixRef::F16(bytes.as_slice()),
            TensorData::Nf4(q) => MatrixRef::Nf4(q.view()),
        }
    }

    /// The view a linear over `rows` rows of input reads. With fewer rows than the kernels'
    /// packed GEMM takes, the product dequantises every weight tile for a handful of rows, and
    /// for the mask decoder's token-side layers (7 tokens) that dequantisation was about a tenth
    /// of a decode; so such a weight is dequantised once, on first use, and kept in f32. This
    /// trades memory for it: for SAM's decoder about 14 MiB, only the weights that see few rows
    /// (the image encoder's never do). The f32 values are the dequantised ones, so the products
    /// are the same bits.
    pub fn matrix_for_rows(&self, rows: usize) -> MatrixRef<'_> {
        if rows >= gemm::PACKED_MIN_ROWS || matches!(self.data, TensorData::F32(_)) {
            return self.matrix();
        }
        MatrixRef::F32(self.few_rows.get_or_init(|| {
            let mut values = vec![0.0; self.shape.iter().product()];
            self.matrix().dequantize_range(0, &mut values);
            values
        }))
    }
}

/// The CPU backend; owns its thread pool.
pub struct CpuBackend {
    pool: rayon::ThreadPool,
    buffers: Arc<BufferPool>,
}

impl CpuBackend {
    /// A backend running on `threads` threads (0: one per core).
    // threads: a count, 0 for the number of cores.
    pub fn new(threads: usize) -> Result<Self> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("minisam-cpu-{i}"))
            .build()
            .map_err(|e| Error::Backend(format!("cannot start {threads} CPU threads: {e}")))?;
        Ok(Self { pool, buffers: Arc::default() })
    }

    /// Activation buffers that had to be allocated because the pool had none that fitted: after
    /// the first frame of a given geometry this stops growing.
    pub fn fresh_allocations(&self) -> usize {
        self.buffers.fresh_allocations()
    }

    /// A zero-filled output buffer from the pool.
    fn buffer(&self, len: usize) -> Vec<f32> {
        self.buffers.take(len)
    }

    /// An output buffer from the pool for an op whose kernel writes every element: not zeroed
    /// (`BufferPool::take_for_overwrite`).
    fn buffer_for_overwrite(&self, len: usize) -> Vec<f32> {
        self.buffers.take_for_overwrite(len)
    }

    /// A pooled tensor, if `data` holds exactly the elements `shape` needs.
    fn tensor(&self, shape: Vec<usize>, data: Vec<f32>) -> Result<CpuTensor> {
        let mut t = CpuTensor::new(shape, data)?;
        t.recycle = Some(self.buffers.clone());
        Ok(t)
    }

    /// A pooled copy of `src`.
    fn copy_of(&self, shape: &[usize], src: &[f32]) -> Result<CpuTensor> {
        let mut data = self.buffer_for_overwrite(src.len());
        data.copy_from_slice(src);
        self.tensor(shape.to_vec(), data)
    }

    /// How many threads the backend's pool runs.
    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    /// Runs `op` inside the backend's pool, so that its rayon work uses these threads.
    // op: any closure; its result is returned unchanged.
    fn run<T: Send>(&self, op: impl FnOnce() -> T + Send) -> T {
        self.pool.install(op)
    }
}

impl Default for CpuBackend {
    /// One thread per core. Panics only if the OS refuses to start threads.
    fn default() -> Self {
        Self::new(0).expect("cannot start the CPU backend's thread pool")
    }
}

/// The kernels' activation enum for the networks' one.
// act: the network-side enum.
fn kernel_activation(act: Activation) -> activation::Activation {
    match act {
        Activation::None => activation::Activation::None,
        Activation::Gelu => activation::Activation::Gelu,
        Activation::Relu => activation::Activation::Relu,
    }
}

/// Checks that a stored payload holds exactly the bytes `shape` needs, so that kernels indexing
/// it cannot go out of bounds.
// shape: any rank; data: the payload claimed to have that shape.
fn check_payload(name: &str, shape: &[usize], data: &TensorData) -> Result<()> {
    let numel: usize = shape.iter().product();
    let problem = match data {
        TensorData::F32(v) if v.len() != numel => Some(format!("{} f32 values", v.len())),
        TensorData::F16(b) if b.len() != 2 * numel => Some(format!("{} fp16 bytes", b.len())),
        TensorData::Nf4(q) => q.view().check_len(numel).err(),
        _ => None,
    };
    match problem {
        Some(p) => Err(Error::Shape(format!("tensor {name} of shape {shape:?}: {p}"))),
        None => Ok(()),
    }
}

/// `(rows, last)` of a tensor whose last axis is `last`, for ops over the last axis.
// shape: rank >= 1.
fn split_last(op: &str, shape: &[usize]) -> Result<(usize, usize)> {
    match shape.split_last() {
        Some((&last, lead)) => Ok((lead.iter().product(), last)),
        None => Err(Error::Shape(format!("{op}: needs rank >= 1, got a scalar"))),
    }
}

/// `shape` if it has rank `rank`, else an error naming the op and the operand.
// shape: the operand's shape; rank: the rank the op needs.
fn expect_rank<'a>(op: &str, what: &str, shape: &'a [usize], rank: usize) -> Result<&'a [usize]> {
    if shape.len() != rank {
        return Err(Error::Shape(format!("{op}: {what} must have rank {rank}, got shape {shape:?}")));
    }
    Ok(shape)
}

/// Elements per task of the element-wise ops: 64 KiB, small enough to stay in L2 between the
/// copy and the operation, large enough that a task's overhead is noise, and fixed so that a
/// same-shape tensor is split over the threads too.
const ELEMENTWISE_CHUNK: usize = 1 << 14;

/// `a + b` broadcasting `b` over the leading axes of `a` (`b`'s shape a suffix of `a`'s).
// a: [.., s], b: [s] where s is any suffix of a's shape.
fn add_broadcast(be: &CpuBackend, op: &str, a: &CpuTensor, b_shape: &[usize], b: &[f32]) -> Result<CpuTensor> {
    if b_shape.len() > a.shape.len() || a.shape[a.shape.len() - b_shape.len()..] != *b_shape {
        return Err(Error::Shape(format!("{op}: shape {b_shape:?} is not a suffix of {:?}", a.shape)));
    }
    if b.is_empty() {
        return be.copy_of(&a.shape, &a.data);
    }
    // One pass writing `a + b` (a copy of `a` followed by `+= b` read and wrote it twice).
    let period = b.len();
    let mut out = be.buffer_for_overwrite(a.data.len());
    out.par_chunks_mut(ELEMENTWISE_CHUNK).zip(a.data.par_chunks(ELEMENTWISE_CHUNK)).enumerate().for_each(|(chunk, (dst, src))| {
        let (mut done, mut j) = (0, (chunk * ELEMENTWISE_CHUNK) % period);
        while done < dst.len() {
            let len = (period - j).min(dst.len() - done);
            for ((d, &x), &y) in dst[done..done + len].iter_mut().zip(&src[done..done + len]).zip(&b[j..j + len]) {
                *d = x + y;
            }
            done += len;
            j = 0;
        }
    });
    be.tensor(a.shape.clone(), out)
}

/// Row-major strides of `shape`.
// shape: any rank; returns [rank], the last stride 1.
fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// Materialised axis permutation: output axis `i` is input axis `perm[i]`.
// t: any rank r >= 1, perm: a permutation of 0..r.
fn permute_tensor(be: &CpuBackend, t: &CpuTensor, perm: &[usize]) -> Result<CpuTensor> {
    let rank = t.shape.len();
    let mut seen = vec![false; rank];
    if perm.len() != rank || perm.iter().any(|&p| p >= rank || std::mem::replace(&mut seen[p], true)) {
        return Err(Error::Shape(format!("permute: {perm:?} is not a permutation of the axes of {:?}", t.shape)));
    }
    let out_shape: Vec<usize> = perm.iter().map(|&p| t.shape[p]).collect();
    let in_strides = strides(&t.shape);
    // Input stride of each output axis.
    let src_strides: Vec<usize> = perm.iter().map(|&p| in_strides[p]).collect();
    if rank == 0 || t.data.is_empty() {
        return be.copy_of(&out_shape, &t.data);
    }
    let mut data = be.buffer_for_overwrite(t.data.len());
    if let Some((batch, rows, cols)) = as_batched_transpose(&t.shape, perm) {
        transpose_batched(&t.data, batch, rows, cols, &mut data);
        return be.tensor(out_shape, data);
    }
    let inner = out_shape[rank - 1];
    let inner_stride = src_strides[rank - 1];
    data.par_chunks_mut(inner).enumerate().for_each(|(row, dst)| {
        // Decompose the output row index into the leading output coordinates.
        let mut rest = row;
        let mut base = 0;
        for axis in (0..rank - 1).rev() {
            base += (rest % out_shape[axis]) * src_strides[axis];
            rest /= out_shape[axis];
        }
        if inner_stride == 1 {
            dst.copy_from_slice(&t.data[base..base + inner]);
        } else {
            for (j, d) in dst.iter_mut().enumerate() {
                *d = t.data[base + j * inner_stride];
            }
        }
    });
    be.tensor(out_shape, data)
}

/// `Some((batch, rows, cols))` when permuting `shape` by `perm` moves the data as a batched
/// matrix transpose, `[batch, rows, cols] → [batch, cols, rows]` (NCHW ↔ NHWC and the like):
/// unit axes are dropped and input axes that stay adjacent and in order are merged first.
// shape: any rank; perm: a valid permutation of its axes.
fn as_batched_transpose(shape: &[usize], perm: &[usize]) -> Option<(usize, usize, usize)> {
    // Renumber the non-unit axes 0.., so that "adjacent in the input" is "consecutive numbers".
    let mut renumbered = vec![None; shape.len()];
    let mut sizes = Vec::new();
    for (axis, &size) in shape.iter().enumerate() {
        if size != 1 {
            renumbered[axis] = Some(sizes.len());
            sizes.push(size);
        }
    }
    // Runs of consecutive input axes, in output order.
    let mut runs: Vec<std::ops::Range<usize>> = Vec::new();
    for axis in perm.iter().filter_map(|&p| renumbered[p]) {
        match runs.last_mut() {
            Some(run) if run.end == axis => run.end += 1,
            _ => runs.push(axis..axis + 1),
        }
    }
    let size = |run: &std::ops::Range<usize>| sizes[run.clone()].iter().product::<usize>();
    match runs.as_slice() {
        [cols, rows] if rows.start == 0 => Some((1, size(rows), size(cols))),
        [batch, cols, rows] if batch.start == 0 && rows.start < cols.start => Some((size(batch), size(rows), size(cols))),
        _ => None,
    }
}

/// `dst[b, c, r] = src[b, r, c]` in blocks, so that both sides are read and written a cache line
/// at a time (the generic permute gathered every element with a stride of `rows`); tasks of
/// TILE output rows.
// src: [batch, rows, cols]; dst: [batch, cols, rows].
fn transpose_batched(src: &[f32], batch: usize, rows: usize, cols: usize, dst: &mut [f32]) {
    const TILE: usize = 32;
    debug_assert!(src.len() == batch * rows * cols && dst.len() == src.len());
    if rows == 0 || cols == 0 {
        return;
    }
    dst.par_chunks_mut(cols * rows).zip(src.par_chunks(rows * cols)).for_each(|(dst, src)| {
        // One task: TILE output rows (input columns) of one batch item.
        dst.par_chunks_mut(TILE * rows).enumerate().for_each(|(tile, out)| {
            let c0 = tile * TILE;
            let width = out.len() / rows;
            // 16x16 register blocks with AVX-512, element tiles otherwise (the kernels' choice).
            minisam_kernels::transpose::transpose_block(&src[c0..], cols, out, rows, rows, width);
        });
    });
}

/// Maps the networks' attention bias onto the kernel's, checking its shapes.
// q is [bh, nq, d], k is [bh, nk, d]; table is [heads, nq, nk]; rel_h [bh, nq, kh], rel_w [bh, nq, kw].
fn attention_bias<'a>(bias: &'a AttentionBias<'_, CpuBackend>, bh: usize, nq: usize, nk: usize) -> Result<Bias<'a>> {
    match bias {
        AttentionBias::None => Ok(Bias::None),
        AttentionBias::Table(table) => {
            let s = &table.shape;
            if s.len() != 3 || s[0] == 0 || s[1] != nq || s[2] != nk {
                return Err(Error::Shape(format!("attention: bias table {s:?} is not [heads, {nq}, {nk}]")));
            }
            Ok(Bias::Table { table: &table.data, heads: s[0] })
        }
        AttentionBias::DecomposedRelPos { rel_h, rel_w } => {
            let (sh, sw) = (&rel_h.shape, &rel_w.shape);
            if sh.len() != 3 || sw.len() != 3 || sh[0] != bh || sw[0] != bh || sh[1] != nq || sw[1] != nq || sh[2] * sw[2] != nk {
                return Err(Error::Shape(format!("attention: rel_h {sh:?} / rel_w {sw:?} are not [{bh}, {nq}, kh] / [{bh}, {nq}, kw] with kh*kw = {nk}")));
            }
            Ok(Bias::RelPos { rel_h: &rel_h.data, rel_w: &rel_w.data, kh: sh[2], kw: sw[2] })
        }
    }
}

impl Backend for CpuBackend {
    type Tensor = CpuTensor;
    type Weight = CpuWeight;
    type Vector = CpuTensor;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn weight(&self, t: &StoredTensor) -> Result<CpuWeight> {
        check_payload(&t.name, &t.shape, &t.data)?;
        Ok(CpuWeight::new(t.shape.clone(), t.data.clone()))
    }

    fn vector(&self, t: &StoredTensor) -> Result<CpuTensor> {
        check_payload(&t.name, &t.shape, &t.data)?;
        CpuTensor::new(t.shape.clone(), t.to_f32())
    }

    fn vector_from_host(&self, shape: &[usize], data: &[f32]) -> Result<CpuTensor> {
        CpuTensor::new(shape.to_vec(), data.to_vec())
    }

    fn vector_shape<'a>(&self, v: &'a CpuTensor) -> &'a [usize] {
        &v.shape
    }

    fn from_host(&self, shape: &[usize], data: &[f32]) -> Result<CpuTensor> {
        let numel: usize = shape.iter().product();
        if numel != data.len() {
            return Err(Error::Shape(format!("from_host: shape {shape:?} needs {numel} elements, got {}", data.len())));
        }
        self.copy_of(shape, data)
    }

    fn to_host(&self, t: &CpuTensor) -> Result<Vec<f32>> {
        Ok(t.data.clone())
    }

    fn shape<'a>(&self, t: &'a CpuTensor) -> &'a [usize] {
        &t.shape
    }

    fn tensor_from_vector(&self, v: &CpuTensor) -> Result<CpuTensor> {
        self.copy_of(&v.shape, &v.data)
    }

    fn reshape(&self, mut t: CpuTensor, shape: &[usize]) -> Result<CpuTensor> {
        if shape.iter().product::<usize>() != t.data.len() {
            return Err(Error::Shape(format!("reshape: cannot view {:?} as {shape:?}", t.shape)));
        }
        t.shape = shape.to_vec();
        Ok(t)
    }

    fn permute(&self, t: &CpuTensor, perm: &[usize]) -> Result<CpuTensor> {
        self.run(|| permute_tensor(self, t, perm))
    }

    fn narrow(&self, t: &CpuTensor, axis: usize, start: usize, len: usize) -> Result<CpuTensor> {
        let dim = match t.shape.get(axis) {
            Some(&d) => d,
            None => return Err(Error::Shape(format!("narrow: axis {axis} out of range for {:?}", t.shape))),
        };
        if start.checked_add(len).is_none_or(|end| end > dim) {
            return Err(Error::Shape(format!("narrow: {start}..{start}+{len} outside axis {axis} of {:?}", t.shape)));
        }
        let inner: usize = t.shape[axis + 1..].iter().product();
        let mut shape = t.shape.clone();
        shape[axis] = len;
        let mut data = self.buffer_for_overwrite(shape.iter().product());
        if inner != 0 && dim != 0 && len != 0 {
            let piece = len * inner;
            for (dst, outer) in data.chunks_exact_mut(piece).zip(t.data.chunks_exact(dim * inner)) {
                dst.copy_from_slice(&outer[start * inner..(start + len) * inner]);
            }
        }
        self.tensor(shape, data)
    }

    fn concat(&self, ts: &[&CpuTensor], axis: usize) -> Result<CpuTensor> {
        let first = ts.first().ok_or_else(|| Error::Shape("concat: no tensors".into()))?;
        if axis >= first.shape.len() {
            return Err(Error::Shape(format!("concat: axis {axis} out of range for {:?}", first.shape)));
        }
        for t in ts {
            let same_rank = t.shape.len() == first.shape.len();
            if !same_rank || t.shape.iter().zip(&first.shape).enumerate().any(|(i, (a, b))| i != axis && a != b) {
                return Err(Error::Shape(format!("concat along {axis}: {:?} does not match {:?}", t.shape, first.shape)));
            }
        }
        let outer: usize = first.shape[..axis].iter().product();
        let inner: usize = first.shape[axis + 1..].iter().product();
        let mut shape = first.shape.clone();
        shape[axis] = ts.iter().map(|t| t.shape[axis]).sum();
        let mut data = self.buffer_for_overwrite(shape.iter().product());
        let mut at = 0;
        for o in 0..outer {
            for t in ts {
                let chunk = t.shape[axis] * inner;
                data[at..at + chunk].copy_from_slice(&t.data[o * chunk..(o + 1) * chunk]);
                at += chunk;
            }
        }
        self.tensor(shape, data)
    }

    fn pad_hw(&self, t: &CpuTensor, pad_h: usize, pad_w: usize) -> Result<CpuTensor> {
        let s = expect_rank("pad_hw", "input", &t.shape, 4)?;
        let (b, h, w, c) = (s[0], s[1], s[2], s[3]);
        let (oh, ow) = (h + pad_h, w + pad_w);
        // Every element is written once: the image rows copied, the padding zeroed.
        let mut data = self.buffer_for_overwrite(b * oh * ow * c);
        if !data.is_empty() {
            self.run(|| {
                data.par_chunks_mut(ow * c).enumerate().for_each(|(row, dst)| {
                    let (bi, y) = (row / oh, row % oh);
                    if y < h {
                        dst[..w * c].copy_from_slice(&t.data[((bi * h + y) * w) * c..][..w * c]);
                        dst[w * c..].fill(0.0);
                    } else {
                        dst.fill(0.0);
                    }
                });
            });
        }
        self.tensor(vec![b, oh, ow, c], data)
    }

    fn linear(&self, x: &CpuTensor, w: &CpuWeight, bias: Option<&CpuTensor>, act: Activation) -> Result<CpuTensor> {
        let (m, k) = split_last("linear", &x.shape)?;
        let ws = expect_rank("linear", "weight", &w.shape, 2)?;
        let n = ws[0];
        if ws[1] != k {
            return Err(Error::Shape(format!("linear: input {:?} against weight {ws:?}", x.shape)));
        }
        if let Some(b) = bias {
            if b.shape != [n] {
                return Err(Error::Shape(format!("linear: bias {:?} is not [{n}]", b.shape)));
            }
        }
        let mut shape = x.shape.clone();
        *shape.last_mut().unwrap() = n;
        let mut out = self.buffer_for_overwrite(m * n);
        self.run(|| gemm::linear(&x.data, m, k, w.matrix_for_rows(m), n, bias.map(|b| &b.data[..]), kernel_activation(act), &mut out));
        self.tensor(shape, out)
    }

    /// The default's arithmetic (`act(base + scale·up)`, same rounding) without its three
    /// intermediate tensors: the low-rank products go through pooled scratch buffers and the
    /// update, scale and activation are one pass over the output.
    fn linear_lora(&self, x: &CpuTensor, w: &CpuWeight, bias: Option<&CpuTensor>, act: Activation, lora: Option<&Lora<Self>>) -> Result<CpuTensor> {
        let Some(l) = lora else {
            return self.linear(x, w, bias, act);
        };
        let mut out = self.linear(x, w, bias, Activation::None)?;
        let (m, k) = split_last("linear_lora", &x.shape)?;
        let n = w.shape[0];
        let r = l.rank;
        if l.a.shape != [r, k] || l.b.shape != [n, r] {
            return Err(Error::Shape(format!("linear_lora: A {:?} / B {:?} are not [{r}, {k}] / [{n}, {r}] for weight {:?}", l.a.shape, l.b.shape, w.shape)));
        }
        let mut down = self.buffer(m * r);
        let mut up = self.buffer(m * n);
        let kernel_act = kernel_activation(act);
        self.run(|| {
            gemm::linear(&x.data, m, k, l.a.matrix(), r, None, activation::Activation::None, &mut down);
            gemm::linear(&down, m, r, l.b.matrix(), n, None, activation::Activation::None, &mut up);
            out.data.par_chunks_mut(4096).zip(up.par_chunks(4096)).for_each(|(o, u)| {
                for (o, &u) in o.iter_mut().zip(u) {
                    *o += l.scale * u;
                }
                activation::apply(kernel_act, o);
            });
        });
        self.buffers.give(down);
        self.buffers.give(up);
        Ok(out)
    }

    fn matmul(&self, a: &CpuTensor, b: &CpuTensor, transpose_b: bool) -> Result<CpuTensor> {
        let sa = expect_rank("matmul", "a", &a.shape, 3)?;
        let sb = expect_rank("matmul", "b", &b.shape, 3)?;
        let (batch, m, k) = (sa[0], sa[1], sa[2]);
        let (b_k, n) = if transpose_b { (sb[2], sb[1]) } else { (sb[1], sb[2]) };
        if sb[0] != batch || b_k != k {
            return Err(Error::Shape(format!("matmul: {sa:?} by {sb:?} (transpose_b = {transpose_b})")));
        }
        let mut out = self.buffer_for_overwrite(batch * m * n);
        self.run(|| gemm::matmul(&a.data, &b.data, batch, m, k, n, transpose_b, &mut out));
        self.tensor(vec![batch, m, n], out)
    }

    fn conv2d(&self, x: &CpuTensor, w: &CpuWeight, bias: Option<&CpuTensor>, spec: Conv2dSpec, act: Activation) -> Result<CpuTensor> {
        let xs = expect_rank("conv2d", "input", &x.shape, 4)?;
        let ws = expect_rank("conv2d", "weight", &w.shape, 4)?;
        let (batch, c_in, h, wd) = (xs[0], xs[1], xs[2], xs[3]);
        let (c_out, kh, kw) = (ws[0], ws[2], ws[3]);
        let Conv2dSpec { stride, padding, groups } = spec;
        let bad_groups = groups == 0 || c_in % groups != 0 || c_out % groups != 0 || ws[1] * groups != c_in;
        if bad_groups || stride == 0 || kh == 0 || kw == 0 || h + 2 * padding < kh || wd + 2 * padding < kw {
            return Err(Error::Shape(format!("conv2d: input {xs:?}, weight {ws:?}, {spec:?}")));
        }
        if let Some(b) = bias {
            if b.shape != [c_out] {
                return Err(Error::Shape(format!("conv2d: bias {:?} is not [{c_out}]", b.shape)));
            }
        }
        let (oh, ow) = (conv::output_size(h, kh, stride, padding), conv::output_size(wd, kw, stride, padding));
        let mut out = self.buffer_for_overwrite(batch * c_out * oh * ow);
        self.run(|| {
            let bias = bias.map(|b| &b.data[..]);
            conv::conv2d(&x.data, batch, c_in, h, wd, w.matrix(), c_out, kh, kw, bias, stride, padding, groups, kernel_activation(act), &mut out)
        });
        self.tensor(vec![batch, c_out, oh, ow], out)
    }

    fn conv_transpose2d(&self, x: &CpuTensor, w: &CpuWeight, bias: Option<&CpuTensor>, stride: usize) -> Result<CpuTensor> {
        let xs = expect_rank("conv_transpose2d", "input", &x.shape, 4)?;
        let ws = expect_rank("conv_transpose2d", "weight", &w.shape, 4)?;
        let (batch, c_in, h, wd) = (xs[0], xs[1], xs[2], xs[3]);
        let (c_out, k) = (ws[1], ws[2]);
        if ws[0] != c_in || ws[3] != k || k == 0 || stride != k {
            return Err(Error::Shape(format!("conv_transpose2d: input {xs:?}, weight {ws:?}, stride {stride} (kernel must be square and equal the stride)")));
        }
        if let Some(b) = bias {
            if b.shape != [c_out] {
                return Err(Error::Shape(format!("conv_transpose2d: bias {:?} is not [{c_out}]", b.shape)));
            }
        }
        // Kernel == stride: the scatter writes every output element exactly once.
        let mut out = self.buffer_for_overwrite(batch * c_out * h * k * wd * k);
        self.run(|| conv::conv_transpose2d(&x.data, batch, c_in, h, wd, w.matrix(), c_out, k, bias.map(|b| &b.data[..]), &mut out));
        self.tensor(vec![batch, c_out, h * k, wd * k], out)
    }

    fn layer_norm(&self, x: &CpuTensor, gamma: &CpuTensor, beta: &CpuTensor, eps: f32) -> Result<CpuTensor> {
        let (rows, dim) = split_last("layer_norm", &x.shape)?;
        if gamma.shape != [dim] || beta.shape != [dim] {
            return Err(Error::Shape(format!("layer_norm: input {:?}, gamma {:?}, beta {:?}", x.shape, gamma.shape, beta.shape)));
        }
        let mut out = self.buffer_for_overwrite(x.data.len());
        self.run(|| norm::layer_norm(&x.data, rows, dim, &gamma.data, &beta.data, eps, &mut out));
        self.tensor(x.shape.clone(), out)
    }

    fn add_layer_norm(&self, x: &CpuTensor, delta: &CpuTensor, gamma: &CpuTensor, beta: &CpuTensor, eps: f32) -> Result<CpuTensor> {
        let (rows, dim) = split_last("add_layer_norm", &x.shape)?;
        if delta.shape != x.shape || gamma.shape != [dim] || beta.shape != [dim] {
            return Err(Error::Shape(format!("add_layer_norm: input {:?}, delta {:?}, gamma {:?}, beta {:?}", x.shape, delta.shape, gamma.shape, beta.shape)));
        }
        let mut out = self.buffer_for_overwrite(x.data.len());
        self.run(|| norm::add_layer_norm(&x.data, &delta.data, rows, dim, &gamma.data, &beta.data, eps, &mut out));
        self.tensor(x.shape.clone(), out)
    }

    fn layer_norm_nchw(&self, x: &CpuTensor, gamma: &CpuTensor, beta: &CpuTensor, eps: f32) -> Result<CpuTensor> {
        let xs = expect_rank("layer_norm_nchw", "input", &x.shape, 4)?;
        let (batch, channels, spatial) = (xs[0], xs[1], xs[2] * xs[3]);
        if gamma.shape != [channels] || beta.shape != [channels] {
            return Err(Error::Shape(format!("layer_norm_nchw: input {xs:?}, gamma {:?}, beta {:?}", gamma.shape, beta.shape)));
        }
        let mut out = self.buffer_for_overwrite(x.data.len());
        self.run(|| norm::layer_norm_channels(&x.data, batch, channels, spatial, &gamma.data, &beta.data, eps, &mut out));
        self.tensor(x.shape.clone(), out)
    }

    fn activation(&self, x: &CpuTensor, act: Activation) -> Result<CpuTensor> {
        // Copy and activate one L1-sized chunk at a time, on every thread: a whole-tensor copy
        // first was a single-threaded pass over memory before the activation's own (the
        // decoder's 8 MiB GELU inputs: about 1 ms a decode).
        let mut out = self.buffer_for_overwrite(x.data.len());
        self.run(|| {
            out.par_chunks_mut(ELEMENTWISE_CHUNK).zip(x.data.par_chunks(ELEMENTWISE_CHUNK)).for_each(|(dst, src)| {
                dst.copy_from_slice(src);
                activation::apply(kernel_activation(act), dst);
            })
        });
        self.tensor(x.shape.clone(), out)
    }

    fn add(&self, a: &CpuTensor, b: &CpuTensor) -> Result<CpuTensor> {
        self.run(|| add_broadcast(self, "add", a, &b.shape, &b.data))
    }

    fn add_vector(&self, a: &CpuTensor, v: &CpuTensor) -> Result<CpuTensor> {
        self.run(|| add_broadcast(self, "add_vector", a, &v.shape, &v.data))
    }

    fn scale(&self, a: &CpuTensor, s: f32) -> Result<CpuTensor> {
        let mut out = self.buffer_for_overwrite(a.data.len());
        self.run(|| {
            out.par_chunks_mut(ELEMENTWISE_CHUNK).zip(a.data.par_chunks(ELEMENTWISE_CHUNK)).for_each(|(dst, src)| {
                dst.iter_mut().zip(src).for_each(|(d, &x)| *d = x * s);
            })
        });
        self.tensor(a.shape.clone(), out)
    }

    fn attention(&self, q: &CpuTensor, k: &CpuTensor, v: &CpuTensor, scale: f32, bias: AttentionBias<'_, Self>) -> Result<CpuTensor> {
        let qs = expect_rank("attention", "q", &q.shape, 3)?;
        let ks = expect_rank("attention", "k", &k.shape, 3)?;
        let (bh, nq, d) = (qs[0], qs[1], qs[2]);
        let nk = ks[1];
        if ks[0] != bh || ks[2] != d || v.shape != ks {
            return Err(Error::Shape(format!("attention: q {qs:?}, k {ks:?}, v {:?}", v.shape)));
        }
        let bias = attention_bias(&bias, bh, nq, nk)?;
        let mut out = self.buffer_for_overwrite(bh * nq * d);
        self.run(|| attention::attention(&q.data, &k.data, &v.data, bh, nq, nk, d, scale, bias, &mut out));
        self.tensor(q.shape.clone(), out)
    }

    fn inverted_residual(&self, x: &CpuTensor, block: &InvertedResidual<'_, Self>) -> Result<CpuTensor> {
        let xs = expect_rank("inverted_residual", "input", &x.shape, 4)?;
        let (batch, c, h, w) = (xs[0], xs[1], xs[2], xs[3]);
        let hidden = block.expand.shape[0];
        let k = block.kernel;
        let shapes_fit = block.expand.shape == [hidden, c, 1, 1]
            && block.depthwise.shape == [hidden, 1, k, k]
            && block.project.shape == [c, hidden, 1, 1]
            && k % 2 == 1
            && block.expand_bias.is_none_or(|b| b.shape == [hidden])
            && block.depthwise_bias.is_none_or(|b| b.shape == [hidden])
            && block.project_bias.is_none_or(|b| b.shape == [c]);
        if !shapes_fit {
            let bias_shape = |b: Option<&CpuTensor>| b.map(|b| b.shape.clone());
            return Err(Error::Shape(format!(
                "inverted_residual: input {xs:?}, expand {:?} (bias {:?}), depthwise {:?} (bias {:?}, kernel {k}), project {:?} (bias {:?})",
                block.expand.shape,
                bias_shape(block.expand_bias),
                block.depthwise.shape,
                bias_shape(block.depthwise_bias),
                block.project.shape,
                bias_shape(block.project_bias)
            )));
        }
        let weights = InvertedResidualWeights {
            expand: block.expand.matrix(),
            expand_bias: block.expand_bias.map(|b| &b.data[..]),
            depthwise: block.depthwise.matrix(),
            depthwise_bias: block.depthwise_bias.map(|b| &b.data[..]),
            project: block.project.matrix(),
            project_bias: block.project_bias.map(|b| &b.data[..]),
        };
        let mut out = self.buffer_for_overwrite(x.data.len());
        self.run(|| inverted_residual::inverted_residual(&x.data, batch, c, h, w, hidden, k, weights, kernel_activation(block.act), &mut out));
        self.tensor(x.shape.clone(), out)
    }

    fn upscale_masks(&self, image_tokens: &CpuTensor, grid: usize, up: &OutputUpscaling<'_, Self>, hyper_in: &CpuTensor) -> Result<CpuTensor> {
        let c = match image_tokens.shape[..] {
            [1, n, c] if n == grid * grid => c,
            _ => return Err(Error::Shape(format!("upscale_masks: image tokens {:?} are not [1, {grid}·{grid}, C]", image_tokens.shape))),
        };
        let (c1, c2) = (up.up1.shape.get(1).copied().unwrap_or(0), up.up2.shape.get(1).copied().unwrap_or(0));
        let k = match hyper_in.shape[..] {
            [1, k, hc] if hc == c2 => k,
            _ => return Err(Error::Shape(format!("upscale_masks: hypernetwork weights {:?} are not [1, k, {c2}]", hyper_in.shape))),
        };
        let shapes_fit = up.up1.shape == [c, c1, 2, 2]
            && up.up2.shape == [c1, c2, 2, 2]
            && up.norm_gamma.shape == [c1]
            && up.norm_beta.shape == [c1]
            && up.up1_bias.is_none_or(|b| b.shape == [c1])
            && up.up2_bias.is_none_or(|b| b.shape == [c2]);
        if !shapes_fit {
            return Err(Error::Shape(format!(
                "upscale_masks: tokens {:?}, first convolution {:?}, norm {:?}, second convolution {:?} (each 2x2, stride 2, with [C_out] biases)",
                image_tokens.shape, up.up1.shape, up.norm_gamma.shape, up.up2.shape
            )));
        }
        let weights = UpscalingWeights {
            up1: up.up1.matrix(),
            up1_bias: up.up1_bias.map(|b| &b.data[..]),
            norm_gamma: &up.norm_gamma.data,
            norm_beta: &up.norm_beta.data,
            norm_eps: up.norm_eps,
            up2: up.up2.matrix(),
            up2_bias: up.up2_bias.map(|b| &b.data[..]),
        };
        let side = 4 * grid;
        let mut out = self.buffer_for_overwrite(k * side * side);
        self.run(|| upscale::upscale_masks(&image_tokens.data, grid, c, c1, c2, weights, &hyper_in.data, &mut out));
        self.tensor(vec![1, k, side, side], out)
    }

    fn attention_heads(&self, q: CpuTensor, k: CpuTensor, v: CpuTensor, heads: usize, scale: f32, bias: AttentionBias<'_, Self>) -> Result<CpuTensor> {
        let (batch, nq, d) = crate::backend::merged_heads_dims(&q.shape, heads)?;
        let (kv_batch, nk, kv_d) = crate::backend::merged_heads_dims(&k.shape, heads)?;
        if (kv_batch, kv_d) != (batch, d) || v.shape != k.shape {
            return Err(Error::Shape(format!("attention_heads: q {:?}, k {:?}, v {:?} with {heads} heads", q.shape, k.shape, v.shape)));
        }
        let bias = attention_bias(&bias, batch * heads, nq, nk)?;
        let mut out = self.buffer_for_overwrite(batch * nq * heads * d);
        let [qv, kv, vv] = [(&q, nq), (&k, nk), (&v, nk)].map(|(t, rows)| attention::HeadsView::merged(&t.data, rows, heads, d));
        self.run(|| attention::attention_heads(qv, kv, vv, batch, heads, d, scale, bias, &mut out));
        self.tensor(vec![batch, nq, heads * d], out)
    }

    fn depthwise_conv_nhwc(&self, x: &CpuTensor, w: &CpuWeight, bias: Option<&CpuTensor>, kernel: usize) -> Result<CpuTensor> {
        let xs = expect_rank("depthwise_conv_nhwc", "input", &x.shape, 4)?;
        let (batch, h, wd, c) = (xs[0], xs[1], xs[2], xs[3]);
        if kernel % 2 == 0 || w.shape != [c, 1, kernel, kernel] || bias.is_some_and(|b| b.shape != [c]) {
            return Err(Error::Shape(format!("depthwise_conv_nhwc: input {xs:?}, weight {:?}, bias {:?}, kernel {kernel}", w.shape, bias.map(|b| &b.shape))));
        }
        let mut out = self.buffer_for_overwrite(x.data.len());
        self.run(|| depthwise_nhwc::depthwise_nhwc(&x.data, batch, h, wd, c, w.matrix(), kernel, bias.map(|b| &b.data[..]), &mut out));
        self.tensor(x.shape.clone(), out)
    }

    fn attention_packed(&self, qkv: CpuTensor, heads: usize, scale: f32, bias: AttentionBias<'_, Self>) -> Result<CpuTensor> {
        let (batch, n, d) = crate::backend::packed_qkv_dims(&qkv.shape, heads)?;
        let bias = attention_bias(&bias, batch * heads, n, n)?;
        let mut out = self.buffer_for_overwrite(batch * n * heads * d);
        self.run(|| attention::attention_packed(&qkv.data, batch, n, heads, d, scale, bias, &mut out));
        self.tensor(vec![batch, n, heads * d], out)
    }

    fn resize_bilinear(&self, x: &CpuTensor, out_h: usize, out_w: usize) -> Result<CpuTensor> {
        let rank = x.shape.len();
        if rank < 2 || x.shape[rank - 2] == 0 || x.shape[rank - 1] == 0 {
            return Err(Error::Shape(format!("resize_bilinear: input {:?} has no [.., H, W] planes", x.shape)));
        }
        let (h, w) = (x.shape[rank - 2], x.shape[rank - 1]);
        let planes: usize = x.shape[..rank - 2].iter().product();
        let mut out = self.buffer_for_overwrite(planes * out_h * out_w);
        self.run(|| resize::bilinear(&x.data, planes, h, w, out_h, out_w, &mut out));
        let mut shape = x.shape.clone();
        shape[rank - 2] = out_h;
        shape[rank - 1] = out_w;
        self.tensor(shape, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Nf4Data;
    use crate::store::SharedBytes;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// A linear over few rows reads an NF4 or fp16 weight through its cached f32 copy: the
    /// same bits as dequantising tile by tile, the copy made once; many rows read the stored
    /// weight.
    #[test]
    fn few_row_linears_read_a_cached_dequantised_weight() {
        let mut rng = ChaCha8Rng::seed_from_u64(rand::random());
        let (n, k) = (48, 320);
        let values: Vec<f32> = (0..n * k).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
        let q = minisam_kernels::nf4::quantize(&values);
        let nf4 = TensorData::Nf4(Nf4Data { codes: SharedBytes::from_vec(q.codes), absmax_q: SharedBytes::from_vec(q.absmax_q), absmax_scales: SharedBytes::from_vec(q.absmax_scales) });
        let f16 = TensorData::F16(SharedBytes::from_vec(values.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect()));
        let be = CpuBackend::new(2).unwrap();
        for data in [nf4, f16] {
            let w = CpuWeight::new(vec![n, k], data);
            for m in [1, 7, gemm::PACKED_MIN_ROWS - 1, gemm::PACKED_MIN_ROWS] {
                let x: Vec<f32> = (0..m * k).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
                let got = be.linear(&be.from_host(&[m, k], &x).unwrap(), &w, None, Activation::None).unwrap();
                let mut want = vec![0.0; m * n];
                gemm::linear(&x, m, k, w.matrix(), n, None, activation::Activation::None, &mut want);
                assert!(got.data.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "m {m}");
            }
            let cached = w.few_rows.get().expect("a few-row linear made the f32 copy").as_ptr();
            assert!(matches!(w.matrix_for_rows(7), MatrixRef::F32(v) if v.as_ptr() == cached), "made once");
            assert!(!matches!(w.matrix_for_rows(gemm::PACKED_MIN_ROWS), MatrixRef::F32(_)), "many rows read the stored weight");
        }
    }

    fn rng() -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(rand::random())
    }

    fn random_tensor(rng: &mut ChaCha8Rng, shape: &[usize]) -> CpuTensor {
        let n = shape.iter().product();
        CpuTensor::new(shape.to_vec(), (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect()).unwrap()
    }

    fn backend() -> CpuBackend {
        CpuBackend::new(2).unwrap()
    }

    /// Row-major multi-index of flat position `i`.
    fn unravel(mut i: usize, shape: &[usize]) -> Vec<usize> {
        let mut idx = vec![0; shape.len()];
        for axis in (0..shape.len()).rev() {
            idx[axis] = i % shape[axis];
            i /= shape[axis];
        }
        idx
    }

    fn ravel(idx: &[usize], shape: &[usize]) -> usize {
        idx.iter().zip(shape).fold(0, |acc, (&i, &s)| acc * s + i)
    }

    #[test]
    fn permute_matches_index_math_on_random_ranks() {
        let mut rng = rng();
        let be = backend();
        for _ in 0..40 {
            let rank = rng.gen_range(1..=5);
            let shape: Vec<usize> = (0..rank).map(|_| rng.gen_range(1..=6)).collect();
            let t = random_tensor(&mut rng, &shape);
            let mut perm: Vec<usize> = (0..rank).collect();
            for i in (1..rank).rev() {
                perm.swap(i, rng.gen_range(0..=i));
            }
            let out = be.permute(&t, &perm).unwrap();
            let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
            assert_eq!(out.shape, out_shape);
            for (o, &value) in out.data.iter().enumerate() {
                let out_idx = unravel(o, &out_shape);
                let mut in_idx = vec![0; rank];
                for (axis, &p) in perm.iter().enumerate() {
                    in_idx[p] = out_idx[axis];
                }
                assert_eq!(value, t.data[ravel(&in_idx, &shape)], "shape {shape:?} perm {perm:?} at {out_idx:?}");
            }
        }
        // The batched-transpose fast path: NCHW <-> NHWC, unit axes, tiles with ragged edges.
        for (shape, perm) in [
            (vec![2, 37, 5, 9], vec![0, 2, 3, 1]),
            (vec![2, 5, 9, 37], vec![0, 3, 1, 2]),
            (vec![1, 70, 33], vec![0, 2, 1]),
            (vec![40, 1, 65], vec![2, 1, 0]),
            (vec![3, 1, 4, 1, 35], vec![3, 4, 1, 0, 2]),
        ] {
            let t = random_tensor(&mut rng, &shape);
            let out = be.permute(&t, &perm).unwrap();
            let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
            assert_eq!(out.shape, out_shape);
            for (o, &value) in out.data.iter().enumerate() {
                let out_idx = unravel(o, &out_shape);
                let mut in_idx = vec![0; shape.len()];
                for (axis, &p) in perm.iter().enumerate() {
                    in_idx[p] = out_idx[axis];
                }
                assert_eq!(value, t.data[ravel(&in_idx, &shape)], "shape {shape:?} perm {perm:?} at {out_idx:?}");
            }
        }
        assert_eq!(as_batched_transpose(&[2, 3, 4, 5], &[0, 2, 3, 1]), Some((2, 3, 20)));
        assert_eq!(as_batched_transpose(&[2, 3, 4, 5], &[0, 3, 1, 2]), Some((2, 12, 5)));
        assert_eq!(as_batched_transpose(&[3, 1, 4, 1, 35], &[3, 4, 1, 0, 2]), Some((1, 12, 35)));
        assert_eq!(as_batched_transpose(&[2, 3, 4], &[1, 0, 2]), None, "inner axis kept: not a transpose");
        assert_eq!(as_batched_transpose(&[2, 3, 4], &[2, 0, 1]), Some((1, 6, 4)));
        let t = random_tensor(&mut rng, &[2, 3]);
        assert!(be.permute(&t, &[0, 0]).is_err());
        assert!(be.permute(&t, &[1]).is_err());
        assert!(be.permute(&t, &[0, 2]).is_err());
    }

    #[test]
    fn narrow_and_concat_are_inverse() {
        let mut rng = rng();
        let be = backend();
        for axis in 0..3 {
            let t = random_tensor(&mut rng, &[3, 5, 4]);
            let dim = t.shape[axis];
            let cut = rng.gen_range(1..dim);
            let head = be.narrow(&t, axis, 0, cut).unwrap();
            let tail = be.narrow(&t, axis, cut, dim - cut).unwrap();
            for (part, offset) in [(&head, 0), (&tail, cut)] {
                for (o, &value) in part.data.iter().enumerate() {
                    let mut idx = unravel(o, &part.shape);
                    idx[axis] += offset;
                    assert_eq!(value, t.data[ravel(&idx, &t.shape)]);
                }
            }
            assert_eq!(be.concat(&[&head, &tail], axis).unwrap(), t);
        }
        let t = random_tensor(&mut rng, &[2, 3]);
        assert!(be.narrow(&t, 1, 2, 2).is_err());
        assert!(be.narrow(&t, 2, 0, 1).is_err());
        let other = random_tensor(&mut rng, &[3, 3]);
        assert!(be.concat(&[&t, &other], 1).is_err());
        assert_eq!(be.concat(&[&t, &other], 0).unwrap().shape, [5, 3]);
    }

    #[test]
    fn pad_hw_adds_zeros_bottom_right() {
        let mut rng = rng();
        let be = backend();
        let t = random_tensor(&mut rng, &[2, 3, 4, 5]);
        // A NaN-filled buffer of the padded size waits in the pool: the padding must be written.
        drop(be.scale(&CpuTensor::new(vec![250], vec![f32::NAN; 250]).unwrap(), 1.0).unwrap());
        let p = be.pad_hw(&t, 2, 1).unwrap();
        assert_eq!(p.shape, [2, 5, 5, 5]);
        for (o, &value) in p.data.iter().enumerate() {
            let idx = unravel(o, &p.shape);
            let want = if idx[1] < 3 && idx[2] < 4 { t.data[ravel(&idx, &t.shape)] } else { 0.0 };
            assert_eq!(value, want, "at {idx:?}");
        }
        assert!(be.pad_hw(&random_tensor(&mut rng, &[3, 4]), 1, 1).is_err());
    }

    #[test]
    fn add_broadcasts_suffix_shapes() {
        let mut rng = rng();
        let be = backend();
        // The large shape spans several of the add's chunks, with chunk edges inside a period.
        let large = random_tensor(&mut rng, &[5, 3001, 7]);
        for b_shape in [vec![5, 3001, 7], vec![3001, 7], vec![7], vec![]] {
            let b = random_tensor(&mut rng, &b_shape);
            let sum = be.add(&large, &b).unwrap();
            assert_eq!(sum.shape, large.shape);
            for (i, &value) in sum.data.iter().enumerate() {
                assert_eq!(value, large.data[i] + b.data[i % b.data.len()], "b {b_shape:?} at {i}");
            }
        }
        let a = random_tensor(&mut rng, &[2, 3, 4]);
        for b_shape in [vec![2, 3, 4], vec![3, 4], vec![4], vec![]] {
            let b = random_tensor(&mut rng, &b_shape);
            let sum = be.add(&a, &b).unwrap();
            for (i, &value) in sum.data.iter().enumerate() {
                assert_eq!(value, a.data[i] + b.data[i % b.data.len()], "b {b_shape:?} at {i}");
            }
        }
        assert!(be.add(&a, &random_tensor(&mut rng, &[3])).is_err());
        assert!(be.add(&a, &random_tensor(&mut rng, &[1, 2, 3, 4])).is_err());
        let v = random_tensor(&mut rng, &[4]);
        let sum = be.add_vector(&a, &v).unwrap();
        assert_eq!(sum.data[5], a.data[5] + v.data[1]);
        let scaled = be.scale(&a, -2.0).unwrap();
        assert!(scaled.data.iter().zip(&a.data).all(|(s, x)| *s == -2.0 * x));
    }

    #[test]
    fn linear_with_nf4_weight_end_to_end() {
        let mut rng = rng();
        let be = backend();
        let (n, k) = (70, 129);
        let w: Vec<f32> = (0..n * k).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let q = minisam_kernels::nf4::quantize(&w);
        let stored = StoredTensor {
            name: "test.weight".into(),
            shape: vec![n, k],
            data: TensorData::Nf4(Nf4Data {
                codes: SharedBytes::from_vec(q.codes),
                absmax_q: SharedBytes::from_vec(q.absmax_q),
                absmax_scales: SharedBytes::from_vec(q.absmax_scales),
            }),
        };
        let dequantised = stored.to_f32();
        let weight = be.weight(&stored).unwrap();
        let bias = be.vector_from_host(&[n], &(0..n).map(|_| rng.gen_range(-1.0..1.0)).collect::<Vec<_>>()).unwrap();
        let x = random_tensor(&mut rng, &[2, 3, k]);
        let y = be.linear(&x, &weight, Some(&bias), Activation::Relu).unwrap();
        assert_eq!(y.shape, [2, 3, n]);
        let (mut diff, mut norm) = (0.0f64, 0.0f64);
        for row in 0..6 {
            for j in 0..n {
                let dot: f64 = (0..k).map(|p| x.data[row * k + p] as f64 * dequantised[j * k + p] as f64).sum();
                let want = (dot + bias.data[j] as f64).max(0.0);
                diff += (y.data[row * n + j] as f64 - want).powi(2);
                norm += want * want;
            }
        }
        assert!((diff / norm).sqrt() <= 1e-5, "relative error {}", (diff / norm).sqrt());

        let wrong_input = random_tensor(&mut rng, &[2, k + 1]);
        assert!(matches!(be.linear(&wrong_input, &weight, None, Activation::None), Err(Error::Shape(_))));
        let truncated = StoredTensor { shape: vec![n + 1, k], ..stored };
        assert!(be.weight(&truncated).is_err());
    }

    #[test]
    fn attention_maps_both_bias_kinds() {
        let mut rng = rng();
        let be = backend();
        let (bh, nq, kh, kw, d) = (4, 6, 2, 3, 8);
        let nk = kh * kw;
        let q = random_tensor(&mut rng, &[bh, nq, d]);
        let k = random_tensor(&mut rng, &[bh, nk, d]);
        let v = random_tensor(&mut rng, &[bh, nk, d]);
        let table = random_tensor(&mut rng, &[2, nq, nk]);
        let rel_h = random_tensor(&mut rng, &[bh, nq, kh]);
        let rel_w = random_tensor(&mut rng, &[bh, nq, kw]);
        let table_bias = |b: usize, i: usize, j: usize| table.data[((b % 2) * nq + i) * nk + j] as f64;
        let rel_bias = |b: usize, i: usize, j: usize| (rel_h.data[(b * nq + i) * kh + j / kw] + rel_w.data[(b * nq + i) * kw + j % kw]) as f64;
        type BiasOf<'f> = &'f dyn Fn(usize, usize, usize) -> f64;
        let cases: [(AttentionBias<'_, CpuBackend>, BiasOf); 2] =
            [(AttentionBias::Table(&table), &table_bias), (AttentionBias::DecomposedRelPos { rel_h: &rel_h, rel_w: &rel_w }, &rel_bias)];
        for (bias, bias_of) in cases {
            let out = be.attention(&q, &k, &v, 0.5, bias).unwrap();
            assert_eq!(out.shape, [bh, nq, d]);
            for b in 0..bh {
                for i in 0..nq {
                    let scores: Vec<f64> = (0..nk)
                        .map(|j| {
                            0.5 * (0..d).map(|p| q.data[(b * nq + i) * d + p] as f64 * k.data[(b * nk + j) * d + p] as f64).sum::<f64>() + bias_of(b, i, j)
                        })
                        .collect();
                    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let total: f64 = scores.iter().map(|s| (s - max).exp()).sum();
                    for p in 0..d {
                        let want = (0..nk).map(|j| (scores[j] - max).exp() * v.data[(b * nk + j) * d + p] as f64).sum::<f64>() / total;
                        let got = out.data[(b * nq + i) * d + p] as f64;
                        assert!((got - want).abs() <= 1e-5 * (1.0 + want.abs()), "bh {b} query {i} dim {p}: {got} vs {want}");
                    }
                }
            }
        }
        let wrong_table = random_tensor(&mut rng, &[2, nq, nk + 1]);
        assert!(matches!(be.attention(&q, &k, &v, 0.5, AttentionBias::Table(&wrong_table)), Err(Error::Shape(_))));
        let wrong_rel = random_tensor(&mut rng, &[bh, nq, kw + 1]);
        let mismatched = AttentionBias::DecomposedRelPos { rel_h: &rel_h, rel_w: &wrong_rel };
        assert!(matches!(be.attention(&q, &k, &v, 0.5, mismatched), Err(Error::Shape(_))));
    }

    #[test]
    fn tensor_constructor_checks_element_count() {
        assert!(CpuTensor::new(vec![2, 3], vec![0.0; 6]).is_ok());
        assert!(CpuTensor::new(vec![2, 3], vec![0.0; 5]).is_err());
        let be = backend();
        let t = be.from_host(&[6], &[1.0; 6]).unwrap();
        assert_eq!(be.reshape(t.clone(), &[3, 2]).unwrap().shape, [3, 2]);
        assert!(be.reshape(t, &[4]).is_err());
    }
}
