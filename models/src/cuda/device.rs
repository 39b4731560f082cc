//! The device side of the CUDA backend: context, stream, loaded kernels, and every byte of VRAM
//! the backend owns (parameters, counted against the budget one by one, and the activation
//! arena, sized once). Kept apart from the `Backend` impl so that the op code reads as shapes
//! and launches only.

use std::sync::{Arc, Mutex};

use cudarc::driver::result as drv;
use cudarc::driver::{sys, CudaContext, CudaFunction, CudaGraph, CudaSlice, CudaStream, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::Ptx;

use super::arena::Arena;
use super::compile::{self, MmaPrecision};
use crate::{Error, Result};

const MIB: f64 = 1024.0 * 1024.0;

/// How the CUDA backend is set up.
#[derive(Clone, Debug)]
pub struct CudaOptions {
    /// Device ordinal.
    pub device: usize,
    /// Bytes of VRAM the backend may take in all: weights + parameters + activation arena.
    pub vram_budget: u64,
    /// Part of the budget kept out of the arena for parameters made after the first frame (LoRA
    /// adapters are bound after the model loads).
    pub weight_reserve: u64,
    pub precision: MmaPrecision,
    /// Fill every fresh activation with NaN before the kernel that writes it (checks use this to
    /// catch unwritten elements).
    pub poison: bool,
    /// Capture the image encoder's launches as a CUDA graph on the first frame and replay it on
    /// later frames (`Backend::run_frame`); off, every frame launches kernel by kernel.
    pub graphs: bool,
}

impl Default for CudaOptions {
    fn default() -> Self {
        Self { device: 0, vram_budget: 1 << 30, weight_reserve: 64 << 20, precision: MmaPrecision::Bf16, poison: false, graphs: true }
    }
}

/// What the backend holds on the device, for logs and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct VramReport {
    pub budget: u64,
    /// Parameters (weights, biases, tables) live now / at most.
    pub params: u64,
    pub params_peak: u64,
    /// Activation arena: reserved once, and its high-water mark.
    pub arena: u64,
    pub arena_peak: u64,
}

impl VramReport {
    /// Peak bytes actually used: parameters plus the arena's high-water mark.
    pub fn peak_used(&self) -> u64 {
        self.params_peak + self.arena_peak
    }
}

impl std::fmt::Display for VramReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "VRAM peak {:.1} MiB (parameters {:.1} MiB + activations {:.1} MiB of a {:.1} MiB arena; budget {:.1} MiB)",
            self.peak_used() as f64 / MIB,
            self.params_peak as f64 / MIB,
            self.arena_peak as f64 / MIB,
            self.arena as f64 / MIB,
            self.budget as f64 / MIB
        )
    }
}

pub fn driver_err(what: &str, e: drv::DriverError) -> Error {
    Error::Backend(format!("CUDA {what}: {e:?}"))
}

/// Budget accounting shared by every parameter and the arena.
#[derive(Debug, Default)]
struct Ledger {
    params: u64,
    params_peak: u64,
    arena_bytes: u64,
}

/// A parameter's device memory; gives its bytes back to the ledger when dropped.
pub struct DeviceParam {
    _slice: CudaSlice<u8>,
    pub ptr: u64,
    bytes: u64,
    ledger: Arc<Mutex<Ledger>>,
}

impl Drop for DeviceParam {
    fn drop(&mut self) {
        let mut l = self.ledger.lock().unwrap_or_else(|p| p.into_inner());
        l.params -= self.bytes;
    }
}

/// The arena's device memory and its free list.
pub struct ArenaBacking {
    _slice: CudaSlice<u8>,
    pub arena: Arena,
}

/// One activation block in the arena; freed when dropped.
pub struct Block {
    backing: Arc<ArenaBacking>,
    offset: usize,
    size: usize,
}

impl Block {
    pub fn ptr(&self) -> u64 {
        self.backing.arena.base + self.offset as u64
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        self.backing.arena.lock().free(self.offset, self.size);
    }
}

/// Every kernel entry point, looked up once at start-up.
pub struct Kernels {
    /// Indexed by weight kind (f32, f16, NF4).
    pub gemm_tc: [CudaFunction; 3],
    pub gemm_simt: [CudaFunction; 3],
    /// (largest head dim, kernel), ascending.
    pub attention: Vec<(usize, CudaFunction)>,
    pub layer_norm_rows: CudaFunction,
    pub layer_norm_nchw: CudaFunction,
    pub permute: CudaFunction,
    pub copy_block: CudaFunction,
    pub pad_hw: CudaFunction,
    pub add_broadcast: CudaFunction,
    pub scale_act: CudaFunction,
    pub resize_bilinear: CudaFunction,
    pub conv2d_direct: CudaFunction,
}

/// Context, stream, kernels and memory of one CUDA backend.
pub struct Device {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub kernels: Kernels,
    pub options: CudaOptions,
    pub name: String,
    /// Compute capability as `major * 10 + minor`.
    pub arch: u32,
    /// Kernel modules that came from the PTX cache rather than NVRTC.
    pub cached_modules: usize,
    ledger: Arc<Mutex<Ledger>>,
    arena: Mutex<Option<Arc<ArenaBacking>>>,
}

/// Whether libcuda can be loaded at all (cudarc panics on first use when it cannot).
pub fn driver_present() -> bool {
    std::panic::catch_unwind(|| unsafe { cudarc::driver::sys::is_culib_present() }).unwrap_or(false)
}

impl Device {
    /// Opens device `options.device`, compiles (or loads cached) kernels for its architecture.
    /// Every failure is an `Err` naming the cause; cudarc panics are caught and reported too.
    pub fn open(options: CudaOptions) -> Result<Self> {
        if !driver_present() {
            return Err(Error::Backend("no CUDA driver: libcuda.so could not be loaded".into()));
        }
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Self::open_inner(options))) {
            Ok(r) => r,
            Err(p) => {
                let why = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default();
                Err(Error::Backend(format!("CUDA initialisation failed inside cudarc: {why}")))
            }
        }
    }

    fn open_inner(options: CudaOptions) -> Result<Self> {
        let count = CudaContext::device_count().map_err(|e| driver_err("cuInit / device count (is a GPU visible to this process?)", e))?;
        if count <= 0 {
            return Err(Error::Backend("no CUDA device found".into()));
        }
        if options.device >= count as usize {
            return Err(Error::Backend(format!("CUDA device {} asked for, but only {count} present", options.device)));
        }
        let ctx = CudaContext::new(options.device).map_err(|e| driver_err("context creation", e))?;
        // One stream, ordered: the arena's reuse rule (see arena.rs) needs nothing more, and
        // cudarc's per-buffer events would only add work to every launch.
        unsafe { ctx.disable_event_tracking() };
        let (major, minor) = ctx.compute_capability().map_err(|e| driver_err("compute capability", e))?;
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        if major < 8 {
            return Err(Error::Backend(format!(
                "{name} has compute capability {major}.{minor}; the CUDA backend needs 8.0 or newer (bf16 tensor cores: Ampere, Orin, Hopper)"
            )));
        }
        let arch = (major * 10 + minor) as u32;
        // A stream of our own rather than the legacy default stream, which cannot be captured
        // into a CUDA graph.
        let stream = ctx.new_stream().map_err(|e| driver_err("stream creation", e))?;
        let mut cached_modules = 0;
        let mut modules = std::collections::HashMap::new();
        for src in compile::SOURCES {
            let (ptx, cached) = compile::ptx_for(src, arch, options.precision)?;
            cached_modules += cached as usize;
            let module = ctx.load_module(Ptx::from_src(ptx)).map_err(|e| driver_err(&format!("loading the {} kernels (driver older than the PTX?)", src.name), e))?;
            modules.insert(src.name, module);
        }
        let f = |module: &str, name: &str| -> Result<CudaFunction> {
            modules[module].load_function(name).map_err(|e| driver_err(&format!("kernel {name} in {module}.cu"), e))
        };
        let kernels = Kernels {
            gemm_tc: [f("nf4_gemm", "gemm_tc_f32w")?, f("nf4_gemm", "gemm_tc_f16w")?, f("nf4_gemm", "gemm_tc_nf4w")?],
            gemm_simt: [f("nf4_gemm", "gemm_simt_f32w")?, f("nf4_gemm", "gemm_simt_f16w")?, f("nf4_gemm", "gemm_simt_nf4w")?],
            attention: vec![
                (32, f("attention", "attention_d32")?),
                (64, f("attention", "attention_d64")?),
                (96, f("attention", "attention_d96")?),
                (128, f("attention", "attention_d128")?),
            ],
            layer_norm_rows: f("norm", "layer_norm_rows")?,
            layer_norm_nchw: f("norm", "layer_norm_nchw")?,
            permute: f("elementwise", "permute")?,
            copy_block: f("elementwise", "copy_block")?,
            pad_hw: f("elementwise", "pad_hw")?,
            add_broadcast: f("elementwise", "add_broadcast")?,
            scale_act: f("elementwise", "scale_act")?,
            resize_bilinear: f("resize", "resize_bilinear")?,
            conv2d_direct: f("conv", "conv2d_direct")?,
        };
        Ok(Self { ctx, stream, kernels, options, name, arch, cached_modules, ledger: Arc::default(), arena: Mutex::new(None) })
    }

    fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(|e| driver_err("binding the context", e))
    }

    /// Uploads a parameter (weight, bias, table) after checking it fits the budget.
    pub fn upload_param(&self, what: &str, bytes: &[u8]) -> Result<DeviceParam> {
        let size = bytes.len().max(1) as u64;
        {
            let mut l = self.ledger.lock().unwrap_or_else(|p| p.into_inner());
            let committed = l.params + l.arena_bytes;
            if committed + size > self.options.vram_budget {
                return Err(Error::Backend(format!(
                    "VRAM budget exceeded: {what} needs {:.2} MiB but {:.1} of {:.1} MiB are committed ({:.1} MiB parameters, {:.1} MiB activation arena); raise --vram-budget",
                    size as f64 / MIB,
                    committed as f64 / MIB,
                    self.options.vram_budget as f64 / MIB,
                    l.params as f64 / MIB,
                    l.arena_bytes as f64 / MIB
                )));
            }
            l.params += size;
            l.params_peak = l.params_peak.max(l.params);
        }
        // From here on, a failure must give the bytes back: the guard does it on drop.
        let upload = || -> Result<CudaSlice<u8>> {
            self.bind()?;
            if bytes.is_empty() {
                self.stream.alloc_zeros::<u8>(1).map_err(|e| driver_err("allocation", e))
            } else {
                self.stream.clone_htod(bytes).map_err(|e| driver_err(&format!("uploading {what}"), e))
            }
        };
        match upload() {
            Ok(slice) => {
                let ptr = raw_ptr(&slice, &self.stream);
                Ok(DeviceParam { _slice: slice, ptr, bytes: size, ledger: self.ledger.clone() })
            }
            Err(e) => {
                self.ledger.lock().unwrap_or_else(|p| p.into_inner()).params -= size;
                Err(e)
            }
        }
    }

    /// Starts capturing this thread's launches on the stream into a graph (nothing runs until
    /// the graph is launched). Thread-local mode: another thread's unrelated CUDA calls neither
    /// join the graph nor break the capture.
    pub fn begin_capture(&self) -> Result<()> {
        self.stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).map_err(|e| driver_err("beginning a graph capture", e))
    }

    /// Ends the capture begun by [`Device::begin_capture`] (also after a failed launch, to leave
    /// capture mode) and instantiates the graph.
    pub fn end_capture(&self) -> Result<CudaGraph> {
        match self.stream.end_capture(sys::CUgraphInstantiate_flags(0)) {
            Ok(Some(g)) => Ok(g),
            Ok(None) => Err(Error::Backend("CUDA graph capture recorded nothing".into())),
            Err(e) => Err(driver_err("ending a graph capture", e)),
        }
    }

    /// The arena, reserved on first use with all of the budget not taken by parameters, less
    /// the weight reserve (until [`Device::resize_arena`] sizes it to what frames need).
    pub fn arena(&self) -> Result<Arc<ArenaBacking>> {
        let mut slot = self.arena.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(a) = slot.as_ref() {
            return Ok(a.clone());
        }
        let backing = self.create_arena(None)?;
        *slot = Some(backing.clone());
        Ok(backing)
    }

    /// Replaces the activation arena with one of `bytes` (never more than the budget allows):
    /// once a warm-up frame has shown what a frame needs, the rest of the budget goes back to
    /// the GPU (on a Jetson, to the rest of the system). Refused while any block lives in the old
    /// arena (a tensor, a CUDA graph's span, a cached embedding). Returns the new size.
    pub fn resize_arena(&self, bytes: u64) -> Result<u64> {
        let mut slot = self.arena.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = slot.as_ref() {
            if Arc::strong_count(old) > 1 || old.arena.lock().in_use() > 0 {
                return Err(Error::Backend("the activation arena cannot be resized while tensors live in it".into()));
            }
        }
        // No queued kernel may still use the old memory when it is freed.
        self.sync()?;
        *slot = None;
        self.ledger.lock().unwrap_or_else(|p| p.into_inner()).arena_bytes = 0;
        let backing = self.create_arena(Some(bytes))?;
        let size = backing.arena.lock().capacity() as u64;
        *slot = Some(backing);
        Ok(size)
    }

    /// Allocates an arena of the budget left after parameters and the weight reserve, or of
    /// `limit` bytes when that is smaller, and enters it in the ledger.
    fn create_arena(&self, limit: Option<u64>) -> Result<Arc<ArenaBacking>> {
        let mut l = self.ledger.lock().unwrap_or_else(|p| p.into_inner());
        let budget = self.options.vram_budget;
        let available = budget.saturating_sub(l.params).saturating_sub(self.options.weight_reserve);
        if available < (16 << 20) {
            return Err(Error::Backend(format!(
                "VRAM budget of {:.1} MiB leaves {:.1} MiB for activations after {:.1} MiB of parameters and a {:.1} MiB reserve; raise --vram-budget",
                budget as f64 / MIB,
                available as f64 / MIB,
                l.params as f64 / MIB,
                self.options.weight_reserve as f64 / MIB
            )));
        }
        let want = limit.map_or(available, |b| b.min(available));
        self.bind()?;
        let (free, _total) = self.ctx.mem_get_info().map_err(|e| driver_err("memory info", e))?;
        if (free as u64) < want {
            return Err(Error::Backend(format!(
                "the GPU has {:.1} MiB free but the activation arena needs {:.1} MiB under --vram-budget {:.1} MiB; lower the budget or free the GPU",
                free as f64 / MIB,
                want as f64 / MIB,
                budget as f64 / MIB
            )));
        }
        let slice = self.stream.alloc_zeros::<u8>(want as usize).map_err(|e| driver_err(&format!("allocating the {:.1} MiB activation arena", want as f64 / MIB), e))?;
        let base = raw_ptr(&slice, &self.stream);
        l.arena_bytes = want;
        Ok(Arc::new(ArenaBacking { _slice: slice, arena: Arena::new(base, want as usize) }))
    }

    /// A block of `floats` f32 from the arena (NaN-filled when poisoning).
    pub fn alloc(&self, floats: usize) -> Result<Block> {
        let backing = self.arena()?;
        let bytes = floats * 4;
        let got = backing.arena.lock().alloc(bytes);
        let Some((offset, size)) = got else {
            let l = backing.arena.lock();
            return Err(Error::Backend(format!(
                "activation arena exhausted: {:.2} MiB asked, largest free block {:.2} MiB ({:.1} of {:.1} MiB in use); raise --vram-budget",
                bytes as f64 / MIB,
                l.largest_free() as f64 / MIB,
                l.in_use() as f64 / MIB,
                l.capacity() as f64 / MIB
            )));
        };
        let block = Block { backing, offset, size };
        if self.options.poison && bytes > 0 {
            // 0xFF bytes are a NaN in f32.
            unsafe { drv::memset_d8_async(block.ptr(), 0xff, bytes, self.stream.cu_stream()) }.map_err(|e| driver_err("poisoning", e))?;
        }
        Ok(block)
    }

    pub fn upload_f32(&self, dst: u64, data: &[f32]) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: dst is a block of at least data.len() floats; from pageable memory the driver
        // stages the copy before returning, so `data` may be dropped afterwards.
        unsafe { drv::memcpy_htod_async(dst, data, self.stream.cu_stream()) }.map_err(|e| driver_err("host-to-device copy", e))
    }

    pub fn download_f32(&self, src: u64, len: usize) -> Result<Vec<f32>> {
        let mut out = vec![0.0f32; len];
        if len == 0 {
            return Ok(out);
        }
        self.bind()?;
        // SAFETY: src holds at least len floats; the stream is synchronised before `out` is read.
        unsafe { drv::memcpy_dtoh_async(&mut out, src, self.stream.cu_stream()) }.map_err(|e| driver_err("device-to-host copy", e))?;
        self.sync()?;
        Ok(out)
    }

    pub fn copy_d2d(&self, dst: u64, src: u64, floats: usize) -> Result<()> {
        if floats == 0 {
            return Ok(());
        }
        self.bind()?;
        unsafe { drv::memcpy_dtod_async(dst, src, floats * 4, self.stream.cu_stream()) }.map_err(|e| driver_err("device-to-device copy", e))
    }

    /// Waits for all queued work; asynchronous kernel faults surface here.
    pub fn sync(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| driver_err("kernel execution", e))
    }

    /// Launches `f` with one by-value parameter record.
    pub fn launch_record<P: DeviceRepr>(&self, what: &str, f: &CudaFunction, cfg: LaunchConfig, p: &P) -> Result<()> {
        let mut b = self.stream.launch_builder(f);
        b.arg(p);
        unsafe { b.launch(cfg) }.map(|_| ()).map_err(|e| driver_err(&format!("launching {what}"), e))
    }

    /// Launches `f` with a list of arguments (device addresses and scalars, each 8 or 4 bytes).
    pub fn launch_args(&self, what: &str, f: &CudaFunction, cfg: LaunchConfig, args: &[Arg]) -> Result<()> {
        let mut b = self.stream.launch_builder(f);
        for a in args {
            match a {
                Arg::U64(v) => b.arg(v),
                Arg::I64(v) => b.arg(v),
                Arg::F32(v) => b.arg(v),
            };
        }
        unsafe { b.launch(cfg) }.map(|_| ()).map_err(|e| driver_err(&format!("launching {what}"), e))
    }

    pub fn report(&self) -> VramReport {
        let l = self.ledger.lock().unwrap_or_else(|p| p.into_inner());
        let arena_peak = self.arena.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map_or(0, |a| a.arena.lock().peak() as u64);
        VramReport { budget: self.options.vram_budget, params: l.params, params_peak: l.params_peak, arena: l.arena_bytes, arena_peak }
    }
}

/// The device address of `slice` (event tracking is off, so the guard cudarc returns is inert).
fn raw_ptr(slice: &CudaSlice<u8>, stream: &CudaStream) -> u64 {
    let (ptr, _sync) = slice.device_ptr(stream);
    ptr
}

/// One kernel argument of [`Device::launch_args`].
pub enum Arg {
    U64(u64),
    I64(i64),
    F32(f32),
}

/// A 1-D grid-stride launch over `n` elements.
pub fn grid_for(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, 65_535) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}
