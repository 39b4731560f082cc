//! The registry of trainable parameters: values, accumulated gradients, and an f32 snapshot the
//! forward ops borrow (rebuilt only after an update).

use std::sync::Arc;

use crate::store::TensorData;
use crate::{Error, Result};

/// Name and shape of a trainable parameter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamInfo {
    pub name: String,
    pub shape: Vec<usize>,
}

impl ParamInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

#[derive(Debug)]
pub(super) struct Param {
    pub name: String,
    pub shape: Vec<usize>,
    pub value: Vec<f32>,
    pub grad: Vec<f32>,
    /// `value` as shared f32 data for the forward ops; `None` after a change.
    pub cached: Option<Arc<[f32]>>,
}

#[derive(Debug, Default)]
pub(super) struct Registry {
    pub params: Vec<Param>,
}

impl Registry {
    /// Index of `name`, registering it (or overwriting its values and zeroing its gradient).
    pub fn register(&mut self, name: &str, shape: &[usize], value: Vec<f32>) -> Result<usize> {
        if shape.iter().product::<usize>() != value.len() {
            return Err(Error::Shape(format!("parameter {name}: shape {shape:?} but {} values", value.len())));
        }
        let grad = vec![0.0; value.len()];
        let fresh = Param { name: name.to_string(), shape: shape.to_vec(), value, grad, cached: None };
        match self.params.iter().position(|p| p.name == name) {
            Some(i) if self.params[i].shape == shape => {
                self.params[i] = fresh;
                Ok(i)
            }
            Some(i) => Err(Error::Shape(format!("parameter {name} registered again with shape {shape:?}, was {:?}", self.params[i].shape))),
            None => {
                self.params.push(fresh);
                Ok(self.params.len() - 1)
            }
        }
    }

    pub fn get(&self, name: &str) -> Result<&Param> {
        self.params.iter().find(|p| p.name == name).ok_or_else(|| Error::MissingTensor(format!("trainable parameter {name}")))
    }

    pub fn set(&mut self, name: &str, values: &[f32]) -> Result<()> {
        let p = self.params.iter_mut().find(|p| p.name == name).ok_or_else(|| Error::MissingTensor(format!("trainable parameter {name}")))?;
        if p.value.len() != values.len() {
            return Err(Error::Shape(format!("parameter {name} has {} values, got {}", p.value.len(), values.len())));
        }
        p.value.copy_from_slice(values);
        p.cached = None;
        Ok(())
    }

    pub fn zero_grads(&mut self) {
        self.params.iter_mut().for_each(|p| p.grad.iter_mut().for_each(|g| *g = 0.0));
    }

    pub fn infos(&self) -> Vec<ParamInfo> {
        self.params.iter().map(|p| ParamInfo { name: p.name.clone(), shape: p.shape.clone() }).collect()
    }

    /// The current value of parameter `index` as shared f32 data.
    pub fn data(&mut self, index: usize) -> TensorData {
        let p = &mut self.params[index];
        let arc = p.cached.get_or_insert_with(|| p.value.as_slice().into()).clone();
        TensorData::F32(arc)
    }

    /// Adds `g` into the gradient of parameter `index`.
    pub fn accumulate(&mut self, index: usize, g: &[f32]) {
        for (a, &b) in self.params[index].grad.iter_mut().zip(g) {
            *a += b;
        }
    }
}
