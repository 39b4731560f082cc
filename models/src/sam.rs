//! The whole model: image encoder, prompt encoder and mask decoder behind one [`Segmenter`],
//! with each family's pre- and post-processing (`crate::pipeline`).
//!
//! Encoding and decoding are separate calls because their costs differ by two orders of
//! magnitude: an interactive client re-prompts the same frame many times, and only the decoder
//! has to run again ([`ImageEmbedding`] is the cache).

use crate::backend::Backend;
use crate::config::{EncoderConfig, ModelConfig};
use crate::image::{Mask, RgbImage};
use crate::nets::mask_decoder::MaskDecoder;
use crate::nets::prompt_encoder::PromptEncoder;
use crate::nets::tiny_vit::TinyVit;
use crate::nets::vit::VitEncoder;
use crate::pipeline::{self, Geometry};
use crate::prompt::Prompts;
use crate::store::WeightStore;
use crate::{Error, Result};

/// The image encoders the packed format can hold.
pub enum ImageEncoder<B: Backend> {
    Vit(VitEncoder<B>),
    TinyVit(TinyVit<B>),
}

impl<B: Backend> ImageEncoder<B> {
    fn load(b: &B, store: &dyn WeightStore, config: &ModelConfig) -> Result<Self> {
        Ok(match &config.encoder {
            EncoderConfig::Vit(c) => Self::Vit(VitEncoder::load(b, store, c, config.image_size)?),
            EncoderConfig::TinyVit(c) => Self::TinyVit(TinyVit::load(b, store, c, config.image_size)?),
        })
    }

    /// `image` is `[1, 3, S, S]`; returns the embedding `[1, 256, 64, 64]`.
    fn forward(&self, b: &B, image: &B::Tensor) -> Result<B::Tensor> {
        match self {
            Self::Vit(e) => e.forward(b, image),
            Self::TinyVit(e) => e.forward(b, image),
        }
    }
}

/// One encoded frame: reusable for any number of prompts on the same image.
pub struct ImageEmbedding<B: Backend> {
    pub embedding: B::Tensor,
    pub geometry: Geometry,
}

/// The decoder's answer for one prompt set.
#[derive(Clone, Debug)]
pub struct Segmentation {
    /// One mask per output (1, or 3 with multimask), at the original resolution.
    pub masks: Vec<Mask>,
    /// The decoder's predicted IoU of each mask.
    pub iou: Vec<f32>,
    /// `[k, L, L]` logits before any resizing (L = 4 × embedding size = 256).
    pub low_res_logits: Vec<f32>,
}

pub struct Segmenter<B: Backend> {
    backend: B,
    config: ModelConfig,
    encoder: ImageEncoder<B>,
    prompt_encoder: PromptEncoder<B>,
    mask_decoder: MaskDecoder<B>,
}

impl<B: Backend> Segmenter<B> {
    /// Builds every network from `store`; shapes are checked tensor by tensor, so a checkpoint
    /// that does not match `config` is refused here, naming the first tensor that differs.
    pub fn load(backend: B, store: &dyn WeightStore, config: &ModelConfig) -> Result<Self> {
        let encoder = ImageEncoder::load(&backend, store, config)?;
        let prompt_encoder = PromptEncoder::load(&backend, store, config)?;
        let mask_decoder = MaskDecoder::load(&backend, store, config)?;
        Ok(Self { backend, config: config.clone(), encoder, prompt_encoder, mask_decoder })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Preprocesses `image` and runs the image encoder.
    pub fn encode(&self, image: &RgbImage) -> Result<ImageEmbedding<B>> {
        let geometry = Geometry::new(image.height, image.width, self.config.image_size);
        let input = pipeline::preprocess(self.config.preprocess, image, &geometry)?;
        self.encode_preprocessed(&input, geometry)
    }

    /// Runs the encoder on an already preprocessed `[3, S, S]` input (golden tests feed the
    /// reference's own input through here to separate preprocessing from network error).
    pub fn encode_preprocessed(&self, input: &[f32], geometry: Geometry) -> Result<ImageEmbedding<B>> {
        let s = self.config.image_size;
        let x = self.backend.from_host(&[1, 3, s, s], input)?;
        let embedding = self.encoder.forward(&self.backend, &x)?;
        Ok(ImageEmbedding { embedding, geometry })
    }

    /// Runs prompt encoder and mask decoder for one prompt set on an encoded frame.
    pub fn decode(&self, emb: &ImageEmbedding<B>, prompts: &Prompts, multimask: bool) -> Result<Segmentation> {
        let (h, w) = emb.geometry.original;
        prompts.validate(w, h)?;
        let input = pipeline::transform_prompts(self.config.preprocess, prompts, &emb.geometry);
        let b = &self.backend;
        let (sparse, dense) = self.prompt_encoder.embed(b, &input.points, &input.boxes, None)?;
        let pe = self.prompt_encoder.dense_positional_encoding();
        let (masks, iou) = self.mask_decoder.forward(b, &emb.embedding, pe, &sparse, &dense, multimask)?;

        let shape = b.shape(&masks).to_vec();
        let (k, low_res) = match shape.as_slice() {
            [1, k, lh, lw] if lh == lw => (*k, *lh),
            other => return Err(Error::Shape(format!("mask decoder returned {other:?}, expected [1, k, L, L]"))),
        };
        let low_res_logits = b.to_host(&masks)?;
        let masks = low_res_logits
            .chunks_exact(low_res * low_res)
            .take(k)
            .map(|plane| pipeline::postprocess(self.config.preprocess, plane, low_res, &emb.geometry))
            .collect::<Result<Vec<_>>>()?;
        Ok(Segmentation { masks, iou, low_res_logits })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::CpuBackend;
    use crate::import::Checkpoint;
    use crate::prompt::BoxPrompt;

    /// The committed tiny SAM checkpoint (official layout, random weights; see tests/fixtures).
    fn tiny_sam() -> Segmenter<CpuBackend> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny_sam/tiny_sam.pth");
        let ckpt = Checkpoint::open(&path).expect("committed tiny SAM fixture");
        Segmenter::load(CpuBackend::new(2).unwrap(), &ckpt, ckpt.config()).unwrap()
    }

    #[test]
    fn a_second_frame_allocates_no_activation_buffers() {
        let segmenter = tiny_sam();
        let grey: Vec<u8> = (0..200 * 150).map(|i| (i * 37 % 251) as u8).collect();
        let image = RgbImage::from_grey(200, 150, &grey).unwrap();
        let prompts = Prompts::with_box(BoxPrompt { x0: 40.0, y0: 30.0, x1: 150.0, y1: 120.0 });
        let frame = |s: &Segmenter<CpuBackend>| {
            let emb = s.encode(&image).unwrap();
            s.decode(&emb, &prompts, true).unwrap()
        };
        let first = frame(&segmenter);
        let after_first = segmenter.backend().fresh_allocations();
        assert!(after_first > 0, "the first frame sizes the pool");
        let second = frame(&segmenter);
        assert_eq!(segmenter.backend().fresh_allocations(), after_first, "steady state must reuse pooled buffers");
        assert_eq!(first.low_res_logits, second.low_res_logits, "recycled buffers must not change results");
    }
}
