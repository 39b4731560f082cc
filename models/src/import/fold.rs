//! Folds TinyViT's `Conv2d_BN` pairs into one biased convolution.
//!
//! At inference a BatchNorm after a convolution is an affine map per output channel, so
//! `bn(conv(x)) = conv'(x)` with `w' = w·s`, `b' = β − μ·s`, `s = γ / sqrt(σ² + ε)`. Doing this once
//! at import means the networks (and the packed file) only know biased convolutions:
//! `X.c.weight` + `X.bn.*` become `X.c.weight` (rescaled) and a new `X.c.bias`.

use std::collections::BTreeMap;

use crate::{Error, Result};

/// PyTorch's BatchNorm2d default, which TinyViT uses.
pub const BN_EPS: f64 = 1e-5;

/// A name → (shape, values) table, as import builds it.
pub type TensorMap = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// Folds every `X.bn.*` into `X.c.*` in place. A BN without its conv (or with mismatched
/// channel counts) is an [`Error::Shape`] / [`Error::MissingTensor`].
pub fn fold_conv_bn(tensors: &mut TensorMap) -> Result<usize> {
    let prefixes: Vec<String> =
        tensors.keys().filter_map(|k| k.strip_suffix(".bn.running_var")).map(str::to_string).collect();
    for p in &prefixes {
        let take = |t: &mut TensorMap, suffix: &str| {
            let name = format!("{p}.bn.{suffix}");
            t.remove(&name).ok_or(Error::MissingTensor(name))
        };
        let (_, gamma) = take(tensors, "weight")?;
        let (_, beta) = take(tensors, "bias")?;
        let (_, mean) = take(tensors, "running_mean")?;
        let (_, var) = take(tensors, "running_var")?;
        tensors.remove(&format!("{p}.bn.num_batches_tracked"));
        let conv_name = format!("{p}.c.weight");
        let (shape, weight) = tensors.get_mut(&conv_name).ok_or_else(|| Error::MissingTensor(conv_name.clone()))?;
        let out = shape.first().copied().unwrap_or(0);
        if out == 0 || [gamma.len(), beta.len(), mean.len(), var.len()].iter().any(|&n| n != out) || weight.len() % out != 0 {
            return Err(Error::Shape(format!("{p}: BatchNorm of {} channels after a conv of shape {shape:?}", gamma.len())));
        }
        let per_channel = weight.len() / out;
        let mut bias = vec![0f32; out];
        for c in 0..out {
            let s = gamma[c] as f64 / (var[c] as f64 + BN_EPS).sqrt();
            for w in &mut weight[c * per_channel..(c + 1) * per_channel] {
                *w = (*w as f64 * s) as f32;
            }
            bias[c] = (beta[c] as f64 - mean[c] as f64 * s) as f32;
        }
        let bias_name = format!("{p}.c.bias");
        if tensors.contains_key(&bias_name) {
            return Err(Error::Import(format!("{bias_name} already exists next to a BatchNorm")));
        }
        tensors.insert(bias_name, (vec![out], bias));
    }
    Ok(prefixes.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn folded_1x1_conv_equals_conv_then_bn() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let (cout, cin, pixels) = (5, 3, 4);
        let mut r = |n: usize, lo: f32, hi: f32| (0..n).map(|_| rng.gen_range(lo..hi)).collect::<Vec<f32>>();
        let w = r(cout * cin, -1.0, 1.0);
        let (gamma, beta, mean, var) = (r(cout, 0.5, 2.0), r(cout, -1.0, 1.0), r(cout, -1.0, 1.0), r(cout, 0.1, 3.0));
        let x = r(cin * pixels, -2.0, 2.0);
        let mut t = TensorMap::new();
        t.insert("m.c.weight".into(), (vec![cout, cin, 1, 1], w.clone()));
        for (s, v) in [("weight", &gamma), ("bias", &beta), ("running_mean", &mean), ("running_var", &var)] {
            t.insert(format!("m.bn.{s}"), (vec![cout], v.clone()));
        }
        t.insert("m.bn.num_batches_tracked".into(), (vec![], vec![0.0]));
        assert_eq!(fold_conv_bn(&mut t).unwrap(), 1);
        assert_eq!(t.keys().collect::<Vec<_>>(), ["m.c.bias", "m.c.weight"]);
        let (fw, fb) = (&t["m.c.weight"].1, &t["m.c.bias"].1);
        for c in 0..cout {
            for p in 0..pixels {
                let conv: f64 = (0..cin).map(|i| w[c * cin + i] as f64 * x[i * pixels + p] as f64).sum();
                let bn = (conv - mean[c] as f64) / (var[c] as f64 + BN_EPS).sqrt() * gamma[c] as f64 + beta[c] as f64;
                let folded: f64 = (0..cin).map(|i| fw[c * cin + i] as f64 * x[i * pixels + p] as f64).sum::<f64>() + fb[c] as f64;
                assert!((bn - folded).abs() < 1e-5, "channel {c} pixel {p}: {bn} vs {folded}");
            }
        }
    }

    #[test]
    fn mismatched_or_orphan_batchnorm_is_an_error() {
        let mut t = TensorMap::new();
        t.insert("m.c.weight".into(), (vec![4, 2, 1, 1], vec![0.0; 8]));
        for s in ["weight", "bias", "running_mean", "running_var"] {
            t.insert(format!("m.bn.{s}"), (vec![3], vec![1.0; 3]));
        }
        assert!(matches!(fold_conv_bn(&mut t), Err(Error::Shape(_))));
        let mut t = TensorMap::new();
        for s in ["weight", "bias", "running_mean", "running_var"] {
            t.insert(format!("m.bn.{s}"), (vec![3], vec![1.0; 3]));
        }
        assert!(matches!(fold_conv_bn(&mut t), Err(Error::MissingTensor(_))));
    }
}
