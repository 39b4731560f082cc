//! [`Driver`] on a real GPU: libcuda through cudarc (loaded with `dlopen`), one context, one
//! stream of our own, the kernels compiled by NVRTC (or taken from the PTX cache).

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::result as drv;
use cudarc::driver::{sys, CudaContext, CudaEvent, CudaFunction, CudaGraph, CudaSlice, CudaStream, DevicePtr, LaunchConfig};
use cudarc::nvrtc::Ptx;

use super::compile::{self, MmaPrecision};
use super::kernel_cache::{ImageKind, KernelImage};
use super::driver::{DeviceEvent, DeviceGraph, DeviceMemory, Driver, KernelId, LoadedKernels};
use crate::{Error, Result};

pub fn driver_err(what: &str, e: drv::DriverError) -> Error {
    Error::Backend(format!("CUDA {what}: {e:?}"))
}

/// Whether libcuda can be loaded at all (cudarc panics on first use when it cannot).
pub fn driver_present() -> bool {
    std::panic::catch_unwind(|| unsafe { cudarc::driver::sys::is_culib_present() }).unwrap_or(false)
}

/// One GPU's context and stream, and the kernels loaded on it.
pub struct CudarcDriver {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    name: String,
    arch: u32,
    functions: std::sync::Mutex<Vec<CudaFunction>>,
}

impl CudarcDriver {
    /// Opens device `ordinal`. Every failure is an `Err` naming the cause; cudarc panics are
    /// caught and reported too.
    pub fn open(ordinal: usize) -> Result<Self> {
        if !driver_present() {
            return Err(Error::Backend("no CUDA driver: libcuda.so could not be loaded".into()));
        }
        catch_cudarc_panic(|| Self::open_inner(ordinal))
    }

    fn open_inner(ordinal: usize) -> Result<Self> {
        let count = CudaContext::device_count().map_err(|e| driver_err("cuInit / device count (is a GPU visible to this process?)", e))?;
        if count <= 0 {
            return Err(Error::Backend("no CUDA device found".into()));
        }
        if ordinal >= count as usize {
            return Err(Error::Backend(format!("CUDA device {ordinal} asked for, but only {count} present")));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| driver_err("context creation", e))?;
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
        Ok(Self { ctx, stream, name, arch, functions: Default::default() })
    }

    fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(|e| driver_err("binding the context", e))
    }
}

/// Runs `f`, turning a cudarc panic into an error.
fn catch_cudarc_panic<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let why = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default();
            Err(Error::Backend(format!("CUDA initialisation failed inside cudarc: {why}")))
        }
    }
}

/// A `CudaSlice` and its address (event tracking is off, so the guard cudarc returns is inert).
struct CudarcMemory {
    _slice: CudaSlice<u8>,
    ptr: u64,
}

impl DeviceMemory for CudarcMemory {
    fn ptr(&self) -> u64 {
        self.ptr
    }
}

/// A captured graph.
struct CudarcGraph(CudaGraph);

// SAFETY: CUDA graph objects may be used from any thread as long as calls on one graph are
// serialised (CUDA driver API, "Graph object thread safety"); the owner serialises them
// (`DeviceGraph`'s contract).
unsafe impl Send for CudarcGraph {}

impl DeviceGraph for CudarcGraph {
    fn upload(&self) -> Result<()> {
        self.0.upload().map_err(|e| driver_err("uploading a graph", e))
    }
    fn launch(&self) -> Result<()> {
        self.0.launch().map_err(|e| driver_err("launching a graph", e))
    }
}

/// A recorded timing event.
struct CudarcEvent(CudaEvent);

impl DeviceEvent for CudarcEvent {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

impl Driver for CudarcDriver {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn arch(&self) -> u32 {
        self.arch
    }

    fn load_kernels(&self, precision: MmaPrecision, names: &[(&str, &str)]) -> Result<LoadedKernels> {
        let mut cached_modules = 0;
        let mut modules = std::collections::HashMap::new();
        for src in compile::SOURCES {
            // CUBIN first, then PTX, then NVRTC afresh (kernel_cache's order): a driver older
            // than the toolkit that filled the cache refuses its images, and the next one serves.
            let mut to_driver = |image: &KernelImage| {
                let ptx = match image.kind {
                    ImageKind::Cubin => Ptx::from_binary(image.bytes.clone()),
                    ImageKind::Ptx => Ptx::from_src(String::from_utf8_lossy(&image.bytes).into_owned()),
                };
                self.ctx.load_module(ptx).map_err(|e| format!("{e:?}"))
            };
            let (module, cached) = compile::load_module(src, self.arch, precision, &mut to_driver)?;
            cached_modules += cached as usize;
            modules.insert(src.name, module);
        }
        let mut functions = self.functions.lock().unwrap_or_else(|p| p.into_inner());
        let mut ids = Vec::with_capacity(names.len());
        for &(module, name) in names {
            let m = modules.get(module).ok_or_else(|| Error::Backend(format!("no kernel module {module}.cu")))?;
            let f = m.load_function(name).map_err(|e| driver_err(&format!("kernel {name} in {module}.cu"), e))?;
            ids.push(KernelId(functions.len()));
            functions.push(f);
        }
        Ok(LoadedKernels { ids, cached_modules })
    }

    fn mem_get_info(&self) -> Result<(u64, u64)> {
        self.bind()?;
        let (free, total) = self.ctx.mem_get_info().map_err(|e| driver_err("memory info", e))?;
        Ok((free as u64, total as u64))
    }

    fn alloc_zeroed(&self, bytes: usize) -> Result<Box<dyn DeviceMemory>> {
        self.bind()?;
        let slice = self.stream.alloc_zeros::<u8>(bytes.max(1)).map_err(|e| driver_err(&format!("allocating {:.2} MiB", bytes as f64 / (1024.0 * 1024.0)), e))?;
        let ptr = {
            let (ptr, _sync) = slice.device_ptr(&self.stream);
            ptr
        };
        Ok(Box::new(CudarcMemory { _slice: slice, ptr }))
    }

    unsafe fn memset_d8(&self, dst: u64, value: u8, bytes: usize) -> Result<()> {
        self.bind()?;
        unsafe { drv::memset_d8_async(dst, value, bytes, self.stream.cu_stream()) }.map_err(|e| driver_err("memset", e))
    }

    unsafe fn htod(&self, dst: u64, src: &[u8]) -> Result<()> {
        self.bind()?;
        // From pageable memory the driver stages the copy before returning.
        unsafe { drv::memcpy_htod_async(dst, src, self.stream.cu_stream()) }.map_err(|e| driver_err("host-to-device copy", e))
    }

    unsafe fn dtoh(&self, dst: &mut [u8], src: u64) -> Result<()> {
        self.bind()?;
        // `dst` is read only after the stream is synchronised.
        unsafe { drv::memcpy_dtoh_async(dst, src, self.stream.cu_stream()) }.map_err(|e| driver_err("device-to-host copy", e))?;
        self.synchronize()
    }

    unsafe fn dtod(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        self.bind()?;
        unsafe { drv::memcpy_dtod_async(dst, src, bytes, self.stream.cu_stream()) }.map_err(|e| driver_err("device-to-device copy", e))
    }

    unsafe fn launch(&self, kernel: KernelId, cfg: LaunchConfig, params: &[&[u8]]) -> Result<()> {
        let f = {
            let functions = self.functions.lock().unwrap_or_else(|p| p.into_inner());
            functions.get(kernel.0).ok_or_else(|| Error::Backend(format!("no loaded kernel #{}", kernel.0)))?.cu_function()
        };
        self.bind()?;
        // cuLaunchKernel copies each parameter's bytes when the launch is queued.
        let mut pointers: Vec<*mut c_void> = params.iter().map(|p| p.as_ptr() as *mut c_void).collect();
        unsafe { drv::launch_kernel(f, cfg.grid_dim, cfg.block_dim, cfg.shared_mem_bytes, self.stream.cu_stream(), &mut pointers) }.map_err(|e| driver_err("kernel launch", e))
    }

    fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| driver_err("kernel execution", e))
    }

    fn record_event(&self) -> Result<Box<dyn DeviceEvent>> {
        self.bind()?;
        let capture = self.stream.capture_status().map_err(|e| driver_err("querying the stream's capture status", e))?;
        if capture != sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE {
            return Err(Error::Backend("a timing event cannot be recorded while the stream is being captured".into()));
        }
        // CU_EVENT_DEFAULT keeps timing on (cudarc's own default, DISABLE_TIMING, would make
        // cuEventElapsedTime fail).
        let event = self.stream.record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT)).map_err(|e| driver_err("recording a timing event", e))?;
        Ok(Box::new(CudarcEvent(event)))
    }

    fn elapsed_ms(&self, start: &dyn DeviceEvent, end: &dyn DeviceEvent) -> Result<f32> {
        fn ours(e: &dyn DeviceEvent) -> Result<&CudaEvent> {
            e.as_any().downcast_ref::<CudarcEvent>().map(|e| &e.0).ok_or_else(|| Error::Backend("a timing event of another driver".into()))
        }
        // Waits for both events, then cuEventElapsedTime (about 0.5 µs resolution).
        ours(start)?.elapsed_ms(ours(end)?).map_err(|e| driver_err("reading a timing event", e))
    }

    fn begin_capture(&self) -> Result<()> {
        self.bind()?;
        self.stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).map_err(|e| driver_err("beginning a graph capture", e))
    }

    fn end_capture(&self) -> Result<Box<dyn DeviceGraph>> {
        match self.stream.end_capture(sys::CUgraphInstantiate_flags(0)) {
            Ok(Some(g)) => Ok(Box::new(CudarcGraph(g))),
            Ok(None) => Err(Error::Backend("CUDA graph capture recorded nothing".into())),
            Err(e) => Err(driver_err("ending a graph capture", e)),
        }
    }
}
