//! Loading a model file (packed or checkpoint) onto a backend, shared by `segment` and `eval`,
//! and its family name for matching the reference table.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use minisam_models::backend::Backend;
use minisam_models::config::{EncoderConfig, ModelConfig, Preprocess};
use minisam_models::cpu::CpuBackend;
use minisam_models::cuda::{BackendChoice, CudaBackend, SelectedBackend};

use crate::cli::BackendArgs;
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

/// A model loaded on the backend that could hold it.
pub enum LoadedOn {
    Cpu(Loaded<CpuBackend>),
    Cuda(Loaded<CudaBackend>),
}

/// Selects the backend `args` ask for and loads `path` on it. With `--backend auto`, a model the
/// GPU cannot hold (over the VRAM budget, or any other CUDA fault while its weights go up) is
/// loaded on the CPU after one line on stderr: `auto` promises a run, as the daemon's does.
pub fn load_selected(args: &BackendArgs, threads: usize, path: &Path) -> Result<LoadedOn> {
    match args.select(threads)? {
        SelectedBackend::Cpu(b) => Ok(LoadedOn::Cpu(load(path, b)?)),
        SelectedBackend::Cuda(b) => {
            let on_cpu = || {
                let cpu = CpuBackend::new(threads).context("bringing up the CPU backend after the CUDA one failed")?;
                load(path, cpu)
            };
            Ok(match gpu_or_cpu(args.backend, load(path, *b), on_cpu)? {
                Ok(gpu) => LoadedOn::Cuda(gpu),
                Err(cpu) => LoadedOn::Cpu(cpu),
            })
        }
    }
}

/// The policy of [`load_selected`] once the GPU tried: its result if it worked; else, under
/// `auto`, the CPU's (`Err(cpu)`) after one line on stderr; else the GPU's error.
fn gpu_or_cpu<G, C>(choice: BackendChoice, on_gpu: Result<G>, on_cpu: impl FnOnce() -> Result<C>) -> Result<std::result::Result<G, C>> {
    match on_gpu {
        Ok(gpu) => Ok(Ok(gpu)),
        Err(e) if choice == BackendChoice::Auto => {
            eprintln!("minisam: the CUDA backend cannot hold this model ({e:#}); --backend auto uses the CPU");
            on_cpu().map(Err)
        }
        Err(e) => Err(e.context("--backend cuda")),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_falls_back_to_the_cpu_when_the_gpu_cannot_hold_the_model_and_cuda_does_not() {
        let over_budget = || Err::<(), _>(anyhow::anyhow!("VRAM budget of 64 MiB exceeded"));
        let r = gpu_or_cpu(BackendChoice::Auto, over_budget(), || Ok("cpu")).unwrap();
        assert_eq!(r, Err("cpu"));
        let e = gpu_or_cpu(BackendChoice::Cuda, over_budget(), || Ok("cpu")).unwrap_err();
        assert!(format!("{e:#}").contains("--backend cuda: VRAM budget"), "{e:#}");
        let r = gpu_or_cpu(BackendChoice::Auto, Ok("gpu"), || -> Result<&str> { panic!("the CPU must not load") }).unwrap();
        assert_eq!(r, Ok("gpu"));
    }
}
