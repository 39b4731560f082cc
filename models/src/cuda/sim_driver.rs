//! [`Driver`] on the SIMT simulator (`minisam-gpusim`, cargo feature `gpusim`): the same
//! `kernels/*.cu`, compiled as host C++, run on the CPU, so that CI drives the unmodified
//! [`super::CudaBackend`] through every call it makes on a GPU.
//!
//! - Device memory is 256-byte-aligned host memory; a device address is its host address.
//!   Every copy and memset is checked to lie inside one live allocation (a GPU gives no such
//!   check), also when a graph replays, so a graph that outlives its memory fails here.
//! - The stream is a mutex: operations run one after another, each to completion before the call
//!   returns, which is one of the orders a real stream may take.
//! - Capture records launches (with a copy of their parameter bytes, as cuLaunchKernel copies
//!   them), memsets and device-to-device copies instead of running them; a graph launch replays
//!   the list on the captured addresses. As on a GPU, synchronising or copying from or to the host
//!   during capture is an error (and spoils the capture), as is allocating on the capturing
//!   thread.
//! - Each launch's parameter sizes are checked against the kernel's C++ signature, which the real
//!   driver cannot do.
//! - A timing event is the host clock when it is recorded: every operation before it has run by
//!   then. Events are refused during capture, as `CudarcDriver` refuses them.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use cudarc::driver::LaunchConfig;
use minisam_gpusim::{Dim3, Kernel, LaunchOptions};

use super::compile::MmaPrecision;
use super::driver::{DeviceEvent, DeviceGraph, DeviceMemory, Driver, KernelId, LoadedKernels};
use crate::{Error, Result};

/// How the simulator runs kernels.
#[derive(Clone, Copy, Debug)]
pub struct SimOptions {
    /// Seed of the block schedules (each launch draws its own from it and its index).
    pub seed: u64,
    /// OS threads sharing each launch's blocks (results are the same for any count).
    pub threads: u32,
    /// Device memory the simulator claims to have (`mem_get_info`'s total).
    pub memory: u64,
}

impl Default for SimOptions {
    fn default() -> Self {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
        Self { seed: 0x5eed, threads, memory: 16 << 30 }
    }
}

/// The simulator behind the [`Driver`] trait. Cheap to clone: clones share one device.
#[derive(Clone)]
pub struct SimDriver(Arc<Inner>);

struct Inner {
    options: SimOptions,
    kernels: Mutex<Vec<Kernel>>,
    stream: Mutex<Stream>,
    /// Live allocations: start address → bytes.
    memory: Mutex<BTreeMap<u64, usize>>,
}

/// One queued operation, as a graph records it.
#[derive(Clone)]
enum Op {
    Launch { kernel: KernelId, cfg: LaunchConfig, params: Vec<Vec<u8>> },
    Memset { dst: u64, value: u8, bytes: usize },
    Dtod { dst: u64, src: u64, bytes: usize },
}

#[derive(Default)]
struct Stream {
    launches: u64,
    /// Launches run so far per kernel name, graph replays included.
    launches_by_kernel: BTreeMap<&'static str, u64>,
    capture: Option<Capture>,
}

struct Capture {
    thread: std::thread::ThreadId,
    ops: Vec<Op>,
    /// Why the capture can no longer be instantiated (CUDA's "invalidated" capture).
    spoiled: Option<String>,
}

fn sim_err(msg: String) -> Error {
    Error::Backend(format!("simulated CUDA device: {msg}"))
}

impl SimDriver {
    pub fn new(options: SimOptions) -> Self {
        Self(Arc::new(Inner { options, kernels: Mutex::default(), stream: Mutex::default(), memory: Mutex::default() }))
    }

    /// How many times each kernel has run on this device (graph replays included), by name: what
    /// tests hold a profile's launch counts to.
    pub fn launches_by_kernel(&self) -> BTreeMap<&'static str, u64> {
        lock(&self.0.stream).launches_by_kernel.clone()
    }
}

impl Default for SimDriver {
    fn default() -> Self {
        Self::new(SimOptions::default())
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Inner {
    /// Refuses `what` on `[ptr, ptr + bytes)` unless one live allocation holds all of it.
    fn check_range(&self, what: &str, ptr: u64, bytes: usize) -> Result<()> {
        let memory = lock(&self.memory);
        let inside = memory.range(..=ptr).next_back().is_some_and(|(&start, &len)| ptr.checked_add(bytes as u64).is_some_and(|end| end <= start + len as u64));
        if inside {
            Ok(())
        } else {
            Err(sim_err(format!("{what} of {bytes} bytes at {ptr:#x} is not inside one live allocation")))
        }
    }

    /// Runs one operation now.
    fn execute(&self, stream: &mut Stream, op: &Op) -> Result<()> {
        match op {
            Op::Memset { dst, value, bytes } => {
                self.check_range("memset", *dst, *bytes)?;
                // SAFETY: checked to lie inside a live allocation.
                unsafe { std::ptr::write_bytes(*dst as *mut u8, *value, *bytes) };
            }
            Op::Dtod { dst, src, bytes } => {
                self.check_range("device-to-device copy (destination)", *dst, *bytes)?;
                self.check_range("device-to-device copy (source)", *src, *bytes)?;
                // SAFETY: both checked; `copy` allows overlap, as cuMemcpyDtoD does not promise
                // anything for it either.
                unsafe { std::ptr::copy(*src as *const u8, *dst as *mut u8, *bytes) };
            }
            Op::Launch { kernel, cfg, params } => {
                let k = lock(&self.kernels).get(kernel.0).cloned().ok_or_else(|| sim_err(format!("no loaded kernel #{}", kernel.0)))?;
                // Each parameter in 8-byte-aligned storage of its own, as the driver's buffer.
                let mut storage: Vec<Vec<u64>> = params
                    .iter()
                    .map(|p| {
                        let mut words = vec![0u64; p.len().div_ceil(8).max(1)];
                        // SAFETY: `words` has at least p.len() bytes.
                        unsafe { std::ptr::copy_nonoverlapping(p.as_ptr(), words.as_mut_ptr() as *mut u8, p.len()) };
                        words
                    })
                    .collect();
                let mut pointers: Vec<*mut std::ffi::c_void> = storage.iter_mut().map(|w| w.as_mut_ptr() as *mut std::ffi::c_void).collect();
                let launch = LaunchOptions { seed: self.options.seed ^ stream.launches.wrapping_mul(0x9e37_79b9_7f4a_7c15), threads: self.options.threads, ..Default::default() };
                stream.launches += 1;
                *stream.launches_by_kernel.entry(k.name).or_default() += 1;
                let d = |(x, y, z): (u32, u32, u32)| Dim3(x, y, z);
                // SAFETY: the parameter count and sizes were checked against the kernel's
                // signature when the launch was queued; the device addresses are the caller's word
                // (Driver::launch's contract).
                unsafe { k.launch_raw(d(cfg.grid_dim), d(cfg.block_dim), cfg.shared_mem_bytes, &mut pointers, &launch) }.map_err(|e| sim_err(format!("kernel {}: {e}", k.name)))?;
            }
        }
        Ok(())
    }

    /// Records `op` when the stream is capturing, runs it otherwise.
    fn enqueue(&self, op: Op) -> Result<()> {
        let mut stream = lock(&self.stream);
        if let Some(capture) = stream.capture.as_mut() {
            capture.ops.push(op);
            return Ok(());
        }
        self.execute(&mut stream, &op)
    }

    /// Errs (and spoils the capture) if the stream is capturing: `what` cannot be captured.
    fn refuse_during_capture(&self, stream: &mut Stream, what: &str) -> Result<()> {
        if let Some(capture) = stream.capture.as_mut() {
            let why = format!("{what} while the stream is being captured");
            capture.spoiled.get_or_insert(why.clone());
            return Err(sim_err(why));
        }
        Ok(())
    }
}

/// 256-byte-aligned zeroed host memory standing for a device allocation.
struct SimMemory {
    ptr: *mut u8,
    layout: std::alloc::Layout,
    device: Arc<Inner>,
}

// SAFETY: the memory is only reached through device addresses, by the simulator's operations,
// which the stream's mutex serialises; the handle itself is an owner, like a `Box<[u8]>`.
unsafe impl Send for SimMemory {}
unsafe impl Sync for SimMemory {}

impl DeviceMemory for SimMemory {
    fn ptr(&self) -> u64 {
        self.ptr as u64
    }
}

impl Drop for SimMemory {
    fn drop(&mut self) {
        lock(&self.device.memory).remove(&(self.ptr as u64));
        // SAFETY: allocated with this layout in `alloc_zeroed`, freed once.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

struct SimGraph {
    ops: Vec<Op>,
    device: Arc<Inner>,
}

impl DeviceGraph for SimGraph {
    fn upload(&self) -> Result<()> {
        Ok(())
    }

    fn launch(&self) -> Result<()> {
        let mut stream = lock(&self.device.stream);
        self.device.refuse_during_capture(&mut stream, "launching a graph")?;
        self.ops.iter().try_for_each(|op| self.device.execute(&mut stream, op))
    }
}

/// A timing event: the host clock when it was recorded. Every queued operation ran to completion
/// before the call that queued it returned, so that instant is when all the work before the event
/// completed, which is what a GPU's event marks.
struct SimEvent(std::time::Instant);

impl DeviceEvent for SimEvent {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

impl Driver for SimDriver {
    fn name(&self) -> String {
        "minisam-gpusim (kernels/*.cu on the CPU)".into()
    }

    fn arch(&self) -> u32 {
        // The lowest the backend accepts; the simulated kernels do not depend on it.
        80
    }

    fn load_kernels(&self, precision: MmaPrecision, names: &[(&str, &str)]) -> Result<LoadedKernels> {
        let built = minisam_gpusim::kernels();
        // The f16 variant exists for the sources that read MINISAM_MMA_F16; the others build once.
        let variant = if precision == MmaPrecision::F16 { "f16" } else { "" };
        let mut table = lock(&self.0.kernels);
        let mut ids = Vec::with_capacity(names.len());
        for &(module, name) in names {
            let find = |v: &str| built.iter().find(|k| k.variant == v && k.module == module && k.name == name);
            let k = find(variant).or_else(|| find("")).ok_or_else(|| sim_err(format!("no kernel {name} in {module}.cu")))?;
            ids.push(KernelId(table.len()));
            table.push(k.clone());
        }
        Ok(LoadedKernels { ids, cached_modules: 0 })
    }

    fn mem_get_info(&self) -> Result<(u64, u64)> {
        let used: u64 = lock(&self.0.memory).values().map(|&b| b as u64).sum();
        let total = self.0.options.memory;
        Ok((total.saturating_sub(used), total))
    }

    fn alloc_zeroed(&self, bytes: usize) -> Result<Box<dyn DeviceMemory>> {
        {
            let mut stream = lock(&self.0.stream);
            if stream.capture.as_ref().is_some_and(|c| c.thread == std::thread::current().id()) {
                self.0.refuse_during_capture(&mut stream, "allocating on the capturing thread")?;
            }
        }
        let layout = std::alloc::Layout::from_size_align(bytes.max(1), 256).map_err(|e| sim_err(format!("allocating {bytes} bytes: {e}")))?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(sim_err(format!("out of host memory allocating {bytes} bytes")));
        }
        lock(&self.0.memory).insert(ptr as u64, layout.size());
        Ok(Box::new(SimMemory { ptr, layout, device: self.0.clone() }))
    }

    unsafe fn memset_d8(&self, dst: u64, value: u8, bytes: usize) -> Result<()> {
        self.0.check_range("memset", dst, bytes)?;
        self.0.enqueue(Op::Memset { dst, value, bytes })
    }

    unsafe fn htod(&self, dst: u64, src: &[u8]) -> Result<()> {
        let mut stream = lock(&self.0.stream);
        self.0.refuse_during_capture(&mut stream, "a host-to-device copy")?;
        self.0.check_range("host-to-device copy", dst, src.len())?;
        // SAFETY: checked to lie inside a live allocation, which host slices never overlap.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst as *mut u8, src.len()) };
        Ok(())
    }

    unsafe fn dtoh(&self, dst: &mut [u8], src: u64) -> Result<()> {
        let mut stream = lock(&self.0.stream);
        self.0.refuse_during_capture(&mut stream, "a device-to-host copy")?;
        self.0.check_range("device-to-host copy", src, dst.len())?;
        // SAFETY: as in htod.
        unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    unsafe fn dtod(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        self.0.check_range("device-to-device copy (destination)", dst, bytes)?;
        self.0.check_range("device-to-device copy (source)", src, bytes)?;
        self.0.enqueue(Op::Dtod { dst, src, bytes })
    }

    unsafe fn launch(&self, kernel: KernelId, cfg: LaunchConfig, params: &[&[u8]]) -> Result<()> {
        {
            let kernels = lock(&self.0.kernels);
            let k = kernels.get(kernel.0).ok_or_else(|| sim_err(format!("no loaded kernel #{}", kernel.0)))?;
            if params.len() != k.param_sizes.len() {
                return Err(sim_err(format!("{}: {} arguments for {} parameters", k.name, params.len(), k.param_sizes.len())));
            }
            for (i, (p, &size)) in params.iter().zip(k.param_sizes).enumerate() {
                if p.len() != size as usize {
                    return Err(sim_err(format!("{}: argument {i} has {} bytes but the C++ parameter has {size}", k.name, p.len())));
                }
            }
        }
        self.0.enqueue(Op::Launch { kernel, cfg, params: params.iter().map(|p| p.to_vec()).collect() })
    }

    fn synchronize(&self) -> Result<()> {
        // Every operation ran when it was queued; all that is left is capture's rule.
        let mut stream = lock(&self.0.stream);
        self.0.refuse_during_capture(&mut stream, "synchronising the stream")
    }

    fn record_event(&self) -> Result<Box<dyn DeviceEvent>> {
        // The stream's lock orders the event after every operation queued before it.
        let stream = lock(&self.0.stream);
        if stream.capture.is_some() {
            // Refused without spoiling the capture, as `CudarcDriver` refuses it.
            return Err(sim_err("a timing event cannot be recorded while the stream is being captured".into()));
        }
        Ok(Box::new(SimEvent(std::time::Instant::now())))
    }

    fn elapsed_ms(&self, start: &dyn DeviceEvent, end: &dyn DeviceEvent) -> Result<f32> {
        let instant = |e: &dyn DeviceEvent| e.as_any().downcast_ref::<SimEvent>().map(|e| e.0).ok_or_else(|| sim_err("a timing event of another driver".into()));
        Ok(instant(end)?.saturating_duration_since(instant(start)?).as_secs_f32() * 1e3)
    }

    fn begin_capture(&self) -> Result<()> {
        let mut stream = lock(&self.0.stream);
        if stream.capture.is_some() {
            return Err(sim_err("beginning a graph capture on a stream already being captured".into()));
        }
        stream.capture = Some(Capture { thread: std::thread::current().id(), ops: Vec::new(), spoiled: None });
        Ok(())
    }

    fn end_capture(&self) -> Result<Box<dyn DeviceGraph>> {
        let capture = lock(&self.0.stream).capture.take().ok_or_else(|| sim_err("ending a graph capture that was never begun".into()))?;
        if let Some(why) = capture.spoiled {
            return Err(sim_err(format!("graph capture invalidated: {why}")));
        }
        if capture.ops.is_empty() {
            return Err(Error::Backend("CUDA graph capture recorded nothing".into()));
        }
        Ok(Box::new(SimGraph { ops: capture.ops, device: self.0.clone() }))
    }
}
