//! The CUDA backend: the CUDA C kernels of `kernels/*.cu`, compiled at run time by NVRTC (PTX
//! cached on disk), driven through cudarc's driver API. Both libraries are loaded with `dlopen`
//! when first needed, so this module builds and links everywhere; [`select_backend`] decides at
//! start-up whether a GPU is usable and falls back to the CPU otherwise.
//!
//! - `compile`: sources, NVRTC, PTX cache, ptxas resource report;
//! - `driver`: the seam every device call goes through, with two implementations:
//!   `cudarc_driver` (libcuda: context, stream, modules) and `sim_driver` (feature `gpusim`: the
//!   SIMT simulator of `kernels/sim`, so CI runs this backend unmodified without a GPU);
//! - `device`: kernel handles, VRAM budget, parameter uploads, activation arena, launch marshalling;
//! - `arena`: the arena's free list;
//! - `graph`: CUDA graphs for the encoder's steady-state frame;
//! - `params`: `#[repr(C)]` kernel parameter records;
//! - `profile`: per-kernel timing and counted work of a profiled run (`cuda-bench --kernels`);
//! - `backend`: the [`crate::backend::Backend`] implementation;
//! - `select`: `auto | cpu | cuda`;
//! - `check`: per-kernel and end-to-end parity against the CPU backend (needs a GPU).
//!
//! Status: every kernel compiles for sm_87 and sm_90 in CI (`.ci/cuda-ptx.sh`); numerical parity
//! and timings need a GPU (`benches/gpu/run.sh`) and have not been measured yet on one; on the
//! simulator (`gpu_sim` tests of `kernels/sim`) the tiny SAM runs end to end through this backend,
//! the encoder's graph captured and replayed, at parity with the CPU. The decoder runs
//! kernel by kernel (its prompts are uploaded and its IoU read back inside the frame). Not done:
//! async copies / double-buffered GEMM tiles, tensor cores in attention (f32 on the CUDA cores).

pub mod arena;
pub mod backend;
pub mod check;
pub mod compile;
pub mod cudarc_driver;
pub mod device;
pub mod driver;
pub mod graph;
pub mod kernel_cache;
pub mod params;
pub mod profile;
pub mod select;
#[cfg(feature = "gpusim")]
pub mod sim_driver;

pub use backend::{CudaBackend, CudaTensor, CudaVector, CudaWeight};
pub use compile::MmaPrecision;
pub use device::{CudaOptions, VramReport};
pub use profile::KernelProfile;
pub use select::{parse_bytes, select_backend, BackendChoice, SelectedBackend};
