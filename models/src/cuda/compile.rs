//! Run-time compilation of the CUDA C kernels in `kernels/*.cu` to PTX through NVRTC, and the
//! on-disk PTX cache.
//!
//! The same function compiles for the backend at start-up and for `minisam cuda-compile` (CI
//! compiles every kernel for sm_87 and sm_90 on a machine without a GPU), so what CI checks is
//! what runs. PTX targets the virtual architecture (`compute_XY`) and the driver finishes it for
//! the exact chip when the module loads. A second, optional compile for the real architecture
//! (`sm_XY`) asks NVRTC's embedded ptxas for its resource report (registers, spills).

use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// One kernel source file, embedded in the binary so that a deployed build needs no source tree.
#[derive(Clone, Copy, Debug)]
pub struct KernelSource {
    /// File stem in `kernels/`, also the module name.
    pub name: &'static str,
    pub source: &'static str,
}

/// Every `kernels/*.cu` file. A test checks this list against the directory, so a new file
/// cannot be forgotten by CI.
pub const SOURCES: &[KernelSource] = &[
    KernelSource { name: "nf4_gemm", source: include_str!("../../../kernels/nf4_gemm.cu") },
    KernelSource { name: "attention", source: include_str!("../../../kernels/attention.cu") },
    KernelSource { name: "norm", source: include_str!("../../../kernels/norm.cu") },
    KernelSource { name: "elementwise", source: include_str!("../../../kernels/elementwise.cu") },
    KernelSource { name: "resize", source: include_str!("../../../kernels/resize.cu") },
    KernelSource { name: "conv", source: include_str!("../../../kernels/conv.cu") },
];

/// Tensor-core operand precision of the GEMMs (everything else is f32).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmaPrecision {
    /// bf16 operands, f32 accumulation: fp16's accuracy is not needed and its range is (ViT
    /// activations reach the thousands).
    Bf16,
    /// fp16 operands, f32 accumulation.
    F16,
    /// No tensor cores: f32 on the CUDA cores (the reference mode for parity checks).
    F32,
}

impl MmaPrecision {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "bf16" => Ok(Self::Bf16),
            "f16" | "fp16" => Ok(Self::F16),
            "f32" => Ok(Self::F32),
            other => Err(Error::Backend(format!("unknown CUDA precision {other:?}: expected bf16, f16 or f32"))),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
            Self::F32 => "f32",
        }
    }
    /// NVRTC defines selecting the MMA operand type in `nf4_gemm.cu`.
    fn defines(self) -> &'static [&'static str] {
        match self {
            Self::F16 => &["-DMINISAM_MMA_F16"],
            Self::Bf16 | Self::F32 => &[],
        }
    }
}

/// `sm_87` / `87` / `8.7` → `87`; anything else is an error naming the expected forms.
pub fn parse_arch(arch: &str) -> Result<u32> {
    let digits: String = arch.trim_start_matches("sm_").trim_start_matches("compute_").replace('.', "");
    match digits.parse::<u32>() {
        Ok(v) if (50..=200).contains(&v) => Ok(v),
        _ => Err(Error::Backend(format!("bad CUDA architecture {arch:?}: expected e.g. sm_87 or sm_90"))),
    }
}

/// The NVRTC options for one compile. Part of the cache key.
fn options(arch: u32, precision: MmaPrecision, real: bool, include: Option<&Path>) -> Vec<String> {
    let mut o = vec![
        if real { format!("--gpu-architecture=sm_{arch}") } else { format!("--gpu-architecture=compute_{arch}") },
        "--std=c++17".to_string(),
        // Fused multiply-adds are fine everywhere; resize.cu opts out with explicit _rn intrinsics.
        "--fmad=true".to_string(),
    ];
    o.extend(precision.defines().iter().map(|s| s.to_string()));
    if real {
        o.push("--ptxas-options=-v".to_string());
    }
    if let Some(dir) = include {
        o.push(format!("--include-path={}", dir.display()));
    }
    o
}

/// Whether the NVRTC library can be loaded (checked before any call, since cudarc panics when a
/// dynamically loaded library is missing).
pub fn nvrtc_available() -> bool {
    std::panic::catch_unwind(|| unsafe { cudarc::nvrtc::sys::is_culib_present() }).unwrap_or(false)
}

/// The loaded NVRTC's version as `"MAJOR.MINOR"`, `None` when it cannot be loaded. Part of the
/// PTX cache key: another NVRTC may emit another PTX ISA version for the same source (one a
/// given driver cannot load), so PTX cached by one must never be served for another.
pub fn nvrtc_version() -> Option<String> {
    if !nvrtc_available() {
        return None;
    }
    std::panic::catch_unwind(|| {
        let (mut major, mut minor) = (0, 0);
        // SAFETY: two plain out-parameters; the library is loaded (checked above).
        let r = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
        (r == cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS).then(|| format!("{major}.{minor}"))
    })
    .ok()
    .flatten()
}

/// CUDA headers for NVRTC, if the environment names them (`MINISAM_CUDA_INCLUDE`, else
/// `$CUDA_HOME/include`). The kernels include nothing today; the path is passed so that they may.
fn include_dir() -> Option<PathBuf> {
    let explicit = std::env::var_os("MINISAM_CUDA_INCLUDE").map(PathBuf::from);
    let home = std::env::var_os("CUDA_HOME").map(|h| PathBuf::from(h).join("include"));
    explicit.or(home).filter(|p| p.is_dir())
}

/// The result of one NVRTC compile.
pub struct Compiled {
    pub ptx: String,
    /// NVRTC's log (warnings; with `real`, ptxas's resource report).
    pub log: String,
}

/// Compiles one source with NVRTC; the error carries NVRTC's log.
fn nvrtc_compile(src: &KernelSource, opts: &[String]) -> Result<Compiled> {
    if !nvrtc_available() {
        return Err(Error::Backend(
            "NVRTC (libnvrtc.so.12) could not be loaded: install the CUDA runtime compiler or put it on LD_LIBRARY_PATH".into(),
        ));
    }
    let code = CString::new(src.source).map_err(|_| Error::Backend(format!("{}.cu contains a NUL byte", src.name)))?;
    let name = CString::new(format!("{}.cu", src.name)).expect("kernel names have no NUL");
    let run = || -> Result<Compiled> {
        use cudarc::nvrtc::result as nvrtc;
        let prog = nvrtc::create_program(&code, Some(&name)).map_err(|e| Error::Backend(format!("NVRTC create {}: {e:?}", src.name)))?;
        // SAFETY: `prog` was just created from `code`/`name`, which outlive it; destroyed once below.
        let compiled = unsafe { nvrtc::compile_program(prog, opts) };
        let log = unsafe { nvrtc::get_program_log(prog) }.map(|l| c_text(&l)).unwrap_or_default();
        let ptx = compiled.and_then(|()| unsafe { nvrtc::get_ptx(prog) }.map(|p| c_text(&p)));
        let _ = unsafe { nvrtc::destroy_program(prog) };
        match ptx {
            Ok(ptx) => Ok(Compiled { ptx, log }),
            Err(e) => Err(Error::Backend(format!("NVRTC failed on kernels/{}.cu ({e:?}) with {opts:?}:\n{log}", src.name))),
        }
    };
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(run))
        .unwrap_or_else(|_| Err(Error::Backend(format!("NVRTC panicked while compiling {}.cu (missing symbol in libnvrtc?)", src.name))))
}

fn c_text(bytes: &[std::ffi::c_char]) -> String {
    let raw: Vec<u8> = bytes.iter().map(|&c| c as u8).collect();
    match CStr::from_bytes_until_nul(&raw) {
        Ok(s) => s.to_string_lossy().into_owned(),
        Err(_) => String::from_utf8_lossy(&raw).into_owned(),
    }
}

/// Where PTX is cached: `$MINISAM_PTX_CACHE`, else `$XDG_CACHE_HOME/minisam/ptx`, else
/// `$HOME/.cache/minisam/ptx`; `None` when none of them is set.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("MINISAM_PTX_CACHE").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").filter(|d| !d.is_empty()).map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("minisam").join("ptx"))
}

/// The cache file of one compile: keyed by the source text, the architecture, the options and
/// the NVRTC version, so an edited kernel, a changed flag or another compiler can never load
/// stale PTX.
fn cache_file(dir: &Path, src: &KernelSource, opts: &[String], nvrtc: &str) -> PathBuf {
    let mut h = Sha256::new();
    h.update(src.source.as_bytes());
    h.update([0u8]);
    h.update(nvrtc.as_bytes());
    // The include path names a directory of this machine, not an input: a cache filled by CI
    // must hit on the device (the kernels include no headers).
    for o in opts.iter().filter(|o| !o.starts_with("--include-path=")) {
        h.update([0u8]);
        h.update(o.as_bytes());
    }
    let digest = h.finalize();
    let hex: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
    dir.join(format!("{}-{hex}.ptx", src.name))
}

/// PTX of `src` for `arch`: from the cache when present, else compiled by NVRTC and cached.
/// A cache that cannot be written is not an error (read-only home on a device): it only costs
/// the compile next time. Returns the PTX and whether it came from the cache.
pub fn ptx_for(src: &KernelSource, arch: u32, precision: MmaPrecision) -> Result<(String, bool)> {
    let opts = options(arch, precision, false, include_dir().as_deref());
    // Without NVRTC nothing can be compiled, but PTX cached by a known version may still serve.
    let nvrtc = nvrtc_version().unwrap_or_else(|| "absent".into());
    let dir = cache_dir();
    if let Some(dir) = &dir {
        if let Ok(ptx) = std::fs::read_to_string(cache_file(dir, src, &opts, &nvrtc)) {
            if ptx.contains(".entry") {
                return Ok((ptx, true));
            }
        }
    }
    let compiled = nvrtc_compile(src, &opts)?;
    if let Some(dir) = &dir {
        let path = cache_file(dir, src, &opts, &nvrtc);
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let written = std::fs::create_dir_all(dir)
            .and_then(|()| std::fs::write(&tmp, &compiled.ptx))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            eprintln!("minisam: cannot cache PTX in {} ({e}); it will be compiled again next start", dir.display());
        }
    }
    Ok((compiled.ptx, false))
}

/// ptxas's resource figures for one kernel, parsed from NVRTC's log.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KernelResources {
    pub kernel: String,
    pub registers: Option<u32>,
    pub spill_stores: Option<u32>,
    pub spill_loads: Option<u32>,
    pub stack_bytes: Option<u32>,
    pub shared_bytes: Option<u32>,
}

/// What `minisam cuda-compile` reports for one source.
pub struct CompileReport {
    pub name: &'static str,
    pub ptx_bytes: usize,
    pub entries: usize,
    /// Empty when NVRTC did not report (it runs ptxas only for a real `sm_XY` target).
    pub resources: Vec<KernelResources>,
    pub log: String,
}

/// Compiles every kernel for `arch` (PTX, filling the cache) and, with `report`, once more for
/// the real architecture to get ptxas's resource figures. Stops at the first error, which names
/// the file and holds the log.
pub fn compile_all(arch: u32, precision: MmaPrecision, report: bool) -> Result<Vec<CompileReport>> {
    let include = include_dir();
    let mut reports = Vec::new();
    for src in SOURCES {
        let (ptx, _) = ptx_for(src, arch, precision)?;
        let entries = ptx.matches(".entry").count();
        if entries == 0 {
            return Err(Error::Backend(format!("kernels/{}.cu compiled to PTX with no kernel entry", src.name)));
        }
        let log = if report { nvrtc_compile(src, &options(arch, precision, true, include.as_deref()))?.log } else { String::new() };
        reports.push(CompileReport { name: src.name, ptx_bytes: ptx.len(), entries, resources: parse_ptxas(&log), log });
    }
    Ok(reports)
}

/// Parses ptxas `-v` lines: "Compiling entry function 'X'", "Function properties for X" followed
/// by "N bytes stack frame, N bytes spill stores, N bytes spill loads", and "Used N registers, ..
/// N bytes smem". The frame line belongs to the function its "Function properties for" line
/// names, which is not always the entry being compiled: ptxas reports every non-inlined device
/// function an entry calls right after it, and attributing those lines to the entry would
/// overwrite its own frame (a GEMM's 320 B stack read as 0 B).
pub fn parse_ptxas(log: &str) -> Vec<KernelResources> {
    let mut out: Vec<KernelResources> = Vec::new();
    let number_before = |line: &str, unit: &str| -> Option<u32> {
        let at = line.find(unit)?;
        line[..at].split(|c: char| !c.is_ascii_digit()).rfind(|s| !s.is_empty())?.parse().ok()
    };
    // The function the next frame line describes: the index of an entry in `out`, or None for a
    // device function (whose figures are part of its callers' cumulative stack, not reported).
    let mut props_for: Option<usize> = None;
    for line in log.lines() {
        if let Some(at) = line.find("entry function '") {
            let rest = &line[at + "entry function '".len()..];
            let name = rest.split('\'').next().unwrap_or("").to_string();
            out.push(KernelResources { kernel: name, ..Default::default() });
            props_for = None;
            continue;
        }
        if let Some(at) = line.find("Function properties for ") {
            let name = line[at + "Function properties for ".len()..].trim();
            props_for = out.iter().rposition(|k| k.kernel == name);
            continue;
        }
        if line.contains("stack frame") {
            if let Some(k) = props_for.take().and_then(|i| out.get_mut(i)) {
                k.stack_bytes = number_before(line, " bytes stack frame");
                k.spill_stores = number_before(line, " bytes spill stores");
                k.spill_loads = number_before(line, " bytes spill loads");
            }
            continue;
        }
        let Some(cur) = out.last_mut() else { continue };
        if line.contains("registers") {
            cur.registers = number_before(line, " registers");
            // ptxas leaves shared memory out of the line when a kernel uses none.
            cur.shared_bytes = if line.contains("smem") { number_before(line, " bytes smem") } else { Some(0) };
        }
    }
    out
}

impl KernelResources {
    /// Why this kernel would run slower than its design: local-memory traffic from spills, or a
    /// stack frame (e.g. a parameter struct copied to local memory because its address escaped).
    /// `None` when clean or when ptxas did not report.
    pub fn local_memory_problem(&self) -> Option<String> {
        let (stack, stores, loads) = (self.stack_bytes?, self.spill_stores.unwrap_or(0), self.spill_loads.unwrap_or(0));
        (stack > 0 || stores > 0 || loads > 0)
            .then(|| format!("{}: {stack} B stack frame, {stores} B spill stores, {loads} B spill loads", self.kernel))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuda_sources_list_every_kernel_file() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../kernels");
        let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_suffix(".cu")).map(str::to_string))
            .collect();
        on_disk.sort();
        let mut listed: Vec<String> = SOURCES.iter().map(|s| s.name.to_string()).collect();
        listed.sort();
        assert_eq!(on_disk, listed, "kernels/*.cu and compile::SOURCES differ");
    }

    #[test]
    fn cuda_arch_parsing() {
        assert_eq!(parse_arch("sm_87").unwrap(), 87);
        assert_eq!(parse_arch("9.0").unwrap(), 90);
        assert_eq!(parse_arch("compute_80").unwrap(), 80);
        assert!(parse_arch("sm_x").is_err());
        assert!(parse_arch("7").is_err());
    }

    #[test]
    fn cuda_cache_key_changes_with_source_arch_and_options() {
        let dir = Path::new("/c");
        let a = KernelSource { name: "k", source: "A" };
        let b = KernelSource { name: "k", source: "B" };
        let o87 = options(87, MmaPrecision::Bf16, false, None);
        let o90 = options(90, MmaPrecision::Bf16, false, None);
        let f16 = options(87, MmaPrecision::F16, false, None);
        let base = cache_file(dir, &a, &o87, "12.6");
        assert_ne!(base, cache_file(dir, &b, &o87, "12.6"));
        assert_ne!(base, cache_file(dir, &a, &o90, "12.6"));
        assert_ne!(base, cache_file(dir, &a, &f16, "12.6"));
        assert_ne!(base, cache_file(dir, &a, &o87, "12.8"), "another NVRTC: another cache entry");
        assert_eq!(base, cache_file(dir, &a, &o87, "12.6"));
        assert_eq!(base, cache_file(dir, &a, &options(87, MmaPrecision::Bf16, false, Some(Path::new("/opt/cuda/include"))), "12.6"));
    }

    #[test]
    fn cuda_ptxas_report_parsing() {
        let log = "ptxas info    : Compiling entry function 'gemm_tc_nf4w' for 'sm_90'\n\
                   ptxas info    : Function properties for gemm_tc_nf4w\n\
                   \x20   16 bytes stack frame, 4 bytes spill stores, 8 bytes spill loads\n\
                   ptxas info    : Used 128 registers, 19200 bytes smem, 1024 bytes cmem[0]\n";
        let r = parse_ptxas(log);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].kernel, "gemm_tc_nf4w");
        assert_eq!((r[0].registers, r[0].shared_bytes), (Some(128), Some(19200)));
        assert_eq!((r[0].stack_bytes, r[0].spill_stores, r[0].spill_loads), (Some(16), Some(4), Some(8)));
        let no_smem = parse_ptxas("ptxas info    : Compiling entry function 'k' for 'sm_87'\nptxas info    : Used 36 registers, 400 bytes cmem[0]\n");
        assert_eq!((no_smem[0].registers, no_smem[0].shared_bytes), (Some(36), Some(0)));
        assert_eq!(no_smem[0].local_memory_problem(), None, "no frame line: nothing reported, nothing claimed");
    }

    /// ptxas's real order (NVRTC 12.6): an entry's own frame line, then one for every non-inlined
    /// device function it calls. The callee's 0 B must not overwrite the entry's 320 B.
    #[test]
    fn cuda_ptxas_frame_lines_belong_to_the_function_they_name() {
        let log = "ptxas info    : 0 bytes gmem\n\
                   ptxas info    : Compiling entry function 'gemm_tc_nf4w' for 'sm_90'\n\
                   ptxas info    : Function properties for gemm_tc_nf4w\n\
                   ptxas         .     320 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
                   ptxas info    : Used 168 registers, used 1 barriers, 320 bytes cumulative stack size, 19456 bytes smem\n\
                   ptxas info    : Function properties for _Z8epilogueRK10GemmParamsxxxf\n\
                   ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
                   ptxas info    : Compiling entry function 'scale_act' for 'sm_90'\n\
                   ptxas info    : Function properties for scale_act\n\
                   ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
                   ptxas info    : Used 30 registers, 380 bytes cmem[0]\n";
        let r = parse_ptxas(log);
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].kernel.as_str(), r[0].stack_bytes, r[0].registers), ("gemm_tc_nf4w", Some(320), Some(168)));
        assert!(r[0].local_memory_problem().unwrap().contains("320 B stack frame"));
        assert_eq!((r[1].kernel.as_str(), r[1].stack_bytes), ("scale_act", Some(0)));
        assert_eq!(r[1].local_memory_problem(), None);
    }

    /// Compiles every kernel for both deployment targets when NVRTC is loadable (CI's
    /// `.ci/cuda-ptx.sh` puts it on LD_LIBRARY_PATH); skips loudly otherwise.
    #[test]
    fn cuda_every_kernel_compiles_for_sm87_and_sm90() {
        if !nvrtc_available() {
            eprintln!("SKIP: NVRTC not loadable (run .ci/cuda-ptx.sh, which installs it from PyPI)");
            return;
        }
        // PTX only (the ptxas report doubles the time; `minisam cuda-compile` prints it in CI).
        for arch in [87, 90] {
            let reports = compile_all(arch, MmaPrecision::Bf16, false).unwrap_or_else(|e| panic!("sm_{arch}: {e}"));
            assert_eq!(reports.len(), SOURCES.len());
            assert!(reports.iter().all(|r| r.entries > 0));
        }
    }
}
