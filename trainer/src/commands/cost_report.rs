//! `minisam inspect MODEL --cost`: the counted work of one frame (a square frame at the model's
//! input size, one box) through [`CostMeter`] on the CPU, with the achieved rate of that run and,
//! given a machine's peaks, the roofline floor. This is how a GPU's share of its peak is known
//! before it runs, and what the CPU bench divides its times by.

use std::time::Instant;

use anyhow::{Context, Result};
use minisam_models::cost::{Cost, CostMeter};
use minisam_models::cpu::CpuBackend;
use minisam_models::image::RgbImage;
use minisam_models::load::ModelFile;
use minisam_models::prompt::{BoxPrompt, Prompts};
use minisam_models::sam::Segmenter;

use crate::cli::InspectArgs;

/// One part of the frame, counted and timed.
struct Part {
    name: &'static str,
    cost: Cost,
    seconds: f64,
}

/// A smooth test frame: the work does not depend on the pixels, only on the size.
fn frame(size: usize) -> RgbImage {
    let data = (0..size * size).flat_map(|i| {
        let (y, x) = (i / size, i % size);
        let v = ((x + 2 * y) * 255 / (3 * size.max(1))) as u8;
        [v, v, v]
    });
    RgbImage { width: size, height: size, data: data.collect() }
}

/// Counts one encode and one decode of `image` with `prompts` on the CPU backend; returns each
/// part's cost and CPU seconds.
pub fn count_frame(file: &ModelFile, image: &RgbImage, prompts: &Prompts, multimask: bool) -> Result<[(Cost, f64); 2]> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let meter = CostMeter::new(CpuBackend::new(threads)?);
    let segmenter = Segmenter::load(meter, file.store(), file.config()).context("building the networks")?;
    segmenter.backend().take();
    let t0 = Instant::now();
    let emb = segmenter.encode(image)?;
    let encoder = (segmenter.backend().take(), t0.elapsed().as_secs_f64());
    let t1 = Instant::now();
    segmenter.decode(&emb, prompts, multimask)?;
    let decoder = (segmenter.backend().take(), t1.elapsed().as_secs_f64());
    Ok([encoder, decoder])
}

pub fn run(args: &InspectArgs) -> Result<String> {
    let file = ModelFile::open(&args.file).with_context(|| format!("cannot open model {}", args.file.display()))?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let size = file.config().image_size;
    let image = frame(size);
    let prompts = Prompts { boxes: vec![BoxPrompt { x0: size as f32 * 0.25, y0: size as f32 * 0.25, x1: size as f32 * 0.75, y1: size as f32 * 0.75 }], points: vec![] };
    let [(enc, enc_s), (dec, dec_s)] = count_frame(&file, &image, &prompts, true)?;
    let encoder = Part { name: "encoder", cost: enc, seconds: enc_s };
    let decoder = Part { name: "decoder", cost: dec, seconds: dec_s };

    let mut out = format!("cost of one {size}x{size} frame (one box, multimask), counted on the CPU backend with {threads} threads ({}):\n", file.describe());
    out += "| part    |  GEMM GFLOP |  conv GFLOP |  attn GFLOP | total GFLOP | weights MiB | act. M elements | ops  | CPU ms | CPU GFLOP/s |\n";
    out += "|---------|-------------|-------------|-------------|-------------|-------------|-----------------|------|--------|-------------|\n";
    let g = |f: u64| f as f64 / 1e9;
    for p in [&encoder, &decoder] {
        let c = &p.cost;
        out += &format!(
            "| {:<7} | {:>11.3} | {:>11.3} | {:>11.3} | {:>11.3} | {:>11.2} | {:>15.2} | {:>4} | {:>6.1} | {:>11.1} |\n",
            p.name,
            g(c.gemm_flops),
            g(c.conv_flops),
            g(c.attention_flops),
            g(c.flops()),
            c.weight_bytes as f64 / (1 << 20) as f64,
            c.activation_elements as f64 / 1e6,
            c.ops,
            p.seconds * 1e3,
            g(c.flops()) / p.seconds.max(1e-9)
        );
    }
    if let (Some(tflops), Some(gbs)) = (args.peak_tflops, args.peak_gbs) {
        out += &format!("roofline floor at {tflops} TFLOP/s and {gbs} GB/s (activations 2 B, the GPU's bf16 path / 4 B, f32):\n");
        for p in [&encoder, &decoder] {
            let c = &p.cost;
            let floor = |bytes| c.floor_seconds(tflops * 1e12, gbs * 1e9, bytes) * 1e3;
            let intensity = c.flops() as f64 / c.bytes(2).max(1) as f64;
            out += &format!("  {:<7} {:.3} / {:.3} ms ({} bound at 2 B: {intensity:.0} FLOP/byte vs the machine's {:.0})\n", p.name, floor(2), floor(4),
                if intensity > tflops * 1e3 / gbs { "compute" } else { "memory" }, tflops * 1e3 / gbs);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// The tiny SAM fixture through `inspect --cost`: both parts counted, the floor printed, and
    /// the encoder's FLOPs equal to what the meter counts for the same frame directly.
    #[test]
    fn inspect_cost_counts_both_parts_and_prints_the_floor() {
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny_sam/tiny_sam.pth");
        let args = InspectArgs { file: file.clone(), json: false, cost: true, peak_tflops: Some(989.0), peak_gbs: Some(4800.0) };
        let text = run(&args).unwrap();
        assert!(text.contains("| encoder |") && text.contains("| decoder |"), "{text}");
        assert!(text.contains("roofline floor at 989 TFLOP/s and 4800 GB/s"), "{text}");
        let model = ModelFile::open(&file).unwrap();
        let size = model.config().image_size;
        let prompts = Prompts { boxes: vec![BoxPrompt { x0: 1.0, y0: 1.0, x1: size as f32 - 2.0, y1: size as f32 - 2.0 }], points: vec![] };
        let [(enc, _), (dec, _)] = count_frame(&model, &frame(size), &prompts, true).unwrap();
        assert!(enc.gemm_flops > 0 && enc.attention_flops > 0 && dec.flops() > 0 && enc.weight_bytes > 0);
        assert!(text.contains(&format!("{:>11.3} |", enc.flops() as f64 / 1e9)), "{text}");
    }
}
