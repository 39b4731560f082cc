//! Reverse-mode gradients for the networks in `crate::nets`, without a second copy of them.
//!
//! [`TapeBackend`] is a [`crate::backend::Backend`] that runs every operation on the CPU backend
//! and, when the result depends on something trainable, records the operation on a tape with
//! what its backward needs (inputs, pre-activations). [`TapeBackend::backward`] walks the tape in
//! reverse and calls the backward kernels of `minisam_kernels` (`*_backward`, next to each
//! forward). Parameters are of two kinds:
//! - frozen: the stored base weights (NF4, fp16, f32), which gradients pass *through* (the input
//!   gradient of a linear is computed by dequantising the NF4 weight tile by tile, as in forward);
//! - trainable: f32 tensors held in the backend's parameter registry (LoRA factors, or dense
//!   weights for distillation) that *accumulate* gradients across backward calls until
//!   [`TapeBackend::zero_grads`].
//!
//! A loaded weight becomes trainable when its name matches the selector given at construction
//! (LoRA factors are named `<linear>.lora_a` / `.lora_b`), or explicitly through
//! [`TapeBackend::trainable_weight`]. Since `Backend::linear_lora`'s default method composes
//! `linear`, `scale` and `add`, LoRA needs nothing special here.
//!
//! Interior mutability (a `Mutex` around the tape and the registry) keeps the `Backend` API
//! unchanged; training is not the per-frame hot path, so the lock costs nothing that matters.
//! Operations whose inputs need no gradient are not recorded at all, so a frozen image encoder in
//! front of a trainable decoder runs at forward cost and keeps no activations.

mod backend_impl;
mod lora;
mod model;
mod params;
mod tape;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod whole_model_check;

use std::sync::{Arc, Mutex, MutexGuard};

use crate::cpu::{CpuBackend, CpuTensor, CpuWeight};
use crate::{Error, Result};

pub use lora::{attach_lora, export_lora, factor_names};
pub use model::{SamModel, TrainEncoder};
pub use params::ParamInfo;
use params::Registry;
use tape::Tape;

/// A tensor on the tape: its value, and (when it depends on a trainable parameter or a
/// gradient-requiring leaf) the id under which its gradient is collected.
#[derive(Clone, Debug)]
pub struct TapeTensor {
    value: Arc<CpuTensor>,
    /// Tape id; meaningful only when `requires_grad`.
    id: usize,
    /// The tape generation (see [`TapeBackend::reset`]) this tensor was recorded in.
    generation: u64,
    requires_grad: bool,
}

impl TapeTensor {
    /// The value as the CPU backend computed it.
    pub fn value(&self) -> &CpuTensor {
        &self.value
    }
    pub fn requires_grad(&self) -> bool {
        self.requires_grad
    }
}

/// A weight matrix or convolution kernel: a frozen stored tensor, or a trainable parameter.
#[derive(Clone, Debug)]
pub struct TapeWeight {
    shape: Vec<usize>,
    kind: ParamOr<CpuWeight>,
}

/// A small f32 parameter (bias, norm affine, table): frozen or trainable.
#[derive(Clone, Debug)]
pub struct TapeVector {
    shape: Vec<usize>,
    kind: ParamOr<CpuTensor>,
}

#[derive(Clone, Debug)]
enum ParamOr<T> {
    Frozen(Arc<T>),
    /// Index into the parameter registry.
    Param(usize),
}

/// Gradients of the tensors marked with [`TapeBackend::leaf`], after a backward pass.
#[derive(Debug, Default)]
pub struct Gradients {
    by_id: std::collections::HashMap<usize, Vec<f32>>,
}

impl Gradients {
    /// The gradient of `t`, if `t` is a gradient-requiring leaf the loss depends on.
    pub fn of(&self, t: &TapeTensor) -> Option<&[f32]> {
        if !t.requires_grad {
            return None;
        }
        self.by_id.get(&t.id).map(Vec::as_slice)
    }
}

/// Which stored tensors become trainable parameters, by name.
pub type TrainableSelector = Box<dyn Fn(&str) -> bool + Send + Sync>;

/// The recording backend (see the module docs).
pub struct TapeBackend {
    cpu: CpuBackend,
    /// Runs the backward kernels (the CPU backend keeps its own pool for the forward).
    pool: rayon::ThreadPool,
    tape: Mutex<Tape>,
    params: Mutex<Registry>,
    trainable: TrainableSelector,
}

impl TapeBackend {
    /// A backend computing on `threads` CPU threads (0: one per core); stored tensors whose name
    /// satisfies `trainable` become trainable parameters when the networks load them.
    pub fn new(threads: usize, trainable: TrainableSelector) -> Result<Self> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("minisam-grad-{i}"))
            .build()
            .map_err(|e| Error::Backend(format!("cannot start {threads} backward threads: {e}")))?;
        Ok(Self { cpu: CpuBackend::new(threads)?, pool, tape: Mutex::default(), params: Mutex::default(), trainable })
    }

    /// A backend where only explicitly created parameters ([`TapeBackend::trainable_weight`])
    /// and LoRA factors (`*.lora_a`, `*.lora_b`) are trainable.
    pub fn for_lora(threads: usize) -> Result<Self> {
        Self::new(threads, Box::new(|name: &str| name.ends_with(".lora_a") || name.ends_with(".lora_b")))
    }

    pub fn cpu(&self) -> &CpuBackend {
        &self.cpu
    }

    fn tape(&self) -> MutexGuard<'_, Tape> {
        // A panic while holding the lock leaves the tape in an unknown state; the poisoned
        // contents are still memory-safe, and the next `reset` clears them.
        self.tape.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn registry(&self) -> MutexGuard<'_, Registry> {
        self.params.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Turns recording on or off. Off (validation, inference), every operation just computes.
    pub fn set_recording(&self, on: bool) {
        self.tape().recording = on;
    }

    /// Forgets every recorded operation (call between steps). Tensors recorded before keep their
    /// values but can no longer take part in a gradient: using one in a recorded operation is an
    /// error rather than a silently missing gradient.
    pub fn reset(&self) {
        self.tape().reset();
    }

    /// Operations on the tape now (for tests and memory reports).
    pub fn recorded_ops(&self) -> usize {
        self.tape().nodes.len()
    }

    /// An input tensor whose gradient the next backward pass reports in [`Gradients`].
    pub fn leaf(&self, shape: &[usize], data: &[f32]) -> Result<TapeTensor> {
        let value = Arc::new(CpuTensor::new(shape.to_vec(), data.to_vec())?);
        let mut tape = self.tape();
        let id = tape.new_id();
        tape.leaves.insert(id);
        Ok(TapeTensor { value, id, generation: tape.generation, requires_grad: true })
    }

    /// Registers (or, for a name seen before, overwrites) a trainable f32 weight.
    pub fn trainable_weight(&self, name: &str, shape: &[usize], values: Vec<f32>) -> Result<TapeWeight> {
        let index = self.registry().register(name, shape, values)?;
        Ok(TapeWeight { shape: shape.to_vec(), kind: ParamOr::Param(index) })
    }

    /// Registers (or overwrites) a trainable f32 vector.
    pub fn trainable_vector(&self, name: &str, shape: &[usize], values: Vec<f32>) -> Result<TapeVector> {
        let index = self.registry().register(name, shape, values)?;
        Ok(TapeVector { shape: shape.to_vec(), kind: ParamOr::Param(index) })
    }

    /// Every trainable parameter, in registration order.
    pub fn parameters(&self) -> Vec<ParamInfo> {
        self.registry().infos()
    }

    /// Current values of parameter `name`.
    pub fn param_values(&self, name: &str) -> Result<Vec<f32>> {
        self.registry().get(name).map(|p| p.value.clone())
    }

    /// Accumulated gradient of parameter `name`.
    pub fn param_grad(&self, name: &str) -> Result<Vec<f32>> {
        self.registry().get(name).map(|p| p.grad.clone())
    }

    /// Replaces the values of parameter `name` (same element count).
    pub fn set_param_values(&self, name: &str, values: &[f32]) -> Result<()> {
        self.registry().set(name, values)
    }

    /// Sets every accumulated gradient to zero.
    pub fn zero_grads(&self) {
        self.registry().zero_grads();
    }

    /// Runs `f(name, values, grad)` on every parameter in registration order; the optimizer's
    /// update goes through here.
    pub fn update_params(&self, mut f: impl FnMut(&str, &mut [f32], &[f32])) {
        let mut reg = self.registry();
        for p in reg.params.iter_mut() {
            f(&p.name, &mut p.value, &p.grad);
            p.cached = None;
        }
    }

    /// Backpropagates `seed` (the gradient of the loss with respect to `output`, same shape)
    /// through every operation recorded since the last [`TapeBackend::reset`]. Parameter
    /// gradients are *added* to the registry; gradients of [`TapeBackend::leaf`] tensors are
    /// returned.
    pub fn backward(&self, output: &TapeTensor, seed: &[f32]) -> Result<Gradients> {
        if seed.len() != output.value.data.len() {
            return Err(Error::Shape(format!("backward: seed of {} values for an output of shape {:?}", seed.len(), output.value.shape)));
        }
        if !output.requires_grad {
            return Err(Error::Backend("backward: the output depends on no trainable parameter or leaf (was recording off?)".into()));
        }
        let tape = self.tape();
        if output.generation != tape.generation {
            return Err(Error::Backend("backward: the output was recorded before the last reset".into()));
        }
        tape.backward(self, output.id, seed.to_vec())
    }
}

impl std::fmt::Debug for TapeBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TapeBackend").field("recorded_ops", &self.recorded_ops()).field("parameters", &self.registry().params.len()).finish()
    }
}
