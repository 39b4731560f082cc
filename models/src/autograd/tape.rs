//! The tape: one [`Node`] per recorded operation, with what its backward needs, and the reverse
//! walk that turns an output gradient into parameter and leaf gradients.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use minisam_kernels::activation_backward::activation_backward;
use minisam_kernels::attention::Bias;
use minisam_kernels::attention_backward::{attention_backward, BiasGrad};
use minisam_kernels::conv_backward::{self, ConvShape};
use minisam_kernels::gemm_backward;
use minisam_kernels::norm_backward;
use minisam_kernels::resize_backward::bilinear_backward;
use minisam_kernels::MatrixRef;

use super::params::Registry;
use super::{Gradients, ParamOr, TapeBackend, TapeWeight};
use crate::backend::{Activation, Conv2dSpec};
use crate::backend::Backend;
use crate::cpu::{CpuBackend, CpuTensor};
use crate::Result;

/// An operand of a recorded op: its tape id and whether a gradient must flow into it.
#[derive(Clone, Copy, Debug)]
pub(super) struct Input {
    pub id: usize,
    pub grad: bool,
}

/// An operand whose value the backward needs.
#[derive(Clone, Debug)]
pub(super) struct Saved {
    pub input: Input,
    pub value: Arc<CpuTensor>,
}

#[derive(Debug)]
pub(super) enum SavedBias {
    None,
    Table { table: Arc<CpuTensor>, param: Option<usize> },
    RelPos { rel_h: Saved, rel_w: Saved },
}

/// A recorded operation. Shapes of the output are those of the gradient it receives.
#[derive(Debug)]
pub(super) enum Op {
    Reshape { input: Input },
    Permute { input: Input, perm: Vec<usize> },
    Narrow { input: Input, in_shape: Vec<usize>, axis: usize, start: usize },
    Concat { inputs: Vec<Input>, shapes: Vec<Vec<usize>>, axis: usize },
    PadHw { input: Input, in_shape: Vec<usize> },
    FromVector { param: usize },
    Linear { x: Saved, w: TapeWeight, bias: Option<usize>, act: Activation, pre: Option<Arc<CpuTensor>> },
    Matmul { a: Saved, b: Saved, transpose_b: bool },
    Conv2d { x: Saved, w: TapeWeight, bias: Option<usize>, spec: Conv2dSpec, act: Activation, pre: Option<Arc<CpuTensor>> },
    ConvTranspose2d { x: Saved, w: TapeWeight, bias: Option<usize>, stride: usize },
    LayerNorm { x: Saved, gamma: Arc<CpuTensor>, gamma_param: Option<usize>, beta_param: Option<usize>, eps: f32, nchw: bool },
    Activation { x: Saved, act: Activation },
    Add { a: Input, b: Input, b_len: usize },
    AddVector { a: Input, param: usize },
    Scale { a: Input, s: f32 },
    Attention { q: Saved, k: Saved, v: Saved, scale: f32, bias: SavedBias },
    Resize { input: Input, in_shape: Vec<usize> },
}

impl Op {
    /// The operation's name, for profiles.
    fn kind(&self) -> &'static str {
        match self {
            Op::Reshape { .. } => "reshape",
            Op::Permute { .. } => "permute",
            Op::Narrow { .. } => "narrow",
            Op::Concat { .. } => "concat",
            Op::PadHw { .. } => "pad_hw",
            Op::FromVector { .. } => "from_vector",
            Op::Linear { .. } => "linear",
            Op::Matmul { .. } => "matmul",
            Op::Conv2d { .. } => "conv2d",
            Op::ConvTranspose2d { .. } => "conv_transpose2d",
            Op::LayerNorm { .. } => "layer_norm",
            Op::Activation { .. } => "activation",
            Op::Add { .. } => "add",
            Op::AddVector { .. } => "add_vector",
            Op::Scale { .. } => "scale",
            Op::Attention { .. } => "attention",
            Op::Resize { .. } => "resize",
        }
    }
}

#[derive(Debug)]
pub(super) struct Node {
    pub out: usize,
    pub out_shape: Vec<usize>,
    pub op: Op,
}

#[derive(Debug)]
pub(super) struct Tape {
    pub nodes: Vec<Node>,
    pub leaves: HashSet<usize>,
    next_id: usize,
    pub generation: u64,
    pub recording: bool,
}

impl Default for Tape {
    fn default() -> Self {
        Self { nodes: Vec::new(), leaves: HashSet::new(), next_id: 1, generation: 0, recording: true }
    }
}

/// Gradients collected during the walk, by tape id.
struct Grads(HashMap<usize, Vec<f32>>);

impl Grads {
    /// Adds `g` into the gradient of `input` if it wants one.
    fn add(&mut self, input: Input, g: Vec<f32>) {
        if !input.grad {
            return;
        }
        match self.0.get_mut(&input.id) {
            Some(acc) => acc.iter_mut().zip(&g).for_each(|(a, b)| *a += b),
            None => {
                self.0.insert(input.id, g);
            }
        }
    }
}

/// `[rows, last]` of a shape (the last axis is the feature axis of linear/layer-norm).
fn rows_last(shape: &[usize]) -> (usize, usize) {
    let last = *shape.last().unwrap_or(&1);
    (shape.iter().product::<usize>() / last.max(1), last)
}

/// The weight as the kernels read it: frozen stored data, or the parameter's current f32 values.
fn with_matrix<R>(reg: &mut Registry, w: &TapeWeight, f: impl FnOnce(MatrixRef) -> R) -> R {
    match &w.kind {
        ParamOr::Frozen(cw) => f(cw.matrix()),
        ParamOr::Param(i) => match reg.data(*i) {
            crate::store::TensorData::F32(v) => f(MatrixRef::F32(&v)),
            _ => unreachable!("parameters are f32"),
        },
    }
}

fn param_of(w: &TapeWeight) -> Option<usize> {
    match w.kind {
        ParamOr::Param(i) => Some(i),
        ParamOr::Frozen(_) => None,
    }
}

/// `dy` through the fused activation: `act'(pre) ⊙ dy`, or `dy` itself.
fn through_activation(act: Activation, pre: &Option<Arc<CpuTensor>>, dy: &[f32]) -> Vec<f32> {
    match (act, pre) {
        (Activation::None, _) | (_, None) => dy.to_vec(),
        (act, Some(pre)) => {
            let mut dz = vec![0.0; dy.len()];
            activation_backward(super::backend_impl::kernel_activation(act), &pre.data, dy, &mut dz);
            dz
        }
    }
}

impl Tape {
    pub fn new_id(&mut self) -> usize {
        self.next_id += 1;
        self.next_id - 1
    }

    pub fn reset(&mut self) {
        self.nodes.clear();
        self.leaves.clear();
        self.generation += 1;
    }

    /// The reverse walk from tensor `out_id` with gradient `seed`.
    pub fn backward(&self, be: &TapeBackend, out_id: usize, seed: Vec<f32>) -> Result<Gradients> {
        let mut grads = Grads(HashMap::from([(out_id, seed)]));
        let mut guard = be.registry();
        let reg: &mut Registry = &mut guard;
        // MINISAM_TAPE_PROFILE=1 prints the backward time spent per kind of operation.
        let profile = std::env::var_os("MINISAM_TAPE_PROFILE").is_some();
        let mut spent: std::collections::BTreeMap<&'static str, (usize, f64)> = Default::default();
        be.pool.install(|| -> Result<()> {
            for node in self.nodes.iter().rev() {
                if node.out > out_id {
                    continue;
                }
                // Each node is the only producer of its output: its gradient is complete here.
                let Some(g) = grads.0.remove(&node.out) else { continue };
                let t0 = std::time::Instant::now();
                backward_op(&be.cpu, &node.op, &node.out_shape, &g, &mut grads, reg)?;
                if profile {
                    let e = spent.entry(node.op.kind()).or_default();
                    e.0 += 1;
                    e.1 += t0.elapsed().as_secs_f64();
                }
            }
            Ok(())
        })?;
        if profile {
            let lines: Vec<String> = spent.iter().map(|(k, (n, s))| format!("{k} x{n} {:.3}s", s)).collect();
            eprintln!("tape backward: {}", lines.join(", "));
        }
        Ok(Gradients { by_id: grads.0.into_iter().filter(|(id, _)| self.leaves.contains(id)).collect() })
    }
}

/// Adds the gradients of `op`'s operands, given `g`, the gradient of its output.
// g has the shape out_shape of the op's output.
fn backward_op(cpu: &CpuBackend, op: &Op, out_shape: &[usize], g: &[f32], grads: &mut Grads, reg: &mut Registry) -> Result<()> {
    match op {
        Op::Reshape { input } => grads.add(*input, g.to_vec()),
        Op::Permute { input, perm } => {
            if input.grad {
                let mut inverse = vec![0; perm.len()];
                perm.iter().enumerate().for_each(|(i, &p)| inverse[p] = i);
                let dy = CpuTensor::new(out_shape.to_vec(), g.to_vec())?;
                grads.add(*input, cpu.permute(&dy, &inverse)?.data.clone());
            }
        }
        Op::Narrow { input, in_shape, axis, start } => {
            if input.grad {
                let (dim, inner) = (in_shape[*axis], in_shape[axis + 1..].iter().product::<usize>());
                let outer: usize = in_shape[..*axis].iter().product();
                let len = g.len() / (outer * inner).max(1);
                let mut dx = vec![0.0; in_shape.iter().product()];
                for o in 0..outer {
                    dx[(o * dim + start) * inner..][..len * inner].copy_from_slice(&g[o * len * inner..][..len * inner]);
                }
                grads.add(*input, dx);
            }
        }
        Op::Concat { inputs, shapes, axis } => {
            let outer: usize = shapes[0][..*axis].iter().product();
            let inner: usize = shapes[0][axis + 1..].iter().product();
            let total: usize = shapes.iter().map(|s| s[*axis]).sum();
            let mut offset = 0;
            for (input, shape) in inputs.iter().zip(shapes) {
                let len = shape[*axis];
                if input.grad {
                    let mut dx = Vec::with_capacity(outer * len * inner);
                    for o in 0..outer {
                        dx.extend_from_slice(&g[(o * total + offset) * inner..][..len * inner]);
                    }
                    grads.add(*input, dx);
                }
                offset += len;
            }
        }
        Op::PadHw { input, in_shape } => {
            if input.grad {
                let (b, h, w, c) = (in_shape[0], in_shape[1], in_shape[2], in_shape[3]);
                let (out_h, out_w) = (out_shape[1], out_shape[2]);
                let mut dx = vec![0.0; b * h * w * c];
                for bi in 0..b {
                    for y in 0..h {
                        dx[((bi * h + y) * w) * c..][..w * c].copy_from_slice(&g[((bi * out_h + y) * out_w) * c..][..w * c]);
                    }
                }
                grads.add(*input, dx);
            }
        }
        Op::FromVector { param } => reg.accumulate(*param, g),
        Op::Linear { x, w, bias, act, pre } => {
            let dz = through_activation(*act, pre, g);
            let (m, k) = rows_last(&x.value.shape);
            let n = w.shape[0];
            if let Some(b) = bias {
                gemm_backward::bias_backward(&dz, m, n, &mut reg.params[*b].grad);
            }
            if let Some(p) = param_of(w) {
                gemm_backward::linear_backward_weight(&dz, &x.value.data, m, n, k, &mut reg.params[p].grad);
            }
            if x.input.grad {
                let mut dx = vec![0.0; m * k];
                with_matrix(reg, w, |wm| gemm_backward::linear_backward_input(&dz, m, n, wm, k, &mut dx));
                grads.add(x.input, dx);
            }
        }
        Op::Matmul { a, b, transpose_b } => {
            let (sa, sb) = (&a.value.shape, &b.value.shape);
            let (batch, m, k) = (sa[0], sa[1], sa[2]);
            let n = if *transpose_b { sb[1] } else { sb[2] };
            let mut da = a.input.grad.then(|| vec![0.0; a.value.data.len()]);
            let mut db = b.input.grad.then(|| vec![0.0; b.value.data.len()]);
            gemm_backward::matmul_backward(&a.value.data, &b.value.data, g, batch, m, k, n, *transpose_b, da.as_deref_mut(), db.as_deref_mut());
            if let Some(da) = da {
                grads.add(a.input, da);
            }
            if let Some(db) = db {
                grads.add(b.input, db);
            }
        }
        Op::Conv2d { x, w, bias, spec, act, pre } => {
            let dz = through_activation(*act, pre, g);
            let xs = &x.value.shape;
            let s = ConvShape {
                batch: xs[0],
                c_in: xs[1],
                h: xs[2],
                w: xs[3],
                c_out: w.shape[0],
                kh: w.shape[2],
                kw: w.shape[3],
                stride: spec.stride,
                padding: spec.padding,
                groups: spec.groups,
            };
            let (oh, ow) = s.out_hw();
            if let Some(b) = bias {
                conv_backward::channel_bias_backward(&dz, s.batch, s.c_out, oh * ow, &mut reg.params[*b].grad);
            }
            if let Some(p) = param_of(w) {
                conv_backward::conv2d_backward_weight(&dz, &x.value.data, s, &mut reg.params[p].grad);
            }
            if x.input.grad {
                let mut dx = vec![0.0; x.value.data.len()];
                with_matrix(reg, w, |wm| conv_backward::conv2d_backward_input(&dz, wm, s, &mut dx));
                grads.add(x.input, dx);
            }
        }
        Op::ConvTranspose2d { x, w, bias, stride } => {
            let xs = &x.value.shape;
            let (batch, c_in, h, wd, c_out, k) = (xs[0], xs[1], xs[2], xs[3], w.shape[1], *stride);
            if let Some(b) = bias {
                conv_backward::channel_bias_backward(g, batch, c_out, h * k * wd * k, &mut reg.params[*b].grad);
            }
            if let Some(p) = param_of(w) {
                conv_backward::conv_transpose2d_backward_weight(g, &x.value.data, batch, c_in, h, wd, c_out, k, &mut reg.params[p].grad);
            }
            if x.input.grad {
                let mut dx = vec![0.0; x.value.data.len()];
                with_matrix(reg, w, |wm| conv_backward::conv_transpose2d_backward_input(g, wm, batch, c_in, h, wd, c_out, k, &mut dx));
                grads.add(x.input, dx);
            }
        }
        Op::LayerNorm { x, gamma, gamma_param, beta_param, eps, nchw } => {
            let mut dx = vec![0.0; x.value.data.len()];
            let dim = gamma.data.len();
            let mut dgamma = gamma_param.map(|_| vec![0.0; dim]);
            let mut dbeta = beta_param.map(|_| vec![0.0; dim]);
            if *nchw {
                let s = &x.value.shape;
                norm_backward::layer_norm_channels_backward(&x.value.data, g, s[0], s[1], s[2] * s[3], &gamma.data, *eps, &mut dx, dgamma.as_deref_mut(), dbeta.as_deref_mut());
            } else {
                let (rows, dim) = rows_last(&x.value.shape);
                norm_backward::layer_norm_backward(&x.value.data, g, rows, dim, &gamma.data, *eps, &mut dx, dgamma.as_deref_mut(), dbeta.as_deref_mut());
            }
            if let (Some(p), Some(d)) = (gamma_param, dgamma) {
                reg.accumulate(*p, &d);
            }
            if let (Some(p), Some(d)) = (beta_param, dbeta) {
                reg.accumulate(*p, &d);
            }
            grads.add(x.input, dx);
        }
        Op::Activation { x, act } => {
            if x.input.grad {
                let mut dx = vec![0.0; g.len()];
                activation_backward(super::backend_impl::kernel_activation(*act), &x.value.data, g, &mut dx);
                grads.add(x.input, dx);
            }
        }
        Op::Add { a, b, b_len } => {
            grads.add(*a, g.to_vec());
            if b.grad {
                grads.add(*b, sum_chunks(g, *b_len));
            }
        }
        Op::AddVector { a, param } => {
            grads.add(*a, g.to_vec());
            reg.accumulate(*param, &sum_chunks(g, reg.params[*param].value.len()));
        }
        Op::Scale { a, s } => grads.add(*a, g.iter().map(|v| v * s).collect()),
        Op::Attention { q, k, v, scale, bias } => {
            let (qs, ks) = (&q.value.shape, &k.value.shape);
            let (bh, nq, d, nk) = (qs[0], qs[1], qs[2], ks[1]);
            let (mut dq, mut dk, mut dv) = (vec![0.0; q.value.data.len()], vec![0.0; k.value.data.len()], vec![0.0; v.value.data.len()]);
            match bias {
                SavedBias::None => attention_backward(&q.value.data, &k.value.data, &v.value.data, g, bh, nq, nk, d, *scale, Bias::None, &mut dq, &mut dk, &mut dv, BiasGrad::None),
                SavedBias::Table { table, param } => {
                    let kernel_bias = Bias::Table { table: &table.data, heads: table.shape[0] };
                    let mut dt = param.map(|_| vec![0.0; table.data.len()]);
                    let bias_grad = match dt.as_deref_mut() {
                        Some(t) => BiasGrad::Table(t),
                        None => BiasGrad::None,
                    };
                    attention_backward(&q.value.data, &k.value.data, &v.value.data, g, bh, nq, nk, d, *scale, kernel_bias, &mut dq, &mut dk, &mut dv, bias_grad);
                    if let (Some(p), Some(dt)) = (param, dt) {
                        reg.accumulate(*p, &dt);
                    }
                }
                SavedBias::RelPos { rel_h, rel_w } => {
                    let (kh, kw) = (rel_h.value.shape[2], rel_w.value.shape[2]);
                    let kernel_bias = Bias::RelPos { rel_h: &rel_h.value.data, rel_w: &rel_w.value.data, kh, kw };
                    let (mut dh, mut dw) = (vec![0.0; rel_h.value.data.len()], vec![0.0; rel_w.value.data.len()]);
                    let wants = rel_h.input.grad || rel_w.input.grad;
                    let bias_grad = if wants { BiasGrad::RelPos { rel_h: &mut dh, rel_w: &mut dw } } else { BiasGrad::None };
                    attention_backward(&q.value.data, &k.value.data, &v.value.data, g, bh, nq, nk, d, *scale, kernel_bias, &mut dq, &mut dk, &mut dv, bias_grad);
                    grads.add(rel_h.input, dh);
                    grads.add(rel_w.input, dw);
                }
            }
            grads.add(q.input, dq);
            grads.add(k.input, dk);
            grads.add(v.input, dv);
        }
        Op::Resize { input, in_shape } => {
            if input.grad {
                let rank = in_shape.len();
                let (h, w) = (in_shape[rank - 2], in_shape[rank - 1]);
                let (oh, ow) = (out_shape[rank - 2], out_shape[rank - 1]);
                let planes: usize = in_shape[..rank - 2].iter().product();
                let mut dx = vec![0.0; planes * h * w];
                bilinear_backward(g, planes, h, w, oh, ow, &mut dx);
                grads.add(*input, dx);
            }
        }
    }
    Ok(())
}

/// Sums `g` over its leading axes onto its last `len` elements (broadcast adjoint).
fn sum_chunks(g: &[f32], len: usize) -> Vec<f32> {
    let mut out = vec![0.0; len];
    if len > 0 {
        for chunk in g.chunks_exact(len) {
            out.iter_mut().zip(chunk).for_each(|(o, v)| *o += v);
        }
    }
    out
}
