//! The device side of the CUDA backend: the driver (a GPU, or the simulator), loaded kernels, and
//! every byte of VRAM the backend owns (parameters, counted against the budget one by one, and
//! the activation arena, sized once). Kept apart from the `Backend` impl so that the op code reads
//! as shapes and launches only.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use cudarc::driver::{DeviceRepr, LaunchConfig};

use super::arena::Arena;
pub use super::cudarc_driver::{driver_err, driver_present};
use super::cudarc_driver::CudarcDriver;
use super::compile::MmaPrecision;
use super::driver::{DeviceGraph, DeviceMemory, Driver, KernelId};
use super::profile::{KernelProfile, LaunchTiming, PendingLaunch, Work};
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

/// Budget accounting shared by every parameter and the arena.
#[derive(Debug, Default)]
struct Ledger {
    params: u64,
    params_peak: u64,
    arena_bytes: u64,
}

/// A parameter's device memory; gives its bytes back to the ledger when dropped.
pub struct DeviceParam {
    _memory: Box<dyn DeviceMemory>,
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
    _memory: Box<dyn DeviceMemory>,
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
    pub gemm_tc: [KernelId; 3],
    pub gemm_simt: [KernelId; 3],
    /// (largest head dim, kernel), ascending: the f32 CUDA-core attention.
    pub attention: Vec<(usize, KernelId)>,
    /// (largest head dim, kernel), ascending: the tensor-core (FlashAttention-2 style) attention.
    pub attention_tc: Vec<(usize, KernelId)>,
    pub layer_norm_rows: KernelId,
    pub layer_norm_nchw: KernelId,
    pub permute: KernelId,
    pub copy_block: KernelId,
    pub pad_hw: KernelId,
    pub add_broadcast: KernelId,
    pub scale_act: KernelId,
    pub resize_bilinear: KernelId,
    pub conv2d_direct: KernelId,
}

/// Every kernel the backend launches, as `(module, kernel)`, in the order [`Kernels`] takes them.
const KERNEL_NAMES: [(&str, &str); 23] = [
    ("nf4_gemm", "gemm_tc_f32w"),
    ("nf4_gemm", "gemm_tc_f16w"),
    ("nf4_gemm", "gemm_tc_nf4w"),
    ("nf4_gemm", "gemm_simt_f32w"),
    ("nf4_gemm", "gemm_simt_f16w"),
    ("nf4_gemm", "gemm_simt_nf4w"),
    ("attention", "attention_d32"),
    ("attention", "attention_d64"),
    ("attention", "attention_d96"),
    ("attention", "attention_d128"),
    ("attention", "attention_tc_d16"),
    ("attention", "attention_tc_d32"),
    ("attention", "attention_tc_d64"),
    ("attention", "attention_tc_d80"),
    ("norm", "layer_norm_rows"),
    ("norm", "layer_norm_nchw"),
    ("elementwise", "permute"),
    ("elementwise", "copy_block"),
    ("elementwise", "pad_hw"),
    ("elementwise", "add_broadcast"),
    ("elementwise", "scale_act"),
    ("resize", "resize_bilinear"),
    ("conv", "conv2d_direct"),
];

impl Kernels {
    fn from_ids(ids: &[KernelId]) -> Result<Self> {
        let ids: &[KernelId; 23] = ids.try_into().map_err(|_| Error::Backend(format!("the driver loaded {} kernels for {} names", ids.len(), KERNEL_NAMES.len())))?;
        let [t0, t1, t2, s0, s1, s2, a32, a64, a96, a128, tc16, tc32, tc64, tc80, ln_rows, ln_nchw, permute, copy_block, pad_hw, add_broadcast, scale_act, resize_bilinear, conv2d_direct] = *ids;
        Ok(Kernels {
            gemm_tc: [t0, t1, t2],
            gemm_simt: [s0, s1, s2],
            attention: vec![(32, a32), (64, a64), (96, a96), (128, a128)],
            attention_tc: vec![(16, tc16), (32, tc32), (64, tc64), (80, tc80)],
            layer_norm_rows: ln_rows,
            layer_norm_nchw: ln_nchw,
            permute,
            copy_block,
            pad_hw,
            add_broadcast,
            scale_act,
            resize_bilinear,
            conv2d_direct,
        })
    }
}

/// The driver, kernels and memory of one CUDA backend.
pub struct Device {
    driver: Arc<dyn Driver>,
    pub kernels: Kernels,
    pub options: CudaOptions,
    pub name: String,
    /// Compute capability as `major * 10 + minor`.
    pub arch: u32,
    /// Kernel modules that came from the PTX cache rather than NVRTC.
    pub cached_modules: usize,
    ledger: Arc<Mutex<Ledger>>,
    arena: Mutex<Option<Arc<ArenaBacking>>>,
    /// The entry point each loaded kernel stands for, so a profile names kernels, not ops.
    kernel_names: Vec<(KernelId, &'static str)>,
    /// Whether launches are timed and recorded (`Device::set_profiling`); off, a launch pays
    /// this one load and nothing else.
    profiling: AtomicBool,
    profiled: Mutex<Vec<PendingLaunch>>,
}

impl Device {
    /// Opens GPU `options.device` through libcuda and compiles (or loads cached) kernels for its
    /// architecture. Every failure is an `Err` naming the cause.
    pub fn open(options: CudaOptions) -> Result<Self> {
        let driver = CudarcDriver::open(options.device)?;
        Self::with_driver(options, Arc::new(driver))
    }

    /// The backend's device on any [`Driver`] (the simulator's, in CI).
    pub fn with_driver(options: CudaOptions, driver: Arc<dyn Driver>) -> Result<Self> {
        let loaded = driver.load_kernels(options.precision, &KERNEL_NAMES)?;
        let kernels = Kernels::from_ids(&loaded.ids)?;
        let kernel_names = loaded.ids.iter().zip(KERNEL_NAMES).map(|(&id, (_, name))| (id, name)).collect();
        Ok(Self {
            name: driver.name(),
            arch: driver.arch(),
            driver,
            kernels,
            options,
            cached_modules: loaded.cached_modules,
            ledger: Arc::default(),
            arena: Mutex::new(None),
            kernel_names,
            profiling: AtomicBool::new(false),
            profiled: Mutex::default(),
        })
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
        let upload = || -> Result<Box<dyn DeviceMemory>> {
            let memory = self.driver.alloc_zeroed(bytes.len())?;
            // SAFETY: the allocation holds at least bytes.len() bytes.
            unsafe { self.driver.htod(memory.ptr(), bytes) }.map_err(|e| Error::Backend(format!("uploading {what}: {e}")))?;
            Ok(memory)
        };
        match upload() {
            Ok(memory) => {
                let ptr = memory.ptr();
                Ok(DeviceParam { _memory: memory, ptr, bytes: size, ledger: self.ledger.clone() })
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
        self.driver.begin_capture()
    }

    /// Ends the capture begun by [`Device::begin_capture`] (also after a failed launch, to leave
    /// capture mode) and instantiates the graph.
    pub fn end_capture(&self) -> Result<Box<dyn DeviceGraph>> {
        self.driver.end_capture()
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
        let (free, _total) = self.driver.mem_get_info()?;
        if free < want {
            return Err(Error::Backend(format!(
                "the GPU has {:.1} MiB free but the activation arena needs {:.1} MiB under --vram-budget {:.1} MiB; lower the budget or free the GPU",
                free as f64 / MIB,
                want as f64 / MIB,
                budget as f64 / MIB
            )));
        }
        let memory = self.driver.alloc_zeroed(want as usize).map_err(|e| Error::Backend(format!("allocating the {:.1} MiB activation arena: {e}", want as f64 / MIB)))?;
        let base = memory.ptr();
        l.arena_bytes = want;
        Ok(Arc::new(ArenaBacking { _memory: memory, arena: Arena::new(base, want as usize) }))
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
            // SAFETY: the block holds `bytes` bytes.
            unsafe { self.driver.memset_d8(block.ptr(), 0xff, bytes) }?;
        }
        Ok(block)
    }

    pub fn upload_f32(&self, dst: u64, data: &[f32]) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        // SAFETY: dst is a block of at least data.len() floats; the driver stages the copy before
        // returning, so `data` may be dropped afterwards.
        unsafe { self.driver.htod(dst, f32_bytes(data)) }
    }

    pub fn download_f32(&self, src: u64, len: usize) -> Result<Vec<f32>> {
        let mut out = vec![0.0f32; len];
        if len == 0 {
            return Ok(out);
        }
        let mut bytes = vec![0u8; len * 4];
        // SAFETY: src holds at least len floats; dtoh synchronises before returning.
        unsafe { self.driver.dtoh(&mut bytes, src) }?;
        for (v, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
            *v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
        Ok(out)
    }

    pub fn copy_d2d(&self, dst: u64, src: u64, floats: usize) -> Result<()> {
        if floats == 0 {
            return Ok(());
        }
        // SAFETY: both are blocks of at least `floats` floats.
        unsafe { self.driver.dtod(dst, src, floats * 4) }
    }

    /// Waits for all queued work; asynchronous kernel faults surface here.
    pub fn sync(&self) -> Result<()> {
        self.driver.synchronize()
    }

    /// Launches `f` with one by-value parameter record; `work` is what the launch must at least
    /// do, for profiles.
    pub fn launch_record<P: DeviceRepr>(&self, what: &str, f: &KernelId, cfg: LaunchConfig, p: &P, work: Work) -> Result<()> {
        self.launch_args(what, f, cfg, &[Arg::record(p)], work)
    }

    /// Launches `f` with a list of arguments (device addresses and scalars, each 8 or 4 bytes);
    /// `work` is what the launch must at least do, recorded with its time while profiling.
    pub fn launch_args(&self, what: &str, f: &KernelId, cfg: LaunchConfig, args: &[Arg], work: Work) -> Result<()> {
        let bytes: Vec<Vec<u8>> = args.iter().map(Arg::to_bytes).collect();
        let params: Vec<&[u8]> = bytes.iter().map(Vec::as_slice).collect();
        // SAFETY: the backend builds each launch's arguments for the kernel's signature, with
        // device addresses of live blocks and parameters sized for the launch's geometry.
        let launch = || unsafe { self.driver.launch(*f, cfg, &params) }.map_err(|e| Error::Backend(format!("launching {what}: {e}")));
        if !self.profiling.load(Relaxed) {
            return launch();
        }
        let start = self.driver.record_event()?;
        launch()?;
        let end = self.driver.record_event()?;
        let kernel = self.kernel_names.iter().find(|(id, _)| id == f).map_or("unnamed kernel", |&(_, name)| name);
        lock(&self.profiled).push(PendingLaunch { kernel, work, start, end });
        Ok(())
    }

    /// Turns the per-launch profile on or off (see `cuda::profile`). Launches from every thread
    /// are recorded while it is on.
    pub fn set_profiling(&self, on: bool) {
        self.profiling.store(on, Relaxed);
    }

    pub fn profiling(&self) -> bool {
        self.profiling.load(Relaxed)
    }

    /// The launches recorded since the last call, timed (waits for the last of them to finish).
    pub fn take_profile(&self) -> Result<KernelProfile> {
        let pending = std::mem::take(&mut *lock(&self.profiled));
        let timed = |p: PendingLaunch| Ok(LaunchTiming { kernel: p.kernel, work: p.work, ms: self.driver.elapsed_ms(p.start.as_ref(), p.end.as_ref())? as f64 });
        let launches = pending.into_iter().map(timed).collect::<Result<_>>()?;
        Ok(KernelProfile { launches })
    }

    pub fn report(&self) -> VramReport {
        let l = self.ledger.lock().unwrap_or_else(|p| p.into_inner());
        let arena_peak = self.arena.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map_or(0, |a| a.arena.lock().peak() as u64);
        VramReport { budget: self.options.vram_budget, params: l.params, params_peak: l.params_peak, arena: l.arena_bytes, arena_peak }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn f32_bytes(data: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and any byte is a valid u8; the length is exact.
    unsafe { std::slice::from_raw_parts(data.as_ptr() as *const u8, std::mem::size_of_val(data)) }
}

/// One kernel argument of [`Device::launch_args`].
pub enum Arg {
    U64(u64),
    I64(i64),
    F32(f32),
    /// A by-value parameter record's bytes (`#[repr(C)]`, laid out as the C struct).
    Record(Vec<u8>),
}

impl Arg {
    /// A parameter record by value.
    pub fn record<P: DeviceRepr>(p: &P) -> Arg {
        // SAFETY: DeviceRepr records are `#[repr(C)]` plain data without padding (params.rs),
        // read for exactly their size.
        Arg::Record(unsafe { std::slice::from_raw_parts(p as *const P as *const u8, std::mem::size_of::<P>()) }.to_vec())
    }

    /// The bytes cuLaunchKernel copies for this parameter.
    fn to_bytes(&self) -> Vec<u8> {
        match self {
            Arg::U64(v) => v.to_ne_bytes().to_vec(),
            Arg::I64(v) => v.to_ne_bytes().to_vec(),
            Arg::F32(v) => v.to_ne_bytes().to_vec(),
            Arg::Record(b) => b.clone(),
        }
    }
}

/// A 1-D grid-stride launch over `n` elements.
pub fn grid_for(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, 65_535) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}
