//! Training cost of LoRA against full fine-tuning of the same image encoder, same machine, same
//! run: trainable parameters, optimizer state, seconds per step (forward + backward of one
//! example + AdamW update) and peak RSS. Each mode runs in its own child process (this binary
//! again), so each peak RSS is that mode's alone. Prints one markdown table; copy it into
//! benches/RESULTS.md with date, machine and commit.
//!
//! ```text
//! cargo bench -p minisam --bench train_cost
//! MINISAM_BENCH_MODEL=path.msam MINISAM_BENCH_STEPS=3 MINISAM_BENCH_THREADS=2 cargo bench -p minisam --bench train_cost
//! ```
//!
//! Model: the bundled LiteMedSAM (NF4 decoder, fp16 TinyViT encoder). Input: a synthetic 256×256
//! frame with a bright disc and its box (the cost does not depend on the pixels).

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use minisam::train::optim::AdamW;
use minisam_models::adapter::{self, LinearShape, LoraFactors};
use minisam_models::autograd::{attach_lora, SamModel, TapeBackend};
use minisam_models::backend::Backend;
use minisam_models::load::ModelFile;
use minisam_models::pipeline::{self, Geometry};
use minisam_models::prompt::{BoxPrompt, Prompts};

const ENCODER: &str = "image_encoder.";

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn model_path() -> PathBuf {
    std::env::var_os("MINISAM_BENCH_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/litemedsam-nf4.msam"))
}

/// Peak resident set of this process, from /proc (Linux), in MiB.
fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(f64::NAN);
    kib / 1024.0
}

/// One mode, in this process: prints `params optimizer_floats step_ms peak_rss_mib`.
fn run_mode(mode: &str) {
    let threads = env_usize("MINISAM_BENCH_THREADS", std::thread::available_parallelism().map_or(2, |n| n.get()));
    let steps = env_usize("MINISAM_BENCH_STEPS", 3);
    let file = ModelFile::open(&model_path()).expect("open the model");
    let tape = match mode {
        // Every stored tensor of the encoder becomes an f32 parameter (dense fine-tuning).
        "full" => TapeBackend::new(threads, Box::new(|name: &str| name.starts_with(ENCODER))).expect("backend"),
        _ => TapeBackend::for_lora(threads).expect("backend"),
    };
    let mut model = SamModel::load(&tape, file.store(), file.config()).expect("load");
    if mode == "lora" {
        let rank = 8;
        let shapes = model.linear_shapes();
        let layers: Vec<LinearShape> = adapter::select_targets(&shapes, &adapter::default_targets()).into_iter().cloned().collect();
        let factors: Vec<LoraFactors> = layers
            .iter()
            .map(|l| LoraFactors {
                name: l.name.clone(),
                in_features: l.in_features,
                out_features: l.out_features,
                a: vec![0.01; rank * l.in_features],
                b: vec![0.0; l.out_features * rank],
            })
            .collect();
        attach_lora(&tape, &mut model, &factors, rank, 2.0 * rank as f32).expect("attach");
    }
    let params: usize = tape.parameters().iter().map(|p| p.numel()).sum();

    let s = model.config.image_size;
    let kind = model.config.preprocess;
    let (w, h) = (256usize, 256usize);
    let grey: Vec<u8> = (0..w * h)
        .map(|p| if ((p % w) as f32 - 128.0).hypot((p / w) as f32 - 120.0) < 40.0 { 200 } else { 60 })
        .collect();
    let image = minisam_models::image::RgbImage::from_grey(w, h, &grey).expect("image");
    let geometry = Geometry::new(h, w, s);
    let prompts = Prompts::with_box(BoxPrompt { x0: 88.0, y0: 80.0, x1: 168.0, y1: 160.0 });
    let input = pipeline::preprocess(kind, &image, &geometry).expect("preprocess");
    let mut optimizer = AdamW::new(1e-4, 0.01);
    let mut times = Vec::new();
    for step in 0..=steps {
        let t0 = Instant::now();
        tape.reset();
        tape.zero_grads();
        let x = tape.from_host(&[1, 3, s, s], &input).expect("input");
        let emb = model.encode(&tape, &x).expect("encode");
        let logits = model
            .decode(&tape, &emb, &pipeline::transform_prompts(kind, &prompts, &geometry), false)
            .expect("decode");
        let n = tape.to_host(&logits).expect("logits").len();
        // Any seed exercises the same backward; the loss's own cost is negligible.
        tape.backward(&logits, &vec![1.0 / n as f32; n]).expect("backward");
        optimizer.step(&tape, 1e-4);
        // Step 0 is a warm-up (first touches of the mapped file, thread pools).
        if step > 0 {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    times.sort_by(f64::total_cmp);
    // AdamW keeps two f32 moments per parameter.
    println!("{params} {} {:.0} {:.0}", 2 * params, times[times.len() / 2], peak_rss_mib());
}

fn main() {
    if let Ok(mode) = std::env::var("MINISAM_TRAIN_COST_MODE") {
        run_mode(&mode);
        return;
    }
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let path = model_path();
    if !path.exists() {
        println!("SKIP: no model at {}", path.display());
        return;
    }
    let me = std::env::current_exe().expect("own path");
    println!("| mode | trainable params | AdamW state (f32 values) | step ms (median) | peak RSS MiB |");
    println!("|---|---|---|---|---|");
    for (mode, label) in [("lora", "LoRA r8 on encoder attention qkv+proj (NF4/fp16 base frozen)"), ("full", "full fine-tuning of the image encoder (f32 copy)")] {
        let out = Command::new(&me).env("MINISAM_TRAIN_COST_MODE", mode).output().expect("run a mode");
        let text = String::from_utf8_lossy(&out.stdout);
        let fields: Vec<&str> = text.split_whitespace().collect();
        if !out.status.success() || fields.len() != 4 {
            println!("| {label} | failed: {} | | | |", String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or(""));
            continue;
        }
        println!("| {label} | {} | {} | {} | {} |", fields[0], fields[1], fields[2], fields[3]);
    }
}
