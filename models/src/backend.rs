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

/// A LoRA update bound to one linear layer: `Δy = scale · (x·Aᵀ)·Bᵀ` with `A: [r, in]` and
/// `B: [out, r]`, both f32 weights made by the backend from the adapter file (`crate::adapter`).
/// `scale` is the adapter's `alpha / r`, folded once at bind time.
pub struct Lora<B: Backend + ?Sized> {
    pub a: B::Weight,
    pub b: B::Weight,
    pub rank: usize,
    pub scale: f32,
}

/// TinyViT's MBConv, an inverted residual, for [`Backend::inverted_residual`]: a 1x1 `expand`
/// `[hidden, C, 1, 1]`, a depthwise `depthwise` `[hidden, 1, kernel, kernel]` (stride 1,
/// padding `kernel / 2`), a 1x1 `project` `[C, hidden, 1, 1]`, each with an optional bias, and
/// the activation applied after each convolution and after the residual sum.
pub struct InvertedResidual<'a, B: Backend + ?Sized> {
    pub expand: &'a B::Weight,
    pub expand_bias: Option<&'a B::Vector>,
    pub depthwise: &'a B::Weight,
    pub depthwise_bias: Option<&'a B::Vector>,
    pub kernel: usize,
    pub project: &'a B::Weight,
    pub project_bias: Option<&'a B::Vector>,
    pub act: Activation,
}

/// SAM's `output_upscaling` for [`Backend::upscale_masks`]: a 2x2/stride-2 transposed
/// convolution `[C, C1, 2, 2]`, LayerNorm2d over `C1`, GELU, a 2x2/stride-2 transposed
/// convolution `[C1, C2, 2, 2]`, GELU.
pub struct OutputUpscaling<'a, B: Backend + ?Sized> {
    pub up1: &'a B::Weight,
    pub up1_bias: Option<&'a B::Vector>,
    pub norm_gamma: &'a B::Vector,
    pub norm_beta: &'a B::Vector,
    pub norm_eps: f32,
    pub up2: &'a B::Weight,
    pub up2_bias: Option<&'a B::Vector>,
}

/// The computation of one frame for [`Backend::run_frame`]: the backend and the uploaded input in,
/// the result out.
pub type FrameFn<'a, B> = &'a dyn Fn(&B, &<B as Backend>::Tensor) -> Result<<B as Backend>::Tensor>;

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
    /// Names this backend's numerics where they differ from the CPU reference's, `""` for the
    /// reference itself (and anything computing exactly like it). Results made under different
    /// numerics are not interchangeable: the trainer's embedding cache keys its entries on this.
    fn numerics(&self) -> String {
        String::new()
    }

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
    #[allow(clippy::wrong_self_convention)] // "from the host", made by this backend
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
    /// [`Backend::linear`] plus an optional LoRA update before the activation:
    /// `act(x·wᵀ + bias + scale·(x·Aᵀ)·Bᵀ)`. The default composes existing operations, so every
    /// backend supports adapters; a backend may override it with a fused kernel.
    fn linear_lora(&self, x: &Self::Tensor, w: &Self::Weight, bias: Option<&Self::Vector>, act: Activation, lora: Option<&Lora<Self>>) -> Result<Self::Tensor> {
        let Some(l) = lora else {
            return self.linear(x, w, bias, act);
        };
        let base = self.linear(x, w, bias, Activation::None)?;
        let down = self.linear(x, &l.a, None, Activation::None)?;
        let up = self.linear(&down, &l.b, None, Activation::None)?;
        let delta = self.scale(&up, l.scale)?;
        let sum = self.add(&base, &delta)?;
        match act {
            Activation::None => Ok(sum),
            act => self.activation(&sum, act),
        }
    }
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
    /// `layer_norm(x + delta)` over the last axis, `delta` of `x`'s shape: a residual and the
    /// post-norm after it (SAM's two-way transformer has one after every attention and MLP). The
    /// default composes `add` and `layer_norm`; a backend may fuse them (the CPU backend does).
    fn add_layer_norm(&self, x: &Self::Tensor, delta: &Self::Tensor, gamma: &Self::Vector, beta: &Self::Vector, eps: f32) -> Result<Self::Tensor> {
        self.layer_norm(&self.add(x, delta)?, gamma, beta, eps)
    }
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
    /// `act(x + project(act(depthwise(act(expand(x))))))` for NCHW `x` (see [`InvertedResidual`]).
    /// The default composes `conv2d`, `add` and `activation`; a backend may compute it in bands
    /// of rows so that the `hidden`-channel intermediates never leave the cache (the CPU backend
    /// does: at LiteMedSAM's first stage each is 64 MiB).
    fn inverted_residual(&self, x: &Self::Tensor, block: &InvertedResidual<'_, Self>) -> Result<Self::Tensor> {
        let pointwise = Conv2dSpec { stride: 1, padding: 0, groups: 1 };
        let expanded = self.conv2d(x, block.expand, block.expand_bias, pointwise, block.act)?;
        let hidden = self.shape(&expanded)[1];
        let depthwise = Conv2dSpec { stride: 1, padding: block.kernel / 2, groups: hidden };
        let filtered = self.conv2d(&expanded, block.depthwise, block.depthwise_bias, depthwise, block.act)?;
        let projected = self.conv2d(&filtered, block.project, block.project_bias, pointwise, Activation::None)?;
        self.activation(&self.add(&projected, x)?, block.act)
    }
    /// The mask decoder's tail: image tokens `[1, E·E, C]` (row `i·E + j` grid cell `(i, j)`)
    /// through `up` to `[1, C2, 4E, 4E]`, then each mask's hypernetwork weights `hyper_in:
    /// [1, k, C2]` times every upscaled pixel → mask logits `[1, k, 4E, 4E]`. The default permutes
    /// to NCHW and composes `conv_transpose2d`, `layer_norm_nchw`, `activation` and `matmul`, as
    /// the reference does; a backend may stay channels-last and never materialise the upscaled
    /// embedding (the CPU backend does: those passes were a fifth of a LiteMedSAM decode).
    fn upscale_masks(&self, image_tokens: &Self::Tensor, grid: usize, up: &OutputUpscaling<'_, Self>, hyper_in: &Self::Tensor) -> Result<Self::Tensor> {
        let channels = match self.shape(image_tokens) {
            [1, n, c] if *n == grid * grid => *c,
            other => return Err(crate::Error::Shape(format!("upscale_masks: image tokens {other:?} are not [1, {grid}·{grid}, C]"))),
        };
        let channels_first = self.permute(image_tokens, &[0, 2, 1])?;
        let x = self.reshape(channels_first, &[1, channels, grid, grid])?;
        let x = self.conv_transpose2d(&x, up.up1, up.up1_bias, 2)?;
        let x = self.activation(&self.layer_norm_nchw(&x, up.norm_gamma, up.norm_beta, up.norm_eps)?, Activation::Gelu)?;
        let upscaled = self.activation(&self.conv_transpose2d(&x, up.up2, up.up2_bias, 2)?, Activation::Gelu)?;
        let (c2, h, w) = match self.shape(&upscaled) {
            [1, c, h, w] => (*c, *h, *w),
            other => return Err(crate::Error::Shape(format!("upscale_masks: upscaled embedding {other:?}, expected [1, C2, 4E, 4E]"))),
        };
        let k = match self.shape(hyper_in) {
            [1, k, c] if *c == c2 => *k,
            other => return Err(crate::Error::Shape(format!("upscale_masks: hypernetwork weights {other:?} are not [1, k, {c2}]"))),
        };
        let pixels = self.reshape(upscaled, &[1, c2, h * w])?;
        let masks = self.matmul(hyper_in, &pixels, false)?;
        self.reshape(masks, &[1, k, h, w])
    }
    /// Attention on projections whose heads are merged into the channels: `q: [B, Nq, heads·d]`,
    /// `k, v: [B, Nk, heads·d]` → `[B, Nq, heads·d]`, i.e. the head split (`view(B, N, heads,
    /// d).transpose(1, 2)`), [`Backend::attention`] on `[B·heads, N, d]` (bias indexed by
    /// batch-head `b·heads + h`) and the merge, as one operation. The default composes permute
    /// and attention; a backend may fuse the split and merge into its kernel (the CPU backend
    /// does).
    fn attention_heads(&self, q: Self::Tensor, k: Self::Tensor, v: Self::Tensor, heads: usize, scale: f32, bias: AttentionBias<'_, Self>) -> Result<Self::Tensor> {
        let (batch, nq, d) = merged_heads_dims(self.shape(&q), heads)?;
        let (kv_batch, nk, kv_d) = merged_heads_dims(self.shape(&k), heads)?;
        if (kv_batch, kv_d) != (batch, d) || self.shape(&v) != self.shape(&k) {
            return Err(crate::Error::Shape(format!("attention_heads: q {:?}, k {:?}, v {:?} with {heads} heads", self.shape(&q), self.shape(&k), self.shape(&v))));
        }
        let split = |t: Self::Tensor, rows: usize| -> Result<Self::Tensor> {
            let per_head = self.reshape(t, &[batch, rows, heads, d])?;
            let head_major = self.permute(&per_head, &[0, 2, 1, 3])?;
            self.reshape(head_major, &[batch * heads, rows, d])
        };
        let out = self.attention(&split(q, nq)?, &split(k, nk)?, &split(v, nk)?, scale, bias)?;
        let per_head = self.reshape(out, &[batch, heads, nq, d])?;
        let token_major = self.permute(&per_head, &[0, 2, 1, 3])?;
        self.reshape(token_major, &[batch, nq, heads * d])
    }
    /// Depthwise convolution of a channels-last tensor: `x: [B, H, W, C]`, `w: [C, 1, k, k]`
    /// (odd `k`), stride 1, zero padding `k / 2`, optional bias; output `[B, H, W, C]`. The default
    /// permutes to NCHW and back around [`Backend::conv2d`]; a backend may convolve in place
    /// (the CPU backend does: TinyViT's `local_conv` runs in every attention block).
    fn depthwise_conv_nhwc(&self, x: &Self::Tensor, w: &Self::Weight, bias: Option<&Self::Vector>, kernel: usize) -> Result<Self::Tensor> {
        let channels = match self.shape(x) {
            [_, _, _, c] => *c,
            other => return Err(crate::Error::Shape(format!("depthwise_conv_nhwc: input {other:?} is not [B, H, W, C]"))),
        };
        let nchw = self.permute(x, &[0, 3, 1, 2])?;
        let spec = Conv2dSpec { stride: 1, padding: kernel / 2, groups: channels };
        let out = self.conv2d(&nchw, w, bias, spec, Activation::None)?;
        self.permute(&out, &[0, 2, 3, 1])
    }
    /// Self-attention straight from one fused projection: `qkv: [B, N, heads·3·d]`, where each
    /// head's q | k | v are adjacent (TinyViT's `view(B, N, heads, -1).split([d, d, d])`), →
    /// `[B, N, heads·d]` with the heads merged back in head-major channel order: the head split,
    /// [`Backend::attention`] on `[B·heads, N, d]` (bias indexed by batch-head `b·heads + h`)
    /// and the merge, as one operation. The default composes permute, narrow and attention;
    /// a backend may fuse the split and merge into its kernel (the CPU backend does: they were
    /// four whole-tensor copies).
    fn attention_packed(&self, qkv: Self::Tensor, heads: usize, scale: f32, bias: AttentionBias<'_, Self>) -> Result<Self::Tensor> {
        let (batch, tokens, head_dim) = packed_qkv_dims(self.shape(&qkv), heads)?;
        let per_head = self.reshape(qkv, &[batch, tokens, heads, 3, head_dim])?;
        let by_part = self.permute(&per_head, &[3, 0, 2, 1, 4])?; // [3, B, heads, N, d]
        let part = |index: usize| -> Result<Self::Tensor> {
            let one = self.narrow(&by_part, 0, index, 1)?;
            self.reshape(one, &[batch * heads, tokens, head_dim])
        };
        let out = self.attention(&part(0)?, &part(1)?, &part(2)?, scale, bias)?;
        let per_head = self.reshape(out, &[batch, heads, tokens, head_dim])?;
        let token_major = self.permute(&per_head, &[0, 2, 1, 3])?;
        self.reshape(token_major, &[batch, tokens, heads * head_dim])
    }
    /// Bilinear resize of NCHW to `[.., out_h, out_w]`, `align_corners=False` (PyTorch semantics).
    fn resize_bilinear(&self, x: &Self::Tensor, out_h: usize, out_w: usize) -> Result<Self::Tensor>;

    /// One frame of a fixed computation: uploads `input` (`shape`) and returns `f` of it. Every
    /// call with the same `key` and shape must mean the same computation on the same weights (a
    /// caller takes a new key whenever they change, e.g. an adapter swap): a backend may then
    /// record the work once and replay it (the CUDA backend's graphs). The result is the
    /// caller's to keep, like any other tensor. The default simply runs `f`.
    fn run_frame(&self, key: u64, shape: &[usize], input: &[f32], f: FrameFn<'_, Self>) -> Result<Self::Tensor> {
        let _ = key;
        let x = self.from_host(shape, input)?;
        f(self, &x)
    }
}

/// `(B, N, d)` of a heads-merged tensor `[B, N, heads·d]` ([`Backend::attention_heads`]).
pub fn merged_heads_dims(shape: &[usize], heads: usize) -> Result<(usize, usize, usize)> {
    match *shape {
        [batch, tokens, width] if heads > 0 && width > 0 && width % heads == 0 => Ok((batch, tokens, width / heads)),
        _ => Err(crate::Error::Shape(format!("attention_heads: {shape:?} is not [B, N, heads·d] with {heads} heads"))),
    }
}

/// `(B, N, d)` of a packed `q | k | v` tensor `[B, N, heads·3·d]` ([`Backend::attention_packed`]).
pub fn packed_qkv_dims(shape: &[usize], heads: usize) -> Result<(usize, usize, usize)> {
    match *shape {
        [batch, tokens, width] if heads > 0 && width > 0 && width % (3 * heads) == 0 => Ok((batch, tokens, width / (3 * heads))),
        _ => Err(crate::Error::Shape(format!("attention_packed: qkv {shape:?} is not [B, N, heads·3·d] with {heads} heads"))),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::cpu::{CpuBackend, CpuTensor, CpuWeight};
    use crate::store::{SharedBytes, TensorData};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// The CPU backend with every operation but `linear_lora` delegated, so the trait's default
    /// `linear_lora` (what a backend without a fused kernel runs) is the one under test. It
    /// also logs the key of every `run_frame` (then runs the trait's default) and counts the
    /// activation tensors made from host data (`from_host`).
    pub(crate) struct DefaultLora(CpuBackend, pub(crate) std::sync::Mutex<Vec<u64>>, pub(crate) std::sync::atomic::AtomicUsize);

    impl DefaultLora {
        pub(crate) fn new(threads: usize) -> Self {
            Self(CpuBackend::new(threads).unwrap(), Default::default(), Default::default())
        }
    }

    impl Backend for DefaultLora {
        type Tensor = CpuTensor;
        type Weight = CpuWeight;
        type Vector = CpuTensor;
        fn name(&self) -> &'static str {
            "default-lora"
        }
        fn weight(&self, t: &StoredTensor) -> Result<CpuWeight> {
            self.0.weight(t)
        }
        fn vector(&self, t: &StoredTensor) -> Result<CpuTensor> {
            self.0.vector(t)
        }
        fn vector_from_host(&self, shape: &[usize], data: &[f32]) -> Result<CpuTensor> {
            self.0.vector_from_host(shape, data)
        }
        fn vector_shape<'a>(&self, v: &'a CpuTensor) -> &'a [usize] {
            self.0.vector_shape(v)
        }
        fn from_host(&self, shape: &[usize], data: &[f32]) -> Result<CpuTensor> {
            self.2.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.0.from_host(shape, data)
        }
        fn to_host(&self, t: &CpuTensor) -> Result<Vec<f32>> {
            self.0.to_host(t)
        }
        fn shape<'a>(&self, t: &'a CpuTensor) -> &'a [usize] {
            self.0.shape(t)
        }
        fn tensor_from_vector(&self, v: &CpuTensor) -> Result<CpuTensor> {
            self.0.tensor_from_vector(v)
        }
        fn reshape(&self, t: CpuTensor, shape: &[usize]) -> Result<CpuTensor> {
            self.0.reshape(t, shape)
        }
        fn permute(&self, t: &CpuTensor, perm: &[usize]) -> Result<CpuTensor> {
            self.0.permute(t, perm)
        }
        fn narrow(&self, t: &CpuTensor, axis: usize, start: usize, len: usize) -> Result<CpuTensor> {
            self.0.narrow(t, axis, start, len)
        }
        fn concat(&self, ts: &[&CpuTensor], axis: usize) -> Result<CpuTensor> {
            self.0.concat(ts, axis)
        }
        fn pad_hw(&self, t: &CpuTensor, pad_h: usize, pad_w: usize) -> Result<CpuTensor> {
            self.0.pad_hw(t, pad_h, pad_w)
        }
        fn linear(&self, x: &CpuTensor, w: &CpuWeight, bias: Option<&CpuTensor>, act: Activation) -> Result<CpuTensor> {
            self.0.linear(x, w, bias, act)
        }
        fn matmul(&self, a: &CpuTensor, b: &CpuTensor, transpose_b: bool) -> Result<CpuTensor> {
            self.0.matmul(a, b, transpose_b)
        }
        fn conv2d(&self, x: &CpuTensor, w: &CpuWeight, bias: Option<&CpuTensor>, spec: Conv2dSpec, act: Activation) -> Result<CpuTensor> {
            self.0.conv2d(x, w, bias, spec, act)
        }
        fn conv_transpose2d(&self, x: &CpuTensor, w: &CpuWeight, bias: Option<&CpuTensor>, stride: usize) -> Result<CpuTensor> {
            self.0.conv_transpose2d(x, w, bias, stride)
        }
        fn layer_norm(&self, x: &CpuTensor, gamma: &CpuTensor, beta: &CpuTensor, eps: f32) -> Result<CpuTensor> {
            self.0.layer_norm(x, gamma, beta, eps)
        }
        fn layer_norm_nchw(&self, x: &CpuTensor, gamma: &CpuTensor, beta: &CpuTensor, eps: f32) -> Result<CpuTensor> {
            self.0.layer_norm_nchw(x, gamma, beta, eps)
        }
        fn activation(&self, x: &CpuTensor, act: Activation) -> Result<CpuTensor> {
            self.0.activation(x, act)
        }
        fn add(&self, a: &CpuTensor, b: &CpuTensor) -> Result<CpuTensor> {
            self.0.add(a, b)
        }
        fn add_vector(&self, a: &CpuTensor, v: &CpuTensor) -> Result<CpuTensor> {
            self.0.add_vector(a, v)
        }
        fn scale(&self, a: &CpuTensor, s: f32) -> Result<CpuTensor> {
            self.0.scale(a, s)
        }
        fn attention(&self, q: &CpuTensor, k: &CpuTensor, v: &CpuTensor, scale: f32, bias: AttentionBias<'_, Self>) -> Result<CpuTensor> {
            let bias = match bias {
                AttentionBias::None => AttentionBias::None,
                AttentionBias::Table(t) => AttentionBias::Table(t),
                AttentionBias::DecomposedRelPos { rel_h, rel_w } => AttentionBias::DecomposedRelPos { rel_h, rel_w },
            };
            self.0.attention(q, k, v, scale, bias)
        }
        fn resize_bilinear(&self, x: &CpuTensor, out_h: usize, out_w: usize) -> Result<CpuTensor> {
            self.0.resize_bilinear(x, out_h, out_w)
        }
        fn run_frame(&self, key: u64, shape: &[usize], input: &[f32], f: FrameFn<'_, Self>) -> Result<CpuTensor> {
            self.1.lock().unwrap().push(key);
            let x = self.from_host(shape, input)?;
            f(self, &x)
        }
    }

    fn f32_tensor(name: &str, shape: &[usize], values: &[f32]) -> StoredTensor {
        StoredTensor { name: name.into(), shape: shape.to_vec(), data: TensorData::F32(values.into()) }
    }

    fn gelu64(x: f64) -> f64 {
        // erf(z) = 2/√π · e^(−z²) · Σ 2ⁿ z^(2n+1) / (2n+1)!!: all terms positive, no cancellation.
        // Beyond |z| = 6 erf is ±1 to within 1e-17.
        let z = x / std::f64::consts::SQRT_2;
        let erf = if z.abs() >= 6.0 {
            z.signum()
        } else {
            let (mut term, mut sum, mut n) = (z, z, 0.0);
            while term.abs() > 1e-20 * sum.abs() {
                n += 1.0;
                term *= 2.0 * z * z / (2.0 * n + 1.0);
                sum += term;
            }
            std::f64::consts::FRAC_2_SQRT_PI * (-z * z).exp() * sum
        };
        0.5 * x * (1.0 + erf)
    }

    /// `act(x·Wᵀ + bias + scale·(x·Aᵀ)·Bᵀ)` in f64, the definition `linear_lora` implements.
    #[allow(clippy::too_many_arguments)]
    fn reference(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, bias: &[f32], a: &[f32], b: &[f32], r: usize, scale: f64, act: Activation) -> Vec<f64> {
        let mut out = vec![0.0f64; m * n];
        for i in 0..m {
            let down: Vec<f64> = (0..r).map(|j| (0..k).map(|p| x[i * k + p] as f64 * a[j * k + p] as f64).sum()).collect();
            for o in 0..n {
                let base: f64 = (0..k).map(|p| x[i * k + p] as f64 * w[o * k + p] as f64).sum::<f64>() + bias[o] as f64;
                let up: f64 = (0..r).map(|j| down[j] * b[o * r + j] as f64).sum();
                let y = base + scale * up;
                out[i * n + o] = match act {
                    Activation::None => y,
                    Activation::Relu => y.max(0.0),
                    Activation::Gelu => gelu64(y),
                };
            }
        }
        out
    }

    #[test]
    fn linear_lora_matches_f64_reference_and_default_equals_fused() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let cpu = CpuBackend::new(2).unwrap();
        let default = DefaultLora::new(2);
        // Odd sizes on purpose: no dimension is a multiple of a kernel tile.
        for &(lead, k, n, r) in &[(&[3usize, 5][..], 37usize, 29usize, 4usize), (&[1][..], 64, 192, 8), (&[2, 2, 3][..], 13, 7, 1)] {
            let m: usize = lead.iter().product();
            let mut gen = |len: usize| -> Vec<f32> { (0..len).map(|_| rng.gen_range(-1.0f32..1.0)).collect() };
            let (x, w, bias, a, b) = (gen(m * k), gen(n * k), gen(n), gen(r * k), gen(n * r));
            // W stored as fp16, as a packed model holds most weights; the reference uses the
            // stored (rounded) values.
            let w16: Vec<u8> = w.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect();
            let w_stored = StoredTensor { name: "w".into(), shape: vec![n, k], data: TensorData::F16(SharedBytes::from_vec(w16)) };
            let w_values = w_stored.to_f32();
            let scale = 2.5f32;
            let mut x_shape = lead.to_vec();
            x_shape.push(k);
            for act in [Activation::None, Activation::Relu, Activation::Gelu] {
                let want = reference(&x, m, k, &w_values, n, &bias, &a, &b, r, scale as f64, act);
                let mut results = Vec::new();
                let fused = {
                    let lora = Lora { a: cpu.weight(&f32_tensor("a", &[r, k], &a)).unwrap(), b: cpu.weight(&f32_tensor("b", &[n, r], &b)).unwrap(), rank: r, scale };
                    let xt = cpu.from_host(&x_shape, &x).unwrap();
                    let bt = cpu.vector(&f32_tensor("bias", &[n], &bias)).unwrap();
                    cpu.linear_lora(&xt, &cpu.weight(&w_stored).unwrap(), Some(&bt), act, Some(&lora)).unwrap()
                };
                let composed = {
                    let be = &default;
                    let lora = Lora { a: be.weight(&f32_tensor("a", &[r, k], &a)).unwrap(), b: be.weight(&f32_tensor("b", &[n, r], &b)).unwrap(), rank: r, scale };
                    let xt = be.from_host(&x_shape, &x).unwrap();
                    let bt = be.vector(&f32_tensor("bias", &[n], &bias)).unwrap();
                    be.linear_lora(&xt, &be.weight(&w_stored).unwrap(), Some(&bt), act, Some(&lora)).unwrap()
                };
                results.push(&fused);
                results.push(&composed);
                let mut out_shape = lead.to_vec();
                out_shape.push(n);
                for got in results {
                    assert_eq!(got.shape, out_shape);
                    let peak = want.iter().fold(0.0f64, |p, v| p.max(v.abs()));
                    let err = got.data.iter().zip(&want).fold(0.0f64, |e, (g, w)| e.max((*g as f64 - w).abs()));
                    assert!(err <= 1e-5 * peak.max(1.0), "{act:?} m {m} k {k} n {n} r {r}: max error {err} (peak {peak})");
                }
                assert_eq!(fused.data, composed.data, "the CPU's fused linear_lora must round exactly as the default");
            }
        }
    }

    /// The CPU backend's banded inverted residual against the trait's default (three
    /// convolutions, add, activation) on the same CPU kernels: bit for bit, with and without
    /// biases; a weight of the wrong shape is an error, not a panic.
    #[test]
    fn inverted_residual_cpu_equals_default_and_checks_shapes() {
        let mut rng = ChaCha8Rng::seed_from_u64(rand::random());
        let (c, h, w, hidden, k) = (6, 11, 13, 24, 3);
        let mut values = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect() };
        let (xv, ev, dv, pv) = (values(2 * c * h * w), values(hidden * c), values(hidden * k * k), values(c * hidden));
        let (eb, db, pb) = (values(hidden), values(hidden), values(c));
        let stored = [f32_tensor("e", &[hidden, c, 1, 1], &ev), f32_tensor("d", &[hidden, 1, k, k], &dv), f32_tensor("p", &[c, hidden, 1, 1], &pv)];
        let biases = [f32_tensor("eb", &[hidden], &eb), f32_tensor("db", &[hidden], &db), f32_tensor("pb", &[c], &pb)];
        let cpu = CpuBackend::new(2).unwrap();
        let default = DefaultLora::new(2);
        // One block on backend `b`: weights and (optionally) biases made by it, input [2, c, h, w].
        fn run<B: Backend>(b: &B, stored: &[StoredTensor; 3], biases: Option<&[StoredTensor; 3]>, k: usize, shape: &[usize], x: &[f32]) -> Vec<f32> {
            let [e, d, p] = stored.each_ref().map(|t| b.weight(t).unwrap());
            let biases = biases.map(|bs| bs.each_ref().map(|t| b.vector(t).unwrap()));
            let bias = |i: usize| biases.as_ref().map(|bs| &bs[i]);
            let block = InvertedResidual { expand: &e, expand_bias: bias(0), depthwise: &d, depthwise_bias: bias(1), kernel: k, project: &p, project_bias: bias(2), act: Activation::Gelu };
            b.to_host(&b.inverted_residual(&b.from_host(shape, x).unwrap(), &block).unwrap()).unwrap()
        }
        for with_bias in [true, false] {
            let biases = with_bias.then_some(&biases);
            let on_cpu = run(&cpu, &stored, biases, k, &[2, c, h, w], &xv);
            let composed = run(&default, &stored, biases, k, &[2, c, h, w], &xv);
            assert!(on_cpu.iter().zip(&composed).all(|(a, b)| a.to_bits() == b.to_bits()), "bias {with_bias}");
        }
        let [e, d, p] = stored.each_ref().map(|t| cpu.weight(t).unwrap());
        let x = cpu.from_host(&[2, c, h, w], &xv).unwrap();
        let swapped = InvertedResidual { expand: &p, expand_bias: None, depthwise: &d, depthwise_bias: None, kernel: k, project: &e, project_bias: None, act: Activation::Gelu };
        assert!(matches!(cpu.inverted_residual(&x, &swapped), Err(crate::Error::Shape(_))));
        let wrong_kernel = InvertedResidual { expand: &e, expand_bias: None, depthwise: &d, depthwise_bias: None, kernel: 5, project: &p, project_bias: None, act: Activation::Gelu };
        assert!(matches!(cpu.inverted_residual(&x, &wrong_kernel), Err(crate::Error::Shape(_))));
    }

    /// The CPU backend's fused residual and norm equals the default's add then norm, bit for
    /// bit; a delta of another shape is an error.
    #[test]
    fn add_layer_norm_cpu_equals_default() {
        let mut rng = ChaCha8Rng::seed_from_u64(rand::random());
        let mut values = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.gen_range(-2.0..2.0)).collect() };
        let (shape, dim) = ([3, 70, 256], 256);
        let (x, delta, gamma, beta) = (values(3 * 70 * dim), values(3 * 70 * dim), values(dim), values(dim));
        fn run<B: Backend>(b: &B, shape: &[usize], x: &[f32], delta: &[f32], gamma: &[f32], beta: &[f32]) -> Vec<f32> {
            let (g, bt) = (b.vector(&f32_tensor("g", &[gamma.len()], gamma)).unwrap(), b.vector(&f32_tensor("b", &[beta.len()], beta)).unwrap());
            let out = b.add_layer_norm(&b.from_host(shape, x).unwrap(), &b.from_host(shape, delta).unwrap(), &g, &bt, 1e-5).unwrap();
            b.to_host(&out).unwrap()
        }
        let cpu = CpuBackend::new(2).unwrap();
        let (fused, composed) = (run(&cpu, &shape, &x, &delta, &gamma, &beta), run(&DefaultLora::new(2), &shape, &x, &delta, &gamma, &beta));
        assert!(fused.iter().zip(&composed).all(|(a, b)| a.to_bits() == b.to_bits()));
        let g = cpu.vector(&f32_tensor("g", &[dim], &gamma)).unwrap();
        let short = cpu.from_host(&[70, 256], &delta[..70 * dim]).unwrap();
        assert!(matches!(cpu.add_layer_norm(&cpu.from_host(&shape, &x).unwrap(), &short, &g, &g, 1e-5), Err(crate::Error::Shape(_))));
    }

    /// The CPU backend's channels-last mask tail against the trait's default (permute, two
    /// transposed convolutions, LayerNorm2d, GELUs, matmul) on the same CPU kernels, with and
    /// without biases and for one and three masks; mismatched shapes are an error.
    #[test]
    fn upscale_masks_cpu_equals_default_and_checks_shapes() {
        let mut rng = ChaCha8Rng::seed_from_u64(rand::random());
        let (grid, c, c1, c2) = (5, 16, 8, 4);
        let mut values = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect() };
        let (tokens, w1, w2, gamma, beta, b1, b2, hyper) =
            (values(grid * grid * c), values(c * c1 * 4), values(c1 * c2 * 4), values(c1), values(c1), values(c1), values(c2), values(3 * c2));
        let stored = [f32_tensor("w1", &[c, c1, 2, 2], &w1), f32_tensor("w2", &[c1, c2, 2, 2], &w2)];
        let vectors = [f32_tensor("g", &[c1], &gamma), f32_tensor("b", &[c1], &beta), f32_tensor("b1", &[c1], &b1), f32_tensor("b2", &[c2], &b2)];
        // The tail on backend `b` for the first `k` hypernetwork rows.
        fn c_of(stored: &[StoredTensor; 2]) -> usize {
            stored[0].shape[0]
        }
        #[allow(clippy::too_many_arguments)]
        fn tail<B: Backend>(b: &B, stored: &[StoredTensor; 2], vectors: &[StoredTensor; 4], biased: bool, grid: usize, tokens: &[f32], hyper: &[f32], k: usize) -> Result<Vec<f32>> {
            let [w1, w2] = stored.each_ref().map(|t| b.weight(t).unwrap());
            let [gamma, beta, b1, b2] = vectors.each_ref().map(|t| b.vector(t).unwrap());
            let up = OutputUpscaling { up1: &w1, up1_bias: biased.then_some(&b1), norm_gamma: &gamma, norm_beta: &beta, norm_eps: 1e-6, up2: &w2, up2_bias: biased.then_some(&b2) };
            let c2 = hyper.len() / 3;
            let x = b.from_host(&[1, tokens.len() / c_of(stored), c_of(stored)], tokens)?;
            let h = b.from_host(&[1, k, c2], &hyper[..k * c2])?;
            b.to_host(&b.upscale_masks(&x, grid, &up, &h)?)
        }
        let (cpu, default) = (CpuBackend::new(2).unwrap(), DefaultLora::new(2));
        for (biased, k) in [(true, 1), (false, 3)] {
            let on_cpu = tail(&cpu, &stored, &vectors, biased, grid, &tokens, &hyper, k).unwrap();
            let composed = tail(&default, &stored, &vectors, biased, grid, &tokens, &hyper, k).unwrap();
            assert_eq!(on_cpu.len(), k * 16 * grid * grid);
            let peak = composed.iter().fold(0.0f32, |p, v| p.max(v.abs()));
            let worst = on_cpu.iter().zip(&composed).fold(0.0f32, |e, (a, b)| e.max((a - b).abs()));
            assert!(worst <= 1e-5 * peak, "bias {biased}, k {k}: largest difference {worst} (peak {peak})");
        }
        assert!(matches!(tail(&cpu, &stored, &vectors, true, grid + 1, &tokens, &hyper, 1), Err(crate::Error::Shape(_))), "tokens of another grid");
        let swapped = [stored[1].clone(), stored[0].clone()];
        assert!(matches!(tail(&cpu, &swapped, &vectors, true, grid, &tokens, &hyper, 1), Err(crate::Error::Shape(_))));
    }

    /// The CPU backend's fused head split and merge against the trait's default (permutes
    /// around `attention`), bit for bit, on the mask decoder's shapes (7 tokens against 64
    /// image tokens and back); mismatched operands are an error.
    #[test]
    fn attention_heads_cpu_equals_default_and_checks_shapes() {
        let mut rng = ChaCha8Rng::seed_from_u64(rand::random());
        let (heads, d) = (8, 16);
        let mut values = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.gen_range(-2.0..2.0)).collect() };
        let tokens = values(7 * heads * d);
        let image = values(64 * heads * d);
        let values_image = values(64 * heads * d);
        let cpu = CpuBackend::new(2).unwrap();
        let default = DefaultLora::new(2);
        for (nq, q, nk, k, v) in [(7, &tokens, 64, &image, &values_image), (64, &image, 7, &tokens, &tokens)] {
            let fused = {
                let up = |rows, t: &[f32]| cpu.from_host(&[1, rows, heads * d], t).unwrap();
                cpu.to_host(&cpu.attention_heads(up(nq, q), up(nk, k), up(nk, v), heads, 0.25, AttentionBias::None).unwrap()).unwrap()
            };
            let composed = {
                let up = |rows, t: &[f32]| default.from_host(&[1, rows, heads * d], t).unwrap();
                default.to_host(&default.attention_heads(up(nq, q), up(nk, k), up(nk, v), heads, 0.25, AttentionBias::None).unwrap()).unwrap()
            };
            assert_eq!(fused.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), composed.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), "{nq} queries, {nk} keys");
        }
        let up = |rows, width, t: &[f32]| cpu.from_host(&[1, rows, width], &t[..rows * width]).unwrap();
        let narrower_k = cpu.attention_heads(up(7, heads * d, &tokens), up(7, heads * d / 2, &tokens), up(7, heads * d, &tokens), heads, 0.25, AttentionBias::None);
        assert!(matches!(narrower_k, Err(crate::Error::Shape(_))));
        let indivisible = cpu.attention_heads(up(7, heads * d, &tokens), up(7, heads * d, &tokens), up(7, heads * d, &tokens), 3, 0.25, AttentionBias::None);
        assert!(matches!(indivisible, Err(crate::Error::Shape(_))));
    }

    /// The CPU backend's channels-last depthwise convolution against the trait's default
    /// (permute, NCHW conv2d, permute back): bit for bit; a weight that is not `[C, 1, k, k]` is an
    /// error.
    #[test]
    fn depthwise_conv_nhwc_cpu_equals_default_and_checks_shapes() {
        let mut rng = ChaCha8Rng::seed_from_u64(rand::random());
        let (h, w, c, k) = (9, 14, 40, 3);
        let mut values = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect() };
        let (xv, wv, bv) = (values(2 * h * w * c), values(c * k * k), values(c));
        let (weight, bias) = (f32_tensor("w", &[c, 1, k, k], &wv), f32_tensor("b", &[c], &bv));
        let cpu = CpuBackend::new(2).unwrap();
        let default = DefaultLora::new(2);
        let fused = cpu.to_host(&cpu.depthwise_conv_nhwc(&cpu.from_host(&[2, h, w, c], &xv).unwrap(), &cpu.weight(&weight).unwrap(), Some(&cpu.vector(&bias).unwrap()), k).unwrap()).unwrap();
        let composed = default.to_host(&default.depthwise_conv_nhwc(&default.from_host(&[2, h, w, c], &xv).unwrap(), &default.weight(&weight).unwrap(), Some(&default.vector(&bias).unwrap()), k).unwrap()).unwrap();
        assert_eq!(fused.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), composed.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
        let x = cpu.from_host(&[2, h, w, c], &xv).unwrap();
        let wrong = cpu.weight(&f32_tensor("w", &[c, 1, 5, 5], &values(c * 25))).unwrap();
        assert!(matches!(cpu.depthwise_conv_nhwc(&x, &wrong, None, k), Err(crate::Error::Shape(_))));
    }

    #[test]
    fn linear_lora_without_adapter_is_linear_and_bad_factors_are_errors() {
        let cpu = CpuBackend::new(1).unwrap();
        let (k, n, r) = (6, 5, 2);
        let x = cpu.from_host(&[2, k], &[0.5; 12]).unwrap();
        let w = cpu.weight(&f32_tensor("w", &[n, k], &[0.25; 30])).unwrap();
        let plain = cpu.linear(&x, &w, None, Activation::Gelu).unwrap();
        assert_eq!(cpu.linear_lora(&x, &w, None, Activation::Gelu, None).unwrap(), plain);
        // A transposed by mistake: a shape error, never a panic or a silent wrong answer.
        let lora = Lora { a: cpu.weight(&f32_tensor("a", &[k, r], &[0.1; 12])).unwrap(), b: cpu.weight(&f32_tensor("b", &[n, r], &[0.1; 10])).unwrap(), rank: r, scale: 1.0 };
        assert!(matches!(cpu.linear_lora(&x, &w, None, Activation::None, Some(&lora)), Err(crate::Error::Shape(_))));
        let default = DefaultLora::new(1);
        let lora: Lora<DefaultLora> = Lora { a: lora.a, b: lora.b, rank: lora.rank, scale: lora.scale };
        assert!(default.linear_lora(&x, &w, None, Activation::None, Some(&lora)).is_err());
    }
}
