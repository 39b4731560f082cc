//! SAM's ViT image encoder (ViT-B/L/H, `ImageEncoderViT` of `segment_anything`) with its neck:
//! `[B, 3, S, S]` → `[B, out_chans, S/16, S/16]`.
//!
//! Why it looks the way it does:
//! - Tokens are kept as NHWC `[B, H, W, C]`, the reference's layout, so windowing is a reshape
//!   and a permute. The neck converts back to NCHW.
//! - Windowed blocks zero-pad the grid to a multiple of the window *after* `norm1` and let the
//!   padded tokens take part as keys, unmasked, exactly as the reference (`window_partition`).
//!   Blocks in `global_attn_indexes` attend over the whole grid.
//! - The decomposed relative position bias (`add_decomposed_rel_pos`) is never expanded to an
//!   `Nq x Nk` matrix: the gather `rel_pos[relative_coords]` depends only on sizes, so it happens
//!   once at load time ([`RelPosTable`]); at run time two small batched products give
//!   `rel_h [BH, Nq, Kh]` and `rel_w [BH, Nq, Kw]`, handed to the backend as
//!   [`AttentionBias::DecomposedRelPos`].
//! - SAM does not interpolate its absolute position embedding: an image whose patch grid differs
//!   from the stored `pos_embed` grid is refused at load. Relative position tables whose length
//!   differs from `2·size − 1` *are* resized linearly, as the reference's `get_rel_pos` does.
//!
//! Weight names follow the official checkpoints: `image_encoder.patch_embed.proj`,
//! `image_encoder.pos_embed`, `image_encoder.blocks.{i}.{norm1,attn.qkv,attn.proj,attn.rel_pos_h,
//! attn.rel_pos_w,norm2,mlp.lin1,mlp.lin2}`, `image_encoder.neck.{0..3}`.

use crate::backend::{Activation, AttentionBias, Backend, Conv2dSpec};
use crate::config::VitConfig;
use crate::nets::common::{Conv2d, Linear, Norm};
use crate::nets::neck::Neck;
use crate::nets::window::{nhwc_dims, WindowGrid};
use crate::store::WeightStore;
use crate::{Error, Result};

/// Checkpoint name prefix of the whole encoder.
const PREFIX: &str = "image_encoder";
/// `build_sam` uses `partial(nn.LayerNorm, eps=1e-6)` in every block.
const BLOCK_NORM_EPS: f32 = 1e-6;
/// SAM's `LayerNorm2d` default, used by `neck.1` and `neck.3`.
/// Input channels of the patch embedding (RGB).
const IMAGE_CHANNELS: usize = 3;

/// SAM's ViT image encoder plus its neck.
pub struct VitEncoder<B: Backend> {
    image_size: usize,
    patch_embed: Conv2d<B>,
    /// `[G, G, C]`: the stored `[1, G, G, C]` without its batch axis, so it broadcasts over `B`.
    pos_embed: B::Vector,
    blocks: Vec<VitBlock<B>>,
    neck: Neck<B>,
}

impl<B: Backend> VitEncoder<B> {
    /// Loads every tensor under `image_encoder.`, checking shapes against `cfg`, and refuses an
    /// `image_size` whose patch grid differs from the stored position embedding's.
    pub fn load(b: &B, store: &dyn WeightStore, cfg: &VitConfig, image_size: usize) -> Result<Self> {
        let grid = patch_grid(cfg, image_size)?;
        let dim = cfg.embed_dim;
        let patch_spec = Conv2dSpec { stride: cfg.patch_size, padding: 0, groups: 1 };
        let patch_embed = Conv2d::load(b, store, &format!("{PREFIX}.patch_embed.proj"), IMAGE_CHANNELS, dim, cfg.patch_size, patch_spec)?;
        let pos_embed = load_pos_embed(b, store, grid, dim)?;
        let blocks = (0..cfg.depth).map(|i| VitBlock::load(b, store, cfg, i, grid)).collect::<Result<Vec<_>>>()?;
        let neck = Neck::load(b, store, dim, cfg.out_chans)?;
        Ok(Self { image_size, patch_embed, pos_embed, blocks, neck })
    }

    /// Every [`Linear`] of this part, in forward order, for adapter binding.
    pub fn linears_mut(&mut self, f: &mut dyn FnMut(&mut Linear<B>)) {
        for block in &mut self.blocks {
            f(&mut block.attn.qkv);
            f(&mut block.attn.proj);
            f(&mut block.mlp_in);
            f(&mut block.mlp_out);
        }
    }

    /// `image: [B, 3, S, S]` (normalised and padded) → `[B, out_chans, S/16, S/16]`.
    pub fn forward(&self, b: &B, image: &B::Tensor) -> Result<B::Tensor> {
        self.check_input(b, image)?;
        let patches = self.patch_embed.forward(b, image, Activation::None)?;
        let mut tokens = b.add_vector(&b.permute(&patches, &[0, 2, 3, 1])?, &self.pos_embed)?;
        for block in &self.blocks {
            tokens = block.forward(b, &tokens)?;
        }
        let features = b.permute(&tokens, &[0, 3, 1, 2])?;
        self.neck.forward(b, &features)
    }

    /// `image` must be `[B, 3, S, S]` with `S` the size given at load.
    fn check_input(&self, b: &B, image: &B::Tensor) -> Result<()> {
        let shape = b.shape(image);
        let s = self.image_size;
        if shape.len() != 4 || shape[1] != IMAGE_CHANNELS || shape[2] != s || shape[3] != s {
            return Err(Error::Input(format!("SAM ViT expects an image [B, 3, {s}, {s}], got {shape:?}")));
        }
        Ok(())
    }
}

/// Side of the token grid for a square `image_size` input; refuses sizes that do not tile into
/// whole patches and configurations whose heads do not split the width.
fn patch_grid(cfg: &VitConfig, image_size: usize) -> Result<usize> {
    if cfg.patch_size == 0 || image_size == 0 || image_size % cfg.patch_size != 0 {
        return Err(Error::Input(format!("SAM ViT: image size {image_size} must be a positive multiple of the patch size {}", cfg.patch_size)));
    }
    if cfg.num_heads == 0 || cfg.embed_dim % cfg.num_heads != 0 {
        return Err(Error::Input(format!("SAM ViT: embed dim {} must split into {} heads", cfg.embed_dim, cfg.num_heads)));
    }
    if let Some(&bad) = cfg.global_attn_indexes.iter().find(|&&i| i >= cfg.depth) {
        return Err(Error::Input(format!("SAM ViT: global attention index {bad} is beyond depth {}", cfg.depth)));
    }
    Ok(image_size / cfg.patch_size)
}

/// Reads `pos_embed` `[1, G, G, C]` and keeps it as a `[G, G, C]` vector. A different stored grid
/// is refused: SAM has no interpolation of the absolute embedding.
fn load_pos_embed<B: Backend>(b: &B, store: &dyn WeightStore, grid: usize, dim: usize) -> Result<B::Vector> {
    let name = format!("{PREFIX}.pos_embed");
    let stored = store.get(&name)?;
    if stored.shape != [1, grid, grid, dim] {
        return Err(Error::Shape(format!(
            "{name} is {:?} but the image needs a {grid}x{grid} patch grid of width {dim}: SAM does not interpolate its \
             absolute position embedding, so the image size must be the one the checkpoint was trained at",
            stored.shape
        )));
    }
    b.vector_from_host(&[grid, grid, dim], &stored.to_f32())
}

// ---------------------------------------------------------------------------------------------
// Transformer block
// ---------------------------------------------------------------------------------------------

/// Where a block attends: inside `window x window` tiles, or over the whole grid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AttentionSpan {
    Windowed(usize),
    Global,
}

/// `x + attn(norm1(x))`, then `x + mlp(norm2(x))` (`image_encoder.blocks.{i}`).
struct VitBlock<B: Backend> {
    span: AttentionSpan,
    norm1: Norm<B>,
    attn: RelPosAttention<B>,
    norm2: Norm<B>,
    mlp_in: Linear<B>,
    mlp_out: Linear<B>,
}

impl<B: Backend> VitBlock<B> {
    /// Loads block `index`; its relative tables are `[2·window − 1, head_dim]` when windowed and
    /// `[2·grid − 1, head_dim]` when global (or resized to that).
    fn load(b: &B, store: &dyn WeightStore, cfg: &VitConfig, index: usize, grid: usize) -> Result<Self> {
        let prefix = format!("{PREFIX}.blocks.{index}");
        let span = block_span(cfg, index);
        // The reference sizes the relative tables by the attended extent: the window, or the grid.
        let attended = match span {
            AttentionSpan::Windowed(window) => window,
            AttentionSpan::Global => grid,
        };
        let (dim, hidden) = (cfg.embed_dim, cfg.embed_dim * cfg.mlp_ratio);
        Ok(Self {
            span,
            norm1: Norm::load(b, store, &format!("{prefix}.norm1"), dim, BLOCK_NORM_EPS)?,
            attn: RelPosAttention::load(b, store, &format!("{prefix}.attn"), dim, cfg.num_heads, attended)?,
            norm2: Norm::load(b, store, &format!("{prefix}.norm2"), dim, BLOCK_NORM_EPS)?,
            mlp_in: Linear::load(b, store, &format!("{prefix}.mlp.lin1"), dim, hidden)?,
            mlp_out: Linear::load(b, store, &format!("{prefix}.mlp.lin2"), hidden, dim)?,
        })
    }

    /// `x: [B, H, W, C]` → `[B, H, W, C]`.
    fn forward(&self, b: &B, x: &B::Tensor) -> Result<B::Tensor> {
        let normed = self.norm1.forward(b, x)?;
        let attended = match self.span {
            AttentionSpan::Windowed(window) => self.windowed_attention(b, normed, window)?,
            AttentionSpan::Global => self.global_attention(b, normed)?,
        };
        let x = b.add(x, &attended)?;
        let hidden = self.mlp_in.forward(b, &self.norm2.forward(b, &x)?, Activation::Gelu)?;
        let mlp = self.mlp_out.forward(b, &hidden, Activation::None)?;
        b.add(&x, &mlp)
    }

    /// `x: [B, H, W, C]` → `[B, H, W, C]`: zero-pad, attend inside each window, drop the padding.
    fn windowed_attention(&self, b: &B, x: B::Tensor, window: usize) -> Result<B::Tensor> {
        let (batch, height, width, _) = nhwc_dims(b, &x)?;
        let grid = WindowGrid::new(batch, height, width, window);
        let windows = grid.partition(b, &x)?;
        let attended = self.attn.forward(b, &windows, (window, window))?;
        grid.merge(b, attended)
    }

    /// `x: [B, H, W, C]` → `[B, H, W, C]`, every token attending to every other.
    fn global_attention(&self, b: &B, x: B::Tensor) -> Result<B::Tensor> {
        let (batch, height, width, channels) = nhwc_dims(b, &x)?;
        let tokens = b.reshape(x, &[batch, height * width, channels])?;
        let attended = self.attn.forward(b, &tokens, (height, width))?;
        b.reshape(attended, &[batch, height, width, channels])
    }
}

/// The reference's rule: window attention except in `global_attn_indexes` (or with window 0).
fn block_span(cfg: &VitConfig, index: usize) -> AttentionSpan {
    if cfg.window_size == 0 || cfg.global_attn_indexes.contains(&index) {
        AttentionSpan::Global
    } else {
        AttentionSpan::Windowed(cfg.window_size)
    }
}

// ---------------------------------------------------------------------------------------------
// Attention with decomposed relative position bias
// ---------------------------------------------------------------------------------------------

/// Multi-head self-attention of one block (`attn.qkv`, `attn.proj`, `attn.rel_pos_{h,w}`), for a
/// fixed attended extent `size x size` (the window, or the whole grid).
struct RelPosAttention<B: Backend> {
    qkv: Linear<B>,
    proj: Linear<B>,
    /// `[size, size, head_dim]`: `rel_pos_h` gathered by relative row offset.
    rel_h: RelPosTable<B>,
    /// `[size, size, head_dim]`: `rel_pos_w` gathered by relative column offset.
    rel_w: RelPosTable<B>,
    num_heads: usize,
    head_dim: usize,
}

impl<B: Backend> RelPosAttention<B> {
    /// Loads `qkv` `[3C, C]`, `proj` `[C, C]` and the two `[L, head_dim]` tables for a
    /// `size x size` extent.
    fn load(b: &B, store: &dyn WeightStore, prefix: &str, dim: usize, num_heads: usize, size: usize) -> Result<Self> {
        let head_dim = dim / num_heads;
        Ok(Self {
            qkv: Linear::load(b, store, &format!("{prefix}.qkv"), dim, 3 * dim)?,
            proj: Linear::load(b, store, &format!("{prefix}.proj"), dim, dim)?,
            rel_h: RelPosTable::load(b, store, &format!("{prefix}.rel_pos_h"), size, head_dim)?,
            rel_w: RelPosTable::load(b, store, &format!("{prefix}.rel_pos_w"), size, head_dim)?,
            num_heads,
            head_dim,
        })
    }

    /// `x: [Bw, h·w, C]` (one window, or one whole grid, per batch row) → `[Bw, h·w, C]`.
    /// `(h, w)` must be the extent the relative tables were built for.
    fn forward(&self, b: &B, x: &B::Tensor, (h, w): (usize, usize)) -> Result<B::Tensor> {
        let (rows, tokens) = (b.shape(x)[0], b.shape(x)[1]);
        if (h, w) != (self.rel_h.size, self.rel_w.size) || tokens != h * w {
            return Err(Error::Shape(format!(
                "SAM ViT attention built for {}x{} tokens got {tokens} tokens as {h}x{w}",
                self.rel_h.size, self.rel_w.size
            )));
        }
        let qkv = self.qkv.forward(b, x, Activation::None)?;
        let (q, k, v) = self.split_heads(b, qkv, rows, tokens)?;
        let q_grid = b.reshape(q, &[rows * self.num_heads, h, w, self.head_dim])?;
        let rel_h = self.rel_h.row_bias(b, &q_grid)?;
        let rel_w = self.rel_w.column_bias(b, &q_grid)?;
        let q = b.reshape(q_grid, &[rows * self.num_heads, tokens, self.head_dim])?;
        let scale = (self.head_dim as f32).powf(-0.5);
        let bias = AttentionBias::DecomposedRelPos { rel_h: &rel_h, rel_w: &rel_w };
        let out = b.attention(&q, &k, &v, scale, bias)?;
        let merged = self.merge_heads(b, out, rows, tokens)?;
        self.proj.forward(b, &merged, Activation::None)
    }

    /// `qkv: [Bw, N, 3·C]` → q, k, v each `[Bw·heads, N, head_dim]`. The reference views the last
    /// axis as `[3, heads, head_dim]` (`reshape(B, HW, 3, nHead, -1).permute(2, 0, 3, 1, 4)`).
    fn split_heads(&self, b: &B, qkv: B::Tensor, rows: usize, tokens: usize) -> Result<(B::Tensor, B::Tensor, B::Tensor)> {
        let (heads, hd) = (self.num_heads, self.head_dim);
        let per_head = b.reshape(qkv, &[rows, tokens, 3, heads, hd])?;
        let by_part = b.permute(&per_head, &[2, 0, 3, 1, 4])?; // [3, Bw, heads, N, hd]
        let part = |index: usize| -> Result<B::Tensor> { b.reshape(b.narrow(&by_part, 0, index, 1)?, &[rows * heads, tokens, hd]) };
        Ok((part(0)?, part(1)?, part(2)?))
    }

    /// `out: [Bw·heads, N, head_dim]` → `[Bw, N, heads·head_dim]` (head-major channels).
    fn merge_heads(&self, b: &B, out: B::Tensor, rows: usize, tokens: usize) -> Result<B::Tensor> {
        let (heads, hd) = (self.num_heads, self.head_dim);
        let per_head = b.reshape(out, &[rows, heads, tokens, hd])?;
        let token_major = b.permute(&per_head, &[0, 2, 1, 3])?;
        b.reshape(token_major, &[rows, tokens, heads * hd])
    }
}

/// One axis of the decomposed relative position embedding, already gathered by offset:
/// `gathered[i, j, :] = rel_pos_resized[i − j + size − 1, :]` (the reference's `get_rel_pos`).
struct RelPosTable<B: Backend> {
    /// `[size, size, head_dim]`, a parameter like any weight: made at load, it must not come from
    /// the activation arena (on CUDA the arena is sized before the model and cut to a frame's
    /// high-water mark, so a load-time activation would pin or overflow it). Each use takes a
    /// tensor view of it for [`Backend::matmul`].
    gathered: B::Vector,
    size: usize,
}

impl<B: Backend> RelPosTable<B> {
    /// Reads `rel_pos` `[L, head_dim]`, resizes it to `2·size − 1` rows if `L` differs (linear,
    /// as `F.interpolate(mode="linear")`), then gathers it by relative offset.
    fn load(b: &B, store: &dyn WeightStore, name: &str, size: usize, head_dim: usize) -> Result<Self> {
        let stored = store.get(name)?;
        let rows = match stored.shape[..] {
            [rows, width] if rows > 0 && width == head_dim => rows,
            ref other => return Err(Error::Shape(format!("tensor {name}: expected [L, {head_dim}] with L > 0, found {other:?}"))),
        };
        let gathered = gather_rel_pos(size, size, &stored.to_f32(), rows, head_dim);
        Ok(Self { gathered: b.vector_from_host(&[size, size, head_dim], &gathered)?, size })
    }

    /// `q: [BH, h, w, D]` → `rel_h: [BH, h·w, h]`, `rel_h[n, y·w+x, k] = Σ_c q[n, y, x, c] · R[y, k, c]`
    /// (the reference's `einsum("bhwc,hkc->bhwk")`), as one product batched over the row `y`.
    fn row_bias(&self, b: &B, q: &B::Tensor) -> Result<B::Tensor> {
        let (bh, h, w, d) = nhwc_dims(b, q)?;
        let by_row = b.reshape(b.permute(q, &[1, 0, 2, 3])?, &[h, bh * w, d])?;
        let product = b.matmul(&by_row, &b.tensor_from_vector(&self.gathered)?, true)?; // [h, BH·w, h]
        let split = b.reshape(product, &[h, bh, w, h])?;
        b.reshape(b.permute(&split, &[1, 0, 2, 3])?, &[bh, h * w, h])
    }

    /// `q: [BH, h, w, D]` → `rel_w: [BH, h·w, w]`, `rel_w[n, y·w+x, k] = Σ_c q[n, y, x, c] · R[x, k, c]`
    /// (the reference's `einsum("bhwc,wkc->bhwk")`), as one product batched over the column `x`.
    fn column_bias(&self, b: &B, q: &B::Tensor) -> Result<B::Tensor> {
        let (bh, h, w, d) = nhwc_dims(b, q)?;
        let by_column = b.reshape(b.permute(q, &[2, 0, 1, 3])?, &[w, bh * h, d])?;
        let product = b.matmul(&by_column, &b.tensor_from_vector(&self.gathered)?, true)?; // [w, BH·h, w]
        let split = b.reshape(product, &[w, bh, h, w])?;
        b.reshape(b.permute(&split, &[1, 2, 0, 3])?, &[bh, h * w, w])
    }
}

/// The reference's `get_rel_pos(q_size, k_size, rel_pos)` on the host: `table` is `[rows, dim]`
/// row-major; returns `[q_size, k_size, dim]`. The table is first resized to
/// `2·max(q_size, k_size) − 1` rows when `rows` differs.
pub fn gather_rel_pos(q_size: usize, k_size: usize, table: &[f32], rows: usize, dim: usize) -> Vec<f32> {
    let needed = 2 * q_size.max(k_size) - 1;
    let resized = if rows == needed { table.to_vec() } else { resize_rows_linear(table, rows, dim, needed) };
    let index = relative_position_index(q_size, k_size);
    index.iter().flat_map(|&row| resized[row * dim..(row + 1) * dim].iter().copied()).collect()
}

/// `[q_size · k_size]` row-major: the table row for query `i` and key `j`, i.e. the reference's
/// `(q_coords − k_coords) + (k_size − 1)·max(q/k, 1)` with `q_coords = i·max(k/q, 1)`,
/// `k_coords = j·max(q/k, 1)`, truncated to an integer (`.long()`). For equal sizes this is
/// `i − j + size − 1`.
pub fn relative_position_index(q_size: usize, k_size: usize) -> Vec<usize> {
    // f32 as in the reference, where `arange(..) * float` is a float32 tensor.
    let q_scale = (k_size as f32 / q_size as f32).max(1.0);
    let k_scale = (q_size as f32 / k_size as f32).max(1.0);
    let offset = (k_size - 1) as f32 * k_scale;
    (0..q_size)
        .flat_map(|i| (0..k_size).map(move |j| (i as f32 * q_scale - j as f32 * k_scale + offset) as usize))
        .collect()
}

/// `F.interpolate(table.T[None], size=out_rows, mode="linear", align_corners=False)` transposed
/// back: resizes a `[rows, dim]` table along its rows. Output `[out_rows, dim]`.
pub fn resize_rows_linear(table: &[f32], rows: usize, dim: usize, out_rows: usize) -> Vec<f32> {
    let scale = rows as f32 / out_rows as f32;
    let mut out = Vec::with_capacity(out_rows * dim);
    for r in 0..out_rows {
        // PyTorch's `area_pixel_compute_source_index` with align_corners=False, clamped at 0.
        let source = ((r as f32 + 0.5) * scale - 0.5).max(0.0);
        let lower = (source as usize).min(rows - 1);
        let upper = if lower + 1 < rows { lower + 1 } else { lower };
        let upper_weight = source - lower as f32;
        let (lo, hi) = (&table[lower * dim..(lower + 1) * dim], &table[upper * dim..(upper + 1) * dim]);
        out.extend(lo.iter().zip(hi).map(|(&a, &c)| (1.0 - upper_weight) * a + upper_weight * c));
    }
    out
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use crate::config::EncoderConfig;
    use crate::cpu::{CpuBackend, CpuTensor};
    use crate::import::layout::sam_vit_tensors;
    use crate::import::Checkpoint;
    use crate::pipeline::Geometry;
    use crate::prompt::{BoxPrompt, Prompts};
    use crate::sam::Segmenter;
    use crate::store::MemoryStore;

    type NamedTensors = Vec<(String, Vec<usize>, Vec<f32>)>;


    /// The brief's tiny ViT: width 64, 2 blocks of 4 heads, window 4, block 1 global.
    fn tiny_config() -> VitConfig {
        VitConfig { patch_size: 16, embed_dim: 64, depth: 2, num_heads: 4, mlp_ratio: 4, window_size: 4, global_attn_indexes: vec![1], out_chans: 256 }
    }

    const TINY_IMAGE: usize = 128;

    /// Seeded values for one parameter: norm scales near 1, matrices ~ 1/sqrt(fan_in), relative
    /// position tables large enough that the bias visibly changes the attention.
    fn random_values(name: &str, shape: &[usize], rng: &mut ChaCha8Rng) -> Vec<f32> {
        let n: usize = shape.iter().product();
        let is_norm = ["norm1.", "norm2.", "neck.1.", "neck.3."].iter().any(|p| name.contains(p));
        let (center, spread) = if is_norm && name.ends_with("weight") {
            (1.0, 0.1)
        } else if name.contains("rel_pos") {
            (0.0, 0.5)
        } else if shape.len() >= 2 {
            (0.0, (shape[1..].iter().product::<usize>() as f32).powf(-0.5))
        } else {
            (0.0, 0.1)
        };
        (0..n).map(|_| center + spread * rng.gen_range(-1.0f32..1.0)).collect()
    }

    /// Every tensor of a ViT SAM (official names and shapes) with seeded random values.
    fn random_sam_tensors(cfg: &VitConfig, image_size: usize, seed: u64) -> NamedTensors {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        sam_vit_tensors(cfg, image_size)
            .into_iter()
            .map(|(name, shape)| {
                let values = random_values(&name, &shape, &mut rng);
                (name, shape, values)
            })
            .collect()
    }

    fn random_host(len: usize, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..len).map(|_| rng.gen_range(-1.0f32..1.0)).collect()
    }

    fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    fn backend() -> CpuBackend {
        CpuBackend::new(1).expect("cpu backend")
    }

    // ---- relative position index math, by hand ----

    /// Equal sizes: row `i − j + size − 1`.
    #[test]
    fn vit_rel_pos_index_by_hand() {
        assert_eq!(relative_position_index(3, 3), vec![2, 1, 0, 3, 2, 1, 4, 3, 2]);
        // q = 2, k = 4: q coords scaled by 2, offset 3: i=0 → 3-j, i=1 → 5-j.
        assert_eq!(relative_position_index(2, 4), vec![3, 2, 1, 0, 5, 4, 3, 2]);
    }

    #[test]
    fn vit_rel_pos_gather_by_hand() {
        let table = [10.0, 11.0, 12.0, 13.0, 14.0]; // [2·3 − 1 rows, dim 1]
        assert_eq!(gather_rel_pos(3, 3, &table, 5, 1), vec![12.0, 11.0, 10.0, 13.0, 12.0, 11.0, 14.0, 13.0, 12.0]);
        let wide = [0.0, 1.0, 10.0, 11.0, 20.0, 21.0]; // 3 rows, dim 2, size 2
        assert_eq!(gather_rel_pos(2, 2, &wide, 3, 2), vec![10.0, 11.0, 0.0, 1.0, 20.0, 21.0, 10.0, 11.0]);
    }

    /// `F.interpolate([0, 1, 2], size=5, mode="linear")` = [0, 0.4, 1.0, 1.6, 2.0].
    #[test]
    fn vit_rel_pos_linear_resize_by_hand() {
        let resized = resize_rows_linear(&[0.0, 1.0, 2.0], 3, 1, 5);
        assert!(max_abs_diff(&resized, &[0.0, 0.4, 1.0, 1.6, 2.0]) < 1e-6, "{resized:?}");
        // A stored table of the wrong length is resized before the gather.
        assert_eq!(gather_rel_pos(3, 3, &[0.0, 1.0, 2.0], 3, 1).len(), 9);
    }

    // ---- the relative bias products against the reference's einsum ----

    /// `row_bias` / `column_bias` equal `einsum("bhwc,hkc->bhwk")` / `einsum("bhwc,wkc->bhwk")`
    /// computed by plain loops, on a non-square grid so swapped axes would show.
    #[test]
    fn vit_rel_bias_matches_einsum() {
        let b = backend();
        let (bh, h, w, d) = (2, 3, 4, 5);
        let q = random_host(bh * h * w * d, 1);
        let (rh, rw) = (random_host(h * h * d, 2), random_host(w * w * d, 3));
        let row_table = RelPosTable::<CpuBackend> { gathered: b.vector_from_host(&[h, h, d], &rh).unwrap(), size: h };
        let column_table = RelPosTable::<CpuBackend> { gathered: b.vector_from_host(&[w, w, d], &rw).unwrap(), size: w };
        let q_grid = b.from_host(&[bh, h, w, d], &q).unwrap();
        let rel_h = row_table.row_bias(&b, &q_grid).unwrap();
        let rel_w = column_table.column_bias(&b, &q_grid).unwrap();
        assert_eq!((rel_h.shape.clone(), rel_w.shape.clone()), (vec![bh, h * w, h], vec![bh, h * w, w]));
        let q_at = |n: usize, y: usize, x: usize, c: usize| q[((n * h + y) * w + x) * d + c];
        for n in 0..bh {
            for y in 0..h {
                for x in 0..w {
                    let token = y * w + x;
                    for k in 0..h {
                        let expected: f32 = (0..d).map(|c| q_at(n, y, x, c) * rh[(y * h + k) * d + c]).sum();
                        assert!((rel_h.data[(n * h * w + token) * h + k] - expected).abs() < 1e-5);
                    }
                    for k in 0..w {
                        let expected: f32 = (0..d).map(|c| q_at(n, y, x, c) * rw[(x * w + k) * d + c]).sum();
                        assert!((rel_w.data[(n * h * w + token) * w + k] - expected).abs() < 1e-5);
                    }
                }
            }
        }
    }

    // ---- windowing semantics ----

    /// Windowed attention on a 6x6 grid with window 4 (zero-padded to 8x8) equals, window by
    /// window, plain attention over the corresponding 4x4 crop of the zero-padded grid.
    #[test]
    fn vit_windows_match_per_crop_attention_with_padding() {
        let b = backend();
        let (dim, heads, window, side) = (32, 2, 4, 6);
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let head_dim = dim / heads;
        let shapes = [
            ("t.qkv.weight", vec![3 * dim, dim]),
            ("t.qkv.bias", vec![3 * dim]),
            ("t.proj.weight", vec![dim, dim]),
            ("t.proj.bias", vec![dim]),
            ("t.rel_pos_h", vec![2 * window - 1, head_dim]),
            ("t.rel_pos_w", vec![2 * window - 1, head_dim]),
        ];
        let store = MemoryStore::new(shapes.iter().map(|(n, s)| (n.to_string(), s.clone(), random_values(n, s, &mut rng))).collect());
        let attn = RelPosAttention::load(&b, &store, "t", dim, heads, window).unwrap();
        let x = random_host(side * side * dim, 8);
        let tiles = WindowGrid::new(1, side, side, window);
        let windows = tiles.partition(&b, &b.from_host(&[1, side, side, dim], &x).unwrap()).unwrap();
        let windowed = tiles.merge(&b, attn.forward(&b, &windows, (window, window)).unwrap()).unwrap();
        assert_eq!(windowed.shape, vec![1, side, side, dim]);

        let padded = b.pad_hw(&b.from_host(&[1, side, side, dim], &x).unwrap(), 2, 2).unwrap();
        for (wy, wx) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
            let crop = b.narrow(&b.narrow(&padded, 1, wy * window, window).unwrap(), 2, wx * window, window).unwrap();
            let tokens = b.reshape(crop, &[1, window * window, dim]).unwrap();
            let alone = attn.forward(&b, &tokens, (window, window)).unwrap();
            for (ty, tx) in (0..window).flat_map(|ty| (0..window).map(move |tx| (ty, tx))) {
                let (y, xx) = (wy * window + ty, wx * window + tx);
                if y >= side || xx >= side {
                    continue;
                }
                let got = &windowed.data[(y * side + xx) * dim..][..dim];
                let want = &alone.data[(ty * window + tx) * dim..][..dim];
                assert!(max_abs_diff(got, want) < 1e-5, "window ({wy}, {wx}) token ({ty}, {tx})");
            }
        }
    }

    /// With no padding, one window covering the whole grid is global attention: the same
    /// weights give the same embedding either way.
    #[test]
    fn vit_window_covering_grid_equals_global() {
        let b = backend();
        let windowed_cfg = VitConfig { window_size: 8, global_attn_indexes: vec![], ..tiny_config() };
        let global_cfg = VitConfig { global_attn_indexes: vec![0, 1], ..windowed_cfg.clone() };
        let tensors = random_sam_tensors(&windowed_cfg, TINY_IMAGE, 11);
        let store = MemoryStore::new(tensors.into_iter().filter(|(n, _, _)| n.starts_with("image_encoder.")).collect());
        let image = b.from_host(&[1, 3, TINY_IMAGE, TINY_IMAGE], &random_host(3 * TINY_IMAGE * TINY_IMAGE, 12)).unwrap();
        let windowed = VitEncoder::load(&b, &store, &windowed_cfg, TINY_IMAGE).unwrap().forward(&b, &image).unwrap();
        let global = VitEncoder::load(&b, &store, &global_cfg, TINY_IMAGE).unwrap().forward(&b, &image).unwrap();
        let diff = max_abs_diff(&windowed.data, &global.data);
        eprintln!("window == grid vs global: max |diff| = {diff:e}");
        assert!(diff < 1e-5);
    }

    // ---- the whole encoder ----

    /// The brief's tiny ViT from a random checkpoint in the official layout, through the importer.
    #[test]
    fn vit_tiny_random_checkpoint_gives_finite_embedding() {
        let b = backend();
        let cfg = tiny_config();
        let checkpoint = Checkpoint::from_tensors(random_sam_tensors(&cfg, TINY_IMAGE, 21)).unwrap();
        assert_eq!(checkpoint.config().encoder, EncoderConfig::Vit(cfg.clone()));
        let encoder = VitEncoder::load(&b, &checkpoint, &cfg, TINY_IMAGE).unwrap();
        let image = b.from_host(&[1, 3, TINY_IMAGE, TINY_IMAGE], &random_host(3 * TINY_IMAGE * TINY_IMAGE, 22)).unwrap();
        let out = encoder.forward(&b, &image).unwrap();
        assert_eq!(out.shape, vec![1, 256, 8, 8]);
        assert!(out.data.iter().all(|v| v.is_finite()));
        let spread = out.data.iter().fold(f32::MIN, |m, &v| m.max(v)) - out.data.iter().fold(f32::MAX, |m, &v| m.min(v));
        assert!(spread > 0.1, "embedding is nearly constant: spread {spread}");
    }

    #[test]
    fn vit_refuses_a_grid_other_than_the_stored_position_embedding() {
        let b = backend();
        let cfg = tiny_config();
        let store = MemoryStore::new(random_sam_tensors(&cfg, TINY_IMAGE, 31));
        let refused = VitEncoder::load(&b, &store, &cfg, 2 * TINY_IMAGE);
        assert!(matches!(&refused, Err(Error::Shape(m)) if m.contains("does not interpolate")), "{:?}", refused.err());
        let encoder = VitEncoder::load(&b, &store, &cfg, TINY_IMAGE).unwrap();
        let wrong = b.from_host(&[1, 3, 64, 64], &vec![0.0; 3 * 64 * 64]).unwrap();
        assert!(matches!(encoder.forward(&b, &wrong), Err(Error::Input(_))));
    }

    // ---- against PyTorch (fixtures from tests/fixtures/gen_torch_fixtures.py) ----
    //
    // The generator builds SAM with `segment_anything`'s own classes and seeded random weights,
    // saves its state_dict (official naming) and records every block's tokens, the embedding and
    // the decoder's answer for one box. `tiny_sam/` is committed; `sam_vit_b/` (~530 MB) is
    // git-ignored and made by hand: `python3 tests/fixtures/gen_torch_fixtures.py --vit-b-only`.

    /// Relative tolerance of every comparison with PyTorch (both sides compute in f32).
    const TORCH_TOLERANCE: f32 = 1e-4;

    fn fixture_dir(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(name)
    }

    /// Opens `<name>/<name>.pth`, or fails saying how to generate it.
    fn open_fixture_checkpoint(name: &str, how: &str) -> (PathBuf, Checkpoint) {
        let dir = fixture_dir(name);
        let path = dir.join(format!("{name}.pth"));
        assert!(path.exists(), "{} not found: generate it with `{how}` (see the script's header)", path.display());
        let checkpoint = Checkpoint::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        (dir, checkpoint)
    }

    fn read_npy(dir: &std::path::Path, name: &str) -> CpuTensor {
        let array = crate::npy::read(&dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        CpuTensor::new(array.shape, array.data).expect("npy shape matches its data")
    }

    /// Compares with a tolerance relative to the reference's largest magnitude; prints that
    /// error and the relative L2 error `‖got − want‖ / ‖want‖`; returns the max |diff|.
    fn assert_close(what: &str, got: &CpuTensor, want: &CpuTensor, tolerance: f32) -> f32 {
        assert_eq!(got.shape, want.shape, "{what}: shape");
        let scale = want.data.iter().fold(1.0f32, |m, v| m.max(v.abs()));
        let diff = max_abs_diff(&got.data, &want.data);
        let (err2, ref2) = got.data.iter().zip(&want.data).fold((0.0f64, 0.0f64), |(e, r), (&g, &w)| {
            (e + f64::from(g - w).powi(2), r + f64::from(w).powi(2))
        });
        let relative_l2 = (err2 / ref2.max(f64::MIN_POSITIVE)).sqrt();
        eprintln!("{what}: max |diff| = {diff:e} (reference max |x| = {scale}, max |diff| / max(1, max |x|) = {:e}, relative L2 = {relative_l2:e})", diff / scale);
        assert!(diff <= tolerance * scale, "{what}: max |diff| {diff} exceeds {tolerance} x {scale}");
        diff
    }

    /// Runs the encoder block by block, comparing each block's tokens and (through the neck) the
    /// embedding with PyTorch's.
    fn check_vit_against_torch_fixture(name: &str, dir: &std::path::Path, checkpoint: &Checkpoint) {
        let b = backend();
        let EncoderConfig::Vit(cfg) = checkpoint.config().encoder.clone() else { panic!("{name} is not a ViT SAM") };
        let encoder = VitEncoder::load(&b, checkpoint, &cfg, checkpoint.config().image_size).unwrap();
        let image = read_npy(dir, "input.npy");
        let patches = encoder.patch_embed.forward(&b, &image, Activation::None).unwrap();
        let mut tokens = b.add_vector(&b.permute(&patches, &[0, 2, 3, 1]).unwrap(), &encoder.pos_embed).unwrap();
        for (i, block) in encoder.blocks.iter().enumerate() {
            tokens = block.forward(&b, &tokens).unwrap();
            assert_close(&format!("{name} block {i}"), &tokens, &read_npy(dir, &format!("block_{i}.npy")), TORCH_TOLERANCE);
        }
        let embedding = encoder.neck.forward(&b, &b.permute(&tokens, &[0, 3, 1, 2]).unwrap()).unwrap();
        assert_close(&format!("{name} neck"), &embedding, &read_npy(dir, "image_embedding.npy"), TORCH_TOLERANCE);
    }

    /// The whole model through the public API, as a caller uses it: `Segmenter::load` on the
    /// imported checkpoint, `encode_preprocessed` on the reference's own normalised input (an
    /// image exactly the input size, so prompts are not rescaled), and `decode` of the box with
    /// and without multimask, against the reference's embedding, low-res logits and IoU.
    fn check_segmenter_against_torch_fixture(name: &str, dir: &std::path::Path, checkpoint: &Checkpoint, backend: CpuBackend) {
        let config = checkpoint.config();
        let s = config.image_size;
        let segmenter = Segmenter::load(backend, checkpoint, config).unwrap();
        let input = read_npy(dir, "input.npy");
        assert_eq!(input.shape, vec![1, 3, s, s], "{name}: input.npy");
        let encoded = segmenter.encode_preprocessed(&input.data, Geometry::new(s, s, s)).unwrap();
        assert_close(&format!("{name} image embedding"), &encoded.embedding, &read_npy(dir, "image_embedding.npy"), TORCH_TOLERANCE);

        let corners = read_npy(dir, "box.npy").data.clone();
        let prompts = Prompts::with_box(BoxPrompt { x0: corners[0], y0: corners[1], x1: corners[2], y1: corners[3] });
        for (multimask, suffix) in [(false, ""), (true, "_multi")] {
            let segmentation = segmenter.decode(&encoded, &prompts, multimask).unwrap();
            let want = read_npy(dir, &format!("low_res_logits{suffix}.npy"));
            let k = segmentation.iou.len();
            let side = ((segmentation.low_res_logits.len() / k.max(1)) as f64).sqrt() as usize;
            let logits = CpuTensor::new(vec![1, k, side, side], segmentation.low_res_logits.clone()).unwrap();
            assert_close(&format!("{name} low-res logits{suffix}"), &logits, &want, TORCH_TOLERANCE);

            let want_iou = read_npy(dir, &format!("iou{suffix}.npy"));
            assert_eq!(want_iou.shape, vec![1, k], "{name} iou{suffix}: shape");
            let iou_diff = max_abs_diff(&segmentation.iou, &want_iou.data);
            eprintln!("{name} iou{suffix}: ours {:?}, torch {:?}, max |diff| = {iou_diff:e}", segmentation.iou, want_iou.data);
            let iou_scale = want_iou.data.iter().fold(1.0f32, |m, v| m.max(v.abs()));
            assert!(iou_diff <= TORCH_TOLERANCE * iou_scale, "{name} iou{suffix}: max |diff| {iou_diff}");
        }
    }

    const TINY_FIXTURE_COMMAND: &str = "python3 tests/fixtures/gen_torch_fixtures.py --skip-vit-b";
    const VIT_B_FIXTURE_COMMAND: &str = "python3 tests/fixtures/gen_torch_fixtures.py --vit-b-only";

    /// The committed tiny SAM: its architecture is inferred from the .pth as the generator built
    /// it (window 3 not tiling the 8x8 grid, block 1 global, out_chans 32 ≠ width 64).
    #[test]
    fn vit_matches_torch_tiny_fixture() {
        let (dir, checkpoint) = open_fixture_checkpoint("tiny_sam", TINY_FIXTURE_COMMAND);
        let expected = VitConfig { patch_size: 16, embed_dim: 64, depth: 2, num_heads: 4, mlp_ratio: 4, window_size: 3, global_attn_indexes: vec![1], out_chans: 32 };
        assert_eq!(checkpoint.config().encoder, EncoderConfig::Vit(expected));
        assert_eq!((checkpoint.config().image_size, checkpoint.config().prompt_embed_dim), (128, 32));
        check_vit_against_torch_fixture("tiny_sam", &dir, &checkpoint);
    }

    #[test]
    fn sam_matches_torch_tiny_fixture() {
        let (dir, checkpoint) = open_fixture_checkpoint("tiny_sam", TINY_FIXTURE_COMMAND);
        check_segmenter_against_torch_fixture("tiny_sam", &dir, &checkpoint, backend());
    }

    /// Random-weight ViT-B at 1024 (the generator's `sam_vit_b/`, ~530 MB, git-ignored): every
    /// block, the embedding, then the whole `Segmenter` on the box.
    #[test]
    #[ignore = "needs tests/fixtures/sam_vit_b (python3 tests/fixtures/gen_torch_fixtures.py --vit-b-only) and minutes of CPU"]
    fn vit_b_matches_torch_fixture() {
        let (dir, checkpoint) = open_fixture_checkpoint("sam_vit_b", VIT_B_FIXTURE_COMMAND);
        assert_eq!(checkpoint.config().encoder, EncoderConfig::Vit(VitConfig::sam_b()));
        assert_eq!(checkpoint.config().image_size, 1024);
        check_vit_against_torch_fixture("sam_vit_b", &dir, &checkpoint);
        check_segmenter_against_torch_fixture("sam_vit_b", &dir, &checkpoint, CpuBackend::new(0).expect("cpu backend"));
    }
}
