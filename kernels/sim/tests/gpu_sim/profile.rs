//! The per-kernel profile of the CUDA backend (`CudaBackend::profile_kernels`, what `minisam
//! cuda-bench --kernels` prints) on one tiny-SAM frame through the simulator, held to two
//! independent counts: the simulator's own launch counter (every launch recorded, under its
//! kernel's name) and `CostMeter`'s FLOPs for the same frame on the CPU (the work each launch site
//! counts from its shapes adds up to the op-level count).

use std::collections::BTreeMap;
use std::sync::Arc;

use minisam_models::adapter::{self, AdapterFile};
use minisam_models::backend::Backend;
use minisam_models::cost::CostMeter;
use minisam_models::cpu::CpuBackend;
use minisam_models::cuda::sim_driver::{SimDriver, SimOptions};
use minisam_models::cuda::{CudaBackend, CudaOptions, MmaPrecision};
use minisam_models::import::Checkpoint;
use minisam_models::prompt::{BoxPrompt, Prompts};
use minisam_models::sam::Segmenter;

use crate::backend::{test_image, tiny_sam};

/// One frame: encode, then decode one box.
fn frame<B: Backend>(seg: &Segmenter<B>) -> minisam_models::Result<()> {
    let prompts = Prompts::with_box(BoxPrompt {
        x0: 30.0,
        y0: 20.0,
        x1: 120.0,
        y1: 100.0,
    });
    let emb = seg.encode(&test_image())?;
    seg.decode(&emb, &prompts, false).map(drop)
}

fn tiny_sam_on<B: Backend>(backend: B, ckpt: &Checkpoint) -> Segmenter<B> {
    Segmenter::load_with_identity(backend, ckpt, ckpt.config(), Some(ckpt.sha256())).unwrap()
}

/// Binds a rank-4 adapter on every linear layer, so the LoRA terms are counted too: fused into
/// the tensor-core GEMM where it takes them (bf16/fp16 with K >= 32), their own x·Aᵀ GEMM
/// elsewhere.
fn adapt<B: Backend>(seg: &mut Segmenter<B>, ckpt: &Checkpoint) {
    let every_layer = vec!["*".to_string()];
    let lora: AdapterFile =
        adapter::synth::random_adapter(seg.linear_shapes(), &every_layer, ckpt.sha256(), 4, 8.0, 3)
            .unwrap();
    seg.set_adapter(Some(&lora)).unwrap();
}

pub fn tiny_sam_frame_profile(precision: MmaPrecision) {
    let started = std::time::Instant::now();
    let ckpt = tiny_sam();

    let mut meter = tiny_sam_on(CostMeter::new(CpuBackend::new(2).unwrap()), &ckpt);
    meter.backend().take();
    frame(&meter).unwrap();
    let counted_plain = meter.backend().take();
    adapt(&mut meter, &ckpt);
    frame(&meter).unwrap();
    let counted = meter.backend().take();

    // Graphs on, as served: a profile must run the encoder eagerly all the same.
    let driver = SimDriver::new(SimOptions::default());
    let options = CudaOptions {
        precision,
        graphs: true,
        ..CudaOptions::default()
    };
    let cuda = CudaBackend::with_driver(options, Arc::new(driver.clone())).unwrap();
    let mut sim = tiny_sam_on(cuda, &ckpt);

    // An unprofiled frame (the encoder's graph captured and replayed) records nothing.
    frame(&sim).unwrap();
    let ((), nothing) = sim.backend().profile_kernels(|| Ok(())).unwrap();
    assert!(
        nothing.launches.is_empty(),
        "launches recorded with profiling off: {:?}",
        nothing.by_kernel()
    );
    assert!(
        sim.backend().graph_status().contains("captured"),
        "{}",
        sim.backend().graph_status()
    );

    // Without an adapter, bytes too: the least each kernel moves exceeds the meter's count only
    // by what it leaves out by design (biases, norm parameters, attention's bias inputs).
    let ((), plain) = sim.backend().profile_kernels(|| frame(&sim)).unwrap();
    let plain = plain.total();
    assert_eq!(
        plain.work.flops,
        counted_plain.flops(),
        "profile FLOPs vs CostMeter's, no adapter"
    );
    let excess = plain.work.bytes as f64 / counted_plain.bytes(4) as f64 - 1.0;
    assert!(
        (0.0..0.1).contains(&excess),
        "profile bytes {} vs CostMeter's {}",
        plain.work.bytes,
        counted_plain.bytes(4)
    );

    adapt(&mut sim, &ckpt);
    let before = driver.launches_by_kernel();
    let ((), profile) = sim.backend().profile_kernels(|| frame(&sim)).unwrap();
    let after = driver.launches_by_kernel();

    // Every launch the device ran is in the profile under its kernel's name, and nothing else.
    let ran: BTreeMap<&str, usize> = after
        .iter()
        .map(|(&k, &n)| (k, (n - before.get(k).copied().unwrap_or(0)) as usize))
        .filter(|&(_, n)| n > 0)
        .collect();
    let profiled: BTreeMap<&str, usize> = profile
        .by_kernel()
        .iter()
        .map(|t| (t.kernel, t.launches))
        .collect();
    assert_eq!(profiled, ran, "per-kernel launches: profile vs simulator");
    let total = profile.total();
    assert_eq!(total.launches, ran.values().sum::<usize>());
    let ran_any = |prefix: &str| ran.keys().any(|k| k.starts_with(prefix));
    assert!(ran_any("gemm_") && ran_any("attention"), "{ran:?}");

    // The launch sites' FLOPs add up to the meter's for the same frame, LoRA included.
    assert_eq!(
        total.work.flops,
        counted.flops(),
        "profile FLOPs vs CostMeter's ({counted:?})"
    );
    assert!(
        profile
            .launches
            .iter()
            .all(|l| l.ms > 0.0 && l.work.bytes > 0),
        "a launch with no time or no bytes: {:?}",
        profile
            .launches
            .iter()
            .find(|l| l.ms <= 0.0 || l.work.bytes == 0)
    );

    let table = profile.markdown(Some(989.0), Some(4800.0));
    for t in profile.by_kernel() {
        assert!(
            table.contains(&format!("| `{}` | {} |", t.kernel, t.launches)),
            "{table}"
        );
    }
    assert!(
        table.contains(&format!("| **total** | {} |", total.launches)),
        "{table}"
    );

    // Profiling is off again: the next frame captures the adapted encoder's graph and records
    // nothing.
    frame(&sim).unwrap();
    let ((), nothing) = sim.backend().profile_kernels(|| Ok(())).unwrap();
    assert!(nothing.launches.is_empty());
    assert!(sim.backend().graph_status().contains("captured"));
    eprintln!(
        "{precision:?}: adapted frame {} launches of {} kernels, {:.3} GFLOP (= CostMeter's); plain frame bytes {:.1} % above the meter's; {:.1} s\n{table}",
        total.launches,
        ran.len(),
        total.work.flops as f64 / 1e9,
        100.0 * excess,
        started.elapsed().as_secs_f64()
    );
}

/// Timing events at the seam: refused while the stream is being captured (a profile never sees a
/// graph's launches one by one), without spoiling the capture; in order outside it.
pub fn timing_events_refused_during_capture() {
    use minisam_models::cuda::driver::Driver;
    let driver = SimDriver::new(SimOptions::default());
    let memory = driver.alloc_zeroed(256).unwrap();
    let start = driver.record_event().unwrap();
    driver.begin_capture().unwrap();
    let refused = driver
        .record_event()
        .err()
        .expect("an event recorded during capture");
    assert!(refused.to_string().contains("captured"), "{refused}");
    // SAFETY: the 256 bytes were allocated above.
    unsafe { driver.memset_d8(memory.ptr(), 1, 256) }.unwrap();
    let graph = driver
        .end_capture()
        .expect("the refused event spoiled the capture");
    graph.launch().unwrap();
    let end = driver.record_event().unwrap();
    assert!(driver.elapsed_ms(start.as_ref(), end.as_ref()).unwrap() >= 0.0);
}
