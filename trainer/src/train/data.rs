//! Training examples from a protocol data tree (`<root>/<set>/{images,masks}`): one example per
//! target (label > 0 with at least 16 pixels, as `crate::eval::protocol` defines), a validation
//! split by image (all targets of an image on the same side) and a hash naming the training set.

use anyhow::{bail, Result};
use sha2::{Digest, Sha256};

use super::rng::Rng;
use crate::eval::protocol::{self, SetDir};
use crate::eval::volume_sets::{self, Layout};
use crate::selection::Selection;

/// One target of one image.
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    pub set: String,
    pub file: String,
    /// The set the image is read from (`SetDir::read_image`, `read_labels`).
    pub source: SetDir,
    pub label: u16,
    /// Tight inclusive box `[x0, y0, x1, y1]`.
    pub tight: [usize; 4],
}

/// Every target of the selected images, in protocol order.
pub fn collect(selection: &Selection) -> Result<Vec<Example>> {
    let mut out = Vec::new();
    for (set, file) in selection.images()? {
        let mask = set.read_labels(&file)?;
        for t in protocol::targets(&mask) {
            let b = t.tight_box;
            out.push(Example { set: set.name.clone(), source: set.clone(), file: file.clone(), label: t.label, tight: [b.x0, b.y0, b.x1, b.y1] });
        }
    }
    if out.is_empty() {
        bail!("no training target under {}", selection.root().display());
    }
    Ok(out)
}

/// `(train, val)`: images shuffled with `seed`, the first `fraction` of them (at least one when
/// `fraction > 0` and there are two images or more) held out for validation. The slices of a
/// volume count as one image, so a patient is never on both sides.
pub fn split(examples: Vec<Example>, fraction: f64, seed: u64) -> (Vec<Example>, Vec<Example>) {
    let key = |e: &Example| (e.set.clone(), e.source.split_key(&e.file).to_string());
    let mut images: Vec<(String, String)> = Vec::new();
    for e in &examples {
        let key = key(e);
        if !images.contains(&key) {
            images.push(key);
        }
    }
    Rng::new(seed, 0x5eed_5911).shuffle(&mut images);
    let mut held = (fraction * images.len() as f64).round() as usize;
    if fraction > 0.0 && images.len() >= 2 {
        held = held.clamp(1, images.len() - 1);
    }
    let val_images = &images[..held.min(images.len())];
    examples.into_iter().partition(|e| !val_images.contains(&key(e)))
}

/// Lower-case hex SHA-256 over the training examples: for each, `set/file:label` and the bytes
/// of its mask file (of a volume's slice: its labels as little-endian u16), so the same names
/// with different annotations hash differently.
pub fn training_set_sha256(examples: &[Example]) -> Result<String> {
    let mut h = Sha256::new();
    for e in examples {
        h.update(format!("{}/{}:{}\n", e.set, e.file, e.label).as_bytes());
        if e.source.layout == Layout::Png {
            let mask = e.source.mask_path(&e.file);
            h.update(std::fs::read(&mask).map_err(|err| anyhow::anyhow!("reading {}: {err}", mask.display()))?);
        } else {
            h.update(volume_sets::label_bytes(&e.source, &e.file)?);
        }
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn example(file: &str, label: u16) -> Example {
        Example { set: "s".into(), file: file.into(), source: SetDir::png("s".into(), PathBuf::new()), label, tight: [0; 4] }
    }

    #[test]
    fn split_keeps_images_whole_and_is_seeded() {
        let examples: Vec<Example> = (0..10).flat_map(|i| [example(&format!("{i}.png"), 1), example(&format!("{i}.png"), 2)]).collect();
        let (train, val) = split(examples.clone(), 0.2, 9);
        assert_eq!(val.len(), 4, "two images, both targets each");
        assert_eq!(train.len() + val.len(), 20);
        assert!(val.iter().all(|v| train.iter().all(|t| t.file != v.file)));
        assert_eq!(split(examples.clone(), 0.2, 9).1, val, "same seed, same split");
        let (_, tiny_val) = split(examples[..4].to_vec(), 0.01, 1);
        assert_eq!(tiny_val.len(), 2, "at least one image is held out");
        assert!(split(examples, 0.0, 1).1.is_empty());
    }
}
