//! Run-time compilation of the CUDA C kernels in `kernels/*.cu` through NVRTC: PTX for the
//! virtual architecture and CUBIN for the real one, cached on disk by [`super::kernel_cache`].
//!
//! The same function compiles for the backend at start-up and for `minisam cuda-compile` (CI
//! compiles every kernel for sm_87 and sm_90 on a machine without a GPU and keeps both images), so
//! what CI checks is what runs. PTX targets `compute_XY` and the driver finishes it for the exact
//! chip when the module loads; CUBIN (`sm_XY`) is that chip's code already, and the real-arch
//! compile also yields NVRTC's embedded ptxas resource report (registers, spills).

use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};

use super::kernel_cache;
use crate::{Error, Result};

/// One kernel source file, embedded in the binary so that a deployed build needs no source tree.
#[derive(Clone, Copy, Debug)]
pub struct KernelSource {
    /// File stem in `kernels/`, also the module name.
    pub name: &'static str,
    pub source: &'static str,
    /// The `kernels/*.cuh` files it `#include`s, handed to NVRTC with it and hashed into its cache
    /// key (a test checks this list against the source's `#include "..."` lines).
    pub headers: &'static [KernelHeader],
}

/// A header of the kernels' own (`kernels/*.cuh`), embedded like the sources.
///
/// Why `#include` plus in-memory headers: each helper is written once, the `.cu` files keep their
/// own line numbers (NVRTC and the simulator's g++ name the header's file and lines for what is
/// in it), and nothing is read from disk at run time. NVRTC takes the text through
/// `nvrtcCreateProgram`'s header list, so `#include "tensor_core.cuh"` resolves without an include
/// path; the simulator's build (kernels/sim/build.rs) compiles the same line with kernels/ on its
/// include path. A prelude pasted in front of the source would shift every line of the `.cu`.
#[derive(Clone, Copy, Debug)]
pub struct KernelHeader {
    /// The name the sources include it by, its file name in `kernels/`.
    pub name: &'static str,
    pub source: &'static str,
}

/// The tensor-core helpers (16-bit packing, mma.sync m16n8k16, cp.async) of attention.cu and
/// nf4_gemm.cu.
pub const TENSOR_CORE: KernelHeader = KernelHeader { name: "tensor_core.cuh", source: include_str!("../../../kernels/tensor_core.cuh") };

/// Every `kernels/*.cuh` file (checked against the directory by a test).
pub const HEADERS: &[KernelHeader] = &[TENSOR_CORE];

/// Every `kernels/*.cu` file. A test checks this list against the directory, so a new file
/// cannot be forgotten by CI.
pub const SOURCES: &[KernelSource] = &[
    KernelSource { name: "nf4_gemm", source: include_str!("../../../kernels/nf4_gemm.cu"), headers: &[TENSOR_CORE] },
    KernelSource { name: "attention", source: include_str!("../../../kernels/attention.cu"), headers: &[TENSOR_CORE] },
    KernelSource { name: "norm", source: include_str!("../../../kernels/norm.cu"), headers: &[] },
    KernelSource { name: "elementwise", source: include_str!("../../../kernels/elementwise.cu"), headers: &[] },
    KernelSource { name: "resize", source: include_str!("../../../kernels/resize.cu"), headers: &[] },
    KernelSource { name: "conv", source: include_str!("../../../kernels/conv.cu"), headers: &[] },
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
/// `$CUDA_HOME/include`). The kernels include no CUDA header today (only their own, given to NVRTC
/// in memory: [`KernelHeader`]); the path is passed so that they may.
fn include_dir() -> Option<PathBuf> {
    let explicit = std::env::var_os("MINISAM_CUDA_INCLUDE").map(PathBuf::from);
    let home = std::env::var_os("CUDA_HOME").map(|h| PathBuf::from(h).join("include"));
    explicit.or(home).filter(|p| p.is_dir())
}

/// The result of one NVRTC compile.
pub struct Compiled {
    pub ptx: String,
    /// The machine code, for a compile to a real architecture (`sm_XY`).
    pub cubin: Option<Vec<u8>>,
    /// NVRTC's log (warnings; with `real`, ptxas's resource report).
    pub log: String,
}

/// The CUBIN of a compiled program; `None` for a virtual-architecture compile (NVRTC then has
/// none) or any failure to fetch it.
///
/// # Safety
/// `prog` is a live, successfully compiled NVRTC program.
unsafe fn cubin_of(prog: cudarc::nvrtc::sys::nvrtcProgram) -> Option<Vec<u8>> {
    use cudarc::nvrtc::sys;
    let mut size = 0usize;
    if sys::nvrtcGetCUBINSize(prog, &mut size) != sys::nvrtcResult::NVRTC_SUCCESS || size == 0 {
        return None;
    }
    let mut buf = vec![0u8; size];
    (sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr().cast()) == sys::nvrtcResult::NVRTC_SUCCESS).then_some(buf)
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
    let header_texts = src
        .headers
        .iter()
        .map(|h| CString::new(h.source).map_err(|_| Error::Backend(format!("{} contains a NUL byte", h.name))))
        .collect::<Result<Vec<_>>>()?;
    let header_names: Vec<CString> = src.headers.iter().map(|h| CString::new(h.name).expect("header names have no NUL")).collect();
    let run = || -> Result<Compiled> {
        use cudarc::nvrtc::{result as nvrtc, sys};
        let texts: Vec<*const std::ffi::c_char> = header_texts.iter().map(|c| c.as_ptr()).collect();
        let names: Vec<*const std::ffi::c_char> = header_names.iter().map(|c| c.as_ptr()).collect();
        let mut prog = std::mem::MaybeUninit::<sys::nvrtcProgram>::uninit();
        // SAFETY: every pointer is a NUL-terminated string that outlives the call (NVRTC copies
        // the texts), `texts` and `names` hold `src.headers.len()` entries each, and `prog` is
        // written on success only, which `result()` checks before it is read.
        let prog = unsafe {
            sys::nvrtcCreateProgram(prog.as_mut_ptr(), code.as_ptr(), name.as_ptr(), texts.len() as std::ffi::c_int, texts.as_ptr(), names.as_ptr())
                .result()
                .map(|()| prog.assume_init())
        }
        .map_err(|e| Error::Backend(format!("NVRTC create {}: {e:?}", src.name)))?;
        // SAFETY: `prog` was just created from `code`/`name`, which outlive it; destroyed once below.
        let compiled = unsafe { nvrtc::compile_program(prog, opts) };
        let log = unsafe { nvrtc::get_program_log(prog) }.map(|l| c_text(&l)).unwrap_or_default();
        let ptx = compiled.and_then(|()| unsafe { nvrtc::get_ptx(prog) }.map(|p| c_text(&p)));
        let real = opts.iter().any(|o| o.starts_with("--gpu-architecture=sm_"));
        // SAFETY: compiled successfully when `ptx` is Ok; destroyed only below.
        let cubin = if real && ptx.is_ok() { unsafe { cubin_of(prog) } } else { None };
        let _ = unsafe { nvrtc::destroy_program(prog) };
        match ptx {
            Ok(ptx) => Ok(Compiled { ptx, cubin, log }),
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

/// Loads `src`'s kernels for `arch` through `try_load` (the driver), by the order of
/// [`super::kernel_cache`]: cached CUBIN, cached PTX, then NVRTC afresh. Returns the module and
/// whether its image came from the cache.
pub fn load_module<M>(src: &KernelSource, arch: u32, precision: MmaPrecision, try_load: &mut dyn FnMut(&kernel_cache::KernelImage) -> std::result::Result<M, String>) -> Result<(M, bool)> {
    let include = include_dir();
    let cubin_opts = options(arch, precision, true, include.as_deref());
    let ptx_opts = options(arch, precision, false, include.as_deref());
    let nvrtc = nvrtc_version();
    let dir = cache_dir();
    let mut compile = |kind: kernel_cache::ImageKind| -> Result<Vec<u8>> {
        match kind {
            kernel_cache::ImageKind::Cubin => nvrtc_compile(src, &cubin_opts)?
                .cubin
                .ok_or_else(|| Error::Backend(format!("NVRTC gave no CUBIN for kernels/{}.cu on sm_{arch}", src.name))),
            kernel_cache::ImageKind::Ptx => Ok(nvrtc_compile(src, &ptx_opts)?.ptx.into_bytes()),
        }
    };
    let sources = kernel_cache::Sources { dir: dir.as_deref(), nvrtc: nvrtc.as_deref(), cubin_opts: &cubin_opts, ptx_opts: &ptx_opts, compile: &mut compile };
    kernel_cache::load_with(src, arch, sources, try_load)
}

/// Compiles `src` with `opts` and keeps its image in the cache under the running NVRTC's version:
/// the CUBIN of a real-architecture compile, the PTX of a virtual one.
fn compile_and_cache(src: &KernelSource, opts: &[String]) -> Result<Compiled> {
    let compiled = nvrtc_compile(src, opts)?;
    if let (Some(dir), Some(nvrtc)) = (cache_dir(), nvrtc_version()) {
        let (kind, bytes) = match &compiled.cubin {
            Some(cubin) => (kernel_cache::ImageKind::Cubin, cubin.as_slice()),
            None => (kernel_cache::ImageKind::Ptx, compiled.ptx.as_bytes()),
        };
        kernel_cache::keep(&dir, src, opts, &nvrtc, kind, bytes);
    }
    Ok(compiled)
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
    /// 0 when NVRTC gave no CUBIN.
    pub cubin_bytes: usize,
    pub entries: usize,
    /// Empty when NVRTC did not report (it runs ptxas only for a real `sm_XY` target).
    pub resources: Vec<KernelResources>,
    pub log: String,
}

/// Compiles every kernel for `arch` twice, PTX for `compute_XY` and CUBIN for `sm_XY`, and
/// fills the cache with both (what a device image ships: see [`super::kernel_cache`]); with
/// `report`, parses ptxas's resource figures from the CUBIN compile. Stops at the first error,
/// which names the file and holds the log.
pub fn compile_all(arch: u32, precision: MmaPrecision, report: bool) -> Result<Vec<CompileReport>> {
    let include = include_dir();
    let mut reports = Vec::new();
    for src in SOURCES {
        let ptx = compile_and_cache(src, &options(arch, precision, false, include.as_deref()))?.ptx;
        let entries = ptx.matches(".entry").count();
        if entries == 0 {
            return Err(Error::Backend(format!("kernels/{}.cu compiled to PTX with no kernel entry", src.name)));
        }
        let real = compile_and_cache(src, &options(arch, precision, true, include.as_deref()))?;
        let cubin_bytes = real.cubin.as_ref().map_or(0, Vec::len);
        let log = if report { real.log } else { String::new() };
        reports.push(CompileReport { name: src.name, ptx_bytes: ptx.len(), cubin_bytes, entries, resources: parse_ptxas(&log), log });
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

    /// Every `kernels/*.cuh` is in [`HEADERS`], and each source lists exactly the headers its
    /// `#include "..."` lines name: a header left off would fail NVRTC, one listed but unused
    /// would split the cache for nothing.
    #[test]
    fn cuda_headers_match_the_includes() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../kernels");
        let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str().filter(|n| n.ends_with(".cuh")).map(str::to_string))
            .collect();
        on_disk.sort();
        let mut listed: Vec<String> = HEADERS.iter().map(|h| h.name.to_string()).collect();
        listed.sort();
        assert_eq!(on_disk, listed, "kernels/*.cuh and compile::HEADERS differ");
        for src in SOURCES {
            let mut included: Vec<&str> = src
                .source
                .lines()
                .filter_map(|l| l.trim_start().strip_prefix("#include"))
                .filter_map(|r| r.trim().strip_prefix('"').and_then(|r| r.split('"').next()))
                .collect();
            included.sort_unstable();
            let mut given: Vec<&str> = src.headers.iter().map(|h| h.name).collect();
            given.sort_unstable();
            assert_eq!(included, given, "kernels/{}.cu: its #include lines and its headers in SOURCES differ", src.name);
        }
        let tc: Vec<&str> = SOURCES.iter().filter(|s| s.headers.iter().any(|h| h.name == TENSOR_CORE.name)).map(|s| s.name).collect();
        assert_eq!(tc, ["nf4_gemm", "attention"]);
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

    /// Compiles every kernel to PTX and CUBIN when NVRTC is loadable (CI's `.ci/cuda-ptx.sh`
    /// puts it on LD_LIBRARY_PATH); skips loudly otherwise. sm_87 only: `minisam cuda-compile`
    /// in the same script covers sm_87 and sm_90 in both precisions.
    #[test]
    fn cuda_every_kernel_compiles_to_ptx_and_cubin() {
        if !nvrtc_available() {
            eprintln!("SKIP: NVRTC not loadable (run .ci/cuda-ptx.sh, which installs it from PyPI)");
            return;
        }
        let reports = compile_all(87, MmaPrecision::Bf16, false).unwrap_or_else(|e| panic!("sm_87: {e}"));
        assert_eq!(reports.len(), SOURCES.len());
        assert!(reports.iter().all(|r| r.entries > 0 && r.cubin_bytes > 0));
        // What the driver would be handed at start-up: an ELF image for the exact chip.
        let cubin = nvrtc_compile(&SOURCES[0], &options(87, MmaPrecision::Bf16, true, include_dir().as_deref())).unwrap().cubin.unwrap();
        assert!(kernel_cache::ImageKind::Cubin.plausible(&cubin));
    }
}
