//! Checkpoint import: PyTorch zip (`.pth` / `.pt`) and `.safetensors` files, in the original
//! `segment_anything` naming or Hugging Face's, become one in-memory f32 [`Checkpoint`] in the
//! canonical naming, with TinyViT's BatchNorms folded and the architecture inferred from shapes.
//!
//! - [`zip`], [`pickle`], [`pth`]: torch.save's container, restricted to what it emits (no code
//!   execution); [`safetensors`]: the Hugging Face container;
//! - [`naming`]: Hugging Face → canonical names; [`fold`]: `Conv2d_BN` → biased conv;
//! - [`detect`]: `ModelConfig` from shapes; [`layout`]: the official ViT SAM tensor list.

pub mod detect;
pub mod fold;
pub mod layout;
pub mod naming;
pub mod pickle;
pub mod pth;
pub mod safetensors;
pub mod synth;
pub mod zip;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::config::ModelConfig;
use crate::store::{StoredTensor, TensorData, WeightStore};
use crate::{Error, Result};

use fold::TensorMap;

/// Parameters of MobileSAM's unused ImageNet classification head, dropped at import.
const UNUSED_PREFIXES: &[&str] = &["image_encoder.head.", "image_encoder.norm_head."];

/// An imported checkpoint: f32 tensors under canonical names, its inferred architecture and the
/// SHA-256 of the source file (empty for [`Checkpoint::from_tensors`]).
pub struct Checkpoint {
    tensors: BTreeMap<String, (Vec<usize>, Arc<[f32]>)>,
    config: ModelConfig,
    sha256: String,
}

impl Checkpoint {
    /// Reads a `.pth`/`.pt` (zip) or `.safetensors` file, recognised by content, not extension.
    pub fn open(path: &Path) -> Result<Checkpoint> {
        let io = |source| Error::Io { path: path.display().to_string(), source };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: read-only map, dropped before returning; the f32 tensors are copies, so a file
        // changed later cannot affect the checkpoint. Mapping instead of reading halves the peak
        // memory of a multi-GB ViT-H import.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        let bytes: &[u8] = &map;
        let sha256 = hex(&Sha256::digest(bytes));
        let raw = if bytes.starts_with(b"PK\x03\x04") {
            pth::read(bytes)?
        } else if safetensors::looks_like(bytes) {
            safetensors::read(bytes)?
        } else {
            return Err(Error::Import(format!("{}: neither a PyTorch zip checkpoint nor a safetensors file", path.display())));
        };
        let mut c = Self::from_map(raw)?;
        c.sha256 = sha256;
        Ok(c)
    }

    /// Builds a checkpoint from named tensors (any naming), as `open` would after reading them.
    pub fn from_tensors(tensors: Vec<(String, Vec<usize>, Vec<f32>)>) -> Result<Checkpoint> {
        let mut map = TensorMap::new();
        for (name, shape, values) in tensors {
            if shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)) != Some(values.len()) {
                return Err(Error::Shape(format!("{name}: {} values for shape {shape:?}", values.len())));
            }
            if map.insert(name.clone(), (shape, values)).is_some() {
                return Err(Error::Import(format!("tensor {name} given twice")));
            }
        }
        Self::from_map(map)
    }

    fn from_map(raw: TensorMap) -> Result<Checkpoint> {
        let names: Vec<String> = raw.keys().cloned().collect();
        let mut map = if naming::is_hf(&names) {
            let mut m = TensorMap::new();
            for (name, t) in raw {
                if let Some(c) = naming::hf_to_canonical(&name) {
                    if m.insert(c.clone(), t).is_some() {
                        return Err(Error::Import(format!("two Hugging Face tensors map onto {c}")));
                    }
                }
            }
            m
        } else {
            raw
        };
        map.retain(|k, _| !UNUSED_PREFIXES.iter().any(|p| k.starts_with(p)));
        fold::fold_conv_bn(&mut map)?;
        let shapes: detect::Shapes = map.iter().map(|(k, (s, _))| (k.clone(), s.clone())).collect();
        let config = detect::detect(&shapes)?;
        let tensors = map.into_iter().map(|(k, (s, v))| (k, (s, Arc::from(v)))).collect();
        Ok(Checkpoint { tensors, config, sha256: String::new() })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Lower-case hex SHA-256 of the file this was read from.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }
}

impl WeightStore for Checkpoint {
    fn get(&self, name: &str) -> Result<StoredTensor> {
        let (shape, values) = self.tensors.get(name).ok_or_else(|| Error::MissingTensor(name.to_string()))?;
        Ok(StoredTensor { name: name.to_string(), shape: shape.clone(), data: TensorData::F32(values.clone()) })
    }
    fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
    fn names(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }
    fn model_sha256(&self) -> Option<&str> {
        // Built from tensors in memory: no file, no identity.
        Some(self.sha256.as_str()).filter(|s| !s.is_empty())
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).map_err(|source| Error::Io { path: path.display().to_string(), source })
}

/// Writes f32 tensors as a torch.save zip checkpoint under `<root_name>/` (loadable by PyTorch).
pub fn write_pth(path: &Path, root_name: &str, tensors: &[(String, Vec<usize>, Vec<f32>)]) -> Result<()> {
    write_file(path, &pth::write(root_name, tensors)?)
}

/// Writes f32 tensors as a `.safetensors` file.
pub fn write_safetensors(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) -> Result<()> {
    safetensors::write(path, tensors)
}

#[cfg(test)]
mod tests;
