//! Choosing a backend at start-up: `auto` takes the GPU when one works and otherwise the CPU,
//! with one log line saying why; `cuda` insists and fails with the reason; `cpu` never touches
//! the CUDA libraries at all.

use std::str::FromStr;

use super::{CudaBackend, CudaOptions};
use crate::cpu::CpuBackend;
use crate::{Error, Result};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BackendChoice {
    #[default]
    Auto,
    Cpu,
    Cuda,
}

impl FromStr for BackendChoice {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda),
            other => Err(format!("unknown backend {other:?}: expected auto, cpu or cuda")),
        }
    }
}

/// The backend chosen; callers run their generic code on whichever it is.
pub enum SelectedBackend {
    Cpu(CpuBackend),
    Cuda(Box<CudaBackend>),
}

impl SelectedBackend {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Cpu(_) => "cpu",
            Self::Cuda(_) => "cuda",
        }
    }
}

/// `BYTES`, or a number with a unit: `1GiB`, `512MiB`, `64KiB`, `2GB`, `800MB` (SI units are
/// powers of ten). Zero is refused.
pub fn parse_bytes(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024.0 * 1024.0,
        "g" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        other => return Err(format!("{s:?}: unknown unit {other:?} (use bytes, KiB, MiB, GiB, KB, MB or GB)")),
    };
    let value: f64 = num.parse().map_err(|_| format!("{s:?} is not a size (e.g. 1GiB, 512MiB, 1073741824)"))?;
    let bytes = value * scale;
    if !bytes.is_finite() || bytes < 1.0 || bytes > u64::MAX as f64 {
        return Err(format!("{s:?}: size must be positive"));
    }
    Ok(bytes as u64)
}

/// The message of a backend error without its "backend error:" prefix (it is about to get one).
fn reason(e: &Error) -> String {
    match e {
        Error::Backend(m) => m.clone(),
        other => other.to_string(),
    }
}

/// Builds the backend asked for. With [`BackendChoice::Auto`], any CUDA failure (no libcuda, no
/// device, too old a GPU, NVRTC missing, a kernel that does not compile, the budget) falls back
/// to the CPU after one line on stderr; with [`BackendChoice::Cuda`] it is the error.
pub fn select_backend(choice: BackendChoice, threads: usize, cuda: CudaOptions) -> Result<SelectedBackend> {
    let cpu = |threads| CpuBackend::new(threads).map(SelectedBackend::Cpu);
    match choice {
        BackendChoice::Cpu => cpu(threads),
        BackendChoice::Cuda => CudaBackend::new(cuda)
            .map(|b| SelectedBackend::Cuda(Box::new(b)))
            .map_err(|e| Error::Backend(format!("--backend cuda: {}", reason(&e)))),
        BackendChoice::Auto => match CudaBackend::new(cuda) {
            Ok(b) => Ok(SelectedBackend::Cuda(Box::new(b))),
            Err(e) => {
                eprintln!("minisam: CUDA unavailable ({}); using the CPU backend", reason(&e));
                cpu(threads)
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuda_backend_choice_and_sizes_parse() {
        assert_eq!("auto".parse::<BackendChoice>().unwrap(), BackendChoice::Auto);
        assert_eq!("cuda".parse::<BackendChoice>().unwrap(), BackendChoice::Cuda);
        assert!("gpu".parse::<BackendChoice>().is_err());
        assert_eq!(parse_bytes("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_bytes("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("1073741824").unwrap(), 1 << 30);
        assert_eq!(parse_bytes("2GB").unwrap(), 2_000_000_000);
        assert_eq!(parse_bytes("1.5 GiB").unwrap(), 3 << 29);
        assert!(parse_bytes("0").is_err());
        assert!(parse_bytes("1TiB").is_err());
        assert!(parse_bytes("lots").is_err());
    }

    /// On a machine without a usable GPU, `cuda` must fail with a reason and `auto` must fall
    /// back to the CPU; on a GPU machine both must give the CUDA backend.
    #[test]
    fn cuda_selection_falls_back_or_refuses_clearly() {
        let opts = CudaOptions::default();
        match CudaBackend::new(opts.clone()) {
            Err(reason) => {
                eprintln!("no usable GPU here ({reason}): checking the fallback");
                let err = select_backend(BackendChoice::Cuda, 1, opts.clone()).err().expect("--backend cuda must fail without a GPU");
                let msg = err.to_string();
                assert!(msg.contains("--backend cuda") && msg.contains("CUDA") || msg.contains("NVRTC"), "unclear refusal: {msg}");
                let auto = select_backend(BackendChoice::Auto, 1, opts).unwrap();
                assert_eq!(auto.name(), "cpu");
            }
            Ok(_) => {
                assert_eq!(select_backend(BackendChoice::Auto, 1, opts.clone()).unwrap().name(), "cuda");
                assert_eq!(select_backend(BackendChoice::Cuda, 1, opts).unwrap().name(), "cuda");
            }
        }
        assert_eq!(select_backend(BackendChoice::Cpu, 1, CudaOptions::default()).unwrap().name(), "cpu");
    }
}
