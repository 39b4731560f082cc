//! The whole model: image encoder, prompt encoder and mask decoder behind one [`Segmenter`],
//! with each family's pre- and post-processing (`crate::pipeline`).
//!
//! Encoding and decoding are separate calls because their costs differ by two orders of
//! magnitude: an interactive client re-prompts the same frame many times, and only the decoder
//! has to run again ([`ImageEmbedding`] is the cache).

use std::collections::HashMap;

use crate::adapter::{AdapterFile, LinearShape};
use crate::backend::{Backend, Lora};
use crate::config::{EncoderConfig, ModelConfig};
use crate::image::{Mask, RgbImage};
use crate::nets::mask_decoder::MaskDecoder;
use crate::nets::prompt_encoder::PromptEncoder;
use crate::nets::tiny_vit::TinyVit;
use crate::nets::vit::VitEncoder;
use crate::pipeline::{self, Geometry};
use crate::prompt::Prompts;
use crate::nets::common::Linear;
use crate::store::{StoredTensor, TensorData, WeightStore};
use crate::{Error, Result};

/// The image encoders the packed format can hold.
pub enum ImageEncoder<B: Backend> {
    Vit(VitEncoder<B>),
    TinyVit(TinyVit<B>),
}

impl<B: Backend> ImageEncoder<B> {
    fn load(b: &B, store: &dyn WeightStore, config: &ModelConfig) -> Result<Self> {
        Ok(match &config.encoder {
            EncoderConfig::Vit(c) => Self::Vit(VitEncoder::load(b, store, c, config.image_size)?),
            EncoderConfig::TinyVit(c) => Self::TinyVit(TinyVit::load(b, store, c, config.image_size)?),
        })
    }

    fn linears_mut(&mut self, f: &mut dyn FnMut(&mut Linear<B>)) {
        match self {
            Self::Vit(e) => e.linears_mut(f),
            Self::TinyVit(e) => e.linears_mut(f),
        }
    }

    /// `image` is `[1, 3, S, S]`; returns the embedding `[1, 256, 64, 64]`.
    fn forward(&self, b: &B, image: &B::Tensor) -> Result<B::Tensor> {
        match self {
            Self::Vit(e) => e.forward(b, image),
            Self::TinyVit(e) => e.forward(b, image),
        }
    }
}

/// One encoded frame: reusable for any number of prompts on the same image.
pub struct ImageEmbedding<B: Backend> {
    pub embedding: B::Tensor,
    pub geometry: Geometry,
}

/// The decoder's answer for one prompt set.
#[derive(Clone, Debug)]
pub struct Segmentation {
    /// One mask per output (1, or 3 with multimask), at the original resolution.
    pub masks: Vec<Mask>,
    /// The decoder's predicted IoU of each mask.
    pub iou: Vec<f32>,
    /// `[k, L, L]` logits before any resizing (L = 4 × embedding size = 256).
    pub low_res_logits: Vec<f32>,
}

pub struct Segmenter<B: Backend> {
    backend: B,
    config: ModelConfig,
    encoder: ImageEncoder<B>,
    prompt_encoder: PromptEncoder<B>,
    mask_decoder: MaskDecoder<B>,
    /// SHA-256 of the model file (`WeightStore::model_sha256`); adapters must name it.
    model_sha256: Option<String>,
    /// Every adaptable linear layer, in model order (fixed at load).
    linears: Vec<LinearShape>,
    /// SHA-256 of the bound adapter's file.
    adapter_sha256: Option<String>,
    /// Names the encoder computation for `Backend::run_frame`: fresh for every segmenter and
    /// after every change to its layers, since a replayed frame uses the weights it was
    /// recorded with.
    frame_key: u64,
}

/// A key no other segmenter or layer state has had in this process.
fn fresh_frame_key() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

impl<B: Backend> Segmenter<B> {
    /// Builds every network from `store`; shapes are checked tensor by tensor, so a checkpoint
    /// that does not match `config` is refused here, naming the first tensor that differs.
    /// The model's identity (for adapter binding) is the store's `model_sha256`.
    pub fn load(backend: B, store: &dyn WeightStore, config: &ModelConfig) -> Result<Self> {
        Self::load_with_identity(backend, store, config, store.model_sha256())
    }

    /// [`Segmenter::load`] with the model identity given explicitly: for weights built in memory
    /// that stand for a file (the trainer merging an adapter, tests), or `None` for no identity
    /// (such a segmenter refuses every adapter).
    pub fn load_with_identity(backend: B, store: &dyn WeightStore, config: &ModelConfig, model_sha256: Option<&str>) -> Result<Self> {
        let encoder = ImageEncoder::load(&backend, store, config)?;
        let prompt_encoder = PromptEncoder::load(&backend, store, config)?;
        let mask_decoder = MaskDecoder::load(&backend, store, config)?;
        let mut segmenter = Self {
            backend,
            config: config.clone(),
            encoder,
            prompt_encoder,
            mask_decoder,
            model_sha256: model_sha256.map(str::to_string),
            linears: Vec::new(),
            adapter_sha256: None,
            frame_key: fresh_frame_key(),
        };
        let mut linears = Vec::new();
        segmenter.linears_mut(&mut |l| linears.push(LinearShape { name: l.name.clone(), in_features: l.in_features, out_features: l.out_features }));
        segmenter.linears = linears;
        Ok(segmenter)
    }

    /// Lower-case hex SHA-256 of the model file, if it was loaded from one.
    pub fn model_sha256(&self) -> Option<&str> {
        self.model_sha256.as_deref()
    }

    /// Every linear layer an adapter may target (image encoder, then mask decoder; the prompt
    /// encoder has none), with its checkpoint name and sizes.
    pub fn linear_shapes(&self) -> &[LinearShape] {
        &self.linears
    }

    /// Visits every linear layer (the order of [`Segmenter::linear_shapes`]); the trainer and the
    /// adapter binding go through here. Any visit may change weights, so it retires the frame
    /// key (a recorded encoder frame is not replayed with other weights).
    pub fn linears_mut(&mut self, f: &mut dyn FnMut(&mut Linear<B>)) {
        self.frame_key = fresh_frame_key();
        self.encoder.linears_mut(f);
        self.mask_decoder.linears_mut(f);
    }

    /// SHA-256 of the bound adapter file, if one is bound.
    pub fn adapter_sha256(&self) -> Option<&str> {
        self.adapter_sha256.as_deref()
    }

    /// Binds `adapter` (replacing any bound one), or unbinds with `None`. All or nothing: the
    /// adapter must name this model's file hash as its base and every one of its tensors must
    /// name a linear layer of this model with the same sizes; otherwise the error names the
    /// first offender and the previously bound adapter (or none) stays in place.
    pub fn set_adapter(&mut self, adapter: Option<&AdapterFile>) -> Result<()> {
        let Some(adapter) = adapter else {
            self.linears_mut(&mut |l| l.lora = None);
            self.adapter_sha256 = None;
            return Ok(());
        };
        let m = adapter.manifest();
        let model = self.model_sha256.as_deref().ok_or_else(|| {
            Error::Adapter(format!("adapter {}: this model was built in memory and has no file identity to check the adapter's base model against", m.name))
        })?;
        if m.base_model_sha256 != model {
            return Err(Error::Adapter(format!(
                "adapter {} was trained for base model sha256 {}, but the loaded model is sha256 {model}",
                m.name, m.base_model_sha256
            )));
        }
        let by_name: HashMap<&str, &LinearShape> = self.linears.iter().map(|l| (l.name.as_str(), l)).collect();
        let rank = m.rank as usize;
        let mut loras: HashMap<String, Lora<B>> = HashMap::with_capacity(adapter.factors().len());
        for f in adapter.factors() {
            let l = by_name.get(f.name.as_str()).ok_or_else(|| Error::Adapter(format!("adapter {}: tensor {} names no linear layer of this model", m.name, f.name)))?;
            if (l.in_features, l.out_features) != (f.in_features, f.out_features) {
                return Err(Error::Adapter(format!(
                    "adapter {}: tensor {} is {} -> {}, the model's layer is {} -> {}",
                    m.name, f.name, f.in_features, f.out_features, l.in_features, l.out_features
                )));
            }
            let weight = |suffix: &str, shape: Vec<usize>, values: &[f32]| {
                let t = StoredTensor { name: format!("{}.lora_{suffix}", f.name), shape, data: TensorData::F32(values.into()) };
                self.backend.weight(&t)
            };
            let lora = Lora { a: weight("a", vec![rank, f.in_features], &f.a)?, b: weight("b", vec![f.out_features, rank], &f.b)?, rank, scale: m.scale() };
            loras.insert(f.name.clone(), lora);
        }
        // Everything is validated and uploaded: from here on nothing can fail.
        self.linears_mut(&mut |l| l.lora = loras.remove(&l.name));
        self.adapter_sha256 = Some(adapter.sha256_hex().to_string());
        Ok(())
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Preprocesses `image` and runs the image encoder.
    pub fn encode(&self, image: &RgbImage) -> Result<ImageEmbedding<B>> {
        let geometry = Geometry::new(image.height, image.width, self.config.image_size);
        let input = pipeline::preprocess(self.config.preprocess, image, &geometry)?;
        self.encode_preprocessed(&input, geometry)
    }

    /// Runs the encoder on an already preprocessed `[3, S, S]` input (golden tests feed the
    /// reference's own input through here to separate preprocessing from network error).
    pub fn encode_preprocessed(&self, input: &[f32], geometry: Geometry) -> Result<ImageEmbedding<B>> {
        let s = self.config.image_size;
        let embedding = self.backend.run_frame(self.frame_key, &[1, 3, s, s], input, &|b, x| self.encoder.forward(b, x))?;
        Ok(ImageEmbedding { embedding, geometry })
    }

    /// Runs prompt encoder and mask decoder for one prompt set on an encoded frame.
    pub fn decode(&self, emb: &ImageEmbedding<B>, prompts: &Prompts, multimask: bool) -> Result<Segmentation> {
        let (h, w) = emb.geometry.original;
        prompts.validate(w, h)?;
        let input = pipeline::transform_prompts(self.config.preprocess, prompts, &emb.geometry);
        let b = &self.backend;
        let (sparse, dense) = self.prompt_encoder.embed(b, &input.points, &input.boxes, None)?;
        let (masks, iou) = self.mask_decoder.forward(b, &emb.embedding, self.prompt_encoder.token_positional_encoding(), &sparse, &dense, multimask)?;

        let shape = b.shape(&masks).to_vec();
        let (k, low_res) = match shape.as_slice() {
            [1, k, lh, lw] if lh == lw => (*k, *lh),
            other => return Err(Error::Shape(format!("mask decoder returned {other:?}, expected [1, k, L, L]"))),
        };
        let low_res_logits = b.to_host(&masks)?;
        let masks = low_res_logits
            .chunks_exact(low_res * low_res)
            .take(k)
            .map(|plane| pipeline::postprocess(self.config.preprocess, plane, low_res, &emb.geometry))
            .collect::<Result<Vec<_>>>()?;
        Ok(Segmentation { masks, iou, low_res_logits })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::CpuBackend;
    use crate::import::Checkpoint;
    use crate::prompt::BoxPrompt;

    /// The committed tiny SAM checkpoint (official layout, random weights; see tests/fixtures).
    fn tiny_sam() -> Segmenter<CpuBackend> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny_sam/tiny_sam.pth");
        let ckpt = Checkpoint::open(&path).expect("committed tiny SAM fixture");
        Segmenter::load(CpuBackend::new(2).unwrap(), &ckpt, ckpt.config()).unwrap()
    }

    /// The tiny SAM with its f32 weights as they are in the checkpoint (for merging).
    fn tiny_sam_checkpoint() -> Checkpoint {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny_sam/tiny_sam.pth");
        Checkpoint::open(&path).expect("committed tiny SAM fixture")
    }

    /// Loading makes parameters only, never an activation tensor: on CUDA activations come from
    /// an arena that is sized before the model and cut to a frame's needs, so a load-time
    /// activation (SAM ViT's relative-position tables were one) could not fit ViT-L/H at any
    /// budget. The tiny SAM has global attention with relative positions, like ViT-B/L/H.
    #[test]
    fn loading_a_model_makes_no_activation_tensor() {
        use crate::backend::tests::DefaultLora;
        let ckpt = tiny_sam_checkpoint();
        let s = Segmenter::load(DefaultLora::new(1), &ckpt, ckpt.config()).unwrap();
        assert_eq!(s.backend().2.load(std::sync::atomic::Ordering::Relaxed), 0, "from_host during load");
        s.encode(&test_image()).unwrap();
        assert!(s.backend().2.load(std::sync::atomic::Ordering::Relaxed) > 0, "a frame uploads its input: the counter works");
    }

    /// `run_frame` keys: one per segmenter, kept across frames, new after any layer change
    /// (a backend that replays recorded frames must not replay one with old weights).
    #[test]
    fn frame_keys_are_fresh_per_segmenter_and_after_layer_changes() {
        use crate::backend::tests::DefaultLora;
        let ckpt = tiny_sam_checkpoint();
        let mut a = Segmenter::load(DefaultLora::new(1), &ckpt, ckpt.config()).unwrap();
        let b = Segmenter::load(DefaultLora::new(1), &ckpt, ckpt.config()).unwrap();
        let image = test_image();
        let keys = |s: &Segmenter<DefaultLora>| s.backend().1.lock().unwrap().clone();
        a.encode(&image).unwrap();
        a.encode(&image).unwrap();
        b.encode(&image).unwrap();
        let (ka, kb) = (keys(&a), keys(&b));
        assert_eq!(ka.len(), 2);
        assert_eq!(ka[0], ka[1], "same segmenter, same weights: same key");
        assert_ne!(ka[0], kb[0], "two segmenters never share a key");
        a.set_adapter(None).unwrap();
        a.encode(&image).unwrap();
        a.linears_mut(&mut |_| {});
        a.encode(&image).unwrap();
        let ka = keys(&a);
        assert!(ka[2] != ka[0] && ka[3] != ka[2] && ka[3] != kb[0], "{ka:?}");
    }

    fn test_image() -> RgbImage {
        let grey: Vec<u8> = (0..160 * 120).map(|i| ((i * 37 + i / 160 * 11) % 251) as u8).collect();
        RgbImage::from_grey(160, 120, &grey).unwrap()
    }

    /// (image embedding, low-res logits of 3 masks, IoU predictions) for one frame and box.
    fn outputs(s: &Segmenter<CpuBackend>) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let emb = s.encode(&test_image()).unwrap();
        let seg = s.decode(&emb, &Prompts::with_box(BoxPrompt { x0: 30.0, y0: 20.0, x1: 120.0, y1: 100.0 }), true).unwrap();
        (s.backend().to_host(&emb.embedding).unwrap(), seg.low_res_logits, seg.iou)
    }

    /// max |a − b| / max |b|.
    fn relative_error(a: &[f32], b: &[f32]) -> f64 {
        assert_eq!(a.len(), b.len());
        let peak = b.iter().fold(0.0f64, |p, v| p.max(v.abs() as f64));
        a.iter().zip(b).fold(0.0f64, |e, (x, y)| e.max((*x as f64 - *y as f64).abs())) / peak.max(f64::MIN_POSITIVE)
    }

    /// Linear layers by their stored weights: 2-D `*.weight` tensors that are not embeddings or
    /// tokens (what `format::is_quantised_by_default` also singles out, minus its NF4 size rule).
    fn stored_linear_count(store: &dyn WeightStore) -> usize {
        let embedding = |n: &str| n.contains("point_embeddings.") || ["not_a_point_embed.weight", "no_mask_embed.weight", "iou_token.weight", "mask_tokens.weight"].iter().any(|s| n.ends_with(s));
        store.names().iter().filter(|n| n.ends_with(".weight") && !embedding(n) && store.get(n).unwrap().shape.len() == 2).count()
    }

    fn check_linear_shapes(s: &Segmenter<CpuBackend>, store: &dyn WeightStore) {
        let shapes = s.linear_shapes();
        for l in shapes {
            let w = store.get(&format!("{}.weight", l.name)).unwrap_or_else(|e| panic!("{}: {e}", l.name));
            assert_eq!(w.shape, [l.out_features, l.in_features], "{}", l.name);
        }
        let unique: std::collections::BTreeSet<&str> = shapes.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(unique.len(), shapes.len(), "a linear visited twice");
        assert_eq!(shapes.len(), stored_linear_count(store), "every linear of the model, no more");
    }

    #[test]
    fn every_linear_layer_is_exposed_for_adapters() {
        let ckpt = tiny_sam_checkpoint();
        let s = Segmenter::load(CpuBackend::new(1).unwrap(), &ckpt, ckpt.config()).unwrap();
        check_linear_shapes(&s, &ckpt);
        // depth 2 ViT: 2 x (qkv, proj) under the default targets.
        let encoder_attention = crate::adapter::select_targets(s.linear_shapes(), &crate::adapter::default_targets());
        assert_eq!(encoder_attention.len(), 4);
        assert_eq!(s.model_sha256(), Some(ckpt.sha256()));

        // TinyViT, through the bundled packed LiteMedSAM (in the repository).
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("litemedsam-nf4.msam");
        let packed = crate::format::PackedModel::open(&path).unwrap();
        let lite = Segmenter::load(CpuBackend::new(1).unwrap(), &packed, packed.config()).unwrap();
        check_linear_shapes(&lite, &packed);
        assert_eq!(lite.model_sha256(), Some(packed.sha256_hex()));
        let attention = crate::adapter::select_targets(lite.linear_shapes(), &crate::adapter::default_targets());
        assert!(attention.iter().all(|l| l.name.starts_with("image_encoder.layers.") && (l.name.ends_with(".attn.qkv") || l.name.ends_with(".attn.proj"))));
        // LiteMedSAM's TinyViT-5M: attention stages of depth 2, 6, 2.
        assert_eq!(attention.len(), 2 * (2 + 6 + 2));
    }

    #[test]
    fn zero_b_adapter_is_bit_identical_and_unbinding_restores_the_base() {
        let ckpt = tiny_sam_checkpoint();
        let mut s = Segmenter::load(CpuBackend::new(2).unwrap(), &ckpt, ckpt.config()).unwrap();
        let base = outputs(&s);
        let targets = vec!["*".to_string()];
        let mut factors = crate::adapter::synth::random_factors(s.linear_shapes(), &targets, 4, 3).unwrap();
        factors.iter_mut().for_each(|f| f.b.iter_mut().for_each(|v| *v = 0.0));
        let meta = crate::adapter::synth::test_meta(&targets, ckpt.sha256(), 4, 8.0, 3);
        let zero = crate::adapter::encode_adapter(&meta, &factors).unwrap();
        s.set_adapter(Some(&zero)).unwrap();
        assert_eq!(s.adapter_sha256(), Some(zero.sha256_hex()));
        assert_eq!(outputs(&s), base, "an adapter with B = 0 must not change a single output");

        let random = crate::adapter::synth::random_adapter(s.linear_shapes(), &targets, ckpt.sha256(), 4, 8.0, 3).unwrap();
        s.set_adapter(Some(&random)).unwrap();
        assert_ne!(outputs(&s).1, base.1, "a random adapter must change the logits");
        s.set_adapter(None).unwrap();
        assert_eq!(s.adapter_sha256(), None);
        assert_eq!(outputs(&s), base, "unbinding must restore the base model exactly");
    }

    #[test]
    fn random_adapter_equals_the_model_with_merged_weights() {
        let ckpt = tiny_sam_checkpoint();
        let mut s = Segmenter::load(CpuBackend::new(2).unwrap(), &ckpt, ckpt.config()).unwrap();
        let base = outputs(&s);
        // Every linear (encoder, decoder transformer, hypernetworks, IoU head).
        let targets = vec!["*".to_string()];
        let (rank, alpha) = (4, 8.0f32);
        let adapter = crate::adapter::synth::random_adapter(s.linear_shapes(), &targets, ckpt.sha256(), rank, alpha, 42).unwrap();
        s.set_adapter(Some(&adapter)).unwrap();
        let adapted = outputs(&s);

        // W' = W + (alpha/r)·B·A, in f64, then stored as f32.
        let mut merged = crate::store::MemoryStore::default();
        for name in ckpt.names() {
            let t = ckpt.get(&name).unwrap();
            merged.0.insert(name, (t.shape.clone(), t.to_f32()));
        }
        let scale = (alpha / rank as f32) as f64;
        for f in adapter.factors() {
            let (shape, w) = merged.0.get_mut(&format!("{}.weight", f.name)).unwrap();
            assert_eq!(shape, &[f.out_features, f.in_features]);
            for o in 0..f.out_features {
                for i in 0..f.in_features {
                    let delta: f64 = (0..rank).map(|j| f.b[o * rank + j] as f64 * f.a[j * f.in_features + i] as f64).sum();
                    let v = &mut w[o * f.in_features + i];
                    *v = (*v as f64 + scale * delta) as f32;
                }
            }
        }
        let reference = Segmenter::load(CpuBackend::new(2).unwrap(), &merged, ckpt.config()).unwrap();
        let want = outputs(&reference);

        let changed = relative_error(&base.1, &want.1);
        assert!(changed > 1e-3, "the adapter barely changes the logits ({changed:.2e}): the comparison would prove nothing");
        for (what, got, want) in [("embedding", &adapted.0, &want.0), ("logits", &adapted.1, &want.1), ("iou", &adapted.2, &want.2)] {
            let err = relative_error(got, want);
            eprintln!("{what}: relative error {err:.2e} against merged weights (adapter moved the logits by {changed:.2e})");
            assert!(err < 1e-5, "{what}: relative error {err:.2e} against merged weights");
        }
    }

    #[test]
    fn a_mismatched_adapter_is_refused_and_the_bound_one_stays() {
        let ckpt = tiny_sam_checkpoint();
        let mut s = Segmenter::load(CpuBackend::new(2).unwrap(), &ckpt, ckpt.config()).unwrap();
        let targets = crate::adapter::default_targets();
        let good = crate::adapter::synth::random_adapter(s.linear_shapes(), &targets, ckpt.sha256(), 2, 4.0, 1).unwrap();
        s.set_adapter(Some(&good)).unwrap();
        let bound = outputs(&s);

        let other_base = "f".repeat(64);
        let foreign = crate::adapter::synth::random_adapter(s.linear_shapes(), &targets, &other_base, 2, 4.0, 2).unwrap();
        let e = s.set_adapter(Some(&foreign)).unwrap_err().to_string();
        assert!(e.contains("trained for base model") && e.contains(&other_base) && e.contains(ckpt.sha256()), "{e}");

        // Right base, but one tensor the model does not have: nothing of it may be bound.
        let mut shapes = s.linear_shapes().to_vec();
        shapes.push(crate::adapter::LinearShape { name: "image_encoder.blocks.9.attn.qkv".into(), in_features: 64, out_features: 192 });
        let extra = crate::adapter::synth::random_adapter(&shapes, &targets, ckpt.sha256(), 2, 4.0, 3).unwrap();
        let e = s.set_adapter(Some(&extra)).unwrap_err().to_string();
        assert!(e.contains("image_encoder.blocks.9.attn.qkv") && e.contains("names no linear layer"), "{e}");

        // Right names, wrong sizes.
        let mut wide = s.linear_shapes().to_vec();
        wide.iter_mut().filter(|l| l.name.ends_with("blocks.1.attn.proj")).for_each(|l| l.in_features += 1);
        let wrong = crate::adapter::synth::random_adapter(&wide, &targets, ckpt.sha256(), 2, 4.0, 4).unwrap();
        let e = s.set_adapter(Some(&wrong)).unwrap_err().to_string();
        assert!(e.contains("image_encoder.blocks.1.attn.proj") && e.contains("65 -> 64"), "{e}");

        assert_eq!(s.adapter_sha256(), Some(good.sha256_hex()));
        assert_eq!(outputs(&s), bound, "a refused adapter must leave the bound one in place, bit for bit");

        // Weights built in memory have no identity: every adapter is refused, with the reason.
        let anonymous = Checkpoint::from_tensors(ckpt.names().into_iter().map(|n| {
            let t = ckpt.get(&n).unwrap();
            (n, t.shape.clone(), t.to_f32())
        }).collect()).unwrap();
        let mut a = Segmenter::load(CpuBackend::new(1).unwrap(), &anonymous, anonymous.config()).unwrap();
        assert_eq!(a.model_sha256(), None);
        assert!(a.set_adapter(Some(&good)).unwrap_err().to_string().contains("no file identity"));
        let mut named = Segmenter::load_with_identity(CpuBackend::new(1).unwrap(), &anonymous, anonymous.config(), Some(ckpt.sha256())).unwrap();
        named.set_adapter(Some(&good)).unwrap();
    }

    #[test]
    fn a_second_frame_allocates_no_activation_buffers() {
        let segmenter = tiny_sam();
        let grey: Vec<u8> = (0..200 * 150).map(|i| (i * 37 % 251) as u8).collect();
        let image = RgbImage::from_grey(200, 150, &grey).unwrap();
        let prompts = Prompts::with_box(BoxPrompt { x0: 40.0, y0: 30.0, x1: 150.0, y1: 120.0 });
        let frame = |s: &Segmenter<CpuBackend>| {
            let emb = s.encode(&image).unwrap();
            s.decode(&emb, &prompts, true).unwrap()
        };
        let first = frame(&segmenter);
        let after_first = segmenter.backend().fresh_allocations();
        assert!(after_first > 0, "the first frame sizes the pool");
        let second = frame(&segmenter);
        assert_eq!(segmenter.backend().fresh_allocations(), after_first, "steady state must reuse pooled buffers");
        assert_eq!(first.low_res_logits, second.low_res_logits, "recycled buffers must not change results");
    }
}
