//! tract vs our CPU engine on the same model, same input, same thread count, same run: the
//! ONNX exports run by tract (f32), the weights mapped out of those exports run by our engine in
//! f32, and the same weights packed to NF4 (what ships). Prints one markdown table; copy it into
//! benches/RESULTS.md with date, machine and commit.
//!
//! ```text
//! cargo bench -p minisam --features onnx --bench onnx_vs_engine
//! MINISAM_BENCH_THREADS=2 MINISAM_BENCH_RUNS=5 cargo bench -p minisam --features onnx --bench onnx_vs_engine
//! ```
//!
//! Model: LiteMedSAM's exports under target/onnx-fixtures/litemedsam (made by
//! tests/fixtures/gen_onnx_fixtures.py; .ci/run makes them when torch is installed), else the
//! committed tiny SAM exports (which then say little about speed).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use minisam::onnx::{self, check};
use minisam_models::cpu::CpuBackend;
use minisam_models::format::{self, PackedModel, Provenance};
use minisam_models::pipeline::Geometry;
use minisam_models::prompt::Prompts;
use minisam_models::sam::Segmenter;
use minisam_models::store::WeightStore;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Median wall time of `runs` calls after one warm-up, in ms.
fn time(runs: usize, mut f: impl FnMut()) -> f64 {
    f();
    median(
        (0..runs)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect(),
    )
}

fn engine_times(name: &str, segmenter: &Segmenter<CpuBackend>, inputs: &check::CheckInputs, runs: usize) -> (String, f64, f64) {
    let s = segmenter.config().image_size;
    let geometry = Geometry::new(s, s, s);
    let prompts = Prompts::with_box(inputs.prompt);
    let encode = time(runs, || {
        segmenter.encode_preprocessed(&inputs.image, geometry).expect("encode");
    });
    let emb = segmenter.encode_preprocessed(&inputs.image, geometry).expect("encode");
    let decode = time(runs, || {
        segmenter.decode(&emb, &prompts, false).expect("decode");
    });
    (name.to_string(), encode, decode)
}

fn main() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let lite = repo.join("target/onnx-fixtures/litemedsam");
    let (model, files): (&str, Vec<PathBuf>) = if lite.join("encoder.onnx").exists() && lite.join("decoder.onnx").exists() {
        ("LiteMedSAM@256", vec![lite.join("encoder.onnx"), lite.join("decoder.onnx")])
    } else {
        eprintln!("NOTE: {} absent, timing the tiny SAM instead (python3 tests/fixtures/gen_onnx_fixtures.py --help)", lite.display());
        let tiny = repo.join("tests/fixtures/tiny_sam_onnx");
        ("tiny SAM@128", vec![tiny.join("encoder.onnx"), tiny.join("decoder.onnx")])
    };
    let threads = env_usize("MINISAM_BENCH_THREADS", std::thread::available_parallelism().map_or(1, |n| n.get()));
    let runs = env_usize("MINISAM_BENCH_RUNS", 3).max(1);

    let imported = onnx::import(&files).expect("mapping the exports");
    let config = imported.checkpoint.config().clone();
    let inputs = check::CheckInputs::synthetic(config.image_size);
    let (s, d, e) = (config.image_size, config.prompt_embed_dim, config.embedding_size);

    // tract: encoder and decoder graphs, optimised for these shapes.
    check::set_tract_threads(threads);
    let shapes = |name: &str| -> Option<Vec<usize>> {
        Some(match name {
            "image_embeddings" => vec![1, d, e, e],
            "point_coords" => vec![1, 2, 2],
            "point_labels" => vec![1, 2],
            "mask_input" => vec![1, 1, 4 * e, 4 * e],
            "has_mask_input" => vec![1],
            "orig_im_size" => vec![2],
            _ => vec![1, 3, s, s],
        })
    };
    let t = Instant::now();
    let encoder = check::TractGraph::load(&files[0], &shapes).expect("tract loads the encoder");
    let decoder = check::TractGraph::load(&files[1], &shapes).expect("tract loads the decoder");
    let tract_load_ms = t.elapsed().as_secs_f64() * 1e3;
    let mut feed: HashMap<&str, check::HostTensor> = HashMap::new();
    feed.insert(encoder.inputs[0].as_str(), (vec![1, 3, s, s], inputs.image.clone()));
    let tract_encode = time(runs, || {
        encoder.run(&feed).expect("tract encoder");
    });
    let embedding = encoder.run(&feed).expect("tract encoder").into_values().next().expect("one output");
    let p = inputs.prompt;
    let mut dfeed: HashMap<&str, check::HostTensor> = HashMap::new();
    dfeed.insert("image_embeddings", embedding);
    dfeed.insert("point_coords", (vec![1, 2, 2], vec![p.x0, p.y0, p.x1, p.y1]));
    dfeed.insert("point_labels", (vec![1, 2], vec![2.0, 3.0]));
    dfeed.insert("mask_input", (vec![1, 1, 4 * e, 4 * e], vec![0.0; 16 * e * e]));
    dfeed.insert("has_mask_input", (vec![1], vec![0.0]));
    dfeed.insert("orig_im_size", (vec![2], vec![s as f32, s as f32]));
    let tract_decode = time(runs, || {
        decoder.run(&dfeed).expect("tract decoder");
    });

    let mut rows = vec![("tract 0.23 (the ONNX exports, f32)".to_string(), tract_encode, tract_decode)];
    let f32_engine = Segmenter::load(CpuBackend::new(threads).expect("threads"), &imported.checkpoint, &config).expect("our networks");
    rows.push(engine_times("ours, CPU backend, f32 (mapped from the ONNX)", &f32_engine, &inputs, runs));
    drop(f32_engine);
    let packed_path = std::env::temp_dir().join(format!("minisam-onnx-bench-{}.msam", std::process::id()));
    let provenance = Provenance::new(imported.source_file.clone(), imported.source_sha256.clone());
    format::pack(&imported.checkpoint, &config, provenance, &[], &packed_path).expect("pack");
    let packed = PackedModel::open(&packed_path).expect("packed model");
    let nf4 = Segmenter::load(CpuBackend::new(threads).expect("threads"), &packed as &dyn WeightStore, packed.config()).expect("our networks");
    rows.push(engine_times("ours, CPU backend, NF4 (packed from the ONNX)", &nf4, &inputs, runs));
    let _ = std::fs::remove_file(&packed_path);

    println!("model: {model}; threads: {threads}; runs: {runs} (median after one warm-up); tract load+optimise {tract_load_ms:.0} ms");
    println!();
    println!("| runtime | encode ms | decode ms |");
    println!("|---|---|---|");
    for (name, enc, dec) in rows {
        println!("| {name} | {enc:.1} | {dec:.1} |");
    }
}
