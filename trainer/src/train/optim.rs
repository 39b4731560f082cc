//! AdamW (decoupled weight decay, Loshchilov & Hutter) over the tape's trainable parameters.

use std::collections::BTreeMap;

use minisam_models::autograd::TapeBackend;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// Updates taken so far (bias correction).
    pub t: u64,
    /// First and second moments by parameter name.
    pub m: BTreeMap<String, Vec<f32>>,
    pub v: BTreeMap<String, Vec<f32>>,
}

impl AdamW {
    pub fn new(lr: f32, weight_decay: f32) -> Self {
        Self { lr, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay, t: 0, m: BTreeMap::new(), v: BTreeMap::new() }
    }

    /// One update of every parameter of `tape` from its accumulated gradient, at rate `lr`.
    pub fn step(&mut self, tape: &TapeBackend, lr: f32) {
        self.t += 1;
        let (b1, b2) = (self.beta1, self.beta2);
        let c1 = 1.0 - b1.powi(self.t as i32);
        let c2 = 1.0 - b2.powi(self.t as i32);
        let (eps, wd) = (self.eps, self.weight_decay);
        let (ms, vs) = (&mut self.m, &mut self.v);
        tape.update_params(|name, w, g| {
            let m = ms.entry(name.to_string()).or_insert_with(|| vec![0.0; w.len()]);
            let v = vs.entry(name.to_string()).or_insert_with(|| vec![0.0; w.len()]);
            for i in 0..w.len() {
                m[i] = b1 * m[i] + (1.0 - b1) * g[i];
                v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
                let update = (m[i] / c1) / ((v[i] / c2).sqrt() + eps);
                w[i] -= lr * (update + wd * w[i]);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use minisam_models::backend::{Activation, Backend};

    /// Minimises `|x·wᵀ - y|²` for one linear layer: AdamW must get the loss near zero.
    #[test]
    fn adamw_fits_a_linear_map() {
        let tape = TapeBackend::for_lora(1).unwrap();
        let w = tape.trainable_weight("w", &[1, 2], vec![0.0, 0.0]).unwrap();
        let xs = [[1.0f32, 0.0], [0.0, 1.0], [1.0, 1.0]];
        let want = |x: &[f32; 2]| 2.0 * x[0] - 3.0 * x[1];
        let mut opt = AdamW::new(0.1, 0.0);
        let mut last = f32::MAX;
        for _ in 0..300 {
            tape.zero_grads();
            last = 0.0;
            for x in &xs {
                let xt = tape.from_host(&[1, 2], x).unwrap();
                let y = tape.linear(&xt, &w, None, Activation::None).unwrap();
                let err = tape.to_host(&y).unwrap()[0] - want(x);
                last += err * err;
                tape.backward(&y, &[2.0 * err]).unwrap();
                tape.reset();
            }
            opt.step(&tape, opt.lr);
        }
        assert!(last < 1e-3, "loss {last}");
        let w = tape.param_values("w").unwrap();
        assert!((w[0] - 2.0).abs() < 0.05 && (w[1] + 3.0).abs() < 0.05, "{w:?}");
    }
}
