//! Parameter holders shared by every network: each loads itself from a [`WeightStore`] by name
//! prefix, checking shapes, and runs through a [`Backend`].

use crate::backend::{Activation, Backend, Conv2dSpec};
pub use crate::backend::Lora;
use crate::store::WeightStore;
use crate::Result;

/// `y = x·Wᵀ + b`, `W: [out, in]` as `torch.nn.Linear`, plus the LoRA update of the bound
/// adapter, if any (`Segmenter::set_adapter` binds it by [`Linear::name`]).
pub struct Linear<B: Backend> {
    /// Checkpoint name prefix (`image_encoder.blocks.0.attn.qkv`): the adapter's key.
    pub name: String,
    pub weight: B::Weight,
    pub bias: Option<B::Vector>,
    pub in_features: usize,
    pub out_features: usize,
    pub lora: Option<Lora<B>>,
}

impl<B: Backend> Linear<B> {
    /// Loads `{prefix}.weight` `[out, in]` and `{prefix}.bias` `[out]` (the bias if present).
    pub fn load(b: &B, store: &dyn WeightStore, prefix: &str, in_features: usize, out_features: usize) -> Result<Self> {
        let w = store.get_shaped(&format!("{prefix}.weight"), &[out_features, in_features])?;
        let bias_name = format!("{prefix}.bias");
        let bias = if store.contains(&bias_name) { Some(b.vector(&store.get_shaped(&bias_name, &[out_features])?)?) } else { None };
        Ok(Self { name: prefix.to_string(), weight: b.weight(&w)?, bias, in_features, out_features, lora: None })
    }

    pub fn forward(&self, b: &B, x: &B::Tensor, act: Activation) -> Result<B::Tensor> {
        b.linear_lora(x, &self.weight, self.bias.as_ref(), act, self.lora.as_ref())
    }
}

/// `torch.nn.Conv2d` (NCHW). BatchNorms that followed a convolution in the checkpoint are
/// already folded into its weight and bias by the importer.
pub struct Conv2d<B: Backend> {
    pub weight: B::Weight,
    pub bias: Option<B::Vector>,
    pub spec: Conv2dSpec,
    pub out_channels: usize,
}

impl<B: Backend> Conv2d<B> {
    /// Loads `{prefix}.weight` `[c_out, c_in/groups, k, k]` and the optional `{prefix}.bias`.
    #[allow(clippy::too_many_arguments)]
    pub fn load(b: &B, store: &dyn WeightStore, prefix: &str, c_in: usize, c_out: usize, kernel: usize, spec: Conv2dSpec) -> Result<Self> {
        let w = store.get_shaped(&format!("{prefix}.weight"), &[c_out, c_in / spec.groups, kernel, kernel])?;
        let bias_name = format!("{prefix}.bias");
        let bias = if store.contains(&bias_name) { Some(b.vector(&store.get_shaped(&bias_name, &[c_out])?)?) } else { None };
        Ok(Self { weight: b.weight(&w)?, bias, spec, out_channels: c_out })
    }

    pub fn forward(&self, b: &B, x: &B::Tensor, act: Activation) -> Result<B::Tensor> {
        b.conv2d(x, &self.weight, self.bias.as_ref(), self.spec, act)
    }
}

/// Affine parameters of a LayerNorm (`torch.nn.LayerNorm` or SAM's `LayerNorm2d`).
pub struct Norm<B: Backend> {
    pub gamma: B::Vector,
    pub beta: B::Vector,
    pub eps: f32,
}

impl<B: Backend> Norm<B> {
    pub fn load(b: &B, store: &dyn WeightStore, prefix: &str, dim: usize, eps: f32) -> Result<Self> {
        Ok(Self {
            gamma: b.vector(&store.get_shaped(&format!("{prefix}.weight"), &[dim])?)?,
            beta: b.vector(&store.get_shaped(&format!("{prefix}.bias"), &[dim])?)?,
            eps,
        })
    }
    /// Over the last axis.
    pub fn forward(&self, b: &B, x: &B::Tensor) -> Result<B::Tensor> {
        b.layer_norm(x, &self.gamma, &self.beta, self.eps)
    }
    /// Over the channel axis of NCHW.
    pub fn forward_nchw(&self, b: &B, x: &B::Tensor) -> Result<B::Tensor> {
        b.layer_norm_nchw(x, &self.gamma, &self.beta, self.eps)
    }
}
