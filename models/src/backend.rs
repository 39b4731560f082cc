//! The one seam between the SAM networks and the hardware.
//!
//! Every network in `crate::nets` is written once, generically over [`Backend`]. The CPU backend
//! (`crate::cpu`) is the reference; a CUDA backend implements the same trait. Tensors are opaque to
//! the networks: they only see shapes, and ask the backend for every operation, so no pixel or
//! activation ever has to be on the host unless a network explicitly downloads it.
//!
//! Conventions shared by every implementation:
//! - logical layout is row-major and contiguous; images are NCHW, token sequences are `[B, N, C]`;
//! - all arithmetic is f32 semantics (a backend may use lower precision internally and must say so);
//! - weights are created once at load time from a [`StoredTensor`] and stay in their stored
//!   precision (NF4, fp16 or f32); dequantisation happens inside the operation that uses them.

use crate::store::StoredTensor;
use crate::Result;

/// Element-wise activation, fusable into [`Backend::linear`] and [`Backend::conv2d`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    None,
    /// Exact GELU, `x * 0.5 * (1 + erf(x / sqrt 2))`, as `torch.nn.GELU()`.
    Gelu,
    Relu,
}

/// How a 2-D convolution slides.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dSpec {
    pub stride: usize,
    pub padding: usize,
    /// 1 for a dense convolution, `C_in` (== `C_out`) for a depthwise one.
    pub groups: usize,
}

/// An additive bias on the attention scores, computed on the fly so that no `Nq x Nk` matrix is
/// ever materialised for large inputs.
pub enum AttentionBias<'a, B: Backend + ?Sized> {
    None,
    /// A per-head table `[H, Nq, Nk]` (TinyViT's learned attention biases, already gathered
    /// through its index at load time; windows are at most 14x14 so the table is small).
    /// The batch-head index `bh` of `q` uses head `bh % H`.
    Table(&'a B::Vector),
    /// SAM's decomposed relative position: `rel_h` is `[BH, Nq, Kh]` and `rel_w` is `[BH, Nq, Kw]`
    /// with `Nk = Kh * Kw`; the bias of query `i` and key `j` is
    /// `rel_h[bh, i, j / Kw] + rel_w[bh, i, j % Kw]`.
    DecomposedRelPos { rel_h: &'a B::Tensor, rel_w: &'a B::Tensor },
}

/// The operations the SAM-family networks need. Each returns a new tensor; a backend is free to
/// recycle buffers from an arena behind this API.
pub trait Backend: Send + Sync {
    /// An activation tensor living wherever the backend computes.
    type Tensor: Send + Sync;
    /// A matrix or convolution kernel in its stored precision (NF4, fp16 or f32).
    type Weight: Send + Sync;
    /// A small f32 parameter: bias, norm scale/shift, embedding table, attention-bias table.
    type Vector: Send + Sync;

    /// Short name for logs: "cpu", "cuda".
    fn name(&self) -> &'static str;

    // ---- parameters (load time) ----
    /// A matrix `[N, K]` or conv kernel `[C_out, C_in/groups, kh, kw]` (or transposed-conv kernel
    /// `[C_in, C_out, kh, kw]`), kept in its stored precision.
    fn weight(&self, t: &StoredTensor) -> Result<Self::Weight>;
    /// A parameter dequantised to f32 (any stored dtype).
    fn vector(&self, t: &StoredTensor) -> Result<Self::Vector>;
    /// A parameter made from host values (e.g. tables derived at load time).
    fn vector_from_host(&self, shape: &[usize], data: &[f32]) -> Result<Self::Vector>;
    fn vector_shape<'a>(&self, v: &'a Self::Vector) -> &'a [usize];

    // ---- tensors ----
    fn from_host(&self, shape: &[usize], data: &[f32]) -> Result<Self::Tensor>;
    fn to_host(&self, t: &Self::Tensor) -> Result<Vec<f32>>;
    fn shape<'a>(&self, t: &'a Self::Tensor) -> &'a [usize];
    /// A tensor broadcasting a vector (same shape); used for learned tokens and embeddings.
    fn tensor_from_vector(&self, v: &Self::Vector) -> Result<Self::Tensor>;

    // ---- layout ----
    /// Same data, new shape (element count must match).
    fn reshape(&self, t: Self::Tensor, shape: &[usize]) -> Result<Self::Tensor>;
    /// Materialised axis permutation, like `torch.permute(..).contiguous()`.
    fn permute(&self, t: &Self::Tensor, perm: &[usize]) -> Result<Self::Tensor>;
    /// `t[.., start..start+len, ..]` along `axis`, materialised.
    fn narrow(&self, t: &Self::Tensor, axis: usize, start: usize, len: usize) -> Result<Self::Tensor>;
    /// Concatenation along `axis`; all other dims must match.
    fn concat(&self, ts: &[&Self::Tensor], axis: usize) -> Result<Self::Tensor>;
    /// Zero-pad the two spatial axes of an NHWC tensor `[B, H, W, C]` at the bottom and right.
    fn pad_hw(&self, t: &Self::Tensor, pad_h: usize, pad_w: usize) -> Result<Self::Tensor>;

    // ---- arithmetic ----
    /// `x[.., K] · wᵀ + bias` with `w: [N, K]`, then `act`. Output `[.., N]`.
    fn linear(&self, x: &Self::Tensor, w: &Self::Weight, bias: Option<&Self::Vector>, act: Activation) -> Result<Self::Tensor>;
    /// Batched product of tensors: `a: [B, M, K]`, `b: [B, K, N]` (or `[B, N, K]` when
    /// `transpose_b`), output `[B, M, N]`. Used where both sides are activations.
    fn matmul(&self, a: &Self::Tensor, b: &Self::Tensor, transpose_b: bool) -> Result<Self::Tensor>;
    /// NCHW convolution with weight `[C_out, C_in/groups, kh, kw]`, then `act`.
    fn conv2d(&self, x: &Self::Tensor, w: &Self::Weight, bias: Option<&Self::Vector>, spec: Conv2dSpec, act: Activation) -> Result<Self::Tensor>;
    /// NCHW transposed convolution whose kernel equals its stride (SAM's 2x2/stride-2 upscaling),
    /// weight `[C_in, C_out, k, k]`.
    fn conv_transpose2d(&self, x: &Self::Tensor, w: &Self::Weight, bias: Option<&Self::Vector>, stride: usize) -> Result<Self::Tensor>;
    /// LayerNorm over the last axis.
    fn layer_norm(&self, x: &Self::Tensor, gamma: &Self::Vector, beta: &Self::Vector, eps: f32) -> Result<Self::Tensor>;
    /// LayerNorm over the channel axis of NCHW (SAM's `LayerNorm2d`).
    fn layer_norm_nchw(&self, x: &Self::Tensor, gamma: &Self::Vector, beta: &Self::Vector, eps: f32) -> Result<Self::Tensor>;
    fn activation(&self, x: &Self::Tensor, act: Activation) -> Result<Self::Tensor>;
    /// `a + b` where `b`'s shape equals `a`'s or is a suffix of it (broadcast over leading axes).
    fn add(&self, a: &Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor>;
    /// `a + v`, `v`'s shape a suffix of `a`'s.
    fn add_vector(&self, a: &Self::Tensor, v: &Self::Vector) -> Result<Self::Tensor>;
    /// `a * s`.
    fn scale(&self, a: &Self::Tensor, s: f32) -> Result<Self::Tensor>;
    /// Attention with online softmax: `q: [BH, Nq, D]`, `k, v: [BH, Nk, D]` →
    /// `softmax(scale · q·kᵀ + bias) · v`, `[BH, Nq, D]`. Never materialises `Nq x Nk`.
    fn attention(&self, q: &Self::Tensor, k: &Self::Tensor, v: &Self::Tensor, scale: f32, bias: AttentionBias<'_, Self>) -> Result<Self::Tensor>;
    /// Bilinear resize of NCHW to `[.., out_h, out_w]`, `align_corners=False` (PyTorch semantics).
    fn resize_bilinear(&self, x: &Self::Tensor, out_h: usize, out_w: usize) -> Result<Self::Tensor>;
}
