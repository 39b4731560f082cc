//! The SAM networks assembled for training: the same `crate::nets` modules the `Segmenter` runs,
//! but with the encoder input and the mask logits as backend tensors, so a loss can be
//! backpropagated from the logits (the `Segmenter` downloads them to host vectors).

use crate::backend::Backend;
use crate::config::{EncoderConfig, ModelConfig};
use crate::nets::mask_decoder::MaskDecoder;
use crate::nets::prompt_encoder::PromptEncoder;
use crate::nets::tiny_vit::TinyVit;
use crate::nets::vit::VitEncoder;
use crate::pipeline::InputPrompts;
use crate::store::WeightStore;
use crate::Result;

/// The image encoders a training run can wrap.
pub enum TrainEncoder<B: Backend> {
    Vit(VitEncoder<B>),
    TinyVit(TinyVit<B>),
}

/// Image encoder, prompt encoder and mask decoder of one model.
pub struct SamModel<B: Backend> {
    pub config: ModelConfig,
    pub encoder: TrainEncoder<B>,
    pub prompt_encoder: PromptEncoder<B>,
    pub mask_decoder: MaskDecoder<B>,
}

impl<B: Backend> SamModel<B> {
    /// Loads every network from `store` (shapes checked by name, as `Segmenter::load`).
    pub fn load(b: &B, store: &dyn WeightStore, config: &ModelConfig) -> Result<Self> {
        let encoder = match &config.encoder {
            EncoderConfig::Vit(c) => TrainEncoder::Vit(VitEncoder::load(b, store, c, config.image_size)?),
            EncoderConfig::TinyVit(c) => TrainEncoder::TinyVit(TinyVit::load(b, store, c, config.image_size)?),
        };
        Ok(Self { config: config.clone(), encoder, prompt_encoder: PromptEncoder::load(b, store, config)?, mask_decoder: MaskDecoder::load(b, store, config)? })
    }

    /// `input`: the preprocessed image `[1, 3, S, S]` → embedding `[1, C, E, E]`.
    pub fn encode(&self, b: &B, input: &B::Tensor) -> Result<B::Tensor> {
        match &self.encoder {
            TrainEncoder::Vit(e) => e.forward(b, input),
            TrainEncoder::TinyVit(e) => e.forward(b, input),
        }
    }

    /// Prompts already in the encoder-input frame (`pipeline::transform_prompts`) → mask logits
    /// `[1, k, 4E, 4E]` (k = 1, or 3 with `multimask`).
    pub fn decode(&self, b: &B, embedding: &B::Tensor, prompts: &InputPrompts, multimask: bool) -> Result<B::Tensor> {
        let (sparse, dense) = self.prompt_encoder.embed(b, &prompts.points, &prompts.boxes, None)?;
        let (masks, _iou) = self.mask_decoder.forward(b, embedding, self.prompt_encoder.token_positional_encoding(), &sparse, &dense, multimask)?;
        Ok(masks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autograd::{whole_model_check, TapeBackend};
    use crate::import::Checkpoint;
    use rand::{Rng, SeedableRng};

    /// Whole-model check on the committed tiny SAM (ViT with windowed and global attention,
    /// decomposed rel-pos computed from q, neck convs and LayerNorm2d, two-way transformer,
    /// transposed-conv upscaling, hypernetwork MLPs): d(loss)/d(weight entries) from the tape vs
    /// central differences through the real forward. The loss is `Σ r ⊙ logits`.
    #[test]
    fn tiny_sam_weight_gradients_match_finite_differences() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny_sam/tiny_sam.pth");
        let ckpt = Checkpoint::open(&path).expect("committed tiny SAM fixture");
        let trainable = [
            "image_encoder.blocks.0.attn.qkv.weight",
            "image_encoder.blocks.1.mlp.lin1.weight",
            "image_encoder.neck.0.weight",
            "image_encoder.neck.1.weight",
            "image_encoder.neck.2.weight",
            "mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj.weight",
            "mask_decoder.transformer.layers.1.mlp.lin2.bias",
            "mask_decoder.output_upscaling.0.weight",
            "mask_decoder.output_hypernetworks_mlps.0.layers.0.weight",
        ];
        let be = TapeBackend::new(2, Box::new(move |n: &str| trainable.contains(&n))).unwrap();
        let model = SamModel::load(&be, &ckpt, ckpt.config()).unwrap();
        let names: Vec<String> = be.parameters().into_iter().map(|p| p.name).collect();
        assert_eq!(names.len(), trainable.len(), "every chosen tensor is a parameter: {names:?}");

        let seed = whole_model_check::seed();
        eprintln!("seed {seed}");
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let s = model.config.image_size;
        let image: Vec<f32> = (0..3 * s * s).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let prompts = InputPrompts { boxes: vec![[20.0, 30.0, 100.0, 110.0]], points: vec![] };
        let forward = || -> Vec<f32> {
            let x = be.from_host(&[1, 3, s, s], &image).unwrap();
            let emb = model.encode(&be, &x).unwrap();
            be.to_host(&model.decode(&be, &emb, &prompts, false).unwrap()).unwrap()
        };
        be.set_recording(false);
        let base = forward();
        let r: Vec<f32> = (0..base.len()).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let loss = |logits: &[f32]| logits.iter().zip(&r).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>();

        be.set_recording(true);
        let x = be.from_host(&[1, 3, s, s], &image).unwrap();
        let emb = model.encode(&be, &x).unwrap();
        let logits = model.decode(&be, &emb, &prompts, false).unwrap();
        assert_eq!(be.to_host(&logits).unwrap(), base, "recording must not change the forward");
        be.backward(&logits, &r).unwrap();
        be.set_recording(false);

        let mut total = whole_model_check::Compared::default();
        for name in &names {
            let grad = be.param_grad(name).unwrap();
            // The entries with the largest gradients (where differences are meaningful) and a few random ones.
            let mut order: Vec<usize> = (0..grad.len()).collect();
            order.sort_by(|&a, &b| grad[b].abs().total_cmp(&grad[a].abs()));
            let mut picked: Vec<usize> = order[..3.min(order.len())].to_vec();
            picked.extend((0..3).map(|_| rng.gen_range(0..grad.len())));
            let c = whole_model_check::compare_entries(&be, name, &grad, &picked, &|| loss(&forward()));
            total.checked += c.checked;
            total.not_smooth += c.not_smooth;
            total.outliers += c.outliers;
        }
        whole_model_check::assert_mostly_smooth(&total);
    }
}
