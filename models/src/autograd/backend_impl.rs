//! `Backend for TapeBackend`: each operation runs on the CPU backend, then is recorded when its
//! result needs a gradient.

use std::sync::Arc;

use crate::backend::{Activation, AttentionBias, Backend, Conv2dSpec};
use crate::cpu::{CpuTensor, CpuWeight};
use crate::store::StoredTensor;
use crate::{Error, Result};

use super::tape::{Input, Node, Op, Saved, SavedBias};
use super::{ParamOr, TapeBackend, TapeTensor, TapeVector, TapeWeight};

/// The kernels' activation enum for the networks' one.
pub(super) fn kernel_activation(act: Activation) -> minisam_kernels::Activation {
    match act {
        Activation::None => minisam_kernels::Activation::None,
        Activation::Gelu => minisam_kernels::Activation::Gelu,
        Activation::Relu => minisam_kernels::Activation::Relu,
    }
}

impl TapeBackend {
    /// The operand view of `t`, refusing a gradient-carrying tensor from an earlier generation.
    fn input(&self, op: &str, t: &TapeTensor) -> Result<Input> {
        if t.requires_grad && t.generation != self.tape().generation {
            return Err(Error::Backend(format!("{op}: operand was recorded before the last reset of the tape")));
        }
        Ok(Input { id: t.id, grad: t.requires_grad })
    }

    fn saved(&self, op: &str, t: &TapeTensor) -> Result<Saved> {
        Ok(Saved { input: self.input(op, t)?, value: t.value.clone() })
    }

    /// Wraps a computed value; records `op` when `grad` and recording is on.
    fn record(&self, value: CpuTensor, grad: bool, op: impl FnOnce() -> Op) -> TapeTensor {
        let mut tape = self.tape();
        let generation = tape.generation;
        if grad && tape.recording {
            let id = tape.new_id();
            let out_shape = value.shape.clone();
            tape.nodes.push(Node { out: id, out_shape, op: op() });
            TapeTensor { value: Arc::new(value), id, generation, requires_grad: true }
        } else {
            TapeTensor { value: Arc::new(value), id: 0, generation, requires_grad: false }
        }
    }

    /// The weight as the CPU backend takes it.
    fn cpu_weight(&self, w: &TapeWeight) -> Arc<CpuWeight> {
        match &w.kind {
            ParamOr::Frozen(cw) => cw.clone(),
            ParamOr::Param(i) => Arc::new(CpuWeight::new(w.shape.clone(), self.registry().data(*i))),
        }
    }

    fn cpu_vector(&self, v: &TapeVector) -> Result<Arc<CpuTensor>> {
        match &v.kind {
            ParamOr::Frozen(t) => Ok(t.clone()),
            ParamOr::Param(i) => {
                let values = self.registry().params[*i].value.clone();
                Ok(Arc::new(CpuTensor::new(v.shape.clone(), values)?))
            }
        }
    }

    /// `value` after the fused activation, keeping the pre-activation for the backward.
    fn activate(&self, pre: CpuTensor, act: Activation) -> Result<(CpuTensor, Option<Arc<CpuTensor>>)> {
        if act == Activation::None {
            return Ok((pre, None));
        }
        let out = self.cpu.activation(&pre, act)?;
        Ok((out, Some(Arc::new(pre))))
    }
}

fn param_index<T>(kind: &ParamOr<T>) -> Option<usize> {
    match kind {
        ParamOr::Param(i) => Some(*i),
        ParamOr::Frozen(_) => None,
    }
}

impl Backend for TapeBackend {
    type Tensor = TapeTensor;
    type Weight = TapeWeight;
    type Vector = TapeVector;

    fn name(&self) -> &'static str {
        "cpu+tape"
    }

    fn weight(&self, t: &StoredTensor) -> Result<TapeWeight> {
        // The CPU backend validates the payload either way.
        let cw = self.cpu.weight(t)?;
        if (self.trainable)(&t.name) {
            return self.trainable_weight(&t.name, &t.shape, t.to_f32());
        }
        Ok(TapeWeight { shape: t.shape.clone(), kind: ParamOr::Frozen(Arc::new(cw)) })
    }

    fn vector(&self, t: &StoredTensor) -> Result<TapeVector> {
        let v = self.cpu.vector(t)?;
        if (self.trainable)(&t.name) {
            return self.trainable_vector(&t.name, &t.shape, v.data.clone());
        }
        Ok(TapeVector { shape: t.shape.clone(), kind: ParamOr::Frozen(Arc::new(v)) })
    }

    fn vector_from_host(&self, shape: &[usize], data: &[f32]) -> Result<TapeVector> {
        Ok(TapeVector { shape: shape.to_vec(), kind: ParamOr::Frozen(Arc::new(self.cpu.vector_from_host(shape, data)?)) })
    }

    fn vector_shape<'a>(&self, v: &'a TapeVector) -> &'a [usize] {
        &v.shape
    }

    fn from_host(&self, shape: &[usize], data: &[f32]) -> Result<TapeTensor> {
        let value = self.cpu.from_host(shape, data)?;
        Ok(self.record(value, false, || unreachable!("constants are not recorded")))
    }

    fn to_host(&self, t: &TapeTensor) -> Result<Vec<f32>> {
        Ok(t.value.data.clone())
    }

    fn shape<'a>(&self, t: &'a TapeTensor) -> &'a [usize] {
        &t.value.shape
    }

    fn tensor_from_vector(&self, v: &TapeVector) -> Result<TapeTensor> {
        let value = self.cpu.tensor_from_vector(&*self.cpu_vector(v)?)?;
        let param = param_index(&v.kind);
        Ok(self.record(value, param.is_some(), || Op::FromVector { param: param.expect("recorded only for parameters") }))
    }

    fn reshape(&self, t: TapeTensor, shape: &[usize]) -> Result<TapeTensor> {
        let input = self.input("reshape", &t)?;
        let value = self.cpu.reshape((*t.value).clone(), shape)?;
        Ok(self.record(value, input.grad, || Op::Reshape { input }))
    }

    fn permute(&self, t: &TapeTensor, perm: &[usize]) -> Result<TapeTensor> {
        let input = self.input("permute", t)?;
        let value = self.cpu.permute(&t.value, perm)?;
        Ok(self.record(value, input.grad, || Op::Permute { input, perm: perm.to_vec() }))
    }

    fn narrow(&self, t: &TapeTensor, axis: usize, start: usize, len: usize) -> Result<TapeTensor> {
        let input = self.input("narrow", t)?;
        let value = self.cpu.narrow(&t.value, axis, start, len)?;
        Ok(self.record(value, input.grad, || Op::Narrow { input, in_shape: t.value.shape.clone(), axis, start }))
    }

    fn concat(&self, ts: &[&TapeTensor], axis: usize) -> Result<TapeTensor> {
        let inputs = ts.iter().map(|t| self.input("concat", t)).collect::<Result<Vec<_>>>()?;
        let values: Vec<&CpuTensor> = ts.iter().map(|t| &*t.value).collect();
        let value = self.cpu.concat(&values, axis)?;
        let grad = inputs.iter().any(|i| i.grad);
        Ok(self.record(value, grad, || Op::Concat { inputs, shapes: ts.iter().map(|t| t.value.shape.clone()).collect(), axis }))
    }

    fn pad_hw(&self, t: &TapeTensor, pad_h: usize, pad_w: usize) -> Result<TapeTensor> {
        let input = self.input("pad_hw", t)?;
        let value = self.cpu.pad_hw(&t.value, pad_h, pad_w)?;
        Ok(self.record(value, input.grad, || Op::PadHw { input, in_shape: t.value.shape.clone() }))
    }

    fn linear(&self, x: &TapeTensor, w: &TapeWeight, bias: Option<&TapeVector>, act: Activation) -> Result<TapeTensor> {
        let saved = self.saved("linear", x)?;
        let bias_param = bias.and_then(|b| param_index(&b.kind));
        let bias_value = bias.map(|b| self.cpu_vector(b)).transpose()?;
        let pre = self.cpu.linear(&x.value, &self.cpu_weight(w), bias_value.as_deref(), Activation::None)?;
        let (value, pre) = self.activate(pre, act)?;
        let grad = saved.input.grad || bias_param.is_some() || param_index(&w.kind).is_some();
        Ok(self.record(value, grad, || Op::Linear { x: saved, w: w.clone(), bias: bias_param, act, pre }))
    }

    fn matmul(&self, a: &TapeTensor, b: &TapeTensor, transpose_b: bool) -> Result<TapeTensor> {
        let (sa, sb) = (self.saved("matmul", a)?, self.saved("matmul", b)?);
        let value = self.cpu.matmul(&a.value, &b.value, transpose_b)?;
        let grad = sa.input.grad || sb.input.grad;
        Ok(self.record(value, grad, || Op::Matmul { a: sa, b: sb, transpose_b }))
    }

    fn conv2d(&self, x: &TapeTensor, w: &TapeWeight, bias: Option<&TapeVector>, spec: Conv2dSpec, act: Activation) -> Result<TapeTensor> {
        let saved = self.saved("conv2d", x)?;
        let bias_param = bias.and_then(|b| param_index(&b.kind));
        let bias_value = bias.map(|b| self.cpu_vector(b)).transpose()?;
        let pre = self.cpu.conv2d(&x.value, &self.cpu_weight(w), bias_value.as_deref(), spec, Activation::None)?;
        let (value, pre) = self.activate(pre, act)?;
        let grad = saved.input.grad || bias_param.is_some() || param_index(&w.kind).is_some();
        Ok(self.record(value, grad, || Op::Conv2d { x: saved, w: w.clone(), bias: bias_param, spec, act, pre }))
    }

    fn conv_transpose2d(&self, x: &TapeTensor, w: &TapeWeight, bias: Option<&TapeVector>, stride: usize) -> Result<TapeTensor> {
        let saved = self.saved("conv_transpose2d", x)?;
        let bias_param = bias.and_then(|b| param_index(&b.kind));
        let bias_value = bias.map(|b| self.cpu_vector(b)).transpose()?;
        let value = self.cpu.conv_transpose2d(&x.value, &self.cpu_weight(w), bias_value.as_deref(), stride)?;
        let grad = saved.input.grad || bias_param.is_some() || param_index(&w.kind).is_some();
        Ok(self.record(value, grad, || Op::ConvTranspose2d { x: saved, w: w.clone(), bias: bias_param, stride }))
    }

    fn layer_norm(&self, x: &TapeTensor, gamma: &TapeVector, beta: &TapeVector, eps: f32) -> Result<TapeTensor> {
        self.norm(x, gamma, beta, eps, false)
    }

    fn layer_norm_nchw(&self, x: &TapeTensor, gamma: &TapeVector, beta: &TapeVector, eps: f32) -> Result<TapeTensor> {
        self.norm(x, gamma, beta, eps, true)
    }

    fn activation(&self, x: &TapeTensor, act: Activation) -> Result<TapeTensor> {
        let saved = self.saved("activation", x)?;
        let value = self.cpu.activation(&x.value, act)?;
        let grad = saved.input.grad;
        Ok(self.record(value, grad, || Op::Activation { x: saved, act }))
    }

    fn add(&self, a: &TapeTensor, b: &TapeTensor) -> Result<TapeTensor> {
        let (ia, ib) = (self.input("add", a)?, self.input("add", b)?);
        let value = self.cpu.add(&a.value, &b.value)?;
        Ok(self.record(value, ia.grad || ib.grad, || Op::Add { a: ia, b: ib, b_len: b.value.data.len() }))
    }

    fn add_vector(&self, a: &TapeTensor, v: &TapeVector) -> Result<TapeTensor> {
        let ia = self.input("add_vector", a)?;
        let value = self.cpu.add_vector(&a.value, &*self.cpu_vector(v)?)?;
        match param_index(&v.kind) {
            Some(param) => Ok(self.record(value, true, || Op::AddVector { a: ia, param })),
            // A frozen vector passes the gradient straight through: record it as a reshape.
            None => Ok(self.record(value, ia.grad, || Op::Reshape { input: ia })),
        }
    }

    fn scale(&self, a: &TapeTensor, s: f32) -> Result<TapeTensor> {
        let ia = self.input("scale", a)?;
        let value = self.cpu.scale(&a.value, s)?;
        Ok(self.record(value, ia.grad, || Op::Scale { a: ia, s }))
    }

    fn attention(&self, q: &TapeTensor, k: &TapeTensor, v: &TapeTensor, scale: f32, bias: AttentionBias<'_, Self>) -> Result<TapeTensor> {
        let (sq, sk, sv) = (self.saved("attention", q)?, self.saved("attention", k)?, self.saved("attention", v)?);
        let (value, saved_bias, bias_grad) = match bias {
            AttentionBias::None => (self.cpu.attention(&q.value, &k.value, &v.value, scale, AttentionBias::None)?, SavedBias::None, false),
            AttentionBias::Table(table) => {
                let t = self.cpu_vector(table)?;
                let value = self.cpu.attention(&q.value, &k.value, &v.value, scale, AttentionBias::Table(&*t))?;
                let param = param_index(&table.kind);
                (value, SavedBias::Table { table: t, param }, param.is_some())
            }
            AttentionBias::DecomposedRelPos { rel_h, rel_w } => {
                let cpu_bias = AttentionBias::DecomposedRelPos { rel_h: &*rel_h.value, rel_w: &*rel_w.value };
                let value = self.cpu.attention(&q.value, &k.value, &v.value, scale, cpu_bias)?;
                let (sh, sw) = (self.saved("attention", rel_h)?, self.saved("attention", rel_w)?);
                let grad = sh.input.grad || sw.input.grad;
                (value, SavedBias::RelPos { rel_h: sh, rel_w: sw }, grad)
            }
        };
        let grad = sq.input.grad || sk.input.grad || sv.input.grad || bias_grad;
        Ok(self.record(value, grad, || Op::Attention { q: sq, k: sk, v: sv, scale, bias: saved_bias }))
    }

    fn resize_bilinear(&self, x: &TapeTensor, out_h: usize, out_w: usize) -> Result<TapeTensor> {
        let input = self.input("resize_bilinear", x)?;
        let value = self.cpu.resize_bilinear(&x.value, out_h, out_w)?;
        Ok(self.record(value, input.grad, || Op::Resize { input, in_shape: x.value.shape.clone() }))
    }
}

impl TapeBackend {
    /// Both layer norms (last axis, or NCHW channels).
    fn norm(&self, x: &TapeTensor, gamma: &TapeVector, beta: &TapeVector, eps: f32, nchw: bool) -> Result<TapeTensor> {
        let saved = self.saved("layer_norm", x)?;
        let (g, b) = (self.cpu_vector(gamma)?, self.cpu_vector(beta)?);
        let value = if nchw { self.cpu.layer_norm_nchw(&x.value, &g, &b, eps)? } else { self.cpu.layer_norm(&x.value, &g, &b, eps)? };
        let (gamma_param, beta_param) = (param_index(&gamma.kind), param_index(&beta.kind));
        let grad = saved.input.grad || gamma_param.is_some() || beta_param.is_some();
        Ok(self.record(value, grad, || Op::LayerNorm { x: saved, gamma: g, gamma_param, beta_param, eps, nchw }))
    }
}
