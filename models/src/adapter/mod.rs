//! LoRA adapter files (`.lora`, magic `MSAMLORA`): low-rank updates `W + (alpha/r)·B·A` for some
//! linear layers of one specific base model, named by that model file's SHA-256. The byte layout
//! is specified in `models/FORMAT.md` ("The MSAMLORA adapter format"); this module is its single
//! implementation.
//!
//! - [`reader`]: [`AdapterFile`], validated in full when opened (an adapter is swapped in by
//!   field engineers, so a damaged or foreign file must be refused before it touches a model);
//! - [`writer`]: [`write_adapter`] / [`encode_adapter`] from an [`AdapterMeta`] and factors;
//! - [`synth`]: seeded random adapters for tests of the engine, daemon and trainer;
//! - binding to a model is `Segmenter::set_adapter` (`crate::sam`).

pub mod reader;
pub mod synth;
mod time;
pub mod writer;

use serde::{Deserialize, Serialize};

pub use crate::format::ByteRange;
pub use reader::AdapterFile;
pub use time::rfc3339_utc_now;
pub use writer::{encode_adapter, write_adapter};

/// First bytes of every adapter file.
pub const MAGIC: &[u8; 8] = b"MSAMLORA";
/// The only adapter format version this code reads and writes.
pub const VERSION: u32 = 1;
/// magic (8) + version (4) + manifest length (4) + manifest CRC32 (4).
pub const HEADER_LEN: usize = 20;
/// Alignment of the data section and of every factor in it (as the packed model format).
pub const ALIGN: usize = crate::format::ALIGN;

/// What the trainer adapts unless told otherwise: the image encoder's attention projections
/// (`qkv` and `proj` of every ViT / TinyViT attention block). The encoder is where modality
/// shift (ultrasound speckle, CT windows) lives; the prompt path and decoder are modality-agnostic
/// and tiny, so adapting them buys little. Matched with [`crate::format::glob_match`].
pub const DEFAULT_TARGETS: &[&str] = &["*.attn.qkv", "*.attn.proj"];

/// Largest rank a reader accepts: LoRA ranks are 4–64 in practice; the bound keeps a corrupted
/// or hostile manifest from asking for gigabytes.
pub const MAX_RANK: u32 = 1024;
/// Largest `in_features` / `out_features` accepted (ViT-H's widest linear is 5120).
pub const MAX_FEATURES: u64 = 1 << 16;
/// Most adapted layers one file may hold (ViT-H has 32 blocks × 4 linears + the decoder's ~40).
pub const MAX_TENSORS: usize = 4096;

/// One row of the tensor table: the LoRA factors of one linear layer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdapterTensor {
    /// The adapted linear layer's checkpoint name prefix (`image_encoder.blocks.0.attn.qkv`).
    pub name: String,
    pub in_features: u64,
    pub out_features: u64,
    /// `A: [rank, in_features]`, f32 LE, row-major.
    pub a: ByteRange,
    /// `B: [out_features, rank]`, f32 LE, row-major.
    pub b: ByteRange,
    /// CRC-32 (IEEE) of A's bytes followed by B's bytes.
    pub crc32: u32,
}

/// Everything between the fixed header and the data section (postcard, fields in this order).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdapterManifest {
    /// Short identifier (`us-hc18-r8`): 1–64 of `A-Z a-z 0-9 . _ -`, not starting with `.`/`-`.
    pub name: String,
    /// Imaging modality it was trained for, free text (`US`, `CT`, `MR`): 1–32 of
    /// `A-Z a-z 0-9 _ -`.
    pub modality: String,
    /// Lower-case hex SHA-256 of the base model file the factors were trained against.
    pub base_model_sha256: String,
    pub rank: u32,
    /// LoRA alpha; the update is scaled by `alpha / rank`.
    pub alpha: f32,
    /// The glob patterns the trainer adapted (every tensor name matches one).
    pub targets: Vec<String>,
    /// Lower-case hex SHA-256 identifying the training set (the trainer defines what it hashed).
    pub training_set_sha256: String,
    /// When it was written, RFC 3339 in UTC (`2026-11-29T17:25:00Z`, optional fraction).
    pub created: String,
    /// Dice on the trainer's validation split, if it measured one (in [0, 1]).
    pub val_dice: Option<f32>,
    /// Version string of the trainer that wrote it.
    pub trainer_version: String,
    /// Length of the data section: the file ends exactly there.
    pub data_len: u64,
    pub tensors: Vec<AdapterTensor>,
}

impl AdapterManifest {
    /// `alpha / rank`, the factor the LoRA update is multiplied by.
    pub fn scale(&self) -> f32 {
        self.alpha / self.rank as f32
    }
}

/// The descriptive fields of a manifest, as a writer supplies them (the tensor table and data
/// length are derived from the factors).
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterMeta {
    pub name: String,
    pub modality: String,
    pub base_model_sha256: String,
    pub rank: u32,
    pub alpha: f32,
    pub targets: Vec<String>,
    pub training_set_sha256: String,
    pub created: String,
    pub val_dice: Option<f32>,
    pub trainer_version: String,
}

/// The factors of one adapted linear layer, decoded to f32.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraFactors {
    pub name: String,
    pub in_features: usize,
    pub out_features: usize,
    /// `[rank, in_features]`, row-major.
    pub a: Vec<f32>,
    /// `[out_features, rank]`, row-major.
    pub b: Vec<f32>,
}

/// A linear layer a model offers for adaptation (`Segmenter::linear_shapes`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinearShape {
    pub name: String,
    pub in_features: usize,
    pub out_features: usize,
}

/// The layers of `linears` that one of `targets` matches, in model order.
pub fn select_targets<'a>(linears: &'a [LinearShape], targets: &[String]) -> Vec<&'a LinearShape> {
    linears.iter().filter(|l| targets.iter().any(|t| crate::format::glob_match(t, &l.name))).collect()
}

/// [`DEFAULT_TARGETS`] as owned strings, the form manifests hold.
pub fn default_targets() -> Vec<String> {
    DEFAULT_TARGETS.iter().map(|s| s.to_string()).collect()
}

#[cfg(test)]
mod tests;
