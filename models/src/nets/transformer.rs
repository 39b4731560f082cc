//! SAM's `TwoWayTransformer`, the heart of the mask decoder: prompt tokens and image tokens
//! attend to each other in both directions, so that the output tokens carry what the prompts
//! selected and the image tokens carry where it is.
//!
//! Why it looks the way it does:
//! - Each block is self-attention of the tokens, tokens→image cross-attention, an MLP on the
//!   tokens, then image→tokens cross-attention, each followed by a residual and a LayerNorm
//!   (post-norm, as the reference). The positional encodings are re-added to the queries and keys
//!   of every attention but never to the values.
//! - The first block skips the positional encoding in its self-attention *and* has no residual
//!   there (`skip_first_layer_pe`): the tokens are replaced by the attention output. This is the
//!   reference's behaviour, kept on purpose.
//! - The cross-attentions project to `embedding_dim / downsample_rate` (128) channels before
//!   splitting heads, which is why their `q/k/v_proj` are `[128, 256]`.
//! - Attention itself is [`Backend::attention`] on `[B·heads, N, head_dim]`; the image→token
//!   direction has 4096 queries but only a handful of keys.
//!
//! Weight names (under `mask_decoder.transformer`): `layers.{i}.{self_attn, norm1,
//! cross_attn_token_to_image, norm2, mlp.lin1, mlp.lin2, norm3, norm4, cross_attn_image_to_token}`,
//! `final_attn_token_to_image`, `norm_final_attn`; each attention has `q_proj, k_proj, v_proj,
//! out_proj`.

use crate::backend::{Activation, AttentionBias, Backend};
use crate::config::DecoderConfig;
use crate::nets::common::{Linear, Norm};
use crate::store::WeightStore;
use crate::{Error, Result};

/// `torch.nn.LayerNorm` default, used by every norm of the transformer.
const NORM_EPS: f32 = 1e-5;

/// SAM's `Attention`: project, split into heads, scaled dot-product attention, merge, project.
pub struct Attention<B: Backend> {
    q_proj: Linear<B>,
    k_proj: Linear<B>,
    v_proj: Linear<B>,
    out_proj: Linear<B>,
    num_heads: usize,
    /// `internal_dim / num_heads`.
    head_dim: usize,
}

impl<B: Backend> Attention<B> {
    /// Loads `{prefix}.{q,k,v,out}_proj` with `internal_dim = embedding_dim / downsample_rate`.
    pub fn load(
        b: &B,
        store: &dyn WeightStore,
        prefix: &str,
        embedding_dim: usize,
        num_heads: usize,
        downsample_rate: usize,
    ) -> Result<Self> {
        let internal_dim = embedding_dim / downsample_rate.max(1);
        if num_heads == 0 || internal_dim % num_heads != 0 {
            return Err(Error::Input(format!("{prefix}: {num_heads} heads must divide the internal dimension {internal_dim}")));
        }
        let proj_in = |name: &str| Linear::load(b, store, &format!("{prefix}.{name}"), embedding_dim, internal_dim);
        Ok(Self {
            q_proj: proj_in("q_proj")?,
            k_proj: proj_in("k_proj")?,
            v_proj: proj_in("v_proj")?,
            out_proj: Linear::load(b, store, &format!("{prefix}.out_proj"), internal_dim, embedding_dim)?,
            num_heads,
            head_dim: internal_dim / num_heads,
        })
    }

    /// Its four projections, for adapter binding.
    pub fn linears_mut(&mut self, f: &mut dyn FnMut(&mut Linear<B>)) {
        f(&mut self.q_proj);
        f(&mut self.k_proj);
        f(&mut self.v_proj);
        f(&mut self.out_proj);
    }

    /// `q: [B, Nq, C]`, `k, v: [B, Nk, C]` → `[B, Nq, C]`.
    pub fn forward(&self, b: &B, q: &B::Tensor, k: &B::Tensor, v: &B::Tensor) -> Result<B::Tensor> {
        let q = self.q_proj.forward(b, q, Activation::None)?;
        let k = self.k_proj.forward(b, k, Activation::None)?;
        let v = self.v_proj.forward(b, v, Activation::None)?;
        let scale = 1.0 / (self.head_dim as f32).sqrt();
        // The reference's `_separate_heads` / `_recombine_heads` are the split and merge that
        // `attention_heads` does around the attention.
        let out = b.attention_heads(q, k, v, self.num_heads, scale, AttentionBias::None)?;
        self.out_proj.forward(b, &out, Activation::None)
    }
}

/// SAM's `MLPBlock`: `lin2(relu(lin1(x)))`.
struct MlpBlock<B: Backend> {
    lin1: Linear<B>,
    lin2: Linear<B>,
}

impl<B: Backend> MlpBlock<B> {
    fn load(b: &B, store: &dyn WeightStore, prefix: &str, dim: usize, hidden: usize) -> Result<Self> {
        Ok(Self {
            lin1: Linear::load(b, store, &format!("{prefix}.lin1"), dim, hidden)?,
            lin2: Linear::load(b, store, &format!("{prefix}.lin2"), hidden, dim)?,
        })
    }

    /// `x: [B, N, C]` → `[B, N, C]`.
    fn forward(&self, b: &B, x: &B::Tensor) -> Result<B::Tensor> {
        let hidden = self.lin1.forward(b, x, Activation::Relu)?;
        self.lin2.forward(b, &hidden, Activation::None)
    }
}

/// One `TwoWayAttentionBlock`.
struct TwoWayAttentionBlock<B: Backend> {
    self_attn: Attention<B>,
    norm1: Norm<B>,
    cross_attn_token_to_image: Attention<B>,
    norm2: Norm<B>,
    mlp: MlpBlock<B>,
    norm3: Norm<B>,
    norm4: Norm<B>,
    cross_attn_image_to_token: Attention<B>,
    skip_first_layer_pe: bool,
}

impl<B: Backend> TwoWayAttentionBlock<B> {
    fn load(b: &B, store: &dyn WeightStore, prefix: &str, dim: usize, cfg: &DecoderConfig, skip_first_layer_pe: bool) -> Result<Self> {
        let p = |name: &str| format!("{prefix}.{name}");
        let (heads, rate) = (cfg.num_heads, cfg.attention_downsample_rate);
        Ok(Self {
            self_attn: Attention::load(b, store, &p("self_attn"), dim, heads, 1)?,
            norm1: Norm::load(b, store, &p("norm1"), dim, NORM_EPS)?,
            cross_attn_token_to_image: Attention::load(b, store, &p("cross_attn_token_to_image"), dim, heads, rate)?,
            norm2: Norm::load(b, store, &p("norm2"), dim, NORM_EPS)?,
            mlp: MlpBlock::load(b, store, &p("mlp"), dim, cfg.mlp_dim)?,
            norm3: Norm::load(b, store, &p("norm3"), dim, NORM_EPS)?,
            norm4: Norm::load(b, store, &p("norm4"), dim, NORM_EPS)?,
            cross_attn_image_to_token: Attention::load(b, store, &p("cross_attn_image_to_token"), dim, heads, rate)?,
            skip_first_layer_pe,
        })
    }

    /// `queries: [B, Nt, C]`, `keys: [B, HW, C]`, `query_pe` like `queries`, `key_pe: [HW, C]`
    /// (broadcast over the batch) → updated `(queries, keys)`.
    fn forward(
        &self,
        b: &B,
        queries: &B::Tensor,
        keys: &B::Tensor,
        query_pe: &B::Tensor,
        key_pe: &B::Vector,
    ) -> Result<(B::Tensor, B::Tensor)> {
        let queries = self.token_self_attention(b, queries, query_pe)?;
        // Both cross-attentions see the image with its positional encoding, and the keys do not
        // change between them: the reference adds `keys + key_pe` twice, this adds it once.
        let keys_with_pe = b.add_vector(keys, key_pe)?;
        let queries = self.tokens_attend_to_image(b, &queries, keys, &keys_with_pe, query_pe)?;
        let queries = residual_then_norm(b, &queries, &self.mlp.forward(b, &queries)?, &self.norm3)?;
        let keys = self.image_attends_to_tokens(b, &queries, keys, &keys_with_pe, query_pe)?;
        Ok((queries, keys))
    }

    /// Self-attention of the tokens, then `norm1`: `[B, Nt, C]` → `[B, Nt, C]`.
    fn token_self_attention(&self, b: &B, queries: &B::Tensor, query_pe: &B::Tensor) -> Result<B::Tensor> {
        if self.skip_first_layer_pe {
            let replaced = self.self_attn.forward(b, queries, queries, queries)?;
            return self.norm1.forward(b, &replaced);
        }
        let q = b.add(queries, query_pe)?;
        let attn_out = self.self_attn.forward(b, &q, &q, queries)?;
        residual_then_norm(b, queries, &attn_out, &self.norm1)
    }

    /// Tokens (queries) attend to the image (keys; `keys_with_pe` = keys + key_pe), then
    /// `norm2`: → `[B, Nt, C]`.
    fn tokens_attend_to_image(
        &self,
        b: &B,
        queries: &B::Tensor,
        keys: &B::Tensor,
        keys_with_pe: &B::Tensor,
        query_pe: &B::Tensor,
    ) -> Result<B::Tensor> {
        let q = b.add(queries, query_pe)?;
        let attn_out = self.cross_attn_token_to_image.forward(b, &q, keys_with_pe, keys)?;
        residual_then_norm(b, queries, &attn_out, &self.norm2)
    }

    /// The image (as queries) attends to the tokens, then `norm4`: → keys `[B, HW, C]`.
    fn image_attends_to_tokens(
        &self,
        b: &B,
        queries: &B::Tensor,
        keys: &B::Tensor,
        keys_with_pe: &B::Tensor,
        query_pe: &B::Tensor,
    ) -> Result<B::Tensor> {
        let q = b.add(queries, query_pe)?;
        let attn_out = self.cross_attn_image_to_token.forward(b, keys_with_pe, &q, queries)?;
        residual_then_norm(b, keys, &attn_out, &self.norm4)
    }
}

/// `norm(x + delta)`, both `[.., C]`.
fn residual_then_norm<B: Backend>(b: &B, x: &B::Tensor, delta: &B::Tensor, norm: &Norm<B>) -> Result<B::Tensor> {
    b.add_layer_norm(x, delta, &norm.gamma, &norm.beta, norm.eps)
}

/// SAM's `TwoWayTransformer`.
pub struct TwoWayTransformer<B: Backend> {
    layers: Vec<TwoWayAttentionBlock<B>>,
    final_attn_token_to_image: Attention<B>,
    norm_final_attn: Norm<B>,
}

impl<B: Backend> TwoWayTransformer<B> {
    /// Loads `{prefix}.layers.{0..depth}`, `{prefix}.final_attn_token_to_image` and
    /// `{prefix}.norm_final_attn` for tokens of `embedding_dim` channels.
    pub fn load(b: &B, store: &dyn WeightStore, prefix: &str, embedding_dim: usize, cfg: &DecoderConfig) -> Result<Self> {
        if cfg.transformer_depth == 0 {
            return Err(Error::Input("two-way transformer needs at least one layer".into()));
        }
        let layers = (0..cfg.transformer_depth)
            .map(|i| TwoWayAttentionBlock::load(b, store, &format!("{prefix}.layers.{i}"), embedding_dim, cfg, i == 0))
            .collect::<Result<Vec<_>>>()?;
        let final_attn_token_to_image = Attention::load(
            b,
            store,
            &format!("{prefix}.final_attn_token_to_image"),
            embedding_dim,
            cfg.num_heads,
            cfg.attention_downsample_rate,
        )?;
        let norm_final_attn = Norm::load(b, store, &format!("{prefix}.norm_final_attn"), embedding_dim, NORM_EPS)?;
        Ok(Self { layers, final_attn_token_to_image, norm_final_attn })
    }

    /// Every [`Linear`] of this part, in forward order, for adapter binding.
    pub fn linears_mut(&mut self, f: &mut dyn FnMut(&mut Linear<B>)) {
        for layer in &mut self.layers {
            layer.self_attn.linears_mut(f);
            layer.cross_attn_token_to_image.linears_mut(f);
            f(&mut layer.mlp.lin1);
            f(&mut layer.mlp.lin2);
            layer.cross_attn_image_to_token.linears_mut(f);
        }
        self.final_attn_token_to_image.linears_mut(f);
    }

    /// `image_tokens: [B, H·W, C]` (the image embedding plus the dense prompt, flattened
    /// channels-last), `key_pe: [H·W, C]` (the grid's positional encoding in the same layout),
    /// `point_embedding: [B, Nt, C]` → (tokens `[B, Nt, C]`, image tokens `[B, H·W, C]`).
    pub fn forward(
        &self,
        b: &B,
        image_tokens: &B::Tensor,
        key_pe: &B::Vector,
        point_embedding: &B::Tensor,
    ) -> Result<(B::Tensor, B::Tensor)> {
        let (first, rest) = self.layers.split_first().expect("depth >= 1 checked at load");
        let (mut queries, mut keys) = first.forward(b, point_embedding, image_tokens, point_embedding, key_pe)?;
        for layer in rest {
            (queries, keys) = layer.forward(b, &queries, &keys, point_embedding, key_pe)?;
        }
        let queries = self.final_token_to_image(b, &queries, &keys, point_embedding, key_pe)?;
        Ok((queries, keys))
    }

    /// The last tokens→image attention, residual and `norm_final_attn`: → `[B, Nt, C]`.
    fn final_token_to_image(
        &self,
        b: &B,
        queries: &B::Tensor,
        keys: &B::Tensor,
        query_pe: &B::Tensor,
        key_pe: &B::Vector,
    ) -> Result<B::Tensor> {
        let q = b.add(queries, query_pe)?;
        let k = b.add_vector(keys, key_pe)?;
        let attn_out = self.final_attn_token_to_image.forward(b, &q, &k, keys)?;
        residual_then_norm(b, queries, &attn_out, &self.norm_final_attn)
    }
}

/// `[B, C, H, W]` → `[B, H·W, C]` (`flatten(2).permute(0, 2, 1)`): the layout the transformer
/// takes the image in.
pub fn nchw_to_tokens<B: Backend>(b: &B, x: &B::Tensor) -> Result<B::Tensor> {
    let (batch, channels, h, w) = match b.shape(x) {
        [batch, c, h, w] => (*batch, *c, *h, *w),
        other => return Err(Error::Shape(format!("two-way transformer expects NCHW, got {other:?}"))),
    };
    let nhwc = b.permute(x, &[0, 2, 3, 1])?;
    b.reshape(nhwc, &[batch, h * w, channels])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::CpuBackend;
    use crate::store::MemoryStore as MapStore;
    use rand::{Rng, SeedableRng};
    use std::collections::BTreeMap;


    fn random(rng: &mut rand_chacha::ChaCha8Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.gen_range(-0.5f32..0.5)).collect()
    }

    /// Adds `{prefix}.weight [out, in]` and `{prefix}.bias [out]`.
    fn add_linear(store: &mut MapStore, rng: &mut rand_chacha::ChaCha8Rng, prefix: &str, fan_in: usize, fan_out: usize) {
        store.0.insert(format!("{prefix}.weight"), (vec![fan_out, fan_in], random(rng, fan_out * fan_in)));
        store.0.insert(format!("{prefix}.bias"), (vec![fan_out], random(rng, fan_out)));
    }

    /// `x: [n, fan_in]` · `W: [fan_out, fan_in]`ᵀ + b, in f64.
    fn linear_f64(store: &MapStore, prefix: &str, x: &[f64], fan_in: usize) -> Vec<f64> {
        let (shape, w) = &store.0[&format!("{prefix}.weight")];
        let bias = &store.0[&format!("{prefix}.bias")].1;
        let fan_out = shape[0];
        x.chunks_exact(fan_in)
            .flat_map(|row| (0..fan_out).map(move |o| bias[o] as f64 + (0..fan_in).map(|i| row[i] * w[o * fan_in + i] as f64).sum::<f64>()))
            .collect()
    }

    /// SAM's `Attention.forward` for batch 1, written directly from the reference in f64.
    fn attention_f64(store: &MapStore, prefix: &str, q: &[f64], k: &[f64], v: &[f64], dim: usize, heads: usize) -> Vec<f64> {
        let q = linear_f64(store, &format!("{prefix}.q_proj"), q, dim);
        let k = linear_f64(store, &format!("{prefix}.k_proj"), k, dim);
        let v = linear_f64(store, &format!("{prefix}.v_proj"), v, dim);
        let internal = store.0[&format!("{prefix}.q_proj.weight")].0[0];
        let d = internal / heads;
        let (nq, nk) = (q.len() / internal, k.len() / internal);
        let mut merged = vec![0.0; nq * internal];
        for h in 0..heads {
            for i in 0..nq {
                let scores: Vec<f64> = (0..nk)
                    .map(|j| (0..d).map(|c| q[i * internal + h * d + c] * k[j * internal + h * d + c]).sum::<f64>() / (d as f64).sqrt())
                    .collect();
                let max = scores.iter().cloned().fold(f64::MIN, f64::max);
                let exp: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f64 = exp.iter().sum();
                for c in 0..d {
                    merged[i * internal + h * d + c] = (0..nk).map(|j| exp[j] / total * v[j * internal + h * d + c]).sum();
                }
            }
        }
        linear_f64(store, &format!("{prefix}.out_proj"), &merged, internal)
    }

    #[test]
    fn attention_matches_a_direct_f64_evaluation() {
        let (dim, heads, rate, nq, nk) = (16, 2, 2, 3, 5);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let mut store = MapStore(BTreeMap::new());
        for proj in ["q_proj", "k_proj", "v_proj"] {
            add_linear(&mut store, &mut rng, &format!("attn.{proj}"), dim, dim / rate);
        }
        add_linear(&mut store, &mut rng, "attn.out_proj", dim / rate, dim);
        let (q, k, v) = (random(&mut rng, nq * dim), random(&mut rng, nk * dim), random(&mut rng, nk * dim));

        let b = CpuBackend::new(1).unwrap();
        let attn = Attention::load(&b, &store, "attn", dim, heads, rate).unwrap();
        let up = |x: &[f32], n: usize| b.from_host(&[1, n, dim], x).unwrap();
        let got = b.to_host(&attn.forward(&b, &up(&q, nq), &up(&k, nk), &up(&v, nk)).unwrap()).unwrap();

        let f64s = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<_>>();
        let want = attention_f64(&store, "attn", &f64s(&q), &f64s(&k), &f64s(&v), dim, heads);
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            assert!((*g as f64 - w).abs() < 1e-5, "got {g}, want {w}");
        }
    }

    /// Adds `{prefix}.weight` and `{prefix}.bias`, both `[dim]`, near the identity.
    fn add_norm(store: &mut MapStore, rng: &mut rand_chacha::ChaCha8Rng, prefix: &str, dim: usize) {
        let gamma = random(rng, dim).iter().map(|v| 1.0 + v).collect();
        store.0.insert(format!("{prefix}.weight"), (vec![dim], gamma));
        store.0.insert(format!("{prefix}.bias"), (vec![dim], random(rng, dim)));
    }

    fn add_attention(store: &mut MapStore, rng: &mut rand_chacha::ChaCha8Rng, prefix: &str, dim: usize, internal: usize) {
        for proj in ["q_proj", "k_proj", "v_proj"] {
            add_linear(store, rng, &format!("{prefix}.{proj}"), dim, internal);
        }
        add_linear(store, rng, &format!("{prefix}.out_proj"), internal, dim);
    }

    /// `nn.LayerNorm(dim)` (eps 1e-5) over rows of `x`, in f64.
    fn layer_norm_f64(store: &MapStore, prefix: &str, x: &[f64], dim: usize) -> Vec<f64> {
        let gamma = &store.0[&format!("{prefix}.weight")].1;
        let beta = &store.0[&format!("{prefix}.bias")].1;
        x.chunks_exact(dim)
            .flat_map(|row| {
                let mean = row.iter().sum::<f64>() / dim as f64;
                let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / dim as f64;
                let inv = 1.0 / (var + NORM_EPS as f64).sqrt();
                (0..dim).map(move |c| (row[c] - mean) * inv * gamma[c] as f64 + beta[c] as f64)
            })
            .collect()
    }

    fn add_f64(a: &[f64], b: &[f64]) -> Vec<f64> {
        a.iter().zip(b).map(|(x, y)| x + y).collect()
    }

    /// `TwoWayAttentionBlock.forward` for batch 1, written directly from the reference in f64.
    #[allow(clippy::too_many_arguments)]
    fn block_f64(
        store: &MapStore,
        p: &str,
        queries: &[f64],
        keys: &[f64],
        query_pe: &[f64],
        key_pe: &[f64],
        dim: usize,
        heads: usize,
        skip_pe: bool,
    ) -> (Vec<f64>, Vec<f64>) {
        let queries = if skip_pe {
            attention_f64(store, &format!("{p}.self_attn"), queries, queries, queries, dim, heads)
        } else {
            let q = add_f64(queries, query_pe);
            add_f64(queries, &attention_f64(store, &format!("{p}.self_attn"), &q, &q, queries, dim, heads))
        };
        let queries = layer_norm_f64(store, &format!("{p}.norm1"), &queries, dim);
        let (q, k) = (add_f64(&queries, query_pe), add_f64(keys, key_pe));
        let queries = add_f64(&queries, &attention_f64(store, &format!("{p}.cross_attn_token_to_image"), &q, &k, keys, dim, heads));
        let queries = layer_norm_f64(store, &format!("{p}.norm2"), &queries, dim);
        let hidden: Vec<f64> = linear_f64(store, &format!("{p}.mlp.lin1"), &queries, dim).into_iter().map(|v| v.max(0.0)).collect();
        let mlp_out = linear_f64(store, &format!("{p}.mlp.lin2"), &hidden, hidden.len() / (queries.len() / dim));
        let queries = layer_norm_f64(store, &format!("{p}.norm3"), &add_f64(&queries, &mlp_out), dim);
        let (q, k) = (add_f64(&queries, query_pe), add_f64(keys, key_pe));
        let keys = add_f64(keys, &attention_f64(store, &format!("{p}.cross_attn_image_to_token"), &k, &q, &queries, dim, heads));
        let keys = layer_norm_f64(store, &format!("{p}.norm4"), &keys, dim);
        (queries, keys)
    }

    /// `[C, H, W]` → `[H·W, C]`.
    fn chw_to_tokens_f64(x: &[f32], c: usize, hw: usize) -> Vec<f64> {
        (0..hw).flat_map(|t| (0..c).map(move |ch| x[ch * hw + t] as f64)).collect()
    }

    #[test]
    fn two_way_transformer_matches_a_direct_f64_evaluation() {
        let (dim, heads, mlp_dim, n_tokens, (h, w)) = (16, 2, 32, 3, (2, 3));
        let cfg =
            DecoderConfig { transformer_depth: 2, num_heads: heads, mlp_dim, attention_downsample_rate: 2, ..DecoderConfig::default() };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let mut store = MapStore(BTreeMap::new());
        for i in 0..2 {
            let p = format!("t.layers.{i}");
            add_attention(&mut store, &mut rng, &format!("{p}.self_attn"), dim, dim);
            add_attention(&mut store, &mut rng, &format!("{p}.cross_attn_token_to_image"), dim, dim / 2);
            add_attention(&mut store, &mut rng, &format!("{p}.cross_attn_image_to_token"), dim, dim / 2);
            add_linear(&mut store, &mut rng, &format!("{p}.mlp.lin1"), dim, mlp_dim);
            add_linear(&mut store, &mut rng, &format!("{p}.mlp.lin2"), mlp_dim, dim);
            for n in ["norm1", "norm2", "norm3", "norm4"] {
                add_norm(&mut store, &mut rng, &format!("{p}.{n}"), dim);
            }
        }
        add_attention(&mut store, &mut rng, "t.final_attn_token_to_image", dim, dim / 2);
        add_norm(&mut store, &mut rng, "t.norm_final_attn", dim);
        let image = random(&mut rng, dim * h * w);
        let image_pe = random(&mut rng, dim * h * w);
        let tokens = random(&mut rng, n_tokens * dim);

        let b = CpuBackend::new(1).unwrap();
        let transformer = TwoWayTransformer::load(&b, &store, "t", dim, &cfg).unwrap();
        let image_tokens = nchw_to_tokens(&b, &b.from_host(&[1, dim, h, w], &image).unwrap()).unwrap();
        let key_pe_tokens: Vec<f32> = chw_to_tokens_f64(&image_pe, dim, h * w).iter().map(|&v| v as f32).collect();
        let (q, k) = transformer
            .forward(
                &b,
                &image_tokens,
                &b.vector_from_host(&[h * w, dim], &key_pe_tokens).unwrap(),
                &b.from_host(&[1, n_tokens, dim], &tokens).unwrap(),
            )
            .unwrap();
        assert_eq!(b.shape(&q), [1, n_tokens, dim]);
        assert_eq!(b.shape(&k), [1, h * w, dim]);

        let point_pe: Vec<f64> = tokens.iter().map(|&v| v as f64).collect();
        let key_pe = chw_to_tokens_f64(&image_pe, dim, h * w);
        let (mut queries, mut keys) = (point_pe.clone(), chw_to_tokens_f64(&image, dim, h * w));
        for i in 0..2 {
            (queries, keys) = block_f64(&store, &format!("t.layers.{i}"), &queries, &keys, &point_pe, &key_pe, dim, heads, i == 0);
        }
        let (qf, kf) = (add_f64(&queries, &point_pe), add_f64(&keys, &key_pe));
        let queries = add_f64(&queries, &attention_f64(&store, "t.final_attn_token_to_image", &qf, &kf, &keys, dim, heads));
        let queries = layer_norm_f64(&store, "t.norm_final_attn", &queries, dim);

        for (got, want) in [(b.to_host(&q).unwrap(), queries), (b.to_host(&k).unwrap(), keys)] {
            let worst = got.iter().zip(&want).map(|(g, w)| (*g as f64 - w).abs()).fold(0.0, f64::max);
            assert!(worst < 1e-4, "largest difference {worst}");
        }
    }
}
