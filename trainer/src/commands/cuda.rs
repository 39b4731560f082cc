//! The CUDA subcommands and the backend choice shared by `segment` and `eval`:
//! - `cuda-compile`: every `kernels/*.cu` through NVRTC for the given architectures, exactly as
//!   the backend compiles them at start-up (fills the PTX cache; CI runs it without a GPU);
//! - `cuda-check`: per-kernel and end-to-end parity of the CUDA backend with the CPU reference;
//! - `cuda-bench`: encode / decode / end-to-end latency and peak VRAM on the GPU; with
//!   `--kernels`, a per-kernel profile of one frame per model.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use minisam_models::backend::Backend;
use minisam_models::cpu::CpuBackend;
use minisam_models::cuda::{self, check, compile, CudaBackend, CudaOptions, KernelProfile, MmaPrecision, SelectedBackend};
use minisam_models::image::RgbImage;
use minisam_models::load::ModelFile;
use minisam_models::prompt::{BoxPrompt, Prompts};
use minisam_models::sam::Segmenter;

use crate::cli::{BackendArgs, CudaBenchArgs, CudaCheckArgs, CudaCompileArgs};
use crate::frozen::FrozenBackend;
#[cfg(test)]
use crate::cli::CudaRunArgs;

/// What the commands need from a backend beyond the trait: waiting for queued work (GPU timings
/// are meaningless without it) and a memory line for `--stats`.
pub trait BackendExtras: Backend {
    fn sync(&self) -> minisam_models::Result<()> {
        Ok(())
    }
    fn memory_line(&self) -> Option<String> {
        None
    }
}

impl BackendExtras for CpuBackend {}

impl BackendExtras for CudaBackend {
    fn sync(&self) -> minisam_models::Result<()> {
        self.synchronize()
    }
    fn memory_line(&self) -> Option<String> {
        Some(self.vram_report().to_string())
    }
}

impl BackendArgs {
    pub fn cuda_options(&self) -> Result<CudaOptions> {
        Ok(CudaOptions { vram_budget: self.vram_budget, precision: MmaPrecision::parse(&self.cuda_precision)?, ..CudaOptions::default() })
    }

    /// Where a training job's frozen model (encoder or teacher) runs.
    pub fn frozen(&self) -> Result<FrozenBackend> {
        Ok(FrozenBackend { choice: self.backend, cuda: self.cuda_options()? })
    }

    /// The backend asked for (`auto` falls back to the CPU with one line on stderr).
    pub fn select(&self, threads: usize) -> Result<SelectedBackend> {
        let selected = cuda::select_backend(self.backend, threads, self.cuda_options()?)?;
        if let SelectedBackend::Cuda(b) = &selected {
            eprintln!("backend: {}", b.describe());
        }
        Ok(selected)
    }
}

pub fn compile(args: &CudaCompileArgs) -> Result<()> {
    let precision = MmaPrecision::parse(&args.precision)?;
    if !compile::nvrtc_available() {
        bail!("NVRTC (libnvrtc.so.12) cannot be loaded: pip install nvidia-cuda-nvrtc-cu12 and put its lib/ on LD_LIBRARY_PATH (see .ci/cuda-ptx.sh)");
    }
    println!("NVRTC {}", compile::nvrtc_version().unwrap_or_else(|| "version unknown".into()));
    match compile::cache_dir() {
        Some(d) => println!("kernel cache (CUBIN + PTX): {}", d.display()),
        None => println!("kernel cache: none (set MINISAM_PTX_CACHE or XDG_CACHE_HOME)"),
    }
    let mut any_report = false;
    let mut unexpected: Vec<String> = Vec::new();
    let mut known_seen: Vec<&str> = Vec::new();
    for arch in &args.arch {
        let arch = compile::parse_arch(arch)?;
        let reports = compile::compile_all(arch, precision, !args.no_report).with_context(|| format!("compiling for sm_{arch}"))?;
        for r in &reports {
            println!("sm_{arch} {:<12} ok: {} kernels, {} bytes of PTX, {} bytes of CUBIN", r.name, r.entries, r.ptx_bytes, r.cubin_bytes);
            for k in &r.resources {
                any_report = true;
                let f = |v: Option<u32>| v.map_or("?".to_string(), |v| v.to_string());
                println!(
                    "    {:<22} {:>4} registers, {:>6} B smem, stack {:>4} B, spill stores {:>4} B, spill loads {:>4} B",
                    k.kernel,
                    f(k.registers),
                    f(k.shared_bytes),
                    f(k.stack_bytes),
                    f(k.spill_stores),
                    f(k.spill_loads)
                );
                if let Some(problem) = k.local_memory_problem() {
                    match args.known_local_memory.iter().find(|n| **n == k.kernel) {
                        Some(known) => known_seen.push(known),
                        None => unexpected.push(format!("sm_{arch} {problem}")),
                    }
                }
            }
            for line in r.log.lines().filter(|l| l.contains("warning")) {
                println!("    {line}");
            }
        }
    }
    if !any_report && !args.no_report {
        println!("(NVRTC printed no ptxas resource report for the real-architecture compile; no ptxas binary is used, so register/spill figures are unavailable here)");
    }
    if args.deny_local_memory {
        if !any_report {
            bail!("--deny-local-memory needs ptxas's report, and none was produced");
        }
        let now_clean: Vec<&String> = args.known_local_memory.iter().filter(|n| !known_seen.contains(&n.as_str())).collect();
        if !unexpected.is_empty() || !now_clean.is_empty() {
            let mut msg = String::new();
            for u in &unexpected {
                msg.push_str(&format!("\n  local memory in a kernel that must have none: {u}"));
            }
            for c in &now_clean {
                msg.push_str(&format!("\n  {c} is listed as using local memory but is clean (or gone) now: remove it from --known-local-memory"));
            }
            bail!("kernel resource check failed:{msg}");
        }
        let mut known: Vec<&str> = known_seen.clone();
        known.sort_unstable();
        known.dedup();
        println!("local memory: none outside the known kernels ({})", if known.is_empty() { "none".to_string() } else { known.join(", ") });
    }
    Ok(())
}

/// The models a check or bench runs on: the given files, and a random ViT-B when asked.
enum ModelSpec {
    File(PathBuf),
    RandomVitB,
}

impl ModelSpec {
    fn label(&self) -> String {
        match self {
            Self::File(p) => p.display().to_string(),
            Self::RandomVitB => "random SAM ViT-B@1024 (NF4)".into(),
        }
    }
}

/// Opens a model file, or builds a random ViT-B and packs it to NF4 in a temporary file.
fn open_model(spec: &ModelSpec) -> Result<ModelFile> {
    match spec {
        ModelSpec::File(p) => ModelFile::open(p).with_context(|| format!("opening {}", p.display())),
        ModelSpec::RandomVitB => {
            use minisam_models::config::VitConfig;
            use minisam_models::format::{writer, Provenance};
            use minisam_models::import::{synth, Checkpoint};
            let tensors = synth::random_sam_vit(&VitConfig::sam_b(), 1024, 7);
            let ckpt = Checkpoint::from_tensors(tensors)?;
            let path = std::env::temp_dir().join(format!("minisam-random-vit-b-{}.msam", std::process::id()));
            writer::pack(&ckpt, ckpt.config(), Provenance::new("random-vit-b (seed 7)", ckpt.sha256()), &[], &path)?;
            let file = ModelFile::open(&path);
            // The mapping keeps the data alive on Linux after the unlink.
            let _ = std::fs::remove_file(&path);
            Ok(file?)
        }
    }
}

fn specs(models: &[PathBuf], random_vit_b: bool) -> Vec<ModelSpec> {
    let mut v: Vec<ModelSpec> = models.iter().cloned().map(ModelSpec::File).collect();
    if random_vit_b {
        v.push(ModelSpec::RandomVitB);
    }
    v
}

fn read_image(path: &Option<PathBuf>) -> Result<RgbImage> {
    let p = match path {
        Some(p) => p.clone(),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/samples/us-hc18-000_HC.png"),
    };
    crate::image_io::read_rgb(&p).with_context(|| format!("reading {}", p.display()))
}

fn default_box(image: &RgbImage, b: Option<BoxPrompt>) -> BoxPrompt {
    b.unwrap_or(BoxPrompt {
        x0: image.width as f32 * 0.3,
        y0: image.height as f32 * 0.3,
        x1: image.width as f32 * 0.7,
        y1: image.height as f32 * 0.7,
    })
}

fn cuda_backend(args_budget: u64, precision: &str, poison: bool) -> Result<CudaBackend> {
    cuda_backend_with(args_budget, precision, poison, true)
}

fn cuda_backend_with(args_budget: u64, precision: &str, poison: bool, graphs: bool) -> Result<CudaBackend> {
    let opts = CudaOptions { vram_budget: args_budget, precision: MmaPrecision::parse(precision)?, poison, graphs, ..CudaOptions::default() };
    CudaBackend::new(opts).map_err(|e| anyhow::anyhow!("{e}"))
}

/// Embedding relative error allowed end to end, per precision (errors compound over 12 ViT
/// blocks; the mask IoU bound is what matters to users).
fn e2e_embedding_tolerance(precision: &str) -> f64 {
    match precision {
        "f32" => 1e-3,
        "f16" | "fp16" => 2e-2,
        _ => 5e-2,
    }
}

pub fn check(args: &CudaCheckArgs) -> Result<()> {
    let cuda = match cuda_backend(args.run.vram_budget, &args.run.precision, true) {
        Ok(b) => b,
        Err(e) => {
            println!("SKIP: no usable CUDA GPU ({e}); nothing checked");
            if args.require_gpu {
                bail!("--require-gpu: {e}");
            }
            return Ok(());
        }
    };
    println!("{}", cuda.describe());
    let cpu = CpuBackend::new(0)?;
    let mut failures = 0;
    if !args.skip_kernels {
        let seed = args.seed.unwrap_or_else(check::fresh_seed);
        println!("== kernels (seed {seed}; outputs poisoned with NaN before each run)");
        for r in check::kernel_checks(&cpu, &cuda, seed) {
            println!("{r}");
            failures += !r.passed() as usize;
        }
    }
    drop(cuda);
    let image = read_image(&args.run.image)?;
    let prompts = Prompts::with_box(default_box(&image, args.run.r#box));
    let tol = e2e_embedding_tolerance(&args.run.precision);
    for spec in specs(&args.run.model, args.run.random_vit_b) {
        println!("== end to end: {}", spec.label());
        let file = open_model(&spec)?;
        let cpu_seg = Segmenter::load(CpuBackend::new(0)?, file.store(), file.config())?;
        let gpu = cuda_backend(args.run.vram_budget, &args.run.precision, false)?;
        let gpu_seg = Segmenter::load(gpu, file.store(), file.config())?;
        let p = check::e2e_parity(&cpu_seg, &gpu_seg, &image, &prompts)?;
        let ok = p.embedding_rel_error <= tol && p.min_mask_iou >= 0.99;
        failures += !ok as usize;
        println!(
            "{} embedding rel err {:.2e} (tol {tol:.0e}), low-res logits rel err {:.2e}, min mask IoU {:.4} (need >= 0.99); {}",
            if ok { "ok  " } else { "FAIL" },
            p.embedding_rel_error,
            p.low_res_rel_error,
            p.min_mask_iou,
            gpu_seg.backend().vram_report()
        );
        // The encoder's CUDA graph: frames of different images replayed from it must equal the
        // same frames run kernel by kernel (same kernels, so to rounding: 1e-6).
        let eager_seg = Segmenter::load(cuda_backend_with(args.run.vram_budget, &args.run.precision, false, false)?, file.store(), file.config())?;
        let worst = check::graph_replay(&gpu_seg, &eager_seg, &[image.clone(), check::mirrored(&image)])?;
        let status = gpu_seg.backend().graph_status();
        let ok = worst <= 1e-6 && status.contains("captured");
        failures += !ok as usize;
        println!("{} graph replay vs eager: max embedding rel err {worst:.2e} over 4 frames (tol 1e-6); {status}", if ok { "ok  " } else { "FAIL" });
        // The arena sized to what those frames needed (as minisamd does after its warm-up), then
        // the same frame again on the smaller arena, its graph captured anew.
        let (before, after) = gpu_seg.backend().fit_arena(0)?;
        let p = check::e2e_parity(&cpu_seg, &gpu_seg, &image, &prompts)?;
        let ok = p.embedding_rel_error <= tol && p.min_mask_iou >= 0.99 && after <= before;
        failures += !ok as usize;
        println!(
            "{} arena fitted {:.1} -> {:.1} MiB, then embedding rel err {:.2e}, min mask IoU {:.4}; {}; {}",
            if ok { "ok  " } else { "FAIL" },
            before as f64 / (1024.0 * 1024.0),
            after as f64 / (1024.0 * 1024.0),
            p.embedding_rel_error,
            p.min_mask_iou,
            gpu_seg.backend().vram_report(),
            gpu_seg.backend().graph_status()
        );
    }
    if failures > 0 {
        bail!("{failures} CUDA check(s) failed");
    }
    println!("all CUDA checks passed");
    Ok(())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

pub fn bench(args: &CudaBenchArgs) -> Result<()> {
    let image = read_image(&args.run.image)?;
    let prompts = Prompts::with_box(default_box(&image, args.run.r#box));
    println!("| model | backend | encode ms | decode ms | end-to-end ms | peak VRAM MiB | runs | encoder GFLOP | encoder TFLOP/s | of peak |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    // The encoder's work, counted once per model on the CPU (crate::commands::cost_report), so
    // each row says what share of the device's peak it reached.
    let mut counted: Vec<(String, u64)> = Vec::new();
    // Per-kernel tables (`--kernels`), printed after the latency table, and the profiles that
    // failed (the latency rows are printed all the same).
    let (mut kernel_tables, mut failed_profiles) = (Vec::new(), 0);
    // Each model twice: encoder frames replayed from a CUDA graph, and launched kernel by kernel.
    for (spec, graphs) in specs(&args.run.model, args.run.random_vit_b).iter().flat_map(|s| [(s, true), (s, false)]) {
        let file = open_model(spec)?;
        let gpu = match cuda_backend_with(args.run.vram_budget, &args.run.precision, false, graphs) {
            Ok(b) => b,
            Err(e) => bail!("no usable CUDA GPU: {e}"),
        };
        let label = format!("cuda {}{}", gpu.precision().name(), if graphs { " graph" } else { " eager" });
        let seg = Segmenter::load(gpu, file.store(), file.config())?;
        let (mut enc, mut dec, mut e2e) = (Vec::new(), Vec::new(), Vec::new());
        for run in 0..args.warmup + args.runs {
            let t0 = Instant::now();
            let emb = seg.encode(&image)?;
            seg.backend().sync()?;
            let t1 = Instant::now();
            let out = seg.decode(&emb, &prompts, false)?;
            let t2 = Instant::now();
            if out.masks.is_empty() {
                bail!("the decoder returned no mask");
            }
            if run >= args.warmup {
                enc.push((t1 - t0).as_secs_f64() * 1e3);
                dec.push((t2 - t1).as_secs_f64() * 1e3);
                e2e.push((t2 - t0).as_secs_f64() * 1e3);
            }
        }
        let report = seg.backend().vram_report();
        let flops = match counted.iter().find(|(l, _)| *l == spec.label()) {
            Some((_, f)) => *f,
            None => {
                let [(enc_cost, _), _] = super::cost_report::count_frame(&file, &image, &prompts, false)?;
                counted.push((spec.label(), enc_cost.flops()));
                enc_cost.flops()
            }
        };
        let enc_ms = median(&mut enc);
        let tflops = flops as f64 / (enc_ms * 1e-3) / 1e12;
        let share = args.peak_tflops.map_or("-".to_string(), |p| format!("{:.1} %", 100.0 * tflops / p));
        println!(
            "| {} | {label} | {enc_ms:.2} | {:.2} | {:.2} | {:.1} | {} | {:.2} | {tflops:.2} | {share} |",
            spec.label(),
            median(&mut dec),
            median(&mut e2e),
            report.peak_used() as f64 / (1024.0 * 1024.0),
            args.runs,
            flops as f64 / 1e9
        );
        // Once per model (profiles run kernel by kernel, so the graph run's backend serves).
        if args.kernels && graphs {
            let title = format!("### kernels of one frame: {} (cuda {}, kernel by kernel, encoder + decoder)", spec.label(), seg.backend().precision().name());
            match profile_frame(&seg, &image, &prompts) {
                Ok(profile) => kernel_tables.push(format!("{title}\n\n{}", profile.markdown(args.peak_tflops, args.peak_gbs))),
                Err(e) => {
                    failed_profiles += 1;
                    kernel_tables.push(format!("{title}\n\nprofile failed: {e}\n"));
                }
            }
        }
    }
    for table in &kernel_tables {
        println!("\n{table}");
    }
    if failed_profiles > 0 {
        bail!("{failed_profiles} kernel profile(s) failed");
    }
    Ok(())
}

/// One frame (encode, then decode the prompts) with every launch timed and its work counted.
fn profile_frame(seg: &Segmenter<CudaBackend>, image: &RgbImage, prompts: &Prompts) -> minisam_models::Result<KernelProfile> {
    let ((), profile) = seg.backend().profile_kernels(|| {
        let emb = seg.encode(image)?;
        seg.decode(&emb, prompts, false).map(drop)
    })?;
    Ok(profile)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    fn segment_args(backend: &str, out: &Path) -> crate::cli::SegmentArgs {
        let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/samples/us-hc18-000_HC.png");
        let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/litemedsam-nf4.msam");
        let argv = [
            "minisam",
            "segment",
            sample.to_str().unwrap(),
            "--box",
            "330,288,489,467",
            "--model",
            model.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--backend",
            backend,
            "--vram-budget",
            "512MiB",
        ];
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Segment(a) => a,
            _ => unreachable!("parsed segment"),
        }
    }

    /// `--backend cuda` without a usable GPU fails with the reason; `--backend auto` falls back
    /// to the CPU and segments. (On a GPU machine both take the GPU: checked by run.sh.)
    #[test]
    fn cuda_backend_flag_refuses_without_gpu_and_auto_falls_back() {
        if let Ok(b) = cuda_backend(1 << 30, "bf16", false) {
            eprintln!("SKIP: a usable GPU is present ({}): the no-GPU behaviour cannot be observed here", b.describe());
            return;
        }
        let out = std::env::temp_dir().join(format!("minisam-test-{}-backend-mask.png", std::process::id()));
        let err = format!("{:#}", crate::commands::segment::run(&segment_args("cuda", &out)).unwrap_err());
        assert!(err.contains("--backend cuda:"), "{err}");
        assert!(err.contains("CUDA") || err.contains("NVRTC") || err.contains("libcuda"), "no reason given: {err}");
        assert!(!out.exists(), "a refused run must not write a mask");
        crate::commands::segment::run(&segment_args("auto", &out)).unwrap();
        assert!(std::fs::metadata(&out).unwrap().len() > 0);
        std::fs::remove_file(&out).unwrap();
    }

    #[test]
    fn cuda_backend_flags_parse_strictly() {
        let parse = |extra: &[&str]| {
            let mut v = vec!["minisam", "segment", "x.png", "--box", "1,1,2,2", "-o", "m.png"];
            v.extend_from_slice(extra);
            Cli::try_parse_from(v)
        };
        let Command::Segment(a) = parse(&[]).unwrap().command else { unreachable!() };
        assert_eq!((a.backend.backend, a.backend.vram_budget), (cuda::BackendChoice::Auto, 1 << 30));
        let Command::Segment(a) = parse(&["--backend", "cpu", "--vram-budget", "256MiB"]).unwrap().command else { unreachable!() };
        assert_eq!((a.backend.backend, a.backend.vram_budget), (cuda::BackendChoice::Cpu, 256 << 20));
        assert!(parse(&["--backend", "gpu"]).is_err());
        assert!(parse(&["--vram-budget", "0"]).is_err());
        assert!(parse(&["--vram-budget", "lots"]).is_err());
    }

    #[test]
    fn cuda_bench_kernel_profile_flags() {
        let parse = |extra: &[&str]| Cli::try_parse_from(["minisam", "cuda-bench"].iter().chain(extra));
        let Command::CudaBench(a) = parse(&["--kernels", "--peak-tflops", "989", "--peak-gbs", "4800"]).unwrap().command else { unreachable!() };
        assert_eq!((a.kernels, a.peak_tflops, a.peak_gbs), (true, Some(989.0), Some(4800.0)));
        let Command::CudaBench(a) = parse(&[]).unwrap().command else { unreachable!() };
        assert!(!a.kernels, "the profile is opt-in");
        // A bandwidth peak only has the kernel table to go into.
        assert!(parse(&["--peak-gbs", "4800"]).is_err());
    }

    #[test]
    fn cuda_check_skips_loudly_or_runs() {
        // Without a GPU the check must say SKIP and succeed, unless a GPU is required.
        if cuda_backend(1 << 30, "bf16", false).is_ok() {
            eprintln!("a GPU is present: cuda-check is exercised by benches/gpu/run.sh instead");
            return;
        }
        let args = CudaCheckArgs {
            run: CudaRunArgs { model: vec![], random_vit_b: false, image: None, r#box: None, precision: "bf16".into(), vram_budget: 1 << 30 },
            seed: None,
            skip_kernels: false,
            require_gpu: false,
        };
        check(&args).unwrap();
        let strict = CudaCheckArgs { require_gpu: true, ..args };
        let err = format!("{:#}", check(&strict).unwrap_err());
        assert!(err.contains("--require-gpu"), "{err}");
    }
}
