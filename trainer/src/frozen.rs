//! A packed model that only runs inference inside a training job: the frozen image encoder of a
//! decoder-only `train`, the teacher of `distill`. It runs on the backend the user chose
//! (`--backend auto|cpu|cuda`), so on a GPU machine the expensive part (a ViT-B/H encoder at
//! 1024) runs on the GPU while the small trainable part trains on the tape; its embeddings go
//! through the embedding cache, keyed by that backend's numerics.

use anyhow::{anyhow, Result};
use minisam_models::cpu::CpuBackend;
use minisam_models::cuda::{self, BackendChoice, CudaBackend, CudaOptions, SelectedBackend};
use minisam_models::image::RgbImage;
use minisam_models::load::ModelFile;
use minisam_models::sam::Segmenter;

use crate::embedding_cache::{Embedding, EmbeddingCache};

/// Where a frozen model runs: the CLI's `--backend` and, for CUDA, its options.
#[derive(Clone, Debug, Default)]
pub struct FrozenBackend {
    pub choice: BackendChoice,
    pub cuda: CudaOptions,
}

impl FrozenBackend {
    /// The CPU reference, as tests and CPU-only runs want it.
    pub fn cpu() -> Self {
        Self { choice: BackendChoice::Cpu, cuda: CudaOptions::default() }
    }
}

/// An inference segmenter on whichever backend was selected.
pub enum FrozenModel {
    Cpu(Box<Segmenter<CpuBackend>>),
    Cuda(Box<Segmenter<CudaBackend>>),
}

impl FrozenModel {
    /// Loads `file` (identified by its hash, for adapters and caches) on `backend`; `auto` falls
    /// back to the CPU with one line on stderr, as everywhere.
    pub fn load(file: &ModelFile, backend: &FrozenBackend, threads: usize) -> Result<Self> {
        let selected = cuda::select_backend(backend.choice, threads, backend.cuda.clone()).map_err(|e| anyhow!("{e}"))?;
        let (store, config, sha) = (file.store(), file.config(), Some(file.sha256_hex()));
        Ok(match selected {
            SelectedBackend::Cpu(b) => Self::Cpu(Box::new(Segmenter::load_with_identity(b, store, config, sha)?)),
            SelectedBackend::Cuda(b) => {
                let on_cpu = || -> Result<_> {
                    let cpu = CpuBackend::new(threads).map_err(|e| anyhow!("{e}"))?;
                    Ok(Segmenter::load_with_identity(cpu, store, config, sha)?)
                };
                match gpu_or_cpu(backend.choice, Segmenter::load_with_identity(*b, store, config, sha).map_err(anyhow::Error::from), on_cpu)? {
                    Ok(gpu) => Self::Cuda(Box::new(gpu)),
                    Err(cpu) => Self::Cpu(Box::new(cpu)),
                }
            }
        })
    }

    /// The image embedding of `image`, from `cache` or encoded (and stored) now.
    pub fn embedding(&self, cache: &EmbeddingCache, image: &RgbImage) -> Result<Embedding> {
        match self {
            Self::Cpu(s) => cache.embedding(s.as_ref(), image),
            Self::Cuda(s) => cache.embedding(s.as_ref(), image),
        }
    }

    /// For logs: the backend and, on a GPU, its device line.
    pub fn describe(&self) -> String {
        match self {
            Self::Cpu(_) => "cpu".into(),
            Self::Cuda(s) => s.backend().describe(),
        }
    }
}

/// What a model load does once the GPU tried: its result if it worked; else, under `auto`, the
/// CPU's (`Err(cpu)`) after one line on stderr, since `auto` promises a run (a model over the
/// VRAM budget, or any CUDA fault while its weights go up, means the CPU, as in the daemon);
/// else, under `cuda`, the GPU's error. Shared by the frozen models of `train`/`distill` and by
/// `segment`/`eval` (`commands::model::load_selected`).
pub(crate) fn gpu_or_cpu<G, C>(choice: BackendChoice, on_gpu: Result<G>, on_cpu: impl FnOnce() -> Result<C>) -> Result<std::result::Result<G, C>> {
    match on_gpu {
        Ok(gpu) => Ok(Ok(gpu)),
        Err(e) if choice == BackendChoice::Auto => {
            eprintln!("minisam: the CUDA backend cannot hold this model ({e:#}); --backend auto uses the CPU");
            on_cpu().map(Err)
        }
        Err(e) => Err(e.context("--backend cuda")),
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
