//! The simulator itself, through the probe kernels of kernels/sim/probes/probes.cu: coordinates,
//! shuffles per the PTX ISA, barrier semantics, poison, the faults it must report, and the PTX
//! emulation against independent transcriptions of the ISA (conversions against the `half`
//! crate, mma fragments against the ISA's layout formulas).

use minisam_gpusim::{kernel, Arg, Dim3, LaunchOptions, Order};
use rand::Rng;

use crate::common::*;

fn probe() -> Sim {
    Sim::with_variant("probe")
}

#[test]
fn coordinates_cover_a_3d_grid_x_fastest() {
    let (grid, block) = (Dim3(3, 2, 2), Dim3(5, 3, 2));
    let threads = (3 * 2 * 2 * 5 * 3 * 2) as usize;
    let mut out = vec![u32::MAX; 12 * threads];
    probe()
        .launch("probe_coords", grid, block, &[Arg::ptr_mut(&mut out)])
        .unwrap();
    let mut t = 0;
    for (bz, by, bx) in
        (0..2).flat_map(|z| (0..2).flat_map(move |y| (0..3).map(move |x| (z, y, x))))
    {
        for (tz, ty, tx) in
            (0..2).flat_map(|z| (0..3).flat_map(move |y| (0..5).map(move |x| (z, y, x))))
        {
            assert_eq!(
                out[12 * t..12 * t + 12],
                [tx, ty, tz, bx, by, bz, 5, 3, 2, 3, 2, 2],
                "global thread {t}"
            );
            t += 1;
        }
    }
}

/// CUDA's shuffles per the PTX ISA's shfl.sync pseudo-code, written out independently.
fn expected_shuffle(mode: usize, lane: i32, arg: i32, width: i32) -> i32 {
    let seg_start = lane & !(width - 1);
    let (src, valid) = match mode {
        0 => (seg_start + (arg & (width - 1)), true),
        1 => (lane - arg, lane - arg >= seg_start),
        2 => (lane + arg, lane + arg < seg_start + width),
        _ => (lane ^ arg, (lane ^ arg) < seg_start + width),
    };
    if valid {
        src
    } else {
        lane
    }
}

#[test]
fn shuffles_follow_the_ptx_rules_for_every_width() {
    for width in [1, 2, 4, 8, 16, 32] {
        for arg in [0, 1, 3, 5, 16, 31] {
            let mut out = vec![-1i32; 4 * 64];
            let args = [Arg::ptr_mut(&mut out), Arg::I32(arg), Arg::I32(width)];
            probe()
                .launch("probe_shuffles", Dim3(1, 1, 1), Dim3(64, 1, 1), &args)
                .unwrap();
            for t in 0..64 {
                let (warp, lane) = (t / 32, t % 32);
                for mode in 0..4 {
                    let src = 32 * warp + expected_shuffle(mode, lane, arg, width);
                    assert_eq!(
                        out[4 * t as usize + mode],
                        10 * src + 1,
                        "shuffle mode {mode} lane {t} arg {arg} width {width}"
                    );
                }
            }
        }
    }
}

#[test]
fn arguments_of_the_wrong_size_or_count_are_refused() {
    let mut out = vec![0i32; 4];
    let k = kernel("probe", "probe_shuffles").unwrap();
    assert_eq!(k.param_sizes, [8, 4, 4]);
    let err = unsafe {
        k.launch(
            Dim3(1, 1, 1),
            Dim3(1, 1, 1),
            &[Arg::ptr_mut(&mut out), Arg::I64(0), Arg::F32(0.0)],
            &LaunchOptions::default(),
        )
    }
    .unwrap_err();
    assert!(
        err.0
            .contains("argument 1 has 8 bytes but the parameter has 4"),
        "{err}"
    );
    let err = unsafe {
        k.launch(
            Dim3(1, 1, 1),
            Dim3(1, 1, 1),
            &[Arg::ptr_mut(&mut out)],
            &LaunchOptions::default(),
        )
    }
    .unwrap_err();
    assert!(err.0.contains("1 arguments for 3 parameters"), "{err}");
}

#[test]
fn bad_geometry_is_refused_with_the_limit_named() {
    let mut out = vec![0i32; 2048];
    for (grid, block, needle) in [
        (Dim3(1, 1, 1), Dim3(1025, 1, 1), "1024 threads"),
        (Dim3(0, 1, 1), Dim3(32, 1, 1), "empty grid"),
        (Dim3(1, 65_536, 1), Dim3(32, 1, 1), "65535"),
    ] {
        let err = probe()
            .launch("probe_neighbour", grid, block, &[Arg::ptr_mut(&mut out)])
            .unwrap_err();
        assert!(err.contains(needle), "{err}");
    }
}

#[test]
fn barrier_orders_shared_memory_under_every_schedule() {
    for order in [Order::Shuffled, Order::Forward, Order::Reverse] {
        let (blocks, n) = (5usize, 160usize);
        let mut out = vec![-1i32; blocks * n];
        let sim = Sim {
            variant: "probe",
            options: LaunchOptions {
                order,
                seed: 7,
                ..Default::default()
            },
        };
        sim.launch(
            "probe_neighbour",
            Dim3(blocks as u32, 1, 1),
            Dim3(n as u32, 1, 1),
            &[Arg::ptr_mut(&mut out)],
        )
        .unwrap();
        for b in 0..blocks {
            for t in 0..n {
                assert_eq!(
                    out[b * n + t],
                    (b * n + (t + 1) % n) as i32,
                    "{order:?} block {b} thread {t}"
                );
            }
        }
    }
}

#[test]
fn fresh_shared_memory_is_poisoned() {
    let mut out = vec![0u32; 128];
    probe()
        .launch(
            "probe_unwritten_shared",
            Dim3(2, 1, 1),
            Dim3(128, 1, 1),
            &[Arg::ptr_mut(&mut out)],
        )
        .unwrap();
    assert!(
        out.iter().all(|&v| v == u32::MAX),
        "unwritten shared memory read as {:x?}",
        &out[..4]
    );
}

#[test]
fn faults_are_reported_not_hung() {
    let mut out = vec![0i32; 256];
    let err = probe()
        .launch(
            "probe_deadlock",
            Dim3(1, 1, 1),
            Dim3(64, 1, 1),
            &[Arg::ptr_mut(&mut out)],
        )
        .unwrap_err();
    assert!(
        err.contains("deadlocked: 62 threads wait at __syncthreads, 2 in a warp collective"),
        "{err}"
    );
    let err = probe()
        .launch(
            "probe_partial_mask",
            Dim3(1, 1, 1),
            Dim3(32, 1, 1),
            &[Arg::ptr_mut(&mut out)],
        )
        .unwrap_err();
    assert!(err.contains("partial-warp masks are not emulated"), "{err}");
    let err = probe()
        .launch(
            "probe_too_much_shared",
            Dim3(1, 1, 1),
            Dim3(32, 1, 1),
            &[Arg::ptr_mut(&mut out)],
        )
        .unwrap_err();
    assert!(
        err.contains("52000 bytes of static __shared__ memory"),
        "{err}"
    );
    // The thread is usable after a fault.
    probe()
        .launch(
            "probe_neighbour",
            Dim3(1, 1, 1),
            Dim3(32, 1, 1),
            &[Arg::ptr_mut(&mut out)],
        )
        .unwrap();
}

/// Special values and random bit patterns (every exponent), as f32.
fn test_floats(n: usize) -> Vec<f32> {
    let mut rng = rng("cvt");
    let mut v = vec![
        0.0,
        -0.0,
        1.0,
        -1.0,
        65504.0,
        65519.0,
        65520.0,
        65536.0,
        -70000.0,
        1e30,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        f32::MIN_POSITIVE,
        5.96e-8,
        2.98e-8,
        2.9802322e-8,
        6.1e-5,
        1.0 + f32::EPSILON,
        3.4e38,
    ];
    v.extend((0..n).map(|_| f32::from_bits(rng.gen::<u32>())));
    // Values at the 16-bit formats' rounding ties.
    v.extend((0..n / 4).map(|_| f32::from_bits((rng.gen::<u32>() & 0xffff_0000) | 0x8000)));
    v.extend((0..n / 4).map(|_| f32::from_bits((rng.gen::<u32>() & 0xffff_e000) | 0x1000)));
    v
}

#[test]
fn conversions_match_the_ptx_definitions() {
    let hi = test_floats(20_000);
    let lo: Vec<f32> = hi.iter().rev().copied().collect();
    let n = hi.len().max(65_536);
    let (hi, lo) = (
        [hi.clone(), vec![0.0; n - hi.len()]].concat(),
        [lo.clone(), vec![0.0; n - lo.len()]].concat(),
    );
    let h: Vec<u16> = (0..n).map(|i| i as u16).collect();
    let (mut bf, mut f16, mut wide) = (vec![0u32; n], vec![0u32; n], vec![0.0f32; n]);
    let args = [
        Arg::ptr(&hi),
        Arg::ptr(&lo),
        Arg::ptr_mut(&mut bf),
        Arg::ptr_mut(&mut f16),
        Arg::ptr(&h),
        Arg::ptr_mut(&mut wide),
        Arg::I64(n as i64),
    ];
    let (grid, block) = Sim::grid_for(n);
    probe().launch("probe_cvt", grid, block, &args).unwrap();
    const CANONICAL_NAN: u16 = 0x7fff;
    let want_bf16 = |x: f32| {
        if x.is_nan() {
            CANONICAL_NAN
        } else {
            half::bf16::from_f32(x).to_bits()
        }
    };
    let want_f16 = |x: f32| {
        if x.is_nan() {
            CANONICAL_NAN
        } else {
            half::f16::from_f32(x.clamp(-65504.0, 65504.0)).to_bits()
        }
    };
    for i in 0..n {
        assert_eq!(
            bf[i] >> 16,
            want_bf16(hi[i]) as u32,
            "bf16 of {:e} ({:08x}) in the upper half",
            hi[i],
            hi[i].to_bits()
        );
        assert_eq!(
            bf[i] & 0xffff,
            want_bf16(lo[i]) as u32,
            "bf16 of {:e} in the lower half",
            lo[i]
        );
        assert_eq!(
            f16[i] >> 16,
            want_f16(hi[i]) as u32,
            "satfinite f16 of {:e} ({:08x})",
            hi[i],
            hi[i].to_bits()
        );
        assert_eq!(
            f16[i] & 0xffff,
            want_f16(lo[i]) as u32,
            "satfinite f16 of {:e}",
            lo[i]
        );
        let w = half::f16::from_bits(h[i]).to_f32();
        assert!(
            wide[i].to_bits() == w.to_bits() || (w.is_nan() && wide[i].is_nan()),
            "f16 {:04x} widened to {} not {w}",
            h[i],
            wide[i]
        );
    }
}

/// The ISA's fragment layouts of mma.m16n8k16 (.row.col, 16-bit operands, f32 accumulators),
/// as its formulas state them: groupID = lane >> 2, threadID_in_group = lane % 4, element i of a
/// register pair in the lower half when i is even.
fn a_coords(lane: usize, i: usize) -> (usize, usize) {
    let (g, t) = (lane >> 2, lane % 4);
    let row = if i < 2 || (4..6).contains(&i) {
        g
    } else {
        g + 8
    };
    let col = t * 2 + (i & 1) + if i >= 4 { 8 } else { 0 };
    (row, col)
}
fn b_coords(lane: usize, i: usize) -> (usize, usize) {
    let (g, t) = (lane >> 2, lane % 4);
    (t * 2 + (i & 1) + if i >= 2 { 8 } else { 0 }, g)
}
fn c_coords(lane: usize, i: usize) -> (usize, usize) {
    let (g, t) = (lane >> 2, lane % 4);
    (g + if i >= 2 { 8 } else { 0 }, t * 2 + (i & 1))
}

#[test]
fn mma_fragments_follow_the_isa_layout() {
    let mut rng = rng("mma_layout");
    for f16 in [false, true] {
        // Small integers: exact in both 16-bit formats and in every partial sum.
        let a: Vec<f32> = (0..16 * 16).map(|_| rng.gen_range(-8..8) as f32).collect();
        let b: Vec<f32> = (0..16 * 8).map(|_| rng.gen_range(-8..8) as f32).collect();
        let c: Vec<f32> = (0..16 * 8)
            .map(|_| rng.gen_range(-100..100) as f32)
            .collect();
        let bits = |x: f32| if f16 { half::f16::from_f32(x).to_bits() } else { half::bf16::from_f32(x).to_bits() } as u32;
        let (mut fa, mut fb, mut fc) = (vec![0u32; 128], vec![0u32; 64], vec![0.0f32; 128]);
        for lane in 0..32 {
            for i in 0..8 {
                let (r, k) = a_coords(lane, i);
                fa[4 * lane + i / 2] |= bits(a[r * 16 + k]) << (16 * (i & 1));
            }
            for i in 0..4 {
                let (k, n) = b_coords(lane, i);
                fb[2 * lane + i / 2] |= bits(b[k * 8 + n]) << (16 * (i & 1));
                let (r, n) = c_coords(lane, i);
                fc[4 * lane + i] = c[r * 8 + n];
            }
        }
        let mut d = vec![f32::NAN; 128];
        let args = [
            Arg::ptr(&fa),
            Arg::ptr(&fb),
            Arg::ptr(&fc),
            Arg::ptr_mut(&mut d),
            Arg::I32(f16 as i32),
        ];
        probe()
            .launch("probe_mma", Dim3(1, 1, 1), Dim3(32, 1, 1), &args)
            .unwrap();
        for lane in 0..32 {
            for i in 0..4 {
                let (r, n) = c_coords(lane, i);
                let want =
                    c[r * 8 + n] + (0..16).map(|k| a[r * 16 + k] * b[k * 8 + n]).sum::<f32>();
                assert_eq!(
                    d[4 * lane + i],
                    want,
                    "f16={f16}: D[{r}][{n}] from lane {lane} register {i}"
                );
            }
        }
    }
}

#[test]
fn raw_launch_takes_cu_launch_kernel_params() {
    // probe_shuffles(int* out, int arg, int width) with params as cuLaunchKernel takes them.
    let mut out = vec![-1i32; 4 * 32];
    let (mut ptr, mut arg, mut width) = (out.as_mut_ptr() as u64, 1i32, 32i32);
    let mut params = [
        &mut ptr as *mut u64 as *mut std::ffi::c_void,
        &mut arg as *mut i32 as *mut std::ffi::c_void,
        &mut width as *mut i32 as *mut std::ffi::c_void,
    ];
    let k = kernel("probe", "probe_shuffles").unwrap();
    unsafe {
        k.launch_raw(
            Dim3(1, 1, 1),
            Dim3(32, 1, 1),
            0,
            &mut params,
            &LaunchOptions::default(),
        )
    }
    .unwrap();
    assert_eq!(
        out[4 * 5 + 3],
        10 * 4 + 1,
        "xor shuffle of lane 5 reads lane 4"
    );
    let err = unsafe {
        k.launch_raw(
            Dim3(1, 1, 1),
            Dim3(32, 1, 1),
            0,
            &mut params[..2],
            &LaunchOptions::default(),
        )
    }
    .unwrap_err();
    assert!(
        err.0.contains("2 parameter pointers for 3 parameters"),
        "{err}"
    );
    let err = unsafe {
        k.launch_raw(
            Dim3(1, 1, 1),
            Dim3(32, 1, 1),
            64,
            &mut params,
            &LaunchOptions::default(),
        )
    }
    .unwrap_err();
    assert!(
        err.0.contains("dynamic shared memory is not emulated"),
        "{err}"
    );
}

#[test]
fn cp_async_lands_only_at_its_wait_group() {
    let n = 128usize;
    let src: Vec<f32> = (0..8 * n).map(|i| i as f32 + 0.5).collect();
    let mut out = vec![0.0f32; 32 * n];
    let src_bytes = 8; // the second copy: two floats read, two zero-filled
    probe()
        .launch(
            "probe_cp_async",
            Dim3(1, 1, 1),
            Dim3(n as u32, 1, 1),
            &[Arg::ptr(&src), Arg::ptr_mut(&mut out), Arg::I32(src_bytes)],
        )
        .unwrap();
    let first = |t: usize, i: usize| src[4 * t + i];
    let second = |t: usize, i: usize| if i < 2 { src[4 * (n + t) + i] } else { 0.0 };
    for t in 0..n {
        let o = &out[32 * t..32 * t + 32];
        assert!(
            o[..8].iter().all(|v| v.to_bits() == u32::MAX),
            "thread {t}: a copy landed before any wait: {:?}",
            &o[..8]
        );
        for i in 0..4 {
            assert_eq!(
                o[8 + i],
                first(t, i),
                "thread {t}: wait_group(1) retires the older group"
            );
            assert!(
                o[12 + i].to_bits() == u32::MAX,
                "thread {t}: wait_group(1) must leave the newest group in flight"
            );
            assert_eq!(
                (o[16 + i], o[20 + i]),
                (first(t, i), second(t, i)),
                "thread {t}: after wait_group(0)"
            );
            let u = (t + 1) % n;
            assert_eq!(
                (o[24 + i], o[28 + i]),
                (first(u, i), second(u, i)),
                "thread {t}: the neighbour's copies after the barrier"
            );
        }
    }
}

#[test]
fn ldmatrix_follows_the_isa_fragment_layout() {
    let m: Vec<u16> = (0..32 * 8).map(|i| 1000 + i as u16).collect();
    let mut out = vec![0u32; 6 * 32 * 4];
    probe()
        .launch(
            "probe_ldmatrix",
            Dim3(1, 1, 1),
            Dim3(32, 1, 1),
            &[Arg::ptr(&m), Arg::ptr_mut(&mut out)],
        )
        .unwrap();
    for (variant, (trans, num)) in [
        (false, 1),
        (false, 2),
        (false, 4),
        (true, 1),
        (true, 2),
        (true, 4),
    ]
    .into_iter()
    .enumerate()
    {
        for lane in 0..32 {
            for j in 0..4 {
                let got = out[(variant * 32 + lane) * 4 + j];
                let want = if j >= num {
                    0
                } else {
                    // Element (r, c) of matrix j (rows 8j.. of m), or of its transpose.
                    let at = |r: usize, c: usize| if trans { m[(8 * j + c) * 8 + r] } else { m[(8 * j + r) * 8 + c] } as u32;
                    let (r, c) = (lane / 4, 2 * (lane % 4));
                    at(r, c) | (at(r, c + 1) << 16)
                };
                assert_eq!(got, want, "trans={trans} x{num}: lane {lane} register {j}");
            }
        }
    }
}

#[test]
fn atomics_and_syncwarp() {
    let (mut counter, mut maximum) = (vec![0i32], vec![0u32]);
    probe()
        .launch(
            "probe_atomics",
            Dim3(7, 1, 1),
            Dim3(96, 1, 1),
            &[Arg::ptr_mut(&mut counter), Arg::ptr_mut(&mut maximum)],
        )
        .unwrap();
    assert_eq!((counter[0], maximum[0]), (7 * 96, 7 * 96 - 1));
}

#[test]
fn half_and_bfloat16_scalar_conversions() {
    let x = test_floats(5_000);
    let n = x.len();
    let (mut h, mut b, mut back) = (vec![0u16; n], vec![0u16; n], vec![0.0f32; 2 * n]);
    let (grid, block) = Sim::grid_for(n);
    let args = [
        Arg::ptr(&x),
        Arg::ptr_mut(&mut h),
        Arg::ptr_mut(&mut b),
        Arg::ptr_mut(&mut back),
        Arg::I64(n as i64),
    ];
    probe().launch("probe_half", grid, block, &args).unwrap();
    for i in 0..n {
        if x[i].is_nan() {
            assert!(
                back[2 * i].is_nan() && back[2 * i + 1].is_nan(),
                "NaN stays NaN"
            );
            continue;
        }
        // Round to nearest even, overflow to infinity (no .satfinite): the half crate's rule.
        assert_eq!(
            h[i],
            half::f16::from_f32(x[i]).to_bits(),
            "f16 of {:e} ({:08x})",
            x[i],
            x[i].to_bits()
        );
        assert_eq!(
            b[i],
            half::bf16::from_f32(x[i]).to_bits(),
            "bf16 of {:e} ({:08x})",
            x[i],
            x[i].to_bits()
        );
        assert_eq!(
            back[2 * i].to_bits(),
            half::f16::from_bits(h[i]).to_f32().to_bits()
        );
        assert_eq!(
            back[2 * i + 1].to_bits(),
            half::bf16::from_bits(b[i]).to_f32().to_bits()
        );
    }
}
