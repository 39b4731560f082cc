//! Seeded random adapters for tests (engine, daemon, trainer): real ones come from training.
//!
//! Unlike a freshly initialised LoRA (B = 0, a no-op), B is non-zero here so the adapter really
//! changes outputs: A ~ N(0, 1/in) as a Kaiming-style init, B ~ N(0, (0.05)²/rank), so with
//! `alpha = 2·rank` the update is a few percent of a layer's output — visible, never explosive.

use super::*;
use crate::import::synth::SplitMix;
use crate::{Error, Result};

/// Random factors for every layer of `linears` that one of `targets` matches (model order).
/// Errors if no layer matches: an adapter that adapts nothing is a test bug.
pub fn random_factors(linears: &[LinearShape], targets: &[String], rank: usize, seed: u64) -> Result<Vec<LoraFactors>> {
    let chosen = select_targets(linears, targets);
    if chosen.is_empty() {
        return Err(Error::Adapter(format!("targets {targets:?} match none of the model's {} linear layers", linears.len())));
    }
    let mut rng = SplitMix(seed);
    let b_std = 0.05 / (rank.max(1) as f64).sqrt();
    Ok(chosen
        .into_iter()
        .map(|l| {
            let a_std = 1.0 / (l.in_features.max(1) as f64).sqrt();
            let a = (0..rank * l.in_features).map(|_| (a_std * rng.normal()) as f32).collect();
            let b = (0..l.out_features * rank).map(|_| (b_std * rng.normal()) as f32).collect();
            LoraFactors { name: l.name.clone(), in_features: l.in_features, out_features: l.out_features, a, b }
        })
        .collect())
}

/// Descriptive fields for a test adapter: name `random-<seed>`, modality `US`, a training-set
/// hash derived from the seed, a fixed creation time (so the same arguments give the same bytes,
/// hence the same SHA-256).
pub fn test_meta(targets: &[String], base_sha256: &str, rank: usize, alpha: f32, seed: u64) -> AdapterMeta {
    use sha2::{Digest, Sha256};
    AdapterMeta {
        name: format!("random-{seed}"),
        modality: "US".into(),
        base_model_sha256: base_sha256.to_string(),
        rank: u32::try_from(rank).unwrap_or(u32::MAX),
        alpha,
        targets: targets.to_vec(),
        training_set_sha256: crate::import::hex(&Sha256::digest(format!("synthetic training set {seed}"))),
        created: "2026-01-01T00:00:00Z".into(),
        val_dice: None,
        trainer_version: concat!("minisam-models ", env!("CARGO_PKG_VERSION"), " synth").into(),
    }
}

/// A complete, validated random adapter for the model whose layers are `linears` (from
/// `Segmenter::linear_shapes`) and whose file hash is `base_sha256`. Write it with
/// `std::fs::write(path, adapter.bytes())`.
pub fn random_adapter(linears: &[LinearShape], targets: &[String], base_sha256: &str, rank: usize, alpha: f32, seed: u64) -> Result<AdapterFile> {
    let factors = random_factors(linears, targets, rank, seed)?;
    encode_adapter(&test_meta(targets, base_sha256, rank, alpha, seed), &factors)
}
