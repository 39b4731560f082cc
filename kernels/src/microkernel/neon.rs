//! aarch64 NEON micro-kernel: 8 rows × 12 columns, 24 q-register accumulators, 3 B registers and
//! 2 A registers (of 32). Each A value is used through `fmla` by lane, so A is loaded as two
//! vectors per step rather than broadcast row by row.
//!
//! Built and run only on aarch64; on x86 the same contract is exercised through the portable
//! kernel (the shared test in `super::tests` runs whichever kernels the CPU supports).

use std::arch::aarch64::*;

pub(crate) const MR: usize = 8;
pub(crate) const NR: usize = 12;

/// See [`super::run`].
// a: [kc][MR]; b: [kc][NR]; c: MR rows of NR with stride ldc.
#[target_feature(enable = "neon")]
pub(crate) unsafe fn kernel(kc: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize, accumulate: bool) {
    let mut acc = [[vdupq_n_f32(0.0); 3]; MR];
    if accumulate {
        for i in 0..MR {
            for j in 0..3 {
                acc[i][j] = vld1q_f32(c.add(i * ldc + 4 * j));
            }
        }
    }
    for p in 0..kc {
        let bv = [vld1q_f32(b.add(p * NR)), vld1q_f32(b.add(p * NR + 4)), vld1q_f32(b.add(p * NR + 8))];
        let a_lo = vld1q_f32(a.add(p * MR));
        let a_hi = vld1q_f32(a.add(p * MR + 4));
        for j in 0..3 {
            acc[0][j] = vfmaq_laneq_f32::<0>(acc[0][j], bv[j], a_lo);
            acc[1][j] = vfmaq_laneq_f32::<1>(acc[1][j], bv[j], a_lo);
            acc[2][j] = vfmaq_laneq_f32::<2>(acc[2][j], bv[j], a_lo);
            acc[3][j] = vfmaq_laneq_f32::<3>(acc[3][j], bv[j], a_lo);
            acc[4][j] = vfmaq_laneq_f32::<0>(acc[4][j], bv[j], a_hi);
            acc[5][j] = vfmaq_laneq_f32::<1>(acc[5][j], bv[j], a_hi);
            acc[6][j] = vfmaq_laneq_f32::<2>(acc[6][j], bv[j], a_hi);
            acc[7][j] = vfmaq_laneq_f32::<3>(acc[7][j], bv[j], a_hi);
        }
    }
    for i in 0..MR {
        for j in 0..3 {
            vst1q_f32(c.add(i * ldc + 4 * j), acc[i][j]);
        }
    }
}
