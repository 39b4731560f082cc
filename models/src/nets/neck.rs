//! SAM's neck, shared by every image encoder: it maps the encoder's last feature map to the
//! 256-channel image embedding the prompt encoder and mask decoder expect
//! (`image_encoder.neck.{0,1,2,3}` in every SAM-family checkpoint).

use crate::backend::{Activation, Backend, Conv2dSpec};
use crate::nets::common::{Conv2d, Norm};
use crate::store::WeightStore;
use crate::Result;

/// SAM's LayerNorm2d epsilon.
const NECK_NORM_EPS: f32 = 1e-6;

/// 1x1 conv (no bias) → LayerNorm2d → 3x3 conv pad 1 (no bias) → LayerNorm2d.
pub(crate) struct Neck<B: Backend> {
    reduce: Conv2d<B>,
    reduce_norm: Norm<B>,
    mix: Conv2d<B>,
    mix_norm: Norm<B>,
}

impl<B: Backend> Neck<B> {
    /// Loads `image_encoder.neck.0` `[out, in, 1, 1]`, `.2` `[out, out, 3, 3]` and the two `[out]`
    /// norms `.1` and `.3`.
    pub(crate) fn load(b: &B, store: &dyn WeightStore, in_dim: usize, out_dim: usize) -> Result<Self> {
        let prefix = "image_encoder.neck";
        let pointwise = Conv2dSpec { stride: 1, padding: 0, groups: 1 };
        let same_3x3 = Conv2dSpec { stride: 1, padding: 1, groups: 1 };
        Ok(Self {
            reduce: Conv2d::load(b, store, &format!("{prefix}.0"), in_dim, out_dim, 1, pointwise)?,
            reduce_norm: Norm::load(b, store, &format!("{prefix}.1"), out_dim, NECK_NORM_EPS)?,
            mix: Conv2d::load(b, store, &format!("{prefix}.2"), out_dim, out_dim, 3, same_3x3)?,
            mix_norm: Norm::load(b, store, &format!("{prefix}.3"), out_dim, NECK_NORM_EPS)?,
        })
    }

    /// `x: [B, C, G, G]` → `[B, out, G, G]`.
    pub(crate) fn forward(&self, b: &B, x: &B::Tensor) -> Result<B::Tensor> {
        let h = self.reduce.forward(b, x, Activation::None)?;
        let h = self.reduce_norm.forward_nchw(b, &h)?;
        let h = self.mix.forward(b, &h, Activation::None)?;
        self.mix_norm.forward_nchw(b, &h)
    }
}
