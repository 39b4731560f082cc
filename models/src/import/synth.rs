//! Seeded random-weight SAM checkpoints with the official names and shapes, for tests and the
//! `gen_sam_checkpoint` example: real checkpoints of ViT-B/L/H are too large to ship.
//!
//! Scales follow PyTorch's defaults closely enough for activations to stay sane through a
//! forward pass: matrices and kernels ~N(0, 1/fan_in) (std `1/sqrt(fan_in)`), norm weights ~1,
//! biases, embeddings and position tables ~N(0, 0.02²), the prompt encoder's Gaussian matrix ~N(0, 1).

use crate::config::VitConfig;

use super::layout;

/// splitmix64: small, seedable, and good enough for test weights (no `rand` in the library).
pub(crate) struct SplitMix(pub(crate) u64);

impl SplitMix {
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in (0, 1].
    pub(crate) fn unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }
    /// Standard normal (Box–Muller).
    pub(crate) fn normal(&mut self) -> f64 {
        (-2.0 * self.unit().ln()).sqrt() * (std::f64::consts::TAU * self.unit()).cos()
    }
}

/// (mean, std) of the initial values of a parameter.
fn init(name: &str, shape: &[usize]) -> (f64, f64) {
    let is_weight = name.ends_with(".weight");
    let embedding = name.contains("point_embeddings.") || name.ends_with("_embed.weight") || name.ends_with("_token.weight") || name.ends_with("_tokens.weight");
    if name.ends_with("positional_encoding_gaussian_matrix") {
        (0.0, 1.0)
    } else if is_weight && shape.len() >= 2 && !embedding {
        let fan_in: usize = shape[1..].iter().product();
        (0.0, 1.0 / (fan_in.max(1) as f64).sqrt())
    } else if is_weight && shape.len() == 1 {
        (1.0, 0.02)
    } else {
        (0.0, 0.02)
    }
}

/// Every tensor of a ViT SAM with seeded random values, canonical names.
pub fn random_sam_vit(cfg: &VitConfig, image_size: usize, seed: u64) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut rng = SplitMix(seed);
    layout::sam_vit_tensors(cfg, image_size)
        .into_iter()
        .map(|(name, shape)| {
            let (mean, std) = init(&name, &shape);
            let n = shape.iter().product();
            let values = (0..n).map(|_| (mean + std * rng.normal()) as f32).collect();
            (name, shape, values)
        })
        .collect()
}

/// The same tensors under Hugging Face names, with its duplicate of the Gaussian matrix.
pub fn to_hf_naming(tensors: Vec<(String, Vec<usize>, Vec<f32>)>) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut out: Vec<_> = tensors.into_iter().map(|(n, s, v)| (super::naming::canonical_to_hf(&n), s, v)).collect();
    if let Some(pe) = out.iter().find(|t| t.0 == "prompt_encoder.shared_embedding.positional_embedding").cloned() {
        out.push((super::naming::HF_SHARED_EMBEDDING.to_string(), pe.1, pe.2));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::import::{write_pth, write_safetensors, Checkpoint};
    use crate::store::WeightStore;

    #[test]
    fn values_are_seeded_and_scaled() {
        let (cfg, size) = layout::tiny_vit();
        let a = random_sam_vit(&cfg, size, 5);
        assert_eq!(a, random_sam_vit(&cfg, size, 5));
        assert_ne!(a, random_sam_vit(&cfg, size, 6));
        let lin1 = a.iter().find(|t| t.0 == "mask_decoder.transformer.layers.0.mlp.lin1.weight").unwrap();
        let std = (lin1.2.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / lin1.2.len() as f64).sqrt();
        assert!((std - 1.0 / 16.0).abs() < 0.005, "std {std}");
        let norm = a.iter().find(|t| t.0 == "image_encoder.blocks.0.norm1.weight").unwrap();
        assert!(norm.2.iter().all(|v| (v - 1.0).abs() < 0.2));
    }

    #[test]
    fn tiny_in_both_namings_and_formats_imports_identically() {
        let (cfg, size) = layout::tiny_vit();
        let canonical = random_sam_vit(&cfg, size, 9);
        let dir = std::env::temp_dir().join(format!("minisam-synth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut opened = Vec::new();
        for (naming, tensors) in [("official", canonical.clone()), ("hf", to_hf_naming(canonical.clone()))] {
            let pth = dir.join(format!("{naming}.pth"));
            let st = dir.join(format!("{naming}.safetensors"));
            write_pth(&pth, naming, &tensors).unwrap();
            write_safetensors(&st, &tensors).unwrap();
            opened.push(Checkpoint::open(&pth).unwrap());
            opened.push(Checkpoint::open(&st).unwrap());
        }
        let names: Vec<String> = canonical.iter().map(|t| t.0.clone()).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
        for c in &opened {
            assert_eq!(c.names(), names);
            assert_eq!(c.config(), opened[0].config());
            assert_eq!(c.get("mask_decoder.iou_prediction_head.layers.1.weight").unwrap().to_f32(), opened[0].get("mask_decoder.iou_prediction_head.layers.1.weight").unwrap().to_f32());
        }
        assert_eq!(opened[0].config().encoder, crate::config::EncoderConfig::Vit(cfg));
    }
}
