//! TinyViT, the image encoder of MobileSAM (1024 input) and LiteMedSAM (256 input), with SAM's
//! neck on top: `[B, 3, S, S]` → `[B, out_chans, 64, 64]`.
//!
//! Why it looks the way it does:
//! - The network is four stages. Stage 0 is convolutional (MBConv blocks); the later stages are
//!   windowed self-attention blocks (`TinyViTBlock`). Each stage but the last ends in a
//!   `PatchMerging` that changes the channel count and (usually) halves the resolution. Between
//!   stages the activation is kept as an NCHW image; the attention stages work on NHWC, which is
//!   the reference's token layout `[B, H·W, C]` with the spatial axes kept apart.
//! - Every `Conv2d_BN` of the reference has its BatchNorm folded into the convolution by the
//!   importer, so each is one biased convolution here (`X.c.weight`, `X.c.bias`).
//! - The learned attention biases are indexed by the window's point offsets. The gather
//!   `attention_biases[:, attention_bias_idxs]` happens once at load time, so the backend sees a
//!   plain `[heads, N, N]` table ([`AttentionBias::Table`]).
//! - Windows that do not tile the image are zero-padded *before* the attention's LayerNorm, and
//!   the padded tokens take part in the attention as keys (the reference does not mask them).
//!   We reproduce that exactly.
//! - Two reference quirks are kept on purpose: a `PatchMerging` whose output width is 320, 448 or
//!   576 does not downsample (stride 1), and LiteMedSAM's patch embedding uses 1x1 kernels with
//!   stride 1 (no downsampling) where MobileSAM's uses 3x3 kernels with stride 2 twice.
//!
//! Weight names follow the checkpoints: `image_encoder.patch_embed.seq.{0,2}`,
//! `image_encoder.layers.{i}.blocks.{j}.*`, `image_encoder.layers.{i}.downsample.*`,
//! `image_encoder.neck.{0..3}`.

use crate::backend::{Activation, AttentionBias, Backend, Conv2dSpec, InvertedResidual};
use crate::config::TinyVitConfig;
use crate::nets::common::{Conv2d, Linear, Norm};
use crate::nets::neck::Neck;
use crate::nets::window::{nhwc_dims, WindowGrid};
use crate::store::WeightStore;
use crate::{Error, Result};

/// Checkpoint name prefix of the whole encoder.
const PREFIX: &str = "image_encoder";
/// `torch.nn.LayerNorm` default, used by `attn.norm` and `mlp.norm`.
const BLOCK_NORM_EPS: f32 = 1e-5;
/// SAM's `LayerNorm2d` default, used by `neck.1` and `neck.3`.
/// Output widths for which the reference `PatchMerging` keeps the resolution (stride 1).
const NON_DOWNSAMPLING_MERGE_DIMS: [usize; 3] = [320, 448, 576];
/// Kernel of the depthwise convolutions in MBConv and PatchMerging.
const DEPTHWISE_KERNEL: usize = 3;

/// The TinyViT image encoder plus SAM's neck.
pub struct TinyVit<B: Backend> {
    image_size: usize,
    patch_embed: PatchEmbed<B>,
    stages: Vec<Stage<B>>,
    neck: Neck<B>,
}

impl<B: Backend> TinyVit<B> {
    /// Loads every tensor under `image_encoder.` and checks its shape against `cfg`.
    pub fn load(b: &B, store: &dyn WeightStore, cfg: &TinyVitConfig, image_size: usize) -> Result<Self> {
        validate_config(cfg)?;
        let patch_embed = PatchEmbed::load(b, store, cfg)?;
        let stages = (0..cfg.depths.len()).map(|i| Stage::load(b, store, cfg, i)).collect::<Result<Vec<_>>>()?;
        let last_dim = *cfg.embed_dims.last().expect("validated non-empty");
        let neck = Neck::load(b, store, last_dim, cfg.out_chans)?;
        Ok(Self { image_size, patch_embed, stages, neck })
    }

    /// Every [`Linear`] of this part, in forward order, for adapter binding.
    /// Stage 0 is convolutional and has none.
    pub fn linears_mut(&mut self, f: &mut dyn FnMut(&mut Linear<B>)) {
        for stage in &mut self.stages {
            if let StageBlocks::Attention(blocks) = &mut stage.blocks {
                for block in blocks {
                    f(&mut block.attn.qkv);
                    f(&mut block.attn.proj);
                    f(&mut block.mlp.fc1);
                    f(&mut block.mlp.fc2);
                }
            }
        }
    }

    /// `image` is `[B, 3, S, S]` (normalised and padded); returns `[B, out_chans, 64, 64]` for the
    /// MobileSAM and LiteMedSAM geometries.
    pub fn forward(&self, b: &B, image: &B::Tensor) -> Result<B::Tensor> {
        self.check_input(b, image)?;
        let mut x = self.patch_embed.forward(b, image)?;
        for stage in &self.stages {
            x = stage.forward(b, x)?;
        }
        self.neck.forward(b, &x)
    }

    /// `image` must be `[B, 3, S, S]` with `S` the configured image size.
    fn check_input(&self, b: &B, image: &B::Tensor) -> Result<()> {
        let shape = b.shape(image);
        let s = self.image_size;
        if shape.len() != 4 || shape[1] != 3 || shape[2] != s || shape[3] != s {
            return Err(Error::Input(format!("TinyViT expects an image [B, 3, {s}, {s}], got {shape:?}")));
        }
        Ok(())
    }
}

/// Refuses configurations whose per-stage lists disagree, before any tensor is read.
fn validate_config(cfg: &TinyVitConfig) -> Result<()> {
    let stages = cfg.depths.len();
    let lists_agree = cfg.embed_dims.len() == stages && cfg.num_heads.len() == stages && cfg.window_sizes.len() == stages;
    if stages < 2 || !lists_agree {
        return Err(Error::Input(format!("TinyViT config needs >= 2 stages and equal-length stage lists: {cfg:?}")));
    }
    for i in 1..stages {
        let (dim, heads, window) = (cfg.embed_dims[i], cfg.num_heads[i], cfg.window_sizes[i]);
        if heads == 0 || dim % heads != 0 || window == 0 {
            return Err(Error::Input(format!("TinyViT stage {i}: dim {dim} must split into {heads} heads, window {window} must be > 0")));
        }
    }
    Ok(())
}

/// A convolution geometry (stride, zero padding, groups) in one expression.
fn conv_spec(stride: usize, padding: usize, groups: usize) -> Conv2dSpec {
    Conv2dSpec { stride, padding, groups }
}

/// Loads a reference `Conv2d_BN` at `prefix`: the convolution `{prefix}.c` with the BatchNorm
/// already folded into its weight and bias. A missing bias means an unfolded checkpoint, which
/// would compute silently wrong results, so it is refused.
fn load_conv_bn<B: Backend>(
    b: &B,
    store: &dyn WeightStore,
    prefix: &str,
    (c_in, c_out): (usize, usize),
    kernel: usize,
    spec: Conv2dSpec,
) -> Result<Conv2d<B>> {
    let conv_prefix = format!("{prefix}.c");
    let bias_name = format!("{conv_prefix}.bias");
    if !store.contains(&bias_name) {
        return Err(Error::MissingTensor(format!("{bias_name} (the BatchNorm of {prefix} must be folded at import)")));
    }
    Conv2d::load(b, store, &conv_prefix, c_in, c_out, kernel, spec)
}

/// `[B, C, H, W]` → `[B, H, W, C]`.
fn nchw_to_nhwc<B: Backend>(b: &B, x: &B::Tensor) -> Result<B::Tensor> {
    b.permute(x, &[0, 2, 3, 1])
}

/// `[B, H, W, C]` → `[B, C, H, W]`.
fn nhwc_to_nchw<B: Backend>(b: &B, x: &B::Tensor) -> Result<B::Tensor> {
    b.permute(x, &[0, 3, 1, 2])
}

// ---------------------------------------------------------------------------------------------
// Patch embedding
// ---------------------------------------------------------------------------------------------

/// Two `Conv2d_BN` with a GELU between (`patch_embed.seq.0`, `.seq.2`).
struct PatchEmbed<B: Backend> {
    first: Conv2d<B>,
    second: Conv2d<B>,
}

impl<B: Backend> PatchEmbed<B> {
    fn load(b: &B, store: &dyn WeightStore, cfg: &TinyVitConfig) -> Result<Self> {
        let kernel = cfg.patch_embed_kernel;
        let spec = patch_embed_spec(kernel)?;
        let dim = cfg.embed_dims[0];
        let prefix = format!("{PREFIX}.patch_embed.seq");
        Ok(Self {
            first: load_conv_bn(b, store, &format!("{prefix}.0"), (3, dim / 2), kernel, spec)?,
            second: load_conv_bn(b, store, &format!("{prefix}.2"), (dim / 2, dim), kernel, spec)?,
        })
    }

    /// `image: [B, 3, S, S]` → `[B, dim0, S/4, S/4]` (3x3 kernels) or `[B, dim0, S, S]` (1x1).
    fn forward(&self, b: &B, image: &B::Tensor) -> Result<B::Tensor> {
        let x = self.first.forward(b, image, Activation::Gelu)?;
        self.second.forward(b, &x, Activation::None)
    }
}

/// MobileSAM: `Conv2d_BN(.., 3, stride 2, pad 1)`; LiteMedSAM: `Conv2d_BN(.., 1, stride 1, pad 0)`.
fn patch_embed_spec(kernel: usize) -> Result<Conv2dSpec> {
    match kernel {
        3 => Ok(conv_spec(2, 1, 1)),
        1 => Ok(conv_spec(1, 0, 1)),
        k => Err(Error::Input(format!("TinyViT patch embedding kernel {k} is not one of the known variants (1 or 3)"))),
    }
}

// ---------------------------------------------------------------------------------------------
// Stages
// ---------------------------------------------------------------------------------------------

/// The blocks of one stage: convolutional in stage 0, windowed attention afterwards.
enum StageBlocks<B: Backend> {
    Conv(Vec<MbConv<B>>),
    Attention(Vec<TinyVitBlock<B>>),
}

/// One `layers.{i}`: its blocks, then the optional `PatchMerging` (`layers.{i}.downsample`).
struct Stage<B: Backend> {
    blocks: StageBlocks<B>,
    downsample: Option<PatchMerging<B>>,
}

impl<B: Backend> Stage<B> {
    fn load(b: &B, store: &dyn WeightStore, cfg: &TinyVitConfig, index: usize) -> Result<Self> {
        let prefix = format!("{PREFIX}.layers.{index}");
        let dim = cfg.embed_dims[index];
        let block_prefix = |j: usize| format!("{prefix}.blocks.{j}");
        let blocks = if index == 0 {
            let hidden = dim * cfg.mbconv_expand_ratio;
            let load = |j| MbConv::load(b, store, &block_prefix(j), dim, hidden);
            StageBlocks::Conv((0..cfg.depths[index]).map(load).collect::<Result<_>>()?)
        } else {
            let geometry = BlockGeometry {
                dim,
                num_heads: cfg.num_heads[index],
                window_size: cfg.window_sizes[index],
                mlp_hidden: dim * cfg.mlp_ratio,
                local_conv_size: cfg.local_conv_size,
            };
            let load = |j| TinyVitBlock::load(b, store, &block_prefix(j), &geometry);
            StageBlocks::Attention((0..cfg.depths[index]).map(load).collect::<Result<_>>()?)
        };
        let is_last = index + 1 == cfg.depths.len();
        let downsample = if is_last {
            None
        } else {
            Some(PatchMerging::load(b, store, &format!("{prefix}.downsample"), dim, cfg.embed_dims[index + 1])?)
        };
        Ok(Self { blocks, downsample })
    }

    /// `x: [B, C_i, H, W]` → `[B, C_{i+1}, H', W']` (H' = H/2, or H for a non-downsampling merge;
    /// the last stage keeps its shape).
    fn forward(&self, b: &B, x: B::Tensor) -> Result<B::Tensor> {
        let x = match &self.blocks {
            StageBlocks::Conv(blocks) => run_mbconvs(b, blocks, x)?,
            StageBlocks::Attention(blocks) => run_attention_blocks(b, blocks, &x)?,
        };
        match &self.downsample {
            Some(merge) => merge.forward(b, &x),
            None => Ok(x),
        }
    }
}

/// `x: [B, C, H, W]` through every MBConv, same shape out.
fn run_mbconvs<B: Backend>(b: &B, blocks: &[MbConv<B>], mut x: B::Tensor) -> Result<B::Tensor> {
    for block in blocks {
        x = block.forward(b, &x)?;
    }
    Ok(x)
}

/// `x: [B, C, H, W]` through every TinyViT block (which work on NHWC), same shape out.
fn run_attention_blocks<B: Backend>(b: &B, blocks: &[TinyVitBlock<B>], x: &B::Tensor) -> Result<B::Tensor> {
    let mut tokens = nchw_to_nhwc(b, x)?;
    for block in blocks {
        tokens = block.forward(b, &tokens)?;
    }
    nhwc_to_nchw(b, &tokens)
}

// ---------------------------------------------------------------------------------------------
// MBConv and PatchMerging (convolutional)
// ---------------------------------------------------------------------------------------------

/// Inverted residual: 1x1 expand → GELU → depthwise 3x3 → GELU → 1x1 project, + input, GELU.
struct MbConv<B: Backend> {
    expand: Conv2d<B>,
    depthwise: Conv2d<B>,
    project: Conv2d<B>,
}

impl<B: Backend> MbConv<B> {
    fn load(b: &B, store: &dyn WeightStore, prefix: &str, dim: usize, hidden: usize) -> Result<Self> {
        let pointwise = conv_spec(1, 0, 1);
        let depthwise = conv_spec(1, DEPTHWISE_KERNEL / 2, hidden);
        Ok(Self {
            expand: load_conv_bn(b, store, &format!("{prefix}.conv1"), (dim, hidden), 1, pointwise)?,
            depthwise: load_conv_bn(b, store, &format!("{prefix}.conv2"), (hidden, hidden), DEPTHWISE_KERNEL, depthwise)?,
            project: load_conv_bn(b, store, &format!("{prefix}.conv3"), (hidden, dim), 1, pointwise)?,
        })
    }

    /// `x: [B, C, H, W]` → `[B, C, H, W]`.
    fn forward(&self, b: &B, x: &B::Tensor) -> Result<B::Tensor> {
        let block = InvertedResidual {
            expand: &self.expand.weight,
            expand_bias: self.expand.bias.as_ref(),
            depthwise: &self.depthwise.weight,
            depthwise_bias: self.depthwise.bias.as_ref(),
            kernel: DEPTHWISE_KERNEL,
            project: &self.project.weight,
            project_bias: self.project.bias.as_ref(),
            act: Activation::Gelu,
        };
        b.inverted_residual(x, &block)
    }
}

/// Channel change and downsampling between stages: 1x1 → GELU → depthwise 3x3 (stride 2, or 1
/// for the widths in [`NON_DOWNSAMPLING_MERGE_DIMS`]) → GELU → 1x1.
struct PatchMerging<B: Backend> {
    pointwise_in: Conv2d<B>,
    depthwise: Conv2d<B>,
    pointwise_out: Conv2d<B>,
}

impl<B: Backend> PatchMerging<B> {
    fn load(b: &B, store: &dyn WeightStore, prefix: &str, dim: usize, out_dim: usize) -> Result<Self> {
        let pointwise = conv_spec(1, 0, 1);
        let depthwise = conv_spec(merge_stride(out_dim), DEPTHWISE_KERNEL / 2, out_dim);
        Ok(Self {
            pointwise_in: load_conv_bn(b, store, &format!("{prefix}.conv1"), (dim, out_dim), 1, pointwise)?,
            depthwise: load_conv_bn(b, store, &format!("{prefix}.conv2"), (out_dim, out_dim), DEPTHWISE_KERNEL, depthwise)?,
            pointwise_out: load_conv_bn(b, store, &format!("{prefix}.conv3"), (out_dim, out_dim), 1, pointwise)?,
        })
    }

    /// `x: [B, dim, H, W]` → `[B, out_dim, ceil(H/s), ceil(W/s)]` with `s` = [`merge_stride`].
    fn forward(&self, b: &B, x: &B::Tensor) -> Result<B::Tensor> {
        let h = self.pointwise_in.forward(b, x, Activation::Gelu)?;
        let h = self.depthwise.forward(b, &h, Activation::Gelu)?;
        self.pointwise_out.forward(b, &h, Activation::None)
    }
}

/// The reference's rule: merges into 320, 448 or 576 channels keep the resolution.
fn merge_stride(out_dim: usize) -> usize {
    if NON_DOWNSAMPLING_MERGE_DIMS.contains(&out_dim) {
        1
    } else {
        2
    }
}

// ---------------------------------------------------------------------------------------------
// TinyViT block: windowed attention, local convolution, MLP
// ---------------------------------------------------------------------------------------------

/// The sizes one attention stage gives each of its blocks.
struct BlockGeometry {
    dim: usize,
    num_heads: usize,
    window_size: usize,
    mlp_hidden: usize,
    local_conv_size: usize,
}

/// `x + attn(windows(x))` → depthwise `local_conv` → `x + mlp(x)`.
struct TinyVitBlock<B: Backend> {
    window_size: usize,
    attn: WindowAttention<B>,
    local_conv: Conv2d<B>,
    local_conv_size: usize,
    mlp: Mlp<B>,
}

impl<B: Backend> TinyVitBlock<B> {
    fn load(b: &B, store: &dyn WeightStore, prefix: &str, g: &BlockGeometry) -> Result<Self> {
        let local_spec = conv_spec(1, g.local_conv_size / 2, g.dim);
        Ok(Self {
            window_size: g.window_size,
            attn: WindowAttention::load(b, store, &format!("{prefix}.attn"), g.dim, g.num_heads, g.window_size)?,
            local_conv: load_conv_bn(b, store, &format!("{prefix}.local_conv"), (g.dim, g.dim), g.local_conv_size, local_spec)?,
            local_conv_size: g.local_conv_size,
            mlp: Mlp::load(b, store, &format!("{prefix}.mlp"), g.dim, g.mlp_hidden)?,
        })
    }

    /// `x: [B, H, W, C]` → `[B, H, W, C]`.
    fn forward(&self, b: &B, x: &B::Tensor) -> Result<B::Tensor> {
        let attended = self.windowed_attention(b, x)?;
        let x = b.add(x, &attended)?;
        let x = self.local_conv_nhwc(b, &x)?;
        let mlp_out = self.mlp.forward(b, &x)?;
        b.add(&x, &mlp_out)
    }

    /// `x: [B, H, W, C]` → `[B, H, W, C]`: zero-pad to a multiple of the window, attend within
    /// each window, drop the padding. (The reference's unpartitioned path for `H == W == window`
    /// is the one-window case of this.)
    fn windowed_attention(&self, b: &B, x: &B::Tensor) -> Result<B::Tensor> {
        let (batch, height, width, _) = nhwc_dims(b, x)?;
        let windows = WindowGrid::new(batch, height, width, self.window_size);
        let tokens = windows.partition(b, x)?;
        let attended = self.attn.forward(b, &tokens)?;
        windows.merge(b, attended)
    }

    /// `x: [B, H, W, C]` → `[B, H, W, C]` through the depthwise convolution, channels-last.
    fn local_conv_nhwc(&self, b: &B, x: &B::Tensor) -> Result<B::Tensor> {
        b.depthwise_conv_nhwc(x, &self.local_conv.weight, self.local_conv.bias.as_ref(), self.local_conv_size)
    }
}

/// Multi-head self-attention inside one window, with its own LayerNorm in front and the learned
/// per-offset biases (`attn.norm`, `attn.qkv`, `attn.proj`, `attn.attention_biases`).
struct WindowAttention<B: Backend> {
    norm: Norm<B>,
    qkv: Linear<B>,
    proj: Linear<B>,
    /// `[heads, N, N]`, `N = window²`: `attention_biases[:, attention_bias_idxs]`.
    bias_table: B::Vector,
    num_heads: usize,
    key_dim: usize,
}

impl<B: Backend> WindowAttention<B> {
    fn load(b: &B, store: &dyn WeightStore, prefix: &str, dim: usize, num_heads: usize, window: usize) -> Result<Self> {
        // With attn_ratio = 1, key, query and value all have `dim / heads` channels per head.
        let key_dim = dim / num_heads;
        Ok(Self {
            norm: Norm::load(b, store, &format!("{prefix}.norm"), dim, BLOCK_NORM_EPS)?,
            qkv: Linear::load(b, store, &format!("{prefix}.qkv"), dim, 3 * dim)?,
            proj: Linear::load(b, store, &format!("{prefix}.proj"), dim, dim)?,
            bias_table: load_bias_table(b, store, &format!("{prefix}.attention_biases"), num_heads, window)?,
            num_heads,
            key_dim,
        })
    }

    /// `x: [Bw, N, C]` (one window per batch row) → `[Bw, N, C]`.
    fn forward(&self, b: &B, x: &B::Tensor) -> Result<B::Tensor> {
        let normed = self.norm.forward(b, x)?;
        let qkv = self.qkv.forward(b, &normed, Activation::None)?;
        let scale = (self.key_dim as f32).powf(-0.5);
        // The reference views qkv per head and splits each head's slice into q | k | v: the
        // layout `attention_packed` takes, heads merged again on the way out.
        let merged = b.attention_packed(qkv, self.num_heads, scale, AttentionBias::Table(&self.bias_table))?;
        self.proj.forward(b, &merged, Activation::None)
    }
}

/// Reads `attention_biases` `[heads, offsets]` and gathers it into the `[heads, N, N]` table.
fn load_bias_table<B: Backend>(b: &B, store: &dyn WeightStore, name: &str, num_heads: usize, window: usize) -> Result<B::Vector> {
    let index = AttentionBiasIndex::new(window);
    let biases = store.get_shaped(name, &[num_heads, index.num_offsets])?.to_f32();
    let n = index.points;
    b.vector_from_host(&[num_heads, n, n], &index.gather(&biases, num_heads))
}

/// The reference's `attention_bias_idxs`: for every pair of points of a `window x window` grid
/// (points in row-major order), the index of their offset `(|dy|, |dx|)`, offsets numbered in
/// the order they are first met while scanning the pairs.
#[derive(Debug, PartialEq, Eq)]
pub struct AttentionBiasIndex {
    /// Points in the window, `N = window²`.
    pub points: usize,
    /// Distinct offsets, the second axis of `attention_biases`.
    pub num_offsets: usize,
    /// `[N, N]` row-major: offset index of (query point, key point).
    pub idxs: Vec<usize>,
}

impl AttentionBiasIndex {
    /// Builds the index exactly as the reference: `itertools.product(range(w), range(w))` for
    /// the points, then a first-seen numbering of `(abs(dy), abs(dx))` over all ordered pairs.
    pub fn new(window: usize) -> Self {
        let points: Vec<(usize, usize)> = (0..window).flat_map(|y| (0..window).map(move |x| (y, x))).collect();
        let mut seen: Vec<(usize, usize)> = Vec::new();
        let mut idxs = Vec::with_capacity(points.len() * points.len());
        for &(y1, x1) in &points {
            for &(y2, x2) in &points {
                let offset = (y1.abs_diff(y2), x1.abs_diff(x2));
                let index = match seen.iter().position(|&o| o == offset) {
                    Some(i) => i,
                    None => {
                        seen.push(offset);
                        seen.len() - 1
                    }
                };
                idxs.push(index);
            }
        }
        Self { points: points.len(), num_offsets: seen.len(), idxs }
    }

    /// `biases: [heads, num_offsets]` → `[heads, N, N]` with `out[h, i, j] = biases[h, idxs[i, j]]`.
    pub fn gather(&self, biases: &[f32], num_heads: usize) -> Vec<f32> {
        (0..num_heads)
            .flat_map(|h| {
                let row = &biases[h * self.num_offsets..(h + 1) * self.num_offsets];
                self.idxs.iter().map(move |&i| row[i])
            })
            .collect()
    }
}

/// `mlp.norm` → `fc1` → GELU → `fc2` (the residual is added by the block).
struct Mlp<B: Backend> {
    norm: Norm<B>,
    fc1: Linear<B>,
    fc2: Linear<B>,
}

impl<B: Backend> Mlp<B> {
    fn load(b: &B, store: &dyn WeightStore, prefix: &str, dim: usize, hidden: usize) -> Result<Self> {
        Ok(Self {
            norm: Norm::load(b, store, &format!("{prefix}.norm"), dim, BLOCK_NORM_EPS)?,
            fc1: Linear::load(b, store, &format!("{prefix}.fc1"), dim, hidden)?,
            fc2: Linear::load(b, store, &format!("{prefix}.fc2"), hidden, dim)?,
        })
    }

    /// `x: [.., C]` → `[.., C]`.
    fn forward(&self, b: &B, x: &B::Tensor) -> Result<B::Tensor> {
        let h = self.norm.forward(b, x)?;
        let h = self.fc1.forward(b, &h, Activation::Gelu)?;
        self.fc2.forward(b, &h, Activation::None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 2x2 window by hand: points (0,0),(0,1),(1,0),(1,1); offsets are first met in the order
    /// (0,0),(0,1),(1,0),(1,1) from the first query point.
    #[test]
    fn tiny_vit_bias_index_2x2_by_hand() {
        let index = AttentionBiasIndex::new(2);
        assert_eq!(index.points, 4);
        assert_eq!(index.num_offsets, 4);
        #[rustfmt::skip]
        let expected = vec![
            0, 1, 2, 3,
            1, 0, 3, 2,
            2, 3, 0, 1,
            3, 2, 1, 0,
        ];
        assert_eq!(index.idxs, expected);
    }

    /// For the real window sizes, the first-seen numbering equals `|dy|·w + |dx|` (the first
    /// query point (0,0) meets every offset in that order), and the offset count matches the
    /// checkpoints' `attention_biases` widths (49 for 7x7, 196 for 14x14).
    #[test]
    fn tiny_vit_bias_index_matches_closed_form() {
        for window in [7usize, 14] {
            let index = AttentionBiasIndex::new(window);
            let n = window * window;
            assert_eq!(index.num_offsets, n);
            for i in 0..n {
                for j in 0..n {
                    let (dy, dx) = ((i / window).abs_diff(j / window), (i % window).abs_diff(j % window));
                    assert_eq!(index.idxs[i * n + j], dy * window + dx, "window {window}, pair ({i}, {j})");
                }
            }
        }
    }

    #[test]
    fn tiny_vit_bias_gather_per_head() {
        let index = AttentionBiasIndex::new(2);
        let biases = [10.0, 11.0, 12.0, 13.0, 20.0, 21.0, 22.0, 23.0]; // [2 heads, 4 offsets]
        let table = index.gather(&biases, 2);
        assert_eq!(table.len(), 2 * 4 * 4);
        assert_eq!(&table[4..8], &[11.0, 10.0, 13.0, 12.0]); // head 0, query point 1
        assert_eq!(&table[16 + 8..16 + 12], &[22.0, 23.0, 20.0, 21.0]); // head 1, query point 2
    }

    #[test]
    fn tiny_vit_merge_stride_rule() {
        assert_eq!(merge_stride(128), 2);
        assert_eq!(merge_stride(160), 2);
        assert_eq!(merge_stride(320), 1);
        assert_eq!(merge_stride(448), 1);
        assert_eq!(merge_stride(576), 1);
    }

    /// The TinyViT-5M configuration both checkpoints use; only the patch embedding differs.
    fn tiny_vit_5m(patch_embed_kernel: usize) -> TinyVitConfig {
        TinyVitConfig {
            embed_dims: vec![64, 128, 160, 320],
            depths: vec![2, 2, 6, 2],
            num_heads: vec![2, 4, 5, 10],
            window_sizes: vec![7, 7, 14, 7],
            mlp_ratio: 4,
            mbconv_expand_ratio: 4,
            local_conv_size: 3,
            patch_embed_kernel,
            out_chans: 256,
        }
    }

    /// Loads with zero weights of exactly the requested shapes and runs the shape-only backend:
    /// every reshape, permute, window partition and convolution geometry is checked.
    fn encoder_output_shape(cfg: &TinyVitConfig, image_size: usize) -> (Vec<usize>, Vec<(String, Vec<usize>)>) {
        let store = shape_check::RecordingStore::default();
        let b = shape_check::ShapeBackend;
        let encoder = TinyVit::load(&b, &store, cfg, image_size).expect("load");
        let image = b.from_host(&[1, 3, image_size, image_size], &[]).expect("image");
        let out = encoder.forward(&b, &image).expect("forward");
        (out, store.requested())
    }

    #[test]
    fn tiny_vit_litemedsam_geometry_gives_64x64_embedding() {
        let (out, requested) = encoder_output_shape(&tiny_vit_5m(1), 256);
        assert_eq!(out, vec![1, 256, 64, 64]);
        let find = |name: &str| requested.iter().find(|(n, _)| n == name).map(|(_, s)| s.clone());
        assert_eq!(find("image_encoder.patch_embed.seq.0.c.weight"), Some(vec![32, 3, 1, 1]));
        assert_eq!(find("image_encoder.layers.2.blocks.5.attn.attention_biases"), Some(vec![5, 196]));
        assert_eq!(find("image_encoder.layers.2.downsample.conv2.c.weight"), Some(vec![320, 1, 3, 3]));
        assert_eq!(find("image_encoder.neck.2.weight"), Some(vec![256, 256, 3, 3]));
        if std::env::var_os("TINY_VIT_LIST_TENSORS").is_some() {
            for (name, shape) in &requested {
                eprintln!("{name} {shape:?}");
            }
        }
    }

    #[test]
    fn tiny_vit_mobilesam_geometry_gives_64x64_embedding() {
        let (out, _) = encoder_output_shape(&tiny_vit_5m(3), 1024);
        assert_eq!(out, vec![1, 256, 64, 64]);
    }

    #[test]
    fn tiny_vit_rejects_wrong_image_size() {
        let store = shape_check::RecordingStore::default();
        let b = shape_check::ShapeBackend;
        let encoder = TinyVit::load(&b, &store, &tiny_vit_5m(1), 256).expect("load");
        let image = b.from_host(&[1, 3, 1024, 1024], &[]).expect("image");
        assert!(matches!(encoder.forward(&b, &image), Err(Error::Input(_))));
    }

    /// A 1x5x6x2 NHWC image in 4x4 windows (padded to 8x8): every token lands in window
    /// `(y/4, x/4)` at position `(y%4)·4 + x%4`, padding is zero, and merging restores the image.
    #[test]
    fn tiny_vit_window_partition_places_tokens_and_round_trips() {
        use crate::cpu::CpuBackend;

        let b = CpuBackend::new(1).expect("cpu backend");
        let (h, w, c, ws) = (5usize, 6usize, 2usize, 4usize);
        let values: Vec<f32> = (0..h * w * c).map(|i| i as f32 + 1.0).collect();
        let image = b.from_host(&[1, h, w, c], &values).expect("image");
        let grid = WindowGrid::new(1, h, w, ws);
        let windows = grid.partition(&b, &image).expect("partition");
        assert_eq!(b.shape(&windows), &[4, 16, 2]);

        let tokens = b.to_host(&windows).expect("download");
        for window in 0..4 {
            for pos in 0..ws * ws {
                let (y, x) = ((window / 2) * ws + pos / ws, (window % 2) * ws + pos % ws);
                for ch in 0..c {
                    let expected = if y < h && x < w { values[(y * w + x) * c + ch] } else { 0.0 };
                    assert_eq!(tokens[(window * ws * ws + pos) * c + ch], expected, "window {window} pos {pos} ch {ch}");
                }
            }
        }
        let merged = grid.merge(&b, windows).expect("merge");
        assert_eq!(b.shape(&merged), &[1, h, w, c]);
        assert_eq!(b.to_host(&merged).expect("download"), values);
    }

    /// Head split as the reference's `view(B, N, heads, -1).split([kd, kd, kd], dim=3)` followed
    /// by `permute(0, 2, 1, 3)`, and the merge as its `transpose(1, 2).reshape(B, N, dh)`: q, k
    /// and v cut out of `qkv` by those index rules, attended with `attention`, merged by hand,
    /// must equal `attention_packed` both on the CPU backend's fused kernel and on the trait's
    /// default (what the CUDA and autograd backends run).
    #[test]
    fn tiny_vit_packed_attention_follows_reference_layout() {
        use crate::backend::tests::DefaultLora;
        use crate::cpu::CpuBackend;
        use rand::{Rng, SeedableRng};

        let (windows, tokens, heads, kd) = (2usize, 7usize, 3usize, 4usize);
        let width = heads * 3 * kd;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(rand::random());
        let values: Vec<f32> = (0..windows * tokens * width).map(|_| rng.gen_range(-2.0..2.0)).collect();
        let table: Vec<f32> = (0..heads * tokens * tokens).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let source = |w: usize, n: usize, h: usize, part: usize, d: usize| values[(w * tokens + n) * width + h * 3 * kd + part * kd + d];
        let part = |p: usize| -> Vec<f32> {
            let mut t = Vec::new();
            for (w, h, n, d) in (0..windows).flat_map(|w| (0..heads).flat_map(move |h| (0..tokens).flat_map(move |n| (0..kd).map(move |d| (w, h, n, d))))) {
                t.push(source(w, n, h, p, d));
            }
            t
        };
        let cpu = CpuBackend::new(1).expect("cpu backend");
        let split = |p: usize| cpu.from_host(&[windows * heads, tokens, kd], &part(p)).expect("upload");
        let table_t = cpu.vector_from_host(&[heads, tokens, tokens], &table).expect("table");
        let attended = cpu.to_host(&cpu.attention(&split(0), &split(1), &split(2), 0.5, AttentionBias::Table(&table_t)).expect("attention")).expect("download");
        let mut expected = vec![0.0f32; windows * tokens * heads * kd];
        for (w, h, n, d) in (0..windows).flat_map(|w| (0..heads).flat_map(move |h| (0..tokens).flat_map(move |n| (0..kd).map(move |d| (w, h, n, d))))) {
            expected[(w * tokens + n) * heads * kd + h * kd + d] = attended[((w * heads + h) * tokens + n) * kd + d];
        }

        let qkv = cpu.from_host(&[windows, tokens, width], &values).expect("qkv");
        let fused = cpu.attention_packed(qkv, heads, 0.5, AttentionBias::Table(&table_t)).expect("fused");
        assert_eq!(cpu.shape(&fused), &[windows, tokens, heads * kd]);
        assert_eq!(cpu.to_host(&fused).expect("download"), expected, "the CPU backend's fused kernel");

        let default = DefaultLora::new(1);
        let qkv = default.from_host(&[windows, tokens, width], &values).expect("qkv");
        let table_d = default.vector_from_host(&[heads, tokens, tokens], &table).expect("table");
        let composed = default.attention_packed(qkv, heads, 0.5, AttentionBias::Table(&table_d)).expect("default");
        assert_eq!(default.to_host(&composed).expect("download"), expected, "the trait's default");

        let bad = cpu.from_host(&[windows, tokens, width + 1], &vec![0.0; windows * tokens * (width + 1)]).expect("upload");
        assert!(cpu.attention_packed(bad, heads, 0.5, AttentionBias::None).is_err(), "a width that is not heads·3·d");
    }

    /// Encodes a seeded random image with pixel values in `pixel_range` through the encoder of
    /// the shared checkpoint `file` on the CPU backend and checks that the embedding is
    /// `[1, 256, 64, 64]`, finite and not constant. Skips when the shared weights are absent.
    fn check_checkpoint_encodes_finite_embedding(file: &str, pixel_range: std::ops::Range<f32>) {
        use rand::{Rng, SeedableRng};

        use crate::config::EncoderConfig;
        use crate::cpu::CpuBackend;
        use crate::import::Checkpoint;

        let path = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/weights")).join(file);
        if !path.exists() {
            eprintln!("SKIP: {} not found", path.display());
            return;
        }
        let checkpoint = Checkpoint::open(&path).expect("import checkpoint");
        let config = checkpoint.config().clone();
        let EncoderConfig::TinyVit(cfg) = &config.encoder else { panic!("{file} must be detected as TinyViT: {config:?}") };
        let b = CpuBackend::new(2).expect("cpu backend");
        let encoder = TinyVit::load(&b, &checkpoint, cfg, config.image_size).expect("load encoder");

        let s = config.image_size;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let pixels: Vec<f32> = (0..3 * s * s).map(|_| rng.gen_range(pixel_range.clone())).collect();
        let image = b.from_host(&[1, 3, s, s], &pixels).expect("image");
        let started = std::time::Instant::now();
        let out = encoder.forward(&b, &image).expect("forward");
        let elapsed = started.elapsed();

        assert_eq!(b.shape(&out), &[1, 256, 64, 64]);
        let values = b.to_host(&out).expect("download");
        assert!(values.iter().all(|v| v.is_finite()), "non-finite values in the embedding");
        let mean = values.iter().sum::<f32>() / values.len() as f32;
        let var = values.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / values.len() as f32;
        eprintln!("{file} embedding in {elapsed:.2?}: mean {mean:.5}, std {:.5}, first {:?}", var.sqrt(), &values[..4]);
        assert!(var > 1e-6, "embedding is constant");
    }

    /// LiteMedSAM's input is min-max normalised to [0, 1].
    #[test]
    fn tiny_vit_litemedsam_checkpoint_encodes_finite_embedding() {
        check_checkpoint_encodes_finite_embedding("lite_medsam.pth", 0.0..1.0);
    }

    /// MobileSAM's input is normalised by SAM's pixel mean and std: roughly [-2, 2.2].
    #[test]
    fn tiny_vit_mobilesam_checkpoint_encodes_finite_embedding() {
        check_checkpoint_encodes_finite_embedding("mobile_sam.pt", -2.0..2.2);
    }

    /// The four integers after `"key": [` in a golden JSON file.
    fn json_box(json: &str, key: &str) -> [f32; 4] {
        let start = json.find(&format!("\"{key}\"")).expect("key in json");
        let list = &json[start..];
        let (open, close) = (list.find('[').expect("["), list.find(']').expect("]"));
        let numbers: Vec<f32> = list[open + 1..close].split(',').map(|v| v.trim().parse().expect("number")).collect();
        [numbers[0], numbers[1], numbers[2], numbers[3]]
    }

    /// The number after `"key":` in a golden JSON file.
    fn json_number(json: &str, key: &str) -> f32 {
        let start = json.find(&format!("\"{key}\":")).expect("key in json") + key.len() + 3;
        let rest = json[start..].trim_start();
        let end = rest.find([',', '\n', '}']).unwrap_or(rest.len());
        rest[..end].trim().parse().expect("number")
    }

    /// End to end against the PyTorch golden low-res logits of LiteMedSAM: our encoder, then the
    /// prompt encoder and mask decoder of this crate. One unpadded image (us-busbra, 512x512 →
    /// 256x256) and one zero-padded (us-hc18, resized to 173x256 then padded).
    #[test]
    fn tiny_vit_litemedsam_matches_golden_lowres_logits() {
        use crate::cpu::CpuBackend;
        use crate::import::Checkpoint;
        use crate::nets::mask_decoder::MaskDecoder;
        use crate::nets::prompt_encoder::PromptEncoder;

        let shared = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared"));
        let golden = shared.join("reference/litemedsam");
        let weights = shared.join("weights/lite_medsam.pth");
        if !golden.exists() || !weights.exists() {
            eprintln!("SKIP: shared golden outputs or weights not found");
            return;
        }
        let checkpoint = Checkpoint::open(&weights).expect("import");
        let config = checkpoint.config().clone();
        let crate::config::EncoderConfig::TinyVit(cfg) = &config.encoder else { panic!("not TinyViT") };
        let b = CpuBackend::new(2).expect("cpu backend");
        let encoder = TinyVit::load(&b, &checkpoint, cfg, 256).expect("encoder");
        let prompt_encoder = PromptEncoder::load(&b, &checkpoint, &config).expect("prompt encoder");
        let decoder = MaskDecoder::load(&b, &checkpoint, &config).expect("decoder");

        for (set, stem) in [("us-busbra", "0003-l"), ("us-hc18", "000_HC")] {
            let dir = golden.join(set);
            let channel = crate::npy::read(&dir.join(format!("{stem}_input256_ch0.npy"))).expect("input npy");
            let pixels: Vec<f32> = channel.data.iter().copied().cycle().take(3 * channel.data.len()).collect();
            let image = b.from_host(&[1, 3, 256, 256], &pixels).expect("image");
            let embedding = encoder.forward(&b, &image).expect("encode");

            let json = std::fs::read_to_string(dir.join(format!("{stem}_label1.json"))).expect("json");
            let (sparse, dense) = prompt_encoder.embed(&b, &[], &[json_box(&json, "box_256_xyxy")], None).expect("prompt");
            let (logits, iou) = decoder.forward(&b, &embedding, prompt_encoder.token_positional_encoding(), &sparse, &dense, false).expect("decode");

            let ours = b.to_host(&logits).expect("download");
            let expected = crate::npy::read(&dir.join(format!("{stem}_label1_lowres_logits.npy"))).expect("golden npy");
            assert_eq!(ours.len(), expected.data.len());
            let max_diff = ours.iter().zip(&expected.data).map(|(a, e)| (a - e).abs()).fold(0.0f32, f32::max);
            let sign_flips = ours.iter().zip(&expected.data).filter(|(a, e)| (**a > 0.0) != (**e > 0.0)).count();
            let golden_iou = json_number(&json, "iou_pred");
            eprintln!("golden {set}/{stem}: max |logit diff| {max_diff:.5}, sign flips {sign_flips}, iou {} vs {golden_iou}", iou[0]);
            assert!(max_diff < 1e-3, "{set}/{stem}: logits differ from PyTorch by up to {max_diff}");
            assert!((iou[0] - golden_iou).abs() < 1e-3, "{set}/{stem}: IoU prediction {} vs PyTorch {golden_iou}", iou[0]);
        }
    }

    /// A backend whose tensors are only shapes: each operation checks its operands' shapes as a
    /// real backend would and returns the output shape. Enough to test a network's plumbing
    /// without any arithmetic.
    mod shape_check {
        use std::sync::{Arc, Mutex};

        use crate::backend::{Activation, AttentionBias, Backend, Conv2dSpec};
        use crate::store::{StoredTensor, TensorData, WeightStore};
        use crate::{Error, Result};

        type Shape = Vec<usize>;

        fn ensure(ok: bool, what: impl FnOnce() -> String) -> Result<()> {
            if ok {
                Ok(())
            } else {
                Err(Error::Shape(what()))
            }
        }

        /// Hands out zero tensors of whatever shape is asked for, remembering each request.
        #[derive(Default)]
        pub struct RecordingStore {
            requests: Mutex<Vec<(String, Shape)>>,
        }

        impl RecordingStore {
            pub fn requested(&self) -> Vec<(String, Shape)> {
                self.requests.lock().unwrap().clone()
            }
        }

        impl WeightStore for RecordingStore {
            fn get(&self, name: &str) -> Result<StoredTensor> {
                Err(Error::MissingTensor(format!("{name}: the recording store only answers get_shaped")))
            }
            /// Convolution biases exist (folded BatchNorms) except on the neck's bias-free convs.
            fn contains(&self, name: &str) -> bool {
                !(name.ends_with("neck.0.bias") || name.ends_with("neck.2.bias"))
            }
            fn names(&self) -> Vec<String> {
                Vec::new()
            }
            fn get_shaped(&self, name: &str, shape: &[usize]) -> Result<StoredTensor> {
                self.requests.lock().unwrap().push((name.to_string(), shape.to_vec()));
                let zeros: Arc<[f32]> = vec![0.0; shape.iter().product()].into();
                Ok(StoredTensor { name: name.to_string(), shape: shape.to_vec(), data: TensorData::F32(zeros) })
            }
        }

        pub struct ShapeBackend;

        impl Backend for ShapeBackend {
            type Tensor = Shape;
            type Weight = Shape;
            type Vector = Shape;

            fn name(&self) -> &'static str {
                "shape-check"
            }
            fn weight(&self, t: &StoredTensor) -> Result<Shape> {
                Ok(t.shape.clone())
            }
            fn vector(&self, t: &StoredTensor) -> Result<Shape> {
                Ok(t.shape.clone())
            }
            fn vector_from_host(&self, shape: &[usize], data: &[f32]) -> Result<Shape> {
                ensure(shape.iter().product::<usize>() == data.len(), || format!("vector {shape:?} from {} values", data.len()))?;
                Ok(shape.to_vec())
            }
            fn vector_shape<'a>(&self, v: &'a Shape) -> &'a [usize] {
                v
            }
            fn from_host(&self, shape: &[usize], _data: &[f32]) -> Result<Shape> {
                Ok(shape.to_vec())
            }
            fn to_host(&self, t: &Shape) -> Result<Vec<f32>> {
                Ok(vec![0.0; t.iter().product()])
            }
            fn shape<'a>(&self, t: &'a Shape) -> &'a [usize] {
                t
            }
            fn tensor_from_vector(&self, v: &Shape) -> Result<Shape> {
                Ok(v.clone())
            }
            fn reshape(&self, t: Shape, shape: &[usize]) -> Result<Shape> {
                ensure(t.iter().product::<usize>() == shape.iter().product::<usize>(), || format!("reshape {t:?} to {shape:?}"))?;
                Ok(shape.to_vec())
            }
            fn permute(&self, t: &Shape, perm: &[usize]) -> Result<Shape> {
                let mut sorted = perm.to_vec();
                sorted.sort_unstable();
                ensure(sorted == (0..t.len()).collect::<Vec<_>>(), || format!("permute {t:?} by {perm:?}"))?;
                Ok(perm.iter().map(|&a| t[a]).collect())
            }
            fn narrow(&self, t: &Shape, axis: usize, start: usize, len: usize) -> Result<Shape> {
                ensure(axis < t.len() && start + len <= t[axis], || format!("narrow {t:?} axis {axis} {start}+{len}"))?;
                let mut out = t.clone();
                out[axis] = len;
                Ok(out)
            }
            fn concat(&self, ts: &[&Shape], axis: usize) -> Result<Shape> {
                let mut out = ts[0].clone();
                out[axis] = ts.iter().map(|t| t[axis]).sum();
                Ok(out)
            }
            fn pad_hw(&self, t: &Shape, pad_h: usize, pad_w: usize) -> Result<Shape> {
                ensure(t.len() == 4, || format!("pad_hw of {t:?}"))?;
                Ok(vec![t[0], t[1] + pad_h, t[2] + pad_w, t[3]])
            }
            fn linear(&self, x: &Shape, w: &Shape, bias: Option<&Shape>, _act: Activation) -> Result<Shape> {
                ensure(x.last() == Some(&w[1]), || format!("linear {x:?} by {w:?}"))?;
                ensure(bias.is_none_or(|b| b[..] == [w[0]]), || format!("linear bias {bias:?} for {w:?}"))?;
                let mut out = x.clone();
                *out.last_mut().unwrap() = w[0];
                Ok(out)
            }
            fn matmul(&self, a: &Shape, b: &Shape, transpose_b: bool) -> Result<Shape> {
                let (k, n) = if transpose_b { (b[2], b[1]) } else { (b[1], b[2]) };
                ensure(a[0] == b[0] && a[2] == k, || format!("matmul {a:?} {b:?}"))?;
                Ok(vec![a[0], a[1], n])
            }
            fn conv2d(&self, x: &Shape, w: &Shape, bias: Option<&Shape>, spec: Conv2dSpec, _act: Activation) -> Result<Shape> {
                ensure(x.len() == 4 && x[1] == w[1] * spec.groups && w[0] % spec.groups == 0, || {
                    format!("conv2d {x:?} by {w:?} {spec:?}")
                })?;
                ensure(bias.is_none_or(|b| b[..] == [w[0]]), || format!("conv bias {bias:?} for {w:?}"))?;
                let out = |size: usize, k: usize| (size + 2 * spec.padding - k) / spec.stride + 1;
                Ok(vec![x[0], w[0], out(x[2], w[2]), out(x[3], w[3])])
            }
            fn conv_transpose2d(&self, x: &Shape, w: &Shape, _bias: Option<&Shape>, stride: usize) -> Result<Shape> {
                Ok(vec![x[0], w[1], x[2] * stride, x[3] * stride])
            }
            fn layer_norm(&self, x: &Shape, gamma: &Shape, beta: &Shape, _eps: f32) -> Result<Shape> {
                ensure(x.last() == gamma.first() && gamma == beta, || format!("layer_norm {x:?} with {gamma:?}"))?;
                Ok(x.clone())
            }
            fn layer_norm_nchw(&self, x: &Shape, gamma: &Shape, beta: &Shape, _eps: f32) -> Result<Shape> {
                ensure(x.len() == 4 && gamma[..] == [x[1]] && gamma == beta, || format!("layer_norm_nchw {x:?} with {gamma:?}"))?;
                Ok(x.clone())
            }
            fn activation(&self, x: &Shape, _act: Activation) -> Result<Shape> {
                Ok(x.clone())
            }
            fn add(&self, a: &Shape, b: &Shape) -> Result<Shape> {
                ensure(a.ends_with(b), || format!("add {a:?} + {b:?}"))?;
                Ok(a.clone())
            }
            fn add_vector(&self, a: &Shape, v: &Shape) -> Result<Shape> {
                ensure(a.ends_with(v), || format!("add_vector {a:?} + {v:?}"))?;
                Ok(a.clone())
            }
            fn scale(&self, a: &Shape, _s: f32) -> Result<Shape> {
                Ok(a.clone())
            }
            fn attention(&self, q: &Shape, k: &Shape, v: &Shape, _scale: f32, bias: AttentionBias<'_, Self>) -> Result<Shape> {
                ensure(q.len() == 3 && k == v && q[0] == k[0] && q[2] == k[2], || format!("attention q {q:?} k {k:?} v {v:?}"))?;
                if let AttentionBias::Table(table) = bias {
                    let fits = table.len() == 3 && q[0] % table[0] == 0 && table[1] == q[1] && table[2] == k[1];
                    ensure(fits, || format!("attention bias table {table:?} for q {q:?} k {k:?}"))?;
                }
                Ok(q.clone())
            }
            fn resize_bilinear(&self, x: &Shape, out_h: usize, out_w: usize) -> Result<Shape> {
                Ok(vec![x[0], x[1], out_h, out_w])
            }
        }
    }

}
