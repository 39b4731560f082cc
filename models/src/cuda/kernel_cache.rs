//! Kernel images on disk (CUBIN and PTX, per NVRTC version) and the order a module is tried in
//! when it loads, so a cart starts without compiling and still starts when its driver is older
//! than the compiler that filled the cache.
//!
//! Why both kinds: CUBIN is the exact chip's machine code (sm_87 Orin, sm_90 H100/H200), so the
//! driver neither JITs (tens of seconds per module on a cold Jetson) nor needs to understand the
//! PTX ISA of a newer toolkit; PTX (for `compute_XY`) serves any chip of that architecture or
//! newer, through the driver's JIT. An image is refused by the driver when it was built by a
//! toolkit newer than the driver knows (PTX: `CUDA_ERROR_UNSUPPORTED_PTX_VERSION`), which is
//! exactly the case of an image shipped from CI onto an older JetPack: then NVRTC on the cart, if
//! it has one, compiles afresh. Order, first that loads wins:
//! 1. cached CUBIN for the device's `sm_XY`, the running NVRTC's version first, then the others
//!    (newest first);
//! 2. cached PTX for `compute_XY`, in the same order;
//! 3. with NVRTC: a fresh CUBIN, then a fresh PTX (each skipped when step 1/2 already tried that
//!    version's image, which a fresh compile would only repeat), both written to the cache.
//!
//! File names: `{module}-{key}.nvrtc{MAJOR.MINOR}.{cubin|ptx}`, where `key` hashes the source and
//! the compile options (minus the machine's include path and the ptxas report flag). The NVRTC
//! version is in the name, not the key, so a machine without NVRTC can still find images that
//! some NVRTC made: `cuda-compile` in CI fills a cache for sm_87 and sm_90 that a Yocto image or
//! `benches/gpu/run.sh` ships as is.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::compile::KernelSource;
use crate::{Error, Result};

/// What a cache file holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageKind {
    /// Machine code for one real architecture (`sm_XY`), an ELF file.
    Cubin,
    /// PTX text for a virtual architecture (`compute_XY`), finished by the driver's JIT.
    Ptx,
}

impl ImageKind {
    pub fn extension(self) -> &'static str {
        match self {
            Self::Cubin => "cubin",
            Self::Ptx => "ptx",
        }
    }

    /// Whether `bytes` can be an image of this kind at all (a truncated or foreign file in the
    /// cache is skipped rather than handed to the driver).
    pub fn plausible(self, bytes: &[u8]) -> bool {
        match self {
            Self::Cubin => bytes.starts_with(b"\x7fELF"),
            Self::Ptx => bytes.windows(6).any(|w| w == b".entry"),
        }
    }
}

/// One image handed to the driver.
pub struct KernelImage {
    pub kind: ImageKind,
    pub bytes: Vec<u8>,
    /// The NVRTC version that made it.
    pub nvrtc: String,
    pub from_cache: bool,
}

/// The hash of the source, the headers it includes and the options that change the output. The
/// include path names a directory of the compiling machine and `--ptxas-options=-v` only adds a
/// report, so neither may split the cache between CI and the device. A header's name and text are
/// hashed after the source (a source without headers hashes as it did before headers existed).
pub fn key(src: &KernelSource, opts: &[String]) -> String {
    let mut h = Sha256::new();
    h.update(src.source.as_bytes());
    for header in src.headers {
        h.update([1u8]);
        h.update(header.name.as_bytes());
        h.update([0u8]);
        h.update(header.source.as_bytes());
    }
    for o in opts.iter().filter(|o| !o.starts_with("--include-path=") && !o.starts_with("--ptxas-options=")) {
        h.update([0u8]);
        h.update(o.as_bytes());
    }
    h.finalize()[..12].iter().map(|b| format!("{b:02x}")).collect()
}

pub fn file_name(src: &KernelSource, key: &str, nvrtc: &str, kind: ImageKind) -> String {
    format!("{}-{key}.nvrtc{nvrtc}.{}", src.name, kind.extension())
}

/// `"12.6"` as `(12, 6)` for ordering ("12.10" is newer than "12.9"); unparsable sorts first.
fn version_order(v: &str) -> (u32, u32) {
    let mut parts = v.split('.').map(|p| p.parse().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// The cached images of `src` for these options: the version `running` first (when given and
/// present), then every other version, newest first. Each entry is `(version, path)`.
pub fn cached(dir: &Path, src: &KernelSource, opts: &[String], kind: ImageKind, running: Option<&str>) -> Vec<(String, PathBuf)> {
    let prefix = format!("{}-{}.nvrtc", src.name, key(src, opts));
    let suffix = format!(".{}", kind.extension());
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut found: Vec<(String, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_string();
            let version = name.strip_prefix(&prefix)?.strip_suffix(&suffix)?.to_string();
            Some((version, e.path()))
        })
        .collect();
    found.sort_by(|a, b| {
        let first = |v: &str| Some(v) == running;
        first(&b.0).cmp(&first(&a.0)).then_with(|| version_order(&b.0).cmp(&version_order(&a.0)))
    });
    found
}

/// Writes an image atomically (temporary file, then rename).
pub fn store(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let written = std::fs::create_dir_all(dir).and_then(|()| std::fs::write(&tmp, bytes)).and_then(|()| std::fs::rename(&tmp, &path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Stores a freshly compiled image under its name. A cache that cannot be written only costs a
/// compile at the next start: said once on stderr, not an error.
pub fn keep(dir: &Path, src: &KernelSource, opts: &[String], nvrtc: &str, kind: ImageKind, bytes: &[u8]) {
    if let Err(e) = store(dir, &file_name(src, &key(src, opts), nvrtc, kind), bytes) {
        eprintln!("minisam: cannot cache kernels in {} ({e}); they will be compiled again next start", dir.display());
    }
}

/// How [`load_with`] gets what it needs: the cache, the compiler and the driver.
pub struct Sources<'a> {
    pub dir: Option<&'a Path>,
    /// The running NVRTC's version; `None` when NVRTC cannot be loaded (nothing is compiled).
    pub nvrtc: Option<&'a str>,
    /// Options of the CUBIN (real architecture) and PTX (virtual architecture) compiles.
    pub cubin_opts: &'a [String],
    pub ptx_opts: &'a [String],
    /// Compiles one kind; only called when `nvrtc` is `Some`.
    pub compile: &'a mut dyn FnMut(ImageKind) -> Result<Vec<u8>>,
}

/// Loads one module by the order in the module docs. `try_load` hands an image to the driver and
/// returns its refusal as text. Returns the module and whether its image came from the cache;
/// the error lists every attempt with the driver's or compiler's reason.
pub fn load_with<M>(src: &KernelSource, arch: u32, s: Sources<'_>, try_load: &mut dyn FnMut(&KernelImage) -> std::result::Result<M, String>) -> Result<(M, bool)> {
    let mut attempts: Vec<String> = Vec::new();
    let mut tried_running = [false; 2];
    let kinds = [(ImageKind::Cubin, s.cubin_opts), (ImageKind::Ptx, s.ptx_opts)];
    if let Some(dir) = s.dir {
        for (i, &(kind, opts)) in kinds.iter().enumerate() {
            for (version, path) in cached(dir, src, opts, kind, s.nvrtc) {
                let Ok(bytes) = std::fs::read(&path) else { continue };
                if !kind.plausible(&bytes) {
                    attempts.push(format!("{} is not a {} image (skipped)", path.display(), kind.extension()));
                    continue;
                }
                tried_running[i] |= Some(version.as_str()) == s.nvrtc;
                let image = KernelImage { kind, bytes, nvrtc: version.clone(), from_cache: true };
                match try_load(&image) {
                    Ok(m) => return Ok((m, true)),
                    Err(e) => attempts.push(format!("cached {} from NVRTC {version}: {e}", kind.extension())),
                }
            }
        }
    }
    if let Some(nvrtc) = s.nvrtc {
        for (i, &(kind, opts)) in kinds.iter().enumerate() {
            if tried_running[i] {
                continue;
            }
            let bytes = match (s.compile)(kind) {
                Ok(b) => b,
                Err(e) => {
                    attempts.push(format!("NVRTC {nvrtc} {}: {e}", kind.extension()));
                    continue;
                }
            };
            if let Some(dir) = s.dir {
                keep(dir, src, opts, nvrtc, kind, &bytes);
            }
            let image = KernelImage { kind, bytes, nvrtc: nvrtc.to_string(), from_cache: false };
            match try_load(&image) {
                Ok(m) => return Ok((m, false)),
                Err(e) => attempts.push(format!("fresh {} from NVRTC {nvrtc}: {e}", kind.extension())),
            }
        }
    } else if attempts.is_empty() {
        return Err(Error::Backend(format!(
            "no kernel image for kernels/{}.cu on sm_{arch}: NVRTC (libnvrtc.so.12) could not be loaded and the kernel cache{} holds none; install the CUDA runtime compiler or ship the cache `minisam cuda-compile --arch sm_{arch}` fills",
            src.name,
            s.dir.map(|d| format!(" ({})", d.display())).unwrap_or_default()
        )));
    } else {
        attempts.push("NVRTC could not be loaded, so nothing was compiled afresh".into());
    }
    Err(Error::Backend(format!("cannot load the kernels of {}.cu on sm_{arch}; tried: {}", src.name, attempts.join("; "))))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRC: KernelSource = KernelSource { name: "k", source: "extern \"C\" __global__ void f() {}", headers: &[] };
    const ELF: &[u8] = b"\x7fELF-cubin";
    const PTX: &[u8] = b".version 8.5\n.entry f() {}";

    fn temp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("minisam-kcache-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn opts(real: bool) -> Vec<String> {
        vec![if real { "--gpu-architecture=sm_87".into() } else { "--gpu-architecture=compute_87".into() }]
    }

    fn put(dir: &Path, version: &str, kind: ImageKind, bytes: &[u8]) {
        let o = opts(kind == ImageKind::Cubin);
        store(dir, &file_name(&SRC, &key(&SRC, &o), version, kind), bytes).unwrap();
    }

    /// The driver of a cart: refuses images from NVRTC versions above `newest`, and CUBIN
    /// entirely when `cubin` is false. Records what it was offered.
    fn driver(newest: (u32, u32), cubin: bool, offered: &mut Vec<String>) -> impl FnMut(&KernelImage) -> std::result::Result<String, String> + '_ {
        move |img| {
            let what = format!("{}{} {}", if img.from_cache { "cached " } else { "fresh " }, img.kind.extension(), img.nvrtc);
            offered.push(what.clone());
            if img.kind == ImageKind::Cubin && !cubin {
                return Err("CUDA_ERROR_NO_BINARY_FOR_GPU".into());
            }
            if version_order(&img.nvrtc) > newest {
                return Err("CUDA_ERROR_UNSUPPORTED_PTX_VERSION".into());
            }
            Ok(what)
        }
    }

    fn no_compile(_: ImageKind) -> Result<Vec<u8>> {
        panic!("nothing may be compiled here")
    }

    #[test]
    fn the_key_ignores_the_machine_and_the_report_but_not_the_source_or_arch() {
        let with = |extra: &str| {
            let mut o = opts(true);
            o.push(extra.into());
            key(&SRC, &o)
        };
        assert_eq!(key(&SRC, &opts(true)), with("--include-path=/opt/cuda/include"));
        assert_eq!(key(&SRC, &opts(true)), with("--ptxas-options=-v"));
        assert_ne!(key(&SRC, &opts(true)), key(&SRC, &opts(false)));
        assert_ne!(key(&SRC, &opts(true)), with("-DMINISAM_MMA_F16"));
        let other = KernelSource { name: "k", source: "changed", headers: &[] };
        assert_ne!(key(&SRC, &opts(true)), key(&other, &opts(true)));
    }

    /// A change to an included header (kernels/*.cuh) must not serve images of the old text.
    #[test]
    fn the_key_covers_the_included_headers() {
        use super::super::compile::KernelHeader;
        const H1: KernelHeader = KernelHeader { name: "h.cuh", source: "__device__ int one() { return 1; }" };
        const H2: KernelHeader = KernelHeader { name: "h.cuh", source: "__device__ int one() { return 2; }" };
        const RENAMED: KernelHeader = KernelHeader { name: "g.cuh", source: H1.source };
        let with = |headers: &'static [KernelHeader]| key(&KernelSource { headers, ..SRC }, &opts(true));
        assert_ne!(with(&[H1]), key(&SRC, &opts(true)));
        assert_ne!(with(&[H1]), with(&[H2]));
        assert_ne!(with(&[H1]), with(&[RENAMED]));
        assert_eq!(with(&[]), key(&SRC, &opts(true)));
    }

    #[test]
    fn cached_versions_come_running_first_then_newest_first() {
        let dir = temp_dir("order");
        for v in ["12.4", "12.10", "12.6", "11.8"] {
            put(&dir, v, ImageKind::Ptx, PTX);
        }
        put(&dir, "12.9", ImageKind::Cubin, ELF);
        let versions = |running| cached(&dir, &SRC, &opts(false), ImageKind::Ptx, running).into_iter().map(|(v, _)| v).collect::<Vec<_>>();
        assert_eq!(versions(Some("12.6")), ["12.6", "12.10", "12.4", "11.8"]);
        assert_eq!(versions(None), ["12.10", "12.6", "12.4", "11.8"]);
        assert_eq!(cached(&dir, &SRC, &opts(true), ImageKind::Cubin, None).len(), 1, "kinds and keys do not mix");
    }

    /// A cache shipped from CI (NVRTC 12.6) on a cart whose driver knows up to 12.4 and has no
    /// NVRTC: the 12.6 images are refused, an older cached PTX serves.
    #[test]
    fn an_image_too_new_for_the_driver_falls_back_to_an_older_cached_one() {
        let dir = temp_dir("older");
        put(&dir, "12.6", ImageKind::Cubin, ELF);
        put(&dir, "12.6", ImageKind::Ptx, PTX);
        put(&dir, "12.2", ImageKind::Ptx, PTX);
        let mut offered = Vec::new();
        let (c, p) = (opts(true), opts(false));
        let sources = Sources { dir: Some(&dir), nvrtc: None, cubin_opts: &c, ptx_opts: &p, compile: &mut no_compile };
        let (m, from_cache) = load_with(&SRC, 87, sources, &mut driver((12, 4), true, &mut offered)).unwrap();
        assert_eq!((m.as_str(), from_cache), ("cached ptx 12.2", true));
        assert_eq!(offered, ["cached cubin 12.6", "cached ptx 12.6", "cached ptx 12.2"]);
    }

    /// The cart has NVRTC 12.4 (matching its driver) and the shipped 12.6 cache: the CUBIN that
    /// NVRTC 12.4 makes afresh loads, and is cached for the next start.
    #[test]
    fn a_refused_cache_is_recompiled_by_the_running_nvrtc_and_kept() {
        let dir = temp_dir("fresh");
        put(&dir, "12.6", ImageKind::Cubin, ELF);
        put(&dir, "12.6", ImageKind::Ptx, PTX);
        let mut compiled = Vec::new();
        let mut compile = |kind: ImageKind| {
            compiled.push(kind);
            Ok(if kind == ImageKind::Cubin { ELF.to_vec() } else { PTX.to_vec() })
        };
        let mut offered = Vec::new();
        let (c, p) = (opts(true), opts(false));
        let sources = Sources { dir: Some(&dir), nvrtc: Some("12.4"), cubin_opts: &c, ptx_opts: &p, compile: &mut compile };
        let (m, from_cache) = load_with(&SRC, 87, sources, &mut driver((12, 4), true, &mut offered)).unwrap();
        assert_eq!((m.as_str(), from_cache), ("fresh cubin 12.4", false));
        assert_eq!(compiled, [ImageKind::Cubin]);
        assert_eq!(cached(&dir, &SRC, &c, ImageKind::Cubin, Some("12.4"))[0].0, "12.4", "the fresh CUBIN is cached");
        // Next start: the cached 12.4 CUBIN loads first, nothing is compiled.
        let mut offered = Vec::new();
        let sources = Sources { dir: Some(&dir), nvrtc: Some("12.4"), cubin_opts: &c, ptx_opts: &p, compile: &mut no_compile };
        let (m, from_cache) = load_with(&SRC, 87, sources, &mut driver((12, 4), true, &mut offered)).unwrap();
        assert_eq!((m.as_str(), from_cache), ("cached cubin 12.4", true));
    }

    /// Same-version images already refused are not compiled again (the compile would repeat
    /// them); the error names every attempt and the driver's reasons.
    #[test]
    fn when_nothing_loads_the_error_lists_every_attempt() {
        let dir = temp_dir("none");
        put(&dir, "12.6", ImageKind::Cubin, ELF);
        put(&dir, "12.6", ImageKind::Ptx, PTX);
        std::fs::write(dir.join(file_name(&SRC, &key(&SRC, &opts(false)), "12.5", ImageKind::Ptx)), b"truncated").unwrap();
        let mut offered = Vec::new();
        let (c, p) = (opts(true), opts(false));
        let sources = Sources { dir: Some(&dir), nvrtc: Some("12.6"), cubin_opts: &c, ptx_opts: &p, compile: &mut no_compile };
        let e = load_with(&SRC, 87, sources, &mut driver((12, 0), true, &mut offered)).unwrap_err().to_string();
        assert!(e.contains("cached cubin from NVRTC 12.6: CUDA_ERROR_UNSUPPORTED_PTX_VERSION"), "{e}");
        assert!(e.contains("cached ptx from NVRTC 12.6"), "{e}");
        assert!(e.contains("is not a ptx image (skipped)"), "{e}");
        assert_eq!(offered.len(), 2);
    }

    #[test]
    fn without_nvrtc_or_cache_the_error_says_what_to_install_or_ship() {
        let dir = temp_dir("empty");
        let (c, p) = (opts(true), opts(false));
        let sources = Sources { dir: Some(&dir), nvrtc: None, cubin_opts: &c, ptx_opts: &p, compile: &mut no_compile };
        let mut offered = Vec::new();
        let e = load_with(&SRC, 87, sources, &mut driver((12, 6), true, &mut offered)).unwrap_err().to_string();
        assert!(e.contains("NVRTC (libnvrtc.so.12) could not be loaded") && e.contains("cuda-compile --arch sm_87"), "{e}");
    }
}
