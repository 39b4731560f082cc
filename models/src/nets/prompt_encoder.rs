//! SAM's prompt encoder: turns one prompt set (points, at most one box, an optional low-resolution
//! mask) into the decoder's sparse tokens `[1, n, 256]` and dense embedding `[1, 256, 64, 64]`.
//!
//! Why it looks the way it does:
//! - Point and box tokens are a handful of 256-vectors built from a `[2, 128]` random-Fourier
//!   matrix and five learned embeddings. That is cheaper to compute on the host (in f32, in the
//!   reference's operation order) and upload than to express as backend operations, so the
//!   sparse path ([`SparseEmbedder`], [`PositionEmbeddingRandom`]) is host-only and testable
//!   without a backend.
//! - The dense positional encoding of the 64x64 embedding grid (`get_dense_pe`) depends only on
//!   the weights, so it is computed once at load time and kept on the backend, already in the
//!   token layout `[E·E, C]` the two-way transformer adds it in (the reference's per-decode
//!   `flatten(2).permute(0, 2, 1)` of a constant).
//! - Without a mask prompt the dense embedding is `no_mask_embed` at every grid cell: it stays a
//!   `[C]` vector ([`DensePrompt::NoMask`]) that the decoder adds with a broadcast, instead of a
//!   `[1, C, E, E]` tensor filled and added on every decode.
//! - Only the mask prompt goes through the backend (`mask_downscaling`, two strided convolutions).
//!
//! Reference semantics kept exactly (`segment_anything/modeling/prompt_encoder.py`):
//! - coordinates are in the encoder-input frame and shifted by +0.5 to the pixel centre;
//! - with points but no box, one "not a point" token (label −1, zero positional encoding) is
//!   appended (`pad = boxes is None`); the padding coordinate itself is irrelevant;
//! - a box becomes two corner tokens, `point_embeddings[2]` and `[3]` added.
//!
//! Weight names: `prompt_encoder.pe_layer.positional_encoding_gaussian_matrix`,
//! `prompt_encoder.point_embeddings.{0..3}.weight`, `prompt_encoder.not_a_point_embed.weight`,
//! `prompt_encoder.no_mask_embed.weight`, `prompt_encoder.mask_downscaling.{0,1,3,4,6}`.

use crate::backend::{Activation, Backend, Conv2dSpec};
use crate::config::ModelConfig;
use crate::nets::common::{Conv2d, Norm};
use crate::store::WeightStore;
use crate::{Error, Result};

/// Checkpoint name prefix of the prompt encoder.
const PREFIX: &str = "prompt_encoder";
/// SAM's `LayerNorm2d` default, used inside `mask_downscaling`.
const LAYER_NORM_2D_EPS: f32 = 1e-6;
/// Positive point, negative point, box top-left corner, box bottom-right corner.
const NUM_POINT_EMBEDDINGS: usize = 4;
/// Labels as SAM encodes them.
const LABEL_NOT_A_POINT: i32 = -1;
const LABEL_BACKGROUND: i32 = 0;
const LABEL_FOREGROUND: i32 = 1;
/// Indices into `point_embeddings` of the two box corners.
const BOX_TOP_LEFT: usize = 2;
const BOX_BOTTOM_RIGHT: usize = 3;
/// The mask prompt is 4x the embedding grid (two stride-2 convolutions bring it down).
const MASK_INPUT_UPSCALE: usize = 4;

/// SAM's `PositionEmbeddingRandom`: `p ∈ [0,1]² ↦ [sin(2π(2p−1)·G), cos(2π(2p−1)·G)]` with a
/// fixed Gaussian matrix `G: [2, F]`. Host-side, f32, in the reference's operation order.
#[derive(Clone, Debug)]
pub struct PositionEmbeddingRandom {
    /// `G` row-major: row 0 multiplies x, row 1 multiplies y.
    gaussian: Vec<f32>,
    num_feats: usize,
}

impl PositionEmbeddingRandom {
    /// `gaussian` is `[2, num_feats]` row-major; the encoding has `2 * num_feats` channels.
    pub fn new(gaussian: Vec<f32>, num_feats: usize) -> Result<Self> {
        if gaussian.len() != 2 * num_feats {
            return Err(Error::Shape(format!("positional matrix: {} values for [2, {num_feats}]", gaussian.len())));
        }
        Ok(Self { gaussian, num_feats })
    }

    /// Loads `prompt_encoder.pe_layer.positional_encoding_gaussian_matrix` `[2, embed_dim / 2]`.
    fn load(store: &dyn WeightStore, embed_dim: usize) -> Result<Self> {
        let name = format!("{PREFIX}.pe_layer.positional_encoding_gaussian_matrix");
        let num_feats = embed_dim / 2;
        Self::new(store.get_shaped(&name, &[2, num_feats])?.to_f32(), num_feats)
    }

    /// Channels of one encoding (`2 * F`).
    pub fn channels(&self) -> usize {
        2 * self.num_feats
    }

    /// `(x, y)` already normalised to `[0, 1]` → `out: [2F]` = `[sin(F), cos(F)]` (`_pe_encoding`).
    pub fn encode_normalized(&self, x: f32, y: f32, out: &mut [f32]) {
        let (x, y) = (2.0 * x - 1.0, 2.0 * y - 1.0);
        let f = self.num_feats;
        let (row_x, row_y) = self.gaussian.split_at(f);
        for j in 0..f {
            let angle = std::f32::consts::TAU * (x * row_x[j] + y * row_y[j]);
            out[j] = angle.sin();
            out[f + j] = angle.cos();
        }
    }

    /// A pixel coordinate `(x, y)` in an image of `(height, width)` → `[2F]` (`forward_with_coords`).
    pub fn encode_pixel(&self, x: f32, y: f32, (height, width): (usize, usize)) -> Vec<f32> {
        let mut out = vec![0.0; self.channels()];
        self.encode_normalized(x / width as f32, y / height as f32, &mut out);
        out
    }

    /// The encoding of every cell centre of an `h x w` grid, channel-major `[2F, h, w]`
    /// (`forward(size)`: cell `(i, j)` sits at `((j + 0.5) / w, (i + 0.5) / h)`).
    pub fn dense_grid(&self, h: usize, w: usize) -> Vec<f32> {
        let channels = self.channels();
        let plane = h * w;
        let mut grid = vec![0.0; channels * plane];
        let mut cell = vec![0.0; channels];
        for i in 0..h {
            for j in 0..w {
                self.encode_normalized((j as f32 + 0.5) / w as f32, (i as f32 + 0.5) / h as f32, &mut cell);
                for (c, v) in cell.iter().enumerate() {
                    grid[c * plane + i * w + j] = *v;
                }
            }
        }
        grid
    }
}

/// The host-side half of the prompt encoder: points and boxes → sparse tokens.
#[derive(Clone, Debug)]
pub struct SparseEmbedder {
    pe: PositionEmbeddingRandom,
    /// `point_embeddings.{0..3}.weight`, each `[embed_dim]`.
    point_embeddings: Vec<Vec<f32>>,
    not_a_point_embed: Vec<f32>,
    /// `(height, width)` of the encoder input that coordinates refer to.
    input_size: (usize, usize),
}

impl SparseEmbedder {
    fn load(store: &dyn WeightStore, embed_dim: usize, image_size: usize) -> Result<Self> {
        let point_embeddings = (0..NUM_POINT_EMBEDDINGS)
            .map(|i| load_embedding(store, &format!("{PREFIX}.point_embeddings.{i}.weight"), embed_dim))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            pe: PositionEmbeddingRandom::load(store, embed_dim)?,
            point_embeddings,
            not_a_point_embed: load_embedding(store, &format!("{PREFIX}.not_a_point_embed.weight"), embed_dim)?,
            input_size: (image_size, image_size),
        })
    }

    /// Channels of one token.
    pub fn embed_dim(&self) -> usize {
        self.pe.channels()
    }

    /// `points` `(x, y, label)` and `boxes` `[x0, y0, x1, y1]` in the encoder-input frame →
    /// tokens `[n, embed_dim]` row-major: the points, a padding token when there is no box, then
    /// the two corners of the box.
    pub fn tokens(&self, points: &[(f32, f32, i32)], boxes: &[[f32; 4]]) -> Result<Vec<f32>> {
        if boxes.len() > 1 {
            return Err(Error::Input(format!("{} boxes in one prompt set; SAM's decoder takes one", boxes.len())));
        }
        let mut tokens = Vec::new();
        if !points.is_empty() {
            for &(x, y, label) in points {
                tokens.extend(self.point_token(x + 0.5, y + 0.5, label)?);
            }
            if boxes.is_empty() {
                tokens.extend(self.point_token(0.0, 0.0, LABEL_NOT_A_POINT)?);
            }
        }
        for bx in boxes {
            tokens.extend(self.box_tokens(bx));
        }
        Ok(tokens)
    }

    /// One point already shifted to the pixel centre → `[embed_dim]` (`_embed_points`).
    fn point_token(&self, x: f32, y: f32, label: i32) -> Result<Vec<f32>> {
        let (mut token, learned) = match label {
            LABEL_NOT_A_POINT => (vec![0.0; self.embed_dim()], &self.not_a_point_embed),
            LABEL_BACKGROUND | LABEL_FOREGROUND => (self.pe.encode_pixel(x, y, self.input_size), &self.point_embeddings[label as usize]),
            other => return Err(Error::Input(format!("point label {other}: expected -1, 0 or 1"))),
        };
        add_in_place(&mut token, learned);
        Ok(token)
    }

    /// One box → two corner tokens `[2 * embed_dim]` (`_embed_boxes`).
    fn box_tokens(&self, bx: &[f32; 4]) -> Vec<f32> {
        let corners = [(bx[0], bx[1], BOX_TOP_LEFT), (bx[2], bx[3], BOX_BOTTOM_RIGHT)];
        let mut tokens = Vec::with_capacity(2 * self.embed_dim());
        for (x, y, which) in corners {
            let mut token = self.pe.encode_pixel(x + 0.5, y + 0.5, self.input_size);
            add_in_place(&mut token, &self.point_embeddings[which]);
            tokens.extend(token);
        }
        tokens
    }
}

/// `acc[i] += v[i]`.
fn add_in_place(acc: &mut [f32], v: &[f32]) {
    for (a, b) in acc.iter_mut().zip(v) {
        *a += *b;
    }
}

/// An `nn.Embedding(1, dim)` table `[1, dim]`, dequantised to host f32.
fn load_embedding(store: &dyn WeightStore, name: &str, dim: usize) -> Result<Vec<f32>> {
    Ok(store.get_shaped(name, &[1, dim])?.to_f32())
}

/// `mask_downscaling`: `[1, 1, 4E, 4E]` → `[1, embed_dim, E, E]` by
/// conv 2x2/2 → LayerNorm2d → GELU → conv 2x2/2 → LayerNorm2d → GELU → conv 1x1.
struct MaskDownscaling<B: Backend> {
    conv1: Conv2d<B>,
    norm1: Norm<B>,
    conv2: Conv2d<B>,
    norm2: Norm<B>,
    projection: Conv2d<B>,
}

impl<B: Backend> MaskDownscaling<B> {
    fn load(b: &B, store: &dyn WeightStore, mask_in_chans: usize, embed_dim: usize) -> Result<Self> {
        let p = format!("{PREFIX}.mask_downscaling");
        let hidden = mask_in_chans / 4;
        let stride2 = Conv2dSpec { stride: 2, padding: 0, groups: 1 };
        let pointwise = Conv2dSpec { stride: 1, padding: 0, groups: 1 };
        Ok(Self {
            conv1: Conv2d::load(b, store, &format!("{p}.0"), 1, hidden, 2, stride2)?,
            norm1: Norm::load(b, store, &format!("{p}.1"), hidden, LAYER_NORM_2D_EPS)?,
            conv2: Conv2d::load(b, store, &format!("{p}.3"), hidden, mask_in_chans, 2, stride2)?,
            norm2: Norm::load(b, store, &format!("{p}.4"), mask_in_chans, LAYER_NORM_2D_EPS)?,
            projection: Conv2d::load(b, store, &format!("{p}.6"), mask_in_chans, embed_dim, 1, pointwise)?,
        })
    }

    /// `mask: [1, 1, 4E, 4E]` → `[1, embed_dim, E, E]`.
    fn forward(&self, b: &B, mask: &B::Tensor) -> Result<B::Tensor> {
        let x = self.conv1.forward(b, mask, Activation::None)?;
        let x = b.activation(&self.norm1.forward_nchw(b, &x)?, Activation::Gelu)?;
        let x = self.conv2.forward(b, &x, Activation::None)?;
        let x = b.activation(&self.norm2.forward_nchw(b, &x)?, Activation::Gelu)?;
        self.projection.forward(b, &x, Activation::None)
    }
}

/// The dense prompt embedding of one prompt set, as the mask decoder adds it to the image
/// embedding.
pub enum DensePrompt<'a, B: Backend> {
    /// A mask prompt through `mask_downscaling`: `[1, embed_dim, E, E]`.
    Mask(B::Tensor),
    /// No mask prompt: `no_mask_embed` `[embed_dim]`, the same at every grid cell (SAM's
    /// `expand(bs, -1, E, E)`), broadcast over the grid by the decoder.
    NoMask(&'a B::Vector),
}

/// SAM's prompt encoder for one prompt set (batch 1).
pub struct PromptEncoder<B: Backend> {
    sparse: SparseEmbedder,
    /// `no_mask_embed.weight` `[embed_dim]`, broadcast over the grid when no mask is given.
    no_mask_embed: B::Vector,
    mask_downscaling: MaskDownscaling<B>,
    /// `get_dense_pe()` in token layout, `[E·E, embed_dim]`, computed once. Kept as a
    /// parameter, not an activation: a backend's activation memory then holds nothing between
    /// frames (the CUDA backend resizes its arena after a warm-up frame).
    token_pe: B::Vector,
    embedding_size: usize,
}

impl<B: Backend> PromptEncoder<B> {
    /// Loads every tensor under `prompt_encoder.` and precomputes the dense positional encoding.
    pub fn load(b: &B, store: &dyn WeightStore, cfg: &ModelConfig) -> Result<Self> {
        let (dim, grid) = (cfg.prompt_embed_dim, cfg.embedding_size);
        let sparse = SparseEmbedder::load(store, dim, cfg.image_size)?;
        let token_pe = b.vector_from_host(&[grid * grid, dim], &channels_last(&sparse.pe.dense_grid(grid, grid), dim))?;
        let no_mask_embed = load_embedding(store, &format!("{PREFIX}.no_mask_embed.weight"), dim)?;
        Ok(Self {
            no_mask_embed: b.vector_from_host(&[dim], &no_mask_embed)?,
            mask_downscaling: MaskDownscaling::load(b, store, cfg.mask_in_chans, dim)?,
            sparse,
            token_pe,
            embedding_size: grid,
        })
    }

    /// The positional encoding of the image embedding grid (SAM's `get_dense_pe`) in token
    /// layout: `[E·E, embed_dim]`, row `i·E + j` the encoding of grid cell `(i, j)`.
    pub fn token_positional_encoding(&self) -> &B::Vector {
        &self.token_pe
    }

    /// The host-side sparse embedder (exposed for tests and for callers that batch prompts).
    pub fn sparse_embedder(&self) -> &SparseEmbedder {
        &self.sparse
    }

    /// One prompt set in the encoder-input frame → (sparse `[1, n, embed_dim]`, dense); `mask`,
    /// if given, is `[1, 1, 4E, 4E]` logits.
    pub fn embed(&self, b: &B, points: &[(f32, f32, i32)], boxes: &[[f32; 4]], mask: Option<&B::Tensor>) -> Result<(B::Tensor, DensePrompt<'_, B>)> {
        let dim = self.sparse.embed_dim();
        let tokens = self.sparse.tokens(points, boxes)?;
        let sparse = b.from_host(&[1, tokens.len() / dim, dim], &tokens)?;
        let dense = match mask {
            Some(m) => DensePrompt::Mask(self.embed_mask(b, m)?),
            None => DensePrompt::NoMask(&self.no_mask_embed),
        };
        Ok((sparse, dense))
    }

    /// `mask: [1, 1, 4E, 4E]` → `[1, embed_dim, E, E]`, after checking the shape.
    fn embed_mask(&self, b: &B, mask: &B::Tensor) -> Result<B::Tensor> {
        let side = MASK_INPUT_UPSCALE * self.embedding_size;
        if b.shape(mask) != [1, 1, side, side] {
            return Err(Error::Input(format!("mask prompt must be [1, 1, {side}, {side}], got {:?}", b.shape(mask))));
        }
        self.mask_downscaling.forward(b, mask)
    }
}

/// `[C, N]` (channel-major) → `[N, C]`.
// planes: C·N values, channels: C.
pub(crate) fn channels_last(planes: &[f32], channels: usize) -> Vec<f32> {
    let cells = planes.len() / channels;
    (0..cells * channels).map(|i| planes[(i % channels) * cells + i / channels]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    const DIM: usize = 8;
    const INPUT: usize = 256;

    /// A deterministic `[2, F]` Gaussian-like matrix with entries in [-3, 3].
    fn random_matrix(num_feats: usize) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        (0..2 * num_feats).map(|_| rng.gen_range(-3.0f32..3.0)).collect()
    }

    /// The reference formula in f64: `[sin(2π(2p−1)·G), cos(2π(2p−1)·G)]`.
    fn pe_f64(gaussian: &[f32], x: f64, y: f64) -> Vec<f64> {
        let f = gaussian.len() / 2;
        let angles: Vec<f64> = (0..f)
            .map(|j| 2.0 * std::f64::consts::PI * ((2.0 * x - 1.0) * gaussian[j] as f64 + (2.0 * y - 1.0) * gaussian[f + j] as f64))
            .collect();
        angles.iter().map(|a| a.sin()).chain(angles.iter().map(|a| a.cos())).collect()
    }

    fn assert_close(got: &[f32], want: &[f64], tol: f64) {
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((*g as f64 - w).abs() <= tol, "channel {i}: got {g}, want {w}");
        }
    }

    /// An embedder whose learned embeddings are recognisable constants: point_embeddings[i] = i+1,
    /// not_a_point = 100.
    fn embedder() -> SparseEmbedder {
        SparseEmbedder {
            pe: PositionEmbeddingRandom::new(random_matrix(DIM / 2), DIM / 2).unwrap(),
            point_embeddings: (0..NUM_POINT_EMBEDDINGS).map(|i| vec![(i + 1) as f32; DIM]).collect(),
            not_a_point_embed: vec![100.0; DIM],
            input_size: (INPUT, INPUT),
        }
    }

    #[test]
    fn pixel_encoding_matches_the_formula_in_f64() {
        let pe = PositionEmbeddingRandom::new(random_matrix(64), 64).unwrap();
        for &(x, y, (h, w)) in
            &[(0.5f32, 0.5f32, (256usize, 256usize)), (100.5, 37.25, (256, 256)), (1023.5, 0.5, (768, 1024)), (300.0, 700.0, (1024, 1024))]
        {
            let want = pe_f64(&pe.gaussian, x as f64 / w as f64, y as f64 / h as f64);
            assert_close(&pe.encode_pixel(x, y, (h, w)), &want, 1e-4);
        }
    }

    #[test]
    fn dense_grid_encodes_cell_centres_channel_major() {
        let pe = PositionEmbeddingRandom::new(random_matrix(16), 16).unwrap();
        let (h, w) = (4, 6);
        let grid = pe.dense_grid(h, w);
        assert_eq!(grid.len(), 32 * h * w);
        for &(i, j) in &[(0, 0), (1, 4), (3, 5)] {
            let got: Vec<f32> = (0..32).map(|c| grid[c * h * w + i * w + j]).collect();
            let want = pe_f64(&pe.gaussian, (j as f64 + 0.5) / w as f64, (i as f64 + 0.5) / h as f64);
            assert_close(&got, &want, 1e-5);
        }
    }

    #[test]
    fn points_only_are_padded_with_one_not_a_point_token() {
        let e = embedder();
        let tokens = e.tokens(&[(10.0, 20.0, 1), (30.0, 40.0, 0)], &[]).unwrap();
        assert_eq!(tokens.len(), 3 * DIM);
        assert!(tokens[2 * DIM..].iter().all(|&v| v == 100.0), "padding token is not_a_point_embed with zero PE");
        let pe = e.pe.encode_pixel(10.5, 20.5, (INPUT, INPUT));
        let want: Vec<f64> = pe.iter().map(|v| (*v + 2.0) as f64).collect();
        assert_close(&tokens[..DIM], &want, 0.0);
    }

    #[test]
    fn box_only_gives_two_corner_tokens_shifted_to_pixel_centres() {
        let e = embedder();
        let tokens = e.tokens(&[], &[[10.0, 20.0, 110.0, 120.0]]).unwrap();
        assert_eq!(tokens.len(), 2 * DIM);
        let corner = |x, y, add: f32| -> Vec<f64> { e.pe.encode_pixel(x, y, (INPUT, INPUT)).iter().map(|v| (*v + add) as f64).collect() };
        assert_close(&tokens[..DIM], &corner(10.5, 20.5, 3.0), 0.0);
        assert_close(&tokens[DIM..], &corner(110.5, 120.5, 4.0), 0.0);
    }

    #[test]
    fn points_with_a_box_are_not_padded() {
        let e = embedder();
        let tokens = e.tokens(&[(5.0, 5.0, 1), (6.0, 6.0, -1)], &[[0.0, 0.0, 50.0, 50.0]]).unwrap();
        assert_eq!(tokens.len(), 4 * DIM);
        assert!(tokens[DIM..2 * DIM].iter().all(|&v| v == 100.0), "an explicit label -1 is a not-a-point token");
    }

    #[test]
    fn refuses_two_boxes_and_unknown_labels() {
        let e = embedder();
        assert!(e.tokens(&[], &[[0.0; 4], [1.0; 4]]).is_err());
        assert!(e.tokens(&[(1.0, 1.0, 2)], &[]).is_err());
        assert!(e.tokens(&[], &[]).unwrap().is_empty());
    }
}
