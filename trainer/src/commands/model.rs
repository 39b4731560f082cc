//! Loading a model file (packed or checkpoint) onto a backend, shared by `segment` and `eval`,
//! and its family name for matching the reference table.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use minisam_models::backend::Backend;
use minisam_models::config::{EncoderConfig, ModelConfig, Preprocess};
use minisam_models::cpu::CpuBackend;
use minisam_models::cuda::{CudaBackend, SelectedBackend};

use crate::cli::BackendArgs;
use crate::frozen::gpu_or_cpu;
use minisam_models::load::ModelFile;
use minisam_models::sam::Segmenter;

pub struct Loaded<B: Backend> {
    pub segmenter: Segmenter<B>,
    /// One line: kind, architecture, hash prefix.
    pub description: String,
    pub load_ms: f64,
}

/// Opens `path` and builds the networks on `backend` (weights uploaded once, here).
pub fn load<B: Backend>(path: &Path, backend: B) -> Result<Loaded<B>> {
    let t0 = Instant::now();
    let file = ModelFile::open(path)
        .with_context(|| format!("cannot open model {} (expected a packed .msam file or a SAM-family .pth/.safetensors checkpoint)", path.display()))?;
    let segmenter = Segmenter::load(backend, file.store(), file.config())
        .with_context(|| format!("building the networks from {}", path.display()))?;
    Ok(Loaded {
        segmenter,
        description: file.describe(),
        load_ms: t0.elapsed().as_secs_f64() * 1e3,
    })
}

/// A model loaded on the backend that could hold it (boxed: the two differ in size by
/// kilobytes, and the enum is moved around whole).
pub enum LoadedOn {
    Cpu(Box<Loaded<CpuBackend>>),
    Cuda(Box<Loaded<CudaBackend>>),
}

/// Selects the backend `args` ask for and loads `path` on it. With `--backend auto`, a model the
/// GPU cannot hold (over the VRAM budget, or any other CUDA fault while its weights go up) is
/// loaded on the CPU after one line on stderr: `auto` promises a run, as the daemon's does.
pub fn load_selected(args: &BackendArgs, threads: usize, path: &Path) -> Result<LoadedOn> {
    match args.select(threads)? {
        SelectedBackend::Cpu(b) => Ok(LoadedOn::Cpu(Box::new(load(path, b)?))),
        SelectedBackend::Cuda(b) => {
            let on_cpu = || {
                let cpu = CpuBackend::new(threads).context("bringing up the CPU backend after the CUDA one failed")?;
                load(path, cpu)
            };
            Ok(match gpu_or_cpu(args.backend, load(path, *b), on_cpu)? {
                Ok(gpu) => LoadedOn::Cuda(Box::new(gpu)),
                Err(cpu) => LoadedOn::Cpu(Box::new(cpu)),
            })
        }
    }
}

/// "litemedsam" / "mobilesam" for the families the reference table covers, by architecture and
/// preprocessing (never by file name).
pub fn family(config: &ModelConfig) -> Option<&'static str> {
    match (&config.encoder, config.preprocess) {
        (EncoderConfig::TinyVit(_), Preprocess::LiteMedSam) => Some("litemedsam"),
        (EncoderConfig::TinyVit(_), Preprocess::Sam) => Some("mobilesam"),
        _ => None,
    }
}
