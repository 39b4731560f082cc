//! Resumable training state: LoRA values, optimizer moments and the loop's counters, written as
//! one JSON file (temporary file + rename, so an interrupted write never leaves a torn one).

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::optim::AdamW;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainState {
    /// What the run was started with; a resume with different settings is refused.
    pub fingerprint: String,
    /// Optimizer updates done.
    pub step: usize,
    /// Epochs completed.
    pub epoch: usize,
    pub best_val_dice: Option<f64>,
    /// Validations since the best one (early stopping).
    pub evals_since_best: usize,
    /// Current values of every trainable parameter, by name.
    pub params: Vec<(String, Vec<f32>)>,
    /// Parameter values at the best validation.
    pub best_params: Option<Vec<(String, Vec<f32>)>>,
    pub optimizer: AdamW,
}

impl TrainState {
    pub fn save(&self, path: &Path) -> Result<()> {
        let tmp = path.with_extension("tmp");
        let text = serde_json::to_vec(self)?;
        std::fs::write(&tmp, text).with_context(|| format!("writing checkpoint {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("renaming checkpoint to {}", path.display()))?;
        Ok(())
    }

    pub fn load(path: &Path, fingerprint: &str) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("reading checkpoint {}", path.display()))?;
        let state: TrainState = serde_json::from_slice(&bytes).with_context(|| format!("checkpoint {} is not a training state", path.display()))?;
        if state.fingerprint != fingerprint {
            bail!("checkpoint {} was written by a run with other settings ({}); this run is ({fingerprint})", path.display(), state.fingerprint);
        }
        Ok(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusal_of_other_settings() {
        let dir = std::env::temp_dir().join(format!("minisam-ckpt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.json");
        let state = TrainState {
            fingerprint: "rank 4".into(),
            step: 3,
            epoch: 1,
            best_val_dice: Some(0.5),
            evals_since_best: 0,
            params: vec![("a".into(), vec![1.0, -2.5])],
            best_params: None,
            optimizer: AdamW::new(1e-3, 0.01),
        };
        state.save(&path).unwrap();
        let back = TrainState::load(&path, "rank 4").unwrap();
        assert_eq!((back.step, back.epoch, back.params.clone()), (3, 1, state.params.clone()));
        assert!(TrainState::load(&path, "rank 8").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
