//! LoRA factors as trainable parameters of a [`TapeBackend`]: bound to the linear layers of a
//! [`SamModel`] exactly as `Segmenter::set_adapter` binds an adapter file (so the forward is
//! `Backend::linear_lora`'s), and read back as [`LoraFactors`] for `adapter::write_adapter`.

use crate::adapter::{LinearShape, LoraFactors};
use crate::backend::{Backend, Lora};
use crate::nets::common::Linear;
use crate::{Error, Result};

use super::{SamModel, TapeBackend, TrainEncoder};

impl<B: Backend> SamModel<B> {
    /// Visits every linear layer an adapter may target (image encoder, then mask decoder), the
    /// order of `Segmenter::linear_shapes`.
    pub fn linears_mut(&mut self, f: &mut dyn FnMut(&mut Linear<B>)) {
        match &mut self.encoder {
            TrainEncoder::Vit(e) => e.linears_mut(f),
            TrainEncoder::TinyVit(e) => e.linears_mut(f),
        }
        self.mask_decoder.linears_mut(f);
    }

    /// Names and sizes of every adaptable linear layer.
    pub fn linear_shapes(&mut self) -> Vec<LinearShape> {
        let mut shapes = Vec::new();
        self.linears_mut(&mut |l| shapes.push(LinearShape { name: l.name.clone(), in_features: l.in_features, out_features: l.out_features }));
        shapes
    }
}

/// Parameter names of the factors of linear layer `layer`.
pub fn factor_names(layer: &str) -> (String, String) {
    (format!("{layer}.lora_a"), format!("{layer}.lora_b"))
}

/// Registers `factors` as trainable parameters of `tape` (rank `rank`, update scale
/// `alpha / rank`) and binds them to the layers of `model` they name. All layers are checked
/// before anything is bound.
pub fn attach_lora(tape: &TapeBackend, model: &mut SamModel<TapeBackend>, factors: &[LoraFactors], rank: usize, alpha: f32) -> Result<()> {
    if rank == 0 {
        return Err(Error::Shape("LoRA rank must be at least 1".into()));
    }
    let shapes = model.linear_shapes();
    let mut loras = std::collections::HashMap::new();
    for f in factors {
        let layer = shapes
            .iter()
            .find(|l| l.name == f.name)
            .ok_or_else(|| Error::Shape(format!("LoRA factors for {}, which is no linear layer of this model", f.name)))?;
        if (layer.in_features, layer.out_features) != (f.in_features, f.out_features) || f.a.len() != rank * f.in_features || f.b.len() != f.out_features * rank {
            return Err(Error::Shape(format!(
                "LoRA factors for {}: {} -> {} with |A| = {}, |B| = {} at rank {rank}; the layer is {} -> {}",
                f.name,
                f.in_features,
                f.out_features,
                f.a.len(),
                f.b.len(),
                layer.in_features,
                layer.out_features
            )));
        }
        let (a_name, b_name) = factor_names(&f.name);
        let a = tape.trainable_weight(&a_name, &[rank, f.in_features], f.a.clone())?;
        let b = tape.trainable_weight(&b_name, &[f.out_features, rank], f.b.clone())?;
        loras.insert(f.name.clone(), Lora { a, b, rank, scale: alpha / rank as f32 });
    }
    model.linears_mut(&mut |l| {
        if let Some(lora) = loras.remove(&l.name) {
            l.lora = Some(lora);
        }
    });
    Ok(())
}

/// The current values of the factors of `layers` (as attached), for writing an adapter file.
pub fn export_lora(tape: &TapeBackend, layers: &[LinearShape]) -> Result<Vec<LoraFactors>> {
    layers
        .iter()
        .map(|l| {
            let (a_name, b_name) = factor_names(&l.name);
            Ok(LoraFactors { name: l.name.clone(), in_features: l.in_features, out_features: l.out_features, a: tape.param_values(&a_name)?, b: tape.param_values(&b_name)? })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::{default_targets, select_targets, synth};
    use crate::autograd::whole_model_check;
    use crate::import::Checkpoint;
    use crate::pipeline::InputPrompts;
    use rand::{Rng, SeedableRng};

    /// The whole-model check of the brief: d(loss)/d(LoRA factor entries) on the tiny SAM, tape
    /// vs central differences through the real forward (`linear_lora` included). Targets are the
    /// encoder's attention projections and two decoder projections, so the gradient of A passes
    /// through B, the rel-pos attention, the neck and the whole decoder.
    #[test]
    fn tiny_sam_lora_gradients_match_finite_differences() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny_sam/tiny_sam.pth");
        let ckpt = Checkpoint::open(&path).expect("committed tiny SAM fixture");
        let tape = TapeBackend::for_lora(2).unwrap();
        let mut model = SamModel::load(&tape, &ckpt, ckpt.config()).unwrap();
        assert!(tape.parameters().is_empty(), "no base weight is trainable");
        let mut targets = default_targets();
        targets.push("mask_decoder.transformer.layers.1.cross_attn_image_to_token.v_proj".into());
        targets.push("mask_decoder.output_hypernetworks_mlps.0.layers.1".into());
        let shapes = model.linear_shapes();
        let chosen: Vec<LinearShape> = select_targets(&shapes, &targets).into_iter().cloned().collect();
        assert!(chosen.len() >= 6, "targets chose {chosen:?}");
        let (rank, alpha) = (4, 8.0);
        let seed = whole_model_check::seed();
        eprintln!("seed {seed}");
        let factors = synth::random_factors(&shapes, &targets, rank, seed).unwrap();
        attach_lora(&tape, &mut model, &factors, rank, alpha).unwrap();
        assert_eq!(tape.parameters().len(), 2 * chosen.len());
        assert_eq!(export_lora(&tape, &chosen).unwrap(), factors, "export returns what was attached");

        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let s = model.config.image_size;
        let image: Vec<f32> = (0..3 * s * s).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let prompts = InputPrompts { boxes: vec![[20.0, 30.0, 100.0, 110.0]], points: vec![] };
        let forward = |model: &SamModel<TapeBackend>| -> Result<crate::autograd::TapeTensor> {
            let x = tape.from_host(&[1, 3, s, s], &image)?;
            let emb = model.encode(&tape, &x)?;
            model.decode(&tape, &emb, &prompts, false)
        };
        tape.set_recording(false);
        let n = tape.to_host(&forward(&model).unwrap()).unwrap().len();
        let r: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let loss = |model: &SamModel<TapeBackend>| tape.to_host(&forward(model).unwrap()).unwrap().iter().zip(&r).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>();

        tape.set_recording(true);
        let logits = forward(&model).unwrap();
        tape.backward(&logits, &r).unwrap();
        tape.set_recording(false);
        let mut total = whole_model_check::Compared::default();
        for p in tape.parameters() {
            let grad = tape.param_grad(&p.name).unwrap();
            let mut order: Vec<usize> = (0..grad.len()).collect();
            order.sort_by(|&a, &b| grad[b].abs().total_cmp(&grad[a].abs()));
            let picked: Vec<usize> = order[..2].iter().copied().chain((0..2).map(|_| rng.gen_range(0..grad.len()))).collect();
            let c = whole_model_check::compare_entries(&tape, &p.name, &grad, &picked, &|| loss(&model));
            total.checked += c.checked;
            total.not_smooth += c.not_smooth;
            total.outliers += c.outliers;
        }
        whole_model_check::assert_mostly_smooth(&total);
    }

}
