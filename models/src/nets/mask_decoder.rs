//! SAM's mask decoder: from an image embedding and one prompt set's tokens to low-resolution mask
//! logits `[1, k, 4E, 4E]` and the predicted IoU of each mask.
//!
//! Why it looks the way it does (`segment_anything/modeling/mask_decoder.py`, `predict_masks`):
//! - Learned output tokens (one IoU token, `num_multimask_outputs + 1` mask tokens) are prepended
//!   to the prompt tokens and run through the [`TwoWayTransformer`] together with the image
//!   embedding plus the dense prompt embedding.
//! - The image tokens come back as a 64x64 map and are upscaled 4x by two 2x2/stride-2 transposed
//!   convolutions to 32 channels; each mask token goes through its own 3-layer hypernetwork MLP
//!   to 32 weights, and a mask is the dot product of those weights with every upscaled pixel.
//!   The upscaling and that product are one backend operation ([`Backend::upscale_masks`]), so
//!   that a backend can keep the tokens channels-last and never write the upscaled embedding.
//! - Mask token 0 is the single-mask output, tokens 1.. are the three multimask outputs. Only the
//!   selected tokens' hypernetworks are evaluated: each mask is an independent row of the final
//!   product, so the result equals computing all of them and slicing.
//! - LiteMedSAM (`CVPR24_LiteMedSAM_infer.py`) uses this standard decoder with boxes only and
//!   `multimask_output=False`.
//!
//! Weight names (under `mask_decoder`): `transformer.*`, `iou_token`, `mask_tokens`,
//! `output_upscaling.{0,1,3}`, `output_hypernetworks_mlps.{i}.layers.{0,1,2}`,
//! `iou_prediction_head.layers.{0..depth}`.

use std::ops::Range;

use crate::backend::{Activation, Backend};
use crate::config::ModelConfig;
use crate::nets::common::{Linear, Norm};
use crate::nets::prompt_encoder::DensePrompt;
use crate::nets::transformer::{nchw_to_tokens, TwoWayTransformer};
use crate::store::WeightStore;
use crate::{Error, Result};

/// Checkpoint name prefix of the decoder.
const PREFIX: &str = "mask_decoder";
/// SAM's `LayerNorm2d` default, used in `output_upscaling`.
const LAYER_NORM_2D_EPS: f32 = 1e-6;
/// Layers of each hypernetwork MLP.
const HYPERNETWORK_DEPTH: usize = 3;
/// Kernel and stride of both transposed convolutions of `output_upscaling` (what
/// [`Backend::upscale_masks`] computes).
const UPSCALE_STRIDE: usize = 2;

/// `torch.nn.ConvTranspose2d` whose kernel equals its stride, weight `[C_in, C_out, k, k]`.
struct ConvTranspose2d<B: Backend> {
    weight: B::Weight,
    bias: Option<B::Vector>,
}

impl<B: Backend> ConvTranspose2d<B> {
    /// Loads `{prefix}.weight` `[c_in, c_out, stride, stride]` and the optional `{prefix}.bias`.
    fn load(b: &B, store: &dyn WeightStore, prefix: &str, c_in: usize, c_out: usize, stride: usize) -> Result<Self> {
        let w = store.get_shaped(&format!("{prefix}.weight"), &[c_in, c_out, stride, stride])?;
        let bias_name = format!("{prefix}.bias");
        let bias = if store.contains(&bias_name) { Some(b.vector(&store.get_shaped(&bias_name, &[c_out])?)?) } else { None };
        Ok(Self { weight: b.weight(&w)?, bias })
    }
}

/// SAM's `MLP` (MaskFormer style): linear layers with ReLU between them, none after the last.
struct Mlp<B: Backend> {
    layers: Vec<Linear<B>>,
}

impl<B: Backend> Mlp<B> {
    /// Loads `{prefix}.layers.{0..depth}`: `input → hidden → … → hidden → output`.
    fn load(b: &B, store: &dyn WeightStore, prefix: &str, (input, hidden, output): (usize, usize, usize), depth: usize) -> Result<Self> {
        if depth == 0 {
            return Err(Error::Input(format!("{prefix}: an MLP needs at least one layer")));
        }
        let layers = (0..depth)
            .map(|i| {
                let fan_in = if i == 0 { input } else { hidden };
                let fan_out = if i + 1 == depth { output } else { hidden };
                Linear::load(b, store, &format!("{prefix}.layers.{i}"), fan_in, fan_out)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { layers })
    }

    /// `x: [.., input]` → `[.., output]`.
    fn forward(&self, b: &B, x: &B::Tensor) -> Result<B::Tensor> {
        let last = self.layers.len() - 1;
        let mut y = self.layers[0].forward(b, x, activation_after(0, last))?;
        for (i, layer) in self.layers.iter().enumerate().skip(1) {
            y = layer.forward(b, &y, activation_after(i, last))?;
        }
        Ok(y)
    }
}

/// ReLU after every MLP layer but the last.
fn activation_after(layer: usize, last: usize) -> Activation {
    if layer < last {
        Activation::Relu
    } else {
        Activation::None
    }
}

/// `output_upscaling`: ConvTranspose 2x2/2 → LayerNorm2d → GELU → ConvTranspose 2x2/2 → GELU.
struct OutputUpscaling<B: Backend> {
    up1: ConvTranspose2d<B>,
    norm: Norm<B>,
    up2: ConvTranspose2d<B>,
}

impl<B: Backend> OutputUpscaling<B> {
    fn load(b: &B, store: &dyn WeightStore, dim: usize) -> Result<Self> {
        let p = format!("{PREFIX}.output_upscaling");
        Ok(Self {
            up1: ConvTranspose2d::load(b, store, &format!("{p}.0"), dim, dim / 4, UPSCALE_STRIDE)?,
            norm: Norm::load(b, store, &format!("{p}.1"), dim / 4, LAYER_NORM_2D_EPS)?,
            up2: ConvTranspose2d::load(b, store, &format!("{p}.3"), dim / 4, dim / 8, UPSCALE_STRIDE)?,
        })
    }

    /// The layers as [`Backend::upscale_masks`] takes them.
    fn layers(&self) -> crate::backend::OutputUpscaling<'_, B> {
        crate::backend::OutputUpscaling {
            up1: &self.up1.weight,
            up1_bias: self.up1.bias.as_ref(),
            norm_gamma: &self.norm.gamma,
            norm_beta: &self.norm.beta,
            norm_eps: self.norm.eps,
            up2: &self.up2.weight,
            up2_bias: self.up2.bias.as_ref(),
        }
    }
}

/// SAM's mask decoder for one prompt set (batch 1).
pub struct MaskDecoder<B: Backend> {
    transformer: TwoWayTransformer<B>,
    /// `iou_token.weight` `[1, C]` followed by `mask_tokens.weight` `[num_mask_tokens, C]`.
    iou_token: B::Vector,
    mask_tokens: B::Vector,
    output_upscaling: OutputUpscaling<B>,
    output_hypernetworks_mlps: Vec<Mlp<B>>,
    iou_prediction_head: Mlp<B>,
    transformer_dim: usize,
    num_mask_tokens: usize,
}

impl<B: Backend> MaskDecoder<B> {
    /// Loads every tensor under `mask_decoder.`, checking shapes against `cfg`.
    pub fn load(b: &B, store: &dyn WeightStore, cfg: &ModelConfig) -> Result<Self> {
        let dim = cfg.prompt_embed_dim;
        let dc = &cfg.decoder;
        let num_mask_tokens = dc.num_multimask_outputs + 1;
        let output_hypernetworks_mlps = (0..num_mask_tokens)
            .map(|i| Mlp::load(b, store, &format!("{PREFIX}.output_hypernetworks_mlps.{i}"), (dim, dim, dim / 8), HYPERNETWORK_DEPTH))
            .collect::<Result<Vec<_>>>()?;
        let iou_head_dims = (dim, dc.iou_head_hidden_dim, num_mask_tokens);
        Ok(Self {
            transformer: TwoWayTransformer::load(b, store, &format!("{PREFIX}.transformer"), dim, dc)?,
            iou_token: b.vector(&store.get_shaped(&format!("{PREFIX}.iou_token.weight"), &[1, dim])?)?,
            mask_tokens: b.vector(&store.get_shaped(&format!("{PREFIX}.mask_tokens.weight"), &[num_mask_tokens, dim])?)?,
            output_upscaling: OutputUpscaling::load(b, store, dim)?,
            output_hypernetworks_mlps,
            iou_prediction_head: Mlp::load(b, store, &format!("{PREFIX}.iou_prediction_head"), iou_head_dims, dc.iou_head_depth)?,
            transformer_dim: dim,
            num_mask_tokens,
        })
    }

    /// Every [`Linear`] of the decoder (transformer, hypernetwork MLPs, IoU head), for adapter
    /// binding.
    pub fn linears_mut(&mut self, f: &mut dyn FnMut(&mut Linear<B>)) {
        self.transformer.linears_mut(f);
        for mlp in &mut self.output_hypernetworks_mlps {
            mlp.layers.iter_mut().for_each(&mut *f);
        }
        self.iou_prediction_head.layers.iter_mut().for_each(&mut *f);
    }

    /// `image_embedding: [1, C, E, E]`, `token_pe: [E·E, C]` (the grid's positional encoding in
    /// token layout, [`PromptEncoder::token_positional_encoding`]), `sparse: [1, n, C]`, `dense`
    /// a `[1, C, E, E]` mask embedding or `no_mask_embed` → (mask logits `[1, k, 4E, 4E]`, IoU
    /// predictions `k`), `k = 3` with `multimask_output` (outputs 1..) and `k = 1` without
    /// (output 0).
    ///
    /// [`PromptEncoder::token_positional_encoding`]: crate::nets::prompt_encoder::PromptEncoder::token_positional_encoding
    pub fn forward(
        &self,
        b: &B,
        image_embedding: &B::Tensor,
        token_pe: &B::Vector,
        sparse: &B::Tensor,
        dense: &DensePrompt<'_, B>,
        multimask_output: bool,
    ) -> Result<(B::Tensor, Vec<f32>)> {
        self.check_inputs(b, image_embedding, sparse, dense)?;
        let selected = self.selected_outputs(multimask_output);
        let tokens = self.decoder_tokens(b, sparse)?;
        // `src = image_embedding + dense`, flattened to tokens. Without a mask the dense part is
        // one vector per channel, added after the flattening (the same sums, in another layout).
        let src = match dense {
            DensePrompt::Mask(mask) => nchw_to_tokens(b, &b.add(image_embedding, mask)?)?,
            DensePrompt::NoMask(no_mask_embed) => b.add_vector(&nchw_to_tokens(b, image_embedding)?, no_mask_embed)?,
        };
        let (hs, image_tokens) = self.transformer.forward(b, &src, token_pe, &tokens)?;
        // `output_upscaling` of the image tokens and `hyper_in @ upscaled.view(1, C/8, L·L)`
        // over the selected mask tokens, as one backend operation.
        let hyper_in = self.hypernetwork_weights(b, &hs, selected.clone())?;
        let masks = b.upscale_masks(&image_tokens, b.shape(image_embedding)[2], &self.output_upscaling.layers(), &hyper_in)?;
        let iou = self.predict_iou(b, &hs)?;
        Ok((masks, iou[selected].to_vec()))
    }

    /// The mask outputs a call returns: `1..num_mask_tokens` for multimask, else `0..1`.
    fn selected_outputs(&self, multimask_output: bool) -> Range<usize> {
        if multimask_output {
            1..self.num_mask_tokens
        } else {
            0..1
        }
    }

    /// `sparse: [1, n, C]` → `[1, 1 + num_mask_tokens + n, C]` = cat(iou_token, mask_tokens, sparse).
    fn decoder_tokens(&self, b: &B, sparse: &B::Tensor) -> Result<B::Tensor> {
        let iou = b.tensor_from_vector(&self.iou_token)?;
        let masks = b.tensor_from_vector(&self.mask_tokens)?;
        let output_tokens = b.concat(&[&iou, &masks], 0)?;
        let output_tokens = b.reshape(output_tokens, &[1, 1 + self.num_mask_tokens, self.transformer_dim])?;
        b.concat(&[&output_tokens, sparse], 1)
    }

    /// Mask tokens `hs[:, 1 + i, :]` for `i` in `selected`, each through its hypernetwork →
    /// `[1, k, C/8]`.
    fn hypernetwork_weights(&self, b: &B, hs: &B::Tensor, selected: Range<usize>) -> Result<B::Tensor> {
        let per_token = selected
            .map(|i| {
                let token = b.narrow(hs, 1, 1 + i, 1)?;
                self.output_hypernetworks_mlps[i].forward(b, &token)
            })
            .collect::<Result<Vec<_>>>()?;
        let refs: Vec<&B::Tensor> = per_token.iter().collect();
        b.concat(&refs, 1)
    }

    /// The IoU token `hs[:, 0, :]` through the IoU head → one score per mask token (host).
    fn predict_iou(&self, b: &B, hs: &B::Tensor) -> Result<Vec<f32>> {
        let iou_token = b.narrow(hs, 1, 0, 1)?;
        b.to_host(&self.iou_prediction_head.forward(b, &iou_token)?)
    }

    /// Refuses inputs that are not one prompt set on one `[1, C, E, E]` embedding.
    fn check_inputs(&self, b: &B, image_embedding: &B::Tensor, sparse: &B::Tensor, dense: &DensePrompt<'_, B>) -> Result<()> {
        let c = self.transformer_dim;
        let emb = b.shape(image_embedding);
        let grid_ok = emb.len() == 4 && emb[0] == 1 && emb[1] == c;
        let dense_ok = match dense {
            DensePrompt::Mask(mask) => b.shape(mask) == emb,
            DensePrompt::NoMask(_) => true,
        };
        if !grid_ok || !dense_ok {
            let dense_shape = match dense {
                DensePrompt::Mask(mask) => format!("{:?}", b.shape(mask)),
                DensePrompt::NoMask(_) => "none".into(),
            };
            return Err(Error::Shape(format!("mask decoder: embedding {emb:?} and dense prompt {dense_shape} must both be [1, {c}, E, E]")));
        }
        match b.shape(sparse) {
            [1, _, sc] if *sc == c => Ok(()),
            other => Err(Error::Shape(format!("mask decoder: sparse prompt {other:?}, expected [1, n, {c}]"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::CpuBackend;
    use crate::import::Checkpoint;
    use crate::nets::prompt_encoder::PromptEncoder;
    use rand::{Rng, SeedableRng};
    use std::path::Path;

    const SHARED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared");

    /// The LiteMedSAM checkpoint, or `None` (and a SKIP line) where the shared folder is absent.
    fn lite_medsam() -> Option<Checkpoint> {
        let path = Path::new(SHARED).join("weights/lite_medsam.pth");
        if !path.exists() {
            eprintln!("SKIP: {} not found", path.display());
            return None;
        }
        Some(Checkpoint::open(&path).expect("lite_medsam.pth imports"))
    }

    /// Runs prompt encoder + decoder on a random `[1, 256, 64, 64]` embedding →
    /// (mask logits shape, logits, IoU scores).
    fn decode(ckpt: &Checkpoint, points: &[(f32, f32, i32)], boxes: &[[f32; 4]], multimask: bool) -> (Vec<usize>, Vec<f32>, Vec<f32>) {
        let b = CpuBackend::new(2).unwrap();
        let cfg = ckpt.config();
        let prompt_encoder = PromptEncoder::load(&b, ckpt, cfg).unwrap();
        let decoder = MaskDecoder::load(&b, ckpt, cfg).unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let (c, e) = (cfg.prompt_embed_dim, cfg.embedding_size);
        let embedding: Vec<f32> = (0..c * e * e).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
        let embedding = b.from_host(&[1, c, e, e], &embedding).unwrap();

        let (sparse, dense) = prompt_encoder.embed(&b, points, boxes, None).unwrap();
        let (masks, iou) = decoder.forward(&b, &embedding, prompt_encoder.token_positional_encoding(), &sparse, &dense, multimask).unwrap();
        (b.shape(&masks).to_vec(), b.to_host(&masks).unwrap(), iou)
    }

    #[test]
    fn lite_medsam_box_prompt_gives_one_finite_mask() {
        let Some(ckpt) = lite_medsam() else { return };
        let (shape, logits, iou) = decode(&ckpt, &[], &[[60.0, 70.0, 180.0, 200.0]], false);
        assert_eq!(shape, [1, 1, 256, 256]);
        assert_eq!(iou.len(), 1);
        assert!(logits.iter().chain(&iou).all(|v| v.is_finite()));
        let spread = logits.iter().cloned().fold(f32::MIN, f32::max) - logits.iter().cloned().fold(f32::MAX, f32::min);
        assert!(spread > 1.0, "logits should vary over the image, spread {spread}");
    }

    #[test]
    fn lite_medsam_points_with_multimask_give_three_masks() {
        let Some(ckpt) = lite_medsam() else { return };
        let (shape, logits, iou) = decode(&ckpt, &[(128.0, 128.0, 1), (20.0, 30.0, 0)], &[], true);
        assert_eq!(shape, [1, 3, 256, 256]);
        assert_eq!(iou.len(), 3);
        assert!(logits.iter().chain(&iou).all(|v| v.is_finite()));
    }

    #[test]
    fn lite_medsam_mask_prompt_is_downscaled_to_the_embedding_grid() {
        let Some(ckpt) = lite_medsam() else { return };
        let b = CpuBackend::new(2).unwrap();
        let prompt_encoder = PromptEncoder::load(&b, &ckpt, ckpt.config()).unwrap();
        let mask: Vec<f32> = (0..256 * 256).map(|i| if (i / 256) % 64 < 32 { 4.0 } else { -4.0 }).collect();
        let mask = b.from_host(&[1, 1, 256, 256], &mask).unwrap();
        let (sparse, dense) = prompt_encoder.embed(&b, &[(10.0, 10.0, 1)], &[], Some(&mask)).unwrap();
        assert_eq!(b.shape(&sparse), [1, 2, 256]);
        let DensePrompt::Mask(dense) = dense else { panic!("a mask prompt gives a dense tensor") };
        assert_eq!(b.shape(&dense), [1, 256, 64, 64]);
        assert!(b.to_host(&dense).unwrap().iter().all(|v| v.is_finite()));
        let wrong = b.from_host(&[1, 1, 64, 64], &[0.0; 64 * 64]).unwrap();
        assert!(prompt_encoder.embed(&b, &[], &[[0.0, 0.0, 9.0, 9.0]], Some(&wrong)).is_err());
    }

    mod tiny {
        //! The whole decoder at toy size against a direct f64 evaluation of `predict_masks`'s tail
        //! (the transformer itself is checked in `nets::transformer`).
        use super::super::*;
        use crate::config::{DecoderConfig, EncoderConfig, Preprocess, VitConfig};
        use crate::cpu::CpuBackend;
        use crate::store::MemoryStore as MapStore;
        use rand::{Rng, SeedableRng};
        use std::collections::BTreeMap;

        const DIM: usize = 16;
        const GRID: usize = 2;
        const N_SPARSE: usize = 2;

        /// Random filling and f64 read-back of the shared in-memory store.
        trait Fill {
            fn put(&mut self, rng: &mut rand_chacha::ChaCha8Rng, name: String, shape: &[usize]);
            fn values(&self, name: &str) -> Vec<f64>;
        }

        impl Fill for MapStore {
            fn put(&mut self, rng: &mut rand_chacha::ChaCha8Rng, name: String, shape: &[usize]) {
                let n = shape.iter().product();
                self.0.insert(name, (shape.to_vec(), (0..n).map(|_| rng.gen_range(-0.5f32..0.5)).collect()));
            }
            fn values(&self, name: &str) -> Vec<f64> {
                self.0[name].1.iter().map(|&v| v as f64).collect()
            }
        }

        fn config() -> ModelConfig {
            let decoder = DecoderConfig { num_heads: 2, mlp_dim: 32, iou_head_hidden_dim: 8, ..DecoderConfig::default() };
            ModelConfig {
                encoder: EncoderConfig::Vit(VitConfig::sam_b()),
                image_size: 4 * GRID * 4,
                prompt_embed_dim: DIM,
                embedding_size: GRID,
                mask_in_chans: 16,
                decoder,
                preprocess: Preprocess::Sam,
            }
        }

        /// Every decoder tensor at toy size, random.
        fn store(cfg: &ModelConfig) -> MapStore {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
            let mut s = MapStore(BTreeMap::new());
            let dc = &cfg.decoder;
            let linear = |s: &mut MapStore, rng: &mut _, p: String, i: usize, o: usize| {
                s.put(rng, format!("{p}.weight"), &[o, i]);
                s.put(rng, format!("{p}.bias"), &[o]);
            };
            for l in 0..dc.transformer_depth {
                let p = format!("{PREFIX}.transformer.layers.{l}");
                for (attn, internal) in [("self_attn", DIM), ("cross_attn_token_to_image", DIM / 2), ("cross_attn_image_to_token", DIM / 2)]
                {
                    for proj in ["q_proj", "k_proj", "v_proj"] {
                        linear(&mut s, &mut rng, format!("{p}.{attn}.{proj}"), DIM, internal);
                    }
                    linear(&mut s, &mut rng, format!("{p}.{attn}.out_proj"), internal, DIM);
                }
                linear(&mut s, &mut rng, format!("{p}.mlp.lin1"), DIM, dc.mlp_dim);
                linear(&mut s, &mut rng, format!("{p}.mlp.lin2"), dc.mlp_dim, DIM);
                for n in ["norm1", "norm2", "norm3", "norm4"] {
                    linear(&mut s, &mut rng, format!("{p}.{n}"), 1, DIM);
                    s.0.get_mut(&format!("{p}.{n}.weight")).unwrap().0 = vec![DIM];
                }
            }
            let p = format!("{PREFIX}.transformer");
            for proj in ["q_proj", "k_proj", "v_proj"] {
                linear(&mut s, &mut rng, format!("{p}.final_attn_token_to_image.{proj}"), DIM, DIM / 2);
            }
            linear(&mut s, &mut rng, format!("{p}.final_attn_token_to_image.out_proj"), DIM / 2, DIM);
            s.put(&mut rng, format!("{p}.norm_final_attn.weight"), &[DIM]);
            s.put(&mut rng, format!("{p}.norm_final_attn.bias"), &[DIM]);
            s.put(&mut rng, format!("{PREFIX}.iou_token.weight"), &[1, DIM]);
            s.put(&mut rng, format!("{PREFIX}.mask_tokens.weight"), &[4, DIM]);
            s.put(&mut rng, format!("{PREFIX}.output_upscaling.0.weight"), &[DIM, DIM / 4, 2, 2]);
            s.put(&mut rng, format!("{PREFIX}.output_upscaling.0.bias"), &[DIM / 4]);
            s.put(&mut rng, format!("{PREFIX}.output_upscaling.1.weight"), &[DIM / 4]);
            s.put(&mut rng, format!("{PREFIX}.output_upscaling.1.bias"), &[DIM / 4]);
            s.put(&mut rng, format!("{PREFIX}.output_upscaling.3.weight"), &[DIM / 4, DIM / 8, 2, 2]);
            s.put(&mut rng, format!("{PREFIX}.output_upscaling.3.bias"), &[DIM / 8]);
            for t in 0..4 {
                let p = format!("{PREFIX}.output_hypernetworks_mlps.{t}.layers");
                linear(&mut s, &mut rng, format!("{p}.0"), DIM, DIM);
                linear(&mut s, &mut rng, format!("{p}.1"), DIM, DIM);
                linear(&mut s, &mut rng, format!("{p}.2"), DIM, DIM / 8);
            }
            let p = format!("{PREFIX}.iou_prediction_head.layers");
            linear(&mut s, &mut rng, format!("{p}.0"), DIM, dc.iou_head_hidden_dim);
            linear(&mut s, &mut rng, format!("{p}.1"), dc.iou_head_hidden_dim, dc.iou_head_hidden_dim);
            linear(&mut s, &mut rng, format!("{p}.2"), dc.iou_head_hidden_dim, 4);
            s
        }

        /// Rows of `x` through `{prefix}` (`[out, in]` weight), optional ReLU, in f64.
        fn linear_f64(s: &MapStore, prefix: &str, x: &[f64], relu: bool) -> Vec<f64> {
            let shape = &s.0[&format!("{prefix}.weight")].0;
            let (o, i) = (shape[0], shape[1]);
            let (w, bias) = (s.values(&format!("{prefix}.weight")), s.values(&format!("{prefix}.bias")));
            x.chunks_exact(i)
                .flat_map(|row| (0..o).map(|r| bias[r] + (0..i).map(|c| row[c] * w[r * i + c]).sum::<f64>()).collect::<Vec<_>>())
                .map(|v| if relu { v.max(0.0) } else { v })
                .collect()
        }

        fn mlp_f64(s: &MapStore, prefix: &str, x: &[f64]) -> Vec<f64> {
            let h = linear_f64(s, &format!("{prefix}.layers.0"), x, true);
            let h = linear_f64(s, &format!("{prefix}.layers.1"), &h, true);
            linear_f64(s, &format!("{prefix}.layers.2"), &h, false)
        }

        /// Abramowitz–Stegun 7.1.26 (|error| < 1.5e-7), enough for a 1e-4 comparison.
        fn gelu_f64(x: f64) -> f64 {
            let z = x.abs() / std::f64::consts::SQRT_2;
            let t = 1.0 / (1.0 + 0.3275911 * z);
            let poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))));
            let erf = (1.0 - poly * (-z * z).exp()).copysign(x);
            0.5 * x * (1.0 + erf)
        }

        /// `x: [ci, h, w]` → `[co, 2h, 2w]`, kernel = stride = 2, weight `[ci, co, 2, 2]`.
        fn conv_transpose_f64(s: &MapStore, prefix: &str, x: &[f64], ci: usize, h: usize, w: usize) -> Vec<f64> {
            let (wt, bias) = (s.values(&format!("{prefix}.weight")), s.values(&format!("{prefix}.bias")));
            let co = bias.len();
            let mut out = vec![0.0; co * 4 * h * w];
            for o in 0..co {
                for y in 0..2 * h {
                    for xx in 0..2 * w {
                        let (i, j, di, dj) = (y / 2, xx / 2, y % 2, xx % 2);
                        let acc: f64 = (0..ci).map(|c| x[c * h * w + i * w + j] * wt[((c * co + o) * 2 + di) * 2 + dj]).sum();
                        out[(o * 2 * h + y) * 2 * w + xx] = bias[o] + acc;
                    }
                }
            }
            out
        }

        /// SAM's `LayerNorm2d` (eps 1e-6) over the channels of `[c, hw]`, then GELU.
        fn layer_norm_2d_gelu_f64(s: &MapStore, prefix: &str, x: &[f64], c: usize) -> Vec<f64> {
            let (gamma, beta) = (s.values(&format!("{prefix}.weight")), s.values(&format!("{prefix}.bias")));
            let hw = x.len() / c;
            let mut out = vec![0.0; x.len()];
            for p in 0..hw {
                let mean = (0..c).map(|ch| x[ch * hw + p]).sum::<f64>() / c as f64;
                let var = (0..c).map(|ch| (x[ch * hw + p] - mean).powi(2)).sum::<f64>() / c as f64;
                for ch in 0..c {
                    out[ch * hw + p] = gelu_f64((x[ch * hw + p] - mean) / (var + 1e-6).sqrt() * gamma[ch] + beta[ch]);
                }
            }
            out
        }

        #[test]
        fn decoder_tail_matches_a_direct_f64_evaluation() {
            let cfg = config();
            let s = store(&cfg);
            let b = CpuBackend::new(1).unwrap();
            let decoder = MaskDecoder::load(&b, &s, &cfg).unwrap();
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
            let mut random = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect() };
            let (emb, pe, dense, sparse) =
                (random(DIM * GRID * GRID), random(DIM * GRID * GRID), random(DIM * GRID * GRID), random(N_SPARSE * DIM));
            let grid = [1, DIM, GRID, GRID];
            let up = |x: &[f32], shape: &[usize]| b.from_host(shape, x).unwrap();

            // Reference: tokens and src built by hand, the (separately verified) transformer, then the tail in f64.
            let mut tokens: Vec<f32> = s.0[&format!("{PREFIX}.iou_token.weight")].1.clone();
            tokens.extend(&s.0[&format!("{PREFIX}.mask_tokens.weight")].1);
            tokens.extend(&sparse);
            let src: Vec<f32> = emb.iter().zip(&dense).map(|(a, d)| a + d).collect();
            let src_tokens = nchw_to_tokens(&b, &up(&src, &grid)).unwrap();
            let pe_tokens = b.vector_from_host(&[GRID * GRID, DIM], &crate::nets::prompt_encoder::channels_last(&pe, DIM)).unwrap();
            let (hs, keys) = decoder.transformer.forward(&b, &src_tokens, &pe_tokens, &up(&tokens, &[1, 5 + N_SPARSE, DIM])).unwrap();
            let hs: Vec<f64> = b.to_host(&hs).unwrap().iter().map(|&v| v as f64).collect();
            let keys = b.to_host(&keys).unwrap();
            let hw = GRID * GRID;
            let src_chw: Vec<f64> = (0..DIM).flat_map(|c| (0..hw).map(move |p| (c, p))).map(|(c, p)| keys[p * DIM + c] as f64).collect();
            let x = conv_transpose_f64(&s, &format!("{PREFIX}.output_upscaling.0"), &src_chw, DIM, GRID, GRID);
            let x = layer_norm_2d_gelu_f64(&s, &format!("{PREFIX}.output_upscaling.1"), &x, DIM / 4);
            let x: Vec<f64> = conv_transpose_f64(&s, &format!("{PREFIX}.output_upscaling.3"), &x, DIM / 4, 2 * GRID, 2 * GRID)
                .into_iter()
                .map(gelu_f64)
                .collect();
            let pixels = 16 * hw;
            let mask_of = |t: usize| -> Vec<f64> {
                let hyper = mlp_f64(&s, &format!("{PREFIX}.output_hypernetworks_mlps.{t}"), &hs[(1 + t) * DIM..(2 + t) * DIM]);
                (0..pixels).map(|p| (0..DIM / 8).map(|c| hyper[c] * x[c * pixels + p]).sum()).collect()
            };
            let iou = mlp_f64(&s, &format!("{PREFIX}.iou_prediction_head"), &hs[..DIM]);

            for multimask in [false, true] {
                let dense = DensePrompt::Mask(up(&dense, &grid));
                let (masks, got_iou) =
                    decoder.forward(&b, &up(&emb, &grid), &pe_tokens, &up(&sparse, &[1, N_SPARSE, DIM]), &dense, multimask).unwrap();
                let selected: Vec<usize> = if multimask { vec![1, 2, 3] } else { vec![0] };
                assert_eq!(b.shape(&masks), [1, selected.len(), 4 * GRID, 4 * GRID]);
                let want: Vec<f64> = selected.iter().flat_map(|&t| mask_of(t)).chain(selected.iter().map(|&t| iou[t])).collect();
                let got: Vec<f32> = b.to_host(&masks).unwrap().into_iter().chain(got_iou).collect();
                assert_eq!(got.len(), want.len());
                let worst = got.iter().zip(&want).map(|(g, w)| (*g as f64 - w).abs()).fold(0.0, f64::max);
                assert!(worst < 1e-4, "multimask {multimask}: largest difference {worst}");
            }
        }

        /// Without a mask prompt the decoder adds `no_mask_embed` as a per-channel vector after
        /// flattening; that must give bit for bit what the reference's expanded `[1, C, E, E]`
        /// tensor added before flattening gives.
        #[test]
        fn no_mask_vector_equals_the_expanded_dense_tensor() {
            let cfg = config();
            let s = store(&cfg);
            let b = CpuBackend::new(2).unwrap();
            let decoder = MaskDecoder::load(&b, &s, &cfg).unwrap();
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
            let mut random = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect() };
            let (emb, pe, no_mask, sparse) = (random(DIM * GRID * GRID), random(GRID * GRID * DIM), random(DIM), random(N_SPARSE * DIM));
            let grid = [1, DIM, GRID, GRID];
            let expanded: Vec<f32> = no_mask.iter().flat_map(|&v| std::iter::repeat_n(v, GRID * GRID)).collect();
            let pe = b.vector_from_host(&[GRID * GRID, DIM], &pe).unwrap();
            let no_mask = b.vector_from_host(&[DIM], &no_mask).unwrap();
            let run = |dense: DensePrompt<'_, CpuBackend>| {
                let emb = b.from_host(&grid, &emb).unwrap();
                let (masks, iou) = decoder.forward(&b, &emb, &pe, &b.from_host(&[1, N_SPARSE, DIM], &sparse).unwrap(), &dense, true).unwrap();
                (b.to_host(&masks).unwrap(), iou)
            };
            let (vector, tensor) = (run(DensePrompt::NoMask(&no_mask)), run(DensePrompt::Mask(b.from_host(&grid, &expanded).unwrap())));
            assert!(vector.0.iter().chain(&vector.1).zip(tensor.0.iter().chain(&tensor.1)).all(|(v, t)| v.to_bits() == t.to_bits()));
            let wrong = b.from_host(&[1, DIM, GRID, GRID + 1], &vec![0.0; DIM * GRID * (GRID + 1)]).unwrap();
            let emb = b.from_host(&grid, &emb).unwrap();
            assert!(decoder.forward(&b, &emb, &pe, &b.from_host(&[1, N_SPARSE, DIM], &sparse).unwrap(), &DensePrompt::Mask(wrong), true).is_err());
        }
    }
}
