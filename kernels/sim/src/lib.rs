//! Runs the CUDA kernels of `kernels/*.cu` on the CPU, so that CI executes the GPU path without a
//! GPU.
//!
//! The `.cu` sources are compiled as host C++ (build.rs) against a small SIMT layer of ours
//! (`include/minisam_sim.h`, `src/runtime.cpp`): the threads of a block run as fibers that switch
//! only at `__syncthreads` and warp collectives, warp after warp in a drawn priority order, with
//! NaN-poisoned shared memory, so a missing barrier gives a wrong answer rather than a lucky right
//! one; inline PTX (`cvt`, `mma.sync`, `cp.async`, `ldmatrix`) is emulated per the PTX ISA. `kernels/README.md` says what the simulator
//! can and cannot catch.
//!
//! A launch looks like the driver's: a [`Kernel`] handle, grid, block, and one argument per kernel
//! parameter, whose byte size is checked against the C++ parameter's (`sizeof`), a check the real
//! driver cannot make. Device addresses are host addresses.

use std::ffi::{c_char, c_void, CStr};
use std::fmt;

mod ffi {
    use std::ffi::{c_char, c_int, c_void};

    #[repr(C)]
    #[derive(Clone, Copy)]
    pub struct Dim3 {
        pub x: u32,
        pub y: u32,
        pub z: u32,
    }

    #[repr(C)]
    #[derive(Clone, Copy)]
    pub struct Options {
        pub order: u32,
        pub mutations: u32,
        pub seed: u64,
        pub skip_barrier_site: i32,
        pub threads: u32,
    }

    #[repr(C)]
    pub struct KernelInfo {
        pub module: *const c_char,
        pub variant: *const c_char,
        pub name: *const c_char,
        pub param_count: u32,
        pub param_sizes: *const u32,
        pub barrier_sites: u32,
        pub barrier_site_lines: *const u32,
    }

    extern "C" {
        pub fn msim_kernel_count() -> usize;
        pub fn msim_kernel_info_at(index: usize, out: *mut KernelInfo) -> c_int;
        pub fn msim_launch(
            index: usize,
            grid: Dim3,
            block: Dim3,
            shared_bytes: u32,
            params: *mut *mut c_void,
            options: *const Options,
            err: *mut c_char,
            err_len: usize,
        ) -> c_int;
    }
}

/// What went wrong in a launch: bad geometry or arguments, or a fault inside the kernel (deadlock,
/// a collective with lanes missing, too much shared memory).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimError(pub String);

impl fmt::Display for SimError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SimError {}

/// Grid or block dimensions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dim3(pub u32, pub u32, pub u32);

/// The priorities the scheduler gives warps, and lanes within a warp, at the start of a block and
/// after every block barrier (the highest-priority runnable thread always runs next, so the first
/// warp finishes its phase before the second starts).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Order {
    /// Drawn at random from the launch's seed, per block and phase (the default: it exposes
    /// races in both directions).
    #[default]
    Shuffled,
    /// Warp 0 first, lane 0 first.
    Forward,
    /// The last warp first, its last lane first.
    Reverse,
}

/// Per-launch settings: the schedule and the deliberate faults of mutation tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LaunchOptions {
    pub order: Order,
    pub seed: u64,
    /// Skip this barrier site of a `mutant` variant (see [`Kernel::barrier_site_lines`]).
    pub skip_barrier_site: Option<u32>,
    /// Swap the A fragment registers a1 and a2 of every `mma.sync` (as a kernel that packed its
    /// fragments wrongly would).
    pub swap_mma_a12: bool,
    /// Make every `cp.async.wait_group` a no-op (as a kernel that forgot its wait would be): the
    /// copies land only when their thread exits.
    pub skip_cp_async_wait: bool,
    /// Make nf4_gemm.cu's NF4 table lookup return the neighbouring entry (a kernel-side hook in
    /// its `MINISAM_SIM` branch, as a wrong index or a misordered table would).
    pub break_nf4_lookup: bool,
    /// OS threads that share the launch's blocks (0 or 1: the calling thread only). The results
    /// are the same for any count.
    pub threads: u32,
}

/// One kernel parameter's bytes, as cuLaunchKernel takes them.
#[derive(Clone, Debug)]
pub enum Arg<'a> {
    /// A device address (a host address here).
    Ptr(u64),
    I64(i64),
    I32(i32),
    F32(f32),
    /// A by-value parameter record (`#[repr(C)]`, laid out as the C struct).
    Record(&'a [u8]),
}

impl Arg<'_> {
    /// The address of a buffer, as a kernel pointer parameter.
    pub fn ptr<T>(data: &[T]) -> Arg<'static> {
        Arg::Ptr(data.as_ptr() as u64)
    }
    /// The address of a buffer the kernel writes.
    pub fn ptr_mut<T>(data: &mut [T]) -> Arg<'static> {
        Arg::Ptr(data.as_mut_ptr() as u64)
    }
    /// A `#[repr(C)]` record by value.
    pub fn record<T: Copy>(r: &T) -> Arg<'_> {
        // SAFETY: a Copy record is plain bytes for its whole size (the records are padding-free).
        Arg::Record(unsafe {
            std::slice::from_raw_parts(r as *const T as *const u8, std::mem::size_of::<T>())
        })
    }
    fn len(&self) -> usize {
        match self {
            Arg::Ptr(_) | Arg::I64(_) => 8,
            Arg::I32(_) | Arg::F32(_) => 4,
            Arg::Record(b) => b.len(),
        }
    }
}

/// A compiled kernel: one `__global__` function of one build variant of one `.cu` file.
#[derive(Clone, Debug)]
pub struct Kernel {
    index: usize,
    /// File stem in `kernels/`.
    pub module: &'static str,
    /// `""` (default build), `"f16"` (`-DMINISAM_MMA_F16`) or `"mutant"` (numbered barriers).
    pub variant: &'static str,
    pub name: &'static str,
    /// `sizeof` of each parameter, in order.
    pub param_sizes: &'static [u32],
    /// Source line of each barrier site of the module (mutant variant only).
    pub barrier_site_lines: &'static [u32],
}

fn static_str(p: *const c_char) -> &'static str {
    // SAFETY: the runtime's strings are string literals of the C++ objects, alive for the process.
    unsafe { CStr::from_ptr(p) }
        .to_str()
        .expect("kernel names are ASCII")
}

/// Every kernel of every variant, in build order.
pub fn kernels() -> Vec<Kernel> {
    // SAFETY: plain queries of static tables; `info` is written in full on success.
    let count = unsafe { ffi::msim_kernel_count() };
    (0..count)
        .map(|index| {
            let mut info = std::mem::MaybeUninit::<ffi::KernelInfo>::uninit();
            let rc = unsafe { ffi::msim_kernel_info_at(index, info.as_mut_ptr()) };
            assert_eq!(rc, 0, "kernel {index} of {count} has no info");
            let info = unsafe { info.assume_init() };
            let slice = |p: *const u32, n: u32| {
                if n == 0 {
                    &[][..]
                } else {
                    unsafe { std::slice::from_raw_parts(p, n as usize) }
                }
            };
            Kernel {
                index,
                module: static_str(info.module),
                variant: static_str(info.variant),
                name: static_str(info.name),
                param_sizes: slice(info.param_sizes, info.param_count),
                barrier_site_lines: slice(info.barrier_site_lines, info.barrier_sites),
            }
        })
        .collect()
}

/// The kernel `name` of `variant` (`""` for the default build).
pub fn kernel(variant: &str, name: &str) -> Result<Kernel, SimError> {
    kernels()
        .into_iter()
        .find(|k| k.variant == variant && k.name == name)
        .ok_or_else(|| {
            SimError(format!(
                "no kernel {name:?} in variant {variant:?} of kernels/*.cu"
            ))
        })
}

impl Kernel {
    /// Runs the kernel to completion on the calling thread.
    ///
    /// # Safety
    /// Every device address in `args` (and inside records) must point to host memory of the size
    /// the kernel will access with these arguments, alive and not otherwise accessed during the
    /// call: the kernel reads and writes through them exactly as on a GPU.
    pub unsafe fn launch(
        &self,
        grid: Dim3,
        block: Dim3,
        args: &[Arg<'_>],
        options: &LaunchOptions,
    ) -> Result<(), SimError> {
        if args.len() != self.param_sizes.len() {
            return Err(SimError(format!(
                "{}: {} arguments for {} parameters",
                self.name,
                args.len(),
                self.param_sizes.len()
            )));
        }
        for (i, (a, &size)) in args.iter().zip(self.param_sizes).enumerate() {
            if a.len() != size as usize {
                return Err(SimError(format!(
                    "{}: argument {i} has {} bytes but the parameter has {size}",
                    self.name,
                    a.len()
                )));
            }
        }
        // Each argument's bytes in a slot of their own, as the driver's parameter buffer.
        let mut scalars: Vec<u64> = args
            .iter()
            .map(|a| match *a {
                Arg::Ptr(v) => v,
                Arg::I64(v) => v as u64,
                Arg::I32(v) => v as u32 as u64,
                Arg::F32(v) => v.to_bits() as u64,
                Arg::Record(_) => 0,
            })
            .collect();
        let mut params: Vec<*mut c_void> = args
            .iter()
            .zip(scalars.iter_mut())
            .map(|(a, s)| match a {
                Arg::Record(bytes) => bytes.as_ptr() as *mut c_void,
                _ => s as *mut u64 as *mut c_void,
            })
            .collect();
        // SAFETY: params holds one pointer per parameter to at least its size in bytes (checked
        // above; an i32 or f32 sits in the low bytes of its u64 slot on little-endian hosts, the
        // only kind the simulator builds for); the caller vouches for the device addresses.
        unsafe { self.launch_raw(grid, block, 0, &mut params, options) }
    }

    /// Runs the kernel with cuLaunchKernel's parameter marshalling: `params[i]` points to the bytes
    /// of parameter `i` (the form a driver seam under the CUDA backend hands over). Only the count
    /// is checked here: the sizes are the caller's word.
    ///
    /// # Safety
    /// `params` has one pointer per kernel parameter, each to at least that parameter's size in
    /// bytes; the device addresses among them obey [`Kernel::launch`]'s rule.
    pub unsafe fn launch_raw(
        &self,
        grid: Dim3,
        block: Dim3,
        shared_bytes: u32,
        params: &mut [*mut c_void],
        options: &LaunchOptions,
    ) -> Result<(), SimError> {
        if params.len() != self.param_sizes.len() {
            return Err(SimError(format!(
                "{}: {} parameter pointers for {} parameters",
                self.name,
                params.len(),
                self.param_sizes.len()
            )));
        }
        let options = ffi::Options {
            order: match options.order {
                Order::Shuffled => 0,
                Order::Forward => 1,
                Order::Reverse => 2,
            },
            mutations: options.swap_mma_a12 as u32
                | (options.skip_cp_async_wait as u32) << 1
                | (options.break_nf4_lookup as u32) << 2,
            seed: options.seed,
            skip_barrier_site: options.skip_barrier_site.map_or(-1, |s| s as i32),
            threads: options.threads,
        };
        let mut err = [0 as c_char; 1024];
        let d = |d: Dim3| ffi::Dim3 {
            x: d.0,
            y: d.1,
            z: d.2,
        };
        // SAFETY: the caller's contract; the error buffer is ours and NUL-terminated by the
        // runtime.
        let rc = unsafe {
            ffi::msim_launch(
                self.index,
                d(grid),
                d(block),
                shared_bytes,
                params.as_mut_ptr(),
                &options,
                err.as_mut_ptr(),
                err.len(),
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(SimError(
                unsafe { CStr::from_ptr(err.as_ptr()) }
                    .to_string_lossy()
                    .into_owned(),
            ))
        }
    }
}

#[cfg(target_endian = "big")]
compile_error!("minisam-gpusim passes 4-byte kernel arguments in the low bytes of a u64: little-endian hosts only");
