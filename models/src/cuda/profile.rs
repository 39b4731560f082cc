//! A per-kernel profile of the CUDA backend: while on ([`super::CudaBackend::profile_kernels`]),
//! every launch is bracketed by two timing events and carries the work its launch site counted
//! from the shapes it already has; the profile then adds them up per kernel, for a table of
//! achieved TFLOP/s and GB/s beside a device's peaks (`minisam cuda-bench --kernels`).
//!
//! Work follows [`crate::cost`]'s conventions, so the profile's FLOPs of a frame equal
//! `CostMeter`'s for the same frame (a `gpu_sim` test holds them to it): a multiply-add is 2
//! FLOPs, only GEMM-shaped work (GEMMs, convolutions, attention's two products) counts FLOPs,
//! everything else is bytes. Bytes are the least a kernel must move: each weight once in its stored
//! precision, each activation read or written once at [`ACTIVATION_BYTES`] (the kernels keep
//! activations in f32 even where the tensor cores take bf16). Where a count deliberately differs
//! from the meter's, the launch site says so; in short, the profile also counts the small f32
//! parameters a kernel reads (biases, norm scales) and attention's bias inputs, which the meter
//! leaves out, and a fused LoRA moves no intermediate where the meter prices the six operations
//! of the unfused update.
//!
//! Times come from events recorded on the stream around each launch. When the host queues kernels
//! more slowly than the GPU runs them (small kernels, eager frames), an idle GPU stamps the start
//! event before the launch reaches it, so the gap is counted too: a small kernel's time is an
//! upper bound, its rates lower bounds.

use std::collections::BTreeMap;

use super::driver::DeviceEvent;

/// Bytes of one activation element as the kernels store it (f32).
pub const ACTIVATION_BYTES: u64 = 4;

/// What one launch must at least do.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Work {
    pub flops: u64,
    /// Minimum bytes read and written.
    pub bytes: u64,
}

impl Work {
    /// No counted arithmetic: `elements` activations read or written (norms, elementwise,
    /// permutes, copies, resizes).
    pub fn traffic(elements: usize) -> Self {
        Work { flops: 0, bytes: ACTIVATION_BYTES * elements as u64 }
    }

    /// `flops` on top of [`Work::traffic`] of `elements` activations and `param_bytes` of
    /// weights and parameters.
    pub fn compute(flops: u64, elements: usize, param_bytes: u64) -> Self {
        Work { flops, bytes: ACTIVATION_BYTES * elements as u64 + param_bytes }
    }

    /// The sum of both.
    pub fn plus(self, other: Work) -> Self {
        Work { flops: self.flops + other.flops, bytes: self.bytes + other.bytes }
    }
}

/// A launch made while profiling, its events still unread.
pub(super) struct PendingLaunch {
    pub kernel: &'static str,
    pub work: Work,
    pub start: Box<dyn DeviceEvent>,
    pub end: Box<dyn DeviceEvent>,
}

/// One profiled launch.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LaunchTiming {
    /// The kernel's entry point (`gemm_tc_nf4w`, `attention_tc_d64`, ...).
    pub kernel: &'static str,
    pub work: Work,
    /// Between the events around the launch, in milliseconds.
    pub ms: f64,
}

/// Every launch of one profiled run, in launch order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KernelProfile {
    pub launches: Vec<LaunchTiming>,
}

/// One kernel's launches added up.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KernelTotal {
    pub kernel: &'static str,
    pub launches: usize,
    pub work: Work,
    pub ms: f64,
}

impl KernelTotal {
    pub fn tflops(&self) -> f64 {
        self.work.flops as f64 / (self.ms * 1e-3).max(1e-12) / 1e12
    }
    pub fn gbs(&self) -> f64 {
        self.work.bytes as f64 / (self.ms * 1e-3).max(1e-12) / 1e9
    }
}

impl KernelProfile {
    /// Per kernel, the longest total time first.
    pub fn by_kernel(&self) -> Vec<KernelTotal> {
        let mut totals: BTreeMap<&'static str, KernelTotal> = BTreeMap::new();
        for l in &self.launches {
            let t = totals.entry(l.kernel).or_insert(KernelTotal { kernel: l.kernel, launches: 0, work: Work::default(), ms: 0.0 });
            t.launches += 1;
            t.work = t.work.plus(l.work);
            t.ms += l.ms;
        }
        let mut v: Vec<KernelTotal> = totals.into_values().collect();
        v.sort_by(|a, b| b.ms.total_cmp(&a.ms).then(a.kernel.cmp(b.kernel)));
        v
    }

    /// Every launch added up.
    pub fn total(&self) -> KernelTotal {
        let work = self.launches.iter().fold(Work::default(), |w, l| w.plus(l.work));
        KernelTotal { kernel: "total", launches: self.launches.len(), work, ms: self.launches.iter().map(|l| l.ms).sum() }
    }

    /// The per-kernel table as markdown, with each rate's share of the given peaks (`-` without).
    pub fn markdown(&self, peak_tflops: Option<f64>, peak_gbs: Option<f64>) -> String {
        let share = |rate: f64, peak: Option<f64>| peak.map_or("-".to_string(), |p| format!("{:.1} %", 100.0 * rate / p));
        let mut out = String::from("| kernel | launches | total µs | GFLOP | MB moved | TFLOP/s | of peak | GB/s | of peak |\n|---|---|---|---|---|---|---|---|---|\n");
        let totals = self.by_kernel();
        for t in totals.iter().chain(std::iter::once(&self.total())) {
            let name = if t.kernel == "total" { "**total**".to_string() } else { format!("`{}`", t.kernel) };
            out += &format!(
                "| {name} | {} | {:.1} | {:.3} | {:.2} | {:.2} | {} | {:.1} | {} |\n",
                t.launches,
                t.ms * 1e3,
                t.work.flops as f64 / 1e9,
                t.work.bytes as f64 / 1e6,
                t.tflops(),
                share(t.tflops(), peak_tflops),
                t.gbs(),
                share(t.gbs(), peak_gbs)
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launches_add_up_per_kernel_longest_first() {
        let launch = |kernel, flops, bytes, ms| LaunchTiming { kernel, work: Work { flops, bytes }, ms };
        let gemm = |ms| launch("gemm_tc_f32w", 2_000_000_000, 1_000_000, ms);
        let p = KernelProfile { launches: vec![launch("scale_act", 0, 4_000_000, 0.002), gemm(0.001), gemm(0.003)] };
        let totals = p.by_kernel();
        assert_eq!(totals.iter().map(|t| (t.kernel, t.launches)).collect::<Vec<_>>(), [("gemm_tc_f32w", 2), ("scale_act", 1)]);
        // 4 GFLOP in 4 µs = 1000 TFLOP/s; 2 MB in 4 µs = 500 GB/s.
        assert!((totals[0].tflops() - 1000.0).abs() < 1e-6 && (totals[0].gbs() - 500.0).abs() < 1e-6, "{totals:?}");
        let total = p.total();
        assert_eq!((total.launches, total.work), (3, Work { flops: 4_000_000_000, bytes: 6_000_000 }));
        let table = p.markdown(Some(2000.0), None);
        assert!(table.contains("| `gemm_tc_f32w` | 2 | 4.0 | 4.000 | 2.00 | 1000.00 | 50.0 % | 500.0 | - |"), "{table}");
        assert!(table.lines().last().unwrap().starts_with("| **total** | 3 | 6.0 |"), "{table}");
    }
}
