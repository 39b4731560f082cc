//! Every kernel of kernels/*.cu executed on the CPU through the SIMT simulator (minisam-gpusim)
//! and compared with a reference, on fresh random shapes (seed printed; GPU_SIM_SEED replays),
//! plus mutation checks proving the simulator turns a missing barrier or a misplaced mma fragment
//! into a failure; and the unmodified CUDA backend end to end on the tiny SAM through the simulator's
//! driver. `cargo test --release --test gpu_sim`.

mod attention_tc;
mod backend;
mod common;
mod gemm;
mod mutation;
mod others;
mod params;
mod profile;
mod simulator;

use common::*;
use gemm::Operands;
use minisam_models::cuda::MmaPrecision;
use params::*;
use rand::{Rng, SeedableRng};

#[test]
fn gemm_tensor_core_bf16_every_weight_kind() {
    let mut rng = rng("gemm_tc_bf16");
    for kind in [W_F32, W_F16, W_NF4] {
        gemm::run(
            &Sim::default().seeded(rng.gen()),
            &mut rng,
            true,
            Operands::Bf16,
            kind,
            6,
        )
        .unwrap();
    }
}

#[test]
fn gemm_tensor_core_f16_every_weight_kind() {
    let mut rng = rng("gemm_tc_f16");
    for kind in [W_F32, W_F16, W_NF4] {
        gemm::run(
            &Sim::with_variant("f16").seeded(rng.gen()),
            &mut rng,
            true,
            Operands::F16,
            kind,
            4,
        )
        .unwrap();
    }
}

#[test]
fn gemm_cuda_core_f32_every_weight_kind() {
    let mut rng = rng("gemm_simt");
    for kind in [W_F32, W_F16, W_NF4] {
        gemm::run(
            &Sim::default().seeded(rng.gen()),
            &mut rng,
            false,
            Operands::F32,
            kind,
            6,
        )
        .unwrap();
    }
}

/// LoRA's x·Aᵀ fused into the tensor-core GEMM: ranks from 1 to 64 (multiples of 8 and 16 and
/// not, one or both of the warps that share rows busy), partial tiles in M, N and K, every weight
/// kind, bf16 and fp16 operands; and the CUDA-core body on the same cases with t given.
#[test]
fn gemm_fused_lora_every_rank_class() {
    let mut rng = rng("gemm_fused_lora");
    for (i, r) in [1, 7, 8, 13, 16, 31, 32, 33, 48, 57, 64].into_iter().enumerate() {
        let kind = [W_F32, W_F16, W_NF4][i % 3];
        // K a multiple of 64 for NF4's raw-code path every other time, anything >= 32 otherwise.
        let k = if i % 2 == 0 { 64 * rng.gen_range(1..4) } else { rng.gen_range(32..200) };
        let case = gemm::GemmCase::linear_with_k(&mut rng, kind, k).with_fused_lora(&mut rng, r);
        let name = KIND_NAMES[kind as usize];
        case.check(&Sim::default().seeded(rng.gen()), &format!("gemm_tc_{name}"), Operands::Bf16)
            .unwrap();
        case.check(&Sim::with_variant("f16").seeded(rng.gen()), &format!("gemm_tc_{name}"), Operands::F16)
            .unwrap();
        case.check(&Sim::default().seeded(rng.gen()), &format!("gemm_simt_{name}"), Operands::F32)
            .unwrap();
    }
}

#[test]
fn mutation_every_gemm_barrier_is_needed() {
    // Each run draws fresh shapes from one seed, so intact and mutated runs see the same problems.
    let seed = rng("gemm_barriers").gen::<u64>();
    mutation::every_barrier_is_needed("nf4_gemm", |sim| {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        // Both bodies, the NF4 absmax fast path (K a multiple of 64) and the im2col row geometry.
        // Sizes that make every barrier matter in every draw: blocks with more than 32 rows (M)
        // and columns (N), so warps 0 and 1 each read geometry rows / absmaxes the other writes,
        // and K of four tiles, so a warp that runs ahead overwrites a tile the others still read.
        // (A mutant may read a few elements before a buffer: poisoned geometry of -1 is
        // an in-bounds-looking offset of -1 or -2; the heap memory there is mapped.)
        // fp16 weights: the three-stage pipeline (f32 and NF4 have two).
        for kind in [W_F32, W_F16, W_NF4] {
            for tc in [true, false] {
                let ops = if tc { Operands::Bf16 } else { Operands::F32 };
                let kernel = format!(
                    "gemm_{}_{}",
                    if tc { "tc" } else { "simt" },
                    KIND_NAMES[kind as usize]
                );
                let (m, n) = (rng.gen_range(33..150), rng.gen_range(33..140));
                gemm::GemmCase::linear_sized(&mut rng, kind, m, n, 128).check(sim, &kernel, ops)?;
                gemm::GemmCase::conv_with_pixels(&mut rng, kind, 33).check(sim, &kernel, ops)?;
            }
        }
        Ok(())
    });
}

#[test]
fn mutation_swapped_mma_fragment_fails() {
    let mut rng = rng("mma_swap");
    let case = gemm::GemmCase::linear_with_k(&mut rng, W_F32, 96);
    case.check(&Sim::default(), "gemm_tc_f32w", Operands::Bf16)
        .unwrap();
    let swapped = Sim {
        options: minisam_gpusim::LaunchOptions {
            swap_mma_a12: true,
            ..Default::default()
        },
        ..Sim::default()
    };
    let err = case
        .check(&swapped, "gemm_tc_f32w", Operands::Bf16)
        .expect_err("swapping mma fragments a1 and a2 went unnoticed");
    eprintln!("with a1/a2 swapped: {err}");
}

/// The GEMM pipeline's own faults: deleting its `cp.async.wait_group` (the copies then land only
/// when their thread exits, after the tile was read) and a wrong NF4 table lookup (the
/// neighbouring entry) must each fail a check. Every weight kind, both bodies, on [N, K] weights
/// with K = 128 (16-byte copies, and NF4's raw codes decoded in registers) and on a convolution
/// (the gathered A, NF4 decoded element by element).
#[test]
fn mutation_gemm_missing_wait_and_broken_nf4_lookup_fail() {
    let seed = rng("gemm_pipeline_mutants").gen::<u64>();
    let run = |options: minisam_gpusim::LaunchOptions, kinds: &[i64]| {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let sim = Sim {
            options,
            ..Sim::default()
        };
        for &kind in kinds {
            for tc in [true, false] {
                let ops = if tc { Operands::Bf16 } else { Operands::F32 };
                let kernel = format!(
                    "gemm_{}_{}",
                    if tc { "tc" } else { "simt" },
                    KIND_NAMES[kind as usize]
                );
                let (m, n) = (rng.gen_range(33..150), rng.gen_range(33..140));
                gemm::GemmCase::linear_sized(&mut rng, kind, m, n, 128).check(&sim, &kernel, ops)?;
                gemm::GemmCase::conv_with_pixels(&mut rng, kind, 33).check(&sim, &kernel, ops)?;
            }
        }
        Ok::<(), String>(())
    };
    let every = [W_F32, W_F16, W_NF4];
    run(Default::default(), &every).unwrap();
    for kind in every {
        let err = run(
            minisam_gpusim::LaunchOptions {
                skip_cp_async_wait: true,
                ..Default::default()
            },
            &[kind],
        )
        .expect_err("deleting the GEMM's cp.async wait went unnoticed");
        eprintln!("without the cp.async wait ({}): {err}", KIND_NAMES[kind as usize]);
    }
    let err = run(
        minisam_gpusim::LaunchOptions {
            break_nf4_lookup: true,
            ..Default::default()
        },
        &[W_NF4],
    )
    .expect_err("a wrong NF4 table lookup went unnoticed");
    eprintln!("with the NF4 lookup off by one: {err}");
}

/// Runs `check` `times` with one generator.
fn repeat(
    test: &str,
    times: usize,
    check: impl Fn(&Sim, &mut rand_chacha::ChaCha8Rng) -> Result<(), String>,
) {
    let mut rng = rng(test);
    for _ in 0..times {
        check(&Sim::default().seeded(rng.gen()), &mut rng).unwrap();
    }
}

#[test]
fn attention_every_head_dim_and_bias_mode() {
    for dp in [32, 64, 96, 128] {
        repeat(&format!("attention_d{dp}"), 4, |sim, rng| {
            others::attention_case(sim, rng, dp, false)
        });
    }
}

#[test]
fn mutation_every_attention_barrier_is_needed() {
    let seed = rng("attention_barriers").gen::<u64>();
    mutation::every_barrier_is_needed("attention", |sim| {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        for dp in [32, 64, 96, 128] {
            for _ in 0..2 {
                others::attention_case(sim, &mut rng, dp, true)?;
            }
        }
        // The tensor-core body's one barrier (after the cp.async wait) guards both the tile's
        // visibility across warps and the reuse of the stage the next copies fill.
        for dp in [16, 80] {
            let large = attention_tc::Shape {
                large: true,
                ..Default::default()
            };
            attention_tc::case(sim, &mut rng, dp, large)?;
        }
        Ok(())
    });
}

/// Max error and max error/bound over a test's draws, printed for the record.
fn report(test: &str, outcomes: &[attention_tc::Outcome]) {
    let err = outcomes.iter().fold(0.0f64, |m, o| m.max(o.max_err));
    let ratio = outcomes.iter().fold(0.0f64, |m, o| m.max(o.max_ratio));
    eprintln!(
        "{test}: {} draws, max |error| {err:.3e}, max error/bound {ratio:.3}",
        outcomes.len()
    );
}

/// The tensor-core attention, bf16 operands: every instance at its own head dim (the models'
/// 16, 32, 64, 80) and at padded ones, every bias mode, partial query and key tiles.
#[test]
fn attention_tc_bf16_every_head_dim_and_bias_mode() {
    let mut rng = rng("attention_tc_bf16");
    let mut outcomes = Vec::new();
    for dp in [16, 32, 64, 80] {
        for mode in 0..3 {
            let shape = attention_tc::Shape {
                d: Some(dp),
                mode: Some(mode),
                ..Default::default()
            };
            outcomes.push(
                attention_tc::case(&Sim::default().seeded(rng.gen()), &mut rng, dp, shape).unwrap(),
            );
        }
        for _ in 0..4 {
            outcomes.push(
                attention_tc::case(
                    &Sim::default().seeded(rng.gen()),
                    &mut rng,
                    dp,
                    Default::default(),
                )
                .unwrap(),
            );
        }
    }
    report("attention_tc_bf16", &outcomes);
}

/// The same with fp16 operands (-DMINISAM_MMA_F16).
#[test]
fn attention_tc_f16_every_head_dim() {
    let mut rng = rng("attention_tc_f16");
    let mut outcomes = Vec::new();
    for dp in [16, 32, 64, 80] {
        for _ in 0..3 {
            outcomes.push(
                attention_tc::case(
                    &Sim::with_variant("f16").seeded(rng.gen()),
                    &mut rng,
                    dp,
                    Default::default(),
                )
                .unwrap(),
            );
        }
    }
    report("attention_tc_f16", &outcomes);
}

/// A query row whose scores are all -inf gives NaN (as the CPU backend), its neighbours in the
/// same warp and quad are unaffected.
#[test]
fn attention_tc_row_of_minus_infinity_gives_nan() {
    let mut rng = rng("attention_tc_dead_row");
    for dp in [16, 32, 64, 80] {
        let shape = attention_tc::Shape {
            dead_row: true,
            ..Default::default()
        };
        attention_tc::case(&Sim::default().seeded(rng.gen()), &mut rng, dp, shape).unwrap();
    }
}

/// Long key sequences (ViT-B/L/H's global attention has 4096): the online softmax across many
/// key tiles, with the running max changing on the way.
#[test]
fn attention_tc_long_key_sequence() {
    let mut rng = rng("attention_tc_long");
    let mut outcomes = Vec::new();
    // ViT-B's global attention (64 x 64 keys, rel-pos), and other long rows in the other modes.
    for (dp, mode, nk, kw) in [
        (64, 2, 4096, 64),
        (80, 0, rng.gen_range(1500..2600), 1),
        (32, 1, rng.gen_range(1500..2600), 1),
    ] {
        let shape = attention_tc::Shape {
            d: Some(dp),
            nq: Some(rng.gen_range(40..80)),
            nk: Some(nk),
            kw: Some(kw),
            mode: Some(mode),
            ..Default::default()
        };
        outcomes.push(
            attention_tc::case(&Sim::default().seeded(rng.gen()), &mut rng, dp, shape).unwrap(),
        );
    }
    report("attention_tc_long", &outcomes);
}

/// Deleting the cp.async wait, or packing the mma A fragments wrongly, must fail the checks.
#[test]
fn mutation_attention_tc_missing_wait_and_swapped_fragments_fail() {
    let seed = rng("attention_tc_mutants").gen::<u64>();
    let large = attention_tc::Shape {
        large: true,
        ..Default::default()
    };
    let run = |options: minisam_gpusim::LaunchOptions| {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let sim = Sim {
            options,
            ..Sim::default()
        };
        for dp in [16, 32, 64, 80] {
            attention_tc::case(&sim, &mut rng, dp, large)?;
        }
        Ok::<(), String>(())
    };
    run(Default::default()).unwrap();
    let err = run(minisam_gpusim::LaunchOptions {
        skip_cp_async_wait: true,
        ..Default::default()
    })
    .expect_err("deleting the cp.async wait went unnoticed");
    eprintln!("without the cp.async wait: {err}");
    let err = run(minisam_gpusim::LaunchOptions {
        swap_mma_a12: true,
        ..Default::default()
    })
    .expect_err("swapping mma fragments a1 and a2 went unnoticed");
    eprintln!("with a1/a2 swapped: {err}");
}

#[test]
fn layer_norms() {
    repeat("layer_norm_rows", 8, others::layer_norm_rows_case);
    repeat("layer_norm_nchw", 8, others::layer_norm_nchw_case);
}

#[test]
fn elementwise_kernels() {
    repeat("permute", 12, others::permute_case);
    repeat("copy_block", 12, others::copy_block_case);
    repeat("pad_hw", 12, others::pad_hw_case);
    repeat("add_broadcast", 12, others::add_broadcast_case);
    repeat("scale_act", 12, others::scale_act_case);
}

#[test]
fn resize_bilinear_matches_the_cpu_bit_for_bit() {
    repeat("resize_bilinear", 10, others::resize_case);
}

#[test]
fn conv2d_direct_every_weight_kind() {
    for kind in [W_F32, W_F16, W_NF4] {
        repeat("conv2d_direct", 5, |sim, rng| {
            others::conv_direct_case(sim, rng, kind)
        });
    }
}

/// Every kernel the checks above launch. A kernel added to kernels/*.cu without a check fails
/// the test below.
const CHECKED: &[&str] = &[
    "gemm_tc_f32w",
    "gemm_tc_f16w",
    "gemm_tc_nf4w",
    "gemm_simt_f32w",
    "gemm_simt_f16w",
    "gemm_simt_nf4w",
    "attention_d32",
    "attention_d64",
    "attention_d96",
    "attention_d128",
    "attention_tc_d16",
    "attention_tc_d32",
    "attention_tc_d64",
    "attention_tc_d80",
    "layer_norm_rows",
    "layer_norm_nchw",
    "permute",
    "copy_block",
    "pad_hw",
    "add_broadcast",
    "scale_act",
    "resize_bilinear",
    "conv2d_direct",
];

#[test]
fn every_kernel_of_every_cu_file_is_built_and_checked() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap();
    let mut in_sources = Vec::new();
    let mut stems = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "cu") {
            stems.push(path.file_stem().unwrap().to_str().unwrap().to_string());
            // Every kernel is declared `extern "C" __global__ void [__launch_bounds__(..)] name(`.
            for line in std::fs::read_to_string(&path)
                .unwrap()
                .lines()
                .filter(|l| l.starts_with("extern \"C\" __global__"))
            {
                let head = line.split('(').collect::<Vec<_>>();
                let before_params = if line.contains("__launch_bounds__") {
                    head[1].split(')').nth(1).unwrap()
                } else {
                    head[0]
                };
                in_sources.push(before_params.split_whitespace().last().unwrap().to_string());
            }
        }
    }
    let built = minisam_gpusim::kernels();
    let mut modules: Vec<String> = built
        .iter()
        .filter(|k| k.variant.is_empty())
        .map(|k| k.module.to_string())
        .collect();
    modules.dedup();
    stems.sort();
    modules.sort();
    assert_eq!(
        modules, stems,
        "kernels/*.cu files and the simulator's modules differ (rebuild after adding a .cu file)"
    );
    let mut names: Vec<String> = built
        .iter()
        .filter(|k| k.variant.is_empty())
        .map(|k| k.name.to_string())
        .collect();
    names.sort();
    in_sources.sort();
    assert_eq!(
        names, in_sources,
        "the simulator's kernels differ from the __global__ functions of kernels/*.cu"
    );
    let unchecked: Vec<&String> = names
        .iter()
        .filter(|n| !CHECKED.contains(&n.as_str()))
        .collect();
    assert!(
        unchecked.is_empty(),
        "kernels without a gpu_sim check: {unchecked:?}"
    );
    for k in CHECKED {
        assert!(
            names.iter().any(|n| n == k),
            "CHECKED names {k}, which no kernels/*.cu defines"
        );
    }
}

#[test]
fn blocks_on_several_os_threads_give_the_same_bits() {
    let mut rng = rng("threads");
    let seed = rng.gen();
    let case = gemm::GemmCase::linear_sized(&mut rng, W_NF4, 200, 150, 96);
    let on = |threads| {
        let sim = Sim {
            options: minisam_gpusim::LaunchOptions {
                seed,
                threads,
                ..Default::default()
            },
            ..Sim::default()
        };
        case.run(&sim, "gemm_tc_nf4w")
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect::<Vec<u32>>()
    };
    assert_eq!(
        on(1),
        on(3),
        "a block's result must not depend on the OS thread that ran it"
    );
    let sim = Sim {
        options: minisam_gpusim::LaunchOptions {
            threads: 3,
            ..Default::default()
        },
        ..Sim::default()
    };
    case.check(&sim, "gemm_tc_nf4w", Operands::Bf16).unwrap();
    // A fault on one thread stops the launch and is reported once.
    let mut out = vec![0i32; 64 * 8];
    let probe = Sim {
        variant: "probe",
        options: minisam_gpusim::LaunchOptions {
            threads: 3,
            ..Default::default()
        },
    };
    let err = probe
        .launch(
            "probe_deadlock",
            minisam_gpusim::Dim3(8, 1, 1),
            minisam_gpusim::Dim3(64, 1, 1),
            &[minisam_gpusim::Arg::ptr_mut(&mut out)],
        )
        .unwrap_err();
    assert!(err.contains("deadlocked"), "{err}");
}

#[test]
fn backend_tiny_sam_end_to_end_bf16() {
    backend::tiny_sam_parity(MmaPrecision::Bf16, rng("backend_bf16").gen());
}

#[test]
fn backend_tiny_sam_end_to_end_f16() {
    backend::tiny_sam_parity(MmaPrecision::F16, rng("backend_f16").gen());
}

#[test]
fn backend_tiny_sam_end_to_end_f32() {
    backend::tiny_sam_parity(MmaPrecision::F32, rng("backend_f32").gen());
}

#[test]
fn backend_attention_checks_pick_the_tensor_cores_bf16() {
    backend::attention_op_checks(MmaPrecision::Bf16, rng("backend_attention_bf16").gen());
}

#[test]
fn backend_attention_checks_pick_the_tensor_cores_f16() {
    backend::attention_op_checks(MmaPrecision::F16, rng("backend_attention_f16").gen());
}

#[test]
fn backend_attention_checks_stay_f32_in_f32_mode() {
    backend::attention_op_checks(MmaPrecision::F32, rng("backend_attention_f32").gen());
}

/// The per-kernel profile of one frame: every launch recorded under its kernel's name, FLOPs
/// equal to CostMeter's. bf16: LoRA fused into the tensor-core GEMMs, attention on the tensor
/// cores; f32: every LoRA a GEMM of its own, attention in f32.
#[test]
fn backend_kernel_profile_of_a_frame_bf16() {
    profile::tiny_sam_frame_profile(MmaPrecision::Bf16);
}

#[test]
fn backend_kernel_profile_of_a_frame_f32() {
    profile::tiny_sam_frame_profile(MmaPrecision::F32);
}

#[test]
fn backend_timing_events_refused_during_capture() {
    profile::timing_events_refused_during_capture();
}

/// LiteMedSAM (the real checkpoint from ../shared; skips without it), one frame on the simulated
/// backend against the CPU: embedding within the bf16 tolerance, mask IoU >= 0.99. About 75 s
/// of CI's 2 cores (one frame, not parity()'s six: replay and the fitted arena are the tiny
/// SAM's checks; and the mma emulation widens each operand once).
#[test]
fn backend_lite_medsam_end_to_end_bf16() {
    backend::lite_medsam_parity(MmaPrecision::Bf16, rng("backend_lite_medsam").gen());
}
