//! `minisam segment`: one image, one prompt set, one mask PNG, with the decoder's IoU estimate
//! and the time spent in each stage.

use std::time::Instant;

use anyhow::{Context, Result};
use std::path::Path;

use super::model::{Loaded, LoadedOn};
use minisam_models::image::{Mask, RgbImage};
use minisam_models::prompt::Prompts;

use super::cuda::BackendExtras;
use crate::cli::SegmentArgs;
use crate::image_io::{self, MaskValue};
use crate::overlay;
use crate::runtime;

pub fn run(args: &SegmentArgs) -> Result<()> {
    // Validated now, before the slow model load; bound (and checked against the model) after it.
    runtime::open_adapter(args.adapter.as_deref())?;
    let image = image_io::read_rgb_with(&args.image, &args.dicom.options())?;
    let env = std::env::var("MINISAM_MODEL").ok();
    let model_path = runtime::resolve_model(args.model.as_deref(), env.as_deref())?;
    let prompts = Prompts {
        boxes: args.boxes.clone(),
        points: args.points.clone(),
    };
    // Checked before the (slow) model load so a typo costs nothing.
    prompts
        .validate(image.width, image.height)
        .with_context(|| {
            format!(
                "prompt does not fit {} ({}x{})",
                args.image.display(),
                image.width,
                image.height
            )
        })?;

    match super::model::load_selected(&args.backend, args.threads.get(), &model_path)? {
        LoadedOn::Cpu(loaded) => run_on(args, &image, &prompts, &model_path, *loaded),
        LoadedOn::Cuda(loaded) => run_on(args, &image, &prompts, &model_path, *loaded),
    }
}

/// The rest of `run` on whichever backend holds the model.
fn run_on<B: BackendExtras>(args: &SegmentArgs, image: &RgbImage, prompts: &Prompts, model_path: &Path, mut loaded: Loaded<B>) -> Result<()> {
    // With --json, stdout carries one JSON object and nothing else.
    let human = !args.json;
    if human {
        println!(
            "model: {} ({}), loaded in {:.0} ms",
            model_path.display(),
            loaded.description,
            loaded.load_ms
        );
    }
    if let Some(line) = runtime::bind_adapter(&mut loaded.segmenter, args.adapter.as_deref())? {
        if human {
            println!("{line}");
        }
    }
    let t0 = Instant::now();
    let emb = loaded
        .segmenter
        .encode(image)
        .with_context(|| format!("encoding {}", args.image.display()))?;
    // GPU work is queued asynchronously: wait for it, so the time is the encoder's.
    loaded.segmenter.backend().sync()?;
    let encode_ms = t0.elapsed().as_secs_f64() * 1e3;
    let t1 = Instant::now();
    let seg = loaded
        .segmenter
        .decode(&emb, prompts, args.multimask)
        .context("decoding the prompt")?;
    let decode_ms = t1.elapsed().as_secs_f64() * 1e3;

    let best = best_index(&seg.iou).context("the decoder returned no mask")?;
    let mask = seg
        .masks
        .get(best)
        .context("the decoder returned fewer masks than IoU scores")?;
    let value = if args.mask_01 {
        MaskValue::One
    } else {
        MaskValue::Visible255
    };
    image_io::write_mask(&args.output, mask, value)?;
    if let Some(path) = &args.overlay {
        write_overlay(path, image, mask, prompts)?;
    }
    let backend_name = loaded.segmenter.backend().name();
    if args.json {
        let report = serde_json::json!({
            "image": args.image.display().to_string(),
            "frame": args.dicom.frame,
            "slice": args.dicom.slice.map(|s| s.to_string()),
            "width": image.width,
            "height": image.height,
            "model": model_path.display().to_string(),
            "model_description": loaded.description,
            "adapter": args.adapter.as_ref().map(|p| p.display().to_string()),
            "mask": args.output.display().to_string(),
            "overlay": args.overlay.as_ref().map(|p| p.display().to_string()),
            "mask_pixels": mask.area(),
            "iou": seg.iou[best],
            "ious": seg.iou,
            "kept": best,
            "encode_ms": encode_ms,
            "decode_ms": decode_ms,
            "backend": backend_name,
            "threads": (backend_name == "cpu").then(|| args.threads.get()),
            "peak_rss_mib": if args.stats { runtime::peak_rss_kib().map(|k| k as f64 / 1024.0) } else { None },
        });
        return runtime::emit(&format!("{report}\n"));
    }
    println!(
        "mask: {} ({}x{}, {} px inside), predicted IoU {:.4}",
        args.output.display(),
        mask.width,
        mask.height,
        mask.area(),
        seg.iou[best]
    );
    if seg.iou.len() > 1 {
        let all: Vec<String> = seg.iou.iter().map(|v| format!("{v:.4}")).collect();
        println!(
            "multimask: kept output {best} of IoU scores [{}]",
            all.join(", ")
        );
    }
    println!(
        "time: encode {encode_ms:.1} ms, decode {decode_ms:.1} ms ({} backend{})",
        loaded.segmenter.backend().name(),
        if loaded.segmenter.backend().name() == "cpu" { format!(", {} threads", args.threads.get()) } else { String::new() }
    );
    if args.stats {
        match runtime::peak_rss_kib() {
            Some(kib) => println!("peak RSS: {:.1} MiB", kib as f64 / 1024.0),
            None => println!("peak RSS: unavailable (no /proc/self/status)"),
        }
        if let Some(line) = loaded.segmenter.backend().memory_line() {
            println!("{line}");
        }
    }
    Ok(())
}

/// The mask and prompts drawn over the image the engine saw, as an RGB PNG.
fn write_overlay(path: &Path, image: &RgbImage, mask: &Mask, prompts: &Prompts) -> Result<()> {
    let layers = overlay::Layers { prediction: mask, truth: None, prompts };
    let picture = overlay::render(image, &layers, &overlay::Style::for_image(image.width, image.height))?;
    image_io::write_rgb(path, &picture)?;
    println!("overlay: {}", path.display());
    Ok(())
}

/// Index of the highest predicted IoU (the first on ties); `None` when empty. NaN never wins.
pub fn best_index(iou: &[f32]) -> Option<usize> {
    let mut best: Option<usize> = None;
    for (i, v) in iou.iter().enumerate() {
        let better = match best {
            None => true,
            Some(b) => *v > iou[b] || iou[b].is_nan() && !v.is_nan(),
        };
        if better {
            best = Some(i);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn best_mask_is_the_highest_iou() {
        assert_eq!(best_index(&[]), None);
        assert_eq!(best_index(&[0.2]), Some(0));
        assert_eq!(best_index(&[0.2, 0.9, 0.9, 0.1]), Some(1));
        assert_eq!(best_index(&[f32::NAN, 0.1]), Some(1));
    }
}
