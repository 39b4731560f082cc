//! The independent cross-check: tract runs the ONNX graphs on the CPU, our engine runs the
//! weights mapped out of the same files (f32, no quantisation), both on the same inputs, and
//! the image embeddings, low-resolution logits, IoU predictions and thresholded masks are
//! compared. tract shares no code with us (its own ONNX reader, op set and kernels), so
//! agreement tests both the mapping and our networks.
//!
//! The ONNX side is driven through the official export's input and output names
//! (`segment_anything/utils/onnx.py`: `image_embeddings`, `point_coords`, `point_labels`,
//! `mask_input`, `has_mask_input`, `orig_im_size` → `iou_predictions`, `low_res_masks`); an
//! encoder has one input `[1, 3, S, S]` and one output.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use minisam_models::cpu::CpuBackend;
use minisam_models::backend::Backend;
use minisam_models::config::ModelConfig;
use minisam_models::pipeline::{self, Geometry};
use minisam_models::prompt::{BoxPrompt, Prompts};
use minisam_models::sam::Segmenter;
use tract_onnx::prelude::*;

/// A host tensor: shape and row-major f32 values.
pub type HostTensor = (Vec<usize>, Vec<f32>);

/// Sets tract's matrix-product thread pool; call once before running graphs.
pub fn set_tract_threads(threads: usize) {
    let executor = if threads > 1 { tract_linalg::multithread::Executor::multithread(threads) } else { tract_linalg::multithread::Executor::SingleThread };
    tract_linalg::multithread::set_default_executor(executor);
}

/// An ONNX graph optimised by tract for fixed input shapes.
pub struct TractGraph {
    plan: Arc<TypedRunnableModel>,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
}

fn tract_err(e: TractError) -> anyhow::Error {
    anyhow!("{e:#}")
}

impl TractGraph {
    /// Loads `path` with every input's shape from `shape_of` (by input name).
    pub fn load(path: &Path, shape_of: &dyn Fn(&str) -> Option<Vec<usize>>) -> Result<Self> {
        let onnx = tract_onnx::onnx();
        let proto = onnx.proto_model_for_path(path).map_err(tract_err).with_context(|| format!("reading {}", path.display()))?;
        let graph = proto.graph.as_ref().context("the ONNX model has no graph")?;
        let initializers: std::collections::HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
        let inputs: Vec<String> = graph.input.iter().map(|i| i.name.clone()).filter(|n| !initializers.contains(n.as_str())).collect();
        let mut outputs: Vec<String> = graph.output.iter().map(|o| o.name.clone()).collect();
        let mut model = onnx.model_for_proto_model(&proto).map_err(tract_err).with_context(|| format!("tract cannot load {}", path.display()))?;
        // The decoder export's full-size `masks` are resized to a size read from the
        // `orig_im_size` input at run time; comparing the low-res logits needs none of that, and
        // dropping it lets tract optimise the graph for fixed shapes.
        if outputs.iter().any(|o| o == "low_res_masks") {
            outputs.retain(|o| o == "low_res_masks" || o == "iou_predictions");
            model.select_outputs_by_name(&outputs).map_err(tract_err)?;
        }
        for (ix, name) in inputs.iter().enumerate() {
            let shape = shape_of(name).with_context(|| format!("{}: unexpected input `{name}` (expected the official SAM export's inputs)", path.display()))?;
            model.set_input_fact(ix, f32::fact(shape.clone()).into()).map_err(tract_err)?;
        }
        let plan = model.into_optimized().and_then(|m| m.into_runnable()).map_err(tract_err).with_context(|| format!("tract cannot optimise {}", path.display()))?;
        Ok(Self { plan, inputs, outputs })
    }

    /// Runs with inputs by name; returns every output by name.
    pub fn run(&self, inputs: &HashMap<&str, HostTensor>) -> Result<HashMap<String, HostTensor>> {
        let mut values: TVec<TValue> = tvec![];
        for name in &self.inputs {
            let (shape, data) = inputs.get(name.as_str()).with_context(|| format!("no value for input `{name}`"))?;
            values.push(Tensor::from_shape(shape, data).map_err(tract_err)?.into());
        }
        let out = self.plan.run(values).map_err(tract_err).context("tract run")?;
        let mut result = HashMap::new();
        for (name, value) in self.outputs.iter().zip(out) {
            let t = value.into_tensor().cast_to::<f32>().map_err(tract_err)?.into_owned();
            let values: Vec<f32> = t.to_plain_array_view::<f32>().map_err(tract_err)?.iter().copied().collect();
            result.insert(name.clone(), (t.shape().to_vec(), values));
        }
        Ok(result)
    }
}

/// One compared quantity.
#[derive(Clone, Debug)]
pub struct Comparison {
    pub what: String,
    /// ‖ours − tract‖₂ / ‖tract‖₂.
    pub rel_err: f64,
    pub max_abs: f64,
    /// IoU of the masks `logits > 0` (logit comparisons only).
    pub mask_iou: Option<f64>,
    /// Fraction of tract's values above 0: an IoU means something only strictly between 0 and 1.
    pub positive_fraction: f64,
}

impl Comparison {
    pub fn new(what: impl Into<String>, ours: &[f32], reference: &[f32], masks: bool) -> Result<Self> {
        if ours.len() != reference.len() {
            bail!("{}: ours has {} values, tract {}", what.into(), ours.len(), reference.len());
        }
        let (mut diff, mut norm, mut max_abs) = (0f64, 0f64, 0f64);
        let (mut inter, mut union, mut positive) = (0usize, 0usize, 0usize);
        for (&a, &b) in ours.iter().zip(reference) {
            let d = (a as f64 - b as f64).abs();
            diff += d * d;
            norm += (b as f64) * (b as f64);
            max_abs = max_abs.max(d);
            inter += usize::from(a > 0.0 && b > 0.0);
            union += usize::from(a > 0.0 || b > 0.0);
            positive += usize::from(b > 0.0);
        }
        let rel_err = if norm > 0.0 { (diff / norm).sqrt() } else { diff.sqrt() };
        let mask_iou = masks.then(|| if union == 0 { 1.0 } else { inter as f64 / union as f64 });
        let positive_fraction = positive as f64 / reference.len().max(1) as f64;
        Ok(Self { what: what.into(), rel_err, max_abs, mask_iou, positive_fraction })
    }
}

/// What to feed both sides.
pub struct CheckInputs {
    /// Preprocessed encoder input `[3, S, S]`.
    pub image: Vec<f32>,
    /// Box prompt in encoder-input pixels.
    pub prompt: BoxPrompt,
}

impl CheckInputs {
    /// A deterministic stand-in for a normalised image (smooth patterns plus hash noise, values
    /// about ±2) and a box over the middle; used when no image is given.
    pub fn synthetic(size: usize) -> Self {
        let mut image = Vec::with_capacity(3 * size * size);
        for c in 0..3 {
            for y in 0..size {
                for x in 0..size {
                    let h = ((x * 73_856_093) ^ (y * 19_349_663) ^ (c * 83_492_791)) % 1000;
                    let smooth = ((x as f32 * 0.11 + c as f32).sin() + (y as f32 * 0.07).cos()) * 0.8;
                    image.push(smooth + (h as f32 / 1000.0 - 0.5));
                }
            }
        }
        // Whole pixels: LiteMedSAM's box transform truncates, so fractional corners would be
        // moved on our side only.
        let at = |f: f32| (f * size as f32).floor();
        Self { image, prompt: BoxPrompt { x0: at(0.22), y0: at(0.3), x1: at(0.71), y1: at(0.83) } }
    }

    /// A real image through the model's own preprocessing, the box (original pixels) moved into
    /// the encoder-input frame the same way.
    pub fn from_image(path: &Path, prompt: BoxPrompt, config: &ModelConfig) -> Result<Self> {
        let rgb = crate::image_io::read_rgb(path)?;
        let geometry = Geometry::new(rgb.height, rgb.width, config.image_size);
        let prompts = Prompts::with_box(prompt);
        prompts.validate(rgb.width, rgb.height).with_context(|| format!("the box does not fit {}", path.display()))?;
        let image = pipeline::preprocess(config.preprocess, &rgb, &geometry)?;
        let [x0, y0, x1, y1] = pipeline::transform_prompts(config.preprocess, &prompts, &geometry).boxes[0];
        Ok(Self { image, prompt: BoxPrompt { x0, y0, x1, y1 } })
    }
}

/// The model's geometry as the graphs see it.
struct Dims {
    image_size: usize,
    embed_dim: usize,
    grid: usize,
}

impl Dims {
    fn input_shape(&self, name: &str, encoder_input: bool) -> Option<Vec<usize>> {
        let (s, d, e) = (self.image_size, self.embed_dim, self.grid);
        Some(match name {
            "image_embeddings" => vec![1, d, e, e],
            "point_coords" => vec![1, 2, 2],
            "point_labels" => vec![1, 2],
            "mask_input" => vec![1, 1, 4 * e, 4 * e],
            "has_mask_input" => vec![1],
            "orig_im_size" => vec![2],
            _ if encoder_input => vec![1, 3, s, s],
            _ => return None,
        })
    }
}

/// Runs every file with tract and the mapped weights with our CPU engine; returns the
/// comparisons in file order. `imported` is [`super::import`] of the same `files`.
pub fn cross_check(imported: &super::Imported, files: &[PathBuf], inputs: &CheckInputs, threads: usize) -> Result<Vec<Comparison>> {
    let config = imported.checkpoint.config().clone();
    let segmenter = Segmenter::load(CpuBackend::new(threads)?, &imported.checkpoint, &config).context("building our networks from the mapped weights")?;
    let dims = Dims { image_size: config.image_size, embed_dim: config.prompt_embed_dim, grid: config.embedding_size };
    let s = dims.image_size;
    let geometry = Geometry::new(s, s, s);
    set_tract_threads(threads);

    let ours = segmenter.encode_preprocessed(&inputs.image, geometry)?;
    let our_embedding = segmenter.backend().to_host(&ours.embedding)?;
    let embedding_shape = vec![1, dims.embed_dim, dims.grid, dims.grid];
    let single = segmenter.decode(&ours, &Prompts::with_box(inputs.prompt), false)?;
    let multi = segmenter.decode(&ours, &Prompts::with_box(inputs.prompt), true)?;

    let p = inputs.prompt;
    let mut feed: HashMap<&str, HostTensor> = HashMap::new();
    feed.insert("point_coords", (vec![1, 2, 2], vec![p.x0, p.y0, p.x1, p.y1]));
    feed.insert("point_labels", (vec![1, 2], vec![2.0, 3.0]));
    feed.insert("mask_input", (vec![1, 1, 4 * dims.grid, 4 * dims.grid], vec![0.0; 16 * dims.grid * dims.grid]));
    feed.insert("has_mask_input", (vec![1], vec![0.0]));
    feed.insert("orig_im_size", (vec![2], vec![s as f32, s as f32]));
    // The decoder runs on our embedding, so its comparison isolates the decoder.
    feed.insert("image_embeddings", (embedding_shape.clone(), our_embedding.clone()));

    let mut results = Vec::new();
    for file in files {
        let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let decoder_like = |n: &str| dims.input_shape(n, false).is_some();
        let proto_inputs = TractGraph::load(file, &|n| dims.input_shape(n, !decoder_like(n)))?;
        let mut feed = feed.clone();
        for input in &proto_inputs.inputs {
            if !decoder_like(input) {
                feed.insert(input.as_str(), (vec![1, 3, s, s], inputs.image.clone()));
            }
        }
        let out = proto_inputs.run(&feed).with_context(|| format!("running {name} with tract"))?;
        if let Some((_, logits)) = out.get("low_res_masks") {
            let plane = single.low_res_logits.len();
            if logits.len() < 4 * plane || multi.low_res_logits.len() != 3 * plane {
                bail!("{name}: low_res_masks holds {} values, expected the 4 masks of {plane}", logits.len());
            }
            results.push(Comparison::new(format!("{name}: logits, single mask"), &single.low_res_logits, &logits[..plane], true)?);
            results.push(Comparison::new(format!("{name}: logits, 3 masks"), &multi.low_res_logits, &logits[plane..4 * plane], true)?);
            if let Some((_, iou)) = out.get("iou_predictions") {
                let ours: Vec<f32> = single.iou.iter().chain(&multi.iou).copied().collect();
                results.push(Comparison::new(format!("{name}: IoU predictions"), &ours, iou, false)?);
            }
        } else if out.len() == 1 {
            let (shape, embedding) = out.values().next().ok_or_else(|| anyhow!("{name}: no output"))?;
            if *shape != embedding_shape {
                bail!("{name}: output shape {shape:?}, expected the image embedding {embedding_shape:?}");
            }
            results.push(Comparison::new(format!("{name}: image embedding"), &our_embedding, embedding, false)?);
        } else {
            bail!("{name}: outputs {:?} are neither an image embedding nor the decoder export's `low_res_masks`", proto_inputs.outputs);
        }
    }
    Ok(results)
}

/// The comparisons as a table.
pub fn render(results: &[Comparison]) -> String {
    let mut s = format!("{:<48} {:>12} {:>12} {:>9}\n", "quantity (ours vs tract)", "rel. error", "max |diff|", "mask IoU");
    for r in results {
        let iou = r.mask_iou.map(|v| format!("{v:.4}")).unwrap_or_else(|| "-".into());
        s += &format!("{:<48} {:>12.3e} {:>12.3e} {:>9}\n", r.what, r.rel_err, r.max_abs, iou);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::tests::{generated, tiny};

    /// Runs the check and asserts every relative error below `tol` and every mask IoU ≥ 0.99.
    fn assert_agrees(files: &[PathBuf], tol: f64) -> Vec<Comparison> {
        let imported = crate::onnx::import(files).unwrap();
        let inputs = CheckInputs::synthetic(imported.checkpoint.config().image_size);
        let results = cross_check(&imported, files, &inputs, 2).unwrap();
        eprintln!("{}", render(&results));
        for r in &results {
            assert!(r.rel_err < tol, "{}: relative error {:.3e}", r.what, r.rel_err);
            assert!(r.mask_iou.is_none_or(|iou| iou >= 0.99), "{}: mask IoU {:?}", r.what, r.mask_iou);
        }
        results
    }

    #[test]
    fn tract_and_our_engine_agree_on_the_tiny_sam() {
        let results = assert_agrees(&[tiny("encoder.onnx"), tiny("decoder.onnx")], 1e-4);
        let whats: Vec<&str> = results.iter().map(|r| r.what.as_str()).collect();
        assert_eq!(
            whats,
            [
                "encoder.onnx: image embedding",
                "decoder.onnx: logits, single mask",
                "decoder.onnx: logits, 3 masks",
                "decoder.onnx: IoU predictions"
            ]
        );
        // The synthetic input must give masks with both classes, or IoU would say nothing.
        for r in results.iter().filter(|r| r.mask_iou.is_some()) {
            assert!(r.positive_fraction > 0.01 && r.positive_fraction < 0.99, "{}: {} of the mask is foreground", r.what, r.positive_fraction);
        }
    }

    #[test]
    fn tract_and_our_engine_agree_on_the_unfolded_and_combined_exports() {
        assert_agrees(&[tiny("encoder.onnx"), tiny("decoder_unfolded.onnx")], 1e-4);
        if let Some(sam) = generated("tiny_sam/sam.onnx") {
            // Its decoder runs on tract's own embedding: encoder and decoder error together.
            assert_agrees(&[sam], 1e-4);
        }
    }

    #[test]
    fn tract_and_our_engine_agree_on_litemedsam() {
        let (Some(enc), Some(dec)) = (generated("litemedsam/encoder.onnx"), generated("litemedsam/decoder.onnx")) else { return };
        assert_agrees(&[enc, dec], 1e-3);
    }

    #[test]
    fn comparison_metrics() {
        let c = Comparison::new("x", &[1.0, -1.0, 2.0], &[1.0, 1.0, 2.0], true).unwrap();
        assert!((c.rel_err - (4.0f64 / 6.0).sqrt()).abs() < 1e-12);
        assert_eq!(c.max_abs, 2.0);
        assert_eq!(c.mask_iou, Some(2.0 / 3.0));
        assert_eq!(c.positive_fraction, 1.0);
        assert!(Comparison::new("x", &[1.0], &[1.0, 2.0], false).is_err());
    }
}
