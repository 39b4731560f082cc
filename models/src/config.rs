//! Architecture of a SAM-family model, stored in the packed file's manifest and inferred from a
//! checkpoint's tensor shapes at import (`crate::import`), never from its file name.

use serde::{Deserialize, Serialize};

/// The whole model: one image encoder plus SAM's prompt encoder and mask decoder.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub encoder: EncoderConfig,
    /// Side of the square encoder input in pixels (1024 for SAM/MobileSAM, 256 for LiteMedSAM).
    pub image_size: usize,
    /// Channels of the image embedding and prompt tokens (256 in every SAM variant).
    pub prompt_embed_dim: usize,
    /// Side of the image embedding grid (64 for every variant above).
    pub embedding_size: usize,
    /// Hidden channels of the mask-prompt downscaler (16).
    pub mask_in_chans: usize,
    pub decoder: DecoderConfig,
    pub preprocess: Preprocess,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum EncoderConfig {
    /// SAM's ViT (B/L/H): `image_encoder.blocks.*` in the official naming.
    Vit(VitConfig),
    /// TinyViT as in MobileSAM and LiteMedSAM: `image_encoder.layers.*`.
    TinyVit(TinyVitConfig),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VitConfig {
    pub patch_size: usize,
    pub embed_dim: usize,
    pub depth: usize,
    pub num_heads: usize,
    pub mlp_ratio: usize,
    pub window_size: usize,
    /// Indices of the blocks with global attention (all others are windowed).
    pub global_attn_indexes: Vec<usize>,
    pub out_chans: usize,
}

impl VitConfig {
    /// The official SAM ViT-B / ViT-L / ViT-H at 1024 input.
    pub fn sam_b() -> Self {
        Self { patch_size: 16, embed_dim: 768, depth: 12, num_heads: 12, mlp_ratio: 4, window_size: 14, global_attn_indexes: vec![2, 5, 8, 11], out_chans: 256 }
    }
    pub fn sam_l() -> Self {
        Self { patch_size: 16, embed_dim: 1024, depth: 24, num_heads: 16, mlp_ratio: 4, window_size: 14, global_attn_indexes: vec![5, 11, 17, 23], out_chans: 256 }
    }
    pub fn sam_h() -> Self {
        Self { patch_size: 16, embed_dim: 1280, depth: 32, num_heads: 16, mlp_ratio: 4, window_size: 14, global_attn_indexes: vec![7, 15, 23, 31], out_chans: 256 }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TinyVitConfig {
    pub embed_dims: Vec<usize>,
    pub depths: Vec<usize>,
    pub num_heads: Vec<usize>,
    pub window_sizes: Vec<usize>,
    pub mlp_ratio: usize,
    pub mbconv_expand_ratio: usize,
    pub local_conv_size: usize,
    /// Kernel size of the two patch-embedding convolutions (3 in MobileSAM, 1 in LiteMedSAM).
    pub patch_embed_kernel: usize,
    pub out_chans: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DecoderConfig {
    pub transformer_depth: usize,
    pub num_heads: usize,
    pub mlp_dim: usize,
    /// Downsampling of the internal dimension in the token<->image cross attentions (2).
    pub attention_downsample_rate: usize,
    pub num_multimask_outputs: usize,
    pub iou_head_depth: usize,
    pub iou_head_hidden_dim: usize,
}

impl Default for DecoderConfig {
    fn default() -> Self {
        Self { transformer_depth: 2, num_heads: 8, mlp_dim: 2048, attention_downsample_rate: 2, num_multimask_outputs: 3, iou_head_depth: 3, iou_head_hidden_dim: 256 }
    }
}

/// Each model family's own pre- and post-processing (see shared reference PROTOCOL and
/// `crate::pipeline`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Preprocess {
    /// LiteMedSAM: INTER_AREA resize to 256 longest side, min-max to [0,1], pad; box truncated
    /// to int; logits cropped then upsampled; mask = sigmoid > 0.5.
    LiteMedSam,
    /// SAM / MobileSAM `SamPredictor`: bilinear ResizeLongestSide to 1024, pixel mean/std
    /// normalisation, pad; logits upsampled to the padded size, cropped, upsampled; mask = logit > 0.
    Sam,
}
