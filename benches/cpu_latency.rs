//! CPU latency of the engine on the three model families, with the PyTorch reference measured in
//! the same run when Python + torch + segment-anything are installed (else the table says the
//! peer is missing). Prints one table; copy it into benches/RESULTS.md with date, machine, commit.
//!
//! ```text
//! cargo bench -p minisam --bench cpu_latency            # all models available
//! MINISAM_BENCH_THREADS=2 MINISAM_BENCH_RUNS=5 cargo bench -p minisam --bench cpu_latency
//! ```
//!
//! Models: the bundled NF4 LiteMedSAM@256 (and its f32 source and MobileSAM@1024 from ../shared
//! when present), and SAM ViT-B@1024 with random weights in the official layout, packed to NF4
//! here (latency does not depend on weight values).

use std::path::{Path, PathBuf};
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

/// Packs as `minisam pack` does by default (the architecture's default fp16 list included).
fn pack_to(store: &dyn WeightStore, config: &ModelConfig, source: &str, out: &Path) {
    format::pack(store, config, Provenance::new(source, "random weights"), &format::default_keep_fp16(config), out).expect("pack");
}

/// Runs benches/peer_torch.py when torch and segment-anything import; returns its table lines.
fn torch_peer(threads: usize, runs: usize) -> Result<String, String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../benches/peer_torch.py");
    let out = std::process::Command::new("python3")
        .arg(&script)
        .args(["--threads", &threads.to_string(), "--runs", &runs.to_string()])
        .output()
        .map_err(|e| format!("python3 not runnable: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("peer failed").to_string())
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

    let lite = shared.join("lite_medsam.pth");
    if wanted("LiteMedSAM") {
        rows.push(open_and_measure("LiteMedSAM@256", "packed (bundled)", &root.join("models/litemedsam-nf4.msam"), threads, runs));
    }
    if !wanted("LiteMedSAM") {
    } else if lite.is_file() {
        rows.push(open_and_measure("LiteMedSAM@256", "f32 checkpoint", &lite, threads, runs));
    } else {
        println!("(no {}: LiteMedSAM f32 row skipped)", lite.display());
    }
    let mobile = shared.join("mobile_sam.pt");
    if !wanted("MobileSAM") {
    } else if mobile.is_file() {
        let ckpt = Checkpoint::open(&mobile).expect("MobileSAM checkpoint");
        let packed = tmp.join("mobilesam-nf4.msam");
        pack_to(&ckpt, ckpt.config(), "mobile_sam.pt", &packed);
        rows.push(open_and_measure("MobileSAM@1024", "packed (pack default)", &packed, threads, runs));
        rows.push(measure("MobileSAM@1024", "f32 checkpoint", &mobile, &ckpt, ckpt.config(), threads, runs));
    } else {
        println!("(no {}: MobileSAM rows skipped)", mobile.display());
    }
    if wanted("SAM ViT-B") {
        let vit_b = Checkpoint::from_tensors(synth::random_sam_vit(&VitConfig::sam_b(), 1024, 1)).expect("ViT-B layout");
        let packed = tmp.join("vit-b-random-nf4.msam");
        pack_to(&vit_b, vit_b.config(), "random ViT-B", &packed);
        drop(vit_b);
        rows.push(open_and_measure("SAM ViT-B@1024 (random)", "packed (pack default)", &packed, threads, runs.min(3)));
    }
    let _ = std::fs::remove_dir_all(&tmp);

    println!("\nQLoRA-MiniSAM CPU backend, {threads} threads, median of {runs} encodes / {} decodes", runs * 4);
    println!("| model | weights | file MiB | encode ms | decode ms | peak RSS MiB (process, cumulative) |");
    println!("|---|---|---|---|---|---|");
    for r in &rows {
        println!("| {} | {} | {:.2} | {:.1} | {:.1} | {:.0} |", r.model, r.weights, r.file_mib, r.encode_ms, r.decode_ms, r.peak_rss_mib);
    }
    if std::env::var("MINISAM_BENCH_PEERS").is_ok_and(|v| v == "0") {
        println!("\nPeers: skipped (MINISAM_BENCH_PEERS=0)");
        return;
    }
    match torch_peer(threads, runs) {
        Ok(table) => println!("\nPyTorch peer, same threads, same run:\n{table}"),
        Err(why) => println!("\nPyTorch peer: missing ({why})"),
    }
    let _: PathBuf = tmp;
}
