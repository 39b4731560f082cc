//! The seam under the CUDA backend: every call [`super::device::Device`] makes to a GPU, as one
//! trait with two implementations, so that the same backend code (arena, launch geometry,
//! argument marshalling, graph capture and replay) runs on a real GPU and, in CI, on the SIMT
//! simulator:
//!
//! - [`super::cudarc_driver::CudarcDriver`]: libcuda through cudarc, one context and one stream;
//! - `super::sim_driver::SimDriver` (cargo feature `gpusim`): `minisam-gpusim`, which runs the
//!   same `kernels/*.cu` compiled as host C++; device addresses are host addresses.
//!
//! The trait is the driver API's shape, not a higher-level one: one ordered stream, raw device
//! addresses, cuLaunchKernel's parameter list, stream capture into a graph. Anything smarter
//! (budgets, the arena, which kernel a shape needs) stays above it, where both drivers share it.

use cudarc::driver::LaunchConfig;

use super::compile::MmaPrecision;
use crate::Result;

/// A kernel loaded by [`Driver::load_kernels`]: an index into that driver's table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelId(pub usize);

/// Device memory; freed when dropped (after the work queued on it, as `cuMemFreeAsync` on the
/// stream does).
pub trait DeviceMemory: Send + Sync {
    /// The device address of the first byte.
    fn ptr(&self) -> u64;
}

/// A captured and instantiated graph of stream work, replayed on the addresses it was captured
/// with. Calls on one graph are serialised by its owner.
pub trait DeviceGraph: Send {
    /// Makes the graph resident ahead of its first launch (a GPU does it lazily otherwise).
    fn upload(&self) -> Result<()>;
    /// Queues every captured operation on the stream, in capture order.
    fn launch(&self) -> Result<()>;
}

/// A timestamp taken in stream order by [`Driver::record_event`] (cuEventRecord on an event
/// created with timing on), for per-kernel timing.
pub trait DeviceEvent: Send + Sync {
    /// For [`Driver::elapsed_ms`] to recover its own event type.
    fn as_any(&self) -> &dyn std::any::Any;
}

/// What [`Driver::load_kernels`] found.
pub struct LoadedKernels {
    /// One per `(module, kernel)` asked for, in order.
    pub ids: Vec<KernelId>,
    /// Modules that came from a cache rather than a compiler (the PTX cache on a GPU).
    pub cached_modules: usize,
}

/// One device and one ordered stream. Every copy, memset and launch is queued on that stream;
/// only [`Driver::dtoh`] and [`Driver::synchronize`] wait for it.
pub trait Driver: Send + Sync {
    /// The device's name, for logs.
    fn name(&self) -> String;
    /// Compute capability as `major * 10 + minor`.
    fn arch(&self) -> u32;
    /// Loads `kernels/*.cu` built for `precision` and looks up each `(module, kernel)`.
    fn load_kernels(&self, precision: MmaPrecision, names: &[(&str, &str)]) -> Result<LoadedKernels>;
    /// Free and total device memory in bytes.
    fn mem_get_info(&self) -> Result<(u64, u64)>;
    /// `bytes` (at least one) of zeroed device memory.
    fn alloc_zeroed(&self, bytes: usize) -> Result<Box<dyn DeviceMemory>>;
    /// Sets `bytes` bytes at `dst` to `value`.
    ///
    /// # Safety
    /// `dst .. dst + bytes` lies in live device memory of this driver.
    unsafe fn memset_d8(&self, dst: u64, value: u8, bytes: usize) -> Result<()>;
    /// Copies `src` to `dst`. The bytes are staged before the call returns (pageable host
    /// memory), so `src` may be dropped afterwards.
    ///
    /// # Safety
    /// `dst .. dst + src.len()` lies in live device memory of this driver.
    unsafe fn htod(&self, dst: u64, src: &[u8]) -> Result<()>;
    /// Copies device bytes at `src` into `dst` once the queued work is done (synchronising).
    ///
    /// # Safety
    /// `src .. src + dst.len()` lies in live device memory of this driver.
    unsafe fn dtoh(&self, dst: &mut [u8], src: u64) -> Result<()>;
    /// Copies `bytes` bytes from `src` to `dst` on the device.
    ///
    /// # Safety
    /// Both ranges lie in live device memory of this driver.
    unsafe fn dtod(&self, dst: u64, src: u64, bytes: usize) -> Result<()>;
    /// cuLaunchKernel: `params[i]` holds the bytes of kernel parameter `i` (device addresses
    /// and scalars by value, parameter records as their `#[repr(C)]` bytes).
    ///
    /// # Safety
    /// The parameters match the kernel's signature, and every device address among them points
    /// to live device memory large enough for what the kernel accesses with these parameters.
    unsafe fn launch(&self, kernel: KernelId, cfg: LaunchConfig, params: &[&[u8]]) -> Result<()>;
    /// Waits for every queued operation; a fault in a kernel surfaces here at the latest.
    fn synchronize(&self) -> Result<()>;
    /// Records a timing event at the current end of the stream: it completes once every operation
    /// queued before it has. Refused while the stream is being captured (a timing event inside a
    /// graph cannot be read back; profiles run frames eagerly), without spoiling the capture.
    fn record_event(&self) -> Result<Box<dyn DeviceEvent>>;
    /// Milliseconds between two events of this driver, `start` recorded before `end`; waits for
    /// `end` to complete.
    fn elapsed_ms(&self, start: &dyn DeviceEvent, end: &dyn DeviceEvent) -> Result<f32>;
    /// Starts recording the stream's work instead of running it (thread-local capture mode: another
    /// thread's calls that are not on the stream neither join the graph nor break the capture).
    fn begin_capture(&self) -> Result<()>;
    /// Stops recording (also after a failed operation, to leave capture mode) and instantiates
    /// what was recorded.
    fn end_capture(&self) -> Result<Box<dyn DeviceGraph>>;
}
