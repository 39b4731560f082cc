//! The packed model file (`.msam`): one self-describing, memory-mappable file holding a SAM's
//! architecture, where its weights came from, and every tensor as NF4 or fp16. The byte layout
//! is specified in `models/FORMAT.md`; this module is its single implementation.
//!
//! - [`writer`]: [`pack`] a [`WeightStore`](crate::store::WeightStore) into a file;
//! - [`reader`]: [`PackedModel`], validated in full at open, serving tensors zero-copy.

pub mod reader;
pub mod writer;

use serde::{Deserialize, Serialize};

use crate::config::{EncoderConfig, ModelConfig};

pub use reader::{PackedModel, TensorInfo};
pub use writer::{pack, pack_with_progress, PackReport, PackStep};

/// First bytes of every packed file.
pub const MAGIC: &[u8; 8] = b"MSAMPACK";
/// The only format version this code reads and writes.
pub const VERSION: u32 = 1;
/// magic (8) + version (4) + manifest length (4) + manifest CRC32 (4).
pub const HEADER_LEN: usize = 20;
/// Alignment of the data section and of every array in it.
pub const ALIGN: usize = 64;

/// How one tensor is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Dtype {
    /// Little-endian f32: only for values outside fp16's range.
    F32,
    /// Little-endian IEEE half.
    F16,
    /// `minisam_kernels::nf4`: three arrays (codes, absmax_q, absmax_scales).
    Nf4,
}

/// Where the weights came from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    /// File name of the source checkpoint (no directories).
    pub source_file: String,
    /// Lower-case hex SHA-256 of the source checkpoint.
    pub source_sha256: String,
    /// `CARGO_PKG_VERSION` of the packer.
    pub packer_version: String,
    /// The `keep_fp16` patterns the packer was given.
    pub keep_fp16: Vec<String>,
}

impl Provenance {
    /// Provenance for a source file; `pack` fills in `keep_fp16`.
    pub fn new(source_file: impl Into<String>, source_sha256: impl Into<String>) -> Self {
        Self { source_file: source_file.into(), source_sha256: source_sha256.into(), packer_version: env!("CARGO_PKG_VERSION").into(), keep_fp16: Vec::new() }
    }
}

/// A byte range relative to the start of the data section.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ByteRange {
    pub offset: u64,
    pub len: u64,
}

/// One row of the tensor table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TensorEntry {
    pub name: String,
    pub shape: Vec<u64>,
    pub dtype: Dtype,
    /// One range for F16/F32; codes, absmax_q, absmax_scales for NF4.
    pub arrays: Vec<ByteRange>,
    /// CRC-32 (IEEE) of the arrays' bytes, concatenated in order.
    pub crc32: u32,
}

/// Everything between the fixed header and the data section.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub config: ModelConfig,
    pub provenance: Provenance,
    /// Length of the data section: the file ends exactly there.
    pub data_len: u64,
    pub tensors: Vec<TensorEntry>,
}

/// Names of parameters that are embeddings or tokens: looked up by row, never multiplied as a
/// matrix, so quantising them buys little and costs accuracy.
const EMBEDDING_SUFFIXES: &[&str] = &["iou_token.weight", "mask_tokens.weight", "not_a_point_embed.weight", "no_mask_embed.weight"];

/// The default dtype rule: linear and convolution kernels (`*.weight` with ≥ 2 dims that is not
/// an embedding) are NF4; biases, norms, embeddings, tokens, positional tables
/// (`pos_embed`, `rel_pos_*`, `attention_biases`, the Gaussian matrix) stay fp16.
pub fn is_quantised_by_default(name: &str, shape: &[usize]) -> bool {
    name.ends_with(".weight")
        && shape.len() >= 2
        && rows_fill_whole_blocks(shape)
        && !EMBEDDING_SUFFIXES.iter().any(|s| name.ends_with(s))
        && !name.contains(".point_embeddings.")
}

/// Patterns `minisam pack` keeps in fp16 on top of [`is_quantised_by_default`] unless told
/// `--all-nf4`, per encoder family, from the quantisation study in `benches/RESULTS.md`.
///
/// TinyViT (LiteMedSAM, MobileSAM): its 5.7M-parameter encoder does not survive 4 bits. On
/// LiteMedSAM and the whole of shared/data, every linear/conv in NF4 lost 0.027-0.079 mean Dice
/// on four of five sets; on a 25-image subset the mean per-target |Dice change| against f32 was
/// 0.102 with everything in NF4, 0.091 with only the decoder kept fp16, 0.074 with encoder
/// stages 0-1 kept fp16 and 0.024 with the whole encoder kept fp16. Keeping the encoder costs
/// 6.4 MB (7.2 -> 13.6 MB), still a third of the f32 checkpoint.
///
/// Every SAM decoder: with the encoder fp16, ct-kits19 still lost 0.021 (kidney boxes that hold
/// both kidneys are decided by the two-way transformer's attention). Keeping the transformer's
/// attention projections fp16 (1.18M parameters, +1.8 MB) brought ct-kits19 to 0.8199 against
/// f32's 0.8201; the transformer's MLPs fp16 did not help (0.7990), nor did the hypernetwork MLPs
/// and IoU head (0.7979) or the upscaling convolutions (0.8045). The decoder is the same network
/// in every SAM variant and its cost is small beside any encoder, so the rule applies to all.
///
/// SAM ViT-B/L/H encoders: no real weights can be evaluated here (only random ones), so nothing
/// of the encoder is kept beyond the dtype rule until a measurement says otherwise.
pub fn default_keep_fp16(config: &ModelConfig) -> Vec<String> {
    let decoder_attention = "mask_decoder.transformer.*attn*".to_string();
    match config.encoder {
        EncoderConfig::TinyVit(_) => vec!["image_encoder.*".to_string(), decoder_attention],
        EncoderConfig::Vit(_) => vec![decoder_attention],
    }
}

/// NF4 blocks run over the flattened tensor; a block that straddles two output channels shares
/// one absmax between rows whose scales may differ by orders of magnitude (BatchNorm folding
/// scales each output channel of TinyViT's convolutions separately). A depthwise 3x3 kernel
/// (9 weights per channel) would share each absmax among seven channels: on LiteMedSAM that alone
/// dropped the predicted IoU of the sample from 0.87 to 0.64. So only tensors whose rows are whole
/// blocks are quantised; the rest (depthwise kernels, 1x1 convs with 32 or 160 inputs) stay fp16.
pub fn rows_fill_whole_blocks(shape: &[usize]) -> bool {
    let row: usize = shape.iter().skip(1).product();
    row > 0 && row % minisam_kernels::nf4::BLOCK == 0
}

/// `*` matches any run of characters (including dots); everything else matches itself.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ni));
            pi += 1;
        } else if pi < p.len() && p[pi] == n[ni] {
            pi += 1;
            ni += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// Rounds up to the next multiple of [`ALIGN`], or `None` on overflow.
pub(crate) fn align_up(x: u64) -> Option<u64> {
    x.checked_add(ALIGN as u64 - 1).map(|v| v / ALIGN as u64 * ALIGN as u64)
}

#[cfg(test)]
mod tests;
